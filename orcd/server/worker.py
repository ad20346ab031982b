"""The worker: one loaded model, one engine, one engine thread, a bounded queue of jobs.

HTTP handlers run on uvicorn's event loop; the model runs on a single engine thread that loops ``Engine.step()``
while there is work. They meet in two places only:

* ``Worker.submit`` / ``Worker.cancel`` (called from the loop) change the queue and the jobs' cancel flags under
  one condition variable; the engine thread reads them between steps, so a cancel takes effect within one step
  (two where the engine runs a step ahead on the GPU: ``Engine.step``).
* Each job carries an ``asyncio.Queue`` owned by the handler's loop; the engine thread hands it events with
  ``loop.call_soon_threadsafe``. The handler turns those events into SSE (worker API) or OpenAI chunks.

``/health`` reads plain attributes kept up to date by the engine thread and the residency checker, so it answers
in microseconds whatever the engine is doing.

Up to ``max_batch`` jobs run at once: the engine decodes them in one batched step and a queued job joins between
steps when a place is free and the engine's KV cache can promise it the blocks of its prompt plus ``max_tokens``
(otherwise it stays queued, first come first served). Each job keeps its own stream and cancel.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from orcd import device as devmem
from orcd.errors import Cancelled, InferenceTimeout, InvalidRequest, OrcdError, VramOOM
from orcd.sampling import SamplingParams
from orcd.server.metrics import ServerMetrics

log = logging.getLogger("orcd.server")

TERMINAL = ("end", "error")
FINISH_REASONS = ("eos", "max_tokens", "stop_sequence")


class QueueFull(OrcdError):
    """Every queue slot is taken; the client should retry after ``retry_after`` seconds."""

    code = "QUEUE_FULL"
    retriable = True


class NotAccepting(OrcdError):
    """The worker is shutting down (or unhealthy) and takes no new job."""

    code = "UNAVAILABLE"
    retriable = True


class DuplicateJob(InvalidRequest):
    """A job with this id is already queued or running."""


@dataclass
class WorkerConfig:
    worker_id: str
    model_id: str  # the name clients see (file name without .gguf)
    max_queue: int = 16  # jobs waiting beside the running ones
    max_batch: int = 1  # jobs the engine decodes at once
    kv_cache_tokens: int | None = None  # KV cache pool in positions, shared by the running jobs (None: n_ctx)
    prefix_cache: bool = True  # jobs sharing a prompt prefix reuse its KV cache blocks
    cuda_graphs: bool = True  # replay the decode step from CUDA graphs (CUDA devices only)
    warm_up: bool = True  # compile kernels and capture graphs before serving (CUDA devices only)
    max_tokens_out: int = 2048
    inference_timeout_s: float = 300.0
    n_ctx: int | None = None  # serving context length (None: the model's)
    residency_interval_s: float = 60.0
    shutdown_grace_s: float = 25.0  # after this, jobs still running at shutdown are cancelled
    log_prompts: bool = False
    synthetic: bool = False
    retry_after_s: int = 1


@dataclass(frozen=True)
class Event:
    kind: str  # started | token | metrics | end | error
    data: dict[str, Any]


@dataclass
class Job:
    """One request from admission to its terminal event."""

    job_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_strings: list[str]
    seed: int
    prompt: str = ""  # kept for logging when --log-prompts
    api: str = "worker"
    loop: asyncio.AbstractEventLoop | None = None
    state: str = "new"  # new | queued | running | done
    cancel: tuple[str, str, bool | None] | None = None  # (code, message, retriable): client, disconnect, shutdown
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    tokens_out: int = 0
    # Events cross from the engine thread to the loop through a deque; the loop is woken at most once per batch
    # (one call_soon_threadsafe, so one self-pipe write, however many tokens arrived meanwhile).
    _pending: deque[Event] = field(default_factory=deque, repr=False)
    _ready: asyncio.Event | None = field(default=None, repr=False)
    _wake_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _wake_scheduled: bool = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._ready = asyncio.Event()

    def post(self, kind: str, data: dict[str, Any]) -> None:
        """Hand an event to the job's consumer; safe from any thread."""
        if self.loop is None:
            return
        self._pending.append(Event(kind, data))
        with self._wake_lock:
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _wake(self) -> None:
        with self._wake_lock:
            self._wake_scheduled = False
        assert self._ready is not None
        self._ready.set()

    async def next_events(self, timeout: float) -> list[Event]:
        """Every event posted since the last call, waiting up to ``timeout`` seconds for one (then ``[]``)."""
        assert self._ready is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A wake-up scheduled by a post whose event an earlier call already took can set the flag with nothing
        # pending: wait again until there is an event or the time is up.
        while not self._pending:
            self._ready.clear()
            if self._pending:  # checked again after the clear: a post in between has set it anew
                break
            left = deadline - loop.time()
            if left <= 0:
                return []
            try:
                await asyncio.wait_for(self._ready.wait(), left)
            except TimeoutError:
                return []
        out = []
        while self._pending:
            out.append(self._pending.popleft())
        return out

    @property
    def done(self) -> bool:
        return self.state == "done"


class Worker:
    """Owns the model, the engine and the engine thread. Build it with ``Worker.create``."""

    def __init__(self, loaded: Any, engine: Any, plugins: Any, device: torch.device, config: WorkerConfig) -> None:
        self.loaded = loaded
        self.engine = engine
        self.plugins = plugins
        self.device = device
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.n_ctx = int(getattr(engine, "n_ctx", None) or config.n_ctx or loaded.config.context_length)
        self.started_at = time.time()
        self._t0 = time.monotonic()

        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: dict[str, Job] = {}
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._engine_loop, name="orcd-engine", daemon=True)
        self._residency_stop = threading.Event()
        self._residency_thread: threading.Thread | None = None

        # cached health state: written by the engine thread / residency checker, read by /health
        self.healthy = True
        self.unhealthy_reason: str | None = None
        self.last_residency_check: float | None = None
        self.residency = devmem.Residency.snapshot(loaded.module, device)
        self.weights_bytes = devmem.module_bytes(loaded.module)
        cache = getattr(engine, "cache", None)
        self.kv_cache_bytes = int(getattr(cache, "nbytes", 0) or 0)
        self.baseline_allocated = devmem.allocated_bytes(device)
        self.vram_bytes = int(self._measure_vram())

        self.metrics = ServerMetrics(
            vram_bytes=self._measure_vram,
            queue_length=lambda: len(self._queue),
            running_jobs=lambda: len(self._running),
            healthy=lambda: 1.0 if self.healthy else 0.0,
            prefix_cache=self._prefix_cache_stats,
        )
        self._metrics_plugin_name = f"orcd.server.metrics.{id(self)}"
        plugins.register(self.metrics.plugin, name=self._metrics_plugin_name)

    @classmethod
    def create(cls, loaded: Any, plugins: Any, device: torch.device, config: WorkerConfig) -> Worker:
        from orcd.engine import Engine

        n_ctx = config.n_ctx or loaded.config.context_length
        # By default the pool holds one full context (what the memory check before loading counts); running jobs
        # share it, each promised the blocks of its prompt plus max_tokens.
        engine = Engine(loaded, plugins, max_batch=config.max_batch, n_ctx=n_ctx,
                        kv_cache_tokens=config.kv_cache_tokens or n_ctx, prefix_cache=config.prefix_cache,
                        cuda_graphs=config.cuda_graphs)
        if config.warm_up and engine.device.type == "cuda":
            log.info("warming up: compiling kernels, capturing the decode step of up to %d jobs", config.max_batch)
            log.info("warmed up in %.1f s", engine.warm_up())
        return cls(loaded, engine, plugins, device, config)

    # --- life cycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if self.config.residency_interval_s > 0:
            self._residency_thread = threading.Thread(target=self._residency_loop, name="orcd-residency", daemon=True)
            self._residency_thread.start()

    def begin_shutdown(self) -> None:
        """Refuse new jobs from now on; queued and running ones go on."""
        with self._cond:
            if self._accepting:
                log.info("shutting down: no new jobs; %d running, %d queued", len(self._running), len(self._queue))
            self._accepting = False
            self._cond.notify_all()

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until no job is queued or running; after ``timeout_s`` cancel what is left. True when all
        finished on their own."""
        timeout_s = self.config.shutdown_grace_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.05))
            clean = not (self._queue or self._running)
        if not clean:
            for job_id in self.job_ids():
                self.cancel(job_id, "CANCELLED", "the worker is shutting down; retry on another worker", retriable=True)
            with self._cond:
                self._cond.wait_for(lambda: not (self._queue or self._running), timeout=2.0)
        return clean

    def close(self) -> None:
        """Stop the engine thread, unregister the metrics hooks and free the model's memory. Jobs still queued or
        running (after a forced exit; a graceful one has drained them) end with a retriable CANCELLED."""
        if self.engine is None:  # closed already
            return
        self.begin_shutdown()
        for job_id in self.job_ids():
            self.cancel(job_id, "CANCELLED", "the worker stopped; retry on another worker", retriable=True)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._residency_stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._residency_thread is not None:
            self._residency_thread.join(timeout=2)
        if self._metrics_plugin_name in self.plugins.info:  # the manager may outlive this worker (tests share one)
            self.plugins.unregister(self._metrics_plugin_name)
        self.engine = None
        self.loaded = None
        devmem.release_cached(self.device)
        log.info("worker closed; model memory released")

    @property
    def accepting(self) -> bool:
        return self._accepting and self.healthy

    @property
    def state(self) -> str:
        if not self._accepting:
            return "draining"
        return "busy" if self._running or self._queue else "idle"

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def running_jobs(self) -> int:
        return len(self._running)

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._t0

    def job_ids(self) -> list[str]:
        with self._cond:
            return [j.job_id for j in self._queue] + list(self._running)

    # --- jobs --------------------------------------------------------------------------------------------------------
    def make_job(
        self,
        job_id: str,
        prompt: str | list[int],
        max_tokens: int,
        sampling: dict[str, Any],
        stop: list[str],
        api: str = "worker",
    ) -> Job:
        """Tokenize and check a request; raise ``InvalidRequest`` naming the field at fault."""
        if isinstance(prompt, str):
            prompt_ids = self.encode_prompt(prompt)
        else:
            prompt_ids = list(prompt)
        if not prompt_ids:
            raise InvalidRequest("the prompt encodes to no token", field="prompt")
        if len(prompt_ids) >= self.n_ctx:
            raise InvalidRequest(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.n_ctx} "
                "(prompt and generated tokens together); shorten the prompt",
                field="prompt",
            )
        if max_tokens > self.config.max_tokens_out:
            raise InvalidRequest(
                f"max_tokens is {max_tokens} but this worker allows at most {self.config.max_tokens_out}",
                field="max_tokens",
            )
        # generation stops at the end of the context: what does not fit is cut, reported as max_tokens
        room = self.n_ctx - len(prompt_ids)
        self._check_cache_room(len(prompt_ids), min(max_tokens, room))
        seed = sampling.get("seed")
        if seed is None:
            seed = secrets.randbits(64)
        params = SamplingParams(**{**sampling, "seed": int(seed)})
        return Job(
            job_id=job_id,
            prompt_ids=prompt_ids,
            max_tokens=min(max_tokens, room),
            sampling=params,
            stop_strings=list(stop),
            seed=int(seed),
            prompt=prompt if isinstance(prompt, str) else "",
            api=api,
        )

    def _check_cache_room(self, n_prompt: int, max_tokens: int) -> None:
        """Refuse a job the KV cache could never hold, even alone (the cache is smaller than the context)."""
        engine = self.engine
        if engine is None or not hasattr(engine, "blocks_needed"):
            return
        need, pool = engine.blocks_needed(n_prompt, max_tokens), engine.cache.n_blocks
        if need > pool:
            raise InvalidRequest(
                f"the prompt ({n_prompt} tokens) and max_tokens {max_tokens} need {need} KV cache blocks but the "
                f"cache holds {pool} (--kv-cache-size-mb); lower max_tokens or shorten the prompt",
                field="max_tokens",
            )

    def _prefix_cache_stats(self) -> tuple[int, int]:
        engine = self.engine
        stats = getattr(engine, "prefix_cache_stats", None) if engine is not None else None
        return stats if stats is not None else (0, 0)

    def _admissible(self, queue: deque[Job], taken: int) -> list[Job]:
        """Queued jobs (from the head, in order) the engine can take now: places left in the batch, and KV cache
        blocks it can promise (counted without prefix hits, so never more than it will need)."""
        places = self.config.max_batch - taken
        blocks = getattr(self.engine, "blocks_available", None)
        room = blocks() if blocks is not None else None
        out: list[Job] = []
        for job in queue:
            if len(out) >= places:
                break
            if room is not None:
                need = self.engine.blocks_needed(len(job.prompt_ids), job.max_tokens)
                never_fits = need > self.engine.cache.n_blocks  # handed over when alone: the engine refuses it
                if need > room and (out or taken or not never_fits):
                    break  # it waits for running jobs to give blocks back
                room -= need
            out.append(job)
        return out

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt. Special-token text (``<|im_start|>``, ...) is parsed as the special token, as
        llama.cpp's server does, so a prompt already formatted with the chat template works as intended."""
        return list(self.tokenizer.encode(text))

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        """Queue a job (its events will arrive on ``loop``); raises ``QueueFull``, ``NotAccepting`` or
        ``DuplicateJob``."""
        job.bind(loop)
        with self._cond:
            if not self.accepting:
                why = "the worker is shutting down" if not self._accepting else f"unhealthy: {self.unhealthy_reason}"
                self.metrics.rejected.labels(reason="unavailable").inc()
                raise NotAccepting(f"this worker takes no new jobs ({why})")
            if job.job_id in self._running or any(j.job_id == job.job_id for j in self._queue):
                raise DuplicateJob(f"job {job.job_id!r} is already queued or running", field="job_id")
            if len(self._queue) >= self.config.max_queue:
                self.metrics.rejected.labels(reason="queue_full").inc()
                raise QueueFull(
                    f"the queue is full ({len(self._queue)} jobs waiting, {len(self._running)} running); retry later"
                )
            job.state = "queued"
            self._queue.append(job)
            self._cond.notify_all()
        log.info("job queued", extra=self._job_fields(job, queue_length=len(self._queue)))

    def cancel(self, job_id: str, code: str = "CANCELLED", message: str = "cancelled by the client",
               retriable: bool | None = None) -> bool:
        """End a queued or running job with error ``code``; True if it was found. Idempotent."""
        with self._cond:
            queued = next((j for j in self._queue if j.job_id == job_id), None)
            if queued is not None:
                self._queue.remove(queued)
                self._cond.notify_all()
            else:
                running = self._running.get(job_id)
                if running is None:
                    return False
                if running.cancel is None:
                    running.cancel = (code, message, retriable)
                    self._cond.notify_all()
                return True
        self._finish_error(queued, code, message, retriable)
        return True

    # --- the engine thread -------------------------------------------------------------------------------------------
    def _engine_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    # (the engine may still hold sequences this worker already ended: step until it lets go)
                    while not (self._queue or self._running or self._stop or self.engine.has_work()):
                        self._cond.wait()
                    if self._stop and not self._running:
                        for job in list(self._queue):
                            self._queue.remove(job)
                            self._finish_error(job, "CANCELLED", "the worker stopped", True)
                        self._cond.notify_all()
                        return
                    to_cancel = [j for j in self._running.values() if j.cancel is not None]
                    now = time.monotonic()
                    timed_out = [
                        j for j in self._running.values()
                        if j.cancel is None and j.started is not None
                        and now - j.started > self.config.inference_timeout_s
                    ]
                    admit = self._admissible(self._queue, len(self._running))
                    for job in admit:
                        self._queue.popleft()
                        job.state = "running"
                        self._running[job.job_id] = job
                for job in to_cancel:
                    code, message, retriable = job.cancel
                    self._abort(job, code, message, retriable)
                for job in timed_out:
                    self._abort(job, InferenceTimeout.code,
                                f"the job ran longer than the inference timeout ({self.config.inference_timeout_s:g} s)",
                                True)
                for job in admit:
                    self._start(job)
                # also step when only cancelled sequences are left in the engine: the step releases their cache
                if self._running or self.engine.has_work():
                    self._step()
        except BaseException as exc:
            log.exception("the engine thread failed")
            self._mark_unhealthy(f"the engine thread failed: {type(exc).__name__}: {exc}")
            with self._cond:
                jobs = list(self._queue) + list(self._running.values())
                self._queue.clear()
                self._running.clear()
                self._cond.notify_all()
            for job in jobs:
                self._finish_error(job, "INTERNAL", f"the engine thread failed: {type(exc).__name__}", True)

    def _start(self, job: Job) -> None:
        from orcd.engine import GenerationRequest

        job.started = time.monotonic()
        job.post("started", {
            "job_id": job.job_id,
            "model": self.config.model_id,
            "started_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        })
        request = GenerationRequest(
            request_id=job.job_id,
            prompt_ids=job.prompt_ids,
            max_tokens=job.max_tokens,
            sampling=job.sampling,
            stop_strings=job.stop_strings,
            stop_token_ids=None,  # the model's end-of-generation tokens (EOS, end of turn)
        )
        try:
            devmem.guarded(lambda: self.engine.add_request(request), self.device, f"job {job.job_id!r}")
        except OrcdError as err:
            self._drop(job)
            self._finish_error(job, err.code, err.message, err.retriable)
            self._after_error(err)
        else:
            log.info("job started", extra=self._job_fields(job, prompt_tokens=len(job.prompt_ids),
                                                            queue_time_ms=round((job.started - job.created) * 1000, 1)))

    def _step(self) -> None:
        try:
            events = devmem.guarded(self.engine.step, self.device, "the decode step")
        except OrcdError as err:
            # the failed step belongs to every job in it: end them all, free their caches, keep serving
            with self._cond:
                jobs = list(self._running.values())
            for job in jobs:
                self._drop(job)
            self._flush_engine()
            self._after_error(err)
            for job in jobs:
                self._finish_error(job, err.code, err.message, err.retriable)
            return
        for ev in events:
            job = self._running.get(ev.request_id)
            if job is None:  # already ended here (cancelled); the engine's late word on it is not news
                continue
            if hasattr(ev, "token_id"):
                job.tokens_out += 1
                job.post("token", {"t": ev.text, "i": ev.index})
            else:
                self._finish(job, ev)

    def _flush_engine(self) -> None:
        """One step for the engine to end the sequences this worker dropped and release their KV cache slots
        (every running job was dropped, so the step has nothing else to do)."""
        try:
            devmem.guarded(self.engine.step, self.device, "releasing failed jobs")
        except OrcdError as err:
            log.error("the engine could not release failed jobs: %s", err.message)
            self._mark_unhealthy(f"the engine could not release failed jobs: {err.message}")

    def _finish(self, job: Job, ev: Any) -> None:
        """The engine ended ``job`` (``ev`` is its ``FinishEvent``)."""
        with self._cond:
            self._running.pop(job.job_id, None)
            job.state = "done"
            self._cond.notify_all()
        reason = ev.reason
        # Counted, logged and measured before the terminal event is posted: a client that reads /metrics, the
        # log or /health right after its stream ended sees its job there.
        if reason in FINISH_REASONS:
            ttft = ev.time_to_first_token_s
            ttft_ms = None if ttft is None else round(ttft * 1000, 3)
            rate = _rate(ev.completion_tokens, ev.decode_time_s)
            self.metrics.requests.labels(outcome=reason).inc()
            log.info("job finished", extra=self._job_fields(
                job, stop_reason=reason, prompt_tokens=ev.prompt_tokens, tokens_out=ev.completion_tokens,
                time_to_first_token_ms=ttft_ms, decode_tokens_per_s=rate))
            self._refresh_vram()
            job.post("metrics", {
                "prompt_tokens": ev.prompt_tokens,
                "tokens_out": ev.completion_tokens,
                "time_to_first_token_ms": ttft_ms,
                "decode_tokens_per_s": rate,
                "queue_time_ms": round(((job.started or job.created) - job.created) * 1000, 3),
            })
            job.post("end", {"tokens_out": ev.completion_tokens,
                             "decode_time_ms": round(float(ev.decode_time_s or 0.0) * 1000, 3),
                             "stop_reason": reason, "seed": job.seed})
        else:
            err = ev.error if isinstance(ev.error, OrcdError) else None
            message = err.message if err else str(ev.error or reason)
            retriable = err.retriable if err else reason in (VramOOM.code, InferenceTimeout.code)
            if reason == VramOOM.code:  # free the failed job's memory before anyone hears it ended
                if ev.error is not None:  # its traceback and context hold the frames (and tensors) of the forward
                    ev.error.__context__ = ev.error.__cause__ = None
                    ev.error.__traceback__ = None
                devmem.release_cached(self.device)  # gc.collect() breaks the frame ↔ exception cycles too
            self._refresh_vram()
            self._post_error(job, reason, message, retriable)

    def _abort(self, job: Job, code: str, message: str, retriable: bool | None) -> None:
        """End a running job from the worker's side (cancel, timeout, failed step)."""
        self._drop(job)
        self._finish_error(job, code, message, retriable)

    def _drop(self, job: Job) -> None:
        try:
            self.engine.cancel(job.job_id)
        except Exception:
            log.exception("engine.cancel(%r) failed", job.job_id)
        with self._cond:
            self._running.pop(job.job_id, None)
            self._cond.notify_all()

    def _finish_error(self, job: Job, code: str, message: str, retriable: bool | None) -> None:
        with self._cond:
            if job.done:
                return
            job.state = "done"
            self._cond.notify_all()
        self._post_error(job, code, message, retriable)

    def _post_error(self, job: Job, code: str, message: str, retriable: bool | None) -> None:
        job.state = "done"
        if retriable is None:
            retriable = _default_retriable(code)
        self.metrics.requests.labels(outcome=code).inc()
        level = logging.INFO if code == Cancelled.code else logging.WARNING
        log.log(level, "job failed", extra=self._job_fields(job, code=code, error=message, tokens_out=job.tokens_out))
        job.post("error", {"code": code, "message": message, "retriable": retriable})

    def _after_error(self, err: OrcdError) -> None:
        if err.code == "CUDA_ERROR":  # the CUDA context may be unusable: stop taking jobs until restarted
            self._mark_unhealthy(err.message)
        self._refresh_vram()

    # --- health --------------------------------------------------------------------------------------------------------
    def _measure_vram(self) -> float:
        """CUDA: what PyTorch has allocated on the device (weights, KV cache, anything a job holds). CPU: the
        model's tensors and the KV cache, which is what a GPU would hold at rest."""
        allocated = devmem.allocated_bytes(self.device)
        return float(allocated if allocated is not None else self.weights_bytes + self.kv_cache_bytes)

    def _refresh_vram(self) -> None:
        self.vram_bytes = int(self._measure_vram())

    def _mark_unhealthy(self, reason: str) -> None:
        if self.healthy:
            log.error("worker unhealthy: %s", reason)
        self.healthy = False
        self.unhealthy_reason = reason

    def check_residency(self) -> list[str]:
        """Compare where the weights are with where they were loaded; mark the worker unhealthy if they moved."""
        model = self.loaded.module if self.loaded is not None else None
        if model is None:
            return []
        problems = self.residency.check(model)
        self.last_residency_check = time.time()
        if problems:
            shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
            self._mark_unhealthy(f"weights are no longer where they were loaded: {shown}")
        return problems

    def _residency_loop(self) -> None:
        while not self._residency_stop.wait(self.config.residency_interval_s):
            try:
                self.check_residency()
            except Exception:
                log.exception("residency check failed")

    def health(self) -> dict[str, Any]:
        return {
            "status": "healthy" if self.healthy else "unhealthy",
            "model": self.config.model_id,
            "quant_kind": self.quant_kind,
            "vram_bytes": self.vram_bytes,
            "uptime_seconds": round(self.uptime_s, 3),
            "worker_id": self.config.worker_id,
            "device": str(self.device),
            "synthetic": self.config.synthetic,
            "state": self.state,
            "accepting_jobs": self.accepting,
            "queue_length": len(self._queue),
            "running_jobs": len(self._running),
            "context_length": self.n_ctx,
            "model_path": self.model_path,
            "reason": self.unhealthy_reason,
            "last_residency_check": self.last_residency_check,
        }

    @property
    def quant_kind(self) -> str:
        return _quant_kind(self.loaded)

    @property
    def model_path(self) -> str:
        return str(getattr(getattr(self.loaded, "model_file", None), "path", ""))

    def _job_fields(self, job: Job, **more: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"job_id": job.job_id, "api": job.api}
        if self.config.log_prompts and job.prompt:
            fields["prompt"] = job.prompt
        fields.update(more)
        return fields


def _quant_kind(loaded: Any) -> str:
    model_file = getattr(loaded, "model_file", None)
    name = getattr(model_file, "file_type_name", None) if model_file is not None else None
    return str(name or "unknown")


def _rate(tokens: int, seconds: float | None) -> float | None:
    if not seconds or tokens <= 1:
        return None
    return round((tokens - 1) / seconds, 2) if seconds > 0 else None


def _default_retriable(code: str) -> bool:
    return code in (VramOOM.code, InferenceTimeout.code, "QUEUE_FULL", "UNAVAILABLE")
