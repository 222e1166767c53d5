from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.special import erf

from bulkfm.errors import BulkfmWarning, CheckpointError, ConfigError, GeneMappingError
from bulkfm.models import BulkRNABert, BulkRNABertConfig, load_pretrained
from bulkfm.tokenize import BinTokenizer, TokenizerConfig
from tests.conftest import tiny_config

# On top of the shared tiny sizes (32 genes): 4 heads and 2 layers, which the shape
# assertions and the layer-selection tests below rely on.
TINY = dict(
    embed_dim=32, init_gene_embed_dim=16, num_attention_heads=4, ffn_embed_dim=64, num_layers=2
)


def official_key_names(num_layers: int) -> set[str]:
    """State-dict keys of the official PyTorch port, as listed in docs/bulkrnabert.md."""
    names = {
        "expression_embedding_layer.weight",
        "gene_embedding_layer.weight",
        "fc_gene_embedding.weight",
        "fc_gene_embedding.bias",
        "lm_head.weight",
        "lm_head.bias",
    }
    for i in range(num_layers):
        for sub in ("mha.w_q", "mha.w_k", "mha.w_v", "mha.output", "fc1", "fc2"):
            names |= {f"transformer_layers.{i}.{sub}.weight", f"transformer_layers.{i}.{sub}.bias"}
        for sub in ("layer_norm_self_attention", "layer_norm_mlp"):
            names |= {f"transformer_layers.{i}.{sub}.weight", f"transformer_layers.{i}.{sub}.bias"}
    return names


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (biases, LayerNorm scales) so every term is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "embedding_layer" in name else 0.15
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
            if "layer_norm" in name and name.endswith("weight"):
                p.add_(1.0)


def numpy_forward(
    sd: dict[str, np.ndarray],
    tokens: np.ndarray,
    cfg: BulkRNABertConfig,
    gene_index: np.ndarray | None = None,
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Reference forward from the paper/doc description, on a state dict of arrays."""

    def linear(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def layer_norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    heads = cfg.num_attention_heads
    key = cfg.embed_dim // heads
    genes = np.arange(cfg.n_genes) if gene_index is None else gene_index
    gene_vec = linear(sd["gene_embedding_layer.weight"][genes], "fc_gene_embedding")
    x = sd["expression_embedding_layer.weight"][tokens] + gene_vec
    hidden, attentions = [x], []
    for i in range(cfg.num_layers):
        p = f"transformer_layers.{i}"
        h = layer_norm(x, f"{p}.layer_norm_self_attention")
        b, g, _ = h.shape
        q, k, v = (
            linear(h, f"{p}.mha.{w}").reshape(b, g, heads, key).transpose(0, 2, 1, 3)
            for w in ("w_q", "w_k", "w_v")
        )
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(key)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attentions.append(weights)
        context = (weights @ v).transpose(0, 2, 1, 3).reshape(b, g, heads * key)
        x = x + linear(context, f"{p}.mha.output")
        h = linear(layer_norm(x, f"{p}.layer_norm_mlp"), f"{p}.fc1")
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = x + linear(h, f"{p}.fc2")
        hidden.append(x)
    return linear(x, "lm_head"), hidden, attentions


def as_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


@pytest.fixture
def model() -> BulkRNABert:
    m = BulkRNABert(tiny_config(**TINY))
    randomize(m)
    return m.eval()


def random_tokens(n: int = 3, g: int = 32, high: int = 65, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, high, (n, g), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- architecture
def test_official_size_has_official_names_and_parameter_count() -> None:
    model = BulkRNABert(BulkRNABertConfig())
    assert set(model.state_dict()) == official_key_names(4)
    # 6,005,104 official parameters + one [MASK] row of 256
    assert model.num_parameters() == 6_005_104 + 256
    assert model.config.key_size == 32
    assert model.expression_embedding_layer.weight.shape == (65, 256)
    assert model.lm_head.weight.shape == (64, 256)


def test_forward_matches_numpy_reference(model: BulkRNABert) -> None:
    tokens = random_tokens()
    out = model(tokens, output_hidden_states=True, output_attentions=True)
    logits, hidden, attentions = numpy_forward(as_numpy(model), tokens.numpy(), model.config)
    np.testing.assert_allclose(out.logits.detach().numpy(), logits, atol=2e-5, rtol=1e-4)
    assert out.logits.shape == (3, 32, 64)
    assert sorted(out.hidden_states) == [0, 1, 2]
    for i, ref in enumerate(hidden):
        np.testing.assert_allclose(out.hidden_states[i].detach().numpy(), ref, atol=2e-5)
    np.testing.assert_allclose(out.last_hidden_state.detach().numpy(), hidden[-1], atol=2e-5)
    assert len(out.attentions) == 2
    for got, ref in zip(out.attentions, attentions, strict=True):
        assert got.shape == (3, 4, 32, 32)
        np.testing.assert_allclose(got.detach().numpy(), ref, atol=1e-6)


def test_sdpa_path_equals_explicit_attention(model: BulkRNABert) -> None:
    tokens = random_tokens(seed=1)
    fast = model(tokens)
    explicit = model(tokens, output_attentions=True)
    assert fast.attentions is None and fast.hidden_states is None
    torch.testing.assert_close(fast.logits, explicit.logits, atol=1e-5, rtol=1e-5)


def test_gene_index_runs_a_gene_subset(model: BulkRNABert) -> None:
    subset = np.array([3, 30, 7, 0, 11])
    tokens = random_tokens(2, 5, seed=2)
    out = model(tokens, gene_index=torch.from_numpy(subset))
    ref, _, _ = numpy_forward(as_numpy(model), tokens.numpy(), model.config, gene_index=subset)
    np.testing.assert_allclose(out.logits.detach().numpy(), ref, atol=2e-5)
    full = random_tokens(seed=3)
    torch.testing.assert_close(model(full, gene_index=torch.arange(32)).logits, model(full).logits)


def test_selected_hidden_states_and_negative_layers(model: BulkRNABert) -> None:
    out = model(random_tokens(), output_hidden_states=[-1, 0])
    assert sorted(out.hidden_states) == [0, 2]
    torch.testing.assert_close(out.hidden_states[2], out.last_hidden_state)


def test_embed_is_mean_over_unmasked_genes(model: BulkRNABert) -> None:
    tokens = random_tokens(seed=4)
    tokens[0, :10] = 64
    out = model(tokens, output_hidden_states=True)
    keep = tokens != 64
    for layer, index in ((-1, 2), (1, 1), (0, 0)):
        got = model.embed(tokens, layer=layer)
        h = out.hidden_states[index]
        manual = torch.stack([h[b][keep[b]].mean(0) for b in range(3)])
        torch.testing.assert_close(got, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        model.embed(tokens, exclude_mask=False), out.last_hidden_state.mean(1)
    )
    assert model.embed(tokens).shape == (3, 32)


def test_hidden_state_matches_forward_and_keeps_gradients(model: BulkRNABert) -> None:
    tokens = random_tokens(seed=5)
    out = model(tokens, output_hidden_states=True)
    for layer, index in ((-1, 2), (1, 1), (0, 0)):
        torch.testing.assert_close(
            model.hidden_state(tokens, layer=layer), out.hidden_states[index]
        )
    h = model.hidden_state(tokens, layer=1)
    h.sum().backward()
    assert model.transformer_layers[0].fc1.weight.grad is not None
    assert model.lm_head.weight.grad is None  # the LM head is not run
    assert model.transformer_layers[1].fc1.weight.grad is None  # nor the blocks above


def test_gradient_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    plain = BulkRNABert(tiny_config(**TINY))
    randomize(plain)
    ckpt = BulkRNABert(tiny_config(**TINY, gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    tokens = random_tokens(seed=5)
    grads = []
    for m in (plain, ckpt):
        m.train()
        m.zero_grad()
        m(tokens).logits.square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], atol=1e-6, rtol=1e-5)


def test_ia3_hook_points_scale_keys_values_and_ffn(model: BulkRNABert) -> None:
    """Scaling the outputs of mha.w_v and activation is what IA3 will do: check the hooks
    act like rescaling the corresponding weights."""
    tokens = random_tokens(seed=6)
    block = model.transformer_layers[1]
    handles = [
        block.mha.w_v.register_forward_hook(lambda m, i, o: o * 2.0),
        block.activation.register_forward_hook(lambda m, i, o: o * 0.5),
    ]
    hooked = model(tokens).logits
    for h in handles:
        h.remove()
    with torch.no_grad():
        block.mha.w_v.weight.mul_(2.0)
        block.mha.w_v.bias.mul_(2.0)
        block.fc2.weight.mul_(0.5)
    torch.testing.assert_close(hooked, model(tokens).logits, atol=1e-5, rtol=1e-5)
    key_handle = block.mha.w_k.register_forward_hook(lambda m, i, o: o * 3.0)
    assert not torch.allclose(model(tokens).logits, hooked, atol=1e-3)
    key_handle.remove()


def test_no_gene_embedding_config_ignores_gene_layers() -> None:
    cfg = tiny_config(**TINY, use_gene_embedding=False)
    m = BulkRNABert(cfg).eval()
    tokens = random_tokens(2, 7, seed=7)  # any length works without gene identity
    before = m(tokens).logits
    with torch.no_grad():
        m.gene_embedding_layer.weight.add_(1.0)
    torch.testing.assert_close(m(tokens).logits, before)


def test_config_resolves_key_size_and_forces_projection(caplog) -> None:
    cfg = BulkRNABertConfig(embed_dim=64, num_attention_heads=8, project_gene_embedding=False)
    assert cfg.key_size == 8
    assert cfg.project_gene_embedding is True  # 200-d gene vectors need the projection
    assert cfg.vocab_size == 65 and cfg.mask_token_id == 64


# --------------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip(tmp_path, model: BulkRNABert) -> None:
    genes = [f"ENSG{i:011d}" for i in range(32)]
    tok = BinTokenizer(TokenizerConfig(genes, normalization_factor=3.5))
    model.save_pretrained(tmp_path, tokenizer=tok)
    config = json.loads((tmp_path / "config.json").read_text())
    assert list(config)[:10] == [
        "n_genes",
        "n_expressions_bins",
        "embed_dim",
        "init_gene_embed_dim",
        "use_gene_embedding",
        "project_gene_embedding",
        "num_attention_heads",
        "key_size",
        "ffn_embed_dim",
        "num_layers",
    ]
    assert config["n_special_tokens"] == 1
    assert set(load_file(tmp_path / "model.safetensors")) == official_key_names(2)
    loaded, loaded_tok = load_pretrained(tmp_path)
    assert not loaded.training
    assert loaded_tok.config == tok.config
    tokens = random_tokens(seed=8)
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits)


def test_official_64_row_weights_load_and_pad_mask_row(model: BulkRNABert) -> None:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    bins = sd["expression_embedding_layer.weight"][:64].clone()
    sd["expression_embedding_layer.weight"] = bins
    fresh = BulkRNABert(tiny_config(**TINY)).eval()
    fresh.load_state_dict(sd)  # plain torch API: the load hook pads
    weight = fresh.expression_embedding_layer.weight
    torch.testing.assert_close(weight[:64], bins)
    torch.testing.assert_close(weight[64], bins.mean(0))
    tokens = random_tokens(high=64, seed=9)
    ref = {k: v.double().numpy() for k, v in sd.items()}
    logits, _, _ = numpy_forward(ref, tokens.numpy(), fresh.config)
    np.testing.assert_allclose(fresh(tokens).logits.detach().numpy(), logits, atol=2e-5)


def test_from_pretrained_overrides_non_shape_fields(tmp_path, model: BulkRNABert) -> None:
    model.save_pretrained(tmp_path)
    loaded = BulkRNABert.from_pretrained(tmp_path, gradient_checkpointing=True)
    assert loaded.config.gradient_checkpointing is True


def test_unknown_override_is_config_error(tmp_path, model: BulkRNABert) -> None:
    model.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown config overrides \['dropout'\]"):
        BulkRNABert.from_pretrained(tmp_path, dropout=0.1)


def test_non_strict_load_skips_missing_keys(tmp_path, model: BulkRNABert, caplog) -> None:
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["lm_head.bias"]
    save_file(sd, tmp_path / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        loaded = BulkRNABert.from_pretrained(tmp_path, strict=False)
    assert "lm_head.bias" in caplog.text
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


# --------------------------------------------------------------------------- bad input
def test_shape_mismatch_names_tensor_and_shapes(tmp_path, model: BulkRNABert) -> None:
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["ffn_embed_dim"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"'transformer_layers\.0\.fc1\.weight' has shape \(64, 32\) but the config "
        r"expects \(48, 32\)",
    ):
        BulkRNABert.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_listed(tmp_path, model: BulkRNABert) -> None:
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["encoder.extra"] = sd.pop("lm_head.bias")
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"missing keys \['lm_head\.bias'\].*unexpected keys \['encoder\.extra'\]",
    ):
        BulkRNABert.from_pretrained(tmp_path)


def test_official_dir_without_tokenizer_needs_genes_and_factor(
    tmp_path, model: BulkRNABert
) -> None:
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json .*normalization_factor="):
        load_pretrained(tmp_path)


def test_official_dir_with_gene_file_and_factor(tmp_path, model: BulkRNABert) -> None:
    model.save_pretrained(tmp_path)
    genes = [f"G{i}" for i in range(32)]
    (tmp_path / "genes.txt").write_text("\n".join(genes) + "\n")
    _, tok = load_pretrained(tmp_path, genes=tmp_path / "genes.txt", normalization_factor=5.5)
    assert tok.genes == genes and tok.normalization_factor == 5.5


def test_gene_list_of_wrong_length_is_reported(tmp_path, model: BulkRNABert) -> None:
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"gene list has 30 genes .* n_genes=32"):
        load_pretrained(tmp_path, genes=[f"G{i}" for i in range(30)], normalization_factor=5.5)


def test_genes_disagreeing_with_saved_tokenizer_report_overlap(
    tmp_path, model: BulkRNABert
) -> None:
    genes = [f"G{i}" for i in range(32)]
    model.save_pretrained(tmp_path, BinTokenizer(TokenizerConfig(genes, 2.0)))
    other = [*genes[:29], "X1", "X2", "X3"]
    with pytest.raises(CheckpointError, match=r"29 of 32 expected genes found; missing e\.g\."):
        load_pretrained(tmp_path, genes=other)


def test_factor_disagreeing_with_saved_tokenizer(tmp_path, model: BulkRNABert) -> None:
    genes = [f"G{i}" for i in range(32)]
    model.save_pretrained(tmp_path, BinTokenizer(TokenizerConfig(genes, 2.0)))
    with pytest.raises(CheckpointError, match=r"normalization_factor=3.0 differs"):
        load_pretrained(tmp_path, normalization_factor=3.0)


def test_saving_with_mismatched_tokenizer_is_error(tmp_path, model: BulkRNABert) -> None:
    tok = BinTokenizer(TokenizerConfig([f"G{i}" for i in range(31)], 2.0))
    with pytest.raises(CheckpointError, match=r"tokenizer has 31 genes but the model has"):
        model.save_pretrained(tmp_path, tokenizer=tok)


def test_tokenizer_with_other_bin_count_is_error(tmp_path, model: BulkRNABert) -> None:
    tok = BinTokenizer(TokenizerConfig([f"G{i}" for i in range(32)], 2.0, n_bins=32))
    with pytest.raises(CheckpointError, match=r"tokenizer has 32 bins but the model has 64"):
        model.save_pretrained(tmp_path, tokenizer=tok)


def test_token_out_of_range_is_checkpoint_error(model: BulkRNABert) -> None:
    tokens = random_tokens()
    tokens[1, 4] = 65
    with pytest.raises(
        CheckpointError, match=r"token ids must lie in 0\.\.64, got 0\.\.65"
    ) as info:
        model(tokens)
    message = str(info.value)
    assert "0..63 are the 64 expression bins and 64 is [MASK]" in message
    assert "BinTokenizer" in message and "unclamped" not in message


def official_unclamped_tokens(tpm: np.ndarray, factor: float) -> np.ndarray:
    """The official recipe without bulkfm's clamp: values >= factor give 64."""
    v = np.log10(1 + tpm) / factor
    return np.where(tpm == 0, 0, np.digitize(v, np.linspace(0, 1, 64)))


def test_official_unclamped_ids_warn_and_change_the_output(model: BulkRNABert) -> None:
    rng = np.random.default_rng(0)
    tpm = 10 ** rng.uniform(0, 3, (4, 32))
    tpm[:, 5] = [2e4, 9e3, 8e3, 9.5e3]  # one gene at the top, saturating in sample 0
    official = official_unclamped_tokens(tpm, factor=4.0)
    assert official[0, 5] == 64 and (official == 64).sum() == 1
    ours = BinTokenizer(TokenizerConfig([f"G{i}" for i in range(32)], 4.0)).encode(tpm)
    assert ours[0, 5] == 63
    with pytest.warns(BulkfmWarning, match=r"official tokenizer's unclamped top bin 64") as rec:
        unclamped = model(torch.from_numpy(official)).logits
    assert "BinTokenizer" in str(rec[0].message) and "clamp(max=63)" in str(rec[0].message)
    # What the warning is about: read as [MASK], not as bin 63.
    clamped = model(torch.from_numpy(ours)).logits
    assert not torch.allclose(unclamped[0, 5], clamped[0, 5], atol=1e-3)


def test_masks_for_missing_genes_do_not_warn(model: BulkRNABert) -> None:
    import warnings

    tokens = random_tokens(4, 32, high=64)
    tokens[:, 3] = 64  # a gene absent from the data: a whole column of [MASK]
    tokens[1, 7] = 64  # one missing value of a gene at an ordinary level
    tokens[:, 7] = torch.tensor([20, 64, 25, 30])
    masked = random_tokens(4, 32, high=64, seed=1)
    masked[torch.rand(4, 32, generator=torch.Generator().manual_seed(2)) < 0.15] = 64
    with warnings.catch_warnings():
        warnings.simplefilter("error", BulkfmWarning)
        model(tokens)
        model(masked)  # MLM masking
        model.train()
        official = tokens.clone()
        official[0, 3] = 63
        official[1:, 3] = 64
        model(official)  # training batches are never checked


def test_negative_token_is_checkpoint_error(model: BulkRNABert) -> None:
    tokens = random_tokens()
    tokens[0, 0] = -1
    with pytest.raises(CheckpointError, match=r"got -1\.\."):
        model(tokens)


def test_float_tokens_are_config_error(model: BulkRNABert) -> None:
    with pytest.raises(ConfigError, match=r"integer tensor"):
        model(torch.zeros(2, 32))


def test_wrong_gene_count_without_gene_index(model: BulkRNABert) -> None:
    with pytest.raises(GeneMappingError, match=r"20 gene positions but the model has 32"):
        model(random_tokens(2, 20))


def test_gene_index_out_of_range(model: BulkRNABert) -> None:
    with pytest.raises(GeneMappingError, match=r"gene_index values must lie in 0\.\.31"):
        model(random_tokens(1, 2), gene_index=torch.tensor([0, 32]))


def test_gene_index_wrong_length(model: BulkRNABert) -> None:
    with pytest.raises(GeneMappingError, match=r"one entry per token position"):
        model(random_tokens(1, 3), gene_index=torch.tensor([0, 1]))


def test_embed_layer_out_of_range(model: BulkRNABert) -> None:
    with pytest.raises(ConfigError, match=r"layer 3 does not exist"):
        model.embed(random_tokens(), layer=3)


def test_indivisible_heads_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"not divisible by num_attention_heads=3"):
        BulkRNABertConfig(embed_dim=32, num_attention_heads=3)


def test_non_positive_size_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"n_genes must be a positive integer"):
        BulkRNABertConfig(n_genes=0)


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"config.json does not exist"):
        BulkRNABert.from_pretrained(tmp_path)


def test_missing_weights_file(tmp_path, model: BulkRNABert) -> None:
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no model.safetensors"):
        BulkRNABert.from_pretrained(tmp_path)


def test_invalid_config_values_are_checkpoint_error(tmp_path, model: BulkRNABert) -> None:
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**model.config.to_dict(), "num_layers": -2}))
    with pytest.raises(CheckpointError, match=r"not a valid BulkRNABert config: num_layers"):
        BulkRNABert.from_pretrained(tmp_path)


def test_damaged_weights_file(tmp_path, model: BulkRNABert) -> None:
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"cannot read .*damaged"):
        BulkRNABert.from_pretrained(tmp_path)


def test_nan_weights_are_named(tmp_path, model: BulkRNABert) -> None:
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["lm_head.bias"][3] = float("nan")
    weights["transformer_layers.1.fc1.weight"][0, 0] = float("inf")
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"NaN or inf values in 2 tensor\(s\)") as info:
        BulkRNABert.from_pretrained(tmp_path)
    message = str(info.value)
    assert "'lm_head.bias'" in message and "'transformer_layers.1.fc1.weight'" in message
    assert "softmax" not in message


def test_a_config_of_other_sizes_is_refused_before_allocating(tmp_path, model, monkeypatch) -> None:
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "embed_dim": 10**7, "key_size": None, "num_attention_heads": 4})
    )

    def no_build(self):
        if not self.lm_head.weight.is_meta:  # shapes may be worked out on the meta device
            raise AssertionError("the model was built before its shapes were checked")

    monkeypatch.setattr(BulkRNABert, "reset_parameters", no_build)
    with pytest.raises(
        CheckpointError,
        match=r"'expression_embedding_layer\.weight' has shape \(65, 32\) but the config "
        r"expects \(65, 10000000\)",
    ):
        BulkRNABert.from_pretrained(tmp_path)


def test_weight_shapes_are_read_from_the_header_only(tmp_path, model: BulkRNABert) -> None:
    from bulkfm.models.bulkrnabert import expected_shapes, read_weight_shapes

    model.save_pretrained(tmp_path)
    shapes = read_weight_shapes(tmp_path / "model.safetensors")
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected_shapes(model.config) == shapes


@pytest.mark.parametrize("device", ["cuda:7", "cuda", "mps", "gpu0"])
def test_an_unavailable_device_is_named_before_the_file_is_read(
    tmp_path, model: BulkRNABert, device: str
) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(ConfigError, match=rf"--device {device}") as info:
        load_pretrained(tmp_path, device=device)
    message = str(info.value)
    assert "this machine has cpu" in message and "damaged" not in message


def test_embed_concatenates_layers_and_max_pools_over_unmasked_genes(model: BulkRNABert) -> None:
    tokens = random_tokens(seed=6)
    tokens[1, :7] = 64
    out = model(tokens, output_hidden_states=True)
    keep = tokens != 64
    h = out.hidden_states
    mean = {i: torch.stack([h[i][b][keep[b]].mean(0) for b in range(3)]) for i in (0, 1, 2)}
    got = model.embed(tokens, layers=[0, -1, 1])
    torch.testing.assert_close(got, torch.cat([mean[0], mean[2], mean[1]], 1), atol=1e-5, rtol=0)
    maxed = torch.stack([h[2][b][keep[b]].max(0).values for b in range(3)])
    torch.testing.assert_close(model.embed(tokens, pooling="max"), maxed, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        model.embed(tokens, pooling="max", exclude_mask=False), h[2].max(1).values
    )
    torch.testing.assert_close(model.embed(tokens, layers=[1]), model.embed(tokens, layer=1))


def test_embed_rejects_unknown_pooling_and_bad_layers(model: BulkRNABert) -> None:
    with pytest.raises(ConfigError, match="pooling must be one of"):
        model.embed(random_tokens(), pooling="median")
    with pytest.raises(ConfigError, match="layers is empty"):
        model.embed(random_tokens(), layers=[])
    with pytest.raises(ConfigError, match="does not exist"):
        model.embed(random_tokens(), layers=[0, 5])
