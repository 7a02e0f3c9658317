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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from picochat.common import UserError
from picochat.engine import (TOOL_TAGS, Engine, QueueFull, Request as GenRequest, Scheduler, StreamDecoder,
                             parse_reply)

STATIC_DIR = Path(__file__).with_name("static")
log = logging.getLogger("picochat.server")


@dataclass
class Limits:
    max_messages: int = 200        # messages in one chat request
    max_chars: int = 100_000       # characters of all messages (or prompts) in one request
    max_tokens: int = 0            # generated tokens per request (0 = the model's context)
    max_n: int = 8                 # choices per request
    max_prompts: int = 64          # prompts in one /v1/completions request
    max_stop: int = 4              # stop strings, each at most 200 characters
    max_body_bytes: int = 4 << 20  # request body


# ---- request schemas (strict: "12" is not a number, true is not 1) --------------------------------------------
class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Schema):
    type: Literal["text"]
    text: str


class Message(_Schema):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(_Schema):
    include_usage: bool = False


class _Sampling(_Schema):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)  # accepted for compatibility, not applied
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class APIError(Exception):
    def __init__(self, status, message, type="invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def error_body(message, type="invalid_request_error", code=None, param=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- metrics and the request guard ----------------------------------------------------------------------------
KNOWN_PATHS = {"/", "/health", "/info", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


class Metrics:
    def __init__(self):
        from picochat.engine import Histogram
        self.lock = threading.Lock()
        self.requests = {}  # (path, status) -> count
        self.response_time = Histogram((0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
        self.started = time.time()

    def record(self, path, status, seconds):
        path = path if path in KNOWN_PATHS or path.startswith("/static/") else "other"
        path = "/static" if path.startswith("/static/") else path
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            self.response_time.observe(seconds)


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


# ---- helpers --------------------------------------------------------------------------------------------------
class ChoiceText:
    """One choice's text as it streams: UTF-8-safe decoding, tool tags as text, and stop strings (text that
    could still become a stop string is held back until it cannot)."""

    def __init__(self, tokenizer, stops):
        self.dec = StreamDecoder(tokenizer, keep=TOOL_TAGS)
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf, self.sent, self.stopped = "", 0, False

    def feed(self, token):
        if self.stopped:
            return ""
        self.buf += self.dec.feed(token)
        return self._release(final=False)

    def finish(self):
        if self.stopped:
            return ""
        self.buf += self.dec.flush()
        return self._release(final=True)

    def _release(self, final):
        hits = [i for i in (self.buf.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            out, self.sent, self.stopped = self.buf[self.sent:min(hits)], min(hits), True
            return out
        end = len(self.buf) if final else max(self.sent, len(self.buf) - self.hold)
        out, self.sent = self.buf[self.sent:end], end
        return out

    @property
    def text(self):
        return self.buf[:self.sent]


def _stops(stop, limits):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop or any(len(s) > 200 for s in stops):
        raise APIError(400, f"stop: at most {limits.max_stop} strings of at most 200 characters", param="stop")
    return stops


def _finish_reason(reason, text):
    if text.stopped:
        return "stop"
    return {"stop": "stop", "length": "length"}.get(reason, "stop")


class Service:
    """What the endpoints share: the engine, the scheduler, the limits and the metrics."""

    def __init__(self, engine, scheduler, limits, model_name, api_key):
        self.engine, self.scheduler, self.limits = engine, scheduler, limits
        self.tokenizer = engine.tokenizer
        self.model_name, self.api_key = model_name, api_key
        self.metrics = Metrics()
        self.created = int(time.time())

    def check_auth(self, request):
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", "invalid_api_key")

    def check_sampling(self, body, max_allowed):
        lim = self.limits
        if body.n > lim.max_n:
            raise APIError(400, f"n={body.n} is over this server's limit of {lim.max_n}", param="n")
        if body.top_k is not None and body.top_k > self.engine.vocab_size:
            raise APIError(400, f"top_k={body.top_k} is larger than the vocabulary ({self.engine.vocab_size})",
                           param="top_k")
        cap = min(lim.max_tokens or max_allowed, max_allowed)
        requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if requested is not None and requested > cap:
            raise APIError(400, f"max_tokens={requested} is over this server's limit of {cap}", param="max_tokens")
        return requested

    def conversation(self, messages):
        lim = self.limits
        if len(messages) > lim.max_messages:
            raise APIError(400, f"{len(messages)} messages: this server takes at most {lim.max_messages}",
                           param="messages")
        out, chars = [], 0
        for i, m in enumerate(messages):
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            chars += len(text)
            if m.role == "assistant":
                parts = [p for p in parse_reply(text) if p["text"] or p["type"] != "text"]
                if not parts:
                    raise APIError(400, f"messages[{i}]: empty assistant message", param=f"messages.{i}.content")
                out.append({"role": "assistant", "content": parts})
            else:
                out.append({"role": m.role, "content": text})
        if chars > lim.max_chars:
            raise APIError(400, f"messages hold {chars} characters: this server takes at most {lim.max_chars}",
                           param="messages")
        if out[-1]["role"] != "user":
            raise APIError(400, "the last message must be from the user", param="messages")
        return out

    def submit(self, prompt, body, max_tokens, n, logprobs, on_event):
        """Queue n generations of prompt; on_event(index, event) runs on the event loop."""
        loop = asyncio.get_running_loop()
        reqs = []

        def emitter(i):
            return lambda ev: loop.call_soon_threadsafe(on_event, i, ev)

        try:
            for i in range(n):
                seed = None if body.seed is None else (body.seed + i) % (1 << 63)
                temperature = 1.0 if body.temperature is None else body.temperature
                reqs.append(self.scheduler.submit(GenRequest(
                    prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_k=body.top_k or None,
                    top_p=body.top_p, seed=seed, logprobs=logprobs, emit=emitter(i))))
        except QueueFull as e:
            for r in reqs:
                self.scheduler.cancel(r)
            raise APIError(429, str(e), "rate_limit_error", "queue_full") from None
        except UserError as e:
            for r in reqs:
                self.scheduler.cancel(r)
            raise APIError(400, str(e), code="context_length_exceeded") from None
        return reqs

    def room(self, prompt):
        room = self.scheduler.max_len - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens and leaves no room in the model's context of "
                                f"{self.scheduler.max_len} tokens: shorten it", code="context_length_exceeded")
        return room

    def token_str(self, t):
        """A token as text (specials as their names; a partial UTF-8 character as U+FFFD)."""
        return self.tokenizer.enc.decode_single_token_bytes(t).decode("utf-8", "replace")


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


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
            yield ("sse", _sse(error_body(reason, "server_error")))
        yield ("done", i, tail, _finish_reason(reason, texts[i]))
        if remaining == 0:
            return


# ---- the app --------------------------------------------------------------------------------------------------
def create_app(model, tokenizer, *, model_name="picochat", api_key=None, limits=None, slots=8, max_queue=256,
               tool=True, compile=False, engine=None, threads=0, notes=None):
    """The FastAPI app (UI + API) around one Engine and one Scheduler. The scheduler thread starts now and stops
    at the app's shutdown (app.state.scheduler.stop() does it by hand). notes ({"trained_on", "examples"}, from
    checkpoint.training_notes) tell the web UI what to say about the model."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits, notes = limits or Limits(), notes or {}
    engine = engine or Engine(model, tokenizer, tool=tool, compile=compile)
    scheduler = Scheduler(engine, slots=slots, max_queue=max_queue, threads=threads).start()
    svc = Service(engine, scheduler, limits, model_name, api_key)

    async def lifespan(app):
        yield
        scheduler.stop()

    app = FastAPI(title="picochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.scheduler, app.state.engine = svc, scheduler, engine
    app.add_middleware(Guard, max_body=limits.max_body_bytes, metrics=svc.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.code, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return JSONResponse(error_body("the request body is not valid JSON", code="invalid_json"), 400)
        if errors and tuple(errors[0].get("loc", ())) == ("body",):
            return JSONResponse(error_body("the request body must be a JSON object (Content-Type: application/json)",
                                           code="invalid_json"), 400)
        msgs = []
        for err in errors[:3]:
            loc = ".".join(str(x) for x in err.get("loc", ())[1:]) or "body"
            msgs.append(f"{loc}: {err.get('msg', 'invalid')}")
        first = ".".join(str(x) for x in errors[0].get("loc", ())[1:]) if errors else None
        return JSONResponse(error_body("invalid request: " + "; ".join(msgs), param=first or None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = {401: "authentication_error", 404: "not_found_error"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(e.detail), kind), e.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {e.__class__.__name__}", "server_error"), 500)

    async def auth(request: Request):
        svc.check_auth(request)

    # ---- UI and probes ----------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "slots": scheduler.num_slots, "active": scheduler.active,
                "queued": scheduler.queued, "context": scheduler.max_len, "auth": bool(api_key)}

    @app.get("/info")
    async def info():
        """What the web UI adapts to: the context, the cap on max_tokens, whether the tool runs, what the
        model was trained on and prompts worth trying."""
        return {"model": model_name, "context": scheduler.max_len, "auth": bool(api_key),
                "max_tokens": min(limits.max_tokens or scheduler.max_len, scheduler.max_len), "tool": engine.tool,
                "trained_on": notes.get("trained_on", ""), "examples": list(notes.get("examples", ()))}

    @app.get("/metrics")
    async def metrics():
        s, m = scheduler.stats, svc.metrics
        lines = ["# HELP picochat_http_requests_total HTTP requests by path and status.",
                 "# TYPE picochat_http_requests_total counter"]
        with m.lock:
            for (path, status), count in sorted(m.requests.items()):
                lines.append(f'picochat_http_requests_total{{path="{path}",status="{status}"}} {count}')
            lines += ["# HELP picochat_http_response_seconds Time to the start of the response.",
                      "# TYPE picochat_http_response_seconds histogram"] + m.response_time.lines(
                "picochat_http_response_seconds")
        gauges = [("queue_depth", "Generations waiting for a slot.", scheduler.queued),
                  ("active_slots", "Slots generating now.", scheduler.active),
                  ("slots", "Slots in the decode batch.", scheduler.num_slots),
                  ("uptime_seconds", "Seconds since the server started.", round(time.time() - m.started, 3))]
        for name, help_, value in gauges:
            lines += [f"# HELP picochat_{name} {help_}", f"# TYPE picochat_{name} gauge", f"picochat_{name} {value}"]
        counters = [("generations_total", "Generations submitted.", s["requests"]),
                    ("prompt_tokens_total", "Prompt tokens prefilled.", s["prompt_tokens"]),
                    ("generated_tokens_total", "Tokens generated.", s["generated_tokens"]),
                    ("decode_steps_total", "Batched decode steps.", s["steps"]),
                    ("decode_step_seconds_total", "Time spent in decode steps.", round(s["step_seconds"], 6)),
                    ("scheduler_errors_total", "Decode steps that failed.", s["errors"])]
        for name, help_, value in counters:
            lines += [f"# HELP picochat_{name} {help_}", f"# TYPE picochat_{name} counter", f"picochat_{name} {value}"]
        lines += ["# HELP picochat_generations_finished_total Finished generations by reason.",
                  "# TYPE picochat_generations_finished_total counter"]
        for reason, count in sorted(dict(s["finished"]).items()):
            lines.append(f'picochat_generations_finished_total{{reason="{reason}"}} {count}')
        lines += ["# HELP picochat_generation_seconds Submit to last token.",
                  "# TYPE picochat_generation_seconds histogram"] + scheduler.latency.lines("picochat_generation_seconds")
        lines += ["# HELP picochat_time_to_first_token_seconds Submit to first token.",
                  "# TYPE picochat_time_to_first_token_seconds histogram"] + scheduler.ttft.lines(
            "picochat_time_to_first_token_seconds")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def model_card():
        return {"id": model_name, "object": "model", "created": svc.created, "owned_by": "picochat",
                "context_length": scheduler.max_len}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}", dependencies=[Depends(auth)])
    async def one_model(name: str):
        if name != model_name:
            raise APIError(404, f"model {name!r} not found (this server has {model_name!r})", "not_found_error",
                           "model_not_found")
        return model_card()

    # ---- chat completions -------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: ChatRequest, request: Request):
        conv = svc.conversation(body.messages)
        try:
            prompt = tokenizer.render_for_completion(conv)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        room = svc.room(prompt)
        requested = svc.check_sampling(body, scheduler.max_len)
        stops = _stops(body.stop, limits)
        max_tokens = min(requested or room, room)
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        queue = asyncio.Queue()
        reqs = svc.submit(prompt, body, max_tokens, body.n, top_n, lambda i, ev: queue.put_nowait((i, ev)))
        texts = [ChoiceText(tokenizer, stops) for _ in reqs]
        cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())

        def lp_entry(tok, lp):
            s = svc.token_str(tok)
            return {"token": s, "logprob": lp[0], "bytes": list(s.encode()),
                    "top_logprobs": [{"token": svc.token_str(t), "logprob": v, "bytes": list(svc.token_str(t).encode())}
                                     for t, v in lp[1]]}

        def chunk(i, delta, finish=None, logprobs=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        def usage():
            done = sum(r.generated for r in reqs)
            return {"prompt_tokens": len(prompt), "completion_tokens": done, "total_tokens": len(prompt) + done}

        async def run(stream):
            """Yields SSE strings (stream) or collects into results (returned at the end)."""
            finish, lps = [None] * len(reqs), [[] for _ in reqs]
            if stream:
                for i in range(len(reqs)):
                    yield _sse(chunk(i, {"role": "assistant", "content": ""}))
            async for ev in _choices(queue, request, stream, reqs, texts, scheduler):
                if ev[0] == "sse":
                    yield ev[1]
                elif ev[0] == "token":
                    _, i, piece, tok, lp = ev
                    entry = lp_entry(tok, lp) if lp is not None else None
                    if entry is not None:
                        lps[i].append(entry)
                    if stream and (piece or entry):
                        yield _sse(chunk(i, {"content": piece}, logprobs={"content": [entry]} if entry else None))
                else:
                    _, i, tail, finish[i] = ev
                    if stream:
                        if tail:
                            yield _sse(chunk(i, {"content": tail}))
                        yield _sse(chunk(i, {}, finish[i]))
            if stream:
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                                "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            else:
                yield {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                       "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i].text},
                                    "logprobs": {"content": lps[i]} if top_n is not None else None,
                                    "finish_reason": finish[i]} for i in range(len(reqs))],
                       "usage": usage()}

        return await _respond(run, reqs, body.stream, scheduler, StreamingResponse)

    # ---- completions ------------------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request):
        prompts = _prompts(body.prompt, tokenizer, limits, engine.vocab_size)
        svc.check_sampling(body, scheduler.max_len)
        stops = _stops(body.stop, limits)
        bos = tokenizer.bos_id
        model_prompts = [ids if ids and ids[0] == bos else [bos] + ids for ids, _ in prompts]
        rooms = [svc.room(p) for p in model_prompts]
        want = body.max_tokens if body.max_tokens is not None else 16
        top_n = body.logprobs
        if body.echo and body.stream and top_n is not None:
            raise APIError(400, "echo with logprobs is only supported without stream", param="stream")
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
        cid, created = "cmpl-" + secrets.token_hex(12), int(time.time())

        def echo_part(k):
            ids, text = prompts[k]
            if not body.echo:
                return "", None
            if top_n is None:
                return text, None
            dec, offsets, pos, toks, tops = StreamDecoder(tokenizer, keep=()), [], 0, [], []
            for t, sc in zip(ids, scored[k]):
                offsets.append(pos)
                pos += len(dec.feed(t))
                toks.append(svc.token_str(t))
                tops.append(None if sc is None else {svc.token_str(a): b for a, b in sc[1]})
            lps = [None if sc is None else sc[0] for sc in scored[k]]
            return text, {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

        def choice_logprobs(c, base_lp):
            if top_n is None:
                return None
            out = base_lp or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            out = {key: list(v) for key, v in out.items()}
            # offsets count from the start of the prompt, echoed or not (as OpenAI's do)
            dec, pos = StreamDecoder(tokenizer, keep=TOOL_TAGS), len(prompts[c // body.n][1])
            for tok, lp in tokens[c]:
                out["text_offset"].append(pos)
                pos += len(dec.feed(tok))
                out["tokens"].append(svc.token_str(tok))
                out["token_logprobs"].append(lp[0])
                out["top_logprobs"].append({svc.token_str(a): b for a, b in lp[1]})
            return out

        def usage():
            p = sum(len(ids) for ids, _ in prompts)
            done = sum(r.generated for r in reqs)
            return {"prompt_tokens": p, "completion_tokens": done, "total_tokens": p + done}

        def text_chunk(c, text, finish=None):
            return _sse({"id": cid, "object": "text_completion", "created": created, "model": model_name,
                         "choices": [{"index": c, "text": text, "logprobs": None, "finish_reason": finish}]})

        async def run(stream):
            finish = ["length"] * n_choices
            if stream and body.echo:
                for c in range(n_choices):
                    yield text_chunk(c, prompts[c // body.n][1])
            async for ev in _choices(queue, request, stream, reqs, texts, scheduler):
                if ev[0] == "sse":
                    yield ev[1]
                elif ev[0] == "token":
                    _, c, piece, tok, lp = ev
                    if lp is not None:
                        tokens[c].append((tok, lp))
                    if stream and piece:
                        yield text_chunk(c, piece)
                else:
                    _, c, tail, finish[c] = ev
                    if stream:
                        yield text_chunk(c, tail, finish[c])
            if stream:
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({"id": cid, "object": "text_completion", "created": created, "model": model_name,
                                "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
                return
            choices = []
            for c in range(n_choices):
                base_text, base_lp = echo_part(c // body.n)
                choices.append({"index": c, "text": base_text + texts[c].text,
                                "logprobs": choice_logprobs(c, base_lp), "finish_reason": finish[c]})
            yield {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                   "choices": choices, "usage": usage()}

        return await _respond(run, reqs, body.stream, scheduler, StreamingResponse)

    return app


async def _respond(run, reqs, stream, scheduler, StreamingResponse):
    """Streams run(True) as SSE, or returns run(False)'s one result; either way a request that ends early
    (disconnect, error) cancels its generations so their slots free up at once."""
    from fastapi.responses import JSONResponse

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
        from fastapi.responses import Response
        return Response(status_code=499)
    finally:
        for r in reqs:
            if not r.finished:
                scheduler.cancel(r)


def _prompts(prompt, tokenizer, limits, vocab):
    """The completions prompt -> [(token ids, text)]."""
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt is empty", param="prompt")
    if len(items) > limits.max_prompts:
        raise APIError(400, f"{len(items)} prompts: this server takes at most {limits.max_prompts} per request",
                       param="prompt")
    chars = sum(len(x) for x in items if isinstance(x, str))
    if chars > limits.max_chars:
        raise APIError(400, f"the prompts hold {chars} characters: this server takes at most {limits.max_chars}",
                       param="prompt")
    out = []
    for x in items:
        if isinstance(x, str):
            out.append((tokenizer.encode(x), x))
        else:
            if any(t < 0 or t >= vocab for t in x):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            out.append((list(x), tokenizer.decode(list(x))))
    return out


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
    from picochat.chat import add_model_args
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
    from picochat.chat import load_chat_model
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
