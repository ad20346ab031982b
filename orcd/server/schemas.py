"""Request and response bodies of the worker API and the OpenAI-compatible API (pydantic).

The field limits are the worker contract of issue 6: an orchestrator relies on a request outside them being
refused with ``400 {code: INVALID_REQUEST, message, field}`` before any stream starts. Unknown fields are refused
too (``extra="forbid"``): a typo such as ``temprature`` must not be silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

UINT64_MAX = 2**64 - 1
MAX_TOKENS_LIMIT = 2048  # the worker API's ceiling on max_tokens
MAX_STOP_STRINGS = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- worker API ------------------------------------------------------------------------------------------------


class ExecuteRequest(_Strict):
    """``POST /execute``. Sampling defaults leave the model's distribution untouched (temperature 1, no
    truncation, no penalty); ``seed`` is drawn at random and reported in the ``end`` event when omitted."""

    job_id: str = Field(min_length=1, max_length=256)
    prompt: str = Field(min_length=1)
    max_tokens: StrictInt = Field(256, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    seed: StrictInt | None = Field(None, ge=0, le=UINT64_MAX)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=MAX_STOP_STRINGS)

    @field_validator("temperature", "top_p", "min_p", "repetition_penalty", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be a number, not a boolean")  # noqa: TRY004 - pydantic reports ValueError only
        return v


class CancelRequest(_Strict):
    job_id: str = Field(min_length=1, max_length=256)


class ErrorBody(BaseModel):
    """The body of every error response of the worker API."""

    code: str
    message: str
    field: str | None = None


class Health(BaseModel):
    status: Literal["healthy", "unhealthy"]
    model: str
    quant_kind: str
    vram_bytes: int
    uptime_seconds: float
    worker_id: str
    device: str
    synthetic: bool
    state: Literal["idle", "busy", "draining"]
    accepting_jobs: bool
    queue_length: int
    running_jobs: int
    context_length: int
    model_path: str
    reason: str | None = None  # why the worker is unhealthy
    last_residency_check: float | None = None  # unix time


# --- OpenAI-compatible API ---------------------------------------------------------------------------------------

StopField = str | list[str] | None


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _OpenAIBase(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions.

    Fields OpenAI defines but orcd does not implement are declared so that their neutral value (``null``,
    ``n=1``, ``false``) passes, while any other value is refused naming the field; a field OpenAI does not
    define at all is refused by ``extra="forbid"``. ``top_k``, ``min_p`` and ``repetition_penalty`` are
    extensions that llama.cpp's server also accepts."""

    model: str = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    seed: StrictInt | None = Field(None, ge=-(2**63), le=UINT64_MAX)
    stop: StopField = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    top_k: StrictInt = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    # defined by OpenAI, not implemented: only the neutral value is accepted
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: StopField) -> StopField:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: Any) -> Any:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v not in (None, False, 0):
            raise ValueError("logprobs is not supported by this server")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _OpenAIBase:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str]
    max_tokens: StrictInt | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt is supported (a string, or a list of one string)")
        if (v if isinstance(v, str) else v[0]) == "":
            raise ValueError("the prompt must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("best_of is not supported by this server (only 1)")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported by this server")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    top_logprobs: StrictInt | None = None
    response_format: ResponseFormat | None = None  # only {"type": "text"}
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: Any) -> Any:
        if v:
            raise ValueError("tools are not supported by this server")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> Any:
        if v not in (None, "none"):
            raise ValueError("tool_choice is not supported by this server")
        return v

    @field_validator("parallel_tool_calls", "top_logprobs")
    @classmethod
    def _unsupported(cls, v: Any, info: Any) -> Any:
        if v is not None:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return v

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them (``developer`` is OpenAI's newer name for ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
