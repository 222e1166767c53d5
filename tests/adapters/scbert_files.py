"""A tiny scBERT release (``panglao_pretrain.pth`` and ``gene_list.txt``) written to disk,
for the adapter's tests and the bench CLI test.

Not a test module: a helper both import, so no test module imports another. The
checkpoint keys are spelled out by hand from scBERT's vendored performer_pytorch.
"""

from __future__ import annotations

import torch

SYMBOLS = [
    "TP53", "EGFR", "KRAS", "BRCA1", "BRCA2", "MYC", "PTEN", "GAPDH", "ACTB", "CDK4",
    "CDKN2A", "PIK3CA", "AKT1", "ERBB2", "ESR1", "PGR", "VIM", "CD44", "ALB", "APOE",
    "SOX2", "NANOG", "POU5F1", "KIT", "MET", "ALK", "RET", "BRAF", "NRAS", "IDH1",
]  # fmt: skip
DIM, DEPTH, HEADS, DIM_HEAD, NB_FEATURES, NUM_TOKENS, FF = 16, 2, 2, 8, 6, 7, 64


def released_state(n_genes: int = len(SYMBOLS), seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under scBERT's released key names (PerformerLM, g2v positions)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    inner = HEADS * DIM_HEAD
    gene2vec = torch.cat([r(n_genes, DIM, scale=1.0), torch.zeros(1, DIM)]).double()
    s = {
        "token_emb.weight": r(NUM_TOKENS, DIM, scale=1.0),
        "pos_emb.emb.weight": gene2vec,
        "performer.calls_since_last_redraw": torch.tensor(0),
        "norm.weight": 1 + r(DIM, scale=0.1),
        "norm.bias": r(DIM, scale=0.1),
        "to_out.weight": r(NUM_TOKENS, DIM),
        "to_out.bias": r(NUM_TOKENS),
    }
    for i in range(DEPTH):
        p = f"performer.net.layers.{i}."
        s.update(
            {
                p + "0.norm.weight": 1 + r(DIM, scale=0.1),
                p + "0.norm.bias": r(DIM, scale=0.1),
                p + "0.fn.fast_attention.projection_matrix": r(NB_FEATURES, DIM_HEAD, scale=1.0),
                p + "0.fn.to_q.weight": r(inner, DIM),
                p + "0.fn.to_k.weight": r(inner, DIM),
                p + "0.fn.to_v.weight": r(inner, DIM),
                p + "0.fn.to_out.weight": r(DIM, inner),
                p + "0.fn.to_out.bias": r(DIM),
                p + "1.norm.weight": 1 + r(DIM, scale=0.1),
                p + "1.norm.bias": r(DIM, scale=0.1),
                p + "1.fn.fn.w1.weight": r(FF, DIM),
                p + "1.fn.fn.w1.bias": r(FF),
                p + "1.fn.fn.w2.weight": r(DIM, FF),
                p + "1.fn.fn.w2.bias": r(DIM),
            }
        )
    return s


def write_release(folder, state=None, genes=SYMBOLS, *, fmt: str = "pth"):
    folder.mkdir(parents=True, exist_ok=True)
    state = released_state() if state is None else state
    if fmt == "pth":
        ckpt = {"epoch": 3, "model_state_dict": state, "losses": 0.25}
        torch.save(ckpt, folder / "panglao_pretrain.pth")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    if genes is not None:
        (folder / "gene_list.txt").write_text("\n".join(genes) + "\n")
    return folder
