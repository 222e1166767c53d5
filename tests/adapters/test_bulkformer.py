"""BulkFormer adapter, superseded epoch-29 release: a tiny random model in its file layout.

The checkpoint's key names are spelled out here from the authors' module layout (and
performer_pytorch's own key names), not taken from the adapter, and the forward pass
is checked against a naive per-sample reference with a dense graph matrix built the
way the release builds its SparseTensor.
"""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
performer_pytorch = pytest.importorskip("performer_pytorch")
pytest.importorskip("torch_geometric")

from bulkfm.adapters.bulkformer import BulkFormerEmbedder  # noqa: E402
from bulkfm.embedders import get_embedder  # noqa: E402
from bulkfm.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    ExpressionValueError,
    GeneMappingError,
)
from tests.adapters.bulkformer_files import add_performer_state  # noqa: E402

N_GENES, DIM, FEAT, HEADS = 30, 16, 8, 2
GENES = [f"ENSG{i:011d}" for i in range(N_GENES)]


# --------------------------------------------------------------------------- the release


def _performer() -> torch.nn.Module:
    return performer_pytorch.Performer(dim=DIM, depth=1, heads=HEADS, dim_head=DIM // HEADS)


def released_state(*, gb_repeat: int = 2, p_repeat: int = 1, bins: int = 0) -> dict:
    """Random tensors under the released key names (as saved by DataParallel)."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # the Performer projection matrices
    s: dict[str, torch.Tensor] = {}

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def linear(name: str, d_in: int, d_out: int) -> None:
        s[f"{name}.weight"] = rand(d_out, d_in, scale=1 / math.sqrt(d_in))
        s[f"{name}.bias"] = rand(d_out, scale=0.1)

    def norm(name: str) -> None:
        s[f"{name}.weight"] = 1 + rand(DIM, scale=0.1)
        s[f"{name}.bias"] = rand(DIM, scale=0.1)

    def performer(prefix: str) -> None:
        add_performer_state(s, prefix, _performer().state_dict(), rand)

    s["gene_emb"] = rand(N_GENES, FEAT, scale=1.0)
    linear("gene_emb_proj.0", FEAT, 4 * DIM)
    linear("gene_emb_proj.2", 4 * DIM, DIM)
    s["expr_emb.inv_freq"] = 1.0 / (100 ** (torch.arange(0, DIM, 2).float() / DIM))
    linear("x_proj.0", DIM, 4 * DIM)
    linear("x_proj.2", 4 * DIM, DIM)
    for i in range(gb_repeat):
        p = f"gb_formers.{i}."
        s[p + "g.lin.weight"] = rand(DIM, DIM, scale=1 / math.sqrt(DIM))
        s[p + "g.bias"] = rand(DIM, scale=0.1)
        linear(p + "which_b.0", DIM, 1)
        for k in range(bins):
            performer(f"{p}b.{k}.")
        for j in range(p_repeat):
            performer(f"{p}f.{j}.")
        norm(p + "layernorm")
    norm("layernorm")
    linear("ae_enc.0", N_GENES, 4 * DIM)
    linear("ae_enc.2", 4 * DIM, DIM)
    linear("head.0", DIM, 4 * DIM)
    linear("head.2", 4 * DIM, 1)
    return {"module." + k: v for k, v in s.items()}


def released_graph() -> tuple[torch.Tensor, torch.Tensor]:
    """A directed, weighted gene graph with a gene that has no edges (degree 0)."""
    rng = np.random.default_rng(3)
    src = rng.integers(0, N_GENES - 1, 80)
    dst = rng.integers(0, N_GENES - 1, 80)
    edges = torch.as_tensor(np.stack([src, dst]), dtype=torch.long)
    return edges, torch.as_tensor(rng.uniform(0.1, 1.0, 80), dtype=torch.float32)


def write_release(
    folder: Path, *, state: dict | None = None, layout: str = "flat", fmt: str = "pt"
) -> Path:
    """The release's files under their released names (``repo`` = model/ and data/)."""
    model_dir = folder / "model" if layout == "repo" else folder
    data_dir = folder / "data" if layout == "repo" else folder
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    state = released_state() if state is None else state
    edges, weights = released_graph()
    high_var = torch.tensor([1, 4, 7, 20, 29])
    if fmt == "pt":
        torch.save(state, model_dir / "Bulkformer_ckpt_epoch_29.pt")
        torch.save(edges, data_dir / "G_gtex.pt")
        torch.save(weights, data_dir / "G_gtex_weight.pt")
        torch.save(high_var.tolist(), data_dir / "high_var_gene_list.pt")
    else:
        from safetensors.torch import save_file

        # safetensors refuses shared tensors: keep one name of each Performer pair.
        single = {k: v.contiguous() for k, v in state.items() if ".proj_updater.instance." not in k}
        save_file(single, str(model_dir / "Bulkformer_ckpt_epoch_29.safetensors"))
        save_file({"edge_index": edges}, str(data_dir / "G_gtex.safetensors"))
        save_file({"weight": weights}, str(data_dir / "G_gtex_weight.safetensors"))
        save_file({"idx": high_var}, str(data_dir / "high_var_gene_list.safetensors"))
    torch.save(torch.randn(N_GENES, FEAT), data_dir / "esm2_feature_concat.pt")
    pd.DataFrame(
        {
            "gene_symbol": [f"G{i}" for i in range(N_GENES)],
            "ensg_id": GENES,
            "gene_type": "protein_coding",
        }
    ).to_csv(data_dir / "bulkformer_gene_info.csv", index=False)
    return folder


# --------------------------------------------------------------------------- reference


def _mlp(st: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ st[f"{name}.0.weight"].T + st[f"{name}.0.bias"])
    return h @ st[f"{name}.2.weight"].T + st[f"{name}.2.bias"]


def _ln(st: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, (DIM,), st[f"{name}.weight"], st[f"{name}.bias"])


def _run_performer(st: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    perf = _performer()
    perf.load_state_dict({k[len(prefix) :]: v for k, v in st.items() if k.startswith(prefix)})
    return perf.eval()(x[None])[0]


def reference_hidden(state: dict, x: torch.Tensor, *, bins: int = 0) -> torch.Tensor:
    """Per-gene states of one sample ([genes] log1p TPM, -10 masked), computed naively."""
    st = {k.removeprefix("module."): v for k, v in state.items()}
    phase = x[:, None] * st["expr_emb.inv_freq"][None, :]
    value = torch.cat([phase.sin(), phase.cos()], dim=1)
    value[x == -10] = 0.0
    h = value + _mlp(st, "gene_emb_proj", st["gene_emb"]) + _mlp(st, "ae_enc", x[None])
    h = _mlp(st, "x_proj", h)
    # The release: SparseTensor(row=G[1], col=G[0], value=w).t() -> entry (G[0], G[1]);
    # GCNConv(add_self_loops=False) then uses D^-1/2 A D^-1/2 with D = row sums.
    edges, weights = released_graph()
    adj = torch.zeros(N_GENES, N_GENES)
    for k in range(edges.shape[1]):
        adj[edges[0, k], edges[1, k]] += weights[k]
    deg = adj.sum(1)
    dis = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
    norm_adj = dis[:, None] * adj * dis[None, :]
    n_blocks = len({k.split(".")[1] for k in st if k.startswith("gb_formers.")})
    for i in range(n_blocks):
        p = f"gb_formers.{i}."
        h = _ln(st, p + "layernorm", h)
        h = h + norm_adj @ (h @ st[p + "g.lin.weight"].T) + st[p + "g.bias"]
        if bins:
            score = (h @ st[p + "which_b.0.weight"].T + st[p + "which_b.0.bias"])[:, 0]
            order = torch.sort(score, descending=True)[1]
            size = (N_GENES - 1) // bins + 1
            out = torch.empty_like(h)
            for k in range(bins):
                idx = order[k * size : (k + 1) * size]
                out[idx] = _run_performer(st, f"{p}b.{k}.", h[idx])
            h = out
        j = 0
        while f"{p}f.{j}.proj_updater.calls_since_last_redraw" in st:
            h = _run_performer(st, f"{p}f.{j}.", h)
            j += 1
    return _ln(st, "layernorm", h)


# --------------------------------------------------------------------------- data


def make_adata(n: int = 5, *, genes: list[str] | None = None, seed: int = 0) -> ad.AnnData:
    """TPM for most vocabulary genes (shuffled, plus genes the model does not know)."""
    rng = np.random.default_rng(seed)
    genes = genes if genes is not None else [*GENES[2:][::-1], "ENSG99999999991", "ENSG99999999992"]
    X = rng.lognormal(1.0, 1.5, size=(n, len(genes))).astype(np.float32)
    X[rng.random(X.shape) < 0.2] = 0.0
    adata = ad.AnnData(X=X)
    adata.var_names = genes
    adata.obs_names = [f"s{i}" for i in range(n)]
    missing = np.zeros(X.shape, dtype=bool)
    if len(genes) > 10:
        missing[0, 3] = True
        missing[-1, 10] = True
    adata.layers["missing"] = sp.csr_matrix(missing)
    return adata


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_release(tmp_path_factory.mktemp("bulkformer"))


def embedder(path: Path, **kw) -> BulkFormerEmbedder:
    return BulkFormerEmbedder(path, trust_pickle=True, **kw)


# --------------------------------------------------------------------------- tests


def test_forward_matches_naive_reference(release: Path) -> None:
    emb = embedder(release)
    adata = make_adata(3)
    values, _, _ = emb.model_input(adata)
    state = released_state()
    with torch.inference_mode():
        hidden = emb.network(torch.as_tensor(values))
    assert hidden.shape == (3, N_GENES, DIM)
    for i in range(3):
        ref = reference_hidden(state, torch.as_tensor(values[i]))
        torch.testing.assert_close(hidden[i], ref, atol=2e-5, rtol=1e-4)


def test_gene_bins_match_naive_reference(tmp_path: Path) -> None:
    state = released_state(gb_repeat=1, bins=3)
    emb = embedder(write_release(tmp_path, state=state))
    values, _, _ = emb.model_input(make_adata(2))
    with torch.inference_mode():
        hidden = emb.network(torch.as_tensor(values))
    assert emb.network.config.bins == 3
    for i in range(2):
        ref = reference_hidden(state, torch.as_tensor(values[i]), bins=3)
        torch.testing.assert_close(hidden[i], ref, atol=2e-5, rtol=1e-4)


def test_preprocessing_by_hand(release: Path) -> None:
    # Vocabulary genes 0..3 in a different order, one flagged missing, one unknown gene.
    adata = ad.AnnData(X=np.array([[math.e - 1, 0.0, 3.0, 5.0, 7.0]], dtype=np.float32))
    adata.var_names = [GENES[2], GENES[0], GENES[1], "ENSG99999999999", GENES[3]]
    missing = np.zeros((1, 5), dtype=bool)
    missing[0, 2] = True  # GENES[1] absent from this sample's source file
    adata.layers["missing"] = sp.csr_matrix(missing)
    values, present, report = embedder(release, min_coverage=0.0).model_input(adata)
    expected = np.full(N_GENES, -10.0, dtype=np.float32)
    expected[0] = 0.0  # log1p(0)
    expected[2] = 1.0  # log1p(e - 1)
    expected[3] = np.float32(2.0794415)  # log(8) = log1p(7)
    np.testing.assert_allclose(values[0], expected, rtol=1e-6)
    assert present[0].tolist() == [True, False, True, True] + [False] * (N_GENES - 4)
    assert report["n_found"] == 4 and report["n_vocabulary"] == N_GENES


@pytest.mark.parametrize("pooling", ["mean", "max", "median", "all"])
@pytest.mark.parametrize("gene_set", ["present", "high_var", "all"])
def test_pooling_matches_naive_loop(release: Path, pooling: str, gene_set: str) -> None:
    emb = embedder(release, pooling=pooling, gene_set=gene_set)
    adata = make_adata(4)
    out = emb.transform(adata)
    values, _, _ = emb.model_input(adata)
    with torch.inference_mode():
        hidden = emb.network(torch.as_tensor(values)).numpy()
    for i in range(4):
        if gene_set == "present":
            rows = [g for g in range(N_GENES) if values[i, g] != -10.0]
        elif gene_set == "high_var":
            rows = [1, 4, 7, 20, 29]  # the release's list, masked genes included
        else:
            rows = list(range(N_GENES))
        sel = hidden[i][rows]
        stats = {"mean": sel.mean(0), "max": sel.max(0), "median": np.median(sel, axis=0)}
        want = sum(stats.values()) if pooling == "all" else stats[pooling]
        np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-5)
    assert out.shape == (4, DIM) and np.isfinite(out).all()


def test_present_pooling_ignores_masked_genes(release: Path) -> None:
    adata = make_adata(3)
    present = embedder(release).transform(adata)
    everything = embedder(release, gene_set="all").transform(adata)
    assert not np.allclose(present, everything)  # the option does change the output


def test_deterministic_and_batch_size_invariant(release: Path) -> None:
    adata = make_adata(5)
    one = embedder(release, batch_size=1).transform(adata)
    again = embedder(release, batch_size=1).transform(adata)
    four = embedder(release, batch_size=4).transform(adata)
    np.testing.assert_array_equal(one, again)
    np.testing.assert_allclose(one, four, rtol=1e-5, atol=1e-6)
    # A sample's embedding does not depend on the other samples.
    alone = embedder(release).transform(adata[2:3].copy())
    np.testing.assert_allclose(alone[0], one[2], rtol=1e-5, atol=1e-6)


def test_coverage_report(release: Path) -> None:
    emb = embedder(release)
    emb.transform(make_adata(2))
    cov = emb.coverage_
    assert cov["n_vocabulary"] == N_GENES and cov["n_found"] == N_GENES - 2
    assert cov["missing_value"] == -10.0 and cov["examples_missing"] == GENES[:2]
    assert emb.describe()["coverage"]["n_found"] == N_GENES - 2


def test_registry_and_repo_layout(tmp_path: Path, release: Path) -> None:
    write_release(tmp_path, layout="repo")
    emb = get_embedder("bulkformer", model_dir=tmp_path, trust_pickle=True)
    assert isinstance(emb, BulkFormerEmbedder)
    adata = make_adata(2)
    np.testing.assert_allclose(
        emb.transform(adata), embedder(release).transform(adata), rtol=1e-6, atol=1e-6
    )
    # The checkpoint file itself may be passed; the other files are found beside it.
    by_file = embedder(tmp_path / "model" / "Bulkformer_ckpt_epoch_29.pt")
    np.testing.assert_allclose(by_file.transform(adata), emb.transform(adata), atol=1e-6)


def test_safetensors_release_needs_no_pickle(tmp_path: Path, release: Path) -> None:
    write_release(tmp_path, fmt="safetensors")
    adata = make_adata(2)
    out = BulkFormerEmbedder(tmp_path, gene_set="high_var").transform(adata)
    ref = embedder(release, gene_set="high_var").transform(adata)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_fingerprint_follows_options_and_files(tmp_path: Path, release: Path) -> None:
    a = embedder(release).fingerprint()
    assert a == embedder(release).fingerprint()
    assert a != embedder(release, pooling="max").fingerprint()
    assert a != embedder(release, layer="counts").fingerprint()
    assert a != embedder(release, min_coverage=0.5).fingerprint()
    state = released_state()
    state["module.head.2.bias"] = state["module.head.2.bias"] + 1
    assert a != embedder(write_release(tmp_path, state=state)).fingerprint()


def test_high_var_list_as_indices_or_as_a_01_mask(release: Path) -> None:
    by_index = embedder(release, gene_set="high_var").gene_list_mask()
    assert np.flatnonzero(by_index).tolist() == [1, 4, 7, 20, 29]
    mask01 = np.zeros(N_GENES, dtype=np.int64)
    mask01[[1, 4, 7, 20, 29]] = 1
    torch.save(mask01.tolist(), release / "high_var_gene_list.pt")
    as_mask = embedder(release, gene_set="high_var").gene_list_mask()
    np.testing.assert_array_equal(as_mask, by_index)


# --------------------------------------------------------------------------- bad input


def test_renamed_key_is_listed(tmp_path: Path) -> None:
    state = released_state()
    state["module.gb_formers.1.g.weight"] = state.pop("module.gb_formers.1.g.lin.weight")
    with pytest.raises(CheckpointError, match=r"missing keys \['gb_formers\.1\.g\.lin\.weight'\]"):
        embedder(write_release(tmp_path, state=state)).transform(make_adata(1))


def test_unexpected_key_is_listed(tmp_path: Path) -> None:
    state = released_state()
    state["module.decoder.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['decoder\.weight'\]"):
        embedder(write_release(tmp_path, state=state)).load()


def test_not_a_bulkformer_checkpoint(tmp_path: Path) -> None:
    state = released_state()
    del state["module.ae_enc.0.weight"]
    with pytest.raises(CheckpointError, match=r"lacks \['ae_enc\.0\.weight'\]"):
        embedder(write_release(tmp_path, state=state)).load()


@pytest.mark.parametrize(
    "name", ["G_gtex_weight.pt", "bulkformer_gene_info.csv", "Bulkformer_ckpt_epoch_29.pt"]
)
def test_missing_release_file_is_named(tmp_path: Path, name: str) -> None:
    write_release(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(CheckpointError, match=rf"{name.split('.')[0]}.*Zenodo"):
        embedder(tmp_path).transform(make_adata(1))


def test_high_var_file_needed_only_for_published_pooling(tmp_path: Path) -> None:
    write_release(tmp_path)
    (tmp_path / "high_var_gene_list.pt").unlink()
    assert embedder(tmp_path).transform(make_adata(1)).shape == (1, DIM)
    with pytest.raises(CheckpointError, match="high_var_gene_list"):
        embedder(tmp_path, gene_set="high_var").transform(make_adata(1))


def test_pickle_needs_opt_in(release: Path) -> None:
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        BulkFormerEmbedder(release).transform(make_adata(1))


def test_low_coverage_fails(release: Path) -> None:
    adata = make_adata(2, genes=[GENES[0], "ENSG99999999991"])
    with pytest.raises(GeneMappingError, match="only 1 of the model's 30 genes"):
        embedder(release, min_coverage=0.5).transform(adata)


def test_model_path_required_and_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the released weights"):
        BulkFormerEmbedder(None)
    with pytest.raises(CheckpointError, match="does not exist"):
        BulkFormerEmbedder(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"pooling": "cls"}, "pooling='cls'"),
        ({"gene_set": "hvg"}, "gene_set='hvg'"),
        ({"min_coverage": 2}, "min_coverage must lie in"),
    ],
)
def test_bad_options(release: Path, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        embedder(release, **kw)


def test_negative_values_fail(release: Path) -> None:
    adata = make_adata(2)
    adata.X[1, 4] = -1.0
    with pytest.raises(ExpressionValueError, match="expects TPM"):
        embedder(release).transform(adata)


def test_gene_list_must_match_checkpoint(tmp_path: Path) -> None:
    write_release(tmp_path)
    info = pd.read_csv(tmp_path / "bulkformer_gene_info.csv").iloc[:-1]
    info.to_csv(tmp_path / "bulkformer_gene_info.csv", index=False)
    with pytest.raises(CheckpointError, match=r"30 genes but bulkformer_gene_info\.csv lists 29"):
        embedder(tmp_path).load()


def test_bad_graph_file(tmp_path: Path) -> None:
    write_release(tmp_path)
    torch.save(torch.zeros(3, 4, dtype=torch.long), tmp_path / "G_gtex.pt")
    with pytest.raises(CheckpointError, match=r"edge list \[2, E\]"):
        embedder(tmp_path).load()


def test_sample_without_genes_fails(release: Path) -> None:
    adata = make_adata(2)
    adata.layers["missing"] = sp.csr_matrix(
        np.vstack([np.ones(adata.n_vars), np.zeros(adata.n_vars)]).astype(bool)
    )
    with pytest.raises(ExpressionValueError, match=r"samples \['s0'\] have none"):
        embedder(release).transform(adata)


def test_generation_comes_from_the_keys(tmp_path: Path, release: Path) -> None:
    """A renamed epoch-29 file is still epoch 29: no summary features, G_gtex graph."""
    write_release(tmp_path)
    (tmp_path / "Bulkformer_ckpt_epoch_29.pt").rename(tmp_path / "bulkformer_147M.pt")
    emb = embedder(tmp_path)
    adata = make_adata(2)
    out = emb.transform(adata)
    assert emb.generation() == "epoch29" and out.shape == (2, DIM)
    assert emb.coverage_["release"] == "Bulkformer_ckpt_epoch_29"
    np.testing.assert_array_equal(out, embedder(release).transform(adata))
