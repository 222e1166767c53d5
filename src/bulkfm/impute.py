"""Fill genes a sample lacks with the model's masked-language-model prediction.

Genes recorded absent (``adata.layers["missing"]``) and model genes the data has no
column for are fed as [MASK]; the predicted bin distribution is turned into TPM by
:meth:`BinTokenizer.decode_expected`. This is the imputation of the paper's robustness
experiment, and a better fill than 0 TPM for samples from pipelines that drop genes.
Model genes the data lacks are appended as new columns, so the output holds every gene
of the checkpoint and one ``.h5ad`` serves every model.

How good is the fill on *this* data? :func:`impute_missing` can hide measured genes
(``hide_fraction=`` or ``hide_genes=``), impute them and score the predictions against
the measured values (:class:`GeneRecovery`), beside a baseline that knows no other gene.

CLI (:mod:`bulkfm.cli.impute`): ``bulkfm impute --model DIR --input X.h5ad --output Y.h5ad``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bulkfm import schema as keys
from bulkfm.config import check_int, check_number
from bulkfm.errors import ConfigError, ExpressionValueError
from bulkfm.tokenize import DEFAULT_MIN_GENE_COVERAGE, GeneCoverage, gene_coverage, missing_layer

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.models.bulkrnabert import BulkRNABert
    from bulkfm.tokenize import BinTokenizer

logger = logging.getLogger(__name__)

UNS_KEY = "imputation"
RECOVERY_KEY = "recovery"
#: What the recovery scores are computed on: the scale the model's bins live in.
RECOVERY_SCALE = "log10(1+TPM)"
BASELINE_RULE = (
    "per gene, the mean log10(1+TPM) of the gene over the other samples of the input "
    "(leave-one-sample-out): the checkpoint stores no training means, and the hidden "
    "value of a sample never enters its own baseline"
)
ELIGIBLE_RULE = (
    "model genes with a data column that are measured (not flagged in layers['missing']) "
    "in every sample; the same genes are hidden in every sample"
)


def impute_missing(
    model: BulkRNABert,
    tokenizer: BinTokenizer,
    adata: ad.AnnData,
    *,
    batch_size: int = 8,
    min_gene_coverage: float = DEFAULT_MIN_GENE_COVERAGE,
    coverage: GeneCoverage | None = None,
    add_absent_genes: bool = True,
    hide_fraction: float | None = None,
    hide_genes: Sequence[str] | None = None,
    seed: int = 0,
) -> ad.AnnData:
    """A copy of ``adata`` whose missing entries hold predicted TPM.

    Every model gene not measured in a sample is imputed: genes flagged in
    ``layers["missing"]`` and, with ``add_absent_genes`` (the default), model genes the
    data has no column for. Those are appended as new columns in model order (var index =
    the model's gene id, ``var["absent_from_input"]`` True, ``layers["missing"]`` and
    ``layers["imputed"]`` True; other layers padded with NaN, or 0/False where their
    dtype holds no NaN), so the output carries every gene of the checkpoint.
    ``add_absent_genes=False`` keeps the input's columns (absent genes are still fed as
    [MASK], and their predictions dropped). Genes outside the model are left as they are.

    Coverage of the model's genes is measured first (:func:`bulkfm.tokenize.gene_coverage`;
    an error below ``min_gene_coverage``, or pass a ``coverage`` already measured) and
    recorded with the per-gene counts in ``uns["bulkfm"]["imputation"]``.

    ``hide_fraction`` (a fraction in (0, 1) of the eligible genes, drawn with ``seed``) or
    ``hide_genes`` (ids or symbols) hides measured genes from the model in every sample,
    imputes them, and scores the predictions against the measured values
    (:func:`recovery_scores`; stored under ``["imputation"]["recovery"]``). Eligible: model
    genes measured in every sample, so each hidden entry has a measured truth. The output
    then holds the *predictions* at the hidden entries (marked in ``layers["imputed"]``).

    Refused up front (:meth:`BinTokenizer.check_adata`), as :func:`bulkfm.embed.embed_adata`
    refuses them: a ``layers["missing"]`` that is not boolean (or 0/1), NaN/inf in model
    genes not marked missing (mark them to have them imputed), and samples with every
    model gene missing (their fill would be the model's prior, not a prediction).
    """
    check_int("batch_size", batch_size, 1)
    hiding = hide_fraction is not None or hide_genes is not None
    if hiding:
        check_hide_arguments(hide_fraction, hide_genes, seed)
    from bulkfm.models.bulkrnabert import check_tokenizer_matches

    check_tokenizer_matches(model.config, tokenizer)
    if coverage is None:
        coverage = gene_coverage(tokenizer, adata, min_coverage=min_gene_coverage)
    # Before any work: the missing layer must be boolean, values not marked missing
    # finite (NaN is refused, not silently kept: mark it missing to have it imputed),
    # and no sample may lack every model gene (its fill would come from nothing; embed
    # refuses the same samples).
    tokenizer.check_adata(adata)
    hidden: list[str] = []
    work = adata
    if hiding:
        hidden = choose_hidden_genes(
            tokenizer, adata, fraction=hide_fraction, genes=hide_genes, seed=seed
        )
        work = mask_genes(adata, hidden)
        tokenizer.check_adata(work)  # hiding must leave every sample something to read

    cols = tokenizer.align_columns(list(map(str, adata.var_names)))
    out_cols = np.arange(tokenizer.n_genes) if cols is None else cols.copy()
    absent_idx = np.flatnonzero(out_cols < 0)
    absent = [tokenizer.genes[i] for i in absent_idx]
    if add_absent_genes and absent:
        out = _with_absent_genes(adata, absent)
        out_cols[absent_idx] = adata.n_vars + np.arange(len(absent))
    else:
        out = adata.copy()
        x = out.X
        out.X = np.asarray(sp.csr_matrix(x).toarray() if sp.issparse(x) else x, dtype=np.float32)
    rows = _rows_to_impute(work, out_cols, imputes_absent=add_absent_genes and bool(absent))

    r, c = _fill(model, tokenizer, work, out, rows, out_cols, batch_size)
    out.layers[keys.IMPUTED] = sp.csr_matrix((np.ones(len(r), dtype=bool), (r, c)), shape=out.shape)
    record = _report(out, rows, tokenizer, coverage, absent if add_absent_genes else [])
    if hidden:
        hidden_cols = out.var_names.get_indexer(pd.Index(hidden))
        recovery = recovery_scores(
            _dense_columns(adata.X, hidden_cols),
            out.X[:, hidden_cols],
            hidden,
            selection=_selection_record(tokenizer, adata, hide_fraction, seed),
        )
        record[RECOVERY_KEY] = recovery.to_dict()
        o = recovery.overall
        logger.info(
            "recovery of %d hidden genes (%s): RMSE %.3f, baseline (mean over the other "
            "samples) %.3f; mean per-gene Pearson r %.3f",
            len(hidden),
            RECOVERY_SCALE,
            o["rmse"],
            o["baseline_rmse"],
            o["mean_pearson_r"],
        )
    out.uns.setdefault(keys.UNS, {})[UNS_KEY] = record
    logger.info(
        "imputed %d values in %d of %d samples%s",
        out.layers[keys.IMPUTED].nnz,
        len(rows),
        out.n_obs,
        f" ({len(absent)} model genes absent from the input appended)"
        if add_absent_genes and absent
        else "",
    )
    return out


# --------------------------------------------------------------------------- hiding
def eligible_genes(tokenizer: BinTokenizer, adata: ad.AnnData) -> list[str]:
    """Model genes that may be hidden: a data column, measured in every sample.

    In model order. A gene flagged missing in any sample is left out, so every hidden
    entry has a measured value to score against and no sample loses a gene it never had.
    """
    cols = tokenizer.align_columns(list(map(str, adata.var_names)))
    model_cols = np.arange(tokenizer.n_genes) if cols is None else cols[cols >= 0]
    missing = missing_layer(adata)
    if missing is not None and model_cols.size:
        flagged = sp.csr_matrix(missing, dtype=bool)[:, model_cols].getnnz(axis=0) > 0
        model_cols = model_cols[~flagged]
    names = np.asarray(adata.var_names, dtype=str)
    return names[model_cols].tolist()


def choose_hidden_genes(
    tokenizer: BinTokenizer,
    adata: ad.AnnData,
    *,
    fraction: float | None = None,
    genes: Sequence[str] | None = None,
    seed: int = 0,
) -> list[str]:
    """The data columns (var_names, model order) to hide from the model in every sample.

    ``fraction``: ``max(1, round(fraction * n))`` of the ``n`` :func:`eligible_genes`,
    drawn without replacement by ``numpy.random.default_rng(seed)``. ``genes``: ids or
    symbols (``var["symbol"]``), each of which must be eligible.
    """
    check_hide_arguments(fraction, genes, seed)
    eligible = eligible_genes(tokenizer, adata)
    if not eligible:
        raise ConfigError(
            "no gene can be hidden: no model gene is measured in every sample (genes flagged "
            f"in layers[{keys.MISSING!r}] in any sample, or absent, are never hidden); "
            "select samples from one source, or drop --hide-fraction/--hide-genes"
        )
    if fraction is not None:
        n_hide = max(1, round(fraction * len(eligible)))
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(eligible), size=n_hide, replace=False))
        return [eligible[i] for i in chosen]
    assert genes is not None
    resolved = _resolve_genes(adata, genes)
    allowed = set(eligible)
    model = set(tokenizer.genes)
    not_model = [g for g in resolved if g not in model]
    flagged = [g for g in resolved if g in model and g not in allowed]
    if not_model or flagged:
        parts = []
        if not_model:
            parts.append(f"{len(not_model)} are not genes of the model (e.g. {not_model[:5]})")
        if flagged:
            parts.append(
                f"{len(flagged)} are flagged in layers[{keys.MISSING!r}] in some sample, so "
                f"they have no measured value there to score against (e.g. {flagged[:5]})"
            )
        raise ConfigError(
            f"--hide-genes: {'; '.join(parts)}; list only model genes measured in every "
            f"sample ({len(eligible)} are, e.g. {eligible[:3]})"
        )
    order = {g: i for i, g in enumerate(adata.var_names.astype(str))}
    return sorted(dict.fromkeys(resolved), key=order.__getitem__)


def check_hide_arguments(fraction: float | None, genes: Sequence[str] | None, seed: int) -> None:
    """Exactly one of fraction/genes, the fraction in (0, 1): checked before a checkpoint
    loads, so a typo in a flag costs nothing."""
    if fraction is not None and genes is not None:
        raise ConfigError(
            "give either hide_fraction (--hide-fraction) or hide_genes (--hide-genes), not both"
        )
    if fraction is None and genes is None:
        raise ConfigError("give hide_fraction (--hide-fraction) or hide_genes (--hide-genes)")
    if fraction is not None:
        check_number(
            "hide_fraction (--hide-fraction)",
            fraction,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
            hint="the fraction of the measured model genes to hide, e.g. 0.1",
        )
        check_int("seed (--seed)", seed)


def _resolve_genes(adata: ad.AnnData, genes: Sequence[str]) -> list[str]:
    """Ids (var_names) or unambiguous symbols -> var_names; unknown names are an error."""
    if isinstance(genes, str):
        genes = [genes]
    wanted = [str(g).strip() for g in genes if str(g).strip()]
    if not wanted:
        raise ConfigError("--hide-genes is empty; give gene ids or symbols (comma list or file)")
    names = pd.Index(adata.var_names.astype(str))
    symbols: dict[str, list[str]] = {}
    if keys.SYMBOL in adata.var:
        for name, symbol in zip(names, adata.var[keys.SYMBOL].astype(str), strict=True):
            symbols.setdefault(symbol, []).append(name)
    out: list[str] = []
    unknown: list[str] = []
    ambiguous: list[str] = []
    for g in wanted:
        if g in names:
            out.append(g)
        elif len(symbols.get(g, [])) == 1:
            out.append(symbols[g][0])
        elif g in symbols:
            ambiguous.append(g)
        else:
            unknown.append(g)
    if unknown or ambiguous:
        what = []
        if unknown:
            what.append(f"{len(unknown)} of {len(wanted)} are not genes of the data {unknown[:5]}")
        if ambiguous:
            what.append(f"symbols naming several genes {ambiguous[:5]}: use their Ensembl ids")
        raise ConfigError(
            f"--hide-genes: {'; '.join(what)}; give Ensembl ids as in the .h5ad's var_names "
            f"(e.g. {names[:2].tolist()}) or symbols from var[{keys.SYMBOL!r}]"
        )
    return out


def mask_genes(adata: ad.AnnData, genes: Sequence[str]) -> ad.AnnData:
    """A copy of ``adata`` with ``genes`` (var_names) flagged missing in every sample.

    X keeps its values: every reader feeds flagged entries as [MASK] and never reads them.
    """
    cols = adata.var_names.get_indexer(pd.Index(list(genes)))
    if (cols < 0).any():
        raise ConfigError(f"genes not in the data: {list(np.asarray(genes)[cols < 0][:5])}")
    current = missing_layer(adata)
    base = (
        sp.csr_matrix(adata.shape, dtype=bool)
        if current is None
        else sp.csr_matrix(current, dtype=bool)
    )
    n, k = adata.n_obs, len(cols)
    hide = sp.csr_matrix(
        (np.ones(n * k, dtype=bool), (np.repeat(np.arange(n), k), np.tile(cols, n))),
        shape=adata.shape,
    )
    out = adata.copy()
    out.layers[keys.MISSING] = (base + hide).astype(bool)
    return out


# --------------------------------------------------------------------------- recovery
@dataclass(frozen=True)
class GeneRecovery:
    """How well imputation recovers hidden measured genes, on log10(1+TPM).

    Per gene (across samples): Pearson r of imputed vs measured (NaN with fewer than 3
    samples or a constant side), MAE and RMSE; the same errors for the baseline
    (``BASELINE_RULE``). The baseline has no r of its own: its leave-one-out mean moves
    opposite to the left-out value (r = -1 by construction). Overall MAE/RMSE pool every
    hidden entry (each gene has the same number of samples, so genes weigh equally).
    ``sd`` is each gene's standard deviation over the samples (ddof 0), i.e. the RMSE of
    its mean *with* the hidden value included: an optimistic reference. The leave-one-out
    baseline's RMSE is exactly ``sd * n / (n - 1)``, so the two bracket "the gene's mean"
    and differ little beyond a few dozen samples.
    """

    genes: list[str]
    n_samples: int
    pearson_r: np.ndarray
    mae: np.ndarray
    rmse: np.ndarray
    baseline_mae: np.ndarray
    baseline_rmse: np.ndarray
    sd: np.ndarray
    selection: dict[str, Any] = field(default_factory=dict)

    @property
    def overall(self) -> dict[str, float | int]:
        r = self.pearson_r[np.isfinite(self.pearson_r)]
        rmse = float(np.sqrt(np.mean(self.rmse**2)))
        base_rmse = float(np.sqrt(np.mean(self.baseline_rmse**2)))
        return {
            "mae": float(np.mean(self.mae)),
            "rmse": rmse,
            "baseline_mae": float(np.mean(self.baseline_mae)),
            "baseline_rmse": base_rmse,
            "in_sample_mean_rmse": float(np.sqrt(np.mean(self.sd**2))),
            "rmse_ratio": rmse / base_rmse if base_rmse > 0 else float("nan"),
            "mean_pearson_r": float(r.mean()) if r.size else float("nan"),
            "median_pearson_r": float(np.median(r)) if r.size else float("nan"),
            "n_genes_with_r": int(r.size),
            "n_genes_model_better": int(np.sum(self.rmse < self.baseline_rmse)),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain record for ``uns`` (lists are lists; undefined values are NaN)."""
        return {
            "scale": RECOVERY_SCALE,
            "baseline": BASELINE_RULE,
            "eligible": ELIGIBLE_RULE,
            "selection": dict(self.selection),
            "n_genes": len(self.genes),
            "n_samples": self.n_samples,
            "overall": self.overall,
            "per_gene": {
                "gene": list(self.genes),
                "pearson_r": self.pearson_r.tolist(),
                "mae": self.mae.tolist(),
                "rmse": self.rmse.tolist(),
                "baseline_mae": self.baseline_mae.tolist(),
                "baseline_rmse": self.baseline_rmse.tolist(),
                "sd": self.sd.tolist(),
            },
        }

    def lines(self) -> list[str]:
        """A short table: model vs baseline, MAE, RMSE and the mean per-gene r."""
        return recovery_lines(self.to_dict())


def recovery_lines(record: dict[str, Any]) -> list[str]:
    """The table of a recovery record (``GeneRecovery.to_dict()``, as stored in ``uns``)."""
    o = record["overall"]
    n_genes = record["n_genes"]
    r = (
        f"{o['mean_pearson_r']:.3f} (median {o['median_pearson_r']:.3f}, "
        f"{o['n_genes_with_r']} genes)"
        if o["n_genes_with_r"]
        else "n/a (needs >= 3 samples and varying values)"
    )
    return [
        f"recovery of {n_genes} hidden genes in {record['n_samples']} samples, on "
        f"{RECOVERY_SCALE}:",
        f"  {'':<10}{'MAE':>8}{'RMSE':>8}   mean per-gene Pearson r",
        f"  {'model':<10}{o['mae']:>8.3f}{o['rmse']:>8.3f}   {r}",
        f"  {'baseline':<10}{o['baseline_mae']:>8.3f}{o['baseline_rmse']:>8.3f}   -",
        f"  model RMSE below the baseline's in {o['n_genes_model_better']} of {n_genes} "
        "genes; baseline: the gene's mean over the other samples (with the hidden value "
        f"included, RMSE {o['in_sample_mean_rmse']:.3f})",
    ]


def recovery_scores(
    measured_tpm: np.ndarray,
    imputed_tpm: np.ndarray,
    genes: Sequence[str],
    *,
    selection: dict[str, Any] | None = None,
) -> GeneRecovery:
    """Score imputed against measured TPM (samples x hidden genes) on log10(1+TPM).

    The baseline for sample i and gene g is the mean of g's measured log10(1+TPM) over the
    other samples, so it uses nothing of the value it predicts (the checkpoint stores no
    training means to use instead). Needs at least 2 samples.
    """
    truth = np.log10(1.0 + np.asarray(measured_tpm, dtype=np.float64))
    pred = np.log10(1.0 + np.asarray(imputed_tpm, dtype=np.float64))
    if truth.ndim != 2 or truth.shape != pred.shape or truth.shape[1] != len(genes):
        raise ExpressionValueError(
            f"measured {truth.shape}, imputed {pred.shape} and {len(genes)} genes do not match"
        )
    n = truth.shape[0]
    if n < 2:
        raise ConfigError(
            f"scoring hidden genes needs at least 2 samples (the baseline is the mean over "
            f"the other samples), got {n}; give more samples or drop --hide-fraction/--hide-genes"
        )
    if not (np.isfinite(truth).all() and np.isfinite(pred).all()):
        raise ExpressionValueError("hidden genes hold NaN/inf values; they cannot be scored")
    baseline = (truth.sum(axis=0, keepdims=True) - truth) / (n - 1)
    err, base_err = pred - truth, baseline - truth
    return GeneRecovery(
        genes=list(map(str, genes)),
        n_samples=n,
        pearson_r=_columnwise_pearson(pred, truth) if n >= 3 else np.full(len(genes), np.nan),
        mae=np.abs(err).mean(axis=0),
        rmse=np.sqrt((err**2).mean(axis=0)),
        baseline_mae=np.abs(base_err).mean(axis=0),
        baseline_rmse=np.sqrt((base_err**2).mean(axis=0)),
        sd=truth.std(axis=0),
        selection=dict(selection or {}),
    )


def _columnwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each column pair; NaN where either column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    # a column varying only by rounding error counts as constant
    tiny = denom <= 1e-12 * max(1.0, float(np.abs(a).max(initial=0) * np.abs(b).max(initial=0)))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / denom
    r[tiny] = np.nan
    return np.clip(r, -1.0, 1.0)


def _selection_record(
    tokenizer: BinTokenizer, adata: ad.AnnData, fraction: float | None, seed: int
) -> dict[str, Any]:
    n_eligible = len(eligible_genes(tokenizer, adata))
    if fraction is None:
        return {"how": "given list (--hide-genes)", "n_eligible": n_eligible}
    return {
        "how": "random fraction of the eligible genes (--hide-fraction), the same in every sample",
        "fraction": float(fraction),
        "seed": int(seed),
        "n_eligible": n_eligible,
    }


# --------------------------------------------------------------------------- helpers
def _rows_to_impute(work: ad.AnnData, out_cols: np.ndarray, *, imputes_absent: bool) -> np.ndarray:
    """Samples with a model gene to fill: flagged in the data, or absent and appended."""
    if imputes_absent:
        return np.arange(work.n_obs)
    missing = missing_layer(work)
    present = out_cols[out_cols >= 0]
    if missing is None or present.size == 0:
        if missing is None:
            logger.warning("no layers[%r]: nothing to impute", keys.MISSING)
        return np.array([], dtype=np.int64)
    return np.flatnonzero(sp.csr_matrix(missing, dtype=bool)[:, present].getnnz(axis=1))


def _fill(
    model: BulkRNABert,
    tokenizer: BinTokenizer,
    work: ad.AnnData,
    out: ad.AnnData,
    rows: np.ndarray,
    out_cols: np.ndarray,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Write the prediction for every [MASK] position of ``work``'s ``rows`` into ``out.X``
    (model gene i -> column ``out_cols[i]``; -1: not kept); returns the (row, col) written."""
    import torch

    hit_rows: list[np.ndarray] = []
    hit_cols: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start : start + batch_size]
            tokens = tokenizer.encode_adata(work[batch_rows])
            with torch.inference_mode():
                logits = model(torch.from_numpy(tokens).to(model.device)).logits
            masked = tokens == tokenizer.mask_token_id
            probs = logits[torch.from_numpy(masked).to(logits.device)].float().softmax(dim=-1)
            values = tokenizer.decode_expected(probs.cpu().numpy())
            sample_idx, gene_idx = np.nonzero(masked)
            r, c = batch_rows[sample_idx], out_cols[gene_idx]
            kept = c >= 0  # absent genes not appended: predicted, then dropped
            out.X[r[kept], c[kept]] = values[kept]
            hit_rows.append(r[kept])
            hit_cols.append(c[kept])
    finally:
        model.train(was_training)
    return (
        np.concatenate(hit_rows) if hit_rows else np.array([], dtype=np.int64),
        np.concatenate(hit_cols) if hit_cols else np.array([], dtype=np.int64),
    )


def _dense_columns(x: Any, cols: np.ndarray) -> np.ndarray:
    block = x[:, cols]
    return np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)


def _with_absent_genes(adata: ad.AnnData, genes: list[str]) -> ad.AnnData:
    """``adata`` with ``genes`` appended as columns, all flagged missing (X dense float32).

    Padding says "not measured" in each element's own terms: NaN in float layers and var
    columns, <NA> in bool/int var columns (nullable dtypes h5ad stores), 0/False in
    integer/bool layers (which hold no NaN; ``layers["missing"]`` marks those entries).
    """
    import anndata as ad

    n, k = adata.n_obs, len(genes)
    x = adata.X
    dense = np.asarray(sp.csr_matrix(x).toarray() if sp.issparse(x) else x, dtype=np.float32)
    X = np.hstack([dense, np.zeros((n, k), dtype=np.float32)])
    var = _pad_frame(adata.var, genes)
    var[keys.ABSENT_FROM_INPUT] = np.r_[np.zeros(adata.n_vars, bool), np.ones(k, bool)]
    layers: dict[str, Any] = {}
    padded_zero: list[str] = []
    for name, layer in adata.layers.items():
        if name == keys.IMPUTED:
            continue  # rewritten by the caller
        if name == keys.MISSING:
            layers[name] = sp.hstack(
                [sp.csr_matrix(layer, dtype=bool), sp.csr_matrix(np.ones((n, k), dtype=bool))],
                format="csr",
            )
            continue
        layers[name], fill = _pad_matrix(layer, k)
        if fill == 0:
            padded_zero.append(name)
    if keys.MISSING not in layers:
        layers[keys.MISSING] = sp.hstack(
            [sp.csr_matrix((n, adata.n_vars), dtype=bool), sp.csr_matrix(np.ones((n, k), bool))],
            format="csr",
        )
    if padded_zero:
        logger.warning(
            "layers %s hold no NaN: the %d appended genes are 0 there (layers[%r] marks them)",
            padded_zero,
            k,
            keys.MISSING,
        )
    varm: dict[str, Any] = {}
    for name, value in adata.varm.items():
        arr = np.asarray(value)
        if np.issubdtype(arr.dtype, np.floating) and arr.ndim == 2:
            varm[name] = np.vstack([arr, np.full((k, arr.shape[1]), np.nan, arr.dtype)])
        else:
            logger.warning("varm[%r] dropped: it cannot be padded for the appended genes", name)
    if len(adata.varp):
        logger.warning("varp %s dropped: gene-gene matrices do not extend", list(adata.varp))
    copy = adata.copy()
    return ad.AnnData(
        X=X,
        obs=copy.obs,
        var=var,
        uns=copy.uns,
        obsm=dict(copy.obsm),
        obsp=dict(copy.obsp),
        varm=varm,
        layers=layers,
    )


def _pad_matrix(matrix: Any, k: int) -> tuple[Any, float]:
    """``matrix`` with ``k`` columns appended: NaN if its dtype holds NaN, else 0."""
    dtype = matrix.dtype
    fill = float("nan") if np.issubdtype(dtype, np.floating) else 0
    n = matrix.shape[0]
    if sp.issparse(matrix):
        block = (
            sp.csr_matrix(np.full((n, k), fill, dtype=dtype))
            if fill != 0
            else sp.csr_matrix((n, k), dtype=dtype)
        )
        return sp.hstack([sp.csr_matrix(matrix), block], format="csr"), fill
    arr = np.asarray(matrix)
    return np.hstack([arr, np.full((n, k), fill, dtype=dtype)]), fill


def _pad_frame(frame: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """``frame`` with rows ``index`` appended, every value "unknown" in a writable dtype."""
    new_index = frame.index.append(pd.Index(index, name=frame.index.name))
    columns: dict[str, pd.Series] = {}
    for name, column in frame.items():
        dtype = column.dtype
        if isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_float_dtype(dtype):
            kept = column
        elif pd.api.types.is_bool_dtype(dtype):
            kept = column.astype("boolean")
        elif pd.api.types.is_integer_dtype(dtype):
            kept = column.astype("Int64")
        else:
            kept = column.astype("category")  # text: h5ad writes NaN categories, not NaN text
        extra = pd.Series(index=pd.Index(index), dtype=kept.dtype)
        columns[str(name)] = pd.concat([kept, extra])
    return pd.DataFrame(columns, index=new_index)


def _report(
    adata: ad.AnnData,
    rows: np.ndarray,
    tokenizer: BinTokenizer,
    coverage: GeneCoverage,
    absent: list[str],
) -> dict[str, Any]:
    """Provenance: what was filled, per sample and per gene (lists, not joined text).

    Which entries exactly is ``layers["imputed"]``; per-sample gene lists would repeat it
    (ragged lists do not store as h5ad arrays).
    """
    layer = adata.layers[keys.IMPUTED].tocsc()
    per_gene = np.diff(layer.indptr)
    genes = np.flatnonzero(per_gene)
    by_row = adata.layers[keys.IMPUTED].tocsr()
    return {
        "method": "expected bin value of the MLM prediction with the gene fed as [MASK]",
        "normalization_factor": tokenizer.normalization_factor,
        "n_values": int(layer.nnz),
        "n_samples": len(rows),
        "samples": [str(adata.obs_names[r]) for r in rows],
        "n_genes_per_sample": np.diff(by_row.indptr)[rows].astype(int).tolist(),
        "genes": [str(adata.var_names[g]) for g in genes],
        "n_samples_per_gene": [int(per_gene[g]) for g in genes],
        "absent_genes_added": list(absent),
        "gene_coverage": coverage.to_dict(),
    }
