"""Read expression files as they come (GDC folders, wide tables, h5ad) into AnnData.

Readers keep the values exactly as in the file (no unit conversion, no gene
mapping): later stages decide what the numbers mean. What readers do decide is
which axis holds samples, because every later stage assumes samples x genes and a
transposed matrix would otherwise flow through silently.

Matrices reach 10k samples x 19k genes, so text is parsed in blocks straight into
float32 buffers (never a full float64 DataFrame) and parquet column group by
column group.
"""

from __future__ import annotations

import csv
import gzip
import logging
import mmap
import os
import re
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from bulkfm.data import archs4
from bulkfm.data.units import check_tpm
from bulkfm.data.validate import check_expression_values, check_unique
from bulkfm.errors import (
    BulkfmWarning,
    ConfigError,
    ExpressionValueError,
    InputFileError,
    OrientationError,
)
from bulkfm.schema import COHORT, PATIENT, SYMBOL, UNS

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "ORIENTATIONS", "read_expression", "read_h5ad"]

FORMATS = ("auto", "gdc", "wide", "bulkrnabert_csv", "h5ad", "archs4")
ORIENTATIONS = ("auto", "samples_x_genes", "genes_x_samples")
SXG, GXS = "samples_x_genes", "genes_x_samples"

_TEXT_SUFFIXES = (".tsv", ".csv", ".txt", ".tab")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_GZIP_MAGIC = b"\x1f\x8b"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_PARQUET_MAGIC = b"PAR1"
_NA_TOKENS = frozenset({"", "na", "nan", "n/a", "null", "none", "-nan", "#n/a"})
#: What reading a damaged or truncated (gzipped) file raises: zlib.error for a stream
#: damaged near its start, gzip.BadGzipFile / EOFError for a bad header or a cut tail.
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)

_GDC_COUNT_ROWS = ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous")
_GDC_ID_COLUMNS = ("gene_id", "gene_name", "gene_type")
_GDC_SUFFIX = ".rna_seq.augmented_star_gene_counts"
_OFFICIAL_ID_COLUMN = "identifier"

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d+(\.\d+)?(_PAR_Y)?$")
_ENTREZ_RE = re.compile(r"^\d+$")
_SAMPLE_RE = re.compile(
    r"^((TCGA|TARGET|GTEX|CPTAC|HTMCP|CGCI|MMRF|BEATAML1?|CCLE)-"
    r"|(GSM|SRR|ERR|DRR|SRS|SAMN)\d+$"
    r"|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})",
    re.IGNORECASE,
)
_SYMBOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/@:]{0,29}$")
_MAX_LABELS_SCORED = 5000

_SYMBOL_NAMES = {"hugosymbol", "symbol", "genesymbol", "genename", "hgncsymbol", "approvedsymbol"}
_ENTREZ_NAMES = {"entrezgeneid", "entrez", "entrezid", "entrezgene", "ncbigeneid"}
_GENE_TYPE_NAMES = {"genetype", "genebiotype", "biotype"}
# Names that mark a leading column as labels even when its values are numbers.
_LABEL_NAMES = (
    _SYMBOL_NAMES
    | _ENTREZ_NAMES
    | _GENE_TYPE_NAMES
    | {"", "unnamed0", "geneid", "gene", "genes", "id", "ensembl", "ensemblid", "ensemblgeneid"}
    | {"description", "name", "sample", "sampleid", "samplebarcode", "barcode", "identifier"}
    # featureCounts / GTF-style gene annotation (coordinates are numbers, not samples)
    | {"chr", "chrom", "chromosome", "start", "end", "stop", "strand", "length"}
    | {"genelength", "effectivelength", "width", "locus", "cytoband", "transcriptids"}
)
#: A number written with a decimal comma (German/French locale), e.g. 3874,5.
_DECIMAL_COMMA_RE = re.compile(r"^[-+]?\d+,\d+([eE][-+]?\d+)?$")
#: Share of numeric cells above which a column with some text is taken as expression
#: values with bad cells, not as a label column.
_MOSTLY_NUMERIC = 0.5

_BLOCK_BYTES = 64 * 2**20  # float32 buffer per block; above glibc's 32 MiB mmap threshold
_CHUNK_TEXT = 8 * 2**20  # characters of text parsed per numpy call
_PARQUET_GROUP = 64  # columns read per parquet call
_PEEK_LINES = 100
_PEEK_FIELDS = 64
_PEEK_BYTES = 2**20


@dataclass
class _Parsed:
    """A reader's output before it becomes AnnData: always samples x genes."""

    X: np.ndarray
    obs: pd.DataFrame
    var: pd.DataFrame
    format: str
    orientation: str
    orientation_detected: bool
    annotation_columns: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    uns: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, Any] = field(default_factory=dict)
    obsm: dict[str, Any] = field(default_factory=dict)
    varm: dict[str, Any] = field(default_factory=dict)


def read_expression(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    orientation: str = "auto",
    value_column: str = "tpm_unstranded",
    sample_sheet: str | os.PathLike | None = None,
    gene_column: str | None = None,
    sample_column: str | None = None,
    annotation_columns: Sequence[str] | None = None,
    archs4_select: archs4.Archs4Selection | None = None,
) -> ad.AnnData:
    """Read one expression source into a samples x genes float32 AnnData.

    ``path`` is a GDC STAR-counts folder (or one such file), a wide table
    (TSV/CSV/TXT, gzipped or not, or parquet) in either orientation, an official
    BulkRNABert CSV, or an ``.h5ad``. Values are returned as found in the file;
    ``var_names`` are the file's gene ids (possibly duplicated) and ``var["raw_id"]``
    keeps them for provenance. ``value_column`` picks the GDC column;
    ``sample_sheet`` maps GDC file names to sample barcodes. ``gene_column`` /
    ``sample_column`` name the label column of a wide table (and so imply its
    orientation); ``annotation_columns`` replaces the automatic detection of
    non-expression columns. ``archs4_select`` picks the samples and genes of an ARCHS4
    ``.h5`` file (:mod:`bulkfm.data.archs4`; required there, the file is too large to read
    whole).
    """
    if format not in FORMATS:
        raise ConfigError(
            f"--format {format} (format={format!r}) is not one of {FORMATS}. Fix: pick one of "
            "those."
        )
    if orientation not in ORIENTATIONS:
        raise ConfigError(
            f"--orientation {orientation} (orientation={orientation!r}) is not one of "
            f"{ORIENTATIONS}. Fix: pick one of those."
        )
    if gene_column is not None and sample_column is not None:
        raise ConfigError(
            "gene_column and sample_column were both given, but a wide table has labels on "
            "one axis only (rows are either genes or samples). Fix: pass just one of them."
        )
    path = Path(path)
    if not path.exists():
        raise InputFileError(
            f"expression file {path} does not exist. Fix: check the path (relative paths "
            f"start at {Path.cwd()})."
        )
    if path.is_file() and path.stat().st_size == 0:
        raise InputFileError(f"expression file {path} is empty (0 bytes). Fix: download it again.")
    fmt = _detect_format(path) if format == "auto" else format
    if path.is_dir() and fmt != "gdc":
        raise InputFileError(
            f"{path} is a folder, but only --format gdc (format='gdc') reads folders (of "
            "per-sample files). Fix: pass the path of the matrix file itself, or --format gdc."
        )

    if archs4_select is not None and fmt != "archs4":
        raise ConfigError(
            f"an ARCHS4 selection (--archs4-*, archs4: in the config) was given for {path}, "
            f"which is read as {fmt}, not archs4. Fix: give the selection only to ARCHS4 .h5 "
            "inputs (or pass --format archs4 if this is one)."
        )
    if fmt == "gdc":
        parsed = _read_gdc(path, value_column=value_column, sample_sheet=sample_sheet)
    elif fmt == "h5ad":
        parsed = _read_h5ad(path, orientation=orientation)
    elif fmt == "archs4":
        parsed = _read_archs4(path, archs4_select)
    elif fmt == "bulkrnabert_csv":
        parsed = _read_bulkrnabert_csv(path)
    else:
        reader = _read_parquet if _is_parquet(path) else _read_delimited
        parsed = reader(
            path,
            orientation=orientation,
            annotation_columns=annotation_columns,
            gene_column=gene_column,
            sample_column=sample_column,
        )
    return _finish(path, parsed)


# ----------------------------------------------------------------------------- shared


def _finish(path: Path, parsed: _Parsed) -> ad.AnnData:
    check_unique(parsed.obs.index, kind="sample", where=str(path))
    check_expression_values(
        parsed.X,
        obs_names=parsed.obs.index,
        var_names=parsed.var.index,
        what=f"expression values in {path}",
    )
    with warnings.catch_warnings():
        # Duplicate gene ids are legal here; gene harmonisation resolves them.
        warnings.filterwarnings("ignore", message=".*names are not unique", category=UserWarning)
        adata = ad.AnnData(
            X=parsed.X,
            obs=parsed.obs,
            var=parsed.var,
            uns=parsed.uns,
            layers=parsed.layers or None,
            obsm=parsed.obsm or None,
            varm=parsed.varm or None,
        )
    source = {
        "path": str(path),
        "format": parsed.format,
        "orientation": parsed.orientation,
        "orientation_detected": parsed.orientation_detected,
        **parsed.extra,
        "n_samples": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "annotation_columns": list(parsed.annotation_columns),
    }
    bulkfm_uns = dict(adata.uns.get(UNS, {}))
    bulkfm_uns["source"] = source
    adata.uns[UNS] = bulkfm_uns
    logger.info(
        "read %s: format=%s, %s (%s), %d samples x %d genes, annotation columns %s",
        path,
        parsed.format,
        parsed.orientation,
        "detected" if parsed.orientation_detected else "given",
        adata.n_obs,
        adata.n_vars,
        parsed.annotation_columns,
    )
    return adata


def _str_index(values: Sequence[Any]) -> pd.Index:
    return pd.Index([str(v) for v in values], dtype=object)


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _stripped(values: Sequence[Any]) -> list[str]:
    """Label values as clean strings: padding removed, 9411.0 -> '9411', None -> ''."""
    out = []
    for v in values:
        if v is None:
            out.append("")
        elif isinstance(v, float) and v.is_integer():
            out.append(str(int(v)))
        else:
            out.append(str(v).strip())
    return out


# ----------------------------------------------------------------------------- format


def _compression_free_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _magic(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _is_parquet(path: Path) -> bool:
    return path.is_file() and _magic(path, 4) == _PARQUET_MAGIC


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "gdc"
    suffix = _compression_free_suffix(path)
    if suffix == ".h5ad":
        return "h5ad"
    if suffix in (".h5", ".hdf5"):
        return "archs4"  # the one plain-HDF5 expression layout read; checked on opening
    if suffix in _PARQUET_SUFFIXES:
        return "wide"
    if suffix not in _TEXT_SUFFIXES:
        raise InputFileError(
            f"unknown file type '{suffix or path.name}' for {path}; bulkfm reads a GDC folder, "
            f"{', '.join(_TEXT_SUFFIXES)} (optionally .gz), {', '.join(_PARQUET_SUFFIXES)} and "
            ".h5ad (and ARCHS4 .h5). Fix: convert the file to one of those, or pass --format "
            "wide|gdc|bulkrnabert_csv|h5ad|archs4 (format= in Python) if the content already "
            "is one."
        )
    lines = _peek_lines(path, max_lines=3)
    if _gdc_header_columns(lines) is not None:
        return "gdc"
    header = lines[0].rstrip("\r\n") if lines else ""
    if header.split(",")[-1].strip().strip('"') == _OFFICIAL_ID_COLUMN:
        return "bulkrnabert_csv"
    return "wide"


def _damaged(path: Path, err: BaseException) -> InputFileError:
    """The error for a file that cannot be read to its end (damaged, truncated, bad gzip)."""
    compressed = _magic(path, 2) == _GZIP_MAGIC
    kind = "gzip stream" if compressed else "file"
    return InputFileError(
        f"cannot read {path}: the {kind} is damaged or truncated "
        f"({_error_name(err)}: {err}). Fix: download or copy the file again"
        + (" (check it with `gzip -t`)" if compressed else "")
        + "; a compressed file must be gzip."
    )


def _error_name(err: BaseException) -> str:
    module = type(err).__module__
    return type(err).__name__ if module == "builtins" else f"{module}.{type(err).__name__}"


def _open_text(path: Path):
    if _magic(path, 2) == _GZIP_MAGIC:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _arrow_stream(path: Path) -> pa.NativeFile:
    compression = "gzip" if _magic(path, 2) == _GZIP_MAGIC else None
    return pa.input_stream(str(path), compression=compression)


def _peek_lines(path: Path, *, max_lines: int, max_bytes: int = _PEEK_BYTES) -> list[str]:
    lines: list[str] = []
    size = 0
    try:
        with _open_text(path) as fh:
            for line in fh:
                lines.append(line)
                size += len(line)
                if len(lines) >= max_lines or (size >= max_bytes and len(lines) >= 2):
                    break
    except READ_ERRORS as err:
        raise _damaged(path, err) from err
    if lines:
        lines[0] = lines[0].removeprefix("\ufeff")
    return lines


# ----------------------------------------------------------------------------- orientation


@dataclass(frozen=True)
class _Evidence:
    """Fractions of one axis' labels that look like each kind of id."""

    ensembl: float
    entrez: float
    sample: float
    symbol: float
    examples: tuple[str, ...]

    @property
    def gene(self) -> float:
        return self.ensembl + self.entrez


def _evidence(labels: Sequence[str], *, entrez_counts: bool = True) -> _Evidence:
    n = len(labels)
    if n == 0:
        return _Evidence(0.0, 0.0, 0.0, 0.0, ())
    step = max(1, n // _MAX_LABELS_SCORED)
    sample = [str(x) for x in labels[::step]]
    k = len(sample)
    frac = lambda rx: sum(bool(rx.match(s)) for s in sample) / k  # noqa: E731
    return _Evidence(
        ensembl=frac(_ENSEMBL_RE),
        entrez=frac(_ENTREZ_RE) if entrez_counts else 0.0,
        sample=frac(_SAMPLE_RE),
        symbol=frac(_SYMBOL_RE),
        examples=tuple(sample[:3]),
    )


def _combine(evidences: Sequence[_Evidence]) -> _Evidence:
    if not evidences:
        return _Evidence(0.0, 0.0, 0.0, 0.0, ())
    return _Evidence(
        ensembl=max(e.ensembl for e in evidences),
        entrez=max(e.entrez for e in evidences),
        sample=max(e.sample for e in evidences),
        symbol=max(e.symbol for e in evidences),
        examples=evidences[0].examples,
    )


def _orientation_from_labels(rows: _Evidence, cols: _Evidence) -> str | None:
    """Which axis holds genes, judged from label content alone (None: cannot tell)."""
    if cols.gene >= 0.5 and cols.gene > rows.gene:
        return SXG
    if rows.gene >= 0.5 and rows.gene > cols.gene:
        return GXS
    if rows.sample >= 0.5 and cols.sample < 0.1 and cols.symbol >= 0.5:
        return SXG
    if cols.sample >= 0.5 and rows.sample < 0.1 and rows.symbol >= 0.5:
        return GXS
    return None


def _contradiction(requested: str, rows: _Evidence, cols: _Evidence) -> str | None:
    samples, genes = (rows, cols) if requested == SXG else (cols, rows)
    if samples.ensembl > 0.9 and genes.ensembl < 0.5:
        return (
            f"{samples.ensembl:.0%} of the supposed sample ids are Ensembl gene ids "
            f"(e.g. {', '.join(samples.examples)})"
        )
    if genes.sample > 0.9 and samples.sample < 0.5:
        return (
            f"{genes.sample:.0%} of the supposed gene ids look like sample ids "
            f"(e.g. {', '.join(genes.examples)})"
        )
    return None


def _resolve_orientation(
    path: Path,
    requested: str,
    rows: _Evidence,
    cols: _Evidence,
    shape: tuple[int, int],
) -> tuple[str, bool]:
    """Return (file orientation, detected?) or raise when labels contradict the request."""
    if requested != "auto":
        problem = _contradiction(requested, rows, cols)
        if problem:
            other = GXS if requested == SXG else SXG
            raise OrientationError(
                f"{path} was read as {requested} but {problem}: the matrix looks transposed. "
                f"Fix: pass --orientation {other} (orientation='{other}' in Python; or auto), "
                "or transpose the file."
            )
        return requested, False
    found = _orientation_from_labels(rows, cols)
    if found is not None:
        return found, True
    n_rows, n_cols = shape
    guess = SXG if n_cols >= n_rows else GXS
    warnings.warn(
        f"could not tell from the labels of {path} which axis holds genes (rows e.g. "
        f"{', '.join(rows.examples)}; columns e.g. {', '.join(cols.examples)}); assumed "
        f"{guess} because there are more {'columns' if guess == SXG else 'rows'} "
        f"({max(shape)}) than {'rows' if guess == SXG else 'columns'} ({min(shape)}) and "
        "genes usually outnumber samples. Fix: pass --orientation samples_x_genes or "
        "genes_x_samples (orientation= in Python) to read it without guessing.",
        BulkfmWarning,
        stacklevel=3,
    )
    return guess, True


# ----------------------------------------------------------------------------- wide tables


@dataclass
class _Labels:
    """Annotation columns (name -> stripped strings) and numeric column names of a table."""

    annotation: dict[str, list[str]]
    numeric_names: list[str]


def _split_wide_labels(
    path: Path,
    labels: _Labels,
    *,
    orientation: str,
    gene_column: str | None,
    sample_column: str | None,
    n_rows: int,
) -> tuple[str, bool, pd.DataFrame, pd.DataFrame]:
    """Decide orientation and turn labels into obs and var (before values are placed)."""
    if gene_column is not None or sample_column is not None:
        implied = GXS if gene_column is not None else SXG
        if orientation not in ("auto", implied):
            given = "gene_column" if gene_column is not None else "sample_column"
            raise ConfigError(
                f"{given} implies {implied} but orientation='{orientation}' was given. "
                f"Fix: drop one of the two."
            )
        orientation = implied
    row_evidence = _combine(
        [
            _evidence(values, entrez_counts=_norm_name(name) in _ENTREZ_NAMES)
            for name, values in labels.annotation.items()
        ]
    )
    col_evidence = _evidence(labels.numeric_names)
    found, detected = _resolve_orientation(
        path, orientation, row_evidence, col_evidence, (n_rows, len(labels.numeric_names))
    )
    if found == SXG:
        obs, var = _sxg_frames(labels, sample_column)
    else:
        obs, var = _gxs_frames(labels, gene_column)
    return found, detected, obs, var


def _sxg_frames(labels: _Labels, sample_column: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    id_col = sample_column or next(iter(labels.annotation))
    obs = pd.DataFrame(
        {k: v for k, v in labels.annotation.items() if k != id_col},
        index=_str_index(labels.annotation[id_col]),
    )
    var = pd.DataFrame({"raw_id": labels.numeric_names}, index=_str_index(labels.numeric_names))
    return obs, var


def _primary_gene_column(annotation: dict[str, list[str]]) -> str:
    """Ensembl ids beat symbols beat anything textual beat the first column."""
    scored = {name: _evidence(values).ensembl for name, values in annotation.items()}
    best = max(scored, key=lambda k: scored[k])
    if scored[best] >= 0.5:
        return best
    for name in annotation:
        if _norm_name(name) in _SYMBOL_NAMES:
            return name
    for name, values in annotation.items():
        if _evidence(values).entrez < 0.5:
            return name
    return next(iter(annotation))


def _var_column_name(name: str, taken: set[str]) -> str:
    key = _norm_name(name)
    for target, names in (
        (SYMBOL, _SYMBOL_NAMES),
        ("entrez", _ENTREZ_NAMES),
        ("gene_type", _GENE_TYPE_NAMES),
    ):
        if key in names and target not in taken:
            return target
    return name if name not in taken else f"{name}_{len(taken)}"


def _gxs_frames(labels: _Labels, gene_column: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    id_col = gene_column or _primary_gene_column(labels.annotation)
    ids = labels.annotation[id_col]
    columns: dict[str, list[str]] = {"raw_id": ids}
    for name, values in labels.annotation.items():
        columns[_var_column_name(name, set(columns))] = values
    var = pd.DataFrame(columns, index=_str_index(ids))
    obs = pd.DataFrame(index=_str_index(labels.numeric_names))
    return obs, var


def _choose_annotation(
    path: Path,
    names: list[str],
    is_numeric: Callable[[int], bool],
    *,
    annotation_columns: Sequence[str] | None,
    gene_column: str | None,
    sample_column: str | None,
    leading_only: bool,
    cells: Callable[[int], list[_Cell]] | None = None,
) -> list[int]:
    """Indices of the label/annotation columns; every other column must be numeric.

    A column is a label column by name (``gene_id``, ``symbol``, ``Chr``, ...) or because it
    holds text. A text column that looks like expression values (its header is a sample or
    gene id, or most of its ``cells`` are numbers) is refused instead: taking it for labels
    would silently drop a sample (e.g. one value written with a decimal comma).
    """
    wanted = [c for c in (gene_column, sample_column) if c is not None]
    if annotation_columns is not None:
        wanted = [*annotation_columns, *(w for w in wanted if w not in annotation_columns)]
        auto: list[int] = []
    else:
        auto = []
        for i, name in enumerate(names):
            if _norm_name(name) in _LABEL_NAMES:
                auto.append(i)
            elif not is_numeric(i):
                if cells is not None:
                    _refuse_data_column_with_text(path, name, cells(i))
                auto.append(i)
            elif leading_only:
                break
    missing = [w for w in wanted if w not in names]
    if missing:
        raise InputFileError(
            f"column(s) {missing} not found in {path}; its first columns are "
            f"{names[:8]}. Fix: use the exact column names from the header."
        )
    chosen = sorted(set(auto) | {names.index(w) for w in wanted})
    if not chosen:
        raise InputFileError(
            f"{path} has no label column: its first column ('{names[0]}') holds numbers, so "
            "bulkfm cannot tell which sample or gene each row is. Fix: add a first column of "
            "sample ids or gene ids (Python: name it with read_expression's gene_column=/"
            "sample_column=/annotation_columns=)."
        )
    if len(chosen) == len(names):
        raise InputFileError(
            f"{path} has no numeric expression columns: every column ({names[:5]}...) holds "
            "text. Fix: check the separator (tab, comma or semicolon) and the decimal "
            "separator (numbers need a decimal point); in Python, check annotation_columns=."
        )
    return chosen


@dataclass(frozen=True)
class _Cell:
    """One inspected cell of a column: where it is and what it holds."""

    line: int | None  # 1-based line of a text file (None: a parquet row)
    row: str  # the row's label (its first field), or its position
    value: str


def _looks_like_data_header(name: str) -> bool:
    return bool(_SAMPLE_RE.match(name) or _ENSEMBL_RE.match(name))


def _refuse_data_column_with_text(path: Path, name: str, cells: list[_Cell]) -> None:
    """Raise when a column with text cells looks like expression values (see _choose_annotation)."""
    filled = [c for c in cells if c.value.strip().lower() not in _NA_TOKENS]
    text = [c for c in filled if not _is_float(c.value.strip())]
    if not text:
        return
    comma = [c for c in text if _DECIMAL_COMMA_RE.match(c.value.strip())]
    numeric = len(filled) - len(text) + len(comma)
    header = _looks_like_data_header(name)
    if not header and numeric <= _MOSTLY_NUMERIC * len(filled):
        return
    first = comma[0] if comma else text[0]
    where = f"line {first.line}" if first.line is not None else f"row {first.row}"
    why = (
        f"its header looks like a {'gene' if _ENSEMBL_RE.match(name) else 'sample'} id"
        if header
        else f"{numeric} of its {len(filled)} inspected values are numbers"
    )
    comma_hint = (
        f" '{first.value}' is written with a decimal comma: bulkfm reads a point as the "
        "decimal separator. Fix: export the table with decimal points (pandas "
        "to_csv(decimal='.'), R write.table(dec='.'), or a spreadsheet in an English locale)."
        if comma
        else " Fix: correct or blank (NA) the non-numeric value(s)."
    )
    raise ExpressionValueError(
        f"column '{name}' of {path} holds expression values ({why}) but {len(text)} "
        f"inspected value(s) are not numbers: first '{first.value}' at {where} (row "
        f"'{first.row}'). Read as a label column, it would silently drop out of the data."
        f"{comma_hint} If '{name}' really is a label column, list it with "
        "annotation_columns=[...] (Python: bulkfm.data.readers.read_expression)."
    )


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_number(text: str) -> bool:
    """Numbers and missing-value tokens: both belong to an expression column."""
    text = text.strip()
    return text.lower() in _NA_TOKENS or _is_float(text)


def _detect_separator(path: Path, header: str, first_row: str) -> str:
    best = max(("\t", ",", ";"), key=header.count)
    if header.count(best) == 0:
        raise InputFileError(
            f"cannot find the column separator of {path}: its header has no tab, comma or "
            "semicolon. Fix: save the table as tab- or comma-separated text."
        )
    if first_row.count(best) not in (header.count(best), header.count(best) + 1):
        logger.warning(
            "%s: header has %d '%s' separators but the first row has %d",
            path,
            header.count(best),
            best.replace("\t", "\\t"),
            first_row.count(best),
        )
    return best


@dataclass
class _TextLayout:
    sep: str
    names: list[str]
    peek: list[list[str]]
    peek_lines: list[int] = field(default_factory=list)  # 1-based line of each peek row

    def cells(self, i: int) -> list[_Cell]:
        return [
            _Cell(line, row[0].strip() if i else f"line {line}", row[i])
            for row, line in zip(self.peek, self.peek_lines, strict=True)
            if i < len(row)
        ]


def _text_layout(path: Path) -> _TextLayout:
    numbered = [
        (k, ln) for k, ln in enumerate(_peek_lines(path, max_lines=_PEEK_LINES), 1) if ln.strip()
    ]
    lines = [ln for _, ln in numbered]
    if not lines:
        raise InputFileError(f"{path} has no content. Fix: download or export it again.")
    if len(lines) < 2:
        raise InputFileError(
            f"{path} has a header but no data rows. Fix: export the table again with its values."
        )
    sep = _detect_separator(path, lines[0], lines[1])
    names = [n.strip() for n in _csv_fields(lines[0], sep)]
    if len(_csv_fields(lines[1], sep)) == len(names) + 1:
        names = ["", *names]  # R's write.table: header lacks the row-name column
    # Only leading fields are ever inspected (to find label columns): parse just those,
    # as a wide row holds tens of thousands of fields.
    peek = [
        _csv_fields(sep.join(ln.split(sep, _PEEK_FIELDS)[:_PEEK_FIELDS]), sep) for ln in lines[1:]
    ]
    return _TextLayout(sep, names, peek, [k for k, _ in numbered[1:]])


def _csv_fields(line: str, sep: str) -> list[str]:
    return next(csv.reader([line.rstrip("\r\n")], delimiter=sep))


def _read_delimited(
    path: Path,
    *,
    orientation: str,
    annotation_columns: Sequence[str] | None,
    gene_column: str | None,
    sample_column: str | None,
) -> _Parsed:
    layout = _text_layout(path)
    names = layout.names

    def is_numeric(i: int) -> bool:
        # Beyond the peeked fields there is no evidence: treat as expression values.
        return all(_is_number(row[i]) for row in layout.peek if i < len(row))

    annot_idx = _choose_annotation(
        path,
        names,
        is_numeric,
        annotation_columns=annotation_columns,
        gene_column=gene_column,
        sample_column=sample_column,
        leading_only=True,
        cells=layout.cells,
    )
    num_idx = [i for i in range(len(names)) if i not in set(annot_idx)]
    annot_values, blocks = _stream_text(path, layout, annot_idx, num_idx)
    n_rows = blocks.n_rows
    labels = _Labels(
        annotation={names[i]: _stripped(v) for i, v in zip(annot_idx, annot_values, strict=True)},
        numeric_names=[names[i] for i in num_idx],
    )
    if n_rows == 0:
        raise InputFileError(
            f"{path} has a header but no data rows. Fix: export the table again with its values."
        )
    file_orientation, detected, obs, var = _split_wide_labels(
        path,
        labels,
        orientation=orientation,
        gene_column=gene_column,
        sample_column=sample_column,
        n_rows=n_rows,
    )
    X = blocks.assemble(rows_are_samples=file_orientation == SXG)
    return _Parsed(
        X=X,
        obs=obs,
        var=var,
        format="wide",
        orientation=file_orientation,
        orientation_detected=detected,
        annotation_columns=list(labels.annotation),
    )


class _Blocks:
    """Numeric rows of a table in large float32 blocks, assembled once at the end.

    Blocks are large (beyond glibc's mmap threshold) so freeing each one while the
    final matrix is assembled really returns its memory: the peak stays near one
    copy of the data, whichever orientation the final matrix takes.
    """

    def __init__(self, n_cols: int) -> None:
        self.n_cols = n_cols
        self.max_cap = max(1, _BLOCK_BYTES // (4 * max(1, n_cols)))
        self.blocks: list[np.ndarray] = []
        self.fill = 0  # rows used in the last block
        self.n_rows = 0

    def append(self, rows: np.ndarray) -> None:
        start, n = 0, rows.shape[0]
        while start < n:
            if not self.blocks or self.fill == self.blocks[-1].shape[0]:
                cap = self.max_cap if self.blocks else min(self.max_cap, max(n, 1024))
                self.blocks.append(np.empty((cap, self.n_cols), dtype=np.float32))
                self.fill = 0
            block = self.blocks[-1]
            take = min(block.shape[0] - self.fill, n - start)
            block[self.fill : self.fill + take] = rows[start : start + take]
            self.fill += take
            start += take
        self.n_rows += n

    def assemble(self, *, rows_are_samples: bool) -> np.ndarray:
        if rows_are_samples and len(self.blocks) == 1:
            return self.blocks.pop()[: self.fill]  # already in place; untouched tail costs no RSS
        if rows_are_samples:
            out = np.empty((self.n_rows, self.n_cols), dtype=np.float32)
        else:
            out = _empty_small_pages((self.n_cols, self.n_rows))
        row = 0
        while self.blocks:
            block = self.blocks.pop(0)
            used = self.fill if not self.blocks else block.shape[0]
            if rows_are_samples:
                out[row : row + used] = block[:used]
            else:
                out[:, row : row + used] = block[:used].T
            row += used
            del block
        return out


def _empty_small_pages(shape: tuple[int, int]) -> np.ndarray:
    """An uninitialised float32 array backed by ordinary (4 KiB) pages.

    Transposing block by block writes a thin column slab of every row. numpy asks
    for transparent huge pages, and one 2 MiB page spans dozens of rows, so the
    first slab would make the whole output resident while every block is still
    alive (2x the data). With small pages the output grows as blocks are freed.
    """
    nbytes = int(np.prod(shape)) * 4
    if nbytes < _BLOCK_BYTES or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.empty(shape, dtype=np.float32)
    buffer = mmap.mmap(-1, nbytes)
    buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype=np.float32).reshape(shape)


@dataclass
class _Chunk:
    lines: list[str]
    line_numbers: list[int]


def _line_chunks(path: Path) -> Iterator[_Chunk]:
    """Data lines (header and blank lines skipped) in chunks of about _CHUNK_TEXT chars."""
    with _open_text(path) as fh:
        header_seen = False
        chunk = _Chunk([], [])
        size = 0
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if not header_seen:
                header_seen = True
                continue
            chunk.lines.append(line)
            chunk.line_numbers.append(line_no)
            size += len(line)
            if size >= _CHUNK_TEXT:
                yield chunk
                chunk, size = _Chunk([], []), 0
        if chunk.lines:
            yield chunk


def _stream_text(
    path: Path, layout: _TextLayout, annot_idx: list[int], num_idx: list[int]
) -> tuple[list[list[str]], _Blocks]:
    """Parse the numeric block with numpy's C parser, straight to float32, chunk by chunk."""
    try:
        return _parse_chunks(path, layout, annot_idx, num_idx)
    except READ_ERRORS as err:
        raise _damaged(path, err) from err


def _parse_chunks(
    path: Path, layout: _TextLayout, annot_idx: list[int], num_idx: list[int]
) -> tuple[list[list[str]], _Blocks]:
    sep, n_fields, k = layout.sep, len(layout.names), len(annot_idx)
    leading = annot_idx == list(range(k))
    trailing = annot_idx == list(range(n_fields - k, n_fields))
    annot: list[list[str]] = [[] for _ in annot_idx]
    blocks = _Blocks(len(num_idx))
    for chunk in _line_chunks(path):
        _check_field_counts(path, layout, chunk)
        # Splitting off labels by hand is fast but blind to quoted separators.
        quoted = any('"' in line for line in chunk.lines)
        if leading and not quoted:
            parts = [line.split(sep, k) for line in chunk.lines]
            numeric, usecols = [p[k] for p in parts], None
            labels = [p[:k] for p in parts]
        elif trailing and not quoted:
            parts = [line.rstrip("\n").rsplit(sep, k) for line in chunk.lines]
            numeric, usecols = [p[0] for p in parts], None
            labels = [p[1:] for p in parts]
        else:
            numeric, usecols = chunk.lines, num_idx
            rows = csv.reader(chunk.lines, delimiter=sep)
            labels = [[row[i] for i in annot_idx] for row in rows]
        for column, values in zip(annot, zip(*labels, strict=True), strict=True):
            column.extend(v.strip().strip('"') for v in values)
        try:
            block = np.loadtxt(
                numeric,
                delimiter=sep,
                dtype=np.float32,
                usecols=usecols,
                ndmin=2,
                comments=None,
                quotechar='"',
            )
        except ValueError as err:
            _raise_bad_value(path, layout, chunk, annot_idx, num_idx, err)
        blocks.append(block)
    return annot, blocks


def _check_field_counts(path: Path, layout: _TextLayout, chunk: _Chunk) -> None:
    expected = len(layout.names) - 1
    for line, line_no in zip(chunk.lines, chunk.line_numbers, strict=True):
        if line.count(layout.sep) != expected and '"' not in line:
            raise InputFileError(
                f"{path} is ragged: line {line_no} has {line.count(layout.sep) + 1} fields but "
                f"the header has {len(layout.names)}. Fix: every row must have as many fields "
                "as the header; look for stray separators inside labels or truncated lines."
            )


def _raise_bad_value(
    path: Path,
    layout: _TextLayout,
    chunk: _Chunk,
    annot_idx: list[int],
    num_idx: list[int],
    err: ValueError,
) -> NoReturn:
    """Locate the first field numpy could not parse and say what it is (error path only)."""
    rows = csv.reader(chunk.lines, delimiter=layout.sep)
    for row, line_no in zip(rows, chunk.line_numbers, strict=True):
        for j in num_idx:
            text = row[j].strip() if j < len(row) else ""
            if _is_float(text):
                continue
            label = f" (row '{row[annot_idx[0]].strip()}')" if annot_idx else ""
            where = f"column '{layout.names[j]}', line {line_no}{label}"
            if text.lower() in _NA_TOKENS:
                raise ExpressionValueError(
                    f"missing value '{text}' in the expression values of {path}: {where}. "
                    "Fix: fill or drop missing values before reading (use 0 only if a missing "
                    "gene truly means no expression)."
                ) from err
            if _DECIMAL_COMMA_RE.match(text):
                raise ExpressionValueError(
                    f"non-numeric value '{text}' in the expression values of {path}: {where}: "
                    "it is written with a decimal comma, but bulkfm reads a point as the "
                    "decimal separator. Fix: export the table with decimal points (pandas "
                    "to_csv(decimal='.'), R write.table(dec='.'), or a spreadsheet in an "
                    "English locale)."
                ) from err
            raise ExpressionValueError(
                f"non-numeric value '{text}' in the expression values of {path}: {where}. "
                "Fix: the expression columns must hold only numbers; if this column is a "
                "label or annotation column, list it with annotation_columns=[...] (Python: "
                "bulkfm.data.readers.read_expression)."
            ) from err
    raise ExpressionValueError(
        f"cannot parse the expression values of {path} (lines {chunk.line_numbers[0]}-"
        f"{chunk.line_numbers[-1]}): {err}. Fix: the expression columns must hold only numbers."
    ) from err


# ----------------------------------------------------------------------------- parquet


def open_parquet(path: str | os.PathLike, *, what: str, fix: str) -> pq.ParquetFile:
    """``pq.ParquetFile(path)``; an unreadable file is an :class:`InputFileError` naming
    ``what`` it is and the ``fix``."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise InputFileError(f"cannot read {what}: {err}. Fix: {fix}.") from err


def _arrow_is_number(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype)


def _read_parquet(
    path: Path,
    *,
    orientation: str,
    annotation_columns: Sequence[str] | None,
    gene_column: str | None,
    sample_column: str | None,
) -> _Parsed:
    pf = open_parquet(
        path,
        what=f"parquet file {path}",
        fix="write it again (e.g. DataFrame.to_parquet) or check the download is complete",
    )
    schema = pf.schema_arrow
    names = list(schema.names)
    if len(set(names)) != len(names):
        raise InputFileError(
            f"{path} has duplicate column names, which parquet readers cannot address. "
            "Fix: make the column names unique or save the table as TSV."
        )
    n_rows = pf.metadata.num_rows
    if n_rows == 0:
        raise InputFileError(f"{path} has columns but no rows. Fix: write the table again.")
    index_cols = [
        c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)
    ]
    order = index_cols + [n for n in names if n not in index_cols]

    def cells(i: int) -> list[_Cell]:
        head = next(pf.iter_batches(batch_size=_PEEK_LINES, columns=[order[i]]), None)
        values = [] if head is None else _stripped(head.column(0).to_pylist())
        return [_Cell(None, str(k + 1), v) for k, v in enumerate(values)]

    annot_idx = _choose_annotation(
        path,
        order,
        lambda i: _arrow_is_number(schema.field(order[i]).type),
        annotation_columns=annotation_columns,
        gene_column=gene_column,
        sample_column=sample_column,
        leading_only=False,
        cells=cells,
    )
    annot_names = [order[i] for i in annot_idx]
    num_names = [n for n in order if n not in set(annot_names)]
    for name in num_names:
        if not _arrow_is_number(schema.field(name).type):
            raise ExpressionValueError(
                f"column '{name}' of {path} has type {schema.field(name).type}, not numbers. "
                "Fix: list it in read_expression's annotation_columns=[...] if it is a label, "
                "or store its "
                "values as numbers."
            )
    table = pf.read(columns=annot_names, use_threads=False)
    labels = _Labels(
        annotation={n: _stripped(table.column(n).to_pylist()) for n in annot_names},
        numeric_names=[_clean_label(n) for n in num_names],
    )
    del table
    file_orientation, detected, obs, var = _split_wide_labels(
        path,
        labels,
        orientation=orientation,
        gene_column=gene_column,
        sample_column=sample_column,
        n_rows=n_rows,
    )
    X = _parquet_values(pf, num_names, n_rows, rows_are_samples=file_orientation == SXG)
    return _Parsed(
        X=X,
        obs=obs,
        var=var,
        format="wide",
        orientation=file_orientation,
        orientation_detected=detected,
        annotation_columns=annot_names,
    )


def _clean_label(name: str) -> str:
    return str(name).strip()


def _parquet_values(
    pf: pq.ParquetFile, names: list[str], n_rows: int, *, rows_are_samples: bool
) -> np.ndarray:
    shape = (n_rows, len(names)) if rows_are_samples else (len(names), n_rows)
    out = np.empty(shape, dtype=np.float32)
    for start in range(0, len(names), _PARQUET_GROUP):
        group = names[start : start + _PARQUET_GROUP]
        table = pf.read(columns=group, use_threads=False)
        cols = np.empty((len(group), n_rows), dtype=np.float32)
        for k, name in enumerate(group):
            cols[k] = table.column(name).to_numpy()
        del table
        if rows_are_samples:
            out[:, start : start + len(group)] = cols.T
        else:
            out[start : start + len(group)] = cols
    return out


# ----------------------------------------------------------------------------- official CSV


def _read_bulkrnabert_csv(path: Path) -> _Parsed:
    """Official BulkRNABert input: rows are samples by definition, ids in the last column."""
    layout = _text_layout(path)
    if layout.names[-1] != _OFFICIAL_ID_COLUMN:
        raise InputFileError(
            f"{path} is not an official BulkRNABert CSV: its last column is "
            f"'{layout.names[-1]}', not '{_OFFICIAL_ID_COLUMN}'. Fix: use --format wide for "
            "other tables."
        )
    try:
        parsed = _read_delimited(
            path,
            orientation=SXG,
            annotation_columns=[_OFFICIAL_ID_COLUMN],
            gene_column=None,
            sample_column=_OFFICIAL_ID_COLUMN,
        )
    except OrientationError as err:
        raise OrientationError(
            f"{err} An official BulkRNABert CSV has one row per sample: genes as columns and "
            f"sample ids in '{_OFFICIAL_ID_COLUMN}'."
        ) from err
    parsed.format = "bulkrnabert_csv"
    return parsed


# ----------------------------------------------------------------------------- h5ad

_BUILD_HINT = "give an .h5ad written by `bulkfm data build` (or `bulkfm data simulate`)"


def read_h5ad(
    path: str | os.PathLike,
    *,
    flag: str = "--input",
    layer: str | None = None,
    check_units: bool = True,
    expression: bool = True,
    backed: bool = False,
) -> ad.AnnData:
    """Read the ``.h5ad`` a command was given, or say what is wrong with it.

    The one reader of samples x genes ``.h5ad`` inputs (``embed``/``impute --input``,
    ``bench --data``, ``pretrain``/``evaluate`` ``data.path``, ``data summary``). It checks
    that the file exists, is HDF5 (a TSV, parquet or gzip named ``.h5ad`` is recognised as
    such), reads to its end (a truncated copy is named as one) and holds a non-empty 2-D
    numeric ``X``; every failure is an :class:`InputFileError` naming ``flag``. With
    ``check_units``, the matrix a model will read (``X``, or ``layers[layer]``) must not
    look log-transformed (:func:`bulkfm.data.units.check_tpm`). ``expression=False`` reads
    an ``.h5ad`` that holds no expression matrix (e.g. embeddings in ``obsm``): only the
    file checks apply. ``backed=True`` leaves X on disk (anndata ``backed="r"``), for
    commands that read it in row blocks (``embed``); the unit check reads a row sample.
    """
    path = Path(path)
    what = f"{flag} {path}"
    hint = _BUILD_HINT if expression else "give an .h5ad written by anndata (`bulkfm embed`)"
    _check_h5ad_file(path, what, hint)
    adata = _load_h5ad(path, what, hint, backed=backed)
    if not expression:
        return adata
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputFileError(
            f"{what} holds no data ({adata.n_obs} samples x {adata.n_vars} genes). Fix: "
            f"{_BUILD_HINT} from non-empty expression files."
        )
    if layer is not None and layer not in adata.layers:
        raise InputFileError(
            f"{what} has no layers[{layer!r}] (layers: {list(adata.layers)}). Fix: name one "
            "of those, or none to use X."
        )
    matrix = adata.X if layer is None else adata.layers[layer]
    name = "X" if layer is None else f"layers[{layer!r}]"
    if matrix is None:
        raise InputFileError(
            f"{what} has no {name} matrix (no expression values). Fix: {_BUILD_HINT}."
        )
    dtype = getattr(matrix, "dtype", None)
    if len(matrix.shape) != 2 or dtype is None or not np.issubdtype(dtype, np.number):
        raise InputFileError(
            f"{what}: {name} is not a 2-D numeric matrix (shape {matrix.shape}, dtype "
            f"{dtype}). Fix: {_BUILD_HINT}."
        )
    if check_units:
        check_tpm(matrix, source=f"{what} ({name})", adata=adata)
    return adata


def _check_h5ad_file(path: Path, what: str, hint: str = _BUILD_HINT) -> None:
    if not path.exists():
        raise InputFileError(
            f"{what} does not exist. Fix: check the path (relative paths start at "
            f"{Path.cwd()}); {hint}."
        )
    if path.is_dir():
        raise InputFileError(f"{what} is a folder, not an .h5ad file. Fix: {hint}.")
    size = path.stat().st_size
    if size == 0:
        raise InputFileError(f"{what} is empty (0 bytes). Fix: {hint}.")
    if _is_hdf5(path, size):
        return
    head = _magic(path, 8)
    if (
        head[:2] == _GZIP_MAGIC
        or head[:4] == _PARQUET_MAGIC
        or path.suffix.lower()
        in (
            *_TEXT_SUFFIXES,
            *_PARQUET_SUFFIXES,
            ".gz",
        )
    ):
        looks = "a gzip file" if head[:2] == _GZIP_MAGIC else "a table"
        if head[:4] == _PARQUET_MAGIC:
            looks = "a parquet table"
        raise InputFileError(
            f"{what} is {looks}, not an .h5ad (AnnData) file. Fix: turn the expression "
            f"table into one first: `bulkfm data build {path} -o data.h5ad`, then pass "
            "data.h5ad."
        )
    raise InputFileError(
        f"{what} is not an .h5ad file: it does not start with the HDF5 signature (it is "
        f"{'text' if _looks_like_text(head) else 'some other binary format'}). Fix: "
        f"{hint}; an expression table becomes one with `bulkfm data build`."
    )


def _is_hdf5(path: Path, size: int) -> bool:
    """HDF5's signature sits at offset 0, or 512, 1024, ... after a user block."""
    with open(path, "rb") as fh:
        offset = 0
        while offset + len(_HDF5_MAGIC) <= size and offset <= 2**20:
            fh.seek(offset)
            if fh.read(len(_HDF5_MAGIC)) == _HDF5_MAGIC:
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(32 <= b < 127 or b in (9, 10, 13) for b in head)


def _load_h5ad(
    path: Path, what: str, hint: str = _BUILD_HINT, *, backed: bool = False
) -> ad.AnnData:
    try:
        return ad.read_h5ad(path, backed="r") if backed else ad.read_h5ad(path)
    except MemoryError:
        raise
    except Exception as err:  # h5py/anndata raise many types for damaged files
        reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        truncated = "truncated" in reason or "eof" in reason.lower()
        raise InputFileError(
            f"cannot read {what}: "
            + (
                "the file is truncated (an incomplete download or copy)"
                if truncated
                else "it is HDF5 but not a readable AnnData (damaged, or written by another tool)"
            )
            + f" ({_error_name(err)}: {reason}). Fix: copy or write the file again; "
            f"{hint}."
        ) from err


def _read_h5ad(path: Path, *, orientation: str) -> _Parsed:
    what = f"expression file {path}"
    _check_h5ad_file(path, what)
    adata = _load_h5ad(path, what)
    if adata.X is None:
        raise InputFileError(
            f"{path} has no X matrix. Fix: store the expression values in adata.X."
        )
    rows = _evidence(list(adata.obs_names))
    cols = _evidence(list(adata.var_names))
    if orientation == "auto":
        if _orientation_from_labels(rows, cols) == GXS:
            raise OrientationError(
                f"{path} has gene ids as obs_names (e.g. {', '.join(rows.examples)}) and "
                f"sample-like var_names (e.g. {', '.join(cols.examples)}): AnnData must be "
                "samples x genes. Fix: write adata.T instead, or pass "
                "--orientation genes_x_samples (orientation= in Python) to transpose on reading."
            )
        file_orientation, detected = SXG, True
    else:
        file_orientation, detected = _resolve_orientation(
            path, orientation, rows, cols, adata.shape
        )
    if file_orientation == GXS:
        adata = adata.T
    X = adata.X
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    X = np.ascontiguousarray(X, dtype=np.float32)
    var = adata.var.copy()
    var.index = _str_index(adata.var_names)
    if "raw_id" not in var.columns:
        var.insert(0, "raw_id", list(var.index))
    obs = adata.obs.copy()
    obs.index = _str_index(adata.obs_names)
    return _Parsed(
        X=X,
        obs=obs,
        var=var,
        format="h5ad",
        orientation=file_orientation,
        orientation_detected=detected,
        annotation_columns=[],
        uns=dict(adata.uns),
        layers=dict(adata.layers),
        obsm=dict(adata.obsm),
        varm=dict(adata.varm),
    )


# ----------------------------------------------------------------------------- GDC


def _gdc_header_columns(lines: Sequence[str]) -> list[str] | None:
    """Columns of a GDC STAR-counts header (after the '#' line), or None if not one."""
    body = [ln for ln in lines if not ln.startswith("#")]
    if not body:
        return None
    columns = body[0].rstrip("\r\n").split("\t")
    if columns[0] == "gene_id" and ("unstranded" in columns or "tpm_unstranded" in columns):
        return columns
    return None


def _gdc_files(path: Path, sample_sheet: Path | None) -> list[Path]:
    if path.is_file():
        return [path]
    candidates = sorted(
        p
        for pattern in ("*", "*/*")
        for p in path.glob(pattern)
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and _compression_free_suffix(p) in (".tsv", ".txt")
    )
    sheet = sample_sheet.resolve() if sample_sheet is not None else None
    files: list[Path] = []
    skipped: list[Path] = []
    for p in candidates:
        is_gdc = (
            p.resolve() != sheet
            and p.stat().st_size > 0
            and _gdc_header_columns(_peek_lines(p, max_lines=2)) is not None
        )
        (files if is_gdc else skipped).append(p)
    if skipped:
        names = [p.name for p in skipped]
        logger.info("%s: skipped %d non-GDC file(s): %s", path, len(names), names[:5])
    if not files:
        raise InputFileError(
            f"no GDC STAR-counts files found in {path} or its sub-folders (looked for .tsv "
            "files whose header starts with gene_id). Fix: point to the folder of the GDC "
            "download (gdc-client or the extracted cart archive)."
        )
    return files


def _gdc_sample_id(file: Path) -> str:
    name = file.name
    for suffix in (".gz", ".tsv", ".txt", _GDC_SUFFIX):
        name = name.removesuffix(suffix)
    return name


def _read_sample_sheet(sheet: Path, files: list[Path]) -> pd.DataFrame:
    """Sheet rows aligned with ``files`` (index = file position)."""
    if not sheet.is_file():
        raise InputFileError(f"--sample-sheet {sheet} does not exist. Fix: check the path.")
    try:
        table = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
    except (
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
        UnicodeDecodeError,
        *READ_ERRORS,
    ) as err:
        raise InputFileError(
            f"cannot read --sample-sheet {sheet} ({err}). Fix: use the tab-separated 'Sample "
            "Sheet' downloaded from the GDC cart."
        ) from err
    table.columns = [c.strip() for c in table.columns]
    needed = ["File Name", "Sample ID"]
    if any(c not in table.columns for c in needed):
        raise InputFileError(
            f"sample sheet {sheet} lacks column(s) {[c for c in needed if c not in table.columns]} "
            f"(it has {list(table.columns)[:8]}). Fix: use the tab-separated 'Sample Sheet' "
            "downloaded from the GDC cart."
        )
    table = table.drop_duplicates("File Name").set_index("File Name")
    keys = []
    for f in files:
        key = f.name if f.name in table.index else f.name.removesuffix(".gz")
        keys.append(key)
    missing = [f.name for f, k in zip(files, keys, strict=True) if k not in table.index]
    if missing:
        raise InputFileError(
            f"sample sheet {sheet} has no row for {len(missing)} of {len(files)} files "
            f"(e.g. {missing[:5]}). Fix: use the sample sheet of this exact download, or "
            "remove the extra files from the folder."
        )
    unused = len(table) - len(set(keys))
    if unused:
        logger.info("sample sheet %s lists %d file(s) not in the folder", sheet, unused)
    return table.loc[keys].reset_index()


def _gdc_obs(files: list[Path], sheet: pd.DataFrame | None) -> pd.DataFrame:
    if sheet is None:
        return pd.DataFrame(
            {"file_name": [f.name for f in files]},
            index=_str_index([_gdc_sample_id(f) for f in files]),
        )
    obs = pd.DataFrame({"file_name": [f.name for f in files]}, index=_str_index(sheet["Sample ID"]))
    if "Project ID" in sheet:
        project = sheet["Project ID"].str.strip().to_numpy()
        obs["project_id"] = project
        obs[COHORT] = [p.removeprefix("TCGA-") for p in project]
    if "Case ID" in sheet:
        obs[PATIENT] = sheet["Case ID"].str.strip().to_numpy()
    if "Sample Type" in sheet:
        obs["gdc_sample_type"] = sheet["Sample Type"].str.strip().to_numpy()
    return obs


def _read_gdc_table(file: Path, columns: list[str], skip: int) -> pa.Table:
    types = {c: (pa.string() if c in _GDC_ID_COLUMNS else pa.float32()) for c in columns}
    try:
        return pacsv.read_csv(
            _arrow_stream(file),
            read_options=pacsv.ReadOptions(skip_rows=skip),
            parse_options=pacsv.ParseOptions(delimiter="\t"),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns, column_types=types, strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as err:
        if "conversion error" not in str(err):
            raise InputFileError(
                f"cannot parse GDC file {file}: {str(err)[:300]}. Fix: download it again; it "
                "looks damaged or truncated."
            ) from err
        raise ExpressionValueError(
            f"non-numeric value in GDC file {file}: {str(err)[:300]}. Fix: the value columns "
            "must hold numbers; download the file again if it is damaged."
        ) from err
    except (pa.ArrowException, *READ_ERRORS) as err:
        raise InputFileError(
            f"cannot read GDC file {file}: {str(err)[:300]}. Fix: every file must have the "
            f"columns {columns}; download it again if it is damaged."
        ) from err


def _read_gdc(path: Path, *, value_column: str, sample_sheet: str | os.PathLike | None) -> _Parsed:
    sheet_path = Path(sample_sheet) if sample_sheet is not None else None
    files = _gdc_files(path, sheet_path)
    first_lines = _peek_lines(files[0], max_lines=2)
    header = _gdc_header_columns(first_lines)
    if header is None:
        raise InputFileError(
            f"{files[0]} is not a GDC STAR-counts file: its header does not start with gene_id "
            "and name unstranded/tpm_unstranded columns. Fix: use --format wide for tables."
        )
    if value_column not in header:
        choices = [c for c in header if c not in _GDC_ID_COLUMNS]
        raise InputFileError(
            f"--value-column {value_column} (value_column=) is not a column of the GDC file "
            f"{files[0].name}; "
            f"available: {choices}. Fix: pass one of those (tpm_unstranded for TPM, "
            "unstranded for raw counts)."
        )
    sheet = _read_sample_sheet(sheet_path, files) if sheet_path is not None else None
    obs = _gdc_obs(files, sheet)
    id_columns = [c for c in _GDC_ID_COLUMNS if c in header]
    skip = int(first_lines[0].startswith("#"))
    first = _read_gdc_table(files[0], [*id_columns, value_column], skip)
    gene_ids = first.column("gene_id")
    keep = ~np.isin(np.asarray(gene_ids.to_pylist(), dtype=object), _GDC_COUNT_ROWS)
    X = np.empty((len(files), int(keep.sum())), dtype=np.float32)
    X[0] = first.column(value_column).to_numpy()[keep]
    for i, file in enumerate(tqdm(files[1:], desc="GDC files", disable=None), start=1):
        skip_i = int(_peek_lines(file, max_lines=1)[0].startswith("#"))
        table = _read_gdc_table(file, ["gene_id", value_column], skip_i)
        if not table.column("gene_id").equals(gene_ids):
            raise InputFileError(
                f"GDC file {file} has a different gene list than {files[0]} "
                f"({_first_difference(table.column('gene_id'), gene_ids)}). Fix: read files "
                "from one GDC release/pipeline together, or read them separately."
            )
        X[i] = table.column(value_column).to_numpy()[keep]
    var = _gdc_var(first, id_columns, keep)
    logger.info("GDC: %d file(s) from %s, value column %s", len(files), path, value_column)
    return _Parsed(
        X=X,
        obs=obs,
        var=var,
        format="gdc",
        orientation=GXS,
        orientation_detected=False,
        annotation_columns=[c for c in id_columns if c != "gene_id"],
        extra={"value_column": value_column, "n_files": len(files)}
        | ({"sample_sheet": str(sheet_path)} if sheet_path is not None else {}),
    )


def _gdc_var(first: pa.Table, id_columns: list[str], keep: np.ndarray) -> pd.DataFrame:
    names = {
        c: [v for v, k in zip(_stripped(first.column(c).to_pylist()), keep, strict=True) if k]
        for c in id_columns
    }
    var = pd.DataFrame({"raw_id": names["gene_id"]}, index=_str_index(names["gene_id"]))
    for col, target in (("gene_name", SYMBOL), ("gene_type", "gene_type")):
        if col in names:
            var[target] = names[col]
    return var


def _first_difference(a: pa.ChunkedArray, b: pa.ChunkedArray) -> str:
    if len(a) != len(b):
        return f"{len(a)} rows instead of {len(b)}"
    left, right = a.to_pylist(), b.to_pylist()
    i = next(k for k, (x, y) in enumerate(zip(left, right, strict=True)) if x != y)
    return f"row {i + 1} is '{left[i]}' instead of '{right[i]}'"


# ----------------------------------------------------------------------------- ARCHS4


def _read_archs4(path: Path, selection: archs4.Archs4Selection | None) -> _Parsed:
    """ARCHS4 counts of the selected samples; genes x samples in the file."""
    got = archs4.read_archs4(path, selection)
    return _Parsed(
        X=got.X,
        obs=got.obs,
        var=got.var,
        format="archs4",
        orientation=GXS if got.info["archs4_layout"] == GXS else SXG,
        orientation_detected=True,
        annotation_columns=[],
        extra={k: v for k, v in got.info.items() if v is not None},
    )
