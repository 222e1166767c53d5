"""The shared FAVOR+ Performer against naive float64 references (explicit attention
matrices, loops for the stabilising maxima); tiny sizes, CPU only."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from bulkfm.adapters.performer import (  # noqa: E402
    KERNEL_EPS,
    Performer,
    linear_attention,
    softmax_features,
)
from bulkfm.errors import ConfigError  # noqa: E402


def naive_features(x, w, *, is_query, key_max="sample"):
    """phi(x) = m^-1/2 (exp(w.x' - |x'|^2/2 - shift) + eps) with x' = d^-1/4 x, in float64."""
    x, w = x.double(), w.double()
    b, h, n, d = x.shape
    xs = x * d**-0.25
    dash = xs @ w.T  # [b, h, n, m]
    diag = (xs**2).sum(-1, keepdim=True) / 2
    shift = torch.empty(b, h, n, 1, dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            for p in range(n):
                if is_query:
                    shift[i, j, p] = max(dash[i, j, p].tolist())
                elif key_max == "batch":
                    shift[i, j, p] = dash.max()
                else:
                    shift[i, j, p] = dash[i].max()
    return w.shape[0] ** -0.5 * (torch.exp(dash - diag - shift) + KERNEL_EPS)


def explicit_attention(qf, kf, v):
    """Quadratic reference: the [n, n] kernel matrix, row-normalised, times v."""
    a = qf.double() @ kf.double().transpose(-1, -2)
    return (a / a.sum(-1, keepdim=True)) @ v.double()


@pytest.mark.parametrize("is_query", [True, False])
@pytest.mark.parametrize("key_max", ["sample", "batch"])
def test_features_match_naive(is_query, key_max):
    x = torch.randn(3, 2, 5, 4)
    w = torch.randn(7, 4)
    want = naive_features(x, w, is_query=is_query, key_max=key_max)
    with torch.no_grad():  # the in-place path
        fast = softmax_features(x, w, is_query=is_query, key_max=key_max)
    slow = softmax_features(x.requires_grad_(), w, is_query=is_query, key_max=key_max)
    assert slow.requires_grad
    torch.testing.assert_close(fast.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(slow.detach().double(), want, rtol=1e-5, atol=1e-7)


def test_in_place_path_leaves_the_input_alone():
    x = torch.randn(1, 2, 5, 4)
    before = x.clone()
    with torch.no_grad():
        softmax_features(x, torch.randn(6, 4), is_query=False)
    torch.testing.assert_close(x, before, rtol=0, atol=0)


def test_linear_attention_equals_explicit_attention():
    qf, kf = torch.rand(2, 3, 6, 8) + 0.1, torch.rand(2, 3, 6, 8) + 0.1
    v = torch.randn(2, 3, 6, 5)
    torch.testing.assert_close(
        linear_attention(qf, kf, v).double(), explicit_attention(qf, kf, v), rtol=1e-5, atol=1e-6
    )


def test_favor_approximates_softmax_attention():
    """With many random features the kernel tends to exp(q.k / sqrt(d)): softmax attention."""
    d, n, m = 4, 6, 20_000
    q, k, v = (0.5 * torch.randn(1, 1, n, d) for _ in range(3))
    w = torch.randn(m, d)
    with torch.no_grad():
        out = linear_attention(
            softmax_features(q, w, is_query=True), softmax_features(k, w, is_query=False), v
        )
    exact = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(d), -1) @ v.double()
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=0.05)


def _attend(q, k, v, w, key_max):
    with torch.no_grad():
        kf = softmax_features(k, w, is_query=False, key_max=key_max)
        return linear_attention(softmax_features(q, w, is_query=True), kf, v)


def test_per_sample_key_max_is_batch_independent_and_batch_max_is_not():
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    k[1] *= 6.0  # the second sample's keys set the batch max far above the first's
    w = torch.randn(8, 4)
    alone = _attend(q[:1], k[:1], v[:1], w, "sample")
    torch.testing.assert_close(_attend(q, k, v, w, "sample")[:1], alone, rtol=1e-5, atol=1e-6)
    # at batch size one the two choices are the same computation
    torch.testing.assert_close(_attend(q[:1], k[:1], v[:1], w, "batch"), alone, rtol=0, atol=0)
    assert not torch.allclose(_attend(q, k, v, w, "batch")[:1], alone, atol=1e-3)


def expected_keys(depth, *, glu, qkv_bias, dim=6, hidden=10, inner=8, m=5, d=4):
    keys = {"calls_since_last_redraw": ()}
    for i in range(depth):
        a, f = f"net.layers.{i}.0.", f"net.layers.{i}.1."
        keys |= {a + "norm.weight": (dim,), a + "norm.bias": (dim,)}
        keys |= {f + "norm.weight": (dim,), f + "norm.bias": (dim,)}
        for name in ("to_q", "to_k", "to_v"):
            keys[a + f"fn.{name}.weight"] = (inner, dim)
            if qkv_bias:
                keys[a + f"fn.{name}.bias"] = (inner,)
        keys |= {a + "fn.to_out.weight": (dim, inner), a + "fn.to_out.bias": (dim,)}
        keys[a + "fn.fast_attention.projection_matrix"] = (m, d)
        keys |= {f + "fn.fn.w1.weight": (hidden * (2 if glu else 1), dim)}
        keys |= {f + "fn.fn.w1.bias": (hidden * (2 if glu else 1),)}
        keys |= {f + "fn.fn.w2.weight": (dim, hidden), f + "fn.fn.w2.bias": (dim,)}
    return keys


@pytest.mark.parametrize("glu", [False, True])
def test_state_dict_keys_follow_the_release_layout(glu):
    net = Performer(6, 2, 2, 4, ff_hidden=10, nb_features=5, ff_glu=glu, qkv_bias=glu)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == expected_keys(2, glu=glu, qkv_bias=glu)


def test_nb_features_defaults_to_d_ln_d():
    net = Performer(8, 1, 1, 16, ff_hidden=8)
    want = (int(16 * math.log(16)), 16)
    assert (
        tuple(net.state_dict()["net.layers.0.0.fn.fast_attention.projection_matrix"].shape) == want
    )


def naive_performer(x, state, depth, heads, *, glu, key_max):
    """The stack written out from its state dict with explicit attention matrices."""
    x = x.double()
    s = {k: v.double() for k, v in state.items()}

    def lin(t, name):
        bias = s.get(name + ".bias")
        return t @ s[name + ".weight"].T + (0 if bias is None else bias)

    def norm(t, name):
        return torch.nn.functional.layer_norm(
            t, t.shape[-1:], s[name + ".weight"], s[name + ".bias"]
        )

    for i in range(depth):
        a, f = f"net.layers.{i}.0.", f"net.layers.{i}.1."
        h = norm(x, a + "norm")
        b, n, _ = h.shape
        q, k, v = (
            lin(h, a + "fn." + name).view(b, n, heads, -1).transpose(1, 2)
            for name in ("to_q", "to_k", "to_v")
        )
        w = s[a + "fn.fast_attention.projection_matrix"]
        qf = naive_features(q, w, is_query=True)
        kf = naive_features(k, w, is_query=False, key_max=key_max)
        out = explicit_attention(qf, kf, v).transpose(1, 2).reshape(b, n, -1)
        x = x + lin(out, a + "fn.to_out")
        h = lin(norm(x, f + "norm"), f + "fn.fn.w1")
        if glu:
            h, gate = h.chunk(2, -1)
            h = torch.nn.functional.gelu(h) * gate
        else:
            h = torch.nn.functional.gelu(h)
        x = x + lin(h, f + "fn.fn.w2")
    return x


@pytest.mark.parametrize(("glu", "key_max"), [(False, "sample"), (True, "batch")])
def test_forward_matches_naive_stack(glu, key_max):
    net = Performer(
        6, 2, 2, 4, ff_hidden=10, nb_features=5, ff_glu=glu, qkv_bias=glu, key_max=key_max
    )
    state = {
        k: (torch.randn_like(v) * 0.5 if v.is_floating_point() else v)
        for k, v in net.state_dict().items()
    }
    net.load_state_dict(state)
    x = torch.randn(3, 7, 6)
    want = naive_performer(x, state, 2, 2, glu=glu, key_max=key_max)
    with torch.no_grad():
        got = net(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_unknown_key_max_is_refused():
    with pytest.raises(ConfigError, match=r"key_max must be one of .* got 'head'"):
        Performer(6, 1, 2, 4, ff_hidden=10, key_max="head")
