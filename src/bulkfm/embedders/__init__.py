"""Models that turn an AnnData into one vector per sample, and the registry that finds them.

Built-in: ``pca``, ``nmf``, ``raw`` (classical baselines on log TPM), ``bulkrnabert``
(a checkpoint directory), ``precomputed`` (a file of embeddings), ``random`` (a negative
control) and the published-model adapters in :mod:`bulkfm.adapters`. Importing this
package imports no model: each is loaded by name on first use
(:func:`~bulkfm.embedders.registry.get_embedder`).
"""

from bulkfm.embedders.base import Embedder
from bulkfm.embedders.registry import (
    BUILTIN_EMBEDDERS,
    available_embedders,
    get_embedder,
    register_embedder,
)

__all__ = [
    "BUILTIN_EMBEDDERS",
    "Embedder",
    "available_embedders",
    "get_embedder",
    "register_embedder",
]
