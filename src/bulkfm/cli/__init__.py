"""Command line: a thin layer over functions a notebook user calls the same way.

One module per command in this package, each with ``register(subparsers)``; this
package is the only place argparse lives. Registration stays cheap (no torch import);
a handler imports what it needs. Console output (log levels, warnings as one line, each
message once per run) is set up per call by :func:`bulkfm.logs.console`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from bulkfm.errors import BulkfmError
from bulkfm.logs import console

# Modules that add sub-commands, in the order ``bulkfm --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "bulkfm.cli.data",
    "bulkfm.cli.pretrain",
    "bulkfm.cli.embed",
    "bulkfm.cli.impute",
    "bulkfm.cli.bench",
    "bulkfm.cli.evaluate",
    "bulkfm.cli.run",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bulkfm", description="Foundation models for bulk RNA-seq."
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show bulkfm's debug messages (other libraries stay at warnings)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (1: a bulkfm error, whose message is printed;
    130: interrupted). Console settings (:func:`bulkfm.logs.console`) last for the call."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    with console(verbose=args.verbose):
        try:
            return int(handler(args) or 0)
        except BulkfmError as exc:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
