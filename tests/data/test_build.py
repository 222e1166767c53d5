from __future__ import annotations

import gzip
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bulkfm.cli import main
from bulkfm.data.build import BuildConfig, ExpressionInput, build_dataset, expand_inputs
from bulkfm.errors import ConfigError, DuplicateIdError, InputFileError

# Real Ensembl ids with their approved symbols (checked against Ensembl 100).
GENES = {
    "ENSG00000000003": "TSPAN6",
    "ENSG00000000005": "TNMD",
    "ENSG00000000419": "DPM1",
    "ENSG00000000457": "SCYL3",
    "ENSG00000000460": "C1orf112",
    "ENSG00000000938": "FGR",
}
ENSG = list(GENES)


def _tumour(i: int, code: str = "01") -> str:
    return f"TCGA-AB-{1000 + i:04d}-{code}A-11R-A000-07"


def _write_tpm_samples_x_genes(path: Path, ids: list[str], genes: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.gamma(1.0, 50.0, size=(len(ids), len(genes)))
    values = values / values.sum(1, keepdims=True) * 1e6
    frame = pd.DataFrame(values, columns=[f"{g}.5" for g in genes])
    frame.insert(0, "sample_id", ids)
    frame.to_csv(path, sep="\t", index=False)


def _write_counts_genes_x_samples(path: Path, ids: list[str], symbols: list[str], seed: int):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2000, size=(len(symbols), len(ids))).astype(float)
    frame = pd.DataFrame(counts, columns=ids)
    frame.insert(0, "Hugo_Symbol", symbols)
    with gzip.open(path, "wt") as handle:
        frame.to_csv(handle, sep="\t", index=False)
    return counts


def _survival_table(path: Path, patients: list[str]) -> None:
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            "bcr_patient_barcode": patients,
            "type": "ABC",
            "OS": rng.integers(0, 2, len(patients)),
            "OS.time": rng.uniform(10, 3000, len(patients)).round(),
        }
    )
    for endpoint in ("DSS", "DFI", "PFI"):
        frame[endpoint] = frame["OS"]
        frame[f"{endpoint}.time"] = frame["OS.time"]
    frame.to_csv(path, sep="\t", index=False)


@pytest.fixture
def two_sources(tmp_path: Path) -> tuple[Path, Path, list[str], list[str]]:
    ids_a = [_tumour(i) for i in range(6)]
    ids_b = [_tumour(i, "11") for i in range(10, 14)]
    a = tmp_path / "abc-tpm.tsv"
    b = tmp_path / "xyz-counts.txt.gz"
    _write_tpm_samples_x_genes(a, ids_a, ENSG[:5], seed=1)
    _write_counts_genes_x_samples(b, ids_b, [GENES[g] for g in ENSG[1:]], seed=2)
    return a, b, ids_a, ids_b


def test_two_sources_union_missing_and_units(two_sources, tmp_path: Path) -> None:
    a, b, ids_a, ids_b = two_sources
    lengths = tmp_path / "lengths.csv"
    pd.DataFrame({"ensg_id": ENSG, "length": [1000, 2000, 1500, 3000, 500, 800]}).to_csv(
        lengths, index=False
    )
    survival = tmp_path / "cdr.tsv"
    _survival_table(survival, sorted({i[:12] for i in ids_a + ids_b}))
    config = BuildConfig(
        inputs=[ExpressionInput(a), ExpressionInput(b)],
        gene_lengths=lengths,
        survival=survival,
        cohort_from_filename=r"^([a-z]+)-",
    )
    adata = build_dataset(config, progress=False)

    assert list(adata.obs_names) == ids_a + ids_b
    assert set(adata.var_names) == set(ENSG)
    assert adata.X.dtype == np.float32
    np.testing.assert_allclose(adata.X.sum(1), 1e6, rtol=1e-4)
    # source a lacks FGR, source b lacks TSPAN6: exactly those are missing
    missing = adata.layers["missing"].toarray()
    col = {g: i for i, g in enumerate(adata.var_names)}
    assert missing[:6, col["ENSG00000000938"]].all()
    assert missing[6:, col["ENSG00000000003"]].all()
    assert missing.sum() == 6 + 4
    assert (adata.X[missing] == 0).all()
    assert list(adata.obs["cohort"].astype(str)) == ["ABC"] * 6 + ["XYZ"] * 4
    assert list(adata.obs["sample_type"].astype(str)) == ["tumor"] * 6 + ["normal"] * 4
    assert adata.obs["survival_time"].notna().all()
    units = [s["units"] for s in adata.uns["bulkfm"]["sources"].values()]
    assert units[0]["converted"] is False and units[1]["converted"] is True


def test_counts_source_matches_naive_tpm(two_sources, tmp_path: Path) -> None:
    _, b, _, ids_b = two_sources
    lengths = pd.Series([1000, 2000, 1500, 3000, 500, 800], index=ENSG, dtype=float)
    pd.DataFrame({"ensg_id": lengths.index, "length": lengths.values}).to_csv(
        tmp_path / "len.csv", index=False
    )
    adata = build_dataset(
        BuildConfig(inputs=[ExpressionInput(b)], gene_lengths=tmp_path / "len.csv"),
        progress=False,
    )
    raw = pd.read_csv(b, sep="\t").set_index("Hugo_Symbol")
    raw.index = [next(k for k, v in GENES.items() if v == s) for s in raw.index]
    rate = raw.T / lengths[raw.index].to_numpy()
    expected = rate.div(rate.sum(1), axis=0) * 1e6
    got = pd.DataFrame(adata.X, index=adata.obs_names, columns=adata.var_names)
    np.testing.assert_allclose(got[expected.columns].loc[ids_b], expected.loc[ids_b], rtol=1e-4)


def test_keep_counts_carries_raw_counts(two_sources, tmp_path: Path) -> None:
    a, b, _, ids_b = two_sources
    c = tmp_path / "uvw-counts.txt.gz"
    ids_c = [_tumour(i) for i in range(20, 22)]
    raw_c = _write_counts_genes_x_samples(c, ids_c, [GENES[g] for g in ENSG[:4]], seed=4)
    adata = build_dataset(
        BuildConfig(inputs=[ExpressionInput(b), ExpressionInput(c)], keep_counts=True),
        progress=False,
    )
    raw_b = pd.read_csv(b, sep="\t").set_index("Hugo_Symbol")
    col = {GENES[g]: i for i, g in enumerate(adata.var_names)}
    counts = adata.layers["counts"]
    for j, symbol in enumerate(raw_b.index):
        np.testing.assert_array_equal(counts[: len(ids_b), col[symbol]], raw_b.iloc[j].to_numpy())
    for j, gene in enumerate(ENSG[:4]):
        np.testing.assert_array_equal(counts[len(ids_b) :, col[GENES[gene]]], raw_c[j])
    # a gene absent from a source is 0 in the counts and flagged missing
    absent = col["FGR"]
    assert (counts[len(ids_b) :, absent] == 0).all()
    assert adata.layers["missing"][len(ids_b) :, absent].toarray().all()
    assert "counts" not in build_dataset(BuildConfig(inputs=[ExpressionInput(b)])).layers
    with pytest.raises(ConfigError, match=r"keep_counts: .*abc-tpm.tsv holds tpm values"):
        build_dataset(BuildConfig(inputs=[ExpressionInput(a)], keep_counts=True))


def test_duplicate_samples_across_inputs(tmp_path: Path) -> None:
    ids = [_tumour(i) for i in range(3)]
    a, b = tmp_path / "one.tsv", tmp_path / "two.tsv"
    _write_tpm_samples_x_genes(a, ids, ENSG, seed=1)
    _write_tpm_samples_x_genes(b, ids[1:], ENSG, seed=2)
    inputs = [ExpressionInput(a), ExpressionInput(b)]
    with pytest.raises(DuplicateIdError, match=r"2 sample id\(s\).*duplicate_samples='suffix'"):
        build_dataset(BuildConfig(inputs=inputs), progress=False)
    both = build_dataset(BuildConfig(inputs=inputs, duplicate_samples="suffix"), progress=False)
    assert both.n_obs == 5 and both.obs_names.is_unique
    assert list(both.obs["sample_id"]) == ids + ids[1:]
    assert list(both.obs["patient"]) == [i[:12] for i in ids + ids[1:]]
    first = build_dataset(BuildConfig(inputs=inputs, duplicate_samples="first"), progress=False)
    assert list(first.obs_names) == ids


def test_vocabulary_alignment_records_missing(two_sources, tmp_path: Path) -> None:
    a, _, _, _ = two_sources
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(ENSG[::-1]) + "\n")
    adata = build_dataset(
        BuildConfig(inputs=[ExpressionInput(a)], vocabulary=vocab), progress=False
    )
    assert list(adata.var_names) == ENSG[::-1]
    missing = adata.layers["missing"].toarray()
    assert missing[:, 0].all() and not missing[:, 1:].any()


def test_config_errors(two_sources, tmp_path: Path) -> None:
    a, *_ = two_sources
    with pytest.raises(ConfigError, match="no expression input"):
        BuildConfig(inputs=[])
    with pytest.raises(InputFileError, match="does not exist"):
        ExpressionInput(tmp_path / "nope.tsv")
    with pytest.raises(ConfigError, match="endpoint"):
        BuildConfig(inputs=[ExpressionInput(a)], endpoint="XYZ")
    with pytest.raises(ConfigError, match="capture group"):
        BuildConfig(inputs=[ExpressionInput(a)], cohort_from_filename="^[a-z]+")
    with pytest.raises(InputFileError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.parquet")])


def test_cli_build_and_summary(two_sources, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.h5ad"
    code = main(["data", "build", str(tmp_path / "*.ts*"), "-o", str(out), "--cohort", "ABC"])
    assert code == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "6 samples" in printed and "ABC" in printed
    assert main(["data", "summary", str(out)]) == 0
    assert main(["data", "build", str(tmp_path / "none*.tsv"), "-o", str(out)]) == 1


def test_failed_build_leaves_no_output(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("sample_id\tENSG00000000003\nTCGA-AB-1000-01A\tnot-a-number\n")
    out = tmp_path / "out.h5ad"
    assert main(["data", "build", str(bad), "-o", str(out)]) == 1
    assert not out.exists()
    assert not list(tmp_path.glob(".out.h5ad*"))


# --- real data -----------------------------------------------------------------------------

SHARED_COHORTS_TCGA = {
    "UVM": 80,
    "ACC": 79,
    "KICH": 65,
    "UCS": 56,
    "DLBC": 48,
    "CHOL": 36,
    "PAAD": 20,
}
RNASEQDB_TUMOURS = {"CHOL": 31, "KICH": 60, "UCS": 47}
GTEX = {"BLADDER": 11, "CERVIX": 11, "KIDNEY": 32, "SALIVARY": 55, "UTERUS": 82}


@pytest.fixture(scope="module")
def shared_built(shared_adata):
    return shared_adata


@pytest.mark.realdata
@pytest.mark.slow
def test_shared_build_counts(shared_built) -> None:
    adata = shared_built
    obs = adata.obs.astype({"cohort": str, "sample_type": str, "study": str, "source": str})
    assert adata.n_obs == 1286
    tcga_file = obs[obs["source"] == "tcga_tumor_counts_7cohorts"]
    assert tcga_file["cohort"].value_counts().to_dict() == SHARED_COHORTS_TCGA
    rnaseq = obs[obs["source"] != "tcga_tumor_counts_7cohorts"]
    tumours = rnaseq[(rnaseq["study"] == "TCGA") & (rnaseq["sample_type"] == "tumor")]
    assert tumours["cohort"].value_counts().to_dict() == RNASEQDB_TUMOURS
    normals = rnaseq[(rnaseq["study"] == "TCGA") & (rnaseq["sample_type"] == "normal")]
    assert len(normals) == 573 and normals["cohort"].nunique() == 17
    gtex = rnaseq[rnaseq["study"] == "GTEx"]
    assert gtex["cohort"].value_counts().to_dict() == GTEX
    assert (gtex["sample_type"] == "normal").all()


@pytest.mark.realdata
@pytest.mark.slow
def test_shared_build_clinical_and_units(shared_built, shared_data: Path) -> None:
    shared = shared_data
    adata = shared_built
    obs = adata.obs
    tcga_tumour = (obs["study"].astype(str) == "TCGA") & (obs["sample_type"].astype(str) == "tumor")
    assert tcga_tumour.sum() == 384 + 138
    # every TCGA tumour has a CDR row; OS is joined wherever the row has OS and OS.time
    cdr = pd.read_csv(shared / "clinical" / "tcga_cdr_survival.tsv.gz", sep="\t")
    cdr = cdr.set_index("bcr_patient_barcode")
    patients = obs.loc[tcga_tumour, "patient"].astype(str)
    assert patients.isin(cdr.index).all()
    known = cdr.loc[patients, ["OS", "OS.time"]].notna().all(axis=1).to_numpy()
    assert known.mean() > 0.99
    joined = obs.loc[tcga_tumour, "survival_time"].notna().to_numpy()
    np.testing.assert_array_equal(joined, known)
    np.testing.assert_allclose(
        obs.loc[tcga_tumour, "survival_time"].to_numpy()[known],
        cdr.loc[patients, "OS.time"].to_numpy()[known],
    )
    assert obs.loc[tcga_tumour, "survival_event"].dropna().isin([0, 1]).all()
    # the same aliquot quantified by two pipelines is kept twice, once suffixed
    assert adata.obs_names.is_unique
    assert (obs["sample_id"].value_counts() == 2).sum() == 136
    np.testing.assert_allclose(adata.X.sum(1), 1e6, rtol=1e-3)
    assert adata.var_names.str.startswith("ENSG").all() and adata.var_names.is_unique
    mut = [c for c in obs if c.startswith("mut_")]
    assert len(mut) == 20
    gtex = obs["study"].astype(str) == "GTEx"
    assert obs.loc[gtex, mut].isna().all().all()


def test_cli_simulate_then_build_round_trip(tmp_path: Path, capsys) -> None:
    sim_path, files = tmp_path / "sim.h5ad", tmp_path / "files"
    args = ["data", "simulate", "-o", str(sim_path), "--n-samples", "80", "--n-genes", "150"]
    assert main([*args, "--files", str(files)]) == 0
    truth = ad.read_h5ad(sim_path)
    counts = next(files.glob("*counts*"))
    survival = next(files.glob("*surv*"))
    out = tmp_path / "built.h5ad"
    assert main(["data", "build", str(counts), "--survival", str(survival), "-o", str(out)]) == 0
    built = ad.read_h5ad(out)
    assert list(built.obs_names) == list(truth.obs_names)
    assert set(built.var_names) == set(truth.var_names)
    # same counts, TPM from the default (exonic) gene lengths: same ranking within a sample
    got = pd.DataFrame(built.X, index=built.obs_names, columns=built.var_names)[truth.var_names]
    rho = [
        pd.Series(got.iloc[i].to_numpy()).corr(pd.Series(truth.layers["counts"][i]), "spearman")
        for i in range(5)
    ]
    assert min(rho) > 0.8
    np.testing.assert_allclose(
        built.obs["survival_time"].to_numpy(), truth.obs["survival_time"].to_numpy(), rtol=1e-6
    )


# --- a second cohort quantified differently (issue: symbol/Entrez conflicts, duplicates) ----

# (Hugo_Symbol, Entrez_Gene_Id) rows of an RSEM-style table: TNMD carries TSPAN6's Entrez
# id (as TCGA's tables give KCTD7 the id of RABGEF1); TM4SF6 is TSPAN6's previous symbol
# (a legitimate duplicate row of the same gene, no Entrez id).
RSEM_ROWS = [
    ("TSPAN6", "7105"),
    ("TNMD", "7105"),
    ("TM4SF6", "0"),
    ("DPM1", "8813"),
    ("SCYL3", "57147"),
    ("C1orf112", "55732"),
]


def _write_rsem(path: Path, ids: list[str], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(500, size=(len(RSEM_ROWS), len(ids))).astype(float)
    frame = pd.DataFrame(counts, columns=ids)
    frame.insert(0, "Entrez_Gene_Id", [f"   {e}" for _, e in RSEM_ROWS])  # right-aligned
    frame.insert(0, "Hugo_Symbol", [s for s, _ in RSEM_ROWS])
    with gzip.open(path, "wt") as handle:
        frame.to_csv(handle, sep="\t", index=False)
    return counts


def _write_counts_ensembl(path: Path, ids: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.poisson(800, size=(len(ENSG), len(ids))).astype(float), columns=ids)
    frame.insert(0, "gene_id", [f"{g}.7" for g in ENSG])
    frame.to_csv(path, sep="\t", index=False)


def _mutation_table(path: Path, ids: list[str]) -> pd.DataFrame:
    # DNA aliquots (…-01A-11D-…) of the RNA samples: the join must use the 15-char sample key
    frame = pd.DataFrame(
        {
            "Tumor_Sample_Barcode": [i[:16] + "-11D-A000-10" for i in ids],
            "cohort": "ABC",
            "TP53": [1, 0, 1],
            "KRAS": [0, 1, 1],
        }
    )
    frame.to_csv(path, sep="\t", index=False)
    return frame


def _walk(value: object, path: str = ""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}/{key}")
    else:
        yield path, value


@pytest.mark.parametrize("rule", ["prefer_symbol", "prefer_entrez", "drop"])
def test_second_cohort_conflicts_duplicates_and_clinical_joins(tmp_path: Path, caplog, rule):
    ids = [_tumour(i) for i in range(3)]
    one, two = tmp_path / "abc-counts.tsv", tmp_path / "xyz-rsem.txt.gz"
    _write_counts_ensembl(one, ids, seed=1)
    raw = _write_rsem(two, ids[1:], seed=2)  # the same aliquots, quantified again
    muts_path = tmp_path / "muts.tsv"
    muts = _mutation_table(muts_path, ids)
    survival = tmp_path / "cdr.tsv"
    _survival_table(survival, [i[:12] for i in ids])
    out = tmp_path / "out.h5ad"
    with caplog.at_level("WARNING"):
        code = main(
            [
                "data", "build", str(one), str(two), "-o", str(out),
                "--duplicate-samples", "suffix", "--keep-counts", "--id-conflicts", rule,
                "--mutations", str(muts_path), "--survival", str(survival),
            ]
        )  # fmt: skip
    assert code == 0
    built = ad.read_h5ad(out)

    # mutation calls and survival reach both copies of a re-quantified aliquot
    copies = [f"{i}|xyz-rsem" for i in ids[1:]]
    assert list(built.obs_names) == ids + copies
    assert list(built.obs["sample_id"].astype(str)) == ids + ids[1:]
    assert list(built.obs["study"].astype(str)) == ["TCGA"] * 5
    for gene in ("TP53", "KRAS"):
        calls = built.obs[f"mut_{gene}"]
        assert isinstance(calls.dtype, pd.CategoricalDtype)
        expected = muts[gene].tolist()
        assert calls.astype(int).tolist() == expected + expected[1:]
    cdr = pd.read_csv(survival, sep="\t").set_index("bcr_patient_barcode")
    expected_time = [cdr.loc[i[:12], "OS.time"] for i in ids + ids[1:]]
    np.testing.assert_allclose(built.obs["survival_time"], expected_time)
    # the warning says what happened to the duplicates, and nothing claims 'unknown'
    assert "--duplicate-samples suffix kept both" in caplog.text
    assert "'<id>|xyz-rsem'" in caplog.text
    assert "unknown" not in caplog.text

    # the conflicting row is never summed into another gene; the true duplicate is
    counts = pd.DataFrame(built.layers["counts"][3:], index=copies, columns=built.var_names)
    tspan6, tnmd = "ENSG00000000003", "ENSG00000000005"
    np.testing.assert_array_equal(counts[tspan6], raw[0] + raw[2])  # TSPAN6 + TM4SF6
    if rule == "prefer_symbol":
        np.testing.assert_array_equal(counts[tnmd], raw[1])
    else:  # left out: TNMD is missing for this source, not TSPAN6's counts
        missing = built.layers["missing"][3:].toarray()
        assert missing[:, list(built.var_names).index(tnmd)].all()
    mapping = built.uns["bulkfm"]["sources"]["xyz-rsem"]["gene_mapping"]
    record = mapping["id_conflicts"]
    assert record["rule"] == rule and record["n_rows"] == 1
    assert record["by_columns"] == {"entrez vs symbol": 1}
    assert str(record["examples"][0]).startswith("TNMD (entrez 7105): ")
    assert mapping["n_duplicates_merged"] == 1
    assert "1 of 6 gene rows name different genes" in caplog.text

    # uns holds lists as arrays of the original items, never numpy-printed text
    assert list(built.uns["bulkfm"]["mutations"]["genes"]) == ["TP53", "KRAS"]
    assert list(built.uns["bulkfm"]["build"]["inputs"]["1"]["path"]) == list(str(two))
    for key, value in _walk(built.uns["bulkfm"]):
        assert not (isinstance(value, str) and value.startswith("[") and "' '" in value), key


def test_id_conflicts_error_rule_names_the_flag(tmp_path: Path, capsys) -> None:
    two = tmp_path / "xyz-rsem.txt.gz"
    _write_rsem(two, [_tumour(0)], seed=2)
    args = ["data", "build", str(two), "-o", str(tmp_path / "o.h5ad"), "--id-conflicts"]
    assert main([*args, "error"]) == 1
    assert "--id-conflicts prefer_symbol, prefer_entrez or drop" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"id_conflicts must be one of .*'drop'"):
        BuildConfig(inputs=[ExpressionInput(two)], id_conflicts="newest")  # type: ignore[arg-type]
