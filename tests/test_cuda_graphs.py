"""The decode step at fixed shapes (``StaticDecode``) and its CUDA graphs, against the eager step as the oracle.

On the CPU the fixed-shape step runs eagerly (``static_shapes=True``): bucketed batch and read length, padding rows
on the scratch block. It must give the eager step's logits (within 1e-5 relative to their scale: float32, the
padded matmuls sum in another order) and leave every real block of the cache as the eager step leaves it. The
folded-query attention used on CUDA is checked on the CPU in float32 too.

GPU tests (``-m gpu``, on the H100): graph replay against eager logits within 1e-3 relative (FP16 KV cache; the
padded shapes may pick other cuBLAS kernels), greedy tokens identical wherever the eager top-2 gap is not tiny,
several batch sizes with sequences joining and leaving, GPT-OSS (captures what it can, the rest eager), memory
flat across replays, the fused FP16 attention against float32, and a worker serving with graphs.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from conftest import make_plugin_manager
from logit_recorder import RecordPlugin

from orcd.engine import Engine, GenerationRequest, TokenEvent
from orcd.engine.graphs import StaticDecode, batch_buckets, next_power_of_two
from orcd.loader import load_model
from orcd.nn.attention import _fused_half, attention
from orcd.nn.batch import attention_mask
from orcd.sampling import SamplingParams


@pytest.fixture(scope="module")
def recorder() -> RecordPlugin:
    return RecordPlugin()


@pytest.fixture(scope="module")
def pm(recorder):
    pm = make_plugin_manager()
    pm.register(recorder, name="recorder")
    return pm


def ids(loaded: Any, seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    special = loaded.tokenizer.special_ids
    ordinary = [i for i in range(loaded.config.vocab_size) if i not in special]
    return [ordinary[i] for i in torch.randint(0, len(ordinary), (length,), generator=g)]


def req(rid: str, prompt: list[int], n: int, record: str | None) -> GenerationRequest:
    """A greedy request; ``record`` keeps every step's logits on the device (``logit_recorder``), None nothing."""
    extra = {"record": record} if record is not None else {}
    return GenerationRequest(request_id=rid, prompt_ids=prompt, max_tokens=n,
                             sampling=SamplingParams(temperature=0.0, extra=extra), stop_token_ids=set())


# Requests joining and leaving: (prompt length, max_tokens, step added). Batches of 1 to 7 sequences (buckets
# 1, 2, 4 and 8); one sequence reads past 128 positions (a longer length bucket).
SCHEDULE = {"a": (20, 24, 0), "b": (5, 6, 2), "c": (33, 10, 3), "d": (130, 8, 3), "e": (9, 12, 4), "f": (14, 5, 4),
            "g": (50, 9, 5), "h": (3, 16, 14)}


def run_schedule(engine: Engine, loaded: Any, tag: str, schedule: dict = SCHEDULE) -> tuple[dict[str, list[int]],
                                                                                          list[int]]:
    prompts = {k: ids(loaded, i, n) for i, (k, (n, _, _)) in enumerate(schedule.items())}
    got: dict[str, list[int]] = {k: [] for k in schedule}
    widths: list[int] = []
    step = 0
    while step <= max(at for _, _, at in schedule.values()) or engine.has_work():
        for k, (_, n, at) in schedule.items():
            if at == step:
                engine.add_request(req(k, prompts[k], n, f"{tag}-{k}"))
        events = engine.step()
        widths.append(sum(isinstance(e, TokenEvent) for e in events))
        for e in events:
            if isinstance(e, TokenEvent):
                got[e.request_id].append(e.token_id)
        step += 1
    return got, widths


def relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).abs().max() / max(1.0, y.abs().max().item())).item()


# --- CPU: the fixed-shape step without graphs ------------------------------------------------------------------------


def test_buckets():
    assert batch_buckets(1) == [1] and batch_buckets(5) == [1, 2, 4, 8] and batch_buckets(8) == [1, 2, 4, 8]
    assert [next_power_of_two(n) for n in (1, 2, 3, 8, 9)] == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("arch,file_type", [("qwen2", "F32"), ("phi3", "Q8_0")])
def test_static_shapes_equal_the_eager_step(synth_model, pm, recorder, arch, file_type):
    loaded = load_model(synth_model(arch, file_type), "cpu", pm)
    eager = Engine(loaded, pm, max_batch=8, n_ctx=192)
    static = Engine(loaded, pm, max_batch=8, n_ctx=192, static_shapes=True)
    assert static.static is not None and not static.static.capture and eager.static is None
    assert static.cache.scratch_block == static.cache.n_blocks  # one block past the pool, held by nobody
    want, widths = run_schedule(eager, loaded, f"{arch}-eager")
    got, _ = run_schedule(static, loaded, f"{arch}-static")
    assert got == want
    assert {static.static.batch_bucket(w) for w in widths if w} == {1, 2, 4, 8}
    seen = recorder.factory.seen
    for k in SCHEDULE:
        assert relative(torch.stack(seen[f"{arch}-static-{k}"]), torch.stack(seen[f"{arch}-eager-{k}"])) < 1e-5
    # the padding rows wrote only into the scratch block: every real block holds what the eager run left there
    rows = static.cache.n_blocks * static.cache.block_size
    for layer in range(loaded.config.block_count):
        for mine, theirs in ((static.cache.k[layer], eager.cache.k[layer]), (static.cache.v[layer], eager.cache.v[layer])):
            assert relative(mine[:rows], theirs) < 1e-5
    assert static.cache.k[0][rows:].abs().sum() > 0  # (and they did write there)


def test_static_decode_needs_a_scratch_block(synth_model, pm):
    loaded = load_model(synth_model("qwen2", "F32"), "cpu", pm)
    engine = Engine(loaded, pm, n_ctx=64)
    with pytest.raises(ValueError, match="scratch block"):
        StaticDecode(loaded.module, engine.cache, 1, 64, capture=False)


def test_length_buckets_and_a_full_context(synth_model, pm):
    """Read lengths round up to powers of two of blocks (at least 8), capped at the context; a sequence that
    fills its whole context still decodes through the fixed-shape step."""
    loaded = load_model(synth_model("qwen2", "F32"), "cpu", pm)
    engine = Engine(loaded, pm, max_batch=2, n_ctx=200, static_shapes=True)
    static = engine.static
    assert [static.length_bucket(n) for n in (1, 8, 9, 12, 13)] == [8, 8, 13, 13, 13]  # 200 positions: 13 blocks
    got = [e.token_id for e in engine.generate(req("full", ids(loaded, 3, 190), 50, "full-static"))
           if isinstance(e, TokenEvent)]
    want = [e.token_id for e in Engine(loaded, pm, n_ctx=200).generate(req("full", ids(loaded, 3, 190), 50,
                                                                           "full-eager"))
            if isinstance(e, TokenEvent)]
    assert got == want and len(got) == 11  # the context ends it


@pytest.mark.parametrize("window", [None, 5])
def test_folded_query_attention_equals_the_reference(window):
    """The CUDA half path folds each K/V head's query heads into rows; in float32 on the CPU it must equal the
    reference attention: a decode batch of different lengths, and a prompt chunk after cached positions."""
    torch.manual_seed(0)
    b, h_q, h_kv, d, s = 3, 8, 2, 16, 12
    for t, q_pos in ((1, torch.tensor([[11], [4], [7]])), (4, torch.arange(8, 12).expand(3, 4))):
        q = torch.randn(b, h_q, t, d)
        k, v = torch.randn(b, h_kv, s, d), torch.randn(b, h_kv, s, d)
        mask = attention_mask(q_pos, torch.arange(s), window)
        want = attention(q, k, v, mask, 0.25)
        got = _fused_half(q, k, v, mask, 0.25, h_q // h_kv, aligned_causal=False)
        assert (got - want).abs().max().item() < 1e-5
    # a prompt's first chunk: plain causal, no mask tensor needed
    q, k, v = torch.randn(1, h_q, s, d), torch.randn(1, h_kv, s, d), torch.randn(1, h_kv, s, d)
    mask = attention_mask(torch.arange(s)[None], torch.arange(s), None)
    got = _fused_half(q, k, v, mask, 0.25, h_q // h_kv, aligned_causal=True)
    assert (got - attention(q, k, v, mask, 0.25)).abs().max().item() < 1e-5


# --- GPU ---------------------------------------------------------------------------------------------------------------

def compare_runs(seen: dict[str, list[torch.Tensor]], got_tag: str, want_tag: str, got: dict[str, list[int]],
                 want: dict[str, list[int]], tol: float) -> None:
    """Logits within ``tol`` (relative) step by step, tokens equal, until a step where the tokens differ; that is
    only allowed where the oracle's top-2 gap is below 1e-2 (then the runs diverge and comparing stops)."""
    for k, expected in want.items():
        for i, (x, y) in enumerate(zip(seen[f"{got_tag}-{k}"], seen[f"{want_tag}-{k}"])):
            assert relative(x, y) < tol, (k, i)
            if got[k][i] != expected[i]:
                top2 = y.topk(2).values
                assert (top2[0] - top2[1]).item() < 1e-2, (k, i)
                break
        else:
            assert got[k] == expected


@pytest.mark.gpu
@pytest.mark.parametrize("arch,file_type", [("qwen2", "F32"), ("qwen2", "Q4_K_M"), ("phi3", "Q8_0"),
                                            ("phi3", "Q4_K_M")])
def test_graph_replay_equals_eager(synth_model, pm, recorder, arch, file_type):
    loaded = load_model(synth_model(arch, file_type), "cuda", pm)
    eager = Engine(loaded, pm, max_batch=8, n_ctx=192)
    graphs = Engine(loaded, pm, max_batch=8, n_ctx=192, cuda_graphs=True)
    assert graphs.static is not None and graphs.static.capture
    want, widths = run_schedule(eager, loaded, f"cuda-{arch}-{file_type}-eager")
    got, _ = run_schedule(graphs, loaded, f"cuda-{arch}-{file_type}-graphs")
    captured = graphs.static.graphs
    print(f"\n{arch} {file_type}: captured {captured}")
    assert {b for b, _ in captured} == {graphs.static.batch_bucket(w) for w in widths if w}  # every bucket used
    assert {w for _, w in captured} >= {8, 12}  # 192 positions: 8 blocks, then the whole 12
    compare_runs(recorder.factory.seen, f"cuda-{arch}-{file_type}-graphs", f"cuda-{arch}-{file_type}-eager",
                 got, want, 1e-3)


@pytest.mark.gpu
def test_graphs_with_gpt_oss(synth_model, pm, recorder):
    """GPT-OSS: sinks, sliding windows and the mixture of experts (the fused expert kernels group pairs by expert
    on the device, no host sync) inside the graph at every batch size; the results stay those of the eager step."""
    loaded = load_model(synth_model("gpt-oss", "MXFP4"), "cuda", pm)
    eager = Engine(loaded, pm, max_batch=8, n_ctx=192)
    graphs = Engine(loaded, pm, max_batch=8, n_ctx=192, cuda_graphs=True)
    want, _ = run_schedule(eager, loaded, "cuda-oss-eager")
    got, _ = run_schedule(graphs, loaded, "cuda-oss-graphs")
    print(f"\ngpt-oss: captured {graphs.static.graphs}, eager from batch {graphs.static._eager_from}")
    assert (1, 8) in graphs.static.graphs
    assert graphs.static._eager_from is None  # every batch bucket, 8 sequences (32 expert pairs) included
    compare_runs(recorder.factory.seen, "cuda-oss-graphs", "cuda-oss-eager", got, want, 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("arch,file_type", [("qwen2", "Q4_K_M"), ("gpt-oss", "MXFP4")])
def test_step_ahead_in_graphs_gives_the_plain_steps_tokens(synth_model, arch, file_type):
    """Plain greedy sequences (no sampler: the engine runs a step ahead, feeding each graph replay the previous
    step's argmax on the device) produce the tokens of the same engine reading every step (``overlap=False``),
    with sequences joining and leaving, one of them ending by a stop token."""
    plugins = make_plugin_manager()
    loaded = load_model(synth_model(arch, file_type), "cuda", plugins)
    prompts = {k: ids(loaded, 60 + i, n) for i, (k, n) in enumerate({"a": 20, "b": 5, "c": 33, "d": 130}.items())}
    plain_req = lambda k, n, stop=frozenset(): GenerationRequest(  # noqa: E731
        request_id=k, prompt_ids=prompts[k], max_tokens=n, sampling=SamplingParams(temperature=0.0),
        stop_token_ids=set(stop))

    def run(overlap: bool, stop: frozenset) -> dict[str, list[int]]:
        engine = Engine(loaded, plugins, max_batch=4, n_ctx=192, cuda_graphs=True, overlap=overlap)
        got: dict[str, list[int]] = {k: [] for k in prompts}
        schedule = {0: [("a", 24), ("b", 6)], 3: [("c", 10, stop)], 4: [("d", 8)]}
        step = 0
        while step <= max(schedule) or engine.has_work():
            for args in schedule.get(step, []):
                engine.add_request(plain_req(*args))
            for e in engine.step():
                if isinstance(e, TokenEvent):
                    got[e.request_id].append(e.token_id)
            step += 1
        assert engine.cache.blocks.available == engine.cache.n_blocks
        return got

    first = run(False, frozenset())
    stop = frozenset({first["c"][4]})  # c ends at its fifth token (or earlier, where that token came before)
    want = run(False, stop)
    assert len(want["c"]) <= 5
    assert run(True, stop) == want


@pytest.mark.gpu
def test_replays_allocate_nothing_and_are_faster(synth_model, pm):
    """After the first step of a bucket (capture), steps of that bucket leave the allocated memory where it was;
    and the replayed step is timed against the eager one (printed: for the lead's notes). The requests record no
    logits (the recorder keeps a device copy of every row; with it the H100 showed 409,600 B more after 50 steps,
    which is 4 rows x 50 x 512 x 4 B)."""
    loaded = load_model(synth_model("qwen2", "Q4_K_M"), "cuda", pm)
    timings = {}
    for graphs in (False, True):
        engine = Engine(loaded, pm, max_batch=4, n_ctx=512, cuda_graphs=graphs)
        for i in range(4):
            engine.add_request(req(f"m{i}", ids(loaded, 40 + i, 20), 300, None))
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        for _ in range(50):
            engine.step()
        torch.cuda.synchronize()
        timings[graphs] = (time.perf_counter() - t0) / 50
        if graphs:
            assert torch.cuda.memory_allocated() == before
        while engine.has_work():
            engine.step()
    print(f"\ndecode step, 4 sequences: eager {timings[False] * 1e3:.2f} ms, graphs {timings[True] * 1e3:.2f} ms")


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 64])
def test_fused_half_attention_equals_float32(window):
    """FP16 SDPA (flash for the aligned causal case, memory-efficient with the mask otherwise) against float32
    attention on the same FP16 keys and values: within 2e-3 (FP16 queries and probabilities)."""
    torch.manual_seed(0)
    dev = "cuda"
    h_q, h_kv, d = 14, 2, 64
    for b, t, s, q_pos in ((4, 1, 300, torch.tensor([[299], [17], [150], [64]])),
                           (1, 96, 300, torch.arange(204, 300)[None]),
                           (1, 300, 300, torch.arange(300)[None])):
        q = torch.randn(b, h_q, t, d, device=dev)
        k = torch.randn(b, h_kv, s, d, device=dev).half()
        v = torch.randn(b, h_kv, s, d, device=dev).half()
        mask = attention_mask(q_pos.to(dev), torch.arange(s, device=dev), window)
        aligned = t == s and window is None
        got = attention(q, k, v, mask, d ** -0.5, aligned_causal=aligned)
        want = attention(q.cpu(), k.float().cpu(), v.float().cpu(), mask.cpu(), d ** -0.5)
        assert got.dtype == torch.float32
        assert (got.cpu() - want).abs().max().item() < 2e-3, (b, t, s)


@pytest.mark.gpu
def test_worker_serves_with_graphs(synth_model):
    import httpx
    from server_harness import LiveServer, parse_sse

    plugins = make_plugin_manager("quant_formats", "llama_adapter")
    path = synth_model("qwen2", "Q4_K_M")
    bodies = [{"job_id": f"g{i}", "prompt": f"Tell me about {i}", "max_tokens": 24, "temperature": 0.0}
              for i in range(4)]

    def serve(cuda_graphs: bool) -> list[list[str]]:
        server = LiveServer(path, plugins, device="cuda", max_batch=4, cuda_graphs=cuda_graphs)
        try:
            out = []
            with httpx.Client(base_url=server.url, timeout=60) as c:
                for body in bodies:
                    with c.stream("POST", "/execute", json=body) as r:
                        events = list(parse_sse(r.iter_lines()))
                    assert events[-1][0] == "end"
                    out.append([d["t"] for k, d in events if k == "token"])
            if cuda_graphs:
                assert server.worker.engine.static.graphs
            return out
        finally:
            server.stop()

    assert serve(True) == serve(False)
