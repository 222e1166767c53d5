"""Gene-embedding initialisation as a pre-training option (``gene_init:``).

The weights a fresh run starts from are checked against references computed here from
the run's own training split (naive correlation, the published Gene2Vec text layout),
the default against the model's untouched draw, and a resumed run against its checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bulkfm.errors import ConfigError, InputFileError
from bulkfm.models import gene_init
from bulkfm.models.gene_init import coexpression_matrix, coexpression_rows
from bulkfm.train.config import PretrainConfig
from bulkfm.train.data import prepare_pretrain_data
from bulkfm.train.pretrain import _Run, build_model, pretrain
from bulkfm.train.stream import prepare_streaming_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EMBEDDING = "gene_embedding_layer.weight"


def _with(config: PretrainConfig, **gene_init_keys) -> PretrainConfig:
    raw = config.to_dict()
    raw["gene_init"] = {**raw["gene_init"], **gene_init_keys}
    return PretrainConfig.from_dict(raw)


def _with_missing(adata, fraction: float = 0.03, seed: int = 3):
    rng = np.random.default_rng(seed)
    missing = rng.random(adata.shape) < fraction
    adata.X[missing] = 0.0
    adata.layers["missing"] = missing
    return adata


def _initial_weights(config: PretrainConfig, adata=None, *, streaming: bool = False):
    """The gene embedding a fresh run starts from (the run built, not trained), its data
    and its gene_init record."""
    if streaming:
        data = prepare_streaming_data(
            config.data, seed=config.seed, n_bins=config.model.n_expressions_bins
        )
    else:
        data = prepare_pretrain_data(
            adata, config.data, seed=config.seed, n_bins=config.model.n_expressions_bins
        )
    run = _Run(config, data, cpu=True, adata=adata)
    model = run.accelerator.unwrap_model(run.model)
    return model.gene_embedding_layer.weight.detach().numpy().copy(), data, run.gene_init


def _naive_training_tpm(adata, data):
    """TPM and missing mask of the training rows x the chosen genes, by name."""
    rows = np.sort(data.train_idx)
    sub = adata[rows, data.genes]
    missing = np.asarray(sub.layers["missing"], bool) if "missing" in sub.layers else None
    return np.asarray(sub.X, dtype=np.float64), missing


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"method": "gene2vec"}, r"gene_init\.gene2vec_path is not set"),
        ({"method": "coexpr"}, r"gene_init\.method must be one of .*did you mean 'coexpression'"),
        ({"gene2vec_path": "g.txt"}, r"gene_init\.method=gene2vec, or gene_init\.gene2vec_path"),
        (
            {"method": "gene2vec", "gene2vec_path": "g.txt", "gene2vec_md5": "abc"},
            r"gene_init\.gene2vec_md5 must be 32 hex digits",
        ),
        ({"gene2vec_md5": "0" * 32}, r"gene_init\.gene2vec_md5 is set without"),
        ({"rescale_std": 0}, r"gene_init\.rescale_std must be a positive number"),
        ({"colour": 1}, r"colour"),
    ],
)
def test_bad_gene_init_config_names_the_key(keys, message) -> None:
    with pytest.raises(ConfigError, match=message):
        PretrainConfig.from_dict({"gene_init": keys})


def test_gene_init_reads_from_set_overrides_and_a_study_variant() -> None:
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[2]
    config = PretrainConfig.from_yaml(
        root / "configs" / "pretrain_shared_data.yaml",
        ["gene_init.method=coexpression", "gene_init.rescale_std=0.02"],
    )
    assert config.gene_init.method == "coexpression" and config.gene_init.rescale_std == 0.02
    assert PretrainConfig().gene_init.method == "random"  # the default

    spec = importlib.util.spec_from_file_location(
        "pretrain_study", root / "scripts/pretrain_study.py"
    )
    assert spec is not None and spec.loader is not None
    study = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = study
    spec.loader.exec_module(study)
    variant = study.parse_variant(["coexpr", "gene_init.method=coexpression"])
    assert variant.trains and variant.pretrain == ("gene_init.method=coexpression",)
    config = PretrainConfig.from_yaml(
        root / "configs" / "pretrain_shared_data.yaml",
        [*study.QUICK_RECIPE, *variant.pretrain],
    )
    assert config.gene_init.method == "coexpression"


# --------------------------------------------------------------------------- default
def test_default_leaves_the_models_own_draw_untouched(
    tmp_path, simulated_adata, pretrain_config, monkeypatch
) -> None:
    """A config without gene_init trains exactly what it did before the option existed:
    the same start and, with the initialisation step removed altogether, the same run."""
    from accelerate.utils import set_seed

    adata = simulated_adata()
    config = pretrain_config(tmp_path / "a")
    got, data, record = _initial_weights(config, adata)
    set_seed(config.seed)
    want = build_model(config, data.n_genes).gene_embedding_layer.weight.detach().numpy()
    np.testing.assert_array_equal(got, want)
    assert record["method"] == "random"

    pretrain(config, adata=adata, handle_signals=False)
    import bulkfm.train.pretrain as module

    monkeypatch.setattr(module, "init_gene_embedding", lambda *a, **k: {})
    pretrain(pretrain_config(tmp_path / "b"), adata=adata, handle_signals=False)
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_rescaled_keeps_the_draw_and_sets_its_std(
    tmp_path, simulated_adata, pretrain_config
) -> None:
    adata = simulated_adata()
    plain, _, _ = _initial_weights(pretrain_config(tmp_path / "a"), adata)
    config = _with(pretrain_config(tmp_path / "b"), rescale_std=0.5)
    got, _, record = _initial_weights(config, adata)
    assert np.std(got, dtype=np.float64) == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_allclose(got, plain * (0.5 / np.std(plain, dtype=np.float64)), rtol=1e-5)
    assert record["rescaled_to_std"] == 0.5


# --------------------------------------------------------------------------- coexpression
def test_coexpression_start_is_the_training_rows_correlation(
    tmp_path, simulated_adata, pretrain_config
) -> None:
    adata = _with_missing(simulated_adata())
    config = _with(pretrain_config(tmp_path / "run"), method="coexpression")
    got, data, record = _initial_weights(config, adata)
    x, missing = _naive_training_tpm(adata, data)
    assert data.n_eval > 0 and missing.any()  # held-out rows and missing values exist

    want, _ = coexpression_matrix(x, config.model.init_gene_embed_dim, missing=missing)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert record["method"] == "coexpression" and record["n_samples"] == data.n_train
    assert record["samples"] == f"all {data.n_train} training samples"

    # Independently: E E^T is the best rank-dim approximation of the genes' correlation of
    # log10(1 + TPM) over the measured values, a missing entry standing at its gene's mean.
    z = np.log10(1 + x)
    z[missing] = np.nan
    z = (z - np.nanmean(z, axis=0)) / np.nanstd(z, axis=0)
    correlation = np.nan_to_num(z).T @ np.nan_to_num(z) / len(z)
    values, vectors = np.linalg.eigh(correlation)
    top = np.argsort(values)[::-1][: config.model.init_gene_embed_dim]
    best = (vectors[:, top] * values[top]) @ vectors[:, top].T
    np.testing.assert_allclose(got @ got.T, best, atol=2e-4)

    # and the held-out rows were not read: with them the start would differ
    everything = adata[:, data.genes]
    leaked, _ = coexpression_matrix(
        np.asarray(everything.X), got.shape[1], missing=np.asarray(everything.layers["missing"])
    )
    assert np.abs(leaked @ leaked.T - got @ got.T).max() > 1e-3


def test_coexpression_reads_a_bounded_seeded_sample(
    tmp_path, simulated_adata, pretrain_config, monkeypatch
) -> None:
    rows = np.arange(100, 0, -1)
    assert np.array_equal(coexpression_rows(rows), np.arange(1, 101))  # all, sorted
    some = coexpression_rows(rows, seed=1, max_rows=30)
    assert len(some) == 30 and np.all(np.diff(some) > 0) and set(some) <= set(rows)
    assert np.array_equal(some, coexpression_rows(rows[::-1], seed=1, max_rows=30))
    assert not np.array_equal(some, coexpression_rows(rows, seed=2, max_rows=30))

    monkeypatch.setattr(gene_init, "COEXPRESSION_MAX_ROWS", 20)
    adata = simulated_adata()
    config = _with(pretrain_config(tmp_path / "run"), method="coexpression")
    got, data, record = _initial_weights(config, adata)
    chosen = coexpression_rows(data.train_idx, seed=config.seed, max_rows=20)
    want, _ = coexpression_matrix(np.asarray(adata[chosen, data.genes].X), got.shape[1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert record["samples"] == f"20 of {data.n_train} training samples (seeded sample)"


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_streamed_run_starts_from_the_in_memory_coexpression(
    tmp_path, simulated_adata, pretrain_config, sparse
) -> None:
    import scipy.sparse as sp

    adata = _with_missing(simulated_adata())
    reference, _, _ = _initial_weights(
        _with(pretrain_config(tmp_path / "ref"), method="coexpression"), adata
    )
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
        adata.layers["missing"] = sp.csr_matrix(adata.layers["missing"])
    path = tmp_path / "data.h5ad"
    adata.write_h5ad(path)
    config = _with(pretrain_config(tmp_path / "run"), method="coexpression")
    config.data.path = str(path)
    memory, _, _ = _initial_weights(config, adata)
    config.data.streaming = True
    streamed, _, record = _initial_weights(config, streaming=True)
    np.testing.assert_array_equal(streamed, memory)
    np.testing.assert_array_equal(memory, reference)  # dense and sparse inputs agree
    assert record["method"] == "coexpression"


def test_rescaled_coexpression_is_the_same_directions_at_the_asked_std(
    tmp_path, simulated_adata, pretrain_config
) -> None:
    adata = simulated_adata()
    base = _with(pretrain_config(tmp_path / "a"), method="coexpression")
    plain, _, _ = _initial_weights(base, adata)
    got, _, record = _initial_weights(_with(base, rescale_std=0.02), adata)
    assert np.std(got, dtype=np.float64) == pytest.approx(0.02, rel=1e-5)
    np.testing.assert_allclose(got, plain * record["rescale_factor"], rtol=1e-5, atol=1e-8)
    assert record["std_before"] == pytest.approx(np.std(plain, dtype=np.float64), rel=1e-5)


def test_run_records_the_init_and_resume_keeps_the_checkpoint(
    tmp_path, simulated_adata, pretrain_config, monkeypatch
) -> None:
    adata = simulated_adata(n=40, g=20)
    straight = _with(pretrain_config(tmp_path / "straight"), method="coexpression")
    result = pretrain(straight, adata=adata, handle_signals=False)
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["gene_init"] == result.gene_init and result.gene_init["method"] == "coexpression"
    state = json.loads(
        (tmp_path / "straight" / "checkpoints" / "step_0000006" / "trainer_state.json").read_text()
    )
    assert state["gene_init"] == result.gene_init

    broken = _with(pretrain_config(tmp_path / "broken"), method="coexpression")
    pretrain(broken, adata=adata, stop_after=3, handle_signals=False)
    calls = []
    real = gene_init.init_gene_embeddings
    monkeypatch.setattr(
        gene_init, "init_gene_embeddings", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    resumed = pretrain(broken, adata=adata, resume=True, handle_signals=False)
    assert resumed.resumed_from == 2 and not calls  # the checkpoint's weights, not a new init
    assert resumed.gene_init == result.gene_init  # carried over from trainer_state.json
    want = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    got = load_file(str(tmp_path / "broken" / "final" / "model.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)

    fresh_resume = _with(pretrain_config(tmp_path / "empty"), method="coexpression")
    pretrain(fresh_resume, adata=adata, resume=True, stop_after=1, handle_signals=False)
    assert calls  # resume=True without a checkpoint is a fresh start: initialised


# --------------------------------------------------------------------------- Gene2Vec
# Real Ensembl ids whose symbols the bundled gene table knows (DARS is DARS1's old symbol).
RELEASE = {
    "TP53": "ENSG00000141510",
    "DARS": "ENSG00000115866",
    "CD2AP": "ENSG00000198087",
    "BRCA1": "ENSG00000012048",
}


def _release_file(path: Path, symbols, vectors) -> None:
    """The published gene2vec_dim_200_iter_9.txt layout: SYMBOL<tab>v1 v2 ... vD per line."""
    with open(path, "w") as out:
        for symbol, row in zip(symbols, vectors, strict=True):
            out.write(symbol + "\t" + "".join(f"{float(v)} " for v in row) + "\n")


def test_gene2vec_start_is_the_release_vectors_in_tokenizer_order(
    tmp_path, simulated_adata, pretrain_config
) -> None:
    from bulkfm.data.download import md5_of

    adata = simulated_adata(g=20)
    names = list(adata.var_names)
    names[3], names[7], names[11], names[15] = RELEASE.values()
    adata.var_names = names
    base = pretrain_config(tmp_path / "run")
    dim = base.model.init_gene_embed_dim
    symbols = ["BRCA1", "NOTAGENE", "TP53", "DARS", "CD2AP"]
    vectors = np.random.default_rng(5).normal(size=(len(symbols), dim)).astype(np.float32)
    path = tmp_path / "gene2vec_dim_200_iter_9.txt"
    _release_file(path, symbols, vectors)

    raw = base.to_dict()
    raw["data"]["top_k_variable_genes"] = None  # all 20 genes, in file order
    raw["gene_init"] = {"method": "gene2vec", "gene2vec_path": str(path)}
    config = PretrainConfig.from_dict(raw)
    got, data, record = _initial_weights(config, adata)
    by_symbol = dict(zip(symbols, vectors, strict=True))
    for symbol, ensembl in RELEASE.items():
        np.testing.assert_array_equal(got[data.genes.index(ensembl)], by_symbol[symbol])
    assert record["n_found"] == 4 and record["n_missing"] == 16
    assert record["md5"] == md5_of(path) and record["source"] == str(path)

    raw["gene_init"]["gene2vec_md5"] = "0" * 32
    with pytest.raises(InputFileError, match=r"md5 .* expected 0{32}"):
        _initial_weights(PretrainConfig.from_dict(raw), adata)
    raw["gene_init"].pop("gene2vec_md5")
    raw["model"]["init_gene_embed_dim"] = dim + 1
    with pytest.raises(ConfigError, match=rf"init_gene_embed_dim={dim}"):
        _initial_weights(PretrainConfig.from_dict(raw), adata)
