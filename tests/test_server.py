"""The worker API end to end: a real uvicorn server on a loopback port, a tiny synthetic Qwen2 model, the real
engine, and httpx as the client.

Two servers share the module: ``server`` (the plain model, with an API key) and ``long_server`` (the same model
with a test sampler plugin that forbids the end-of-generation tokens, so a job runs exactly to max_tokens — the
jobs that must still be running when the test cancels, disconnects or fills the queue).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import make_plugin_manager
from prometheus_client.parser import text_string_to_metric_families
from server_harness import (
    ExplodingSamplerPlugin,
    LiveServer,
    NoEndOfGenerationPlugin,
    end_of_generation_ids,
    parse_sse,
    wait_until,
)

from orcd.loader import load_model

API_KEY = "test-key-1234"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = 2048  # max_tokens of a job that must outlive the test's actions (it is cancelled long before the end)


@pytest.fixture(scope="module")
def model_path(synth_model) -> Path:
    return synth_model("qwen2", "F32")


@pytest.fixture(scope="module")
def server(model_path: Path):
    live = LiveServer(model_path, make_plugin_manager("quant_formats", "llama_adapter"), api_key=API_KEY,
                      max_body_bytes=64 * 1024, max_queue=4)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def long_server(model_path: Path):
    plugins = make_plugin_manager("quant_formats", "llama_adapter")
    tokenizer = load_model(model_path, plugins=plugins).tokenizer
    plugins.register(NoEndOfGenerationPlugin(end_of_generation_ids(tokenizer)), name="test_no_eog")
    plugins.register(ExplodingSamplerPlugin(), name="test_exploding")
    live = LiveServer(model_path, plugins, max_queue=4)
    yield live
    live.stop()


@pytest.fixture
def client(server: LiveServer):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture
def long_client(long_server: LiveServer):
    with httpx.Client(base_url=long_server.url, timeout=60) as c:
        yield c
    # every test leaves the long server idle and with its default settings
    assert wait_until(lambda: long_server.worker.running_jobs == 0 and long_server.worker.queue_length == 0)


_counter = iter(range(10**9))


def job(**fields: Any) -> dict[str, Any]:
    body = {"job_id": f"job-{next(_counter)}", "prompt": "Hello there, worker.", "max_tokens": 8}
    body.update(fields)
    return body


def execute(client: httpx.Client, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    with client.stream("POST", "/execute", json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(parse_sse(r.iter_lines()))


def check_sequence(events: list[tuple[str, dict[str, Any]]], job_id: str, model: str) -> dict[str, Any]:
    """started, token*, [metrics], then exactly one terminal event, nothing after it. Returns the terminal data."""
    kinds = [k for k, _ in events]
    assert kinds[0] == "started", kinds
    assert events[0][1]["job_id"] == job_id and events[0][1]["model"] == model
    assert events[0][1]["started_at"].endswith("Z")
    assert kinds[-1] in ("end", "error") and sum(k in ("end", "error") for k in kinds) == 1, kinds
    middle = kinds[1:-1]
    assert set(middle) <= {"token", "metrics"}
    if "metrics" in middle:
        assert middle.index("metrics") == len(middle) - 1  # after the last token
    tokens = [d for k, d in events if k == "token"]
    assert [t["i"] for t in tokens] == list(range(len(tokens)))
    for t in tokens:
        assert isinstance(t["t"], str)
        t["t"].encode("utf-8")  # a str from JSON is valid UTF-8 unless it holds a lone surrogate: this raises then
    return events[-1][1]


def texts(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [d["t"] for k, d in events if k == "token"]


# --- event sequences -------------------------------------------------------------------------------------------


def test_max_tokens_sequence(long_client: httpx.Client, long_server: LiveServer) -> None:
    body = job(max_tokens=12, temperature=0.8)
    events = execute(long_client, body)
    end = check_sequence(events, body["job_id"], long_server.worker.config.model_id)
    assert events[-1][0] == "end"
    assert end["stop_reason"] == "max_tokens"
    assert end["tokens_out"] == 12 == len(texts(events))
    assert 0 <= end["seed"] < 2**64 and isinstance(end["seed"], int)  # drawn by the worker: none was given
    assert end["decode_time_ms"] >= 0
    metrics = next(d for k, d in events if k == "metrics")
    assert metrics["tokens_out"] == 12 and metrics["prompt_tokens"] > 0


def test_eos_sequence(client: httpx.Client, server: LiveServer) -> None:
    """At temperature 2 the tiny model's distribution is close to uniform over 512 tokens, so an end-of-generation
    token comes within a few hundred tokens for almost every seed; the seeds are fixed, so this is deterministic."""
    for seed in range(10):
        body = job(max_tokens=2048, temperature=2.0, seed=seed)
        events = execute(client, body)
        end = check_sequence(events, body["job_id"], server.worker.config.model_id)
        assert end["seed"] == seed
        if end["stop_reason"] == "eos":
            assert end["tokens_out"] == len(texts(events)) < 2048
            return
    pytest.fail("no seed of 0..9 ended with an end-of-generation token")


def test_stop_sequence(long_client: httpx.Client) -> None:
    full = "".join(texts(execute(long_client, job(max_tokens=40, temperature=0))))
    stop = next(full[i:i + 3] for i in range(8, len(full) - 3) if full[i:i + 3].strip())
    events = execute(long_client, job(max_tokens=40, temperature=0, stop=[stop]))
    assert events[-1] == ("end", events[-1][1]) and events[-1][1]["stop_reason"] == "stop_sequence"
    assert "".join(texts(events)) == full[: full.index(stop)]


def test_seeded_runs_identical(long_client: httpx.Client) -> None:
    a = execute(long_client, job(max_tokens=30, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01,
                                 repetition_penalty=1.1, seed=1234))
    b = execute(long_client, job(max_tokens=30, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01,
                                 repetition_penalty=1.1, seed=1234))
    c = execute(long_client, job(max_tokens=30, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01,
                                 repetition_penalty=1.1, seed=1235))
    assert texts(a) == texts(b)
    assert a[-1][1] | {"decode_time_ms": 0} == b[-1][1] | {"decode_time_ms": 0}
    assert texts(a) != texts(c)  # the seed matters: 30 tokens from ~512 equal by chance is impossible in practice


def test_greedy_runs_identical_without_seed(long_client: httpx.Client) -> None:
    a = execute(long_client, job(max_tokens=20, temperature=0))
    b = execute(long_client, job(max_tokens=20, temperature=0))
    assert texts(a) == texts(b)
    assert isinstance(a[-1][1]["seed"], int)  # still reported


def test_haiku_twice_same_tokens(client: httpx.Client) -> None:
    """The seeds' haiku test: same model, prompt, seed and device → the same tokens."""
    body = {"prompt": "Write a haiku about GPU computing", "max_tokens": 50, "temperature": 0.7, "seed": 42}
    first = execute(client, {"job_id": "haiku-1", **body})
    second = execute(client, {"job_id": "haiku-2", **body})
    assert first[-1][0] == "end" and second[-1][0] == "end"
    assert texts(first) == texts(second) and len(texts(first)) == first[-1][1]["tokens_out"]
    assert first[-1][1]["stop_reason"] == second[-1][1]["stop_reason"]
    assert first[-1][1]["seed"] == second[-1][1]["seed"] == 42


def test_streamed_text_equals_engine_text(long_client: httpx.Client, long_server: LiveServer) -> None:
    """The byte-level vocabulary splits CJK and emoji over several tokens; the engine releases whole characters
    only. The server must hand each token's text on unchanged: the ``t`` of every token equals the text of the
    same token when the same request (same seed, same device) runs through a second engine on the same model."""
    from orcd.engine import Engine, GenerationRequest, TokenEvent
    from orcd.sampling import SamplingParams

    prompt = "日本語のテキスト 🚀🎉 emoji"
    events = execute(long_client, job(prompt=prompt, max_tokens=64, temperature=1.0, seed=7))
    assert events[-1][0] == "end"
    for t in texts(events):
        t.encode("utf-8")  # no lone surrogates
    worker = long_server.worker
    engine = Engine(worker.loaded, worker.plugins)
    request = GenerationRequest(request_id="direct", prompt_ids=worker.encode_prompt(prompt), max_tokens=64,
                                sampling=SamplingParams(temperature=1.0, seed=7))
    direct = [ev.text for ev in engine.generate(request) if isinstance(ev, TokenEvent)]
    assert texts(events) == direct


# --- validation ------------------------------------------------------------------------------------------------

INVALID = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2049}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.01}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 1.01}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop.0"),
    ({"stop": "x"}, "stop"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"job_id": ""}, "job_id"),
    ({"temprature": 0.5}, "temprature"),
]


@pytest.mark.parametrize("change,field", INVALID, ids=[f"{f}={v!r}"[:40] for c, f in INVALID for v in c.values()])
def test_invalid_request(client: httpx.Client, change: dict[str, Any], field: str) -> None:
    r = client.post("/execute", json=job(**change))
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["code"] == "INVALID_REQUEST" and body["field"] == field and body["message"]


@pytest.mark.parametrize("missing", ["job_id", "prompt"])
def test_missing_field(client: httpx.Client, missing: str) -> None:
    body = job()
    del body[missing]
    r = client.post("/execute", json=body)
    assert r.status_code == 400 and r.json() == {"code": "INVALID_REQUEST", "field": missing,
                                                 "message": f"field {missing!r} is required"}


def test_not_json(client: httpx.Client) -> None:
    r = client.post("/execute", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST"


def test_nulls_mean_defaults(long_client: httpx.Client) -> None:
    events = execute(long_client, job(max_tokens=2, seed=None, stop=None))
    assert events[-1][0] == "end" and isinstance(events[-1][1]["seed"], int)


def test_limits_at_the_edges_accepted(long_client: httpx.Client) -> None:
    events = execute(long_client, job(max_tokens=1, temperature=2.0, seed=2**64 - 1, top_p=0.0, top_k=0, min_p=1.0,
                                      repetition_penalty=0.01, stop=["a", "b", "c", "d"]))
    assert events[-1][0] == "end" and events[-1][1]["seed"] == 2**64 - 1


def test_prompt_longer_than_context(client: httpx.Client, server: LiveServer) -> None:
    prompt = "lorem ipsum dolor sit amet " * 800
    n = len(server.worker.encode_prompt(prompt))
    assert n >= server.worker.n_ctx
    r = client.post("/execute", json=job(prompt=prompt))
    assert r.status_code == 400 and r.json()["field"] == "prompt"
    assert str(n) in r.json()["message"] and str(server.worker.n_ctx) in r.json()["message"]
    assert client.get("/health").json()["status"] == "healthy"


def test_body_too_large(client: httpx.Client) -> None:
    big = job(prompt="x" * (70 * 1024))
    r = client.post("/execute", json=big)
    assert r.status_code == 413 and r.json()["code"] == "INVALID_REQUEST"

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"job_id": "big", "prompt": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}'

    r = client.post("/execute", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_key(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as anon:
        assert anon.get("/health").status_code == 200  # open: orchestrators probe it without the key
        for method, path in [("POST", "/execute"), ("POST", "/cancel"), ("GET", "/metrics"), ("GET", "/v1/models"),
                             ("POST", "/shutdown")]:
            r = anon.request(method, path, json={})
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
        r = anon.get("/metrics", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = anon.get("/metrics", headers={"Authorization": API_KEY})  # the scheme is required
        assert r.status_code == 401
        assert anon.get("/metrics", headers=AUTH).status_code == 200
    assert server.worker.accepting  # the refused /shutdown did nothing


# --- cancel, disconnect, queue, timeout --------------------------------------------------------------------------


def _open_stream(client: httpx.Client, body: dict[str, Any]):
    cm = client.stream("POST", "/execute", json=body)
    response = cm.__enter__()
    assert response.status_code == 200
    return cm, parse_sse(response.iter_lines())


def _next_kinds(events, n: int, kind: str = "token") -> list[tuple[str, dict]]:
    got = []
    for ev in events:
        got.append(ev)
        if sum(k == kind for k, _ in got) >= n:
            return got
    raise AssertionError(f"stream ended before {n} {kind} events: {got}")


def test_cancel_during_decode(long_client: httpx.Client, long_server: LiveServer) -> None:
    body = job(max_tokens=LONG, temperature=0.8)
    cm, events = _open_stream(long_client, body)
    try:
        _next_kinds(events, 3)
        with httpx.Client(base_url=long_server.url, timeout=10) as other:
            t0 = time.monotonic()
            r = other.post("/cancel", json={"job_id": body["job_id"]})
            assert r.status_code == 202
            rest = list(events)
            elapsed = time.monotonic() - t0
            assert rest[-1] == ("error", {"code": "CANCELLED", "message": "cancelled by the client",
                                          "retriable": False})
            assert elapsed < 0.1, f"the stream ended {elapsed * 1000:.0f} ms after the cancel"
            # idempotent: again, and for a job nobody knows
            assert other.post("/cancel", json={"job_id": body["job_id"]}).status_code == 202
            assert other.post("/cancel", json={"job_id": "never-existed"}).status_code == 202
    finally:
        cm.__exit__(None, None, None)
    assert long_server.worker.running_jobs == 0


def test_cancel_queued_job(long_client: httpx.Client, long_server: LiveServer) -> None:
    running, queued = job(max_tokens=LONG), job(max_tokens=4)
    cm1, ev1 = _open_stream(long_client, running)
    try:
        _next_kinds(ev1, 1)
        with httpx.Client(base_url=long_server.url, timeout=10) as c2:
            cm2, ev2 = _open_stream(c2, queued)
            try:
                assert wait_until(lambda: long_server.worker.queue_length == 1)
                assert c2.post("/cancel", json={"job_id": queued["job_id"]}).status_code == 202
                assert list(ev2) == [("error", {"code": "CANCELLED", "message": "cancelled by the client",
                                                "retriable": False})]  # never started
                assert long_server.worker.queue_length == 0
                c2.post("/cancel", json={"job_id": running["job_id"]})
            finally:
                cm2.__exit__(None, None, None)
        assert list(ev1)[-1][1]["code"] == "CANCELLED"
    finally:
        cm1.__exit__(None, None, None)


def test_queue_full_then_every_accepted_job_runs(long_client: httpx.Client, long_server: LiveServer) -> None:
    worker = long_server.worker
    worker.config.max_queue = 1
    try:
        first, second, third = job(max_tokens=LONG), job(max_tokens=4), job(max_tokens=4)
        cm1, ev1 = _open_stream(long_client, first)
        with httpx.Client(base_url=long_server.url, timeout=10) as c2, \
                httpx.Client(base_url=long_server.url, timeout=10) as c3:
            _next_kinds(ev1, 1)
            cm2, ev2 = _open_stream(c2, second)
            assert wait_until(lambda: worker.queue_length == 1)
            r = c3.post("/execute", json=third)
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json()["code"] == "QUEUE_FULL"
            c3.post("/cancel", json={"job_id": first["job_id"]})
            assert list(ev1)[-1][1]["code"] == "CANCELLED"
            rest = list(ev2)  # the queued job was not dropped: it runs once the first is gone
            assert rest[0][0] == "started" and rest[-1][0] == "end"
            cm1.__exit__(None, None, None)
            cm2.__exit__(None, None, None)
    finally:
        worker.config.max_queue = 4


def test_disconnect_cancels_job(long_client: httpx.Client, long_server: LiveServer) -> None:
    worker = long_server.worker
    before = worker.metrics.requests.labels(outcome="CANCELLED")._value.get()
    cm, events = _open_stream(long_client, job(max_tokens=LONG))
    _next_kinds(events, 2)
    t0 = time.monotonic()
    cm.__exit__(None, None, None)  # the client goes away mid-stream
    assert wait_until(lambda: worker.running_jobs == 0, timeout=2.0)
    assert time.monotonic() - t0 < 1.0
    assert wait_until(lambda: worker.metrics.requests.labels(outcome="CANCELLED")._value.get() == before + 1)
    events = execute(long_client, job(max_tokens=3))  # and the worker goes on serving
    assert events[-1][0] == "end"


def test_inference_timeout(long_client: httpx.Client, long_server: LiveServer) -> None:
    long_server.worker.config.inference_timeout_s = 0.3
    try:
        t0 = time.monotonic()
        events = execute(long_client, job(max_tokens=LONG))
        elapsed = time.monotonic() - t0
    finally:
        long_server.worker.config.inference_timeout_s = 300.0
    kind, data = events[-1]
    assert kind == "error" and data["code"] == "INFERENCE_TIMEOUT" and data["retriable"] is True
    assert 0.3 <= elapsed < 2.0
    assert 0 < len(texts(events)) < LONG


def test_duplicate_job_id_refused(long_client: httpx.Client, long_server: LiveServer) -> None:
    body = job(max_tokens=LONG)
    cm, events = _open_stream(long_client, body)
    try:
        _next_kinds(events, 1)
        with httpx.Client(base_url=long_server.url, timeout=10) as other:
            r = other.post("/execute", json=body)
            assert r.status_code == 409 and r.json()["field"] == "job_id"
            other.post("/cancel", json={"job_id": body["job_id"]})
        list(events)
    finally:
        cm.__exit__(None, None, None)


def test_failure_inside_the_engine_ends_only_that_job(long_client: httpx.Client, long_server: LiveServer) -> None:
    events = execute(long_client, job(max_tokens=8, top_k=13))  # the test sampler raises for top_k 13
    assert events[0][0] == "started"
    assert events[-1] == ("error", {"code": "INTERNAL", "retriable": False,
                                    "message": "the decode step failed: RuntimeError: sampler exploded"})
    assert long_server.worker.healthy
    assert wait_until(lambda: not long_server.worker.engine.has_work())  # its cache slot was released
    assert execute(long_client, job(max_tokens=3))[-1][0] == "end"


# --- health and metrics ------------------------------------------------------------------------------------------


def test_health_answers_fast_while_a_job_runs(long_client: httpx.Client, long_server: LiveServer) -> None:
    body = job(max_tokens=LONG)
    cm, events = _open_stream(long_client, body)
    try:
        _next_kinds(events, 2)
        latencies = []
        with httpx.Client(base_url=long_server.url, timeout=10) as probe:
            for _ in range(20):
                t0 = time.perf_counter()
                r = probe.get("/health")
                latencies.append(time.perf_counter() - t0)
                h = r.json()
                assert r.status_code == 200 and h["status"] == "healthy" and h["state"] == "busy"
                assert h["running_jobs"] == 1
            probe.post("/cancel", json={"job_id": body["job_id"]})
        list(events)
    finally:
        cm.__exit__(None, None, None)
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.02, latencies  # median
    assert latencies[-1] < 0.1, latencies


def test_health_fields(client: httpx.Client, server: LiveServer) -> None:
    h = client.get("/health").json()
    assert h["status"] == "healthy" and h["state"] == "idle" and h["accepting_jobs"] is True
    assert h["model"] == server.worker.config.model_id and h["quant_kind"] == "F32"
    # CPU: the model's tensors and the KV cache (FP32: 2 (K, V) × 2 layers × 2 KV heads × 64 × 2048 positions × 4 B)
    assert server.worker.kv_cache_bytes == 2 * 2 * 2 * 64 * 2048 * 4
    assert h["vram_bytes"] == server.worker.weights_bytes + server.worker.kv_cache_bytes
    assert h["uptime_seconds"] > 0 and h["synthetic"] is True and h["device"] == "cpu"
    assert h["context_length"] == 2048


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_fed_by_engine_hooks(long_client: httpx.Client, long_server: LiveServer) -> None:
    before = _samples(long_client.get("/metrics").text)
    execute(long_client, job(max_tokens=5))
    r = long_client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    after = _samples(r.text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("worker_tokens_generated_total") == 5
    assert delta("worker_requests_total", outcome="max_tokens") == 1
    assert delta("worker_time_to_first_token_seconds_count") == 1
    assert delta("worker_inter_token_latency_seconds_count") == 4
    assert delta("worker_prompt_tokens_total") > 0
    assert after[("worker_vram_bytes", ())] == long_server.worker.vram_bytes > long_server.worker.weights_bytes
    assert after[("worker_queue_length", ())] == 0
    assert after[("worker_uptime_seconds", ())] > 0
    assert ("worker_healthy", ()) in after


# --- the worker's own state ----------------------------------------------------------------------------------------


def test_shutdown_endpoint_drains(model_path: Path) -> None:
    plugins = make_plugin_manager("quant_formats", "llama_adapter")
    tokenizer = load_model(model_path, plugins=plugins).tokenizer
    plugins.register(NoEndOfGenerationPlugin(end_of_generation_ids(tokenizer)), name="test_no_eog")
    live = LiveServer(model_path, plugins)
    try:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            cm, events = _open_stream(c, job(max_tokens=300))
            _next_kinds(events, 1)
            with httpx.Client(base_url=live.url, timeout=10) as other:
                r = other.post("/shutdown")
                assert r.status_code == 202 and r.json()["running_jobs"] == 1
                r = other.post("/execute", json=job())
                assert r.status_code == 503 and r.json()["code"] == "UNAVAILABLE"
                assert other.get("/health").json()["state"] == "draining"
            rest = list(events)
            assert rest[-1][0] == "end" and rest[-1][1]["tokens_out"] == 300  # the running job finished
            cm.__exit__(None, None, None)
        assert live.worker.drain(1.0) is True
    finally:
        live.stop()


def test_close_ends_running_jobs_promptly(model_path: Path) -> None:
    plugins = make_plugin_manager("quant_formats", "llama_adapter")
    tokenizer = load_model(model_path, plugins=plugins).tokenizer
    plugins.register(NoEndOfGenerationPlugin(end_of_generation_ids(tokenizer)), name="test_no_eog")
    live = LiveServer(model_path, plugins)
    try:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            cm, events = _open_stream(c, job(max_tokens=LONG))
            _next_kinds(events, 1)
            t0 = time.monotonic()
            live.worker.close()  # what a forced exit does after uvicorn stops
            assert time.monotonic() - t0 < 1.0
            assert list(events)[-1] == ("error", {"code": "CANCELLED", "retriable": True,
                                                  "message": "the worker stopped; retry on another worker"})
            cm.__exit__(None, None, None)
        assert live.worker.engine is None and "orcd.server.metrics" not in " ".join(plugins.info)
    finally:
        live.stop()  # closing twice is harmless


def test_residency_check_marks_unhealthy(model_path: Path) -> None:
    live = LiveServer(model_path, make_plugin_manager("quant_formats", "llama_adapter"))
    try:
        worker = live.worker
        with httpx.Client(base_url=live.url, timeout=10) as c:
            assert execute(c, job(max_tokens=5))[-1][0] == "end"
            assert worker.check_residency() == []  # serving jobs moves nothing (no false alarm)
            assert c.get("/health").json()["last_residency_check"] is not None
            # a weight's storage is replaced behind the worker's back (as if it had been evicted and reloaded)
            qt = _first_quantized(worker.loaded.module)
            qt.data = qt.data.clone()
            problems = worker.check_residency()
            assert len(problems) == 1 and "storage replaced" in problems[0]
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "unhealthy"
            assert "storage replaced" in r.json()["reason"]
            r = c.post("/execute", json=job())
            assert r.status_code == 503 and r.json()["code"] == "UNAVAILABLE"
    finally:
        live.stop()


def _first_quantized(module):
    from orcd.quant import QuantizedTensor

    for mod in module.modules():
        for value in vars(mod).values():
            if isinstance(value, QuantizedTensor):
                return value
    raise AssertionError("the model holds no QuantizedTensor")


def test_prompts_not_logged_unless_asked(long_server: LiveServer, long_client: httpx.Client,
                                         caplog: pytest.LogCaptureFixture) -> None:
    marker = "zebra-marker-prompt"
    with caplog.at_level("INFO", logger="orcd.server"):
        execute(long_client, job(prompt=marker, max_tokens=2))
    assert caplog.records and all(marker not in r.getMessage() and getattr(r, "prompt", None) is None
                                  for r in caplog.records)
    assert any(getattr(r, "stop_reason", None) == "max_tokens" for r in caplog.records)
    caplog.clear()
    long_server.worker.config.log_prompts = True
    try:
        with caplog.at_level("INFO", logger="orcd.server"):
            execute(long_client, job(prompt=marker, max_tokens=2))
    finally:
        long_server.worker.config.log_prompts = False
    assert any(getattr(r, "prompt", None) == marker for r in caplog.records)


def test_concurrent_clients_all_served(long_server: LiveServer) -> None:
    """Four clients at once against one engine slot: all are queued, none dropped, each gets its own stream."""
    results: dict[int, list] = {}

    def run(i: int) -> None:
        with httpx.Client(base_url=long_server.url, timeout=60) as c:
            results[i] = execute(c, job(max_tokens=6, temperature=0.5, seed=i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [0, 1, 2, 3]
    for i, events in results.items():
        assert events[-1][0] == "end" and events[-1][1]["seed"] == i and len(texts(events)) == 6
