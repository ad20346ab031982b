"""Measured launch configurations of the decode kernel, per GPU model, beside ``pick_config``'s rule.

A decode step's projections are small and few in shape (a model has five or six), and which launch is fastest for
one of them depends on the chip more than a rule can say: the best of ``orcd bench kernels --sweep`` is kept in a
JSON file per GPU model (``tuned/<device name>.json``, written by ``--tuning-out``; vLLM keeps its fused-MoE
configurations the same way). ``ORCD_KERNEL_TUNING=FILE`` points at another file (``none``: use the rule only).

A file is ``{"device": name, "configs": {key: Config fields}}`` with ``key`` = ``"<type>:<rows>:<N>x<K>"``, and
``":experts"`` appended for a mixture-of-experts projection (``rows`` x rows per expert). Past ``DECODE_MAX_ROWS``,
``rows`` is a bucket (``table_rows``: 16, 32, 64; a decode batch of that many streams or fewer), and the entry may be
a tl.dot launch or a decode launch of up to ``DECODE_MAX_ROWS`` rows per block, run over as many blocks as x has.
Batches past ``TABLE_MAX_ROWS`` (prefill) always take the rule. A shape that is not in the file, or an entry that is
not a valid launch for its rows, takes the rule.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import gguf

ENV = "ORCD_KERNEL_TUNING"
TUNED_DIR = Path(__file__).parent / "tuned"
FIELDS = ("bm", "bn", "dot", "nb", "split", "warps", "stages", "parts", "codes")
# Up to FMA_MAX_ROWS rows of x per weight block the rule (``matmul.pick_config``) takes the decode kernel, past it
# tl.dot. The decode kernel itself takes up to DECODE_MAX_ROWS: between the two, only an entry here sends a shape to
# it (``orcd bench kernels --sweep --m 8`` times both kernels; not yet run on a GPU).
FMA_MAX_ROWS = 4
DECODE_MAX_ROWS = 8
TABLE_MAX_ROWS = 64  # batches of more rows (a prompt) are not looked up: their row counts are too many to time


def table_rows(rows: int) -> int | None:
    """The rows a table entry for ``rows`` rows of x is keyed by: itself up to ``DECODE_MAX_ROWS``, then the next
    power of two up to ``TABLE_MAX_ROWS`` (what a sweep at that many rows measured); None past it."""
    if rows <= DECODE_MAX_ROWS:
        return rows
    if rows > TABLE_MAX_ROWS:
        return None
    return 1 << (rows - 1).bit_length()


def key(ggml_type: int, rows: int, N: int, K: int, experts: bool = False) -> str:
    return f"{gguf.GGMLQuantizationType(ggml_type).name}:{rows}:{N}x{K}" + (":experts" if experts else "")


def device_file(device_name: str) -> Path:
    """Where the packaged table of ``device_name`` (``torch.cuda.get_device_name``) lives."""
    return TUNED_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


@functools.cache
def table(device_name: str) -> dict[str, dict[str, Any]]:
    """Entries for ``device_name``: from ``$ORCD_KERNEL_TUNING``, else the packaged file, else none. A file that
    cannot be read is an error naming it (a typo in the variable should not silently fall back)."""
    override = os.environ.get(ENV)
    if override and override.lower() == "none":
        return {}
    path = Path(override) if override else device_file(device_name)
    if not override and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        configs = data["configs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"kernel tuning file {path}: {e}") from None
    return {k: {f: v[f] for f in FIELDS if f in v} for k, v in configs.items() if isinstance(v, dict)}


def write(path: str | os.PathLike, device_name: str, configs: dict[str, dict[str, Any]]) -> None:
    Path(path).write_text(json.dumps({"device": device_name, "configs": dict(sorted(configs.items()))}, indent=1)
                          + "\n")
