"""Benchmark models: the :class:`Embedder` interface, its registry and the built-ins.

Built-in: ``pca``, ``nmf``, ``raw`` (classical baselines on log TPM), ``bulkrnabert``
(a checkpoint directory), ``precomputed`` (a file of embeddings) and ``random`` (a
negative control). Importing this
package is cheap; torch is imported only when a BulkRNABert model is used.
"""

from bulkfm.bench.embedders.base import (
    Embedder,
    available_embedders,
    get_embedder,
    register_embedder,
)
from bulkfm.bench.embedders.bulkrnabert import BulkRNABertEmbedder
from bulkfm.bench.embedders.classical import NMFEmbedder, PCAEmbedder, RawEmbedder
from bulkfm.bench.embedders.control import RandomEmbedder
from bulkfm.bench.embedders.precomputed import PrecomputedEmbedder, read_embedding_file

__all__ = [
    "BulkRNABertEmbedder",
    "Embedder",
    "NMFEmbedder",
    "PCAEmbedder",
    "PrecomputedEmbedder",
    "RandomEmbedder",
    "RawEmbedder",
    "available_embedders",
    "get_embedder",
    "read_embedding_file",
    "register_embedder",
]

# Published foundation models (adapters register themselves on import; torch stays lazy).
import bulkfm.adapters  # noqa: F401
