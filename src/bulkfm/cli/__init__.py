"""Command line: a thin layer over functions a notebook user calls the same way.

One module per command in this package, each with ``register(subparsers)``; this
package is the only place argparse lives. Registration stays cheap (no torch import);
a handler imports what it needs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from bulkfm.errors import BulkfmError

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
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except BulkfmError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
