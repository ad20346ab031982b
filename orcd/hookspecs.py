"""The contract between orcd and its plugins.

A plugin is a module (or object) with functions marked ``@orcd.hookimpl`` whose names are the hooks below. It is
found through the entry-point group ``orcd``::

    # pyproject.toml of the plugin
    [project.entry-points.orcd]
    my_arch = "my_package.plugin"

The three ``register_*`` hooks follow one pattern: orcd calls them once when the plugin manager starts and hands
each a ``register`` callback; a plugin calls it once per thing it adds. The core keeps the registry and reports a
clash (two plugins claiming one architecture, quant type or sampler name) as a ``PluginError`` naming both.

The metrics hooks are called by the engine for every request; every plugin that implements one is called (no
``firstresult``). They run on the engine's thread between decode steps, so they must return quickly and must not
raise: an exception there is logged and the request goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from orcd.arch import Architecture
    from orcd.metrics import RequestFinished, RequestStarted, TokenProduced
    from orcd.quant import QuantFormat
    from orcd.sampling import SamplerFactory

hookspec = pluggy.HookspecMarker("orcd")
hookimpl = pluggy.HookimplMarker("orcd")


@hookspec
def register_architectures(register: Callable[["Architecture"], None]) -> None:
    """Register model architectures.

    Call ``register(arch)`` once per architecture, where ``arch`` is an instance of a subclass of
    :class:`orcd.arch.Architecture`. ``arch.name`` must equal the ``general.architecture`` value of the GGUF files
    it loads (``"qwen2"``, ``"phi3"``, ``"gpt-oss"``, ...). The architecture turns a file's metadata into a typed
    config, lists the tensors it needs, builds the torch module, and describes synthetic files for tests.
    """


@hookspec
def register_quant_formats(register: Callable[["QuantFormat"], None]) -> None:
    """Register tensor storage formats (ggml types).

    Call ``register(fmt)`` once per format, where ``fmt`` is an instance of a subclass of
    :class:`orcd.quant.QuantFormat` whose ``ggml_type`` is the ``gguf.GGMLQuantizationType`` it decodes. A format
    dequantizes raw blocks with torch (CPU and CUDA), may quantize floats and write random valid blocks (for
    synthetic files), and may provide a fused matmul kernel (``QuantFormat.linear``).
    """


@hookspec
def register_samplers(register: Callable[["SamplerFactory"], None]) -> None:
    """Register samplers: steps of the chain that turns logits into the next token.

    Call ``register(factory)`` once per sampler, where ``factory`` is an instance of a subclass of
    :class:`orcd.sampling.SamplerFactory`. Its ``name`` is unique; its ``order`` places it in the chain (penalties
    run before temperature, truncation after). For every request the engine calls ``factory.create(params)``; a
    factory returns ``None`` when the request's parameters leave it inactive.
    """


@hookspec
def request_started(event: "RequestStarted") -> None:
    """A request was admitted and its prompt is about to be processed. ``event`` has the request id, the number
    of prompt tokens and the wall-clock start time."""


@hookspec
def token_produced(event: "TokenProduced") -> None:
    """One token was sampled for a request. ``event`` has the request id, the token's index (0 for the first),
    its id, and the seconds since the previous token (or since the start, for the first: time to first token)."""


@hookspec
def request_finished(event: "RequestFinished") -> None:
    """A request ended. ``event`` has the request id, its outcome (``eos``, ``max_tokens``, ``stop_sequence``, or an
    error code such as ``CANCELLED``), token counts, time to first token and decode tokens per second."""
