"""``orcd bench model`` and ``orcd bench profile`` run end to end on a small synthetic file (CPU here, the same code
on CUDA): the table has orcd's rows, the stream runs, and llama.cpp's row from the same run; the profile splits a
decode step into operators. The figures themselves are measurements, not asserted beyond being positive."""

from __future__ import annotations

import argparse
import re

import pytest

from orcd.bench import model as bench_model
from orcd.bench import profile as bench_profile

from conftest import require_reference


def bench_args(path, peer: str, streams: str = "1") -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench_model.add_arguments(p)
    return p.parse_args(["--model", str(path), "--device", "cpu", "--prompt-tokens", "24", "--decode-tokens", "6",
                         "--repeat", "1", "--streams", streams, "--peer", peer])


def decode_rates(table: str) -> dict[str, float]:
    rows = {}
    for line in table.splitlines():
        m = re.match(r"(orcd x\d+|orcd|llama\.cpp|transformers)\s+\S+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            rows[m.group(1)] = float(m.group(5))
    return rows


def test_bench_model_table_with_streams(synth_model, capsys) -> None:
    path = synth_model("qwen2", "Q8_0")
    assert bench_model.run_args(bench_args(path, "none", "1,3")) == 0
    table = capsys.readouterr().out
    rates = decode_rates(table)
    assert set(rates) == {"orcd", "orcd x3"} and all(r > 0 for r in rates.values()), table
    assert "orcd x3: aggregate decode" in table


def test_bench_model_beside_llama_cpp(synth_model, capsys) -> None:
    require_reference("llama_cpp")
    path = synth_model("qwen2", "Q4_K_M")
    assert bench_model.run_args(bench_args(path, "llama.cpp")) == 0
    table = capsys.readouterr().out
    rates = decode_rates(table)
    assert set(rates) == {"orcd", "llama.cpp"} and all(r > 0 for r in rates.values()), table
    assert re.search(r"orcd / llama\.cpp on cpu: decode [\d.]+x, prompt [\d.]+x", table)


def test_llama_cpp_memory_reads_the_gpu_that_torch_names(monkeypatch) -> None:
    """The peer reads free memory with ``nvidia-smi -i``: torch's ``cuda:N`` is the N-th of ``CUDA_VISIBLE_DEVICES``."""
    from orcd.bench.llama_cpp_peer import _free_bytes, _gpu_index

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert (_gpu_index("cuda"), _gpu_index("cuda:1")) == ("0", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, GPU-abc")
    assert (_gpu_index("cuda"), _gpu_index("cuda:1")) == ("3", "GPU-abc")
    assert _free_bytes("cpu") is None


def test_llama_cpp_row_off_cuda_has_no_memory_figure(synth_model) -> None:
    """On the CPU there is no device memory to read: llama.cpp's row says so (None) instead of a made-up figure."""
    require_reference("llama_cpp")
    got = bench_model.bench_llama_cpp(str(synth_model("qwen2", "Q4_K_M")), "cpu", 24, 6, 1, list(range(10, 34)))
    assert got.engine == "llama.cpp" and got.decode_tok_s > 0
    assert got.memory_bytes is None and got.peak_bytes is None


@pytest.mark.gpu
def test_llama_cpp_row_on_cuda_has_its_gpu_memory(synth_model) -> None:
    """On CUDA, llama.cpp's row carries the device memory its process took at load (weights, KV cache, compute
    buffers; the parent holds still meanwhile), and a peak no lower."""
    require_reference("llama_cpp")
    path = synth_model("qwen2", "Q4_K_M")
    got = bench_model.bench_llama_cpp(str(path), "cuda", 24, 6, 1, list(range(10, 34)))
    assert got.memory_bytes is not None and got.memory_bytes > 0, got  # the embedding may stay in host memory
    assert got.peak_bytes >= got.memory_bytes, got


def test_bench_profile_splits_a_decode_step(synth_model) -> None:
    path = synth_model("phi3", "Q4_K_M")
    prof = bench_profile.profile_decode(str(path), "cpu", prompt_tokens=20, steps=3, streams=2, graphs=False,
                                        warmup_steps=2)
    assert prof.steps == 3 and prof.streams == 2 and prof.wall_us > 0
    assert prof.device_us == 0 and not prof.kernels  # no device on the CPU: the step is all host time
    names = {op.name for op in prof.host_ops}
    assert "aten::mm" in names or "aten::matmul" in names or "aten::linear" in names, names
    text = bench_profile.format_profile(prof, str(path))
    assert "decode steps of 2 stream(s)" in text and "host operator" in text


def test_bytes_per_token_counts_what_a_token_reads(synth_model) -> None:
    """Everything in the file and the KV cache, less the experts a token does not choose and, where the output head
    has its own tensor, all of the embedding but the token's row."""
    from orcd.description import open_checked
    from orcd.plugins import get_plugin_manager

    untied = synth_model("gpt-oss", "MXFP4")
    model, config = open_checked(untied, get_plugin_manager())
    tensors = model.tensors
    embedding = tensors["token_embd.weight"]
    unchosen = sum(t.n_bytes for t in tensors.values() if "_exps" in t.name) * \
        (config.expert_count - config.expert_used_count) // config.expert_count
    whole = sum(t.n_bytes for t in tensors.values()) + config.kv_cache_bytes(64)
    assert bench_model.bytes_per_token(str(untied), 64) == \
        whole - unchosen - embedding.n_bytes + embedding.n_bytes // embedding.shape[0]

    tied = synth_model("qwen2", "Q4_K_M")  # the tiny Qwen2 ties its head to the embedding: the head reads it all
    tied_model, tied_config = open_checked(tied, get_plugin_manager())
    assert "output.weight" not in tied_model.tensors
    assert bench_model.bytes_per_token(str(tied), 64) == \
        sum(t.n_bytes for t in tied_model.tensors.values()) + tied_config.kv_cache_bytes(64)


def test_bench_profile_of_a_prompt_pass(synth_model) -> None:
    path = synth_model("qwen2", "Q8_0")
    prof = bench_profile.profile_prefill(str(path), "cpu", prompt_tokens=20, graphs=False)
    assert prof.prompt_tokens == 20 and prof.steps >= 1 and prof.wall_us > 0
    names = {op.name for op in prof.host_ops}
    assert "aten::mm" in names or "aten::matmul" in names or "aten::linear" in names, names
    assert "a 20-token prompt pass in" in bench_profile.format_profile(prof, str(path))


def test_expert_share_of_a_step() -> None:
    """One token reads exactly its experts' share; more tokens read more of the experts, never more than all."""
    assert bench_model.expert_share(32, 4, 1) == 4 / 32
    assert bench_model.expert_share(32, 4, 2) == pytest.approx(1 - (28 / 32) ** 2)
    shares = [bench_model.expert_share(32, 4, n) for n in (1, 8, 32, 256)]
    assert shares == sorted(shares) and shares[-1] < 1.0
    assert bench_model.expert_share(32, 4, 32) == pytest.approx(0.986, abs=1e-3)


def test_bytes_per_step_of_many_streams(synth_model) -> None:
    """N streams read the dense weights once, N embedding rows, the selected experts' expected share and N KV
    caches; a sliding-window layer's cache only within its window."""
    from orcd.description import open_checked
    from orcd.plugins import get_plugin_manager

    path = synth_model("gpt-oss", "MXFP4")
    model, config = open_checked(path, get_plugin_manager())
    tensors = model.tensors
    embedding = tensors["token_embd.weight"]
    experts = sum(t.n_bytes for t in tensors.values() if "_exps" in t.name)
    dense = sum(t.n_bytes for t in tensors.values() if "_exps" not in t.name) - embedding.n_bytes
    row = embedding.n_bytes // embedding.shape[0]
    share = bench_model.expert_share(config.expert_count, config.expert_used_count, 3)
    got = bench_model.bytes_per_step(str(path), 64, 3)
    # the expert tensors' shares are rounded one by one
    expected = dense + 3 * row + experts * share + 3 * config.kv_read_bytes(64)
    assert abs(got - expected) <= len([t for t in tensors.values() if "_exps" in t.name]), (got, expected)
    assert got > bench_model.bytes_per_step(str(path), 64, 1)

    window = config.sliding_window
    assert any(config.is_sliding(i) for i in range(config.block_count))
    assert config.kv_read_bytes(window) == config.kv_cache_bytes(window)  # the window holds the whole context
    full_layers = sum(not config.is_sliding(i) for i in range(config.block_count))
    per_layer_token = config.kv_cache_bytes(1) // config.block_count
    assert config.kv_read_bytes(window + 100) == config.kv_cache_bytes(window) + full_layers * 100 * per_layer_token


def test_table_gives_the_share_of_each_bandwidth_limit(synth_model) -> None:
    """With limits (measured on CUDA; here a copy bandwidth given), the table says the share of each that orcd's
    batch-1 and stream rows reached, from the figures in the rows."""
    path = str(synth_model("qwen2", "Q8_0"))
    rows = [bench_model.ModelResult("orcd", "cuda", 24, 6, 1.0, 0.01, 2400.0, 100.0, None, None),
            bench_model.ModelResult("orcd x4", "cuda", 24, 6, 1.0, 0.02, 4800.0, 300.0, None, None)]
    limits = bench_model.bandwidth_limits(path, 27, [1, 4], copy_gbps=1.0)
    assert limits[4].bytes_per_step > limits[1].bytes_per_step  # four KV caches
    table = bench_model.format_table(rows, path, limits)
    for engine, n, rate in (("batch 1", 1, 100.0), ("4 streams", 4, 300.0)):
        m = re.search(rf"bandwidth limit, {engine}: ([\d.]+) MiB read per step / 1 GB/s = (\d+) tok/s"
                      rf"(?: \(([\d.]+)x batch 1's\))?; "
                      rf"orcd reaches ([\d.]+)%", table)
        assert m, table
        assert float(m.group(2)) == pytest.approx(limits[n].tok_s, abs=0.5)
        assert float(m.group(4)) == pytest.approx(100 * rate / limits[n].tok_s, abs=0.05)
        if n > 1:
            assert float(m.group(3)) == pytest.approx(limits[n].tok_s / limits[1].tok_s, abs=0.05)
