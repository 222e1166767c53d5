from __future__ import annotations

import numpy as np
import pytest
import torch

from bulkfm.errors import ConfigError, ExpressionValueError, GeneMappingError, InputFileError
from bulkfm.models import init_gene_embeddings
from bulkfm.models.gene_init import coexpression_matrix, gene2vec_matrix, read_gene2vec

DIM = 8
# Six genes, as in the vector files below; depth and width are BulkRNABertConfig's own
# defaults, which these tests were written with.
SIZES = dict(n_genes=6, ffn_embed_dim=512, num_layers=4)
SYMBOLS = ["TP53", "EGFR", "KRAS", "BRAF", "MYC", "PTEN"]
ENSEMBL = [f"ENSG{i:011d}" for i in range(len(SYMBOLS))]
SYMBOL_TO_ENSEMBL = dict(zip(SYMBOLS, ENSEMBL, strict=True))


def vectors_for(keys: list[str], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(len(keys), DIM)).astype(np.float32)


def write_text(path, keys, vectors, header: bool) -> None:
    lines = [f"{len(keys)} {vectors.shape[1]}"] if header else []
    lines += [
        f"{k} " + " ".join(repr(float(v)) for v in row)
        for k, row in zip(keys, vectors, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


def write_binary(path, keys, vectors) -> None:
    with open(path, "wb") as handle:
        handle.write(f"{len(keys)} {vectors.shape[1]}\n".encode())
        for key, row in zip(keys, vectors, strict=True):
            handle.write(key.encode() + b" " + row.astype("<f4").tobytes() + b"\n")


@pytest.mark.parametrize("fmt", ["text", "text+header", "binary"])
def test_read_gene2vec_formats(tmp_path, fmt: str) -> None:
    vectors = vectors_for(SYMBOLS)
    path = tmp_path / "g2v"
    if fmt == "binary":
        write_binary(path, SYMBOLS, vectors)
    else:
        write_text(path, SYMBOLS, vectors, header=fmt == "text+header")
    keys, got = read_gene2vec(path)
    assert keys == SYMBOLS
    np.testing.assert_array_equal(got, vectors)


def test_gene2vec_matrix_maps_symbols_and_reports_coverage() -> None:
    keys = [*SYMBOLS[:4], "NOTAGENE"]
    vectors = vectors_for(keys)
    genes = ENSEMBL  # MYC and PTEN have no vector
    matrix, report = gene2vec_matrix(genes, keys, vectors, symbol_to_ensembl=SYMBOL_TO_ENSEMBL)
    np.testing.assert_array_equal(matrix[:4], vectors[:4])
    assert np.isfinite(matrix[4:]).all() and not np.allclose(matrix[4], matrix[5])
    assert report["n_found"] == 4 and report["n_missing"] == 2
    assert report["missing_examples"] == ENSEMBL[4:]
    assert report["n_keys_unmapped"] == 1
    assert report["fraction_found"] == pytest.approx(4 / 6)


def test_gene2vec_matrix_with_ensembl_keys_needs_no_mapping() -> None:
    keys = [f"{g}.7" for g in ENSEMBL[::-1]]
    vectors = vectors_for(keys)
    matrix, report = gene2vec_matrix(ENSEMBL, keys, vectors)
    np.testing.assert_array_equal(matrix, vectors[::-1])
    assert report["n_found"] == len(ENSEMBL)


def test_gene2vec_matrix_through_gene_table() -> None:
    genes_mod = pytest.importorskip("bulkfm.data.genes")
    pd = pytest.importorskip("pandas")
    rows = pd.DataFrame(
        {"gene_name": SYMBOLS, "Approved symbol": SYMBOLS, "Chromosome": ["1"] * 6},
        index=pd.Index(ENSEMBL, name="gene_id"),
    )
    table = genes_mod.GeneTable(rows)
    keys = SYMBOLS[::-1]
    vectors = vectors_for(keys, seed=3)
    matrix, report = gene2vec_matrix(ENSEMBL, keys, vectors, table=table)
    np.testing.assert_array_equal(matrix, vectors[::-1])
    assert report["n_found"] == 6


def test_init_gene_embeddings_gene2vec_writes_model(tmp_path, tiny_model) -> None:
    vectors = vectors_for(SYMBOLS)
    write_text(tmp_path / "g2v.txt", SYMBOLS, vectors, header=True)
    model = tiny_model(**SIZES, init_gene_embed_dim=DIM)
    report = init_gene_embeddings(
        model,
        "gene2vec",
        genes=ENSEMBL,
        gene2vec_path=tmp_path / "g2v.txt",
        symbol_to_ensembl=SYMBOL_TO_ENSEMBL,
    )
    np.testing.assert_array_equal(model.gene_embedding_layer.weight.detach().numpy(), vectors)
    assert report["n_found"] == 6 and report["source"].endswith("g2v.txt")


def test_coexpression_embedding_approximates_correlation() -> None:
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(200, 3))
    log_tpm = 3.0 + latent @ rng.normal(size=(3, 12)) * 0.4 + rng.normal(0, 0.05, (200, 12))
    x = np.clip(10**log_tpm - 1, 0.0, None)
    x[:, 5] = 7.0  # constant gene: correlation undefined
    emb, report = coexpression_matrix(x, 3)  # = the latent rank: a clear eigen-gap
    varying = np.arange(12) != 5
    corr = np.corrcoef(np.log10(1 + x[:, varying]).T)
    vals, vecs = np.linalg.eigh(corr)
    top = np.argsort(vals)[::-1][:3]
    best_rank3 = (vecs[:, top] * vals[top]) @ vecs[:, top].T
    e = emb[varying].astype(np.float64)
    np.testing.assert_allclose(e @ e.T, best_rank3, atol=1e-4)
    assert np.isfinite(emb).all() and np.linalg.norm(emb[5]) > 0
    assert report["n_zero_variance"] == 1 and report["rank_used"] == 3
    assert report["explained_fraction"] > 0.9


def test_coexpression_ignores_values_marked_missing() -> None:
    rng = np.random.default_rng(1)
    x = rng.lognormal(1, 1, size=(30, 6))
    missing = np.zeros_like(x, dtype=bool)
    missing[3, 2] = missing[7, 4] = True
    a, _ = coexpression_matrix(x, 3, missing=missing)
    x2 = x.copy()
    x2[missing] = np.nan  # unread
    b, _ = coexpression_matrix(x2, 3, missing=missing)
    np.testing.assert_array_equal(a, b)
    c, _ = coexpression_matrix(x, 3)
    assert not np.allclose(a, c)


def test_init_coexpression_and_random_write_model(tiny_model) -> None:
    model = tiny_model(**SIZES, init_gene_embed_dim=4)
    x = np.random.default_rng(2).lognormal(1, 1, size=(40, 6))
    report = init_gene_embeddings(model, "coexpression", X_tpm=x)
    expected, _ = coexpression_matrix(x, 4)
    np.testing.assert_array_equal(model.gene_embedding_layer.weight.detach().numpy(), expected)
    assert report["method"] == "coexpression"
    init_gene_embeddings(model, "random", seed=5)
    first = model.gene_embedding_layer.weight.detach().clone()
    init_gene_embeddings(model, "random", seed=5)
    torch.testing.assert_close(model.gene_embedding_layer.weight, first)
    assert 0.01 < float(first.std()) < 0.04


# --------------------------------------------------------------------------- bad input
def test_malformed_line_names_line_number(tmp_path) -> None:
    (tmp_path / "g.txt").write_text("TP53 0.1 0.2 0.3\nEGFR 0.1 0.2\n")
    with pytest.raises(InputFileError, match=r"line 2: 2 values after the key, expected 3"):
        read_gene2vec(tmp_path / "g.txt")


def test_non_numeric_vector(tmp_path) -> None:
    (tmp_path / "g.txt").write_text("TP53 0.1 abc\n")
    with pytest.raises(InputFileError, match=r"line 1: non-numeric"):
        read_gene2vec(tmp_path / "g.txt")


def test_truncated_binary_file(tmp_path) -> None:
    write_binary(tmp_path / "g.bin", SYMBOLS, vectors_for(SYMBOLS))
    data = (tmp_path / "g.bin").read_bytes()
    (tmp_path / "g.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match=r"ends after 2 of 6 vectors"):
        read_gene2vec(tmp_path / "g.bin", binary=True)


def test_missing_gene2vec_file(tmp_path) -> None:
    with pytest.raises(InputFileError, match=r"does not exist"):
        read_gene2vec(tmp_path / "none.txt")


def test_empty_gene2vec_file(tmp_path) -> None:
    (tmp_path / "g.txt").write_text("\n")
    with pytest.raises(InputFileError, match=r"is empty"):
        read_gene2vec(tmp_path / "g.txt")


def test_no_overlap_is_gene_mapping_error() -> None:
    with pytest.raises(GeneMappingError, match=r"0 of 6"):
        gene2vec_matrix(ENSEMBL, ["A", "B"], vectors_for(["A", "B"]), symbol_to_ensembl={})


def test_dimension_mismatch_is_config_error(tmp_path, tiny_model) -> None:
    write_text(tmp_path / "g.txt", SYMBOLS, vectors_for(SYMBOLS), header=False)
    model = tiny_model(**SIZES, init_gene_embed_dim=200)
    with pytest.raises(ConfigError, match=r"8-d but the model has init_gene_embed_dim=200"):
        init_gene_embeddings(
            model, "gene2vec", genes=ENSEMBL, gene2vec_path=tmp_path / "g.txt", symbol_to_ensembl={}
        )


def test_gene_count_mismatch_is_gene_mapping_error(tmp_path, tiny_model) -> None:
    model = tiny_model(**SIZES, init_gene_embed_dim=200)
    with pytest.raises(GeneMappingError, match=r"5 genes given but the model has n_genes=6"):
        init_gene_embeddings(model, "gene2vec", genes=ENSEMBL[:5], gene2vec_path=tmp_path)


def test_coexpression_wrong_columns_is_gene_mapping_error(tiny_model) -> None:
    model = tiny_model(**SIZES, init_gene_embed_dim=200)
    with pytest.raises(GeneMappingError, match=r"X_tpm has 5 gene columns"):
        init_gene_embeddings(model, "coexpression", X_tpm=np.ones((4, 5)))


def test_coexpression_negative_values_is_expression_error() -> None:
    x = np.ones((4, 3))
    x[1, 1] = -0.5  # log10(1 + x) is finite here: must still be rejected
    with pytest.raises(ExpressionValueError, match=r"1 expression values are NaN, inf or negative"):
        coexpression_matrix(x, 2)


def test_unknown_method_is_config_error(tiny_model) -> None:
    model = tiny_model(**SIZES, init_gene_embed_dim=200)
    with pytest.raises(ConfigError, match=r"unknown gene embedding init 'word2vec'"):
        init_gene_embeddings(model, "word2vec")  # type: ignore[arg-type]


def test_gene2vec_without_path_is_config_error(tiny_model) -> None:
    model = tiny_model(**SIZES, init_gene_embed_dim=200)
    with pytest.raises(ConfigError, match=r"needs genes="):
        init_gene_embeddings(model, "gene2vec")
