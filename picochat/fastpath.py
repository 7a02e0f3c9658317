"""GPU fast paths and memory fitting, applied to a GPT from outside (model.py stays plain PyTorch):

  checkpoint_blocks(model)        activation checkpointing: each block is recomputed in the backward pass
  enable_fp8(model, device)       fp8 matmuls in the blocks (torchao Float8Linear), compute capability 8.9+
  use_fast_attention(device)      FlashAttention-3 (sliding windows included) on Hopper when installed, else
                                  FlexAttention for the sliding windows when asked (flex=True)
  find_device_batch_size(...)     the largest micro-batch that fits, probed with a real forward + backward

The bf16 autocast path (fp32 master weights) lives in the stage commands, torch.compile of the model in
their --compile flag, and of the Muon update in MuonAdamW.compile().
"""
import gc
import os

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from picochat.common import UserError


def checkpoint_blocks(model):
    """Keep only each block's input in the forward pass and recompute the rest in the backward pass: the
    activation memory of a block drops to one (B, T, C) tensor, for about a third more compute. Inference
    (no grad, or a KV cache) runs the blocks as they are. The weights and their names do not change."""
    for block in model.blocks:
        if getattr(block, "_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            kv_cache = args[5] if len(args) > 5 else kwargs.get("kv_cache")
            if torch.is_grad_enabled() and kv_cache is None:
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
        block._checkpointed = True
    return model


def enable_fp8(model, device):
    """Swap the block Linears for torchao's Float8Linear (dynamic tensorwise scaling; fp8 matmuls with
    bf16/fp32 weights kept as they are, so the optimizer and checkpoints do not change). The lm_head and
    the embeddings stay in bf16. Needs fp8 tensor cores (Ada sm89, Hopper sm90, Blackwell) and torchao."""
    if device.type != "cuda":
        raise UserError("--fp8 needs an NVIDIA GPU with fp8 tensor cores (H100, H200, B200, L40S, RTX 4090...); "
                        "this run is on the CPU: drop --fp8")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise UserError(f"--fp8 needs compute capability 8.9 or newer; {torch.cuda.get_device_name(device)} is "
                        f"{cap[0]}.{cap[1]}: drop --fp8")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UserError("--fp8 needs torchao: `pip install torchao` (or drop --fp8)") from None

    def wanted(module, name):
        # fp8 matmuls need both dimensions divisible by 16; tiny gates gain nothing
        return (isinstance(module, nn.Linear) and name.startswith("blocks.") and "ve_gate" not in name
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    convert_to_float8_training(model, module_filter_fn=wanted)
    return model


def flash_attention_3(device):
    """FlashAttention-3 as an attention(q, k, v, window) function on (B, T, H, D) tensors, or None when it
    cannot run here (it needs a Hopper GPU and the flash_attn_interface package from flash-attention's
    hopper/ build). It handles sliding windows natively, where SDPA needs a dense mask."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return None
    try:
        import flash_attn_interface
    except ImportError:
        return None

    def attention(q, k, v, window):
        in_dtype = v.dtype
        dtype = in_dtype if in_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        # window w: attend to the w most recent positions, the query's own included
        out = flash_attn_interface.flash_attn_func(q, k, v, causal=True,
                                                   window_size=(-1, -1) if window is None else (window - 1, 0))
        out = out[0] if isinstance(out, tuple) else out  # some versions also return the log-sum-exp
        return out.to(in_dtype)  # fp32 in, fp32 out: a forward outside autocast (fp32 checks) must not break

    return attention


def flex_window_attention(device, seq_len, windows):
    """An attention(q, k, v, window) function: FlexAttention with a causal sliding-window block mask for the
    windowed layers, so blocks outside the window are skipped rather than computed and masked, and the model's
    own SDPA path for full layers (its flash kernel on GPUs). The block masks are built here, once per window,
    outside any compiled graph. On a GPU flex_attention is compiled (eager, it is a slow reference
    implementation); on a CPU it runs forward only (no CPU backward in torch 2.13)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from picochat import model as model_module
    sdpa = model_module.sdpa_attention
    masks = {}
    for w in {w for w in windows if w is not None and w < seq_len}:
        def sliding(b, h, q_idx, kv_idx, w=w):  # the query and the w - 1 positions before it
            return (kv_idx <= q_idx) & (q_idx - kv_idx < w)
        masks[w] = create_block_mask(sliding, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)
    flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention

    def attention(q, k, v, window):
        if window not in masks or q.shape[1] != seq_len:  # full layers; masks exist for the training length only
            return sdpa(q, k, v, window)
        dtype = model_module.GPT.compute_dtype(q.device)  # flex is not an autocast op: cast as SDPA would be
        q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
        y = flex(q, k, v, block_mask=masks[window], enable_gqa=q.shape[1] != k.shape[1])
        return y.transpose(1, 2)

    return attention


def use_fast_attention(device, flex=False, seq_len=0, windows=()):
    """Route the model's training attention to FlashAttention-3 where it can run, else (flex) to
    FlexAttention for the sliding-window layers; returns what is used. It swaps picochat.model.attention (the
    hook that model.py calls for attention without a KV cache); elsewhere PyTorch's SDPA picks its flash kernel
    for full causal layers by itself, and sliding windows get a dense mask (dense_window_warning)."""
    from picochat import model as model_module
    fa3 = None if os.environ.get("PICOCHAT_NO_FA3") else flash_attention_3(device)
    if fa3 is None:
        if flex and any(w is not None and w < seq_len for w in windows):
            model_module.attention = flex_window_attention(device, seq_len, windows)
            return "flex-attention (sliding windows) + sdpa"
        return "sdpa"
    if not hasattr(model_module, "attention"):
        return "sdpa (FlashAttention-3 is installed but model.py has no attention() hook)"
    model_module.attention = fa3
    return "flash-attention-3"


def dense_window_warning(model, device, attention):
    """A loud warning, or None: on a GPU without FlashAttention-3, sliding-window layers run SDPA with a dense
    (T, T) mask, which computes the full causal attention and masks it afterwards (bench/roofline.py prices
    picochat.s d20 step at ~1.4x its FlashAttention-3 time in that case)."""
    windowed = sum(1 for w in model.windows if w is not None and w < model.config.sequence_len)
    if device.type != "cuda" or not windowed or attention != "sdpa":
        return None
    return (f"WARNING: {windowed} of {len(model.windows)} layers use sliding windows (--window-pattern "
            f"{model.config.window_pattern}), and without FlashAttention-3 they run PyTorch SDPA with a dense "
            f"(T, T) mask: full attention work, no speed-up from the window. Install flash_attn_interface "
            f"(FlashAttention-3, Hopper GPUs), try --flex-attention, or train with --window-pattern L")


def estimate_bytes_per_row(config, seq_len):
    """Rough training memory per row of seq_len tokens in fp32 (activations kept for the backward pass:
    about 20 C-wide tensors per layer, plus the loss chunks). Used where no probe is possible."""
    return 4 * seq_len * config.n_embd * (20 * config.n_layer + 8)


def find_device_batch_size(model, optimizer, seq_len, rows_per_rank, device, autocast, prefer=None,
                           headroom=0.9):
    """(rows per micro-batch, how it was chosen): the largest divisor of rows_per_rank (so gradient
    accumulation makes up the rest exactly) whose forward + backward fits in `headroom` of the GPU's
    memory, found by binary search with real steps at this sequence length, optimizer state allocated.
    `prefer` (the batch of a checkpoint being resumed) is tried first, so a resumed run keeps its data
    order. On CPUs and MPS there is nothing to probe: the largest divisor up to 32 that a memory estimate
    allows. All ranks take the smallest answer among them."""
    divisors = [b for b in range(1, rows_per_rank + 1) if rows_per_rank % b == 0]
    if device.type != "cuda":
        try:
            budget = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
        except (ValueError, OSError, AttributeError):
            budget = 4 << 30
        per_row = estimate_bytes_per_row(model.config, seq_len)
        fitting = [b for b in divisors if b <= 32 and b * per_row <= budget] or [1]
        B = prefer if prefer in divisors and prefer * per_row <= budget else fitting[-1]
        return _agree(B, device), f"auto: {device.type}, no probe, memory estimate {B * per_row / 2 ** 30:.1f} GB"

    optimizer.init_state()
    limit = headroom * torch.cuda.get_device_properties(device).total_memory
    vocab = model.config.vocab_size

    def fits(B):
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        ok = True
        try:
            x = torch.randint(0, vocab, (B, seq_len), device=device)
            with autocast():
                loss = model(x, x)
            loss.backward()
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            ok = False
        loss = x = None  # drop the graph before measuring and freeing
        model.zero_grad(set_to_none=True)
        ok = ok and torch.cuda.max_memory_allocated(device) <= limit
        gc.collect()
        torch.cuda.empty_cache()
        return ok

    if prefer in divisors and fits(prefer):
        B, how = prefer, "auto: the checkpoint's, fits"
    else:
        lo, hi = -1, len(divisors)  # divisors[lo] fits, divisors[hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(divisors[mid]):
                lo = mid
            else:
                hi = mid
        if lo < 0:
            raise UserError(f"one row of {seq_len} tokens does not fit in the memory of "
                            f"{torch.cuda.get_device_name(device)}: add --activation-checkpointing, or lower "
                            f"--seq-len or --depth")
        B, how = divisors[lo], "auto: largest that fits"
    torch.cuda.reset_peak_memory_stats(device)
    return _agree(B, device), how


def _agree(B, device):
    if torch.distributed.is_initialized():
        t = torch.tensor([B], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        B = int(t.item())
    return B
