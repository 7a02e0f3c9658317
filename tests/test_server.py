import argparse
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import picochat.batching as batching_mod
from picochat.model import GPT, GPTConfig
from picochat.common import UserError
from picochat.openai_api import conversation
from picochat.guard import allowed_hosts
from picochat.server import Limits, ServerThread, add_parser, create_app, read_api_key, serve_cli
from picochat.tokenizer import Tokenizer

openai = pytest.importorskip("openai")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def tok(webtext_tokenizer):
    return Tokenizer.load(webtext_tokenizer)


@pytest.fixture(scope="module")
def model(tok):
    m = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=256, head_dim=32)).init_weights(seed=0)
    with torch.no_grad():  # logits that are not all ~0, so greedy is well defined
        m.lm_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        m.lm_head.weight[len(tok.mergeable_ranks):] = 0  # special tokens (stops, tool calls) never win greedily
    return m.eval()


@pytest.fixture(scope="module")
def server(model, tok):
    app = create_app(model, tok, model_name="tiny", slots=8)
    srv = ServerThread(app).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_idle(sched, timeout=10):
    deadline = time.time() + timeout
    while (sched.active or sched.queued) and time.time() < deadline:
        time.sleep(0.01)
    return sched.active == 0 and sched.queued == 0


HELLO = [{"role": "user", "content": "Hello! How are you?"}]


def test_openai_client_chat(client, tok, server):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0.7, seed=5)
    assert r.object == "chat.completion" and r.model == "tiny"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(tok.render_for_completion(HELLO))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the same seed streamed gives the same text, delta by delta
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0.7, seed=5,
                                            stream=True, stream_options={"include_usage": True})
    deltas, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                deltas.append(c.delta.content)
            finish = c.finish_reason or finish
    assert "".join(deltas) == choice.message.content
    assert finish == choice.finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens
    assert client.models.list().data[0].id == "tiny"


def test_n_stop_and_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=30, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy
    text = r.choices[0].message.content
    assert len(text) > 6
    stop = text[3:6]
    r2 = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=30, temperature=0, stop=[stop])
    assert r2.choices[0].message.content == text[:text.index(stop)]
    assert r2.choices[0].finish_reason == "stop"
    r3 = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0, logprobs=True,
                                        top_logprobs=2)
    content = r3.choices[0].logprobs.content
    assert len(content) == 5 and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in content)  # greedy = the top token


def test_completions_echo_logprobs_match_the_model(client, model, tok):
    prompt = "The cat sat on the mat."
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    ids = tok.encode(prompt)
    assert r.choices[0].text == prompt
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([[tok.bos_id] + ids]))[0], -1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i, ids[i]]), abs=1e-4)
        assert len(lp.top_logprobs[i]) == 2
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i].max()), abs=1e-4)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    # lm-evaluation-harness's loglikelihood request: token ids, echo, max_tokens=1, logprobs=1, temperature 0
    batch = [tok.encode("Paris is in"), tok.encode("Berlin is in Germany")]
    r = client.completions.create(model="tiny", prompt=batch, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    for c in sorted(r.choices, key=lambda c: c.index):
        ids = batch[c.index]
        assert len(c.logprobs.token_logprobs) == len(ids) + 1
        ctx = 1
        tail = c.logprobs.token_logprobs[ctx:-1]
        tops = c.logprobs.top_logprobs[ctx:-1]
        assert all(isinstance(x, float) for x in tail) and all(len(t) == 1 for t in tops)
        # the last (generated, greedy) token is the argmax
        assert c.logprobs.token_logprobs[-1] == pytest.approx(max(c.logprobs.top_logprobs[-1].values()))
    r = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=3, n=2, temperature=1, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]


def test_completions_generate_stream_and_stop(client):
    full = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=0, logprobs=1)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    assert full.choices[0].logprobs.text_offset[0] == len("Once upon")  # offsets count from the prompt's start
    assert len(full.choices[0].logprobs.tokens) == 12
    pieces = [c.text for chunk in client.completions.create(model="tiny", prompt="Once upon", max_tokens=12,
                                                              temperature=0, stream=True, echo=True)
              for c in chunk.choices]
    assert "".join(pieces) == "Once upon" + text
    stop = text[4:6]
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=0, stop=stop)
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_tool_calls_are_shown_inline(client, server, tok, monkeypatch):
    S = tok.special
    script = [S("<|python_start|>")] + tok.encode("6*7") + [S("<|python_end|>")]
    real_sample = batching_mod.sample

    def scripted(logits, *a, **k):
        out = real_sample(logits, *a, **k)
        if script:
            out[:] = script.pop(0)
        return out

    monkeypatch.setattr(batching_mod, "sample", scripted)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "6 times 7?"}],
                                       max_tokens=20, temperature=0.5, seed=0)
    text = r.choices[0].message.content
    assert text.startswith("<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>")
    # the reply goes back as history: the tags become tool parts, not text
    conv = conversation(
        [type("M", (), {"role": "user", "content": "6 times 7?"})(),
         type("M", (), {"role": "assistant", "content": text})(),
         type("M", (), {"role": "user", "content": "thanks"})()], server.app.state.service.limits)
    assert [p["type"] for p in conv[1]["content"]][:2] == ["python", "python_output"]
    r = client.chat.completions.create(model="tiny", max_tokens=3, temperature=0, messages=[
        {"role": "user", "content": "6 times 7?"}, {"role": "assistant", "content": text},
        {"role": "user", "content": "thanks"}])
    assert r.choices[0].finish_reason in ("stop", "length")


def test_errors_are_openai_shaped(server, client, tok):
    url = server.url
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 400}])
    assert e.value.code == "context_length_exceeded"
    cases = [
        (b"{not json", "application/json"), (b"[1, 2]", "application/json"), (b"", "application/json"),
        (json.dumps({"messages": []}).encode(), "application/json"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}).encode(), "application/json"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_k": 5000}).encode(), "application/json"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 99}).encode(), "application/json"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 9}).encode(),
         "application/json"),
        (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(), "application/json"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}]}).encode(),
         "application/json"),
    ]
    for body, ctype in cases:
        r = httpx.post(url + "/v1/chat/completions", content=body, headers={"content-type": ctype})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error"
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url + "/v1/completions", json={"prompt": [tok.vocab_size + 5], "max_tokens": 1})
    assert r.status_code == 400
    assert httpx.get(url + "/health").json()["status"] == "ok"


GENERIC = "the model failed while generating (the server's log has the details)"


def test_a_failed_generation_is_a_server_error(model, tok, monkeypatch, caplog):
    """A decode step or a prefill that raises fails its requests: a 500 when not streaming, an error event then the
    choice's finish and [DONE] when streaming; the client gets a generic message, the log the exception; the server goes
    on serving."""
    app = create_app(model, tok, slots=2)
    with ServerThread(app) as url:
        net = app.state.engine.net
        real = net.hidden
        monkeypatch.setattr(net, "hidden", lambda ids, *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
                            if ids.shape[1] == 1 else real(ids, *a, **k))  # prefill works, decoding fails
        for path, body in [("/v1/chat/completions", {"messages": HELLO}), ("/v1/completions", {"prompt": "Hi"})]:
            body = dict(body, max_tokens=5, temperature=0)  # greedy: a stop token never comes first (fixture)
            r = httpx.post(url + path, json=body, timeout=30)
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
            assert r.json()["error"]["message"] == GENERIC
            lines = [x for x in httpx.post(url + path, json=dict(body, stream=True), timeout=30).text.split("\n") if x]
            events = [json.loads(x[6:]) for x in lines[:-1]]
            assert lines[-1] == "data: [DONE]" and events[-2]["error"]["message"] == GENERIC, lines
            assert "boom" not in "".join(lines) and "RuntimeError" not in "".join(lines)
            assert events[-1]["choices"][0]["finish_reason"] is not None
        # the first token is half a character, held back when decoding fails: it is dropped, not sent after the error
        half = tok.mergeable_ranks[b"\xe2"]
        monkeypatch.setattr(app.state.scheduler, "_sample", lambda gen, logits, greedy: half)
        body = {"messages": HELLO, "max_tokens": 5, "stream": True}
        lines = [x for x in httpx.post(url + "/v1/chat/completions", json=body, timeout=30).text.split("\n") if x]
        events = [json.loads(x[6:]) for x in lines[1:-1]]
        assert [("error" in e, e.get("choices", [{}])[0].get("delta")) for e in events] == [(True, None), (False, {})]
        assert "\ufffd" not in "".join(lines) and "\\ufffd" not in "".join(lines)
        assert "RuntimeError: boom" in caplog.text  # the detail is in the server's log
        # a failed prefill fails its request too (it held no slot yet, and once hung its client)
        monkeypatch.setattr(net, "hidden", lambda ids, *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["message"] == GENERIC
        monkeypatch.setattr(net, "hidden", real)
        assert httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).status_code == 200


def test_api_key_and_queue_limit(model, tok):
    app = create_app(model, tok, api_key="sekret", slots=1, max_queue=0, limits=Limits(max_n=2))
    app.state.scheduler.min_step_time = 0.02
    with ServerThread(app) as url:
        body = {"messages": HELLO, "max_tokens": 40}
        r = httpx.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # probes stay open
        auth = {"Authorization": "Bearer sekret"}
        with httpx.Client(timeout=30) as h:
            with h.stream("POST", url + "/v1/chat/completions", json=dict(body, stream=True), headers=auth) as s:
                lines = s.iter_lines()  # (keep a reference: a dropped iterator closes the connection)
                next(lines)  # the only slot is busy now
                r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth)
                assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        c = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=3)
        assert c.chat.completions.create(model="x", messages=HELLO, max_tokens=2).choices[0].message.content is not None


def test_metrics(server, client):
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    assert 'picochat_http_requests_total{path="/v1/chat/completions",status="200"}' in text
    for name in ("picochat_queue_depth", "picochat_active_slots", "picochat_generated_tokens_total",
                 "picochat_generation_seconds_bucket", "picochat_time_to_first_token_seconds_count"):
        assert name in text
    gen = [line for line in text.splitlines() if line.startswith("picochat_generated_tokens_total")][0]
    assert float(gen.split()[-1]) >= 3
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}  # what Prometheus itself would read
    assert fams["picochat_generation_seconds"].type == "histogram"
    assert fams["picochat_queue_depth"].type == "gauge"
    chat_ok = [s.value for s in fams["picochat_http_requests"].samples
               if s.labels == {"path": "/v1/chat/completions", "status": "200"}]
    assert chat_ok and chat_ok[0] >= 1


def test_load_and_abuse(server, tok):
    """32 concurrent streams and 200 malformed requests against one server: it stays up, every malformed request
    gets a 4xx, every stream ends with [DONE]; then clients that drop mid-stream leave no slot busy."""
    url, sched = server.url, server.app.state.scheduler
    good = {"messages": HELLO, "max_tokens": 16, "stream": True, "temperature": 1.0}

    def stream_one(i):
        with httpx.Client(timeout=120) as h:
            with h.stream("POST", url + "/v1/chat/completions", json=dict(good, seed=i)) as r:
                assert r.status_code == 200
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        return len(chunks)

    big = "x" * 1_000_000
    bad_bodies = [
        b"{", b"nope", b"null", b"[]", b'{"messages": "hi"}', b'{"messages": [{"role": "user"}]}',
        json.dumps({"messages": HELLO, "max_tokens": -5}).encode(),
        json.dumps({"messages": HELLO, "max_tokens": "5"}).encode(),
        json.dumps({"messages": HELLO, "temperature": "hot"}).encode(),
        json.dumps({"messages": HELLO, "n": 1.5}).encode(),
        json.dumps({"messages": HELLO, "stream": "yes"}).encode(),
        json.dumps({"messages": HELLO, "top_p": 0}).encode(),
        json.dumps({"messages": HELLO, "top_k": -1}).encode(),
        json.dumps({"messages": [{"role": "user", "content": big}]}).encode(),
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(),
        json.dumps({"messages": [{"role": "tool", "content": "hi"}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": 42}]}).encode(),
        json.dumps({"messages": HELLO * 300}).encode(),
        json.dumps({"messages": HELLO, "stop": ["a"] * 10}).encode(),
        b"[" * 5000 + b"]" * 5000,
        json.dumps({"prompt": {"a": 1}}).encode(),
    ]

    def bad_one(i):
        body = bad_bodies[i % len(bad_bodies)]
        path = "/v1/completions" if body.startswith(b'{"prompt"') else "/v1/chat/completions"
        r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
        assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text[:200])
        assert r.json()["error"]["message"]
        return r.status_code

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=48) as pool:
        streams = [pool.submit(stream_one, i) for i in range(32)]
        bads = [pool.submit(bad_one, i) for i in range(200)]
        codes = [f.result(timeout=180) for f in bads]
        counts = [f.result(timeout=180) for f in streams]
    assert len(codes) == 200 and all(c >= 1 for c in counts)
    assert time.time() - t0 < 180
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert wait_idle(sched)

    # clients that go away mid-stream: their slots free up at once
    sched.min_step_time = 0.02  # 400 tokens would take 8 s
    cancelled_before = sched.stats["finished"].get("cancelled", 0)
    try:
        def drop_one(i):
            with httpx.Client(timeout=30) as h:
                with h.stream("POST", url + "/v1/chat/completions",
                              json=dict(good, max_tokens=200, seed=i)) as r:
                    it = r.iter_lines()
                    seen = 0
                    for line in it:
                        seen += line.startswith("data: ")
                        if seen >= 3:
                            break
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(drop_one, range(8)))
        t_drop = time.time()
        assert wait_idle(sched, timeout=5), (sched.active, sched.queued)
        assert time.time() - t_drop < 3
        assert sched.stats["finished"].get("cancelled", 0) - cancelled_before == 8
    finally:
        sched.min_step_time = 0.0
    assert httpx.get(url + "/health").json()["active"] == 0
    svc, deadline = server.app.state.service, time.time() + 5
    while svc.total and time.time() < deadline:  # the dropped streams gave their client's share back
        time.sleep(0.01)
    assert svc.total == 0 and svc.in_flight == {}


def test_info_tells_the_ui_the_limits(model, tok):
    """GET /info: what the web UI clamps its settings to, and what it says about the model."""
    notes = {"trained_on": "the demo curriculum", "examples": ["Who are you?"]}
    app = create_app(model, tok, model_name="m", limits=Limits(max_tokens=100), tool=False, notes=notes)
    with ServerThread(app) as url:
        info = httpx.get(url + "/info").json()
        assert info == {"model": "m", "context": 256, "auth": False, "max_tokens": 100, "tool": False,
                        "trained_on": "the demo curriculum", "examples": ["Who are you?"]}
        r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 101})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    app = create_app(model, tok, model_name="m")  # no cap: the context; no notes: empty
    with ServerThread(app) as url:
        info = httpx.get(url + "/info").json()
        assert info["max_tokens"] == 256 and info["tool"] is True
        assert info["trained_on"] == "" and info["examples"] == []


# ---- hardening: dropped clients, fairness, Host names, hostile input, the key ----------------------------------
def raw_post(url, path, body, host=None):
    """A POST on a raw socket (the test decides when the client goes away); returns the socket."""
    addr, port = url.split("//")[1].rsplit(":", 1)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    s = socket.create_connection((addr, int(port)))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host or addr}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def counter(app, name, **labels):
    """A sample of the app's /metrics, as Prometheus would read it."""
    fams = {f.name: f for f in text_string_to_metric_families(app.state.service.metrics.render().decode())}
    return sum(s.value for s in fams[name].samples if s.name == name + "_total" and s.labels == labels)


def test_a_dropped_request_stops_generating(model, tok):
    """A client that leaves a request that does not stream stops its generations at once (not after 200
    tokens): the scheduler cancels them, the slot frees, /metrics counts a 499."""
    app = create_app(model, tok, slots=2)
    sched = app.state.scheduler
    sched.min_step_time = 0.02  # 200 tokens would take 4 s
    with ServerThread(app) as url:
        for path, body in [("/v1/completions", {"prompt": "Once upon", "max_tokens": 200, "n": 2}),
                           ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 200})]:
            before, cancelled = sched.stats["generated_tokens"], sched.stats["finished"].get("cancelled", 0)
            s = raw_post(url, path, body)
            deadline = time.time() + 30
            while sched.stats["generated_tokens"] < before + 5:  # it is generating
                assert time.time() < deadline
                time.sleep(0.01)
            s.close()
            t_drop = time.time()
            want = cancelled + body.get("n", 1)
            while sched.stats["finished"].get("cancelled", 0) < want and time.time() < t_drop + 10:
                time.sleep(0.005)
            assert sched.stats["finished"].get("cancelled", 0) == want and time.time() - t_drop < 1.0
            assert wait_idle(sched, timeout=5)
            generated = sched.stats["generated_tokens"] - before
            time.sleep(0.2)
            assert sched.stats["generated_tokens"] - before == generated < 100  # and nothing more after
            deadline = time.time() + 5
            while counter(app, "picochat_http_requests", path=path, status="499") < 1 and time.time() < deadline:
                time.sleep(0.01)
            assert counter(app, "picochat_http_requests", path=path, status="499") == 1
            assert app.state.service.total == 0 and app.state.service.in_flight == {}
        # scoring prompts for echo stops too, before the next prompt
        engine, scored = app.state.engine, []
        real_score = engine.score
        engine.score = lambda *a, **k: (scored.append(1), time.sleep(0.05), real_score(*a, **k))[-1]
        s = raw_post(url, "/v1/completions", {"prompt": ["a b c"] * 40, "max_tokens": 0, "echo": True,
                                              "logprobs": 1})
        deadline = time.time() + 30
        while not scored:
            assert time.time() < deadline
            time.sleep(0.005)
        s.close()
        deadline = time.time() + 5
        while app.state.service.total and time.time() < deadline:
            time.sleep(0.01)
        assert app.state.service.total == 0 and len(scored) <= 3
        time.sleep(0.2)
        assert len(scored) <= 3


def test_one_client_cannot_crowd_out_another(model, tok):
    """A flood of one client's requests takes its share (client_limit generations) and gets 429s past it; another
    client is still served. Generations count per choice and per prompt scored for echo; prompts x n and the
    logprob values of one answer are bounded."""
    app = create_app(model, tok, slots=2, max_queue=4, client_limit=3,
                     limits=Limits(max_choices=3, max_logprobs=1000))
    sched, svc = app.state.scheduler, app.state.service
    sched.min_step_time = 0.02
    flood_client = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=60)
    other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3"), timeout=60)
    with ServerThread(app) as url, flood_client, other:
        def flood(i):
            return flood_client.post(url + "/v1/completions",
                                     json={"prompt": "Once upon", "max_tokens": 150, "seed": i})

        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(flood, i) for i in range(8)]
            deadline = time.time() + 30
            while svc.in_flight.get("127.0.0.2", 0) < 3 or sum(f.done() for f in futures) < 5:
                assert time.time() < deadline, (svc.in_flight, [f.done() for f in futures])
                time.sleep(0.01)
            assert svc.in_flight == {"127.0.0.2": 3}
            r = other.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
            # prompt scoring counts too: 2 prompts scored + 2 generated = 4, over the share of 3
            r = other.post(url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1, "echo": True,
                                                          "logprobs": 1})
            assert r.status_code == 429 and r.json()["error"]["code"] == "client_limit", r.text
            assert "127.0.0.3" in r.json()["error"]["message"]
            sched.min_step_time = 0.0  # the flood may finish now
            responses = [f.result(timeout=60) for f in futures]
        codes = sorted(r.status_code for r in responses)
        assert codes == [200] * 3 + [429] * 5, codes
        refused = [r.json()["error"] for r in responses if r.status_code == 429]
        assert all(e["code"] == "client_limit" and e["type"] == "rate_limit_error" for e in refused)
        assert "127.0.0.2" in refused[0]["message"] and "limit of 3 per client" in refused[0]["message"]
        # one request cannot ask for more than max_choices generations or max_logprobs values
        r = other.post(url + "/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = other.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 200, "logprobs": 20})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
        # nothing to generate or score (echo alone) costs nothing and leaves nothing behind
        r = other.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 0, "echo": True})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "a"
        assert wait_idle(sched) and svc.total == 0 and svc.in_flight == {}


def test_only_the_allowed_host_names_are_answered(server, model, tok):
    """DNS rebinding: a page whose name now points at 127.0.0.1 reaches the server with its own Host; refused
    (421), on every path. The loopback names, with any port, are answered."""
    url = server.url
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io",
                 "127.0.0.1:8000@evil.example", "localhost:80:80", "[::1]x", "localhost:8o", ""):
        for path in ("/", "/info", "/health", "/metrics", "/v1/models"):
            r = httpx.get(url + path, headers={"Host": host})
            assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed", (host, path)
        assert "--allowed-host" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1}, headers={"Host": host})
        assert r.status_code == 421
    for host in ("localhost", "LocalHost:8000", "127.0.0.1:1", "[::1]:8000", "[::1]"):
        assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200, host
    # behind a reverse proxy: its name is allowed as well
    app = create_app(model, tok, allowed_hosts=allowed_hosts("0.0.0.0", ["Chat.Example.org"]))
    with ServerThread(app) as url:
        assert httpx.get(url + "/health", headers={"Host": "chat.example.org:443"}).status_code == 200
        assert httpx.get(url + "/health", headers={"Host": "evil.example"}).status_code == 421


def test_hostile_text_and_bodies(server, model, tok):
    """A lone surrogate anywhere gets a 400 (streaming or not, echoed or not); a chunked body over the limit
    gets a 413 like a declared one."""
    url = server.url
    lone = b'"a\\ud800b"'
    cases = [("/v1/completions", b'{"prompt": %s, "echo": true, "max_tokens": 2}' % lone),
             ("/v1/completions", b'{"prompt": ["ok", %s], "echo": true, "max_tokens": 0, "logprobs": 1}' % lone),
             ("/v1/completions", b'{"prompt": %s, "echo": true, "stream": true, "max_tokens": 2}' % lone),
             ("/v1/completions", b'{"prompt": "ok", "stop": %s, "max_tokens": 2}' % lone),
             ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": %s}]}' % lone),
             ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}], "stream": true}'),
             ("/v1/chat/completions",
              b'{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}' % lone)]
    params = []
    for path, body in cases:
        r = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        assert "lone UTF-16 surrogate" in r.json()["error"]["message"]
        params.append(r.json()["error"]["param"])
    assert params == ["prompt", "prompt.1", "prompt", "stop", "messages.0.content", "messages.0.content",
                      "messages.0.content.0.text"]
    pair = b'{"prompt": "\\ud83d\\ude00", "echo": true, "max_tokens": 1}'  # a proper pair is one character
    r = httpx.post(url + "/v1/completions", content=pair, headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("\U0001F600")

    app = create_app(model, tok, limits=Limits(max_body_bytes=1000))
    with ServerThread(app) as url:
        def chunks(n):
            for _ in range(n):
                yield b" " * 400
        r = httpx.post(url + "/v1/completions", content=chunks(3), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        body = b'{"prompt": "Hi", "max_tokens": 1}'
        r = httpx.post(url + "/v1/completions", content=iter([body[:10], body[10:]]),
                       headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text  # a chunked body under the limit is read whole
        assert httpx.get(url + "/health").status_code == 200


def serve_args(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_the_api_key_from_a_file_or_the_environment(tmp_path, capsys):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    assert read_api_key(serve_args(["--api-key-file", str(key_file)]), {}) == "s3cret"
    assert read_api_key(serve_args([]), {"PICOCHAT_API_KEY": "from-env"}) == "from-env"
    assert read_api_key(serve_args([]), {}) is None and read_api_key(serve_args([]), {"PICOCHAT_API_KEY": ""}) is None
    assert capsys.readouterr().err == ""
    # in argv: it works, with a warning (ps shows it to every user)
    assert read_api_key(serve_args(["--api-key", "k-123"]), {"PICOCHAT_API_KEY": "env"}) == "k-123"
    err = capsys.readouterr().err
    assert "warning" in err and "--api-key-file" in err and "k-123" not in err
    (tmp_path / "empty").write_text(" \n")
    for argv in (["--api-key-file", str(tmp_path / "empty")], ["--api-key-file", str(tmp_path / "missing")],
                 ["--api-key", "a", "--api-key-file", str(key_file)]):
        with pytest.raises(UserError):
            read_api_key(serve_args(argv), {})


@pytest.mark.parametrize("argv, env, key, foreign_host", [
    (["--api-key-file", "KEYFILE"], {}, "from-file", 421),
    ([], {"PICOCHAT_API_KEY": "from-env"}, "from-env", 421),
    (["--host", "0.0.0.0"], {"PICOCHAT_API_KEY": "from-env"}, "from-env", 200),  # the key protects: any name
    (["--host", "0.0.0.0", "--allowed-host", "evil.example"], {}, None, 200),
    (["--host", "0.0.0.0"], {}, None, 421),  # keyless on every interface: still only the allowed names
])
def test_serve_wires_the_key_and_the_host_names(argv, env, key, foreign_host, model, tok, tmp_path, monkeypatch,
                                                capsys):
    """`picochat serve` as the command line has it (the model loader and uvicorn.run stubbed, the app served
    live): the key from its file or $PICOCHAT_API_KEY guards /v1 and /metrics, not /health; the Host names."""
    import uvicorn
    import picochat.checkpoint
    (tmp_path / "key").write_text("from-file")
    argv = [str(tmp_path / "key") if a == "KEYFILE" else a for a in argv]
    for name in ("PICOCHAT_API_KEY",):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    info = {"run": "r", "stage": "sft", "description": "tiny", "trained_on": "nothing", "examples": []}
    monkeypatch.setattr(picochat.checkpoint, "load_chat_model", lambda args: (model, tok, info))
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert serve_cli(serve_args(argv + ["--port", "0"])) == 0
    assert "warning" not in capsys.readouterr().err  # no key in argv
    with ServerThread(served["app"]) as url:
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(url + path, headers=auth).status_code == 200
            assert httpx.get(url + path).status_code == (401 if key else 200)
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/health", headers={"Host": "evil.example"}).status_code == foreign_host


def test_serve_dtype_int8(model, tok, monkeypatch):
    """`picochat serve --dtype int8`: the loaded checkpoint decodes with int8 weights, and answers."""
    import uvicorn
    from picochat import checkpoint
    from picochat.common import home_dir
    from picochat.int8 import Int8Weight
    checkpoint.save_checkpoint(home_dir() / "runs" / "demo" / "sft", 3, model, tokenizer=tok)
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert serve_cli(serve_args(["--run", "demo", "--dtype", "int8", "--no-tool", "--port", "0"])) == 0
    assert isinstance(served["app"].state.engine.net.head, Int8Weight)
    with ServerThread(served["app"]) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "x", "prompt": "Hello", "max_tokens": 4,
                                                      "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
