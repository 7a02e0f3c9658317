"""Spelling and letter counting ("How many r are in strawberry?"): the model spells the word out, tallies the
letter and ends with '#### N'. Answers are written by picochat.demo.count_answer, so real and demo data agree.

Data: <root>/spelling/<split>.jsonl when present (the demo curriculum writes data/demo/eval/spelling), else
questions generated from the word list <root>/words/words_alpha.txt with a fixed seed; the words are split once
(a tenth for test), so test words never appear in training conversations.
"""
import random

from picochat.common import UserError
from picochat.shards import read_jsonl, read_text
from picochat.demo import make_count_question, random_letter, check_spelling
from picochat.tasks.common import eval_root

SEED = 42
WORDS_FILE = ("words", "words_alpha.txt")


def read_words(path):
    """A word list, one word per line (.txt or .txt.gz; Windows line endings are fine)."""
    return [w for w in read_text(path).split() if w]


def _words_path(root):
    return eval_root(root).joinpath(*WORDS_FILE)


def available(split="test", root=None):
    return (eval_root(root) / "spelling" / f"{split}.jsonl").is_file() or _words_path(root).is_file()


def load(split="test", root=None, n=None):
    """[{"question", "answer", "meta": {"task": "count"|"spell", "word", "letter", "count"}}]. From a word list,
    n questions (default 1,000 for test, 20,000 for train)."""
    folder = eval_root(root)
    if (folder / "spelling" / f"{split}.jsonl").is_file():
        rows = read_jsonl(folder / "spelling" / f"{split}.jsonl")
        return rows[:n] if n else rows
    if not _words_path(root).is_file():
        raise UserError(f"no spelling data: neither {folder / 'spelling' / (split + '.jsonl')} nor {_words_path(root)} "
                        f"exists; run `picochat data download --what eval` (or `picochat data demo`)")
    if split not in ("train", "test"):
        raise UserError(f"spelling split must be train or test, got {split!r}")
    words = sorted({w.lower() for w in read_words(_words_path(root))
                    if w.isalpha() and w.isascii() and 3 <= len(w) <= 12})
    random.Random(SEED).shuffle(words)
    cut = max(1, len(words) // 10)
    pool = words[:cut] if split == "test" else words[cut:]
    rng = random.Random(f"{SEED}-{split}")
    n = n or (1000 if split == "test" else 20000)
    out = []
    for _ in range(n):
        word = pool[rng.randrange(len(pool))]
        out.append(make_count_question(rng, word, random_letter(rng, word)))
    return out


def prompt(item):
    return {"messages": [{"role": "user", "content": item["question"]}]}


def conversation(item):
    return {"messages": prompt(item)["messages"] + [{"role": "assistant", "content": item["answer"]}]}


def check(item, text):
    """Counting: the number after '####' is the letter's count. Spelling: the hyphenated spelling appears."""
    return check_spelling(item, text or "")
