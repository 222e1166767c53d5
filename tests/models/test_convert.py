from __future__ import annotations

import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.special import erf

from bulkfm.errors import CheckpointError
from bulkfm.models import BulkRNABert, load_pretrained
from bulkfm.models.convert import (
    convert_haiku_to_safetensors,
    haiku_key_map,
    infer_config,
    load_haiku_params,
    model_from_haiku,
)

N_GENES, BINS, DIM, GENE_DIM, HEADS, FFN, LAYERS = 32, 64, 32, 16, 4, 64, 2
ROOT = "bulk_bert"
OFFICIAL_CONFIG = {
    "n_genes": N_GENES,
    "n_expressions_bins": BINS,
    "embed_dim": DIM,
    "init_gene_embed_dim": GENE_DIM,
    "use_gene_embedding": True,
    "project_gene_embedding": True,
    "num_attention_heads": HEADS,
    "key_size": DIM // HEADS,
    "ffn_embed_dim": FFN,
    "num_layers": LAYERS,
}


def haiku_tree(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Random parameters laid out as the JAX release's params.joblib (doc's module paths)."""
    rng = np.random.default_rng(seed)

    def linear(n_in, n_out):
        return {"w": rng.normal(0, 0.2, (n_in, n_out)), "b": rng.normal(0, 0.1, n_out)}

    def layer_norm():
        return {"scale": 1 + rng.normal(0, 0.1, DIM), "offset": rng.normal(0, 0.1, DIM)}

    tree = {
        f"{ROOT}/~/expression_embedding": {"embeddings": rng.normal(0, 0.5, (BINS, DIM))},
        f"{ROOT}/~/gene_embedding": {"embeddings": rng.normal(0, 0.5, (N_GENES, GENE_DIM))},
        f"{ROOT}/~/linear": linear(GENE_DIM, DIM),
        f"{ROOT}/~/simple_lm_head/~/lm_final_fc": linear(DIM, BINS),
    }
    for i in range(LAYERS):
        block = f"{ROOT}/self_attention_block_{i}/~/"
        for name in ("query", "key", "value"):
            tree[f"{block}self_attention/{name}"] = linear(DIM, DIM)
        tree[f"{block}self_attention/mha_output"] = linear(DIM, DIM)
        tree[f"{block}fc1"] = linear(DIM, FFN)
        tree[f"{block}fc2"] = linear(FFN, DIM)
        tree[f"{block}self_attention_layer_norm"] = layer_norm()
        tree[f"{block}final_layer_norm"] = layer_norm()
    return {m: {k: v.astype(np.float32) for k, v in p.items()} for m, p in tree.items()}


def haiku_forward(params: dict, tokens: np.ndarray) -> np.ndarray:
    """The doc's forward pass, read straight off the Haiku tree (w is [in, out])."""
    p = {m: {k: v.astype(np.float64) for k, v in d.items()} for m, d in params.items()}

    def linear(x, module):
        return x @ p[module]["w"] + p[module]["b"]

    def layer_norm(x, module):
        mu = x.mean(-1, keepdims=True)
        var = x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * p[module]["scale"] + p[module]["offset"]

    key = DIM // HEADS
    genes = linear(p[f"{ROOT}/~/gene_embedding"]["embeddings"], f"{ROOT}/~/linear")
    x = p[f"{ROOT}/~/expression_embedding"]["embeddings"][tokens] + genes
    b, g, _ = x.shape
    for i in range(LAYERS):
        block = f"{ROOT}/self_attention_block_{i}/~/"
        h = layer_norm(x, block + "self_attention_layer_norm")
        q, k, v = (
            linear(h, f"{block}self_attention/{n}").reshape(b, g, HEADS, key)
            for n in ("query", "key", "value")
        )
        logits = np.einsum("bthd,bThd->bhtT", q, k) / np.sqrt(key)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        context = np.einsum("bhtT,bThd->bthd", weights, v).reshape(b, g, HEADS * key)
        x = x + linear(context, block + "self_attention/mha_output")
        h = linear(layer_norm(x, block + "final_layer_norm"), block + "fc1")
        x = x + linear(0.5 * h * (1 + erf(h / np.sqrt(2))), block + "fc2")
    return linear(x, f"{ROOT}/~/simple_lm_head/~/lm_final_fc")


def write_params(tree: dict, path) -> None:
    try:
        import joblib
    except ImportError:
        with open(path, "wb") as handle:
            pickle.dump(tree, handle)
    else:
        joblib.dump(tree, path)


def tokens_for_test(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, BINS, (3, N_GENES), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def params_file(tmp_path):
    tree = haiku_tree()
    path = tmp_path / "params.joblib"
    write_params(tree, path)
    return tree, path


def test_convert_reproduces_haiku_forward(tmp_path, params_file) -> None:
    tree, path = params_file
    out = convert_haiku_to_safetensors(
        path,
        tmp_path / "converted",
        trust_pickle=True,
        num_attention_heads=HEADS,
        genes=[f"G{i}" for i in range(N_GENES)],
        normalization_factor=5.5,
    )
    model, tok = load_pretrained(out)
    assert tok.normalization_factor == 5.5 and tok.n_genes == N_GENES
    for field, value in OFFICIAL_CONFIG.items():
        assert getattr(model.config, field) == value
    tokens = tokens_for_test()
    np.testing.assert_allclose(
        model(tokens).logits.detach().numpy(), haiku_forward(tree, tokens.numpy()), atol=5e-5
    )
    embedding = model.expression_embedding_layer.weight.detach().numpy()
    expected_bins = tree[f"{ROOT}/~/expression_embedding"]["embeddings"]
    np.testing.assert_allclose(embedding[:BINS], expected_bins)
    np.testing.assert_allclose(embedding[BINS], expected_bins.mean(0), atol=1e-6)


def test_pickle_fallback_without_joblib(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = haiku_tree(seed=1)
    path = tmp_path / "params.pkl"
    with open(path, "wb") as handle:
        pickle.dump(tree, handle)
    monkeypatch.setitem(sys.modules, "joblib", None)  # import joblib -> ImportError
    loaded = load_haiku_params(path, trust_pickle=True)
    model = model_from_haiku(loaded, num_attention_heads=HEADS)
    tokens = tokens_for_test(seed=1)
    np.testing.assert_allclose(
        model(tokens).logits.detach().numpy(), haiku_forward(tree, tokens.numpy()), atol=5e-5
    )


def test_official_format_safetensors_dir_loads_without_renaming(tmp_path) -> None:
    """An official-format directory: official key names written out from the doc, a
    64-row expression embedding, config.json with official (and HF) fields only."""
    tree = haiku_tree(seed=2)

    def t(module: str, param: str, transpose: bool = False) -> torch.Tensor:
        array = tree[f"{ROOT}/{module}"][param]
        return torch.from_numpy(np.ascontiguousarray(array.T if transpose else array))

    sd = {
        "expression_embedding_layer.weight": t("~/expression_embedding", "embeddings"),
        "gene_embedding_layer.weight": t("~/gene_embedding", "embeddings"),
        "fc_gene_embedding.weight": t("~/linear", "w", True),
        "fc_gene_embedding.bias": t("~/linear", "b"),
        "lm_head.weight": t("~/simple_lm_head/~/lm_final_fc", "w", True),
        "lm_head.bias": t("~/simple_lm_head/~/lm_final_fc", "b"),
    }
    for i in range(LAYERS):
        block = f"self_attention_block_{i}/~/"
        ours = f"transformer_layers.{i}."
        for hk_name, name in (("query", "w_q"), ("key", "w_k"), ("value", "w_v")):
            sd[f"{ours}mha.{name}.weight"] = t(f"{block}self_attention/{hk_name}", "w", True)
            sd[f"{ours}mha.{name}.bias"] = t(f"{block}self_attention/{hk_name}", "b")
        sd[f"{ours}mha.output.weight"] = t(f"{block}self_attention/mha_output", "w", True)
        sd[f"{ours}mha.output.bias"] = t(f"{block}self_attention/mha_output", "b")
        for fc in ("fc1", "fc2"):
            sd[f"{ours}{fc}.weight"] = t(block + fc, "w", True)
            sd[f"{ours}{fc}.bias"] = t(block + fc, "b")
        for hk_name, name in (
            ("self_attention_layer_norm", "layer_norm_self_attention"),
            ("final_layer_norm", "layer_norm_mlp"),
        ):
            sd[f"{ours}{name}.weight"] = t(block + hk_name, "scale")
            sd[f"{ours}{name}.bias"] = t(block + hk_name, "offset")
    official = tmp_path / "official"
    official.mkdir()
    save_file(sd, official / "model.safetensors")
    config = {**OFFICIAL_CONFIG, "architectures": ["BulkRNABert"], "model_type": "BulkRNABert"}
    (official / "config.json").write_text(json.dumps(config))
    (tmp_path / "genes.txt").write_text("\n".join(f"G{i}" for i in range(N_GENES)))

    model, tok = load_pretrained(
        official, genes=tmp_path / "genes.txt", normalization_factor=5.547176906585117
    )
    assert tok.genes[0] == "G0" and tok.mask_token_id == BINS
    tokens = tokens_for_test(seed=2)
    np.testing.assert_allclose(
        model(tokens).logits.detach().numpy(), haiku_forward(tree, tokens.numpy()), atol=5e-5
    )
    # the converter's key map agrees with the doc's names written out above
    converted = model_from_haiku(tree, num_attention_heads=HEADS)
    torch.testing.assert_close(converted.state_dict(), model.state_dict())


def test_key_map_covers_every_parameter_once() -> None:
    mapping = haiku_key_map(LAYERS)
    tree = haiku_tree()
    assert set(mapping) == {(m, k) for m, d in tree.items() for k in d}
    assert len(set(mapping.values())) == len(mapping)
    model = BulkRNABert(infer_config(tree, num_attention_heads=HEADS))
    assert set(mapping.values()) == set(model.state_dict())


def test_infer_config_from_shapes() -> None:
    config = infer_config(haiku_tree(), num_attention_heads=2)
    assert (config.n_genes, config.embed_dim, config.init_gene_embed_dim) == (32, 32, 16)
    assert (config.num_layers, config.ffn_embed_dim, config.key_size) == (2, 64, 16)


# --------------------------------------------------------------------------- bad input
def test_pickle_needs_explicit_opt_in_and_is_not_read(tmp_path) -> None:
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "params.joblib"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match=r"execute arbitrary code.*trust_pickle=True"):
        load_haiku_params(path)
    with pytest.raises(CheckpointError, match=r"trust_pickle=True"):
        convert_haiku_to_safetensors(path, tmp_path / "out")
    assert not marker.exists()


def test_missing_params_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_haiku_params(tmp_path / "nope.joblib", trust_pickle=True)


def test_not_a_parameter_tree(tmp_path) -> None:
    path = tmp_path / "params.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError, match=r"not a Haiku parameter tree"):
        load_haiku_params(path, trust_pickle=True)


def test_damaged_pickle(tmp_path) -> None:
    path = tmp_path / "params.pkl"
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match=r"cannot unpickle"):
        load_haiku_params(path, trust_pickle=True)


def test_absent_and_unknown_haiku_params_are_listed() -> None:
    tree = haiku_tree()
    del tree[f"{ROOT}/self_attention_block_1/~/fc2"]["b"]
    tree[f"{ROOT}/~/extra_module"] = {"w": np.zeros(3, np.float32)}
    with pytest.raises(
        CheckpointError,
        match=r"absent \['bulk_bert/self_attention_block_1/~/fc2:b'\].*"
        r"unknown \['bulk_bert/~/extra_module:w'\]",
    ):
        model_from_haiku(tree, num_attention_heads=HEADS)


def test_heads_not_dividing_projection(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"not divisible by num_attention_heads=5"):
        infer_config(haiku_tree(), num_attention_heads=5)


def test_genes_without_factor_is_error(tmp_path, params_file) -> None:
    _, path = params_file
    with pytest.raises(CheckpointError, match=r"both genes and normalization_factor"):
        convert_haiku_to_safetensors(
            path, tmp_path / "o", trust_pickle=True, num_attention_heads=HEADS, genes=["a"]
        )


def test_not_a_bulkrnabert_tree() -> None:
    with pytest.raises(CheckpointError, match=r"lack .*BulkRNABert params"):
        infer_config({"bulk_bert/~/linear": {"w": np.zeros((2, 2))}})
