"""Events the engine hands to the metrics hooks (see ``orcd.hookspecs``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestStarted:
    request_id: str
    prompt_tokens: int
    started_at: float  # time.time()


@dataclass(frozen=True)
class TokenProduced:
    request_id: str
    index: int  # 0 for the first generated token
    token_id: int
    seconds_since_previous: float  # for index 0: time to first token


@dataclass(frozen=True)
class RequestFinished:
    request_id: str
    outcome: str  # eos | max_tokens | stop_sequence | an error code (CANCELLED, VRAM_OOM, ...)
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None
    decode_tokens_per_s: float | None
