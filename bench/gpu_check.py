"""GPU check: one run answers the questions a GPU can answer, then prints a table and one JSON line.

    python bench/gpu_check.py                  # on a GPU: agreement, then d12 and d20 x eager / compile / fp8
    python bench/gpu_check.py --smoke          # anywhere, CPU included: tiny sizes, to check the script itself
    python bench/gpu_check.py --depths 12 --modes compile,ckpt --seq-len 2048

1. environment: GPU, compute capability, memory, table peak vs measured bf16 matmul peak, torchao, FA3;
2. agreement with the CPU in fp32 (a small model, same weights): logits and loss on the GPU in fp32 (TF32
   off), in bf16 autocast, compiled; and the loss after a few optimizer steps;
3. the sharded optimizer across GPUs (2+ GPUs, or 2 CPU processes with --smoke): one step of
   N processes with different gradients against one process with their mean (max relative parameter
   difference), and the step time on 1 vs N (reduce to owners + Muon/AdamW + broadcast, NCCL);
4. training throughput per depth and mode (a full step: forward, backward, Muon/AdamW update) at the run's
   sequence length with the largest micro-batch that fits (fastpath.find_device_batch_size): tokens/s,
   MFU against the table peak, peak memory, and the first step's extra time (compilation);
   modes: eager, compile (model + Muon update), fp8 (compile + torchao Float8Linear, when available),
   ckpt (compile + activation checkpointing), flex (compile + FlexAttention for the sliding windows);
5. FlexAttention's sliding windows against SDPA's dense mask (GPU only: outputs and q/k/v gradients).
Random tokens: throughput does not depend on the data.
"""
import argparse
import copy
import gc
import json
import os
import resource
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from picochat import fastpath
from picochat import model as model_module
from picochat.common import autodetect_device, compute_dtype, gpu_peak_flops, measure_matmul_flops
from picochat.model import GPT, GPTConfig
from picochat.optim import build_optimizer

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is (CPU included)")
p.add_argument("--device", default="")
p.add_argument("--depths", default="12,20")
p.add_argument("--modes", default="eager,compile,flex,fp8", help="comma list of eager, compile, flex, fp8, ckpt")
p.add_argument("--seq-len", type=int, default=2048)
p.add_argument("--vocab-size", type=int, default=32768)
p.add_argument("--max-batch", type=int, default=64, help="largest micro-batch tried (rows)")
p.add_argument("--steps", type=int, default=10, help="timed steps after --warmup")
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--window-pattern", default="SSSL")
p.add_argument("--opt-depth", type=int, default=20, help="model depth for the multi-GPU optimizer check")
p.add_argument("--opt-gpus", type=int, default=0, help="processes for the optimizer check (0: all GPUs; 1: skip)")
args = p.parse_args()
if args.smoke:
    args.depths, args.seq_len, args.vocab_size, args.max_batch, args.steps, args.warmup = "1,2", 64, 512, 4, 2, 1
    args.opt_depth = 2

device = torch.device(args.device or autodetect_device())
cuda = device.type == "cuda"
dtype = compute_dtype(device.type)
sync = torch.cuda.synchronize if cuda else (lambda: None)
peak = None  # FLOP/s for MFU, set by main()
base_attention = None  # picochat.model.attention as environment() left it, set by main()


def autocast():
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def free():
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def peak_memory_mb():
    if cuda:
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- 1. environment ---------------------------------------------------------------------------------------------
def environment():
    env = {"torch": torch.__version__, "device": str(device), "compute_dtype": str(dtype).split(".")[-1]}
    if cuda:
        props = torch.cuda.get_device_properties(device)
        env.update(name=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   memory_gb=round(props.total_memory / 2 ** 30, 1), gpus=torch.cuda.device_count())
        env["table_peak_tflops"] = (gpu_peak_flops(props.name, dtype) or 0) / 1e12 or None
        env["measured_matmul_tflops"] = round(measure_matmul_flops(device, dtype, n=8192, seconds=2.0) / 1e12, 1)
    else:
        env["name"] = f"cpu x{torch.get_num_threads()}"
        env["measured_matmul_tflops"] = round(measure_matmul_flops(device, dtype, n=512, seconds=0.5) / 1e12, 4)
    try:
        import torchao  # noqa: F401
        env["torchao"] = getattr(torchao, "__version__", "yes")
    except ImportError:
        env["torchao"] = None
    env["attention"] = fastpath.use_fast_attention(device)
    return env


# ---- 2. agreement with the CPU in fp32 ---------------------------------------------------------------------------
def agreement():
    T, V = (32, 256) if args.smoke else (256, 4096)
    cfg = GPTConfig.from_depth(1 if args.smoke else 4, vocab_size=V, sequence_len=T, head_dim=32 if args.smoke else 64,
                               window_pattern="SL", value_embeds=True)
    ref = GPT(cfg).init_weights(seed=0)
    with torch.no_grad():  # zero-initialized projections would hide differences in attention and MLP
        gen = torch.Generator().manual_seed(1)
        for prm in ref.parameters():
            prm.add_(torch.randn(prm.shape, generator=gen) * 0.05)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (4, T), generator=gen)
    y = torch.randint(0, V, (4, T), generator=gen)
    with torch.no_grad():
        ref_logits, ref_loss = ref(x), ref(x, y).item()
    model = copy.deepcopy(ref).to(device)
    xd, yd = x.to(device), y.to(device)
    out = {}

    def compare(name, fn):
        with torch.no_grad():
            logits, loss = fn(xd), fn(xd, yd).item()
        logits = logits.float().cpu()
        out[name] = {"max_abs_logit_diff": (logits - ref_logits).abs().max().item(),
                     "loss_rel_diff": abs(loss - ref_loss) / ref_loss,
                     "argmax_agree": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()}

    if cuda:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        compare("fp32", model)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    else:
        compare("fp32", model)

    def low(*a):
        with autocast():
            return model(*a)
    compare(f"{str(dtype).split('.')[-1]}_autocast", low)
    compiled = torch.compile(model, dynamic=False)

    def low_compiled(*a):
        with autocast():
            return compiled(*a)
    compare("compiled_autocast", low_compiled)

    # a few optimizer steps: the training path (fused loss backward, Muon in bf16 on GPUs) against CPU fp32
    def train(m, xs, ys, steps=3):
        opt = build_optimizer(m)
        for _ in range(steps):
            with torch.autocast(xs.device.type, dtype=dtype, enabled=xs.device.type == "cuda" and dtype != torch.float32):
                loss = m(xs, ys)
            loss.backward()
            opt.step()
            m.zero_grad(set_to_none=True)
        with torch.no_grad():
            return m(xs, ys).item()
    cpu_after = train(copy.deepcopy(ref), x, y)
    dev_after = train(copy.deepcopy(ref).to(device), xd, yd)
    out["loss_after_3_steps"] = {"cpu_fp32": cpu_after, "device": dev_after,
                                 "rel_diff": abs(cpu_after - dev_after) / cpu_after}
    return out


# ---- 3. the sharded optimizer on several GPUs -----------------------------------------------------------------
def opt_model(dev):
    cfg = GPTConfig.from_depth(args.opt_depth, vocab_size=args.vocab_size, sequence_len=args.seq_len,
                               head_dim=32 if args.smoke else 128, value_embeds=True)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=dev)
    return model.init_weights(seed=0)


def opt_grads(model, r):
    gen = torch.Generator().manual_seed(1000 + r)
    return [torch.randn(q.shape, generator=gen) * 1e-2 for q in model.parameters()]


def timed_steps(model, opt, grads, dev, n=5):
    times = []
    for _ in range(n):
        for q, g in zip(model.parameters(), grads):
            q.grad = g.clone()
        sync()
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def opt_worker(rank, world, port, ref_path, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    model = opt_model(dev)
    opt = build_optimizer(model)
    for q, g in zip(model.parameters(), opt_grads(model, rank)):
        q.grad = g.to(dev)
    opt.step()
    ref = torch.load(ref_path)
    diff = max(((q.detach().float().cpu() - r).abs().max() / r.abs().max().clamp(min=1e-12)).item()
               for q, r in zip(model.parameters(), ref))
    ms = timed_steps(model, opt, [g.to(dev) for g in opt_grads(model, rank)], dev) * 1000
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"max_rel_param_diff": diff, "step_ms": ms}, f)
    dist.destroy_process_group()


def optimizer_check():
    world = args.opt_gpus or (torch.cuda.device_count() if cuda else 2)
    if world < 2 or (not cuda and not args.smoke):
        return {"skipped": "needs 2+ GPUs"}
    dev = device
    model = opt_model(dev)
    opt = build_optimizer(model)
    mean = [sum(gs) / world for gs in zip(*[opt_grads(model, r) for r in range(world)])]
    for q, g in zip(model.parameters(), mean):
        q.grad = g.to(dev)
    opt.step()
    with tempfile.TemporaryDirectory() as tmp:
        ref_path, out_path = os.path.join(tmp, "ref.pt"), os.path.join(tmp, "out.json")
        torch.save([q.detach().float().cpu() for q in model.parameters()], ref_path)
        one_ms = timed_steps(model, opt, [g.to(dev) for g in opt_grads(model, 0)], dev) * 1000
        del model, opt, mean
        free()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(opt_worker, args=(world, port, ref_path, out_path), nprocs=world, join=True)
        with open(out_path) as f:
            res = json.load(f)
    return {"depth": args.opt_depth, "world": world, "one_process_step_ms": round(one_ms, 1),
            "sharded_step_ms": round(res["step_ms"], 1), "max_rel_param_diff": res["max_rel_param_diff"]}


# ---- 4. throughput ------------------------------------------------------------------------------------------------
def throughput(depth, mode):
    T = args.seq_len
    cfg = GPTConfig.from_depth(depth, vocab_size=args.vocab_size, sequence_len=T, window_pattern=args.window_pattern,
                               head_dim=32 if args.smoke else 128)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights(seed=0)
    compile_ = mode in ("compile", "fp8", "ckpt", "flex")
    model_module.attention = base_attention  # what environment() chose (FA3 or SDPA), not an earlier flex mode
    if mode == "flex":
        fastpath.use_fast_attention(device, flex=True, seq_len=T, windows=model.windows)
    if mode == "fp8":
        fastpath.enable_fp8(model, device)
    if mode == "ckpt":
        fastpath.checkpoint_blocks(model)
    opt = build_optimizer(model)
    if compile_:
        opt.compile()
    B, how = fastpath.find_device_batch_size(model, opt, T, args.max_batch, device, autocast)
    fwd = torch.compile(model, dynamic=False) if compile_ else model
    if compile_ and hasattr(model, "compile_loss"):
        model.compile_loss()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab_size, (B, T + 1), generator=gen).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with autocast():
            loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tokens = B * T
    res = {"depth": depth, "mode": mode, "width": cfg.n_embd, "params_m": round(model.num_params() / 1e6, 1),
           "batch": B, "batch_how": how, "seq_len": T, "tokens_per_sec": round(tokens / dt),
           "step_ms": round(dt * 1000, 1), "mfu": round(model.flops_per_token() * tokens / dt / peak, 4),
           "peak_memory_gb": round(peak_memory_mb() / 1024, 2), "first_step_extra_s": round(first - dt, 1),
           "loss": round(loss.item(), 3)}
    return res


def flex_agreement():
    """FlexAttention's block-sparse windows against SDPA with the dense mask, bf16, forward and backward."""
    if not cuda:
        return {"skipped": "GPU only (torch has no FlexAttention backward on CPUs)"}
    T, window = (256, 64) if args.smoke else (2048, 512)
    flex = fastpath.flex_window_attention(device, T, [window])
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = [torch.randn(4, T, 8, 128, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3)]
    out = {}
    for name, fn in (("sdpa", model_module.sdpa_attention), ("flex", flex)):
        y = fn(*qkv, window)
        y.float().square().sum().backward()
        out[name] = (y.detach().float(), [t.grad.float() for t in qkv])
        for t in qkv:
            t.grad = None
    (ya, ga), (yb, gb) = out["sdpa"], out["flex"]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    return {"seq_len": T, "window": window, "out_rel_diff": rel(yb, ya),
            "grad_rel_diff": max(rel(b, a) for a, b in zip(ga, gb))}


def main():
    global peak, base_attention
    env = environment()
    base_attention = model_module.attention
    peak = env.get("table_peak_tflops") and env["table_peak_tflops"] * 1e12 or env["measured_matmul_tflops"] * 1e12
    results = {"bench": "gpu_check", "smoke": args.smoke, "env": env}
    try:
        results["agreement"] = agreement()
    except Exception as e:  # report and go on: the throughput numbers are still worth having
        results["agreement"] = {"error": f"{e.__class__.__name__}: {e}", "trace": traceback.format_exc(limit=3)}
    free()
    try:
        results["optimizer"] = optimizer_check()
    except Exception as e:
        results["optimizer"] = {"error": f"{e.__class__.__name__}: {str(e)[:300]}"}
        free()
    try:
        results["flex"] = flex_agreement()
    except Exception as e:
        results["flex"] = {"error": f"{e.__class__.__name__}: {str(e)[:300]}"}
    free()
    results["throughput"] = []
    for depth in [int(d) for d in args.depths.split(",") if d]:
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            if mode == "fp8" and not (cuda and env["torchao"] and torch.cuda.get_device_capability(device) >= (8, 9)):
                results["throughput"].append({"depth": depth, "mode": mode, "skipped": "needs torchao and sm89+"})
                continue
            if mode == "flex" and not cuda:
                results["throughput"].append({"depth": depth, "mode": mode, "skipped": "no FlexAttention backward off GPUs"})
                continue
            try:
                results["throughput"].append(throughput(depth, mode))
            except Exception as e:
                results["throughput"].append({"depth": depth, "mode": mode, "error": f"{e.__class__.__name__}: {str(e)[:300]}"})
            free()
            print(f"  done: depth {depth} {mode}", flush=True)

    # ---- report -------------------------------------------------------------------------------------------------------
    print(f"\n{env['name']} | torch {env['torch']} | {env['compute_dtype']} | attention {env['attention']} | torchao "
          f"{env['torchao']} | peak: table {env.get('table_peak_tflops')} TFLOPS, measured matmul "
          f"{env['measured_matmul_tflops']} TFLOPS")
    agr = results["agreement"]
    if "error" in agr:
        print(f"agreement: {agr['error']}")
    else:
        print(f"{'agreement vs CPU fp32':<26}{'max |dlogit|':>14}{'loss rel diff':>15}{'argmax agree':>14}")
        for name, r in agr.items():
            if name != "loss_after_3_steps":
                print(f"{name:<26}{r['max_abs_logit_diff']:>14.2e}{r['loss_rel_diff']:>15.2e}{r['argmax_agree']:>14.4f}")
        r = agr["loss_after_3_steps"]
        print(f"loss after 3 optimizer steps: CPU fp32 {r['cpu_fp32']:.5f}, device {r['device']:.5f} (rel diff {r['rel_diff']:.2e})")
    o = results["optimizer"]
    if "sharded_step_ms" in o:
        print(f"sharded optimizer, depth {o['depth']}: step {o['one_process_step_ms']} ms on 1 process, "
              f"{o['sharded_step_ms']} ms on {o['world']}; max relative parameter difference {o['max_rel_param_diff']:.2e}")
    else:
        print(f"sharded optimizer: {o.get('skipped') or o.get('error')}")
    f = results["flex"]
    print(f"flex vs dense-mask SDPA: {f.get('skipped') or f.get('error') or ''}" if "out_rel_diff" not in f else
          f"flex vs dense-mask SDPA (T {f['seq_len']}, window {f['window']}): output rel diff "
          f"{f['out_rel_diff']:.2e}, gradient rel diff {f['grad_rel_diff']:.2e}")
    print(f"\n{'depth':>5} {'mode':<8}{'batch':>6}{'tok/s':>12}{'MFU':>8}{'step ms':>10}{'peak GB':>9}{'1st step +s':>12}")
    for r in results["throughput"]:
        if "tokens_per_sec" in r:
            print(f"{r['depth']:>5} {r['mode']:<8}{r['batch']:>6}{r['tokens_per_sec']:>12,}{100 * r['mfu']:>7.1f}%"
                  f"{r['step_ms']:>10}{r['peak_memory_gb']:>9}{r['first_step_extra_s']:>12}")
        else:
            print(f"{r['depth']:>5} {r['mode']:<8}  {r.get('skipped') or r.get('error')}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
