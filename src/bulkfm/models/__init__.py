"""BulkRNABert model, checkpoints and gene-embedding initialisation.

Names load on first use (PEP 562), so importing a torch-free submodule such as
:mod:`bulkfm.models.config` does not pull torch in through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bulkfm.models.bulkrnabert import (
        BulkRNABert,
        BulkRNABertOutput,
        load_pretrained,
    )
    from bulkfm.models.config import BulkRNABertConfig
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

_HOMES = {
    "BulkRNABert": "bulkrnabert",
    "BulkRNABertConfig": "config",
    "BulkRNABertOutput": "bulkrnabert",
    "load_pretrained": "bulkrnabert",
    "convert_haiku_to_safetensors": "convert",
    "model_from_haiku": "convert",
    "init_gene_embeddings": "gene_init",
    "MLPHead": "heads",
    "classification_head": "heads",
    "survival_head": "heads",
    "apply_ia3": "ia3",
    "count_parameters": "ia3",
    "get_adapter_params": "ia3",
    "ia3_state_dict": "ia3",
    "load_ia3": "ia3",
    "merge_ia3": "ia3",
    "save_ia3": "ia3",
    "set_trainable_params": "ia3",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'bulkfm.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bulkfm.models.{home}"), name)


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
