"""CORE (DCLM): in-context evaluation of a base model over the 22 tasks of the eval bundle.

Each item becomes one or more token sequences with a continuation span [start, end):
  multiple_choice   same context, one sequence per choice; pick the lowest mean loss over the continuation
  schema            one context per option, same continuation; pick the lowest mean continuation loss
  language_modeling one sequence; right iff greedy argmax reproduces every continuation token
Few-shot examples come before the item ("\\n\\n" between examples), drawn with a fixed seed per item and
never the item itself. A task's accuracy is centered, (acc - b) / (1 - b) with b its random baseline, and
CORE is the mean over the tasks scored. Tasks whose data file is missing are skipped and the score says over
how many tasks it is ("CORE (20/22 tasks)"), because such a score is not comparable with a full one.

Scoring is batched: items are sorted by length and padded on the right into batches under a token budget,
and only the positions that predict continuation tokens go through the vocabulary projection (a position
mask picks them; right padding needs no attention mask, as causal attention never looks right). The
sequences of one item share a long prefix (the few-shot examples and the query: 63% of all tokens over the
bundle), so that prefix runs once per item into a KV cache, which is then replicated to the item's sequences
and only their remainders run (score_shared).
"""
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.distributed as dist

from picochat.common import UserError, print0
from picochat.shards import read_jsonl
from picochat.decode import InferenceModel, StaticCache, softcap

FEWSHOT_SEED = 1234    # item i draws its examples with random.Random(FEWSHOT_SEED + i)
SUBSAMPLE_SEED = 1337  # --max-per-task takes the first N items of a fixed shuffle
EXAMPLE_SEP = "\n\n"


# ---- the bundle ---------------------------------------------------------------------------------------------
def read_core_bundle(folder):
    """The CORE eval bundle -> one dict per task of core.yaml: label, type (multiple_choice | schema |
    language_modeling), num_fewshot, continuation_delimiter (default ' '), has_categories, path of its jsonl,
    missing (True if that file is absent: score over the rest and say so) and random_baseline (a fraction:
    eval_meta_data.csv gives percent)."""
    import csv
    import yaml
    folder = Path(folder)
    if not (folder / "core.yaml").is_file():
        raise UserError(f"{folder}: no core.yaml: not a CORE eval bundle (run `picochat data download --what eval`)")
    try:
        tasks = yaml.safe_load((folder / "core.yaml").read_text())["icl_tasks"]
    except Exception as e:
        raise UserError(f"{folder / 'core.yaml'}: not the expected YAML with an icl_tasks list ({e})") from None
    baselines = {}
    with open(folder / "eval_meta_data.csv", newline="") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"]) / 100
    out = []
    for t in tasks:
        shots = t.get("num_fewshot", [0])
        path = folder / "eval_data" / t["dataset_uri"]
        out.append({"label": t["label"], "type": t["icl_task_type"],
                    "num_fewshot": int(shots[0] if isinstance(shots, list) else shots),
                    "continuation_delimiter": t.get("continuation_delimiter", " "),
                    "has_categories": bool(t.get("has_categories", False)),
                    "path": path, "missing": not path.is_file(),
                    "random_baseline": baselines.get(t["label"], 0.0)})
    return out


def read_core_task(path):
    """Rows of one CORE task file (query/choices/gold, context_options/continuation/gold, or
    context/continuation)."""
    return read_jsonl(path)


# ---- prompts ----------------------------------------------------------------------------------------------
def fewshot_indices(n, idx, k, seed=FEWSHOT_SEED):
    """k distinct indices in range(n), never idx, the same for the same (n, idx, k)."""
    k = min(k, n - 1)
    if k <= 0:
        return []
    rng = random.Random(seed + idx)
    return [j + (j >= idx) for j in rng.sample(range(n - 1), k)]  # sample n-1 slots, skip over idx


def render_mc(item, delim, shots=()):
    """One prompt per choice: the examples (with their gold answers), then the query and that choice."""
    prefix = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}{EXAMPLE_SEP}" for ex in shots)
    return [f"{prefix}{item['query']}{delim}{choice}" for choice in item["choices"]]


def render_schema(item, delim, shots=()):
    """One prompt per context option, all ending in the same continuation."""
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}{EXAMPLE_SEP}" for ex in shots)
    return [f"{prefix}{ctx}{delim}{item['continuation']}" for ctx in item["context_options"]]


def render_lm(item, delim, shots=()):
    """(prompt, prompt + continuation). The prompt is stripped at its end, so that a delimiter's trailing
    space tokenizes with the continuation's first word, as it does in the full text."""
    prefix = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}{EXAMPLE_SEP}" for ex in shots)
    full = f"{prefix}{item['context'].strip()}{delim}{item['continuation']}"
    return f"{prefix}{item['context'].strip()}{delim}".strip(), full


def _common_prefix(seqs):
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _common_suffix(seqs):
    return _common_prefix([s[::-1] for s in seqs])


def _crop(ids, start, end, max_len):
    """Keep the last max_len tokens (the continuation is at the end). Position 0 cannot be predicted, so a
    continuation always starts at >= 1."""
    if len(ids) > max_len:
        cut = len(ids) - max_len
        ids, start, end = ids[cut:], start - cut, end - cut
    return ids, max(start, 1), end


def build_requests(tokenizer, task_type, item, shots, *, delim, max_len):
    """(sequences, gold): sequences is a list of (ids, start, end) with the continuation at ids[start:end].
    gold is the index of the right sequence (multiple choice, schema), or None (language modelling)."""
    bos = tokenizer.bos_id
    if task_type == "multiple_choice":
        seqs = [[bos] + tokenizer.encode(p) for p in render_mc(item, delim, shots)]
        start = _common_prefix(seqs)
        spans = [(s, min(start, len(s) - 1), len(s)) for s in seqs]
        gold = item["gold"]
    elif task_type == "schema":
        seqs = [[bos] + tokenizer.encode(p) for p in render_schema(item, delim, shots)]
        suffix = _common_suffix(seqs)
        spans = [(s, max(1, len(s) - suffix), len(s)) for s in seqs]
        gold = item["gold"]
    elif task_type == "language_modeling":
        prompt, full = render_lm(item, delim, shots)
        p_ids, f_ids = [bos] + tokenizer.encode(prompt), [bos] + tokenizer.encode(full)
        start = _common_prefix([p_ids, f_ids])  # == len(p_ids) unless a token straddles the boundary
        spans = [(f_ids, min(start, len(f_ids) - 1), len(f_ids))]
        gold = None
    else:
        raise ValueError(f"unknown CORE task type {task_type!r}")
    return [_crop(ids, s, e, max_len) for ids, s, e in spans], gold


def item_requests(tokenizer, task, rows, idx, max_len):
    shots = [rows[j] for j in fewshot_indices(len(rows), idx, task["num_fewshot"])]
    return build_requests(tokenizer, task["type"], rows[idx], shots, delim=task["continuation_delimiter"],
                          max_len=max_len)


# ---- scoring ----------------------------------------------------------------------------------------------
@torch.no_grad()
def score_batch(net, seqs, head_chunk=2048):
    """Per sequence (ids, start, end): (mean loss over the continuation, greedy argmax reproduces it).
    One causal forward pass over the right-padded batch; the head runs only at continuation positions.
    net is the model's inference layout (picochat.decode.InferenceModel)."""
    T = max(len(ids) for ids, _, _ in seqs)
    x = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)  # positions whose next token is a continuation token
    for r, (ids, start, end) in enumerate(seqs):
        x[r, :len(ids)] = torch.tensor(ids)
        mask[r, start - 1:end - 1] = True
    targets = torch.roll(x, -1, dims=1)[mask].to(net.device)
    h = net.hidden(x.to(net.device))
    return _per_sequence(seqs, *_continuation_scores(net, h, mask, targets, head_chunk))


def _continuation_scores(net, h, mask, targets, head_chunk):
    """(loss, hit) per masked position of h (B, T, C), in row-major order."""
    rows, cols = mask.nonzero(as_tuple=True)
    h = h[rows.to(h.device), cols.to(h.device)]
    losses, hits = [], []
    for s in range(0, h.shape[0], head_chunk):
        logits = softcap(net.logits(h[s:s + head_chunk]), net.config.softcap)
        losses.append(F.cross_entropy(logits, targets[s:s + head_chunk], reduction="none"))
        hits.append(logits.argmax(-1) == targets[s:s + head_chunk])
    return torch.cat(losses).float().cpu(), torch.cat(hits).cpu()


def _per_sequence(seqs, losses, hits):
    counts = torch.tensor([end - start for _, start, end in seqs])
    seg = torch.repeat_interleave(torch.arange(len(seqs)), counts)
    loss_sum = torch.zeros(len(seqs)).index_add_(0, seg, losses)
    miss = torch.zeros(len(seqs)).index_add_(0, seg, (~hits).float())
    return [(float(loss / count), bool(missed == 0)) for loss, missed, count in zip(loss_sum, miss, counts)]


def shared_prefix(seqs):
    """Tokens of an item's sequences that can run once for all of them: their common prefix, stopping before
    the first position whose output is scored."""
    return max(0, min(_common_prefix([ids for ids, _, _ in seqs]), min(s for _, s, _ in seqs) - 1))


@torch.no_grad()
def score_shared(net, groups, head_chunk=2048):
    """Like score_batch, for groups of sequences (one group per item): each group's shared prefix runs once
    (a causal pass, one row per group) into a KV cache, the cache rows are copied to the group's sequences,
    and the remainders run in one pass on top, each row from its own position. Returns the (mean loss,
    exact) of every sequence, group by group."""
    qs = [shared_prefix(seqs) for seqs in groups]
    flat = [(g, seq) for g, seqs in enumerate(groups) for seq in seqs]
    Q = max(qs)
    R = max(len(ids) - qs[g] for g, (ids, _, _) in flat)
    rest = torch.zeros((len(flat), R), dtype=torch.long)
    mask = torch.zeros((len(flat), R), dtype=torch.bool)
    targets = []
    for r, (g, (ids, start, end)) in enumerate(flat):
        q = qs[g]
        rest[r, :len(ids) - q] = torch.tensor(ids[q:])
        mask[r, start - 1 - q:end - 1 - q] = True
        targets += ids[start:end]
    targets = torch.tensor(targets, device=net.device)
    cache = StaticCache(net.config, len(groups), Q + R, net.device, net.dtype)
    if Q > 0:
        prefix = torch.zeros((len(groups), Q), dtype=torch.long)
        for g, seqs in enumerate(groups):
            prefix[g, :qs[g]] = torch.tensor(seqs[0][0][:qs[g]])
        net.hidden(prefix.to(net.device), cache, slice(0, len(groups)), [0] * len(groups))  # nothing here is scored
    # one cache row per sequence (a group's sequences are consecutive); the remainders overwrite the padding
    counts = torch.tensor([len(seqs) for seqs in groups], device=net.device)
    cache.k = [t.repeat_interleave(counts, dim=0) for t in cache.k]
    cache.v = [t.repeat_interleave(counts, dim=0) for t in cache.v]
    cache.lens = [qs[g] for g, _ in flat]
    # each row's token before its remainder (a model with a smear reads it): its prefix's last one
    cache.prev = torch.tensor([ids[qs[g] - 1] if qs[g] else 0 for g, (ids, _, _) in flat], device=net.device)
    h = net.hidden(rest.to(net.device), cache, slice(0, len(flat)), [qs[g] for g, _ in flat])
    return _per_sequence([seq for _, seq in flat], *_continuation_scores(net, h, mask, targets, head_chunk))


def make_group_batches(groups, batch_tokens, max_len, max_rows=256):
    """Group indices in batches for score_shared, longest first: rows x (prefix + remainder) within
    batch_tokens, and every row's prefix + the longest remainder within the model's context."""
    info = []
    for seqs in groups:
        q = shared_prefix(seqs)
        info.append((q, max(len(ids) for ids, _, _ in seqs) - q, len(seqs)))
    order = sorted(range(len(groups)), key=lambda i: -(info[i][0] + info[i][1]))
    batches, cur, Q, R, rows = [], [], 0, 0, 0
    for i in order:
        q, r, n = info[i]
        Q2, R2, rows2 = max(Q, q), max(R, r), rows + n
        fits = rows2 * (Q2 + R2) <= batch_tokens and rows2 <= max_rows and \
            all(info[j][0] + R2 <= max_len for j in cur + [i])
        if cur and not fits:
            batches.append(cur)
            cur, Q2, R2, rows2 = [], q, r, n
        cur.append(i)
        Q, R, rows = Q2, R2, rows2
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def score_one(model, ids, start, end, *, device, autocast=None):
    """The plain computation, one sequence at a time with the full logits: the reference for the batched path."""
    x = torch.tensor([ids], dtype=torch.long, device=device)
    with autocast() if autocast else torch.autocast(device.type, enabled=False):
        logits = model(x)[0].float()
    pred, tgt = logits[start - 1:end - 1], x[0, start:end]
    return float(F.cross_entropy(pred, tgt)), bool((pred.argmax(-1) == tgt).all())


def make_batches(lengths, batch_tokens, max_rows=256):
    """Indices grouped into batches, longest first, each with rows x longest <= batch_tokens (a sequence longer
    than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur = [], []
    for i in order:
        if cur and ((len(cur) + 1) * lengths[cur[0]] > batch_tokens or len(cur) >= max_rows):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def judge(task_type, scores, gold):
    """Is the item right, from the scores (mean loss, exact) of its sequences."""
    if task_type == "language_modeling":
        return scores[0][1]
    losses = [s[0] for s in scores]
    return min(range(len(losses)), key=losses.__getitem__) == gold


def select_items(n, max_items=None, rank=0, world=1):
    """Indices this rank evaluates: a fixed shuffle cut to max_items (all when None), then item i of that list
    on rank i % world."""
    idx = list(range(n))
    if max_items is not None and max_items < n:
        random.Random(SUBSAMPLE_SEED).shuffle(idx)
        idx = sorted(idx[:max_items])
    return idx[rank::world]


def evaluate_task(model, tokenizer, task, rows, device, *, max_items=None, batch_tokens=32768, autocast=None,
                  rank=0, world=1, single=False, share_prefix=True, net=None):
    """(correct, total) for one task, summed over ranks. single=True scores one sequence at a time with
    model.forward (slow: the reference path the benchmark compares against); share_prefix=False batches whole
    sequences only. net: the model's InferenceModel, if the caller has one already."""
    max_len = model.config.sequence_len
    if not single and net is None:
        net = InferenceModel(model)
    items = select_items(len(rows), max_items, rank, world)
    reqs, owner, golds, first, n_seqs = [], [], [], [], []  # item k owns reqs[first[k]:first[k] + n_seqs[k]]
    for k, i in enumerate(items):
        seqs, gold = item_requests(tokenizer, task, rows, i, max_len)
        first.append(len(reqs))
        n_seqs.append(len(seqs))
        reqs += seqs
        owner += [k] * len(seqs)
        golds.append(gold)
    if single:
        scores = [score_one(model, ids, s, e, device=device, autocast=autocast) for ids, s, e in reqs]
    else:
        scores = [None] * len(reqs)
        # items with several sequences share a prefix (language modelling has one sequence: nothing to share)
        several = [k for k in range(len(items)) if n_seqs[k] > 1] if share_prefix else []
        shared = set(several)
        whole = [j for j, k in enumerate(owner) if k not in shared]
        for batch in make_batches([len(reqs[j][0]) for j in whole], batch_tokens):
            for b, sc in zip(batch, score_batch(net, [reqs[whole[b]] for b in batch])):
                scores[whole[b]] = sc
        groups = [reqs[first[k]:first[k] + n_seqs[k]] for k in several]
        for batch in make_group_batches(groups, batch_tokens, max_len):
            it = iter(score_shared(net, [groups[b] for b in batch]))
            for b in batch:
                k = several[b]
                for j in range(first[k], first[k] + n_seqs[k]):
                    scores[j] = next(it)
    per_item = [[] for _ in items]
    for j, k in enumerate(owner):
        per_item[k].append(scores[j])
    correct = sum(judge(task["type"], per_item[k], golds[k]) for k in range(len(items)))
    counts = torch.tensor([correct, len(items)], dtype=torch.float64)
    if dist.is_initialized():
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    return int(counts[0]), int(counts[1])


def centered(accuracy, baseline):
    """Accuracy rescaled so that chance is 0 and perfect is 1 (baseline is a fraction)."""
    return (accuracy - baseline) / (1.0 - baseline)


def core_label(n_run, n_total):
    return "CORE" if n_run == n_total else f"CORE ({n_run}/{n_total} tasks)"


def evaluate_core(model, tokenizer, bundle, device, *, max_per_task=None, batch_tokens=32768, autocast=None,
                  rank=0, world=1, tasks=None, single=False, share_prefix=True, log=print0):
    """Score every task of the bundle whose data is present. Returns {"core", "label", "tasks": {label: ...},
    "missing": [labels], "num_tasks", "num_scored", "seconds", "examples"}."""
    t_start = time.perf_counter()
    meta = read_core_bundle(bundle)
    if tasks:
        unknown = set(tasks) - {t["label"] for t in meta}
        if unknown:
            raise UserError(f"unknown CORE task(s) {', '.join(sorted(unknown))}; the bundle has: "
                            f"{', '.join(t['label'] for t in meta)}")
        meta = [t for t in meta if t["label"] in tasks]
    results, missing = {}, []
    net = None if single else InferenceModel(model)
    for task in meta:
        if task["missing"]:
            missing.append(task["label"])
            log(f"warning: CORE task {task['label']} skipped: {task['path']} is missing")
            continue
        t0 = time.perf_counter()
        rows = read_core_task(task["path"])
        correct, total = evaluate_task(model, tokenizer, task, rows, device, max_items=max_per_task,
                                       batch_tokens=batch_tokens, autocast=autocast, rank=rank, world=world,
                                       single=single, share_prefix=share_prefix, net=net)
        acc = correct / max(1, total)
        results[task["label"]] = {"type": task["type"], "num_fewshot": task["num_fewshot"], "correct": correct,
                                  "total": total, "accuracy": acc, "baseline": task["random_baseline"],
                                  "centered": centered(acc, task["random_baseline"]),
                                  "seconds": time.perf_counter() - t0}
        r = results[task["label"]]
        log(f"{task['label']:<34} {task['type']:<18} {task['num_fewshot']:>2}-shot  acc {acc:.4f}  "
            f"centered {r['centered']:+.4f}  ({total} items, {r['seconds']:.1f}s)")
    n_total = len(meta)
    score = sum(r["centered"] for r in results.values()) / len(results) if results else float("nan")
    label = core_label(len(results), n_total)
    return {"core": score, "label": label, "tasks": results, "missing": missing, "num_tasks": n_total,
            "num_scored": len(results), "examples": sum(r["total"] for r in results.values()),
            "seconds": time.perf_counter() - t_start}
