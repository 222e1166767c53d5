"""A task's arrays: one :class:`TaskData` for the benchmark and the paper's evaluation.

:func:`prepare_task` turns a :class:`~bulkfm.tasks.spec.TaskSpec` and ``obs`` into
targets, patient groups and stratification labels, or says why the task cannot be
evaluated. Feasibility is counted in **patients**, not samples, because repeated
aliquots of one tumour are not independent evidence. The paper's evaluation, which
picks its samples by its own rules, builds the same object with
:meth:`TaskData.from_labels` / :meth:`TaskData.from_survival`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bulkfm import schema as keys
from bulkfm.data.clinical import mutation_status
from bulkfm.errors import ConfigError, SplitError
from bulkfm.tasks.spec import (
    TaskRules,
    TaskSelection,
    TaskSpec,
    cohort_names,
    expand_token,
    mutation_genes,
    obs_column,
)

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

__all__ = ["TaskData", "patient_ids", "prepare_task", "select_tasks"]


@dataclass
class TaskData:
    """The samples of one task in one fixed order that every split indexes.

    ``ids``: sample ids. ``y``: class codes into ``classes`` (multiclass, binary) or an
    (n, 2) float array of [time, event] (survival). ``groups``: patient ids (a sample
    without one is its own patient). ``strata``: the labels splits are stratified by.
    ``index``: positions of the rows in the data the task was prepared from, so
    :meth:`rows` finds them again. ``adata``: the rows themselves, when the caller
    keeps them with the task (the evaluation does; the benchmark embeds all samples
    once and indexes them). ``task`` is None for tasks not named by a
    :class:`TaskSpec` (e.g. the evaluation's ``label_key`` classification).
    """

    ids: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    strata: np.ndarray
    index: np.ndarray
    task: TaskSpec | None = None
    cohorts: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    adata: ad.AnnData | None = None

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_labels(
        cls,
        labels: Sequence[Any] | np.ndarray,
        *,
        ids: Sequence[str] | np.ndarray,
        groups: Sequence[Any] | np.ndarray | None = None,
        cohorts: Sequence[Any] | np.ndarray | None = None,
        adata: ad.AnnData | None = None,
        task: TaskSpec | None = None,
    ) -> TaskData:
        """A classification task from class labels (classes sorted as strings)."""
        names = np.asarray(labels).astype(str)
        classes = sorted(np.unique(names).tolist())
        codes = pd.Categorical(names, categories=classes).codes.astype(np.int64)
        return cls(
            ids=_ids(ids, names.size),
            y=codes,
            groups=_groups(groups, ids, names.size),
            strata=codes,
            index=np.arange(names.size),
            task=task,
            cohorts=_per_row(cohorts, names.size, "cohorts"),
            classes=classes,
            adata=adata,
        )

    @classmethod
    def from_survival(
        cls,
        time: Sequence[float] | np.ndarray,
        event: Sequence[float] | np.ndarray,
        *,
        ids: Sequence[str] | np.ndarray,
        groups: Sequence[Any] | np.ndarray | None = None,
        cohorts: Sequence[Any] | np.ndarray | None = None,
        strata: np.ndarray | None = None,
        adata: ad.AnnData | None = None,
        task: TaskSpec | None = None,
    ) -> TaskData:
        """A survival task (already validated times > 0, events 0/1); strata default to
        the event, which keeps the censoring fraction equal between train and test."""
        from bulkfm.data.splits import survival_strata

        t = np.asarray(time, dtype=np.float64)
        e = np.asarray(event, dtype=np.float64)
        return cls(
            ids=_ids(ids, t.size),
            y=np.column_stack([t, e]),
            groups=_groups(groups, ids, t.size),
            strata=survival_strata(e.astype(int)) if strata is None else np.asarray(strata),
            index=np.arange(t.size),
            task=task,
            cohorts=_per_row(cohorts, t.size, "cohorts"),
            adata=adata,
        )

    # ----------------------------------------------------------------- views
    @property
    def n(self) -> int:
        return int(self.ids.size)

    @property
    def spec(self) -> TaskSpec:
        """The :class:`TaskSpec`; an error for a task built without one."""
        if self.task is None:
            raise ConfigError("this TaskData was built without a TaskSpec; pass task=")
        return self.task

    @property
    def cohort_labels(self) -> np.ndarray:
        """Cohort of each row; an error for a task built without cohorts."""
        if self.cohorts is None:
            raise ConfigError("this TaskData was built without cohorts; pass cohorts=")
        return self.cohorts

    @property
    def is_survival(self) -> bool:
        return self.y.ndim == 2

    @property
    def labels(self) -> np.ndarray:
        """Class names per row (classification); the evaluation's ``labels``."""
        if self.is_survival:
            raise ConfigError("a survival task has times and events, not class labels")
        return np.asarray(self.classes, dtype=object)[self.y].astype(str)

    @property
    def time(self) -> np.ndarray:
        self._need_survival("time")
        return self.y[:, 0]

    @property
    def event(self) -> np.ndarray:
        self._need_survival("event")
        return self.y[:, 1].astype(np.int8)

    def _need_survival(self, what: str) -> None:
        if not self.is_survival:
            raise ConfigError(f"{what} exists for survival tasks only")

    def subset(self, keep: np.ndarray) -> TaskData:
        """The rows ``keep`` selects (boolean mask or positions), in that order; the
        class list stays, so codes keep their meaning."""
        keep = np.asarray(keep)
        return replace(
            self,
            ids=self.ids[keep],
            y=self.y[keep],
            groups=self.groups[keep],
            strata=self.strata[keep],
            index=self.index[keep],
            cohorts=None if self.cohorts is None else self.cohorts[keep],
            adata=None if self.adata is None else self.adata[keep],
        )

    def rows(self, adata: ad.AnnData | None = None) -> ad.AnnData:
        """The task's AnnData rows: the kept ``adata``, or ``adata[index]`` of the data the
        task was prepared from."""
        if adata is not None:
            return adata[self.index]
        if self.adata is None:
            raise ConfigError(
                "this TaskData keeps no AnnData; pass the AnnData it was prepared from"
            )
        return self.adata


def _ids(ids: Sequence[str] | np.ndarray, n: int) -> np.ndarray:
    out = np.asarray([str(i) for i in ids])
    if out.size != n:
        raise ConfigError(f"{out.size} sample ids for {n} rows; pass one id per sample")
    return out


def _per_row(values: Sequence[Any] | np.ndarray | None, n: int, what: str) -> np.ndarray | None:
    if values is None:
        return None
    out = np.asarray(values).astype(str)
    if out.ndim != 1 or out.size != n:
        raise ConfigError(f"{what} must hold one value per row ({n}), got shape {out.shape}")
    return out


def _groups(
    groups: Sequence[Any] | np.ndarray | None, ids: Sequence[str] | np.ndarray, n: int
) -> np.ndarray:
    """Patient ids; missing ones (and ``groups=None``) fall back to the sample id."""
    sample_ids = _ids(ids, n)
    if groups is None:
        return sample_ids
    raw = pd.Series(np.asarray(groups, dtype=object))
    if len(raw) != n:
        raise ConfigError(f"{len(raw)} patient ids for {n} rows; pass one per sample")
    return np.where(raw.isna().to_numpy(), sample_ids, raw.astype(str).to_numpy()).astype(str)


# --------------------------------------------------------------------------- preparation


def patient_ids(obs: pd.DataFrame, patient_key: str) -> np.ndarray:
    """Patient ids; a sample without one is its own patient (conservative for grouping)."""
    if patient_key not in obs.columns:
        raise ConfigError(
            f"patient column {patient_key!r} is not in obs; splits must group samples "
            "by patient (add it with bulkfm.data.clinical.annotate_samples)"
        )
    return _groups(obs[patient_key].to_numpy(dtype=object), obs.index, len(obs))


def _n_patients(groups: np.ndarray, mask: np.ndarray) -> int:
    return int(np.unique(groups[mask]).size)


def _scope(obs: pd.DataFrame, task: TaskSpec, rules: TaskRules) -> np.ndarray:
    cohort = obs_column(obs, rules.cohort_key, "cohort").astype(object)
    if task.cohort is None:
        return np.ones(len(obs), dtype=bool)
    known = cohort_names(obs, rules.cohort_key)
    if task.cohort not in known:
        raise ConfigError(f"task {task.name!r}: unknown cohort {task.cohort!r}; known: {known}")
    return (cohort == task.cohort).to_numpy()


def _ids_of(obs: pd.DataFrame, index: np.ndarray) -> np.ndarray:
    return obs.index.astype(str).to_numpy()[index]


def _split_need(rules: TaskRules) -> int:
    """Patients each class needs for the hold-out splits of ``rules.test_size``."""
    from bulkfm.data.splits import n_holdout_folds

    return n_holdout_folds(float(rules.test_size))


def _split_note(rules: TaskRules, need: int) -> str:
    larger = " (a larger test size needs fewer: 0.5 needs 2)" if need > 2 else ""
    return (
        f"a stratified hold-out of --test-size {rules.test_size} (test_size=) needs {need} "
        f"patients in every class{larger}"
    )


def _prepare_cancer_type(obs: pd.DataFrame, task: TaskSpec, rules: TaskRules) -> TaskData:
    groups = patient_ids(obs, rules.patient_key)
    label = obs_column(obs, rules.cohort_key, "cohort").astype(object)
    keep = label.notna().to_numpy()
    per_class = pd.Series(groups[keep]).groupby(label[keep].astype(str).to_numpy()).nunique()
    # A class below the split's need could not be in every fold: left out like a small one.
    need = max(rules.min_class_patients, _split_need(rules))
    small = per_class[per_class < need]
    classes = sorted(per_class[per_class >= need].index.tolist())
    if len(classes) < 2:
        count = "only one class" if len(classes) == 1 else "no class"
        raise SplitError(
            f"task {task.name!r} has {count} with >= {need} patients "
            f"({classes}; patients per class: {per_class.to_dict()}); classification needs at "
            "least two classes: add cohorts or lower --min-class-patients "
            f"(min_class_patients=); {_split_note(rules, _split_need(rules))}"
        )
    keep &= label.astype(str).isin(classes).to_numpy()
    index = np.flatnonzero(keep)
    codes = pd.Categorical(label.iloc[index].astype(str), categories=classes).codes
    return TaskData(
        ids=_ids_of(obs, index),
        y=codes.astype(np.int64),
        groups=groups[index],
        strata=codes.astype(np.int64),
        index=index,
        task=task,
        cohorts=label.iloc[index].astype(str).to_numpy(),
        classes=classes,
        info={
            "n_samples": int(index.size),
            "n_patients": _n_patients(groups, keep),
            "n_per_class": {c: int(per_class[c]) for c in classes},
            "classes_left_out": {str(c): int(n) for c, n in small.items()},
        },
    )


def _prepare_mutation(obs: pd.DataFrame, task: TaskSpec, rules: TaskRules) -> TaskData:
    column = keys.mutation_column(str(task.gene))
    if column not in obs.columns:
        raise ConfigError(
            f"task {task.name!r}: obs has no column {column!r}; genes with mutation calls: "
            f"{mutation_genes(obs)}"
        )
    groups = patient_ids(obs, rules.patient_key)
    y = mutation_status(obs, str(task.gene))  # categorical 0/1 (or older Int8) -> float, NaN
    keep = ~np.isnan(y) & _scope(obs, task, rules)
    n_pos = _n_patients(groups, keep & (y == 1))
    n_neg = _n_patients(groups, keep & (y == 0))
    split = _split_need(rules)
    need_pos, need_neg = max(rules.min_positives, split), max(rules.min_negatives, split)
    if n_pos < need_pos or n_neg < need_neg:
        raise SplitError(
            f"task {task.name!r} has {n_pos} mutated and {n_neg} wild-type patients; at least "
            f"{need_pos} and {need_neg} are needed (--min-positives / --min-negatives, "
            f"min_positives= / min_negatives=; {_split_note(rules, split)})"
        )
    index = np.flatnonzero(keep)
    labels = y[index].astype(np.int64)
    return TaskData(
        ids=_ids_of(obs, index),
        y=labels,
        groups=groups[index],
        strata=labels,
        index=index,
        task=task,
        cohorts=obs[rules.cohort_key].astype(str).to_numpy()[index],
        classes=["wild_type", "mutated"],
        info={
            "n_samples": int(index.size),
            "n_patients": _n_patients(groups, keep),
            "n_positive_patients": n_pos,
            "n_negative_patients": n_neg,
        },
    )


def _unknown_survival_note(
    obs: pd.DataFrame, time: pd.Series, event: pd.Series, scope: np.ndarray, rules: TaskRules
) -> str:
    """Samples in scope whose time or event is NaN, said apart from censoring (the data
    layer's job, reported here where their absence makes a task fail)."""
    no_time = time.isna().to_numpy() & scope
    no_event = event.isna().to_numpy() & scope
    if not (no_time.any() or no_event.any()):
        return ""
    examples = [str(i) for i in obs.index[no_time | no_event][:3]]
    return (
        f"; besides, {int(no_time.sum())} of {int(scope.sum())} samples have no "
        f"{rules.time_key} (NaN) and {int(no_event.sum())} no {rules.event_key} (NaN), e.g. "
        f"{examples}: they are left out, not counted as censored. Fix: join survival with "
        "`bulkfm data build --survival TABLE` (check the table's time and event columns "
        "for --endpoint)"
    )


def _prepare_survival(obs: pd.DataFrame, task: TaskSpec, rules: TaskRules) -> TaskData:
    from bulkfm.data.splits import survival_strata

    groups = patient_ids(obs, rules.patient_key)
    time = pd.to_numeric(obs_column(obs, rules.time_key, "survival time"), errors="coerce")
    event = pd.to_numeric(obs_column(obs, rules.event_key, "survival event"), errors="coerce")
    known = (time.notna() & event.notna()).to_numpy() & _scope(obs, task, rules)
    t = time.to_numpy(dtype=float, na_value=np.nan)
    e = event.to_numpy(dtype=float, na_value=np.nan)
    # A follow-up of zero days (or less) is a recording error in clinical tables and the
    # C-index of bulkfm.metrics rejects it: such samples are left out and counted.
    nonpositive = known & ~(t > 0)
    keep = known & ~nonpositive
    if nonpositive.any():
        logger.info(
            "task %s: %d samples with survival time <= 0 left out", task.name, nonpositive.sum()
        )
    if not np.isin(e[keep], (0.0, 1.0)).all():
        raise ConfigError(f"{rules.event_key} must be 0 (censored) or 1 (event)")
    n_events = _n_patients(groups, keep & (e == 1))
    n_censored = _n_patients(groups, keep & (e == 0))
    if n_events < rules.min_events:
        raise SplitError(
            f"task {task.name!r} has {n_events} patients with an event; at least "
            f"{rules.min_events} are needed (--min-events, min_events=)"
            + _unknown_survival_note(obs, time, event, _scope(obs, task, rules), rules)
        )
    split = _split_need(rules)
    if n_events < split or n_censored < split:
        # The splits are stratified by the event, so both sides need both kinds.
        raise SplitError(
            f"task {task.name!r} has {n_events} patients with an event and {n_censored} "
            f"censored; {_split_note(rules, split)}, so at least {split} of each"
        )
    index = np.flatnonzero(keep)
    return TaskData(
        ids=_ids_of(obs, index),
        y=np.column_stack([t[index], e[index]]),
        groups=groups[index],
        strata=survival_strata(e[index].astype(int)),
        index=index,
        task=task,
        cohorts=obs[rules.cohort_key].astype(str).to_numpy()[index],
        classes=[],
        info={
            "n_samples": int(index.size),
            "n_patients": _n_patients(groups, keep),
            "n_event_patients": n_events,
            "n_nonpositive_time_left_out": int(nonpositive.sum()),
            "endpoint": rules.endpoint,
        },
    )


def prepare_task(obs: pd.DataFrame, task: TaskSpec, rules: TaskRules) -> TaskData:
    """Arrays of ``task`` on ``obs`` (already restricted to the samples to use).

    Raises :class:`~bulkfm.errors.SplitError` with the reason when the task cannot
    be evaluated (one class, too few positives/negatives/events, or too few patients
    in a class for the stratified hold-out splits of ``rules.test_size``).
    """
    if task.family == "cancer_type":
        td = _prepare_cancer_type(obs, task, rules)
    elif task.family == "mutation":
        td = _prepare_mutation(obs, task, rules)
    else:
        td = _prepare_survival(obs, task, rules)
    _check_splittable(td, rules)
    return td


def _check_splittable(td: TaskData, rules: TaskRules) -> None:
    """The hold-out splits' own rule on the task's strata, so a feasible task can be split
    (the family checks above count the same patients; this guards the rest)."""
    from bulkfm.data.splits import check_group_sizes

    need = _split_need(rules)
    check_group_sizes(
        td.strata,
        td.groups,
        need,
        context=f"task {td.spec.name!r}: a stratified hold-out of --test-size "
        f"{rules.test_size} (test_size=)",
        fix="raise --test-size or leave the task out of --tasks",
    )


def select_tasks(
    obs: pd.DataFrame, tokens: Sequence[str], rules: TaskRules, *, lenient: bool = False
) -> tuple[TaskSelection, dict[str, TaskData]]:
    """Expand task names and prepare each task once; a task a wildcard (or ``lenient``)
    names is skipped with its reason when infeasible, one named explicitly raises."""
    tasks: list[TaskSpec] = []
    skipped: dict[str, str] = {}
    prepared: dict[str, TaskData] = {}
    for token in tokens:
        specs, wildcard = expand_token(token, obs, rules)
        for spec in specs:
            if spec.name in prepared or spec.name in skipped:
                continue
            try:
                prepared[spec.name] = prepare_task(obs, spec, rules)
            except SplitError as exc:
                if not (wildcard or lenient):
                    raise
                skipped[spec.name] = str(exc)
                continue
            tasks.append(spec)
    for name, reason in skipped.items():
        logger.info("skipping task %s: %s", name, reason)
    return TaskSelection(tasks=tasks, skipped=skipped), prepared
