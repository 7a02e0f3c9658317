"""The demo curriculum's tasks (written by `picochat data demo` into data/demo/) as training conversations,
validation conversations and RL problems.

    data/demo/sft/train.jsonl          the SFT mix: word problems with tool calls, spelling, world questions,
                                       greetings and identity; each line carries its "source"
    data/demo/eval/chat/val.jsonl      held-out conversations (from the test sets) for a validation loss
    data/demo/eval/gsm8k/{train,test}  word problems in GSM8K format: RL trains on train, measures on test
    data/demo/eval/spelling/{train,test}
The word problems and spelling questions are scored by the same task modules as the real sets (tasks.gsm8k,
tasks.spelling) with root=data/demo/eval.
"""
from pathlib import Path

from picochat.common import UserError
from picochat.shards import data_dir, iter_jsonl
from picochat.tasks import chat, gsm8k, spelling


def root(folder=None) -> Path:
    """The demo curriculum folder, or a UserError saying how to make it."""
    folder = Path(folder) if folder else data_dir(demo=True)
    if not (folder / "sft" / "train.jsonl").is_file():
        raise UserError(f"no demo curriculum in {folder}: run `picochat data demo` first")
    return folder


def sft_conversations(folder=None):
    """{source name: [conversation]} of the demo SFT mix (source = word_problem, spelling, identity, world)."""
    by_source = {}
    path = root(folder) / "sft" / "train.jsonl"
    for n, obj in iter_jsonl(path):
        by_source.setdefault(obj.get("source", "chat"), []).append(chat.conversation(obj, f"{path} line {n}"))
    return by_source


def val_conversations(folder=None):
    return chat.load(root(folder) / "eval" / "chat" / "val.jsonl")[0]


def word_problems(split="test", folder=None):
    """GSM8K-format records {"question", "answer", "meta"}; test is held apart from everything else."""
    return gsm8k.load(split, root=root(folder) / "eval")


def spelling_questions(split="test", folder=None):
    return spelling.load(split, root=root(folder) / "eval")
