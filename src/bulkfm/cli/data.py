"""``bulkfm data ...``: build, simulate and summarise data sets."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from bulkfm.cli.common import PRECEDENCE, add_config_arguments, given_flags, load_config
from bulkfm.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="build, simulate and inspect data sets")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    build = sub.add_parser(
        "build",
        help="expression file(s) + optional clinical tables -> one .h5ad (X = TPM)",
        description=(
            "Read expression files (GDC STAR-counts folders, wide TSV/CSV/parquet in either "
            "orientation, the official BulkRNABert CSV, .h5ad), harmonise genes to Ensembl ids, "
            "convert to TPM, join survival and mutations, and write one AnnData. Settings come "
            f"from flags and/or a --config YAML (BuildConfig fields; {PRECEDENCE}); the "
            "reading flags (--format ... --cohort) apply to every input."
        ),
    )
    build.add_argument(
        "inputs", nargs="*", help="files, folders or globs (quote globs); or inputs: in --config"
    )
    build.add_argument("-o", "--output", required=True, type=Path, help="output .h5ad")
    add_config_arguments(
        build,
        "YAML of BuildConfig fields (inputs: a list of paths or {path: ..., unit: ...})",
        "--set endpoint=DSS --set sample_types=[tumor]",
        required=False,
    )
    build.add_argument(
        "--format", help="gdc | wide | bulkrnabert_csv | h5ad | archs4 (default auto)"
    )
    build.add_argument(
        "--orientation", help="auto | samples_x_genes | genes_x_samples (default auto)"
    )
    build.add_argument("--value-column", help="GDC column to read (default tpm_unstranded)")
    build.add_argument("--sample-sheet", type=Path, help="GDC sample sheet (file -> sample id)")
    build.add_argument("--unit", help="auto | counts | tpm (default auto)")
    build.add_argument("--id-type", help="auto | ensembl | symbol | entrez (default auto)")
    build.add_argument("--cohort", help="cohort label for every sample of the inputs")
    build.add_argument(
        "--cohort-from-filename",
        metavar="REGEX",
        help="regex with one group taking the cohort from each file name, e.g. '^([a-z]+)-'",
    )
    build.add_argument("--survival", type=Path, help="TCGA-CDR table or any time/event table")
    build.add_argument("--endpoint", help="OS | DSS | DFI | PFI (default OS)")
    build.add_argument("--mutations", type=Path, help="driver mutation table (0/1 per gene)")
    build.add_argument("--mutation-genes", help="comma-separated genes to keep (default all)")
    build.add_argument("--gene-lengths", type=Path, help="CSV/TSV gene id,length for counts->TPM")
    build.add_argument(
        "--vocabulary", type=Path, help="gene list (one Ensembl id a line) to align to"
    )
    build.add_argument("--min-vocabulary-fraction", type=float, help="default 0.5")
    build.add_argument("--fill", help="missing (masked later; default) | zero")
    build.add_argument(
        "--duplicate-genes",
        help="rows naming the same gene: sum (default) | first | max_mean | error",
    )
    build.add_argument(
        "--id-conflicts",
        help="rows whose id columns (symbol, Entrez id, Ensembl id) name different genes: "
        "prefer_symbol (default) | prefer_entrez | drop | error. An Ensembl id always wins; "
        "a conflicting row is never summed into another row's gene",
    )
    build.add_argument(
        "--duplicate-samples",
        help="a sample id in more than one input: error (default) | suffix (keep both; "
        "obs sample_id keeps the id for clinical joins) | first",
    )
    build.add_argument("--sample-types", help="comma-separated types to keep, e.g. tumor,normal")
    build.add_argument(
        "--keep-counts",
        action="store_true",
        default=None,
        help="keep raw read counts in layers['counts'] (count inputs only): the published "
        "recipes of Geneformer, scGPT, scFoundation, CellFM, scBERT and scLong start from counts",
    )
    archs4 = build.add_argument_group(
        "ARCHS4 selection",
        "samples and genes to read from an ARCHS4 .h5 input (filters combine with AND; "
        "one is needed: the file holds far more samples than memory)",
    )
    archs4.add_argument(
        "--archs4-series", metavar="GSE,...", help="GEO series ids, comma-separated or a file"
    )
    archs4.add_argument(
        "--archs4-source",
        metavar="REGEX",
        help="case-insensitive regex on source_name_ch1, title and characteristics_ch1",
    )
    archs4.add_argument(
        "--archs4-samples", metavar="GSM,...", help="GEO sample ids, comma-separated or a file"
    )
    archs4.add_argument(
        "--archs4-genes", metavar="GENES", help="Ensembl ids or symbols (default all genes)"
    )
    archs4.add_argument(
        "--archs4-max-singlecell",
        type=float,
        metavar="P",
        help="drop samples whose ARCHS4 single-cell probability is above P (e.g. 0.5)",
    )
    build.set_defaults(handler=_build)

    dl = sub.add_parser(
        "download",
        help="download expression files, a sample sheet and survival from the NCI GDC",
        description=(
            "Find files on the NCI GDC (default: STAR gene counts of the given projects), "
            "download them in parallel (resuming partial files, skipping complete ones after "
            "an md5 check, retrying 429/5xx), and write OUT/gdc_sample_sheet.tsv and "
            "OUT/clinical.tsv for `bulkfm data build OUT --sample-sheet "
            "OUT/gdc_sample_sheet.tsv --survival OUT/clinical.tsv -o data.h5ad`."
        ),
    )
    dl.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    dl.add_argument(
        "--project",
        action="append",
        required=True,
        help="GDC project id(s), comma-separated or repeated, e.g. TCGA-BRCA,TCGA-LUAD",
    )
    dl.add_argument(
        "--data-type", default=None, help="GDC data_type (default 'Gene Expression Quantification')"
    )
    dl.add_argument(
        "--workflow-type",
        default=None,
        help="GDC analysis.workflow_type (default 'STAR - Counts'; '' for any)",
    )
    dl.add_argument(
        "--sample-types",
        help="comma-separated GDC sample types to keep, e.g. 'Primary Tumor,Solid Tissue "
        "Normal' (default all)",
    )
    dl.add_argument("--workers", type=int, default=4, help="parallel downloads (default 4)")
    dl.add_argument(
        "--retries", type=int, default=5, help="retries per request on 429/5xx (default 5)"
    )
    dl.add_argument(
        "--token-file", type=Path, help="GDC token file, for controlled-access files only"
    )
    dl.add_argument(
        "--api-url", help="GDC API address (default $BULKFM_GDC_URL or https://api.gdc.cancer.gov)"
    )
    dl.add_argument(
        "--clinical-table",
        type=Path,
        help="TCGA-CDR table: write its rows for the downloaded patients as clinical.tsv "
        "instead of survival from the GDC",
    )
    dl.add_argument("--no-clinical", action="store_true", help="do not write clinical.tsv")
    dl.add_argument(
        "--dry-run",
        action="store_true",
        help="print file counts and total size per project; download and write nothing",
    )
    dl.set_defaults(handler=_download)

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


# Flags of ``data build`` (argparse dest) read per input, and BuildConfig fields.
_INPUT_FLAGS = (
    "format",
    "orientation",
    "value_column",
    "sample_sheet",
    "unit",
    "id_type",
    "cohort",
)
_BUILD_FLAGS = (
    "survival",
    "endpoint",
    "mutations",
    "mutation_genes",
    "gene_lengths",
    "vocabulary",
    "min_vocabulary_fraction",
    "fill",
    "duplicate_genes",
    "id_conflicts",
    "duplicate_samples",
    "sample_types",
    "cohort_from_filename",
    "keep_counts",
)


def _input_entries(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The inputs as BuildConfig mappings: positional paths (globs expanded) replace the
    YAML's; reading flags apply to every input. ``None``: neither gives inputs."""
    from bulkfm.config import read_yaml
    from bulkfm.data.build import expand_inputs

    if args.inputs:
        raw: list[Any] = list(args.inputs)
    elif args.config is not None:
        raw = list(read_yaml(args.config).get("inputs") or [])
    else:
        raw = []
    entries: list[dict[str, Any]] = []
    for item in raw:
        spec = dict(item) if isinstance(item, dict) else {"path": item}
        if "path" not in spec:
            raise ConfigError(f"inputs entry {item!r} has no path; e.g. {{path: x.tsv}}")
        for path in expand_inputs([str(spec["path"])]):
            entries.append({**spec, "path": str(path)})
    for entry in entries:
        for dest in _INPUT_FLAGS:
            value = getattr(args, dest)
            if value is not None:
                entry[dest] = str(value) if isinstance(value, Path) else value
    _add_archs4_selection(args, entries)
    return entries or None


#: ``data build`` flags (argparse dest) -> fields of an ARCHS4 input's ``archs4`` selection.
_ARCHS4_FLAGS = {
    "archs4_series": "series",
    "archs4_source": "source",
    "archs4_samples": "samples",
    "archs4_genes": "genes",
    "archs4_max_singlecell": "max_singlecell_probability",
}


def _add_archs4_selection(args: argparse.Namespace, entries: list[dict[str, Any]]) -> None:
    """Put the --archs4-* flags into the ``archs4`` selection of every .h5 input."""
    from bulkfm.data.archs4 import read_id_list

    given = {
        key: getattr(args, dest)
        for dest, key in _ARCHS4_FLAGS.items()
        if getattr(args, dest, None) is not None
    }
    if not given:
        return
    for key in ("series", "samples", "genes"):
        if key in given:
            given[key] = read_id_list(given[key])
    targets = [
        e
        for e in entries
        if e.get("format") == "archs4" or Path(str(e["path"])).suffix.lower() in (".h5", ".hdf5")
    ]
    if not targets:
        flags = ", ".join(
            "--" + d.replace("_", "-") for d, k in _ARCHS4_FLAGS.items() if k in given
        )
        raise ConfigError(
            f"{flags} select samples of an ARCHS4 .h5 file, but no input is one (inputs: "
            f"{[str(e['path']) for e in entries][:3]}). Fix: pass the ARCHS4 .h5 file as an "
            "input, or drop the --archs4-* flags."
        )
    for entry in targets:
        entry["archs4"] = {**dict(entry.get("archs4") or {}), **given}


def _name_input_flag(exc: ConfigError, args: argparse.Namespace) -> ConfigError | None:
    """An error in ``inputs[i].<field>`` that a reading flag set names that flag (the user
    typed --unit, not inputs[0].unit)."""
    match = re.search(r"inputs\[\d+\]\.(\w+)", str(exc))
    if match is None or match.group(1) not in _INPUT_FLAGS:
        return None
    if getattr(args, match.group(1)) is None:
        return None
    flag = "--" + match.group(1).replace("_", "-")
    message = str(exc).replace(" (set by the input paths)", "")
    return ConfigError(f"{message} (set by {flag})")


def _build(args: argparse.Namespace) -> int:
    from bulkfm.data.build import BuildConfig, build_dataset, format_summary
    from bulkfm.io import H5AD_SUFFIXES, check_output_file, write_h5ad

    check_output_file(args.output, flag="--output", suffixes=H5AD_SUFFIXES)
    lists = {"mutation_genes": _split, "sample_types": _split}
    flags = given_flags(args, {dest: dest for dest in _BUILD_FLAGS}, convert=lists)
    entries = _input_entries(args)
    if entries is not None:
        flags["inputs"] = ("the input paths", entries)
    if "inputs" not in flags and not any(o.startswith("inputs=") for o in args.overrides):
        raise ConfigError(
            "no expression input given: pass files or folders, or inputs: in --config"
        )
    try:
        config = load_config(BuildConfig, args, flags=flags)
    except ConfigError as exc:
        named = _name_input_flag(exc, args)
        if named is None:
            raise
        raise named from exc
    adata = build_dataset(config)
    write_h5ad(adata, args.output, flag="--output")
    print(format_summary(adata))
    print(f"\nwrote {args.output}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from bulkfm.data.download import RetryPolicy
    from bulkfm.data.gdc import (
        CLINICAL_FILE,
        SAMPLE_SHEET_FILE,
        STAR_DATA_TYPE,
        STAR_WORKFLOW,
        GDCClient,
        GDCQuery,
        download_gdc,
        format_plan,
        plan_download,
        read_token,
    )
    from bulkfm.io import check_output_dir

    if args.retries < 0:
        raise ConfigError(f"--retries must be >= 0, got {args.retries}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if not args.dry_run:
        check_output_dir(args.output, flag="--output")
    projects = [p for text in args.project for p in (_split(text) or [])]
    query = GDCQuery(
        projects=tuple(projects),
        data_type=STAR_DATA_TYPE if args.data_type is None else args.data_type,
        workflow_type=STAR_WORKFLOW if args.workflow_type is None else (args.workflow_type or None),
        sample_types=tuple(_split(args.sample_types) or ()),
    )
    token = read_token(args.token_file) if args.token_file is not None else None
    client = GDCClient(args.api_url, token=token, retry=RetryPolicy(attempts=args.retries + 1))
    plan = plan_download(query, client)
    print(format_plan(plan))
    if args.dry_run:
        print("dry run: nothing downloaded or written")
        return 0
    done = download_gdc(
        plan,
        args.output,
        client,
        workers=args.workers,
        clinical=not args.no_clinical,
        clinical_table_path=args.clinical_table,
    )
    counts = ", ".join(f"{n} {status}" for status, n in sorted(done.counts().items()))
    print(f"files: {counts}; {done.n_bytes} bytes transferred")
    written = [done.sample_sheet, done.manifest] + ([done.clinical] if done.clinical else [])
    print("wrote " + ", ".join(str(p) for p in written))
    survival = f" --survival {args.output / CLINICAL_FILE}" if done.clinical else ""
    print(
        f"next: bulkfm data build {args.output} --sample-sheet "
        f"{args.output / SAMPLE_SHEET_FILE}{survival} -o data.h5ad"
    )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from bulkfm.data.simulate import SimulationConfig, simulate_bulk, write_simulated_files
    from bulkfm.io import H5AD_SUFFIXES, check_output_dir, check_output_file, write_h5ad

    check_output_file(args.output, flag="--output", suffixes=H5AD_SUFFIXES)
    if args.files is not None:
        check_output_dir(args.files, flag="--files")
    config = SimulationConfig(
        n_samples=args.n_samples, n_genes=args.n_genes, n_cohorts=args.n_cohorts, seed=args.seed
    )
    adata = simulate_bulk(config)
    write_h5ad(adata, args.output, flag="--output")
    print(f"simulated {adata.n_obs} samples x {adata.n_vars} genes -> {args.output}")
    if args.files is not None:
        written = write_simulated_files(adata, args.files)
        print(json.dumps({k: str(v) for k, v in written.items()}, indent=2))
    return 0


def _summary(args: argparse.Namespace) -> int:
    from bulkfm.data.build import format_summary
    from bulkfm.data.readers import read_h5ad

    print(format_summary(read_h5ad(args.path, flag="PATH", check_units=False)))
    return 0
