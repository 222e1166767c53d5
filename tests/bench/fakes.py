"""Stand-in models for the benchmark tests: cheap, informative, and observable."""

from __future__ import annotations

import anndata as ad
import numpy as np

from bulkfm.embedders import Embedder


def signal_embedding(adata: ad.AnnData, dim: int = 12, seed: int = 0) -> np.ndarray:
    """Simulated programme activities plus noise columns: a cheap, informative embedding."""
    rng = np.random.default_rng(seed)
    prog = np.asarray(adata.obsm["programmes"], dtype=np.float64)
    noise = rng.normal(size=(adata.n_obs, max(0, dim - prog.shape[1])))
    return np.hstack([prog, noise])[:, :dim]


class Fixed(Embedder):
    """A frozen embedding looked up by sample id; counts transform calls."""

    name = "fixed"

    def __init__(self, adata: ad.AnnData, emb: np.ndarray, label: str = "fixed") -> None:
        super().__init__(label=label)
        self._ids = adata.obs_names
        self._emb = emb
        self.calls = 0

    def config(self) -> dict:
        return {"sum": float(np.nansum(self._emb)), "label": self.label}

    def transform(self, adata: ad.AnnData) -> np.ndarray:
        self.calls += 1
        return self._emb[self._ids.get_indexer(adata.obs_names)]
