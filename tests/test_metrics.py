from __future__ import annotations

import math

import numpy as np
import pytest
from lifelines.utils import concordance_index as lifelines_cindex
from scipy import stats
from sklearn.metrics import roc_auc_score

from bulkfm.errors import BulkfmWarning, ClinicalMatchError, ConfigError, SplitError
from bulkfm.metrics import (
    auroc,
    bootstrap_ci,
    classification_metrics,
    cohort_concordance,
    concordance_counts,
    concordance_index,
    mean_std,
    validate_survival,
)


# --------------------------------------------------------------------------- references
def naive_f1(t: np.ndarray, p: np.ndarray, labels: list) -> tuple[np.ndarray, np.ndarray]:
    """Per-class F1 and support from counts, written from the definition."""
    f1, support = [], []
    for c in labels:
        tp = np.sum((t == c) & (p == c))
        fp = np.sum((t != c) & (p == c))
        fn = np.sum((t == c) & (p != c))
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        support.append(np.sum(t == c))
    return np.array(f1), np.array(support)


def naive_cindex(time, event, risk) -> float:
    """Harrell's C by looping over ordered pairs (lifelines' tie rules)."""
    num = den = 0.0
    n = len(time)
    for i in range(n):
        if not event[i]:
            continue
        for j in range(n):
            if i == j:
                continue
            if time[j] > time[i] or (time[j] == time[i] and not event[j]):
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def survival_data(seed: int, n: int = 80):
    rng = np.random.default_rng(seed)
    risk = np.round(rng.normal(size=n), 1)  # rounded: ties in the risk
    time = np.ceil(rng.exponential(np.exp(-risk)) * 6)  # coarse: ties in time
    censor = np.ceil(rng.exponential(1.5, size=n) * 6)
    event = (time <= censor).astype(int)
    return np.minimum(time, censor).clip(1), event, risk + rng.normal(0, 0.5, n).round(1)


# --------------------------------------------------------------------------- classification
def test_classification_metrics_match_definition_and_sklearn_confusion():
    rng = np.random.default_rng(0)
    t = rng.choice(["a", "b", "c"], size=60, p=[0.6, 0.3, 0.1])
    p = np.where(rng.random(60) < 0.7, t, rng.choice(["a", "b", "c"], size=60))
    out = classification_metrics(t, p)
    f1, support = naive_f1(t, p, ["a", "b", "c"])
    assert out["labels"] == ["a", "b", "c"]
    assert out["accuracy"] == pytest.approx(np.mean(t == p))
    assert out["macro_f1"] == pytest.approx(f1.mean())
    assert out["weighted_f1"] == pytest.approx(np.average(f1, weights=support))
    conf = np.array(out["confusion"])
    for i, a in enumerate(["a", "b", "c"]):
        for j, b in enumerate(["a", "b", "c"]):
            assert conf[i, j] == np.sum((t == a) & (p == b))
    assert out["n"] == 60


def test_classification_metrics_labels_keep_absent_class_in_order():
    out = classification_metrics(["x", "y", "x"], ["x", "x", "x"], labels=["y", "z", "x"])
    assert out["labels"] == ["y", "z", "x"]
    assert out["confusion"] == [[0, 0, 1], [0, 0, 0], [0, 0, 2]]
    assert out["per_class_f1"]["z"] == 0.0


def test_classification_metrics_rejects_value_outside_labels():
    with pytest.raises(ConfigError, match=r"not in labels"):
        classification_metrics(["a", "b"], ["a", "c"], labels=["a", "b"])


def test_classification_metrics_rejects_length_mismatch():
    with pytest.raises(ConfigError, match="different lengths"):
        classification_metrics(["a", "b"], ["a"])


def test_classification_metrics_rejects_missing_labels():
    with pytest.raises(ConfigError, match="missing values"):
        classification_metrics(np.array(["a", None], dtype=object), ["a", "a"])


def test_auroc_equals_pair_counting_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 50)
    s = np.round(y * 0.5 + rng.normal(size=50), 1)
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert auroc(y, s) == pytest.approx(expected)


def test_auroc_multiclass_matches_sklearn_ovr():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 90)
    prob = rng.dirichlet(np.ones(3), size=90) + np.eye(3)[y] * 0.3
    prob /= prob.sum(axis=1, keepdims=True)
    assert auroc(y, prob) == pytest.approx(roc_auc_score(y, prob, multi_class="ovr"))
    assert auroc(y[y < 2], prob[y < 2][:, :2]) == pytest.approx(
        roc_auc_score(y[y < 2], prob[y < 2][:, 1])
    )


def test_auroc_rejects_one_class():
    with pytest.raises(SplitError, match="only the class"):
        auroc([1, 1, 1], [0.1, 0.2, 0.3])


def test_auroc_rejects_1d_score_for_multiclass():
    with pytest.raises(ConfigError, match="1-D"):
        auroc([0, 1, 2], [0.1, 0.2, 0.3])


# --------------------------------------------------------------------------- survival
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_concordance_matches_naive_and_lifelines(seed):
    time, event, risk = survival_data(seed)
    assert len(np.unique(time)) < len(time) / 2  # many ties
    ours = concordance_index(time, event, risk)
    assert ours == pytest.approx(naive_cindex(time, event, risk), abs=1e-12)
    # lifelines wants a score that is higher for longer survival: minus the risk
    assert ours == pytest.approx(lifelines_cindex(time, -risk, event), abs=1e-12)


def test_concordance_sign_high_risk_short_survival_is_one():
    time = np.arange(1, 21, dtype=float)
    event = np.ones(20)
    assert concordance_index(time, event, -time) == 1.0
    assert concordance_index(time, event, time) == 0.0
    assert concordance_index(time, event, np.zeros(20)) == 0.5


def test_concordance_counts_block_boundary(monkeypatch):
    import bulkfm.metrics as m

    time, event, risk = survival_data(3, n=60)
    full = concordance_counts(time, event, risk)
    monkeypatch.setattr(m, "_PAIR_BLOCK", 7)
    assert concordance_counts(time, event, risk) == full


def test_concordance_rejects_no_comparable_pairs():
    with pytest.raises(SplitError, match="no comparable pairs"):
        concordance_index([1.0, 2.0, 3.0], [0, 0, 0], [0.1, 0.2, 0.3])


def test_concordance_rejects_nan_risk():
    with pytest.raises(ConfigError, match="NaN/inf"):
        concordance_index([1.0, 2.0], [1, 0], [0.1, np.nan])


@pytest.mark.parametrize(
    ("time", "event", "match"),
    [
        ([1.0, 0.0, 3.0], [1, 0, 1], r"<= 0"),
        ([1.0, -2.0, 3.0], [1, 0, 1], r"<= 0"),
        ([1.0, np.nan, 3.0], [1, 0, 1], r"missing, infinite"),
        ([1.0, 2.0, 3.0], [1, 2, 1], r"0 \(censored\) or 1"),
        ([1.0, 2.0, 3.0], ["dead", "alive", "dead"], r"must be 0/1"),
    ],
)
def test_validate_survival_rejects_bad_records(time, event, match):
    with pytest.raises(ClinicalMatchError, match=match):
        validate_survival(time, event)


def test_cohort_concordance_weighted_macro_and_skips():
    time, event, risk = survival_data(4, n=90)
    cohorts = np.array(["A"] * 40 + ["B"] * 30 + ["C"] * 15 + ["D"] * 5)
    event[70:85] = 0  # cohort C: no events
    time[85:], event[85:] = [5, 6, 7, 8, 9], [1, 0, 0, 0, 0]  # D: one event...
    risk[85:] = [0.0, 1.0, 2.0, 3.0, 4.0]
    time[86:] = 1  # ...that precedes nobody: censored earlier, no comparable pair
    with pytest.warns(BulkfmWarning, match="skipped for 2 cohort"):
        out = cohort_concordance(time, event, risk, cohorts)
    assert set(out["per_cohort"]) == {"A", "B"}
    assert "0 event(s)" in out["skipped"]["C"]
    assert "comparable pair" in out["skipped"]["D"]
    ca = naive_cindex(time[:40], event[:40], risk[:40])
    cb = naive_cindex(time[40:70], event[40:70], risk[40:70])
    assert out["per_cohort"]["A"]["c_index"] == pytest.approx(ca)
    assert out["per_cohort"]["B"]["n"] == 30
    assert out["weighted"] == pytest.approx((40 * ca + 30 * cb) / 70)
    assert out["macro"] == pytest.approx((ca + cb) / 2)
    assert out["overall"] == pytest.approx(naive_cindex(time, event, risk))


def test_cohort_concordance_min_events_threshold():
    time, event, risk = survival_data(5, n=60)
    cohorts = np.array(["A"] * 30 + ["B"] * 30)
    n_b = int(event[30:].sum())
    with pytest.warns(BulkfmWarning, match="min_events"):
        out = cohort_concordance(time, event, risk, cohorts, min_events=n_b + 1)
    assert "B" in out["skipped"]
    assert out["n_cohorts"] == (1 if event[:30].sum() > n_b else 0)


def test_cohort_concordance_rejects_bad_min_events():
    with pytest.raises(ConfigError, match="min_events"):
        cohort_concordance([1.0, 2.0], [1, 0], [0.0, 1.0], ["a", "a"], min_events=0)


# --------------------------------------------------------------------------- summaries
def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(6)
    x = rng.normal(2.0, 1.0, size=200)
    lo, hi = bootstrap_ci(np.mean, x, n_boot=2000, seed=0)
    ref = stats.bootstrap(
        (x,), np.mean, n_resamples=2000, method="percentile", random_state=0
    ).confidence_interval
    assert lo < x.mean() < hi
    assert lo == pytest.approx(ref.low, abs=0.03)
    assert hi == pytest.approx(ref.high, abs=0.03)
    assert bootstrap_ci(np.mean, x, n_boot=200, seed=1) == bootstrap_ci(
        np.mean, x, n_boot=200, seed=1
    )
    assert bootstrap_ci(np.mean, x, n_boot=200, seed=1) != bootstrap_ci(
        np.mean, x, n_boot=200, seed=2
    )


def test_bootstrap_ci_resamples_arrays_jointly():
    y = np.array([0, 1] * 30)
    # perfect predictions stay perfect only when rows are resampled together
    lo, hi = bootstrap_ci(lambda a, b: float(np.mean(a == b)), y, y.copy(), n_boot=50)
    assert lo == hi == 1.0


def test_bootstrap_ci_rejects_mostly_undefined_metric():
    def needs_many_ones(a: np.ndarray) -> float:
        if a.sum() < 15:  # undefined on most resamples of 10 ones in 20
            raise SplitError("too few")
        return float(a.mean())

    with pytest.raises(SplitError, match="undefined on"):
        bootstrap_ci(needs_many_ones, np.array([0, 1] * 10), n_boot=100)


def test_bootstrap_ci_rejects_bad_alpha():
    with pytest.raises(ConfigError, match="alpha"):
        bootstrap_ci(np.mean, [1.0, 2.0], alpha=1.5)


def test_mean_std_sample_std_and_nan():
    out = mean_std([0.6, 0.7, np.nan, 0.8])
    assert out["mean"] == pytest.approx(0.7)
    assert out["std"] == pytest.approx(np.std([0.6, 0.7, 0.8], ddof=1))
    assert (out["n"], out["n_nan"]) == (3, 1)
    assert len(out["values"]) == 4
    single = mean_std([0.5])
    assert single["mean"] == 0.5 and math.isnan(single["std"])
