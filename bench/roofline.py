"""Roofline prediction of one training step on an H100, without a GPU: where the time goes, for picochat's
model and optimizer (and, with --reference, for karpathy/nanochat's at the same config).

    python bench/roofline.py --preset d12
    python bench/roofline.py --preset d20 --reference /tmp/nanochat     # also the reference, side by side
    python bench/roofline.py --depth 8 --seq-len 1024 --device-batch-size 16 --world-size 1,2 --fused
    python bench/roofline.py --preset d20 --world-size 8 --attention fa3 --loss-chunk 8192 --top 15
    python bench/roofline.py --preset d20 --measured gpu_check.jsonl   # priced with a GPU's measured figures

Prints one JSON line per traced (model, world size) on stdout and a side-by-side table on stderr.
No real compute: a run takes seconds (everything is a fake tensor) and one CPU core.

How it works
  1. The model is built on the meta device and turned into FakeTensors that claim to live on the CPU
     (meta-backed, no memory). Plain meta tensors will not do: torch.autocast ignores the meta device
     (`torch.autocast("meta")` is refused and CPU autocast leaves meta ops in fp32), and picochat's
     GPT.compute_dtype asks torch.is_autocast_enabled(device.type), which fails for "meta".
  2. One micro-batch forward + backward (twice: the first one of a step, whose gradients are fresh, and an
     accumulating one, whose gradients are added), then one optimizer step (the second of two, so its state
     exists), are run under a TorchDispatchMode that records every aten op: FLOPs from
     torch.utils.flop_counter's registry, bytes = bytes read + bytes written (a strided view counts the
     memory it spans; gathers such as embedding count only the rows read; out= and copy_/fill_ targets are
     written, not read); views, detach and allocations count 0 bytes and 0 kernels.
  3. Precision. picochat trains under torch.autocast("cuda", bfloat16) with fp32 weights. The trace runs
     under CPU autocast, whose lower-precision list (mm, addmm, bmm, linear, matmul, SDPA...) matches
     CUDA's; CUDA's fp32 list differs from the CPU's, so the CUDA policy is installed on the AutocastCPU key
     for the ops that CUDA runs in fp32 (pow/square, exp, log, rsqrt, softmax, sum, norms...). So every
     tensor has the dtype it would have on the GPU: e.g. relu(x).square() is fp32 under CUDA autocast, and
     picochat's lm_head gradient matmuls (mm out= and addmm_, which autocast does not touch) are fp32.
     Matmuls are priced at the bf16 tensor-core peak when their operands are bf16, at the TF32 peak when
     fp32 (both projects set TF32 for fp32 matmuls). The reference needs no autocast: it casts explicitly
     (its NANOCHAT_DTYPE is set to bfloat16, what it picks on an H100).
  4. Cost of an op = max(FLOPs / (peak x efficiency), bytes / (HBM bandwidth x efficiency)) + launch cost.
  5. Groups: block GEMMs, lm_head + loss, attention, elementwise/norms, embeddings, optimizer, collectives.
     Forward ops are labelled by module hooks (blocks, embeddings, lm_head) and by wrappers around
     picochat's fused_loss / loss kernel / attention hook and the optimizers' update functions. Backward
     ops are labelled by the autograd node that runs them: at each labelled boundary, the new autograd nodes
     behind the boundary's tensors get the label and a node pre-hook that sets it when the node runs.
     Matmuls outside lm_head count as block GEMMs (this includes the reference's tiny smear gate);
     gradient accumulation into .grad counts as elementwise.
  6. Step = first micro-step + (grad_accum - 1) x accumulating micro-step + optimizer (slowest rank) +
     collectives. MFU = the project's own model FLOPs per token (picochat: GPT.flops_per_token(); reference:
     GPT.estimate_flops(); both 6 x matmul params + 12 x heads x head_dim x window per layer) x tokens per
     step / (step time x world size x 989.4e12). Tokens/s are per GPU.

Where the trace cannot follow the GPU, the bench substitutes (bench only; no project file changes):
  - Attention: picochat.model.attention (and the reference's flash_attn.flash_attn_func) are replaced by a
    modelled kernel: on an H100, SDPA runs its flash (FlashAttention-2) backend for full causal layers and,
    for sliding-window layers that pass a dense boolean mask, the memory-efficient backend over the full
    T x T scores plus the mask (built as picochat builds it, then turned into an additive bf16 bias by SDPA).
    --attention fa3 models FlashAttention-3 for all layers (what picochat's fastpath swaps in when
    flash_attn_interface is installed), --attention flex FlexAttention for the windowed layers; both count
    only the unmasked (causal, windowed) score pairs. Forward = 4 x B x H x D x pairs FLOPs, backward 2.5x
    that (the FlashAttention convention: 5 matmuls against 2). The reference is modelled with FA3 (what its
    flash_attention.py loads on Hopper), or --reference-attention sdpa.
  - RMSNorm: on the CPU F.rms_norm decomposes into ~6 kernels; CUDA runs one fused kernel
    (aten._fused_rms_norm), so F.rms_norm is replaced by a modelled one-kernel op (fp32 under autocast,
    CUDA's policy for rms_norm).
  - Muon's Newton-Schulz dtype is set to bf16 (picochat picks it by device type: bf16 on CUDA).
  - torch.distributed is faked for world sizes > 1: each collective is recorded with its size and priced
    with a ring formula (reduce-scatter / all-gather / all-to-all: (W-1)/W x S, all-reduce: 2(W-1)/W x S,
    reduce / broadcast: S, pipelined chain) over NVLink, plus a per-collective latency.
  - The reference: its torch.compile'd optimizer functions are called uncompiled; its 0-d CPU
    hyperparameter tensors are host-side, so ops that touch only them are not GPU kernels; its modules need
    nothing beyond torch (filelock comes with torch), so nothing is stubbed.

Constants (H100 SXM5, 80 GB)
  989.4e12 FLOP/s dense bf16 tensor core: NVIDIA H100 datasheet (1,979 TFLOPS is quoted with 2:4 sparsity).
  494.7e12 FLOP/s dense TF32 tensor core: NVIDIA H100 datasheet (989 TFLOPS with sparsity, halved).
  66.9e12 FLOP/s FP32 non-tensor: NVIDIA H100 datasheet (67 TFLOPS); elementwise FLOPs are ignored, all
    non-matmul ops are priced by their bytes.
  3.35e12 B/s HBM3: NVIDIA H100 datasheet.
  450e9 B/s NVLink per direction per GPU: NVIDIA H100 datasheet (900 GB/s total NVLink bandwidth).
  Efficiencies (flags; not fitted to any measured MFU):
    --mm-eff 0.8: large bf16 GEMMs reach ~790 of 989 TFLOP/s on H100 SXM (Stas Bekman, "Machine Learning
      Engineering", Maximum Achievable Matmul FLOPS table); applied to TF32 too.
    --bw-eff 0.9: device copies typically reach ~3.0 of 3.35 TB/s (commonly reported stream/copy
      benchmarks; approximate).
    --fa2-eff 0.35: "FlashAttention-2 achieves only 35% utilization on H100" (Shah et al., FlashAttention-3,
      2024, abstract). SDPA's flash backend is FlashAttention-2.
    --fa3-eff 0.55: FlashAttention-3 reaches 75% of peak forward at long sequences; ~0.6 forward and
      ~0.5 backward at 2K causal, head dim 128 (read off the FA3 paper's figures; approximate).
    --flex-eff 0.3: FlexAttention reaches ~90% of FlashAttention-2 forward and ~85% backward (PyTorch blog,
      "FlexAttention", 2024): 0.85-0.9 x 0.35.
    --mem-eff-attn-eff 0.25: SDPA's memory-efficient (cutlass, sm80-design) kernel with a bias: a guess
      below FlashAttention-2; no published H100 figure found.
    --comm-eff 0.8: achievable NCCL bus bandwidth over NVLink as a fraction of 450 GB/s: a guess.
  --launch-us 4: fixed cost per kernel (launch + tail); a guess, typical of eager PyTorch on a fast host.
  --coll-latency-us 10: fixed cost per collective; a guess for NCCL on one NVLink node.
  --measured gpu_check.jsonl: what bench/gpu_check.py's micro section measured on a GPU replaces the efficiencies
    above: each bf16 matmul at a measured (M, N, K) (the d20 step's block linears, forward and both gradients,
    and both projects' lm_head products) is priced at its own TFLOP/s, the bandwidth at a device copy's, the
    per-kernel cost at that of a tiny kernel in a long queue, the attention kernels at their d20 micro-benchmark.
    Measured on the hardware, not fitted to any step time; the peaks stay the datasheet's. Other shapes (Muon,
    other depths) keep --mm-eff; the JSON says what share of the matmul FLOPs had a measured shape.

Blind spots
  - No kernel fusion by torch.compile unless --fused (default off; both projects compile in their presets).
    --fused: inside compiled regions (picochat: the model's forward and backward, the loss kernel, the
    Muon update; the reference: the model, its AdamW and Muon functions), an elementwise/reduction op's
    input costs bytes only when it was made by a non-fusible op (matmul, attention, embedding) or outside
    the region, and its output only when a non-fusible or uncompiled op reads it, nothing reads it, or it
    updates a tensor in place; one kernel per op whose output is materialized. Inductor's real choices
    (recomputation, what is saved for backward, kernel splits) are not modelled.
  - No overlap of compute with communication (both projects overlap their reduce-scatters/all-gathers
    with their updates): collectives are added in full.
  - No cache effects (K/V re-reads in attention, the broadcast mask bias, small tensors that stay in L2),
    no dependence of GEMM efficiency on shape (the Muon, ve_gate and smear GEMMs are small) or wave quantization
    except through --measured, no CPU-side overhead (Python, the optimizer's per-parameter loop) beyond the
    launch cost.
  - Launch cost is a guess; CUDA graphs are not modelled.
  - Activation memory = bytes of the unique tensors that eager autograd saves for backward (parameters
    excluded) in one micro-step; torch.compile's partitioner saves fewer (it recomputes pointwise ops),
    and the allocator's fragmentation and transient buffers (e.g. the reference's full logits while they
    are live) are not counted.
  - --fused does no common-subexpression elimination (picochat's autocast casts the same normalized
    input once per q/k/v projection; a compiled graph would cast it once).
  - Loop-level extras are left out: the loss .item() sync, picochat's per-step loss all-reduce.
  - The CUDA autocast fp32 list was taken from PyTorch's autocast_mode.h (AT_FORALL_FP32 and
    AT_FORALL_FP32_SET_OPT_DTYPE); a different torch version on the GPU may differ.
"""
import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import time
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten

PEAK_BF16 = 989.4e12  # NVIDIA H100 SXM datasheet, dense
PEAK_TF32 = 494.7e12  # NVIDIA H100 SXM datasheet, dense
PEAK_FP32 = 66.9e12   # NVIDIA H100 SXM datasheet, non-tensor
HBM_BW = 3.35e12      # NVIDIA H100 SXM datasheet, HBM3
NVLINK_BW = 450e9     # NVIDIA H100 SXM datasheet: 900 GB/s NVLink total = 450 GB/s each way

GROUPS = ["block GEMMs", "lm_head + loss", "attention", "elementwise/norms", "embeddings", "optimizer",
          "collectives"]
LOW = (torch.bfloat16, torch.float16)
MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addmm_, aten.baddbmm_}
FLOP_ALIAS = {aten.addmm_: aten.addmm, aten.baddbmm_: aten.baddbmm}
GATHERS = {aten.embedding, aten.index_select, aten.gather, aten.take_along_dim}
ALLOCS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
          aten.empty_permuted}
WRITE_ONLY = {aten.copy_, aten.fill_, aten.zero_, aten.uniform_, aten.normal_, aten._foreach_copy_,
              aten._foreach_zero_, aten.random_}
METADATA = {aten._unsafe_view, aten.lift_fresh, aten._reshape_alias}
NOT_FUSIBLE = {"mm", "attn", "embed", "coll"}

# ---------------------------------------------------------------------------------------------------------
# recording


class Ctx:
    """What the running code belongs to: (label, compiled), a stack, read by the recorder. compiled marks
    code that torch.compile would fuse (used by --fused only)."""
    stack = [("loop", False)]
    backward = False      # set by the first autograd node that runs: forward->backward is a graph boundary
    host_scalars = False  # reference optimizer: real (non-fake) tensors are its 0-d CPU hyperparameters

    @classmethod
    def state(cls):
        return cls.stack[-1]


ACTIVE = None  # the Recorder of the trace in progress


def touched_bytes(t):
    if t.numel() == 0:
        return 0
    # a strided view touches the memory it spans, an expanded one only its base
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 1)
    return min(t.numel(), span) * t.element_size()


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []
        self._ids = WeakTensorKeyDictionary()
        self._next = 0
        self.producer = {}  # tensor id -> index of the op that last wrote it
        self.saved = {}     # id of a base tensor saved for backward -> (tensor, bytes): activation estimate

    def tid(self, t):
        i = self._ids.get(t)
        if i is None:
            i = self._ids[t] = self._next
            self._next += 1
        return i

    def __enter__(self):
        global ACTIVE
        ACTIVE = self
        return super().__enter__()

    def __exit__(self, *exc):
        global ACTIVE
        ACTIVE = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if Ctx.host_scalars:
            ts = tensors_of(args, kwargs)
            if ts and not any(isinstance(t, FakeTensor) for t in ts):
                # host-side math on the reference's 0-d CPU tensors: run it for real (its results feed
                # Python numbers, e.g. alpha=), outside the fake mode, and price nothing
                with _disable_current_modes():
                    return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if func.namespace == "aten":
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out):
        packet = func._overloadpacket
        schema = func._schema
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if packet in ALLOCS:
            return
        if packet is aten.copy_ and args[0] is args[1]:
            return  # copy_ onto itself returns at once (the reference's p.copy_(p.float()) on fp32 p)
        is_view = packet in METADATA or (
            schema.returns and all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
            and not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments))
        if is_view:
            base = next((a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)), None)
            p = self.producer.get(self.tid(base)) if base is not None else None
            for t in outs:
                if p is not None:
                    self.producer[self.tid(t)] = p
            return
        reads, writes, mutated = [], [], []
        for i, a in enumerate(schema.arguments):
            val = kwargs.get(a.name) if (a.kwarg_only or i >= len(args)) else args[i]
            ts = [t for t in tree_flatten(val)[0] if isinstance(t, torch.Tensor)]
            if not ts:
                continue
            is_write = a.alias_info is not None and a.alias_info.is_write
            if is_write:
                writes += ts
                mutated += ts
            if not is_write or not (a.kwarg_only or packet in WRITE_ONLY):  # out= and copy_ targets: written only
                reads += ts
        writes += [t for t in outs if not any(t is w for w in writes)]
        if not writes:
            return  # sizes, .item() and the like: nothing written on the device
        rbytes = [touched_bytes(t) for t in reads]
        if packet in GATHERS and reads and outs:
            rbytes[0] = outs[0].numel() * reads[0].element_size()  # only the rows gathered are read
        flops, kind, mm_dtype, mnk = 0, "ew", None, None
        if packet in MATMULS:
            kind = "mm"
            fl = flop_registry[FLOP_ALIAS.get(packet, packet)]
            flops = int(fl(*args, **kwargs, out_val=out))
            mats = [t for t in reads if t.dim() >= 2]
            mm_dtype = mats[-1].dtype if mats else reads[0].dtype
            if len(mats) >= 2:  # out (M x N) = A (M x K) @ B (K x N), per matrix of a batch
                mnk = (mats[-2].shape[-2], mats[-1].shape[-1], mats[-2].shape[-1])
        elif packet in (aten.embedding, aten.embedding_dense_backward):
            kind = "embed"
        self.add(func.__name__, reads, writes, flops=flops, kind=kind, mm_dtype=mm_dtype, rbytes=rbytes,
                 mutated=mutated)
        self.ops[-1]["mnk"] = mnk

    def add(self, name, reads, writes, flops=0, kind="ew", mm_dtype=None, rbytes=None, nbytes=None,
            kernels=1, eff=None, coll=None, mutated=()):
        label, compiled = Ctx.state()
        rbytes = rbytes if rbytes is not None else [touched_bytes(t) for t in reads]
        wbytes = [touched_bytes(t) for t in writes]
        dtype_bytes = defaultdict(int)
        for t, b in list(zip(reads, rbytes)) + list(zip(writes, wbytes)):
            dtype_bytes[str(t.dtype).replace("torch.", "")] += b
        total = nbytes if nbytes is not None else sum(rbytes) + sum(wbytes)
        if nbytes is not None and dtype_bytes:  # modelled bytes: keep the dtype shares of the tensors
            s = sum(dtype_bytes.values()) or 1
            dtype_bytes = {k: v * nbytes / s for k, v in dtype_bytes.items()}
        idx = len(self.ops)
        self.ops.append(dict(
            name=name, label=label, compiled=compiled, bwd=Ctx.backward, kind=kind, flops=flops,
            mm_dtype=mm_dtype, eff=eff, bytes=total, kernels=kernels, coll=coll, dtype_bytes=dict(dtype_bytes),
            reads=[(self.producer.get(self.tid(t)), b) for t, b in zip(reads, rbytes)],
            # (bytes, whether it updates an existing tensor in place: such a write always reaches memory)
            writes=[(b, any(t is m for m in mutated)) for t, b in zip(writes, wbytes)]))
        for t in writes:
            self.producer[self.tid(t)] = idx

    def add_collective(self, kind, nbytes):
        self.add(kind, [], [], kind="coll", nbytes=nbytes, coll=kind)

    def pack_saved(self, t):
        if not isinstance(t, nn.Parameter):
            base = t._base if t._base is not None else t
            if not isinstance(base, nn.Parameter):
                self.saved[id(base)] = (base, base.numel() * base.element_size())
        return t


# ---------------------------------------------------------------------------------------------------------
# labelling forward and backward ops


class Labeler:
    """Gives each autograd node the label of the code that created it, and a pre-hook that sets that label
    while the node runs in the backward pass."""

    def __init__(self):
        self.nodes = {}

    def claim(self, tensors, state):
        stack = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while stack:
            n = stack.pop()
            if n in self.nodes:
                continue
            s = ("accumulate", False) if type(n).__name__ == "AccumulateGrad" else state
            self.nodes[n] = s
            n.register_prehook(self._setter(s))
            stack += [m for m, _ in n.next_functions if m is not None and m not in self.nodes]

    @staticmethod
    def _setter(state):
        def hook(grad_outputs):
            Ctx.stack[-1] = state
            Ctx.backward = True
        return hook


LABELER = Labeler()


def tensors_of(*objs):
    return [t for t in tree_flatten(objs)[0] if isinstance(t, torch.Tensor)]


def labelled(fn, label, compiled):
    """fn, run with its ops (and the autograd nodes it creates) under (label, compiled)."""
    def wrapper(*args, **kwargs):
        LABELER.claim(tensors_of(args, kwargs), Ctx.state())
        Ctx.stack.append((label, compiled))
        try:
            out = fn(*args, **kwargs)
            LABELER.claim(tensors_of(out), Ctx.state())
        finally:
            Ctx.stack.pop()
        return out
    return wrapper


def module_label(name, module):
    if name == "":
        return "root"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if name == "lm_head":
        return "lm_head"
    if re.fullmatch(r"(blocks|transformer\.h)\.\d+", name):
        return "block"
    return None


def add_label_hooks(model, compiled):
    for name, module in model.named_modules():
        label = module_label(name, module)
        if label is None:
            continue

        def pre(mod, args, kwargs, _label=label):
            LABELER.claim(tensors_of(args, kwargs), Ctx.state())
            Ctx.stack.append((_label, compiled))

        def post(mod, args, kwargs, out, _label=label):
            LABELER.claim(tensors_of(out), Ctx.state())
            Ctx.stack.pop()
            # the reference computes its softcap and cross-entropy after lm_head, in GPT.forward itself
            if _label == "lm_head" and Ctx.stack[-1][0] == "root":
                Ctx.stack[-1] = ("lm_head", compiled)

        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True)


# ---------------------------------------------------------------------------------------------------------
# modelled kernels: attention and RMSNorm as an H100 runs them


def causal_pairs(T, keys):
    """(query, key) pairs a causal kernel computes when each query sees at most `keys` keys."""
    w = min(keys, T)
    return w * (w + 1) // 2 + (T - w) * w


def attention_flops(B, H, D, pairs):
    """(forward, backward) FLOPs of one attention kernel: 2 matmuls forward, 5 backward (FlashAttention's count)."""
    return 4 * B * H * D * pairs, 10 * B * H * D * pairs


class ModelledAttention(torch.autograd.Function):
    """One attention kernel forward, one backward; costs from the shapes and the kernel assumption."""

    @staticmethod
    def forward(ctx, q, k, v, spec):
        B, T, H, D = q.shape
        o = torch.empty_like(q)
        lse = q.new_empty((B, H, T), dtype=torch.float32)
        pairs = T * T if spec["kind"] == "mem_efficient" else causal_pairs(T, spec["keys"])
        esz = q.element_size()
        io = (q.numel() + k.numel() + v.numel() + o.numel()) * esz + lse.numel() * 4
        ACTIVE.add(f"attention[{spec['kind']}].fwd", [q, k, v], [o, lse], flops=attention_flops(B, H, D, pairs)[0],
                   kind="attn", nbytes=io + spec.get("bias_bytes", 0), eff=spec["eff"])
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.spec, ctx.pairs = spec, pairs
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, T, H, D = q.shape
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        esz = q.element_size()
        # reads q k v o dO lse, writes dq dk dv, plus the fp32 dq accumulator and softmax row sums
        io = (4 * q.numel() + 2 * k.numel() + 2 * v.numel() + do.numel()) * esz + 3 * lse.numel() * 4
        io += 2 * q.numel() * 4
        ACTIVE.add(f"attention[{ctx.spec['kind']}].bwd", [q, k, v, o, do, lse], [dq, dk, dv],
                   flops=attention_flops(B, H, D, ctx.pairs)[1], kind="attn", nbytes=io + ctx.spec.get("bias_bytes", 0),
                   eff=ctx.spec["eff"])
        return dq, dk, dv, None


def run_attention(q, k, v, keys, kind, hw):
    """q, k, v: (B, T, H, D). keys: how many keys a query sees (T = full causal)."""
    T = q.shape[1]
    if kind != "fa3" and torch.is_autocast_enabled("cpu"):
        q, k, v = (t.to(torch.get_autocast_dtype("cpu")) for t in (q, k, v))  # autocast's cast for SDPA
    elif kind == "fa3":
        dtype = v.dtype if v.dtype in LOW else torch.bfloat16  # picochat's fastpath casts to bf16
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    spec = dict(kind=kind, keys=keys, eff=hw[kind])
    if kind == "mem_efficient":
        # the dense mask as picochat builds it, then SDPA turns it into an additive bias
        # (logical_not + where, bf16) that its memory-efficient kernel reads in forward and backward
        i = torch.arange(T, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < keys)
        bias = torch.empty((T, T), dtype=q.dtype, device=q.device)
        ACTIVE.add("sdpa mask -> bias", [mask], [bias], nbytes=T * T * (1 + 1 + 1 + q.element_size()), kernels=2)
        spec["bias_bytes"] = T * T * q.element_size()
    return ModelledAttention.apply(q, k, v, spec)


class ModelledRMSNorm(torch.autograd.Function):
    """CUDA's fused RMSNorm: one kernel forward (x -> y, rstd), one backward."""

    @staticmethod
    def forward(ctx, x):
        y = torch.empty_like(x)
        rstd = x.new_empty(x.shape[:-1] + (1,), dtype=torch.float32)
        ACTIVE.add("rms_norm(fused).fwd", [x], [y, rstd])
        ctx.save_for_backward(x, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, rstd = ctx.saved_tensors
        gx = torch.empty_like(x)
        ACTIVE.add("rms_norm(fused).bwd", [gy, x, rstd], [gx])
        return gx


def modelled_rms_norm(x, normalized_shape, weight=None, eps=None):
    assert weight is None, "only weightless RMSNorm is modelled"
    if torch.is_autocast_enabled("cpu") and x.dtype in LOW:
        x = x.float()  # CUDA autocast runs rms_norm in fp32 (AT_FORALL_FP32)
    return ModelledRMSNorm.apply(x)


# CUDA autocast's fp32 policies, for ops the CPU policy leaves in bf16 (from PyTorch's autocast_mode.h)
CUDA_FP32 = ["acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
             "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus",
             "layer_norm", "native_layer_norm", "group_norm", "logsumexp", "nll_loss", "mse_loss",
             "binary_cross_entropy_with_logits", "renorm", "dist"]
CUDA_FP32_SET_OPT_DTYPE = ["prod", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
                           "sum", "sum.dim_IntList"]
_AUTOCAST_LIB = None


def install_cuda_autocast_policy():
    global _AUTOCAST_LIB
    if _AUTOCAST_LIB is not None:
        return
    import warnings
    lib = torch.library.Library("aten", "IMPL")
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def low(a):
        return isinstance(a, torch.Tensor) and a.dtype in LOW

    def fp32(op):
        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(keys):
                args = [a.float() if low(a) else a for a in args]
                return op(*args, **kwargs)
        return kernel

    def set_opt_dtype(op):
        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(keys):
                if any(low(a) for a in args) and kwargs.get("dtype") is None:
                    kwargs["dtype"] = torch.float32
                return op(*args, **kwargs)
        return kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": that is the point
        for names, wrap in ((CUDA_FP32, fp32), (CUDA_FP32_SET_OPT_DTYPE, set_opt_dtype)):
            for name in names:
                base, _, overload = name.partition(".")
                op = getattr(getattr(aten, base), overload or "default")
                lib.impl(name, wrap(op), "AutocastCPU")
    _AUTOCAST_LIB = lib


# ---------------------------------------------------------------------------------------------------------
# fake torch.distributed


class _Done:
    def wait(self):
        return True

    def get_future(self):
        return self


@contextlib.contextmanager
def fake_dist(rank, world):
    """torch.distributed as seen by rank `rank` of `world`: collectives are recorded, not run."""
    d = torch.distributed

    def coll(kind, arg):
        def f(*args, **kwargs):
            t = args[arg] if len(args) > arg else kwargs.get(("output", "tensor")[arg == 0])
            if ACTIVE is not None:
                ACTIVE.add_collective(kind, t.numel() * t.element_size())
            return _Done() if kwargs.get("async_op") else None
        return f

    # the *_single names are torch 2.13's for reduce_scatter_tensor / all_gather_into_tensor
    patches = dict(is_available=lambda: True, is_initialized=lambda: world > 1,
                   get_rank=lambda group=None: rank, get_world_size=lambda group=None: world,
                   all_reduce=coll("all_reduce", 0), reduce=coll("reduce", 0), broadcast=coll("broadcast", 0),
                   reduce_scatter_tensor=coll("reduce_scatter", 1), all_gather_into_tensor=coll("all_gather", 0),
                   reduce_scatter_single=coll("reduce_scatter", 1), all_gather_single=coll("all_gather", 0),
                   all_to_all_single=coll("all_to_all", 1))
    missing = object()
    old = {k: getattr(d, k, missing) for k in patches}
    try:
        for k, v in patches.items():
            setattr(d, k, v)
        yield
    finally:
        for k, v in old.items():
            if v is missing:
                delattr(d, k)
            else:
                setattr(d, k, v)


@contextlib.contextmanager
def patched(*triples):
    old = [(obj, name, getattr(obj, name)) for obj, name, _ in triples]
    try:
        for obj, name, value in triples:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)


# ---------------------------------------------------------------------------------------------------------
# the two projects


def attention_kind(windowed, choice):
    if choice == "fa3":
        return "fa3"
    if not windowed:
        return "flash2"  # SDPA's flash backend for full causal attention
    return {"sdpa": "mem_efficient", "flex": "flex"}[choice]


def picochat_setup(cfg, fake):
    from picochat import model as pm
    from picochat.optim import build_optimizer, wire_dtype_for
    config = pm.GPTConfig.from_depth(cfg["depth"], vocab_size=cfg["vocab_size"], sequence_len=cfg["seq_len"],
                                     aspect_ratio=cfg["aspect_ratio"], head_dim=cfg["head_dim"],
                                     window_pattern=cfg["window_pattern"], value_embeds=cfg["value_embeds"],
                                     smear=cfg["smear"], backout=cfg["backout"], qk_scale=cfg["qk_scale"])
    with torch.device("meta"):
        model = pm.GPT(config)
    with fake:
        model.to_empty(device="cpu")
    hw = cfg["hw"]
    compiled = cfg["compile"]

    def attention(q, k, v, window):
        T = q.shape[1]
        windowed = window is not None and window < T
        return run_attention(q, k, v, window if windowed else T, attention_kind(windowed, cfg["attention"]), hw)

    patches = [(pm, "attention", labelled(attention, "attention", compiled)),
               (pm, "fused_loss", labelled(pm.fused_loss, "lm_head", False)),
               (F, "rms_norm", modelled_rms_norm)]
    model.ce_kernel = labelled(pm.softcap_ce_chunk, "lm_head", compiled)  # compile_loss() compiles it
    # the trace's tensors claim to be on the CPU: set the chunk picochat picks on a GPU
    model.loss_chunk = cfg["loss_chunk"] or pm.loss_chunk_rows(torch.device("cuda"), config.vocab_size)
    add_label_hooks(model, compiled)

    def micro_step(x, y, grad_accum, loss_sum):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # stands for autocast("cuda", bf16), see above
            loss = model(x, y)
        loss_sum += loss.detach()
        scaled = loss / grad_accum
        LABELER.claim([scaled], Ctx.state())
        scaled.backward()

    def make_optimizer(rank, world):
        with fake_dist(rank, world):
            # the wire pretrain's --grad-wire auto picks on GPUs
            opt = build_optimizer(model, wire_dtype=wire_dtype_for("auto", torch.device("cuda"), world))
        opt.ns_dtype = torch.bfloat16  # what MuonAdamW._ns_dtype picks on CUDA
        opt._muon_update = labelled(opt._muon_update, "optimizer", compiled)  # MuonAdamW.compile()
        return opt

    # opt_ambient False: with world > 1 MuonAdamW.step reads back (.tolist()) a flag tensor it makes itself,
    # so tensors made from nothing in the step must be real; those from parameters (its buckets) stay fake
    return dict(name="picochat", model=model, patches=patches, micro_step=micro_step, autocast=True, compiled=compiled,
                make_optimizer=make_optimizer, opt_ambient=False, host_scalars=False,
                flops_per_token=model.flops_per_token(),
                matrix_params=model.num_scaling_params(),
                attn_formula=sum(12 * config.n_head * config.head_dim * (w or config.sequence_len)
                                 for w in model.windows),
                config=dict(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head,
                            head_dim=config.head_dim, vocab_size=config.vocab_size, seq_len=config.sequence_len,
                            window_pattern=config.window_pattern, value_embeds=config.value_embeds,
                            windows=[w or config.sequence_len for w in model.windows], params=model.num_params(),
                            loss_chunk=model.loss_chunk))


def picochat_total_batch(cfg):
    from picochat.model import derive_hparams
    return derive_hparams(cfg["depth"], cfg["vocab_size"], aspect_ratio=cfg["aspect_ratio"],
                          head_dim=cfg["head_dim"])["total_batch_size"]


def reference_modules(path):
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "nanochat", "gpt.py")):
        raise SystemExit(f"--reference {path}: no nanochat/gpt.py there (expected a karpathy/nanochat checkout)")
    os.environ["NANOCHAT_DTYPE"] = "bfloat16"  # what its common.py auto-detects on an H100 (SM 90)
    if path not in sys.path:
        sys.path.insert(0, path)
    with contextlib.redirect_stdout(sys.stderr):
        import nanochat.gpt as ngpt
        import nanochat.optim as nopt
    return ngpt, nopt


def reference_build(ngpt, cfg, depth):
    # as its scripts/base_train.py build_model_meta: width = depth x aspect ratio, rounded up to the head dim
    dim = ((depth * cfg["aspect_ratio"] + cfg["head_dim"] - 1) // cfg["head_dim"]) * cfg["head_dim"]
    heads = dim // cfg["head_dim"]
    config = ngpt.GPTConfig(sequence_len=cfg["seq_len"], vocab_size=cfg["vocab_size"], n_layer=depth,
                            n_head=heads, n_kv_head=heads, n_embd=dim, window_pattern=cfg["window_pattern"])
    with torch.device("meta"), contextlib.redirect_stdout(sys.stderr):
        return ngpt.GPT(config)


def reference_total_batch(ngpt, cfg, model, ratio=12):
    """The reference's own batch rule (scripts/base_train.py; --target-param-data-ratio defaults to 12)."""
    def scaling(m):
        c = m.num_scaling_params()
        return c["transformer_matrices"] + c["lm_head"]
    d_ref = ratio * scaling(reference_build(ngpt, cfg, 12))
    target = int(ratio * scaling(model))
    return 2 ** round(math.log2(2 ** 19 * (target / d_ref) ** 0.383))


def reference_setup(path, cfg, fake):
    ngpt, nopt = reference_modules(path)
    model = reference_build(ngpt, cfg, cfg["depth"])
    # on meta (Module.to cannot swap fake parameters): casts the embeddings to bf16, builds the rotary tables
    model.init_weights()
    with fake:
        model.to_empty(device="cpu")
    hw = cfg["hw"]

    def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
        T = q.shape[1]
        left = window_size[0]
        windowed = 0 <= left < T - 1
        kind = "fa3" if cfg["reference_attention"] == "fa3" else attention_kind(windowed, "sdpa")
        return run_attention(q, k, v, left + 1 if windowed else T, kind, hw)

    flash = type(ngpt.flash_attn)(flash_attn_func=labelled(flash_attn_func, "attention", True),
                                  flash_attn_with_kvcache=None)
    patches = [(ngpt, "flash_attn", flash), (F, "rms_norm", modelled_rms_norm)]
    add_label_hooks(model, True)  # its base_train.py always compiles the model

    def micro_step(x, y, grad_accum, loss_sum):
        loss = model(x, y)
        loss = loss / grad_accum
        LABELER.claim([loss], Ctx.state())
        loss.backward()

    def unwrap(f):
        return getattr(f, "_torchdynamo_orig_callable", f)

    def make_optimizer(rank, world):
        # built outside the fake mode: its 0-d hyperparameter tensors are real CPU tensors, as on the GPU
        with contextlib.redirect_stdout(io.StringIO()):  # its LR-scaling notice, once per rank
            opt = model.setup_optimizer()
        return opt

    opt_patches = [(nopt, "adamw_step_fused", labelled(unwrap(nopt.adamw_step_fused), "optimizer", True)),
                   (nopt, "muon_step_fused", labelled(unwrap(nopt.muon_step_fused), "optimizer", True))]
    c = model.config
    attn = sum(12 * c.n_head * (c.n_embd // c.n_head) * (w if w > 0 else c.sequence_len)
               for w, _ in model.window_sizes)
    counts = model.num_scaling_params()
    return dict(name="nanochat", model=model, patches=patches + opt_patches, micro_step=micro_step,
                autocast=False, compiled=True, make_optimizer=make_optimizer, opt_ambient=True, host_scalars=True,
                flops_per_token=model.estimate_flops(), matrix_params=model.num_matmul_params(),
                attn_formula=attn, total_batch=reference_total_batch(ngpt, cfg, model),
                config=dict(n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, head_dim=c.n_embd // c.n_head,
                            vocab_size=c.vocab_size, seq_len=c.sequence_len, window_pattern=c.window_pattern,
                            value_embeds=True, windows=[min(w + 1, c.sequence_len) if w > 0 else c.sequence_len
                                                        for w, _ in model.window_sizes],
                            params=counts["total"]))


# ---------------------------------------------------------------------------------------------------------
# tracing


def trace_project(proj, cfg, fake, world_sizes):
    model = proj["model"]
    B, T = cfg["device_batch_size"], cfg["seq_len"]
    if proj["autocast"]:
        install_cuda_autocast_policy()
    with fake:
        x = torch.empty((B, T), dtype=torch.long)
        y = torch.empty((B, T), dtype=torch.long)
        loss_sum = torch.zeros(())
    micro = []
    with patched(*proj["patches"]):
        for _ in range(2):  # the first micro-step of a step (fresh .grad), then an accumulating one
            rec = Recorder()
            with fake, rec, torch.autograd.graph.saved_tensors_hooks(rec.pack_saved, lambda t: t):
                Ctx.stack, Ctx.backward = [("loop", False)], False
                proj["micro_step"](x, y, 2, loss_sum)  # the divisor only scales the loss: any value will do
            LABELER.nodes.clear()
            micro.append(rec)
        params = list(model.parameters())
        grads = [p.grad for p in params]
        opts = {}
        for world in world_sizes:
            per_rank = []
            for rank in range(world):
                with fake_dist(rank, world):
                    opt = proj["make_optimizer"](rank, world)
                    Ctx.host_scalars = proj["host_scalars"]
                    amb = fake if proj["opt_ambient"] else contextlib.nullcontext()
                    try:
                        for step in range(2):  # the second step is the steady state: optimizer state exists
                            for p, g in zip(params, grads):
                                p.grad = g
                            Ctx.stack, Ctx.backward = [("optimizer", False)], False
                            rec = Recorder()
                            with amb, rec:
                                opt.step()
                    finally:
                        Ctx.host_scalars = False
                state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values()
                                  for t in s.values() if isinstance(t, torch.Tensor))
                per_rank.append((rec, state_bytes))
            opts[world] = per_rank
    return micro, opts


# ---------------------------------------------------------------------------------------------------------
# pricing


def group_of(op):
    label, kind = op["label"], op["kind"]
    if label == "optimizer" and kind != "coll":
        return "optimizer"
    if kind == "coll":
        return "collectives"
    if kind == "attn" or label == "attention":
        return "attention"
    if label == "embedding":
        return "embeddings"
    if label == "lm_head":
        return "lm_head + loss"
    if kind == "mm":
        return "block GEMMs"
    return "elementwise/norms"


def fused_view(ops):
    """(bytes, kernels) per op when compiled regions fuse their elementwise ops (see --fused)."""
    fusible = [op["compiled"] and op["kind"] not in NOT_FUSIBLE for op in ops]
    consumers = defaultdict(list)
    for j, op in enumerate(ops):
        for p, _ in op["reads"]:
            if p is not None:
                consumers[p].append(j)

    def same_graph(i, j):  # the forward and the backward are separate compiled graphs
        return fusible[i] and fusible[j] and ops[i]["bwd"] == ops[j]["bwd"]

    out = []
    for i, op in enumerate(ops):
        if not fusible[i]:
            out.append((op["bytes"], op["kernels"]))
            continue
        cons = consumers.get(i, [])
        materialize = not cons or any(not same_graph(i, j) for j in cons)
        rb = sum(b for p, b in op["reads"] if p is None or not same_graph(p, i))
        wb = sum(b for b, inplace in op["writes"] if materialize or inplace)
        kernels = 1 if (materialize or any(inplace for _, inplace in op["writes"])) else 0
        out.append((rb + wb, kernels))
    return out


def measured_eff(op, hw):
    """The fraction of peak gpu_check measured for this bf16 matmul's shape (--measured), or None."""
    table = hw.get("mm_table") or {}
    if op["mm_dtype"] not in LOW or op["mnk"] is None:
        return None
    M, N, K = op["mnk"]
    return table.get((M, N, K)) or table.get((N, M, K))  # out^T = B^T A^T: the same GEMM to cuBLAS


def mm_eff(op, hw):
    """The fraction of peak a matmul reaches: measured at its shape, else --mm-eff."""
    return measured_eff(op, hw) or hw["mm_eff"]


def op_seconds(op, nbytes, kernels, hw):
    """Roofline time of one recorded op (collectives excepted): the slower of compute and memory, plus launches."""
    if op["kind"] == "mm":
        compute = op["flops"] / ((PEAK_BF16 if op["mm_dtype"] in LOW else PEAK_TF32) * mm_eff(op, hw))
    elif op["kind"] == "attn":
        compute = op["flops"] / (PEAK_BF16 * op["eff"])
    else:
        compute = op["flops"] / PEAK_FP32
    return max(compute, nbytes / (HBM_BW * hw["bw_eff"])) + kernels * hw["launch"]


def measured_share(rec, hw):
    """The share of the trace's bf16 matmul FLOPs priced at a measured shape (None without --measured)."""
    if not hw.get("mm_table"):
        return None
    mms = [op for op in rec.ops if op["kind"] == "mm" and op["mm_dtype"] in LOW]
    total = sum(op["flops"] for op in mms) or 1
    return sum(op["flops"] for op in mms if measured_eff(op, hw)) / total


def price(rec, hw, world, fused):
    """{group: {ms, flops, bytes, kernels, dtype bytes, matmul flops by dtype}} for one trace."""
    groups = {g: dict(ms=0.0, flops=0, bytes=0, kernels=0, dtype_bytes=defaultdict(float),
                      mm_flops=defaultdict(int)) for g in GROUPS}
    views = fused_view(rec.ops) if fused else [(op["bytes"], op["kernels"]) for op in rec.ops]
    for op, (nbytes, kernels) in zip(rec.ops, views):
        g = groups[group_of(op)]
        if op["kind"] == "coll":
            if world > 1:
                S = op["bytes"]
                ring = (world - 1) / world * S
                vol = {"reduce_scatter": ring, "all_gather": ring, "all_to_all": ring,
                       "all_reduce": 2 * ring}.get(op["coll"], S)
                g["ms"] += 1e3 * (vol / (hw["nvlink_bw"] * hw["comm_eff"]) + hw["coll_latency"])
                g["bytes"] += vol
                g["kernels"] += 1
            continue
        if kernels == 0:
            continue
        if op["kind"] == "mm":
            g["mm_flops"][str(op["mm_dtype"]).replace("torch.", "").replace("float32", "tf32")] += op["flops"]
        g["ms"] += 1e3 * op_seconds(op, nbytes, kernels, hw)
        g["flops"] += op["flops"]
        g["bytes"] += nbytes
        g["kernels"] += kernels
        scale = nbytes / op["bytes"] if op["bytes"] else 0
        for k, v in op["dtype_bytes"].items():
            g["dtype_bytes"][k] += v * scale
    return groups


def combine(parts):
    """Sum [(multiplier, groups)]."""
    total = {g: dict(ms=0.0, flops=0, bytes=0, kernels=0, dtype_bytes=defaultdict(float),
                     mm_flops=defaultdict(int)) for g in GROUPS}
    for mult, groups in parts:
        for g, v in groups.items():
            t = total[g]
            for k in ("ms", "flops", "bytes", "kernels"):
                t[k] += mult * v[k]
            for k, x in v["dtype_bytes"].items():
                t["dtype_bytes"][k] += mult * x
            for k, x in v["mm_flops"].items():
                t["mm_flops"][k] += mult * x
    return total


def step_result(proj, cfg, micro, per_rank, world, total_batch, fused):
    hw = cfg["hw"]
    B, T = cfg["device_batch_size"], cfg["seq_len"]
    tokens_micro = B * T * world
    if total_batch % tokens_micro:
        raise SystemExit(f"{proj['name']}: total batch {total_batch} is not a multiple of device batch x seq len x "
                         f"world = {tokens_micro}")
    accum = total_batch // tokens_micro
    m1, m2 = price(micro[0], hw, world, fused), price(micro[1], hw, world, fused)
    # every rank takes part in every collective; the optimizer step ends with the slowest rank
    ranks = [price(rec, hw, world, fused) for rec, _ in per_rank]
    slowest = max(range(world), key=lambda r: ranks[r]["optimizer"]["ms"])
    opt = dict(ranks[slowest])
    opt["collectives"] = ranks[0]["collectives"]
    groups = combine([(1, m1), (accum - 1, m2), (1, opt)])
    step_ms = sum(v["ms"] for v in groups.values())
    micro_ms = [sum(v["ms"] for v in m.values()) for m in (m1, m2)]
    mfu = proj["flops_per_token"] * total_batch / (step_ms / 1e3 * world * PEAK_BF16)
    return dict(step_ms=step_ms, groups=groups, accum=accum, micro_ms=micro_ms, mfu=mfu,
                tokens_per_sec=total_batch / world / (step_ms / 1e3))


def flops_check(proj, cfg, micro):
    """Traced forward + backward FLOPs of one micro-batch against 6 x matrix params x tokens + attention."""
    tokens = cfg["device_batch_size"] * cfg["seq_len"]
    mm = sum(op["flops"] for op in micro[0].ops if op["kind"] == "mm")
    attn = sum(op["flops"] for op in micro[0].ops if op["kind"] == "attn")
    six_n = 6 * proj["matrix_params"] * tokens
    attn_formula = proj["attn_formula"] * tokens
    return dict(traced_matmul=mm, six_n_tokens=six_n, matmul_ratio=mm / six_n, traced_attention=attn,
                attention_formula=attn_formula, attention_ratio=attn / attn_formula if attn_formula else None,
                traced_total_ratio=(mm + attn) / (six_n + attn_formula))


def memory(proj, micro, per_rank):
    params = list(proj["model"].parameters())
    p = sum(t.numel() * t.element_size() for t in params)
    g = sum(t.grad.numel() * t.grad.element_size() for t in params if t.grad is not None)
    state = max(s for _, s in per_rank)
    act = sum(b for _, b in micro[0].saved.values())
    gb = 1 / 2 ** 30
    return dict(params_gib=p * gb, grads_gib=g * gb, optimizer_state_gib=state * gb,
                activations_saved_gib=act * gb, total_gib=(p + g + state + act) * gb)


def to_json(proj, cfg, res, alt, check, mem, world, total_batch, fused):
    hw = cfg["hw"]
    groups = {}
    for g, v in res["groups"].items():
        tb = sum(v["dtype_bytes"].values()) or 1
        entry = dict(ms=round(v["ms"], 3), flops=v["flops"], bytes=int(v["bytes"]), kernels=int(v["kernels"]),
                     dtype_mix={k: round(x / tb, 3) for k, x in sorted(v["dtype_bytes"].items()) if x / tb >= 5e-4})
        if v["mm_flops"]:
            tf = sum(v["mm_flops"].values()) or 1
            entry["matmul_flops_by_dtype"] = {k: round(x / tf, 3) for k, x in v["mm_flops"].items()}
        groups[g] = entry
    choice = cfg["reference_attention"] if proj["name"] == "nanochat" else cfg["attention"]
    attn = ("FlashAttention-3 for all layers (unmasked pairs only)" if choice == "fa3" else
            "SDPA flash backend (FlashAttention-2) for full causal layers; windowed layers: " +
            ("dense-mask memory-efficient SDPA (T^2 work + mask bias)" if choice == "sdpa" else
             "FlexAttention (unmasked pairs only)"))
    return dict(
        name=proj["name"], world_size=world,
        config=dict(proj["config"], device_batch_size=cfg["device_batch_size"], total_batch_size=total_batch,
                    grad_accum=res["accum"], compiled=proj["compiled"]),
        groups=groups, step_ms=round(res["step_ms"], 3),
        micro_step_ms=dict(first=round(res["micro_ms"][0], 3), accumulating=round(res["micro_ms"][1], 3)),
        mfu=round(res["mfu"], 4), tokens_per_sec=round(res["tokens_per_sec"]),
        model_flops_per_token=proj["flops_per_token"],
        alternative=dict(fused=not fused, step_ms=round(alt["step_ms"], 3), mfu=round(alt["mfu"], 4)),
        flops_check={k: (round(v, 4) if isinstance(v, float) else v) for k, v in check.items()},
        memory_per_gpu=({k: round(v, 3) for k, v in mem.items()}),
        assumptions=dict(
            device="H100 SXM", peak_bf16=PEAK_BF16, peak_tf32=PEAK_TF32, hbm_bw=HBM_BW, nvlink_bw=hw["nvlink_bw"],
            mm_eff=hw["mm_eff"], bw_eff=hw["bw_eff"], launch_us=hw["launch"] * 1e6,
            attention_eff=dict(flash2=hw["flash2"], fa3=hw["fa3"], flex=hw["flex"], mem_efficient=hw["mem_efficient"]),
            comm_eff=hw["comm_eff"], coll_latency_us=hw["coll_latency"] * 1e6, attention=attn,
            precision=("torch.autocast bf16 as on CUDA (CPU autocast + CUDA fp32 policy), fp32 master weights; "
                       "bf16 matmuls at the bf16 peak, fp32 matmuls at the TF32 peak" if proj["autocast"] else
                       "explicit bf16 compute dtype (NANOCHAT_DTYPE=bfloat16), fp32 master weights for the blocks; "
                       "bf16 matmuls at the bf16 peak, fp32 at TF32"),
            fused=fused, overlap="none (compute, collectives and launches add up)",
            mfu_flops=("picochat GPT.flops_per_token()" if proj["name"] == "picochat" else
                       "nanochat GPT.estimate_flops()") + " x tokens / (step x world x 989.4e12)"))


# ---------------------------------------------------------------------------------------------------------
# output


def fmt_ms(x):
    return f"{x:9.2f}"


def table(results, file=sys.stderr):
    names = [f"{r['name']} x{r['world_size']}" for r in results]
    w = max(14, *(len(n) + 2 for n in names))
    print("", file=file)
    print(f"{'predicted H100 step':<20}" + "".join(f"{n:>{w}}" for n in names), file=file)
    print(f"{'group: ms (share)':<20}" + "".join(f"{'':>{w}}" for n in names), file=file)
    for g in GROUPS:
        cells = []
        for r in results:
            v = r["groups"][g]
            cells.append(f"{v['ms']:.1f} ({100 * v['ms'] / r['step_ms']:.0f}%)" if v["ms"] else "0")
        print(f"{g:<20}" + "".join(f"{c:>{w}}" for c in cells), file=file)
    rows = [
        ("kernels/step", lambda r: f"{sum(v['kernels'] for v in r['groups'].values()):,}"),
        ("step ms", lambda r: f"{r['step_ms']:.1f}"),
        ("micro ms 1st/acc", lambda r: f"{r['micro_step_ms']['first']:.1f}/{r['micro_step_ms']['accumulating']:.1f}"),
        ("grad accum", lambda r: str(r["config"]["grad_accum"])),
        ("tokens/step", lambda r: f"{r['config']['total_batch_size']:,}"),
        ("MFU", lambda r: f"{100 * r['mfu']:.1f}%"),
        ("tok/s per GPU", lambda r: f"{r['tokens_per_sec']:,}"),
        ("alt step ms", lambda r: f"{r['alternative']['step_ms']:.1f}" + (" f" if r["alternative"]["fused"] else " e")),
        ("alt MFU", lambda r: f"{100 * r['alternative']['mfu']:.1f}%"),
        ("matmul/6N", lambda r: f"{r['flops_check']['matmul_ratio']:.3f}"),
        ("attn/formula", lambda r: f"{r['flops_check']['attention_ratio']:.3f}"),
        ("mem GiB p+g+opt", lambda r: "{:.1f}".format(sum(r["memory_per_gpu"][k] for k in
                                                           ("params_gib", "grads_gib", "optimizer_state_gib")))),
        ("mem GiB saved act", lambda r: f"{r['memory_per_gpu']['activations_saved_gib']:.1f}"),
    ]
    print("-" * (20 + w * len(results)), file=file)
    for label, f in rows:
        print(f"{label:<20}" + "".join(f"{f(r):>{w}}" for r in results), file=file)
    print("(alt: the other --fused mode, f = fused, e = eager; matmul/6N and attn/formula: traced FLOPs of one "
          "micro-batch over the formulas)", file=file)


def top_ops(rec_by_name, hw, n, fused, file=sys.stderr):
    for name, rec in rec_by_name:
        agg = defaultdict(lambda: [0.0, 0, 0])
        views = fused_view(rec.ops) if fused else [(op["bytes"], op["kernels"]) for op in rec.ops]
        for op, (nbytes, kernels) in zip(rec.ops, views):
            if kernels == 0 or op["kind"] == "coll":
                continue
            t = op_seconds(op, nbytes, kernels, hw)
            a = agg[(group_of(op), op["name"])]
            a[0] += t * 1e3
            a[1] += kernels
            a[2] += nbytes
        print(f"\ntop ops, {name} ({'fused' if fused else 'eager'}, one accumulating micro-step): ms, kernels, GB",
              file=file)
        for (g, op), (ms, cnt, b) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:n]:
            print(f"  {ms:8.2f} {cnt:6d} {b / 1e9:8.2f}  {g:<18} {op}", file=file)


# ---------------------------------------------------------------------------------------------------------
# command line


def apply_measured(hw, path):
    """Replace hw's published constants with what bench/gpu_check.py measured (its "micro" line's "roofline"):
    matmul efficiency per (M, N, K), bandwidth efficiency from a device copy, the per-kernel cost, and the attention
    kernels' efficiencies, each as a fraction of the H100 peaks above. Returns what was taken, for the JSON."""
    try:
        lines = [json.loads(x) for x in open(path) if x.strip()]
    except (OSError, ValueError) as e:
        sys.exit(f"--measured {path}: cannot read it as gpu_check.jsonl ({e})")
    micro = next((x for x in lines if x.get("section") == "micro" and x.get("roofline")), None)
    if not micro:
        sys.exit(f"--measured {path}: no micro section with roofline figures (run bench/gpu_check.py, section micro)")
    m = micro["roofline"]
    hw["mm_table"] = {tuple(g["mnk"]): g["tflops"] * 1e12 / PEAK_BF16 for g in m["gemm"]}
    hw["bw_eff"] = m["copy_gbps"] * 1e9 / HBM_BW
    hw["launch"] = m["kernel_us"] * 1e-6
    B, T, H, D, window = micro["attn_shape"]
    for kind, name, keys in (("flash2", "sdpa_full", T), ("flex", "flex_window", window),
                             ("fa3", "fa3_window", window)):
        if isinstance(micro.get(name), dict):  # timed forward + backward
            flops = sum(attention_flops(B, H, D, causal_pairs(T, keys)))
            hw[kind] = flops / (micro[name]["ms"] / 1e3) / PEAK_BF16
    return dict(path=str(path), device=m.get("device"), gemm_shapes=len(hw["mm_table"]), bw_eff=round(hw["bw_eff"], 4),
                launch_us=round(hw["launch"] * 1e6, 3),
                attention_eff={k: round(hw[k], 4) for k in ("flash2", "flex", "fa3")})


def preset_config(name):
    """The preset's pretraining shape, or pretrain's defaults at d12 on one GPU without one; parsed with
    pretrain's own shape flags, so the defaults (value embeddings, smear, backout, qk scale) are the stage's."""
    from picochat.speedrun import PRESETS, pretrain_flags
    argv = PRESETS[name]["pretrain"] if name else ["--depth", "12"]
    a = pretrain_flags(argv)
    return dict(depth=a.depth, device_batch_size=a.device_batch_size if isinstance(a.device_batch_size, int) else 32,
                window_pattern=a.window_pattern, value_embeds=a.value_embeds, smear=a.smear, backout=a.backout,
                qk_scale=a.qk_scale, seq_len=a.seq_len, head_dim=a.head_dim,
                vocab_size=PRESETS[name]["vocab"] if name else 32768, gpus=max(1, PRESETS[name]["gpus"]) if name else 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["d12", "d20"], help="depth, batch, windows, value embeds and GPU count "
                                                              "from picochat's speedrun presets")
    p.add_argument("--depth", type=int, help="default 12 (or the preset's)")
    p.add_argument("--seq-len", type=int, help="default 2048 (or the preset's)")
    p.add_argument("--device-batch-size", type=int, help="default 32 (or the preset's)")
    p.add_argument("--vocab-size", type=int, help="default 32768 (or the preset's)")
    p.add_argument("--window-pattern", help="default L (or the preset's)")
    p.add_argument("--value-embeds", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--head-dim", type=int, default=None, help="default 128")
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--total-batch-size", type=int, default=-1,
                   help="tokens per step (-1: each project's own rule from the depth)")
    p.add_argument("--world-size", default="", help="comma-separated GPU counts (default: 1, plus the preset's)")
    p.add_argument("--attention", choices=["sdpa", "fa3", "flex"], default="sdpa",
                   help="picochat's attention kernels: sdpa (flash for full layers, dense-mask memory-efficient for "
                        "windowed ones), fa3 (FlashAttention-3 everywhere), flex (FlexAttention for windowed layers)")
    p.add_argument("--reference", default="", help="a karpathy/nanochat checkout: trace it too, at the same config")
    p.add_argument("--reference-attention", choices=["fa3", "sdpa"], default="fa3",
                   help="the reference's kernels: fa3 (what it loads on Hopper) or its SDPA fallback")
    p.add_argument("--fused", action="store_true", help="model torch.compile's fusion of elementwise ops")
    p.add_argument("--launch-us", type=float, default=4.0, help="fixed cost per kernel, microseconds")
    p.add_argument("--mm-eff", type=float, default=0.8, help="achievable fraction of the bf16/TF32 matmul peak")
    p.add_argument("--bw-eff", type=float, default=0.9, help="achievable fraction of HBM bandwidth")
    p.add_argument("--fa2-eff", type=float, default=0.35, help="SDPA flash (FlashAttention-2) fraction of bf16 peak")
    p.add_argument("--fa3-eff", type=float, default=0.55, help="FlashAttention-3 fraction of bf16 peak")
    p.add_argument("--flex-eff", type=float, default=0.30, help="FlexAttention fraction of bf16 peak")
    p.add_argument("--mem-eff-attn-eff", type=float, default=0.25,
                   help="SDPA memory-efficient kernel (with mask bias) fraction of bf16 peak")
    p.add_argument("--nvlink-gbps", type=float, default=NVLINK_BW / 1e9, help="NVLink GB/s per direction per GPU")
    p.add_argument("--comm-eff", type=float, default=0.8, help="achievable fraction of NVLink bandwidth")
    p.add_argument("--coll-latency-us", type=float, default=10.0, help="fixed cost per collective, microseconds")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="picochat's rows per loss chunk (GPT.loss_chunk; 0: what it picks on a GPU, 2^27 / vocab)")
    p.add_argument("--no-compile", action="store_true", help="label nothing as compiled (only matters with --fused)")
    p.add_argument("--top", type=int, default=0, help="also list the N most expensive ops per model (stderr)")
    p.add_argument("--measured", default="", help="a gpu_check.jsonl (bench/gpu_check.py on the GPU): price with its "
                                                  "measured matmul, copy, kernel and attention figures instead")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # nothing here computes; keep the machine free
    preset = preset_config(args.preset)
    cfg = dict(
        depth=args.depth or preset["depth"], seq_len=args.seq_len or preset["seq_len"] or 2048,
        device_batch_size=args.device_batch_size or preset["device_batch_size"] or 32,
        vocab_size=args.vocab_size or preset["vocab_size"],
        window_pattern=args.window_pattern or preset["window_pattern"] or "L",
        value_embeds=preset["value_embeds"] if args.value_embeds is None else args.value_embeds,
        smear=preset["smear"], backout=preset["backout"], qk_scale=preset["qk_scale"],
        head_dim=args.head_dim or preset["head_dim"] or 128, aspect_ratio=args.aspect_ratio,
        compile=not args.no_compile, attention=args.attention, loss_chunk=args.loss_chunk,
        reference_attention=args.reference_attention,
        hw=dict(launch=args.launch_us * 1e-6, mm_eff=args.mm_eff, bw_eff=args.bw_eff, flash2=args.fa2_eff,
                fa3=args.fa3_eff, flex=args.flex_eff, mem_efficient=args.mem_eff_attn_eff,
                nvlink_bw=args.nvlink_gbps * 1e9, comm_eff=args.comm_eff, coll_latency=args.coll_latency_us * 1e-6))
    worlds = sorted({int(w) for w in args.world_size.split(",") if w} or {1, preset["gpus"]})
    if args.measured:
        cfg["measured"] = apply_measured(cfg["hw"], args.measured)

    t0 = time.time()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    projects = [picochat_setup(cfg, fake)]
    projects[0]["total_batch"] = picochat_total_batch(cfg)
    if args.reference:
        projects.append(reference_setup(args.reference, cfg, fake))
    results, recs = [], []
    for proj in projects:
        total_batch = args.total_batch_size if args.total_batch_size > 0 else proj["total_batch"]
        micro, opts = trace_project(proj, cfg, fake, worlds)
        recs.append((proj["name"], micro[1]))
        check = flops_check(proj, cfg, micro)
        for world in worlds:
            res = step_result(proj, cfg, micro, opts[world], world, total_batch, args.fused)
            alt = step_result(proj, cfg, micro, opts[world], world, total_batch, not args.fused)
            out = to_json(proj, cfg, res, alt, check, memory(proj, micro, opts[world]), world, total_batch,
                          args.fused)
            if args.measured:
                out["assumptions"]["measured"] = dict(cfg["measured"], matmul_flops_at_measured_shapes=round(
                    measured_share(micro[1], cfg["hw"]), 4))
            print(json.dumps(out), flush=True)
            results.append(out)
    table(results)
    if args.top:
        top_ops(recs, cfg["hw"], args.top, args.fused)
    if args.measured:
        print(f"(priced with the figures measured in {args.measured}; matmuls at other shapes, and those in fp32, at "
              f"--mm-eff {args.mm_eff})", file=sys.stderr)
    print(f"(traced in {time.time() - t0:.1f} s; {'fused' if args.fused else 'eager'} pricing; "
          f"picochat attention: {args.attention}" + (f", reference attention: {args.reference_attention}"
                                                      if args.reference else "") + ")", file=sys.stderr)


if __name__ == "__main__":
    main()
