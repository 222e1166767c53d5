"""``bulkfm data ...``: build, simulate and summarise data sets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="build, simulate and inspect data sets")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    build = sub.add_parser(
        "build",
        help="expression file(s) + optional clinical tables -> one .h5ad (X = TPM)",
        description=(
            "Read expression files (GDC STAR-counts folders, wide TSV/CSV/parquet in either "
            "orientation, the official BulkRNABert CSV, .h5ad), harmonise genes to Ensembl ids, "
            "convert to TPM, join survival and mutations, and write one AnnData."
        ),
    )
    build.add_argument("inputs", nargs="+", help="files, folders or globs (quote globs)")
    build.add_argument("-o", "--output", required=True, type=Path, help="output .h5ad")
    build.add_argument("--format", default="auto", help="gdc | wide | bulkrnabert_csv | h5ad")
    build.add_argument(
        "--orientation", default="auto", help="auto | samples_x_genes | genes_x_samples"
    )
    build.add_argument("--value-column", default="tpm_unstranded", help="GDC column to read")
    build.add_argument("--sample-sheet", type=Path, help="GDC sample sheet (file -> sample id)")
    build.add_argument("--unit", default="auto", help="auto | counts | tpm")
    build.add_argument("--id-type", default="auto", help="auto | ensembl | symbol | entrez")
    build.add_argument("--cohort", help="cohort label for every sample of the inputs")
    build.add_argument(
        "--cohort-from-filename",
        metavar="REGEX",
        help="regex with one group taking the cohort from each file name, e.g. '^([a-z]+)-'",
    )
    build.add_argument("--survival", type=Path, help="TCGA-CDR table or any time/event table")
    build.add_argument("--endpoint", default="OS", help="OS | DSS | DFI | PFI")
    build.add_argument("--mutations", type=Path, help="driver mutation table (0/1 per gene)")
    build.add_argument("--mutation-genes", help="comma-separated genes to keep (default all)")
    build.add_argument("--gene-lengths", type=Path, help="CSV/TSV gene id,length for counts->TPM")
    build.add_argument(
        "--vocabulary", type=Path, help="gene list (one Ensembl id a line) to align to"
    )
    build.add_argument("--min-vocabulary-fraction", type=float, default=0.5)
    build.add_argument("--fill", default="missing", help="missing (masked later) | zero")
    build.add_argument("--duplicate-genes", default="sum", help="sum | first | max_mean | error")
    build.add_argument("--duplicate-samples", default="error", help="error | suffix | first")
    build.add_argument("--sample-types", help="comma-separated types to keep, e.g. tumor,normal")
    build.add_argument(
        "--keep-counts",
        action="store_true",
        help="keep raw read counts in layers['counts'] (count inputs only): the published "
        "recipes of Geneformer, scGPT, scFoundation, CellFM, scBERT and scLong start from counts",
    )
    build.set_defaults(handler=_build)

    sim = sub.add_parser("simulate", help="write the built-in simulated data set")
    sim.add_argument("-o", "--output", required=True, type=Path, help="output .h5ad")
    sim.add_argument("--n-samples", type=int, default=600)
    sim.add_argument("--n-genes", type=int, default=2000)
    sim.add_argument("--n-cohorts", type=int, default=5)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--files",
        type=Path,
        help="also write raw files (counts matrix, survival, mutations) into this folder",
    )
    sim.set_defaults(handler=_simulate)

    summary = sub.add_parser("summary", help="print the summary table of a built .h5ad")
    summary.add_argument("path", type=Path)
    summary.set_defaults(handler=_summary)


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _build(args: argparse.Namespace) -> int:
    from bulkfm.data.build import (
        BuildConfig,
        ExpressionInput,
        build_dataset,
        expand_inputs,
        format_summary,
    )
    from bulkfm.io import write_h5ad

    inputs = [
        ExpressionInput(
            path,
            format=args.format,
            orientation=args.orientation,
            value_column=args.value_column,
            sample_sheet=args.sample_sheet,
            unit=args.unit,
            id_type=args.id_type,
            cohort=args.cohort,
        )
        for path in expand_inputs(args.inputs)
    ]
    config = BuildConfig(
        inputs=inputs,
        survival=args.survival,
        endpoint=args.endpoint,
        mutations=args.mutations,
        mutation_genes=_split(args.mutation_genes),
        gene_lengths=args.gene_lengths,
        vocabulary=args.vocabulary,
        min_vocabulary_fraction=args.min_vocabulary_fraction,
        fill=args.fill,
        duplicate_genes=args.duplicate_genes,
        duplicate_samples=args.duplicate_samples,
        sample_types=_split(args.sample_types),
        cohort_from_filename=args.cohort_from_filename,
        keep_counts=args.keep_counts,
    )
    adata = build_dataset(config)
    write_h5ad(adata, args.output)
    print(format_summary(adata))
    print(f"\nwrote {args.output}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from bulkfm.data.simulate import SimulationConfig, simulate_bulk, write_simulated_files
    from bulkfm.io import write_h5ad

    config = SimulationConfig(
        n_samples=args.n_samples, n_genes=args.n_genes, n_cohorts=args.n_cohorts, seed=args.seed
    )
    adata = simulate_bulk(config)
    write_h5ad(adata, args.output)
    print(f"simulated {adata.n_obs} samples x {adata.n_vars} genes -> {args.output}")
    if args.files is not None:
        written = write_simulated_files(adata, args.files)
        print(json.dumps({k: str(v) for k, v in written.items()}, indent=2))
    return 0


def _summary(args: argparse.Namespace) -> int:
    import anndata as ad

    from bulkfm.data.build import format_summary
    from bulkfm.errors import InputFileError

    if not args.path.exists():
        raise InputFileError(f"{args.path} does not exist")
    print(format_summary(ad.read_h5ad(args.path)))
    return 0
