"""orcd: a GGUF inference worker. The core knows no architecture and no block format by name; plugins add them."""

from orcd.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
