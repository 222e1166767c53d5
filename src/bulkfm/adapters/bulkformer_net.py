"""The BulkFormer networks, laid out so both released state dicts load key for key.

Only the adapter imports this module (it imports torch at the top). Two generations
of weights exist, and :func:`detect_generation` tells them apart by their keys:

``family`` (current; December 2025 onwards)
    The five sizes BulkFormer-37M / 50M / 93M / 127M / 147M (``bulkformer_147M.pt``
    etc.). A learnt one-hot gene embedding (``gene_emb_onehot_layer``, [genes, dim])
    replaces the ESM2 features, the whole-profile MLP is called ``global_expr_proj``,
    the blocks have no gene-bin router, and the head reads the final gene states
    plus three per-sample summary features (missing rate, mean observed value,
    non-zero fraction; :func:`summary_features`). The authors' extractor returns
    exactly that [dim + 3] vector per gene.
``epoch29`` (superseded; ``Bulkformer_ckpt_epoch_29.pt``)
    1,280-d ESM2 gene features stored in the checkpoint (``gene_emb``), the
    whole-profile MLP ``ae_enc``, a gene-bin router (``which_b``) in every block,
    and a head without summary features.

Module names follow the authors' code (``gene_emb_proj``, ``expr_emb``, ``x_proj``,
``gb_formers``, ``layernorm``, ``head``). The graph convolution is torch_geometric's
``GCNConv`` and the attention stacks are ``performer_pytorch.Performer``, the packages
(performer-pytorch 1.1.4) the releases were trained with, so their parameter names
are the released ones. Sizes are read off the checkpoint's tensor shapes: the
repository's ``model/config.py`` holds one active size with the other four commented
out, so it does not describe a given checkpoint, while the shapes always do.
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

__all__ = [
    "EPOCH29",
    "FAMILY",
    "FAMILY_SIZES",
    "MASK_VALUE",
    "BulkFormerConfig",
    "BulkFormerNet",
    "ExpressionEmbedding",
    "detect_generation",
    "summary_features",
]

# The released code marks a gene the sample does not have with this input value.
MASK_VALUE = -10.0
EXTRA = "bulkformer"
MODEL = "BulkFormer"

FAMILY = "family"
EPOCH29 = "epoch29"
# The current release's five sizes, from the repository's model/config.py and README:
# name -> (dim, gb_repeat, p_repeat, full_head). All have 20,010 genes and no gene bins.
FAMILY_SIZES: dict[str, tuple[int, int, int, int]] = {
    "BulkFormer-37M": (128, 1, 1, 8),
    "BulkFormer-50M": (256, 1, 2, 8),
    "BulkFormer-93M": (512, 1, 6, 8),
    "BulkFormer-127M": (640, 1, 8, 8),
    "BulkFormer-147M": (640, 1, 12, 8),
}
# Keys that identify a generation, and the keys whose shapes fix its sizes.
_MARKERS = {
    FAMILY: ("gene_emb_onehot_layer.weight", "global_expr_proj.0.weight"),
    EPOCH29: ("gene_emb", "ae_enc.0.weight"),
}
_PROJECTION = "net.layers.0.0.fn.fast_attention.projection_matrix"
_FIRST_PERFORMER = f"gb_formers.0.f.0.{_PROJECTION}"


def _count(state: Mapping[str, Any], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def detect_generation(state: Mapping[str, Any]) -> str:
    """``"family"`` or ``"epoch29"`` from a (prefix-free) state dict's keys.

    The generation with more of its marker keys present wins, so a checkpoint that
    lost one key is still reported against the right layout by
    :meth:`BulkFormerConfig.from_state_dict`.
    """
    hits = {gen: sum(k in state for k in keys) for gen, keys in _MARKERS.items()}
    if hits[FAMILY] and hits[EPOCH29]:
        raise CheckpointError(
            f"{MODEL}: the checkpoint mixes the current release's keys "
            f"({list(_MARKERS[FAMILY])}) with the superseded epoch-29 ones "
            f"({list(_MARKERS[EPOCH29])}); pass one released file unchanged"
        )
    if not any(hits.values()):
        raise CheckpointError(
            f"{MODEL}: the checkpoint is not a BulkFormer state dict: the current release "
            f"(bulkformer_37M.pt ... bulkformer_147M.pt) has {list(_MARKERS[FAMILY])}, the "
            f"superseded Bulkformer_ckpt_epoch_29.pt has {list(_MARKERS[EPOCH29])}, and this "
            f"file has e.g. {sorted(state)[:8]}"
        )
    return FAMILY if hits[FAMILY] else EPOCH29


@dataclass(frozen=True)
class BulkFormerConfig:
    """Sizes of a BulkFormer; the defaults are the current release's BulkFormer-147M.

    ``gene_feature_dim`` is the width of the ESM2 gene features of the epoch-29
    generation (1,280) and ``None`` for the family, whose gene embedding is
    [genes, dim]. ``bins`` > 0 enables epoch-29's optional "gene bin" Performers
    (sorted by a learnt score, attention within each bin); the release uses 0.
    """

    generation: str = FAMILY
    dim: int = 640
    gene_length: int = 20010
    gene_feature_dim: int | None = None
    gb_repeat: int = 1
    p_repeat: int = 12
    bins: int = 0
    full_head: int = 8
    bin_head: int = 12
    nb_features: int | None = None
    bin_nb_features: int | None = None

    def __post_init__(self) -> None:
        if self.generation not in (FAMILY, EPOCH29):
            raise ConfigError(
                f"BulkFormer config: generation={self.generation!r}; use {FAMILY!r} or {EPOCH29!r}"
            )
        for name in ("dim", "gene_length", "gb_repeat", "p_repeat"):
            check_int(f"BulkFormer config: {name}", getattr(self, name), 1)
        check_int("BulkFormer config: bins", self.bins, 0)
        if self.generation == EPOCH29:
            check_int("BulkFormer config: gene_feature_dim", self.gene_feature_dim, 1)
        elif self.gene_feature_dim is not None or self.bins:
            raise ConfigError(
                "BulkFormer config: the current release has neither ESM2 gene features nor "
                "gene bins; leave gene_feature_dim=None and bins=0"
            )
        if self.dim % 2:
            raise ConfigError(
                f"BulkFormer config: dim must be even (sin/cos halves), got {self.dim}"
            )
        for name in ("full_head",) + (("bin_head",) if self.bins else ()):
            heads = getattr(self, name)
            if heads < 1 or self.dim % heads:
                raise ConfigError(f"BulkFormer config: {name}={heads} must divide dim={self.dim}")

    @property
    def release(self) -> str:
        """The released model these sizes are, e.g. ``BulkFormer-147M``."""
        if self.generation == EPOCH29:
            return "Bulkformer_ckpt_epoch_29"
        sizes = (self.dim, self.gb_repeat, self.p_repeat, self.full_head)
        for name, released in FAMILY_SIZES.items():
            if sizes == released and self.gene_length == 20010:
                return name
        return (
            f"BulkFormer (unreleased size: dim={self.dim}, gb_repeat={self.gb_repeat}, "
            f"p_repeat={self.p_repeat}, full_head={self.full_head}, genes={self.gene_length})"
        )

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> BulkFormerConfig:
        """Sizes implied by a released state dict, of either generation."""
        generation = detect_generation(state)
        needed = (*_MARKERS[generation], "x_proj.2.weight", _FIRST_PERFORMER)
        absent = [k for k in needed if k not in state]
        if absent:
            names = (
                "bulkformer_<size>.pt of the current release"
                if generation == FAMILY
                else "the released Bulkformer_ckpt_epoch_29.pt"
            )
            raise CheckpointError(
                f"{MODEL}: the checkpoint lacks {absent}, which a BulkFormer state dict of this "
                f"generation has (it has e.g. {sorted(state)[:8]}); pass {names}"
            )
        dim = int(state["x_proj.2.weight"].shape[0])
        proj = state[_FIRST_PERFORMER]
        kwargs: dict[str, Any] = {
            "generation": generation,
            "dim": dim,
            "gb_repeat": _count(state, r"gb_formers\.(\d+)\."),
            "p_repeat": _count(state, r"gb_formers\.0\.f\.(\d+)\."),
            "full_head": max(1, dim // int(proj.shape[1])),
            "nb_features": int(proj.shape[0]),
        }
        if generation == FAMILY:
            kwargs["gene_length"] = int(state["gene_emb_onehot_layer.weight"].shape[0])
            return cls(**kwargs)
        bins = _count(state, r"gb_formers\.0\.b\.(\d+)\.")
        kwargs["gene_length"] = int(state["ae_enc.0.weight"].shape[1])
        kwargs["gene_feature_dim"] = int(state["gene_emb"].shape[1])
        kwargs["bins"] = bins
        bin_key = f"gb_formers.0.b.0.{_PROJECTION}"
        if bins and bin_key in state:
            kwargs["bin_head"] = max(1, dim // int(state[bin_key].shape[1]))
            kwargs["bin_nb_features"] = int(state[bin_key].shape[0])
        return cls(**kwargs)


def summary_features(x: torch.Tensor) -> torch.Tensor:
    """The current release's three per-sample features, [samples, 3], as its head sees them.

    ``x`` is the model input ([samples, genes], ``MASK_VALUE`` where absent). Columns:
    the fraction of the model's genes that are absent (the authors pass one rate for
    the whole input file, ``mask_prob``; per sample it is the same when every sample
    lacks the same genes), the mean input over present genes, and the fraction of
    inputs that are not 0. The last counts the -10 placeholders as non-zero, as the
    released code does; it is reproduced, not corrected, so the features match.
    """
    masked = x == MASK_VALUE
    observed = (~masked).to(x.dtype)
    missing = masked.to(x.dtype).mean(dim=1)
    mean = (x * observed).sum(dim=1) / (observed.sum(dim=1) + 1e-8)
    nonzero = (x != 0).to(x.dtype).sum(dim=1) / x.shape[1]
    return torch.stack([missing, mean, nonzero], dim=1)


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


def _performer(
    dim: int, heads: int, nb_features: int | None, dropouts: tuple[float, float]
) -> nn.Module:
    performer = require("performer_pytorch", extra=EXTRA, model=MODEL)
    # Dropouts are the released ones; they are inactive in eval mode.
    return performer.Performer(
        dim=dim,
        depth=1,
        heads=heads,
        dim_head=dim // heads,
        nb_features=nb_features,
        attn_dropout=dropouts[0],
        ff_dropout=dropouts[1],
    )


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class GraphPerformerBlock(nn.Module):
    """LayerNorm, residual graph convolution over the gene graph, then Performers.

    The epoch-29 block also has the gene-bin router ``which_b`` (and, when
    ``bins`` > 0, the bin Performers); the current release's block has neither.
    """

    def __init__(self, config: BulkFormerConfig) -> None:
        super().__init__()
        pyg = require("torch_geometric.nn.conv", extra=EXTRA, model=MODEL)
        dim = config.dim
        legacy = config.generation == EPOCH29
        dropouts = (0.2, 0.2) if legacy else (0.05, 0.1)
        self.g = pyg.GCNConv(dim, dim, cached=True, add_self_loops=False)
        if legacy:
            self.which_b = nn.Sequential(nn.Linear(dim, 1))
        self.b = nn.ModuleList(
            [
                _performer(dim, config.bin_head, config.bin_nb_features, dropouts)
                for _ in range(config.bins)
            ]
        )
        self.f = nn.Sequential(
            *[
                _performer(dim, config.full_head, config.nb_features, dropouts)
                for _ in range(config.p_repeat)
            ]
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
    """BulkFormer encoder; ``forward`` returns per-gene states after the final LayerNorm.

    Those states are what the authors' feature extraction pools (the current release
    appends :func:`summary_features` to each gene's state first; the adapter does
    that after pooling, which is the same because they are constant over genes).
    ``head`` (the expression-prediction MLP) is kept only so the released keys load
    strictly.

    ``edge_index`` / ``edge_weight`` are the release's graph files (``G_tcga*.pt``
    for the family, ``G_gtex*.pt`` for epoch 29). The authors wrap them as
    ``SparseTensor(row=G[1], col=G[0], value=w).t()``: a gene ``G[0][k]`` receives from
    ``G[1][k]``. In torch_geometric's edge-list convention (messages flow from row 0
    to row 1) that is the flipped list, stored here, which needs no torch_sparse and
    yields the same symmetric normalisation.
    """

    def __init__(
        self, config: BulkFormerConfig, edge_index: torch.Tensor, edge_weight: torch.Tensor
    ) -> None:
        super().__init__()
        self.config = config
        dim, genes = config.dim, config.gene_length
        if config.generation == FAMILY:
            self.gene_emb_onehot_layer = nn.Embedding(genes, dim)
            self.gene_emb_proj = _mlp(dim, 4 * dim, dim)
        else:
            assert config.gene_feature_dim is not None  # checked by the config
            self.gene_emb = nn.Parameter(torch.zeros(genes, config.gene_feature_dim))
            self.gene_emb_proj = _mlp(config.gene_feature_dim, 4 * dim, dim)
        self.expr_emb = ExpressionEmbedding(dim)
        self.x_proj = _mlp(dim, 4 * dim, dim)
        self.gb_formers = nn.ModuleList(
            [GraphPerformerBlock(config) for _ in range(config.gb_repeat)]
        )
        self.layernorm = nn.LayerNorm(dim)
        if config.generation == FAMILY:
            self.global_expr_proj = _mlp(genes, 4 * dim, dim)
            self.head = nn.Sequential(
                nn.LayerNorm(dim + 3),
                nn.Linear(dim + 3, dim),
                nn.ReLU(),
                nn.Linear(dim, 1),
                nn.ReLU(),
            )
        else:
            self.ae_enc = _mlp(genes, 4 * dim, dim)
            self.head = nn.Sequential(*_mlp(dim, 4 * dim, 1), nn.ReLU())
        self.register_buffer("edge_index", edge_index.flip(0).contiguous(), persistent=False)
        self.register_buffer("edge_weight", edge_weight, persistent=False)

    def gene_identity(self) -> torch.Tensor:
        """Each gene's learnt identity vector, [genes, dim], before the value is added."""
        if self.config.generation == FAMILY:
            return self.gene_emb_proj(self.gene_emb_onehot_layer.weight)
        return self.gene_emb_proj(self.gene_emb)

    def profile(self, x: torch.Tensor) -> torch.Tensor:
        """The whole-profile context vector, [samples, dim]."""
        mlp = self.global_expr_proj if self.config.generation == FAMILY else self.ae_enc
        return mlp(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [batch, genes] log1p(TPM) with ``MASK_VALUE`` for absent genes."""
        if x.ndim != 2 or x.shape[1] != self.config.gene_length:
            raise ConfigError(
                f"{MODEL}: input must be [samples, {self.config.gene_length}], got {tuple(x.shape)}"
            )
        h = self.expr_emb(x) + self.gene_identity() + self.profile(x).unsqueeze(1)
        h = self.x_proj(h)
        for block in self.gb_formers:
            h = block(h, self.edge_index, self.edge_weight)
        return self.layernorm(h)
