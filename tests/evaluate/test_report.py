from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.cluster.hierarchy import linkage

from bulkfm.errors import ConfigError
from bulkfm.evaluate.plots import (
    confusion_figure,
    per_cohort_figure,
    png_bytes,
    save_png,
    similarity_figure,
)
from bulkfm.evaluate.report import Table, fmt_mean_std, report_tables

PNG = b"\x89PNG\r\n\x1a\n"


def stat(mean, std=0.01):
    return {"mean": mean, "std": std, "n": 5, "values": []}


def results() -> dict:
    arm = lambda label, kind, f1: {  # noqa: E731
        "label": label,
        "kind": kind,
        "summary": {"macro_f1": stat(f1), "weighted_f1": stat(f1 + 0.01), "accuracy": stat(0.9)},
    }
    return {
        "config": {"data": {"label_key": "cohort"}},
        "data": {"classes": {"A": 30, "B": 20}},
        "splits": {"classification": [{}, {}, {}]},
        "classification": {
            "mlp": arm("BulkRNABert + MLP", "bulkrnabert", 0.80),
            "baseline_pca_svm": arm("PCA(256) + SVM", "baseline", 0.85),
        },
    }


def test_mean_std_format():
    assert fmt_mean_std(stat(0.91234, 0.01234)) == "0.912 ± 0.012"
    assert fmt_mean_std(stat(0.5, math.nan)) == "0.500"
    assert fmt_mean_std(stat(math.nan)) == "n/a"
    assert fmt_mean_std(None) == "n/a"
    assert fmt_mean_std(stat(0.5, None), digits=1) == "0.5"


def test_tables_mark_the_best_model_even_when_it_is_a_baseline():
    (table,) = report_tables(results())
    assert table.columns == ["Model", "macro-F1", "weighted-F1", "accuracy"]
    rows = {r[0]: r for r in table.rows}
    assert rows["PCA(256) + SVM"][1] == "**0.850 ± 0.010**"
    assert rows["BulkRNABert + MLP"][1] == "0.800 ± 0.010"
    assert "3 patient-grouped 80/20 splits" in table.note
    assert "(2 classes, 50 samples)" in table.title


def test_markdown_and_html_rendering_escape_text():
    table = Table("T <1>", ["a", "b"], [["**x**", "<y>"]], note="n & m")
    md = table.markdown()
    assert "| a | b |\n|---|---|\n| **x** | <y> |" in md
    html = table.html()
    assert "<td><b>x</b></td><td>&lt;y&gt;</td>" in html
    assert "T &lt;1&gt;" in html and "n &amp; m" in html


def test_plots_are_pngs_written_atomically(tmp_path):
    fig = confusion_figure([[3, 1], [0, 4]], ["A", "B"], "cm")
    path = save_png(fig, tmp_path / "sub" / "cm.png")
    assert path.read_bytes()[:8] == PNG
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["cm.png"]  # no temp file left
    means = np.random.default_rng(0).normal(size=(3, 4))
    sim = similarity_figure(["a", "b", "c"], np.eye(3), linkage(means, "average", "cosine"))
    assert png_bytes(sim)[:8] == PNG
    bars = per_cohort_figure({"m1": {"A": (0.6, 0.1)}, "m2": {"A": (0.7, 0.05), "B": (0.5, 0.0)}})
    assert png_bytes(bars)[:8] == PNG


def test_plot_inputs_are_checked():
    with pytest.raises(ConfigError, match=r"confusion matrix \(2, 2\) does not match 3 labels"):
        confusion_figure([[1, 0], [0, 1]], ["a", "b", "c"])
    with pytest.raises(ConfigError, match="no per-cohort C-index"):
        per_cohort_figure({})


def test_report_reads_results_and_never_the_runner():
    """The report sits below the runner: importing the runner from it would be a cycle."""
    import ast
    import inspect

    import bulkfm.evaluate.report as report

    tree = ast.parse(inspect.getsource(report))
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    evaluate = {m for m in imported if m.startswith("bulkfm.evaluate")}
    assert evaluate <= {
        "bulkfm.evaluate.results",
        "bulkfm.evaluate.config",
        "bulkfm.evaluate.plots",
    }
