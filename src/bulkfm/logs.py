"""Console output: bulkfm's log lines, warnings as one plain line, each message said once.

A foundation module (standard library only), so every stage can use :func:`log_once`.

- :func:`log_once` logs a message the first time it is said in a run and drops the
  repeats. A loop over tasks, splits or models that checks the same input each time
  (e.g. "ignoring 55232 genes outside the vocabulary") would otherwise print the same line
  once per iteration; the reader needs it once.
- :func:`console` is what the command line wraps each invocation in: bulkfm's loggers at
  INFO (``-v``: DEBUG) on stderr, every other library's at WARNING (``-v`` must not turn
  on h5py's or numcodecs' DEBUG chatter), warnings printed as ``warning: <message>``
  without the source path and line that Python adds for developers, and a fresh
  :func:`log_once` memory. Everything is put back on exit, so Python API users (and
  tests calling ``bulkfm.cli.main``) keep their own logging and warning settings.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

from bulkfm.errors import BulkfmWarning

__all__ = [
    "FORMAT",
    "LOGGER",
    "console",
    "format_warning",
    "log_once",
    "new_run",
]

#: The logger every bulkfm module's ``logging.getLogger(__name__)`` descends from.
LOGGER = "bulkfm"
#: The console line of a log record.
FORMAT = "%(levelname)s %(name)s: %(message)s"

_said: set[tuple[str, int, str]] = set()
_lock = threading.Lock()


def log_once(logger: logging.Logger, level: int, msg: str, *args: Any) -> bool:
    """Log ``msg % args`` at ``level`` unless the same logger said the same text at the
    same level earlier in this run; returns whether it was logged.

    The memory lasts until :func:`new_run` (the CLI starts one per command; a notebook
    user calls it, or uses :func:`console`, to hear the messages again).
    """
    if not logger.isEnabledFor(level):
        return False  # not said, so not remembered: a later, more verbose run says it
    text = msg % args if args else msg
    key = (logger.name, level, text)
    with _lock:
        if key in _said:
            return False
        _said.add(key)
    logger.log(level, "%s", text, stacklevel=2)
    return True


def new_run() -> None:
    """Forget what :func:`log_once` has said: the next run says it again."""
    with _lock:
        _said.clear()


def format_warning(message: Warning | str, category: type[Warning]) -> str:
    """``warning: <message>``; categories other than bulkfm's own are named, since the
    reader cannot tell otherwise which library speaks (``warning: ConvergenceWarning: ...``)."""
    text = str(message)
    if not issubclass(category, BulkfmWarning):
        text = f"{category.__name__}: {text}"
    return f"warning: {text}"


class _StderrHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of the
    record (a test's capture, a redirected stream), not the one at creation."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it
        pass


@contextlib.contextmanager
def console(verbose: bool = False) -> Iterator[logging.Handler]:
    """Console settings of one command-line invocation (see the module docstring).

    Yields the handler it installed on the root logger. On exit the root and ``bulkfm``
    loggers, ``warnings.showwarning`` and the warning filters are as they were.
    """
    root = logging.getLogger()
    ours = logging.getLogger(LOGGER)
    saved = (root.level, ours.level, ours.propagate)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # other libraries: warnings and errors only
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = True
    new_run()

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        stream = file if file is not None else sys.stderr
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to tell
            stream.write(format_warning(message, category) + "\n")

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.showwarning = show
        try:
            yield handler
        finally:
            root.removeHandler(handler)
            root.setLevel(saved[0])
            ours.setLevel(saved[1])
            ours.propagate = saved[2]
