from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import PCA

from bulkfm import schema as keys
from bulkfm.embedders.classical import (
    CappedNMF,
    CappedPCA,
    LogTPM,
    NMFEmbedder,
    PCAEmbedder,
    RawEmbedder,
    TopVariableGenes,
)
from bulkfm.errors import ConfigError, ExpressionValueError


# --------------------------------------------------------------------------- feature maps
def test_log_tpm_is_log10_one_plus_and_rejects_bad_values():
    X = np.array([[0.0, 9.0], [99.0, 0.5]])
    np.testing.assert_allclose(LogTPM().fit_transform(X), np.log10(1 + X))
    with pytest.raises(ExpressionValueError, match="non-negative TPM"):
        LogTPM().fit_transform(np.array([[1.0, -0.5]]))


def test_top_variable_genes_keeps_the_highest_variance_columns():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 8)) * np.array([1, 5, 2, 9, 0.1, 3, 7, 0.5])
    selected = TopVariableGenes(3).fit(X)
    assert selected.columns_.tolist() == [1, 3, 6]  # scales 5, 9, 7
    np.testing.assert_array_equal(selected.transform(X), X[:, [1, 3, 6]])


def test_pca_components_are_capped_with_a_logged_note(caplog):
    X = np.random.default_rng(0).normal(size=(20, 9))
    with caplog.at_level(logging.INFO, logger="bulkfm.embedders.classical"):
        pca = CappedPCA(256).fit(X)
    assert pca.n_components_ == 9 and pca.transform(X).shape == (20, 9)
    assert "n_components=256 capped at 9 = min(20 training samples - 1, 9 genes)" in caplog.text


def test_nmf_is_capped_non_negative_and_rejects_negative_input(caplog):
    X = np.abs(np.random.default_rng(1).normal(size=(7, 30)))
    with caplog.at_level(logging.INFO, logger="bulkfm.embedders.classical"):
        nmf = CappedNMF(128, max_iter=50).fit(X)
    assert nmf.n_components_ == 7 and "capped at 7" in caplog.text
    assert (nmf.transform(X) >= 0).all()
    with pytest.raises(ExpressionValueError, match="non-negative"):
        CappedNMF(3).fit(-X)


# --------------------------------------------------------------------------- embedders
def _log_tpm(x: np.ndarray) -> np.ndarray:
    return np.log10(1.0 + x)


def _log_var_top(adata: ad.AnnData, n: int, genes_ok: np.ndarray) -> set[str]:
    logx = _log_tpm(np.asarray(adata.X, dtype=np.float64))[:, genes_ok]
    order = np.argsort(-logx.var(axis=0), kind="stable")[:n]
    return set(adata.var_names[genes_ok][order])


def test_raw_selects_top_variable_genes_of_training_rows(sim) -> None:
    train, test = sim[:150], sim[150:]
    model = RawEmbedder(n_top_genes=20).fit(train)
    assert set(model.genes_) == _log_var_top(train, 20, np.ones(sim.n_vars, bool))
    emb = model.transform(test)
    expected = _log_tpm(np.asarray(test[:, model.genes_].X, dtype=np.float64))
    np.testing.assert_allclose(emb, expected, rtol=1e-6)


def test_raw_ignores_test_rows_when_fitting(sim) -> None:
    a = RawEmbedder(n_top_genes=15).fit(sim[:150])
    changed = sim.copy()
    changed.X[150:] = changed.X[150:] * 50.0  # test rows only
    b = RawEmbedder(n_top_genes=15).fit(changed[:150])
    np.testing.assert_array_equal(a.genes_, b.genes_)


def test_genes_missing_in_training_are_left_out_and_test_gaps_filled(sim) -> None:
    missing = np.zeros(sim.shape, dtype=bool)
    missing[:10, :40] = True  # 40 genes unmeasured in 10 training samples
    missing[160:, 50:] = True  # a test sample source lacking other genes
    sim.layers[keys.MISSING] = sp.csr_matrix(missing)
    model = RawEmbedder(n_top_genes=30).fit(sim[:150])
    measured = ~missing[:150].any(axis=0)
    assert set(model.genes_) == _log_var_top(sim[:150], 30, measured)
    emb = model.transform(sim[150:])
    cols = sim.var_names.get_indexer(model.genes_)
    train_mean = _log_tpm(np.asarray(sim.X[:150], dtype=np.float64))[:, cols].mean(axis=0)
    gap = missing[150:][:, cols]
    np.testing.assert_allclose(emb[gap], np.broadcast_to(train_mean, gap.shape)[gap], rtol=1e-5)


def test_pca_equals_manual_pipeline(sim) -> None:
    train, test = sim[:150], sim[150:]
    model = PCAEmbedder(n_components=10, n_top_genes=60, seed=2).fit(train)
    logx = _log_tpm(np.asarray(train[:, model.genes_].X, dtype=np.float64))
    mean, std = logx.mean(axis=0), logx.std(axis=0)
    ref = PCA(n_components=10, random_state=2).fit((logx - mean) / std)
    logt = _log_tpm(np.asarray(test[:, model.genes_].X, dtype=np.float64))
    np.testing.assert_allclose(
        model.transform(test), ref.transform((logt - mean) / std), rtol=1e-4, atol=1e-4
    )


def test_pca_components_capped_by_training_size(sim) -> None:
    emb = PCAEmbedder(n_components=256).fit(sim[:30]).transform(sim)
    assert emb.shape == (sim.n_obs, 29)


def test_nmf_is_non_negative_and_learned_on_training_rows(sim) -> None:
    model = NMFEmbedder(n_components=5, n_top_genes=50, max_iter=50).fit(sim[:150])
    emb = model.transform(sim[150:])
    assert emb.shape == (sim.n_obs - 150, 5) and (emb >= 0).all() and emb.any()


def test_transform_before_fit_is_an_error(sim) -> None:
    with pytest.raises(ConfigError, match="call fit"):
        PCAEmbedder().transform(sim)


def test_nan_expression_is_an_error(sim) -> None:
    sim.X[0, 0] = np.nan
    with pytest.raises(ExpressionValueError, match="NaN, inf or negative"):
        RawEmbedder().fit(sim)
