"""Pre-train BulkRNABert on the shared TCGA/GTEx data and run the paper's evaluation.

    python scripts/run_shared_evaluation.py [--shared ../shared/data] \
        [--out runs/shared_evaluation] [--set key=value ...]

1. builds the shared data through the data layer, in memory (the same inputs as the
   test suite's shared build: TCGA tumour counts of 7 cohorts, RNAseqDB tumours and
   normals, GTEx normals, TCGA-CDR survival, driver mutations); nothing derived from
   the shared files is written into the project;
2. runs ``configs/evaluate_shared_data.yaml``: pre-training on all 1,286 samples, then
   cancer-type classification of the TCGA tumours and pan-cancer survival, BulkRNABert
   against every baseline over 5 seeds, with per-cohort survival, transfer, missing-gene
   robustness and the cohort-similarity dendrogram;
3. writes results.json, report.md, report.html and plots/ into ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "evaluate_shared_data.yaml"


def shared_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    env = os.environ.get("BULKFM_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def build_shared(shared: Path):  # -> anndata.AnnData
    """The shared TCGA + RNAseqDB + GTEx samples, harmonised, TPM, survival joined."""
    from bulkfm.data.build import build_dataset, shared_data_config

    config = shared_data_config(shared)  # RNAseqDB copies of TCGA aliquots: deduped later
    return build_dataset(config, progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=None, help="the shared data folder")
    parser.add_argument("--config", type=Path, default=CONFIG, help="evaluation YAML")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet = ("bulkfm.tasks", "bulkfm.tokenize", "bulkfm.models.ia3", "bulkfm.train.finetune")
    for name in quiet:  # per-split and per-batch lines; the report has the numbers
        logging.getLogger(name).setLevel(logging.WARNING)

    from bulkfm.errors import BulkfmError
    from bulkfm.evaluate import run_evaluation
    from bulkfm.evaluate.config import EvaluateConfig

    shared = shared_dir(args.shared)
    if not (shared / "README.md").is_file():
        print(f"error: shared data not found at {shared}; pass --shared DIR", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if args.out is not None:
        overrides.append(f"output_dir={args.out}")
    try:
        config = EvaluateConfig.from_yaml(args.config, overrides)
        t0 = time.perf_counter()
        adata = build_shared(shared)
        elapsed = time.perf_counter() - t0
        print(f"built {adata.n_obs} samples x {adata.n_vars} genes in {elapsed:.0f} s")
        result = run_evaluation(config, adata=adata)
    except BulkfmError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print((result.out_dir / "report.md").read_text())
    print(f"total {time.perf_counter() - t0:.0f} s; results in {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
