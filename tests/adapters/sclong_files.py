"""A tiny scLong release (gene file, hyper-parameter pickle, ``.pth``) written to disk, for
the adapter's tests and the bench CLI test.

Not a test module: a helper both import, so no test module imports another. The
state-dict keys are enumerated from the released module tree, not from the adapter.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import torch

from bulkfm.adapters.sclong import GENE_FILE, HYPER_FILE, WEIGHTS_FILE

GENES = [f"ENSG{i:011d}" for i in range(1, 13)]
PARAMS = {
    "max_seq_len": len(GENES) + 1,
    "top_seq_len": 4,
    "base_dim": 8,
    "mini_enc_depth": 1,
    "mini_enc_heads": 2,
    "mini_enc_dim_head": 4,
    "large_dim": 12,
    "large_enc_depth": 2,
    "large_enc_heads": 2,
    "large_enc_dim_head": 4,
    "dec_depth": 1,
    "dec_heads": 2,
    "dec_dim_head": 4,
    "mask_token_thres": -1,
    "g2v_position_emb": True,
    "go_num_layers": 1,
    "device": "cuda",
    "go_use_gene2vec": True,
    "gene2vec_file": "selected_gene2vec_27k.npy",
}
ENCODERS = {
    "mini_encoder": ("base_dim", "mini_enc_depth", "mini_enc_heads", "mini_enc_dim_head"),
    "large_encoder": ("large_dim", "large_enc_depth", "large_enc_heads", "large_enc_dim_head"),
    "decoder": ("base_dim", "dec_depth", "dec_heads", "dec_dim_head"),
}


# --------------------------------------------------------------------------- release writer


def released_state(p: dict, seed: int = 0) -> dict:
    """Random tensors under the released DualEncoderSCFM key names."""
    g = torch.Generator().manual_seed(seed)
    s: dict = {}

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def lin(name, i, o, bias=True):
        s[f"{name}.weight"] = randn(o, i, scale=i**-0.5)
        if bias:
            s[f"{name}.bias"] = randn(o, scale=0.1)

    def norm(name, dim):
        s[f"{name}.weight"] = 1 + randn(dim, scale=0.1)
        s[f"{name}.bias"] = randn(dim, scale=0.1)

    d, n = p["base_dim"], p["max_seq_len"]
    lin("token_emb.fc1", 1, 50)
    lin("token_emb.fc2", 50, d)
    norm("token_norm", d)
    s["mask_emb.weight"] = randn(1, d)
    s["pos_emb.emb.weight"] = randn(n, d).double()  # numpy's float64 in the release
    s["go_conv.emb.weight"] = randn(n, d)
    lin("go_conv.sim_layers.0.lin", d, d)
    for prefix, (dim_key, depth_key, heads_key, head_key) in ENCODERS.items():
        dim, heads, dh = p[dim_key], p[heads_key], p[head_key]
        for i in range(p[depth_key]):
            a, f = f"{prefix}.net.layers.{i}.0", f"{prefix}.net.layers.{i}.1"
            norm(f"{a}.norm", dim)
            for proj in ("to_q", "to_k", "to_v"):
                lin(f"{a}.fn.{proj}", dim, heads * dh, bias=False)
            lin(f"{a}.fn.to_out", heads * dh, dim)
            s[f"{a}.fn.fast_attention.projection_matrix"] = randn(int(dh * math.log(dh)), dh)
            norm(f"{f}.norm", dim)
            lin(f"{f}.fn.fn.w1", dim, dim * 4)
            lin(f"{f}.fn.fn.w2", dim * 4, dim)
        s[f"{prefix}.calls_since_last_redraw"] = torch.tensor(0)
        if prefix == "mini_encoder":
            lin("base_to_large", d, p["large_dim"])
            norm("large_in_norm", p["large_dim"])
        if prefix == "large_encoder":
            lin("large_to_base", p["large_dim"], d)
            norm("large_to_base_out_norm", d)
    norm("decode_norm", d)
    lin("exp_to_out", d, 1)
    return s


def go_graph(n_genes: int) -> tuple:
    """Edges as the release builds them: a self loop per GO gene plus similar pairs."""
    rng = np.random.default_rng(1)
    edges = [(i, i, 1.0) for i in range(n_genes - 1)]  # the last gene has no GO terms
    for _ in range(20):
        a, b = rng.integers(0, n_genes - 1, size=2)
        if a != b:
            edges.append((int(a), int(b), float(rng.uniform(0.1, 1.0))))
    g_go = torch.tensor([(a, b) for a, b, _ in edges], dtype=torch.long).T
    return g_go, torch.Tensor([w for _, _, w in edges])


def write_release(folder, params=None, state=None, genes=GENES, weight_scale=1.0):
    params = dict(PARAMS if params is None else params)
    g_go, g_w = go_graph(len(GENES))
    g_w = g_w * weight_scale
    folder.mkdir(parents=True, exist_ok=True)
    (folder / GENE_FILE).write_text("\n".join(genes) + "\n")
    with (folder / HYPER_FILE).open("wb") as fh:
        pickle.dump({**params, "G_go": g_go, "G_go_weight": g_w}, fh, pickle.HIGHEST_PROTOCOL)
    state = released_state(params) if state is None else state
    ckpt = {
        "epoch": 3,
        "model_state_dict": state,
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 5e-5}]},
        "losses": [0.9, 0.7],
    }
    torch.save(ckpt, folder / WEIGHTS_FILE)
    return folder
