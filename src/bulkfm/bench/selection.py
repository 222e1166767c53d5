"""Which samples and tasks one benchmark run uses.

The task math (names, arrays, feasibility) lives in :mod:`bulkfm.tasks`; this module
only applies a :class:`~bulkfm.bench.config.BenchConfig` to it: the sample type the run
keeps, the survival endpoint the data must hold, and the default task list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bulkfm import schema as keys
from bulkfm.bench.config import BenchConfig, BenchFile
from bulkfm.errors import ConfigError
from bulkfm.tasks.data import select_tasks
from bulkfm.tasks.spec import TaskSelection, cohort_names, has_survival, mutation_genes, task_tokens

if TYPE_CHECKING:
    import anndata as ad

__all__ = [
    "bench_obs",
    "check_endpoint",
    "default_tasks",
    "file_tasks",
    "parse_tasks",
    "sample_mask",
]


def sample_mask(obs: pd.DataFrame, config: BenchConfig) -> np.ndarray:
    """Samples the benchmark uses: those of ``config.sample_type`` (all if None)."""
    if config.sample_type is None:
        return np.ones(len(obs), dtype=bool)
    if keys.SAMPLE_TYPE not in obs.columns:
        raise ConfigError(
            f"obs has no {keys.SAMPLE_TYPE!r} column but sample_type="
            f"{config.sample_type!r} was asked; add the column (bulkfm.data.clinical."
            "annotate_samples) or set sample_type=None to use every sample"
        )
    column = obs[keys.SAMPLE_TYPE].astype(object)
    mask = (column == config.sample_type).to_numpy()
    if not mask.any():
        present = column.value_counts().to_dict()
        raise ConfigError(
            f"no sample has sample_type {config.sample_type!r} (present: {present}); choose "
            "one of those or set sample_type=None"
        )
    return mask


def bench_obs(adata: ad.AnnData, config: BenchConfig) -> pd.DataFrame:
    """obs of the samples the benchmark uses (see :func:`sample_mask`)."""
    return adata.obs.iloc[np.flatnonzero(sample_mask(adata.obs, config))]


def check_endpoint(adata: ad.AnnData, config: BenchConfig) -> str | None:
    """The survival endpoint of the AnnData; an error if ``config.endpoint`` differs."""
    built = adata.uns.get(keys.UNS, {}).get("survival", {}).get("endpoint")
    default_keys = (config.time_key, config.event_key) == (
        keys.SURVIVAL_TIME,
        keys.SURVIVAL_EVENT,
    )
    asked = config.endpoint
    if asked is not None and built is not None and default_keys and str(asked) != str(built):
        raise ConfigError(
            f"the AnnData's survival columns hold endpoint {built!r} but endpoint="
            f"{config.endpoint!r} was asked; rebuild the data with that endpoint "
            f"(bulkfm data build --endpoint {config.endpoint}) or point time_key/event_key "
            "at columns holding it"
        )
    return config.endpoint if config.endpoint is not None else built


def parse_tasks(
    adata: ad.AnnData, tasks: str | Sequence[str] | None, config: BenchConfig | None = None
) -> TaskSelection:
    """Tasks from names (comma-separated string or list; grammar in
    :mod:`bulkfm.tasks.spec`). A task named explicitly that cannot be evaluated is an error;
    wildcards skip such tasks with the reason."""
    config = config or BenchConfig()
    check_endpoint(adata, config)
    return select_tasks(bench_obs(adata, config), task_tokens(tasks), config)[0]


def default_tasks(
    adata: ad.AnnData,
    config: BenchConfig | None = None,
    *,
    genes: Sequence[str] | None = None,
    cohorts: Sequence[str] | None = None,
    within_cohort: bool = True,
) -> TaskSelection:
    """Every feasible task, with the reason for each one left out.

    ``genes`` limits the mutation tasks (default: every mutation column), ``cohorts``
    the within-cohort tasks (default: every cohort); ``within_cohort=False`` keeps the
    pan-cancer tasks only.
    """
    config = config or BenchConfig()
    check_endpoint(adata, config)
    obs = bench_obs(adata, config)
    gene_list = list(genes) if genes is not None else mutation_genes(obs)
    cohort_list = list(cohorts) if cohorts is not None else cohort_names(obs, config.cohort_key)
    survival = has_survival(obs, config)
    tokens = ["cancer_type"]
    for g in gene_list:
        tokens.append(f"mutation:{g}")
        tokens += [f"mutation:{g}@{c}" for c in cohort_list] if within_cohort else []
    if survival:
        tokens.append("survival")
        tokens += [f"survival@{c}" for c in cohort_list] if within_cohort else []
    selection = select_tasks(obs, tokens, config, lenient=True)[0]
    if not survival:
        selection.skipped["survival"] = (
            f"obs has no {config.time_key!r}/{config.event_key!r} columns (join survival data "
            "when building the AnnData)"
        )
    return selection


def file_tasks(adata: ad.AnnData, spec: BenchFile) -> TaskSelection | str | list[str]:
    """The tasks a benchmark file asks for: its task names, or ``"auto"`` (every feasible
    task), narrowed to the file's ``genes`` / ``cohorts`` when it names them."""
    tasks = spec.tasks or "auto"
    genes, cohorts = spec.gene_names(), spec.cohort_names()
    if tasks == "auto" and (genes or cohorts):
        return default_tasks(adata, spec.bench, genes=genes, cohorts=cohorts)
    return tasks
