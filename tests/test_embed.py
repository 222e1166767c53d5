from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from bulkfm.embed import embed_adata, read_embeddings, write_embeddings
from bulkfm.errors import (
    CheckpointError,
    ConfigError,
    DuplicateIdError,
    ExpressionValueError,
    GeneMappingError,
    InputFileError,
)
from bulkfm.models import BulkRNABert
from bulkfm.tokenize import BinTokenizer, TokenizerConfig
from tests.conftest import tiny_config

N_GENES = 32
GENES = [f"ENSG{i:011d}" for i in range(N_GENES)]
TINY = dict(n_genes=N_GENES, n_expressions_bins=16, num_attention_heads=4, num_layers=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> BulkRNABert:
    torch.manual_seed(0)
    m = BulkRNABert(tiny_config(**TINY))
    with torch.no_grad():  # larger weights than the 0.02 init, so layers differ visibly
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer() -> BinTokenizer:
    return BinTokenizer(TokenizerConfig(genes=GENES, normalization_factor=4.0, n_bins=16))


@pytest.fixture
def adata() -> ad.AnnData:
    rng = np.random.default_rng(0)
    X = (10 ** rng.uniform(0, 3.5, size=(7, N_GENES)) - 1).astype(np.float32)
    X[rng.random(X.shape) < 0.15] = 0.0
    missing = np.zeros(X.shape, dtype=bool)
    missing[1, [0, 5, 9]] = True
    missing[4, 10:20] = True
    obs = pd.DataFrame(index=[f"S{i}" for i in range(7)])
    return ad.AnnData(
        X=X,
        obs=obs,
        var=pd.DataFrame(index=GENES),
        layers={"missing": sp.csr_matrix(missing)},
    )


def reference_embedding(model, tokenizer, adata, layer: int, exclude: bool) -> np.ndarray:
    """Masked mean of a forward pass's hidden state, computed outside embed()."""
    tokens = tokenizer.encode_adata(adata)
    with torch.no_grad():
        out = model(torch.from_numpy(tokens), output_hidden_states=True)
    hidden = out.hidden_states[layer % (model.config.num_layers + 1)].numpy()
    keep = np.ones(tokens.shape, dtype=bool)
    if exclude:
        keep = tokens != tokenizer.mask_token_id
    return np.stack([hidden[i][keep[i]].mean(axis=0) for i in range(len(tokens))])


# --------------------------------------------------------------------------- embed_adata
def test_batch_size_does_not_change_embeddings(model, tokenizer, adata):
    full = embed_adata(model, tokenizer, adata, batch_size=7)
    for bs in (1, 3):
        np.testing.assert_allclose(
            embed_adata(model, tokenizer, adata, batch_size=bs), full, rtol=0, atol=1e-5
        )
    assert full.shape == (7, 16) and full.dtype == np.float32


@pytest.mark.parametrize("layer", [-1, 0, 1])
def test_equals_masked_mean_of_layer_output(model, tokenizer, adata, layer):
    got = embed_adata(model, tokenizer, adata, layer=layer, batch_size=3)
    expected = reference_embedding(model, tokenizer, adata, layer, exclude=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_missing_genes_are_masked_and_left_out(model, tokenizer, adata):
    base = embed_adata(model, tokenizer, adata)
    changed = adata.copy()
    changed.X[4, 10:20] = 5000.0  # recorded missing: the value must not matter
    np.testing.assert_allclose(embed_adata(model, tokenizer, changed), base, atol=1e-6)
    included = embed_adata(model, tokenizer, adata, exclude_missing=False)
    np.testing.assert_allclose(
        included, reference_embedding(model, tokenizer, adata, -1, exclude=False), atol=1e-5
    )
    assert not np.allclose(included[4], base[4], atol=1e-4)
    np.testing.assert_allclose(included[0], base[0], atol=1e-6)  # sample 0 has nothing missing


def test_gene_order_and_extra_genes_are_aligned(model, tokenizer, adata):
    base = embed_adata(model, tokenizer, adata)
    perm = np.random.default_rng(1).permutation(N_GENES)
    shuffled = adata[:, perm].copy()
    extra = ad.AnnData(
        X=np.hstack([shuffled.X, np.ones((7, 2), dtype=np.float32)]),
        obs=shuffled.obs,
        var=pd.DataFrame(index=[*shuffled.var_names, "ENSGX1", "ENSGX2"]),
        layers={"missing": sp.hstack([shuffled.layers["missing"], sp.csr_matrix((7, 2))]).tocsr()},
    )
    np.testing.assert_allclose(embed_adata(model, tokenizer, extra), base, atol=1e-5)


def test_restores_training_mode(model, tokenizer, adata):
    model.train()
    try:
        embed_adata(model, tokenizer, adata[:2])
        assert model.training
    finally:
        model.eval()


def test_rejects_sample_with_every_gene_missing(model, tokenizer, adata):
    adata.layers["missing"] = sp.csr_matrix(
        np.vstack([np.ones(N_GENES, bool), np.zeros((6, N_GENES), bool)])
    )
    with pytest.raises(ExpressionValueError, match=r"1 of 7 sample\(s\) have every model gene"):
        embed_adata(model, tokenizer, adata)


def test_every_gene_missing_counts_all_samples_not_one_batch(model, tokenizer, adata):
    """The check runs on the whole input: 7 of 7, not the 2 of the first batch."""
    adata.layers["missing"] = sp.csr_matrix(np.ones(adata.shape, bool))
    with pytest.raises(ExpressionValueError, match=r"7 of 7 sample\(s\).*'S0', 'S1', 'S2'"):
        embed_adata(model, tokenizer, adata, batch_size=2, min_gene_coverage=0.0)


def test_coverage_below_the_minimum_stops_before_the_model_runs(model, tokenizer, adata):
    adata.layers["missing"] = sp.csr_matrix(np.ones(adata.shape, bool))
    with pytest.raises(GeneMappingError, match=r"measures too few.*0\.0% on average"):
        embed_adata(model, tokenizer, adata, batch_size=2)


def test_include_missing_allows_all_missing_samples(model, tokenizer, adata):
    adata.layers["missing"] = sp.csr_matrix(np.ones(adata.shape, bool))
    emb = embed_adata(model, tokenizer, adata, exclude_missing=False, min_gene_coverage=0.0)
    assert np.isfinite(emb).all()


def test_absent_genes_embed_like_genes_flagged_missing(model, tokenizer, adata):
    """Dropping model genes from the data equals keeping them flagged in layers["missing"]."""
    flagged = adata.copy()
    own = adata.layers.get("missing")
    mask = np.zeros(adata.shape, bool) if own is None else np.asarray(own.todense(), bool)
    mask[:, :5] = True
    flagged.layers["missing"] = mask
    lacking = adata[:, 5:].copy()
    np.testing.assert_allclose(
        embed_adata(model, tokenizer, lacking),
        embed_adata(model, tokenizer, flagged),
        rtol=0,
        atol=1e-6,
    )


def test_rejects_non_boolean_missing_layer(model, tokenizer, adata):
    adata.layers["missing"] = np.full(adata.shape, 2.5, dtype=np.float32)
    with pytest.raises(ExpressionValueError, match=r"layers\['missing'\] holds .*other than 0/1"):
        embed_adata(model, tokenizer, adata)


def test_nan_error_names_sample_and_gene_not_batch_position(model, tokenizer, adata):
    adata.X[5, 3] = np.nan
    with pytest.raises(ExpressionValueError, match=rf"sample 'S5', gene '{GENES[3]}'"):
        embed_adata(model, tokenizer, adata, batch_size=2)


def test_rejects_non_bool_exclude_missing(model, tokenizer, adata):
    with pytest.raises(ConfigError, match="exclude_missing must be true or false"):
        embed_adata(model, tokenizer, adata, exclude_missing="false")


def test_rejects_bad_batch_size(model, tokenizer, adata):
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        embed_adata(model, tokenizer, adata, batch_size=0)


def test_max_pooling_equals_the_models_and_bad_pooling_is_refused(model, tokenizer, adata):
    import torch

    tokens = torch.from_numpy(tokenizer.encode_adata(adata))
    want = model.embed(tokens, layers=[1, -1], pooling="max").numpy()
    got = embed_adata(model, tokenizer, adata, layers=[1, -1], pooling="max", batch_size=3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"pooling must be one of \['mean', 'max'\]"):
        embed_adata(model, tokenizer, adata, pooling="median")


def test_rejects_missing_layer(model, tokenizer, adata):
    with pytest.raises(ConfigError, match="layer 5 does not exist"):
        embed_adata(model, tokenizer, adata, layer=5)


def test_rejects_tokenizer_of_other_model(model, adata):
    other = BinTokenizer(TokenizerConfig(genes=GENES, normalization_factor=4.0, n_bins=64))
    with pytest.raises(CheckpointError, match="64 bins"):
        embed_adata(model, other, adata)


# --------------------------------------------------------------------------- writing
@pytest.fixture
def emb() -> np.ndarray:
    return np.random.default_rng(3).normal(size=(7, 16)).astype(np.float32)


def test_write_into_anndata_obsm(emb, adata):
    write_embeddings(emb, adata, adata, key="X_test", metadata={"layer": -1})
    np.testing.assert_array_equal(adata.obsm["X_test"], emb)
    assert adata.uns["bulkfm"]["embeddings"]["X_test"]["layer"] == -1


def test_write_parquet_read_back_with_pandas(emb, adata, tmp_path):
    path = write_embeddings(emb, adata, tmp_path / "e.parquet", metadata={"model": "m"})
    frame = pd.read_parquet(path)
    assert frame.index.name == "sample_id"
    assert list(frame.index) == list(adata.obs_names)
    assert list(frame.columns) == [f"emb_{i}" for i in range(16)]
    np.testing.assert_array_equal(frame.to_numpy(), emb)
    meta = json.loads(pq.read_schema(path).metadata[b"bulkfm"])
    assert meta["model"] == "m" and meta["dim"] == 16
    pd.testing.assert_frame_equal(read_embeddings(path), frame)


def test_write_npy_with_ids_file(emb, tmp_path):
    ids = [f"id{i}" for i in range(7)]
    write_embeddings(emb, ids, tmp_path / "e.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), emb)
    assert (tmp_path / "e.ids.txt").read_text().splitlines() == ids
    back = read_embeddings(tmp_path / "e.npy")
    assert list(back.index) == ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ids.txt", "e.npy"]  # no temp left


def test_write_h5ad_round_trip(emb, adata, tmp_path):
    write_embeddings(emb, adata, tmp_path / "e.h5ad")
    back = ad.read_h5ad(tmp_path / "e.h5ad")
    np.testing.assert_array_equal(back.obsm["X_bulkrnabert"], emb)
    np.testing.assert_array_equal(read_embeddings(tmp_path / "e.h5ad").to_numpy(), emb)


def test_write_is_atomic(emb, adata, tmp_path, monkeypatch):
    import pyarrow.parquet

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pyarrow.parquet, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_embeddings(emb, adata, tmp_path / "e.parquet")
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_unknown_suffix(emb, adata, tmp_path):
    with pytest.raises(ConfigError, match=r"must end with one of \('.h5ad', '.parquet', '.npy'\)"):
        write_embeddings(emb, adata, tmp_path / "e.csv")


def test_write_rejects_duplicate_ids(emb, tmp_path):
    with pytest.raises(DuplicateIdError, match="duplicate sample id"):
        write_embeddings(emb, ["a"] * 7, tmp_path / "e.npy")


def test_write_rejects_row_count_mismatch(emb, tmp_path):
    with pytest.raises(ConfigError, match="7 rows but 3 sample ids"):
        write_embeddings(emb, ["a", "b", "c"], tmp_path / "e.npy")


def test_write_rejects_nan(emb, tmp_path):
    emb[2, 3] = np.nan
    with pytest.raises(ExpressionValueError, match="finite"):
        write_embeddings(emb, [f"i{i}" for i in range(7)], tmp_path / "e.npy")


def test_write_h5ad_needs_the_anndata(emb, tmp_path):
    with pytest.raises(ConfigError, match="needs the AnnData itself"):
        write_embeddings(emb, [f"i{i}" for i in range(7)], tmp_path / "e.h5ad")


def test_read_rejects_absent_file(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        read_embeddings(tmp_path / "none.parquet")


def test_import_does_not_load_torch():
    code = "import sys, bulkfm.embed; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
