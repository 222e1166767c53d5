from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import bulkfm.cli
from bulkfm.errors import ConfigError
from bulkfm.evaluate import evaluate_pipeline_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _register(monkeypatch):
    """Until bulkfm.cli.evaluate is listed in bulkfm.cli.COMMAND_MODULES."""
    modules = bulkfm.cli.COMMAND_MODULES
    if "bulkfm.cli.evaluate" not in modules:
        monkeypatch.setattr(bulkfm.cli, "COMMAND_MODULES", (*modules, "bulkfm.cli.evaluate"))


@pytest.fixture
def tiny_yaml(tmp_path, tiny_heads, tiny_baselines, tiny_pretrain) -> Path:
    """A tiny evaluation YAML that pre-trains its model here: tmp_path/eval.yaml."""
    config = {
        "num_threads": 1,
        "data": {
            "simulate": {"n_samples": 120, "n_genes": 100, "n_cohorts": 3, "seed": 5},
            "select": {"sample_type": "tumor"},
        },
        "pretrain": tiny_pretrain,
        "protocol": {"n_seeds": 3},
        "heads": tiny_heads,
        "baselines": tiny_baselines,
        "tasks": {"robustness": [0.3]},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_bulkfm_evaluate_end_to_end(tiny_yaml, tmp_path, capsys):
    cfg = tiny_yaml
    out = tmp_path / "out"
    code = bulkfm.cli.main(
        ["evaluate", "--config", str(cfg), "--set", "protocol.n_seeds=2", "--out", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "classification  PCA(12) + SVM" in printed
    assert "survival        BulkRNABert + Cox MLP + IA3" in printed
    assert f"report:  {out / 'report.md'}" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results["splits"]["classification"]) == 2  # --set applied
    assert results["model"]["source"] == "pretrained here"
    assert results["model"]["n_genes"] == 32 and results["model"]["steps"] == 6
    assert (out / "pretrain" / "final" / "model.safetensors").is_file()
    assert results["robustness"]["fractions"]["0.3"]["imputed"]["ratio"]["n"] == 2
    for name in ("report.md", "report.html", "predictions.csv.gz", "plots/similarity.png"):
        assert (out / name).is_file(), name


def test_bad_config_exits_with_a_message(tiny_yaml, capsys):
    cfg = tiny_yaml
    code = bulkfm.cli.main(["evaluate", "--config", str(cfg), "--set", "protocol.test_size=2"])
    assert code == 1
    assert "protocol.test_size must lie in (0, 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_pipeline_stage_returns_a_summary_and_writes_the_report(
    tiny_data, tiny_model_for, tmp_path
):
    adata = tiny_data(seed=7, n_samples=130, n_genes=80)
    model, tokenizer = tiny_model_for(adata, n_genes=32)
    model_dir = model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    summary = evaluate_pipeline_stage(adata, model_dir, tmp_path / "evaluate")
    assert set(summary["classification"]) == {
        "mlp",
        "svm",
        "ia3",
        "random_frozen",  # the untrained encoder beside the pre-trained one
        "baseline_pca_svm",
        "baseline_nmf_svm",
        "baseline_mlp",
    }
    assert set(summary["survival"]) == {
        "mlp",
        "ia3",
        "random_frozen",
        "baseline_pca_cox",
        "baseline_mlp",
    }
    mlp = summary["classification"]["mlp"]
    assert mlp["label"] == "BulkRNABert + MLP" and 0.0 <= mlp["macro_f1"]["mean"] <= 1.0
    assert Path(summary["paths"]["report_md"]).is_file()
    results = json.loads(Path(summary["paths"]["results"]).read_text())
    assert len(results["splits"]["classification"]) == 2  # quick: 2 seeds
    assert results["config"]["heads"]["finetune"]["epochs"] == 2
    json.dumps(summary)  # JSON-able for the main job's results.json


# --------------------------------------------------------------------------- own data
def _args(*argv: str):
    parser = bulkfm.cli.build_parser()
    return parser.parse_args(["evaluate", *argv])


SIMULATED = Path(__file__).resolve().parents[2] / "configs" / "evaluate_simulated.yaml"


def test_model_on_the_command_line_replaces_the_files_pretraining():
    """Re-using a shipped config that pre-trains: --model (or --set model.path) is enough,
    no undocumented --set pretrain=null."""
    from bulkfm.cli.evaluate import evaluation_config

    assert evaluation_config(_args("--config", str(SIMULATED))).pretrain is not None
    cfg = evaluation_config(
        _args("--config", str(SIMULATED), "--model", "ckpt", "--data", "d.h5ad")
    )
    assert cfg.pretrain is None and cfg.model.path == "ckpt" and cfg.data.path == "d.h5ad"
    cfg = evaluation_config(_args("--config", str(SIMULATED), "--set", "model.path=ckpt"))
    assert cfg.pretrain is None and cfg.model.path == "ckpt"
    with pytest.raises(ConfigError, match=r"both model\.path and a pretrain"):
        evaluation_config(
            _args(
                "--config",
                str(SIMULATED),
                "--set",
                "model.path=ckpt",
                "--set",
                "pretrain.optim.max_steps=3",
            )
        )


def test_write_template_and_a_missing_config(tmp_path, capsys):
    path = tmp_path / "my_eval.yaml"
    assert bulkfm.cli.main(["evaluate", "--write-template", str(path)]) == 0
    assert "edit the lines marked CHANGE" in capsys.readouterr().out
    assert "# CHANGE" in path.read_text()
    assert bulkfm.cli.main(["evaluate", "--write-template", str(path)]) == 1
    assert "exists" in capsys.readouterr().err
    assert bulkfm.cli.main(["evaluate"]) == 1
    assert "--write-template" in capsys.readouterr().err


def test_help_says_how_to_evaluate_own_data(capsys):
    with pytest.raises(SystemExit):
        bulkfm.cli.main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "--write-template my_eval.yaml" in text and "--model runs/pretrain/final" in text
    assert "tasks.robustness=null" in text


def test_template_on_own_cohort_lacking_model_genes(
    tmp_path, tiny_data, tiny_model_for, tiny_heads, tiny_baselines, capsys
):
    """The template, a saved checkpoint and an .h5ad without 6 of its 40 genes: runs
    with --data/--model and a few --set for speed, and records the coverage."""
    from bulkfm.io import write_h5ad

    adata = tiny_data(seed=4, n_samples=120, n_genes=100)
    model, tokenizer = tiny_model_for(adata)
    model_dir = model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    absent = set(tokenizer.genes[:6])
    cohort = adata[:, [g for g in adata.var_names if g not in absent]].copy()
    write_h5ad(cohort, tmp_path / "cohort.h5ad")
    template = tmp_path / "my_eval.yaml"
    assert bulkfm.cli.main(["evaluate", "--write-template", str(template)]) == 0
    sets = [
        "num_threads=1",
        "protocol.n_seeds=2",
        "arms.ia3=false",
        "arms.random_frozen=false",
        "baselines.nmf_svm=false",
        f"heads.mlp={json.dumps(tiny_heads['mlp'])}",
        f"heads.cox={json.dumps(tiny_heads['cox'])}",
        f"baselines.pca_components={tiny_baselines['pca_components']}",
        f"baselines.cox_components={tiny_baselines['cox_components']}",
    ]
    out = tmp_path / "out"
    argv = ["evaluate", "--config", str(template), "--data", str(tmp_path / "cohort.h5ad")]
    argv += ["--model", str(model_dir), "--out", str(out)]
    for item in sets:
        argv += ["--set", item]
    assert bulkfm.cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "classification  BulkRNABert + MLP" in printed.out
    assert "gene coverage: the data measures 85.0% of the model's 40 genes" in printed.err
    results = json.loads((out / "results.json").read_text())
    assert results["gene_coverage"]["n_absent"] == 6
    assert results["model"]["source"] == "checkpoint"
    assert results["config"]["pretrain"] is None
    report = (out / "report.md").read_text()
    assert report.startswith("# BulkRNABert evaluation: 4 cohort classes")
