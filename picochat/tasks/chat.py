"""Real chat conversations for SFT: SmolTalk parquet, ShareGPT-style jsonl, or a user's own jsonl.

A user's own file ({"messages": [...]} per line) is checked strictly: a conversation the tokenizer would refuse
(roles out of order, an empty assistant turn, ...) stops the run with an error naming the file and line, since
it is data the user wrote and wants trained on. Published sets (SmolTalk, ShareGPT, hh-rlhf) are converted
leniently instead: what can be fixed safely is fixed, the rest is skipped and counted (see to_messages).
"""
from pathlib import Path

from picochat.common import UserError
from picochat.shards import eval_dir, iter_jsonl, read_records, sft_dir
from picochat.tokenizer import normalize_messages

CHAT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")

ROLE_MAP = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
            "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}


def to_messages(turns):
    """ShareGPT-ish turns ({role|from, content|value}) -> our messages, or (None, reason) if it cannot be fixed.
    Fixes what is safe: renames roles, drops empty turns, merges consecutive turns of one role, drops a leading
    assistant turn and a trailing user turn (nothing to learn from them). Returns (messages, reason)."""
    if not isinstance(turns, list):
        return None, "no list of turns"
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            return None, "turn is not an object"
        role = ROLE_MAP.get(str(t.get("role", t.get("from", ""))).lower())
        text = t.get("content", t.get("value"))
        if role is None:
            return None, "unknown role"
        if not isinstance(text, str):
            return None, "content is not a string"
        if not text.strip():
            continue
        if role == "system":
            if out:
                return None, "system turn in the middle"
            out.append({"role": "system", "content": text})
        elif out and out[-1]["role"] == role:
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + text}
        else:
            out.append({"role": role, "content": text})
    first = 1 if out and out[0]["role"] == "system" else 0
    while len(out) > first and out[first]["role"] == "assistant":
        del out[first]
    if out and out[-1]["role"] != "assistant":
        out.pop()
    if len(out) - first < 2:
        return None, "no user/assistant exchange"
    return out, None


def read_conversations(path):
    """Chat data -> ([{"messages": [...]}], skipped): our own format, ShareGPT ({"conversations": [{"from",
    "value"}]}), or preference pairs ({"chosen": [...]}, the chosen side). skipped counts the rows left out,
    by reason. Works on .jsonl, .jsonl.gz and .parquet (a `messages` column, e.g. SmolTalk)."""
    convs, skipped = [], {}
    for row in read_records(path):
        turns = row.get("messages", row.get("conversations", row.get("chosen")))
        msgs, why = to_messages(turns)
        if msgs is None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        conv = {"messages": msgs}
        if "id" in row:
            conv["id"] = row["id"]
        convs.append(conv)
    return convs, skipped


def read_smoltalk(path):
    """SmolTalk parquet (a `messages` column of [{role, content}]) -> ([{"messages"}], skipped)."""
    return read_conversations(path)


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
