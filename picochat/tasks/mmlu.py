"""MMLU: 57 subjects of exam questions, four choices each.

Data: <root>/mmlu/all/<split>.parquet (HF cais/mmlu "all" config): test (14,042) for evaluation; dev,
validation and auxiliary_train (when downloaded) for training mixtures.
"""
from picochat.shards import read_records
from picochat.tasks.common import (eval_root, find_split, has_split, letters, answer_letter, mc_row,
                                   mc_prompt as prompt, mc_conversation as conversation, mc_check as check)

__all__ = ["read_mmlu", "load", "available", "prompt", "conversation", "check", "letters", "answer_letter"]


def read_mmlu(path):
    """MMLU (HF cais/mmlu schema) -> [{"question", "subject", "choices", "labels": [A-D], "answer": index}]."""
    out = []
    for i, r in enumerate(read_records(path), 1):
        if isinstance(r.get("train"), dict):  # the auxiliary_train config nests each row under "train"
            r = r["train"]
        choices = list(r.get("choices") or [])
        out.append(mc_row(path, i, r.get("question"), choices=choices, labels=list("ABCDEFGHIJ"[:len(choices)]),
                          answer=r.get("answer"), subject=r.get("subject", "")))
    return out


def load(split="test", root=None, subject=None):
    """[{"question", "choices", "answer" (index), "subject"}], optionally one subject only."""
    rows = read_mmlu(find_split(eval_root(root) / "mmlu" / "all", split, "MMLU"))
    return [{"question": r["question"], "choices": r["choices"], "answer": r["answer"], "subject": r["subject"]}
            for r in rows if subject is None or r["subject"] == subject]


def available(split="test", root=None):
    return has_split(eval_root(root) / "mmlu" / "all", split)
