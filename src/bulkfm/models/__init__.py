"""BulkRNABert model, checkpoints and gene-embedding initialisation (imports torch)."""

from bulkfm.models.bulkrnabert import (
    BulkRNABert,
    BulkRNABertConfig,
    BulkRNABertOutput,
    load_pretrained,
)
from bulkfm.models.convert import convert_haiku_to_safetensors, model_from_haiku
from bulkfm.models.gene_init import init_gene_embeddings

__all__ = [
    "BulkRNABert",
    "BulkRNABertConfig",
    "BulkRNABertOutput",
    "convert_haiku_to_safetensors",
    "init_gene_embeddings",
    "load_pretrained",
    "model_from_haiku",
]
