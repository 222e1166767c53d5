"""``bulkfm run``: the main job (:func:`bulkfm.pipeline.run_demo`) on simulated data."""

from __future__ import annotations

import argparse
from pathlib import Path

from bulkfm.io import check_output_dir
from bulkfm.pipeline import run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run",
        help="the main job on the built-in simulated data (simulate, build, pre-train, report)",
    )
    run.add_argument("-o", "--out", type=Path, default=Path("bulkfm_out"), help="output folder")
    run.add_argument("--n-samples", type=int, default=600)
    run.add_argument("--n-genes", type=int, default=2000)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-steps", type=int, help="pre-training steps (default from the config)")
    run.add_argument(
        "--no-evaluate", action="store_true", help="stop after pre-training (skip stage 4)"
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a pre-training config entry, e.g. --set model.num_layers=1",
    )
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, flag="--out")
    run_demo(
        args.out,
        n_samples=args.n_samples,
        n_genes=args.n_genes,
        seed=args.seed,
        max_steps=args.max_steps,
        overrides=args.overrides,
        evaluate=not args.no_evaluate,
    )
    return 0
