"""GSM8K: grade-school word problems. The reference solutions mark each calculation as <<expr=result>>;
in a training conversation those become calls of the Python tool (expr) and its output (result), so the
model learns to use the calculator. A reply is right when the number after its '####' equals the
reference's, commas stripped.

Data: <root>/gsm8k/<split>.parquet or .jsonl ({"question", "answer"}), split train or test. The demo
curriculum's word problems use the same format (data/demo/eval/gsm8k), so the same functions serve them.
"""
from picochat.data import read_gsm8k, extract_answer
from picochat.demo import answer_to_parts
from picochat.tasks.common import eval_root, find_split, has_split


def load(split="test", root=None):
    """[{"question", "answer"}] (plus whatever else the rows carry, e.g. the demo's "meta")."""
    return read_gsm8k(find_split(eval_root(root) / "gsm8k", split, "GSM8K"))


def available(split="test", root=None):
    return has_split(eval_root(root) / "gsm8k", split)


def prompt(item):
    return {"messages": [{"role": "user", "content": item["question"]}]}


def conversation(item):
    """The worked solution as the assistant turn, each <<expr=result>> a python tool call and its output."""
    return {"messages": prompt(item)["messages"] + [{"role": "assistant", "content": answer_to_parts(item["answer"])}]}


def reference(item):
    return extract_answer(item["answer"])


def check(item, text):
    got = extract_answer(text)
    return got is not None and got == reference(item)
