"""SFT: task mixtures, packing and masks, loss normalisation across micro-batches, bad input, exact resume, and
that a short SFT run teaches a small model the chat format."""
import copy
import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from picochat import checkpoint, replies, sft
from picochat.cli import main
from picochat.common import UserError
from picochat.model import GPT, GPTConfig
from picochat.tasks import gsm8k
from picochat.tasks.mixture import Mixture, Source
from picochat.tokenizer import Tokenizer


# ---- helpers shared with test_rl.py (the fixtures tok and demo_setup are in conftest.py) ---------------------------
def tiny_model(vocab, seq_len=64, depth=1, width=32, seed=0):
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=depth, n_head=2, n_kv_head=2, n_embd=width)
    return GPT(cfg).init_weights(seed=seed)


def save_base(folder, model, tokenizer, stage="base"):
    checkpoint.save_checkpoint(folder, 0, model, meta={"stage": stage}, tokenizer=tokenizer)


def conv(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def render_rows(tokenizer, convs_per_row, row_len):
    """The reference for SFTLoader's batches (what it computed before it rendered each conversation once):
    rows of conversations -> (x, y) LongTensors (B, row_len - 1), targets -1 wherever the next token is not
    supervised."""
    B = len(convs_per_row)
    ids = torch.full((B, row_len), tokenizer.bos_id, dtype=torch.long)
    mask = torch.zeros((B, row_len), dtype=torch.bool)
    for b, convs in enumerate(convs_per_row):
        pos = 0
        for c in convs:
            t, m = tokenizer.render_conversation(c)
            t, m = t[:row_len - pos], m[:row_len - pos]
            ids[b, pos:pos + len(t)] = torch.tensor(t, dtype=torch.long)
            mask[b, pos:pos + len(m)] = torch.tensor(m, dtype=torch.bool)
            pos += len(t)
    x = ids[:, :-1]
    y = torch.where(mask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -1))
    return x.contiguous(), y.contiguous()


# ---- mixtures ----------------------------------------------------------------------------------------------------
def test_mixture_epochs_and_deterministic_shuffle():
    a = Source("a", [conv(f"qa{i}", "x") for i in range(10)], epochs=2)
    b = Source("b", [conv(f"qb{i}", "y") for i in range(10)], epochs=0.5)
    c = Source("c", list(range(4)), epochs=1.5, convert=lambda i: conv(f"qc{i}", "z"))
    m = Mixture([a, b, c], seed=1)
    assert m.counts() == {"a": 20, "b": 5, "c": 6}
    assert len(m) == 31
    firsts = [m[k]["messages"][0]["content"] for k in range(len(m))]
    assert sorted(f for f in firsts if f.startswith("qa")) == sorted([f"qa{i}" for i in range(10)] * 2)
    assert len(set(f for f in firsts if f.startswith("qb"))) == 5  # a fixed half, no repeats
    assert firsts == [Mixture([a, b, c], seed=1)[k]["messages"][0]["content"] for k in range(len(m))]
    assert firsts != [Mixture([a, b, c], seed=2)[k]["messages"][0]["content"] for k in range(len(m))]
    assert firsts[:20] != sorted(firsts[:20])  # shuffled, not source after source
    assert {m.source_of(k) for k in range(len(m))} == {"a", "b", "c"}


# ---- packing and masks -------------------------------------------------------------------------------------------
def test_plan_rows_packs_whole_conversations():
    lengths = [30, 5, 20, 64, 100, 12, 40, 8, 33, 1]
    rows = sft.plan_rows(lengths, 64, buffer_size=4)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(lengths)))  # every conversation exactly once
    for r in rows:
        assert sum(lengths[i] for i in r) <= 64 or len(r) == 1  # never over; only a too-long one sits alone
    assert [4] in rows
    assert sft.plan_rows(lengths, 64, 4) == rows


def test_batch_masks_and_padding(tok):
    c = conv("Hi there", "Hello!")
    ids, mask = tok.render_conversation(c)
    row_len = len(ids) + 5
    x, y = sft.SFTLoader([c], tok, row_len, device_batch=1, grad_accum=1).micro_batch(0, 0)
    assert x.shape == y.shape == (1, row_len - 1)
    assert x[0, :len(ids)].tolist() == ids and x[0, len(ids):].tolist() == [tok.bos_id] * 4
    for t in range(row_len - 1):
        nxt = t + 1
        want = ids[nxt] if nxt < len(ids) and mask[nxt] else -1
        assert int(y[0, t]) == want, t
    # the supervised targets are exactly the assistant's reply and <|assistant_end|>
    sup = [int(v) for v in y[0] if v >= 0]
    assert sup == tok.encode("Hello!") + [tok.special("<|assistant_end|>")]
    # tool outputs are inputs, never targets
    tc = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": [
        {"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"},
        {"type": "text", "text": "#### 4"}]}]}
    ids, mask = tok.render_conversation(tc)
    x, y = sft.SFTLoader([tc], tok, len(ids), device_batch=1, grad_accum=1).micro_batch(0, 0)
    sup = [int(v) for v in y[0] if v >= 0]
    assert tok.special("<|output_start|>") not in sup and tok.special("<|output_end|>") not in sup
    assert tok.special("<|python_start|>") in sup and tok.special("<|python_end|>") in sup


class CountingTokenizer:
    """A tokenizer's conversation rendering, counted; with shift, every id (bos included) moves up by it and the
    vocabulary is declared 2^17, so the ids need more than 16 bits."""

    def __init__(self, tok, shift=0):
        self.tok, self.shift, self.calls = tok, shift, 0
        self.bos_id = tok.bos_id + shift
        self.vocab_size = 2 ** 17 if shift else tok.vocab_size

    def render_conversation(self, c):
        self.calls += 1
        ids, mask = self.tok.render_conversation(c)
        return [t + self.shift for t in ids], mask


def varied_conversations():
    tool = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": [
        {"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"},
        {"type": "text", "text": "#### 4"}]}]}
    convs = [conv("word " * (i % 13), "yes " * (i % 7) + str(i)) for i in range(40)]
    convs[5] = convs[23] = tool
    convs[11] = conv("word " * 120, "far too long for a row")  # truncated, in a row alone
    convs[30] = {"messages": convs[2]["messages"] + convs[3]["messages"]}  # two turns
    return convs


@pytest.mark.parametrize("shift", [0, 70_000])
def test_batches_are_the_rendered_rows_with_each_conversation_rendered_once(tok, shift):
    """The loader's batches, for every micro-batch of every step (past the wrap-around) on each of 2 ranks, and
    for the validation rows, are exactly what rendering the conversations of those rows gives (render_rows
    above, the loader's code before it rendered each conversation once); the conversations are rendered once,
    at construction. shift: ids above 2^16, kept in 32-bit arrays."""
    convs = varied_conversations()
    row_len, B, accum, world = 48, 3, 2, 2
    ref = CountingTokenizer(tok, shift)
    for rank in range(world):
        counting = CountingTokenizer(tok, shift)
        loader = sft.SFTLoader(convs, counting, row_len, device_batch=B, grad_accum=accum, rank=rank, world=world)
        assert counting.calls == len(convs) and loader.stats()["truncated"] == 1
        assert loader.ids.dtype == (np.int32 if shift else np.uint16)
        assert loader.ids.size == sum(min(len(tok.render_conversation(c)[0]), row_len) for c in convs)
        for step in range(loader.steps_per_epoch + 2):
            for k in range(accum):
                first = step * loader.rows_per_step + (k * world + rank) * B
                idx = [(first + j) % len(loader.rows) for j in range(B)]
                want = render_rows(ref, [[convs[i] for i in loader.rows[r]] for r in idx], row_len)
                got = loader.micro_batch(step, k)
                for g, w in zip(got, want):
                    assert g.dtype == torch.long and g.shape == (B, row_len - 1) and torch.equal(g, w), (step, k)
        for first in range(0, len(loader.rows), B):  # what eval_loss asks for, the last batch short
            idx = range(first, min(first + B, len(loader.rows)))
            want = render_rows(ref, [[convs[i] for i in loader.rows[r]] for r in idx], row_len)
            assert all(torch.equal(g, w) for g, w in zip(loader.batch(idx), want))
        assert counting.calls == len(convs)  # batches never render again


def test_batches_are_pinned_only_for_cuda(tok):
    """Pinned host memory (for asynchronous copies) only where the device is CUDA: pinning needs a GPU."""
    c = [conv("a", "b")]
    one_row = dict(device_batch=1, grad_accum=1)
    assert not sft.SFTLoader(c, tok, 16, **one_row).pin and not sft.SFTLoader(c, tok, 16, **one_row, device="cpu").pin
    assert sft.SFTLoader(c, tok, 16, **one_row, device=torch.device("cuda", 0)).pin
    assert sft.SFTLoader(c, tok, 16, **one_row, device="cuda").pin
    x, y = sft.SFTLoader(c, tok, 16, **one_row, device="cpu").micro_batch(0, 0)
    assert not x.is_pinned() and not y.is_pinned()


def test_long_conversation_truncated_and_counted(tok):
    long = conv("word " * 200, "ok")
    short = conv("a", "b")
    loader = sft.SFTLoader([short, long, short], tok, 33, device_batch=2, grad_accum=1)
    assert loader.stats()["truncated"] == 1
    x, y = loader.micro_batch(0, 0)
    assert x.shape == (2, 32)


# ---- loss normalisation --------------------------------------------------------------------------------------------
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_normalised_by_supervised_tokens_of_the_whole_step():
    torch.manual_seed(0)
    V, T = 50, 8
    model = tiny_model(V, seq_len=T)
    ref = copy.deepcopy(model)
    x1, x2 = torch.randint(0, V, (2, T)), torch.randint(0, V, (2, T))
    y1, y2 = torch.randint(0, V, (2, T)), torch.randint(0, V, (2, T))
    y1[0, :6] = -1   # micro-batch 1: 10 supervised tokens
    y2[:, 1:] = -1   # micro-batch 2: 2 supervised tokens
    loss, n = sft.step_loss(model, [(x1, y1), (x2, y2)], "cpu", nullcontext)
    assert n == 12
    # by hand: every supervised token of the step weighs 1/12
    total = 0.0
    for x, y in ((x1, y1), (x2, y2)):
        logits = ref(x)
        total = total + F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=-1, reduction="sum")
    (total / 12).backward()
    assert loss == pytest.approx(float(total.detach() / 12), rel=1e-5)
    g, g_ref = _grads(model), _grads(ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6)
    # and not the mean of per-micro-batch means (which would overweight micro-batch 2's two tokens)
    wrong = copy.deepcopy(ref)
    wrong.zero_grad()
    mean_of_means = sum(wrong(x, y).detach() for x, y in ((x1, y1), (x2, y2))) / 2
    assert abs(float(mean_of_means) - loss) > 1e-3


def test_micro_batch_without_supervised_tokens():
    torch.manual_seed(0)
    V, T = 50, 8
    model = tiny_model(V, seq_len=T)
    x, y = torch.randint(0, V, (2, T)), torch.randint(0, V, (2, T))
    empty = torch.full((2, T), -1)
    # alone: a finite zero loss and no gradient
    loss, n = sft.step_loss(model, [(x, empty)], "cpu", nullcontext)
    assert n == 0 and loss == 0.0
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    # beside a normal micro-batch: contributes nothing
    a = copy.deepcopy(model)
    la, _ = sft.step_loss(a, [(x, y)], "cpu", nullcontext)
    lb, _ = sft.step_loss(model, [(x, y), (x, empty)], "cpu", nullcontext)
    assert la == pytest.approx(lb)
    for name, g in _grads(a).items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g)


# ---- chat format check ---------------------------------------------------------------------------------------------
def test_follows_format(tok):
    S = tok.special
    text = tok.encode("Hello")
    assert replies.follows_format(tok, text + [S("<|assistant_end|>")])
    assert not replies.follows_format(tok, text)  # never ended
    assert not replies.follows_format(tok, [S("<|assistant_end|>")])  # empty reply
    assert not replies.follows_format(tok, text + [S("<|user_start|>")] + text + [S("<|assistant_end|>")])
    call = [S("<|python_start|>")] + tok.encode("1+1") + [S("<|python_end|>"), S("<|output_start|>")] + \
        tok.encode("2") + [S("<|output_end|>")]
    assert replies.follows_format(tok, text + call + text + [S("<|assistant_end|>")])
    assert not replies.follows_format(tok, text + call[:2] + [S("<|assistant_end|>")])  # unclosed call


# ---- bad input -------------------------------------------------------------------------------------------------------
def test_gsm8k_row_without_answer_marker(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    rows = [{"question": "1+1?", "answer": "1+1 = <<1+1=2>>2\n#### 2"}, {"question": "2+2?", "answer": "it is 4"}]
    (tmp_path / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"train.jsonl row 2: .*####"):
        gsm8k.load("train", root=tmp_path)


def test_refuses_base_checkpoint_of_another_tokenizer(tmp_path, tok, capsys):
    other = Tokenizer.train(["some other text entirely, to make another vocabulary " * 20], 300)
    home = Path(tmp_path / "home")
    save_base(home / "runs" / "x" / "base", tiny_model(tok.vocab_size), tok)
    other.save(home / "runs" / "x" / "tokenizer")
    with pytest.raises(UserError, match=r"meta_000000\.json: this base checkpoint was trained with another tokenizer"):
        checkpoint.load_start(home / "runs" / "x" / "base", home / "runs" / "x" / "tokenizer", torch.device("cpu"))


# ---- the command, end to end ---------------------------------------------------------------------------------------
def _home_with_run(home, demo_setup, model):
    root, tok = demo_setup
    shutil.copytree(root / "demo", home / "data" / "demo")
    tok.save(home / "runs" / "t" / "tokenizer")
    save_base(home / "runs" / "t" / "base", model, tok)


def test_sft_cli_runs_and_resumes_exactly(tmp_path, demo_setup, monkeypatch):
    home = tmp_path / "home"
    _home_with_run(home, demo_setup, tiny_model(demo_setup[1].vocab_size, seq_len=128))
    flags = ["sft", "--run", "t", "--num-iterations", "4", "--device-batch-size", "4", "--grad-accum", "2",
             "--eval-every", "0", "--eval-rows", "8", "--eval-problems", "2", "--eval-max-tokens", "8",
             "--log-every", "1"]
    assert main(flags + ["--out", str(tmp_path / "a"), "--save-every", "100"]) == 0
    full = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["stage"] == "sft" and summary["step"] == 4 and summary["train_seconds"] > 0
    assert summary["val_loss"] is not None and summary["format_compliance"] is not None
    assert set(summary) <= set(checkpoint.StageSummary.__annotations__), "summary.json keys StageSummary lacks"
    assert checkpoint.latest_step(tmp_path / "a") == 4 and (tmp_path / "a" / "tokenizer").is_dir()

    # interrupted right after the step-2 checkpoint, then resumed: the same losses, bit for bit
    real_save = checkpoint.save_checkpoint

    def save_then_die(folder, step, *a, **kw):
        real_save(folder, step, *a, **kw)
        if step == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    assert main(flags + ["--out", str(tmp_path / "b"), "--save-every", "2"]) == 130
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert main(flags + ["--out", str(tmp_path / "b"), "--save-every", "2", "--resume"]) == 0
    resumed = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    losses = lambda recs: [(r["step"], r["loss"]) for r in recs if "loss" in r]
    assert losses(resumed) == losses(full)
    wa = checkpoint.load_weights(tmp_path / "a", 4)
    wb = checkpoint.load_weights(tmp_path / "b", 4)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def snapshot(folder):
    """Every file under folder with its bytes (to assert that a failed command changed nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def marker_conversations(n, marker="Zebrafrost"):
    """n conversations in the three formats --data reads, each answered with the marker word alone (so its tokens
    are tok.encode(marker) followed by <|assistant_end|> in any rendering)."""
    rows = []
    for i in range(n):
        q = f"What is the password number {i}?"
        rows.append([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": marker}]},
                     {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": marker}]},
                     {"prompt": q, "chosen": marker, "rejected": "I forgot."}][i % 3])
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize("line,message", [
    ("{oops", "not valid JSON"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}), "message 0: role 'assistant' out of order"),
    (json.dumps({"conversations": [{"from": "human", "value": "hi"}]}), "the last message is the user's"),
])
def test_sft_bad_data_is_one_line_and_writes_nothing(tmp_path, demo_setup, capsys, line, message):
    """A bad line, even the last of a file, stops the run before anything is written (no sft folder, no lock)."""
    home = tmp_path / "home"
    _home_with_run(home, demo_setup, tiny_model(demo_setup[1].vocab_size, seq_len=128))
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(marker_conversations(3))
    bad.write_text(marker_conversations(40) + line + "\n")
    before = snapshot(home)
    for extra in ([], ["--data-only"]):
        capsys.readouterr()
        assert main(["sft", "--run", "t", "--data", str(good), "--data", str(bad)] + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad} line 41: {message}") and err.count("\n") == 1
        assert snapshot(home) == before
    assert main(["sft", "--run", "t", "--data-only"]) == 2
    assert "--data-only trains on the conversations of --data alone" in capsys.readouterr().err
    assert snapshot(home) == before


def test_sft_data_is_mixed_into_the_training_batches(tmp_path, demo_setup, monkeypatch):
    """--data's conversations are trained on beside the mixture's (their marker word is among the supervised
    targets of the steps run, and so are other rows); with --data-only they are all there is."""
    home = tmp_path / "home"
    tok = demo_setup[1]
    _home_with_run(home, demo_setup, tiny_model(tok.vocab_size, seq_len=128))
    data = tmp_path / "mine.jsonl"
    data.write_text(marker_conversations(16))
    marker = tok.encode("Zebrafrost") + [tok.special("<|assistant_end|>")]
    trained = []
    real_step_loss = sft.step_loss

    def recording(model, batches, *a, **kw):
        trained.extend(y for _, y in batches)
        return real_step_loss(model, batches, *a, **kw)
    monkeypatch.setattr(sft, "step_loss", recording)

    def rows_with_marker():
        rows = [[int(t) for t in row] for y in trained for row in y]
        return sum(any(r[i:i + len(marker)] == marker for i in range(len(r))) for r in rows), len(rows)

    flags = ["sft", "--run", "t", "--data", str(data), "--num-iterations", "2", "--device-batch-size", "8",
             "--eval-every", "0", "--eval-rows", "8", "--eval-problems", "2", "--eval-max-tokens", "4"]
    assert main(flags + ["--task-epochs", "data=4", "--out", str(tmp_path / "mixed")]) == 0
    counts = json.loads((tmp_path / "mixed" / "summary.json").read_text())["mixture"]
    assert counts["data:mine.jsonl"] == 64 and {"world", "spelling", "identity"} <= set(counts)
    with_marker, rows = rows_with_marker()
    assert rows == 16 and 0 < with_marker < rows
    trained.clear()
    assert main(flags + ["--data-only", "--out", str(tmp_path / "alone")]) == 0
    summary = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert summary["mixture"] == {"data:mine.jsonl": 16} and summary["val_loss"] is None
    assert rows_with_marker() == (16, 16)


# ---- the proof in miniature: SFT teaches the chat format ----------------------------------------------------------
TOY_QUESTIONS = {"What is the secret number, {n}?": 7, "Tell me the other secret, {n}.": 2}
TOY_NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Max", "Emma", "Leo", "Zoe", "Jack", "Ella"]


def toy_curriculum(home, tokenizer, seed=0):
    """A demo-layout curriculum small enough for a test: SFT conversations answer '#### d' with a random digit
    (the format, but no hint of the right answer); the word problems' right answer depends on the question
    (7 or 2, by template), and the held-apart problems use names never seen in training. A random depth-2 base
    model beside it."""
    import random
    rng = random.Random(seed)

    def jl(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    d = home / "data" / "demo"
    convs = [{"messages": [{"role": "user", "content": rng.choice(list(TOY_QUESTIONS)).format(n=rng.choice(TOY_NAMES))},
                           {"role": "assistant", "content": f"#### {rng.randrange(10)}"}], "source": "toy"}
             for _ in range(2000)]
    jl(d / "sft" / "train.jsonl", convs)
    jl(d / "eval" / "chat" / "val.jsonl", convs[:40])

    def problems(names):
        return [{"question": q.format(n=n), "answer": f"#### {a}"} for n in names for q, a in TOY_QUESTIONS.items()]
    jl(d / "eval" / "gsm8k" / "train.jsonl", problems(TOY_NAMES[:8]) * 10)
    jl(d / "eval" / "gsm8k" / "test.jsonl", problems(TOY_NAMES[8:]) * 4)
    tokenizer.save(home / "runs" / "t" / "tokenizer")
    save_base(home / "runs" / "t" / "base", tiny_model(tokenizer.vocab_size, seq_len=64, depth=2, width=64), tokenizer)


TOY_SFT = ["sft", "--run", "t", "--num-iterations", "40", "--device-batch-size", "8", "--eval-every", "0",
           "--eval-problems", "32", "--eval-max-tokens", "16", "--log-every", "100"]


def test_sft_teaches_the_chat_format(tmp_path, tok):
    home = tmp_path / "home"
    toy_curriculum(home, tok)
    assert main(TOY_SFT) == 0
    s = json.loads((home / "runs" / "t" / "sft" / "summary.json").read_text())
    assert s["base_format_compliance"] <= 0.1  # a base model never ends a reply
    assert s["format_compliance"] >= 0.9
    assert s["val_loss"] < s["base_eval"]["val_loss"] / 3


def test_sft_auto_batch_keeps_the_rows_of_a_step(tmp_path, demo_setup):
    """--device-batch-size auto (the default): a step keeps 16 x --grad-accum rows per rank and only their split
    follows the memory (on a CPU the largest divisor up to 32 that fastpath's estimate allows), so the losses are
    those of the explicit split; without flags it is 16 rows in one micro-batch, as the demo always ran."""
    home = tmp_path / "home"
    _home_with_run(home, demo_setup, tiny_model(demo_setup[1].vocab_size, seq_len=128))
    flags = ["sft", "--run", "t", "--num-iterations", "3", "--eval-every", "0", "--eval-rows", "8",
             "--eval-problems", "2", "--eval-max-tokens", "4", "--log-every", "1"]
    runs = {}
    for name, extra in (("auto", ["--grad-accum", "2"]), ("given", ["--device-batch-size", "16", "--grad-accum", "2"]),
                        ("default", [])):
        assert main(flags + extra + ["--out", str(tmp_path / name)]) == 0
        args = json.loads((tmp_path / name / "summary.json").read_text())["args"]
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (args["device_batch_size"], args["grad_accum"]), [r["loss"] for r in metrics if "loss" in r]
    assert runs["auto"][0] == (32, 1) and runs["given"][0] == (16, 2) and runs["default"][0] == (16, 1)
    # the same gradient up to the order of its sums (Muon's orthogonalization carries that into the digits)
    assert np.allclose(runs["auto"][1], runs["given"][1], rtol=1e-3, atol=0)


# ---- the bar: a real model, your data, chat, export ----------------------------------------------------------
REFERENCE_CKPT = Path(__file__).parent / "fixtures" / "nanochat_ckpt" / "nov2025_d2"


def test_import_sft_on_own_data_chat_and_export(tmp_path, capsys):
    """The README's "Bring your own model", through the CLI: import the reference's checkpoint, SFT it on a jsonl of
    one's own conversations (the three formats), chat with it, export it; transformers' logits on the export are
    picochat's on the SFT checkpoint (fp32)."""
    transformers = pytest.importorskip("transformers")
    home = tmp_path / "home"  # PICOCHAT_HOME (conftest.py)
    assert main(["import", str(REFERENCE_CKPT), "--run", "mine"]) == 0
    data = tmp_path / "my.jsonl"
    data.write_text(marker_conversations(12, marker="Blue."))
    assert main(["sft", "--run", "mine", "--data", str(data), "--data-only", "--num-iterations", "3",
                 "--device-batch-size", "2", "--eval-every", "0", "--log-every", "1"]) == 0
    summary = json.loads((home / "runs" / "mine" / "sft" / "summary.json").read_text())
    assert summary["step"] == 3 and summary["mixture"] == {"data:my.jsonl": 12}
    model, tok, meta = checkpoint.load_model(home / "runs" / "mine" / "sft")
    base = checkpoint.load_weights(home / "runs" / "mine" / "base", 40)
    assert meta["stage"] == "sft" and any(not torch.equal(base[k], v) for k, v in model.state_dict().items())

    capsys.readouterr()
    assert main(["chat", "--run", "mine", "-p", "What is the password number 3?", "--temperature", "0",
                 "--max-tokens", "8", "--no-tool"]) == 0
    assert "Blue." in capsys.readouterr().out  # the answer of every conversation it was fine-tuned on

    out = tmp_path / "export"
    assert main(["export", "--run", "mine", "--hf", str(out)]) == 0
    assert "sft step 3" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.render_for_completion({"messages": [{"role": "user", "content": "What colour is the sky? " * 8}]})
    assert hf_tok.apply_chat_template([{"role": "user", "content": "What colour is the sky? " * 8}],
                                      add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] == ids
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids])), hf(torch.tensor([ids])).logits
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-4
