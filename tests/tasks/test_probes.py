from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bulkfm import metrics
from bulkfm.data.splits import inner_folds
from bulkfm.errors import ConfigError, SplitError
from bulkfm.tasks.cox import fit_ridge_cox
from bulkfm.tasks.probes import ProbeConfig, run_probe


def _binary(n: int = 160, p: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    y = (X[:, 0] + 0.8 * rng.normal(size=n) > 0.3).astype(int)
    groups = np.array([f"P{i}" for i in range(n)])
    return X, y, groups


def test_fixed_penalty_equals_sklearn_pipeline() -> None:
    X, y, g = _binary()
    res = run_probe("binary", X[:120], X[120:], y[:120], g[:120], ProbeConfig(c_grid=(0.1,)))
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))
    expected = ref.fit(X[:120], y[:120]).predict_proba(X[120:])[:, 1]
    np.testing.assert_allclose(res.prediction, expected, atol=1e-8)
    assert res.param == 0.1


def test_multiclass_predictions_equal_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 50)
    X = rng.normal(size=(150, 5)) + np.eye(5)[y] * 2.0
    g = np.arange(150).astype(str)
    train, test = np.arange(150) % 4 != 0, np.arange(150) % 4 == 0
    res = run_probe("multiclass", X[train], X[test], y[train], g[train], ProbeConfig(c_grid=(1.0,)))
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500))
    np.testing.assert_array_equal(res.prediction, ref.fit(X[train], y[train]).predict(X[test]))


def test_row_space_rotation_is_exact_when_features_outnumber_samples() -> None:
    X, y, g = _binary(n=60, p=200, seed=2)
    res = run_probe("binary", X[:40], X[40:], y[:40], g[:40], ProbeConfig(c_grid=(0.05,)))
    assert res.n_features <= 40  # rotated into the span of the training rows
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, tol=1e-10, max_iter=5000))
    expected = ref.fit(X[:40], y[:40]).predict_proba(X[40:])[:, 1]
    np.testing.assert_allclose(res.prediction, expected, atol=1e-4)


def test_cox_probe_equals_ridge_cox_on_standardised_features() -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(80, 120))  # p > n: the rotation path
    time = rng.exponential(np.exp(-X[:, 0]))
    event = (rng.random(80) < 0.7).astype(float)
    y = np.column_stack([time, event])
    g = np.arange(80).astype(str)
    res = run_probe("survival", X[:60], X[60:], y[:60], g[:60], ProbeConfig(cox_alpha_grid=(0.3,)))
    scaler = StandardScaler().fit(X[:60])
    fit = fit_ridge_cox(scaler.transform(X[:60]), time[:60], event[:60], 0.3)
    np.testing.assert_allclose(res.prediction, fit.risk(scaler.transform(X[60:])), atol=1e-6)


def test_tuning_picks_best_penalty_of_a_manual_inner_cv() -> None:
    X, y, g = _binary(n=150, seed=4)
    config = ProbeConfig(c_grid=(1e-4, 1e-2, 1.0), inner_folds=3, seed=5)
    res = run_probe("binary", X[:120], X[120:], y[:120], g[:120], config)
    folds = inner_folds(y[:120], g[:120], k=3, seed=5)
    manual = {}
    for c in config.c_grid:
        scores = []
        for fold in folds:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500))
            model.fit(X[:120][fold.train], y[:120][fold.train])
            proba = model.predict_proba(X[:120][fold.test])[:, 1]
            scores.append(metrics.auroc(y[:120][fold.test], proba))
        manual[c] = float(np.mean(scores))
    for c, score in manual.items():
        assert res.inner_scores[c] == pytest.approx(score, abs=1e-6)
    assert res.param == max(manual, key=lambda c: (manual[c], -c))


def test_informative_features_beat_noise() -> None:
    X, y, g = _binary(n=300, seed=6)
    noise = np.random.default_rng(7).normal(size=X.shape)
    good = run_probe("binary", X[:200], X[200:], y[:200], g[:200])
    bad = run_probe("binary", noise[:200], noise[200:], y[:200], g[:200])
    assert metrics.auroc(y[200:], good.prediction) > 0.75
    assert abs(metrics.auroc(y[200:], bad.prediction) - 0.5) < 0.15


def test_one_class_is_an_error() -> None:
    X, _, g = _binary()
    with pytest.raises(SplitError, match="one class"):
        run_probe("binary", X[:100], X[100:], np.zeros(100, int), g[:100])


def test_unknown_kind_is_an_error() -> None:
    X, y, g = _binary()
    with pytest.raises(ConfigError, match="unknown probe kind"):
        run_probe("regression", X[:100], X[100:], y[:100], g[:100])


def test_width_mismatch_is_an_error() -> None:
    X, y, g = _binary()
    with pytest.raises(SplitError, match="same width"):
        run_probe("binary", X[:100], X[100:, :3], y[:100], g[:100])


def test_bad_grid_is_an_error() -> None:
    with pytest.raises(ConfigError, match="positive numbers"):
        ProbeConfig(c_grid=(0.1, -1.0))


def test_binary_targets_must_be_0_1() -> None:
    X, y, g = _binary()
    with pytest.raises(SplitError, match="must be 0/1"):
        run_probe("binary", X[:100], X[100:], y[:100] + 1, g[:100])
