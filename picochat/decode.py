"""The decode path: the model's weights laid out for one-token steps, a static KV cache, and int8 weights.

    net = InferenceModel(model, dtype=None, compile=False)   # None: inference_dtype(device); torch.int8: int8 weights
    cache = StaticCache(model.config, batch, max_len, device, net.dtype, static=net.static)
    logits = net.logits(net.hidden(ids, cache))              # how Engine and the Scheduler step (prefill, decode)

Speed (bench/infer.py): InferenceModel mirrors GPT.trunk with the weights re-laid for decoding: q, k and v fused
into one matrix, every matrix in the layout a one-row product streams fastest, cut into one block of columns per CPU
thread so that all cores pull weights from memory (decode_layout), oneDNN-packed copies for products of several rows
(MKL reads the weights once per row there), bf16 on GPUs, Python floats for the residual scalars, a rotary in 4 ops,
and masks built once per step on the host (none at all when every row is at the same position). A one-token step on
CPU computes attention with two small matmuls: torch's CPU flash-attention kernel costs far more than the math for a
single query (and collapses with 2 OpenMP threads on a busy machine). The cache is head-major (B, H_kv, T, D) so
decode attention reads each head's keys contiguously, and attention covers only the filled prefix of the cache (or,
compiled on a GPU, the whole static cache: fixed shapes). Greedy and top-k skip the soft-cap of the full vocabulary:
it is monotonic, so only the k survivors pay for the tanh. tests/test_engine.py checks the layout token for token
against GPT.forward. The prepared weights are rebuilt when the model's parameters change (RL updates them in place
between generations) or the decoding thread's thread count does.

int8 weights (Engine(dtype=torch.int8), `chat --dtype int8`, `serve --dtype int8`; CPUs): every matrix a decode step
streams (q/k/v, the attention output, the MLP, lm_head) is stored as int8 with one scale per output channel
(picochat/int8.py), a quarter of fp32's bytes, and multiplied by int8_matmul; activations, the KV cache, the embeddings
and the small value-embedding gate stay fp32. Sampling, tool calls and stops are the same code as in fp32.
bench/int8.py measures what it costs in bits per byte and greedy tokens on a trained checkpoint.
"""
import threading

import torch
import torch.nn.functional as F

from picochat.common import UserError
from picochat.int8 import Int8Weight, int8_matmul, quantize_int8
from picochat.model import norm, smear


def inference_dtype(device) -> torch.dtype:
    # decode streams every weight once per step: bf16 halves that on GPUs; on CPUs bf16 matmuls are slow
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# ---- the decode layout --------------------------------------------------------------------------------------
class StaticCache:
    """Keys and values for `batch` rows of up to max_len positions; per layer (B, H_kv, max_len, D). lens[b] is
    how many positions of row b are filled: a Python list, so the host never waits on the device for it. The
    owner (Engine.generate, Scheduler) advances lens; InferenceModel only writes keys and values."""

    def __init__(self, config, batch, max_len, device, dtype, *, static=False):
        shape = (batch, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.lens = [0] * batch
        self.max_len = max_len
        self.prev = torch.zeros(batch, dtype=torch.long, device=device)  # each row's last token (for a smear)
        self.static = static  # attend over all max_len positions (fixed shapes for a compiled step)
        self._mark_static()

    def _mark_static(self):
        # a CUDA graph replays fixed addresses: the tensors it writes keys and values into must be declared so,
        # or the compiled step is not graphed at all; a new tensor (expand, keep) makes it re-record once
        if self.static:
            for t in self.k + self.v + [self.prev]:
                torch._dynamo.mark_static_address(t)

    @property
    def batch_size(self):
        return len(self.lens)

    def expand(self, n):
        """One row -> n copies (prefill once, then sample n continuations)."""
        assert self.batch_size == 1
        self.k = [t.expand(n, *t.shape[1:]).contiguous() for t in self.k]
        self.v = [t.expand(n, *t.shape[1:]).contiguous() for t in self.v]
        self.lens = self.lens * n
        self.prev = self.prev.expand(n).contiguous()
        self._mark_static()

    def keep(self, rows):
        """Keep only these rows, in this order (drops finished samples so they stop costing compute)."""
        idx = torch.tensor(rows, device=self.k[0].device)
        self.k = [t.index_select(0, idx) for t in self.k]
        self.v = [t.index_select(0, idx) for t in self.v]
        self.lens = [self.lens[r] for r in rows]
        self.prev = self.prev.index_select(0, idx)
        self._mark_static()


class InferenceModel:
    """GPT.trunk over a StaticCache, with the weights laid out for decoding (see the module docstring)."""

    def __init__(self, model, dtype=None, compile=False):
        self.model = model
        self.config = model.config
        self.device = model.lm_head.weight.device
        # dtype torch.int8: int8 weights (quantize_int8), activations, cache and embeddings in the device's
        # inference dtype. CPU only: int8_matmul's kernels are CPU ones, and GPUs decode in bf16 already
        self.int8 = dtype == torch.int8
        if self.int8 and self.device.type != "cpu":
            raise UserError(f"int8 weights run on CPUs only, not {self.device.type}: use bfloat16 there")
        self.dtype = inference_dtype(self.device) if self.int8 or dtype is None else dtype
        self._fingerprint = None
        self._lock = threading.Lock()
        self.compiled = compile
        # fixed-shape attention over the whole cache: what a compiled GPU step wants (no recompiles as the
        # context grows); on CPUs reading the unused part of the cache costs more than it saves
        self.static = compile and self.device.type == "cuda"
        self.refresh()
        # dynamic shapes: batch and cache length change from step to step
        self._hidden = torch.compile(self._hidden_impl, dynamic=True) if compile else self._hidden_impl
        self.gqa = self.config.n_head != self.config.n_kv_head  # a plain bool: dynamo must not make it symbolic
        # one-token steps over a static cache as CUDA graphs: eager, a d20 step is ~500 kernel launches of a few
        # microseconds each, several times the step's own memory time at small batches; replayed, it is one
        # launch. Nothing in such a step depends on a Python int that changes as decoding advances (positions
        # come as tensors), so a graph is recorded once per batch size and cache length, not once per position
        self._decode = (torch.compile(self._hidden_impl, dynamic=True, mode="reduce-overhead") if self.static
                        else self._hidden)
        self.use_packed = (self.device.type == "cpu" and self.dtype == torch.float32 and not compile
                           and not self.int8 and torch.backends.mkldnn.is_available())

    def _fingerprint_now(self):
        """What the layout depends on: the parameters, and on CPU the calling thread's torch thread count (the
        number of column blocks, see decode_layout; int8 weights have one layout for any thread count)."""
        parts = torch.get_num_threads() if self.device.type == "cpu" and not self.compiled and not self.int8 else 1
        return parts, tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def _linear_weights(self):
        """Per layer, its four matrices in nn.Linear's (out, in) layout, q, k and v fused into one."""
        for block in self.model.blocks:
            a = block.attn
            yield dict(qkv=torch.cat([a.c_q.weight, a.c_k.weight, a.c_v.weight]), wo=a.c_proj.weight,
                       fc=block.mlp.c_fc.weight, proj=block.mlp.c_proj.weight)

    @torch.no_grad()
    def refresh(self):
        """(Re)build the decode layout if the model's parameters (or the thread count) changed since the last build."""
        with self._lock:
            fp = self._fingerprint_now()
            if fp == self._fingerprint:
                return
            m, dt = self.model, self.dtype
            self.parts = fp[0]
            t = lambda w, parts=self.parts: decode_layout(w.detach().to(dt), parts)
            # the matrices every token streams (attention, MLP, lm_head); embeddings are looked up one row per
            # token, so they stay in dt (int8 would save memory there, not time)
            mat = quantize_int8 if self.int8 else t
            self.wte = m.wte.weight.detach().to(dt)
            self.head = mat(m.lm_head.weight)
            # rotary as x * [cos, cos] + [x2, x1] * [sin, -sin]: the same products and sums as apply_rotary
            # (bit for bit) in 4 ops instead of 8
            self.cos = torch.cat([m.cos, m.cos], dim=-1).to(dt)
            self.sin = torch.cat([m.sin, -m.sin], dim=-1).to(dt)
            # Python floats are cheapest eager, but a compiled step would bake them in and recompile whenever
            # training moves them (RL): there they are tensors
            scalars = (lambda p: p.detach().to(dt).clone()) if self.compiled else (lambda p: p.tolist())
            self.resid = (scalars(m.resid_lambdas), scalars(m.x0_lambdas)) if self.config.resid_scalars else None
            self.smear = ((m.smear_gate.weight.detach().to(dt).clone(), m.smear_lambda.detach().to(dt).clone())
                          if self.config.smear else None)
            self.backout = scalars(m.backout_lambda) if self.config.backout else None
            self.layers = []
            for i, (block, mats) in enumerate(zip(m.blocks, self._linear_weights())):
                a = block.attn
                self.layers.append(dict(
                    {k: mat(w) for k, w in mats.items()},
                    gate=t(a.ve_gate.weight, 1) if a.ve_gate is not None else None,
                    gate_channels=a.ve_gate_channels,
                    ve=m.value_embeds[str(i)].weight.detach().to(dt) if str(i) in m.value_embeds else None,
                    window=m.windows[i]))
            self._packed = None  # rebuilt on demand from the new weights
            self._fingerprint = fp
            if self.static:  # read by the CUDA-graphed step: fixed addresses, not inputs copied in at each replay
                for t in [self.wte, self.head, self.cos, self.sin, *(self.resid or ()), *(self.smear or ())]:
                    torch._dynamo.mark_static_address(t)
                for ly in self.layers:
                    for t in ly.values():
                        if torch.is_tensor(t):
                            torch._dynamo.mark_static_address(t)

    def packed(self, rows):
        """oneDNN-packed copies of every matrix for products of `rows` > 1 rows on CPU, or None. MKL's gemm streams
        the weights once per row for a few rows (batch 2 costs twice batch 1); oneDNN's packed kernel reads them
        once, but is slower than the transposed layout for a single row. Built on first use
        (they double the weight memory), so single-stream decoding never pays for them."""
        if rows < 2 or not self.use_packed:
            return None
        if self._packed is None:
            try:
                pack = lambda w: torch.ops.mkldnn._reorder_linear_weight(w.detach().to(self.dtype).contiguous(), 8)
                self._packed = dict(head=pack(self.model.lm_head.weight),
                                    layers=[{k: pack(w) for k, w in mats.items()} for mats in self._linear_weights()])
            except Exception:  # no oneDNN in this build: the plain layout works everywhere
                self._packed, self.use_packed = None, False
                return None
        return self._packed

    @property
    def max_positions(self):
        return self.cos.shape[0]

    def hidden(self, ids, cache=None, rows=None, start=None):
        """Final normed hidden states (B, T, C) for ids (B, T). With a cache, row b's tokens take positions
        start[b] .. start[b]+T-1 of cache row rows.start+b (rows: a slice of the cache's rows), and their keys
        and values are written there; without one, a plain causal forward of ids."""
        B, T = ids.shape
        start = [0] * B if start is None else start
        if max(start) + T > self.max_positions:
            raise UserError(f"context full: {max(start) + T} tokens exceed the model's context of {self.max_positions}")
        plan = self._plan(ids, cache, start)
        step = self._hidden
        if self.static and T == 1 and cache is not None and cache.static:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs have been used
            step = self._decode
        # the caller may sit in an autocast region (RL, evals): the layout already has the dtype it wants
        with torch.autocast(self.device.type, enabled=False):
            return step(ids, cache, rows if rows is not None else slice(0, B), plan)

    def _plan(self, ids, cache, start):
        """Host-side decisions for one forward (outside the compiled region): positions, rotary rows, how far
        attention reaches (L), and one attention mask per distinct window (None where every key is visible)."""
        B, T = ids.shape
        dev = ids.device
        s0 = start[0]
        uniform = all(s == s0 for s in start)
        if uniform:
            cos, sin = self.cos[None, s0:s0 + T, None], self.sin[None, s0:s0 + T, None]
            pos = torch.arange(s0, s0 + T, device=dev)[None]  # (1, T)
        else:
            pos = torch.tensor(start, device=dev)[:, None] + torch.arange(T, device=dev)[None]
            cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]
        static = cache is not None and cache.static
        L = T if cache is None else (cache.max_len if static else max(start) + T)
        masks = {}
        for window in {ly["window"] for ly in self.layers}:
            full = window is None or window >= L
            if cache is None or (uniform and s0 == 0 and L == T and not static):  # a fresh causal block
                if full:
                    masks[window] = (None, T > 1)
                else:
                    j = torch.arange(T, device=dev)
                    masks[window] = (((j[None, :] <= j[:, None]) & (j[:, None] - j[None, :] < window)), False)
            elif uniform and T == 1 and full and not static:  # decoding: every cached key is visible
                masks[window] = (None, False)
            else:
                j = torch.arange(L, device=dev)
                m = j[None, None, :] <= pos[:, :, None]  # (B or 1, T, L)
                if window is not None:
                    m = m & (pos[:, :, None] - j[None, None, :] < window)
                masks[window] = (m[:, None], False)
        bidx = torch.arange(B, device=dev)[:, None] if cache is not None and not uniform else None
        return dict(cos=cos, sin=sin, pos=pos, bidx=bidx, uniform=uniform, s0=s0, L=L, masks=masks,
                    packed=self.packed(B * T), static=static)

    def _hidden_impl(self, ids, cache, rows, plan):
        c = self.config
        B, T = ids.shape
        H, Hk, D = c.n_head, c.n_kv_head, c.head_dim
        cos, sin, pos, bidx = plan["cos"], plan["sin"], plan["pos"], plan["bidx"]
        packed = plan["packed"]
        x = norm(F.embedding(ids, self.wte))
        if self.smear is not None:  # each row's token before this block: its last one in the cache (none at 0)
            if cache is None:
                prev = x[:, :-1]
            else:
                before = torch.cat([cache.prev[rows][:, None], ids[:, :-1]], dim=1)
                prev = norm(F.embedding(before, self.wte)) * (pos > 0)[..., None].to(x.dtype)
                cache.prev[rows] = ids[:, -1]
            x = smear(x, prev, *self.smear)
        x0 = x
        for i, ly in enumerate(self.layers):
            pk = packed["layers"][i] if packed is not None else None

            def mm(a, key):
                if pk is None:
                    return matmul(a, ly[key])
                return torch.ops.mkldnn._linear_pointwise(a, pk[key], None, "none", [], "")

            if self.resid is not None:
                x = self.resid[0][i] * x + self.resid[1][i] * x0
            h = norm(x)
            qkv = mm(h, "qkv")
            qk = qkv[..., :(H + Hk) * D].view(B, T, H + Hk, D)
            v = qkv[..., (H + Hk) * D:].view(B, T, Hk, D)
            if ly["ve"] is not None:
                gate = c.ve_gate_scale * torch.sigmoid(matmul(h[..., :ly["gate_channels"]], ly["gate"]))  # (B, T, H_kv)
                v = v + gate.unsqueeze(-1) * F.embedding(ids, ly["ve"]).view(B, T, Hk, D)
            d = D // 2  # rotary, then QK-norm, per head: q and k go through together
            qk = norm(qk * cos + torch.cat([qk[..., d:], qk[..., :d]], dim=-1) * sin)
            if c.qk_scale != 1.0:
                qk = qk * c.qk_scale
            q, k = qk[:, :, :H], qk[:, :, H:]
            if cache is None:
                keys, values = k.transpose(1, 2), v.transpose(1, 2)
            else:
                kc, vc = cache.k[i][rows], cache.v[i][rows]
                if plan["static"] and plan["uniform"]:  # positions as a tensor: see InferenceModel._decode
                    kc.index_copy_(2, pos[0], k.transpose(1, 2))
                    vc.index_copy_(2, pos[0], v.transpose(1, 2))
                elif plan["uniform"]:
                    kc[:, :, plan["s0"]:plan["s0"] + T] = k.transpose(1, 2)
                    vc[:, :, plan["s0"]:plan["s0"] + T] = v.transpose(1, 2)
                else:
                    kc[bidx, :, pos] = k
                    vc[bidx, :, pos] = v
                keys, values = (kc, vc) if plan["static"] else (kc[:, :, :plan["L"]], vc[:, :, :plan["L"]])
            mask, causal = plan["masks"][ly["window"]]
            if T == 1 and self.device.type == "cpu":
                y = decode_attention(q.transpose(1, 2), keys, values, mask)
            else:
                y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                   is_causal=causal, enable_gqa=self.gqa)
            x = x + mm(y.transpose(1, 2).reshape(B, T, H * D), "wo")
            x = x + mm(mm(norm(x), "fc").relu_().square_(), "proj")
            if self.backout is not None and i == c.backout_layer:
                mid = x
        if self.backout is not None:
            x = x - self.backout[0] * mid
        return norm(x)

    def logits(self, h):
        """Raw logits in fp32, before the soft-cap (apply softcap() for the model's actual logits)."""
        packed = self.packed(h.numel() // h.shape[-1])
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(h, packed["head"], None, "none", [], "")
        return matmul(h, self.head).float()


def decode_layout(w, parts=1):
    """A weight w (out, in) laid out for the one-row products of decoding (matmul() computes F.linear(x, w)
    with it); the figures behind each choice are in dev/LOG.md (session 8):
    - One thread: short side first, the layout MKL's matrix-vector product streams fastest. W^T stored (in, out)
      when out >= in, nn.Linear's own (out, in) when out < in.
    - `parts` threads: W^T cut into `parts` blocks of columns, (parts, in, out / parts), multiplied with one
      bmm, whose OpenMP threads stream a block each. MKL does not thread a single-row product, so this is
      what puts the second core's memory bandwidth to work. Blocks narrower than 64 columns are not cut (many
      cores, small matrices): a product that small is not worth a thread."""
    if parts > 1 and w.shape[0] % parts == 0 and w.shape[0] // parts >= 64:
        return w.t().reshape(w.shape[1], parts, w.shape[0] // parts).transpose(0, 1).contiguous()
    return (w.t() if w.shape[0] >= w.shape[1] else w).contiguous()


def matmul(x, w):
    """F.linear(x, W) for w = decode_layout(W) or quantize_int8(W)."""
    if isinstance(w, Int8Weight):
        return int8_matmul(x, w)
    if w.dim() == 3:  # column blocks: (parts, rows, out / parts) -> (rows, out)
        y = torch.bmm(x.reshape(1, -1, x.shape[-1]).expand(w.shape[0], -1, -1), w)
        return y.permute(1, 0, 2).reshape(*x.shape[:-1], -1)
    # a square W is stored transposed, as is any W with out > in
    return x @ w if w.shape[0] == x.shape[-1] else F.linear(x, w)


def decode_attention(q, k, v, mask=None):
    """Attention of one new token per row on CPU: q (B, H, 1, D), k and v (B, H_kv, L, D), mask None or
    (B, 1, 1, L). Plain batched matmuls: torch's CPU flash-attention kernel spends far more on threading than
    on the math for a single query. Query heads are
    grouped per key/value head, as SDPA's enable_gqa does (query head h reads kv head h // (H / H_kv))."""
    B, H, _, D = q.shape
    Hk = k.shape[1]
    qg = q.reshape(B, Hk, H // Hk, D)
    scores = (qg @ k.transpose(-1, -2)) * (1.0 / D ** 0.5)  # (B, H_kv, G, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).view(B, H, 1, D)


def softcap(logits, cap):
    return cap * torch.tanh(logits / cap) if cap else logits
