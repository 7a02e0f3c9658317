import dataclasses
import threading
import time

import pytest
import torch

import picochat.batching as batching_mod
from picochat.batching import Request, Scheduler
from picochat.common import UserError
from picochat.engine import Engine
from test_engine import tiny


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_scheduler_runs_with_its_own_thread_count(tok):
    engine = Engine(tiny(vocab=tok.vocab_size), tok)
    sched = Scheduler(engine, slots=2, threads=2).start()
    try:
        assert sched.run_job(torch.get_num_threads).result() == 2
        assert torch.get_num_threads() == 1  # the caller's thread keeps its own
    finally:
        sched.stop()


def run_requests(sched, reqs, timeout=60):
    events = {id(r): [] for r in reqs}
    done = threading.Semaphore(0)

    def emitter(r):
        def emit(ev):
            events[id(r)].append(ev)
            if ev[0] == "done":
                done.release()
        return emit

    for r in reqs:
        sched.submit(dataclasses.replace(r, emit=emitter(r)))
    for _ in reqs:
        assert done.acquire(timeout=timeout)
    return [events[id(r)] for r in reqs]


def test_scheduler_matches_single_generation(tok):
    model = tiny(vocab=tok.vocab_size, seq=128, head_scale=20.0)
    eng = Engine(model, tok, tool=False)
    prompts = [tok.encode(t, prepend_bos=True) for t in
               ("The", "A much longer prompt about the history of science and art", "Numbers 1 2 3", "x y", "Why")]
    expected = [eng.generate_batch(p, 1, 12 + i, temperature=0.0)[0][0][len(p):] for i, p in enumerate(prompts)]
    sched = Scheduler(eng, slots=3).start()  # fewer slots than requests: some wait, then take freed slots
    try:
        reqs = [Request(prompt=p, max_tokens=12 + i, temperature=0.0) for i, p in enumerate(prompts)]
        results = run_requests(sched, reqs)
        for evs, exp in zip(results, expected):
            toks = [e[1] for e in evs if e[0] == "token"]
            assert toks == exp
            assert evs[-1][0] == "done" and evs[-1][1] in ("stop", "length")
        deadline = time.time() + 5
        while sched.active and time.time() < deadline:
            time.sleep(0.01)
        assert sched.active == 0 and sched.queued == 0
        assert sched.stats["steps"] > 0
    finally:
        sched.stop()


def test_scheduler_tool_call_pauses_only_that_row(tok, monkeypatch):
    model = tiny(vocab=tok.vocab_size, seq=96, head_scale=20.0)
    eng = Engine(model, tok, tool=True)
    S = tok.special
    call = [S("<|python_start|>")] + tok.encode("6*7") + [S("<|python_end|>")]
    script = list(call)
    real_sample = batching_mod.sample

    def scripted(logits, *a, **k):
        out = real_sample(logits, 0.0)
        if script and logits.shape[0] == 1:
            out[:] = script.pop(0)
        return out

    monkeypatch.setattr(batching_mod, "sample", scripted)
    sched = Scheduler(eng, slots=2).start()
    try:
        r = Request(prompt=tok.encode("Compute", prepend_bos=True), max_tokens=20, temperature=0.5, seed=0)
        (evs,) = run_requests(sched, [r])
    finally:
        sched.stop()
    toks = [(e[1], e[2]) for e in evs if e[0] == "token"]
    out = [S("<|output_start|>")] + tok.encode("42") + [S("<|output_end|>")]
    assert [t for t, _ in toks[:len(call)]] == call
    assert toks[len(call):len(call) + len(out)] == [(t, True) for t in out]


def test_scheduler_cancel_frees_the_slot(tok):
    model = tiny(vocab=tok.vocab_size, seq=128)
    eng = Engine(model, tok, tool=False)
    eng.stop_ids = frozenset()
    sched = Scheduler(eng, slots=2).start()
    sched.min_step_time = 0.01
    try:
        got = threading.Event()
        reasons = []

        def emit(ev):
            if ev[0] == "token":
                got.set()
            else:
                reasons.append(ev[1])

        r = sched.submit(Request(prompt=[tok.bos_id], max_tokens=100, temperature=1.0, emit=emit))
        assert got.wait(10)
        assert sched.active == 1
        sched.cancel(r)
        deadline = time.time() + 5
        while sched.active and time.time() < deadline:
            time.sleep(0.005)
        assert sched.active == 0 and reasons == ["cancelled"]
        assert r.generated < 100
        with pytest.raises(UserError, match="no room"):
            sched.submit(Request(prompt=[1] * 128, max_tokens=1))
    finally:
        sched.stop()


def test_scheduler_logprobs_match_scoring(tok):
    model = tiny(vocab=tok.vocab_size, seq=96)
    eng = Engine(model, tok, tool=False)
    prompt = tok.encode("The cat", prepend_bos=True)
    sched = Scheduler(eng, slots=1).start()
    try:
        (evs,) = run_requests(sched, [Request(prompt=prompt, max_tokens=6, temperature=1.0, seed=3, logprobs=2)])
    finally:
        sched.stop()
    toks = [e[1] for e in evs if e[0] == "token"]
    lps = [e[3] for e in evs if e[0] == "token"]
    scored = eng.score(prompt + toks, top_n=2)[len(prompt) - 1:]
    for (lp, top), (ref, ref_top) in zip(lps, scored):
        assert abs(lp - ref) < 1e-4
        assert [t for t, _ in top] == [t for t, _ in ref_top]


def test_submit_leaves_the_request_as_the_caller_made_it(tok):
    eng = Engine(tiny(vocab=tok.vocab_size, seq=64), tok, tool=False)
    eng.stop_ids = frozenset()  # runs to max_tokens
    sched = Scheduler(eng, slots=1).start()
    try:
        req = Request(prompt=[float(tok.bos_id), 5], max_tokens=3, temperature=0.0)
        with pytest.raises(dataclasses.FrozenInstanceError):
            req.max_tokens = 4
        done = threading.Event()
        gen = sched.submit(dataclasses.replace(req, emit=lambda ev: ev[0] == "done" and done.set()))
        assert done.wait(30)
        assert gen.finished and gen.generated == 3 and gen.prompt == [tok.bos_id, 5]
        assert req.prompt == [float(tok.bos_id), 5] and gen.request.max_tokens == 3
    finally:
        sched.stop()
