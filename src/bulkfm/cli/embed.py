"""``bulkfm embed``: BulkRNABert sample embeddings of an .h5ad, written to a file.

The work is :func:`bulkfm.embed.embed_adata` and :func:`bulkfm.embed.write_embeddings`;
this module only turns flags into their arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bulkfm.cli.common import add_checkpoint_arguments, load_checkpoint_and_input
from bulkfm.embed import DEFAULT_KEY, OUTPUT_SUFFIXES, embed_adata, write_embeddings
from bulkfm.io import check_output_file
from bulkfm.tokenize import gene_coverage


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="BulkRNABert sample embeddings (mean over genes of one layer)",
        description=(
            "Embed every sample of an .h5ad (X = TPM) with a BulkRNABert checkpoint. The data "
            "is aligned to the checkpoint's genes (its genes.txt) by Ensembl id: model genes "
            "the data lacks, and genes recorded missing, are fed as [MASK] and left out of "
            "the mean; coverage is printed per cohort and study and stored with the output. "
            "The output is the "
            "input .h5ad with obsm[KEY], a .parquet table (sample_id x emb_i) or a .npy "
            "matrix with a .ids.txt file of sample ids."
        ),
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("--input", required=True, type=Path, help="input .h5ad (TPM)")
    parser.add_argument("--output", required=True, type=Path, help="output .h5ad, .parquet or .npy")
    parser.add_argument(
        "--layer", type=int, default=-1, help="0 = input embeddings, i = block i, -1 = last"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    parser.add_argument("--key", default=DEFAULT_KEY, help="obsm key (.h5ad output)")
    parser.add_argument(
        "--include-missing",
        action="store_true",
        help="average over missing ([MASK]) genes too (default: leave them out)",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    check_output_file(args.output, flag="--output", suffixes=OUTPUT_SUFFIXES)
    model, tokenizer, adata = load_checkpoint_and_input(args)
    coverage = gene_coverage(tokenizer, adata, min_coverage=args.min_gene_coverage)
    emb = embed_adata(
        model,
        tokenizer,
        adata,
        layer=args.layer,
        batch_size=args.batch_size,
        exclude_missing=not args.include_missing,
        coverage=coverage,
    )
    metadata = {
        "model": str(args.model),
        "layer": args.layer,
        "exclude_missing": not args.include_missing,
        "pooling": "mean over genes",
        "gene_coverage": coverage.to_dict(),
    }
    write_embeddings(emb, adata, args.output, key=args.key, metadata=metadata)
    print(f"embedded {emb.shape[0]} samples -> {emb.shape[1]} dims -> {args.output}")
    return 0
