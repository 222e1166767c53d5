"""The paper's evaluation protocol: every arm and baseline on the same patient-grouped splits.

One call (:func:`run_evaluation`) goes from a config to ``results.json`` and a report:

1. samples: load (or simulate), select (e.g. TCGA tumours), de-duplicate, drop unlabelled
   (:mod:`~bulkfm.evaluate.selection`);
2. model: load a checkpoint, or pre-train one here on *all* loaded samples
   (:mod:`~bulkfm.evaluate.model`);
3. embeddings of the selected samples (mean over genes of the last block);
4. classification of ``data.label_key`` (cohort): BulkRNABert arms (MLP / SVM on frozen
   embeddings, IA3, full fine-tuning, random-init ablations) against PCA/NMF + SVM and an
   MLP on log-TPM, all on one list of 80/20 splits stratified by class
   (:mod:`~bulkfm.evaluate.arms`);
5. pan-cancer survival (Cox MLP on embeddings, fine-tuned Cox arms, penalised Cox on PCA,
   Cox MLP on log-TPM) on splits stratified by the event: C-index, weighted, macro;
6. optional per-cohort survival, transfer (pan-cancer model on one cohort, the same model
   trained without that cohort, and one trained on that cohort only, all scored on the same
   test samples), the missing-gene robustness study, and the cohort-similarity dendrogram
   (:mod:`~bulkfm.evaluate.studies`).

Results are typed records (:mod:`~bulkfm.evaluate.results`); the report reads them.

Bad input is excluded explicitly (a warning, and a record under ``data.exclusions`` in
``results.json``) or stops with an error saying what to change: unlabelled samples,
duplicates, classes with too few patients (``data.drop_small_classes``), samples without a
usable survival record, cohorts without events (skipped for the C-index).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bulkfm import schema as keys
from bulkfm.config import load
from bulkfm.data.simulate import simulate_bulk
from bulkfm.errors import BulkfmWarning, ConfigError
from bulkfm.evaluate.arms import (
    FINETUNE_ARMS,
    classification_arms,
    classification_baselines,
    classification_entry,
    finetune_config,
    survival_arms,
    survival_entry,
    timed,
)
from bulkfm.evaluate.config import EvaluateConfig
from bulkfm.evaluate.model import (
    LoadedModel,
    check_coverage,
    embed,
    embeddings_for,
    load_model,
    model_info,
    random_encoder,
)
from bulkfm.evaluate.report import write_report
from bulkfm.evaluate.results import (
    RESULTS_FILE,
    DataSummary,
    EvaluationResult,
    Exclusions,
    SurvivalCounts,
)
from bulkfm.evaluate.selection import (
    classification_splits,
    drop_small_classes,
    event_counts,
    select_samples,
    split_info,
    survival_data,
    survival_splits,
    task_data,
)
from bulkfm.evaluate.studies import cohort_similarity, per_cohort_survival, robustness, transfer
from bulkfm.io import atomic_path, output_dir, write_text
from bulkfm.tasks import TaskData, n_holdout_folds

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.models.bulkrnabert import BulkRNABert
    from bulkfm.tokenize import BinTokenizer

logger = logging.getLogger(__name__)

__all__ = ["QUICK_CONFIG", "evaluate_pipeline_stage", "quick_config", "run_evaluation"]

#: The main job's evaluation settings, a packaged YAML (``bulkfm/configs``).
QUICK_CONFIG = "evaluate_quick.yaml"


def run_evaluation(
    config: EvaluateConfig,
    *,
    adata: ad.AnnData | None = None,
    model: tuple[BulkRNABert, BinTokenizer] | None = None,
) -> EvaluationResult:
    """Run the protocol of ``config``; writes results.json, the report and plots.

    ``adata`` replaces ``data.path`` (it is not modified); ``model`` = (model, tokenizer)
    replaces ``model.path`` / ``pretrain``.
    """
    if not isinstance(config, EvaluateConfig):
        raise ConfigError(f"config must be an EvaluateConfig, got {type(config).__name__}")
    # Checked and created before any work; removed again (if empty) when the run fails.
    with output_dir(config.output_dir, flag="--out / output_dir=") as out:
        with _threads(config.num_threads), _collect_warnings() as caught:
            result = _run(config, adata, model, out)
        result.warnings = sorted(caught)
        _write_outputs(config, result)
    return result


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _collect_warnings() -> Iterator[set[str]]:
    """Record bulkfm warnings for the report and show each distinct one once afterwards
    (per-split repeats, e.g. the same cohort skipped in 5 splits, would flood the log)."""
    caught: set[str] = set()
    others: list[warnings.WarningMessage] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", BulkfmWarning)
        try:
            yield caught
        finally:
            for w in records:
                if issubclass(w.category, BulkfmWarning):
                    caught.add(str(w.message))
                else:
                    others.append(w)
    for message in sorted(caught):
        warnings.warn(message, BulkfmWarning, stacklevel=4)
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _load_adata(config: EvaluateConfig) -> ad.AnnData:
    if config.data.path is not None:
        from bulkfm.train.data import load_adata  # imports torch

        return load_adata(config.data.path)
    logger.info("no data.path: simulating %s", config.data.simulate or "the default data set")
    return simulate_bulk(**(config.data.simulate or {}))


def _run(
    config: EvaluateConfig,
    adata: ad.AnnData | None,
    given: tuple[BulkRNABert, BinTokenizer] | None,
    out: Path,
) -> EvaluationResult:
    timings: dict[str, float] = {}
    exclusions = Exclusions()
    if any(getattr(config.arms, arm) for arm in FINETUNE_ARMS):
        finetune_config(config, "classification", "ia3", 0)  # bad settings fail before work
    with timed(timings, "data"):
        full = adata if adata is not None else _load_adata(config)
        selected = select_samples(full, config.data, exclusions)
        task = task_data(selected, config.data)
    with timed(timings, "model"):
        mdl = load_model(config, full, out, given)
        check_coverage(mdl, task.rows(), config.model)  # before any work of the model
    with timed(timings, "embed"):
        if mdl.model is not None:
            emb = embed(mdl, config.model, task.rows())
        else:
            emb, task, dropped = embeddings_for(config, task)
            if dropped:
                exclusions.no_embedding = dropped
    result = EvaluationResult(
        out_dir=out,
        config=config.to_dict(),
        model=model_info(mdl),
        data=DataSummary(n_loaded=full.n_obs, n_selected=len(task.ids), exclusions=exclusions),
        notes=_notes(config, mdl, task),
        timings_s=timings,
        gene_coverage=mdl.coverage.to_dict() if mdl.coverage is not None else None,
    )
    if config.tasks.classification:
        _classification_studies(config, mdl, task, emb, result)
    if config.tasks.survival:
        _survival_studies(config, mdl, task, emb, result)
    if config.tasks.similarity:
        result.similarity = cohort_similarity(emb, task.labels)
    return result


def _classification_studies(
    config: EvaluateConfig,
    mdl: LoadedModel,
    task: TaskData,
    emb: np.ndarray,
    result: EvaluationResult,
) -> None:
    timings, exclusions = result.timings_s, result.data.exclusions
    n_folds = n_holdout_folds(config.protocol.test_size)
    clf_task = drop_small_classes(task, n_folds, config.data.drop_small_classes, exclusions)
    clf_emb = emb[np.isin(task.ids, clf_task.ids)]
    result.data.classes = pd.Series(clf_task.labels).value_counts().sort_index().to_dict()
    splits = classification_splits(config, clf_task)
    result.splits["classification"] = split_info(splits)
    arms = classification_arms(config, mdl, clf_task, clf_emb, splits, timings)
    arms.update(classification_baselines(config, mdl, clf_task, splits, timings))
    result.classification = arms
    result.classification_arms = {k: classification_entry(k, v, config) for k, v in arms.items()}
    if config.tasks.robustness and mdl.model is not None:
        with timed(timings, "robustness"):
            result.robustness = robustness(config, mdl, clf_task, clf_emb, splits)


def _survival_studies(
    config: EvaluateConfig,
    mdl: LoadedModel,
    task: TaskData,
    emb: np.ndarray,
    result: EvaluationResult,
) -> None:
    timings = result.timings_s
    sd = survival_data(config, task, result.data.exclusions)
    s_emb = emb[np.isin(task.ids, sd.ids)]
    cohorts = sd.cohort_labels
    counts = result.data.survival = SurvivalCounts(
        n=sd.n,
        n_events=int(sd.event.sum()),
        per_cohort={
            c: {"n": int((cohorts == c).sum()), "n_events": int(sd.event[cohorts == c].sum())}
            for c in sorted(pd.unique(cohorts))
        },
    )
    splits = survival_splits(config, sd)
    result.splits["survival"] = split_info(splits)
    what = "pan-cancer survival" if len(counts.per_cohort) > 1 else "survival"
    counts.test_events = event_counts(sd, splits, config.protocol.warn_below_events, what)
    rand = None
    if config.arms.random_frozen and mdl.model is not None:
        rand = embed(mdl, config.model, sd.rows(), random_encoder(mdl.model, config.protocol.seed))
    arms = survival_arms(config, mdl, sd, s_emb, splits, timings, rand_emb=rand)
    result.survival = arms
    result.survival_arms = {k: survival_entry(k, v, config) for k, v in arms.items()}
    if config.tasks.per_cohort_survival:
        result.per_cohort_survival = per_cohort_survival(config, mdl, sd, s_emb, timings)
    if config.tasks.transfer:
        result.transfer = transfer(config, mdl, sd, s_emb, splits, arms, timings)


def _notes(config: EvaluateConfig, mdl: LoadedModel, task: TaskData) -> list[str]:
    b = config.baselines
    model_genes = "the genes the model reads"
    if mdl.coverage is not None:
        cov = mdl.coverage
        model_genes = f"the {cov.n_model_genes} genes the model reads"
        if cov.n_absent:
            model_genes = (
                f"the {cov.n_in_data} of the model's {cov.n_model_genes} genes present in "
                f"the data (the model reads the {cov.n_absent} absent ones as [MASK])"
            )
    genes = {
        "model": model_genes,
        "all": f"all {task.rows().n_vars} genes",
    }.get(str(b.genes), f"the {b.genes} most variable genes of each training side")
    return [
        f"Baselines read log10(1 + TPM) of {genes}; PCA/NMF and gene selection are fitted on "
        "each split's training side only; component counts above min(training samples, "
        "genes) are capped (see the log).",
        "Fine-tuned arms (IA3, full, random init) train end to end per split. Per-cohort "
        "survival models are the frozen-embedding Cox MLP and the survival baselines; "
        "transfer uses the frozen-embedding Cox MLP and the penalised Cox baseline.",
    ]


def _write_outputs(config: EvaluateConfig, result: EvaluationResult) -> None:
    """predictions.csv.gz, the report (its KM plots add log-rank results), results.json."""
    out = result.out_dir
    frames = []
    for key, res in result.classification.items():
        frames.append(res.predictions.assign(task="classification", arm=key))
    for key, sres in result.survival.items():
        frames.append(sres.predictions.assign(task="survival", arm=key))
    if frames:
        path = out / "predictions.csv.gz"
        with atomic_path(path) as tmp:
            pd.concat(frames, ignore_index=True).to_csv(tmp, index=False, compression="gzip")
        result.paths["predictions"] = path
    report_paths = write_report(result, config)
    result.paths["results"] = write_text(result.to_json(), out / RESULTS_FILE)
    result.paths.update(report_paths)


# --------------------------------------------------------------------------- main job
def quick_config(
    model_dir: str | Path, out_dir: str | Path, overrides: Sequence[str] = ()
) -> EvaluateConfig:
    """The main job's evaluation settings (``bulkfm/configs/evaluate_quick.yaml``: small
    enough for a few CPU minutes) for the checkpoint in ``model_dir``.

    ``overrides`` are ``section.key=value`` strings, as ``bulkfm evaluate --set`` takes,
    e.g. ``["protocol.n_seeds=5", "heads.finetune.epochs=10"]`` for a fuller run.
    """
    job = {"model": {"path": str(model_dir)}, "output_dir": str(out_dir)}
    source = resources.files("bulkfm.configs").joinpath(QUICK_CONFIG)
    with resources.as_file(source) as path:
        return load(EvaluateConfig, path, overrides, base=job)


def evaluate_pipeline_stage(
    adata: ad.AnnData,
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """The main job's downstream stage: embed -> classify cohorts and predict survival,
    BulkRNABert against the baselines -> report. Returns :meth:`EvaluationResult.summary`."""
    config = quick_config(model_dir, out_dir, overrides)
    if keys.SAMPLE_TYPE not in adata.obs:
        config.data.select = {}
    result = run_evaluation(config, adata=adata)
    return result.summary()
