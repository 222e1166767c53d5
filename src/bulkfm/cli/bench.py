"""``bulkfm bench``: benchmark embedding models on an .h5ad with linear probes.

Examples::

    bulkfm bench --data tcga.h5ad --models pca,nmf,raw --tasks auto --splits 10 --out bench/
    bulkfm bench --data tcga.h5ad --models pca,bulkrnabert --model-dir ckpt/ --out bench/
    bulkfm bench --data tcga.h5ad --models pca --embeddings scgpt=scgpt.parquet --out bench/
    bulkfm bench --data tcga.h5ad --tasks cancer_type,mutation:TP53,survival@* --out bench/
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bulkfm.cli.common import add_config_arguments, load_config
from bulkfm.errors import ConfigError, InputFileError

if TYPE_CHECKING:
    from bulkfm.embedders.base import Embedder

logger = logging.getLogger(__name__)

DEFAULT_MODELS = "pca,nmf,raw"

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
    "n_boot": "bench.n_boot",
    "seed": "bench.seed",
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
        help=f"comma-separated model names (default {DEFAULT_MODELS}); see --list-models",
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
    p.add_argument("--ci", choices=["splits", "test"], help="CI method (default splits)")
    p.add_argument("--n-boot", type=int, help="bootstrap resamples for the CI (1000)")
    p.add_argument("--seed", type=int, help="seed of the inner CV and bootstrap (0)")
    p.add_argument(
        "--model-dir",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="weights of a model: NAME=PATH adds the model NAME (e.g. geneformer=gf-6L-30M/, "
        "scgpt=scGPT_human/); a bare PATH is a BulkRNABert checkpoint (repeatable)",
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


def _split_list(value: Any) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


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


def _named_paths(items: list[str], *, default: str, flag: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, eq, path = str(item).partition("=")
        if not eq or "/" in name or "\\" in name:  # a bare path that contains "="
            name, path = default, str(item)
        name = name.strip()
        if name in out:
            raise ConfigError(f"two {flag} paths for the model {name!r}; give one per model")
        out[name] = Path(path.strip()).expanduser()
    return out


def parse_embeddings(items: list[str]) -> dict[str, Path]:
    """``["scgpt=a.parquet", "b.npy"]`` -> ``{"scgpt": a.parquet, "precomputed": b.npy}``."""
    return _named_paths(items, default="precomputed", flag="--embeddings")


def parse_model_dirs(items: list[str]) -> dict[str, Path]:
    """``["geneformer=gf/", "ckpt/"]`` -> ``{"geneformer": gf/, "bulkrnabert": ckpt/}``."""
    return _named_paths(items, default="bulkrnabert", flag="--model-dir")


def build_models(
    names: list[str],
    *,
    model_args: dict[str, dict[str, Any]],
    embeddings: dict[str, Path],
    embeddings_key: str | None = None,
    model_dirs: dict[str, Path] | None = None,
    gene_list: str | None = None,
    normalization_factor: float | None = None,
) -> list[Embedder]:
    """Embedder instances for CLI names (registered models and named embedding files).

    A model given weights (``model_dirs``) or an embedding file joins the list even
    when ``names`` omits it: one flag adds a model.
    """
    from bulkfm.embedders import available_embedders, get_embedder
    from bulkfm.embedders.precomputed import PrecomputedEmbedder

    known = set(available_embedders())
    model_dirs = dict(model_dirs or {})
    names = list(dict.fromkeys([*names, *embeddings, *model_dirs]))
    models: list[Embedder] = []
    for name in names:
        kw = dict(model_args.get(name, {}))
        if name in embeddings and (name == "precomputed" or name not in known):
            label = None if name == "precomputed" else name
            models.append(
                PrecomputedEmbedder(embeddings[name], key=embeddings_key, label=label, **kw)
            )
            continue
        if name in model_dirs:
            kw.setdefault("model_dir", model_dirs[name])
        if name == "bulkrnabert":
            kw.setdefault("genes", gene_list)
            kw.setdefault("normalization_factor", normalization_factor)
        models.append(get_embedder(name, **kw))
    return models


def _config_flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _load_spec(args: argparse.Namespace, out: Path) -> Any:
    """The benchmark file's settings with the flags over the YAML and --set over both."""
    from bulkfm.bench.config import BenchFile

    flags: dict[str, tuple[str, Any]] = {}
    for dest, key in _CONFIG_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            flags[key] = (_config_flag_name(dest), value)
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
    import anndata as ad

    if not path.is_file():
        raise InputFileError(f"--data {path} not found; pass an .h5ad built by bulkfm data build")
    return ad.read_h5ad(path)


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
    from bulkfm.bench.selection import default_tasks

    spec = _load_spec(args, args.out)
    config = spec.bench
    models = build_models(
        _split_list(spec.models or DEFAULT_MODELS),
        model_args=spec.model_args,
        embeddings=parse_embeddings(args.embeddings),
        embeddings_key=args.embeddings_key,
        model_dirs=parse_model_dirs(args.model_dir),
        gene_list=args.gene_list,
        normalization_factor=args.normalization_factor,
    )
    adata = _read_h5ad(args.data)
    tasks: Any = spec.tasks or "auto"
    genes = _split_list(spec.genes) or None
    cohorts = _split_list(spec.cohorts) or None
    if tasks == "auto" and (genes or cohorts):
        tasks = default_tasks(adata, config, genes=genes, cohorts=cohorts)
    result = run_benchmark(adata, models, tasks, config)
    files = result.write(args.out, plots=not args.no_plots)
    print(family_table(result).to_string(float_format=lambda v: f"{v:.3f}"))
    if result.skipped:
        print(f"\n{len(result.skipped)} task(s) skipped (reasons in leaderboard.md)")
    print(f"\nwrote {', '.join(str(p) for p in files.values())}", file=sys.stderr)
    return 0
