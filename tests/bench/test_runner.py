from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bulkfm.bench.runner import run_benchmark
from bulkfm.bench.selection import bench_obs
from bulkfm.data.splits import holdout_splits
from bulkfm.embedders.classical import RawEmbedder
from bulkfm.errors import ConfigError, ExpressionValueError, SplitError
from bulkfm.tasks import TaskSpec, prepare_task
from tests.bench.fakes import Fixed, signal_embedding

TASKS = "cancer_type,mutation:TP53,survival"


class SpyRaw(RawEmbedder):
    """Records the samples every fit saw."""

    fitted_on: list[set[str]]

    def fit(self, adata_train: ad.AnnData) -> SpyRaw:
        self.fitted_on.append(set(adata_train.obs_names))
        return super().fit(adata_train)


@pytest.fixture
def informative(sim) -> Fixed:
    return Fixed(sim, signal_embedding(sim), label="signal")


def test_scores_summary_and_leaderboard(sim, small_config, informative) -> None:
    noise = Fixed(sim, np.random.default_rng(1).normal(size=(sim.n_obs, 12)), label="noise")
    res = run_benchmark(sim, [informative, noise], TASKS, small_config, progress=False)
    lb = res.leaderboard()
    assert list(lb["metric"].unique()) == ["macro_f1", "auroc", "c_index_within_cohort"]
    assert len(res.scores) == 2 * 2 * (3 + 1 + 2)  # models x splits x metrics per task
    for (model, task, metric), part in res.scores.groupby(["model", "task", "metric"]):
        s = res.summary
        row = s[(s["model"] == model) & (s["task"] == task) & (s["metric"] == metric)]
        assert row["mean"].item() == pytest.approx(part["value"].mean())
        assert row["std"].item() == pytest.approx(part["value"].std(ddof=1))
    wide = lb.pivot(index="task", columns="model", values="mean")
    assert (wide["signal"] > wide["noise"]).all()  # also checks the C-index sign
    assert wide.loc["survival", "signal"] > 0.6
    assert set(res.metadata()["skipped_tasks"]) == set()


def test_split_score_matches_an_independent_pipeline(sim, small_config, informative) -> None:
    res = run_benchmark(sim, [informative], "mutation:TP53", small_config, progress=False)
    obs = bench_obs(sim, small_config)
    td = prepare_task(obs, TaskSpec("mutation", gene="TP53"), small_config)
    splits = holdout_splits(td.strata, td.groups, seeds=[0, 1], test_size=0.2)
    X = signal_embedding(sim)[sim.obs_names.get_indexer(obs.index[td.index])]
    for i, split in enumerate(splits):
        row = res.scores[res.scores["split"] == i].iloc[0]
        model = make_pipeline(StandardScaler(), LogisticRegression(C=row["param"], max_iter=500))
        model.fit(X[split.train], td.y[split.train])
        expected = roc_auc_score(td.y[split.test], model.predict_proba(X[split.test])[:, 1])
        assert row["value"] == pytest.approx(expected, abs=1e-6)
        assert row["n_test"] == split.test.size


def test_splits_are_shared_and_learning_models_fit_on_training_rows(
    sim, small_config, informative
) -> None:
    spy = SpyRaw(n_top_genes=20, label="raw")
    spy.fitted_on = []
    res = run_benchmark(sim, [informative, spy], "mutation:TP53", small_config, progress=False)
    sizes = res.scores.pivot_table(index="split", columns="model", values="n_test")
    assert (sizes["raw"] == sizes["signal"]).all()
    td = prepare_task(bench_obs(sim, small_config), TaskSpec("mutation", gene="TP53"), small_config)
    splits = holdout_splits(td.strata, td.groups, seeds=[0, 1], test_size=0.2)
    ids = bench_obs(sim, small_config).index[td.index]
    assert len(spy.fitted_on) == len(splits)
    for fitted, split in zip(spy.fitted_on, splits, strict=True):
        assert fitted == set(ids[split.train])
        assert not fitted & set(ids[split.test])


def test_frozen_embeddings_are_cached(sim, small_config, tmp_path) -> None:
    config = dataclasses.replace(small_config, cache_dir=str(tmp_path))
    first = Fixed(sim, signal_embedding(sim))
    a = run_benchmark(sim, [first], "cancer_type", config, progress=False)
    second = Fixed(sim, signal_embedding(sim))
    b = run_benchmark(sim, [second], "cancer_type", config, progress=False)
    assert first.calls == 1 and second.calls == 0
    np.testing.assert_allclose(a.scores["value"], b.scores["value"], rtol=1e-6)
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_nan_embedding_is_an_error(sim, small_config) -> None:
    emb = signal_embedding(sim)
    tumour = np.flatnonzero(sim.obs["sample_type"].to_numpy() == "tumor")[0]
    emb[tumour, 2] = np.nan
    with pytest.raises(ExpressionValueError, match=r"NaN/inf embeddings for 1 of"):
        run_benchmark(sim, [Fixed(sim, emb)], "cancer_type", small_config, progress=False)


def test_unknown_model_name_lists_known(sim, small_config) -> None:
    known = r"unknown model 'scfoo'; pass known models to --models: .*pca"
    with pytest.raises(ConfigError, match=known):
        run_benchmark(sim, "raw,scfoo", "cancer_type", small_config, progress=False)


def test_duplicate_model_labels_are_an_error(sim, small_config) -> None:
    with pytest.raises(ConfigError, match="labels must be unique"):
        run_benchmark(sim, ["raw", "raw"], "cancer_type", small_config, progress=False)


def test_no_feasible_task_is_an_error(sim, small_config) -> None:
    config = dataclasses.replace(small_config, min_positives=10_000, min_events=10_000)
    with pytest.raises(ConfigError, match="no task can be evaluated"):
        run_benchmark(sim, ["raw"], "mutation,survival@*", config, progress=False)


def test_test_set_bootstrap_intervals(sim, small_config, informative) -> None:
    config = dataclasses.replace(small_config, ci_method="test", n_boot=30)
    res = run_benchmark(sim, [informative], "mutation:TP53", config, progress=False)
    row = res.leaderboard().iloc[0]
    assert row["ci_low"] < row["ci_high"]
    scores = res.scores
    assert (scores["ci_low"] <= scores["ci_high"]).all()
    assert row["ci_low"] == pytest.approx(scores["ci_low"].mean())


def _few_censored(sim: ad.AnnData, n_censored: int = 3) -> tuple[ad.AnnData, str]:
    """The first cohort's tumours all have an event except ``n_censored`` patients."""
    cohort = str(sim.obs["cohort"].astype(str).iloc[0])
    rows = np.flatnonzero(
        (sim.obs["cohort"].astype(str) == cohort).to_numpy()
        & (sim.obs["sample_type"] == "tumor").to_numpy()
    )
    event = sim.obs["survival_event"].to_numpy().copy()
    event[rows] = 1
    event[rows[:n_censored]] = 0
    sim.obs["survival_event"] = event
    return sim, cohort


def test_infeasible_split_under_a_wildcard_is_skipped_with_its_reason(sim, small_config) -> None:
    """3 censored patients cannot fill 5 stratified folds: the task is skipped, not a crash."""
    data, cohort = _few_censored(sim)
    config = dataclasses.replace(small_config, min_events=5)
    res = run_benchmark(data, ["raw"], "survival@*", config, progress=False)
    name = f"survival@{cohort}"
    assert name not in [t.name for t in res.tasks] and res.tasks
    assert "3 censored" in res.skipped[name] and "--test-size 0.2" in res.skipped[name]


def test_infeasible_split_of_a_named_task_is_an_error_naming_it(sim, small_config) -> None:
    data, cohort = _few_censored(sim)
    config = dataclasses.replace(small_config, min_events=5)
    with pytest.raises(SplitError, match=rf"task 'survival@{cohort}' has \d+ patients with an "):
        run_benchmark(data, ["raw"], f"survival@{cohort}", config, progress=False)
    spec = TaskSpec("survival", cohort=cohort)  # a TaskSpec bypasses selection: still named
    with pytest.raises(SplitError, match=rf"task 'survival@{cohort}'"):
        run_benchmark(data, ["raw"], [spec], config, progress=False)


def test_split_error_in_a_probe_names_task_and_model(sim, small_config) -> None:
    config = dataclasses.replace(small_config, inner_folds=500)
    with pytest.raises(SplitError, match=r"^task 'cancer_type', model 'raw': .*500 folds"):
        run_benchmark(sim, ["raw"], "cancer_type", config, progress=False)


def test_non_boolean_missing_layer_is_an_error_before_any_model_runs(sim, small_config) -> None:
    sim.layers["missing"] = np.full(sim.shape, 2.5, dtype=np.float32)
    with pytest.raises(ExpressionValueError, match=r"layers\['missing'\] holds .*other than 0/1"):
        run_benchmark(sim, ["raw"], "cancer_type", small_config, progress=False)
