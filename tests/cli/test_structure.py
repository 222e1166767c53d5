"""The CLI is the only home of argparse, and nothing below it depends on it.

A library module that builds parsers or imports ``bulkfm.cli`` ties a notebook user's
function to command-line concerns (and, through ``bulkfm.cli``, to every command).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bulkfm.cli

SRC = Path(bulkfm.cli.__file__).resolve().parents[1]
CLI = SRC / "cli"


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports, at any depth (function-local too)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


def _library_modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if CLI not in p.parents)


def test_scan_sees_the_package() -> None:
    modules = _library_modules()
    assert SRC / "embed.py" in modules and SRC / "pipeline.py" in modules
    assert not any(CLI in p.parents for p in modules)
    assert "argparse" in _imported_modules(CLI / "embed.py")


def test_argparse_only_under_cli() -> None:
    offenders = [
        str(p.relative_to(SRC))
        for p in _library_modules()
        if any(m == "argparse" or m.startswith("argparse.") for m in _imported_modules(p))
    ]
    assert offenders == [], f"argparse belongs in bulkfm/cli/, not in {offenders}"


def test_nothing_outside_cli_imports_cli() -> None:
    offenders = [
        str(p.relative_to(SRC))
        for p in _library_modules()
        if any(m == "bulkfm.cli" or m.startswith("bulkfm.cli.") for m in _imported_modules(p))
    ]
    assert offenders == [], f"library modules must not import bulkfm.cli: {offenders}"


def test_every_command_module_is_registered() -> None:
    modules = {f"bulkfm.cli.{p.stem}" for p in CLI.glob("*.py")}
    commands = modules - {"bulkfm.cli.__init__", "bulkfm.cli.__main__", "bulkfm.cli.common"}
    assert set(bulkfm.cli.COMMAND_MODULES) == commands


# What --help must not show: notes for developers, not for users.
DEVELOPER_NOTES = ("registration", "cheap", "handler", "argparse", "import torch", "todo")

_HELP_SCRIPT = """
import argparse, contextlib, io, json, sys
from bulkfm.cli import build_parser, main

def commands(parser, prefix):
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += commands(sub, [*prefix, name])
    return out

texts = {}
for argv in commands(build_parser(), []):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main([*argv, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
    texts[" ".join(argv)] = buf.getvalue()
print(json.dumps({"torch": "torch" in sys.modules, "help": texts}))
"""


@pytest.fixture(scope="module")
def help_run() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _HELP_SCRIPT], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_help_of_every_command_runs_without_torch(help_run: dict) -> None:
    texts = help_run["help"]
    for command in ("", "embed", "impute", "run", "pretrain", "bench", "evaluate", "data"):
        assert texts[command].startswith(f"usage: bulkfm {command}".rstrip()), command
    assert "data build" in texts
    assert help_run["torch"] is False


@pytest.mark.parametrize("note", DEVELOPER_NOTES)
def test_help_has_no_developer_notes(help_run: dict, note: str) -> None:
    offenders = [cmd or "bulkfm" for cmd, text in help_run["help"].items() if note in text.lower()]
    assert offenders == [], f"--help of {offenders} mentions {note!r}"


def test_python_m_bulkfm_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bulkfm.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("usage: bulkfm")
