from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score
from sklearn.svm import SVC

from bulkfm.data.simulate import simulate_bulk
from bulkfm.data.splits import repeated_holdout, survival_strata
from bulkfm.embedders.classical import TopVariableGenes
from bulkfm.errors import (
    BulkfmWarning,
    ClinicalMatchError,
    ConfigError,
    SplitError,
)
from bulkfm.metrics import concordance_index
from bulkfm.tasks.baselines import (
    BaselineConfig,
    PenalizedCox,
    baseline_label,
    run_classification_baseline,
    run_survival_baseline,
)
from bulkfm.train.losses import cox_ph_loss

SMALL = BaselineConfig(
    pca_components=12,
    nmf_components=6,
    nmf_max_iter=60,
    cox_components=6,
    mlp={"hidden": (16,), "max_epochs": 30, "patience": 5},
    cox_mlp={"hidden": (16,), "max_epochs": 30, "patience": 5},
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tumours() -> ad.AnnData:
    sim = simulate_bulk(n_samples=150, n_genes=120, n_cohorts=3, censoring_rate=0.4, seed=2)
    return sim[sim.obs["sample_type"] == "tumor"].copy()


@pytest.fixture(scope="module")
def splits(tumours):
    y = tumours.obs["cohort"].astype(str).to_numpy()
    return repeated_holdout(y, tumours.obs["patient"].to_numpy(), seeds=[0, 1])


def _labels(adata: ad.AnnData) -> np.ndarray:
    return adata.obs["cohort"].astype(str).to_numpy()


# --------------------------------------------------------------------------- classification
def test_pca_svm_equals_an_sklearn_reference_fitted_on_training_rows(tumours, splits):
    X, y = tumours.X, _labels(tumours)
    res = run_classification_baseline(
        "pca_svm", X, y, groups=tumours.obs["patient"], splits=splits, config=SMALL
    )
    logx = np.log10(1.0 + np.asarray(X, dtype=np.float64))
    for split, row in zip(splits, res.per_split, strict=True):
        pca = PCA(12, random_state=split.seed).fit(logx[split.train])
        svm = SVC(C=1.0, gamma="scale").fit(pca.transform(logx[split.train]), y[split.train])
        pred = svm.predict(pca.transform(logx[split.test]))
        assert row["macro_f1"] == pytest.approx(f1_score(y[split.test], pred, average="macro"))
        assert row["n_train"] == len(split.train) and row["n_test"] == len(split.test)
    assert res.summary["macro_f1"]["mean"] == pytest.approx(
        np.mean([r["macro_f1"] for r in res.per_split])
    )
    assert res.summary["macro_f1"]["std"] == pytest.approx(
        np.std([r["macro_f1"] for r in res.per_split], ddof=1)
    )
    assert res.summary["macro_f1"]["mean"] > 0.6  # cohorts are separable in the simulation


@pytest.mark.parametrize("name", ["pca_svm", "nmf_svm", "mlp"])
def test_feature_maps_are_fitted_on_the_training_side_only(tumours, splits, name, monkeypatch):
    seen: list[int] = []
    original = TopVariableGenes.fit

    def spy(self, X, y=None):
        seen.append(np.asarray(X).shape[0])
        return original(self, X, y)

    monkeypatch.setattr(TopVariableGenes, "fit", spy)
    res = run_classification_baseline(
        name, tumours.X, _labels(tumours), splits=splits, config=SMALL
    )
    assert seen == [len(s.train) for s in splits]
    test_ids = res.predictions.groupby("split")["sample_id"].apply(set)
    for split in splits:
        assert test_ids[split.name] == {str(i) for i in split.test}


def test_top_genes_option_limits_the_inputs(tumours, splits):
    X, y = np.asarray(tumours.X, dtype=np.float64), _labels(tumours)
    cfg = BaselineConfig(top_genes=5, pca_components=256)
    res = run_classification_baseline("pca_svm", X, y, splits=splits, config=cfg)
    assert len(res.per_split) == 2  # 5 genes -> 5 components (capped), still runs
    for split, row in zip(splits, res.per_split, strict=True):
        # the 5 most variable log-TPM genes of this split's training rows, and nothing else
        variance = np.log10(1.0 + X[split.train]).var(axis=0)
        top = np.sort(np.argsort(-variance, kind="stable")[:5])
        alone = run_classification_baseline(
            "pca_svm", X[:, top], y, splits=[split], config=BaselineConfig(pca_components=256)
        )
        assert row["macro_f1"] == alone.per_split[0]["macro_f1"]
        got = res.predictions[res.predictions["split"] == split.name].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, alone.predictions.reset_index(drop=True))


def test_unknown_baseline_and_bad_config_are_errors(tumours):
    with pytest.raises(ConfigError, match="unknown classification baseline 'lda'"):
        run_classification_baseline("lda", tumours.X, _labels(tumours))
    with pytest.raises(ConfigError, match="pca_components must be a positive integer"):
        BaselineConfig(pca_components=0)
    with pytest.raises(ConfigError, match="svm_C must be a positive number"):
        BaselineConfig(svm_C=-1.0)
    with pytest.raises(ConfigError, match="unknown baseline"):
        baseline_label("tsne")


def test_class_with_too_few_patients_is_named(tumours):
    y = _labels(tumours).copy()
    y[:3] = "RARE"
    with pytest.raises(SplitError, match="'RARE'"):
        run_classification_baseline("pca_svm", tumours.X, y, config=SMALL)


def test_labels_display_the_component_counts():
    assert baseline_label("pca_svm") == "PCA(256) + SVM"
    assert baseline_label("nmf_svm") == "NMF(128) + SVM"
    assert baseline_label("pca_cox", BaselineConfig(cox_components=32), "survival") == (
        "PCA(32) + penalised Cox"
    )


# --------------------------------------------------------------------------- Cox
def _cox_data(seed: int = 0, n: int = 160):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)) * np.array([1.0, 3.0, 0.5, 2.0])
    eta = X @ np.array([0.8, -0.3, 0.0, 0.4])
    t = np.ceil(rng.exponential(np.exp(-eta)) * 10)  # integer days: many tied times
    c = np.ceil(rng.exponential(2.0, size=n) * 10)
    return X, np.maximum(np.minimum(t, c), 1.0), (t <= c).astype(int)


@pytest.mark.parametrize("penalizer", [0.05, 0.5])
def test_penalized_cox_solves_the_ridge_partial_likelihood(penalizer):
    """Independent check with the project's own (Breslow) loss: at the returned coefficients
    the gradient of -loglik/n + penalizer/2 |b * s|^2 vanishes, ``s`` being the ddof=1 std
    lifelines rescales inputs by (so the penalty means what lifelines' ``penalizer`` does)."""
    X, t, e = _cox_data()
    cox = PenalizedCox(penalizer=penalizer).fit(X, t, e)
    Xs = cox.scaler_.transform(X).astype(np.float64)
    s = Xs.std(axis=0, ddof=1)
    b = torch.tensor(cox.coef_, requires_grad=True)
    risk = torch.from_numpy(Xs) @ b
    loss = cox_ph_loss(risk, torch.from_numpy(t), torch.from_numpy(e.astype(bool)), ties="breslow")
    objective = loss * e.sum() / len(t) + 0.5 * penalizer * torch.sum(
        (b * torch.from_numpy(s)) ** 2
    )
    objective.backward()
    np.testing.assert_allclose(b.grad.numpy(), 0.0, atol=1e-5)
    assert np.linalg.norm(cox.coef_) > 0.1  # not the trivial solution


@pytest.mark.parametrize("penalizer", [0.01, 0.1, 1.0])
def test_penalized_cox_equals_lifelines_with_the_same_penalizer(penalizer):
    """Without tied times Breslow and Efron agree, so the fit is lifelines' own."""
    X, t, e = _cox_data(seed=5)
    t = t + np.random.default_rng(5).uniform(0, 0.5, size=t.size)  # break the ties
    cox = PenalizedCox(penalizer=penalizer).fit(X, t, e)
    Xs = cox.scaler_.transform(X).astype(np.float64)
    frame = pd.DataFrame(Xs).add_prefix("x").assign(T=t, E=e)
    ref = CoxPHFitter(penalizer=penalizer).fit(frame, "T", "E")
    np.testing.assert_allclose(cox.coef_, ref.params_.to_numpy(), rtol=1e-4, atol=1e-6)


def test_penalized_cox_ranks_held_out_survival_higher_risk_shorter():
    X, t, e = _cox_data(seed=3, n=300)
    cox = PenalizedCox(penalizer=0.01).fit(X[:200], t[:200], e[:200])
    risk = cox.predict_risk(X[200:])
    assert concordance_index(t[200:], e[200:], risk) > 0.7
    assert cox.coef_[0] > 0  # positive true coefficient, positive fitted one


def test_penalized_cox_rejects_no_events_and_unfitted_use():
    X, t, _ = _cox_data(n=30)
    with pytest.raises(ClinicalMatchError, match="no events among the 30 training samples"):
        PenalizedCox().fit(X, t, np.zeros(30, dtype=int))
    with pytest.raises(ConfigError, match="not fitted yet"):
        PenalizedCox().predict_risk(X)
    with pytest.raises(ConfigError, match="penalizer must be a positive number"):
        PenalizedCox(penalizer=-1.0)
    with pytest.raises(ConfigError, match="penalizer must be a positive number"):
        PenalizedCox(penalizer=0.0)


def test_pca_cox_matches_a_reference_on_training_side_components(tumours):
    """Reference: PCA, z-scores and scikit-survival's Breslow ridge Cox with lifelines'
    penalty meaning (see PenalizedCox): alpha = penalizer * n / (n - 1) per sample."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    obs = tumours.obs
    t, e = obs["survival_time"].to_numpy(), obs["survival_event"].to_numpy()
    g = obs["patient"].to_numpy()
    cohorts = obs["cohort"].astype(str).to_numpy()
    splits = repeated_holdout(survival_strata(e), g, seeds=[4])
    res = run_survival_baseline(
        "pca_cox", tumours.X, t, e, groups=g, cohorts=cohorts, splits=splits, config=SMALL
    )
    split, row = splits[0], res.per_split[0]
    logx = np.log10(1.0 + np.asarray(tumours.X, dtype=np.float64))
    pca = PCA(6, random_state=split.seed).fit(logx[split.train])
    comp = pca.transform(logx)
    z = (comp - comp[split.train].mean(0)) / comp[split.train].std(0)
    n = split.train.size
    ref = CoxPHSurvivalAnalysis(alpha=0.1 * n / (n - 1) * n, ties="breslow", tol=1e-12).fit(
        z[split.train], Surv.from_arrays(e[split.train].astype(bool), t[split.train])
    )
    ref_risk = z[split.test] @ ref.coef_
    assert row["c_index"] == pytest.approx(
        concordance_index(t[split.test], e[split.test], ref_risk)
    )
    assert {"c_index_weighted", "c_index_macro", "per_cohort"} <= set(row)
    assert set(res.summary) == {"c_index", "c_index_weighted", "c_index_macro"}


def test_survival_baseline_reports_excluded_samples(tumours):
    obs = tumours.obs
    t = obs["survival_time"].to_numpy().astype(float).copy()
    e = obs["survival_event"].to_numpy()
    t[0], t[1] = 0.0, np.nan
    with pytest.warns(BulkfmWarning, match="1 missing/infinite time, 1 time <= 0"):
        res = run_survival_baseline(
            "mlp", tumours.X, t, e, ids=tumours.obs_names, n_repeats=1, config=SMALL
        )
    assert res.excluded == list(tumours.obs_names[:2])
    assert not set(res.excluded) & set(res.predictions["sample_id"])
    assert 0.0 <= res.summary["c_index"]["mean"] <= 1.0


def test_survival_event_codes_other_than_0_1_are_errors(tumours):
    e = tumours.obs["survival_event"].to_numpy().astype(int).copy()
    e[0] = 2
    with pytest.raises(ClinicalMatchError, match="not 0/1"):
        run_survival_baseline("pca_cox", tumours.X, tumours.obs["survival_time"], e)
