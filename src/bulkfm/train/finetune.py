"""End-to-end fine-tuning of BulkRNABert + a task head (classification or Cox survival).

Three ways to adapt the encoder, the paper's comparisons:

- ``"ia3"``: IA3 vectors (:mod:`bulkfm.models.ia3`) and the head train, the encoder
  weights stay bit-identical (the paper's best classifier);
- ``"full"``: every encoder weight used by the task trains with the head;
- ``"frozen"``: only the head trains, on the frozen encoder's embeddings (computed once
  from the model, which is exact because the frozen encoder is deterministic).

``random_init=True`` keeps the architecture but starts from a fresh random encoder: the
pre-training ablation (the paper compares pre-trained vs random init + full tuning).

The sample embedding is the mean of one layer's output over genes, leaving out [MASK]
positions (genes absent from the sample), exactly as :meth:`BulkRNABert.embed`, but
differentiable so the encoder and adapters receive gradients.

Small data (hundreds to thousands of samples), so this is a plain torch loop; the
accelerate engine of pre-training is not needed. Early stopping watches the loss on a
validation set: ``adata_val`` when given, else a patient-grouped, stratified part of the
training set, so no patient's samples sit on both sides.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bulkfm import schema as keys
from bulkfm.config import (
    ConfigMixin,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_probability,
)
from bulkfm.errors import CheckpointError, ClinicalMatchError, ConfigError, SplitError
from bulkfm.io import atomic_path, write_text
from bulkfm.models.bulkrnabert import BulkRNABert, BulkRNABertConfig, check_tokenizer_matches
from bulkfm.models.ia3 import apply_ia3, count_parameters, get_adapter_params
from bulkfm.tokenize import DEFAULT_MIN_GENE_COVERAGE, GeneCoverage, gene_coverage

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.models.heads import MLPHead
    from bulkfm.tokenize import BinTokenizer

logger = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "FinetuneNetwork", "FinetunedModel", "finetune"]

TASKS = ("classification", "survival")
MODES = ("ia3", "full", "frozen")
TIES = ("efron", "breslow")
# IA3 vectors tolerate (and need) a larger step than pre-trained weights; the IA3 paper
# uses 3e-3, full fine-tuning of a transformer is usually stable around 1e-4.
DEFAULT_LR = {"ia3": 3e-3, "full": 1e-4, "frozen": 1e-3}
DEFAULT_HIDDEN = {"classification": (256, 128), "survival": (512, 256)}
FORMAT = "bulkfm.finetune/1"
META_FILE = "finetune.json"
WEIGHTS_FILE = "finetune.safetensors"
SURVIVAL_COLUMNS = (keys.SURVIVAL_TIME, keys.SURVIVAL_EVENT)


# --------------------------------------------------------------------------- config
@dataclass
class FinetuneConfig(ConfigMixin):
    """Fine-tuning hyper-parameters; ``None`` fields take task/mode defaults.

    ``lr=None`` uses :data:`DEFAULT_LR` for the mode; ``hidden=None`` the paper's head
    (classification 256, 128; survival 512, 256). ``patience=None`` trains all epochs
    without a validation set (unless ``adata_val`` is given, whose loss is then only
    recorded). ``layer`` indexes [embeddings, block 1, ..., block L] like ``embed``.
    ``min_gene_coverage``: the data may lack some of the model's genes (they are fed as
    [MASK]); below this mean fraction measured it is an error
    (:func:`bulkfm.tokenize.gene_coverage`).
    """

    task: str = "classification"
    mode: str = "ia3"
    random_init: bool = False
    lr: float | None = None
    weight_decay: float = 0.0
    epochs: int = 20
    batch_size: int = 8
    patience: int | None = 5
    val_fraction: float = 0.1
    dropout: float = 0.1
    hidden: tuple[int, ...] | None = None
    seed: int = 0
    layer: int = -1
    ties: Literal["efron", "breslow"] = "efron"
    max_grad_norm: float | None = 1.0
    min_gene_coverage: float = DEFAULT_MIN_GENE_COVERAGE
    device: str = "cpu"
    progress: bool | None = None

    def __post_init__(self) -> None:
        check_choice("task", self.task, TASKS)
        check_choice("mode", self.mode, MODES, hint="IA3 adapters, all weights, head only")
        check_choice("ties", self.ties, TIES)
        check_bool("random_init", self.random_init)
        check_bool("progress", self.progress, optional=True)
        if self.lr is not None:
            check_number("lr", self.lr, low=0.0, low_open=True, hint="or None for the default")
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        if self.patience is not None:
            check_int(
                "patience",
                self.patience,
                1,
                hint="epochs without improvement, or None to train every epoch",
            )
        check_probability(
            "val_fraction",
            self.val_fraction,
            hint="e.g. 0.1 holds out a tenth of the training patients for early stopping",
        )
        check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_int("seed", self.seed, 0)
        check_int("layer", self.layer, hint="-1 = last block")
        check_number(
            "min_gene_coverage",
            self.min_gene_coverage,
            low=0.0,
            high=1.0,
            hint="the smallest mean fraction of the model's genes the data must measure",
        )
        if self.max_grad_norm is not None:
            check_number(
                "max_grad_norm",
                self.max_grad_norm,
                low=0.0,
                low_open=True,
                hint="or None for no clipping",
            )
        if self.hidden is not None:
            if isinstance(self.hidden, int | str) or not all(
                isinstance(h, numbers.Integral) and not isinstance(h, bool) and h > 0
                for h in self.hidden
            ):
                raise ConfigError(
                    f"hidden must be a sequence of positive layer sizes, e.g. (256, 128), or "
                    f"None for the paper's head, got {self.hidden!r}"
                )
            self.hidden = tuple(int(h) for h in self.hidden)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"device {self.device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:0'"
            ) from exc

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.mode]

    @property
    def head_hidden(self) -> tuple[int, ...]:
        return self.hidden if self.hidden is not None else DEFAULT_HIDDEN[self.task]


# --------------------------------------------------------------------------- network
class FinetuneNetwork(nn.Module):
    """Encoder -> masked mean pooling of one layer -> head."""

    pool_mean: torch.Tensor
    pool_scale: torch.Tensor

    def __init__(self, encoder: BulkRNABert, head: MLPHead, layer: int = -1) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.depth = _layer_depth(encoder.config, layer)
        # Fixed standardisation of the pooled embedding (training-set statistics at the
        # start, see fit_standardizer), as the frozen-embedding heads standardise their
        # inputs: raw pooled features have tiny, uneven scales the head trains poorly on.
        dim = encoder.config.embed_dim
        self.register_buffer("pool_mean", torch.zeros(dim))
        self.register_buffer("pool_scale", torch.ones(dim))

    def standardize(self, pooled: torch.Tensor) -> torch.Tensor:
        return (pooled - self.pool_mean) / self.pool_scale

    @torch.no_grad()
    def fit_standardizer(self, tokens: torch.Tensor, batch_size: int) -> None:
        was_training = self.training
        self.eval()
        device = self.pool_mean.device
        pooled = _run_batches(lambda t: self.pool(t.long().to(device)), tokens, batch_size)
        self.train(was_training)
        if pooled.shape[0] < 2:
            return
        self.pool_mean.copy_(pooled.mean(0))
        self.pool_scale.copy_(pooled.std(0).clamp(min=1e-6))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean over genes of block ``depth``'s output, [MASK] positions left out."""
        x = self.encoder.hidden_state(tokens, layer=self.depth)
        keep = (tokens != self.encoder.config.mask_token_id).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.standardize(self.pool(tokens)))


def _layer_depth(config: BulkRNABertConfig, layer: int) -> int:
    n = config.num_layers
    if not -(n + 1) <= layer <= n:
        raise ConfigError(
            f"layer {layer} does not exist in a {n}-block model: use 0 (embeddings) to {n} "
            f"(last block), or negative indices down to {-(n + 1)}"
        )
    return layer % (n + 1)


def _build_head(config: FinetuneConfig, in_dim: int, out_dim: int) -> MLPHead:
    from bulkfm.models.heads import classification_head, survival_head

    kw: dict[str, Any] = {"hidden": config.head_hidden, "dropout": float(config.dropout)}
    if config.task == "classification":
        return classification_head(in_dim, out_dim, **kw)
    return survival_head(in_dim, **kw)


def _used_encoder_params(encoder: BulkRNABert, depth: int, prefix: str) -> set[str]:
    """Names of encoder parameters the pooled embedding depends on (not the LM head,
    not the blocks above the pooled layer): the ones worth training."""
    unused = ["lm_head."] + [
        f"transformer_layers.{i}." for i in range(depth, len(encoder.transformer_layers))
    ]
    return {
        prefix + name
        for name, _ in encoder.named_parameters()
        if not any(name.startswith(u) for u in unused)
    }


def _set_trainable(network: FinetuneNetwork, mode: str) -> None:
    used = _used_encoder_params(network.encoder, network.depth, "encoder.")
    head = {n for n, _ in network.named_parameters() if n.startswith("head.")}
    if mode == "ia3":
        trainable = (set(get_adapter_params(network)) & used) | head
    elif mode == "full":
        trainable = used | head
    else:
        trainable = head
    for name, p in network.named_parameters():
        p.requires_grad_(name in trainable)


def _param_report(network: FinetuneNetwork) -> dict[str, int | float]:
    counts = dict(count_parameters(network))
    counts["head"] = sum(p.numel() for p in network.head.parameters())
    counts["encoder"] = sum(p.numel() for p in network.encoder.parameters())
    return counts


# --------------------------------------------------------------------------- targets
@dataclass
class _Targets:
    """Training targets in model form: class codes, or (time, event)."""

    y: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None

    def subset(self, idx: np.ndarray) -> _Targets:
        return _Targets(*(None if a is None else a[idx] for a in (self.y, self.time, self.event)))

    def strata(self) -> np.ndarray:
        if self.y is not None:
            return self.y
        assert self.event is not None  # survival targets always carry events
        return self.event.astype(int)


def _column(adata: ad.AnnData, name: str) -> np.ndarray:
    if name not in adata.obs:
        raise ConfigError(
            f"adata.obs has no column {name!r}; available: {list(adata.obs.columns)[:10]}"
        )
    return adata.obs[name].to_numpy()


def _class_labels(adata: ad.AnnData, y: Any) -> np.ndarray:
    values = _column(adata, y) if isinstance(y, str) else y
    if values is None:
        raise ConfigError("classification needs labels: pass an array or an obs column name")
    if isinstance(values, pd.Series | pd.Index | pd.Categorical):
        values = np.asarray(values, dtype=object)
    values = np.asarray(values)
    if values.ndim != 1 or values.shape[0] != adata.n_obs:
        raise ConfigError(
            f"labels have shape {values.shape} but the AnnData has {adata.n_obs} samples; "
            "pass one label per sample in obs order"
        )
    missing = pd.isna(pd.Series(values, dtype=object)).to_numpy()
    if missing.any():
        raise ClinicalMatchError(
            f"{int(missing.sum())} labels are missing (first at sample "
            f"{adata.obs_names[np.flatnonzero(missing)[0]]!r}); drop those samples first, "
            "e.g. adata[adata.obs[col].notna()]"
        )
    return values


def _survival_arrays(adata: ad.AnnData, y: Any) -> tuple[np.ndarray, np.ndarray]:
    from bulkfm.metrics import validate_survival

    if y is None:
        time, event = (_column(adata, c) for c in SURVIVAL_COLUMNS)
    elif isinstance(y, pd.DataFrame):
        cols = [c for c in (SURVIVAL_COLUMNS, ("time", "event")) if set(c) <= set(y.columns)]
        if not cols:
            raise ConfigError(
                "a survival DataFrame needs columns survival_time/survival_event (or "
                f"time/event), got {list(y.columns)[:10]}"
            )
        time, event = (y[c].to_numpy() for c in cols[0])
    elif isinstance(y, tuple | list) and len(y) == 2:
        time, event = (np.asarray(a) for a in y)
    else:
        raise ConfigError(
            "survival targets must be (time, event) arrays, a DataFrame with "
            "survival_time/survival_event, or None to read those obs columns; got "
            f"{type(y).__name__}"
        )
    if np.shape(time) != (adata.n_obs,) or np.shape(event) != (adata.n_obs,):
        raise ConfigError(
            f"survival time {np.shape(time)} and event {np.shape(event)} must have one entry "
            f"per sample ({adata.n_obs}), in obs order"
        )
    t, e = validate_survival(time, event)
    return t, e.astype(np.float32)


def _targets(
    task: str, adata: ad.AnnData, y: Any, classes: np.ndarray | None
) -> tuple[_Targets, np.ndarray | None]:
    """Targets and the class list (fitted on the training labels when ``classes`` is None)."""
    if task == "survival":
        time, event = _survival_arrays(adata, y)
        return _Targets(time=time, event=event), None
    labels = _class_labels(adata, y)
    if classes is None:
        try:
            classes = np.unique(labels)
        except TypeError as exc:
            raise ConfigError(
                "labels mix types that cannot be sorted (e.g. strings and numbers); convert "
                "them to one type, e.g. labels.astype(str)"
            ) from exc
        if classes.size < 2:
            raise ClinicalMatchError(
                f"only one class ({classes[0]!r}) in the training labels; classification "
                "needs at least two"
            )
    codes = np.searchsorted(classes, labels)
    codes = np.clip(codes, 0, classes.size - 1)
    unknown = classes[codes] != labels
    if unknown.any():
        raise ClinicalMatchError(
            f"validation labels {sorted(set(labels[unknown].tolist()))[:5]} do not occur in "
            "the training labels; the classifier cannot predict them"
        )
    return _Targets(y=codes.astype(np.int64)), classes


# --------------------------------------------------------------------------- tokens
def _tokens(tokenizer: BinTokenizer, adata: ad.AnnData) -> torch.Tensor:
    """Compact token matrix (uint8 when the vocabulary fits: 8x smaller than int64)."""
    tokens = tokenizer.encode_adata(adata)
    dtype = np.uint8 if tokenizer.mask_token_id < 256 else np.int16
    return torch.from_numpy(tokens.astype(dtype))


def _take(tokens: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    return tokens[torch.from_numpy(np.array(idx, dtype=np.int64))]  # split arrays are read-only


def _run_batches(
    fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, batch_size: int
) -> torch.Tensor:
    return (
        torch.cat([fn(inputs[i : i + batch_size]) for i in range(0, inputs.shape[0], batch_size)])
        if inputs.shape[0]
        else torch.empty(0)
    )


# --------------------------------------------------------------------------- result
class FinetunedModel:
    """A fine-tuned encoder + head with its tokenizer: predict, embed, save and load."""

    def __init__(
        self,
        network: FinetuneNetwork,
        tokenizer: BinTokenizer,
        config: FinetuneConfig,
        *,
        classes: Sequence[Any] | np.ndarray | None = None,
        history: list[dict[str, Any]] | None = None,
        best_epoch: int | None = None,
        param_counts: dict[str, int | float] | None = None,
        coverage: dict[str, Any] | None = None,
    ) -> None:
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.classes_ = None if classes is None else np.asarray(classes)
        self.history = list(history or [])
        self.best_epoch = best_epoch
        self.param_counts = dict(param_counts or _param_report(network))
        #: gene coverage of the training data (:meth:`GeneCoverage.to_dict`), when known
        self.coverage_ = coverage

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def __repr__(self) -> str:
        c = self.param_counts
        return (
            f"FinetunedModel(task={self.task!r}, mode={self.config.mode!r}, "
            f"trainable={c['trainable']}/{c['total']})"
        )

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def _outputs(self, adata: ad.AnnData, fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        self.network.eval()
        _coverage(self.tokenizer, adata, self.config, log=False)
        tokens = _tokens(self.tokenizer, adata)
        device = self.device
        out = _run_batches(
            lambda t: fn(t.long().to(device)).float().cpu(), tokens, self.config.batch_size
        )
        return out.numpy()

    def embed(self, adata: ad.AnnData) -> np.ndarray:
        """[n_samples, embed_dim] pooled embeddings of the (fine-tuned) encoder."""
        return self._outputs(adata, self.network.pool)

    def predict_proba(self, adata: ad.AnnData) -> np.ndarray:
        """[n_samples, n_classes] class probabilities, columns in ``classes_`` order."""
        self._need("classification", "predict_proba")
        return self._outputs(adata, lambda t: self.network(t).softmax(dim=-1))

    def predict(self, adata: ad.AnnData) -> np.ndarray:
        """Most probable class label of each sample."""
        proba = self.predict_proba(adata)
        assert self.classes_ is not None  # set for every classification model
        return self.classes_[proba.argmax(axis=1)]

    def predict_risk(self, adata: ad.AnnData) -> np.ndarray:
        """[n_samples] Cox log-risk (higher = shorter survival)."""
        self._need("survival", "predict_risk")
        return self._outputs(adata, lambda t: self.network(t)[:, 0])

    def _need(self, task: str, method: str) -> None:
        if self.task != task:
            raise ConfigError(
                f"{method} needs a {task} model but this one was fine-tuned for {self.task}"
            )

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """finetune.json + finetune.safetensors + tokenizer.json; self-contained."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        head = self.network.head
        meta = {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "encoder_config": self.network.encoder.config.to_dict(),
            "head": {"in_dim": int(head.in_dim), "out_dim": int(head.out_dim)},
            "classes": None if self.classes_ is None else _jsonable_classes(self.classes_),
            "history": self.history,
            "best_epoch": self.best_epoch,
            "param_counts": self.param_counts,
            "gene_coverage": self.coverage_,
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
        self.tokenizer.save(directory)
        write_text(json.dumps(meta, indent=1) + "\n", directory / META_FILE)
        return directory

    @classmethod
    def load(
        cls, directory: str | os.PathLike, *, device: str | torch.device | None = None
    ) -> FinetunedModel:
        """Rebuild from :meth:`save` output (no pickle: JSON + safetensors only)."""
        from safetensors.torch import load_file

        from bulkfm.tokenize import BinTokenizer

        directory = Path(directory)
        meta = _read_meta(directory / META_FILE)
        config = FinetuneConfig.from_dict(meta["config"])
        if device is not None:
            config = dataclasses.replace(config, device=str(device))
        encoder = BulkRNABert(BulkRNABertConfig.from_dict(meta["encoder_config"]))
        if config.mode == "ia3":
            apply_ia3(encoder)
        head = _build_head(config, meta["head"]["in_dim"], meta["head"]["out_dim"])
        network = FinetuneNetwork(encoder, head, config.layer)
        weights = directory / WEIGHTS_FILE
        if not weights.exists():
            raise CheckpointError(f"{weights} does not exist; the directory is incomplete")
        try:
            state = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {weights}: {exc}; the file is damaged") from exc
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{weights} does not match {META_FILE} ({exc}); save both files together"
            ) from exc
        _set_trainable(network, config.mode)
        network.to(config.device)
        tokenizer = BinTokenizer.load(directory)
        check_tokenizer_matches(encoder.config, tokenizer)
        return cls(
            network,
            tokenizer,
            config,
            classes=meta["classes"],
            history=meta.get("history"),
            best_epoch=meta.get("best_epoch"),
            param_counts=meta.get("param_counts"),
            coverage=meta.get("gene_coverage"),
        )


def _jsonable_classes(classes: np.ndarray) -> list[Any]:
    out = [c.item() if isinstance(c, np.generic) else c for c in classes]
    if not all(isinstance(c, str | int | float | bool) for c in out):
        raise ConfigError(
            "class labels must be strings or numbers to be saved; convert them, e.g. "
            "labels.astype(str)"
        )
    return out


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist; give a directory written by FinetunedModel.save"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-save the model") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a bulkfm fine-tuned model (format {FORMAT!r} expected)"
        )
    return meta


# --------------------------------------------------------------------------- training
def finetune(
    model: BulkRNABert,
    tokenizer: BinTokenizer,
    adata_train: ad.AnnData,
    y_or_survival: Any,
    config: FinetuneConfig | None = None,
    *,
    adata_val: ad.AnnData | None = None,
    y_val: Any = None,
) -> FinetunedModel:
    """Fine-tune a copy of ``model`` (never modified) with a new task head.

    ``y_or_survival``: classification labels (array, one per sample, or an obs column
    name); for survival ``(time, event)``, a DataFrame with ``survival_time`` /
    ``survival_event``, or None to read those obs columns. ``y_val`` gives the targets of
    ``adata_val`` in the same forms (None: the same obs column(s) of ``adata_val``).
    """
    config = config if config is not None else FinetuneConfig()
    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    if not isinstance(model, BulkRNABert):
        raise ConfigError(f"model must be a BulkRNABert, got {type(model).__name__}")
    check_tokenizer_matches(model.config, tokenizer)
    depth = _layer_depth(model.config, config.layer)
    targets, classes = _targets(config.task, adata_train, y_or_survival, None)
    coverage = _coverage(tokenizer, adata_train, config, log=True)
    tokens = _tokens(tokenizer, adata_train)
    val_tokens, val_targets = None, None
    if adata_val is not None:
        if y_val is None and not (isinstance(y_or_survival, str) or y_or_survival is None):
            raise ConfigError(
                "adata_val needs its targets: pass y_val, or give the training targets as an "
                "obs column name so the same column is read from adata_val"
            )
        val_y = y_val if y_val is not None else y_or_survival
        val_targets, _ = _targets(config.task, adata_val, val_y, classes)
        _coverage(tokenizer, adata_val, config, log=False)
        val_tokens = _tokens(tokenizer, adata_val)
    elif config.patience is not None:
        train_idx, val_idx = _validation_split(adata_train, targets, config)
        tokens, val_tokens = _take(tokens, train_idx), _take(tokens, val_idx)
        targets, val_targets = targets.subset(train_idx), targets.subset(val_idx)

    device = torch.device(config.device)
    fork = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(config.seed)
        network = _make_network(model, config, depth, 0 if classes is None else classes.size)
        network.to(device)
        network.fit_standardizer(tokens, config.batch_size)
        trainer = _Trainer(network, config, device)
        history, best_epoch = trainer.fit(tokens, targets, val_tokens, val_targets)
    counts = _param_report(network)
    logger.info(
        "fine-tuned (%s, %s): %d of %d parameters trained (%.4f%%), %d adapter",
        config.task,
        config.mode,
        counts["trainable"],
        counts["total"],
        100 * counts["fraction"],
        counts["adapter"],
    )
    return FinetunedModel(
        network,
        tokenizer,
        config,
        classes=classes,
        history=history,
        best_epoch=best_epoch,
        param_counts=counts,
        coverage=coverage.to_dict(),
    )


def _coverage(
    tokenizer: BinTokenizer, adata: ad.AnnData, config: FinetuneConfig, *, log: bool
) -> GeneCoverage:
    """The data's coverage of the model's genes, checked against ``min_gene_coverage``."""
    return gene_coverage(
        tokenizer,
        adata,
        min_coverage=config.min_gene_coverage,
        option="min_gene_coverage (FinetuneConfig; heads.finetune.min_gene_coverage in an "
        "evaluate config)",
        log=log,
    )


def _make_network(
    model: BulkRNABert, config: FinetuneConfig, depth: int, n_classes: int
) -> FinetuneNetwork:
    if config.random_init:
        encoder = BulkRNABert(dataclasses.replace(model.config))  # fresh BERT-style init
    else:
        encoder = copy.deepcopy(model)
    encoder = encoder.float()
    if config.mode == "ia3":
        apply_ia3(encoder)
    out_dim = n_classes if config.task == "classification" else 1
    head = _build_head(config, encoder.config.embed_dim, out_dim)
    network = FinetuneNetwork(encoder, head, depth)
    _set_trainable(network, config.mode)
    return network


def _validation_split(
    adata: ad.AnnData, targets: _Targets, config: FinetuneConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Patient-grouped, stratified hold-out of ``val_fraction`` for early stopping."""
    from bulkfm.data.splits import repeated_holdout

    groups = adata.obs[keys.PATIENT].to_numpy() if keys.PATIENT in adata.obs else None
    try:
        split = repeated_holdout(
            targets.strata(), groups, seeds=[config.seed], test_size=float(config.val_fraction)
        )[0]
    except SplitError as exc:
        raise SplitError(
            f"cannot hold out a validation set for early stopping ({exc}); raise "
            "val_fraction, pass adata_val, or set patience=None to train without one"
        ) from exc
    return split.train, split.test


class _Trainer:
    """One optimisation run: mini-batch epochs, validation loss, early stopping."""

    def __init__(self, network: FinetuneNetwork, config: FinetuneConfig, device: torch.device):
        self.network = network
        self.config = config
        self.device = device
        self.params = [p for p in network.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.learning_rate, weight_decay=float(config.weight_decay)
        )
        self.generator = torch.Generator().manual_seed(config.seed)

    def _features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Head inputs: tokens for end-to-end modes; fixed embeddings when frozen."""
        if self.config.mode != "frozen":
            return tokens
        self.network.eval()
        with torch.no_grad():
            return _run_batches(
                lambda t: self.network.pool(t.long().to(self.device)),
                tokens,
                self.config.batch_size,
            )

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.config.mode == "frozen":
            return self.network.head(self.network.standardize(inputs.to(self.device)))
        return self.network(inputs.long().to(self.device))

    def _loss(self, out: torch.Tensor, targets: _Targets) -> torch.Tensor:
        if self.config.task == "classification":
            return F.cross_entropy(out, torch.as_tensor(targets.y, device=out.device))
        from bulkfm.train.losses import cox_ph_loss

        return cox_ph_loss(
            out[:, 0],
            torch.as_tensor(targets.time, device=out.device),
            torch.as_tensor(targets.event, device=out.device),
            ties=self.config.ties,
        )

    def _has_signal(self, targets: _Targets) -> bool:
        """Cox batches without events carry no likelihood information: skip them."""
        return targets.event is None or bool(targets.event.any())

    def fit(
        self,
        tokens: torch.Tensor,
        targets: _Targets,
        val_tokens: torch.Tensor | None,
        val_targets: _Targets | None,
    ) -> tuple[list[dict[str, Any]], int | None]:
        if tokens.shape[0] == 0:
            raise ConfigError("no training samples; give a non-empty AnnData")
        if not self._has_signal(targets):
            raise ClinicalMatchError(
                "the training samples have no observed events; the Cox loss needs at least one"
            )
        if val_targets is not None and not self._has_signal(val_targets):
            raise ClinicalMatchError(
                "the validation samples have no observed events, so their Cox loss cannot "
                "guide early stopping; give an adata_val with events, raise val_fraction, or "
                "set patience=None"
            )
        inputs = self._features(tokens)
        val_inputs = self._features(val_tokens) if val_tokens is not None else None
        history: list[dict[str, Any]] = []
        # loss, epoch, trainable state
        best: tuple[float, int | None, dict[str, torch.Tensor] | None] = (math.inf, None, None)
        stale = 0
        bar = tqdm(
            range(1, self.config.epochs + 1),
            desc=f"finetune {self.config.mode}",
            disable=None if self.config.progress is None else not self.config.progress,
        )
        for epoch in bar:
            record = {"epoch": epoch, "train_loss": self._epoch(inputs, targets)}
            if val_inputs is not None and val_targets is not None:
                record["val_loss"] = self._evaluate(val_inputs, val_targets)
            history.append(record)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "epoch"})
            logger.debug("epoch %s", record)
            if self.config.patience is None or "val_loss" not in record:
                continue
            if record["val_loss"] < best[0]:
                best, stale = (record["val_loss"], epoch, self._snapshot()), 0
            else:
                stale += 1
                if stale >= self.config.patience:
                    logger.info("early stopping after epoch %d (best %d)", epoch, best[1])
                    break
        bar.close()
        if best[2] is None:
            return history, len(history)  # no early stopping: the last epoch is kept
        self._restore(best[2])
        return history, best[1]

    def _epoch(self, inputs: torch.Tensor, targets: _Targets) -> float:
        self.network.train()
        order = torch.randperm(inputs.shape[0], generator=self.generator)
        total, weight = 0.0, 0
        for start in range(0, order.numel(), self.config.batch_size):
            idx = order[start : start + self.config.batch_size]
            batch_targets = targets.subset(idx.numpy())
            if not self._has_signal(batch_targets):
                continue
            loss = self._loss(self._forward(inputs[idx.to(inputs.device)]), batch_targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.params, float(self.config.max_grad_norm))
            self.optimizer.step()
            total += float(loss.detach()) * idx.numel()
            weight += idx.numel()
        return total / weight if weight else math.nan

    @torch.no_grad()
    def _evaluate(self, inputs: torch.Tensor, targets: _Targets) -> float:
        """Loss over the whole validation set at once (one Cox risk set)."""
        self.network.eval()
        out = _run_batches(self._forward, inputs, self.config.batch_size)
        return float(self._loss(out, targets))

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {
            n: p.detach().clone() for n, p in self.network.named_parameters() if p.requires_grad
        }

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.network.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
