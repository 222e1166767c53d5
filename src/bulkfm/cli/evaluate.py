"""``bulkfm evaluate --config X.yaml [--data FILE] [--model DIR] [--set key=value ...]``."""

from __future__ import annotations

import argparse
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bulkfm.cli.common import add_config_arguments, load_config
from bulkfm.errors import ConfigError

if TYPE_CHECKING:
    from bulkfm.evaluate.config import EvaluateConfig

__all__ = ["TEMPLATE", "evaluation_config", "register", "write_template"]

logger = logging.getLogger(__name__)

#: The packaged template for evaluating a checkpoint on a user's own .h5ad.
TEMPLATE = "evaluate_template.yaml"

EPILOG = """\
your own cohort with an existing checkpoint (no pre-training):
  bulkfm evaluate --write-template my_eval.yaml     # a config to edit: lines marked CHANGE
  bulkfm evaluate --config my_eval.yaml --data my_cohort.h5ad --model runs/pretrain/final

  The data need not hold every gene of the checkpoint: absent genes are read as [MASK];
  coverage is logged and recorded, and below model.min_gene_coverage the run stops.
  --model (or --set model.path=DIR) also drops a pretrain: section of the config, so a
  shipped config that pre-trains its own model can be re-used on a checkpoint as it is.
  null and [] both mean "none" for list keys (e.g. --set tasks.robustness=null).
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="the paper's downstream protocol: BulkRNABert arms vs baselines, with a report",
        description=(
            "Cancer-type classification and survival on patient-grouped hold-out splits "
            "over several seeds (mean ± std): BulkRNABert (frozen MLP/SVM, IA3, optional "
            "full fine-tuning and random-init ablations) against PCA/NMF + SVM, an MLP on "
            "log-TPM and a penalised Cox model; optional per-cohort survival, transfer and "
            "missing-gene robustness. Writes results.json, report.md, report.html, plots/."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(
        parser,
        "evaluation YAML config (start from --write-template)",
        "--set protocol.n_seeds=3 --set arms.ia3=false",
        required=False,
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="FILE",
        help="input .h5ad (X = TPM); sets data.path",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="DIR",
        help="checkpoint folder to evaluate; sets model.path and drops the config's "
        "pretrain: section",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (overrides output_dir of the file)"
    )
    parser.add_argument(
        "--write-template",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the template config for your own .h5ad and a checkpoint to FILE, and stop",
    )
    parser.set_defaults(handler=_run)


def write_template(path: Path) -> Path:
    """Copy the packaged template to ``path`` (an existing file is refused, not replaced)."""
    from bulkfm.io import write_text

    if path.exists():
        raise ConfigError(f"{path} exists; give --write-template a new file name")
    text = resources.files("bulkfm.configs").joinpath(TEMPLATE).read_text()
    return write_text(text, path)


def _model_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides, plus ``pretrain=null`` when the command line names a
    checkpoint (``--set model.path=...``) and does not set ``pretrain`` itself: the
    command line's choice of model beats the file's, as its values do."""
    overrides = list(args.overrides)
    keys = [item.partition("=")[0].strip() for item in overrides]
    if "model.path" in keys and not any(k == "pretrain" or k.startswith("pretrain.") for k in keys):
        overrides.append("pretrain=null")
    return overrides


def evaluation_config(args: argparse.Namespace) -> EvaluateConfig:
    """The run's config: ``--config``, then ``--out`` / ``--data`` / ``--model``, then
    ``--set``. A checkpoint named on the command line drops the file's ``pretrain:``."""
    from bulkfm.evaluate.config import EvaluateConfig

    flags: dict[str, tuple[str, Any]] = {}
    if args.out is not None:
        flags["output_dir"] = ("--out", str(args.out))
    if args.data is not None:
        flags["data.path"] = ("--data", str(args.data))
    if args.model is not None:
        flags["model.path"] = ("--model", str(args.model))
        flags["pretrain"] = ("--model", None)  # the checkpoint replaces pre-training here
    overrides = _model_overrides(args)
    config = load_config(
        EvaluateConfig, argparse.Namespace(config=args.config, overrides=overrides), flags=flags
    )
    if config.model.path is not None and (args.model is not None or overrides != args.overrides):
        logger.info("evaluating the checkpoint %s (no pre-training here)", config.model.path)
    return config


def _run(args: argparse.Namespace) -> int:
    if args.write_template is not None:
        path = write_template(args.write_template)
        print(f"template: {path} (edit the lines marked CHANGE, then --config {path})")
        return 0
    if args.config is None:
        raise ConfigError(
            "bulkfm evaluate needs --config FILE; for your own .h5ad and a checkpoint, "
            "start from `bulkfm evaluate --write-template my_eval.yaml`"
        )
    from bulkfm.evaluate import run_evaluation
    from bulkfm.evaluate.report import SURVIVAL_METRICS, fmt_mean_std
    from bulkfm.io import check_output_dir

    config = evaluation_config(args)
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
