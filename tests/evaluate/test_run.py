from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bulkfm import schema as keys
from bulkfm.errors import (
    BulkfmWarning,
    ClinicalMatchError,
    ConfigError,
    GeneMappingError,
    SplitError,
)
from bulkfm.evaluate.config import EvaluateConfig
from bulkfm.evaluate.run import run_evaluation
from bulkfm.metrics import concordance_index
from bulkfm.tasks.classification import run_classification

CLASSIFICATION_ARMS = {
    "mlp",
    "svm",
    "ia3",
    "full",
    "random_init",
    "random_frozen",
    "baseline_pca_svm",
    "baseline_nmf_svm",
    "baseline_mlp",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def config(tiny_heads, tiny_baselines) -> Callable[..., EvaluateConfig]:
    """Factory: ``config(out, **sections)``, the tiny protocol with ``sections`` merged in."""

    def build(out: Path, **sections: Any) -> EvaluateConfig:
        raw = {
            "output_dir": str(out),
            "num_threads": 1,  # module-scoped runs start before the function-scoped fixture
            "model": {"path": "given", "batch_size": 32},
            "data": {"select": {"sample_type": "tumor"}},
            "protocol": {"n_seeds": 2},
            "heads": tiny_heads,
            "baselines": tiny_baselines,
        }
        for key, value in sections.items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
        return EvaluateConfig.from_dict(raw)

    return build


@pytest.fixture(scope="module")
def data(tiny_data):
    adata = tiny_data()
    tum = np.flatnonzero(adata.obs[keys.SAMPLE_TYPE].to_numpy() == "tumor")
    times = adata.obs[keys.SURVIVAL_TIME].to_numpy().copy()
    times[tum[0]], times[tum[1]] = 0.0, np.nan  # two unusable survival records
    adata.obs[keys.SURVIVAL_TIME] = times
    return adata


@pytest.fixture(scope="module")
def model(data, tiny_model_for):
    return tiny_model_for(data)


@pytest.fixture(scope="module")
def run(data, model, config, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    cfg = config(
        out,
        arms={"full": True, "random_init": True, "random_frozen": True},
        tasks={"robustness": [0.3], "per_cohort_survival": ["all"], "transfer": ["COHB"]},
    )
    before = data.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_evaluation(cfg, adata=data, model=model)
    assert np.array_equal(before.X, data.X) and before.obs.equals(data.obs)  # input untouched
    result.caught = [str(w.message) for w in caught]  # type: ignore[attr-defined]
    return result


# --------------------------------------------------------------------------- protocol
def test_every_arm_and_baseline_sees_the_same_splits(run, data):
    res = run.results
    assert set(res["classification"]) == CLASSIFICATION_ARMS
    tumours = data.obs[data.obs[keys.SAMPLE_TYPE] == "tumor"]
    expected = {str(i) for i in tumours.index}
    reference = None
    for key, arm in run.classification.items():
        test_sets = arm.predictions.groupby("split")["sample_id"].apply(frozenset).to_dict()
        assert len(test_sets) == 2, key
        reference = reference or test_sets
        assert test_sets == reference, key
        assert [r["n_test"] for r in res["classification"][key]["per_split"]] == [
            len(s) for s in reference.values()
        ]
    patient = tumours["patient"].astype(str)
    for test in reference.values():
        train = expected - test
        assert not set(patient[list(test)]) & set(patient[list(train)])  # patient-grouped
        assert 0.15 < len(test) / len(expected) < 0.25


def test_summaries_are_mean_and_sample_std_of_the_splits(run):
    for task, metrics in (
        ("classification", ("macro_f1", "weighted_f1")),
        ("survival", ("c_index", "c_index_weighted", "c_index_macro")),
    ):
        for key, arm in run.results[task].items():
            for metric in metrics:
                values = np.array([r[metric] for r in arm["per_split"]], dtype=float)
                assert arm["summary"][metric]["mean"] == pytest.approx(np.nanmean(values)), key
                if np.isfinite(values).sum() > 1:
                    assert arm["summary"][metric]["std"] == pytest.approx(np.nanstd(values, ddof=1))


def test_frozen_mlp_arm_equals_run_classification_on_the_same_splits(run, data, model, tiny_heads):
    from bulkfm.data.splits import repeated_holdout
    from bulkfm.embed import embed_adata

    tumours = data[data.obs[keys.SAMPLE_TYPE] == "tumor"]
    emb = embed_adata(*model, tumours, batch_size=32)
    y = tumours.obs[keys.COHORT].astype(str).to_numpy()
    g = tumours.obs[keys.PATIENT].astype(str).to_numpy()
    splits = repeated_holdout(y, g, seeds=[0, 1])
    ref = run_classification(emb, y, groups=g, method="mlp", splits=splits, mlp=tiny_heads["mlp"])
    got = run.results["classification"]["mlp"]["summary"]["macro_f1"]["values"]
    assert got == pytest.approx(ref.summary["macro_f1"]["values"])


def test_baselines_beat_chance_on_separable_cohorts(run):
    chance = 1 / 4
    for key in ("baseline_pca_svm", "baseline_mlp"):
        assert run.results["classification"][key]["summary"]["macro_f1"]["mean"] > chance + 0.2


def test_fine_tuned_arms_record_their_trainable_parameters(run):
    rows = {k: run.results["classification"][k]["per_split"][0] for k in ("ia3", "full")}
    assert 0 < rows["ia3"]["trainable_params"] < rows["full"]["trainable_params"]


def test_unusable_survival_records_are_excluded_and_reported(run, data):
    excl = run.results["data"]["exclusions"]["survival"]
    tum = data.obs_names[data.obs[keys.SAMPLE_TYPE] == "tumor"]
    assert excl["n_excluded"] == 2 and excl["ids"] == [str(tum[0]), str(tum[1])]
    assert any("1 missing/infinite time, 1 time <= 0" in m for m in run.caught)
    surv = run.results["survival"]
    assert set(surv) >= {"mlp", "ia3", "baseline_pca_cox", "baseline_mlp"}
    for arm in run.survival.values():
        assert not set(excl["ids"]) & set(arm.predictions["sample_id"])


def test_transfer_compares_three_models_on_the_same_cohort_test_samples(run, data):
    transfer = run.results["transfer"]["COHB"]["mlp"]
    pred = run.survival["mlp"].predictions
    cohort = data.obs[keys.COHORT].astype(str)
    in_b = pred[cohort.reindex(pred["sample_id"]).to_numpy() == "COHB"]
    expected = [
        concordance_index(p["time"], p["event"], p["risk"]) for _, p in in_b.groupby("split")
    ]
    assert transfer["pan_cancer"]["values"] == pytest.approx(expected)
    for variant in ("without_cohort", "cohort_only"):
        assert transfer[variant]["n"] + transfer[variant]["n_nan"] == 2


def test_per_cohort_survival_models_are_trained_within_each_cohort(run):
    per = run.results["per_cohort_survival"]
    assert set(per["cohorts"]) | set(per["skipped"]) == {"COHA", "COHB", "COHC", "COHD"}
    for entry in per["cohorts"].values():
        for arm in entry["arms"].values():
            for row in arm["per_split"]:
                assert row["n_train"] + row["n_test"] <= entry["n"]


def test_robustness_ratios_divide_by_the_clean_score(run):
    rob = run.results["robustness"]
    rows = pd.DataFrame(rob["per_split"])
    assert set(rows["variant"]) == {"imputed", "masked", "zero"}
    valid = rows["clean_macro_f1"] > 0
    np.testing.assert_allclose(
        rows.loc[valid, "ratio"], rows.loc[valid, "macro_f1"] / rows.loc[valid, "clean_macro_f1"]
    )
    clean = rob["fractions"]["0.3"]["clean_macro_f1"]["values"]
    assert clean == pytest.approx(
        run.results["classification"]["mlp"]["summary"]["macro_f1"]["values"]
    )


def test_outputs_are_written(run):
    out = run.out_dir
    results = json.loads((out / "results.json").read_text(), parse_constant=_no_nan)
    assert results["splits"]["classification"][0]["n_test"] > 0
    assert results["km"] and all(0 <= v["logrank"]["p_value"] <= 1 for v in results["km"].values())
    md = (out / "report.md").read_text()
    for arm in results["classification"].values():
        assert arm["label"] in md
    assert "| Model | macro-F1 | weighted-F1 | accuracy |" in md
    assert "| Model | C-index | weighted | macro |" in md
    assert "Transfer" in md and "robustness" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pred = pd.read_csv(out / "predictions.csv.gz")
    assert set(pred["arm"]) >= CLASSIFICATION_ARMS - {"svm"}


def test_results_json_sections_and_arm_entries_keep_their_keys(run):
    results = json.loads((run.out_dir / "results.json").read_text())
    assert list(results) == [
        "config",
        "model",
        "gene_coverage",
        "data",
        "splits",
        "notes",
        "timings_s",
        "classification",
        "robustness",
        "survival",
        "per_cohort_survival",
        "transfer",
        "similarity",
        "warnings",
        "km",
    ]
    assert list(results["data"]) == ["n_loaded", "n_selected", "exclusions", "classes", "survival"]
    clf = results["classification"]["mlp"]
    assert list(clf) == ["label", "kind", "summary", "labels", "confusion", "per_split"]
    surv = results["survival"]["baseline_pca_cox"]
    assert list(surv) == ["label", "kind", "summary", "per_cohort", "per_split"]
    assert list(results["transfer"]["COHB"]["mlp"]) == [
        "pan_cancer",
        "without_cohort",
        "without_cohort_errors",
        "cohort_only",
        "cohort_only_errors",
    ]
    assert list(results["robustness"]["fractions"]["0.3"]) == [
        "clean_macro_f1",
        "imputed",
        "masked",
        "zero",
    ]
    assert list(results["splits"]["survival"][0]) == ["name", "seed", "n_train", "n_test"]
    assert results["classification"]["random_init"]["kind"] == "ablation"
    assert results["survival"]["baseline_mlp"]["kind"] == "baseline"
    assert run.to_json() == (run.out_dir / "results.json").read_text()


def _no_nan(token: str) -> None:
    raise AssertionError(f"results.json holds {token}; NaN must be written as null")


# --------------------------------------------------------------------------- bad input
def test_class_with_too_few_patients_is_named_or_dropped(data, model, config, tmp_path):
    small = data.copy()
    tum = np.flatnonzero(small.obs[keys.SAMPLE_TYPE].to_numpy() == "tumor")
    cohort = small.obs[keys.COHORT].astype(str).to_numpy()
    cohort[tum[:3]] = "RARE"
    small.obs[keys.COHORT] = cohort
    cfg = config(
        tmp_path,
        arms={"svm": False, "ia3": False},
        baselines={"nmf_svm": False, "mlp": False, "pca_cox": False},
        tasks={"survival": False, "similarity": False},
    )
    with pytest.raises(SplitError, match=r"'RARE' \(3 samples, 3 patients\).*drop_small_classes"):
        run_evaluation(cfg, adata=small, model=model)
    cfg.data.drop_small_classes = True
    with pytest.warns(BulkfmWarning, match="left out 1 class.*RARE: 3 patient"):
        res = run_evaluation(cfg, adata=small, model=model)
    excl = res.results["data"]["exclusions"]
    assert excl["small_classes"]["RARE"].startswith("3 patient(s), 3 sample(s)")
    assert excl["small_class_samples"] == 3
    assert "RARE" not in res.results["data"]["classes"]


def test_cohort_without_events_is_skipped_with_a_warning(data, model, config, tmp_path):
    no_events = data.copy()
    event = no_events.obs[keys.SURVIVAL_EVENT].to_numpy().copy()
    event[no_events.obs[keys.COHORT].astype(str).to_numpy() == "COHA"] = 0
    no_events.obs[keys.SURVIVAL_EVENT] = event
    cfg = config(
        tmp_path,
        arms={"svm": False, "ia3": False},
        baselines={"pca_svm": False, "nmf_svm": False, "mlp": False},
        tasks={"classification": False, "similarity": False, "per_cohort_survival": ["COHA"]},
    )
    with pytest.warns(BulkfmWarning) as record:
        res = run_evaluation(cfg, adata=no_events, model=model)
    messages = " | ".join(str(w.message) for w in record)
    assert "skipped COHA (0 event(s)" in messages
    assert "COHA: 0 event(s) < min_events=1" in messages  # pan-cancer per-cohort C-index
    assert res.results["per_cohort_survival"]["skipped"]["COHA"].startswith("0 event(s)")
    assert "COHA" not in res.results["survival"]["mlp"]["per_cohort"]


def test_embeddings_sharing_no_sample_with_the_labels(data, tmp_path):
    from bulkfm.embed import write_embeddings

    path = tmp_path / "emb.parquet"
    write_embeddings(np.ones((5, 4), dtype=np.float32), [f"other{i}" for i in range(5)], path)
    cfg = EvaluateConfig.from_dict(
        {
            "output_dir": str(tmp_path / "out"),
            "model": {"embeddings": str(path)},
            "arms": {"ia3": False},
            "baselines": {"genes": "all"},
        }
    )
    with pytest.raises(ClinicalMatchError, match="no sample id is shared"):
        run_evaluation(cfg, adata=data)


def test_partial_embedding_overlap_is_an_explicit_exclusion(data, model, tiny_heads, tmp_path):
    from bulkfm.embed import embed_adata, write_embeddings

    tum = data[data.obs[keys.SAMPLE_TYPE] == "tumor"]
    emb = embed_adata(*model, tum, batch_size=64)
    path = tmp_path / "emb.parquet"
    write_embeddings(emb[10:], list(tum.obs_names[10:]), path)
    cfg = EvaluateConfig.from_dict(
        {
            "output_dir": str(tmp_path / "out"),
            "model": {"embeddings": str(path)},
            "protocol": {"n_seeds": 1},
            "heads": tiny_heads,
            "arms": {"ia3": False, "svm": False},
            "baselines": {"genes": "all", "pca_svm": False, "nmf_svm": False, "mlp": False},
            "data": {"select": {"sample_type": "tumor"}},
            "tasks": {"survival": False},
        }
    )
    with pytest.warns(BulkfmWarning, match=r"10 of \d+ selected samples have no embedding"):
        res = run_evaluation(cfg, adata=data)
    assert res.results["data"]["exclusions"]["no_embedding"] == 10
    assert res.results["data"]["n_selected"] == tum.n_obs - 10


def test_event_codes_other_than_0_1_are_an_error(data, model, config, tmp_path):
    bad = data.copy()
    event = bad.obs[keys.SURVIVAL_EVENT].to_numpy().astype(int).copy()
    event[np.flatnonzero(bad.obs[keys.SAMPLE_TYPE].to_numpy() == "tumor")[5]] = 2
    bad.obs[keys.SURVIVAL_EVENT] = event
    cfg = config(tmp_path, tasks={"classification": False, "similarity": False})
    with pytest.raises(ClinicalMatchError, match="not 0/1"):
        run_evaluation(cfg, adata=bad, model=model)


def test_missing_columns_and_empty_selection_are_config_errors(data, model, config, tmp_path):
    cfg = config(tmp_path, data={"label_key": "tumour_type"})
    with pytest.raises(ConfigError, match=r"no column 'tumour_type'.*data\.label_key"):
        run_evaluation(cfg, adata=data, model=model)
    cfg = config(tmp_path, data={"select": {"sample_type": "metastasis"}})
    with pytest.raises(ConfigError, match=r"no sample matches data\.select"):
        run_evaluation(cfg, adata=data, model=model)


def test_duplicates_are_kept_once(data, model, config, tmp_path):
    import anndata as ad

    tum = data[data.obs[keys.SAMPLE_TYPE] == "tumor"].copy()
    twin = tum[:4].copy()
    twin.obs_names = [f"{n}|copy" for n in twin.obs_names]
    both = ad.concat([tum, twin])
    both.obs[keys.SAMPLE_ID] = [n.split("|")[0] for n in both.obs_names]
    cfg = config(
        tmp_path,
        arms={"svm": False, "ia3": False, "mlp": False},
        baselines={"nmf_svm": False, "mlp": False, "pca_cox": False},
        protocol={"n_seeds": 1},
        tasks={"survival": False, "similarity": False},
    )
    res = run_evaluation(cfg, adata=both, model=model)
    assert res.results["data"]["exclusions"]["dedupe"]["n_dropped"] == 4
    assert res.results["data"]["n_selected"] == tum.n_obs


# --------------------------------------------------------------------------- main job
def test_quick_config_is_the_packaged_yaml_with_overrides(tmp_path):
    from bulkfm.evaluate.run import quick_config

    cfg = quick_config(tmp_path / "1e3", tmp_path / "out")
    assert cfg.model.path == str(tmp_path / "1e3") and cfg.output_dir == str(tmp_path / "out")
    assert cfg.num_threads == 1 and cfg.protocol.n_seeds == 2
    assert cfg.heads.finetune == {"epochs": 2, "batch_size": 16, "patience": None}
    assert cfg.data.select == {"sample_type": "tumor"} and cfg.data.drop_small_classes
    assert cfg.tasks.robustness == [0.3] and cfg.baselines.nmf_max_iter == 100
    fuller = quick_config("m", "o", ["protocol.n_seeds=5", "heads.finetune.epochs=10"])
    assert fuller.protocol.n_seeds == 5 and fuller.heads.finetune["epochs"] == 10
    with pytest.raises(ConfigError, match="protocl"):
        quick_config("m", "o", ["protocl.n_seeds=5"])


# --------------------------------------------------------------------------- gene coverage
def test_data_lacking_model_genes_run_and_record_their_coverage(data, model, config, tmp_path):
    """A cohort quantified without 6 of the model's 40 genes: the model reads them as
    [MASK], the baselines read the 34 present ones, robustness removes measured genes
    only, and coverage is in results.json and the report."""
    _, tokenizer = model
    absent = set(tokenizer.genes[:6])
    lacking = data[:, [g for g in data.var_names if g not in absent]].copy()
    cfg = config(
        tmp_path / "ok",
        arms={"svm": False, "ia3": False},
        baselines={"nmf_svm": False, "mlp": False},
        tasks={"survival": False, "similarity": False, "robustness": [0.5]},
    )
    res = run_evaluation(cfg, adata=lacking, model=model)
    coverage = res.results["gene_coverage"]
    assert (coverage["n_model_genes"], coverage["n_in_data"], coverage["n_absent"]) == (40, 34, 6)
    assert coverage["fraction_measured"] == pytest.approx(34 / 40)
    assert set(coverage["by_group"]["cohort"]) == {"COHA", "COHB", "COHC", "COHD"}
    assert "the 34 of the model's 40 genes present in the data" in res.results["notes"][0]
    report = (tmp_path / "ok" / "report.md").read_text()
    assert "- gene coverage: the samples measure 85.0% of the model's 40 genes" in report
    assert "6 are absent from the data and read as [MASK]" in report
    assert res.results["robustness"]["fractions"]["0.5"]["masked"]["ratio"]["n"] == 2

    cfg = config(tmp_path / "low", model={"min_gene_coverage": 0.9})
    with pytest.raises(GeneMappingError, match=r"model\.min_gene_coverage"):
        run_evaluation(cfg, adata=lacking, model=model)
    assert not (tmp_path / "low").exists()  # stopped before any work, folder removed
