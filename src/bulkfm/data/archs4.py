"""Read samples out of an ARCHS4 gene-count file without loading the whole matrix.

ARCHS4 (maayanlab.cloud/archs4) re-aligns public GEO RNA-seq with one pipeline and ships
each species as one HDF5 file of several hundred thousand samples, far too large to
read into memory. This module selects samples by their GEO metadata (series, a regex on
the free-text source/title/characteristics, an explicit list of GSM ids, the
single-cell probability ARCHS4 assigns) and genes, then reads only the selected
columns, block by block, so memory stays bounded by the block size.

Supported layout (the "v2" gene files, ``human_gene_v2.*.h5``, as listed by the
official ``archs4py.ls``/``archs4r`` packages):

- ``data/expression``: integer counts, genes x samples (one column per sample), chunked;
  a samples x genes matrix is also accepted, told apart by the axis lengths.
- ``meta/genes/symbol`` (``gene_symbol`` in the older v1 files),
  ``meta/genes/ensembl_gene`` (absent in v1: symbols are then mapped later),
  ``meta/genes/biotype`` (optional).
- ``meta/samples/geo_accession`` (GSM ids), ``series_id``, ``source_name_ch1``,
  ``title``, ``characteristics_ch1``, ``singlecellprobability`` (optional) and more.
- ``meta/info/version`` (optional, recorded for provenance).

The result is raw counts with Ensembl ids as gene names and symbols kept, the same
shape of data a GDC count file gives, so ``bulkfm data build`` harmonises genes and
converts to TPM exactly as for any count input. :func:`iter_archs4` streams the
selection in sample blocks; pre-training reads the file directly (``data.format:
archs4``, :class:`bulkfm.train.stream.Archs4Source`) through :func:`read_counts`.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd

from bulkfm.config import check_int, check_probability
from bulkfm.errors import ConfigError, InputFileError
from bulkfm.schema import STUDY, SYMBOL

logger = logging.getLogger(__name__)

__all__ = [
    "Archs4File",
    "Archs4Read",
    "Archs4Selection",
    "is_archs4",
    "iter_archs4",
    "read_archs4",
    "read_counts",
    "read_id_list",
]

EXPRESSION = "data/expression"
SAMPLES = "meta/samples"
GENES = "meta/genes"
SAMPLE_ID_FIELD = "geo_accession"
SERIES_FIELD = "series_id"
SINGLECELL_FIELD = "singlecellprobability"
#: Free-text fields the ``source`` regex searches (those present in the file).
TEXT_FIELDS = ("source_name_ch1", "title", "characteristics_ch1")
#: Sample fields copied into ``obs`` when present.
OBS_FIELDS = (SERIES_FIELD, *TEXT_FIELDS, SINGLECELL_FIELD)
_SYMBOL_FIELDS = ("symbol", "gene_symbol")
_ENSEMBL_FIELD = "ensembl_gene"
_BIOTYPE_FIELD = "biotype"
_LAYOUT = (
    f"an ARCHS4 gene file has {EXPRESSION} (genes x samples counts), "
    f"{SAMPLES}/{SAMPLE_ID_FIELD} and {GENES}/symbol (ARCHS4 v2, e.g. human_gene_v2.5.h5)"
)
#: Samples per read: bounds memory at block x genes-span x 4 bytes (512 x 67k ~ 138 MB).
DEFAULT_BLOCK = 512
_N_EXAMPLES = 5


@dataclass(frozen=True)
class Archs4Selection:
    """Which samples and genes to take from an ARCHS4 file; filters combine with AND.

    - ``series``: GEO series ids (``GSE...``); a sample listed under several series
      matches any of them.
    - ``source``: a case-insensitive regular expression searched in each sample's
      ``source_name_ch1``, ``title`` and ``characteristics_ch1`` (e.g. ``"liver|hepat"``).
    - ``samples``: GSM ids; every id must be in the file.
    - ``genes``: Ensembl ids (version ignored) or symbols; default all genes.
    - ``max_singlecell_probability``: drop samples ARCHS4 predicts to be single-cell
      (its ``singlecellprobability`` above this; ARCHS4 suggests 0.5).
    """

    series: list[str] | None = None
    source: str | None = None
    samples: list[str] | None = None
    genes: list[str] | None = None
    max_singlecell_probability: float | None = None

    def __post_init__(self) -> None:
        for name in ("series", "samples", "genes"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, str) or not all(isinstance(v, str) for v in value)
            ):
                raise ConfigError(
                    f"archs4.{name} must be a list of strings, got {value!r}. Fix: write it "
                    f"as a YAML list, e.g. {name}: [{'GSE' if name == 'series' else ''}...]"
                )
        if self.source is not None:
            try:
                re.compile(self.source)
            except re.error as exc:
                raise ConfigError(
                    f"archs4.source (--archs4-source) {self.source!r} is not a valid regular "
                    f"expression: {exc}. Fix: escape special characters, e.g. 'T\\.cell'."
                ) from exc
        if self.max_singlecell_probability is not None:
            check_probability(
                "archs4.max_singlecell_probability (--archs4-max-singlecell)",
                self.max_singlecell_probability,
            )

    @property
    def filters_samples(self) -> bool:
        """Whether any sample filter is set (an unfiltered read is the whole file)."""
        return any(
            v is not None
            for v in (self.series, self.source, self.samples, self.max_singlecell_probability)
        )


@dataclass
class Archs4Read:
    """Counts of the selected samples (samples x genes, float32) and their metadata."""

    X: np.ndarray
    obs: pd.DataFrame
    var: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


def read_id_list(text: str | os.PathLike) -> list[str]:
    """Ids from a file (one per line, ``#`` comments) when ``text`` names one, else from a
    comma-separated string: how ``--archs4-samples``/``--archs4-series`` take either."""
    path = Path(text)
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        ids = [ln.split("#", 1)[0].strip() for ln in lines]
    else:
        ids = [t.strip() for t in str(text).split(",")]
    return [i for i in ids if i]


def is_archs4(path: str | os.PathLike) -> bool:
    """True for an HDF5 file with ARCHS4's expression and sample-id datasets."""
    import h5py  # type: ignore[import-untyped]

    try:
        with h5py.File(path, "r") as handle:
            return EXPRESSION in handle and f"{SAMPLES}/{SAMPLE_ID_FIELD}" in handle
    except OSError:
        return False


def _strings(dataset: Any) -> np.ndarray:
    """A 1-D string dataset (fixed or variable length, bytes or str) as an object array."""
    if dataset.dtype.kind in ("S", "O", "U"):
        return np.asarray(dataset.asstr()[()], dtype=object)
    return np.asarray(dataset[()]).astype(str).astype(object)


class Archs4File:
    """An open ARCHS4 gene file: metadata in memory, counts read on demand.

    Use as a context manager. ``expression`` is the h5py dataset every count read goes
    through (one ``expression[...]`` call per block), so tests can wrap it to check
    which entries are read.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise InputFileError(
                f"ARCHS4 file {self.path} does not exist. Fix: check the path, or download it "
                "from https://maayanlab.cloud/archs4/download.html."
            )
        try:
            self._handle = h5py.File(self.path, "r")
        except OSError as err:
            raise InputFileError(
                f"{self.path} is not an HDF5 file ({err}), so not an ARCHS4 file: {_LAYOUT}. "
                "Fix: pass the .h5 gene file as downloaded (not gzipped, not truncated)."
            ) from err
        try:
            self._load_meta()
        except Exception:
            self._handle.close()
            raise

    def _load_meta(self) -> None:
        handle = self._handle
        missing = [
            name
            for name in (EXPRESSION, f"{SAMPLES}/{SAMPLE_ID_FIELD}", GENES)
            if name not in handle
        ]
        if missing:
            raise InputFileError(
                f"{self.path} is HDF5 but not an ARCHS4 gene file: it lacks {missing} "
                f"(top-level groups: {sorted(handle.keys())}); {_LAYOUT}. Fix: pass the ARCHS4 "
                "gene-level file (the transcript-level file is not supported), or read an "
                "AnnData with --format h5ad."
            )
        self.expression: Any = handle[EXPRESSION]
        genes = handle[GENES]
        symbol_field = next((f for f in _SYMBOL_FIELDS if f in genes), None)
        if symbol_field is None and _ENSEMBL_FIELD not in genes:
            raise InputFileError(
                f"{self.path}: {GENES} has neither symbol nor {_ENSEMBL_FIELD} (fields: "
                f"{sorted(genes.keys())}); {_LAYOUT}. Fix: pass an ARCHS4 gene-level file."
            )
        self.sample_ids = _strings(handle[SAMPLES][SAMPLE_ID_FIELD])
        symbols = _strings(genes[symbol_field]) if symbol_field else None
        ensembl = _strings(genes[_ENSEMBL_FIELD]) if _ENSEMBL_FIELD in genes else None
        n_genes = len(ensembl if ensembl is not None else symbols)  # type: ignore[arg-type]
        n_samples = len(self.sample_ids)
        shape = tuple(self.expression.shape)
        if shape == (n_genes, n_samples):
            self.genes_x_samples = True
        elif shape == (n_samples, n_genes):
            self.genes_x_samples = False
        else:
            raise InputFileError(
                f"{self.path}: {EXPRESSION} has shape {shape}, but the file lists {n_genes} "
                f"genes and {n_samples} samples; the file is damaged or not ARCHS4. Fix: "
                "download it again."
            )
        var = pd.DataFrame(index=pd.RangeIndex(n_genes))
        if ensembl is not None:
            var["raw_id"] = ensembl
        if symbols is not None:
            var[SYMBOL] = symbols
            if ensembl is None:
                var["raw_id"] = symbols
        if _BIOTYPE_FIELD in genes:
            var["gene_biotype"] = _strings(genes[_BIOTYPE_FIELD])
        self.genes = var
        info = handle.get("meta/info")
        self.version = (
            str(_strings(info["version"]).reshape(-1)[0])
            if info is not None and "version" in info
            else None
        )
        self._fields: dict[str, np.ndarray] = {}

    # -- context manager
    def __enter__(self) -> Archs4File:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HDF5 file (metadata already read stays usable)."""
        self._handle.close()

    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def field(self, name: str) -> np.ndarray | None:
        """One sample metadata field for every sample (read once, cached); None if absent."""
        if name not in self._fields:
            samples = self._handle[SAMPLES]
            if name not in samples:
                return None
            dataset = samples[name]
            if dataset.dtype.kind in ("f", "i", "u"):
                self._fields[name] = np.asarray(dataset[()])
            else:
                self._fields[name] = _strings(dataset)
        return self._fields[name]

    # -- selection
    def select_samples(self, selection: Archs4Selection) -> tuple[np.ndarray, dict[str, int]]:
        """Sorted positions of the samples passing every filter, and how many each kept."""
        keep = np.ones(self.n_samples, dtype=bool)
        counts: dict[str, int] = {"in_file": self.n_samples}
        if selection.samples is not None:
            keep &= self._sample_mask(selection.samples)
            counts["samples"] = int(keep.sum())
        if selection.series is not None:
            keep &= self._series_mask(selection.series)
            counts["series"] = int(keep.sum())
        if selection.source is not None:
            keep &= self._source_mask(selection.source)
            counts["source"] = int(keep.sum())
        if selection.max_singlecell_probability is not None:
            prob = self.field(SINGLECELL_FIELD)
            if prob is None:
                raise InputFileError(
                    f"{self.path} has no {SAMPLES}/{SINGLECELL_FIELD}, so "
                    "--archs4-max-singlecell (archs4.max_singlecell_probability) cannot "
                    "filter. Fix: drop that setting (older ARCHS4 files lack the field)."
                )
            keep &= np.asarray(prob, dtype=float) <= selection.max_singlecell_probability
            counts["max_singlecell_probability"] = int(keep.sum())
        index = np.flatnonzero(keep)
        if index.size == 0:
            steps = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise InputFileError(
                f"the ARCHS4 selection matched no sample of {self.path} (samples left after "
                f"each filter, in order: {steps}). Fix: loosen the filter that drops to 0 "
                "(--archs4-series, --archs4-source, --archs4-samples, --archs4-max-singlecell)."
            )
        return index, counts

    def _sample_mask(self, wanted: Sequence[str]) -> np.ndarray:
        wanted_set = {w.strip() for w in wanted}
        found = pd.Index(self.sample_ids).isin(list(wanted_set))
        unknown = sorted(wanted_set - set(self.sample_ids[found]))
        if unknown:
            raise InputFileError(
                f"{len(unknown)} of {len(wanted_set)} sample ids given to --archs4-samples "
                f"(archs4.samples) are not in {self.path}, e.g. {unknown[:_N_EXAMPLES]} (the "
                f"file's ids are GEO sample accessions, e.g. "
                f"{list(self.sample_ids[:3])}). Fix: remove them, or use the ARCHS4 release "
                "that contains them."
            )
        return np.asarray(found)

    def _series_mask(self, wanted: Sequence[str]) -> np.ndarray:
        series = self.field(SERIES_FIELD)
        if series is None:
            raise InputFileError(
                f"{self.path} has no {SAMPLES}/{SERIES_FIELD}. Fix: select by "
                "--archs4-samples or --archs4-source instead."
            )
        wanted_set = {w.strip().upper() for w in wanted}
        # A sample in several series lists them comma-separated.
        members = [
            {s.strip().upper() for s in re.split(r"[,;\s]+", str(v)) if s.strip()} for v in series
        ]
        mask = np.array([bool(m & wanted_set) for m in members], dtype=bool)
        present = set().union(*members) if members else set()
        absent = sorted(wanted_set - present)
        if absent:
            logger.warning(
                "ARCHS4: %d of %d series are not in %s: %s",
                len(absent),
                len(wanted_set),
                self.path,
                absent[:_N_EXAMPLES],
            )
        return mask

    def _source_mask(self, pattern: str) -> np.ndarray:
        regex = re.compile(pattern, re.IGNORECASE)
        fields = [f for f in TEXT_FIELDS if self.field(f) is not None]
        if not fields:
            raise InputFileError(
                f"{self.path} has none of the text fields {list(TEXT_FIELDS)} under {SAMPLES}, "
                "so --archs4-source (archs4.source) cannot search. Fix: select by series or "
                "sample ids."
            )
        mask = pd.Series(False, index=pd.RangeIndex(self.n_samples))
        for name in fields:
            text = pd.Series(self.field(name), dtype=object).astype(str)
            mask |= text.str.contains(regex, regex=True)
        return mask.to_numpy(dtype=bool)

    def select_genes(self, genes: Sequence[str] | None) -> np.ndarray:
        """Sorted positions of the requested genes (Ensembl ids or symbols); all if None."""
        if genes is None:
            return np.arange(self.n_genes)
        ensembl = self.genes["raw_id"].astype(str).str.split(".", n=1).str[0].str.upper()
        symbol = (
            self.genes[SYMBOL].astype(str).str.upper()
            if SYMBOL in self.genes
            else pd.Series([""] * self.n_genes)
        )
        wanted = {
            g.strip().split(".", 1)[0].upper()
            if g.strip().upper().startswith("ENS")
            else g.strip().upper()
            for g in genes
        }
        mask = (ensembl.isin(list(wanted)) | symbol.isin(list(wanted))).to_numpy()
        if not mask.any():
            raise InputFileError(
                f"none of the {len(wanted)} genes given to archs4.genes is in {self.path} "
                f"(given e.g. {sorted(wanted)[:3]}; file has e.g. "
                f"{list(self.genes['raw_id'][:3])}). Fix: pass Ensembl gene ids or symbols."
            )
        found = set(ensembl[mask]) | set(symbol[mask])
        absent = sorted(wanted - found)
        if absent:
            logger.warning(
                "ARCHS4: %d of %d requested genes are not in %s, e.g. %s",
                len(absent),
                len(wanted),
                self.path,
                absent[:_N_EXAMPLES],
            )
        return np.flatnonzero(mask)

    # -- counts
    def read(
        self, sample_index: np.ndarray, gene_index: np.ndarray, *, block: int = DEFAULT_BLOCK
    ) -> np.ndarray:
        """Counts [samples, genes] (float32) for sorted positions, read block by block."""
        out = np.empty((len(sample_index), len(gene_index)), dtype=np.float32)
        for start, values in self.iter_blocks(sample_index, gene_index, block=block):
            out[start : start + len(values)] = values
        return out

    def iter_blocks(
        self, sample_index: np.ndarray, gene_index: np.ndarray, *, block: int = DEFAULT_BLOCK
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(offset into ``sample_index``, counts [block, genes]) per block of samples.

        Each block is one h5py read of the selected sample columns over the span of the
        selected genes (h5py needs increasing indices and one fancy axis), so no read
        touches an unselected sample and memory stays at block x gene span.
        """
        check_int("block", block, 1)
        samples = np.asarray(sample_index, dtype=np.int64)
        genes = np.asarray(gene_index, dtype=np.int64)
        if samples.size and np.any(np.diff(samples) <= 0):
            raise ConfigError("sample positions must be strictly increasing (sorted, unique)")
        if genes.size == 0:
            raise ConfigError("no gene selected: pass at least one gene position")
        if np.any(np.diff(genes) <= 0):
            raise ConfigError("gene positions must be strictly increasing (sorted, unique)")
        for start in range(0, samples.size, block):
            cols = samples[start : start + block]
            yield start, read_counts(self.expression, cols, genes, self.genes_x_samples)

    def obs(self, sample_index: np.ndarray) -> pd.DataFrame:
        """Sample metadata of the selected samples (index = GSM ids)."""
        obs = pd.DataFrame(index=pd.Index(self.sample_ids[sample_index], dtype=object))
        for name in OBS_FIELDS:
            values = self.field(name)
            if values is not None:
                obs[name] = values[sample_index]
        obs[STUDY] = "ARCHS4"
        return obs

    def var(self, gene_index: np.ndarray) -> pd.DataFrame:
        """Gene metadata of the selected genes (index = Ensembl id, else symbol)."""
        var = self.genes.iloc[gene_index].copy()
        var.index = pd.Index(var["raw_id"].astype(str).to_numpy(), dtype=object)
        return var


def read_counts(
    expression: Any, samples: np.ndarray, genes: np.ndarray, genes_x_samples: bool
) -> np.ndarray:
    """Counts [samples, genes] (float32, C order) of sorted, unique positions in ONE read.

    ``expression`` is the ``data/expression`` dataset (an open h5py handle). The read
    covers the selected sample columns over the span of the selected genes (h5py takes
    one fancy axis with increasing indices), so each HDF5 chunk under the selection is
    decompressed once per call: reading many samples in one call, sorted, is what makes
    the column-chunked ARCHS4 layout affordable (:class:`Archs4File` reads blocks,
    :class:`bulkfm.train.stream.Archs4Source` a micro-batch or a fitting block).
    """
    lo, hi = int(genes[0]), int(genes[-1]) + 1
    rows = genes - lo
    picked = _as_selection(samples)
    if genes_x_samples:
        slab = np.asarray(expression[lo:hi, picked])
        values = slab[rows, :].T
    else:
        slab = np.asarray(expression[picked, lo:hi])
        values = slab[:, rows]
    return np.ascontiguousarray(values, dtype=np.float32)


def _as_selection(cols: np.ndarray) -> slice | list[int]:
    """A contiguous run as a slice (one hyperslab), otherwise the sorted list."""
    if cols.size and cols[-1] - cols[0] + 1 == cols.size:
        return slice(int(cols[0]), int(cols[-1]) + 1)
    return cols.tolist()


def read_archs4(
    path: str | os.PathLike,
    selection: Archs4Selection | None,
    *,
    block: int = DEFAULT_BLOCK,
) -> Archs4Read:
    """Counts and metadata of the selected ARCHS4 samples (samples x genes, float32).

    A sample filter is required: the whole human file holds ~10^5-10^6 samples x 67k
    genes, hundreds of GB as floats; stream it with :func:`iter_archs4` instead.
    """
    if selection is None or not selection.filters_samples:
        raise ConfigError(
            f"reading ARCHS4 file {path} needs a sample selection (the whole file does not "
            "fit in memory). Fix: pass --archs4-series GSE..., --archs4-source REGEX, "
            "--archs4-samples GSM... or --archs4-max-singlecell (archs4: {series: [...], "
            "source: ..., samples: [...]} in a build config); to stream every sample for "
            "pre-training use bulkfm.data.archs4.iter_archs4."
        )
    with Archs4File(path) as archs4:
        samples, counts = archs4.select_samples(selection)
        genes = archs4.select_genes(selection.genes)
        X = archs4.read(samples, genes, block=block)
        obs = archs4.obs(samples)
        var = archs4.var(genes)
        info = {
            "archs4_version": archs4.version,
            "archs4_layout": "genes_x_samples" if archs4.genes_x_samples else "samples_x_genes",
            "archs4_samples_in_file": archs4.n_samples,
            "archs4_genes_in_file": archs4.n_genes,
            "archs4_filter_counts": counts,
        }
    logger.info(
        "ARCHS4 %s: %d of %d samples (%s), %d of %d genes",
        path,
        len(samples),
        info["archs4_samples_in_file"],
        counts,
        len(genes),
        info["archs4_genes_in_file"],
    )
    return Archs4Read(X=X, obs=obs, var=var, info=info)


def iter_archs4(
    path: str | os.PathLike,
    selection: Archs4Selection | None = None,
    *,
    chunk_size: int = 1024,
) -> Iterator[Any]:
    """Stream the selection (every sample when None) as AnnData chunks of raw counts.

    For pre-training on the compendium: each chunk holds ``chunk_size`` samples
    (the last fewer), X float32 counts, obs/var as :func:`read_archs4` gives them, and
    only that chunk is in memory. Counts are not converted: the caller decides units.
    """
    import anndata as ad

    check_int("chunk_size", chunk_size, 1)
    selection = selection or Archs4Selection()
    with Archs4File(path) as archs4:
        if selection.filters_samples:
            samples, _ = archs4.select_samples(selection)
        else:
            samples = np.arange(archs4.n_samples)
        genes = archs4.select_genes(selection.genes)
        var = archs4.var(genes)
        for start, values in archs4.iter_blocks(samples, genes, block=chunk_size):
            index = samples[start : start + len(values)]
            with warnings.catch_warnings():
                # ARCHS4 lists a few genes twice; gene harmonisation merges them later.
                warnings.filterwarnings("ignore", ".*names are not unique", UserWarning)
                chunk = ad.AnnData(X=values, obs=archs4.obs(index), var=var.copy())
            yield chunk
