"""Benchmark tasks on TCGA-style obs: cancer type, driver mutations, survival.

A task names *what* is predicted and *on which samples*; :func:`prepare_task`
turns it into arrays (targets, patient groups, stratification labels) or says
why it cannot be evaluated. Feasibility is counted in **patients**, not samples,
because repeated aliquots of one tumour are not independent evidence.

Task names (also the ``--tasks`` grammar):

- ``cancer_type``: multiclass over ``obs[cohort_key]`` (macro-F1);
- ``mutation:TP53`` pan-cancer, ``mutation:TP53@BRCA`` within one cohort (AUROC);
- ``survival`` pan-cancer, ``survival@ACC`` within one cohort (C-index).
  Pan-cancer survival is scored by the C-index *within* cohorts (pairs of
  patients of one cancer type, weighted by cohort test size), because cancer type
  alone already ranks survival across cohorts; the overall C-index is recorded too.

Wildcards expand to every feasible task and *skip* the others with a reason:
``auto``, ``mutation`` (all genes, pan-cancer), ``mutation@*`` / ``mutation:TP53@*``
(within each cohort), ``survival@*``. A task named explicitly that cannot be
evaluated is an error instead.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bulkfm.bench.config import BenchConfig
from bulkfm.errors import ConfigError, SplitError

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

__all__ = [
    "TASK_GRAMMAR",
    "TaskData",
    "TaskSelection",
    "TaskSpec",
    "bench_obs",
    "check_endpoint",
    "default_tasks",
    "parse_tasks",
    "prepare_task",
    "sample_mask",
]

TASK_GRAMMAR = (
    "auto, cancer_type, mutation, mutation@*, mutation:<GENE>[@<COHORT>|@*], "
    "survival, survival@<COHORT>, survival@*"
)
_FAMILIES = {"cancer_type": "multiclass", "mutation": "binary", "survival": "survival"}
_METRICS = {"cancer_type": "macro_f1", "mutation": "auroc", "survival": "c_index"}


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task; ``cohort`` restricts it to one cancer type."""

    family: str
    gene: str | None = None
    cohort: str | None = None

    def __post_init__(self) -> None:
        if self.family not in _FAMILIES:
            raise ConfigError(
                f"unknown task family {self.family!r}; known: {sorted(_FAMILIES)} "
                f"(task names: {TASK_GRAMMAR})"
            )
        if (self.family == "mutation") != (self.gene is not None):
            raise ConfigError("a mutation task needs a gene, and only mutation tasks take one")
        if self.family == "cancer_type" and self.cohort is not None:
            raise ConfigError("cancer_type is pan-cancer by definition; it takes no cohort")

    @property
    def name(self) -> str:
        base = f"mutation:{self.gene}" if self.family == "mutation" else self.family
        return f"{base}@{self.cohort}" if self.cohort is not None else base

    @property
    def kind(self) -> str:
        """Probe kind: multiclass, binary or survival."""
        return _FAMILIES[self.family]

    @property
    def metric(self) -> str:
        """Headline metric of the leaderboard."""
        if self.family == "survival" and self.cohort is None:
            return "c_index_within_cohort"
        return _METRICS[self.family]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "kind": self.kind,
            "metric": self.metric,
            "gene": self.gene,
            "cohort": self.cohort,
        }


@dataclass
class TaskData:
    """Arrays of one task, rows in ``index`` order (positions into the benchmark samples).

    ``y``: class codes (multiclass), 0/1 (binary), or an (n, 2) float array of
    [time, event] (survival). ``strata``: the labels splits are stratified by.
    """

    task: TaskSpec
    index: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    strata: np.ndarray
    cohorts: np.ndarray
    classes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskSelection:
    """Tasks to run and, for every task left out, the reason."""

    tasks: list[TaskSpec]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


# --------------------------------------------------------------------------- samples


def sample_mask(obs: pd.DataFrame, config: BenchConfig) -> np.ndarray:
    """Samples the benchmark uses: those of ``config.sample_type`` (all if None)."""
    if config.sample_type is None:
        return np.ones(len(obs), dtype=bool)
    if "sample_type" not in obs.columns:
        raise ConfigError(
            "obs has no 'sample_type' column but sample_type="
            f"{config.sample_type!r} was asked; add the column (bulkfm.data.clinical."
            "annotate_samples) or set sample_type=None to use every sample"
        )
    mask = (obs["sample_type"].astype(object) == config.sample_type).to_numpy()
    if not mask.any():
        present = obs["sample_type"].astype(object).value_counts().to_dict()
        raise ConfigError(
            f"no sample has sample_type {config.sample_type!r} (present: {present}); choose "
            "one of those or set sample_type=None"
        )
    return mask


def _column(obs: pd.DataFrame, key: str, role: str) -> pd.Series:
    if key not in obs.columns:
        raise ConfigError(
            f"{role} column {key!r} is not in obs (columns: {list(obs.columns)}); pass the "
            f"right column name in the benchmark config"
        )
    return obs[key]


def _mutation_genes(obs: pd.DataFrame) -> list[str]:
    return [str(c)[4:] for c in obs.columns if str(c).startswith("mut_")]


def _cohorts(obs: pd.DataFrame, config: BenchConfig) -> list[str]:
    values = _column(obs, config.cohort_key, "cohort").dropna().astype(str)
    return sorted(values.unique().tolist())


def _patients(obs: pd.DataFrame, config: BenchConfig) -> np.ndarray:
    """Patient ids; a sample without one is its own patient (conservative for grouping)."""
    if config.patient_key not in obs.columns:
        raise ConfigError(
            f"patient column {config.patient_key!r} is not in obs; splits must group samples "
            "by patient (add it with bulkfm.data.clinical.annotate_samples)"
        )
    pat = obs[config.patient_key].astype(object)
    return pat.where(pat.notna(), pd.Series(obs.index, index=obs.index)).astype(str).to_numpy()


# --------------------------------------------------------------------------- preparation


def _n_patients(groups: np.ndarray, mask: np.ndarray) -> int:
    return int(np.unique(groups[mask]).size)


def _scope(obs: pd.DataFrame, task: TaskSpec, config: BenchConfig) -> np.ndarray:
    cohort = _column(obs, config.cohort_key, "cohort").astype(object)
    if task.cohort is None:
        return np.ones(len(obs), dtype=bool)
    known = _cohorts(obs, config)
    if task.cohort not in known:
        raise ConfigError(f"task {task.name!r}: unknown cohort {task.cohort!r}; known: {known}")
    return (cohort == task.cohort).to_numpy()


def _prepare_cancer_type(obs: pd.DataFrame, task: TaskSpec, config: BenchConfig) -> TaskData:
    groups = _patients(obs, config)
    label = _column(obs, config.cohort_key, "cohort").astype(object)
    keep = label.notna().to_numpy()
    per_class = pd.Series(groups[keep]).groupby(label[keep].astype(str).to_numpy()).nunique()
    small = per_class[per_class < config.min_class_patients]
    classes = sorted(per_class[per_class >= config.min_class_patients].index.tolist())
    if len(classes) < 2:
        count = "only one class" if len(classes) == 1 else "no class"
        raise SplitError(
            f"task {task.name!r} has {count} with >= {config.min_class_patients} patients "
            f"({classes}; patients per class: {per_class.to_dict()}); classification needs at "
            "least two classes: add cohorts or lower min_class_patients"
        )
    keep &= label.astype(str).isin(classes).to_numpy()
    index = np.flatnonzero(keep)
    codes = pd.Categorical(label.iloc[index].astype(str), categories=classes).codes
    return TaskData(
        task=task,
        index=index,
        y=codes.astype(np.int64),
        groups=groups[index],
        strata=codes.astype(np.int64),
        cohorts=label.iloc[index].astype(str).to_numpy(),
        classes=classes,
        info={
            "n_samples": int(index.size),
            "n_patients": _n_patients(groups, keep),
            "n_per_class": {c: int(per_class[c]) for c in classes},
            "classes_left_out": {str(c): int(n) for c, n in small.items()},
        },
    )


def _prepare_mutation(obs: pd.DataFrame, task: TaskSpec, config: BenchConfig) -> TaskData:
    column = f"mut_{task.gene}"
    if column not in obs.columns:
        raise ConfigError(
            f"task {task.name!r}: obs has no column {column!r}; genes with mutation calls: "
            f"{_mutation_genes(obs)}"
        )
    groups = _patients(obs, config)
    values = pd.to_numeric(obs[column].astype(object), errors="coerce")
    bad = values.notna() & ~values.isin([0, 1])
    if bad.any():
        raise ConfigError(f"{column} must be 0/1 (NA = unknown), found {values[bad].unique()[:5]}")
    keep = values.notna().to_numpy() & _scope(obs, task, config)
    y = values.to_numpy(dtype=float, na_value=np.nan)
    n_pos = _n_patients(groups, keep & (y == 1))
    n_neg = _n_patients(groups, keep & (y == 0))
    if n_pos < config.min_positives or n_neg < config.min_negatives:
        raise SplitError(
            f"task {task.name!r} has {n_pos} mutated and {n_neg} wild-type patients; at least "
            f"{config.min_positives} and {config.min_negatives} are needed (min_positives / "
            "min_negatives)"
        )
    index = np.flatnonzero(keep)
    labels = y[index].astype(np.int64)
    return TaskData(
        task=task,
        index=index,
        y=labels,
        groups=groups[index],
        strata=labels,
        cohorts=obs[config.cohort_key].astype(str).to_numpy()[index],
        classes=["wild_type", "mutated"],
        info={
            "n_samples": int(index.size),
            "n_patients": _n_patients(groups, keep),
            "n_positive_patients": n_pos,
            "n_negative_patients": n_neg,
        },
    )


def _prepare_survival(obs: pd.DataFrame, task: TaskSpec, config: BenchConfig) -> TaskData:
    from bulkfm.data.splits import survival_strata

    groups = _patients(obs, config)
    time = pd.to_numeric(_column(obs, config.time_key, "survival time"), errors="coerce")
    event = pd.to_numeric(_column(obs, config.event_key, "survival event"), errors="coerce")
    known = (time.notna() & event.notna()).to_numpy() & _scope(obs, task, config)
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
        raise ConfigError(f"{config.event_key} must be 0 (censored) or 1 (event)")
    n_events = _n_patients(groups, keep & (e == 1))
    if n_events < config.min_events:
        raise SplitError(
            f"task {task.name!r} has {n_events} patients with an event; at least "
            f"{config.min_events} are needed (min_events)"
        )
    index = np.flatnonzero(keep)
    y = np.column_stack([t[index], e[index]])
    return TaskData(
        task=task,
        index=index,
        y=y,
        groups=groups[index],
        strata=survival_strata(e[index].astype(int)),
        cohorts=obs[config.cohort_key].astype(str).to_numpy()[index],
        classes=[],
        info={
            "n_samples": int(index.size),
            "n_patients": _n_patients(groups, keep),
            "n_event_patients": n_events,
            "n_nonpositive_time_left_out": int(nonpositive.sum()),
            "endpoint": config.endpoint,
        },
    )


def prepare_task(obs: pd.DataFrame, task: TaskSpec, config: BenchConfig) -> TaskData:
    """Arrays of ``task`` on ``obs`` (already restricted to the benchmark samples).

    Raises :class:`~bulkfm.errors.SplitError` with the reason when the task cannot
    be evaluated (one class, too few positives/negatives/events).
    """
    if task.family == "cancer_type":
        return _prepare_cancer_type(obs, task, config)
    if task.family == "mutation":
        return _prepare_mutation(obs, task, config)
    return _prepare_survival(obs, task, config)


# --------------------------------------------------------------------------- selection


def check_endpoint(adata: ad.AnnData, config: BenchConfig) -> str | None:
    """The survival endpoint of the AnnData; an error if ``config.endpoint`` differs."""
    built = adata.uns.get("bulkfm", {}).get("survival", {}).get("endpoint")
    default_keys = (config.time_key, config.event_key) == ("survival_time", "survival_event")
    asked = config.endpoint
    if asked is not None and built is not None and default_keys and str(asked) != str(built):
        raise ConfigError(
            f"the AnnData's survival columns hold endpoint {built!r} but endpoint="
            f"{config.endpoint!r} was asked; rebuild the data with that endpoint "
            f"(bulkfm data build --endpoint {config.endpoint}) or point time_key/event_key "
            "at columns holding it"
        )
    return config.endpoint if config.endpoint is not None else built


def _has_survival(obs: pd.DataFrame, config: BenchConfig) -> bool:
    return config.time_key in obs.columns and config.event_key in obs.columns


def _expand(token: str, obs: pd.DataFrame, config: BenchConfig) -> tuple[list[TaskSpec], bool]:
    """Tasks a token names and whether it is a wildcard (infeasible ones are skipped)."""
    token = token.strip()
    if token == "auto":
        specs = [TaskSpec("cancer_type")]
        for t in ("mutation", "mutation@*", "survival", "survival@*"):
            if t.startswith("survival") and not _has_survival(obs, config):
                continue
            specs += _expand(t, obs, config)[0]
        return specs, True
    if token == "cancer_type":
        return [TaskSpec("cancer_type")], False
    m = re.fullmatch(r"(mutation|survival)(?::([^@]+))?(?:@(.+))?", token)
    if m is None:
        raise ConfigError(f"unknown task {token!r}; task names: {TASK_GRAMMAR}")
    family, gene, cohort = m.groups()
    if family == "survival":
        if gene is not None:
            raise ConfigError(
                f"unknown task {token!r}: survival takes no ':'; use survival@<COHORT>"
            )
        if cohort == "*":
            return [TaskSpec("survival", cohort=c) for c in _cohorts(obs, config)], True
        return [TaskSpec("survival", cohort=cohort)], False
    genes = _mutation_genes(obs)
    if gene is None:
        chosen, wildcard = genes, True
    else:
        by_upper = {g.upper(): g for g in genes}
        if gene.upper() not in by_upper:
            raise ConfigError(
                f"unknown gene {gene!r} in task {token!r}; genes with mutation calls (obs "
                f"mut_<GENE>): {genes}"
            )
        chosen, wildcard = [by_upper[gene.upper()]], False
    if cohort == "*":
        cohorts = _cohorts(obs, config)
        return [TaskSpec("mutation", gene=g, cohort=c) for g in chosen for c in cohorts], True
    return [TaskSpec("mutation", gene=g, cohort=cohort) for g in chosen], wildcard


def _select(
    obs: pd.DataFrame, tokens: Sequence[str], config: BenchConfig, *, lenient: bool = False
) -> tuple[TaskSelection, dict[str, TaskData]]:
    """Expand tokens and prepare each task once; wildcards (or ``lenient``) skip, others raise."""
    tasks: list[TaskSpec] = []
    skipped: dict[str, str] = {}
    prepared: dict[str, TaskData] = {}
    for token in tokens:
        specs, wildcard = _expand(token, obs, config)
        for spec in specs:
            if spec.name in prepared or spec.name in skipped:
                continue
            try:
                prepared[spec.name] = prepare_task(obs, spec, config)
            except SplitError as exc:
                if not (wildcard or lenient):
                    raise
                skipped[spec.name] = str(exc)
                continue
            tasks.append(spec)
    for name, reason in skipped.items():
        logger.info("skipping task %s: %s", name, reason)
    return TaskSelection(tasks=tasks, skipped=skipped), prepared


def _tokens(tasks: str | Sequence[str] | None) -> list[str]:
    if tasks is None:
        return ["auto"]
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    tokens = [t.strip() for t in tasks if t and t.strip()]
    if not tokens:
        raise ConfigError(f"no task given; task names: {TASK_GRAMMAR}")
    return tokens


def bench_obs(adata: ad.AnnData, config: BenchConfig) -> pd.DataFrame:
    """obs of the samples the benchmark uses (see :func:`sample_mask`)."""
    return adata.obs.iloc[np.flatnonzero(sample_mask(adata.obs, config))]


def parse_tasks(
    adata: ad.AnnData, tasks: str | Sequence[str] | None, config: BenchConfig | None = None
) -> TaskSelection:
    """Tasks from names (comma-separated string or list; grammar in the module docstring)."""
    config = config or BenchConfig()
    check_endpoint(adata, config)
    return _select(bench_obs(adata, config), _tokens(tasks), config)[0]


def default_tasks(
    adata: ad.AnnData,
    config: BenchConfig | None = None,
    *,
    genes: Sequence[str] | None = None,
    cohorts: Sequence[str] | None = None,
    within_cohort: bool = True,
) -> TaskSelection:
    """Every feasible task, with the reason for each one left out.

    ``genes`` limits the mutation tasks (default: every ``mut_<GENE>`` column),
    ``cohorts`` the within-cohort tasks (default: every cohort); ``within_cohort=False``
    keeps the pan-cancer tasks only.
    """
    config = config or BenchConfig()
    check_endpoint(adata, config)
    obs = bench_obs(adata, config)
    gene_list = list(genes) if genes is not None else _mutation_genes(obs)
    cohort_list = list(cohorts) if cohorts is not None else _cohorts(obs, config)
    survival = _has_survival(obs, config)
    tokens = ["cancer_type"]
    for g in gene_list:
        tokens.append(f"mutation:{g}")
        tokens += [f"mutation:{g}@{c}" for c in cohort_list] if within_cohort else []
    if survival:
        tokens.append("survival")
        tokens += [f"survival@{c}" for c in cohort_list] if within_cohort else []
    selection = _select(obs, tokens, config, lenient=True)[0]
    if not survival:
        selection.skipped["survival"] = (
            f"obs has no {config.time_key!r}/{config.event_key!r} columns (join survival data "
            "when building the AnnData)"
        )
    return selection
