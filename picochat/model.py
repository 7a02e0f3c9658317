"""The GPT: pre-norm decoder with rotary attention, QK-norm, ReLU^2 MLP, untied embeddings and a soft-capped head.

Everything is derived from one dial, --depth (see GPTConfig.from_depth). A forward pass either trains
(returns a scalar loss, computed chunk by chunk so the full logits never exist), scores (per-token losses)
or returns the logits of every position.

The same architecture is written twice more, and the three must compute the same thing: decode.InferenceModel
runs this trunk over a static KV cache with the weights laid out for decoding (chat, the server, RL's sampling,
pretraining's samples and CORE's scoring go through it), and hf_modeling.py is the `transformers` model that
`picochat export --hf` ships inside an export. Tests hold both to GPT.forward: tests/test_engine.py
(test_inference_model_matches_model_forward, test_greedy_generation_matches_full_recompute), tests/test_core.py
(test_batched_scoring_matches_one_at_a_time) and tests/test_export.py (test_logits_match_picochat,
test_greedy_generation_matches). A change to one is a change to all three.
"""
import argparse
import math
from dataclasses import dataclass, asdict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from picochat.common import UserError


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "L"     # per-layer S (window T/4) or L (full), tiled; the last layer is always L
    value_embeds: bool = False    # value embeddings on alternating layers, mixed in by a learned gate
    resid_scalars: bool = True    # learned per-layer mix of the residual stream and the first-layer input
    rope_base: float = 100_000.0
    softcap: float = 15.0
    # Features of other GPTs of this family (picochat import), off by default. Each changes what the weights mean:
    smear: bool = False           # add a gated share of the previous token's embedding to each token's (a bigram path)
    backout: bool = False         # subtract a learned share of the middle layer's output before the final norm
    ve_gate_channels: int = 32    # the value-embedding gate reads this many leading channels of its input
    ve_gate_scale: float = 2.0    # ... and scales its sigmoid by this (so 1 at a zero init for 2.0)
    qk_scale: float = 1.0         # q and k multiplied by this after QK-norm (sharper attention above 1)
    short_window: int = 0         # an S layer's window in tokens, the current one included; 0 = sequence_len // 4
    rope_bf16: bool = False       # rotary tables rounded to bf16, as the weights were trained with

    @classmethod
    def from_depth(cls, depth, *, vocab_size=32768, sequence_len=2048, aspect_ratio=64, head_dim=128,
                   n_kv_head=0, **kw):
        if depth < 1:
            raise UserError(f"--depth must be at least 1, got {depth}")
        if head_dim < 2 or head_dim % 2:
            raise UserError(f"--head-dim must be a positive even number (rotary pairs channels), got {head_dim}")
        width = ((depth * aspect_ratio + head_dim - 1) // head_dim) * head_dim
        n_head = width // head_dim
        n_kv_head = n_kv_head or n_head
        if n_head % n_kv_head:
            raise UserError(f"--n-kv-head {n_kv_head} must divide the {n_head} query heads")
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                   n_kv_head=n_kv_head, n_embd=width, **kw)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def window_sizes(self):
        """Attention window per layer (None = full causal)."""
        pat = self.window_pattern.upper()
        if not pat or set(pat) - {"S", "L"}:
            raise UserError(f"--window-pattern must be made of S and L, got {self.window_pattern!r}")
        short = self.short_window or max(1, self.sequence_len // 4)
        sizes = [None if pat[i % len(pat)] == "L" else short for i in range(self.n_layer)]
        sizes[-1] = None
        return sizes

    def has_value_embed(self, layer):
        # alternate layers, always including the last one
        return self.value_embeds and (layer % 2 == (self.n_layer - 1) % 2)

    @property
    def backout_layer(self):
        """The layer whose output the backout subtracts (the middle one)."""
        return self.n_layer // 2


def norm(x):
    """RMSNorm that keeps x's dtype. Under autocast, rms_norm is on the fp32 list: it would turn the bf16
    residual stream back into fp32 before every projection (twice the bytes, and a cast per matmul). The
    kernel accumulates in fp32 either way."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x, (x.size(-1),))
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    # x: (B, T, H, D); cos/sin broadcast to (B or 1, T, 1, D/2). Halves rotate as pairs (i, i + D/2).
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


SMEAR_CHANNELS = 24  # the smear gate reads this many leading channels of the token's embedding


def smear(x, prev, gate_weight, lam):
    """x (B, T, C) normed token embeddings; prev (B, T - 1 or T, C) the embedding before each of x's last
    prev.shape[1] positions (fewer than T: the first position has none and stays as it is). Each such position
    gains lam * sigmoid(gate . x[:24]) times its predecessor's embedding."""
    n = prev.shape[1]
    tail = x[:, x.shape[1] - n:]
    gate = lam.to(x.dtype) * torch.sigmoid(F.linear(tail[..., :SMEAR_CHANNELS], gate_weight.to(x.dtype)))
    return torch.cat([x[:, :x.shape[1] - n], tail + gate * prev], dim=1)


def sdpa_attention(q, k, v, window):
    """Causal self-attention over (B, T, H, D) tensors, limited to the last `window` positions when set.
    Sliding windows take a dense (T, T) mask: fastpath.use_fast_attention swaps in FlashAttention-3 or
    FlexAttention for them (the module global `attention` below is the hook it replaces)."""
    T = q.shape[1]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if window is None or window >= T:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        i = torch.arange(T, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


attention = sdpa_attention


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        self.ve_gate_channels = min(config.ve_gate_channels, C)
        self.ve_gate_scale, self.qk_scale = config.ve_gate_scale, config.qk_scale
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if config.has_value_embed(layer) else None)

    def forward(self, x, cos, sin, window, ve=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, H_kv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        y = attention(q, k, v, window)  # a module global: fastpath may swap it
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        h = F.relu(self.c_fc(x))
        return self.c_proj(h * h)  # not .square(): pow is on autocast's fp32 list, h * h stays bf16


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = Attention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, window, ve):
        x = x + self.attn(norm(x), cos, sin, window, ve)
        return x + self.mlp(norm(x))


def softcap_ce_chunk(zt, targets, weights, softcap: float):
    """For one chunk of raw logits laid out vocab-major, zt (V, n): the weighted loss sum (fp32) and its
    gradient w.r.t. zt, in zt's layout and dtype; the math runs in fp32. Plain elementwise code, so
    torch.compile fuses it, the up- and down-casts of bf16 logits included, into a couple of passes."""
    dtype = zt.dtype
    t = torch.tanh(zt.float() / softcap)  # not 1 - 2/(e^(2z/c) + 1): one exp fewer, but it loses t's precision near 0
    logits = softcap * t
    lse = softcap + torch.log(torch.exp(logits - softcap).sum(0))  # logits <= softcap: no pass for the max
    loss = ((lse - logits.gather(0, targets[None, :]).squeeze(0)) * weights).sum()
    g = torch.exp(logits - lse[None, :]) * weights[None, :]
    g = g.scatter_add(0, targets[None, :], -weights[None, :])
    return loss, (g * (1.0 - t * t)).to(dtype)  # through the soft-cap


LOSS_STAGE_ELEMENTS = 1 << 25  # bf16 loss gradients gathered per grad_W product (64 MB)


class LinearSoftcapCrossEntropy(torch.autograd.Function):
    """sum_t w_t * CE(softcap(h_t @ W^T), y_t), computed in row chunks so the (N, V) logits never exist at
    once. The gradients are produced during the forward pass (the loss is the last node of the graph, so
    they are final up to the scalar grad_output): no logits are kept or recomputed for the backward."""

    @staticmethod
    def forward(ctx, h, W, targets, weights, softcap, chunk, kernel):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_W = torch.zeros(W.shape, device=W.device, dtype=torch.float32) if need_grad else None
        # the matmuls in autocast's dtype (bf16 on GPUs), as a Linear would run them: autocast does not reach
        # the out= and in-place products below (h is already in that dtype: the residual stream is)
        dtype = GPT.compute_dtype(h.device)
        Wc = W.to(dtype)
        N = h.shape[0]
        # bf16 products reach the fp32 grad_W by a (V, C) cast-and-add (no mixed-dtype addmm): gather the chunks'
        # gradients to LOSS_STAGE_ELEMENTS per add (one chunk on a GPU, 8 at V = 32K on a CPU), or those adds
        # cost as much as the matmuls
        stage = max(chunk, LOSS_STAGE_ELEMENTS // W.shape[0])
        pending, start = [], 0
        for s in range(0, N, chunk):
            hc = h[s:s + chunk].to(dtype)
            # vocab-major (V, n) logits: on CPU, W @ h^T runs ~1.4x faster than h @ W^T for these shapes
            loss, g = kernel(Wc @ hc.t(), targets[s:s + chunk].clamp(min=0), weights[s:s + chunk], softcap)
            total += loss
            if not need_grad:
                continue
            if dtype == h.dtype:
                torch.mm(g.t(), Wc, out=grad_h[s:s + chunk])
            else:
                grad_h[s:s + chunk] = g.t() @ Wc
            if g.dtype == torch.float32:
                grad_W.addmm_(g, hc)
                continue
            pending.append(g)
            end = min(s + chunk, N)
            if end - start >= stage or end == N:
                G = pending[0] if len(pending) == 1 else torch.cat(pending, dim=1)
                grad_W.add_(G @ h[start:end].to(dtype))
                pending, start = [], end
        if need_grad:
            ctx.save_for_backward(grad_h, grad_W)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_W = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), (grad_W * grad_out).to(torch.float32), None, None, None, None, None


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.windows = config.window_sizes()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if config.has_value_embed(i)})
        if config.resid_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        cos, sin = self._rotary(config.sequence_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.loss_chunk = 0  # rows per loss chunk; 0 = pick from the vocab size
        self.ce_kernel = softcap_ce_chunk

    def compile_loss(self):
        """Fuse the loss's elementwise work over the (chunk, V) logits; the trunk is compiled separately."""
        self.ce_kernel = torch.compile(softcap_ce_chunk, dynamic=False)

    def _rotary(self, seq_len, device=None):
        d = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        if self.config.rope_bf16:
            return freqs.cos().bfloat16().float(), freqs.sin().bfloat16().float()
        return freqs.cos(), freqs.sin()

    @torch.no_grad()
    def init_weights(self, seed=None):
        """Uniform fan-in init for the input projections, zeros for the output projections (each block starts
        as the identity), unit-variance embeddings and a near-zero head."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        C = self.config.n_embd
        bound = math.sqrt(3.0 / C)

        def fill(p, fn):
            tmp = torch.empty(p.shape, dtype=torch.float32)
            fn(tmp)
            p.copy_(tmp)

        # the reference's July 2026 init: a smaller embedding and MLP input, and residual scalars that keep more
        # of the stream and of x0 in early layers than in late ones (dev/LOG.md, session 12: the recipe)
        fill(self.wte.weight, lambda t: t.normal_(0.0, 0.8, generator=gen))
        fill(self.lm_head.weight, lambda t: t.normal_(0.0, 0.001, generator=gen))
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                fill(lin.weight, lambda t: t.uniform_(-bound, bound, generator=gen))
            fill(block.mlp.c_fc.weight, lambda t: t.uniform_(-0.4 * bound, 0.4 * bound, generator=gen))
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.zero_()
        for emb in self.value_embeds.values():
            fill(emb.weight, lambda t: t.uniform_(-bound, bound, generator=gen))
        if self.config.resid_scalars:
            depth = torch.linspace(0, 1, self.config.n_layer)
            self.resid_lambdas.copy_(1.15 - 0.10 * depth)
            self.x0_lambdas.copy_(0.20 - 0.15 * depth)
        if self.config.smear:  # starts off (lambda 0) with a gate that can open either way
            fill(self.smear_gate.weight, lambda t: t.uniform_(0.0, 0.02, generator=gen))
            self.smear_lambda.zero_()
        if self.config.backout:
            self.backout_lambda.fill_(0.2)
        cos, sin = self._rotary(self.config.sequence_len, self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        return self

    def param_groups(self):
        """Parameters by optimizer role: block matrices (Muon); token embedding, value embeddings, lm_head, the
        residual mix's two kinds of scalar and the smear/backout gates (AdamW, each role its own settings)."""
        scalars = self.config.resid_scalars
        gates = [self.smear_gate.weight, self.smear_lambda] if self.config.smear else []
        gates += [self.backout_lambda] if self.config.backout else []
        return {"matrix": list(self.blocks.parameters()), "embedding": [self.wte.weight],
                "value_embedding": [e.weight for e in self.value_embeds.values()], "lm_head": [self.lm_head.weight],
                "resid": [self.resid_lambdas] if scalars else [], "x0": [self.x0_lambdas] if scalars else [],
                "gate": gates}

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self):
        """Parameters that set the compute budget: block matrices + lm_head (embedding lookups are free)."""
        return sum(p.numel() for p in self.blocks.parameters()) + self.lm_head.weight.numel()

    def flops_per_token(self):
        """Training FLOPs per token: 6 per matmul parameter plus the attention scores and values."""
        c = self.config
        attn = sum(12 * c.n_head * c.head_dim * (w or c.sequence_len) for w in self.windows)
        return 6 * self.num_scaling_params() + attn

    def trunk(self, idx):
        B, T = idx.shape
        if T > self.cos.shape[0]:
            raise UserError(f"sequence of {T} tokens is longer than the model's context ({self.cos.shape[0]})")
        cos, sin = self.cos[None, :T, None], self.sin[None, :T, None]
        dtype = self.compute_dtype(idx.device)
        cos, sin = cos.to(dtype), sin.to(dtype)
        # the residual stream in the compute dtype (bf16 under autocast on GPUs, as the projections' outputs
        # are): fp32 would double its bytes and saved activations and add a cast before every matmul
        x = norm(self.wte(idx).to(dtype))
        if self.config.smear:
            x = smear(x, x[:, :-1], self.smear_gate.weight, self.smear_lambda)
        x0 = x
        for i, block in enumerate(self.blocks):
            if self.config.resid_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, self.windows[i], ve)
            if self.config.backout and i == self.config.backout_layer:
                mid = x
        if self.config.backout:
            x = x - self.backout_lambda.to(x.dtype) * mid
        return norm(x)

    @staticmethod
    def compute_dtype(device):
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32

    def forward(self, idx, targets=None, loss_weights=None, reduction="mean"):
        """No targets: logits (B, T, V) in fp32. With targets (negative = ignore):
        reduction="mean" -> mean loss over valid targets; "sum" -> sum(loss_weights * loss) (weights
        default to 1 on valid targets); "none" -> per-token losses (B, T), 0 where ignored."""
        h = self.trunk(idx)
        sc = self.config.softcap
        if targets is None:
            logits = self.lm_head(h).float()
            return sc * torch.tanh(logits / sc)
        B, T = targets.shape
        h, flat_targets = h.reshape(B * T, -1), targets.reshape(-1)
        chunk = self.loss_chunk or loss_chunk_rows(h.device, self.config.vocab_size)
        if reduction == "none":
            losses = []
            for s in range(0, B * T, chunk):
                logits = sc * torch.tanh((h[s:s + chunk] @ self.lm_head.weight.t()).float() / sc)
                losses.append(F.cross_entropy(logits, flat_targets[s:s + chunk].clamp(min=0), reduction="none"))
            return torch.cat(losses).view(B, T) * (targets >= 0)
        valid = (flat_targets >= 0).float()
        if loss_weights is None:
            weights = valid / valid.sum().clamp(min=1.0) if reduction == "mean" else valid
        else:
            weights = loss_weights.reshape(-1).float() * valid
        return fused_loss(h, self.lm_head.weight, flat_targets, weights, softcap=sc, chunk=chunk, kernel=self.ce_kernel)


def loss_chunk_rows(device, vocab_size):
    """Rows per loss chunk. On a CPU, 16 MB of fp32 logits, which stay in cache. On a GPU, 512 MB: every chunk
    reads W and read-modify-writes the fp32 (V, C) grad_W, so few large chunks (16 per 64K-token micro-batch)
    keep that traffic small against the chunk's matmuls (bench/roofline.py prices both)."""
    return max(16, (1 << 22 if device.type == "cpu" else 1 << 27) // vocab_size)


@torch.compiler.disable
def fused_loss(h, W, targets, weights, *, softcap, chunk, kernel=softcap_ce_chunk):
    return LinearSoftcapCrossEntropy.apply(h, W, targets, weights, softcap, chunk, kernel)


@torch.no_grad()
def bits_per_byte(model, batches, token_bytes, autocast=None):
    """Sum of target-token losses (nats) / (ln 2 * UTF-8 bytes of those targets). Targets that are special
    tokens have 0 bytes and are left out of both sums. Sums are all-reduced across ranks."""
    token_bytes = torch.as_tensor(token_bytes, dtype=torch.float32)
    total_nats = torch.zeros((), dtype=torch.float64)
    total_bytes = torch.zeros((), dtype=torch.float64)
    for x, y in batches:
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            loss = model(x, y, reduction="none").float().cpu()
        nbytes = token_bytes[y.clamp(min=0).cpu()] * (y >= 0).cpu()
        total_nats += (loss * (nbytes > 0)).sum().double()
        total_bytes += nbytes.sum().double()
    if dist.is_initialized():
        both = torch.stack([total_nats, total_bytes]).to(next(model.parameters()).device)
        dist.all_reduce(both)
        total_nats, total_bytes = both.cpu()
    if total_bytes == 0:
        return float("nan")
    return float(total_nats / (math.log(2) * total_bytes))


# ---- the single dial: shape flags and the scaling rules -----------------------------------------------------
def add_shape_args(g):
    """The model's shape flags (--depth and what refines it) on an argparse parser or group: pretrain's, which
    speedrun reads its presets with too."""
    g.add_argument("--depth", type=int, default=20, help="number of layers: sets width, heads and the budget")
    g.add_argument("--aspect-ratio", type=int, default=64, help="width = depth x this, rounded to the head dim")
    g.add_argument("--head-dim", type=int, default=128)
    g.add_argument("--n-kv-head", type=int, default=0, help="key/value heads for grouped attention (0 = all)")
    g.add_argument("--seq-len", type=int, default=2048)
    g.add_argument("--window-pattern", default="L", help="attention windows per layer, e.g. SSSL (S = T/4)")
    g.add_argument("--value-embeds", action=argparse.BooleanOptionalAction, default=True,
                   help="value embeddings on alternating layers, mixed in by a learned gate")
    g.add_argument("--smear", action=argparse.BooleanOptionalAction, default=True,
                   help="a gated share of the previous token's embedding added to each token's")
    g.add_argument("--backout", action=argparse.BooleanOptionalAction, default=True,
                   help="a learned share of the middle layer's output subtracted before the final norm")
    g.add_argument("--qk-scale", type=float, default=1.2, help="q and k multiplied by this after QK-norm")


D12_DEPTH = 12  # the reference point of the scaling rules: d12 with the run's own vocabulary


def scaling_params(depth, vocab_size, aspect_ratio=64, head_dim=128):
    """Block matrices + lm_head, from the shape alone (12 C^2 per layer: 4 C^2 attention, 8 C^2 MLP, for
    full multi-head attention)."""
    c = GPTConfig.from_depth(depth, vocab_size=vocab_size, aspect_ratio=aspect_ratio, head_dim=head_dim)
    kv = c.n_kv_head * c.head_dim
    per_layer = 2 * c.n_embd * c.n_embd + 2 * c.n_embd * kv + 8 * c.n_embd * c.n_embd
    return c.n_layer * per_layer + c.n_embd * vocab_size


def derive_hparams(depth, vocab_size, ratio=10.5, aspect_ratio=64, head_dim=128):
    """The scaling rules of the single dial: tokens = ratio x params; batch grows as D^0.383 around 2^19 at
    d12; AdamW's LRs scale with sqrt(batch / 2^19) (pretrain scales Muon's by (batch / 2^19)^0.383); weight decay
    with sqrt(B / 2^19) * D_d12 / D."""
    n = scaling_params(depth, vocab_size, aspect_ratio, head_dim)
    tokens = int(ratio * n)
    tokens_d12 = ratio * scaling_params(D12_DEPTH, vocab_size, aspect_ratio, head_dim)
    batch = 2 ** round(math.log2(2 ** 19 * (tokens / tokens_d12) ** 0.383))
    lr_scale = math.sqrt(batch / 2 ** 19)
    return dict(scaling_params=n, tokens=tokens, total_batch_size=batch, lr_scale=lr_scale,
                weight_decay=0.28 * lr_scale * tokens_d12 / tokens)


def describe(model: GPT) -> str:
    c = model.config
    windows = "".join("L" if w is None else "S" for w in model.windows)
    return (f"GPT depth {c.n_layer}, width {c.n_embd}, heads {c.n_head} (kv {c.n_kv_head}) x {c.head_dim}, "
            f"vocab {c.vocab_size}, context {c.sequence_len}, windows {windows}, value embeds {c.value_embeds}, "
            f"params {model.num_params():,} (scaling {model.num_scaling_params():,}), "
            f"FLOPs/token {model.flops_per_token():.3e}")


def config_to_dict(c: GPTConfig):
    return asdict(c)
