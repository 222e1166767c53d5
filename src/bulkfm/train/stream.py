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
decompresses a whole chunk for each sample read; write pre-training files uncompressed
(anndata's default) or in chunks of a few rows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
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
_BUILD_HINT = "give an .h5ad written by `bulkfm data build` (or `bulkfm data simulate`)"


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
        values: DiskMatrix,
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
    the training rows of ``path``, default ``config.path``); ``tokens`` is a
    :class:`StreamingTokens`. Memory: obs/var plus one block of rows.
    """
    if path is None:
        if config.path is None:
            raise ConfigError(
                "data.streaming is true but data.path is not set; point data.path at the "
                ".h5ad (X = TPM) to read from disk"
            )
        path = config.path
    path = Path(path)
    annotations = _read_annotations(path)
    values = open_matrix(path, config.layer, annotations)
    n_samples, n_all_genes = values.shape
    if n_samples == 0 or n_all_genes == 0:
        raise InputFileError(
            f"the pre-training AnnData is empty ({n_samples} samples x {n_all_genes} genes)"
        )
    missing = _open_missing(path, config.missing_layer, values.shape)
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
        source=str(path),
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
