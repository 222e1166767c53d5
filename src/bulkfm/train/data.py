"""Pre-training data: AnnData (TPM) -> held-out split -> gene subset -> tokens.

Everything the run learns from the data (the gene subset, the tokenizer's
normalisation factor, the trivial per-gene predictor) is fitted on the
*training* split only, so the held-out metrics are honest.

Tokens are computed once, vectorised, and kept as a compact int16 matrix; the
dataset masks one sample at a time with a generator seeded from
``(seed, epoch, sample index)`` so masks are identical whatever the number of
processes, data-loader workers or micro-batch size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset

from bulkfm import schema as keys
from bulkfm.errors import ConfigError, ExpressionValueError, InputFileError, SplitError
from bulkfm.tokenize import BinTokenizer, check_missing_mask
from bulkfm.train.config import DataSection, MaskingConfig
from bulkfm.train.masking import IGNORE_INDEX, mask_tokens, sample_generator

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

TRAIN_STREAM = 0
EVAL_STREAM = 1
PERMUTATION_STREAM = 2
PAD_KEY = (-1, -1)
"""Sampler key of a padding item: all labels ignored (keeps ranks in lock-step)."""

_ROW_CHUNK = 512


@dataclass
class PretrainData:
    """Tokenised samples plus what was fitted on the training split."""

    tokens: np.ndarray
    train_idx: np.ndarray
    eval_idx: np.ndarray
    genes: list[str]
    sample_ids: list[str]
    tokenizer: BinTokenizer
    gene_mode: np.ndarray
    gene_log_prob: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    gene_selection: GeneSelection | None = None

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    @property
    def n_eval(self) -> int:
        return len(self.eval_idx)


# ---------------------------------------------------------------------- loading
def load_adata(path: str | Path, *, layer: str | None = None) -> ad.AnnData:
    """Read the pre-training .h5ad (X, or ``layer``, = TPM); fail with a hint when it is not
    there or not usable (:func:`bulkfm.data.readers.read_h5ad`)."""
    from bulkfm.data.readers import read_h5ad

    return read_h5ad(Path(path), flag="data.path", layer=layer)


def expression_matrix(adata: ad.AnnData, layer: str | None) -> Any:
    """The matrix to train on: ``X`` or a named layer (dense or sparse, samples x genes)."""
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise ConfigError(
            f"data.layer {layer!r} is not in the AnnData (layers: {list(adata.layers)}); "
            "set data.layer to one of them, or null to use X"
        )
    return adata.layers[layer]


def missing_mask(adata: ad.AnnData, name: str | None) -> Any:
    if name is None or name not in adata.layers:
        return None
    mask = adata.layers[name]
    if mask.shape != adata.shape:
        raise ExpressionValueError(
            f"layers[{name!r}] has shape {mask.shape}, X has {adata.shape}; rebuild the data"
        )
    return check_missing_mask(mask, f"layers[{name!r}]")


def _rows(matrix: Any, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    block = matrix[rows]
    if cols is not None:
        block = block[:, cols]
    if sp.issparse(block):
        block = block.toarray()
    return np.asarray(block)


# ---------------------------------------------------------------------- splits
def holdout_split(
    n_samples: int,
    fraction: float,
    *,
    seed: int,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Train/held-out sample indices; all samples of one group (patient) on one side.

    Groups are drawn in a seeded random order until the held-out side reaches
    ``round(fraction * n)`` samples (at least one when ``fraction > 0``).
    """
    if fraction <= 0:
        return np.arange(n_samples), np.array([], dtype=np.int64)
    if n_samples < 2:
        raise SplitError(
            f"cannot hold out samples from {n_samples} sample(s); use more data or "
            "set data.holdout_fraction to 0"
        )
    if groups is None:
        groups = np.arange(n_samples)
    _, group_id = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(group_id.max()) + 1
    if n_groups < 2:
        raise SplitError(
            "every sample belongs to one group (patient), so none can be held out without "
            "leaking; check the group column (data.group_key) or set it to null"
        )
    target = max(1, round(fraction * n_samples))
    order = np.random.default_rng([seed, 11]).permutation(n_groups)
    sizes = np.bincount(group_id, minlength=n_groups)
    chosen: list[int] = []
    taken = 0
    for g in order[:-1]:  # never take every group: training must keep one
        if taken >= target:
            break
        chosen.append(int(g))
        taken += int(sizes[g])
    held = np.isin(group_id, chosen)
    return np.flatnonzero(~held), np.flatnonzero(held)


def sample_groups(adata: ad.AnnData, group_key: str | None) -> np.ndarray | None:
    if group_key is None or group_key not in adata.obs:
        return None
    values = adata.obs[group_key].astype(object).to_numpy()
    missing = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in values])
    if missing.any():
        # A sample without a patient id is its own group.
        values = values.copy()
        values[missing] = [f"__sample_{i}" for i in np.flatnonzero(missing)]
    return values.astype(str)


# ---------------------------------------------------------------------- genes
EXCLUDED_GENES_FILE = "genes_excluded.tsv"
"""Written to the run's output folder: the genes the measured-fraction rule left out."""

_EXCLUDED_COLUMNS = (
    "gene",
    "symbol",
    "measured_fraction",
    "log_tpm_variance",
    "variance_rank",
    "reason",
)


def log_tpm_moments(
    matrix: Any, rows: np.ndarray, missing: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene variance of log10(1 + TPM) over ``rows`` with missing entries ignored, and
    the number of those rows in which each gene is measured.

    Chunked in float64 so a 11k x 19k matrix never needs a second full-size copy.
    """
    n_genes = matrix.shape[1]
    total = np.zeros(n_genes)
    total_sq = np.zeros(n_genes)
    count = np.zeros(n_genes)
    for start in range(0, len(rows), _ROW_CHUNK):
        chunk = rows[start : start + _ROW_CHUNK]
        values = np.log10(1.0 + np.clip(_rows(matrix, chunk).astype(np.float64), 0, None))
        valid = np.ones(values.shape, dtype=bool)
        if missing is not None:
            valid = ~_rows(missing, chunk).astype(bool)
            values = np.where(valid, values, 0.0)
        total += values.sum(axis=0)
        total_sq += (values**2).sum(axis=0)
        count += valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        var = total_sq / count - mean**2
    var = np.where(count > 1, np.maximum(var, 0.0), 0.0)
    return var, count.astype(np.int64)


def log_tpm_variance(matrix: Any, rows: np.ndarray, missing: Any = None) -> np.ndarray:
    """Per-gene variance of log10(1 + TPM) over ``rows``, ignoring missing entries."""
    return log_tpm_moments(matrix, rows, missing)[0]


def select_variable_genes(
    variance: np.ndarray, k: int | None, eligible: np.ndarray | None = None
) -> np.ndarray:
    """Column indices of the ``k`` most variable ``eligible`` genes, in their original order.

    Ties are broken by position (stable sort) so the subset is reproducible. Genes
    outside ``eligible`` (a boolean mask; all genes when None) are never chosen.
    """
    n = len(variance)
    candidates = np.arange(n) if eligible is None else np.flatnonzero(eligible)
    if k is None or k >= len(candidates):
        return candidates
    order = np.argsort(-variance[candidates], kind="stable")[:k]
    return np.sort(candidates[order])


@dataclass
class GeneSelection:
    """Which genes pre-training uses, and the genes the measured-fraction rule left out.

    ``excluded`` has one row per gene measured in fewer than ``min_measured_fraction``
    of the training samples (columns ``gene``, ``symbol`` (empty when the AnnData has
    no ``var["symbol"]``), ``measured_fraction``,
    ``log_tpm_variance``, ``variance_rank`` = its rank by variance among all genes, as a
    ranking without the rule would have placed it, and ``reason``), most variable first.
    """

    columns: np.ndarray
    top_k: int | None
    min_measured_fraction: float
    n_input: int
    n_rankable: int
    excluded: pd.DataFrame
    n_excluded_from_top_k: int = 0

    @property
    def rule(self) -> str:
        if self.top_k is None:
            return "every gene (data.top_k_variable_genes is null); absent values fed as [MASK]"
        return (
            f"the {self.top_k} genes with the largest variance of log10(1 + TPM) over the "
            f"training samples, among genes measured in >= {self.min_measured_fraction:g} of "
            "them (data.min_measured_fraction)"
        )

    def to_dict(self) -> dict[str, Any]:
        """The plain summary that goes into ``PretrainData.info`` and ``summary.json``."""
        top = self.excluded.head(10)
        return {
            "rule": self.rule,
            "top_k_variable_genes": self.top_k,
            "min_measured_fraction": self.min_measured_fraction,
            "n_genes_input": self.n_input,
            "n_genes_rankable": self.n_rankable,
            "n_genes_selected": len(self.columns),
            "n_genes_excluded": len(self.excluded),
            "n_excluded_from_top_k": self.n_excluded_from_top_k,
            "excluded_examples": [str(g) for g in top["gene"]],
        }

    def write_excluded(self, directory: str | Path) -> Path:
        """``genes_excluded.tsv`` in ``directory`` (a header only when none was excluded)."""
        from bulkfm.io import write_text

        return write_text(
            self.excluded.to_csv(sep="\t", index=False, float_format="%.6g"),
            Path(directory) / EXCLUDED_GENES_FILE,
        )


def choose_genes(
    matrix: Any,
    genes: np.ndarray,
    train_idx: np.ndarray,
    missing: Any,
    config: DataSection,
    symbols: np.ndarray | None = None,
) -> GeneSelection:
    """Apply the gene rule of :class:`~bulkfm.train.config.DataSection` on the training rows.

    Ranking by variance runs only over genes measured in at least
    ``config.min_measured_fraction`` of the training samples: a gene one source lacks has
    its variance computed from the other source alone, which on a mixed union ranks
    pipeline artefacts above biology. Fewer such genes than ``top_k_variable_genes`` is a
    warning (training goes on with all of them); none at all is an error.
    """
    n_all = matrix.shape[1]
    top_k = config.top_k_variable_genes
    empty = pd.DataFrame({c: [] for c in _EXCLUDED_COLUMNS})
    if top_k is None:
        return GeneSelection(
            np.arange(n_all), None, config.min_measured_fraction, n_all, n_all, empty
        )

    variance, measured = log_tpm_moments(matrix, train_idx, missing)
    fraction = measured / max(len(train_idx), 1)
    eligible = fraction >= config.min_measured_fraction
    n_rankable = int(eligible.sum())
    if n_rankable == 0:
        raise ConfigError(
            f"no gene is measured in >= {config.min_measured_fraction:g} of the "
            f"{len(train_idx)} training samples (the best is measured in "
            f"{fraction.max():.1%}); lower data.min_measured_fraction, or set "
            "data.top_k_variable_genes=null to train on every gene with absent values "
            "fed as [MASK]"
        )
    cols = select_variable_genes(variance, top_k, eligible)
    rank = np.empty(n_all, dtype=np.int64)
    rank[np.argsort(-variance, kind="stable")] = np.arange(1, n_all + 1)
    out = np.flatnonzero(~eligible)
    out = out[np.argsort(rank[out], kind="stable")]
    excluded = pd.DataFrame(
        {
            "gene": np.asarray(genes)[out].astype(str),
            "symbol": [""] * len(out) if symbols is None else np.asarray(symbols)[out].astype(str),
            "measured_fraction": fraction[out],
            "log_tpm_variance": variance[out],
            "variance_rank": rank[out],
            "reason": [
                f"measured in {fraction[i]:.1%} of training samples "
                f"< data.min_measured_fraction {config.min_measured_fraction:g}"
                for i in out
            ],
        },
        columns=list(_EXCLUDED_COLUMNS),
    )
    selection = GeneSelection(
        cols,
        top_k,
        config.min_measured_fraction,
        n_all,
        n_rankable,
        excluded,
        n_excluded_from_top_k=int((rank[out] <= min(top_k, n_all)).sum()),
    )
    _log_selection(selection)
    return selection


def _log_selection(selection: GeneSelection) -> None:
    logger.info("gene selection: %s", selection.rule)
    n_out = len(selection.excluded)
    if n_out:
        examples = ", ".join(
            f"{row.symbol or row.gene} ({row.measured_fraction:.0%} measured, variance rank "
            f"{row.variance_rank})"
            for row in selection.excluded.head(5).itertuples()
        )
        logger.info(
            "gene selection: %d of %d genes left out as measured in too few training samples, "
            "%d of them among the %d most variable (e.g. %s); the list is written to %s",
            n_out,
            selection.n_input,
            selection.n_excluded_from_top_k,
            selection.top_k,
            examples,
            EXCLUDED_GENES_FILE,
        )
    top_k = selection.top_k
    if top_k is not None and selection.n_rankable < top_k and n_out:
        logger.warning(
            "data.top_k_variable_genes=%d but only %d of %d genes are measured in >= %g of "
            "the training samples; training on those %d. Lower data.min_measured_fraction "
            "to rank more genes, or set data.top_k_variable_genes=null to keep every gene",
            top_k,
            selection.n_rankable,
            selection.n_input,
            selection.min_measured_fraction,
            selection.n_rankable,
        )


# ---------------------------------------------------------------------- trivial
def gene_bin_statistics(
    tokens: np.ndarray, rows: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene most frequent training bin and add-one-smoothed log frequencies.

    This is the trivial predictor that ignores every other gene of the sample: the
    model is only useful if it beats it on held-out samples.
    """
    n_genes = tokens.shape[1]
    counts = np.zeros((n_genes, n_bins + 1), dtype=np.int64)
    offsets = np.arange(n_genes, dtype=np.int64) * (n_bins + 1)
    for start in range(0, len(rows), _ROW_CHUNK):
        block = tokens[rows[start : start + _ROW_CHUNK]].astype(np.int64)
        flat = (block + offsets[None, :]).ravel()
        counts += np.bincount(flat, minlength=n_genes * (n_bins + 1)).reshape(n_genes, -1)
    counts = counts[:, :n_bins]  # drop the mask (missing) column
    mode = counts.argmax(axis=1)
    smoothed = counts + 1.0
    log_prob = np.log(smoothed / smoothed.sum(axis=1, keepdims=True)).astype(np.float32)
    return mode.astype(np.int64), log_prob


# ---------------------------------------------------------------------- pipeline
def data_info(
    shape: tuple[int, int],
    split: tuple[np.ndarray, np.ndarray],
    selection: GeneSelection,
    tokenizer: BinTokenizer,
    missing_fraction: float,
    *,
    grouped_by: str | None,
    source: str | None = None,
) -> dict[str, Any]:
    """The record of what pre-training reads (``PretrainData.info``), logged once.

    One home for the in-memory and the streamed path (:mod:`bulkfm.train.stream`), so
    both report the same keys; ``source`` names the file a streamed run reads.
    """
    n_samples, n_all_genes = shape
    train_idx, eval_idx = split
    info: dict[str, Any] = {
        "n_samples": int(n_samples),
        "n_train": len(train_idx),
        "n_eval": len(eval_idx),
        "n_genes_input": int(n_all_genes),
        "n_genes": len(selection.columns),
        "grouped_by": grouped_by,
        "normalization_factor": tokenizer.normalization_factor,
        "missing_fraction": missing_fraction,
        "gene_selection": selection.to_dict(),
    }
    if source is not None:
        info["streamed_from"] = source
    logger.info(
        "pre-training data%s: %d train / %d held-out samples, %d genes (of %d), factor "
        "%.4f, %.1f%% of values missing (fed as [MASK])",
        f" (streamed from {source})" if source is not None else "",
        info["n_train"],
        info["n_eval"],
        info["n_genes"],
        n_all_genes,
        tokenizer.normalization_factor,
        100 * missing_fraction,
    )
    return info


def prepare_pretrain_data(
    adata: ad.AnnData, config: DataSection, *, seed: int, n_bins: int = 64
) -> PretrainData:
    """Split, choose genes and tokenise once; every fitted quantity sees training rows only."""
    matrix = expression_matrix(adata, config.layer)
    n_samples, n_all_genes = matrix.shape
    if n_samples == 0 or n_all_genes == 0:
        raise InputFileError(
            f"the pre-training AnnData is empty ({n_samples} samples x {n_all_genes} genes)"
        )
    missing = missing_mask(adata, config.missing_layer)
    groups = sample_groups(adata, config.group_key)
    train_idx, eval_idx = holdout_split(
        n_samples, config.holdout_fraction, seed=seed, groups=groups
    )

    symbols = adata.var[keys.SYMBOL].astype(str).to_numpy() if keys.SYMBOL in adata.var else None
    selection = choose_genes(
        matrix, np.asarray(adata.var_names), train_idx, missing, config, symbols=symbols
    )
    cols = selection.columns
    genes = [str(g) for g in np.asarray(adata.var_names)[cols]]

    subset = matrix[:, cols] if len(cols) < n_all_genes else matrix
    sub_missing = None
    if missing is not None:
        sub_missing = missing[:, cols] if len(cols) < n_all_genes else missing
    train_missing = None if sub_missing is None else sub_missing[train_idx]
    tokenizer = BinTokenizer.fit(subset[train_idx], genes, missing=train_missing, n_bins=n_bins)

    tokens = tokenizer.encode(subset, missing=sub_missing)
    tokens = tokens.astype(np.int16 if n_bins < np.iinfo(np.int16).max else np.int32)
    mode, log_prob = gene_bin_statistics(tokens, train_idx, n_bins)
    missing_fraction = float((tokens == tokenizer.mask_token_id).mean())
    info = data_info(
        (n_samples, n_all_genes),
        (train_idx, eval_idx),
        selection,
        tokenizer,
        missing_fraction,
        grouped_by=config.group_key if groups is not None else None,
    )
    return PretrainData(
        tokens=tokens,
        train_idx=train_idx,
        eval_idx=eval_idx,
        genes=genes,
        sample_ids=[str(s) for s in adata.obs_names],
        tokenizer=tokenizer,
        gene_mode=mode,
        gene_log_prob=log_prob,
        info=info,
        gene_selection=selection,
    )


# ---------------------------------------------------------------------- torch side
class MaskedTokenDataset(Dataset):
    """Samples ``rows`` of a token matrix, masked on the fly.

    Items are addressed by ``(epoch, i)`` keys (``i`` indexes ``rows``), so a sample's
    mask is a pure function of the seed, the stream, the epoch and the sample: any
    sampler, process count or worker count gives the same masks. ``PAD_KEY`` returns a
    sample whose labels are all ignored.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        rows: np.ndarray,
        *,
        n_bins: int,
        mask_token_id: int,
        seed: int,
        stream: int = TRAIN_STREAM,
        masking: MaskingConfig | None = None,
    ) -> None:
        self.tokens = tokens
        self.rows = np.asarray(rows, dtype=np.int64)
        self.n_bins = n_bins
        self.mask_token_id = mask_token_id
        self.seed = seed
        self.stream = stream
        self.masking = masking or MaskingConfig()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, i = key
        if (epoch, i) == PAD_KEY:
            ids = torch.full((self.tokens.shape[1],), self.mask_token_id, dtype=torch.long)
            return {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}
        row = int(self.rows[i])
        tokens = torch.from_numpy(self.tokens[row].astype(np.int64))
        masked = mask_tokens(
            tokens,
            mask_token_id=self.mask_token_id,
            n_bins=self.n_bins,
            generator=sample_generator(self.seed, self.stream, epoch, row),
            config=self.masking,
        )
        return {"input_ids": masked.input_ids, "labels": masked.labels}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, PERMUTATION_STREAM, epoch]).permutation(n)


class StepBatchSampler:
    """This process's micro-batches of one endless, seeded stream of training samples.

    The stream is the concatenation of per-epoch permutations. Global position ``p``
    is ``(epoch, permutation[p % n])`` with ``epoch = p // n``. Each micro-step takes
    the next ``micro_batch_size * world_size`` positions; rank ``r`` gets the slice
    ``[r * micro, (r + 1) * micro)`` of it. One process with micro batch 4 and two
    processes with micro batch 2 therefore see the same samples per optimiser step,
    and resuming only needs the number of samples already consumed.
    """

    def __init__(
        self,
        n_samples: int,
        *,
        seed: int,
        micro_batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        start_sample: int = 0,
        stop_sample: int | None = None,
    ) -> None:
        if n_samples < 1:
            raise SplitError("no training samples left after the held-out split")
        self.n = n_samples
        self.seed = seed
        self.micro = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.start_sample = start_sample
        self.stop_sample = stop_sample
        self._cache: tuple[int, np.ndarray] | None = None

    def key(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.n)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, epoch_permutation(self.n, self.seed, epoch))
        return epoch, int(self._cache[1][offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start_sample
        step = self.micro * self.world_size
        while self.stop_sample is None or position < self.stop_sample:
            first = position + self.rank * self.micro
            yield [self.key(first + j) for j in range(self.micro)]
            position += step


def eval_batches(n_eval: int, batch_size: int, world_size: int, rank: int) -> list[list]:
    """This rank's held-out keys, padded so every rank runs the same number of batches."""
    mine = list(range(rank, n_eval, world_size))
    per_rank = -(-n_eval // world_size) if n_eval else 0
    n_batches = -(-per_rank // batch_size) if per_rank else 0
    keys: list[tuple[int, int]] = [(0, i) for i in mine]
    keys += [PAD_KEY] * (n_batches * batch_size - len(keys))
    return [keys[b * batch_size : (b + 1) * batch_size] for b in range(n_batches)]
