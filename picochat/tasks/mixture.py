"""Task mixtures for SFT: several sources of conversations, each seen a chosen number of times, in one
deterministic shuffled order.

A source's `epochs` is how many times its items appear per pass over the mixture: 2 repeats every item twice
(oversampling a small task), 0.5 takes a fixed random half (undersampling a big one), 1.5 all of them plus a
fixed half. Items can be anything a source's `convert` turns into a conversation (e.g. a GSM8K row), so
nothing is rendered before it is needed. Same sources + same seed -> same order, so training is reproducible
and resumable by position alone.
"""
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass
class Source:
    name: str
    items: Sequence
    epochs: float = 1.0
    convert: Callable = None  # item -> {"messages": [...]}; None when the items already are conversations
    meta: dict = field(default_factory=dict)

    def conversation(self, i):
        item = self.items[i]
        return self.convert(item) if self.convert else item


class Mixture:
    """A list of conversations drawn from sources: len(), [k] -> conversation, source_of(k) -> name."""

    def __init__(self, sources, seed=0):
        self.sources = [s for s in sources if len(s.items) and s.epochs > 0]
        for s in sources:
            if s.epochs < 0:
                raise ValueError(f"source {s.name}: epochs must be >= 0, got {s.epochs}")
        rng = random.Random(f"mixture-{seed}")
        order = []
        for si, s in enumerate(self.sources):
            n, whole = len(s.items), int(s.epochs)
            for _ in range(whole):
                order += [(si, i) for i in range(n)]
            extra = round((s.epochs - whole) * n)
            if extra:  # a fixed random subset for the fractional part, drawn per source
                order += [(si, i) for i in sorted(random.Random(f"mixture-{seed}-{s.name}").sample(range(n), extra))]
        rng.shuffle(order)
        self.order = order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, k):
        si, i = self.order[k]
        return self.sources[si].conversation(i)

    def source_of(self, k):
        return self.sources[self.order[k][0]].name

    def counts(self):
        """{source name: conversations per pass} (after oversampling)."""
        out = {s.name: 0 for s in self.sources}
        for si, _ in self.order:
            out[self.sources[si].name] += 1
        return out

    def describe(self):
        return ", ".join(f"{name} {n:,}" for name, n in self.counts().items()) + f" = {len(self):,} conversations"
