"""gpt-oss: the file layout llama.cpp's converter writes, the config read from it, the module built from it (experts
kept MXFP4, the sliding window on alternate layers), and the pieces that have a reference of their own: YaRN's
frequencies and the clamped SwiGLU against Hugging Face transformers."""

from __future__ import annotations

import math

import gguf
import pytest
import torch

from orcd.description import open_checked
from orcd.errors import ModelFileError
from orcd.nn import RopeScaling
from orcd.testing.filetypes import tensor_type
from orcd_gpt_adapter.gpt_oss import GptOss, GptOssConfig
from orcd_gpt_adapter.moe import MixtureOfExperts, clamped_swiglu
from orcd_gpt_adapter.yarn import yarn_frequencies

from conftest import require_reference

T = gguf.GGMLQuantizationType


def test_tiny_file_has_llama_cpp_names_types_and_metadata(synth_model, plugins) -> None:
    path = synth_model("gpt-oss", "MXFP4")
    assert path.stat().st_size < 8 * 1024 * 1024
    model, config = open_checked(path, plugins)
    assert isinstance(config, GptOssConfig)
    assert (config.block_count, config.head_count, config.head_count_kv, config.head_dim) == (4, 4, 2, 64)
    assert (config.expert_count, config.expert_used_count, config.expert_feed_forward_length) == (8, 4, 128)
    assert config.sliding_window == 128 and config.sliding_window_pattern == 2
    assert [config.is_sliding(i) for i in range(4)] == [True, False, True, False]  # llama.cpp: even layers
    assert (config.rope_scaling_type, config.rope_scaling_factor, config.rope_original_context_length) == (
        "yarn", 32.0, 4096)
    assert config.rope_freq_base == 150000.0 and config.vocab_size == 1024
    types = {name: t.ggml_type for name, t in model.tensors.items()}
    for x in ("gate", "up", "down"):
        assert types[f"blk.0.ffn_{x}_exps.weight"] == T.MXFP4
        assert types[f"blk.0.ffn_{x}_exps.bias"] == T.F32
    assert model.tensor("blk.0.ffn_gate_exps.weight").shape == (8, 128, 256)
    assert model.tensor("blk.0.ffn_down_exps.weight").shape == (8, 256, 128)
    assert model.tensor("blk.0.ffn_down_exps.bias").shape == (8, 256)
    assert types["blk.0.attn_sinks.weight"] == T.F32 and model.tensor("blk.0.attn_sinks.weight").shape == (4,)
    assert types["blk.0.ffn_gate_inp.weight"] == T.F32  # llama.cpp never quantizes the router
    assert types["blk.0.attn_q.weight"] == T.Q8_0 and types["output.weight"] == T.Q8_0
    assert set(GptOss().required_tensors(config)) == set(model.tensors)


def test_real_preset_has_gpt_oss_20b_shapes_and_size() -> None:
    spec = GptOss().synth_spec("gpt-oss-20b")
    shapes = {t.name: t.shape for t in spec.tensors}
    assert shapes["blk.23.ffn_gate_exps.weight"] == (32, 2880, 2880)
    assert shapes["blk.0.attn_q.weight"] == (4096, 2880) and shapes["blk.0.attn_k.weight"] == (512, 2880)
    assert shapes["output.weight"] == (201088, 2880) and shapes["blk.0.attn_sinks.weight"] == (64,)
    assert spec.metadata["gpt-oss.context_length"] == 131072
    n_params = sum(math.prod(s) for s in shapes.values())
    assert 20.8e9 < n_params < 21.0e9  # gpt-oss-20b: 20.9 billion parameters
    n_bytes = 0
    for t in spec.tensors:
        q = tensor_type("MXFP4", t, 24)
        block, size = gguf.GGML_QUANT_SIZES[q]
        n_bytes += math.prod(t.shape) // block * size
    assert 11.0 * 2**30 < n_bytes < 11.5 * 2**30  # ggml-org's gpt-oss-20b-mxfp4.gguf: 12.1 GB (11.3 GiB)


def test_module_keeps_experts_mxfp4_and_alternates_the_window(synth_model, plugins) -> None:
    model, config = open_checked(synth_model("gpt-oss", "MXFP4"), plugins)
    module = GptOss().build(model, config, torch.device("cpu"), plugins)
    for i, block in enumerate(module.blocks):
        attn, moe = block.attention, block.mlp
        assert attn.sliding_window == (128 if i % 2 == 0 else None)
        assert attn.sinks is not None and attn.sinks.shape == (4,)
        assert attn.qkv.q.bias is not None and attn.output.bias is not None
        assert isinstance(moe, MixtureOfExperts) and moe.top_k == 4 and moe.gate.n_expert == 8
        # Each expert is a view into the one MXFP4 tensor of its layer: no dense or duplicated expert weights.
        first, last = moe.down.experts[0].weight, moe.down.experts[7].weight
        assert first.fmt.name == "MXFP4" and first.shape == (256, 128) and first.data.dtype == torch.uint8
        assert last.data.untyped_storage().data_ptr() == first.data.untyped_storage().data_ptr()
        assert first.data.untyped_storage().nbytes() == model.tensor(f"blk.{i}.ffn_down_exps.weight").n_bytes


def test_module_holds_the_file_s_bytes_once(synth_model, plugins) -> None:
    """Everything stays as stored: the module's tensors add up to the file's tensor data (plus the rotary tables),
    so on a GPU the resident weights are the file size, not a dequantized multiple of it."""
    from orcd.device import iter_tensors, module_bytes

    model, config = open_checked(synth_model("gpt-oss", "MXFP4"), plugins)
    module = GptOss().build(model, config, torch.device("cpu"), plugins)
    file_bytes = sum(t.n_bytes for t in model.tensors.values())
    rotary = sum(t.numel() * t.element_size() for name, t in iter_tensors(module) if name.endswith("inv_freq"))
    assert module_bytes(module) == file_bytes + rotary and rotary <= 1024


def test_only_chosen_experts_run(synth_model, plugins) -> None:
    model, config = open_checked(synth_model("gpt-oss", "MXFP4"), plugins)
    moe = GptOss().build(model, config, torch.device("cpu"), plugins).blocks[0].mlp
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    chosen, weights = moe.route(x)
    assert chosen.shape == (3, 4) and torch.allclose(weights.sum(-1), torch.ones(3))
    calls: list[int] = []
    for e, proj in enumerate(moe.gate.experts):
        proj.register_forward_hook(lambda mod, inp, out, e=e: calls.append(e))
    moe(x)  # 12 (token, expert) pairs, more than the 8 experts: the grouped path
    assert sorted(calls) == sorted(set(chosen.reshape(-1).tolist()))  # each chosen expert once, no other


def test_decode_path_equals_prefill_path(synth_model, plugins) -> None:
    """One token (4 pairs, fewer than the 8 experts) takes the gathered path; the same token among 20 others the
    grouped one. Both decode the same MXFP4 blocks in float32: they agree to rounding."""
    model, config = open_checked(synth_model("gpt-oss", "MXFP4"), plugins)
    moe = GptOss().build(model, config, torch.device("cpu"), plugins).blocks[1].mlp
    x = torch.randn(21, 256, generator=torch.Generator().manual_seed(1))
    calls: list[int] = []
    for proj in moe.gate.experts:
        proj.register_forward_hook(lambda mod, inp, out: calls.append(1))
    alone = torch.cat([moe(x[i:i + 1]) for i in range(21)])
    assert not calls  # no per-expert projection ran: one gather per projection
    torch.testing.assert_close(alone, moe(x), rtol=1e-5, atol=1e-5)
    assert calls


def test_yarn_frequencies_match_transformers() -> None:
    transformers = require_reference("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for truncate in (False, True):
        hf_config = transformers.GptOssConfig(
            head_dim=64, num_hidden_layers=2,
            rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": truncate, "original_max_position_embeddings": 4096,
                             "rope_theta": 150000.0})
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, None)
        ours, mscale = yarn_frequencies(64, 150000.0, RopeScaling("yarn", 32.0, 4096), truncate)
        # HF computes in float32: 1e-6 relative is its rounding, far below the two variants' difference (1e-2).
        torch.testing.assert_close(ours, inv_freq.double(), rtol=1e-6, atol=0)
        assert mscale == pytest.approx(attention_factor, rel=1e-12)
    rounded, _ = yarn_frequencies(64, 150000.0, RopeScaling("yarn", 32.0, 4096), True)
    exact, _ = yarn_frequencies(64, 150000.0, RopeScaling("yarn", 32.0, 4096), False)
    assert ((rounded / exact - 1).abs() > 1e-2).any()


def test_clamped_swiglu_matches_transformers_experts() -> None:
    transformers = require_reference("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    experts = GptOssExperts(transformers.GptOssConfig(num_hidden_layers=1, num_local_experts=1, hidden_size=32,
                                                      intermediate_size=16))
    gate = torch.linspace(-20, 20, 16 * 8).reshape(8, 16)  # well past the clamp at +-7 on both sides
    up = torch.linspace(15, -15, 16 * 8).reshape(8, 16)
    interleaved = torch.stack((gate, up), dim=-1).reshape(8, 32)  # HF's gate_up layout: gate, up, gate, up, ...
    torch.testing.assert_close(clamped_swiglu(gate, up), experts._apply_gate(interleaved), rtol=1e-6, atol=1e-6)


def test_missing_expert_metadata_names_the_key(tmp_path, plugins, monkeypatch) -> None:
    from orcd.testing.synth import synthesize

    real = GptOss.synth_spec

    def without_expert_count(self, preset):
        spec = real(self, preset)
        del spec.metadata["gpt-oss.expert_count"]
        return spec

    monkeypatch.setattr(GptOss, "synth_spec", without_expert_count)
    path = synthesize(tmp_path / "broken.gguf", "gpt-oss", "tiny", "MXFP4", plugins=plugins)
    with pytest.raises(ModelFileError, match="gpt-oss.expert_count"):
        open_checked(path, plugins)


def test_expert_tensor_of_the_wrong_shape_names_the_tensor(tmp_path, plugins, monkeypatch) -> None:
    from dataclasses import replace

    from orcd.testing.synth import synthesize

    real = GptOss.synth_spec

    def short_experts(self, preset):
        spec = real(self, preset)
        spec.tensors = [replace(t, shape=(8, 96, 256)) if t.name == "blk.1.ffn_up_exps.weight" else t
                        for t in spec.tensors]
        return spec

    monkeypatch.setattr(GptOss, "synth_spec", short_experts)
    path = synthesize(tmp_path / "broken.gguf", "gpt-oss", "tiny", "MXFP4", plugins=plugins)
    model, config = open_checked(path, plugins)
    with pytest.raises(ModelFileError, match=r"blk\.1\.ffn_up_exps\.weight.*\(8, 96, 256\)"):
        GptOss().build(model, config, torch.device("cpu"), plugins)


@pytest.mark.parametrize("tokens", [1, 21])
def test_stacked_gate_up_gives_the_separate_projections_result(tokens: int, synth_model, plugins) -> None:
    """On CUDA the loader stacks each layer's gate and up experts (``stack_gate_up``). Expert ``e`` of the stack is
    ``e``'s gate rows then its up rows, with their biases; the module's output equals the separate projections'
    (1 token: the gathered path; 21: the grouped one) to fp32 rounding of the larger matmul."""
    from orcd_gpt_adapter.moe import stack_gate_up

    model, config = open_checked(synth_model("gpt-oss", "MXFP4"), plugins)
    moe = GptOss().build(model, config, torch.device("cpu"), plugins).blocks[0].mlp
    stacked = stack_gate_up("gate_up", moe.gate, moe.up)
    ffn = moe.gate.rows
    assert stacked is not None and stacked.weight.shape == (8, 2 * ffn, 256) and stacked.bias.shape == (8, 2 * ffn)
    for e in (0, 7):
        assert torch.equal(stacked.experts[e].weight.data[:ffn], moe.gate.experts[e].weight.data)
        assert torch.equal(stacked.experts[e].weight.data[ffn:], moe.up.experts[e].weight.data)
        assert torch.equal(stacked.bias[e], torch.cat([moe.gate.bias[e], moe.up.bias[e]]))
    both = MixtureOfExperts(moe.router_weight, moe.router_bias, None, stacked, moe.down, moe.top_k)
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(tokens))
    torch.testing.assert_close(both(x), moe(x), rtol=1e-6, atol=1e-6)
    assert "gate|up stacked" in repr(both)


def test_stacking_refuses_projections_that_cannot_share_a_weight(synth_model, plugins) -> None:
    from orcd_gpt_adapter.moe import stack_gate_up

    model, config = open_checked(synth_model("gpt-oss", "MXFP4"), plugins)
    moe = GptOss().build(model, config, torch.device("cpu"), plugins).blocks[0].mlp
    assert moe.gate.weight.shape == (8, 128, 256) and moe.down.weight.shape == (8, 256, 128)
    assert stack_gate_up("x", moe.gate, moe.down) is None  # different shapes
    with pytest.raises(ValueError, match="half of what it needs"):
        MixtureOfExperts(moe.router_weight, moe.router_bias, None, moe.up, moe.down, moe.top_k)
