"""GPT-OSS's fused mixture-of-experts kernels (orcd_gpt_adapter.moe_kernels: router, clamped SwiGLU, weighted sum)
against the torch path of ``orcd_gpt_adapter.moe``, which is the oracle and the fallback (``ORCD_KERNELS=0``).

Tolerances and why:
- Router, exact rows: ``x``, the router weight and bias are multiples of 1/8 and 1/64 small enough that every
  product and partial sum is exact in fp32 (and ``x`` exact in fp16), so both paths get bit-equal logits whatever
  their reduction order. The chosen experts must then be identical to ``torch.topk``'s, except among equal logits
  (built here on purpose), and the weights, the same softmax of the same k logits, agree to 1e-6 relative
  (``exp`` may differ by an ulp or two).
- Router, random rows: the logits differ in the last bits (fp32 sums in another order). The chosen experts must
  be identical (the data has no near-ties: checked against fp64 logits); the weights agree to 1e-5 relative, as a
  softmax weight moves by up to 2 * max |logit difference| relative, a few ulps (~1e-6) of logits of magnitude ~10.
- Ties: ``torch.topk`` promises no order among equal values; the kernel takes the lower expert index first. Tied
  rows check that rule, that the chosen logits equal torch's top values, and that the chosen set equals torch's
  wherever the tie does not straddle the k-th place.
- Clamped SwiGLU: fp32 1e-6 of the largest value (``exp`` and the division may differ by a few ulps); fp16 output
  1e-3 (both paths compute in fp32 and round once to fp16, half-ulp 4.9e-4).
- Weighted sum: fp32 1e-6 (both sum in slot order, but the kernel may fuse multiply-adds); fp16 output 1e-3.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here before they are imported);
the tests skip when Triton is not installed (CI installs it: the test extra). ``gpu``-marked tests run the compiled
kernels on CUDA, including the router captured in a CUDA graph and replayed many times on new tokens.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from kernel_support import gpu_test, interpreter_only  # sets TRITON_INTERPRET before a kernel module loads

from orcd_gpt_adapter import moe as moe_module
from orcd_gpt_adapter.gpt_oss import GptOss
from orcd_gpt_adapter.moe import MixtureOfExperts, clamped_swiglu

from orcd.description import open_checked


@pytest.fixture(autouse=True)
def _kernels_on_cpu(monkeypatch) -> None:
    """The modules take the kernels on CPU tensors (in the interpreter) in these tests only."""
    monkeypatch.setenv("ORCD_INTERPRET_KERNELS", "1")


@pytest.fixture
def kernels_off(monkeypatch):
    """Run the torch path (the oracle) inside ``with kernels_off():``."""
    @contextlib.contextmanager
    def off():
        with monkeypatch.context() as m:
            m.setenv("ORCD_KERNELS", "0")
            yield
    return off


TOP_K = 4
ROUTER_W_EXACT = 1e-6
ROUTER_W_RANDOM = 1e-5
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def grid_values(shape: tuple[int, ...], denom: int, span: int, seed: int) -> torch.Tensor:
    """Integers in ``[-span, span]`` over ``denom``: with ``denom`` a power of two, exact in fp16 and fp32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-span, span + 1, shape, generator=g).float() / denom


def router(hidden: int, n_expert: int, seed: int, exact: bool, device: str) -> MixtureOfExperts:
    """A ``MixtureOfExperts`` whose router is ``(weight, bias)``; the experts are never run by ``route``."""
    if exact:  # products are multiples of 1/64, |sum| <= hidden * 1/4 + 1: all exact in fp32
        w, b = grid_values((n_expert, hidden), 8, 4, seed), grid_values((n_expert,), 64, 64, seed + 1)
    else:
        g = torch.Generator().manual_seed(seed)
        w, b = torch.randn(n_expert, hidden, generator=g) / hidden ** 0.5 * 3, torch.randn(n_expert, generator=g)
    moe = MixtureOfExperts.__new__(MixtureOfExperts)  # the router alone: no expert tensors needed
    torch.nn.Module.__init__(moe)
    moe.router_weight = torch.nn.Parameter(w.to(device), requires_grad=False)
    moe.router_bias = torch.nn.Parameter(b.to(device), requires_grad=False)
    moe.n_expert, moe.top_k = n_expert, TOP_K
    return moe


def tokens(n: int, hidden: int, dtype: torch.dtype, seed: int, exact: bool, device: str) -> torch.Tensor:
    if exact:
        x = grid_values((n, hidden), 8, 4, seed)
    else:
        x = torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed))
    return x.to(device=device, dtype=dtype)


def expected_choice(logits: torch.Tensor) -> torch.Tensor:
    """The kernel's rule: the k largest logits, highest first, equal ones lower index first (a stable sort)."""
    return torch.sort(logits.cpu(), dim=-1, descending=True, stable=True).indices[:, :TOP_K]


def make_ties(moe: MixtureOfExperts, x: torch.Tensor) -> None:
    """Copies of router rows (the logits stay exact) giving row 1 two equal logits at its top and row 2 two equal
    logits for its k-th place: one inside the top k, one left out."""
    w, b = moe.router_weight.data, moe.router_bias.data

    def copy(src: int, dst: int) -> None:
        w[dst], b[dst] = w[src], b[src]

    def logits(row: int) -> torch.Tensor:
        return x[row].cpu().double() @ w.cpu().double().T + b.cpu().double()

    order = logits(1).argsort(descending=True)
    top = int(order[0])
    copy(top, int(order[-1]))  # row 1's lowest joins its top
    order = logits(2).argsort(descending=True)
    copy(int(order[TOP_K - 1]), int(order[-1]))  # row 2's lowest joins its k-th; in row 1 it stays <= the top


def check_route(n: int, hidden: int, n_expert: int, dtype: torch.dtype, exact: bool, device: str,
                kernels_off) -> None:
    from orcd_gpt_adapter import moe_kernels

    assert moe_kernels.route_fits(n, n_expert, TOP_K)
    moe = router(hidden, n_expert, seed=hidden + n_expert, exact=exact, device=device)
    x = tokens(n, hidden, dtype, seed=n, exact=exact, device=device)
    if exact and n >= 3:
        make_ties(moe, x)
    logits = x.cpu().double() @ moe.router_weight.cpu().double().T + moe.router_bias.cpu().double()  # exact
    chosen, weights = moe.route(x)
    with kernels_off():
        ref_chosen, ref_weights = moe.route(x)
    assert chosen.dtype == torch.int32 and weights.dtype == torch.float32  # the expert kernels' index type
    assert chosen.shape == weights.shape == (n, TOP_K) and chosen.device == x.device
    chosen, ref_chosen = chosen.cpu().long(), ref_chosen.cpu()
    if exact:
        assert torch.equal(chosen, expected_choice(logits))
        assert torch.equal(logits.gather(1, chosen), logits.gather(1, ref_chosen))  # torch's top values
        untied = (logits.gather(1, ref_chosen)[:, -1:] != logits).sum(1) == n_expert - 1
        assert torch.equal(chosen.sort(1).values[untied], ref_chosen.sort(1).values[untied])  # the same sets
        if n >= 3:  # the ties were there: two equal logits at the top of row 1, a tie across row 2's k-th place
            assert (logits[1] == logits[1, chosen[1, 0]]).sum() >= 2 and logits[1, chosen[1, 1]] == logits[1].max()
            kth = logits[2, chosen[2, -1]]
            assert (logits[2] == kth).sum() > (logits[2, chosen[2]] == kth).sum()
        tol = ROUTER_W_EXACT
    else:
        kth, next_ = logits.sort(1, descending=True).values[:, TOP_K - 1:TOP_K + 1].unbind(1)
        clear = kth - next_ > 1e-4  # a near-tie may rank either way with last-bit logit differences
        assert clear.sum() >= (n + 1) // 2
        assert torch.equal(chosen[clear], ref_chosen[clear])
        weights, ref_weights = weights[clear.to(weights.device)], ref_weights[clear.to(weights.device)]
        tol = ROUTER_W_RANDOM
    assert ((weights.cpu().double() - ref_weights.cpu().double()).abs() / ref_weights.cpu().double()).max() <= tol


def check_swiglu(p: int, rows: int, dtype: torch.dtype, device: str, fused: bool) -> None:
    from orcd_gpt_adapter import moe_kernels

    g = torch.Generator().manual_seed(rows + p)
    if fused:  # halves of one (P, 2 * rows) tensor: strided rows, read in place
        gate, up = (10 * torch.randn(p, 2 * rows, generator=g)).to(device).chunk(2, dim=-1)
    else:
        gate, up = (10 * torch.randn(2, p, rows, generator=g)).to(device).unbind(0)  # beyond the +-7 clamp
    ref = clamped_swiglu(gate, up).to(dtype)
    got = moe_kernels.clamped_swiglu(gate, up, moe_module.SWIGLU_ALPHA, moe_module.SWIGLU_LIMIT, dtype)
    assert got.dtype == dtype and got.shape == gate.shape
    assert rel_err(got, ref) <= TOLERANCE[dtype]


def check_weighted_sum(tokens_: int, width: int, dtype: torch.dtype, device: str) -> None:
    from orcd_gpt_adapter import moe_kernels

    g = torch.Generator().manual_seed(tokens_ + width)
    outputs = torch.randn(tokens_ * TOP_K, width, generator=g).to(device)
    weights = torch.softmax(torch.randn(tokens_, TOP_K, generator=g), -1).to(device)
    ref = (outputs.view(-1, TOP_K, width) * weights.unsqueeze(-1)).sum(dim=1).to(dtype)
    got = moe_kernels.weighted_sum(outputs, weights, dtype)
    assert got.dtype == dtype and got.shape == (tokens_, width)
    assert rel_err(got, ref) <= TOLERANCE[dtype]
    assert torch.equal(got, moe_kernels.weighted_sum(outputs, weights, dtype))  # deterministic


ROUTE_CASES = [(1, 256, 8), (3, 256, 8), (40, 256, 32), (1, 2880, 32), (3, 2880, 32)]


@interpreter_only
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,hidden,n_expert", ROUTE_CASES)
def test_route_interpreted(n: int, hidden: int, n_expert: int, dtype: torch.dtype, exact: bool,
                           kernels_off) -> None:
    check_route(n, hidden, n_expert, dtype, exact, "cpu", kernels_off)


@interpreter_only
def test_route_ties_take_the_lower_index(kernels_off) -> None:
    """All logits equal: torch.topk returns some 4 of them (22, 21, 20, 23 on CPU today); the kernel returns 0..3,
    each weighted 1/4. Three equal logits for the last two places: the two lower indices."""
    moe = router(64, 32, seed=0, exact=True, device="cpu")
    moe.router_weight.data.zero_()
    moe.router_bias.data.zero_()
    x = tokens(2, 64, torch.float32, seed=0, exact=True, device="cpu")
    chosen, weights = moe.route(x)
    assert chosen.tolist() == [[0, 1, 2, 3]] * 2 and torch.equal(weights, torch.full((2, 4), 0.25))
    moe.router_bias.data[[30, 4, 17]] = 1.0  # three at the top
    moe.router_bias.data[[9, 6, 25]] = 0.5  # three for the last place
    chosen, _ = moe.route(x)
    assert chosen.tolist() == [[4, 17, 30, 6]] * 2


@interpreter_only
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p,rows", [(4, 128), (12, 2880), (160, 100)])
def test_clamped_swiglu_interpreted(p: int, rows: int, dtype: torch.dtype, fused: bool) -> None:
    check_swiglu(p, rows, dtype, "cpu", fused)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens_,width", [(1, 256), (3, 2880), (40, 256)])
def test_weighted_sum_interpreted(tokens_: int, width: int, dtype: torch.dtype) -> None:
    check_weighted_sum(tokens_, width, dtype, "cpu")


def tiny_moe(synth_model, plugins, device: str, stacked: bool = False) -> MixtureOfExperts:
    """Block 0's MoE as built on ``device`` (CUDA stacks gate|up); ``stacked`` stacks it on the CPU too."""
    from orcd_gpt_adapter.moe import stack_gate_up

    model, config = open_checked(synth_model("gpt-oss", "MXFP4"), plugins)
    moe = GptOss().build(model, config, torch.device(device), plugins).blocks[0].mlp
    if stacked and moe.gate is not None:
        moe = MixtureOfExperts(moe.router_weight, moe.router_bias, None, stack_gate_up("gate_up", moe.gate, moe.up),
                               moe.down, moe.top_k)
    return moe


def check_module(n: int, device: str, tol: float, synth_model, plugins, monkeypatch, kernels_off,
                 stacked: bool = False) -> None:
    from orcd_gpt_adapter import moe_kernels

    moe = tiny_moe(synth_model, plugins, device, stacked)
    x = torch.randn(1, n, 256, generator=torch.Generator().manual_seed(n)).to(device)
    calls: list[str] = []
    for name in ("route", "clamped_swiglu", "weighted_sum"):
        fn = getattr(moe_kernels, name)
        monkeypatch.setattr(moe_kernels, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    got = moe(x)
    with kernels_off():
        ref = moe(x)
    assert got.shape == ref.shape == (1, n, 256)
    assert set(calls) == {"route", "clamped_swiglu", "weighted_sum"}
    assert rel_err(got, ref) <= tol


@interpreter_only
@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
@pytest.mark.parametrize("n", [1, 3])
def test_module_takes_the_kernels(n: int, stacked: bool, synth_model, plugins, monkeypatch, kernels_off) -> None:
    """The tiny model's MoE (1 token: gathered experts; 3 tokens: grouped) through the three kernels equals the
    torch path to rounding (1e-5 of the largest value: the experts' fp32 matmuls and sums, last bits), and each kernel ran.
    Stacked, the SwiGLU kernel reads gate and up as strided halves of one output."""
    check_module(n, "cpu", 1e-5, synth_model, plugins, monkeypatch, kernels_off, stacked)


def test_torch_path_when_switched_off(synth_model, plugins, monkeypatch) -> None:
    """``ORCD_KERNELS=0``: the module runs today's torch code, even under the interpreter, and never loads the
    kernels."""
    monkeypatch.setenv("ORCD_KERNELS", "0")
    monkeypatch.setattr(moe_module, "_kernels", lambda: pytest.fail("the kernels were loaded"))
    moe = tiny_moe(synth_model, plugins, "cpu")
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    chosen, weights = moe.route(x)
    top, ref_chosen = F.linear(x, moe.router_weight, moe.router_bias).topk(TOP_K, dim=-1)
    assert torch.equal(chosen, ref_chosen) and torch.equal(weights, torch.softmax(top, -1))
    out = moe(x)
    assert out.shape == x.shape


@gpu_test
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,hidden,n_expert", ROUTE_CASES + [(64, 2880, 32), (2, 2880, 128)])
def test_route_gpu(n: int, hidden: int, n_expert: int, dtype: torch.dtype, exact: bool, kernels_off) -> None:
    check_route(n, hidden, n_expert, dtype, exact, "cuda", kernels_off)


@gpu_test
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p,rows", [(4, 2880), (12, 2880), (160, 100)])
def test_clamped_swiglu_gpu(p: int, rows: int, dtype: torch.dtype, fused: bool) -> None:
    check_swiglu(p, rows, dtype, "cuda", fused)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens_,width", [(1, 2880), (3, 2880), (40, 256)])
def test_weighted_sum_gpu(tokens_: int, width: int, dtype: torch.dtype) -> None:
    check_weighted_sum(tokens_, width, dtype, "cuda")


@gpu_test
@pytest.mark.parametrize("n", [1, 3, 40])
def test_module_takes_the_kernels_gpu(n: int, synth_model, plugins, monkeypatch, kernels_off) -> None:
    """On CUDA the experts also go through the quant plugin's fused MXFP4 kernels, which ``ORCD_KERNELS=0``
    switches off too: 1e-4 of the largest value (three chained projections, each fused against
    dequantize-then-matmul within the quant kernels' 1e-5)."""
    check_module(n, "cuda", 1e-4, synth_model, plugins, monkeypatch, kernels_off)


@gpu_test
def test_route_cuda_graph_replays_gpu(kernels_off) -> None:
    """The router captured in a CUDA graph and replayed 200 times on new tokens: every replay's choice and
    weights are right."""
    moe = router(2880, 32, seed=0, exact=False, device="cuda")
    x = torch.randn(2, 2880, device="cuda")
    moe.route(x)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chosen, weights = moe.route(x)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(200):
        x.copy_(torch.randn(x.shape, device="cuda", generator=g))
        graph.replay()
        with kernels_off():
            ref_chosen, ref_weights = moe.route(x)
        assert torch.equal(chosen, ref_chosen)
        assert ((weights - ref_weights).abs() / ref_weights).max().item() <= ROUTER_W_RANDOM
