"""Which samples the evaluation uses, and counts of what it left out that add up."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bulkfm import schema as keys
from bulkfm.data.splits import repeated_holdout
from bulkfm.errors import BulkfmWarning
from bulkfm.evaluate.config import DataSection, EvaluateConfig
from bulkfm.evaluate.results import Exclusions
from bulkfm.evaluate.selection import (
    event_counts,
    select_samples,
    survival_data,
    survival_exclusion_reasons,
    task_data,
)
from bulkfm.tasks import TaskData


def _adata(obs: dict) -> ad.AnnData:
    n = len(next(iter(obs.values())))
    frame = pd.DataFrame(obs, index=[f"s{i}" for i in range(n)])
    return ad.AnnData(X=np.ones((n, 3), dtype=np.float32), obs=frame)


def test_a_sample_lacking_time_and_event_counts_once():
    """The report once read "2+2+2" for 4 samples: overlapping reasons counted twice."""
    time = np.array([np.nan, np.nan, 0.0, -3.0, 10.0, 5.0], dtype=object)
    event = np.array([np.nan, np.nan, np.nan, 1.0, np.nan, 0.0], dtype=object)
    reasons = survival_exclusion_reasons(time, event)
    assert reasons == {
        "missing or infinite time": 2,
        "time <= 0": 2,
        "usable time but missing event": 1,
    }
    assert sum(reasons.values()) == 5  # naive: every sample but the last is excluded


def test_survival_exclusion_records_a_partition():
    adata = _adata(
        {
            keys.COHORT: ["A"] * 6,
            keys.SURVIVAL_TIME: [np.nan, np.nan, 0.0, 4.0, 10.0, 5.0],
            keys.SURVIVAL_EVENT: [np.nan, np.nan, np.nan, np.nan, 1.0, 0.0],
        }
    )
    cfg = EvaluateConfig.from_dict({"model": {"path": "m"}, "data": {"group_key": None}})
    record = Exclusions()
    parts = "2 missing/infinite time, 1 time <= 0, 1 usable time but missing event"
    with pytest.warns(BulkfmWarning, match=f"left out 4 of 6 .*: {parts}"):
        sd = survival_data(cfg, task_data(adata, cfg.data), record)
    assert sd.n == 2
    surv = record.survival
    assert surv is not None and surv.n_excluded == 4
    assert surv.ids == ["s0", "s1", "s2", "s3"]
    assert surv.by_reason == {
        "missing or infinite time": 2,
        "time <= 0": 1,
        "usable time but missing event": 1,
    }


def test_selection_steps_partition_what_was_left_out():
    adata = _adata(
        {
            keys.SAMPLE_TYPE: ["tumor", "tumor", "tumor", "normal", "tumor", "tumor", "tumor"],
            keys.SAMPLE_ID: ["a", "a", "b", "c", "c", "d", "e"],
            keys.COHORT: ["X", "X", "Y", "X", "Y", None, "Y"],
        }
    )
    data = DataSection(select={keys.SAMPLE_TYPE: "tumor"})
    record = Exclusions()
    with pytest.warns(BulkfmWarning, match="1 selected samples have no"):
        kept = select_samples(adata, data, record)
    assert list(kept.obs_names) == ["s0", "s2", "s4", "s6"]
    # naive: 1 normal, 1 duplicate "a" (s1; "c" is duplicated only with the normal), 1 unlabelled
    assert record.steps() == [
        ("not matching data.select {'sample_type': 'tumor'}", 1),
        ("duplicates of sample_id (the first kept)", 1),
        ("without a label", 1),
    ]
    assert record.accounted(adata.n_obs, kept.n_obs)
    assert not record.accounted(adata.n_obs, kept.n_obs - 1)


def test_event_counts_match_a_direct_count_and_warn_once_per_message():
    rng = np.random.default_rng(0)
    n = 60
    cohorts = np.repeat(["A", "B", "C"], 20)
    event = (rng.random(n) < np.where(cohorts == "C", 0.1, 0.7)).astype(int)
    sd = TaskData.from_survival(
        rng.uniform(1, 100, n), event, ids=[f"s{i}" for i in range(n)], cohorts=cohorts
    )
    splits = repeated_holdout(sd.strata, sd.groups, seeds=range(3), test_size=0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = event_counts(sd, splits, threshold=5, what="survival")
    for i, s in enumerate(splits):
        assert counts.per_split[i] == sum(event[j] for j in s.test)
        for c in "ABC":
            assert counts.per_cohort[c][i] == sum(event[j] for j in s.test if cohorts[j] == c)
    low = [c for c in "ABC" if min(counts.per_cohort[c]) < 5]
    assert "C" in low
    assert len(counts.few) == 1 and all(f"{c} " in counts.few[0] for c in low)
    assert [str(w.message) for w in caught] == counts.few
    silent = event_counts(sd, splits, threshold=0, what="survival")
    assert silent.few == []
