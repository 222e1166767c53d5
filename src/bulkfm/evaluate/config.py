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
key and what to write instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bulkfm.errors import ConfigError

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

SURVIVAL_STRATA = ("event", "cohort_event")
ROBUSTNESS_HEADS = ("mlp", "svm")


# --------------------------------------------------------------------------- value checks
def _int(value: Any, name: str, minimum: int | None = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(value: Any, name: str) -> float:
    """YAML reads ``1e-4`` (no dot) as a string: accept numeric strings too."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return number


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _str_or_none(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str | Path) and str(value).strip():
        return str(value)
    raise ConfigError(f"{name} must be a non-empty string or null, got {value!r}")


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping (key: value lines), got {value!r}")
    return dict(value)


def _str_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str | int) for v in value):
        raise ConfigError(f"{name} must be a list of names, got {value!r}")
    return [str(v) for v in value]


def _numbers(values: dict[str, Any]) -> dict[str, Any]:
    """Numeric strings (YAML reads ``1e-4`` as one) -> float; lists -> tuples (layer sizes)."""
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
    label_key: str = "cohort"
    group_key: str | None = "patient"
    cohort_key: str = "cohort"
    time_key: str = "survival_time"
    event_key: str = "survival_event"
    select: dict[str, Any] = field(default_factory=dict)
    dedupe_key: str | None = "sample_id"
    drop_small_classes: bool = False

    def __post_init__(self) -> None:
        self.path = _str_or_none(self.path, "data.path")
        if self.simulate is not None:
            self.simulate = _mapping(self.simulate, "data.simulate")
        for name in ("label_key", "cohort_key", "time_key", "event_key"):
            if _str_or_none(getattr(self, name), f"data.{name}") is None:
                raise ConfigError(f"data.{name} must name an obs column, got null")
        self.group_key = _str_or_none(self.group_key, "data.group_key")
        self.dedupe_key = _str_or_none(self.dedupe_key, "data.dedupe_key")
        self.select = _mapping(self.select, "data.select")
        self.drop_small_classes = _bool(self.drop_small_classes, "data.drop_small_classes")


@dataclass
class ModelSection:
    """A bulkfm (or official-format, with ``genes`` + ``normalization_factor``) checkpoint,
    or ``embeddings``: precomputed ones (.parquet/.npy/.h5ad) for the frozen arms only."""

    path: str | None = None
    embeddings: str | None = None
    genes: str | None = None
    normalization_factor: float | None = None
    layer: int = -1
    batch_size: int = 16
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.path = _str_or_none(self.path, "model.path")
        self.embeddings = _str_or_none(self.embeddings, "model.embeddings")
        self.genes = _str_or_none(self.genes, "model.genes")
        if self.normalization_factor is not None:
            self.normalization_factor = _float(
                self.normalization_factor, "model.normalization_factor"
            )
        self.layer = _int(self.layer, "model.layer", minimum=None)
        self.batch_size = _int(self.batch_size, "model.batch_size")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"model.device must be e.g. 'cpu' or 'cuda', got {self.device!r}")


@dataclass
class ProtocolSection:
    """Paper protocol: 80/20 patient-grouped splits, 5 seeds, mean ± std."""

    n_seeds: int = 5
    seed: int = 0
    test_size: float = 0.2
    survival_strata: str = "event"
    min_events: int = 1

    def __post_init__(self) -> None:
        self.n_seeds = _int(self.n_seeds, "protocol.n_seeds")
        self.seed = _int(self.seed, "protocol.seed", minimum=0)
        self.test_size = _float(self.test_size, "protocol.test_size")
        if not 0.0 < self.test_size < 1.0:
            raise ConfigError(
                f"protocol.test_size must lie in (0, 1), got {self.test_size}; the paper uses 0.2"
            )
        if self.survival_strata not in SURVIVAL_STRATA:
            raise ConfigError(
                f"protocol.survival_strata must be one of {SURVIVAL_STRATA} (stratify the "
                f"splits by the event, or by cohort and event), got {self.survival_strata!r}"
            )
        self.min_events = _int(self.min_events, "protocol.min_events")


@dataclass
class TasksSection:
    """Which studies run. ``per_cohort_survival`` / ``transfer``: cohort names, or
    ``all``; ``robustness``: fractions of genes removed (e.g. [0.1, 0.3, 0.5])."""

    classification: bool = True
    survival: bool = True
    per_cohort_survival: list[str] = field(default_factory=list)
    transfer: list[str] = field(default_factory=list)
    robustness: list[float] = field(default_factory=list)
    robustness_head: str = "mlp"
    similarity: bool = True

    def __post_init__(self) -> None:
        for name in ("classification", "survival", "similarity"):
            setattr(self, name, _bool(getattr(self, name), f"tasks.{name}"))
        self.per_cohort_survival = _str_list(self.per_cohort_survival, "tasks.per_cohort_survival")
        self.transfer = _str_list(self.transfer, "tasks.transfer")
        if not isinstance(self.robustness, list | tuple):
            raise ConfigError(
                f"tasks.robustness must be a list of fractions, e.g. [0.1, 0.3, 0.5], got "
                f"{self.robustness!r}"
            )
        fractions = [_float(f, "tasks.robustness[]") for f in self.robustness]
        if any(not 0.0 < f < 1.0 for f in fractions):
            raise ConfigError(
                f"tasks.robustness fractions must lie in (0, 1) (share of genes removed), got "
                f"{fractions}"
            )
        self.robustness = fractions
        if self.robustness_head not in ROBUSTNESS_HEADS:
            raise ConfigError(
                f"tasks.robustness_head must be one of {ROBUSTNESS_HEADS}, got "
                f"{self.robustness_head!r}"
            )


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
            setattr(self, f.name, _bool(getattr(self, f.name), f"arms.{f.name}"))


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
            setattr(self, name, _bool(getattr(self, name), f"baselines.{name}"))
        if not (self.genes in ("model", "all") or isinstance(self.genes, int)):
            raise ConfigError(
                f"baselines.genes must be 'model', 'all' or a number of top variable genes, "
                f"got {self.genes!r}"
            )
        if isinstance(self.genes, int):
            self.genes = _int(self.genes, "baselines.genes")
        for name in ("pca_components", "nmf_components", "nmf_max_iter", "cox_components"):
            setattr(self, name, _int(getattr(self, name), f"baselines.{name}"))
        self.cox_penalizer = _float(self.cox_penalizer, "baselines.cox_penalizer")
        self.svm_C = _float(self.svm_C, "baselines.svm_C")
        if self.cox_penalizer < 0 or self.svm_C <= 0:
            raise ConfigError("baselines.cox_penalizer must be >= 0 and baselines.svm_C > 0")


@dataclass
class HeadsSection:
    """Keyword arguments of the heads: ``mlp`` -> MLPClassifier, ``cox`` -> CoxMLP,
    ``finetune`` -> FinetuneConfig (task, mode, seed are set per arm and split)."""

    mlp: dict[str, Any] = field(default_factory=dict)
    cox: dict[str, Any] = field(default_factory=dict)
    svm_C: float | list[float] = 1.0
    finetune: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mlp = _mapping(self.mlp, "heads.mlp")
        self.cox = _mapping(self.cox, "heads.cox")
        self.finetune = _mapping(self.finetune, "heads.finetune")
        for key in ("task", "mode", "seed", "random_init"):
            if key in self.finetune:
                raise ConfigError(
                    f"heads.finetune.{key} is set by the protocol per arm and split; remove it "
                    "(choose arms with arms.ia3 / arms.full / arms.random_init)"
                )
        if isinstance(self.svm_C, list | tuple):
            if not self.svm_C:
                raise ConfigError("heads.svm_C is an empty list; give a number or C values")
            self.svm_C = [_float(c, "heads.svm_C[]") for c in self.svm_C]
        else:
            self.svm_C = _float(self.svm_C, "heads.svm_C")
        for key in ("mlp", "cox", "finetune"):
            setattr(self, key, _numbers(getattr(self, key)))
        for key, value in (("mlp", self.mlp), ("cox", self.cox)):
            if "seed" in value:
                raise ConfigError(f"heads.{key}.seed is set per split by the protocol; remove it")
        self._check_estimators()

    def _check_estimators(self) -> None:
        """Build each head once so a misspelt or bad hyper-parameter fails now, not after
        pre-training (fine-tuning settings are checked when the run starts: torch)."""
        from bulkfm.tasks.classification import MLPClassifier
        from bulkfm.tasks.survival import CoxMLP

        for key, cls in (("mlp", MLPClassifier), ("cox", CoxMLP)):
            try:
                cls(**getattr(self, key))
            except TypeError as exc:
                raise ConfigError(f"heads.{key}: {exc}; see {cls.__name__} for the keys") from exc
            except ConfigError as exc:
                raise ConfigError(f"heads.{key}: {exc}") from exc


@dataclass
class ReportSection:
    plots: bool = True
    html: bool = True
    title: str = "BulkRNABert evaluation"

    def __post_init__(self) -> None:
        self.plots = _bool(self.plots, "report.plots")
        self.html = _bool(self.html, "report.html")
        if not isinstance(self.title, str):
            raise ConfigError(f"report.title must be a string, got {self.title!r}")


_SECTIONS: dict[str, type] = {
    "data": DataSection,
    "model": ModelSection,
    "protocol": ProtocolSection,
    "tasks": TasksSection,
    "arms": ArmsSection,
    "baselines": BaselinesSection,
    "heads": HeadsSection,
    "report": ReportSection,
}


@dataclass
class EvaluateConfig:
    """Everything ``bulkfm evaluate`` needs; validated on construction."""

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
        if not str(self.output_dir).strip():
            raise ConfigError("output_dir is empty; give a folder for results and the report")
        self.output_dir = str(self.output_dir)
        if self.num_threads is not None:
            self.num_threads = _int(self.num_threads, "num_threads")
        if self.pretrain is not None:
            self.pretrain = _mapping(self.pretrain, "pretrain")
            self._check_pretrain()
        self._check_sources()

    def _check_pretrain(self) -> None:
        from bulkfm.train.config import PretrainConfig

        trial = {**(self.pretrain or {}), "output_dir": "unused"}
        PretrainConfig.from_dict(trial)  # raises ConfigError naming a bad key

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
                "both model.path and a pretrain: section are set; keep one (model.path uses "
                "an existing checkpoint, pretrain: trains a new one)"
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

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> EvaluateConfig:
        raw = _mapping(raw, "config")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {names}")
        kwargs: dict[str, Any] = {}
        for name, value in raw.items():
            section = _SECTIONS.get(name)
            kwargs[name] = _section(section, value, name) if section else value
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> EvaluateConfig:
        """Read a YAML file; ``overrides`` are ``section.key=value`` strings (YAML values)."""
        from bulkfm.train.config import read_yaml_config

        return cls.from_dict(read_yaml_config(path, overrides))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _section(cls: type, raw: Any, name: str) -> Any:
    values = _mapping(raw, name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid keys here: "
            f"{[f'{name}.{k}' for k in known]}"
        )
    return cls(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
