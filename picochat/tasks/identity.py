"""Identity conversations: greetings and what picochat is, so the chat model knows its own name.

By default they are generated from the demo curriculum's templates (picochat.demo, the one place that says who
picochat is). A user who wants another persona passes a jsonl of {"messages": [...]} (--identity-jsonl), which
replaces them; it is checked like any user conversation file.
"""
import random

from picochat import demo
from picochat.tasks import chat


def load(path=None, n=1000, seed=0):
    """n generated conversations (fixed seed), or the conversations of the jsonl at path."""
    if path:
        return chat.load(path)[0]
    rng = random.Random(f"{seed}-identity-sft")
    return [demo.make_identity_conversation(rng) for _ in range(n)]
