"""Pretraining batches from parquet shards: BOS-aligned best-fit packing, rank sharding, exact resume.

Every row of T+1 tokens starts at a document boundary. Rows are filled greedily with the largest buffered
document that still fits; when none fits, the shortest one is cropped to fill the row exactly, so there is
no padding. The state (epoch, next row group, and the buffered documents themselves) is small enough to
checkpoint, so a resumed run sees exactly the batches an uninterrupted one would have.

Data parallelism: the data is split into S streams, S = micro-batches per optimizer step; stream s reads
row groups s, s+S, s+2S, ... and packs its own rows. Micro-batch k of every step comes from stream k, and
with W ranks rank r serves streams r, r+W, ... (so, as a whole, rank r reads row groups r, r+W, ...).
What a step trains on therefore depends on S alone, not on how its micro-batches are split between ranks
and gradient accumulation: 2 ranks x 1 accumulation step see exactly the data of 1 rank x 2 steps, and a
checkpoint resumes exactly on any number of ranks that divides S.
"""
import bisect

import numpy as np
import pyarrow.parquet as pq
import torch

from picochat.common import UserError


def _row_groups(files):
    out = []
    for f in files:
        try:
            meta = pq.ParquetFile(f).metadata
        except Exception as e:
            raise UserError(f"{f} is not a readable parquet file ({e.__class__.__name__}: {e})") from None
        if "text" not in meta.schema.names:
            raise UserError(f"{f} has no 'text' column (columns: {', '.join(meta.schema.names)})")
        out.extend((str(f), i) for i in range(meta.num_row_groups))
    if not out:
        raise UserError(f"no documents in {', '.join(map(str, files))}")
    return out


def stream_share(groups, stream, num_streams):
    """(row groups, part, parts): what one of num_streams streams reads. With at least as many row groups
    as streams, every S-th group, whole; with fewer (small data), the streams that share a group split its
    documents, each keeping every parts-th one from its part."""
    G = len(groups)
    if G >= num_streams:
        return groups[stream::num_streams], 0, 1
    g = stream % G
    return [groups[g]], stream // G, (num_streams - g + G - 1) // G


class PretrainLoader:
    """One data stream (stream `rank` of `world`): BOS-aligned best-fit packed rows, resumable exactly."""

    def __init__(self, files, tokenizer, batch_size, seq_len, *, rank=0, world=1, buffer_docs=1000,
                 device="cpu", loop=True, groups=None):
        self.tokenizer, self.B, self.T = tokenizer, batch_size, seq_len
        self.device, self.loop, self.buffer_docs = torch.device(device), loop, buffer_docs
        self.groups, self.part, self.parts = stream_share(groups or _row_groups(files), rank, world)
        self.epoch, self.next_group = 0, 0
        self.lengths, self.docs = [], []  # buffer kept sorted by length; documents as int32 arrays (4 B/token)
        self.exhausted = False

    def _refill(self):
        while len(self.docs) < self.buffer_docs and not self.exhausted:
            if self.next_group >= len(self.groups):
                if not self.loop:
                    self.exhausted = True
                    return
                self.epoch, self.next_group = self.epoch + 1, 0
            path, rg = self.groups[self.next_group]
            self.next_group += 1
            try:
                texts = pq.ParquetFile(path).read_row_group(rg, columns=["text"]).column("text").to_pylist()
            except Exception as e:
                raise UserError(f"{path} row group {rg} cannot be read ({e.__class__.__name__}: {e}): the shard "
                                "is corrupt or truncated; delete it and download or import it again") from None
            for ids in self.tokenizer.encode([t for t in texts[self.part::self.parts] if t], prepend_bos=True):
                i = bisect.bisect_right(self.lengths, len(ids))
                self.lengths.insert(i, len(ids))
                self.docs.insert(i, np.asarray(ids, dtype=np.int32))

    def _pop(self, i):
        self.lengths.pop(i)
        return self.docs.pop(i)

    def next_batch(self):
        """(inputs, targets), each (B, T) int64. Raises StopIteration when loop=False and data ran out."""
        row_len = self.T + 1
        rows = np.empty((self.B, row_len), dtype=np.int64)
        for b in range(self.B):
            pos = 0
            while pos < row_len:
                self._refill()
                if not self.docs:
                    raise StopIteration
                room = row_len - pos
                i = bisect.bisect_right(self.lengths, room) - 1
                if i >= 0:
                    doc = self._pop(i)
                else:
                    doc = self._pop(0)[:room]
                rows[b, pos:pos + len(doc)] = doc
                pos += len(doc)
        rows = torch.from_numpy(rows)
        if self.device.type == "cuda":  # pinned memory makes the copy truly asynchronous
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        else:
            rows = rows.to(self.device)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        flat = np.concatenate(self.docs) if self.docs else np.zeros(0, dtype=np.int32)
        return {"epoch": self.epoch, "next_group": self.next_group, "exhausted": self.exhausted,
                "doc_lengths": torch.tensor(self.lengths, dtype=torch.long),
                "doc_tokens": torch.from_numpy(flat), "num_groups": len(self.groups)}

    def load_state_dict(self, state):
        if state["num_groups"] != len(self.groups):
            raise UserError(f"loader state was saved over {state['num_groups']} row groups but the data now has "
                            f"{len(self.groups)}: the data folder or the number of ranks changed since the checkpoint")
        self.epoch, self.next_group, self.exhausted = state["epoch"], state["next_group"], state["exhausted"]
        self.lengths = state["doc_lengths"].tolist()
        flat = state["doc_tokens"].numpy().astype(np.int32)
        ends = np.cumsum(self.lengths, dtype=np.int64)
        self.docs = [flat[e - n:e] for n, e in zip(self.lengths, ends)]


class StepLoader:
    """The micro-batches of this rank for data parallel training with gradient accumulation.

    num_streams = micro-batches per optimizer step (total batch / (batch_size x seq_len)); this rank serves
    streams rank, rank + world, ... in turn, one per accumulation step (see the module docstring)."""

    def __init__(self, files, tokenizer, batch_size, seq_len, *, num_streams, rank=0, world=1, buffer_docs=1000,
                 device="cpu"):
        if num_streams % world:
            raise UserError(f"{num_streams} micro-batches per step cannot be split evenly across {world} ranks")
        groups = _row_groups(files)
        self.num_streams, self.seq_len = num_streams, seq_len
        self.ids = list(range(rank, num_streams, world))
        self.streams = {s: PretrainLoader(files, tokenizer, batch_size, seq_len, rank=s, world=num_streams,
                                          buffer_docs=buffer_docs, device=device, groups=groups) for s in self.ids}
        self.turn = 0

    def next_batch(self):
        stream = self.streams[self.ids[self.turn]]
        self.turn = (self.turn + 1) % len(self.ids)
        return stream.next_batch()

    def state_dict(self):
        return {"num_streams": self.num_streams, "seq_len": self.seq_len, "turn": self.turn,
                "streams": {s: st.state_dict() for s, st in self.streams.items()}}

    def load_state_dicts(self, states):
        """Restore from the states that all ranks of a run saved, for any number of ranks then and now.
        Returns False, changing nothing, when that run split its data differently (another number of
        micro-batches per step or another sequence length): the data order then cannot continue."""
        merged = {}
        for st in states:
            if st.get("num_streams") != self.num_streams or st.get("seq_len") != self.seq_len:
                return False
            merged.update(st["streams"])
        missing = [s for s in self.ids if s not in merged]
        if missing:
            raise UserError(f"the checkpoint has no loader state for data stream(s) {missing[:4]}: "
                            f"a rank's state file is missing")
        for s in self.ids:
            self.streams[s].load_state_dict(merged[s])
        self.turn = states[0]["turn"] % len(self.ids)
        return True


def fixed_batches(files, tokenizer, batch_size, seq_len, max_batches):
    """The first max_batches micro-batches (fewer if the data runs out) of one pass over files, on the CPU:
    the same validation set on any number of ranks (each rank evaluates batches rank, rank + W, ...)."""
    loader = PretrainLoader(files, tokenizer, batch_size, seq_len, loop=False)
    out = []
    for _ in range(max_batches):
        try:
            out.append(loader.next_batch())
        except StopIteration:
            break
    return out
