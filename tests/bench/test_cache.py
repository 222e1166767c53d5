from __future__ import annotations

import dataclasses
import json

import numpy as np
import scipy.sparse as sp

from bulkfm.bench.cache import EmbeddingCache
from bulkfm.embedders.classical import PCAEmbedder, RawEmbedder
from bulkfm.fingerprint import array_checksum, data_fingerprint


def test_data_fingerprint_sees_ids_genes_values_and_missing_mask(sim) -> None:
    base = data_fingerprint(sim)
    assert data_fingerprint(sim.copy()) == base
    changed = sim.copy()
    changed.X[5, 7] += 1.0
    assert data_fingerprint(changed) != base
    assert data_fingerprint(sim[::-1].copy()) != base  # row order is part of the data
    renamed = sim.copy()
    renamed.var_names = [f"G{i}" for i in range(sim.n_vars)]
    assert data_fingerprint(renamed) != base
    masked = sim.copy()
    masked.layers["missing"] = sp.csr_matrix(np.eye(*sim.shape, dtype=bool))
    assert data_fingerprint(masked) != base


def test_sparse_and_dense_checksums_are_stable() -> None:
    dense = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert array_checksum(sp.csr_matrix(dense)) == array_checksum(sp.csr_matrix(dense.copy()))
    assert array_checksum(dense) != array_checksum(dense.astype(np.float64))


def test_cache_round_trip_and_keys(sim, tmp_path) -> None:
    cache = EmbeddingCache(tmp_path)
    model = RawEmbedder(n_top_genes=5)
    fp = data_fingerprint(sim)
    emb = np.random.default_rng(0).normal(size=(sim.n_obs, 5)).astype(np.float32)
    assert cache.load(model, fp, sim.n_obs) is None
    npy = cache.save(model, fp, emb)
    np.testing.assert_array_equal(cache.load(model, fp, sim.n_obs), emb)
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["data_fingerprint"] == fp and meta["shape"] == [sim.n_obs, 5]
    # another model config, other data, or a wrong row count all miss
    assert cache.load(RawEmbedder(n_top_genes=6), fp, sim.n_obs) is None
    assert cache.load(PCAEmbedder(), fp, sim.n_obs) is None
    assert cache.load(model, "0" * 32, sim.n_obs) is None
    assert cache.load(model, fp, sim.n_obs + 1) is None
    assert not list(tmp_path.glob("*.tmp"))


def test_damaged_cache_entry_is_recomputed_not_trusted(sim, tmp_path) -> None:
    cache = EmbeddingCache(tmp_path)
    model = RawEmbedder(n_top_genes=5)
    fp = data_fingerprint(sim)
    npy = cache.save(model, fp, np.zeros((sim.n_obs, 5), np.float32))
    npy.write_bytes(b"not an array")
    assert cache.load(model, fp, sim.n_obs) is None


def test_cache_hit_restores_the_gene_coverage_record(sim, tmp_path, tiny_model) -> None:
    """run.json lists a checkpoint's coverage whether its embedding was computed or cached."""
    from bulkfm.embedders.bulkrnabert import BulkRNABertEmbedder
    from bulkfm.tokenize import BinTokenizer

    genes = [*map(str, sim.var_names[:20]), "ENSG99999999999"]  # one gene the data lacks
    tokenizer = BinTokenizer.fit(np.asarray(sim[:, :20].X), genes[:20])
    tokenizer = BinTokenizer(dataclasses.replace(tokenizer.config, genes=genes))
    model = tiny_model(n_genes=len(genes))
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    cache = EmbeddingCache(tmp_path / "cache")
    fp = data_fingerprint(sim)
    first = BulkRNABertEmbedder(tmp_path / "ckpt")
    cache.save(first, fp, first.transform(sim))
    assert first.coverage_ is not None and first.coverage_["n_absent"] == 1
    again = BulkRNABertEmbedder(tmp_path / "ckpt")
    assert cache.load(again, fp, sim.n_obs) is not None
    assert again.describe()["coverage"] == json.loads(json.dumps(first.coverage_))
