from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bulkfm.bench.config import BenchConfig, BenchFile
from bulkfm.bench.selection import bench_obs, default_tasks, file_tasks, parse_tasks
from bulkfm.errors import ConfigError, SplitError
from bulkfm.tasks import TaskSpec, prepare_task


def _adata(obs: pd.DataFrame) -> ad.AnnData:
    return ad.AnnData(X=np.ones((len(obs), 2), dtype=np.float32), obs=obs)


def _obs(n_pos_patients: int, n_neg: int, *, dup_positive: bool) -> pd.DataFrame:
    """Tumours of one cohort; optionally the first positive patient has two samples."""
    pats = [f"P{i}" for i in range(n_pos_patients + n_neg)]
    mut = [1] * n_pos_patients + [0] * n_neg
    if dup_positive:
        pats.append(pats[0])
        mut.append(1)
    return pd.DataFrame(
        {
            "patient": pats,
            "cohort": "A",
            "sample_type": "tumor",
            "mut_TP53": pd.array(mut, dtype="Int8"),
        },
        index=[f"S{i}" for i in range(len(pats))],
    )


def test_feasibility_counts_patients_not_samples() -> None:
    config = BenchConfig(min_positives=5, min_negatives=5)
    short = _adata(_obs(4, 10, dup_positive=True))  # 5 positive samples, 4 patients
    with pytest.raises(SplitError, match="4 mutated and 10 wild-type patients"):
        parse_tasks(short, "mutation:TP53", config)
    enough = _adata(_obs(5, 10, dup_positive=False))
    assert parse_tasks(enough, "mutation:TP53", config).names == ["mutation:TP53"]


def test_default_tasks_on_simulation(sim, small_config) -> None:
    sel = default_tasks(sim, small_config)
    assert sel.names[0] == "cancer_type"
    assert {"mutation:TP53", "mutation:KRAS", "survival"} <= set(sel.names)
    cohorts = sorted(sim.obs["cohort"].astype(str).unique())
    expected = {"cancer_type", "survival"} | {f"survival@{c}" for c in cohorts}
    expected |= {f"mutation:{g}" for g in ("TP53", "KRAS")}
    expected |= {f"mutation:{g}@{c}" for g in ("TP53", "KRAS") for c in cohorts}
    assert set(sel.names) | set(sel.skipped) == expected
    assert not set(sel.names) & set(sel.skipped)
    # every kept task really is feasible, every skipped one says why with its counts
    obs = bench_obs(sim, small_config)
    for name, reason in sel.skipped.items():
        assert "needed" in reason, name
    for task in sel.tasks:
        assert prepare_task(obs, task, small_config).index.size > 0


def test_default_tasks_skip_against_an_independent_count(sim, small_config) -> None:
    config = dataclasses.replace(small_config, min_positives=15)
    sel = default_tasks(sim, config, genes=["KRAS"], within_cohort=True)
    obs = sim.obs[sim.obs["sample_type"] == "tumor"]
    for cohort, part in obs.groupby("cohort", observed=True):
        mutated = part.loc[part["mut_KRAS"] == 1, "patient"].nunique()
        wild = part.loc[part["mut_KRAS"] == 0, "patient"].nunique()
        name = f"mutation:KRAS@{cohort}"
        assert (name in sel.names) == (mutated >= 15 and wild >= 8), name


def test_wildcard_skips_but_explicit_task_raises(sim, small_config) -> None:
    config = dataclasses.replace(small_config, min_events=10_000)
    sel = parse_tasks(sim, "cancer_type,survival@*", config)
    assert sel.names == ["cancer_type"]
    assert all(k.startswith("survival@") for k in sel.skipped)
    with pytest.raises(SplitError, match="patients with an event"):
        parse_tasks(sim, "survival", config)


def test_task_with_one_class_is_an_error(sim, small_config) -> None:
    one = sim[sim.obs["cohort"] == sim.obs["cohort"].iloc[0]].copy()
    with pytest.raises(SplitError, match="only one class"):
        parse_tasks(one, "cancer_type", small_config)


def test_unknown_task_name_lists_the_grammar(sim, small_config) -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'subtype'.*cancer_type, mutation"):
        parse_tasks(sim, "subtype", small_config)


def test_unknown_gene_lists_known_genes(sim, small_config) -> None:
    with pytest.raises(ConfigError, match=r"unknown gene 'EGFR'.*\['TP53', 'KRAS'\]"):
        parse_tasks(sim, "mutation:EGFR", small_config)


def test_unknown_cohort_lists_known_cohorts(sim, small_config) -> None:
    with pytest.raises(ConfigError, match=r"unknown cohort 'BRCA'; known: \["):
        parse_tasks(sim, "survival@BRCA", small_config)


def test_gene_names_are_case_insensitive(sim, small_config) -> None:
    assert parse_tasks(sim, "mutation:tp53", small_config).names == ["mutation:TP53"]


def test_survival_arrays_and_non_positive_times(sim, small_config) -> None:
    sim.obs.iloc[:3, sim.obs.columns.get_loc("survival_time")] = 0.0
    obs = bench_obs(sim, small_config)
    td = prepare_task(obs, TaskSpec("survival"), small_config)
    tumour_zero = int((obs["survival_time"] <= 0).sum())
    assert td.info["n_nonpositive_time_left_out"] == tumour_zero
    assert td.y.shape == (len(obs) - tumour_zero, 2)
    assert (td.y[:, 0] > 0).all()
    np.testing.assert_array_equal(td.y[:, 0], obs["survival_time"].to_numpy()[td.index])
    assert TaskSpec("survival").metric == "c_index_within_cohort"
    assert TaskSpec("survival", cohort="X").metric == "c_index"


def test_endpoint_mismatch_is_an_error(sim, small_config) -> None:
    sim.uns["bulkfm"]["survival"] = {"endpoint": "OS"}
    config = dataclasses.replace(small_config, endpoint="PFI")
    with pytest.raises(ConfigError, match="hold endpoint 'OS' but endpoint='PFI'"):
        default_tasks(sim, config)
    assert default_tasks(sim, dataclasses.replace(small_config, endpoint="OS")).tasks


def test_sample_type_filter(sim, small_config) -> None:
    n_tumour = int((sim.obs["sample_type"] == "tumor").sum())
    td = prepare_task(bench_obs(sim, small_config), TaskSpec("cancer_type"), small_config)
    assert td.index.size == n_tumour
    all_samples = dataclasses.replace(small_config, sample_type=None)
    td_all = prepare_task(bench_obs(sim, all_samples), TaskSpec("cancer_type"), all_samples)
    assert td_all.index.size == sim.n_obs


def test_missing_sample_type_column_is_an_error(sim, small_config) -> None:
    del sim.obs["sample_type"]
    with pytest.raises(ConfigError, match="no 'sample_type' column"):
        default_tasks(sim, small_config)


def test_missing_patient_column_is_an_error(sim, small_config) -> None:
    del sim.obs["patient"]
    with pytest.raises(ConfigError, match="splits must group samples by patient"):
        parse_tasks(sim, "cancer_type", small_config)


def test_file_tasks_narrows_auto_to_the_files_genes(sim, small_config) -> None:
    spec = BenchFile(bench=small_config, genes=["TP53"], cohorts="")
    narrowed = file_tasks(sim, spec)
    names = [t.name for t in narrowed.tasks]
    assert any(n.startswith("mutation:TP53") for n in names)
    assert not any(n.startswith("mutation:") and "TP53" not in n for n in names)
    assert file_tasks(sim, BenchFile(bench=small_config)) == "auto"
    assert file_tasks(sim, BenchFile(tasks="cancer_type,survival")) == "cancer_type,survival"
