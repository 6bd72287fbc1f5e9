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
import json
import time
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from picochat.serve.api import (MAX_BODY_BYTES, Defaults, InvalidRequest, chunk, completion_id, completion_response,
                                error_body, fit_max_tokens, parse_chat_request, usage)
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
# The app


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def create_app(pool: EnginePool, tokenizer, model_name: str, context_len: int, defaults: Defaults,
               api_key: str | None = None, request_timeout: float | None = 300.0,
               allowed_hosts: tuple[str, ...] | None = None) -> FastAPI:
    """The app. `allowed_hosts`: the only host names the Host header may carry (picochat serve
    passes the loopback names when it binds to loopback: a web page that points its own domain at
    127.0.0.1, DNS rebinding, then cannot reach the server); None allows any."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app):
        pool.start()
        yield
        pool.stop()

    app = FastAPI(title="picochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.middleware("http")
    async def check_host(request: Request, call_next):
        if allowed_hosts is not None:
            host = urlsplit("//" + request.headers.get("host", "")).hostname or ""
            if host not in allowed_hosts:
                return error_response(400, f"Host {host!r} is not one this server answers to (it is bound to "
                                           f"loopback: use http://127.0.0.1 or http://localhost)")
        return await call_next(request)

    @app.exception_handler(InvalidRequest)
    async def invalid_request(request, e: InvalidRequest):
        return error_response(e.status, e.message, e.kind, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(e.status_code, message, headers=getattr(e, "headers", None))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            what = "wrong" if given else "missing"
            raise InvalidRequest(f"{what} API key: send the header 'Authorization: Bearer <key>' with the "
                                 f"key this server was started with (--api-key)", status=401,
                                 code="invalid_api_key")

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
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise InvalidRequest(f"the request body is {len(raw):,} bytes; the limit is {MAX_BODY_BYTES:,}",
                                 status=413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidRequest(f"the request body is not valid JSON ({e})")
        chat = parse_chat_request(body, defaults)
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
                  seed=chat.seed, stop=chat.stop, timeout=request_timeout)
        try:
            pool.submit(job)
        except QueueFull:
            return error_response(429, f"the server is busy: {pool.queued} requests are waiting for a slot "
                                       f"(--max-queue); retry in a moment", kind="rate_limit_error",
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
        metrics.prompt_tokens += len(prompt)
        cid = completion_id()
        if chat.stream:
            return JobStream(job, stream_events(job, deltas, cid, model_name, len(prompt), chat.include_usage))
        return await complete(request, job, deltas, cid, model_name, len(prompt))

    return app


async def stream_events(job: Job, deltas: asyncio.Queue, cid: str, model: str, prompt_tokens: int,
                        include_usage: bool):
    """Server-sent events: a role chunk per choice, a chunk per piece of text, a chunk with each
    choice's finish_reason, optionally the usage, then [DONE]."""
    for i in range(job.n):
        yield sse(chunk(cid, model, i, {"role": "assistant", "content": ""}))
    finished, tokens = 0, 0
    while finished < job.n:
        delta: Delta = await deltas.get()
        if delta.finish_reason is None:
            yield sse(chunk(cid, model, delta.index, {"content": delta.text}))
            continue
        finished += 1
        tokens += delta.completion_tokens
        if delta.finish_reason == "error":
            yield sse(error_body("the server failed while generating this reply; see its log", "server_error"))
        else:
            yield sse(chunk(cid, model, delta.index, {}, delta.finish_reason))
    if include_usage:
        yield sse({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                   "choices": [], "usage": usage(prompt_tokens, tokens)})
    yield sse("[DONE]")


async def complete(request: Request, job: Job, deltas: asyncio.Queue, cid: str, model: str, prompt_tokens: int):
    """Wait for every choice to finish; a client that hangs up meanwhile cancels the job."""
    texts, reasons, tokens = [""] * job.n, [""] * job.n, 0

    async def collect():
        nonlocal tokens
        finished = 0
        while finished < job.n:
            delta = await deltas.get()
            texts[delta.index] += delta.text
            if delta.finish_reason is not None:
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
    return completion_response(cid, model, texts, reasons, prompt_tokens, tokens)
