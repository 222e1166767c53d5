"""Run every model on every task over the same patient-grouped splits.

Every model sees *the same* splits of a task (made once, before any model runs),
so differences between models are paired comparisons, not split luck. Frozen
models are embedded once for all samples (and cached on disk); learning models
are refitted on each split's training samples. Then a linear probe per split
(:mod:`bulkfm.tasks.probes`) gives test predictions, scored with
:mod:`bulkfm.metrics`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bulkfm.bench.cache import EmbeddingCache
from bulkfm.bench.config import BenchConfig
from bulkfm.bench.results import BenchResult
from bulkfm.bench.selection import check_endpoint, default_tasks, parse_tasks, sample_mask
from bulkfm.embedders.base import Embedder
from bulkfm.embedders.registry import get_embedder
from bulkfm.errors import (
    BulkfmError,
    BulkfmWarning,
    ConfigError,
    ExpressionValueError,
    SplitError,
)
from bulkfm.fingerprint import data_fingerprint
from bulkfm.io import check_output_dir
from bulkfm.tasks.data import TaskData, prepare_task
from bulkfm.tasks.probes import run_probe
from bulkfm.tasks.spec import TaskSelection, TaskSpec
from bulkfm.tokenize import missing_layer

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.data.splits import Split

logger = logging.getLogger(__name__)

__all__ = ["BenchResult", "run_benchmark", "task_metrics"]


# --------------------------------------------------------------------------- metrics


def task_metrics(td: TaskData, test: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """All metrics of one split; the task's headline metric (``td.spec.metric``) included."""
    from bulkfm import metrics

    y = td.y[test]
    kind = td.spec.kind
    if kind == "multiclass":
        m = metrics.classification_metrics(y, prediction, labels=list(range(len(td.classes))))
        return {k: float(m[k]) for k in ("macro_f1", "accuracy", "weighted_f1")}
    if kind == "binary":
        return {"auroc": metrics.auroc(y, prediction)}
    out = {"c_index": metrics.concordance_index(y[:, 0], y[:, 1], prediction)}
    if td.spec.cohort is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BulkfmWarning)  # small cohorts of one test set
            cc = metrics.cohort_concordance(y[:, 0], y[:, 1], prediction, td.cohort_labels[test])
        out["c_index_within_cohort"] = float(cc["weighted"])
    return out


def _primary_fn(td: TaskData, test: np.ndarray) -> tuple[Any, tuple[np.ndarray, ...]]:
    """(metric function, extra arrays) for bootstrapping the headline metric of a split."""
    from bulkfm import metrics

    task = td.spec
    y = td.y[test]
    if task.kind == "multiclass":
        labels = list(range(len(td.classes)))
        return (lambda t, p: metrics.classification_metrics(t, p, labels=labels)["macro_f1"]), (y,)
    if task.kind == "binary":
        return metrics.auroc, (y,)
    if task.cohort is None:

        def within(time: np.ndarray, event: np.ndarray, risk: np.ndarray, coh: np.ndarray) -> float:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BulkfmWarning)
                return metrics.cohort_concordance(time, event, risk, coh)["weighted"]

        return (lambda tm, ev, co, risk: within(tm, ev, risk, co)), (
            y[:, 0],
            y[:, 1],
            td.cohort_labels[test],
        )
    return (lambda tm, ev, risk: metrics.concordance_index(tm, ev, risk)), (y[:, 0], y[:, 1])


def _split_ci(
    td: TaskData, test: np.ndarray, prediction: np.ndarray, config: BenchConfig, seed: int
) -> tuple[float, float]:
    from bulkfm import metrics

    if config.ci_method != "test":
        return float("nan"), float("nan")
    fn, arrays = _primary_fn(td, test)
    try:
        return metrics.bootstrap_ci(
            fn,
            *arrays,
            prediction,
            n_boot=max(config.n_boot, 10),
            seed=seed,
            alpha=1.0 - config.ci_level,
        )
    except BulkfmError as exc:
        logger.info("no bootstrap CI for %s: %s", td.spec.name, exc)
        return float("nan"), float("nan")


# --------------------------------------------------------------------------- models


def _resolve_models(models: Sequence[Embedder | str] | Embedder | str) -> list[Embedder]:
    if isinstance(models, Embedder | str):
        models = [models]
    out: list[Embedder] = []
    for m in models:
        if isinstance(m, str):
            out.extend(get_embedder(name.strip()) for name in m.split(",") if name.strip())
        elif isinstance(m, Embedder):
            out.append(m)
        else:
            raise ConfigError(f"models must be Embedder instances or names, got {type(m).__name__}")
    if not out:
        raise ConfigError("no model given; e.g. models=['pca', 'raw']")
    labels = [m.label for m in out]
    dups = sorted({x for x in labels if labels.count(x) > 1})
    if dups:
        raise ConfigError(f"model labels must be unique, {dups} repeat; give each a label=")
    return out


def _checked_embedding(emb: Any, model: Embedder, ids: pd.Index) -> np.ndarray:
    arr = np.asarray(emb, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != len(ids):
        raise ExpressionValueError(
            f"model {model.label!r} returned an array of shape {arr.shape} for {len(ids)} "
            "samples; an embedder must return one row per sample"
        )
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ExpressionValueError(
            f"model {model.label!r} produced NaN/inf embeddings for {int(bad.sum())} of "
            f"{len(ids)} samples (e.g. {list(ids[bad][:3])}); check those samples' expression "
            "values (NaN/inf input?) or the model"
        )
    return arr


def _frozen_embedding(
    model: Embedder, bench: ad.AnnData, data_fp: str, cache: EmbeddingCache | None
) -> np.ndarray:
    store = cache if model.cacheable else None
    if store is not None:
        hit = store.load(model, data_fp, bench.n_obs)
        if hit is not None:
            return _checked_embedding(hit, model, bench.obs_names)
    emb = _checked_embedding(model.transform(bench), model, bench.obs_names)
    if store is not None:
        store.save(model, data_fp, emb.astype(np.float32))
    return emb


def _embedding_for_split(
    model: Embedder,
    bench: ad.AnnData,
    td: TaskData,
    split: Split,
    frozen: np.ndarray | None,
) -> np.ndarray:
    if frozen is not None:
        return frozen[td.index]
    train_rows = td.index[split.train]
    model.fit(bench[train_rows])
    subset = bench[td.index]
    return _checked_embedding(model.transform(subset), model, subset.obs_names)


# --------------------------------------------------------------------------- tasks


def _select_tasks(
    adata: ad.AnnData,
    tasks: TaskSelection | Sequence[TaskSpec] | Sequence[str] | str | None,
    config: BenchConfig,
) -> TaskSelection:
    if tasks is None or (isinstance(tasks, str) and tasks.strip() == "auto"):
        return default_tasks(adata, config)
    if isinstance(tasks, TaskSelection):
        return tasks
    if isinstance(tasks, str):
        return parse_tasks(adata, tasks, config)
    names = [t for t in tasks if isinstance(t, str)]
    specs = [t for t in tasks if isinstance(t, TaskSpec)]
    if len(names) == len(tasks):
        return parse_tasks(adata, names, config)
    if len(specs) == len(tasks):
        return TaskSelection(tasks=specs)
    raise ConfigError("tasks must be 'auto', task names, TaskSpec objects or a TaskSelection")


def _make_splits(td: TaskData, config: BenchConfig) -> list[Split]:
    from bulkfm.data.splits import holdout_splits

    with _naming_task(td.spec.name):
        return holdout_splits(
            td.strata, td.groups, seeds=config.split_seeds(), test_size=config.test_size
        )


@contextlib.contextmanager
def _naming_task(name: str, model: str | None = None) -> Iterator[None]:
    """A SplitError raised inside names the task (and model) it was raised for."""
    try:
        yield
    except SplitError as exc:
        if str(exc).startswith(f"task {name!r}"):
            raise
        where = f"task {name!r}" + (f", model {model!r}" if model else "")
        raise SplitError(f"{where}: {exc}") from exc


@contextlib.contextmanager
def _blas_threads(n: int | None) -> Iterator[None]:
    """Cap BLAS threads: on a shared machine small matrix products are ~10x faster single-
    threaded than with threads contending for cores."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


# --------------------------------------------------------------------------- main loop


def _score_split(
    model: Embedder,
    td: TaskData,
    split_no: int,
    split: Split,
    X: np.ndarray,
    config: BenchConfig,
) -> list[dict[str, Any]]:
    task = td.spec
    with _naming_task(task.name, model.label):
        result = run_probe(
            task.kind,
            X[split.train],
            X[split.test],
            td.y[split.train],
            td.groups[split.train],
            config.probe_config(),
            strata_train=td.strata[split.train],
        )
    values = task_metrics(td, split.test, result.prediction)
    seed = config.seed * 100_003 + (split.seed or 0)
    ci_low, ci_high = _split_ci(td, split.test, result.prediction, config, seed)
    y_test = td.y[split.test]
    n_pos = int(y_test[:, 1].sum()) if task.kind == "survival" else int((y_test == 1).sum())
    rows = []
    for metric, value in values.items():
        primary = metric == task.metric
        rows.append(
            {
                "model": model.label,
                "task": task.name,
                "family": task.family,
                "metric": metric,
                "primary": primary,
                "split": split_no,
                "seed": split.seed,
                "value": float(value),
                "ci_low": ci_low if primary else float("nan"),
                "ci_high": ci_high if primary else float("nan"),
                "param": result.param,
                "n_features": result.n_features,
                "n_train": int(split.train.size),
                "n_test": int(split.test.size),
                "n_test_positive_or_events": n_pos if task.kind != "multiclass" else None,
            }
        )
    return rows


def _summarise(scores: pd.DataFrame, config: BenchConfig) -> pd.DataFrame:
    from bulkfm import metrics

    rows = []
    keys = ["model", "task", "family", "metric", "primary"]
    for key, group in scores.groupby(keys, sort=False):
        stats = metrics.mean_std(group["value"].to_numpy())
        if config.ci_method == "test":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (secondary metrics)
                lo, hi = np.nanmean(group["ci_low"]), np.nanmean(group["ci_high"])
        else:
            lo, hi = _splits_ci(group["value"].to_numpy(), config)
        rows.append(
            {
                **dict(zip(keys, key, strict=True)),
                "mean": stats["mean"],
                "std": stats["std"],
                "ci_low": float(lo),
                "ci_high": float(hi),
                "n_splits": stats["n"],
                "n_nan": stats["n_nan"],
            }
        )
    return pd.DataFrame(rows)


def _splits_ci(values: np.ndarray, config: BenchConfig) -> tuple[float, float]:
    from bulkfm import metrics

    values = values[np.isfinite(values)]
    if values.size < 2:
        return float("nan"), float("nan")
    return metrics.bootstrap_ci(
        np.mean, values, n_boot=max(config.n_boot, 10), seed=config.seed, alpha=1 - config.ci_level
    )


def run_benchmark(
    adata: ad.AnnData,
    models: Sequence[Embedder | str] | Embedder | str,
    tasks: TaskSelection | Sequence[TaskSpec] | Sequence[str] | str | None = None,
    config: BenchConfig | None = None,
    *,
    progress: bool | None = None,
) -> BenchResult:
    """Benchmark ``models`` on ``tasks`` (``None``/"auto": every feasible task).

    ``models``: :class:`Embedder` instances or registered names. ``progress=None``
    shows a bar only on a terminal.
    """
    from tqdm.auto import tqdm

    config = config or BenchConfig()
    if config.cache_dir:
        check_output_dir(config.cache_dir, flag="--cache-dir / cache_dir=")
    t_start = time.perf_counter()
    embedders = _resolve_models(models)
    endpoint = check_endpoint(adata, config)
    missing_layer(adata)  # every model reads it: a non-boolean layer is an error up front
    mask = sample_mask(adata.obs, config)
    bench = adata if mask.all() else adata[mask].copy()
    selection = _select_tasks(adata, tasks, config)
    if not selection.tasks:
        raise ConfigError(
            "no task can be evaluated on these data; reasons: "
            + "; ".join(f"{k}: {v}" for k, v in selection.skipped.items())
        )
    prepared = {}
    for t in selection.tasks:
        with _naming_task(t.name):
            prepared[t.name] = prepare_task(bench.obs, t, config)
    splits = {name: _make_splits(td, config) for name, td in prepared.items()}
    data_fp = data_fingerprint(bench)
    cache = EmbeddingCache(config.cache_dir) if config.cache_dir else None
    timings: dict[str, float] = {"setup": time.perf_counter() - t_start}
    n_steps = len(embedders) * sum(len(s) for s in splits.values())
    rows: list[dict[str, Any]] = []
    with (
        _blas_threads(config.blas_threads),
        tqdm(total=n_steps, desc="bench", unit="split", disable=_no_bar(progress)) as bar,
    ):
        for model in embedders:
            t0 = time.perf_counter()
            frozen = None if model.learns else _frozen_embedding(model, bench, data_fp, cache)
            timings[f"{model.label}/embed"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            for task in selection.tasks:
                td = prepared[task.name]
                primary = []
                for i, split in enumerate(splits[task.name]):
                    bar.set_postfix_str(f"{model.label} {task.name}", refresh=False)
                    X = _embedding_for_split(model, bench, td, split, frozen)
                    split_rows = _score_split(model, td, i, split, X, config)
                    primary += [r["value"] for r in split_rows if r["primary"]]
                    rows.extend(split_rows)
                    bar.update()
                logger.info(
                    "%s / %s: %s %.3f ± %.3f",
                    model.label,
                    task.name,
                    task.metric,
                    np.mean(primary),
                    np.std(primary, ddof=1) if len(primary) > 1 else float("nan"),
                )
            timings[f"{model.label}/probe"] = time.perf_counter() - t1
    scores = pd.DataFrame(rows)
    timings["total"] = time.perf_counter() - t_start
    return BenchResult(
        scores=scores,
        summary=_summarise(scores, config),
        tasks=list(selection.tasks),
        task_info={name: td.info for name, td in prepared.items()},
        skipped=dict(selection.skipped),
        config=config,
        data_fingerprint=data_fp,
        models=[_describe(m) for m in embedders],
        endpoint=endpoint,
        n_samples=int(bench.n_obs),
        timings=timings,
    )


def _describe(model: Embedder) -> dict[str, Any]:
    info = model.describe()
    overlap = getattr(model, "overlap", None)
    if overlap:
        info["overlap"] = overlap
    return info


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress
