"""Sharded and out-of-core embedding: torchrun with 2 gloo processes writes what 1 writes.

The reference is the in-memory, one-process :func:`embed_adata`; the sharded run goes
through the real launcher (``python -m torch.distributed.run``) and the real CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bulkfm.distributed import gather_rows, process_group, row_block, share_error
from bulkfm.embed import embed_adata, embed_sharded, read_embeddings
from bulkfm.errors import ConfigError
from tests.cli.test_embed import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("n", "world"), [(7, 2), (7, 3), (2, 4), (0, 2), (100, 8), (5, 1)])
def test_row_blocks_are_disjoint_ordered_and_cover_all_rows(n, world):
    blocks = [row_block(n, r, world) for r in range(world)]
    covered = np.concatenate([np.arange(a, b) for a, b in blocks])
    np.testing.assert_array_equal(covered, np.arange(n))  # in order, once each
    sizes = [b - a for a, b in blocks]
    assert max(sizes) - min(sizes) <= 1
    np.testing.assert_array_equal(sizes, [len(s) for s in np.array_split(np.arange(n), world)])


def test_row_block_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        row_block(5, 2, 2)


def test_one_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert process_group() == (0, 1)
    block = np.arange(6.0).reshape(3, 2)
    assert gather_rows(block, 0, 1) is block
    share_error("ignored in one process", 0, 1)


def test_backed_rows_equal_in_memory_embedding(model, tokenizer, adata, input_h5ad):
    """A backed AnnData read in row blocks embeds like the in-memory one, rows included."""
    expected = embed_adata(model, tokenizer, adata, batch_size=3)
    backed = ad.read_h5ad(input_h5ad, backed="r")
    assert backed.isbacked
    whole = embed_adata(model, tokenizer, backed, batch_size=3)
    np.testing.assert_array_equal(whole, expected)
    part = embed_adata(model, tokenizer, backed, batch_size=3, rows=(2, 6))
    np.testing.assert_array_equal(part, expected[2:6])
    assert embed_adata(model, tokenizer, backed, rows=(4, 4)).shape == (0, expected.shape[1])
    assert embed_sharded(model, tokenizer, backed, batch_size=3).tolist() == expected.tolist()


def test_rows_out_of_range_name_the_fix(model, tokenizer, adata):
    with pytest.raises(ConfigError, match=r"rows=\(3, 9\) is not a range of the 7 samples"):
        embed_adata(model, tokenizer, adata, rows=(3, 9))


def _torchrun(argv: list[str], n: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    return subprocess.run(
        [*cmd, str(n), "-m", "bulkfm.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
def test_two_gloo_processes_write_what_one_writes(model, tokenizer, adata, checkpoint, tmp_path):
    """7 samples over 2 processes (blocks of 4 and 3): the .npy, the ids and the .parquet
    equal the one-process CLI bit for bit, and process 0 alone wrote them."""
    source = tmp_path / "in.h5ad"
    adata.write_h5ad(source)
    base = ["embed", "--model", str(checkpoint), "--input", str(source), "--batch-size", "3"]
    assert run_cli([*base, "--output", str(tmp_path / "one.npy")]) == 0

    proc = _torchrun([*base, "--output", str(tmp_path / "two.npy")], 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("embedded 7 samples") == 1  # rank 0 only
    one, two = read_embeddings(tmp_path / "one.npy"), read_embeddings(tmp_path / "two.npy")
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    np.testing.assert_allclose(two.to_numpy(), embed_adata(model, tokenizer, adata), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.h5ad",
        "one.ids.txt",
        "one.npy",
        "two.ids.txt",
        "two.npy",
    ]  # no temporary files left behind by either process

    proc = _torchrun([*base, "--output", str(tmp_path / "two.parquet")], 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    np.testing.assert_array_equal(
        pd.read_parquet(tmp_path / "two.parquet").to_numpy(), one.to_numpy()
    )


@pytest.mark.slow
def test_a_failing_input_stops_every_process_with_the_reason(adata, checkpoint, tmp_path):
    """A sample of process 1's block with every gene missing: both processes stop with the
    message that names it (no process left waiting in the gather), and nothing is written."""
    missing = adata.layers["missing"].toarray()
    missing[5] = True
    adata.layers["missing"] = missing
    source = tmp_path / "bad.h5ad"
    adata.write_h5ad(source)
    argv = ["embed", "--model", str(checkpoint), "--input", str(source), "--batch-size", "2"]
    proc = _torchrun([*argv, "--min-gene-coverage", "0", "--output", str(tmp_path / "e.npy")], 2)
    assert proc.returncode != 0
    assert proc.stderr.count("1 of 7 sample(s) have every model gene missing") == 2
    assert "['S5']" in proc.stderr
    assert not (tmp_path / "e.npy").exists()
