"""What an evaluation produced, as typed records, and how it becomes ``results.json``.

The runner fills an :class:`EvaluationResult`; the report and the CLI read it. Both the
JSON file and :attr:`EvaluationResult.results` come from the same ``to_dict`` methods, so
the file's keys and their order are defined here once. Import-light (numpy only): the
report imports this module and must not pull in the runner.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bulkfm.tasks.classification import ClassificationResult
    from bulkfm.tasks.survival import SurvivalResult

__all__ = [
    "RESULTS_FILE",
    "ClassificationArm",
    "CohortSimilarity",
    "CohortSurvival",
    "DataSummary",
    "DedupeStep",
    "EvaluationResult",
    "EventCounts",
    "Exclusions",
    "KaplanMeier",
    "ModelInfo",
    "ModelSize",
    "PerCohortSurvival",
    "PretrainingInfo",
    "RobustnessFraction",
    "RobustnessStudy",
    "SelectionStep",
    "SplitInfo",
    "SurvivalArm",
    "SurvivalCounts",
    "SurvivalExclusion",
    "TransferScores",
    "VariantScores",
    "jsonable",
]

RESULTS_FILE = "results.json"

#: ``bulkfm.metrics.mean_std`` output: mean, std, n, n_nan, values.
Stats = dict[str, Any]


def _plain(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class _Record:
    """A dataclass whose JSON form is its fields, in order (nested records included)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }


@dataclass
class SplitInfo(_Record):
    name: str
    seed: int
    n_train: int
    n_test: int


@dataclass
class ClassificationArm(_Record):
    """One arm of the classification table: summary over splits, pooled confusion."""

    label: str
    kind: str
    summary: dict[str, Stats]
    labels: list[str]
    confusion: list[list[int]]
    per_split: list[dict[str, Any]]


@dataclass
class SurvivalArm(_Record):
    """One arm of the survival table, with its per-cohort C-index over splits."""

    label: str
    kind: str
    summary: dict[str, Stats]
    per_cohort: dict[str, Stats]
    per_split: list[dict[str, Any]]


@dataclass
class CohortSurvival(_Record):
    """One cohort's own survival models; ``min_test_events``: the fewest events in one of
    its test splits (a C-index on a handful of events is imprecise)."""

    n: int
    n_events: int
    arms: dict[str, SurvivalArm]
    min_test_events: int | None = None


@dataclass
class PerCohortSurvival(_Record):
    """Models trained within one cohort; ``skipped`` gives each left-out cohort's reason."""

    cohorts: dict[str, CohortSurvival] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class TransferScores(_Record):
    """C-index on one cohort's pan-cancer test samples for three training sets."""

    pan_cancer: Stats
    without_cohort: Stats | None
    without_cohort_errors: list[str]
    cohort_only: Stats | None
    cohort_only_errors: list[str]


@dataclass
class VariantScores(_Record):
    macro_f1: Stats
    ratio: Stats


@dataclass
class RobustnessFraction(_Record):
    """Scores at one fraction of removed genes; the variants sit beside the clean score
    in the JSON (``{"clean_macro_f1": ..., "imputed": ..., ...}``)."""

    clean_macro_f1: Stats
    variants: dict[str, VariantScores]

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean_macro_f1": self.clean_macro_f1,
            **{k: v.to_dict() for k, v in self.variants.items()},
        }


@dataclass
class RobustnessStudy(_Record):
    head: str
    fractions: dict[str, RobustnessFraction]
    per_split: list[dict[str, Any]]


@dataclass
class CohortSimilarity(_Record):
    """Cosine similarity of per-label mean embeddings; ``order`` is the dendrogram's."""

    labels: list[str]
    centered: bool
    cosine: list[list[float]]
    linkage: list[list[float]]
    order: list[str]


@dataclass
class KaplanMeier(_Record):
    logrank: dict[str, float]
    groups: list[dict[str, Any]]


@dataclass
class EventCounts(_Record):
    """Events in the test side of each survival split, overall and per cohort.

    A C-index ranks the pairs anchored on events, so with few events it rests on few
    pairs and moves a lot from split to split. ``few`` lists, in words, where a test set
    holds fewer than ``threshold`` events (``protocol.warn_below_events``); the run warns
    with the same words and the report prints them under the survival tables.
    """

    threshold: int
    per_split: list[int]
    per_cohort: dict[str, list[int]]
    few: list[str] = field(default_factory=list)


@dataclass
class SurvivalCounts(_Record):
    n: int
    n_events: int
    per_cohort: dict[str, dict[str, int]]
    test_events: EventCounts | None = None


class _Sparse(_Record):
    """A record whose unset (None) fields are left out of the JSON."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None}


@dataclass
class PretrainingInfo(_Record):
    """The pre-training run of a model trained inside the evaluation."""

    steps: int
    n_train: int
    n_eval: int
    eval: dict[str, float]
    initial_eval: dict[str, float]
    elapsed_s: float


@dataclass
class ModelSize(_Record):
    n_genes: int
    embed_dim: int
    num_layers: int
    n_parameters: int


@dataclass
class ModelInfo(_Record):
    """Where the model came from and its size; one flat JSON object (``model``), so a
    report reads ``model["n_genes"]`` whatever the source was."""

    source: str
    path: str | None = None
    pretraining: PretrainingInfo | None = None
    size: ModelSize | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source}
        if self.path is not None:
            out["path"] = self.path
        for part in (self.pretraining, self.size):
            if part is not None:
                out.update(part.to_dict())
        return out


@dataclass
class SelectionStep(_Record):
    rules: dict[str, Any]
    n_before: int
    n_after: int


@dataclass
class DedupeStep(_Record):
    key: str
    n_dropped: int
    examples: list[str]


@dataclass
class SurvivalExclusion(_Record):
    """Samples left out of the survival tasks. ``by_reason`` partitions ``n_excluded``:
    each sample is counted once, under the first reason that applies (no usable time,
    then time <= 0, then no event), so the parts add up."""

    n_excluded: int
    reason: str
    ids: list[str]
    by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class Exclusions(_Sparse):
    """Each step that dropped samples, in the order a run takes them; steps that dropped
    nothing stay None and out of the JSON. ``unlabelled`` / ``no_embedding``: sample
    counts; ``small_classes``: the reason per left-out class, ``small_class_samples``
    their samples.

    ``select``, ``dedupe``, ``unlabelled`` and ``no_embedding`` act one after the other
    on what the previous step kept, so they partition the loaded samples that were not
    analysed (:meth:`accounted` checks it). ``small_classes`` and ``survival`` act on the
    analysed samples, each for its own task only, and may overlap each other.
    """

    select: SelectionStep | None = None
    dedupe: DedupeStep | None = None
    unlabelled: int | None = None
    no_embedding: int | None = None
    small_classes: dict[str, str] | None = None
    small_class_samples: int | None = None
    survival: SurvivalExclusion | None = None

    def steps(self) -> list[tuple[str, int]]:
        """(what, samples) of each step between loading and the analysed set, in order."""
        out = []
        if self.select is not None and self.select.n_before > self.select.n_after:
            out.append(
                (
                    f"not matching data.select {self.select.rules}",
                    self.select.n_before - self.select.n_after,
                )
            )
        if self.dedupe is not None:
            out.append((f"duplicates of {self.dedupe.key} (the first kept)", self.dedupe.n_dropped))
        if self.unlabelled:
            out.append(("without a label", self.unlabelled))
        if self.no_embedding:
            out.append(("without a precomputed embedding", self.no_embedding))
        return out

    def accounted(self, n_loaded: int, n_selected: int) -> bool:
        """Whether the steps' counts add up to the samples loaded but not analysed."""
        return n_loaded - n_selected == sum(n for _, n in self.steps())


@dataclass
class DataSummary(_Sparse):
    """How the analysed samples came about; ``exclusions`` records each dropping step,
    ``classes`` / ``survival`` the samples of the studies that ran."""

    n_loaded: int
    n_selected: int
    exclusions: Exclusions = field(default_factory=Exclusions)
    classes: dict[str, int] | None = None
    survival: SurvivalCounts | None = None


# Top-level sections written only when their study ran.
_OPTIONAL = (
    "classification",
    "robustness",
    "survival",
    "per_cohort_survival",
    "transfer",
    "similarity",
)


@dataclass
class EvaluationResult:
    """What :func:`bulkfm.evaluate.run_evaluation` produced.

    The typed sections mirror ``results.json``; ``classification`` / ``survival`` hold the
    fitted arms' full outputs (test predictions included), ``classification_arms`` /
    ``survival_arms`` their table entries.
    """

    out_dir: Path
    config: dict[str, Any]
    model: ModelInfo
    data: DataSummary
    notes: list[str]
    timings_s: dict[str, float]
    #: :meth:`bulkfm.tokenize.GeneCoverage.to_dict` of the analysed samples (None: no model)
    gene_coverage: dict[str, Any] | None = None
    splits: dict[str, list[SplitInfo]] = field(default_factory=dict)
    classification_arms: dict[str, ClassificationArm] | None = None
    robustness: RobustnessStudy | None = None
    survival_arms: dict[str, SurvivalArm] | None = None
    per_cohort_survival: PerCohortSurvival | None = None
    transfer: dict[str, dict[str, TransferScores]] | None = None
    similarity: CohortSimilarity | None = None
    warnings: list[str] = field(default_factory=list)
    km: dict[str, KaplanMeier] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    classification: dict[str, ClassificationResult] = field(default_factory=dict, repr=False)
    survival: dict[str, SurvivalResult] = field(default_factory=dict, repr=False)

    @property
    def results(self) -> dict[str, Any]:
        """The results as in results.json (before NaN becomes null)."""
        sections = {
            "classification": self.classification_arms,
            "robustness": self.robustness,
            "survival": self.survival_arms,
            "per_cohort_survival": self.per_cohort_survival,
            "transfer": self.transfer,
            "similarity": self.similarity,
        }
        out: dict[str, Any] = {
            "config": self.config,
            "model": self.model.to_dict(),
        }
        if self.gene_coverage is not None:
            out["gene_coverage"] = self.gene_coverage
        out |= {
            "data": self.data.to_dict(),
            "splits": _plain(self.splits),
            "notes": self.notes,
            "timings_s": self.timings_s,
        }
        out.update({k: _plain(sections[k]) for k in _OPTIONAL if sections[k] is not None})
        out["warnings"] = self.warnings
        if self.km:
            out["km"] = _plain(self.km)
        return out

    def to_json(self) -> str:
        """results.json's text: NaN and infinities written as null."""
        return json.dumps(jsonable(self.results), indent=1) + "\n"

    def summary(self) -> dict[str, Any]:
        """Mean ± std per arm and task, and the report paths (compact, JSON-able)."""
        out: dict[str, Any] = {"out_dir": str(self.out_dir)}
        for task, arms in (
            ("classification", self.classification_arms),
            ("survival", self.survival_arms),
        ):
            out[task] = {
                k: {
                    "label": v.label,
                    **{m: {"mean": s["mean"], "std": s["std"]} for m, s in v.summary.items()},
                }
                for k, v in (arms or {}).items()
            }
        out["paths"] = {k: str(v) for k, v in self.paths.items()}
        return jsonable(out)


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays unwrapped, NaN/inf -> None, paths -> str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
