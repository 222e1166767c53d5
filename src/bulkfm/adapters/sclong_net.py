"""scLong's network (``DualEncoderSCFM``) re-built with the released state-dict key names.

Imported only when the scLong adapter loads weights (it imports torch at the top).
The module tree mirrors the release so that its checkpoint loads strictly:
``token_emb.fc1/fc2``, ``token_norm``, ``mask_emb``, ``pos_emb.emb``,
``go_conv.emb`` + ``go_conv.sim_layers.<i>.lin``, three Performers
(``mini_encoder``, ``large_encoder``, ``decoder``, each ``net.layers.<i>.0`` =
pre-norm attention, ``net.layers.<i>.1`` = pre-norm feed-forward wrapped in a chunk
module, plus the ``calls_since_last_redraw`` buffer), the projections around the
large encoder, ``decode_norm`` and the pre-training head ``exp_to_out``.

Written from the public code (``performer_pytorch_cont``), not copied; the three
Performer stacks are :mod:`bulkfm.adapters.performer`'s, shared with scBERT. Two
choices differ on purpose and are switchable (see :class:`SCLongNet`): the top-k
ties are broken by vocabulary position (``torch.topk`` leaves them unspecified),
and the key stabiliser of the softmax kernel is taken per sample by default (the
release takes one maximum over the whole batch, which makes a sample's output
depend slightly on its batch neighbours).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from bulkfm.adapters.performer import KeyMax, Performer, softmax_features

if TYPE_CHECKING:
    from bulkfm.adapters.sclong_config import SCLongConfig

__all__ = ["KeyMax", "Performer", "SCLongNet", "gcn_propagate", "select_top", "softmax_features"]


# --------------------------------------------------------------------------- helpers


def select_top(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the ``k`` largest values per row, and of the rest in vocabulary order.

    A stable descending sort: equal values go to the lower position first, so the
    split between the two encoders never depends on the hardware's top-k routine.
    """
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    top = order[:, :k]
    is_top = torch.zeros_like(values, dtype=torch.bool).scatter_(1, top, True)
    rest = torch.nonzero(~is_top, as_tuple=True)[1].view(values.shape[0], -1)
    return top, rest


def gcn_propagate(
    x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor
) -> torch.Tensor:
    """One symmetric-normalised graph propagation without added self loops.

    What PyG's ``SGConv(K=1, add_self_loops=False)`` does before its linear layer:
    the degree is the weighted in-degree of the target, messages flow source ->
    target, and nodes without edges get zeros.
    """
    source, target = edge_index[0], edge_index[1]
    weight = edge_weight.to(x.dtype)
    degree = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device).index_add_(0, target, weight)
    inv_sqrt = degree.pow(-0.5)
    inv_sqrt = torch.where(torch.isinf(inv_sqrt), torch.zeros_like(inv_sqrt), inv_sqrt)
    norm = inv_sqrt[source] * weight * inv_sqrt[target]
    return torch.zeros_like(x).index_add_(0, target, x[source] * norm.unsqueeze(-1))


def _renorm_rows(weight: torch.Tensor, max_norm: float = 1.0) -> torch.Tensor:
    """Rows scaled to norm <= max_norm, as ``nn.Embedding(max_norm=...)`` does on lookup."""
    norms = weight.norm(dim=-1, keepdim=True)
    scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
    return weight * scale


# --------------------------------------------------------------------------- Performer


def _performer(
    dim: int, depth: int, heads: int, dim_head: int, cfg: SCLongConfig, key_max: KeyMax
) -> Performer:
    """One of the three stacks; they share the feed-forward and bias settings of ``cfg``."""
    return Performer(
        dim,
        depth,
        heads,
        dim_head,
        ff_hidden=dim * cfg.ff_mult,
        nb_features=cfg.nb_features,
        ff_glu=cfg.ff_glu,
        qkv_bias=cfg.qkv_bias,
        key_max=key_max,
    )


# --------------------------------------------------------------------------- embeddings


class _TokenMLP(nn.Module):
    """Continuous expression value -> vector (1 -> 50 -> base_dim)."""

    def __init__(self, base_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1, 50)
        self.fc2 = nn.Linear(50, base_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.unsqueeze(-1))))


class _PositionTable(nn.Module):
    """One learned vector per vocabulary position (Gene2vec-initialised in the release)."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n, dim)

    def forward(self, n: int) -> torch.Tensor:
        return self.emb.weight[:n]


class _SGConv(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)


class _GeneOntologyEncoder(nn.Module):
    """Gene vectors smoothed over the Gene Ontology similarity graph (SGConv layers)."""

    edge_index: torch.Tensor
    edge_weight: torch.Tensor

    def __init__(
        self,
        n: int,
        dim: int,
        num_layers: int,
        edge_index: torch.Tensor,
        edge_weight: torch.Tensor,
        renorm: bool,
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(n, dim)
        self.renorm = renorm
        self.sim_layers = nn.ModuleList(_SGConv(dim) for _ in range(num_layers))
        # The graph comes from the hyper-parameter file, not the state dict.
        self.register_buffer("edge_index", edge_index.long(), persistent=False)
        self.register_buffer("edge_weight", edge_weight.float(), persistent=False)

    def forward(self, n: int) -> torch.Tensor:
        h = self.emb.weight[:n]
        if self.renorm:  # nn.Embedding(max_norm=True) when Gene2vec is not used
            h = _renorm_rows(h)
        for i, layer in enumerate(self.sim_layers):
            conv = cast(_SGConv, layer)
            h = conv.lin(gcn_propagate(h, self.edge_index, self.edge_weight))
            if i < len(self.sim_layers) - 1:
                h = h.relu()
        return h


# --------------------------------------------------------------------------- the model


class SCLongNet(nn.Module):
    """scLong's dual encoder: per-gene representations ``[batch, vocabulary + 1, base_dim]``.

    Every vocabulary position (plus the trailing pad position) gets an expression
    vector (MLP of the value, layer-normed), its position vector and its GO-graph
    vector. The ``top_seq_len`` highest values per sample go through the large
    Performer, the rest through the mini Performer; both are put back in place,
    position and GO vectors are added again, and the decoder Performer plus its
    norm give the per-gene output (``merged_decodings`` in the release).
    """

    def __init__(
        self,
        cfg: SCLongConfig,
        edge_index: torch.Tensor,
        edge_weight: torch.Tensor,
        *,
        key_max: KeyMax = "sample",
        pos_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        d, n = cfg.base_dim, cfg.max_seq_len
        self.cfg = cfg
        self.token_emb = _TokenMLP(d)
        self.token_norm = nn.LayerNorm(d)
        self.mask_emb = nn.Embedding(1, d)
        # The release keeps the Gene2vec table in float64 (numpy's dtype); so do we
        # when the checkpoint does, so the sum is rounded exactly as there.
        self.pos_emb = _PositionTable(n, d).to(pos_dtype) if cfg.g2v_position_emb else None
        self.go_conv = _GeneOntologyEncoder(
            n, d, cfg.go_num_layers, edge_index, edge_weight, renorm=not cfg.go_use_gene2vec
        )
        self.mini_encoder = _performer(
            d, cfg.mini_enc_depth, cfg.mini_enc_heads, cfg.mini_enc_dim_head, cfg, key_max
        )
        self.base_to_large = nn.Linear(d, cfg.large_dim)
        self.large_in_norm = nn.LayerNorm(cfg.large_dim)
        self.large_encoder = _performer(
            cfg.large_dim,
            cfg.large_enc_depth,
            cfg.large_enc_heads,
            cfg.large_enc_dim_head,
            cfg,
            key_max,
        )
        self.large_to_base = nn.Linear(cfg.large_dim, d)
        self.large_to_base_out_norm = nn.LayerNorm(d)
        self.decoder = _performer(d, cfg.dec_depth, cfg.dec_heads, cfg.dec_dim_head, cfg, key_max)
        self.decode_norm = nn.LayerNorm(d)
        self.exp_to_out = nn.Linear(d, 1)  # pre-training head, unused for embeddings

    def _gene_vectors(self, x: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
        """Add position and GO vectors in place, like the release's ``+=``."""
        if self.pos_emb is not None:
            x += self.pos_emb(x.shape[1])
        x += go
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if n != self.cfg.max_seq_len:
            raise ValueError(f"expected {self.cfg.max_seq_len} positions, got {n}")
        d, top_len = self.cfg.base_dim, self.cfg.top_seq_len
        top, rest = select_top(x, top_len)

        masked = (x <= self.cfg.mask_token_thres).to(torch.float32).unsqueeze(-1)
        mask_vec = _renorm_rows(self.mask_emb.weight)[0]
        emb = self.token_emb(x)
        emb = self.token_norm((1 - masked) * emb + masked * mask_vec)
        go = self.go_conv(n)
        emb = self._gene_vectors(emb, go)

        top_emb = torch.gather(emb, 1, top.unsqueeze(-1).expand(-1, -1, d))
        rest_emb = torch.gather(emb, 1, rest.unsqueeze(-1).expand(-1, -1, d))
        top_enc = self.large_in_norm(self.base_to_large(top_emb))
        top_enc = self.large_to_base_out_norm(self.large_to_base(self.large_encoder(top_enc)))
        rest_enc = self.mini_encoder(rest_emb)

        merged = torch.empty_like(emb)
        merged.scatter_(1, top.unsqueeze(-1).expand(-1, -1, d), top_enc)
        merged.scatter_(1, rest.unsqueeze(-1).expand(-1, -1, d), rest_enc)
        merged = self._gene_vectors(merged, go)
        return self.decode_norm(self.decoder(merged))


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (the release counts the same way)."""
    return sum(p.numel() for p in module.parameters())


def build_network(cfg: SCLongConfig, graph: dict[str, Any], **kwargs: Any) -> SCLongNet:
    """The network for ``cfg`` with the GO graph (``G_go``, ``G_go_weight``) attached."""
    return SCLongNet(cfg, graph["G_go"], graph["G_go_weight"], **kwargs)
