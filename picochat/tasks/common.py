"""What the task modules share: where their data lives, and how a multiple-choice question is asked.

Every task module (arc, mmlu, gsm8k, humaneval, spelling) offers the same plain functions:
    load(split=..., root=None) -> items        items are dicts; root defaults to $PICOCHAT_HOME/data/eval
    prompt(item) -> {"messages": [user]}       what the model is asked (render_for_completion it)
    conversation(item) -> {"messages": [...]}  the question with its full answer, for training mixtures
    check(item, text) -> bool                  is this assistant reply right
Multiple-choice tasks also have letters(item) (the answer letters, in order) and answer_letter(item); the
evaluator scores them by the logits of those letters right after <|assistant_start|>.
"""
from pathlib import Path

from picochat.common import UserError
from picochat.shards import eval_dir

LETTERS = "ABCDEFGHIJ"
SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")


def eval_root(root=None) -> Path:
    return Path(root) if root else eval_dir()


def find_split(folder, split, what):
    """folder/<split>.parquet, .jsonl or .jsonl.gz, or a UserError naming what to run."""
    folder = Path(folder)
    for suffix in SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    raise UserError(f"no {what} data: {folder}/{split}.parquet (or .jsonl) is missing; "
                    f"run `picochat data download --what eval` or pass --data DIR")


def has_split(folder, split):
    return any((Path(folder) / f"{split}{s}").is_file() for s in SUFFIXES)


# ---- multiple choice -------------------------------------------------------------------------------------
def letters(item):
    return list(LETTERS[:len(item["choices"])])


def answer_letter(item):
    return LETTERS[item["answer"]]


def mc_user_message(question, choices):
    """The question, its choices one per line as 'A. text', and the instruction to answer with a letter."""
    lines = [question.strip(), ""] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    options = ", ".join(LETTERS[:len(choices) - 1]) + f" or {LETTERS[len(choices) - 1]}"
    return "\n".join(lines) + f"\n\nAnswer with the letter of the correct choice ({options})."


def mc_prompt(item):
    return {"messages": [{"role": "user", "content": mc_user_message(item["question"], item["choices"])}]}


def mc_conversation(item):
    return {"messages": mc_prompt(item)["messages"] + [{"role": "assistant", "content": answer_letter(item)}]}


def mc_check(item, text):
    """A generated reply is right if its first non-space character is the right letter."""
    text = (text or "").strip()
    return bool(text) and text[0] == answer_letter(item)


def mc_row(path, i, question, *, choices, labels, answer, **extra):
    """A multiple-choice row as the readers return it, or a UserError naming path and row i when the question,
    choices or answer index are malformed."""
    if not (isinstance(question, str) and isinstance(choices, list) and len(choices) >= 2 and
            len(labels) == len(choices) and isinstance(answer, int) and 0 <= answer < len(choices)):
        raise UserError(f"{path} row {i}: not a multiple-choice question with a valid answer")
    return {"question": question, "choices": choices, "labels": labels, "answer": answer, **extra}
