"""TPM -> BulkRNABert expression tokens, and model predictions -> TPM.

The official recipe: ``v = log10(1 + TPM) / normalization_factor``, exact zeros -> token
0, every other value -> ``np.digitize(v, np.linspace(0, 1, n_bins))``. The factor is a
property of the *training data* (its max log-TPM), so it is fitted once and stored with
the checkpoint; per-sample scaling would change what a token means between samples.

Two deliberate departures from the official code, both for values it cannot represent:

- ``v >= 1`` (TPM at or above the training maximum) gives ``n_bins`` officially, one past
  the embedding; here it is clamped to ``n_bins - 1``.
- Genes the data layer recorded as absent (``adata.layers["missing"]``) become the mask
  token ``n_bins`` instead of the official zero fill, so the model is not told "not
  expressed" when the truth is "not measured".
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bulkfm import schema as keys
from bulkfm.config import check_int, check_number
from bulkfm.errors import ConfigError, DuplicateIdError, ExpressionValueError, GeneMappingError
from bulkfm.io import write_text

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
#: The checkpoint's genes in model order, one id a line: written beside tokenizer.json so
#: a user (or another tool) can read the list without parsing JSON.
GENES_FILE = "genes.txt"
#: Smallest mean fraction of a checkpoint's genes the data must measure (overall and in
#: every cohort and study) before a model runs on it; below it the model would mostly read
#: [MASK]. Every command exposes it (``--min-gene-coverage``, ``min_gene_coverage=``).
DEFAULT_MIN_GENE_COVERAGE = 0.5
TOKENIZER_FORMAT = "bulkfm.bin_tokenizer/1"
# Elements per chunk: small enough for the float64 working copies to stay in cache,
# which makes tokenising several times faster than whole-matrix passes.
_CHUNK_ELEMENTS = 1 << 18


def _check_factor(value: Any) -> float:
    try:
        factor = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"normalization_factor must be a number, got {value!r}; use the max of "
            "log10(1 + TPM) over the training data (5.547176906585117 for the official "
            "TCGA checkpoint)"
        ) from None
    if not math.isfinite(factor) or factor <= 0:
        raise ConfigError(
            f"normalization_factor must be finite and > 0, got {factor}; it is the max of "
            "log10(1 + TPM) over the training data, so a value <= 0 means the data were all "
            "zeros or the factor was not fitted (use BinTokenizer.fit)"
        )
    return factor


@dataclass
class TokenizerConfig:
    """Everything needed to reproduce the tokens of a checkpoint (saved as tokenizer.json)."""

    genes: list[str]
    normalization_factor: float
    n_bins: int = 64

    def __post_init__(self) -> None:
        self.genes = [str(g) for g in self.genes]
        if not self.genes:
            raise ConfigError("genes is empty: give the model's gene ids in model order")
        counts = Counter(self.genes)
        dups = [g for g, n in counts.items() if n > 1]
        if dups:
            raise DuplicateIdError(
                f"{len(dups)} duplicate gene ids in the tokenizer gene list "
                f"(e.g. {dups[:5]}); each model position must be one gene, so de-duplicate "
                "the list"
            )
        self.normalization_factor = _check_factor(self.normalization_factor)
        check_int("n_bins", self.n_bins, 2)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TOKENIZER_FORMAT,
            "transform": "log10(1 + TPM) / normalization_factor",
            "normalization_factor": self.normalization_factor,
            "n_bins": self.n_bins,
            "bin_edges": np.linspace(0.0, 1.0, self.n_bins).tolist(),
            "mask_token_id": self.n_bins,
            "genes": list(self.genes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerConfig:
        missing = [k for k in ("genes", "normalization_factor") if k not in data]
        if missing:
            raise ConfigError(
                f"tokenizer config lacks {missing}; a tokenizer.json written by "
                "BinTokenizer.save has genes, normalization_factor and n_bins"
            )
        config = cls(
            genes=list(data["genes"]),
            normalization_factor=data["normalization_factor"],
            n_bins=int(data.get("n_bins", 64)),
        )
        edges = data.get("bin_edges")
        if edges is not None and not np.allclose(
            edges, np.linspace(0.0, 1.0, config.n_bins), rtol=0, atol=1e-12
        ):
            raise ConfigError(
                "tokenizer.json bin_edges are not linspace(0, 1, n_bins): this tokenizer only "
                "implements the official linear bins; re-create the file with BinTokenizer.save"
            )
        return config


def gene_overlap_report(expected: Sequence[str], found: Sequence[str], n_examples: int = 5) -> str:
    """One-line overlap summary used by every gene-mismatch error."""
    found_set = set(found)
    expected_set = set(expected)
    present = [g for g in expected if g in found_set]
    absent = [g for g in expected if g not in found_set]
    extra = [g for g in found if g not in expected_set]
    return (
        f"{len(present)} of {len(expected)} expected genes found"
        f"; missing e.g. {absent[:n_examples]}"
        + (f"; {len(extra)} unexpected, e.g. {extra[:n_examples]}" if extra else "")
    )


def _as_missing_matrix(missing: Any, shape: tuple[int, int]) -> np.ndarray | sp.csr_matrix | None:
    if missing is None:
        return None
    if sp.issparse(missing):
        missing = sp.csr_matrix(missing)
    else:
        missing = np.asarray(missing)
        if missing.ndim == 1 and shape[0] == 1:
            missing = missing[None, :]
    if missing.shape != shape:
        raise ExpressionValueError(
            f"missing mask has shape {missing.shape} but the expression matrix is {shape}; "
            "pass a samples x genes boolean mask aligned with X"
        )
    return check_missing_mask(missing, "the missing mask")


_MISSING_FIX = (
    "it must be a boolean mask, True where a gene was not measured (0/1 integers are "
    "accepted too). Re-build the .h5ad with `bulkfm data build`, which writes this layer, "
    f"or set adata.layers[{keys.MISSING!r}] to a boolean samples x genes array"
)


def check_missing_mask(mask: Any, what: str) -> np.ndarray | sp.csr_matrix:
    """``mask`` as booleans; any value other than True/False/0/1 is an error.

    A float layer (e.g. all 2.5) cast with ``astype(bool)`` would count every entry as
    missing and have the model overwrite measured values, so values are checked first.
    """
    values = mask.data if sp.issparse(mask) else np.asarray(mask)
    if values.dtype != bool:
        if not (np.issubdtype(values.dtype, np.number) and values.dtype.kind != "c"):
            raise ExpressionValueError(
                f"{what} has dtype {values.dtype}, not booleans; {_MISSING_FIX}"
            )
        n_bad, examples = 0, np.array([], dtype=values.dtype)
        flat = values.reshape(-1)
        for start in range(0, flat.size, _CHUNK_ELEMENTS):
            chunk = flat[start : start + _CHUNK_ELEMENTS]
            bad = chunk[(chunk != 0) & (chunk != 1)]  # NaN is neither
            n_bad += bad.size
            if bad.size and examples.size < 5:
                examples = np.unique(np.concatenate([examples, bad]))[:5]
        if n_bad:
            raise ExpressionValueError(
                f"{what} holds {n_bad} value(s) other than 0/1/True/False (e.g. "
                f"{examples.tolist()}), so it cannot say which genes are missing; "
                f"{_MISSING_FIX}"
            )
    if sp.issparse(mask):
        out = sp.csr_matrix(mask, dtype=bool)
        out.eliminate_zeros()
        return out
    return values if values.dtype == bool else values != 0


def missing_layer(adata: ad.AnnData) -> np.ndarray | sp.csr_matrix | None:
    """``adata.layers["missing"]`` checked (shape of X, boolean values) as a bool mask.

    The one reader of the layer for tokenising, embedding and imputing: None when the
    AnnData has no such layer.
    """
    missing = adata.layers.get(keys.MISSING)
    if missing is None:
        return None
    if missing.shape != adata.shape:
        raise ExpressionValueError(
            f"layers[{keys.MISSING!r}] has shape {missing.shape}, X has {adata.shape}; "
            "rebuild the AnnData with `bulkfm data build` so the layer matches X"
        )
    return check_missing_mask(missing, f"layers[{keys.MISSING!r}]")


def _dense_rows(matrix: Any, start: int, stop: int, cols: np.ndarray | None) -> np.ndarray:
    """Rows ``start:stop`` as a dense block, columns ``cols`` (-1: an absent column, 0)."""
    block = matrix[start:stop]
    if cols is None:
        return _dense(block)
    absent = cols < 0
    if not absent.any():
        return _dense(block[:, cols])
    present = _dense(block[:, cols[~absent]])
    out = np.zeros((present.shape[0], len(cols)), dtype=present.dtype)
    out[:, ~absent] = present
    return out


def _dense(block: Any) -> np.ndarray:
    return np.asarray(block.toarray() if sp.issparse(block) else block)


def _missing_rows(
    missing: Any, start: int, stop: int, cols: np.ndarray | None
) -> np.ndarray | None:
    """Which entries of rows ``start:stop`` are not measured: flagged in the missing layer,
    or a model gene the data has no column for (``cols`` -1). None: every entry measured."""
    absent = None if cols is None else cols < 0
    if missing is None:
        if absent is None or not absent.any():
            return None
        return np.broadcast_to(absent, (stop - start, len(absent))).copy()
    flagged = _dense_rows(missing, start, stop, cols).astype(bool)
    if absent is not None:
        flagged |= absent
    return flagged


def _validate_chunk(
    values: np.ndarray,
    row_offset: int,
    sample_ids: Sequence[str] | None = None,
    gene_ids: Sequence[str] | None = None,
) -> None:
    """NaN/inf/negative values are an error; ids (when given) name the first one."""
    if not values.size:
        return
    # Two reductions catch NaN (propagates into min), negatives and inf cheaply;
    # the element-wise search below only runs to explain a failure.
    if values.min() >= 0 and values.max() < np.inf:
        return

    def where(r: int, c: int) -> str:
        sample = f"{sample_ids[row_offset + r]!r}" if sample_ids is not None else row_offset + r
        gene = f"gene {gene_ids[c]!r}" if gene_ids is not None else f"gene column {c}"
        return f"sample {sample}, {gene}"

    bad = ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ExpressionValueError(
            f"{int(bad.sum())} NaN/inf expression values not marked missing (first at "
            f"{where(r, c)}); the model cannot read them. Mark the genes not measured in "
            f"layers[{keys.MISSING!r}] (True there: they become the mask token, and "
            "`bulkfm impute` fills them), or re-build the .h5ad with `bulkfm data build`, "
            "which records absent genes there"
        )
    neg = values < 0
    r, c = np.argwhere(neg)[0]
    raise ExpressionValueError(
        f"{int(neg.sum())} negative expression values (first {values[r, c]} at "
        f"{where(r, c)}); the tokenizer expects TPM >= 0, not log-transformed or centred "
        "values"
    )


class BinTokenizer:
    """Official BulkRNABert linear-bin tokenizer with a fitted factor and its own mask id."""

    def __init__(self, config: TokenizerConfig) -> None:
        self.config = config
        self._edges = np.linspace(0.0, 1.0, config.n_bins)
        self._edges_ext = np.append(self._edges, np.inf)

    # ------------------------------------------------------------------ properties
    @property
    def genes(self) -> list[str]:
        return self.config.genes

    @property
    def n_genes(self) -> int:
        return len(self.config.genes)

    @property
    def n_bins(self) -> int:
        return self.config.n_bins

    @property
    def normalization_factor(self) -> float:
        return self.config.normalization_factor

    @property
    def mask_token_id(self) -> int:
        return self.config.n_bins

    @property
    def bin_edges(self) -> np.ndarray:
        return self._edges.copy()

    def __repr__(self) -> str:
        return (
            f"BinTokenizer(n_genes={self.n_genes}, n_bins={self.n_bins}, "
            f"normalization_factor={self.normalization_factor!r})"
        )

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        X_tpm: Any,
        genes: Sequence[str],
        *,
        missing: Any = None,
        n_bins: int = 64,
    ) -> BinTokenizer:
        """Factor = max log10(1 + TPM) over ``X_tpm`` (entries marked missing ignored)."""
        X = _as_2d(X_tpm)
        if X.shape[1] != len(genes):
            raise GeneMappingError(
                f"X has {X.shape[1]} gene columns but {len(genes)} gene ids were given; "
                "pass one id per column, in column order"
            )
        mask = _as_missing_matrix(missing, X.shape)
        top = 0.0
        for start, stop in _row_chunks(X.shape):
            values = _dense_rows(X, start, stop, None).astype(np.float64, copy=True)
            if mask is not None:
                values[_dense_rows(mask, start, stop, None).astype(bool)] = 0.0
            _validate_chunk(values, start)
            if values.size:
                top = max(top, float(values.max()))
        factor = float(np.log10(1.0 + top))
        if factor <= 0:
            raise ConfigError(
                "cannot fit the normalization factor: every (non-missing) expression value is "
                "0; fit on the real training matrix"
            )
        return cls(TokenizerConfig(genes=list(genes), normalization_factor=factor, n_bins=n_bins))

    @classmethod
    def fit_adata(cls, adata: ad.AnnData, *, n_bins: int = 64) -> BinTokenizer:
        """Fit on an AnnData's TPM (``X``), genes = ``var_names`` in their order."""
        return cls.fit(
            adata.X,
            list(map(str, adata.var_names)),
            missing=adata.layers.get(keys.MISSING),
            n_bins=n_bins,
        )

    from_adata = fit_adata

    # ------------------------------------------------------------------ encoding
    def encode(self, X_tpm: Any, missing: Any = None) -> np.ndarray:
        """Samples x genes TPM (columns in ``self.genes`` order) -> int64 token ids."""
        one_d = np.ndim(X_tpm) == 1 and not sp.issparse(X_tpm)
        X = _as_2d(X_tpm)
        if X.shape[1] != self.n_genes:
            raise GeneMappingError(
                f"X has {X.shape[1]} gene columns but the tokenizer has {self.n_genes} genes; "
                "columns must be exactly the tokenizer genes in order (use encode_adata to "
                "align an AnnData by gene id)"
            )
        tokens = self._encode_aligned(X, None, _as_missing_matrix(missing, X.shape), None)
        return tokens[0] if one_d else tokens

    def encode_adata(self, adata: ad.AnnData) -> np.ndarray:
        """Tokens of an AnnData, columns aligned to ``self.genes`` by gene id."""
        cols = self.align_columns(list(map(str, adata.var_names)))
        return self._encode_aligned(adata.X, cols, missing_layer(adata), cols)

    def check_adata(self, adata: ad.AnnData, *, allow_all_missing: bool = False) -> None:
        """Check a whole AnnData before a model reads it, naming samples and genes.

        ``layers["missing"]`` must be boolean; values not marked missing must be finite
        and >= 0 (NaN is refused, not taken as missing: mark it in the layer); and, unless
        ``allow_all_missing``, no sample may have every model gene missing (nothing of it
        would be read). Model genes the data has no column for count as missing; how many
        there may be is :func:`gene_coverage`'s question.
        """
        cols = self.align_columns(list(map(str, adata.var_names)))
        missing = missing_layer(adata)
        ids = list(map(str, adata.obs_names))
        genes = self.genes
        n_missing = np.zeros(adata.n_obs, dtype=np.int64)
        for start, stop in _row_chunks((adata.n_obs, self.n_genes)):
            values = _dense_rows(adata.X, start, stop, cols).astype(np.float64, copy=True)
            is_missing = _missing_rows(missing, start, stop, cols)
            if is_missing is not None:
                values[is_missing] = 0.0
                n_missing[start:stop] = is_missing.sum(axis=1)
            _validate_chunk(values, start, ids, genes)
        empty = np.flatnonzero(n_missing == self.n_genes)
        if empty.size and not allow_all_missing:
            raise ExpressionValueError(
                f"{empty.size} of {adata.n_obs} sample(s) have every model gene missing (all "
                f"{self.n_genes} absent or marked in layers[{keys.MISSING!r}]; e.g. "
                f"{[ids[i] for i in empty[:5]]}), so the model would read nothing of them; "
                "drop those samples, or check that their gene ids are the model's (Ensembl "
                "ids without version: re-build the .h5ad with `bulkfm data build`, with "
                "--id-type if the ids are not Ensembl)"
            )

    def align_columns(self, var_names: Sequence[str]) -> np.ndarray | None:
        """Column of ``var_names`` for each tokenizer gene, in tokenizer order.

        None: the data is already in tokenizer order. Otherwise an int64 array of length
        ``n_genes`` holding -1 for model genes the data has no column for; every reader
        here feeds those as [MASK], like genes flagged in ``layers["missing"]``.
        Columns outside the vocabulary are not read.
        """
        var_names = list(var_names)
        if var_names == self.genes:
            return None
        index = pd.Index(var_names)
        if not index.is_unique:
            raise DuplicateIdError(
                "the AnnData has duplicate var_names (e.g. "
                f"{index[index.duplicated()].unique()[:5].tolist()}); make gene ids unique "
                "(`bulkfm data build` merges duplicates) before tokenising"
            )
        cols = index.get_indexer(pd.Index(self.genes))
        return cols.astype(np.int64, copy=False)

    def _encode_aligned(
        self, X: Any, cols: np.ndarray | None, missing: Any, missing_cols: np.ndarray | None
    ) -> np.ndarray:
        n_rows = X.shape[0]
        out = np.empty((n_rows, self.n_genes), dtype=np.int64)
        for start, stop in _row_chunks((n_rows, self.n_genes)):
            values = _dense_rows(X, start, stop, cols).astype(np.float64, copy=True)
            is_missing = _missing_rows(missing, start, stop, missing_cols)
            if is_missing is not None:
                values[is_missing] = 0.0
            _validate_chunk(values, start)
            out[start:stop] = self._tokens_of(values)
            if is_missing is not None:
                out[start:stop][is_missing] = self.mask_token_id
        return out

    def _tokens_of(self, tpm: np.ndarray) -> np.ndarray:
        """Official digitisation of a float64 block (overwrites ``tpm``).

        Equals ``np.digitize(v, edges)`` with zeros -> 0 and clamping, but the bin is first
        guessed arithmetically (edges are linear) and then corrected by one comparison on
        each side, which is exact and about twice as fast as a binary search.
        """
        np.add(tpm, 1.0, out=tpm)
        np.log10(tpm, out=tpm)
        tpm /= self.normalization_factor
        last = self.n_bins - 1
        tokens = (tpm * last).astype(np.intp)
        np.minimum(tokens, last, out=tokens)
        tokens += 1
        tokens -= tpm < self._edges_ext[tokens - 1]
        tokens += tpm >= self._edges_ext[tokens]
        np.minimum(tokens, last, out=tokens)
        tokens *= tpm > 0.0
        return tokens

    # ------------------------------------------------------------------ decoding
    def bin_centers(self) -> np.ndarray:
        """Normalised value each bin stands for: 0 for bin 0, interval midpoints otherwise."""
        edges = self._edges
        centers = np.empty(self.n_bins, dtype=np.float64)
        centers[0] = 0.0
        centers[1:] = 0.5 * (edges[:-1] + edges[1:])
        return centers

    def to_tpm(self, normalized: np.ndarray) -> np.ndarray:
        """Inverse of the transform: normalised log value -> TPM."""
        return (
            np.power(10.0, np.asarray(normalized, dtype=np.float64) * self.normalization_factor)
            - 1.0
        )

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids -> TPM at each bin's centre; the mask token decodes to NaN."""
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > self.mask_token_id):
            raise ExpressionValueError(
                f"token ids must lie in 0..{self.mask_token_id}, got "
                f"{tokens.min()}..{tokens.max()}; were they made by another tokenizer?"
            )
        centers = np.append(self.to_tpm(self.bin_centers()), np.nan)
        return centers[tokens]

    def decode_expected(self, probs: np.ndarray) -> np.ndarray:
        """Bin probabilities (..., n_bins) -> TPM of the expected normalised value.

        The expectation is taken in the normalised log space the bins live in, then mapped
        back, so one confident high bin does not dominate as it would in linear TPM.
        """
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim == 0 or probs.shape[-1] != self.n_bins:
            raise ExpressionValueError(
                f"probabilities must have a last axis of n_bins={self.n_bins}, got shape "
                f"{probs.shape}; pass softmax(logits) of the LM head"
            )
        if probs.size and (
            probs.min() < 0 or not np.allclose(probs.sum(axis=-1), 1.0, rtol=0, atol=1e-3)
        ):
            raise ExpressionValueError(
                "probabilities must be >= 0 and sum to 1 over the last axis; apply softmax to "
                "the logits first"
            )
        return self.to_tpm(probs @ self.bin_centers())

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """tokenizer.json, and genes.txt (the genes in model order, one a line)."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text("".join(f"{g}\n" for g in self.genes), path.parent / GENES_FILE)
        return write_text(json.dumps(self.config.to_dict(), indent=1) + "\n", path)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> BinTokenizer:
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.exists():
            raise ConfigError(
                f"{path} does not exist; a checkpoint saved with a tokenizer has "
                f"{TOKENIZER_FILE} (official checkpoints do not: give genes and "
                "normalization_factor to bulkfm.models.load_pretrained)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); re-save the tokenizer") from exc
        return cls(TokenizerConfig.from_dict(data))


# --------------------------------------------------------------------------- coverage
#: obs columns coverage is broken down by: a cohort or a source may lack genes the rest has.
COVERAGE_GROUPS: tuple[str, ...] = (keys.COHORT, keys.STUDY)


@dataclass(frozen=True)
class GeneCoverage:
    """How much of a checkpoint's gene list the data measures.

    A model gene is measured in a sample when the data has a column for it and
    ``layers["missing"]`` does not flag it; unmeasured genes are fed as [MASK] and left
    out of pooling. ``fraction_measured`` is the mean over samples; ``by_group`` gives it
    per cohort and per study (source), since one source lacking genes is the usual cause.
    """

    n_model_genes: int
    n_in_data: int
    n_data_genes_unused: int
    n_samples: int
    fraction_measured: float
    min_coverage: float
    examples_absent: list[str]
    by_group: dict[str, dict[str, dict[str, float | int]]]

    @property
    def n_absent(self) -> int:
        return self.n_model_genes - self.n_in_data

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record for run.json, results.json and ``uns``."""
        return {
            "n_model_genes": self.n_model_genes,
            "n_in_data": self.n_in_data,
            "n_absent": self.n_absent,
            "n_data_genes_unused": self.n_data_genes_unused,
            "n_samples": self.n_samples,
            "fraction_measured": round(self.fraction_measured, 6),
            "min_coverage": self.min_coverage,
            "examples_absent": list(self.examples_absent),
            "by_group": {
                column: {name: dict(entry) for name, entry in groups.items()}
                for column, groups in self.by_group.items()
            },
            "rule": "absent or flagged-missing model genes are fed as [MASK] and left out "
            "of pooling",
        }

    def lines(self) -> list[str]:
        """Human-readable summary: one line overall, one per cohort and per study."""
        head = (
            f"gene coverage: the data measures {self.fraction_measured:.1%} of the model's "
            f"{self.n_model_genes} genes on average ({self.n_in_data} are data columns"
        )
        if self.n_absent:
            head += f"; {self.n_absent} absent ones become [MASK], e.g. {self.examples_absent}"
        head += f"); {self.n_data_genes_unused} data genes are not model genes and are not read"
        out = [head]
        for column, groups in self.by_group.items():
            parts = [
                f"{name} {entry['fraction_measured']:.1%} (n={entry['n_samples']})"
                for name, entry in groups.items()
            ]
            out.append(f"gene coverage by {column}: " + ", ".join(parts))
        return out


def gene_coverage(
    tokenizer: BinTokenizer,
    adata: ad.AnnData,
    *,
    min_coverage: float = DEFAULT_MIN_GENE_COVERAGE,
    option: str = "--min-gene-coverage",
    log: bool = True,
) -> GeneCoverage:
    """Measure (and log once) how much of ``tokenizer.genes`` ``adata`` measures.

    Raises :class:`GeneMappingError`, naming ``option`` (the flag or config key the
    caller exposes), when the mean fraction measured is below ``min_coverage`` overall or
    in any cohort or study: the model would mostly read [MASK] there.
    """

    check_number(option, min_coverage, low=0.0, high=1.0)
    cols = tokenizer.align_columns(list(map(str, adata.var_names)))
    present = np.ones(tokenizer.n_genes, dtype=bool) if cols is None else cols >= 0
    n_in_data = int(present.sum())
    missing = missing_layer(adata)
    measured = np.full(adata.n_obs, n_in_data, dtype=np.int64)
    if missing is not None and n_in_data:
        present_cols = np.arange(tokenizer.n_genes) if cols is None else cols[present]
        for start, stop in _row_chunks((adata.n_obs, n_in_data)):
            flagged = _dense_rows(missing, start, stop, present_cols).astype(bool)
            measured[start:stop] -= flagged.sum(axis=1)
    fraction = measured / tokenizer.n_genes
    by_group: dict[str, dict[str, dict[str, float | int]]] = {}
    for column in COVERAGE_GROUPS:
        if column not in adata.obs:
            continue
        labels = adata.obs[column].astype(object).where(adata.obs[column].notna(), "NA")
        frame = pd.DataFrame({"group": labels.astype(str).to_numpy(), "f": fraction})
        stats = frame.groupby("group", sort=True)["f"].agg(["mean", "size"])
        by_group[column] = {
            str(name): {
                "fraction_measured": round(float(row["mean"]), 6),
                "n_samples": int(row["size"]),
            }
            for name, row in stats.iterrows()
        }
    coverage = GeneCoverage(
        n_model_genes=tokenizer.n_genes,
        n_in_data=n_in_data,
        n_data_genes_unused=int(adata.n_vars - n_in_data),
        n_samples=int(adata.n_obs),
        fraction_measured=float(fraction.mean()) if adata.n_obs else 0.0,
        min_coverage=float(min_coverage),
        examples_absent=[g for g, p in zip(tokenizer.genes, present, strict=True) if not p][:5],
        by_group=by_group,
    )
    if log:
        for line in coverage.lines():
            logger.info("%s", line)
    _check_coverage(coverage, option)
    return coverage


def _check_coverage(coverage: GeneCoverage, option: str) -> None:
    floor = coverage.min_coverage - 1e-9  # a mean of exact fractions may round below them
    low = [] if coverage.fraction_measured >= floor else ["overall"]
    low += [
        f"{column} {name!r}"
        for column, groups in coverage.by_group.items()
        for name, entry in groups.items()
        if float(entry["fraction_measured"]) < coverage.min_coverage
    ]
    if not low:
        return
    worst = min(
        [coverage.fraction_measured]
        + [float(e["fraction_measured"]) for g in coverage.by_group.values() for e in g.values()]
    )
    where = f"{coverage.n_in_data} are data columns" + (
        f"; absent e.g. {coverage.examples_absent}"
        if coverage.n_absent
        else f"; the rest are flagged in layers[{keys.MISSING!r}]"
    )
    raise GeneMappingError(
        f"the data measures too few of the model's {coverage.n_model_genes} genes: "
        f"{coverage.fraction_measured:.1%} on average ({where}), below the minimum "
        f"{coverage.min_coverage:.0%} in {', '.join(low[:6])} (lowest {worst:.1%}). "
        "Check that the gene ids are Ensembl ids without version (`bulkfm data build` "
        f"harmonises them; --id-type if they are symbols or Entrez ids), or lower {option} "
        "to run the model on what is measured"
    )


def read_gene_list(path: str | os.PathLike) -> list[str]:
    """One gene id per line (blank lines and ``#`` comments skipped), e.g. the official list."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"gene list file {path} does not exist; give a file with one id a line")
    genes = [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    if not genes:
        raise ConfigError(f"gene list file {path} is empty; it needs one gene id per line")
    return genes


def as_gene_list(genes: Sequence[str] | str | os.PathLike) -> list[str]:
    """A gene list given either as ids or as the path of a one-id-a-line file."""
    if isinstance(genes, str | os.PathLike):
        return read_gene_list(genes)
    return [str(g) for g in genes]


def _as_2d(X: Any) -> Any:
    if sp.issparse(X):
        return sp.csr_matrix(X)
    if hasattr(X, "to_numpy"):
        X = X.to_numpy()
    X = np.asarray(X)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2:
        raise ExpressionValueError(f"expression must be samples x genes (2-D), got {X.ndim}-D")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise ExpressionValueError(
            f"expression values must be numeric, got dtype {X.dtype}; convert the table to "
            "floats first (check for text columns such as ids)"
        )
    return X


def _row_chunks(shape: tuple[int, int]) -> list[tuple[int, int]]:
    n_rows, n_cols = shape
    step = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    return [(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]
