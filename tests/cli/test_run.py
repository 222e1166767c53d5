from __future__ import annotations

from pathlib import Path

from bulkfm.cli import main


def test_main_job_rejects_bad_override(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "run",
            "-o",
            str(tmp_path),
            "--n-samples",
            "60",
            "--n-genes",
            "200",
            "--set",
            "optim.learning_rate=1",
        ]
    )
    assert code == 1
    assert "optim.learning_rate" in capsys.readouterr().err
