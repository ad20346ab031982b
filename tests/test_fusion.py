"""Stacked projections (``orcd.quant.stack_linears``, ``orcd.nn.fusion``): one weight whose rows are the parts',
giving the parts' outputs side by side; parts of different formats stay separate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orcd.nn import FusedQKV, SeparateQKV, SwiGLU
from orcd.nn.fusion import qkv_projection, swiglu
from orcd.quant import QuantizedLinear, QuantizedTensor, stack_linears

from test_quant_linear import formats  # noqa: F401 -- the fixture

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def layer(fmt, rows: int, cols: int, device: str, seed: int, bias: bool = True) -> QuantizedLinear:
    rng = np.random.default_rng(seed)
    raw = fmt.random_blocks(rows * cols // fmt.block_size, rng, scale=0.05)
    weight = QuantizedTensor.from_raw(f"w{seed}", raw, fmt, (rows, cols), device)
    b = torch.from_numpy(rng.standard_normal(rows, dtype=np.float32)).to(device) if bias else None
    return QuantizedLinear(weight, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "MXFP4"])
def test_stacked_rows_give_the_parts_outputs(formats, name: str, device: str) -> None:  # noqa: F811
    fmt = formats[name]
    parts = [layer(fmt, 64, 256, device, 1), layer(fmt, 32, 256, device, 2, bias=False), layer(fmt, 32, 256, device, 3)]
    stacked = stack_linears("qkv", parts)
    assert stacked is not None and stacked.out_features == 128 and stacked.weight.fmt is fmt
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(device)
    want = torch.cat([p(x) for p in parts], dim=-1)
    # The same dot products; a kernel may split K differently for the taller matrix (fp32 summation order).
    torch.testing.assert_close(stacked(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(stacked.bias[64:96], torch.zeros(32, device=device))  # the part without a bias


def test_parts_of_different_formats_stay_separate(formats) -> None:  # noqa: F811
    q, k = layer(formats["Q4_K"], 64, 256, "cpu", 1), layer(formats["Q4_K"], 32, 256, "cpu", 2)
    v = layer(formats["Q6_K"], 32, 256, "cpu", 3)
    assert stack_linears("qkv", [q, k, v]) is None
    assert stack_linears("qk", [q, layer(formats["Q4_K"], 32, 512, "cpu", 4)]) is None  # another input width


@pytest.mark.parametrize("device", DEVICES)
def test_fusion_only_on_cuda(formats, device: str) -> None:  # noqa: F811
    fmt = formats["Q4_K"]
    q, k, v = (layer(fmt, r, 256, device, s) for s, r in ((1, 64), (2, 32), (3, 32)))
    qkv = qkv_projection("blk.0.", q, k, v, device)
    mlp = swiglu("blk.0.", layer(fmt, 96, 256, device, 4), layer(fmt, 96, 256, device, 5),
                 layer(fmt, 256, 256, device, 6), device)
    if device == "cuda":
        assert isinstance(qkv, FusedQKV) and mlp.gate is None and mlp.up.out_features == 192
    else:
        assert isinstance(qkv, SeparateQKV) and isinstance(mlp, SwiGLU) and mlp.gate is not None
    x = torch.randn(2, 1, 256, generator=torch.Generator().manual_seed(1)).to(device)
    for got, want in zip(qkv(x), (q(x), k(x), v(x))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
