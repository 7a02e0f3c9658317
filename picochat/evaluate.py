"""Evaluation: bits per byte (comparable across tokenizers, unlike loss)."""
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def bits_per_byte(model, batches, token_bytes, autocast=None):
    """Sum of target-token losses (nats) / (ln 2 * UTF-8 bytes of those targets). Targets that are special
    tokens have 0 bytes and are left out of both sums. Sums are all-reduced across ranks."""
    token_bytes = torch.as_tensor(token_bytes, dtype=torch.float32)
    total_nats = torch.zeros((), dtype=torch.float64)
    total_bytes = torch.zeros((), dtype=torch.float64)
    for x, y in batches:
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            loss = model(x, y, reduction="none").float().cpu()
        nbytes = token_bytes[y.clamp(min=0).cpu()] * (y >= 0).cpu()
        total_nats += (loss * (nbytes > 0)).sum().double()
        total_bytes += nbytes.sum().double()
    if dist.is_initialized():
        both = torch.stack([total_nats, total_bytes]).to(next(model.parameters()).device)
        dist.all_reduce(both)
        total_nats, total_bytes = both.cpu()
    if total_bytes == 0:
        return float("nan")
    return float(total_nats / (math.log(2) * total_bytes))
