"""Bad tensor data is reported as a ``QuantError`` that names the tensor: a byte length that does not fit the shape
and type, a row length that is not a multiple of the block size, and a ggml type no plugin supports (also when it
comes from a real GGUF file written with gguf's writer)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import make_plugin_manager
from orcd.errors import QuantError
from orcd.modelfile import ModelFile
from orcd.plugins import OrcdPluginManager
from orcd.quant import QuantizedTensor

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def pm() -> OrcdPluginManager:
    return make_plugin_manager("quant_formats")


@pytest.mark.parametrize("name,extra", [("Q4_K", -1), ("Q4_K", 144), ("Q8_0", 1), ("MXFP4", -17), ("F16", 2)])
def test_length_mismatch(pm: OrcdPluginManager, name: str, extra: int) -> None:
    fmt = pm.quant_format(T[name])
    shape = (4, 512)
    n_bytes = 4 * 512 // fmt.block_size * fmt.type_size
    raw = np.zeros(n_bytes + extra, dtype=np.uint8)
    with pytest.raises(QuantError) as err:
        QuantizedTensor.from_raw("blk.3.ffn_down.weight", raw, fmt, shape)
    assert "'blk.3.ffn_down.weight'" in str(err.value)
    assert f"{n_bytes + extra} bytes" in str(err.value) and str(n_bytes) in str(err.value)
    assert err.value.context["tensor"] == "blk.3.ffn_down.weight"


@pytest.mark.parametrize("name,row", [("Q4_K", 896), ("Q6_K", 100), ("Q4_0", 48), ("MXFP4", 2880 + 16)])
def test_row_not_multiple_of_block(pm: OrcdPluginManager, name: str, row: int) -> None:
    fmt = pm.quant_format(T[name])
    with pytest.raises(QuantError) as err:
        QuantizedTensor.from_raw("blk.0.attn_q.weight", np.zeros(1024, np.uint8), fmt, (2, row))
    message = str(err.value)
    assert "'blk.0.attn_q.weight'" in message and str(row) in message and str(fmt.block_size) in message
    assert err.value.context["tensor"] == "blk.0.attn_q.weight"


@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.IQ2_XXS, T.TQ1_0, T.Q8_1])
def test_unknown_type(pm: OrcdPluginManager, qtype: T) -> None:
    with pytest.raises(QuantError) as err:
        pm.quant_format(qtype, "output.weight")
    message = str(err.value)
    assert "'output.weight'" in message and qtype.name in message and "Q4_K" in message  # lists what is supported
    assert err.value.context["tensor"] == "output.weight"


def test_gguf_file_with_known_and_unknown_types(tmp_path: Path, pm: OrcdPluginManager) -> None:
    """A GGUF file written by gguf's writer: the Q4_K tensor loads quantized and decodes as gguf's reader does; the
    IQ4_NL tensor fails with an error naming it."""
    rng = np.random.default_rng(0)
    q4k = pm.quant_format(T.Q4_K).quantize(rng.standard_normal((8, 512), dtype=np.float32))
    iq4 = rng.integers(0, 256, size=(8, 512 // 32 * 18), dtype=np.uint8)
    path = tmp_path / "mixed.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("blk.0.ffn_up.weight", q4k, raw_dtype=T.Q4_K)
    w.add_tensor("blk.0.ffn_gate.weight", iq4, raw_dtype=T.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    model = ModelFile.open(path)
    qt = pm.quantized_tensor(model, "blk.0.ffn_up.weight")
    assert qt.shape == (8, 512) and qt.data.dtype == torch.uint8 and qt.nbytes == q4k.nbytes
    reader_tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_up.weight")
    expected = gguf.quants.dequantize(reader_tensor.data, T.Q4_K)
    assert np.array_equal(qt.dequantize().numpy().view(np.uint32), expected.view(np.uint32))
    with pytest.raises(QuantError, match="'blk.0.ffn_gate.weight' has type IQ4_NL"):
        pm.quantized_tensor(model, "blk.0.ffn_gate.weight")
