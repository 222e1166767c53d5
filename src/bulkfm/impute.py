"""Fill genes a sample lacks with the model's masked-language-model prediction.

Genes recorded absent (``adata.layers["missing"]``) are fed as [MASK]; the predicted
bin distribution is turned into TPM by :meth:`BinTokenizer.decode_expected`. This is
the imputation of the paper's robustness experiment, and a better fill than 0 TPM for
samples from pipelines that drop genes.

CLI (:mod:`bulkfm.cli.impute`): ``bulkfm impute --model DIR --input X.h5ad --output Y.h5ad``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from bulkfm import schema as keys
from bulkfm.config import check_int
from bulkfm.tokenize import missing_layer

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.models.bulkrnabert import BulkRNABert
    from bulkfm.tokenize import BinTokenizer

logger = logging.getLogger(__name__)

UNS_KEY = "imputation"


def impute_missing(
    model: BulkRNABert,
    tokenizer: BinTokenizer,
    adata: ad.AnnData,
    *,
    batch_size: int = 8,
) -> ad.AnnData:
    """A copy of ``adata`` whose missing entries hold predicted TPM.

    Adds ``layers["imputed"]`` (sparse bool, which entries were replaced) and
    ``uns["bulkfm"]["imputation"]`` (per-sample gene lists and counts). Genes outside the
    model vocabulary are left as they are; ``layers["missing"]`` is kept as provenance.

    Refused up front (:meth:`BinTokenizer.check_adata`), as :func:`bulkfm.embed.embed_adata`
    refuses them: a ``layers["missing"]`` that is not boolean (or 0/1), NaN/inf in model
    genes not marked missing (mark them to have them imputed), and samples with every
    model gene missing (their fill would be the model's prior, not a prediction).
    """
    import torch

    check_int("batch_size", batch_size, 1)
    from bulkfm.models.bulkrnabert import check_tokenizer_matches

    check_tokenizer_matches(model.config, tokenizer)
    # Before any work: the missing layer must be boolean, values not marked missing
    # finite (NaN is refused, not silently kept: mark it missing to have it imputed),
    # and no sample may lack every model gene (its fill would come from nothing; embed
    # refuses the same samples).
    tokenizer.check_adata(adata)
    cols = tokenizer.align_columns(list(map(str, adata.var_names)))
    vocab_cols = np.arange(tokenizer.n_genes) if cols is None else cols
    out = adata.copy()
    x = out.X
    out.X = np.asarray(sp.csr_matrix(x).toarray() if sp.issparse(x) else x, dtype=np.float32)
    missing = missing_layer(adata)
    if missing is None:
        logger.warning("no layers[%r]: nothing to impute", keys.MISSING)
        rows = np.array([], dtype=np.int64)
    else:
        missing_vocab = sp.csr_matrix(missing)[:, vocab_cols]
        rows = np.flatnonzero(missing_vocab.getnnz(axis=1))
    hit_rows: list[np.ndarray] = []
    hit_cols: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start : start + batch_size]
            tokens = tokenizer.encode_adata(adata[batch_rows])
            with torch.inference_mode():
                logits = model(torch.from_numpy(tokens).to(model.device)).logits
            masked = tokens == tokenizer.mask_token_id
            probs = logits[torch.from_numpy(masked).to(logits.device)].float().softmax(dim=-1)
            values = tokenizer.decode_expected(probs.cpu().numpy())
            sample_idx, gene_idx = np.nonzero(masked)
            r, c = batch_rows[sample_idx], vocab_cols[gene_idx]
            out.X[r, c] = values
            hit_rows.append(r)
            hit_cols.append(c)
    finally:
        model.train(was_training)
    r = np.concatenate(hit_rows) if hit_rows else np.array([], dtype=np.int64)
    c = np.concatenate(hit_cols) if hit_cols else np.array([], dtype=np.int64)
    out.layers[keys.IMPUTED] = sp.csr_matrix(
        (np.ones(len(r), dtype=bool), (r, c)), shape=adata.shape
    )
    out.uns.setdefault(keys.UNS, {})[UNS_KEY] = _report(out, rows, tokenizer)
    logger.info(
        "imputed %d values in %d of %d samples", out.layers[keys.IMPUTED].nnz, len(rows), out.n_obs
    )
    return out


def _report(adata: ad.AnnData, rows: np.ndarray, tokenizer: BinTokenizer) -> dict[str, Any]:
    layer = adata.layers[keys.IMPUTED]
    var_names = np.asarray(adata.var_names, dtype=str)
    genes_per_sample = [var_names[layer[r].indices].tolist() for r in rows]
    return {
        "method": "expected bin value of the MLM prediction with the gene fed as [MASK]",
        "normalization_factor": tokenizer.normalization_factor,
        "n_values": int(layer.nnz),
        "n_samples": len(rows),
        "samples": [str(adata.obs_names[r]) for r in rows],
        "n_genes_per_sample": [len(g) for g in genes_per_sample],
        "genes_per_sample": [";".join(g) for g in genes_per_sample],
    }
