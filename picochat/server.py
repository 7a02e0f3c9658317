"""`picochat serve`: one process serving a ChatGPT-like web UI and an OpenAI-compatible API.

    picochat serve                                  # http://127.0.0.1:8000 : the UI; /v1 : the API
    picochat serve --host 0.0.0.0 --api-key SECRET  # clients then send "Authorization: Bearer SECRET"

Endpoints:
  GET  /                      the web UI (picochat/static: plain HTML, JS and CSS, no CDN, no build step)
  POST /v1/chat/completions   OpenAI chat completions: stream=true gives SSE `data: {chunk}` lines ending with
                              `data: [DONE]`; n, seed, stop, temperature, top_p, top_k (an extension),
                              max_tokens / max_completion_tokens, logprobs + top_logprobs, stream_options.include_usage
  POST /v1/completions        raw-text completions (no chat template), with echo and logprobs: echo=true,
                              max_tokens=0, logprobs=N returns the prompt tokens' logprobs (tokens, token_logprobs
                              with the first null, top_logprobs, text_offset): what lm-evaluation-harness's
                              local-completions model needs for multiple choice. prompt: a string, a list of
                              strings, a list of token ids or a list of lists of token ids.
  GET  /v1/models, /health, /metrics (Prometheus text: requests, tokens, queue depth, active slots, latency)
  GET  /info                  what the web UI adapts to: context, max_tokens cap, tool on or off, what the model was
                              trained on and prompts worth trying

Tool calls in chat completions: the assistant text carries them inline, as the special tokens' own text:
"... <|python_start|>12*3<|python_end|><|output_start|>36<|output_end|> ...". Every OpenAI client shows them
(they are plain text to it), the web UI renders them as distinct chips, and when a conversation comes back in a
request the tags are parsed into the tokenizer's python / python_output parts, so a multi-turn conversation
re-renders exactly the tokens the model produced. A user message is always encoded as plain text: typing the
tags there does not produce special tokens.

Completions prompts: the model always saw <|bos|> first in training, so one is put in front of a prompt that does
not start with it; it is never echoed or counted, so token positions in the response match the client's own
tokenization of the prompt.

Concurrency: every generation goes through one engine.Scheduler (continuous batching over --slots cache rows):
concurrent requests share decode steps, and a client that disconnects frees its slot at the next step.

Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with a 4xx status for anything wrong
with the request (400 validation and limits, 401 key, 404, 413 body too large, 429 queue full); a bad request
never takes the server down. Limits (flags): messages per request, characters per request, max_tokens, n, stop
strings, prompts per completions request, body size; temperature in [0, 2], top_p in (0, 1], top_k in
[0, vocab]. A prompt that leaves no room in the context gets 400 context_length_exceeded; max_tokens beyond the
room that is left is clipped (finish_reason "length").
"""
import argparse
import asyncio
import hmac
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from picochat.common import UserError
from picochat.batching import QueueFull, Request as GenRequest, Scheduler
from picochat.engine import Engine
from picochat.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from picochat.openai_api import (APIError, ChatRequest, ChoiceText, CompletionRequest, Limits, chat_chunk,
                                 chat_completion, chat_logprob_entry, chat_logprobs_count, chat_usage_chunk,
                                 check_echo, check_sampling, check_stops, completion_logprobs, conversation,
                                 echo_logprobs, error_body, finish_reason, parse_prompts, room, sampling_params, sse,
                                 text_chunk, text_usage_chunk, usage)
from picochat.openai_api import completion as completion_body

STATIC_DIR = Path(__file__).with_name("static")
log = logging.getLogger("picochat.server")


# ---- the request guard ----------------------------------------------------------------------------------------
class _BodyTooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware: refuses bodies over the limit (413) and counts every request for /metrics."""

    def __init__(self, app, max_body, metrics):
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, state = time.perf_counter(), {"status": 500, "started": False}

        async def send_wrapper(msg):
            if msg["type"] == "http.response.start":
                state["status"], state["started"] = msg["status"], True
            await send(msg)

        received = 0

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge()
            return msg

        try:
            length = dict(scope.get("headers", [])).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                raise _BodyTooLarge()
            await self.app(scope, limited_receive, send_wrapper)
        except _BodyTooLarge:
            if not state["started"]:
                await _send_json(send_wrapper, 413, error_body(
                    f"request body is larger than the server's limit of {self.max_body} bytes",
                    code="request_too_large"))
        finally:
            self.metrics.record(scope.get("path", ""), state["status"], time.perf_counter() - t0)


async def _send_json(send, status, obj):
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})



# ---- what the endpoints share ---------------------------------------------------------------------------------
class Service:
    """What the endpoints share: the engine, the scheduler, the limits, the metrics and what /info tells."""

    def __init__(self, engine, scheduler, limits, model_name, api_key, notes):
        self.engine, self.scheduler, self.limits = engine, scheduler, limits
        self.tokenizer = engine.tokenizer
        self.model_name, self.api_key, self.notes = model_name, api_key, notes
        self.metrics = Metrics(scheduler)
        self.created = int(time.time())

    def check_auth(self, request):
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", "invalid_api_key")

    def submit(self, prompt, body, max_tokens, n, logprobs, on_event):
        """Queue n generations of prompt; on_event(index, event) runs on the event loop."""
        loop = asyncio.get_running_loop()
        reqs = []

        def emitter(i):
            return lambda ev: loop.call_soon_threadsafe(on_event, i, ev)

        try:
            for i in range(n):
                reqs.append(self.scheduler.submit(GenRequest(
                    prompt=prompt, max_tokens=max_tokens, logprobs=logprobs, emit=emitter(i),
                    **sampling_params(body, i))))
        except QueueFull as e:
            for r in reqs:
                self.scheduler.cancel(r)
            raise APIError(429, str(e), "rate_limit_error", "queue_full") from None
        except UserError as e:
            for r in reqs:
                self.scheduler.cancel(r)
            raise APIError(400, str(e), code="context_length_exceeded") from None
        return reqs


async def _events(queue, request, stream):
    """(index, event) from the scheduler; None every second of silence (a keep-alive for streams, a
    disconnect check otherwise)."""
    while True:
        try:
            yield await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if not stream and await request.is_disconnected():
                raise ConnectionError("client disconnected")
            yield None


async def _choices(queue, request, stream, reqs, texts, scheduler):
    """The scheduler's events as the endpoints answer them, choice by choice: ("token", i, piece, token, lp)
    with the text the token added to choice i ("" while a stop string may be starting) and its logprobs (None
    once the choice stopped); ("done", i, tail, finish_reason); ("sse", text) to pass to a stream as it is (a
    keep-alive, an error). A choice that reaches a stop string is cancelled at once; a failed generation raises
    a 500 when not streaming. Ends once every choice is done."""
    remaining = len(reqs)
    if not remaining:
        return
    async for item in _events(queue, request, stream):
        if item is None:
            if stream:
                yield ("sse", ": keep-alive\n\n")
            continue
        i, ev = item
        if ev[0] == "token":
            _, tok, _forced, lp = ev
            piece = texts[i].feed(tok)
            if texts[i].stopped:
                scheduler.cancel(reqs[i])
            yield ("token", i, piece, tok, None if texts[i].stopped else lp)
            continue
        reason = ev[1]
        remaining -= 1
        tail = texts[i].finish()
        if reason.startswith("error"):
            if not stream:
                raise APIError(500, reason, "server_error")
            yield ("sse", sse(error_body(reason, "server_error")))
        yield ("done", i, tail, finish_reason(reason, texts[i]))
        if remaining == 0:
            return


async def _respond(run, reqs, stream, scheduler):
    """Streams run(True) as SSE, or returns run(False)'s one result; either way a request that ends early
    (disconnect, error) cancels its generations so their slots free up at once."""
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    if stream:
        async def body():
            try:
                async for piece in run(True):
                    yield piece
            finally:
                for r in reqs:
                    if not r.finished:
                        scheduler.cancel(r)

        class SSE(StreamingResponse):
            async def __call__(self, scope, receive, send):
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    await self.body_iterator.aclose()

        return SSE(body(), media_type="text/event-stream",
                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        result = None
        async for result in run(False):
            pass
        return JSONResponse(result)
    except ConnectionError:  # the client went away: nobody to answer (499, as nginx logs it)
        return Response(status_code=499)
    finally:
        for r in reqs:
            if not r.finished:
                scheduler.cancel(r)


# ---- the endpoints --------------------------------------------------------------------------------------------
async def chat_completions(svc, body, request):
    """POST /v1/chat/completions: body, a parsed ChatRequest."""
    scheduler, tokenizer, limits = svc.scheduler, svc.tokenizer, svc.limits
    conv = conversation(body.messages, limits)
    try:
        prompt = tokenizer.render_for_completion(conv)
    except UserError as e:
        raise APIError(400, str(e), param="messages") from None
    left = room(prompt, scheduler.max_len)
    requested = check_sampling(body, limits, vocab_size=svc.engine.vocab_size, max_len=scheduler.max_len)
    stops = check_stops(body.stop, limits)
    max_tokens = min(requested or left, left)
    top_n = chat_logprobs_count(body)
    queue = asyncio.Queue()
    reqs = svc.submit(prompt, body, max_tokens, body.n, top_n, lambda i, ev: queue.put_nowait((i, ev)))
    texts = [ChoiceText(tokenizer, stops) for _ in reqs]
    cid, created, model = "chatcmpl-" + secrets.token_hex(12), int(time.time()), svc.model_name

    def chunk(i, delta, finish=None, logprobs=None):
        return sse(chat_chunk(cid, created, model, i, delta, finish, logprobs))

    def used():
        return usage(len(prompt), sum(r.generated for r in reqs))

    async def run(stream):
        """Yields SSE strings (stream) or, at the end, the one response body."""
        finish, lps = [None] * len(reqs), [[] for _ in reqs]
        if stream:
            for i in range(len(reqs)):
                yield chunk(i, {"role": "assistant", "content": ""})
        async for ev in _choices(queue, request, stream, reqs, texts, scheduler):
            if ev[0] == "sse":
                yield ev[1]
            elif ev[0] == "token":
                _, i, piece, tok, lp = ev
                entry = chat_logprob_entry(tokenizer, tok, lp) if lp is not None else None
                if entry is not None:
                    lps[i].append(entry)
                if stream and (piece or entry):
                    yield chunk(i, {"content": piece}, logprobs={"content": [entry]} if entry else None)
            else:
                _, i, tail, finish[i] = ev
                if stream:
                    if tail:
                        yield chunk(i, {"content": tail})
                    yield chunk(i, {}, finish[i])
        if stream:
            if body.stream_options and body.stream_options.include_usage:
                yield sse(chat_usage_chunk(cid, created, model, used()))
            yield "data: [DONE]\n\n"
        else:
            yield chat_completion(cid, created, model, texts=[t.text for t in texts], finish=finish,
                                  logprobs=lps if top_n is not None else None, usage=used())

    return await _respond(run, reqs, body.stream, scheduler)


async def completions(svc, body, request):
    """POST /v1/completions: body, a parsed CompletionRequest."""
    scheduler, tokenizer, limits, engine = svc.scheduler, svc.tokenizer, svc.limits, svc.engine
    prompts = parse_prompts(body.prompt, tokenizer, limits, engine.vocab_size)
    check_sampling(body, limits, vocab_size=engine.vocab_size, max_len=scheduler.max_len)
    stops = check_stops(body.stop, limits)
    bos = tokenizer.bos_id
    model_prompts = [ids if ids and ids[0] == bos else [bos] + ids for ids, _ in prompts]
    rooms = [room(p, scheduler.max_len) for p in model_prompts]
    want = body.max_tokens if body.max_tokens is not None else 16
    top_n = body.logprobs
    check_echo(body)
    # prompt logprobs for echo: one forward per prompt, on the scheduler thread between decode steps
    scored = [None] * len(prompts)
    if body.echo and top_n is not None:
        for k, (ids, _) in enumerate(prompts):
            mp = model_prompts[k]
            fut = scheduler.run_job(lambda mp=mp: engine.score(mp, top_n))
            res = await asyncio.wrap_future(fut)  # res[j]: logprob of mp[j + 1]
            scored[k] = res if len(mp) > len(ids) else [None] + res
            scored[k][0] = None  # as OpenAI: the first token has no logprob (nothing precedes it)
    queue = asyncio.Queue()
    reqs = []  # (prompt index, choice index, request)
    try:
        for k, mp in enumerate(model_prompts):
            if want == 0:
                continue
            got = svc.submit(mp, body, min(want, rooms[k]), body.n, top_n,
                             lambda i, ev, k=k: queue.put_nowait((k * body.n + i, ev)))
            reqs.extend(got)
    except APIError:
        for r in reqs:
            scheduler.cancel(r)
        raise
    n_choices = len(prompts) * body.n
    texts = [ChoiceText(tokenizer, stops) for _ in range(n_choices)]
    tokens = [[] for _ in range(n_choices)]  # (token, logprob) of each choice, for its logprobs
    cid, created, model = "cmpl-" + secrets.token_hex(12), int(time.time()), svc.model_name

    def used():
        return usage(sum(len(ids) for ids, _ in prompts), sum(r.generated for r in reqs))

    def choice(c, finish):
        ids, text = prompts[c // body.n]
        base = echo_logprobs(tokenizer, ids, scored[c // body.n]) if body.echo and top_n is not None else None
        lp = None if top_n is None else completion_logprobs(tokenizer, tokens[c], offset=len(text), base=base)
        return {"index": c, "text": (text if body.echo else "") + texts[c].text, "logprobs": lp,
                "finish_reason": finish}

    async def run(stream):
        finish = ["length"] * n_choices
        if stream and body.echo:
            for c in range(n_choices):
                yield sse(text_chunk(cid, created, model, c, prompts[c // body.n][1]))
        async for ev in _choices(queue, request, stream, reqs, texts, scheduler):
            if ev[0] == "sse":
                yield ev[1]
            elif ev[0] == "token":
                _, c, piece, tok, lp = ev
                if lp is not None:
                    tokens[c].append((tok, lp))
                if stream and piece:
                    yield sse(text_chunk(cid, created, model, c, piece))
            else:
                _, c, tail, finish[c] = ev
                if stream:
                    yield sse(text_chunk(cid, created, model, c, tail, finish[c]))
        if stream:
            if body.stream_options and body.stream_options.include_usage:
                yield sse(text_usage_chunk(cid, created, model, used()))
            yield "data: [DONE]\n\n"
            return
        yield completion_body(cid, created, model, choices=[choice(c, finish[c]) for c in range(n_choices)],
                              usage=used())

    return await _respond(run, reqs, body.stream, scheduler)


# ---- errors: OpenAI-shaped, whatever raised them --------------------------------------------------------------
def _json(body, status):
    from fastapi.responses import JSONResponse
    return JSONResponse(body, status_code=status)


async def api_error(request, e):
    return _json(error_body(e.message, e.type, e.code, e.param), e.status)


async def validation_error(request, e):
    """pydantic's complaints about the body (FastAPI's RequestValidationError) as one 400 message: the first
    three problems, param the first one's field."""
    errors = e.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return _json(error_body("the request body is not valid JSON", code="invalid_json"), 400)
    if errors and tuple(errors[0].get("loc", ())) == ("body",):
        return _json(error_body("the request body must be a JSON object (Content-Type: application/json)",
                                code="invalid_json"), 400)
    msgs = []
    for err in errors[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ())[1:]) or "body"
        msgs.append(f"{loc}: {err.get('msg', 'invalid')}")
    first = ".".join(str(x) for x in errors[0].get("loc", ())[1:]) if errors else None
    return _json(error_body("invalid request: " + "; ".join(msgs), param=first or None), 400)


async def http_error(request, e):
    kind = {401: "authentication_error", 404: "not_found_error"}.get(e.status_code, "invalid_request_error")
    return _json(error_body(str(e.detail), kind), e.status_code)


async def server_error(request, e):
    log.exception("unhandled error")
    return _json(error_body(f"internal error: {e.__class__.__name__}", "server_error"), 500)


# ---- probes and the model list --------------------------------------------------------------------------------
def health(svc):
    s = svc.scheduler
    return {"status": "ok", "model": svc.model_name, "slots": s.num_slots, "active": s.active, "queued": s.queued,
            "context": s.max_len, "auth": bool(svc.api_key)}


def info(svc):
    """What the web UI adapts to: the context, the cap on max_tokens, whether the tool runs, what the model was
    trained on and prompts worth trying."""
    s, notes = svc.scheduler, svc.notes
    return {"model": svc.model_name, "context": s.max_len, "auth": bool(svc.api_key),
            "max_tokens": min(svc.limits.max_tokens or s.max_len, s.max_len), "tool": svc.engine.tool,
            "trained_on": notes.get("trained_on", ""), "examples": list(notes.get("examples", ()))}


def model_card(svc, name=None):
    """The /v1/models entry of the one model served; name (from /v1/models/{name}) must be its id: 404 if not."""
    if name is not None and name != svc.model_name:
        raise APIError(404, f"model {name!r} not found (this server has {svc.model_name!r})", "not_found_error",
                       "model_not_found")
    return {"id": svc.model_name, "object": "model", "created": svc.created, "owned_by": "picochat",
            "context_length": svc.scheduler.max_len}


def metrics_response(svc):
    from fastapi.responses import Response
    return Response(svc.metrics.render(), media_type=METRICS_CONTENT_TYPE)


# ---- the app --------------------------------------------------------------------------------------------------
def create_app(model, tokenizer, *, model_name="picochat", api_key=None, limits=None, slots=8, max_queue=256,
               tool=True, compile=False, engine=None, threads=0, notes=None):
    """The FastAPI app (UI + API) around one Engine and one Scheduler. The scheduler thread starts now and stops
    at the app's shutdown (app.state.scheduler.stop() does it by hand). notes ({"trained_on", "examples"}, from
    checkpoint.training_notes) tell the web UI what to say about the model."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or Limits()
    engine = engine or Engine(model, tokenizer, tool=tool, compile=compile)
    scheduler = Scheduler(engine, slots=slots, max_queue=max_queue, threads=threads).start()
    svc = Service(engine, scheduler, limits, model_name, api_key, notes or {})

    async def lifespan(app):
        yield
        scheduler.stop()

    app = FastAPI(title="picochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.scheduler, app.state.engine = svc, scheduler, engine
    app.add_middleware(Guard, max_body=limits.max_body_bytes, metrics=svc.metrics)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def _health():
        return health(svc)

    @app.get("/info")
    async def _info():
        return info(svc)

    @app.get("/metrics")
    async def _metrics():
        return metrics_response(svc)

    async def auth(request: Request):
        svc.check_auth(request)

    api = [Depends(auth)]

    @app.get("/v1/models", dependencies=api)
    async def models():
        return {"object": "list", "data": [model_card(svc)]}

    @app.get("/v1/models/{name}", dependencies=api)
    async def one_model(name: str):
        return model_card(svc, name)

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat(body: ChatRequest, request: Request):
        return await chat_completions(svc, body, request)

    @app.post("/v1/completions", dependencies=api)
    async def complete(body: CompletionRequest, request: Request):
        return await completions(svc, body, request)

    return app


# ---- running it -----------------------------------------------------------------------------------------------
class ServerThread:
    """uvicorn serving an app from a background thread (tests, benchmarks, notebooks):
        with ServerThread(app) as url: requests.get(url + "/health")"""

    def __init__(self, app, host="127.0.0.1", port=0):
        import socket
        import uvicorn
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.app, self.host, self.port = app, host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="picochat-uvicorn")

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def start(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        sched = getattr(self.app.state, "scheduler", None)
        if sched is not None:
            sched.stop()

    def __enter__(self):
        return self.start().url

    def __exit__(self, *exc):
        self.stop()


def add_parser(sub):
    from picochat.checkpoint import add_model_args
    p = sub.add_parser("serve", help="serve the web UI and an OpenAI-compatible API",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; set --api-key)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("PICOCHAT_API_KEY", ""),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $PICOCHAT_API_KEY, empty = open)")
    g.add_argument("--model-name", default="", help="the model id clients see (default: picochat-<run>-<stage>)")
    g.add_argument("--slots", type=int, default=8, help="requests decoded together (cache rows)")
    g.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429s")
    g = p.add_argument_group("limits per request")
    d = Limits()
    g.add_argument("--max-messages", type=int, default=d.max_messages)
    g.add_argument("--max-chars", type=int, default=d.max_chars, help="characters of all messages or prompts")
    g.add_argument("--max-tokens-limit", type=int, default=d.max_tokens, help="generated tokens (0 = the context)")
    g.add_argument("--max-n", type=int, default=d.max_n, help="choices per request")
    g.add_argument("--max-prompts", type=int, default=d.max_prompts, help="prompts per /v1/completions request")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / (1 << 20), help="request body size")
    p.set_defaults(func=serve_cli)


def serve_cli(args):
    import torch
    import uvicorn
    from picochat.checkpoint import load_chat_model
    if args.port < 0 or args.port > 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.slots < 1 or args.max_queue < 0:
        raise UserError("--slots must be at least 1 and --max-queue at least 0")
    # the model runs in the scheduler's thread only, with all the threads; this one loads it with one thread
    # so that it never starts an OpenMP team of its own (see Scheduler)
    threads, args.threads = args.threads or torch.get_num_threads(), 1
    model, tokenizer, info = load_chat_model(args)
    limits = Limits(max_messages=args.max_messages, max_chars=args.max_chars, max_tokens=args.max_tokens_limit,
                    max_n=args.max_n, max_prompts=args.max_prompts, max_body_bytes=int(args.max_body_mb * (1 << 20)))
    name = args.model_name or f"picochat-{info['run']}-{info['stage']}"
    app = create_app(model, tokenizer, model_name=name, api_key=args.api_key or None, limits=limits,
                     slots=args.slots, max_queue=args.max_queue, tool=not args.no_tool, compile=args.compile,
                     threads=threads, notes=info)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it")
    shown = "localhost" if args.host in ("127.0.0.1", "0.0.0.0", "::") else args.host
    print(f"picochat: {info['description']}")
    print(f"  trained on  {info['trained_on']}")
    print(f"  web UI      http://{shown}:{args.port}/")
    print(f"  OpenAI API  http://{shown}:{args.port}/v1   (model \"{name}\")")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
    return 0
