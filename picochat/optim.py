"""One optimizer for the whole model: Muon for the 2-D matrices inside the blocks, AdamW for the rest.

Muon: Nesterov momentum, then the update is orthogonalized (its singular values pushed to ~1) by a few
quintic Newton-Schulz iterations, scaled by sqrt(max(1, rows/cols)), with weight decay applied only where
the update and the weight agree in sign ("cautious" decay).

Distributed (ZeRO-1 style): every parameter has one owner rank. In step(), each gradient is reduced onto
its owner (all reductions launched at once, asynchronously, in the order the owners then work through
them, so the first updates start while later gradients are still in flight), the owner alone keeps that
parameter's optimizer state and computes the update, then broadcasts the new values (again all async).
Owners are assigned greedily by estimated update cost, so ranks finish their share at about the same
time. The state is sharded by parameter, and a checkpoint is one state file per rank that any other number
of ranks can re-shard on load. Per step every rank moves about 2x the parameter bytes, like a
reduce-scatter + all-gather, without padding or flattening copies.
"""
import torch
import torch.distributed as dist

# quintic Newton-Schulz coefficients tuned to pull singular values into ~[0.7, 1.2] in few steps
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5, dtype=torch.bfloat16):
    """Approximate U V^T of G = U S V^T, batched over leading dims."""
    X = G.to(dtype)
    transpose = X.size(-2) > X.size(-1)
    if transpose:  # iterate on the wide side: X X^T is then the small Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transpose:
        X = X.mT
    return X


def muon_update(params, grads, bufs, lr, wd, momentum, ns_steps: int, ns_dtype):
    """One Muon step for a list of same-shape matrices, in place. lr, wd and momentum are 0-d tensors, so a
    compiled version of this function is reused as they change along the schedule."""
    stacked = []
    for g, buf in zip(grads, bufs):
        buf.lerp_(g, 1 - momentum)
        stacked.append(g.lerp(buf, momentum))  # Nesterov: look ahead along the momentum
    G = torch.stack(stacked)
    U = orthogonalize(G, ns_steps, ns_dtype).to(G.dtype)
    rows, cols = G.shape[-2:]
    U = U * max(1.0, rows / cols) ** 0.5
    for p, u in zip(params, U.unbind(0)):
        # cautious weight decay: only where the update and the weight agree in sign
        p.sub_(p * ((u * p) > 0) * (lr * wd) + u * lr)


def assign_owners(param_groups, world):
    """{param: rank}: largest estimated update cost first, each to the least loaded rank (ties: the lowest
    rank), the same on every rank. Newton-Schulz costs ~30 x min(rows, cols) FLOPs per element; an
    elementwise update counts as a few thousand (it is memory-bound)."""
    params = [(p, g["kind"]) for g in param_groups for p in g["params"]]
    cost = [p.numel() * ((30 * min(p.shape[-2:]) if kind == "muon" and p.ndim >= 2 else 0) + 4000)
            for p, kind in params]
    load, owner = [0] * world, {}
    for i in sorted(range(len(params)), key=lambda i: (-cost[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[params[i][0]] = r
        load[r] += cost[i]
    return owner


class MuonAdamW(torch.optim.Optimizer):
    """param_groups carry kind="muon" or kind="adamw". Muon groups: lr, momentum, weight_decay, ns_steps.
    AdamW groups: lr, betas, eps, weight_decay (decoupled, exactly torch.optim.AdamW's update)."""

    def __init__(self, param_groups, ns_dtype=None):
        defaults = dict(lr=0.02, momentum=0.95, weight_decay=0.0, ns_steps=5, betas=(0.8, 0.95), eps=1e-10)
        super().__init__(param_groups, defaults)
        for g in self.param_groups:
            assert g["kind"] in ("muon", "adamw"), g["kind"]
            g.setdefault("initial_lr", g["lr"])
        self.ns_dtype = ns_dtype
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.all_params = [p for g in self.param_groups for p in g["params"]]
        self.owner = assign_owners(self.param_groups, self.world)
        # the units of work in a fixed order (the same on every rank): AdamW parameters one by one, Muon
        # parameters batched by (owner, shape) so an owner orthogonalizes its same-shape matrices together
        self.units = []
        for gi, group in enumerate(self.param_groups):
            if group["kind"] == "adamw":
                self.units += [(gi, [p]) for p in group["params"]]
            else:
                batches = {}
                for p in group["params"]:
                    batches.setdefault((self.owner[p], tuple(p.shape)), []).append(p)
                self.units += [(gi, ps) for ps in batches.values()]
        self._muon_update = muon_update
        self._hyper = {}

    def compile(self):
        """torch.compile the Muon update (momentum, Newton-Schulz, scaling, decay, update: one fused graph
        per matrix shape); AdamW stays eager: it is elementwise and a small share of the step."""
        self._muon_update = torch.compile(muon_update, dynamic=False)
        return self

    def _ns_dtype(self, device):
        # bf16 Newton-Schulz on GPUs; on CPUs without bf16 units that would be ~100x slower than fp32
        if self.ns_dtype is not None:
            return self.ns_dtype
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    @torch.no_grad()
    def init_state(self):
        """Allocate the state of the parameters this rank owns now rather than at the first step (the
        same zeros): so a memory probe sees the optimizer's share of memory."""
        for gi, ps in self.units:
            for p in ps:
                if self.owner[p] == self.rank and not self.state[p]:
                    self._new_state(p, self.param_groups[gi])

    def _new_state(self, p, group):
        if group["kind"] == "adamw":
            self.state[p] = {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        else:
            self.state[p] = {"momentum_buffer": torch.zeros_like(p)}

    @torch.no_grad()
    def step(self):
        reduces = self._launch_reduces() if self.world > 1 else {}
        for gi, ps in self.units:
            if self.owner[ps[0]] != self.rank:
                continue
            for p in ps:
                if p in reduces:
                    reduces[p].wait()
                    p.grad.div_(self.world)
            ps = [p for p in ps if p.grad is not None]
            if not ps:
                continue
            group = self.param_groups[gi]
            for p in ps:
                if not self.state[p]:
                    self._new_state(p, group)
            if group["kind"] == "adamw":
                self._adamw(ps[0], group)
            else:
                self._muon(ps, group)
        if self.world > 1:
            for w in reduces.values():  # the sends of non-owned gradients must finish before they are freed
                w.wait()
            works = [dist.broadcast(p, src=self.owner[p], async_op=True) for _, ps in self.units for p in ps
                     if p in reduces]
            for w in works:
                w.wait()

    def _adamw(self, p, group):
        state = self.state[p]
        state["step"] += 1
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        g = p.grad
        p.mul_(1 - lr * wd)
        state["exp_avg"].lerp_(g, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        bias1 = 1 - b1 ** state["step"]
        bias2 = 1 - b2 ** state["step"]
        denom = (state["exp_avg_sq"].sqrt() / (bias2 ** 0.5)).add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)

    def _muon(self, ps, group):
        dev = ps[0].device
        # device-resident 0-d tensors refilled in place: no host-to-device copy, no recompilation
        hyper = self._hyper.setdefault((id(group), dev), [torch.zeros((), device=dev) for _ in range(3)])
        for t, k in zip(hyper, ("lr", "weight_decay", "momentum")):
            t.fill_(group[k])
        self._muon_update(ps, [p.grad for p in ps], [self.state[p]["momentum_buffer"] for p in ps], *hyper,
                          group["ns_steps"], self._ns_dtype(dev))

    def _launch_reduces(self):
        params = [p for _, ps in self.units for p in ps]
        # a parameter that no rank has a gradient for is left alone (as one process would skip it, state
        # included); one that only some ranks have a gradient for counts as zero on the others
        has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        works = {}
        for p, h in zip(params, has.tolist()):
            if h:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                works[p] = dist.reduce(p.grad, dst=self.owner[p], op=dist.ReduceOp.SUM, async_op=True)
        return works

    # ---- checkpointing: state keyed by the parameter's global index, so any rank count can load it ----
    def shard_state(self):
        index = {p: i for i, p in enumerate(self.all_params)}
        return {"state": {index[p]: s for p, s in self.state.items()},
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_shards(self, shards):
        """Load state from the shard files of all ranks of the saving run; keep what this rank owns."""
        merged = {}
        for sh in shards:
            merged.update(sh["state"])
        for i, p in enumerate(self.all_params):
            if self.owner[p] == self.rank and i in merged:
                self.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) else v) for k, v in merged[i].items()}
        for g, saved in zip(self.param_groups, shards[0]["groups"]):
            g.update({k: v for k, v in saved.items() if k != "kind"})


def build_optimizer(model, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5,
                    weight_decay=0.0, adam_betas=(0.8, 0.95)):
    """AdamW learning rates for embeddings and head shrink with width ((width/768)^-0.5): wider models
    receive proportionally larger per-parameter updates from Adam."""
    groups = model.param_groups()
    scale = (model.config.n_embd / 768) ** -0.5
    adam = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
    param_groups = [
        dict(kind="muon", params=groups["matrix"], lr=matrix_lr, momentum=0.95, weight_decay=weight_decay, ns_steps=5),
        dict(params=groups["embedding"], lr=embedding_lr * scale, **adam),
        dict(params=groups["lm_head"], lr=unembedding_lr * scale, **adam),
    ]
    if groups["scalar"]:
        param_groups.append(dict(params=groups["scalar"], lr=scalar_lr, **adam))
    return MuonAdamW(param_groups)


def lr_multiplier(step, num_steps, warmup_steps=0, warmdown_ratio=0.65, final_frac=0.05):
    """Short linear warm-up, flat, then linear decay over the last warmdown_ratio of training to final_frac."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    warmdown_start = num_steps * (1 - warmdown_ratio)
    if step < warmdown_start:
        return 1.0
    progress = (step - warmdown_start) / max(1.0, num_steps - warmdown_start)
    return 1.0 - progress * (1.0 - final_frac)


def muon_momentum(step, warmup=300, start=0.85, end=0.97):
    return start + (end - start) * min(1.0, step / warmup)
