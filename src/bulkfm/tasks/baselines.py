"""Classical baselines on the same splits as BulkRNABert, as in the paper's tables.

- ``pca_svm``: log10(1 + TPM) -> PCA(256) -> SVM;
- ``nmf_svm``: log10(1 + TPM) -> NMF(128) -> SVM;
- ``mlp``: the paper's MLP head on log10(1 + TPM) itself (classification), or the Cox
  MLP head on it (survival);
- ``pca_cox``: log10(1 + TPM) -> PCA(64) -> ridge-penalised linear Cox model
  (:func:`~bulkfm.tasks.cox.fit_ridge_cox`, the benchmark's Cox probe).

Why each split refits everything: PCA, NMF and the choice of the most variable genes
all look at the data, so they are fitted on the *training side* of a split only and
then applied to its test side; fitting them once on every sample would let the test
samples shape the features. The heads and the scores are the ones of
:mod:`bulkfm.tasks.classification` / :mod:`bulkfm.tasks.survival` (run on one split at a
time), so a baseline and a BulkRNABert arm are trained and scored by the same code.

The feature maps (log-TPM, top-variable genes, capped PCA / NMF) are those of
:mod:`bulkfm.embedders.classical`, shared with the benchmark's ``pca`` / ``nmf`` / ``raw``
models; a component count larger than the data allow is lowered there with a logged
note, as happens with PCA(256) on a cohort of 150 samples.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from bulkfm.config import check_int, check_number
from bulkfm.data.splits import survival_strata
from bulkfm.embedders.classical import dense_matrix, feature_map
from bulkfm.errors import ClinicalMatchError, ConfigError
from bulkfm.metrics import validate_survival
from bulkfm.scaling import Standardizer
from bulkfm.tasks import check_embeddings, default_holdouts, split_name, split_seed
from bulkfm.tasks.classification import (
    ClassificationResult,
    classification_split_result,
    merge_classification,
    run_classification,
)
from bulkfm.tasks.cox import fit_ridge_cox
from bulkfm.tasks.survival import (
    SurvivalResult,
    merge_survival,
    run_survival,
    survival_split_result,
    valid_survival_mask,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSIFICATION_BASELINES",
    "SURVIVAL_BASELINES",
    "BaselineConfig",
    "PenalizedCox",
    "baseline_label",
    "run_classification_baseline",
    "run_survival_baseline",
]

CLASSIFICATION_BASELINES = ("pca_svm", "nmf_svm", "mlp")
SURVIVAL_BASELINES = ("pca_cox", "mlp")
_COX_PENALTY = "an unpenalised Cox model has no unique solution when features outnumber events"


# --------------------------------------------------------------------------- Cox
@dataclass(eq=False, repr=False)
class PenalizedCox(BaseEstimator):
    """Ridge-penalised linear Cox model on standardised inputs (:func:`fit_ridge_cox`).

    Inputs are standardised on the training rows, so one penalty fits components of any
    scale. The objective is lifelines' ``CoxPHFitter(penalizer=penalizer)`` on the same
    inputs, ``-loglik / n + penalizer / 2 * ||b * s||^2`` with ``s`` the ddof=1 standard
    deviation lifelines rescales by, so :func:`fit_ridge_cox` runs with
    ``alpha = penalizer * n / (n - 1)``; ties follow Breslow (lifelines: Efron), which is
    identical without tied times. ``predict_risk`` is the linear predictor (log partial
    hazard up to a constant): higher = shorter survival.
    """

    penalizer: float = 0.1

    def __post_init__(self) -> None:
        check_number("penalizer", self.penalizer, low=0.0, low_open=True, hint=_COX_PENALTY)

    def fit(self, X: Any, time: Any, event: Any) -> PenalizedCox:
        arr = check_embeddings(X, "Cox covariates")
        t, e = validate_survival(time, event)
        n = t.size
        if n != arr.shape[0]:
            raise ConfigError(f"{n} survival records for {arr.shape[0]} rows of covariates")
        if not e.any():
            raise ClinicalMatchError(
                f"no events among the {n} training samples: a Cox model cannot be fitted; "
                "use a cohort or endpoint with events"
            )
        if n < 2:
            raise ConfigError("a Cox model needs at least 2 training samples")
        self.scaler_ = Standardizer(np.float64).fit(arr)
        alpha = float(self.penalizer) * n / (n - 1)
        # one fit per split, so solve tightly (the probes' paths use the default tol)
        fit = fit_ridge_cox(self.scaler_.transform(arr), t, e, alpha, tol=1e-12)
        if not fit.converged:
            logger.info("penalised Cox stopped after %d Newton steps", fit.n_iter)
        self.coef_ = fit.coef
        self.n_features_in_ = arr.shape[1]
        return self

    def predict_risk(self, X: Any) -> np.ndarray:
        if not hasattr(self, "coef_"):
            raise ConfigError("this PenalizedCox is not fitted yet; call fit(X, time, event)")
        return self.scaler_.transform(check_embeddings(X, "Cox covariates")) @ self.coef_

    predict = predict_risk


# --------------------------------------------------------------------------- config
@dataclass
class BaselineConfig:
    """Sizes and heads of the baselines (paper: PCA 256, NMF 128)."""

    top_genes: int | None = None
    pca_components: int = 256
    nmf_components: int = 128
    nmf_max_iter: int = 300
    cox_components: int = 64
    cox_penalizer: float = 0.1
    svm_C: float = 1.0
    mlp: Mapping[str, Any] = field(default_factory=dict)
    cox_mlp: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("pca_components", "nmf_components", "nmf_max_iter", "cox_components"):
            check_int(name, getattr(self, name), 1)
        if self.top_genes is not None:
            check_int("top_genes", self.top_genes, 1, hint="or None (all genes)")
        check_number("svm_C", self.svm_C, low=0.0, low_open=True)
        check_number("cox_penalizer", self.cox_penalizer, low=0.0, low_open=True, hint=_COX_PENALTY)


def baseline_label(
    name: str, config: BaselineConfig | None = None, task: str = "classification"
) -> str:
    """Display name, e.g. ``PCA(256) + SVM``."""
    cfg = config or BaselineConfig()
    labels = {
        "pca_svm": f"PCA({cfg.pca_components}) + SVM",
        "nmf_svm": f"NMF({cfg.nmf_components}) + SVM",
        "pca_cox": f"PCA({cfg.cox_components}) + penalised Cox",
        "mlp": "MLP on log-TPM" if task == "classification" else "Cox MLP on log-TPM",
    }
    if name not in labels:
        raise ConfigError(f"unknown baseline {name!r}; choose from {sorted(labels)}")
    return labels[name]


# --------------------------------------------------------------------------- runners
def _holdouts(
    strata: np.ndarray, groups: np.ndarray | None, n_repeats: int, seed: int, by: str
) -> list[Any]:
    """The protocol's splits: ``n_repeats`` patient-grouped 80/20 hold-outs."""
    return default_holdouts(
        strata,
        groups,
        n_repeats=n_repeats,
        test_size=0.2,
        seed=seed,
        by=by,
        fix="drop or merge these classes, or use more samples",
    )


def _sample_ids(ids: Sequence[str] | np.ndarray | None, n: int) -> np.ndarray:
    return np.asarray([str(i) for i in ids]) if ids is not None else np.arange(n).astype(str)


def _check_rows(X: np.ndarray, n: int, what: str) -> None:
    if X.shape[0] != n:
        raise ConfigError(f"expression has {X.shape[0]} rows but {n} {what}; pass one per sample")


def run_classification_baseline(
    name: str,
    X_tpm: Any,
    labels: Any,
    *,
    groups: Any | None = None,
    ids: Sequence[str] | np.ndarray | None = None,
    splits: Sequence[Any] | None = None,
    config: BaselineConfig | None = None,
    n_repeats: int = 5,
    seed: int = 0,
) -> ClassificationResult:
    """One classification baseline over ``splits`` (default: ``n_repeats`` grouped 80/20).

    ``X_tpm``: samples x genes TPM, rows in the order of ``labels`` (arrays, no
    unlabelled samples: drop them first). The feature map is refitted on each split's
    training side.
    """
    if name not in CLASSIFICATION_BASELINES:
        raise ConfigError(
            f"unknown classification baseline {name!r}; choose from {CLASSIFICATION_BASELINES}"
        )
    cfg = config or BaselineConfig()
    X = dense_matrix(X_tpm)
    y = np.asarray(labels)
    _check_rows(X, len(y), "labels")
    g = None if groups is None else np.asarray(groups).astype(str)
    sample_ids = _sample_ids(ids, len(y))
    if splits is None:
        splits = _holdouts(y, g, n_repeats, seed, "class")
    classes = sorted(pd.unique(y).tolist(), key=str)
    parts = []
    for i, split in enumerate(splits):
        seed_i = split_seed(split, i, seed)
        reducer, k = {
            "pca_svm": ("pca", cfg.pca_components),
            "nmf_svm": ("nmf", cfg.nmf_components),
        }.get(name, (None, 0))
        fmap = feature_map(
            reducer, k, top_genes=cfg.top_genes, nmf_max_iter=cfg.nmf_max_iter, seed=seed_i
        ).fit(X[split.train])
        features = fmap.transform(X)
        if name == "pca_svm":
            parts.append(_svm_split(name, features, y, classes, sample_ids, split, i, cfg.svm_C))
            continue
        parts.append(
            run_classification(
                features,
                y,
                groups=g,
                ids=sample_ids,
                method="mlp" if name == "mlp" else "svm",
                splits=[split],
                mlp=cfg.mlp,
                svm_C=cfg.svm_C,
                seed=seed_i,
            )
        )
    return merge_classification(name, parts)


def run_survival_baseline(
    name: str,
    X_tpm: Any,
    time: Any,
    event: Any,
    *,
    groups: Any | None = None,
    cohorts: Any | None = None,
    ids: Sequence[str] | np.ndarray | None = None,
    splits: Sequence[Any] | None = None,
    config: BaselineConfig | None = None,
    n_repeats: int = 5,
    seed: int = 0,
    min_events: int = 1,
) -> SurvivalResult:
    """One survival baseline; samples without a usable record are excluded first (warning),
    and ``splits`` index the samples left, as in :func:`run_survival`."""
    if name not in SURVIVAL_BASELINES:
        raise ConfigError(f"unknown survival baseline {name!r}; choose from {SURVIVAL_BASELINES}")
    cfg = config or BaselineConfig()
    X = dense_matrix(X_tpm)
    t_raw, e_raw = np.asarray(time, dtype=object), np.asarray(event, dtype=object)
    _check_rows(X, len(t_raw), "survival times")
    sample_ids = _sample_ids(ids, len(t_raw))
    valid = valid_survival_mask(t_raw, e_raw)
    excluded = sample_ids[~valid].tolist()
    X, sample_ids = X[valid], sample_ids[valid]
    t, e = validate_survival(t_raw[valid], e_raw[valid])
    g = None if groups is None else np.asarray(groups)[valid].astype(str)
    c = None if cohorts is None else np.asarray(cohorts)[valid]
    if splits is None:
        splits = _holdouts(survival_strata(e.astype(int)), g, n_repeats, seed, "the event")
    parts = []
    for i, split in enumerate(splits):
        seed_i = split_seed(split, i, seed)
        reducer = "pca" if name == "pca_cox" else None
        fmap = feature_map(reducer, cfg.cox_components, top_genes=cfg.top_genes, seed=seed_i)
        features = fmap.fit(X[split.train]).transform(X)
        if name == "mlp":
            parts.append(
                run_survival(
                    features,
                    t,
                    e,
                    groups=g,
                    cohorts=c,
                    ids=sample_ids,
                    splits=[split],
                    model=cfg.cox_mlp,
                    min_events=min_events,
                    seed=seed_i,
                )
            )
            continue
        parts.append(
            _pca_cox_split(features, t, e, c, sample_ids, split, i, cfg.cox_penalizer, min_events)
        )
    return merge_survival(parts, excluded)


def _svm_split(
    method: str,
    features: np.ndarray,
    y: np.ndarray,
    classes: list[Any],
    ids: np.ndarray,
    split: Any,
    i: int,
    C: float,
) -> ClassificationResult:
    """RBF SVM on PCA scores as they are.

    PCA scores keep the log-TPM geometry; standardising them (as the embedding SVM of
    ``make_svm`` does) would blow the near-zero-variance trailing components up to the
    weight of the leading ones and drown the signal (macro-F1 0.77 -> 0.08 on simulated
    data with 108 components). NMF activations, whose per-component scale is arbitrary,
    go through ``make_svm`` and are standardised.
    """
    from sklearn.svm import SVC

    tr, te = split.train, split.test
    svm = SVC(C=float(C), kernel="rbf", gamma="scale").fit(features[tr], y[tr])
    pred = svm.predict(features[te])
    return classification_split_result(
        method, split_name(split, i), len(tr), ids[te], y[te], pred, classes
    )


def _pca_cox_split(
    features: np.ndarray,
    t: np.ndarray,
    e: np.ndarray,
    c: np.ndarray | None,
    ids: np.ndarray,
    split: Any,
    i: int,
    penalizer: float,
    min_events: int,
) -> SurvivalResult:
    tr, te = split.train, split.test
    model = PenalizedCox(penalizer=float(penalizer)).fit(features[tr], t[tr], e[tr])
    return survival_split_result(
        "penalised Cox",
        split_name(split, i),
        len(tr),
        ids[te],
        t[te],
        e[te],
        model.predict_risk(features[te]),
        cohorts=None if c is None else c[te],
        min_events=min_events,
    )
