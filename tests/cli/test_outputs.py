"""Every command checks where it will write before it starts working.

Inputs here do not exist (no model, no data): the output error must come first, so these
runs also show that no reading or training happened before the check.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bulkfm.cli import main as cli_main
from bulkfm.pipeline import packaged_config

PROC = "/proc/bulkfm-test"


def _commands(tmp: Path, bad: str, *, file_suffix: str = "") -> dict[str, tuple[list[str], str]]:
    """command name -> (argv with ``bad`` as its output, the flag the message must name)."""
    out_file = bad + file_suffix
    missing = str(tmp / "missing.h5ad")
    model = ["--model", str(tmp / "no-model"), "--input", missing]
    return {
        "embed": (["embed", *model, "--output", out_file], "--output"),
        "impute": (["impute", *model, "--output", out_file], "--output"),
        "data build": (["data", "build", missing, "-o", out_file], "--output"),
        "data simulate": (["data", "simulate", "-o", out_file, "--n-samples", "10"], "--output"),
        "data simulate --files": (
            ["data", "simulate", "-o", str(tmp / "ok.h5ad"), "--files", bad],
            "--files",
        ),
        "pretrain": (
            [
                *("pretrain", "--config", str(packaged_config("pretrain_tiny.yaml"))),
                *("--set", f"data.path={missing}", "--set", f"output_dir={bad}"),
            ],
            "--set output_dir=",
        ),
        "bench": (["bench", "--data", missing, "--models", "pca", "--out", bad], "--out"),
        "bench --cache-dir": (
            ["bench", "--data", missing, "--out", str(tmp / "b"), "--cache-dir", bad],
            "--cache-dir",
        ),
        "evaluate": (["evaluate", "--config", str(tmp / "eval.yaml"), "--out", bad], "--out"),
        "run": (["run", "--out", bad, "--n-samples", "10"], "--out"),
    }


@pytest.fixture
def places(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    (tmp_path / "eval.yaml").write_text(
        f"data:\n  path: {tmp_path / 'missing.h5ad'}\nmodel:\n  path: {tmp_path / 'no-model'}\n"
    )
    return tmp_path


FILE_OUTPUTS = ("embed", "impute", "data build", "data simulate")
DIR_OUTPUTS = (
    "data simulate --files",
    "pretrain",
    "bench",
    "bench --cache-dir",
    "evaluate",
    "run",
)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli_main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("command", FILE_OUTPUTS)
def test_a_folder_given_as_output_file(places, command, capsys) -> None:
    argv, flag = _commands(places, str(places / "adir"))[command]
    rc, err = _run(argv, capsys)
    assert rc == 1
    assert "OutputPathError" in err and "is an existing folder" in err and flag in err
    assert list((places / "adir").iterdir()) == []


@pytest.mark.parametrize("command", FILE_OUTPUTS + DIR_OUTPUTS)
def test_an_output_under_a_regular_file(places, command, capsys) -> None:
    argv, flag = _commands(places, str(places / "afile" / "sub"), file_suffix=".h5ad")[command]
    rc, err = _run(argv, capsys)
    assert rc == 1
    assert "OutputPathError" in err and "is a file, not a folder" in err and flag in err


@pytest.mark.parametrize("command", DIR_OUTPUTS)
def test_a_file_given_as_output_folder(places, command, capsys) -> None:
    argv, flag = _commands(places, str(places / "afile"))[command]
    rc, err = _run(argv, capsys)
    assert rc == 1
    assert "OutputPathError" in err and "is an existing file, but a folder" in err
    assert f"give {flag} a folder path" in err
    assert (places / "afile").read_text() == "not a folder"


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", FILE_OUTPUTS + DIR_OUTPUTS)
def test_an_output_under_proc(places, command, capsys) -> None:
    argv, flag = _commands(places, PROC, file_suffix=".h5ad")[command]
    rc, err = _run(argv, capsys)
    assert rc == 1
    assert "cannot create files in /proc" in err and flag in err


@pytest.mark.parametrize(
    ("command", "suffixes"),
    [
        ("embed", ".h5ad or .parquet or .npy"),
        ("impute", ".h5ad"),
        ("data build", ".h5ad"),
        ("data simulate", ".h5ad"),
    ],
)
def test_an_output_suffix_the_command_cannot_write(places, command, suffixes, capsys) -> None:
    """impute --output x.parquet once wrote HDF5 under a .parquet name."""
    argv, flag = _commands(places, str(places / "x"), file_suffix=".csv")[command]
    rc, err = _run(argv, capsys)
    assert rc == 1
    assert f"writes only files ending with {suffixes}" in err and f"give {flag}" in err
    assert not (places / "x.csv").exists()


def test_evaluate_failing_early_leaves_no_output_folder(places, capsys) -> None:
    out = places / "new" / "evaluation"
    rc, err = _run(["evaluate", "--config", str(places / "eval.yaml"), "--out", str(out)], capsys)
    assert rc == 1 and "InputFileError" in err
    assert not (places / "new").exists()
    rc, _ = _run(["evaluate", "--config", str(places / "eval.yaml"), "--out", str(places)], capsys)
    assert rc == 1 and sorted(p.name for p in places.iterdir()) == ["adir", "afile", "eval.yaml"]


def test_the_real_cli_prints_no_traceback(places) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bulkfm.cli", "data", "simulate", "-o", str(places / "adir")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: OutputPathError: output file")
