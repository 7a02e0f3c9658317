"""What the endpoints of `picochat serve` share: the Service (engine, scheduler, limits, metrics, the API key, what
/info tells) with each client's share of the queue, the Work of one API request, and the scheduler's events turned
into the per-choice events the endpoints answer with.

    svc = Service(engine, scheduler, limits, model_name=..., api_key=..., notes=..., client_limit=64)
    work = svc.admit(request, cost, stream=False)        # APIError 429 when the client or the server is full
    svc.submit(work, prompt, body, max_tokens=..., logprobs=top_n, on_event=...)
    async for ev in choice_events(queue, work, stream, texts): ...
    return await respond(run, work, stream)             # closes work however the request ends

What holds true: a request's generations count against its client's share and the server's capacity from admit()
until work.close(), which respond() calls once, whether the answer finished, the client left or an error cut it
short; generations cut short are cancelled, so their slots free at the next decode step.
"""
import asyncio
import functools
import hmac
import logging
import time

from picochat.batching import QueueFull, Request as GenRequest
from picochat.common import UserError
from picochat.metrics import Metrics
from picochat.openai_api import APIError, error_body, finish_reason, sampling_params, sse

log = logging.getLogger("picochat.server")  # the server's one log, whichever module of it writes


class Service:
    """What the endpoints share: the engine, the scheduler, the limits, the metrics, what /info tells, and the
    generations each client has in flight (client_limit per client, at most the scheduler's queue and slots in
    all; a client is its address, keyed or not: the key is one secret that all clients share)."""

    def __init__(self, engine, scheduler, limits, *, model_name, api_key, notes, client_limit=0):
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

    def submit(self, work, prompt, body, *, max_tokens, logprobs, on_event):
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


async def choice_events(queue, work, stream, texts):
    """The scheduler's events as the endpoints answer them, choice by choice: ("token", i, piece, token, lp)
    with the text the token added to choice i ("" while a stop string may be starting) and its logprobs (None
    once the choice stopped); ("done", i, tail, finish_reason); ("sse", text) to pass to a stream as it is (a
    keep-alive, an error). A choice that reaches a stop string is cancelled at once; a failed generation raises
    a 500 when not streaming, and when streaming sends the error event right before its ("done", i, "", reason)
    (the detail goes to the log, not to the client); ConnectionError once the client has left (see Work.watch).
    Ends once every choice is done."""
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
            # the held tail (half a character, or the start of a stop string) is dropped, so that the error event
            # comes right before the choice's finish
            tail = ""
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


async def respond(run, work, stream):
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
