"""``orcd serve``: load one model on one device and serve it (worker API, OpenAI API, /metrics) until told to stop.

Start-up, in order: check the arguments (one-line error, exit 1), pick the model (``--model`` or the default one),
check the model against the installed plugins, compare its memory need with the device's free memory (exit 1
naming required and available bytes, device and path), load it with progress at 0/25/50/75/100 %, bind the port,
then report ready to ``--callback-url`` (exit 1 if it never answers). SIGTERM, SIGINT or ``POST /shutdown``: refuse
new jobs (503), let queued and running ones finish (up to 25 s, then cancel them), free the model, exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger("orcd.serve")

DEFAULT_PORT = 8000
CALLBACK_ATTEMPTS = 5
CALLBACK_TIMEOUT_S = 5.0
CALLBACK_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)
SHUTDOWN_GRACE_S = 25.0  # jobs get this long to finish; the process is gone within 30 s
DEFAULT_MODEL_NAME = "default-qwen2-tiny-Q8_0.gguf"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from orcd.device import MATMUL_PRECISION_HELP, MATMUL_PRECISIONS

    p = sub.add_parser("serve", help="serve one model over HTTP (worker API, OpenAI API, /metrics)")
    p.add_argument("--model", help="GGUF file to serve (default: the default model; see ORCD_DEFAULT_MODEL)")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="a Hugging Face tokenizer.json (or its directory) to use instead of the GGUF's vocabulary")
    p.add_argument("--worker-id", help="this worker's UUID, reported to the callback (default: a new one)")
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--gpu-device", type=int, metavar="N", help="CUDA device index")
    dev.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:0 when there is a GPU, else cpu)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to bind (default {DEFAULT_PORT}; 0: any free)")
    p.add_argument("--callback-url", help="POST {worker_id, vram_bytes, uri} here once ready")
    p.add_argument("--api-key", default=os.environ.get("ORCD_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (or set ORCD_API_KEY)")
    p.add_argument("--max-tokens-out", type=int, default=2048, help="ceiling on max_tokens of a job (default 2048)")
    p.add_argument("--inference-timeout-sec", type=float, default=300.0,
                   help="a job running longer ends with INFERENCE_TIMEOUT (default 300)")
    p.add_argument("--kv-cache-size-mb", type=int,
                   help="KV cache pool shared by the running jobs, in MiB (default: one full context); a smaller "
                        "one also caps the context")
    p.add_argument("--max-batch", type=int,
                   help="jobs decoded at once (default: 8 on a GPU, 4 on the CPU); more wait in the queue")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse the KV cache of prompt prefixes shared between jobs")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="decode eagerly instead of replaying the decode step from CUDA graphs (GPU only)")
    p.add_argument("--cuda-graphs", dest="cuda_graphs", action="store_true", help=argparse.SUPPRESS)  # the default
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                   help="skip compiling the kernels and capturing the decode graphs before serving (GPU only); "
                        "the first requests then wait for them")
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="highest", help=MATMUL_PRECISION_HELP)
    p.add_argument("--max-queue", type=int, default=16, help="jobs that may wait for the engine (default 16)")
    p.add_argument("--residency-check-sec", type=float, default=60.0,
                   help="how often to check the weights are still on the device (default 60; 0: never)")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="json: one object per line")
    p.add_argument("--log-prompts", action="store_true", help="include prompts in job logs (off by default)")
    p.set_defaults(run=run)

    def one_line_error(message: str) -> None:  # argparse's default prints usage and exits 2
        print(f"orcd serve: error: {message}", file=sys.stderr)
        raise SystemExit(1)

    p.error = one_line_error  # type: ignore[method-assign]


class ArgumentProblem(Exception):
    """A bad argument: printed as one line, exit 1."""


def run(args: argparse.Namespace, plugins: Any = None) -> int:
    """Serve until shutdown; returns the exit code. ``plugins`` overrides the process-wide plugin manager
    (tests pass one with their own plugins registered)."""
    from orcd.errors import OrcdError
    from orcd.server.logs import configure_logging

    try:
        settings = check_arguments(args)
    except ArgumentProblem as e:
        print(f"orcd serve: error: {e}", file=sys.stderr)
        return 1
    configure_logging(args.log_format, logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)

    try:
        return serve(args, settings, plugins)
    except OrcdError as e:
        log.error("%s", e.message, extra={"code": e.code})
        print(f"orcd serve: error: {e.message}", file=sys.stderr)
        return 1


def check_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can be checked before touching the model; raises ``ArgumentProblem``."""
    from orcd.device import parse_device
    from orcd.errors import InvalidRequest

    out: dict[str, Any] = {}
    if args.worker_id is not None:
        try:
            out["worker_id"] = str(uuid.UUID(args.worker_id))
        except ValueError:
            raise ArgumentProblem(f"--worker-id {args.worker_id!r} is not a UUID") from None
    else:
        out["worker_id"] = str(uuid.uuid4())
    if args.model is not None:
        path = Path(args.model)
        if not path.is_file():
            raise ArgumentProblem(f"--model {args.model}: no such file")
        if not os.access(path, os.R_OK):
            raise ArgumentProblem(f"--model {args.model}: not readable by this user")
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise ArgumentProblem(f"--tokenizer {args.tokenizer}: no such file or directory")
    try:
        out["device"] = parse_device(args.gpu_device if args.gpu_device is not None else args.device)
    except InvalidRequest as e:
        flag = "--gpu-device" if args.gpu_device is not None else "--device"
        raise ArgumentProblem(f"{flag}: {e.message}") from None
    if args.gpu_device is not None and args.gpu_device < 0:
        raise ArgumentProblem(f"--gpu-device {args.gpu_device}: must be 0 or more")
    if not 0 <= args.port <= 65535:
        raise ArgumentProblem(f"--port {args.port}: must be between 0 and 65535")
    if args.callback_url is not None and not args.callback_url.startswith(("http://", "https://")):
        raise ArgumentProblem(f"--callback-url {args.callback_url!r}: must be an http:// or https:// URL")
    if args.max_tokens_out < 1:
        raise ArgumentProblem(f"--max-tokens-out {args.max_tokens_out}: must be at least 1")
    if args.inference_timeout_sec <= 0:
        raise ArgumentProblem(f"--inference-timeout-sec {args.inference_timeout_sec:g}: must be more than 0")
    if args.kv_cache_size_mb is not None and args.kv_cache_size_mb < 1:
        raise ArgumentProblem(f"--kv-cache-size-mb {args.kv_cache_size_mb}: must be at least 1")
    if args.max_queue < 0:
        raise ArgumentProblem(f"--max-queue {args.max_queue}: must be 0 or more")
    if args.max_batch is not None and args.max_batch < 1:
        raise ArgumentProblem(f"--max-batch {args.max_batch}: must be at least 1")
    if args.api_key is not None and not args.api_key.strip():
        raise ArgumentProblem("--api-key is empty")
    out["socket"] = bind_socket(args.host, args.port)  # held from here on, so nobody takes the port meanwhile
    return out


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` now (the check that the port is free) and hand the socket to uvicorn later."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ArgumentProblem(f"--host {host!r}: cannot be resolved ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    # proto must be IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
    # and without it every keep-alive response waits ~40 ms for the client's delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ArgumentProblem(f"--port {port}: cannot bind {host}:{port} ({e.strerror}); is another process on it?")
    sock.set_inheritable(True)
    return sock


# --- the default model -------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    if "ORCD_CACHE_DIR" in os.environ:
        return Path(os.environ["ORCD_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "orcd"


def default_model(plugins: Any) -> tuple[Path, bool]:
    """The model served without ``--model``: ``ORCD_DEFAULT_MODEL`` if set, else a synthetic tiny Qwen2 (random
    weights, real tokenizer and chat template) written once into the cache. Returns (path, synthetic)."""
    env = os.environ.get("ORCD_DEFAULT_MODEL")
    if env:
        return Path(env), False
    path = cache_dir() / DEFAULT_MODEL_NAME
    if not path.is_file():
        from orcd.testing.synth import synthesize

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        log.info("writing the default model (synthetic tiny qwen2, Q8_0) to %s", path)
        try:
            synthesize(tmp, "qwen2", "tiny", "Q8_0", seed=0, plugins=plugins)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path, True


def looks_synthetic(model_file: Any) -> bool:
    """Files written by ``orcd synth`` are named ``synthetic <preset>``."""
    return str(model_file.get("general.name", "")).startswith("synthetic")


# --- load progress -----------------------------------------------------------------------------------------------


class LoadProgress:
    """``progress(percent, message)`` for the loader: a log line per step, and a bar when stderr is a terminal."""

    def __init__(self, bar: bool) -> None:
        self.bar = bar
        self.started = time.monotonic()

    def __call__(self, percent: float, message: str) -> None:
        log.info("loading model: %3d%% %s", int(percent), message,
                 extra={"progress_percent": int(percent), "elapsed_s": round(time.monotonic() - self.started, 2)})
        if self.bar:
            filled = int(percent) * 30 // 100
            end = "\n" if percent >= 100 else ""
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {int(percent):3d}% {message[:60]:<60}{end}")
            sys.stderr.flush()


# --- serving -----------------------------------------------------------------------------------------------------


def serve(args: argparse.Namespace, settings: dict[str, Any], plugins: Any = None) -> int:
    from orcd import device as devmem
    from orcd.description import open_checked
    from orcd.plugins import get_plugin_manager

    plugins = plugins or get_plugin_manager()
    device = settings["device"]
    sock: socket.socket = settings["socket"]
    devmem.set_matmul_precision(getattr(args, "matmul_precision", "highest"))
    try:
        if args.model is None:
            path, synthetic = default_model(plugins)
        else:
            path, synthetic = Path(args.model), False
        model_file, config = open_checked(path, plugins)
        synthetic = synthetic or looks_synthetic(model_file)
        if synthetic:
            log.warning("serving a SYNTHETIC model (random weights; its output is meaningless text): %s", path,
                        extra={"synthetic": True, "model_path": str(path)})
        n_ctx = devmem.serving_context(config, device, args.kv_cache_size_mb)
        pool_tokens = kv_pool_tokens(config, device, args.kv_cache_size_mb, n_ctx)
        need = devmem.estimate_need(model_file, config, device, n_ctx)
        # the pool may hold more than one context (a large --kv-cache-size-mb): count all of it
        per_token = devmem.kv_bytes_per_token(config, devmem.kv_element_bytes(device))
        need = dataclasses.replace(need, kv_cache=pool_tokens * per_token)
        available = devmem.check_fits(need, device, path)
        log.info("memory check passed: need %s of %s available on %s", devmem.human_bytes(need.total),
                 devmem.human_bytes(available), device,
                 extra={"required_bytes": need.total, "available_bytes": available, "device": str(device)})
        worker = load_worker(args, settings, plugins, path, n_ctx, synthetic, pool_tokens)
    except BaseException:
        sock.close()
        raise
    return run_server(args, settings, worker, sock)


def kv_pool_tokens(config: Any, device: Any, kv_cache_mb: int | None, n_ctx: int) -> int:
    """Positions the KV cache pool holds: what ``--kv-cache-size-mb`` pays for, else one full context."""
    from orcd import device as devmem

    if kv_cache_mb is None:
        return n_ctx
    per_token = devmem.kv_bytes_per_token(config, devmem.kv_element_bytes(device))
    return max(n_ctx, kv_cache_mb * 1024 * 1024 // per_token)


def default_max_batch(device: Any) -> int:
    return 8 if device.type == "cuda" else 4


def load_worker(args: argparse.Namespace, settings: dict[str, Any], plugins: Any, path: Path, n_ctx: int,
                synthetic: bool, pool_tokens: int | None = None) -> Any:
    from orcd import device as devmem
    from orcd.errors import InsufficientVRAM, OrcdError
    from orcd.loader import load_model
    from orcd.server.worker import Worker, WorkerConfig

    device = settings["device"]
    progress = LoadProgress(bar=sys.stderr.isatty() and args.log_format == "text")
    try:
        loaded = devmem.guarded(lambda: load_model(path, device=device, plugins=plugins, progress=progress,
                                                   tokenizer_path=args.tokenizer), device,
                                f"loading {path}")
    except OrcdError as e:
        if e.code == "VRAM_OOM":  # the estimate was short: same answer as the check before loading
            raise InsufficientVRAM(f"{path}: ran out of memory on {device} while loading: {e.message}") from None
        raise
    config = WorkerConfig(
        worker_id=settings["worker_id"],
        model_id=path.name.removesuffix(".gguf"),
        max_queue=args.max_queue,
        max_batch=args.max_batch or default_max_batch(device),
        kv_cache_tokens=pool_tokens,
        prefix_cache=not args.no_prefix_cache,
        cuda_graphs=args.cuda_graphs,
        warm_up=args.warm_up,
        max_tokens_out=args.max_tokens_out,
        inference_timeout_s=args.inference_timeout_sec,
        n_ctx=n_ctx,
        residency_interval_s=args.residency_check_sec,
        shutdown_grace_s=SHUTDOWN_GRACE_S,
        log_prompts=args.log_prompts,
        synthetic=synthetic,
    )
    worker = Worker.create(loaded, plugins, device, config)
    worker.start()
    log.info("model ready: %s (%s) on %s, context %d, up to %d jobs at once, KV cache %s, %s in use",
             config.model_id, worker.quant_kind, device, worker.n_ctx, config.max_batch,
             devmem.human_bytes(worker.kv_cache_bytes), devmem.human_bytes(worker.vram_bytes),
             extra={"model": config.model_id, "vram_bytes": worker.vram_bytes, "worker_id": config.worker_id})
    return worker


def run_server(args: argparse.Namespace, settings: dict[str, Any], worker: Any, sock: socket.socket) -> int:
    import uvicorn

    from orcd.server.app import create_app

    server: WorkerServer | None = None

    def on_shutdown() -> None:
        assert server is not None
        server.begin_shutdown()

    app = create_app(worker, api_key=args.api_key, on_shutdown=on_shutdown)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=3,
                            timeout_keep_alive=5)
    server = WorkerServer(config, worker)
    host, port = sock.getsockname()[:2]
    uri = f"http://{_uri_host(host)}:{port}"
    log.info("listening on %s", uri, extra={"uri": uri, "worker_id": settings["worker_id"]})
    if args.callback_url:
        threading.Thread(target=server.report_ready, args=(args.callback_url, settings["worker_id"], uri),
                         name="orcd-callback", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        worker.close()
        sock.close()
    log.info("stopped", extra={"exit_code": server.exit_code})
    return server.exit_code


def _uri_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


class WorkerServer:
    """uvicorn's server with the worker's shutdown: the first SIGTERM/SIGINT (or ``POST /shutdown``) drains
    instead of closing the port, so late clients get a 503 rather than a refused connection; a second SIGINT
    forces the exit."""

    def __init__(self, config: Any, worker: Any) -> None:
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                # Not recorded in uvicorn's captured signals: it would re-raise SIGTERM after a clean shutdown,
                # and the process must exit 0.
                if outer.draining:
                    self.force_exit = True
                    self.should_exit = True
                else:
                    log.info("signal %d: shutting down", sig)
                    outer.begin_shutdown()

        self.server = _Server(config)
        self.worker = worker
        self.draining = False
        self.exit_code = 0

    def run(self, sockets: list[socket.socket]) -> None:
        self.server.run(sockets=sockets)

    def begin_shutdown(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.worker.begin_shutdown()
        threading.Thread(target=self._drain_then_stop, name="orcd-drain", daemon=True).start()

    def _drain_then_stop(self) -> None:
        clean = self.worker.drain()
        log.info("all jobs finished" if clean else "jobs still running at the deadline were cancelled")
        time.sleep(0.2)  # let the streams write their terminal events before connections are closed
        self.server.should_exit = True

    def report_ready(self, url: str, worker_id: str, uri: str) -> None:
        """POST ``{worker_id, vram_bytes, uri}`` once the server accepts connections; exit 1 if it never answers."""
        while not self.server.started:
            if self.server.should_exit:
                return
            time.sleep(0.02)
        body = json.dumps({"worker_id": worker_id, "vram_bytes": int(self.worker.vram_bytes), "uri": uri}).encode()
        last = ""
        for attempt in range(CALLBACK_ATTEMPTS):
            try:
                request = urllib.request.Request(url, data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=CALLBACK_TIMEOUT_S) as response:
                    log.info("ready reported to %s (HTTP %d)", url, response.status, extra={"callback_url": url})
                    return
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:
                last = str(getattr(e, "reason", e))
            log.warning("callback %s failed (attempt %d of %d): %s", url, attempt + 1, CALLBACK_ATTEMPTS, last)
            if attempt < len(CALLBACK_BACKOFF_S):
                time.sleep(CALLBACK_BACKOFF_S[attempt])
        log.error("the callback %s never answered (%s); exiting", url, last)
        print(f"orcd serve: error: the callback {url} never answered after {CALLBACK_ATTEMPTS} attempts ({last})",
              file=sys.stderr)
        self.exit_code = 1
        self.worker.begin_shutdown()
        self.server.should_exit = True
