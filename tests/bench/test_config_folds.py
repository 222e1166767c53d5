from __future__ import annotations

import numpy as np
import pytest

from bulkfm.bench.config import BenchConfig
from bulkfm.bench.folds import holdout_splits, inner_folds
from bulkfm.errors import ConfigError, SplitError


def test_config_round_trip_and_seeds() -> None:
    config = BenchConfig(seeds=(3, 5, 8), c_grid=[0.1, 1])
    assert config.n_splits == 3 and config.split_seeds() == (3, 5, 8)
    assert BenchConfig.from_dict(config.to_dict()) == config
    assert config.probe_config().c_grid == (0.1, 1.0)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("n_splits", 0, "n_splits must be an integer >= 1"),
        ("test_size", 1.5, "test_size must be between 0 and 1"),
        ("ci_method", "bca", "ci_method must be one of"),
        ("min_events", True, "min_events must be an integer"),
        ("cox_alpha_grid", (0.0,), "cox_alpha_grid must be a non-empty list of positive"),
        ("inner_folds", 1, "inner_folds must be an integer >= 2"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BenchConfig(**{field: value})


def test_config_unknown_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown benchmark setting\(s\) \['splits'\]"):
        BenchConfig.from_dict({"splits": 3})


def test_holdout_singletons_are_stratified() -> None:
    y = np.array([0] * 150 + [1] * 50)
    groups = np.array([f"P{i}" for i in range(200)])
    splits = holdout_splits(y, groups, seeds=range(4), test_size=0.2)
    for s in splits:
        assert s.test.size == 40 and np.intersect1d(s.train, s.test).size == 0
        assert y[s.test].sum() == 10  # exactly the class ratio
    assert not np.array_equal(splits[0].test, splits[1].test)


def test_holdout_with_repeated_patients_keeps_patients_together() -> None:
    rng = np.random.default_rng(0)
    groups = np.array([f"P{i // 2}" for i in range(200)])  # two samples per patient
    y = np.repeat(rng.integers(0, 2, 100), 2)
    for s in holdout_splits(y, groups, seeds=range(3), test_size=0.2):
        assert not set(groups[s.train]) & set(groups[s.test])


def test_inner_folds_partition_and_group() -> None:
    groups = np.array([f"P{i // 2}" for i in range(90)] + [f"Q{i}" for i in range(30)])
    y = np.arange(120) % 2
    folds = inner_folds(y, groups, k=3, seed=1)
    np.testing.assert_array_equal(np.sort(np.concatenate([f.test for f in folds])), np.arange(120))
    for f in folds:
        assert not set(groups[f.train]) & set(groups[f.test])


def test_holdout_too_small_class_is_an_error() -> None:
    y = np.array([0] * 50 + [1] * 2)
    groups = np.arange(52).astype(str)
    with pytest.raises(SplitError, match="fewer patients than the 5 folds"):
        holdout_splits(y, groups, seeds=[0], test_size=0.2)
