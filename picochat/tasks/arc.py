"""ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge): grade-school science, multiple choice.

Data: <root>/arc/<subset>/<split>.parquet (as downloaded) or .jsonl, HF ai2_arc schema. Choices are shown
with letters A, B, C, ... whatever labels the source uses (some questions use 1-4, a few have 3 or 5 choices).
"""
from picochat.shards import read_records
from picochat.tasks.common import (eval_root, find_split, has_split, letters, answer_letter, mc_row,
                                   mc_prompt as prompt, mc_conversation as conversation, mc_check as check)

SUBSETS = ("ARC-Easy", "ARC-Challenge")
__all__ = ["read_arc", "load", "available", "prompt", "conversation", "check", "letters", "answer_letter"]


def read_arc(path):
    """ARC (HF ai2_arc schema) -> [{"id", "question", "choices": [str], "labels": [str], "answer": index}].
    Labels stay as published (mostly A-D, sometimes 1-4; 3 or 5 choices happen)."""
    out = []
    for i, r in enumerate(read_records(path), 1):
        ch = r.get("choices") or {}
        labels = list(ch.get("label") or [])
        answer = labels.index(r.get("answerKey")) if r.get("answerKey") in labels else -1
        out.append(mc_row(path, i, r.get("question"), choices=list(ch.get("text") or []), labels=labels,
                          answer=answer, id=r.get("id")))
    return out


def load(subset="ARC-Easy", split="test", root=None):
    """[{"question", "choices", "answer" (index), "id"}]; split is train, validation or test."""
    if subset not in SUBSETS:
        raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
    rows = read_arc(find_split(eval_root(root) / "arc" / subset, split, subset))
    return [{"question": r["question"], "choices": r["choices"], "answer": r["answer"], "id": r.get("id")}
            for r in rows]


def available(subset="ARC-Easy", split="test", root=None):
    return has_split(eval_root(root) / "arc" / subset, split)
