"""The paged decode-attention kernel (``orcd.nn.decode_attention``) against today's path: ``PagedKVCache.update``
then ``attention`` (the oracle, taken with ``ORCD_KERNELS=0``).

Setup: a real ``PagedKVCache`` (block size 16, a scratch block) holding three sequences of different lengths
(37, 5 and 20 positions written: not multiples of the block size) in interleaved, non-contiguous blocks, plus a
padding row at position 0 of the scratch block (as ``StaticDecode`` pads a CUDA-graph batch). One decode step
stores each sequence's new key and value and attends; the read length ``kv_length`` is larger than any position
(a length bucket). GQA 14/2 and 64/8 heads of dimension 64, sliding window None and 5, sinks on and off, one key
range and a read split over several (the combine kernel); one and two query heads per K/V head (the path without
tl.dot) at Phi-3's head dimension 96. Phi-3's launch is also compiled for an H100 (sm_90) and must not spill
registers to local memory (padded into a tl.dot it spilled 2.3 KB a thread and took 84% of a decode step); so
must GPT-OSS's launches (fp16 tl.dot; the kernel tests above run the same launches on an fp16 cache). The fp32-dot
path (a cache in another dtype) is checked too.

Checks: the pools hold exactly what ``update`` leaves there (same rounding to the cache's dtype); outputs match
the oracle within ``||out - ref||_max / max(1, ||ref||_max)``:

- interpreter (CPU): 1e-5. Both sides attend over the same fp16 cache values in float32 (the kernel's dots are
  IEEE fp32, or fp16 dots of q and the probabilities cut into two fp16 parts each, which carry ~22 bits; the new key
  is rounded to fp16 as the pool holds it); only the summation order and that last rounding differ.
- GPU: 2e-3 without sinks: today's CUDA path is SDPA in fp16 (q and the probabilities rounded to fp16, ~5e-4
  each, fp32 accumulation) while the kernel keeps q and probabilities in fp32. 1e-4 with sinks: both fp32
  over fp16 values (a margin for the GPU's exp and reduction order).

Padding rows must be finite; with one padding row they equal the oracle too. Without a GPU the kernels run in
Triton's interpreter (``TRITON_INTERPRET=1`` set before they are imported); tests skip without Triton
(CI installs it: the test extra).
"""

from __future__ import annotations

import pytest
import torch

from orcd.engine.kv_cache import PagedKVCache
from orcd.nn.attention import SelfAttention, attention
from orcd.nn.batch import ForwardBatch

# kernel_support sets TRITON_INTERPRET before a kernel module loads
from kernel_support import INTERPRETED, gpu_test, greedy_tokens, interpreter_only, needs_triton


@pytest.fixture(autouse=True)
def _kernels_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``PagedKVCache.decode_attention`` takes the kernel on CPU tensors (in the interpreter) in these tests only."""
    monkeypatch.setenv("ORCD_INTERPRET_KERNELS", "1")


BLOCK = 16
LENGTHS = [37, 5, 20]  # positions each sequence has written; the decode step writes position LENGTHS[i]
KV_LENGTH = 64  # the read length: a bucket past every position
HEADS = [(14, 2), (64, 8)]
HEAD_DIM = 64
SCALE = HEAD_DIM ** -0.5


def relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.float() - y.float()).abs().max() / max(1.0, y.float().abs().max().item())).item()


def make_step(h_kv: int, h_q: int, device: str, seed: int = 0, head_dim: int = HEAD_DIM) -> tuple[PagedKVCache, dict]:
    """A cache whose three sequences sit in interleaved blocks (random history), and one decode step's inputs."""
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(1, h_kv, head_dim, n_blocks=12, block_size=BLOCK, device=device, dtype=torch.float16,
                         scratch_block=True)
    for s, n in enumerate(LENGTHS):
        cache.blocks.admit(s, [0] * n, KV_LENGTH)
    for n in range(1, max(LENGTHS) + 2):  # grow in turns: each sequence's blocks are scattered
        for s, length in enumerate(LENGTHS):
            if n <= length + 1:
                cache.blocks.grow(s, n)
    assert cache.blocks.table(0) != list(range(cache.blocks.table(0)[0], cache.blocks.table(0)[0] + 3))
    for pool in (cache.k[0], cache.v[0]):
        pool.copy_(torch.randn(pool.shape, generator=g).to(pool.dtype))
    width = KV_LENGTH // BLOCK
    tables = cache.block_tables([0, 1, 2], width)
    tables = torch.cat([tables, torch.full((1, width), cache.scratch_block, device=device)])  # the padding row
    positions = torch.tensor(LENGTHS + [0], device=device)[:, None]
    b = len(positions)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(device)

    step = {"q": rand(b, h_q, 1, head_dim), "k": rand(b, h_kv, 1, head_dim), "v": rand(b, h_kv, 1, head_dim),
            "positions": positions, "tables": tables, "sinks": rand(h_q)}
    return cache, step


def batch_of(cache: PagedKVCache, step: dict) -> ForwardBatch:
    b = step["positions"].shape[0]
    return ForwardBatch(torch.zeros_like(step["positions"]), step["positions"], cache, [-1] * b,
                        kv_length=KV_LENGTH, block_tables=step["tables"])


def oracle(cache: PagedKVCache, step: dict, window: int | None, sinks: bool) -> torch.Tensor:
    batch = batch_of(cache, step)
    k, v = cache.update(0, step["k"], step["v"], batch)
    return attention(step["q"], k, v, batch.mask(window), SCALE, step["sinks"] if sinks else None)


def check(device: str, h_q: int, h_kv: int, window: int | None, sinks: bool, splits: int | None, tol: float,
          monkeypatch: pytest.MonkeyPatch, head_dim: int = HEAD_DIM, f16_dot: bool | None = None,
          early_values: bool = False) -> None:
    from orcd.nn.decode_attention import decode_attention

    cache, step = make_step(h_kv, h_q, device, head_dim=head_dim)
    theirs, _ = make_step(h_kv, h_q, device, head_dim=head_dim)  # the same seed: the same cache and step
    got = decode_attention(step["q"], step["k"], step["v"], cache.k[0], cache.v[0], step["tables"],
                           step["positions"], BLOCK, KV_LENGTH, SCALE, window, step["sinks"] if sinks else None,
                           splits=splits, f16_dot=f16_dot, early_values=early_values)
    monkeypatch.setenv("ORCD_KERNELS", "0")
    want = oracle(theirs, step, window, sinks)
    assert got.shape == want.shape == (4, h_q, 1, head_dim) and got.dtype == want.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert torch.equal(cache.k[0], theirs.k[0]) and torch.equal(cache.v[0], theirs.v[0])
    assert relative(got, want) < tol, relative(got, want)


@interpreter_only
@pytest.mark.parametrize("splits", [None, 3, 16])  # 16: ranges left empty
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("h_q,h_kv", HEADS)
def test_kernel_equals_update_then_attention(h_q, h_kv, window, sinks, splits, monkeypatch):
    check("cpu", h_q, h_kv, window, sinks, splits, 1e-5, monkeypatch)


@interpreter_only
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [None, 5])
def test_kernel_with_fp32_dots_equals_update_then_attention(window, sinks, monkeypatch):
    """The tl.dot path without the fp16 tensor-core dots (what a cache in another dtype takes)."""
    check("cpu", 14, 2, window, sinks, 3, 1e-5, monkeypatch, f16_dot=False)


# One or two query heads per K/V head take the products-summed path (no tl.dot); Phi-3's head dim is 96.
FMA_HEADS = [(4, 4), (8, 4)]


@interpreter_only
@pytest.mark.parametrize("early_values", [False, True])
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("h_q,h_kv", FMA_HEADS)
def test_kernel_without_dot_equals_update_then_attention(h_q, h_kv, window, splits, early_values, monkeypatch):
    check("cpu", h_q, h_kv, window, False, splits, 1e-5, monkeypatch, head_dim=96, early_values=early_values)


@interpreter_only
def test_self_attention_takes_the_kernel_only_for_one_token_steps(monkeypatch):
    """``PagedKVCache.decode_attention`` answers only a one-token step with kernels on; otherwise ``None`` (the
    caller keeps ``update`` + ``attention``), and it leaves the cache untouched then."""
    cache, step = make_step(2, 14, "cpu")
    batch = batch_of(cache, step)
    args = (step["q"], step["k"], step["v"], batch, SCALE)
    out = cache.decode_attention(0, *args)
    assert out is not None and out.shape == (4, 14, 1, HEAD_DIM)
    cache, step = make_step(2, 14, "cpu")
    before = cache.k[0].clone()
    monkeypatch.setenv("ORCD_KERNELS", "0")
    assert cache.decode_attention(0, step["q"], step["k"], step["v"], batch_of(cache, step), SCALE) is None
    monkeypatch.delenv("ORCD_KERNELS")
    two = ForwardBatch(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[3, 4]]), cache, [0])
    q2, k2 = torch.randn(1, 14, 2, HEAD_DIM), torch.randn(1, 2, 2, HEAD_DIM)
    assert cache.decode_attention(0, q2, k2, k2, two, SCALE) is None
    assert torch.equal(cache.k[0], before)


@interpreter_only
def test_a_gpt_oss_decode_through_the_kernel_equals_the_torch_path(synth_model, plugins, monkeypatch):
    """Sinks and alternating sliding-window layers in a real model: the fixed-shape decode step (padding rows,
    length buckets, a window of 8) gives the same greedy tokens with the kernel as through ``update`` +
    ``attention``."""
    import orcd.nn.decode_attention as kernel
    from orcd.loader import load_model

    loaded = load_model(synth_model("gpt-oss", "MXFP4"), "cpu", plugins)
    windowed = [m for m in loaded.module.modules() if isinstance(m, SelfAttention) and m.sliding_window]
    assert windowed and all(m.sinks is not None for m in windowed)
    for m in windowed:
        m.sliding_window = 8  # the synthetic model's 128 would not cut into these short sequences
    launches: list[int] = []

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        launches.append(1)
        return real(*args, **kwargs)

    real = kernel.decode_attention
    monkeypatch.setattr(kernel, "decode_attention", counted)

    def run(kernels: str) -> list[int]:
        monkeypatch.setenv("ORCD_KERNELS", kernels)
        return greedy_tokens(loaded, plugins, (21, 3, 40), 4, max_batch=4, static_shapes=True)

    with_kernel = run("1")
    assert launches  # every layer of every decode step took the kernel
    assert with_kernel == run("0")


@gpu_test
@pytest.mark.parametrize("splits", [None, 3, 16])  # 16: ranges left empty
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("h_q,h_kv", HEADS)
def test_kernel_equals_update_then_attention_on_cuda(h_q, h_kv, window, sinks, splits, monkeypatch):
    check("cuda", h_q, h_kv, window, sinks, splits, 1e-4 if sinks else 2e-3, monkeypatch)


@gpu_test
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("h_q,h_kv", FMA_HEADS)
@pytest.mark.parametrize("early_values", [False, True])
def test_kernel_without_dot_equals_update_then_attention_on_cuda(h_q, h_kv, window, splits, early_values, monkeypatch):
    check("cuda", h_q, h_kv, window, False, splits, 2e-3, monkeypatch, head_dim=96, early_values=early_values)


@gpu_test
def test_kernel_step_captures_in_a_cuda_graph():
    """The launch makes no host sync: captured once, replayed with new positions written into the same tensors."""
    from orcd.nn.decode_attention import decode_attention

    cache, step = make_step(8, 64, "cuda")

    def run() -> torch.Tensor:
        return decode_attention(step["q"], step["k"], step["v"], cache.k[0], cache.v[0], step["tables"],
                                step["positions"], BLOCK, KV_LENGTH, SCALE, 5, step["sinks"])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    step["positions"].copy_(torch.tensor([[38], [6], [21], [0]], device="cuda"))
    graph.replay()
    assert torch.isfinite(out).all()
    assert torch.equal(out, run())


def _sm90_stack_bytes(consts: dict) -> tuple[int, str]:
    """``_decode_kernel`` with ``consts`` compiled for an H100 (sm_90) without a GPU: its stack frame in bytes, where
    spilled registers go, from ``cuobjdump -res-usage`` (shipped with Triton), and the whole report."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from orcd.nn import decode_attention as da

    fn = da._decode_kernel
    types = {"tables_ptr": "*i32", "pos_ptr": "*i64", "kc_ptr": "*fp16", "vc_ptr": "*fp16", "scale": "fp32"}
    signature = {a: "constexpr" if a in consts else types.get(a, "*fp32" if a.endswith("_ptr") else "i32")
                 for a in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": da.WARPS})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    stack = re.search(r"STACK:(\d+)", usage)
    assert stack is not None, usage
    return int(stack.group(1)), usage


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="compiles for sm_90; the interpreter replaces the compiler")
@pytest.mark.parametrize("window", [None, 2047])
def test_phi3_launch_compiles_for_sm_90_without_spills(window):
    """Phi-3-mini's decode attention (32 query heads on 32 K/V heads of dimension 96, split key ranges) as
    ``decode_attention`` launches it, compiled for an H100 without a GPU, keeps every value in registers."""
    import triton

    from orcd.nn import decode_attention as da

    group, d = 1, 96
    assert group <= da.MAX_FMA_GROUP
    consts = {"GROUP": group, "D": d, "BLOCK_G": triton.next_power_of_2(group), "BLOCK_D": triton.next_power_of_2(d),
              "BLOCK_N": da._block_n(False, window), "HAS_WINDOW": window is not None, "HAS_SINKS": False,
              "SPLIT": True, "USE_DOT": False, "F16_DOT": False, "EARLY_VALUES": False}
    stack, usage = _sm90_stack_bytes(consts)
    assert stack == 0, usage


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="compiles for sm_90; the interpreter replaces the compiler")
@pytest.mark.parametrize("window", [128, None])
def test_gpt_oss_launches_compile_for_sm_90_without_spills(window):
    """GPT-OSS's layers (64 query heads on 8 K/V heads of dimension 64, sinks, split ranges; sliding-window and full)
    take the tl.dot path with fp16 dots (an fp16 cache) at ``_block_n``'s keys a step, which keeps every value in
    registers on sm_90 (with fp32 dots, 64 keys a step spilled ~400 B a thread)."""
    from orcd.nn import decode_attention as da

    consts = {"GROUP": 8, "D": 64, "BLOCK_G": 16, "BLOCK_D": 64, "BLOCK_N": da._block_n(True, window),
              "HAS_WINDOW": window is not None, "HAS_SINKS": True, "SPLIT": True, "USE_DOT": True, "F16_DOT": True,
              "EARLY_VALUES": False}
    stack, usage = _sm90_stack_bytes(consts)
    assert stack == 0, usage
