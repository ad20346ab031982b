"""``orcd plugins``: what is loaded, from which distribution, and what each plugin registered."""

from __future__ import annotations

import argparse
import json

from orcd.plugins import get_plugin_manager


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list loaded plugins and what they registered")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    pm = get_plugin_manager()
    infos = list(pm.info.values())
    if args.json:
        print(json.dumps([vars(i) for i in infos], indent=2))
        return 0
    for info in infos:
        origin = f"{info.distribution} {info.version}" if info.distribution else "built-in"
        print(f"{info.name} ({origin})")
        for label, items in (("architectures", info.architectures), ("quant formats", info.quant_formats),
                             ("samplers", info.samplers)):
            if items:
                print(f"  {label}: {', '.join(items)}")
        other = [h for h in info.hooks if not h.startswith("register_")]
        if other:
            print(f"  hooks: {', '.join(other)}")
    return 0
