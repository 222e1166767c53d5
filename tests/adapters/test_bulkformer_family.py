"""BulkFormer adapter on the current release (five sizes, ``bulkformer_<size>.pt``).

A tiny random model is written in the release's layout (state dict, ``G_tcga`` graph,
gene table, ``interested_gene_list.pt``; ``tests/adapters/bulkformer_files.py``). The
forward pass is checked against a naive per-sample float64 reference with a dense
graph matrix built the way the release builds its SparseTensor, and the embedding
against the authors' extraction recipe restated here (pool the [dim + 3] gene
vectors over the listed genes). ``test_bulkformer_official.py`` runs the authors' own
model class when a checkout of their repository is available.
"""

from __future__ import annotations

import json
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
from bulkfm.adapters.bulkformer_net import BulkFormerConfig  # noqa: E402
from bulkfm.errors import CheckpointError, ConfigError  # noqa: E402
from tests.adapters.bulkformer_files import (  # noqa: E402
    family_graph,
    family_state,
    write_family_release,
)

N_GENES, DIM, HEADS, P_REPEAT = 30, 16, 2, 2
GENES = [f"ENSG{i:011d}" for i in range(N_GENES)]
LISTED = [1, 4, 7, 20, 29]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bulkformer_family")
    write_family_release(folder, GENES)
    return folder


def embedder(path: Path, **kw) -> BulkFormerEmbedder:
    return BulkFormerEmbedder(path, trust_pickle=True, **kw)


def make_adata(n: int = 4, *, seed: int = 0, flags: bool = True) -> ad.AnnData:
    """TPM for most vocabulary genes (shuffled, plus genes the model does not know)."""
    rng = np.random.default_rng(seed)
    genes = [*GENES[2:][::-1], "ENSG99999999991"]
    X = rng.lognormal(1.0, 1.5, size=(n, len(genes))).astype(np.float32)
    X[rng.random(X.shape) < 0.2] = 0.0
    adata = ad.AnnData(X=X)
    adata.var_names = genes
    adata.obs_names = [f"s{i}" for i in range(n)]
    if flags:
        missing = np.zeros(X.shape, dtype=bool)
        missing[0, 3] = True
        missing[-1, [5, 10]] = True
        adata.layers["missing"] = sp.csr_matrix(missing)
    return adata


# --------------------------------------------------------------------------- reference


def _mlp(st: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ st[f"{name}.0.weight"].T + st[f"{name}.0.bias"])
    return h @ st[f"{name}.2.weight"].T + st[f"{name}.2.bias"]


def _ln(st: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(
        x, (x.shape[-1],), st[f"{name}.weight"], st[f"{name}.bias"], eps=1e-5
    )


def _run_performer(st: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    perf = performer_pytorch.Performer(dim=DIM, depth=1, heads=HEADS, dim_head=DIM // HEADS)
    perf.load_state_dict({k[len(prefix) :]: v for k, v in st.items() if k.startswith(prefix)})
    return perf.double().eval()(x[None])[0]


@torch.no_grad()
def reference_states(state: dict, x: torch.Tensor) -> torch.Tensor:
    """Final gene states [genes, dim] of one sample, float64, written from the paper's
    equations and the released module layout (not from the adapter)."""
    st = {k.removeprefix("module."): v.double() for k, v in state.items()}
    x = x.double()
    phase = x[:, None] * st["expr_emb.inv_freq"][None, :]
    value = torch.cat([phase.sin(), phase.cos()], dim=1)
    value[x == -10] = 0.0
    identity = _mlp(st, "gene_emb_proj", st["gene_emb_onehot_layer.weight"])
    h = value + identity + _mlp(st, "global_expr_proj", x[None])
    h = _mlp(st, "x_proj", h)
    # The release: SparseTensor(row=G[1], col=G[0], value=w).t() -> entry (G[0], G[1]);
    # GCNConv(add_self_loops=False) then uses D^-1/2 A D^-1/2 with D = row sums.
    edges, weights = family_graph(N_GENES)
    adj = torch.zeros(N_GENES, N_GENES, dtype=torch.float64)
    for k in range(edges.shape[1]):
        adj[edges[0, k], edges[1, k]] += float(weights[k])
    deg = adj.sum(1)
    dis = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
    norm_adj = dis[:, None] * adj * dis[None, :]
    p = "gb_formers.0."
    h = _ln(st, p + "layernorm", h)
    h = h + norm_adj @ (h @ st[p + "g.lin.weight"].T) + st[p + "g.bias"]
    for j in range(P_REPEAT):
        h = _run_performer(st, f"{p}f.{j}.", h)
    return _ln(st, "layernorm", h)


def reference_summary(values: np.ndarray) -> np.ndarray:
    """Missing rate, mean of present values, fraction of inputs != 0 (the -10s count)."""
    out = []
    for row in values.astype(np.float64):
        present = row != -10
        out.append([1 - present.mean(), row[present].mean(), np.count_nonzero(row) / row.size])
    return np.array(out)


# --------------------------------------------------------------------------- the network


def test_forward_matches_naive_reference(release: Path) -> None:
    emb = embedder(release)
    values, _, _ = emb.model_input(make_adata(3))
    net = emb.network.double()
    with torch.inference_mode():
        hidden = net(torch.as_tensor(values, dtype=torch.float64))
    state = torch.load(release / "bulkformer_147M.pt", weights_only=True)
    assert hidden.shape == (3, N_GENES, DIM)
    for i in range(3):
        ref = reference_states(state, torch.as_tensor(values[i]))
        torch.testing.assert_close(hidden[i], ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "max", "median", "all"])
@pytest.mark.parametrize("gene_set", ["present", "listed", "all"])
def test_embedding_matches_the_extraction_recipe(
    release: Path, pooling: str, gene_set: str
) -> None:
    """The authors pool [state, missing rate, mean, non-zero] per gene over the genes."""
    adata = make_adata(4, flags=False)
    out = embedder(release, pooling=pooling, gene_set=gene_set).transform(adata)
    values, _, _ = embedder(release).model_input(adata)
    state = torch.load(release / "bulkformer_147M.pt", weights_only=True)
    summary = reference_summary(values)
    assert out.shape == (4, DIM + 3)
    for i in range(4):
        states = reference_states(state, torch.as_tensor(values[i])).numpy()
        per_gene = np.concatenate([states, np.tile(summary[i], (N_GENES, 1))], axis=1)
        rows = {
            "present": np.flatnonzero(values[i] != -10),
            "listed": LISTED,
            "all": np.arange(N_GENES),
        }[gene_set]
        sel = per_gene[rows]
        stats = {"mean": sel.mean(0), "max": sel.max(0), "median": np.median(sel, axis=0)}
        want = sum(stats.values()) if pooling == "all" else stats[pooling]
        # float32 network against a float64 reference: float32 rounding, nothing more.
        np.testing.assert_allclose(out[i], want, rtol=2e-6, atol=1.5e-6)


def test_summary_features_by_hand(release: Path) -> None:
    # Genes 0..3 in another order, one flagged missing, one unknown gene: 26 + 1 masked.
    adata = ad.AnnData(X=np.array([[math.e - 1, 0.0, 3.0, 5.0, 7.0]], dtype=np.float32))
    adata.var_names = [GENES[2], GENES[0], GENES[1], "ENSG99999999999", GENES[3]]
    missing = np.zeros((1, 5), dtype=bool)
    missing[0, 2] = True
    adata.layers["missing"] = sp.csr_matrix(missing)
    out = embedder(release, min_coverage=0.0).transform(adata)
    # Present: gene 0 (log1p 0 = 0), gene 2 (1.0), gene 3 (log 8). 27 of 30 masked.
    mean = (0.0 + 1.0 + math.log(8.0)) / 3
    nonzero = (2 + 27) / 30  # the released code counts the -10 placeholders as non-zero
    np.testing.assert_allclose(out[0, DIM:], [27 / 30, mean, nonzero], rtol=1e-6)


def test_summary_features_can_be_left_out(release: Path) -> None:
    adata = make_adata(3)
    full = embedder(release).transform(adata)
    bare = embedder(release, summary_features=False).transform(adata)
    assert bare.shape == (3, DIM)
    np.testing.assert_array_equal(bare, full[:, :DIM])
    assert (
        embedder(release).fingerprint() != embedder(release, summary_features=False).fingerprint()
    )


def test_missing_rate_is_per_sample(release: Path) -> None:
    out = embedder(release).transform(make_adata(4))
    # Every sample lacks genes 0, 1; sample 0 one more, sample 3 two more (flags).
    np.testing.assert_allclose(out[:, DIM], [3 / 30, 2 / 30, 2 / 30, 4 / 30], rtol=1e-6)


def test_deterministic_and_batch_size_invariant(release: Path) -> None:
    adata = make_adata(5)
    one = embedder(release, batch_size=1).transform(adata)
    np.testing.assert_array_equal(one, embedder(release, batch_size=1).transform(adata))
    four = embedder(release, batch_size=4).transform(adata)
    np.testing.assert_allclose(one, four, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the releases


@pytest.mark.parametrize(
    ("name", "dim", "p_repeat"),
    [
        ("BulkFormer-37M", 128, 1),
        ("BulkFormer-50M", 256, 2),
        ("BulkFormer-93M", 512, 6),
        ("BulkFormer-127M", 640, 8),
        ("BulkFormer-147M", 640, 12),
    ],
)
def test_every_released_size_is_read_from_its_shapes(name: str, dim: int, p_repeat: int) -> None:
    """The five configurations of the repository's model/config.py, at full size."""
    state = family_state(20010, dim=dim, heads=8, p_repeat=p_repeat, device="meta")
    config = BulkFormerConfig.from_state_dict({k[len("module.") :]: v for k, v in state.items()})
    assert (config.generation, config.dim, config.gene_length) == ("family", dim, 20010)
    assert (config.gb_repeat, config.p_repeat, config.full_head, config.bins) == (1, p_repeat, 8, 0)
    assert config.release == name


def test_generation_comes_from_the_keys_not_the_name(tmp_path: Path, release: Path) -> None:
    ckpt = write_family_release(tmp_path, GENES, name="my_finetuned_weights.pt")
    emb = embedder(ckpt)
    assert emb.generation() == "family"
    adata = make_adata(2)
    np.testing.assert_array_equal(emb.transform(adata), embedder(release).transform(adata))


def test_repository_layout_and_file_path(tmp_path: Path, release: Path) -> None:
    write_family_release(tmp_path, GENES, layout="repo", name="bulkformer_37M.pt")
    adata = make_adata(2)
    ref = embedder(release).transform(adata)
    np.testing.assert_array_equal(embedder(tmp_path).transform(adata), ref)
    by_file = embedder(tmp_path / "model" / "bulkformer_37M.pt").transform(adata)
    np.testing.assert_array_equal(by_file, ref)


def test_safetensors_release_needs_no_pickle(tmp_path: Path, release: Path) -> None:
    write_family_release(tmp_path, GENES, fmt="safetensors")
    adata = make_adata(2)
    out = BulkFormerEmbedder(tmp_path, gene_set="listed").transform(adata)
    ref = embedder(release, gene_set="listed").transform(adata)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_gene_list_as_ensembl_ids(tmp_path: Path, release: Path) -> None:
    write_family_release(tmp_path, GENES, gene_list=[GENES[i] + ".5" for i in LISTED])
    mask = embedder(tmp_path, gene_set="listed").gene_list_mask()
    assert np.flatnonzero(mask).tolist() == LISTED
    assert (
        np.flatnonzero(embedder(release, gene_set="high_var").gene_list_mask()).tolist() == LISTED
    )


def test_high_var_is_an_alias_of_listed(release: Path) -> None:
    a = embedder(release, gene_set="high_var")
    assert a.gene_set == "listed"
    assert a.fingerprint() == embedder(release, gene_set="listed").fingerprint()


# --------------------------------------------------------------------------- bad input


def test_several_checkpoints_in_one_folder(tmp_path: Path) -> None:
    write_family_release(tmp_path, GENES, name="bulkformer_147M.pt")
    write_family_release(tmp_path, GENES, name="bulkformer_37M.pt")
    with pytest.raises(
        CheckpointError, match=r"several checkpoints.*bulkformer_37M\.pt.*--model-dir"
    ):
        embedder(tmp_path).transform(make_adata(1))


def test_graph_of_the_other_release_is_refused(tmp_path: Path) -> None:
    write_family_release(tmp_path, GENES)
    for name in ("G_tcga.pt", "G_tcga_weight.pt"):
        (tmp_path / name).rename(tmp_path / name.replace("tcga", "gtex"))
    with pytest.raises(CheckpointError, match=r"G_tcga\.pt.*current BulkFormer release.*15744294"):
        embedder(tmp_path).transform(make_adata(1))


def test_no_checkpoint_names_both_releases(tmp_path: Path) -> None:
    write_family_release(tmp_path, GENES)
    (tmp_path / "bulkformer_147M.pt").unlink()
    with pytest.raises(CheckpointError, match=r"bulkformer_<size>\.pt.*Bulkformer_ckpt_epoch_29"):
        embedder(tmp_path).transform(make_adata(1))


def test_not_a_bulkformer(tmp_path: Path) -> None:
    write_family_release(tmp_path, GENES, state={"module.encoder.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="not a BulkFormer state dict"):
        embedder(tmp_path).load()


def test_mixed_generations(tmp_path: Path) -> None:
    state = family_state(N_GENES)
    state["module.ae_enc.0.weight"] = torch.zeros(4 * DIM, N_GENES)
    write_family_release(tmp_path, GENES, state=state)
    with pytest.raises(CheckpointError, match="mixes the current release's keys"):
        embedder(tmp_path).load()


def test_lost_key_is_named(tmp_path: Path) -> None:
    state = family_state(N_GENES)
    del state["module.global_expr_proj.0.weight"]
    write_family_release(tmp_path, GENES, state=state)
    with pytest.raises(CheckpointError, match=r"lacks \['global_expr_proj\.0\.weight'\]"):
        embedder(tmp_path).load()


def test_renamed_head_key_is_listed(tmp_path: Path) -> None:
    state = family_state(N_GENES)
    state["module.head.2.weight"] = state.pop("module.head.3.weight")
    write_family_release(tmp_path, GENES, state=state)
    with pytest.raises(CheckpointError, match=r"missing keys \['head\.3\.weight'\]"):
        embedder(tmp_path).load()


def test_gene_list_with_unknown_ids(tmp_path: Path) -> None:
    write_family_release(tmp_path, GENES, gene_list=[GENES[1], "ENSG77777777777"])
    with pytest.raises(CheckpointError, match=r"1 gene ids the model does not have.*ENSG7777"):
        embedder(tmp_path, gene_set="listed").transform(make_adata(1))


def test_bad_summary_option(release: Path) -> None:
    with pytest.raises(ConfigError, match="summary_features"):
        embedder(release, summary_features="maybe")


# --------------------------------------------------------------------------- the CLI


def test_bench_command_from_the_docs_runs(sim, tmp_path: Path) -> None:
    """``bulkfm bench --models bulkformer --model-dir bulkformer=FILE`` end to end."""
    from bulkfm.cli import main
    from bulkfm.io import write_h5ad

    genes = [*map(str, sim.var_names[:60]), "ENSG99999999990"]
    ckpt = write_family_release(tmp_path / "BulkFormer", genes, layout="repo")
    h5ad = write_h5ad(sim, tmp_path / "sim.h5ad")
    out = tmp_path / "bench"
    args = ["bench", "--data", str(h5ad), "--out", str(out), "--models", "bulkformer"]
    args += ["--model-dir", f"bulkformer={ckpt}", "--model-arg", "bulkformer:trust_pickle=true"]
    args += ["--tasks", "cancer_type", "--no-plots", "--splits", "2", "--min-class-patients", "8"]
    assert main(args) == 0
    lb = pd.read_csv(out / "leaderboard.csv")
    assert lb["model"].unique().tolist() == ["bulkformer"]
    record = json.loads((out / "run.json").read_text())
    (bf,) = [m for m in record["models"] if m["name"] == "bulkformer"]
    assert bf["coverage"]["n_found"] == 60 and bf["coverage"]["n_vocabulary"] == 61
    assert bf["coverage"]["release"].startswith("BulkFormer (unreleased size: dim=16")
