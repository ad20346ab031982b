"""The engine: admits requests, prefills their prompts, and advances every active sequence by one token per step.

``step()`` is the whole scheduler. It (1) ends the sequences whose cancellation arrived, (2) admits waiting
requests while KV cache slots are free and prefills each prompt except its last token, (3) runs one batched
forward over every active sequence, each feeding its latest token (the last prompt token for a sequence admitted
in this step, else the token sampled in the previous step) at its own position and cache slot, and (4) samples
one token per sequence and applies the stop rules. So a new sequence's first token comes from the same batched
forward as everyone else's next token, and each step yields exactly one token per active sequence.

Every sampled token is reported as a ``TokenEvent`` (also the end-of-generation token, whose text is empty), so
``completion_tokens`` counts the token events. Text is released as valid UTF-8 and never contains a stop string.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, Field

from orcd.engine.kv_cache import KVCache
from orcd.engine.stops import StopStrings
from orcd.errors import Cancelled, InvalidRequest, OrcdError, VramOOM
from orcd.metrics import RequestFinished, RequestStarted, TokenProduced
from orcd.nn.batch import ForwardBatch
from orcd.sampling import SamplerChain, SamplingParams

if TYPE_CHECKING:
    from orcd.loader import LoadedModel
    from orcd.plugins import OrcdPluginManager

log = logging.getLogger(__name__)

# Prompts are prefilled in chunks of at most this many tokens, bounding the attention scores' memory.
PREFILL_CHUNK = 512


class GenerationRequest(BaseModel):
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    stop_strings: list[str] = []
    stop_token_ids: set[int] | None = None  # None: the model's end-of-generation tokens (EOS, end of turn)


@dataclass
class TokenEvent:
    request_id: str
    index: int  # 0 for the first generated token
    token_id: int
    text: str  # newly completed valid UTF-8 (may be empty)


@dataclass
class FinishEvent:
    request_id: str
    reason: str  # eos | max_tokens | stop_sequence | an orcd error code (CANCELLED, VRAM_OOM, ...)
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None
    decode_time_s: float | None  # from the first token to the last
    error: OrcdError | None
    seed: int | None  # the seed the sampler used (drawn when the request gave none); None for greedy


Event = TokenEvent | FinishEvent


class Sequence:
    """One request being served: its tokens, cache slot, sampler, text stream and timings."""

    def __init__(self, req: GenerationRequest, seed: int | None, stop_ids: set[int], decoder: Any) -> None:
        self.request = req
        self.request_id = req.request_id
        self.tokens: list[int] = list(req.prompt_ids)
        self.n_prompt = len(req.prompt_ids)
        self.seed = seed
        self.stop_ids = stop_ids
        self.decoder = decoder
        self.stops = StopStrings(req.stop_strings)
        self.slot: int | None = None
        self.sampler: SamplerChain | None = None
        self.history: torch.Tensor | None = None  # prompt + generated ids on the device, for penalties
        self.added_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    def finish_event(self, reason: str, error: OrcdError | None = None) -> FinishEvent:
        now = time.perf_counter()
        ttft = None if self.first_token_at is None else self.first_token_at - self.added_at
        decode = None if self.first_token_at is None else (self.last_token_at or now) - self.first_token_at
        return FinishEvent(self.request_id, reason, self.n_prompt, self.n_generated, ttft, decode, error, self.seed)


class Engine:
    def __init__(
        self, loaded: "LoadedModel", plugins: "OrcdPluginManager", max_batch: int = 1, n_ctx: int | None = None
    ) -> None:
        if max_batch < 1:
            raise InvalidRequest(f"max_batch must be at least 1, got {max_batch}", field="max_batch")
        config = loaded.config
        if n_ctx is not None and not 1 <= n_ctx <= config.context_length:
            raise InvalidRequest(
                f"n_ctx {n_ctx} must be between 1 and the model's context length {config.context_length}",
                field="n_ctx",
            )
        self.loaded = loaded
        self.plugins = plugins
        self.model = loaded.module
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.max_batch = max_batch
        self.n_ctx = n_ctx or config.context_length
        if hasattr(self.model, "set_context_length"):
            self.model.set_context_length(self.n_ctx)
        self.cache = KVCache.for_model(config, max_batch, self.n_ctx, self.device)
        self.vocab_size = config.vocab_size
        self.default_stop_ids = set(self.tokenizer.eot_ids) if self.tokenizer is not None else set()
        self._factories = plugins.sampler_factories()
        self._lock = threading.Lock()  # add_request and cancel may come from other threads than step
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._cancel: set[str] = set()

    # --- public API ----------------------------------------------------------------------------------------------
    def add_request(self, req: GenerationRequest) -> None:
        """Validate ``req`` and queue it; it joins the running batch at the next step with a free slot."""
        self._validate(req)
        seed = None
        if req.sampling.temperature > 0.0:
            seed = req.sampling.seed if req.sampling.seed is not None else random.randrange(2**63)
        stop_ids = req.stop_token_ids if req.stop_token_ids is not None else self.default_stop_ids
        decoder = None
        if self.tokenizer is not None:  # the generated text continues the prompt (no start-of-text space rule)
            decoder = self.tokenizer.stream_decoder(skip_special=True, context=req.prompt_ids)
        seq = Sequence(req, seed, set(stop_ids), decoder)
        with self._lock:
            if any(s.request_id == req.request_id for s in (*self._waiting, *self._active)):
                raise InvalidRequest(f"request id {req.request_id!r} is already in use", field="request_id")
            self._waiting.append(seq)

    def cancel(self, request_id: str) -> bool:
        """Ask to end ``request_id``; at the next step it finishes with reason ``CANCELLED``. False if unknown."""
        with self._lock:
            known = any(s.request_id == request_id for s in (*self._waiting, *self._active))
            if known:
                self._cancel.add(request_id)
            return known

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._active)

    def step(self) -> list[Event]:
        """Apply cancellations, admit and prefill waiting requests, then one batched forward that advances every
        active sequence by one token. A failed forward (``OrcdError``, e.g. ``VRAM_OOM``) ends the sequences in
        it with that error and frees their slots; the engine keeps serving."""
        events: list[Event] = []
        self._apply_cancellations(events)
        self._admit(events)
        if self._active:
            try:
                logits = self._forward_last_tokens(self._active)
            except OrcdError as e:
                self._fail(list(self._active), e, events)
                return events
            for row, seq in enumerate(list(self._active)):
                self._sample_and_emit(seq, logits[row], events)
        return events

    def generate(self, req: GenerationRequest) -> Iterator[Event]:
        """Run one request to its end, yielding its events (other requests' events are dropped)."""
        self.add_request(req)
        while True:
            for event in self.step():
                if event.request_id != req.request_id:
                    continue
                yield event
                if isinstance(event, FinishEvent):
                    return

    # --- admission and prefill -----------------------------------------------------------------------------------
    def _validate(self, req: GenerationRequest) -> None:
        n = len(req.prompt_ids)
        if n == 0:
            raise InvalidRequest("prompt_ids is empty; a prompt needs at least one token", field="prompt_ids")
        if n > self.n_ctx:
            raise InvalidRequest(f"prompt_ids has {n} tokens, more than the context of {self.n_ctx}",
                                 field="prompt_ids")
        bad = next((t for t in req.prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"prompt_ids holds token id {bad}, outside the vocabulary (0..{self.vocab_size - 1})",
                                 field="prompt_ids")
        if req.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {req.max_tokens}", field="max_tokens")

    def _admit(self, events: list[Event]) -> None:
        while self.cache.free_slots:
            with self._lock:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
            seq.slot = self.cache.allocate()
            self._active.append(seq)  # from here on, _finish releases the slot whatever fails
            try:
                seq.sampler = SamplerChain(self._factories,
                                           seq.request.sampling.model_copy(update={"seed": seq.seed}), self.device)
                seq.history = torch.zeros(self.n_ctx + 1, dtype=torch.long, device=self.device)
                seq.history[: seq.n_prompt] = torch.tensor(seq.tokens, dtype=torch.long)
                self._hook("request_started", RequestStarted(seq.request_id, seq.n_prompt, time.time()))
                self._prefill(seq)
            except torch.cuda.OutOfMemoryError as e:
                self._fail([seq], VramOOM(f"the GPU ran out of memory admitting request {seq.request_id!r}: {e}"),
                           events)
            except OrcdError as e:
                self._fail([seq], e, events)

    def _prefill(self, seq: Sequence) -> None:
        """Write all prompt tokens but the last into the cache (the last one goes through the batched step)."""
        prompt = seq.tokens[: seq.n_prompt - 1]
        for start in range(0, len(prompt), PREFILL_CHUNK):
            chunk = prompt[start : start + PREFILL_CHUNK]
            tokens = torch.tensor([chunk], dtype=torch.long, device=self.device)
            positions = torch.arange(start, start + len(chunk), device=self.device).unsqueeze(0)
            batch = ForwardBatch(tokens, positions, self.cache, [seq.slot], kv_length=start + len(chunk),
                                 starts=[start])
            self._run(batch)

    # --- the batched step ----------------------------------------------------------------------------------------
    def _forward_last_tokens(self, seqs: list[Sequence]) -> torch.Tensor:
        last = [seq.tokens[-1] for seq in seqs]
        pos = [len(seq.tokens) - 1 for seq in seqs]
        tokens = torch.tensor(last, dtype=torch.long, device=self.device).unsqueeze(1)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device).unsqueeze(1)
        batch = ForwardBatch(tokens, positions, self.cache, [seq.slot for seq in seqs], kv_length=max(pos) + 1,
                             starts=pos)
        return self._run(batch)

    def _run(self, batch: ForwardBatch) -> torch.Tensor:
        try:
            return self.model(batch)
        except torch.cuda.OutOfMemoryError as e:
            raise VramOOM(f"the GPU ran out of memory in a forward over {batch.tokens.shape[0]} sequence(s) of "
                          f"{batch.tokens.shape[1]} token(s): {e}") from None

    def _sample_and_emit(self, seq: Sequence, logits: torch.Tensor, events: list[Event]) -> None:
        assert seq.sampler is not None and seq.history is not None
        n = len(seq.tokens)
        token = seq.sampler.sample(logits[: self.vocab_size], seq.history[:n])
        seq.tokens.append(token)
        seq.history[n] = token
        now = time.perf_counter()
        since = now - (seq.last_token_at if seq.last_token_at is not None else seq.added_at)
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.last_token_at = now
        index = seq.n_generated - 1
        self._hook("token_produced", TokenProduced(seq.request_id, index, token, since))

        reason = None
        if token in seq.stop_ids:
            text, stopped = self._flush_text(seq)
            reason = "stop_sequence" if stopped else "eos"
        else:
            piece = seq.decoder.feed(token) if seq.decoder is not None else ""
            text, stopped = seq.stops.push(piece)
            if stopped:
                reason = "stop_sequence"
            elif seq.n_generated >= seq.request.max_tokens or len(seq.tokens) >= self.n_ctx + 1:
                # max_tokens, or the context is full: the next token would have no position to go to.
                tail, stopped = self._flush_text(seq)
                text, reason = text + tail, "stop_sequence" if stopped else "max_tokens"
        events.append(TokenEvent(seq.request_id, index, token, text))
        if reason is not None:
            self._finish(seq, reason, None, events)

    def _flush_text(self, seq: Sequence) -> tuple[str, bool]:
        """Release what the decoder and the stop-string filter hold, at the end of a sequence."""
        tail = seq.decoder.flush() if seq.decoder is not None else ""
        text, stopped = seq.stops.push(tail)
        return (text, True) if stopped else (text + seq.stops.flush(), False)

    # --- endings -------------------------------------------------------------------------------------------------
    def _apply_cancellations(self, events: list[Event]) -> None:
        with self._lock:
            cancel, self._cancel = self._cancel, set()
            waiting = [s for s in self._waiting if s.request_id in cancel]
            self._waiting = deque(s for s in self._waiting if s.request_id not in cancel)
        for seq in waiting + [s for s in self._active if s.request_id in cancel]:
            self._finish(seq, Cancelled.code, Cancelled(f"request {seq.request_id!r} was cancelled"), events)

    def _fail(self, seqs: list[Sequence], error: OrcdError, events: list[Event]) -> None:
        log.warning("requests %s failed: %s", [s.request_id for s in seqs], error.message)
        for seq in seqs:
            self._finish(seq, error.code, error, events)

    def _finish(self, seq: Sequence, reason: str, error: OrcdError | None, events: list[Event]) -> None:
        if seq in self._active:
            self._active.remove(seq)
        if seq.slot is not None:
            self.cache.release(seq.slot)
            seq.slot = None
        event = seq.finish_event(reason, error)
        events.append(event)
        tps = None
        if event.decode_time_s and event.completion_tokens > 1:
            tps = (event.completion_tokens - 1) / event.decode_time_s
        self._hook("request_finished", RequestFinished(seq.request_id, reason, event.prompt_tokens,
                                                        event.completion_tokens, event.time_to_first_token_s, tps))

    def _hook(self, name: str, event: object) -> None:
        """Call every plugin's implementation on its own: one that raises is logged and the others still run
        (a single pluggy call would stop at the first exception)."""
        for impl in getattr(self.plugins.hook, name).get_hookimpls():
            try:
                impl.function(event=event)
            except Exception:
                log.exception("metrics hook %s of plugin %r raised", name, impl.plugin_name)
