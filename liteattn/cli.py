"""``liteattn`` command line: ``liteattn demo``, ``liteattn eval`` and ``liteattn bench``.

Each subcommand lives in its own module and exposes ``add_arguments(parser)``
and ``run(args)``; this file only wires them up.

Errors a user can act on. A bad value is reported as one line on stderr,
``liteattn <command>: <option>: <what was expected>, got <value>``, with exit
code 2 and no traceback, and before any work starts:

- argparse's own usage errors (unknown options, values its ``type=`` rejects) are
  one line too (:class:`_OneLineParser`), not argparse's usage block;
- a subcommand module may define ``check_args(args)``, called after parsing
  and before ``run(args)``, which raises ``ValueError`` with the message
  starting with the option, e.g. ``ValueError("--steps: expected at least 1,
  got 0")``; checks that need more than one option, the file system (an
  ``--out`` under a regular file) or an import belong there, so a mistake
  fails in a second, not after minutes of work;
- a ``ValueError`` that ``run(args)`` raises later (liteattn's public API
  raises them for bad input, naming the argument) is reported the same way.

Other exceptions are bugs and keep their traceback; ``run`` returns its own
exit codes for outcomes (e.g. ``liteattn bench`` without a GPU returns 1).
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys

_SUBCOMMANDS = {
    "demo": ("liteattn.demo", "generate a video dense and with liteattn; report speed and quality"),
    "eval": ("liteattn.evaluate", "score liteattn against dense on the testbed over many prompts and seeds"),
    "bench": ("liteattn.bench.run", "time liteattn against dense attention and FlexAttention"),
    "calibrate": ("liteattn.calibration.cli", "choose per-layer thresholds on the testbed that meet a quality budget"),
}

USAGE_ERROR = 2  # argparse's exit code for a bad command line; bad values caught later use it too


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with its usage errors in the command line's convention: ``liteattn <command>: <option>: <what>``
    on one line, exit code 2. argparse prints its usage block first, which buries the one line that matters; the
    options are one ``--help`` away. Subcommand parsers are made of the same class."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): \1: ", r"\1: ", message)  # a type function that named the option too
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        message = re.sub(r"\s*\n\s*", " ", message.strip())  # one line; the user's own values keep their spaces
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="liteattn", description="Temporal sparse attention for video DiTs.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules, parsers = {}, {}
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # one broken subcommand must not take the others down
            modules[name] = exc
            parsers[name] = sub.add_parser(name, help=f"{help_text} (unavailable: {exc})")
            continue
        modules[name] = module
        parsers[name] = sub.add_parser(name, help=help_text, description=module.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parsers[name])
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # left over after the subcommand's options: its error, not the top-level parser's
            parsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse printed its usage error (exit 2) or the help (exit 0)
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else USAGE_ERROR
    module = modules[args.command]
    if isinstance(module, ImportError):
        print(f"liteattn {args.command}: cannot run: {module}", file=sys.stderr)
        return 1
    try:
        check = getattr(module, "check_args", None)
        if check is not None:
            check(args)
        return int(module.run(args) or 0)
    except ValueError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message holds
        print(f"liteattn {args.command}: {message}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
