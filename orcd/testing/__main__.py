"""``python -m orcd.testing`` is ``orcd synth``."""

from orcd.cli import main

raise SystemExit(main(["synth", *__import__("sys").argv[1:]]))
