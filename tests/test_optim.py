import pytest
import torch

from picochat.model import GPT, GPTConfig
from picochat.optim import (MuonAdamW, orthogonalize, build_optimizer, cosine_decay, muon_momentum, warmup_linear_decay,
                            warmup_stable_decay)


def test_adamw_part_equals_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 7))
    b = torch.nn.Parameter(a.detach().clone())
    ours = MuonAdamW([dict(kind="adamw", params=[a], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)])
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for step in range(20):
        g = torch.randn(5, 7)
        a.grad, b.grad = g.clone(), g.clone()
        lr = 0.01 * (1 - step / 40)  # schedules change lr between steps
        ours.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = lr
        ours.step()
        ref.step()
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32)])
def test_orthogonalize_is_near_orthogonal(shape):
    # singular values spread over 20x: the update must come out with all of them close to 1
    torch.manual_seed(0)
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(3, shape[0], k))
    V, _ = torch.linalg.qr(torch.randn(3, shape[1], k))
    s = torch.logspace(-1.3, 0, k)
    G = U @ torch.diag(s) @ V.mT
    X = orthogonalize(G, steps=5, dtype=torch.float32)
    sv = torch.linalg.svdvals(X)
    assert sv.min() > 0.8 and sv.max() < 1.2  # Polar Express lands singular values spread 20x in ~[0.84, 1.14]
    assert torch.allclose(X.norm(dim=(-2, -1)), torch.tensor(k ** 0.5).expand(3))
    # and the singular vectors are kept: X is close to U V^T
    assert torch.allclose(X, U @ V.mT, atol=0.1)


def test_muon_update_direction_and_scale():
    p = torch.nn.Parameter(torch.zeros(32, 64))
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=1.0, momentum=0.0, weight_decay=0.0, ns_steps=5)])
    p.grad = torch.randn(32, 64)  # wide random matrices are well conditioned
    opt.step()
    sv = torch.linalg.svdvals(-p.detach())
    assert sv.min() > 0.6 and sv.max() < 1.25
    # a tall matrix is scaled up by sqrt(rows/cols)
    q = torch.nn.Parameter(torch.zeros(128, 32))
    opt = MuonAdamW([dict(kind="muon", params=[q], lr=1.0, momentum=0.0, weight_decay=0.0, ns_steps=5)])
    q.grad = torch.randn(128, 32)
    opt.step()
    sv = torch.linalg.svdvals(q.detach()) / 2.0
    assert sv.min() > 0.6 and sv.max() < 1.25


@pytest.mark.parametrize("shape", [(64, 16), (16, 64)])
def test_normuon_gives_every_row_of_a_tall_update_and_every_column_of_a_wide_one_the_same_size(shape):
    # one row (tall) or column (wide) of the gradient dominates; beta2 = 0 makes the running mean square
    # this step's own, so the update's rows/columns must come out equal, at the orthogonal matrix's norm
    torch.manual_seed(0)
    g = torch.randn(shape)
    g[3] *= 50.0
    g[:, 3] *= 50.0
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=1.0, momentum=0.0, beta2=0.0, weight_decay=0.0, ns_steps=5)])
    p.grad = g
    opt.step()
    u = -p.detach() / max(1.0, shape[0] / shape[1]) ** 0.5
    sizes = u.norm(dim=1) if shape[0] >= shape[1] else u.norm(dim=0)
    assert torch.allclose(sizes, sizes.mean().expand_as(sizes), rtol=1e-4)
    assert torch.allclose(u.norm(), torch.tensor(min(shape) ** 0.5), rtol=1e-4)
    assert opt.state[p]["second_moment"].shape == ((shape[0], 1) if shape[0] >= shape[1] else (1, shape[1]))


def test_muon_state_from_before_normuon_resumes():
    p = torch.nn.Parameter(torch.randn(8, 16))
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=0.1, momentum=0.9, weight_decay=0.0, ns_steps=5)])
    old = {"state": {0: {"momentum_buffer": torch.randn(8, 16)}}, "groups": opt.shard_state()["groups"]}
    opt.load_shards([old])
    p.grad = torch.randn(8, 16)
    opt.step()
    assert opt.state[p]["second_moment"].shape == (1, 16) and torch.isfinite(p).all()


def test_cautious_weight_decay_only_where_signs_agree():
    p = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [1.0, -1.0]]))
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=0.1, momentum=0.0, weight_decay=0.5, ns_steps=5)])
    before = p.detach().clone()
    p.grad = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    U = orthogonalize(p.grad[None], 5, torch.float32)[0]
    opt.step()
    agree = (U * before) > 0
    expected = before - 0.1 * 0.5 * before * agree - 0.1 * U
    assert torch.allclose(p.detach(), expected, atol=1e-6)


def test_build_optimizer_covers_every_parameter_once():
    config = GPTConfig.from_depth(2, vocab_size=300, sequence_len=32, head_dim=32, value_embeds=True)
    model = GPT(config).init_weights(0)
    opt = build_optimizer(model)
    seen = [p for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(map(id, seen))) == len(list(model.parameters()))
    for g in opt.param_groups:
        if g["kind"] == "muon":
            assert all(p.ndim == 2 for p in g["params"])


def test_newton_schulz_runs_in_the_compute_dtype(monkeypatch):
    """bf16 where the model computes in bf16 (GPUs; CPUs when PICOCHAT_DTYPE asks), fp32 elsewhere; ns_dtype
    overrides."""
    monkeypatch.setattr("picochat.common.cpu_has_bf16_units", lambda: True)  # no emulation warning here
    config = GPTConfig.from_depth(1, vocab_size=64, sequence_len=16, head_dim=16)
    opt = build_optimizer(GPT(config).init_weights(0))
    for name, want in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        monkeypatch.setenv("PICOCHAT_DTYPE", name)
        assert opt._ns_dtype(torch.device("cpu")) == want
    opt.ns_dtype = torch.bfloat16
    assert opt._ns_dtype(torch.device("cpu")) == torch.bfloat16


def test_schedules():
    assert warmup_stable_decay(0, 100) == 1.0 and warmup_stable_decay(34, 100) == 1.0
    assert abs(warmup_stable_decay(100, 100) - 0.05) < 1e-9
    assert warmup_stable_decay(0, 100, warmup_steps=10) == 0.1
    assert 0.05 < warmup_stable_decay(70, 100) < 1.0
    assert muon_momentum(0, 2000) == 0.85 and abs(muon_momentum(400, 2000) - 0.97) < 1e-9
    assert abs(muon_momentum(700, 2000) - 0.97) < 1e-9 and abs(muon_momentum(2000, 2000) - 0.90) < 1e-9
    assert 0.90 < muon_momentum(1500, 2000) < 0.97  # warm-down starts at step 700 of 2000 (65%)
    assert muon_momentum(119, 120) < 0.90  # a run shorter than the warm-up only warms up
    assert cosine_decay(0, 100) == 1.0 and abs(cosine_decay(50, 100) - 0.5) < 1e-9 and cosine_decay(100, 100) < 1e-12


def test_fine_tuning_schedule_is_warm_up_then_one_line():
    """SFT's and RL's multiplier: warm-up, then a straight line from 1 to final_frac at the last step (no flat
    part); without warm-up it is the line RL computed inline."""
    assert warmup_linear_decay(0, 10, warmup_steps=2) == 0.5 and warmup_linear_decay(2, 10, warmup_steps=2) == 1.0
    assert warmup_linear_decay(6, 10, warmup_steps=2) == 0.5
    assert abs(warmup_linear_decay(10, 10, warmup_steps=2, final_frac=0.1) - 0.1) < 1e-12
    for step in range(11):
        assert warmup_linear_decay(step, 10, final_frac=0.2) == 1.0 - step / max(1, 10) * (1.0 - 0.2)


def test_state_roundtrip_through_shards():
    model = GPT(GPTConfig.from_depth(1, vocab_size=100, sequence_len=16, head_dim=32)).init_weights(0)
    opt = build_optimizer(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    shard = opt.shard_state()
    opt2 = build_optimizer(model)
    opt2.load_shards([shard])
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[p][k]) if torch.is_tensor(v) else v == opt2.state[p][k]


def test_grad_wire_auto_is_bf16_only_between_gpus():
    from picochat.optim import wire_dtype_for
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert wire_dtype_for("auto", cuda, 8) == torch.bfloat16
    assert wire_dtype_for("auto", cuda, 1) == torch.float32  # one process sends nothing
    assert wire_dtype_for("auto", cpu, 2) == torch.float32  # gloo runs keep their exact equivalence
    assert wire_dtype_for("bf16", cpu, 2) == torch.bfloat16 and wire_dtype_for("fp32", cuda, 8) == torch.float32
