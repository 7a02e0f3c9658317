"""`picochat rl`: on-policy reinforcement learning on word problems (GSM8K, or the demo curriculum's).

Each step takes a few training problems; for each, one batched engine call samples a group of replies with
the Python tool live. A reply earns reward 1 if it ends (<|assistant_end|>) and its final answer ('#### N') is
right. Its advantage is the
reward minus the group's mean (optionally divided by the group's std), and the loss is
    -sum_t A * log p(token_t)  over sampled tokens only (prompt and tool-output tokens are masked),
divided by the number of sampled tokens in the step. Options: several updates per batch with PPO's clipped
ratio (--ppo-epochs, --clip) and a KL penalty to the starting model (--kl-coef, the k3 estimator).

Every term is a weighted sum of token log-probs with weights that need no gradient, so one weighted
cross-entropy pass (model(x, y, loss_weights=w, reduction="sum")) computes it; replies whose advantage is
zero carry no gradient and are left out of that pass unless the KL term needs them.

Held-apart problems measure greedy accuracy and pass@k along the way. Sampling seeds derive from (--seed,
step, problem), so --resume continues exactly.
"""
import argparse
import json
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from picochat.common import (UserError, autocast_for, home_dir, init_runtime, print0, atomic_write_json,
                             format_duration, metrics_logger, vars_json)
from picochat.optim import build_optimizer, warmup_linear_decay
from picochat import checkpoint, fastpath
from picochat.checkpoint import load_start
from picochat.replies import follows_format, greedy_replies, pass_at_k, reply_text
from picochat.tracking import add_log_to_arg, tracker
from picochat.sandbox import describe_sandbox
from picochat.tasks import gsm8k
from picochat.tasks import demo as demo_tasks

STAGE = "rl"


# ---- problems ----------------------------------------------------------------------------------------------------
def load_problems(task, demo_data="", holdout=500):
    """(train problems, held-apart problems) for --task demo|gsm8k. GSM8K without its test split holds apart
    the last `holdout` training problems instead."""
    if task == "demo":
        folder = demo_tasks.root(demo_data or None)
        return demo_tasks.word_problems("train", folder), demo_tasks.word_problems("test", folder)
    if task == "gsm8k":
        train = gsm8k.load("train")
        if gsm8k.available("test"):
            return train, gsm8k.load("test")
        if len(train) <= holdout:
            raise UserError(f"GSM8K train has {len(train)} problems and there is no test split to measure on")
        print0(f"note: no GSM8K test split; holding apart the last {holdout} training problems")
        return train[:-holdout], train[-holdout:]
    raise UserError(f"--task must be demo or gsm8k, got {task!r}")


def problem_order(n, step, per_step, seed):
    """Indices of the problems of a step: a fresh deterministic shuffle per pass over the n problems."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, n)
        perm = list(range(n))
        random.Random(f"rl-{seed}-{epoch}").shuffle(perm)
        out.append(perm[pos])
    return out


def sample_seed(seed, step, problem):
    return (seed * 1_000_003 + step * 10_007 + problem) % (2 ** 31)


# ---- the policy-gradient pieces ------------------------------------------------------------------------------------
def advantages(rewards, std_norm=False, eps=1e-6):
    """Reward minus the group mean; with std_norm divided by the group's std (a group whose rewards are all
    equal has advantage 0 either way)."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    a = r - r.mean()
    if std_norm and len(r) > 1:
        a = a / (r.std() + eps)
    return a


def pack_sequences(seqs, masks, pad_id):
    """Token sequences + sampled-token masks -> x (B, T), y (B, T) with y = -1 where the next token was not
    sampled by the policy (prompt, tool output, padding)."""
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for b, (s, m) in enumerate(zip(seqs, masks)):
        s, m = torch.tensor(s, dtype=torch.long), torch.tensor(m, dtype=torch.bool)
        x[b, :len(s) - 1] = s[:-1]
        y[b, :len(s) - 1] = torch.where(m[1:], s[1:], torch.full_like(s[1:], -1))
    return x, y


@torch.no_grad()
def token_logprobs(model, x, y, autocast):
    """log p(y_t | x_<=t) per position (0 where y = -1)."""
    with autocast():
        return -model(x, y, reduction="none").float()


def pg_weights(adv, y, n_tokens, *, logp=None, logp_old=None, logp_ref=None, clip=0.2, kl_coef=0.0):
    """Per-token weights w on the cross-entropy (-log p) whose weighted sum has the gradient of
        (1/N) sum_t [ -min(r_t A, clip(r_t) A) + kl_coef * k3_t ],  r_t = p/p_old,  k3 = e^(ref-logp) - (ref-logp) - 1
    The PPO term's gradient is -A r_t grad(log p) where the clip is inactive, else 0; the k3 term's is
    (1 - e^(ref - log p)) grad(log p). Without logp/logp_old, r = 1 (the first, on-policy update).
    Returns (weights (B, T), fraction of sampled tokens clipped)."""
    valid = (y >= 0).float()
    A = adv[:, None].expand_as(valid)
    w = A.clone()
    clipped = torch.zeros_like(valid)
    if logp is not None and logp_old is not None:
        ratio = torch.exp(logp - logp_old)
        clipped = ((A > 0) & (ratio > 1 + clip)) | ((A < 0) & (ratio < 1 - clip))
        w = torch.where(clipped, torch.zeros_like(w), A * ratio)
        clipped = clipped.float()
    if kl_coef:
        assert logp is not None and logp_ref is not None
        w = w - kl_coef * (1.0 - torch.exp(logp_ref - logp))
    frac = float((clipped * valid).sum() / valid.sum().clamp(min=1))
    return w * valid / max(1, n_tokens), frac


def kl_k3(logp, logp_ref, y):
    """Mean over sampled tokens of the k3 estimate of KL(policy || reference)."""
    valid = (y >= 0).float()
    d = logp_ref - logp
    return float(((torch.exp(d) - d - 1) * valid).sum() / valid.sum().clamp(min=1))


def policy_update(model, optimizer, seqs, masks, adv, *, pad_id, n_tokens, device, autocast=nullcontext,
                  device_batch_size=32, ppo_epochs=1, clip=0.2, kl_coef=0.0, ref_model=None):
    """The policy-gradient update(s) for one batch of sampled replies: seqs (prompt + reply tokens), masks
    (1 on sampled tokens), adv (one advantage per reply), n_tokens (the normaliser: sampled tokens in the step,
    divided by the rank count under DDP). One optimizer step per PPO epoch. Returns stats."""
    keep = [j for j in range(len(seqs)) if adv[j] != 0 or kl_coef]
    keep.sort(key=lambda j: len(seqs[j]))  # similar lengths share a micro-batch: less padding
    batches = []
    for i in range(0, len(keep), device_batch_size):
        sel = keep[i:i + device_batch_size]
        x, y = pack_sequences([seqs[j] for j in sel], [masks[j] for j in sel], pad_id)
        batches.append((x.to(device), y.to(device), adv[sel].to(device)))
    need_old = ppo_epochs > 1 or kl_coef
    old = [token_logprobs(model, x, y, autocast) for x, y, _ in batches] if need_old else None
    ref = [token_logprobs(ref_model, x, y, autocast) for x, y, _ in batches] if kl_coef else None
    clip_fracs, kls = [], []
    for epoch in range(ppo_epochs):
        for b, (x, y, a) in enumerate(batches):
            logp = logp_old = None
            if need_old:
                logp_old = old[b]
                logp = logp_old if epoch == 0 else token_logprobs(model, x, y, autocast)
            w, frac = pg_weights(a, y, n_tokens, logp=logp, logp_old=logp_old, logp_ref=ref[b] if ref else None,
                                 clip=clip, kl_coef=kl_coef)
            if epoch > 0:
                clip_fracs.append(frac)
            if ref:
                kls.append(kl_k3(logp, ref[b], y))
            with autocast():
                loss = model(x, y, loss_weights=w, reduction="sum")
            loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    stats = {"trained": len(keep)}
    if clip_fracs:
        stats["clip_frac"] = sum(clip_fracs) / len(clip_fracs)
    if kls:
        stats["kl"] = sum(kls) / len(kls)
    return stats


# ---- evaluation --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(engine, model, tokenizer, problems, max_tokens, *, greedy=True, k=0, samples=0, temperature=1.0,
             top_k=None, seed=0, autocast=nullcontext):
    """Greedy accuracy and format compliance on problems (decoded together by the engine's scheduler); with k,
    also pass@k and sampled pass@1 from `samples` replies to each (one batched call per problem)."""
    was_training = model.training
    model.eval()
    res = {}
    with autocast():
        if greedy:
            replies = greedy_replies(model, tokenizer, [gsm8k.prompt(it) for it in problems], max_tokens)
            res["accuracy"] = sum(gsm8k.check(it, reply_text(tokenizer, r)) for it, r in zip(problems, replies)) / \
                max(1, len(problems))
            res["format"] = sum(follows_format(tokenizer, r) for r in replies) / max(1, len(problems))
        if k:
            passk, p1 = [], []
            for i, item in enumerate(problems):
                ids = tokenizer.render_for_completion(gsm8k.prompt(item))
                room = min(max_tokens, model.config.sequence_len - len(ids))
                c = 0
                if room >= 1:
                    seqs, _ = engine.generate_batch(ids, num_samples=samples, max_tokens=room, temperature=temperature,
                                                    top_k=top_k, seed=sample_seed(seed, -1, i))
                    c = sum(gsm8k.check(item, reply_text(tokenizer, s[len(ids):])) for s in seqs)
                passk.append(pass_at_k(samples, c, k))
                p1.append(c / samples)
            res[f"pass@{k}"] = sum(passk) / max(1, len(passk))
            res["pass@1"] = sum(p1) / max(1, len(p1))
    model.train(was_training)
    return res


# ---- CLI -----------------------------------------------------------------------------------------------------------
def add_parser(sub):
    p = sub.add_parser("rl", help="reinforcement learning on word problems (group policy gradient)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="default", help="run name: reads runs/<run>/sft, writes runs/<run>/rl")
    p.add_argument("--source", default="", help="starting checkpoint folder (default runs/<run>/sft)")
    p.add_argument("--out", default="", help="output folder (default runs/<run>/rl)")
    p.add_argument("--tokenizer", default="", help="tokenizer folder (default runs/<run>/tokenizer, else the source's)")
    p.add_argument("--task", default="demo", choices=("demo", "gsm8k"), help="which word problems")
    p.add_argument("--demo-data", default="", help="demo curriculum folder (default $PICOCHAT_HOME/data/demo)")
    g = p.add_argument_group("sampling")
    g.add_argument("--num-steps", type=int, default=60, help="optimizer steps (each a fresh batch of problems)")
    g.add_argument("--prompts-per-step", type=int, default=8, help="problems per step (over all ranks)")
    g.add_argument("--num-samples", type=int, default=16, help="replies sampled per problem (the group)")
    g.add_argument("--max-tokens", type=int, default=192, help="reply length limit")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50)
    g = p.add_argument_group("objective")
    g.add_argument("--std-norm", action="store_true", help="divide advantages by the group's reward std (GRPO)")
    g.add_argument("--ppo-epochs", type=int, default=1, help="updates per batch of samples (>1 uses the clipped ratio)")
    g.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip epsilon")
    g.add_argument("--kl-coef", type=float, default=0.0, help="weight of the KL penalty to the starting model")
    g = p.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=fastpath.batch_size_arg, default="auto",
                   help="sequences per forward/backward, or auto: the largest that fits at the model's context "
                        "length (on a GPU probed with a real forward and backward, elsewhere from a memory "
                        "estimate, up to 32); the update does not depend on it")
    g.add_argument("--matrix-lr", type=float, default=0.02)
    g.add_argument("--embedding-lr", type=float, default=0.2)
    g.add_argument("--unembedding-lr", type=float, default=0.004)
    g.add_argument("--scalar-lr", type=float, default=0.1)
    g.add_argument("--init-lr-frac", type=float, default=0.05, help="all LRs are multiplied by this (Muon's "
                   "update has a fixed size however small the gradient: at 0.2 the demo's RL unlearns its SFT)")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="LR decays linearly to this fraction")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=20,
                   help="greedy accuracy and pass@k every N steps (0: start and end)")
    g.add_argument("--eval-problems", type=int, default=200,
                   help="held-apart problems for greedy accuracy along the way")
    g.add_argument("--final-eval-problems", type=int, default=500, help="held-apart problems at the start and the end")
    g.add_argument("--pass-k", type=int, default=8, help="k of pass@k (0: off)")
    g.add_argument("--pass-problems", type=int, default=50, help="held-apart problems for pass@k")
    g.add_argument("--save-every", type=int, default=20,
                   help="checkpoint every N steps and at the end (0: at the end only)")
    g.add_argument("--keep", type=int, default=2)
    g.add_argument("--resume", action="store_true", help="continue the RL run in --out exactly")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="")
    g.add_argument("--seed", type=int, default=0)
    add_log_to_arg(g)
    p.set_defaults(func=run)


def sample_groups(engine, tokenizer, problems, idx, *, step, args, model):
    """One batched engine call per problem: (sequences, sampled-token masks, rewards, group ids)."""
    seqs, masks, rewards, groups = [], [], [], []
    for g, i in enumerate(idx):
        item = problems[i]
        ids = tokenizer.render_for_completion(gsm8k.prompt(item))
        room = min(args.max_tokens, model.config.sequence_len - len(ids))
        if room < 1:
            continue
        s, m = engine.generate_batch(ids, num_samples=args.num_samples, max_tokens=room,
                                     temperature=args.temperature, top_k=args.top_k or None,
                                     seed=sample_seed(args.seed, step, i))
        for si, mi in zip(s, m):
            seqs.append(list(si))
            masks.append(list(mi))
            rewards.append(reward(tokenizer, item, si[len(ids):]))
            groups.append(g)
    return seqs, masks, rewards, groups


def reward(tokenizer, item, completion):
    """1 for a reply that ends (<|assistant_end|>) with the right final answer, else 0. A reply cut off at the
    length limit earns nothing even if its answer is in it: otherwise RL would unlearn ending replies."""
    ended = bool(completion) and completion[-1] == tokenizer.special("<|assistant_end|>")
    return float(ended and gsm8k.check(item, reply_text(tokenizer, completion)))


def group_advantages(rewards, groups, std_norm):
    adv = torch.zeros(len(rewards))
    for g in sorted(set(groups)):
        sel = [j for j, gg in enumerate(groups) if gg == g]
        adv[sel] = advantages([rewards[j] for j in sel], std_norm)
    return adv


def _held_eval(step, n_problems, *, engine, model, tokenizer, held, args, autocast, rank, ddp, log):
    """Rank 0 scores the first n_problems held-apart problems greedily (and pass@k on --pass-problems when
    --pass-k), prints the record and logs it; the other ranks wait for it. Returns the record ({"step": step} on
    the other ranks)."""
    rec = {"step": step}
    if rank == 0:
        t = time.perf_counter()
        rec.update(evaluate(engine, model, tokenizer, held[:n_problems], args.max_tokens, greedy=True,
                            autocast=autocast))
        if args.pass_k:
            rec.update(evaluate(engine, model, tokenizer, held[:args.pass_problems], args.max_tokens, greedy=False,
                                k=args.pass_k, samples=max(args.pass_k, args.num_samples),
                                temperature=args.temperature, top_k=args.top_k or None, seed=args.seed,
                                autocast=autocast))
        rec["eval_problems"] = min(n_problems, len(held))
        rec["eval_seconds"] = time.perf_counter() - t
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in rec.items() if k != "step"))
        log(rec)
    if ddp:
        dist.barrier()
    return rec


def _write_summary(out, *, args, step, t_train, last_eval, device, world):
    """summary.json (rank 0's): the held-apart scores at the start (start_eval.json) and at the end, and the
    run's facts; then the closing line."""
    start = json.loads((out / "start_eval.json").read_text()) if (out / "start_eval.json").exists() else {}
    end = last_eval or {}
    pass_key = f"pass@{args.pass_k}"
    summary = checkpoint.StageSummary(
        stage=STAGE, task=args.task, step=step, train_seconds=t_train, accuracy=end.get("accuracy"),
        start_accuracy=start.get("accuracy"), pass_k=args.pass_k, pass_at_k=end.get(pass_key),
        start_pass_at_k=start.get(pass_key), format_compliance=end.get("format"),
        eval_problems=end.get("eval_problems"), eval=end, start_eval=start, args=vars_json(args), device=str(device),
        world_size=world)
    atomic_write_json(out / "summary.json", summary)
    print0(f"done: {step} steps in {format_duration(t_train)}; held-apart greedy accuracy "
           f"{start.get('accuracy', float('nan')):.3f} -> {end.get('accuracy', float('nan')):.3f}; checkpoint in {out}")


def run(args):
    out = Path(args.out) if args.out else home_dir() / "runs" / args.run / STAGE
    with checkpoint.stage_lock(out):  # for the whole run: a second run writing to out stops at once
        return _run(args, out)


def _run(args, out):
    ddp, rank, local_rank, world, device = init_runtime(args.device)
    run_dir = home_dir() / "runs" / args.run
    source = Path(args.source) if args.source else run_dir / "sft"
    tok_dir = Path(args.tokenizer) if args.tokenizer else run_dir / "tokenizer"
    if args.prompts_per_step % world:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} ranks")
    if args.num_samples < 2:
        raise UserError("--num-samples must be at least 2 (the advantage compares replies within a group)")
    train, held = load_problems(args.task, args.demo_data)  # bad data fails before the model is loaded
    resuming = args.resume and checkpoint.latest_step(out) is not None
    model, tokenizer, start_meta = load_start(out if resuming else source, tok_dir, device,
                                              "RL" if resuming else "SFT")
    ref_model = None
    if args.kl_coef:
        ref_model, _, _ = load_start(source, tok_dir, device, "SFT")
        ref_model.eval().requires_grad_(False)
    autocast = autocast_for(device)
    print0(f"task {args.task}: {len(train):,} training problems, {len(held):,} held apart | "
           f"{args.prompts_per_step} problems x {args.num_samples} samples per step, {args.num_steps} steps")

    from picochat.engine import Engine
    engine = Engine(model, tokenizer, tool=True)
    print0(describe_sandbox())
    lrs = dict(matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr,
               scalar_lr=args.scalar_lr)
    optimizer = build_optimizer(model, **{k: v * args.init_lr_frac for k, v in lrs.items()})
    if args.device_batch_size == "auto":
        # sized for full-context rows (replies are shorter), out of a step's replies on this rank
        rows = args.prompts_per_step // world * args.num_samples
        args.device_batch_size, how = fastpath.find_device_batch_size(model, optimizer, model.config.sequence_len,
                                                                      rows_per_rank=rows, device=device,
                                                                      autocast=autocast)
        print0(f"micro-batches of up to {args.device_batch_size} replies ({how})")
    step = checkpoint.resume_finetune(out, start_meta, STAGE, optimizer) if resuming else 0
    mirror = tracker(args.log_to, out=out, run=args.run, stage=STAGE, config=vars_json(args),
                     step=step, rank=rank)
    log = metrics_logger(out / "metrics.jsonl", step, rank, mirror=mirror)

    def run_eval(step, n_problems):
        return _held_eval(step, n_problems, engine=engine, model=model, tokenizer=tokenizer, held=held, args=args,
                          autocast=autocast, rank=rank, ddp=ddp, log=log)

    model.train()
    if step == 0:
        rec = run_eval(0, args.final_eval_problems)
        if rank == 0:
            atomic_write_json(out / "start_eval.json", rec)
    t_train, last_eval, first_step = 0.0, None, step
    while step < args.num_steps:
        t0 = time.perf_counter()
        mult = warmup_linear_decay(step, args.num_steps, final_frac=args.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * mult
        idx = problem_order(len(train), step, args.prompts_per_step, args.seed)[rank::world]
        model.eval()
        with autocast():
            seqs, masks, rewards, groups = sample_groups(engine, tokenizer, train, idx, step=step, args=args,
                                                         model=model)
        model.train()
        t_sample = time.perf_counter() - t0
        adv = group_advantages(rewards, groups, args.std_norm)
        n_tokens = torch.tensor(float(sum(sum(m) for m in masks)), device=device)
        if ddp:  # normalise by the sampled tokens of all ranks (the optimizer then averages over ranks)
            dist.all_reduce(n_tokens)
        # replies with zero advantage carry no policy gradient; they matter only to the KL term
        upd = policy_update(model, optimizer, seqs, masks, adv, pad_id=tokenizer.bos_id,
                            n_tokens=float(n_tokens) / world, device=device, autocast=autocast,
                            device_batch_size=args.device_batch_size, ppo_epochs=args.ppo_epochs, clip=args.clip,
                            kl_coef=args.kl_coef, ref_model=ref_model)
        dt = time.perf_counter() - t0
        t_train += dt
        step += 1
        r = torch.tensor(rewards) if rewards else torch.zeros(1)
        stats = torch.tensor([float(r.sum()), float(len(rewards)), float(upd["trained"])], device=device)
        if ddp:
            dist.all_reduce(stats)
        rec = {"step": step, "reward": float(stats[0] / stats[1].clamp(min=1)), "trained_replies": int(stats[2]),
               "sampled_tokens": int(n_tokens), "lr_mult": mult, "dt": dt, "sample_seconds": t_sample,
               "reply_tokens": float(n_tokens) / max(1.0, float(stats[1]))}
        rec.update({k: v for k, v in upd.items() if k != "trained"})
        log(rec)
        print0(f"step {step:05d}/{args.num_steps} | reward {rec['reward']:.3f} | trained on {rec['trained_replies']} "
               f"replies | {rec['reply_tokens']:.0f} tokens/reply | sample {t_sample:.1f}s, total {dt:.1f}s | "
               f"ETA {format_duration(t_train / (step - first_step) * (args.num_steps - step))}")
        last = step == args.num_steps
        if last:
            last_eval = run_eval(step, args.final_eval_problems)
        elif args.eval_every > 0 and step % args.eval_every == 0:
            last_eval = run_eval(step, args.eval_problems)
        if (args.save_every > 0 and step % args.save_every == 0) or last:
            checkpoint.save_checkpoint(out, step, model, optimizer, rank_state={"rng": torch.get_rng_state()},
                                       meta={"stage": STAGE, "source": str(source), "args": vars_json(args),
                                             "accuracy": (last_eval or {}).get("accuracy")},
                                       tokenizer=tokenizer, keep=args.keep)

    if rank == 0:
        _write_summary(out, args=args, step=step, t_train=t_train, last_eval=last_eval, device=device, world=world)
    if ddp:
        dist.destroy_process_group()
    return 0

