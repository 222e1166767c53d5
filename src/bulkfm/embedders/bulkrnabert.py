"""A BulkRNABert checkpoint as a frozen benchmark model (mean over genes of one layer, or
the concatenated means of several layers with ``layers``; ``pooling="max"`` takes each
dimension's maximum over genes instead of the mean).

Any checkpoint directory works: a bulkfm one (config.json, model.safetensors,
tokenizer.json) or an official-format one (then ``genes`` and
``normalization_factor`` are required, see ``bulkfm.models.bulkrnabert.load_pretrained``),
and so does a Hugging Face repo id (``InstaDeepAI/BulkRNABert``: genes and factor known).
The fingerprint hashes the checkpoint's files, so retraining into the same
directory never reuses stale cached embeddings. torch is imported only on use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bulkfm.config import check_choice, check_int, check_number
from bulkfm.embedders.base import CheckpointEmbedder
from bulkfm.embedders.registry import register_embedder
from bulkfm.errors import CheckpointError, ConfigError
from bulkfm.fingerprint import path_digest, stable_hash
from bulkfm.tokenize import DEFAULT_MIN_GENE_COVERAGE

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

__all__ = ["BulkRNABertEmbedder"]


@register_embedder("bulkrnabert")
class BulkRNABertEmbedder(CheckpointEmbedder):
    """Frozen BulkRNABert: ``bulkfm.embed.embed_adata`` of a checkpoint directory."""

    learns = False

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        genes: Sequence[str] | str | os.PathLike | None = None,
        normalization_factor: float | None = None,
        layer: int = -1,
        layers: Sequence[int] | str | None = None,
        pooling: str = "mean",
        batch_size: int = 8,
        exclude_missing: bool = True,
        min_gene_coverage: float = DEFAULT_MIN_GENE_COVERAGE,
        device: str = "cpu",
        revision: str | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(label=label)
        if model_dir is None:
            raise ConfigError(
                "the bulkrnabert model needs a checkpoint directory: --model-dir DIR (or "
                "model_dir= in Python)"
            )
        from bulkfm.models.hub import resolve_bulkrnabert

        # A local folder as is; a Hub repo id (owner/name[@revision][:subfolder]) fetched
        # now, so that the fingerprint hashes the files it will embed with.
        source = resolve_bulkrnabert(model_dir, revision=revision)
        self.model_dir = source.path
        self.hub = source.snapshot
        if not self.model_dir.is_dir():
            raise CheckpointError(
                f"checkpoint directory {self.model_dir} not found; pass the folder holding "
                "config.json and model.safetensors, or a Hugging Face repo id owner/name"
            )
        check_int("layer", layer, hint="-1 = last block")
        self.layers = _layer_list(layers)
        self.pooling = _pooling(pooling)
        self.genes = genes if genes is not None else source.genes
        self.normalization_factor = (
            normalization_factor
            if normalization_factor is not None
            else source.normalization_factor
        )
        self.layer = layer
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.exclude_missing = self._bool_setting("exclude_missing", exclude_missing)
        self.min_gene_coverage = check_number(
            "min_gene_coverage", min_gene_coverage, low=0.0, high=1.0
        )
        self.device = str(device)
        self._digest: str | None = None

    def config(self) -> dict[str, Any]:
        if self._digest is None:
            self._digest = path_digest(self.model_dir)
        genes = self.genes
        genes_repr = (
            None
            if genes is None
            else str(genes)
            if isinstance(genes, str | os.PathLike)
            else stable_hash(list(genes))
        )
        return {
            "checkpoint": self._digest,
            "genes": genes_repr,
            "normalization_factor": self.normalization_factor,
            "layer": self.layer,
            **({"layers": list(self.layers)} if self.layers is not None else {}),
            # the default is left out so that existing fingerprints (caches) stay valid
            **({"pooling": self.pooling} if self.pooling != "mean" else {}),
            "exclude_missing": self.exclude_missing,
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model_dir": str(self.model_dir)}

    def transform(self, adata: ad.AnnData) -> np.ndarray:
        from bulkfm.embed import embed_adata
        from bulkfm.models.bulkrnabert import load_pretrained
        from bulkfm.tokenize import gene_coverage

        model, tokenizer = load_pretrained(
            self.model_dir,
            genes=self.genes,
            normalization_factor=self.normalization_factor,
            device=self.device,
        )
        coverage = gene_coverage(
            tokenizer,
            adata,
            min_coverage=self.min_gene_coverage,
            option=f"the {self.label} model's min_gene_coverage (--model-arg "
            f"{self.label}:min_gene_coverage=FRACTION)",
        )
        self.coverage_ = coverage.to_dict()
        emb = embed_adata(
            model,
            tokenizer,
            adata,
            layer=self.layer,
            layers=self.layers,  # several layers: their means concatenated, one pass
            pooling=self.pooling,
            batch_size=self.batch_size,
            exclude_missing=self.exclude_missing,
            device=self.device,
            coverage=coverage,
        )
        return np.asarray(emb)


def _pooling(pooling: Any) -> str:
    """``pooling`` checked against the model's options; the default needs no torch."""
    if pooling == "mean":  # the paper's, and the common case: no torch import to check it
        return pooling
    from bulkfm.models.bulkrnabert import POOLINGS

    return str(
        check_choice(
            "pooling",
            pooling,
            POOLINGS,
            hint="--model-arg NAME:pooling=mean|max (pooling= in Python)",
        )
    )


def _layer_list(layers: Sequence[int] | str | None) -> tuple[int, ...] | None:
    """``layers`` as a tuple of ints; a string "1,2" (from ``--model-arg``) is split."""
    if layers is None:
        return None
    items: Sequence[Any] = layers.split(",") if isinstance(layers, str) else layers
    try:
        out = tuple(int(str(i).strip()) for i in items)
    except ValueError:
        out = ()
    if not out:
        raise ConfigError(
            f"layers must name one or more layers, e.g. layers=[1, 2] or --model-arg "
            f"NAME:layers=1,2 (0 = embeddings, -1 = last block); got {layers!r}"
        )
    return out
