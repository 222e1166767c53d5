from __future__ import annotations

import gzip
import json
import tracemalloc
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bulkfm.data import readers
from bulkfm.data.readers import read_expression
from bulkfm.errors import (
    BulkfmWarning,
    ConfigError,
    DuplicateIdError,
    ExpressionValueError,
    InputFileError,
    OrientationError,
    UnitError,
)
from bulkfm.io import write_h5ad

GENES = [
    "ENSG00000000003.15",
    "ENSG00000000005.6",
    "ENSG00000000419.13",
    "ENSG00000002586.20_PAR_Y",
]
SAMPLES = ["TCGA-OR-A5J1-01A", "TCGA-OR-A5J2-01A", "TCGA-OR-A5J3-01A"]


def _write(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def _values(n_samples: int, n_genes: int, seed: int = 0) -> np.ndarray:
    """Count-like values with two decimals, exactly representable after a float32 round trip."""
    rng = np.random.default_rng(seed)
    return np.round(rng.gamma(0.5, 80.0, size=(n_samples, n_genes)), 2).astype(np.float32)


def _table_text(
    row_labels: dict[str, list[str]], col_labels: list[str], values: np.ndarray, sep: str
) -> str:
    header = sep.join([*row_labels, *col_labels])
    lines = [header]
    for i in range(values.shape[0]):
        labels = [row_labels[k][i] for k in row_labels]
        lines.append(sep.join(labels + [f"{v:g}" for v in values[i]]))
    return "\n".join(lines) + "\n"


def _source(adata: ad.AnnData) -> dict:
    return adata.uns["bulkfm"]["source"]


# ----------------------------------------------------------------------------- GDC

GDC_COLUMNS = [
    "gene_id",
    "gene_name",
    "gene_type",
    "unstranded",
    "stranded_first",
    "stranded_second",
    "tpm_unstranded",
    "fpkm_unstranded",
    "fpkm_uq_unstranded",
]
GDC_SYMBOLS = ["TSPAN6", "TNMD", "DPM1", "CD99"]
GDC_TYPES = ["protein_coding"] * 4


def _gdc_text(counts: np.ndarray, tpm: np.ndarray, genes: list[str] = GENES) -> str:
    lines = ["# gene-model: GENCODE v36", "\t".join(GDC_COLUMNS)]
    for name, n in zip(
        ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"),
        (11, 22, 33, 44),
        strict=True,
    ):
        lines.append("\t".join([name, "", "", str(n), str(n), str(n), "", "", ""]))
    for g, s, t, c, v in zip(genes, GDC_SYMBOLS, GDC_TYPES, counts, tpm, strict=False):
        lines.append("\t".join([g, s, t, f"{c:g}", "0", f"{c:g}", f"{v:g}", "1.5", "2.5"]))
    return "\n".join(lines) + "\n"


@pytest.fixture()
def gdc(tmp_path: Path) -> dict:
    """Three GDC files laid out as a download: nested in uuid folders, one gzipped."""
    folder = tmp_path / "gdc"
    counts = np.round(_values(3, 4, seed=1) * 10)
    tpm = _values(3, 4, seed=2)
    names = [
        "aaa.rna_seq.augmented_star_gene_counts.tsv",
        "bbb.rna_seq.augmented_star_gene_counts.tsv.gz",
        "ccc.tsv",
    ]
    paths = [folder / "uuid-1" / names[0], folder / "uuid-2" / names[1], folder / names[2]]
    for p, c, t in zip(paths, counts, tpm, strict=True):
        p.parent.mkdir(parents=True, exist_ok=True)
        _write(p, _gdc_text(c, t))
    (folder / "MANIFEST.txt").write_text("id\tfilename\tmd5\n1\taaa\tx\n")
    (folder / "uuid-1" / "logs").mkdir()
    (folder / "uuid-1" / "logs" / "run.log").write_text("log")
    # sorted path order: gdc/ccc.tsv, gdc/uuid-1/aaa..., gdc/uuid-2/bbb...
    order = [2, 0, 1]
    return {
        "folder": folder,
        "names": [names[i] for i in order],
        "counts": counts[order],
        "tpm": tpm[order],
    }


def test_gdc_folder_reads_tpm_and_drops_count_rows(gdc) -> None:
    adata = read_expression(gdc["folder"])
    np.testing.assert_array_equal(adata.X, gdc["tpm"])
    assert adata.X.dtype == np.float32
    assert list(adata.obs_names) == ["ccc", "aaa", "bbb"]
    assert list(adata.var_names) == GENES  # versioned ids, N_* rows gone
    assert list(adata.var["raw_id"]) == GENES
    assert list(adata.var["symbol"]) == GDC_SYMBOLS
    assert list(adata.var["gene_type"]) == GDC_TYPES
    assert list(adata.obs["file_name"]) == gdc["names"]
    source = _source(adata)
    assert source["format"] == "gdc"
    assert source["value_column"] == "tpm_unstranded"
    assert (source["n_samples"], source["n_genes"]) == (3, 4)


def test_gdc_value_column_picks_counts(gdc) -> None:
    adata = read_expression(gdc["folder"], value_column="unstranded")
    np.testing.assert_array_equal(adata.X, gdc["counts"])
    assert _source(adata)["value_column"] == "unstranded"


def test_gdc_single_file_is_detected(gdc) -> None:
    path = gdc["folder"] / "ccc.tsv"
    adata = read_expression(path)
    assert _source(adata)["format"] == "gdc"
    np.testing.assert_array_equal(adata.X, gdc["tpm"][:1])


def test_gdc_wrong_value_column_lists_choices(gdc) -> None:
    with pytest.raises(
        InputFileError, match=r"--value-column tpm .*available: \['unstranded', 'stranded_first'"
    ):
        read_expression(gdc["folder"], value_column="tpm")


def _sheet(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    lines = ["File ID\tFile Name\tData Category\tProject ID\tCase ID\tSample ID\tSample Type"]
    for name, project, case, sample in rows:
        lines.append(
            f"x\t{name}\tTranscriptome Profiling\t{project}\t{case}\t{sample}\tPrimary Tumor"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gdc_sample_sheet_gives_barcodes_and_cohort(gdc, tmp_path) -> None:
    names = gdc["names"]
    sheet = _sheet(
        tmp_path / "sheet.tsv",
        [
            (names[1], "TCGA-KICH", "TCGA-KL-0001", "TCGA-KL-0001-01A"),
            (names[0], "TCGA-ACC", "TCGA-OR-0002", "TCGA-OR-0002-01A"),
            (names[2], "TCGA-KICH", "TCGA-KL-0003", "TCGA-KL-0003-01A"),
            ("not-downloaded.tsv", "TCGA-UVM", "TCGA-V4-0004", "TCGA-V4-0004-01A"),
        ],
    )
    adata = read_expression(gdc["folder"], sample_sheet=sheet)
    assert list(adata.obs_names) == ["TCGA-OR-0002-01A", "TCGA-KL-0001-01A", "TCGA-KL-0003-01A"]
    assert list(adata.obs["cohort"]) == ["ACC", "KICH", "KICH"]
    assert list(adata.obs["patient"]) == ["TCGA-OR-0002", "TCGA-KL-0001", "TCGA-KL-0003"]
    assert list(adata.obs["gdc_sample_type"]) == ["Primary Tumor"] * 3
    np.testing.assert_array_equal(adata.X, gdc["tpm"])


def test_gdc_sample_sheet_inside_the_folder_is_not_read_as_data(gdc) -> None:
    names = gdc["names"]
    rows = [(n, "TCGA-ACC", f"TCGA-OR-000{i}", f"TCGA-OR-000{i}-01A") for i, n in enumerate(names)]
    sheet = _sheet(gdc["folder"] / "gdc_sample_sheet.tsv", rows)
    adata = read_expression(gdc["folder"], sample_sheet=sheet)
    assert adata.n_obs == 3


def test_gdc_sample_sheet_missing_files(gdc, tmp_path) -> None:
    names = gdc["names"]
    sheet = _sheet(tmp_path / "sheet.tsv", [(names[0], "TCGA-ACC", "TCGA-OR-1", "TCGA-OR-1-01A")])
    with pytest.raises(InputFileError, match=r"no row for 2 of 3 files \(e\.g\. \['aaa"):
        read_expression(gdc["folder"], sample_sheet=sheet)


def test_gdc_sample_sheet_without_needed_columns(gdc, tmp_path) -> None:
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("file\tsample\naaa\tS1\n")
    with pytest.raises(InputFileError, match=r"lacks column\(s\) \['File Name', 'Sample ID'\]"):
        read_expression(gdc["folder"], sample_sheet=sheet)


def test_gdc_duplicate_samples_from_sheet(gdc, tmp_path) -> None:
    names = gdc["names"]
    rows = [(n, "TCGA-ACC", "TCGA-OR-1", "TCGA-OR-1-01A") for n in names]
    sheet = _sheet(tmp_path / "sheet.tsv", rows)
    with pytest.raises(DuplicateIdError, match=r"'TCGA-OR-1-01A' x3"):
        read_expression(gdc["folder"], sample_sheet=sheet)


def test_gdc_mismatched_gene_lists_name_the_file(gdc) -> None:
    other = [*GENES[:2], "ENSG00000999999.1", GENES[3]]
    _write(gdc["folder"] / "uuid-2" / "zzz.tsv", _gdc_text(np.ones(4), np.ones(4), genes=other))
    with pytest.raises(
        InputFileError,
        match=r"zzz\.tsv has a different gene list .*row 7 is 'ENSG00000999999\.1'",
    ):
        read_expression(gdc["folder"])


def test_gdc_folder_without_gdc_files(tmp_path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello\n")
    with pytest.raises(InputFileError, match="no GDC STAR-counts files found"):
        read_expression(folder)


def test_gdc_nan_in_values_names_the_sample(gdc) -> None:
    text = _gdc_text(np.ones(4), np.ones(4)).replace("\t1\t1.5\t", "\tNA\t1.5\t", 1)
    _write(gdc["folder"] / "ddd.tsv", text)
    with pytest.raises(ExpressionValueError, match=r"1 NaN.*sample 'ddd', gene 'ENSG00000000003"):
        read_expression(gdc["folder"])


def test_gdc_non_numeric_value_names_the_file(gdc) -> None:
    text = _gdc_text(np.ones(4), np.ones(4)).replace("\t1\t1.5\t", "\tabc\t1.5\t", 1)
    _write(gdc["folder"] / "ddd.tsv", text)
    with pytest.raises(ExpressionValueError, match=r"non-numeric value in GDC file .*ddd\.tsv"):
        read_expression(gdc["folder"])


def test_gdc_truncated_file(gdc) -> None:
    text = _gdc_text(np.ones(4), np.ones(4))
    _write(gdc["folder"] / "ddd.tsv", text[: text.rindex("\t1\t1.5")])
    with pytest.raises(InputFileError, match=r"cannot parse GDC file .*ddd\.tsv.*damaged"):
        read_expression(gdc["folder"])


# ----------------------------------------------------------------------------- wide tables


def _ref_matrix(n_samples: int = 3, n_genes: int = 4, seed: int = 0) -> np.ndarray:
    return _values(n_samples, n_genes, seed)


def _write_wide(path: Path, X: np.ndarray, orientation: str, sep: str = "\t") -> Path:
    genes = [g.split(".")[0] for g in GENES[: X.shape[1]]]
    samples = SAMPLES[: X.shape[0]]
    if path.suffix == ".parquet":
        if orientation == "samples_x_genes":
            df = pd.DataFrame(X, columns=genes).assign(sample_barcode=samples)
            df = df[["sample_barcode", *genes]]
        else:
            df = pd.DataFrame(X.T, columns=samples).assign(gene_id=genes)
            df = df[["gene_id", *samples]]
        df.to_parquet(path, index=False)
        return path
    if orientation == "samples_x_genes":
        text = _table_text({"sample_barcode": samples}, genes, X, sep)
    else:
        text = _table_text({"gene_id": genes}, samples, X.T, sep)
    return _write(path, text)


WIDE_CASES = [
    ("m.tsv", "\t"),
    ("m.csv", ","),
    ("m.txt", "\t"),
    ("m.tsv.gz", "\t"),
    ("m.csv.gz", ","),
    ("m.txt", ";"),
    ("m.parquet", None),
]


@pytest.mark.parametrize("orientation", ["samples_x_genes", "genes_x_samples"])
@pytest.mark.parametrize(("name", "sep"), WIDE_CASES)
def test_wide_round_trip(tmp_path, name, sep, orientation) -> None:
    X = _ref_matrix()
    path = _write_wide(tmp_path / name, X, orientation, sep or "\t")
    adata = read_expression(path)
    np.testing.assert_array_equal(adata.X, X)
    assert adata.X.dtype == np.float32
    assert adata.X.flags.c_contiguous
    assert list(adata.obs_names) == SAMPLES
    assert list(adata.var_names) == [g.split(".")[0] for g in GENES]
    assert list(adata.var["raw_id"]) == list(adata.var_names)
    source = _source(adata)
    assert source["format"] == "wide"
    assert source["orientation"] == orientation
    assert source["orientation_detected"] is True


@pytest.mark.parametrize("orientation", ["samples_x_genes", "genes_x_samples"])
def test_wide_multi_chunk_and_multi_block_assembly(tmp_path, monkeypatch, orientation) -> None:
    """Tiny chunks and blocks force every seam of the streaming parser to be crossed."""
    monkeypatch.setattr(readers, "_CHUNK_TEXT", 300)
    monkeypatch.setattr(readers, "_BLOCK_BYTES", 4 * 70 * 3)  # a few rows per block
    rng = np.random.default_rng(3)
    n_samples, n_genes = 57, 70
    X = np.round(rng.gamma(0.5, 50.0, size=(n_samples, n_genes)), 2).astype(np.float32)
    samples = [f"TCGA-AA-{i:04d}-01A" for i in range(n_samples)]
    genes = [f"ENSG{i:011d}" for i in range(n_genes)]
    if orientation == "samples_x_genes":
        text = _table_text({"sample": samples}, genes, X, "\t")
    else:
        text = _table_text({"gene": genes}, samples, X.T, "\t")
    adata = read_expression(_write(tmp_path / "m.tsv", text))
    np.testing.assert_array_equal(adata.X, X)
    assert list(adata.obs_names) == samples
    assert list(adata.var_names) == genes


@pytest.mark.parametrize("orientation", ["samples_x_genes", "genes_x_samples"])
def test_wide_parse_memory_stays_near_one_copy(tmp_path, monkeypatch, orientation) -> None:
    """Python-visible allocations while reading stay well below a float64 DataFrame's."""
    monkeypatch.setattr(readers, "_CHUNK_TEXT", 64 * 1024)
    monkeypatch.setattr(readers, "_BLOCK_BYTES", 256 * 1024)
    n_samples, n_genes = 400, 2000
    X = _values(n_samples, n_genes, seed=4)
    samples = [f"TCGA-AA-{i:04d}-01A" for i in range(n_samples)]
    genes = [f"ENSG{i:011d}" for i in range(n_genes)]
    if orientation == "samples_x_genes":
        text = _table_text({"sample": samples}, genes, X, "\t")
    else:
        text = _table_text({"gene": genes}, samples, X.T, "\t")
    path = _write(tmp_path / "m.tsv", text)
    tracemalloc.start()
    try:
        adata = read_expression(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(adata.X, X)
    assert peak < 3 * X.nbytes  # the promised bound; pandas.read_csv alone takes ~4x here


def test_wide_sample_annotation_columns_go_to_obs(tmp_path) -> None:
    X = _ref_matrix()
    genes = [g.split(".")[0] for g in GENES]
    text = _table_text({"sample_barcode": SAMPLES, "cohort": ["ACC", "UVM", "ACC"]}, genes, X, "\t")
    adata = read_expression(_write(tmp_path / "m.tsv", text))
    assert list(adata.obs["cohort"]) == ["ACC", "UVM", "ACC"]
    assert list(adata.obs_names) == SAMPLES
    np.testing.assert_array_equal(adata.X, X)
    assert _source(adata)["annotation_columns"] == ["sample_barcode", "cohort"]


def test_wide_gene_annotation_columns_go_to_var(tmp_path) -> None:
    X = _ref_matrix()
    symbols = ["TSPAN6", "TNMD", "DPM1", "TSPAN6"]  # duplicate symbols are legal here
    entrez = ["     7105", "    64102", "     8813", "     7105"]  # right-aligned like RNAseqDB
    text = _table_text({"Hugo_Symbol": symbols, "Entrez_Gene_Id": entrez}, SAMPLES, X.T, "\t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no anndata non-unique warning, no orientation guess
        adata = read_expression(_write(tmp_path / "m.txt.gz", text))
    assert list(adata.var_names) == symbols
    assert list(adata.var["symbol"]) == symbols
    assert list(adata.var["entrez"]) == ["7105", "64102", "8813", "7105"]
    assert list(adata.obs_names) == SAMPLES
    np.testing.assert_array_equal(adata.X, X)
    assert _source(adata)["orientation"] == "genes_x_samples"


def test_wide_gene_column_picks_the_id(tmp_path) -> None:
    X = _ref_matrix()
    text = _table_text(
        {"Hugo_Symbol": ["A", "B", "C", "D"], "Entrez_Gene_Id": ["1", "2", "3", "4"]},
        SAMPLES,
        X.T,
        "\t",
    )
    adata = read_expression(_write(tmp_path / "m.tsv", text), gene_column="Entrez_Gene_Id")
    assert list(adata.var_names) == ["1", "2", "3", "4"]
    assert list(adata.var["symbol"]) == ["A", "B", "C", "D"]


def test_wide_ensembl_column_is_preferred_as_gene_id(tmp_path) -> None:
    X = _ref_matrix()
    text = _table_text({"symbol": ["A", "B", "C", "D"], "gene_id": GENES}, SAMPLES, X.T, "\t")
    adata = read_expression(_write(tmp_path / "m.tsv", text))
    assert list(adata.var_names) == GENES
    assert list(adata.var["symbol"]) == ["A", "B", "C", "D"]


def test_wide_explicit_annotation_columns_keep_numeric_metadata(tmp_path) -> None:
    X = _ref_matrix()
    genes = [g.split(".")[0] for g in GENES]
    text = _table_text({"sample": SAMPLES, "age": ["61", "45", "70"]}, genes, X, ",")
    path = _write(tmp_path / "m.csv", text)
    auto = read_expression(path)  # age looks like a gene column of numbers
    assert "age" in list(auto.var_names)
    adata = read_expression(path, annotation_columns=["sample", "age"])
    assert list(adata.obs["age"]) == ["61", "45", "70"]
    assert list(adata.var_names) == genes
    np.testing.assert_array_equal(adata.X, X)


def test_wide_r_style_header_without_row_name_field(tmp_path) -> None:
    X = _ref_matrix()
    genes = [g.split(".")[0] for g in GENES]
    text = _table_text({"": SAMPLES}, genes, X, "\t").split("\n", 1)
    path = _write(tmp_path / "m.tsv", text[0].lstrip("\t") + "\n" + text[1])
    adata = read_expression(path)
    assert list(adata.obs_names) == SAMPLES
    np.testing.assert_array_equal(adata.X, X)


def test_wide_quoted_fields(tmp_path) -> None:
    X = _ref_matrix()
    genes = [g.split(".")[0] for g in GENES]
    lines = [",".join(f'"{c}"' for c in ["id", *genes])]
    for s, row in zip(SAMPLES, X, strict=True):
        lines.append(",".join([f'"{s}"', *(f"{v:g}" for v in row)]))
    adata = read_expression(_write(tmp_path / "m.csv", "\n".join(lines) + "\n"))
    assert list(adata.obs_names) == SAMPLES
    assert list(adata.var_names) == genes
    np.testing.assert_array_equal(adata.X, X)


def test_wide_quoted_label_with_separator(tmp_path) -> None:
    X = _ref_matrix()
    genes = [g.split(".")[0] for g in GENES]
    lines = [",".join(["id", "note", *genes])]
    for s, row in zip(SAMPLES, X, strict=True):
        lines.append(",".join([s, '"left, lower lobe"', *(f"{v:g}" for v in row)]))
    adata = read_expression(_write(tmp_path / "m.csv", "\n".join(lines) + "\n"))
    assert list(adata.obs["note"]) == ["left, lower lobe"] * 3
    np.testing.assert_array_equal(adata.X, X)


def test_wide_explicit_format_reads_other_extensions(tmp_path) -> None:
    X = _ref_matrix()
    path = _write_wide(tmp_path / "matrix.dat", X, "samples_x_genes")
    with pytest.raises(InputFileError, match=r"unknown file type '\.dat'.*--format wide\|"):
        read_expression(path)
    np.testing.assert_array_equal(read_expression(path, format="wide").X, X)


def test_wide_pandas_parquet_with_index(tmp_path) -> None:
    X = _ref_matrix()
    genes = [g.split(".")[0] for g in GENES]
    df = pd.DataFrame(X, index=pd.Index(SAMPLES, name="sample"), columns=genes)
    df["cohort"] = ["A", "B", "C"]
    df.to_parquet(tmp_path / "m.parquet")  # the index is stored as a trailing column
    adata = read_expression(tmp_path / "m.parquet")
    assert list(adata.obs_names) == SAMPLES
    assert list(adata.obs["cohort"]) == ["A", "B", "C"]
    np.testing.assert_array_equal(adata.X, X)


def test_wide_parquet_integer_entrez_goes_to_var(tmp_path) -> None:
    X = _ref_matrix()
    df = pd.DataFrame(X.T, columns=SAMPLES)
    df.insert(0, "Entrez_Gene_Id", [7105, 64102, 8813, 57147])
    df.insert(0, "Hugo_Symbol", ["TSPAN6", "TNMD", "DPM1", "SCYL3"])
    df.to_parquet(tmp_path / "m.parquet", index=False)
    adata = read_expression(tmp_path / "m.parquet")
    assert list(adata.var["entrez"]) == ["7105", "64102", "8813", "57147"]
    assert list(adata.var_names) == ["TSPAN6", "TNMD", "DPM1", "SCYL3"]
    np.testing.assert_array_equal(adata.X, X)


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_read_result_writes_to_h5ad(tmp_path) -> None:
    X = _ref_matrix()
    text = _table_text(
        {"Hugo_Symbol": list("ABCA"), "Entrez_Gene_Id": list("1231")}, SAMPLES, X.T, "\t"
    )
    adata = read_expression(_write(tmp_path / "m.tsv", text))
    json.dumps(adata.uns["bulkfm"])  # plain JSON-able provenance
    write_h5ad(adata, tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(back.X, X)
    assert back.uns["bulkfm"]["source"]["orientation"] == "genes_x_samples"


# ----------------------------------------------------------------------------- orientation


def _ambiguous(tmp_path: Path, n_rows: int, n_cols: int) -> tuple[Path, np.ndarray]:
    X = _values(n_rows, n_cols, seed=5)
    text = _table_text(
        {"id": [f"r{i}" for i in range(n_rows)]}, [f"c{j}" for j in range(n_cols)], X, "\t"
    )
    return _write(tmp_path / "m.tsv", text), X


def test_orientation_falls_back_on_shape_with_a_warning(tmp_path) -> None:
    path, X = _ambiguous(tmp_path, 3, 6)
    with pytest.warns(
        BulkfmWarning, match=r"assumed samples_x_genes .*--orientation samples_x_genes"
    ):
        adata = read_expression(path)
    assert adata.shape == (3, 6)
    path, X = _ambiguous(tmp_path, 6, 3)
    with pytest.warns(BulkfmWarning, match=r"assumed genes_x_samples because there are more rows"):
        adata = read_expression(path)
    np.testing.assert_array_equal(adata.X, X.T)
    assert _source(adata)["orientation_detected"] is True


def test_explicit_orientation_overrides_without_warning(tmp_path) -> None:
    path, X = _ambiguous(tmp_path, 6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adata = read_expression(path, orientation="samples_x_genes")
    np.testing.assert_array_equal(adata.X, X)
    assert _source(adata)["orientation_detected"] is False


def test_symbols_against_sample_barcodes_decide_orientation(tmp_path) -> None:
    X = _values(3, 5, seed=6)  # more genes than samples would also say genes are columns
    text = _table_text({"gene": list("ABC")}, [f"GTEX-{i}-0001" for i in range(5)], X, "\t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adata = read_expression(_write(tmp_path / "m.tsv", text))
    assert list(adata.var_names) == list("ABC")
    np.testing.assert_array_equal(adata.X, X.T)


def test_explicit_orientation_contradicted_by_labels(tmp_path) -> None:
    path = _write_wide(tmp_path / "m.tsv", _ref_matrix(), "genes_x_samples")
    with pytest.raises(
        OrientationError,
        match=r"100% of the supposed sample ids are Ensembl gene ids.*looks transposed.*"
        r"orientation='genes_x_samples'",
    ):
        read_expression(path, orientation="samples_x_genes")


def test_gene_column_contradicting_orientation(tmp_path) -> None:
    path = _write_wide(tmp_path / "m.tsv", _ref_matrix(), "genes_x_samples")
    with pytest.raises(ConfigError, match="gene_column implies genes_x_samples"):
        read_expression(path, gene_column="gene_id", orientation="samples_x_genes")


def test_gene_and_sample_column_together(tmp_path) -> None:
    path = _write_wide(tmp_path / "m.tsv", _ref_matrix(), "genes_x_samples")
    with pytest.raises(ConfigError, match="just one of them"):
        read_expression(path, gene_column="gene_id", sample_column="x")


def test_unknown_orientation_value(tmp_path) -> None:
    path = _write_wide(tmp_path / "m.tsv", _ref_matrix(), "genes_x_samples")
    with pytest.raises(ConfigError, match=r"--orientation rows .*is not one of"):
        read_expression(path, orientation="rows")


# ----------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path) -> None:
    with pytest.raises(InputFileError, match=r"nope\.tsv does not exist"):
        read_expression(tmp_path / "nope.tsv")


def test_empty_file(tmp_path) -> None:
    path = tmp_path / "m.tsv"
    path.write_bytes(b"")
    with pytest.raises(InputFileError, match=r"m\.tsv is empty \(0 bytes\)"):
        read_expression(path)


@pytest.mark.parametrize("name", ["m.tsv", "m.tsv.gz"])
def test_header_only(tmp_path, name) -> None:
    path = _write(tmp_path / name, "gene_id\tTCGA-1\tTCGA-2\n")
    with pytest.raises(InputFileError, match="has a header but no data rows"):
        read_expression(path)


def test_unknown_extension(tmp_path) -> None:
    path = _write(tmp_path / "m.xlsx", "whatever")
    with pytest.raises(InputFileError, match=r"unknown file type '\.xlsx'"):
        read_expression(path)


def test_truncated_gzip(tmp_path) -> None:
    path = _write_wide(tmp_path / "m.tsv.gz", _values(3, 4), "samples_x_genes")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match="damaged or truncated"):
        read_expression(path)


def test_folder_with_a_table_format(tmp_path) -> None:
    with pytest.raises(InputFileError, match="is a folder, but only --format gdc"):
        read_expression(tmp_path, format="wide")


def test_non_numeric_cell_names_column_row_and_line(tmp_path) -> None:
    X = _ref_matrix()
    text = _table_text({"gene_id": GENES}, SAMPLES, X.T, "\t").splitlines()
    fields = text[3].split("\t")
    fields[2] = "abc"
    text[3] = "\t".join(fields)
    path = _write(tmp_path / "m.tsv", "\n".join(text) + "\n")
    with pytest.raises(
        ExpressionValueError,
        match=r"non-numeric value 'abc' .*column 'TCGA-OR-A5J2-01A', line 4 "
        r"\(row 'ENSG00000000419\.13'\).*annotation_columns",
    ):
        read_expression(path)


def test_missing_token_in_values(tmp_path) -> None:
    text = "sample\tENSG00000000003\tENSG00000000005\nTCGA-1\t1\tNA\nTCGA-2\t3\t4\n"
    with pytest.raises(
        ExpressionValueError,
        match=r"missing value 'NA'.*column 'ENSG00000000005', line 2.*fill or drop missing",
    ):
        read_expression(_write(tmp_path / "m.tsv", text))


def test_nan_in_values(tmp_path) -> None:
    text = "sample\tENSG00000000003\tENSG00000000005\nTCGA-1\t1\tnan\nTCGA-2\t3\t4\n"
    with pytest.raises(
        ExpressionValueError, match=r"1 NaN.*sample 'TCGA-1', gene 'ENSG00000000005'"
    ):
        read_expression(_write(tmp_path / "m.tsv", text))


def test_inf_in_values(tmp_path) -> None:
    text = "sample,ENSG00000000003,ENSG00000000005\nTCGA-1,1,2\nTCGA-2,inf,4\n"
    with pytest.raises(ExpressionValueError, match=r"1 infinite.*sample 'TCGA-2'"):
        read_expression(_write(tmp_path / "m.csv", text))


def test_negative_values(tmp_path) -> None:
    text = "sample\tENSG00000000003\tENSG00000000005\nTCGA-1\t-1.5\t2\nTCGA-2\t3\t-0.25\n"
    with pytest.raises(
        ExpressionValueError, match=r"2 negative value\(s\) \(minimum -1\.5\).*log-ratios"
    ):
        read_expression(_write(tmp_path / "m.tsv", text))


def test_duplicate_sample_rows(tmp_path) -> None:
    text = "sample\tENSG00000000003\nTCGA-1\t1\nTCGA-2\t3\nTCGA-1\t5\n"
    with pytest.raises(DuplicateIdError, match=r"1 sample id\(s\) .*'TCGA-1' x2"):
        read_expression(_write(tmp_path / "m.tsv", text))


def test_duplicate_sample_columns(tmp_path) -> None:
    text = "gene_id\tTCGA-1\tTCGA-1\nENSG00000000003\t1\t2\nENSG00000000005\t3\t4\n"
    with pytest.raises(DuplicateIdError, match=r"'TCGA-1' x2"):
        read_expression(_write(tmp_path / "m.tsv", text))


def test_ragged_rows(tmp_path) -> None:
    text = "sample\tENSG00000000003\tENSG00000000005\nTCGA-1\t1\t2\nTCGA-2\t3\n"
    with pytest.raises(InputFileError, match="ragged: line 3 has 2 fields but the header has 3"):
        read_expression(_write(tmp_path / "m.tsv", text))


def test_no_label_column(tmp_path) -> None:
    text = "ENSG00000000003\tENSG00000000005\n1\t2\n3\t4\n"
    with pytest.raises(InputFileError, match=r"has no label column.*gene_column="):
        read_expression(_write(tmp_path / "m.tsv", text))


def test_unknown_annotation_column(tmp_path) -> None:
    path = _write_wide(tmp_path / "m.tsv", _ref_matrix(), "samples_x_genes")
    with pytest.raises(InputFileError, match=r"column\(s\) \['cohort'\] not found"):
        read_expression(path, annotation_columns=["sample_barcode", "cohort"])


def test_no_separator(tmp_path) -> None:
    path = _write(tmp_path / "m.txt", "just words\nand more\n")
    with pytest.raises(InputFileError, match="cannot find the column separator"):
        read_expression(path)


def test_parquet_text_column_in_values(tmp_path) -> None:
    df = pd.DataFrame({"sample": SAMPLES, "ENSG00000000003": [1.0, 2, 3], "note": ["a", "b", "c"]})
    df.to_parquet(tmp_path / "m.parquet", index=False)
    with pytest.raises(
        ExpressionValueError, match=r"column 'note' .* has type string, not numbers"
    ):
        read_expression(tmp_path / "m.parquet", annotation_columns=["sample"])


def test_parquet_without_rows(tmp_path) -> None:
    pd.DataFrame({"sample": pd.Series([], dtype=str), "ENSG00000000003": []}).to_parquet(
        tmp_path / "m.parquet", index=False
    )
    with pytest.raises(InputFileError, match="has columns but no rows"):
        read_expression(tmp_path / "m.parquet")


def test_broken_parquet(tmp_path) -> None:
    path = tmp_path / "m.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(InputFileError, match="cannot read parquet file"):
        read_expression(path)


# ----------------------------------------------------------------------------- official CSV


def _official_csv(path: Path, X: np.ndarray, genes: list[str], ids: list[str]) -> Path:
    lines = [",".join([*genes, "identifier"])]
    for row, sample in zip(X, ids, strict=True):
        lines.append(",".join([*(f"{v:g}" for v in row), sample]))
    return _write(path, "\n".join(lines) + "\n")


def test_official_bulkrnabert_csv(tmp_path) -> None:
    X = _ref_matrix()
    genes = [g.split(".")[0] for g in GENES]
    path = _official_csv(tmp_path / "tpm.csv", X, genes, SAMPLES)
    adata = read_expression(path)
    assert _source(adata)["format"] == "bulkrnabert_csv"
    assert list(adata.obs_names) == SAMPLES
    assert list(adata.var_names) == genes
    np.testing.assert_array_equal(adata.X, X)


def test_official_format_requires_identifier_column(tmp_path) -> None:
    path = _write_wide(tmp_path / "m.csv", _ref_matrix(), "samples_x_genes", sep=",")
    with pytest.raises(InputFileError, match=r"not an official BulkRNABert CSV.*'ENSG00000002586'"):
        read_expression(path, format="bulkrnabert_csv")


def test_unknown_format_value(tmp_path) -> None:
    path = _write_wide(tmp_path / "m.tsv", _ref_matrix(), "samples_x_genes")
    with pytest.raises(ConfigError, match=r"--format excel .*is not one of"):
        read_expression(path, format="excel")


def test_official_csv_transposed(tmp_path) -> None:
    X = _ref_matrix()
    genes = [g.split(".")[0] for g in GENES]
    path = _official_csv(tmp_path / "tpm.csv", X.T, SAMPLES, genes)
    with pytest.raises(OrientationError, match="official BulkRNABert CSV has one row per sample"):
        read_expression(path)


# ----------------------------------------------------------------------------- h5ad


def _h5ad(tmp_path: Path, X, obs_names, var_names) -> Path:
    adata = ad.AnnData(
        X=X,
        obs=pd.DataFrame({"cohort": ["A", "B", "A"][: len(obs_names)]}, index=obs_names)
        if len(obs_names) == 3
        else pd.DataFrame(index=obs_names),
        var=pd.DataFrame(index=var_names),
    )
    adata.uns["note"] = "kept"
    path = tmp_path / "m.h5ad"
    adata.write_h5ad(path)
    return path


def test_h5ad_round_trip(tmp_path) -> None:
    X = _ref_matrix().astype(np.float64)
    path = _h5ad(tmp_path, X, SAMPLES, GENES)
    adata = read_expression(path)
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X, X.astype(np.float32))
    assert list(adata.obs["cohort"]) == ["A", "B", "A"]
    assert list(adata.var["raw_id"]) == GENES
    assert adata.uns["note"] == "kept"
    assert _source(adata)["format"] == "h5ad"


def test_h5ad_sparse_x_is_densified(tmp_path) -> None:
    X = _ref_matrix()
    path = _h5ad(tmp_path, sp.csr_matrix(X), SAMPLES, GENES)
    adata = read_expression(path)
    assert isinstance(adata.X, np.ndarray)
    np.testing.assert_array_equal(adata.X, X)


def test_h5ad_with_genes_as_obs_is_rejected(tmp_path) -> None:
    X = _ref_matrix()
    path = _h5ad(tmp_path, X.T, GENES, SAMPLES)
    with pytest.raises(OrientationError, match=r"gene ids as obs_names.*write adata\.T"):
        read_expression(path)


def test_h5ad_transposed_on_request(tmp_path) -> None:
    X = _ref_matrix()
    path = _h5ad(tmp_path, X.T, GENES, SAMPLES)
    adata = read_expression(path, orientation="genes_x_samples")
    np.testing.assert_array_equal(adata.X, X)
    assert list(adata.obs_names) == SAMPLES


def test_h5ad_explicit_contradiction(tmp_path) -> None:
    path = _h5ad(tmp_path, _ref_matrix(), SAMPLES, GENES)
    with pytest.raises(OrientationError, match="looks transposed"):
        read_expression(path, orientation="genes_x_samples")


def test_h5ad_negative_values_are_checked(tmp_path) -> None:
    X = _ref_matrix()
    X[0, 0] = -2
    path = _h5ad(tmp_path, X, SAMPLES, GENES)
    with pytest.raises(ExpressionValueError, match="1 negative value"):
        read_expression(path)


def test_corrupt_h5ad(tmp_path) -> None:
    path = _write(tmp_path / "m.h5ad", "not hdf5")
    with pytest.raises(
        InputFileError, match=r"not an \.h5ad file: it does not start with the HDF5 signature"
    ):
        read_expression(path)


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def tcga_counts(shared_data: Path) -> ad.AnnData:
    return read_expression(shared_data / "tcga" / "tcga_tumor_counts_7cohorts.tsv.gz")


@pytest.mark.realdata
@pytest.mark.slow
def test_real_tcga_counts(tcga_counts: ad.AnnData, shared_data: Path) -> None:
    adata = tcga_counts
    assert adata.shape == (384, 56537)
    counts = adata.obs["cohort"].value_counts().to_dict()
    assert counts == {
        "UVM": 80,
        "ACC": 79,
        "KICH": 65,
        "UCS": 56,
        "DLBC": 48,
        "CHOL": 36,
        "PAAD": 20,
    }
    assert adata.var_names[0] == "ENSG00000000003"
    assert _source(adata)["orientation"] == "samples_x_genes"
    # independent check of two rows against a plain line split
    with gzip.open(shared_data / "tcga" / "tcga_tumor_counts_7cohorts.tsv.gz", "rt") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        first = fh.readline().rstrip("\n").split("\t")
    assert list(adata.var_names) == header[2:]
    assert adata.obs_names[0] == first[0]
    np.testing.assert_array_equal(adata.X[0], np.array(first[2:], dtype=np.float32))
    assert np.all(np.round(adata.X) == adata.X)  # integer read counts


@pytest.mark.realdata
def test_real_rnaseqdb_genes_by_samples(shared_data: Path) -> None:
    path = shared_data / "rnaseqdb" / "chol-rsem-count-tcga-t.txt.gz"
    adata = read_expression(path)
    reference = pd.read_csv(path, sep="\t")
    source = _source(adata)
    assert source["orientation"] == "genes_x_samples"
    assert source["orientation_detected"] is True
    assert adata.shape == (31, 20242)
    assert list(adata.obs_names) == list(reference.columns[2:])
    assert list(adata.var["symbol"]) == list(reference["Hugo_Symbol"])
    assert list(adata.var["entrez"]) == [str(e) for e in reference["Entrez_Gene_Id"]]
    assert not any(" " in e for e in adata.var["entrez"])
    np.testing.assert_array_equal(adata.X, reference.iloc[:, 2:].to_numpy(np.float32).T)


@pytest.mark.realdata
def test_real_official_bulkrnabert_csv(shared_data: Path) -> None:
    path = shared_data / "tcga" / "bulkrnabert_tcga_gbm_4samples_tpm.csv"
    adata = read_expression(path)
    assert adata.shape == (4, 19062)
    assert _source(adata)["format"] == "bulkrnabert_csv"
    genes = (shared_data / "genes" / "bulkrnabert_gene_ids.txt").read_text().split()
    assert list(adata.var_names) == genes
    assert all(s.startswith("TCGA-") for s in adata.obs_names)
    reference = pd.read_csv(path, index_col="identifier")
    np.testing.assert_array_equal(adata.X, reference.to_numpy(np.float32))


# ----------------------------------------------------------------------------- issue 13


def _gxs_table(n_genes: int = 12, samples: tuple[str, ...] = ("S1", "S2", "S3")) -> list[str]:
    """Lines of a genes x samples table with a gene_name annotation column."""
    X = _values(n_genes, len(samples), seed=3) + 1
    lines = ["\t".join(["gene_id", "gene_name", *samples])]
    for i in range(n_genes):
        lines.append("\t".join([f"ENSG{i:011d}", f"GENE{i}", *(f"{v:g}" for v in X[i])]))
    return lines


def test_gzip_damaged_near_its_start_is_an_input_file_error(tmp_path) -> None:
    path = _write(tmp_path / "m.tsv.gz", "\n".join(_gxs_table(200)) + "\n")
    raw = bytearray(path.read_bytes())
    for i in range(40, 60):  # inside the first deflate block: zlib.error, not OSError
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    with pytest.raises(InputFileError, match=r"m\.tsv\.gz: the gzip stream is damaged"):
        read_expression(path)


@pytest.mark.parametrize("sample", ["TCGA-OR-A5J1-01A", "S1"])
def test_decimal_comma_in_the_first_sample_column_is_refused(tmp_path, sample) -> None:
    """A sample whose column holds one '3874,5' must not become a label column and vanish:
    by its header (a sample id) or because its other values are numbers."""
    lines = _gxs_table(samples=(sample, "S2", "S3"))
    fields = lines[5].split("\t")
    fields[2] = "3874,5"
    lines[5] = "\t".join(fields)
    path = _write(tmp_path / "m.tsv", "\n".join(lines) + "\n")
    with pytest.raises(
        ExpressionValueError,
        match=rf"column '{sample}' .*'3874,5' at line 6 \(row 'ENSG00000000004'\).*decimal comma",
    ):
        read_expression(path)


def test_decimal_comma_beyond_the_inspected_rows_names_the_decimal_comma(tmp_path) -> None:
    lines = _gxs_table(n_genes=150)
    fields = lines[140].split("\t")
    fields[3] = "12,25"
    lines[140] = "\t".join(fields)
    path = _write(tmp_path / "m.tsv", "\n".join(lines) + "\n")
    with pytest.raises(
        ExpressionValueError, match=r"'12,25'.*column 'S2', line 141.*decimal comma"
    ):
        read_expression(path)


def test_text_annotation_columns_with_some_numbers_stay_labels(tmp_path) -> None:
    """featureCounts' Chr/Start/End/Strand/Length are labels, not samples, and a text column
    with a few number-like cells (a symbol column) is still a label column."""
    X = _values(4, 2, seed=4) + 1
    lines = ["Geneid\tChr\tStart\tEnd\tStrand\tLength\tsymbol\tS1\tS2"]
    for i in range(4):
        start = "11869;12010" if i % 2 else "11869"
        symbol = "7SK" if i == 0 else f"GENE{i}"
        lines.append(
            f"ENSG{i:011d}\tchr1\t{start}\t14409\t+\t{1000 + i}\t{symbol}\t"
            + "\t".join(f"{v:g}" for v in X[i])
        )
    adata = read_expression(_write(tmp_path / "fc.tsv", "\n".join(lines) + "\n"))
    assert list(adata.obs_names) == ["S1", "S2"]
    assert _source(adata)["annotation_columns"][:6] == [
        "Geneid",
        "Chr",
        "Start",
        "End",
        "Strand",
        "Length",
    ]


def test_parquet_text_sample_column_with_numbers_is_refused(tmp_path) -> None:
    X = _values(12, 3, seed=3) + 1
    df = pd.DataFrame(X, columns=["S1", "S2", "S3"]).astype(str)
    df["S2"] = df["S2"].astype(float)
    df["S3"] = df["S3"].astype(float)
    df.loc[4, "S1"] = "3874,5"
    df.insert(0, "gene_id", [f"ENSG{i:011d}" for i in range(12)])
    path = tmp_path / "m.parquet"
    df.to_parquet(path, index=False)
    with pytest.raises(ExpressionValueError, match=r"column 'S1' .*'3874,5' at row 5"):
        read_expression(path)


# ------------------------------------------------------------------ read_h5ad (commands)


def _tpm_adata(n_obs: int = 6, n_vars: int = 40) -> ad.AnnData:
    rng = np.random.default_rng(0)
    X = rng.gamma(0.5, 2.0, size=(n_obs, n_vars)) + 0.01
    X = (X / X.sum(1, keepdims=True) * 1e6).astype(np.float32)
    return ad.AnnData(X=X, obs=pd.DataFrame(index=[f"S{i}" for i in range(n_obs)]))


def test_read_h5ad_reads_a_tpm_file(tmp_path) -> None:
    path = write_h5ad(_tpm_adata(), tmp_path / "x.h5ad")
    assert readers.read_h5ad(path, flag="--input").shape == (6, 40)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p, r"--data .*does not exist"),
        (lambda p: (p.mkdir(), p)[1], r"--data .*is a folder"),
        (lambda p: (p.write_bytes(b""), p)[1], r"--data .*is empty"),
        (
            lambda p: _write(p.with_suffix(".tsv"), "a\tb\n1\t2\n"),
            r"--data .*is a table.*data build",
        ),
        (lambda p: _write(p, "gene\tS1\nA\t1\n"), r"--data .*not an \.h5ad file.*HDF5 signature"),
    ],
    ids=["missing", "folder", "empty", "tsv", "tsv-named-h5ad"],
)
def test_read_h5ad_names_what_is_wrong_with_the_file(tmp_path, make, match) -> None:
    path = make(tmp_path / "x.h5ad")
    with pytest.raises(InputFileError, match=match):
        readers.read_h5ad(path, flag="--data")


def test_read_h5ad_truncated_file(tmp_path) -> None:
    path = write_h5ad(_tpm_adata(), tmp_path / "x.h5ad")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        InputFileError, match=r"cannot read --input .*x\.h5ad: the file is truncated"
    ):
        readers.read_h5ad(path)


def test_read_h5ad_refuses_log_transformed_values(tmp_path) -> None:
    adata = _tpm_adata()
    adata.X = np.log2(1 + adata.X)
    path = write_h5ad(adata, tmp_path / "x.h5ad")
    with pytest.raises(UnitError, match=r"data\.path .*x\.h5ad \(X\) look log-transformed"):
        readers.read_h5ad(path, flag="data.path")
    assert readers.read_h5ad(path, check_units=False).n_obs == 6


def test_read_h5ad_checks_the_layer_a_model_reads(tmp_path) -> None:
    adata = _tpm_adata()
    adata.layers["logged"] = np.log2(1 + adata.X)
    path = write_h5ad(adata, tmp_path / "x.h5ad")
    readers.read_h5ad(path)  # X is TPM
    with pytest.raises(UnitError, match=r"layers\['logged'\]"):
        readers.read_h5ad(path, layer="logged")
    with pytest.raises(InputFileError, match=r"no layers\['tpm'\]"):
        readers.read_h5ad(path, layer="tpm")


def test_read_h5ad_trusts_a_unit_the_builder_stated(tmp_path) -> None:
    adata = _tpm_adata()
    adata.X = np.log2(1 + adata.X)
    adata.uns["bulkfm"] = {"sources": {"a": {"units": {"input_unit": "tpm"}}}}
    path = write_h5ad(adata, tmp_path / "x.h5ad")
    assert readers.read_h5ad(path).n_obs == 6
