"""A tiny Geneformer release written to disk, for the adapter's tests and the bench CLI's.

Not a test module: a helper both import, so no test module imports another.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path


def write_geneformer_release(
    folder: Path,
    tokens: dict[str, int],
    medians: dict[str, float],
    *,
    max_positions: int = 8,
    dict_format: str = "json",
    seed: int = 0,
    vocab_size: int | None = None,
    mapping: dict[str, str] | None = None,
) -> Path:
    """A tiny BertForMaskedLM in the released layout plus the two dictionaries.

    ``mapping`` also writes the Ensembl mapping dictionary as the release ships it: a
    pickled ``dict`` of old id -> token-dictionary id, named ``ensembl_mapping_dict_*.pkl``.
    """
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    cfg = transformers.BertConfig(
        vocab_size=vocab_size or max(tokens.values()) + 1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=max_positions,
        hidden_act="relu",
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    transformers.BertForMaskedLM(cfg).save_pretrained(folder)
    for stem, data in (("token_dictionary", tokens), ("gene_median_dictionary", medians)):
        if dict_format == "json":
            (folder / f"{stem}.json").write_text(json.dumps(data))
        else:
            (folder / f"{stem}.pkl").write_bytes(pickle.dumps(data))
    if mapping is not None:
        (folder / "ensembl_mapping_dict_gc104M.pkl").write_bytes(pickle.dumps(mapping))
    return folder
