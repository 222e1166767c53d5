"""Patient-grouped train/test splits that never put one patient on both sides.

Bulk cohorts often hold several samples per patient (a tumour and its adjacent
normal, re-sequenced aliquots). If those samples land on both sides of a split,
a model can recognise the patient instead of learning biology, and every score
is inflated. Every splitter here therefore takes ``groups`` (patient ids) and
delegates the grouping to scikit-learn's grouped splitters, which guarantee
that a group is never divided.

All splitters return :class:`Split` objects holding integer positions, so they
index an AnnData (``adata[split.train]``), a numpy array or a DataFrame alike.

:func:`holdout_splits` and :func:`inner_folds` are the fast entry points the benchmark
and the probes use (~10^3 splits per model): scikit-learn's ``StratifiedGroupKFold``
assigns groups one by one in Python (~0.2-0.3 s for 1,000 patients), but when every
patient contributes exactly one row grouping is a no-op and ``StratifiedKFold`` gives
the same guarantees in milliseconds; with repeated patients they fall back to
:func:`repeated_holdout` / :func:`grouped_kfold` unchanged.

Validation happens before scikit-learn sees the data so that a failure names
the offending classes and says how to fix it, instead of surfacing sklearn's
generic warnings (a too-small class is only a *warning* there, and produces a
split with the class missing from some test folds).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from bulkfm import schema as keys
from bulkfm.config import check_choice, check_int, check_probability
from bulkfm.errors import ConfigError, SplitError

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

__all__ = [
    "Split",
    "check_group_sizes",
    "grouped_kfold",
    "holdout_splits",
    "inner_folds",
    "leave_cohort_out",
    "n_holdout_folds",
    "repeated_holdout",
    "splits_from_adata",
    "survival_strata",
]


@dataclass(frozen=True, eq=False)
class Split:
    """One train/test partition as sorted integer positions.

    ``eq=False`` because element-wise array comparison has no single truth
    value; compare ``train``/``test`` with ``np.array_equal`` instead. The
    arrays are made read-only so a split cannot be altered after it was
    checked for leaks.
    """

    train: np.ndarray
    test: np.ndarray
    seed: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        for side in ("train", "test"):
            arr = np.sort(np.asarray(getattr(self, side), dtype=np.int64).ravel())
            arr.setflags(write=False)
            object.__setattr__(self, side, arr)
        if np.intersect1d(self.train, self.test).size:
            raise SplitError(
                f"split {self.name!r} has positions on both train and test sides; "
                "build splits with the functions in bulkfm.data.splits"
            )

    def as_masks(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Boolean (train, test) masks of length ``n`` for boolean indexing."""
        top = max(self.train.max(initial=-1), self.test.max(initial=-1))
        if top >= n:
            raise SplitError(
                f"split {self.name!r} refers to position {top} but n={n}; pass the number "
                "of samples of the data the split was made for"
            )
        train = np.zeros(n, dtype=bool)
        test = np.zeros(n, dtype=bool)
        train[self.train] = True
        test[self.test] = True
        return train, test

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, e.g. for ``adata.uns['bulkfm']``."""
        return {
            "name": self.name,
            "seed": self.seed,
            "train": self.train.tolist(),
            "test": self.test.tolist(),
        }


# --------------------------------------------------------------------------- validation


def _as_1d(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    if arr.ndim != 1:
        raise SplitError(f"{what} must be one-dimensional, got shape {arr.shape}; pass a 1-D array")
    return arr


def _check_no_missing(values: pd.Series, what: str, fix: str) -> None:
    missing = values.isna().to_numpy()
    if missing.any():
        where = np.flatnonzero(missing)[:5].tolist()
        raise SplitError(
            f"{what} has {int(missing.sum())} missing value(s) (e.g. at positions {where}); {fix}"
        )


def _encode_labels(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes and class names.

    Integer codes sidestep sklearn's target-type detection, which would reject
    float labels such as a 0.0/1.0 event indicator stored as float.
    """
    lab = pd.Series(_as_1d(labels, "labels"))
    _check_no_missing(
        lab,
        "labels",
        "drop those samples before splitting (e.g. adata[adata.obs[col].notna()]) or fill them",
    )
    codes, names = pd.factorize(lab, sort=True)
    return codes.astype(np.int64), np.asarray(names)


def _encode_groups(groups: Any | None, n: int | None) -> np.ndarray:
    if groups is None:
        if n is None:
            raise SplitError("pass labels or groups so the number of samples is known")
        return np.arange(n, dtype=np.int64)
    grp = pd.Series(_as_1d(groups, "groups"))
    if n is not None and len(grp) != n:
        raise SplitError(
            f"labels has {n} entries but groups has {len(grp)}; pass one patient id per sample "
            "in the same order as the labels"
        )
    _check_no_missing(
        grp,
        "groups (patient ids)",
        "fill missing patient ids with the sample id so each such sample is its own patient",
    )
    return pd.factorize(grp)[0].astype(np.int64)


def _prepare(
    labels: Any | None, groups: Any | None, *, stratify: bool
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """Validated (label codes, class names, group codes); labels are None unstratified."""
    if labels is None:
        if stratify:
            raise SplitError(
                "stratify=True needs labels; pass labels (class or survival event) or set "
                "stratify=False"
            )
        return None, None, _encode_groups(groups, None)
    if not stratify:
        return None, None, _encode_groups(groups, len(_as_1d(labels, "labels")))
    y, names = _encode_labels(labels)
    return y, names, _encode_groups(groups, len(y))


def _check_enough(
    y: np.ndarray | None, names: np.ndarray | None, g: np.ndarray, n_splits: int, fix: str
) -> None:
    """Every class needs a patient in every fold, else some test folds miss the class."""
    n_groups = np.unique(g).size
    if n_groups < n_splits:
        raise SplitError(
            f"only {n_groups} patient(s) but {n_splits} folds are needed; {fix} or add samples"
        )
    if y is None or names is None:
        return
    check_group_sizes(
        names[y],
        g,
        n_splits,
        context=f"a split into {n_splits} stratified folds",
        fix=f"merge or drop these classes, or {fix}",
    )


def check_group_sizes(
    labels: Any, groups: Any | None, n_needed: int, *, context: str, fix: str
) -> None:
    """SplitError naming every class with fewer than ``n_needed`` patients.

    A stratified split needs a patient of each class in each fold, else some test sides
    miss the class; ``context`` names the split in the message, ``fix`` the way out.
    """
    frame = pd.DataFrame(
        {
            "y": pd.Series(np.asarray(labels)).astype(str),
            "g": np.arange(len(labels)) if groups is None else np.asarray(groups),
        }
    )
    patients = frame.groupby("y")["g"].nunique()
    samples = frame.groupby("y").size()
    small = patients[patients < n_needed]
    if len(small):
        detail = ", ".join(
            f"{c!r} ({int(samples[c])} samples, {int(patients[c])} patients)" for c in small.index
        )
        raise SplitError(
            f"{context} needs at least {n_needed} patients per class; too few in {detail}; {fix}"
        )


# --------------------------------------------------------------------------- splitters


def n_holdout_folds(fraction: float) -> int:
    """Patients per class a stratified grouped hold-out of ``fraction`` needs."""
    return _holdout_folds(fraction)[0]


def _holdout_folds(test_size: float) -> tuple[int, bool]:
    """Number of folds and whether one fold is the *train* side (test_size > 0.5)."""
    small_side = min(test_size, 1.0 - test_size)
    n_splits = max(2, round(1.0 / small_side))
    return n_splits, test_size > 0.5


def repeated_holdout(
    labels: Any | None,
    groups: Any | None,
    *,
    n_repeats: int = 5,
    test_size: float = 0.2,
    seeds: Sequence[int] | None = None,
    stratify: bool = True,
) -> list[Split]:
    """Patient-grouped train/test splits, one per seed, stratified by ``labels``.

    Stratified splits come from one fold of ``StratifiedGroupKFold`` with
    ``n_splits = round(1 / test_size)``, so the realised test fraction is about
    ``1 / n_splits`` (0.2 for 0.2; 0.33 for 0.3). For ``test_size > 0.5`` one
    fold becomes the train side instead. Which fold is used also depends on the
    seed, so repeats differ in more than the shuffle. ``seeds`` overrides
    ``n_repeats``; ``groups=None`` makes every sample its own patient.
    """
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    check_probability("test_size", test_size, hint="e.g. 0.2 for a 20% test set")
    if seeds is None:
        seeds = range(check_int("n_repeats", n_repeats, 1))
    seeds = [check_int("seed", s, 0) for s in seeds]
    if not seeds:
        raise ConfigError("seeds is empty; pass at least one seed or leave it None")
    y, names, g = _prepare(labels, groups, stratify=stratify)
    n = g.size
    n_splits, swap = _holdout_folds(float(test_size))
    _check_enough(y, names, g, n_splits, "raise test_size (fewer folds)")
    x = np.zeros((n, 1))
    out = []
    for seed in seeds:
        if stratify:
            cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            folds = [test for _, test in cv.split(x, y, groups=g)]
            pick = int(np.random.default_rng(seed).integers(n_splits))
            chosen = np.asarray(folds[pick], dtype=np.int64)
            rest = np.setdiff1d(np.arange(n), chosen)
            train, test = (chosen, rest) if swap else (rest, chosen)
        else:
            cv = GroupShuffleSplit(n_splits=1, test_size=float(test_size), random_state=seed)
            train, test = next(cv.split(x, groups=g))
        out.append(Split(train=train, test=test, seed=seed, name=f"holdout_seed{seed}"))
    logger.debug(
        "repeated_holdout: %d splits, mean test fraction %.3f",
        len(out),
        np.mean([s.test.size / n for s in out]),
    )
    return out


def grouped_kfold(
    labels: Any | None,
    groups: Any | None,
    *,
    k: int = 5,
    seed: int = 0,
    stratify: bool = True,
) -> list[Split]:
    """K patient-grouped folds whose test sides partition the samples (inner CV).

    Stratified by ``labels`` via ``StratifiedGroupKFold``; with
    ``stratify=False`` shuffled ``GroupKFold``.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    check_int("k", k, 2)
    seed = check_int("seed", seed, 0)
    y, names, g = _prepare(labels, groups, stratify=stratify)
    _check_enough(y, names, g, k, "lower k")
    x = np.zeros((g.size, 1))
    if stratify:
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        pairs = cv.split(x, y, groups=g)
    else:
        pairs = GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(x, groups=g)
    return [
        Split(train=tr, test=te, seed=seed, name=f"fold{i}") for i, (tr, te) in enumerate(pairs)
    ]


def leave_cohort_out(
    cohorts: Any,
    *,
    groups: Any | None = None,
    on_shared_patient: Literal["raise", "drop"] = "raise",
) -> list[Split]:
    """One split per cohort: test = that cohort, train = all other cohorts.

    A patient present in two cohorts would leak across the split. By default
    that is an error; ``on_shared_patient="drop"`` instead removes such a
    patient's samples from the *train* side whenever one of them is tested.
    """
    from sklearn.model_selection import LeaveOneGroupOut

    check_choice("on_shared_patient", on_shared_patient, ("raise", "drop"))
    coh = pd.Series(_as_1d(cohorts, "cohorts"))
    _check_no_missing(
        coh, "cohorts", "assign every sample a cohort or drop the samples without one"
    )
    coh = coh.astype(str)
    names = np.unique(coh.to_numpy())
    if names.size < 2:
        raise SplitError(
            f"leave-cohort-out needs at least 2 cohorts, got {names.tolist()}; use "
            "repeated_holdout for a single cohort"
        )
    g = _encode_groups(groups, None) if groups is not None else None
    if g is not None and len(g) != len(coh):
        raise SplitError(
            f"cohorts has {len(coh)} entries but groups has {len(g)}; pass one patient id per "
            "sample in the same order"
        )
    shared = _shared_patients(coh, g, groups) if g is not None else {}
    if shared and on_shared_patient == "raise":
        example = "; ".join(f"{p}: {c}" for p, c in list(shared.items())[:5])
        raise SplitError(
            f"{len(shared)} patient(s) appear in more than one cohort ({example}), which leaks "
            "across leave-cohort-out splits; assign each patient to one cohort, drop the extra "
            "samples, or pass on_shared_patient='drop'"
        )
    codes = coh.to_numpy()
    out = []
    for train, test in LeaveOneGroupOut().split(np.zeros((len(coh), 1)), groups=codes):
        name = str(codes[test[0]])
        if g is not None and shared:
            train = train[~np.isin(g[train], np.unique(g[test]))]
        out.append(Split(train=train, test=test, seed=None, name=name))
    return out


def _shared_patients(coh: pd.Series, g: np.ndarray, groups: Any) -> dict[str, list[str]]:
    frame = pd.DataFrame({"cohort": coh.to_numpy(), "g": g, "patient": _as_1d(groups, "groups")})
    per = frame.groupby("g")["cohort"].nunique()
    leaking = per[per > 1].index
    out = {}
    for code in leaking:
        rows = frame[frame["g"] == code]
        out[str(rows["patient"].iloc[0])] = sorted(rows["cohort"].unique().tolist())
    return out


def survival_strata(event: Any, time: Any | None = None, n_time_bins: int = 0) -> np.ndarray:
    """Stratification labels for survival data: the event, optionally x time bins.

    Stratifying on the event keeps the censoring fraction equal between train
    and test, which keeps C-index estimates comparable. Time bins are event-
    specific quantiles, because event and censoring times differ in
    distribution; each label reads ``"event=1|t0"``.
    """
    ev = pd.Series(_as_1d(event, "event"))
    _check_no_missing(ev, "event", "drop samples without a survival event before splitting")
    try:
        ev_num = pd.to_numeric(ev).astype(float)
    except (TypeError, ValueError) as exc:
        raise SplitError(f"event must be 0/1, got values {ev.unique()[:5].tolist()}") from exc
    if not ev_num.isin([0.0, 1.0]).all():
        raise SplitError(
            f"event must be 0/1 (1 = event observed), got {sorted(ev_num.unique())[:5]}; "
            "recode it, e.g. event = (status == 'Dead')"
        )
    ev_int = ev_num.astype(int).to_numpy()
    labels = np.array([f"event={e}" for e in ev_int], dtype=object)
    check_int("n_time_bins", n_time_bins, 0)
    if n_time_bins <= 1:
        return labels.astype(str)
    if time is None:
        raise ConfigError("n_time_bins > 1 needs survival times; pass time=")
    t = pd.Series(_as_1d(time, "time"))
    if len(t) != len(ev):
        raise SplitError(
            f"event has {len(ev)} entries but time has {len(t)}; pass one time per sample"
        )
    _check_no_missing(t, "time", "drop samples without a survival time before splitting")
    t = pd.to_numeric(t).astype(float)
    for e in (0, 1):
        sel = ev_int == e
        if sel.sum() == 0:
            continue
        bins = pd.qcut(
            t[sel].rank(method="first"), q=min(n_time_bins, int(sel.sum())), labels=False
        )
        labels[sel] = [f"event={e}|t{int(b)}" for b in bins]
    return labels.astype(str)


# --------------------------------------------------------------------------- fast paths


def _singletons(groups: np.ndarray) -> bool:
    return pd.Index(groups).is_unique


def _enough_per_class(strata: np.ndarray, k: int) -> bool:
    return bool(pd.Series(strata).value_counts().min() >= k)


def _stratified_folds(strata: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    from sklearn.model_selection import StratifiedKFold

    codes = pd.factorize(pd.Series(strata).astype(str))[0]
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [test for _, test in cv.split(np.zeros((codes.size, 1)), codes)]


def holdout_splits(
    strata: np.ndarray, groups: np.ndarray, *, seeds: Sequence[int], test_size: float
) -> list[Split]:
    """One stratified, patient-grouped train/test split per seed (:func:`repeated_holdout`'s
    recipe: one of ``round(1 / test_size)`` stratified folds, picked by the seed)."""
    k, swap = _holdout_folds(test_size)
    if not (_singletons(groups) and _enough_per_class(strata, k)):
        return repeated_holdout(strata, groups, seeds=seeds, test_size=test_size)
    n = len(strata)
    out = []
    for seed in seeds:
        folds = _stratified_folds(strata, k, seed)
        chosen = folds[int(np.random.default_rng(seed).integers(k))]
        rest = np.setdiff1d(np.arange(n), chosen)
        train, test = (chosen, rest) if swap else (rest, chosen)
        out.append(Split(train=train, test=test, seed=seed, name=f"holdout_seed{seed}"))
    return out


def inner_folds(strata: np.ndarray, groups: np.ndarray, *, k: int, seed: int) -> list[Split]:
    """k patient-grouped folds, stratified when every class has k patients, else unstratified."""
    if _singletons(groups) and _enough_per_class(strata, k):
        n = len(strata)
        return [
            Split(train=np.setdiff1d(np.arange(n), test), test=test, seed=seed, name=f"fold{i}")
            for i, test in enumerate(_stratified_folds(strata, k, seed))
        ]
    try:
        return grouped_kfold(strata, groups, k=k, seed=seed)
    except SplitError:
        return grouped_kfold(None, groups, k=k, seed=seed, stratify=False)


# --------------------------------------------------------------------------- AnnData


def _obs_column(adata: ad.AnnData, col: str, role: str) -> pd.Series:
    if col not in adata.obs.columns:
        raise ConfigError(
            f"{role} column {col!r} is not in adata.obs (columns: {list(adata.obs.columns)}); "
            "pass the name of an existing column"
        )
    return adata.obs[col]


def splits_from_adata(
    adata: ad.AnnData,
    *,
    label: str | None = None,
    by: str | None = keys.PATIENT,
    kind: Literal["holdout", "kfold", "cohort"] = "holdout",
    cohort_key: str = keys.COHORT,
    n_time_bins: int = 0,
    **kw: Any,
) -> list[Split]:
    """Splits of ``adata`` built from obs columns.

    ``label`` names the stratification column; ``label="survival"`` stratifies
    by ``survival_event`` (and ``n_time_bins`` bins of ``survival_time``).
    ``label=None`` means unstratified. ``by`` names the patient column
    (``None``: every sample its own patient). ``kind`` picks
    :func:`repeated_holdout`, :func:`grouped_kfold` or :func:`leave_cohort_out`;
    other keywords go to that function.
    """
    check_choice("kind", kind, ("holdout", "kfold", "cohort"))
    groups = None if by is None else _obs_column(adata, by, "patient").astype(str).to_numpy()
    if kind == "cohort":
        cohorts = _obs_column(adata, cohort_key, "cohort").to_numpy()
        return leave_cohort_out(cohorts, groups=groups, **kw)
    if label is None:
        labels = None
        kw.setdefault("stratify", False)
    elif label == "survival":
        event = _obs_column(adata, keys.SURVIVAL_EVENT, "survival event")
        time = adata.obs.get(keys.SURVIVAL_TIME)
        labels = survival_strata(event.to_numpy(), time, n_time_bins)
    else:
        labels = _obs_column(adata, label, "label").to_numpy()
    if kind == "holdout":
        return repeated_holdout(labels, groups, **kw)
    return grouped_kfold(labels, groups, **kw)
