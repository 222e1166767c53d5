"""The typed outcome of a benchmark run, shared by the runner that fills it and the report
that writes it (neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from bulkfm.bench.config import BenchConfig
from bulkfm.tasks.spec import TaskSpec

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["BenchResult"]


@dataclass
class BenchResult:
    """Scores of one benchmark run and everything needed to reproduce it.

    ``scores``: one row per model x task x split x metric. ``summary``: one row per
    model x task x metric with mean, std (ddof=1) over splits and the 95% CI.
    """

    scores: pd.DataFrame
    summary: pd.DataFrame
    tasks: list[TaskSpec]
    task_info: dict[str, dict[str, Any]]
    skipped: dict[str, str]
    config: BenchConfig
    data_fingerprint: str
    models: list[dict[str, Any]]
    endpoint: str | None = None
    n_samples: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def leaderboard(self) -> pd.DataFrame:
        """Headline metric of every task: model, task, metric, mean, std, CI, splits."""
        cols = ["model", "task", "family", "metric", "mean", "std", "ci_low", "ci_high", "n_splits"]
        return self.summary[self.summary["primary"]][cols].reset_index(drop=True)

    def metadata(self) -> dict[str, Any]:
        """JSON-able record of the run (config, data and model fingerprints, tasks)."""
        return {
            "config": self.config.to_dict(),
            "data_fingerprint": self.data_fingerprint,
            "n_samples": self.n_samples,
            "endpoint": self.endpoint,
            "models": self.models,
            "tasks": [{**t.to_dict(), "info": self.task_info.get(t.name, {})} for t in self.tasks],
            "skipped_tasks": self.skipped,
            "timings_s": self.timings,
        }

    def write(self, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
        """Leaderboard CSV + Markdown, per-split scores, run JSON and plots (atomic)."""
        from bulkfm.bench.report import write_report  # report reads results, never the reverse

        return write_report(self, out_dir, plots=plots)
