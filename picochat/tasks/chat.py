"""Real chat conversations for SFT: SmolTalk parquet, ShareGPT-style jsonl, or a user's own jsonl.

A user's own file ({"messages": [...]} per line) is checked strictly: a conversation the tokenizer would refuse
(roles out of order, an empty assistant turn, ...) stops the run with an error naming the file and line, since
it is data the user wrote and wants trained on. Published sets (SmolTalk, ShareGPT, hh-rlhf) are converted
leniently instead: what can be fixed safely is fixed, the rest is skipped and counted (see data.to_messages).
"""
from pathlib import Path

from picochat.common import UserError
from picochat.data import iter_jsonl, read_conversations, to_messages, eval_dir, sft_dir
from picochat.tokenizer import normalize_messages

CHAT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


def check_conversation(conv, where):
    """Raise a UserError naming `where` (e.g. 'file.jsonl line 7') if the tokenizer would refuse conv."""
    try:
        normalize_messages(conv)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, KeyError, AttributeError):
        raise UserError(f"{where}: not a conversation (expected {{\"messages\": [{{role, content}}, ...]}})") from None


def load_jsonl(path):
    """Conversations of a .jsonl(.gz) file. Lines with "messages" must be valid (UserError naming the line);
    ShareGPT lines ("conversations" of {from, value}) and preference pairs ("chosen") are converted, and the
    ones that cannot be are skipped. Returns (conversations, skipped count)."""
    convs, skipped = [], 0
    for n, obj in iter_jsonl(path):
        if "messages" in obj:
            check_conversation(obj, f"{path} line {n}")
            convs.append({"messages": obj["messages"]})
            continue
        turns = obj.get("conversations", obj.get("chosen"))
        if turns is None:
            raise UserError(f"{path} line {n}: no 'messages' (or ShareGPT 'conversations') field")
        msgs, _ = to_messages(turns)
        if msgs is None:
            skipped += 1
        else:
            convs.append({"messages": msgs})
    return convs, skipped


def load(path):
    """A chat file or a folder of them -> (conversations, skipped). Parquet files (SmolTalk: a `messages`
    column) are converted leniently, jsonl as in load_jsonl."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    files = sorted(f for f in path.rglob("*") if f.name.endswith(CHAT_SUFFIXES)) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path}: no .jsonl, .jsonl.gz or .parquet files of conversations")
    convs, skipped = [], 0
    for f in files:
        if f.name.endswith(".parquet"):
            c, why = read_conversations(f)
            s = sum(why.values())
        elif f.name.endswith((".jsonl", ".jsonl.gz")):
            c, s = load_jsonl(f)
        else:
            raise UserError(f"{f}: unknown format (expected .jsonl, .jsonl.gz or .parquet)")
        convs += c
        skipped += s
    if not convs:
        raise UserError(f"{path}: no usable conversations")
    return convs, skipped


def smoltalk(split="train", root=None):
    """SmolTalk as downloaded by `picochat data download --what sft` (data/eval/smoltalk/<split>-*.parquet)."""
    folder = Path(root) if root else eval_dir() / "smoltalk"
    files = sorted(folder.glob(f"{split}*.parquet"))
    if not files:
        raise UserError(f"no SmolTalk {split} files in {folder}: run `picochat data download --what sft`")
    convs, skipped = [], 0
    for f in files:
        c, s = load(f)
        convs += c
        skipped += s
    return convs, skipped


def imported():
    """Conversations imported with `picochat data import --chat` (data/sft/*.jsonl), or [] if none."""
    folder = sft_dir()
    if not folder.is_dir() or not any(folder.glob("*.jsonl")):
        return []
    return load(folder)[0]
