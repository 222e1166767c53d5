"""Embeddings computed elsewhere (any model, any framework), read from a file by sample id.

Formats: ``.parquet`` / ``.csv`` / ``.tsv`` (rows = samples; ids in the index or an
id column), ``.npy`` with a separate id list (``ids=`` a file with one id a line, or
a sequence; default ``<stem>.ids.txt`` beside it), and ``.h5ad`` (``obsm[key]``,
ids = ``obs_names``). Arrays are read with ``allow_pickle=False``: a file never
executes code. Rows are matched to the benchmark's samples by exact id; the overlap
is reported, and samples without an embedding are an error (an embedding of a
different sample set would silently change the task).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bulkfm.embedders.base import Embedder
from bulkfm.embedders.registry import register_embedder
from bulkfm.errors import ConfigError, DuplicateIdError, InputFileError
from bulkfm.fingerprint import path_digest, stable_hash

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

__all__ = ["PrecomputedEmbedder", "read_embedding_file"]

_ID_COLUMNS = ("sample_id", "sample", "id", "obs_names", "barcode", "identifier")
_FORMATS = ".parquet, .csv, .tsv (optionally .gz), .npy (+ ids), .h5ad"


def _read_ids(ids: str | os.PathLike | Sequence[str] | None, path: Path) -> list[str]:
    if ids is None:
        candidate = path.with_suffix(".ids.txt")
        if not candidate.exists():
            raise InputFileError(
                f"{path} is a bare array without sample ids; pass ids= (a file with one id a "
                f"line, in row order) or put them in {candidate}"
            )
        ids = candidate
    if isinstance(ids, str | os.PathLike):
        id_path = Path(ids)
        if not id_path.is_file():
            raise InputFileError(f"id file {id_path} not found; pass an existing file")
        return [line.strip() for line in id_path.read_text().splitlines() if line.strip()]
    return [str(i) for i in ids]


def _split_frame(df: pd.DataFrame, id_column: str | None, path: Path) -> tuple[list[str], Any]:
    if id_column is not None:
        if id_column not in df.columns:
            raise InputFileError(
                f"id column {id_column!r} not in {path} (columns: {list(df.columns)[:8]}...)"
            )
        return df[id_column].astype(str).tolist(), df.drop(columns=[id_column])
    lower = {str(c).lower(): c for c in df.columns}
    for name in _ID_COLUMNS:
        if name in lower:
            col = lower[name]
            return df[col].astype(str).tolist(), df.drop(columns=[col])
    if not isinstance(df.index, pd.RangeIndex):
        return df.index.astype(str).tolist(), df
    text = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if len(text) == 1:
        return df[text[0]].astype(str).tolist(), df.drop(columns=text)
    raise InputFileError(
        f"cannot tell which column of {path} holds the sample ids (looked for {_ID_COLUMNS} "
        "or a non-default index); pass id_column="
    )


def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return pd.read_parquet(path)
    sep = "\t" if ".tsv" in name or ".txt" in name else ","
    return pd.read_csv(path, sep=sep)


def read_embedding_file(
    path: str | os.PathLike,
    *,
    key: str | None = None,
    ids: str | os.PathLike | Sequence[str] | None = None,
    id_column: str | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(float64 matrix, sample ids) from an embedding file; checks shape, ids and values."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"embedding file {path} not found; pass one of: {_FORMATS}")
    name = path.name.lower()
    try:
        if name.endswith(".npy"):
            matrix = np.load(path, allow_pickle=False)
            row_ids = _read_ids(ids, path)
        elif name.endswith(".h5ad"):
            matrix, row_ids = _read_h5ad(path, key)
        elif name.endswith((".parquet", ".csv", ".tsv", ".csv.gz", ".tsv.gz", ".txt", ".txt.gz")):
            row_ids, values = _split_frame(_read_table(path), id_column, path)
            matrix = values.to_numpy()
        else:
            raise InputFileError(f"unknown embedding file type {path.name!r}; use {_FORMATS}")
    except (OSError, ValueError) as exc:
        if isinstance(exc, InputFileError):
            raise
        raise InputFileError(f"cannot read embeddings from {path}: {exc}") from exc
    return _checked(matrix, row_ids, path), row_ids


def _read_h5ad(path: Path, key: str | None) -> tuple[np.ndarray, list[str]]:
    import anndata as ad

    adata = ad.read_h5ad(path, backed="r")
    try:
        keys = list(adata.obsm.keys())
        if key is None:
            emb_keys = [k for k in keys if k.startswith("X_")] or keys
            if len(emb_keys) != 1:
                raise InputFileError(
                    f"{path} has obsm keys {keys}; pass key= to say which holds the embedding"
                )
            key = emb_keys[0]
        if key not in adata.obsm:
            raise InputFileError(f"{path} has no obsm[{key!r}]; obsm keys: {keys}")
        matrix = np.asarray(adata.obsm[key])
        return matrix, adata.obs_names.astype(str).tolist()
    finally:
        if adata.isbacked:
            adata.file.close()


def _checked(matrix: Any, row_ids: list[str], path: Path) -> np.ndarray:
    try:
        arr = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputFileError(
            f"embeddings in {path} are not all numeric ({exc}); keep only the id and the "
            "embedding columns"
        ) from exc
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InputFileError(
            f"embeddings in {path} must be a 2-D samples x dims array, got {arr.shape}"
        )
    if arr.shape[0] != len(row_ids):
        raise InputFileError(
            f"{path} has {arr.shape[0]} embedding rows but {len(row_ids)} ids; give one id per row"
        )
    dup = pd.Index(row_ids)[pd.Index(row_ids).duplicated()].unique()
    if len(dup):
        raise DuplicateIdError(
            f"{path} has {len(dup)} duplicated sample ids (e.g. {list(dup[:3])}); keep one "
            "embedding per sample"
        )
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        examples = [row_ids[i] for i in np.flatnonzero(bad)[:3]]
        raise InputFileError(
            f"embeddings in {path} have NaN or inf values in {int(bad.sum())} of {arr.shape[0]} "
            f"rows (e.g. {examples}); re-embed those samples or drop them from the data"
        )
    return arr


@register_embedder("precomputed")
class PrecomputedEmbedder(Embedder):
    """Rows of an embedding file, matched to the samples by id (see the module docstring)."""

    learns = False
    cacheable = False  # already on disk

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        key: str | None = None,
        ids: str | os.PathLike | Sequence[str] | None = None,
        id_column: str | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(label=label)
        if path is None:
            raise ConfigError(
                "the precomputed model needs an embedding file: --embeddings FILE (or "
                "NAME=FILE), or path= in Python"
            )
        self.path = Path(path)
        self.key = key
        self.id_column = id_column
        self._ids_arg = ids
        self._matrix: np.ndarray | None = None
        self._ids: list[str] | None = None
        self._digest: str | None = None
        self.overlap: dict[str, Any] = {}

    def _load(self) -> tuple[np.ndarray, list[str]]:
        if self._matrix is None:
            self._matrix, self._ids = read_embedding_file(
                self.path, key=self.key, ids=self._ids_arg, id_column=self.id_column
            )
        assert self._ids is not None
        return self._matrix, self._ids

    def config(self) -> dict[str, Any]:
        if self._digest is None:
            if not self.path.is_file():
                raise InputFileError(f"embedding file {self.path} not found")
            self._digest = path_digest(self.path)
        ids = self._ids_arg
        ids_repr = (
            str(ids)
            if isinstance(ids, str | os.PathLike) or ids is None
            else stable_hash(list(ids))
        )
        return {
            "file": str(self.path.name),
            "sha": self._digest,
            "key": self.key,
            "ids": ids_repr,
            "id_column": self.id_column,
        }

    def transform(self, adata: ad.AnnData) -> np.ndarray:
        matrix, ids = self._load()
        pos = pd.Index(ids).get_indexer(adata.obs_names.astype(str))
        found = pos >= 0
        n_found = int(found.sum())
        self.overlap = {
            "n_samples": int(adata.n_obs),
            "n_file_rows": len(ids),
            "n_matched": n_found,
            "n_samples_without_embedding": int(adata.n_obs - n_found),
            "n_file_rows_unused": len(ids) - n_found,
        }
        logger.info("%s: %s", self.label, self.overlap)
        if n_found == 0:
            raise InputFileError(
                f"none of the {len(ids)} ids in {self.path} matches any of the {adata.n_obs} "
                f"samples (overlap 0): file ids look like {ids[:3]}, sample ids like "
                f"{adata.obs_names[:3].tolist()}; embed these samples, or fix the ids (full "
                "aliquot barcodes vs patient ids?)"
            )
        if n_found < adata.n_obs:
            missing = adata.obs_names[~found][:3].tolist()
            raise InputFileError(
                f"{adata.n_obs - n_found} of {adata.n_obs} samples have no embedding in "
                f"{self.path} (overlap {n_found}; e.g. missing {missing}); embed them too, or "
                "restrict the data to the embedded samples: adata[adata.obs_names.isin(ids)]"
            )
        return matrix[pos]
