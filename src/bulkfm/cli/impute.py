"""``bulkfm impute``: fill missing genes of an .h5ad with BulkRNABert predictions.

The work is :func:`bulkfm.impute.impute_missing`; this module reads and writes the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bulkfm import schema as keys
from bulkfm.cli.common import add_checkpoint_arguments, load_checkpoint_and_input
from bulkfm.impute import UNS_KEY, impute_missing
from bulkfm.io import H5AD_SUFFIXES, check_output_file, write_h5ad


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "impute",
        help="fill genes missing from samples with BulkRNABert predictions",
        description=(
            f"Genes recorded missing (layers['{keys.MISSING}']) are fed to the model as "
            "[MASK] and replaced by the predicted TPM; the output records them in "
            f"layers['{keys.IMPUTED}']."
        ),
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("--input", required=True, type=Path, help="input .h5ad (TPM)")
    parser.add_argument("--output", required=True, type=Path, help="output .h5ad")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    check_output_file(args.output, flag="--output", suffixes=H5AD_SUFFIXES)
    model, tokenizer, adata = load_checkpoint_and_input(args)
    result = impute_missing(model, tokenizer, adata, batch_size=args.batch_size)
    write_h5ad(result, args.output, flag="--output")
    report = result.uns[keys.UNS][UNS_KEY]
    print(f"imputed {report['n_values']} values in {report['n_samples']} samples -> {args.output}")
    return 0
