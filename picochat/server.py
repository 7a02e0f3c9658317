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
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from picochat.common import UserError
from picochat.batching import Scheduler
from picochat.engine import Engine
from picochat.guard import LOOPBACK_HOSTS, Guard, allowed_hosts, host_name
from picochat.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from picochat.openai_api import (APIError, ChatRequest, ChoiceText, CompletionRequest, Limits, chat_chunk,
                                 chat_completion, chat_logprob_entry, chat_logprobs_count, chat_usage_chunk,
                                 check_echo, check_sampling, check_stops, check_work, completion_logprobs,
                                 conversation, echo_logprobs, error_body, parse_prompts, room, sse, text_chunk,
                                 text_usage_chunk, usage)
from picochat.openai_api import completion as completion_body
from picochat.sandbox import describe_sandbox, sandbox_info
from picochat.service import Service, choice_events, respond

STATIC_DIR = Path(__file__).with_name("static")
log = logging.getLogger("picochat.server")


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
    svc.submit(work, prompt, body, max_tokens=max_tokens, logprobs=top_n,
               on_event=lambda i, ev: queue.put_nowait((i, ev)))
    reqs = work.reqs
    texts = [ChoiceText(tokenizer, stops) for _ in reqs]
    cid, created, model = "chatcmpl-" + secrets.token_hex(12), int(time.time()), svc.model_name

    def chunk(i, delta, finish=None, logprobs=None):
        return sse(chat_chunk(cid, created, model, i, delta, finish=finish, logprobs=logprobs))

    def used():
        return usage(len(prompt), sum(r.generated for r in reqs))

    async def run(stream):
        """Yields SSE strings (stream) or, at the end, the one response body."""
        finish, lps = [None] * len(reqs), [[] for _ in reqs]
        if stream:
            for i in range(len(reqs)):
                yield chunk(i, {"role": "assistant", "content": ""})
        async for ev in choice_events(queue, work, stream, texts):
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

    return await respond(run, work, body.stream)


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
            svc.submit(work, mp, body, max_tokens=min(want, rooms[k]), logprobs=top_n,
                       on_event=lambda i, ev, k=k: queue.put_nowait((k * body.n + i, ev)))
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
        async for ev in choice_events(queue, work, stream, texts):
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
                    yield sse(text_chunk(cid, created, model, c, tail, finish=finish[c]))
        if stream:
            if body.stream_options and body.stream_options.include_usage:
                yield sse(text_usage_chunk(cid, created, model, used()))
            yield "data: [DONE]\n\n"
            return
        yield completion_body(cid, created, model, choices=[choice(c, finish[c]) for c in range(n_choices)],
                              usage=used())

    return await respond(run, work, body.stream)


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
    svc = Service(engine, scheduler, limits, model_name=model_name, api_key=api_key, notes=notes or {},
                  client_limit=client_limit)

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
