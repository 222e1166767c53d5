from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter

from bulkfm.errors import ClinicalMatchError, ConfigError
from bulkfm.train.losses import cox_ph_loss, expected_bin, masked_value_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tied_data(seed: int = 0, n: int = 200, p: int = 3):
    """Covariates with a Cox effect, times on a coarse grid (many ties), ~30% censored."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    beta = np.array([0.8, -0.5, 0.3, 0.2, -0.1][:p])
    t = np.ceil(rng.exponential(np.exp(-X @ beta)) * 5)
    c = np.ceil(rng.exponential(2.0, size=n) * 5)
    time = np.maximum(np.minimum(t, c), 1.0)
    event = (t <= c).astype(np.int64)
    return X, time, event


def naive_neg_loglik(eta: np.ndarray, time: np.ndarray, event: np.ndarray, ties: str) -> float:
    """O(n^2) loop over distinct event times, straight from the textbook formulas.

    Sums of exp are taken after subtracting the risk set's max (a constant per time).
    """
    total = 0.0
    for s in np.unique(time[event == 1]):
        tied = (time == s) & (event == 1)
        at_risk = time >= s
        d = tied.sum()
        m = eta[at_risk].max()
        risk_sum = np.exp(eta[at_risk] - m).sum()
        tied_sum = np.exp(eta[tied] - m).sum()
        total += eta[tied].sum()
        for l in range(d):  # noqa: E741 - the index of Efron's formula
            frac = l / d if ties == "efron" else 0.0
            total -= m + np.log(risk_sum - frac * tied_sum)
    return -total / event.sum()


def test_efron_matches_lifelines_fit_many_ties():
    X, time, event = tied_data()
    assert len(np.unique(time)) < 40 and event.sum() > 100
    df = pd.DataFrame(X, columns=["a", "b", "c"]).assign(T=time, E=event)
    cph = CoxPHFitter(penalizer=0.0).fit(df, "T", "E")  # lifelines uses Efron's ties
    beta = torch.tensor(cph.params_.to_numpy(), dtype=torch.float64, requires_grad=True)
    loss = cox_ph_loss(torch.from_numpy(X) @ beta, time, event, ties="efron")
    loss.backward()
    assert loss.item() * event.sum() == pytest.approx(-cph.log_likelihood_, rel=1e-9)
    # lifelines' estimate is the maximiser: our gradient vanishes there
    assert beta.grad.abs().max() < 1e-4
    # and it does not vanish elsewhere (the check has teeth)
    moved = (beta.detach() + 0.2).requires_grad_(True)
    cox_ph_loss(torch.from_numpy(X) @ moved, time, event).backward()
    assert moved.grad.abs().max() > 1e-2


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_matches_naive_loop(ties):
    _, time, event = tied_data(seed=1, n=120)
    eta = np.random.default_rng(2).normal(size=120) * 2
    got = cox_ph_loss(
        torch.from_numpy(eta), torch.from_numpy(time), torch.from_numpy(event), ties=ties
    )
    assert float(got) == pytest.approx(naive_neg_loglik(eta, time, event, ties), rel=1e-10)


def test_breslow_and_efron_differ_with_ties_and_agree_without():
    _, time, event = tied_data(seed=3, n=80)
    eta = torch.from_numpy(np.random.default_rng(3).normal(size=80))
    assert float(cox_ph_loss(eta, time, event, ties="breslow")) != pytest.approx(
        float(cox_ph_loss(eta, time, event, ties="efron"))
    )
    distinct = np.arange(1, 81, dtype=float)
    torch.testing.assert_close(
        cox_ph_loss(eta, distinct, event, ties="breslow"),
        cox_ph_loss(eta, distinct, event, ties="efron"),
    )


def test_gradcheck_efron_with_ties():
    _, time, event = tied_data(seed=4, n=25)
    eta = torch.randn(25, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: cox_ph_loss(h, time, event, ties="efron"), (eta,))


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_no_overflow_with_huge_log_risk(ties):
    _, time, event = tied_data(seed=5, n=60)
    base = torch.from_numpy(np.random.default_rng(5).normal(size=60))
    reference = cox_ph_loss(base, time, event, ties=ties)
    for shift in (1000.0, -1000.0):
        eta = (base + shift).float().requires_grad_(True)
        loss = cox_ph_loss(eta, time, event, ties=ties)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(eta.grad).all()
        # the partial likelihood ignores a common shift of the log-risk
        assert loss.item() == pytest.approx(reference.item(), rel=1e-4)
    spread = torch.from_numpy(np.where(np.arange(60) % 2 == 0, 1000.0, -1000.0))
    got = cox_ph_loss(spread, time, event, ties=ties)
    assert float(got) == pytest.approx(naive_neg_loglik(spread.numpy(), time, event, ties))


def test_invariant_to_sample_order_and_accepts_column_vector():
    _, time, event = tied_data(seed=6, n=50)
    eta = torch.from_numpy(np.random.default_rng(6).normal(size=50))
    perm = np.random.default_rng(7).permutation(50)
    torch.testing.assert_close(
        cox_ph_loss(eta, time, event), cox_ph_loss(eta[perm], time[perm], event[perm])
    )
    torch.testing.assert_close(
        cox_ph_loss(eta[:, None], time, event), cox_ph_loss(eta, time, event)
    )


def test_no_events_gives_zero_loss_with_a_gradient():
    eta = torch.randn(5, requires_grad=True)
    loss = cox_ph_loss(eta, [1.0, 2.0, 3.0, 4.0, 5.0], [0, 0, 0, 0, 0])
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(eta.grad, torch.zeros(5))


def test_rejects_event_outside_0_1():
    with pytest.raises(ClinicalMatchError, match=r"0 \(censored\) or 1"):
        cox_ph_loss(torch.zeros(3), [1.0, 2.0, 3.0], [1, 2, 0])


def test_rejects_nan_time():
    with pytest.raises(ClinicalMatchError, match="NaN/inf"):
        cox_ph_loss(torch.zeros(3), [1.0, float("nan"), 3.0], [1, 0, 0])


def test_rejects_shape_mismatch():
    with pytest.raises(ConfigError, match=r"must both have shape \(3,\)"):
        cox_ph_loss(torch.zeros(3), [1.0, 2.0], [1, 0])


def test_rejects_two_column_log_risk():
    with pytest.raises(ConfigError, match=r"shape \[n\] or \[n, 1\]"):
        cox_ph_loss(torch.zeros(3, 2), [1.0, 2.0, 3.0], [1, 0, 1])


def test_rejects_unknown_ties():
    with pytest.raises(ConfigError, match="ties must be"):
        cox_ph_loss(torch.zeros(2), [1.0, 2.0], [1, 0], ties="exact")


# --------------------------------------------------------------------------- value loss
def naive_value_loss(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """Loop over positions: (sum of squared errors of the expected bin, target count)."""
    n_bins = logits.shape[-1]
    total, count = 0.0, 0
    for pos in np.ndindex(labels.shape):
        if labels[pos] == -100:
            continue
        z = logits[pos] - logits[pos].max()
        p = np.exp(z) / np.exp(z).sum()
        expected = sum(b * p[b] for b in range(n_bins))
        total += (expected / (n_bins - 1) - labels[pos] / (n_bins - 1)) ** 2
        count += 1
    return total, count


def _value_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 16, (3, 7), generator=gen)
    labels[torch.rand(3, 7, generator=gen) < 0.5] = -100
    return logits, labels


def test_value_loss_matches_a_naive_loop() -> None:
    logits, labels = _value_batch()
    total, count = naive_value_loss(logits.numpy(), labels.numpy())
    assert count > 0
    got_sum = masked_value_loss(logits, labels, "sum")
    got_mean = masked_value_loss(logits, labels)
    assert got_sum.item() == pytest.approx(total, rel=1e-6)
    assert got_mean.item() == pytest.approx(total / count, rel=1e-6)


def test_value_loss_is_zero_for_a_sure_correct_prediction_and_ordered() -> None:
    labels = torch.tensor([[5, -100]])
    sure = torch.full((1, 2, 16), -1e4)
    sure[0, 0, 5] = 0.0
    assert masked_value_loss(sure, labels).item() == pytest.approx(0.0, abs=1e-12)
    near, far = sure.clone(), sure.clone()
    near[0, 0], far[0, 0] = -1e4, -1e4
    near[0, 0, 6], far[0, 0, 15] = 0.0, 0.0
    # unlike the cross-entropy (equal for both), a near miss costs less than a far one
    assert masked_value_loss(near, labels) < masked_value_loss(far, labels)
    assert expected_bin(sure)[0, 0].item() == pytest.approx(5.0)


def test_value_loss_gradient_only_at_targets_and_zero_without_targets() -> None:
    logits, labels = _value_batch(seed=1)
    logits.requires_grad_(True)
    masked_value_loss(logits, labels).backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[labels == -100] == 0)
    assert torch.any(logits.grad[labels != -100] != 0)
    none = torch.full((2, 3), -100)
    assert masked_value_loss(torch.randn(2, 3, 8), none).item() == 0.0


def test_value_loss_rejects_bad_shapes_and_reductions() -> None:
    logits, labels = _value_batch()
    with pytest.raises(ConfigError, match="disagree"):
        masked_value_loss(logits, labels[:, :3])
    with pytest.raises(ConfigError, match="reduction"):
        masked_value_loss(logits, labels, "max")


def test_loss_value_weight_is_checked_and_defaults_to_the_paper() -> None:
    from bulkfm.train.config import PretrainConfig

    assert PretrainConfig().loss.value_weight == 0.0
    assert PretrainConfig.from_dict({"loss": {"value_weight": 1.5}}).loss.value_weight == 1.5
    with pytest.raises(ConfigError, match=r"loss\.value_weight"):
        PretrainConfig.from_dict({"loss": {"value_weight": -1}})
