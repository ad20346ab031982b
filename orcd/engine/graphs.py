"""The one-token decode forward at fixed shapes, and its CUDA graphs.

A decode step's shapes depend on two numbers: how many sequences decode (``B``) and how far back attention reads
(``kv_length``). ``StaticDecode`` rounds both up to buckets — ``B`` to a power of two, the read length to a power
of two of blocks — and keeps, per batch bucket, one device tensor of inputs: each row holds a token, its position
and the sequence's block table. Rows past the real sequences are padding: token 0 at position 0 of the cache's
scratch block, which no sequence holds, so they change nothing and every row attends to at least one key. The
forward then has fixed shapes and makes no host synchronisation (``ForwardBatch`` gets ``kv_length`` and the block
tables up front), so on CUDA each (batch bucket, length bucket) is captured once as a graph, lazily, and replayed
with new inputs copied into the same tensor: one copy and one launch per step instead of hundreds of kernel
launches from Python.

Captures share one memory pool; each writes its logits into the batch bucket's output tensor, so a graph keeps no
memory of its own beyond the pool. A forward that cannot be captured (an operation that synchronises with the host,
such as a mixture-of-experts path that counts tokens per expert on the host) falls back to eager for that bucket
and every larger batch bucket, with a warning. Off CUDA the same fixed-shape forward runs eagerly (that is how the
CPU tests check the padding and bucketing against the plain eager step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from orcd.engine.kv_cache import PagedKVCache
from orcd.nn.batch import ForwardBatch

log = logging.getLogger(__name__)

MIN_LENGTH_BLOCKS = 8  # the smallest read-length bucket, in blocks (fewer buckets, fewer captures)
WARMUP_RUNS = 2  # eager runs before a capture: kernels compile, libraries allocate their workspaces


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two that holds ``max_batch``."""
    return [1 << i for i in range(next_power_of_two(max_batch).bit_length())]


@dataclass
class _BatchBucket:
    size: int
    inputs: torch.Tensor  # (2 + max_blocks, size) int64 on the device: token, position, block table per column
    host: torch.Tensor  # the same on the host (pinned on CUDA), filled and copied over each step
    copied: torch.cuda.Event | None = None  # when the last copy from ``host`` finished (CUDA)
    logits: torch.Tensor | None = None  # (size, vocab) float32: where every graph of this bucket writes


class StaticDecode:
    """Runs ``model`` over one new token per sequence at bucketed shapes, through CUDA graphs when ``capture``."""

    def __init__(self, model: Any, cache: PagedKVCache, max_batch: int, n_ctx: int, capture: bool) -> None:
        if cache.scratch_block is None:
            raise ValueError("fixed-shape decode needs a KV cache with a scratch block for its padding rows")
        self.model = model
        self.cache = cache
        self.capture = capture
        self.block_size = cache.block_size
        self.max_blocks = -(-n_ctx // self.block_size)
        self.buckets = batch_buckets(max_batch)
        self._batches: dict[int, _BatchBucket] = {}
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._eager_from: int | None = None  # batch buckets this size and larger could not be captured
        self._pool: Any = None

    # --- buckets -------------------------------------------------------------------------------------------------
    def batch_bucket(self, n: int) -> int:
        for size in self.buckets:
            if size >= n:
                return size
        raise ValueError(f"{n} sequences are more than the largest batch bucket {self.buckets[-1]}")

    def length_bucket(self, n_blocks: int) -> int:
        """Blocks attention reads for sequences holding up to ``n_blocks`` blocks."""
        return min(self.max_blocks, max(MIN_LENGTH_BLOCKS, next_power_of_two(n_blocks)))

    @property
    def graphs(self) -> list[tuple[int, int]]:
        """The (batch bucket, length bucket in blocks) pairs captured so far."""
        return sorted(self._graphs)

    # --- the step ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, tokens: list[int], positions: list[int], tables: list[list[int]],
            device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(len(tokens), vocab)`` of one new token per sequence: ``tokens[i]`` at ``positions[i]`` of the
        sequence whose blocks are ``tables[i]`` (holding that position). ``device_tokens`` (``(n,)`` on the device)
        replaces ``tokens``, without the host reading it. The tensor is reused by the next call."""
        n = len(tokens)
        bucket = self._bucket(self.batch_bucket(n))
        width = self.length_bucket(max(p // self.block_size + 1 for p in positions))
        self._write_inputs(bucket, tokens, positions, tables, width)
        if device_tokens is not None:
            bucket.inputs[0, :n].copy_(device_tokens)  # after the host copy, in stream order
        key = (bucket.size, width)
        graph = self._graphs.get(key)
        if graph is None and self._capturable(bucket.size):
            graph = self._try_capture(bucket, width)
        if graph is not None:
            graph.replay()
            assert bucket.logits is not None
            return bucket.logits[:n]
        return self._forward(bucket, width)[:n]

    def _bucket(self, size: int) -> _BatchBucket:
        if size not in self._batches:
            shape = (2 + self.max_blocks, size)
            on_cuda = self.cache.device.type == "cuda"
            inputs = torch.zeros(shape, dtype=torch.long, device=self.cache.device)
            host = torch.zeros(shape, dtype=torch.long, pin_memory=on_cuda)
            self._batches[size] = _BatchBucket(size, inputs, host, torch.cuda.Event() if on_cuda else None)
        return self._batches[size]

    def _write_inputs(self, bucket: _BatchBucket, tokens: list[int], positions: list[int],
                      tables: list[list[int]], width: int) -> None:
        """One contiguous host-to-device copy of what this step reads, padding included (what an earlier, larger
        batch left in a column is reset)."""
        if bucket.copied is not None:
            bucket.copied.synchronize()  # the previous copy out of ``host`` is done (it is, in practice)
        rows = bucket.host.numpy()[: 2 + width]  # numpy on the same memory: a slice write costs no torch dispatch
        rows[:2] = 0
        rows[2:] = self.cache.scratch_block
        n = len(tokens)
        rows[0, :n] = tokens
        rows[1, :n] = positions
        for col, table in enumerate(tables):
            used = table[:width]
            rows[2 : 2 + len(used), col] = used
        bucket.inputs[: 2 + width].copy_(bucket.host[: 2 + width], non_blocking=True)
        if bucket.copied is not None:
            bucket.copied.record()

    def _forward(self, bucket: _BatchBucket, width: int) -> torch.Tensor:
        inputs = bucket.inputs
        batch = ForwardBatch(
            tokens=inputs[0].unsqueeze(1),
            positions=inputs[1].unsqueeze(1),
            cache=self.cache,
            slots=[-1] * bucket.size,  # unused: the block tables are given
            kv_length=width * self.block_size,
            block_tables=inputs[2 : 2 + width].t(),
        )
        return self.model(batch)

    # --- capture -------------------------------------------------------------------------------------------------
    def _capturable(self, size: int) -> bool:
        return self.capture and (self._eager_from is None or size < self._eager_from)

    def _try_capture(self, bucket: _BatchBucket, width: int) -> torch.cuda.CUDAGraph | None:
        """Capture the forward of ``bucket`` at ``width`` blocks. The inputs already hold this step's values;
        warm-up runs write their keys and values where this step's forward will write them again."""
        caller_stream = torch.cuda.current_stream()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_RUNS):
                    logits = self._forward(bucket, width)
            torch.cuda.current_stream().wait_stream(stream)
            if bucket.logits is None:
                bucket.logits = torch.empty_like(logits)
            del logits
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                bucket.logits.copy_(self._forward(bucket, width))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.set_stream(caller_stream)
            raise  # the engine reports VRAM_OOM; this bucket may be captured at a later step
        except RuntimeError as e:
            # a capture that failed may leave its capture stream current (torch ends the stream context only
            # after a successful end of capture)
            torch.cuda.set_stream(caller_stream)
            self._eager_from = bucket.size if self._eager_from is None else min(self._eager_from, bucket.size)
            log.warning("the decode step of %d sequences cannot be captured in a CUDA graph (%s); batches of %d "
                        "and more run eagerly", bucket.size, str(e).splitlines()[0] if str(e) else type(e).__name__,
                        bucket.size)
            return None
        self._graphs[(bucket.size, width)] = graph
        log.debug("captured the decode step: %d sequences, %d positions", bucket.size, width * self.block_size)
        return graph
