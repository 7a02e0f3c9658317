"""picochat/decode.py: the decode layout computes F.linear, InferenceModel and its StaticCache match GPT.forward
(every optional model feature, 1 and 2 threads), the compiled step compiles once, and int8 weights stay close to
float32. The engine's own tests (generation, the tool, sampling, streaming text) are in test_engine.py and build
their models with this file's tiny()."""
import pytest
import torch

from picochat.decode import InferenceModel, StaticCache, decode_layout, matmul, softcap
from picochat.int8 import Int8Weight
from picochat.engine import Engine
from picochat.model import GPT, GPTConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny(vocab=300, depth=2, seq=64, scale=0.05, head_scale=1.0, **kw):
    cfg = GPTConfig.from_depth(depth, vocab_size=vocab, sequence_len=seq, head_dim=32, **kw)
    model = GPT(cfg).init_weights(seed=0)
    with torch.no_grad():  # zero-initialized projections and a near-zero head would hide bugs (and tie logits)
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
        model.lm_head.weight.mul_(head_scale)
    return model.eval()


# every optional feature of the reference's recent models at once (see GPTConfig)
REFERENCE_FEATURES = {"value_embeds": True, "window_pattern": "SL", "depth": 3, "smear": True, "backout": True,
                      "ve_gate_channels": 12, "ve_gate_scale": 3.0, "qk_scale": 1.2, "short_window": 7,
                      "rope_bf16": True}



@pytest.fixture
def threads(request):
    """Run the test with torch at request.param threads (the decode layout follows the thread count)."""
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(1)


# ---- the decode layout ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_f,in_f", [(192, 64), (64, 192), (128, 128), (130, 64), (96, 48)])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_decode_layout_computes_linear(out_f, in_f, parts):
    w = torch.randn(out_f, in_f)
    stored = decode_layout(w, parts)
    # column blocks only when they divide the outputs evenly, 64 columns or more each
    assert stored.dim() == (3 if parts > 1 and out_f % parts == 0 and out_f // parts >= 64 else 2)
    for shape in [(1, in_f), (5, in_f), (2, 3, in_f), (1, 1, in_f)]:
        x = torch.randn(shape)
        y = matmul(x, stored)
        assert y.shape == (*shape[:-1], out_f)
        assert torch.allclose(y, torch.nn.functional.linear(x, w), atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("kw", [{}, {"value_embeds": True, "window_pattern": "SSL", "depth": 3},
                                {"n_kv_head": 1, "depth": 4}, {"resid_scalars": False}, REFERENCE_FEATURES])
def test_inference_model_matches_model_forward(kw, threads):
    model = tiny(**kw)
    net = InferenceModel(model)
    assert net.parts == threads  # one column block per thread (see decode_layout)
    x = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        ref = softcap(model.lm_head(model.trunk(x)).float(), 15.0)
        assert torch.allclose(softcap(net.logits(net.hidden(x)), 15.0), ref, atol=1e-5)
        assert torch.allclose(model(x), ref, atol=1e-5)
        # prefill then decode, all rows together
        cache = StaticCache(model.config, 3, 64, "cpu", torch.float32)
        parts = [net.logits(net.hidden(x[:, :25], cache, slice(0, 3), [0] * 3))]
        parts += [net.logits(net.hidden(x[:, t:t + 1], cache, slice(0, 3), [t] * 3)) for t in range(25, 40)]
        assert torch.allclose(softcap(torch.cat(parts, 1), 15.0), ref, atol=1e-5)
        # rows at different positions (the server's slots), decoded together
        cache = StaticCache(model.config, 3, 64, "cpu", torch.float32)
        lens = [9, 21, 30]
        for b, n in enumerate(lens):
            net.hidden(x[b:b + 1, :n], cache, slice(b, b + 1), [0])
        for t in range(6):
            ids = torch.tensor([[x[b, lens[b] + t]] for b in range(3)])
            out = softcap(net.logits(net.hidden(ids, cache, slice(0, 3), [n + t for n in lens])), 15.0)
            for b in range(3):
                assert torch.allclose(out[b, 0], ref[b, lens[b] + t], atol=1e-5)


@pytest.mark.parametrize("kw", [{"window_pattern": "SL"}, REFERENCE_FEATURES])
def test_static_cache_attends_over_the_whole_cache(kw):
    model = tiny(seq=32, **kw)
    net = InferenceModel(model)
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        ref = softcap(model.lm_head(model.trunk(x)).float(), 15.0)
        cache = StaticCache(model.config, 2, 32, "cpu", torch.float32, static=True)
        parts = [net.logits(net.hidden(x[:, :12], cache, slice(0, 2), [0, 0]))]
        parts += [net.logits(net.hidden(x[:, t:t + 1], cache, slice(0, 2), [t, t])) for t in range(12, 20)]
    assert torch.allclose(softcap(torch.cat(parts, 1), 15.0), ref, atol=1e-5)


def test_layout_follows_the_thread_count(tok):
    """The layout is rebuilt for the thread count of the thread that decodes (the server's scheduler runs with
    its own), and gives the same tokens."""
    engine = Engine(tiny(vocab=tok.vocab_size), tok, tool=False)
    engine.stop_ids = frozenset()
    runs = {}
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.setdefault(n, []).append([t[0] for t, _ in engine.generate([5, 6, 7], 1, 12, temperature=0)])
            assert engine.net.parts == n
    finally:
        torch.set_num_threads(1)
    assert runs[1][0] == runs[1][1] == runs[2][0]


def test_layout_follows_in_place_weight_updates():
    """RL updates the model between generations: the engine must not decode with stale weights."""
    model = tiny()
    net = InferenceModel(model)
    x = torch.randint(0, 300, (1, 10))
    before = net.logits(net.hidden(x)).clone()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    net.refresh()
    after = net.logits(net.hidden(x))
    assert not torch.allclose(before, after)
    with torch.no_grad():
        assert torch.allclose(softcap(after, 15.0), model(x), atol=1e-4)


def test_compiled_decode_step_matches():
    model = tiny(depth=1)
    x = torch.randint(0, 300, (2, 12))
    net = InferenceModel(model, compile=True)
    with torch.no_grad():
        ref = softcap(model.lm_head(model.trunk(x)).float(), 15.0)
        cache = StaticCache(model.config, 2, 16, "cpu", torch.float32, static=True)
        parts = [net.logits(net.hidden(x[:, :8], cache, slice(0, 2), [0, 0]))]
        parts += [net.logits(net.hidden(x[:, t:t + 1], cache, slice(0, 2), [t, t])) for t in range(8, 12)]
    assert torch.allclose(softcap(torch.cat(parts, 1), 15.0), ref, atol=1e-4)


def test_static_decode_steps_compile_once_not_once_per_position():
    """A CUDA graph is recorded per distinct compiled graph: the static one-token step (what InferenceModel
    graphs on GPUs) must depend on no Python int that moves as decoding advances. Checked here with a counting
    backend on CPU: positions advance, rows get dropped (keep), the weights change (RL), and the step compiles
    once per batch-size class, with the eager layout's outputs."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    model = tiny(window_pattern="SL", seq=32, value_embeds=True)
    net = InferenceModel(model)
    net.compiled = net.static = True  # the GPU settings, on this CPU
    net._fingerprint = None
    net.refresh()
    counter = CompileCounter()
    net._decode = torch.compile(net._hidden_impl, dynamic=True, backend=counter)
    eager = InferenceModel(model)
    x = torch.randint(0, 300, (3, 20))
    with torch.no_grad():
        cache = StaticCache(model.config, 3, 32, "cpu", torch.float32, static=True)
        ref = StaticCache(model.config, 3, 32, "cpu", torch.float32)
        net.hidden(x[:, :8], cache, slice(0, 3), [0] * 3)
        eager.hidden(x[:, :8], ref, slice(0, 3), [0] * 3)
        for t in range(8, 20):
            if t == 14:  # a row finished; and a training step moved the weights
                cache.keep([0, 2])
                ref.keep([0, 2])
                x = x[[0, 2]]
                for p in model.parameters():
                    p.mul_(1.01)
                net.refresh()
                eager.refresh()
            B = x.shape[0]
            got = net.logits(net.hidden(x[:, t:t + 1], cache, slice(0, B), [t] * B))
            want = eager.logits(eager.hidden(x[:, t:t + 1], ref, slice(0, B), [t] * B))
            assert torch.allclose(got, want, atol=1e-4), t
            if t == 8:
                first = counter.frame_count
    assert first == 1 and counter.frame_count <= 2, counter.frame_count  # batch 3, then 2: one dynamic graph


# ---- int8 weights -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 1, "depth": 4}, REFERENCE_FEATURES])
def test_int8_logits_close_to_float32(kw):
    """Tolerance: RMS error under 3% of the logits' spread (argmax mostly unchanged). Each weight moves by at
    most half a step, max|row| / 254, uniformly: an RMS of ~0.8% of a Gaussian row's own spread (its largest
    entry is ~3.5 of those); the 2-4 layers' products in series (qkv,
    wo, fc, proj, then lm_head) add their errors roughly in quadrature: ~2% at depth 4 (measured 1.3-2.1%)."""
    model = tiny(**kw)
    net = InferenceModel(model, dtype=torch.int8)
    assert isinstance(net.head, Int8Weight) and net.dtype == torch.float32 and net.packed(8) is None
    x = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = softcap(model.lm_head(model.trunk(x)).float(), 15.0)
        whole = softcap(net.logits(net.hidden(x)), 15.0)  # 120 rows per product: the dequantizing path
        cache = StaticCache(model.config, 3, 64, "cpu", torch.float32)
        parts = [net.logits(net.hidden(x[:, :25], cache, slice(0, 3), [0] * 3))]
        parts += [net.logits(net.hidden(x[:, t:t + 1], cache, slice(0, 3), [t] * 3)) for t in range(25, 40)]
        steps = softcap(torch.cat(parts, 1), 15.0)  # one token per row per step: the int8 kernel
    for out in (whole, steps):
        assert (out - ref).pow(2).mean().sqrt() < 0.03 * ref.std()
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
