"""picochat/engine.py: generation matches greedy full recompute, the calculator tool is evaluated and forced,
sampling, stop tokens, the context guard, UTF-8-safe streaming text, and the chat CLI. Decode-path tests
(layouts, the static cache, int8) are in test_decode.py."""
import pytest
import torch

import picochat.engine as engine_mod
from picochat.common import UserError
from picochat.engine import Engine, StreamDecoder, ToolState, parse_reply, sample
from picochat.tokenizer import Tokenizer
from test_decode import REFERENCE_FEATURES, tiny  # tests/ is on sys.path under pytest


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def tok(webtext_tokenizer):
    return Tokenizer.load(webtext_tokenizer)


def greedy_reference(model, prompt, n, stops=(), forced_script=None, tool=None):
    """Greedy decoding by full recompute (model.forward over the whole sequence every step), with the tool
    state machine written out naively: the reference the cached engine must match token for token."""
    seq, out = list(prompt), []
    forced, call = [], None
    script = list(forced_script or [])
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1]
        if forced:
            t, f = forced.pop(0), True
        else:
            t, f = (script.pop(0) if script else int(logits.argmax())), False
            if tool is not None:
                start, end, to_tokens = tool
                if t == start:
                    call = []
                elif t == end and call is not None:
                    forced, call = to_tokens(call), None
                elif call is not None:
                    call.append(t)
        out.append((t, f))
        seq.append(t)
        if t in stops and not f:
            break
    return out


def test_int8_generation_through_engine_and_scheduler(tok, monkeypatch):
    """int8 weights change the numbers, not the engine: Engine.generate and the Scheduler decode the same greedy
    tokens, and a tool call is evaluated and forced, and a stop token ends a sample, as in float32."""
    from picochat.batching import Request, Scheduler
    from test_batching import run_requests
    model = tiny(vocab=tok.vocab_size, seq=96, head_scale=20.0)
    eng = Engine(model, tok, tool=True, dtype=torch.int8)
    prompts = [tok.encode(t, prepend_bos=True) for t in ("The history of science", "Numbers 1 2 3", "x y")]
    expected = []
    for p in prompts:
        seqs, _ = eng.generate_batch(p, num_samples=2, max_tokens=12, temperature=0.0)
        assert seqs[0] == seqs[1]
        expected.append(seqs[0][len(p):])
    sched = Scheduler(eng, slots=2).start()  # fewer slots than requests: rows at different positions
    try:
        results = run_requests(sched, [Request(prompt=p, max_tokens=12, temperature=0.0) for p in prompts])
    finally:
        sched.stop()
    for evs, exp in zip(results, expected):
        assert [e[1] for e in evs if e[0] == "token"] == exp
        assert evs[-1][0] == "done" and evs[-1][1] in ("stop", "length")
    S = tok.special
    call = [S("<|python_start|>")] + tok.encode("12*3+4") + [S("<|python_end|>")]
    script = call + [None] * 8 + [S("<|assistant_end|>")]  # None: the model's own greedy choice
    steps = len(script)
    real_sample = engine_mod.sample

    def scripted(logits, *a, **k):
        out = real_sample(logits, 0.0)
        if script:
            t = script.pop(0)
            if t is not None:
                out[:] = t
        return out

    monkeypatch.setattr(engine_mod, "sample", scripted)
    prompt = tok.render_for_completion([{"role": "user", "content": "What is 12*3+4?"}])
    seqs, masks = eng.generate_batch(prompt, num_samples=1, max_tokens=40, temperature=0.0)
    completion, mask = seqs[0][len(prompt):], masks[0][len(prompt):]
    forced = [S("<|output_start|>")] + tok.encode("40") + [S("<|output_end|>")]
    assert completion[:len(call) + len(forced)] == call + forced
    assert mask[len(call):len(call) + len(forced)] == [0] * len(forced)
    # every step samples (a forced one ignores the sample): the scripted stop token ends the sample
    assert completion[-1] == S("<|assistant_end|>") and len(completion) == steps


# ---- generation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, REFERENCE_FEATURES])
def test_greedy_generation_matches_full_recompute(tok, kw):
    model = tiny(vocab=tok.vocab_size, seq=96, head_scale=20.0, **kw)
    eng = Engine(model, tok, tool=False)
    stops = eng.stop_ids
    prompts = [tok.encode("The history of science", prepend_bos=True), [tok.bos_id], tok.encode("x" * 30),
               tok.render_for_completion([{"role": "user", "content": "Hi there, who are you?"}])]
    for prompt in prompts:
        ref = greedy_reference(model, prompt, 24, stops)
        seqs, masks = eng.generate_batch(prompt, num_samples=3, max_tokens=24, temperature=0.0)
        for seq, mask in zip(seqs, masks):  # batch > 1: every row decodes the same greedy continuation
            assert seq[len(prompt):] == [t for t, _ in ref]
            assert mask == [0] * len(prompt) + [1] * len(ref)


def test_tool_call_is_evaluated_and_forced(tok, monkeypatch):
    model = tiny(vocab=tok.vocab_size, seq=96, head_scale=20.0)
    eng = Engine(model, tok, tool=True)
    S = tok.special
    call = [S("<|python_start|>")] + tok.encode("12*3+4") + [S("<|python_end|>")]
    script = list(call)
    real_sample = engine_mod.sample

    def scripted(logits, *a, **k):  # the model "decides" to call the tool, then decodes greedily
        out = real_sample(logits, 0.0)
        if script:
            out[:] = script.pop(0)
        return out

    monkeypatch.setattr(engine_mod, "sample", scripted)
    prompt = tok.render_for_completion([{"role": "user", "content": "What is 12*3+4?"}])
    seqs, masks = eng.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    expected_output = [S("<|output_start|>")] + tok.encode("40") + [S("<|output_end|>")]
    completion = seqs[0][len(prompt):]
    assert completion[:len(call)] == call
    assert completion[len(call):len(call) + len(expected_output)] == expected_output
    mask = masks[0][len(prompt):]
    assert mask[:len(call)] == [1] * len(call)
    assert mask[len(call):len(call) + len(expected_output)] == [0] * len(expected_output)
    assert seqs[1] == seqs[0] and masks[1] == masks[0]
    # and everything, forced tokens included, matches a full recompute with the same tool logic
    ref = greedy_reference(model, prompt, 30, eng.stop_ids, forced_script=call,
                           tool=(S("<|python_start|>"), S("<|python_end|>"), eng.tool_tokens))
    assert completion == [t for t, _ in ref]
    assert mask == [0 if f else 1 for _, f in ref]


def test_tool_state_machine():
    start, end = 5, 6
    st = ToolState((start, end))
    assert st.next(1) == (1, False, None)
    assert st.next(start) == (start, False, None)
    assert st.next(7) == (7, False, None)
    assert st.next(8) == (8, False, None)
    assert st.next(end) == (end, False, [7, 8])
    st.forced.extend([100, 101])
    assert st.next(3) == (100, True, None)  # the sampled token is ignored while output is forced
    assert st.next(3) == (101, True, None)
    assert st.next(end) == (end, False, None)  # a stray <|python_end|> closes nothing
    assert st.next(9) == (9, False, None)


def test_next_token_is_the_shared_step(tok):
    model = tiny(vocab=tok.vocab_size)
    S = tok.special
    start, end, stop = S("<|python_start|>"), S("<|python_end|>"), S("<|assistant_end|>")
    eng = Engine(model, tok, tool=True)
    st = ToolState(eng.python_ids)
    assert eng.next_token(st, start) == (start, False, None, False)
    assert eng.next_token(st, 7) == (7, False, None, False)
    assert eng.next_token(st, end) == (end, False, [7], False)  # the caller runs the call
    st.forced.extend([stop, 9])
    assert eng.next_token(st, None) == (stop, True, None, False)  # a forced stop token ends nothing
    assert eng.next_token(st, 3) == (9, True, None, False)
    assert eng.next_token(st, stop) == (stop, False, None, True)
    off = Engine(model, tok, tool=False)
    st = ToolState(off.python_ids)
    off.next_token(st, start)
    assert off.next_token(st, end) == (end, False, None, False)  # without the tool a call runs nothing


def test_tool_tokens(tok):
    model = tiny(vocab=tok.vocab_size)
    S = tok.special
    eng = Engine(model, tok, tool=True)
    assert eng.tool_tokens(tok.encode("10/4")) == [S("<|output_start|>")] + tok.encode("2.5") + [S("<|output_end|>")]
    assert eng.tool_tokens(tok.encode("1/0")) == []  # a failing call forces nothing
    assert eng.tool_tokens(tok.encode("import os")) == []
    assert Engine(model, tok, tool=False).tool_tokens(tok.encode("1+1")) == []


def test_sampling_seeds_topk_topp(tok):
    model = tiny(vocab=tok.vocab_size, seq=96)
    eng = Engine(model, tok, tool=False)
    prompt = tok.encode("Once upon a time", prepend_bos=True)
    a = eng.generate_batch(prompt, 4, 20, temperature=1.0, seed=7)
    b = eng.generate_batch(prompt, 4, 20, temperature=1.0, seed=7)
    c = eng.generate_batch(prompt, 4, 20, temperature=1.0, seed=8)
    assert a == b and a[0] != c[0]
    assert len({tuple(s) for s in a[0]}) > 1  # samples of one call differ
    greedy = eng.generate_batch(prompt, 1, 20, temperature=0.0)[0]
    assert eng.generate_batch(prompt, 1, 20, temperature=1.0, top_k=1, seed=3)[0] == greedy
    assert eng.generate_batch(prompt, 1, 20, temperature=1.0, top_p=1e-6, seed=3)[0] == greedy
    logits = torch.randn(64, 50)
    allowed = torch.topk(logits, 5).indices
    picks = sample(logits, 2.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert all(int(p) in allowed[i].tolist() for i, p in enumerate(picks))


def test_finished_samples_stop_appearing(tok, monkeypatch):
    model = tiny(vocab=tok.vocab_size, seq=96)
    eng = Engine(model, tok, tool=False)
    end = tok.special("<|assistant_end|>")
    eng.stop_ids = frozenset([end])
    calls = {"n": 0}
    real_sample = engine_mod.sample

    def row0_stops_at_step3(logits, *a, **k):
        out = real_sample(logits, *a, **k)
        out[out == end] = 1  # no accidental stops
        calls["n"] += 1
        if calls["n"] == 3:
            out[0] = end
        return out

    monkeypatch.setattr(engine_mod, "sample", row0_stops_at_step3)
    steps = [t for t, _ in eng.generate(tok.encode("abc", prepend_bos=True), 3, 10, temperature=1.0, seed=1)]
    assert len(steps) == 10
    col0 = [s[0] for s in steps]
    assert col0[2] == end and all(t is None for t in col0[3:]) and None not in col0[:3]
    assert all(s[1] is not None and s[2] is not None for s in steps)
    calls["n"] = 0
    prompt = tok.encode("abc", prepend_bos=True)
    seqs, masks = eng.generate_batch(prompt, 3, 10, temperature=1.0, seed=1)
    assert [len(s) - len(prompt) for s in seqs] == [3, 10, 10] and seqs[0][-1] == end and masks[0][-1] == 1
    assert eng.generate_batch([tok.bos_id], 2, 0) == ([[tok.bos_id]] * 2, [[0]] * 2)


def test_context_guard(tok):
    model = tiny(vocab=tok.vocab_size, seq=32)
    eng = Engine(model, tok, tool=False)
    eng.stop_ids = frozenset()  # decode to the very end
    with pytest.raises(UserError, match="no room"):
        eng.generate_batch(list(range(32)), 1, 5)
    with pytest.raises(UserError, match="outside the vocabulary"):
        eng.generate_batch([tok.vocab_size], 1, 5)
    with pytest.raises(UserError, match="empty prompt"):
        eng.generate_batch([], 1, 5)
    seqs, _ = eng.generate_batch(list(range(20)), 2, 100, temperature=1.0)
    assert all(len(s) == 32 for s in seqs)  # max_tokens clipped to the context


def test_stream_decoder_never_splits_a_character(tok):
    text = "Größe: 敏捷的棕色狐狸跳过了懒狗 — ünïcödé ✓ 🙂 ok"
    ids = tok.encode(text)
    partial = [t for t in ids if not _valid_utf8(tok.enc.decode_single_token_bytes(t))]
    assert partial, "the test needs tokens that end inside a character"
    dec = StreamDecoder(tok)
    pieces = [dec.feed(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # special tokens: dropped, or kept as their text
    S = tok.special
    dec = StreamDecoder(tok, keep=("<|python_start|>", "<|python_end|>"))
    seq = tok.encode("a ") + [S("<|python_start|>")] + tok.encode("1+1") + [S("<|python_end|>"), S("<|assistant_end|>")]
    assert "".join(dec.feed(t) for t in seq) + dec.flush() == "a <|python_start|>1+1<|python_end|>"


def _valid_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_parse_reply_round_trips_through_the_tokenizer(tok):
    text = "So <|python_start|>12*3<|python_end|><|output_start|>36<|output_end|> apples. Done"
    parts = parse_reply(text)
    assert parts == [{"type": "text", "text": "So "}, {"type": "python", "text": "12*3"},
                     {"type": "python_output", "text": "36"}, {"type": "text", "text": " apples. Done"}]
    ids, _ = tok.render_conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": parts}])
    dec = StreamDecoder(tok, keep=("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"))
    start = ids.index(tok.special("<|assistant_start|>")) + 1
    assert "".join(dec.feed(t) for t in ids[start:]) + dec.flush() == text
    assert parse_reply("x <|python_start|>1+") == [{"type": "text", "text": "x "}, {"type": "python", "text": "1+"}]


# ---- continuous batching ----------------------------------------------------------------------------------------
# ---- the chat command -------------------------------------------------------------------------------------------
def test_chat_cli_one_shot_and_stage_choice(tok, tmp_path, capsys, webtext_tokenizer):
    from picochat import checkpoint
    from picochat.checkpoint import resolve_checkpoint
    from picochat.cli import main
    from picochat.common import home_dir
    model = tiny(vocab=tok.vocab_size, seq=64)
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_checkpoint("demo")
    for stage in ("base", "sft"):
        checkpoint.save_checkpoint(home_dir() / "runs" / "demo" / stage, 3, model, tokenizer=tok)
    assert resolve_checkpoint("demo")[1] == "sft"
    assert resolve_checkpoint("demo", "base")[1] == "base"
    with pytest.raises(UserError, match="no rl checkpoint"):
        resolve_checkpoint("demo", "rl")
    assert main(["chat", "--run", "demo", "-p", "Hello", "--max-tokens", "8", "--seed", "1"]) == 0
    out1 = capsys.readouterr().out
    assert main(["chat", "--run", "demo", "-p", "Hello", "--max-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out == out1 and out1.strip()
    assert main(["chat", "--run", "demo", "--stage", "base", "-p", "Once", "--max-tokens", "5",
                 "--temperature", "0"]) == 0
    assert main(["chat", "--run", "nope", "-p", "x"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_chat_cli_dtype(tok, capsys):
    from picochat import checkpoint
    from picochat.cli import main
    from picochat.common import home_dir
    model = tiny(vocab=tok.vocab_size, seq=64)
    checkpoint.save_checkpoint(home_dir() / "runs" / "demo" / "sft", 3, model, tokenizer=tok)
    args = ["chat", "--run", "demo", "-p", "Hello", "--max-tokens", "8", "--temperature", "0", "--no-tool"]
    assert main(args + ["--dtype", "int8"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(args + ["--dtype", "float32"]) == 0
    for command in (args, ["serve"]):  # serve takes the same flag
        with pytest.raises(SystemExit) as e:
            main(command + ["--dtype", "int4"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "argument --dtype: invalid choice: 'int4'" in err
        assert all(name in err for name in ("auto", "float32", "bfloat16", "int8"))


def test_commands_without_run_take_the_run_trained_last(tok, capsys):
    """The README's `picochat chat` after `picochat speedrun` (run "demo"): no --run means the run whose newest
    checkpoint is newest, and the command says which it took."""
    import os
    from picochat import checkpoint
    from picochat.cli import main
    from picochat.common import home_dir, pick_run
    with pytest.raises(UserError, match="no trained run"):
        pick_run("")
    model = tiny(vocab=tok.vocab_size, seq=64)
    checkpoint.save_checkpoint(home_dir() / "runs" / "old" / "sft", 3, model, tokenizer=tok)
    os.utime(home_dir() / "runs" / "old" / "sft" / "meta_000003.json", (1e9, 1e9))  # trained long ago
    checkpoint.save_checkpoint(home_dir() / "runs" / "demo" / "base", 5, model, tokenizer=tok)
    assert pick_run("") == "demo" and pick_run("old") == "old"
    assert "run 'demo': the most recently trained (others: old; pick one with --run)" in capsys.readouterr().err
    assert main(["chat", "-p", "Hello", "--max-tokens", "4", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert "run 'demo'" in captured.err and captured.out.strip()
    assert main(["report"]) == 0 and (home_dir() / "runs" / "demo" / "report" / "report.md").exists()
