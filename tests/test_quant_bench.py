"""The dequantize benchmark runs, as a function and as ``python -m orcd.bench.dequant`` (tables and ``--json``); the
numbers themselves are measured by hand (they depend on the machine), these tests check that they are produced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import make_plugin_manager
from orcd.bench import dequant


def test_run_reports_every_requested_type() -> None:
    report = dequant.run("cpu", sizes=[1 << 14], types=["Q4_K", "mxfp4", "F32"], repeat=1,
                         plugins=make_plugin_manager("quant_formats"))
    rows = {r["type"]: r for r in report["results"]}
    assert set(rows) == {"Q4_K", "MXFP4", "F32"}
    assert report["copy_gbps"] is None  # measured on CUDA only
    for name in ("Q4_K", "MXFP4"):
        assert rows[name]["values"] == 1 << 14
        assert rows[name]["gbps"] > 0 and rows[name]["gguf_gbps"] > 0
    assert rows["F32"]["gbps"] is None  # a view of the blocks: nothing to time
    table = dequant.format_table(report)
    assert "Q4_K" in table and "view" in table


def test_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="IQ4_NL"):
        dequant.run("cpu", sizes=[1 << 12], types=["IQ4_NL"], plugins=make_plugin_manager("quant_formats"))


def test_module_cli_json() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "orcd.bench.dequant", "--device", "cpu", "--sizes", "8K", "--types", "Q6_K,Q8_0",
         "--repeat", "1", "--json"],
        capture_output=True, text=True, check=True, timeout=120,
        env={**os.environ, "ORCD_PLUGINS": "quant_formats"},  # only the plugin under test, even from the CLI
    ).stdout
    (report,) = json.loads(out)
    assert [r["type"] for r in report["results"]] == ["Q8_0", "Q6_K"]
    assert all(r["values"] == 8192 and r["gbps"] > 0 for r in report["results"])


@pytest.mark.gpu
def test_run_on_cuda_measures_copy_bandwidth() -> None:
    report = dequant.run("cuda", sizes=[1 << 20], types=["Q4_K"], repeat=2,
                         plugins=make_plugin_manager("quant_formats"))
    assert report["copy_gbps"] > 100
    (row,) = report["results"]
    assert row["gbps"] > 0 and 0 < row["traffic_fraction"]
