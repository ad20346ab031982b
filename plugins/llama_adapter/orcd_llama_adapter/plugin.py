"""Entry point of orcd-llama-adapter: registers the qwen2 and phi3 architectures."""

from typing import Callable

import orcd
from orcd.arch import Architecture


@orcd.hookimpl
def register_architectures(register: Callable[[Architecture], None]) -> None:
    from orcd_llama_adapter.phi3 import Phi3
    from orcd_llama_adapter.qwen2 import Qwen2

    register(Qwen2())
    register(Phi3())
