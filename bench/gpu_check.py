"""GPU check: one call on one GPU answers what only a GPU can, section by section, each printing one JSON line.

    python bench/gpu_check.py --out "$OUT" 2> "$OUT/gpu_check.stderr"   # on the GPU machine: ~6-8 min on an H100
    python bench/gpu_check.py --smoke                                    # anywhere (CPU): tiny shapes, < 1 min
    python bench/gpu_check.py --only d20_step,decode --budget-s 300      # some sections

Sections, in order (each a plain function returning a dict; its line carries "ok", its own wall seconds "s" and,
when it failed, "error"; a failure is caught and the next section runs):
 1 environment   GPU, torch, measured bf16 matmul TFLOP/s, FA3 / torchao / triton ("not installed" where absent)
 2 agreement     the same small model (same weights, same batch) on the CPU in fp32 against the device: fp32 with
                 TF32 off (loss and gradients, tight bars), bf16 autocast (looser bars), the compiled bf16 training
                 path (loss, gradients, and the loss after 3 steps of the compiled Muon/AdamW), and FlexAttention
                 against SDPA's dense mask for a windowed layer (outputs and q/k/v gradients; GPU only: torch has no
                 FlexAttention backward on CPUs)
 3 micro         the chunked loss at the old CPU chunk (2^22/V rows) and at model.loss_chunk_rows (the GPU size)
                 against a compiled full-logits cross-entropy; attention forward+backward at d20 shapes: SDPA full
                 causal, SDPA with the dense window mask, FlexAttention windows, FlashAttention-3 windows; and
                 "roofline": bf16 matmul TFLOP/s at the d20 step's GEMM shapes, copy GB/s, a tiny kernel's cost
                 (with the attention timings, what `bench/roofline.py --measured gpu_check.jsonl` prices with)
 4 d20_step      the speedrun preset d20 (flags read from picochat/speedrun.py PRESETS): micro-batch 32 or the
                 largest power of two that fits, compiled; compile seconds (the warm-up steps beyond their steady
                 time), forward+backward ms, optimizer ms, tokens/s, MFU against 989.4 TFLOP/s, peak memory
 5 decode        picochat.engine's InferenceModel (what Engine.generate runs) at d20 shape, random weights:
                 prefill, decode tokens/s at batch 1 and 16, eager and compiled (the one-token steps as CUDA
                 graphs), CUDA kernels per eager decode step (torch.profiler)
 6 validation    pretrain's validation (bits_per_byte on the eager model, reduction="none") at d20, B=8: its
                 time, and the dynamo frame count before and after (no compile may be triggered)
 7 d12_step      as 4 for the preset d12, if time remains
 8 sharded_opt   the sharded optimizer across 2+ GPUs against one process (skipped on one GPU)

Budget: --budget-s (default 480) counts from the start; a section whose estimate does not fit in what is left is
skipped with a line saying so. Lines also go to DIR/gpu_check.jsonl as they come, and DIR/gpu_check.md (a markdown
table of the sections) is rewritten after each one, so a run cut off still leaves both (DIR: --out, default $OUT).
Exit status 1 when a section failed or missed a bar (skipped sections do not count).
--smoke: CPU-sized shapes (depth 2, 64 tokens), torch.compile with the aot_eager backend (dynamo and AOTAutograd
traced, no inductor code generation: seconds instead of minutes on a CPU), and every section must be ok.
Only torch and picochat.{common, model, optim, fastpath, engine, evaluate} are imported (no tokenizer, no data
libraries): the GPU image has torch and nothing else the project lists. As the stage commands do, the CUDA allocator
gets expandable segments unless PYTORCH_ALLOC_CONF says otherwise; HF_HUB_OFFLINE=1 unless set (fastpath's FA3 may
try the hub through `kernels`; the GPU machine has no network). Errors' tracebacks go to stderr.
"""
import argparse
import ast
import gc
import json
import math
import os
import sys
import time
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path

T_START = time.perf_counter()
# as the stage commands run (picochat.common.init_runtime): the expandable-segments allocator, unless configured
if not any(os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")):
    os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"
# fastpath.flash_attention_3 may fetch FA3 from the Hugging Face hub (`kernels`): offline, fail fast, not hang
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from picochat import fastpath  # noqa: E402
from picochat import model as model_module  # noqa: E402
from picochat.common import autodetect_device, gpu_peak_flops, measure_matmul_flops  # noqa: E402
from picochat.model import GPT, GPTConfig  # noqa: E402
from picochat.optim import build_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_PEAK = 989.4e12  # dense bf16 FLOP/s of an H100 SXM: the MFU denominator on GPUs

# seconds per section: on an H100, and for --smoke on a 2-core CPU (d12's GPU figure is replaced by 0.7 x the d20
# section's measured time once that has run)
ESTIMATES = {"environment": (10, 2), "agreement": (90, 8), "micro": (75, 5), "d20_step": (180, 6),
             "decode": (90, 3), "validation": (20, 2), "d12_step": (120, 6), "sharded_opt": (40, 10)}
SECTIONS = list(ESTIMATES)

# agreement bars (relative differences; gradients: the largest over parameters of |g - g_ref| / |g_ref|)
BARS = {"fp32": {"loss_rel": 1e-5, "grad_rel": 1e-4},
        "bf16": {"loss_rel": 1e-2, "grad_rel": 5e-2},
        "compiled_bf16": {"loss_rel": 1e-2, "grad_rel": 5e-2},
        "after_3_steps": {"loss_rel": 2e-2},
        "flex": {"out_rel": 1e-2, "grad_rel": 2e-2}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (or --device), every section must pass")
    p.add_argument("--device", default="", help="default: cuda when there is one (cpu with --smoke)")
    p.add_argument("--budget-s", type=float, default=480, help="wall-clock budget from the start (seconds)")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for gpu_check.jsonl and gpu_check.md "
                                                                    "(default $OUT)")
    p.add_argument("--only", default="", help=f"comma list of sections to run (of {','.join(SECTIONS)})")
    p.add_argument("--skip", default="", help="comma list of sections to leave out")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps in the step sections (compile included)")
    p.add_argument("--steps", type=int, default=0, help="timed steps in the step sections (default 5; 2 with --smoke)")
    p.add_argument("--compile-backend", default="",
                   help="torch.compile backend (default inductor; aot_eager with --smoke)")
    p.add_argument("--decode-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the compiled decode (CUDA graphs for the one-token steps; ~1 min more; "
                        "default: on a GPU, not with --smoke)")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 5)
    args.device = args.device or ("cpu" if args.smoke else autodetect_device())
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    return args


class Ctx:
    """What the sections share: the arguments, the device, the compute dtype, the MFU peak."""

    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda and torch.cuda.is_bf16_supported() else torch.float32
        self.peak = H100_BF16_PEAK if self.cuda else None  # CPU: measured by environment()
        self.results = {}

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def peak_memory_gib(self):
        return torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.cuda else None

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)


def rnd(x, n=4):
    """Floats to n significant digits (compact lines), recursively."""
    if isinstance(x, float):
        return x if not math.isfinite(x) or x == 0 else float(f"{x:.{n}g}")
    if isinstance(x, dict):
        return {k: rnd(v, n) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rnd(v, n) for v in x]
    return x


def free():
    model_module.attention = model_module.sdpa_attention  # a section's fast-attention choice stays in it
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def installed(module):
    """The module's version, or "not installed"."""
    try:
        m = __import__(module)
        return str(getattr(m, "__version__", "installed"))
    except Exception:  # ImportError, or a broken build (a CUDA extension built for another torch)
        return "not installed"


def timed(ctx, fn, warmup=2, iters=5):
    """(ms per call over iters, seconds of the first call): fn is called warmup + iters times."""
    ctx.sync()
    t0 = time.perf_counter()
    fn()
    ctx.sync()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    ctx.sync()
    return (time.perf_counter() - t0) / iters * 1000, first


def rel(a, b):
    """|a - b| / |b| (norms), in fp32 on the CPU."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# ---- the speedrun presets, read without importing picochat.speedrun (it imports the tokenizer and data stack) ----
def preset_flags(name):
    """The preset's pretrain flags as a dict (depth, batch, windows, value embeds, compile, ...)."""
    argv, source = None, "picochat/speedrun.py"
    try:
        tree = ast.parse((ROOT / "picochat" / "speedrun.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PRESETS" for t in node.targets):
                for k, v in zip(node.value.keys, node.value.values):
                    if isinstance(k, ast.Constant) and k.value == name:
                        kw = {x.arg: x.value for x in v.keywords}
                        argv = ast.literal_eval(kw["pretrain"])
                        vocab = ast.literal_eval(kw.get("vocab", ast.Constant(32768)))
    except Exception:
        argv = None
    if argv is None:  # the presets as they were when this was written
        source = "built-in fallback"
        depth = {"d12": "12", "d20": "20"}[name]
        argv, vocab = ["--depth", depth, "--device-batch-size", "32", "--window-pattern", "SSSL", "--value-embeds",
                       "--compile"], 32768
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--device-batch-size", default="32")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--n-kv-head", type=int, default=0)
    p.add_argument("--window-pattern", default="L")
    for flag in ("value-embeds", "compile", "flex-attention", "fp8", "activation-checkpointing"):
        p.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=False)
    a, _ = p.parse_known_args(argv)
    flags = dict(vars(a), vocab=vocab, source=source)
    flags["device_batch_size"] = int(a.device_batch_size) if a.device_batch_size.isdigit() else 32
    return flags


def build_model(ctx, cfg, seed=0):
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=ctx.device)
    return model.init_weights(seed=seed)


# ---- 1. environment -----------------------------------------------------------------------------------------------
def environment(ctx):
    d = ctx.device
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(d),
           "compute_dtype": str(ctx.dtype).split(".")[-1], "compile_backend": ctx.args.compile_backend}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(d)
        env.update(gpu=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(d))),
                   memory_gib=round(props.total_memory / 2 ** 30, 1), sms=props.multi_processor_count,
                   gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
        env["table_peak_tflops"] = (gpu_peak_flops(props.name) or 0) / 1e12 or None
        env["matmul_bf16_tflops"] = measure_matmul_flops(d, torch.bfloat16, n=8192, seconds=1.0) / 1e12
    else:
        env["threads"] = torch.get_num_threads()
        ctx.peak = measure_matmul_flops(d, torch.float32, n=256 if ctx.smoke else 1024, seconds=0.3)
        env["matmul_fp32_tflops"] = ctx.peak / 1e12
    env["mfu_peak_tflops"] = ctx.peak / 1e12
    env["fa3"] = installed("flash_attn_interface")
    env["torchao"] = installed("torchao")
    env["triton"] = installed("triton")
    env["kernels"] = installed("kernels")
    env["alloc_conf"] = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    env["attention"] = fastpath.use_fast_attention(d)
    model_module.attention = model_module.sdpa_attention
    return env


# ---- 2. agreement with the CPU ------------------------------------------------------------------------------------
def agreement_model(ctx):
    T, V, depth, hd = (32, 256, 2, 32) if ctx.smoke else (256, 4096, 4, 64)
    cfg = GPTConfig.from_depth(depth, vocab_size=V, sequence_len=T, head_dim=hd, window_pattern="SL", value_embeds=True)
    ref = GPT(cfg).init_weights(seed=0)
    with torch.no_grad():  # zero-initialized projections would hide differences in attention and MLP
        gen = torch.Generator().manual_seed(1)
        for prm in ref.parameters():
            prm.add_(torch.randn(prm.shape, generator=gen) * 0.05)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (4, T), generator=gen)
    y = torch.randint(0, V, (4, T), generator=gen)
    return ref, x, y


def loss_and_grads(model, fwd, x, y, autocast):
    model.zero_grad(set_to_none=True)
    with autocast:
        loss = fwd(x, y)
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def compare(ref_loss, ref_grads, loss, grads):
    """loss_rel; grad_rel: |g - g_ref| / |g_ref| over all parameters as one vector (the bar); grad_rel_max and
    grad_worst: the largest per-parameter figure and its parameter (for information: a scalar parameter such as
    resid_lambdas sums a whole batch's products, so its bf16 rounding shows most)."""
    diff = math.sqrt(sum((grads[n] - ref_grads[n]).square().sum().item() for n in ref_grads))
    norm = math.sqrt(sum(g.square().sum().item() for g in ref_grads.values()))
    per = {n: rel(grads[n], ref_grads[n]) for n in ref_grads}
    worst = max(per, key=per.get)
    return {"loss_rel": abs(loss - ref_loss) / abs(ref_loss), "grad_rel": diff / max(norm, 1e-30),
            "grad_rel_max": per[worst], "grad_worst": worst}


def train_loss_after(model, fwd, x, y, autocast, compile_opt=False, steps=3):
    opt = build_optimizer(model)
    if compile_opt:
        opt.compile()
    for _ in range(steps):
        with autocast:
            loss = fwd(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    with torch.no_grad(), autocast:
        return model(x, y).item()  # the eager model: a compiled one would recompile for no_grad


def flex_agreement(ctx):
    """FlexAttention's block-sparse window against SDPA's dense mask at d20's attention shape, bf16."""
    if not ctx.cuda:
        return {"skipped": "GPU only: torch has no FlexAttention backward on CPUs"}
    B, T, H, D, window = 4, 2048, 10, 128, 512
    flex = fastpath.flex_window_attention(ctx.device, T, [window])
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    qkv = [torch.randn(B, T, H, D, device=ctx.device, dtype=torch.bfloat16, generator=gen).requires_grad_()
           for _ in range(3)]
    out = {}
    for name, fn in (("sdpa", model_module.sdpa_attention), ("flex", flex)):
        with ctx.autocast():
            yy = fn(*qkv, window)
        yy.float().square().sum().backward()
        out[name] = (yy.detach().float(), [t.grad.float() for t in qkv])
        for t in qkv:
            t.grad = None
    (ya, ga), (yb, gb) = out["sdpa"], out["flex"]
    return {"shape": [B, T, H, D], "window": window, "out_rel": rel(yb, ya),
            "grad_rel": max(rel(b, a) for a, b in zip(ga, gb))}


def agreement(ctx):
    import copy
    ref, x, y = agreement_model(ctx)
    ref_loss, ref_grads = loss_and_grads(ref, ref, x, y, nullcontext())
    with torch.no_grad():
        ref_logits = ref(x)
    xd, yd = x.to(ctx.device), y.to(ctx.device)
    out = {"model": f"d{ref.config.n_layer} w{ref.config.n_embd} V{ref.config.vocab_size} "
                    f"T{ref.config.sequence_len} SL ve"}

    # fp32 on the device, TF32 off
    model = copy.deepcopy(ref).to(ctx.device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        loss, grads = loss_and_grads(model, model, xd, yd, nullcontext())
        with torch.no_grad():
            logits = model(xd).float().cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    out["fp32"] = dict(compare(ref_loss, ref_grads, loss, grads), max_dlogit=(logits - ref_logits).abs().max().item(),
                       argmax=(logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item())

    # bf16 autocast (on a CPU too: CPU autocast runs bf16 matmuls, so --smoke exercises the same path)
    bf16 = torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    loss, grads = loss_and_grads(model, model, xd, yd, bf16)
    out["bf16"] = compare(ref_loss, ref_grads, loss, grads)

    # the compiled training path: compiled model + compiled loss kernel in bf16, then 3 compiled Muon/AdamW steps
    model = copy.deepcopy(ref).to(ctx.device)
    fwd = torch.compile(model, dynamic=False)
    model.compile_loss()
    t0 = time.perf_counter()
    loss, grads = loss_and_grads(model, fwd, xd, yd, bf16)
    out["compiled_bf16"] = dict(compare(ref_loss, ref_grads, loss, grads), compile_s=time.perf_counter() - t0)
    cpu_model = copy.deepcopy(ref)
    cpu_after = train_loss_after(cpu_model, cpu_model, x, y, nullcontext())
    dev_after = train_loss_after(model, fwd, xd, yd, bf16, compile_opt=True)
    out["after_3_steps"] = {"cpu_fp32": cpu_after, "device": dev_after,
                            "loss_rel": abs(dev_after - cpu_after) / abs(cpu_after)}
    del model, fwd
    free()
    out["flex"] = flex_agreement(ctx)

    failed = [f"{name}.{k}" for name, bars in BARS.items() for k, bar in bars.items()
              if k in out.get(name, {}) and not out[name][k] <= bar]
    out["bars"] = {name: bars for name, bars in BARS.items()}
    out["failed"] = failed
    out["ok"] = not failed
    return out


# ---- 3. micro-benchmarks: loss and attention ----------------------------------------------------------------------
def micro(ctx):
    out = micro_loss(ctx)
    free()
    out.update(micro_attention(ctx))
    free()
    out["roofline"] = micro_roofline(ctx)
    return out


def micro_loss(ctx):
    """The chunked loss (forward + backward: LinearSoftcapCrossEntropy makes the gradients in its forward) at the
    old chunk size and at the current one, against one compiled cross-entropy over the full (N, V) logits."""
    dev = ctx.device
    N, C, V = (256, 64, 512) if ctx.smoke else (8 * 2048, 1280, 32768)  # d20: width 1280, vocab 32768
    sc = 15.0
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(N, C, generator=gen)).to(dev).requires_grad_()
    W = (torch.randn(V, C, generator=gen) * 0.02).to(dev).requires_grad_()
    y = torch.randint(0, V, (N,), generator=gen).to(dev)
    weights = torch.full((N,), 1.0 / N, device=dev)
    kernel = torch.compile(model_module.softcap_ce_chunk, dynamic=False)
    out = {"loss_shape": [N, C, V]}

    def chunked(chunk):
        def run():
            with ctx.autocast():
                loss = model_module.fused_loss(h, W, y, weights, softcap=sc, chunk=chunk, kernel=kernel)
            loss.backward()
            h.grad = W.grad = None
        return run

    def full_logits(h, W, y):
        logits = sc * torch.tanh((h @ W.t()).float() / sc)
        return F.cross_entropy(logits, y)
    full = torch.compile(full_logits, dynamic=False)

    def run_full():
        with ctx.autocast():
            loss = full(h, W, y)
        loss.backward()
        h.grad = W.grad = None

    old_chunk = max(16, (1 << 22) // V)
    new_chunk = model_module.loss_chunk_rows(dev, V)
    for name, fn, rows in (("loss_chunk_old", chunked(old_chunk), old_chunk),
                           ("loss_chunk_new", chunked(new_chunk), new_chunk),
                           ("loss_full_compiled", run_full, N)):
        ctx.reset_peak()
        ms, first = timed(ctx, fn, warmup=2, iters=3 if ctx.smoke else 5)
        out[name] = {"rows": rows, "chunks": -(-N // rows), "ms": ms, "first_s": first}
        if ctx.cuda:
            out[name]["peak_gib"] = ctx.peak_memory_gib()
    return out


def micro_attention(ctx):
    """Attention forward + backward, one layer at d20's shape (10 heads x 128), window T/4, in autocast."""
    dev = ctx.device
    out = {}
    B, T, H, D = (2, 64, 2, 32) if ctx.smoke else (4, 2048, 10, 128)
    window = T // 4
    dt = torch.bfloat16 if ctx.cuda else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = [torch.randn(B, T, H, D, device=dev, dtype=dt, generator=g).requires_grad_() for _ in range(3)]
    gy = torch.randn(B, T, H, D, device=dev, dtype=dt, generator=g)
    out["attn_shape"] = [B, T, H, D, window]
    variants = [("sdpa_full", model_module.sdpa_attention, None),
                ("sdpa_dense_window", model_module.sdpa_attention, window)]
    if ctx.cuda:
        variants.append(("flex_window", fastpath.flex_window_attention(dev, T, [window]), window))
    else:
        out["flex_window"] = "GPU only (no FlexAttention backward on CPUs)"
    fa3 = fastpath.flash_attention_3(dev)
    if fa3 is not None:
        variants.append(("fa3_window", fa3, window))
    else:
        out["fa3_window"] = ("not installed" if installed("flash_attn_interface") == "not installed"
                             else "needs a Hopper GPU")
    for name, fn, w in variants:
        def run(fn=fn, w=w):
            with ctx.autocast():  # as in the model: flex casts to autocast's dtype (fp32 outside it)
                yy = fn(*qkv, w)
            yy.backward(gy)
            for t in qkv:
                t.grad = None
        ms, first = timed(ctx, run, warmup=2, iters=3 if ctx.smoke else 10)
        out[name] = {"ms": ms, "first_s": first}
    return out


def step_gemm_shapes(C, tokens, V, chunk):
    """(M, N, K) of the matmuls in a training step, out (M x N) = A (M x K) @ B (K x N): each block linear's forward,
    input gradient and weight gradient; picochat's lm_head chunk (W @ h^T, its grad_h and grad_W); the reference's
    full-logits lm_head."""
    shapes = []
    for n_out, n_in in ((C, C), (4 * C, C), (C, 4 * C)):
        shapes += [(tokens, n_out, n_in), (tokens, n_in, n_out), (n_out, n_in, tokens)]
    shapes += [(V, chunk, C), (chunk, C, V), (V, C, chunk)]
    shapes += [(tokens, V, C), (tokens, C, V), (V, C, tokens)]
    return list(dict.fromkeys(shapes))


def micro_roofline(ctx):
    """What bench/roofline.py --measured reads in place of its published constants (with the attention timings
    above): TFLOP/s of bf16 matmuls at the d20 step's shapes, a device copy's GB/s, the cost of a tiny kernel in a
    long queue."""
    dev, dt = ctx.device, ctx.dtype
    C, tokens, V = (64, 256, 512) if ctx.smoke else (1280, 32 * 2048, 32768)
    iters = 2 if ctx.smoke else 5
    gemm = []
    for M, N, K in step_gemm_shapes(C, tokens, V, model_module.loss_chunk_rows(dev, V)):
        a, b = torch.randn(M, K, device=dev, dtype=dt), torch.randn(K, N, device=dev, dtype=dt)
        ms, _ = timed(ctx, lambda a=a, b=b: a @ b, warmup=2, iters=iters)
        gemm.append({"mnk": [M, N, K], "tflops": 2 * M * N * K / (ms / 1e3) / 1e12})
        a = b = None  # the next shape's operands need the memory
    x = torch.empty((16 if ctx.smoke else 1024) << 20, device=dev, dtype=torch.uint8)
    y = torch.empty_like(x)
    ms, _ = timed(ctx, lambda: y.copy_(x), warmup=2, iters=iters)
    copy_gbps = 2 * x.numel() / (ms / 1e3) / 1e9
    x = y = None
    tiny, n = torch.zeros(1, device=dev), 2000
    ms, _ = timed(ctx, lambda: [tiny.add_(1) for _ in range(n)], warmup=2, iters=3)
    return {"gemm": gemm, "copy_gbps": copy_gbps, "kernel_us": ms * 1e3 / n,
            "device": torch.cuda.get_device_name(dev) if ctx.cuda else "cpu"}


# ---- 4 / 7. a training step of a speedrun preset ------------------------------------------------------------------
def try_step(ctx, cfg, flags, B):
    """Warm-up steps (compilation included), then timed ones; raises torch.cuda.OutOfMemoryError if B does not fit."""
    dev, T, V = ctx.device, cfg.sequence_len, cfg.vocab_size
    model = build_model(ctx, cfg)
    notes = []
    if flags["fp8"]:
        if installed("torchao") == "not installed":
            notes.append("fp8 in the preset but torchao not installed: ran without")
        else:
            fastpath.enable_fp8(model, dev)
    if flags["activation_checkpointing"]:
        fastpath.checkpoint_blocks(model)
    attention = fastpath.use_fast_attention(dev, flex=flags["flex_attention"] and ctx.cuda, seq_len=T,
                                            windows=model.windows)
    opt = build_optimizer(model)
    compile_ = flags["compile"]
    if compile_:
        opt.compile()
        model.compile_loss()
    fwd = torch.compile(model, dynamic=False) if compile_ else model
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, T), generator=gen).to(dev)
    y = torch.randint(0, V, (B, T), generator=gen).to(dev)

    def fwd_bwd():
        with ctx.autocast():
            loss = fwd(x, y)
        loss.backward()
        return loss

    def opt_step():
        opt.step()
        model.zero_grad(set_to_none=True)

    ctx.reset_peak()
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(ctx.args.warmup):
        fwd_bwd()
        opt_step()
    ctx.sync()
    warm_s = time.perf_counter() - t0
    warm_peak = ctx.peak_memory_gib()
    ctx.reset_peak()
    fb, op = [], []
    for _ in range(ctx.args.steps):
        ctx.sync()
        t0 = time.perf_counter()
        loss = fwd_bwd()
        ctx.sync()
        t1 = time.perf_counter()
        opt_step()
        ctx.sync()
        fb.append(t1 - t0)
        op.append(time.perf_counter() - t1)
    med = lambda v: sorted(v)[len(v) // 2]
    fb_s, op_s = med(fb), med(op)
    tokens = B * T
    flops = model.flops_per_token() * tokens
    res = {"B": B, "T": T, "attention": attention, "compile": compile_,
           "est_gib": estimated_gib(ctx, cfg, flags, B),
           "compile_s": max(0.0, warm_s - ctx.args.warmup * (fb_s + op_s)),
           "fwd_bwd_ms": fb_s * 1000, "opt_ms": op_s * 1000, "step_ms": (fb_s + op_s) * 1000,
           "tok_s": tokens / (fb_s + op_s), "mfu": flops / (fb_s + op_s) / ctx.peak,
           "mfu_fwd_bwd": flops / fb_s / ctx.peak, "loss": loss.item()}
    if ctx.cuda:
        res["peak_gib"] = ctx.peak_memory_gib()
        res["warmup_peak_gib"] = warm_peak
    if notes:
        res["notes"] = notes
    return res


def estimated_gib(ctx, cfg, flags, B):
    """fastpath.estimate_training_memory's total for this micro-batch (to set against the measured peak)."""
    parts = fastpath.estimate_training_memory(cfg, B, cfg.sequence_len, dtype=ctx.dtype, device_type=ctx.device.type,
                                              checkpointing=flags["activation_checkpointing"])
    return parts["total"] / 2 ** 30


def train_step(ctx, preset):
    flags = preset_flags(preset)
    depth, T, V, hd = flags["depth"], flags["seq_len"], flags["vocab"], flags["head_dim"]
    B = flags["device_batch_size"]
    if ctx.smoke:
        depth, T, V, hd, B = 2, 64, 512, 32, 4
    cfg = GPTConfig.from_depth(depth, vocab_size=V, sequence_len=T, aspect_ratio=flags["aspect_ratio"], head_dim=hd,
                               n_kv_head=flags["n_kv_head"], window_pattern=flags["window_pattern"],
                               value_embeds=flags["value_embeds"])
    with torch.device("meta"):
        meta = GPT(cfg)
    out = {"preset": preset, "depth": depth, "width": cfg.n_embd, "params_m": meta.num_params() / 1e6,
           "flops_per_token": float(meta.flops_per_token()), "windows": cfg.window_pattern,
           "value_embeds": cfg.value_embeds, "flex_flag": flags["flex_attention"], "flags_from": flags["source"]}
    del meta
    oom = []
    while B >= 1:
        t_section = time.perf_counter()
        try:
            out.update(try_step(ctx, cfg, flags, B))
            break
        except Exception as e:  # out of memory, also as raised from inside a compiled graph
            if not (isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()):
                raise
        oom.append(B)  # out of the except block: the failed try's tensors are released with its traceback
        free()
        spent = time.perf_counter() - t_section
        if time.perf_counter() - T_START + spent > ctx.args.budget_s:  # another try would cost as much
            out["error"] = f"out of memory at B={oom}; no time left to try B={B // 2}"
            break
        B //= 2
    if oom:
        out["oom_at"] = oom
    out["ok"] = "error" not in out and "step_ms" in out
    return out


def d20_step(ctx):
    return train_step(ctx, "d20")


def d12_step(ctx):
    return train_step(ctx, "d12")


# ---- 5. decode ----------------------------------------------------------------------------------------------------
def decode(ctx):
    from picochat.decode import InferenceModel, StaticCache
    depth, T, V, hd = (2, 64, 512, 32) if ctx.smoke else (20, 2048, 32768, 128)
    prompt, steps = (16, 8) if ctx.smoke else (128, 64)
    cfg = GPTConfig.from_depth(depth, vocab_size=V, sequence_len=T, head_dim=hd, window_pattern="SSSL",
                               value_embeds=True)
    model = build_model(ctx, cfg)
    out = {"depth": depth, "prompt": prompt, "steps": steps}
    compiled = ctx.args.decode_compile if ctx.args.decode_compile is not None else not ctx.smoke
    variants = [("eager", False)] + ([("compiled", True)] if compiled else [])
    for vname, compile_ in variants:
        net = InferenceModel(model, compile=compile_)
        out.setdefault("dtype", str(net.dtype).split(".")[-1])
        for B in (1, 16):
            gen = torch.Generator().manual_seed(B)
            ids = torch.randint(0, V, (B, prompt), generator=gen).to(ctx.device)

            def run(n):
                cache = StaticCache(cfg, B, prompt + steps + 1, ctx.device, net.dtype, static=net.static)
                with torch.inference_mode():
                    ctx.sync()
                    t0 = time.perf_counter()
                    tok = net.logits(net.hidden(ids, cache, slice(0, B), [0] * B)[:, -1]).argmax(-1)
                    tok.tolist()
                    t1 = time.perf_counter()
                    for s in range(n):  # one host sync per step, as Engine.generate samples
                        h = net.hidden(tok[:, None], cache, slice(0, B), [prompt + s] * B)
                        tok = net.logits(h[:, -1]).argmax(-1)
                        tok.tolist()
                    t2 = time.perf_counter()
                return cache, tok, (t1 - t0) * 1000, (t2 - t1) / max(n, 1) * 1000

            run(min(steps, 4))  # warm-up (cuBLAS handles, compilation)
            _, _, prefill_ms, step_ms = run(steps)
            key = f"{vname}_b{B}"
            out[key] = {"prefill_ms": prefill_ms, "step_ms": step_ms, "tok_s": B / step_ms * 1000}
        if vname == "eager":
            out["kernels_per_step"] = kernels_per_decode_step(ctx, net, cfg, V, prompt)
    return out


def kernels_per_decode_step(ctx, net, cfg, V, prompt):
    """CUDA kernels launched by one batch-1 decode step (on a CPU: aten ops), or a short reason."""
    from picochat.decode import StaticCache
    from torch.profiler import ProfilerActivity, profile
    try:
        cache = StaticCache(cfg, 1, prompt + 2, ctx.device, net.dtype)
        ids = torch.randint(0, V, (1, prompt)).to(ctx.device)
        with torch.inference_mode():
            tok = net.logits(net.hidden(ids, cache, slice(0, 1), [0])[:, -1]).argmax(-1)
            ctx.sync()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
            with profile(activities=acts) as prof:
                net.logits(net.hidden(tok[:, None], cache, slice(0, 1), [prompt])[:, -1]).argmax(-1)
                ctx.sync()
        events = prof.events()
        if ctx.cuda:
            return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        return sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
    except Exception as e:
        return f"not measured: {e.__class__.__name__}: {str(e)[:120]}"


# ---- 6. validation ------------------------------------------------------------------------------------------------
def validation(ctx):
    from torch._dynamo.utils import counters
    from picochat.model import bits_per_byte
    depth, T, V, hd, B, nb = (2, 64, 512, 32, 2, 2) if ctx.smoke else (20, 2048, 32768, 128, 8, 2)
    cfg = GPTConfig.from_depth(depth, vocab_size=V, sequence_len=T, head_dim=hd, window_pattern="SSSL",
                               value_embeds=True)
    model = build_model(ctx, cfg)
    model.compile_loss()  # as pretrain sets the model up with --compile (the wrapper is not what validation calls)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, V, (B, T), generator=gen).to(ctx.device),
                torch.randint(0, V, (B, T), generator=gen).to(ctx.device)) for _ in range(nb)]
    token_bytes = torch.randint(1, 8, (V,), generator=gen)
    autocast = ctx.autocast if ctx.dtype != torch.float32 else None
    frames = lambda: sum(counters["frames"].values())
    before = frames()
    times = []
    for _ in range(2):
        ctx.sync()
        t0 = time.perf_counter()
        bpb = bits_per_byte(model, iter(batches), token_bytes, autocast)
        ctx.sync()
        times.append(time.perf_counter() - t0)
    compiled_frames = frames() - before
    per_batch = times[1] / nb
    return {"depth": depth, "B": B, "T": T, "batches": nb, "first_s": times[0], "s_per_batch": per_batch,
            "s_per_2e20_tokens": per_batch * 2 ** 20 / (B * T), "dynamo_frames": compiled_frames, "bpb": bpb,
            "ok": compiled_frames == 0 and math.isfinite(bpb)}


# ---- 8. the sharded optimizer on several GPUs ---------------------------------------------------------------------
def _opt_model(depth, dev):
    cfg = GPTConfig.from_depth(depth, vocab_size=32768, sequence_len=2048, value_embeds=True)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=dev)
    return model.init_weights(seed=0)


def _opt_grads(model, r):
    gen = torch.Generator().manual_seed(1000 + r)
    return [torch.randn(q.shape, generator=gen) * 1e-2 for q in model.parameters()]


def _opt_timed(model, opt, grads, dev, n=5):
    import torch.distributed as dist
    times = []
    for _ in range(n):
        for q, g in zip(model.parameters(), grads):
            q.grad = g.clone()
        torch.cuda.synchronize(dev)
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _opt_worker(rank, world, port, depth, ref_path, out_path):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    model = _opt_model(depth, dev)
    opt = build_optimizer(model)
    for q, g in zip(model.parameters(), _opt_grads(model, rank)):
        q.grad = g.to(dev)
    opt.step()
    ref = torch.load(ref_path)
    diff = max(((q.detach().float().cpu() - r).abs().max() / r.abs().max().clamp(min=1e-12)).item()
               for q, r in zip(model.parameters(), ref))
    ms = _opt_timed(model, opt, [g.to(dev) for g in _opt_grads(model, rank)], dev) * 1000
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"max_rel_param_diff": diff, "step_ms": ms}, f)
    dist.destroy_process_group()


def sharded_opt(ctx):
    """N processes with different gradients against one process with their mean (max relative parameter
    difference), and the optimizer step time on 1 vs N GPUs. tests/test_distributed.py checks the same on CPUs."""
    import socket
    import tempfile
    import torch.multiprocessing as mp
    world = torch.cuda.device_count() if ctx.cuda else 0
    if world < 2:
        return {"skipped": "needs 2+ GPUs (tests/test_distributed.py checks sharding on CPUs)"}
    depth, dev = 20, ctx.device
    model = _opt_model(depth, dev)
    opt = build_optimizer(model)
    mean = [sum(gs) / world for gs in zip(*[_opt_grads(model, r) for r in range(world)])]
    for q, g in zip(model.parameters(), mean):
        q.grad = g.to(dev)
    opt.step()
    with tempfile.TemporaryDirectory() as tmp:
        ref_path, out_path = os.path.join(tmp, "ref.pt"), os.path.join(tmp, "out.json")
        torch.save([q.detach().float().cpu() for q in model.parameters()], ref_path)
        one_ms = _opt_timed(model, opt, [g.to(dev) for g in _opt_grads(model, 0)], dev) * 1000
        del model, opt, mean
        free()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_opt_worker, args=(world, port, depth, ref_path, out_path), nprocs=world, join=True)
        with open(out_path) as f:
            res = json.load(f)
    return {"depth": depth, "world": world, "one_process_ms": one_ms, "sharded_ms": res["step_ms"],
            "max_rel_param_diff": res["max_rel_param_diff"], "ok": res["max_rel_param_diff"] < 1e-5}


# ---- the driver -----------------------------------------------------------------------------------------------------
def estimate(ctx, name):
    gpu, smoke = ESTIMATES[name]
    if ctx.smoke:
        return smoke
    if name == "d12_step" and ctx.results.get("d20_step", {}).get("ok"):
        return 0.7 * ctx.results["d20_step"]["s"]
    return gpu


def run_section(ctx, i, name, fn):
    left = ctx.args.budget_s - (time.perf_counter() - T_START)
    est = estimate(ctx, name)
    line = {"section": name, "n": i}
    if est > left:
        line.update(ok=False, skipped=f"estimate {est:.0f}s > {max(left, 0):.0f}s left of --budget-s", s=0.0)
        return line
    free()
    t0 = time.perf_counter()
    try:
        res = fn(ctx)
        ok = res.pop("ok", True)
        line.update(ok=bool(ok))
        line.update(res)
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        here = [f for f in tb if "gpu_check" in f.filename or "picochat" in f.filename] or tb
        line.update(ok=False, error=f"{e.__class__.__name__}: {str(e).strip()[:300]}",
                    where=" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(here[-3:])))
        print(f"[gpu_check] section {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    line["s"] = time.perf_counter() - t0
    line["est_s"] = est
    free()
    return line


HIGHLIGHTS = {
    "environment": ["gpu", "torch", "cuda", "matmul_bf16_tflops", "matmul_fp32_tflops", "attention", "fa3", "torchao"],
    "agreement": ["fp32.loss_rel", "fp32.grad_rel", "bf16.loss_rel", "bf16.grad_rel", "compiled_bf16.loss_rel",
                  "compiled_bf16.grad_rel", "after_3_steps.loss_rel", "flex.out_rel", "flex.grad_rel", "flex.skipped",
                  "failed"],
    "micro": ["loss_chunk_old.ms", "loss_chunk_new.ms", "loss_full_compiled.ms", "loss_full_compiled.peak_gib",
              "sdpa_full.ms", "sdpa_dense_window.ms", "flex_window.ms", "fa3_window.ms", "fa3_window",
              "roofline.copy_gbps", "roofline.kernel_us"],
    "d20_step": ["B", "oom_at", "attention", "compile_s", "fwd_bwd_ms", "opt_ms", "tok_s", "mfu", "peak_gib",
                 "est_gib"],
    "decode": ["eager_b1.tok_s", "eager_b16.tok_s", "eager_b1.step_ms", "eager_b1.prefill_ms", "kernels_per_step",
               "compiled_b1.tok_s", "compiled_b16.tok_s"],
    "validation": ["first_s", "s_per_batch", "s_per_2e20_tokens", "dynamo_frames"],
    "sharded_opt": ["world", "one_process_ms", "sharded_ms", "max_rel_param_diff"],
}
HIGHLIGHTS["d12_step"] = HIGHLIGHTS["d20_step"]


def highlights(line):
    parts = []
    for key in HIGHLIGHTS.get(line["section"], []):
        v = line
        for k in key.split("."):
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None and v != []:
            parts.append(f"{key}={json.dumps(rnd(v, 3)).strip(chr(34))}")
    for k in ("skipped", "error"):
        if k in line:
            parts.append(f"{k}: {line[k]}")
    return "; ".join(parts).replace("|", "/")


def markdown(lines, ctx):
    env = ctx.results.get("environment", {})
    head = (f"gpu_check on {env.get('gpu') or env.get('device', ctx.device)}, torch {torch.__version__}, "
            f"budget {ctx.args.budget_s:.0f} s, {time.perf_counter() - T_START:.0f} s so far"
            f"{' (smoke)' if ctx.smoke else ''}\n\n")
    rows = ["| # | section | ok | s | figures |", "| --- | --- | --- | --- | --- |"]
    for ln in lines:
        status = "skipped" if "skipped" in ln else ("yes" if ln["ok"] else "**NO**")
        rows.append(f"| {ln['n']} | {ln['section']} | {status} | {ln['s']:.1f} | {highlights(ln)} |")
    return head + "\n".join(rows) + "\n"


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.compile_backend != "inductor":  # every torch.compile in picochat too (optimizer, loss kernel, flex)
        real_compile = torch.compile

        def compile_with_backend(model=None, **kw):
            kw.setdefault("backend", args.compile_backend)
            return real_compile(model, **kw) if model is not None else real_compile(**kw)
        torch.compile = compile_with_backend
    if args.smoke and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)  # tiny shapes: a 2-thread OpenMP team only stalls when the machine is busy
    ctx = Ctx(args)
    if ctx.cuda:
        torch.cuda.set_device(ctx.device)
        torch.backends.cuda.matmul.allow_tf32 = True  # as the stage commands run (init_runtime)
        torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_check.jsonl").write_text("")
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    unknown = (only | skip) - set(SECTIONS)
    if unknown:
        sys.exit(f"unknown sections {sorted(unknown)}: choose from {','.join(SECTIONS)}")
    funcs = {"environment": environment, "agreement": agreement, "micro": micro, "d20_step": d20_step,
             "decode": decode, "validation": validation, "d12_step": d12_step, "sharded_opt": sharded_opt}
    lines = []
    for i, name in enumerate(SECTIONS, 1):
        if (only and name not in only) or name in skip:
            continue
        if name != "environment" and "environment" not in ctx.results and ctx.peak is None:
            environment(ctx)  # the CPU's MFU peak is measured there
        line = rnd(run_section(ctx, i, name, funcs[name]))
        ctx.results[name] = line
        lines.append(line)
        text = json.dumps(line, separators=(",", ":"))
        print(text, flush=True)
        if out_dir:
            with open(out_dir / "gpu_check.jsonl", "a") as f:
                f.write(text + "\n")
            (out_dir / "gpu_check.md").write_text(markdown(lines, ctx))
    if not out_dir:
        print(markdown(lines, ctx), flush=True)
    failed = [ln["section"] for ln in lines if not ln["ok"] and "skipped" not in ln]
    skipped = [ln["section"] for ln in lines if "skipped" in ln and not ln["ok"]]
    if args.smoke and (failed or skipped):
        print(f"[gpu_check] smoke: sections not ok: {failed + skipped}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
