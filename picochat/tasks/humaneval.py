"""HumanEval: write a Python function from its signature and docstring; right iff the task's tests pass.

Data: <root>/humaneval/test.parquet (or .jsonl): {"task_id", "prompt", "canonical_solution", "test",
"entry_point"}. The reply's code (a fenced block if there is one, else the whole reply) is either a whole
definition of the function or the body that continues the prompt; either way it runs with the tests in
picochat.sandbox.run_python, never in this process.

A pass can be forged by code written to fool the check rather than to solve the task: it runs in the same
interpreter as the tests, so it can read the marker (from its own code object) and print it, exit early, or
return an object equal to everything. Harmless when scoring an honest model; never use check() as an RL reward
as it stands, or a policy will learn the forgery.
"""
import re
import secrets

from picochat.common import UserError
from picochat.shards import read_records
from picochat.tasks.common import eval_root, find_split, has_split

TIMEOUT = 10.0
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.S)


def read_humaneval(path):
    """HumanEval rows {"task_id", "prompt", "canonical_solution", "test", "entry_point"}."""
    rows = read_records(path)
    for i, r in enumerate(rows, 1):
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(r.get(k), str)]
        if missing:
            raise UserError(f"{path} row {i}: missing {', '.join(missing)}")
    return rows


def load(split="test", root=None):
    return read_humaneval(find_split(eval_root(root) / "humaneval", split, "HumanEval"))


def available(split="test", root=None):
    return has_split(eval_root(root) / "humaneval", split)


def prompt(item):
    return {"messages": [{"role": "user", "content": item["prompt"]}]}


def conversation(item):
    return {"messages": prompt(item)["messages"] +
            [{"role": "assistant", "content": item["prompt"] + item["canonical_solution"]}]}


def extract_code(text):
    m = _FENCE.search(text or "")
    return m.group(1) if m else (text or "")


def program(item, text, marker=""):
    """The program to run: the completed function, the tests, the call of check(), then a print of marker
    (a random string): a program that exits early with status 0 never prints it, so it does not pass."""
    code = extract_code(text)
    if re.search(rf"^\s*def\s+{re.escape(item['entry_point'])}\s*\(", code, re.M):
        # a whole definition: keep the prompt's imports (and helpers) but not its unfinished def
        at = item["prompt"].find(f"def {item['entry_point']}")
        body = (item["prompt"][:at] if at >= 0 else "") + "\n" + code
    else:
        body = item["prompt"] + code
    return f"{body}\n\n{item['test']}\n\ncheck({item['entry_point']})\nprint({marker!r})\n"


def check(item, text, timeout=TIMEOUT):
    from picochat.sandbox import run_python
    marker = secrets.token_hex(16)
    result = run_python(program(item, text, marker), timeout=timeout)
    return result.ok and marker in result.stdout
