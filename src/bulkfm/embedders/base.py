"""The interface every benchmarked model implements (the registry is in ``registry``).

An embedder maps an AnnData (samples x genes, TPM) to one vector per sample.
Models that *learn* from expression (PCA, NMF, gene selection) are refitted on the
training samples of every split, so no test sample shapes its own embedding;
frozen models (a pre-trained network, a file of embeddings) are computed once and
cached on disk under their fingerprint and the data's.
"""

from __future__ import annotations

import abc
import logging
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bulkfm.config import check_bool
from bulkfm.errors import ConfigError
from bulkfm.fingerprint import stable_hash

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.models.hub import HubSnapshot

logger = logging.getLogger(__name__)

__all__ = ["CheckpointEmbedder", "Embedder"]


class Embedder(abc.ABC):
    """Base class: ``fit`` on training samples (learning models only), then ``transform``.

    Subclasses set ``learns`` and implement :meth:`transform`, plus :meth:`fit`
    when they learn, and :meth:`config` returning every setting that changes the
    output (it feeds :meth:`fingerprint`, hence the cache key). Bump ``version``
    when the algorithm changes so stale caches are not reused.
    """

    name: ClassVar[str] = "embedder"
    learns: ClassVar[bool] = False
    cacheable: ClassVar[bool] = True
    version: ClassVar[int] = 1

    def __init__(self, *, label: str | None = None) -> None:
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise ConfigError(f"label must be a non-empty string, got {label!r}")
        self._label = label
        self._fitted = not self.learns

    @property
    def label(self) -> str:
        """Display name in reports (defaults to the registry name)."""
        return self._label or self.name

    def config(self) -> dict[str, Any]:
        """JSON-able settings that determine the output."""
        return {}

    def fingerprint(self) -> str:
        """Hash of the class, its version and :meth:`config`."""
        return stable_hash({"name": self.name, "version": self.version, "config": self.config()})

    def fit(self, adata_train: ad.AnnData) -> Embedder:
        """Learn from training samples only; models that do not learn ignore this."""
        self._fitted = True
        return self

    @abc.abstractmethod
    def transform(self, adata: ad.AnnData) -> np.ndarray:
        """One row per sample of ``adata``, in its order."""

    def fit_transform(self, adata_train: ad.AnnData, adata: ad.AnnData) -> np.ndarray:
        return self.fit(adata_train).transform(adata)

    def _bool_setting(self, key: str, value: Any) -> bool:
        """A boolean model setting: a real True/False, never text (``bool("flase")`` is
        True); the error names the flag that sets it."""
        hint = f"pass --model-arg {self.name}:{key}=true (or false), or {key}=True in Python"
        return bool(check_bool(f"{self.name}: {key}", value, hint=hint))

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise ConfigError(
                f"embedder {self.label!r} learns from data: call fit(adata_train) before transform"
            )

    def restore(self, described: dict[str, Any]) -> None:
        """Take back what :meth:`describe` recorded when the output was computed (e.g. a
        gene-coverage record), for an embedding read from a cache. Default: nothing."""
        return None

    def describe(self) -> dict[str, Any]:
        """Record for run metadata."""
        return {
            "label": self.label,
            "name": self.name,
            "learns": self.learns,
            "fingerprint": self.fingerprint(),
            "config": self.config(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(label={self.label!r}, config={self.config()!r})"


class CheckpointEmbedder(Embedder):
    """A frozen model read from saved weights (BulkRNABert or a published model).

    It records where the weights came from (``hub``: the Hub snapshot, when resolved from
    a repo id) and how much of its gene list the data measured (``coverage_``, set by
    ``transform``); :meth:`describe` reports both and :meth:`restore` takes the coverage
    back from a cache entry, so run.json lists it whether the embedding was computed or
    cached.
    """

    def __init__(self, *, label: str | None = None) -> None:
        super().__init__(label=label)
        self.hub: HubSnapshot | None = None
        self.coverage_: dict[str, Any] | None = None

    def restore(self, described: dict[str, Any]) -> None:
        coverage = described.get("coverage")
        if isinstance(coverage, dict):
            self.coverage_ = coverage

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.hub is not None:
            out["hub"] = self.hub.describe()
        if self.coverage_ is not None:
            out["coverage"] = self.coverage_
        return out
