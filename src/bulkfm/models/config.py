"""BulkRNABert's architecture config, kept free of torch.

It lives apart from the model so ``bulkfm pretrain`` can check a YAML's ``model:``
section (which *is* this class) before torch loads; :mod:`bulkfm.models.bulkrnabert`
re-exports it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bulkfm.config import check_int, check_number
from bulkfm.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_FORMAT", "OFFICIAL_CONFIG_FIELDS", "BulkRNABertConfig"]

# Field names of the official config.json, in its order.
OFFICIAL_CONFIG_FIELDS: tuple[str, ...] = (
    "n_genes",
    "n_expressions_bins",
    "embed_dim",
    "init_gene_embed_dim",
    "use_gene_embedding",
    "project_gene_embedding",
    "num_attention_heads",
    "key_size",
    "ffn_embed_dim",
    "num_layers",
)
# Keys the HuggingFace port writes that do not change the architecture.
_IGNORED_CONFIG_FIELDS = frozenset(
    {
        "architectures",
        "auto_map",
        "model_type",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "embeddings_layers_to_save",
        "attention_maps_to_save",
        "attention_layers_to_save",
        "format",
    }
)
CONFIG_FORMAT = "bulkfm.bulkrnabert/1"


@dataclass
class BulkRNABertConfig:
    """Architecture hyper-parameters; defaults are the official TCGA checkpoint."""

    n_genes: int = 19062
    n_expressions_bins: int = 64
    embed_dim: int = 256
    init_gene_embed_dim: int = 200
    use_gene_embedding: bool = True
    project_gene_embedding: bool = True
    num_attention_heads: int = 8
    key_size: int | None = None
    ffn_embed_dim: int = 512
    num_layers: int = 4
    n_special_tokens: int = 1
    layer_norm_eps: float = 1e-5
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in (
            "n_genes",
            "n_expressions_bins",
            "embed_dim",
            "init_gene_embed_dim",
            "num_attention_heads",
            "ffn_embed_dim",
            "num_layers",
            "n_special_tokens",
        ):
            check_int(name, getattr(self, name), 1)
        check_int("n_expressions_bins", self.n_expressions_bins, 2, hint="BulkRNABert uses 64")
        if self.key_size is None:
            if self.embed_dim % self.num_attention_heads:
                raise ConfigError(
                    f"embed_dim={self.embed_dim} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; change one of them or set key_size explicitly"
                )
            self.key_size = self.embed_dim // self.num_attention_heads
        check_int("key_size", self.key_size, 1)
        check_number("layer_norm_eps", self.layer_norm_eps, low=0.0, low_open=True)
        if (
            self.use_gene_embedding
            and not self.project_gene_embedding
            and self.init_gene_embed_dim != self.embed_dim
        ):
            # Same rule as the official config: the sum needs matching sizes.
            logger.warning(
                "init_gene_embed_dim (%d) != embed_dim (%d): setting project_gene_embedding=True",
                self.init_gene_embed_dim,
                self.embed_dim,
            )
            self.project_gene_embedding = True

    @property
    def mask_token_id(self) -> int:
        return self.n_expressions_bins

    @property
    def vocab_size(self) -> int:
        return self.n_expressions_bins + self.n_special_tokens

    def to_dict(self) -> dict[str, Any]:
        """Official fields first (their names), then this project's extras."""
        data = dataclasses.asdict(self)
        ordered = {k: data.pop(k) for k in OFFICIAL_CONFIG_FIELDS}
        return {**ordered, **data, "format": CONFIG_FORMAT}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BulkRNABertConfig:
        """Accepts official, HuggingFace-port and bulkfm config dicts; unknown keys are logged."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        unknown = sorted(set(data) - known - _IGNORED_CONFIG_FIELDS)
        if unknown:
            logger.warning("ignoring unknown BulkRNABert config fields: %s", unknown)
        return cls(**kwargs)
