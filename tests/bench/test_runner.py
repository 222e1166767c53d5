from __future__ import annotations

import dataclasses
import logging
import warnings

import anndata as ad
import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bulkfm.bench.runner import COHORT_REFERENCE, _summarise, run_benchmark
from bulkfm.bench.selection import bench_obs
from bulkfm.data.splits import holdout_splits
from bulkfm.embedders.classical import RawEmbedder
from bulkfm.errors import BulkfmWarning, ConfigError, ExpressionValueError, SplitError
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
    models = res.scores[~res.scores["reference"]]
    assert len(models) == 2 * 2 * (3 + 2 + 2)  # models x splits x metrics per task
    reference = res.scores[res.scores["reference"]]
    assert set(reference["model"]) == {COHORT_REFERENCE}
    assert set(reference["task"]) == {"mutation:TP53"} and len(reference) == 2 * 2
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
    scores = res.scores[(res.scores["model"] == "signal") & (res.scores["metric"] == "auroc")]
    for i, split in enumerate(splits):
        row = scores[scores["split"] == i].iloc[0]
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


def test_interval_is_the_corrected_resampled_t_of_the_split_scores(
    sim, small_config, informative
) -> None:
    """ci_low/ci_high: mean -/+ t(J-1) * s * sqrt(1/J + rho/(1-rho)) within [0, 1], by hand."""
    config = dataclasses.replace(small_config, n_splits=4)
    res = run_benchmark(sim, [informative], "mutation:TP53", config, progress=False)
    scores = res.scores[(res.scores["model"] == "signal") & (res.scores["metric"] == "auroc")]
    f = float((scores["n_test"] / (scores["n_train"] + scores["n_test"])).mean())
    for method, rho in (("calibrated", 1 - (1 - f) ** 2), ("nadeau_bengio", f)):
        cfg = dataclasses.replace(config, ci_method=method)
        summary = _summarise(res.scores, cfg)
        row = summary[(summary["model"] == "signal") & (summary["metric"] == "auroc")].iloc[0]
        v = scores["value"].to_numpy()
        half = (
            stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) * np.sqrt(1 / v.size + rho / (1 - rho))
        )
        assert row["ci_low"] == pytest.approx(max(0.0, v.mean() - half))  # clipped to [0, 1]
        assert row["ci_high"] == pytest.approx(min(1.0, v.mean() + half))
    lb = res.leaderboard().iloc[0]
    assert lb["ci_low"] < lb["mean"] < lb["ci_high"]


def _cohort_driven(sim: ad.AnnData) -> ad.AnnData:
    """TP53 mutated in 80% of cohort 0's tumours and 15% of the others, independently of
    expression: pan-cancer AUROC from cohort identity alone, nothing within cohorts."""
    rng = np.random.default_rng(5)
    cohorts = sim.obs["cohort"].astype(str).to_numpy()
    first = cohorts == np.unique(cohorts)[0]
    sim.obs["mut_TP53"] = (rng.random(sim.n_obs) < np.where(first, 0.8, 0.15)).astype(np.int8)
    return sim


def test_cohort_identity_reference_and_cohort_adjusted_auroc(sim, small_config) -> None:
    data = _cohort_driven(sim)
    cohorts = data.obs["cohort"].astype(str).to_numpy()
    onehot = (cohorts[:, None] == np.unique(cohorts)[None, :]).astype(float)
    noise = np.random.default_rng(2).normal(size=(data.n_obs, 4))
    knows_cohort = Fixed(data, np.hstack([onehot, 0.01 * noise]), label="cohort-ish")
    res = run_benchmark(data, [knows_cohort], "mutation:TP53", small_config, progress=False)
    row = res.leaderboard().iloc[0]
    assert row["mean"] > 0.7 and row["cohort_only"] > 0.7  # cohort identity does it all
    assert abs(row["cohort_adjusted"] - 0.5) < 0.15
    # The reference's split scores: an independent scikit-learn pipeline on one-hot cohorts.
    obs = bench_obs(data, small_config)
    td = prepare_task(obs, TaskSpec("mutation", gene="TP53"), small_config)
    splits = holdout_splits(td.strata, td.groups, seeds=[0, 1], test_size=0.2)
    X = onehot[data.obs_names.get_indexer(obs.index[td.index])]
    ref = res.scores[res.scores["reference"] & (res.scores["metric"] == "auroc")]
    adjusted = res.scores[
        (res.scores["model"] == "cohort-ish") & (res.scores["metric"] == "auroc_within_cohort")
    ]
    for i, split in enumerate(splits):
        r = ref[ref["split"] == i].iloc[0]
        model = make_pipeline(StandardScaler(), LogisticRegression(C=r["param"], max_iter=500))
        model.fit(X[split.train], td.y[split.train])
        expected = roc_auc_score(td.y[split.test], model.predict_proba(X[split.test])[:, 1])
        assert r["value"] == pytest.approx(expected, abs=1e-6)
        assert np.isfinite(adjusted[adjusted["split"] == i]["value"].item())
    ref_summary = res.summary[res.summary["reference"] & res.summary["primary"]]
    assert row["cohort_only"] == pytest.approx(ref_summary["mean"].item())


def test_few_test_cases_are_flagged_and_warned_once(sim, small_config, informative, caplog) -> None:
    config = dataclasses.replace(small_config, min_test_cases=1000)
    with caplog.at_level(logging.WARNING, logger="bulkfm.bench.runner"):
        res = run_benchmark(sim, [informative, "raw"], TASKS, config, progress=False)
    warned = [r for r in caplog.records if "fewer than 1000 patients" in r.getMessage()]
    assert len(warned) == 1  # once per run, not per model or split
    assert all(name in warned[0].getMessage() for name in ("cancer_type", "mutation:TP53"))
    assert res.leaderboard()["few_test_cases"].all()
    info = res.task_info["mutation:TP53"]["min_test_patients"]
    td = prepare_task(bench_obs(sim, config), TaskSpec("mutation", gene="TP53"), config)
    splits = holdout_splits(td.strata, td.groups, seeds=[0, 1], test_size=0.2)
    fewest = min(np.unique(td.groups[s.test][td.y[s.test] == 0]).size for s in splits)
    assert info["negatives"] == fewest
    ok = run_benchmark(sim, [informative], TASKS, small_config, progress=False)
    assert not ok.leaderboard()["few_test_cases"].any()


def test_per_class_metrics_of_cancer_type(sim, small_config, informative) -> None:
    res = run_benchmark(sim, [informative], "cancer_type", small_config, progress=False)
    pc = res.per_class
    classes = set(sim.obs["cohort"].astype(str))
    assert set(pc["class"]) == classes and set(pc["split"]) == {0, 1}
    scores = res.scores[res.scores["metric"] == "macro_f1"].set_index("split")["value"]
    n_test = res.scores[res.scores["metric"] == "macro_f1"].set_index("split")["n_test"]
    for split, part in pc.groupby("split"):
        assert part["f1"].mean() == pytest.approx(scores[split])  # macro-F1 = mean class F1
        assert part["support"].sum() == n_test[split]
        for _, r in part.iterrows():  # F1 is the harmonic mean of precision and recall
            p, q = r["precision"], r["recall"]
            assert r["f1"] == pytest.approx(0 if p + q == 0 else 2 * p * q / (p + q))
    summary = res.per_class_summary()
    assert len(summary) == len(classes)


class WarnsPerFit(RawEmbedder):
    """A learning model that warns on every fit, as a model refitted per split may."""

    def fit(self, adata_train: ad.AnnData) -> WarnsPerFit:
        warnings.warn("42 genes ignored", BulkfmWarning, stacklevel=2)
        return super().fit(adata_train)


def test_a_models_repeated_warning_is_said_once(sim, small_config) -> None:
    model = WarnsPerFit(n_top_genes=20, label="raw")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_benchmark(sim, [model], "cancer_type,mutation:TP53", small_config, progress=False)
    said = [str(w.message) for w in caught if "42 genes ignored" in str(w.message)]
    assert said == ["42 genes ignored (said once; raised 4 times in this run)"]


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
