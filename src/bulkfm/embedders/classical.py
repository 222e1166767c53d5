"""Classical baselines on log TPM: top-variable genes (``raw``), ``pca`` and ``nmf``.

All three *learn* (which genes vary most, the components), so the benchmark refits
them on the training samples of every split. Genes the data layer marked as not
measured in some training sample (``layers["missing"]``, e.g. when two sources
cover different gene sets) are left out: their zeros are fill values, and ranking
genes by variance would otherwise pick exactly those artefacts. A selected gene
missing from a *test* sample gets that gene's training mean.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from bulkfm.config import check_int
from bulkfm.embedders.base import Embedder
from bulkfm.embedders.registry import register_embedder
from bulkfm.errors import ConfigError, ExpressionValueError

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

__all__ = ["NMFEmbedder", "PCAEmbedder", "RawEmbedder"]

# Columns per chunk when computing per-gene moments (bounds the dense log copy).
_GENE_CHUNK = 4096


def _dense(block: Any) -> np.ndarray:
    return block.toarray() if sp.issparse(block) else np.asarray(block)


def _log_block(X: Any, cols: np.ndarray | slice) -> np.ndarray:
    values = _dense(X[:, cols]).astype(np.float64)
    if not np.isfinite(values).all() or (values < 0).any():
        raise ExpressionValueError(
            "expression has NaN, inf or negative values; the baselines expect TPM (>= 0): "
            "clean the matrix or rebuild it with bulkfm data build"
        )
    return np.log1p(values)


def _measured(adata: ad.AnnData) -> np.ndarray:
    """Genes measured in every sample of ``adata`` (all genes without a missing layer)."""
    if "missing" not in adata.layers:
        return np.ones(adata.n_vars, dtype=bool)
    missing = adata.layers["missing"]
    per_gene = np.asarray(missing.sum(axis=0)).ravel()
    return per_gene == 0


class _LogTPMBaseline(Embedder):
    """Shared fitting: pick the top-variable measured genes of log1p(TPM) on training rows."""

    learns = True

    def __init__(self, *, n_top_genes: int, seed: int = 0, label: str | None = None) -> None:
        super().__init__(label=label)
        self.n_top_genes = check_int("n_top_genes", n_top_genes, 1)
        self.seed = check_int("seed", seed, 0)
        self.genes_: np.ndarray | None = None
        self.fill_: np.ndarray | None = None

    def config(self) -> dict[str, Any]:
        return {"n_top_genes": self.n_top_genes, "seed": self.seed}

    def _select_genes(self, adata: ad.AnnData) -> np.ndarray:
        if adata.n_obs < 2:
            raise ConfigError(f"{self.label}: need at least 2 training samples, got {adata.n_obs}")
        measured = np.flatnonzero(_measured(adata))
        if measured.size == 0:
            raise ExpressionValueError(
                f"{self.label}: every gene is missing in some training sample "
                "(layers['missing']); nothing to fit on"
            )
        var = np.empty(measured.size)
        mean = np.empty(measured.size)
        for start in range(0, measured.size, _GENE_CHUNK):
            cols = measured[start : start + _GENE_CHUNK]
            block = _log_block(adata.X, cols)
            var[start : start + cols.size] = block.var(axis=0)
            mean[start : start + cols.size] = block.mean(axis=0)
        order = np.argsort(-var, kind="stable")[: self.n_top_genes]
        chosen = np.sort(order)
        self.genes_ = np.asarray(adata.var_names[measured[chosen]])
        self.fill_ = mean[chosen]
        self._fitted = True
        return self._features(adata)

    def _features(self, adata: ad.AnnData) -> np.ndarray:
        """log1p(TPM) of the selected genes; missing entries get the training mean."""
        self._check_fitted()
        assert self.genes_ is not None and self.fill_ is not None
        pos = adata.var_names.get_indexer(self.genes_)
        if (pos < 0).any():
            absent = self.genes_[pos < 0][:5].tolist()
            raise ExpressionValueError(
                f"{self.label}: {int((pos < 0).sum())} genes chosen on the training data are "
                f"not in this AnnData (e.g. {absent}); transform data with the same genes"
            )
        values = _log_block(adata.X, pos)
        if "missing" in adata.layers:
            miss = _dense(adata.layers["missing"][:, pos]).astype(bool)
            if miss.any():
                values = np.where(miss, self.fill_[None, :], values)
        return values


@register_embedder("raw")
class RawEmbedder(_LogTPMBaseline):
    """The ``n_top_genes`` most variable measured genes, log1p(TPM) (the probe standardises)."""

    def __init__(self, *, n_top_genes: int = 512, seed: int = 0, label: str | None = None) -> None:
        super().__init__(n_top_genes=n_top_genes, seed=seed, label=label)

    def fit(self, adata_train: ad.AnnData) -> RawEmbedder:
        self._select_genes(adata_train)
        self._fitted = True
        return self

    def transform(self, adata: ad.AnnData) -> np.ndarray:
        return self._features(adata).astype(np.float32)


@register_embedder("pca")
class PCAEmbedder(_LogTPMBaseline):
    """PCA of standardised log1p(TPM) of the top-variable genes (all fitted on training rows)."""

    def __init__(
        self,
        *,
        n_components: int = 256,
        n_top_genes: int = 5000,
        seed: int = 0,
        label: str | None = None,
    ) -> None:
        super().__init__(n_top_genes=n_top_genes, seed=seed, label=label)
        self.n_components = check_int("n_components", n_components, 1)
        self._mean: np.ndarray | None = None
        self._std: np.ndarray | None = None
        self._pca: Any = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n_components": self.n_components}

    def fit(self, adata_train: ad.AnnData) -> PCAEmbedder:
        from sklearn.decomposition import PCA

        values = self._select_genes(adata_train)
        self._mean = values.mean(axis=0)
        std = values.std(axis=0)
        std[std < 1e-12] = 1.0
        self._std = std
        k = min(self.n_components, values.shape[0] - 1, values.shape[1])
        if k < self.n_components:
            logger.debug("pca: %d components (limited by %s)", k, values.shape)
        self._pca = PCA(n_components=k, random_state=self.seed)
        self._pca.fit((values - self._mean) / self._std)
        self._fitted = True
        return self

    def transform(self, adata: ad.AnnData) -> np.ndarray:
        values = self._features(adata)
        return self._pca.transform((values - self._mean) / self._std).astype(np.float32)


@register_embedder("nmf")
class NMFEmbedder(_LogTPMBaseline):
    """Non-negative matrix factorisation of log1p(TPM) of the top-variable genes.

    Multiplicative updates (``solver="mu"``) because its ``transform`` of new
    samples is an order of magnitude faster than coordinate descent's here.
    """

    def __init__(
        self,
        *,
        n_components: int = 128,
        n_top_genes: int = 2000,
        max_iter: int = 200,
        seed: int = 0,
        label: str | None = None,
    ) -> None:
        super().__init__(n_top_genes=n_top_genes, seed=seed, label=label)
        self.n_components = check_int("n_components", n_components, 1)
        self.max_iter = check_int("max_iter", max_iter, 1)
        self._nmf: Any = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n_components": self.n_components, "max_iter": self.max_iter}

    def fit(self, adata_train: ad.AnnData) -> NMFEmbedder:
        from sklearn.decomposition import NMF
        from sklearn.exceptions import ConvergenceWarning

        values = self._select_genes(adata_train)
        k = min(self.n_components, *values.shape)
        self._nmf = NMF(
            n_components=k,
            init="nndsvda",
            solver="mu",
            max_iter=self.max_iter,
            tol=1e-4,
            random_state=self.seed,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self._nmf.fit(values)
        self._fitted = True
        return self

    def transform(self, adata: ad.AnnData) -> np.ndarray:
        from sklearn.exceptions import ConvergenceWarning

        values = self._features(adata)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return self._nmf.transform(values).astype(np.float32)
