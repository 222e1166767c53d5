"""CellFM adapter: a tiny random model written by the test in the released formats
(MindSpore protobuf .ckpt, safetensors, PyTorch pickle) next to a CellFM-style gene
file; outputs checked against a per-sample reference forward written here from the
published equations, and preprocessing against numbers worked out by hand."""

from __future__ import annotations

import math
import struct
import zlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from bulkfm.adapters.cellfm import (  # noqa: E402
    CellFMEmbedder,
    cellfm_normalise,
    select_genes,
)
from bulkfm.adapters.cellfm_net import (  # noqa: E402
    read_mindspore_checkpoint,
    read_mindspore_entries,
)
from bulkfm.embedders import get_embedder  # noqa: E402
from bulkfm.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    ExpressionValueError,
    GeneMappingError,
)
from tests.adapters.cellfm_files import (  # noqa: E402
    DIMS,
    HEADS,
    SYMBOLS,
    _field,
    _varint,
    make_adata,
    random_weights,
    write_gene_file,
    write_ms_ckpt,
)


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    return random_weights()


@pytest.fixture
def model_dir(tmp_path, weights):
    folder = tmp_path / "cellfm80m"
    folder.mkdir()
    write_ms_ckpt(folder / "CellFM_80M_weight.ckpt", weights, split=("gene_emb",))
    write_gene_file(folder / "expand_gene_info.csv")
    return folder


@pytest.fixture(scope="module")
def ensembl() -> dict[str, str]:
    from bulkfm.data.genes import map_to_ensembl

    ids, _, _ = map_to_ensembl(SYMBOLS, id_type="symbol")
    assert all(i is not None for i in ids)
    return dict(zip(SYMBOLS, ids, strict=True))


# --------------------------------------------------------------------------- reference


def naive_cls(
    w: dict[str, np.ndarray], gene_ids, values, heads=HEADS, *, port: bool = False
) -> np.ndarray:
    """One sample, no padding, float64, written from the published equations.

    ``port``: CellFM-torch's ``encode`` (CLS, ST_emb[0], ST_emb[1], genes; PyTorch's
    LayerNorm epsilon 1e-5 and LeakyReLU slope 0.01; V / sqrt(n - 3 + 1e-6)).
    """
    t = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in w.items()}
    n_layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("encoder."))
    p = "value_enc.value_enc."
    slope, eps = (0.01, 1e-5) if port else (0.2, 1e-7)
    rows = [t["cls_token"].reshape(-1)]
    if port:
        rows += [t["ST_emb"][0, 0], t["ST_emb"][0, 1]]
    for g, v in zip(gene_ids, values, strict=True):
        h = t[p + "w1.weight"][:, 0] * float(v)
        h = torch.where(h >= 0, h, slope * h)
        h = t[p + "w3.weight"] @ h + h * t[p + "a"].item()
        rows.append(t["gene_emb"][int(g)] + t[p + "table.weight"] @ torch.softmax(h, 0))
    x = torch.stack(rows)
    n = len(gene_ids)
    d = x.shape[1]
    dh = d // heads
    alpha = (2 * n_layers) ** 0.25

    def ln(z, g, b):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + eps) * g + b

    for i in range(n_layers):
        e = f"encoder.{i}."
        q, k, v, u = (x @ t[f"{e}attn.{m}_proj.weight"].T for m in "qkvu")
        outs = []
        for h in range(heads):
            s = slice(h * dh, (h + 1) * dh)
            Q = torch.relu(q[:, s]) / math.sqrt(dh)
            K = torch.relu(k[:, s]) / math.sqrt(dh)
            V = v[:, s] / math.sqrt(n - 3 + 1e-6 if port else n)
            ret = Q @ (K.T @ V)
            rms = (ret.norm(dim=-1, keepdim=True) / math.sqrt(dh)).clamp_min(1e-12)
            outs.append(ret / rms * torch.nn.functional.silu(u[:, s]))
        att = torch.cat(outs, 1) @ t[f"{e}attn.o_proj.weight"].T
        x = ln(x * alpha + att, t[f"{e}post_norm1.gamma"], t[f"{e}post_norm1.beta"])
        f = (x @ t[f"{e}ffn.u_proj.weight"].T) * (x @ t[f"{e}ffn.v_proj.weight"].T)
        f = f @ t[f"{e}ffn.o_proj.weight"].T
        x = ln(x * alpha + f, t[f"{e}post_norm2.gamma"], t[f"{e}post_norm2.beta"])
    return x[0].numpy()


# --------------------------------------------------------------------------- checkpoint


def test_reader_returns_released_tensors_by_name(model_dir, weights):
    state = read_mindspore_checkpoint(model_dir / "CellFM_80M_weight.ckpt")
    assert set(state) == set(weights)
    for name, arr in weights.items():
        np.testing.assert_array_equal(state[name].numpy(), arr)  # incl. the two-chunk gene_emb
    kept = read_mindspore_checkpoint(
        model_dir / "CellFM_80M_weight.ckpt", keep=lambda k: not k.startswith("moment")
    )
    assert "moment1.gene_emb" not in kept and "gene_emb" in kept


def _tensor_entry(name: str, dtype: str, dims: tuple[int, ...], content: bytes) -> bytes:
    proto = b"".join(_varint(1 << 3 | 0) + _varint(d) for d in dims)
    proto += _field(2, dtype.encode()) + _field(3, content)
    return _field(1, _field(1, name.encode()) + _field(2, proto))


def _with_crc(payload: bytes) -> bytes:
    """MindSpore's crc_check=True trailer: b"crc_num" + 10-byte big-endian CRC-32."""
    return payload + b"crc_num" + zlib.crc32(payload).to_bytes(10, "big")


def test_crc_trailer_is_verified(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    payload = _tensor_entry("w", "Float32", (2, 3), arr.tobytes())
    good = tmp_path / "crc.ckpt"
    good.write_bytes(_with_crc(payload))
    np.testing.assert_array_equal(read_mindspore_checkpoint(good)["w"].numpy(), arr)
    # One flipped bit in a tensor value: the stored CRC no longer matches.
    damaged = bytearray(good.read_bytes())
    damaged[len(payload) - 3] ^= 0x01
    bad = tmp_path / "damaged.ckpt"
    bad.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=r"CRC-32 .* does not match"):
        read_mindspore_checkpoint(bad)


def test_append_dict_strings_are_returned_apart(tmp_path):
    text = "epoch 3, naïve"
    raw = np.array(text).tobytes()  # numpy <U text, as MindSpore stores it
    payload = _tensor_entry("w", "Float32", (1,), np.float32(2.5).tobytes())
    payload += _tensor_entry("note", "str", (0,), raw)
    payload += _tensor_entry("step", "Int64", (0,), np.int64(7).tobytes())  # dims [0]: scalar
    (tmp_path / "s.ckpt").write_bytes(_with_crc(payload))
    tensors, strings = read_mindspore_entries(tmp_path / "s.ckpt")
    assert strings == {"note": text}
    assert set(tensors) == {"w", "step"} and tensors["step"].shape == () and tensors["step"] == 7
    assert set(read_mindspore_checkpoint(tmp_path / "s.ckpt")) == {"w", "step"}


def test_bfloat16_tensors_are_read_exactly(tmp_path):
    values = torch.tensor([1.5, -2.25, 3.0e-3, 65280.0], dtype=torch.bfloat16)
    raw = values.view(torch.int16).numpy().astype("<i2").tobytes()
    (tmp_path / "b.ckpt").write_bytes(_tensor_entry("w", "BFloat16", (2, 2), raw))
    got = read_mindspore_checkpoint(tmp_path / "b.ckpt")["w"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, values.reshape(2, 2))


def test_unknown_tensor_type_names_the_readable_ones(tmp_path):
    (tmp_path / "q.ckpt").write_bytes(_tensor_entry("w", "Int4", (2,), b"\0"))
    with pytest.raises(CheckpointError, match=r"unsupported type 'Int4'.*BFloat16"):
        read_mindspore_checkpoint(tmp_path / "q.ckpt")


def test_not_a_checkpoint_fails(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")
    with pytest.raises(CheckpointError, match="not a readable MindSpore checkpoint"):
        read_mindspore_checkpoint(bad)


def test_hostile_lengths_cannot_inflate_memory(tmp_path):
    """An entry claiming more bytes than its message holds is refused before any copy."""
    tensor = _varint(1 << 3 | 0) + _varint(4) + _field(2, b"Float32")
    tensor += _varint(3 << 3 | 2) + _varint(10**9) + b"\0" * 16  # claims 1 GB, holds 16 B
    bad = tmp_path / "lying.ckpt"
    bad.write_bytes(_field(1, _field(1, b"w") + _field(2, tensor)) * 50)
    with pytest.raises(CheckpointError, match="runs past the end of its message"):
        read_mindspore_checkpoint(bad)
    # a well-formed field whose size disagrees with its shape is refused as well
    short = _varint(1 << 3 | 0) + _varint(4) + _field(2, b"Float32") + _field(3, b"\0" * 8)
    bad.write_bytes(_field(1, _field(1, b"w") + _field(2, short)))
    with pytest.raises(CheckpointError, match="8 bytes for shape"):
        read_mindspore_checkpoint(bad)


def test_missing_key_fails_listing_it(tmp_path, weights):
    del weights["encoder.1.attn.q_proj.weight"]
    write_ms_ckpt(tmp_path / "CellFM_80M_weight.ckpt", weights)
    write_gene_file(tmp_path / "expand_gene_info.csv")
    emb = CellFMEmbedder(tmp_path, num_heads=HEADS)
    with pytest.raises(CheckpointError, match=r"missing keys \['encoder\.1\.attn\.q_proj"):
        emb.load()


def test_renamed_key_fails_listing_both_names(tmp_path, weights):
    weights["encoder.0.post_norm1.weight"] = weights.pop("encoder.0.post_norm1.gamma")
    write_ms_ckpt(tmp_path / "CellFM_80M_weight.ckpt", weights)
    write_gene_file(tmp_path / "expand_gene_info.csv")
    pattern = r"(?s)missing.*post_norm1\.gamma.*unexpected.*post_norm1\.weight"
    with pytest.raises(CheckpointError, match=pattern):
        CellFMEmbedder(tmp_path, num_heads=HEADS).load()


def test_gene_file_not_matching_the_weights_fails(tmp_path, weights):
    write_ms_ckpt(tmp_path / "CellFM_80M_weight.ckpt", weights)
    write_gene_file(tmp_path / "expand_gene_info.csv", SYMBOLS + [f"G{i}" for i in range(9)])
    with pytest.raises(CheckpointError, match="gene file lists 31 genes"):
        CellFMEmbedder(tmp_path, num_heads=HEADS).load()


def test_pickle_needs_opt_in_and_then_matches(tmp_path, model_dir, weights, ensembl):
    folder = tmp_path / "port"
    folder.mkdir()
    # The PyTorch port's names: LayerNorm gamma/beta -> weight/bias.
    port = {
        k.replace(".gamma", ".weight").replace(".beta", ".bias"): torch.from_numpy(v)
        for k, v in weights.items()
    }
    torch.save(port, folder / "cellfm.pt")
    write_gene_file(folder / "expand_gene_info.csv")
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        CellFMEmbedder(folder, num_heads=HEADS).load()
    adata = make_adata(ensembl)
    got = CellFMEmbedder(folder, num_heads=HEADS, trust_pickle=True).transform(adata)
    ref = CellFMEmbedder(model_dir, num_heads=HEADS).transform(adata)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_safetensors_with_release_names_matches(tmp_path, model_dir, weights, ensembl):
    from safetensors.numpy import save_file

    folder = tmp_path / "st"
    folder.mkdir()
    save_file(
        {k: np.ascontiguousarray(v) for k, v in weights.items()}, folder / "model.safetensors"
    )
    write_gene_file(folder / "expand_gene_info.csv")
    adata = make_adata(ensembl)
    got = CellFMEmbedder(folder, num_heads=HEADS).transform(adata)
    ref = CellFMEmbedder(model_dir, num_heads=HEADS).transform(adata)
    np.testing.assert_array_equal(got, ref)


def test_missing_path_fails(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CellFMEmbedder(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="needs the released weights"):
        CellFMEmbedder(None)


def test_folder_without_gene_file_fails(tmp_path, weights, ensembl):
    write_ms_ckpt(tmp_path / "CellFM_80M_weight.ckpt", weights)
    with pytest.raises(CheckpointError, match="no gene file"):
        CellFMEmbedder(tmp_path, num_heads=HEADS).transform(make_adata(ensembl))


# --------------------------------------------------------------------------- preprocessing


def test_normalise_by_hand():
    # Vocabulary genes 300000, 100000, 0, 50 (+ 99950 outside the vocabulary): total 5e5.
    values = np.array([[300000.0, 100000.0, 0.0, 50.0]], dtype=np.float32)
    present = np.array([[True, True, True, True]])
    counts, norm = cellfm_normalise(values, present, np.array([500000.0]), depth_cap=1e5)
    # Cap: divide by max(1, 5e5 / 1e5) = 5 and round -> 60000, 20000, 0, 10; T = 80010.
    np.testing.assert_array_equal(counts, [[60000, 20000, 0, 10]])
    expected = [math.log1p(60000 / 80010 * 1e4), math.log1p(20000 / 80010 * 1e4), 0.0]
    expected.append(math.log1p(10 / 80010 * 1e4))
    np.testing.assert_allclose(norm[0], expected, rtol=1e-6)
    # Without the cap: T = 400050 over vocabulary genes.
    _, raw = cellfm_normalise(values, present, np.array([500000.0]), depth_cap=None)
    np.testing.assert_allclose(raw[0, 0], math.log1p(300000 / 400050 * 1e4), rtol=1e-6)
    # A sample already below the cap is only rounded (max(1, .) = 1).
    small = np.array([[2.4, 2.6]])
    c2, _ = cellfm_normalise(small, np.ones((1, 2), bool), np.array([5.0]), depth_cap=1e5)
    np.testing.assert_array_equal(c2, [[2, 3]])


def test_selection_top_and_published_sample():
    counts = np.array([0, 5, 9, 9, 1, 0, 7], dtype=np.float32)
    raw = np.array([0, 5.1, 9.0, 9.2, 1.0, 0, 7.0], dtype=np.float32)
    assert select_genes(counts, raw, max_genes=None, mode="top").tolist() == [1, 2, 3, 4, 6]
    assert select_genes(counts, raw, max_genes=3, mode="top").tolist() == [2, 3, 6]
    draws = [
        select_genes(counts, raw, max_genes=3, mode="random", rng=np.random.default_rng(s))
        for s in range(200)
    ]
    assert all(len(d) == 3 and set(d) <= {1, 2, 3, 4, 6} for d in draws)
    assert all((np.diff(d) > 0).all() for d in draws)
    freq = {g: sum(g in d for d in draws) / len(draws) for g in (2, 4)}
    assert freq[2] > freq[4]  # weight log1p(9) vs log1p(1)
    assert len({tuple(d) for d in draws}) > 1


def test_tokens_by_hand(model_dir, ensembl):
    adata = make_adata(ensembl, n=2)
    adata.X[0] = 0
    col = {g: j for j, g in enumerate(adata.var_names)}
    adata.X[0, col[ensembl["GAPDH"]]] = 300
    adata.X[0, col[ensembl["TP53"]]] = 100
    adata.X[0, col["ENSG00000000003"]] = 600  # outside the vocabulary: not in T
    emb = CellFMEmbedder(model_dir, num_heads=HEADS)
    ids, vals, report = emb.tokens(adata, slice(0, 1), None)
    assert ids[0].tolist() == [1, 2]  # TP53, GAPDH: 1-based, vocabulary order
    expected = [math.log1p(100 / 400 * 1e4), math.log1p(300 / 400 * 1e4)]
    np.testing.assert_allclose(vals[0], expected, rtol=1e-6)
    assert report["n_vocabulary"] == len(SYMBOLS)
    assert report["n_found"] == len(SYMBOLS) - 1  # KIT absent from the data


def test_counts_layer_preferred_over_tpm(model_dir, ensembl):
    counts = make_adata(ensembl)
    both = counts.copy()
    both.layers["counts"] = both.X.copy()
    both.X = both.X / both.X.sum(axis=1, keepdims=True) * 1e6 + 3.0  # differs from counts
    emb = CellFMEmbedder(model_dir, num_heads=HEADS)
    got = emb.transform(both)
    assert emb.coverage_["input"] == "counts"
    ref = CellFMEmbedder(model_dir, num_heads=HEADS).transform(counts)
    np.testing.assert_array_equal(got, ref)
    tpm = CellFMEmbedder(model_dir, num_heads=HEADS, layer="X").transform(both)
    assert not np.allclose(tpm, ref)


def test_negative_values_fail(model_dir, ensembl):
    adata = make_adata(ensembl)
    adata.X[0, 0] = -1.0
    with pytest.raises(ExpressionValueError, match="negative expression"):
        CellFMEmbedder(model_dir, num_heads=HEADS).transform(adata)


def test_sample_without_expressed_model_genes_fails(model_dir, ensembl):
    adata = make_adata(ensembl)
    adata.X[2, : len(SYMBOLS) - 1] = 0.0  # only the two non-vocabulary genes left
    with pytest.raises(ExpressionValueError, match=r"1 samples \(rows \[2\]\) have no expression"):
        CellFMEmbedder(model_dir, num_heads=HEADS).transform(adata)


def test_low_coverage_fails(model_dir):
    adata = ad.AnnData(
        X=np.ones((2, 3), np.float32),
        var=pd.DataFrame(index=["ENSG00000000003", "ENSG00000000005", "ENSG00000000419"]),
    )
    with pytest.raises(GeneMappingError, match="only 0 of the model's 22 genes"):
        CellFMEmbedder(model_dir, num_heads=HEADS).transform(adata)


def test_bad_options_fail(model_dir):
    with pytest.raises(ConfigError, match="gene_selection"):
        CellFMEmbedder(model_dir, gene_selection="sample")
    with pytest.raises(ConfigError, match="depth_cap"):
        CellFMEmbedder(model_dir, depth_cap=0)
    with pytest.raises(ConfigError, match="max_genes"):
        CellFMEmbedder(model_dir, max_genes=0)


# --------------------------------------------------------------------------- embedding


def test_cls_matches_naive_forward_per_sample(model_dir, weights, ensembl):
    adata = make_adata(ensembl)
    emb = CellFMEmbedder(model_dir, num_heads=HEADS, batch_size=5)
    got = emb.transform(adata)
    assert got.shape == (adata.n_obs, DIMS)
    ids, vals, _ = emb.tokens(adata, slice(0, adata.n_obs), None)
    assert len(ids[1]) == 3 and len(ids[0]) > 10  # padding really happens in the batch
    for i in range(adata.n_obs):
        np.testing.assert_allclose(got[i], naive_cls(weights, ids[i], vals[i]), atol=2e-5)


def _port_release(tmp_path, weights, seed: int = 5):
    rng = np.random.default_rng(seed)
    w = {**weights, "ST_emb": (0.5 * rng.standard_normal((1, 2, DIMS))).astype(np.float32)}
    folder = tmp_path / "with_st"
    folder.mkdir()
    write_ms_ckpt(folder / "CellFM_80M_weight.ckpt", w)
    write_gene_file(folder / "expand_gene_info.csv")
    return folder, w


def test_pytorch_port_matches_naive_forward_and_differs_from_mindspore(tmp_path, weights, ensembl):
    folder, w = _port_release(tmp_path, weights)
    adata = make_adata(ensembl, drop=("KIT",))
    adata = adata[[0, 2, 3, 4]].copy()  # the port needs more than 3 genes per sample
    emb = CellFMEmbedder(folder, num_heads=HEADS, implementation="pytorch_port", batch_size=3)
    got = emb.transform(adata)
    ids, vals, _ = emb.tokens(adata, slice(0, adata.n_obs), None)
    for i in range(adata.n_obs):
        ref = naive_cls(w, ids[i], vals[i], port=True)
        np.testing.assert_allclose(got[i], ref, atol=2e-5)
    assert emb.coverage_["implementation"] == "pytorch_port"
    default = CellFMEmbedder(folder, num_heads=HEADS)
    assert np.abs(default.transform(adata) - got).max() > 1e-2  # the two paths really differ
    assert default.fingerprint() != emb.fingerprint()
    one = CellFMEmbedder(folder, num_heads=HEADS, implementation="pytorch_port", batch_size=1)
    np.testing.assert_allclose(one.transform(adata), got, atol=1e-5)


def test_pytorch_port_needs_st_emb_and_enough_genes(tmp_path, model_dir, weights, ensembl):
    with pytest.raises(CheckpointError, match="no ST_emb tensor"):
        CellFMEmbedder(model_dir, num_heads=HEADS, implementation="pytorch_port").load()
    folder, _ = _port_release(tmp_path, weights)
    emb = CellFMEmbedder(folder, num_heads=HEADS, implementation="pytorch_port")
    with pytest.raises(ExpressionValueError, match="3 or fewer expressed genes"):
        emb.transform(make_adata(ensembl))  # sample 1 has three genes
    with pytest.raises(ConfigError, match="implementation='torch'"):
        CellFMEmbedder(folder, implementation="torch")


def test_deterministic_and_batch_size_invariant(model_dir, ensembl):
    adata = make_adata(ensembl, n=6)
    a = CellFMEmbedder(model_dir, num_heads=HEADS, batch_size=6).transform(adata)
    b = CellFMEmbedder(model_dir, num_heads=HEADS, batch_size=1).transform(adata)
    c = CellFMEmbedder(model_dir, num_heads=HEADS, batch_size=4).transform(adata)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)
    again = CellFMEmbedder(model_dir, num_heads=HEADS, batch_size=6).transform(adata)
    np.testing.assert_array_equal(a, again)
    assert np.isfinite(a).all() and np.abs(a[0] - a[2]).max() > 1e-3


def test_max_genes_truncates_and_sample_mode_is_seeded(model_dir, ensembl):
    adata = make_adata(ensembl)
    top = CellFMEmbedder(model_dir, num_heads=HEADS, max_genes=4)
    out = top.transform(adata)
    assert top.coverage_["n_samples_truncated"] >= 3
    full = CellFMEmbedder(model_dir, num_heads=HEADS, max_genes=None).transform(adata)
    np.testing.assert_allclose(out[1], full[1], atol=1e-6)  # sample 1 has only 3 genes
    assert not np.allclose(out[0], full[0])
    s0 = CellFMEmbedder(model_dir, num_heads=HEADS, max_genes=4, gene_selection="random")
    again = CellFMEmbedder(model_dir, num_heads=HEADS, max_genes=4, gene_selection="random")
    np.testing.assert_array_equal(s0.transform(adata), again.transform(adata))
    # Per sample id, not per row: reversing the rows reverses the output.
    rev = again.transform(adata[::-1].copy())
    np.testing.assert_allclose(rev[::-1], s0.transform(adata), atol=1e-5)
    assert s0.fingerprint() != top.fingerprint()


def test_registered(model_dir):
    emb = get_embedder("cellfm", model_dir=str(model_dir), num_heads=HEADS)
    assert isinstance(emb, CellFMEmbedder)


def test_mindspore_dims_may_be_packed(tmp_path):
    # proto3-style packed dims must read the same as proto2's unpacked ones.
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    dims = _field(1, _varint(2) + _varint(3))
    proto = dims + _field(2, b"Float32") + _field(3, arr.tobytes())
    (tmp_path / "p.ckpt").write_bytes(_field(1, _field(1, b"t") + _field(2, proto)))
    got = read_mindspore_checkpoint(tmp_path / "p.ckpt")["t"].numpy()
    np.testing.assert_array_equal(got, arr)
    assert struct.pack("<f", 5.0) == arr.tobytes()[-4:]
