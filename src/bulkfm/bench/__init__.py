"""Benchmark of expression embedding models by linear probing on frozen embeddings.

    from bulkfm.bench import BenchConfig, run_benchmark

    result = run_benchmark(adata, ["pca", "nmf", "raw"], "auto", BenchConfig(n_splits=10))
    result.write("bench_out/")          # leaderboard.csv/.md, scores.csv, run.json, plots/

An orchestrator: the task math is :mod:`bulkfm.tasks` (task specs and arrays in
:mod:`~bulkfm.tasks.spec` / :mod:`~bulkfm.tasks.data`, tuned logistic / ridge-Cox probes
in :mod:`~bulkfm.tasks.probes`), the models are :mod:`bulkfm.embedders`, the splits
:mod:`bulkfm.data.splits`. Here: which samples and tasks a run uses
(:mod:`~bulkfm.bench.selection`), the loop (:mod:`~bulkfm.bench.runner`), its typed
outcome (:mod:`~bulkfm.bench.results`) and the files (:mod:`~bulkfm.bench.report`).
Metrics come from :mod:`bulkfm.metrics`. torch is imported only when a BulkRNABert model
runs.
"""

from bulkfm.bench.config import BenchConfig
from bulkfm.bench.results import BenchResult
from bulkfm.bench.runner import run_benchmark
from bulkfm.bench.selection import default_tasks, parse_tasks
from bulkfm.embedders import (
    Embedder,
    available_embedders,
    get_embedder,
    register_embedder,
)
from bulkfm.tasks.probes import ProbeConfig, ProbeResult, run_probe
from bulkfm.tasks.spec import TaskSelection, TaskSpec

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
