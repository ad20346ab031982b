"""The llama adapter's architectures: configs read from metadata, the synthetic presets, the built modules'
structure, and the errors for files that do not fit."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from orcd.description import describe
from orcd.errors import ModelFileError
from orcd.loader import load_model
from orcd.modelfile import ModelFile
from orcd.nn import FusedQKV, SeparateQKV


def test_qwen2_tiny_config_and_module(synth_model, plugins):
    loaded = load_model(synth_model("qwen2", "Q4_K_M"), "cpu", plugins)
    c = loaded.config
    assert (c.embedding_length, c.block_count, c.head_count, c.head_count_kv, c.head_dim) == (256, 2, 4, 2, 64)
    assert c.rope_freq_base == 1e6 and c.tied_embeddings and c.rope_scaling_type == "none"
    m = loaded.module
    assert m.output.weight is m.embedding.weight  # tied: one tensor on the device, not two
    attn = m.blocks[0].attention
    assert isinstance(attn.qkv, SeparateQKV) and attn.qkv.q.bias is not None and attn.sliding_window is None


def test_phi3_tiny_config_and_module(synth_model, plugins):
    loaded = load_model(synth_model("phi3", "Q4_K_M"), "cpu", plugins)
    c = loaded.config
    assert (c.embedding_length, c.head_count, c.head_count_kv, c.rope_dim) == (256, 4, 2, 64)
    assert c.rms_norm_eps == pytest.approx(1e-5)  # stored as float32
    assert c.sliding_window == 2047 and c.fused_qkv and not c.tied_embeddings and not c.rope_factors
    m = loaded.module
    attn = m.blocks[1].attention
    assert isinstance(attn.qkv, FusedQKV) and attn.qkv.sizes == (256, 128, 128) and attn.sliding_window == 2047
    assert m.blocks[0].mlp.gate is None and m.blocks[0].mlp.up.out_features == 2 * 384  # fused gate|up
    assert loaded.tokenizer.add_bos and loaded.tokenizer.token_text(loaded.tokenizer.bos_id) == "<s>"


def test_phi3_longrope_config(synth_model, plugins):
    c = load_model(synth_model("phi3", "F32", "tiny-longrope"), "cpu", plugins).config
    assert c.rope_factors and c.rope_dim == 48 and c.rope_original_context_length == 256
    assert c.rope_attn_factor == pytest.approx(math.sqrt(1 + math.log(4096 / 256) / math.log(256)), rel=1e-6)


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_tiny_q4_k_m_mixes_k_quants_and_a_fallback(synth_model, plugins, arch):
    path = synth_model(arch, "Q4_K_M")
    types = describe(path, plugins).tensor_types
    assert {"Q4_K", "Q6_K"} <= set(types) and {"Q5_0", "Q8_0"} & set(types)
    for file_type in ("F32", "Q8_0", "Q4_K_M"):
        assert Path(synth_model(arch, file_type)).stat().st_size < 5 * 2**20


def test_phi3_mini_4k_preset_is_the_real_shape(plugins):
    spec = plugins.architecture("phi3").synth_spec("phi-3-mini-4k")
    m = spec.metadata
    assert (m["phi3.embedding_length"], m["phi3.block_count"], m["phi3.attention.head_count"],
            m["phi3.attention.head_count_kv"], m["phi3.feed_forward_length"], m["phi3.context_length"],
            m["phi3.attention.sliding_window"], m["phi3.rope.dimension_count"]) == (3072, 32, 32, 32, 8192, 4096,
                                                                                   2047, 96)
    assert m["phi3.rope.freq_base"] == 10000.0 and m["phi3.attention.layer_norm_rms_epsilon"] == 1e-5
    assert spec.vocab_size == 32064 and spec.tokenizer == "llama" and spec.chat_template == "phi-3"
    assert spec.special_tokens["bos"] == "<s>" and spec.special_tokens["eos"] == "<|endoftext|>"
    assert spec.special_tokens["eot"] == "<|end|>"
    shapes = {t.name: t.shape for t in spec.tensors}
    assert shapes["blk.0.attn_qkv.weight"] == (3 * 3072, 3072) and shapes["blk.31.ffn_up.weight"] == (16384, 3072)
    params = sum(math.prod(s) for s in shapes.values())
    assert 3.7e9 < params < 3.9e9  # Phi-3-mini: 3.8 B


def write_gguf(path: Path, arch: str, metadata: dict, tensors: dict[str, tuple[int, ...]]) -> Path:
    """A bare GGUF file: metadata and zero F32 tensors (enough for reading a config)."""
    w = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        if isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    for name, shape in tensors.items():
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


PHI3_META = {"phi3.context_length": 4096, "phi3.embedding_length": 64, "phi3.block_count": 1,
             "phi3.feed_forward_length": 32, "phi3.attention.head_count": 4,
             "phi3.attention.layer_norm_rms_epsilon": 1e-5, "phi3.vocab_size": 16}


@pytest.mark.parametrize("change,tensors,needle", [
    ({"phi3.rope.dimension_count": 15}, {}, "phi3.rope.dimension_count"),
    ({"phi3.rope.dimension_count": 32}, {}, "phi3.rope.dimension_count"),  # more than the head size 16
    ({"phi3.rope.scaling.original_context_length": 512}, {"rope_factors_long.weight": (8,)}, "rope_factors_short"),
    ({}, {"rope_factors_long.weight": (8,), "rope_factors_short.weight": (8,)}, "original_context_length"),
])
def test_phi3_config_errors_name_the_key_or_tensor(tmp_path, plugins, change, tensors, needle):
    path = write_gguf(tmp_path / "bad.gguf", "phi3", PHI3_META | change, {"token_embd.weight": (16, 64)} | tensors)
    with pytest.raises(ModelFileError, match=needle):
        plugins.architecture("phi3").config(ModelFile.open(path))


def test_qwen2_rows_that_do_not_fit_the_heads_are_reported(synth_model, plugins):
    model = ModelFile.open(synth_model("qwen2", "F32"))
    arch = plugins.architecture("qwen2")
    config = arch.config(model).model_copy(update={"head_count": 8, "head_dim": 32, "head_count_kv": 8})
    with pytest.raises(ModelFileError, match="blk.0.attn_k.weight"):
        arch.build(model, config, "cpu", plugins)
