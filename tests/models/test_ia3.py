from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.special import erf
from torch import nn

from bulkfm.errors import CheckpointError, ConfigError
from bulkfm.models import BulkRNABert, BulkRNABertConfig
from bulkfm.models.ia3 import (
    IA3Linear,
    IA3Scale,
    apply_ia3,
    count_parameters,
    get_adapter_params,
    has_ia3,
    ia3_state_dict,
    load_ia3,
    merge_ia3,
    save_ia3,
    set_trainable_params,
)
from tests.conftest import tiny_config

# Two blocks, and a feed-forward width (24) unlike the key/value width (16), so the
# adapter counts below tell the three scaling vectors apart.
TINY = dict(ffn_embed_dim=24, num_layers=2)
CONFIG = tiny_config(**TINY)


def make_model(seed: int = 0) -> BulkRNABert:
    """Tiny model with non-trivial biases and LayerNorms so every term matters."""
    torch.manual_seed(seed)
    model = BulkRNABert(tiny_config(**TINY))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "embedding" in name else 0.2))
            if "layer_norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model.eval()


class WithHead(nn.Module):
    """Encoder + head, the shape fine-tuning uses."""

    def __init__(self, encoder: BulkRNABert) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.embed_dim, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(tokens).last_hidden_state.mean(dim=1))


def tokens(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 65, (n, 32), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in get_adapter_params(model).values():
            p.copy_(0.5 + torch.rand(p.shape, generator=gen))


def reference_forward(
    sd: dict[str, np.ndarray], tok: np.ndarray, scales: list[dict[str, np.ndarray]]
) -> np.ndarray:
    """Last hidden state written from the IA3 description: keys, values and the FFN
    activation of block i multiplied by scales[i]['k'|'v'|'ff']."""

    def lin(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def norm(x, name):
        mu = x.mean(-1, keepdims=True)
        sd_ = np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
        return (x - mu) / sd_ * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    heads, dk = CONFIG.num_attention_heads, CONFIG.embed_dim // CONFIG.num_attention_heads
    x = sd["expression_embedding_layer.weight"][tok] + lin(
        sd["gene_embedding_layer.weight"], "fc_gene_embedding"
    )
    for i, s in enumerate(scales):
        p = f"transformer_layers.{i}"
        h = norm(x, f"{p}.layer_norm_self_attention")

        def split(a):
            return a.reshape(*a.shape[:2], heads, dk).transpose(0, 2, 1, 3)

        q = split(lin(h, f"{p}.mha.w_q"))
        k = split(lin(h, f"{p}.mha.w_k") * s["k"])
        v = split(lin(h, f"{p}.mha.w_v") * s["v"])
        att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dk)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        ctx = (att @ v).transpose(0, 2, 1, 3).reshape(*x.shape[:2], heads * dk)
        x = x + lin(ctx, f"{p}.mha.output")
        a = lin(norm(x, f"{p}.layer_norm_mlp"), f"{p}.fc1")
        a = 0.5 * a * (1 + erf(a / np.sqrt(2))) * s["ff"]
        x = x + lin(a, f"{p}.fc2")
    return x


# --------------------------------------------------------------------------- structure
def test_apply_adds_ones_vectors_of_the_right_sizes_and_keeps_base_keys() -> None:
    model = make_model()
    base_keys = set(model.state_dict())
    apply_ia3(model)
    adapters = get_adapter_params(model)
    expected = {}
    for i in range(CONFIG.num_layers):
        expected[f"transformer_layers.{i}.mha.w_k.ia3_l"] = 16
        expected[f"transformer_layers.{i}.mha.w_v.ia3_l"] = 16
        expected[f"transformer_layers.{i}.activation.ia3_l"] = 24
    assert {k: p.numel() for k, p in adapters.items()} == expected
    assert all(torch.equal(p, torch.ones_like(p)) for p in adapters.values())
    # base names untouched: a pre-trained state dict still loads by name
    assert set(model.state_dict()) == base_keys | set(expected)
    assert isinstance(model.transformer_layers[0].mha.w_k, IA3Linear)
    assert isinstance(model.transformer_layers[1].activation, IA3Scale)


def test_adapters_share_the_base_parameters() -> None:
    model = make_model()
    weight = model.transformer_layers[0].mha.w_v.weight
    apply_ia3(model)
    assert model.transformer_layers[0].mha.w_v.weight is weight


def test_identity_at_init() -> None:
    model = make_model()
    tok = tokens()
    before = model(tok)
    emb = model.embed(tok)
    apply_ia3(model)
    after = model(tok)
    assert torch.equal(after.last_hidden_state, before.last_hidden_state)
    assert torch.equal(after.logits, before.logits)
    assert torch.equal(model.embed(tok), emb)


def test_scaling_matches_manual_computation() -> None:
    model = make_model()
    apply_ia3(model)
    randomize_adapters(model)
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    scales = [
        {
            "k": sd[f"transformer_layers.{i}.mha.w_k.ia3_l"],
            "v": sd[f"transformer_layers.{i}.mha.w_v.ia3_l"],
            "ff": sd[f"transformer_layers.{i}.activation.ia3_l"],
        }
        for i in range(CONFIG.num_layers)
    ]
    tok = tokens(seed=3)
    ref = reference_forward(sd, tok.numpy(), scales)
    got = model(tok).last_hidden_state.detach().double().numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    # and the scales matter: with all-ones the reference is different
    ones = [{k: np.ones_like(v) for k, v in s.items()} for s in scales]
    assert np.abs(reference_forward(sd, tok.numpy(), ones) - ref).max() > 1e-2


def test_each_vector_scales_its_own_tensor() -> None:
    """Hook the modules: keys, values and fc2 input are the base ones times the vector."""
    model = make_model()
    tok = tokens()
    seen: dict[str, torch.Tensor] = {}
    block = model.transformer_layers[1]
    hooks = [
        block.mha.w_k.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o)),
        block.fc2.register_forward_hook(lambda m, i, o: seen.__setitem__("ff", i[0])),
    ]
    model(tok)
    base = dict(seen)
    for h in hooks:
        h.remove()
    apply_ia3(model)
    block = model.transformer_layers[1]
    # only block 1's vectors differ from one, so block 1's inputs are unchanged
    with torch.no_grad():
        block.mha.w_k.ia3_l.copy_(torch.linspace(0.5, 2.0, 16))
        block.activation.ia3_l.copy_(torch.linspace(2.0, 0.1, 24))
    block.mha.w_k.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    block.fc2.register_forward_hook(lambda m, i, o: seen.__setitem__("ff", i[0]))
    model(tok)
    torch.testing.assert_close(seen["k"], base["k"] * torch.linspace(0.5, 2.0, 16))
    # fc2 input depends on the scaled keys through attention, so compare against a
    # recomputation from the block's own (hooked) pre-activation instead
    pre = {}
    block.fc1.register_forward_hook(lambda m, i, o: pre.__setitem__("h", o))
    model(tok)
    expected_ff = torch.nn.functional.gelu(pre["h"]) * torch.linspace(2.0, 0.1, 24)
    torch.testing.assert_close(seen["ff"], expected_ff)


# --------------------------------------------------------------------------- training
def test_only_adapters_and_head_get_gradients() -> None:
    net = WithHead(make_model())
    apply_ia3(net)
    head = {f"head.{n}": p for n, p in net.head.named_parameters()}
    set_trainable_params(net, {**get_adapter_params(net), **head})
    loss = net(tokens()).logsumexp(dim=-1).sum()
    loss.backward()
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
    assert with_grad == set(get_adapter_params(net)) | set(head)
    assert all(p.grad.abs().sum() > 0 for n, p in net.named_parameters() if n in with_grad)
    assert not any(p.requires_grad for n, p in net.named_parameters() if n not in with_grad)


def test_apply_freezes_everything_but_adapters() -> None:
    model = make_model()
    apply_ia3(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(get_adapter_params(model))


def test_apply_without_freeze_keeps_base_trainable() -> None:
    model = make_model()
    apply_ia3(model, freeze=False)
    assert all(p.requires_grad for p in model.parameters())


def test_parameter_counts_match_hand_count() -> None:
    net = WithHead(make_model())
    total_before = sum(p.numel() for p in net.parameters())
    apply_ia3(net)
    adapter = CONFIG.num_layers * (16 + 16 + 24)
    counts = count_parameters(net)
    assert counts["adapter"] == adapter
    assert counts["trainable"] == adapter
    assert counts["total"] == total_before + adapter
    assert counts["fraction"] == pytest.approx(adapter / (total_before + adapter))
    set_trainable_params(net, {**get_adapter_params(net), "head.weight": net.head.weight})
    assert count_parameters(net)["trainable"] == adapter + 16 * 3


def test_official_size_adds_under_a_tenth_of_a_percent() -> None:
    model = BulkRNABert(BulkRNABertConfig())
    base = model.num_parameters()
    apply_ia3(model)
    counts = count_parameters(model)
    assert counts["trainable"] == counts["adapter"] == 4 * (256 + 256 + 512) == 4096
    assert counts["total"] == base + 4096
    assert counts["fraction"] < 1e-3


# --------------------------------------------------------------------------- merge / io
def test_merge_keeps_outputs_and_restores_plain_model() -> None:
    model = make_model()
    base_keys = set(model.state_dict())
    apply_ia3(model)
    randomize_adapters(model, seed=4)
    tok = tokens(seed=5)
    expected = model(tok).last_hidden_state
    merge_ia3(model)
    assert not has_ia3(model)
    assert set(model.state_dict()) == base_keys
    assert type(model.transformer_layers[0].mha.w_k) is nn.Linear
    assert type(model.transformer_layers[0].activation) is nn.GELU
    torch.testing.assert_close(model(tok).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_merged_weights_are_scaled_rows_and_columns() -> None:
    model = make_model()
    w_v = model.transformer_layers[0].mha.w_v.weight.detach().clone()
    b_v = model.transformer_layers[0].mha.w_v.bias.detach().clone()
    fc2 = model.transformer_layers[0].fc2.weight.detach().clone()
    apply_ia3(model)
    randomize_adapters(model, seed=2)
    l_v = model.transformer_layers[0].mha.w_v.ia3_l.detach().clone()
    l_ff = model.transformer_layers[0].activation.ia3_l.detach().clone()
    merge_ia3(model)
    torch.testing.assert_close(model.transformer_layers[0].mha.w_v.weight, w_v * l_v[:, None])
    torch.testing.assert_close(model.transformer_layers[0].mha.w_v.bias, b_v * l_v)
    torch.testing.assert_close(model.transformer_layers[0].fc2.weight, fc2 * l_ff[None, :])


def test_merged_model_round_trips_through_save_pretrained(tmp_path) -> None:
    model = make_model()
    apply_ia3(model)
    randomize_adapters(model)
    tok = tokens()
    expected = model(tok).last_hidden_state
    merge_ia3(model).save_pretrained(tmp_path)
    loaded = BulkRNABert.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(tok).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_state_dict_holds_only_adapters_and_head(tmp_path) -> None:
    net = WithHead(make_model())
    apply_ia3(net)
    sd = ia3_state_dict(net)
    assert set(sd) == set(get_adapter_params(net)) | {"head.weight", "head.bias"}
    path = save_ia3(net, tmp_path / "ia3.safetensors")
    assert set(load_file(path)) == set(sd)


def test_save_load_round_trip_reproduces_outputs(tmp_path) -> None:
    net = WithHead(make_model())
    apply_ia3(net)
    randomize_adapters(net, seed=7)
    with torch.no_grad():
        net.head.weight.mul_(3.0)
    tok = tokens(seed=8)
    expected = net(tok)
    save_ia3(net, tmp_path / "a.safetensors")
    fresh = WithHead(make_model())  # same pre-trained encoder, new head, no adapters
    assert not torch.allclose(fresh(tok), expected)
    load_ia3(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(fresh(tok), expected)


def test_bare_encoder_state_dict_has_no_other_tensors() -> None:
    model = make_model()
    apply_ia3(model)
    assert set(ia3_state_dict(model)) == set(get_adapter_params(model))


# --------------------------------------------------------------------------- errors
def test_apply_twice_is_an_error() -> None:
    model = apply_ia3(make_model())
    with pytest.raises(ConfigError, match="already has IA3"):
        apply_ia3(model)


def test_apply_to_a_model_without_blocks_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no BulkRNABert transformer block"):
        apply_ia3(nn.Linear(3, 3))


def test_merge_without_adapters_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no IA3 adapters to merge"):
        merge_ia3(make_model())


def test_state_dict_without_adapters_is_an_error() -> None:
    with pytest.raises(ConfigError, match="call apply_ia3"):
        ia3_state_dict(make_model())


def test_set_trainable_params_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="not parameters of the model"):
        set_trainable_params(make_model(), {"nope.weight": nn.Parameter(torch.ones(1))})


def test_load_missing_file_is_an_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_ia3(make_model(), tmp_path / "none.safetensors")


def test_load_damaged_file_is_an_error(tmp_path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="damaged"):
        load_ia3(make_model(), path)


def test_load_into_other_architecture_is_an_error(tmp_path) -> None:
    net = WithHead(make_model())
    apply_ia3(net)
    save_ia3(net, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_ia3(make_model(), tmp_path / "a.safetensors")  # no head


def test_load_wrong_shape_is_an_error(tmp_path) -> None:
    model = apply_ia3(make_model())
    sd = {k: v.clone() for k, v in ia3_state_dict(model).items()}
    key = "transformer_layers.0.activation.ia3_l"
    sd[key] = torch.ones(5)
    save_file(sd, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match="has shape"):
        load_ia3(make_model(), tmp_path / "a.safetensors")
