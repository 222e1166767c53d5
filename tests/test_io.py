"""bulkfm.io: output places checked before work, atomic writes with umask permissions,
stale temporary files of killed writers cleaned, failed runs leave no empty folders."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from bulkfm import io
from bulkfm.errors import ConfigError, OutputPathError


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    before = os.umask(0o022)
    os.umask(before)
    yield lambda value: os.umask(value)
    os.umask(before)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- checks
def test_check_output_file_accepts_a_new_file_in_new_folders_and_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "out.h5ad"
    assert io.check_output_file(target, flag="--output", suffixes=(".h5ad",)) == target
    assert _entries(tmp_path) == []  # no folder, no probe file left


def test_check_output_file_refuses_a_folder(tmp_path):
    with pytest.raises(OutputPathError, match="is an existing folder") as info:
        io.check_output_file(tmp_path, flag="--output", suffixes=(".h5ad",))
    assert "--output" in str(info.value) and str(tmp_path / "out.h5ad") in str(info.value)


def test_check_output_file_refuses_a_path_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder") as info:
        io.check_output_file(tmp_path / "afile" / "sub" / "x.h5ad", flag="--output")
    assert "give --output" in str(info.value)


def test_check_output_file_refuses_other_suffixes_naming_the_accepted_ones(tmp_path):
    with pytest.raises(OutputPathError, match=r"writes only files ending with \.h5ad") as info:
        io.check_output_file(tmp_path / "x.parquet", flag="--output", suffixes=(".h5ad",))
    assert "--output" in str(info.value) and "x.h5ad" in str(info.value)
    assert isinstance(info.value, ConfigError)  # OutputPathError is a ConfigError
    io.check_output_file(tmp_path / "X.H5AD", suffixes=(".h5ad",))  # case-insensitive


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_check_output_refuses_proc(tmp_path):
    with pytest.raises(OutputPathError, match="cannot create files in /proc"):
        io.check_output_file("/proc/x.h5ad", flag="--output")
    with pytest.raises(OutputPathError, match="cannot create files in /proc"):
        io.check_output_dir("/proc/bench/out", flag="--out")


def test_check_output_refuses_a_folder_without_write_access(tmp_path, monkeypatch):
    real_open = os.open

    def deny(path, flags, mode=0o777, **kwargs):
        if Path(path).parent == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(OutputPathError, match=r"cannot create files in .*Permission denied"):
        io.check_output_dir(tmp_path / "new", flag="--out")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_refuses_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(OutputPathError, match="cannot create files in"):
            io.check_output_file(locked / "x.h5ad", flag="--output")
    finally:
        locked.chmod(0o700)


def test_check_output_dir_refuses_a_file_and_accepts_folders(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match="is an existing file, but a folder") as info:
        io.check_output_dir(tmp_path / "afile", flag="--out")
    assert "give --out a folder path" in str(info.value)
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        io.check_output_dir(tmp_path / "afile" / "run", flag="--out")
    assert io.check_output_dir(tmp_path) == tmp_path
    assert io.check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert _entries(tmp_path) == ["afile"]


# --------------------------------------------------------------------------- writes
def test_write_h5ad_refuses_a_non_h5ad_name(tmp_path):
    adata = ad.AnnData(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(OutputPathError, match=r"writes only files ending with \.h5ad"):
        io.write_h5ad(adata, tmp_path / "x.parquet", flag="--output")
    assert _entries(tmp_path) == []


def test_atomic_write_into_a_folder_is_a_named_error(tmp_path):
    (tmp_path / "out.txt").mkdir()
    with pytest.raises(OutputPathError, match="is an existing folder"):
        io.write_text("x", tmp_path / "out.txt")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        io.write_text("x", afile / "out.txt")


def test_a_full_disk_while_writing_is_a_named_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(OutputPathError, match="No space left"), io.atomic_path(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old"
    assert _entries(tmp_path) == ["out.txt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, umask, mask, mode):
    umask(mask)
    text = io.write_text("x", tmp_path / "out.txt")
    h5ad = io.write_h5ad(ad.AnnData(np.ones((2, 3), dtype=np.float32)), tmp_path / "o.h5ad")
    assert stat.S_IMODE(text.stat().st_mode) == mode
    assert stat.S_IMODE(h5ad.stat().st_mode) == mode


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_rewriting_a_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = io.write_text("x", tmp_path / "out.txt")
    target.chmod(0o600)
    io.write_text("y", target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_text() == "y"


# --------------------------------------------------------------------------- stale temps
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp(folder: Path, target: str, pid: int, host: str | None = None) -> Path:
    path = folder / f".{target}.bulkfm-{pid}-{host or io._host_tag()}-0a1b2c3d.tmp"
    path.write_text("partial")
    return path


def test_next_write_removes_temps_of_dead_writers_only(tmp_path):
    dead = _temp(tmp_path, "out.txt", _dead_pid())
    live = _temp(tmp_path, "out.txt", os.getppid())  # the parent runs: keep its temp
    other_host = _temp(tmp_path, "out.txt", _dead_pid(), host="00000000")
    other_target = _temp(tmp_path, "other.txt", _dead_pid())
    io.write_text("x", tmp_path / "out.txt")
    assert not dead.exists()
    assert live.exists() and other_host.exists() and other_target.exists()


def test_next_write_removes_temps_older_than_a_day(tmp_path):
    old_time = time.time() - io.STALE_TEMP_AGE_S - 60
    legacy_old = tmp_path / ".out.txt.abcd_123.tmp"  # tempfile.mkstemp's names
    legacy_new = tmp_path / ".out.txt.wxyz_789.tmp"
    other_host = _temp(tmp_path, "out.txt", 1, host="00000000")
    for path in (legacy_old, legacy_new):
        path.write_text("partial")
    for path in (legacy_old, other_host):
        os.utime(path, (old_time, old_time))
    io.write_text("x", tmp_path / "out.txt")
    assert not legacy_old.exists() and not other_host.exists()
    assert legacy_new.exists()  # may be a live writer of an older bulkfm


@pytest.mark.skipif(os.name != "posix", reason="kill -9")
def test_a_write_killed_with_sigkill_is_cleaned_by_the_next_write(tmp_path):
    target = tmp_path / "out.txt"
    script = (
        "import os, signal, sys\n"
        "from bulkfm.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('partial')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(target)], check=False)
    assert proc.returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.txt.bulkfm-")]
    assert len(left) == 1 and not target.exists()
    io.write_text("done", target)
    assert _entries(tmp_path) == ["out.txt"] and target.read_text() == "done"


# --------------------------------------------------------------------------- output_dir
def test_output_dir_removes_the_folders_it_created_when_the_run_fails(tmp_path):
    target = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError), io.output_dir(target, flag="--out") as out:
        assert out.is_dir()
        (out / "plots").mkdir()
        raise RuntimeError("failed early")
    assert _entries(tmp_path) == []


def test_output_dir_never_removes_existing_folders_or_files(tmp_path):
    existing = tmp_path / "mine"
    existing.mkdir()
    with pytest.raises(RuntimeError), io.output_dir(existing):
        raise RuntimeError("failed")
    assert existing.is_dir()
    with pytest.raises(RuntimeError), io.output_dir(tmp_path / "new" / "run") as out:
        io.write_text("kept", out / "partial.txt")
        (out / "empty").mkdir()
        raise RuntimeError("failed late")
    assert _entries(tmp_path / "new" / "run") == ["partial.txt"]


def test_output_dir_checks_before_creating(tmp_path):
    (tmp_path / "afile").write_text("x")
    with (
        pytest.raises(OutputPathError, match="is an existing file"),
        io.output_dir(tmp_path / "afile", flag="--out"),
    ):
        pass


# --------------------------------------------------------------------------- plain_record
def test_plain_record_survives_h5ad_and_json(tmp_path: Path) -> None:
    """Lists come back as arrays of the original items, never as numpy-printed text."""
    import json

    import pandas as pd

    record = {
        "genes": np.array(["TP53", "KRAS"], dtype=object),
        "tuple": ("a", "b"),
        "n": np.int64(3),
        "fraction": np.float32(0.5),
        "flag": np.bool_(True),
        "path": tmp_path / "x.tsv",
        "with_none": ["a", None],
        "records": [{"name": "x"}, {"name": "y"}],
        "matrix": np.arange(4).reshape(2, 2),
        "index": pd.Index(["g1", "g2"]),
        "na": pd.NA,
    }
    plain = io.plain_record(record)
    assert json.loads(json.dumps(plain)) == plain  # JSON-able as it is
    assert plain["genes"] == ["TP53", "KRAS"] and plain["tuple"] == ["a", "b"]
    assert plain["with_none"] == {"0": "a", "1": None}  # not re-typed to text
    adata = ad.AnnData(X=np.zeros((1, 1), dtype=np.float32), uns={"bulkfm": plain})
    back = ad.read_h5ad(io.write_h5ad(adata, tmp_path / "p.h5ad")).uns["bulkfm"]
    assert list(back["genes"]) == ["TP53", "KRAS"]
    assert list(back["tuple"]) == ["a", "b"]
    assert list(back["index"]) == ["g1", "g2"]
    assert back["n"] == 3 and back["fraction"] == 0.5 and bool(back["flag"]) is True
    assert back["path"] == str(tmp_path / "x.tsv")
    assert back["records"]["1"]["name"] == "y"
    np.testing.assert_array_equal(back["matrix"], [[0, 1], [2, 3]])
    assert back["with_none"]["0"] == "a"


def test_write_h5ad_stores_dense_matrices_in_chunks_of_whole_rows(tmp_path):
    """One sample read from disk decompresses one chunk (streaming, backed embed), and
    everything anndata wrote comes back unchanged."""
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    n_obs, n_vars = 120, 5000
    adata = ad.AnnData(
        rng.random((n_obs, n_vars), dtype=np.float32),
        obs=pd.DataFrame({"cohort": ["a", "b"] * 60}, index=[f"s{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_vars)]),
    )
    adata.layers["missing"] = rng.random((n_obs, n_vars)) < 0.1
    adata.layers["sparse"] = sp.random(n_obs, n_vars, density=0.01, format="csr", random_state=0)
    adata.obsm["emb"] = rng.random((n_obs, 3))
    adata.uns["bulkfm"] = {"note": "x"}
    path = io.write_h5ad(adata, tmp_path / "x.h5ad")
    with h5py.File(path) as f:
        for key, itemsize in (("X", 4), ("layers/missing", 1)):
            rows, cols = f[key].chunks
            assert cols == n_vars and f[key].compression == "gzip"
            assert rows == min(n_obs, io.ROW_CHUNK_BYTES // (n_vars * itemsize))
            assert (rows, cols) == io.row_chunks(n_obs, n_vars, itemsize)
        np.testing.assert_array_equal(f["X"][7], adata.X[7])
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.X, adata.X)
    np.testing.assert_array_equal(back.layers["missing"], adata.layers["missing"])
    assert (back.layers["sparse"] != adata.layers["sparse"]).nnz == 0
    np.testing.assert_array_equal(back.obsm["emb"], adata.obsm["emb"])
    assert back.uns["bulkfm"] == {"note": "x"}
    assert list(back.obs["cohort"]) == list(adata.obs["cohort"])
    assert io.row_chunks(3, 10**7) == (1, 10**7)  # a row wider than a chunk: one row


def test_write_h5ad_keeps_anndata_layout_for_sparse_and_empty_matrices(tmp_path):
    import scipy.sparse as sp

    sparse = ad.AnnData(sp.random(10, 20, density=0.2, format="csr", random_state=1))
    back = ad.read_h5ad(io.write_h5ad(sparse, tmp_path / "s.h5ad"))
    assert sp.issparse(back.X) and (back.X != sparse.X).nnz == 0
    empty = ad.AnnData(np.zeros((0, 4), dtype=np.float32))
    assert ad.read_h5ad(io.write_h5ad(empty, tmp_path / "e.h5ad")).shape == (0, 4)
