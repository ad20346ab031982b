"""``orcd bench attention``'s pieces that need no GPU: the bytes a step reads, the shape argument, the launch grid
and the table (the timing itself runs on CUDA only)."""

from __future__ import annotations

import pytest

from orcd.bench.attention import AttentionRow, AttentionShape, format_table, launch_grid, parse_shape, read_bytes


def test_read_bytes_counts_fp16_keys_and_values_within_the_window() -> None:
    phi3 = AttentionShape(32, 32, 96)
    assert read_bytes(phi3, 32, 528) == 2 * 2 * 32 * 528 * 32 * 96  # 207,618,048 B a layer
    windowed = AttentionShape(64, 8, 64, window=128)
    assert read_bytes(windowed, 4, 528) == 2 * 2 * 4 * 128 * 8 * 64
    assert read_bytes(windowed, 4, 100) == 2 * 2 * 4 * 100 * 8 * 64


def test_shape_argument() -> None:
    assert parse_shape("64:8:64:128") == AttentionShape(64, 8, 64, window=128)
    assert parse_shape("14:2:64") == AttentionShape(14, 2, 64)
    with pytest.raises(SystemExit, match="H_Q a multiple of H_KV"):
        parse_shape("14:3:64")


def test_grid_times_early_values_only_where_the_register_path_runs() -> None:
    register_path = launch_grid(AttentionShape(32, 32, 96))  # one query head a K/V head: products in registers
    dot_path = launch_grid(AttentionShape(64, 8, 64))  # eight: fp16 tensor-core dots
    assert {g["early_values"] for g in register_path} == {False, True}
    assert {g["early_values"] for g in dot_path} == {False}
    assert len(register_path) == 2 * len(dot_path)


def test_table_gives_the_default_and_the_fastest_launch_per_batch() -> None:
    rows = [AttentionRow(32, 528, {}, 150.0, 1384.1, True),
            AttentionRow(32, 528, {"block_n": 64, "warps": 8}, 100.0, 2076.2, False),
            AttentionRow(32, 528, {"block_n": 16, "warps": 2}, 180.0, 1153.4, False),
            AttentionRow(32, 528, {"block_n": 32, "warps": 2}, None, None, False, "out of resources")]
    text = format_table(AttentionShape(32, 32, 96), rows, 2900.0)
    assert "copy bandwidth 2900 GB/s" in text
    assert "150.0" in text and "default" in text
    assert "100.0" in text and "best: block_n=64, warps=8" in text
    assert "180.0" not in text and "out of resources" not in text
