"""``bulkfm embed``: BulkRNABert sample embeddings of an .h5ad, written to a file.

The work is :func:`bulkfm.embed.embed_adata` and :func:`bulkfm.embed.write_embeddings`;
this module only turns flags into their arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bulkfm.cli.common import add_checkpoint_arguments
from bulkfm.embed import DEFAULT_KEY, OUTPUT_SUFFIXES, embed_sharded, write_embeddings
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
    parser.add_argument(
        "--pooling",
        default="mean",
        help="how a layer's gene vectors become one vector: mean (the paper) or max (per "
        "dimension)",
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
    """Embed, sharded over the processes of a torchrun / accelerate launch if there is one.

    The input is opened backed (X stays on disk and is read a batch of rows at a time),
    so memory does not grow with the number of samples. Every process checks the input
    and coverage; process 0 alone writes the output, once, atomically.
    """
    from bulkfm.config import check_choice
    from bulkfm.data.readers import read_h5ad
    from bulkfm.distributed import local_device, process_group
    from bulkfm.models.bulkrnabert import POOLINGS, load_pretrained

    check_choice("--pooling", args.pooling, POOLINGS)  # before any data or model is read
    check_output_file(args.output, flag="--output", suffixes=OUTPUT_SUFFIXES)
    rank, world = process_group()
    adata = read_h5ad(args.input, flag="--input", backed=True)  # checked before the model
    model, tokenizer = load_pretrained(
        args.model,
        genes=args.genes,
        normalization_factor=args.normalization_factor,
        device=local_device(args.device),
        revision=args.revision,
    )
    coverage = gene_coverage(tokenizer, adata, min_coverage=args.min_gene_coverage, log=rank == 0)
    emb = embed_sharded(
        model,
        tokenizer,
        adata,
        layer=args.layer,
        pooling=args.pooling,
        batch_size=args.batch_size,
        exclude_missing=not args.include_missing,
        coverage=coverage,
        progress=None if rank == 0 else False,
    )
    if emb is None:  # not process 0: it writes
        return 0
    metadata = {
        "model": str(args.model),
        "layer": args.layer,
        "exclude_missing": not args.include_missing,
        "pooling": f"{args.pooling} over genes",
        "gene_coverage": coverage.to_dict(),
        "processes": world,
    }
    if args.output.suffix.lower() == ".h5ad":
        adata = adata.to_memory()  # the output is the input plus obsm: it is written whole
    write_embeddings(emb, adata, args.output, key=args.key, metadata=metadata)
    print(f"embedded {emb.shape[0]} samples -> {emb.shape[1]} dims -> {args.output}")
    return 0
