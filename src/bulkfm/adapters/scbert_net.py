"""scBERT's encoder in plain PyTorch, with the module tree of the released checkpoint.

scBERT (Yang et al. 2022, TencentAILabHealthcare/scBERT) is a ``PerformerLM`` from a
copy of performer-pytorch vendored in its repository, changed to add each gene's
Gene2Vec vector as that position's embedding. The module nesting here reproduces
the state-dict key names of that copy exactly (``performer.net.layers.{i}.0.fn.to_q``
and so on), so ``panglao_pretrain.pth`` loads without renaming.

Why not the ``performer-pytorch`` package from PyPI (1.1.4): its layer keys match
(with ``rotary_position_emb=False`` and ``attn_out_bias=True``), but it keeps the
redraw counter in a ``proj_updater`` submodule (``performer.proj_updater.*`` keys,
including an alias of every layer) where scBERT's copy has
``performer.calls_since_last_redraw``, and its FAVOR+ key features subtract a max
per sample *and head*, whereas scBERT's copy subtracts one max over the whole key
tensor. The max only shifts where the kernel's ``eps`` term
enters, yet it changes the output, so the published math is re-implemented here.
scBERT's max runs over the whole *batch*, which would make a sample's embedding
depend on the other samples in its batch; this network takes it over each sample
(all heads, positions and features), which is exactly the published computation at
batch size 1 (scBERT's ``predict.py`` runs one cell at a time).

The random-feature ``projection_matrix`` of each layer is a buffer loaded from the
checkpoint and never redrawn (scBERT redraws only in training mode), so embeddings
are deterministic. Dropout rates are all zero in the release and are left out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bulkfm.errors import CheckpointError

__all__ = ["KERNEL_EPS", "ScbertNet", "ScbertShape"]

# Additive constant in scBERT's softmax-kernel features (performer default).
KERNEL_EPS = 1e-4
_LAYER_KEY = re.compile(r"^performer\.net\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ScbertShape:
    """Sizes of a scBERT network, all readable from the checkpoint's tensor shapes.

    The release ships no config file (sizes are hard-coded in its scripts), so the
    shapes are taken from the weights: ``num_tokens`` (bins + 2 = 7), ``n_positions``
    (genes + 1 end position = 16,907), ``dim`` 200, ``depth`` 6, ``heads`` 10,
    ``dim_head`` 64, ``nb_features`` 266 (= int(64 ln 64)), ``ff_hidden`` 800.
    """

    num_tokens: int
    n_positions: int
    dim: int
    depth: int
    heads: int
    dim_head: int
    nb_features: int
    ff_hidden: int

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ScbertShape:
        """Infer the sizes, naming the first key the inference needs but cannot find."""
        prefix = "performer.net.layers.0."
        needed = {
            "token": "token_emb.weight",
            "pos": "pos_emb.emb.weight",
            "q": prefix + "0.fn.to_q.weight",
            "proj": prefix + "0.fn.fast_attention.projection_matrix",
            "w1": prefix + "1.fn.fn.w1.weight",
        }
        absent = [k for k in needed.values() if k not in state]
        if absent:
            raise CheckpointError(
                f"scBERT: the checkpoint lacks {absent} (it has {len(state)} keys, e.g. "
                f"{sorted(state)[:5]}); pass the released panglao_pretrain.pth (its "
                "'model_state_dict') or a safetensors copy of that state dict"
            )
        num_tokens, dim = state[needed["token"]].shape
        n_positions = state[needed["pos"]].shape[0]
        inner = state[needed["q"]].shape[0]
        nb_features, dim_head = state[needed["proj"]].shape
        depth = 1 + max(int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k)))
        if inner % dim_head:
            raise CheckpointError(
                f"scBERT: to_q has {inner} outputs, not a multiple of the head size {dim_head} "
                "(from projection_matrix); the checkpoint is not a scBERT PerformerLM"
            )
        return cls(
            num_tokens=int(num_tokens),
            n_positions=int(n_positions),
            dim=int(dim),
            depth=int(depth),
            heads=int(inner // dim_head),
            dim_head=int(dim_head),
            nb_features=int(nb_features),
            ff_hidden=int(state[needed["w1"]].shape[0]),
        )


def favor_features(data: torch.Tensor, projection: torch.Tensor, *, is_query: bool) -> torch.Tensor:
    """Positive random features of the softmax kernel, stabilised as scBERT does.

    ``data`` is [batch, heads, length, dim_head]. Queries subtract their own max over
    features (it cancels in the attention normaliser up to ``eps``); keys subtract one
    max per sample over heads, positions and features (see the module docstring).
    """
    scale = data.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    proj = torch.einsum("bhnd,md->bhnm", data, projection.to(data.dtype) * scale)
    half_norm = (data**2).sum(dim=-1, keepdim=True) * (0.5 * scale**2)
    top = proj.amax(dim=-1 if is_query else (1, 2, 3), keepdim=True)
    if torch.is_grad_enabled():
        return ratio * (torch.exp(proj - half_norm - top) + KERNEL_EPS)
    # Inference: the same arithmetic in place (these tensors are the largest ones).
    return proj.sub_(half_norm + top).exp_().add_(KERNEL_EPS).mul_(ratio)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention: out_i = sum_j (q_i.k_j) v_j / sum_j q_i.k_j."""
    normaliser = torch.einsum("bhnm,bhm->bhn", q, k.sum(dim=-2))
    context = torch.einsum("bhnm,bhne->bhme", k, v)
    return torch.einsum("bhnm,bhme->bhne", q, context) / normaliser.unsqueeze(-1)


class _FastAttention(nn.Module):
    def __init__(self, nb_features: int, dim_head: int) -> None:
        super().__init__()
        self.register_buffer("projection_matrix", torch.zeros(nb_features, dim_head))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qf = favor_features(q, self.projection_matrix, is_query=True)
        kf = favor_features(k, self.projection_matrix, is_query=False)
        return linear_attention(qf, kf, v)


class _SelfAttention(nn.Module):
    def __init__(self, shape: ScbertShape) -> None:
        super().__init__()
        inner = shape.heads * shape.dim_head
        self.heads = shape.heads
        self.fast_attention = _FastAttention(shape.nb_features, shape.dim_head)
        # scBERT builds PerformerLM with qkv_bias=False; the output projection has a bias.
        self.to_q = nn.Linear(shape.dim, inner, bias=False)
        self.to_k = nn.Linear(shape.dim, inner, bias=False)
        self.to_v = nn.Linear(shape.dim, inner, bias=False)
        self.to_out = nn.Linear(inner, shape.dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split(f(x)) for f in (self.to_q, self.to_k, self.to_v))
        out = self.fast_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


class _Wrapped(nn.Module):
    """A parameter-free wrapper kept only because the release's key names pass through it
    (scBERT wraps its feed-forward in a one-chunk ``Chunk`` module: ``...1.fn.fn.w1``)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class _Layers(nn.Module):
    def __init__(self, shape: ScbertShape) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    _PreNorm(shape.dim, _SelfAttention(shape)),
                    _PreNorm(shape.dim, _Wrapped(_FeedForward(shape.dim, shape.ff_hidden))),
                ]
            )
            for _ in range(shape.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attention, feed_forward in self.layers:
            x = x + attention(x)
            x = x + feed_forward(x)
        return x


class _Trunk(nn.Module):
    def __init__(self, shape: ScbertShape) -> None:
        super().__init__()
        self.net = _Layers(shape)
        # Training-time redraw counter of the release; loaded for key parity, never used.
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _GenePositions(nn.Module):
    """Gene2Vec vector per position (the last, end position is a zero row), frozen."""

    def __init__(self, n_positions: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_positions, dim)
        self.emb.weight.requires_grad_(False)

    def forward(self, length: int) -> torch.Tensor:
        return self.emb.weight[:length]


class ScbertNet(nn.Module):
    """scBERT's encoder: token (expression bin) + Gene2Vec position -> Performer -> LayerNorm.

    ``forward`` returns the encodings [batch, length, dim] that the release's
    ``PerformerLM(..., return_encodings=True)`` gives; the pre-training head
    (``to_out``, bin logits) is not built.
    """

    def __init__(self, shape: ScbertShape) -> None:
        super().__init__()
        self.shape = shape
        self.token_emb = nn.Embedding(shape.num_tokens, shape.dim)
        self.pos_emb = _GenePositions(shape.n_positions, shape.dim)
        self.performer = _Trunk(shape)
        self.norm = nn.LayerNorm(shape.dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.shape.n_positions:
            raise ValueError(f"{length} positions for a model of {self.shape.n_positions}")
        x = self.token_emb(tokens) + self.pos_emb(length).to(self.token_emb.weight.dtype)
        return self.norm(self.performer(x))
