from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import bulkfm.cli
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
        "baseline_pca_svm",
        "baseline_nmf_svm",
        "baseline_mlp",
    }
    assert set(summary["survival"]) == {"mlp", "ia3", "baseline_pca_cox", "baseline_mlp"}
    mlp = summary["classification"]["mlp"]
    assert mlp["label"] == "BulkRNABert + MLP" and 0.0 <= mlp["macro_f1"]["mean"] <= 1.0
    assert Path(summary["paths"]["report_md"]).is_file()
    results = json.loads(Path(summary["paths"]["results"]).read_text())
    assert len(results["splits"]["classification"]) == 2  # quick: 2 seeds
    assert results["config"]["heads"]["finetune"]["epochs"] == 2
    json.dumps(summary)  # JSON-able for the main job's results.json
