from __future__ import annotations

import json
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bulkfm import tokenize as tk
from bulkfm.errors import ConfigError, DuplicateIdError, ExpressionValueError, GeneMappingError
from bulkfm.tokenize import BinTokenizer, TokenizerConfig

OFFICIAL_FACTOR = 5.547176906585117


def official_tokens(tpm: np.ndarray, factor: float, n_bins: int = 64) -> np.ndarray:
    """The official numpy recipe, one sample at a time, then the documented clamp."""
    rows = []
    for sample in np.asarray(tpm, dtype=np.float64):
        values = np.log10(1 + sample) / factor
        ids = np.digitize(values, np.linspace(0, 1, n_bins))
        ids[values == 0.0] = 0
        rows.append(ids)
    return np.minimum(np.vstack(rows), n_bins - 1)


def make_tpm(rng: np.random.Generator, n: int, g: int, factor: float) -> np.ndarray:
    """TPM with exact zeros, tiny values, values at bin edges and values above the factor."""
    x = rng.lognormal(1.0, 2.5, size=(n, g))
    x[rng.random((n, g)) < 0.25] = 0.0
    edges = np.linspace(0, 1, 64)
    at_edges = 10 ** (edges[rng.integers(0, 64, size=n * g // 10)] * factor) - 1
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, size=at_edges.size, replace=False)] = at_edges
    x[0, :3] = [1e-300, 10**factor - 1, 10 ** (factor * 1.5)]
    return x


def genes_of(n: int) -> list[str]:
    return [f"ENSG{i:011d}" for i in range(n)]


@pytest.fixture
def tokenizer() -> BinTokenizer:
    return BinTokenizer(TokenizerConfig(genes_of(50), normalization_factor=4.0))


def test_encode_matches_official_recipe(tokenizer: BinTokenizer) -> None:
    rng = np.random.default_rng(1)
    x = make_tpm(rng, 40, 50, tokenizer.normalization_factor)
    raw = np.vstack(
        [
            np.digitize(np.log10(1 + s) / tokenizer.normalization_factor, np.linspace(0, 1, 64))
            for s in x
        ]
    )
    assert (raw == 64).any(), "data must exercise the official out-of-range 64"
    tokens = tokenizer.encode(x)
    assert tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, official_tokens(x, tokenizer.normalization_factor))
    assert tokens.min() == 0 and tokens.max() == 63
    # exact zeros and only exact zeros give token 0
    np.testing.assert_array_equal(tokens == 0, np.log10(1 + x) == 0)


def test_encode_float32_input_matches_official_on_float64(tokenizer: BinTokenizer) -> None:
    x = make_tpm(np.random.default_rng(2), 10, 50, 4.0).astype(np.float32)
    np.testing.assert_array_equal(tokenizer.encode(x), official_tokens(x, 4.0))


def test_encode_chunked_equals_unchunked(
    tokenizer: BinTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = make_tpm(np.random.default_rng(3), 23, 50, 4.0)
    missing = np.random.default_rng(4).random(x.shape) < 0.1
    whole = tokenizer.encode(x, missing)
    monkeypatch.setattr(tk, "_CHUNK_ELEMENTS", 7)  # one row per chunk
    np.testing.assert_array_equal(tokenizer.encode(x, missing), whole)


@pytest.mark.parametrize("as_sparse", [False, True])
def test_missing_becomes_mask_token(tokenizer: BinTokenizer, as_sparse: bool) -> None:
    x = make_tpm(np.random.default_rng(5), 8, 50, 4.0)
    missing = np.random.default_rng(6).random(x.shape) < 0.2
    x_filled = x.copy()
    x_filled[missing] = np.nan  # whatever sits in a missing cell is never read
    mask = sp.csr_matrix(missing) if as_sparse else missing
    tokens = tokenizer.encode(x_filled, mask)
    expected = official_tokens(x, 4.0)
    expected[missing] = tokenizer.mask_token_id
    np.testing.assert_array_equal(tokens, expected)
    assert tokenizer.mask_token_id == 64


def test_encode_one_sample_1d(tokenizer: BinTokenizer) -> None:
    x = make_tpm(np.random.default_rng(7), 1, 50, 4.0)
    np.testing.assert_array_equal(tokenizer.encode(x[0]), official_tokens(x, 4.0)[0])


def test_fit_factor_is_max_log_tpm_ignoring_missing() -> None:
    x = make_tpm(np.random.default_rng(8), 12, 6, 4.0)
    missing = np.zeros_like(x, dtype=bool)
    top = np.unravel_index(np.argmax(x), x.shape)
    missing[top] = True
    fitted = BinTokenizer.fit(x, genes_of(6), missing=missing)
    assert fitted.normalization_factor == pytest.approx(np.log10(1 + np.sort(x.ravel())[-2]))
    assert BinTokenizer.fit(x, genes_of(6)).normalization_factor == pytest.approx(
        np.log10(1 + x.max())
    )


def test_fit_adata_and_encode_adata_align_by_gene_id(tokenizer: BinTokenizer) -> None:
    rng = np.random.default_rng(9)
    x = make_tpm(rng, 6, 50, 4.0)
    missing = rng.random(x.shape) < 0.15
    order = rng.permutation(50)
    # AnnData: genes shuffled plus one extra gene the model does not know
    x_ad = np.hstack([x[:, order], rng.random((6, 1))]).astype(np.float32)
    var = [tokenizer.genes[i] for i in order] + ["ENSG99999999999"]
    miss_ad = sp.csr_matrix(np.hstack([missing[:, order], np.zeros((6, 1), bool)]))
    adata = ad.AnnData(X=x_ad, var=pd.DataFrame(index=var))
    adata.layers["missing"] = miss_ad
    tokens = tokenizer.encode_adata(adata)
    expected = official_tokens(x.astype(np.float32), 4.0)
    expected[missing] = tokenizer.mask_token_id
    np.testing.assert_array_equal(tokens, expected)

    fitted = BinTokenizer.fit_adata(adata)
    assert fitted.genes == var
    kept = x_ad[~miss_ad.toarray()]
    assert fitted.normalization_factor == pytest.approx(np.log10(1 + kept.astype(float).max()))
    assert BinTokenizer.from_adata(adata).config == fitted.config


def test_encode_sparse_x_equals_dense(tokenizer: BinTokenizer) -> None:
    x = make_tpm(np.random.default_rng(10), 5, 50, 4.0)
    np.testing.assert_array_equal(tokenizer.encode(sp.csr_matrix(x)), tokenizer.encode(x))


def test_bin_centers_tokenize_back_to_their_bin(tokenizer: BinTokenizer) -> None:
    centers = tokenizer.bin_centers()
    assert centers.shape == (64,)
    assert centers[0] == 0.0
    assert np.all(np.diff(centers) > 0)
    tpm = tokenizer.to_tpm(centers)
    np.testing.assert_array_equal(tokenizer.encode(tpm[None, :50]), [np.arange(50)])
    np.testing.assert_array_equal(
        BinTokenizer(TokenizerConfig(genes_of(64), 4.0)).encode(tpm[None]), [np.arange(64)]
    )


def test_decode_expected_is_expected_value_in_log_space(tokenizer: BinTokenizer) -> None:
    rng = np.random.default_rng(11)
    probs = rng.dirichlet(np.ones(64), size=(3, 5))
    centers = np.concatenate([[0.0], (np.arange(63) + 0.5) / 63])
    expected = 10 ** ((probs * centers).sum(-1) * 4.0) - 1
    np.testing.assert_allclose(tokenizer.decode_expected(probs), expected, rtol=1e-9)
    one_hot = np.eye(64)[[0, 10, 63]]
    np.testing.assert_array_equal(
        tokenizer.encode(np.pad(tokenizer.decode_expected(one_hot), (0, 47))[None])[0, :3],
        [0, 10, 63],
    )


def test_decode_tokens_and_mask_is_nan(tokenizer: BinTokenizer) -> None:
    out = tokenizer.decode(np.array([[0, 5, 64]]))
    assert out[0, 0] == 0.0
    assert tokenizer.encode(np.pad(out[:, 1:2], ((0, 0), (0, 49))))[0, 0] == 5
    assert np.isnan(out[0, 2])


def test_save_load_round_trip(tmp_path, tokenizer: BinTokenizer) -> None:
    tokenizer.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["genes"] == tokenizer.genes
    assert data["mask_token_id"] == 64
    np.testing.assert_array_equal(data["bin_edges"], np.linspace(0, 1, 64))
    loaded = BinTokenizer.load(tmp_path)
    assert loaded.config == tokenizer.config
    x = make_tpm(np.random.default_rng(12), 3, 50, 4.0)
    np.testing.assert_array_equal(loaded.encode(x), tokenizer.encode(x))


def test_read_gene_list(tmp_path) -> None:
    path = tmp_path / "genes.txt"
    path.write_text("# comment\nENSG1\n\nENSG2\n")
    assert tk.read_gene_list(path) == ["ENSG1", "ENSG2"]
    assert tk.as_gene_list(str(path)) == ["ENSG1", "ENSG2"]
    assert tk.as_gene_list(("a", "b")) == ["a", "b"]


@pytest.mark.slow
def test_encode_is_fast_enough_for_19k_genes() -> None:
    tok = BinTokenizer(TokenizerConfig(genes_of(19062), OFFICIAL_FACTOR))
    x = np.random.default_rng(13).lognormal(1, 2, size=(500, 19062)).astype(np.float32)
    start = time.perf_counter()
    tokens = tok.encode(x)
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(tokens[:3], official_tokens(x[:3], OFFICIAL_FACTOR))
    # 10k samples must take seconds: 500 samples well under one second on one core.
    assert elapsed < 5.0, f"tokenising 500 x 19062 took {elapsed:.1f} s"


@pytest.mark.realdata
def test_official_fixture_tokenizes_like_official_code(shared_data) -> None:
    table = pd.read_csv(shared_data / "tcga" / "bulkrnabert_tcga_gbm_4samples_tpm.csv")
    genes = tk.read_gene_list(shared_data / "genes" / "bulkrnabert_gene_ids.txt")
    x = table[genes].to_numpy()
    tok = BinTokenizer(TokenizerConfig(genes, OFFICIAL_FACTOR))
    tokens = tok.encode(x)
    np.testing.assert_array_equal(tokens, official_tokens(x, OFFICIAL_FACTOR))
    assert len(np.unique(tokens)) > 30


# ---------------------------------------------------------------- bad input, one case each
@pytest.mark.parametrize("factor", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_factor_is_config_error(factor: float) -> None:
    with pytest.raises(ConfigError, match=r"normalization_factor must be finite and > 0"):
        TokenizerConfig(genes_of(3), normalization_factor=factor)


def test_non_numeric_factor_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"must be a number"):
        TokenizerConfig(genes_of(3), normalization_factor="high")  # type: ignore[arg-type]


def test_fit_on_all_zeros_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"every .* expression value is 0"):
        BinTokenizer.fit(np.zeros((3, 4)), genes_of(4))


def test_nan_tpm_is_expression_error(tokenizer: BinTokenizer) -> None:
    x = np.ones((2, 50))
    x[1, 7] = np.nan
    with pytest.raises(ExpressionValueError, match=r"NaN/inf .*sample 1, gene column 7"):
        tokenizer.encode(x)


def test_negative_tpm_is_expression_error(tokenizer: BinTokenizer) -> None:
    x = np.ones((2, 50))
    x[0, 3] = -0.5
    with pytest.raises(ExpressionValueError, match=r"negative .*-0.5 at sample 0, gene column 3"):
        tokenizer.encode(x)


def test_text_values_are_expression_error(tokenizer: BinTokenizer) -> None:
    with pytest.raises(ExpressionValueError, match=r"must be numeric"):
        tokenizer.encode(np.array([["a"] * 50]))


def test_wrong_column_count_is_gene_mapping_error(tokenizer: BinTokenizer) -> None:
    with pytest.raises(GeneMappingError, match=r"49 gene columns but the tokenizer has 50"):
        tokenizer.encode(np.ones((2, 49)))


def test_missing_mask_shape_is_expression_error(tokenizer: BinTokenizer) -> None:
    with pytest.raises(ExpressionValueError, match=r"missing mask has shape \(2, 3\)"):
        tokenizer.encode(np.ones((2, 50)), np.zeros((2, 3), bool))


def _lacking(tokenizer: BinTokenizer, n_absent: int, *, sparse: bool = False) -> ad.AnnData:
    """TPM for all but the last ``n_absent`` model genes, shuffled, plus two extra genes."""
    rng = np.random.default_rng(7)
    genes = [*tokenizer.genes[: tokenizer.n_genes - n_absent], "ENSGX1", "ENSGX2"]
    order = rng.permutation(len(genes))
    X = make_tpm(rng, 6, len(genes), tokenizer.normalization_factor).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(X) if sparse else X, var=pd.DataFrame(index=genes))
    return adata[:, order].copy()


@pytest.mark.parametrize("sparse", [False, True])
def test_absent_model_genes_become_mask_tokens(tokenizer: BinTokenizer, sparse: bool) -> None:
    adata = _lacking(tokenizer, 3, sparse=sparse)
    adata.layers["missing"] = np.zeros(adata.shape, bool)
    adata.layers["missing"][1, 0] = True  # a flagged gene stays missing too
    tokens = tokenizer.encode_adata(adata)
    # independent reference: the data layer's own alignment, which writes zero columns and
    # flags them in layers["missing"], read through the plain column-ordered encoder
    from bulkfm.data.genes import align_to_vocabulary

    aligned = align_to_vocabulary(adata, tokenizer.genes, min_fraction=0.0)
    expected = tokenizer.encode(
        np.asarray(aligned.X.todense() if sp.issparse(aligned.X) else aligned.X),
        missing=aligned.layers["missing"],
    )
    np.testing.assert_array_equal(tokens, expected)
    assert (tokens[:, -3:] == tokenizer.mask_token_id).all()
    assert (tokens[:, :-3] != tokenizer.mask_token_id).sum() == 6 * 47 - 1
    tokenizer.check_adata(adata)  # absent genes are not an error by themselves


def test_align_columns_marks_absent_genes(tokenizer: BinTokenizer) -> None:
    var = [*tokenizer.genes[:47], "ENSGX1"]
    cols = tokenizer.align_columns(var)
    assert cols is not None
    np.testing.assert_array_equal(cols, [*range(47), -1, -1, -1])
    assert tokenizer.align_columns(tokenizer.genes) is None


def test_sample_with_no_model_gene_measured_is_named(tokenizer: BinTokenizer) -> None:
    adata = _lacking(tokenizer, 3)
    adata.layers["missing"] = np.zeros(adata.shape, bool)
    model_cols = [i for i, g in enumerate(adata.var_names) if g in set(tokenizer.genes)]
    adata.layers["missing"][2, model_cols] = True
    with pytest.raises(ExpressionValueError, match=r"1 of 6 sample\(s\) have every model gene"):
        tokenizer.check_adata(adata)
    tokenizer.check_adata(adata, allow_all_missing=True)


def test_gene_coverage_matches_a_naive_count(
    tokenizer: BinTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    adata = _lacking(tokenizer, 5)
    rng = np.random.default_rng(3)
    missing = rng.random(adata.shape) < 0.2
    adata.layers["missing"] = missing
    adata.obs["cohort"] = ["A", "A", "B", "B", "B", "C"]
    adata.obs["study"] = ["TCGA"] * 5 + ["GTEx"]
    with caplog.at_level("INFO", logger="bulkfm.tokenize"):
        cov = tk.gene_coverage(tokenizer, adata, min_coverage=0.1)
    model = set(tokenizer.genes)
    in_model = np.array([g in model for g in adata.var_names])
    naive = ((~missing) & in_model).sum(axis=1) / tokenizer.n_genes
    assert cov.fraction_measured == pytest.approx(naive.mean())
    assert cov.n_in_data == 45 and cov.n_absent == 5 and cov.n_data_genes_unused == 2
    assert cov.examples_absent == tokenizer.genes[45:50]
    by_cohort = cov.by_group["cohort"]
    assert by_cohort["B"]["fraction_measured"] == pytest.approx(naive[2:5].mean(), abs=1e-6)
    assert by_cohort["C"]["n_samples"] == 1
    assert cov.by_group["study"]["GTEx"]["fraction_measured"] == pytest.approx(naive[5], abs=1e-6)
    record = json.loads(json.dumps(cov.to_dict()))
    assert record["n_absent"] == 5 and record["by_group"]["cohort"]["A"]["n_samples"] == 2
    text = caplog.text
    assert "gene coverage by cohort: A " in text and "gene coverage by study:" in text
    assert text.count("gene coverage: the data measures") == 1


def test_gene_coverage_below_minimum_names_the_option(tokenizer: BinTokenizer) -> None:
    adata = _lacking(tokenizer, 30)  # 20 of 50 genes: 40%
    with pytest.raises(GeneMappingError, match=r"40\.0% on average.*lower --min-gene-coverage"):
        tk.gene_coverage(tokenizer, adata)
    assert tk.gene_coverage(tokenizer, adata, min_coverage=0.4).fraction_measured == pytest.approx(
        0.4
    )
    with pytest.raises(GeneMappingError, match=r"model\.min_gene_coverage"):
        tk.gene_coverage(tokenizer, adata, min_coverage=0.5, option="model.min_gene_coverage")


def test_gene_coverage_checks_each_cohort(tokenizer: BinTokenizer) -> None:
    adata = _lacking(tokenizer, 0)
    adata.obs["cohort"] = ["A"] * 5 + ["B"]
    adata.layers["missing"] = np.zeros(adata.shape, bool)
    adata.layers["missing"][5, :40] = True  # cohort B measures at most 12 of 50
    with pytest.raises(GeneMappingError, match=r"in cohort 'B'"):
        tk.gene_coverage(tokenizer, adata)


def test_save_writes_a_plain_gene_list(tokenizer: BinTokenizer, tmp_path) -> None:
    tokenizer.save(tmp_path)
    assert (tmp_path / tk.GENES_FILE).read_text().splitlines() == tokenizer.genes
    assert tk.read_gene_list(tmp_path / tk.GENES_FILE) == tokenizer.genes


def test_duplicate_vocab_genes_is_duplicate_error() -> None:
    with pytest.raises(DuplicateIdError, match=r"1 duplicate gene ids .*\['g1'\]"):
        TokenizerConfig(["g1", "g2", "g1"], normalization_factor=1.0)


def test_adata_duplicate_var_names_is_duplicate_error(tokenizer: BinTokenizer) -> None:
    var = [*tokenizer.genes, tokenizer.genes[0]]
    adata = ad.AnnData(X=np.ones((1, 51), np.float32))
    adata.var_names = var
    with pytest.raises(DuplicateIdError, match=r"duplicate var_names"):
        tokenizer.encode_adata(adata)


def test_decode_expected_wrong_width_is_error(tokenizer: BinTokenizer) -> None:
    with pytest.raises(ExpressionValueError, match=r"last axis of n_bins=64"):
        tokenizer.decode_expected(np.full((2, 65), 1 / 65))


def test_decode_expected_logits_instead_of_probs_is_error(tokenizer: BinTokenizer) -> None:
    with pytest.raises(ExpressionValueError, match=r"apply softmax"):
        tokenizer.decode_expected(np.random.default_rng(0).normal(size=(2, 64)))


def test_decode_out_of_range_token_is_error(tokenizer: BinTokenizer) -> None:
    with pytest.raises(ExpressionValueError, match=r"token ids must lie in 0..64"):
        tokenizer.decode(np.array([65]))


def test_load_without_file_is_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"tokenizer.json.*official checkpoints"):
        BinTokenizer.load(tmp_path)


def test_load_with_foreign_bins_is_config_error(tmp_path, tokenizer: BinTokenizer) -> None:
    tokenizer.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["bin_edges"] = np.geomspace(1e-3, 1, 64).tolist()
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"bin_edges are not linspace"):
        BinTokenizer.load(tmp_path)


def test_load_without_genes_is_config_error(tmp_path) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"normalization_factor": 2.0}))
    with pytest.raises(ConfigError, match=r"lacks \['genes'\]"):
        BinTokenizer.load(tmp_path)


def test_empty_gene_list_file_is_config_error(tmp_path) -> None:
    (tmp_path / "genes.txt").write_text("\n")
    with pytest.raises(ConfigError, match=r"is empty"):
        tk.read_gene_list(tmp_path / "genes.txt")


# --------------------------------------------------------------------------- missing layer
@pytest.mark.parametrize("sparse", [False, True])
def test_non_boolean_missing_layer_is_error(sparse: bool) -> None:
    """astype(bool) would read 2.5 as "missing" everywhere; the values are checked first."""
    genes = ["g0", "g1", "g2"]
    layer = np.array([[2.5, 0, 1], [0, 0, np.nan]], dtype=np.float32)
    adata = ad.AnnData(
        X=np.ones((2, 3), np.float32),
        var=pd.DataFrame(index=genes),
        layers={"missing": sp.csr_matrix(layer) if sparse else layer},
    )
    tok = BinTokenizer(TokenizerConfig(genes=genes, normalization_factor=4.0))
    with pytest.raises(ExpressionValueError, match=r"layers\['missing'\] holds 2 value\(s\)"):
        tok.encode_adata(adata)
    with pytest.raises(ExpressionValueError, match=r"the missing mask holds 2 value"):
        tok.encode(np.ones((2, 3)), missing=layer)
    with pytest.raises(ExpressionValueError, match=r"holds 2 value"):
        BinTokenizer.fit_adata(adata)


def test_zero_one_missing_layer_is_read_as_bool() -> None:
    genes = ["g0", "g1"]
    tok = BinTokenizer(TokenizerConfig(genes=genes, normalization_factor=4.0, n_bins=8))
    X = np.full((2, 2), 10.0)
    ints = np.array([[1, 0], [0, 1]], dtype=np.int64)
    expected = tok.encode(X, missing=ints.astype(bool))
    np.testing.assert_array_equal(tok.encode(X, missing=ints), expected)
    sparse_floats = sp.csr_matrix(ints.astype(float))
    np.testing.assert_array_equal(tok.encode(X, missing=sparse_floats), expected)
    assert expected[0, 0] == tok.mask_token_id


def test_text_missing_layer_is_error() -> None:
    with pytest.raises(ExpressionValueError, match=r"dtype <U1, not booleans"):
        tk.check_missing_mask(np.array([["y", "n"]]), "layers['missing']")


def test_check_adata_names_samples_and_genes() -> None:
    genes = ["g0", "g1", "g2"]
    X = np.array([[1.0, 2.0, 3.0], [1.0, -1.0, 3.0]], np.float32)
    adata = ad.AnnData(X=X, obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=genes))
    tok = BinTokenizer(TokenizerConfig(genes=genes, normalization_factor=4.0))
    with pytest.raises(ExpressionValueError, match=r"negative .* at sample 'b', gene 'g1'"):
        tok.check_adata(adata)
    adata.layers["missing"] = sp.csr_matrix(np.array([[0, 0, 0], [1, 1, 1]], bool))
    with pytest.raises(ExpressionValueError, match=r"1 of 2 sample\(s\) .*\['b'\]"):
        tok.check_adata(adata)  # the negative value is masked; the sample has nothing left
    tok.check_adata(adata, allow_all_missing=True)
