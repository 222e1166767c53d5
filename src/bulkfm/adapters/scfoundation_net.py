"""The encoder path of scFoundation (xTrimoGene, MAE-Autobin), re-implemented in plain PyTorch.

Only what a cell embedding needs: the auto-discretisation value embedding, the
gene-position embedding and the transformer encoder. The pre-training decoder (a
Performer over all 19,266 positions, plus ``decoder_embed``, ``norm`` and
``to_final``) never touches the cell embedding in the published ``get_embedding.py``
(``output_type=cell`` calls ``token_emb``, ``pos_emb`` and ``encoder`` only), so
its keys are dropped at load time.

Parameter names follow the released ``state_dict`` (after the ``model.`` prefix
is removed): ``token_emb.{mlp,mlp2,emb,emb_mask,emb_pad}``, ``pos_emb``,
``encoder.transformer_encoder.<i>.*`` (``torch.nn.TransformerEncoderLayer``,
post-norm, ReLU, feed-forward 4 x width) and ``encoder.norm``, the LayerNorm
the encoder applies to its output before anything is pooled.

This module imports torch at the top: the adapter imports it only when it loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bulkfm.config import check_int
from bulkfm.errors import CheckpointError, ConfigError

__all__ = [
    "AutoBinEmbedding",
    "NetConfig",
    "ScFoundationEncoder",
    "gather_nonzero",
]


@dataclass(frozen=True)
class NetConfig:
    """The settings of the released config that shape the encoder.

    ``seq_len`` counts the genes plus the two depth tokens (19,266 for the release);
    the position table has ``seq_len + 1`` rows, the last one for padding.
    """

    seq_len: int
    hidden_dim: int
    depth: int
    heads: int
    bin_num: int
    bin_alpha: float
    pad_token_id: int
    mask_token_id: int
    ff_mult: int = 4
    norm_first: bool = False

    def __post_init__(self) -> None:
        for name in ("seq_len", "hidden_dim", "depth", "heads", "bin_num", "ff_mult"):
            try:
                check_int(f"scFoundation config: {name}", getattr(self, name), 1)
            except ConfigError as exc:
                raise CheckpointError(
                    f"{exc}; check that the config is the one released with the weights"
                ) from exc
        if self.seq_len < 3:
            raise CheckpointError(
                f"scFoundation config: seq_len={self.seq_len} leaves no room for genes plus the "
                "two depth tokens"
            )
        if self.hidden_dim % self.heads:
            raise CheckpointError(
                f"scFoundation config: hidden_dim={self.hidden_dim} is not divisible by "
                f"heads={self.heads}"
            )

    @classmethod
    def from_released(cls, config: dict[str, Any]) -> NetConfig:
        """Read a flat config (``load.convertconfig`` output or a ``config.json``)."""
        try:
            enc = config["encoder"]
            module = enc.get("module_type", "transformer")
            if module != "transformer":
                raise CheckpointError(
                    f"scFoundation: encoder module_type {module!r} is not supported (only the "
                    "'transformer' encoder of the released cell-embedding models is)"
                )
            return cls(
                seq_len=int(config["seq_len"]),
                hidden_dim=int(enc["hidden_dim"]),
                depth=int(enc["depth"]),
                heads=int(enc["heads"]),
                bin_num=int(config["bin_num"]),
                bin_alpha=float(config["bin_alpha"]),
                pad_token_id=int(config["pad_token_id"]),
                mask_token_id=int(config["mask_token_id"]),
                norm_first=bool(enc.get("norm_first", False)),
            )
        except CheckpointError:
            raise
        except (ValueError, OverflowError) as exc:  # e.g. int("abc"), int(float("inf"))
            raise CheckpointError(
                f"scFoundation: a model config value is not a number ({exc}); use the released "
                "config of these weights"
            ) from exc
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"scFoundation: the model config lacks {exc} (needs seq_len, bin_num, "
                "bin_alpha, pad_token_id, mask_token_id and encoder.{hidden_dim,depth,heads}); "
                "use the config released with the weights"
            ) from exc


class AutoBinEmbedding(nn.Module):
    """Scalar expression -> vector, as a soft mixture of ``bin_num`` learned bin vectors.

    The mixing weights come from a two-layer MLP with a residual scaled by
    ``bin_alpha`` and a softmax over bins. Values equal to the pad or mask id get
    the dedicated pad/mask vectors instead (as in the release; log-normalised
    expression never reaches those ids).
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.bin_alpha = cfg.bin_alpha
        self.pad_token_id = cfg.pad_token_id
        self.mask_token_id = cfg.mask_token_id
        self.mlp = nn.Linear(1, cfg.bin_num)
        self.mlp2 = nn.Linear(cfg.bin_num, cfg.bin_num)
        self.emb = nn.Embedding(cfg.bin_num, cfg.hidden_dim)
        self.emb_mask = nn.Embedding(1, cfg.hidden_dim)
        self.emb_pad = nn.Embedding(1, cfg.hidden_dim)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` [batch, length] -> [batch, length, hidden]."""
        v = values.unsqueeze(-1)
        h = nn.functional.leaky_relu(self.mlp(v), negative_slope=0.1)
        logits = self.bin_alpha * h + self.mlp2(h)
        out = torch.softmax(logits, dim=-1) @ self.emb.weight
        out = torch.where(v == self.mask_token_id, self.emb_mask.weight[0], out)
        return torch.where(v == self.pad_token_id, self.emb_pad.weight[0], out)


class _Encoder(nn.Module):
    """Post-norm transformer layers, then a LayerNorm on the output."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.transformer_encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=cfg.hidden_dim,
                nhead=cfg.heads,
                dim_feedforward=cfg.hidden_dim * cfg.ff_mult,
                batch_first=True,
                norm_first=cfg.norm_first,
            )
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.hidden_dim)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        for layer in self.transformer_encoder:
            x = layer(x, src_key_padding_mask=padding)
        return self.norm(x)


class ScFoundationEncoder(nn.Module):
    """Value embedding + gene-position embedding -> encoder, over the gathered tokens."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_emb = AutoBinEmbedding(cfg)
        self.pos_emb = nn.Embedding(cfg.seq_len + 1, cfg.hidden_dim)
        self.encoder = _Encoder(cfg)

    def forward(
        self, values: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states [batch, length, hidden] of gathered tokens (see :func:`gather_nonzero`)."""
        x = self.token_emb(values) + self.pos_emb(positions)
        return self.encoder(x, padding)


def gather_nonzero(
    values: torch.Tensor, *, pad_value: float, pad_position: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each row's positive entries, in position order, left-aligned and padded.

    The encoder only sees expressed genes (and the two depth tokens). Rows are padded
    to the longest row of the batch; padding carries ``pad_value`` (the pad token id,
    so the value embedding gives it the pad vector) and position ``pad_position``.
    Returns (values, positions, padding) of shape [batch, longest].
    """
    keep = values > 0
    counts = keep.sum(dim=1)
    longest = int(counts.max()) if values.shape[0] else 0
    # A stable sort on "not kept" puts kept entries first, each group in index order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :longest]
    padding = torch.arange(longest, device=values.device)[None, :] >= counts[:, None]
    out_values = values.gather(1, order).masked_fill(padding, pad_value)
    positions = order.masked_fill(padding, pad_position)
    return out_values, positions, padding
