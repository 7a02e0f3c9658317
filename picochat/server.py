"""`picochat serve`: one process serving a ChatGPT-like web UI and an OpenAI-compatible API.

    picochat serve                                  # http://127.0.0.1:8000 : the UI; /v1 : the API
    picochat serve --host 0.0.0.0 --api-key-file key.txt  # clients then send "Authorization: Bearer <the key>"

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

Concurrency: every generation goes through one batching.Scheduler (continuous batching over --slots cache rows):
concurrent requests share decode steps, and a client that disconnects, streaming or not, frees its slots at the
next step. The server admits at most --max-queue + --slots generations (each choice and each prompt scored for
echo counts one) and at most --client-limit of them from one client address; past either, 429.

Security: with a key (--api-key-file, $PICOCHAT_API_KEY or --api-key) /v1 and /metrics need it; /, /info and
/health stay open. Only the Host names localhost, 127.0.0.1, [::1], --host and --allowed-host are answered (421
otherwise): a web page cannot reach a local server through its visitors' browsers by rebinding its name. With a
key on every interface (0.0.0.0, ::) any Host is answered, since the key protects; keyless there, only those.

Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with a 4xx status for anything wrong
with the request (400 validation and limits, 401 key, 404, 413 body too large, 421 host, 429 queue full or client
limit); a bad request never takes the server down, and a failed generation tells the client only that it failed
(the detail goes to the log). Limits (flags): messages per request, characters per request, max_tokens, n, stop
strings, prompts per completions request, generations per request (prompts x n), logprob values per answer, body
size; temperature in [0, 2], top_p in (0, 1], top_k in [0, vocab]; text must be valid Unicode (no lone
surrogates). A prompt that leaves no room in the context gets 400 context_length_exceeded; max_tokens beyond the
room that is left is clipped (finish_reason "length").
"""
import argparse
import asyncio
import functools
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from pathlib import Path

from picochat.common import UserError
from picochat.batching import QueueFull, Request as GenRequest, Scheduler
from picochat.engine import Engine
from picochat.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from picochat.openai_api import (APIError, ChatRequest, ChoiceText, CompletionRequest, Limits, chat_chunk,
                                 chat_completion, chat_logprob_entry, chat_logprobs_count, chat_usage_chunk,
                                 check_echo, check_sampling, check_stops, check_work, completion_logprobs,
                                 conversation, echo_logprobs, error_body, finish_reason, parse_prompts, room,
                                 sampling_params, sse, text_chunk, text_usage_chunk, usage)
from picochat.openai_api import completion as completion_body
from picochat.sandbox import describe_sandbox, sandbox_info

STATIC_DIR = Path(__file__).with_name("static")
log = logging.getLogger("picochat.server")


# ---- the request guard ----------------------------------------------------------------------------------------
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
EVERY_INTERFACE = ("0.0.0.0", "::")
_HOST = re.compile(r"\[([0-9a-f:.]*)\](?::[0-9]*)?|([^:\[\]]*)(?::[0-9]*)?")


def host_name(header):
    """The name in a Host header (or a --host value), lowercase, without its port: "[::1]:8000" -> "::1"; a value
    that is no name with an optional port comes back whole ("a:1@b", "::1"), which no check allows by mistake."""
    h = header.strip().lower()
    m = _HOST.fullmatch(h)
    return (m.group(1) if m.group(1) is not None else m.group(2)) if m else h


def allowed_hosts(host, extra=(), *, api_key=None):
    """The Host names a server listening on host answers (the DNS-rebinding guard), or None for every name: the
    loopback names, host itself unless it is every interface, and extra (--allowed-host). On every interface
    with an API key there is no check: the key is the protection and clients may call the machine any name."""
    if host in EVERY_INTERFACE and api_key:
        return None
    names = LOOPBACK_HOSTS | {host_name(h) for h in extra}
    return names if host in EVERY_INTERFACE else names | {host_name(host)}


class Guard:
    """Pure ASGI middleware in front of every request: a Host outside allowed_hosts gets 421 (a web page whose
    name was rebound to this address cannot use the server through its visitors' browsers; None: no check), a
    body over max_body bytes gets 413 (the body is read here, whole, before the app sees it: chunked or not), and
    every request is counted for /metrics."""

    def __init__(self, app, *, max_body, metrics, allowed_hosts=LOOPBACK_HOSTS):
        self.app, self.max_body, self.metrics, self.allowed = app, max_body, metrics, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, state = time.perf_counter(), {"status": 500}

        async def send_wrapper(msg):
            if msg["type"] == "http.response.start":
                state["status"] = msg["status"]
            await send(msg)

        try:
            refusal = self.refusal(dict(scope.get("headers", [])))
            if refusal is None:
                body = await _read_body(receive, self.max_body)
                refusal = self.too_large() if body is None else None
            if refusal is None:
                await self.app(scope, _Replay(body, receive), send_wrapper)
            else:
                await _send_json(send_wrapper, *refusal)
        except ConnectionError:  # the client left while sending its body
            state["status"] = 499
        finally:
            self.metrics.record(scope.get("path", ""), state["status"], time.perf_counter() - t0)

    def refusal(self, headers):
        """(status, error body) for a request its headers rule out, or None."""
        host = headers.get(b"host")
        # a request without Host comes from no browser, so it is no rebinding
        if self.allowed is not None and host is not None:
            name = host_name(host.decode("latin-1"))
            if name not in self.allowed:
                return 421, error_body(
                    f"this server does not answer to the host name {name[:100]!r}, only to "
                    f"{', '.join(sorted(self.allowed))} (a guard against DNS rebinding); to serve that name, "
                    "start it with --allowed-host NAME", code="host_not_allowed")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return self.too_large()
        return None

    def too_large(self):
        return 413, error_body(f"request body is larger than the server's limit of {self.max_body} bytes",
                               code="request_too_large")


async def _read_body(receive, limit):
    """The request's whole body, or None once it passes limit bytes; ConnectionError if the client leaves."""
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ConnectionError("client disconnected")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)


class _Replay:
    """An ASGI receive that gives the app the body read ahead of it, then the server's own messages (a
    disconnect)."""

    def __init__(self, body, receive):
        self.body, self.receive = body, receive

    async def __call__(self):
        if self.body is None:
            return await self.receive()
        body, self.body = self.body, None
        return {"type": "http.request", "body": body, "more_body": False}


async def _send_json(send, status, obj):
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---- what the endpoints share ---------------------------------------------------------------------------------
class Service:
    """What the endpoints share: the engine, the scheduler, the limits, the metrics, what /info tells, and the
    generations each client has in flight (client_limit per client, at most the scheduler's queue and slots in
    all; a client is its address, keyed or not: the key is one secret that all clients share)."""

    def __init__(self, engine, scheduler, limits, model_name, api_key, notes, client_limit=0):
        self.engine, self.scheduler, self.limits = engine, scheduler, limits
        self.tokenizer = engine.tokenizer
        self.model_name, self.api_key, self.notes = model_name, api_key, notes
        self.metrics = Metrics(scheduler)
        self.created = int(time.time())
        self.client_limit, self.capacity = client_limit, scheduler.max_queue + scheduler.num_slots
        self.in_flight, self.total = {}, 0  # generations and scoring jobs: by client, all (event loop only)

    def check_auth(self, request):
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", "invalid_api_key")

    def admit(self, request, cost, *, stream):
        """A Work of cost generations and scoring jobs for request's client, or APIError 429 when the client's
        share or the server's queue has no room for them."""
        client = request.client.host if request.client else "unknown"
        mine = self.in_flight.get(client, 0)
        if self.client_limit and mine + cost > self.client_limit:
            raise APIError(429, f"too many requests from {client}: it has {mine} generations queued or running and "
                                f"this request adds {cost}, over this server's limit of {self.client_limit} per "
                                "client; retry when they finish", "rate_limit_error", "client_limit")
        if self.total + cost > self.capacity:
            raise APIError(429, f"the server is full ({self.total} generations queued or running, this request "
                                f"adds {cost}, at most {self.capacity}): try again shortly",
                           "rate_limit_error", "queue_full")
        if cost:  # (a client with nothing in flight has no entry)
            self.in_flight[client], self.total = mine + cost, self.total + cost
        work = Work(self, client, cost)
        if not stream:
            work.watch(request)
        return work

    def release(self, client, cost):
        self.total -= cost
        self.in_flight[client] -= cost
        if not self.in_flight[client]:
            del self.in_flight[client]

    def submit(self, work, prompt, body, max_tokens, logprobs, on_event):
        """Queue body.n generations of prompt as part of work; on_event(index, event) runs on the event loop.
        A generation the scheduler refuses closes work (cancelling what it had queued) and raises APIError."""
        loop = asyncio.get_running_loop()
        for i in range(body.n):
            emit = functools.partial(loop.call_soon_threadsafe, on_event, i)
            req = GenRequest(prompt=prompt, max_tokens=max_tokens, logprobs=logprobs, emit=emit,
                             **sampling_params(body, i))
            try:
                work.reqs.append(self.scheduler.submit(req))
            except QueueFull as e:
                work.close()
                raise APIError(429, str(e), "rate_limit_error", "queue_full") from None
            except UserError as e:
                work.close()
                raise APIError(400, str(e), code="context_length_exceeded") from None


class Work:
    """One API request's generations and scoring jobs, counted against its client's share and the server's queue
    from Service.admit() until close(). watch() (requests that do not stream) follows the connection: the moment
    the client leaves, the generations are cancelled (their slots free at the next decode step) and gone is set."""

    def __init__(self, svc, client, cost):
        self.svc, self.client, self.cost = svc, client, cost
        self.reqs, self.gone, self.watcher = [], False, None

    def watch(self, request):
        self.watcher = asyncio.create_task(self._watch(request.receive))

    async def _watch(self, receive):
        # the body was read: what the server sends next is the disconnect (or nothing, if the client waits)
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self.cancel()

    def cancel(self):
        for r in self.reqs:
            if not r.finished:
                self.svc.scheduler.cancel(r)

    def close(self):
        """Cancel what is left and give the client's share back (once)."""
        self.cancel()
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None
        if self.cost:
            self.svc.release(self.client, self.cost)
            self.cost = 0


async def _events(queue, stream):
    """(index, event) from the scheduler; for a stream, None after each second of silence (a keep-alive)."""
    while True:
        if not stream:
            yield await queue.get()
            continue
        try:
            yield await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
            yield None


async def _choices(queue, work, stream, texts):
    """The scheduler's events as the endpoints answer them, choice by choice: ("token", i, piece, token, lp)
    with the text the token added to choice i ("" while a stop string may be starting) and its logprobs (None
    once the choice stopped); ("done", i, tail, finish_reason); ("sse", text) to pass to a stream as it is (a
    keep-alive, an error). A choice that reaches a stop string is cancelled at once; a failed generation raises
    a 500 when not streaming (the detail goes to the log, not to the client); ConnectionError once the client
    has left (see Work.watch). Ends once every choice is done."""
    reqs, remaining = work.reqs, len(work.reqs)
    if not remaining:
        return
    async for item in _events(queue, stream):
        if work.gone:
            raise ConnectionError("client disconnected")
        if item is None:
            yield ("sse", ": keep-alive\n\n")
            continue
        i, ev = item
        if ev[0] == "token":
            _, tok, _forced, lp = ev
            piece = texts[i].feed(tok)
            if texts[i].stopped:
                work.svc.scheduler.cancel(reqs[i])
            yield ("token", i, piece, tok, None if texts[i].stopped else lp)
            continue
        reason = ev[1]
        remaining -= 1
        tail = texts[i].finish()
        if reason.startswith("error"):
            log.error("a generation failed: %s", reason)
            message = "the model failed while generating (the server's log has the details)"
            if not stream:
                raise APIError(500, message, "server_error")
            yield ("sse", sse(error_body(message, "server_error")))
        yield ("done", i, tail, finish_reason(reason, texts[i]))
        if remaining == 0:
            return


def _sse_response(body, work):
    """body (an async generator of SSE text) as a streaming response that closes work however it ends: finished,
    client gone, error, or never started (then body's own cleanup never runs)."""
    from fastapi.responses import StreamingResponse

    class SSE(StreamingResponse):
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self.body_iterator.aclose()
                work.close()

    return SSE(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _respond(run, work, stream):
    """Streams run(True) as SSE, or returns run(False)'s one result; either way the request's Work is closed when
    it ends, so generations cut short (disconnect, error) free their slots at once."""
    from fastapi.responses import JSONResponse, Response

    if stream:
        return _sse_response(run(True), work)
    try:
        result = None
        async for result in run(False):
            pass
        return JSONResponse(result)
    except ConnectionError:  # the client went away: nobody to answer (499, as nginx logs it)
        return Response(status_code=499)
    finally:
        work.close()


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
    check_work(limits, choices=body.n, tokens=body.n * max_tokens, top_n=top_n)
    queue = asyncio.Queue()
    work = svc.admit(request, body.n, stream=body.stream)
    svc.submit(work, prompt, body, max_tokens, top_n, lambda i, ev: queue.put_nowait((i, ev)))
    reqs = work.reqs
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
        async for ev in _choices(queue, work, stream, texts):
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

    return await _respond(run, work, body.stream)


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
    scoring = body.echo and top_n is not None  # the prompts' logprobs too (only without stream)
    n_choices = len(prompts) * body.n
    lp_tokens = body.n * sum(min(want, r) for r in rooms) + (sum(map(len, model_prompts)) if scoring else 0)
    check_work(limits, choices=n_choices, tokens=lp_tokens, top_n=top_n)
    queue = asyncio.Queue()
    work = svc.admit(request, (n_choices if want else 0) + (len(prompts) if scoring else 0), stream=body.stream)
    for k, mp in enumerate(model_prompts):  # choice c = k * n + i: choice i of prompt k
        if want:
            svc.submit(work, mp, body, min(want, rooms[k]), top_n,
                       lambda i, ev, k=k: queue.put_nowait((k * body.n + i, ev)))
    reqs, scored = work.reqs, [None] * len(prompts)
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
        if scoring:
            scored[:] = await _score_prompts(svc, work, prompts, model_prompts, top_n)
        async for ev in _choices(queue, work, stream, texts):
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

    return await _respond(run, work, body.stream)


async def _score_prompts(svc, work, prompts, model_prompts, top_n):
    """The logprobs of each prompt's tokens for echo, as OpenAI has them: [None, (logprob, [(top token, logprob)]),
    ...]. One scoring job (a forward) at a time on the scheduler thread, so decode steps go on in between;
    ConnectionError once the client has left."""
    out = []
    for (ids, _), mp in zip(prompts, model_prompts):
        if work.gone:
            raise ConnectionError("client disconnected")
        res = await asyncio.wrap_future(svc.scheduler.run_job(functools.partial(svc.engine.score, mp, top_n)))
        res = res if len(mp) > len(ids) else [None] + res  # res[j]: the logprob of mp[j + 1]
        res[0] = None  # as OpenAI: the first token has no logprob (nothing precedes it)
        out.append(res)
    return out


# ---- errors: OpenAI-shaped, whatever raised them --------------------------------------------------------------
def _json(body, status):
    from fastapi.responses import JSONResponse
    return JSONResponse(body, status_code=status)


async def api_error(request, e):
    return _json(error_body(e.message, e.type, e.code, e.param), e.status)


async def validation_error(request, e):
    """pydantic's complaints about the body (FastAPI's RequestValidationError) as one 400 message: the first
    three problems, param the first one's field. A value refused by a check (such as a lone surrogate) says more
    than the other members of its union refusing its type, so then only those are told."""
    errors = e.errors()
    errors = [err for err in errors if err.get("type") == "value_error"] or errors
    if any(err.get("type") == "json_invalid" for err in errors):
        return _json(error_body("the request body is not valid JSON", code="invalid_json"), 400)
    if errors and tuple(errors[0].get("loc", ())) == ("body",):
        return _json(error_body("the request body must be a JSON object (Content-Type: application/json)",
                                code="invalid_json"), 400)
    msgs = [f"{_field(err) or 'body'}: {err.get('msg', 'invalid')}" for err in errors[:3]]
    return _json(error_body("invalid request: " + "; ".join(msgs), param=_field(errors[0]) or None), 400)


def _field(err):
    """The field a pydantic error is about, as "messages.0.content" (without "body" and the union members' type
    tags such as "list[int]")."""
    return ".".join(str(x) for x in err.get("loc", ())[1:] if not (isinstance(x, str) and "[" in x))


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
               client_limit=64, allowed_hosts=LOOPBACK_HOSTS, tool=True, compile=False, engine=None, threads=0,
               notes=None, dtype=None):
    """The FastAPI app (UI + API) around one Engine and one Scheduler. The scheduler thread starts now and stops
    at the app's shutdown (app.state.scheduler.stop() does it by hand). notes ({"trained_on", "examples"}, from
    checkpoint.training_notes) tell the web UI what to say about the model. client_limit: generations one client
    may have queued or running (0: no limit); allowed_hosts: the Host names answered (see allowed_hosts(); None:
    any); api_key also guards /metrics. dtype: the engine's (Engine(dtype=...); None: the device's choice)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or Limits()
    engine = engine or Engine(model, tokenizer, tool=tool, compile=compile, dtype=dtype)
    scheduler = Scheduler(engine, slots=slots, max_queue=max_queue, threads=threads).start()
    svc = Service(engine, scheduler, limits, model_name, api_key, notes or {}, client_limit=client_limit)

    async def lifespan(app):
        yield
        scheduler.stop()

    app = FastAPI(title="picochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.scheduler, app.state.engine = svc, scheduler, engine
    app.add_middleware(Guard, max_body=limits.max_body_bytes, metrics=svc.metrics, allowed_hosts=allowed_hosts)
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

    async def auth(request: Request):
        svc.check_auth(request)

    api = [Depends(auth)]

    @app.get("/metrics", dependencies=api)
    async def _metrics():
        return metrics_response(svc)

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


def tool_policy(*, no_tool: bool, allow_weak: bool) -> tuple[bool, str]:
    """Whether `serve` runs the model's tool calls, and the lines that say so. Any client can steer the model
    into writing code (raw token ids through /v1/completions make it easy), so the code runs only in a strong
    sandbox, or in a weak one when the operator accepted it with --allow-weak-sandbox."""
    if no_tool:
        return False, "tool: off (--no-tool)"
    line = describe_sandbox()
    if sandbox_info()["mode"] == "strong" or allow_weak:
        return True, line + ("\ntool: on, in the weak sandbox (--allow-weak-sandbox)" if allow_weak and
                             sandbox_info()["mode"] != "strong" else "")
    return False, (line + "\ntool: OFF: in this sandbox a client could make the model read this machine's files; "
                   "run where namespaces work (root, or user namespaces enabled), or pass --allow-weak-sandbox")


def add_parser(sub):
    from picochat.checkpoint import add_model_args
    p = sub.add_parser("serve", help="serve the web UI and an OpenAI-compatible API",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; set a key)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name to answer besides localhost, 127.0.0.1, [::1] and --host (repeatable): the name "
                        "a reverse proxy or the LAN uses. Other names get 421, so that no web page can reach the "
                        "server through a visitor's browser by rebinding its DNS name to this address. With a key on "
                        "0.0.0.0 or :: every name is answered (the key is the protection); keyless there, only these")
    g.add_argument("--api-key-file", default="", metavar="PATH",
                   help="require 'Authorization: Bearer KEY' on /v1 and /metrics, KEY read from PATH "
                        "(default: $PICOCHAT_API_KEY; neither: open)")
    g.add_argument("--api-key", default="", help="the key itself (shown to every user of the machine by ps: a warning)")
    g.add_argument("--model-name", default="", help="the model id clients see (default: picochat-<run>-<stage>)")
    g.add_argument("--slots", type=int, default=8, help="requests decoded together (cache rows)")
    g.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429s")
    g.add_argument("--allow-weak-sandbox", action="store_true",
                   help="run the model's tool calls even where the sandbox is weak (no namespaces or seccomp: code "
                        "a client steers the model into writing could read this machine's world-readable files)")
    g.add_argument("--client-limit", type=int, default=64,
                   help="generations (choices, prompt scorings) one client address may have queued or running; more "
                        "get 429 (0 = no limit; behind a proxy on this machine the address is X-Forwarded-For's)")
    g = p.add_argument_group("limits per request")
    d = Limits()
    g.add_argument("--max-messages", type=int, default=d.max_messages)
    g.add_argument("--max-chars", type=int, default=d.max_chars, help="characters of all messages or prompts")
    g.add_argument("--max-tokens-limit", type=int, default=d.max_tokens, help="generated tokens (0 = the context)")
    g.add_argument("--max-n", type=int, default=d.max_n, help="choices per request")
    g.add_argument("--max-prompts", type=int, default=d.max_prompts, help="prompts per /v1/completions request")
    g.add_argument("--max-choices", type=int, default=d.max_choices, help="generations per request: prompts x n")
    g.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                   help="logprob values per answer: tokens with logprobs x (1 + top logprobs)")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / (1 << 20), help="request body size")
    p.set_defaults(func=serve_cli)


def read_api_key(args, environ=os.environ):
    """The API key from --api-key-file, --api-key or $PICOCHAT_API_KEY (the first given), or None: no key. A key
    in argv is visible to every user of the machine (ps, /proc), so it earns a warning on stderr."""
    if args.api_key and args.api_key_file:
        raise UserError("give --api-key or --api-key-file, not both")
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--api-key-file {args.api_key_file}: cannot read it ({e})") from None
        if not key:
            raise UserError(f"--api-key-file {args.api_key_file} is empty")
        return key
    if args.api_key:
        print("warning: --api-key on the command line is visible to every user of this machine (ps); "
              "use --api-key-file PATH or $PICOCHAT_API_KEY", file=sys.stderr)
        return args.api_key
    return environ.get("PICOCHAT_API_KEY", "").strip() or None


def serve_cli(args):
    import torch
    import uvicorn
    from picochat.checkpoint import load_chat_model
    if args.port < 0 or args.port > 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.slots < 1 or args.max_queue < 0 or args.client_limit < 0:
        raise UserError("--slots must be at least 1, --max-queue and --client-limit at least 0")
    if args.client_limit and args.max_choices > args.client_limit:
        raise UserError(f"--max-choices {args.max_choices} is over --client-limit {args.client_limit}: a request that "
                        "large could never run")
    api_key = read_api_key(args)
    hosts = allowed_hosts(args.host, args.allowed_host, api_key=api_key)
    # the model runs in the scheduler's thread only, with all the threads; this one loads it with one thread
    # so that it never starts an OpenMP team of its own (see Scheduler)
    threads, args.threads = args.threads or torch.get_num_threads(), 1
    model, tokenizer, info = load_chat_model(args)
    limits = Limits(max_messages=args.max_messages, max_chars=args.max_chars, max_tokens=args.max_tokens_limit,
                    max_n=args.max_n, max_prompts=args.max_prompts, max_choices=args.max_choices,
                    max_logprobs=args.max_logprobs, max_body_bytes=int(args.max_body_mb * (1 << 20)))
    name = args.model_name or f"picochat-{info['run']}-{info['stage']}"
    tool, tool_lines = tool_policy(no_tool=args.no_tool, allow_weak=args.allow_weak_sandbox)
    print(tool_lines)
    app = create_app(model, tokenizer, model_name=name, api_key=api_key, limits=limits, slots=args.slots,
                     max_queue=args.max_queue, client_limit=args.client_limit, allowed_hosts=hosts,
                     tool=tool, compile=args.compile, threads=threads, notes=info, dtype=info.get("dtype"))
    if host_name(args.host) not in LOOPBACK_HOSTS and not api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach it can use it"
              + (" (by the names localhost, 127.0.0.1, [::1] and --allowed-host)" if hosts is not None else ""))
    shown = "localhost" if args.host in ("127.0.0.1", "0.0.0.0", "::") else args.host
    print(f"picochat: {info['description']}")
    print(f"  trained on  {info['trained_on']}")
    print(f"  web UI      http://{shown}:{args.port}/")
    print(f"  OpenAI API  http://{shown}:{args.port}/v1   (model \"{name}\")")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
    return 0
