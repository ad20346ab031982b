"""A sampler plugin for tests that changes nothing and keeps the logits every step of a request saw: requests
that set ``extra["record"]`` to a key get their rows in ``plugin.factory.seen[key]``."""

from __future__ import annotations

from typing import Callable

import torch

import orcd
from orcd.sampling import SamplerFactory, SamplingParams


class RecordLogits(SamplerFactory):
    name, order = "test_record_logits", 1

    def __init__(self) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {}

    def create(self, params: SamplingParams):
        key = params.extra.get("record")
        if key is None:
            return None
        rows = self.seen.setdefault(key, [])

        def apply(logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            rows.append(logits.clone())
            return logits

        return apply


class RecordPlugin:
    def __init__(self) -> None:
        self.factory = RecordLogits()

    @orcd.hookimpl
    def register_samplers(self, register: Callable) -> None:
        register(self.factory)
