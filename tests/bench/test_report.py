from __future__ import annotations

import json

import pandas as pd
import pytest

from bulkfm.bench.report import family_table, leaderboard_markdown, task_table
from bulkfm.bench.runner import run_benchmark
from tests.bench.fakes import Fixed, signal_embedding


@pytest.fixture(scope="module")
def result(sim_base):
    from bulkfm.bench.config import BenchConfig

    config = BenchConfig(
        n_splits=2, min_positives=8, min_negatives=8, min_events=8, min_class_patients=8
    )
    models = [Fixed(sim_base, signal_embedding(sim_base), label="signal"), "raw"]
    return run_benchmark(
        sim_base, models, "cancer_type,mutation:TP53,survival@*", config, progress=False
    )


def test_write_report_files(result, tmp_path) -> None:
    files = result.write(tmp_path)
    expected = {"leaderboard.csv", "summary.csv", "scores.csv", "leaderboard.md", "run.json"}
    assert {p.name for p in tmp_path.iterdir() if p.is_file()} == expected
    for name in ("task_bars.png", "heatmap.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(files) >= {"leaderboard_csv", "run_json", "heatmap"}
    assert not list(tmp_path.rglob("*.tmp"))
    lb = pd.read_csv(tmp_path / "leaderboard.csv")
    pd.testing.assert_frame_equal(lb, result.leaderboard(), check_dtype=False)


def test_run_json_records_config_and_fingerprints(result, tmp_path) -> None:
    result.write(tmp_path, plots=False)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["config"] == result.config.to_dict()
    assert record["data_fingerprint"] == result.data_fingerprint
    assert [m["label"] for m in record["models"]] == ["signal", "raw"]
    assert record["models"][1]["fingerprint"] == result.models[1]["fingerprint"]
    assert record["models"][1]["learns"] is True
    names = [t["name"] for t in record["tasks"]]
    assert names == [t.name for t in result.tasks]
    assert record["tasks"][0]["info"]["n_samples"] > 0
    assert "numpy" in record["versions"]
    assert not (tmp_path / "plots").exists()


def test_markdown_tables(result) -> None:
    md = leaderboard_markdown(result)
    assert "| task | metric | signal | raw |" in md
    lb = result.leaderboard()
    best = lb.loc[lb[lb["task"] == "cancer_type"]["mean"].idxmax()]
    cell = task_table(result).set_index("task").loc["cancer_type", best["model"]]
    assert cell.startswith(f"**{best['mean']:.3f} ± {best['std']:.3f}")
    assert result.data_fingerprint in md
    fam = family_table(result)
    per_cohort = lb[lb["task"].str.startswith("survival@")]
    column = next(c for c in fam.columns if c.startswith("survival, per cohort"))
    for model, part in per_cohort.groupby("model"):
        assert fam.loc[model, column] == pytest.approx(part["mean"].mean())
    assert f"[{len(per_cohort) // 2} tasks]" in column


def test_skipped_tasks_are_listed_with_counts(result) -> None:
    import dataclasses

    reason = (
        "task 'mutation:EGFR' has 2 mutated and 9 wild-type patients; at least 20 and 20 "
        "are needed (min_positives / min_negatives)"
    )
    md = leaderboard_markdown(dataclasses.replace(result, skipped={"mutation:EGFR": reason}))
    assert "## Skipped tasks (1)" in md
    assert "| `mutation:EGFR` | 2 mutated and 9 wild-type patients |" in md
