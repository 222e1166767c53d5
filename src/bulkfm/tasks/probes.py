"""Linear probes on frozen embeddings, tuned by patient-grouped inner cross-validation.

A linear probe asks how much of a task is *linearly* readable from an embedding,
which is what separates representations rather than heads. Each probe:

1. standardises the embedding with a scaler fitted on the training rows only;
2. picks its L2 penalty by inner cross-validation on the training rows
   (patient-grouped folds, stratified by class, mutation status or event; see
   :func:`bulkfm.data.splits.inner_folds`), scored by AUROC (mutation), the C-index (survival)
   and, for several classes, held-out log-loss: macro-F1 on a small inner fold
   jumps with single samples, while log-loss is a smooth proper scoring rule;
3. refits on all training rows with that penalty and predicts the test rows.

Heads: logistic regression (multinomial for several classes, binary for
mutations; scikit-learn ``lbfgs``) and a ridge Cox model (:mod:`bulkfm.tasks.cox`).
Speed: the penalty grid is walked from strong to weak with warm starts, and when
features outnumber training rows the data are rotated into the rows' span first
(an L2-penalised linear model's coefficients always lie there, so the fit is
unchanged but costs O(n^2 p) instead of O(n p^2)).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from bulkfm.config import check_int
from bulkfm.errors import BulkfmError, ConfigError, SplitError
from bulkfm.scaling import Standardizer
from bulkfm.tasks.cox import fit_ridge_cox

logger = logging.getLogger(__name__)

__all__ = ["PROBE_KINDS", "ProbeConfig", "ProbeResult", "run_probe"]

ProbeKind = Literal["multiclass", "binary", "survival"]
PROBE_KINDS: tuple[str, ...] = ("multiclass", "binary", "survival")


def _check_grid(name: str, grid: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(v) for v in grid)
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ConfigError(f"{name} must be a non-empty list of positive numbers, got {grid!r}")
    return values


@dataclass(frozen=True)
class ProbeConfig:
    """Penalty grids and inner-CV settings.

    ``c_grid`` is scikit-learn's inverse penalty ``C`` of logistic regression;
    ``cox_alpha_grid`` is the ridge penalty of :func:`~bulkfm.tasks.cox.fit_ridge_cox`
    (per-sample scale). Five values each and three inner folds keep a benchmark of
    tens of tasks x 10 splits under a minute per model. The grids span the optima
    seen on simulated and TCGA data, from near-"infinite" penalties (which rank
    best in small within-cohort tasks) to weak ones (large pan-cancer tasks).
    """

    inner_folds: int = 3
    c_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    cox_alpha_grid: tuple[float, ...] = (10.0, 3.0, 1.0, 0.3, 0.1)
    max_iter: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("inner_folds", self.inner_folds, 2)
        check_int("max_iter", self.max_iter, 1)
        check_int("seed", self.seed, 0)
        object.__setattr__(self, "c_grid", _check_grid("c_grid", self.c_grid))
        object.__setattr__(
            self, "cox_alpha_grid", _check_grid("cox_alpha_grid", self.cox_alpha_grid)
        )

    def grid(self, kind: str) -> tuple[float, ...]:
        """Grid ordered from the strongest penalty to the weakest (warm-start order)."""
        if kind == "survival":
            return tuple(sorted(self.cox_alpha_grid, reverse=True))
        return tuple(sorted(self.c_grid))


@dataclass
class ProbeResult:
    """Test-set output of one probe.

    ``prediction``: P(class 1) for binary tasks, predicted class codes for
    multiclass tasks, log-risk (higher = shorter survival) for survival tasks.
    """

    prediction: np.ndarray
    param: float
    inner_scores: dict[float, float] = field(default_factory=dict)
    n_features: int = 0


# --------------------------------------------------------------------------- scoring


def _log_loss(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (probabilities clipped at 1e-15)."""
    col = np.searchsorted(classes, y_true)
    col = np.clip(col, 0, classes.size - 1)
    p = proba[np.arange(y_true.size), col]
    p = np.where(classes[col] == y_true, p, 0.0)
    return float(-np.mean(np.log(np.clip(p, 1e-15, 1.0))))


def _cv_score(kind: str, y_true: np.ndarray, pred: np.ndarray, classes: np.ndarray) -> float:
    """Inner-CV score, higher is better; NaN where undefined (e.g. one class in a fold)."""
    if kind == "multiclass":
        return -_log_loss(y_true, pred, classes)
    from bulkfm import metrics

    try:
        if kind == "binary":
            return float(metrics.auroc(y_true, pred[:, list(classes).index(1)]))
        return float(metrics.concordance_index(y_true[:, 0], y_true[:, 1], pred))
    except (BulkfmError, ValueError, ZeroDivisionError):
        return float("nan")


# --------------------------------------------------------------------------- preparation


def _standardise(X_fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    scaler = Standardizer(dtype=np.float64).fit(X_fit)
    return [scaler.transform(X) for X in (X_fit, *others)]


def _row_space(A: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Rotate into the span of A's rows when p > n (exact for L2-penalised linear models)."""
    n, p = A.shape
    if p <= n:
        return [A, *others]
    _, s, vt = np.linalg.svd(A, full_matrices=False)
    keep = s > s.max(initial=0.0) * max(n, p) * np.finfo(float).eps
    basis = vt[keep].T
    return [A @ basis] + [X @ basis for X in others]


def _prepare(X_fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    return _row_space(*_standardise(X_fit, *others))


# --------------------------------------------------------------------------- paths


def _logistic_path(
    A: np.ndarray,
    y: np.ndarray,
    B: np.ndarray,
    grid: Sequence[float],
    config: ProbeConfig,
    classes: np.ndarray,
) -> list[np.ndarray]:
    """Class probabilities of B (columns = ``classes``) for each penalty of the path."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if np.unique(y).size < 2:
        raise SplitError(
            f"the training rows hold one class only ({np.unique(y).tolist()}); a classifier "
            "needs two or more: use more samples, fewer splits, or drop this task"
        )
    model = LogisticRegression(solver="lbfgs", max_iter=config.max_iter, warm_start=True)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in grid:
            model.set_params(C=c)
            model.fit(A, y)
            proba = np.zeros((B.shape[0], classes.size))
            proba[:, np.searchsorted(classes, model.classes_)] = model.predict_proba(B)
            out.append(proba)
    return out


def _cox_path(
    A: np.ndarray, y: np.ndarray, B: np.ndarray, grid: Sequence[float], config: ProbeConfig
) -> list[np.ndarray]:
    out = []
    init = None
    for alpha in grid:
        fit = fit_ridge_cox(A, y[:, 0], y[:, 1], alpha, init=init, max_iter=config.max_iter)
        init = fit.coef
        out.append(fit.risk(B))
    return out


def _classes(kind: str, y: np.ndarray) -> np.ndarray:
    """The class codes a classifier's probabilities are columns of (none for survival)."""
    return np.unique(y) if kind != "survival" else np.empty(0)


def _path(
    kind: str,
    A: np.ndarray,
    y: np.ndarray,
    B: np.ndarray,
    grid: Sequence[float],
    config: ProbeConfig,
    classes: np.ndarray,
) -> list[np.ndarray]:
    if kind == "survival":
        return _cox_path(A, y, B, grid, config)
    return _logistic_path(A, y, B, grid, config, classes)


# --------------------------------------------------------------------------- tuning


def _tune(
    kind: str,
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    strata: np.ndarray,
    config: ProbeConfig,
) -> tuple[float, dict[float, float]]:
    grid = config.grid(kind)
    if len(grid) == 1:
        return grid[0], {}
    from bulkfm.data.splits import inner_folds

    classes = _classes(kind, y)
    scores = np.full((config.inner_folds, len(grid)), np.nan)
    folds = inner_folds(strata, groups, k=config.inner_folds, seed=config.seed)
    for f, fold in enumerate(folds):
        A, B = _prepare(X[fold.train], X[fold.test])
        try:
            preds = _path(kind, A, y[fold.train], B, grid, config, classes)
        except SplitError as exc:  # e.g. an inner training fold without events
            logger.debug("inner fold %d skipped: %s", f, exc)
            continue
        scores[f] = [_cv_score(kind, y[fold.test], p, classes) for p in preds]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column
        mean = np.nanmean(scores, axis=0)
    table = {g: float(m) for g, m in zip(grid, mean, strict=True)}
    if np.isnan(mean).all():
        logger.warning("inner CV gave no valid score; using the strongest penalty %g", grid[0])
        return grid[0], table
    # First maximum in strong-to-weak order: ties go to the stronger penalty.
    return grid[int(np.nanargmax(mean))], table


def _check_probe_inputs(
    kind: str, X_train: np.ndarray, X_test: np.ndarray, y_train: np.ndarray
) -> None:
    if kind not in PROBE_KINDS:
        raise ConfigError(f"unknown probe kind {kind!r}; choose one of {PROBE_KINDS}")
    if X_train.ndim != 2 or X_test.ndim != 2 or X_train.shape[1] != X_test.shape[1]:
        raise SplitError(
            f"train and test embeddings must be 2-D with the same width; got {X_train.shape} "
            f"and {X_test.shape}"
        )
    if len(y_train) != X_train.shape[0]:
        raise SplitError(
            f"{X_train.shape[0]} training rows but {len(y_train)} targets; pass one target per row"
        )
    if kind == "survival" and (y_train.ndim != 2 or y_train.shape[1] != 2):
        raise SplitError("survival targets must be an (n, 2) array of [time, event]")
    if kind == "binary" and not np.isin(y_train, (0, 1)).all():
        raise SplitError(
            f"binary targets must be 0/1 (1 = mutated), got {np.unique(y_train)[:5].tolist()}"
        )
    if kind != "survival" and np.unique(y_train).size < 2:
        raise SplitError(
            f"{kind} task has one class in its training rows ({np.unique(y_train).tolist()}); "
            "a classifier needs at least two: check the label column or drop the task"
        )


def run_probe(
    kind: str,
    X_train: np.ndarray,
    X_test: np.ndarray,
    y_train: np.ndarray,
    groups_train: np.ndarray,
    config: ProbeConfig | None = None,
    *,
    strata_train: np.ndarray | None = None,
) -> ProbeResult:
    """Tune the penalty on the training rows, refit, and predict the test rows.

    ``y_train``: class codes (multiclass), 0/1 (binary) or an (n, 2) [time, event]
    array (survival). ``groups_train``: patient ids, so inner folds never split a
    patient. ``strata_train`` defaults to the class, or the event for survival.
    """
    config = config or ProbeConfig()
    X_train = np.asarray(X_train, dtype=np.float64)
    X_test = np.asarray(X_test, dtype=np.float64)
    y_train = np.asarray(y_train)
    _check_probe_inputs(kind, X_train, X_test, y_train)
    if strata_train is None:
        strata_train = y_train[:, 1] if kind == "survival" else y_train
    param, table = _tune(kind, X_train, y_train, np.asarray(groups_train), strata_train, config)
    A, B = _prepare(X_train, X_test)
    classes = _classes(kind, y_train)
    output = _path(kind, A, y_train, B, [param], config, classes)[0]
    if kind == "binary":
        prediction = output[:, list(classes).index(1)]
    elif kind == "multiclass":
        prediction = classes[np.argmax(output, axis=1)]
    else:
        prediction = output
    return ProbeResult(
        prediction=np.asarray(prediction), param=param, inner_scores=table, n_features=A.shape[1]
    )
