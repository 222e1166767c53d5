"""Training losses beyond the masked-LM cross-entropy: Cox partial likelihood and the
masked expected-value loss.

**Cox.** Negative Cox partial log-likelihood with tied event times, without overflow.

For the distinct event times ``t`` with tied events ``D_t`` (``d_t`` of them) and risk
set ``R_t = {j : time_j >= t}``::

    log L = sum_t [ sum_{i in D_t} eta_i
                    - sum_{l=0}^{d_t - 1} log( S(R_t) - (l / d_t) S(D_t) ) ]      (Efron)

with ``S(A) = sum_{j in A} exp(eta_j)``; Breslow drops the ``(l / d_t) S(D_t)`` term.
Everything stays in log space: ``log S(R_t)`` is a reverse ``logcumsumexp`` over samples
sorted by time (stable for any eta, including 1000), ``log S(D_t)`` a per-time
log-sum-exp with max subtraction, and the Efron correction is
``log S(R) + log1p(-(l / d) exp(log S(D) - log S(R)))``, whose argument is in (0, 1]
because ``D_t`` is inside ``R_t``. The loss is the mean over events, so its scale does
not depend on the batch size.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from bulkfm.errors import ClinicalMatchError, ConfigError
from bulkfm.train.masking import IGNORE_INDEX

__all__ = ["cox_ph_loss", "expected_bin", "masked_value_loss"]

TIES = ("efron", "breslow")


def _risk_vector(log_risk: torch.Tensor) -> torch.Tensor:
    if not isinstance(log_risk, torch.Tensor):
        raise ConfigError(f"log_risk must be a torch.Tensor, got {type(log_risk).__name__}")
    if log_risk.ndim == 2 and log_risk.shape[1] == 1:
        log_risk = log_risk[:, 0]
    if log_risk.ndim != 1:
        raise ConfigError(
            f"log_risk must have shape [n] or [n, 1], got {tuple(log_risk.shape)}; a survival "
            "head has one output"
        )
    if log_risk.dtype in (torch.float16, torch.bfloat16):
        log_risk = log_risk.float()  # the sums over risk sets need float32 precision
    return log_risk


def _survival_tensors(
    time: Any, event: Any, n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    time = torch.as_tensor(time, device=device)
    event = torch.as_tensor(event, device=device)
    if time.shape != (n,) or event.shape != (n,):
        raise ConfigError(
            f"time {tuple(time.shape)} and event {tuple(event.shape)} must both have shape "
            f"({n},), one entry per log_risk value"
        )
    if time.is_floating_point() and not bool(torch.isfinite(time).all()):
        raise ClinicalMatchError(
            f"{int((~torch.isfinite(time)).sum())} survival time(s) are NaN/inf; drop those "
            "samples before training (bulkfm.tasks.survival.valid_survival_mask)"
        )
    if bool(((event != 0) & (event != 1)).any()):
        raise ClinicalMatchError(
            "survival event must be 0 (censored) or 1 (event observed); recode it and drop "
            "samples whose status is unknown"
        )
    return time, event.bool()


def cox_ph_loss(
    log_risk: torch.Tensor,
    time: Any,
    event: Any,
    *,
    ties: Literal["efron", "breslow"] = "efron",
) -> torch.Tensor:
    """Mean negative partial log-likelihood per event (scalar tensor).

    ``log_risk`` [n] or [n, 1] (higher = shorter survival); ``time`` and ``event`` (0/1)
    [n], tensors or arrays. A batch without events carries no partial-likelihood
    information: the loss is then 0 (still attached to the graph, so ``backward`` works);
    callers that need events check for them (``CoxMLP.fit`` does).
    """
    if ties not in TIES:
        raise ConfigError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    eta = _risk_vector(log_risk)
    time, event = _survival_tensors(time, event, eta.shape[0], eta.device)
    n_events = event.sum()
    if int(n_events) == 0:
        return eta.sum() * 0.0

    order = torch.argsort(time, stable=True)
    t, e, h = time[order], event[order], eta[order]
    _, group, counts = torch.unique_consecutive(t, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    # log S(R) at each sorted position: log-sum-exp of eta from that position to the end;
    # taken at the first position of each tie group so tied samples share one risk set.
    tail_lse = torch.logcumsumexp(h.flip(0), dim=0).flip(0)
    log_s_risk = tail_lse[starts][group[e]]
    h_ev = h[e]
    log_lik = h_ev - log_s_risk
    if ties == "efron":
        log_lik = log_lik - _efron_correction(h_ev, group[e], counts.numel(), log_s_risk)
    return -log_lik.sum() / n_events.to(log_lik.dtype)


def _efron_correction(
    h_ev: torch.Tensor, group: torch.Tensor, n_groups: int, log_s_risk: torch.Tensor
) -> torch.Tensor:
    """Per-event ``log1p(-(l / d) S(D) / S(R))``; events arrive sorted by their tie group."""
    zeros = torch.zeros(n_groups, dtype=h_ev.dtype, device=h_ev.device)
    d = zeros.scatter_add(0, group, torch.ones_like(h_ev))
    first = torch.cumsum(d, 0) - d
    rank = torch.arange(h_ev.numel(), device=h_ev.device, dtype=h_ev.dtype) - first[group]
    # Per-group log-sum-exp of the tied events; the max is a constant shift (detached).
    top = torch.full_like(zeros, -torch.inf).scatter_reduce(
        0, group, h_ev.detach(), reduce="amax", include_self=True
    )
    sums = zeros.scatter_add(0, group, torch.exp(h_ev - top[group]))
    log_s_tied = torch.log(sums[group]) + top[group]
    return torch.log1p(-(rank / d[group]) * torch.exp(log_s_tied - log_s_risk))


# --------------------------------------------------------------------------- value loss
def expected_bin(logits: torch.Tensor) -> torch.Tensor:
    """The model's expected bin index, ``sum_b softmax(logits)_b * b``, on [0, n_bins - 1].

    The bins are equal-width slices of normalised log10(1 + TPM), so the bin index is
    that value on a linear scale and the expectation is a point prediction of it.
    """
    probs = logits.float().softmax(dim=-1)
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=probs.dtype)
    return probs @ bins


def masked_value_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Squared error between the expected bin and the true bin at target positions, with
    both divided by ``n_bins - 1`` (so on the [0, 1] normalised-expression scale).

    Why: the cross-entropy over 64 bins is blind to order, so predicting bin 11 for a true
    10 costs as much as predicting bin 60. This term penalises distance, pushing the
    encoder to carry expression magnitude (what the classical baselines read), and it
    needs no new parameters: checkpoints keep the official format. ``labels`` holds
    :data:`IGNORE_INDEX` at non-targets, as for the MLM loss. ``reduction="sum"`` lets the
    trainer divide by the global batch's target count; "mean" is 0 without targets.
    """
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits.shape[:-1] != labels.shape:
        raise ConfigError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
            "logits must be labels' shape plus one bin axis"
        )
    n_bins = logits.shape[-1]
    if n_bins < 2:
        raise ConfigError(f"the value loss needs at least 2 bins, got {n_bins}")
    target = labels != IGNORE_INDEX
    pred = expected_bin(logits[target]) / (n_bins - 1)
    true = labels[target].to(pred.dtype) / (n_bins - 1)
    total = F.mse_loss(pred, true, reduction="sum")
    if reduction == "sum":
        return total
    return total / target.sum().clamp(min=1)
