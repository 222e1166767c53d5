from __future__ import annotations

import pandas as pd
import pytest

from bulkfm.cli import main
from bulkfm.cli.bench import parse_model_args
from bulkfm.errors import ConfigError
from bulkfm.io import write_h5ad

SMALL = [
    "--splits",
    "2",
    "--min-positives",
    "8",
    "--min-negatives",
    "8",
    "--min-events",
    "8",
    "--min-class-patients",
    "8",
]


@pytest.fixture
def h5ad(sim, tmp_path):
    return write_h5ad(sim, tmp_path / "sim.h5ad")


def test_cli_runs_models_and_named_embeddings(sim, h5ad, tmp_path, capsys) -> None:
    emb = pd.DataFrame(
        sim.obsm["programmes"], index=sim.obs_names, columns=[f"e{i}" for i in range(8)]
    )
    emb.to_parquet(tmp_path / "prog.parquet")
    out = tmp_path / "out"
    args = ["bench", "--data", str(h5ad), "--out", str(out), "--models", "raw"]
    args += ["--tasks", "cancer_type,survival", "--embeddings", f"prog={tmp_path / 'prog.parquet'}"]
    args += ["--model-arg", "raw:n_top_genes=25", "--no-plots", *SMALL]
    assert main(args) == 0
    lb = pd.read_csv(out / "leaderboard.csv")
    assert sorted(lb["model"].unique()) == ["prog", "raw"]
    assert set(lb["task"]) == {"cancer_type", "survival"}
    assert "cancer type (macro-F1)" in capsys.readouterr().out
    assert list((out / "cache").glob("*.npy")) == []  # precomputed files are not re-cached


def test_cli_unknown_model_lists_known(h5ad, tmp_path, capsys) -> None:
    rc = main(["bench", "--data", str(h5ad), "--out", str(tmp_path), "--models", "scfoo"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "unknown model 'scfoo'; pass known models to --models: bulkformer, bulkrnabert" in err


def test_cli_adds_a_published_model_with_one_flag(sim, h5ad, tmp_path) -> None:
    """--model-dir NAME=PATH alone puts the adapter in the run, with its coverage."""
    pytest.importorskip("transformers")
    import json

    import numpy as np

    from tests.adapters.geneformer_files import write_geneformer_release as write_model

    genes = list(sim.var_names[:60])
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
    medians = {g: float(np.median(sim[:, g].X[sim[:, g].X > 0]) or 1.0) for g in genes}
    model = write_model(tmp_path / "gf", tokens, medians, max_positions=32)
    out = tmp_path / "out"
    args = ["bench", "--data", str(h5ad), "--out", str(out), "--models", "raw"]
    args += ["--model-dir", f"geneformer={model}", "--tasks", "cancer_type", "--no-plots"]
    assert main([*args, *SMALL]) == 0
    lb = pd.read_csv(out / "leaderboard.csv")
    assert sorted(lb["model"].unique()) == ["geneformer", "raw"]
    record = json.loads((out / "run.json").read_text())
    (gf,) = [m for m in record["models"] if m["name"] == "geneformer"]
    assert gf["coverage"]["n_vocabulary"] == 60 and gf["coverage"]["n_found"] == 60


def test_cli_unknown_task_lists_grammar(h5ad, tmp_path, capsys) -> None:
    args = ["bench", "--data", str(h5ad), "--out", str(tmp_path), "--tasks", "grade"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "unknown task 'grade'; pass task names to --tasks: auto, cancer_type" in err


def test_cli_list_models(capsys) -> None:
    assert main(["bench", "--list-models"]) == 0
    assert capsys.readouterr().out.split() == [
        "bulkformer",
        "bulkrnabert",
        "cellfm",
        "geneformer",
        "nmf",
        "pca",
        "precomputed",
        "random",
        "raw",
        "scbert",
        "scfoundation",
        "scgpt",
        "sclong",
    ]


def test_cli_yaml_config(h5ad, tmp_path) -> None:
    cfg = tmp_path / "b.yaml"
    cfg.write_text(
        "models: [raw]\nmodel_args: {raw: {n_top_genes: 10}}\ntasks: cancer_type\n"
        "bench: {n_splits: 2, min_class_patients: 8, seed: 3}\n"
    )
    out = tmp_path / "out"
    assert main(["bench", "--data", str(h5ad), "--out", str(out), "--config", str(cfg)]) == 0
    import json

    record = json.loads((out / "run.json").read_text())
    assert record["config"]["seed"] == 3 and record["config"]["n_splits"] == 2
    assert record["models"][0]["config"]["n_top_genes"] == 10


def test_cli_bad_yaml_key(h5ad, tmp_path, capsys) -> None:
    cfg = tmp_path / "b.yaml"
    cfg.write_text("bench: {n_split: 2}\n")
    assert main(["bench", "--data", str(h5ad), "--out", str(tmp_path), "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "unknown config key(s) ['bench.n_split'] in section 'bench'" in err
    assert "did you mean 'bench.n_splits'?" in err


def test_cli_precedence_yaml_then_flags_then_set(h5ad, tmp_path) -> None:
    """Flags override the YAML, --set overrides both (the order the help promises)."""
    import json

    cfg = tmp_path / "b.yaml"
    cfg.write_text("models: [raw]\ntasks: cancer_type\nbench: {n_splits: 5, seed: 1}\n")
    out = tmp_path / "out"
    args = ["bench", "--data", str(h5ad), "--out", str(out), "--config", str(cfg), "--no-plots"]
    args += [*SMALL, "--seed", "2", "--set", "bench.seed=4", "--set", "bench.min_test_cases=3"]
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())["config"]
    assert (record["n_splits"], record["seed"], record["min_test_cases"]) == (2, 4, 3)
    assert record["cache_dir"] == str(out / "cache")


def test_cli_bad_flag_value_names_the_flag(h5ad, tmp_path, capsys) -> None:
    args = ["bench", "--data", str(h5ad), "--out", str(tmp_path), "--splits", "0"]
    assert main(args) == 1
    assert "n_splits must be a positive integer, got 0 (set by --splits)" in capsys.readouterr().err


def test_parse_helpers() -> None:
    assert parse_model_args(["pca:n_components=8", "pca:seed=2"]) == {
        "pca": {"n_components": 8, "seed": 2}
    }
    with pytest.raises(ConfigError, match="MODEL:KEY=VALUE"):
        parse_model_args(["pca=8"])
