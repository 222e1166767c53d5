"""Figures of the evaluation report, drawn on Agg canvases.

Score axes span the metric's whole range [0, 1] and carry a dashed chance line (0.5 for a
C-index, the largest class's share for accuracy), so a bar's length reads as the score
and a gap of 0.02 does not look like a gap of 0.5, as it would on an axis zoomed to the
bars.

matplotlib is imported inside each function (the CLI must start without it), and figures
are built as ``Figure`` objects with their own Agg canvas rather than through pyplot, so
no global figure state leaks between reports or into a user's notebook.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.cluster.hierarchy import dendrogram

from bulkfm.errors import ConfigError
from bulkfm.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "confusion_figure",
    "per_cohort_figure",
    "png_bytes",
    "save_png",
    "scores_figure",
    "similarity_figure",
]


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def save_png(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write the figure as PNG atomically (a reader never sees half a file)."""
    path = Path(path)
    data = png_bytes(fig, dpi)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def confusion_figure(confusion: Any, labels: Sequence[Any], title: str = "") -> Figure:
    """Row-normalised confusion matrix (rows = truth) with the counts written in."""
    counts = np.asarray(confusion, dtype=np.float64)
    n = len(labels)
    if counts.shape != (n, n):
        raise ConfigError(f"confusion matrix {counts.shape} does not match {n} labels")
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    size = 1.8 + 0.45 * n
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(n), [str(x) for x in labels], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), [str(x) for x in labels], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    colour = "white" if share[i, j] > 0.5 else "black"
                    ax.text(
                        j,
                        i,
                        f"{int(counts[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color=colour,
                    )
    ax.set_title(title, fontsize=10)
    return fig


def scores_figure(
    scores: Mapping[str, tuple[float, float]],
    metric: str,
    chance: float,
    chance_label: str,
    title: str = "",
) -> Figure:
    """Horizontal bars: one score (mean ± std over splits) per model, on the full [0, 1]
    axis with the chance level drawn, so differences keep their true size."""
    if not scores:
        raise ConfigError("no scores to plot")
    if not 0.0 <= chance <= 1.0:
        raise ConfigError(f"chance level {chance} lies outside [0, 1]")
    models = list(scores)
    mean = [scores[m][0] for m in models]
    std = [0.0 if np.isnan(scores[m][1]) else scores[m][1] for m in models]
    fig = _figure(6.5, 1.0 + 0.38 * len(models))
    ax = fig.add_subplot()
    y = np.arange(len(models))[::-1]
    ax.barh(y, mean, xerr=std, color="tab:blue", alpha=0.8, capsize=2, height=0.6)
    ax.axvline(chance, color="grey", lw=1.0, ls="--", label=chance_label)
    ax.set_yticks(y, models, fontsize=8)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(f"{metric} (test, mean ± std over splits)")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.set_title(title, fontsize=10)
    return fig


def per_cohort_figure(
    scores: Mapping[str, Mapping[str, tuple[float, float]]], title: str = ""
) -> Figure:
    """Grouped bars: per-cohort C-index (mean ± std over splits) of each model."""
    models = list(scores)
    cohorts = sorted({c for per in scores.values() for c in per})
    if not models or not cohorts:
        raise ConfigError("no per-cohort C-index to plot")
    fig = _figure(max(5.0, 0.9 * len(cohorts) * max(1, len(models)) ** 0.5 + 2), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    x = np.arange(len(cohorts))
    for k, model in enumerate(models):
        mean = [scores[model].get(c, (np.nan, np.nan))[0] for c in cohorts]
        std = [scores[model].get(c, (np.nan, np.nan))[1] for c in cohorts]
        ax.bar(
            x + (k - (len(models) - 1) / 2) * width, mean, width, yerr=std, label=model, capsize=2
        )
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance (0.5)")
    ax.set_xticks(x, cohorts, rotation=45, ha="right")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("C-index (test, mean ± std)")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10)
    return fig


def similarity_figure(labels: Sequence[str], cosine: Any, linkage: Any, title: str = "") -> Figure:
    """Cosine-similarity heatmap of mean embeddings, ordered by the dendrogram drawn above."""
    sim = np.asarray(cosine, dtype=np.float64)
    link = np.asarray(linkage, dtype=np.float64)
    n = len(labels)
    if sim.shape != (n, n):
        raise ConfigError(f"similarity matrix {sim.shape} does not match {n} labels")
    size = 2.5 + 0.4 * n
    fig = _figure(size + 1.0, size + 1.2)
    grid = fig.add_gridspec(
        2, 2, height_ratios=[1, 4], width_ratios=[20, 1], hspace=0.02, wspace=0.05
    )
    ax_tree = fig.add_subplot(grid[0, 0])
    tree = dendrogram(
        link,
        ax=ax_tree,
        labels=list(labels),
        no_labels=True,
        color_threshold=0,
        above_threshold_color="k",
    )
    ax_tree.set_axis_off()
    order = tree["leaves"]
    ax = fig.add_subplot(grid[1, 0])
    image = ax.imshow(sim[np.ix_(order, order)], cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto")
    names = [str(labels[i]) for i in order]
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    fig.colorbar(image, cax=fig.add_subplot(grid[1, 1]), label="cosine similarity")
    ax_tree.set_title(title, fontsize=10)
    return fig
