"""Time `build_dataset` on the shared TCGA + RNAseqDB + GTEx data (target: under a minute).

    python benchmarks/build_shared_data.py [--shared ../shared/data] [--output shared.h5ad]

Prints wall time per stage and peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from bulkfm.data.build import build_dataset, format_summary, shared_data_config
from bulkfm.io import write_h5ad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).parents[2] / "shared" / "data"
    )
    parser.add_argument("--output", type=Path, help="also write the .h5ad (timed separately)")
    args = parser.parse_args()
    shared = args.shared
    t0 = time.perf_counter()
    config = shared_data_config(shared)
    adata = build_dataset(config, progress=False)
    t_build = time.perf_counter() - t0
    print(format_summary(adata))
    print(f"\nbuild: {t_build:.1f} s (target < 60 s)")
    if args.output:
        t1 = time.perf_counter()
        write_h5ad(adata, args.output)
        print(f"write: {time.perf_counter() - t1:.1f} s -> {args.output}")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"peak RSS: {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
