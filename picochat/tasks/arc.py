"""ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge): grade-school science, multiple choice.

Data: <root>/arc/<subset>/<split>.parquet (as downloaded) or .jsonl, HF ai2_arc schema. Choices are shown
with letters A, B, C, ... whatever labels the source uses (some questions use 1-4, a few have 3 or 5 choices).
"""
from picochat.data import read_arc
from picochat.tasks.common import (eval_root, find_split, has_split, letters, answer_letter, mc_prompt as prompt,
                                   mc_conversation as conversation, mc_check as check)

SUBSETS = ("ARC-Easy", "ARC-Challenge")
__all__ = ["load", "available", "prompt", "conversation", "check", "letters", "answer_letter"]


def load(subset="ARC-Easy", split="test", root=None):
    """[{"question", "choices", "answer" (index), "id"}]; split is train, validation or test."""
    if subset not in SUBSETS:
        raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
    rows = read_arc(find_split(eval_root(root) / "arc" / subset, split, subset))
    return [{"question": r["question"], "choices": r["choices"], "answer": r["answer"], "id": r.get("id")}
            for r in rows]


def available(subset="ARC-Easy", split="test", root=None):
    return has_split(eval_root(root) / "arc" / subset, split)
