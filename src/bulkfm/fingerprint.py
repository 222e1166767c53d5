"""Stable hashes of configurations and data, used to key caches and record runs.

A cached embedding is only valid for the exact samples, genes and values it was
computed from, so the data fingerprint covers sample ids, gene ids, every value
of ``X`` and the missing-gene mask (which changes what BulkRNABert sees).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from bulkfm import schema as keys

if TYPE_CHECKING:
    import anndata as ad

__all__ = ["array_checksum", "data_fingerprint", "ids_hash", "path_digest", "stable_hash"]

_DIGEST = 16
# Rows per hashing chunk: bounds the temporary contiguous copy of a large matrix.
_CHUNK_ROWS = 256


def _hasher() -> Any:
    return hashlib.blake2b(digest_size=_DIGEST)


def stable_hash(obj: Any) -> str:
    """Hex digest of a JSON-able object; key order does not matter."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    h = _hasher()
    h.update(text.encode())
    return h.hexdigest()


def path_digest(path: str | os.PathLike) -> str:
    """Digest of a file, or of the names and contents of the files directly in a folder.

    Keys caches of models read from disk (checkpoints, embedding files), so retraining
    into the same folder never reuses stale embeddings.
    """
    from bulkfm.errors import InputFileError

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise InputFileError(f"folder {path} is empty: pass the folder holding the files")
    elif path.is_file():
        files = [path]
    else:
        raise InputFileError(f"{path} not found: check the path")
    h = _hasher()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def ids_hash(ids: Iterable[Any]) -> str:
    """Digest of an ordered list of ids (order matters: rows are positional)."""
    h = _hasher()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()


def _update_array(h: Any, arr: np.ndarray) -> None:
    arr = np.asarray(arr)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    if arr.ndim < 2:
        h.update(np.ascontiguousarray(arr).tobytes())
        return
    for start in range(0, arr.shape[0], _CHUNK_ROWS):
        h.update(np.ascontiguousarray(arr[start : start + _CHUNK_ROWS]).tobytes())


def array_checksum(X: Any) -> str:
    """Digest of a dense or sparse matrix's dtype, shape and values."""
    h = _hasher()
    if sp.issparse(X):
        csr = sp.csr_matrix(X)
        csr.sort_indices()
        h.update(f"csr{csr.shape}".encode())
        for part in (csr.data, csr.indices, csr.indptr):
            _update_array(h, part)
    else:
        _update_array(h, np.asarray(X))
    return h.hexdigest()


def data_fingerprint(adata: ad.AnnData) -> str:
    """Digest of sample ids, gene ids, ``X`` and ``layers['missing']`` (if any)."""
    parts = {
        "obs": ids_hash(adata.obs_names),
        "var": ids_hash(adata.var_names),
        "X": array_checksum(adata.X),
        "missing": (
            array_checksum(adata.layers[keys.MISSING]) if keys.MISSING in adata.layers else None
        ),
    }
    return stable_hash(parts)
