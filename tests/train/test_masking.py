"""BERT masking: exact selection counts, 80/10/10 proportions, loss on targets only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from bulkfm.errors import ConfigError, ExpressionValueError
from bulkfm.train.config import MaskingConfig
from bulkfm.train.masking import (
    IGNORE_INDEX,
    mask_tokens,
    masked_lm_loss,
    n_selected,
    sample_generator,
    sample_seed,
)

N_BINS = 64
MASK_ID = 64


def _tokens(n: int, g: int, missing_fraction: float = 0.1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, N_BINS, (n, g), generator=gen)
    missing = torch.rand((n, g), generator=gen) < missing_fraction
    return tokens.masked_fill(missing, MASK_ID)


def _mask(tokens: torch.Tensor, seed: int = 1, config: MaskingConfig | None = None):
    return mask_tokens(
        tokens,
        mask_token_id=MASK_ID,
        n_bins=N_BINS,
        generator=torch.Generator().manual_seed(seed),
        config=config,
    )


def _within(observed: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_selects_fifteen_percent_of_eligible_genes_per_sample():
    tokens = _tokens(400, 203)
    out = _mask(tokens)
    eligible = (tokens != MASK_ID).sum(dim=1)
    expected = [max(1, math.floor(0.15 * int(e) + 0.5)) for e in eligible]
    assert out.selected.sum(dim=1).tolist() == expected


def test_missing_positions_are_never_selected_nor_targets():
    tokens = _tokens(300, 100, missing_fraction=0.3)
    out = _mask(tokens)
    missing = tokens == MASK_ID
    assert missing.any()
    assert not (out.selected & missing).any()
    assert (out.labels[missing] == IGNORE_INDEX).all()
    assert (out.input_ids[missing] == MASK_ID).all()


def test_zeros_are_eligible_like_any_other_bin():
    tokens = torch.zeros(50, 40, dtype=torch.long)
    out = _mask(tokens)
    assert (out.selected.sum(dim=1) == 6).all()  # round(0.15 * 40)
    assert (out.labels[out.selected] == 0).all()


def test_all_missing_sample_has_no_target():
    tokens = _tokens(3, 30)
    tokens[1] = MASK_ID
    out = _mask(tokens)
    assert out.selected[1].sum() == 0
    assert out.selected[0].sum() > 0


def test_labels_hold_originals_and_unselected_inputs_are_untouched():
    tokens = _tokens(200, 64)
    out = _mask(tokens)
    assert torch.equal(out.labels[out.selected], tokens[out.selected])
    assert (out.labels[~out.selected] == IGNORE_INDEX).all()
    assert torch.equal(out.input_ids[~out.selected], tokens[~out.selected])


def test_80_10_10_proportions():
    tokens = _tokens(3000, 100, missing_fraction=0.0)
    out = _mask(tokens, seed=7)
    sel = out.selected
    n = int(sel.sum())
    inp, orig = out.input_ids[sel], tokens[sel]
    n_mask = int((inp == MASK_ID).sum())
    n_changed = int(((inp != MASK_ID) & (inp != orig)).sum())
    n_kept = int((inp == orig).sum())
    assert n_mask + n_changed + n_kept == n
    # A random bin equals the original with probability 1/64.
    assert _within(n_mask, n, 0.8)
    assert _within(n_changed, n, 0.1 * 63 / 64)
    assert _within(n_kept, n, 0.1 + 0.1 / 64)


def test_random_replacements_are_uniform_bins_never_the_mask():
    tokens = _tokens(4000, 100, missing_fraction=0.0)
    out = _mask(tokens, seed=3)
    replaced = out.selected & (out.input_ids != MASK_ID) & (out.input_ids != tokens)
    values = out.input_ids[replaced]
    assert values.max() < N_BINS
    counts = np.bincount(values.numpy(), minlength=N_BINS)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_selection_has_no_positional_bias():
    tokens = _tokens(4000, 50, missing_fraction=0.0)
    per_gene = _mask(tokens, seed=5).selected.sum(dim=0).numpy()
    assert stats.chisquare(per_gene).pvalue > 1e-4


def test_custom_fractions_are_honoured():
    tokens = _tokens(2000, 100, missing_fraction=0.0)
    config = MaskingConfig(mask_prob=0.3, mask_fraction=0.5, random_fraction=0.0)
    out = _mask(tokens, config=config)
    assert (out.selected.sum(dim=1) == 30).all()
    sel = out.selected
    n = int(sel.sum())
    assert _within(int((out.input_ids[sel] == MASK_ID).sum()), n, 0.5)
    assert int(((out.input_ids[sel] != MASK_ID) & (out.input_ids[sel] != tokens[sel])).sum()) == 0


def test_same_generator_seed_same_masks_other_seed_other_masks():
    tokens = _tokens(20, 80)
    a, b, c = _mask(tokens, seed=11), _mask(tokens, seed=11), _mask(tokens, seed=12)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.selected, c.selected)


def test_sample_seed_depends_on_every_coordinate():
    base = sample_seed(0, 0, 0, 0)
    assert base == sample_seed(0, 0, 0, 0)
    others = {sample_seed(1, 0, 0, 0), sample_seed(0, 1, 0, 0), sample_seed(0, 0, 1, 0)}
    others.add(sample_seed(0, 0, 0, 1))
    assert base not in others and len(others) == 4
    row = _tokens(1, 60)[0]
    m1 = mask_tokens(
        row, mask_token_id=MASK_ID, n_bins=N_BINS, generator=sample_generator(0, 0, 2, 5)
    )
    m2 = mask_tokens(
        row, mask_token_id=MASK_ID, n_bins=N_BINS, generator=sample_generator(0, 0, 2, 5)
    )
    assert torch.equal(m1.input_ids, m2.input_ids)


def test_n_selected_rounds_half_up_with_a_floor_of_one():
    got = n_selected(torch.tensor([0, 1, 3, 10, 20, 100]), 0.15).tolist()
    assert got == [0, 1, 1, 2, 3, 15]


# ---------------------------------------------------------------------- loss
def _naive_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for g in range(labels.shape[1]):
            y = int(labels[b, g])
            if y == IGNORE_INDEX:
                continue
            row = logits[b, g].double()
            total += float(torch.logsumexp(row, 0) - row[y])
            count += 1
    return total / count


def test_loss_matches_naive_cross_entropy_over_targets():
    tokens = _tokens(6, 40)
    out = _mask(tokens)
    logits = torch.randn(6, 40, N_BINS, generator=torch.Generator().manual_seed(0))
    loss = masked_lm_loss(logits, out.labels)
    assert loss.item() == pytest.approx(_naive_loss(logits, out.labels), rel=1e-5)
    total = masked_lm_loss(logits, out.labels, reduction="sum")
    assert total.item() == pytest.approx(loss.item() * int(out.selected.sum()), rel=1e-5)


def test_loss_ignores_logits_outside_the_targets():
    tokens = _tokens(4, 50)
    out = _mask(tokens)
    logits = torch.randn(4, 50, N_BINS, generator=torch.Generator().manual_seed(1))
    base = masked_lm_loss(logits, out.labels)
    noisy = logits.clone()
    noisy[~out.selected] += 100 * torch.randn_like(noisy[~out.selected])
    assert masked_lm_loss(noisy, out.labels).item() == pytest.approx(base.item(), rel=1e-6)
    target = noisy.clone()
    b, g = torch.nonzero(out.selected)[0].tolist()
    target[b, g, int(out.labels[b, g])] += 5.0
    assert masked_lm_loss(target, out.labels).item() < base.item() - 1e-3


def test_loss_gradient_is_zero_outside_the_targets():
    tokens = _tokens(3, 30)
    out = _mask(tokens)
    logits = torch.randn(3, 30, N_BINS, requires_grad=True)
    masked_lm_loss(logits, out.labels).backward()
    grad_norm = logits.grad.abs().sum(dim=-1)
    assert (grad_norm[~out.selected] == 0).all()
    assert (grad_norm[out.selected] > 0).all()


def test_loss_without_targets_is_zero():
    labels = torch.full((2, 5), IGNORE_INDEX)
    assert masked_lm_loss(torch.randn(2, 5, N_BINS), labels).item() == 0.0


# ---------------------------------------------------------------------- bad input
def test_float_tokens_are_rejected():
    with pytest.raises(ExpressionValueError, match="integer tensor"):
        _mask(torch.rand(2, 10))


def test_out_of_range_tokens_are_rejected():
    tokens = _tokens(2, 10)
    tokens[0, 0] = 70
    with pytest.raises(ExpressionValueError, match="number of bins"):
        _mask(tokens)


def test_negative_tokens_are_rejected():
    tokens = _tokens(2, 10)
    tokens[1, 3] = -1
    with pytest.raises(ExpressionValueError, match=r"token ids must lie"):
        _mask(tokens)


def test_mask_id_inside_the_bins_is_rejected():
    with pytest.raises(ExpressionValueError, match="collides"):
        mask_tokens(_tokens(2, 10), mask_token_id=10, n_bins=N_BINS, generator=torch.Generator())


def test_mask_prob_out_of_range_is_rejected():
    with pytest.raises(ConfigError, match="mask_prob"):
        MaskingConfig(mask_prob=1.5)


def test_fractions_summing_above_one_are_rejected():
    with pytest.raises(ConfigError, match="exceeds 1"):
        MaskingConfig(mask_fraction=0.95, random_fraction=0.1)


def test_negative_fraction_is_rejected():
    with pytest.raises(ConfigError, match="random_fraction"):
        MaskingConfig(random_fraction=-0.1)


@pytest.mark.parametrize("mask_prob", [0.3, 0.5])
def test_80_10_10_holds_at_higher_mask_ratios(mask_prob: float) -> None:
    """The ablation's higher ratios change how many genes are selected, not the recipe."""
    tokens = _tokens(2000, 100, missing_fraction=0.0)
    out = _mask(tokens, seed=11, config=MaskingConfig(mask_prob=mask_prob))
    sel = out.selected
    assert (sel.sum(dim=1) == round(100 * mask_prob)).all()
    n = int(sel.sum())
    inp, orig = out.input_ids[sel], tokens[sel]
    assert _within(int((inp == MASK_ID).sum()), n, 0.8)
    assert _within(int(((inp != MASK_ID) & (inp != orig)).sum()), n, 0.1 * 63 / 64)
    assert _within(int((inp == orig).sum()), n, 0.1 + 0.1 / 64)
