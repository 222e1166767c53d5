"""Out-of-core pre-training data (``data.streaming: true``): samples read from disk on demand.

:func:`bulkfm.train.data.prepare_pretrain_data` tokenises the whole matrix once and keeps
it in memory: 2 bytes x samples x genes, 3.8 GB for 100k samples x 19,062 genes, plus the
float32 input it was made from. Here the ``.h5ad`` stays on disk and memory stays flat
as the number of samples grows:

- everything fitted on the training split (the gene subset, the tokenizer's factor, the
  trivial per-gene predictor) is computed by the *same* functions of
  :mod:`bulkfm.train.data` in row chunks, so the result equals the in-memory one;
- :class:`StreamingTokens` stands in for the token matrix: ``tokens[row]`` reads that
  sample's TPM from disk, keeps the chosen genes and encodes it.

The order of samples, the masks, the sharding over processes (``StepBatchSampler``
slices each global batch by rank) and over data-loader workers (the loader hands whole
micro-batches to workers) and the resumable position are those of the in-memory path,
so a streamed run trains exactly the model an in-memory run trains, batch for batch.

Only ``obs``/``var`` (and ``uns``) are read into memory: anndata's ``backed="r"`` mode
would read every layer (the ``missing`` mask too), so the file is opened with h5py and X,
the chosen layer and the missing mask are read a block of rows at a time. Each process
(and each data-loader worker) opens its own read-only handle.

Random reads suit local disks and SSDs. A file compressed in chunks of many rows
decompresses a whole chunk for each sample read; ``bulkfm data build``
(:func:`bulkfm.io.write_h5ad`) writes X in chunks of whole rows, about 1 MB each, and an
uncompressed file (anndata's default) works as well.

Sources (``data.format``, detected from ``data.path`` by default). Each is a
:class:`RowSource`: obs/var in memory, ``read_rows(rows)`` -> (TPM block, missing mask)
from disk, one read-only handle per process:

- ``h5ad`` (:class:`H5adSource`): X or a layer of a built ``.h5ad``, as above.
- ``archs4`` (:class:`Archs4Source`): an ARCHS4 gene-count file, samples chosen by
  ``data.archs4`` (the selectors of :mod:`bulkfm.data.archs4`; every sample when null).
  Counts become TPM at read time through what ``bulkfm data build`` applies to an
  ARCHS4 input (:func:`bulkfm.data.genes.harmonize_genes` with the build's defaults,
  then :func:`bulkfm.data.units.counts_to_tpm`'s arithmetic with the default gene
  lengths), so a sample streamed from the file has the TPM it has in the built
  ``.h5ad``. Harmonisation depends on the gene list only and, under the build's ``sum``
  rule, is linear: it runs once, on an identity matrix, and is kept as a sparse map;
  gene lengths are looked up once. The file is genes x samples in compressed chunks
  (their shape is the release's choice), so reading a sample decompresses every chunk
  its column crosses, and a chunk several samples wide serves them all in one read:
  each call reads its samples sorted in ONE HDF5 read
  (:func:`bulkfm.data.archs4.read_counts`), the fitting passes read blocks of 512
  consecutive training samples, and the last block is cached. Random access during
  training costs about one chunk band per sample; for long runs on a large selection,
  ``bulkfm data build`` it once into an ``.h5ad`` (row-chunked) or write parquet shards.
- ``parquet`` (:class:`ParquetSource`): a folder (every ``*.parquet``/``*.pq`` in it,
  sorted by name), a glob or one file; samples x genes TPM, the sample ids in the
  pandas index (``DataFrame.to_parquet``) or a ``sample_id`` column, numeric columns =
  genes (the same set in every shard), other columns = sample annotations (e.g.
  ``patient`` for ``data.group_key``). Rows are read a parquet row group at a time with
  an LRU cache of decoded groups bounded in bytes: write shards with row groups of a few
  hundred samples (``to_parquet(..., row_group_size=256)``) so a random sample costs
  little to decode.

For ``archs4`` and ``parquet`` the sample annotations are completed as ``bulkfm data
build`` completes them (:func:`bulkfm.data.clinical.annotate_samples`: the patient of a
TCGA/GTEx barcode), so held-out splits group samples the same way.
"""

from __future__ import annotations

import glob
import logging
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bulkfm import schema as keys
from bulkfm.errors import ConfigError, ExpressionValueError, InputFileError
from bulkfm.tokenize import BinTokenizer, TokenizerConfig
from bulkfm.train.config import DataSection
from bulkfm.train.data import (
    PretrainData,
    choose_genes,
    data_info,
    gene_bin_statistics,
    holdout_split,
    sample_groups,
)

if TYPE_CHECKING:
    import anndata as ad
    import h5py  # type: ignore[import-untyped]

logger = logging.getLogger(__name__)

_CHUNK_ROWS = 512
"""Rows per block in the fitting passes (512 x 19,062 float64 = 78 MB at most)."""
_UNIT_SAMPLE = 2000
"""Rows read for the TPM unit check, as :func:`bulkfm.data.units.detect_unit` inspects."""
_BUILD_HINT = (
    "give an .h5ad written by `bulkfm data build` (or `bulkfm data simulate`), an ARCHS4 "
    "gene file (data.format: archs4) or a folder of parquet shards (data.format: parquet)"
)
_PARQUET_CACHE_BYTES = 256 * 2**20
"""Decoded parquet row groups kept per process (LRU; at least the group being read)."""
_PARQUET_SUFFIXES = (".parquet", ".pq")
_UNIT_SHARDS = 8
"""Parquet shards (spread over the list) whose first rows the TPM unit check reads."""


class DiskMatrix:
    """One samples x genes matrix of an ``.h5ad`` (X or a layer), rows read on demand.

    ``matrix[i]`` is row ``i`` (1-D), ``matrix[rows]`` a dense 2-D block in the order of
    ``rows``. Dense (HDF5 dataset) and CSR/CSC (anndata's sparse encoding) are read the
    same way. A block whose rows lie close together is read as one contiguous slab (one
    HDF5 read instead of one per row); otherwise row by row. The file is opened lazily
    in each process, so the object can be handed to data-loader workers (fork or spawn).
    """

    def __init__(self, path: str | Path, element: str) -> None:
        self.path = Path(path)
        self.element = element
        self._pid: int | None = None
        self._file: h5py.File | None = None
        self._data: Any = None
        data = self._open()
        self.shape: tuple[int, int] = (int(data.shape[0]), int(data.shape[1]))
        self.dtype = np.dtype(data.dtype)
        self.sparse = not hasattr(data, "chunks")

    def _open(self) -> Any:
        if self._data is not None and self._pid == os.getpid():
            return self._data
        import h5py
        from anndata.io import sparse_dataset

        # A handle inherited through fork is not used (HDF5 is not fork-safe): open anew.
        self._file = h5py.File(self.path, "r")
        node = self._file[self.element]
        self._data = sparse_dataset(node) if isinstance(node, h5py.Group) else node
        self._pid = os.getpid()
        return self._data

    def close(self) -> None:
        """Close this process's handle; the next read opens it again."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._data = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_file=None, _data=None, _pid=None)
        return state

    def __getitem__(self, rows: int | np.integer | np.ndarray) -> np.ndarray:
        data = self._open()
        if isinstance(rows, int | np.integer):
            return _dense(data[int(rows) : int(rows) + 1])[0]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        unique, inverse = np.unique(rows, return_inverse=True)
        lo, hi = int(unique[0]), int(unique[-1]) + 1
        if hi - lo <= 2 * len(unique) + 16:
            block = _dense(data[lo:hi])[unique - lo]
        else:
            block = np.concatenate([_dense(data[int(r) : int(r) + 1]) for r in unique])
        return block[inverse]


def _dense(block: Any) -> np.ndarray:
    return np.asarray(block.toarray() if sp.issparse(block) else block)


class StreamingTokens:
    """Token ids of the chosen genes, computed from disk when a row is asked for.

    Stands in for :attr:`PretrainData.tokens` (same ``shape``, ``dtype`` and row
    indexing), so :class:`~bulkfm.train.data.MaskedTokenDataset`, the held-out
    evaluation and :func:`~bulkfm.train.data.gene_bin_statistics` use it unchanged.
    """

    def __init__(
        self,
        values: DiskMatrix | _RowView,
        missing: DiskMatrix | None,
        columns: np.ndarray,
        tokenizer: BinTokenizer,
    ) -> None:
        self.values = values
        self.missing = missing
        self.columns = np.asarray(columns, dtype=np.int64)
        self.tokenizer = tokenizer
        self.dtype = np.dtype(np.int16 if tokenizer.n_bins < np.iinfo(np.int16).max else np.int32)
        self.shape: tuple[int, int] = (values.shape[0], len(self.columns))
        self._all = len(self.columns) == values.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: int | np.integer | np.ndarray) -> np.ndarray:
        one = isinstance(rows, int | np.integer)
        index = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        values = self._columns(self.values[index])
        missing = None if self.missing is None else self._columns(self.missing[index])
        tokens = self.tokenizer.encode(values, missing=missing).astype(self.dtype)
        return tokens[0] if one else tokens

    def _columns(self, block: np.ndarray) -> np.ndarray:
        return block if self._all else block[:, self.columns]

    def close(self) -> None:
        self.values.close()
        if self.missing is not None:
            self.missing.close()


# ---------------------------------------------------------------------- opening
def _read_annotations(path: Path) -> ad.AnnData:
    """obs, var and uns of the file as an AnnData without X (nothing samples x genes)."""
    import anndata as ad
    import h5py
    from anndata.io import read_elem

    what = f"data.path {path}"
    if not path.is_file():
        raise InputFileError(
            f"{what} does not exist or is not a file. Fix: check the path; {_BUILD_HINT}."
        )
    try:
        with h5py.File(path, "r") as f:
            missing = [name for name in ("obs", "var", "X") if name not in f]
            if missing:
                raise InputFileError(
                    f"{what} is HDF5 but has no {', '.join(missing)}: not an AnnData "
                    f".h5ad. Fix: {_BUILD_HINT}."
                )
            obs, var = read_elem(f["obs"]), read_elem(f["var"])
            uns = read_elem(f["uns"]) if "uns" in f else {}
    except InputFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise InputFileError(
            f"cannot read {what} as an .h5ad ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''}). Fix: {_BUILD_HINT}; "
            "or set data.streaming=false to read it with anndata in memory."
        ) from err
    return ad.AnnData(obs=obs, var=var, uns=uns)


def open_matrix(path: Path, layer: str | None, annotations: ad.AnnData) -> DiskMatrix:
    """X (or ``layers[layer]``) on disk, checked for shape and TPM units."""
    import h5py

    from bulkfm.data.units import check_tpm

    element = "X" if layer is None else f"layers/{layer}"
    with h5py.File(path, "r") as f:
        if element not in f:
            layers = list(f["layers"]) if "layers" in f else []
            raise ConfigError(
                f"data.layer {layer!r} is not in {path} (layers: {layers}); set data.layer "
                "to one of them, or null to use X"
            )
    matrix = DiskMatrix(path, element)
    name = "X" if layer is None else f"layers[{layer!r}]"
    expected = (annotations.n_obs, annotations.n_vars)
    if matrix.shape != expected:
        raise InputFileError(
            f"data.path {path}: {name} has shape {matrix.shape} but obs x var is {expected}. "
            f"Fix: write the file again; {_BUILD_HINT}."
        )
    if not np.issubdtype(matrix.dtype, np.number):
        raise InputFileError(
            f"data.path {path}: {name} is not numeric (dtype {matrix.dtype}). Fix: {_BUILD_HINT}."
        )
    n = matrix.shape[0]
    rows = np.unique(np.linspace(0, n - 1, min(n, _UNIT_SAMPLE)).round().astype(np.int64))
    check_tpm(matrix[rows], source=f"data.path {path} ({name})", adata=annotations)
    return matrix


def _open_missing(path: Path, name: str | None, shape: tuple[int, int]) -> DiskMatrix | None:
    import h5py

    if name is None:
        return None
    with h5py.File(path, "r") as f:
        if f"layers/{name}" not in f:
            return None
    mask = DiskMatrix(path, f"layers/{name}")
    if mask.shape != shape:
        raise ExpressionValueError(
            f"layers[{name!r}] has shape {mask.shape}, X has {shape}; rebuild the data"
        )
    return mask


# ---------------------------------------------------------------------- sources
class RowSource(Protocol):
    """A samples x genes TPM matrix left on disk, with its annotations in memory.

    ``annotations`` is an AnnData without X (obs = samples, var = genes, uns);
    ``read_rows(rows)`` gives the TPM of those rows (float, in the order asked) and the
    missing mask (bool, or None when the source has none); ``matrices()`` the same as two
    row-indexable objects (``m[rows]``, ``m.shape``, ``m.close()``) for the fitting
    functions of :mod:`bulkfm.train.data`. A source opens its file lazily in each
    process, so it can be handed to data-loader workers.
    """

    format: str
    path: Path
    annotations: ad.AnnData
    shape: tuple[int, int]
    description: str

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...

    def matrices(self) -> tuple[Any, Any | None]: ...

    def close(self) -> None: ...


class H5adSource:
    """X (or ``layers[layer]``) and the missing mask of a built ``.h5ad`` (h5py, no anndata
    ``backed`` mode: that would read every layer)."""

    format = "h5ad"

    def __init__(self, path: str | Path, layer: str | None, missing_layer: str | None) -> None:
        self.path = Path(path)
        self.annotations = _read_annotations(self.path)
        self.values = open_matrix(self.path, layer, self.annotations)
        self.missing = _open_missing(self.path, missing_layer, self.values.shape)
        self.shape: tuple[int, int] = self.values.shape
        self.description = str(self.path)

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        missing = None if self.missing is None else self.missing[rows].astype(bool)
        return self.values[rows], missing

    def matrices(self) -> tuple[DiskMatrix, DiskMatrix | None]:
        return self.values, self.missing

    def close(self) -> None:
        self.values.close()
        if self.missing is not None:
            self.missing.close()


class _RowView:
    """The values of a block source as a row-indexable matrix (``m[i]``, ``m[rows]``)."""

    def __init__(self, source: _BlockSource) -> None:
        self.source = source
        self.shape = source.shape
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, rows: int | np.integer | np.ndarray) -> np.ndarray:
        if isinstance(rows, int | np.integer):
            return self.source.read_rows(np.array([int(rows)]))[0][0]
        return self.source.read_rows(np.asarray(rows, dtype=np.int64))[0]

    def close(self) -> None:
        self.source.close()


class _BlockSource:
    """What the ARCHS4 and parquet sources share: the last block read is kept (a row
    asked again, e.g. by the unit check then the fitting pass, is not read twice), and
    per-process state is dropped when pickled for a data-loader worker."""

    format = ""
    path: Path
    annotations: ad.AnnData
    shape: tuple[int, int]
    description: str
    _transient: tuple[str, ...] = ("_last",)

    def __init__(self) -> None:
        self._last: tuple[bytes, np.ndarray] | None = None

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        if rows.size == 0:
            return np.empty((0, self.shape[1]), dtype=np.float32), None
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"rows out of range for {self.shape[0]} samples of {self.path}")
        key = rows.tobytes()
        if self._last is not None and self._last[0] == key:
            return self._last[1], None
        values = self._read(rows)
        self._last = (key, values)
        return values, None

    def _read(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def matrices(self) -> tuple[_RowView, None]:
        return _RowView(self), None

    def close(self) -> None:
        self._last = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in self._transient:
            state[name] = None
        return state


def _annotate(obs: pd.DataFrame, var: pd.DataFrame) -> ad.AnnData:
    """obs/var as an AnnData without X, samples annotated as ``bulkfm data build`` does."""
    import anndata as ad

    from bulkfm.data.clinical import annotate_samples

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*names are not unique", UserWarning)
        annotations = ad.AnnData(obs=obs.copy(), var=var)
    if keys.SAMPLE_ID not in annotations.obs:
        annotations.obs[keys.SAMPLE_ID] = annotations.obs_names.to_numpy()
    return annotate_samples(annotations)


class Archs4Source(_BlockSource):
    """TPM of the selected samples of an ARCHS4 gene file, converted at read time.

    ``read_rows`` reads the asked samples' count columns in one sorted HDF5 read, maps
    the file's genes to Ensembl ids and sums duplicates exactly as ``bulkfm data build``
    (:func:`~bulkfm.data.genes.harmonize_genes`, here as the precomputed sparse map it
    amounts to) and converts them with the per-sample arithmetic of
    :func:`~bulkfm.data.units.counts_to_tpm` (:func:`~bulkfm.data.units.counts_block_to_tpm`,
    gene lengths looked up once).
    """

    format = "archs4"
    _transient = ("_last", "_handle", "_pid")

    def __init__(self, path: str | Path, selection: Any = None) -> None:
        from bulkfm.data import archs4
        from bulkfm.data.units import inverse_gene_lengths, load_gene_lengths

        super().__init__()
        self.path = Path(path)
        selection = selection or archs4.Archs4Selection()
        try:
            with archs4.Archs4File(self.path) as f:
                if selection.filters_samples:
                    samples, counts = f.select_samples(selection)
                else:
                    samples, counts = np.arange(f.n_samples), {"in_file": f.n_samples}
                gene_index = f.select_genes(selection.genes)
                obs, raw_var = f.obs(samples), f.var(gene_index)
                self.genes_x_samples = bool(f.genes_x_samples)
                n_in_file = f.n_samples
        except InputFileError as err:
            raise InputFileError(
                f"data.path (data.format: archs4): {err} For a built AnnData set "
                "data.format: h5ad; for parquet shards data.format: parquet."
            ) from err
        self.samples = np.asarray(samples, dtype=np.int64)
        self.gene_index = np.asarray(gene_index, dtype=np.int64)
        lengths = load_gene_lengths()
        self._merge, var = _count_conversion(raw_var, lengths)
        self._inv_len = inverse_gene_lengths(var.index, lengths)
        self.annotations = _annotate(obs, var)
        self.shape = (len(self.samples), var.shape[0])
        self.description = (
            f"{self.path} (ARCHS4: {len(self.samples)} of {n_in_file} samples, {counts})"
        )
        self._handle: Any = None
        self._pid: int | None = None

    def _dataset(self) -> Any:
        from bulkfm.data.archs4 import EXPRESSION

        if self._handle is None or self._pid != os.getpid():
            import h5py

            # a handle inherited through fork is not used (HDF5 is not fork-safe)
            self._handle = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._handle[EXPRESSION]

    def _read(self, rows: np.ndarray) -> np.ndarray:
        from bulkfm.data.archs4 import read_counts
        from bulkfm.data.units import counts_block_to_tpm

        columns, inverse = np.unique(self.samples[rows], return_inverse=True)
        counts = read_counts(self._dataset(), columns, self.gene_index, self.genes_x_samples)
        merged = np.ascontiguousarray(counts @ self._merge, dtype=np.float32)
        tpm, _ = counts_block_to_tpm(merged, self._inv_len)
        return np.asarray(tpm)[inverse]

    def close(self) -> None:
        super().close()
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = self._pid = None


def _count_conversion(raw_var: pd.DataFrame, lengths: pd.Series) -> tuple[sp.csc_matrix, Any]:
    """The build's gene harmonisation of an ARCHS4 gene list as a sparse (file genes x
    genes) 0/1 map, restricted to genes with a length, and the var of its columns.

    ``harmonize_genes`` with the build's ``sum`` rule adds the columns that name one gene,
    which is ``counts @ map``; running it on an identity matrix gives the map. Genes
    :func:`~bulkfm.data.units.counts_to_tpm` would drop (no length) are dropped here once,
    with the same log line, so per-block conversions keep every column.
    """
    import dataclasses

    import anndata as ad

    from bulkfm.data.build import BuildConfig
    from bulkfm.data.genes import harmonize_genes
    from bulkfm.data.units import counts_to_tpm

    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(BuildConfig)}
    if defaults["duplicate_genes"] != "sum":  # the map is exact for the linear rule only
        raise AssertionError("bulkfm data build no longer sums duplicate genes by default")
    n = raw_var.shape[0]
    with warnings.catch_warnings():
        # ARCHS4 lists a few genes twice; harmonisation merges them, as in the build.
        warnings.filterwarnings("ignore", ".*names are not unique", UserWarning)
        probe = ad.AnnData(X=sp.identity(n, dtype=np.float32, format="csr"), var=raw_var)
    harmonised = harmonize_genes(
        probe,
        duplicates=defaults["duplicate_genes"],
        min_mapped_fraction=defaults["min_mapped_fraction"],
        id_conflicts=defaults["id_conflicts"],
    )
    one = ad.AnnData(X=np.ones((1, harmonised.n_vars), dtype=np.float32), var=harmonised.var)
    kept = harmonised.var_names.get_indexer(counts_to_tpm(one, lengths).var_names)
    merge = sp.csc_matrix(sp.csr_matrix(harmonised.X, dtype=np.float32)[:, kept])
    return merge, harmonised.var.iloc[kept].copy()


def parquet_shards(path: str | Path) -> list[Path]:
    """The shards ``data.path`` names: a folder (its ``*.parquet``/``*.pq``), a glob or one
    file, sorted by name (the row order of the data)."""
    text = str(path)
    if glob.has_magic(text):
        shards = [Path(p) for p in glob.glob(text) if Path(p).is_file()]
        where = f"the glob {text!r}"
    elif Path(text).is_dir():
        shards = [p for p in Path(text).iterdir() if p.suffix in _PARQUET_SUFFIXES]
        where = f"the folder {text}"
    elif Path(text).is_file():
        shards = [Path(text)]
        where = text
    else:
        raise InputFileError(
            f"data.path {text} does not exist. Fix: point data.path at a folder of parquet "
            "shards, a glob (e.g. 'shards/*.parquet') or one .parquet file."
        )
    if not shards:
        raise InputFileError(
            f"no parquet shard (*.parquet, *.pq) in {where} (data.path). Fix: check the "
            "path, or write the shards with DataFrame.to_parquet."
        )
    return sorted(shards, key=lambda p: p.name)


def _parquet_layout(shard: Path, schema: Any) -> tuple[str, list[str], list[str]]:
    """(sample-id column, gene columns, annotation columns) of one shard's schema."""
    import pyarrow as pa

    index_cols = [
        c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)
    ]
    if len(index_cols) == 1:
        id_column = index_cols[0]
    elif keys.SAMPLE_ID in schema.names:
        id_column = keys.SAMPLE_ID
    else:
        raise InputFileError(
            f"parquet shard {shard} has no sample-id column: neither a pandas index "
            f"(index columns: {index_cols or 'none stored'}) nor a {keys.SAMPLE_ID!r} column "
            f"(columns: {list(schema.names)[:5]}...). Fix: write it with the sample ids as "
            f"the index (df.to_parquet with df.index = sample ids) or a {keys.SAMPLE_ID!r} "
            "column."
        )
    genes: list[str] = []
    annotation: list[str] = []
    for f in schema:
        if f.name == id_column:
            continue
        numeric = pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
        (genes if numeric else annotation).append(f.name)
    if not genes:
        raise InputFileError(
            f"parquet shard {shard} has no numeric (gene) column. Fix: write samples x "
            "genes TPM, one numeric column per gene."
        )
    return id_column, genes, annotation


class ParquetSource(_BlockSource):
    """TPM of parquet shards (samples x genes), read a row group at a time.

    Decoded row groups stay in an LRU cache of at most ``cache_bytes`` per process (one
    group is always kept, whatever its size), so consecutive rows cost one decode.
    """

    format = "parquet"
    _transient = ("_last", "_files", "_cache", "_pid")

    def __init__(self, path: str | Path, *, cache_bytes: int = _PARQUET_CACHE_BYTES) -> None:

        from bulkfm.data.readers import open_parquet
        from bulkfm.data.validate import check_unique

        super().__init__()
        self.path = Path(path)
        self.shards = parquet_shards(path)
        self.cache_bytes = int(cache_bytes)
        self.genes: list[str] = []
        first = self.shards[0]
        frames: list[pd.DataFrame] = []
        groups: list[tuple[int, int]] = []
        sizes: list[int] = []
        shard_rows: list[int] = []
        for s, shard in enumerate(self.shards):
            pf = open_parquet(
                shard,
                what=f"parquet shard {shard} of data.path {path}",
                fix="write it again (DataFrame.to_parquet) or remove it from the folder",
            )
            id_column, genes, annotation = _parquet_layout(shard, pf.schema_arrow)
            if s == 0:
                self.genes = genes
            elif genes != self.genes:
                _different_genes(shard, first, genes, self.genes)
            table = pf.read(columns=[id_column, *annotation], use_threads=False)
            frame = table.to_pandas(ignore_metadata=True).set_index(id_column)
            frame.index = pd.Index(frame.index.astype(str), dtype=object, name=None)
            frames.append(frame)
            shard_rows.append(pf.metadata.num_rows)
            for g in range(pf.num_row_groups):
                groups.append((s, g))
                sizes.append(pf.metadata.row_group(g).num_rows)
        obs = pd.concat(frames, axis=0, join="outer") if len(frames) > 1 else frames[0]
        check_unique(obs.index, kind="sample", where=f"the parquet shards of {path}")
        self._groups = groups
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(shard_rows)]).astype(np.int64)
        self.annotations = _annotate(obs, pd.DataFrame(index=pd.Index(self.genes)))
        self.shape = (int(self._starts[-1]), len(self.genes))
        self.description = f"{path} (parquet: {len(self.shards)} shards)"
        self._files: dict[int, Any] | None = None
        self._cache: OrderedDict[int, np.ndarray] | None = None
        self._pid: int | None = None

    def _state(self) -> tuple[dict[int, Any], OrderedDict[int, np.ndarray]]:
        if self._files is None or self._cache is None or self._pid != os.getpid():
            self._files, self._cache, self._pid = {}, OrderedDict(), os.getpid()
        return self._files, self._cache

    def _group(self, g: int) -> np.ndarray:
        import pyarrow.parquet as pq

        files, cache = self._state()
        if g in cache:
            cache.move_to_end(g)
            return cache[g]
        shard, group = self._groups[g]
        if shard not in files:
            files[shard] = pq.ParquetFile(self.shards[shard])
        table = files[shard].read_row_group(group, columns=self.genes, use_threads=False)
        block = np.empty((table.num_rows, len(self.genes)), dtype=np.float32)
        for j, column in enumerate(table.select(self.genes).columns):
            block[:, j] = column.to_numpy()
        cache[g] = block
        while len(cache) > 1 and sum(b.nbytes for b in cache.values()) > self.cache_bytes:
            cache.popitem(last=False)
        return block

    def _read(self, rows: np.ndarray) -> np.ndarray:
        owner = np.searchsorted(self._starts, rows, side="right") - 1
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        for g in np.unique(owner):
            at = owner == g
            out[at] = self._group(int(g))[rows[at] - self._starts[g]]
        return out

    def unit_rows(self) -> np.ndarray:
        """Rows the TPM unit check reads: the first rows of a few shards spread over the
        list (a few row groups, not one row from each of thousands of groups)."""
        n = len(self.shards)
        picked = np.unique(np.linspace(0, n - 1, min(n, _UNIT_SHARDS)).round().astype(int))
        per = max(1, _UNIT_SAMPLE // len(picked))
        starts = self._shard_starts
        rows = [np.arange(starts[s], min(starts[s + 1], starts[s] + per)) for s in picked]
        return np.concatenate(rows).astype(np.int64)

    def close(self) -> None:
        super().close()
        self._files = self._cache = self._pid = None


def _different_genes(shard: Path, first: Path, genes: list[str], expected: list[str]) -> None:
    extra = [g for g in genes if g not in set(expected)]
    absent = [g for g in expected if g not in set(genes)]
    if not extra and not absent:
        what = "the same gene columns in another order"
    else:
        what = (
            f"{len(absent)} gene columns missing (e.g. {absent[:3]}) and {len(extra)} extra "
            f"(e.g. {extra[:3]})"
        )
    raise InputFileError(
        f"parquet shard {shard} does not have the gene columns of {first.name}: {what}. "
        "Fix: write every shard with the same gene columns in the same order (e.g. "
        "df.reindex(columns=genes)), or build the union with `bulkfm data build`, which "
        "records genes a source lacks as missing."
    )


def resolve_format(config: DataSection, path: str | Path) -> str:
    """``data.format``, or what ``auto`` detects from ``path``."""
    if config.format != "auto":
        return config.format
    text = str(path)
    if glob.has_magic(text) or Path(text).is_dir() or Path(text).suffix in _PARQUET_SUFFIXES:
        return "parquet"
    from bulkfm.data.archs4 import is_archs4

    if Path(text).is_file() and is_archs4(text):
        return "archs4"
    return "h5ad"


def open_source(config: DataSection, path: str | Path | None = None) -> RowSource:
    """The :class:`RowSource` for ``data.path`` (or ``path``) in ``data.format``."""
    if path is None:
        if config.path is None:
            raise ConfigError(
                "data.streaming is true but data.path is not set; point data.path at the "
                ".h5ad (X = TPM), an ARCHS4 .h5 file or a folder of parquet shards"
            )
        path = config.path
    fmt = resolve_format(config, path)
    if config.archs4 is not None and fmt != "archs4":
        raise ConfigError(
            f"data.archs4 selects ARCHS4 samples, but data.path {path} is read as {fmt}; "
            "point data.path at an ARCHS4 gene file (data.format: archs4) or set "
            "data.archs4=null"
        )
    if fmt == "archs4":
        return Archs4Source(path, config.archs4)
    if fmt == "parquet":
        source = ParquetSource(path)
        from bulkfm.data.units import check_tpm

        check_tpm(
            source.read_rows(source.unit_rows())[0],
            source=f"data.path {path} (parquet shards)",
            adata=source.annotations,
        )
        return source
    return H5adSource(path, config.layer, config.missing_layer)


def read_into_memory(config: DataSection) -> ad.AnnData:
    """The whole matrix of ``data.path`` as an AnnData (the in-memory path): an ``.h5ad``
    through :func:`~bulkfm.train.data.load_adata`, an ARCHS4 selection or parquet shards
    through their :class:`RowSource`, block by block into one float32 matrix."""
    import anndata as ad

    from bulkfm.train.data import load_adata

    if config.path is None:
        raise ConfigError(
            "data.path is not set; point it at a .h5ad file with X = TPM, an ARCHS4 .h5 "
            "file or a folder of parquet shards"
        )
    if resolve_format(config, config.path) == "h5ad":
        if config.archs4 is not None:
            open_source(config)  # raises: a selection for a file that is not ARCHS4
        return load_adata(config.path, layer=config.layer)
    if resolve_format(config, config.path) == "archs4" and not (
        config.archs4 is not None and config.archs4.filters_samples
    ):
        raise ConfigError(
            f"data.path {config.path} is an ARCHS4 file and data.streaming is false, which "
            "reads the selection into memory, but data.archs4 selects no sample subset (the "
            "whole file does not fit in memory). Fix: set data.streaming: true, or choose "
            "samples with data.archs4 (series, samples, source, max_singlecell_probability)"
        )
    source = open_source(config)
    X = np.empty(source.shape, dtype=np.float32)
    for chunk in _chunks(np.arange(source.shape[0])):
        X[chunk] = source.read_rows(chunk)[0]
    source.close()
    return ad.AnnData(X=X, obs=source.annotations.obs, var=source.annotations.var)


# ---------------------------------------------------------------------- fitting
def _chunks(rows: np.ndarray) -> list[np.ndarray]:
    return [rows[s : s + _CHUNK_ROWS] for s in range(0, len(rows), _CHUNK_ROWS)]


def fit_tokenizer(
    tokens: StreamingTokens, train_idx: np.ndarray, genes: list[str], sample_ids: list[str]
) -> BinTokenizer:
    """The tokenizer :meth:`BinTokenizer.fit` would fit on all training rows, in chunks.

    The factor is ``log10(1 + max TPM)``, and the max of the chunks' maxima is the max,
    so fitting each chunk with :meth:`BinTokenizer.fit` (which also refuses NaN, inf and
    negative values) and keeping the largest factor gives the same tokenizer bit for bit.
    """
    n_bins = tokens.tokenizer.n_bins
    factor = 0.0
    last: tuple[np.ndarray, np.ndarray | None] | None = None
    for chunk in _chunks(train_idx):
        values = tokens._columns(tokens.values[chunk])
        missing = None
        if tokens.missing is not None:
            missing = tokens._columns(tokens.missing[chunk]).astype(bool)
        last = (values, missing)
        measured = values if missing is None else values[~missing]
        if not np.any(measured != 0):  # all zero: nothing to fit (NaN != 0 is checked)
            continue
        try:
            fitted = BinTokenizer.fit(values, genes, missing=missing, n_bins=n_bins)
        except ExpressionValueError as exc:
            raise ExpressionValueError(
                f"{exc} [sample numbers count from {sample_ids[int(chunk[0])]!r}, the first "
                f"of a block of {len(chunk)} training samples]"
            ) from exc
        factor = max(factor, fitted.normalization_factor)
    if factor == 0.0:  # every value 0: let fit raise its own error
        assert last is not None
        BinTokenizer.fit(last[0], genes, missing=last[1], n_bins=n_bins)
    return BinTokenizer(
        TokenizerConfig(genes=list(genes), normalization_factor=factor, n_bins=n_bins)
    )


def _missing_fraction(tokens: StreamingTokens) -> float:
    """Share of [MASK] tokens over all samples: exactly the missing entries of the genes."""
    if tokens.missing is None:
        return 0.0
    n_rows, n_cols = tokens.shape
    total = 0
    for chunk in _chunks(np.arange(n_rows)):
        total += int(tokens._columns(tokens.missing[chunk]).astype(bool).sum())
    return total / max(n_rows * n_cols, 1)


def prepare_streaming_data(
    config: DataSection,
    *,
    seed: int,
    n_bins: int = 64,
    path: str | Path | None = None,
) -> PretrainData:
    """:func:`~bulkfm.train.data.prepare_pretrain_data` with the matrix left on disk.

    Same split, genes, tokenizer and trivial predictor (fitted in chunked passes over
    the training rows of ``path``, default ``config.path``, read as ``config.format``);
    ``tokens`` is a :class:`StreamingTokens`. Memory: obs/var plus one block of rows.
    """
    source = open_source(config, path)
    annotations = source.annotations
    values, missing = source.matrices()
    n_samples, n_all_genes = source.shape
    if n_samples == 0 or n_all_genes == 0:
        raise InputFileError(
            f"the pre-training AnnData is empty ({n_samples} samples x {n_all_genes} genes)"
        )
    groups = sample_groups(annotations, config.group_key)
    train_idx, eval_idx = holdout_split(
        n_samples, config.holdout_fraction, seed=seed, groups=groups
    )
    var_names = np.asarray(annotations.var_names)
    symbols = (
        annotations.var[keys.SYMBOL].astype(str).to_numpy()
        if keys.SYMBOL in annotations.var
        else None
    )
    selection = choose_genes(values, var_names, train_idx, missing, config, symbols=symbols)
    genes = [str(g) for g in var_names[selection.columns]]
    sample_ids = [str(s) for s in annotations.obs_names]

    # A placeholder factor only sizes the bins while the real one is fitted.
    placeholder = BinTokenizer(
        TokenizerConfig(genes=genes, normalization_factor=1.0, n_bins=n_bins)
    )
    tokens = StreamingTokens(values, missing, selection.columns, placeholder)
    tokenizer = fit_tokenizer(tokens, train_idx, genes, sample_ids)
    tokens.tokenizer = tokenizer
    mode, log_prob = gene_bin_statistics(tokens, train_idx, n_bins)  # type: ignore[arg-type]
    missing_fraction = _missing_fraction(tokens)
    tokens.close()  # reopened by whichever process (or worker) reads next
    info = data_info(
        (n_samples, n_all_genes),
        (train_idx, eval_idx),
        selection,
        tokenizer,
        missing_fraction,
        grouped_by=config.group_key if groups is not None else None,
        source=source.description,
    )
    return PretrainData(
        tokens=tokens,  # type: ignore[arg-type]
        train_idx=train_idx,
        eval_idx=eval_idx,
        genes=genes,
        sample_ids=sample_ids,
        tokenizer=tokenizer,
        gene_mode=mode,
        gene_log_prob=log_prob,
        info=info,
        gene_selection=selection,
    )
