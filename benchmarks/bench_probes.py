"""Time the benchmark harness: 10 splits x every task for one model on ~1,300 samples.

    python benchmarks/bench_probes.py [--samples 1300] [--splits 10] [--model pca]

The model is fitted once on all samples and then served as a frozen embedding, i.e.
the situation "once embeddings are cached" (target: under a minute on 2 cores).
Prints the tasks, the time to make the splits, the probe time and the total, and
the time one split of a learning model's refit adds (PCA/NMF refit per split).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1300)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--model", default="pca", help="registered embedder to time")
    args = parser.parse_args()

    from bulkfm.bench.config import BenchConfig
    from bulkfm.bench.runner import run_benchmark
    from bulkfm.bench.selection import default_tasks
    from bulkfm.data.simulate import simulate_bulk
    from bulkfm.embedders import Embedder, get_embedder

    adata = simulate_bulk(n_samples=args.samples, n_genes=args.genes, seed=0)
    model = get_embedder(args.model)
    t0 = time.perf_counter()
    model.fit(adata)
    emb = np.asarray(model.transform(adata))
    t_fit = time.perf_counter() - t0

    class Cached(Embedder):
        """The model's embedding of every sample, looked up by id (as from the cache)."""

        name = f"{args.model}-cached"

        def transform(self, data):  # type: ignore[no-untyped-def]
            return emb[adata.obs_names.get_indexer(data.obs_names)]

    config = BenchConfig(n_splits=args.splits)
    selection = default_tasks(adata, config)
    print(
        f"data: {adata.n_obs} samples x {adata.n_vars} genes; embedding {emb.shape[1]}-d "
        f"({args.model}, fitted once in {t_fit:.1f} s)"
    )
    print(f"tasks ({len(selection.tasks)}): {', '.join(selection.names)}")
    print(f"skipped ({len(selection.skipped)}): {', '.join(selection.skipped)}")
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_benchmark(adata, [Cached()], selection, config, progress=False)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    t = result.timings
    print(
        f"{args.splits} splits x {len(selection.tasks)} tasks: total {total:.1f} s "
        f"(splits + setup {t['setup']:.1f} s, probes {t[f'{Cached.name}/probe']:.1f} s) "
        f"on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; CPU time "
        f"{cpu:.1f} s"
    )
    print(f"target: under 60 s -> {'OK' if total < 60 else 'TOO SLOW'}")
    print(result.leaderboard().to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
