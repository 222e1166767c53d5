"""A tiny scFoundation release (``models.ckpt`` and the gene index) written to disk, for
the adapter's tests and the bench CLI test.

Not a test module: a helper both import, so no test module imports another.
"""

from __future__ import annotations

import pandas as pd
import torch

from bulkfm.adapters.scfoundation import GENE_INDEX_FILE

# fmt: off
SYMBOLS = [
    "TP53", "EGFR", "KRAS", "BRCA1", "BRCA2", "MYC", "PTEN", "APC", "VHL", "GATA3", "CDH1",
    "RB1", "NF1", "SMAD4", "ATRX", "IDH1", "BRAF", "NRAS", "PIK3CA", "CTNNB1", "FBXW7",
    "ARID1A", "CDKN2A", "ACTB", "GAPDH", "ALB", "INS", "GCG", "CD3E", "CD4", "CD8A", "MS4A1",
    "PTPRC", "EPCAM", "KRT8", "KRT18", "VIM", "COL1A1", "MKI67", "ESR1",
]
# fmt: on
G = len(SYMBOLS)
SEQ_LEN = G + 2
D, DEPTH, HEADS, BINS = 16, 2, 2, 10
PAD_ID, MASK_ID = 103, 102


# --------------------------------------------------------------------------- release writer


def released_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the released key names (with the Lightning ``model.`` prefix)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    s = {
        "token_emb.mlp.weight": r(BINS, 1, scale=1.0),
        "token_emb.mlp.bias": r(BINS),
        "token_emb.mlp2.weight": r(BINS, BINS),
        "token_emb.mlp2.bias": r(BINS),
        "token_emb.emb.weight": r(BINS, D, scale=1.0),
        "token_emb.emb_mask.weight": r(1, D),
        "token_emb.emb_pad.weight": r(1, D),
        "pos_emb.weight": r(SEQ_LEN + 1, D, scale=1.0),
        "encoder.norm.weight": 1 + r(D, scale=0.1),
        "encoder.norm.bias": r(D, scale=0.1),
        # decoder side of the MAE: present in the release, unused for cell embeddings
        "decoder.layers.0.0.fn.to_q.weight": r(8, 8),
        "decoder.norm.weight": r(8),
        "decoder_embed.weight": r(8, D),
        "decoder_embed.bias": r(8),
        "norm.weight": r(8),
        "norm.bias": r(8),
        "to_final.weight": r(1, 8),
        "to_final.bias": r(1),
    }
    for i in range(DEPTH):
        p = f"encoder.transformer_encoder.{i}."
        s |= {
            p + "self_attn.in_proj_weight": r(3 * D, D),
            p + "self_attn.in_proj_bias": r(3 * D, scale=0.1),
            p + "self_attn.out_proj.weight": r(D, D),
            p + "self_attn.out_proj.bias": r(D, scale=0.1),
            p + "linear1.weight": r(4 * D, D),
            p + "linear1.bias": r(4 * D, scale=0.1),
            p + "linear2.weight": r(D, 4 * D),
            p + "linear2.bias": r(D, scale=0.1),
            p + "norm1.weight": 1 + r(D, scale=0.1),
            p + "norm1.bias": r(D, scale=0.1),
            p + "norm2.weight": 1 + r(D, scale=0.1),
            p + "norm2.bias": r(D, scale=0.1),
        }
    return s


def released_config() -> dict:
    """Nested like the released entry (``model_config[model]`` + ``dataset_config['rnaseq']``)."""
    return {
        "model": "mae_autobin",
        "model_config": {
            "mae_autobin": {
                "encoder": {"hidden_dim": D, "depth": DEPTH, "heads": HEADS, "dim_head": 8,
                            "module_type": "transformer"},
                "decoder": {"hidden_dim": 8, "depth": 1, "heads": 2, "dim_head": 4,
                            "module_type": "performer"},
                "n_class": 104, "pad_token_id": PAD_ID, "mask_token_id": MASK_ID,
                "bin_num": BINS, "bin_alpha": 1.0,
            }
        },
        "dataset_config": {"rnaseq": {"seq_len": SEQ_LEN}},
    }  # fmt: skip


def write_gene_index(folder, symbols=SYMBOLS) -> None:
    pd.DataFrame({"gene_name": list(symbols), "index": range(len(symbols))}).to_csv(
        folder / GENE_INDEX_FILE, sep="\t", index=False
    )


def write_release(folder, state=None, config=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = released_state() if state is None else state
    entry = {
        "config": released_config() if config is None else config,
        "state_dict": {"model." + k: v for k, v in state.items()},
    }
    torch.save({"cell": entry, "rde": entry}, folder / "models.ckpt")
    write_gene_index(folder)
