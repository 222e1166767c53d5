"""BERT-style masking of expression tokens and the masked-LM loss.

Every gene of a sample is eligible (zeros too: "not expressed" is information
the model must learn), except positions that already hold the [MASK] token:
those are genes missing from the sample's source file, whose true value is
unknown, so they can neither be a target nor count in the loss.

Randomness comes only from an explicit ``torch.Generator``. The training data
pipeline seeds one per sample from (seed, epoch, sample index) with
:func:`sample_seed`, so the masks do not depend on how samples are spread over
processes, workers or micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bulkfm.errors import ExpressionValueError
from bulkfm.train.config import MaskingConfig

IGNORE_INDEX = -100
"""Label of positions that are not prediction targets (``F.cross_entropy`` skips it)."""

__all__ = [
    "IGNORE_INDEX",
    "MaskedBatch",
    "MaskingConfig",
    "mask_tokens",
    "masked_lm_loss",
    "sample_generator",
    "sample_seed",
]


@dataclass(frozen=True)
class MaskedBatch:
    """Model input after masking, with the targets.

    ``labels`` holds the original token at selected positions and
    :data:`IGNORE_INDEX` elsewhere; ``selected`` is the boolean target mask.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    selected: torch.Tensor


def n_selected(n_eligible: torch.Tensor, mask_prob: float) -> torch.Tensor:
    """Genes to select per sample: ``mask_prob`` of the eligible ones, rounded half up,
    at least one when any gene is eligible (tiny gene sets would otherwise train on
    nothing)."""
    k = torch.floor(n_eligible.to(torch.float64) * mask_prob + 0.5).to(torch.long)
    return torch.where(n_eligible > 0, k.clamp(min=1), torch.zeros_like(k))


def mask_tokens(
    tokens: torch.Tensor,
    *,
    mask_token_id: int,
    n_bins: int,
    generator: torch.Generator,
    config: MaskingConfig | None = None,
) -> MaskedBatch:
    """Select exactly ``round(mask_prob * eligible)`` genes per sample (last dimension)
    and corrupt them with the 80/10/10 recipe.

    ``tokens``: integer tensor ``[..., n_genes]`` with values in ``0..n_bins`` where
    ``n_bins == mask_token_id`` marks missing genes. Exact counts (rather than an
    independent coin per gene) keep the number of targets per sample fixed, so the
    loss normalisation does not fluctuate from batch to batch.
    """
    config = config or MaskingConfig()
    _check_tokens(tokens, mask_token_id=mask_token_id, n_bins=n_bins)
    tokens = tokens.long()
    eligible = tokens != mask_token_id
    device = tokens.device

    # Draw all random numbers in a fixed order and shape so the stream consumed does
    # not depend on the data (reproducibility across versions of the data).
    scores = torch.rand(tokens.shape, generator=generator, dtype=torch.float64)
    action = torch.rand(tokens.shape, generator=generator, dtype=torch.float64)
    random_bins = torch.randint(0, n_bins, tokens.shape, generator=generator)
    scores, action, random_bins = scores.to(device), action.to(device), random_bins.to(device)

    scores = scores.masked_fill(~eligible, float("inf"))
    rank = scores.argsort(dim=-1).argsort(dim=-1)
    k = n_selected(eligible.sum(dim=-1), config.mask_prob)
    selected = (rank < k.unsqueeze(-1)) & eligible

    to_mask = selected & (action < config.mask_fraction)
    to_random = (
        selected
        & (action >= config.mask_fraction)
        & (action < config.mask_fraction + config.random_fraction)
    )
    input_ids = torch.where(to_mask, torch.full_like(tokens, mask_token_id), tokens)
    input_ids = torch.where(to_random, random_bins, input_ids)
    labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return MaskedBatch(input_ids=input_ids, labels=labels, selected=selected)


def masked_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy over the bins at target positions only.

    ``reduction="sum"`` lets the trainer normalise by the number of targets of the
    whole global batch (so gradients do not depend on how it is split); "mean" is
    the per-batch mean and 0 when there is no target.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    count = (flat_labels != IGNORE_INDEX).sum()
    return total / count.clamp(min=1)


def sample_seed(seed: int, stream: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's masks, well mixed from its coordinates.

    ``stream`` separates uses (0 = training, 1 = held-out evaluation) so the two never
    share masks.
    """
    state = np.random.SeedSequence([seed, stream, epoch, index]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def sample_generator(seed: int, stream: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, stream, epoch, index))


def _check_tokens(tokens: torch.Tensor, *, mask_token_id: int, n_bins: int) -> None:
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ExpressionValueError(
            f"tokens must be an integer tensor, got {tokens.dtype}; tokenise expression "
            "values with bulkfm.tokenize.BinTokenizer first"
        )
    if mask_token_id < n_bins:
        raise ExpressionValueError(
            f"mask_token_id ({mask_token_id}) collides with an expression bin "
            f"(0..{n_bins - 1}); use the model's mask_token_id (= n_bins)"
        )
    if tokens.numel():
        low, high = int(tokens.min()), int(tokens.max())
        stray = (tokens >= n_bins) & (tokens != mask_token_id)
        if low < 0 or bool(stray.any()):
            raise ExpressionValueError(
                f"token ids must lie in 0..{n_bins - 1} or be the mask token {mask_token_id}, "
                f"got values in [{low}, {high}]; was the data tokenised with a different "
                "number of bins than the model's n_expressions_bins?"
            )
