"""Every bad input gets a named error: the CLI bad-input suite (issue 13).

Each case of :mod:`tests.cli.bad_inputs_cases` runs the real CLI
(``python -m bulkfm.cli ...``) in a subprocess, in its own folder. The runs start once,
together, in a module fixture (three at a time: most of a run is importing torch), and
one test per case checks its result:

- an error case exits 1 with ``error: <SomeError>: ...``, no Python traceback, a message
  naming the problem and the flag (or config key, or file) that fixes it, and nothing new
  left in its folder (no output, no hidden temporary file);
- an ok case exits 0 and its result passes the case's check.

``docs/bad_inputs.md`` holds the table of these cases; a test keeps it in sync.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.cli.bad_inputs_cases import (
    CASES,
    DOC,
    NOT_CLI,
    REPO,
    TABLE_END,
    TABLE_START,
    Case,
    Inputs,
    Result,
    build_inputs,
    doc_with_table,
)

WORKERS = 3
TIMEOUT_S = 240
TRACEBACK = "Traceback (most recent call last)"
_BY_ID = {c.id: c for c in CASES}


def _env() -> dict[str, str]:
    """The test process's environment, one thread per run, and no GPU (so ``cuda:7`` is
    unavailable wherever the suite runs)."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONWARNINGS="default",
        COLUMNS="200",
    )
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _snapshot(folder: Path) -> frozenset[str]:
    return frozenset(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _run(case: Case, inputs: Inputs, folder: Path) -> Result:
    argv = case.argv(inputs, folder)
    if case.umask is not None:
        argv = ["sh", "-c", f'umask {case.umask:03o} && exec "$@"', "sh", *argv]
    before = _snapshot(folder)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            argv,
            cwd=folder,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = -9, str(exc.stdout or ""), f"TIMEOUT after {TIMEOUT_S} s\n{exc.stderr}"
    return Result(code, out, err, time.perf_counter() - start, before)


@pytest.fixture(scope="module")
def inputs(tiny_model: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return build_inputs(tmp_path_factory.mktemp("bad_inputs") / "inputs", tiny_model)


@pytest.fixture(scope="module")
def results(
    inputs: Inputs, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict]:
    """Every case run once, concurrently; ``{case id: (Result, case folder)}``."""
    root = tmp_path_factory.mktemp("bad_input_runs")
    folders = {}
    for case in CASES:
        folder = root / case.id
        folder.mkdir()
        if case.setup is not None:
            case.setup(inputs, folder)
        folders[case.id] = folder
    start, cpu = time.perf_counter(), _children_cpu()
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {c.id: pool.submit(_run, c, inputs, folders[c.id]) for c in CASES}
        out = {cid: (f.result(), folders[cid]) for cid, f in futures.items()}
    total, cpu = time.perf_counter() - start, _children_cpu() - cpu
    slowest = sorted(out.items(), key=lambda kv: -kv[1][0].seconds)[:5]
    line = (
        f"bad-input suite: {len(CASES)} runs in {total:.1f} s wall, {cpu:.1f} s CPU; slowest: "
        + ", ".join(f"{cid} {r.seconds:.1f} s" for cid, (r, _) in slowest)
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)
    yield out


def _explain(case: Case, result: Result) -> str:
    return (
        f"case {case.id}: exit {result.returncode}\n--- stderr (tail) ---\n"
        f"{result.stderr[-3000:]}\n--- stdout (tail) ---\n{result.stdout[-1000:]}"
    )


@pytest.mark.slow  # the module's runs take ~2.5 min of 2 cores together (see ``results``)
@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_bad_input(case_id: str, results: dict) -> None:
    case = _BY_ID[case_id]
    result, folder = results[case_id]
    why = _explain(case, result)
    assert TRACEBACK not in result.stderr and TRACEBACK not in result.stdout, why
    for pattern in case.absent:
        assert not re.search(pattern, result.stderr), f"{pattern!r} must not appear\n{why}"
    if case.expect == "ok":
        assert result.returncode == 0, why
        if case.check is not None:
            case.check(result, folder)
        return
    assert result.returncode == 1, why
    assert re.match(rf"error: (?:{case.error}): ", result.message), why
    assert re.search(case.what, result.message, re.IGNORECASE), f"what: {case.what!r}\n{why}"
    assert re.search(case.fix, result.message), f"fix: {case.fix!r}\n{why}"
    new = _snapshot(folder) - result.before
    new = {p for p in new if not any(Path(p).match(g) for g in case.new_files)}
    assert not new, f"left behind: {sorted(new)}\n{why}"
    if case.check is not None:
        case.check(result, folder)


def test_case_ids_are_unique_and_named() -> None:
    ids = [c.id for c in CASES] + [n.id for n in NOT_CLI]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i) for i in ids)
    for case in CASES:
        if case.expect == "error":
            assert case.what and case.fix, f"{case.id}: say what is wrong and what fixes it"


def test_doc_table_is_in_sync() -> None:
    """docs/bad_inputs.md lists every case; rewrite it with
    ``python -m tests.cli.bad_inputs_cases``."""
    doc = DOC.read_text()
    assert TABLE_START in doc and TABLE_END in doc
    assert doc == doc_with_table(doc), (
        "docs/bad_inputs.md is out of date: run `python -m tests.cli.bad_inputs_cases`"
    )


def test_not_cli_findings_have_tests() -> None:
    for finding in NOT_CLI:
        assert (REPO / finding.tests).is_file(), finding
