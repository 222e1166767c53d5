from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bulkfm.data.splits import survival_strata
from bulkfm.errors import ConfigError, SplitError
from bulkfm.tasks import TaskData, TaskSpec, prepare_task
from bulkfm.tasks.data import select_tasks
from tests.tasks.rules import Rules


def _obs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient": ["P0", "P0", "P1", None, "P3", "P4", "P5"],
            "cohort": ["A", "A", "B", "B", "A", "B", "A"],
            "mut_TP53": pd.array([1, 1, 0, 1, 0, None, None], dtype="Int8"),
            "survival_time": [10.0, 10.0, 0.0, 5.0, 7.0, 3.0, 4.0],
            "survival_event": [1, 1, 0, 1, 0, 1, 0],
        },
        index=[f"S{i}" for i in range(7)],
    )


def test_prepare_counts_patients_and_keeps_ids_and_positions() -> None:
    td = prepare_task(_obs(), TaskSpec("mutation", gene="TP53"), Rules())
    np.testing.assert_array_equal(td.index, [0, 1, 2, 3, 4])
    assert td.ids.tolist() == ["S0", "S1", "S2", "S3", "S4"]
    assert td.groups.tolist() == ["P0", "P0", "P1", "S3", "P3"]  # no patient id: own patient
    assert td.info["n_positive_patients"] == 2 and td.info["n_negative_patients"] == 2
    assert td.labels.tolist() == ["mutated", "mutated", "wild_type", "mutated", "wild_type"]
    with pytest.raises(SplitError, match="2 mutated and 2 wild-type patients"):
        prepare_task(_obs(), TaskSpec("mutation", gene="TP53"), Rules(min_positives=3))


def test_prepare_survival_leaves_out_non_positive_times() -> None:
    td = prepare_task(_obs(), TaskSpec("survival"), Rules())
    assert td.ids.tolist() == ["S0", "S1", "S3", "S4", "S5", "S6"]
    np.testing.assert_array_equal(td.time, [10.0, 10.0, 5.0, 7.0, 3.0, 4.0])
    np.testing.assert_array_equal(td.event, [1, 1, 1, 0, 1, 0])
    assert td.cohort_labels.tolist() == ["A", "A", "B", "A", "B", "A"]
    with pytest.raises(ConfigError, match="survival tasks only"):
        _ = prepare_task(_obs(), TaskSpec("cancer_type"), Rules()).time


def test_from_labels_and_subset_keep_rows_aligned(sim) -> None:
    labels = sim.obs["cohort"].astype(str).to_numpy()
    patients = sim.obs["patient"].to_numpy(dtype=object).copy()
    patients[0] = None
    td = TaskData.from_labels(labels, ids=sim.obs_names, groups=patients, adata=sim)
    assert td.classes == sorted(set(labels)) and td.task is None
    np.testing.assert_array_equal(td.labels, labels)
    assert td.groups[0] == sim.obs_names[0]  # missing patient id: the sample is its own
    keep = labels != labels[0]
    sub = td.subset(keep)
    np.testing.assert_array_equal(sub.ids, sim.obs_names[keep])
    np.testing.assert_array_equal(sub.rows().obs_names, sub.ids)
    np.testing.assert_array_equal(sub.labels, labels[keep])
    np.testing.assert_array_equal(sub.rows(sim).obs_names, sub.ids)  # by position
    positions = np.array([5, 2, 9])
    np.testing.assert_array_equal(td.subset(positions).rows().obs_names, sim.obs_names[positions])
    with pytest.raises(ConfigError, match="without a TaskSpec"):
        _ = td.spec


def test_from_survival_strata_default_to_the_event() -> None:
    td = TaskData.from_survival(
        [5.0, 3.0, 8.0], [1, 0, 1], ids=["a", "b", "c"], cohorts=list("XYX")
    )
    np.testing.assert_array_equal(td.strata, survival_strata([1, 0, 1]))
    assert td.groups.tolist() == ["a", "b", "c"]
    assert td.subset(np.array([True, False, True])).event.tolist() == [1, 1]
    with pytest.raises(ConfigError, match="one value per row"):
        TaskData.from_survival([5.0, 3.0], [1, 0], ids=["a", "b"], cohorts="XY")
    with pytest.raises(ConfigError, match="not class labels"):
        _ = td.labels


def test_feasibility_counts_what_the_splits_need() -> None:
    """A survival task needs censored patients too: the splits are stratified by event."""
    obs = _obs()
    obs.loc["S6", "survival_event"] = 1  # one censored patient (P3) left
    with pytest.raises(SplitError, match=r"'survival' has 4 patients with an event and 1 censored"):
        prepare_task(obs, TaskSpec("survival"), Rules())
    # 2 mutated / 2 wild-type patients pass min 2 but not the 5 folds of test_size 0.2
    with pytest.raises(SplitError, match=r"at least 5 and 5 are needed .*--test-size 0\.2"):
        prepare_task(_obs(), TaskSpec("mutation", gene="TP53"), Rules(test_size=0.2))
    # a cancer type below the split's need is left out like one below min_class_patients
    td = prepare_task(_obs(), TaskSpec("cancer_type"), Rules(test_size=0.5))
    assert td.classes == ["A", "B"]
    with pytest.raises(SplitError, match=r"no class with >= 4 patients"):
        prepare_task(_obs(), TaskSpec("cancer_type"), Rules(test_size=0.25))


def test_wildcard_skips_an_infeasible_task_and_a_named_one_fails() -> None:
    obs = _obs()
    obs.loc["S6", "survival_event"] = 1
    selection, _ = select_tasks(obs, ["survival@*"], Rules())
    assert selection.tasks == [] and set(selection.skipped) == {"survival@A", "survival@B"}
    assert "censored" in selection.skipped["survival@A"]
    with pytest.raises(SplitError, match=r"task 'survival@A' has 2 patients with an event and 1"):
        select_tasks(obs, ["survival@A"], Rules())


def test_survival_with_unknown_times_says_so_apart_from_censoring() -> None:
    """NaN survival times are not 'censored': the error counts and names them (issue 13)."""
    obs = _obs()
    obs["survival_time"] = np.nan
    with pytest.raises(
        SplitError,
        match=r"0 patients with an event.*7 of 7 samples have no survival_time \(NaN\).*"
        r"\['S0', 'S1', 'S2'\].*--survival",
    ):
        prepare_task(obs, TaskSpec("survival"), Rules())
