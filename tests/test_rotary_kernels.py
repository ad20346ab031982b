"""The fused rotary kernel (orcd.nn.rotary_kernels) against the torch path (``RotaryEmbedding.apply``), its oracle.

``apply_qk`` takes the kernel where ``use_kernels`` allows; ``apply`` is always the torch path, so each test compares
the two on the same inputs: q ``(B, H_q, T, D)`` and k ``(B, H_kv, T, D)`` as a contiguous tensor, as the transposed
view ``SelfAttention`` makes of a projection's output, and as that view of a slice of a fused QKV output; full and
partial rotary (the tail passes unchanged); GQA head counts 14/2 and 64/8 (and 4/4); T = 1 (decode) and 5; B = 1
and 3, each sequence at its own positions.

Tolerances. The kernel does the torch path's fp32 operations in its order, each product rounded (the launch turns
FMA contraction off), so the results are equal bit for bit: checked exactly for fp32 and fp16 inputs, in the
interpreter and on CUDA. bf16: torch and compiled Triton round fp32 to bf16 to nearest (exact on CUDA), Triton's
interpreter truncates, so there it is checked to one bf16 ulp (rtol 2**-7).

Without a GPU the kernel runs in the interpreter (``TRITON_INTERPRET=1``, set here before it is imported, and
``ORCD_INTERPRET_KERNELS=1``, set per test, so other CPU tests keep the torch path); the tests
skip when Triton is not installed (CI installs it: the test extra). The ``gpu``-marked tests run the compiled kernel on CUDA, including a CUDA
graph capture and replay.
"""

from __future__ import annotations

import pytest
import torch

from orcd.nn.rotary import RopeScaling, RotaryEmbedding

from kernel_support import gpu_test, interpreter_only, needs_triton  # sets TRITON_INTERPRET before a kernel module loads


@pytest.fixture(autouse=True)
def _kernels_on_cpu(monkeypatch) -> None:
    """``apply_qk`` takes the kernel on CPU tensors (in the interpreter) in these tests only."""
    monkeypatch.setenv("ORCD_INTERPRET_KERNELS", "1")


# (H_q, H_kv, head_dim, rotary dim): Qwen2-0.5B-like, Llama-70B-like, partial rotary with a tail.
HEADS = [(14, 2, 64, 64), (64, 8, 128, 128), (4, 4, 80, 48)]
LAYOUTS = ["contiguous", "view", "fused_qkv"]


def make_qk(b: int, t: int, hq: int, hkv: int, d: int, layout: str, dtype: torch.dtype, device: str,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k with the strides they arrive with in ``SelfAttention.forward``."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if layout == "contiguous":
        return randn(b, hq, t, d), randn(b, hkv, t, d)
    if layout == "view":  # separate projections: (B, T, H * D) viewed as heads, then transposed
        q, k = randn(b, t, hq * d), randn(b, t, hkv * d)
    else:  # one projection, rows Q then K then V, split along the last dimension (Phi-3's attn_qkv)
        q, k, _ = randn(b, t, (hq + 2 * hkv) * d).split((hq * d, hkv * d, hkv * d), dim=-1)
    return q.view(b, t, hq, d).transpose(1, 2), k.view(b, t, hkv, d).transpose(1, 2)


def cos_sin(rotary: RotaryEmbedding, b: int, t: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence at its own offset (a batched decode step or prefill chunk)."""
    positions = torch.arange(t).unsqueeze(0) + 37 * torch.arange(b).unsqueeze(1) + 3
    cos, sin = rotary.cos_sin(positions.to(rotary.inv_freq.device))
    return cos.to(device), sin.to(device)


def run_both(b: int, t: int, heads: tuple[int, int, int, int], layout: str, dtype: torch.dtype, device: str,
             seed: int = 0):
    hq, hkv, d, rot = heads
    gen = torch.Generator().manual_seed(seed)
    rotary = RotaryEmbedding(rot, 10000.0, RopeScaling("yarn", 4.0, 64), device=device)  # mscale != 1
    q, k = make_qk(b, t, hq, hkv, d, layout, dtype, device, gen)
    cos, sin = cos_sin(rotary, b, t, device)
    q_in, k_in = q.clone(), k.clone()
    assert rotary._kernel_applies(q, k, cos, sin)
    q_out, k_out = rotary.apply_qk(q, k, cos, sin)
    assert torch.equal(q, q_in) and torch.equal(k, k_in)  # inputs untouched
    assert q_out.dtype == dtype and k_out.dtype == dtype
    assert q_out.shape == q.shape and k_out.shape == k.shape
    return (q_out, k_out), (rotary.apply(q, cos, sin), rotary.apply(k, cos, sin))


@interpreter_only
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "{}-{}-d{}-r{}".format(*h))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("b,t", [(1, 1), (3, 1), (1, 5), (3, 5)])
def test_interpreter_matches_torch_path(heads, layout, b, t):
    (q_out, k_out), (q_ref, k_ref) = run_both(b, t, heads, layout, torch.float32, "cpu")
    assert torch.equal(q_out, q_ref)
    assert torch.equal(k_out, k_ref)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interpreter_half_inputs(dtype):
    (q_out, k_out), (q_ref, k_ref) = run_both(3, 5, (4, 4, 80, 48), "fused_qkv", dtype, "cpu")
    if dtype == torch.float16:
        assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    else:  # the interpreter truncates fp32 to bf16 (compiled Triton and torch round to nearest): one bf16 ulp
        torch.testing.assert_close(q_out, q_ref, rtol=2**-7, atol=0)
        torch.testing.assert_close(k_out, k_ref, rtol=2**-7, atol=0)


@interpreter_only
def test_output_layouts():
    """q contiguous (B, H, T, D); k a transposed view of contiguous (B, T, H, D), which the paged cache's
    ``k.transpose(1, 2).reshape(b * t, h, d)`` takes without a copy."""
    (q_out, k_out), _ = run_both(3, 5, (14, 2, 64, 64), "view", torch.float32, "cpu")
    assert q_out.is_contiguous()
    assert k_out.transpose(1, 2).is_contiguous()


@interpreter_only
def test_kernel_runs_once_for_q_and_k(monkeypatch):
    from orcd.nn import rotary_kernels

    launches = []
    kernel = rotary_kernels._rotary_qk_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(rotary_kernels, "_rotary_qk_kernel", Spy())
    run_both(1, 1, (14, 2, 64, 64), "view", torch.float32, "cpu")
    assert len(launches) == 1


@needs_triton
def test_falls_back_to_torch_path(monkeypatch):
    """``ORCD_KERNELS=0``, CPU tensors outside the kernel tests, autograd inputs and shapes the kernel does not
    take keep the torch path."""
    rotary = RotaryEmbedding(64, 10000.0)
    gen = torch.Generator().manual_seed(1)
    q, k = make_qk(1, 5, 4, 2, 64, "view", torch.float32, "cpu", gen)
    cos, sin = cos_sin(rotary, 1, 5, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ORCD_INTERPRET_KERNELS", "0")
    assert not rotary._kernel_applies(q, k, cos, sin)
    monkeypatch.setenv("ORCD_INTERPRET_KERNELS", "1")
    assert rotary._kernel_applies(q, k, cos, sin)
    assert not rotary._kernel_applies(q.requires_grad_(), k, cos, sin)
    q = q.detach()
    assert not rotary._kernel_applies(q, k[:, :, :4], cos, sin)  # T differs
    assert not rotary._kernel_applies(q, k, cos.double(), sin.double())
    monkeypatch.setenv("ORCD_KERNELS", "0")
    assert not rotary._kernel_applies(q, k, cos, sin)
    q_out, k_out = rotary.apply_qk(q, k, cos, sin)
    assert torch.equal(q_out, rotary.apply(q, cos, sin)) and torch.equal(k_out, rotary.apply(k, cos, sin))


@gpu_test
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "{}-{}-d{}-r{}".format(*h))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("b,t", [(1, 1), (3, 1), (1, 5), (3, 5), (2, 333)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_matches_torch_path(heads, layout, b, t, dtype):
    (q_out, k_out), (q_ref, k_ref) = run_both(b, t, heads, layout, dtype, "cuda")
    assert torch.equal(q_out, q_ref), (q_out - q_ref).abs().max()
    assert torch.equal(k_out, k_ref), (k_out - k_ref).abs().max()


@gpu_test
def test_gpu_cuda_graph_capture():
    """Captured once, replayed on new inputs copied into the static ones: the decode step's use."""
    rotary = RotaryEmbedding(64, 10000.0, device="cuda")
    gen = torch.Generator().manual_seed(2)
    q, k = make_qk(1, 1, 14, 2, 64, "view", torch.float32, "cuda", gen)
    cos, sin = cos_sin(rotary, 1, 1, "cuda")
    rotary.apply_qk(q, k, cos, sin)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out, k_out = rotary.apply_qk(q, k, cos, sin)
    q_new, k_new = make_qk(1, 1, 14, 2, 64, "contiguous", torch.float32, "cuda", gen)
    q.copy_(q_new)
    k.copy_(k_new)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(q_out, rotary.apply(q, cos, sin)) and torch.equal(k_out, rotary.apply(k, cos, sin))
