import sys
import types

import torch
import torch.nn.functional as F

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
