from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bulkfm.data.splits import (
    Split,
    grouped_kfold,
    holdout_splits,
    inner_folds,
    leave_cohort_out,
    repeated_holdout,
    splits_from_adata,
    survival_strata,
)
from bulkfm.errors import ConfigError, SplitError


def _toy(n_patients: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patients with 1-3 samples each; labels mostly per patient, a few mixed."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, size=n_patients)
    patients = np.repeat([f"P{i:03d}" for i in range(n_patients)], per)
    patient_label = rng.choice(["a", "b", "c"], size=n_patients, p=[0.55, 0.3, 0.15])
    labels = np.repeat(patient_label, per)
    flip = rng.random(labels.size) < 0.05
    labels[flip] = "a"
    cohorts = np.repeat(rng.choice(["X", "Y", "Z"], size=n_patients), per)
    return labels, patients, cohorts


def _leaked(split: Split, groups: np.ndarray) -> set:
    return set(groups[split.train]) & set(groups[split.test])


# ------------------------------------------------------------------------- holdout


@pytest.mark.parametrize("test_size", [0.2, 0.25, 0.5, 0.7])
def test_holdout_never_puts_a_patient_on_both_sides(test_size: float) -> None:
    for data_seed in range(2):
        labels, groups, _ = _toy(seed=data_seed)
        for split in repeated_holdout(labels, groups, seeds=range(10), test_size=test_size):
            assert not _leaked(split, groups)
            assert split.train.size + split.test.size == labels.size
            assert np.union1d(split.train, split.test).size == labels.size


def test_holdout_unstratified_never_leaks_and_needs_no_labels() -> None:
    _, groups, _ = _toy()
    splits = repeated_holdout(None, groups, seeds=range(20), stratify=False)
    for split in splits:
        assert not _leaked(split, groups)
    fractions = [s.test.size / groups.size for s in splits]
    assert abs(np.mean(fractions) - 0.2) < 0.04


def test_holdout_keeps_class_proportions() -> None:
    labels, groups, _ = _toy(n_patients=300)
    overall = pd.Series(labels).value_counts(normalize=True)
    for split in repeated_holdout(labels, groups, n_repeats=5):
        test = pd.Series(labels[split.test]).value_counts(normalize=True)
        assert (test.reindex(overall.index) - overall).abs().max() < 0.04


def test_holdout_test_fraction_close_to_test_size() -> None:
    labels, groups, _ = _toy(n_patients=300)
    for size, expected in [(0.2, 0.2), (0.25, 0.25), (0.75, 0.75)]:
        for split in repeated_holdout(labels, groups, test_size=size, n_repeats=3):
            assert abs(split.test.size / labels.size - expected) < 0.03


def test_holdout_is_deterministic_per_seed_and_seeds_differ() -> None:
    labels, groups, _ = _toy()
    first = repeated_holdout(labels, groups, seeds=[3, 4])
    again = repeated_holdout(labels, groups, seeds=[3, 4])
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.test, b.test) and np.array_equal(a.train, b.train)
        assert a.seed == b.seed and a.name == b.name
    assert not np.array_equal(first[0].test, first[1].test)
    assert [s.seed for s in repeated_holdout(labels, groups, n_repeats=4)] == [0, 1, 2, 3]


def test_holdout_without_groups_treats_each_sample_as_patient() -> None:
    labels = np.array(["a"] * 60 + ["b"] * 40)
    split = repeated_holdout(labels, None, n_repeats=1)[0]
    assert split.test.size == 20
    assert (labels[split.test] == "b").sum() == 8


def test_holdout_accepts_float_event_labels() -> None:
    # A 0.0/1.0 event stored as float must stratify like a class label.
    events = np.array([0.0, 1.0] * 50)
    split = repeated_holdout(events, None, n_repeats=1)[0]
    assert events[split.test].mean() == pytest.approx(0.5)


# ------------------------------------------------------------------------- k-fold


@pytest.mark.parametrize("stratify", [True, False])
def test_grouped_kfold_partitions_data_without_leaks(stratify: bool) -> None:
    labels, groups, _ = _toy()
    for seed in range(10):
        folds = grouped_kfold(
            labels if stratify else None, groups, k=4, seed=seed, stratify=stratify
        )
        assert [f.name for f in folds] == ["fold0", "fold1", "fold2", "fold3"]
        tests = np.concatenate([f.test for f in folds])
        assert np.array_equal(np.sort(tests), np.arange(labels.size))  # each sample tested once
        for fold in folds:
            assert not _leaked(fold, groups)
            assert np.array_equal(np.setdiff1d(np.arange(labels.size), fold.test), fold.train)


def test_grouped_kfold_stratifies() -> None:
    labels, groups, _ = _toy(n_patients=300)
    overall = (labels == "c").mean()
    for fold in grouped_kfold(labels, groups, k=5, seed=1):
        assert abs((labels[fold.test] == "c").mean() - overall) < 0.04


def test_grouped_kfold_seed_changes_folds() -> None:
    labels, groups, _ = _toy()
    a = grouped_kfold(labels, groups, k=3, seed=0)
    b = grouped_kfold(labels, groups, k=3, seed=1)
    c = grouped_kfold(labels, groups, k=3, seed=0)
    assert not np.array_equal(a[0].test, b[0].test)
    assert all(np.array_equal(x.test, y.test) for x, y in zip(a, c, strict=True))


# ------------------------------------------------------------------------- cohorts


def test_leave_cohort_out_one_split_per_cohort() -> None:
    cohorts = np.array(["B", "A", "C", "A", "B", "C", "C"])
    splits = leave_cohort_out(cohorts)
    assert [s.name for s in splits] == ["A", "B", "C"]
    for split in splits:
        assert set(cohorts[split.test]) == {split.name}
        assert split.name not in set(cohorts[split.train])
        assert split.train.size + split.test.size == cohorts.size


def test_leave_cohort_out_drop_removes_shared_patient_from_train() -> None:
    cohorts = np.array(["A", "A", "B", "B", "C"])
    groups = np.array(["p1", "p2", "p1", "p3", "p4"])  # p1 is in A and B
    splits = {s.name: s for s in leave_cohort_out(cohorts, groups=groups, on_shared_patient="drop")}
    for split in splits.values():
        assert not _leaked(split, groups)
    assert 0 not in splits["B"].train and 2 not in splits["A"].train
    assert set(splits["C"].train) == {0, 1, 2, 3}  # p1 is not tested in C: both kept


# ------------------------------------------------------------------------- survival strata


def test_survival_strata_event_only() -> None:
    assert survival_strata([1, 0, 1.0]).tolist() == ["event=1", "event=0", "event=1"]


def test_survival_strata_time_bins_are_event_specific_quantiles() -> None:
    rng = np.random.default_rng(0)
    event = rng.integers(0, 2, 200)
    time = rng.exponential(500, 200) + 1000 * event  # events later than censored
    strata = survival_strata(event, time, n_time_bins=2)
    for e in (0, 1):
        sel = event == e
        median = np.median(time[sel])
        early = strata[sel] == f"event={e}|t0"
        assert abs(early.mean() - 0.5) < 0.02
        assert (time[sel][early] <= median).all()


def test_survival_strata_used_for_holdout_balances_events() -> None:
    rng = np.random.default_rng(1)
    event = (rng.random(300) < 0.3).astype(int)
    time = rng.exponential(800, 300)
    strata = survival_strata(event, time, n_time_bins=3)
    for split in repeated_holdout(strata, None, n_repeats=3):
        assert abs(event[split.test].mean() - event.mean()) < 0.03


# ------------------------------------------------------------------------- Split object


def test_split_masks_and_dict() -> None:
    split = Split(train=[3, 0], test=np.array([1]), seed=2, name="s")
    train, test = split.as_masks(5)
    assert train.tolist() == [True, False, False, True, False]
    assert test.tolist() == [False, True, False, False, False]
    assert split.to_dict() == {"name": "s", "seed": 2, "train": [0, 3], "test": [1]}
    with pytest.raises(ValueError):
        split.train[0] = 1  # read-only: a checked split cannot be altered


# ------------------------------------------------------------------------- AnnData


def _adata() -> ad.AnnData:
    labels, groups, cohorts = _toy()
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {
            "patient": groups,
            "label": labels,
            "cohort": cohorts,
            "survival_event": rng.integers(0, 2, labels.size),
            "survival_time": rng.exponential(900, labels.size),
        },
        index=[f"s{i}" for i in range(labels.size)],
    )
    return ad.AnnData(X=np.zeros((labels.size, 2), dtype=np.float32), obs=obs)


def test_splits_from_adata_holdout_and_kfold() -> None:
    adata = _adata()
    groups = adata.obs["patient"].to_numpy()
    holdout = splits_from_adata(adata, label="label", n_repeats=2)
    expected = repeated_holdout(adata.obs["label"].to_numpy(), groups, n_repeats=2)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(holdout, expected, strict=True))
    folds = splits_from_adata(adata, label="survival", kind="kfold", k=3, n_time_bins=2)
    assert len(folds) == 3 and all(not _leaked(f, groups) for f in folds)
    unstratified = splits_from_adata(adata, n_repeats=1)
    assert not _leaked(unstratified[0], groups)


def test_splits_from_adata_cohort_raises_on_shared_patients_and_drops_on_request() -> None:
    adata = _adata()
    adata.obs.iloc[0, adata.obs.columns.get_loc("cohort")] = "W"  # its patient now spans cohorts
    adata.obs.iloc[1, adata.obs.columns.get_loc("patient")] = adata.obs["patient"].iloc[0]
    with pytest.raises(SplitError, match="more than one cohort"):
        splits_from_adata(adata, kind="cohort")
    splits = splits_from_adata(adata, kind="cohort", on_shared_patient="drop")
    assert sorted(s.name for s in splits) == ["W", "X", "Y", "Z"]


# ------------------------------------------------------------------------- bad input


def test_error_labels_groups_length_mismatch() -> None:
    with pytest.raises(SplitError, match="labels has 4 entries but groups has 3"):
        repeated_holdout(["a", "b", "a", "b"], ["p1", "p2", "p3"])


def test_error_nan_labels() -> None:
    with pytest.raises(SplitError, match="labels has 5 missing"):
        grouped_kfold(["a", None, "b", "a"] * 5, None, k=2)


def test_error_nan_groups() -> None:
    with pytest.raises(SplitError, match=r"patient ids.*missing"):
        grouped_kfold(["a", "b"] * 5, ["p"] * 9 + [np.nan], k=2, stratify=False)


def test_error_small_class_names_class_counts_and_fix() -> None:
    labels = np.array(["big"] * 50 + ["rare"] * 3)
    with pytest.raises(
        SplitError, match=r"'rare' \(3 samples, 3 patients\).*merge or drop.*lower k"
    ):
        grouped_kfold(labels, None, k=5)


def test_error_class_with_enough_samples_but_too_few_patients() -> None:
    labels = np.array(["big"] * 50 + ["rare"] * 10)
    groups = np.array([f"p{i}" for i in range(50)] + ["q1"] * 5 + ["q2"] * 5)
    with pytest.raises(SplitError, match=r"'rare' \(10 samples, 2 patients\).*raise test_size"):
        repeated_holdout(labels, groups)


def test_error_fewer_patients_than_folds() -> None:
    with pytest.raises(SplitError, match="only 3 patient"):
        grouped_kfold(None, ["a", "b", "c", "a"], k=4, stratify=False)


@pytest.mark.parametrize("size", [0.0, 1.0, 1.5, -0.2])
def test_error_test_size_outside_unit_interval(size: float) -> None:
    with pytest.raises(ConfigError, match=r"test_size must lie in \(0, 1\)"):
        repeated_holdout(["a", "b"] * 20, None, test_size=size)


def test_error_k_below_two() -> None:
    with pytest.raises(ConfigError, match="k must be an integer >= 2"):
        grouped_kfold(["a", "b"] * 5, None, k=1)


def test_error_n_repeats_zero() -> None:
    with pytest.raises(ConfigError, match="n_repeats must be a positive integer"):
        repeated_holdout(["a", "b"] * 20, None, n_repeats=0)


def test_error_negative_seed() -> None:
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        repeated_holdout(["a", "b"] * 20, None, seeds=[-1])


def test_error_stratify_without_labels() -> None:
    with pytest.raises(SplitError, match="stratify=True needs labels"):
        repeated_holdout(None, ["p1", "p2"] * 10)


def test_error_single_cohort() -> None:
    with pytest.raises(SplitError, match="at least 2 cohorts"):
        leave_cohort_out(["A", "A", "A"])


def test_error_patient_spans_cohorts() -> None:
    with pytest.raises(SplitError, match=r"1 patient\(s\) appear in more than one cohort.*p1"):
        leave_cohort_out(["A", "B", "B"], groups=["p1", "p1", "p2"])


def test_error_missing_cohort() -> None:
    with pytest.raises(SplitError, match="cohorts has 1 missing"):
        leave_cohort_out(["A", None, "B"])


def test_error_bad_event_values() -> None:
    with pytest.raises(SplitError, match="event must be 0/1"):
        survival_strata([0, 1, 2])


def test_error_time_bins_without_time() -> None:
    with pytest.raises(ConfigError, match="needs survival times"):
        survival_strata([0, 1], n_time_bins=3)


def test_error_unknown_obs_column() -> None:
    with pytest.raises(ConfigError, match=r"label column 'subtype' is not in adata\.obs"):
        splits_from_adata(_adata(), label="subtype")


def test_error_unknown_kind() -> None:
    with pytest.raises(ConfigError, match="kind must be"):
        splits_from_adata(_adata(), kind="bootstrap")


def test_error_mask_length_too_small() -> None:
    with pytest.raises(SplitError, match="refers to position 9 but n=5"):
        Split(train=[0, 9], test=[1]).as_masks(5)


def test_error_overlapping_split() -> None:
    with pytest.raises(SplitError, match="both train and test"):
        Split(train=[0, 1], test=[1, 2])


# --------------------------------------------------------------------------- fast paths
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
    with pytest.raises(SplitError, match="5 stratified folds needs at least 5 patients per class"):
        holdout_splits(y, groups, seeds=[0], test_size=0.2)
