"""The built-in samplers against Hugging Face transformers' logits processors (top-k, top-p, min-p, temperature,
repetition penalty), the OpenAI presence/frequency formula, chain order, greedy, and seeded draws."""

from __future__ import annotations

import pytest
import torch

from conftest import require_reference
from orcd.sampling import BUILTIN_SAMPLERS, SamplerChain, SamplingParams


@pytest.fixture(scope="module")
def hf_processors():
    require_reference("transformers")
    from transformers.generation import logits_process

    return logits_process


def chain(**params) -> SamplerChain:
    return SamplerChain([f() for f in BUILTIN_SAMPLERS], SamplingParams(**params), torch.device("cpu"))


def random_logits(seed: int, n: int = 300) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name,params,make", [
    ("top_k", dict(top_k=17), lambda p: p.TopKLogitsWarper(17)),
    ("top_p", dict(top_p=0.8), lambda p: p.TopPLogitsWarper(0.8)),
    ("top_p", dict(top_p=0.3), lambda p: p.TopPLogitsWarper(0.3)),
    ("min_p", dict(min_p=0.05), lambda p: p.MinPLogitsWarper(0.05)),
    ("temperature", dict(temperature=0.7), lambda p: p.TemperatureLogitsWarper(0.7)),
    ("repetition", dict(repetition_penalty=1.3), lambda p: p.RepetitionPenaltyLogitsProcessor(1.3)),
])
def test_builtin_sampler_matches_transformers(hf_processors, seed, name, params, make):
    logits = random_logits(seed)
    history = torch.tensor([3, 7, 7, 250, 11, 3])
    ours = chain(**params).process(logits, history)
    ref = make(hf_processors)(history[None], logits[None].clone())[0]
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    assert torch.allclose(ours[kept], ref[kept], rtol=1e-6)


def test_presence_and_frequency_penalties_follow_openai():
    logits = random_logits(9, 20)
    history = torch.tensor([1, 1, 1, 4, 19])
    ours = chain(presence_penalty=0.5, frequency_penalty=0.25).process(logits, history)
    expected = logits.clone()
    for token, count in ((1, 3), (4, 1), (19, 1)):
        expected[token] -= count * 0.25 + 0.5
    assert torch.allclose(ours, expected)


def test_penalties_run_before_temperature_and_truncation():
    logits = torch.tensor([2.0, 1.9, 0.0, -1.0])
    # the penalty demotes token 0 below token 1 before top-k keeps one token
    out = chain(repetition_penalty=2.0, top_k=1, temperature=0.5).process(logits, torch.tensor([0]))
    assert torch.isinf(out[[0, 2, 3]]).all() and out[1] == pytest.approx(1.9 / 0.5)


def test_temperature_zero_is_argmax_whatever_the_truncation():
    c = chain(temperature=0.0, top_k=3, top_p=0.1, min_p=0.5)
    logits = random_logits(4)
    assert c.generator is None and c.sample(logits, torch.tensor([], dtype=torch.long)) == int(logits.argmax())


def test_seeded_draws_repeat_and_follow_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    empty = torch.tensor([], dtype=torch.long)
    a, b = chain(temperature=1.0, seed=42), chain(temperature=1.0, seed=42)
    draws = [a.sample(logits, empty) for _ in range(4000)]
    assert draws == [b.sample(logits, empty) for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)  # ~4 standard errors
