"""``bulkfm pretrain``: masked-LM pre-training from a YAML config, and ``bulkfm pretrain
consolidate``: one model folder from a checkpoint's FSDP shards.

Runs the same way on one CPU, under ``torchrun --nproc_per_node N -m bulkfm.cli
pretrain ...`` or ``accelerate launch -m bulkfm.cli pretrain ...``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from bulkfm.cli.common import add_config_arguments, load_config

#: Exit status after Ctrl-C (128 + SIGINT), the shell's convention.
EXIT_SIGINT = 130


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        usage=(
            "bulkfm pretrain [-h] --config FILE [--set KEY=VALUE] [--resume]\n"
            "       bulkfm pretrain consolidate [-h] [-o DIR] CHECKPOINT"
        ),
        help="masked-LM pre-training of BulkRNABert",
        description=(
            "Pre-train BulkRNABert with the BERT masking recipe on an .h5ad (X = TPM). "
            "Checkpoints, log.csv, genes_excluded.tsv, summary.json and the final model "
            "(final/) go to the config's output_dir. A progress line (step, loss, tokens/s, "
            "ETA) is logged every progress_every_s seconds. Ctrl-C or SIGTERM finishes the "
            "current step, writes a checkpoint, prints the command that resumes the run and "
            "exits with 130 (SIGINT) or 143 (SIGTERM). Multi-GPU: launch with torchrun or "
            "accelerate launch. `bulkfm pretrain consolidate CHECKPOINT` turns a checkpoint "
            "of an fsdp: true run into a model folder."
        ),
    )
    # --config is checked by _pretrain, so that `pretrain consolidate` does not need it
    add_config_arguments(
        parser,
        "YAML config file (required unless an action is given)",
        "--set optim.lr=3e-4 --set data.path=x.h5ad",
        required=False,
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in output_dir",
    )
    parser.set_defaults(handler=_pretrain, pretrain_parser=parser)
    actions = parser.add_subparsers(dest="pretrain_action", metavar="ACTION")
    consolidate = actions.add_parser(
        "consolidate",
        help="one model folder from a checkpoint's FSDP shards",
        description=(
            "Gather the FSDP shards of a pre-training checkpoint (checkpoints/step_N of an "
            "fsdp: true run) into one model folder (config.json, model.safetensors, "
            "tokenizer.json) that one process loads, e.g. with bulkfm embed --model. Runs "
            "in one process on any machine; only the weights are read, not the optimiser."
        ),
    )
    consolidate.add_argument(
        "checkpoint", type=Path, metavar="CHECKPOINT", help="a checkpoints/step_N folder"
    )
    consolidate.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="DIR",
        help="the model folder to write (default: CHECKPOINT/consolidated); an existing one "
        "is replaced only if it is empty or a model folder",
    )
    consolidate.set_defaults(handler=_consolidate)


def resume_command(args: argparse.Namespace, output_dir: str) -> str:
    """The command line that continues this run: the same config and overrides, the
    output folder spelled out, and ``--resume``."""
    words = ["bulkfm", "pretrain", "--config", str(args.config)]
    overrides = list(args.overrides)
    if not any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides):
        overrides.append(f"output_dir={output_dir}")
    for override in overrides:
        words += ["--set", override]
    return shlex.join([*words, "--resume"])


def _consolidate(args: argparse.Namespace) -> int:
    from bulkfm.errors import CheckpointError, InputFileError
    from bulkfm.models.bulkrnabert import WEIGHTS_FILE
    from bulkfm.train.pretrain import FSDP_DIR, DamagedCheckpointError, consolidate_checkpoint

    checkpoint: Path = args.checkpoint
    if not checkpoint.exists():
        raise InputFileError(f"checkpoint {checkpoint} does not exist; give CHECKPOINT a folder")
    if not checkpoint.is_dir():
        raise InputFileError(
            f"checkpoint {checkpoint} is a file; give CHECKPOINT a checkpoint folder "
            "(checkpoints/step_N of a pre-training run)"
        )
    if not (checkpoint / FSDP_DIR).is_dir() and (checkpoint / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{checkpoint} is already a plain checkpoint ({WEIGHTS_FILE}, no FSDP shards): "
            f"there is nothing to consolidate; load it as it is, e.g. bulkfm embed --model "
            f"{checkpoint}"
        )
    try:
        out = consolidate_checkpoint(checkpoint, args.output)  # checks -o before reading
    except DamagedCheckpointError as exc:
        raise CheckpointError(
            f"{exc}. The checkpoint is damaged; consolidate another one of the run (an "
            "older step_N beside it), or use the run's final/ folder, a model folder already"
        ) from exc
    print(out)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from bulkfm.io import check_output_dir
    from bulkfm.train.config import PretrainConfig

    if args.config is None:
        args.pretrain_parser.error(
            "the following arguments are required: --config (or an action: consolidate)"
        )
    config = load_config(PretrainConfig, args)
    check_output_dir(config.output_dir, flag="--set output_dir=")

    import torch.distributed as dist

    from bulkfm.train.pretrain import TrainingInterrupted, find_latest_checkpoint, pretrain

    resume = resume_command(args, config.output_dir)
    try:
        result = pretrain(config, resume=args.resume)
    except TrainingInterrupted as exc:
        # What stopped and where the checkpoint is has been logged; add the command.
        if _is_rank_zero():
            print(f"resume with:\n  {resume}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        # Ctrl-C before training started, or a second Ctrl-C: nothing new was saved.
        if _is_rank_zero():
            latest = find_latest_checkpoint(config.output_dir)
            if latest is None:
                print("interrupted before any checkpoint was written", file=sys.stderr)
            else:
                print(
                    f"interrupted; the newest complete checkpoint is {latest}\n"
                    f"resume with:\n  {resume}",
                    file=sys.stderr,
                )
        return EXIT_SIGINT
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if result.world_size == 1 or _is_rank_zero():
        print(json.dumps(result.to_dict(), indent=1))
    return 0


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
