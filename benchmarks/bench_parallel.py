"""Time ``bulkfm bench`` with 1 and with 2 worker processes on the same simulated data.

    python benchmarks/bench_parallel.py [--samples 1000] [--genes 2000] [--splits 4]
        [--models pca,nmf,random] [--workers 2] [--json out.json]

Runs the same benchmark (every feasible task, the classical models refitted per split)
in one process and then with ``--workers`` spawned processes, checks that the two score
tables are equal, and prints both wall times and their ratio (the speed-up). The
parallel time includes starting the workers (each imports bulkfm and receives the data),
so small runs gain little. The machine's load average is printed beside the times: on
a machine shared with other jobs the ratio understates what idle cores give.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, write_json


def _run(adata: Any, names: Sequence[str], config: Any) -> tuple[Any, float, float]:
    from bulkfm.bench.runner import run_benchmark
    from bulkfm.embedders import get_embedder

    models = [get_embedder(name) for name in names]
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_benchmark(adata, models, "auto", config, progress=False)
    return result, time.perf_counter() - t0, time.process_time() - c0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--splits", type=int, default=4)
    parser.add_argument("--models", default="pca,nmf,random", help="registered embedders")
    parser.add_argument("--workers", type=int, default=2, help="processes of the parallel run")
    parser.add_argument("--min-patients", type=int, default=20, help="task thresholds")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    import pandas as pd

    from bulkfm.bench.config import BenchConfig
    from bulkfm.data.simulate import simulate_bulk

    adata = simulate_bulk(n_samples=args.samples, n_genes=args.genes, seed=0)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    m = args.min_patients
    base = BenchConfig(
        n_splits=args.splits,
        min_positives=m,
        min_negatives=m,
        min_events=m,
        min_class_patients=m,
    )
    print(f"data: {adata.n_obs} samples x {adata.n_vars} genes; models {', '.join(names)}")
    print(machine_line(1) + " (before)")
    one, wall_1, cpu_1 = _run(adata, names, base)
    parallel = BenchConfig(**{**base.to_dict(), "workers": args.workers})
    many, wall_n, cpu_n = _run(adata, names, parallel)
    try:
        pd.testing.assert_frame_equal(one.scores, many.scores, check_exact=True)
        same = True
    except AssertionError:
        same = False
    fits = one.scores[~one.scores["reference"]][["model", "task", "split"]].drop_duplicates()
    n_units = len(fits)
    row = {
        "samples": adata.n_obs,
        "genes": adata.n_vars,
        "models": names,
        "tasks": [t.name for t in one.tasks],
        "splits": args.splits,
        "workers": args.workers,
        "wall_s_1": wall_1,
        "wall_s_n": wall_n,
        "speedup": wall_1 / wall_n,
        "parent_cpu_s_1": cpu_1,
        "parent_cpu_s_n": cpu_n,
        "scores_identical": same,
        "cpus": os.cpu_count(),
        "load_average_1min_after": os.getloadavg()[0],
    }
    print(f"tasks ({len(one.tasks)}): {', '.join(row['tasks'])}; {n_units} probe fits")
    print(f"1 process: {wall_1:.1f} s; {args.workers} workers: {wall_n:.1f} s")
    print(f"speed-up (1-process time / {args.workers}-worker time): {row['speedup']:.2f}x")
    print(f"scores identical: {'yes' if same else 'NO'}")
    print(machine_line(1) + " (after; a load above the CPU count means other jobs shared them)")
    write_json(args.json, row)
    return row


if __name__ == "__main__":
    main()
