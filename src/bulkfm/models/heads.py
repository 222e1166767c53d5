"""Task heads put on (frozen or fine-tuned) BulkRNABert embeddings, as in the paper.

Each hidden block is Linear -> SELU -> Dropout -> LayerNorm; the last Linear gives the
class logits or the Cox log-risk. The LayerNorm after the activation keeps the scale of
the hidden units fixed whatever the embedding scale (frozen embeddings of different
layers differ a lot in norm), so one learning rate fits all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bulkfm.config import check_int, check_number
from bulkfm.errors import ConfigError

__all__ = ["MLPHead", "classification_head", "survival_head"]

CLASSIFICATION_HIDDEN = (256, 128)
SURVIVAL_HIDDEN = (512, 256)


class MLPHead(nn.Module):
    """[batch, in_dim] -> [batch, out_dim]; ``hidden=()`` gives a linear head."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int] = CLASSIFICATION_HIDDEN,
        dropout: float = 0.1,
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        check_int("in_dim", in_dim, 1)
        check_int("out_dim", out_dim, 1)
        if isinstance(hidden, int):
            raise ConfigError(
                f"hidden must be a sequence of layer sizes, e.g. (256, 128), got {hidden}"
            )
        hidden = tuple(check_int("hidden size", h, 1) for h in hidden)
        check_number("dropout", dropout, low=0.0, high=1.0, high_open=True)
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.SELU(), nn.Dropout(float(dropout))]
            if layer_norm:
                layers.append(nn.LayerNorm(size))
            width = size
        self.body = nn.Sequential(*layers)
        self.output = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ConfigError(
                f"head expects inputs [batch, {self.in_dim}], got shape {tuple(x.shape)}; "
                "build the head with in_dim = the embedding size"
            )
        return self.output(self.body(x))


def classification_head(in_dim: int, n_classes: int, **kw: object) -> MLPHead:
    """Paper classification head: hidden (256, 128), one logit per class."""
    if isinstance(n_classes, int) and not isinstance(n_classes, bool) and n_classes < 2:
        raise ConfigError(f"n_classes must be >= 2 for a classifier, got {n_classes}")
    kw.setdefault("hidden", CLASSIFICATION_HIDDEN)
    return MLPHead(in_dim, n_classes, **kw)  # type: ignore[arg-type]


def survival_head(in_dim: int, **kw: object) -> MLPHead:
    """Paper survival head: hidden (512, 256), one output = log-risk (shape [batch, 1])."""
    kw.setdefault("hidden", SURVIVAL_HIDDEN)
    return MLPHead(in_dim, 1, **kw)  # type: ignore[arg-type]
