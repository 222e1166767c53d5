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

from bulkfm.config import check_choice, check_number
from bulkfm.data.splits import grouped_kfold
from bulkfm.errors import BulkfmWarning, ConfigError, SplitError
from bulkfm.metrics import classification_metrics, mean_std
from bulkfm.tasks import (
    MLPHeadMixin,
    align_inputs,
    check_embeddings,
    check_group_sizes,
    default_holdouts,
    split_name,
    split_seed,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SUMMARY_METRICS",
    "ClassificationResult",
    "MLPClassifier",
    "classification_split_result",
    "make_svm",
    "merge_classification",
    "run_classification",
    "tune_svm",
]

SUMMARY_METRICS = ("accuracy", "macro_f1", "weighted_f1")


# --------------------------------------------------------------------------- MLP
@dataclass(eq=False, repr=False)
class MLPClassifier(MLPHeadMixin, ClassifierMixin, BaseEstimator):
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

    _fit_call = "fit(X, y)"

    def _check_params(self) -> None:
        super()._check_params()
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
        train_idx, val_idx = self._split_for_early_stopping(y, g)
        weight = self._class_weights(codes[train_idx], torch.device(self.device))

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, target, weight=weight)

        def make_head() -> torch.nn.Module:
            return classification_head(
                X.shape[1],
                self.classes_.size,
                hidden=tuple(self.hidden),
                dropout=self.dropout,
                layer_norm=self.layer_norm,
            )

        self._train(X, [codes.astype(np.int64)], train_idx, val_idx, make_head, loss_fn)
        return self

    def _class_weights(self, codes: np.ndarray, device: Any) -> Any:
        import torch

        if self.class_weight is None:
            return None
        counts = np.bincount(codes, minlength=self.classes_.size).astype(np.float64)
        weights = np.where(counts > 0, counts.sum() / (self.classes_.size * counts.clip(1)), 0.0)
        return torch.tensor(weights, dtype=torch.float32, device=device)

    def predict_proba(self, X: Any) -> np.ndarray:
        return self._forward(X).softmax(dim=-1).numpy().astype(np.float64)

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
        splits = default_holdouts(
            y,
            g,
            n_repeats=n_repeats,
            test_size=test_size,
            seed=seed,
            by="class",
            fix="drop or merge these classes (e.g. keep classes with enough patients)",
        )
    parts = []
    for i, split in enumerate(splits):
        tr, te = split.train, split.test
        model = _fit(
            method,
            X[tr],
            y[tr],
            None if g is None else g[tr],
            mlp,
            svm_C,
            split_seed(split, i, seed),
        )
        name = split_name(split, i)
        parts.append(
            classification_split_result(
                method, name, len(tr), sample_ids[te], y[te], model.predict(X[te]), classes
            )
        )
    return merge_classification(method, parts)


def classification_split_result(
    method: str,
    name: str,
    n_train: int,
    ids: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: list[Any],
) -> ClassificationResult:
    """The result of one split: its metrics row and its test predictions."""
    scores = classification_metrics(y_true, y_pred, labels=classes)
    logger.info("%s %s: macro F1 %.3f", method, name, scores["macro_f1"])
    row = {"split": name, "n_train": int(n_train), "n_test": len(y_true), **scores}
    frame = pd.DataFrame({"sample_id": ids, "split": name, "y_true": y_true, "y_pred": y_pred})
    return ClassificationResult(method, classes, [row], _summary([row]), frame)


def merge_classification(
    method: str, parts: Sequence[ClassificationResult]
) -> ClassificationResult:
    """One result from single-split results: rows and predictions stacked, mean ± std redone."""
    if not parts:
        raise ConfigError("no split results to merge")
    per_split = [row for part in parts for row in part.per_split]
    return ClassificationResult(
        method=method,
        labels=parts[0].labels,
        per_split=per_split,
        summary=_summary(per_split),
        predictions=pd.concat([p.predictions for p in parts], ignore_index=True),
    )


def _summary(per_split: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m: mean_std([r[m] for r in per_split]) for m in SUMMARY_METRICS}


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
