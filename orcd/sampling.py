"""Sampling: the chain of logit processors that picks each next token, and the built-in samplers.

A request's ``SamplingParams`` go to every registered ``SamplerFactory`` (built-ins and plugins alike, through the
``register_samplers`` hook); each returns a ``Sampler`` or ``None`` when inactive for those parameters. The active
samplers run in ``order`` on the float32 logits of one sequence; then the token is drawn: argmax at temperature 0,
else from the softmax with the request's seeded ``torch.Generator`` (same seed, prompt and device → same tokens).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from orcd.hookspecs import hookimpl


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True)

    temperature: float = Field(1.0, ge=0.0)
    top_k: int = Field(0, ge=0)  # 0: off
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = Field(None, ge=0, lt=2**64)
    extra: dict[str, Any] = Field(default_factory=dict)  # parameters of third-party samplers, by their names


class Sampler(Protocol):
    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Return processed logits (float32, ``(vocab,)``); ``history`` holds the prompt and generated ids."""


class SamplerFactory(ABC):
    name: ClassVar[str]
    order: ClassVar[int]  # penalties < 100 <= temperature < 200 <= truncation

    @abstractmethod
    def create(self, params: SamplingParams) -> Sampler | None: ...


# --- built-ins -----------------------------------------------------------------------------------------------------


class RepetitionPenalty(SamplerFactory):
    """llama.cpp / CTRL: divide positive logits of seen tokens by the penalty, multiply negative ones."""

    name, order = "repetition_penalty", 10

    def create(self, params: SamplingParams) -> Sampler | None:
        penalty = params.repetition_penalty
        if penalty == 1.0:
            return None

        def apply(logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            if history.numel() == 0:
                return logits
            seen = torch.unique(history)
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
            return logits

        return apply


class PresenceFrequencyPenalty(SamplerFactory):
    """OpenAI: subtract ``presence`` once per seen token and ``frequency`` per occurrence."""

    name, order = "presence_frequency_penalty", 20

    def create(self, params: SamplingParams) -> Sampler | None:
        presence, frequency = params.presence_penalty, params.frequency_penalty
        if presence == 0.0 and frequency == 0.0:
            return None

        def apply(logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            if history.numel() == 0:
                return logits
            counts = torch.bincount(history, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
            return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence

        return apply


class Temperature(SamplerFactory):
    name, order = "temperature", 100

    def create(self, params: SamplingParams) -> Sampler | None:
        t = params.temperature
        if t == 0.0 or t == 1.0:
            return None
        return lambda logits, history: logits / t


class TopK(SamplerFactory):
    name, order = "top_k", 200

    def create(self, params: SamplingParams) -> Sampler | None:
        k = params.top_k
        if k <= 0 or params.temperature == 0.0:
            return None

        def apply(logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            if k >= logits.shape[-1]:
                return logits
            kth = torch.topk(logits, k).values[-1]
            return logits.masked_fill(logits < kth, float("-inf"))

        return apply


class TopP(SamplerFactory):
    """Nucleus: keep the smallest set of most probable tokens whose probability reaches ``top_p``."""

    name, order = "top_p", 210

    def create(self, params: SamplingParams) -> Sampler | None:
        p = params.top_p
        if p >= 1.0 or params.temperature == 0.0:
            return None

        def apply(logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
            drop = before >= p
            drop[0] = False  # the most probable token always stays
            return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))

        return apply


class MinP(SamplerFactory):
    """Keep tokens whose probability is at least ``min_p`` times the most probable one's."""

    name, order = "min_p", 220

    def create(self, params: SamplingParams) -> Sampler | None:
        m = params.min_p
        if m <= 0.0 or params.temperature == 0.0:
            return None

        def apply(logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            threshold = logits.max() + torch.log(torch.tensor(m, dtype=logits.dtype, device=logits.device))
            return logits.masked_fill(logits < threshold, float("-inf"))

        return apply


BUILTIN_SAMPLERS: tuple[type[SamplerFactory], ...] = (
    RepetitionPenalty,
    PresenceFrequencyPenalty,
    Temperature,
    TopK,
    TopP,
    MinP,
)


@hookimpl
def register_samplers(register: Callable[[SamplerFactory], None]) -> None:
    for factory in BUILTIN_SAMPLERS:
        register(factory())


class SamplerChain:
    """The active samplers of one request, in order, then the draw."""

    def __init__(self, factories: list[SamplerFactory], params: SamplingParams, device: torch.device) -> None:
        active = [(f.order, f.name, f.create(params)) for f in factories]
        self.samplers: list[Sampler] = [s for _, _, s in sorted(active, key=lambda a: (a[0], a[1])) if s is not None]
        self.params = params
        self.generator: torch.Generator | None = None
        if params.temperature > 0.0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def process(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        logits = logits.float().clone()
        for sampler in self.samplers:
            logits = sampler(logits, history)
        return logits

    def sample(self, logits: torch.Tensor, history: torch.Tensor) -> int:
        logits = self.process(logits, history)
        if self.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
