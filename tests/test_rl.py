"""RL: advantages, masks, the policy-gradient weights (against autograd on the explicit objective), that an
update raises the log-probability of rewarded replies, pass@k, bad input, and exact resume of `picochat rl`."""
import copy
import json
import shutil
from contextlib import nullcontext

import torch

from picochat import checkpoint, rl
from picochat.cli import main
from picochat.optim import build_optimizer
from test_sft import tiny_model, save_base


def test_advantages():
    a = rl.advantages([1, 0, 0, 1])
    assert a.tolist() == [0.5, -0.5, -0.5, 0.5]
    s = rl.advantages([1, 0, 0, 1], std_norm=True)
    assert torch.allclose(s, torch.tensor([0.5, -0.5, -0.5, 0.5]) / torch.tensor([1.0, 0, 0, 1]).std(), atol=1e-5)
    for std_norm in (False, True):  # a group that all agrees teaches nothing, and never NaN
        assert rl.advantages([1, 1, 1], std_norm).tolist() == [0, 0, 0]
        assert rl.advantages([0, 0], std_norm).tolist() == [0, 0]
    adv = rl.group_advantages([1, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1], False)
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))


def test_pack_sequences_masks_prompt_and_tool_output():
    # prompt 3 tokens, then sampled 10, forced 11 12 (tool output), sampled 13
    seqs = [[1, 2, 3, 10, 11, 12, 13], [1, 2, 3, 20]]
    masks = [[0, 0, 0, 1, 0, 0, 1], [0, 0, 0, 1]]
    x, y = rl.pack_sequences(seqs, masks, pad_id=0)
    assert x.tolist() == [[1, 2, 3, 10, 11, 12], [1, 2, 3, 0, 0, 0]]
    assert y.tolist() == [[-1, -1, 10, -1, -1, 13], [-1, -1, 20, -1, -1, -1]]


def test_pg_weights_match_autograd_of_the_objective():
    """sum(w * CE) must have the gradient of (1/N) sum_t [-min(r A, clip(r) A) + kl * k3] w.r.t. the logits."""
    torch.manual_seed(0)
    B, T, V, N = 3, 5, 7, 11.0
    logits = torch.randn(B, T, V, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    y[0, :2] = -1
    y[2, 4] = -1
    adv = torch.tensor([1.0, -0.5, 0.25])
    valid = (y >= 0)
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, y.clamp(min=0)[..., None])[..., 0] * valid
    logp_old = (logp + 0.3 * torch.randn(B, T)).detach() * valid  # some ratios far outside [0.8, 1.2]
    logp_ref = (logp + 0.2 * torch.randn(B, T)).detach() * valid
    clip, kl = 0.2, 0.1
    ratio = torch.exp(logp - logp_old)
    A = adv[:, None]
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - clip, 1 + clip) * A)
    d = logp_ref - logp
    k3 = torch.exp(d) - d - 1
    objective = ((-surrogate + kl * k3) * valid).sum() / N
    (g_true,) = torch.autograd.grad(objective, logits, retain_graph=True)

    w, frac = rl.pg_weights(adv, y, N, logp=logp.detach(), logp_old=logp_old, logp_ref=logp_ref, clip=clip, kl_coef=kl)
    assert 0 < frac < 1
    ce = -logp
    (g_w,) = torch.autograd.grad((w * ce).sum(), logits)
    torch.testing.assert_close(g_w, g_true, rtol=1e-4, atol=1e-6)

    # on-policy, no KL: w = A / N on sampled tokens, 0 elsewhere
    w0, _ = rl.pg_weights(adv, y, N)
    torch.testing.assert_close(w0, (A * valid / N).float())


def test_update_raises_logprob_of_rewarded_replies():
    """Sign test on a toy policy: sample a group, reward some replies, one update; the rewarded replies become
    more likely and the others less."""
    torch.manual_seed(0)
    V = 40
    model = tiny_model(V, seq_len=32, width=32, seed=1)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # a policy with some preferences, not uniform
    prompt = [1, 2, 3]
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(8):
        s = list(prompt)
        for _ in range(6):
            p = torch.softmax(model(torch.tensor([s]))[0, -1], -1)
            s.append(int(torch.multinomial(p, 1, generator=gen)))
        seqs.append(s)
    masks = [[0] * 3 + [1] * 6 for _ in seqs]
    rewards = [1, 0, 0, 1, 0, 1, 0, 0]
    adv = rl.advantages(rewards)

    def seq_logp(m):
        x, y = rl.pack_sequences(seqs, masks, 0)
        return rl.token_logprobs(m, x, y, nullcontext).sum(1)

    before = seq_logp(model)
    opt = build_optimizer(model, matrix_lr=0.005, embedding_lr=0.01, unembedding_lr=0.01, scalar_lr=0.01)
    n_tokens = sum(sum(m) for m in masks)
    stats = rl.policy_update(model, opt, seqs, masks, adv, pad_id=0, n_tokens=n_tokens, device="cpu",
                             device_batch_size=3)
    assert stats["trained"] == 8
    delta = seq_logp(model) - before
    for r, d in zip(rewards, delta.tolist()):
        assert (d > 0) if r else (d < 0), (rewards, delta)

    # PPO epochs and a KL term run too, and the clip fraction is reported
    ref = copy.deepcopy(model)
    stats = rl.policy_update(model, opt, seqs, masks, adv, pad_id=0, n_tokens=n_tokens, device="cpu",
                             device_batch_size=3, ppo_epochs=3, clip=0.2, kl_coef=0.1, ref_model=ref)
    assert 0 <= stats["clip_frac"] <= 1 and stats["kl"] >= 0


def test_problem_order_covers_each_pass_once():
    n, per = 10, 4
    first = [i for s in range(5) for i in rl.problem_order(n, s, per, seed=0)]  # 20 = two passes
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]
    assert rl.problem_order(n, 2, per, 0) == rl.problem_order(n, 2, per, 0)


def test_gsm8k_row_without_answer_marker_named(tmp_path, capsys):
    folder = tmp_path / "home" / "data" / "eval" / "gsm8k"
    folder.mkdir(parents=True)
    rows = [{"question": "1+1?", "answer": "<<1+1=2>>2\n#### 2"}] * 3 + [{"question": "2+2?", "answer": "four"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["rl", "--task", "gsm8k"]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl row 4" in err and "####" in err


def test_rl_cli_runs_and_resumes_exactly(tmp_path, demo_setup, monkeypatch):
    root, tokenizer = demo_setup
    home = tmp_path / "home"
    shutil.copytree(root / "demo", home / "data" / "demo")
    tokenizer.save(home / "runs" / "t" / "tokenizer")
    model = tiny_model(tokenizer.vocab_size, seq_len=128)
    save_base(home / "runs" / "t" / "sft", model, tokenizer, stage="sft")
    flags = ["rl", "--run", "t", "--num-steps", "2", "--prompts-per-step", "2", "--num-samples", "4",
             "--max-tokens", "12", "--eval-every", "0", "--final-eval-problems", "2", "--pass-k", "2",
             "--pass-problems", "2", "--init-lr-frac", "1.0", "--ppo-epochs", "2", "--kl-coef", "0.05"]
    assert main(flags + ["--out", str(tmp_path / "a"), "--save-every", "100"]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["stage"] == "rl" and summary["step"] == 2 and summary["eval_problems"] == 2
    assert summary["pass_k"] == 2 and summary["pass_at_k"] is not None and summary["start_accuracy"] is not None
    assert set(summary) <= set(checkpoint.StageSummary.__annotations__), "summary.json keys StageSummary lacks"
    full = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]

    real_save = checkpoint.save_checkpoint

    def save_then_die(folder, step, *a, **kw):
        real_save(folder, step, *a, **kw)
        if step == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    assert main(flags + ["--out", str(tmp_path / "b"), "--save-every", "1"]) == 130
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert main(flags + ["--out", str(tmp_path / "b"), "--save-every", "1", "--resume"]) == 0
    resumed = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    pick = lambda recs: [(r["step"], r["reward"], r["sampled_tokens"], r.get("kl")) for r in recs if "reward" in r]
    assert pick(resumed) == pick(full)
    wa, wb = checkpoint.load_weights(tmp_path / "a", 2), checkpoint.load_weights(tmp_path / "b", 2)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_rl_raises_held_apart_accuracy(tmp_path, tok):
    """The proof in miniature: after SFT on replies with random answers, RL finds the answers that earn reward
    (which depend on the question): on held-apart problems (unseen names) sampled accuracy goes from chance to
    nearly all, and replies still end properly."""
    from test_sft import toy_curriculum, TOY_SFT
    home = tmp_path / "home"
    toy_curriculum(home, tok)
    assert main(TOY_SFT) == 0
    assert main(["rl", "--run", "t", "--num-steps", "40", "--prompts-per-step", "8", "--num-samples", "16",
                 "--max-tokens", "8", "--eval-every", "0", "--final-eval-problems", "32", "--pass-k", "4",
                 "--pass-problems", "8", "--init-lr-frac", "0.5"]) == 0
    s = json.loads((home / "runs" / "t" / "rl" / "summary.json").read_text())
    # sampled replies: right ~1 time in 10 before (chance), nearly always after. (Greedy, the SFT model's most
    # likely digit may be right by luck for one template, so greedy accuracy is only checked at the end.)
    assert s["start_eval"]["pass@1"] <= 0.3 and s["eval"]["pass@1"] >= 0.7, s
    # greedy: 28 of 32 since the model init of session 12 (the same 4 missed at 40 and at 60 steps), 29+ before
    assert s["accuracy"] >= 0.85 and s["format_compliance"] >= 0.9, s
    assert s["eval_problems"] == 32


def test_rl_auto_batch_from_the_replies_of_a_step(tmp_path, demo_setup, capsys):
    """--device-batch-size auto (the default): on a CPU the largest divisor up to 32 of a step's replies on this
    rank (here 2 prompts x 24 samples: 24) that fastpath's memory estimate allows; the resolved size is saved."""
    root, tokenizer = demo_setup
    home = tmp_path / "home"
    shutil.copytree(root / "demo", home / "data" / "demo")
    tokenizer.save(home / "runs" / "t" / "tokenizer")
    save_base(home / "runs" / "t" / "sft", tiny_model(tokenizer.vocab_size, seq_len=128), tokenizer, stage="sft")
    assert main(["rl", "--run", "t", "--num-steps", "1", "--prompts-per-step", "2", "--num-samples", "24",
                 "--max-tokens", "4", "--eval-every", "0", "--final-eval-problems", "2", "--pass-k", "0"]) == 0
    assert "micro-batches of up to 24 replies (auto: cpu, no probe" in capsys.readouterr().out
    assert json.loads((home / "runs" / "t" / "rl" / "summary.json").read_text())["args"]["device_batch_size"] == 24
