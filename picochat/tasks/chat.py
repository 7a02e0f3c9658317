"""Real chat conversations for SFT: SmolTalk parquet, ShareGPT-style jsonl, or a user's own jsonl.

A user's own file (`picochat sft --data`, --identity-jsonl, `data/sft/` from `data import --chat`) is read
strictly, one conversation per line, its format told by the line's keys:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}        OpenAI
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}          ShareGPT
    {"chosen": [messages], "rejected": ...}                                              a preference pair
    {"prompt": "..." or [messages], "chosen": "..." or [messages], "rejected": ...}     ... with its prompt apart
(a preference pair trains on its chosen side; "rejected" is never read). Every line becomes {"messages": [...]}
as the tokenizer renders it: an optional system message first, then user and assistant alternating, starting
with the user and ending with the assistant. A line that is not that (not JSON, another format, an empty
conversation, roles out of order, a last turn not the assistant's, ...) stops the run with one line naming the
file, the line and the problem, since it is data the user wrote and wants trained on. Published sets (SmolTalk
parquet; ShareGPT or hh-rlhf jsonl through `picochat data import --chat`) are converted leniently instead: what
can be fixed safely is fixed, the rest is skipped and counted (see to_messages).
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


def _sharegpt(turns):
    """ShareGPT turns -> messages, each turn's role renamed (ROLE_MAP) and nothing else changed: unlike
    to_messages nothing is merged or dropped, the caller checks the result."""
    if not isinstance(turns, list):
        raise UserError("'conversations' must be a list of {from, value} turns")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise UserError(f"message {i} must be an object with 'from' and 'value'")
        role = ROLE_MAP.get(t["from"].lower()) if isinstance(t["from"], str) else None
        if role is None:
            raise UserError(f"message {i}: unknown ShareGPT role {t['from']!r} (use system, human or gpt)")
        out.append({"role": role, "content": t["value"]})
    return out


def _preference(obj):
    """The chosen side of a preference pair as messages: "chosen" alone (a whole conversation), or "prompt" and
    "chosen" (each a string, for one user turn and one assistant reply, or a list of messages) end to end."""
    chosen, prompt = obj["chosen"], obj.get("prompt")
    if prompt is None:
        if isinstance(chosen, str):
            raise UserError("'chosen' is a string but there is no 'prompt' (give both, or 'chosen' as a list of "
                            "messages)")
        return chosen
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    tail = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else chosen
    if not isinstance(head, list) or not isinstance(tail, list):
        raise UserError("'prompt' and 'chosen' must each be a string or a list of messages")
    return head + tail


def conversation(obj, where):
    """One line of a user's conversation file (any format of the module docstring) -> {"messages": [...]} in
    picochat's form, or a UserError '<where>: <the problem>'."""
    try:
        if "messages" in obj:
            messages = obj["messages"]
        elif "conversations" in obj:
            messages = _sharegpt(obj["conversations"])
        elif "chosen" in obj:
            messages = _preference(obj)
        else:
            keys = f"keys {', '.join(repr(k) for k in list(obj)[:4])}" if obj else "an empty object"
            raise UserError(f"unknown format ({keys}): expected 'messages' (OpenAI), 'conversations' "
                            f"(ShareGPT) or 'chosen' (a preference pair)")
        if not isinstance(messages, list):
            raise UserError("the messages must be a list of {role, content}")
        if not messages:
            raise UserError("empty conversation (no messages)")
        last = normalize_messages(messages)[-1]["role"]  # roles, order and content, as the tokenizer needs them
        if last != "assistant":
            raise UserError(f"the last message is the {last}'s: a conversation must end with the assistant's reply "
                            f"(only the assistant's turns are trained on)")
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, KeyError, AttributeError):  # a shape normalize_messages does not foresee
        raise UserError(f"{where}: not a conversation (expected {{\"messages\": [{{role, content}}, ...]}})") from None
    return {"messages": messages}


def load_jsonl(path):
    """The conversations of a user's .jsonl(.gz) file, every line checked before any is returned (see
    conversation); a bad line is a UserError naming it."""
    return [conversation(obj, f"{path} line {n}") for n, obj in iter_jsonl(path)]


def load(path):
    """A chat file or a folder of them -> (conversations, skipped). Parquet files (SmolTalk: a `messages`
    column) are converted leniently, skipping and counting what cannot be; jsonl is read strictly (load_jsonl)."""
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
            c, s = load_jsonl(f), 0
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
