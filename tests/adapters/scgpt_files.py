"""A tiny scGPT release (``args.json``, ``vocab.json``, ``best_model.pt``) written to disk,
for the adapter's tests and the bench CLI test.

Not a test module: a helper both import, so no test module imports another.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

GENES = {
    "TP53": "ENSG00000141510",
    "KRAS": "ENSG00000133703",
    "EGFR": "ENSG00000146648",
    "MYC": "ENSG00000136997",
    "GAPDH": "ENSG00000111640",
    "ACTB": "ENSG00000075624",
    "PTEN": "ENSG00000171862",
    "BRCA1": "ENSG00000012048",
}
NOT_IN_VOCAB = {"ALB": "ENSG00000163631", "CD4": "ENSG00000010610"}
D, HEADS, D_HID, LAYERS, PAD_VALUE = 16, 2, 32, 2, -2
# released order: specials are ordinary entries; one vocabulary symbol the data lacks
VOCAB = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **{g: i + 3 for i, g in enumerate(GENES)}}
VOCAB["NOTAGENE1"] = len(VOCAB)


# --------------------------------------------------------------------------- release writer

# args.json of the released scGPT_human folder, at the tiny sizes above
RELEASE_ARGS = {
    "embsize": D,
    "nheads": HEADS,
    "d_hid": D_HID,
    "nlayers": LAYERS,
    "n_layers_cls": 3,
    "dropout": 0.2,
    "pad_token": "<pad>",
    "pad_value": PAD_VALUE,
    "mask_value": -1,
    "input_emb_style": "continuous",
    "n_bins": 51,
    "max_seq_len": 1200,
    "fast_transformer": True,
}


def release_state(ntoken: int, nlayers: int = LAYERS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of a released best_model.pt."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape: int, base: float = 0.0) -> torch.Tensor:
        return base + 0.4 * torch.randn(*shape, generator=g)

    s = {
        "encoder.embedding.weight": t(ntoken, D),
        "encoder.enc_norm.weight": t(D, base=1.0),
        "encoder.enc_norm.bias": t(D),
        "value_encoder.linear1.weight": t(D, 1),
        "value_encoder.linear1.bias": t(D),
        "value_encoder.linear2.weight": t(D, D),
        "value_encoder.linear2.bias": t(D),
        "value_encoder.norm.weight": t(D, base=1.0),
        "value_encoder.norm.bias": t(D),
    }
    for i in range(nlayers):
        p = f"transformer_encoder.layers.{i}."
        s |= {
            p + "self_attn.Wqkv.weight": t(3 * D, D),
            p + "self_attn.Wqkv.bias": t(3 * D),
            p + "self_attn.out_proj.weight": t(D, D),
            p + "self_attn.out_proj.bias": t(D),
            p + "linear1.weight": t(D_HID, D),
            p + "linear1.bias": t(D_HID),
            p + "linear2.weight": t(D, D_HID),
            p + "linear2.bias": t(D),
            p + "norm1.weight": t(D, base=1.0),
            p + "norm1.bias": t(D),
            p + "norm2.weight": t(D, base=1.0),
            p + "norm2.bias": t(D),
        }
    # pre-training heads the embedding never uses
    s |= {
        "decoder.fc.0.weight": t(D, D),
        "cls_decoder.out_layer.weight": t(1, D),
        "mvc_decoder.gene2query.weight": t(D, D),
    }
    return s


def write_release(
    folder: Path,
    *,
    state: dict[str, torch.Tensor] | None = None,
    vocab: dict[str, int] | None = None,
    args: dict | None = None,
    fmt: str = "pt",
) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = VOCAB if vocab is None else vocab
    state = release_state(len(vocab)) if state is None else state
    (folder / "args.json").write_text(json.dumps(RELEASE_ARGS if args is None else args))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    if fmt == "pt":
        torch.save(state, folder / "best_model.pt")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    return state
