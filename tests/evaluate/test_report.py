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
    scores_figure,
    similarity_figure,
)
from bulkfm.evaluate.report import (
    Table,
    _exclusion_items,
    _header,
    fmt_mean_std,
    report_tables,
    report_title,
)

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
        "config": {"data": {"label_key": "cohort"}, "protocol": {"test_size": 0.2}},
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


def test_title_and_counts_come_from_the_data():
    """A fixed title once said "7 tumour cohorts" over 8: counts are derived."""
    res = results()
    res["data"] = {"classes": {c: 10 for c in "ABCDEFGH"}, "n_selected": 80, "n_loaded": 90}
    res["data"]["survival"] = {"n": 78, "n_events": 20, "per_cohort": {"A": {}, "B": {}}}
    assert report_title(res) == (
        "BulkRNABert evaluation: 8 cohort classes, 80 samples; survival of 78 samples with "
        "20 events"
    )
    res["model"] = {"source": "checkpoint"}
    assert "- data: 8 cohort classes, 80 samples" in "\n".join(_header(res, "My cohort"))
    assert not any(line.startswith("- data") for line in _header(res, report_title(res)))


def test_classification_note_states_the_chance_levels():
    """Accuracy of always predicting the largest class, and the macro-F1 of uniform
    guessing, checked against scikit-learn on a large simulated guess."""
    from sklearn.metrics import f1_score

    (table,) = report_tables(results())  # classes A: 30, B: 20
    assert "accuracy 0.600 by always predicting the largest class" in table.note
    rng = np.random.default_rng(0)
    y = rng.choice(["A", "B"], size=200_000, p=[0.6, 0.4])
    guess = rng.choice(["A", "B"], size=y.size)
    simulated = f1_score(y, guess, average="macro")
    assert f"macro-F1 {simulated:.3f} by guessing" in table.note


def test_exclusion_counts_add_up():
    data = {
        "n_loaded": 20,
        "n_selected": 12,
        "exclusions": {
            "select": {"rules": {"sample_type": "tumor"}, "n_before": 20, "n_after": 16},
            "dedupe": {"key": "sample_id", "n_dropped": 3, "examples": ["x", "y"]},
            "unlabelled": 1,
            "small_classes": {"Z": "1 patient(s), 2 sample(s); 5 patients needed"},
            "small_class_samples": 2,
            "survival": {
                "n_excluded": 4,
                "reason": "r",
                "ids": [],
                "by_reason": {"missing or infinite time": 3, "time <= 0": 1},
            },
        },
    }
    items = _exclusion_items(data)
    assert items[0] == (
        "20 loaded, 12 analysed: 8 left out = 4 not matching {'sample_type': 'tumor'} + "
        "3 duplicate sample_id (the first kept; e.g. x, y) + 1 without a label"
    )
    assert items[1].startswith("classification only, 2 sample(s): classes too small")
    assert items[2] == (
        "survival only: 4 sample(s) left out = 3 missing or infinite time + 1 time <= 0"
    )


def test_survival_table_notes_few_events_and_per_cohort_events():
    res = results()
    arm = {"label": "Cox", "kind": "baseline", "summary": {"c_index": stat(0.7)}}
    arm["per_cohort"] = {"A": stat(0.6), "B": stat(0.8)}
    res["survival"] = {"cox": arm}
    few = "pan-cancer survival: 2 of 3 test splits hold fewer than 10 events (fewest: 4)"
    res["data"]["survival"] = {
        "n": 40,
        "n_events": 12,
        "per_cohort": {"A": {}, "B": {}},
        "test_events": {"threshold": 10, "per_split": [4, 4, 11], "few": [few]},
    }
    res["data"]["survival"]["test_events"]["per_cohort"] = {"A": [1, 2, 3], "B": [3, 2, 8]}
    tables = report_tables(res)
    surv = tables[1]
    assert surv.title == "Pan-cancer survival (40 samples, 12 events)"
    assert few in surv.note and "Chance: 0.5" in surv.note
    per_cohort = tables[2]
    assert per_cohort.columns[:2] == ["Cohort", "fewest test events"]
    assert [row[:2] for row in per_cohort.rows] == [["A", "1"], ["B", "2"]]


def test_coverage_line_in_the_header():
    res = results()
    res["data"]["n_selected"], res["data"]["n_loaded"] = 50, 60
    res["model"] = {"source": "checkpoint"}
    res["gene_coverage"] = {
        "fraction_measured": 0.85,
        "n_model_genes": 40,
        "n_absent": 6,
        "examples_absent": ["G1", "G2", "G3", "G4"],
        "min_coverage": 0.5,
        "by_group": {"cohort": {"A": {"fraction_measured": 0.9}, "B": {"fraction_measured": 0.8}}},
    }
    line = next(x for x in _header(res, "t") if x.startswith("- gene coverage"))
    assert "85.0% of the model's 40 genes" in line and "6 are absent" in line
    assert (
        "G1, G2, G3)" in line and "lowest cohort: B 80.0%" in line and "minimum allowed 50%" in line
    )


@pytest.mark.parametrize(("chance", "metric"), [(0.5, "C-index"), (0.6, "accuracy")])
def test_score_plots_span_the_whole_range_with_a_chance_line(chance, metric):
    fig = scores_figure({"a": (0.71, 0.02), "b": (0.69, float("nan"))}, metric, chance, "chance")
    (ax,) = fig.axes
    assert ax.get_xlim() == (0.0, 1.0)  # not zoomed onto 0.69-0.71
    vertical = [line.get_xdata() for line in ax.get_lines()]
    assert any(np.allclose(x, chance) for x in vertical)
    assert png_bytes(fig)[:8] == PNG
    with pytest.raises(ConfigError, match="chance level"):
        scores_figure({"a": (0.5, 0.0)}, metric, 1.5, "chance")


def test_per_cohort_plot_has_the_chance_line_on_a_fixed_axis():
    fig = per_cohort_figure({"m": {"A": (0.55, 0.01), "B": (0.57, 0.02)}})
    (ax,) = fig.axes
    assert ax.get_ylim() == (0.0, 1.0)
    assert any(np.allclose(line.get_ydata(), 0.5) for line in ax.get_lines())
