"""The FAVOR+ Performer stack shared by the scBERT and scLong networks.

Both releases build their encoders from the same lineage of vendored
performer-pytorch code, so one implementation serves both, with the module nesting
that gives their state-dict keys: a :class:`Performer` holds ``net.layers.{i}.0``
(pre-norm attention: ``norm``, ``fn.to_q/to_k/to_v/to_out``,
``fn.fast_attention.projection_matrix``), ``net.layers.{i}.1`` (pre-norm
feed-forward inside a one-chunk wrapper: ``fn.fn.w1/w2``) and the training-time
``calls_since_last_redraw`` buffer. Only global (non-causal) heads exist; dropout
is zero in both releases and left out; random features come from the checkpoint
and are never redrawn.

Where the callers differ:

- scBERT: no bias on q/k/v, a plain GELU feed-forward, keys stabilised by one
  maximum per sample (its release takes the maximum over the batch, the same thing
  at its batch size of one).
- scLong: q/k/v bias and a gated (GLU) feed-forward are hyper-parameters of the
  release; the key maximum is per sample by default, or over the whole batch as
  released (``key_max="batch"``); ``nb_features`` may be left to the d·ln(d) default.

The key maximum only moves where the kernel's additive ``eps`` enters, but that is
enough to change the output, which is why it is a parameter rather than a detail.
"""

from __future__ import annotations

import math
from typing import Literal, cast, get_args

import torch
from torch import nn

from bulkfm.errors import ConfigError

__all__ = ["KERNEL_EPS", "KeyMax", "Performer", "linear_attention", "softmax_features"]

# Additive constant of the softmax-kernel features (performer-pytorch's default).
KERNEL_EPS = 1e-4
KeyMax = Literal["sample", "batch"]


def softmax_features(
    data: torch.Tensor,
    projection: torch.Tensor,
    *,
    is_query: bool,
    key_max: KeyMax = "sample",
) -> torch.Tensor:
    """Positive random features of the softmax kernel ([b, h, n, d] -> [b, h, n, m]).

    The exponent is shifted for stability: queries by their own maximum over
    features (it cancels in the attention ratio up to ``eps``); keys by one maximum
    per sample over heads, positions and features, or over the whole batch with
    ``key_max="batch"``, which couples a sample's output to its batch neighbours.
    """
    scale = data.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    proj = torch.einsum("bhnd,md->bhnm", data, projection.to(data.dtype) * scale)
    half_norm = (data**2).sum(dim=-1, keepdim=True) * (0.5 * scale**2)
    if is_query:
        top = proj.amax(dim=-1, keepdim=True)
    elif key_max == "batch":
        top = proj.max()
    else:
        top = proj.amax(dim=(1, 2, 3), keepdim=True)
    if torch.is_grad_enabled():
        return ratio * (torch.exp(proj - half_norm - top) + KERNEL_EPS)
    # Inference: the same arithmetic in place (these are the largest tensors).
    return proj.sub_(half_norm + top).exp_().add_(KERNEL_EPS).mul_(ratio)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention: out_i = sum_j (q_i.k_j) v_j / sum_j q_i.k_j."""
    normaliser = torch.einsum("bhnm,bhm->bhn", q, k.sum(dim=-2))
    context = torch.einsum("bhnm,bhne->bhme", k, v)
    return torch.einsum("bhnm,bhme->bhne", q, context) / normaliser.unsqueeze(-1)


class _FastAttention(nn.Module):
    projection_matrix: torch.Tensor

    def __init__(self, nb_features: int, dim_head: int, key_max: KeyMax) -> None:
        super().__init__()
        # Filled from the checkpoint: the releases store their random features.
        self.register_buffer("projection_matrix", torch.zeros(nb_features, dim_head))
        self.key_max = key_max

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qf = softmax_features(q, self.projection_matrix, is_query=True)
        kf = softmax_features(k, self.projection_matrix, is_query=False, key_max=self.key_max)
        return linear_attention(qf, kf, v)


class _SelfAttention(nn.Module):
    def __init__(
        self, dim: int, heads: int, dim_head: int, nb_features: int, qkv_bias: bool, key_max: KeyMax
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.fast_attention = _FastAttention(nb_features, dim_head, key_max)
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)  # both releases give the output a bias

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split(f(x)) for f in (self.to_q, self.to_k, self.to_v))
        out = self.fast_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _FeedForward(nn.Module):
    """GELU MLP; with ``glu`` the first layer is twice as wide and half of it gates."""

    def __init__(self, dim: int, hidden: int, glu: bool) -> None:
        super().__init__()
        self.glu = glu
        self.w1 = nn.Linear(dim, hidden * (2 if glu else 1))
        self.act = nn.GELU()
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.glu:
            x, gate = self.w1(x).chunk(2, dim=-1)
            return self.w2(self.act(x) * gate)
        return self.w2(self.act(self.w1(x)))


class _Chunk(nn.Module):
    """Parameter-free; kept because the released keys pass through it (``1.fn.fn.w1``).

    The releases split the feed-forward into chunks along the sequence to save
    memory; with one chunk that is the identity, which is all inference needs.
    """

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
    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            attention, feed_forward = cast(nn.ModuleList, block)
            x = x + attention(x)
            x = x + feed_forward(x)
        return x


class Performer(nn.Module):
    """Pre-norm residual Performer stack (no final norm: both callers add their own).

    ``nb_features`` defaults to performer-pytorch's ``int(dim_head * ln(dim_head))``;
    the checkpoint's ``projection_matrix`` must have that many rows.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        *,
        ff_hidden: int,
        nb_features: int | None = None,
        ff_glu: bool = False,
        qkv_bias: bool = False,
        key_max: KeyMax = "sample",
    ) -> None:
        super().__init__()
        if key_max not in get_args(KeyMax):
            raise ConfigError(
                f"key_max must be one of {get_args(KeyMax)}, got {key_max!r}; use 'sample' "
                "for batch-independent outputs or 'batch' for the released computation"
            )
        m = nb_features if nb_features is not None else int(dim_head * math.log(dim_head))
        layers = nn.ModuleList(
            nn.ModuleList(
                [
                    _PreNorm(dim, _SelfAttention(dim, heads, dim_head, m, qkv_bias, key_max)),
                    _PreNorm(dim, _Chunk(_FeedForward(dim, ff_hidden, ff_glu))),
                ]
            )
            for _ in range(depth)
        )
        self.net = _Layers(layers)
        # Training-time redraw counter of the releases; loaded for key parity, never used.
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
