"""gpt-oss on CUDA: the tiny MXFP4 model built on the GPU matches transformers (CPU, float32), its weights stay as
stored in the file, and greedy decoding through the engine (FP16 KV cache on CUDA) equals llama.cpp's.

The full-size check (GPT-OSS-20B shapes, 12.1 GB) is a benchmark, not a test: see plugins/gpt_adapter/README.md."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orcd.description import open_checked
from orcd.engine import Engine, FinishEvent, GenerationRequest, TokenEvent
from orcd.loader import load_model
from orcd.nn import ForwardBatch
from orcd.sampling import SamplingParams

import test_gpt_oss_reference as ref
from conftest import require_reference

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda:0")


def test_weights_stay_as_stored_on_the_gpu(synth_model, plugins) -> None:
    model, config = open_checked(synth_model("gpt-oss", "MXFP4"), plugins)
    torch.cuda.synchronize(DEV)
    before = torch.cuda.memory_allocated(DEV)
    module = plugins.architecture("gpt-oss").build(model, config, DEV, plugins)
    torch.cuda.synchronize(DEV)
    held = torch.cuda.memory_allocated(DEV) - before
    file_bytes = sum(t.n_bytes for t in model.tensors.values())
    # The caching allocator rounds each of the ~80 tensors up to 512 bytes: a few KiB over the file's bytes.
    assert file_bytes <= held <= 1.1 * file_bytes, (held, file_bytes)
    for b in module.blocks:  # on CUDA gate and up are one stacked expert tensor (``gate`` None), still MXFP4
        mlp = b.mlp
        assert mlp.gate is None and mlp.up.rows == 2 * mlp.down.cols
        for projection in (mlp.up, mlp.down):
            assert projection.weight.data.device == DEV and projection.weight.fmt.name == "MXFP4"


def test_logits_on_cuda_match_transformers(synth_model, plugins) -> None:
    path = synth_model("gpt-oss", "MXFP4")
    mf, config = open_checked(path, plugins)  # YaRN as transformers computes it (the default)
    hf = ref._transformers_model(path, config, truncate=False)
    module = plugins.architecture("gpt-oss").build(mf, config, DEV, plugins)
    ids = ref._prompt_ids(config.vocab_size)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    tokens = torch.tensor([ids], device=DEV)
    got = module(ForwardBatch(tokens, torch.arange(len(ids), device=DEV).unsqueeze(0)), all_logits=True)[0].cpu()
    # float32 on both sides (TF32 is off for matmuls by default); CUDA's summation order differs from the CPU's.
    assert (got - expected).abs().max() < 1e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def _llama_greedy_elsewhere(path, prompt: list[int], n: int, tmp_path) -> list[int]:
    """llama.cpp's greedy tokens (CPU, as ``test_gpt_oss_reference``) from a process without torch: beside torch's
    CUDA libraries, llama-cpp-python crashed the test process on the H100 (``llama_greedy``)."""
    require_reference("llama_cpp")
    request = tmp_path / "greedy.json"
    request.write_text(json.dumps({"path": str(path), "prompt": prompt, "n": n, "n_ctx": 512}))
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("llama_greedy.py")), str(request)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"llama.cpp's process ended with {done.returncode}: {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_greedy_on_cuda_equals_llama_cpp(synth_model, plugins, tmp_path) -> None:
    path = synth_model("gpt-oss", "MXFP4")
    loaded = load_model(path, device=DEV, plugins=plugins)
    prompt = loaded.tokenizer.encode(ref.PROMPT_TEXT, add_special=False)
    expected = _llama_greedy_elsewhere(path, prompt, 32, tmp_path)
    mf, config = open_checked(path, plugins)
    config = config.model_copy(update={"rope_yarn_truncate": True})  # llama.cpp's YaRN
    module = plugins.architecture("gpt-oss").build(mf, config, DEV, plugins)
    engine = Engine(dataclasses.replace(loaded, module=module, config=config), plugins, n_ctx=512)
    request = GenerationRequest(request_id="greedy-cuda", prompt_ids=prompt, max_tokens=32,
                                sampling=SamplingParams(temperature=0.0), stop_token_ids=set())
    events = list(engine.generate(request))
    assert isinstance(events[-1], FinishEvent) and events[-1].reason == "max_tokens"
    assert [e.token_id for e in events if isinstance(e, TokenEvent)] == expected


@pytest.mark.parametrize("file_type", ["MXFP4", "Q4_K_M"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [1, 2, 40])
def test_fused_experts_equal_the_reference_path(synth_model, plugins, monkeypatch, file_type, dtype, tokens) -> None:
    """The mixture of experts through the formats' fused expert kernels (decode-sized and prefill-sized batches)
    against the same layer with the kernels off (dequantize the chosen experts, then matmul)."""
    mf, config = open_checked(synth_model("gpt-oss", file_type), plugins)
    module = plugins.architecture("gpt-oss").build(mf, config, DEV, plugins)
    moe = module.blocks[1].mlp
    x = torch.randn(tokens, config.embedding_length, device=DEV, generator=torch.Generator(DEV).manual_seed(tokens))
    x = x.to(dtype)
    got = moe(x)
    monkeypatch.setenv("ORCD_KERNELS", "0")
    want = moe(x)
    # fp32: both sides accumulate in fp32 in different orders; fp16: the reference rounds the decoded weights to
    # fp16 before its matmul, the kernels keep them in fp32 (decode) and both round each projection's output.
    tol = 1e-4 if dtype == torch.float32 else 4e-3
    assert got.dtype == want.dtype == dtype
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max(), file_type
