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
enters, yet it changes the output, so the published math is re-implemented (the
Performer stack lives in :mod:`bulkfm.adapters.performer`, shared with scLong).
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

from bulkfm.adapters.performer import KERNEL_EPS, Performer, linear_attention
from bulkfm.adapters.performer import softmax_features as favor_features
from bulkfm.errors import CheckpointError

__all__ = [
    "KERNEL_EPS",
    "ScbertNet",
    "ScbertShape",
    "favor_features",
    "linear_attention",
]

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
        # scBERT builds PerformerLM with qkv_bias=False and a plain GELU feed-forward.
        self.performer = Performer(
            shape.dim,
            shape.depth,
            shape.heads,
            shape.dim_head,
            ff_hidden=shape.ff_hidden,
            nb_features=shape.nb_features,
        )
        self.norm = nn.LayerNorm(shape.dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.shape.n_positions:
            raise ValueError(f"{length} positions for a model of {self.shape.n_positions}")
        x = self.token_emb(tokens) + self.pos_emb(length).to(self.token_emb.weight.dtype)
        return self.norm(self.performer(x))
