"""``orcd serve`` as a process: argument checks (one line, exit 1), the memory check before loading, the default
(synthetic) model, the ready callback, JSON logs, and SIGTERM: no new jobs, the running job finishes, exit 0.

The subprocess runs ``orcd serve`` through a small launcher that registers the project's plugins explicitly (tests
never autoload entry points) and, where a job must outlast the test's actions, the test sampler plugin of
``server_harness`` that forbids end-of-generation tokens.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import make_plugin_manager
from server_harness import parse_sse, write_huge_context_model

from orcd.cli import build_parser
from orcd.commands import serve

TESTS_DIR = Path(__file__).parent

LAUNCHER = """
import os, sys
sys.path.insert(0, {tests_dir!r})
from conftest import make_plugin_manager
from orcd.cli import build_parser
from orcd.commands import serve

plugins = make_plugin_manager("quant_formats", "llama_adapter")
if os.environ.get("TEST_CALLBACK_BACKOFF"):
    serve.CALLBACK_BACKOFF_S = (float(os.environ["TEST_CALLBACK_BACKOFF"]),) * 4
args = build_parser().parse_args(sys.argv[1:])
if os.environ.get("TEST_NO_EOG"):
    from orcd.loader import load_tokenizer
    from orcd.modelfile import ModelFile
    from server_harness import NoEndOfGenerationPlugin, end_of_generation_ids

    path = args.model or str(serve.default_model(plugins)[0])
    eog = end_of_generation_ids(load_tokenizer(ModelFile.open(path)))
    plugins.register(NoEndOfGenerationPlugin(eog), name="test_no_eog")
sys.exit(serve.run(args, plugins=plugins))
"""


class ServeProcess:
    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        launcher = tmp_path / "launch_serve.py"
        launcher.write_text(LAUNCHER.format(tests_dir=str(TESTS_DIR)))
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, str(launcher), "serve", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        for line in list(self.lines):
            if text in line:
                return line
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if text in line:
                return line
        raise AssertionError(f"{text!r} never appeared in the log:\n" + "\n".join(self.lines[-30:]))

    def uri(self) -> str:
        line = self.wait_for("listening on")
        return json.loads(line)["uri"] if line.startswith("{") else line.rsplit(" ", 1)[-1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def processes():
    started: list[ServeProcess] = []
    yield started
    for p in started:
        p.kill()


def test_sigterm_finishes_the_running_job_and_exits_0(tmp_path: Path, processes: list) -> None:
    """No --model: the default model (a synthetic tiny Qwen2 written into the cache) is served and says so."""
    cache = tmp_path / "cache"
    p = ServeProcess(tmp_path, ["--port", "0", "--device", "cpu", "--log-format", "json"],
                     env={"ORCD_CACHE_DIR": str(cache), "TEST_NO_EOG": "1"})
    processes.append(p)
    uri = p.uri()
    assert (cache / serve.DEFAULT_MODEL_NAME).is_file()
    marker = "secret-prompt-marker-42"
    with httpx.Client(base_url=uri, timeout=30) as c:
        health = c.get("/health").json()
        assert health["synthetic"] is True and health["model"] == "default-qwen2-tiny-Q8_0"
        assert health["quant_kind"] == "Q8_0"
        with c.stream("POST", "/execute", json={"job_id": "j", "prompt": marker, "max_tokens": 600}) as r:
            events = parse_sse(r.iter_lines())
            assert next(events)[0] == "started"
            assert next(events)[0] == "token"
            p.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            p.wait_for("shutting down")
            with httpx.Client(base_url=uri, timeout=10) as late:
                refused = late.post("/execute", json={"job_id": "late", "prompt": "x", "max_tokens": 2})
                assert refused.status_code == 503 and refused.json()["code"] == "UNAVAILABLE"
                assert refused.headers["retry-after"]
                assert late.get("/health").json()["state"] == "draining"
            rest = list(events)
        assert rest[-1][0] == "end" and rest[-1][1]["tokens_out"] == 600  # the running job was finished
    assert p.proc.wait(timeout=30) == 0
    assert time.monotonic() - t0 < 30
    p.wait_for('"message": "stopped"', timeout=5)

    records = [json.loads(line) for line in p.lines if line.strip()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    assert not any(marker in line for line in p.lines)  # prompts are not logged by default
    assert [r["progress_percent"] for r in records if "progress_percent" in r] == [0, 25, 50, 75, 100]
    assert any(r.get("synthetic") is True and "SYNTHETIC" in r["message"] for r in records)
    assert any(r["message"] == "worker closed; model memory released" for r in records)
    assert any(r["message"] == "job finished" and r.get("tokens_out") == 600 for r in records)


class _Callback(BaseHTTPRequestHandler):
    received: queue.Queue = queue.Queue()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.put((self.path, self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_callback_reports_ready(tmp_path: Path, synth_model, processes: list) -> None:
    model = synth_model("qwen2", "F32")
    hook = HTTPServer(("127.0.0.1", 0), _Callback)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    worker_id = str(uuid.uuid4())
    try:
        p = ServeProcess(tmp_path, ["--model", str(model), "--port", "0", "--device", "cpu", "--worker-id", worker_id,
                                    "--callback-url", f"http://127.0.0.1:{hook.server_port}/workers/ready"])
        processes.append(p)
        path, content_type, body = _Callback.received.get(timeout=60)
        assert path == "/workers/ready" and content_type == "application/json"
        assert set(body) == {"worker_id", "vram_bytes", "uri"}
        assert body["worker_id"] == worker_id and body["vram_bytes"] > 0
        with httpx.Client(base_url=body["uri"], timeout=10) as c:  # the reported uri serves
            health = c.get("/health").json()
            assert health["worker_id"] == worker_id and health["vram_bytes"] == body["vram_bytes"]
            assert c.post("/shutdown").status_code == 202
        assert p.proc.wait(timeout=30) == 0
    finally:
        hook.shutdown()


def test_callback_never_answers_exits_1(tmp_path: Path, synth_model, processes: list) -> None:
    model = synth_model("qwen2", "F32")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    p = ServeProcess(tmp_path, ["--model", str(model), "--port", "0", "--device", "cpu",
                                "--callback-url", f"http://127.0.0.1:{port}/ready"],
                     env={"TEST_CALLBACK_BACKOFF": "0.05"})
    processes.append(p)
    assert p.proc.wait(timeout=60) == 1
    assert any("never answered" in line and f"127.0.0.1:{port}" in line for line in p.lines)
    assert sum("callback" in line and "failed (attempt" in line for line in p.lines) == serve.CALLBACK_ATTEMPTS


# --- in-process: arguments and the memory check -------------------------------------------------------------------


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def run_serve(argv: list[str], plugins=None) -> int:
    try:
        args = build_parser().parse_args(["serve", *argv])
    except SystemExit as e:
        return int(e.code)
    return serve.run(args, plugins=plugins)


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_argument_errors_are_one_line_and_exit_1(tmp_path: Path, synth_model, capsys, restore_logging) -> None:
    model = str(synth_model("qwen2", "F32"))
    busy = _busy_port()
    cases = [
        (["--worker-id", "not-a-uuid"], "--worker-id 'not-a-uuid' is not a UUID"),
        (["--model", str(tmp_path / "missing.gguf")], "missing.gguf: no such file"),
        (["--model", model, "--device", "tpu"], "--device: device 'tpu' is not one of cpu, cuda, cuda:N"),
        (["--model", model, "--port", "70000"], "--port 70000: must be between 0 and 65535"),
        (["--model", model, "--port", str(busy.getsockname()[1])], f"cannot bind 127.0.0.1:{busy.getsockname()[1]}"),
        (["--model", model, "--port", "abc"], "argument --port: invalid int value: 'abc'"),
        (["--model", model, "--callback-url", "ftp://x"], "must be an http:// or https:// URL"),
        (["--model", model, "--max-tokens-out", "0"], "--max-tokens-out 0: must be at least 1"),
        (["--model", model, "--inference-timeout-sec", "0"], "--inference-timeout-sec 0: must be more than 0"),
        (["--model", model, "--kv-cache-size-mb", "0"], "--kv-cache-size-mb 0: must be at least 1"),
        (["--model", model, "--device", "cpu", "--gpu-device", "0"], "not allowed with argument"),
    ]
    if not __import__("torch").cuda.is_available():
        cases.append((["--model", model, "--gpu-device", "0"], "CUDA is not available"))
    if os.geteuid() != 0:  # root reads any file
        unreadable = tmp_path / "unreadable.gguf"
        unreadable.write_bytes(b"GGUF")
        unreadable.chmod(0)
        cases.append((["--model", str(unreadable)], "not readable"))
    try:
        for argv, expected in cases:
            assert run_serve(argv) == 1, argv
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("orcd serve: error: "), (argv, err)
            assert expected in lines[0], (argv, lines[0])
    finally:
        busy.close()


def test_model_that_does_not_fit_exits_1_naming_sizes(tmp_path: Path, capsys, restore_logging) -> None:
    """A Qwen2 file whose context is 2^27 tokens: its KV cache alone (256 GiB in FP32) is more than this machine
    has, so the worker refuses before loading, naming required and available bytes, device and path."""
    path = write_huge_context_model(tmp_path / "huge-context.gguf")

    code = run_serve(["--model", str(path), "--device", "cpu", "--port", "0"],
                     plugins=make_plugin_manager("quant_formats", "llama_adapter"))
    assert code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("orcd serve: error: ") and str(path) in line and "on cpu" in line
    numbers = [int(w) for w in line.replace(",", " ").replace("(", " ").replace(")", " ").split() if w.isdigit()]
    required = (1 << 27) * 2 * 2 * 2 * 64 * 4  # context × K,V × layers × KV heads × head dim × FP32
    assert any(n > required for n in numbers)  # the total need (KV cache + weights + workspace)
    assert "bytes are available" in line


def test_default_model_is_written_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ORCD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ORCD_DEFAULT_MODEL", raising=False)
    plugins = make_plugin_manager("quant_formats", "llama_adapter")
    path, synthetic = serve.default_model(plugins)
    assert synthetic and path == tmp_path / serve.DEFAULT_MODEL_NAME and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert serve.default_model(plugins) == (path, True)
    assert path.stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob("*.tmp*"))
    from orcd.description import open_checked

    model, _ = open_checked(path, plugins)
    assert model.architecture == "qwen2" and serve.looks_synthetic(model)


def test_load_progress_draws_a_bar_on_a_terminal(capsys, caplog: pytest.LogCaptureFixture) -> None:
    progress = serve.LoadProgress(bar=True)
    with caplog.at_level("INFO", logger="orcd.serve"):
        for percent, message in [(0, "opening"), (25, "checked"), (50, "tokenizer"), (75, "weights"), (100, "ready")]:
            progress(percent, message)
    err = capsys.readouterr().err
    frames = err.split("\r")[1:]
    assert len(frames) == 5 and frames[0].startswith("[" + "." * 30 + "]   0% opening")
    assert frames[2].startswith("[" + "#" * 15 + "." * 15 + "]  50% tokenizer")
    assert frames[4].startswith("[" + "#" * 30 + "] 100% ready") and err.endswith("\n")
    assert [r.progress_percent for r in caplog.records] == [0, 25, 50, 75, 100]
