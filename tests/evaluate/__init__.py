"""Helpers shared by the evaluation tests: tiny simulated data and a tiny model."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np

TINY_HEADS: dict[str, Any] = {
    "mlp": {"hidden": [16], "max_epochs": 25, "patience": 5},
    "cox": {"hidden": [16], "max_epochs": 25, "patience": 5},
    "finetune": {"epochs": 2, "batch_size": 16, "patience": None, "hidden": [8]},
}
TINY_BASELINES: dict[str, Any] = {
    "pca_components": 12,
    "nmf_components": 6,
    "nmf_max_iter": 50,
    "cox_components": 6,
}
TINY_PRETRAIN: dict[str, Any] = {
    "model": {
        "embed_dim": 16,
        "init_gene_embed_dim": 8,
        "num_attention_heads": 2,
        "ffn_embed_dim": 32,
        "num_layers": 1,
    },
    "data": {"top_k_variable_genes": 32},
    "optim": {"lr": 1e-2, "warmup_steps": 2, "max_steps": 6, "micro_batch_size": 16},
    "eval_every": 6,
    "checkpoint_every": 100,
}


def tiny_data(seed: int = 3, n_samples: int = 150, n_genes: int = 120) -> ad.AnnData:
    from bulkfm.data.simulate import simulate_bulk

    return simulate_bulk(
        n_samples=n_samples, n_genes=n_genes, n_cohorts=4, censoring_rate=0.4, seed=seed
    )


def tiny_model(adata: ad.AnnData, n_genes: int = 40, seed: int = 0) -> tuple[Any, Any]:
    """A randomly initialised 1-block BulkRNABert on the n_genes most variable genes."""
    import torch

    from bulkfm.models.bulkrnabert import BulkRNABert, BulkRNABertConfig
    from bulkfm.tokenize import BinTokenizer

    var = np.log10(1 + np.asarray(adata.X)).var(axis=0)
    genes = adata.var_names[np.sort(np.argsort(-var)[:n_genes])]
    tokenizer = BinTokenizer.fit_adata(adata[:, genes])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BulkRNABert(
            BulkRNABertConfig(
                n_genes=n_genes,
                embed_dim=16,
                init_gene_embed_dim=8,
                num_attention_heads=2,
                ffn_embed_dim=32,
                num_layers=1,
            )
        ).eval()
    return model, tokenizer
