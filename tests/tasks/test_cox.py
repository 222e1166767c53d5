from __future__ import annotations

import numpy as np
import pytest

from bulkfm.errors import ConfigError, SplitError
from bulkfm.tasks.cox import breslow_loglik, fit_ridge_cox


def _data(n: int = 150, p: int = 6, ties: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    eta = X[:, 0] - 0.5 * X[:, 1]
    t = rng.exponential(np.exp(-eta))
    c = rng.exponential(1.5, size=n)
    time = np.minimum(t, c)
    if ties:
        time = np.ceil(time * 4) / 4  # heavy ties
    return X, time, (t <= c).astype(float)


def naive_breslow(X, time, event, beta) -> float:
    """Partial log-likelihood straight from the definition (O(n^2))."""
    eta = X @ beta
    total = 0.0
    for i in np.flatnonzero(event):
        risk = time >= time[i]
        total += eta[i] - np.log(np.exp(eta[risk]).sum())
    return total


@pytest.mark.parametrize("ties", [False, True])
def test_loglik_matches_definition(ties: bool) -> None:
    X, time, event = _data(ties=ties)
    beta = np.random.default_rng(1).normal(size=X.shape[1]) * 0.3
    assert breslow_loglik(X, time, event, beta) == pytest.approx(
        naive_breslow(X, time, event, beta), rel=1e-10
    )


@pytest.mark.parametrize("ties", [False, True])
def test_solution_is_stationary_point_of_naive_objective(ties: bool) -> None:
    X, time, event = _data(ties=ties)
    n, alpha = X.shape[0], 0.05
    fit = fit_ridge_cox(X, time, event, alpha)
    assert fit.converged

    def objective(b: np.ndarray) -> float:
        return -naive_breslow(X, time, event, b) / n + 0.5 * alpha * b @ b

    eps = 1e-6
    grad = [
        (objective(fit.coef + eps * e) - objective(fit.coef - eps * e)) / (2 * eps)
        for e in np.eye(X.shape[1])
    ]
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)
    assert fit.objective == pytest.approx(objective(fit.coef), rel=1e-10)


@pytest.mark.parametrize("ties", [False, True])
def test_matches_scikit_survival(ties: bool) -> None:
    sksurv_lm = pytest.importorskip("sksurv.linear_model")
    from sksurv.util import Surv

    X, time, event = _data(ties=ties, seed=2)
    alpha = 0.02
    ref = sksurv_lm.CoxPHSurvivalAnalysis(
        alpha=alpha * X.shape[0], ties="breslow", tol=1e-12, n_iter=500
    ).fit(X, Surv.from_arrays(event.astype(bool), time))
    ours = fit_ridge_cox(X, time, event, alpha)
    np.testing.assert_allclose(ours.coef, ref.coef_, atol=1e-6)


def test_unpenalised_limit_matches_lifelines() -> None:
    import pandas as pd
    from lifelines import CoxPHFitter

    X, time, event = _data(n=300, p=4, seed=4)  # continuous times: Efron == Breslow
    df = pd.DataFrame(X, columns=[f"x{i}" for i in range(4)]).assign(T=time, E=event)
    ref = CoxPHFitter(penalizer=0.0).fit(df, "T", "E").params_.to_numpy()
    ours = fit_ridge_cox(X, time, event, 1e-10).coef
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("penalizer", [0.01, 0.3])
def test_penalised_matches_lifelines_with_the_same_penalty(penalizer: float) -> None:
    """lifelines maximises loglik - n * penalizer / 2 * |b * s|^2 on inputs it rescales by
    their ddof=1 std ``s``; on z-scored (ddof=0) inputs s^2 = n / (n - 1), so its
    ``penalizer`` is ``alpha = penalizer * n / (n - 1)`` here (Efron == Breslow without
    tied times)."""
    import pandas as pd
    from lifelines import CoxPHFitter

    X, time, event = _data(n=300, p=4, seed=8)
    Z = (X - X.mean(0)) / X.std(0)
    n = Z.shape[0]
    df = pd.DataFrame(Z, columns=[f"x{i}" for i in range(4)]).assign(T=time, E=event)
    ref = CoxPHFitter(penalizer=penalizer).fit(df, "T", "E").params_.to_numpy()
    ours = fit_ridge_cox(Z, time, event, penalizer * n / (n - 1), tol=1e-12).coef
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)


def test_huge_scores_do_not_overflow() -> None:
    X, time, event = _data(seed=5)
    with np.errstate(over="raise", invalid="raise"):
        fit = fit_ridge_cox(X * 1e3, time, event, 1e-3)
    assert np.isfinite(fit.coef).all() and fit.converged


def test_warm_start_reaches_same_solution() -> None:
    X, time, event = _data(seed=6)
    cold = fit_ridge_cox(X, time, event, 0.1)
    warm = fit_ridge_cox(X, time, event, 0.1, init=fit_ridge_cox(X, time, event, 1.0).coef)
    np.testing.assert_allclose(warm.coef, cold.coef, atol=1e-7)


def test_stronger_penalty_shrinks() -> None:
    X, time, event = _data(seed=7)
    norms = [np.linalg.norm(fit_ridge_cox(X, time, event, a).coef) for a in (0.01, 0.1, 1.0)]
    assert norms[0] > norms[1] > norms[2] > 0


def test_no_events_is_an_error() -> None:
    X, time, _ = _data()
    with pytest.raises(SplitError, match="no events"):
        fit_ridge_cox(X, time, np.zeros_like(time), 0.1)


def test_non_positive_penalty_is_an_error() -> None:
    X, time, event = _data()
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        fit_ridge_cox(X, time, event, 0.0)
