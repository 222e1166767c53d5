"""What the baselines read when the data lack some of the model's genes."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from bulkfm.evaluate.arms import baseline_matrix
from bulkfm.evaluate.config import EvaluateConfig
from bulkfm.evaluate.model import LoadedModel
from bulkfm.evaluate.results import ModelInfo
from bulkfm.tokenize import BinTokenizer, TokenizerConfig


def _setup(genes_in_data: list[str], baseline_genes: str = "model"):
    tokenizer = BinTokenizer(
        TokenizerConfig(genes=["g0", "g1", "g2", "g3"], normalization_factor=3.0)
    )
    X = np.arange(3 * len(genes_in_data), dtype=np.float32).reshape(3, -1)
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=genes_in_data))
    cfg = EvaluateConfig.from_dict({"model": {"path": "m"}, "baselines": {"genes": baseline_genes}})
    return cfg, LoadedModel(None, tokenizer, ModelInfo("given")), adata


def test_baselines_read_the_model_genes_the_data_has_in_model_order():
    cfg, mdl, adata = _setup(["x", "g3", "g0", "y", "g2"])  # g1 absent
    X = baseline_matrix(cfg, mdl, adata)
    expected = adata[:, ["g0", "g2", "g3"]].X  # naive: the present model genes, model order
    np.testing.assert_array_equal(X, expected)


def test_all_genes_when_asked():
    cfg, mdl, adata = _setup(["x", "g3", "g0"], baseline_genes="all")
    np.testing.assert_array_equal(baseline_matrix(cfg, mdl, adata), adata.X)
