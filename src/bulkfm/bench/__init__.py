"""Benchmark of expression embedding models by linear probing on frozen embeddings.

    from bulkfm.bench import BenchConfig, run_benchmark

    result = run_benchmark(adata, ["pca", "nmf", "raw"], "auto", BenchConfig(n_splits=10))
    result.write("bench_out/")          # leaderboard.csv/.md, scores.csv, run.json, plots/

Pieces: :mod:`~bulkfm.embedders` (models and their registry),
:mod:`~bulkfm.bench.tasks` (cancer type, mutations, survival),
:mod:`~bulkfm.tasks.probes` (tuned logistic / ridge-Cox probes),
:mod:`~bulkfm.bench.runner` and :mod:`~bulkfm.bench.report`. Metrics come from
:mod:`bulkfm.metrics`. torch is imported only when a BulkRNABert model runs.
"""

from bulkfm.bench.config import BenchConfig
from bulkfm.bench.runner import BenchResult, run_benchmark
from bulkfm.bench.tasks import TaskSelection, TaskSpec, default_tasks, parse_tasks
from bulkfm.embedders import (
    Embedder,
    available_embedders,
    get_embedder,
    register_embedder,
)
from bulkfm.tasks.probes import ProbeConfig, ProbeResult, run_probe

__all__ = [
    "BenchConfig",
    "BenchResult",
    "Embedder",
    "ProbeConfig",
    "ProbeResult",
    "TaskSelection",
    "TaskSpec",
    "available_embedders",
    "default_tasks",
    "get_embedder",
    "parse_tasks",
    "register_embedder",
    "run_benchmark",
    "run_probe",
]
