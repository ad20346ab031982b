"""One exception family for everything a user or a client can be told about.

Each class carries a stable ``code`` (the worker API's error codes) and whether a retry may succeed. Messages are
written for the person who has to act on them: they name the file, tensor, key, field or plugin involved.
"""

from __future__ import annotations


class OrcdError(Exception):
    """Base of every error orcd raises on purpose."""

    code: str = "INTERNAL"
    retriable: bool = False

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = context


class PluginError(OrcdError):
    """A plugin could not be loaded, or two plugins claim the same name."""


class ModelFileError(OrcdError):
    """A GGUF file is unusable: not GGUF, truncated, inconsistent, or needs a plugin that is not installed."""

    code = "MODEL_LOAD_FAILED"


class QuantError(OrcdError):
    """Raw tensor bytes that do not fit the declared type and shape, or a type no plugin handles."""

    code = "MODEL_LOAD_FAILED"


class InvalidRequest(OrcdError):
    """A request that cannot be served as asked (bad field value, prompt longer than the context, ...)."""

    code = "INVALID_REQUEST"

    def __init__(self, message: str, field: str | None = None, **context: object) -> None:
        super().__init__(message, **context)
        self.field = field


class InsufficientVRAM(OrcdError):
    """The model does not fit in the free memory of the chosen device."""

    code = "INSUFFICIENT_VRAM"


class VramOOM(OrcdError):
    """A job ran out of GPU memory; its allocations were freed and the worker keeps serving."""

    code = "VRAM_OOM"
    retriable = True


class CudaError(OrcdError):
    code = "CUDA_ERROR"


class InferenceTimeout(OrcdError):
    code = "INFERENCE_TIMEOUT"
    retriable = True


class Cancelled(OrcdError):
    code = "CANCELLED"
