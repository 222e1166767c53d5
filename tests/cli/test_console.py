"""What a command prints besides its results: ``-v``, warnings and interrupts.

``bulkfm -v`` must add bulkfm's debug lines only (not h5py's or numcodecs'), and a
warning must read ``warning: <message>``, not ``.../cli.py:42: BulkfmWarning: ...``.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import types
import warnings
from typing import Any

import pytest

import bulkfm.cli
from bulkfm.errors import BulkfmWarning
from bulkfm.logs import log_once


def _noisy(args: argparse.Namespace) -> int:
    if args.interrupt:
        raise KeyboardInterrupt
    logging.getLogger("bulkfm.noisy").debug("bulkfm detail")
    logging.getLogger("bulkfm.noisy").info("bulkfm news")
    logging.getLogger("h5py._conv").debug("Creating converter from 7 to 5")
    logging.getLogger("numcodecs").debug("Registering codec 'zstd'")
    warnings.warn(
        "2 selected samples have no 'cohort' and are left out", BulkfmWarning, stacklevel=2
    )
    for _ in range(5):
        log_once(logging.getLogger("bulkfm.noisy"), logging.INFO, "ignoring %d genes", 7)
    return 0


def _register(subparsers: Any) -> None:
    parser = subparsers.add_parser("noisy", help="test command")
    parser.add_argument("--interrupt", action="store_true")
    parser.set_defaults(handler=_noisy)


@pytest.fixture
def noisy(monkeypatch):
    """A command that logs at every level, warns and repeats itself."""
    module = types.ModuleType("bulkfm_test_noisy")
    module.register = _register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(
        bulkfm.cli, "COMMAND_MODULES", (*bulkfm.cli.COMMAND_MODULES, module.__name__)
    )


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_adds_bulkfm_debug_only(noisy, verbose, capsys):
    argv = ["-v", "noisy"] if verbose else ["noisy"]
    assert bulkfm.cli.main(argv) == 0
    err = capsys.readouterr().err
    assert ("DEBUG bulkfm.noisy: bulkfm detail" in err) is verbose
    assert "INFO bulkfm.noisy: bulkfm news" in err
    assert "h5py" not in err and "numcodecs" not in err


def test_a_warning_prints_as_one_line_without_a_path(noisy, capsys):
    assert bulkfm.cli.main(["noisy"]) == 0
    err = capsys.readouterr().err
    assert "warning: 2 selected samples have no 'cohort' and are left out\n" in err
    assert ".py:" not in err and "BulkfmWarning" not in err


def test_said_once_per_invocation(noisy, capsys):
    for _ in range(2):
        assert bulkfm.cli.main(["noisy"]) == 0
        assert capsys.readouterr().err.count("ignoring 7 genes") == 1


def test_interrupt_exits_130_without_a_traceback(noisy, capsys):
    assert bulkfm.cli.main(["noisy", "--interrupt"]) == 130
    err = capsys.readouterr().err
    assert err == "interrupted\n"


def test_verbose_real_command_hides_h5py_debug(tmp_path):
    """A real command that writes an .h5ad: h5py and numcodecs log DEBUG lines on first
    use, which ``-v`` used to print."""
    out = tmp_path / "sim.h5ad"
    argv = ["-v", "data", "simulate", "-o", str(out), "--n-samples", "20", "--n-genes", "30"]
    run = subprocess.run(
        [sys.executable, "-m", "bulkfm.cli", *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.is_file()
    assert "INFO bulkfm.data.simulate: simulated 20 samples" in run.stderr
    assert "DEBUG" not in run.stderr, run.stderr
