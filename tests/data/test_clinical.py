from __future__ import annotations

import dataclasses
import gzip
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bulkfm.data.clinical import (
    MUTATION_DTYPE,
    SAMPLE_TYPES,
    TCGABarcode,
    annotate_samples,
    as_mutation_calls,
    filter_sample_type,
    join_mutations,
    join_survival,
    mutation_status,
    parse_gtex_id,
    parse_sample_ids,
    parse_tcga_barcode,
    read_mutation_table,
    read_survival_table,
)
from bulkfm.errors import ClinicalMatchError, DuplicateIdError, InputFileError

# ------------------------------------------------------------------- barcodes


def test_parse_full_aliquot_barcode():
    b = parse_tcga_barcode("TCGA-OR-A5L9-01A-11R-A29S-07")
    assert b == TCGABarcode(
        barcode="TCGA-OR-A5L9-01A-11R-A29S-07",
        project="TCGA",
        tss="OR",
        participant="A5L9",
        patient="TCGA-OR-A5L9",
        sample_code="01",
        sample_type="tumor",
        sample_type_name="Primary Solid Tumor",
        vial="A",
        portion="11",
        analyte="R",
        plate="A29S",
        center="07",
    )
    assert b.sample == "TCGA-OR-A5L9-01"
    assert b.is_tumor and not b.is_normal


@pytest.mark.parametrize(
    ("barcode", "expected"),
    [
        ("TCGA-OR-A5L9", {"sample_code": None, "sample_type": None, "vial": None}),
        ("TCGA-06-0125-11", {"sample_code": "11", "sample_type": "normal", "vial": None}),
        ("TCGA-D3-A1Q1-06A", {"sample_code": "06", "sample_type": "metastatic", "vial": "A"}),
        ("TCGA-02-0001-01C-01D", {"vial": "C", "portion": "01", "analyte": "D", "plate": None}),
        ("TCGA-02-0001-10A-01W-0188", {"sample_type": "blood_normal", "plate": "0188"}),
    ],
)
def test_parse_shorter_barcodes(barcode, expected):
    b = parse_tcga_barcode(barcode)
    assert b.patient == barcode[:12]
    for key, value in expected.items():
        assert getattr(b, key) == value, key
    assert b.center is None


@pytest.mark.parametrize(
    ("code", "short", "name"),
    [
        ("01", "tumor", "Primary Solid Tumor"),
        ("11", "normal", "Solid Tissue Normal"),
        ("06", "metastatic", "Metastatic"),
        ("03", "blood_tumor", "Primary Blood Derived Cancer - Peripheral Blood"),
        ("10", "blood_normal", "Blood Derived Normal"),
    ],
)
def test_sample_type_codes(code, short, name):
    b = parse_tcga_barcode(f"TCGA-OR-A5J1-{code}A")
    assert (b.sample_type, b.sample_type_name) == (short, name)
    assert SAMPLE_TYPES[code] == (short, name)


def test_unknown_sample_type_code_is_kept():
    b = parse_tcga_barcode("TCGA-OR-A5J1-77A")
    assert b.sample_type == "unknown" and b.sample_code == "77"


def test_parse_accepts_dots_and_lowercase():
    assert parse_tcga_barcode("tcga.or.a5j1.11a").sample == "TCGA-OR-A5J1-11"


def test_barcode_is_frozen():
    b = parse_tcga_barcode("TCGA-OR-A5J1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.patient = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad", ["TCGA-OR-A5J1-1A", "TCGA-OR", "GTEX-SNMC-0826", "TCGA-OR-A5J1-01A-11R-A29S-07-X", ""]
)
def test_malformed_barcode(bad):
    with pytest.raises(ClinicalMatchError, match=r"not a TCGA barcode.*e.g. TCGA-OR-A5J1"):
        parse_tcga_barcode(bad)


def test_parse_gtex_id():
    assert parse_gtex_id("GTEX-SNMC-0826-SM-4DM66") == "GTEX-SNMC"
    assert parse_gtex_id("GTEX-1117F") == "GTEX-1117F"
    assert parse_gtex_id("GTEX.111YS.0006.SM.5NQBE") == "GTEX-111YS"


def test_parse_gtex_id_malformed():
    with pytest.raises(ClinicalMatchError, match=r"not a GTEx sample id.*GTEX-SNMC"):
        parse_gtex_id("TCGA-OR-A5J1-01A")


def test_vectorised_parse_agrees_with_scalar_parse():
    rng = np.random.default_rng(1)
    codes = list(SAMPLE_TYPES)
    ids = [
        f"TCGA-{rng.choice(list('ABCD'))}{rng.integers(10)}-{rng.integers(1000, 9999)}"
        f"-{rng.choice(codes)}{rng.choice(list('AB'))}-{rng.integers(10, 99)}R"
        f"-A{rng.integers(100, 999)}-07"
        for _ in range(200)
    ]
    ids = [i[: rng.choice([12, 15, 16, 20, 25, 28])] for i in ids]
    table = parse_sample_ids(ids)
    for sample_id, row in table.iterrows():
        b = parse_tcga_barcode(sample_id)
        assert row["patient"] == b.patient
        assert row["sample"] == b.sample
        assert row["sample_type"] == b.sample_type
        for part in ("vial", "portion", "analyte", "plate", "center"):
            assert row[part] == getattr(b, part)


# ------------------------------------------------------------------- annotate / filter

MIXED_IDS = [
    "TCGA-OR-A5J1-01A-11R-A29S-07",
    "TCGA-OR-A5J1-11A-11R-A29S-07",
    "TCGA-D3-A1Q1-06A",
    "GTEX-SNMC-0826-SM-4DM66",
    "my_sample_7",
]


def _mixed(ids: list[str] | None = None) -> ad.AnnData:
    ids = ids or MIXED_IDS
    return ad.AnnData(X=np.ones((len(ids), 3), dtype=np.float32), obs=pd.DataFrame(index=ids))


def test_annotate_samples_mixed():
    a = _mixed()
    assert annotate_samples(a) is a
    obs = a.obs
    assert list(obs["study"]) == ["TCGA", "TCGA", "TCGA", "GTEx", "unknown"]
    assert list(obs["patient"]) == [
        "TCGA-OR-A5J1",
        "TCGA-OR-A5J1",
        "TCGA-D3-A1Q1",
        "GTEX-SNMC",
        "my_sample_7",
    ]
    assert list(obs["sample_type"][:4]) == ["tumor", "normal", "metastatic", "normal"]
    assert pd.isna(obs["sample_type"].iloc[4])
    assert list(obs["sample_type_code"][:3]) == ["01", "11", "06"]
    assert pd.isna(obs["sample_type_code"].iloc[3])
    assert obs["plate"].iloc[0] == "A29S" and obs["center"].iloc[0] == "07"
    assert obs["vial"].iloc[2] == "A" and pd.isna(obs["portion"].iloc[2])


def test_annotate_keeps_user_values_unless_overwrite():
    a = _mixed()
    a.obs["sample_type"] = ["user", None, None, None, "cell_line"]
    annotate_samples(a)
    assert list(a.obs["sample_type"]) == ["user", "normal", "metastatic", "normal", "cell_line"]
    annotate_samples(a, overwrite=True)
    assert a.obs["sample_type"].iloc[0] == "tumor"
    assert pd.isna(a.obs["sample_type"].iloc[4])


def test_annotate_is_fast_for_10k_samples():
    import time

    ids = [f"TCGA-AB-{i:04d}-01A-11R-A29S-07" for i in range(10_000)]
    a = _mixed(ids)
    start = time.perf_counter()
    annotate_samples(a)
    assert time.perf_counter() - start < 3.0
    assert a.obs["patient"].nunique() == 10_000


def test_filter_sample_type():
    a = _mixed()
    tumours = filter_sample_type(a)
    assert list(tumours.obs_names) == [MIXED_IDS[0]]
    both = filter_sample_type(annotate_samples(a), keep=("tumor", "metastatic"))
    assert list(both.obs_names) == [MIXED_IDS[0], MIXED_IDS[2]]
    assert both.is_view is False


def test_filter_sample_type_nothing_left():
    a = annotate_samples(_mixed())
    with pytest.raises(
        ClinicalMatchError, match=r"present: \{.*'normal': 2.*--sample-types \(keep= in Python\)"
    ):
        filter_sample_type(a, keep="recurrent_tumor")


# ------------------------------------------------------------------- survival

CDR_HEADER = [
    "bcr_patient_barcode",
    "type",
    "vital_status",
    "OS",
    "OS.time",
    "DSS",
    "DSS.time",
    "DFI",
    "DFI.time",
    "PFI",
    "PFI.time",
]
CDR_ROWS = [
    ["TCGA-OR-A5J1", "ACC", "Dead", "1", "1355", "1", "1355", "1", "754", "1", "754"],
    ["TCGA-OR-A5J2", "ACC", "Dead", "1", "1677", "1", "1677", "", "", "1", "289"],
    ["TCGA-OR-A5J3", "ACC", "Alive", "0", "2091", "0", "2091", "1", "53", "1", "53"],
    ["TCGA-AB-0001", "LAML", "Alive", "0", "", "[Not Available]", "", "", "", "", ""],
    ["TCGA-AB-0002", "LAML", "Dead", "1.0", "30.0", "1", "30", "", "", "1", "30"],
]
# hand-derived: patients with a known time and event for each endpoint
EXPECTED = {
    "OS": {"TCGA-OR-A5J1": (1355, 1), "TCGA-OR-A5J2": (1677, 1), "TCGA-OR-A5J3": (2091, 0),
           "TCGA-AB-0002": (30, 1)},
    "DSS": {"TCGA-OR-A5J1": (1355, 1), "TCGA-OR-A5J2": (1677, 1), "TCGA-OR-A5J3": (2091, 0),
            "TCGA-AB-0002": (30, 1)},
    "DFI": {"TCGA-OR-A5J1": (754, 1), "TCGA-OR-A5J3": (53, 1)},
    "PFI": {"TCGA-OR-A5J1": (754, 1), "TCGA-OR-A5J2": (289, 1), "TCGA-OR-A5J3": (53, 1),
            "TCGA-AB-0002": (30, 1)},
}  # fmt: skip


def _write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    text = "\n".join("\t".join(r) for r in [header, *rows]) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture
def cdr(tmp_path) -> Path:
    return _write_tsv(tmp_path / "cdr.tsv.gz", CDR_HEADER, CDR_ROWS)


@pytest.mark.parametrize("endpoint", ["OS", "DSS", "DFI", "PFI"])
def test_read_cdr_every_endpoint(cdr, endpoint):
    table = read_survival_table(cdr, endpoint=endpoint)
    got = {pid: (row.time, row.event) for pid, row in table.iterrows()}
    assert got == EXPECTED[endpoint]
    assert table["event"].dtype == np.int64
    assert table["time"].dtype == np.float64
    assert table.index.name == "patient"
    assert table.loc["TCGA-OR-A5J1", "cohort"] == "ACC"
    report = table.attrs["bulkfm_survival"]
    assert report["n_rows"] == 5
    assert report["n_dropped_missing"] == 5 - len(EXPECTED[endpoint])
    assert report["time_column"] == f"{endpoint}.time"


def test_read_survival_custom_columns(tmp_path):
    path = tmp_path / "surv.csv"
    pd.DataFrame(
        {"case": ["a", "b", "c"], "days": [10, 20, 30], "dead": [1, 0, 1], "grp": ["X", "Y", "X"]}
    ).to_csv(path, index=False)
    table = read_survival_table(
        path, id_column="case", time_column="days", event_column="dead", cohort_column="grp"
    )
    assert table.to_dict("index") == {
        "a": {"time": 10.0, "event": 1, "cohort": "X"},
        "b": {"time": 20.0, "event": 0, "cohort": "Y"},
        "c": {"time": 30.0, "event": 1, "cohort": "X"},
    }


def test_read_survival_aliases_and_vital_status():
    df = pd.DataFrame(
        {"patient_id": ["p1", "p2", "p3"], "time": [5.0, 6.0, 7.0],
         "vital_status": ["Dead", "Alive", "[Not Available]"]}
    )  # fmt: skip
    table = read_survival_table(df, endpoint="custom")
    assert table["event"].to_dict() == {"p1": 1, "p2": 0}
    assert "cohort" not in table.columns


def test_read_survival_roundtrip_of_own_output(cdr):
    first = read_survival_table(cdr)
    again = read_survival_table(first)
    pd.testing.assert_frame_equal(first, again)


def test_read_survival_missing_explicit_column(cdr):
    with pytest.raises(ClinicalMatchError, match=r"'OS_days' not in the table.*'OS.time'"):
        read_survival_table(cdr, time_column="OS_days")


def test_read_survival_no_time_column():
    df = pd.DataFrame({"patient": ["a"], "event": [1]})
    with pytest.raises(ClinicalMatchError, match=r"no time column.*\['patient', 'event'\]"):
        read_survival_table(df)


def test_read_survival_no_id_column():
    df = pd.DataFrame({"who": ["a"], "time": [1.0], "event": [1]})
    with pytest.raises(ClinicalMatchError, match=r"no id column.*id_column="):
        read_survival_table(df)


def test_read_survival_duplicate_ids():
    df = pd.DataFrame({"patient": ["a", "b", "a"], "time": [1.0, 2.0, 3.0], "event": [1, 0, 1]})
    with pytest.raises(DuplicateIdError, match=r"1 duplicated ids.*\['a'\]"):
        read_survival_table(df)


@pytest.mark.parametrize("bad", [2, -1])
def test_read_survival_bad_event(bad):
    df = pd.DataFrame({"patient": ["a", "b"], "time": [1.0, 2.0], "event": [1, bad]})
    with pytest.raises(ClinicalMatchError, match=rf"must be 0 \(censored\) or 1.*{bad}"):
        read_survival_table(df)


def test_read_survival_unparsable_event():
    df = pd.DataFrame({"patient": ["a", "b"], "time": [1.0, 2.0], "event": ["1", "maybe"]})
    with pytest.raises(ClinicalMatchError, match=r"non-numeric values.*maybe"):
        read_survival_table(df)


def test_read_survival_negative_time():
    df = pd.DataFrame({"patient": ["a", "b"], "time": [1.0, -2.0], "event": [1, 0]})
    with pytest.raises(ClinicalMatchError, match=r"negative times.*b"):
        read_survival_table(df)


def test_read_survival_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        read_survival_table(tmp_path / "nope.tsv")


def test_read_survival_empty_table():
    with pytest.raises(ClinicalMatchError, match="no rows"):
        read_survival_table(pd.DataFrame({"patient": [], "time": [], "event": []}))


def test_join_survival_full_and_partial(cdr, caplog):
    ids = [
        "TCGA-OR-A5J1-01A-11R-A29S-07",
        "TCGA-OR-A5J1-11A-11R-A29S-07",
        "TCGA-OR-A5J3-01A",
        "TCGA-ZZ-9999-01A",
        "GTEX-SNMC-0826-SM-4DM66",
    ]
    a = _mixed(ids)
    a.obs["cohort"] = [None, None, "ACC_user", None, "GTEx_kidney"]
    with caplog.at_level(logging.WARNING):
        report = join_survival(a, cdr, endpoint="PFI")
    assert report["n_matched"] == 3
    assert report["n_unmatched"] == 2
    assert report["n_patients_matched"] == 2
    assert report["n_events"] == 3
    assert report["unmatched_examples"] == ["TCGA-ZZ-9999", "GTEX-SNMC"]
    assert a.uns["bulkfm"]["survival"] == report
    assert "2 of 5 samples have no PFI survival row" in caplog.text
    np.testing.assert_array_equal(a.obs["survival_time"], [754, 754, 53, np.nan, np.nan])
    np.testing.assert_array_equal(a.obs["survival_event"], [1, 1, 1, np.nan, np.nan])
    assert list(a.obs["survival_endpoint"]) == ["PFI", "PFI", "PFI", None, None]
    assert list(a.obs["cohort"]) == ["ACC", "ACC", "ACC_user", None, "GTEx_kidney"]
    assert report["n_cohort_filled"] == 2


def test_join_survival_endpoint_from_read_table(cdr):
    a = _mixed(["TCGA-OR-A5J1-01A"])
    join_survival(a, read_survival_table(cdr, endpoint="DFI"))
    assert a.obs["survival_endpoint"].iloc[0] == "DFI"
    assert a.obs["survival_time"].iloc[0] == 754


def test_join_survival_endpoint_conflict(cdr):
    table = read_survival_table(cdr, endpoint="DFI")
    with pytest.raises(ClinicalMatchError, match="read for endpoint 'DFI' but endpoint='OS'"):
        join_survival(_mixed(["TCGA-OR-A5J1-01A"]), table, endpoint="OS")


def test_read_mutation_table_custom_id_column():
    df = pd.DataFrame({"aliquot": ["TCGA-OR-A5J1-01A"], "TP53": [1]})
    assert read_mutation_table(df, id_column="aliquot")["barcode"].tolist() == ["TCGA-OR-A5J1-01A"]
    with pytest.raises(ClinicalMatchError, match=r"no id column.*\['aliquot', 'TP53'\]"):
        read_mutation_table(df)


def test_join_survival_no_match(cdr):
    a = _mixed(["sampleA", "sampleB"])
    with pytest.raises(ClinicalMatchError, match=r"no sample matches.*\['sampleA'.*12 characters"):
        join_survival(a, cdr)


def test_join_survival_require_all(cdr):
    a = _mixed(["TCGA-OR-A5J1-01A", "TCGA-ZZ-9999-01A"])
    with pytest.raises(ClinicalMatchError, match="1 of 2 samples have no survival row"):
        join_survival(a, cdr, require="all")


def test_join_survival_on_sample_ids():
    df = pd.DataFrame({"sample": ["s1", "s2"], "time": [3.0, 4.0], "event": [0, 1]})
    a = _mixed(["s2", "s1", "s3"])
    report = join_survival(a, df, on="sample")
    assert report["n_matched"] == 2
    np.testing.assert_array_equal(a.obs["survival_time"], [4.0, 3.0, np.nan])


# ------------------------------------------------------------------- mutations

MUT_HEADER = ["Tumor_Sample_Barcode", "cohort", "source", "TP53", "KRAS", "IDH1"]
MUT_ROWS = [
    ["TCGA-OR-A5J1-01A-11D-A29I-10", "ACC", "MC3", "1", "0", "0"],
    # two DNA aliquots of the same tumour sample: collapsed with max
    ["TCGA-OR-A5J2-01A-11D-A29I-10", "ACC", "MC3", "0", "1", "0"],
    ["TCGA-OR-A5J2-01B-11D-A29I-10", "ACC", "MC3", "1", "0", "0"],
    # patient-level (Firehose) row
    ["TCGA-AB-0001", "LAML", "Firehose", "0", "0", "1"],
    # primary tumour only: a metastasis of this patient falls back to it
    ["TCGA-D3-A1Q1-01A-11D-A19J-08", "SKCM", "MC3", "0", "1", "0"],
]


@pytest.fixture
def muts(tmp_path) -> Path:
    return _write_tsv(tmp_path / "muts.tsv.gz", MUT_HEADER, MUT_ROWS)


RNA_IDS = [
    "TCGA-OR-A5J1-01A-11R-A29S-07",  # 15-char match
    "TCGA-OR-A5J1-11A-11R-A29S-07",  # normal of a mutated patient: never gets calls
    "TCGA-OR-A5J2-01A-11R-A29S-07",  # duplicated key -> max
    "TCGA-AB-0001-03A-01T-0735-13",  # blood tumour, patient-level fallback
    "TCGA-D3-A1Q1-06A-11R-A18T-07",  # metastasis, fallback to the patient's primary
    "TCGA-ZZ-9999-01A-11R-A29S-07",  # not in the table
    "GTEX-SNMC-0826-SM-4DM66",
]


def test_read_mutation_table(muts):
    table = read_mutation_table(muts)
    assert list(table.columns) == ["barcode", "cohort", "source", "TP53", "KRAS", "IDH1"]
    assert all(str(table[g].dtype) == "Int8" for g in ("TP53", "KRAS", "IDH1"))
    assert read_mutation_table(muts, genes=["kras"]).columns[-1] == "KRAS"


def test_read_mutation_table_unknown_genes(muts):
    with pytest.raises(ClinicalMatchError, match=r"\['MYC'\].*known genes: \['TP53', 'KRAS'"):
        read_mutation_table(muts, genes=["TP53", "MYC"])


def test_read_mutation_table_non_binary():
    df = pd.DataFrame({"Tumor_Sample_Barcode": ["TCGA-OR-A5J1-01A"], "TP53": [3]})
    with pytest.raises(ClinicalMatchError, match=r"must be 0/1.*binarise"):
        read_mutation_table(df)


def test_read_mutation_table_no_gene_columns():
    df = pd.DataFrame({"Tumor_Sample_Barcode": ["TCGA-OR-A5J1-01A"], "cohort": ["ACC"]})
    with pytest.raises(ClinicalMatchError, match="no 0/1 gene columns"):
        read_mutation_table(df)


def test_join_mutations_auto(muts):
    a = _mixed(RNA_IDS)
    annotate_samples(a)
    report = join_mutations(a, muts)
    got = a.obs[["mut_TP53", "mut_KRAS", "mut_IDH1"]]
    assert all(t == MUTATION_DTYPE for t in got.dtypes)
    got = got.apply(lambda c: c.astype(object).astype("Int8"))
    expected = [
        [1, 0, 0],
        [pd.NA] * 3,
        [1, 1, 0],
        [0, 0, 1],
        [0, 1, 0],
        [pd.NA] * 3,
        [pd.NA] * 3,
    ]
    pd.testing.assert_frame_equal(
        got, pd.DataFrame(expected, index=a.obs_names, columns=got.columns, dtype="Int8")
    )
    assert report["n_matched_sample"] == 2
    assert report["n_matched_patient"] == 2
    assert report["n_unmatched_tumor"] == 1
    assert report["n_normal_excluded"] == 2  # TCGA normal + GTEx
    assert report["n_duplicate_sample_keys"] == 1
    assert report["n_mutated"] == {"TP53": 2, "KRAS": 2, "IDH1": 1}
    assert a.uns["bulkfm"]["mutations"] == report


def test_join_mutations_sample_only(muts):
    a = _mixed(RNA_IDS)
    report = join_mutations(a, muts, on="sample", genes=["TP53"])
    assert report["n_matched"] == 2 and report["n_matched_patient"] == 0
    assert a.obs["mut_TP53"].notna().sum() == 2
    assert "mut_KRAS" not in a.obs


def test_join_mutations_normals_never_get_calls(tmp_path):
    # even a table row keyed on a normal sample, or a patient-only row, must not reach normals
    rows = [
        ["TCGA-OR-A5J1-11A-11D-A29I-10", "ACC", "MC3", "1", "1", "1"],
        ["TCGA-OR-A5J1", "ACC", "Firehose", "0", "0", "0"],
    ]
    path = _write_tsv(tmp_path / "m.tsv", MUT_HEADER, rows)
    a = _mixed(["TCGA-OR-A5J1-11A-11R-A29S-07", "TCGA-OR-A5J1-10A", "TCGA-OR-A5J1-01A"])
    report = join_mutations(a, path)
    assert a.obs["mut_TP53"].isna().tolist() == [True, True, False]
    # the tumour falls back to the patient's tumour row, not to the normal row's calls
    assert a.obs["mut_TP53"].iloc[2] == 0
    assert report["n_table_normal_rows_dropped"] == 1


def test_join_mutations_no_match(muts):
    a = _mixed(["TCGA-ZZ-9999-01A", "GTEX-SNMC-0826"])
    with pytest.raises(ClinicalMatchError, match="no sample matches the mutation table"):
        join_mutations(a, muts)


def test_join_mutations_bad_on(muts):
    with pytest.raises(ClinicalMatchError, match="on must be"):
        join_mutations(_mixed(RNA_IDS), muts, on="barcode")  # type: ignore[arg-type]


# ------------------------------------------------------------------- real data


def _first_columns(path: Path, n: int = 2) -> list[list[str]]:
    with gzip.open(path, "rt") as fh:
        next(fh)
        return [line.split("\t", n)[:n] for line in fh]


@pytest.mark.realdata
def test_real_cdr_table(shared_data):
    path = shared_data / "clinical" / "tcga_cdr_survival.tsv.gz"
    raw = pd.read_csv(path, sep="\t")
    assert len(raw) == 11_160
    assert raw["OS"].notna().sum() == 11_151
    assert int(raw["OS"].sum()) == 3_622
    for endpoint in ("OS", "DSS", "DFI", "PFI"):
        table = read_survival_table(path, endpoint=endpoint)
        both = raw[raw[endpoint].notna() & raw[f"{endpoint}.time"].notna()]
        assert len(table) == len(both)
        assert int(table["event"].sum()) == int(both[endpoint].sum())
        assert table.attrs["bulkfm_survival"]["n_rows"] == 11_160
        assert table["cohort"].nunique() == both["type"].nunique()
        assert (table["cohort"] == both.set_index("bcr_patient_barcode")["type"]).all()
    # every tumour of tcga/ has a CDR row; the join matches those with a known OS
    rows = _first_columns(shared_data / "tcga" / "tcga_tumor_counts_7cohorts.tsv.gz")
    barcodes = [r[0] for r in rows]
    assert len(barcodes) == 384
    patients = pd.Series([b[:12] for b in barcodes])
    assert patients.isin(raw["bcr_patient_barcode"]).all()
    known = raw.loc[raw["OS"].notna() & raw["OS.time"].notna(), "bcr_patient_barcode"]
    a = _mixed(barcodes)
    report = join_survival(a, path)
    assert report["n_matched"] == int(patients.isin(known).sum())
    matched = a.obs["survival_time"].notna().to_numpy()
    file_cohorts = np.array([r[1] for r in rows], dtype=object)
    assert (a.obs["cohort"].to_numpy()[matched] == file_cohorts[matched]).all()


@pytest.mark.realdata
def test_real_driver_table(shared_data):
    path = shared_data / "clinical" / "tcga_driver_mutations.tsv.gz"
    table = read_mutation_table(path)
    assert len(table) == 9_025
    genes = table.attrs["bulkfm_mutations"]["genes"]
    assert len(genes) == 20 and genes[0] == "TP53"
    # RNA-like barcodes for the first 300 full-length rows: their calls must come back
    full = table[table["barcode"].str.len() >= 16].head(300)
    rna = [f"{b[:16]}-11R-A29S-07" for b in full["barcode"]]
    a = _mixed(rna)
    report = join_mutations(a, table)
    assert report["n_matched_sample"] == 300
    for gene in ("TP53", "KRAS", "IDH1"):
        np.testing.assert_array_equal(
            a.obs[f"mut_{gene}"].to_numpy(dtype=int), full[gene].to_numpy(dtype=int)
        )


# ------------------------------------------------------------------ text encodings (issue 13)

_BARCODES = [f"TCGA-OR-A5J{i}-01A" for i in range(6)]


def test_mutation_text_encodings_are_parsed():
    df = pd.DataFrame(
        {
            "Tumor_Sample_Barcode": _BARCODES,
            "TP53": ["mut", "wt", "WT", "Mutated", "NA", "wild-type"],
            "KRAS": ["yes", "no", "No", "YES", "", "no"],
            "IDH1": ["True", "False", "false", "true", "false", "False"],
            "PIK3CA": ["Missense_Mutation", "0", "0", "E545K;H1047R", "0", "p.R88Q"],
        }
    )
    table = read_mutation_table(df)
    assert table["TP53"].tolist()[:4] == [1, 0, 0, 1]
    assert pd.isna(table["TP53"].iloc[4])
    assert table["KRAS"].tolist()[:4] == [1, 0, 0, 1]
    assert table["IDH1"].tolist() == [1, 0, 0, 1, 0, 0]
    assert table["PIK3CA"].tolist() == [1, 0, 0, 1, 0, 1]


def test_mutation_column_with_unknown_text_is_named():
    df = pd.DataFrame({"Tumor_Sample_Barcode": _BARCODES[:3], "TP53": ["1", "0", "maybe"]})
    with pytest.raises(
        ClinicalMatchError, match=r"'TP53' .*\['maybe'\].*data row 3.*Accepted: 0/1"
    ):
        read_mutation_table(df)


def test_mutation_genes_naming_an_unreadable_column_says_why(caplog):
    df = pd.DataFrame(
        {
            "Tumor_Sample_Barcode": _BARCODES[:2],
            "TP53": ["weird", "odd"],
            "KRAS": ["0", "1"],
        }
    )
    with caplog.at_level(logging.WARNING, logger="bulkfm.data.clinical"):
        assert read_mutation_table(df).attrs["bulkfm_mutations"]["genes"] == ["KRAS"]
    assert "ignoring 1 column(s)" in caplog.text
    with pytest.raises(
        ClinicalMatchError, match=r"--mutation-genes TP53: column 'TP53' .*no mutation calls"
    ):
        read_mutation_table(df, genes=["TP53"])


def test_survival_table_without_any_known_time_names_the_rows(tmp_path):
    rows = [[*r[:4], "NaN", *r[5:]] for r in CDR_ROWS]
    path = _write_tsv(tmp_path / "cdr.tsv", CDR_HEADER, rows)
    with pytest.raises(
        ClinicalMatchError,
        match=r"no row of the survival table \(--survival\).*5 with no time in 'OS\.time'.*"
        r"TCGA-OR-A5J1.*--endpoint",
    ):
        read_survival_table(path)


def test_survival_rows_left_out_are_named(cdr, caplog):
    with caplog.at_level(logging.WARNING, logger="bulkfm.data.clinical"):
        read_survival_table(cdr, endpoint="DFI")
    assert "with no time in 'DFI.time'" in caplog.text
    assert "e.g. ['TCGA-OR-A5J2'" in caplog.text


# ------------------------------------------------------------ mutation dtype (issue 5)


def test_mutation_calls_are_a_0_1_categorical_that_h5ad_keeps(muts, tmp_path):
    """scanpy colours categoricals as classes; Int8 was drawn on a continuous scale."""
    from bulkfm.io import write_h5ad

    a = _mixed(RNA_IDS)
    annotate_samples(a)
    join_mutations(a, muts)
    col = a.obs["mut_TP53"]
    assert isinstance(col.dtype, pd.CategoricalDtype)
    assert list(col.cat.categories) == [0, 1]
    back = ad.read_h5ad(write_h5ad(a, tmp_path / "m.h5ad"))
    for gene in ("TP53", "KRAS", "IDH1"):
        read = back.obs[f"mut_{gene}"]
        assert isinstance(read.dtype, pd.CategoricalDtype)
        assert list(read.cat.categories) == [0, 1]
        np.testing.assert_array_equal(mutation_status(back.obs, gene), mutation_status(a.obs, gene))
    # the same calls as the table says, read through the one reader
    np.testing.assert_array_equal(
        mutation_status(back.obs, "TP53"), [1, np.nan, 1, 0, 0, np.nan, np.nan]
    )


@pytest.mark.parametrize(
    "column",
    [
        pd.array([1, 0, None], dtype="Int8"),  # files written before the categorical
        np.array([1.0, 0.0, np.nan]),
        as_mutation_calls([1, 0, None]),
    ],
)
def test_mutation_status_reads_every_encoding(column):
    obs = pd.DataFrame({"mut_TP53": column})
    np.testing.assert_array_equal(mutation_status(obs, "TP53"), [1.0, 0.0, np.nan])


def test_mutation_status_errors_name_the_problem():
    obs = pd.DataFrame({"mut_TP53": [0, 2, 1]})
    with pytest.raises(ClinicalMatchError, match=r"mut_TP53 must be 0/1.*\[2\]"):
        mutation_status(obs, "TP53")
    with pytest.raises(ClinicalMatchError, match=r"no column 'mut_KRAS'.*\['TP53'\]"):
        mutation_status(obs, "KRAS")
    with pytest.raises(ClinicalMatchError, match="must be 0, 1 or NA"):
        as_mutation_calls([0, 1, 3])


# ------------------------------------------------- joins through sample_id (issue 4)


def test_joins_use_sample_id_not_renamed_obs_names(muts, cdr, caplog):
    """A build keeping an aliquot twice renames one copy; both copies must get their calls."""
    ids = ["TCGA-OR-A5J1-01A-11R-A29S-07", "TCGA-OR-A5J2-01A-11R-A29S-07"]
    names = [ids[0], f"{ids[0]}|second_source", ids[1]]
    a = ad.AnnData(
        X=np.ones((3, 2), dtype=np.float32),
        obs=pd.DataFrame({"sample_id": [ids[0], ids[0], ids[1]]}, index=names),
    )
    with caplog.at_level(logging.WARNING, logger="bulkfm.data.clinical"):
        annotate_samples(a)
        join_mutations(a, muts)
    assert list(a.obs["study"]) == ["TCGA"] * 3
    assert list(a.obs["patient"]) == ["TCGA-OR-A5J1", "TCGA-OR-A5J1", "TCGA-OR-A5J2"]
    np.testing.assert_array_equal(mutation_status(a.obs, "TP53"), [1, 1, 1])
    np.testing.assert_array_equal(mutation_status(a.obs, "KRAS"), [0, 0, 1])
    assert "not TCGA barcodes" not in caplog.text and "no row" not in caplog.text
    report = join_survival(a, cdr)
    assert report["n_matched"] == 3
    np.testing.assert_array_equal(a.obs["survival_time"], [1355, 1355, 1677])
    # on="sample" also reads the sample ids: a per-sample table reaches both copies
    per_sample = pd.DataFrame({"sample": ids, "time": [5.0, 7.0], "event": [1, 0]})
    join_survival(a, per_sample, on="sample")
    np.testing.assert_array_equal(a.obs["survival_time"], [5.0, 5.0, 7.0])


def test_ids_that_are_no_barcode_are_warned_with_what_happens(caplog):
    a = _mixed(["TCGA-OR-A5J1-01A|copy", "TCGA-OR-A5J2-01A"])
    with caplog.at_level(logging.WARNING, logger="bulkfm.data.clinical"):
        annotate_samples(a)
    assert list(a.obs["study"]) == ["unknown", "TCGA"]
    assert "1 sample ids start with TCGA but are not TCGA barcodes" in caplog.text
    assert "study 'unknown', patient = their own id" in caplog.text
    assert "obs['sample_id']" in caplog.text
