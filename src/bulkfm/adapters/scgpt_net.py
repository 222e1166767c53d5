"""The part of scGPT's ``TransformerModel`` that computes a cell embedding, in plain PyTorch.

Only what ``scgpt.tasks.cell_emb.get_batch_cell_embeddings`` runs (``model._encode``)
is rebuilt: gene-token embedding + LayerNorm (``GeneEncoder``), the continuous value
encoder (``ContinuousValueEncoder``: clamp at 512, Linear(1, d), ReLU, Linear(d, d),
LayerNorm), their sum, then ``nlayers`` post-norm encoder layers (ReLU feed-forward,
LayerNorm eps 1e-5). The pre-training decoders are not built.

Parameter names follow the released checkpoints, which were trained with flash-attn's
``FlashMHA``: ``transformer_encoder.layers.{i}.self_attn.Wqkv.{weight,bias}`` holds
query, key and value stacked along the output dimension, laid out ``(three, head,
head_dim)``, the same layout as ``torch.nn.MultiheadAttention.in_proj_weight``. So a
checkpoint saved from PyTorch's own layer (``in_proj_weight``/``in_proj_bias``) is the
same tensor under another name: :func:`canonical_state` renames it to ``Wqkv``.
Attention runs through ``scaled_dot_product_attention``, which does not build the
full attention matrix, so sequences of tens of thousands of genes fit in memory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bulkfm.errors import CheckpointError

__all__ = ["ENCODER_MODULES", "ScGPTEncoder", "canonical_state", "unused_prefixes"]

# Top-level modules of TransformerModel that the cell embedding uses; everything
# else in a release (decoder, cls_decoder, mvc_decoder, ...) only serves pre-training.
ENCODER_MODULES = ("encoder", "value_encoder", "transformer_encoder")
_IN_PROJ = re.compile(r"^(.*\.self_attn\.)in_proj_(weight|bias)$")
# ContinuousValueEncoder clamps values at this bound (max_value=512 in scGPT).
VALUE_CLAMP = 512.0


class GeneEncoder(nn.Module):
    """Gene-token embedding followed by LayerNorm."""

    def __init__(self, ntoken: int, d_model: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(ntoken, d_model)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(genes))


class ContinuousValueEncoder(nn.Module):
    """A scalar (a bin number, or the pad value) lifted to ``d_model`` by a small MLP."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = values.unsqueeze(-1).clamp(max=VALUE_CLAMP)
        return self.norm(self.linear2(F.relu(self.linear1(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``Wqkv`` projection (FlashMHA's names)."""

    def __init__(self, d_model: int, nhead: int) -> None:
        super().__init__()
        self.nhead = nhead
        self.Wqkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.Wqkv(x).view(b, n, 3, self.nhead, d // self.nhead).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        mask = None if keep is None else keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    """Post-norm transformer layer (scGPT's default ``norm_scheme="post"``)."""

    def __init__(self, d_model: int, nhead: int, d_hid: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, keep))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class LayerStack(nn.Module):
    """Holds the layers under ``layers.{i}`` like ``torch.nn.TransformerEncoder``."""

    def __init__(self, layers: list[EncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, keep)
        return x


class ScGPTEncoder(nn.Module):
    """scGPT's ``_encode``: token + value embeddings through the transformer stack."""

    def __init__(self, ntoken: int, d_model: int, nhead: int, d_hid: int, nlayers: int) -> None:
        super().__init__()
        self.encoder = GeneEncoder(ntoken, d_model)
        self.value_encoder = ContinuousValueEncoder(d_model)
        self.transformer_encoder = LayerStack(
            [EncoderLayer(d_model, nhead, d_hid) for _ in range(nlayers)]
        )

    def forward(
        self, genes: torch.Tensor, values: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states [batch, length, d]; ``padding`` is True at pad positions."""
        x = self.encoder(genes) + self.value_encoder(values)
        # Like FlashTransformerEncoderLayer: no mask at all when nothing is padded.
        keep = ~padding if bool(padding.any()) else None
        return self.transformer_encoder(x, keep)


def canonical_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename PyTorch-layer attention keys (``in_proj_*``) to the release's ``Wqkv.*``."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        m = _IN_PROJ.match(key)
        new = f"{m.group(1)}Wqkv.{m.group(2)}" if m else key
        if new in out:
            raise CheckpointError(
                f"scGPT: the checkpoint holds both {new} and {key}, two copies of one "
                "attention projection; keep one naming (flash-attn Wqkv or PyTorch in_proj)"
            )
        out[new] = value
    return out


def unused_prefixes(state: Mapping[str, Any]) -> list[str]:
    """Top-level modules of a release that the embedding does not use (``"decoder."``...)."""
    out = set()
    for key in state:
        top, dot, _ = key.partition(".")
        if top not in ENCODER_MODULES:
            out.add(f"{top}." if dot else key)
    return sorted(out)
