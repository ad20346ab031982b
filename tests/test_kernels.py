"""Fused dequantize-matmul kernels (orcd_quant_formats.kernels) against the reference dequantize-then-matmul.

Two kinds of check, for every format with a kernel (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4):

- the decoded weights are gguf's to the bit: multiplying the one-hot rows of an identity matrix in fp32 (IEEE
  products, every sum has one non-zero term) returns ``W.T`` exactly, compared with ``gguf.quants.dequantize``;
- products match a float64 reference within a tolerance on ``||out - ref|| / ||ref||``: fp32 ``x`` 1e-5 (fp32
  products summed in another order, K <= 1440: measured ~1e-7), fp16 ``x`` 1e-3 (the tl.dot path rounds weights to
  fp16 as the reference path does, and the output is rounded to fp16: each ~1.6e-4 RMS), bf16 ``x`` 1e-2 (the same
  with 8 significant bits: ~1.3e-3 each).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here before they are imported)
on tiny shapes; the tests skip when Triton is not installed (CI installs it: the test extra). The ``gpu``-marked tests run
the compiled kernels on CUDA for M in {1, 4, 17, 512} and odd N and K (K a multiple of the block size, not of the
kernel's step), with fresh random weights and inputs on every run (the seed is in the failure message); their
oracle is orcd's reference path in float64 (``orcd.quant.reference_linear``), itself bit-exact with gguf.
"""

from __future__ import annotations

import secrets

import gguf
import numpy as np
import pytest
import torch

from conftest import make_plugin_manager
from orcd.quant import QuantFormat, QuantizedLinear, QuantizedTensor, reference_linear

from kernel_support import INTERPRETED, gpu_test, interpreter_only, needs_triton  # sets TRITON_INTERPRET before a kernel module loads

KERNEL_FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4"]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def formats() -> dict[str, QuantFormat]:
    pm = make_plugin_manager("quant_formats")
    return {fmt.name: fmt for fmt in pm.quant_formats.values()}


def matmul_module():
    from orcd_quant_formats.kernels import matmul

    return matmul


def random_weight(fmt: QuantFormat, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Raw blocks ``(rows, row_bytes)`` and gguf's float64 decoding ``(rows, K)`` of a random weight of ``shape``."""
    rows, K = int(np.prod(shape[:-1])), shape[-1]
    raw = fmt.random_blocks(rows * K // fmt.block_size, rng, scale=0.05).reshape(rows, -1)
    return raw, gguf.quants.dequantize(raw, T(fmt.ggml_type)).astype(np.float64)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite outputs"
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def test_plugin_falls_back_off_cuda(formats: dict[str, QuantFormat]) -> None:
    """On the CPU (and without Triton) every format's ``linear`` declines, and QuantizedLinear uses the reference."""
    rng = np.random.default_rng(0)
    for name in KERNEL_FORMATS:
        fmt = formats[name]
        raw, _ = random_weight(fmt, (8, 256), rng)
        weight = QuantizedTensor.from_raw("w", raw, fmt, (8, 256))
        x = torch.randn(2, 256)
        assert fmt.linear(x, weight, None) is None, name
        torch.testing.assert_close(QuantizedLinear(weight)(x), reference_linear(x, weight, None), rtol=0, atol=0)


# --- interpreter (CPU) ---------------------------------------------------------------------------------------------


def interpreter_configs():
    matmul = matmul_module()
    return {
        "decode": matmul.Config(bm=2, bn=16, dot=False, nb=2, split=1),  # legacy: a step past the end of K
        "decode-split": matmul.Config(bm=4, bn=16, dot=False, nb=1, split=3),  # a row of x that does not exist
        "decode-pairs": matmul.Config(bm=1, bn=16, dot=False, nb=2, split=1),  # experts: one pair per block
        "decode-parts": matmul.Config(bm=3, bn=16, dot=False, nb=8, split=1, parts=4),  # lanes share a unit
        "decode-parts-split": matmul.Config(bm=1, bn=16, dot=False, nb=4, split=3, parts=8),  # ranges cut units
        "decode-8": matmul.Config(bm=8, bn=16, dot=False, nb=8, split=1, parts=4),  # 8 rows of x, one missing
        "dot": matmul.Config(bm=16, bn=16, dot=True, nb=2, split=1),  # legacy: K = 96 ends in a tail step
        "dot-split": matmul.Config(bm=16, bn=16, dot=True, nb=1, split=2),  # one unit per step: slow on GPUs, valid
    }


def tiny_k(fmt: QuantFormat) -> int:
    return 512 if fmt.block_size == 256 else 96  # legacy: 3 blocks, so the last step of 64 is half empty


@interpreter_only
@pytest.mark.parametrize("name", KERNEL_FORMATS)
def test_interpreted_tiles_bit_exact(formats: dict[str, QuantFormat], name: str) -> None:
    matmul = matmul_module()
    fmt = formats[name]
    K, N = tiny_k(fmt), 19
    raw, w = random_weight(fmt, (N, K), np.random.default_rng(1))
    eye = torch.eye(K, dtype=torch.float32)
    one_block = matmul.Config(bm=1 << (K - 1).bit_length(), bn=16, dot=True, nb=2)  # all of x in one block of rows
    got = matmul.linear(eye, torch.from_numpy(raw), int(fmt.ggml_type), N, K, config=one_block)
    assert np.array_equal(got.T.numpy(), w.astype(np.float32))


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("path", ["decode", "decode-split", "decode-parts", "decode-parts-split", "decode-8", "dot",
                                  "dot-split", "auto"])
@pytest.mark.parametrize("name", KERNEL_FORMATS)
def test_interpreted_linear(formats: dict[str, QuantFormat], name: str, path: str, dtype: torch.dtype) -> None:
    matmul = matmul_module()
    fmt = formats[name]
    K, N = tiny_k(fmt), 19  # N: one full block of 16 weight rows and a partial one
    M = 7 if path == "decode-8" else 3 if path.startswith("dot") or path == "decode-parts" else 2
    rng = np.random.default_rng(2)
    raw, w = random_weight(fmt, (N, K), rng)
    x = torch.from_numpy(rng.standard_normal((M, K), dtype=np.float32)).to(dtype)
    bias = torch.from_numpy(rng.standard_normal(N, dtype=np.float32))
    config = None if path == "auto" else interpreter_configs()[path]
    got = matmul.linear(x, torch.from_numpy(raw), int(fmt.ggml_type), N, K, bias, config=config)
    assert got.shape == (M, N) and got.dtype == dtype
    ref = x.double() @ torch.from_numpy(w).T + bias.double()
    assert relative_error(got, ref) < TOLERANCE[dtype]


@pytest.fixture
def matmul_precision():
    """Set torch's float32 matmul precision for one test (``orcd.device.set_matmul_precision``), then restore it."""
    from orcd.device import set_matmul_precision

    before = torch.get_float32_matmul_precision()
    yield set_matmul_precision
    torch.set_float32_matmul_precision(before)


@gpu_test
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0", "MXFP4"])
@pytest.mark.usefixtures("kernels_on")
def test_cuda_dot_follows_the_matmul_precision(formats: dict[str, QuantFormat], name: str, matmul_precision) -> None:
    """fp32 x through tl.dot (17 rows) under torch's three precisions. ``medium`` multiplies bf16 operands: the result
    is the float64 product of the bf16-rounded weights and x within 1e-5 (exact products, fp32 sums), and differs
    from the exact product by about bf16's rounding (2^-9 relative per operand), more than 1e-4. ``high`` (TF32,
    10 significand bits) stays within 2e-3 of the exact product, ``highest`` (tf32x3) within the fp32 tolerance.
    (Not in the interpreter: Triton 3.9's interpreter multiplies bf16 tiles' bit patterns as integers.)"""
    matmul = matmul_module()
    fmt = formats[name]
    rng, seed = fresh_rng()
    K, N, M = cuda_k(fmt), 37, 17
    raw, w = random_weight(fmt, (N, K), rng)
    data = torch.from_numpy(raw).cuda()
    x = torch.randn(M, K, device="cuda")
    w64 = torch.from_numpy(w).cuda()
    exact = x.double() @ w64.T
    dot = matmul.Config(bm=32, bn=16, dot=True, nb=2)

    def run(precision: str) -> torch.Tensor:
        matmul_precision(precision)
        return matmul.linear(x, data, int(fmt.ggml_type), N, K, config=dot)

    got = run("medium")
    rounded = x.bfloat16().double() @ w64.float().bfloat16().double().T
    assert relative_error(got, rounded) < 1e-5, f"{name} (seed {seed})"
    assert relative_error(got, exact) > 1e-4, f"{name} (seed {seed})"
    assert relative_error(run("high"), exact) < 2e-3, f"{name} (seed {seed})"
    assert relative_error(run("highest"), exact) < TOLERANCE[torch.float32], f"{name} (seed {seed})"


def test_matmul_precision_names_a_wrong_value() -> None:
    from orcd.device import set_matmul_precision
    from orcd.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="'fastest' is not one of highest, high, medium"):
        set_matmul_precision("fastest")


def dequant_module():
    from orcd_quant_formats.kernels import dequant

    return dequant


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("name", KERNEL_FORMATS)
def test_interpreted_prompt_dequantize_is_gguf_exactly(formats: dict[str, QuantFormat], name: str,
                                                       dtype: torch.dtype) -> None:
    """The prompt path's scratch tile holds gguf's values to the bit (fp16: gguf's fp32 values rounded to fp16, as
    the reference path rounds them), over 37 rows (a partial block of rows) and a K that ends mid-step."""
    fmt = formats[name]
    K, N = tiny_k(fmt), 37
    raw, w = random_weight(fmt, (N, K), np.random.default_rng(6))
    got = dequant_module().dequantize(torch.from_numpy(raw), int(fmt.ggml_type), K, dtype)
    assert got.shape == (N, K) and got.dtype == dtype
    assert torch.equal(got, torch.from_numpy(w.astype(np.float32)).to(dtype))


@interpreter_only
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K", "MXFP4"])
def test_interpreted_prompt_linear_in_tiles_equals_the_reference(formats: dict[str, QuantFormat], name: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Weight rows taken a few at a time (a scratch tile of 2 rows' values: 10 tiles for 19 rows, the last one
    short) give the product of the whole matrix, bias included, within fp32's 1e-5."""
    dequant = dequant_module()
    fmt = formats[name]
    K, N, M = tiny_k(fmt), 19, 5
    monkeypatch.setattr(dequant, "TILE_ELEMENTS", 2 * K)
    rng = np.random.default_rng(7)
    raw, w = random_weight(fmt, (N, K), rng)
    x = torch.from_numpy(rng.standard_normal((M, K), dtype=np.float32))
    bias = torch.from_numpy(rng.standard_normal(N, dtype=np.float32))
    got = dequant.linear(x, torch.from_numpy(raw), int(fmt.ggml_type), N, K, bias)
    ref = x.double() @ torch.from_numpy(w).T + bias.double()
    assert got.shape == (M, N) and got.dtype == torch.float32
    assert relative_error(got, ref) < TOLERANCE[torch.float32]


CODE_DOT_FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "Q4_K", "Q6_K"]


@interpreter_only
@pytest.mark.parametrize("name", CODE_DOT_FORMATS)
def test_interpreted_code_dot_equals_the_reference(formats: dict[str, QuantFormat], name: str) -> None:
    """The code dot (``codes_dot``: integer codes times x cut into two fp16 parts, each (row, 32 values) of x
    scaled by a power of two) is within fp32's tolerance of the reference at x of 1, 1e-4 and 3e3 (fp16 alone would
    overflow or lose the small values) with a zero row, rows and weight rows that do not fill a tile, and a bias,
    whole and split in three along K (the bias then added after the partial sums); 16-bit x takes the ordinary
    tile; a format without one refuses it by name."""
    matmul = matmul_module()
    fmt = formats[name]
    t, K, N = int(fmt.ggml_type), 768 if fmt.block_size == 256 else 96, 19
    rng = np.random.default_rng(11)
    raw, w = random_weight(fmt, (N, K), rng)
    bias = torch.from_numpy(rng.standard_normal(N, dtype=np.float32))
    codes = matmul.Config(bm=16, bn=16, dot=True, nb=2, codes=True)
    split = matmul.Config(bm=16, bn=16, dot=True, nb=2, split=3, codes=True)
    assert matmul._plan(t, split, 2, N, K, torch.device("cpu"))[0] == 3
    for scale in (1.0, 1e-4, 3e3):
        x = torch.from_numpy(rng.standard_normal((20, K), dtype=np.float32) * np.float32(scale))
        x[3] = 0
        ref = x.double() @ torch.from_numpy(w).T + bias.double()
        for cfg in (codes, split):
            got = matmul.linear(x, torch.from_numpy(raw), t, N, K, bias, config=cfg)
            assert got.dtype == torch.float32
            assert relative_error(got, ref) < TOLERANCE[torch.float32], (scale, cfg)
    x16 = torch.from_numpy(rng.standard_normal((5, K), dtype=np.float32)).half()
    got = matmul.linear(x16, torch.from_numpy(raw), t, N, K, config=codes)
    assert got.dtype == torch.float16
    assert relative_error(got, x16.double() @ torch.from_numpy(w).half().double().T) < TOLERANCE[torch.float16]
    with pytest.raises(ValueError, match="Q4_K, Q6_K, MXFP4 only"):
        matmul._checked(matmul.SPECS[int(formats["Q5_K"].ggml_type)], codes, 256)


@interpreter_only
@pytest.mark.parametrize("name", ["MXFP4", "Q8_0", "Q4_1", "Q4_K", "Q6_K"])
def test_interpreted_code_dot_of_experts_equals_the_reference(formats: dict[str, QuantFormat], name: str) -> None:
    """Grouped by expert (``expert_linear`` with a code-dot launch): 9 tokens through their top-2 of 4 experts,
    one never chosen, blocks of 16 pairs, with the experts' biases, whole and split along K: within fp32's
    tolerance of each pair's reference product, and the int32 ids the MoE passes give the same bits."""
    matmul = matmul_module()
    fmt = formats[name]
    E, N, K, top_k, tokens = 4, 19, 512 if fmt.block_size == 256 else 96, 2, 9
    rng = np.random.default_rng(13)
    raw, w = random_weight(fmt, (E, N, K), rng)
    w = torch.from_numpy(w).reshape(E, N, K)
    bias = torch.from_numpy(rng.standard_normal((E, N), dtype=np.float32))
    ids = torch.from_numpy(rng.integers(0, E - 1, size=(tokens, top_k)))
    x = torch.from_numpy(rng.standard_normal((tokens, K), dtype=np.float32))
    data = torch.from_numpy(raw)
    ref = torch.stack([w[e] @ x[p // top_k].double() + bias[e].double() for p, e in enumerate(ids.reshape(-1).tolist())])
    for split in (1, 2):
        cfg = matmul.Config(bm=16, bn=16, dot=True, nb=2, split=split, codes=True)
        got = matmul.expert_linear(x, data, int(fmt.ggml_type), E, N, K, ids, bias, config=cfg)
        assert got.shape == (tokens * top_k, N)
        assert relative_error(got, ref) < TOLERANCE[torch.float32], split
        as_int32 = matmul.expert_linear(x, data, int(fmt.ggml_type), E, N, K, ids.to(torch.int32), bias, config=cfg)
        torch.testing.assert_close(as_int32, got, rtol=0, atol=0)


@interpreter_only
@pytest.mark.parametrize(("name", "path"), [
    *[(name, path) for name in ("MXFP4", "Q4_K", "Q8_0", "Q6_K") for path in ("decode", "dot", "auto")],
    ("MXFP4", "decode-split"), ("Q8_0", "dot-split"), ("MXFP4", "decode-pairs"), ("Q6_K", "decode-pairs"),
    ("MXFP4", "decode-parts-split"), ("Q6_K", "decode-parts-split"),
])
def test_interpreted_experts(formats: dict[str, QuantFormat], name: str, path: str) -> None:
    matmul = matmul_module()
    fmt = formats[name]
    E, N, K, top_k, tokens = 4, 19, tiny_k(fmt), 2, 4
    rng = np.random.default_rng(3)
    raw, w = random_weight(fmt, (E, N, K), rng)
    w = torch.from_numpy(w).reshape(E, N, K)
    bias = torch.from_numpy(rng.standard_normal((E, N), dtype=np.float32))
    ids = torch.from_numpy(rng.integers(0, E - 1, size=(tokens, top_k)))  # expert E-1 is never chosen
    x = torch.from_numpy(rng.standard_normal((tokens, K), dtype=np.float32))
    config = None if path == "auto" else interpreter_configs()[path]
    data = torch.from_numpy(raw)
    got = matmul.expert_linear(x, data, int(fmt.ggml_type), E, N, K, ids, bias, config=config)
    flat = ids.reshape(-1)
    ref = torch.stack([w[e] @ x[p // top_k].double() + bias[e].double() for p, e in enumerate(flat.tolist())])
    assert got.shape == (tokens * top_k, N)
    assert relative_error(got, ref) < TOLERANCE[torch.float32]
    if path == "auto":  # one row of x per pair (the form ExpertProjection.gathered uses): the same result
        pairs = matmul.expert_linear(x.repeat_interleave(top_k, 0), data, int(fmt.ggml_type), E, N, K, flat, bias)
        torch.testing.assert_close(pairs, got, rtol=0, atol=0)
    if path.endswith("split"):  # int32 ids (what the MoE passes) also index split-K's bias rows
        as_int32 = matmul.expert_linear(x, data, int(fmt.ggml_type), E, N, K, ids.to(torch.int32), bias, config=config)
        torch.testing.assert_close(as_int32, got, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize(("name", "K"), [("Q5_0", 896), ("Q8_0", 2880), ("MXFP4", 2880), ("Q4_K", 3072),
                                         ("Q6_K", 4864), ("Q4_K", 8192), ("Q8_0", 14336)])
def test_decode_rule_crosses_k_in_few_steps(name: str, K: int) -> None:
    """The decode rule spreads a row over enough warps (at most 8) to cross K in about ``DECODE_STEPS`` steps, so
    no split-K reduction is planned for it, whatever N."""
    matmul = matmul_module()
    t = int(T[name])
    spec = matmul.SPECS[t]
    n_parts = K // spec.unit(False) * matmul.DECODE_PARTS
    for N in (128, 896, 5120, 151936):
        cfg = matmul.pick_config(spec, 1, N, K)
        steps = -(-n_parts // cfg.nb)
        assert cfg.nb == 32 * cfg.warps and cfg.warps <= matmul.MAX_DECODE_WARPS
        assert steps <= matmul.DECODE_STEPS or cfg.warps == matmul.MAX_DECODE_WARPS, (N, cfg)
        assert matmul._plan(t, cfg, 1, N, K, torch.device("cpu"))[0] == 1 or steps > 3, (N, cfg)


@pytest.fixture
def tuning_file(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """A kernel tuning table in ``$ORCD_KERNEL_TUNING``, with the launch caches cleared around the test."""
    from orcd_quant_formats.kernels import tuning

    path = tmp_path / "tuned.json"
    monkeypatch.setenv(tuning.ENV, str(path))

    def clear() -> None:
        tuning.table.cache_clear()
        try:
            matmul_module()._fitted.cache_clear()
        except ImportError:  # no Triton: no launches to forget
            pass

    clear()
    yield path
    monkeypatch.delenv(tuning.ENV)
    clear()


@interpreter_only
def test_tuning_table_gives_the_measured_launch(formats: dict[str, QuantFormat], tuning_file) -> None:
    """A shape in the table takes its entry (linear and experts keyed apart; 8 rows, which the rule sends to tl.dot,
    to the decode kernel; 17 to 32 rows to the 32-row entry, here 8-row decode blocks; 16 rows to a tl.dot entry;
    33 to 64 rows, plain or experts, to a code-dot entry; a prompt's rows to the rule), an invalid entry warns and takes the rule, and the tuned launches compute the
    same product."""
    from orcd_quant_formats.kernels import tuning

    matmul = matmul_module()
    fmt = formats["Q4_K"]
    t, K, N, cpu = int(fmt.ggml_type), tiny_k(formats["Q4_K"]), 19, torch.device("cpu")
    tuned = {"bm": 1, "bn": 4, "dot": False, "nb": 8, "split": 2, "warps": 1, "parts": 4}
    experts = {**tuned, "bn": 2}
    dot = {"bm": 16, "bn": 16, "dot": True, "nb": 2, "split": 0, "warps": 4, "stages": 2, "parts": 1}
    tuning.write(tuning_file, "cpu", {tuning.key(t, 1, N, K): tuned, tuning.key(t, 1, N, K, experts=True): experts,
                                      tuning.key(t, 2, N, K): {**tuned, "bm": 2, "parts": 3},
                                      tuning.key(t, 8, N, K): {**tuned, "bm": 8},
                                      tuning.key(t, 32, N, K): {**tuned, "bm": 8},
                                      tuning.key(t, 16, N, K): dot,
                                      tuning.key(t, 64, N, K): {**dot, "bm": 64, "codes": True},
                                      tuning.key(t, 64, N, K, experts=True): {**dot, "bm": 64, "codes": True},
                                      tuning.key(t, 4, N, K): dot})
    assert matmul._fitted(t, 1, N, K, torch.float32, cpu) == matmul.Config(**tuned)
    assert matmul._fitted(t, 8, N, K, torch.float32, cpu) == matmul.Config(**{**tuned, "bm": 8})
    assert matmul._fitted(t, 20, N, K, torch.float32, cpu) == matmul.Config(**{**tuned, "bm": 8})
    assert matmul._fitted(t, 16, N, K, torch.float32, cpu) == matmul.Config(**dot)
    assert matmul._fitted(t, 512, N, K, torch.float32, cpu) == matmul._picked(t, 512, N, K, 4)
    assert matmul._fitted(t, 40, N, K, torch.float32, cpu) == matmul.Config(**{**dot, "bm": 64, "codes": True})
    assert matmul._fitted(t, 64, N, K, torch.float32, cpu, experts=True) == matmul.Config(**{**dot, "bm": 64,
                                                                                             "codes": True})
    with pytest.warns(UserWarning, match="which the decode kernel takes"):
        assert matmul._fitted(t, 4, N, K, torch.float32, cpu) == matmul._picked(t, 4, N, K, 4)
    assert matmul._fitted(t, 1, N, K, torch.float32, cpu, experts=True) == matmul.Config(**experts)
    with pytest.warns(UserWarning, match="parts must be"):
        assert matmul._fitted(t, 2, N, K, torch.float32, cpu) == matmul._picked(t, 2, N, K, 4)
    rng = np.random.default_rng(5)
    raw, w = random_weight(fmt, (N, K), rng)
    for rows in (1, 20, 16):  # the 1-row entry, 8-row decode blocks (3 of them), the tl.dot entry
        x = torch.from_numpy(rng.standard_normal((rows, K), dtype=np.float32))
        got = matmul.linear(x, torch.from_numpy(raw), t, N, K)
        assert relative_error(got, x.double() @ torch.from_numpy(w).T) < TOLERANCE[torch.float32], rows


@needs_triton
def test_packaged_tuning_tables_hold_valid_decode_launches() -> None:
    """Every entry of every shipped table (``kernels/tuned/*.json``) is taken as it stands: keyed by rows the
    lookup asks for, a launch for those rows, valid for its key's row length, so no entry falls back to the rule
    with a warning at run time."""
    import json
    import re

    from orcd_quant_formats.kernels import tuning

    matmul = matmul_module()
    files = sorted(tuning.TUNED_DIR.glob("*.json"))
    assert files, f"no tables in {tuning.TUNED_DIR}"
    for path in files:
        data = json.loads(path.read_text())
        assert tuning.device_file(data["device"]) == path, path
        for key, entry in data["configs"].items():
            name, rows, n, k, experts = re.fullmatch(r"(\w+):(\d+):(\d+)x(\d+)(:experts)?", key).groups()
            t = int(gguf.GGMLQuantizationType[name])
            assert tuning.key(t, int(rows), int(n), int(k), bool(experts)) == key
            cfg = matmul.Config(**entry)
            assert tuning.table_rows(int(rows)) == int(rows), (path.name, key)
            matmul._entry_fits(cfg, int(rows))
            matmul._checked(matmul.SPECS[t], cfg, int(k))


def test_tuning_file_that_cannot_be_read_is_named(tuning_file) -> None:
    from orcd_quant_formats.kernels import tuning

    tuning_file.write_text("{not json")
    with pytest.raises(ValueError, match="tuned.json"):
        tuning.table("cpu")


@needs_triton
@pytest.mark.parametrize("bm", [1, 4, 16])
def test_expert_block_table(bm: int) -> None:
    """Every pair sits in exactly one block, each block holds one expert's pairs (at most ``bm``), in expert order."""
    matmul = matmul_module()
    rng = np.random.default_rng(4)
    n_expert = 6
    ids = torch.from_numpy(rng.integers(0, n_expert, size=(40, 4)))
    ids[ids == 2] = 3  # an unchosen expert in the middle
    expert, start, end, order = matmul.expert_blocks(ids, n_expert, bm)
    flat = ids.reshape(-1)
    seen = []
    for b in range(expert.numel()):
        s, e = int(start[b]), int(end[b])
        assert 0 <= e - s <= bm
        pairs = order[s:e].long()
        assert (flat[pairs] == int(expert[b])).all()
        seen += pairs.tolist()
    assert sorted(seen) == list(range(flat.numel()))
    assert torch.equal(flat[order.long()], torch.sort(flat, stable=True).values)


# --- CUDA -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def kernels_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCD_KERNELS", raising=False)


CUDA_M = [1, 4, 17, 512]
CUDA_N = 301


def cuda_k(fmt: QuantFormat) -> int:
    return 1280 if fmt.block_size == 256 else 1440  # 5 super-blocks / 45 blocks: not a multiple of any step


def fresh_rng() -> tuple[np.random.Generator, int]:
    seed = secrets.randbits(32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed), seed


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("m", CUDA_M)
@pytest.mark.parametrize("name", KERNEL_FORMATS)
@pytest.mark.usefixtures("kernels_on")
def test_cuda_linear(formats: dict[str, QuantFormat], name: str, m: int, dtype: torch.dtype) -> None:
    fmt = formats[name]
    if dtype == torch.bfloat16 and m in (4, 17):
        pytest.skip("bf16 is checked at M = 1 and 512 (the same code as fp16 in between)")
    from orcd_quant_formats.kernels import fused_linear

    rng, seed = fresh_rng()
    K = cuda_k(fmt)
    raw, _ = random_weight(fmt, (CUDA_N, K), rng)
    weight = QuantizedTensor.from_raw("blk.0.ffn_up.weight", raw, fmt, (CUDA_N, K), "cuda")
    bias = torch.randn(CUDA_N, device="cuda")
    x = torch.randn(m, K, device="cuda").to(dtype)
    got = fused_linear(x, weight, bias)
    assert got is not None, "the fused kernel declined"
    assert got.shape == (m, CUDA_N) and got.dtype == dtype
    ref = reference_linear(x.double(), weight, bias.double())
    err = relative_error(got, ref)
    assert err < TOLERANCE[dtype], f"{name} M={m} {dtype}: relative error {err:.2e} (seed {seed})"


@gpu_test
@pytest.mark.parametrize("path", ["decode-f32", "decode-parts-f32", "decode-8-f32", "dot-f16"])
@pytest.mark.parametrize("name", KERNEL_FORMATS)
@pytest.mark.usefixtures("kernels_on")
def test_cuda_tiles_bit_exact(formats: dict[str, QuantFormat], name: str, path: str) -> None:
    """One-hot rows return the decoded weights: fp32 through the decode kernel, fp16 through tl.dot (the
    weights rounded to fp16 as the reference path rounds them; fp32 tl.dot is not exact, it uses TF32 products)."""
    matmul = matmul_module()
    fmt = formats[name]
    rng, seed = fresh_rng()
    K, N = 512, 37
    raw, w = random_weight(fmt, (N, K), rng)
    if path == "decode-f32":
        eye, config, expected = torch.eye(K, device="cuda"), matmul.Config(bm=4, bn=32, dot=False, nb=8), w
    elif path == "decode-parts-f32":
        eye, expected = torch.eye(K, device="cuda"), w
        config = matmul.Config(bm=3, bn=16, dot=False, nb=32, parts=8)
    elif path == "decode-8-f32":  # the decode kernel's widest launch: 8 rows of x a program
        eye, expected = torch.eye(K, device="cuda"), w
        config = matmul.Config(bm=8, bn=4, dot=False, nb=64, warps=2, parts=4)
    else:
        eye, config = torch.eye(K, device="cuda", dtype=torch.float16), matmul.Config(bm=64, bn=32, dot=True, nb=2)
        expected = w.astype(np.float32).astype(np.float16)
    got = matmul.linear(eye, torch.from_numpy(raw).cuda(), int(fmt.ggml_type), N, K, config=config)
    assert np.array_equal(got.T.cpu().numpy(), expected.astype(got.cpu().numpy().dtype)), f"{name} (seed {seed})"


@gpu_test
@pytest.mark.parametrize("tokens", [1, 8, 300])
@pytest.mark.parametrize("name", ["MXFP4", "Q4_K", "Q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.usefixtures("kernels_on")
def test_cuda_experts(formats: dict[str, QuantFormat], name: str, tokens: int, dtype: torch.dtype) -> None:
    from orcd_quant_formats.kernels import expert_linear

    fmt = formats[name]
    rng, seed = fresh_rng()
    E, N, K, top_k = 8, CUDA_N, cuda_k(fmt), 4
    raw, w = random_weight(fmt, (E, N, K), rng)
    weight = QuantizedTensor.from_raw("blk.0.ffn_up_exps.weight", raw, fmt, (E, N, K), "cuda")
    w = torch.from_numpy(w).cuda().reshape(E, N, K)
    bias = torch.randn(E, N, device="cuda")
    ids = torch.randint(0, E - 1, (tokens, top_k), device="cuda")  # expert E-1 never chosen
    x = torch.randn(tokens, K, device="cuda").to(dtype)
    got = expert_linear(x, weight, ids, bias)
    assert got is not None and got.shape == (tokens * top_k, N) and got.dtype == dtype
    flat = ids.reshape(-1)
    xp = x.double().repeat_interleave(top_k, 0)
    ref = torch.bmm(w[flat], xp.unsqueeze(-1)).squeeze(-1) + bias.double()[flat]
    err = relative_error(got, ref)
    assert err < TOLERANCE[dtype], f"{name} tokens={tokens} {dtype}: relative error {err:.2e} (seed {seed})"
    pairs = expert_linear(x.repeat_interleave(top_k, 0), weight, flat, bias)
    torch.testing.assert_close(pairs, got, rtol=0, atol=0)


@gpu_test
@pytest.mark.usefixtures("kernels_on")
def test_cuda_switch_and_graph_capture(formats: dict[str, QuantFormat], monkeypatch: pytest.MonkeyPatch) -> None:
    """QuantizedLinear takes the kernel on CUDA and the reference with ``ORCD_KERNELS=0``; both kernels replay
    correctly from a CUDA graph (no host sync) on new inputs."""
    from orcd_quant_formats.kernels import expert_linear

    fmt = formats["MXFP4"]
    rng, seed = fresh_rng()
    raw, _ = random_weight(fmt, (4, 256, 512), rng)
    experts = QuantizedTensor.from_raw("e", raw, fmt, (4, 256, 512), "cuda")
    weight = QuantizedTensor("w", experts.data[:256], fmt, (256, 512))
    layer = QuantizedLinear(weight)
    x = torch.randn(2, 512, device="cuda")
    assert fmt.linear(x, weight, None) is not None
    fused = layer(x)
    monkeypatch.setenv("ORCD_KERNELS", "0")
    assert fmt.linear(x, weight, None) is None and expert_linear(x, experts, torch.zeros(2, dtype=torch.long)) is None
    assert relative_error(fused, layer(x)) < TOLERANCE[torch.float32]
    monkeypatch.setenv("ORCD_KERNELS", "1")

    ids = torch.tensor([[0, 3], [2, 3]], device="cuda")
    for _ in range(2):  # compile outside the capture
        layer(x), expert_linear(x, experts, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = layer(x)
        e_static = expert_linear(x, experts, ids)
    x.copy_(torch.randn_like(x))
    ids.copy_(torch.tensor([[1, 2], [0, 1]], device="cuda"))
    graph.replay()
    monkeypatch.setenv("ORCD_KERNELS", "0")
    assert relative_error(y_static, layer(x)) < TOLERANCE[torch.float32], f"seed {seed}"
    w = experts.dequantize().double()
    ref = torch.stack([w[e] @ x[p // 2].double() for p, e in enumerate(ids.reshape(-1).tolist())])
    assert relative_error(e_static, ref) < TOLERANCE[torch.float32], f"seed {seed}"


@needs_triton
@pytest.mark.parametrize(("name", "itemsize", "want"), [
    ("Q4_K", 4, (128, 64, 1)),  # fp32 (tf32x3) operands of 128-value steps: 256 KiB at 128x128, one stage
    ("Q4_K", 2, (128, 128, 2)),  # fp16: 64 KiB at 2 stages
    ("Q6_K", 4, (64, 32, 1)),  # 256-value steps
    ("Q8_0", 4, (128, 128, 1)),  # 64-value steps
])
def test_dot_launch_fits_shared_memory(name: str, itemsize: int, want: tuple[int, int, int]) -> None:
    """The tl.dot launch shrinks (stages, then tiles) to an H100's 227 KiB of shared memory per program: the
    prefill of a Qwen2.5-0.5B-shaped Q4_K_M file in fp32 failed to launch before."""
    matmul = matmul_module()
    spec = matmul.SPECS[int(getattr(T, name))]
    cfg = matmul.fit_shared_memory(matmul.pick_config(spec, 511, 4864, 896), spec, itemsize, 232448)
    assert (cfg.bm, cfg.bn, cfg.stages) == want
    small = matmul.fit_shared_memory(matmul.pick_config(spec, 511, 4864, 896), spec, 4, 48 * 1024)
    fits = (small.bm + small.bn) * small.nb * spec.unit(True) * 8 * small.stages <= 48 * 1024 * 7 // 8
    assert fits or (small.bm, small.bn, small.stages) == (16, 16, 1)  # else the smallest tile (Q6_K's is 64 KiB)


# (format, rows or pairs, N, K, grouped): Qwen2.5-0.5B's MLP prefill; GPT-OSS's gate|up for 32 decode streams (128
# pairs of top-4: past ``EXPERT_DECODE_MAX_PAIRS``, planned at ``FMA_MAX_ROWS + 1`` rows, the smallest tl.dot tile)
# and for a 512-token prompt.
DOT_LAUNCHES = [(name, 511, 4864, 896, False) for name in ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "MXFP4")] + [
    ("MXFP4", 128, 5760, 2880, True), ("MXFP4", 2048, 5760, 2880, True)]


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="compiles for sm_90; the interpreter replaces the compiler")
@pytest.mark.parametrize(("name", "pairs", "N", "K", "grouped"), DOT_LAUNCHES)
def test_fitted_dot_launches_compile_within_h100_shared_memory(
    name: str, pairs: int, N: int, K: int, grouped: bool,
) -> None:
    """Compiled for an H100 (sm_90, no GPU needed), the tl.dot launch ``fit_shared_memory`` picks for fp32 and
    fp16 x asks for no more shared memory than the H100 has: Triton's own count, not our estimate. Expert launches
    are planned for ``expert_rows`` of GPT-OSS's 32 experts, with bias, 4 pairs per x row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    matmul = matmul_module()
    ggml_type = int(getattr(T, name))
    spec = matmul.SPECS[ggml_type]
    rows = matmul.expert_rows(pairs, 32) if grouped else pairs
    for itemsize, ptr, precision in ((4, "*fp32", "tf32x3"), (2, "*fp16", "ieee")):
        cfg = matmul.fit_shared_memory(matmul.pick_config(spec, rows, N, K), spec, itemsize, H100_SHARED)
        assert cfg.dot
        consts = {"FMT": ggml_type, "QK": spec.block_size, "TYPE_SIZE": spec.type_size, "UNITS": spec.units(True),
                  "BM": cfg.bm, "BN": cfg.bn, "NB": cfg.nb, "GROUPED": grouped, "X_DIV": 4 if grouped else 1,
                  "HAS_BIAS": grouped, "PARTIAL": False, "X_F32": itemsize == 4, "PRECISION": precision}
        fn = matmul.qmm_kernel
        pointers = {"x_ptr": ptr, "out_ptr": ptr, "bias_ptr": ptr, "w_ptr": "*u8"}
        signature = {a: "constexpr" if a in consts else pointers.get(a, "*i32" if a.endswith("_ptr") else "i32")
                     for a in fn.arg_names}
        source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": cfg.warps, "num_stages": cfg.stages})
        assert kernel.metadata.shared <= H100_SHARED, (name, itemsize, cfg, kernel.metadata.shared)


H100_SHARED = 232448  # bytes of shared memory one program may use on an H100 (sm_90)


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="compiles for sm_90; the interpreter replaces the compiler")
def test_code_dot_launches_compile_for_sm_90_without_spills() -> None:
    """The code-dot launches the 32-row sweep times (``orcd.bench.kernels.codes_grid``, plain, and
    ``expert_codes_grid``, grouped by expert with biases), every format's, compile for an H100 (sm_90, no GPU
    needed) without spilling registers to the stack and within its shared memory; Q4_K's unrolled over a
    super-block spilled 792 bytes a thread."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from orcd.bench.kernels import codes_grid, expert_codes_grid
    from orcd_quant_formats.kernels import codes_dot

    fn = codes_dot.codes_kernel
    table = ("block_expert_ptr", "block_start_ptr", "block_end_ptr", "sorted_ptr")
    types = {"hi_ptr": "*fp16", "lo_ptr": "*fp16", "w_ptr": "*u8", **{a: "*i32" for a in table}}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    launches = [(cfg, False) for cfg in codes_grid(32)] + [(cfg, True) for cfg in expert_codes_grid()]
    for t in sorted(codes_dot.TYPES):
        for cfg, grouped in launches:
            consts = {"FMT": t, "TYPE_SIZE": codes_dot.TYPE_SIZES[t], "STEP": codes_dot.STEP_VALUES[t], "BM": cfg.bm,
                      "BN": cfg.bn, "GROUPED": grouped, "X_DIV": 4 if grouped else 1, "HAS_BIAS": grouped,
                      "PARTIAL": False}
            signature = {a: "constexpr" if a in consts else types.get(a, "*fp32" if a.endswith("_ptr") else "i32")
                         for a in fn.arg_names}
            source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": cfg.warps, "num_stages": cfg.stages})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                                       check=True).stdout
            assert re.search(r"STACK:0\b", usage), (T(t).name, cfg, grouped, usage)
            assert kernel.metadata.shared <= H100_SHARED, (T(t).name, cfg, kernel.metadata.shared)


@needs_triton
def test_expert_rule_groups_pairs_past_a_few_tokens() -> None:
    """Up to ``EXPERT_DECODE_MAX_PAIRS`` pairs (GPT-OSS: 8 tokens of top-4) take the decode kernel at their mean
    pairs per expert; more are planned as tl.dot blocks (at least ``FMA_MAX_ROWS + 1`` rows), prefill unchanged."""
    matmul = matmul_module()
    assert matmul.expert_rows(4, 32) == 1 and matmul.expert_rows(32, 32) == 1 and matmul.expert_rows(16, 8) == 2
    assert matmul.expert_rows(36, 32) == matmul.FMA_MAX_ROWS + 1 == matmul.expert_rows(128, 32)
    assert matmul.expert_rows(2048, 32) == 64
    spec = matmul.SPECS[int(T.MXFP4)]
    assert matmul.pick_config(spec, matmul.expert_rows(128, 32), 5760, 2880).dot
    assert not matmul.pick_config(spec, matmul.expert_rows(4, 32), 5760, 2880).dot
    assert not matmul.pick_config(spec, matmul.expert_rows(32, 32), 5760, 2880).dot


@interpreter_only
def test_interpreted_experts_past_the_decode_pairs(formats: dict[str, QuantFormat]) -> None:
    """Seventeen tokens through their top-2 experts (34 pairs, past ``EXPERT_DECODE_MAX_PAIRS``) take the grouped
    tl.dot path on their own: equal to the dequantized reference within the formats' fp32 tolerance."""
    matmul = matmul_module()
    fmt = formats["MXFP4"]
    E, N, K, top_k, tokens = 4, 19, tiny_k(fmt), 2, 17
    assert tokens * top_k > matmul.EXPERT_DECODE_MAX_PAIRS
    rng = np.random.default_rng(5)
    raw, w = random_weight(fmt, (E, N, K), rng)
    w = torch.from_numpy(w).reshape(E, N, K)
    bias = torch.from_numpy(rng.standard_normal((E, N), dtype=np.float32))
    ids = torch.from_numpy(rng.integers(0, E, size=(tokens, top_k))).to(torch.int32)
    x = torch.from_numpy(rng.standard_normal((tokens, K), dtype=np.float32))
    got = matmul.expert_linear(x, torch.from_numpy(raw), int(fmt.ggml_type), E, N, K, ids, bias)
    ref = torch.stack([w[e] @ x[p // top_k].double() + bias[e].double() for p, e in enumerate(ids.reshape(-1).tolist())])
    assert relative_error(got, ref) < TOLERANCE[torch.float32]
