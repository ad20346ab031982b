"""Fused RMSNorm, residual-add + RMSNorm and SwiGLU kernels (orcd.nn.norm_kernels) against the torch path.

The oracle is the torch code the modules fall back to (``ORCD_KERNELS=0``). Tolerances, as max |diff| / max |ref|:
- fp32: 1e-6. The norm's sum of squares is reduced in another order than torch's (and ``rsqrt``/``exp`` may differ
  by an ulp or two), so a few ulps (~1.2e-7 each) of relative error, not bit equality; the residual sum ``h`` is one
  rounded fp32 add in both paths and must match exactly.
- fp16: 1e-3. Both paths compute in fp32 and round once to fp16 (half-ulp 4.9e-4 relative); SwiGLU's torch path
  also rounds ``silu(g)`` to fp16 before the product, so results may differ by an fp16 ulp (~1e-3 relative).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here before they are imported);
the tests skip when Triton is not installed (CI installs it: the test extra). The ``gpu``-marked tests run the compiled
kernels on CUDA over the same shapes plus the model widths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_support import gpu_test, interpreter_only  # sets TRITON_INTERPRET before a kernel module loads

from orcd.nn import RMSNorm
from orcd.nn import mlp as mlp_module
from orcd.nn import norm as norm_module


@pytest.fixture(autouse=True)
def _kernels_on_cpu(monkeypatch) -> None:
    """The modules take the kernels on CPU tensors (in the interpreter) in these tests only."""
    monkeypatch.setenv("ORCD_INTERPRET_KERNELS", "1")


TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3}
CPU_WIDTHS = [100, 896, 2880]
GPU_WIDTHS = [100, 896, 2880, 3072, 4096, 8192]
ROWS = [1, 37]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def make_norm(width: int, device: str, seed: int) -> RMSNorm:
    g = torch.Generator().manual_seed(seed)
    return RMSNorm(1.0 + 0.1 * torch.randn(width, generator=g), eps=1e-6).to(device)


def rand(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)


@pytest.fixture
def kernels_off(monkeypatch):
    """Run the torch path (the oracle) inside ``with kernels_off():``."""
    import contextlib

    @contextlib.contextmanager
    def off():
        with monkeypatch.context() as m:
            m.setenv("ORCD_KERNELS", "0")
            yield
    return off


def check_norm(width: int, rows: int, dtype: torch.dtype, device: str, kernels_off) -> None:
    from orcd.nn import norm_kernels

    norm = make_norm(width, device, seed=width)
    x = rand((rows, width), dtype, device, seed=rows)
    d = rand((rows, width), dtype, device, seed=rows + 1)
    with kernels_off():
        ref, ref_h = norm(x), x + d
        ref_n = norm(ref_h)
    got = norm_kernels.rms_norm(x, norm.weight, norm.eps)
    got_h, got_n = norm_kernels.add_rms_norm(x, d, norm.weight, norm.eps)
    assert got.dtype == dtype and got.shape == x.shape
    assert got_h.dtype == dtype and got_n.dtype == dtype
    assert rel_err(got, ref) <= TOLERANCE[dtype]
    assert torch.equal(got_h, ref_h)
    assert rel_err(got_n, ref_n) <= TOLERANCE[dtype]


def check_swiglu(width: int, rows: int, dtype: torch.dtype, device: str, fused: bool) -> None:
    from orcd.nn import norm_kernels

    if fused:  # the halves of one [gate | up] projection: strided views, read in place
        g, u = rand((rows, 2 * width), dtype, device, seed=width).chunk(2, dim=-1)
    else:
        g, u = rand((rows, width), dtype, device, seed=width), rand((rows, width), dtype, device, seed=width + 1)
    ref = F.silu(g) * u
    got = norm_kernels.swiglu(g, u)
    assert got.dtype == dtype and got.shape == g.shape
    assert rel_err(got, ref) <= TOLERANCE[dtype]


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", CPU_WIDTHS)
def test_norm_interpreted(width: int, rows: int, dtype: torch.dtype, kernels_off) -> None:
    check_norm(width, rows, dtype, "cpu", kernels_off)


@interpreter_only
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", CPU_WIDTHS)
def test_swiglu_interpreted(width: int, rows: int, dtype: torch.dtype, fused: bool) -> None:
    check_swiglu(width, rows, dtype, "cpu", fused)


@interpreter_only
def test_modules_take_the_kernels_with_leading_dims(kernels_off) -> None:
    """RMSNorm.forward / add_and_norm and SwiGLU's activation route (B, T, D) inputs through the kernels (the
    results differ from the torch path's in the last bits, so they did not take it) and keep the shape."""
    norm = make_norm(100, "cpu", seed=0)
    x, d = rand((2, 3, 100), torch.float32, "cpu", 1), rand((2, 3, 100), torch.float32, "cpu", 2)
    gu = rand((2, 3, 200), torch.float32, "cpu", 3)
    y, (h, n), a = norm(x), norm.add_and_norm(x, d), mlp_module.swiglu_activation(*gu.chunk(2, dim=-1))
    with kernels_off():
        ry, (rh, rn), ra = norm(x), norm.add_and_norm(x, d), mlp_module.swiglu_activation(*gu.chunk(2, dim=-1))
    for got, ref in ((y, ry), (n, rn), (a, ra)):
        assert got.shape == ref.shape == (2, 3, 100)
        assert rel_err(got, ref) <= TOLERANCE[torch.float32]
    assert torch.equal(h, rh)


def test_torch_path_when_switched_off(monkeypatch) -> None:
    """``ORCD_KERNELS=0``: the modules run the torch code, even under the interpreter, and never load the kernels."""
    monkeypatch.setenv("ORCD_KERNELS", "0")
    calls: list[str] = []
    monkeypatch.setattr(norm_module, "_kernels", lambda: calls.append("norm"))
    monkeypatch.setattr(mlp_module, "_kernels", lambda: calls.append("mlp"))
    norm = make_norm(64, "cpu", seed=0)
    x, d = rand((3, 64), torch.float32, "cpu", 1), rand((3, 64), torch.float32, "cpu", 2)
    xf = x.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight)
    assert torch.equal(norm(x), ref)
    h, n = norm.add_and_norm(x, d)
    assert torch.equal(h, x + d) and torch.equal(n, norm(x + d))
    assert torch.equal(mlp_module.swiglu_activation(x, d), F.silu(x) * d)
    assert calls == []


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", GPU_WIDTHS)
def test_norm_gpu(width: int, rows: int, dtype: torch.dtype, kernels_off) -> None:
    check_norm(width, rows, dtype, "cuda", kernels_off)


@gpu_test
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", GPU_WIDTHS)
def test_swiglu_gpu(width: int, rows: int, dtype: torch.dtype, fused: bool) -> None:
    check_swiglu(width, rows, dtype, "cuda", fused)


@gpu_test
def test_cuda_graph_capture_gpu() -> None:
    """The three launches capture in a CUDA graph and replay on new inputs."""
    from orcd.nn import norm_kernels

    norm = make_norm(896, "cuda", seed=0)
    x, d = rand((1, 896), torch.float32, "cuda", 1), rand((1, 896), torch.float32, "cuda", 2)
    g, u = rand((1, 4864), torch.float32, "cuda", 3), rand((1, 4864), torch.float32, "cuda", 4)

    def run() -> tuple:
        return norm(x), norm.add_and_norm(x, d), mlp_module.swiglu_activation(g, u)

    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, (h, n), a = run()
    for t in (x, d, g, u):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, norm_kernels.rms_norm(x, norm.weight, norm.eps)) == 0
    assert torch.equal(h, x + d)
    assert rel_err(n, norm(x + d)) <= TOLERANCE[torch.float32]
    assert rel_err(a, F.silu(g) * u) <= TOLERANCE[torch.float32]
