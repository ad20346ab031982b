"""``QuantizedLinear``'s reference path: ``x @ W.T + b`` with ``W`` decoded by gguf's dequantizer, for every format
and on CPU and CUDA; and that it works tile by tile, never decoding more than ``REFERENCE_TILE_ELEMENTS`` at once.

Tolerance against ``x @ W_gguf.T + b``: W is the same to the bit (see test_quant_formats), and on CPU the untiled
product is bit-identical too; but a tiled product multiplies (n, 10)-shaped blocks, for which BLAS picks another
kernel and summation order (measured: up to 5e-7 of the output scale). So outputs are compared with
``rtol = 1e-5`` and ``atol = 1e-5`` x the output scale (float32 dot products of 512 terms). What tiling must do
exactly -- which rows each dequantize call decodes -- is counted.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import orcd.quant
from conftest import make_plugin_manager
from orcd.quant import QuantFormat, QuantizedLinear, QuantizedTensor

T = gguf.GGMLQuantizationType
ALL = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
OUT, IN = 48, 512


@pytest.fixture(scope="module")
def formats() -> dict[str, QuantFormat]:
    pm = make_plugin_manager("quant_formats")
    return {fmt.name: fmt for fmt in pm.quant_formats.values()}


def make_layer(fmt: QuantFormat, device: str, seed: int = 0) -> tuple[QuantizedLinear, np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    raw = fmt.random_blocks(OUT * IN // fmt.block_size, rng, scale=0.05)
    weight = QuantizedTensor.from_raw("blk.0.ffn_up.weight", raw, fmt, (OUT, IN), device)
    bias = torch.from_numpy(rng.standard_normal(OUT, dtype=np.float32)).to(device)
    w_ref = gguf.quants.dequantize(raw.reshape(OUT, -1), T(fmt.ggml_type))
    return QuantizedLinear(weight, bias), w_ref, bias


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ALL)
def test_linear_matches_gguf_weights(formats: dict[str, QuantFormat], name: str, device: str) -> None:
    layer, w_ref, bias = make_layer(formats[name], device)
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(1)).to(device)
    y = layer(x)
    assert y.shape == (3, 5, OUT) and y.device.type == device
    assert_close(y, x @ torch.from_numpy(w_ref).to(device).T + bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K", "MXFP4", "BF16"])
def test_linear_tiles_bound_memory(
    formats: dict[str, QuantFormat], name: str, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCD_KERNELS", "0")  # the reference path is under test, not the fused kernels
    fmt = formats[name]
    layer, _, _ = make_layer(fmt, device, seed=2)
    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(3)).to(device)
    untiled = layer(x)

    limit = 10 * IN  # 10 rows per tile: 48 rows -> 5 tiles, the last one partial
    monkeypatch.setattr(orcd.quant, "REFERENCE_TILE_ELEMENTS", limit)
    decoded_per_call: list[int] = []
    real_dequantize = fmt.dequantize

    def counting_dequantize(blocks: torch.Tensor) -> torch.Tensor:
        out = real_dequantize(blocks)
        decoded_per_call.append(out.numel())
        return out

    monkeypatch.setattr(fmt, "dequantize", counting_dequantize)
    tiled = layer(x)
    assert decoded_per_call == [10 * IN] * 4 + [8 * IN]
    assert max(decoded_per_call) <= limit
    assert_close(tiled, untiled)


def test_rows_slice_decodes_those_rows(formats: dict[str, QuantFormat]) -> None:
    fmt = formats["Q5_K"]
    layer, w_ref, _ = make_layer(fmt, "cpu", seed=4)
    rows = layer.weight.dequantize(rows=slice(13, 29))
    assert np.array_equal(rows.numpy().view(np.uint32), w_ref[13:29].view(np.uint32))
    assert np.array_equal(layer.weight.dequantize().numpy().view(np.uint32), w_ref.view(np.uint32))
