"""A tiny BulkFormer of the current (five-size) release written to disk, for the
adapter's tests and the bench CLI test.

Not a test module: a helper the BulkFormer test modules import. Key names are spelled
out here from the authors' module layout (``utils/BulkFormer.py`` of
github.com/KangBoming/BulkFormer, December 2025 onwards) and performer_pytorch's own
key names, not taken from the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def add_performer_state(
    s: dict[str, Any], prefix: str, own: dict[str, Any], rand: Callable[..., Any]
) -> None:
    """A saved Performer's keys under ``prefix``: random weights (norm weights near 1),
    its own projection matrices, each tensor shared by ``net.*`` and
    ``proj_updater.instance.*`` as ``torch.save`` of the module stores them."""
    for key, value in own.items():
        if key.startswith("net."):
            new = value.clone() if key.endswith("projection_matrix") else rand(*value.shape)
            if key.endswith("norm.weight"):
                new = 1 + new * 0.1
            s[prefix + key] = new
            s[prefix + "proj_updater.instance." + key[len("net.") :]] = new
        elif key == "proj_updater.calls_since_last_redraw":
            s[prefix + key] = value.clone()


def performer_keys(dim: int, heads: int) -> dict[str, Any]:
    """A fresh ``performer_pytorch.Performer`` state dict, as the release builds one."""
    import performer_pytorch

    net = performer_pytorch.Performer(dim=dim, depth=1, heads=heads, dim_head=dim // heads)
    return dict(net.state_dict())


def family_state(
    n_genes: int,
    *,
    dim: int = 16,
    heads: int = 2,
    p_repeat: int = 2,
    gb_repeat: int = 1,
    seed: int = 1,
    device: str | None = None,
) -> dict[str, Any]:
    """Random tensors under the current release's key names, saved through DataParallel.

    ``device="meta"`` gives shapes only (for the full-size configurations).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)  # the Performer projection matrices
    s: dict[str, torch.Tensor] = {}

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=gen) * scale

    def linear(name: str, d_in: int, d_out: int) -> None:
        s[f"{name}.weight"] = rand(d_out, d_in, scale=1 / math.sqrt(d_in))
        s[f"{name}.bias"] = rand(d_out, scale=0.1)

    def norm(name: str, width: int) -> None:
        s[f"{name}.weight"] = 1 + rand(width, scale=0.1)
        s[f"{name}.bias"] = rand(width, scale=0.1)

    own = performer_keys(dim, heads) if device != "meta" else _meta_performer(dim, heads)

    def performer(prefix: str) -> None:
        add_performer_state(s, prefix, own, rand)

    s["gene_emb_onehot_layer.weight"] = rand(n_genes, dim, scale=1.0)
    linear("gene_emb_proj.0", dim, 4 * dim)
    linear("gene_emb_proj.2", 4 * dim, dim)
    if device == "meta":
        s["expr_emb.inv_freq"] = torch.empty(dim // 2, device="meta")
    else:
        s["expr_emb.inv_freq"] = 1.0 / (100 ** (torch.arange(0, dim, 2).float() / dim))
    linear("x_proj.0", dim, 4 * dim)
    linear("x_proj.2", 4 * dim, dim)
    for i in range(gb_repeat):
        p = f"gb_formers.{i}."
        s[p + "g.lin.weight"] = rand(dim, dim, scale=1 / math.sqrt(dim))
        s[p + "g.bias"] = rand(dim, scale=0.1)
        for j in range(p_repeat):
            performer(f"{p}f.{j}.")
        norm(p + "layernorm", dim)
    norm("layernorm", dim)
    linear("global_expr_proj.0", n_genes, 4 * dim)
    linear("global_expr_proj.2", 4 * dim, dim)
    norm("head.0", dim + 3)
    linear("head.1", dim + 3, dim)
    linear("head.3", dim, 1)
    return {"module." + k: v for k, v in s.items()}


def _meta_performer(dim: int, heads: int) -> dict[str, Any]:
    """Shapes of a Performer's keys without building one (building draws a QR on CPU)."""
    import torch

    dim_head = dim // heads
    nb = int(dim_head * math.log(dim_head))  # performer_pytorch's default nb_features
    shapes: dict[str, tuple[int, ...]] = {
        "layers.0.0.norm.weight": (dim,),
        "layers.0.0.norm.bias": (dim,),
        "layers.0.0.fn.fast_attention.projection_matrix": (nb, dim_head),
        "layers.0.1.norm.weight": (dim,),
        "layers.0.1.norm.bias": (dim,),
        "layers.0.1.fn.fn.w1.weight": (4 * dim, dim),
        "layers.0.1.fn.fn.w1.bias": (4 * dim,),
        "layers.0.1.fn.fn.w2.weight": (dim, 4 * dim),
        "layers.0.1.fn.fn.w2.bias": (dim,),
    }
    for name in ("to_q", "to_k", "to_v", "to_out"):
        shapes[f"layers.0.0.fn.{name}.weight"] = (dim, dim)
        shapes[f"layers.0.0.fn.{name}.bias"] = (dim,)
    out = {f"net.{k}": torch.empty(v, device="meta") for k, v in shapes.items()}
    out["proj_updater.calls_since_last_redraw"] = torch.empty((), device="meta")
    return out


def family_graph(n_genes: int, *, n_edges: int = 80, seed: int = 3) -> tuple[Any, Any]:
    """A directed, weighted gene graph (``G_tcga.pt``, ``G_tcga_weight.pt``) with repeated
    edges and a gene without edges (degree 0)."""
    import torch

    rng = np.random.default_rng(seed)
    src = rng.integers(0, n_genes - 1, n_edges)
    dst = rng.integers(0, n_genes - 1, n_edges)
    src[:3], dst[:3] = 0, 1  # one edge listed three times
    edges = torch.as_tensor(np.stack([src, dst]), dtype=torch.long)
    return edges, torch.as_tensor(rng.uniform(0.1, 1.0, n_edges), dtype=torch.float32)


def write_family_release(
    folder: Path,
    genes: list[str],
    *,
    state: dict[str, Any] | None = None,
    name: str = "bulkformer_147M.pt",
    layout: str = "flat",
    fmt: str = "pt",
    gene_list: Any = None,
    **sizes: int,
) -> Path:
    """The current release's files under their released names (``repo`` = model/, data/).

    ``gene_list`` is what ``interested_gene_list.pt`` holds (default: five indices).
    Returns the checkpoint's path.
    """
    import torch

    model_dir = folder / "model" if layout == "repo" else folder
    data_dir = folder / "data" if layout == "repo" else folder
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    state = family_state(len(genes), **sizes) if state is None else state
    edges, weights = family_graph(len(genes))
    gene_list = [1, 4, 7, 20, len(genes) - 1] if gene_list is None else gene_list
    if fmt == "pt":
        ckpt = model_dir / name
        torch.save(state, ckpt)
        torch.save(edges, data_dir / "G_tcga.pt")
        torch.save(weights, data_dir / "G_tcga_weight.pt")
        torch.save(gene_list, data_dir / "interested_gene_list.pt")
    else:
        from safetensors.torch import save_file

        # safetensors refuses shared tensors: keep one name of each Performer pair.
        single = {k: v.contiguous() for k, v in state.items() if ".proj_updater.instance." not in k}
        ckpt = model_dir / (Path(name).stem + ".safetensors")
        save_file(single, str(ckpt))
        save_file({"edge_index": edges}, str(data_dir / "G_tcga.safetensors"))
        save_file({"weight": weights}, str(data_dir / "G_tcga_weight.safetensors"))
        save_file(
            {"idx": torch.as_tensor(gene_list)}, str(data_dir / "interested_gene_list.safetensors")
        )
    torch.save(torch.randn(len(genes), 8), data_dir / "esm2_feature_concat.pt")
    pd.DataFrame(
        {
            "gene_symbol": [f"G{i}" for i in range(len(genes))],
            "ensg_id": genes,
            "gene_type": "protein_coding",
        }
    ).to_csv(data_dir / "bulkformer_gene_info.csv", index=False)
    return ckpt
