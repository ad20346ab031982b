"""Every tensor of the synthetic model files, loaded quantized through the plugin manager, decodes bit for bit as
gguf's reader and numpy dequantizer decode it. The tiny models cover the type mixes of real files (as chosen by
orcd/testing/filetypes.py): Q4_K_M = Q4_K, Q6_K, Q5_0, Q8_0, F32; Q4_0 = Q4_0, Q8_0, F32; MXFP4 = MXFP4, Q8_0,
F32; plus Q8_0 and BF16 files. Written both from quantized values (our quantizers) and from random blocks."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from orcd.modelfile import ModelFile
from orcd.plugins import OrcdPluginManager
from orcd.testing.synth import synthesize

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
MODELS = [("qwen2", "Q4_K_M"), ("qwen2", "Q4_0"), ("phi3", "Q8_0"), ("gpt-oss", "MXFP4"), ("qwen2", "BF16")]


def assert_every_tensor_bit_exact(path: Path, plugins: OrcdPluginManager, device: str) -> set[str]:
    model = ModelFile.open(path)
    seen = set()
    for t in gguf.GGUFReader(path).tensors:
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        qt = plugins.quantized_tensor(model, t.name, device)
        got = qt.dequantize().cpu().numpy()
        assert got.shape == expected.shape, t.name
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), f"{t.name} ({t.tensor_type.name})"
        seen.add(t.tensor_type.name)
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,file_type", MODELS)
def test_synthetic_model_tensors_bit_exact(synth_model, plugins, arch: str, file_type: str, device: str) -> None:
    seen = assert_every_tensor_bit_exact(synth_model(arch, file_type), plugins, device)
    assert "F32" in seen and len(seen) >= 2


@pytest.mark.parametrize("arch,file_type", [("qwen2", "Q4_K_M"), ("gpt-oss", "MXFP4")])
def test_random_block_models_bit_exact(tmp_path: Path, plugins, arch: str, file_type: str) -> None:
    path = synthesize(tmp_path / "m.gguf", arch, "tiny", file_type, plugins=plugins, from_values=False)
    seen = assert_every_tensor_bit_exact(path, plugins, "cpu")
    assert len(seen) >= 2
    model = ModelFile.open(path)
    for name in model.tensors:
        assert torch.isfinite(plugins.quantized_tensor(model, name).dequantize()).all(), name
