"""The BulkFormer network, laid out so the released state dict loads key for key.

Only the adapter imports this module (it imports torch at the top). The layout follows
the authors' public code for the checkpoint ``Bulkformer_ckpt_epoch_29.pt`` (module
names ``gene_emb``, ``gene_emb_proj``, ``expr_emb``, ``ae_enc``, ``x_proj``,
``gb_formers``, ``layernorm``, ``head``); the graph convolution is torch_geometric's
``GCNConv`` and the attention stacks are ``performer_pytorch.Performer``, the packages
and versions (performer-pytorch 1.1.4) the release was trained with, so their
parameter names are the released ones. Architecture sizes are read off the tensor
shapes of the checkpoint, because the release ships no config file (the sizes live in
the authors' code).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bulkfm.adapters.base import require
from bulkfm.config import check_int
from bulkfm.errors import CheckpointError, ConfigError

__all__ = ["MASK_VALUE", "BulkFormerConfig", "BulkFormerNet", "ExpressionEmbedding"]

# The released code marks a gene the sample does not have with this input value.
MASK_VALUE = -10.0
EXTRA = "bulkformer"
MODEL = "BulkFormer"

# Keys whose shapes fix the architecture; without them the file is not a BulkFormer.
_SHAPE_KEYS = ("gene_emb", "x_proj.2.weight", "ae_enc.0.weight")
_PROJECTION = "net.layers.0.0.fn.fast_attention.projection_matrix"


def _count(state: Mapping[str, Any], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


@dataclass(frozen=True)
class BulkFormerConfig:
    """Sizes of a BulkFormer; the released 147M-parameter model is the defaults.

    ``bins`` > 0 enables the authors' optional "gene bin" Performers (sorted by a learnt
    score, attention within each bin); the release uses ``bins=0``.
    """

    dim: int = 640
    gene_length: int = 20010
    gene_feature_dim: int = 1280
    gb_repeat: int = 3
    p_repeat: int = 4
    bins: int = 0
    full_head: int = 8
    bin_head: int = 12
    nb_features: int | None = None
    bin_nb_features: int | None = None

    def __post_init__(self) -> None:
        for name in ("dim", "gene_length", "gene_feature_dim", "gb_repeat", "p_repeat"):
            check_int(f"BulkFormer config: {name}", getattr(self, name), 1)
        check_int("BulkFormer config: bins", self.bins, 0)
        if self.dim % 2:
            raise ConfigError(
                f"BulkFormer config: dim must be even (sin/cos halves), got {self.dim}"
            )
        for name in ("full_head",) + (("bin_head",) if self.bins else ()):
            heads = getattr(self, name)
            if heads < 1 or self.dim % heads:
                raise ConfigError(f"BulkFormer config: {name}={heads} must divide dim={self.dim}")

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> BulkFormerConfig:
        """Sizes implied by a released state dict (no config file ships with the weights)."""
        absent = [k for k in _SHAPE_KEYS if k not in state]
        first_f = f"gb_formers.0.f.0.{_PROJECTION}"
        if first_f not in state:
            absent.append(first_f)
        if absent:
            raise CheckpointError(
                f"{MODEL}: the checkpoint lacks {absent}, which a BulkFormer state dict has "
                f"(it has e.g. {sorted(state)[:8]}); pass the released Bulkformer_ckpt_epoch_29.pt"
            )
        dim = int(state["x_proj.2.weight"].shape[0])
        bins = _count(state, r"gb_formers\.0\.b\.(\d+)\.")
        proj = state[first_f]
        kwargs: dict[str, Any] = {
            "dim": dim,
            "gene_length": int(state["ae_enc.0.weight"].shape[1]),
            "gene_feature_dim": int(state["gene_emb"].shape[1]),
            "gb_repeat": _count(state, r"gb_formers\.(\d+)\."),
            "p_repeat": _count(state, r"gb_formers\.0\.f\.(\d+)\."),
            "bins": bins,
            "full_head": max(1, dim // int(proj.shape[1])),
            "nb_features": int(proj.shape[0]),
        }
        bin_key = f"gb_formers.0.b.0.{_PROJECTION}"
        if bins and bin_key in state:
            kwargs["bin_head"] = max(1, dim // int(state[bin_key].shape[1]))
            kwargs["bin_nb_features"] = int(state[bin_key].shape[0])
        return cls(**kwargs)


class ExpressionEmbedding(nn.Module):
    """Continuous value embedding: sin/cos of log-expression times fixed frequencies.

    Masked genes (input exactly ``MASK_VALUE``) get a zero vector. ``inv_freq`` is a
    frozen Parameter in the release, hence a state-dict key.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        freq = 1.0 / (100 ** (torch.arange(0, dim, 2).float() / dim))
        self.inv_freq = nn.Parameter(freq, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phase = x.unsqueeze(-1) * self.inv_freq
        out = torch.cat((phase.sin(), phase.cos()), dim=-1)
        return out.masked_fill((x == MASK_VALUE).unsqueeze(-1), 0.0)


def _performer(dim: int, heads: int, nb_features: int | None) -> nn.Module:
    performer = require("performer_pytorch", extra=EXTRA, model=MODEL)
    # Dropouts are the released ones; they are inactive in eval mode.
    return performer.Performer(
        dim=dim,
        depth=1,
        heads=heads,
        dim_head=dim // heads,
        nb_features=nb_features,
        attn_dropout=0.2,
        ff_dropout=0.2,
    )


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class GraphPerformerBlock(nn.Module):
    """LayerNorm, residual graph convolution over the gene graph, then Performers."""

    def __init__(self, config: BulkFormerConfig) -> None:
        super().__init__()
        pyg = require("torch_geometric.nn.conv", extra=EXTRA, model=MODEL)
        dim = config.dim
        self.g = pyg.GCNConv(dim, dim, cached=True, add_self_loops=False)
        self.which_b = nn.Sequential(nn.Linear(dim, 1))
        self.b = nn.ModuleList(
            [_performer(dim, config.bin_head, config.bin_nb_features) for _ in range(config.bins)]
        )
        self.f = nn.Sequential(
            *[_performer(dim, config.full_head, config.nb_features) for _ in range(config.p_repeat)]
        )
        self.layernorm = nn.LayerNorm(dim)

    def _bins(self, x: torch.Tensor) -> torch.Tensor:
        """Attention within bins of genes ranked by a learnt score, then back to gene order."""
        g, e = x.shape[1], x.shape[2]
        order = torch.sort(self.which_b(x).squeeze(-1), dim=1, descending=True)[1]
        order = order.unsqueeze(-1).expand(-1, -1, e)
        size = (g - 1) // len(self.b) + 1
        chunks = torch.split(x.gather(1, order), size, dim=1)
        mixed = torch.cat([layer(c) for c, layer in zip(chunks, self.b, strict=False)], dim=1)
        return torch.empty_like(mixed).scatter_(1, order, mixed)

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor
    ) -> torch.Tensor:
        x = self.layernorm(x)
        x = x + self.g(x, edge_index, edge_weight)
        if len(self.b):
            x = self._bins(x)
        return self.f(x)


class BulkFormerNet(nn.Module):
    """BulkFormer encoder; ``forward`` returns per-gene embeddings after the final LayerNorm.

    That output is what the authors' feature extraction pools (``model(X, [2])`` with
    three blocks returns the final-LayerNorm states as ``emb[2]``). ``head`` (the
    expression-prediction MLP) is kept only so the released keys load strictly.

    ``edge_index`` / ``edge_weight`` are the release's ``G_gtex.pt`` / ``G_gtex_weight.pt``.
    The authors wrap them as ``SparseTensor(row=G[1], col=G[0], value=w).t()``: a gene
    ``G[0][k]`` receives from ``G[1][k]``. In torch_geometric's edge-list convention
    (messages flow from row 0 to row 1) that is the flipped list, stored here, which
    needs no torch_sparse and yields the same symmetric normalisation.
    """

    def __init__(
        self, config: BulkFormerConfig, edge_index: torch.Tensor, edge_weight: torch.Tensor
    ) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.gene_emb = nn.Parameter(torch.zeros(config.gene_length, config.gene_feature_dim))
        self.gene_emb_proj = _mlp(config.gene_feature_dim, 4 * dim, dim)
        self.expr_emb = ExpressionEmbedding(dim)
        self.x_proj = _mlp(dim, 4 * dim, dim)
        self.gb_formers = nn.ModuleList(
            [GraphPerformerBlock(config) for _ in range(config.gb_repeat)]
        )
        self.layernorm = nn.LayerNorm(dim)
        self.ae_enc = _mlp(config.gene_length, 4 * dim, dim)
        self.head = nn.Sequential(*_mlp(dim, 4 * dim, 1), nn.ReLU())
        self.register_buffer("edge_index", edge_index.flip(0).contiguous(), persistent=False)
        self.register_buffer("edge_weight", edge_weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [batch, genes] log1p(TPM) with ``MASK_VALUE`` for absent genes."""
        if x.ndim != 2 or x.shape[1] != self.config.gene_length:
            raise ConfigError(
                f"{MODEL}: input must be [samples, {self.config.gene_length}], got {tuple(x.shape)}"
            )
        h = self.expr_emb(x) + self.gene_emb_proj(self.gene_emb) + self.ae_enc(x).unsqueeze(1)
        h = self.x_proj(h)
        for block in self.gb_formers:
            h = block(h, self.edge_index, self.edge_weight)
        return self.layernorm(h)
