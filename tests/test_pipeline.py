from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import pytest

from bulkfm.cli import main


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["run", "-o", str(out), "--n-samples", "120", "--n-genes", "300", "--max-steps", "6"]
    assert main([*args, "--set", "data.top_k_variable_genes=64", "--set", "eval_every=3"]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "held-out masked-gene accuracy" in printed
    adata = ad.read_h5ad(out / "data.h5ad")
    assert adata.n_obs == 120 and adata.n_vars == 300
    assert {"patient", "cohort", "sample_type", "survival_time"} <= set(adata.obs)
    results = json.loads((out / "results.json").read_text())
    assert results["pretrain"]["steps"] == 6
    assert 0.0 <= results["pretrain"]["eval"]["eval_acc"] <= 1.0
    assert (out / "pretrain" / "final" / "model.safetensors").exists()
    report = (out / "report.md").read_text()
    assert "reconstruction accuracy" in report and "nan" not in report
    # stage 4: BulkRNABert arms next to the baselines, with the evaluation report written
    evaluation = results["evaluation"]
    labels = {a["label"] for a in evaluation["classification"].values()}
    assert "PCA(256) + SVM" in labels or any(label.startswith("PCA") for label in labels)
    assert any(label.startswith("BulkRNABert") for label in labels)
    assert "Downstream evaluation" in report and "macro_f1" in report
    assert Path(evaluation["paths"]["report_md"]).exists()
