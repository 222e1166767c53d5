"""Survival on frozen embeddings: a Cox MLP head, C-indexes, Kaplan–Meier risk groups.

The head (hidden 512, 256; one output = log-risk) is trained with the negative Cox
partial log-likelihood (``bulkfm.train.losses.cox_ph_loss``, Efron ties by default) and
early-stopped on a patient-grouped validation split of the training part stratified by
the event. Functions take plain arrays, so any endpoint (OS, DSS, PFI...) the AnnData's
``survival_time`` / ``survival_event`` were built for works the same.

Bad survival data, by level:

- :func:`valid_survival_mask` (used by :func:`run_survival`) *excludes* samples with a
  missing, infinite or non-positive time or a missing event, with a warning giving the
  counts, and returns the mask so the caller sees exactly who was left out;
- the estimator, the loss and the metrics *raise* (``ClinicalMatchError``) on such values,
  because silently dropping rows there would misalign predictions and labels;
- an event that is not 0/1 is always an error (it cannot be guessed), as is a training
  set without any event (the partial likelihood is then constant).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from bulkfm.config import check_choice
from bulkfm.data.splits import survival_strata
from bulkfm.errors import BulkfmWarning, ClinicalMatchError, ConfigError, SplitError
from bulkfm.metrics import cohort_concordance, concordance_index, mean_std, validate_survival
from bulkfm.tasks import (
    MLPHeadMixin,
    align_inputs,
    check_embeddings,
    default_holdouts,
    split_name,
    split_seed,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

__all__ = [
    "SURVIVAL_SUMMARY",
    "CoxMLP",
    "RiskGroups",
    "SurvivalResult",
    "merge_survival",
    "risk_groups_km",
    "run_survival",
    "score_survival_split",
    "survival_split_result",
    "valid_survival_mask",
]

GROUPINGS = {"median": ("low", "high"), "tertiles": ("low", "mid", "high")}
#: Per-split scores averaged over the splits (the last two only with cohorts).
SURVIVAL_SUMMARY = ("c_index", "c_index_weighted", "c_index_macro")


# --------------------------------------------------------------------------- input checks
def valid_survival_mask(time: Any, event: Any) -> np.ndarray:
    """True where a sample has a usable survival record; warns with the excluded counts.

    Usable: finite time > 0 and an event of 0 or 1. A present event outside {0, 1} raises,
    since it means a coding error rather than a missing value.
    """
    t = pd.to_numeric(pd.Series(np.asarray(time, dtype=object)), errors="coerce")
    t = t.to_numpy(dtype=np.float64)
    e_raw = pd.Series(np.asarray(event, dtype=object))
    if len(t) != len(e_raw):
        raise ConfigError(f"time has {len(t)} values but event has {len(e_raw)}; align them")
    e = pd.to_numeric(e_raw, errors="coerce").to_numpy(dtype=np.float64)
    odd = (np.isnan(e) & e_raw.notna().to_numpy()) | (~np.isnan(e) & ~np.isin(e, (0.0, 1.0)))
    if odd.any():
        examples = pd.unique(e_raw[odd]).tolist()[:5]
        raise ClinicalMatchError(
            f"{int(odd.sum())} survival event value(s) are not 0/1 (e.g. {examples}); recode "
            "the event as 1 = event observed, 0 = censored"
        )
    no_time = ~np.isfinite(t)
    non_positive = np.isfinite(t) & (t <= 0)
    no_event = np.isnan(e)
    valid = ~(no_time | non_positive | no_event)
    if not valid.all():
        only_event = no_event & ~no_time & ~non_positive  # each sample under one reason
        warnings.warn(
            f"left out {int((~valid).sum())} of {valid.size} samples without a usable survival "
            f"record: {int(no_time.sum())} missing/infinite time, {int(non_positive.sum())} "
            f"time <= 0, {int(only_event.sum())} usable time but missing event",
            BulkfmWarning,
            stacklevel=2,
        )
    return valid


def _require_events(event: np.ndarray, where: str) -> None:
    if not event.any():
        raise ClinicalMatchError(
            f"no events in {where} ({event.size} samples, all censored): the Cox partial "
            "likelihood carries no information; use an endpoint or cohort with events"
        )


# --------------------------------------------------------------------------- Cox MLP
@dataclass(eq=False, repr=False)
class CoxMLP(MLPHeadMixin, BaseEstimator):
    """Paper survival head on embeddings, fitted with the Cox partial likelihood.

    ``predict_risk`` gives the log-risk (higher = shorter survival). ``batch_size=None``
    trains full-batch, so every risk set is the whole training set; mini-batches
    approximate risk sets by the batch. Deterministic for a given ``seed``.
    """

    hidden: tuple[int, ...] = (512, 256)
    dropout: float = 0.1
    layer_norm: bool = True
    ties: Literal["efron", "breslow"] = "efron"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_epochs: int = 200
    patience: int = 20
    batch_size: int | None = None
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "cpu"

    _fit_call = "fit(X, time, event)"

    def _check_params(self) -> None:
        super()._check_params()
        check_choice("ties", self.ties, ("efron", "breslow"))

    def fit(self, X: Any, time: Any, event: Any, groups: Any | None = None) -> CoxMLP:
        import torch

        from bulkfm.models.heads import survival_head
        from bulkfm.train.losses import cox_ph_loss

        self._check_params()
        X = check_embeddings(X)
        t, e = validate_survival(time, event)
        if t.size != X.shape[0]:
            raise ConfigError(f"{t.size} survival records for {X.shape[0]} embedding rows")
        _require_events(e, "the training data")
        g = None if groups is None else np.asarray(groups).astype(str)
        train_idx, val_idx = self._split_for_early_stopping(survival_strata(e), g)
        ties = self.ties

        def loss_fn(out: torch.Tensor, time_b: torch.Tensor, event_b: torch.Tensor) -> torch.Tensor:
            return cox_ph_loss(out, time_b, event_b, ties=ties)

        def make_head() -> torch.nn.Module:
            return survival_head(
                X.shape[1],
                hidden=tuple(self.hidden),
                dropout=self.dropout,
                layer_norm=self.layer_norm,
            )

        self._train(X, [t, e], train_idx, val_idx, make_head, loss_fn)
        return self

    def predict_risk(self, X: Any) -> np.ndarray:
        """Log-risk per sample (float64); only its order matters for the C-index."""
        return self._forward(X)[:, 0].numpy().astype(np.float64)

    predict = predict_risk

    def score(self, X: Any, time: Any, event: Any) -> float:
        """Harrell's C-index of the predicted risk."""
        return concordance_index(time, event, self.predict_risk(X))


# --------------------------------------------------------------------------- protocol
@dataclass
class SurvivalResult:
    """Per-split C-indexes, their mean ± std, every test risk, and who was left out."""

    per_split: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    predictions: pd.DataFrame = field(repr=False)
    excluded: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"per_split": self.per_split, "summary": self.summary, "excluded": self.excluded}


def run_survival(
    embeddings: Any,
    time: Any,
    event: Any,
    *,
    groups: Any | None = None,
    cohorts: Any | None = None,
    ids: Sequence[str] | np.ndarray | None = None,
    splits: Sequence[Any] | None = None,
    n_repeats: int = 5,
    test_size: float = 0.2,
    seed: int = 0,
    model: Mapping[str, Any] | None = None,
    min_events: int = 1,
) -> SurvivalResult:
    """Cox MLP per split; test C-index (and weighted/macro per-cohort C-index with cohorts).

    Inputs are matched by sample id like :func:`run_classification`. Samples without a
    usable survival record are excluded (warning; their ids in ``excluded``). Default
    splits: ``n_repeats`` patient-grouped hold-outs stratified by the event; given
    ``splits`` index the samples left after alignment and exclusion.
    """
    data = align_inputs(embeddings, time, event, groups, cohorts, ids=ids)
    X, (t, e, g, c) = data.X, data.targets
    valid = valid_survival_mask(t, e)
    excluded = data.ids[~valid].tolist()
    X, t, e, sample_ids = X[valid], t[valid], e[valid], data.ids[valid]
    t, e = validate_survival(t, e)
    g = None if g is None else pd.Series(g[valid]).astype(str).to_numpy()
    c = None if c is None else np.asarray(c[valid])
    _require_events(e, "the survival data")
    if splits is None:
        splits = default_holdouts(
            survival_strata(e),
            g,
            n_repeats=n_repeats,
            test_size=test_size,
            seed=seed,
            by="the event",
            fix="use more samples or an endpoint with more events",
        )
    params = dict(model or {})
    parts = []
    for i, split in enumerate(splits):
        tr, te = split.train, split.test
        cox = CoxMLP(**{"seed": split_seed(split, i, seed), **params})
        cox.fit(X[tr], t[tr], e[tr], groups=None if g is None else g[tr])
        part = survival_split_result(
            "cox mlp",
            split_name(split, i),
            len(tr),
            sample_ids[te],
            t[te],
            e[te],
            cox.predict_risk(X[te]),
            cohorts=None if c is None else c[te],
            min_events=min_events,
        )
        parts.append(part)
    return merge_survival(parts, excluded)


def score_survival_split(
    name: str,
    n_train: int,
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    *,
    cohorts: np.ndarray | None = None,
    min_events: int = 1,
) -> dict[str, Any]:
    """A per-split row: sizes, test events, the C-index and, with cohorts, the weighted and
    macro per-cohort C-indexes (cohorts below ``min_events`` events are skipped)."""
    row: dict[str, Any] = {
        "split": name,
        "n_train": int(n_train),
        "n_test": len(time),
        "n_test_events": int(np.asarray(event).sum()),
        "c_index": concordance_index(time, event, risk),
    }
    if cohorts is not None:
        cc = cohort_concordance(time, event, risk, cohorts, min_events=min_events)
        row.update(
            c_index_weighted=cc["weighted"],
            c_index_macro=cc["macro"],
            per_cohort=cc["per_cohort"],
            skipped_cohorts=cc["skipped"],
        )
    return row


def survival_split_result(
    method: str,
    name: str,
    n_train: int,
    ids: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    *,
    cohorts: np.ndarray | None = None,
    min_events: int = 1,
) -> SurvivalResult:
    """The result of one split: its row (:func:`score_survival_split`) and test risks."""
    row = score_survival_split(
        name, n_train, time, event, risk, cohorts=cohorts, min_events=min_events
    )
    logger.info("%s %s: C-index %.3f", method, name, row["c_index"])
    frame = pd.DataFrame(
        {"sample_id": ids, "split": name, "time": time, "event": event, "risk": risk}
    )
    return SurvivalResult(per_split=[row], summary=_summary([row]), predictions=frame)


def merge_survival(parts: Sequence[SurvivalResult], excluded: Sequence[str] = ()) -> SurvivalResult:
    """One result from single-split results: rows and predictions stacked, mean ± std redone
    over the summary metrics every row has."""
    if not parts:
        raise ConfigError("no split results to merge")
    per_split = [row for part in parts for row in part.per_split]
    return SurvivalResult(
        per_split=per_split,
        summary=_summary(per_split),
        predictions=pd.concat([p.predictions for p in parts], ignore_index=True),
        excluded=list(excluded),
    )


def _summary(per_split: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    metrics = [k for k in SURVIVAL_SUMMARY if all(k in r for r in per_split)]
    return {k: mean_std([r[k] for r in per_split]) for k in metrics}


# --------------------------------------------------------------------------- Kaplan–Meier
@dataclass
class RiskGroups:
    """Risk groups of a test set: cut points, KM curves, log-rank test, optional figure."""

    grouping: str
    group: np.ndarray = field(repr=False)
    cutoffs: list[float]
    table: pd.DataFrame
    curves: dict[str, dict[str, list[float]]] = field(repr=False)
    logrank: dict[str, float]
    figure: Figure | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        table = self.table.replace({math.inf: None}).astype(object)
        table = table.where(table.notna(), None)
        return {
            "grouping": self.grouping,
            "cutoffs": self.cutoffs,
            "groups": table.reset_index().to_dict(orient="records"),
            "logrank": self.logrank,
            "curves": self.curves,
        }


def risk_groups_km(
    time: Any,
    event: Any,
    risk: Any,
    *,
    grouping: Literal["median", "tertiles"] = "median",
    plot: bool = True,
    title: str | None = None,
) -> RiskGroups:
    """Split samples at quantiles of their own predicted risk; compare groups' survival.

    Cut points are quantiles of ``risk`` on the samples given (a test set), so the groups
    are balanced; a sample exactly at a cut point goes to the lower group. The log-rank
    test (lifelines; multivariate for tertiles) asks whether the groups' survival differs.
    """
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    check_choice("grouping", grouping, GROUPINGS)
    t, e = validate_survival(time, event)
    r = np.asarray(risk, dtype=np.float64)
    if r.shape != t.shape or not np.isfinite(r).all():
        raise ConfigError(f"risk must be {t.size} finite values, one per sample")
    _require_events(e, "the samples to group")
    names = GROUPINGS[grouping]
    cutoffs = np.quantile(r, np.arange(1, len(names)) / len(names))
    codes = np.digitize(r, cutoffs, right=True)
    counts = np.bincount(codes, minlength=len(names))
    if (counts == 0).any():
        raise SplitError(
            f"risk groups {[n for n, k in zip(names, counts, strict=True) if k == 0]} are empty: "
            f"the predicted risk has only {np.unique(r).size} distinct value(s) among {r.size} "
            "samples; use grouping='median' or a model whose risks differ"
        )
    group = np.asarray(names, dtype=object)[codes]
    rows, curves = [], {}
    for name in names:
        sel = group == name
        kmf = KaplanMeierFitter().fit(t[sel], e[sel], label=name)
        surv = kmf.survival_function_[name]
        curves[name] = {"time": surv.index.tolist(), "survival": surv.to_numpy().tolist()}
        rows.append(
            {
                "group": name,
                "n": int(sel.sum()),
                "n_events": int(e[sel].sum()),
                "median_survival": float(kmf.median_survival_time_),
            }
        )
    test = multivariate_logrank_test(t, group, e)
    logrank = {
        "statistic": float(test.test_statistic),
        "p_value": float(test.p_value),
        "df": len(names) - 1,
    }
    table = pd.DataFrame(rows).set_index("group")
    figure = _km_figure(curves, t, e, group, names, logrank, title) if plot else None
    return RiskGroups(
        grouping=grouping,
        group=group,
        cutoffs=[float(x) for x in cutoffs],
        table=table,
        curves=curves,
        logrank=logrank,
        figure=figure,
    )


def _km_figure(
    curves: dict[str, dict[str, list[float]]],
    t: np.ndarray,
    e: np.ndarray,
    group: np.ndarray,
    names: Sequence[str],
    logrank: dict[str, float],
    title: str | None,
) -> Figure:
    """Step curves with censoring ticks; an Agg canvas, so pyplot's global state is untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in names:
        times, surv = np.asarray(curves[name]["time"]), np.asarray(curves[name]["survival"])
        sel = group == name
        (line,) = ax.step(times, surv, where="post", label=f"{name} risk (n={int(sel.sum())})")
        censored = np.unique(t[sel & ~e])
        at = surv[np.searchsorted(times, censored, side="right") - 1]
        ax.plot(censored, at, "|", color=line.get_color(), markersize=6)
    ax.set_xlabel("time (days)")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0.0, 1.05)
    ax.legend(loc="lower left", frameon=False)
    ax.set_title(
        (f"{title}\n" if title else "") + f"log-rank p = {logrank['p_value']:.2g}", fontsize=10
    )
    fig.tight_layout()
    return fig
