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
    model x task x metric with mean, std (ddof=1) over splits and the interval of the
    mean (``config.ci_method``). Rows with ``reference`` True belong to the cohort-identity
    probe of pan-cancer mutation tasks (model ``"cohort identity"``), not to a model.
    ``per_class``: precision, recall, F1 and support of every cancer type per model and
    split.
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
    per_class: pd.DataFrame = field(default_factory=pd.DataFrame)

    def _model_rows(self) -> pd.DataFrame:
        s = self.summary
        return s[~s["reference"].astype(bool)] if "reference" in s.columns else s

    def leaderboard(self) -> pd.DataFrame:
        """Headline metric of every model and task: mean, std and interval over splits.

        Pan-cancer mutation tasks add ``cohort_only`` (the same probe on one-hot cohort
        labels, same splits: what cohort identity alone scores) and ``cohort_adjusted``
        with its interval (the model's AUROC over mutated / wild-type pairs of one
        cohort); NaN elsewhere. ``few_test_cases``: some test set held fewer than
        ``min_test_cases`` patients of a class, with an event or censored.
        """
        cols = ["model", "task", "family", "metric", "mean", "std", "ci_low", "ci_high", "n_splits"]
        rows = self._model_rows()
        lb = rows[rows["primary"]][cols].reset_index(drop=True)
        adjusted = rows[rows["metric"] == "auroc_within_cohort"][
            ["model", "task", "mean", "ci_low", "ci_high"]
        ].rename(
            columns={
                "mean": "cohort_adjusted",
                "ci_low": "cohort_adjusted_ci_low",
                "ci_high": "cohort_adjusted_ci_high",
            }
        )
        lb = lb.merge(adjusted, on=["model", "task"], how="left")
        s = self.summary
        if "reference" in s.columns:
            ref = s[s["reference"].astype(bool) & s["primary"]][["task", "mean"]]
            lb = lb.merge(ref.rename(columns={"mean": "cohort_only"}), on="task", how="left")
        else:
            lb["cohort_only"] = float("nan")
        lb["few_test_cases"] = [
            bool(self.task_info.get(t, {}).get("few_test_cases", False)) for t in lb["task"]
        ]
        order = [*cols, "cohort_only", "cohort_adjusted", "cohort_adjusted_ci_low"]
        order += ["cohort_adjusted_ci_high", "few_test_cases"]
        return lb[order]

    def per_class_summary(self) -> pd.DataFrame:
        """Per model and cancer type: mean precision, recall, F1 over splits, test support."""
        if self.per_class.empty:
            return pd.DataFrame(
                columns=["model", "task", "class", "precision", "recall", "f1", "support"]
            )
        agg = {"precision": "mean", "recall": "mean", "f1": "mean", "support": "mean"}
        return self.per_class.groupby(["model", "task", "class"], sort=False).agg(agg).reset_index()

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
            "reference": {
                "cohort identity": "pan-cancer mutation tasks: the same probe on one-hot "
                "cohort labels over the same splits (what cohort identity alone scores)"
            },
            "timings_s": self.timings,
        }

    def write(self, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
        """Leaderboard CSV + Markdown, per-split scores, run JSON and plots (atomic)."""
        from bulkfm.bench.report import write_report  # report reads results, never the reverse

        return write_report(self, out_dir, plots=plots)
