"""Benchmark settings in one validated dataclass (recorded verbatim with every run)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkfm.config import check_int
from bulkfm.errors import ConfigError
from bulkfm.tasks.probes import ProbeConfig

__all__ = ["CI_METHODS", "BenchConfig", "check_int"]

#: "test": bootstrap each split's test set (Owkin protocol), report the mean bounds.
#: "splits": bootstrap the mean over the split scores (cheap; split variability only).
CI_METHODS = ("test", "splits")


def _check_key(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty obs column name, got {value!r}")
    return value


@dataclass(frozen=True)
class BenchConfig:
    """Everything that decides a benchmark's numbers.

    Splits: ``n_splits`` patient-grouped hold-outs (seeds ``0..n_splits-1`` unless
    ``seeds`` is given) with ``test_size`` of the patients in test, stratified by
    the task's class, mutation status or event. Tasks below ``min_positives`` /
    ``min_negatives`` / ``min_events`` *patients* are skipped with the reason;
    cancer types with fewer than ``min_class_patients`` patients are left out of
    the cancer-type task. ``sample_type`` keeps only samples of that type
    (``None``: all). The survival columns hold one endpoint, the one the AnnData
    was built for; ``endpoint`` (if set) must match it.
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
    cohort_key: str = "cohort"
    patient_key: str = "patient"
    time_key: str = "survival_time"
    event_key: str = "survival_event"
    endpoint: str | None = None
    ci_method: str = "splits"
    n_boot: int = 1000
    ci_level: float = 0.95
    seed: int = 0
    blas_threads: int | None = 1
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_int("n_splits", self.n_splits, 1)
        if not 0.0 < float(self.test_size) < 1.0:
            raise ConfigError(f"test_size must be between 0 and 1, got {self.test_size!r}")
        if self.seeds is not None:
            seeds = tuple(check_int("seeds entry", s, 0) for s in self.seeds)
            if not seeds:
                raise ConfigError("seeds is empty; leave it unset to use 0..n_splits-1")
            object.__setattr__(self, "seeds", seeds)
            object.__setattr__(self, "n_splits", len(seeds))
        for name in ("min_positives", "min_negatives", "min_events", "min_class_patients"):
            check_int(name, getattr(self, name), 1)
        check_int("n_boot", self.n_boot, 1)
        check_int("seed", self.seed, 0)
        if self.blas_threads is not None:
            check_int("blas_threads", self.blas_threads, 1)
        for name in ("cohort_key", "patient_key", "time_key", "event_key"):
            _check_key(name, getattr(self, name))
        if self.ci_method not in CI_METHODS:
            raise ConfigError(f"ci_method must be one of {CI_METHODS}, got {self.ci_method!r}")
        if not 0.5 <= float(self.ci_level) < 1.0 or not math.isfinite(self.ci_level):
            raise ConfigError(f"ci_level must be in [0.5, 1), e.g. 0.95; got {self.ci_level!r}")
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

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchConfig:
        """Build from a plain mapping (e.g. YAML); unknown keys are an error naming the known."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown benchmark setting(s) {unknown}; known: {sorted(known)}")
        kw = {
            k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
            for k, v in data.items()
        }
        return cls(**kw)
