"""Subcommands of the ``orcd`` CLI, one module each (``add_parser(subparsers)`` sets ``run``)."""
