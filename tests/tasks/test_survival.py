from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.statistics import logrank_test

from bulkfm.data.simulate import simulate_bulk
from bulkfm.errors import BulkfmWarning, ClinicalMatchError, ConfigError, SplitError
from bulkfm.metrics import concordance_index
from bulkfm.tasks.survival import CoxMLP, risk_groups_km, run_survival, valid_survival_mask

FAST = dict(hidden=(32, 16), max_epochs=80, patience=10, lr=3e-3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sim() -> ad.AnnData:
    return simulate_bulk(n_samples=240, n_genes=30, n_cohorts=3, censoring_rate=0.4, seed=1)


@pytest.fixture(scope="module")
def emb(sim) -> pd.DataFrame:
    return pd.DataFrame(sim.obsm["programmes"], index=sim.obs_names)


def cox_data(seed: int = 0, n: int = 150):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    t = np.ceil(rng.exponential(np.exp(-X @ np.array([0.9, -0.6, 0.3]))) * 8)
    c = np.ceil(rng.exponential(2.0, size=n) * 8)
    return X, np.maximum(np.minimum(t, c), 1.0), (t <= c).astype(int)


def naive_km(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Product-limit estimate at each distinct observed time."""
    times = np.unique(time)
    surv, s = [], 1.0
    for t in times:
        at_risk = np.sum(time >= t)
        deaths = np.sum((time == t) & (event == 1))
        s *= 1.0 - deaths / at_risk
        surv.append(s)
    return times, np.array(surv)


# --------------------------------------------------------------------------- CoxMLP
def test_linear_cox_head_converges_to_lifelines_fit():
    X, time, event = cox_data()
    df = pd.DataFrame(X, columns=["a", "b", "c"]).assign(T=time, E=event)
    ref = CoxPHFitter(penalizer=0.0).fit(df, "T", "E").predict_log_partial_hazard(df).to_numpy()
    cox = CoxMLP(hidden=(), dropout=0.0, weight_decay=0.0, val_fraction=0.0, lr=0.05)
    risk = cox.set_params(max_epochs=200).fit(X, time, event).predict_risk(X)
    # same linear predictor up to the constant the partial likelihood cannot see
    np.testing.assert_allclose(risk - risk.mean(), ref - ref.mean(), atol=5e-3)


def test_cox_mlp_ranks_held_out_survival(sim, emb):
    X = emb.to_numpy()
    t, e = sim.obs["survival_time"].to_numpy(), sim.obs["survival_event"].to_numpy()
    g = sim.obs["patient"].to_numpy()
    test = np.isin(g, np.unique(g)[::4])
    cox = CoxMLP(**FAST).fit(X[~test], t[~test], e[~test], groups=g[~test])
    risk = cox.predict_risk(X[test])
    assert risk.shape == (test.sum(),)
    assert cox.score(X[test], t[test], e[test]) == concordance_index(t[test], e[test], risk)
    assert cox.score(X[test], t[test], e[test]) > 0.65


def test_cox_mlp_is_deterministic(sim, emb):
    X = emb.to_numpy()
    t, e = sim.obs["survival_time"].to_numpy(), sim.obs["survival_event"].to_numpy()
    a = CoxMLP(**FAST, seed=1).fit(X, t, e).predict_risk(X)
    b = CoxMLP(**FAST, seed=1).fit(X, t, e).predict_risk(X)
    c = CoxMLP(**FAST, seed=2).fit(X, t, e).predict_risk(X)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_cox_mlp_mini_batches_and_breslow_train(sim, emb):
    X = emb.to_numpy()
    t, e = sim.obs["survival_time"].to_numpy(), sim.obs["survival_event"].to_numpy()
    cox = CoxMLP(**FAST, batch_size=32, ties="breslow").fit(X, t, e)
    assert cox.history_["epochs"] >= 1
    assert cox.score(X, t, e) > 0.6


# --------------------------------------------------------------------------- run_survival
def test_run_survival_with_cohorts_and_exclusions(sim, emb):
    time = sim.obs["survival_time"].copy()
    time.iloc[[0, 1]] = 0.0
    time.iloc[2] = np.nan
    with pytest.warns(
        BulkfmWarning, match=r"left out 3 of 240 .*1 missing/infinite time, 2 time <= 0"
    ):
        res = run_survival(
            emb,
            time,
            sim.obs["survival_event"],
            groups=sim.obs["patient"],
            cohorts=sim.obs["cohort"],
            n_repeats=2,
            model=FAST,
        )
    assert res.excluded == list(sim.obs_names[:3])
    assert not set(res.predictions.sample_id) & set(res.excluded)
    for row in res.per_split:
        preds = res.predictions[res.predictions.split == row["split"]]
        assert row["c_index"] == pytest.approx(
            concordance_index(preds.time, preds.event, preds.risk)
        )
        cohort = sim.obs.loc[preds.sample_id, "cohort"].to_numpy()
        per = {
            c: concordance_index(
                preds.time[cohort == c], preds.event[cohort == c], preds.risk[cohort == c]
            )
            for c in np.unique(cohort)
        }
        assert row["c_index_macro"] == pytest.approx(np.mean(list(per.values())))
        sizes = [np.sum(cohort == c) for c in per]
        assert row["c_index_weighted"] == pytest.approx(
            np.average(list(per.values()), weights=sizes)
        )
    assert set(res.summary) == {"c_index", "c_index_weighted", "c_index_macro"}
    assert res.summary["c_index"]["mean"] > 0.6
    json.dumps(res.to_dict())


def test_valid_survival_mask_reports_and_returns_mask():
    with pytest.warns(BulkfmWarning, match="left out 3 of 5"):
        mask = valid_survival_mask([10.0, -1.0, np.nan, 5.0, 3.0], [1, 0, 1, None, 0])
    np.testing.assert_array_equal(mask, [True, False, False, False, True])


# --------------------------------------------------------------------------- bad input
def test_rejects_event_not_0_1():
    with pytest.raises(ClinicalMatchError, match=r"not 0/1 \(e\.g\. \[2\]\)"):
        valid_survival_mask([1.0, 2.0, 3.0], [1, 2, 0])


def test_fit_rejects_no_events(emb):
    X = emb.to_numpy()
    with pytest.raises(ClinicalMatchError, match="no events in the training data"):
        CoxMLP(**FAST).fit(X, np.arange(1.0, len(X) + 1), np.zeros(len(X)))


def test_fit_rejects_non_positive_time(emb):
    X = emb.to_numpy()[:4]
    with pytest.raises(ClinicalMatchError, match=r"<= 0"):
        CoxMLP(**FAST).fit(X, [1.0, 0.0, 3.0, 4.0], [1, 0, 1, 1])


def test_run_survival_rejects_too_few_events(sim, emb):
    event = np.zeros(sim.n_obs, dtype=int)
    event[:3] = 1
    with pytest.raises(SplitError, match=r"'event=1' \(3 samples"):
        run_survival(emb, sim.obs["survival_time"].to_numpy(), event, model=FAST)


def test_rejects_unknown_ties():
    with pytest.raises(ConfigError, match="ties must be"):
        CoxMLP(ties="exact")


def test_predict_before_fit_is_an_error():
    with pytest.raises(ConfigError, match="not fitted yet"):
        CoxMLP().predict_risk(np.zeros((2, 3)))


# --------------------------------------------------------------------------- Kaplan–Meier
def test_median_split_km_and_logrank_match_references():
    X, time, event = cox_data(seed=2, n=120)
    risk = X @ np.array([0.9, -0.6, 0.3])
    res = risk_groups_km(time, event, risk)
    high = risk > np.median(risk)
    np.testing.assert_array_equal(res.group == "high", high)
    assert res.cutoffs == [pytest.approx(np.median(risk))]
    for name, sel in (("low", ~high), ("high", high)):
        times, surv = naive_km(time[sel], event[sel])
        curve = pd.Series(res.curves[name]["survival"], index=res.curves[name]["time"])
        np.testing.assert_allclose(curve.reindex(times).to_numpy(), surv, atol=1e-12)
        assert res.table.loc[name, "n"] == sel.sum()
        assert res.table.loc[name, "n_events"] == event[sel].sum()
    ref = logrank_test(time[high], time[~high], event[high], event[~high])
    assert res.logrank["p_value"] == pytest.approx(ref.p_value, rel=1e-9)
    assert res.logrank["p_value"] < 0.01  # the risk is informative by construction
    assert res.table.loc["high", "median_survival"] < res.table.loc["low", "median_survival"]


def test_tertiles_figure_and_json(tmp_path):
    X, time, event = cox_data(seed=3, n=90)
    res = risk_groups_km(time, event, X[:, 0], grouping="tertiles", title="test")
    assert list(res.table.index) == ["low", "mid", "high"]
    assert res.table["n"].tolist() == [30, 30, 30]
    assert res.logrank["df"] == 2
    ax = res.figure.axes[0]
    assert len(ax.get_legend().get_texts()) == 3 and "log-rank p" in ax.get_title()
    res.figure.savefig(tmp_path / "km.png")
    assert (tmp_path / "km.png").stat().st_size > 1000
    json.dumps(res.to_dict(), allow_nan=False)
    assert risk_groups_km(time, event, X[:, 0], plot=False).figure is None


def test_km_rejects_constant_risk():
    with pytest.raises(SplitError, match="distinct value"):
        risk_groups_km([1.0, 2.0, 3.0, 4.0], [1, 1, 0, 1], np.zeros(4), grouping="tertiles")


def test_km_rejects_unknown_grouping():
    with pytest.raises(ConfigError, match="grouping must be one of"):
        risk_groups_km([1.0, 2.0], [1, 0], [0.0, 1.0], grouping="quartiles")
