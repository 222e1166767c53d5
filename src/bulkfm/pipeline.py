"""The main job: the whole path on the built-in simulated data, end to end.

``bulkfm run`` (:mod:`bulkfm.cli.run`) simulates the files a user would hold (counts
matrix with versioned Ensembl ids, a TCGA-CDR-style survival table, a driver-mutation
table), builds them through the normal data layer, pre-trains a small BulkRNABert and
reports held-out reconstruction accuracy against the trivial predictor. Each stage
writes its output into ``out_dir`` so a user can pick up any of them.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bulkfm.io import atomic_path, check_output_dir, write_h5ad, write_text

logger = logging.getLogger(__name__)

DEMO_PRETRAIN_CONFIG = "pretrain_tiny.yaml"


@dataclass
class DemoResult:
    out_dir: Path
    data_path: Path
    model_dir: Path
    report_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def packaged_config(name: str) -> Path:
    """Path of a config shipped inside the package (``bulkfm/configs``)."""
    return Path(str(importlib.resources.files("bulkfm") / "configs" / name))


def run_demo(
    out_dir: str | Path = "bulkfm_out",
    *,
    n_samples: int = 600,
    n_genes: int = 2000,
    seed: int = 0,
    max_steps: int | None = None,
    overrides: list[str] | None = None,
    evaluate: bool = True,
) -> DemoResult:
    """Simulate -> build -> pre-train -> evaluate (embed, classify, survival vs baselines)
    -> report; returns where everything went."""
    from bulkfm.data.build import BuildConfig, ExpressionInput, build_dataset, format_summary
    from bulkfm.data.simulate import SimulationConfig, simulate_bulk, write_simulated_files

    out = check_output_dir(out_dir, flag="--out / out_dir=")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    truth = simulate_bulk(SimulationConfig(n_samples=n_samples, n_genes=n_genes, seed=seed))
    files = write_simulated_files(truth, out / "raw")
    lengths_path = out / "raw" / "gene_lengths.csv"
    with atomic_path(lengths_path) as tmp:
        pd.DataFrame({"ensg_id": truth.var_names, "length": truth.var["length"]}).to_csv(
            tmp, index=False
        )
    timings["simulate"] = time.perf_counter() - t0
    print(f"[1/4] simulated {truth.n_obs} samples x {truth.n_vars} genes -> {out / 'raw'}")

    t0 = time.perf_counter()
    build = BuildConfig(
        inputs=[ExpressionInput(files["counts"])],
        survival=files["survival"],
        mutations=files["mutations"],
        gene_lengths=lengths_path,
    )
    adata = build_dataset(build, progress=False)
    data_path = write_h5ad(adata, out / "data.h5ad")
    timings["build"] = time.perf_counter() - t0
    print(f"[2/4] built {data_path}\n")
    print(format_summary(adata))
    print()

    metrics: dict[str, Any] = {"timings_s": timings}
    t0 = time.perf_counter()
    model_dir, pretrain_metrics = _pretrain_stage(
        adata, out, seed=seed, max_steps=max_steps, overrides=overrides
    )
    timings["pretrain"] = time.perf_counter() - t0
    metrics.update(pretrain_metrics)
    if evaluate:
        metrics["evaluation"] = _evaluate_stage(adata, model_dir, out / "evaluation", timings)
    timings["total"] = sum(timings.values())

    report_path = out / "report.md"
    write_text(_report(adata, metrics, data_path, model_dir), report_path)
    write_text(json.dumps(metrics, indent=2, default=str), out / "results.json")
    print(f"\nreport: {report_path}")
    return DemoResult(out, data_path, model_dir, report_path, metrics)


def _pretrain_stage(
    adata: Any,
    out: Path,
    *,
    seed: int,
    max_steps: int | None,
    overrides: list[str] | None,
) -> tuple[Path, dict[str, Any]]:
    from bulkfm.train.config import PretrainConfig
    from bulkfm.train.pretrain import find_latest_checkpoint, pretrain

    sets = [f"output_dir={out / 'pretrain'}", f"seed={seed}", "data.path=null"]
    if max_steps is not None:
        sets.append(f"optim.max_steps={max_steps}")
    config = PretrainConfig.from_yaml(
        packaged_config(DEMO_PRETRAIN_CONFIG), sets + (overrides or [])
    )
    resume = find_latest_checkpoint(config.output_dir) is not None
    print(
        f"[3/4] pre-training a {config.model.num_layers}-layer BulkRNABert "
        f"({config.optim.max_steps} steps{', resuming' if resume else ''}) -> {config.output_dir}"
    )
    t0 = time.perf_counter()
    result = pretrain(config, adata=adata, resume=resume)
    elapsed = time.perf_counter() - t0
    ev = result.eval
    print(
        f"held-out masked-gene accuracy {_num(ev, 'eval_acc')} vs trivial "
        f"predictor {_num(ev, 'trivial_acc')} "
        f"(chance {1 / config.model.n_expressions_bins:.3f}); MLM loss "
        f"{_num(result.initial_eval, 'eval_loss')} -> {_num(ev, 'eval_loss')}"
    )
    metrics = {
        "pretrain": {
            "steps": result.step,
            "n_genes": result.n_genes,
            "n_train": result.n_train,
            "n_eval": result.n_eval,
            "eval": ev,
            "initial_eval": result.initial_eval,
            "elapsed_s": elapsed,
        }
    }
    return (result.final_dir or Path(config.output_dir)), metrics


def _evaluate_stage(
    adata: Any, model_dir: Path, out: Path, timings: dict[str, float]
) -> dict[str, Any]:
    from bulkfm.evaluate import evaluate_pipeline_stage

    print("\n[4/4] evaluating: embeddings -> cancer type and survival, BulkRNABert vs baselines")
    t0 = time.perf_counter()
    summary = evaluate_pipeline_stage(adata, model_dir, out)
    timings["evaluate"] = time.perf_counter() - t0
    for task, metric in (("classification", "macro_f1"), ("survival", "c_index")):
        for arm in (summary.get(task) or {}).values():
            value = arm.get(metric)
            if value is not None:
                print(f"  {task:>14} {arm['label']:<34} {metric} {_pm(value)}")
    for name, path in summary.get("paths", {}).items():
        if name.startswith("report"):
            print(f"  evaluation {name}: {path}")
    return summary


def _pm(stat: dict[str, Any]) -> str:
    mean, std = stat.get("mean"), stat.get("std")
    if mean is None:
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def _report(adata: Any, metrics: dict[str, Any], data_path: Path, model_dir: Path) -> str:
    from bulkfm.data.build import summarize

    lines = [
        "# bulkfm run: simulated data",
        "",
        f"- data: `{data_path}` ({adata.n_obs} samples x {adata.n_vars} genes, X = TPM)",
    ]
    lines.append(f"- model: `{model_dir}`")
    lines += ["", "## Samples", "", _markdown(summarize(adata).reset_index()), ""]
    pre = metrics.get("pretrain")
    if pre:
        ev, ini = pre["eval"], pre["initial_eval"]
        lines += [
            "## Masked-expression pre-training (held-out samples)",
            "",
            "| metric | before training | after training | trivial predictor |",
            "|---|---|---|---|",
            f"| MLM loss | {_num(ini, 'eval_loss')} | {_num(ev, 'eval_loss')} | |",
            f"| reconstruction accuracy | {_num(ini, 'eval_acc')} | "
            f"{_num(ev, 'eval_acc')} | {_num(ev, 'trivial_acc')} |",
            "",
            f"{pre['steps']} steps on {pre['n_train']} training samples x {pre['n_genes']} genes "
            f"in {pre['elapsed_s']:.0f} s.",
            "",
        ]
    evaluation = metrics.get("evaluation")
    if evaluation:
        lines += ["## Downstream evaluation (test splits, mean ± std)", ""]
        for task, metric in (("classification", "macro_f1"), ("survival", "c_index")):
            arms = evaluation.get(task) or {}
            if arms:
                lines += [f"| {task} | {metric} |", "|---|---|"]
                lines += [f"| {a['label']} | {_pm(a.get(metric) or {})} |" for a in arms.values()]
                lines.append("")
        for name, path in evaluation.get("paths", {}).items():
            lines.append(f"- {name}: `{path}`")
        lines.append("")
    lines.append(
        "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["timings_s"].items())
    )
    return "\n".join(lines) + "\n"


def _num(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None else f"{value:.3f}"


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])
