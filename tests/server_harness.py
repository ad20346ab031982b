"""Helpers for the server tests: a real uvicorn server on a free loopback port (in a thread), an SSE reader, and a
sampler plugin that keeps jobs running (it forbids the end-of-generation tokens, so a job runs to max_tokens).

Nothing here replaces a part of orcd: the model, tokenizer, engine, worker and app are the real ones; the sampler
is a plugin registered through the same hook as any third-party sampler.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import uvicorn

import orcd
from orcd.loader import load_model
from orcd.sampling import SamplerFactory, SamplingParams
from orcd.server import Worker, WorkerConfig, create_app


class NoEndOfGeneration(SamplerFactory):
    """Sets the logits of the given token ids to -inf, so generation only ends at max_tokens or a stop string;
    and takes ``delay_s`` per token, so the tiny model (0.5 ms a step on two CPU cores) decodes at the pace of a
    real one on a GPU and a 2048-token job outlives what a test does while it runs."""

    name, order = "test_no_end_of_generation", 5

    def __init__(self, ids: Iterable[int], delay_s: float) -> None:
        self.ids = sorted(int(i) for i in ids)
        self.delay_s = delay_s

    def create(self, params: SamplingParams):
        ids = torch.tensor(self.ids, dtype=torch.long)

        def apply(logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            logits[ids.to(logits.device)] = float("-inf")
            if self.delay_s:
                time.sleep(self.delay_s)
            return logits

        return apply


class NoEndOfGenerationPlugin:
    def __init__(self, ids: Iterable[int], delay_s: float = 0.002) -> None:
        self.factory = NoEndOfGeneration(ids, delay_s)

    @orcd.hookimpl
    def register_samplers(self, register: Callable[[SamplerFactory], None]) -> None:
        register(self.factory)


class ExplodingSampler(SamplerFactory):
    """Raises inside the engine's step for requests with ``top_k == 13``: a bug in a third-party sampler."""

    name, order = "test_exploding", 6

    def create(self, params: SamplingParams):
        if params.top_k != 13:
            return None

        def apply(logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("sampler exploded")

        return apply


class ExplodingSamplerPlugin:
    @orcd.hookimpl
    def register_samplers(self, register: Callable[[SamplerFactory], None]) -> None:
        register(ExplodingSampler())


def end_of_generation_ids(tokenizer: Any) -> set[int]:
    """The ids that end generation by default (EOS, end of turn, ...)."""
    ids = getattr(tokenizer, "eog_ids", None)
    return set(ids if ids is not None else tokenizer.eot_ids)


def free_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY: see serve.py
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


class LiveServer:
    """A worker and its app served by uvicorn on 127.0.0.1:<free port> from a background thread."""

    def __init__(self, model_path: Path, plugins: Any, api_key: str | None = None, max_body_bytes: int | None = None,
                 device: str = "cpu", **config: Any) -> None:
        self.loaded = load_model(model_path, device=device, plugins=plugins)
        cfg = WorkerConfig(worker_id=config.pop("worker_id", "00000000-0000-4000-8000-000000000000"),
                           model_id=model_path.name.removesuffix(".gguf"), synthetic=True, **config)
        self.worker = Worker.create(self.loaded, plugins, torch.device(device), cfg)
        self.worker.start()
        kwargs: dict[str, Any] = {"api_key": api_key}
        if max_body_bytes is not None:
            kwargs["max_body_bytes"] = max_body_bytes
        self.app = create_app(self.worker, **kwargs)
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.worker.close()
        self.sock.close()


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a ``text/event-stream``; comments (keep-alives) are skipped."""
    kind: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if kind is not None or data:
                yield kind or "message", json.loads("\n".join(data))
            kind, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            kind = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].strip())


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def write_huge_context_model(path: Path, context_length: int = 1 << 27) -> Path:
    """A tiny Qwen2 file that claims a context of ``context_length`` tokens: its full-context KV cache (256 GiB in
    FP32, 128 GiB in FP16 at 2^27) fits no machine here, so serving it must be refused before loading."""
    from conftest import make_plugin_manager
    from orcd_llama_adapter.qwen2 import Qwen2

    from orcd.testing.synth import synthesize

    class HugeContextQwen2(Qwen2):
        def synth_spec(self, preset: str):
            spec = super().synth_spec(preset)
            spec.metadata["qwen2.context_length"] = context_length
            return spec

    class Plugin:
        @orcd.hookimpl
        def register_architectures(self, register) -> None:
            register(HugeContextQwen2())

    writer = make_plugin_manager("quant_formats")
    writer.register(Plugin(), name="huge_context")
    return synthesize(path, "qwen2", "tiny", "F32", plugins=writer)
