"""Which samples a task uses, with which labels, groups and splits.

The tasks are :class:`bulkfm.tasks.TaskData`, the benchmark's task object: this module
only decides which samples they hold (the paper's selection rules). Every step that drops
samples records why in :class:`~bulkfm.evaluate.results.Exclusions` (and warns or logs),
so the report says how the analysed set came about. One split list per task is built
here and handed to every arm: differences between arms then come from the models, not
from which patients happened to be tested.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bulkfm.data.splits import Split, repeated_holdout, survival_strata
from bulkfm.errors import BulkfmWarning, ClinicalMatchError, ConfigError, SplitError
from bulkfm.evaluate.results import (
    DedupeStep,
    Exclusions,
    SelectionStep,
    SplitInfo,
    SurvivalExclusion,
)
from bulkfm.metrics import validate_survival
from bulkfm.tasks import TaskData, check_group_sizes
from bulkfm.tasks.survival import valid_survival_mask

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.evaluate.config import DataSection, EvaluateConfig

logger = logging.getLogger(__name__)

__all__ = [
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


def obs_column(adata: ad.AnnData, key: str, what: str) -> pd.Series:
    """``adata.obs[key]``, or an error naming the config entry ``data.<what>`` to fix."""
    if key not in adata.obs:
        raise ConfigError(
            f"adata.obs has no column {key!r} ({what}); available: {list(adata.obs.columns)[:15]}"
            f"; set data.{what} to one of them"
        )
    return adata.obs[key]


def select_samples(
    adata: ad.AnnData, data: DataSection, exclusions: Exclusions | None = None
) -> ad.AnnData:
    """Samples matching ``data.select``, one per ``data.dedupe_key`` value, with a label.

    Every step that drops samples is recorded in ``exclusions`` (and logged), so a report
    says how the analysed set came about.
    """
    record = exclusions if exclusions is not None else Exclusions()
    keep = np.ones(adata.n_obs, dtype=bool)
    for key, wanted in data.select.items():
        values = obs_column(adata, key, f"select.{key}").astype(str).to_numpy()
        allowed = [str(w) for w in (wanted if isinstance(wanted, list | tuple) else [wanted])]
        keep &= np.isin(values, allowed)
    record.select = SelectionStep(
        rules=dict(data.select), n_before=adata.n_obs, n_after=int(keep.sum())
    )
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
            record.dedupe = DedupeStep(
                key=data.dedupe_key,
                n_dropped=int(dup.sum()),
                examples=[str(n) for n in names[:5]],
            )
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
        record.unlabelled = int(unlabelled.sum())
        keep &= ~unlabelled
    return adata[keep]


def task_data(adata: ad.AnnData, data: DataSection) -> TaskData:
    """The classification task of ``data.label_key`` over ``adata``'s samples, with their
    patient groups (a sample without one, or every sample when ``data.group_key`` is
    None, is its own patient)."""
    labels = obs_column(adata, data.label_key, "label_key").astype(str).to_numpy()
    groups = None
    if data.group_key is not None:
        groups = obs_column(adata, data.group_key, "group_key").to_numpy(dtype=object)
    return TaskData.from_labels(labels, ids=adata.obs_names, groups=groups, adata=adata)


def drop_small_classes(task: TaskData, n_needed: int, drop: bool, record: Exclusions) -> TaskData:
    """Classes with fewer patients than the splits need: an error naming them, or dropped."""
    labels = task.labels
    frame = pd.DataFrame({"y": labels, "g": task.groups})
    patients = frame.groupby("y")["g"].nunique()
    small = patients[patients < n_needed]
    if small.empty:
        return task
    if not drop:
        check_group_sizes(
            labels,
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
    record.small_classes = reasons
    keep = ~np.isin(labels, list(reasons))
    if np.unique(labels[keep]).size < 2:
        raise SplitError(
            f"fewer than two classes left after dropping small ones ({sorted(reasons)}); "
            "add samples or classify a different label"
        )
    return task.subset(keep)


def survival_data(config: EvaluateConfig, task: TaskData, record: Exclusions) -> TaskData:
    """The survival task of ``task``'s samples with a positive time and a 0/1 event (times,
    events, patient groups and cohorts); the rest are recorded."""
    data = config.data
    adata = task.rows()
    time_raw = obs_column(adata, data.time_key, "time_key").to_numpy(dtype=object)
    event_raw = obs_column(adata, data.event_key, "event_key").to_numpy(dtype=object)
    valid = valid_survival_mask(time_raw, event_raw)
    if not valid.all():
        record.survival = SurvivalExclusion(
            n_excluded=int((~valid).sum()),
            reason="missing/non-positive survival time or missing event",
            ids=task.ids[~valid].tolist(),
        )
    if not valid.any():
        raise ClinicalMatchError(
            f"no selected sample has a usable survival record ({data.time_key} > 0 and "
            f"{data.event_key} 0/1); join survival data (bulkfm data build --survival) first"
        )
    t, e = validate_survival(time_raw[valid], event_raw[valid])
    cohorts = obs_column(adata, data.cohort_key, "cohort_key").astype(str).to_numpy()
    return TaskData.from_survival(
        t,
        e,
        ids=task.ids[valid],
        groups=task.groups[valid],
        cohorts=cohorts[valid],
        adata=adata[valid],
    )


def classification_splits(config: EvaluateConfig, task: TaskData) -> list[Split]:
    """``protocol.n_seeds`` patient-grouped hold-outs stratified by class."""
    p = config.protocol
    return repeated_holdout(
        task.labels, task.groups, seeds=range(p.seed, p.seed + p.n_seeds), test_size=p.test_size
    )


def survival_splits(
    config: EvaluateConfig, sd: TaskData, stratify: str | None = None
) -> list[Split]:
    """Patient-grouped hold-outs stratified by the event (or by cohort and event)."""
    p = config.protocol
    strata = survival_strata(sd.event)
    if (stratify or p.survival_strata) == "cohort_event":
        strata = np.char.add(np.char.add(sd.cohort_labels, "|"), strata.astype(str))
    return repeated_holdout(
        strata,
        sd.groups,
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
