"""Options several sub-commands share; importing this stays cheap (no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bulkfm.errors import InputFileError


def add_config_arguments(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    """--config (a YAML file) and repeatable --set KEY=VALUE overrides into ``overrides``."""
    parser.add_argument("--config", required=True, type=Path, help=what)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config entry, e.g. {example}",
    )


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and the extras an official-format checkpoint needs, plus --device."""
    parser.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    parser.add_argument(
        "--genes", type=Path, default=None, help="gene list file (official-format checkpoints)"
    )
    parser.add_argument(
        "--normalization-factor",
        type=float,
        default=None,
        help="max log10(1+TPM) of the training data (official-format checkpoints)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def load_checkpoint_and_input(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, tokenizer, AnnData) for a handler given add_checkpoint_arguments + --input."""
    import anndata as ad

    from bulkfm.models.bulkrnabert import load_pretrained

    if not args.input.is_file():
        raise InputFileError(f"input {args.input} does not exist: give an .h5ad file")
    model, tokenizer = load_pretrained(
        args.model,
        genes=args.genes,
        normalization_factor=args.normalization_factor,
        device=args.device,
    )
    return model, tokenizer, ad.read_h5ad(args.input)
