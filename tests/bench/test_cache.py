from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from bulkfm.bench.cache import EmbeddingCache
from bulkfm.embedders.base import Embedder
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


# --------------------------------------------------------------------------- concurrency
class Noted(Embedder):
    """A frozen model whose cache record carries a note, taken back on a cache hit: a hit
    that returns one writer's array with another writer's record is then visible."""

    name = "noted"

    def __init__(self, note: str) -> None:
        super().__init__()
        self.note = note
        self.restored: str | None = None

    def transform(self, adata):  # type: ignore[no-untyped-def]
        raise AssertionError("the concurrency test never embeds")

    def describe(self) -> dict:
        return {**super().describe(), "note": self.note}

    def restore(self, described: dict) -> None:
        self.restored = described.get("note")


N_ROWS = 300


def _writer_arrays() -> dict[str, np.ndarray]:
    """What each writer saves under the same key (same model and data fingerprints)."""
    rng = np.random.default_rng(7)
    return {w: rng.normal(size=(N_ROWS, 64)).astype(np.float32) for w in ("a", "b")}


def _hammer(directory: str, note: str, rounds: int) -> tuple[int, int, list[str]]:
    """Save this writer's array and load the entry back, ``rounds`` times; returns hits,
    misses and every load that was not one writer's full array with its own record."""
    cache = EmbeddingCache(directory)
    arrays = _writer_arrays()
    hits, misses, bad = 0, 0, []
    for i in range(rounds):
        cache.save(Noted(note), "data", arrays[note])
        reader = Noted("reader")
        got = cache.load(reader, "data", N_ROWS)
        if got is None:
            misses += 1
        elif reader.restored in arrays and np.array_equal(got, arrays[reader.restored]):
            hits += 1
        else:
            bad.append(f"round {i}: record of {reader.restored!r}, array of neither/other")
    return hits, misses, bad


def test_concurrent_writers_and_readers_never_see_a_mixed_entry(tmp_path) -> None:
    """Two processes save different arrays under one key and read it back, many times:
    each read is a miss or one writer's complete array with that writer's record."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        jobs = [pool.submit(_hammer, str(tmp_path), note, 300) for note in ("a", "b")]
        results = [job.result(timeout=600) for job in jobs]
    bad = [b for _, _, found in results for b in found]
    assert not bad, bad[:5]
    assert sum(hits for hits, _, _ in results) > 0  # the reads did find entries
    assert not list(tmp_path.glob(".*.tmp"))  # every temporary file renamed or removed


def test_an_array_that_does_not_match_its_record_is_a_miss(sim, tmp_path) -> None:
    cache = EmbeddingCache(tmp_path)
    model = RawEmbedder(n_top_genes=5)
    fp = data_fingerprint(sim)
    npy = cache.save(model, fp, np.zeros((sim.n_obs, 5), np.float32))
    np.save(npy, np.ones((sim.n_obs, 5), np.float32))  # a whole array, another writer's
    assert cache.load(model, fp, sim.n_obs) is None


# --------------------------------------------------------------------------- the entry lock
class Counting(Embedder):
    """A frozen model that notes each computation in a file (one line per call, from any
    process) and takes long enough that two processes missing at once overlap."""

    name = "counting"

    def __init__(self, counter: str, seconds: float = 1.5) -> None:
        super().__init__()
        self.counter = counter
        self.seconds = seconds

    def transform(self, adata):  # type: ignore[no-untyped-def]
        with open(self.counter, "a") as fh:  # O_APPEND: lines of two processes do not mix
            fh.write(f"{os.getpid()}\n")
        time.sleep(self.seconds)
        x = np.log1p(np.asarray(adata.X, dtype=np.float64))
        return x @ np.random.default_rng(0).normal(size=(x.shape[1], 4))


def _small_adata():  # type: ignore[no-untyped-def]
    import anndata as ad

    x = np.random.default_rng(1).gamma(2.0, 10.0, size=(30, 12)).astype(np.float32)
    return ad.AnnData(x, obs={"id": [f"S{i}" for i in range(30)]})


def _wait_for(paths: list[Path], seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other process never became ready: {paths}")
        time.sleep(0.01)


def _embed_through_bench(cache_dir: str, counter: str, me: str, other: str) -> np.ndarray:
    """One bench process: say it is ready, wait for the other, then embed the same data
    with the same model through the runner's cache path."""
    from bulkfm.bench.runner import _frozen_embedding

    adata = _small_adata()
    folder = Path(cache_dir).parent
    (folder / me).touch()
    _wait_for([folder / other])
    return _frozen_embedding(
        Counting(counter), adata, data_fingerprint(adata), EmbeddingCache(cache_dir)
    )


def test_two_processes_missing_one_entry_compute_it_once(tmp_path) -> None:
    """Both miss at the same moment; one computes under the lock, the other waits and
    reads that entry: one computation, the same array in both."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cache_dir, counter = tmp_path / "cache", tmp_path / "calls.txt"
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        jobs = [
            pool.submit(_embed_through_bench, str(cache_dir), str(counter), me, other)
            for me, other in (("a", "b"), ("b", "a"))
        ]
        a, b = (job.result(timeout=600) for job in jobs)
    calls = counter.read_text().split()
    assert len(calls) == 1, f"computed {len(calls)} times, by processes {calls}"
    np.testing.assert_array_equal(a, b)
    # what was computed is what a third, independent computation gives (stored as float32)
    adata = _small_adata()
    direct = Counting(str(tmp_path / "direct.txt"), seconds=0).transform(adata)
    np.testing.assert_allclose(a, direct.astype(np.float32), rtol=1e-6)
    assert len(list(cache_dir.glob("*.npy"))) == 1


def _hold_lock_until_killed(cache_dir: str, counter: str, ready: str) -> None:
    adata = _small_adata()
    cache = EmbeddingCache(cache_dir)
    with cache.lock(Counting(counter), data_fingerprint(adata)):
        Path(ready).touch()
        time.sleep(600)


def test_a_lock_held_by_a_killed_process_does_not_block(tmp_path) -> None:
    """A live holder makes a short wait time out with a clear error; once the holder is
    killed (SIGKILL: no clean-up of its own), the entry is computed at once."""
    import multiprocessing

    from bulkfm.bench.runner import _frozen_embedding
    from bulkfm.errors import LockTimeoutError

    cache_dir, counter, ready = tmp_path / "cache", tmp_path / "calls.txt", tmp_path / "ready"
    holder = multiprocessing.get_context("spawn").Process(
        target=_hold_lock_until_killed, args=(str(cache_dir), str(counter), str(ready))
    )
    holder.start()
    try:
        _wait_for([ready])
        adata = _small_adata()
        fp = data_fingerprint(adata)
        model = Counting(str(counter), seconds=0)
        with pytest.raises(LockTimeoutError, match=r"another live process holds its lock"):
            EmbeddingCache(cache_dir, lock_timeout=0.3).load_or_compute(
                model, fp, adata.n_obs, lambda: model.transform(adata)
            )
        assert not counter.exists()  # waiting is not computing
    finally:
        holder.kill()
        holder.join(30)
    assert holder.exitcode == -signal.SIGKILL
    assert list(cache_dir.glob("*.lock"))  # the lock file stays; the lock does not
    emb = _frozen_embedding(model, adata, fp, EmbeddingCache(cache_dir, lock_timeout=30))
    assert emb.shape == (adata.n_obs, 4)
    assert len(counter.read_text().split()) == 1
