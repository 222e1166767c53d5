"""Task logic, in one place for the benchmark and the paper's evaluation.

What a task is (:mod:`~bulkfm.tasks.spec`: names, families, metrics) and its arrays
(:mod:`~bulkfm.tasks.data`: :class:`TaskData`, :func:`prepare_task`); the heads:
linear probes (:mod:`~bulkfm.tasks.probes`), the ridge Cox model
(:mod:`~bulkfm.tasks.cox`), MLP / SVM classification (:mod:`~bulkfm.tasks.classification`),
Cox-MLP survival (:mod:`~bulkfm.tasks.survival`) and the paper's baselines
(:mod:`~bulkfm.tasks.baselines`). Here: the pieces the heads share, kept here so they
stay alike: id alignment, input standardisation, the patient-grouped inner validation
split, the default hold-outs (with the class-size check that names the classes too small),
split names and seeds, and the early-stopping training loop of an MLP head. Splits
themselves are :mod:`bulkfm.data.splits`.

Import-light: torch is imported inside the functions that train.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bulkfm.config import check_int, check_number, check_probability
from bulkfm.data.splits import Split, check_group_sizes, n_holdout_folds, repeated_holdout
from bulkfm.errors import (
    BulkfmWarning,
    ClinicalMatchError,
    ConfigError,
    ExpressionValueError,
)
from bulkfm.scaling import Standardizer
from bulkfm.tasks.data import TaskData, prepare_task
from bulkfm.tasks.spec import TASK_GRAMMAR, TaskSelection, TaskSpec

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "TASK_GRAMMAR",
    "AlignedInputs",
    "MLPHeadMixin",
    "Standardizer",
    "TaskData",
    "TaskSelection",
    "TaskSpec",
    "align_inputs",
    "check_embeddings",
    "check_group_sizes",
    "check_training_params",
    "default_holdouts",
    "inner_split",
    "n_holdout_folds",
    "prepare_task",
    "seeded",
    "split_name",
    "split_seed",
    "train_head",
]


# --------------------------------------------------------------------------- alignment
@dataclass
class AlignedInputs:
    """Embeddings and per-sample targets in one sample order."""

    X: np.ndarray
    targets: list[np.ndarray]
    ids: np.ndarray


def check_embeddings(X: Any, what: str = "embeddings") -> np.ndarray:
    """float32 2-D finite matrix, or an ExpressionValueError saying which samples are bad."""
    arr = X.to_numpy() if hasattr(X, "to_numpy") else np.asarray(X)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ConfigError(f"{what} must be a non-empty 2-D [samples, dims] matrix, got {arr.shape}")
    try:
        arr = arr.astype(np.float32, copy=False)
    except (TypeError, ValueError) as exc:
        raise ExpressionValueError(f"{what} must be numeric: {exc}") from exc
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        names = list(X.index[rows[:5]]) if hasattr(X, "index") else rows[:5].tolist()
        raise ExpressionValueError(
            f"{what} have NaN/inf values in {rows.size} sample(s) (e.g. {names}); recompute "
            "them (bulkfm embed) or drop those samples"
        )
    return arr


def align_inputs(
    embeddings: Any, *targets: Any, ids: Sequence[str] | np.ndarray | None = None
) -> AlignedInputs:
    """Match targets to embedding rows by sample id.

    ``embeddings`` is a DataFrame indexed by sample id (as ``read_embeddings`` returns) or
    an array with ``ids``. A target that is a Series is matched by its index; an array
    must already be in embedding order. Samples present on only one side are dropped with
    a warning; no sample in common is an error, since it means the ids are of two
    different kinds (e.g. patient vs sample barcodes).
    """
    if isinstance(embeddings, pd.DataFrame):
        emb_ids = embeddings.index.astype(str).to_numpy()
        X = embeddings.to_numpy()
    else:
        X = np.asarray(embeddings)
        emb_ids = np.asarray([str(i) for i in ids]) if ids is not None else None
    if X.ndim != 2:
        raise ConfigError(f"embeddings must be 2-D [samples, dims], got shape {X.shape}")
    if emb_ids is None:
        emb_ids = np.arange(X.shape[0]).astype(str)
        if any(isinstance(t, pd.Series) for t in targets):
            raise ConfigError(
                "targets are indexed Series but the embeddings have no ids; pass a DataFrame "
                "indexed by sample id or ids="
            )
    if emb_ids.size != X.shape[0]:
        raise ConfigError(f"{emb_ids.size} ids for {X.shape[0]} embedding rows; pass one id a row")
    if pd.Index(emb_ids).has_duplicates:
        raise ClinicalMatchError("embedding sample ids are not unique; de-duplicate them first")
    keep = np.ones(emb_ids.size, dtype=bool)
    for target in targets:
        if isinstance(target, pd.Series):
            keep &= np.isin(emb_ids, target.index.astype(str))
        elif target is not None and len(target) != X.shape[0]:
            raise ConfigError(
                f"a target array has {len(target)} values for {X.shape[0]} embedding rows; pass "
                "a pandas Series indexed by sample id to match by id"
            )
    if not keep.any():
        example = next(t for t in targets if isinstance(t, pd.Series)).index[:3].tolist()
        raise ClinicalMatchError(
            f"no sample id is shared by the embeddings (e.g. {emb_ids[:3].tolist()}) and the "
            f"labels / clinical values (e.g. {example}); index both by the same sample ids "
            "(obs_names)"
        )
    if not keep.all():
        warnings.warn(
            f"{int((~keep).sum())} of {keep.size} embedded samples have no label and are left out",
            BulkfmWarning,
            stacklevel=3,
        )
    aligned: list[Any] = []  # None stays None: an optional target (e.g. groups)
    for target in targets:
        if target is None:
            aligned.append(None)
        elif isinstance(target, pd.Series):
            series = target.copy()
            series.index = series.index.astype(str)
            if series.index.has_duplicates:
                raise ClinicalMatchError("label index has duplicate sample ids; de-duplicate it")
            aligned.append(series.reindex(emb_ids[keep]).to_numpy())
        else:
            aligned.append(np.asarray(target)[keep])
    return AlignedInputs(X=check_embeddings(X[keep]), targets=aligned, ids=emb_ids[keep])


# --------------------------------------------------------------------------- splits
def default_holdouts(
    strata: np.ndarray,
    groups: np.ndarray | None,
    *,
    n_repeats: int,
    test_size: float,
    seed: int,
    by: str,
    fix: str,
) -> list[Split]:
    """``n_repeats`` patient-grouped hold-outs stratified by ``strata`` (seeds ``seed, seed+1,
    ...``), after checking that every stratum has the patients a split needs.

    ``by`` says what the strata are (for the message), ``fix`` what the user can do.
    """
    check_probability("test_size", test_size)
    check_int("n_repeats", n_repeats, 1)
    check_group_sizes(
        strata,
        groups,
        n_holdout_folds(float(test_size)),
        context=f"a patient-grouped {1 - test_size:.0%}/{test_size:.0%} split stratified by {by}",
        fix=fix,
    )
    return repeated_holdout(
        strata, groups, seeds=range(seed, seed + n_repeats), test_size=test_size
    )


def split_name(split: Any, i: int) -> str:
    """A split's own name, or ``split{i}`` for an unnamed one (e.g. a bare train/test pair)."""
    return getattr(split, "name", "") or f"split{i}"


def split_seed(split: Any, i: int, seed: int) -> int:
    """The seed a split was drawn with, else ``seed + i``: the seed of the model fitted on it."""
    own = getattr(split, "seed", None)
    return own if own is not None else seed + i


def inner_split(
    strata: np.ndarray, groups: np.ndarray | None, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Patient-grouped, stratified (train, validation) positions for early stopping."""
    n_needed = n_holdout_folds(val_fraction)
    check_group_sizes(
        strata,
        groups,
        n_needed,
        context=f"the inner validation split (val_fraction={val_fraction})",
        fix=(
            "drop or merge these classes, raise val_fraction (0.5 needs 2 patients per class) or "
            "set val_fraction=0 to train a fixed number of epochs without early stopping"
        ),
    )
    split = repeated_holdout(strata, groups, seeds=[seed], test_size=val_fraction)[0]
    return split.train, split.test


# --------------------------------------------------------------------------- training
@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device) -> Iterator[None]:
    """Seed torch for initialisation and dropout without touching the caller's RNG state."""
    import torch

    dev = torch.device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def check_training_params(
    *,
    lr: float,
    weight_decay: float,
    max_epochs: int,
    patience: int,
    batch_size: int | None,
    val_fraction: float,
    seed: int,
) -> None:
    """Shared validation of the early-stopping hyper-parameters of the MLP estimators."""
    check_number("lr", lr, low=0.0, low_open=True)
    check_number("weight_decay", weight_decay, low=0.0)
    check_int("max_epochs", max_epochs, 1)
    check_int("patience", patience, 1)
    if batch_size is not None:
        check_int("batch_size", batch_size, 1, hint="or None for full batch")
    check_number(
        "val_fraction",
        val_fraction,
        low=0.0,
        high=1.0,
        high_open=True,
        hint="0 = no early stopping",
    )
    check_int("seed", seed, 0)


class MLPHeadMixin:
    """What the MLP heads on embeddings share (:class:`~bulkfm.tasks.classification.
    MLPClassifier`, :class:`~bulkfm.tasks.survival.CoxMLP`): checking the training
    settings, the inner validation split, training on standardised inputs with early
    stopping under the head's own seed, and the forward pass of a fitted head.

    Each estimator keeps its settings as its own dataclass fields (their defaults differ);
    this class only reads them.
    """

    lr: float
    weight_decay: float
    max_epochs: int
    patience: int
    batch_size: int | None
    val_fraction: float
    seed: int
    device: str
    #: How to fit this estimator, for the "not fitted yet" message.
    _fit_call = "fit(...)"

    def __post_init__(self) -> None:
        self._check_params()

    def _check_params(self) -> None:
        check_training_params(
            lr=self.lr,
            weight_decay=self.weight_decay,
            max_epochs=self.max_epochs,
            patience=self.patience,
            batch_size=self.batch_size,
            val_fraction=self.val_fraction,
            seed=self.seed,
        )

    def _split_for_early_stopping(
        self, strata: np.ndarray, groups: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(train, validation) positions; no validation rows when ``val_fraction`` is 0."""
        if self.val_fraction > 0:
            return inner_split(strata, groups, self.val_fraction, self.seed)
        return np.arange(len(strata)), None

    def _train(
        self,
        X: np.ndarray,
        targets: Sequence[np.ndarray],
        train_idx: np.ndarray,
        val_idx: np.ndarray | None,
        make_head: Callable[[], torch.nn.Module],
        loss_fn: Callable[..., torch.Tensor],
    ) -> None:
        """Standardise on the training rows, build the head and train it (sets ``head_``,
        ``scaler_``, ``history_``, ``n_features_in_``)."""
        import torch

        self.scaler_ = Standardizer().fit(X[train_idx])
        device = torch.device(self.device)
        Xt = torch.from_numpy(self.scaler_.transform(X)).to(device)
        tensors = [torch.from_numpy(t).to(device) for t in targets]
        with seeded(self.seed, device):
            self.head_ = make_head().to(device)
            self.history_ = train_head(
                self.head_,
                loss_fn,
                Xt,
                tensors,
                train_idx,
                val_idx,
                lr=self.lr,
                weight_decay=self.weight_decay,
                max_epochs=self.max_epochs,
                patience=self.patience,
                batch_size=self.batch_size,
                seed=self.seed,
            )
        self.n_features_in_ = X.shape[1]

    def _forward(self, X: Any) -> torch.Tensor:
        """The fitted head's output on standardised ``X`` (on the CPU, no gradient)."""
        import torch

        if not hasattr(self, "head_"):
            raise ConfigError(
                f"this {type(self).__name__} is not fitted yet; call {self._fit_call} first"
            )
        Xs = self.scaler_.transform(check_embeddings(X))
        with torch.no_grad():
            return self.head_(torch.from_numpy(Xs).to(torch.device(self.device))).cpu()


def train_head(
    head: torch.nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    X: torch.Tensor,
    targets: Sequence[torch.Tensor],
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    *,
    lr: float,
    weight_decay: float,
    max_epochs: int,
    patience: int,
    batch_size: int | None,
    seed: int,
) -> dict[str, Any]:
    """Adam with early stopping on the validation loss; the best head is restored.

    ``loss_fn(outputs, *targets)``; ``batch_size=None`` is full-batch (exact risk sets for
    the Cox loss). Without validation rows the head trains ``max_epochs`` epochs.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    train_pos = torch.from_numpy(np.array(train_idx, dtype=np.int64))
    step = batch_size or len(train_pos)
    history: dict[str, Any] = {"train_loss": [], "val_loss": []}
    best_loss, best_state, best_epoch, waited = math.inf, None, 0, 0
    for epoch in range(1, max_epochs + 1):
        head.train()
        order = train_pos[torch.randperm(len(train_pos), generator=generator)]
        total = 0.0
        for start in range(0, len(order), step):
            rows = order[start : start + step].to(X.device)
            loss = loss_fn(head(X[rows]), *(t[rows] for t in targets))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(rows)
        history["train_loss"].append(total / len(order))
        if val_idx is None or len(val_idx) == 0:
            continue
        val_loss = _evaluate(head, loss_fn, X, targets, val_idx)
        history["val_loss"].append(val_loss)
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, waited = val_loss, epoch, 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    history["epochs"] = len(history["train_loss"])
    history["best_epoch"] = best_epoch if best_state is not None else history["epochs"]
    return history


def _evaluate(
    head: torch.nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    X: torch.Tensor,
    targets: Sequence[torch.Tensor],
    idx: np.ndarray,
) -> float:
    import torch

    head.eval()
    rows = torch.from_numpy(np.array(idx, dtype=np.int64)).to(X.device)
    with torch.no_grad():
        return float(loss_fn(head(X[rows]), *(t[rows] for t in targets)))
