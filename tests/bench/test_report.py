from __future__ import annotations

import json

import pandas as pd
import pytest

from bulkfm.bench.report import (
    adjusted_table,
    chance_level,
    family_table,
    heatmap_figure,
    leaderboard_markdown,
    per_class_table,
    task_bars_figure,
    task_table,
)
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
    expected |= {"per_class.csv"}
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
    assert "| task | metric | cohort only | signal | raw |" in md
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


def test_cohort_identity_beside_pan_cancer_mutation_scores(result, tmp_path) -> None:
    lb = result.leaderboard()
    mut = lb[lb["task"] == "mutation:TP53"]
    ref = result.summary[result.summary["reference"] & result.summary["primary"]]
    assert (mut["cohort_only"] == ref["mean"].item()).all()
    assert mut["cohort_adjusted"].notna().all()
    assert lb[lb["task"] != "mutation:TP53"]["cohort_only"].isna().all()
    table = adjusted_table(result).set_index("task")
    assert table.loc["mutation:TP53", "cohort identity alone"] == f"{ref['mean'].item():.3f}"
    signal = mut.set_index("model").loc["signal"]
    assert table.loc["mutation:TP53", "signal"].startswith(f"{signal['cohort_adjusted']:.3f} [")
    md = leaderboard_markdown(result)
    assert "## Pan-cancer mutation tasks: beyond cohort identity" in md
    assert "Read the cohort-adjusted AUROC" in md
    fam = family_table(result)
    col = next(c for c in fam.columns if "cohort-adjusted" in c)
    assert fam.loc["signal", col] == pytest.approx(signal["cohort_adjusted"])
    row = next(i for i in fam.index if i.startswith("cohort identity"))
    assert fam.loc[row, col] != fam.loc[row, col]  # NaN: the reference has no adjusted score
    result.write(tmp_path, plots=False)
    csv = pd.read_csv(tmp_path / "leaderboard.csv")
    assert {"cohort_only", "cohort_adjusted", "few_test_cases"} <= set(csv.columns)


def test_per_class_table_and_file(result, tmp_path) -> None:
    pc = result.per_class
    table = per_class_table(result).set_index("class")
    for cls, part in pc[pc["model"] == "signal"].groupby("class"):
        expected = f"{part['f1'].mean():.2f} / {part['recall'].mean():.2f}"
        assert table.loc[cls, "signal"] == expected
    assert "## Cancer type per class" in leaderboard_markdown(result)
    result.write(tmp_path, plots=False)
    written = pd.read_csv(tmp_path / "per_class.csv")
    assert set(written["class"]) == set(pc["class"])
    assert {"precision", "recall", "f1", "support"} <= set(written.columns)


def test_few_test_cases_are_marked_in_the_markdown(result) -> None:
    import dataclasses

    info = {k: dict(v) for k, v in result.task_info.items()}
    info["mutation:TP53"].update(few_test_cases=True, min_test_patients={"negatives": 2})
    md = leaderboard_markdown(dataclasses.replace(result, task_info=info))
    assert "| mutation:TP53 † |" in md
    n_flagged = sum(bool(v.get("few_test_cases")) for v in info.values())
    assert f"## † Tasks with few test cases ({n_flagged})" in md
    assert "| `mutation:TP53` | negatives: 2 |" in md


def test_plots_have_a_fixed_axis_and_a_chance_line(result) -> None:
    fig = task_bars_figure(result)
    lb = result.leaderboard()
    tasks = list(dict.fromkeys(lb["task"]))
    for ax, task in zip(fig.axes, tasks, strict=True):
        assert ax.get_ylim() == (0.0, 1.0)
        levels = [line.get_ydata()[0] for line in ax.get_lines()]
        metric = lb[lb["task"] == task]["metric"].iloc[0]
        assert chance_level(result, task, metric) in levels
    k = len(result.task_info["cancer_type"]["n_per_class"])
    assert chance_level(result, "cancer_type", "macro_f1") == pytest.approx(1 / k)
    assert chance_level(result, "mutation:TP53", "auroc") == 0.5
    mut = fig.axes[tasks.index("mutation:TP53")]
    cohort_only = lb[lb["task"] == "mutation:TP53"]["cohort_only"].iloc[0]
    assert cohort_only in [line.get_ydata()[0] for line in mut.get_lines()]
    heat = heatmap_figure(result)
    assert heat.axes[0].images[0].get_clim() == (0.0, 1.0)
