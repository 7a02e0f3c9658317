import math

import pytest
import torch
import torch.nn.functional as F

from picochat.common import UserError
from picochat.model import GPT, GPTConfig, bits_per_byte


def tiny(**kw):
    cfg = GPTConfig.from_depth(kw.pop("depth", 2), vocab_size=kw.pop("vocab_size", 300),
                               sequence_len=kw.pop("sequence_len", 64), head_dim=kw.pop("head_dim", 32), **kw)
    model = GPT(cfg).init_weights(seed=0)
    with torch.no_grad():  # zero-initialized projections would hide bugs in attention and MLP paths
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def reference_loss(model, x, y):
    return F.cross_entropy(model(x).view(-1, model.config.vocab_size), y.view(-1), ignore_index=-1)


def test_from_depth_derivation():
    c = GPTConfig.from_depth(20)
    assert (c.n_embd, c.n_head, c.head_dim, c.n_layer) == (1280, 10, 128, 20)
    c = GPTConfig.from_depth(6, head_dim=64)
    assert (c.n_embd, c.n_head) == (384, 6)
    assert GPTConfig.from_depth(3).n_embd == 256  # 192 rounded up to the head dim
    with pytest.raises(UserError):
        GPTConfig.from_depth(0)
    with pytest.raises(UserError, match="must divide"):
        GPTConfig.from_depth(6, head_dim=64, n_kv_head=4)


@pytest.mark.parametrize("kw", [{}, {"value_embeds": True, "window_pattern": "SL"}, {"n_kv_head": 1, "depth": 4},
                                {"resid_scalars": False}])
def test_fused_loss_matches_plain_cross_entropy(kw):
    model = tiny(**kw)
    x = torch.randint(0, 300, (3, 50))
    y = torch.randint(0, 300, (3, 50))
    y[0, :7] = -1
    model.loss_chunk = 16  # several chunks, the last one partial
    loss = model(x, y)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = reference_loss(model, x, y)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(fused[n], p.grad, rtol=1e-4, atol=1e-7), n
    per_token = model(x, y, reduction="none")
    assert torch.allclose(per_token.sum() / (y >= 0).sum(), ref, rtol=1e-5)
    assert (per_token[0, :7] == 0).all()


def test_weighted_loss_and_no_valid_targets():
    model = tiny()
    x = torch.randint(0, 300, (2, 20))
    y = torch.full((2, 20), -1)
    loss = model(x, y)
    loss.backward()
    assert loss.item() == 0 and all(torch.isfinite(p.grad).all() for p in model.parameters())
    y = torch.randint(0, 300, (2, 20))
    w = torch.rand(2, 20)
    summed = model(x, y, loss_weights=w, reduction="sum")
    assert torch.allclose(summed, (model(x, y, reduction="none") * w).sum(), rtol=1e-5)


def test_sliding_window_limits_attention():
    model = tiny(window_pattern="SL", sequence_len=16)  # window 4 on layer 0
    assert model.windows == [4, None]
    model.blocks[1].attn.c_proj.weight.data.zero_()  # isolate the windowed layer
    model.blocks[1].mlp.c_proj.weight.data.zero_()
    model.config.resid_scalars and model.x0_lambdas.data.zero_()
    x = torch.randint(0, 300, (1, 16))
    x2 = x.clone()
    x2[0, 0] = (x[0, 0] + 1) % 300  # a token outside position 10's window
    with torch.no_grad():
        assert torch.allclose(model(x)[0, 10], model(x2)[0, 10], atol=1e-6)
        assert not torch.allclose(model(x)[0, 2], model(x2)[0, 2], atol=1e-6)


def test_context_guard():
    model = tiny(sequence_len=16)
    with pytest.raises(UserError, match="longer than the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bf16_autocast_close_to_fp32():
    model = tiny()
    x, y = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    ref = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, y)
    assert abs(low.item() - ref.item()) / ref.item() < 2e-2


@pytest.mark.parametrize("kw", [{}, {"value_embeds": True, "window_pattern": "SL"}])
def test_autocast_keeps_activations_in_bf16(kw):
    """Under autocast the residual stream, the norms' outputs, the MLP's hidden layer and the value embeddings
    stay bf16: every projection is fed bf16 (fp32 would double the bytes of the activations and add a cast
    before every matmul). The loss and every gradient still agree with the fp32 model to bf16 precision."""
    model = tiny(**kw)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 300, (2, 40), generator=gen), torch.randint(0, 300, (2, 40), generator=gen)
    ref = model(x, y)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    seen = {}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: seen.update({name: (args[0].dtype, out.dtype)}))
             for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, type(model.blocks[0])))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.trunk(x).dtype == torch.bfloat16
        low = model(x, y)
    low.backward()
    for h in hooks:
        h.remove()
    assert len(seen) > 8 and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in seen.values()), seen
    assert abs(low.item() - ref.item()) / ref.item() < 2e-2
    whole = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    for n, p in model.named_parameters():
        g, r = p.grad, ref_grads[n]
        assert g.dtype == torch.float32, n
        if n.endswith("lambdas"):
            # the per-layer scalars' gradients are sums over every activation of bf16 products that largely
            # cancel (as in the reference, whose stream is bf16 too): relative to themselves they err by up to
            # ~15% (24 seeds), against the gradient as a whole by under 1e-3
            assert (g - r).norm() <= 5e-3 * whole, n
        else:
            assert (g - r).norm() <= 5e-2 * r.norm() + 1e-6, n


def test_loss_matmuls_run_in_the_autocast_dtype():
    """Under autocast (bf16 on GPUs) the chunked loss's products run in bf16, fp32-accumulated into grad_W, and
    agree with the fp32 loss and gradients to bf16 precision; without autocast nothing changes."""
    from picochat.model import loss_chunk_rows
    model = tiny()
    model.loss_chunk = 16
    x, y = torch.randint(0, 300, (2, 40)), torch.randint(0, 300, (2, 40))
    ref = model(x, y)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, y)
    low.backward()
    assert abs(low.item() - ref.item()) / ref.item() < 2e-2
    for n in ("lm_head.weight", "wte.weight"):
        g, r = model.get_parameter(n).grad, ref_grads[n]
        assert g.dtype == torch.float32 and (g - r).norm() / r.norm() < 5e-2, n
    assert loss_chunk_rows(torch.device("cpu"), 32768) == 128 and loss_chunk_rows(torch.device("cuda"), 32768) == 4096
    # every product of the loss itself, fp32 hidden states in: bf16 operands under autocast, fp32 without
    from torch.utils._python_dispatch import TorchDispatchMode
    from picochat.model import fused_loss, softcap_ce_chunk

    class MatmulDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm_, torch.ops.aten.addmm):
                seen.add(args[-2].dtype)
            return func(*args, **(kwargs or {}))

    h, W = torch.randn(40, 64, requires_grad=True), torch.randn(300, 64, requires_grad=True)
    t, w = torch.randint(0, 300, (40,)), torch.ones(40)
    for autocast, want in ((True, {torch.bfloat16}), (False, {torch.float32})):
        seen = set()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), MatmulDtypes():
            fused_loss(h, W, t, w, softcap=15.0, chunk=16, kernel=softcap_ce_chunk)
        assert seen == want, (autocast, seen)


def test_bf16_loss_gathers_chunks_per_grad_W_product(monkeypatch):
    """Under bf16 autocast the chunks' gradients reach grad_W a few at a time (the last group partial): the
    result is the per-chunk one up to bf16 rounding, and both match fp32."""
    from picochat import model as model_module
    from picochat.model import fused_loss, softcap_ce_chunk
    gen = torch.Generator().manual_seed(0)
    h, W = torch.randn(80, 64, generator=gen), torch.randn(300, 64, generator=gen) * 0.1
    t, w = torch.randint(0, 300, (80,), generator=gen), torch.rand(80, generator=gen)

    def grads(stage_elements, autocast=True):
        monkeypatch.setattr(model_module, "LOSS_STAGE_ELEMENTS", stage_elements)
        hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fused_loss(hh.to(torch.bfloat16) if autocast else hh, WW, t, w, softcap=15.0, chunk=16,
                              kernel=softcap_ce_chunk)
        loss.backward()
        return loss.item(), hh.grad.float(), WW.grad

    ref_loss, ref_h, ref_W = grads(0, autocast=False)
    per_chunk = grads(0)                  # stage = chunk: one product per chunk of 16 rows
    gathered = grads(300 * 32)            # 32 rows per product: rows 0-31, 32-63, 64-79
    assert gathered[0] == per_chunk[0] and torch.equal(gathered[1], per_chunk[1])
    assert (gathered[2] - per_chunk[2]).norm() <= 1e-2 * per_chunk[2].norm()
    assert gathered[2].dtype == torch.float32 and not torch.equal(gathered[2], per_chunk[2])
    for got in (per_chunk, gathered):
        assert abs(got[0] - ref_loss) / ref_loss < 2e-2
        assert (got[1] - ref_h).norm() <= 5e-2 * ref_h.norm() and (got[2] - ref_W).norm() <= 5e-2 * ref_W.norm()


def test_compile_matches_eager():
    model = tiny(depth=1, vocab_size=128, head_dim=16)
    x, y = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    ref = model(x, y)
    compiled = torch.compile(model, dynamic=False)
    assert torch.allclose(compiled(x, y), ref, rtol=1e-4)


def test_flops_and_params():
    model = GPT(GPTConfig.from_depth(2, vocab_size=1000, sequence_len=128, head_dim=64))
    c = model.config
    assert model.num_scaling_params() == 2 * 12 * c.n_embd ** 2 + c.n_embd * 1000
    assert model.flops_per_token() == 6 * model.num_scaling_params() + 2 * 12 * c.n_embd * 128


# ---- bits per byte (the validation metric) ---------------------------------------------------------------------------
def test_bits_per_byte_by_hand(tok):
    model = tiny(vocab_size=tok.vocab_size, sequence_len=32).eval()
    ids = tok.encode("The cat sat on the mat. " * 4, prepend_bos=True)[:17]
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[0].double(), -1)
    nats = -sum(float(logp[t, ids[t + 1]]) for t in range(16))
    nbytes = sum(len(tok.decode([i]).encode()) for i in ids[1:])
    assert math.isclose(bits_per_byte(model, [(x, y)], tok.token_bytes()), nats / (math.log(2) * nbytes), rel_tol=1e-4)


REFERENCE_FEATURES = dict(value_embeds=True, window_pattern="SL", smear=True, backout=True, ve_gate_channels=12,
                          ve_gate_scale=3.0, qk_scale=1.2, short_window=5, rope_bf16=True)


def test_optional_features_are_off_by_default_and_train():
    plain = GPT(GPTConfig.from_depth(3, vocab_size=64, sequence_len=32, head_dim=16))
    assert not any(k.startswith(("smear", "backout")) for k in plain.state_dict())
    model = GPT(GPTConfig.from_depth(3, vocab_size=64, sequence_len=32, head_dim=16, **REFERENCE_FEATURES))
    model.init_weights(seed=0)
    with torch.no_grad():  # open the smear and give the blocks outputs, so every new parameter matters
        model.smear_lambda.fill_(0.5)
        for b in model.blocks:
            b.attn.c_proj.weight.normal_(0, 0.05)
            b.mlp.c_proj.weight.normal_(0, 0.05)
    assert model.windows == [5, None, None]
    groups = model.param_groups()
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    x = torch.randint(0, 64, (2, 16))
    model(x, targets=torch.roll(x, -1, 1)).backward()
    for p in (model.smear_gate.weight, model.smear_lambda, model.backout_lambda):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the smear looks one token back, never ahead: changing token 5 leaves every position before it as it was
    with torch.no_grad():
        y = x.clone()
        y[:, 5] = (y[:, 5] + 1) % 64
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) and not torch.allclose(a[:, 5:], b[:, 5:])
