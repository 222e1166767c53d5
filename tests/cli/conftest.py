"""A tiny saved BulkRNABert checkpoint and an .h5ad with missing genes for CLI tests.

The commands are checked against the library functions they wrap, so the model only
has to be deterministic, not trained.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from bulkfm import schema as keys
from bulkfm.io import write_h5ad
from bulkfm.models import BulkRNABert
from bulkfm.tokenize import BinTokenizer, TokenizerConfig

N_GENES = 32
GENES = [f"ENSG{i:011d}" for i in range(N_GENES)]


@pytest.fixture(scope="module")
def model(tiny_model: Callable[..., BulkRNABert]) -> BulkRNABert:
    """Two blocks, so ``--layer 1`` and the default last layer differ."""
    torch.manual_seed(0)
    m = tiny_model(n_genes=N_GENES, n_expressions_bins=16, num_layers=2)
    with torch.no_grad():  # larger weights than the 0.02 init, so layers differ visibly
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer() -> BinTokenizer:
    return BinTokenizer(TokenizerConfig(genes=GENES, normalization_factor=4.0, n_bins=16))


@pytest.fixture(scope="module")
def checkpoint(model: BulkRNABert, tokenizer: BinTokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "model"
    model.save_pretrained(path, tokenizer=tokenizer)
    return path


@pytest.fixture
def adata() -> ad.AnnData:
    """7 samples; samples 0-3 lack two genes each (8 missing values), the rest none."""
    rng = np.random.default_rng(0)
    X = (10 ** rng.uniform(0, 3.5, size=(7, N_GENES)) - 1).astype(np.float32)
    missing = np.zeros(X.shape, dtype=bool)
    for row in range(4):
        missing[row, rng.choice(N_GENES, size=2, replace=False)] = True
    X[missing] = 0.0
    return ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=[f"S{i}" for i in range(7)]),
        var=pd.DataFrame(index=GENES),
        layers={keys.MISSING: sp.csr_matrix(missing)},
    )


@pytest.fixture
def input_h5ad(adata: ad.AnnData, tmp_path: Path) -> Path:
    return write_h5ad(adata, tmp_path / "in.h5ad")
