"""Run every model on every task over the same patient-grouped splits.

Every model sees *the same* splits of a task (made once, before any model runs),
so differences between models are paired comparisons, not split luck. Frozen
models are embedded once for all samples (and cached on disk); learning models
are refitted on each split's training samples. Then a linear probe per split
(:mod:`bulkfm.tasks.probes`) gives test predictions, scored with
:mod:`bulkfm.metrics`.

Beside the models, each pan-cancer mutation task is also probed on one-hot cohort
labels over the same splits (model :data:`COHORT_REFERENCE`, rows marked ``reference``):
what cohort identity alone achieves, printed beside every model's score with the
model's cohort-adjusted AUROC (pairs within one cohort only). Warnings a run raises
(few test cases, a model's own warnings repeated per split) are said once per run.
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

__all__ = ["COHORT_REFERENCE", "BenchResult", "run_benchmark", "task_metrics"]

#: Model label of the cohort-identity probe (one-hot cohort labels) of pan-cancer
#: mutation tasks; its rows in ``scores`` / ``summary`` have ``reference`` True.
COHORT_REFERENCE = "cohort identity"


# --------------------------------------------------------------------------- metrics


def _pan_cancer_mutation(task: TaskSpec) -> bool:
    return task.family == "mutation" and task.cohort is None


def task_metrics(td: TaskData, test: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """All metrics of one split; the task's headline metric (``td.spec.metric``) included.

    Pan-cancer mutation tasks add ``auroc_within_cohort`` (AUROC over mutated / wild-type
    pairs of one cohort, :func:`bulkfm.metrics.within_group_auroc`), pan-cancer survival
    ``c_index_within_cohort``: scores that cohort identity alone cannot raise.
    """
    from bulkfm import metrics

    y = td.y[test]
    kind = td.spec.kind
    if kind == "multiclass":
        m = metrics.classification_metrics(y, prediction, labels=list(range(len(td.classes))))
        return {k: float(m[k]) for k in ("macro_f1", "accuracy", "weighted_f1")}
    if kind == "binary":
        out = {"auroc": metrics.auroc(y, prediction)}
        if _pan_cancer_mutation(td.spec):
            within = metrics.within_group_auroc(y, prediction, td.cohort_labels[test])
            out["auroc_within_cohort"] = float(within["pooled"])
        return out
    out = {"c_index": metrics.concordance_index(y[:, 0], y[:, 1], prediction)}
    if td.spec.cohort is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BulkfmWarning)  # small cohorts of one test set
            cc = metrics.cohort_concordance(y[:, 0], y[:, 1], prediction, td.cohort_labels[test])
        out["c_index_within_cohort"] = float(cc["weighted"])
    return out


def _per_class_rows(
    label: str, td: TaskData, split_no: int, test: np.ndarray, prediction: np.ndarray
) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of every class (multiclass tasks) in one split."""
    from bulkfm import metrics

    codes = list(range(len(td.classes)))
    m = metrics.classification_metrics(td.y[test], prediction, labels=codes)
    return [
        {
            "model": label,
            "task": td.spec.name,
            "split": split_no,
            "class": name,
            "precision": m["per_class_precision"][str(code)],
            "recall": m["per_class_recall"][str(code)],
            "f1": m["per_class_f1"][str(code)],
            "support": m["per_class_support"][str(code)],
        }
        for code, name in zip(codes, td.classes, strict=True)
    ]


def _test_cases(td: TaskData, splits: Sequence[Split]) -> dict[str, int]:
    """Fewest test *patients* of each kind over the splits: mutated / wild-type (binary),
    with an event / censored (survival), of each class (multiclass)."""
    kind = td.spec.kind
    if kind == "survival":
        parts = {"events": td.y[:, 1] == 1, "censored": td.y[:, 1] == 0}
    elif kind == "binary":
        parts = {"positives": td.y == 1, "negatives": td.y == 0}
    else:
        parts = {str(c): td.y == i for i, c in enumerate(td.classes)}
    return {
        name: int(min(np.unique(td.groups[s.test][member[s.test]]).size for s in splits))
        for name, member in parts.items()
    }


def _flag_few_test_cases(
    prepared: dict[str, TaskData], splits: dict[str, list[Split]], config: BenchConfig
) -> None:
    """Record each task's fewest test cases in its info and warn once per run about tasks
    whose test sets hold fewer than ``config.min_test_cases`` of some kind."""
    flagged = []
    for name, td in prepared.items():
        counts = _test_cases(td, splits[name])
        td.info["min_test_patients"] = counts
        few = {k: v for k, v in counts.items() if v < config.min_test_cases}
        td.info["few_test_cases"] = bool(few)
        if few:
            what = "class " if td.spec.kind == "multiclass" else ""
            flagged.append(f"{name} ({', '.join(f'{what}{k}: {v}' for k, v in few.items())})")
    if flagged:
        logger.warning(
            "%d task(s) have test sets with fewer than %d patients of a class, with an event "
            "or censored in some split, so their scores (and the random control's) swing "
            "with single patients; they are flagged in the leaderboard (few_test_cases): %s. "
            "Raise --min-positives / --min-negatives / --min-events, a larger --test-size, "
            "or set min_test_cases= to change this threshold",
            len(flagged),
            config.min_test_cases,
            "; ".join(flagged),
        )


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
    label: str,
    td: TaskData,
    split_no: int,
    split: Split,
    X: np.ndarray,
    config: BenchConfig,
    per_class: list[dict[str, Any]],
    *,
    reference: bool = False,
) -> list[dict[str, Any]]:
    task = td.spec
    with _naming_task(task.name, label):
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
    if task.kind == "multiclass":
        per_class.extend(_per_class_rows(label, td, split_no, split.test, result.prediction))
    y_test = td.y[split.test]
    n_pos = int(y_test[:, 1].sum()) if task.kind == "survival" else int((y_test == 1).sum())
    return [
        {
            "model": label,
            "task": task.name,
            "family": task.family,
            "metric": metric,
            "primary": metric == task.metric,
            "reference": reference,
            "split": split_no,
            "seed": split.seed,
            "value": float(value),
            "param": result.param,
            "n_features": result.n_features,
            "n_train": int(split.train.size),
            "n_test": int(split.test.size),
            "n_test_positive_or_events": n_pos if task.kind != "multiclass" else None,
        }
        for metric, value in values.items()
    ]


def _cohort_reference(
    td: TaskData, splits: Sequence[Split], config: BenchConfig
) -> list[dict[str, Any]]:
    """The same probe on one-hot cohort labels over the task's splits: what cohort
    identity alone achieves on a pan-cancer mutation task."""
    cohorts = td.cohort_labels
    X = (cohorts[:, None] == np.unique(cohorts)[None, :]).astype(np.float64)
    rows: list[dict[str, Any]] = []
    for i, split in enumerate(splits):
        rows += _score_split(COHORT_REFERENCE, td, i, split, X, config, [], reference=True)
    return rows


def _summarise(scores: pd.DataFrame, config: BenchConfig) -> pd.DataFrame:
    """Mean, std and the interval of the mean over splits per model x task x metric.

    The interval is :func:`bulkfm.metrics.corrected_t_interval`, with the correlation of
    two splits' scores from the task's test fraction (``config.ci_method``), clipped to
    [0, 1], the range of every metric here (NaN bounds stay NaN).
    """
    from bulkfm import metrics

    rows = []
    keys = ["model", "task", "family", "metric", "primary", "reference"]
    for key, group in scores.groupby(keys, sort=False):
        values = group["value"].to_numpy(dtype=np.float64)
        stats = metrics.mean_std(values)
        fraction = float((group["n_test"] / (group["n_train"] + group["n_test"])).mean())
        rho = metrics.split_correlation(fraction, config.ci_method)
        lo, hi = metrics.corrected_t_interval(values, correlation=rho, level=config.ci_level)
        lo, hi = max(lo, 0.0), min(hi, 1.0)  # every bench metric lies in [0, 1]
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


@contextlib.contextmanager
def _warnings_once() -> Iterator[None]:
    """Collect the warnings raised inside and say each distinct one once, with how often
    it came (a learning model refitted per split would otherwise repeat itself per split)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            pass
    seen: dict[tuple[type[Warning], str], int] = {}
    for w in caught:
        key = (w.category, str(w.message))
        seen[key] = seen.get(key, 0) + 1
    for (category, message), count in seen.items():
        note = f" (said once; raised {count} times in this run)" if count > 1 else ""
        warnings.warn(message + note, category, stacklevel=3)


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
    _flag_few_test_cases(prepared, splits, config)
    data_fp = data_fingerprint(bench)
    cache = EmbeddingCache(config.cache_dir) if config.cache_dir else None
    timings: dict[str, float] = {"setup": time.perf_counter() - t_start}
    n_steps = len(embedders) * sum(len(s) for s in splits.values())
    rows: list[dict[str, Any]] = []
    per_class: list[dict[str, Any]] = []
    with (
        _warnings_once(),
        _blas_threads(config.blas_threads),
        tqdm(total=n_steps, desc="bench", unit="split", disable=_no_bar(progress)) as bar,
    ):
        t0 = time.perf_counter()
        for task in selection.tasks:
            if _pan_cancer_mutation(task):
                rows += _cohort_reference(prepared[task.name], splits[task.name], config)
        timings["cohort_reference"] = time.perf_counter() - t0
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
                    split_rows = _score_split(model.label, td, i, split, X, config, per_class)
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
    summary = _summarise(scores, config)
    _log_cohort_reference(summary)
    timings["total"] = time.perf_counter() - t_start
    return BenchResult(
        scores=scores,
        summary=summary,
        per_class=pd.DataFrame(per_class),
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


def _log_cohort_reference(summary: pd.DataFrame) -> None:
    """One line per run: what cohort identity alone scores on the pan-cancer mutation tasks."""
    ref = summary[summary["reference"] & summary["primary"]]
    if ref.empty:
        return
    logger.info(
        "cohort identity alone (one-hot cohort probe, same splits) scores AUROC %s; read "
        "the cohort-adjusted AUROC (auroc_within_cohort) for what a model adds",
        ", ".join(f"{t} {m:.3f}" for t, m in zip(ref["task"], ref["mean"], strict=True)),
    )


def _describe(model: Embedder) -> dict[str, Any]:
    info = model.describe()
    overlap = getattr(model, "overlap", None)
    if overlap:
        info["overlap"] = overlap
    return info


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress
