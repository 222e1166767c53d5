"""Where outputs go: checked before any work, then written atomically.

* :func:`check_output_file` and :func:`check_output_dir` say, before a command starts
  working, whether it can write where it was told to: not a folder where a file is
  expected (or the reverse), not under a regular file, not in a place without write
  access (``/proc``, a read-only mount), and with a suffix the command can write. Every
  CLI handler calls them right after parsing, and the library functions that take an
  output path call them first, so a notebook user gets the same early error.
* :func:`atomic_path` writes beside the target and renames into place: a file is either
  fully written or not there at all. The temporary file is created like ``open()``
  creates a file, so outputs get the permissions the user's umask gives (an existing
  target keeps its mode).
* A writer killed with ``kill -9`` leaves its temporary file behind. Temporary files are
  named ``.<name>.bulkfm-<pid>-<host>-<random>.tmp``, and the next write to the same
  target removes the ones that are stale: written on this host by a process that no
  longer runs, or (any host, and the older unnamed ``.<name>.<random>.tmp`` form) not
  modified for :data:`STALE_TEMP_AGE_S` seconds. A live writer's file is never touched.
* :func:`output_dir` creates an output folder for a run and, when the run fails, removes
  the folders it created as long as they hold no file; a folder that existed before is
  never removed, and no file is ever deleted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bulkfm.errors import OutputPathError

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

__all__ = [
    "H5AD_SUFFIXES",
    "STALE_TEMP_AGE_S",
    "atomic_path",
    "check_output_dir",
    "check_output_file",
    "output_dir",
    "plain_record",
    "write_h5ad",
    "write_text",
]

#: A temporary file not modified for this long (one day) is stale whoever wrote it.
STALE_TEMP_AGE_S = 24 * 3600

_TEMP_MARK = "bulkfm"
# errno values that mean "the place is full": worth a named error, not a traceback.
_FULL = {errno.ENOSPC, errno.EDQUOT} if hasattr(errno, "EDQUOT") else {errno.ENOSPC}


# --------------------------------------------------------------------------- checks
def check_output_file(
    path: str | os.PathLike,
    *,
    flag: str | None = None,
    suffixes: Sequence[str] | None = None,
) -> Path:
    """``path`` as a :class:`~pathlib.Path` if a file can be written there; else
    :class:`~bulkfm.errors.OutputPathError`. Creates nothing.

    ``flag`` names what the user set, as the message's fix: ``"--output"``, or for a
    library function both spellings, e.g. ``"--out / out_dir="``. ``suffixes``
    (lower case, with the dot) are the endings the caller can write. Missing parent
    folders are fine (they are created when writing); the nearest existing one must be a
    folder this process can create files in.
    """
    path = Path(path)
    if path.is_dir():
        example = path / f"out{suffixes[0] if suffixes else ''}"
        raise OutputPathError(
            f"{_what('file', path, flag)} is an existing folder, but a file name is expected; "
            + _fix(flag, f"a file name, e.g. {example}")
        )
    if suffixes is not None and path.suffix.lower() not in suffixes:
        good = path.with_suffix(suffixes[0]).name if path.name else f"out{suffixes[0]}"
        raise OutputPathError(
            f"{_what('file', path, flag)}: this command writes only files ending with "
            f"{' or '.join(suffixes)}, got {path.suffix or 'no suffix'!r}; "
            + _fix(flag, f"a name with one of those suffixes, e.g. {good}")
        )
    _check_can_create_in(path.parent, path, flag, what="file")
    return path


def check_output_dir(path: str | os.PathLike, *, flag: str | None = None) -> Path:
    """``path`` as a :class:`~pathlib.Path` if it can be (or is) a folder this process
    can write in; else :class:`~bulkfm.errors.OutputPathError`. Creates nothing.
    ``flag`` as in :func:`check_output_file`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(
            f"{_what('folder', path, flag)} is an existing file, but a folder is expected; "
            + _fix(flag, "a folder path (a new folder is created)")
            + ", or move the file away"
        )
    _check_can_create_in(path, path, flag, what="folder")
    return path


def _what(kind: str, path: Path, flag: str | None) -> str:
    """``output file x.h5ad (set by --output)``: what the message is about."""
    return f"output {kind} {path}" + (f" (set by {flag})" if flag else "")


def _fix(flag: str | None, what: str) -> str:
    """How to fix it: ``give --output <what>`` (``give <what>`` without a flag)."""
    return f"give {flag} {what}" if flag else f"give {what}"


def _nearest_existing(path: Path) -> Path:
    current = Path(os.path.abspath(path))
    while not os.path.lexists(current) and current != current.parent:
        current = current.parent
    return current


def _check_can_create_in(folder: Path, target: Path, flag: str | None, *, what: str) -> None:
    """``folder`` (or its nearest existing ancestor) is a folder we can create files in."""
    anchor = _nearest_existing(folder)
    if not anchor.is_dir():
        raise OutputPathError(
            f"{_what(what, target, flag)}: {anchor} is a file, not a folder, so nothing can "
            "be created under it; " + _fix(flag, f"a {what} path inside a folder")
        )
    probe = anchor / f".{_TEMP_MARK}-write-check-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise OutputPathError(
            f"{_what(what, target, flag)}: cannot create files in {anchor} "
            f"({exc.strerror or exc}); " + _fix(flag, f"a {what} path in a place you can write to")
        ) from exc
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


# --------------------------------------------------------------------------- folders
@contextlib.contextmanager
def output_dir(path: str | os.PathLike, *, flag: str | None = None) -> Iterator[Path]:
    """Check ``path`` (:func:`check_output_dir`), create it and yield it; if the body
    raises, remove the folders this call created that hold no file, so a run that fails
    early leaves nothing behind. Folders that existed before and files are never removed.
    """
    path = check_output_dir(path, flag=flag)
    anchor = _nearest_existing(path)
    absolute = Path(os.path.abspath(path))
    top = None if absolute == anchor else anchor / absolute.relative_to(anchor).parts[0]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(
            f"{_what('folder', path, flag)}: cannot create it ({exc.strerror or exc}); "
            + _fix(flag, "a folder path in a place you can write to")
        ) from exc
    try:
        yield path
    except BaseException:
        if top is not None:
            _remove_empty_tree(top)
        raise


def _remove_empty_tree(top: Path) -> None:
    """Remove ``top`` and the folders under it, bottom up, where they are empty."""
    for root, _dirs, _files in os.walk(top, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(root)


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, flag: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only on success.

    The temporary file lives in the same folder, so the final ``os.replace`` is atomic
    on POSIX. It is created with mode ``0o666`` less the umask (an existing ``path``
    lends it its mode), as ``open()`` would. On any exception it is removed and ``path``
    is left untouched; stale temporary files of earlier, killed writes of ``path`` are
    removed first (see the module docstring). Problems with the place (a folder where
    the file should go, a parent that is a file, no write access, a full disk) raise
    :class:`~bulkfm.errors.OutputPathError` naming ``flag``.
    """
    path = Path(path)
    if path.is_dir():
        check_output_file(path, flag=flag)  # raises: a folder where a file is expected
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        tmp_path = _create_temp(path)
    except OSError as exc:
        check_output_file(path, flag=flag)  # names the cause when it can
        raise _write_error(path, flag, exc) from exc
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno in _FULL or isinstance(exc, IsADirectoryError):
            raise _write_error(path, flag, exc) from exc
        raise
    finally:
        if os.path.lexists(tmp_path):
            with contextlib.suppress(OSError):
                tmp_path.unlink()


def _write_error(path: Path, flag: str | None, exc: OSError) -> OutputPathError:
    return OutputPathError(
        f"{_what('file', path, flag)}: cannot write it ({exc.strerror or exc}); free "
        "space, or " + _fix(flag, "another location")
    )


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _create_temp(path: Path) -> Path:
    """A new empty ``.<name>.bulkfm-<pid>-<host>-<random>.tmp`` beside ``path``."""
    for _ in range(100):
        name = f".{path.name}.{_TEMP_MARK}-{os.getpid()}-{_host_tag()}-{secrets.token_hex(4)}.tmp"
        tmp = path.with_name(name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            with contextlib.suppress(OSError):
                os.chmod(fd, stat.S_IMODE(os.stat(path).st_mode))  # keep an existing mode
        finally:
            os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path))


def _temp_patterns(name: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    escaped = re.escape(name)
    ours = re.compile(rf"\.{escaped}\.{_TEMP_MARK}-(\d+)-([0-9a-f]{{8}})-[0-9a-f]+\.tmp")
    legacy = re.compile(rf"\.{escaped}\.[a-z0-9_]{{8}}\.tmp")  # tempfile.mkstemp's names
    return ours, legacy


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files of earlier, killed writes of ``path`` (see module doc)."""
    ours, legacy = _temp_patterns(path.name)
    prefix = f".{path.name}."
    now = time.time()
    with os.scandir(path.parent) as entries:
        stale = []
        for entry in entries:
            if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
                continue
            match = ours.fullmatch(entry.name)
            if match is None and legacy.fullmatch(entry.name) is None:
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            old = now - info.st_mtime > STALE_TEMP_AGE_S
            dead = (
                match is not None
                and match.group(2) == _host_tag()
                and not _pid_alive(int(match.group(1)))
            )
            if old or dead:
                stale.append(entry.path)
    for name in stale:
        with contextlib.suppress(OSError):
            os.unlink(name)
            logger.info("removed %s, left by an interrupted write of %s", name, path)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (unknown counts as running)."""
    if pid == os.getpid() or os.name != "posix":
        return True  # on Windows os.kill(pid, 0) would terminate the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. PermissionError: it exists, another user's
    return True


# --------------------------------------------------------------------------- writers
H5AD_SUFFIXES = (".h5ad",)


#: Target size of one HDF5 chunk of a dense matrix written by :func:`write_h5ad`.
ROW_CHUNK_BYTES = 1 << 20


def row_chunks(n_obs: int, n_vars: int, itemsize: int = 4) -> tuple[int, int]:
    """The HDF5 chunk shape :func:`write_h5ad` gives a dense ``n_obs x n_vars`` matrix:
    whole rows, as many as fit in :data:`ROW_CHUNK_BYTES` (at least one).

    Readers that take samples one at a time or in row blocks (streamed pre-training,
    ``bulkfm embed``) then decompress about one chunk per sample. h5py's own chunking
    of a compressed matrix cuts it into tiles of a few hundred rows x a few hundred
    genes: reading one sample of 19,062 genes then decompresses ~128 tiles of ~250
    rows each, 14x slower per sample (``benchmarks/train_speed.py --loader-source
    gzip``).
    """
    rows = ROW_CHUNK_BYTES // max(1, n_vars * itemsize)
    return (max(1, min(n_obs, rows)), max(1, n_vars))


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike, *, flag: str | None = None) -> Path:
    """Write ``adata`` to ``path`` atomically (compressed h5ad); ``path`` must end with
    ``.h5ad``, so no other format's name holds HDF5.

    Dense ``X`` and dense layers are stored in chunks of whole rows (:func:`row_chunks`)
    so that reading one sample decompresses one small chunk; everything else is written
    by anndata as usual, gzip-compressed."""
    path = Path(path)
    if path.suffix.lower() not in H5AD_SUFFIXES:
        check_output_file(path, flag=flag, suffixes=H5AD_SUFFIXES)
    with atomic_path(path, flag=flag) as tmp:
        _write_row_chunked(adata, tmp)
    return path


def _write_row_chunked(adata: ad.AnnData, path: Path) -> None:
    import anndata as ad
    import h5py  # type: ignore[import-untyped]
    import numpy as np

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    def dense(value: Any) -> bool:
        return isinstance(value, np.ndarray) and value.ndim == 2 and value.size > 0

    matrices = {"X": adata.X} if dense(adata.X) else {}
    matrices.update({f"layers/{k}": v for k, v in adata.layers.items() if dense(v)})
    if not matrices:
        adata.write_h5ad(path, compression="gzip")
        return
    adata.strings_to_categoricals()  # what AnnData.write_h5ad does to the object it writes
    shell = ad.AnnData(
        X=None if "X" in matrices else adata.X,
        obs=adata.obs,
        var=adata.var,
        uns=adata.uns,
        obsm=adata.obsm,
        varm=adata.varm,
        obsp=adata.obsp,
        varp=adata.varp,
        layers={k: v for k, v in adata.layers.items() if f"layers/{k}" not in matrices},
    )
    if adata.raw is not None:
        shell.raw = adata.raw
    shell.write_h5ad(path, compression="gzip")
    with h5py.File(path, "a") as f:
        for key, value in matrices.items():
            n_obs, n_vars = value.shape
            chunks = row_chunks(n_obs, n_vars, itemsize=value.dtype.itemsize)
            write_elem(f, key, value, dataset_kwargs={"compression": "gzip", "chunks": chunks})


def plain_record(value: Any) -> Any:
    """``value`` as plain Python that h5ad (``uns``) and JSON both store faithfully.

    Provenance records are built from numpy and pandas results, and those types either
    fail to write (tuples, lists holding None or dicts) or come back as text that other
    tools cannot read (``"['TP53' 'KRAS']"`` once something calls ``str`` on an array).
    This converts recursively: mappings -> dicts with ``str`` keys; numpy arrays, pandas
    Series/Index, tuples, lists and sets -> lists; numpy scalars -> Python scalars;
    paths -> ``str``; pandas NA -> ``None``. A list that h5ad cannot hold as one array
    (items mixing types, ``None`` items, nested records) becomes a dict keyed by
    position ("0", "1", ...), so nothing is lost or re-typed.
    """
    import numpy as np

    if isinstance(value, Mapping):
        return {str(k): plain_record(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return plain_record(value.tolist())
    if hasattr(value, "to_numpy") and hasattr(value, "__len__") and not isinstance(value, str):
        return plain_record(list(value.to_numpy()))  # pandas Series / Index / arrays
    if isinstance(value, set | frozenset):
        return plain_record(sorted(value, key=str))
    if isinstance(value, list | tuple):
        items = [plain_record(v) for v in value]
        return items if _one_array(items) else {str(i): v for i, v in enumerate(items)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is not None and not isinstance(value, str | bool | int | float):
        try:
            import pandas as pd

            if value is pd.NA or value is pd.NaT:
                return None
        except ImportError:  # pragma: no cover - pandas is a dependency
            pass
    return value


def _one_array(items: list[Any]) -> bool:
    """Whether h5ad stores ``items`` as one array: all text, all bools, all numbers, or
    equal-length lists of numbers (a matrix)."""
    if not items:
        return True
    if all(isinstance(v, str) for v in items) or all(isinstance(v, bool) for v in items):
        return True
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
        return True
    if all(isinstance(v, list) for v in items):
        lengths = {len(v) for v in items}
        return len(lengths) == 1 and all(
            isinstance(x, int | float) and not isinstance(x, bool) for v in items for x in v
        )
    return False


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write text atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
