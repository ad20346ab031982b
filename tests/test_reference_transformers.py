"""Qwen2 and Phi-3 logits against Hugging Face transformers with the same weights (issue 4, point 7a).

The HF model gets the GGUF tensors decoded by gguf's numpy dequantizers, so both sides multiply the same float32
weights and the comparison isolates the model code (attention, rotary, norms, MLP, tying, fused projections)
from the quantization. Tolerance: 1e-4 absolute on logits of magnitude ~2. Both sides are float32 throughout and
differ only in summation order and rotary angle rounding; the measured differences are ~1e-6 for every file type
(2 layers), so 1e-4 leaves two orders of magnitude while still catching any real mistake (a wrong rotary pair
order, bias, factor or mask moves logits by 1e-2 or more).

Where Triton is installed and there is no GPU, the prompt and decode comparisons run a second time on the CUDA fast
path's kernels in Triton's interpreter (``kernel_support.KERNEL_PATHS``: fused quantized matmuls, stacked
projections, norms, rotary; the cache here is the contiguous one, so the paged decode attention is the engine
tests'), with the same bound.

On a GPU they run with the model on CUDA (compiled kernels, CUDA's FP16 KV cache; outside CI), against the same
float32 transformers logits on the CPU, with the bound ``CUDA_ATOL`` = 2e-2 that ``test_engine``'s CUDA-vs-CPU
test uses: keys and values rounded to fp16 (relative error up to 2^-11) carry about 1e-3 relative error into the
attention outputs, which moves logits of magnitude ~2 by up to ~1e-2; a real mistake moves them by far more.
"""

from __future__ import annotations

import pytest
import torch

from conftest import require_reference
from kernel_support import KERNEL_PATHS, path_device, take_path
from reference_llama import PROMPT_TEXT, greedy, hf_logits, hf_model, load, prompt_logits, random_prompt

ATOL = 1e-4
CUDA_ATOL = 2e-2
MODELS = [("qwen2", "tiny"), ("phi3", "tiny"), ("phi3", "tiny-longrope")]
FILE_TYPES = ["F32", "Q8_0", "Q4_K_M"]


def bound(kernel_path: str) -> float:
    return CUDA_ATOL if kernel_path == "cuda" else ATOL


@pytest.fixture(scope="module")
def transformers():
    return require_reference("transformers")


@pytest.mark.reference
@pytest.mark.parametrize("kernel_path", KERNEL_PATHS)
@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("arch,preset", MODELS)
def test_prompt_logits_match_transformers(transformers, synth_model, plugins, arch, preset, file_type, kernel_path,
                                          monkeypatch):
    calls = take_path(monkeypatch, kernel_path)
    path = synth_model(arch, file_type, preset)
    loaded = load(path, plugins, path_device(kernel_path))
    ids = loaded.tokenizer.encode(PROMPT_TEXT)
    assert len(ids) >= 64
    # n_ctx 256: for tiny-longrope that is its original context, so both sides use the short factors
    ours = prompt_logits(loaded, ids, n_ctx=256)
    ref = hf_logits(hf_model(transformers, path, loaded.config), ids)
    assert ours.shape == ref.shape == (len(ids), loaded.config.vocab_size)
    diff = (ours - ref).abs().max().item()
    assert diff < bound(kernel_path), (
        f"{path.name}: max |logit difference| {diff:.3g} (logits up to {ref.abs().max():.3g})")
    assert calls.took(kernel_path) or file_type == "F32", calls  # F32 weights have no fused kernel


@pytest.mark.reference
def test_longrope_long_factors_match_transformers(transformers, synth_model, plugins):
    """Past the original context (256) both use the long factors: HF because the sequence is longer, we (and
    llama.cpp) because the allocated context is."""
    path = synth_model("phi3", "F32", "tiny-longrope")
    loaded = load(path, plugins)
    ids = random_prompt(loaded, seed=1, length=300)
    ours = prompt_logits(loaded, ids, n_ctx=512)
    rotary = loaded.module.blocks[0].attention.rotary
    assert rotary.uses_long_factors and rotary.dim == 48 < loaded.config.head_dim  # partial rotary too
    ref = hf_logits(hf_model(transformers, path, loaded.config), ids)
    assert (ours - ref).abs().max().item() < ATOL
    short = prompt_logits(loaded, ids[:256], n_ctx=256)  # the other factor set gives visibly different logits
    assert (short - ref[:256]).abs().max().item() > 100 * ATOL


@pytest.mark.reference
def test_phi3_sliding_window_matches_transformers(transformers, synth_model, plugins):
    """A window of 16 on an 80-token prompt: every query past position 15 loses keys (HF's mask: q - k < window)."""
    path = synth_model("phi3", "F32")
    loaded = load(path, plugins)
    config = loaded.config.model_copy(update={"sliding_window": 16})
    loaded.module = plugins.architecture("phi3").build(loaded.model_file, config, torch.device("cpu"), plugins)
    ids = random_prompt(loaded, seed=2, length=80)
    ours = prompt_logits(loaded, ids, n_ctx=256)
    windowed = hf_logits(hf_model(transformers, path, config, sliding_window=16), ids)
    full = hf_logits(hf_model(transformers, path, config, sliding_window=None), ids)
    assert (ours - windowed).abs().max().item() < ATOL
    assert (ours[16:] - full[16:]).abs().max().item() > 100 * ATOL
    assert (ours[:16] - full[:16]).abs().max().item() < ATOL


@pytest.mark.reference
@pytest.mark.parametrize("kernel_path", KERNEL_PATHS)
@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_decode_steps_match_transformers(transformers, synth_model, plugins, arch, kernel_path, monkeypatch):
    """One token at a time through the KV cache equals HF's full forward over the same tokens. On the kernels' path
    3 steps, not 12: in Triton's interpreter one decode step of these 2-layer models takes about 20 s (the decode
    kernel's programs run one by one), and the tokens come from the reference path."""
    calls = take_path(monkeypatch, kernel_path)
    path = synth_model(arch, "Q4_K_M")
    loaded = load(path, plugins, path_device(kernel_path))
    prompt = random_prompt(loaded, seed=3, length=40)
    with monkeypatch.context() as reference:
        reference.setenv("ORCD_KERNELS", "0")
        generated, _ = greedy(loaded, prompt, 3 if kernel_path == "interpreted-kernels" else 12, n_ctx=128)
    ids = prompt + generated
    ref = hf_logits(hf_model(transformers, path, loaded.config), ids)
    if kernel_path != "cuda":  # (on CUDA the fp16 cache may flip a near tie; the logits bound below still holds)
        assert ref[len(prompt) - 1 : -1].argmax(-1).tolist() == generated
    # re-run the decode and compare each step's logits with HF's at that position
    from orcd.engine.kv_cache import KVCache
    from reference_llama import one_sequence

    cache = KVCache.for_model(loaded.config, 1, 128, loaded.device)
    loaded.module(one_sequence(cache, prompt[:-1], 0))
    for pos in range(len(prompt) - 1, len(ids) - 1):
        step = loaded.module(one_sequence(cache, ids[pos : pos + 1], pos))[0].cpu()
        assert (step - ref[pos]).abs().max().item() < bound(kernel_path), f"position {pos}"
    assert calls.took(kernel_path), calls
