"""A negative control: random vectors that carry no information about the samples.

On small tasks a probe's hold-out score scatters widely around chance (and small
stratified hold-outs are biased below it), so a leaderboard needs a model known to
know nothing to show which differences are noise. Each *patient* gets one vector,
drawn from a generator seeded by the patient id and ``seed``, so aliquots of one
patient agree (as they would for any real model) and results do not depend on the
sample order.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np

from bulkfm.config import check_int
from bulkfm.embedders.base import Embedder
from bulkfm.embedders.registry import register_embedder
from bulkfm.schema import PATIENT

if TYPE_CHECKING:
    import anndata as ad

__all__ = ["RandomEmbedder"]


@register_embedder("random")
class RandomEmbedder(Embedder):
    """Standard normal vectors per patient (``obs["patient"]``, else per sample)."""

    learns = False

    def __init__(self, *, dim: int = 256, seed: int = 0, label: str | None = None) -> None:
        super().__init__(label=label)
        self.dim = check_int("dim", dim, 1)
        self.seed = check_int("seed", seed, 0)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "seed": self.seed}

    def _vector(self, key: str) -> np.ndarray:
        digest = hashlib.blake2b(f"{self.seed}\0{key}".encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        return rng.standard_normal(self.dim)

    def transform(self, adata: ad.AnnData) -> np.ndarray:
        if PATIENT in adata.obs.columns:
            keys = (
                adata.obs[PATIENT]
                .astype(object)
                .where(adata.obs[PATIENT].notna(), adata.obs_names.to_series())
            )
        else:
            keys = adata.obs_names.to_series()
        cache: dict[str, np.ndarray] = {}
        rows = [cache.setdefault(str(k), self._vector(str(k))) for k in keys]
        return np.vstack(rows).astype(np.float32) if rows else np.empty((0, self.dim))
