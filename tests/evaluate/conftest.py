"""Fixtures of the evaluation tests: tiny simulated data, a tiny model fitted to it, and
config sections that keep a whole protocol run to seconds.

Session-scoped, so the module-scoped runs of ``test_run`` can use them; the factories
build a fresh object on every call, and the section fixtures must not be modified.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.models import BulkRNABert
    from bulkfm.tokenize import BinTokenizer


@pytest.fixture(scope="session")
def tiny_heads() -> dict[str, Any]:
    """``heads``: one small hidden layer and few epochs for every head."""
    return {
        "mlp": {"hidden": [16], "max_epochs": 25, "patience": 5},
        "cox": {"hidden": [16], "max_epochs": 25, "patience": 5},
        "finetune": {"epochs": 2, "batch_size": 16, "patience": None, "hidden": [8]},
    }


@pytest.fixture(scope="session")
def tiny_baselines() -> dict[str, Any]:
    """``baselines``: component counts below the tiny data's training-side size."""
    return {
        "pca_components": 12,
        "nmf_components": 6,
        "nmf_max_iter": 50,
        "cox_components": 6,
    }


@pytest.fixture(scope="session")
def tiny_pretrain() -> dict[str, Any]:
    """``pretrain``: six steps of a tiny model, so "pre-train here" runs end to end."""
    return {
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


@pytest.fixture(scope="session")
def tiny_data() -> Callable[..., ad.AnnData]:
    """Factory: ``tiny_data(seed=3, n_samples=150, n_genes=120)``, four simulated cohorts
    with censored survival."""

    def build(seed: int = 3, n_samples: int = 150, n_genes: int = 120) -> ad.AnnData:
        from bulkfm.data.simulate import simulate_bulk

        return simulate_bulk(
            n_samples=n_samples, n_genes=n_genes, n_cohorts=4, censoring_rate=0.4, seed=seed
        )

    return build


@pytest.fixture(scope="session")
def tiny_model_for(
    tiny_model: Callable[..., BulkRNABert],
) -> Callable[..., tuple[BulkRNABert, BinTokenizer]]:
    """Factory: ``tiny_model_for(adata, n_genes=40, seed=0)`` is a randomly initialised
    ``tiny_config(n_genes=n_genes)`` BulkRNABert (seeded without touching the global RNG)
    and a tokenizer fitted to ``adata``'s ``n_genes`` most variable genes."""

    def build(
        adata: ad.AnnData, n_genes: int = 40, seed: int = 0
    ) -> tuple[BulkRNABert, BinTokenizer]:
        import torch

        from bulkfm.tokenize import BinTokenizer

        var = np.log10(1 + np.asarray(adata.X)).var(axis=0)
        genes = adata.var_names[np.sort(np.argsort(-var)[:n_genes])]
        tokenizer = BinTokenizer.fit_adata(adata[:, genes])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = tiny_model(n_genes=n_genes).eval()
        return model, tokenizer

    return build
