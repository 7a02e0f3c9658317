"""The request guard: pure ASGI middleware in front of every request of `picochat serve`.

    app.add_middleware(Guard, max_body=limits.max_body_bytes, metrics=metrics,
                       allowed_hosts=allowed_hosts(host, extra_names, api_key=key))

What holds true: a request whose Host header names none of allowed_hosts gets 421 before anything else reads it
(None: every name is answered; a request without Host is no browser's, so it passes), and so a web page whose DNS
name was rebound to this address cannot use the server through its visitors' browsers. A body over max_body
bytes gets 413, declared (Content-Length) or chunked: the body is read here, whole, and replayed to the app,
which never sees a partial one. Every HTTP request, refused or not, is counted in metrics with its status (499
when the client left while sending its body). Refusals are OpenAI-shaped error bodies (openai_api.error_body).
"""
import json
import re
import time

from picochat.openai_api import error_body

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
