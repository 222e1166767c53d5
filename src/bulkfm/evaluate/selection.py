"""Which samples a task uses, with which labels, groups and splits.

Every step that drops samples records why in ``exclusions`` (and warns or logs), so the
report says how the analysed set came about. One split list per task is built here
and handed to every arm: differences between arms then come from the models, not from
which patients happened to be tested.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bulkfm.data.splits import Split, repeated_holdout, survival_strata
from bulkfm.errors import BulkfmWarning, ClinicalMatchError, ConfigError, SplitError
from bulkfm.evaluate.results import SplitInfo
from bulkfm.metrics import validate_survival
from bulkfm.tasks import check_group_sizes
from bulkfm.tasks.survival import valid_survival_mask

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.evaluate.config import DataSection, EvaluateConfig

logger = logging.getLogger(__name__)

__all__ = [
    "SurvivalData",
    "TaskData",
    "classification_splits",
    "cohort_names",
    "drop_small_classes",
    "obs_column",
    "select_samples",
    "split_info",
    "split_seed",
    "survival_data",
    "survival_splits",
    "task_data",
]


@dataclass
class TaskData:
    """The samples a task uses, in one fixed order that every split indexes."""

    adata: ad.AnnData
    labels: np.ndarray
    groups: np.ndarray | None
    ids: np.ndarray

    def subset(self, keep: np.ndarray) -> TaskData:
        return TaskData(
            self.adata[keep],
            self.labels[keep],
            None if self.groups is None else self.groups[keep],
            self.ids[keep],
        )


@dataclass
class SurvivalData:
    """The task's samples with a usable survival record, and their cohorts."""

    task: TaskData
    time: np.ndarray
    event: np.ndarray
    cohorts: np.ndarray

    def subset(self, keep: np.ndarray) -> SurvivalData:
        return SurvivalData(
            self.task.subset(keep), self.time[keep], self.event[keep], self.cohorts[keep]
        )


def obs_column(adata: ad.AnnData, key: str, what: str) -> pd.Series:
    """``adata.obs[key]``, or an error naming the config entry ``data.<what>`` to fix."""
    if key not in adata.obs:
        raise ConfigError(
            f"adata.obs has no column {key!r} ({what}); available: {list(adata.obs.columns)[:15]}"
            f"; set data.{what} to one of them"
        )
    return adata.obs[key]


def select_samples(
    adata: ad.AnnData, data: DataSection, exclusions: dict[str, Any] | None = None
) -> ad.AnnData:
    """Samples matching ``data.select``, one per ``data.dedupe_key`` value, with a label.

    Every step that drops samples is recorded in ``exclusions`` (and logged), so a report
    says how the analysed set came about.
    """
    record = exclusions if exclusions is not None else {}
    keep = np.ones(adata.n_obs, dtype=bool)
    for key, wanted in data.select.items():
        values = obs_column(adata, key, f"select.{key}").astype(str).to_numpy()
        allowed = [str(w) for w in (wanted if isinstance(wanted, list | tuple) else [wanted])]
        keep &= np.isin(values, allowed)
    record["select"] = {
        "rules": dict(data.select),
        "n_before": adata.n_obs,
        "n_after": int(keep.sum()),
    }
    if not keep.any():
        raise ConfigError(
            f"no sample matches data.select={data.select}; check the values (obs columns hold "
            "e.g. sample_type 'tumor', study 'TCGA')"
        )
    if data.dedupe_key and data.dedupe_key in adata.obs:
        key_values = adata.obs[data.dedupe_key].astype(str).to_numpy()
        # among the selected samples only: a duplicate outside the selection does not count
        dup = pd.Series(np.where(keep, key_values, None)).duplicated().to_numpy() & keep
        if dup.any():
            names = adata.obs_names[dup]
            record["dedupe"] = {
                "key": data.dedupe_key,
                "n_dropped": int(dup.sum()),
                "examples": [str(n) for n in names[:5]],
            }
            logger.info(
                "kept the first of each %s: dropped %d duplicate(s), e.g. %s",
                data.dedupe_key,
                int(dup.sum()),
                list(names[:3]),
            )
            keep &= ~dup
    labels = obs_column(adata, data.label_key, "label_key")
    unlabelled = labels.isna().to_numpy() & keep
    if unlabelled.any():
        warnings.warn(
            f"{int(unlabelled.sum())} selected samples have no {data.label_key!r} and are left out",
            BulkfmWarning,
            stacklevel=2,
        )
        record["unlabelled"] = int(unlabelled.sum())
        keep &= ~unlabelled
    return adata[keep]


def task_data(adata: ad.AnnData, data: DataSection) -> TaskData:
    """Labels, patient groups (a sample without one is its own group) and ids."""
    labels = obs_column(adata, data.label_key, "label_key").astype(str).to_numpy()
    ids = adata.obs_names.astype(str).to_numpy()
    groups = None
    if data.group_key is not None:
        raw = obs_column(adata, data.group_key, "group_key")
        groups = np.where(raw.isna().to_numpy(), ids, raw.astype(str).to_numpy()).astype(str)
    return TaskData(adata, labels, groups, ids)


def drop_small_classes(
    task: TaskData, n_needed: int, drop: bool, record: dict[str, Any]
) -> TaskData:
    """Classes with fewer patients than the splits need: an error naming them, or dropped."""
    frame = pd.DataFrame(
        {"y": task.labels, "g": task.groups if task.groups is not None else task.ids}
    )
    patients = frame.groupby("y")["g"].nunique()
    small = patients[patients < n_needed]
    if small.empty:
        return task
    if not drop:
        check_group_sizes(
            task.labels,
            task.groups,
            n_needed,
            context="the 80/20 stratified, patient-grouped splits",
            fix="drop or merge these classes, or set data.drop_small_classes: true to leave "
            "them out with a warning",
        )
    reasons = {c: f"{int(n)} patient(s) < {n_needed} needed" for c, n in small.items()}
    warnings.warn(
        f"left out {len(reasons)} class(es) with too few patients for the splits: "
        + "; ".join(f"{c}: {r}" for c, r in reasons.items()),
        BulkfmWarning,
        stacklevel=3,
    )
    record["small_classes"] = reasons
    keep = ~np.isin(task.labels, list(reasons))
    if np.unique(task.labels[keep]).size < 2:
        raise SplitError(
            f"fewer than two classes left after dropping small ones ({sorted(reasons)}); "
            "add samples or classify a different label"
        )
    return task.subset(keep)


def survival_data(config: EvaluateConfig, task: TaskData, record: dict[str, Any]) -> SurvivalData:
    """The task's samples with a positive time and a 0/1 event; the rest are recorded."""
    data = config.data
    time_raw = obs_column(task.adata, data.time_key, "time_key").to_numpy(dtype=object)
    event_raw = obs_column(task.adata, data.event_key, "event_key").to_numpy(dtype=object)
    valid = valid_survival_mask(time_raw, event_raw)
    if not valid.all():
        record["survival"] = {
            "n_excluded": int((~valid).sum()),
            "reason": "missing/non-positive survival time or missing event",
            "ids": task.ids[~valid].tolist(),
        }
    if not valid.any():
        raise ClinicalMatchError(
            f"no selected sample has a usable survival record ({data.time_key} > 0 and "
            f"{data.event_key} 0/1); join survival data (bulkfm data build --survival) first"
        )
    t, e = validate_survival(time_raw[valid], event_raw[valid])
    cohorts = obs_column(task.adata, data.cohort_key, "cohort_key").astype(str).to_numpy()
    return SurvivalData(task.subset(valid), t, e.astype(np.int8), cohorts[valid])


def classification_splits(config: EvaluateConfig, task: TaskData) -> list[Split]:
    """``protocol.n_seeds`` patient-grouped hold-outs stratified by class."""
    p = config.protocol
    return repeated_holdout(
        task.labels, task.groups, seeds=range(p.seed, p.seed + p.n_seeds), test_size=p.test_size
    )


def survival_splits(
    config: EvaluateConfig, sd: SurvivalData, stratify: str | None = None
) -> list[Split]:
    """Patient-grouped hold-outs stratified by the event (or by cohort and event)."""
    p = config.protocol
    strata = survival_strata(sd.event)
    if (stratify or p.survival_strata) == "cohort_event":
        strata = np.char.add(np.char.add(sd.cohorts.astype(str), "|"), strata.astype(str))
    return repeated_holdout(
        strata,
        sd.task.groups,
        seeds=range(p.seed, p.seed + p.n_seeds),
        test_size=p.test_size,
    )


def split_seed(split: Split) -> int:
    """The seed of the models trained on ``split``: the protocol's splits always carry one."""
    if split.seed is None:
        raise SplitError(f"split {split.name!r} has no seed; build it with repeated_holdout")
    return split.seed


def split_info(splits: Sequence[Split]) -> list[SplitInfo]:
    """Name, seed and sizes of each split, for results.json."""
    return [SplitInfo(s.name, split_seed(s), len(s.train), len(s.test)) for s in splits]


def cohort_names(requested: list[str], available: np.ndarray) -> list[str]:
    """``requested`` cohorts (``["all"]``: every one), checked against ``available``."""
    names = sorted(pd.unique(available).tolist())
    if requested == ["all"]:
        return names
    unknown = sorted(set(requested) - set(names))
    if unknown:
        raise ConfigError(
            f"cohorts {unknown} are not among the survival samples' cohorts {names}; fix "
            "tasks.per_cohort_survival / tasks.transfer"
        )
    return list(requested)
