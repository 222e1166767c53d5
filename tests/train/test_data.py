"""Pre-training data: the missing mask and the gene rule (measured fraction, top-k)."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bulkfm.errors import ConfigError, ExpressionValueError
from bulkfm.train.config import PretrainConfig
from bulkfm.train.data import EXCLUDED_GENES_FILE, missing_mask, prepare_pretrain_data


def test_missing_mask_refuses_non_boolean_values() -> None:
    """Pre-training reads the layer through the tokenizer's one check (2.5 is not True)."""
    adata = ad.AnnData(X=np.ones((2, 3), np.float32))
    adata.layers["absent"] = np.full((2, 3), 2.5, dtype=np.float32)
    with pytest.raises(ExpressionValueError, match=r"layers\['absent'\] holds 6 value"):
        missing_mask(adata, "absent")
    adata.layers["absent"] = np.eye(2, 3, dtype=np.int8)
    assert missing_mask(adata, "absent").dtype == bool


# ---------------------------------------------------------------------- gene selection
def _two_sources(seed: int = 0) -> tuple[ad.AnnData, np.ndarray]:
    """40 samples x 12 genes from two pipelines; genes 0-2 only measured by source A,
    where they vary far more than any gene measured everywhere."""
    rng = np.random.default_rng(seed)
    n, g = 40, 12
    log10 = rng.normal(1.5, 0.1, (n, g)) * np.linspace(0.5, 1.5, g)
    source_b = np.arange(n) >= 16
    log10[:, :3] = rng.normal(2.0, 1.5, (n, 3))
    tpm = np.clip(10**log10 - 1, 0, None).astype(np.float32)
    missing = np.zeros((n, g), dtype=bool)
    missing[np.ix_(source_b, [0, 1, 2])] = True
    tpm[missing] = 0.0
    obs = pd.DataFrame(
        {"patient": [f"P{i}" for i in range(n)], "source": np.where(source_b, "B", "A")},
        index=[f"S{i}" for i in range(n)],
    )
    var = pd.DataFrame(
        {"symbol": [f"G{i}" for i in range(g)]}, index=[f"ENSG{i:011d}" for i in range(g)]
    )
    adata = ad.AnnData(tpm, obs=obs, var=var)
    adata.layers["missing"] = sp.csr_matrix(missing)
    return adata, missing


def _naive_variance(adata: ad.AnnData, missing: np.ndarray, rows: np.ndarray) -> np.ndarray:
    values = np.where(missing, np.nan, np.log10(1 + np.asarray(adata.X, dtype=np.float64)))
    return np.nanvar(values[rows], axis=0)


def test_ranking_skips_genes_measured_in_one_source_and_reports_them(tmp_path):
    adata, missing = _two_sources()
    config = PretrainConfig.from_dict({"data": {"top_k_variable_genes": 4}}).data
    data = prepare_pretrain_data(adata, config, seed=0)
    rows = data.train_idx
    var = _naive_variance(adata, missing, rows)
    measured = 1 - missing[rows].mean(axis=0)
    eligible = np.flatnonzero(measured >= 0.95)
    expected = sorted(eligible[np.argsort(-var[eligible])[:4]])
    assert data.genes == [adata.var_names[i] for i in expected]
    assert not {"ENSG00000000000", "ENSG00000000001", "ENSG00000000002"} & set(data.genes)
    # Without the rule (the old behaviour) the one-source genes would have won.
    naive_top = set(np.argsort(-var)[:4])
    assert {0, 1, 2} <= naive_top

    selection = data.gene_selection
    assert selection is not None
    table = selection.excluded
    one_source = sorted([0, 1, 2], key=lambda i: -var[i])  # most variable first
    assert list(table["gene"]) == [adata.var_names[i] for i in one_source]
    assert np.allclose(table["measured_fraction"], measured[one_source])
    assert np.allclose(table["log_tpm_variance"], var[one_source])
    assert list(table["symbol"]) == [f"G{i}" for i in one_source]
    assert table["variance_rank"].is_monotonic_increasing
    assert all("data.min_measured_fraction" in r for r in table["reason"])
    info = data.info["gene_selection"]
    assert info["n_genes_excluded"] == 3 and info["n_excluded_from_top_k"] == 3
    assert info["n_genes_rankable"] == 9 and "min_measured_fraction" in info["rule"]

    path = selection.write_excluded(tmp_path)
    assert path.name == EXCLUDED_GENES_FILE
    back = pd.read_csv(path, sep="\t")
    assert list(back["gene"]) == list(table["gene"])
    assert np.allclose(back["measured_fraction"], table["measured_fraction"], atol=1e-5)


def test_rule_of_zero_ranks_every_gene_as_before():
    adata, missing = _two_sources()
    config = PretrainConfig.from_dict(
        {"data": {"top_k_variable_genes": 4, "min_measured_fraction": 0}}
    ).data
    data = prepare_pretrain_data(adata, config, seed=0)
    var = _naive_variance(adata, missing, data.train_idx)
    assert data.genes == [adata.var_names[i] for i in sorted(np.argsort(-var)[:4])]
    assert data.gene_selection is not None and data.gene_selection.excluded.empty


def test_selection_without_missing_values_is_unchanged(simulated_adata):
    adata = simulated_adata(n=40, g=10)
    config = PretrainConfig.from_dict({"data": {"top_k_variable_genes": 4}}).data
    data = prepare_pretrain_data(adata, config, seed=0)
    values = np.log10(1 + np.asarray(adata.X, dtype=np.float64))[data.train_idx]
    expected = sorted(np.argsort(-values.var(axis=0), kind="stable")[:4])
    assert data.genes == [adata.var_names[i] for i in expected]
    assert data.gene_selection is not None and data.gene_selection.excluded.empty
    assert data.info["gene_selection"]["n_genes_rankable"] == 10


def test_fewer_measured_genes_than_top_k_is_a_warning_naming_the_keys(caplog):
    adata, _ = _two_sources()
    config = PretrainConfig.from_dict({"data": {"top_k_variable_genes": 11}}).data
    with caplog.at_level(logging.WARNING, logger="bulkfm.train.data"):
        data = prepare_pretrain_data(adata, config, seed=0)
    assert data.n_genes == 9
    text = caplog.text
    assert "data.top_k_variable_genes=11" in text and "only 9 of 12" in text
    assert "data.min_measured_fraction" in text


def test_no_measured_gene_is_an_error_naming_the_key():
    adata, _ = _two_sources()
    missing = np.zeros(adata.shape, dtype=bool)
    missing[::2, :] = True  # every gene absent from half the samples
    adata.layers["missing"] = sp.csr_matrix(missing)
    config = PretrainConfig.from_dict({"data": {"top_k_variable_genes": 3}}).data
    with pytest.raises(ConfigError, match=r"lower data\.min_measured_fraction"):
        prepare_pretrain_data(adata, config, seed=0)


@pytest.mark.parametrize("value", [-0.1, 1.5, "all"])
def test_min_measured_fraction_is_checked(value):
    with pytest.raises(ConfigError, match=r"data\.min_measured_fraction"):
        PretrainConfig.from_dict({"data": {"min_measured_fraction": value}})
