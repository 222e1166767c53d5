from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.decomposition import PCA

from bulkfm.embedders import (
    Embedder,
    available_embedders,
    get_embedder,
    register_embedder,
    registry,
)
from bulkfm.embedders.classical import NMFEmbedder, PCAEmbedder, RawEmbedder
from bulkfm.embedders.precomputed import PrecomputedEmbedder
from bulkfm.errors import (
    CheckpointError,
    ConfigError,
    DuplicateIdError,
    ExpressionValueError,
    InputFileError,
)


# --------------------------------------------------------------------------- registry
def test_registry_finds_a_new_model(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_embedder("ones")
    class Ones(Embedder):
        def __init__(self, dim: int = 3, label: str | None = None) -> None:
            super().__init__(label=label)
            self.dim = dim

        def transform(self, adata: ad.AnnData) -> np.ndarray:
            return np.ones((adata.n_obs, self.dim))

    assert "ones" in available_embedders()
    model = get_embedder("ones", dim=5)
    assert isinstance(model, Ones) and model.name == "ones" and model.label == "ones"
    with pytest.raises(ConfigError, match="already taken"):
        register_embedder("ones")(type("Other", (Ones,), {}))


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'scfoo'; known models: .*nmf, pca"):
        get_embedder("scfoo")


def test_bad_model_settings_are_reported() -> None:
    with pytest.raises(ConfigError, match="bad settings for model 'pca'"):
        get_embedder("pca", n_componentz=3)


def test_fingerprint_follows_config() -> None:
    assert PCAEmbedder().fingerprint() == PCAEmbedder().fingerprint()
    assert PCAEmbedder(n_components=8).fingerprint() != PCAEmbedder().fingerprint()
    assert RawEmbedder().fingerprint() != NMFEmbedder().fingerprint()


# --------------------------------------------------------------------------- baselines
def _log_var_top(adata: ad.AnnData, n: int, genes_ok: np.ndarray) -> set[str]:
    logx = np.log1p(np.asarray(adata.X, dtype=np.float64))[:, genes_ok]
    order = np.argsort(-logx.var(axis=0), kind="stable")[:n]
    return set(adata.var_names[genes_ok][order])


def test_raw_selects_top_variable_genes_of_training_rows(sim) -> None:
    train, test = sim[:150], sim[150:]
    model = RawEmbedder(n_top_genes=20).fit(train)
    assert set(model.genes_) == _log_var_top(train, 20, np.ones(sim.n_vars, bool))
    emb = model.transform(test)
    expected = np.log1p(np.asarray(test[:, model.genes_].X, dtype=np.float64))
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
    sim.layers["missing"] = sp.csr_matrix(missing)
    model = RawEmbedder(n_top_genes=30).fit(sim[:150])
    measured = ~missing[:150].any(axis=0)
    assert set(model.genes_) == _log_var_top(sim[:150], 30, measured)
    emb = model.transform(sim[150:])
    cols = sim.var_names.get_indexer(model.genes_)
    train_mean = np.log1p(np.asarray(sim.X[:150], dtype=np.float64))[:, cols].mean(axis=0)
    gap = missing[150:][:, cols]
    np.testing.assert_allclose(emb[gap], np.broadcast_to(train_mean, gap.shape)[gap], rtol=1e-5)


def test_pca_equals_manual_pipeline(sim) -> None:
    train, test = sim[:150], sim[150:]
    model = PCAEmbedder(n_components=10, n_top_genes=60, seed=2).fit(train)
    logx = np.log1p(np.asarray(train[:, model.genes_].X, dtype=np.float64))
    mean, std = logx.mean(axis=0), logx.std(axis=0)
    ref = PCA(n_components=10, random_state=2).fit((logx - mean) / std)
    logt = np.log1p(np.asarray(test[:, model.genes_].X, dtype=np.float64))
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


# --------------------------------------------------------------------------- precomputed
def _emb(sim) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(sim.n_obs, 4)).astype(np.float32)


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".h5ad"])
def test_precomputed_reads_files_written_by_bulkfm_embed(sim, tmp_path, suffix) -> None:
    from bulkfm.embed import write_embeddings

    emb = _emb(sim)
    path = tmp_path / f"emb{suffix}"
    write_embeddings(emb, sim.copy(), path)
    shuffled = sim[np.random.default_rng(1).permutation(sim.n_obs)]
    model = PrecomputedEmbedder(path)
    out = model.transform(shuffled)
    order = sim.obs_names.get_indexer(shuffled.obs_names)
    np.testing.assert_allclose(out, emb[order])
    assert model.overlap["n_matched"] == sim.n_obs


def test_precomputed_csv_with_id_column(sim, tmp_path) -> None:
    emb = _emb(sim)
    frame = pd.DataFrame(emb, columns=list("abcd")).assign(sample_id=sim.obs_names)
    frame.iloc[::-1].to_csv(tmp_path / "e.csv", index=False)
    out = PrecomputedEmbedder(tmp_path / "e.csv").transform(sim)
    np.testing.assert_allclose(out, emb, rtol=1e-6)


def test_precomputed_ids_matching_no_sample(sim, tmp_path) -> None:
    pd.DataFrame(_emb(sim), index=[f"X{i}" for i in range(sim.n_obs)]).to_parquet(
        tmp_path / "e.parquet"
    )
    with pytest.raises(InputFileError, match=rf"none of the {sim.n_obs} ids .* \(overlap 0\)"):
        PrecomputedEmbedder(tmp_path / "e.parquet").transform(sim)


def test_precomputed_partial_overlap_reports_counts(sim, tmp_path) -> None:
    ids = list(sim.obs_names[:-7]) + [f"X{i}" for i in range(7)]
    pd.DataFrame(_emb(sim), index=ids).to_parquet(tmp_path / "e.parquet")
    n = sim.n_obs
    with pytest.raises(
        InputFileError, match=rf"7 of {n} samples have no embedding .*overlap {n - 7}"
    ):
        PrecomputedEmbedder(tmp_path / "e.parquet").transform(sim)


def test_precomputed_nan_embeddings(sim, tmp_path) -> None:
    emb = _emb(sim)
    emb[3, 1] = np.nan
    pd.DataFrame(emb, index=sim.obs_names).to_parquet(tmp_path / "e.parquet")
    with pytest.raises(InputFileError, match=r"NaN or inf values in 1 of"):
        PrecomputedEmbedder(tmp_path / "e.parquet").transform(sim)


def test_precomputed_duplicate_ids(sim, tmp_path) -> None:
    ids = list(sim.obs_names)
    ids[1] = ids[0]
    pd.DataFrame(_emb(sim), index=ids).to_parquet(tmp_path / "e.parquet")
    with pytest.raises(DuplicateIdError, match="duplicated sample ids"):
        PrecomputedEmbedder(tmp_path / "e.parquet").transform(sim)


def test_precomputed_npy_without_ids(sim, tmp_path) -> None:
    np.save(tmp_path / "e.npy", _emb(sim))
    with pytest.raises(InputFileError, match="without sample ids"):
        PrecomputedEmbedder(tmp_path / "e.npy").transform(sim)


def test_precomputed_needs_a_path() -> None:
    with pytest.raises(ConfigError, match="needs an embedding file"):
        get_embedder("precomputed")


# --------------------------------------------------------------------------- BulkRNABert
def _tiny_checkpoint(adata: ad.AnnData, directory: Path) -> Path:
    import torch

    from bulkfm.models.bulkrnabert import BulkRNABert, BulkRNABertConfig
    from bulkfm.tokenize import BinTokenizer

    torch.manual_seed(0)
    genes = list(map(str, adata.var_names[:32]))
    config = BulkRNABertConfig(
        n_genes=32,
        embed_dim=16,
        init_gene_embed_dim=8,
        num_attention_heads=2,
        ffn_embed_dim=32,
        num_layers=1,
        n_expressions_bins=16,
    )
    tokenizer = BinTokenizer.fit(np.asarray(adata[:, genes].X), genes, n_bins=16)
    return BulkRNABert(config).save_pretrained(directory, tokenizer)


def test_bulkrnabert_embedder_equals_embed_adata(sim, tmp_path) -> None:
    from bulkfm.embed import embed_adata
    from bulkfm.models.bulkrnabert import load_pretrained

    ckpt = _tiny_checkpoint(sim, tmp_path / "ckpt")
    small = sim[:12].copy()
    model = get_embedder("bulkrnabert", model_dir=ckpt, batch_size=5)
    out = model.transform(small)
    net, tok = load_pretrained(ckpt)
    np.testing.assert_allclose(out, embed_adata(net, tok, small, batch_size=5), rtol=1e-6)
    assert out.shape == (12, 16) and not model.learns
    before = model.fingerprint()
    (ckpt / "extra.txt").write_text("changed checkpoint")
    assert get_embedder("bulkrnabert", model_dir=ckpt).fingerprint() != before


def test_bulkrnabert_needs_a_checkpoint(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--model-dir"):
        get_embedder("bulkrnabert")
    with pytest.raises(CheckpointError, match="not found"):
        get_embedder("bulkrnabert", model_dir=tmp_path / "nope")


# --------------------------------------------------------------------------- control
def test_random_control_is_per_patient_and_order_free(sim) -> None:
    model = get_embedder("random", dim=6, seed=1)
    emb = model.transform(sim)
    assert emb.shape == (sim.n_obs, 6)
    patients = sim.obs["patient"].to_numpy()
    dup = pd.Series(patients).duplicated(keep=False).to_numpy()
    assert dup.any()
    first = {}
    for p, row in zip(patients, emb, strict=True):
        np.testing.assert_array_equal(first.setdefault(p, row), row)
    perm = np.random.default_rng(0).permutation(sim.n_obs)
    np.testing.assert_array_equal(model.transform(sim[perm]), emb[perm])
    other = get_embedder("random", dim=6, seed=2).transform(sim)
    assert not np.allclose(other, emb)
    assert abs(float(np.corrcoef(emb[~dup, 0], emb[~dup, 1])[0, 1])) < 0.3
