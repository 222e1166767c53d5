"""BulkRNABert model, checkpoints and gene-embedding initialisation (imports torch)."""

from bulkfm.models.bulkrnabert import (
    BulkRNABert,
    BulkRNABertConfig,
    BulkRNABertOutput,
    load_pretrained,
)
from bulkfm.models.convert import convert_haiku_to_safetensors, model_from_haiku
from bulkfm.models.gene_init import init_gene_embeddings
from bulkfm.models.heads import MLPHead, classification_head, survival_head
from bulkfm.models.ia3 import (
    apply_ia3,
    count_parameters,
    get_adapter_params,
    ia3_state_dict,
    load_ia3,
    merge_ia3,
    save_ia3,
    set_trainable_params,
)

__all__ = [
    "BulkRNABert",
    "BulkRNABertConfig",
    "BulkRNABertOutput",
    "MLPHead",
    "apply_ia3",
    "classification_head",
    "convert_haiku_to_safetensors",
    "count_parameters",
    "get_adapter_params",
    "ia3_state_dict",
    "init_gene_embeddings",
    "load_ia3",
    "load_pretrained",
    "merge_ia3",
    "model_from_haiku",
    "save_ia3",
    "set_trainable_params",
    "survival_head",
]
