"""``bulkfm impute``: fill missing genes of an .h5ad with BulkRNABert predictions.

The work is :func:`bulkfm.impute.impute_missing`; this module reads and writes the files.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from bulkfm import schema as keys
from bulkfm.cli.common import add_checkpoint_arguments, load_checkpoint_and_input
from bulkfm.errors import ConfigError
from bulkfm.impute import (
    RECOVERY_KEY,
    UNS_KEY,
    check_hide_arguments,
    impute_missing,
    recovery_lines,
)
from bulkfm.io import H5AD_SUFFIXES, check_output_file, write_h5ad, write_text
from bulkfm.tokenize import read_gene_list

REPORT_SUFFIXES = (".json",)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "impute",
        help="fill genes missing from samples with BulkRNABert predictions",
        description=(
            f"Genes recorded missing (layers['{keys.MISSING}']) are fed to the model as "
            "[MASK] and replaced by the predicted TPM; the output records them in "
            f"layers['{keys.IMPUTED}']. Model genes the input has no column for are imputed "
            f"too and appended (var['{keys.ABSENT_FROM_INPUT}'] True), so the output holds "
            "every gene of the checkpoint. With --hide-fraction or --hide-genes, measured "
            "genes are hidden from the model as well and the prediction is scored against "
            "the measured values, beside a baseline that predicts each gene's mean over the "
            "other samples (the checkpoint stores no training means)."
        ),
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("--input", required=True, type=Path, help="input .h5ad (TPM)")
    parser.add_argument(
        "--output", type=Path, help="output .h5ad (optional with --hide-fraction/--hide-genes)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    hide = parser.add_mutually_exclusive_group()
    hide.add_argument(
        "--hide-fraction",
        type=float,
        metavar="F",
        help="hide this fraction, in (0, 1), of the model genes measured in every sample (the "
        "same genes in every sample), impute them and report how well they are recovered",
    )
    hide.add_argument(
        "--hide-genes",
        metavar="FILE_OR_LIST",
        help="hide these genes instead: a file with one id a line, or a comma-separated "
        "list of Ensembl ids or symbols; each must be a model gene measured in every sample",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed drawing the --hide-fraction genes (default 0)"
    )
    parser.add_argument(
        "--report", type=Path, metavar="FILE.json", help="also write the recovery scores here"
    )
    parser.set_defaults(handler=_run)


def parse_gene_argument(value: str) -> list[str]:
    """``--hide-genes``: a file of ids (one a line) if such a file exists, else a comma list."""
    path = Path(value)
    if path.is_file():
        return read_gene_list(path)
    genes = [g.strip() for g in value.split(",") if g.strip()]
    if not genes:
        raise ConfigError(
            f"--hide-genes {value!r} names no gene; give a comma list or a file of gene ids"
        )
    return genes


def _run(args: argparse.Namespace) -> int:
    hiding = args.hide_fraction is not None or args.hide_genes is not None
    if args.report is not None and not hiding:
        raise ConfigError("--report holds recovery scores: give --hide-fraction or --hide-genes")
    if args.output is None and not hiding:
        raise ConfigError(
            "--output is required (it is optional only with --hide-fraction/--hide-genes)"
        )
    if args.output is not None:
        check_output_file(args.output, flag="--output", suffixes=H5AD_SUFFIXES)
    if args.report is not None:
        check_output_file(args.report, flag="--report", suffixes=REPORT_SUFFIXES)
    hide_genes = parse_gene_argument(args.hide_genes) if args.hide_genes is not None else None
    if hiding:  # before the checkpoint loads
        check_hide_arguments(args.hide_fraction, hide_genes, args.seed)
    model, tokenizer, adata = load_checkpoint_and_input(args)
    result = impute_missing(
        model,
        tokenizer,
        adata,
        batch_size=args.batch_size,
        min_gene_coverage=args.min_gene_coverage,
        hide_fraction=args.hide_fraction,
        hide_genes=hide_genes,
        seed=args.seed,
    )
    record = result.uns[keys.UNS][UNS_KEY]
    if hiding:
        print("\n".join(recovery_lines(record[RECOVERY_KEY])))
    if args.report is not None:
        report = {"input": str(args.input), "model": str(args.model), **record[RECOVERY_KEY]}
        write_text(json.dumps(_json_safe(report), indent=1) + "\n", args.report)
        print(f"recovery scores -> {args.report}")
    if args.output is not None:
        write_h5ad(result, args.output, flag="--output")
        added = len(record["absent_genes_added"])
        print(
            f"imputed {record['n_values']} values in {record['n_samples']} samples"
            + (f" ({added} model genes absent from the input added)" if added else "")
            + f" -> {args.output}"
        )
    return 0


def _json_safe(value: Any) -> Any:
    """NaN -> null, so the report is strict JSON that other tools parse."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
