"""Leaderboards (CSV + Markdown), plots and the run record of a benchmark.

Files written into ``out_dir`` (each atomically):

- ``leaderboard.csv``: headline metric per model x task (mean, std, interval of the mean,
  splits); for pan-cancer mutation tasks also what cohort identity alone scores
  (``cohort_only``) and the model's cohort-adjusted AUROC with its interval; the
  ``few_test_cases`` flag;
- ``leaderboard.md``: the same as tables (family averages, per task, the cohort-adjusted
  pan-cancer mutation scores, cancer type per class), tasks with few test cases, skipped
  tasks with reasons, and the settings;
- ``summary.csv``: every metric (secondary ones too) per model x task, the cohort-identity
  reference rows marked ``reference``;
- ``scores.csv``: every metric of every split (for paired comparisons);
- ``per_class.csv``: cancer type, per model and class: mean precision, recall, F1 over
  the splits and the mean test support;
- ``run.json``: the exact config, data fingerprint, model fingerprints and settings,
  tasks with their sample counts, skipped tasks, timings, package versions;
- ``plots/task_bars.png`` (mean and interval per task on a fixed 0-1 axis, with the
  chance level dashed and cohort identity alone dotted) and ``plots/heatmap.png``
  (model x task, colour scale fixed to 0-1). matplotlib is imported only here,
  through its Agg canvas, so no global backend is switched.
"""

from __future__ import annotations

import json
import math
import platform
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from bulkfm.bench.config import BenchConfig
from bulkfm.io import atomic_path, check_output_dir, write_text

__all__ = [
    "adjusted_table",
    "chance_level",
    "family_table",
    "heatmap_figure",
    "leaderboard_markdown",
    "per_class_table",
    "plot_heatmap",
    "plot_task_bars",
    "task_bars_figure",
    "task_table",
    "write_report",
]


class BenchResult(Protocol):
    """What the report reads of a :class:`bulkfm.bench.results.BenchResult`.

    A protocol, so the report does not import the result class whose ``write`` calls it.
    """

    @property
    def scores(self) -> pd.DataFrame: ...
    @property
    def summary(self) -> pd.DataFrame: ...
    @property
    def config(self) -> BenchConfig: ...
    @property
    def models(self) -> list[dict[str, Any]]: ...
    @property
    def skipped(self) -> dict[str, str]: ...
    @property
    def n_samples(self) -> int: ...
    @property
    def data_fingerprint(self) -> str: ...
    @property
    def endpoint(self) -> str | None: ...
    @property
    def task_info(self) -> dict[str, dict[str, Any]]: ...
    def leaderboard(self) -> pd.DataFrame: ...
    def per_class_summary(self) -> pd.DataFrame: ...
    def metadata(self) -> dict[str, Any]: ...


_METRIC_NAMES = {
    "macro_f1": "macro-F1",
    "auroc": "AUROC",
    "c_index": "C-index",
    "c_index_within_cohort": "C-index (within cohort)",
    "auroc_within_cohort": "AUROC (within cohort)",
}

_ADJUSTED = "mutation, pan-cancer, cohort-adjusted (AUROC within cohorts)"
_REFERENCE = "cohort identity alone (reference)"


_GROUP_ORDER = (
    "cancer type (macro-F1)",
    "mutation, pan-cancer (AUROC)",
    _ADJUSTED,
    "mutation, within cohort (AUROC)",
    "survival, pan-cancer (C-index)",
    "survival, per cohort (C-index)",
)


def _group(task: str, family: str) -> str:
    within = "@" in task
    if family == "cancer_type":
        return "cancer type (macro-F1)"
    if family == "mutation":
        return "mutation, within cohort (AUROC)" if within else "mutation, pan-cancer (AUROC)"
    return "survival, per cohort (C-index)" if within else "survival, pan-cancer (C-index)"


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def _ci(lo: float, hi: float, digits: int = 3) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f" [{lo:.{digits}f}, {hi:.{digits}f}]"


def family_table(result: BenchResult) -> pd.DataFrame:
    """Mean of the task means within each task group (models x groups; ``n`` tasks per cell).

    Pan-cancer mutation tasks also count in the cohort-adjusted group (each model's AUROC
    within cohorts), and a last row gives what cohort identity alone scores there.
    """
    lb = result.leaderboard()
    lb = lb.assign(group=[_group(t, f) for t, f in zip(lb["task"], lb["family"], strict=True)])
    parts = [lb[["model", "group", "task", "mean"]]]
    adjusted = lb[lb["cohort_adjusted"].notna()]
    parts.append(adjusted.assign(group=_ADJUSTED, mean=adjusted["cohort_adjusted"]))
    reference = lb[lb["cohort_only"].notna()].drop_duplicates("task")
    parts.append(
        reference.assign(model=_REFERENCE, group="mutation, pan-cancer (AUROC)").assign(
            mean=reference["cohort_only"]
        )
    )
    long = pd.concat([p[["model", "group", "task", "mean"]] for p in parts], ignore_index=True)
    agg = long.groupby(["model", "group"], sort=False)["mean"].agg(["mean", "size"]).reset_index()
    table = agg.pivot(index="model", columns="group", values="mean")
    counts = agg.groupby("group")["size"].max()
    order = [g for g in _GROUP_ORDER if g in table.columns]
    table = table[order]
    table.columns = [f"{g} [{int(counts[g])} task{'s' if counts[g] > 1 else ''}]" for g in order]
    models = list(dict.fromkeys(long["model"]))
    return table.loc[models]


def task_table(result: BenchResult, *, with_ci: bool = True) -> pd.DataFrame:
    """Tasks x models of ``mean ± std [interval]`` strings of the headline metric.

    ``cohort only``: what cohort identity alone scores (pan-cancer mutation tasks). A task
    marked † had fewer than ``min_test_cases`` test patients of some kind in a split.
    """
    lb = result.leaderboard()
    models = list(dict.fromkeys(lb["model"]))
    rows = []
    for task, part in lb.groupby("task", sort=False):
        ref = part["cohort_only"].iloc[0]
        row: dict[str, Any] = {
            "task": task + (" †" if part["few_test_cases"].iloc[0] else ""),
            "metric": _METRIC_NAMES.get(part["metric"].iloc[0], part["metric"].iloc[0]),
            "cohort only": f"{ref:.3f}" if math.isfinite(ref) else "",
        }
        best = part["mean"].max()
        for _, r in part.iterrows():
            cell = _fmt(r["mean"], r["std"]) + (_ci(r["ci_low"], r["ci_high"]) if with_ci else "")
            if len(models) > 1 and r["mean"] == best:
                cell = f"**{cell}**"
            row[r["model"]] = cell
        rows.append(row)
    return pd.DataFrame(rows, columns=["task", "metric", "cohort only", *models])


def adjusted_table(result: BenchResult) -> pd.DataFrame:
    """Pan-cancer mutation tasks x models: cohort-adjusted AUROC ``mean [interval]``, beside
    the raw AUROC and what cohort identity alone scores."""
    lb = result.leaderboard()
    lb = lb[lb["cohort_only"].notna()]
    models = list(dict.fromkeys(lb["model"]))
    rows = []
    for task, part in lb.groupby("task", sort=False):
        row: dict[str, Any] = {
            "task": task + (" †" if part["few_test_cases"].iloc[0] else ""),
            "cohort identity alone": f"{part['cohort_only'].iloc[0]:.3f}",
        }
        for _, r in part.iterrows():
            adj = _fmt(r["cohort_adjusted"], float("nan"))
            adj += _ci(r["cohort_adjusted_ci_low"], r["cohort_adjusted_ci_high"])
            row[r["model"]] = f"{adj} (raw {r['mean']:.3f})"
        rows.append(row)
    return pd.DataFrame(rows, columns=["task", "cohort identity alone", *models])


def per_class_table(result: BenchResult) -> pd.DataFrame:
    """Cancer types x models: ``F1 / recall`` (means over splits), with the mean test support."""
    pc = result.per_class_summary()
    if pc.empty:
        return pd.DataFrame()
    models = list(dict.fromkeys(pc["model"]))
    rows = []
    for cls, part in pc.groupby("class", sort=True):
        row: dict[str, Any] = {"class": cls, "test samples": f"{part['support'].iloc[0]:.1f}"}
        for _, r in part.iterrows():
            row[r["model"]] = f"{r['f1']:.2f} / {r['recall']:.2f}"
        rows.append(row)
    return pd.DataFrame(rows, columns=["class", "test samples", *models])


def _md_table(df: pd.DataFrame, index: bool = False, digits: int = 3) -> str:
    frame = df.reset_index() if index else df
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float | np.floating):
                cells.append("n/a" if not math.isfinite(v) else f"{v:.{digits}f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ci_text(result: BenchResult) -> str:
    config = result.config
    level = round(100 * config.ci_level)
    rho = (
        "1 - (1 - test fraction)^2 (calibrated)"
        if config.ci_method == "calibrated"
        else "the test fraction (Nadeau & Bengio)"
    )
    return (
        f"[{level}% interval of the mean over splits]: corrected resampled t (Nadeau & "
        f"Bengio 2003; the splits overlap) with the correlation of two splits' scores "
        f"assumed {rho}"
    )


def _few_cases_section(result: BenchResult) -> list[str]:
    c = result.config
    flagged = {
        name: info.get("min_test_patients", {})
        for name, info in result.task_info.items()
        if info.get("few_test_cases")
    }
    if not flagged:
        return []
    rows = [
        f"| `{name}` | " + ", ".join(f"{k}: {v}" for k, v in counts.items()) + " |"
        for name, counts in flagged.items()
    ]
    return [
        f"## † Tasks with few test cases ({len(flagged)})",
        "",
        f"Some test set of these tasks held fewer than {c.min_test_cases} patients of a "
        "class, with an event or censored (fewest per split below; cancer type: per "
        "class). One patient moves their scores a lot, and a random control can score far "
        "from chance on them: compare with the control, not with 0.5.",
        "",
        "| task | fewest test patients |",
        "|---|---|",
        *rows,
        "",
    ]


def leaderboard_markdown(result: BenchResult, *, title: str = "Benchmark leaderboard") -> str:
    """The leaderboard as Markdown (family averages, per-task table, skipped tasks)."""
    c = result.config
    models = ", ".join(m["label"] for m in result.models)
    parts = [
        f"# {title}",
        "",
        f"- samples: {result.n_samples} (sample_type = {c.sample_type!r}); data fingerprint "
        f"`{result.data_fingerprint}`",
        f"- models: {models}",
        f"- {c.n_splits} patient-grouped stratified hold-outs ({round(100 * c.test_size)}% "
        f"test), penalty tuned by {c.inner_folds}-fold inner CV on the training part",
        f"- cells: mean ± std over splits {_ci_text(result)}",
        f"- survival endpoint: {result.endpoint or 'as built'}",
        "",
        "## Averages per task group",
        "",
        _md_table(family_table(result), index=True),
        "",
        "## Per task",
        "",
        _md_table(task_table(result)),
        "",
    ]
    adjusted = adjusted_table(result)
    if not adjusted.empty:
        parts += [
            "## Pan-cancer mutation tasks: beyond cohort identity",
            "",
            "Mutation rates differ between cohorts, so a pan-cancer AUROC rewards recognising "
            "the cohort. `cohort identity alone` is the same probe on one-hot cohort labels "
            "over the same splits. Read the cohort-adjusted AUROC: over pairs of a mutated "
            "and a wild-type sample *of the same cohort* (cohorts weighted by their pairs; "
            "cohort identity alone scores 0.5 on it). Cells: cohort-adjusted mean "
            "[interval] (raw pan-cancer AUROC).",
            "",
            _md_table(adjusted),
            "",
        ]
    per_class = per_class_table(result)
    if not per_class.empty:
        parts += [
            "## Cancer type per class",
            "",
            "F1 / recall of each cancer type, means over splits (`per_class.csv` adds "
            "precision); `test samples`: mean test support.",
            "",
            _md_table(per_class),
            "",
        ]
    parts += _few_cases_section(result)
    if result.skipped:
        parts += _skipped_section(result)
    return "\n".join(parts)


def _short_reason(reason: str) -> str:
    """ "task 'x' has 2 mutated and 9 wild-type patients; at least ..." -> the counts."""
    m = re.match(r"^task '[^']+' has (.*?); at least .*$", reason, flags=re.S)
    return m.group(1) if m else reason


def _skipped_section(result: BenchResult) -> list[str]:
    c = result.config
    rows = "\n".join(
        f"| `{name}` | {_short_reason(reason)} |" for name, reason in result.skipped.items()
    )
    return [
        f"## Skipped tasks ({len(result.skipped)})",
        "",
        f"Thresholds (patients): min_positives={c.min_positives}, "
        f"min_negatives={c.min_negatives}, min_events={c.min_events}, "
        f"min_class_patients={c.min_class_patients}. Full reasons are in run.json.",
        "",
        "<details><summary>skipped tasks and their counts</summary>",
        "",
        "| task | counts |",
        "|---|---|",
        rows,
        "",
        "</details>",
        "",
    ]


# --------------------------------------------------------------------------- plots


def _canvas(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def chance_level(result: BenchResult, task: str, metric: str) -> float:
    """Score of a model without signal: 0.5 for AUROC and C-index; for macro-F1 1/k (k
    classes), the expected macro-F1 of guessing classes with their frequencies (each
    class's precision and recall are then its frequency); NaN when unknown."""
    if metric in ("auroc", "auroc_within_cohort", "c_index", "c_index_within_cohort"):
        return 0.5
    classes = result.task_info.get(task, {}).get("n_per_class", {})
    return 1.0 / len(classes) if metric == "macro_f1" and classes else float("nan")


def plot_task_bars(result: BenchResult, path: str | Path) -> Path:
    """One panel per task: a bar per model (mean) with its interval of the mean.

    Every panel has the same fixed 0-1 axis, so small differences are not blown up; the
    chance level is dashed and, on pan-cancer mutation tasks, cohort identity alone dotted.
    """
    return _save(task_bars_figure(result), Path(path))


def task_bars_figure(result: BenchResult) -> Any:
    """The matplotlib Figure of :func:`plot_task_bars`."""
    lb = result.leaderboard()
    tasks = list(dict.fromkeys(lb["task"]))
    models = list(dict.fromkeys(lb["model"]))
    ncols = min(4, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig = _canvas(3.2 * ncols, 2.4 * nrows + 0.6)
    colors = [f"C{i % 10}" for i in range(len(models))]
    for k, task in enumerate(tasks):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        part = lb[lb["task"] == task].set_index("model").reindex(models)
        x = np.arange(len(models))
        mean = part["mean"].to_numpy(dtype=float)
        lo = np.where(np.isfinite(part["ci_low"]), part["ci_low"], mean)
        hi = np.where(np.isfinite(part["ci_high"]), part["ci_high"], mean)
        err = np.vstack([np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)])
        ax.bar(x, mean, yerr=np.nan_to_num(err), color=colors, capsize=3)
        ax.set_ylim(0.0, 1.0)
        metric = str(part["metric"].dropna().iloc[0])
        chance = chance_level(result, task, metric)
        if math.isfinite(chance):
            ax.axhline(chance, color="0.3", linestyle="--", linewidth=0.9, label="chance")
        ref = part["cohort_only"].dropna()
        if not ref.empty:
            ax.axhline(ref.iloc[0], color="C3", linestyle=":", linewidth=1.2, label="cohort only")
        ax.set_xticks(x, models, rotation=45, ha="right", fontsize=7)
        flag = " †" if part["few_test_cases"].dropna().any() else ""
        ax.set_title(task + flag, fontsize=8)
        ax.set_ylabel(_METRIC_NAMES.get(metric, metric), fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        if k == 0:
            ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(
        f"mean over splits, bars: {round(100 * result.config.ci_level)}% interval of the mean; "
        "dashed: chance (AUROC/C-index 0.5, macro-F1 1/k); dotted: cohort identity alone; "
        "† few test cases",
        fontsize=7,
    )
    fig.tight_layout()
    return fig


def plot_heatmap(result: BenchResult, path: str | Path) -> Path:
    """Model x task heat map of the headline metric's mean, annotated; colour scale fixed to
    0-1 for every task, so a colour means the same score everywhere."""
    return _save(heatmap_figure(result), Path(path))


def heatmap_figure(result: BenchResult) -> Any:
    """The matplotlib Figure of :func:`plot_heatmap`."""
    lb = result.leaderboard()
    tasks = list(dict.fromkeys(lb["task"]))
    models = list(dict.fromkeys(lb["model"]))
    grid = lb.pivot(index="model", columns="task", values="mean").reindex(
        index=models, columns=tasks
    )
    fig = _canvas(max(4.0, 0.55 * len(tasks) + 2), max(2.0, 0.45 * len(models) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(np.arange(len(tasks)), tasks, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(np.arange(len(models)), models, fontsize=8)
    for i in range(len(models)):
        for j in range(len(tasks)):
            v = grid.iat[i, j]
            if np.isfinite(v):
                color = "k" if v > 0.6 else "w"  # readable on viridis' bright end
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color=color)
    ax.set_title("headline metric, mean over splits (colour scale 0-1)", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- files


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("bulkfm", "numpy", "scipy", "pandas", "scikit-learn", "anndata", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def write_report(
    result: BenchResult, out_dir: str | Path, *, plots: bool = True
) -> dict[str, Path]:
    """Write every output file (see the module docstring); returns name -> path."""
    out = check_output_dir(out_dir, flag="--out / out_dir=")
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "leaderboard_csv": _write_csv(result.leaderboard(), out / "leaderboard.csv"),
        "summary_csv": _write_csv(result.summary, out / "summary.csv"),
        "scores_csv": _write_csv(result.scores, out / "scores.csv"),
        "per_class_csv": _write_csv(result.per_class_summary(), out / "per_class.csv"),
        "leaderboard_md": write_text(leaderboard_markdown(result), out / "leaderboard.md"),
    }
    record = {**result.metadata(), "versions": _versions()}
    files["run_json"] = write_text(
        json.dumps(record, indent=1, sort_keys=True, default=_json_default) + "\n",
        out / "run.json",
    )
    if plots and not result.summary.empty:
        files["task_bars"] = plot_task_bars(result, out / "plots" / "task_bars.png")
        files["heatmap"] = plot_heatmap(result, out / "plots" / "heatmap.png")
    return files


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
