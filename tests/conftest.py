from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("BULKFM_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 - legacy global state some libraries still read


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test with the reason when it is absent."""
    path = shared_data_dir()
    if not (path / "README.md").exists():
        pytest.skip(
            f"real data not found at {path}: put the project's shared/ folder beside the "
            "checkout or set BULKFM_SHARED_DATA"
        )
    return path


def build_shared_dataset(shared: Path):
    """The shared TCGA + RNAseqDB + GTEx data through the data layer (1,286 samples)."""
    from bulkfm.data.build import build_dataset, shared_data_config

    return build_dataset(shared_data_config(shared), progress=False)


@pytest.fixture(scope="session")
def shared_adata(shared_data: Path):
    """Built once per test session; tests must not modify it (copy first)."""
    return build_shared_dataset(shared_data)
