"""GSM8K: grade-school word problems. The reference solutions mark each calculation as <<expr=result>>;
in a training conversation those become calls of the Python tool (expr) and its output (result), so the
model learns to use the calculator. A reply is right when the number after its '####' equals the
reference's, commas stripped.

Data: <root>/gsm8k/<split>.parquet or .jsonl ({"question", "answer"}), split train or test. The demo
curriculum's word problems use the same format (data/demo/eval/gsm8k), so the same functions serve them.
"""
import re

from picochat.common import UserError
from picochat.shards import read_records
from picochat.tasks.common import eval_root, find_split, has_split

CALC_RE = re.compile(r"<<([^<>=]+)=([^<>]+)>>")  # a calculation step: <<expr=result>>
_ANSWER_RE = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def extract_answer(text):
    """The final answer of a GSM8K-style solution: the number after '####', commas removed; None if absent."""
    m = _ANSWER_RE.search(text or "")
    if m is None:
        return None
    ans = m.group(1).replace(",", "")
    if "." in ans:
        ans = ans.rstrip("0").rstrip(".") or "0"
    return ans


def read_gsm8k(path):
    """GSM8K rows {"question", "answer"} (answer = worked solution with <<expr=result>> and '#### N')."""
    rows = read_records(path)
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("question"), str) or extract_answer(r.get("answer")) is None:
            raise UserError(f"{path} row {i}: expected a 'question' and an 'answer' ending in '#### <number>'")
    return rows


def answer_to_parts(answer):
    """A GSM8K-style answer -> assistant content parts where each <<expr=result>> becomes a python tool call
    and its output: [text, python expr, python_output result, text, ...] (the tokenizer's part format)."""
    parts, pos = [], 0
    for m in CALC_RE.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


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
