"""``python -m orcd.bench.kernels``: the table's arithmetic (anywhere) and a short run on CUDA (gpu-marked)."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict

import pytest

from conftest import make_plugin_manager
from orcd.bench import kernels


def test_table_arithmetic() -> None:
    rows = [
        kernels.Row("linear", "Q4_K", 896, 4864, 1, 2_000_000, 2e-6, 40e-6, "graph", 64),
        kernels.Row("linear", "Q8_0", 896, 896, 512, 1_000_000, 1e-4, None, "graph", 64),
        kernels.Row("moe", "MXFP4", 2880, 2880, 1, 4_000_000, 4e-6, None, "graph", 16, "4.0 experts/call"),
    ]
    sweep = [{"config": {"bn": 4}, "seconds": 3e-6, "default": True}, {"config": {"bn": 8}, "seconds": 2e-6},
             {"config": {"bn": 64}, "seconds": None, "error": "out of resources"}]
    report = {"device_name": "test", "dtype": "float16", "copy_gbps": 2000.0, "rows": [asdict(r) for r in rows],
              "sweeps": [{"type": "Q4_K", "n": 896, "k": 4864, "m": 1, "results": sweep}]}
    lines = kernels.format_table(report).splitlines()
    gemv, gemm, moe = lines[3].split(), lines[4].split(), lines[5].split()
    # fused us, GB/s (2 MB / 2 us), % of copy bandwidth, TFLOP/s (2 M N K / time)
    assert gemv[5:9] == ["2.0", "1000", "50%", f"{2 * 896 * 4864 / 2e-6 / 1e12:.1f}"]
    assert gemv[-1] == "20.0"  # x ref: 40 us / 2 us
    assert gemm[8] == f"{2 * 512 * 896 * 896 / 1e-4 / 1e12:.1f}" and gemm[9:13] == ["-", "-", "-", "-"]
    assert moe[8] == f"{2 * 4 * 2880 * 2880 / 4e-6 / 1e12:.1f}"  # one token through top-4 experts
    assert lines[6] == "sweep Q4_K 896x4864 M=1: default 3.0 us (rank 2 of 2); best:"
    assert lines[7].split()[0] == "2.0" and "failed {'bn': 64}: out of resources" in lines[9]


def test_tuning_table_from_sweeps(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--tuning-out`` keeps the fastest decode launch of each 1-row sweep (experts keyed apart; tl.dot launches
    are not candidates there); past ``FMA_MAX_ROWS`` rows the fastest launch of either kernel unless it is the
    rule's own; no entry for a prompt's rows (512); and writes what ``kernels/tuning.py`` reads back."""
    from orcd_quant_formats.kernels import tuning

    def cfg(bn: int, dot: bool = False, bm: int = 1) -> dict:
        return {"bm": bm, "bn": bn, "dot": dot, "nb": 64, "split": 0, "warps": 2, "stages": 2, "parts": 4}

    results = [{"config": cfg(8), "seconds": 3e-6, "default": True}, {"config": cfg(16), "seconds": 2e-6},
               {"config": cfg(64, dot=True), "seconds": 1e-6}, {"config": cfg(4), "seconds": None, "error": "x"}]
    report = {"device_name": "Test GPU 80GB", "sweeps": [
        {"type": "Q4_K", "n": 896, "k": 4864, "m": 1, "results": results},
        {"type": "MXFP4", "experts": True, "n": 2880, "k": 2880, "m": 1, "results": results[:1]},
        {"type": "Q8_0", "n": 896, "k": 896, "m": 512, "results": [{"config": cfg(64, True, 64), "seconds": 1e-5}]},
        # 8 rows: the fastest of either kernel, unless it is the rule's own tl.dot launch
        {"type": "Q4_K", "n": 896, "k": 4864, "m": 8, "results": [{"config": cfg(8, bm=8), "seconds": 2e-6},
                                                                  {"config": cfg(64, True, 16), "seconds": 3e-6}]},
        {"type": "Q6_K", "n": 896, "k": 4864, "m": 8, "results": [{"config": cfg(8, bm=8), "seconds": 4e-6},
                                                                  {"config": cfg(32, True, 16), "seconds": 3e-6},
                                                                  {"config": cfg(64, True, 16), "seconds": 5e-6,
                                                                   "default": True}]},
        {"type": "Q5_0", "n": 896, "k": 4864, "m": 8, "results": [{"config": cfg(8, bm=8), "seconds": 4e-6},
                                                                  {"config": cfg(64, True, 16), "seconds": 3e-6,
                                                                   "default": True}]},
        # 32 rows (32 streams): 8-row decode blocks beat tl.dot; 20 rows fall between the table's buckets
        {"type": "Q4_K", "n": 896, "k": 4864, "m": 32, "results": [{"config": cfg(8, bm=8), "seconds": 2e-6},
                                                                   {"config": cfg(64, True, 32), "seconds": 3e-6,
                                                                    "default": True}]},
        {"type": "Q4_K", "n": 896, "k": 4864, "m": 20, "results": [{"config": cfg(8, bm=8), "seconds": 2e-6}]},
        # the grid's copy of the rule's launch timed fastest: no entry
        {"type": "Q4_K", "n": 3072, "k": 3072, "m": 32, "results": [{"config": cfg(64, True, 32), "seconds": 3e-6,
                                                                     "default": True},
                                                                    {"config": cfg(64, True, 32), "seconds": 2e-6},
                                                                    {"config": cfg(8, bm=8), "seconds": 4e-6}]},
        # 32 tokens' experts (5 rows a block): the grouped decode launch beat the rule's tl.dot, so it is kept
        {"type": "MXFP4", "experts": True, "n": 5760, "k": 2880, "m": 5, "tokens": 32,
         "results": [{"config": cfg(64, True, 16), "seconds": 3e-6, "default": True},
                     {"config": cfg(8, bm=5), "seconds": 2e-6}]},
    ]}
    best = kernels.tuning_configs(report)
    assert best == {"Q4_K:1:896x4864": cfg(16), "MXFP4:1:2880x2880:experts": cfg(8), "Q4_K:8:896x4864": cfg(8, bm=8),
                    "Q6_K:8:896x4864": cfg(32, True, 16), "Q4_K:32:896x4864": cfg(8, bm=8),
                    "MXFP4:5:5760x2880:experts": cfg(8, bm=5)}
    assert "sweep MXFP4 experts (32 tokens) 5760x2880 M=5: default 3.0 us (rank 2 of 2); best:" in (
        kernels.format_table({**report, "copy_gbps": 1.0, "dtype": "float32", "rows": []}).splitlines())
    path = tmp_path / "t.json"
    tuning.write(path, report["device_name"], best)
    monkeypatch.setenv(tuning.ENV, str(path))
    tuning.table.cache_clear()
    try:
        assert tuning.table("any") == best
    finally:
        monkeypatch.delenv(tuning.ENV)
        tuning.table.cache_clear()
    assert tuning.device_file("NVIDIA H100 80GB HBM3").name == "NVIDIA_H100_80GB_HBM3.json"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_experts_are_swept_at_each_planned_row_count() -> None:
    """``--m 1,8,32,512`` sweeps GPT-OSS's experts at 1 token (a pair a block; 8 tokens plan the same) and at 32
    (128 pairs, planned at 5 rows a block, where the rule takes tl.dot); 512 tokens' rows exceed the decode kernel."""
    assert kernels.expert_sweep_tokens([1, 8, 32, 512], 32) == {1: 1, 5: 32}
    assert kernels.expert_sweep_tokens([8], 32) == {1: 8}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_code_dot_sweep_launches_are_entries_the_tuning_lookup_takes() -> None:
    """Every code-dot launch the 32-stream sweeps time (``codes_grid(32)``; ``expert_codes_grid`` at the 5 rows a
    block that 32 GPT-OSS streams' 128 pairs plan) is, for every format with a code dot, an entry the tuning lookup
    accepts for that key, so a winner written by ``--tuning-out`` is used rather than dropped with a warning; a
    format without one is refused."""
    from gguf import GGMLQuantizationType as T

    from orcd_quant_formats.kernels import codes_dot, matmul

    for t in codes_dot.TYPES:
        spec, K = matmul.SPECS[t], 2880 if matmul.SPECS[t].block_size == 32 else 3072
        for cfg, rows in [(c, 32) for c in kernels.codes_grid(32)] + [(c, 5) for c in kernels.expert_codes_grid()]:
            matmul._entry_fits(cfg, rows)
            matmul._checked(spec, cfg, K)
            assert matmul.fit_shared_memory(cfg, spec, 4, 232448) == cfg  # the code dot keeps a few KiB
    with pytest.raises(ValueError, match="code dot"):
        matmul._checked(matmul.SPECS[int(T.Q5_K)], kernels.codes_grid(32)[0], 256)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_short_run_on_cuda() -> None:
    report = kernels.run(types=["Q4_0", "Q4_K"], shapes=[(300, 512), (300, 896)], ms=[1, 33], repeat=3,
                         plugins=make_plugin_manager("quant_formats"))
    rows = report["rows"]
    # Q4_K skips the 896-long rows (not whole super-blocks); MoE rows for 1 and 512 tokens.
    assert [(r["kind"], r["type"], r["k"], r["m"]) for r in rows] == [
        ("linear", "Q4_0", 512, 1), ("linear", "Q4_0", 512, 33), ("linear", "Q4_0", 896, 1),
        ("linear", "Q4_0", 896, 33), ("linear", "Q4_K", 512, 1), ("linear", "Q4_K", 512, 33),
        ("moe", "MXFP4", 2880, 1), ("moe", "MXFP4", 2880, 512)]
    assert all(r["fused_s"] and r["fused_s"] > 0 and r["reference_s"] > 0 for r in rows)
    assert report["copy_gbps"] > 100
    print(kernels.format_table(report))


def test_model_projections_are_what_the_decode_step_launches(synth_model, plugins) -> None:
    """``--model``: the quantized linears as the architecture builds them on the device (stacked QKV and gate|up on
    CUDA, separate on the CPU), once per distinct shape, and the expert tensors of a mixture of experts; F32
    tensors (no fused kernel) left out."""
    import torch

    from orcd.loader import load_model
    from orcd.quant import QuantizedLinear

    path = synth_model("qwen2", "Q8_0")
    linears, experts = kernels.model_projections(str(path), torch.device("cpu"), plugins)
    built = load_model(path, plugins=plugins).module
    expected = {(m.weight.fmt.name, *m.weight.shape) for m in built.modules() if isinstance(m, QuantizedLinear)
                and m.weight.fmt.name != "F32"}
    assert set(linears) == expected and len(linears) == len(expected) and experts == []

    linears, experts = kernels.model_projections(str(synth_model("gpt-oss", "MXFP4")), torch.device("cpu"), plugins)
    assert {name for name, _ in experts} == {"MXFP4"} and len(experts) >= 1
    assert all(len(shape) == 3 for _, shape in experts)
