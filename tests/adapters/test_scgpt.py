"""scGPT adapter: a tiny random model written in the release's format, checked against
a naive forward through torch.nn.TransformerEncoder built from the same tensors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from bulkfm.adapters.scgpt import (
    ScGPTArgs,
    ScGPTEmbedder,
    bin_values,
    parameter_count,
    read_vocab,
    select_tokens,
)
from bulkfm.errors import CheckpointError, ConfigError, ExpressionValueError, GeneMappingError
from tests.adapters.scgpt_files import (
    D_HID,
    GENES,
    HEADS,
    LAYERS,
    NOT_IN_VOCAB,
    PAD_VALUE,
    VOCAB,
    D,
    release_state,
    write_release,
)


def toy_adata(n: int = 4, seed: int = 0) -> ad.AnnData:
    """Distinct positive values per sample (no bin ties), some zeros, 2 genes outside the vocab."""
    rng = np.random.default_rng(seed)
    ids = list(GENES.values()) + list(NOT_IN_VOCAB.values())
    X = np.stack([rng.permutation(np.arange(1, len(ids) + 1)) * 7.0 for _ in range(n)])
    X[X < 20] = 0  # two zeros per sample
    X[1, :] = np.where(np.arange(len(ids)) < 3, X[1], 0)  # sample 1: few genes
    a = ad.AnnData(X.astype(np.float32), var=pd.DataFrame(index=ids))
    a.obs_names = [f"s{i}" for i in range(n)]
    return a


# --------------------------------------------------------------------------- naive reference


def naive_bins(x: np.ndarray, n_bins: int = 51) -> np.ndarray:
    """Published binning for values without ties: left-side digitize on quantile edges."""
    edges = np.quantile(x.astype(np.float32), np.linspace(0, 1, n_bins - 1))
    return np.digitize(x.astype(np.float32), edges)


def naive_tokens(row: np.ndarray, keep: int | None = None) -> tuple[list[int], list[float]]:
    """<cls> + expressed vocabulary genes with bins (top ``keep`` by value when given)."""
    syms = list(GENES) + [None] * len(NOT_IN_VOCAB)
    expressed = [(s, v) for s, v in zip(syms, row, strict=True) if s is not None and v > 0]
    bins = naive_bins(np.array([v for _, v in expressed]))
    items = [(VOCAB[s], float(b), v) for (s, v), b in zip(expressed, bins, strict=True)]
    if keep is not None:
        items = sorted(items, key=lambda it: -it[2])[:keep]
    return [VOCAB["<cls>"]] + [i for i, _, _ in items], [PAD_VALUE] + [b for _, b, _ in items]


def naive_embedding(state: dict[str, torch.Tensor], ids: list[int], values: list[float]):
    """One sample, no padding, through torch.nn.TransformerEncoder."""
    layer = torch.nn.TransformerEncoderLayer(D, HEADS, D_HID, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).eval()
    sub = {
        k.removeprefix("transformer_encoder.")
        .replace("Wqkv.weight", "in_proj_weight")
        .replace("Wqkv.bias", "in_proj_bias"): v
        for k, v in state.items()
        if k.startswith("transformer_encoder.")
    }
    enc.load_state_dict(sub)
    s = state
    gene = F.layer_norm(
        s["encoder.embedding.weight"][torch.tensor(ids)],
        (D,),
        s["encoder.enc_norm.weight"],
        s["encoder.enc_norm.bias"],
    )
    v = torch.tensor(values, dtype=torch.float32)[:, None].clamp(max=512)
    h = torch.relu(v * s["value_encoder.linear1.weight"][:, 0] + s["value_encoder.linear1.bias"])
    h = h @ s["value_encoder.linear2.weight"].T + s["value_encoder.linear2.bias"]
    val = F.layer_norm(h, (D,), s["value_encoder.norm.weight"], s["value_encoder.norm.bias"])
    with torch.no_grad():
        cls = enc((gene + val)[None])[0, 0]
    return (cls / cls.norm()).numpy()


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = write_release(tmp_path / "scGPT_toy")
    return tmp_path / "scGPT_toy", state


# --------------------------------------------------------------------------- preprocessing


def test_binning_hand_example() -> None:
    # n_bins=4 -> edges = quantiles at 0, .5, 1 of the values = [1, 5, 100]
    got = bin_values(np.array([5, 1, 3, 100, 7, 2, 9]), 4, np.random.default_rng(0))
    assert got.tolist() == [2, 1, 1, 3, 2, 1, 2]
    # 4 values, n_bins=5 -> edges [10, 20, 30, 40]: each value on its own edge
    got = bin_values(np.array([40, 10, 30, 20]), 5, np.random.default_rng(0))
    assert got.tolist() == [4, 1, 3, 2]


def test_binning_ties_spread_over_their_bins_seeded() -> None:
    # edges of [1]*200 + [5] with n_bins=4 are [1, 1, 5]: the tied 1s span bins 1..2
    x = np.array([1.0] * 200 + [5.0])
    a = bin_values(x, 4, np.random.default_rng(7))
    assert a[-1] == 3 and set(a[:-1]) == {1, 2}
    assert 0.35 < np.mean(a[:-1] == 1) < 0.65  # uniform spread (p = 1/2)
    np.testing.assert_array_equal(a, bin_values(x, 4, np.random.default_rng(7)))
    assert not np.array_equal(a, bin_values(x, 4, np.random.default_rng(8)))


def test_binning_rejects_zeros() -> None:
    with pytest.raises(ExpressionValueError, match="positive"):
        bin_values(np.array([0.0, 1.0]), 51, np.random.default_rng(0))


def test_select_tokens_bins_before_sampling() -> None:
    values = np.array([0, 50, 10, 0, 40, 30, 20, 60], dtype=np.float32)
    present = np.ones(8, dtype=bool)
    present[7] = False  # flagged missing: not a token despite its value
    kw = {"n_bins": 6, "rng": np.random.default_rng(0)}
    full_pos, full_bins = select_tokens(
        values, present, max_length=None, gene_selection="top", **kw
    )
    assert full_pos.tolist() == [1, 2, 4, 5, 6]
    # edges = quantiles 0, .25, .5, .75, 1 of [10..50] = 10, 20, 30, 40, 50
    assert full_bins.tolist() == [5, 1, 4, 3, 2]
    pos, bins = select_tokens(values, present, max_length=3, gene_selection="top", **kw)
    assert pos.tolist() == [1, 4] and bins.tolist() == [5, 4]  # bins of the full profile
    draws = {
        tuple(
            select_tokens(
                values,
                present,
                max_length=4,
                gene_selection="random",
                n_bins=6,
                rng=np.random.default_rng(s),
            )[0]
        )
        for s in range(20)
    }
    assert len(draws) > 1 and all(len(d) == 3 and set(d) <= {1, 2, 4, 5, 6} for d in draws)


def test_read_vocab_appends_missing_specials(tmp_path: Path) -> None:
    (tmp_path / "v.json").write_text(json.dumps({"TP53": 1, "KRAS": 0, "<pad>": 2}))
    assert read_vocab(tmp_path / "v.json") == {
        "TP53": 1,
        "KRAS": 0,
        "<pad>": 2,
        "<cls>": 3,
        "<eoc>": 4,
    }
    (tmp_path / "gap.json").write_text(json.dumps({"TP53": 0, "KRAS": 2}))
    with pytest.raises(CheckpointError, match=r"not 0..1 without gaps"):
        read_vocab(tmp_path / "gap.json")


# --------------------------------------------------------------------------- embedding


def test_embedding_matches_naive_transformer_encoder(release) -> None:
    path, state = release
    a = toy_adata()
    emb = ScGPTEmbedder(path, trust_pickle=True, batch_size=4).transform(a)
    assert emb.shape == (4, D) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    for i in range(a.n_obs):
        ref = naive_embedding(state, *naive_tokens(a.X[i]))
        np.testing.assert_allclose(emb[i], ref, atol=2e-5)


def test_coverage_report(release) -> None:
    path, _ = release
    m = ScGPTEmbedder(path, trust_pickle=True)
    a = toy_adata()
    m.transform(a)
    cov = m.coverage_
    assert cov["n_vocabulary"] == len(GENES) + 1 and cov["n_found"] == len(GENES)
    assert cov["examples_missing"] == ["NOTAGENE1"]
    expressed = (a.X[:, : len(GENES)] > 0).sum(axis=1)  # vocabulary genes come first
    assert cov["n_expressed_tokens"]["min"] == expressed.min() == 3
    assert cov["n_expressed_tokens"]["max"] == expressed.max()
    assert cov["input"].startswith("X: TPM")


def test_top_genes_option_matches_naive(release) -> None:
    path, state = release
    a = toy_adata()
    emb = ScGPTEmbedder(path, trust_pickle=True, max_length=4).transform(a)
    for i in range(a.n_obs):
        ref = naive_embedding(state, *naive_tokens(a.X[i], keep=3))
        np.testing.assert_allclose(emb[i], ref, atol=2e-5)


def test_deterministic_and_batch_size_invariant(release) -> None:
    path, _ = release
    a = toy_adata(n=5, seed=3)
    for kw in ({}, {"max_length": 3, "gene_selection": "random"}):
        one = ScGPTEmbedder(path, trust_pickle=True, batch_size=1, **kw).transform(a)
        five = ScGPTEmbedder(path, trust_pickle=True, batch_size=5, **kw).transform(a)
        np.testing.assert_allclose(one, five, atol=2e-5)
        again = ScGPTEmbedder(path, trust_pickle=True, batch_size=5, **kw).transform(a)
        np.testing.assert_array_equal(five, again)
        # a sample's embedding does not depend on the other samples either
        alone = ScGPTEmbedder(path, trust_pickle=True, **kw).transform(a[[2]].copy())
        np.testing.assert_allclose(alone[0], five[2], atol=2e-5)
    other_seed = ScGPTEmbedder(
        path, trust_pickle=True, max_length=3, gene_selection="random", seed=1
    ).transform(a)
    assert not np.allclose(other_seed, five, atol=1e-3)


def test_counts_layer_preferred_and_rank_invariance(release) -> None:
    path, state = release
    a = toy_adata()
    counts = a.X.copy()
    a.X = a.X[:, ::-1].copy()  # "TPM" with other ranks: must not be used
    a.layers["counts"] = counts
    m = ScGPTEmbedder(path, trust_pickle=True)
    emb = m.transform(a)
    assert m.coverage_["input"].startswith("layers['counts']")
    np.testing.assert_allclose(emb[0], naive_embedding(state, *naive_tokens(counts[0])), atol=2e-5)
    # per-sample scaling and log1p keep ranks, hence bins, hence the embedding
    b = a.copy()
    b.layers["counts"] = np.log1p(counts * np.array([[1e-3], [5.0], [1.0], [0.2]]))
    np.testing.assert_allclose(m.transform(b), emb, atol=1e-6)
    x_only = ScGPTEmbedder(path, trust_pickle=True, layer="X").transform(a)
    assert not np.allclose(x_only, emb, atol=1e-3)


def test_sample_without_expressed_genes_fails(release) -> None:
    path, _ = release
    a = toy_adata()
    a.X[2, : len(GENES)] = 0.0  # only genes outside the vocabulary left
    with pytest.raises(ExpressionValueError, match=r"1 samples express none.*'s2'"):
        ScGPTEmbedder(path, trust_pickle=True, batch_size=4).transform(a)


def test_settings_enter_the_fingerprint(release) -> None:
    path, _ = release
    base = ScGPTEmbedder(path).fingerprint()
    assert ScGPTEmbedder(path).fingerprint() == base
    assert ScGPTEmbedder(path, max_length=1200).fingerprint() != base
    assert ScGPTEmbedder(path, gene_selection="random").fingerprint() != base


def test_side_files_enter_the_fingerprint_when_weights_file_given(tmp_path: Path) -> None:
    folder = tmp_path / "st"
    write_release(folder, fmt="safetensors")
    weights = folder / "model.safetensors"
    base = ScGPTEmbedder(weights).fingerprint()
    args = json.loads((folder / "args.json").read_text())
    (folder / "args.json").write_text(json.dumps({**args, "pad_value": -1}))
    changed_args = ScGPTEmbedder(weights).fingerprint()
    assert changed_args != base
    (folder / "vocab.json").write_text(json.dumps({**VOCAB, "NOTAGENE2": len(VOCAB)}))
    assert ScGPTEmbedder(weights).fingerprint() != changed_args


def test_n_bins_other_than_published_warns(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "bins"
    write_release(folder, fmt="safetensors")
    args = json.loads((folder / "args.json").read_text())
    (folder / "args.json").write_text(json.dumps({**args, "n_bins": 11}))
    with caplog.at_level("WARNING", logger="bulkfm.adapters.scgpt"):
        ScGPTEmbedder(folder).load()
    assert "n_bins=11" in caplog.text and "published collator" in caplog.text


# --------------------------------------------------------------------------- checkpoint files


def test_in_proj_names_and_safetensors_load_the_same(release, tmp_path: Path) -> None:
    path, state = release
    a = toy_adata()
    ref = ScGPTEmbedder(path, trust_pickle=True).transform(a)
    renamed = {
        k.replace("Wqkv.weight", "in_proj_weight").replace("Wqkv.bias", "in_proj_bias"): v
        for k, v in state.items()
    }
    write_release(tmp_path / "in_proj", state=renamed)
    got = ScGPTEmbedder(tmp_path / "in_proj", trust_pickle=True).transform(a)
    np.testing.assert_array_equal(got, ref)
    write_release(tmp_path / "st", state=state, fmt="safetensors")
    np.testing.assert_array_equal(ScGPTEmbedder(tmp_path / "st").transform(a), ref)
    # the weights file itself may be given; config and vocab sit beside it
    np.testing.assert_array_equal(
        ScGPTEmbedder(tmp_path / "st" / "model.safetensors").transform(a), ref
    )


def test_both_attention_namings_fail(tmp_path: Path) -> None:
    state = release_state(len(VOCAB))
    state["transformer_encoder.layers.0.self_attn.in_proj_weight"] = state[
        "transformer_encoder.layers.0.self_attn.Wqkv.weight"
    ]
    write_release(tmp_path / "r", state=state)
    with pytest.raises(CheckpointError, match=r"both .*Wqkv.weight"):
        ScGPTEmbedder(tmp_path / "r", trust_pickle=True).transform(toy_adata())


def test_missing_encoder_key_fails_listing_it(tmp_path: Path) -> None:
    state = release_state(len(VOCAB))
    del state["transformer_encoder.layers.1.norm2.bias"]
    write_release(tmp_path / "r", state=state)
    with pytest.raises(CheckpointError, match=r"1 missing keys \[.*layers\.1\.norm2\.bias"):
        ScGPTEmbedder(tmp_path / "r", trust_pickle=True).transform(toy_adata())


def test_renamed_key_fails_listing_both(tmp_path: Path) -> None:
    state = release_state(len(VOCAB))
    state["value_encoder.lin1.weight"] = state.pop("value_encoder.linear1.weight")
    write_release(tmp_path / "r", state=state)
    with pytest.raises(
        CheckpointError, match=r"missing keys \['value_encoder.linear1.weight'\].*lin1.weight"
    ):
        ScGPTEmbedder(tmp_path / "r", trust_pickle=True).transform(toy_adata())


def test_extra_layer_in_checkpoint_fails(tmp_path: Path) -> None:
    write_release(tmp_path / "r", state=release_state(len(VOCAB), nlayers=3))
    with pytest.raises(CheckpointError, match=r"unexpected keys .*layers\.2\."):
        ScGPTEmbedder(tmp_path / "r", trust_pickle=True).transform(toy_adata())


def test_vocab_not_matching_embedding_fails(tmp_path: Path) -> None:
    write_release(tmp_path / "r", state=release_state(len(VOCAB) + 5))
    with pytest.raises(
        CheckpointError, match=rf"encoder\.embedding\.weight: checkpoint \({len(VOCAB) + 5}, 16\)"
    ):
        ScGPTEmbedder(tmp_path / "r", trust_pickle=True).transform(toy_adata())


def test_pickle_needs_opt_in(release) -> None:
    path, _ = release
    with pytest.raises(CheckpointError, match=r"pickle-based.*trust_pickle=True"):
        ScGPTEmbedder(path).transform(toy_adata())


def test_missing_path_and_files_fail(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        ScGPTEmbedder(tmp_path / "absent")
    with pytest.raises(ConfigError, match="--model-dir scgpt=PATH"):
        ScGPTEmbedder()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "args.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights in"):
        ScGPTEmbedder(tmp_path / "empty").transform(toy_adata())


def test_args_json_missing_field_fails(tmp_path: Path) -> None:
    write_release(tmp_path / "r", args={"embsize": D, "nheads": HEADS, "d_hid": D_HID})
    with pytest.raises(CheckpointError, match=r"lacks \['nlayers', 'pad_token', 'pad_value'\]"):
        ScGPTEmbedder(tmp_path / "r", trust_pickle=True).transform(toy_adata())


def test_category_value_encoder_config_fails(tmp_path: Path) -> None:
    args = {"embsize": D, "nheads": HEADS, "d_hid": D_HID, "nlayers": LAYERS}
    args |= {"pad_token": "<pad>", "pad_value": -2, "input_emb_style": "category"}
    write_release(tmp_path / "r", args=args)
    with pytest.raises(CheckpointError, match="input_emb_style='category'"):
        ScGPTEmbedder(tmp_path / "r", trust_pickle=True).transform(toy_adata())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"gene_selection": "first"}, "gene_selection='first'"),
        ({"max_length": 1}, "max_length must be an integer >= 2"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"l2_normalize": "yes"}, "l2_normalize must be true or false"),
        ({"layer": ""}, "layer=''; use 'auto'"),
    ],
)
def test_bad_options_fail(release, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ScGPTEmbedder(release[0], **kw)


def test_negative_values_fail(release) -> None:
    a = toy_adata()
    a.X[0, 0] = -1.0
    with pytest.raises(ExpressionValueError, match="negative values"):
        ScGPTEmbedder(release[0], trust_pickle=True).transform(a)


def test_low_coverage_fails(tmp_path: Path) -> None:
    vocab = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, "TP53": 3}
    vocab |= {f"NOTAGENE{i}": 4 + i for i in range(40)}
    write_release(tmp_path / "r", vocab=vocab)
    with pytest.raises(GeneMappingError, match="only 1 of the model's 41 genes"):
        ScGPTEmbedder(tmp_path / "r", trust_pickle=True).transform(toy_adata())


def test_parameter_count_matches_network(release) -> None:
    path, _ = release
    m = ScGPTEmbedder(path, trust_pickle=True)
    args = ScGPTArgs.from_json(path / "args.json")
    assert parameter_count(args, len(VOCAB)) == sum(p.numel() for p in m.network.parameters())


# --------------------------------------------------------------------------- real vocabulary


def _package_vocab() -> Path:
    spec = importlib.util.find_spec("scgpt")  # locates the files; never imports scgpt
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the scgpt package (its vocabulary files) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer" / "default_gene_vocab.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.mark.realdata
@pytest.mark.slow
def test_real_vocabulary_on_tcga(shared_data: Path, tmp_path: Path) -> None:
    vocab = read_vocab(_package_vocab())
    assert len(vocab) == 48_292 + 3  # + <pad>, <cls>, <eoc>
    tcga = pd.read_csv(
        shared_data / "tcga" / "tcga_tumor_counts_7cohorts.tsv.gz", sep="\t", nrows=1
    )
    counts = tcga.iloc[:, 2:].to_numpy(dtype=np.float32)
    a = ad.AnnData(counts, var=pd.DataFrame(index=tcga.columns[2:]))
    a.obs_names = tcga["sample_barcode"].tolist()
    a.layers["counts"] = counts
    write_release(tmp_path / "real", vocab=vocab, fmt="safetensors")
    # all ~20k expressed genes work too, but take minutes on a loaded CPU: keep the top 1,023
    m = ScGPTEmbedder(tmp_path / "real", max_length=1024)
    emb = m.transform(a)
    assert emb.shape == (1, D)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    # independent lower bound: vocabulary symbols that are approved symbols of a TCGA gene
    table = pd.read_csv(shared_data / "genes" / "ensembl100_grch38_genes.tsv.gz", sep="\t")
    approved = table.dropna(subset=["Approved symbol"])
    approved = approved[approved["gene_id"].isin(set(tcga.columns[2:]))]
    direct = approved[approved["Approved symbol"].isin(set(vocab))]["gene_id"].nunique()
    cov = m.coverage_
    assert direct * 0.99 <= cov["n_found"] <= cov["n_vocabulary"] == 48_292
    assert cov["n_expressed_tokens"]["min"] > 5_000  # a bulk profile: thousands of tokens
    assert cov["n_samples_subsampled"] == 1
    print(f"scGPT default_gene_vocab on TCGA: {cov['n_found']}/{cov['n_vocabulary']}")
