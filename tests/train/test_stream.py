"""Streamed pre-training data (``data.streaming: true``) against the in-memory path.

The reference is :func:`bulkfm.train.data.prepare_pretrain_data` on the same file read
into memory: a streamed run must choose the same genes, fit the same tokenizer and
trivial predictor, and draw the same batches, so it trains the same model.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

from bulkfm.errors import ConfigError, ExpressionValueError
from bulkfm.train import stream
from bulkfm.train.data import (
    load_adata,
    prepare_pretrain_data,
)
from bulkfm.train.pretrain import pretrain, read_log
from bulkfm.train.stream import DiskMatrix, StreamingTokens, prepare_streaming_data
from tests.train.stream_checks import assert_two_ranks_match_in_memory


def _write(tmp_path, simulated_adata, *, sparse: bool = False, n: int = 60, g: int = 24):
    """A .h5ad with a missing layer: gene 0 unmeasured in half the samples (so the
    measured-fraction rule drops it) and scattered missing entries elsewhere."""
    adata = simulated_adata(n=n, g=g)
    rng = np.random.default_rng(3)
    missing = rng.random(adata.shape) < 0.03
    missing[: n // 2, 0] = True
    adata.X[missing] = 0.0
    adata.layers["missing"] = missing
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    path = tmp_path / ("sparse.h5ad" if sparse else "dense.h5ad")
    adata.write_h5ad(path)
    return path


def _data_config(pretrain_config, tmp_path, path, **data):
    config = pretrain_config(tmp_path / "run")
    section = dataclasses.replace(config.data, path=str(path), **data)
    return dataclasses.replace(config, data=section)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_streamed_data_equal_the_in_memory_data(
    tmp_path, simulated_adata, pretrain_config, sparse
) -> None:
    path = _write(tmp_path, simulated_adata, sparse=sparse)
    config = _data_config(pretrain_config, tmp_path, path, min_measured_fraction=0.9)
    ref = prepare_pretrain_data(load_adata(path), config.data, seed=4)
    got = prepare_streaming_data(config.data, seed=4)

    assert isinstance(got.tokens, StreamingTokens)
    assert got.genes == ref.genes and len(ref.genes) == 16
    assert "ENSG00000000000" not in got.genes  # dropped by the measured-fraction rule
    np.testing.assert_array_equal(got.train_idx, ref.train_idx)
    np.testing.assert_array_equal(got.eval_idx, ref.eval_idx)
    assert got.tokenizer.normalization_factor == ref.tokenizer.normalization_factor
    np.testing.assert_array_equal(got.tokens[np.arange(60)], ref.tokens)
    assert got.tokens[7].dtype == ref.tokens.dtype
    np.testing.assert_array_equal(got.tokens[7], ref.tokens[7])
    np.testing.assert_array_equal(got.gene_mode, ref.gene_mode)
    np.testing.assert_array_equal(got.gene_log_prob, ref.gene_log_prob)
    assert got.sample_ids == ref.sample_ids
    assert ref.info["missing_fraction"] > 0
    assert {k: v for k, v in got.info.items() if k != "streamed_from"} == ref.info
    assert got.gene_selection is not None and ref.gene_selection is not None
    assert got.gene_selection.excluded.equals(ref.gene_selection.excluded)


def test_fitting_reads_bounded_blocks(tmp_path, simulated_adata, pretrain_config, monkeypatch):
    """No pass reads more than one block of rows at a time (memory flat in samples)."""
    path = _write(tmp_path, simulated_adata, n=300, g=12)
    config = _data_config(pretrain_config, tmp_path, path, top_k_variable_genes=8)
    monkeypatch.setattr(stream, "_CHUNK_ROWS", 32)
    monkeypatch.setattr(stream, "_UNIT_SAMPLE", 32)
    largest: list[int] = []
    original = DiskMatrix.__getitem__

    def spy(self, rows):
        largest.append(int(np.size(rows)))
        return original(self, rows)

    monkeypatch.setattr(DiskMatrix, "__getitem__", spy)
    monkeypatch.setattr("bulkfm.train.data._ROW_CHUNK", 32)
    data = prepare_streaming_data(config.data, seed=0)
    assert data.n_train + data.n_eval == 300
    assert largest and max(largest) <= 32


def test_disk_matrix_reads_any_rows_like_numpy(tmp_path, simulated_adata) -> None:
    adata = simulated_adata(n=50, g=6)
    path = tmp_path / "m.h5ad"
    adata.write_h5ad(path)
    matrix = DiskMatrix(path, "X")
    X = np.asarray(adata.X)
    for rows in ([3, 4, 5], [40, 2, 2, 17], [0, 49], [9]):  # slab, fancy, far apart
        np.testing.assert_array_equal(matrix[np.array(rows)], X[rows])
    np.testing.assert_array_equal(matrix[np.int64(11)], X[11])
    copy = pickle.loads(pickle.dumps(matrix))  # as a spawned data-loader worker gets it
    np.testing.assert_array_equal(copy[np.array([1, 30])], X[[1, 30]])


def test_batches_equal_in_memory_ones_on_two_ranks_and_two_workers(
    tmp_path, simulated_adata, pretrain_config
) -> None:
    path = _write(tmp_path, simulated_adata)
    config = _data_config(pretrain_config, tmp_path, path)
    ref = prepare_pretrain_data(load_adata(path), config.data, seed=1)
    got = prepare_streaming_data(config.data, seed=1)
    assert_two_ranks_match_in_memory(got, ref)


@pytest.mark.usefixtures("one_torch_thread")
def test_streamed_run_trains_the_in_memory_model_and_resumes(
    tmp_path, simulated_adata, pretrain_config
) -> None:
    path = _write(tmp_path, simulated_adata)

    def run(name: str, streaming: bool, **kw):
        config = pretrain_config(tmp_path / name)
        config.data.path = str(path)
        config.data.streaming = streaming
        return pretrain(config, handle_signals=False, **kw)

    ref, streamed = run("memory", False), run("stream", True)
    log_ref, log_stream = read_log(ref.log_path), read_log(streamed.log_path)
    for a, b in zip(log_ref, log_stream, strict=True):
        assert {k: v for k, v in a.items() if k != "elapsed_s"} == {
            k: v for k, v in b.items() if k != "elapsed_s"
        }
    weights = load_file(str(tmp_path / "memory" / "final" / "model.safetensors"))
    assert weights["lm_head.bias"].abs().max() > 1e-3  # trained: the comparison is not vacuous
    for folder in ("stream",):
        other = load_file(str(tmp_path / folder / "final" / "model.safetensors"))
        assert all(torch.equal(weights[k], other[k]) for k in weights)

    first = run("killed", True, stop_after=3)
    assert first.stopped_early and first.step == 3
    resumed = run("killed", True, resume=True)
    assert resumed.resumed_from == 2  # checkpoint_every = 2: the last one before the kill
    other = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    for key in weights:
        torch.testing.assert_close(other[key], weights[key], rtol=0, atol=1e-6)


def test_bad_streaming_input_says_what_to_change(
    tmp_path, simulated_adata, pretrain_config
) -> None:
    path = _write(tmp_path, simulated_adata)
    config = pretrain_config(tmp_path / "run")
    config.data.streaming = True
    with pytest.raises(ConfigError, match=r"data\.path"):
        prepare_streaming_data(config.data, seed=0)
    with pytest.raises(ConfigError, match=r"data\.streaming=false"):
        pretrain(config, adata=simulated_adata(), handle_signals=False)
    config.data.path = str(path)
    config.data.layer = "counts"
    with pytest.raises(ConfigError, match=r"data\.layer 'counts'"):
        prepare_streaming_data(config.data, seed=0)

    adata = simulated_adata(n=60, g=24)
    adata.X[5, 3] = np.nan
    adata.write_h5ad(tmp_path / "nan.h5ad")
    config.data.path, config.data.layer = str(tmp_path / "nan.h5ad"), None
    config.data.top_k_variable_genes = None
    with pytest.raises(ExpressionValueError, match="NaN"):
        prepare_streaming_data(config.data, seed=0)
    with pytest.raises(ValueError, match=r"data\.streaming"):
        dataclasses.replace(config.data, streaming="yes")


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_two_streaming_processes_with_workers_train_the_one_process_model(
    tmp_path, simulated_adata, pretrain_config
) -> None:
    """torchrun, 2 gloo processes, each with a data-loader worker reading the file."""
    import json
    import os
    import subprocess
    import sys

    path = _write(tmp_path, simulated_adata, n=40, g=20)

    def config_for(name: str, micro: int, streaming: bool):
        config = pretrain_config(tmp_path / name, micro_batch_size=micro, max_steps=5)
        config.data.path, config.data.streaming = str(path), streaming
        config.num_workers = 1 if streaming else 0
        return config

    single = pretrain(config_for("one", 4, False), handle_signals=False)
    yaml = tmp_path / "two.yaml"
    yaml.write_text(config_for("two", 2, True).to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "bulkfm.cli", "pretrain", "--config", str(yaml)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == single.global_batch_size
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)
    for ra, rb in zip(
        read_log(single.log_path), read_log(tmp_path / "two" / "log.csv"), strict=True
    ):
        for key in ("loss", "eval_loss", "eval_acc"):
            if ra[key] is not None:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4), (ra["step"], key)
