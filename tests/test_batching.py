"""Continuous batching: sequences join and leave a running batch and each produces what it produces alone — the
engine (every step's logits within 1e-5 of the lone run, relative to the logits' scale: float32 on the CPU, batched
matmuls sum in another order; tokens identical, greedy and seeded) for Qwen2, Phi-3 and GPT-OSS (sinks, sliding
window, MoE); and the worker
serving several jobs at once, each stream equal to the same job run alone, cancel ending only its own job, and jobs
waiting in the queue while the KV cache cannot promise their blocks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from conftest import make_plugin_manager
from logit_recorder import RecordPlugin
from server_harness import (
    LiveServer,
    NoEndOfGenerationPlugin,
    end_of_generation_ids,
    parse_sse,
    wait_until,
)

from orcd.engine import Engine, FinishEvent, GenerationRequest, TokenEvent
from orcd.loader import load_model
from orcd.sampling import SamplingParams


@pytest.fixture(scope="module")
def recorder() -> RecordPlugin:
    return RecordPlugin()


@pytest.fixture(scope="module")
def pm(recorder):
    pm = make_plugin_manager()
    pm.register(recorder, name="recorder")
    return pm


ARCHS = {"qwen2": "F32", "phi3": "Q8_0"}


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request, synth_model, pm):
    return load_model(synth_model(request.param, ARCHS[request.param]), "cpu", pm)


@pytest.fixture(scope="module")
def gpt_oss(synth_model, pm):
    return load_model(synth_model("gpt-oss", "MXFP4"), "cpu", pm)


def close(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest difference between two runs' logits, relative to their scale (at least 1)."""
    return max(((x - y).abs().max() / max(1.0, y.abs().max().item())).item() for x, y in zip(a, b))


def ids(loaded, seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    special = loaded.tokenizer.special_ids
    ordinary = [i for i in range(loaded.config.vocab_size) if i not in special]
    return [ordinary[i] for i in torch.randint(0, len(ordinary), (length,), generator=g)]


def req(rid: str, prompt: list[int], n: int, record: str | None = None, **sampling: Any) -> GenerationRequest:
    params = SamplingParams(**({"temperature": 0.0} | sampling), extra={"record": record} if record else {})
    return GenerationRequest(request_id=rid, prompt_ids=prompt, max_tokens=n, sampling=params, stop_token_ids=set())


def test_sequences_joining_and_leaving_equal_each_alone(model, pm, recorder):
    """Six requests, at most four at once, added at different steps: each request's logits at every step and its
    tokens equal those of the request run alone in an engine of its own."""
    tag = model.path.stem
    specs = {  # id: (prompt length, max_tokens, step at which it is added, sampling)
        "a": (45, 14, 0, {}), "b": (7, 5, 0, {}), "c": (30, 9, 2, {"temperature": 0.9, "seed": 3}),
        "d": (18, 12, 3, {}), "e": (60, 6, 4, {"temperature": 1.3, "seed": 11, "top_k": 20}), "f": (3, 10, 9, {}),
    }
    prompts = {k: ids(model, i, n) for i, (k, (n, *_)) in enumerate(specs.items())}
    alone: dict[str, list[int]] = {}
    for k, (_, n, _, sampling) in specs.items():
        engine = Engine(model, pm, n_ctx=160)
        alone[k] = [e.token_id for e in engine.generate(req(k, prompts[k], n, f"{tag}-alone-{k}", **sampling))
                    if isinstance(e, TokenEvent)]
    engine = Engine(model, pm, max_batch=4, n_ctx=160)
    got: dict[str, list[int]] = {k: [] for k in specs}
    widths, step = [], 0
    while step < 10 or engine.has_work():
        for k, (_, n, at, sampling) in specs.items():
            if at == step:
                engine.add_request(req(k, prompts[k], n, f"{tag}-batch-{k}", **sampling))
        events = engine.step()
        widths.append(sum(isinstance(e, TokenEvent) for e in events))
        for e in events:
            if isinstance(e, TokenEvent):
                got[e.request_id].append(e.token_id)
        step += 1
    assert got == alone
    assert max(widths) == 4 and 1 in widths[9:]  # a full batch at some step, and f alone at the end
    for k in specs:
        batch, single = recorder.factory.seen[f"{tag}-batch-{k}"], recorder.factory.seen[f"{tag}-alone-{k}"]
        assert len(batch) == len(single) == specs[k][1]
        assert close(batch, single) < 1e-5
    assert engine.cache.blocks.available == engine.cache.n_blocks


def test_gpt_oss_batch_across_its_sliding_window(gpt_oss, pm, recorder):
    """GPT-OSS (sinks; every other layer sees 128 positions; MoE): a sequence past its window decodes next to
    short ones, with the logits it has alone."""
    specs = {"long": (150, 4), "short": (9, 6), "mid": (40, 3)}
    prompts = {k: ids(gpt_oss, 30 + i, n) for i, (k, (n, _)) in enumerate(specs.items())}
    for k, (_, n) in specs.items():
        list(Engine(gpt_oss, pm, n_ctx=192).generate(req(k, prompts[k], n, f"oss-alone-{k}")))
    engine = Engine(gpt_oss, pm, max_batch=3, n_ctx=192)
    for k, (_, n) in specs.items():
        engine.add_request(req(k, prompts[k], n, f"oss-batch-{k}"))
    while engine.has_work():
        engine.step()
    seen = recorder.factory.seen
    for k, (_, n) in specs.items():
        assert len(seen[f"oss-batch-{k}"]) == n
        assert close(seen[f"oss-batch-{k}"], seen[f"oss-alone-{k}"]) < 1e-5


def test_cancel_in_a_batch_ends_only_that_sequence(model, pm):
    prompts = [ids(model, 20 + i, 10 + 5 * i) for i in range(3)]
    alone = [[e.token_id for e in Engine(model, pm, n_ctx=96).generate(req(f"s{i}", p, 12))
              if isinstance(e, TokenEvent)] for i, p in enumerate(prompts)]
    engine = Engine(model, pm, max_batch=3, n_ctx=96)
    for i, p in enumerate(prompts):
        engine.add_request(req(f"s{i}", p, 12))
    events: list = []
    for _ in range(4):
        events += engine.step()
    engine.cancel("s1")
    while engine.has_work():
        events += engine.step()
    finishes = {e.request_id: e for e in events if isinstance(e, FinishEvent)}
    assert finishes["s1"].reason == "CANCELLED" and finishes["s1"].completion_tokens == 4
    for i in (0, 2):
        assert [e.token_id for e in events if isinstance(e, TokenEvent) and e.request_id == f"s{i}"] == alone[i]
        assert finishes[f"s{i}"].reason == "max_tokens"


# --- the worker ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(synth_model):
    return synth_model("qwen2", "F32")


def slow_plugins(model_path, delay_s: float = 0.002):
    """The project's plugins plus the test sampler that forbids end-of-generation tokens and takes ``delay_s`` a
    token, so that jobs run to max_tokens and overlap long enough to be seen running together."""
    plugins = make_plugin_manager("quant_formats", "llama_adapter")
    tokenizer = load_model(model_path, plugins=plugins).tokenizer
    plugins.register(NoEndOfGenerationPlugin(end_of_generation_ids(tokenizer), delay_s), name="test_no_eog")
    return plugins


def execute(url: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/execute", json=body) as r:
        assert r.status_code == 200, r.read()
        return list(parse_sse(r.iter_lines()))


def texts(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [d["t"] for k, d in events if k == "token"]


def run_concurrently(url: str, bodies: list[dict[str, Any]], watch: Callable[[], None] | None = None,
                     ) -> dict[str, list]:
    results: dict[str, list] = {}

    def one(body: dict[str, Any]) -> None:
        results[body["job_id"]] = execute(url, body)

    threads = [threading.Thread(target=one, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if watch is not None:
            watch()
        time.sleep(0.005)
    for t in threads:
        t.join()
    return results


BODIES = [
    {"prompt": "The quick brown fox", "max_tokens": 40, "temperature": 0.0},
    {"prompt": "Write a haiku about GPU computing", "max_tokens": 30, "temperature": 0.7, "seed": 42},
    {"prompt": "Once", "max_tokens": 50, "temperature": 1.0, "seed": 7, "top_p": 0.9},
    {"prompt": "A much longer prompt that spans a few more tokens than the others do, " * 3, "max_tokens": 25,
     "temperature": 0.5, "seed": 1, "top_k": 40},
]


def test_worker_runs_jobs_at_once_each_stream_as_alone(model_path):
    server = LiveServer(model_path, slow_plugins(model_path), max_batch=4, max_queue=8)
    try:
        alone = {}
        for i, body in enumerate(BODIES):
            events = execute(server.url, body | {"job_id": f"alone-{i}"})
            assert events[-1][0] == "end"
            alone[i] = texts(events)
        running: list[int] = []
        got = run_concurrently(server.url, [b | {"job_id": f"batch-{i}"} for i, b in enumerate(BODIES)],
                               watch=lambda: running.append(server.worker.running_jobs))
        assert max(running) >= 3  # they ran together, not one after the other
        for i, body in enumerate(BODIES):
            events = got[f"batch-{i}"]
            assert events[0][0] == "started" and events[-1][0] == "end"
            assert events[-1][1]["tokens_out"] == body["max_tokens"]
            assert texts(events) == alone[i]
        assert wait_until(lambda: server.worker.running_jobs == 0)
        engine = server.worker.engine
        assert engine.cache.blocks.available == engine.cache.n_blocks
    finally:
        server.stop()


def test_worker_cancel_ends_one_job_of_a_batch(model_path):
    server = LiveServer(model_path, slow_plugins(model_path), max_batch=4)
    try:
        body = {"prompt": "Keep going", "max_tokens": 60, "temperature": 0.0}
        alone = texts(execute(server.url, body | {"job_id": "alone"}))
        results: dict[str, list] = {}

        def one(job_id: str) -> None:
            results[job_id] = execute(server.url, body | {"job_id": job_id})

        threads = [threading.Thread(target=one, args=(f"j{i}",)) for i in range(3)]
        for t in threads:
            t.start()
        assert wait_until(lambda: server.worker.running_jobs == 3)
        time.sleep(0.05)
        with httpx.Client(base_url=server.url) as c:
            assert c.post("/cancel", json={"job_id": "j1"}).status_code == 202
        for t in threads:
            t.join(30)
        assert results["j1"][-1] == ("error", {"code": "CANCELLED", "message": "cancelled by the client",
                                               "retriable": False})
        for j in ("j0", "j2"):
            assert results[j][-1][0] == "end" and texts(results[j]) == alone
    finally:
        server.stop()


def test_jobs_wait_in_the_queue_while_the_kv_cache_is_promised(model_path):
    """A pool of 8 blocks of 16 and jobs promised 4 each: at most two run at once though four places are free;
    the others wait queued and all finish."""
    server = LiveServer(model_path, slow_plugins(model_path), max_batch=4, kv_cache_tokens=128)
    try:
        n_prompt = len(server.worker.encode_prompt("Count: one two three"))
        max_tokens = 64 - n_prompt + 1  # prompt + max_tokens - 1 = 64 positions = 4 blocks
        assert server.worker.engine.blocks_needed(n_prompt, max_tokens) == 4
        seen: list[tuple[int, int]] = []
        got = run_concurrently(
            server.url,
            [{"job_id": f"q{i}", "prompt": "Count: one two three", "max_tokens": max_tokens, "temperature": 0.0}
             for i in range(4)],
            watch=lambda: seen.append((server.worker.running_jobs, server.worker.queue_length)))
        assert all(events[-1][0] == "end" for events in got.values())
        assert max(r for r, _ in seen) == 2 and max(q for _, q in seen) >= 1
        assert len({tuple(texts(events)) for events in got.values()}) == 1
    finally:
        server.stop()


def test_job_larger_than_the_kv_cache_is_refused(model_path):
    plugins = make_plugin_manager("quant_formats", "llama_adapter")
    server = LiveServer(model_path, plugins, max_batch=2, kv_cache_tokens=64)
    try:
        with httpx.Client(base_url=server.url) as c:
            r = c.post("/execute", json={"job_id": "big", "prompt": "Hello", "max_tokens": 100})
        assert r.status_code == 400
        assert r.json()["field"] == "max_tokens" and "KV cache blocks" in r.json()["message"]
    finally:
        server.stop()


def test_serve_flags_set_the_batch_and_the_pool(model_path, capsys):
    """``orcd serve --max-batch N --kv-cache-size-mb M``: N jobs at once, a pool of M MiB (more than one context
    here), refused below 1; without them 4 jobs at once on the CPU and a pool of one context."""
    from orcd import device as devmem
    from orcd.cli import build_parser
    from orcd.commands import serve
    from orcd.description import open_checked

    parse = build_parser().parse_args
    assert serve.run(parse(["serve", "--model", str(model_path), "--max-batch", "0", "--port", "0"])) == 1
    assert capsys.readouterr().err.strip() == "orcd serve: error: --max-batch 0: must be at least 1"
    plugins = make_plugin_manager("quant_formats", "llama_adapter")
    _, config = open_checked(model_path, plugins)
    cpu = torch.device("cpu")
    per_token = devmem.kv_bytes_per_token(config, 4)
    for argv, batch, pool in ((["--max-batch", "3", "--kv-cache-size-mb", "64"], 3, 64 * 2**20 // per_token),
                              ([], 4, config.context_length)):
        args = parse(["serve", "--model", str(model_path), *argv])
        n_ctx = devmem.serving_context(config, cpu, args.kv_cache_size_mb)
        tokens = serve.kv_pool_tokens(config, cpu, args.kv_cache_size_mb, n_ctx)
        assert (n_ctx, tokens) == (config.context_length, pool)
        worker = serve.load_worker(args, {"device": cpu, "worker_id": "00000000-0000-4000-8000-000000000001"},
                                   plugins, model_path, n_ctx, True, tokens)
        try:
            assert worker.config.max_batch == worker.engine.max_batch == batch
            assert worker.kv_cache_bytes == -(-pool // 16) * 16 * per_token
        finally:
            worker.close()
