"""The arms of the comparison: BulkRNABert heads, fine-tuned arms, ablations and baselines.

Every arm of a task gets the same split list; each seeds its model with the split's seed.
The math of each arm lives in :mod:`bulkfm.tasks` (heads, baselines, scoring) and
:mod:`bulkfm.train.finetune`; this module only decides which arms run on what and turns
their results into table entries. torch loads inside the fine-tuning functions.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bulkfm.data.splits import Split
from bulkfm.errors import ClinicalMatchError, SplitError
from bulkfm.evaluate.model import LoadedModel, embed, random_encoder
from bulkfm.evaluate.results import ClassificationArm, SurvivalArm
from bulkfm.evaluate.selection import split_seed
from bulkfm.metrics import classification_metrics, mean_std
from bulkfm.tasks import TaskData
from bulkfm.tasks.baselines import (
    BaselineConfig,
    baseline_label,
    run_classification_baseline,
    run_survival_baseline,
)
from bulkfm.tasks.classification import (
    ClassificationResult,
    merge_classification,
    run_classification,
)
from bulkfm.tasks.survival import (
    SurvivalResult,
    merge_survival,
    run_survival,
    score_survival_split,
)

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.evaluate.config import EvaluateConfig
    from bulkfm.train.finetune import FinetuneConfig

logger = logging.getLogger(__name__)

__all__ = [
    "ABLATIONS",
    "ARM_LABELS",
    "FINETUNE_ARMS",
    "SURVIVAL_ARM_LABELS",
    "baseline_config",
    "baseline_matrix",
    "classification_arms",
    "classification_baselines",
    "classification_entry",
    "finetune_config",
    "per_split",
    "survival_arms",
    "survival_entry",
    "timed",
]

ABLATIONS = ("random_init", "random_frozen")
ARM_LABELS = {
    "mlp": "BulkRNABert + MLP",
    "svm": "BulkRNABert + SVM",
    "ia3": "BulkRNABert + MLP + IA3",
    "full": "BulkRNABert + MLP, full fine-tuning",
    "random_init": "Random init + MLP, full fine-tuning",
    "random_frozen": "Random init (frozen) + MLP",
}
SURVIVAL_ARM_LABELS = {
    "mlp": "BulkRNABert + Cox MLP",
    "ia3": "BulkRNABert + Cox MLP + IA3",
    "full": "BulkRNABert + Cox MLP, full fine-tuning",
    "random_init": "Random init + Cox MLP, full fine-tuning",
    "random_frozen": "Random init (frozen) + Cox MLP",
}
#: arm -> (fine-tuning mode, start from a random encoder)
FINETUNE_ARMS = {"ia3": ("ia3", False), "full": ("full", False), "random_init": ("full", True)}


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Log a stage and record its wall time in ``timings[key]`` (seconds, 2 decimals)."""
    t0 = time.perf_counter()
    logger.info("evaluate: %s ...", key)
    try:
        yield
    finally:
        timings[key] = round(time.perf_counter() - t0, 2)
        logger.info("evaluate: %s done in %.1f s", key, timings[key])


def _split_name(split: Split, i: int) -> str:
    return getattr(split, "name", "") or f"split{i}"


def finetune_config(config: EvaluateConfig, task: str, arm: str, seed: int) -> FinetuneConfig:
    """The fine-tuning settings of ``arm`` (``heads.finetune`` plus the arm's mode)."""
    from bulkfm.train.finetune import FinetuneConfig

    mode, random_init = FINETUNE_ARMS[arm]
    kwargs = {"progress": False, **config.heads.finetune}
    return FinetuneConfig(task=task, mode=mode, random_init=random_init, seed=seed, **kwargs)


def baseline_matrix(config: EvaluateConfig, mdl: LoadedModel, adata: ad.AnnData) -> Any:
    """TPM columns the baselines read: the model's genes, or all (top-k chosen per split).

    With ``baselines.genes: model`` the baselines read the model's genes that the data
    has: a gene the data lacks has no values to read (the model sees it as [MASK]).
    """
    genes = config.baselines.genes
    if genes == "model" and mdl.tokenizer is not None:
        cols = mdl.tokenizer.align_columns(list(map(str, adata.var_names)))
        return adata.X if cols is None else adata.X[:, cols[cols >= 0]]
    return adata.X


def baseline_config(config: EvaluateConfig) -> BaselineConfig:
    """The baselines' settings from ``baselines`` and the heads they share with the arms."""
    b = config.baselines
    return BaselineConfig(
        top_genes=b.genes if isinstance(b.genes, int) else None,
        pca_components=b.pca_components,
        nmf_components=b.nmf_components,
        nmf_max_iter=b.nmf_max_iter,
        cox_components=b.cox_components,
        cox_penalizer=b.cox_penalizer,
        svm_C=b.svm_C,
        mlp=config.heads.mlp,
        cox_mlp=config.heads.cox,
    )


# --------------------------------------------------------------------------- classification
def classification_arms(
    config: EvaluateConfig,
    mdl: LoadedModel,
    task: TaskData,
    emb: np.ndarray,
    splits: Sequence[Split],
    timings: dict[str, float],
) -> dict[str, ClassificationResult]:
    """The BulkRNABert classification arms ``config.arms`` switches on."""
    arms = config.arms
    out: dict[str, ClassificationResult] = {}
    common: dict[str, Any] = {"groups": task.groups, "ids": task.ids, "splits": splits}
    if arms.mlp:
        with timed(timings, "classification/mlp"):
            out["mlp"] = run_classification(
                emb, task.labels, method="mlp", mlp=config.heads.mlp, **common
            )
    if arms.svm:
        with timed(timings, "classification/svm"):
            out["svm"] = run_classification(
                emb, task.labels, method="svm", svm_C=config.heads.svm_C, **common
            )
    if arms.random_frozen and mdl.model is not None:
        with timed(timings, "classification/random_frozen"):
            rand = embed(
                mdl, config.model, task.rows(), random_encoder(mdl.model, config.protocol.seed)
            )
            out["random_frozen"] = run_classification(
                rand, task.labels, method="mlp", mlp=config.heads.mlp, **common
            )
    for arm in FINETUNE_ARMS:
        if getattr(arms, arm) and mdl.model is not None:
            with timed(timings, f"classification/{arm}"):
                out[arm] = _finetune_classification(config, mdl, task, splits, arm)
    return out


def _finetune_classification(
    config: EvaluateConfig, mdl: LoadedModel, task: TaskData, splits: Sequence[Split], arm: str
) -> ClassificationResult:
    from bulkfm.train.finetune import finetune

    assert mdl.model is not None and mdl.tokenizer is not None
    labels, adata = task.labels, task.rows()
    classes = sorted(pd.unique(labels).tolist(), key=str)
    parts = []
    for i, split in enumerate(splits):
        tr, te = split.train, split.test
        ft = finetune(
            mdl.model,
            mdl.tokenizer,
            adata[tr],
            labels[tr],
            finetune_config(config, "classification", arm, split_seed(split)),
        )
        pred = ft.predict(adata[te])
        scores = classification_metrics(labels[te], pred, labels=classes)
        name = _split_name(split, i)
        row = {
            "split": name,
            "n_train": len(tr),
            "n_test": len(te),
            **scores,
            "trainable_params": int(ft.param_counts["trainable"]),
            "best_epoch": ft.best_epoch,
        }
        frame = pd.DataFrame(
            {"sample_id": task.ids[te], "split": name, "y_true": labels[te], "y_pred": pred}
        )
        parts.append(ClassificationResult(arm, classes, [row], {}, frame))
        logger.info("%s %s: macro F1 %.3f", arm, name, scores["macro_f1"])
    return merge_classification(arm, parts)


def classification_baselines(
    config: EvaluateConfig,
    mdl: LoadedModel,
    task: TaskData,
    splits: Sequence[Split],
    timings: dict[str, float],
) -> dict[str, ClassificationResult]:
    """PCA/NMF + SVM and the MLP on log-TPM, as ``config.baselines`` switches them on."""
    b = config.baselines
    wanted = [n for n, on in (("pca_svm", b.pca_svm), ("nmf_svm", b.nmf_svm), ("mlp", b.mlp)) if on]
    if not wanted:
        return {}
    X = baseline_matrix(config, mdl, task.rows())
    bcfg = baseline_config(config)
    out = {}
    for name in wanted:
        with timed(timings, f"classification/baseline_{name}"):
            out[f"baseline_{name}"] = run_classification_baseline(
                name, X, task.labels, groups=task.groups, ids=task.ids, splits=splits, config=bcfg
            )
    return out


# --------------------------------------------------------------------------- survival
def survival_arms(
    config: EvaluateConfig,
    mdl: LoadedModel,
    sd: TaskData,
    emb: np.ndarray,
    splits: Sequence[Split],
    timings: dict[str, float],
    *,
    prefix: str = "survival",
    finetune_arms: bool = True,
    rand_emb: np.ndarray | None = None,
) -> dict[str, SurvivalResult]:
    """The survival arms and baselines; ``rand_emb``: a random encoder's embeddings."""
    arms = config.arms
    out: dict[str, SurvivalResult] = {}
    kw: dict[str, Any] = {
        "groups": sd.groups,
        "cohorts": sd.cohort_labels,
        "ids": sd.ids,
        "model": config.heads.cox,
        "min_events": config.protocol.min_events,
    }
    if arms.mlp:
        with timed(timings, f"{prefix}/mlp"):
            out["mlp"] = per_split(
                lambda s: run_survival(emb, sd.time, sd.event, splits=[s], **kw), splits
            )
    if rand_emb is not None:
        with timed(timings, f"{prefix}/random_frozen"):
            out["random_frozen"] = per_split(
                lambda s: run_survival(rand_emb, sd.time, sd.event, splits=[s], **kw), splits
            )
    if finetune_arms and mdl.model is not None:
        for arm in FINETUNE_ARMS:
            if getattr(arms, arm):
                with timed(timings, f"{prefix}/{arm}"):
                    out[arm] = per_split(
                        functools.partial(_finetune_survival, config, mdl, sd, arm=arm), splits
                    )
    b = config.baselines
    wanted = [n for n, on in (("pca_cox", b.pca_cox), ("mlp", b.mlp)) if on]
    if wanted:
        X = baseline_matrix(config, mdl, sd.rows())
        bcfg = baseline_config(config)
        for name in wanted:

            def baseline(s: Split, n: str = name) -> SurvivalResult:
                return run_survival_baseline(
                    n,
                    X,
                    sd.time,
                    sd.event,
                    groups=sd.groups,
                    cohorts=sd.cohort_labels,
                    ids=sd.ids,
                    splits=[s],
                    config=bcfg,
                    min_events=config.protocol.min_events,
                )

            with timed(timings, f"{prefix}/baseline_{name}"):
                out[f"baseline_{name}"] = per_split(baseline, splits)
    return out


def per_split(run: Callable[[Split], SurvivalResult], splits: Sequence[Split]) -> SurvivalResult:
    """Run split by split; a split whose score is undefined (e.g. a small cohort's test set
    without comparable pairs) becomes a NaN row with the reason instead of stopping all."""
    parts = []
    for i, split in enumerate(splits):
        try:
            parts.append(run(split))
        except (SplitError, ClinicalMatchError) as exc:
            name = _split_name(split, i)
            logger.warning("survival %s: no score (%s)", name, exc)
            row = {
                "split": name,
                "n_train": len(split.train),
                "n_test": len(split.test),
                "c_index": math.nan,
                "c_index_weighted": math.nan,
                "c_index_macro": math.nan,
                "error": str(exc),
            }
            empty = pd.DataFrame(columns=["sample_id", "split", "time", "event", "risk"])
            parts.append(SurvivalResult(per_split=[row], summary={}, predictions=empty))
    return merge_survival(parts)


def _finetune_survival(
    config: EvaluateConfig, mdl: LoadedModel, sd: TaskData, split: Split, arm: str
) -> SurvivalResult:
    from bulkfm.train.finetune import finetune

    assert mdl.model is not None and mdl.tokenizer is not None
    tr, te = split.train, split.test
    adata = sd.rows()
    ft = finetune(
        mdl.model,
        mdl.tokenizer,
        adata[tr],
        (sd.time[tr], sd.event[tr]),
        finetune_config(config, "survival", arm, split_seed(split)),
    )
    risk = ft.predict_risk(adata[te]).astype(np.float64)
    name = _split_name(split, 0)
    row = score_survival_split(
        name,
        len(tr),
        sd.time[te],
        sd.event[te],
        risk,
        cohorts=sd.cohort_labels[te],
        min_events=config.protocol.min_events,
    )
    row["trainable_params"] = int(ft.param_counts["trainable"])
    frame = pd.DataFrame(
        {
            "sample_id": sd.ids[te],
            "split": name,
            "time": sd.time[te],
            "event": sd.event[te],
            "risk": risk,
        }
    )
    logger.info("%s survival %s: C-index %.3f", arm, name, row["c_index"])
    return SurvivalResult(per_split=[row], summary={}, predictions=frame)


# --------------------------------------------------------------------------- table entries
def _kind(key: str) -> str:
    if key.startswith("baseline_"):
        return "baseline"
    return "ablation" if key in ABLATIONS else "bulkrnabert"


def _label(key: str, config: EvaluateConfig, task: str) -> str:
    if key.startswith("baseline_"):
        return baseline_label(key.removeprefix("baseline_"), baseline_config(config), task)
    return (ARM_LABELS if task == "classification" else SURVIVAL_ARM_LABELS)[key]


def classification_entry(
    key: str, res: ClassificationResult, config: EvaluateConfig
) -> ClassificationArm:
    """The arm's row of the classification table, with the confusion pooled over splits."""
    confusion = np.sum([np.asarray(r["confusion"]) for r in res.per_split], axis=0)
    return ClassificationArm(
        label=_label(key, config, "classification"),
        kind=_kind(key),
        summary=res.summary,
        labels=res.labels,
        confusion=confusion.tolist(),
        per_split=res.per_split,
    )


def survival_entry(key: str, res: SurvivalResult, config: EvaluateConfig) -> SurvivalArm:
    """The arm's row of the survival table, with each cohort's C-index over splits."""
    cohorts = sorted({c for r in res.per_split for c in r.get("per_cohort", {})})
    per_cohort = {
        c: mean_std(
            [r.get("per_cohort", {}).get(c, {}).get("c_index", math.nan) for r in res.per_split]
        )
        for c in cohorts
    }
    return SurvivalArm(
        label=_label(key, config, "survival"),
        kind=_kind(key),
        summary=res.summary,
        per_cohort=per_cohort,
        per_split=res.per_split,
    )
