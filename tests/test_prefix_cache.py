"""The prefix cache: requests sharing a prompt prefix reuse its KV blocks and skip its prefill, with the same logits
(float32 on the CPU: within 1e-5, the only difference being how many rows the prefill matmuls had) and the same
greedy tokens as without the cache; chat turns reuse the previous turn's generated blocks; eviction under a small
pool; the hit rate in the worker's /metrics."""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import make_plugin_manager
from logit_recorder import RecordPlugin
from prometheus_client.parser import text_string_to_metric_families
from server_harness import LiveServer

from orcd.engine import Engine, GenerationRequest, TokenEvent
from orcd.loader import load_model
from orcd.sampling import SamplingParams


@pytest.fixture(scope="module")
def recorder() -> RecordPlugin:
    return RecordPlugin()


@pytest.fixture(scope="module")
def pm(recorder):
    pm = make_plugin_manager("quant_formats", "llama_adapter", "gpt_adapter")
    pm.register(recorder, name="recorder")
    return pm


@pytest.fixture(scope="module", params=["qwen2", "gpt-oss"])
def model(request, synth_model, pm):
    file_type = "MXFP4" if request.param == "gpt-oss" else "F32"
    return load_model(synth_model(request.param, file_type), "cpu", pm)


def ids(loaded, seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    special = loaded.tokenizer.special_ids
    ordinary = [i for i in range(loaded.config.vocab_size) if i not in special]
    return [ordinary[i] for i in torch.randint(0, len(ordinary), (length,), generator=g)]


def req(rid: str, prompt: list[int], n: int, record: str | None = None) -> GenerationRequest:
    sampling = SamplingParams(temperature=0.0, extra={"record": record} if record else {})
    return GenerationRequest(request_id=rid, prompt_ids=prompt, max_tokens=n, sampling=sampling, stop_token_ids=set())


def generate(engine: Engine, r: GenerationRequest) -> list[int]:
    return [e.token_id for e in engine.generate(r) if isinstance(e, TokenEvent)]


def test_shared_prefix_hits_and_changes_nothing(model, pm, recorder):
    """A system prompt of 40 tokens, then two different questions: the second request takes the two full blocks
    of 16 it shares with the first (32 tokens), and its logits at every step equal those of an engine without a
    prefix cache."""
    system = ids(model, 1, 40)
    first, second = system + ids(model, 2, 9), system + ids(model, 3, 13)
    cached = Engine(model, pm, max_batch=2, n_ctx=256)
    plain = Engine(model, pm, max_batch=2, n_ctx=256, prefix_cache=False)
    generate(cached, req("a", first, 4))
    assert cached.prefix_cache_stats == (0, 49)
    got = generate(cached, req("b", second, 12, record=f"{model.path.stem}-hit"))
    assert cached.prefix_cache_stats == (32, 49 + 53)
    want = generate(plain, req("b", second, 12, record=f"{model.path.stem}-plain"))
    assert plain.prefix_cache_stats == (0, 53)
    assert got == want
    hit, miss = recorder.factory.seen[f"{model.path.stem}-hit"], recorder.factory.seen[f"{model.path.stem}-plain"]
    assert len(hit) == len(miss) == 12
    assert max((h - m).abs().max().item() for h, m in zip(hit, miss)) < 1e-5


def test_identical_prompt_reuses_all_but_its_last_block(model, pm):
    prompt = ids(model, 4, 48)  # three full blocks: the last prompt token is always computed, so two are reused
    engine = Engine(model, pm, max_batch=1, n_ctx=128)
    a = generate(engine, req("a", prompt, 6))
    b = generate(engine, req("b", prompt, 6))
    assert a == b and engine.prefix_cache_stats == (32, 96)


def test_next_chat_turn_reuses_the_generated_blocks(model, pm):
    """Turn 2's prompt is turn 1's prompt, its reply and a new message: the reply's blocks were cached as they
    filled during decoding, so the hit reaches past the first prompt."""
    turn1 = ids(model, 5, 20)
    engine = Engine(model, pm, max_batch=1, n_ctx=256)
    reply = generate(engine, req("t1", turn1, 30))
    turn2 = turn1 + reply + ids(model, 6, 7)
    hits_before = engine.prefix_cache_stats[0]
    got = generate(engine, req("t2", turn2, 8))
    assert engine.prefix_cache_stats[0] - hits_before == 48  # positions 0..47: all written before turn 1 ended
    assert got == generate(Engine(model, pm, n_ctx=256, prefix_cache=False), req("t2", turn2, 8))


def test_concurrent_requests_share_blocks_and_eviction_keeps_results(model, pm):
    """A pool of 12 blocks: two requests with a common 32-token prefix run at once (the second shares the first's
    two blocks), then unrelated requests evict the cached blocks; every result equals the uncached one."""
    system = ids(model, 7, 33)
    prompts = {"x": system + ids(model, 8, 5), "y": system + ids(model, 9, 6)}
    engine = Engine(model, pm, max_batch=2, n_ctx=96, kv_cache_tokens=12 * 16)
    for rid, p in prompts.items():
        engine.add_request(req(rid, p, 20))
    got: dict[str, list[int]] = {"x": [], "y": []}
    while engine.has_work():
        for e in engine.step():
            if isinstance(e, TokenEvent):
                got[e.request_id].append(e.token_id)
    assert engine.prefix_cache_stats[0] == 32  # y was admitted after x's prefill: x's two prefix blocks
    plain = Engine(model, pm, max_batch=1, n_ctx=96, prefix_cache=False)
    assert got == {rid: generate(plain, req(rid, p, 20)) for rid, p in prompts.items()}
    blocks = engine.cache.blocks
    assert blocks.cached_blocks > 0
    generate(engine, req("big", ids(model, 10, 60), 36))  # 6 blocks: evicts
    generate(engine, req("big2", ids(model, 11, 60), 36))
    assert generate(engine, req("x2", prompts["x"], 20)) == got["x"]
    assert blocks.available == engine.cache.n_blocks


def _metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


def test_worker_metrics_report_the_hit_rate(synth_model):
    plugins = make_plugin_manager("quant_formats", "llama_adapter")
    server = LiveServer(synth_model("qwen2", "F32"), plugins, max_batch=2)
    try:
        prompt = "You are a helpful assistant. Answer briefly and precisely. " * 3
        with httpx.Client(base_url=server.url, timeout=30) as c:
            before = c.get("/metrics").text
            assert _metric(before, "orcd_prefix_cache_hit_ratio") == 0.0
            for i in range(2):
                with c.stream("POST", "/execute", json={"job_id": f"p{i}", "prompt": prompt + str(i),
                                                        "max_tokens": 3, "temperature": 0}) as r:
                    assert r.status_code == 200
                    list(r.iter_lines())
            text = c.get("/metrics").text
        n = len(server.worker.encode_prompt(prompt + "0"))
        hit = _metric(text, "orcd_prefix_cache_hit_tokens_total")
        looked_up = _metric(text, "orcd_prefix_cache_lookup_tokens_total")
        assert looked_up == n + len(server.worker.encode_prompt(prompt + "1"))
        assert hit >= 16 and hit % 16 == 0 and hit < n
        assert _metric(text, "orcd_prefix_cache_hit_ratio") == pytest.approx(hit / looked_up)
    finally:
        server.stop()
