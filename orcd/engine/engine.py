"""The engine: admits requests, prefills their prompts, and advances every active sequence by one token per step.

``step()`` is the whole scheduler (continuous batching). It (1) ends the sequences whose cancellation arrived,
(2) admits waiting requests, first come first served, while fewer than ``max_batch`` run and the paged KV cache
can promise each one the blocks of its prompt plus ``max_tokens`` (so no sequence runs out mid-decode; a request
that could never fit is refused when added), reuses the cached blocks of a prompt prefix seen before and prefills
the rest of each prompt except its last token, (3) runs one batched forward over every active sequence, each
feeding its latest token (the last prompt token for a sequence admitted in this step, else the token sampled in
the previous step) at its own position, and (4) samples one token per sequence and applies the stop rules. So a
new sequence's first token comes from the same batched forward as everyone else's next token, and each step
yields exactly one token per active sequence.

The batched forward runs eagerly, or with ``cuda_graphs`` on a CUDA device through ``StaticDecode``: bucketed
fixed shapes replayed from CUDA graphs. The eager step is the oracle the graphs are tested against.

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

from orcd.device import to_orcd_error
from orcd.engine.graphs import StaticDecode
from orcd.engine.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache
from orcd.engine.stops import StopStrings
from orcd.errors import Cancelled, CudaError, InvalidRequest, OrcdError, VramOOM
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
    """One request being served: its tokens, KV cache blocks (by ``seq_id``), sampler, text stream and timings."""

    def __init__(self, req: GenerationRequest, seq_id: int, seed: int | None, stop_ids: set[int],
                 decoder: Any) -> None:
        self.request = req
        self.request_id = req.request_id
        self.seq_id = seq_id
        self.tokens: list[int] = list(req.prompt_ids)
        self.n_prompt = len(req.prompt_ids)
        self.seed = seed
        self.stop_ids = stop_ids
        self.decoder = decoder
        self.stops = StopStrings(req.stop_strings)
        self.holds_cache = False  # True from admission until its blocks are released
        self.cached_prompt_tokens = 0  # leading prompt tokens whose keys and values came from the prefix cache
        self.sampler: SamplerChain | None = None
        self.history: torch.Tensor | None = None  # prompt + generated ids on the device, for samplers (not greedy)
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
    """Continuous batching over a paged KV cache.

    ``max_batch``: sequences decoded at once. ``n_ctx``: positions one sequence may use (default: the model's
    context). ``kv_cache_tokens``: positions the KV cache pool holds across all sequences (default ``max_batch *
    n_ctx``, every sequence its whole context); requests wait while it cannot promise their blocks.
    ``prefix_cache``: reuse the blocks of prompt prefixes seen before. ``cuda_graphs``: replay the decode step
    from CUDA graphs on a CUDA device (ignored elsewhere). ``static_shapes``: run the decode step at the graphs'
    bucketed fixed shapes even without graphs (what the CPU tests check against the eager step). ``overlap``
    (default: on CUDA): while a step's greedy tokens are read on the host, the next step already runs on the device
    (see ``step``).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        plugins: OrcdPluginManager,
        max_batch: int = 1,
        n_ctx: int | None = None,
        *,
        kv_cache_tokens: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        prefix_cache: bool = True,
        cuda_graphs: bool = False,
        static_shapes: bool = False,
        overlap: bool | None = None,
    ) -> None:
        if max_batch < 1:
            raise InvalidRequest(f"max_batch must be at least 1, got {max_batch}", field="max_batch")
        config = loaded.config
        if n_ctx is not None and not 1 <= n_ctx <= config.context_length:
            raise InvalidRequest(
                f"n_ctx {n_ctx} must be between 1 and the model's context length {config.context_length}",
                field="n_ctx",
            )
        if kv_cache_tokens is not None and kv_cache_tokens < 1:
            raise InvalidRequest(f"kv_cache_tokens must be at least 1, got {kv_cache_tokens}",
                                 field="kv_cache_tokens")
        if block_size < 1:
            raise InvalidRequest(f"block_size must be at least 1, got {block_size}", field="block_size")
        self.loaded = loaded
        self.plugins = plugins
        self.model = loaded.module
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.max_batch = max_batch
        self.n_ctx = n_ctx or config.context_length
        if hasattr(self.model, "set_context_length"):
            self.model.set_context_length(self.n_ctx)
        capture = cuda_graphs and self.device.type == "cuda"
        static = capture or static_shapes
        # Whole blocks per sequence, so that the default pool holds max_batch full contexts whatever the block size.
        blocks_per_context = -(-self.n_ctx // block_size)
        pool_tokens = kv_cache_tokens if kv_cache_tokens is not None else max_batch * blocks_per_context * block_size
        self.cache = PagedKVCache.for_model(config, pool_tokens, self.device, block_size=block_size,
                                            prefix_cache=prefix_cache, scratch_block=static)
        self.static = StaticDecode(self.model, self.cache, max_batch, self.n_ctx, capture) if static else None
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._launched: _Launched | None = None  # a greedy forward on the device whose tokens are not read yet
        self.vocab_size = config.vocab_size
        self.default_stop_ids = set(self.tokenizer.eot_ids) if self.tokenizer is not None else set()
        self._factories = plugins.sampler_factories()
        self._lock = threading.Lock()  # add_request and cancel may come from other threads than step
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._cancel: set[str] = set()
        self._next_seq_id = 0
        self._silent = False  # warm_up: no metrics hooks

    # --- public API ----------------------------------------------------------------------------------------------
    def add_request(self, req: GenerationRequest) -> None:
        """Validate ``req`` and queue it; it joins the running batch at the first step with room for it."""
        self._validate(req)
        seed = None
        if req.sampling.temperature > 0.0:
            seed = req.sampling.seed if req.sampling.seed is not None else random.randrange(2**63)
        stop_ids = req.stop_token_ids if req.stop_token_ids is not None else self.default_stop_ids
        decoder = None
        if self.tokenizer is not None:  # the generated text continues the prompt (no start-of-text space rule)
            decoder = self.tokenizer.stream_decoder(skip_special=True, context=req.prompt_ids)
        with self._lock:
            if any(s.request_id == req.request_id for s in (*self._waiting, *self._active)):
                raise InvalidRequest(f"request id {req.request_id!r} is already in use", field="request_id")
            seq = Sequence(req, self._next_seq_id, seed, set(stop_ids), decoder)
            self._next_seq_id += 1
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

    # --- KV cache room (for a scheduler in front of the engine, on the engine's thread) ----------------------------
    def blocks_needed(self, n_prompt: int, max_tokens: int) -> int:
        """KV cache blocks a request of ``n_prompt`` tokens and ``max_tokens`` is promised (before prefix hits)."""
        return self.cache.blocks.blocks_for(self._positions_needed(n_prompt, max_tokens))

    def blocks_available(self) -> int:
        """Blocks that can still be promised once the requests already waiting here are admitted."""
        with self._lock:
            waiting = [s.request for s in self._waiting]
        return self.cache.blocks.available - sum(self.blocks_needed(len(r.prompt_ids), r.max_tokens) for r in waiting)

    @property
    def prefix_cache_stats(self) -> tuple[int, int]:
        """(prompt tokens served from the prefix cache, prompt tokens of admitted requests), since the start."""
        blocks = self.cache.blocks
        return blocks.hit_tokens, blocks.lookup_tokens

    def step(self) -> list[Event]:
        """Apply cancellations, admit and prefill waiting requests, then one batched forward that advances every
        active sequence by one token. A failed forward (``OrcdError``, e.g. ``VRAM_OOM``) ends the sequences in
        it with that error and frees their blocks; a sampler failing for one sequence ends that one only. The
        engine keeps serving.

        With ``overlap``, a batch of plain greedy sequences keeps the device one step ahead of the host: the
        forward of step n + 1 is launched with step n's tokens straight from the device (their argmax) before the
        host reads them, so the host's work on step n (syncing, text, stop rules, events) runs while the device
        computes step n + 1. A call then returns step n's tokens and leaves step n + 1 in flight, while nothing would
        change the batch: no cancellation or admissible request waits, and no sequence is at its last token by
        ``max_tokens`` or the context. A sequence that ends at step n by a stop token or string had its row of step
        n + 1 computed anyway (it wrote the true key and value of its last token into its own block); that row is
        dropped. A sequence cancelled before the call gets no token from it and ends in it, as without ``overlap``;
        new requests join at the first call with nothing in flight, one step later than without it."""
        events: list[Event] = []
        launched, self._launched = self._launched, None
        if launched is not None and not any(s in self._active for s in launched.seqs):
            launched = None  # every sequence of it ended at the step before: nothing to read
        if launched is None:
            self._apply_cancellations(events)
            self._admit(events)
            if not self._active:
                return events
            seqs = list(self._active)
            try:
                logits = self._forward_last_tokens(seqs)
            except OrcdError as e:
                self._fail(seqs, e, events)
                return events
            if not self.overlap or not all(_is_plain_greedy(s.sampler) for s in seqs):
                self._sample_all(seqs, logits, events)
                return events
            launched = _Launched.of(seqs, self._argmax(logits))
        self._launched = self._chain(launched)
        self._read(launched, events)
        if self._launched is None:
            self._apply_cancellations(events)  # cancelled while in flight: their tokens were not emitted
        return events

    def warm_up(self, prompt_tokens: int = PREFILL_CHUNK + 1) -> float:
        """Run the work a first request would otherwise wait for: kernels compile (Triton compiles each variant
        on first use, seconds each) and each batch bucket's decode step is captured. One request with a prompt
        of a full prefill chunk, then, per batch bucket, that many short requests decoding together; their
        tokens are arbitrary, nothing is reported to the metrics hooks, and the prefix cache statistics start
        again. Returns the seconds spent. Call it before serving (the engine must be idle)."""
        if self.has_work():
            raise RuntimeError("warm_up needs an idle engine")
        started = time.perf_counter()
        buckets = self.static.buckets if self.static is not None else [1]
        sizes = sorted({min(size, self.max_batch) for size in buckets})
        room = (self.cache.n_blocks - 1) * self.cache.block_size  # one request alone always fits
        longest = max(2, min(prompt_tokens, self.n_ctx - 3, room - 3))
        self._silent = True
        try:
            for size in sizes:
                n = longest if size == 1 else min(24, longest)
                for i in range(size):
                    ids = [(17 * i + 31 * j + 1) % self.vocab_size for j in range(n)]
                    self.add_request(GenerationRequest(request_id=f"warm-up-{size}-{i}", prompt_ids=ids,
                                                       max_tokens=3, sampling=SamplingParams(temperature=0.0),
                                                       stop_token_ids=set()))
                while self.has_work():
                    for event in self.step():
                        if isinstance(event, FinishEvent) and event.error is not None:
                            raise event.error
        finally:
            self._silent = False
            self.cache.blocks.hit_tokens = self.cache.blocks.lookup_tokens = 0
        return time.perf_counter() - started

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
    def _positions_needed(self, n_prompt: int, max_tokens: int) -> int:
        """Positions a sequence may write: every token but the last sampled one is fed back, within the context."""
        return min(n_prompt + max_tokens - 1, self.n_ctx)

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
        need, pool = self.blocks_needed(n, req.max_tokens), self.cache.n_blocks
        if need > pool:
            bs = self.cache.block_size
            raise InvalidRequest(
                f"a prompt of {n} tokens with max_tokens {req.max_tokens} needs {need} KV cache blocks of {bs} "
                f"positions, but the whole cache holds {pool} ({pool * bs} positions); lower max_tokens or shorten "
                "the prompt", field="max_tokens")

    def _admit(self, events: list[Event]) -> None:
        blocks = self.cache.blocks
        while len(self._active) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                seq = self._waiting[0]
                hit = blocks.admit(seq.seq_id, seq.tokens, self._positions_needed(seq.n_prompt, seq.request.max_tokens))
                if hit is None:
                    break  # first come, first served: the head waits for blocks, and so do those behind it
                self._waiting.popleft()
            seq.holds_cache = True
            seq.cached_prompt_tokens = hit
            self._active.append(seq)  # from here on, _finish releases the blocks whatever fails
            try:
                seq.sampler = SamplerChain(self._factories,
                                           seq.request.sampling.model_copy(update={"seed": seq.seed}), self.device)
                if not _is_plain_greedy(seq.sampler):  # plain greedy reads no history: no device write per token
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
        """Write the prompt's tokens but the last into the cache (the last one goes through the batched step),
        starting after the prefix the cache already holds."""
        blocks = self.cache.blocks
        end = seq.n_prompt - 1
        for start in range(seq.cached_prompt_tokens, end, PREFILL_CHUNK):
            stop = min(start + PREFILL_CHUNK, end)
            blocks.grow(seq.seq_id, stop)
            tokens = torch.tensor([seq.tokens[start:stop]], dtype=torch.long, device=self.device)
            positions = torch.arange(start, stop, device=self.device).unsqueeze(0)
            batch = ForwardBatch(tokens, positions, self.cache, [seq.seq_id], kv_length=stop, starts=[start],
                                 block_tables=self.cache.block_tables([seq.seq_id]))
            self._run(batch)
            blocks.commit(seq.seq_id, seq.tokens, stop)

    # --- the batched step ----------------------------------------------------------------------------------------
    def _forward_last_tokens(self, seqs: list[Sequence], ahead: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of each sequence's next token from its latest one; with ``ahead`` (the device tokens of a step
        whose tokens the host has not read yet) from those, one position further."""
        blocks = self.cache.blocks
        last = [seq.tokens[-1] for seq in seqs] if ahead is None else [0] * len(seqs)
        pos = [len(seq.tokens) - (1 if ahead is None else 0) for seq in seqs]
        for seq, p in zip(seqs, pos):
            blocks.grow(seq.seq_id, p + 1)
        if self.static is not None:
            static = self.static
            return self._guard_oom(lambda: static.run(last, pos, [blocks.table(s.seq_id) for s in seqs], ahead),
                                   len(seqs), 1)
        if ahead is not None:
            tokens = ahead.unsqueeze(1)
        else:
            tokens = torch.tensor(last, dtype=torch.long, device=self.device).unsqueeze(1)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device).unsqueeze(1)
        ids = [seq.seq_id for seq in seqs]
        batch = ForwardBatch(tokens, positions, self.cache, ids, kv_length=max(pos) + 1, starts=pos,
                             block_tables=self.cache.block_tables(ids))
        return self._run(batch)

    def _run(self, batch: ForwardBatch) -> torch.Tensor:
        return self._guard_oom(lambda: self.model(batch), batch.tokens.shape[0], batch.tokens.shape[1])

    @staticmethod
    def _guard_oom(forward: Any, n_seqs: int, n_tokens: int) -> torch.Tensor:
        try:
            return forward()
        except torch.cuda.OutOfMemoryError as e:
            raise VramOOM(f"the GPU ran out of memory in a forward over {n_seqs} sequence(s) of "
                          f"{n_tokens} token(s): {e}") from None

    # --- overlap: the device one step ahead ----------------------------------------------------------------------
    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, : self.vocab_size].argmax(dim=-1)

    def _may_chain(self, seqs: list[Sequence]) -> bool:
        """Nothing would change the batch after this step: the same sequences, none at its last token, no
        cancellation and no request that could be admitted waiting."""
        with self._lock:
            if self._cancel or (self._waiting and len(self._active) < self.max_batch):
                return False
        if len(seqs) != len(self._active) or any(a is not b for a, b in zip(seqs, self._active)):
            return False
        # step n's token is the (n_generated + 1)-th; a step after it needs one more, and a position in the context
        return all(s.n_generated + 2 <= s.request.max_tokens and len(s.tokens) < self.n_ctx for s in seqs)

    def _chain(self, launched: _Launched) -> _Launched | None:
        """Launch the step after ``launched`` from its device tokens, where ``_may_chain``; else ``None``. A launch
        that fails here is left to the next call's ordinary step, which reports its error."""
        if not self._may_chain(launched.seqs):
            return None
        try:
            logits = self._forward_last_tokens(launched.seqs, ahead=launched.tokens)
        except OrcdError as e:
            log.debug("no step ahead: %s", e.message)
            return None
        return _Launched.of(launched.seqs, self._argmax(logits))

    def _read(self, launched: _Launched, events: list[Event]) -> None:
        """Bring ``launched``'s tokens to the host (waiting for that step only) and emit them; rows of sequences
        that ended at the step before are dropped."""
        try:
            tokens = launched.read()
        except Exception as e:  # the step failed on the device: its sequences end, nothing runs after it
            self._launched = None
            self._fail([s for s in launched.seqs if s in self._active],
                       to_orcd_error(e, self.device, "the decode step"), events)
            return
        with self._lock:
            cancelled = set(self._cancel)
        for seq, token in zip(launched.seqs, tokens):
            if seq not in self._active or seq.request_id in cancelled:
                continue
            self._emit(seq, token, events)
            if seq.holds_cache:
                self.cache.blocks.commit(seq.seq_id, seq.tokens, len(seq.tokens) - 1)

    def _sample_all(self, seqs: list[Sequence], logits: torch.Tensor, events: list[Event]) -> None:
        """One token per sequence. Plain greedy rows (no sampler in their chain) share one argmax and one copy
        to the host; the others go through their chains. A chain that raises ends its own sequence."""
        plain = [row for row, seq in enumerate(seqs) if _is_plain_greedy(seq.sampler)]
        chosen: dict[int, int] = {}
        if plain:
            index = torch.tensor(plain, device=logits.device) if len(plain) < len(seqs) else None
            rows = logits[:, : self.vocab_size] if index is None else logits.index_select(0, index)[:, : self.vocab_size]
            chosen = dict(zip(plain, rows.argmax(dim=-1).tolist()))
        for row, seq in enumerate(seqs):
            try:
                token = chosen[row] if row in chosen else self._draw(seq, logits[row])
            except OrcdError as e:
                self._fail([seq], e, events)
                continue
            self._emit(seq, token, events)
            if seq.holds_cache:  # positions 0 .. len - 2 are written now: newly full blocks join the prefix cache
                self.cache.blocks.commit(seq.seq_id, seq.tokens, len(seq.tokens) - 1)

    def _draw(self, seq: Sequence, logits: torch.Tensor) -> int:
        assert seq.sampler is not None and seq.history is not None
        try:
            return seq.sampler.sample(logits[: self.vocab_size], seq.history[: len(seq.tokens)])
        except Exception as e:  # a sampler's bug: its sequence ends, the batch goes on
            err = to_orcd_error(e, self.device, "the decode step")
            if isinstance(err, CudaError):
                raise err from e  # the device may be unusable: the whole step fails
            raise err from None

    def _emit(self, seq: Sequence, token: int, events: list[Event]) -> None:
        n = len(seq.tokens)
        seq.tokens.append(token)
        if seq.history is not None:
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
        if seq.holds_cache:
            self.cache.blocks.release(seq.seq_id)
            seq.holds_cache = False
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
        if self._silent:
            return
        for impl in getattr(self.plugins.hook, name).get_hookimpls():
            try:
                impl.function(event=event)
            except Exception:
                log.exception("metrics hook %s of plugin %r raised", name, impl.plugin_name)


@dataclass
class _Launched:
    """A batched forward of plain greedy sequences on the device; ``tokens`` (one per row, on the device) are
    their argmax, not read by the host yet.

    On CUDA ``of`` also starts their copy into pinned host memory and records an event after it, before the next
    step is launched: ``read`` then waits for this step alone. (``tokens.tolist()`` would copy in stream order
    after the step launched since, and wait for that one too, leaving the device idle while the host works on
    this step's tokens.)"""

    seqs: list[Sequence]
    tokens: torch.Tensor
    host: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None

    @classmethod
    def of(cls, seqs: list[Sequence], tokens: torch.Tensor) -> _Launched:
        if not tokens.is_cuda:
            return cls(seqs, tokens)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(seqs, tokens, host, copied)

    def read(self) -> list[int]:
        """The tokens on the host, waiting for this step's forward (and nothing launched after it)."""
        if self.copied is None or self.host is None:
            return self.tokens.tolist()
        self.copied.synchronize()
        return self.host.tolist()


def _is_plain_greedy(chain: SamplerChain | None) -> bool:
    """Argmax of the raw logits: temperature 0 and no logit processor in the chain."""
    return chain is not None and chain.generator is None and not chain.samplers
