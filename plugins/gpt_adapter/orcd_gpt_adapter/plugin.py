"""Entry point of orcd-gpt-adapter: registers the gpt-oss architecture."""

from typing import Callable

import orcd
from orcd.arch import Architecture


@orcd.hookimpl
def register_architectures(register: Callable[[Architecture], None]) -> None:
    from orcd_gpt_adapter.gpt_oss import GptOss  # imported lazily: `orcd plugins` stays fast

    register(GptOss())
