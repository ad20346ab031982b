"""The HTTP face of a worker: ``create_app(worker)`` → a FastAPI app with the worker API, the OpenAI-compatible
API (``orcd.server.openai_api``) and ``/metrics``.

Worker API (the contract an orchestrator depends on):

* ``POST /execute`` → ``text/event-stream``: ``started``, ``token {t, i}`` …, ``metrics``, then exactly one of
  ``end {tokens_out, decode_time_ms, stop_reason, seed}`` or ``error {code, message, retriable}``. A request that
  cannot be served is refused before the stream starts: ``400 {code: INVALID_REQUEST, message, field}``.
* ``POST /cancel {job_id}`` → 202 whether or not the job is still known (idempotent).
* ``GET /health`` → cached state, 200 when healthy and 503 when not; never needs the API key.
* ``POST /shutdown`` → 202; the worker stops taking jobs, finishes what it has and exits.

Two pure-ASGI middlewares wrap everything (a ``BaseHTTPMiddleware`` would break streaming disconnects): the API
key check and the request-body size limit (413).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orcd import __version__
from orcd.errors import InvalidRequest, OrcdError
from orcd.server.schemas import CancelRequest, ExecuteRequest
from orcd.server.worker import (
    TERMINAL,
    DuplicateJob,
    Event,
    Job,
    NotAccepting,
    QueueFull,
    Worker,
)

log = logging.getLogger("orcd.server")

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
KEEPALIVE_S = 15.0
OPENAI_PREFIX = "/v1/"


def create_app(
    worker: Worker,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    """The app serving ``worker`` (already started). ``on_shutdown`` is what ``POST /shutdown`` triggers; by
    default the worker only stops taking jobs (the process runner decides when to exit)."""
    app = FastAPI(title="orcd worker", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.state.on_shutdown = on_shutdown or worker.begin_shutdown

    _install_error_handlers(app)
    _add_worker_routes(app)
    from orcd.server.openai_api import add_openai_routes

    add_openai_routes(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key, open_paths=("/health",))
    return app


def worker_of(request: Request) -> Worker:
    return request.app.state.worker


# --- errors --------------------------------------------------------------------------------------------------------


def error_response(request: Request, status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The worker API's ``{code, message, field}``, or OpenAI's ``{error: {...}}`` on /v1 routes."""
    if request.url.path.startswith(OPENAI_PREFIX):
        body: dict[str, Any] = {"error": {"message": message, "type": _openai_type(status), "param": field,
                                          "code": code.lower()}}
    else:
        body = {"code": code, "message": message, "field": field}
    return JSONResponse(body, status_code=status, headers=headers)


def _openai_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            409: "invalid_request_error", 413: "invalid_request_error"}.get(status, "server_error")


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One message naming the first offending field, and that field's dotted path."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if kind == "extra_forbidden":
        return f"unsupported field {field!r}: this server does not implement it", field
    if kind == "missing":
        return f"field {field!r} is required", field
    msg = str(first.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if field:
        return f"{field}: {msg}", field
    return msg, None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = describe_validation_error(exc)
        return error_response(request, 400, InvalidRequest.code, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = InvalidRequest.code if exc.status_code < 500 else "INTERNAL"
        if exc.status_code == 404:
            code = "NOT_FOUND"
        elif exc.status_code == 405:
            code = "METHOD_NOT_ALLOWED"
        return error_response(request, exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(DuplicateJob)
    async def _duplicate(request: Request, exc: DuplicateJob) -> JSONResponse:
        return error_response(request, 409, exc.code, exc.message, exc.field)

    @app.exception_handler(InvalidRequest)
    async def _invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
        return error_response(request, 400, exc.code, exc.message, exc.field)

    @app.exception_handler(QueueFull)
    @app.exception_handler(NotAccepting)
    async def _unavailable(request: Request, exc: OrcdError) -> JSONResponse:
        retry = str(worker_of(request).config.retry_after_s)
        return error_response(request, 503, exc.code, exc.message, headers={"Retry-After": retry})

    @app.exception_handler(OrcdError)
    async def _orcd(request: Request, exc: OrcdError) -> JSONResponse:
        return error_response(request, 500, exc.code, exc.message)


# --- worker API ----------------------------------------------------------------------------------------------------


def sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


async def job_events(job: Job, keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[list[Event]]:
    """The job's events in batches (all that arrived since the last batch), ending with its terminal one; an
    empty batch after ``keepalive_s`` of silence (the caller sends a comment, which also finds out whether the
    client is still there). Batches let a slow reader catch up in one write instead of one per token."""
    while True:
        batch = await job.next_events(keepalive_s)
        yield batch
        if any(ev.kind in TERMINAL for ev in batch):
            return


def cancel_if_open(worker: Worker, job: Job, why: str = "the client disconnected") -> None:
    """Run when a response ends for any reason: a job whose stream ended before its terminal event (the client
    went away) is cancelled like ``POST /cancel`` would."""
    if not job.done:
        log.info("client gone; cancelling", extra={"job_id": job.job_id})
        worker.cancel(job.job_id, "CANCELLED", why)


async def _worker_stream(job: Job, worker: Worker) -> AsyncIterator[bytes]:
    try:
        async for batch in job_events(job):
            yield b"".join(sse(ev.kind, ev.data) for ev in batch) if batch else b": keep-alive\n\n"
    finally:
        cancel_if_open(worker, job)


def _add_worker_routes(app: FastAPI) -> None:
    @app.post("/execute")
    async def execute(body: ExecuteRequest, request: Request) -> Response:
        worker = worker_of(request)
        sampling = body.model_dump(include={"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"})
        job = await run_in_threadpool(worker.make_job, body.job_id, body.prompt, body.max_tokens, sampling,
                                      body.stop or [])
        worker.submit(job, asyncio.get_running_loop())
        return StreamingResponse(
            _worker_stream(job, worker),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(cancel_if_open, worker, job),
        )

    @app.post("/cancel", status_code=202)
    async def cancel(body: CancelRequest, request: Request) -> dict[str, Any]:
        found = worker_of(request).cancel(body.job_id, "CANCELLED", "cancelled by the client")
        return {"job_id": body.job_id, "status": "cancelling" if found else "not_running"}

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        state = worker_of(request).health()
        return JSONResponse(state, status_code=200 if state["status"] == "healthy" else 503)

    @app.post("/shutdown", status_code=202)
    async def shutdown(request: Request) -> dict[str, Any]:
        worker = worker_of(request)
        request.app.state.on_shutdown()
        return {"status": "shutting_down", "running_jobs": worker.running_jobs, "queue_length": worker.queue_length}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = worker_of(request).metrics.render()
        return Response(body, media_type=content_type)


# --- middleware ----------------------------------------------------------------------------------------------------


class BodyTooLarge(StarletteHTTPException):
    """Raised from the body stream when it passes the limit. An HTTP exception, because FastAPI turns any other
    exception raised while reading a body into a 400; the app's handler answers it as a 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than {max_bytes} bytes")


class BodySizeLimit:
    """413 for a request body over ``max_bytes``: at once when Content-Length says so, else as soon as the
    streamed body passes the limit (chunked uploads have no Content-Length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        path = scope.get("path", "")
        message = f"the request body is larger than {self.max_bytes} bytes"
        if path.startswith(OPENAI_PREFIX):
            body: dict[str, Any] = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                              "code": "request_too_large"}}
        else:
            body = {"code": InvalidRequest.code, "message": message, "field": None}
        await _send_json(send, 413, body)


class BearerAuth:
    """``Authorization: Bearer <key>`` on every path but ``open_paths``; compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization")
        if given is not None and hmac.compare_digest(given.encode("latin-1"), self.expected):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
        if path.startswith(OPENAI_PREFIX):
            body: dict[str, Any] = {"error": {"message": message, "type": "authentication_error", "param": None,
                                              "code": "invalid_api_key"}}
        else:
            body = {"code": "UNAUTHORIZED", "message": message, "field": "Authorization"}
        await _send_json(send, 401, body, extra_headers=[(b"www-authenticate", b"Bearer")])


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": payload})
