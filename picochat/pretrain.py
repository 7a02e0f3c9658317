"""`picochat pretrain`: train the base model on parquet text shards.

One dial, --depth, sets the model and (unless given) the token budget, batch size, learning rates and
weight decay; all derived values are printed at start. Checkpoints are written atomically and --resume
continues exactly: same batches, same optimizer state, bit-identical losses (fp32).

Several GPUs or nodes: run it under torchrun (see README, "Multi-GPU and multi-node"). Each optimizer step
is S = total batch / (device batch x seq len) micro-batches, split across W ranks x S/W accumulation
steps; micro-batch k always comes from data stream k, so the data does not depend on the split: a
checkpoint written by W ranks resumes exactly on any W' that divides S, a single process included.
"""
import argparse
import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from picochat.common import (UserError, autocast_for, home_dir, init_runtime, print0, compute_dtype, peak_flops,
                             format_duration, atomic_write_json, raise_on_rank0, metrics_logger, vars_json)
from picochat.engine import Engine
from picochat.model import GPT, GPTConfig, add_shape_args, bits_per_byte, derive_hparams, describe
from picochat.optim import (MuonAdamW, build_optimizer, cosine_decay, muon_momentum, warmup_stable_decay,
                           wire_dtype_for)
from picochat.loader import StepLoader, fixed_batches
from picochat.shards import split_shards
from picochat import fastpath
from picochat.tokenizer import Tokenizer
from picochat import checkpoint
from picochat.tracking import add_log_to_arg, tracker

GC_EVERY = 1000  # steps between garbage collections once the GC is frozen and disabled after the first step


def add_parser(sub):
    p = sub.add_parser("pretrain", help="pretrain the base model on text shards",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="default", help="run name: outputs go to $PICOCHAT_HOME/runs/<run>/base")
    p.add_argument("--data", default="", help="folder of parquet shards with a 'text' column (last = validation); "
                                              "default $PICOCHAT_HOME/data/pretrain")
    p.add_argument("--tokenizer", default="", help="tokenizer folder (default runs/<run>/tokenizer)")
    p.add_argument("--out", default="", help="checkpoint folder (default runs/<run>/base)")
    g = p.add_argument_group("model")
    add_shape_args(g)
    g.add_argument("--init-from", default="", help="start from this checkpoint's weights (a folder, RUN or RUN:STAGE, "
                                                    "stage base by default) with a fresh optimizer and schedule: its "
                                                    "architecture replaces the model flags (not --resume)")
    g = p.add_argument_group("budget and batch")
    g.add_argument("--num-iterations", type=int, default=-1,
                   help="optimizer steps (-1: from --target-param-data-ratio)")
    g.add_argument("--target-param-data-ratio", type=float, default=10.5, help="training tokens per scaling parameter")
    g.add_argument("--device-batch-size", type=fastpath.batch_size_arg, default="auto",
                   help="rows per micro-batch per rank, or auto: on a GPU the largest that fits (probed with a real "
                        "forward and backward), on a CPU from a memory estimate; gradient accumulation makes up "
                        "the rest")
    g.add_argument("--total-batch-size", type=int, default=-1,
                   help="tokens per optimizer step (-1: derived from depth)")
    g = p.add_argument_group("optimization")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR (scaled by (batch/2^19)^0.383)")
    g.add_argument("--embedding-lr", type=float, default=0.3)
    g.add_argument("--unembedding-lr", type=float, default=0.008)
    g.add_argument("--scalar-lr", type=float, default=0.5)
    g.add_argument("--weight-decay", type=float, default=-1,
                   help="Muon weight decay at step 0, cosine-decayed to 0 (-1: derived)")
    g.add_argument("--warmup-steps", type=int, default=40)
    g.add_argument("--warmdown-ratio", type=float, default=0.65)
    g.add_argument("--final-lr-frac", type=float, default=0.05)
    g = p.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=250, help="validation bpb every N steps (0 = only at the end)")
    g.add_argument("--eval-tokens", type=int, default=2 ** 20, help="validation tokens per evaluation")
    g.add_argument("--sample-every", type=int, default=0, help="print sampled completions every N steps")
    g.add_argument("--save-every", type=int, default=500,
                   help="checkpoint every N steps and at the end (0: at the end only)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="", help="cuda, cpu or mps (default: best available)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model and the optimizer's Muon update (minutes of compilation first; "
                        "default: on for CUDA GPUs, off elsewhere)")
    g.add_argument("--grad-wire", choices=["auto", "fp32", "bf16"], default="auto",
                   help="dtype gradients travel in between ranks (auto: bf16 between GPUs, summed in fp32)")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each block in the backward pass: ~1/3 more compute, far less memory (small GPUs)")
    g.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=False,
                   help="fp8 matmuls in the blocks via torchao (GPUs with compute capability 8.9+, e.g. H100); "
                        "use with --compile")
    g.add_argument("--flex-attention", action=argparse.BooleanOptionalAction, default=False,
                   help="sliding-window layers on FlexAttention (block-sparse) where FlashAttention-3 is missing, "
                        "instead of SDPA with a dense mask (GPUs; not yet checked on one: see bench/gpu_check.py)")
    g.add_argument("--seed", type=int, default=0)
    add_log_to_arg(g)
    p.set_defaults(func=run)


def resolve_compile(flag, device):
    """--compile as given, or when not given (None) on for CUDA, where compiling pays for its minutes many
    times over in a run, and off elsewhere (CPU and MPS runs are short; compilation would dominate them)."""
    return device.type == "cuda" if flag is None else bool(flag)


def run(args):
    ddp, rank, local_rank, world, device = init_runtime(args.device)
    args.compile = resolve_compile(args.compile, device)  # the resolved value is printed and saved with the run
    out = Path(args.out) if args.out else home_dir() / "runs" / args.run / "base"
    with checkpoint.stage_lock(out):  # for the whole run: a second run writing to out stops at once
        try:  # everything here fails alike on every rank: report it once (see raise_on_rank0)
            setup = _setup(args, out, ddp=ddp, rank=rank, world=world, device=device)
        except UserError as e:
            raise_on_rank0(e)
        gc_was_enabled = gc.isenabled()
        try:
            return _train(args, setup, ddp=ddp, rank=rank, world=world, device=device)
        finally:  # _train freezes and disables the GC after its first step (see there); a caller gets it back
            gc.unfreeze()
            if gc_was_enabled:
                gc.enable()


def init_folder(spec, out):
    """--init-from: the checkpoint folder spec names (a folder, else RUN or RUN:STAGE, stage base by default)."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        run, _, stage = spec.partition(":")
        folder, _ = checkpoint.resolve_checkpoint(run, stage or "base")
    if folder.resolve() == Path(out).resolve():
        raise UserError(f"--init-from {spec} is this run's own output folder {out}: continue it with --resume, "
                        f"or write the new model to another --run or --out")
    return folder


def init_config(folder, tokenizer, seq_len):
    """(meta, config) of the --init-from checkpoint, refused unless it fits this run's tokenizer and --seq-len."""
    meta = checkpoint.read_meta(folder)
    if meta.get("tokenizer_hash") != tokenizer.hash:
        raise UserError(f"--init-from {folder} was trained with another tokenizer than this run's: continue it in a "
                        f"new --run (which takes the model's tokenizer) or pass that --tokenizer")
    config = GPTConfig(**meta["config"])
    if seq_len > config.sequence_len:
        raise UserError(f"--seq-len {seq_len} exceeds the context of the --init-from model ({config.sequence_len}): "
                        f"pass --seq-len {config.sequence_len} or less")
    return meta, config


@dataclass
class Setup:
    """What _setup hands _train: the model, its optimizer and data, and the shape of the run."""
    out: Path                 # the checkpoint folder
    tokenizer: Tokenizer
    val_files: list
    dtype: torch.dtype        # of the compute
    autocast: Callable        # autocast(): the context the forward passes run in
    config: GPTConfig
    model: GPT
    optimizer: MuonAdamW
    loader: StepLoader
    device_batch: int         # rows per micro-batch
    num_streams: int          # micro-batches per step, over all ranks
    grad_accum: int           # micro-batches per step on each rank
    total_batch: int          # tokens per step
    num_steps: int
    start_step: int           # 0, or the step resumed from


def _setup(args, out, *, ddp, rank, world, device) -> Setup:
    run_dir = home_dir() / "runs" / args.run
    data = Path(args.data) if args.data else home_dir() / "data" / "pretrain"
    init = init_folder(args.init_from, out) if args.init_from else None
    tok_dir = Path(args.tokenizer) if args.tokenizer else run_dir / "tokenizer"
    if init is not None and not args.tokenizer and not tok_dir.is_dir():
        tok_dir = init / "tokenizer"  # a new run continuing an imported model: the model's own tokenizer
    tokenizer = Tokenizer.load(tok_dir)
    train_files, val_files = split_shards(data)
    if args.seq_len < 2:
        raise UserError("--seq-len must be >= 2")
    if isinstance(args.device_batch_size, int) and args.device_batch_size < 1:
        raise UserError("--device-batch-size must be >= 1 (or auto)")

    dtype = compute_dtype(device.type)
    autocast = autocast_for(device)
    torch.manual_seed(args.seed)
    model, config, attention = _build_model(args, init=init, tokenizer=tokenizer, device=device)

    meta = None
    if args.resume and checkpoint.latest_step(out) is not None:
        meta = checkpoint.read_meta(out)
        if meta["tokenizer_hash"] != tokenizer.hash:
            raise UserError(f"checkpoint in {out} was trained with another tokenizer; use a new --run or --out")
        if meta["config"] != checkpoint.config_to_dict(config):
            raise UserError(f"checkpoint in {out} has a different model config ({meta['config']}); "
                            "resume with the same flags")

    shape = ((config.n_layer, config.n_embd // config.n_layer, config.head_dim) if init is not None
             else (args.depth, args.aspect_ratio, args.head_dim))
    hp = derive_hparams(shape[0], tokenizer.vocab_size, args.target_param_data_ratio, *shape[1:])
    total_batch = args.total_batch_size if args.total_batch_size > 0 else hp["total_batch_size"]
    if total_batch % (args.seq_len * world):
        raise UserError(f"--total-batch-size {total_batch} is not a multiple of seq len x ranks = {args.seq_len} x "
                        f"{world} = {args.seq_len * world}: change one of them")
    lr_scale = math.sqrt(total_batch / 2 ** 19)
    # Muon's LR shrinks more slowly than sqrt below d12's batch: 1.5x the sqrt rule's at 16K tokens trained
    # better at d4 and d6 on the ladder (dev/LOG.md, session 12); the same LR at 2^19, where the GPU presets train
    muon_scale = (total_batch / 2 ** 19) ** 0.383
    # the rule's weight decay with the batch actually used
    wd = args.weight_decay if args.weight_decay >= 0 else hp["weight_decay"] * lr_scale / hp["lr_scale"]
    optimizer = build_optimizer(model, matrix_lr=args.matrix_lr * muon_scale, embedding_lr=args.embedding_lr * lr_scale,
                                unembedding_lr=args.unembedding_lr * lr_scale, scalar_lr=args.scalar_lr * lr_scale,
                                weight_decay=wd, wire_dtype=wire_dtype_for(args.grad_wire, device, world))
    if args.compile:
        optimizer.compile()

    rows_per_rank = total_batch // (args.seq_len * world)
    if args.device_batch_size == "auto":
        prefer = meta.get("device_batch_size") if meta else None  # the same split resumes the data exactly
        B, how = fastpath.find_device_batch_size(model, optimizer, args.seq_len, rows_per_rank=rows_per_rank,
                                                 device=device, autocast=autocast, prefer=prefer)
    else:
        B, how = args.device_batch_size, "given"
    tokens_per_micro = B * args.seq_len * world
    if total_batch % tokens_per_micro:
        raise UserError(f"--total-batch-size {total_batch} is not a multiple of device batch x seq len x ranks = "
                        f"{B} x {args.seq_len} x {world} = {tokens_per_micro}: change one of them")
    num_streams = total_batch // (B * args.seq_len)
    grad_accum = num_streams // world
    num_steps = args.num_iterations if args.num_iterations > 0 else max(1, hp["tokens"] // total_batch)
    print0(describe(model))
    print0(f"budget: {num_steps} steps x {total_batch:,} tokens = {num_steps * total_batch:,} tokens "
           f"({num_steps * total_batch / model.num_scaling_params():.1f} per scaling param; rule: {hp['tokens']:,}) | "
           f"micro-batch {B}x{args.seq_len} ({how}) x {world} ranks x {grad_accum} accumulation steps")
    print0(f"optimizer: Muon lr {optimizer.param_groups[0]['lr']:.4g} wd {wd:.4g} | AdamW lr embedding "
           f"{optimizer.param_groups[1]['lr']:.4g}, lm_head {optimizer.param_groups[2]['lr']:.4g}, scalars "
           f"{args.scalar_lr * lr_scale:.4g} | device {device}, compute {str(dtype).split('.')[-1]}, compile "
           f"{args.compile}, attention {attention}, fp8 {args.fp8}, activation checkpointing "
           f"{args.activation_checkpointing}, gradient wire "
           f"{str(optimizer.wire_dtype).split('.')[-1] if world > 1 else '-'}")

    loader = StepLoader(train_files, tokenizer, B, args.seq_len, num_streams=num_streams, rank=rank, world=world,
                        device=device)
    start_step = 0
    if meta is not None:
        start_step = _restore(out, meta, model=model, optimizer=optimizer, loader=loader, rank=rank, world=world,
                              num_streams=num_streams, device_batch=B)
    elif args.resume:
        print0(f"no checkpoint in {out}: starting from scratch")
    return Setup(out=out, tokenizer=tokenizer, val_files=val_files, dtype=dtype, autocast=autocast, config=config,
                 model=model, optimizer=optimizer, loader=loader, device_batch=B, num_streams=num_streams,
                 grad_accum=grad_accum, total_batch=total_batch, num_steps=num_steps, start_step=start_step)


def _build_model(args, *, init, tokenizer, device):
    """The model to train on device: the --depth family's config, or the --init-from model's with its weights
    (verified against their recorded sha256) loaded over the fresh init; then the fast paths that change modules
    (fp8, activation checkpointing), which come before the optimizer collects the parameters, and the attention
    backend. Returns (model, config, attention)."""
    if init is not None:
        init_meta, config = init_config(init, tokenizer, args.seq_len)
    else:
        config = GPTConfig.from_depth(args.depth, vocab_size=tokenizer.vocab_size, sequence_len=args.seq_len,
                                      aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                                      n_kv_head=args.n_kv_head, window_pattern=args.window_pattern,
                                      value_embeds=args.value_embeds, smear=args.smear, backout=args.backout,
                                      qk_scale=args.qk_scale)
    config.window_sizes()  # validates the pattern before any work
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(seed=args.seed)
    if init is not None:
        checkpoint.verify_file(init, init_meta, f"model_{init_meta['step']:06d}.safetensors")
        model.load_state_dict(checkpoint.load_weights(init, init_meta["step"]))
        print0(f"starting from the weights of {init} (step {init_meta['step']}), with a fresh optimizer and schedule")
    if args.fp8:
        fastpath.enable_fp8(model, device)
        if not args.compile:
            print0("warning: --fp8 without --compile is usually slower than bf16 (the scaling is not fused)")
    if args.activation_checkpointing:
        fastpath.checkpoint_blocks(model)
    if args.flex_attention and device.type != "cuda":
        raise_on_rank0(UserError("--flex-attention needs a CUDA GPU (torch has no FlexAttention backward elsewhere)"))
    attention = fastpath.use_fast_attention(device, flex=args.flex_attention, seq_len=args.seq_len,
                                            windows=model.windows)
    if warning := fastpath.dense_window_warning(model, device, attention):
        print0(f"\n{'!' * 100}\n{warning}\n{'!' * 100}\n")
    return model, config, attention


def _restore(out, meta, *, model, optimizer, loader, rank, world, num_streams, device_batch):
    """Resume from the checkpoint meta describes: the weights and the optimizer state (re-sharded for any rank
    count), and the data order and RNG when the step is split into the same micro-batches (else the data order
    restarts, with a warning); every file verified against its recorded sha256. Returns the step to continue from."""
    step = meta["step"]
    checkpoint.verify_file(out, meta, f"model_{step:06d}.safetensors")
    model.load_state_dict(checkpoint.load_weights(out, step))
    checkpoint.load_rank_shards(out, meta, optimizer)  # re-shards the optimizer state for any rank count
    # stream s was served by rank s % W_then: read just the state files of those ranks
    saved_world = meta["world_size"]
    owners = sorted({s % saved_world for s in loader.ids})
    names = [f"state_{step:06d}_rank{r}.pt" for r in owners]
    for name in names:
        checkpoint.verify_file(out, meta, name)
    states = [checkpoint.load_torch(out / name) for name in names]
    if loader.load_state_dicts([st["loader"] for st in states]):
        if saved_world == world:
            torch.set_rng_state(states[0]["rng"])
        elif rank == 0:
            print(f"resuming {saved_world}-rank checkpoint on {world} rank(s): data order continues exactly",
                  flush=True)
    else:
        print0(f"warning: the checkpoint split each step into {meta.get('num_streams', '?')} micro-batches of "
               f"{meta.get('device_batch_size', '?')} rows, now {num_streams} of {device_batch}: weights and "
               f"optimizer restored, the data order restarts (resume with --device-batch-size "
               f"{meta.get('device_batch_size', '?')} to continue it exactly)")
    print0(f"resumed from step {step} in {out}")
    return step


def _train(args, st, *, ddp, rank, world, device):
    out, tokenizer, model, optimizer, loader = st.out, st.tokenizer, st.model, st.optimizer, st.loader
    dtype, autocast, B, grad_accum = st.dtype, st.autocast, st.device_batch, st.grad_accum
    total_batch, num_steps, start_step = st.total_batch, st.num_steps, st.start_step
    # the resumed run evaluates again at the step it starts from
    mirror = tracker(args.log_to, out=out, run=args.run, stage="base", config=vars_json(args),
                     step=start_step, rank=rank)
    log = metrics_logger(out / "metrics.jsonl", start_step, rank, redone={"val_bpb"}, mirror=mirror)
    if ddp:  # every rank starts from rank 0's weights, however they were made
        for p in model.parameters():
            torch.distributed.broadcast(p.data, src=0)

    model.train()
    fwd = torch.compile(model, dynamic=False) if args.compile else model
    if args.compile and hasattr(model, "compile_loss"):
        model.compile_loss()  # the chunked loss runs outside the model's graph: compile its kernel on its own
    flops_per_step = model.flops_per_token() * total_batch
    peak = peak_flops(device, dtype) * world
    token_bytes = tokenizer.token_bytes()
    val_batches = []  # built once: the first eval_tokens of the validation shard, the same on any rank count

    def evaluate(step):
        if not val_batches:
            val_batches.extend(fixed_batches(st.val_files, tokenizer, B, args.seq_len,
                                             max(1, args.eval_tokens // (B * args.seq_len))))
        model.eval()
        mine = ((x.to(device), y.to(device)) for x, y in val_batches[rank::world])
        # the eager model: compiled, the per-token loss's chunk loop would be unrolled and traced at step 0;
        # and without fp8, whose eager per-call scaling is slow and whose rounding the bpb should not carry
        with fastpath.bf16_linears(model):
            bpb = bits_per_byte(model, mine, token_bytes, autocast if dtype != torch.float32 else None)
        model.train()
        print0(f"step {step:05d} | validation bpb {bpb:.4f}")
        log({"step": step, "val_bpb": bpb})
        return bpb

    t_train, tokens_seen, smooth, val_bpb = 0.0, 0, None, None
    step = start_step
    x, y = loader.next_batch() if step < num_steps else (None, None)  # each step finds its first micro-batch ready
    while True:
        last = step == num_steps
        if (args.eval_every > 0 and step % args.eval_every == 0) or last:
            val_bpb = evaluate(step)
        if rank == 0 and args.sample_every > 0 and (step % args.sample_every == 0 or last) and step > 0:
            sample(model, tokenizer)
        if last:
            break
        t0 = time.perf_counter()
        mult = warmup_stable_decay(step, num_steps, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * mult
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step, num_steps, warmdown_ratio=args.warmdown_ratio)
                group["weight_decay"] = group["initial_weight_decay"] * cosine_decay(step, num_steps)
        loss_sum = torch.zeros((), device=device)
        for k in range(grad_accum):
            if k:
                x, y = loader.next_batch()  # packed while the GPU runs the previous backward
            with autocast():
                loss = fwd(x, y)
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
        saving = (args.save_every > 0 and (step + 1) % args.save_every == 0) or step + 1 == num_steps
        # a checkpoint resumes from the loader as it is now, before it hands out the next step's first batch
        loader_state = loader.state_dict() if saving else None
        if step + 1 < num_steps:
            # that batch is packed, and its copy to the GPU started, while the GPU still runs this step's
            # backward, rather than after the host has waited for this step's loss (below)
            x, y = loader.next_batch()
        optimizer.step()  # averages the gradients across ranks, then updates (sharded, see optim.py)
        model.zero_grad(set_to_none=True)
        if ddp:
            torch.distributed.all_reduce(loss_sum)  # SUM: gloo has no AVG
            loss_sum /= world
        loss_val = (loss_sum / grad_accum).item()
        dt = time.perf_counter() - t0
        step += 1
        if step > start_step + 1:  # the first step pays for compilation and warm-up
            t_train += dt
            tokens_seen += total_batch
        if step == start_step + 1:
            # warm-up done (compilation, first allocations): what lives now (model, optimizer, compiled code,
            # data buffers) lives to the end, so the GC stops scanning it (freeze), and stops interrupting
            # steps at random (disable: one rank's pause stalls all ranks); the steps make almost no cyclic
            # garbage, and a collection every GC_EVERY steps bounds what they make
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % GC_EVERY == 0:
            gc.collect()
        smooth = loss_val if smooth is None else 0.9 * smooth + 0.1 * loss_val
        tps = total_batch / dt
        mfu = flops_per_step / dt / peak
        log({"step": step, "loss": loss_val, "lr_mult": mult, "tok_per_sec": tps, "mfu": mfu, "dt": dt})
        if step % args.log_every == 0 or step == num_steps:
            avg = t_train / max(1, step - start_step - 1)
            print0(f"step {step:05d}/{num_steps} | loss {loss_val:.4f} (avg {smooth:.4f}) | lr x{mult:.2f} | "
                   f"{tps:,.0f} tok/s | MFU {100 * mfu:.1f}% | {dt * 1000:.0f} ms | "
                   f"ETA {format_duration(avg * (num_steps - step)) if step > start_step + 1 else '?'}")
        if saving:
            save(out, step, model, optimizer, loader_state=loader_state, tokenizer=tokenizer, args=args,
                 val_bpb=val_bpb, keep=args.keep,
                 extra={"device_batch_size": B, "num_streams": st.num_streams})

    if rank == 0:
        summary = checkpoint.StageSummary(
            stage="base", step=num_steps, val_bpb=val_bpb, num_params=model.num_params(),
            scaling_params=model.num_scaling_params(), tokens=num_steps * total_batch, train_seconds=t_train,
            tokens_per_sec=tokens_seen / t_train if t_train else None,
            mfu=(model.flops_per_token() * tokens_seen / t_train / peak) if t_train else None,
            flops_per_token=model.flops_per_token(), config=checkpoint.config_to_dict(st.config), device=str(device),
            world_size=world, device_batch_size=B, grad_accum=grad_accum,
            peak_memory_mb=torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
            args=vars_json(args))
        atomic_write_json(out / "summary.json", summary)
        print0(f"done: {num_steps} steps, validation bpb {val_bpb:.4f}, checkpoint in {out}")
    if ddp:
        torch.distributed.destroy_process_group()
    return 0


def save(out, step, model, optimizer, *, loader_state, tokenizer, args, val_bpb, keep=2, extra=None):
    checkpoint.save_checkpoint(out, step, model, optimizer,
                               rank_state={"loader": loader_state, "rng": torch.get_rng_state()},
                               meta={"stage": "base", "val_bpb": val_bpb, "args": vars_json(args), **(extra or {})},
                               tokenizer=tokenizer, keep=keep)


SAMPLE_PROMPTS = ["The capital of France is", "Once upon a time,", "2 + 3 =", "The opposite of hot is"]


def sample(model, tokenizer):
    """Greedy completions of a few prompts, printed: a quick look at the model during training."""
    engine = Engine(model, tokenizer, tool=False)
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend_bos=True)
        seqs, _ = engine.generate_batch(ids, max_tokens=16, temperature=0.0)
        out = [t for t in seqs[0][len(ids):] if t not in engine.stop_ids]
        print0(f"  {prompt!r} -> {tokenizer.decode(out)!r}")
