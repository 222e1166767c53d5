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
    corrected_t_interval,
    mean_std,
    split_correlation,
    validate_survival,
    within_group_auroc,
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


# --------------------------------------------------------------------------- per class
def test_per_class_precision_recall_match_sklearn():
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(3)
    t = rng.integers(0, 4, 80)
    p = np.where(rng.random(80) < 0.6, t, rng.integers(0, 4, 80))
    m = classification_metrics(t, p, labels=[0, 1, 2, 3])
    prec, rec, f1, sup = precision_recall_fscore_support(t, p, labels=[0, 1, 2, 3])
    assert [m["per_class_precision"][str(c)] for c in range(4)] == pytest.approx(prec)
    assert [m["per_class_recall"][str(c)] for c in range(4)] == pytest.approx(rec)
    assert [m["per_class_f1"][str(c)] for c in range(4)] == pytest.approx(f1)
    assert [m["per_class_support"][str(c)] for c in range(4)] == sup.tolist()


# --------------------------------------------------------------------------- within cohort
def naive_within_group_auroc(y, s, g) -> float:
    """P(positive outranks negative) over pairs from one group, ties one half, by loops."""
    num = den = 0.0
    for i in np.flatnonzero(y == 1):
        for j in np.flatnonzero(y == 0):
            if g[i] == g[j]:
                den += 1
                num += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
    return num / den


def test_within_group_auroc_matches_pairs_and_ignores_group_identity():
    rng = np.random.default_rng(4)
    g = np.repeat(["a", "b", "c", "d"], [30, 25, 20, 6])
    y = (rng.random(g.size) < np.select([g == "a", g == "b"], [0.7, 0.2], 0.4)).astype(int)
    y[g == "d"] = 0  # one class only: no pairs, skipped
    s = np.round(rng.normal(size=g.size) + 0.8 * y, 1)  # rounded: some ties
    out = within_group_auroc(y, s, g)
    assert out["pooled"] == pytest.approx(naive_within_group_auroc(y, s, g))
    assert out["skipped"] == ["d"] and out["n_groups"] == 3
    for name, part in out["per_group"].items():
        sel = g == name
        assert part["auroc"] == pytest.approx(roc_auc_score(y[sel], s[sel]))
    # A score that only knows the group: high pan-group AUROC, exactly 0.5 within groups.
    by_group = np.select([g == "a", g == "b"], [2.0, 0.0], 1.0)
    assert roc_auc_score(y, by_group) > 0.6
    assert within_group_auroc(y, by_group, g)["pooled"] == 0.5
    one = np.zeros(g.size, dtype=int)
    assert within_group_auroc(y, s, one)["pooled"] == pytest.approx(roc_auc_score(y, s))
    assert math.isnan(within_group_auroc(y[g == "d"], s[g == "d"], g[g == "d"])["pooled"])


# --------------------------------------------------------------------------- split intervals
def test_corrected_t_interval_by_hand():
    v = np.array([0.61, 0.55, 0.7, 0.58, 0.66, np.nan])
    f = v[np.isfinite(v)]
    se = f.std(ddof=1) * math.sqrt(1 / f.size + 0.25 / 0.75)
    half = stats.t.ppf(0.95, f.size - 1) * se
    lo, hi = corrected_t_interval(v, correlation=0.25, level=0.9)
    assert (lo, hi) == pytest.approx((f.mean() - half, f.mean() + half))
    naive = corrected_t_interval(f, correlation=0.0)
    assert naive == pytest.approx(stats.t.interval(0.95, f.size - 1, f.mean(), stats.sem(f)))
    assert all(math.isnan(x) for x in corrected_t_interval([0.5], correlation=0.2))
    assert split_correlation(0.2, "nadeau_bengio") == 0.2
    assert split_correlation(0.2) == pytest.approx(0.36)
    with pytest.raises(ConfigError, match="correlation"):
        corrected_t_interval(f, correlation=1.0)


def _null_split_aurocs(replicates: int, splits: int, n: int, test_size: float) -> np.ndarray:
    """AUROCs of a signal-free scorer: fresh random features and labels per replicate,
    ``splits`` stratified random hold-outs each, scored by the difference of the training
    class means of the training-standardised features (a linear probe without tuning);
    AUROC by the Mann-Whitney rank formula."""
    rng = np.random.default_rng(11)
    n_pos = 45
    y = np.zeros(n, dtype=int)
    y[:n_pos] = 1
    t_pos, t_neg = round(test_size * n_pos), round(test_size * (n - n_pos))
    out = np.empty((replicates, splits))
    for r in range(replicates):
        X = rng.normal(size=(n, 10))
        for j in range(splits):
            test = np.zeros(n, dtype=bool)
            test[rng.choice(n_pos, t_pos, replace=False)] = True
            test[n_pos + rng.choice(n - n_pos, t_neg, replace=False)] = True
            tr, te = ~test, test
            Z = (X - X[tr].mean(0)) / X[tr].std(0)
            w = Z[tr & (y == 1)].mean(0) - Z[tr & (y == 0)].mean(0)
            ranks = stats.rankdata(Z[te] @ w)
            out[r, j] = (ranks[:t_pos].sum() - t_pos * (t_pos + 1) / 2) / (t_pos * t_neg)
    return out


def test_split_interval_covers_chance_at_the_nominal_rate():
    """200 replicates of 10 overlapping 80/20 splits of 150 samples under no signal: the
    calibrated interval contains 0.5 at about 95% (3 binomial SEs: +-0.046), the naive
    t-interval, which treats the splits as independent, far less often. The mean of the
    split AUROCs shows no bias below chance (within 4 Monte-Carlo SEs)."""
    reps, level = 200, 0.95
    scores = _null_split_aurocs(reps, 10, 150, 0.2)

    def coverage(rho: float) -> float:
        return float(
            np.mean(
                [
                    lo <= 0.5 <= hi
                    for lo, hi in (
                        corrected_t_interval(s, correlation=rho, level=level) for s in scores
                    )
                ]
            )
        )

    tolerance = 3 * math.sqrt(level * (1 - level) / reps)
    assert abs(coverage(split_correlation(0.2)) - level) <= tolerance
    assert coverage(0.0) < 0.8  # naive: ~0.64 in benchmarks/split_ci_coverage.py
    nb = coverage(split_correlation(0.2, "nadeau_bengio"))
    assert coverage(0.0) < nb <= coverage(split_correlation(0.2))
    means = scores.mean(axis=1)
    assert abs(means.mean() - 0.5) < 4 * means.std(ddof=1) / math.sqrt(reps)
