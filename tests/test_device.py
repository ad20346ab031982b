"""orcd.device: choosing a device, the memory a model needs against what is free, where the weights live, and
out-of-memory errors becoming VRAM_OOM with the job's memory released. CPU tests run everywhere; the ``gpu`` ones
allocate real CUDA memory (run on the GPU machine)."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch

from orcd import device as devmem
from orcd.description import open_checked
from orcd.errors import InsufficientVRAM, InvalidRequest, OrcdError, VramOOM
from orcd.loader import load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(synth_model) -> Path:
    return synth_model("qwen2", "Q8_0")


def test_parse_device() -> None:
    assert devmem.parse_device("cpu") == CPU
    assert devmem.parse_device(" CPU ") == CPU
    for bad in ("tpu", "cuda:x", "gpu0", "cuda:-1"):
        with pytest.raises(InvalidRequest) as e:
            devmem.parse_device(bad)
        assert e.value.field == "device" and bad.strip() in e.value.message
    if not torch.cuda.is_available():
        assert devmem.parse_device(None) == CPU
        for spec in ("cuda", "cuda:0", 0, "0"):
            with pytest.raises(InvalidRequest, match="CUDA is not available"):
                devmem.parse_device(spec)


def test_serving_context_caps_the_kv_cache(tiny: Path, plugins) -> None:
    _, config = open_checked(tiny, plugins)
    per_token = devmem.kv_bytes_per_token(config, 4)  # FP32 on the CPU
    assert per_token == 2 * config.block_count * config.head_count_kv * config.head_dim * 4
    assert devmem.serving_context(config, CPU, None) == config.context_length
    assert devmem.serving_context(config, CPU, 1) == min(config.context_length, (1 << 20) // per_token)
    assert devmem.serving_context(config, CPU, 10**6) == config.context_length  # never above the model's


def test_memory_need_matches_what_loading_allocates(tiny: Path, plugins) -> None:
    """The estimate's weights are the file's tensor bytes, and its KV cache is exactly what the engine
    allocates for the same context; the loaded model holds at least the weights (plus small derived buffers)."""
    from orcd.engine import Engine

    model, config = open_checked(tiny, plugins)
    n_ctx = devmem.serving_context(config, CPU, 1)
    need = devmem.estimate_need(model, config, CPU, n_ctx)
    assert need.weights == sum(t.n_bytes for t in model.tensors.values())
    loaded = load_model(tiny, plugins=plugins)
    engine = Engine(loaded, plugins, max_batch=1, n_ctx=n_ctx)
    assert engine.cache.nbytes == need.kv_cache
    held = devmem.module_bytes(loaded.module)
    assert held >= need.weights
    assert need.total == need.weights + need.kv_cache + need.workspace and need.workspace > 0


def test_check_fits_names_everything(tiny: Path) -> None:
    need = devmem.MemoryNeed(weights=10**15, kv_cache=10**12, workspace=1)
    with pytest.raises(InsufficientVRAM) as e:
        devmem.check_fits(need, CPU, tiny)
    message = e.value.message
    assert str(need.total) in message and str(tiny) in message and "cpu" in message
    available = e.value.context["available"]
    assert isinstance(available, int) and 0 < available < need.total and str(available) in message
    assert e.value.code == "INSUFFICIENT_VRAM"
    assert devmem.check_fits(devmem.MemoryNeed(1, 1, 1), CPU, tiny) > 0


def test_residency_detects_moved_and_replaced_weights(tiny: Path, plugins) -> None:
    from orcd.quant import QuantizedTensor

    loaded = load_model(tiny, plugins=plugins)
    snap = devmem.Residency.snapshot(loaded.module, CPU)
    names = set(snap.places)
    quantized = [(m, k, v) for m in loaded.module.modules() for k, v in vars(m).items()
                 if isinstance(v, QuantizedTensor)]
    assert quantized, "the quantized weights (not parameters) must be covered"
    assert len(names) >= len(quantized)
    assert snap.check(loaded.module) == []

    _, _, qt = quantized[0]
    original = qt.data
    qt.data = original.clone()  # same device, new storage
    problems = snap.check(loaded.module)
    assert len(problems) == 1 and "storage replaced on cpu" in problems[0]
    qt.data = original.to("meta")  # gone from the device
    assert "moved from cpu to meta" in snap.check(loaded.module)[0]
    qt.data = original
    assert snap.check(loaded.module) == []


def test_guarded_maps_oom_and_releases_the_job_memory() -> None:
    held: list[weakref.ref] = []

    def job() -> None:
        partial = torch.empty(1 << 20)  # what the job had allocated before it ran out
        held.append(weakref.ref(partial))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(VramOOM) as e:
        devmem.guarded(job, CPU, "job 'j1'")
    assert held[0]() is None  # nothing keeps the failed job's tensors alive (not even the exception)
    assert e.value.retriable and e.value.code == "VRAM_OOM"
    assert "job 'j1' ran out of memory on cpu" in e.value.message and "Tried to allocate" in e.value.message


def test_guarded_other_errors() -> None:
    def boom() -> None:
        raise ValueError("bad shape")

    with pytest.raises(OrcdError) as e:
        devmem.guarded(boom, CPU, "the decode step")
    assert e.value.code == "INTERNAL" and "the decode step failed: ValueError: bad shape" == e.value.message

    own = InvalidRequest("no", field="x")

    def raises_own() -> None:
        raise own

    with pytest.raises(InvalidRequest) as e2:
        devmem.guarded(raises_own, CPU)
    assert e2.value is own
    assert devmem.guarded(lambda: 7, CPU) == 7


def test_iter_tensors_counts_shared_storage_once() -> None:
    lin = torch.nn.Linear(4, 4)
    outer = torch.nn.Sequential(lin, lin)
    names = [n for n, _ in devmem.iter_tensors(outer)]
    assert len(names) == 2 and devmem.module_bytes(outer) == (16 + 4) * 4


# --- GPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_real_cuda_oom_becomes_vram_oom_and_memory_returns() -> None:
    dev = torch.device("cuda", 0)
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(dev)
    free, total = torch.cuda.mem_get_info(dev)

    def job() -> None:
        first = torch.empty(free // 2, dtype=torch.uint8, device=dev)  # fits
        second = torch.empty(total, dtype=torch.uint8, device=dev)  # cannot: more than the whole GPU
        del first, second

    with pytest.raises(VramOOM) as e:
        devmem.guarded(job, dev, "job 'big'")
    assert "out of memory" in e.value.message.lower()
    assert torch.cuda.memory_allocated(dev) == baseline
    # the device is usable afterwards
    assert float(torch.ones(4, device=dev).sum()) == 4.0


@pytest.mark.gpu
def test_check_fits_on_gpu(tiny: Path) -> None:
    dev = torch.device("cuda", 0)
    free = devmem.free_bytes(dev)
    total = devmem.total_bytes(dev)
    assert 0 < free <= total
    with pytest.raises(InsufficientVRAM) as e:
        devmem.check_fits(devmem.MemoryNeed(total + 1, 0, 0), dev, tiny)
    assert "cuda:0" in e.value.message and str(total + 1) in e.value.message
    assert devmem.check_fits(devmem.MemoryNeed(1 << 20, 0, 0), dev, tiny) > 0


@pytest.mark.gpu
def test_residency_on_gpu(tiny: Path, plugins) -> None:
    from orcd.quant import QuantizedTensor

    dev = torch.device("cuda", 0)
    loaded = load_model(tiny, device=dev, plugins=plugins)
    snap = devmem.Residency.snapshot(loaded.module, dev)
    assert snap.check(loaded.module) == []
    assert all(place[0] == "cuda:0" for place in snap.places.values())
    qt = next(v for m in loaded.module.modules() for v in vars(m).values() if isinstance(v, QuantizedTensor))
    qt.data = qt.data.cpu()  # evicted to host memory
    problems = snap.check(loaded.module)
    assert len(problems) == 1 and "moved from cuda:0 to cpu" in problems[0]
