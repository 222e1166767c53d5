"""scFoundation adapter: a tiny random model written in the released checkpoint format.

References are independent of the adapter: preprocessing by hand, the published
``gatherData`` trick re-expressed with ``topk``, and a naive one-sample-at-a-time
forward pass (attention written out by hand) with the published pooling
``[h[-1], h[-2], max(h[:-2]), mean(h[:-2])]``.
"""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
ad = pytest.importorskip("anndata")

from bulkfm.adapters.scfoundation import (  # noqa: E402
    GENE_INDEX_FILE,
    ScFoundationEmbedder,
    bulk_values,
    read_gene_index,
    read_released,
)
from bulkfm.adapters.scfoundation_net import NetConfig, gather_nonzero  # noqa: E402
from bulkfm.embedders import get_embedder  # noqa: E402
from bulkfm.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    ExpressionValueError,
    GeneMappingError,
)
from tests.adapters.scfoundation_files import (  # noqa: E402
    BINS,
    DEPTH,
    HEADS,
    PAD_ID,
    SEQ_LEN,
    SYMBOLS,
    D,
    G,
    released_config,
    released_state,
    write_gene_index,
    write_release,
)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ensembl() -> list[str]:
    from bulkfm.data.genes import map_to_ensembl

    ids, methods, _ = map_to_ensembl(SYMBOLS, id_type="symbol")
    assert set(methods) == {"approved_symbol"}
    return [str(i) for i in ids]


@pytest.fixture
def model_dir(tmp_path):
    write_release(tmp_path / "scf")
    return tmp_path / "scf"


def make_adata(ensembl, n=7, seed=1, counts_layer=False) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(1.0, 60.0, size=(n, G))).astype(np.float32)
    counts[rng.random((n, G)) < 0.3] = 0  # varied numbers of expressed genes -> padding
    tpm = counts / counts.sum(axis=1, keepdims=True) * 1e6
    adata = ad.AnnData(tpm.astype(np.float32))
    adata.obs_names = [f"s{i}" for i in range(n)]
    adata.var_names = ensembl
    if counts_layer:
        adata.layers["counts"] = counts
    return adata


def embedder(model_dir, **kw) -> ScFoundationEmbedder:
    return ScFoundationEmbedder(model_dir, trust_pickle=True, **kw)


# --------------------------------------------------------------------------- naive reference


def naive_embedding(x: np.ndarray, state: dict[str, torch.Tensor], pool: str = "all"):
    """One sample at a time, as the published script: keep positive entries, run, pool."""
    s = {k: v.double() for k, v in state.items()}
    out = []
    for row in x:
        keep = [i for i, v in enumerate(row) if v > 0]
        v = torch.tensor(row[keep], dtype=torch.float64)[:, None]
        h = torch.nn.functional.leaky_relu(
            v @ s["token_emb.mlp.weight"].T + s["token_emb.mlp.bias"], 0.1
        )
        mix = torch.softmax(h + h @ s["token_emb.mlp2.weight"].T + s["token_emb.mlp2.bias"], -1)
        z = mix @ s["token_emb.emb.weight"] + s["pos_emb.weight"][keep]
        for i in range(DEPTH):
            p = f"encoder.transformer_encoder.{i}."
            q, k, w = (
                z @ s[p + "self_attn.in_proj_weight"].T + s[p + "self_attn.in_proj_bias"]
            ).chunk(3, -1)
            heads = []
            for hd in range(HEADS):
                sl = slice(hd * D // HEADS, (hd + 1) * D // HEADS)
                att = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(D // HEADS), -1)
                heads.append(att @ w[:, sl])
            a = torch.cat(heads, -1) @ s[p + "self_attn.out_proj.weight"].T
            z = _ln(z + a + s[p + "self_attn.out_proj.bias"], s, p + "norm1")
            ff = torch.relu(z @ s[p + "linear1.weight"].T + s[p + "linear1.bias"])
            z = _ln(z + ff @ s[p + "linear2.weight"].T + s[p + "linear2.bias"], s, p + "norm2")
        z = _ln(z, s, "encoder.norm")
        if pool == "all":
            out.append(torch.cat([z[-1], z[-2], z[:-2].max(0).values, z[:-2].mean(0)]))
        else:
            out.append(z.max(0).values)
    return torch.stack(out).numpy()


def _ln(z, s, name):
    return torch.nn.functional.layer_norm(z, (D,), s[name + ".weight"], s[name + ".bias"], 1e-5)


def hand_input(values: np.ndarray, recipe: str = "per_sample") -> np.ndarray:
    """The published formulas written out row by row with the math module."""
    rows = []
    totals = [float(sum(r)) for r in values]
    median = float(np.median([t for t in totals if t > 0]))
    for r, total in zip(values, totals, strict=True):
        if recipe == "per_sample":
            normed = [math.log1p(v / total * 1e4) for v in r]
            depth = math.log10(total)
        else:
            normed = [math.log1p(v / total * median) for v in r]
            depth = math.log10(sum(normed))
        rows.append([*normed, depth, depth])
    return np.array(rows)


# --------------------------------------------------------------------------- preprocessing


def test_per_sample_recipe_by_hand():
    values = np.array([[1.0, 3.0, 0.0], [2.0, 2.0, 2.0]])
    got = bulk_values(values)
    expected = [
        [math.log1p(2500), math.log1p(7500), 0.0, math.log10(4), math.log10(4)],
        [math.log1p(1e4 / 3)] * 3 + [math.log10(6)] * 2,
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.dtype == np.float32


def test_published_recipe_by_hand():
    # totals 4 and 6 -> scanpy's default target is their median, 5
    values = np.array([[1.0, 3.0, 0.0], [2.0, 2.0, 2.0]])
    row0 = [math.log1p(1.25), math.log1p(3.75), 0.0]
    row1 = [math.log1p(2 * 5 / 6)] * 3
    expected = [
        [*row0, math.log10(sum(row0)), math.log10(sum(row0))],
        [*row1, math.log10(sum(row1)), math.log10(sum(row1))],
    ]
    np.testing.assert_allclose(bulk_values(values, recipe="published"), expected, rtol=1e-6)


def test_negative_values_fail():
    with pytest.raises(ExpressionValueError, match="negative"):
        bulk_values(np.array([[1.0, -2.0]]))


def test_sample_without_expression_fails():
    with pytest.raises(ExpressionValueError, match="express none"):
        bulk_values(np.array([[1.0, 2.0], [0.0, 0.0]]), sample_names=np.array(["a", "b"]))


def test_depth_token_not_positive_fails():
    with pytest.raises(ExpressionValueError, match="depth token"):
        bulk_values(np.array([[0.2, 0.3]]))


def test_gather_matches_published_topk_trick():
    """``gatherData``: rank kept positions by a descending per-position weight, topk."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(5, 12, generator=gen) * (torch.rand(5, 12, generator=gen) > 0.4)
    x[:, -2:] = 2.5  # T and S are always kept
    keep = x > 0
    longest = int(keep.sum(1).max())
    weight = torch.arange(x.shape[1], 0, -1, dtype=torch.float64) * 20000
    score = torch.where(keep, 1 + weight, torch.tensor(-math.inf, dtype=torch.float64))
    score = torch.hstack([score, torch.ones(5, longest, dtype=torch.float64)])
    data = torch.hstack([x, torch.full((5, longest), float(PAD_ID))])
    idx = score.topk(longest).indices
    ref_values = data.gather(1, idx)
    values, positions, padding = gather_nonzero(x, pad_value=float(PAD_ID), pad_position=99)
    torch.testing.assert_close(values, ref_values)
    torch.testing.assert_close(padding, ref_values == PAD_ID)
    torch.testing.assert_close(positions[~padding], idx[~padding])
    assert (positions[padding] == 99).all()


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("recipe", ["per_sample", "published"])
def test_matches_naive_loop_and_is_batch_invariant(model_dir, ensembl, recipe, monkeypatch):
    import bulkfm.adapters.scfoundation as scf

    monkeypatch.setattr(scf, "ROWS_PER_CHUNK", 3)  # the published median spans all chunks
    adata = make_adata(ensembl, counts_layer=True)  # totals differ between samples
    out = {b: embedder(model_dir, recipe=recipe, batch_size=b).transform(adata) for b in (1, 3)}
    assert out[3].shape == (adata.n_obs, 4 * D)
    np.testing.assert_allclose(out[1], out[3], atol=1e-5)
    counts = np.asarray(adata.layers["counts"], np.float64)
    reference = naive_embedding(hand_input(counts, recipe), released_state())
    np.testing.assert_allclose(out[3], reference, atol=1e-4)


def test_max_pool_matches_naive(model_dir, ensembl):
    adata = make_adata(ensembl, n=4)
    got = embedder(model_dir, pooling="max", batch_size=4).transform(adata)
    reference = naive_embedding(
        hand_input(np.asarray(adata.X, np.float64)), released_state(), "max"
    )
    assert got.shape == (4, D)
    np.testing.assert_allclose(got, reference, atol=1e-4)


def test_deterministic_and_sample_independent(model_dir, ensembl):
    adata = make_adata(ensembl)
    first = embedder(model_dir).transform(adata)
    again = embedder(model_dir, batch_size=2).transform(adata)
    np.testing.assert_array_equal(first, embedder(model_dir).transform(adata))
    np.testing.assert_allclose(first, again, atol=1e-5)
    alone = embedder(model_dir).transform(adata[2:3].copy())
    np.testing.assert_allclose(alone[0], first[2], atol=1e-5)
    assert not np.allclose(first[0], first[1])


def test_counts_layer_is_used_when_present(model_dir, ensembl):
    adata = make_adata(ensembl, counts_layer=True)
    emb = embedder(model_dir)
    got = emb.transform(adata)
    assert emb.coverage_["source"] == "layers['counts']"
    assert "counts" in emb.coverage_["depth_tokens"]
    as_x = ad.AnnData(adata.layers["counts"].copy(), obs=adata.obs, var=adata.var)
    np.testing.assert_allclose(got, embedder(model_dir).transform(as_x), atol=1e-6)
    tpm = embedder(model_dir, layer="X").transform(adata)
    assert not np.allclose(got, tpm, atol=1e-3)  # T/S now carry the library size


def test_coverage_and_absent_genes(model_dir, ensembl):
    adata = make_adata(ensembl)[:, 5:].copy()  # 35 of the 40 genes
    emb = embedder(model_dir)
    got = emb.transform(adata)
    assert emb.coverage_["n_found"] == G - 5 and emb.coverage_["n_vocabulary"] == G
    full = np.zeros((adata.n_obs, G))
    full[:, 5:] = adata.X
    reference = naive_embedding(hand_input(full), released_state())
    np.testing.assert_allclose(got, reference, atol=1e-4)


def test_safetensors_release_needs_no_pickle(tmp_path, model_dir, ensembl):
    from safetensors.torch import save_file

    folder = tmp_path / "st"
    folder.mkdir()
    save_file(released_state(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(released_config()))
    write_gene_index(folder)
    adata = make_adata(ensembl, n=3)
    got = ScFoundationEmbedder(folder).transform(adata)
    np.testing.assert_allclose(got, embedder(model_dir).transform(adata), atol=1e-6)


def write_safetensors(folder) -> None:
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    save_file(released_state(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(released_config()))


def test_folder_with_both_formats_reads_safetensors_without_pickle(model_dir, ensembl):
    adata = make_adata(ensembl, n=2)
    reference = embedder(model_dir).transform(adata)
    write_safetensors(model_dir)  # beside models.ckpt
    got = ScFoundationEmbedder(model_dir).transform(adata)
    np.testing.assert_allclose(got, reference, atol=1e-6)


def test_config_beside_safetensors_file_enters_the_fingerprint(tmp_path):
    folder = tmp_path / "st"
    write_safetensors(folder)
    write_gene_index(folder)
    weights = folder / "model.safetensors"
    base = ScFoundationEmbedder(weights).fingerprint()
    config = released_config()
    config["model_config"]["mae_autobin"]["bin_alpha"] = 0.5
    (folder / "config.json").write_text(json.dumps(config))
    assert ScFoundationEmbedder(weights).fingerprint() != base


def test_registered(model_dir):
    assert isinstance(get_embedder("scfoundation", model_dir=model_dir), ScFoundationEmbedder)


# --------------------------------------------------------------------------- bad input


def test_missing_key_fails_listing_it(tmp_path, ensembl):
    state = released_state()
    state["pos_embedding.weight"] = state.pop("pos_emb.weight")
    write_release(tmp_path / "bad", state=state)
    with pytest.raises(CheckpointError, match=r"missing keys \['pos_emb.weight'\]"):
        embedder(tmp_path / "bad").transform(make_adata(ensembl, n=2))


def test_shape_mismatch_fails(tmp_path, ensembl):
    state = released_state()
    state["token_emb.emb.weight"] = torch.zeros(BINS + 1, D)
    write_release(tmp_path / "bad", state=state)
    with pytest.raises(CheckpointError, match=r"token_emb\.emb\.weight"):
        embedder(tmp_path / "bad").transform(make_adata(ensembl, n=2))


def test_pickle_without_opt_in_fails(model_dir, ensembl):
    with pytest.raises(CheckpointError, match="trust_pickle"):
        ScFoundationEmbedder(model_dir).transform(make_adata(ensembl, n=2))


def test_malformed_config_json_fails(tmp_path):
    folder = tmp_path / "st"
    write_safetensors(folder)
    (folder / "config.json").write_text('{"model": "mae_autobin",')
    with pytest.raises(CheckpointError, match=r"cannot read .*config\.json.*released config"):
        read_released(folder)


def test_non_numeric_config_value_fails(model_dir):
    config, _ = read_released(model_dir, trust_pickle=True)
    config["bin_alpha"] = "one"
    with pytest.raises(CheckpointError, match=r"not a number.*released config"):
        NetConfig.from_released(config)


def test_unknown_version_key_fails(model_dir, ensembl):
    with pytest.raises(CheckpointError, match=r"no model version 'gene'.*\['cell', 'rde'\]"):
        embedder(model_dir, key="gene").transform(make_adata(ensembl, n=2))


def test_low_coverage_fails(model_dir, ensembl):
    adata = make_adata(ensembl)[:, :1].copy()
    with pytest.raises(GeneMappingError, match="only 1 of the model's 40 genes"):
        embedder(model_dir).transform(adata)


def test_gene_index_of_wrong_length_fails(model_dir, ensembl):
    write_gene_index(model_dir, SYMBOLS[:-1])
    with pytest.raises(CheckpointError, match="39 genes but the model expects 40"):
        embedder(model_dir).transform(make_adata(ensembl, n=2))


def test_missing_gene_index_fails(model_dir, ensembl):
    (model_dir / GENE_INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match="OS_scRNA_gene_index"):
        embedder(model_dir).transform(make_adata(ensembl, n=2))


def test_missing_path_fails(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ScFoundationEmbedder(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="--model-dir"):
        ScFoundationEmbedder()


@pytest.mark.parametrize(
    ("option", "pattern"),
    [
        ({"recipe": "scanpy"}, "recipe"),
        ({"pooling": "cls"}, "pooling"),
        ({"target_sum": "lots"}, "target_sum"),
        ({"target_sum": -1}, "target_sum"),
        ({"min_coverage": 2}, "min_coverage"),
    ],
)
def test_bad_options_fail(model_dir, option, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ScFoundationEmbedder(model_dir, **option)


def test_yaml_string_target_sum_is_read(model_dir):
    assert ScFoundationEmbedder(model_dir, target_sum="1e4").target_sum == 1e4


def test_read_released_flattens_config(model_dir):
    config, state = read_released(model_dir / "models.ckpt", key="rde", trust_pickle=True)
    assert config["seq_len"] == SEQ_LEN and config["encoder"]["hidden_dim"] == D
    assert "pos_emb.weight" in state and not any(k.startswith("model.") for k in state)


# --------------------------------------------------------------------------- real vocabulary


@pytest.mark.realdata
def test_real_gene_index_and_tcga_coverage(shared_data):
    from bulkfm.adapters.base import gene_input

    vocab = read_gene_index(shared_data / "genes" / "scfoundation_gene_index_19264.tsv")
    raw = pd.read_csv(shared_data / "genes" / "scfoundation_gene_index_19264.tsv", sep="\t")
    assert len(vocab) == 19264 and vocab[:3] == raw["gene_name"].tolist()[:3]
    with gzip.open(shared_data / "tcga" / "tcga_tumor_counts_7cohorts.tsv.gz", "rt") as fh:
        header = fh.readline().rstrip("\n").split("\t")
    genes = [h for h in header if h.startswith("ENSG")]
    adata = ad.AnnData(np.ones((1, len(genes)), dtype=np.float32))
    adata.var_names = genes
    report = gene_input(adata, vocab, id_type="symbol", model="scFoundation").report
    assert report["n_vocabulary"] == 19264
    assert report["fraction_found"] > 0.9, report
