from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone

from bulkfm.data.simulate import simulate_bulk
from bulkfm.errors import (
    BulkfmWarning,
    ClinicalMatchError,
    ConfigError,
    ExpressionValueError,
    SplitError,
)
from bulkfm.tasks import inner_split
from bulkfm.tasks.classification import MLPClassifier, make_svm, run_classification, tune_svm

FAST = dict(hidden=(32, 16), max_epochs=60, patience=10, batch_size=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sim() -> ad.AnnData:
    return simulate_bulk(n_samples=150, n_genes=30, n_cohorts=3, paired_fraction=0.3, seed=0)


@pytest.fixture(scope="module")
def emb(sim) -> pd.DataFrame:
    """Noisy programme activities stand in for embeddings: cohorts are learnable, not trivial."""
    rng = np.random.default_rng(0)
    values = sim.obsm["programmes"] + rng.normal(0, 0.8, size=sim.obsm["programmes"].shape)
    return pd.DataFrame(values, index=sim.obs_names)


def test_mlp_learns_cohorts_beyond_majority_class(sim, emb):
    train = np.arange(sim.n_obs) % 4 != 0
    y = sim.obs["cohort"].astype(str).to_numpy()
    clf = MLPClassifier(**FAST).fit(
        emb.to_numpy()[train], y[train], groups=sim.obs["patient"][train]
    )
    pred = clf.predict(emb.to_numpy()[~train])
    majority = pd.Series(y[~train]).value_counts(normalize=True).iloc[0]
    assert np.mean(pred == y[~train]) > majority + 0.2
    proba = clf.predict_proba(emb.to_numpy()[~train])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert list(clf.classes_) == sorted(set(y))
    np.testing.assert_array_equal(clf.classes_[proba.argmax(axis=1)], pred)


def test_mlp_is_deterministic_and_leaves_global_rng_alone(sim, emb):
    X, y = emb.to_numpy(), sim.obs["cohort"].astype(str).to_numpy()
    state = torch.get_rng_state()
    a = MLPClassifier(**FAST, seed=3).fit(X, y).predict_proba(X)
    assert torch.equal(torch.get_rng_state(), state)
    b = MLPClassifier(**FAST, seed=3).fit(X, y).predict_proba(X)
    c = MLPClassifier(**FAST, seed=4).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_mlp_standardises_inputs(sim, emb):
    X, y = emb.to_numpy(), sim.obs["cohort"].astype(str).to_numpy()
    base = MLPClassifier(**FAST).fit(X, y).predict_proba(X)
    scaled = MLPClassifier(**FAST).fit(X * 1000 + 50, y).predict_proba(X * 1000 + 50)
    np.testing.assert_allclose(scaled, base, atol=1e-4)


def test_mlp_early_stopping_restores_best_epoch(sim, emb):
    X, y = emb.to_numpy(), sim.obs["cohort"].astype(str).to_numpy()
    clf = MLPClassifier(hidden=(32,), lr=0.05, max_epochs=300, patience=3, batch_size=16).fit(X, y)
    hist = clf.history_
    assert hist["epochs"] < 300  # overfits fast at this learning rate, so it stops
    assert hist["epochs"] == hist["best_epoch"] + 3
    assert min(hist["val_loss"]) == hist["val_loss"][hist["best_epoch"] - 1]
    # the weights kept are the best epoch's: recompute its validation loss from outside
    _, val = inner_split(y, None, 0.2, seed=0)
    proba = clf.predict_proba(X[val])
    codes = np.searchsorted(clf.classes_, y[val])
    val_loss = -np.mean(np.log(proba[np.arange(len(val)), codes]))
    assert val_loss == pytest.approx(min(hist["val_loss"]), rel=1e-4)


def test_mlp_without_validation_trains_all_epochs(sim, emb):
    X, y = emb.to_numpy(), sim.obs["cohort"].astype(str).to_numpy()
    clf = MLPClassifier(**{**FAST, "max_epochs": 7}, val_fraction=0.0).fit(X, y)
    assert clf.history_["epochs"] == 7 and clf.history_["val_loss"] == []


def test_mlp_balanced_class_weight_helps_rare_class():
    rng = np.random.default_rng(1)
    X = np.vstack([rng.normal(0, 1, (150, 4)), rng.normal(1.2, 1, (12, 4))])
    y = np.array(["common"] * 150 + ["rare"] * 12)
    params = dict(hidden=(16,), max_epochs=80, val_fraction=0.0, batch_size=32)
    plain = MLPClassifier(**params).fit(X, y).predict(X)
    balanced = MLPClassifier(**params, class_weight="balanced").fit(X, y).predict(X)
    assert (balanced == "rare").sum() > (plain == "rare").sum()


def test_mlp_is_a_sklearn_estimator():
    clf = MLPClassifier(hidden=(8,), seed=5)
    copy = clone(clf)
    assert copy.get_params()["seed"] == 5 and copy.get_params()["hidden"] == (8,)


def test_inner_split_groups_patients_and_stratifies(sim):
    y = sim.obs["cohort"].astype(str).to_numpy()
    g = sim.obs["patient"].to_numpy()
    train, val = inner_split(y, g, 0.2, seed=0)
    assert not set(g[train]) & set(g[val])
    assert set(y[val]) == set(y)
    assert 0.1 < len(val) / len(y) < 0.3


def test_svm_pipeline_and_tuning(sim, emb):
    X, y = emb.to_numpy(), sim.obs["cohort"].astype(str).to_numpy()
    g = sim.obs["patient"].to_numpy()
    svm = make_svm(2.0)
    assert [name for name, _ in svm.steps] == ["standardscaler", "svc"]
    assert svm.named_steps["svc"].C == 2.0
    fitted, best = tune_svm(X, y, g, Cs=(0.01, 1.0, 10.0))
    assert best in (1.0, 10.0)  # C=0.01 underfits to the majority class
    np.testing.assert_array_equal(fitted.predict(X), make_svm(best).fit(X, y).predict(X))


@pytest.mark.parametrize("method", ["mlp", "svm"])
def test_run_classification_protocol(sim, emb, method):
    res = run_classification(
        emb,
        sim.obs["cohort"],
        groups=sim.obs["patient"],
        method=method,
        n_repeats=2,
        mlp=FAST,
        svm_C=[0.1, 1.0],
    )
    assert len(res.per_split) == 2 and res.labels == ["COHA", "COHB", "COHC"]
    for row in res.per_split:
        preds = res.predictions[res.predictions["split"] == row["split"]]
        assert len(preds) == row["n_test"] and row["n_train"] + row["n_test"] == sim.n_obs
        # the reported macro F1 is recomputed from the stored predictions by hand
        f1 = []
        for c in res.labels:
            tp = np.sum((preds.y_true == c) & (preds.y_pred == c))
            f1.append(2 * tp / ((preds.y_true == c).sum() + (preds.y_pred == c).sum()))
        assert row["macro_f1"] == pytest.approx(np.mean(f1))
        test_patients = set(sim.obs.loc[preds.sample_id, "patient"])
        train_ids = sim.obs_names.difference(preds.sample_id)
        assert not test_patients & set(sim.obs.loc[train_ids, "patient"])
    values = [r["macro_f1"] for r in res.per_split]
    assert res.summary["macro_f1"]["mean"] == pytest.approx(np.mean(values))
    assert res.summary["macro_f1"]["std"] == pytest.approx(np.std(values, ddof=1))
    assert res.summary["accuracy"]["mean"] > 0.6


def test_run_classification_drops_unlabelled_with_warning(sim, emb):
    labels = sim.obs["cohort"].astype(object).copy()
    labels.iloc[:5] = None
    with pytest.warns(BulkfmWarning, match="5 of 150 samples have a missing label"):
        res = run_classification(emb, labels, method="svm", n_repeats=1)
    assert not set(res.predictions.sample_id) & set(sim.obs_names[:5])


def test_run_classification_matches_ids_not_positions(sim, emb):
    shuffled = sim.obs["cohort"].sample(frac=1.0, random_state=0)
    a = run_classification(emb, sim.obs["cohort"], method="svm", n_repeats=1)
    b = run_classification(emb, shuffled, method="svm", n_repeats=1)
    assert a.per_split[0]["macro_f1"] == b.per_split[0]["macro_f1"]


# --------------------------------------------------------------------------- bad input
def test_rejects_class_with_too_few_patients(sim, emb):
    labels = sim.obs["cohort"].astype(str).copy()
    labels.iloc[:3] = "TINY"
    with pytest.raises(
        SplitError,
        match=r"at least 5 patients per class; too few in 'TINY' \(3 samples, 2 patients\)",
    ):
        run_classification(emb, labels, groups=sim.obs["patient"], method="svm")


def test_rejects_class_too_small_for_inner_validation(sim, emb):
    y = sim.obs["cohort"].astype(str).to_numpy().copy()
    y[:3] = "TINY"
    with pytest.raises(SplitError, match=r"inner validation split.*'TINY'.*val_fraction"):
        MLPClassifier(**FAST).fit(emb.to_numpy(), y)


def test_rejects_no_shared_ids(sim, emb):
    labels = pd.Series(sim.obs["cohort"].to_numpy(), index=[f"other{i}" for i in range(sim.n_obs)])
    with pytest.raises(ClinicalMatchError, match="no sample id is shared"):
        run_classification(emb, labels)


def test_rejects_nan_embeddings(sim, emb):
    bad = emb.copy()
    bad.iloc[4, 2] = np.nan
    with pytest.raises(ExpressionValueError, match=r"NaN/inf values in 1 sample\(s\)"):
        run_classification(bad, sim.obs["cohort"])


def test_rejects_single_class(sim, emb):
    with pytest.raises(SplitError, match="only one class"):
        run_classification(emb, pd.Series("x", index=sim.obs_names))


def test_rejects_unknown_method(sim, emb):
    with pytest.raises(ConfigError, match=r"method must be one of \['mlp', 'svm'\]"):
        run_classification(emb, sim.obs["cohort"], method="xgboost")


def test_rejects_bad_hyper_parameters():
    with pytest.raises(ConfigError, match="val_fraction must lie in"):
        MLPClassifier(val_fraction=1.0)
    with pytest.raises(ConfigError, match="class_weight must be"):
        MLPClassifier(class_weight="auto")


def test_predict_before_fit_is_an_error():
    with pytest.raises(ConfigError, match="not fitted yet"):
        MLPClassifier().predict(np.zeros((2, 3)))


def test_end_to_end_from_bulkrnabert_embeddings(sim, tmp_path, tiny_model):
    """simulate -> tiny BulkRNABert -> parquet -> read -> SVM: the pieces fit together."""
    from bulkfm.embed import embed_adata, read_embeddings, write_embeddings
    from bulkfm.tokenize import BinTokenizer

    tokenizer = BinTokenizer.fit_adata(sim, n_bins=16)
    torch.manual_seed(0)
    model = tiny_model(n_genes=sim.n_vars, n_expressions_bins=16).eval()
    emb = embed_adata(model, tokenizer, sim, batch_size=64, progress=False)
    write_embeddings(emb, sim, tmp_path / "emb.parquet")
    res = run_classification(
        read_embeddings(tmp_path / "emb.parquet"),
        sim.obs["cohort"],
        groups=sim.obs["patient"],
        method="svm",
        n_repeats=1,
    )
    assert res.per_split[0]["n_test"] > 0 and 0.0 <= res.summary["macro_f1"]["mean"] <= 1.0
