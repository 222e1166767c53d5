"""Benchmark settings: one validated dataclass (recorded verbatim with every run) and the
layout of a benchmark YAML file around it.

Reading, ``--set`` overrides and unknown-key errors come from :mod:`bulkfm.config`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bulkfm import schema as keys
from bulkfm.config import (
    ConfigMixin,
    check_choice,
    check_int,
    check_nonempty_str,
    check_number,
    check_probability,
)
from bulkfm.errors import ConfigError
from bulkfm.tasks.probes import ProbeConfig

__all__ = ["CI_METHODS", "BenchConfig", "BenchFile", "name_list"]

#: Interval of the mean over the splits: the corrected resampled t-interval
#: (:func:`bulkfm.metrics.corrected_t_interval`) with the correlation between two splits'
#: scores assumed by :func:`bulkfm.metrics.split_correlation`: "calibrated" (default,
#: 1 - (1 - test_size)^2, which covered chance at about the nominal rate in signal-free
#: simulations) or "nadeau_bengio" (test_size, the published correction, narrower).
CI_METHODS: tuple[str, ...] = ("calibrated", "nadeau_bengio")
#: Methods of earlier versions, and why they are gone (both ignored that random splits
#: overlap, or described one split rather than the mean).
_REMOVED_CI = {
    "splits": "a bootstrap of the split scores treats overlapping splits as independent "
    "(it gave a random control an interval excluding 0.5)",
    "test": "averaged per-split test-set bootstraps describe one split's test estimate, "
    "not the mean over splits",
}


@dataclass(frozen=True)
class BenchConfig(ConfigMixin):
    """Everything that decides a benchmark's numbers.

    Splits: ``n_splits`` patient-grouped hold-outs (seeds ``0..n_splits-1`` unless
    ``seeds`` is given) with ``test_size`` of the patients in test, stratified by
    the task's class, mutation status or event. Tasks below ``min_positives`` /
    ``min_negatives`` / ``min_events`` *patients* are skipped with the reason;
    cancer types with fewer than ``min_class_patients`` patients are left out of
    the cancer-type task. ``sample_type`` keeps only samples of that type
    (``None``: all). The survival columns hold one endpoint, the one the AnnData
    was built for; ``endpoint`` (if set) must match it.

    Intervals: ``ci_level`` intervals of the mean over splits by ``ci_method`` (see
    ``CI_METHODS``). A task whose test sets hold fewer than ``min_test_cases`` patients
    of a class (or with an event / censored) in some split is flagged in the log and the
    leaderboard: its scores rest on a handful of cases.

    Speed (never the numbers): ``workers`` processes share the (model, task, split)
    units of a run (1: all in this process); each caps its BLAS and torch threads at
    ``blas_threads`` (``None``: the cores divided among the workers). ``cache_dir`` keeps
    frozen models' embeddings between runs.
    """

    n_splits: int = 10
    test_size: float = 0.2
    seeds: tuple[int, ...] | None = None
    inner_folds: int = 3
    c_grid: tuple[float, ...] = ProbeConfig.c_grid
    cox_alpha_grid: tuple[float, ...] = ProbeConfig.cox_alpha_grid
    max_iter: int = 500
    min_positives: int = 20
    min_negatives: int = 20
    min_events: int = 20
    min_class_patients: int = 20
    sample_type: str | None = "tumor"
    cohort_key: str = keys.COHORT
    patient_key: str = keys.PATIENT
    time_key: str = keys.SURVIVAL_TIME
    event_key: str = keys.SURVIVAL_EVENT
    endpoint: str | None = None
    ci_method: str = "calibrated"
    ci_level: float = 0.95
    min_test_cases: int = 5
    seed: int = 0
    blas_threads: int | None = 1
    cache_dir: str | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        check_int("n_splits", self.n_splits, 1)
        check_probability("test_size", self.test_size, hint="e.g. 0.2")
        if self.seeds is not None:
            seeds = tuple(check_int("seeds entry", s, 0) for s in self.seeds)
            if not seeds:
                raise ConfigError("seeds is empty; leave it unset to use 0..n_splits-1")
            object.__setattr__(self, "seeds", seeds)
            object.__setattr__(self, "n_splits", len(seeds))
        for name in ("min_positives", "min_negatives", "min_events", "min_class_patients"):
            check_int(name, getattr(self, name), 1)
        check_int("min_test_cases", self.min_test_cases, 1)
        check_int("seed", self.seed, 0)
        if self.blas_threads is not None:
            check_int("blas_threads", self.blas_threads, 1)
        check_int(
            "workers", self.workers, 1, hint="--workers N / bench.workers=N; 1 runs in-process"
        )
        for name in ("cohort_key", "patient_key", "time_key", "event_key"):
            check_nonempty_str(name, getattr(self, name), hint="name an obs column")
        if self.ci_method in _REMOVED_CI:
            raise ConfigError(
                f"ci_method {self.ci_method!r} was removed: {_REMOVED_CI[self.ci_method]}; "
                f"use one of {list(CI_METHODS)} (--ci / ci_method=; default 'calibrated', "
                "see docs/benchmark.md)"
            )
        check_choice("ci_method", self.ci_method, CI_METHODS)
        check_number("ci_level", self.ci_level, low=0.5, high=1.0, high_open=True, hint="e.g. 0.95")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", str(Path(os.fspath(self.cache_dir))))
        # The probe config validates the grids, folds and iterations.
        probe = self.probe_config()
        object.__setattr__(self, "c_grid", probe.c_grid)
        object.__setattr__(self, "cox_alpha_grid", probe.cox_alpha_grid)

    def probe_config(self) -> ProbeConfig:
        return ProbeConfig(
            inner_folds=self.inner_folds,
            c_grid=self.c_grid,
            cox_alpha_grid=self.cox_alpha_grid,
            max_iter=self.max_iter,
            seed=self.seed,
        )

    def split_seeds(self) -> tuple[int, ...]:
        return self.seeds if self.seeds is not None else tuple(range(self.n_splits))


@dataclass(frozen=True)
class BenchFile(ConfigMixin):
    """A benchmark YAML file: the settings plus which models and tasks run.

    ``models``, ``tasks``, ``genes``, ``cohorts``: a list or one comma-separated string
    (as on the command line); ``tasks: auto`` runs every feasible task.
    ``model_args``: per model, its constructor settings (``pca: {n_components: 128}``).
    """

    bench: BenchConfig = field(default_factory=BenchConfig)
    models: str | list[str] | None = None
    model_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: str | list[str] | None = None
    genes: str | list[str] | None = None
    cohorts: str | list[str] | None = None

    def model_names(self, default: Sequence[str] = ()) -> list[str]:
        """``models`` as a list of names; ``default`` when the file names none."""
        return name_list(self.models) or list(default)

    def gene_names(self) -> list[str] | None:
        """``genes`` as a list; ``None`` (every mutation column) when unset."""
        return name_list(self.genes) or None

    def cohort_names(self) -> list[str] | None:
        """``cohorts`` as a list; ``None`` (every cohort) when unset."""
        return name_list(self.cohorts) or None


def name_list(value: str | Sequence[str] | None) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]``: a list as the YAML or a flag spells it."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]
