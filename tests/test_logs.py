"""bulkfm.logs: each message once per run, and the console settings of one CLI call."""

from __future__ import annotations

import logging
import warnings

import pytest

from bulkfm.errors import BulkfmWarning
from bulkfm.logs import FORMAT, LOGGER, console, format_warning, log_once, new_run


@pytest.fixture(autouse=True)
def _fresh_run():
    new_run()
    yield
    new_run()


def test_log_once_says_a_message_once_per_run(caplog):
    log = logging.getLogger("bulkfm.test_logs")
    with caplog.at_level(logging.INFO, logger="bulkfm"):
        said = [log_once(log, logging.INFO, "ignoring %d genes", 55232) for _ in range(77)]
        log_once(log, logging.INFO, "ignoring %d genes", 12)  # other text: said
        log_once(log, logging.WARNING, "ignoring %d genes", 12)  # other level: said
        log_once(logging.getLogger("bulkfm.other"), logging.INFO, "ignoring 12 genes")
    assert said == [True] + [False] * 76
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("bulkfm.test_logs", "INFO", "ignoring 55232 genes"),
        ("bulkfm.test_logs", "INFO", "ignoring 12 genes"),
        ("bulkfm.test_logs", "WARNING", "ignoring 12 genes"),
        ("bulkfm.other", "INFO", "ignoring 12 genes"),
    ]
    new_run()
    with caplog.at_level(logging.INFO, logger="bulkfm"):
        assert log_once(log, logging.INFO, "ignoring %d genes", 55232)


def test_log_once_records_the_callers_line(caplog):
    log = logging.getLogger("bulkfm.test_logs")
    with caplog.at_level(logging.INFO, logger="bulkfm"):
        log_once(log, logging.INFO, "where")
    assert caplog.records[0].funcName == "test_log_once_records_the_callers_line"


def test_a_message_below_the_level_is_said_when_the_level_allows_it(caplog):
    log = logging.getLogger("bulkfm.test_logs")
    with caplog.at_level(logging.INFO, logger="bulkfm"):
        assert not log_once(log, logging.DEBUG, "detail")
    with caplog.at_level(logging.DEBUG, logger="bulkfm"):
        assert log_once(log, logging.DEBUG, "detail")


def test_format_warning_names_foreign_categories_only():
    assert format_warning(BulkfmWarning("3 samples left out"), BulkfmWarning) == (
        "warning: 3 samples left out"
    )
    assert format_warning("slow", RuntimeWarning) == "warning: RuntimeWarning: slow"


@pytest.mark.parametrize("verbose", [False, True])
def test_console_levels(verbose, capsys):
    with console(verbose=verbose):
        logging.getLogger("bulkfm.x").debug("bulkfm detail")
        logging.getLogger("bulkfm.x").info("bulkfm news")
        logging.getLogger("h5py._conv").debug("Creating converter")
        logging.getLogger("numcodecs").info("Registering codec")
        logging.getLogger("numcodecs").warning("codec trouble")
    err = capsys.readouterr().err.splitlines()
    expected = ["INFO bulkfm.x: bulkfm news", "WARNING numcodecs: codec trouble"]
    if verbose:
        expected.insert(0, "DEBUG bulkfm.x: bulkfm detail")
    assert err == expected


def test_console_prints_warnings_without_a_path_and_restores_everything(capsys):
    root, ours = logging.getLogger(), logging.getLogger(LOGGER)
    before = (root.level, list(root.handlers), ours.level, warnings.showwarning)
    with console():
        warnings.warn("2 samples have no label and are left out", BulkfmWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err == "warning: 2 samples have no label and are left out\n"
    assert (root.level, list(root.handlers), ours.level, warnings.showwarning) == before
    with warnings.catch_warnings(record=True) as caught:  # Python API: normal warnings
        warnings.simplefilter("always")
        warnings.warn("plain", BulkfmWarning, stacklevel=1)
    assert caught[0].filename.endswith("test_logs.py")


def test_console_starts_a_new_run(caplog):
    log = logging.getLogger("bulkfm.test_logs")
    with caplog.at_level(logging.INFO, logger="bulkfm"):
        log_once(log, logging.INFO, "once")
        with console():
            assert log_once(log, logging.INFO, "once")


def test_format_is_level_name_message():
    record = logging.LogRecord("bulkfm.a", logging.INFO, "f.py", 1, "hi %s", ("x",), None)
    assert logging.Formatter(FORMAT).format(record) == "INFO bulkfm.a: hi x"
