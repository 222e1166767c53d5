"""What a task is: its name, what it predicts, on which samples, scored by which metric.

Task names (also the ``--tasks`` grammar of ``bulkfm bench``):

- ``cancer_type``: multiclass over the cohort column (macro-F1);
- ``mutation:TP53`` pan-cancer, ``mutation:TP53@BRCA`` within one cohort (AUROC);
- ``survival`` pan-cancer, ``survival@ACC`` within one cohort (C-index).
  Pan-cancer survival is scored by the C-index *within* cohorts (pairs of
  patients of one cancer type, weighted by cohort test size), because cancer type
  alone already ranks survival across cohorts; the overall C-index is recorded too.

Wildcards expand to every matching task: ``auto``, ``mutation`` (all genes,
pan-cancer), ``mutation@*`` / ``mutation:TP53@*`` (within each cohort), ``survival@*``.
Whether a task can be evaluated (enough patients) is decided when its arrays are
prepared (:func:`bulkfm.tasks.data.prepare_task`), not here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd

from bulkfm import schema as keys
from bulkfm.errors import ConfigError

__all__ = [
    "TASK_GRAMMAR",
    "TaskRules",
    "TaskSelection",
    "TaskSpec",
    "cohort_names",
    "expand_token",
    "has_survival",
    "mutation_genes",
    "obs_column",
    "task_tokens",
]

TASK_GRAMMAR = (
    "auto, cancer_type, mutation, mutation@*, mutation:<GENE>[@<COHORT>|@*], "
    "survival, survival@<COHORT>, survival@*"
)
_FAMILIES = {"cancer_type": "multiclass", "mutation": "binary", "survival": "survival"}
_METRICS = {"cancer_type": "macro_f1", "mutation": "auroc", "survival": "c_index"}


class TaskRules(Protocol):
    """The settings that decide a task's samples and feasibility.

    A protocol, so an orchestrator's own config (e.g. ``BenchConfig``) is passed as it is
    and :mod:`bulkfm.tasks` never imports the orchestrators above it. Thresholds count
    *patients*, because repeated aliquots of one tumour are not independent evidence.
    ``test_size`` is the hold-out fraction: each class a split is stratified by needs
    :func:`bulkfm.data.splits.n_holdout_folds` patients, so a task is feasible only then.
    """

    @property
    def cohort_key(self) -> str: ...
    @property
    def patient_key(self) -> str: ...
    @property
    def time_key(self) -> str: ...
    @property
    def event_key(self) -> str: ...
    @property
    def endpoint(self) -> str | None: ...
    @property
    def min_positives(self) -> int: ...
    @property
    def min_negatives(self) -> int: ...
    @property
    def min_events(self) -> int: ...
    @property
    def min_class_patients(self) -> int: ...
    @property
    def test_size(self) -> float: ...


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
class TaskSelection:
    """Tasks to run and, for every task left out, the reason."""

    tasks: list[TaskSpec]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


# --------------------------------------------------------------------------- obs helpers


def obs_column(obs: pd.DataFrame, key: str, role: str) -> pd.Series:
    """``obs[key]``, or a ConfigError naming the role and the columns there are."""
    if key not in obs.columns:
        raise ConfigError(
            f"{role} column {key!r} is not in obs (columns: {list(obs.columns)}); pass the "
            f"right column name in the benchmark config"
        )
    return obs[key]


def mutation_genes(obs: pd.DataFrame) -> list[str]:
    """Genes with a mutation column in ``obs``, in column order."""
    return keys.mutation_columns(obs.columns)


def cohort_names(obs: pd.DataFrame, cohort_key: str) -> list[str]:
    """Sorted distinct cohorts (missing values left out)."""
    values = obs_column(obs, cohort_key, "cohort").dropna().astype(str)
    return sorted(values.unique().tolist())


def has_survival(obs: pd.DataFrame, rules: TaskRules) -> bool:
    return rules.time_key in obs.columns and rules.event_key in obs.columns


# --------------------------------------------------------------------------- grammar


def expand_token(token: str, obs: pd.DataFrame, rules: TaskRules) -> tuple[list[TaskSpec], bool]:
    """Tasks a name stands for and whether it is a wildcard (whose infeasible tasks are
    skipped rather than being errors)."""
    token = token.strip()
    if token == "auto":
        specs = [TaskSpec("cancer_type")]
        for t in ("mutation", "mutation@*", "survival", "survival@*"):
            if t.startswith("survival") and not has_survival(obs, rules):
                continue
            specs += expand_token(t, obs, rules)[0]
        return specs, True
    if token == "cancer_type":
        return [TaskSpec("cancer_type")], False
    m = re.fullmatch(r"(mutation|survival)(?::([^@]+))?(?:@(.+))?", token)
    if m is None:
        raise ConfigError(f"unknown task {token!r}; pass task names to --tasks: {TASK_GRAMMAR}")
    family, gene, cohort = m.groups()
    if family == "survival":
        if gene is not None:
            raise ConfigError(
                f"unknown task {token!r}: survival takes no ':'; use survival@<COHORT>"
            )
        if cohort == "*":
            cohorts = cohort_names(obs, rules.cohort_key)
            return [TaskSpec("survival", cohort=c) for c in cohorts], True
        return [TaskSpec("survival", cohort=cohort)], False
    genes = mutation_genes(obs)
    if gene is None:
        chosen, wildcard = genes, True
    else:
        by_upper = {g.upper(): g for g in genes}
        if gene.upper() not in by_upper:
            raise ConfigError(
                f"unknown gene {gene!r} in task {token!r}; genes with mutation calls (obs "
                f"{keys.MUTATION_PREFIX}<GENE>): {genes}"
            )
        chosen, wildcard = [by_upper[gene.upper()]], False
    if cohort == "*":
        cohorts = cohort_names(obs, rules.cohort_key)
        return [TaskSpec("mutation", gene=g, cohort=c) for g in chosen for c in cohorts], True
    return [TaskSpec("mutation", gene=g, cohort=cohort) for g in chosen], wildcard


def task_tokens(tasks: str | Sequence[str] | None) -> list[str]:
    """Task names from a comma-separated string or a list (None: ``auto``)."""
    if tasks is None:
        return ["auto"]
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    tokens = [t.strip() for t in tasks if t and t.strip()]
    if not tokens:
        raise ConfigError(f"no task given; task names: {TASK_GRAMMAR}")
    return tokens
