"""scBERT adapter: a tiny random model written in the released checkpoint format.

The checkpoint keys are spelled out here by hand from scBERT's vendored
performer_pytorch (and checked against the PyPI performer-pytorch layout when it is
installed); the reference forward pass is a per-head loop with explicit n x n
attention matrices, independent of the adapter's einsum implementation.
"""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

from bulkfm.adapters.scbert import ScbertEmbedder, scbert_tokens  # noqa: E402
from bulkfm.data.genes import GeneTable  # noqa: E402
from bulkfm.embedders import get_embedder  # noqa: E402
from bulkfm.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    ExpressionValueError,
    GeneMappingError,
)
from tests.adapters.scbert_files import (  # noqa: E402
    DEPTH,
    DIM,
    DIM_HEAD,
    FF,
    HEADS,
    NB_FEATURES,
    NUM_TOKENS,
    SYMBOLS,
    released_state,
    write_release,
)

EXTRA = ["EPCAM", "KRT18", "MKI67", "TOP2A", "CCND1"]
EPS = 1e-4


# --------------------------------------------------------------------------- helpers


def ensembl_of(symbols):
    table = GeneTable.default()
    return [table.lookup("approved", s)[0] for s in symbols]


def make_data(n: int = 5, seed: int = 1, counts_layer: bool = False) -> ad.AnnData:
    """Samples over the vocabulary genes (shuffled) plus extra genes; one dominant gene
    keeps the other genes' normalised values in the 0-5 token range."""
    rng = np.random.default_rng(seed)
    symbols = SYMBOLS + EXTRA
    values = rng.integers(0, 500, size=(n, len(symbols))).astype(np.float32)
    values[:, 0] = 2e5
    values[:, rng.choice(np.arange(1, len(SYMBOLS)), 4, replace=False)] = 0.0
    values[:, len(SYMBOLS) :] *= 50  # extra genes must not change the tokens
    order = rng.permutation(len(symbols))
    var = pd.DataFrame(
        {"symbol": np.array(symbols)[order]}, index=np.array(ensembl_of(symbols))[order]
    )
    adata = ad.AnnData(
        X=values[:, order], obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]), var=var
    )
    missing = np.zeros(adata.shape, dtype=bool)
    missing[n - 1, list(var["symbol"]).index("MYC")] = True
    adata.layers["missing"] = sp.csr_matrix(missing)
    if counts_layer:
        adata.layers["counts"] = adata.X.copy()
        adata.X = np.roll(adata.X, 1, axis=1)  # X (e.g. TPM) now differs gene by gene
    return adata


def hand_tokens(adata: ad.AnnData) -> tuple[list[list[int]], list[list[bool]]]:
    """Tokens and presence per sample computed gene by gene with math.log2."""
    symbol_col = list(adata.var["symbol"])
    missing = adata.layers["missing"].toarray()
    tokens, present = [], []
    for i in range(adata.n_obs):
        vals, pres = [], []
        for s in SYMBOLS:
            j = symbol_col.index(s)
            ok = not missing[i, j]
            vals.append(float(adata.X[i, j]) if ok else 0.0)
            pres.append(ok)
        total = sum(vals)
        row = [int(min(math.log2(1 + v * 10000 / total), 5)) for v in vals] + [0]
        tokens.append(row)
        present.append(pres)
    return tokens, present


def layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def reference_encoding(s, tokens):
    """scBERT's PerformerLM encodings for one sample, head by head (published math)."""
    t = torch.tensor(tokens)
    x = s["token_emb.weight"][t] + s["pos_emb.emb.weight"][: len(tokens)].float()
    for i in range(DEPTH):
        p = f"performer.net.layers.{i}."
        h = layer_norm(x, s[p + "0.norm.weight"], s[p + "0.norm.bias"])
        q, k, v = (h @ s[p + f"0.fn.to_{n}.weight"].T for n in "qkv")
        proj = s[p + "0.fn.fast_attention.projection_matrix"]
        c = DIM_HEAD**-0.25
        heads = [slice(j * DIM_HEAD, (j + 1) * DIM_HEAD) for j in range(HEADS)]
        k_dash = [(c * k[:, hs]) @ proj.T for hs in heads]
        k_top = max(float(kd.max()) for kd in k_dash)  # one max over the whole key tensor
        outs = []
        for hs, kd in zip(heads, k_dash, strict=True):
            qd = (c * q[:, hs]) @ proj.T
            q_diag = (q[:, hs] ** 2).sum(-1, keepdim=True) / 2 * c**2
            k_diag = (k[:, hs] ** 2).sum(-1, keepdim=True) / 2 * c**2
            qf = NB_FEATURES**-0.5 * (
                torch.exp(qd - q_diag - qd.max(-1, keepdim=True).values) + EPS
            )
            kf = NB_FEATURES**-0.5 * (torch.exp(kd - k_diag - k_top) + EPS)
            a = qf @ kf.T
            outs.append((a / a.sum(-1, keepdim=True)) @ v[:, hs])
        x = x + torch.cat(outs, -1) @ s[p + "0.fn.to_out.weight"].T + s[p + "0.fn.to_out.bias"]
        h = layer_norm(x, s[p + "1.norm.weight"], s[p + "1.norm.bias"])
        f = torch.nn.functional.gelu(h @ s[p + "1.fn.fn.w1.weight"].T + s[p + "1.fn.fn.w1.bias"])
        x = x + f @ s[p + "1.fn.fn.w2.weight"].T + s[p + "1.fn.fn.w2.bias"]
    return layer_norm(x, s["norm.weight"], s["norm.bias"])


def naive_embeddings(adata, pooling="present"):
    state = released_state()
    tokens, present = hand_tokens(adata)
    out = []
    for row, pres in zip(tokens, present, strict=True):
        enc = reference_encoding(state, row)
        if pooling == "present":
            keep = [j for j, ok in enumerate(pres) if ok]
        elif pooling == "genes":
            keep = list(range(len(SYMBOLS)))
        else:
            keep = list(range(len(SYMBOLS) + 1))
        out.append(torch.stack([enc[j] for j in keep]).sum(0) / len(keep))
    return torch.stack(out).numpy()


@pytest.fixture
def release(tmp_path):
    return write_release(tmp_path / "scbert")


# --------------------------------------------------------------------------- preprocessing


def test_tokens_match_a_hand_example():
    row = np.array([[0.5, 2, 5, 10, 20, 9962.5]])
    # total 1e4 -> unchanged; log2(1+x) = 0.58, 1.58, 2.58, 3.46, 4.39, 13.3 -> cap 5, truncate
    expected = [0, 1, 2, 3, 4, 5, 0]
    tokens = scbert_tokens(np.vstack([row, row * 3.0]))
    assert tokens.dtype == np.int64
    assert tokens.tolist() == [expected, expected]  # normalisation removes the depth
    assert scbert_tokens(np.array([[1.0, 1.0]])).tolist() == [[5, 5, 0]]  # 5,000 each -> capped


def _values_on_powers_of_two() -> np.ndarray:
    """Rows whose first gene lands on 2^k - 1 after normalisation to 1e4 (up to float32
    rounding of the input), the values where the token's truncation is decided by the
    last bit of the arithmetic."""
    rows = []
    for k in range(1, 6):
        for total in (7.0, 13.0, 37.0, 123.0, 777.0, 3000.0, 12345.0, 99999.0, 1e6 / 3):
            t = np.float32(total)
            first = np.float32((2**k - 1) * float(t) / 1e4)
            rest = t - first
            rows.append([first, rest * 0.3, rest * 0.7])
    return np.asarray(rows, dtype=np.float32)


def _published_arithmetic(values: np.ndarray) -> np.ndarray:
    """scanpy 1.11's float32 steps written out: sequential total, x / (total / 1e4),
    log1p / ln 2; predict.py's cap at 5 and truncation."""
    x = np.asarray(values, dtype=np.float32)
    total = np.zeros(len(x), dtype=np.float32)
    for j in range(x.shape[1]):
        total += x[:, j]
    scaled = x / (total / np.float32(1e4))[:, None]
    logged = (np.log1p(scaled).astype(np.float64) / np.log(2.0)).astype(np.float32)
    return np.minimum(logged, 5).astype(np.int64)


def test_tokens_follow_the_published_arithmetic_at_powers_of_two():
    values = _values_on_powers_of_two()
    got = scbert_tokens(values)[:, :-1]
    np.testing.assert_array_equal(got, _published_arithmetic(values))
    # The old expression x / total * 1e4 (float64) puts some of these one token lower:
    old = np.minimum(
        np.log2(1 + values / values.sum(1, keepdims=True).astype(np.float64) * 1e4), 5
    ).astype(np.int64)
    assert (old != got).any()


def test_tokens_equal_scanpys_normalize_total_and_log1p():
    sc = pytest.importorskip("scanpy", reason="scanpy not installed: the cross-check needs it")
    rng = np.random.default_rng(0)
    random = rng.gamma(0.5, 50.0, size=(40, 300)).astype(np.float32)
    random[rng.random(random.shape) < 0.3] = 0.0
    for values in (_values_on_powers_of_two(), random):
        # The published preprocess.py: a float32 CSR matrix, then the two scanpy calls.
        adata = ad.AnnData(sp.csr_matrix(values))
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata, base=2)
        published = adata.X.toarray()
        published[published > 5] = 5  # predict.py: full_seq[full_seq > CLASS - 2] = CLASS - 2
        expected = torch.from_numpy(published).long().numpy()  # predict.py: .long()
        np.testing.assert_array_equal(scbert_tokens(values)[:, :-1], expected)


def test_tokens_reject_negative_and_empty_rows():
    with pytest.raises(ExpressionValueError, match="negative expression"):
        scbert_tokens(np.array([[1.0, -0.5]]))
    with pytest.raises(ExpressionValueError, match=r"row\(s\) \[1\]"):
        scbert_tokens(np.array([[1.0, 2.0], [0.0, 0.0]]))


# --------------------------------------------------------------------------- embeddings


def test_embedding_matches_naive_reference_and_shapes(release):
    adata = make_data()
    emb = ScbertEmbedder(release, trust_pickle=True)
    out = emb.transform(adata)
    assert out.shape == (adata.n_obs, DIM) and out.dtype == np.float32
    np.testing.assert_allclose(out, naive_embeddings(adata), rtol=1e-4, atol=1e-5)
    assert emb.coverage_["n_found"] == len(SYMBOLS)
    assert emb.coverage_["n_vocabulary"] == len(SYMBOLS)
    assert emb.coverage_["expression"] == "X (TPM)"


@pytest.mark.parametrize("pooling", ["genes", "all"])
def test_other_poolings_match_naive_reference(release, pooling):
    adata = make_data(n=2)
    out = ScbertEmbedder(release, trust_pickle=True, pooling=pooling).transform(adata)
    np.testing.assert_allclose(out, naive_embeddings(adata, pooling), rtol=1e-4, atol=1e-5)


def test_deterministic_and_projections_not_redrawn(release):
    adata = make_data(n=3)
    emb = ScbertEmbedder(release, trust_pickle=True)
    first = emb.transform(adata)
    emb.network.train()  # even in training mode nothing is redrawn
    second = emb.transform(adata)
    np.testing.assert_array_equal(first, second)
    loaded = emb.network.state_dict()
    for key, value in released_state().items():
        if key.endswith("projection_matrix"):
            torch.testing.assert_close(loaded[key], value)


def test_batch_size_invariance(release):
    adata = make_data(n=5)
    one = ScbertEmbedder(release, trust_pickle=True, batch_size=1).transform(adata)
    many = ScbertEmbedder(release, trust_pickle=True, batch_size=4).transform(adata)
    np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-6)
    part = ScbertEmbedder(release, trust_pickle=True).transform(adata[2:4].copy())
    np.testing.assert_allclose(part, one[2:4], rtol=1e-5, atol=1e-6)


def test_counts_layer_used_when_present(release):
    with_layer = make_data(n=2, counts_layer=True)
    plain = make_data(n=2)
    emb = ScbertEmbedder(release, trust_pickle=True)
    out = emb.transform(with_layer)
    assert emb.coverage_["expression"].startswith("layers['counts']")
    np.testing.assert_allclose(out, emb.transform(plain), rtol=1e-5, atol=1e-6)
    from_x = ScbertEmbedder(release, trust_pickle=True, layer=None).transform(with_layer)
    assert not np.allclose(from_x, out, atol=1e-4)


def test_safetensors_and_h5ad_gene_list_give_the_same_result(tmp_path, release):
    folder = write_release(tmp_path / "st", genes=None, fmt="safetensors")
    ref = ad.AnnData(X=np.zeros((1, len(SYMBOLS)), dtype=np.float32))
    ref.var_names = SYMBOLS
    ref.write_h5ad(folder / "panglao_10000.h5ad")
    adata = make_data(n=2)
    np.testing.assert_allclose(
        ScbertEmbedder(folder).transform(adata),
        ScbertEmbedder(release, trust_pickle=True).transform(adata),
        rtol=1e-6,
        atol=1e-7,
    )


def test_registered_under_scbert(release):
    emb = get_embedder("scbert", model_dir=release, trust_pickle=True)
    assert isinstance(emb, ScbertEmbedder)
    assert emb.config()["pooling"] == "present"
    other = get_embedder("scbert", model_dir=release, trust_pickle=True, pooling="genes")
    assert other.fingerprint() != emb.fingerprint()


def test_released_key_layout_matches_performer_pytorch():
    """The hand-written key list equals what the performer lineage builds for scBERT's setup."""
    pp = pytest.importorskip("performer_pytorch")
    lm = pp.PerformerLM(
        num_tokens=NUM_TOKENS,
        max_seq_len=len(SYMBOLS) + 1,
        dim=DIM,
        depth=DEPTH,
        heads=HEADS,
        dim_head=DIM_HEAD,
        nb_features=NB_FEATURES,
        ff_mult=FF // DIM,
        rotary_position_emb=False,  # AbsolutePositionalEmbedding: same pos_emb.emb key
        attn_out_bias=True,  # scBERT's copy always gives to_out a bias
    )
    theirs = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    # performer-pytorch 1.1.x moved the redraw counter into a ProjectionUpdater that also
    # re-registers every layer under proj_updater.instance; scBERT's older copy has neither.
    theirs = {
        k.replace("proj_updater.", ""): v
        for k, v in theirs.items()
        if not k.startswith("performer.proj_updater.instance.")
    }
    ours = {k: tuple(v.shape) for k, v in released_state().items()}
    assert theirs == ours


def test_forward_matches_performer_pytorch_with_scberts_key_max(monkeypatch):
    """The performer lineage's PerformerLM, its key max set to scBERT's global one, gives
    the adapter's encodings; the PyPI kernel (max per head) does not."""
    pp = pytest.importorskip("performer_pytorch")
    import performer_pytorch.performer_pytorch as ppm

    from bulkfm.adapters.scbert_net import ScbertNet, ScbertShape

    def scbert_kernel(data, *, projection_matrix, is_query, eps=EPS, **_):
        c = data.shape[-1] ** -0.25
        dash = torch.einsum("...id,...jd->...ij", c * data, projection_matrix.type_as(data))
        diag = ((data**2).sum(-1) / 2 * c**2).unsqueeze(-1)
        top = dash.amax(-1, keepdim=True) if is_query else dash.max()
        return projection_matrix.shape[0] ** -0.5 * (torch.exp(dash - diag - top) + eps)

    state = released_state()
    lm = pp.PerformerLM(
        num_tokens=NUM_TOKENS,
        max_seq_len=len(SYMBOLS) + 1,
        dim=DIM,
        depth=DEPTH,
        heads=HEADS,
        dim_head=DIM_HEAD,
        nb_features=NB_FEATURES,
        ff_mult=FF // DIM,
        rotary_position_emb=False,
        attn_out_bias=True,
    ).eval()
    theirs = {k: v.float() for k, v in state.items()}
    theirs["performer.proj_updater.calls_since_last_redraw"] = theirs.pop(
        "performer.calls_since_last_redraw"
    )
    for k in [k for k in state if k.startswith("performer.net.")]:
        theirs["performer.proj_updater.instance." + k.removeprefix("performer.net.")] = state[k]
    lm.load_state_dict(theirs)
    net = ScbertNet(ScbertShape.from_state_dict(state)).eval()
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("to_out.")})
    tokens = torch.randint(0, NUM_TOKENS - 1, (1, len(SYMBOLS) + 1))
    with torch.no_grad():
        ours = net(tokens)
        per_head = lm(tokens, return_encodings=True)
        monkeypatch.setattr(ppm, "softmax_kernel", scbert_kernel)
        published = lm(tokens, return_encodings=True)
    torch.testing.assert_close(ours, published, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, per_head, atol=1e-4)


def test_grad_path_equals_in_place_inference_path():
    from bulkfm.adapters.scbert_net import ScbertNet, ScbertShape

    state = released_state()
    net = ScbertNet(ScbertShape.from_state_dict(state)).eval()
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("to_out.")})
    tokens = torch.randint(0, NUM_TOKENS - 1, (2, len(SYMBOLS) + 1))
    with torch.inference_mode():
        fast = net(tokens)
    slow = net(tokens)
    assert slow.requires_grad
    # the in-place path reorders float32 sums: agreement to rounding, not bit for bit
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_missing_key_is_listed(tmp_path):
    state = released_state()
    del state["performer.net.layers.1.1.fn.fn.w2.bias"]
    folder = write_release(tmp_path / "m", state)
    with pytest.raises(CheckpointError, match=r"missing keys \['performer\.net\.layers\.1\.1"):
        ScbertEmbedder(folder, trust_pickle=True).transform(make_data(n=1))


def test_renamed_key_is_listed(tmp_path):
    state = released_state()
    state["performer.net.layers.0.0.fn.to_q.w"] = state.pop(
        "performer.net.layers.0.0.fn.to_k.weight"
    )
    folder = write_release(tmp_path / "r", state)
    with pytest.raises(
        CheckpointError, match=r"unexpected keys \['performer.net.layers.0.0.fn.to_q.w'"
    ):
        ScbertEmbedder(folder, trust_pickle=True).transform(make_data(n=1))


def test_key_needed_for_shapes_is_named(tmp_path):
    state = released_state()
    del state["token_emb.weight"]
    folder = write_release(tmp_path / "t", state)
    with pytest.raises(CheckpointError, match=r"lacks \['token_emb\.weight'\]"):
        ScbertEmbedder(folder, trust_pickle=True).transform(make_data(n=1))


def test_pickle_needs_opt_in(release):
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        ScbertEmbedder(release).transform(make_data(n=1))


def test_low_coverage_fails(release):
    adata = make_data(n=2)
    keep = adata.var["symbol"].isin(["TP53", "EGFR", "EPCAM"]).to_numpy()
    with pytest.raises(GeneMappingError, match="only 2 of the model's 30 genes"):
        ScbertEmbedder(release, trust_pickle=True).transform(adata[:, keep].copy())


def test_missing_gene_list_fails(tmp_path):
    folder = write_release(tmp_path / "g", genes=None)
    with pytest.raises(CheckpointError, match=r"no gene list.*gene_list\.txt.*panglao_10000\.h5ad"):
        ScbertEmbedder(folder, trust_pickle=True).transform(make_data(n=1))


def test_gene_list_length_must_match_checkpoint(tmp_path):
    folder = write_release(tmp_path / "l", state=released_state(), genes=SYMBOLS[:-1])
    with pytest.raises(CheckpointError, match="29 genes but the checkpoint has 31 positions"):
        ScbertEmbedder(folder, trust_pickle=True).transform(make_data(n=1))


def test_missing_checkpoint_file_fails(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "gene_list.txt").write_text("\n".join(SYMBOLS))
    with pytest.raises(CheckpointError, match=r"no checkpoint.*panglao_pretrain\.pth"):
        ScbertEmbedder(folder, trust_pickle=True).transform(make_data(n=1))


def test_path_required_and_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="--model-dir scbert=PATH"):
        ScbertEmbedder()
    with pytest.raises(CheckpointError, match="does not exist"):
        ScbertEmbedder(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pooling": "cls"}, "pooling='cls'"),
        ({"layer": ""}, "layer=''"),
        ({"min_coverage": 1.5}, r"min_coverage must lie in \[0, 1\]"),
        ({"min_coverage": "half"}, r"min_coverage must lie in \[0, 1\], got 'half'"),
    ],
)
def test_bad_options(release, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ScbertEmbedder(release, **kwargs)
