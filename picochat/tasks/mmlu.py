"""MMLU: 57 subjects of exam questions, four choices each.

Data: <root>/mmlu/all/<split>.parquet (HF cais/mmlu "all" config): test (14,042) for evaluation; dev,
validation and auxiliary_train (when downloaded) for training mixtures.
"""
from picochat.data import read_mmlu
from picochat.tasks.common import (eval_root, find_split, has_split, letters, answer_letter, mc_prompt as prompt,
                                   mc_conversation as conversation, mc_check as check)

__all__ = ["load", "available", "prompt", "conversation", "check", "letters", "answer_letter"]


def load(split="test", root=None, subject=None):
    """[{"question", "choices", "answer" (index), "subject"}], optionally one subject only."""
    rows = read_mmlu(find_split(eval_root(root) / "mmlu" / "all", split, "MMLU"))
    return [{"question": r["question"], "choices": r["choices"], "answer": r["answer"], "subject": r["subject"]}
            for r in rows if subject is None or r["subject"] == subject]


def available(split="test", root=None):
    return has_split(eval_root(root) / "mmlu" / "all", split)
