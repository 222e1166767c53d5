"""``bulkfm evaluate --config X.yaml [--set key=value ...] [--out DIR]``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bulkfm.cli.common import add_config_arguments, load_config

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="the paper's downstream protocol: BulkRNABert arms vs baselines, with a report",
        description=(
            "Cancer-type classification and survival on patient-grouped 80/20 splits over "
            "several seeds (mean ± std): BulkRNABert (frozen MLP/SVM, IA3, optional full "
            "fine-tuning and random-init ablations) against PCA/NMF + SVM, an MLP on "
            "log-TPM and a penalised Cox model; optional per-cohort survival, transfer and "
            "missing-gene robustness. Writes results.json, report.md, report.html, plots/."
        ),
    )
    add_config_arguments(
        parser, "evaluation YAML config", "--set protocol.n_seeds=3 --set arms.ia3=false"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (overrides output_dir of the file)"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from bulkfm.evaluate import run_evaluation
    from bulkfm.evaluate.config import EvaluateConfig
    from bulkfm.evaluate.report import SURVIVAL_METRICS, fmt_mean_std
    from bulkfm.io import check_output_dir

    flags = {"output_dir": ("--out", str(args.out))} if args.out is not None else {}
    config = load_config(EvaluateConfig, args, flags=flags)
    where = "--out" if args.out is not None else "output_dir of --config (or --out)"
    check_output_dir(config.output_dir, flag=where)
    result = run_evaluation(config)
    for arm in (result.classification_arms or {}).values():
        f1 = fmt_mean_std(arm.summary["macro_f1"])
        print(f"classification  {arm.label:<42} macro-F1 {f1}")
    for s_arm in (result.survival_arms or {}).values():
        scores = ", ".join(
            f"{name} {fmt_mean_std(s_arm.summary.get(key))}" for key, name in SURVIVAL_METRICS
        )
        print(f"survival        {s_arm.label:<42} {scores}")
    print(f"results: {result.paths['results']}\nreport:  {result.paths['report_md']}")
    return 0
