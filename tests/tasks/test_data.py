from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bulkfm.data.splits import survival_strata
from bulkfm.errors import ConfigError, SplitError
from bulkfm.tasks import TaskData, TaskSpec, prepare_task
from tests.tasks.rules import Rules


def _obs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient": ["P0", "P0", "P1", None, "P3", "P4"],
            "cohort": ["A", "A", "B", "B", "A", "B"],
            "mut_TP53": pd.array([1, 1, 0, 1, 0, None], dtype="Int8"),
            "survival_time": [10.0, 10.0, 0.0, 5.0, 7.0, 3.0],
            "survival_event": [1, 1, 0, 1, 0, 1],
        },
        index=[f"S{i}" for i in range(6)],
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
    assert td.ids.tolist() == ["S0", "S1", "S3", "S4", "S5"]
    np.testing.assert_array_equal(td.time, [10.0, 10.0, 5.0, 7.0, 3.0])
    np.testing.assert_array_equal(td.event, [1, 1, 1, 0, 1])
    assert td.cohort_labels.tolist() == ["A", "A", "B", "A", "B"]
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
