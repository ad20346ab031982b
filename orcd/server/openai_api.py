"""The OpenAI-compatible API: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

Each request becomes a worker job like ``/execute`` does (same queue, cancel on disconnect, same engine), and the
job's events are re-shaped into OpenAI's objects: one response, or ``data:`` chunks ending with ``data: [DONE]``.
Fields OpenAI defines that orcd does not implement are refused with a 400 naming them (see ``schemas``).

Models whose chat template speaks harmony (GPT-OSS) answer in channels; a chat completion's ``content`` is the
``final`` channel and ``reasoning_content`` the ``analysis`` channel (the field name llama.cpp and vLLM use),
split as the text arrives when streaming. ``/v1/completions`` and ``/execute`` hand out the raw text.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from orcd.chat import split_harmony_channels
from orcd.errors import InvalidRequest
from orcd.server.app import cancel_if_open, error_response, job_events, worker_of
from orcd.server.schemas import ChatCompletionRequest, CompletionRequest, _OpenAIBase
from orcd.server.worker import Event, Job, Worker

FINISH_REASON = {"eos": "stop", "stop_sequence": "stop", "max_tokens": "length"}
ERROR_STATUS = {"VRAM_OOM": 503, "INFERENCE_TIMEOUT": 504, "CANCELLED": 499, "INVALID_REQUEST": 400}
DISCONNECT_POLL_S = 0.5
DEFAULT_CHAT_MAX_TOKENS = 1024  # when a chat request gives no limit: bounded by the worker's own cap too


def add_openai_routes(app: FastAPI) -> None:
    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        worker = worker_of(request)
        return {"object": "list", "data": [_model_card(worker)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request) -> Response:
        worker = worker_of(request)
        if model_id != worker.config.model_id:
            return error_response(request, 404, "model_not_found",
                                  f"model {model_id!r} is not served here; this worker serves "
                                  f"{worker.config.model_id!r}", "model")
        return JSONResponse(_model_card(worker))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        worker = worker_of(request)
        job = await _submit(worker, body, body.prompt_text(), body.max_tokens or 16, "openai.completions")
        ids = _Ids("cmpl", worker, body)
        if body.stream:
            return _stream(job, worker, ids, body.include_usage, chat=False)
        return await _collect(job, worker, ids, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        worker = worker_of(request)
        template = getattr(worker.loaded, "chat_template", None)
        if template is None:
            raise InvalidRequest("this model has no chat template; use /v1/completions with a formatted prompt",
                                 field="messages")
        try:
            prompt = await run_in_threadpool(template.render, body.template_messages(), True)
        except InvalidRequest as e:  # the template rejects the conversation (raise_exception)
            raise InvalidRequest(e.message, field=e.field or "messages") from None
        limit = body.token_limit() or min(DEFAULT_CHAT_MAX_TOKENS, worker.config.max_tokens_out)
        prompt_ids = await run_in_threadpool(worker.tokenizer.encode_chat, prompt)
        job = await _submit(worker, body, prompt_ids, limit, "openai.chat")
        ids = _Ids("chatcmpl", worker, body)
        channels = HarmonyChannels() if speaks_harmony(worker) else None
        if body.stream:
            return _stream(job, worker, ids, body.include_usage, chat=True, channels=channels)
        return await _collect(job, worker, ids, request, chat=True, channels=channels)


def speaks_harmony(worker: Worker) -> bool:
    template = getattr(worker.loaded, "chat_template", None)
    return template is not None and "<|channel|>" in getattr(template, "source", "")


class HarmonyChannels:
    """Splits a harmony completion into reasoning (``analysis``) and content (``final``) while it streams:
    each ``feed`` re-splits the text so far and returns what each channel gained since the last call."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = {"analysis": "", "final": ""}

    def feed(self, piece: str) -> tuple[str, str]:
        self.text += piece
        parts = split_harmony_channels(self.text)
        deltas = []
        for channel in ("analysis", "final"):
            new, old = parts.get(channel, ""), self.sent[channel]
            if len(new) > len(old) and new.startswith(old):
                deltas.append(new[len(old):])
                self.sent[channel] = new
            else:
                deltas.append("")
        return deltas[0], deltas[1]


def _model_card(worker: Worker) -> dict[str, Any]:
    return {"id": worker.config.model_id, "object": "model", "created": int(worker.started_at), "owned_by": "orcd"}


class _Ids:
    """What every object of one response repeats: id, creation time, model name."""

    def __init__(self, prefix: str, worker: Worker, body: _OpenAIBase) -> None:
        self.id = f"{prefix}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = worker.config.model_id
        self.fingerprint = f"orcd-{worker.quant_kind}"


async def _submit(worker: Worker, body: _OpenAIBase, prompt: str | list[int], max_tokens: int, api: str) -> Job:
    sampling: dict[str, Any] = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": None if body.seed is None else body.seed % 2**64,  # OpenAI allows negative seeds
    }
    job_id = f"oai-{secrets.token_hex(8)}"
    job = await run_in_threadpool(worker.make_job, job_id, prompt, max_tokens, sampling, body.stop_list(), api)
    worker.submit(job, asyncio.get_running_loop())
    return job


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(chat: bool, text: str | None, finish: str | None, final: bool = False, first: bool = False) -> dict:
    if chat:
        if final:
            delta: dict[str, Any] = {}
        else:
            delta = {"role": "assistant", "content": text or ""} if first else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


def _chunk(ids: _Ids, chat: bool, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
    obj: dict[str, Any] = {
        "id": ids.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": ids.created,
        "model": ids.model,
        "system_fingerprint": ids.fingerprint,
        "choices": choices,
    }
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _stream(job: Job, worker: Worker, ids: _Ids, include_usage: bool, chat: bool,
            channels: HarmonyChannels | None = None) -> StreamingResponse:
    def render(ev: Event) -> list[bytes]:
        if ev.kind == "token" and channels is not None:
            reasoning, content = channels.feed(ev.data["t"])
            out = []
            if reasoning:
                out.append(_chunk(ids, chat, [{"index": 0, "delta": {"reasoning_content": reasoning},
                                               "logprobs": None, "finish_reason": None}]))
            if content:
                out.append(_chunk(ids, chat, [_choice(chat, content, None)]))
            return out
        if ev.kind == "token":
            return [_chunk(ids, chat, [_choice(chat, ev.data["t"], None)])] if ev.data["t"] else []
        if ev.kind == "end":
            finish = FINISH_REASON.get(ev.data["stop_reason"], "stop")
            out = [_chunk(ids, chat, [_choice(chat, None if chat else "", finish, final=True)])]
            if include_usage:
                out.append(_chunk(ids, chat, [], _usage(len(job.prompt_ids), ev.data["tokens_out"])))
            return out
        if ev.kind == "error":
            err = {"message": ev.data["message"], "type": "server_error", "param": None,
                   "code": ev.data["code"].lower()}
            return [b"data: " + json.dumps({"error": err}).encode() + b"\n\n"]
        return []  # started, metrics: nothing in OpenAI's format

    async def chunks() -> AsyncIterator[bytes]:
        try:
            if chat:  # OpenAI's first chat chunk announces the role
                yield _chunk(ids, chat, [_choice(chat, "", None, first=True)], None)
            async for batch in job_events(job):
                if not batch:
                    yield b": keep-alive\n\n"
                    continue
                out = b"".join(piece for ev in batch for piece in render(ev))
                if out:
                    yield out
            yield b"data: [DONE]\n\n"
        finally:
            cancel_if_open(worker, job)

    return StreamingResponse(chunks(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(cancel_if_open, worker, job))


def _completion_response(ids: _Ids, chat: bool, channels: HarmonyChannels | None, text: str,
                         end: dict[str, Any], prompt_tokens: int) -> JSONResponse:
    finish = FINISH_REASON.get(end["stop_reason"], "stop")
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if channels is not None:
            parts = split_harmony_channels(text)
            message = {"role": "assistant", "content": parts["final"], "reasoning_content": parts["analysis"] or None}
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return JSONResponse({
        "id": ids.id,
        "object": "chat.completion" if chat else "text_completion",
        "created": ids.created,
        "model": ids.model,
        "system_fingerprint": ids.fingerprint,
        "choices": [choice],
        "usage": _usage(prompt_tokens, end["tokens_out"]),
    })


async def _collect(job: Job, worker: Worker, ids: _Ids, request: Request, chat: bool,
                   channels: HarmonyChannels | None = None) -> Response:
    """Wait for the whole completion; a client that leaves meanwhile cancels the job."""
    parts: list[str] = []
    try:
        async for batch in job_events(job, keepalive_s=DISCONNECT_POLL_S):
            if not batch and await request.is_disconnected():
                cancel_if_open(worker, job)
                return Response(status_code=499)
            for ev in batch:
                if ev.kind == "token":
                    parts.append(ev.data["t"])
                elif ev.kind == "end":
                    return _completion_response(ids, chat, channels, "".join(parts), ev.data, len(job.prompt_ids))
                elif ev.kind == "error":
                    status = ERROR_STATUS.get(ev.data["code"], 500)
                    headers = {"Retry-After": "1"} if ev.data.get("retriable") and status == 503 else None
                    return error_response(request, status, ev.data["code"], ev.data["message"], headers=headers)
    finally:
        cancel_if_open(worker, job)
    return error_response(request, 500, "INTERNAL", "the job ended without a result")
