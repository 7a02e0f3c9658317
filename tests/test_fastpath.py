import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from picochat import fastpath


def test_fa3_wrapper_returns_the_input_dtype(monkeypatch):
    """FlashAttention-3 computes in bf16; a forward outside autocast (fp32, as the GPU check's agreement section
    runs it) must get fp32 back. A stand-in flash_attn_interface with FA3's signature runs SDPA in bf16."""
    calls = []

    def flash_attn_func(q, k, v, causal, window_size):
        calls.append((q.dtype, window_size))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2), None  # with the log-sum-exp, as some versions return it

    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    attention = fastpath.flash_attention_3(torch.device("cuda"))
    q, k, v = (torch.randn(2, 8, 3, 16) for _ in range(3))
    out = attention(q, k, v, None)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert calls[-1] == (torch.bfloat16, (-1, -1))
    assert attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 4).dtype == torch.bfloat16
    assert calls[-1][1] == (3, 0)  # a window of 4: the query and the 3 before it


def test_fa3_from_the_kernels_hub_when_not_installed(monkeypatch):
    """Without flash_attn_interface, FA3 comes from the `kernels` package (a prebuilt kernel from the hub, as the
    reference loads it); with neither, or when the download fails (offline), there is no FA3 and no error."""
    fetched = []

    def get_kernel(name):
        fetched.append(name)
        return types.SimpleNamespace(flash_attn_interface=types.SimpleNamespace(flash_attn_func=lambda *a, **k: None))

    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # None in sys.modules: the import fails
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_kernel=get_kernel))
    assert fastpath.flash_attention_3(torch.device("cuda")) is not None
    assert fetched == ["kernels-community/flash-attn3"]

    def offline(name):
        raise OSError("no network")

    monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_kernel=offline))
    assert fastpath.flash_attention_3(torch.device("cuda")) is None
    monkeypatch.setitem(sys.modules, "kernels", None)
    assert fastpath.flash_attention_3(torch.device("cuda")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # FA3 is Hopper only
    monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_kernel=get_kernel))
    assert fastpath.flash_attention_3(torch.device("cuda")) is None and len(fetched) == 1


def test_dense_window_warning_only_where_windows_fall_back():
    from picochat.model import GPT, GPTConfig
    cfg = dict(vocab_size=64, sequence_len=64, head_dim=16)
    windowed = GPT(GPTConfig.from_depth(4, window_pattern="SSSL", **cfg))
    full = GPT(GPTConfig.from_depth(4, window_pattern="L", **cfg))
    cuda = torch.device("cuda")
    warning = fastpath.dense_window_warning(windowed, cuda, "sdpa")
    assert warning.startswith("WARNING: 3 of 4 layers use sliding windows") and "--window-pattern L" in warning
    assert fastpath.dense_window_warning(windowed, cuda, "flash-attention-3") is None
    assert fastpath.dense_window_warning(full, cuda, "sdpa") is None
    assert fastpath.dense_window_warning(windowed, torch.device("cpu"), "sdpa") is None


def test_flex_windows_match_dense_mask_attention(monkeypatch):
    """FlexAttention's block-sparse sliding windows give SDPA's dense-mask outputs (forward: torch has no CPU
    backward for flex), with grouped heads too; full layers keep SDPA; the training step's hook is swapped."""
    from picochat import model as model_module
    from picochat.model import GPT, GPTConfig, sdpa_attention
    monkeypatch.setattr(model_module, "attention", sdpa_attention)  # restored after the swap below
    T = 256
    attention = fastpath.flex_window_attention(torch.device("cpu"), T, [64, 128, None])
    g = torch.Generator().manual_seed(0)
    for hq, hkv in ((4, 4), (4, 2)):
        q = torch.randn(2, T, hq, 16, generator=g)
        k, v = (torch.randn(2, T, hkv, 16, generator=g) for _ in range(2))
        for window in (64, 128, None):
            got, want = attention(q, k, v, window), sdpa_attention(q, k, v, window)
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), (hq, hkv, window)
    model = GPT(GPTConfig.from_depth(4, vocab_size=64, sequence_len=T, head_dim=16, window_pattern="SSSL"))
    x = torch.randint(0, 64, (1, T))
    with torch.no_grad():
        dense = model.init_weights(seed=0)(x)
        assert fastpath.use_fast_attention(torch.device("cpu"), flex=True, seq_len=T, windows=model.windows) \
            == "flex-attention (sliding windows) + sdpa"
        assert model_module.attention is not sdpa_attention
        assert torch.allclose(model(x), dense, atol=1e-4)
    assert fastpath.use_fast_attention(torch.device("cpu"), flex=True, seq_len=T, windows=[None]) == "sdpa"


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that ops make while it is active (storages counted once, those
    in `held` not at all: the parameters, buffers and optimizer state, counted from the objects)."""

    def __init__(self, held):
        super().__init__()
        self.held, self.live, self.peak = held, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}  # before a freed address is reused
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.held:
                s = t.untyped_storage()
                self.live.setdefault(s._cdata, (StorageWeakRef(s), s.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def measure_memory(config, B, T, bf16, checkpointing=False, training=True):
    """What a real CPU step holds: parameter and optimizer-state bytes (from the objects), the bytes autograd
    saves for the backward (unique storages, parameters left out) and the peak of all of it. Training runs two
    micro-batches, so the gradients of the first are held through the second, as under accumulation."""
    from contextlib import nullcontext
    from picochat.model import GPT
    from picochat.optim import build_optimizer
    model = GPT(config).init_weights(seed=0)
    if checkpointing:
        fastpath.checkpoint_blocks(model)
    opt = build_optimizer(model)
    opt.init_state()
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)] if training else []
    owned = [*model.parameters(), *model.buffers(), *state]
    held = {t.untyped_storage()._cdata for t in owned}
    fixed = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage()._cdata: t for t in owned}.values())
    saved = {}

    def pack(t):
        if t.untyped_storage()._cdata not in held:
            saved.setdefault(t.untyped_storage()._cdata, t.untyped_storage().nbytes())
        return t

    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, config.vocab_size, (B, T), generator=g) for _ in range(2 if training else 1)]
    mode = LiveBytes(held)
    with mode:
        for i, x in enumerate(xs):
            if not training:
                with torch.no_grad(), autocast():
                    model(x, x, reduction="none")
                continue
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if i == 0 else nullcontext(), autocast():
                loss = model(x, x)
            loss.backward()
            loss = None
    return dict(params=sum(p.numel() * 4 for p in model.parameters()), optimizer=sum(t.nbytes for t in state),
                saved=sum(saved.values()), peak=fixed + mode.peak)


# (depth, rows, seq len, config, bf16, checkpointing, training): each part of the estimate leads once. The bf16
# training points are half as wide (aspect ratio 32): on a CPU without bf16 units (AVX2 only) bf16 matmuls are
# emulated at ~1/30 of fp32's speed, and the bytes do not depend on the speed
MEMORY_POINTS = [
    (2, 8, 128, dict(vocab_size=8192), False, False, True),                          # the loss chunks
    (4, 16, 128, dict(vocab_size=256, aspect_ratio=32), True, False, True),          # the blocks' activations
    (4, 8, 128, dict(vocab_size=512, aspect_ratio=32, window_pattern="SSSL", value_embeds=True), True, False, True),
    (3, 4, 256, dict(vocab_size=512, n_kv_head=1), False, True, True),                # grouped heads, checkpointed
    (4, 16, 128, dict(vocab_size=256, aspect_ratio=32), True, True, True),           # checkpointed, bf16
    (6, 8, 256, dict(vocab_size=512), True, False, False),                            # an evaluation forward
    (2, 8, 128, dict(vocab_size=8192), False, False, False),
]


@pytest.mark.parametrize("depth,B,T,kw,bf16,checkpointing,training", MEMORY_POINTS)
def test_memory_estimate_matches_cpu_measurements(depth, B, T, kw, bf16, checkpointing, training):
    """estimate_training_memory against a real CPU step: parameters and optimizer state exactly, the bytes
    autograd saves within 2%, the peak within 10% (the tolerances its docstring states)."""
    from picochat.model import GPTConfig
    config = GPTConfig.from_depth(depth, sequence_len=T, head_dim=32, **kw)
    dtype = torch.bfloat16 if bf16 else torch.float32
    est = fastpath.estimate_training_memory(config, B, T, dtype=dtype, device_type="cpu",
                                            checkpointing=checkpointing, training=training)
    got = measure_memory(config, B, T, bf16, checkpointing, training)
    assert est["params"] == got["params"]
    assert est["optimizer"] == got["optimizer"]
    if training:
        e = 2 if bf16 else 4
        # the loss saves grad_W (fp32, V x C) and grad_h; checkpointed blocks keep no weight copies
        saved = (est["activations"] + est["weight_copies"] * (not checkpointing)
                 + 4 * config.vocab_size * config.n_embd + B * T * config.n_embd * e)
        assert abs(saved / got["saved"] - 1) < 0.02, (saved, got["saved"])
    assert abs(est["total"] / got["peak"] - 1) < 0.10, (est, got["peak"])


def test_estimate_scales_and_shards_as_it_should():
    from picochat.model import GPTConfig
    config = GPTConfig.from_depth(12, vocab_size=32768, sequence_len=2048, value_embeds=True)
    one, two = (fastpath.estimate_training_memory(config, B, 2048) for B in (8, 16))
    assert two["activations"] == 2 * one["activations"] - 2048 * config.head_dim * 2  # cos/sin are per position
    assert two["params"] == one["params"] and two["optimizer"] == one["optimizer"]
    sharded = fastpath.estimate_training_memory(config, 8, 2048, world=8)
    assert sharded["optimizer"] == one["optimizer"] // 8 and sharded["grads"] == one["grads"]
    ckpt = fastpath.estimate_training_memory(config, 16, 2048, checkpointing=True)
    assert ckpt["activations"] < two["activations"] / 5 and ckpt["total"] < two["total"]
    assert fastpath.estimate_training_memory(config, 16, 2048, training=False)["total"] < two["total"] / 2


def test_auto_batch_for_an_evaluation_on_cpu():
    """optimizer=None sizes a forward without grad: on a CPU the largest divisor up to 32 that the estimate
    lets fit (no probe), the preferred one where it divides."""
    from picochat.model import GPT, GPTConfig
    model = GPT(GPTConfig.from_depth(2, vocab_size=64, sequence_len=32, head_dim=16)).init_weights(seed=0)
    cpu = torch.device("cpu")
    B, how = fastpath.find_device_batch_size(model, None, 32, rows_per_rank=8, device=cpu, autocast=None)
    assert B == 8 and how.startswith("auto: cpu, no probe")
    assert fastpath.find_device_batch_size(model, None, 32, rows_per_rank=64, device=cpu, autocast=None)[0] == 32
