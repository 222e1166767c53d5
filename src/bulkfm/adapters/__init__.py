"""Adapters that add published expression foundation models to ``bulkfm bench``.

Each adapter reads a model's released weights from a local path, applies the
model's published preprocessing to bulk data on its own gene vocabulary (with a
coverage report) and pools as published, or better where the published recipe is
wrong for bulk data (documented per model, the published one kept as an option).
Importing this package is cheap: torch and each model's optional dependencies are
imported only when that adapter embeds.
"""

from bulkfm.adapters.base import FoundationEmbedder, GeneInput, gene_input, masked_mean

__all__ = ["FoundationEmbedder", "GeneInput", "gene_input", "masked_mean"]

# Each import registers one model with the benchmark (cheap: no torch at import).
from bulkfm.adapters import (  # noqa: F401
    bulkformer,
    cellfm,
    geneformer,
    scbert,
    scfoundation,
    scgpt,
    sclong,
)
