"""Classification on frozen embeddings: the paper's MLP head and an SVM.

Protocol (paper): patient-grouped 80/20 train/test splits stratified by class, repeated
over seeds, reported as mean ± std of accuracy and macro/weighted F1. The MLP stops
early on an inner validation split of the *training* part (also patient-grouped), so the
test set never chooses the epoch.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin

from bulkfm.config import check_choice, check_int, check_number, check_probability
from bulkfm.errors import BulkfmWarning, ConfigError, SplitError
from bulkfm.metrics import classification_metrics, mean_std
from bulkfm.tasks import (
    Standardizer,
    align_inputs,
    check_embeddings,
    check_group_sizes,
    check_training_params,
    inner_split,
    n_holdout_folds,
    seeded,
    train_head,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ClassificationResult",
    "MLPClassifier",
    "make_svm",
    "run_classification",
    "tune_svm",
]

SUMMARY_METRICS = ("accuracy", "macro_f1", "weighted_f1")


# --------------------------------------------------------------------------- MLP
@dataclass(eq=False, repr=False)
class MLPClassifier(ClassifierMixin, BaseEstimator):
    """Paper MLP head (Linear -> SELU -> Dropout -> LayerNorm per hidden layer) as an estimator.

    Inputs are standardised with training statistics; ``fit`` is deterministic for a
    given ``seed`` (own torch RNG stream, the caller's RNG state is left alone).
    ``class_weight="balanced"`` weights the cross-entropy by inverse class frequency.
    """

    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.1
    layer_norm: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_epochs: int = 200
    patience: int = 20
    batch_size: int | None = 64
    val_fraction: float = 0.2
    class_weight: Literal["balanced"] | None = None
    seed: int = 0
    device: str = "cpu"

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
        check_choice("class_weight", self.class_weight, (None, "balanced"))

    def fit(self, X: Any, y: Any, groups: Any | None = None) -> MLPClassifier:
        """``groups`` (patient ids) keep one patient's samples on one side of the inner split."""
        import torch
        import torch.nn.functional as F

        from bulkfm.models.heads import classification_head

        self._check_params()
        X = check_embeddings(X)
        y = _labels(y, X.shape[0])
        g = None if groups is None else np.asarray(groups).astype(str)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if self.classes_.size < 2:
            raise SplitError(
                f"only one class ({self.classes_.tolist()}) in the training labels; a "
                "classifier needs at least two"
            )
        train_idx, val_idx = np.arange(len(y)), None
        if self.val_fraction > 0:
            train_idx, val_idx = inner_split(y, g, self.val_fraction, self.seed)
        self.scaler_ = Standardizer().fit(X[train_idx])
        device = torch.device(self.device)
        Xt = torch.from_numpy(self.scaler_.transform(X)).to(device)
        yt = torch.from_numpy(codes.astype(np.int64)).to(device)
        weight = self._class_weights(codes[train_idx], device)

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, target, weight=weight)

        with seeded(self.seed, device):
            self.head_ = classification_head(
                X.shape[1],
                self.classes_.size,
                hidden=tuple(self.hidden),
                dropout=self.dropout,
                layer_norm=self.layer_norm,
            ).to(device)
            self.history_ = train_head(
                self.head_,
                loss_fn,
                Xt,
                [yt],
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
        return self

    def _class_weights(self, codes: np.ndarray, device: Any) -> Any:
        import torch

        if self.class_weight is None:
            return None
        counts = np.bincount(codes, minlength=self.classes_.size).astype(np.float64)
        weights = np.where(counts > 0, counts.sum() / (self.classes_.size * counts.clip(1)), 0.0)
        return torch.tensor(weights, dtype=torch.float32, device=device)

    def predict_proba(self, X: Any) -> np.ndarray:
        import torch

        if not hasattr(self, "head_"):
            raise ConfigError("this MLPClassifier is not fitted yet; call fit(X, y) first")
        Xs = self.scaler_.transform(check_embeddings(X))
        with torch.no_grad():
            logits = self.head_(torch.from_numpy(Xs).to(torch.device(self.device)))
        return logits.softmax(dim=-1).cpu().numpy().astype(np.float64)

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)  # raises first when not fitted
        return self.classes_[proba.argmax(axis=1)]


def _labels(y: Any, n: int) -> np.ndarray:
    arr = y.to_numpy() if hasattr(y, "to_numpy") else np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ConfigError(f"y must be 1-D with one label per row ({n}), got shape {arr.shape}")
    if pd.isna(arr).any():
        raise ConfigError(
            f"{int(pd.isna(arr).sum())} missing label(s); drop unlabelled samples before fitting"
        )
    return arr


# --------------------------------------------------------------------------- SVM
def make_svm(
    C: float = 1.0,
    *,
    kernel: str = "rbf",
    class_weight: Literal["balanced"] | None = None,
    seed: int = 0,
) -> Any:
    """StandardScaler + SVC pipeline (the paper's alternative to the MLP head)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    check_number("C", C, low=0.0, low_open=True)
    return make_pipeline(
        StandardScaler(),
        SVC(C=float(C), kernel=kernel, class_weight=class_weight, random_state=seed),
    )


def tune_svm(
    X: Any,
    y: Any,
    groups: Any | None = None,
    *,
    Cs: Sequence[float] = (0.1, 1.0, 10.0, 100.0),
    k: int = 3,
    seed: int = 0,
    kernel: str = "rbf",
    class_weight: Literal["balanced"] | None = None,
) -> tuple[Any, float]:
    """Fitted SVM with C chosen by macro F1 over patient-grouped stratified inner folds."""
    from sklearn.model_selection import GridSearchCV

    from bulkfm.data.splits import grouped_kfold

    X = check_embeddings(X)
    y = _labels(y, X.shape[0])
    g = None if groups is None else np.asarray(groups).astype(str)
    Cs = list(Cs)
    if not Cs:
        raise ConfigError("Cs is empty; give the C values to try, e.g. (0.1, 1, 10)")
    check_group_sizes(
        y,
        g,
        k,
        context=f"tuning C with {k} inner folds",
        fix="drop or merge these classes, lower k, or give a single C",
    )
    folds = [(s.train, s.test) for s in grouped_kfold(y, g, k=k, seed=seed)]
    search = GridSearchCV(
        make_svm(Cs[0], kernel=kernel, class_weight=class_weight, seed=seed),
        {"svc__C": [float(c) for c in Cs]},
        scoring="f1_macro",
        cv=folds,
        refit=True,
    )
    search.fit(X, y)
    best = float(search.best_params_["svc__C"])
    logger.debug("tune_svm: best C=%s (macro F1 %.3f)", best, search.best_score_)
    return search.best_estimator_, best


# --------------------------------------------------------------------------- protocol
@dataclass
class ClassificationResult:
    """Per-split metrics, their mean ± std, and every test prediction."""

    method: str
    labels: list[Any]
    per_split: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    predictions: pd.DataFrame = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "labels": self.labels,
            "per_split": self.per_split,
            "summary": self.summary,
        }


def run_classification(
    embeddings: Any,
    labels: Any,
    *,
    groups: Any | None = None,
    ids: Sequence[str] | np.ndarray | None = None,
    method: Literal["mlp", "svm"] = "mlp",
    splits: Sequence[Any] | None = None,
    n_repeats: int = 5,
    test_size: float = 0.2,
    seed: int = 0,
    mlp: Mapping[str, Any] | None = None,
    svm_C: float | Sequence[float] = 1.0,
) -> ClassificationResult:
    """Train on each split's train side, score its test side (macro/weighted F1, accuracy).

    ``embeddings``: DataFrame indexed by sample id (or array + ``ids``); ``labels`` and
    ``groups`` (patient ids): Series matched by id or arrays in embedding order.
    Unlabelled samples are dropped with a warning. ``splits`` (``bulkfm.data.splits.Split``
    positions into the aligned samples) default to ``n_repeats`` patient-grouped
    stratified hold-outs. ``svm_C`` as a sequence tunes C on each training part.
    """
    check_choice("method", method, ("mlp", "svm"))
    data = align_inputs(embeddings, labels, groups, ids=ids)
    X, y = data.X, data.targets[0]
    g: np.ndarray | None = data.targets[1]
    X, y, g, sample_ids = _drop_unlabelled(X, y, g, data.ids)
    g = None if g is None else pd.Series(g).astype(str).to_numpy()
    classes = sorted(pd.unique(y).tolist(), key=str)
    if len(classes) < 2:
        raise SplitError(f"only one class ({classes}) among the labelled samples; need two or more")
    if splits is None:
        splits = _default_splits(y, g, n_repeats, test_size, seed)
    per_split, frames = [], []
    for i, split in enumerate(splits):
        split_seed = split.seed if getattr(split, "seed", None) is not None else seed + i
        model = _fit(
            method, X[split.train], y[split.train], _sub(g, split.train), mlp, svm_C, split_seed
        )
        pred = model.predict(X[split.test])
        scores = classification_metrics(y[split.test], pred, labels=classes)
        name = getattr(split, "name", "") or f"split{i}"
        per_split.append(
            {"split": name, "n_train": len(split.train), "n_test": len(split.test), **scores}
        )
        frames.append(
            pd.DataFrame(
                {
                    "sample_id": sample_ids[split.test],
                    "split": name,
                    "y_true": y[split.test],
                    "y_pred": pred,
                }
            )
        )
        logger.info("%s %s: macro F1 %.3f", method, name, scores["macro_f1"])
    summary = {m: mean_std([s[m] for s in per_split]) for m in SUMMARY_METRICS}
    return ClassificationResult(
        method=method,
        labels=classes,
        per_split=per_split,
        summary=summary,
        predictions=pd.concat(frames, ignore_index=True),
    )


def _sub(values: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if values is None else values[idx]


def _drop_unlabelled(
    X: np.ndarray, y: np.ndarray, g: np.ndarray | None, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    missing = pd.isna(y)
    if missing.any():
        warnings.warn(
            f"{int(missing.sum())} of {len(y)} samples have a missing label and are left out",
            BulkfmWarning,
            stacklevel=3,
        )
        keep = ~missing
        X, y, ids = X[keep], y[keep], ids[keep]
        g = None if g is None else g[keep]
    if len(y) == 0:
        raise ConfigError("every label is missing; nothing to classify")
    if g is not None and pd.isna(g).any():
        raise ConfigError(
            "groups (patient ids) has missing values; fill them with the sample id so each such "
            "sample is its own patient"
        )
    return X, y, g, ids


def _default_splits(
    y: np.ndarray, g: np.ndarray | None, n_repeats: int, test_size: float, seed: int
) -> list[Any]:
    from bulkfm.data.splits import repeated_holdout

    check_probability("test_size", test_size)
    check_int("n_repeats", n_repeats, 1)
    check_group_sizes(
        y,
        g,
        n_holdout_folds(float(test_size)),
        context=f"a stratified {1 - test_size:.0%}/{test_size:.0%} patient-grouped split",
        fix="drop or merge these classes (e.g. keep classes with enough patients)",
    )
    return repeated_holdout(y, g, seeds=range(seed, seed + n_repeats), test_size=test_size)


def _fit(
    method: str,
    X: np.ndarray,
    y: np.ndarray,
    g: np.ndarray | None,
    mlp: Mapping[str, Any] | None,
    svm_C: float | Sequence[float],
    seed: int,
) -> Any:
    if method == "mlp":
        params = {"seed": seed, **(mlp or {})}
        return MLPClassifier(**params).fit(X, y, groups=g)
    if isinstance(svm_C, Sequence) and not isinstance(svm_C, str):
        if len(svm_C) > 1:
            return tune_svm(X, y, g, Cs=svm_C, seed=seed)[0]
        svm_C = svm_C[0]
    check_number("svm_C", svm_C, low=0.0, low_open=True, hint="or a list of them to tune")
    return make_svm(svm_C, seed=seed).fit(X, y)
