"""The paged prefill-attention kernel (``orcd.nn.prefill_attention``) against today's path: ``PagedKVCache.update``
then ``attention`` (the oracle, taken with ``ORCD_KERNELS=0``).

Setup: a real ``PagedKVCache`` (block size 16) holding two sequences in interleaved, non-contiguous blocks: one
takes its first chunk (positions ``0 .. T-1``, nothing cached before), the other a later chunk at start 37 with
positions ``0 .. 36`` already in the cache (random history). A chunk of ``T`` = 5 or 33 tokens per sequence; GQA
14/2 and 64/8 heads of dimension 64, and 8/2 heads of dimension 96 (padded to 128 in the kernel); window None and 5;
sinks on and off. Blocks of 16 queries and 16 keys in the interpreter, so several of each are walked.

Checks: the pools hold exactly what ``update`` leaves there; outputs match the oracle within
``||out - ref||_max / max(1, ||ref||_max)``:

- float32 cache (the interpreter's main case): 1e-5. Both sides attend over the same values in float32 (the
  kernel's dots are IEEE fp32); only the summation order differs.
- float16 cache: 3e-3. The kernel rounds the (scaled) q and the probabilities to fp16 for the tensor-core dots
  (relative error ~5e-4 each, fp32 accumulation), the oracle's sinks path stays fp32 and SDPA fp32 on CPU; on a
  GPU without sinks the oracle itself is SDPA in fp16, which rounds the same way.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` set before it is imported); tests
skip without Triton (CI installs it: the test extra).
"""

from __future__ import annotations

import pytest
import torch

from orcd.engine.kv_cache import PagedKVCache
from orcd.nn.attention import SelfAttention, attention
from orcd.nn.batch import ForwardBatch

from kernel_support import gpu_test, greedy_tokens, interpreter_only  # sets TRITON_INTERPRET before a kernel module loads


@pytest.fixture(autouse=True)
def _kernels_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``PagedKVCache.prefill_attention`` takes the kernel on CPU tensors (in the interpreter) in these tests only."""
    monkeypatch.setenv("ORCD_INTERPRET_KERNELS", "1")


BLOCK = 16
STARTS = [0, 37]  # a first chunk, and a later one with positions 0..36 already cached
SHAPES = [(14, 2, 64), (64, 8, 64), (8, 2, 96)]  # (H_q, H_kv, D)


def relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.float() - y.float()).abs().max() / max(1.0, y.float().abs().max().item())).item()


def make_chunk(h_q: int, h_kv: int, d: int, t: int, device: str, dtype: torch.dtype,
               starts: list[int] = STARTS, seed: int = 0) -> tuple[PagedKVCache, dict]:
    """A cache whose sequences sit in interleaved blocks (random history), and one chunk's inputs."""
    g = torch.Generator().manual_seed(seed)
    kv_length = max(starts) + t
    n_blocks = sum(-(-(s + t) // BLOCK) for s in starts) + 2
    cache = PagedKVCache(1, h_kv, d, n_blocks=n_blocks, block_size=BLOCK, device=device, dtype=dtype)
    for s, start in enumerate(starts):
        assert cache.blocks.admit(s, [0] * start, start + t) is not None
    for n in range(1, kv_length + 1):  # grow in turns: each sequence's blocks are scattered
        for s, start in enumerate(starts):
            if n <= start + t:
                cache.blocks.grow(s, n)
    for pool in (cache.k[0], cache.v[0]):
        pool.copy_(torch.randn(pool.shape, generator=g).to(pool.dtype))
    b = len(starts)
    tables = cache.block_tables(list(range(b)), -(-kv_length // BLOCK))
    positions = torch.tensor([[s + i for i in range(t)] for s in starts], device=device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(device)

    chunk = {"q": rand(b, h_q, t, d), "k": rand(b, h_kv, t, d), "v": rand(b, h_kv, t, d), "positions": positions,
             "tables": tables, "sinks": rand(h_q), "kv_length": kv_length, "scale": d ** -0.5}
    return cache, chunk


def batch_of(cache: PagedKVCache, chunk: dict) -> ForwardBatch:
    b = chunk["positions"].shape[0]
    return ForwardBatch(torch.zeros_like(chunk["positions"]), chunk["positions"], cache, list(range(b)),
                        kv_length=chunk["kv_length"], block_tables=chunk["tables"])


def run_both(device: str, shape: tuple[int, int, int], t: int, window: int | None, sinks: bool,
             dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch, **blocks: int) -> tuple[torch.Tensor, ...]:
    """(kernel output, oracle output, kernel cache, oracle cache) for the same chunk."""
    h_q, h_kv, d = shape
    cache, chunk = make_chunk(h_q, h_kv, d, t, device, dtype)
    theirs, _ = make_chunk(h_q, h_kv, d, t, device, dtype)  # the same seed: the same cache and chunk
    sink = chunk["sinks"] if sinks else None
    if blocks:
        from orcd.nn.prefill_attention import prefill_attention

        batch = batch_of(cache, chunk)
        cache._write(0, chunk["k"], chunk["v"], batch)
        got = prefill_attention(chunk["q"], cache.k[0], cache.v[0], chunk["tables"], chunk["positions"], BLOCK,
                                chunk["scale"], window, sink, **blocks)
    else:
        got = cache.prefill_attention(0, chunk["q"], chunk["k"], chunk["v"], batch_of(cache, chunk),
                                      chunk["scale"], window, sink)
    monkeypatch.setenv("ORCD_KERNELS", "0")
    batch = batch_of(theirs, chunk)
    k, v = theirs.update(0, chunk["k"], chunk["v"], batch)
    want = attention(chunk["q"], k, v, batch.mask(window), chunk["scale"], sink)
    monkeypatch.delenv("ORCD_KERNELS")
    return got, want, cache, theirs


def check(device: str, shape: tuple[int, int, int], t: int, window: int | None, sinks: bool, dtype: torch.dtype,
          tol: float, monkeypatch: pytest.MonkeyPatch, **blocks: int) -> None:
    got, want, cache, theirs = run_both(device, shape, t, window, sinks, dtype, monkeypatch, **blocks)
    h_q, _, d = shape
    assert got.shape == want.shape == (len(STARTS), h_q, t, d) and got.dtype == want.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert torch.equal(cache.k[0], theirs.k[0]) and torch.equal(cache.v[0], theirs.v[0])
    assert relative(got, want) < tol, relative(got, want)


@interpreter_only
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("t", [5, 33])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_update_then_attention(shape, t, window, sinks, monkeypatch):
    check("cpu", shape, t, window, sinks, torch.float32, 1e-5, monkeypatch, block_m=16, block_n=16)


@interpreter_only
@pytest.mark.parametrize("t", [5, 33])
def test_a_window_wider_than_a_key_block(t, monkeypatch):
    """Window 40 with blocks of 16: key blocks every query sees (the unmasked loop) between masked ones."""
    check("cpu", (14, 2, 64), t, 40, True, torch.float32, 1e-5, monkeypatch, block_m=16, block_n=16)


@interpreter_only
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("shape", [(14, 2, 64), (4, 1, 128)])
def test_half_cache_dots_on_tensor_core_precision(shape, window, sinks, monkeypatch):
    """A float16 pool, as on CUDA: q and probabilities rounded to fp16 for the dots (the default blocks)."""
    check("cpu", shape, 33, window, sinks, torch.float16, 3e-3, monkeypatch)


@interpreter_only
def test_cache_method_takes_the_kernel_only_for_chunks(monkeypatch):
    """``PagedKVCache.prefill_attention`` answers a chunk with kernels on (the same result as the launcher); with
    kernels off or one token it returns ``None`` and leaves the cache untouched."""
    got, want, _, _ = run_both("cpu", (14, 2, 64), 5, 5, True, torch.float32, monkeypatch)
    assert relative(got, want) < 1e-5
    cache, chunk = make_chunk(14, 2, 64, 5, "cpu", torch.float32)
    before = cache.k[0].clone()
    args = (chunk["q"], chunk["k"], chunk["v"], batch_of(cache, chunk), chunk["scale"])
    monkeypatch.setenv("ORCD_KERNELS", "0")
    assert cache.prefill_attention(0, *args) is None
    monkeypatch.delenv("ORCD_KERNELS")
    one = ForwardBatch(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[3]]), cache, [0])
    q1, k1 = torch.randn(1, 14, 1, 64), torch.randn(1, 2, 1, 64)
    assert cache.prefill_attention(0, q1, k1, k1, one, 0.125) is None
    assert torch.equal(cache.k[0], before)


@interpreter_only
def test_a_late_chunk_takes_the_kernel_not_the_score_matrix(monkeypatch):
    """A chunk late in a long context goes through the kernel: ``update`` (the gathered window) and ``attention``
    (the ``(T, S)`` scores) are never called by a ``SelfAttention`` whose cache answers ``prefill_attention``."""
    import sys

    attn_module = sys.modules[SelfAttention.__module__]  # ``orcd.nn.attention`` the module (the package exports
    # a function of that name)
    cache, chunk = make_chunk(8, 2, 64, 5, "cpu", torch.float32, starts=[300])

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the (T, S) path was taken")

    monkeypatch.setattr(attn_module, "attention", forbidden)
    monkeypatch.setattr(cache, "update", forbidden)
    batch = batch_of(cache, chunk)
    out = cache.prefill_attention(0, chunk["q"], chunk["k"], chunk["v"], batch, chunk["scale"], None,
                                  chunk["sinks"])
    assert out is not None and torch.isfinite(out).all()

    layer = _self_attention(8, 2, 64, sinks=True)
    x = torch.randn(1, 5, 8 * 64)
    assert torch.isfinite(layer(x, batch)).all()


def _self_attention(h_q: int, h_kv: int, d: int, sinks: bool) -> SelfAttention:
    """A float32 ``SelfAttention`` with random dense projections (layer 0)."""
    from orcd.nn.attention import SeparateQKV
    from orcd.nn.rotary import RotaryEmbedding

    def lin(i: int, o: int) -> torch.nn.Linear:
        return torch.nn.Linear(i, o, bias=False)

    qkv = SeparateQKV(lin(h_q * d, h_q * d), lin(h_q * d, h_kv * d), lin(h_q * d, h_kv * d))
    return SelfAttention(0, qkv, lin(h_q * d, h_q * d), RotaryEmbedding(d, 10000.0), h_q, h_kv, d,
                         sinks=torch.randn(h_q) if sinks else None)


@interpreter_only
def test_a_gpt_oss_prefill_through_the_kernel_equals_the_torch_path(synth_model, plugins, monkeypatch):
    """Sinks and alternating sliding-window layers in a real model, prompts long enough for several chunks: the
    same greedy tokens with the kernels as through ``update`` + ``attention``."""
    import orcd.nn.prefill_attention as kernel
    from orcd.loader import load_model

    loaded = load_model(synth_model("gpt-oss", "MXFP4"), "cpu", plugins)
    windowed = [m for m in loaded.module.modules() if isinstance(m, SelfAttention) and m.sliding_window]
    assert windowed and all(m.sinks is not None for m in windowed)
    for m in windowed:
        m.sliding_window = 8  # the synthetic model's 128 would not cut into these short sequences
    launches: list[int] = []
    real = kernel.prefill_attention

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        launches.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel, "prefill_attention", counted)

    def run(kernels: str) -> list[int]:
        monkeypatch.setenv("ORCD_KERNELS", kernels)
        return greedy_tokens(loaded, plugins, (21, 40), 3, max_batch=2)

    with_kernel = run("1")
    assert launches
    assert with_kernel == run("0")


@gpu_test
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("t", [5, 33])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_update_then_attention_on_cuda(shape, t, window, sinks, monkeypatch):
    check("cuda", shape, t, window, sinks, torch.float16, 3e-3, monkeypatch)


@gpu_test
def test_a_late_chunk_does_not_allocate_the_score_matrix_on_cuda():
    """GPT-OSS-like heads (64/8, D 64) with sinks: a 512-token chunk at position 32768. The scores alone would be
    64 x 512 x 33280 x 4 bytes = 4.4 GB; the kernel's peak is its output plus the pools it was given."""
    t, start = 512, 32768
    cache, chunk = make_chunk(64, 8, 64, t, "cuda", torch.float16, starts=[start])
    batch = batch_of(cache, chunk)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = cache.prefill_attention(0, chunk["q"], chunk["k"], chunk["v"], batch, chunk["scale"], 128, chunk["sinks"])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert out is not None and torch.isfinite(out).all()
    assert peak < 64 * 2**20, peak  # output 8 MB, index rows ~0.3 MB, the k/v casts ~1 MB


@gpu_test
def test_a_chunk_captures_in_a_cuda_graph():
    """The launch makes no host sync: captured once, replayed after new positions are written into the same tensor
    (both chunks 3 positions earlier), it equals an eager run."""
    cache, chunk = make_chunk(64, 8, 64, 33, "cuda", torch.float16, starts=[5, 37])

    def run() -> torch.Tensor:  # a new batch per forward, as the engine's graphs build one inside the capture
        return cache.prefill_attention(0, chunk["q"], chunk["k"], chunk["v"], batch_of(cache, chunk),
                                       chunk["scale"], 5, chunk["sinks"])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    chunk["positions"].sub_(3)
    graph.replay()
    assert torch.isfinite(out).all()
    assert torch.equal(out, run())
