"""Run the linear-probe benchmark on the shared TCGA data and write its leaderboard.

    python scripts/run_shared_benchmark.py --out /tmp/shared_bench \
        [--shared ../shared/data] [--config configs/bench_shared_data.yaml] \
        [--model-dir [NAME=]PATH ...] [--gene-list FILE --normalization-factor F]

Steps: build the AnnData with the data layer exactly as tests/data/test_build.py
(TCGA 7-cohort counts + RNAseqDB/GTEx, CDR survival (OS), driver mutations, TPM),
keep TCGA tumours, run pca / nmf / raw (and BulkRNABert when a checkpoint is given)
on every feasible task, and write leaderboard.md/.csv, scores, plots and run.json
into --out. Results are derived from the shared data: keep --out outside the repo.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_shared_tcga(shared: Path):  # type: ignore[no-untyped-def]
    """The shared AnnData (same BuildConfig as the data layer's tests), TCGA tumours only."""
    from bulkfm import schema as keys
    from bulkfm.data.build import build_dataset, shared_data_config

    config = shared_data_config(shared)
    adata = build_dataset(config, progress=False)
    obs = adata.obs
    keep = (obs[keys.STUDY].astype(str) == "TCGA") & (obs[keys.SAMPLE_TYPE].astype(str) == "tumor")
    return adata[keep.to_numpy()].copy()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (outside the repo)")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "bench_shared_data.yaml")
    parser.add_argument(
        "--model-dir",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="weights of a model to add (NAME=PATH, e.g. geneformer=gf-6L-30M/; a bare PATH "
        "is a BulkRNABert checkpoint); repeatable",
    )
    parser.add_argument("--gene-list", help="gene ids of an official-format checkpoint")
    parser.add_argument("--normalization-factor", type=float, help="of an official checkpoint")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from bulkfm.bench.config import BenchFile
    from bulkfm.bench.models import DEFAULT_MODELS, build_models, parse_model_dirs
    from bulkfm.bench.report import family_table
    from bulkfm.bench.runner import run_benchmark
    from bulkfm.bench.selection import file_tasks
    from bulkfm.config import load
    from bulkfm.io import write_text

    spec = load(BenchFile, args.config, base={"bench": {"cache_dir": str(args.out / "cache")}})
    models = build_models(
        spec.model_names(DEFAULT_MODELS),
        model_args=spec.model_args,
        model_dirs=parse_model_dirs(args.model_dir),
        gene_list=args.gene_list,
        normalization_factor=args.normalization_factor,
    )
    t0 = time.perf_counter()
    adata = build_shared_tcga(args.shared)
    t_build = time.perf_counter() - t0
    print(f"built {adata.n_obs} TCGA tumour samples x {adata.n_vars} genes in {t_build:.0f} s")
    result = run_benchmark(adata, models, file_tasks(adata, spec), spec.bench)
    files = result.write(args.out, plots=not args.no_plots)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    write_text(command + "\n", args.out / "command.txt")
    print(family_table(result).to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"benchmark {result.timings['total']:.0f} s; wrote {', '.join(map(str, files.values()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
