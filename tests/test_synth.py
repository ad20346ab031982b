"""Synthetic model files: the real names and shapes, the type mix llama.cpp's quantizer would choose, readable by
gguf's own reader and dequantizers, and loadable by llama.cpp itself."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest

from orcd.description import describe, open_checked
from orcd.testing.filetypes import tensor_type
from orcd.arch import SynthTensor

from conftest import require_reference

FILE_TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_K_M"]


@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_tiny_qwen2_files_are_small_valid_and_complete(synth_model, plugins, file_type: str) -> None:
    path = synth_model("qwen2", file_type)
    assert path.stat().st_size < 5 * 1024 * 1024
    model, config = open_checked(path, plugins)
    assert config.block_count == 2 and config.vocab_size == len(model.require("tokenizer.ggml.tokens"))
    assert model.get("tokenizer.chat_template")
    assert model.file_type_name == file_type
    # Every tensor decodes with gguf's own numpy dequantizer to finite values of the right size.
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        assert values.size == math.prod(model.tensor(t.name).shape)
        assert np.isfinite(values).all(), t.name


def test_q4_k_m_mix_matches_llama_cpp_rules(synth_model, plugins) -> None:
    types = {name: t.type_name for name, t in open_checked(synth_model("qwen2", "Q4_K_M"), plugins)[0].tensors.items()}
    counts = Counter(types.values())
    assert {"Q4_K", "Q6_K", "F32"} <= set(counts)
    assert types["token_embd.weight"] == "Q6_K"  # tied embeddings are the output head
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.bias"] == "F32"
    # ffn_down rows are 384 long, not a multiple of 256: Q6_K falls back to Q8_0, Q4_K to Q5_0.
    assert {types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]} <= {"Q8_0", "Q5_0"}


def test_fallback_rules_of_qwen2_5_0_5b() -> None:
    """Qwen2.5-0.5B's hidden size 896 is not a multiple of 256: its Q4_K_M file holds Q5_0/Q8_0 as well."""
    assert tensor_type("Q4_K_M", SynthTensor("blk.3.attn_q.weight", (896, 896), "attn_q", 3), 24) == gguf.GGMLQuantizationType.Q5_0
    assert tensor_type("Q4_K_M", SynthTensor("blk.0.ffn_down.weight", (896, 4864), "ffn_down", 0), 24) == gguf.GGMLQuantizationType.Q6_K
    assert tensor_type("Q4_K_M", SynthTensor("blk.4.ffn_down.weight", (896, 4864), "ffn_down", 4), 24) == gguf.GGMLQuantizationType.Q4_K
    assert tensor_type("Q4_K_M", SynthTensor("token_embd.weight", (151936, 896), "token_embd"), 24, tied_output=True) == gguf.GGMLQuantizationType.Q8_0


def test_real_shape_preset_has_the_real_parameter_count(plugins) -> None:
    spec = plugins.architecture("qwen2").synth_spec("qwen2.5-0.5b")
    assert sum(math.prod(t.shape) for t in spec.tensors) == 494_032_768  # Qwen2.5-0.5B's published count
    assert spec.vocab_size == 151_936


def test_describe_counts_what_the_file_holds(synth_model, plugins) -> None:
    d = describe(synth_model("qwen2", "Q8_0"), plugins)
    assert d.parameter_count == 1_116_416
    assert d.has_chat_template and d.vocab_size == 512 and d.tensor_types["Q8_0"] == 15


def test_llama_cpp_loads_a_synthetic_file(synth_model, tmp_path: Path) -> None:
    """llama.cpp's own loader accepts the file: names, shapes, metadata and vocabulary are what it expects."""
    llama_cpp = require_reference("llama_cpp")
    path = synth_model("qwen2", "Q4_K_M")
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=True)
    try:
        assert llm.n_vocab() == 512
        assert llama_cpp.llama_model_n_params(llm.model) == 1_116_416
        assert llm.metadata["general.architecture"] == "qwen2"
    finally:
        llm.close()


def test_cli_and_module_entry_point_write_the_same_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    common = ["--arch", "qwen2", "--preset", "tiny", "--type", "Q8_0", "--seed", "7"]
    subprocess.run([sys.executable, "-m", "orcd.cli", "synth", *common, "-o", str(a)], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "orcd.testing", *common, "-o", str(b)], check=True, capture_output=True)
    assert a.read_bytes() == b.read_bytes()  # seeded: byte for byte reproducible


def test_unknown_preset_and_file_type_are_clear_errors(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "orcd.cli", "synth", "--arch", "qwen2", "--preset", "huge",
                        "-o", str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert r.returncode == 1 and "no preset 'huge'" in r.stderr


LLAMA_FTYPES = {"Q4_K_M": 15, "Q4_0": 2, "Q8_0": 7, "MXFP4": 38}


@pytest.mark.parametrize("arch,file_type", [(a, f) for a in ("qwen2", "phi3", "gpt-oss") for f in
                                            ("Q4_K_M", "Q4_0", "Q8_0")] + [("gpt-oss", "MXFP4")])
def test_llama_cpp_quantizer_chooses_the_same_types(synth_model, plugins, tmp_path: Path, arch: str,
                                                    file_type: str) -> None:
    """Our F32 file quantized by llama.cpp's own tool holds exactly the ggml types our writer gives each tensor:
    a synthetic file and a llama.cpp-made one are alike to the loader."""
    import ctypes
    import os

    llama_cpp = require_reference("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[file_type]
    converted = tmp_path / f"{arch}-{file_type}.gguf"
    saved = os.dup(2)  # the quantizer logs every tensor on stderr
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    try:
        rc = llama_cpp.llama_model_quantize(str(synth_model(arch, "F32")).encode(), str(converted).encode(),
                                            ctypes.byref(params))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert rc == 0
    theirs, _ = open_checked(converted, plugins)
    ours, _ = open_checked(synth_model(arch, file_type), plugins)
    assert {n: t.type_name for n, t in ours.tensors.items()} == {n: t.type_name for n, t in theirs.tensors.items()}
    assert {n: t.shape for n, t in ours.tensors.items()} == {n: t.shape for n, t in theirs.tensors.items()}
