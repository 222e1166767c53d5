"""Leaderboards (CSV + Markdown), plots and the run record of a benchmark.

Files written into ``out_dir`` (each atomically):

- ``leaderboard.csv``: headline metric per model x task (mean, std, 95% CI, splits);
- ``leaderboard.md``: the same as tables (family averages, then per task), skipped
  tasks with reasons, and the settings;
- ``summary.csv``: every metric (secondary ones too) per model x task;
- ``scores.csv``: every metric of every split (for paired comparisons);
- ``run.json``: the exact config, data fingerprint, model fingerprints and settings,
  tasks with their sample counts, skipped tasks, timings, package versions;
- ``plots/task_bars.png`` (mean ± std per task) and ``plots/heatmap.png``
  (model x task). matplotlib is imported only here, through its Agg canvas, so
  no global backend is switched.
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
    "family_table",
    "leaderboard_markdown",
    "plot_heatmap",
    "plot_task_bars",
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
    def leaderboard(self) -> pd.DataFrame: ...
    def metadata(self) -> dict[str, Any]: ...


_METRIC_NAMES = {
    "macro_f1": "macro-F1",
    "auroc": "AUROC",
    "c_index": "C-index",
    "c_index_within_cohort": "C-index (within cohort)",
}


_GROUP_ORDER = (
    "cancer type (macro-F1)",
    "mutation, pan-cancer (AUROC)",
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
    """Mean of the task means within each task group (models x groups; ``n`` tasks per cell)."""
    lb = result.leaderboard()
    lb = lb.assign(group=[_group(t, f) for t, f in zip(lb["task"], lb["family"], strict=True)])
    agg = lb.groupby(["model", "group"], sort=False)["mean"].agg(["mean", "size"]).reset_index()
    table = agg.pivot(index="model", columns="group", values="mean")
    counts = agg.groupby("group")["size"].max()
    order = [g for g in _GROUP_ORDER if g in table.columns]
    table = table[order]
    table.columns = [f"{g} [{int(counts[g])} task{'s' if counts[g] > 1 else ''}]" for g in order]
    models = list(dict.fromkeys(lb["model"]))
    return table.loc[models]


def task_table(result: BenchResult, *, with_ci: bool = True) -> pd.DataFrame:
    """Tasks x models of ``mean ± std [CI]`` strings of the headline metric."""
    lb = result.leaderboard()
    models = list(dict.fromkeys(lb["model"]))
    rows = []
    for task, part in lb.groupby("task", sort=False):
        row: dict[str, Any] = {
            "task": task,
            "metric": _METRIC_NAMES.get(part["metric"].iloc[0], part["metric"].iloc[0]),
        }
        best = part["mean"].max()
        for _, r in part.iterrows():
            cell = _fmt(r["mean"], r["std"]) + (_ci(r["ci_low"], r["ci_high"]) if with_ci else "")
            if len(models) > 1 and r["mean"] == best:
                cell = f"**{cell}**"
            row[r["model"]] = cell
        rows.append(row)
    return pd.DataFrame(rows, columns=["task", "metric", *models])


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
    if config.ci_method == "test":
        return (
            f"{level}% CI: percentile bootstrap of each split's test set ({config.n_boot} "
            "resamples), bounds averaged over splits"
        )
    return (
        f"{level}% CI: percentile bootstrap of the mean over the split scores "
        f"({config.n_boot} resamples; reflects split-to-split variation only)"
    )


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
        f"- cells: mean ± std over splits; {_ci_text(result)}",
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


def plot_task_bars(result: BenchResult, path: str | Path) -> Path:
    """One panel per task: a bar per model (mean) with ±1 std error bars."""
    lb = result.leaderboard()
    tasks = list(dict.fromkeys(lb["task"]))
    models = list(dict.fromkeys(lb["model"]))
    ncols = min(4, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig = _canvas(3.2 * ncols, 2.4 * nrows + 0.4)
    colors = [f"C{i % 10}" for i in range(len(models))]
    for k, task in enumerate(tasks):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        part = lb[lb["task"] == task].set_index("model").reindex(models)
        x = np.arange(len(models))
        ax.bar(x, part["mean"], yerr=part["std"].fillna(0), color=colors, capsize=3)
        lo = np.nanmin(part["mean"] - part["std"].fillna(0))
        ax.set_ylim(max(0.0, min(0.45, lo - 0.05)), 1.0)
        ax.set_xticks(x, models, rotation=45, ha="right", fontsize=7)
        ax.set_title(task, fontsize=8)
        ax.set_ylabel(_METRIC_NAMES.get(part["metric"].dropna().iloc[0], ""), fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_heatmap(result: BenchResult, path: str | Path) -> Path:
    """Model x task heat map of the headline metric's mean, annotated."""
    lb = result.leaderboard()
    tasks = list(dict.fromkeys(lb["task"]))
    models = list(dict.fromkeys(lb["model"]))
    grid = lb.pivot(index="model", columns="task", values="mean").reindex(
        index=models, columns=tasks
    )
    fig = _canvas(max(4.0, 0.55 * len(tasks) + 2), max(2.0, 0.45 * len(models) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=0.4, vmax=1.0)
    ax.set_xticks(np.arange(len(tasks)), tasks, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(np.arange(len(models)), models, fontsize=8)
    for i in range(len(models)):
        for j in range(len(tasks)):
            v = grid.iat[i, j]
            if np.isfinite(v):
                color = "k" if v > 0.8 else "w"  # readable on viridis' bright end
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    return _save(fig, Path(path))


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
