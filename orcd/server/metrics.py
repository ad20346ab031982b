"""Prometheus metrics of one worker, fed by the engine's metrics hooks.

``ServerMetrics`` owns a ``CollectorRegistry`` of its own (not prometheus-client's global one), so that several
apps in one process — tests start many — never collide. Its ``plugin`` object implements the three metrics hooks
of ``orcd.hookspecs`` and is registered on the worker's plugin manager: the engine calls it for every request.
Job outcomes are counted by the worker itself: it also sees the jobs that never reached the engine (cancelled while
queued, refused because the queue was full) and knows why a job was cut short. The prefix cache's counters are read
from the engine when /metrics is scraped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from orcd.hookspecs import hookimpl
from orcd.metrics import RequestFinished, RequestStarted, TokenProduced

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DECODE_RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800, 1600)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(
        self,
        vram_bytes: Callable[[], float],
        queue_length: Callable[[], float],
        running_jobs: Callable[[], float],
        healthy: Callable[[], float],
        prefix_cache: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.started = time.monotonic()
        self.vram = Gauge("worker_vram_bytes", "Device memory in use by the worker (bytes)", registry=r)
        self.vram.set_function(vram_bytes)
        self.requests = Counter(
            "worker_requests", "Jobs that ended, by outcome (eos, max_tokens, stop_sequence or an error code)",
            ["outcome"], registry=r,
        )
        self.rejected = Counter("worker_rejected_requests", "Jobs refused before queueing, by reason", ["reason"],
                                registry=r)
        self.tokens = Counter("worker_tokens_generated", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("worker_prompt_tokens", "Prompt tokens processed", registry=r)
        self.ttft = Histogram("worker_time_to_first_token_seconds", "Time from a job's start to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("worker_inter_token_latency_seconds", "Time between consecutive tokens of a job",
                             buckets=ITL_BUCKETS, registry=r)
        self.decode_rate = Histogram("worker_decode_tokens_per_second", "Decode speed of each finished job",
                                     buckets=DECODE_RATE_BUCKETS, registry=r)
        self.queue = Gauge("worker_queue_length", "Jobs waiting for the engine", registry=r)
        self.queue.set_function(queue_length)
        self.running = Gauge("worker_running_jobs", "Jobs the engine is decoding", registry=r)
        self.running.set_function(running_jobs)
        self.healthy = Gauge("worker_healthy", "1 when the worker reports healthy", registry=r)
        self.healthy.set_function(healthy)
        self.uptime = Gauge("worker_uptime_seconds", "Seconds since the worker started", registry=r)
        self.uptime.set_function(lambda: time.monotonic() - self.started)
        if prefix_cache is not None:
            r.register(PrefixCacheCollector(prefix_cache))
        self.plugin = MetricsPlugin(self)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class PrefixCacheCollector:
    """The engine's prefix-cache counters, read at scrape time: prompt tokens served from cached KV blocks,
    prompt tokens looked up (every admitted prompt token), and their ratio since the start."""

    def __init__(self, stats: Callable[[], tuple[int, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        hit, looked_up = self.stats()
        yield CounterMetricFamily("orcd_prefix_cache_hit_tokens", "Prompt tokens whose KV cache came from the "
                                  "prefix cache (their prefill was skipped)", value=hit)
        yield CounterMetricFamily("orcd_prefix_cache_lookup_tokens", "Prompt tokens looked up in the prefix cache "
                                  "(every prompt token of an admitted job)", value=looked_up)
        yield GaugeMetricFamily("orcd_prefix_cache_hit_ratio", "orcd_prefix_cache_hit_tokens_total / "
                                "orcd_prefix_cache_lookup_tokens_total since the start (0 before any lookup)",
                                value=hit / looked_up if looked_up else 0.0)


class MetricsPlugin:
    """The engine's metrics hooks, recorded into a ``ServerMetrics``."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    @hookimpl
    def request_started(self, event: RequestStarted) -> None:
        self.metrics.prompt_tokens.inc(event.prompt_tokens)

    @hookimpl
    def token_produced(self, event: TokenProduced) -> None:
        self.metrics.tokens.inc()
        if event.index == 0:
            self.metrics.ttft.observe(event.seconds_since_previous)
        else:
            self.metrics.itl.observe(event.seconds_since_previous)

    @hookimpl
    def request_finished(self, event: RequestFinished) -> None:
        # Outcomes are counted by the worker, which also sees jobs that never reached the engine and knows why a
        # job was cut short (a timeout and a client's cancel both reach the engine as a cancel).
        if event.decode_tokens_per_s:
            self.metrics.decode_rate.observe(event.decode_tokens_per_s)
