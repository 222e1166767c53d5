"""scLong adapter: a tiny random model written by the test in the released format.

The release folder holds ``selected_genes_27k.txt``, the hyper-parameter pickle
(sizes + GO graph tensors, written with plain ``pickle.dump`` as the pre-training
script does) and a ``.pth`` dict with ``model_state_dict``. The state-dict keys are
enumerated here from the released module tree, independently of the adapter's
network, and the forward pass is checked against a float64 per-sample reference
written from the released algorithm (quadratic-form attention, dense GO matrix).
"""

from __future__ import annotations

import json
import math
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from bulkfm.adapters.sclong import (  # noqa: E402
    GENE_FILE,
    HYPER_FILE,
    WEIGHTS_FILE,
    SCLongEmbedder,
    sclong_preprocess,
)
from bulkfm.adapters.sclong_net import gcn_propagate, select_top  # noqa: E402
from bulkfm.embedders import get_embedder  # noqa: E402
from bulkfm.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    ExpressionValueError,
    GeneMappingError,
)
from tests.adapters.sclong_files import (  # noqa: E402
    GENES,
    PARAMS,
    go_graph,
    released_state,
    write_release,
)


@pytest.fixture
def release(tmp_path):
    return write_release(tmp_path / "sclong")


def make_adata(n=5, seed=0, counts=True):
    """11 of the 12 model genes (the last one absent) plus one gene the model lacks."""
    rng = np.random.default_rng(seed)
    var = [*GENES[:11], "ENSG99999999999"]
    c = rng.poisson(rng.uniform(0.5, 40, size=(n, len(var)))).astype(np.float32)
    c[:, 0] += 1  # no sample without expression
    tpm = (c / c.sum(1, keepdims=True) * 1e6).astype(np.float32)
    a = ad.AnnData(X=tpm, obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]))
    a.var_names = var
    if counts:
        a.layers["counts"] = c
    return a


def embedder(path, **kw):
    return SCLongEmbedder(path, trust_pickle=True, **kw)


# --------------------------------------------------------------------------- reference


def reference_cell(x, state, p, g_go, g_w):
    """Released forward for one sample, float64, quadratic attention, dense GO graph."""
    s = {k: v.double() for k, v in state.items()}
    n, d = p["max_seq_len"], p["base_dim"]

    def linear(name, h, bias=True):
        return h @ s[f"{name}.weight"].T + (s[f"{name}.bias"] if bias else 0)

    def lnorm(name, h):
        return F.layer_norm(h, h.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"])

    def performer(prefix, h, depth, heads, dh):
        for i in range(depth):
            a, f = f"{prefix}.net.layers.{i}.0", f"{prefix}.net.layers.{i}.1"
            z = lnorm(f"{a}.norm", h)
            q, k, v = (linear(f"{a}.fn.{t}", z, False) for t in ("to_q", "to_k", "to_v"))
            proj = s[f"{a}.fn.fast_attention.projection_matrix"]
            c, ratio = dh**-0.25, proj.shape[0] ** -0.5
            kd = [(c * k[:, j * dh : (j + 1) * dh]) @ proj.T for j in range(heads)]
            kmax = max(float(t.max()) for t in kd)  # one key shift per sample
            outs = []
            for j in range(heads):
                sl = slice(j * dh, (j + 1) * dh)
                qd = (c * q[:, sl]) @ proj.T
                qf = ratio * (
                    torch.exp(
                        qd
                        - (q[:, sl] ** 2).sum(1, keepdim=True) * c * c / 2
                        - qd.max(1, keepdim=True).values
                    )
                    + 1e-4
                )
                kf = ratio * (
                    torch.exp(kd[j] - (k[:, sl] ** 2).sum(1, keepdim=True) * c * c / 2 - kmax)
                    + 1e-4
                )
                att = qf @ kf.T
                outs.append((att @ v[:, sl]) / att.sum(1, keepdim=True))
            h = h + linear(f"{a}.fn.to_out", torch.cat(outs, 1))
            z = lnorm(f"{f}.norm", h)
            h = h + linear(f"{f}.fn.fn.w2", F.gelu(linear(f"{f}.fn.fn.w1", z)))
        return h

    adj = torch.zeros(n, n, dtype=torch.float64)
    for (src, dst), w in zip(g_go.T.tolist(), g_w.tolist(), strict=True):
        adj[dst, src] += w
    deg = adj.sum(1)
    inv = torch.where(deg > 0, deg.clamp_min(1e-300) ** -0.5, torch.zeros_like(deg))
    go = linear(
        "go_conv.sim_layers.0.lin", (inv[:, None] * adj * inv[None, :]) @ s["go_conv.emb.weight"]
    )
    genes = s["pos_emb.emb.weight"] + go

    xs = x.double()
    emb = linear("token_emb.fc2", torch.relu(linear("token_emb.fc1", xs[:, None])))
    emb = lnorm("token_norm", emb) + genes
    order = sorted(range(n), key=lambda i: (-float(xs[i]), i))
    top, rest = order[: p["top_seq_len"]], sorted(order[p["top_seq_len"] :])
    t = lnorm("large_in_norm", linear("base_to_large", emb[top]))
    t = performer("large_encoder", t, p["large_enc_depth"], p["large_enc_heads"], 4)
    t = lnorm("large_to_base_out_norm", linear("large_to_base", t))
    r = performer("mini_encoder", emb[rest], p["mini_enc_depth"], p["mini_enc_heads"], 4)
    merged = torch.zeros(n, d, dtype=torch.float64)
    merged[top], merged[rest] = t, r
    out = performer("decoder", merged + genes, p["dec_depth"], p["dec_heads"], 4)
    return lnorm("decode_norm", out)


# --------------------------------------------------------------------------- tests


def test_shapes_and_release_forward(release):
    a = make_adata()
    emb = embedder(release)
    out = emb.transform(a)
    assert out.shape == (5, PARAMS["base_dim"]) and np.isfinite(out).all()
    state = torch.load(release / WEIGHTS_FILE, weights_only=True)["model_state_dict"]
    g_go, g_w = go_graph(len(GENES))
    c = a.layers["counts"][:, :11].astype(np.float64)
    x = np.log1p(c / c.sum(1, keepdims=True) * 1e4)
    x = np.concatenate([x, np.zeros((5, 2))], axis=1)  # absent gene 12, then the pad
    for i in range(5):
        hidden = reference_cell(torch.tensor(x[i]), state, PARAMS, g_go, g_w)
        np.testing.assert_allclose(out[i], hidden[:11].mean(0).numpy(), rtol=1e-4, atol=1e-5)
    assert emb.coverage_["n_found"] == 11 and emb.coverage_["n_vocabulary"] == 12
    assert emb.coverage_["input"] == "counts"


def test_deterministic_and_batch_size_invariant(release):
    a = make_adata(n=5, seed=3)
    one = embedder(release, batch_size=1).transform(a)
    again = embedder(release, batch_size=1).transform(a)
    five = embedder(release, batch_size=5).transform(a)
    np.testing.assert_array_equal(one, again)
    np.testing.assert_allclose(one, five, rtol=1e-5, atol=1e-6)
    # the release's batch-wide key shift equals ours when a batch holds one sample
    released = embedder(release, batch_size=1, key_max="batch").transform(a)
    np.testing.assert_allclose(one, released, rtol=1e-6, atol=1e-7)


def test_preprocessing_by_hand():
    values = np.array([[1.0, 3.0, 0.0, 6.0]])
    present = np.array([[True, True, True, False]])
    want = [math.log(2501), math.log(7501), 0.0, 0.0, 0.0]  # 1/4 and 3/4 of 1e4, pad last
    np.testing.assert_allclose(sclong_preprocess(values, present)[0], want, rtol=1e-6)
    masked = sclong_preprocess(values, present, missing="mask")[0]
    np.testing.assert_allclose(masked, [*want[:3], -10.0, 0.0], rtol=1e-6)
    scaled = sclong_preprocess(values, present, scale_max=10.0)[0]
    k = 10 / math.log(7501)
    np.testing.assert_allclose(scaled, [math.log(2501) * k, 10.0, 0, 0, 0], rtol=1e-6)


def test_pooling_matches_naive_loop(release):
    a = make_adata(n=3, seed=5)
    emb = embedder(release, batch_size=3)
    out = emb.transform(a)
    with torch.inference_mode():
        hidden, _ = emb.per_gene(a)
    have = set(a.var_names)
    for i in range(3):
        rows = [hidden[i, j].numpy() for j, g in enumerate(GENES) if g in have]
        np.testing.assert_allclose(out[i], sum(rows) / len(rows), rtol=1e-5, atol=1e-6)
    out_all = embedder(release, batch_size=3, pooling="all").transform(a)
    for i in range(3):
        naive = sum(hidden[i, j].numpy() for j in range(len(GENES))) / len(GENES)
        np.testing.assert_allclose(out_all[i], naive, rtol=1e-5, atol=1e-6)


def test_top_selection_by_hand():
    top, rest = select_top(torch.tensor([[0.5, 2.0, 2.0, 0.0, 3.0, 1.0]]), 3)
    assert top.tolist() == [[4, 1, 2]] and rest.tolist() == [[0, 3, 5]]
    top, rest = select_top(torch.tensor([[0.5, 2.0, 2.0, 0.0, 3.0, 1.0]]), 2)
    assert top.tolist() == [[4, 1]] and rest.tolist() == [[0, 2, 3, 5]]  # tie: lower first
    top, _ = select_top(torch.zeros(2, 5), 2)
    assert top.tolist() == [[0, 1], [0, 1]]


@pytest.mark.slow
def test_graph_propagation_matches_pyg():
    pyg = pytest.importorskip("torch_geometric.nn")
    g_go, g_w = go_graph(len(GENES))
    x = torch.randn(len(GENES) + 1, 8)
    conv = pyg.SGConv(8, 8, K=1, add_self_loops=False)
    ours = conv.lin(gcn_propagate(x, g_go, g_w))
    np.testing.assert_allclose(ours.detach(), conv(x, g_go, g_w).detach(), atol=1e-6)


def test_counts_preferred_over_tpm(release):
    a = make_adata(n=2, seed=7)
    b = ad.AnnData(X=a.layers["counts"].copy(), obs=a.obs.copy(), var=a.var.copy())
    emb_b = embedder(release)
    np.testing.assert_allclose(embedder(release).transform(a), emb_b.transform(b), atol=1e-6)
    assert emb_b.coverage_["input"] == "TPM"


def test_pickle_free_folder_gives_same_output(release, tmp_path):
    from safetensors.torch import save_file

    safe = tmp_path / "safe"
    safe.mkdir()
    (safe / GENE_FILE).write_text((release / GENE_FILE).read_text())
    cfg = {k: v for k, v in PARAMS.items() if k != "device"}
    (safe / "sclong_config.json").write_text(json.dumps(cfg))
    g_go, g_w = go_graph(len(GENES))
    save_file({"G_go": g_go.contiguous(), "G_go_weight": g_w}, str(safe / "go_graph.safetensors"))
    state = torch.load(release / WEIGHTS_FILE, weights_only=True)["model_state_dict"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(safe / "model.safetensors"))
    a = make_adata(n=2)
    got = SCLongEmbedder(safe).transform(a)  # no trust_pickle needed
    np.testing.assert_allclose(got, embedder(release).transform(a), atol=1e-6)


def test_registered_under_cli_name(release):
    assert isinstance(get_embedder("sclong", model_dir=release), SCLongEmbedder)


# --------------------------------------------------------------------------- bad input


def test_missing_key_is_listed(tmp_path):
    state = released_state(PARAMS)
    del state["decoder.net.layers.0.1.fn.fn.w2.bias"]
    folder = write_release(tmp_path / "m", state=state)
    with pytest.raises(CheckpointError, match=r"missing keys.*decoder\.net\.layers\.0\.1\.fn\.fn"):
        embedder(folder).transform(make_adata())


def test_renamed_key_is_listed(tmp_path):
    state = released_state(PARAMS)
    state["mini_encoder.net.layers.0.0.fn.query.weight"] = state.pop(
        "mini_encoder.net.layers.0.0.fn.to_q.weight"
    )
    folder = write_release(tmp_path / "r", state=state)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*fn\.query\.weight"):
        embedder(folder).transform(make_adata())


def test_pickle_needs_opt_in(release):
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        SCLongEmbedder(release).transform(make_adata())


def test_hostile_pickle_refused_even_with_opt_in(release):
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    (release / HYPER_FILE).write_bytes(pickle.dumps({**PARAMS, "G_go": Boom()}))
    with pytest.raises(CheckpointError, match=r"refusing to load global builtins\.print"):
        embedder(release).transform(make_adata())


def test_low_coverage_fails(release):
    a = make_adata()
    a.var_names = [f"ENSG9{i:010d}" for i in range(a.n_vars)]
    with pytest.raises(GeneMappingError, match="only 0 of the model's 12 genes"):
        embedder(release).transform(a)


def test_path_missing_fails(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SCLongEmbedder(tmp_path / "nope")
    with pytest.raises(ConfigError, match="needs the released weights"):
        SCLongEmbedder(None)


def test_release_file_missing_fails(release):
    (release / HYPER_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"lacks gocont_4096_48m_pretrain_1b_mix\.pkl"):
        embedder(release).transform(make_adata())


def test_gene_list_must_match_model(tmp_path):
    folder = write_release(tmp_path / "g", genes=GENES[:11])
    with pytest.raises(CheckpointError, match="gene list has 11 genes but the model expects 12"):
        embedder(folder).transform(make_adata())


def test_unsupported_hyper_parameter_fails(tmp_path):
    folder = write_release(tmp_path / "u", params={**PARAMS, "reversible": True})
    with pytest.raises(CheckpointError, match=r"does not implement.*reversible"):
        embedder(folder).transform(make_adata())


def test_negative_graph_weights_fail(tmp_path):
    folder = write_release(tmp_path / "w", weight_scale=-1.0)
    with pytest.raises(CheckpointError, match="GO graph weights must be finite and non-negative"):
        embedder(folder).transform(make_adata())


def test_unknown_hyper_parameter_fails(tmp_path):
    folder = write_release(tmp_path / "k", params={**PARAMS, "n_experts": 4})
    with pytest.raises(CheckpointError, match=r"does not know: \['n_experts'\]"):
        embedder(folder).transform(make_adata())


def test_negative_values_fail():
    with pytest.raises(ExpressionValueError, match="negative expression"):
        sclong_preprocess(np.array([[1.0, -2.0]]), np.ones((1, 2), dtype=bool))


def test_sample_without_expression_fails():
    with pytest.raises(ExpressionValueError, match="sample 1 has no expression"):
        sclong_preprocess(np.array([[1.0, 2.0], [0.0, 0.0]]), np.ones((2, 2), dtype=bool))


@pytest.mark.parametrize(
    ("option", "value", "pattern"),
    [
        ("pooling", "cls", r"pooling must be one of \['present', 'all'\]"),
        ("missing", "drop", r"missing must be one of \['zero', 'mask'\]"),
        ("key_max", "head", r"key_max must be one of \['sample', 'batch'\]"),
        ("scale_max", 0, "scale_max must be a positive number"),
        ("min_coverage", 2.0, r"min_coverage must lie in \[0, 1\]"),
    ],
)
def test_bad_option_fails(release, option, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        SCLongEmbedder(release, **{option: value})
