"""``bulkfm bench``: benchmark embedding models on an .h5ad with linear probes.

Examples::

    bulkfm bench --data tcga.h5ad --models pca,nmf,raw --tasks auto --splits 10 --out bench/
    bulkfm bench --data tcga.h5ad --models pca,bulkrnabert --model-dir ckpt/ --out bench/
    bulkfm bench --data tcga.h5ad --models pca --embeddings scgpt=scgpt.parquet --out bench/
    bulkfm bench --data tcga.h5ad --tasks cancer_type,mutation:TP53,survival@* --out bench/
    bulkfm bench --data tcga.h5ad --models pca,nmf,raw --workers 4 --out bench/
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

from bulkfm.bench.models import DEFAULT_MODELS, build_models, parse_embeddings, parse_model_dirs
from bulkfm.cli.common import add_config_arguments, given_flags, load_config
from bulkfm.errors import ConfigError
from bulkfm.io import check_output_dir

logger = logging.getLogger(__name__)

# CLI flag (argparse dest) -> config key of BenchFile; flags left unset keep the YAML value.
_CONFIG_FLAGS = {
    "splits": "bench.n_splits",
    "test_size": "bench.test_size",
    "inner_folds": "bench.inner_folds",
    "min_positives": "bench.min_positives",
    "min_negatives": "bench.min_negatives",
    "min_events": "bench.min_events",
    "min_class_patients": "bench.min_class_patients",
    "endpoint": "bench.endpoint",
    "ci": "bench.ci_method",
    "seed": "bench.seed",
    "workers": "bench.workers",
    "models": "models",
    "tasks": "tasks",
    "genes": "genes",
    "cohorts": "cohorts",
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark embedding models with linear probes (cancer type, mutations, survival)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", type=Path, help="input .h5ad (X = TPM; obs cohort, patient, ...)")
    p.add_argument(
        "--models",
        help=f"comma-separated model names (default {','.join(DEFAULT_MODELS)}); see --list-models",
    )
    p.add_argument(
        "--tasks",
        help="'auto' (default) or comma-separated task names: cancer_type, mutation:TP53, "
        "mutation:TP53@BRCA, mutation@*, survival, survival@ACC, survival@*",
    )
    p.add_argument("--out", type=Path, help="output folder (leaderboard, scores, plots, run.json)")
    add_config_arguments(
        p,
        "YAML with bench: (settings), models, model_args, tasks, genes, cohorts",
        "--set bench.n_splits=5 --set model_args.pca.n_components=64",
        required=False,
    )
    p.add_argument("--splits", type=int, help="number of random patient-grouped splits (10)")
    p.add_argument("--test-size", type=float, help="fraction of patients in test (0.2)")
    p.add_argument("--inner-folds", type=int, help="inner CV folds for the penalty (3)")
    p.add_argument("--min-positives", type=int, help="min mutated patients per task (20)")
    p.add_argument("--min-negatives", type=int, help="min wild-type patients per task (20)")
    p.add_argument("--min-events", type=int, help="min patients with an event (20)")
    p.add_argument("--min-class-patients", type=int, help="min patients per cancer type (20)")
    p.add_argument("--genes", help="comma-separated driver genes for auto tasks (default: all)")
    p.add_argument("--cohorts", help="comma-separated cohorts for within-cohort auto tasks")
    p.add_argument(
        "--sample-type",
        help="use only samples of this obs sample_type (default 'tumor'; 'all' for every sample)",
    )
    p.add_argument("--endpoint", help="survival endpoint the data were built for (check only)")
    p.add_argument(
        "--ci",
        choices=["calibrated", "nadeau_bengio"],
        help="interval of the mean over the overlapping splits: corrected resampled t with the "
        "split correlation calibrated (default) or Nadeau & Bengio's (narrower)",
    )
    p.add_argument("--seed", type=int, help="seed of the inner CV (0)")
    p.add_argument(
        "--workers",
        type=int,
        help="processes that share the (model, task, split) probe fits (1: this process); "
        "the scores equal those of one process",
    )
    p.add_argument(
        "--model-dir",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="weights of a model: NAME=PATH adds the model NAME (e.g. geneformer=gf-6L-30M/, "
        "scgpt=scGPT_human/); PATH may be a Hugging Face repo OWNER/NAME[@REVISION]"
        "[:SUBFOLDER] fetched into the HF cache (geneformer=ctheodoris/Geneformer:"
        "Geneformer-V1-10M; a bare InstaDeepAI/BulkRNABert needs no --gene-list); a bare "
        "PATH is a BulkRNABert checkpoint (repeatable)",
    )
    p.add_argument("--gene-list", help="gene id file of an official-format checkpoint")
    p.add_argument("--normalization-factor", type=float, help="of an official checkpoint")
    p.add_argument(
        "--embeddings",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="precomputed embeddings (.parquet/.csv/.npy+ids/.h5ad); NAME=FILE adds a model "
        "called NAME, a bare FILE serves the model 'precomputed' (repeatable)",
    )
    p.add_argument("--embeddings-key", help="obsm key when --embeddings is an .h5ad")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="MODEL:KEY=VALUE",
        help="a model setting, e.g. pca:n_components=128 (repeatable)",
    )
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module that registers more models (@register_embedder)",
    )
    p.add_argument("--cache-dir", type=Path, help="embedding cache (default OUT/cache)")
    p.add_argument("--no-cache", action="store_true", help="do not cache frozen embeddings")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list-models", action="store_true", help="list known models and exit")
    p.set_defaults(handler=run_cli)


# --------------------------------------------------------------------------- parsing


def parse_model_args(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["pca:n_components=128"]`` -> ``{"pca": {"n_components": 128}}`` (values via YAML)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        model, sep, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not (sep and eq and model and key):
            raise ConfigError(f"--model-arg {item!r} must look like MODEL:KEY=VALUE")
        out.setdefault(model.strip(), {})[key.strip()] = yaml.safe_load(value)
    return out


def _load_spec(args: argparse.Namespace, out: Path) -> Any:
    """The benchmark file's settings with the flags over the YAML and --set over both."""
    from bulkfm.bench.config import BenchFile

    flags = given_flags(args, _CONFIG_FLAGS)
    if args.sample_type is not None:
        value = None if args.sample_type == "all" else args.sample_type
        flags["bench.sample_type"] = ("--sample-type", value)
    if args.no_cache:
        flags["bench.cache_dir"] = ("--no-cache", None)
    elif args.cache_dir is not None:
        flags["bench.cache_dir"] = ("--cache-dir", str(args.cache_dir))
    for model, values in parse_model_args(args.model_arg).items():
        for key, value in values.items():
            flags[f"model_args.{model}.{key}"] = ("--model-arg", value)
    defaults = {"bench": {"cache_dir": str(out / "cache")}}
    return load_config(BenchFile, args, flags=flags, defaults=defaults)


def _read_h5ad(path: Path) -> Any:
    from bulkfm.data.readers import read_h5ad

    return read_h5ad(path, flag="--data")


# --------------------------------------------------------------------------- handler


def run_cli(args: argparse.Namespace) -> int:
    for module in args.imports:
        importlib.import_module(module)
    if args.list_models:
        from bulkfm.embedders import available_embedders

        print("\n".join(available_embedders()))
        return 0
    if args.data is None or args.out is None:
        raise ConfigError("bulkfm bench needs --data X.h5ad and --out DIR")
    from bulkfm.bench.report import family_table
    from bulkfm.bench.runner import run_benchmark
    from bulkfm.bench.selection import file_tasks

    check_output_dir(args.out, flag="--out")
    spec = _load_spec(args, args.out)
    if spec.bench.cache_dir is not None:
        check_output_dir(spec.bench.cache_dir, flag="--cache-dir")
    models = build_models(
        spec.model_names(DEFAULT_MODELS),
        model_args=spec.model_args,
        embeddings=parse_embeddings(args.embeddings),
        embeddings_key=args.embeddings_key,
        model_dirs=parse_model_dirs(args.model_dir),
        gene_list=args.gene_list,
        normalization_factor=args.normalization_factor,
    )
    adata = _read_h5ad(args.data)
    result = run_benchmark(adata, models, file_tasks(adata, spec), spec.bench)
    files = result.write(args.out, plots=not args.no_plots)
    print(family_table(result).to_string(float_format=lambda v: f"{v:.3f}"))
    if result.skipped:
        print(f"\n{len(result.skipped)} task(s) skipped (reasons in leaderboard.md)")
    print(f"\nwrote {', '.join(str(p) for p in files.values())}", file=sys.stderr)
    return 0
