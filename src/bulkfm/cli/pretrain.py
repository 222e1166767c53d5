"""``bulkfm pretrain``: masked-LM pre-training from a YAML config.

Runs the same way on one CPU, under ``torchrun --nproc_per_node N -m bulkfm.cli
pretrain ...`` or ``accelerate launch -m bulkfm.cli pretrain ...``.
"""

from __future__ import annotations

import argparse
import json

from bulkfm.cli.common import add_config_arguments, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="masked-LM pre-training of BulkRNABert",
        description=(
            "Pre-train BulkRNABert with the BERT masking recipe on an .h5ad (X = TPM). "
            "Checkpoints, log.csv, summary.json and the final model (final/) go to the "
            "config's output_dir. Multi-GPU: launch with torchrun or accelerate launch."
        ),
    )
    add_config_arguments(parser, "YAML config file", "--set optim.lr=3e-4 --set data.path=x.h5ad")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in output_dir",
    )
    parser.set_defaults(handler=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    from bulkfm.io import check_output_dir
    from bulkfm.train.config import PretrainConfig

    config = load_config(PretrainConfig, args)
    check_output_dir(config.output_dir, flag="--set output_dir=")

    import torch.distributed as dist

    from bulkfm.train.pretrain import pretrain

    try:
        result = pretrain(config, resume=args.resume)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if result.world_size == 1 or _is_rank_zero():
        print(json.dumps(result.to_dict(), indent=1))
    return 0


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
