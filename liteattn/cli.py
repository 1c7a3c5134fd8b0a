"""``liteattn`` command line: ``liteattn bench`` and ``liteattn demo``.

Each subcommand lives in its own module and exposes ``add_arguments(parser)``
and ``run(args)``; this file only wires them up.
"""
from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMANDS = {
    "demo": ("liteattn.demo", "generate a video dense and with liteattn; report speed and quality"),
    "eval": ("liteattn.evaluate", "score liteattn against dense on the testbed over many prompts and seeds"),
    "bench": ("liteattn.bench.run", "time liteattn against dense attention and FlexAttention"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="liteattn", description="Temporal sparse attention for video DiTs.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # one broken subcommand must not take the others down
            modules[name] = exc
            sub.add_parser(name, help=f"{help_text} (unavailable: {exc})")
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    module = modules[args.command]
    if isinstance(module, ImportError):
        print(f"liteattn {args.command}: cannot run: {module}", file=sys.stderr)
        return 1
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
