from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bulkfm.embedders import get_embedder
from bulkfm.embedders.precomputed import PrecomputedEmbedder
from bulkfm.errors import ConfigError, DuplicateIdError, InputFileError


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
