"""BulkFormer adapter against the authors' own model class (current release).

The authors' code is not a package on a registry: it lives in
github.com/KangBoming/BulkFormer (``utils/BulkFormer.py``). Set
``BULKFM_BULKFORMER_REPO`` to a checkout of that repository to run these tests;
without it they are skipped. Checked against commit 5bcf5b9 (July 2026).

The test builds a tiny model with the official class, saves its state dict as the
release does (``bulkformer_147M.pt``, DataParallel's ``module.`` prefix) next to the
graph and gene files, and compares the adapter with the official pipeline: the
notebook's alignment (absent genes = -10), ``mask_prob`` = fraction of absent genes,
``model(X, mask_prob=...)`` and pooling over ``interested_gene_list.pt``.

One substitution: the notebook wraps the graph in a ``torch_sparse.SparseTensor``,
and torch_sparse has no wheel for this torch. The same matrix is built as a
``torch.sparse`` tensor (entry (G[0][k], G[1][k]) = w[k], what
``SparseTensor(row=G[1], col=G[0], value=w).t()`` holds), which torch_geometric's
GCNConv accepts for one 2-D sample, so each official graph convolution runs sample
by sample; the rest of the official forward is untouched.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("performer_pytorch")
pytest.importorskip("torch_geometric")

from bulkfm.adapters.bulkformer import BulkFormerEmbedder  # noqa: E402
from tests.adapters.bulkformer_files import family_graph  # noqa: E402

REPO = os.environ.get("BULKFM_BULKFORMER_REPO", "")
pytestmark = pytest.mark.skipif(
    not (REPO and (Path(REPO) / "utils" / "BulkFormer.py").is_file()),
    reason="set BULKFM_BULKFORMER_REPO to a checkout of github.com/KangBoming/BulkFormer "
    "to compare with the authors' model class",
)

N_GENES, DIM, HEADS, P_REPEAT = 30, 16, 2, 2
GENES = [f"ENSG{i:011d}" for i in range(N_GENES)]
LISTED = [1, 4, 7, 20, 29]


@pytest.fixture(scope="module")
def official_class() -> Iterator[Any]:
    """``utils.BulkFormer.BulkFormer`` from the checkout, imported without leaking ``utils``."""
    saved = {k: v for k, v in sys.modules.items() if k == "utils" or k.startswith("utils.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, REPO)
    try:
        yield importlib.import_module("utils.BulkFormer").BulkFormer
    finally:
        sys.path.remove(REPO)
        for k in [k for k in sys.modules if k == "utils" or k.startswith("utils.")]:
            del sys.modules[k]
        sys.modules.update(saved)


class _PerSample(torch.nn.Module):
    """Calls the official GCNConv once per sample with the 2-D torch.sparse graph."""

    def __init__(self, conv: torch.nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.conv(xi, graph) for xi in x])


def official_model(cls: Any, dtype: torch.dtype) -> torch.nn.Module:
    edges, weights = family_graph(N_GENES)
    # The notebook: SparseTensor(row=graph[1], col=graph[0], value=weights).t()
    graph = torch.sparse_coo_tensor(
        torch.stack([edges[0], edges[1]]), weights.to(dtype), (N_GENES, N_GENES)
    ).coalesce()
    torch.manual_seed(11)
    model = cls(
        dim=DIM,
        graph=graph,
        gene_emb=None,
        gene_length=N_GENES,
        bin_head=12,
        full_head=HEADS,
        bins=0,
        gb_repeat=1,
        p_repeat=P_REPEAT,
    )
    with torch.no_grad():  # non-trivial LayerNorms and head, so every key matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def release(official_class, tmp_path_factory) -> Path:
    """The official model's weights saved in the release layout (repository folders)."""
    folder = tmp_path_factory.mktemp("bulkformer_official")
    (folder / "model").mkdir()
    (folder / "data").mkdir()
    model = official_model(official_class, torch.float32)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save(state, folder / "model" / "bulkformer_147M.pt")
    edges, weights = family_graph(N_GENES)
    torch.save(edges, folder / "data" / "G_tcga.pt")
    torch.save(weights, folder / "data" / "G_tcga_weight.pt")
    torch.save(LISTED, folder / "data" / "interested_gene_list.pt")
    pd.DataFrame({"ensg_id": GENES}).to_csv(folder / "data" / "bulkformer_gene_info.csv")
    return folder


def tpm_frame(n: int = 4, seed: int = 0) -> pd.DataFrame:
    """TPM for 27 of the 30 genes (two unknown to the model), columns shuffled."""
    rng = np.random.default_rng(seed)
    cols = [*GENES[3:][::-1], "ENSG99999999991"]
    X = rng.lognormal(1.0, 1.5, size=(n, len(cols))).astype(np.float32)
    X[rng.random(X.shape) < 0.2] = 0.0
    return pd.DataFrame(X, columns=cols, index=[f"s{i}" for i in range(n)])


def official_embedding(
    cls: Any, folder: Path, tpm: pd.DataFrame, pooling: str, dtype: torch.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """The notebook's steps: align, mask_prob, model(X, mask_prob), pool the listed genes."""
    log_tpm = np.log1p(tpm)
    absent = [g for g in GENES if g not in log_tpm.columns]
    aligned = log_tpm.reindex(columns=GENES).fillna(-10.0)
    mask_prob = len(absent) / len(GENES)
    model = official_model(cls, dtype)
    state = torch.load(folder / "model" / "bulkformer_147M.pt", weights_only=True)
    model.load_state_dict({k[len("module.") :]: v for k, v in state.items()})
    for block in model.gb_formers:
        block.g = _PerSample(block.g)
    model = model.to(dtype).eval()
    with torch.no_grad():
        X = torch.tensor(aligned.values, dtype=dtype)
        gene_emb = model(X, mask_prob=mask_prob, output_expr=False).numpy()
    sel = gene_emb[:, LISTED, :]
    stats = {"max": sel.max(1), "mean": sel.mean(1), "median": np.median(sel, axis=1)}
    pooled = sum(stats.values()) if pooling == "all" else stats[pooling]
    return np.asarray(pooled), gene_emb


def as_adata(tpm: pd.DataFrame) -> ad.AnnData:
    adata = ad.AnnData(X=tpm.values)
    adata.var_names, adata.obs_names = list(tpm.columns), list(tpm.index)
    return adata


@pytest.mark.parametrize("pooling", ["mean", "max", "median", "all"])
def test_embedding_equals_the_official_pipeline(official_class, release, pooling: str) -> None:
    tpm = tpm_frame()
    want, _ = official_embedding(official_class, release, tpm, pooling, torch.float32)
    emb = BulkFormerEmbedder(release, trust_pickle=True, gene_set="listed", pooling=pooling)
    got = emb.transform(as_adata(tpm))
    assert got.shape == want.shape == (4, DIM + 3)
    assert np.abs(got - want).max() <= 1.5e-6


def test_gene_states_equal_the_official_model_in_float64(official_class, release) -> None:
    tpm = tpm_frame(3, seed=1)
    _, official = official_embedding(official_class, release, tpm, "mean", torch.float64)
    emb = BulkFormerEmbedder(release, trust_pickle=True)
    values, _, _ = emb.model_input(as_adata(tpm))
    with torch.inference_mode():
        states = emb.network.double()(torch.as_tensor(values, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(states, official[:, :, :DIM], rtol=0, atol=1e-12)
