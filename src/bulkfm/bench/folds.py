"""Patient-grouped splits for the benchmark, with a fast path for one sample per patient.

The benchmark makes ~10^3 stratified grouped splits per model (10 outer splits per
task, k inner folds per outer split). scikit-learn's ``StratifiedGroupKFold``,
behind :mod:`bulkfm.data.splits`, assigns groups one by one in Python and takes
~0.2-0.3 s for 1,000 patients, which alone would exceed the benchmark's time
budget. When every patient contributes exactly one row, grouping is a no-op and
``StratifiedKFold`` gives the same guarantees (each patient on one side, classes
balanced) in milliseconds; otherwise (any patient with several samples) the
functions of :mod:`bulkfm.data.splits` are used unchanged. Outer hold-outs follow
``repeated_holdout``'s recipe: one of ``round(1 / test_size)`` stratified folds,
picked by the seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bulkfm.data.splits import Split, grouped_kfold, repeated_holdout
from bulkfm.errors import SplitError

__all__ = ["holdout_splits", "inner_folds"]


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
    """One stratified, patient-grouped train/test split per seed."""
    k = max(2, round(1.0 / min(test_size, 1.0 - test_size)))
    if not (_singletons(groups) and _enough_per_class(strata, k)):
        return repeated_holdout(strata, groups, seeds=seeds, test_size=test_size)
    n = len(strata)
    out = []
    for seed in seeds:
        folds = _stratified_folds(strata, k, seed)
        chosen = folds[int(np.random.default_rng(seed).integers(k))]
        rest = np.setdiff1d(np.arange(n), chosen)
        train, test = (chosen, rest) if test_size > 0.5 else (rest, chosen)
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
