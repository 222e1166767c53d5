"""Simulated data and a tiny pre-training config, shared by the pre-training tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bulkfm.train.config import PretrainConfig
from tests.conftest import TINY_SIZES


def _simulated_adata(n: int = 60, g: int = 24, n_cohorts: int = 3, seed: int = 0) -> ad.AnnData:
    """Cohort profiles + a shared latent factor + noise, as TPM; two samples per patient."""
    rng = np.random.default_rng(seed)
    cohort = rng.integers(0, n_cohorts, n)
    profile = rng.normal(1.5, 0.8, (n_cohorts, g))
    latent = rng.normal(size=(n, 2)) @ rng.normal(scale=0.4, size=(2, g))
    log10 = profile[cohort] + latent + rng.normal(scale=0.15, size=(n, g))
    tpm = np.clip(10**log10 - 1, 0, None).astype(np.float32)
    tpm[rng.random((n, g)) < 0.05] = 0.0
    obs = pd.DataFrame(
        {"patient": [f"P{i // 2}" for i in range(n)], "cohort": cohort.astype(str)},
        index=[f"S{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(g)])
    return ad.AnnData(tpm, obs=obs, var=var)


def _pretrain_config(out: Path, **optim: Any) -> PretrainConfig:
    """A few steps of a tiny model, checkpointing and evaluating within them."""
    raw = {
        # the shared tiny model; n_genes comes from the data at run time
        "model": {k: v for k, v in TINY_SIZES.items() if k != "n_genes"},
        "data": {"holdout_fraction": 0.1, "top_k_variable_genes": 16},
        "optim": {
            "lr": 3e-3,
            "warmup_steps": 2,
            "max_steps": 6,
            "micro_batch_size": 4,
            "target_tokens_per_step": 128,
            **optim,
        },
        "output_dir": str(out),
        "checkpoint_every": 2,
        "keep_checkpoints": 2,
        "eval_every": 3,
    }
    return PretrainConfig.from_dict(raw)


@pytest.fixture(scope="session")
def simulated_adata() -> Callable[..., ad.AnnData]:
    """Factory: ``simulated_adata(n=60, g=24, n_cohorts=3, seed=0)``, TPM with patients."""
    return _simulated_adata


@pytest.fixture(scope="session")
def pretrain_config() -> Callable[..., PretrainConfig]:
    """Factory: ``pretrain_config(output_dir, **optim_overrides)``."""
    return _pretrain_config
