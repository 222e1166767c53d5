"""Fixtures and factories every test directory shares.

The factories import torch lazily, so collecting the torch-free tests (data, config,
import isolation) stays torch-free.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.models import BulkRNABert, BulkRNABertConfig

REPO = Path(__file__).resolve().parents[1]

# The sizes a test model has unless the test says otherwise: small enough that a forward
# pass is a few milliseconds on one CPU thread, large enough to have two heads, a gene
# projection (init_gene_embed_dim != embed_dim) and a real feed-forward.
TINY_SIZES: dict[str, int] = {
    "n_genes": 32,
    "embed_dim": 16,
    "init_gene_embed_dim": 8,
    "num_attention_heads": 2,
    "ffn_embed_dim": 32,
    "num_layers": 1,
}


def tiny_config(**overrides: Any) -> BulkRNABertConfig:
    """A tiny ``BulkRNABertConfig``: ``TINY_SIZES`` with ``overrides`` on top.

    One place for the test model's sizes, as HF transformers' model testers do; a test
    names only the sizes its assertions depend on.
    """
    from bulkfm.models import BulkRNABertConfig

    return BulkRNABertConfig(**{**TINY_SIZES, **overrides})


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., BulkRNABert]:
    """Factory: ``tiny_model(**overrides)`` is a fresh ``BulkRNABert(tiny_config(...))``.

    Weights come from torch's global generator, as with a hand-built model, so a test
    that seeds torch first gets the same weights it got before.
    """

    def build(**overrides: Any) -> BulkRNABert:
        from bulkfm.models import BulkRNABert

        return BulkRNABert(tiny_config(**overrides))

    return build


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-tensor tests.

    On a shared machine, waking extra threads costs more than the maths they split.
    Opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def build_shared_dataset(shared: Path) -> ad.AnnData:
    """The shared TCGA + RNAseqDB + GTEx data through the data layer (1,286 samples)."""
    from bulkfm.data.build import build_dataset, shared_data_config

    return build_dataset(shared_data_config(shared), progress=False)


@pytest.fixture(scope="session")
def shared_adata(shared_data: Path) -> ad.AnnData:
    """Built once per test session; tests must not modify it (copy first)."""
    return build_shared_dataset(shared_data)


@pytest.fixture(scope="session")
def sim_base() -> ad.AnnData:
    """~220 samples x 300 genes, 3 cohorts, 2 drivers; shared, never mutate (use ``sim``)."""
    from bulkfm.data.simulate import simulate_bulk

    return simulate_bulk(n_samples=220, n_genes=300, n_cohorts=3, drivers=("TP53", "KRAS"), seed=3)


@pytest.fixture
def sim(sim_base: ad.AnnData) -> ad.AnnData:
    """A private copy of ``sim_base`` a test may change."""
    return sim_base.copy()
