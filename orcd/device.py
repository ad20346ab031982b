"""Devices and their memory: choosing a device, "does this model fit", what is in use, where the weights live,
and turning a CUDA out-of-memory into ``VramOOM``.

The policy (issue 6): on CUDA every weight, the KV cache and the activations live in GPU memory and nothing falls
back to the host. So before a load we compare the model's need with the device's free memory and refuse early
(``InsufficientVRAM``); during a job an allocation failure ends that job alone (``VramOOM``) after its partial
allocations are released; and a periodic residency check proves the weights are still where they were loaded.
"""

from __future__ import annotations

import gc
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from orcd.errors import CudaError, InsufficientVRAM, InvalidRequest, OrcdError, VramOOM
from orcd.quant import QuantizedTensor

T = TypeVar("T")

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def parse_device(spec: str | int | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a GPU index → a device that exists on this machine.

    ``None`` picks the first GPU when there is one, else the CPU. Raises ``InvalidRequest`` naming the device."""
    if spec is None:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(spec, torch.device):
        spec = str(spec)
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        spec = f"cuda:{int(spec)}"
    m = _DEVICE_RE.match(spec.strip().lower())
    if m is None:
        raise InvalidRequest(f"device {spec!r} is not one of cpu, cuda, cuda:N", field="device")
    if m.group(1) == "cpu":
        return torch.device("cpu")
    index = int(m.group(2) or 0)
    if not torch.cuda.is_available():
        raise InvalidRequest(f"device {spec!r}: CUDA is not available on this machine (use --device cpu)", field="device")
    count = torch.cuda.device_count()
    if index >= count:
        raise InvalidRequest(f"device {spec!r}: this machine has {count} GPU(s), numbered 0 to {count - 1}", field="device")
    return torch.device("cuda", index)


# torch's float32 matmul precisions (``torch.set_float32_matmul_precision``): the products of fp32 matmuls, torch's
# own (cuBLAS: a prompt's projections) and the fused quantized kernels' tl.dot (decode batches past a few streams)
MATMUL_PRECISIONS = ("highest", "high", "medium")
MATMUL_PRECISION_HELP = ("products of the fp32 matmuls on a GPU: highest (about fp32; the default), high (TF32), "
                         "medium (bf16 operands); torch's float32_matmul_precision")


def set_matmul_precision(name: str) -> None:
    """Set this process's fp32 matmul precision (one of ``MATMUL_PRECISIONS``) before a model's kernels compile or
    its decode graphs are captured: a captured graph keeps the kernels it was captured with."""
    if name not in MATMUL_PRECISIONS:
        raise InvalidRequest(f"matmul precision {name!r} is not one of {', '.join(MATMUL_PRECISIONS)}",
                             field="matmul_precision")
    torch.set_float32_matmul_precision(name)


# --- memory: what is free, what a model needs, what is in use ---------------------------------------------------


def free_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on ``device``: the driver's free count on CUDA plus what PyTorch's
    caching allocator holds unused; ``MemAvailable`` of the host for the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached_unused)
    return _host_available_bytes()


def total_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    return _host_meminfo().get("MemTotal", 0)


def _host_meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def _host_available_bytes() -> int:
    info = _host_meminfo()
    if "MemAvailable" in info:
        return info["MemAvailable"]
    try:  # not Linux: all of physical memory is the best we know
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass(frozen=True)
class MemoryNeed:
    """What serving a model takes on its device, in bytes."""

    weights: int  # tensors as stored in the file (kept quantized on the device)
    kv_cache: int  # K and V of one sequence at the serving context length
    workspace: int  # activations of a full-context prefill and the logits

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace


def kv_bytes_per_token(config: Any, bytes_per_element: int) -> int:
    """K and V bytes for one token position across all layers."""
    return 2 * config.block_count * config.head_count_kv * config.head_dim * bytes_per_element


def kv_element_bytes(device: torch.device) -> int:
    """FP16 cache on the GPU, FP32 on the CPU (where half precision is slow and gains nothing)."""
    return 2 if device.type == "cuda" else 4


def serving_context(config: Any, device: torch.device, kv_cache_mb: int | None) -> int:
    """The context length to serve: the model's, or fewer tokens when ``kv_cache_mb`` caps the cache."""
    n_ctx = int(config.context_length)
    if kv_cache_mb is not None:
        per_token = kv_bytes_per_token(config, kv_element_bytes(device))
        fit = (kv_cache_mb * 1024 * 1024) // per_token
        if fit < 1:
            raise InvalidRequest(
                f"--kv-cache-size-mb {kv_cache_mb} holds no token: one token needs {per_token} bytes of KV cache",
                field="kv_cache_size_mb",
            )
        n_ctx = min(n_ctx, int(fit))
    return n_ctx


# Kernels' scratch: a prompt's weight tile (a quant plugin's dequantize-then-GEMM path: up to 16 Mi values, 64 MiB
# in fp32) and split-K partial sums, with room to spare.
KERNEL_SCRATCH = 128 << 20


def estimate_need(model: Any, config: Any, device: torch.device, n_ctx: int) -> MemoryNeed:
    """Bytes the model will take on ``device`` when served at ``n_ctx`` tokens (``model`` is a ``ModelFile``).

    The workspace term bounds a prefill of ``n_ctx`` tokens: a few hidden-size and feed-forward activations per
    token in FP32, one layer's attention scores (``heads × n_ctx²`` when attention is not fused, capped at 1 GiB
    because the engine chunks long prefills) and the logits row; plus ``KERNEL_SCRATCH`` for kernels' scratch."""
    weights = sum(t.n_bytes for t in model.tensors.values())
    kv = n_ctx * kv_bytes_per_token(config, kv_element_bytes(device))
    activations = 4 * n_ctx * (4 * config.embedding_length + 2 * config.feed_forward_length)
    scores = min(4 * config.head_count * n_ctx * n_ctx, 1 << 30)
    logits = 4 * config.vocab_size * 2
    return MemoryNeed(weights=weights, kv_cache=kv, workspace=activations + scores + logits + KERNEL_SCRATCH)


def check_fits(need: MemoryNeed, device: torch.device, path: str | Path) -> int:
    """Raise ``InsufficientVRAM`` when ``need`` exceeds the free memory of ``device``; return the free bytes."""
    available = free_bytes(device)
    if need.total > available:
        what = "GPU memory" if device.type == "cuda" else "host memory"
        raise InsufficientVRAM(
            f"{path}: the model needs {need.total} bytes of {what} on {device} (weights {need.weights}, KV cache "
            f"{need.kv_cache}, workspace {need.workspace}) but only {available} bytes are available",
            required=need.total,
            available=available,
            device=str(device),
            path=str(path),
        )
    return available


def allocated_bytes(device: torch.device) -> int | None:
    """Bytes PyTorch has allocated on a CUDA device right now (``None`` for the CPU, where it is not tracked)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return None


def release_cached(device: torch.device) -> None:
    """Drop unreachable tensors and return the caching allocator's free blocks to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# --- where the weights live ----------------------------------------------------------------------------------------


def iter_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor a model holds: parameters, buffers, and plain tensor or ``QuantizedTensor`` attributes (the
    quantized weights are not parameters, so ``named_parameters`` alone would miss them). Shared tensors appear
    once."""
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        items: list[tuple[str, Any]] = list(mod.named_parameters(recurse=False))
        items += list(mod.named_buffers(recurse=False))
        items += [(k, v) for k, v in vars(mod).items() if not k.startswith("_")]
        for name, value in items:
            tensor = value.data if isinstance(value, QuantizedTensor) else value
            if not isinstance(tensor, torch.Tensor) or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            yield prefix + name, tensor


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds (what its weights occupy on their device)."""
    return sum(t.numel() * t.element_size() for _, t in iter_tensors(module))


@dataclass(frozen=True)
class Residency:
    """Where each of a model's tensors was when it was loaded: device and storage address."""

    device: torch.device
    places: dict[str, tuple[str, int]]  # name → (device, data_ptr)

    @classmethod
    def snapshot(cls, module: torch.nn.Module, device: torch.device) -> Residency:
        return cls(device, {name: (str(t.device), t.data_ptr()) for name, t in iter_tensors(module)})

    def check(self, module: torch.nn.Module) -> list[str]:
        """Problems found, empty when every tensor is still on the device and at the address it was loaded at."""
        now = {name: (str(t.device), t.data_ptr()) for name, t in iter_tensors(module)}
        problems = []
        for name, (dev, ptr) in self.places.items():
            if name not in now:
                problems.append(f"{name}: no longer held by the model")
            elif now[name][0] != dev:
                problems.append(f"{name}: moved from {dev} to {now[name][0]}")
            elif now[name][1] != ptr:
                problems.append(f"{name}: storage replaced on {dev}")
        for name, (dev, _) in now.items():
            if name not in self.places:
                problems.append(f"{name}: appeared on {dev} after loading")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            problems.append(f"{self.device}: CUDA is no longer available")
        return problems


# --- errors ----------------------------------------------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def to_orcd_error(exc: BaseException, device: torch.device, what: str = "the job") -> OrcdError:
    """The ``OrcdError`` a client is told for ``exc`` (raised while running ``what`` on ``device``)."""
    if isinstance(exc, OrcdError):
        return exc
    if is_oom(exc):
        return VramOOM(f"{what} ran out of memory on {device}: {_first_line(exc)}", device=str(device))
    if device.type == "cuda" and isinstance(exc, RuntimeError) and ("cuda" in str(exc).lower()):
        return CudaError(f"{what} failed with a CUDA error on {device}: {_first_line(exc)}", device=str(device))
    return OrcdError(f"{what} failed: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def guarded(fn: Callable[[], T], device: torch.device, what: str = "the job") -> T:
    """Call ``fn``; an out-of-memory (or other failure) inside it is raised as the matching ``OrcdError``, and on
    out-of-memory the memory it had allocated is returned first, so the next job starts from the post-load baseline.

    The mapping happens outside the ``except`` block on purpose: the original exception's traceback references the
    frames that hold the partial allocations, and they are only released once nothing references that exception."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - re-raised as the mapped error below
        err = to_orcd_error(exc, device, what)
        oom = is_oom(exc) or isinstance(err, VramOOM)
    if oom:
        err = err.with_traceback(None)  # drop the frames that hold the job's tensors
        err.__context__ = None
        release_cached(device)
    raise err


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**exp:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[exp]}"
