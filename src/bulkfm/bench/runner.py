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

A run is a list of (model, task, split) units in a fixed order. ``workers=1`` runs them
here; ``workers=N`` runs them on a pool of N spawned processes (the standard library's
``ProcessPoolExecutor``, as scikit-learn users expect of ``n_jobs``: the units are
independent CPU fits, so no collective launcher such as torchrun is needed) and puts the
rows back in that order, so both give the same tables.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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
from bulkfm.logs import LOGGER, log_once
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
    def compute() -> np.ndarray:
        return _checked_embedding(model.transform(bench), model, bench.obs_names)

    if cache is None or not model.cacheable:
        return compute()
    # A miss is computed under the entry's lock: another bench run sharing the cache
    # folder that misses it too waits and reads this one's entry instead of recomputing.
    emb = cache.load_or_compute(model, data_fp, bench.n_obs, compute, dtype=np.float32)
    return _checked_embedding(emb, model, bench.obs_names)


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


def _cohort_features(td: TaskData) -> np.ndarray:
    """One-hot cohort labels: the features of the cohort-identity probe (what cohort
    identity alone achieves on a pan-cancer mutation task)."""
    cohorts = td.cohort_labels
    return (cohorts[:, None] == np.unique(cohorts)[None, :]).astype(np.float64)


# --------------------------------------------------------------------------- units of work


@dataclass(frozen=True)
class _Unit:
    """One probe fit: a model (index into the run's models, or :data:`_REFERENCE`) on one
    split of one task. The units of a run in :func:`_units` order fix the row order of
    ``scores``, whichever process ran them."""

    model: int
    task: str
    split: int


#: ``_Unit.model`` of the cohort-identity probe.
_REFERENCE = -1


@dataclass
class _Shared:
    """What every unit reads: made once per run (and sent once to each worker)."""

    config: BenchConfig
    prepared: dict[str, TaskData]
    splits: dict[str, list[Split]]
    labels: list[str]
    #: Learning models, refitted on each split's training samples.
    learners: dict[int, Embedder] = field(default_factory=dict)
    #: Frozen models' embeddings of every sample (computed once per model, by the parent).
    frozen: dict[int, np.ndarray] = field(default_factory=dict)
    #: The samples learning models fit on (None when no model learns).
    bench: ad.AnnData | None = None


@dataclass
class _Done:
    """A unit's rows and what it said (warnings and log lines, replayed by the parent)."""

    rows: list[dict[str, Any]]
    per_class: list[dict[str, Any]]
    seconds: float
    described: dict[str, Any] | None = None
    warned: list[tuple[type[Warning], str]] = field(default_factory=list)
    logged: list[tuple[str, int, str]] = field(default_factory=list)


def _units(tasks: Sequence[TaskSpec], splits: dict[str, list[Split]], n_models: int) -> list[_Unit]:
    """Every unit in the single-process order: the cohort-identity probes of the pan-cancer
    mutation tasks, then per model, per task, per split."""
    units = [
        _Unit(_REFERENCE, t.name, i)
        for t in tasks
        if _pan_cancer_mutation(t)
        for i in range(len(splits[t.name]))
    ]
    for m in range(n_models):
        units += [_Unit(m, t.name, i) for t in tasks for i in range(len(splits[t.name]))]
    return units


def _run_unit(shared: _Shared, unit: _Unit) -> _Done:
    """One probe fit and its scores; the same code in this process and in a worker, so the
    rows cannot depend on where a unit ran."""
    t0 = time.perf_counter()
    td = shared.prepared[unit.task]
    split = shared.splits[unit.task][unit.split]
    config = shared.config
    if unit.model == _REFERENCE:
        X = _cohort_features(td)
        rows = _score_split(COHORT_REFERENCE, td, unit.split, split, X, config, [], reference=True)
        return _Done(rows, [], time.perf_counter() - t0)
    learner = shared.learners.get(unit.model)
    if learner is not None:
        assert shared.bench is not None
        X = _embedding_for_split(learner, shared.bench, td, split, None)
    else:
        X = shared.frozen[unit.model][td.index]
    per_class: list[dict[str, Any]] = []
    label = shared.labels[unit.model]
    rows = _score_split(label, td, unit.split, split, X, config, per_class)
    described = _describe(learner) if learner is not None else None
    return _Done(rows, per_class, time.perf_counter() - t0, described)


def _ends_group(units: Sequence[_Unit], k: int) -> bool:
    """Whether unit ``k`` is the last split of its (model, task)."""
    return k + 1 == len(units) or (units[k + 1].model, units[k + 1].task) != (
        units[k].model,
        units[k].task,
    )


def _log_model_task(shared: _Shared, units: Sequence[_Unit], done: Sequence[_Done], k: int) -> None:
    """The mean ± SD of the headline metric of the (model, task) whose last unit is ``k``."""
    unit = units[k]
    primary: list[float] = []
    j = k
    while j >= 0 and (units[j].model, units[j].task) == (unit.model, unit.task):
        primary[:0] = [r["value"] for r in done[j].rows if r["primary"]]
        j -= 1
    task = shared.prepared[unit.task].spec
    logger.info(
        "%s / %s: %s %.3f ± %.3f",
        shared.labels[unit.model],
        task.name,
        task.metric,
        np.mean(primary),
        np.std(primary, ddof=1) if len(primary) > 1 else float("nan"),
    )


def _run_here(
    shared: _Shared,
    units: Sequence[_Unit],
    embed: Any,
    bar: Any,
) -> list[_Done]:
    """Run the units one after another in this process (``workers=1``). A frozen model is
    embedded (``embed(m)``) before its first unit and dropped after its last, so one
    model's embedding is held at a time."""
    done: list[_Done] = []
    for k, unit in enumerate(units):
        m = unit.model
        if m != _REFERENCE:
            if m not in shared.learners and m not in shared.frozen:
                shared.frozen.clear()
                shared.frozen[m] = embed(m)
            bar.set_postfix_str(f"{shared.labels[m]} {unit.task}", refresh=False)
        done.append(_run_unit(shared, unit))
        if m != _REFERENCE:
            bar.update()
            if _ends_group(units, k):
                _log_model_task(shared, units, done, k)
    shared.frozen.clear()
    return done


# --------------------------------------------------------------------------- worker processes

#: A worker process's copy of the run's shared data (set by :func:`_start_worker`).
_WORKER: _Shared | None = None
#: A worker's BLAS thread limit, kept for the worker's lifetime.
_WORKER_LIMITS: Any = None
#: Log lines of bulkfm said in a worker during the current unit.
_WORKER_LOG: list[tuple[str, int, str]] = []


class _Collect(logging.Handler):
    """Keeps a worker's log lines for the parent to say (once) on its console."""

    def emit(self, record: logging.LogRecord) -> None:
        _WORKER_LOG.append((record.name, record.levelno, record.getMessage()))


def _worker_threads(config: BenchConfig) -> int:
    """BLAS/torch threads of one worker: ``blas_threads``, else the cores shared out."""
    if config.blas_threads is not None:
        return config.blas_threads
    return max(1, (os.cpu_count() or 1) // config.workers)


def _start_worker(payload: str, threads: int, level: int) -> None:
    """Pool initializer: cap threads before anything heavy loads, then read the run's
    shared data from the file ``payload`` (a file, not the pipe: a worker that dies while
    starting then breaks the pool with an error instead of blocking the parent's write)."""
    global _WORKER, _WORKER_LIMITS
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # torch or an OpenMP library imported later reads it
    from threadpoolctl import threadpool_limits

    _WORKER_LIMITS = threadpool_limits(limits=threads)  # libraries already loaded
    with open(payload, "rb") as fh:
        _WORKER = pickle.load(fh)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    ours = logging.getLogger(LOGGER)
    ours.setLevel(level)
    ours.propagate = False  # no console here: the parent says what the workers said
    ours.addHandler(_Collect())


def _work(unit: _Unit) -> _Done:
    """Run one unit in a worker; its warnings and log lines travel back with its rows."""
    assert _WORKER is not None, "worker not started"
    _WORKER_LOG.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = _run_unit(_WORKER, unit)
    done.warned = [(w.category, str(w.message)) for w in caught]
    done.logged = list(_WORKER_LOG)
    return done


def _payload(shared: _Shared) -> bytes:
    """The shared data, pickled once for every worker; a model that cannot be pickled is
    named with the way out."""
    try:
        return pickle.dumps(shared, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        culprit = "the run's data"
        for model in shared.learners.values():
            try:
                pickle.dumps(model)
            except (pickle.PicklingError, TypeError, AttributeError):
                culprit = f"model {model.label!r}"
                break
        raise ConfigError(
            f"{culprit} cannot be sent to worker processes ({exc}); define the model in an "
            "importable module, or run in one process: --workers 1 (bench.workers=1)"
        ) from exc


def _run_pool(shared: _Shared, units: Sequence[_Unit], bar: Any) -> list[_Done]:
    """Run the units on ``config.workers`` spawned processes; results come back in unit
    order, so the rows are those of the single-process run."""
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    config = shared.config
    level = logging.getLogger(LOGGER).getEffectiveLevel()
    done: list[_Done | None] = [None] * len(units)
    with tempfile.TemporaryDirectory(prefix="bulkfm-bench-") as tmp:
        payload = os.path.join(tmp, "shared.pkl")
        with open(payload, "wb") as fh:
            fh.write(_payload(shared))
        pool = ProcessPoolExecutor(
            max_workers=min(config.workers, len(units)),
            mp_context=multiprocessing.get_context("spawn"),  # no forked locks or CUDA state
            initializer=_start_worker,
            initargs=(payload, _worker_threads(config), level),
        )
        try:
            futures = {pool.submit(_work, unit): k for k, unit in enumerate(units)}
            for future in as_completed(futures):
                k = futures[future]
                try:
                    done[k] = future.result()
                except BrokenProcessPool as exc:
                    raise ConfigError(
                        "a benchmark worker process died (its error is printed above); a "
                        "script that runs the benchmark with workers > 1 must keep its main "
                        "code under `if __name__ == '__main__':` (each spawned worker imports "
                        "the script), and a worker needs the memory of the run's data; or run "
                        "in one process: --workers 1 (bench.workers=1)"
                    ) from exc
                if units[k].model != _REFERENCE:
                    bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    out = [d for d in done if d is not None]
    for k, d in enumerate(out):  # say what the workers said, in unit order
        for category, message in d.warned:
            warnings.warn(message, category, stacklevel=2)
        for name, lvl, text in d.logged:
            log_once(logging.getLogger(name), lvl, "%s", text)
        if units[k].model != _REFERENCE and _ends_group(units, k):
            _log_model_task(shared, units, out, k)
    return out


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

    With ``config.workers`` > 1 the (model, task, split) units run on that many spawned
    processes (:class:`concurrent.futures.ProcessPoolExecutor`): frozen models are
    embedded once here (or read from the cache) and sent to every worker with the splits,
    learning models are refitted per split in the workers, and the rows come back in the
    single-process order, so ``scores`` equals the ``workers=1`` table (the default
    ``blas_threads=1`` keeps every worker's arithmetic that of one thread). A learning
    model must not depend on its earlier fits, which the :class:`Embedder` contract asks.
    Warnings and log lines of the workers are said here, each once.
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
    learners = {m: model for m, model in enumerate(embedders) if model.learns}
    shared = _Shared(
        config=config,
        prepared=prepared,
        splits=splits,
        labels=[m.label for m in embedders],
        learners=learners,
        bench=bench if learners else None,
    )
    units = _units(selection.tasks, splits, len(embedders))
    embed_s: dict[int, float] = {}

    def embed(m: int) -> np.ndarray:
        t0 = time.perf_counter()
        emb = _frozen_embedding(embedders[m], bench, data_fp, cache)
        embed_s[m] = time.perf_counter() - t0
        return emb

    n_steps = sum(u.model != _REFERENCE for u in units)
    with (
        _warnings_once(),
        _blas_threads(config.blas_threads),
        tqdm(total=n_steps, desc="bench", unit="split", disable=_no_bar(progress)) as bar,
    ):
        if config.workers == 1:
            done = _run_here(shared, units, embed, bar)
        else:
            # Each frozen model is embedded once, here, and shared with every worker.
            shared.frozen = {m: embed(m) for m in range(len(embedders)) if m not in learners}
            t0 = time.perf_counter()
            done = _run_pool(shared, units, bar)
            timings["workers_wall"] = time.perf_counter() - t0
    rows = [row for d in done for row in d.rows]
    per_class = [row for d in done for row in d.per_class]
    timings["cohort_reference"] = sum(
        d.seconds for u, d in zip(units, done, strict=True) if u.model == _REFERENCE
    )
    described = {m: _describe(model) for m, model in enumerate(embedders)}
    for m, model in enumerate(embedders):
        mine = [d for u, d in zip(units, done, strict=True) if u.model == m]
        timings[f"{model.label}/embed"] = embed_s.get(m, 0.0)
        timings[f"{model.label}/probe"] = sum(d.seconds for d in mine)
        if m in learners and mine and mine[-1].described is not None:
            described[m] = mine[-1].described  # the state after its last fit, as in-process
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
        models=[described[m] for m in range(len(embedders))],
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
