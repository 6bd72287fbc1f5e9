"""
The HTTP side of `picochat serve`: a FastAPI app over an EnginePool (picochat/scheduler.py).

  POST /v1/chat/completions  OpenAI chat completions, streamed (server-sent events) or not
  GET  /v1/models            the one model served
  GET  /health               {"status": "ok", "model": ..., "active_slots": ..., ...}
  GET  /metrics              Prometheus text: requests by status, tokens, queue, slots, latency
  GET  /                     the web chat (static/index.html), or a one-line placeholder

Every error, ours or the framework's (malformed JSON, unknown route), is an OpenAI-style body
{"error": {"message", "type", "param", "code"}}: 400 for a bad request (never FastAPI's 422), 401
for a missing or wrong API key, 429 with Retry-After when the queue is full. With an API key set,
/v1/* and /metrics need `Authorization: Bearer <key>`; / and /health stay open.

A handler turns the request into a scheduler Job whose deltas arrive on an asyncio queue (fed from
the scheduler thread through call_soon_threadsafe). A client that disconnects cancels its job, and
the scheduler frees its rows before the next step.
"""
from __future__ import annotations

import asyncio
import bisect
import hmac
import ipaddress
import json
import logging
import re
import time
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import h11
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from picochat.serve.api import (MAX_BODY_BYTES, Defaults, InvalidRequest, ReplyParts, chunk, completion_id,
                                completion_response, error_body, fit_max_tokens, parse_chat_request, usage)
from picochat.scheduler import Delta, EnginePool, Job, QueueFull

STATIC_DIR = Path(__file__).parent / "static"
PLACEHOLDER = "<!doctype html><p>picochat is serving: POST /v1/chat/completions (the web page is not installed).</p>\n"
RETRY_AFTER_S = 1  # a slot frees every few hundred tokens at most; clients back off from there
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)  # seconds; up to the default timeout


# -----------------------------------------------------------------------------
# Metrics (Prometheus text format, written by hand: a few counters need no client library)


class Metrics:
    PATHS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")

    def __init__(self):
        self.requests = Counter()  # (path, status) -> count
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)  # chat completions only; last: +Inf
        self.latency_sum = 0.0
        self.prompt_tokens = 0

    def observe(self, path: str, status: int, seconds: float) -> None:
        path = path if path in self.PATHS else "other"
        self.requests[(path, status)] += 1
        if path == "/v1/chat/completions":
            self.latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def render(self, pool: EnginePool) -> str:
        lines = []

        def metric(name, kind, help_text, samples):
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        metric("picochat_requests_total", "counter", "HTTP requests answered, by path and status code.",
               [(f'{{path="{p}",code="{c}"}}', n) for (p, c), n in sorted(self.requests.items())])
        metric("picochat_prompt_tokens_total", "counter", "Prompt tokens of accepted chat completions.",
               [("", self.prompt_tokens)])
        metric("picochat_generated_tokens_total", "counter", "Tokens generated (sampled or tool output).",
               [("", pool.tokens_generated)])
        metric("picochat_queue_depth", "gauge", "Requests waiting for a free slot.", [("", pool.queued)])
        metric("picochat_active_slots", "gauge", "Decode slots (rows) generating now.", [("", pool.active)])
        metric("picochat_slots", "gauge", "Decode slots in all engines.", [("", pool.slots)])
        cumulative, buckets = 0, []
        for bound, count in zip([*LATENCY_BUCKETS, "+Inf"], self.latency):
            cumulative += count
            buckets.append((f'_bucket{{le="{bound}"}}', cumulative))
        metric("picochat_request_duration_seconds", "histogram",
               "Time from a chat completion request to its last byte.",
               buckets + [("_sum", round(self.latency_sum, 6)), ("_count", cumulative)])
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Counts every response by path and status, and times it to its last byte (streams too)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.observe(scope["path"], status[0], time.monotonic() - start)


class JobStream(StreamingResponse):
    """A streamed reply that cancels its job however the stream ends (done, disconnect, error)."""

    def __init__(self, job: Job, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()  # no-op for a finished job; frees the rows of an abandoned one


def sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def error_response(status: int, message: str, kind: str = "invalid_request_error", param=None,
                   code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


# -----------------------------------------------------------------------------
# Hardening: the body is read by us, with a size limit and a deadline, before any handler sees it;
# the JSON is parsed with limits; connections are capped and must send their headers in time.

HEADER_TIMEOUT_S = 10.0  # from a connection's first byte (or its opening) to the end of its request headers
BODY_TIMEOUT_S = 30.0  # from the end of the headers to the last byte of the body (1 MB in 30 s: 35 KB/s)
MAX_CONNECTIONS = 1000  # open connections; more are closed at once (503), see serve_config
MAX_CLIENT_CONNECTIONS = 100  # open connections from one address (IPv6: one /64), so 10+ clients share the 1000
MAX_JSON_DEPTH = 64  # nesting of arrays and objects; a chat request needs 4
MAX_INT_DIGITS = 64  # digits of an integer literal; seeds are < 2**64 (20 digits)
MAX_HEADER_BYTES = 16 * 1024  # request line and headers (h11's default, stated)
FD_RESERVE = 256  # file descriptors kept free of connections: the backlog's burst (128) + files, pipes
log = logging.getLogger("uvicorn.error")  # uvicorn's handler and format


def _too_long_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise InvalidRequest(f"the request body has an integer of {len(text.lstrip('-')):,} digits; the limit is "
                             f"{MAX_INT_DIGITS}")
    return int(text)


def parse_json_body(raw: bytes):
    """A request body -> the decoded JSON value, or InvalidRequest (400) naming what is wrong: not
    UTF-8, not JSON, integers of more than MAX_INT_DIGITS digits, nesting deeper than MAX_JSON_DEPTH.
    The C parser bounds its own recursion (RecursionError, caught); the depth is checked after."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"the request body is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
    try:
        value = json.loads(text, parse_int=_too_long_int)
    except RecursionError:
        raise InvalidRequest(f"the request body is nested too deeply; the limit is {MAX_JSON_DEPTH} levels")
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"the request body is not valid JSON ({e})")
    except ValueError as e:  # int() of a digit string past Python's own limit, if parse_int let it through
        raise InvalidRequest(f"the request body is not valid JSON ({str(e)[:120]})")
    level, frontier = 0, [value]
    while frontier:  # breadth first, one level at a time: bounded by the body's size
        containers = [v for v in frontier if isinstance(v, (list, dict))]
        if not containers:
            break
        level += 1
        if level > MAX_JSON_DEPTH:
            raise InvalidRequest(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep; the limit is "
                                 f"{MAX_JSON_DEPTH}")
        frontier = [x for c in containers for x in (c.values() if isinstance(c, dict) else c)]
    return value


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class BodyGuard:
    """ASGI middleware that reads every request's body before the app does: a Content-Length over
    `max_bytes` is a 413 before a byte of the body is read, a body that grows past it (chunked, or
    a client that sends more than it said) a 413 as soon as it does, a body not complete within
    `timeout` seconds a 408, and a client that hangs up mid-body one log line. These answers close
    the connection (the rest of the body is never read). With `needs_key`, a request for a path
    that needs the API key and does not carry it is answered 401 before its body is read.
    The app then receives the body in one message, and the real `receive` after (disconnects)."""

    def __init__(self, app, max_bytes: int, timeout: float, needs_key=None):
        self.app, self.max_bytes, self.timeout, self.needs_key = app, max_bytes, timeout, needs_key

    async def refuse(self, scope, receive, send, status: int, message: str, **kw):
        response = error_response(status, message, headers={"Connection": "close"}, **kw)
        await response(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _header(scope, b"transfer-encoding") is not None and _header(scope, b"content-length") is not None:
            # Two framings: a proxy in front may have read the other one (request smuggling). RFC 9112
            # section 6.3: reject, or at least close the connection after answering; we do both.
            return await self.refuse(scope, receive, send, 400, "the request has both Content-Length and "
                                     "Transfer-Encoding headers; send one of them")
        if self.needs_key is not None and (refusal := self.needs_key(scope)):
            return await self.refuse(scope, receive, send, 401, refusal, code="invalid_api_key")
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            return await self.refuse(scope, receive, send, 413, f"the request body is {int(length):,} bytes "
                                     f"(Content-Length); the limit is {self.max_bytes:,}")
        loop = asyncio.get_running_loop()
        deadline, chunks, size = loop.time() + self.timeout, [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await self.refuse(scope, receive, send, 408, f"the request body took longer than "
                                         f"{self.timeout:g} s to arrive ({size:,} bytes came)")
            if message["type"] == "http.disconnect":
                client = "%s:%s" % tuple(scope["client"]) if scope.get("client") else "a client"
                log.info("%s hung up after sending %s bytes of its request body (%s %s)", client, f"{size:,}",
                         scope["method"], scope["path"])
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self.refuse(scope, receive, send, 413, f"the request body is over "
                                         f"{self.max_bytes:,} bytes, the limit")
            if body:
                chunks.append(body)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def client_address(transport) -> str | None:
    """Who a connection counts against: its IPv4 address, or its IPv6 /64 (one host usually holds a
    whole /64, so counting single IPv6 addresses would cap nothing); None for a Unix socket."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        ip = ipaddress.ip_address(peer[0])
    except ValueError:
        return str(peer[0])
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:  # an IPv4 client of a dual-stack socket
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


HEADER_BLOCK_END = re.compile(rb"\n\r?\n")  # how h11 finds the blank line after the headers


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the limits uvicorn lacks: at most `max_connections` open
    connections, and `max_client_connections` from one address (one more is answered 503 and closed
    at once; a line is logged at most every 10 s); `header_timeout` seconds to send a request's line
    and headers, counted from the connection's opening or a request's first byte (uvicorn's own
    keep-alive timeout runs only between requests, and any byte stops it); and `max_header_bytes` of
    request line and headers however they arrive (h11's own limit applies only to a block still
    incomplete, so 100 KB sent in one write used to pass): a 431. Make one with configured_protocol()."""

    max_connections = MAX_CONNECTIONS
    max_client_connections = MAX_CLIENT_CONNECTIONS
    header_timeout = HEADER_TIMEOUT_S
    max_header_bytes = MAX_HEADER_BYTES
    refused = {"count": 0, "logged": 0.0}
    per_client: Counter = Counter()  # address -> connections open

    def connection_made(self, transport):
        self.header_timer, self.turned_away = None, False
        self.client_address = client_address(transport)
        if len(self.connections) >= self.max_connections:
            return self._turn_away(transport, b"the server has too many open connections; retry in a moment\n")
        if (self.max_client_connections and self.client_address is not None
                and self.per_client[self.client_address] >= self.max_client_connections):
            return self._turn_away(transport, b"your address has %d connections open to this server, the most one "
                                   b"client may hold; close some and retry\n" % self.max_client_connections)
        if self.client_address is not None:
            self.per_client[self.client_address] += 1
        super().connection_made(transport)
        self._arm_header_timer()

    def _turn_away(self, transport, message: bytes) -> None:
        self.turned_away = True
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
                        b"connection: close\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n%s"
                        % (len(message), message))
        transport.close()
        refused, now = self.refused, time.monotonic()
        refused["count"] += 1
        if now - refused["logged"] >= 10:
            log.warning("turned away %d connection(s): %d are open (--max-connections %d, at most %s per client)",
                        refused["count"], len(self.connections), self.max_connections,
                        self.max_client_connections or "any number")
            refused["count"], refused["logged"] = 0, now

    def connection_lost(self, exc):
        if self.turned_away:
            return
        if self.client_address is not None:
            self.per_client[self.client_address] -= 1
            if self.per_client[self.client_address] <= 0:
                del self.per_client[self.client_address]
        self._cancel_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        """Before h11 parses a request: its line and headers, as far as they have come, must fit
        max_header_bytes. (Called for every read, and for a pipelined request held back until the
        one before it was answered.)"""
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            pending = self.conn.trailing_data[0]
            end = HEADER_BLOCK_END.search(pending)
            size = end.end() if end else len(pending)
            if size > self.max_header_bytes:
                return self._reply_and_close(431, "Request Header Fields Too Large",
                                             f"the request line and headers are over {self.max_header_bytes:,} "
                                             f"bytes ({size:,} came), the limit; send fewer or shorter headers")
        super().handle_events()

    def _reply_and_close(self, status: int, reason: str, message: str) -> None:
        """An error body in the API's shape, written as raw bytes (no request was parsed: h11 is
        not in a state to answer), then the connection closed."""
        body = json.dumps(error_body(message)).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"content-length: %d\r\n\r\n%s" % (status, reason.encode(), len(body), body))
        self._cancel_header_timer()
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.turned_away:
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_timer()  # a request has begun (or not): its headers must come in time
        else:
            self._cancel_header_timer()

    def _arm_header_timer(self):
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout, self._header_timeout)

    def _cancel_header_timer(self):
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self):
        self.header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a request came
            return self._reply_and_close(408, "Request Timeout", f"the request headers took longer than "
                                         f"{self.header_timeout:g} s to arrive")
        self.transport.close()


def configured_protocol(max_connections: int = MAX_CONNECTIONS, header_timeout: float = HEADER_TIMEOUT_S,
                        max_client_connections: int = MAX_CLIENT_CONNECTIONS):
    """A GuardedH11Protocol class with these limits and counters of its own (0 clients: no per-client cap)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"max_connections": max_connections, "header_timeout": header_timeout,
                 "max_client_connections": max_client_connections, "refused": {"count": 0, "logged": 0.0},
                 "per_client": Counter()})


def serve_config(app, host: str, port: int, max_connections: int = MAX_CONNECTIONS,
                 header_timeout: float = HEADER_TIMEOUT_S, max_client_connections: int = MAX_CLIENT_CONNECTIONS,
                 **kwargs):
    """The uvicorn.Config picochat serve runs with (the tests too):
    - http: h11 with the limits of GuardedH11Protocol (pinned: httptools, if installed, would
      otherwise be chosen and has none of them);
    - limit_concurrency = max_connections: a request is answered 503 when that many connections
      or requests are open (our connection cap usually turns connections away first);
    - backlog 128: asyncio accepts up to `backlog` connections at once before any is counted, so
      the file descriptors in use stay under max_connections + 128 + a few (FD_RESERVE);
    - h11_max_incomplete_event_size 16 KB, the same as GuardedH11Protocol's header limit (a 431);
    - timeout_keep_alive 5 s between requests (uvicorn's default); timeout_graceful_shutdown 10 s."""
    import uvicorn
    protocol = configured_protocol(max_connections, header_timeout, max_client_connections)
    options = dict(http=protocol, limit_concurrency=max_connections,
                   backlog=128, h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=5,
                   timeout_graceful_shutdown=10)
    return uvicorn.Config(app, host=host, port=port, **(options | kwargs))


class HostGuard:
    """ASGI middleware: a Host header naming none of `allowed_hosts` is a 400 (pure ASGI, not
    Starlette's BaseHTTPMiddleware, which turns an app that answers nothing, as BodyGuard does when
    the client hangs up, into a RuntimeError and a traceback)."""

    def __init__(self, app, allowed_hosts: tuple[str, ...]):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = urlsplit("//" + (_header(scope, b"host") or b"").decode("latin-1")).hostname or ""
            if host not in self.allowed_hosts:  # an attack, not a typo: answer, then close
                response = error_response(400, f"Host {host!r} is not one this server answers to (it is bound "
                                               f"to loopback: use http://127.0.0.1 or http://localhost)",
                                          headers={"Connection": "close"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# -----------------------------------------------------------------------------
# The app


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def create_app(pool: EnginePool, tokenizer, model_name: str, context_len: int, defaults: Defaults,
               api_key: str | None = None, request_timeout: float | None = 300.0,
               allowed_hosts: tuple[str, ...] | None = None, body_timeout: float = BODY_TIMEOUT_S) -> FastAPI:
    """The app. `allowed_hosts`: the only host names the Host header may carry (picochat serve
    passes the loopback names when it binds to loopback: a web page that points its own domain at
    127.0.0.1, DNS rebinding, then cannot reach the server); None allows any. `body_timeout`:
    seconds a request's body may take to arrive (BodyGuard)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app):
        pool.start()
        yield
        pool.stop()

    def key_refusal(scope) -> str | None:
        """Why a request must be refused for its API key, or None (also: no key needed here)."""
        path = scope["path"]
        if api_key is None or not (path.startswith("/v1/") or path == "/metrics"):
            return None
        given = (_header(scope, b"authorization") or b"")
        if hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            return None
        return (f"{'wrong' if given else 'missing'} API key: send the header 'Authorization: Bearer <key>' with "
                f"the key this server was started with")

    app = FastAPI(title="picochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    # innermost first: the body guard runs after the Host check, and inside the metrics
    app.add_middleware(BodyGuard, max_bytes=MAX_BODY_BYTES, timeout=body_timeout, needs_key=key_refusal)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    if allowed_hosts is not None:
        app.add_middleware(HostGuard, allowed_hosts=allowed_hosts)  # outermost: before the body is read

    @app.exception_handler(InvalidRequest)
    async def invalid_request(request, e: InvalidRequest):
        return error_response(e.status, e.message, e.kind, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(e.status_code, message, headers=getattr(e, "headers", None))

    def check_key(request: Request) -> None:  # BodyGuard checked it already; this keeps each route safe alone
        refusal = key_refusal(request.scope)
        if refusal:
            raise InvalidRequest(refusal, status=401, code="invalid_api_key")

    # --- endpoints -----------------------------------------------------------------------

    page = STATIC_DIR / "index.html"
    page_html = page.read_text() if page.is_file() else PLACEHOLDER

    @app.get("/", response_class=HTMLResponse)
    async def index():
        # The page talks only to this server: even text that slipped past its escaping could load
        # nothing from, or send nothing to, anywhere else.
        return HTMLResponse(page_html, headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "context_length": context_len,
                "active_slots": pool.active, "slots": pool.slots, "queued": pool.queued,
                "engines": len(pool.schedulers)}

    @app.get("/metrics")
    async def prometheus(request: Request):
        check_key(request)
        return PlainTextResponse(metrics.render(pool), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "picochat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        # JSON only: a form or text/plain POST is what any web page can send without asking (CSRF)
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise InvalidRequest(f"send the body as JSON with 'Content-Type: application/json' "
                                 f"(got {content_type or 'no Content-Type'!r})", status=415)
        raw = await request.body()  # read by BodyGuard already: at most MAX_BODY_BYTES
        if len(raw) > MAX_BODY_BYTES:
            raise InvalidRequest(f"the request body is {len(raw):,} bytes; the limit is {MAX_BODY_BYTES:,}",
                                 status=413)
        chat = parse_chat_request(parse_json_body(raw), defaults)
        try:
            prompt = tokenizer.render_for_completion({"messages": chat.messages})
        except ValueError as e:
            raise InvalidRequest(f"the conversation cannot be rendered: {e}", "messages")
        max_tokens = fit_max_tokens(chat, len(prompt), context_len, defaults.max_tokens)
        if chat.n > pool.max_rows:
            raise InvalidRequest(f"n is {chat.n} but this server has {pool.max_rows} slots per engine "
                                 f"(--max-batch-size)", "n")
        loop, deltas = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(prompt, emit=lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d), n=chat.n,
                  max_tokens=max_tokens, temperature=chat.temperature, top_k=chat.top_k, top_p=chat.top_p,
                  frequency_penalty=chat.frequency_penalty, presence_penalty=chat.presence_penalty, seed=chat.seed, stop=chat.stop, timeout=request_timeout)
        try:
            pool.submit(job)
        except QueueFull:
            return error_response(429, f"the server is busy: {pool.queued} requests are waiting for a slot "
                                       f"(--max-queue); retry in a moment", kind="rate_limit_error",
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
        metrics.prompt_tokens += len(prompt)
        cid, replies = completion_id(), [ReplyParts(chat.show_answer_marker) for _ in range(chat.n)]
        if chat.stream:
            return JobStream(job, stream_events(job, deltas, replies, cid, model_name, len(prompt),
                                                chat.include_usage))
        return await complete(request, job, deltas, replies, cid, model_name, len(prompt))

    return app


async def stream_events(job: Job, deltas: asyncio.Queue, replies: list[ReplyParts], cid: str, model: str,
                        prompt_tokens: int, include_usage: bool):
    """Server-sent events: a role chunk per choice, a chunk per piece of text (`content`) or of a
    tool block (`tool`, see ReplyParts), the text ReplyParts held back, a chunk with each choice's
    finish_reason, optionally the usage, then [DONE]."""
    for i in range(job.n):
        yield sse(chunk(cid, model, i, {"role": "assistant", "content": ""}))
    finished, tokens = 0, 0
    while finished < job.n:
        delta: Delta = await deltas.get()
        if delta.finish_reason is None:
            for piece in replies[delta.index].feed(delta.text, delta.marker):
                yield sse(chunk(cid, model, delta.index, piece))
            continue
        finished += 1
        tokens += delta.completion_tokens
        if delta.finish_reason == "error":
            yield sse(error_body("the server failed while generating this reply; see its log", "server_error"))
        else:
            for piece in replies[delta.index].flush():
                yield sse(chunk(cid, model, delta.index, piece))
            yield sse(chunk(cid, model, delta.index, {}, delta.finish_reason))
    if include_usage:
        yield sse({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                   "choices": [], "usage": usage(prompt_tokens, tokens)})
    yield sse("[DONE]")


async def complete(request: Request, job: Job, deltas: asyncio.Queue, replies: list[ReplyParts], cid: str,
                   model: str, prompt_tokens: int):
    """Wait for every choice to finish; a client that hangs up meanwhile cancels the job."""
    reasons, tokens = [""] * job.n, 0

    async def collect():
        nonlocal tokens
        finished = 0
        while finished < job.n:
            delta = await deltas.get()
            replies[delta.index].feed(delta.text, delta.marker)
            if delta.finish_reason is not None:
                replies[delta.index].flush()
                reasons[delta.index] = delta.finish_reason
                tokens += delta.completion_tokens
                finished += 1

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    done_task, gone_task = asyncio.create_task(collect()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait([done_task, gone_task], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone_task.cancel()
        if not done_task.done():
            done_task.cancel()
            job.cancel()
    if not done_task.done() or done_task.cancelled():
        return error_response(499, "the client closed the connection")
    if "error" in reasons:
        return error_response(500, "the server failed while generating this reply; see its log",
                              kind="server_error")
    return completion_response(cid, model, replies, reasons, prompt_tokens, tokens)
