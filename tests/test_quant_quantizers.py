"""Quantizers of the quant-format plugin: their blocks decode with gguf's dequantizer, and their round-trip error is
in the range of llama.cpp's own quantizer.

Round-trip error = RMS(dequantize(quantize(x)) - x) / RMS(x) on standard normal float32 data, shape (256, 4096),
``np.random.default_rng(0)``. llama.cpp's numbers come from ``llama_model_quantize`` (llama-cpp-python 0.3.36,
``pure`` file types, no importance matrix) on the same data written as an F32 GGUF and read back with gguf:

    type    llama.cpp   ours      quantizer here
    Q4_0    0.08586     0.08586   gguf (port of ggml's reference: same bytes)
    Q4_1    0.07825     0.07825   gguf
    Q5_0    0.04266     0.04266   gguf
    Q5_1    0.03783     0.03783   gguf
    Q8_0    0.005348    0.005348  gguf
    MXFP4   0.11502     0.11502   gguf
    Q2_K    0.29664     0.29858   kquants.py
    Q3_K    0.15071     0.15282   kquants.py (least-squares grid search, not llama.cpp's iterative Q3 fit)
    Q4_K    0.07137     0.07177   kquants.py
    Q5_K    0.03612     0.03623   kquants.py
    Q6_K    0.017742    0.017742  kquants.py

Tolerance: our error may be at most 1.25x llama.cpp's (the K-quant searches differ in detail; measured within 1.5%).
``test_error_within_llama_cpp`` checks against the table above without llama.cpp; the ``reference`` test re-measures
llama.cpp live when llama_cpp is installed.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import make_plugin_manager, require_reference
from orcd.quant import QuantFormat

T = gguf.GGMLQuantizationType
LLAMA_CPP_ERROR = {
    "Q4_0": 0.08586, "Q4_1": 0.07825, "Q5_0": 0.04266, "Q5_1": 0.03783, "Q8_0": 0.005348, "MXFP4": 0.11502,
    "Q2_K": 0.29664, "Q3_K": 0.15071, "Q4_K": 0.07137, "Q5_K": 0.03612, "Q6_K": 0.017742,
}
# llama.cpp file types whose ``pure`` quantization gives each tensor type.
LLAMA_FTYPE = {
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "MXFP4": "MXFP4_MOE",
    "Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q6_K": "Q6_K",
}
TOLERANCE = 1.25
QUANTIZED = list(LLAMA_CPP_ERROR)


@pytest.fixture(scope="module")
def formats() -> dict[str, QuantFormat]:
    pm = make_plugin_manager("quant_formats")
    return {fmt.name: fmt for fmt in pm.quant_formats.values()}


@pytest.fixture(scope="module")
def gaussian() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((256, 4096), dtype=np.float32)


def relative_rms_error(decoded: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((decoded.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2)))


@pytest.fixture(scope="module")
def ours(formats: dict[str, QuantFormat], gaussian: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each type's quantized bytes and gguf's decoding of them, computed once."""
    out = {}
    for name in QUANTIZED:
        raw = formats[name].quantize(gaussian)
        out[name] = raw, gguf.quants.dequantize(raw, T[name])
    return out


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantize_decodes_with_gguf(
    formats: dict[str, QuantFormat], gaussian: np.ndarray, ours: dict, name: str
) -> None:
    fmt = formats[name]
    raw, decoded = ours[name]
    assert raw.dtype == np.uint8
    assert raw.shape == (256, 4096 // fmt.block_size * fmt.type_size)
    assert decoded.shape == gaussian.shape and np.isfinite(decoded).all()
    ours_torch = fmt.dequantize(torch.from_numpy(raw.reshape(-1, fmt.type_size))).numpy().reshape(gaussian.shape)
    assert np.array_equal(ours_torch.view(np.uint32), decoded.view(np.uint32))


@pytest.mark.parametrize("name", QUANTIZED)
def test_error_within_llama_cpp(gaussian: np.ndarray, ours: dict, name: str) -> None:
    err = relative_rms_error(ours[name][1], gaussian)
    assert err <= TOLERANCE * LLAMA_CPP_ERROR[name], f"{name}: error {err:.5f} vs llama.cpp {LLAMA_CPP_ERROR[name]}"


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_kquant_edge_inputs(formats: dict[str, QuantFormat], name: str) -> None:
    """Zeros, constants, one-signed rows, a lone outlier and values too small for fp16 scales: finite output, zeros
    stay exactly zero, and a constant row is reproduced closely where its scale is representable."""
    fmt = formats[name]
    rng = np.random.default_rng(5)
    rows = np.stack([
        np.zeros(256),
        np.full(256, 0.75),
        np.full(256, -3.0),
        np.abs(rng.standard_normal(256)),
        -np.abs(rng.standard_normal(256)),
        np.where(np.arange(256) == 17, 1000.0, rng.standard_normal(256) * 1e-3),
        rng.standard_normal(256) * 1e-9,
    ]).astype(np.float32)
    decoded = gguf.quants.dequantize(fmt.quantize(rows), T[name])
    assert np.isfinite(decoded).all()
    assert np.array_equal(decoded[0], np.zeros(256, np.float32))
    assert np.allclose(decoded[1:3], rows[1:3], rtol=0.02)  # |error| <= one level of the coarsest type (Q2_K)
    assert relative_rms_error(decoded[3:5], rows[3:5]) <= 2 * LLAMA_CPP_ERROR[name]
    assert abs(decoded[5, 17] - 1000.0) < 0.1 * 1000.0  # the outlier survives
    assert np.abs(decoded[6]).max() < 1e-6  # below fp16 resolution: flushed towards zero, not blown up


def test_quantize_keeps_leading_shape(formats: dict[str, QuantFormat]) -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, 512), dtype=np.float32)
    for name in QUANTIZED:
        fmt = formats[name]
        raw = fmt.quantize(x)
        assert raw.shape == (2, 3, 512 // fmt.block_size * fmt.type_size), name


# --- llama.cpp live ------------------------------------------------------------------------------------------------


def write_f32_model(path: Path, weight: np.ndarray) -> None:
    """A minimal one-layer llama GGUF holding ``weight`` as ``blk.0.ffn_up.weight`` (llama.cpp's quantizer needs a
    loadable architecture header, not a complete model)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(64)
    w.add_embedding_length(weight.shape[0])
    w.add_block_count(1)
    w.add_feed_forward_length(weight.shape[1])
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_tensor("blk.0.ffn_up.weight", weight)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(weight.shape[0], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_roundtrip(llama_cpp, src: Path, dst: Path, ftype_name: str) -> tuple[str, np.ndarray]:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.pure = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({ftype_name}) failed with {rc}"
    tensor = next(t for t in gguf.GGUFReader(dst).tensors if t.name == "blk.0.ffn_up.weight")
    return tensor.tensor_type.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type)


@pytest.mark.reference
def test_error_within_llama_cpp_live(tmp_path: Path, gaussian: np.ndarray, ours: dict) -> None:
    llama_cpp = require_reference("llama_cpp")
    src = tmp_path / "f32.gguf"
    write_f32_model(src, gaussian)
    report = {}
    for name in QUANTIZED:
        got_type, decoded = llama_cpp_roundtrip(llama_cpp, src, tmp_path / f"{name}.gguf", LLAMA_FTYPE[name])
        assert got_type == name
        theirs = relative_rms_error(decoded.reshape(gaussian.shape), gaussian)
        mine = relative_rms_error(ours[name][1], gaussian)
        report[name] = (round(mine, 5), round(theirs, 5))
        assert theirs == pytest.approx(LLAMA_CPP_ERROR[name], rel=0.01), f"{name}: llama.cpp's error changed"
    worse = {k: v for k, v in report.items() if v[0] > TOLERANCE * v[1]}
    assert not worse, f"(ours, llama.cpp) errors beyond {TOLERANCE}x: {worse}"
