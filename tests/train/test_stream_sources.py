"""Streaming pre-training from an ARCHS4 file and from parquet shards (``data.format``).

The reference for each source is the independent route a user has today: ``bulkfm
data build`` turns the same input into an ``.h5ad`` (counts -> TPM, gene
harmonisation), which is then read into memory by
:func:`bulkfm.train.data.prepare_pretrain_data`. A streamed source must give the same
samples, genes, tokens and batches, so it trains the same model.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from bulkfm.data import archs4
from bulkfm.data.build import BuildConfig, build_dataset
from bulkfm.errors import BulkfmWarning, ConfigError, InputFileError
from bulkfm.train import stream
from bulkfm.train.data import (
    prepare_pretrain_data,
)
from bulkfm.train.pretrain import pretrain, read_log
from bulkfm.train.stream import (
    Archs4Source,
    ParquetSource,
    StreamingTokens,
    open_source,
    prepare_streaming_data,
)
from tests.data.test_archs4 import N_SAMPLES, gene_rows, write_archs4
from tests.train.stream_checks import assert_two_ranks_match_in_memory

__all__ = ["gene_rows"]  # the ARCHS4 tests' fixture: 300 real protein-coding genes

#: A selection keeping most samples, sample 7 (no reads) among them.
SELECTION = {"max_singlecell_probability": 0.9}
N_SHARD_SAMPLES = (25, 20, 15)


@dataclasses.dataclass
class Case:
    """One source on disk, its ``data:`` keys, and the ``.h5ad`` the build made of it."""

    name: str
    data: dict
    built: Path


@pytest.fixture(scope="module")
def archs4_case(tmp_path_factory, gene_rows) -> Case:
    folder = tmp_path_factory.mktemp("archs4_source")
    path = folder / "human_gene_v2.test.h5"
    write_archs4(path, gene_rows)
    config = BuildConfig.from_dict({"inputs": [{"path": str(path), "archs4": SELECTION}]})
    built = folder / "built.h5ad"
    build_dataset(config, progress=False).write_h5ad(built)
    return Case("archs4", {"path": str(path), "archs4": SELECTION}, built)


def _tpm_frame(gene_rows: pd.DataFrame, n: int, seed: int, start: int) -> pd.DataFrame:
    """TPM-like values with TCGA barcodes (tumour + normal of one patient: the build and
    the source must both group them), real Ensembl ids as columns, float64."""
    rng = np.random.default_rng(seed)
    genes = list(gene_rows.index[:40])
    log10 = rng.normal(1.2, 0.9, (n, len(genes)))
    values = np.clip(10**log10 - 1, 0, None)
    values[rng.random(values.shape) < 0.05] = 0.0
    ids = [
        f"TCGA-AA-{(start + i) // 2:04d}-{'01A' if (start + i) % 2 == 0 else '11A'}"
        for i in range(n)
    ]
    return pd.DataFrame(values, index=pd.Index(ids), columns=genes)


def write_shards(folder: Path, gene_rows: pd.DataFrame) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for k, n in enumerate(N_SHARD_SAMPLES):
        path = folder / f"part-{k}.parquet"
        _tpm_frame(gene_rows, n, seed=k, start=start).to_parquet(path, row_group_size=8)
        paths.append(path)
        start += n
    return paths


@pytest.fixture(scope="module")
def parquet_case(tmp_path_factory, gene_rows) -> Case:
    folder = tmp_path_factory.mktemp("parquet_source")
    shards = write_shards(folder / "shards", gene_rows)
    config = BuildConfig.from_dict({"inputs": [{"path": str(p), "unit": "tpm"} for p in shards]})
    built = folder / "built.h5ad"
    build_dataset(config, progress=False).write_h5ad(built)
    return Case("parquet", {"path": str(folder / "shards")}, built)


@pytest.fixture(params=["archs4", "parquet"])
def case(request) -> Case:
    return request.getfixturevalue(f"{request.param}_case")


def _config(pretrain_config, out: Path, data: dict, **optim):
    config = pretrain_config(out, **optim)
    section = dataclasses.replace(config.data, **data)
    return dataclasses.replace(config, data=section)


def _in_memory(case: Case, config, seed: int):
    import anndata as ad

    section = dataclasses.replace(config.data, path=str(case.built), archs4=None)
    return prepare_pretrain_data(ad.read_h5ad(case.built), section, seed=seed)


# --------------------------------------------------------------------------- (a) tokens
def test_streamed_source_equals_the_built_h5ad_in_memory(tmp_path, case, pretrain_config) -> None:
    config = _config(pretrain_config, tmp_path, {**case.data, "top_k_variable_genes": 24})
    ref = _in_memory(case, config, seed=4)
    got = prepare_streaming_data(config.data, seed=4)

    assert isinstance(got.tokens, StreamingTokens)
    assert got.sample_ids == ref.sample_ids and len(ref.sample_ids) > 40
    assert got.genes == ref.genes and len(got.genes) == 24
    np.testing.assert_array_equal(got.train_idx, ref.train_idx)
    np.testing.assert_array_equal(got.eval_idx, ref.eval_idx)
    assert got.tokenizer.normalization_factor == ref.tokenizer.normalization_factor
    for row in range(len(ref.sample_ids)):  # row by row, as the data loader asks
        np.testing.assert_array_equal(got.tokens[row], ref.tokens[row])
    np.testing.assert_array_equal(got.gene_mode, ref.gene_mode)
    np.testing.assert_array_equal(got.gene_log_prob, ref.gene_log_prob)
    assert {k: v for k, v in got.info.items() if k != "streamed_from"} == ref.info
    assert case.name in got.info["streamed_from"].lower()


def test_archs4_tpm_is_the_builds_and_a_sample_without_reads_is_zero(archs4_case) -> None:
    import anndata as ad

    source = Archs4Source(archs4_case.data["path"], archs4.Archs4Selection(**SELECTION))
    built = ad.read_h5ad(archs4_case.built)
    assert list(source.annotations.var_names) == list(built.var_names)
    rows = np.array([30, 2, 7, 2, 44])  # unsorted, repeated: one sorted read of 4 columns
    np.testing.assert_array_equal(source.read_rows(rows)[0], built.X[rows])
    assert built.obs_names[7] == "GSM5007" and not source.read_rows(np.array([7]))[0].any()
    assert source.annotations.obs["patient"].tolist() == built.obs["patient"].tolist()


def test_archs4_reads_each_block_in_one_sorted_hdf5_read(archs4_case, monkeypatch) -> None:
    source = Archs4Source(archs4_case.data["path"], archs4.Archs4Selection(**SELECTION))
    calls: list[np.ndarray] = []
    original = archs4.read_counts

    def spy(expression, samples, genes, genes_x_samples):
        calls.append(np.asarray(samples))
        return original(expression, samples, genes, genes_x_samples)

    monkeypatch.setattr(archs4, "read_counts", spy)
    source.read_rows(np.array([20, 3, 9]))
    source.read_rows(np.array([20, 3, 9]))  # the cached block: no second read
    assert len(calls) == 1
    assert np.all(np.diff(calls[0]) > 0) and len(calls[0]) == 3


def test_parquet_rows_read_like_numpy_across_shards_and_row_groups(parquet_case, gene_rows) -> None:
    frames, start = [], 0
    for k, n in enumerate(N_SHARD_SAMPLES):
        frames.append(_tpm_frame(gene_rows, n, seed=k, start=start))
        start += n
    full = pd.concat(frames).to_numpy(dtype=np.float32)
    source = ParquetSource(parquet_case.data["path"], cache_bytes=1)  # one group cached
    for rows in ([0, 1, 2], [59, 0, 24, 25, 25], [44], list(range(60))):
        np.testing.assert_array_equal(source.read_rows(np.array(rows))[0], full[rows])
    _, cache = source._state()
    assert len(cache) == 1  # bounded: the budget holds less than a group, one is kept
    copy = pickle.loads(pickle.dumps(source))  # as a spawned data-loader worker gets it
    np.testing.assert_array_equal(copy.read_rows(np.array([3, 50]))[0], full[[3, 50]])


# --------------------------------------------------------------------------- (c) sharding
def test_two_ranks_with_two_workers_cover_disjoint_rows(tmp_path, case, pretrain_config) -> None:
    config = _config(pretrain_config, tmp_path, case.data)
    ref = _in_memory(case, config, seed=1)
    got = prepare_streaming_data(config.data, seed=1)
    assert_two_ranks_match_in_memory(got, ref)


# ------------------------------------------------------------------- (b, d) runs, resume
@pytest.mark.usefixtures("one_torch_thread")
def test_runs_from_the_source_train_the_h5ad_model_and_resume(
    tmp_path, case, pretrain_config
) -> None:
    def run(name: str, data: dict, **kw):
        config = _config(pretrain_config, tmp_path / name, data)
        return pretrain(config, handle_signals=False, **kw)

    ref = run("h5ad", {"path": str(case.built)})
    streamed = run("stream", {**case.data, "streaming": True})
    loaded = run("memory", case.data)  # the same source read into memory
    weights = load_file(str(tmp_path / "h5ad" / "final" / "model.safetensors"))
    assert weights["lm_head.bias"].abs().max() > 1e-3  # trained: the comparison is not vacuous
    for folder in ("stream", "memory"):
        other = load_file(str(tmp_path / folder / "final" / "model.safetensors"))
        assert all(torch.equal(weights[k], other[k]) for k in weights), folder
    for a, b in zip(read_log(ref.log_path), read_log(streamed.log_path), strict=True):
        assert {k: v for k, v in a.items() if k != "elapsed_s"} == {
            k: v for k, v in b.items() if k != "elapsed_s"
        }
    assert loaded.n_train == ref.n_train

    first = run("killed", {**case.data, "streaming": True}, stop_after=3)
    assert first.stopped_early and first.step == 3
    resumed = run("killed", {**case.data, "streaming": True}, resume=True)
    assert resumed.resumed_from == 2  # checkpoint_every = 2: the last one before the stop
    other = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    for key in weights:
        torch.testing.assert_close(other[key], weights[key], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- (e) bad input
def test_shards_with_different_genes_name_the_shard(tmp_path, gene_rows, pretrain_config) -> None:
    shards = write_shards(tmp_path / "shards", gene_rows)
    frame = pd.read_parquet(shards[1])
    frame.drop(columns=frame.columns[:2]).to_parquet(shards[1])
    config = _config(pretrain_config, tmp_path / "run", {"path": str(tmp_path / "shards")})
    with pytest.raises(InputFileError, match=r"part-1\.parquet.*2 gene columns missing"):
        prepare_streaming_data(config.data, seed=0)


def test_shard_without_sample_ids_is_refused(tmp_path, gene_rows, pretrain_config) -> None:
    shards = write_shards(tmp_path / "shards", gene_rows)
    pd.read_parquet(shards[0]).reset_index(drop=True).to_parquet(shards[0])
    config = _config(pretrain_config, tmp_path / "run", {"path": str(tmp_path / "shards")})
    with pytest.raises(InputFileError, match=r"part-0\.parquet has no sample-id column"):
        prepare_streaming_data(config.data, seed=0)


def test_parquet_of_counts_is_flagged_like_an_h5ad_of_counts(tmp_path, pretrain_config) -> None:
    rng = np.random.default_rng(0)
    counts = pd.DataFrame(
        rng.negative_binomial(2, 0.001, (30, 50)).astype(float),
        index=[f"S{i}" for i in range(30)],
        columns=[f"G{j}" for j in range(50)],
    )
    counts.to_parquet(tmp_path / "counts.parquet")
    config = _config(pretrain_config, tmp_path / "run", {"path": str(tmp_path / "counts.parquet")})
    with pytest.warns(BulkfmWarning, match=r"parquet shards\) look like read counts"):
        prepare_streaming_data(config.data, seed=0)


def test_an_h5_that_is_not_archs4_says_so(tmp_path, pretrain_config) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("matrix", data=np.zeros((2, 2)))
    config = _config(pretrain_config, tmp_path / "run", {"path": str(other), "format": "archs4"})
    with pytest.raises(InputFileError, match=r"not an ARCHS4 gene file.*data\.format: h5ad"):
        prepare_streaming_data(config.data, seed=0)
    auto = _config(pretrain_config, tmp_path / "run", {"path": str(other)})
    with pytest.raises(InputFileError, match=r"not an AnnData.*data\.format: archs4"):
        prepare_streaming_data(auto.data, seed=0)


def test_format_keys_are_checked(tmp_path, archs4_case, parquet_case, pretrain_config) -> None:
    config = pretrain_config(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data\.format.*did you mean 'parquet'"):
        dataclasses.replace(config.data, format="parqet")
    with pytest.raises(ConfigError, match=r"data\.archs4.*data\.format is 'parquet'"):
        dataclasses.replace(config.data, format="parquet", archs4={"series": ["GSE1"]})
    with pytest.raises(ConfigError, match=r"data\.layer 'counts'.*data\.layer=null"):
        dataclasses.replace(config.data, format="archs4", layer="counts")
    section = dataclasses.replace(config.data, path=parquet_case.data["path"], archs4=SELECTION)
    with pytest.raises(ConfigError, match=r"data\.archs4.*read as parquet"):
        open_source(section)
    built = dataclasses.replace(config.data, path=str(archs4_case.built), archs4=SELECTION)
    with pytest.raises(ConfigError, match=r"data\.archs4.*read as h5ad"):
        stream.read_into_memory(built)
    whole = dataclasses.replace(config.data, path=archs4_case.data["path"])
    with pytest.raises(ConfigError, match=r"whole file.*data\.streaming: true"):
        stream.read_into_memory(whole)
    assert N_SAMPLES == 50


def test_fitting_reads_bounded_blocks(tmp_path, case, pretrain_config, monkeypatch) -> None:
    """No pass reads more than one block of rows at a time (memory flat in samples)."""
    config = _config(pretrain_config, tmp_path, {**case.data, "top_k_variable_genes": 8})
    for module, name in ((stream, "_CHUNK_ROWS"), (stream, "_UNIT_SAMPLE")):
        monkeypatch.setattr(module, name, 16)
    monkeypatch.setattr("bulkfm.train.data._ROW_CHUNK", 16)
    reads: list[int] = []
    for cls in (stream.Archs4Source, stream.ParquetSource):
        method = cls._read

        def spy(self, rows, method=method):
            reads.append(len(rows))
            return method(self, rows)

        monkeypatch.setattr(cls, "_read", spy)
    data = prepare_streaming_data(config.data, seed=0)
    assert data.n_train + data.n_eval > 40
    assert reads and max(reads) <= 16
