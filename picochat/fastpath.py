"""GPU fast paths and memory fitting, applied to a GPT from outside (model.py stays plain PyTorch):

  checkpoint_blocks(model)        activation checkpointing: each block is recomputed in the backward pass
  enable_fp8(model, device)       fp8 matmuls in the blocks (torchao Float8Linear), compute capability 8.9+
  bf16_linears(model)             a context where those layers run as plain Linears (validation, sampling)
  use_fast_attention(device)      FlashAttention-3 (sliding windows included) on Hopper when installed, else
                                  FlexAttention for the sliding windows when asked (flex=True)
  estimate_training_memory(...)   peak memory of a micro-batch by part (weights, optimizer, activations, loss)
  find_device_batch_size(...)     the largest micro-batch that fits, probed with a real forward + backward

The bf16 autocast path (fp32 master weights) lives in the stage commands, torch.compile of the model in
their --compile flag, and of the Muon update in MuonAdamW.compile().
"""
import argparse
import gc
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from picochat.common import UserError


def checkpoint_blocks(model):
    """Keep only each block's input in the forward pass and recompute the rest in the backward pass: the
    activation memory of a block drops to one (B, T, C) tensor, for about a third more compute. Inference
    (no grad) runs the blocks as they are. The weights and their names do not change."""
    for block in model.blocks:
        if getattr(block, "_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
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


@contextmanager
def bf16_linears(model):
    """Inside the block, the Linear layers that torchao swapped in for --fp8 (Float8Linear) run as the plain
    nn.Linear they were made from, on the same weight and bias objects (nothing is copied): evaluation and
    sampling get autocast's bf16 matmuls instead of fp8 with per-call scaling, which runs eager (slow: the
    model is compiled for training only) and would put fp8's rounding into the validation bpb. The layers are
    torchao's again on exit, an exception included. A model without them passes through unchanged."""
    swapped = [(m, type(m)) for m in model.modules() if isinstance(m, torch.nn.Linear)
               and type(m) is not torch.nn.Linear and type(m).__module__.startswith("torchao.")]
    for m, _ in swapped:
        m.__class__ = torch.nn.Linear
    try:
        yield model
    finally:
        for m, cls in swapped:
            m.__class__ = cls


def flash_attention_3(device):
    """FlashAttention-3 as an attention(q, k, v, window) function on (B, T, H, D) tensors, or None when it
    cannot run here. It needs a Hopper GPU and either the flash_attn_interface package (flash-attention's
    hopper/ build) or the `kernels` package with a network, which fetches a prebuilt FA3 from the Hugging Face
    hub (kernels-community/flash-attn3). It handles sliding windows natively, where SDPA needs a dense mask."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return None
    try:
        import flash_attn_interface
    except ImportError:
        try:
            from kernels import get_kernel
            flash_attn_interface = get_kernel("kernels-community/flash-attn3").flash_attn_interface
        except Exception:  # no `kernels`, no network, no build for this torch: SDPA or flex instead
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


def estimate_training_memory(config, batch, seq_len, *, dtype=torch.bfloat16, device_type="cuda", world=1,
                             checkpointing=False, training=True):
    """Peak memory in bytes of one micro-batch of `batch` rows x `seq_len` tokens on one rank, by part:
    params (fp32 masters), grads (fp32, all of them on every rank), optimizer (Muon momentum for the block
    matrices, AdamW's two moments for the rest; ZeRO-1 shards it, counted as 1/world each), weight_copies (the
    bf16 copies of the block weights that autocast keeps for the backward pass), activations (what the forward
    saves for the backward), transient (the largest short-lived allocation: the chunked loss with its fp32
    grad_W, or one block's backward) and total. dtype is the compute dtype (bf16 under autocast, else fp32);
    device_type sets the loss chunk (model.loss_chunk_rows) and how RMSNorm keeps its input (CUDA's fused
    kernel keeps it as it is; the CPU's composite keeps an fp32 copy). checkpointing: activation checkpointing
    (fastpath.checkpoint_blocks). training=False sizes an evaluation forward without grad instead.

    What holds: on CPUs, eager, the activations (with the weight copies and the loss's saved grad_W and
    grad_h) are within 2% of the bytes autograd saves, and the total is within 10% of the measured peak, at
    the sizes tests/test_fastpath.py measures (fp32 and bf16 autocast, checkpointed or not, grouped heads,
    windows, value embeddings, evaluation). Compiled, the loss chunk keeps less: an upper bound there. It
    counts tensors, not the CUDA context (~0.5 GB) or allocator fragmentation: leave headroom for those."""
    from picochat.model import GPT, loss_chunk_rows
    with torch.device("meta"):
        groups = GPT(config).param_groups()
    count = {k: sum(p.numel() for p in ps) for k, ps in groups.items()}
    n_params = sum(count.values())
    N, C, V, L = batch * seq_len, config.n_embd, config.vocab_size, config.n_layer
    H, Hkv, D = config.n_head, config.n_kv_head, config.head_dim
    Ckv = Hkv * D
    e = torch.finfo(dtype).bits // 8
    # the bytes a norm keeps of its input: the CPU's composite rms_norm upcasts bf16 input and keeps that copy
    kept = e if device_type == "cuda" else 4
    ve_layers = sum(config.has_value_embed(i) for i in range(L))
    windowed = sum(w is not None and w < seq_len for w in config.window_sizes())
    chunk = min(N, loss_chunk_rows(torch.device(device_type), V))
    parts = dict(params=4 * n_params)

    # per token and layer, what autograd keeps: the block's input before the residual mix (for the mix's
    # scalars); the inputs of the two norms and of the q/k norms (with their fp32 rstd); the normed input of
    # the q/k/v and fc projections; attention's q, k, v, output and fp32 logsumexp; the MLP hidden after relu
    # and after squaring (the rotary keeps only cos and sin: they need no gradient)
    layer = (e * C * config.resid_scalars + kept * (2 * C + C + Ckv) + 4 * (2 + H + Hkv) + 2 * e * C
             + e * (2 * C + 2 * Ckv) + 4 * H + 2 * e * 4 * C)
    # value-embedding layers: the embedding, the gate's input slice (copied) and its sigmoid, before and after x2
    ve = e * (Ckv + min(32, C) + 2 * Hkv)
    # the token ids, the embedding's norm input and the final norm's input (with rstd)
    trunk = 8 + 2 * (kept * C + 4)
    mask = windowed * seq_len * seq_len * e  # a dense (T, T) mask per windowed layer (SDPA without FA3)
    if not training:
        # no grad: only the ids, the residual stream and the first layer's output live throughout; autocast
        # still caches bf16 weight copies (the head's too); the peak is a block's MLP (the hidden twice, its
        # input and the residual sums) or a loss chunk's three fp32 copies of its logits
        block = N * e * (2 * 4 * C + 3 * C) + seq_len * seq_len * e * (windowed > 0)
        loss = N * e * C + chunk * V * 3 * 4
        parts.update(grads=0, optimizer=0, weight_copies=e * (count["matrix"] + count["lm_head"]) if e < 4 else 0,
                     activations=N * (8 + 2 * e * C), transient=max(block, loss))
        parts["total"] = sum(parts.values())
        return parts

    adam = n_params - count["matrix"]
    normuon = sum(max(p.shape) for p in groups["matrix"])  # a mean square per row or column (optim.second_moment_like)
    parts.update(grads=4 * n_params, optimizer=(4 * (count["matrix"] + normuon) + 8 * adam) // world,
                 weight_copies=e * count["matrix"] if e < 4 else 0)
    if checkpointing:  # a block keeps its input (and the residual mix its own), and is recomputed once in the backward
        kept_layers = N * L * e * C * (1 + config.resid_scalars) + N * ve_layers * e * Ckv
        recompute = N * (layer + ve * (ve_layers > 0)) + mask // max(1, windowed) + e * count["matrix"] // L * (e < 4)
    else:
        kept_layers = N * (L * layer + ve_layers * ve) + mask
        recompute = 0
    parts["activations"] = N * trunk + kept_layers + seq_len * D * e  # (cos and sin in the compute dtype)
    # the loss: grad_W (fp32, V x C) and grad_h are made in the forward, beside h and the bf16 copy of W; per
    # chunk, the logits and the previous chunk's gradient in the compute dtype, and five fp32 copies of the
    # logits at once (tanh, softcapped, gradient, t^2, 1 - t^2: the eager kernel's peak; compiled, it keeps
    # less); in the backward grad_W is scaled into a second fp32 (V x C) tensor
    loss_forward = (4 * V * C + N * e * C * 2 + (e * V * C if e < 4 else 0)
                    + chunk * V * ((1 + (N > chunk)) * e + 5 * 4))
    loss_backward = 2 * 4 * V * C + 2 * N * e * C
    # a block's backward, beside what it keeps: the MLP hidden's gradient twice over (and an fp32 C-wide one)
    block_backward = N * (2 * e * 4 * C + 4 * C * (e < 4))
    # checkpointed, the blocks keep no weight copies: those of the forward are gone by the backward
    gone = parts["weight_copies"] if checkpointing else 0
    parts["transient"] = max(loss_forward, loss_backward - gone, block_backward + recompute - gone)
    parts["total"] = sum(parts.values())
    return parts


def batch_size_arg(text):
    """The argparse type of every stage's --device-batch-size: a number of rows, or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of rows or 'auto', got {text!r}") from None


def find_device_batch_size(model, optimizer, seq_len, *, rows_per_rank, device, autocast, prefer=None,
                           headroom=0.9):
    """(rows per micro-batch, how it was chosen): the largest divisor of rows_per_rank (so gradient
    accumulation makes up the rest exactly) whose forward + backward fits in `headroom` of the GPU's
    memory, found by binary search with real steps at this sequence length, optimizer state allocated.
    optimizer=None sizes an evaluation instead: a forward without grad (per-token losses). `prefer` (the
    batch of a checkpoint being resumed) is tried first, so a resumed run keeps its data order. On CPUs and
    MPS there is nothing to probe: the largest divisor up to 32 whose estimate_training_memory fits in a
    quarter of the free memory. autocast: the stage's autocast context factory (None: fp32). All ranks take
    the smallest answer among them."""
    from picochat.model import GPT
    divisors = [b for b in range(1, rows_per_rank + 1) if rows_per_rank % b == 0]
    autocast = autocast or nullcontext
    if device.type != "cuda":
        try:
            budget = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
        except (ValueError, OSError, AttributeError):
            budget = 4 << 30
        with autocast():
            dtype = GPT.compute_dtype(device)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

        def need(B):
            return estimate_training_memory(model.config, B, seq_len, dtype=dtype, device_type=device.type, world=world,
                                            checkpointing=getattr(model.blocks[0], "_checkpointed", False),
                                            training=optimizer is not None)["total"]

        fitting = [b for b in divisors if b <= 32 and need(b) <= budget] or [1]
        B = prefer if prefer in divisors and need(prefer) <= budget else fitting[-1]
        return _agree(B, device), f"auto: {device.type}, no probe, memory estimate {need(B) / 2 ** 30:.1f} GB"

    if optimizer is not None:
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
            if optimizer is None:
                with torch.no_grad(), autocast():
                    loss = model(x, x, reduction="none")
            else:
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
