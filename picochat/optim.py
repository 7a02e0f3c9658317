"""One optimizer for the whole model: Muon for the 2-D matrices inside the blocks, AdamW for the rest.

Muon: Nesterov momentum, then the update is orthogonalized (its singular values pushed to ~1) by five
Polar Express iterations from rows of equal norm, snapped to the Frobenius norm of an orthogonal matrix,
each row (tall matrices) or column (wide) divided by its running RMS and the whole rescaled to its norm before
(NorMuon), scaled by sqrt(max(1, rows/cols)), with weight decay applied only where the update and the weight
agree in sign ("cautious" decay). dev/LOG.md has what each piece gave on the ladder (bench/ladder.py).

Distributed (ZeRO-1): the parameters lie in a few flat buckets, the same on every rank (`layout`), each cut
into one equal chunk per rank; a rank keeps optimizer state for its chunks only and updates only them.
step() launches one reduce-scatter per bucket at once, updates its chunk of each bucket as that arrives and
then launches the bucket's all-gather of the new values, so later buckets travel while earlier ones update.
A step is 2 collectives per bucket plus one tiny all-reduce (which parameters have a gradient anywhere):
9 at depth 20 on 8 ranks, where a reduce and a broadcast per parameter made 289.

Why reduce-scatter over stacked buckets rather than reduces started from gradient hooks in the backward:
- the collectives of a step, and their order, follow from the layout alone. Hooks fire in each rank's own
  backward order, and never for a parameter a rank has no gradient for (an RL rank without a trainable
  reply, an unused value embedding), so ranks would launch different collectives and hang (DDP's
  find_unused_parameters problem), or need a host sync to agree before launching.
- pretrain, sft and rl stay as they are: hooks need the loop to say which micro-batch ends the step.
- ZeRO-1 needs nothing else: each rank receives only the sums it updates, (W-1)/W of a bucket per rank
  each way (the bandwidth optimum), with no reduce or broadcast rooted at one rank.
What is given up: gradient communication does not overlap the backward pass, only the optimizer's work;
and the buckets cost copies (gradients in, gathered values out; a few multi-tensor kernels per bucket).

Granularity. Muon orthogonalizes whole matrices, so a Muon bucket holds the matrices of one size (the
(4d, d) and (d, 4d) MLP matrices share one: 40 split evenly over 8 ranks, where two buckets of 20 would
each pad to 24) and gives every rank whole matrices; the padding (ceil(K/W) x W - K zero matrices) goes to
the ranks with the least Muon work so far. AdamW is elementwise, so its bucket is all AdamW parameters end
to end, cut into W equal chunks wherever the cuts fall: at most W-1 elements of padding, where whole-
parameter ownership would pad the one lm_head to W copies.

bf16 gradients (wire_dtype=torch.bfloat16; fp32 is the default) halve the bytes on the wire. They go by
all-to-all, not reduce-scatter: the same bytes per rank, but the owner adds the W bf16 pieces in fp32, where
a ring reduce-scatter rounds the running sum to bf16 at every hop.

Checkpoints: state is saved per rank (shard_state) keyed by the parameter's global index, AdamW entries
with the element range they cover, and any number of ranks re-shard it on load (load_shards). shard_index(),
recorded in the checkpoint's meta, lets each rank read only the shards that hold its part (shards_to_read).
"""
import math

import torch
import torch.distributed as dist

from picochat.common import compute_dtype

# Polar Express (Amsel et al. 2025, arXiv 2505.16932): a different quintic per iteration, chosen so that 5
# iterations bring every singular value in [1e-3, 1] close to 1 (fixed coefficients overshoot to ~[0.7, 1.2])
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def orthogonalize(G, steps=5, dtype=torch.bfloat16):
    """Approximate U V^T of G = U S V^T, batched over leading dims, with Frobenius norm sqrt(min(rows, cols))."""
    X = G.to(dtype)
    transpose = X.size(-2) > X.size(-1)
    if transpose:  # iterate on the wide side: X X^T is then the small Gram matrix
        X = X.mT
    # every row to norm 1 / (sqrt(rows) * 1.01): rows of one norm are a better conditioned start, and a
    # Frobenius norm just under 1 keeps every singular value inside the iteration's range
    row_norms = X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    X = X * (1.0 / (row_norms * X.size(-2) ** 0.5 * 1.01)).to(dtype)
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    # the norm of an exactly orthogonal matrix, whatever the iteration left short of convergence
    X = X * (min(X.shape[-2:]) ** 0.5 / X.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)).to(dtype)
    if transpose:
        X = X.mT
    return X


def muon_update(params, grads, bufs, vbufs, *, lr, wd, momentum, beta2, ns_steps: int, ns_dtype):
    """One Muon step for a list of same-shape matrices, in place. lr, wd, momentum and beta2 are 0-d tensors, so
    a compiled version of this function is reused as they change along the schedule. vbufs: per row (tall
    matrices) or per column (wide) running mean squares of the orthogonalized update (NorMuon, arXiv 2510.05491):
    each row/column's step is divided by its RMS, then the whole update is scaled back to its norm before."""
    stacked = []
    for g, buf in zip(grads, bufs):
        buf.lerp_(g, 1 - momentum)
        stacked.append(g.lerp(buf, momentum))  # Nesterov: look ahead along the momentum
    G = torch.stack(stacked)
    U = orthogonalize(G, ns_steps, ns_dtype).to(G.dtype)
    rows, cols = G.shape[-2:]
    dim = -1 if rows >= cols else -2
    sq = U.square().mean(dim=dim, keepdim=True)
    V = torch.stack(vbufs).lerp_(sq, 1 - beta2)
    for vb, v in zip(vbufs, V.unbind(0)):
        vb.copy_(v)
    scale = V.clamp_min(1e-10).rsqrt()
    norm = sq.sum(dim=(-2, -1), keepdim=True).sqrt()
    new_norm = (sq * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    U = U * scale * (norm / new_norm.clamp_min(1e-10))
    U = U * max(1.0, rows / cols) ** 0.5
    for p, u in zip(params, U.unbind(0)):
        # cautious weight decay: only where the update and the weight agree in sign
        p.sub_(p * ((u * p) > 0) * (lr * wd) + u * lr)


def second_moment_like(p):
    """NorMuon's running mean square for matrix p: one per row of a tall matrix, one per column of a wide one."""
    rows, cols = p.shape
    return p.new_zeros((rows, 1) if rows >= cols else (1, cols))


def _cost(p, kind):
    # Newton-Schulz costs ~30 x min(rows, cols) FLOPs per element; an elementwise update counts as a few
    # thousand (it is memory-bound)
    return p.numel() * ((30 * min(p.shape[-2:]) if kind == "muon" and p.ndim >= 2 else 0) + 4000)


def layout(param_groups, world):
    """The buckets, the same on every rank: dicts with "kind" ("muon" or "adamw"), "chunk" (elements per rank;
    the bucket is world x chunk long) and "pieces", tuples (param, group index, start, stop, offset): elements
    [start, stop) of the flattened parameter lie at `offset` in the bucket, in increasing offset order. No
    piece crosses a chunk boundary: rank offset // chunk owns it. Muon pieces are whole matrices, sorted by
    shape within a rank's chunk so same-shape runs are orthogonalized together. Muon buckets come first
    (costliest first): their updates take longest, so they start while the AdamW gradients are on the wire."""
    muon, adamw = {}, {}
    for gi, g in enumerate(param_groups):
        for p in g["params"]:
            if p.numel() == 0:
                continue
            if g["kind"] == "muon":
                muon.setdefault((gi, p.numel(), p.dtype, p.device), []).append((p, gi))
            else:
                adamw.setdefault((p.dtype, p.device), []).append((p, gi))
    buckets, load = [], [0] * world
    # costliest matrices first: the smaller ones then even out the ranks' Muon work
    for members in sorted(muon.values(), key=lambda ms: -_cost(ms[0][0], "muon")):
        members = sorted(members, key=lambda m: tuple(m[0].shape))  # stable: a shape keeps the group's order
        n, k = members[0][0].numel(), len(members)
        per_rank = -(-k // world)
        full = k - (per_rank - 1) * world  # this many ranks get per_rank matrices, the others one fewer
        favoured = set(sorted(range(world), key=lambda r: (load[r], r))[:full])
        pieces, it = [], iter(members)
        for r in range(world):
            for j in range(per_rank if r in favoured else per_rank - 1):
                p, gi = next(it)
                pieces.append((p, gi, 0, n, (r * per_rank + j) * n))
                load[r] += _cost(p, "muon")
        buckets.append(dict(kind="muon", chunk=per_rank * n, pieces=pieces))
    for members in adamw.values():
        chunk = -(-sum(p.numel() for p, _ in members) // world)
        pieces, offset = [], 0
        for p, gi in members:
            start = 0
            while start < p.numel():
                stop = min(p.numel(), ((offset + start) // chunk + 1) * chunk - offset)  # to the next cut
                pieces.append((p, gi, start, stop, offset + start))
                start = stop
            offset += p.numel()
        buckets.append(dict(kind="adamw", chunk=chunk, pieces=pieces))
    return buckets


def _collective(new, old):
    # torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor (and warns on the old names); torch
    # 2.11 has only the old ones. Looked up at call time, so a patched torch.distributed is seen.
    return getattr(dist, new, None) or getattr(dist, old)


def _copy(pairs):
    # (destination, source) pairs in one multi-tensor launch rather than one kernel each
    if pairs:
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])


class MuonAdamW(torch.optim.Optimizer):
    """param_groups carry kind="muon" or kind="adamw". Muon groups: lr, momentum, weight_decay, ns_steps.
    AdamW groups: lr, betas, eps, weight_decay (decoupled, exactly torch.optim.AdamW's update).

    Under torch.distributed, step() averages the gradients over the ranks (a rank without a gradient for a
    parameter counts as zero; a parameter no rank has a gradient for is left alone, state included), then
    every rank ends with the same parameters; p.grad is left as it was. Parameters must be contiguous.
    wire_dtype: the dtype gradients travel in between ranks (torch.bfloat16 halves the bytes; see above);
    it may be changed between steps."""

    def __init__(self, param_groups, ns_dtype=None, wire_dtype=torch.float32):
        defaults = dict(lr=0.02, momentum=0.95, weight_decay=0.0, ns_steps=5, beta2=0.9, betas=(0.8, 0.95), eps=1e-10)
        super().__init__(param_groups, defaults)
        for g in self.param_groups:
            assert g["kind"] in ("muon", "adamw"), g["kind"]
            g.setdefault("initial_lr", g["lr"])
            g.setdefault("initial_weight_decay", g["weight_decay"])
        self.ns_dtype = ns_dtype
        self.wire_dtype = wire_dtype
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.all_params = [p for g in self.param_groups for p in g["params"]]
        self.kind = {p: g["kind"] for g in self.param_groups for p in g["params"]}
        self.buckets = layout(self.param_groups, self.world)
        self.mine = {}  # param -> (start, stop): the elements of it this rank updates and keeps state for
        for b in self.buckets:
            b["mine"] = [piece for piece in b["pieces"] if piece[4] // b["chunk"] == self.rank]
            self.mine.update({p: (start, stop) for p, _, start, stop, _ in b["mine"]})
        self._muon_update = muon_update
        self._hyper = {}

    def compile(self):
        """torch.compile the Muon update (momentum, Newton-Schulz, scaling, decay, update: one fused graph
        per matrix shape); AdamW stays eager: it is elementwise and a small share of the step."""
        self._muon_update = torch.compile(muon_update, dynamic=False)
        return self

    def _ns_dtype(self, device):
        # Newton-Schulz in the model's compute dtype: bf16 on GPUs, fp32 on CPUs unless PICOCHAT_DTYPE says bf16
        # (on a CPU without bf16 units, bf16 is ~100x slower than fp32)
        return self.ns_dtype if self.ns_dtype is not None else compute_dtype(device.type)

    @torch.no_grad()
    def init_state(self):
        """Allocate the state of what this rank owns now rather than at the first step (the same zeros): so
        a memory probe sees the optimizer's share of memory."""
        for b in self.buckets:
            for p, gi, start, stop, _ in b["mine"]:
                if not self.state[p]:
                    self._new_state(p, gi, start, stop)

    def _new_state(self, p, gi, start, stop):
        # AdamW state is flat, over this rank's elements of p only; Muon's is the whole matrix
        if self.param_groups[gi]["kind"] == "adamw":
            self.state[p] = {"step": 0, "exp_avg": p.new_zeros(stop - start), "exp_avg_sq": p.new_zeros(stop - start)}
        else:
            self.state[p] = {"momentum_buffer": torch.zeros_like(p), "second_moment": second_moment_like(p)}
        return self.state[p]

    @torch.no_grad()
    def step(self):
        if self.world == 1:
            has = {p: p.grad is not None for p in self.all_params}
            for b in self.buckets:
                self._update(b, has)
            return
        # which parameters have a gradient on any rank: launched first, read back only once all the
        # reduce-scatters are queued, so the host waits while the wire is busy
        has = torch.tensor([float(p.grad is not None) for p in self.all_params], device=self.all_params[0].device)
        flags = dist.all_reduce(has, op=dist.ReduceOp.MAX, async_op=True)
        reduces = [self._launch_reduce(b) for b in self.buckets]
        flags.wait()
        has = dict(zip(self.all_params, has.tolist()))
        gathers = []
        for i, b in enumerate(self.buckets):
            work, received, _ = reduces[i]
            work.wait()
            reduces[i] = None  # frees the send buffer
            self._update(b, has, self._average(received, b))
            if any(has[p] for p, *_ in b["pieces"]):  # the same answer on every rank: has is all-reduced
                gathers.append((b, *self._launch_gather(b, has)))
        for b, work, buf in gathers:
            work.wait()
            _copy([(p.view(-1)[start:stop], buf[off:off + stop - start]) for p, _, start, stop, off in b["pieces"]
                   if has[p] and off // b["chunk"] != self.rank])

    def _launch_reduce(self, b):
        """Start summing bucket b's gradients onto their owners: (work, what arrives, the send buffer)."""
        ref, n = b["pieces"][0][0], self.world * b["chunk"]
        zero, parts, at = ref.new_zeros(()), [], 0
        for p, _, start, stop, off in b["pieces"]:  # padding and missing gradients: zeros, as views of one zero
            if off > at:
                parts.append(zero.expand(off - at))
            parts.append(zero.expand(stop - start) if p.grad is None else p.grad.reshape(-1)[start:stop])
            at = off + stop - start
        if at < n:
            parts.append(zero.expand(n - at))
        send = torch.cat(parts, out=ref.new_empty(n, dtype=self.wire_dtype))  # one kernel, cast included
        if self.wire_dtype == ref.dtype:
            received = ref.new_empty(b["chunk"])
            work = _collective("reduce_scatter_single", "reduce_scatter_tensor")(received, send, op=dist.ReduceOp.SUM,
                                                                              async_op=True)
        else:  # every rank's piece of this rank's chunk, added up in fp32 on arrival (_average)
            received = ref.new_empty(n, dtype=self.wire_dtype)
            work = dist.all_to_all_single(received, send, async_op=True)
        return work, received, send

    def _average(self, received, b):
        """This rank's chunk of bucket b, averaged over the ranks, in the parameters' dtype."""
        ref, chunk = b["pieces"][0][0], b["chunk"]
        if received.numel() == chunk:  # reduce-scatter: already summed
            return received.div_(self.world)
        # one pass over what arrived, accumulated in fp32 (not a running sum of W slices: W passes)
        return received.view(self.world, chunk).sum(0, dtype=torch.float32).div_(self.world).to(ref.dtype)

    def _launch_gather(self, b, has):
        """Start sending this rank's updated values of bucket b to every rank: (work, the whole bucket)."""
        chunk = b["chunk"]
        buf = b["pieces"][0][0].new_empty(self.world * chunk)
        _copy([(buf[off:off + stop - start], p.view(-1)[start:stop]) for p, _, start, stop, off in b["mine"] if has[p]])
        own = buf[self.rank * chunk:(self.rank + 1) * chunk]  # in place: the input is the output's own chunk
        return _collective("all_gather_single", "all_gather_into_tensor")(buf, own, async_op=True), buf

    def _update(self, b, has, received=None):
        """Update this rank's pieces of bucket b that some rank has a gradient for. received: this rank's
        averaged chunk (None in one process: the gradients are p.grad)."""
        base = self.rank * b["chunk"]

        def grad(p, start, stop, off):
            if received is None:
                return p.grad.reshape(-1)[start:stop] if b["kind"] == "adamw" else p.grad
            g = received[off - base:off - base + stop - start]
            return g if b["kind"] == "adamw" else g.view(p.shape)

        if b["kind"] == "adamw":
            for p, gi, start, stop, off in b["mine"]:
                if has[p]:
                    state = self.state[p] or self._new_state(p, gi, start, stop)
                    self._adamw(p.view(-1)[start:stop], grad(p, start, stop, off), state, self.param_groups[gi])
            return
        runs = {}  # same-shape matrices, orthogonalized as one batch
        for piece in b["mine"]:
            if has[piece[0]]:
                runs.setdefault(tuple(piece[0].shape), []).append(piece)
        for run in runs.values():
            for p, gi, start, stop, _ in run:
                if not self.state[p]:
                    self._new_state(p, gi, start, stop)
            self._muon([p for p, *_ in run], [grad(p, start, stop, off) for p, _, start, stop, off in run],
                       self.param_groups[run[0][1]])

    def _adamw(self, p, g, state, group):
        state["step"] += 1
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        p.mul_(1 - lr * wd)
        state["exp_avg"].lerp_(g, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        bias1 = 1 - b1 ** state["step"]
        bias2 = 1 - b2 ** state["step"]
        denom = (state["exp_avg_sq"].sqrt() / (bias2 ** 0.5)).add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)

    def _muon(self, ps, grads, group):
        dev = ps[0].device
        # device-resident 0-d tensors refilled in place: no host-to-device copy, no recompilation
        hyper = self._hyper.setdefault((id(group), dev), [torch.zeros((), device=dev) for _ in range(4)])
        for t, k in zip(hyper, ("lr", "weight_decay", "momentum", "beta2")):
            t.fill_(group[k])
        lr, wd, momentum, beta2 = hyper
        self._muon_update(ps, grads, [self.state[p]["momentum_buffer"] for p in ps],
                          [self.state[p]["second_moment"] for p in ps], lr=lr, wd=wd, momentum=momentum, beta2=beta2,
                          ns_steps=group["ns_steps"], ns_dtype=self._ns_dtype(dev))

    # ---- checkpointing: state keyed by the parameter's global index, so any rank count can load it ----
    def shard_state(self):
        """This rank's state for its checkpoint shard: {"state": {index: entry}, "groups": hyperparameters}.
        An AdamW entry holds flat tensors over elements "range" = (start, stop) of the parameter; an entry
        without "range" (Muon, or a checkpoint from before the buckets) holds whole tensors."""
        index = {p: i for i, p in enumerate(self.all_params)}
        state = {}
        for p, s in self.state.items():
            if s:
                state[index[p]] = dict(s, range=self.mine[p]) if self.kind[p] == "adamw" else s
        return {"state": state,
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def shard_index(self):
        """Per rank of this run, [[parameter index, start, stop], ...]: what its shard can hold. The same on
        every rank (the layout is), so rank 0 writes it into the checkpoint's meta for shards_to_read."""
        index = {p: i for i, p in enumerate(self.all_params)}
        out = [[] for _ in range(self.world)]
        for b in self.buckets:
            for p, _, start, stop, off in b["pieces"]:
                out[off // b["chunk"]].append([index[p], start, stop])
        return out

    def shards_to_read(self, saved_index):
        """The ranks of a saved run whose shards hold state for what this rank owns, from that run's
        shard_index(). Never empty: every shard also carries the groups' hyperparameters."""
        want = {i: self.mine[p] for i, p in enumerate(self.all_params) if p in self.mine}
        ranks = [r for r, entries in enumerate(saved_index)
                 if any(i in want and start < want[i][1] and want[i][0] < stop for i, start, stop in entries)]
        return ranks or [0]

    def load_shards(self, shards):
        """Load state from shards of a saving run (all of them, or those shards_to_read names); keep what
        this rank owns, re-cut for this run's layout. A parameter with no state in the shards gets none (as
        before its first gradient); one whose state the shards cover only in part is an error."""
        saved = {}  # parameter index -> [(start, stop, entry)]
        for sh in shards:
            for i, entry in sh["state"].items():
                start, stop = entry.get("range", (0, self.all_params[i].numel()))
                saved.setdefault(i, []).append((start, stop, entry))
        for i, p in enumerate(self.all_params):
            if p not in self.mine or i not in saved:
                continue
            a, z = self.mine[p]
            parts = sorted(((max(s, a), min(e, z), s, entry) for s, e, entry in saved[i] if s < z and a < e),
                           key=lambda part: part[0])
            if sum(hi - lo for lo, hi, _, _ in parts) != z - a:
                raise ValueError(f"the optimizer shards hold state for only part of elements [{a}, {z}) of "
                                 f"parameter {i}: a shard is missing or from another run")
            s0, e0 = parts[0][3].get("range", (0, p.numel()))
            state = {}
            for k, v in parts[0][3].items():
                if k == "range":
                    continue
                if torch.is_tensor(v) and v.numel() == e0 - s0:  # one value per element: re-cut to [a, z)
                    v = torch.cat([entry[k].reshape(-1)[lo - s:hi - s] for lo, hi, s, entry in parts])
                    v = v if self.kind[p] == "adamw" else v.view(p.shape)
                state[k] = v.to(p.device) if torch.is_tensor(v) else v
            if self.kind[p] == "muon":  # a checkpoint from before NorMuon: the running RMS starts afresh
                state.setdefault("second_moment", second_moment_like(p))
            self.state[p] = state
        saved_groups = shards[0]["groups"]
        # a checkpoint from another grouping of the parameters (before the per-role AdamW groups) keeps the
        # state above but not the groups' hyperparameters: this run's own stand
        roles = lambda groups: [(g["kind"], g.get("role")) for g in groups]
        if roles(saved_groups) == roles(self.param_groups):
            for g, saved_group in zip(self.param_groups, saved_groups):
                g.update({k: v for k, v in saved_group.items() if k != "kind"})


def wire_dtype_for(choice, device, world):
    """The dtype gradients cross the interconnect in, from a --grad-wire choice: "fp32", "bf16", or "auto": bf16
    between several GPUs (half the bytes of the step's largest collectives; the sums stay fp32, see MuonAdamW),
    fp32 otherwise (one process sends nothing; CPU runs keep their bit-exact equivalence checks)."""
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" and world > 1 else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]


def build_optimizer(model, *, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5,
                    weight_decay=0.0, wire_dtype=torch.float32):
    """Muon for the block matrices, AdamW for each other role of model.param_groups() with its own settings.
    AdamW learning rates for embeddings and head shrink with width ((width/768)^-0.5): wider models receive
    proportionally larger per-parameter updates from Adam. The embeddings keep a long second-moment memory
    (beta2 0.995: a rare token's row sees a gradient in few steps), the residual scalars move at 1/100 of
    the x0 scalars' rate, and the x0 scalars average their gradient over more steps (beta1 0.96). dev/LOG.md
    has what these settings gave on the ladder (bench/ladder.py)."""
    groups = model.param_groups()
    scale = (model.config.n_embd / 768) ** -0.5
    # role: (lr, betas, weight decay)
    adamw = {"embedding": (embedding_lr * scale, (0.8, 0.995), 0.001),
             "lm_head": (unembedding_lr * scale, (0.8, 0.96), 0.01),
             "value_embedding": (embedding_lr * scale * 0.5, (0.8, 0.995), 0.01),
             "resid": (scalar_lr * 0.01, (0.8, 0.95), 0.05),
             "x0": (scalar_lr, (0.96, 0.95), 0.0),
             "gate": (scalar_lr, (0.8, 0.95), 0.0)}
    param_groups = [dict(kind="muon", params=groups["matrix"], lr=matrix_lr, momentum=0.95, weight_decay=weight_decay,
                         ns_steps=5)]
    for role, (lr, betas, wd) in adamw.items():  # embedding and lm_head first: pretrain prints their lr by index
        if groups[role]:
            param_groups.append(dict(kind="adamw", params=groups[role], lr=lr, betas=betas, eps=1e-10,
                                     weight_decay=wd, role=role))
    return MuonAdamW(param_groups, wire_dtype=wire_dtype)


def warmup_stable_decay(step, num_steps, warmup_steps=0, warmdown_ratio=0.65, final_frac=0.05):
    """The LR multiplier at step (pretraining's): short linear warm-up, flat, then linear decay over the last
    warmdown_ratio of training to final_frac."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    warmdown_start = num_steps * (1 - warmdown_ratio)
    if step < warmdown_start:
        return 1.0
    progress = (step - warmdown_start) / max(1.0, num_steps - warmdown_start)
    return 1.0 - progress * (1.0 - final_frac)


def warmup_linear_decay(step, num_steps, warmup_steps=0, final_frac=0.0):
    """The LR multiplier at step (fine-tuning's): linear warm-up, then linear decay to final_frac at the last
    step, with no flat part."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)
    return 1.0 - progress * (1.0 - final_frac)


def muon_momentum(step, num_steps, *, warmdown_ratio=0.65, warmup=400, start=0.85, peak=0.97, end=0.90):
    """Muon's momentum at step: up from start to peak over the first warmup steps, then down to end over the
    LR warm-down, as the reference schedules it. A run shorter than the warm-up only ever warms up."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    warmdown_start = num_steps - round(warmdown_ratio * num_steps)
    if step < warmdown_start:
        return peak
    return peak + (end - peak) * (step - warmdown_start) / max(1, num_steps - warmdown_start)


def cosine_decay(step, num_steps):
    """Muon's weight decay multiplier at step: a half cosine from 1 to 0 over the run, as the reference
    schedules it (part of the recipe measured in dev/LOG.md, session 12)."""
    return 0.5 * (1 + math.cos(math.pi * step / max(1, num_steps)))
