"""Pretraining batches from parquet shards: BOS-aligned best-fit packing, rank sharding, exact resume.

Every row of T+1 tokens starts at a document boundary. Rows are filled greedily with the largest buffered
document that still fits; when none fits, the shortest one is cropped to fill the row exactly, so there is
no padding. Rank r reads row groups r, r+W, r+2W, ... of the training shards. The state (epoch, next row
group, and the buffered documents themselves) is small enough to checkpoint, so a resumed run sees exactly
the batches an uninterrupted one would have.
"""
import bisect
from pathlib import Path

import pyarrow.parquet as pq
import torch

from picochat.common import UserError


def list_shards(folder):
    """Sorted parquet shards in folder; the last one is the validation shard."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist: run `picochat data demo`, `picochat data import PATH` "
                        f"or `picochat data download` first")
    files = sorted(folder.glob("*.parquet"))
    if len(files) < 2:
        raise UserError(f"data folder {folder} has {len(files)} parquet shard(s); pretraining needs at least 2 "
                        f"(the last one is held out for validation)")
    return files


def split_shards(folder):
    files = list_shards(folder)
    return files[:-1], files[-1:]


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


class PretrainLoader:
    def __init__(self, files, tokenizer, batch_size, seq_len, rank=0, world=1, buffer_docs=1000,
                 device="cpu", loop=True):
        self.tokenizer, self.B, self.T = tokenizer, batch_size, seq_len
        self.device, self.loop, self.buffer_docs = torch.device(device), loop, buffer_docs
        all_groups = _row_groups(files)
        # fewer row groups than ranks: every rank reads all of them, from a different starting point
        self.groups = all_groups[rank::world] if len(all_groups) >= world else all_groups[rank % len(all_groups):] + all_groups[:rank % len(all_groups)]
        self.epoch, self.next_group = 0, 0
        self.lengths, self.docs = [], []  # buffer kept sorted by length
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
                raise UserError(f"{path} row group {rg} cannot be read ({e.__class__.__name__}: {e}): "
                                f"the shard is corrupt or truncated; delete it and download or import it again") from None
            for ids in self.tokenizer.encode([t for t in texts if t], prepend_bos=True):
                i = bisect.bisect_right(self.lengths, len(ids))
                self.lengths.insert(i, len(ids))
                self.docs.insert(i, ids)

    def _pop(self, i):
        self.lengths.pop(i)
        return self.docs.pop(i)

    def next_batch(self):
        """(inputs, targets), each (B, T) int64. Raises StopIteration when loop=False and data ran out."""
        row_len = self.T + 1
        rows = torch.empty((self.B, row_len), dtype=torch.long)
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
                rows[b, pos:pos + len(doc)] = torch.tensor(doc, dtype=torch.long)
                pos += len(doc)
        rows = rows.to(self.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        flat = [t for d in self.docs for t in d]
        return {"epoch": self.epoch, "next_group": self.next_group, "exhausted": self.exhausted,
                "doc_lengths": torch.tensor(self.lengths, dtype=torch.long),
                "doc_tokens": torch.tensor(flat, dtype=torch.int32), "num_groups": len(self.groups)}

    def load_state_dict(self, state):
        if state["num_groups"] != len(self.groups):
            raise UserError(f"loader state was saved over {state['num_groups']} row groups but the data now has "
                            f"{len(self.groups)}: the data folder or the number of ranks changed since the checkpoint")
        self.epoch, self.next_group, self.exhausted = state["epoch"], state["next_group"], state["exhausted"]
        self.lengths = state["doc_lengths"].tolist()
        flat = state["doc_tokens"].tolist()
        self.docs, pos = [], 0
        for n in self.lengths:
            self.docs.append(flat[pos:pos + n])
            pos += n
