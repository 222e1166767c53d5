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
    EventCounts,
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
    "event_counts",
    "obs_column",
    "select_samples",
    "split_info",
    "split_seed",
    "survival_data",
    "survival_exclusion_reasons",
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
    samples = frame.groupby("y").size()
    reasons = {
        c: f"{int(n)} patient(s), {int(samples[c])} sample(s); {n_needed} patients needed"
        for c, n in small.items()
    }
    warnings.warn(
        f"left out {len(reasons)} class(es) with too few patients for the splits: "
        + "; ".join(f"{c}: {r}" for c, r in reasons.items()),
        BulkfmWarning,
        stacklevel=3,
    )
    record.small_classes = reasons
    keep = ~np.isin(labels, list(reasons))
    record.small_class_samples = int((~keep).sum())
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
        by_reason = survival_exclusion_reasons(time_raw, event_raw)
        record.survival = SurvivalExclusion(
            n_excluded=int((~valid).sum()),
            reason="missing/non-positive survival time or missing event",
            ids=task.ids[~valid].tolist(),
            by_reason=by_reason,
        )
        if sum(by_reason.values()) != record.survival.n_excluded:  # the rules disagree
            raise ClinicalMatchError(
                f"survival exclusions {by_reason} do not add up to "
                f"{record.survival.n_excluded}; report this as a bug"
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


def survival_exclusion_reasons(time: np.ndarray, event: np.ndarray) -> dict[str, int]:
    """Samples without a usable survival record, each counted under its first reason
    (no usable time, time <= 0, no event), so the counts partition the excluded samples.

    A sample lacking both time and event is one sample, not two: a report that counts it
    under every reason adds up to more samples than were left out.
    """
    t = pd.to_numeric(pd.Series(np.asarray(time, dtype=object)), errors="coerce").to_numpy(
        dtype=np.float64
    )
    e = pd.to_numeric(pd.Series(np.asarray(event, dtype=object)), errors="coerce").to_numpy(
        dtype=np.float64
    )
    no_time = ~np.isfinite(t)
    non_positive = np.isfinite(t) & (t <= 0)
    no_event = np.isnan(e) & ~no_time & ~non_positive
    counts = {
        "missing or infinite time": int(no_time.sum()),
        "time <= 0": int(non_positive.sum()),
        "usable time but missing event": int(no_event.sum()),
    }
    return {k: v for k, v in counts.items() if v}


def event_counts(
    sd: TaskData, splits: Sequence[Split], threshold: int, what: str, *, warn: bool = True
) -> EventCounts:
    """Events in each split's test side, overall and per cohort; where fewer than
    ``threshold``, a line in ``few`` for the report and (``warn``) a warning with the same
    words (said once per run: the run de-duplicates warnings). ``what`` names the task."""
    cohorts = sd.cohort_labels
    names = sorted(pd.unique(cohorts).tolist())
    per_split = [int(sd.event[s.test].sum()) for s in splits]
    per_cohort = {
        c: [int(sd.event[s.test][cohorts[s.test] == c].sum()) for s in splits] for c in names
    }
    few: list[str] = []
    low = [n for n in per_split if n < threshold]
    if low:
        few.append(
            f"{what}: {len(low)} of {len(splits)} test splits hold fewer than {threshold} "
            f"events (fewest: {min(low)}); the C-index of such a split is imprecise"
        )
    if len(names) > 1:
        low_cohorts = {c: min(v) for c, v in per_cohort.items() if v and min(v) < threshold}
        if low_cohorts:
            few.append(
                f"{what}, per cohort: {len(low_cohorts)} of {len(names)} cohorts have fewer "
                f"than {threshold} events in a test split (fewest per split: "
                + ", ".join(f"{c} {n}" for c, n in low_cohorts.items())
                + "); their per-cohort, weighted and macro C-indexes and transfer scores "
                "rest on a handful of events"
            )
    for line in few if warn else ():
        warnings.warn(line, BulkfmWarning, stacklevel=2)
    return EventCounts(threshold=threshold, per_split=per_split, per_cohort=per_cohort, few=few)


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
