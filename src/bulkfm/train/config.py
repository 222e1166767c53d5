"""Pre-training configuration: one validated dataclass, loadable from YAML.

The config is plain data (no torch import) so the CLI can parse and check it
before anything heavy is loaded. Sections mirror the YAML layout::

    model: {...}      # BulkRNABertConfig fields except n_genes (set by the data)
    data: {...}       # which .h5ad, which layer, gene subset, held-out fraction
    optim: {...}      # AdamW, warm-up + cosine schedule, batch and accumulation
    masking: {...}    # BERT recipe (15% selected; 80/10/10)
    seed, output_dir, mixed_precision, ...   # run-level settings
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bulkfm.errors import ConfigError

MIXED_PRECISION_CHOICES = ("no", "bf16")


def _positive_int(value: int, name: str) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}; set it to 1 or more")


@dataclass
class ModelSection:
    """BulkRNABert architecture; ``n_genes`` is not here because the data decides it."""

    n_expressions_bins: int = 64
    embed_dim: int = 256
    init_gene_embed_dim: int = 200
    use_gene_embedding: bool = True
    project_gene_embedding: bool = True
    num_attention_heads: int = 8
    key_size: int | None = None
    ffn_embed_dim: int = 512
    num_layers: int = 4
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in (
            "n_expressions_bins",
            "embed_dim",
            "init_gene_embed_dim",
            "num_attention_heads",
            "ffn_embed_dim",
            "num_layers",
        ):
            _positive_int(getattr(self, name), f"model.{name}")
        if self.n_expressions_bins < 2:
            raise ConfigError(
                f"model.n_expressions_bins must be at least 2, got {self.n_expressions_bins}; "
                "BulkRNABert uses 64"
            )
        if self.key_size is None and self.embed_dim % self.num_attention_heads:
            raise ConfigError(
                f"model.embed_dim ({self.embed_dim}) is not divisible by "
                f"model.num_attention_heads ({self.num_attention_heads}); change one of them "
                "or set model.key_size explicitly"
            )
        if self.key_size is not None:
            _positive_int(self.key_size, "model.key_size")
        if not (self.layer_norm_eps > 0 and math.isfinite(self.layer_norm_eps)):
            raise ConfigError(
                f"model.layer_norm_eps must be a small positive number, got {self.layer_norm_eps}"
            )


@dataclass
class DataSection:
    """Where the expression matrix comes from and which part of it is used."""

    path: str | None = None
    layer: str | None = None
    top_k_variable_genes: int | None = None
    holdout_fraction: float = 0.05
    group_key: str | None = "patient"
    missing_layer: str | None = "missing"

    def __post_init__(self) -> None:
        if self.path is not None and not str(self.path).strip():
            raise ConfigError("data.path is empty; give the path of a .h5ad file (X = TPM)")
        if self.top_k_variable_genes is not None:
            _positive_int(self.top_k_variable_genes, "data.top_k_variable_genes")
        if not (0.0 <= self.holdout_fraction < 1.0):
            raise ConfigError(
                f"data.holdout_fraction must be in [0, 1), got {self.holdout_fraction}; "
                "the paper holds out 0.05 (use 0 to skip held-out metrics)"
            )


@dataclass
class OptimSection:
    """AdamW with linear warm-up then cosine decay; accumulation sized by tokens."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.0
    micro_batch_size: int = 8
    target_tokens_per_step: int | None = None
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr must be a positive number, got {self.lr}; try 1e-4")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(
                f"optim.weight_decay must be >= 0, got {self.weight_decay}; 0.01 is usual"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(
                f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}; "
                "e.g. [0.9, 0.999]"
            )
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be positive, got {self.eps}; e.g. 1e-8")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _positive_int(self.max_steps, "optim.max_steps")
        _positive_int(self.micro_batch_size, "optim.micro_batch_size")
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise ConfigError(
                f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio} "
                "(the fraction of lr left at the end of the cosine)"
            )
        if self.target_tokens_per_step is not None:
            _positive_int(self.target_tokens_per_step, "optim.target_tokens_per_step")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(
                f"optim.max_grad_norm must be positive or null (no clipping), "
                f"got {self.max_grad_norm}"
            )


@dataclass
class MaskingConfig:
    """BERT masking recipe: select ``mask_prob`` of the eligible genes of each sample;
    of those, ``mask_fraction`` become [MASK], ``random_fraction`` a random bin and
    the rest keep their token."""

    mask_prob: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not (0.0 < self.mask_prob <= 1.0):
            raise ConfigError(
                f"masking.mask_prob must be in (0, 1], got {self.mask_prob}; BERT uses 0.15"
            )
        for name in ("mask_fraction", "random_fraction"):
            value = getattr(self, name)
            if not (0.0 <= value <= 1.0):
                raise ConfigError(f"masking.{name} must be in [0, 1], got {value}")
        if self.mask_fraction + self.random_fraction > 1.0 + 1e-9:
            raise ConfigError(
                f"masking.mask_fraction + masking.random_fraction = "
                f"{self.mask_fraction + self.random_fraction} exceeds 1; BERT uses 0.8 + 0.1"
            )


@dataclass
class PretrainConfig:
    """Everything one MLM pre-training run needs; validated on construction."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    output_dir: str = "runs/pretrain"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 500
    eval_batch_size: int | None = None
    log_every: int = 1
    tensorboard: bool = False
    num_workers: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ConfigError(
                f"mixed_precision must be one of {list(MIXED_PRECISION_CHOICES)}, "
                f"got {self.mixed_precision!r}"
            )
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if not str(self.output_dir).strip():
            raise ConfigError("output_dir is empty; give a folder for checkpoints and logs")
        for name in ("checkpoint_every", "keep_checkpoints", "eval_every", "log_every"):
            _positive_int(getattr(self, name), name)
        if self.eval_batch_size is not None:
            _positive_int(self.eval_batch_size, "eval_batch_size")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.num_threads is not None:
            _positive_int(self.num_threads, "num_threads")

    # ------------------------------------------------------------------ derived
    def grad_accum_steps(self, n_genes: int, world_size: int = 1) -> int:
        """Micro-steps per optimiser step so one step sees ~``target_tokens_per_step``.

        Tokens of one micro-step across all processes = micro batch x genes x processes,
        so the global batch (and the optimisation) does not change with the process count
        whenever the micro batch is scaled down accordingly.
        """
        target = self.optim.target_tokens_per_step
        if target is None:
            return 1
        per_micro_step = self.optim.micro_batch_size * n_genes * world_size
        return max(1, math.ceil(target / per_micro_step))

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> PretrainConfig:
        return _build(cls, raw or {}, "")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
        """Read a YAML file; ``overrides`` are ``section.key=value`` strings (YAML values)."""
        return cls.from_dict(read_yaml_config(path, overrides))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def read_yaml_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A config file's mapping with ``section.key=value`` overrides applied (YAML values)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping (key: value lines), got {type(raw).__name__}"
        )
    return apply_overrides(raw or {}, overrides or [])


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``a.b=value`` overrides applied (values parsed as YAML)."""
    import copy

    import yaml

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} is not of the form key=value; e.g. --set optim.lr=3e-4"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; "
            f"valid keys here: {[prefix + n for n in names]}"
        )
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check/convert one YAML value to its field type (YAML reads ``1e-4`` as a string)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("null", "none"))
        if is_null and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} values, got {value!r}")
        return tuple(
            _coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float | str):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number) and number == int(number):
                return int(number)
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str | Path):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value
