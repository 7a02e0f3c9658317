"""One optimizer for the whole model: Muon for the 2-D matrices inside the blocks, AdamW for the rest.

Muon: Nesterov momentum, then the update is orthogonalized (its singular values pushed to ~1) by a few
quintic Newton-Schulz iterations, scaled by sqrt(max(1, rows/cols)), with weight decay applied only where
the update and the weight agree in sign ("cautious" decay).

Distributed (ZeRO-1 style): every parameter has one owner rank (round robin in a fixed order). In step(),
each gradient is reduced onto its owner, the owner alone keeps that parameter's optimizer state and computes
the update, then broadcasts the new values. So the state is sharded by parameter, and a checkpoint is one
state file per rank that any other number of ranks can re-shard on load.
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
        self.owner = {p: i % self.world for i, p in enumerate(self.all_params)}

    def _ns_dtype(self, device):
        # bf16 Newton-Schulz on GPUs; on CPUs without bf16 units that would be ~100x slower than fp32
        if self.ns_dtype is not None:
            return self.ns_dtype
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    @torch.no_grad()
    def step(self):
        if self.world > 1:
            self._reduce_grads()
        for group in self.param_groups:
            mine = [p for p in group["params"] if self.owner[p] == self.rank and p.grad is not None]
            if group["kind"] == "adamw":
                for p in mine:
                    self._adamw(p, group)
            else:
                # same-shape matrices are orthogonalized together in one batched Newton-Schulz
                by_shape = {}
                for p in mine:
                    by_shape.setdefault(p.shape, []).append(p)
                for ps in by_shape.values():
                    self._muon(ps, group)
        if self.world > 1:
            self._broadcast_params()

    def _adamw(self, p, group):
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
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
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = []
        for p in ps:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mom)
            grads.append(p.grad.lerp(buf, mom))  # Nesterov: look ahead along the momentum
        G = torch.stack(grads)
        U = orthogonalize(G, group["ns_steps"], self._ns_dtype(G.device)).to(G.dtype)
        rows, cols = G.shape[-2:]
        U *= max(1.0, rows / cols) ** 0.5
        for p, u in zip(ps, U):
            if wd:
                agree = (u * p) > 0
                p.sub_(p * agree, alpha=lr * wd)
            p.sub_(u, alpha=lr)

    def _reduce_grads(self):
        works = []
        for p in self.all_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            works.append(dist.reduce(p.grad, dst=self.owner[p], op=dist.ReduceOp.SUM, async_op=True))
        for w in works:
            w.wait()
        for p in self.all_params:
            if self.owner[p] == self.rank:
                p.grad.div_(self.world)

    def _broadcast_params(self):
        works = [dist.broadcast(p, src=self.owner[p], async_op=True) for p in self.all_params]
        for w in works:
            w.wait()

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
