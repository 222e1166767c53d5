from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from bulkfm.bench.config import BenchConfig
from bulkfm.data.simulate import simulate_bulk


@pytest.fixture(scope="session")
def sim_base() -> ad.AnnData:
    """~200 samples x 300 genes, 3 cohorts, 2 drivers; shared, never mutate (use `sim`)."""
    return simulate_bulk(n_samples=220, n_genes=300, n_cohorts=3, drivers=("TP53", "KRAS"), seed=3)


@pytest.fixture
def sim(sim_base: ad.AnnData) -> ad.AnnData:
    return sim_base.copy()


@pytest.fixture
def small_config() -> BenchConfig:
    """Thresholds low enough for the tiny simulation, 2 splits."""
    return BenchConfig(
        n_splits=2,
        min_positives=8,
        min_negatives=8,
        min_events=8,
        min_class_patients=8,
        n_boot=50,
    )


def signal_embedding(adata: ad.AnnData, dim: int = 12, seed: int = 0) -> np.ndarray:
    """Simulated programme activities plus noise columns: a cheap, informative embedding."""
    rng = np.random.default_rng(seed)
    prog = np.asarray(adata.obsm["programmes"], dtype=np.float64)
    noise = rng.normal(size=(adata.n_obs, max(0, dim - prog.shape[1])))
    return np.hstack([prog, noise])[:, :dim]
