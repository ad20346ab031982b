"""Entry point of orcd-quant-formats: registers every block format this package implements."""

from typing import Callable

import orcd
from orcd.quant import QuantFormat


@orcd.hookimpl
def register_quant_formats(register: Callable[[QuantFormat], None]) -> None:
    from orcd_quant_formats import ALL_FORMATS

    for fmt in ALL_FORMATS:
        register(fmt())
