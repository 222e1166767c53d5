from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from bulkfm.errors import ConfigError, ExpressionValueError, GeneMappingError, InputFileError
from bulkfm.models import init_gene_embeddings
from bulkfm.models.gene_init import (
    cache_dir,
    coexpression_matrix,
    gene2vec_matrix,
    read_gene2vec,
    resolve_gene2vec,
)

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


def test_rescale_std_multiplies_the_whole_matrix_by_one_factor(tiny_model) -> None:
    from bulkfm.models.gene_init import rescale_gene_embeddings, rescale_matrix

    model = tiny_model(**SIZES, init_gene_embed_dim=4)
    x = np.random.default_rng(2).lognormal(1, 1, size=(40, 6))
    report = init_gene_embeddings(model, "coexpression", X_tpm=x, rescale_std=0.05)
    plain, _ = coexpression_matrix(x, 4)
    got = model.gene_embedding_layer.weight.detach().numpy()
    assert np.std(got, dtype=np.float64) == pytest.approx(0.05, rel=1e-5)
    np.testing.assert_allclose(got, plain * (0.05 / np.std(plain, dtype=np.float64)), rtol=1e-5)
    assert report["rescale_factor"] == pytest.approx(0.05 / np.std(plain, dtype=np.float64))
    before = got.copy()
    rescale_gene_embeddings(model, 0.1)
    np.testing.assert_allclose(
        model.gene_embedding_layer.weight.detach().numpy(), 2 * before, rtol=1e-5
    )
    with pytest.raises(ConfigError, match="constant"):
        rescale_matrix(np.ones((3, 2)), 0.02)
    with pytest.raises(ConfigError, match="rescale_std must be a positive number"):
        rescale_matrix(plain, -1.0)


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


# --------------------------------------------------------------------------- release files
# The published Gene2Vec release (jingcheng-du/Gene2vec, pre_trained_emb/) ships two text
# files: gene2vec_dim_200_iter_9.txt, one "SYMBOL<tab>v1 v2 ... vD " line per gene (tab
# after the symbol, a space after every value, no header), and
# gene2vec_dim_200_iter_9_w2v.txt, gensim's word2vec text format ("N D" header line, then
# "SYMBOL v1 ... vD"). Both are written here byte for byte in those layouts.
# Release symbols as in the file: DARS is the old symbol of DARS1, C1orf27 of ODR4.
RELEASE_SYMBOLS = ["TP53", "DARS", "C1orf27", "CD2AP", "NOTAGENE"]
RELEASE_ENSEMBL = {
    "TP53": "ENSG00000141510",
    "DARS": "ENSG00000115866",
    "C1orf27": "ENSG00000157181",
    "CD2AP": "ENSG00000198087",
}
RELEASE_DIM = 200


def write_release_txt(path, keys, vectors) -> None:
    with open(path, "w") as out:
        for key, row in zip(keys, vectors, strict=True):
            out.write(key + "\t" + "".join(f"{float(v)} " for v in row) + "\n")


def write_release_w2v(path, keys, vectors) -> None:
    lines = [f"{len(keys)} {vectors.shape[1]}"]
    lines += [
        f"{k} " + " ".join(str(float(v)) for v in row) for k, row in zip(keys, vectors, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


def release_vectors() -> np.ndarray:
    rng = np.random.default_rng(9)
    return rng.normal(0, 0.003, size=(len(RELEASE_SYMBOLS), RELEASE_DIM)).astype(np.float32)


@pytest.mark.parametrize("writer", [write_release_txt, write_release_w2v])
def test_read_gene2vec_reads_both_release_files(tmp_path, writer) -> None:
    vectors = release_vectors()
    path = tmp_path / "gene2vec_dim_200_iter_9.txt"
    writer(path, RELEASE_SYMBOLS, vectors)
    keys, got = read_gene2vec(path)
    assert keys == RELEASE_SYMBOLS
    np.testing.assert_array_equal(got, vectors)  # str(float32 -> float) round-trips exactly


def test_release_symbols_map_through_the_gene_table_with_a_coverage_report(tmp_path) -> None:
    from bulkfm.data.genes import GeneTable

    vectors = release_vectors()
    path = tmp_path / "gene2vec_dim_200_iter_9.txt"
    write_release_txt(path, RELEASE_SYMBOLS, vectors)
    keys, got = read_gene2vec(path)
    absent = "ENSG00000012048"  # BRCA1: in the vocabulary, not in this file
    genes = [RELEASE_ENSEMBL["CD2AP"], absent, RELEASE_ENSEMBL["DARS"], RELEASE_ENSEMBL["TP53"]]
    matrix, report = gene2vec_matrix(genes, keys, got, table=GeneTable.default())
    np.testing.assert_array_equal(matrix[0], vectors[3])
    np.testing.assert_array_equal(matrix[2], vectors[1])  # old symbol DARS found DARS1
    np.testing.assert_array_equal(matrix[3], vectors[0])
    assert report["n_found"] == 3 and report["n_missing"] == 1
    assert report["missing_examples"] == [absent]
    assert report["n_keys_unmapped"] == 1  # NOTAGENE
    assert report["fraction_found"] == pytest.approx(3 / 4)
    assert report["dim"] == RELEASE_DIM and report["n_vectors"] == len(RELEASE_SYMBOLS)


def _release_server(body: bytes):
    from tests.data.local_http import local_server, serve_bytes

    def app(request):
        from tests.data.local_http import Reply

        if request.path.endswith("/gene2vec_dim_200_iter_9.txt"):
            return serve_bytes(body, request)
        return Reply(404, b"Not Found")

    return local_server(app)


def test_init_gene_embeddings_from_a_url_downloads_once_into_the_cache(
    tmp_path, monkeypatch, tiny_model
) -> None:
    vectors = vectors_for(SYMBOLS, seed=5)
    local = tmp_path / "release.txt"
    write_release_txt(local, SYMBOLS, vectors)
    monkeypatch.setenv("BULKFM_CACHE", str(tmp_path / "cache"))
    model = tiny_model(**SIZES, init_gene_embed_dim=DIM)
    with _release_server(local.read_bytes()) as server:
        url = f"{server.url}/pre_trained_emb/gene2vec_dim_200_iter_9.txt"
        report = init_gene_embeddings(
            model,
            "gene2vec",
            genes=ENSEMBL,
            gene2vec_path=url,
            symbol_to_ensembl=SYMBOL_TO_ENSEMBL,
            gene2vec_md5=hashlib.md5(local.read_bytes()).hexdigest(),
        )
        assert len(server.paths("/pre_trained_emb/")) == 1
    np.testing.assert_array_equal(model.gene_embedding_layer.weight.detach().numpy(), vectors)
    cached = Path(report["file"])
    assert report["source"] == url
    assert cached.is_relative_to(tmp_path / "cache" / "gene2vec")
    assert cached.name == "gene2vec_dim_200_iter_9.txt"
    assert cached.read_bytes() == local.read_bytes()
    # server gone: the cached file is used without any network
    again = init_gene_embeddings(
        model, "gene2vec", genes=ENSEMBL, gene2vec_path=url, symbol_to_ensembl=SYMBOL_TO_ENSEMBL
    )
    assert again["file"] == report["file"] and again["n_found"] == len(SYMBOLS)


def test_gene2vec_url_errors_are_clear(tmp_path, monkeypatch, tiny_model) -> None:
    from bulkfm.errors import DownloadError

    local = tmp_path / "release.txt"
    write_release_txt(local, SYMBOLS, vectors_for(SYMBOLS))
    monkeypatch.setenv("BULKFM_CACHE", str(tmp_path / "cache"))
    model = tiny_model(**SIZES, init_gene_embed_dim=DIM)
    with _release_server(local.read_bytes()) as server:
        with pytest.raises(DownloadError, match="404") as missing:
            resolve_gene2vec(f"{server.url}/nope/gene2vec.txt", progress=False)
        assert "gene2vec_dim_200_iter_9.txt" in str(missing.value)  # names the real release
        url = f"{server.url}/pre_trained_emb/gene2vec_dim_200_iter_9.txt"
        with pytest.raises(DownloadError, match="md5"):
            init_gene_embeddings(
                model, "gene2vec", genes=ENSEMBL, gene2vec_path=url, gene2vec_md5="0" * 32
            )
    assert not list((tmp_path / "cache").rglob("gene2vec_dim_200_iter_9.txt"))


def test_resolve_gene2vec_keeps_paths_and_names_the_cache(tmp_path, monkeypatch) -> None:
    assert resolve_gene2vec(tmp_path / "g.txt") == tmp_path / "g.txt"
    assert resolve_gene2vec("relative/https.txt") == Path("relative/https.txt")
    monkeypatch.setenv("BULKFM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BULKFM_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "bulkfm"
