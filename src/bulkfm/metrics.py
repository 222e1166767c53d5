"""Every score the project reports, in one place, so evaluate and bench cannot disagree.

Conventions (the ones toolkits most often get wrong):

- **Risk, not survival time.** Survival functions take a *risk* (log hazard): a higher
  value means a shorter expected survival. lifelines' ``concordance_index`` expects the
  opposite (a predicted survival time), so comparing against it needs ``-risk``.
- **Harrell's comparable pairs** follow lifelines: a pair is comparable when the shorter
  time is an event; an event and a censoring at the same time are comparable (the
  censored sample is known to have lived at least as long); two events at the same time
  are not. Tied risks count one half.
- Undefined scores (one class, no comparable pair) raise instead of returning a number
  that looks like a result.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from bulkfm.config import check_int, check_number, check_probability
from bulkfm.errors import BulkfmError, BulkfmWarning, ClinicalMatchError, ConfigError, SplitError

logger = logging.getLogger(__name__)

__all__ = [
    "auroc",
    "bootstrap_ci",
    "classification_metrics",
    "cohort_concordance",
    "concordance_counts",
    "concordance_index",
    "corrected_t_interval",
    "mean_std",
    "split_correlation",
    "validate_survival",
    "within_group_auroc",
]

# Events compared per block in the pair counting: bounds memory at ~block * n bytes.
_PAIR_BLOCK = 512


# --------------------------------------------------------------------------- helpers
def _as_1d(values: Any, what: str) -> np.ndarray:
    if hasattr(values, "to_numpy"):
        values = values.to_numpy()
    arr = np.asarray(values)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ConfigError(f"{what} must be one-dimensional, got shape {arr.shape}")
    return arr


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ConfigError(
            f"arrays have different lengths {lengths}; pass one value per sample, all aligned "
            "to the same sample order"
        )
    n = next(iter(lengths.values()))
    if n == 0:
        raise ConfigError(f"{', '.join(lengths)} are empty; there is nothing to score")
    return n


def _finite_float(values: Any, what: str) -> np.ndarray:
    try:
        arr = _as_1d(values, what).astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be numeric: {exc}") from exc
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ConfigError(
            f"{what} has {int(bad.sum())} NaN/inf value(s) (first at position "
            f"{int(np.flatnonzero(bad)[0])}); a model that outputs NaN diverged, retrain it "
            "with a lower learning rate"
        )
    return arr


# --------------------------------------------------------------------------- classification
def classification_metrics(
    y_true: Any, y_pred: Any, *, labels: Sequence[Any] | None = None
) -> dict[str, Any]:
    """Accuracy, macro/weighted F1, per-class precision / recall / F1 / support and the
    confusion matrix (rows = truth, columns = prediction).

    ``labels`` fixes the class order (and keeps classes absent from this test set in the
    matrix, so matrices of several splits can be summed); default: the sorted union.
    Macro F1 averages classes equally, which is what exposes a model ignoring small cohorts.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    t = _as_1d(y_true, "y_true")
    p = _as_1d(y_pred, "y_pred")
    _same_length(y_true=t, y_pred=p)
    if pd.isna(t).any() or pd.isna(p).any():
        raise ConfigError(
            "y_true or y_pred contains missing values; drop unlabelled samples before scoring"
        )
    if labels is None:
        labels = sorted(set(t.tolist()) | set(p.tolist()), key=str)
    labels = list(labels)
    unknown = sorted({str(v) for v in set(t.tolist()) | set(p.tolist())} - set(map(str, labels)))
    if unknown:
        raise ConfigError(
            f"values {unknown[:5]} are not in labels={labels[:10]}; pass every class in labels"
        )
    macro = f1_score(t, p, labels=labels, average="macro", zero_division=0)
    weighted = f1_score(t, p, labels=labels, average="weighted", zero_division=0)
    precision, recall, per_class, support = precision_recall_fscore_support(
        t, p, labels=labels, average=None, zero_division=0
    )

    def by_class(values: np.ndarray) -> dict[str, float]:
        return {str(c): float(v) for c, v in zip(labels, values, strict=True)}

    return {
        "accuracy": float(accuracy_score(t, p)),
        "macro_f1": float(macro),
        "weighted_f1": float(weighted),
        "per_class_f1": by_class(per_class),
        "per_class_precision": by_class(precision),
        "per_class_recall": by_class(recall),
        "per_class_support": {str(c): int(v) for c, v in zip(labels, support, strict=True)},
        "confusion": confusion_matrix(t, p, labels=labels).tolist(),
        "labels": [_plain(c) for c in labels],
        "n": len(t),
    }


def _plain(value: Any) -> Any:
    """numpy scalars -> Python ones so results stay JSON-able."""
    return value.item() if isinstance(value, np.generic) else value


def auroc(y_true: Any, score: Any) -> float:
    """Area under the ROC curve (binary: score of the positive class; multi-class: [n, k] ovr)."""
    from sklearn.metrics import roc_auc_score

    t = _as_1d(y_true, "y_true")
    s = np.asarray(score, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    _same_length(y_true=t, score=s)
    if not np.isfinite(s).all():
        raise ConfigError("score has NaN/inf values; check the model's predictions")
    classes = np.unique(t)
    if classes.size < 2:
        raise SplitError(
            f"y_true holds only the class {classes.tolist()}: AUROC is undefined; use a split "
            "stratified by this label so every test set has both classes"
        )
    if s.ndim == 1:
        if classes.size > 2:
            raise ConfigError(
                f"y_true has {classes.size} classes but score is 1-D; pass class probabilities "
                "[n, n_classes] for a multi-class AUROC"
            )
        return float(roc_auc_score(t, s))
    if s.shape[1] != classes.size:
        raise ConfigError(
            f"score has {s.shape[1]} columns but y_true has {classes.size} classes; pass one "
            "probability column per class in sorted class order"
        )
    if s.shape[1] == 2:
        return float(roc_auc_score(t, s[:, 1]))
    return float(roc_auc_score(t, s, multi_class="ovr", average="macro"))


def within_group_auroc(y_true: Any, score: Any, groups: Any) -> dict[str, Any]:
    """AUROC over (positive, negative) pairs *from the same group* (e.g. cohort).

    A pan-cancer mutation AUROC mixes cohorts, so a model that only recognises the cancer
    type scores well whenever mutation rates differ between cohorts. Counting only pairs
    within a cohort removes that: ``"pooled"`` is the probability that a random mutated
    sample outranks a random wild-type sample of its own cohort (ties one half), i.e. the
    per-group AUROCs weighted by their number of pairs (n_pos x n_neg); with one group it
    is the plain AUROC, and a score that is constant within groups gets 0.5. Groups
    without both classes have no pairs and are listed in ``"skipped"``; ``"pooled"`` is
    NaN when no group has both (no warning: callers that score many splits say it once).
    """
    from sklearn.metrics import roc_auc_score

    t = _as_1d(y_true, "y_true")
    s = _finite_float(score, "score")
    g = _as_1d(groups, "groups")
    _same_length(y_true=t, score=s, groups=g)
    if pd.isna(g).any():
        raise ConfigError("groups has missing values; give every sample a group (cohort)")
    if not np.isin(t, (0, 1)).all():
        raise ConfigError(f"y_true must be 0/1, got {np.unique(t)[:5].tolist()}")
    per_group: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    labels = g.astype(str)
    for name in sorted(pd.unique(labels)):
        sel = labels == name
        n_pos = int((t[sel] == 1).sum())
        n_neg = int(sel.sum()) - n_pos
        if n_pos == 0 or n_neg == 0:
            skipped.append(str(name))
            continue
        per_group[str(name)] = {
            "auroc": float(roc_auc_score(t[sel], s[sel])),
            "n_pos": n_pos,
            "n_neg": n_neg,
        }
    pairs = np.array([v["n_pos"] * v["n_neg"] for v in per_group.values()], dtype=np.float64)
    if pairs.size:
        values = np.array([v["auroc"] for v in per_group.values()])
        pooled = float(np.average(values, weights=pairs))
    else:
        pooled = math.nan
    return {
        "pooled": pooled,
        "n_groups": len(per_group),
        "n_pairs": int(pairs.sum()),
        "per_group": per_group,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- survival
def validate_survival(time: Any, event: Any) -> tuple[np.ndarray, np.ndarray]:
    """(float64 times, bool events) or a ClinicalMatchError saying what to fix.

    Times must be finite and > 0 (a zero or negative follow-up is a recording error in
    clinical tables), events exactly 0/1. Callers that want to drop bad samples instead
    use :func:`bulkfm.tasks.survival.valid_survival_mask` first.
    """
    t_raw = _as_1d(time, "survival time")
    e_raw = _as_1d(event, "survival event")
    _same_length(time=t_raw, event=e_raw)
    try:
        t = t_raw.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ClinicalMatchError(
            f"survival time must be numeric (days), got dtype {t_raw.dtype}: {exc}"
        ) from exc
    bad = ~np.isfinite(t) | (t <= 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ClinicalMatchError(
            f"{int(bad.sum())} survival time(s) are missing, infinite or <= 0 (first at "
            f"position {first}: {t_raw[first]!r}); drop those samples (e.g. with "
            "bulkfm.tasks.survival.valid_survival_mask) or fix the clinical table"
        )
    try:
        e_num = pd.to_numeric(pd.Series(e_raw), errors="raise").to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ClinicalMatchError(
            f"survival event must be 0/1, got values {pd.unique(e_raw)[:5].tolist()}; recode "
            "it, e.g. event = (vital_status == 'Dead')"
        ) from exc
    if not np.isin(e_num, (0.0, 1.0)).all():
        odd = sorted({float(v) for v in e_num[~np.isin(e_num, (0.0, 1.0))]}, key=str)[:5]
        raise ClinicalMatchError(
            f"survival event must be 0 (censored) or 1 (event observed), got {odd}; recode "
            "it and drop samples whose status is unknown"
        )
    return t, e_num.astype(bool)


def concordance_counts(time: Any, event: Any, risk: Any) -> tuple[float, float, int]:
    """(concordant pairs, tied-risk pairs, comparable pairs) under Harrell's rule.

    Counted block-wise over events, O(n_events * n) time and O(block * n) memory, which
    is exact and fast for test sets of TCGA size.
    """
    t, e = validate_survival(time, event)
    r = _finite_float(risk, "risk")
    _same_length(time=t, risk=r)
    idx = np.flatnonzero(e)
    concordant = tied = 0.0
    pairs = 0
    for start in range(0, idx.size, _PAIR_BLOCK):
        i = idx[start : start + _PAIR_BLOCK]
        ti, ri = t[i, None], r[i, None]
        comparable = (t[None, :] > ti) | ((t[None, :] == ti) & ~e[None, :])
        pairs += int(comparable.sum())
        concordant += float((comparable & (ri > r[None, :])).sum())
        tied += float((comparable & (ri == r[None, :])).sum())
    return concordant, tied, pairs


def concordance_index(time: Any, event: Any, risk: Any) -> float:
    """Harrell's C-index; ``risk`` is higher for shorter survival (a log hazard)."""
    concordant, tied, pairs = concordance_counts(time, event, risk)
    if pairs == 0:
        n_events = int(validate_survival(time, event)[1].sum())
        raise SplitError(
            f"no comparable pairs ({n_events} events): the C-index is undefined; the test set "
            "needs events followed by longer observed times (stratify splits by the event)"
        )
    return (concordant + 0.5 * tied) / pairs


def cohort_concordance(
    time: Any,
    event: Any,
    risk: Any,
    cohorts: Any,
    *,
    min_events: int = 1,
    min_pairs: int = 2,
) -> dict[str, Any]:
    """Pan-cancer C-indexes: over all samples, and per cohort ("weighted", "macro").

    The overall index mixes cohorts, so a model that only ranks cancer types (by their
    baseline hazard) scores well; per-cohort indexes measure ranking *within* a cancer
    type. "weighted" weights cohorts by their number of samples, "macro" equally. Cohorts
    with fewer than ``min_events`` events or ``min_pairs`` comparable pairs are skipped
    (warning + reason in ``skipped``): their index is undefined or meaningless.
    """
    check_int("min_events", min_events, 1)
    check_int("min_pairs", min_pairs, 1)
    t, e = validate_survival(time, event)
    r = _finite_float(risk, "risk")
    c = _as_1d(cohorts, "cohorts")
    _same_length(time=t, risk=r, cohorts=c)
    if pd.isna(c).any():
        raise ConfigError("cohorts has missing values; give every sample a cohort")
    per_cohort: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in sorted(pd.unique(c.astype(str))):
        sel = c.astype(str) == name
        n, n_events = int(sel.sum()), int(e[sel].sum())
        concordant, tied, pairs = concordance_counts(t[sel], e[sel], r[sel])
        if n_events < min_events:
            skipped[name] = f"{n_events} event(s) < min_events={min_events} (n={n})"
        elif pairs < min_pairs:
            skipped[name] = f"{pairs} comparable pair(s) < min_pairs={min_pairs} (n={n})"
        else:
            per_cohort[name] = {
                "c_index": (concordant + 0.5 * tied) / pairs,
                "n": n,
                "n_events": n_events,
                "n_pairs": pairs,
            }
    if skipped:
        warnings.warn(
            f"C-index skipped for {len(skipped)} cohort(s): "
            + "; ".join(f"{k}: {v}" for k, v in skipped.items()),
            BulkfmWarning,
            stacklevel=2,
        )
    if per_cohort:
        scores = np.array([v["c_index"] for v in per_cohort.values()])
        sizes = np.array([v["n"] for v in per_cohort.values()], dtype=np.float64)
        weighted, macro = float(np.average(scores, weights=sizes)), float(scores.mean())
    else:
        weighted = macro = math.nan
    return {
        "overall": concordance_index(t, e, r),
        "weighted": weighted,
        "macro": macro,
        "n_cohorts": len(per_cohort),
        "per_cohort": per_cohort,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- summaries
def bootstrap_ci(
    metric: Callable[..., float],
    *arrays: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(*arrays)``, resampling samples jointly.

    Resamples on which the metric is undefined (it raises a BulkfmError or returns NaN,
    e.g. a resample without events) are dropped; more than half dropped is an error,
    because the interval would then describe a biased subset of resamples.
    """
    check_int("n_boot", n_boot, 10)
    check_probability("alpha", alpha, hint="e.g. 0.05 for a 95% interval")
    if not arrays:
        raise ConfigError("bootstrap_ci needs the metric's arrays, e.g. (y_true, y_pred)")
    data = [a.to_numpy() if hasattr(a, "to_numpy") else np.asarray(a) for a in arrays]
    n = _same_length(**{f"array{i}": a for i, a in enumerate(data)})
    rng = np.random.default_rng(seed)
    values = []
    failed = 0
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        try:
            value = float(metric(*(a[idx] for a in data)))
        except BulkfmError:
            value = math.nan
        if math.isnan(value):
            failed += 1
        else:
            values.append(value)
    if failed > n_boot // 2:
        raise SplitError(
            f"the metric was undefined on {failed} of {n_boot} bootstrap resamples (too few "
            f"samples, classes or events among n={n}); report no interval or use more data"
        )
    if failed:
        logger.info("bootstrap_ci: metric undefined on %d of %d resamples", failed, n_boot)
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def split_correlation(test_fraction: float, method: str = "calibrated") -> float:
    """Assumed correlation between the scores of two random hold-out splits of one data set.

    Random hold-outs overlap, so their scores are positively correlated and the spread of
    J split scores understates the uncertainty of their mean. ``"nadeau_bengio"``:
    Nadeau & Bengio's (2003) assumption, the test fraction f (their variance factor
    n_test / n_train is f / (1 - f)). ``"calibrated"``: 1 - (1 - f)^2, which is larger.
    Why: in ``python benchmarks/split_ci_coverage.py`` (signal-free linear scorer, fresh
    data per replicate, 1,000 replicates of 10 splits of 150 samples) the correlation of
    two splits' AUROCs was 0.18, 0.32, 0.44 and 0.49 at f = 0.1, 0.2, 1/3 and 0.5. At the
    usual f <= 1/3 that is above f, and Nadeau & Bengio's 95% interval contained chance in
    only 87-90% of replicates; with 1 - (1 - f)^2 (0.19, 0.36, 0.56, 0.75) it did in 93%
    and 94% at f = 0.1 and 0.2 and errs wide above (98%, 99.8%).
    """
    f = check_probability("test_fraction", test_fraction, hint="the hold-out fraction, e.g. 0.2")
    if method == "nadeau_bengio":
        return f
    if method == "calibrated":
        return 1.0 - (1.0 - f) ** 2
    raise ConfigError(f"method must be 'calibrated' or 'nadeau_bengio', got {method!r}")


def corrected_t_interval(
    values: Any, *, correlation: float, level: float = 0.95
) -> tuple[float, float]:
    """Interval for the mean of J scores of *overlapping* random splits of one data set.

    The corrected resampled t-interval (Nadeau & Bengio 2003, Machine Learning 52:239):
    if every pair of split scores has correlation rho, the variance of their mean is
    sigma^2 (rho + (1 - rho) / J) while the sample variance s^2 estimates only
    sigma^2 (1 - rho), so the plain interval s / sqrt(J) is far too narrow (it excluded
    0.5 for a random control). The corrected variance is s^2 (1/J + rho / (1 - rho)),
    used with a t quantile on J - 1 degrees of freedom. rho cannot be estimated from the
    splits of one data set (Bengio & Grandvalet 2004), so it is assumed:
    :func:`split_correlation`. NaN scores are left out; fewer than two finite scores give
    (NaN, NaN).
    """
    from scipy import stats

    check_number("correlation", correlation, low=0.0, high=1.0, high_open=True)
    check_number("level", level, low=0.0, high=1.0, low_open=True, high_open=True)
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, float)
    arr = arr[np.isfinite(arr)]
    j = arr.size
    if j < 2:
        return math.nan, math.nan
    mean = float(arr.mean())
    se = math.sqrt(float(arr.var(ddof=1)) * (1.0 / j + correlation / (1.0 - correlation)))
    half = float(stats.t.ppf(0.5 + level / 2, j - 1)) * se
    return mean - half, mean + half


def mean_std(values: Any) -> dict[str, Any]:
    """Mean ± sample standard deviation (ddof=1) over repeats, as the paper reports.

    NaN values (a repeat where the metric was undefined) are left out of mean and std and
    counted in ``n_nan``; ``std`` is NaN with fewer than two values.
    """
    arr = np.asarray(list(values), dtype=np.float64).ravel()
    finite = arr[~np.isnan(arr)]
    mean = float(finite.mean()) if finite.size else math.nan
    std = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return {
        "mean": mean,
        "std": std,
        "n": int(finite.size),
        "n_nan": int(arr.size - finite.size),
        "values": arr.tolist(),
    }
