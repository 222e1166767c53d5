"""The evaluation protocol's settings: one validated dataclass, loadable from YAML.

Plain data (no torch import), so ``bulkfm evaluate`` checks a config before anything
heavy loads. Sections mirror the YAML layout::

    data:       where the samples come from and which of them the tasks use
    model:      a pre-trained checkpoint (or precomputed embeddings)
    pretrain:   instead of model.path: PretrainConfig entries to pre-train here first
    protocol:   seeds, test fraction, stratification
    tasks:      which studies run (classification, survival, per cohort, transfer, ...)
    arms:       the BulkRNABert arms (frozen MLP / SVM, IA3, full fine-tuning, ablations)
    baselines:  PCA/NMF + SVM, MLP on log-TPM, penalised Cox
    heads:      hyper-parameters of the heads and of fine-tuning
    report:     plots and HTML

Every value is checked on construction; a bad one raises :class:`ConfigError` naming the
key and what to write instead. Reading, ``--set`` overrides and unknown-key errors come
from :mod:`bulkfm.config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from bulkfm import schema as keys
from bulkfm.config import (
    ConfigMixin,
    build,
    check_bool,
    check_choice,
    check_int,
    check_nonempty_str,
    check_number,
    check_probability,
)
from bulkfm.errors import ConfigError
from bulkfm.tokenize import DEFAULT_MIN_GENE_COVERAGE

__all__ = [
    "ArmsSection",
    "BaselinesSection",
    "DataSection",
    "EvaluateConfig",
    "HeadsSection",
    "ModelSection",
    "ProtocolSection",
    "ReportSection",
    "TasksSection",
]

SurvivalStrata = Literal["event", "cohort_event"]
RobustnessHead = Literal["mlp", "svm"]
SURVIVAL_STRATA: tuple[str, ...] = ("event", "cohort_event")
ROBUSTNESS_HEADS: tuple[str, ...] = ("mlp", "svm")


def _optional_path(name: str, value: Any) -> str | None:
    """``None``, or a non-empty path as a string (``Path`` objects are welcome in Python)."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return check_nonempty_str(name, value, hint="or null")


def _names(name: str, value: Any) -> list[str]:
    """A list of names; one bare name is a list of one; ``None`` (YAML ``null``) is none."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{name} must be a list of names, got {value!r}")
    return [check_nonempty_str(f"{name}[]", v) for v in items]


def _numbers(values: dict[str, Any]) -> dict[str, Any]:
    """Numeric strings (YAML reads ``1e-4`` as one) -> float; lists -> tuples (layer sizes).

    The heads' keyword arguments are free-form (each estimator checks its own), so the
    loader cannot type them; this is the one conversion they need.
    """
    out = {}
    for key, value in values.items():
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        elif isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


# --------------------------------------------------------------------------- sections
@dataclass
class DataSection:
    """Samples: an .h5ad (X = TPM), or a simulation when no path is given.

    ``select`` keeps samples whose obs column equals the value (or is in the list),
    e.g. ``{sample_type: tumor, study: TCGA}``. ``dedupe_key`` keeps the first sample
    of each value (one aliquot quantified twice by two pipelines counts once).
    ``drop_small_classes`` leaves out, with a warning, classes with too few patients
    for the splits instead of stopping with an error naming them.
    """

    path: str | None = None
    simulate: dict[str, Any] | None = None
    label_key: str = keys.COHORT
    group_key: str | None = keys.PATIENT
    cohort_key: str = keys.COHORT
    time_key: str = keys.SURVIVAL_TIME
    event_key: str = keys.SURVIVAL_EVENT
    select: dict[str, Any] = field(default_factory=dict)
    dedupe_key: str | None = keys.SAMPLE_ID
    drop_small_classes: bool = False

    def __post_init__(self) -> None:
        self.path = _optional_path("data.path", self.path)
        if self.simulate is not None and not isinstance(self.simulate, dict):
            raise ConfigError(f"data.simulate must be a mapping or null, got {self.simulate!r}")
        for name in ("label_key", "cohort_key", "time_key", "event_key"):
            check_nonempty_str(f"data.{name}", getattr(self, name), hint="name an obs column")
        self.group_key = _optional_path("data.group_key", self.group_key)
        self.dedupe_key = _optional_path("data.dedupe_key", self.dedupe_key)
        if self.select is None:  # YAML null: no selection, as {} reads
            self.select = {}
        if not isinstance(self.select, dict):
            raise ConfigError(f"data.select must be a mapping, got {self.select!r}")
        check_bool("data.drop_small_classes", self.drop_small_classes)


@dataclass
class ModelSection:
    """A bulkfm (or official-format, with ``genes`` + ``normalization_factor``) checkpoint,
    or ``embeddings``: precomputed ones (.parquet/.npy/.h5ad) for the frozen arms only.

    The data need not hold every gene of the checkpoint: absent genes are fed as [MASK]
    and left out of pooling. ``min_gene_coverage`` is the smallest mean fraction of the
    model's genes the selected samples must measure, overall and in each cohort and
    study (:func:`bulkfm.tokenize.gene_coverage`); below it the run stops before any work.
    """

    path: str | None = None
    embeddings: str | None = None
    genes: str | None = None
    normalization_factor: float | None = None
    layer: int = -1
    batch_size: int = 16
    device: str = "cpu"
    min_gene_coverage: float = DEFAULT_MIN_GENE_COVERAGE

    def __post_init__(self) -> None:
        self.path = _optional_path("model.path", self.path)
        self.embeddings = _optional_path("model.embeddings", self.embeddings)
        self.genes = _optional_path("model.genes", self.genes)
        if self.normalization_factor is not None:
            self.normalization_factor = check_number(
                "model.normalization_factor", self.normalization_factor
            )
        check_int("model.layer", self.layer)
        check_int("model.batch_size", self.batch_size, 1)
        check_nonempty_str("model.device", self.device, hint="e.g. 'cpu' or 'cuda'")
        self.min_gene_coverage = check_number(
            "model.min_gene_coverage",
            self.min_gene_coverage,
            low=0.0,
            high=1.0,
            hint="the smallest mean fraction of the model's genes the data must measure",
        )


@dataclass
class ProtocolSection:
    """Paper protocol: 80/20 patient-grouped splits, 5 seeds, mean ± std.

    ``min_events``: a cohort's C-index in a test split is computed from this many events
    on. ``warn_below_events``: a test set (a split, or one cohort's part of it) with
    fewer events than this gets a warning and a note in the report: its C-index rests
    on few comparable pairs and varies widely between splits. 10 is a convention, not a
    derived bound.
    """

    n_seeds: int = 5
    seed: int = 0
    test_size: float = 0.2
    survival_strata: SurvivalStrata = "event"
    min_events: int = 1
    warn_below_events: int = 10

    def __post_init__(self) -> None:
        check_int("protocol.n_seeds", self.n_seeds, 1)
        check_int("protocol.seed", self.seed, 0)
        check_probability("protocol.test_size", self.test_size, hint="the paper uses 0.2")
        check_choice(
            "protocol.survival_strata",
            self.survival_strata,
            SURVIVAL_STRATA,
            hint="stratify the splits by the event, or by cohort and event",
        )
        check_int("protocol.min_events", self.min_events, 1)
        check_int("protocol.warn_below_events", self.warn_below_events, 0, hint="0: never warn")


@dataclass
class TasksSection:
    """Which studies run. ``per_cohort_survival`` / ``transfer``: cohort names, or
    ``all``; ``robustness``: fractions of genes removed (e.g. [0.1, 0.3, 0.5]). For
    each list, ``[]`` and ``null`` both mean "none"."""

    classification: bool = True
    survival: bool = True
    per_cohort_survival: list[str] = field(default_factory=list)
    transfer: list[str] = field(default_factory=list)
    robustness: list[float] = field(default_factory=list)
    robustness_head: RobustnessHead = "mlp"
    similarity: bool = True

    def __post_init__(self) -> None:
        for name in ("classification", "survival", "similarity"):
            check_bool(f"tasks.{name}", getattr(self, name))
        self.per_cohort_survival = _names("tasks.per_cohort_survival", self.per_cohort_survival)
        self.transfer = _names("tasks.transfer", self.transfer)
        if self.robustness is None:
            self.robustness = []
        if not isinstance(self.robustness, list | tuple):
            raise ConfigError(
                f"tasks.robustness must be a list of fractions, e.g. [0.1, 0.3, 0.5], got "
                f"{self.robustness!r}"
            )
        fractions = [check_number("tasks.robustness[]", f) for f in self.robustness]
        if any(not 0.0 < f < 1.0 for f in fractions):
            raise ConfigError(
                f"tasks.robustness fractions must lie in (0, 1) (share of genes removed), got "
                f"{fractions}"
            )
        self.robustness = fractions
        check_choice("tasks.robustness_head", self.robustness_head, ROBUSTNESS_HEADS)


@dataclass
class ArmsSection:
    """BulkRNABert arms. ``mlp``/``svm``: heads on frozen embeddings (survival: Cox MLP);
    ``ia3``: IA3 fine-tuning; ``full``: full fine-tuning; ``random_init``: full fine-tuning
    from a random encoder (the paper's ablation); ``random_frozen``: the MLP head on a
    random encoder's embeddings (what the architecture gives without pre-training)."""

    mlp: bool = True
    svm: bool = True
    ia3: bool = True
    full: bool = False
    random_init: bool = False
    random_frozen: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_bool(f"arms.{f.name}", getattr(self, f.name))


@dataclass
class BaselinesSection:
    """Which baselines run and their sizes (paper: PCA 256, NMF 128).

    ``genes``: ``model`` (the genes the model reads), ``all``, or a number k (the k most
    variable genes of each split's training side).
    """

    pca_svm: bool = True
    nmf_svm: bool = True
    mlp: bool = True
    pca_cox: bool = True
    genes: str | int = "model"
    pca_components: int = 256
    nmf_components: int = 128
    nmf_max_iter: int = 300
    cox_components: int = 64
    cox_penalizer: float = 0.1
    svm_C: float = 1.0

    def __post_init__(self) -> None:
        for name in ("pca_svm", "nmf_svm", "mlp", "pca_cox"):
            check_bool(f"baselines.{name}", getattr(self, name))
        if isinstance(self.genes, int) and not isinstance(self.genes, bool):
            check_int("baselines.genes", self.genes, 1)
        elif self.genes not in ("model", "all"):
            raise ConfigError(
                f"baselines.genes must be 'model', 'all' or a number of top variable genes, "
                f"got {self.genes!r}"
            )
        for name in ("pca_components", "nmf_components", "nmf_max_iter", "cox_components"):
            check_int(f"baselines.{name}", getattr(self, name), 1)
        check_number("baselines.cox_penalizer", self.cox_penalizer, low=0.0)
        check_number("baselines.svm_C", self.svm_C, low=0.0, low_open=True)


@dataclass
class HeadsSection:
    """Keyword arguments of the heads: ``mlp`` -> MLPClassifier, ``cox`` -> CoxMLP,
    ``finetune`` -> FinetuneConfig (task, mode, seed are set per arm and split)."""

    mlp: dict[str, Any] = field(default_factory=dict)
    cox: dict[str, Any] = field(default_factory=dict)
    svm_C: float | list[float] = 1.0
    finetune: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("mlp", "cox", "finetune"):
            value = getattr(self, key)
            if value is None:  # YAML null: the defaults, as {} reads
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(
                    f"heads.{key} must be a mapping (key: value lines), got {value!r}"
                )
            setattr(self, key, _numbers(value))
        for key in ("task", "mode", "seed", "random_init"):
            if key in self.finetune:
                raise ConfigError(
                    f"heads.finetune.{key} is set by the protocol per arm and split; remove it "
                    "(choose arms with arms.ia3 / arms.full / arms.random_init)"
                )
        if isinstance(self.svm_C, list | tuple):
            if not self.svm_C:
                raise ConfigError("heads.svm_C is an empty list; give a number or C values")
            self.svm_C = [check_number("heads.svm_C[]", c) for c in self.svm_C]
        else:
            self.svm_C = check_number("heads.svm_C", self.svm_C)
        for key, value in (("mlp", self.mlp), ("cox", self.cox)):
            if "seed" in value:
                raise ConfigError(f"heads.{key}.seed is set per split by the protocol; remove it")
        self._check_estimators()

    def _check_estimators(self) -> None:
        """Build each head and the fine-tuning settings once, so a misspelt or bad
        hyper-parameter fails now, not after pre-training."""
        from bulkfm.tasks.classification import MLPClassifier
        from bulkfm.tasks.survival import CoxMLP

        for key, cls in (("mlp", MLPClassifier), ("cox", CoxMLP)):
            try:
                cls(**getattr(self, key))
            except TypeError as exc:
                raise ConfigError(f"heads.{key}: {exc}; see {cls.__name__} for the keys") from exc
            except ConfigError as exc:
                raise ConfigError(f"heads.{key}: {exc}") from exc
        from bulkfm.train.finetune import FinetuneConfig

        try:
            FinetuneConfig(**{"progress": False, **self.finetune})
        except TypeError as exc:
            raise ConfigError(f"heads.finetune: {exc}; see FinetuneConfig for the keys") from exc
        except ConfigError as exc:
            raise ConfigError(f"heads.finetune: {exc}") from exc


@dataclass
class ReportSection:
    """``title``: the report's heading; null (the default) derives one from the data
    (what was classified, how many classes and samples). Counts belong in the derived
    text, not in a fixed title, which goes stale when the data change."""

    plots: bool = True
    html: bool = True
    title: str | None = None

    def __post_init__(self) -> None:
        check_bool("report.plots", self.plots)
        check_bool("report.html", self.html)
        if self.title is not None and not isinstance(self.title, str):
            raise ConfigError(f"report.title must be a string or null, got {self.title!r}")


@dataclass
class EvaluateConfig(ConfigMixin):
    """Everything ``bulkfm evaluate`` needs; validated on construction.

    ``pretrain`` stays a mapping of :class:`~bulkfm.train.config.PretrainConfig` entries
    (its ``output_dir`` is set by the run); it is checked here, built when used.
    """

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    pretrain: dict[str, Any] | None = None
    protocol: ProtocolSection = field(default_factory=ProtocolSection)
    tasks: TasksSection = field(default_factory=TasksSection)
    arms: ArmsSection = field(default_factory=ArmsSection)
    baselines: BaselinesSection = field(default_factory=BaselinesSection)
    heads: HeadsSection = field(default_factory=HeadsSection)
    report: ReportSection = field(default_factory=ReportSection)
    output_dir: str = "runs/evaluate"
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        check_nonempty_str(
            "output_dir", self.output_dir, hint="give a folder for results and the report"
        )
        if self.num_threads is not None:
            check_int("num_threads", self.num_threads, 1)
        if self.pretrain is not None:
            if not isinstance(self.pretrain, dict):
                raise ConfigError(f"pretrain must be a mapping, got {self.pretrain!r}")
            self._check_pretrain()
        self._check_sources()

    def _check_pretrain(self) -> None:
        from bulkfm.train.config import PretrainConfig

        trial = {**(self.pretrain or {}), "output_dir": "unused"}
        build(PretrainConfig, trial, section="pretrain")  # raises ConfigError naming a bad key

    def _check_sources(self) -> None:
        sources = [s for s in ("path", "embeddings") if getattr(self.model, s)]
        if self.pretrain is not None:
            sources.append("pretrain")
        if not sources:
            raise ConfigError(
                "no model: set model.path (a pre-trained checkpoint), a pretrain: section "
                "(pre-train here first) or model.embeddings (precomputed, frozen arms only)"
            )
        if self.model.path and self.pretrain is not None:
            raise ConfigError(
                "both model.path and a pretrain: section are set; keep one: to evaluate the "
                "checkpoint, remove the pretrain: section (or --set pretrain=null; "
                "`bulkfm evaluate --model DIR` does both), or drop model.path to pre-train here"
            )
        if self.model.embeddings and not (self.model.path or self.pretrain is not None):
            needs_model = [
                name
                for name, on in (
                    ("arms.ia3", self.arms.ia3),
                    ("arms.full", self.arms.full),
                    ("arms.random_init", self.arms.random_init),
                    ("arms.random_frozen", self.arms.random_frozen),
                    ("tasks.robustness", bool(self.tasks.robustness)),
                )
                if on
            ]
            if needs_model:
                raise ConfigError(
                    f"{', '.join(needs_model)} need the model itself but only "
                    "model.embeddings is given; set model.path or switch them off "
                    "(e.g. --set arms.ia3=false)"
                )
        if self.baselines.genes == "model" and not (self.model.path or self.pretrain is not None):
            raise ConfigError(
                "baselines.genes=model needs a model to know its genes; set baselines.genes to "
                "'all' or a number of top variable genes"
            )
