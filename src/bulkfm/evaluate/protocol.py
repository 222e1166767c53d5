"""The paper's evaluation protocol: every arm and baseline on the same patient-grouped splits.

One call (:func:`run_evaluation`) goes from a config to ``results.json`` and a report:

1. samples: load (or simulate), select (e.g. TCGA tumours), de-duplicate, drop unlabelled;
2. model: load a checkpoint, or pre-train one here on *all* loaded samples;
3. embeddings of the selected samples (mean over genes of the last block);
4. classification of ``data.label_key`` (cohort): BulkRNABert arms (MLP / SVM on frozen
   embeddings, IA3, full fine-tuning, random-init ablations) against PCA/NMF + SVM and an
   MLP on log-TPM, all on one list of 80/20 splits stratified by class;
5. pan-cancer survival (Cox MLP on embeddings, fine-tuned Cox arms, penalised Cox on PCA,
   Cox MLP on log-TPM) on splits stratified by the event: C-index, weighted, macro;
6. optional per-cohort survival, transfer (pan-cancer model on one cohort, the same model
   trained without that cohort, and one trained on that cohort only, all scored on the same
   test samples), the missing-gene robustness study, and the cohort-similarity dendrogram.

Why one split list per task: differences between arms then come from the models, not from
which patients happened to be tested. Splits are built once from labels and patient ids
and handed to every arm; each arm seeds its model with the split's seed.

Bad input is excluded explicitly (a warning, and a record under ``data.exclusions`` in
``results.json``) or stops with an error saying what to change: unlabelled samples,
duplicates, classes with too few patients (``data.drop_small_classes``), samples without a
usable survival record, cohorts without events (skipped for the C-index).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bulkfm.errors import BulkfmError, BulkfmWarning, ClinicalMatchError, ConfigError, SplitError
from bulkfm.evaluate.config import EvaluateConfig, ModelSection
from bulkfm.io import atomic_path, write_text

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.models.bulkrnabert import BulkRNABert
    from bulkfm.tasks.classification import ClassificationResult
    from bulkfm.tasks.survival import SurvivalResult
    from bulkfm.tokenize import BinTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "EvaluationResult",
    "TaskData",
    "cohort_similarity",
    "evaluate_pipeline_stage",
    "quick_config",
    "run_evaluation",
    "select_samples",
]

RESULTS_FILE = "results.json"
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
FINETUNE_ARMS = {"ia3": ("ia3", False), "full": ("full", False), "random_init": ("full", True)}
ROBUSTNESS_VARIANTS = ("imputed", "masked", "zero")


# --------------------------------------------------------------------------- data
@dataclass
class TaskData:
    """The samples a task uses, in one fixed order that every split indexes."""

    adata: ad.AnnData
    labels: np.ndarray
    groups: np.ndarray | None
    ids: np.ndarray

    def subset(self, keep: np.ndarray) -> TaskData:
        return TaskData(
            self.adata[keep],
            self.labels[keep],
            None if self.groups is None else self.groups[keep],
            self.ids[keep],
        )


def _obs(adata: ad.AnnData, key: str, what: str) -> pd.Series:
    if key not in adata.obs:
        raise ConfigError(
            f"adata.obs has no column {key!r} ({what}); available: {list(adata.obs.columns)[:15]}"
            f"; set data.{what} to one of them"
        )
    return adata.obs[key]


def select_samples(
    adata: ad.AnnData, data: Any, exclusions: dict[str, Any] | None = None
) -> ad.AnnData:
    """Samples matching ``data.select``, one per ``data.dedupe_key`` value, with a label.

    Every step that drops samples is recorded in ``exclusions`` (and logged), so a report
    says how the analysed set came about.
    """
    record = exclusions if exclusions is not None else {}
    keep = np.ones(adata.n_obs, dtype=bool)
    for key, wanted in data.select.items():
        values = _obs(adata, key, f"select.{key}").astype(str).to_numpy()
        allowed = [str(w) for w in (wanted if isinstance(wanted, list | tuple) else [wanted])]
        keep &= np.isin(values, allowed)
    record["select"] = {
        "rules": dict(data.select),
        "n_before": adata.n_obs,
        "n_after": int(keep.sum()),
    }
    if not keep.any():
        raise ConfigError(
            f"no sample matches data.select={data.select}; check the values (obs columns hold "
            "e.g. sample_type 'tumor', study 'TCGA')"
        )
    if data.dedupe_key and data.dedupe_key in adata.obs:
        key_values = adata.obs[data.dedupe_key].astype(str).to_numpy()
        # among the selected samples only: a duplicate outside the selection does not count
        dup = pd.Series(np.where(keep, key_values, None)).duplicated().to_numpy() & keep
        if dup.any():
            names = adata.obs_names[dup]
            record["dedupe"] = {
                "key": data.dedupe_key,
                "n_dropped": int(dup.sum()),
                "examples": [str(n) for n in names[:5]],
            }
            logger.info(
                "kept the first of each %s: dropped %d duplicate(s), e.g. %s",
                data.dedupe_key,
                int(dup.sum()),
                list(names[:3]),
            )
            keep &= ~dup
    labels = _obs(adata, data.label_key, "label_key")
    unlabelled = labels.isna().to_numpy() & keep
    if unlabelled.any():
        warnings.warn(
            f"{int(unlabelled.sum())} selected samples have no {data.label_key!r} and are left out",
            BulkfmWarning,
            stacklevel=2,
        )
        record["unlabelled"] = int(unlabelled.sum())
        keep &= ~unlabelled
    return adata[keep]


def _task_data(adata: ad.AnnData, data: Any) -> TaskData:
    labels = _obs(adata, data.label_key, "label_key").astype(str).to_numpy()
    ids = adata.obs_names.astype(str).to_numpy()
    groups = None
    if data.group_key is not None:
        raw = _obs(adata, data.group_key, "group_key")
        groups = np.where(raw.isna().to_numpy(), ids, raw.astype(str).to_numpy()).astype(str)
    return TaskData(adata, labels, groups, ids)


def _drop_small_classes(
    task: TaskData, n_needed: int, drop: bool, record: dict[str, Any]
) -> TaskData:
    """Classes with fewer patients than the splits need: an error naming them, or dropped."""
    from bulkfm.tasks import check_group_sizes

    frame = pd.DataFrame(
        {"y": task.labels, "g": task.groups if task.groups is not None else task.ids}
    )
    patients = frame.groupby("y")["g"].nunique()
    small = patients[patients < n_needed]
    if small.empty:
        return task
    if not drop:
        check_group_sizes(
            task.labels,
            task.groups,
            n_needed,
            context="the 80/20 stratified, patient-grouped splits",
            fix="drop or merge these classes, or set data.drop_small_classes: true to leave "
            "them out with a warning",
        )
    reasons = {c: f"{int(n)} patient(s) < {n_needed} needed" for c, n in small.items()}
    warnings.warn(
        f"left out {len(reasons)} class(es) with too few patients for the splits: "
        + "; ".join(f"{c}: {r}" for c, r in reasons.items()),
        BulkfmWarning,
        stacklevel=3,
    )
    record["small_classes"] = reasons
    keep = ~np.isin(task.labels, list(reasons))
    if np.unique(task.labels[keep]).size < 2:
        raise SplitError(
            f"fewer than two classes left after dropping small ones ({sorted(reasons)}); "
            "add samples or classify a different label"
        )
    return task.subset(keep)


# --------------------------------------------------------------------------- model
@dataclass
class _Model:
    model: BulkRNABert | None
    tokenizer: BinTokenizer | None
    info: dict[str, Any] = field(default_factory=dict)


def _load_model(
    config: EvaluateConfig, adata: ad.AnnData, out: Path, given: tuple[Any, Any] | None
) -> _Model:
    from bulkfm.models.bulkrnabert import load_pretrained

    if given is not None:
        model, tokenizer = given
        return _Model(model, tokenizer, {"source": "given"})
    section = config.model
    if section.path is not None:
        model, tokenizer = load_pretrained(
            section.path,
            genes=section.genes,
            normalization_factor=section.normalization_factor,
            device=section.device,
        )
        return _Model(model, tokenizer, {"source": "checkpoint", "path": section.path})
    if config.pretrain is not None:
        return _pretrain(config, adata, out)
    return _Model(None, None, {"source": "embeddings", "path": section.embeddings})


def _pretrain(config: EvaluateConfig, adata: ad.AnnData, out: Path) -> _Model:
    """Pre-train on every loaded sample (tumours, normals, GTEx): the MLM needs no labels."""
    from bulkfm.models.bulkrnabert import load_pretrained
    from bulkfm.train.config import PretrainConfig
    from bulkfm.train.pretrain import find_latest_checkpoint, pretrain

    raw = dict(config.pretrain or {})
    raw.setdefault("output_dir", str(out / "pretrain"))
    raw.setdefault("data", {})
    raw["data"] = {**raw["data"], "path": None}
    pre = PretrainConfig.from_dict(raw)
    resume = find_latest_checkpoint(pre.output_dir) is not None
    logger.info(
        "pre-training (%d steps%s) on %d samples -> %s",
        pre.optim.max_steps,
        ", resuming" if resume else "",
        adata.n_obs,
        pre.output_dir,
    )
    t0 = time.perf_counter()
    result = pretrain(pre, adata=adata, resume=resume)
    if result.final_dir is None:
        raise ConfigError(f"pre-training in {pre.output_dir} stopped before its final save")
    model, tokenizer = load_pretrained(result.final_dir, device=config.model.device)
    info = {
        "source": "pretrained here",
        "path": str(result.final_dir),
        "steps": result.step,
        "n_train": result.n_train,
        "n_eval": result.n_eval,
        "eval": result.eval,
        "initial_eval": result.initial_eval,
        "elapsed_s": time.perf_counter() - t0,
    }
    return _Model(model, tokenizer, info)


def _embed(
    mdl: _Model, section: ModelSection, adata: ad.AnnData, model: BulkRNABert | None = None
) -> np.ndarray:
    from bulkfm.embed import embed_adata

    return embed_adata(
        model if model is not None else mdl.model,
        mdl.tokenizer,
        adata,
        layer=section.layer,
        batch_size=section.batch_size,
        progress=None,
    )


def _random_encoder(model: BulkRNABert, seed: int) -> BulkRNABert:
    """Same architecture, fresh initialisation (seeded without touching the global RNG)."""
    import torch

    from bulkfm.models.bulkrnabert import BulkRNABert

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BulkRNABert(dataclasses.replace(model.config)).to(model.device).eval()


def _baseline_matrix(config: EvaluateConfig, mdl: _Model, adata: ad.AnnData) -> Any:
    """TPM columns the baselines read: the model's genes, or all (top-k chosen per split)."""
    genes = config.baselines.genes
    if genes == "model" and mdl.tokenizer is not None:
        cols = mdl.tokenizer.align_columns(list(map(str, adata.var_names)))
        return adata.X if cols is None else adata.X[:, cols]
    return adata.X


def _baseline_config(config: EvaluateConfig) -> Any:
    from bulkfm.tasks.baselines import BaselineConfig

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


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    logger.info("evaluate: %s ...", key)
    try:
        yield
    finally:
        timings[key] = round(time.perf_counter() - t0, 2)
        logger.info("evaluate: %s done in %.1f s", key, timings[key])


def _split_info(splits: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {"name": s.name, "seed": s.seed, "n_train": len(s.train), "n_test": len(s.test)}
        for s in splits
    ]


def _finetune_config(config: EvaluateConfig, task: str, arm: str, seed: int) -> Any:
    from bulkfm.train.finetune import FinetuneConfig

    mode, random_init = FINETUNE_ARMS[arm]
    kwargs = {"progress": False, **config.heads.finetune}
    return FinetuneConfig(task=task, mode=mode, random_init=random_init, seed=seed, **kwargs)


def _split_name(split: Any, i: int) -> str:
    return getattr(split, "name", "") or f"split{i}"


# --------------------------------------------------------------------------- classification
def _classification_arms(
    config: EvaluateConfig,
    mdl: _Model,
    task: TaskData,
    emb: np.ndarray,
    splits: Sequence[Any],
    timings: dict[str, float],
) -> dict[str, ClassificationResult]:
    from bulkfm.tasks.classification import run_classification

    arms = config.arms
    out: dict[str, ClassificationResult] = {}
    common = {"groups": task.groups, "ids": task.ids, "splits": splits}
    if arms.mlp:
        with _timed(timings, "classification/mlp"):
            out["mlp"] = run_classification(
                emb, task.labels, method="mlp", mlp=config.heads.mlp, **common
            )
    if arms.svm:
        with _timed(timings, "classification/svm"):
            out["svm"] = run_classification(
                emb, task.labels, method="svm", svm_C=config.heads.svm_C, **common
            )
    if arms.random_frozen and mdl.model is not None:
        with _timed(timings, "classification/random_frozen"):
            rand = _embed(
                mdl, config.model, task.adata, _random_encoder(mdl.model, config.protocol.seed)
            )
            out["random_frozen"] = run_classification(
                rand, task.labels, method="mlp", mlp=config.heads.mlp, **common
            )
    for arm in FINETUNE_ARMS:
        if getattr(arms, arm) and mdl.model is not None:
            with _timed(timings, f"classification/{arm}"):
                out[arm] = _finetune_classification(config, mdl, task, splits, arm)
    return out


def _finetune_classification(
    config: EvaluateConfig, mdl: _Model, task: TaskData, splits: Sequence[Any], arm: str
) -> ClassificationResult:
    from bulkfm.metrics import classification_metrics
    from bulkfm.tasks.baselines import merge_classification
    from bulkfm.tasks.classification import ClassificationResult
    from bulkfm.train.finetune import finetune

    classes = sorted(pd.unique(task.labels).tolist(), key=str)
    parts = []
    for i, split in enumerate(splits):
        tr, te = split.train, split.test
        ft = finetune(
            mdl.model,
            mdl.tokenizer,
            task.adata[tr],
            task.labels[tr],
            _finetune_config(config, "classification", arm, split.seed),
        )
        pred = ft.predict(task.adata[te])
        scores = classification_metrics(task.labels[te], pred, labels=classes)
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
            {"sample_id": task.ids[te], "split": name, "y_true": task.labels[te], "y_pred": pred}
        )
        parts.append(ClassificationResult(arm, classes, [row], {}, frame))
        logger.info("%s %s: macro F1 %.3f", arm, name, scores["macro_f1"])
    return merge_classification(arm, parts)


def _classification_baselines(
    config: EvaluateConfig,
    mdl: _Model,
    task: TaskData,
    splits: Sequence[Any],
    timings: dict[str, float],
) -> dict[str, ClassificationResult]:
    from bulkfm.tasks.baselines import run_classification_baseline

    b = config.baselines
    wanted = [n for n, on in (("pca_svm", b.pca_svm), ("nmf_svm", b.nmf_svm), ("mlp", b.mlp)) if on]
    if not wanted:
        return {}
    X = _baseline_matrix(config, mdl, task.adata)
    bcfg = _baseline_config(config)
    out = {}
    for name in wanted:
        with _timed(timings, f"classification/baseline_{name}"):
            out[f"baseline_{name}"] = run_classification_baseline(
                name, X, task.labels, groups=task.groups, ids=task.ids, splits=splits, config=bcfg
            )
    return out


# --------------------------------------------------------------------------- survival
@dataclass
class _SurvivalData:
    task: TaskData
    time: np.ndarray
    event: np.ndarray
    cohorts: np.ndarray

    def subset(self, keep: np.ndarray) -> _SurvivalData:
        return _SurvivalData(
            self.task.subset(keep), self.time[keep], self.event[keep], self.cohorts[keep]
        )


def _survival_data(config: EvaluateConfig, task: TaskData, record: dict[str, Any]) -> _SurvivalData:
    from bulkfm.metrics import validate_survival
    from bulkfm.tasks.survival import valid_survival_mask

    data = config.data
    time_raw = _obs(task.adata, data.time_key, "time_key").to_numpy(dtype=object)
    event_raw = _obs(task.adata, data.event_key, "event_key").to_numpy(dtype=object)
    valid = valid_survival_mask(time_raw, event_raw)
    if not valid.all():
        record["survival"] = {
            "n_excluded": int((~valid).sum()),
            "reason": "missing/non-positive survival time or missing event",
            "ids": task.ids[~valid].tolist(),
        }
    if not valid.any():
        raise ClinicalMatchError(
            f"no selected sample has a usable survival record ({data.time_key} > 0 and "
            f"{data.event_key} 0/1); join survival data (bulkfm data build --survival) first"
        )
    t, e = validate_survival(time_raw[valid], event_raw[valid])
    cohorts = _obs(task.adata, data.cohort_key, "cohort_key").astype(str).to_numpy()
    return _SurvivalData(task.subset(valid), t, e.astype(np.int8), cohorts[valid])


def _survival_splits(
    config: EvaluateConfig, sd: _SurvivalData, stratify: str | None = None
) -> list[Any]:
    from bulkfm.data.splits import repeated_holdout, survival_strata

    p = config.protocol
    strata = survival_strata(sd.event)
    if (stratify or p.survival_strata) == "cohort_event":
        strata = np.char.add(np.char.add(sd.cohorts.astype(str), "|"), strata.astype(str))
    return repeated_holdout(
        strata,
        sd.task.groups,
        seeds=range(p.seed, p.seed + p.n_seeds),
        test_size=p.test_size,
    )


def _survival_arms(
    config: EvaluateConfig,
    mdl: _Model,
    sd: _SurvivalData,
    emb: np.ndarray,
    splits: Sequence[Any],
    timings: dict[str, float],
    *,
    prefix: str = "survival",
    finetune_arms: bool = True,
    rand_emb: np.ndarray | None = None,
) -> dict[str, SurvivalResult]:
    from bulkfm.tasks.survival import run_survival

    arms = config.arms
    out: dict[str, SurvivalResult] = {}
    kw = {
        "groups": sd.task.groups,
        "cohorts": sd.cohorts,
        "ids": sd.task.ids,
        "model": config.heads.cox,
        "min_events": config.protocol.min_events,
    }
    if arms.mlp:
        with _timed(timings, f"{prefix}/mlp"):
            out["mlp"] = _per_split(
                lambda s: run_survival(emb, sd.time, sd.event, splits=[s], **kw), splits
            )
    if rand_emb is not None:
        with _timed(timings, f"{prefix}/random_frozen"):
            out["random_frozen"] = _per_split(
                lambda s: run_survival(rand_emb, sd.time, sd.event, splits=[s], **kw), splits
            )
    if finetune_arms and mdl.model is not None:
        for arm in FINETUNE_ARMS:
            if getattr(arms, arm):
                with _timed(timings, f"{prefix}/{arm}"):
                    out[arm] = _per_split(
                        lambda s, a=arm: _finetune_survival(config, mdl, sd, s, a), splits
                    )
    b = config.baselines
    wanted = [n for n, on in (("pca_cox", b.pca_cox), ("mlp", b.mlp)) if on]
    if wanted:
        from bulkfm.tasks.baselines import run_survival_baseline

        X = _baseline_matrix(config, mdl, sd.task.adata)
        bcfg = _baseline_config(config)
        for name in wanted:
            with _timed(timings, f"{prefix}/baseline_{name}"):
                out[f"baseline_{name}"] = _per_split(
                    lambda s, n=name: run_survival_baseline(
                        n,
                        X,
                        sd.time,
                        sd.event,
                        groups=sd.task.groups,
                        cohorts=sd.cohorts,
                        ids=sd.task.ids,
                        splits=[s],
                        config=bcfg,
                        min_events=config.protocol.min_events,
                    ),
                    splits,
                )
    return out


def _per_split(run: Callable[[Any], SurvivalResult], splits: Sequence[Any]) -> SurvivalResult:
    """Run split by split; a split whose score is undefined (e.g. a small cohort's test set
    without comparable pairs) becomes a NaN row with the reason instead of stopping all."""
    from bulkfm.tasks.baselines import merge_survival
    from bulkfm.tasks.survival import SurvivalResult

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
    config: EvaluateConfig, mdl: _Model, sd: _SurvivalData, split: Any, arm: str
) -> SurvivalResult:
    from bulkfm.tasks.baselines import score_survival_split
    from bulkfm.tasks.survival import SurvivalResult
    from bulkfm.train.finetune import finetune

    tr, te = split.train, split.test
    ft = finetune(
        mdl.model,
        mdl.tokenizer,
        sd.task.adata[tr],
        (sd.time[tr], sd.event[tr]),
        _finetune_config(config, "survival", arm, split.seed),
    )
    risk = ft.predict_risk(sd.task.adata[te]).astype(np.float64)
    name = _split_name(split, 0)
    row = score_survival_split(
        name,
        len(tr),
        sd.time[te],
        sd.event[te],
        risk,
        cohorts=sd.cohorts[te],
        min_events=config.protocol.min_events,
    )
    row["trainable_params"] = int(ft.param_counts["trainable"])
    frame = pd.DataFrame(
        {
            "sample_id": sd.task.ids[te],
            "split": name,
            "time": sd.time[te],
            "event": sd.event[te],
            "risk": risk,
        }
    )
    logger.info("%s survival %s: C-index %.3f", arm, name, row["c_index"])
    return SurvivalResult(per_split=[row], summary={}, predictions=frame)


def _cohort_names(requested: list[str], available: np.ndarray) -> list[str]:
    names = sorted(pd.unique(available).tolist())
    if requested == ["all"]:
        return names
    unknown = sorted(set(requested) - set(names))
    if unknown:
        raise ConfigError(
            f"cohorts {unknown} are not among the survival samples' cohorts {names}; fix "
            "tasks.per_cohort_survival / tasks.transfer"
        )
    return list(requested)


def _per_cohort_survival(
    config: EvaluateConfig,
    mdl: _Model,
    sd: _SurvivalData,
    emb: np.ndarray,
    timings: dict[str, float],
) -> dict[str, Any]:
    """One model per cohort (frozen arms and baselines; fine-tuning is left out to bound
    the cost). Cohorts without enough events or patients for the splits are skipped."""
    out: dict[str, Any] = {"cohorts": {}, "skipped": {}}
    for cohort in _cohort_names(config.tasks.per_cohort_survival, sd.cohorts):
        keep = sd.cohorts == cohort
        sub = sd.subset(keep)
        n_events = int(sub.event.sum())
        if n_events < config.protocol.min_events:
            reason = f"{n_events} event(s) among {int(keep.sum())} samples"
            warnings.warn(
                f"per-cohort survival: skipped {cohort} ({reason}); the C-index needs events",
                BulkfmWarning,
                stacklevel=2,
            )
            out["skipped"][cohort] = reason
            continue
        try:
            splits = _survival_splits(config, sub, stratify="event")
        except SplitError as exc:
            warnings.warn(
                f"per-cohort survival: skipped {cohort}: {exc}", BulkfmWarning, stacklevel=2
            )
            out["skipped"][cohort] = str(exc)
            continue
        arms = _survival_arms(
            config,
            mdl,
            sub,
            emb[keep],
            splits,
            timings,
            prefix=f"per_cohort/{cohort}",
            finetune_arms=False,
        )
        out["cohorts"][cohort] = {
            "n": int(keep.sum()),
            "n_events": n_events,
            "arms": {k: _survival_entry(k, v, config) for k, v in arms.items()},
        }
    return out


def _transfer(
    config: EvaluateConfig,
    mdl: _Model,
    sd: _SurvivalData,
    emb: np.ndarray,
    splits: Sequence[Any],
    pan: dict[str, SurvivalResult],
    timings: dict[str, float],
) -> dict[str, Any]:
    """Per cohort, on the pan-cancer test samples of that cohort: the pan-cancer model, the
    same recipe trained without the cohort, and one trained on the cohort alone."""
    from bulkfm.data.splits import Split
    from bulkfm.metrics import concordance_index, mean_std

    arms = [a for a in ("mlp", "baseline_pca_cox") if a in pan]
    out: dict[str, Any] = {}
    for cohort in _cohort_names(config.tasks.transfer, sd.cohorts):
        in_c = sd.cohorts == cohort
        variants = {
            "without_cohort": [
                Split(s.train[~in_c[s.train]], s.test[in_c[s.test]], seed=s.seed, name=s.name)
                for s in splits
            ],
            "cohort_only": [
                Split(s.train[in_c[s.train]], s.test[in_c[s.test]], seed=s.seed, name=s.name)
                for s in splits
            ],
        }
        entry: dict[str, Any] = {}
        for arm in arms:
            pred = pan[arm].predictions
            ids_c = set(sd.task.ids[in_c])
            pan_scores = []
            for s in splits:
                p = pred[(pred["split"] == s.name) & pred["sample_id"].isin(ids_c)]
                try:
                    pan_scores.append(concordance_index(p["time"], p["event"], p["risk"]))
                except BulkfmError:
                    pan_scores.append(math.nan)
            scores = {"pan_cancer": mean_std(pan_scores)}
            for variant, vsplits in variants.items():
                res = _transfer_arm(
                    config,
                    mdl,
                    sd,
                    emb,
                    vsplits,
                    arm,
                    timings,
                    f"transfer/{cohort}/{variant}/{arm}",
                )
                scores[variant] = res.summary.get("c_index")
                scores[f"{variant}_errors"] = [r["error"] for r in res.per_split if "error" in r]
            entry[arm] = scores
        out[cohort] = entry
    return out


def _transfer_arm(
    config: EvaluateConfig,
    mdl: _Model,
    sd: _SurvivalData,
    emb: np.ndarray,
    splits: Sequence[Any],
    arm: str,
    timings: dict[str, float],
    key: str,
) -> SurvivalResult:
    from bulkfm.tasks.baselines import run_survival_baseline
    from bulkfm.tasks.survival import run_survival

    def run(split: Any) -> SurvivalResult:
        if not len(split.train) or not len(split.test):
            raise SplitError("empty training or test side")
        if arm == "mlp":
            return run_survival(
                emb,
                sd.time,
                sd.event,
                groups=sd.task.groups,
                ids=sd.task.ids,
                splits=[split],
                model=config.heads.cox,
            )
        return run_survival_baseline(
            "pca_cox",
            _baseline_matrix(config, mdl, sd.task.adata),
            sd.time,
            sd.event,
            groups=sd.task.groups,
            ids=sd.task.ids,
            splits=[split],
            config=_baseline_config(config),
        )

    with _timed(timings, key):
        return _per_split(run, splits)


# --------------------------------------------------------------------------- robustness
def _robustness(
    config: EvaluateConfig,
    mdl: _Model,
    task: TaskData,
    emb: np.ndarray,
    splits: Sequence[Any],
) -> dict[str, Any]:
    """Appendix D: remove a fraction of the model's genes from the test samples and compare
    test macro-F1 to the clean one, with the genes imputed by the model's MLM ("imputed"),
    left out of the embedding mean as [MASK] ("masked"), or set to 0 TPM ("zero"). The
    head is trained once per split on clean training embeddings."""
    from bulkfm.metrics import mean_std

    fractions = config.tasks.robustness
    rows: list[dict[str, Any]] = []
    for split in splits:
        clf = _robustness_head(config, emb, task, split)
        clean = _macro_f1(task.labels[split.test], clf.predict(emb[split.test]))
        test = task.adata[split.test].copy()
        for fraction in fractions:
            scores = _robustness_variants(config, mdl, test, fraction, split.seed)
            for variant, variant_emb in scores.items():
                f1 = _macro_f1(task.labels[split.test], clf.predict(variant_emb))
                rows.append(
                    {
                        "split": split.name,
                        "fraction": fraction,
                        "variant": variant,
                        "clean_macro_f1": clean,
                        "macro_f1": f1,
                        "ratio": f1 / clean if clean > 0 else math.nan,
                    }
                )
    frame = pd.DataFrame(rows)
    out: dict[str, Any] = {"head": config.tasks.robustness_head, "fractions": {}}
    for fraction, group in frame.groupby("fraction"):
        entry: dict[str, Any] = {
            "clean_macro_f1": mean_std(group.drop_duplicates("split")["clean_macro_f1"])
        }
        for variant, sub in group.groupby("variant"):
            entry[str(variant)] = {
                "macro_f1": mean_std(sub["macro_f1"]),
                "ratio": mean_std(sub["ratio"]),
            }
        out["fractions"][f"{fraction:g}"] = entry
    out["per_split"] = rows
    return out


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from bulkfm.metrics import classification_metrics

    return classification_metrics(y_true, y_pred)["macro_f1"]


def _robustness_head(config: EvaluateConfig, emb: np.ndarray, task: TaskData, split: Any) -> Any:
    from bulkfm.tasks.classification import MLPClassifier, make_svm

    tr = split.train
    if config.tasks.robustness_head == "svm":
        C = config.heads.svm_C
        return make_svm(C if isinstance(C, float) else C[0], seed=split.seed).fit(
            emb[tr], task.labels[tr]
        )
    groups = None if task.groups is None else task.groups[tr]
    return MLPClassifier(**{"seed": split.seed, **config.heads.mlp}).fit(
        emb[tr], task.labels[tr], groups=groups
    )


def _robustness_variants(
    config: EvaluateConfig, mdl: _Model, test: ad.AnnData, fraction: float, seed: int
) -> dict[str, np.ndarray]:
    import scipy.sparse as sp

    from bulkfm.impute import impute_missing

    tok = mdl.tokenizer
    cols = tok.align_columns(list(map(str, test.var_names)))
    model_cols = np.arange(test.n_vars) if cols is None else cols
    rng = np.random.default_rng([seed, round(fraction * 1_000_000)])
    n_remove = max(1, round(fraction * model_cols.size))
    removed = np.sort(rng.choice(model_cols, size=n_remove, replace=False))
    base = test.layers.get("missing")
    base = (
        sp.csr_matrix(test.shape, dtype=bool) if base is None else sp.csr_matrix(base, dtype=bool)
    )
    removal = sp.lil_matrix(test.shape, dtype=bool)
    removal[:, removed] = True
    masked = test.copy()
    masked.layers["missing"] = (base + removal.tocsr()).astype(bool)
    imputed = impute_missing(mdl.model, tok, masked, batch_size=config.model.batch_size)
    imputed.layers["missing"] = base  # the removed genes now hold predicted TPM
    zero = test.copy()
    X = np.asarray(zero.X.toarray() if sp.issparse(zero.X) else zero.X, dtype=np.float32).copy()
    X[:, removed] = 0.0
    zero.X = X
    zero.layers["missing"] = base
    return {
        "imputed": _embed(mdl, config.model, imputed),
        "masked": _embed(mdl, config.model, masked),
        "zero": _embed(mdl, config.model, zero),
    }


# --------------------------------------------------------------------------- similarity
def cohort_similarity(
    embeddings: np.ndarray, labels: Sequence[Any], *, center: bool = True
) -> dict[str, Any]:
    """Cosine similarity of per-label mean embeddings and their average-linkage clustering
    (scipy, cosine distance); ``order`` is the dendrogram's leaf order.

    ``center`` subtracts the mean over all samples first: every BulkRNABert embedding
    shares a large common component, so uncentred means all have cosine ~1 with each
    other and the clustering would follow noise in the last digits.
    """
    from scipy.cluster.hierarchy import dendrogram, linkage

    X = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels).astype(str)
    if X.ndim != 2 or X.shape[0] != y.size:
        raise ConfigError(f"embeddings {X.shape} and {y.size} labels do not match")
    names = sorted(np.unique(y).tolist())
    if len(names) < 2:
        raise ConfigError("cohort similarity needs at least two labels")
    if center:
        X = X - X.mean(axis=0)
    means = np.vstack([X[y == n].mean(axis=0) for n in names])
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ConfigError("a mean embedding is all zeros; cosine similarity is undefined")
    unit = means / norms
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    link = linkage(means, method="average", metric="cosine")
    order = dendrogram(link, no_plot=True, labels=names)["ivl"]
    return {
        "labels": names,
        "centered": center,
        "cosine": sim.tolist(),
        "linkage": link.tolist(),
        "order": list(order),
    }


# --------------------------------------------------------------------------- results
def _classification_entry(
    key: str, res: ClassificationResult, config: EvaluateConfig
) -> dict[str, Any]:
    from bulkfm.tasks.baselines import baseline_label

    is_base = key.startswith("baseline_")
    label = (
        baseline_label(key.removeprefix("baseline_"), _baseline_config(config), "classification")
        if is_base
        else ARM_LABELS[key]
    )
    confusion = np.sum([np.asarray(r["confusion"]) for r in res.per_split], axis=0)
    return {
        "label": label,
        "kind": _kind(key),
        "summary": res.summary,
        "labels": res.labels,
        "confusion": confusion.tolist(),
        "per_split": res.per_split,
    }


def _survival_entry(key: str, res: SurvivalResult, config: EvaluateConfig) -> dict[str, Any]:
    from bulkfm.metrics import mean_std
    from bulkfm.tasks.baselines import baseline_label

    is_base = key.startswith("baseline_")
    label = (
        baseline_label(key.removeprefix("baseline_"), _baseline_config(config), "survival")
        if is_base
        else SURVIVAL_ARM_LABELS[key]
    )
    cohorts = sorted({c for r in res.per_split for c in r.get("per_cohort", {})})
    per_cohort = {
        c: mean_std(
            [r.get("per_cohort", {}).get(c, {}).get("c_index", math.nan) for r in res.per_split]
        )
        for c in cohorts
    }
    return {
        "label": label,
        "kind": _kind(key),
        "summary": res.summary,
        "per_cohort": per_cohort,
        "per_split": res.per_split,
    }


def _kind(key: str) -> str:
    if key.startswith("baseline_"):
        return "baseline"
    return "ablation" if key in ABLATIONS else "bulkrnabert"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class EvaluationResult:
    """What :func:`run_evaluation` produced: the results dict (as in results.json), the
    fitted-model outputs per arm, and where the files went."""

    results: dict[str, Any]
    out_dir: Path
    paths: dict[str, Path]
    classification: dict[str, ClassificationResult] = field(default_factory=dict, repr=False)
    survival: dict[str, SurvivalResult] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        """Mean ± std per arm and task, and the report paths (compact, JSON-able)."""
        out: dict[str, Any] = {"out_dir": str(self.out_dir)}
        for task in ("classification", "survival"):
            arms = self.results.get(task) or {}
            out[task] = {
                k: {
                    "label": v["label"],
                    **{m: {"mean": s["mean"], "std": s["std"]} for m, s in v["summary"].items()},
                }
                for k, v in arms.items()
            }
        out["paths"] = {k: str(v) for k, v in self.paths.items()}
        return _jsonable(out)


# --------------------------------------------------------------------------- entry points
def _load_adata(config: EvaluateConfig) -> ad.AnnData:
    if config.data.path is not None:
        from bulkfm.train.data import load_adata

        return load_adata(config.data.path)
    from bulkfm.data.simulate import simulate_bulk

    logger.info("no data.path: simulating %s", config.data.simulate or "the default data set")
    return simulate_bulk(**(config.data.simulate or {}))


def _read_embeddings(config: EvaluateConfig, task: TaskData) -> tuple[np.ndarray, TaskData, int]:
    """Precomputed embeddings matched to the task samples by id (none shared: an error)."""
    from bulkfm.embed import read_embeddings
    from bulkfm.tasks import align_inputs

    frame = read_embeddings(config.model.embeddings)
    aligned = align_inputs(frame, pd.Series(task.labels, index=task.ids))
    position = pd.Index(task.ids).get_indexer(aligned.ids)
    dropped = len(task.ids) - len(aligned.ids)
    if dropped:
        warnings.warn(
            f"{dropped} of {len(task.ids)} selected samples have no embedding in "
            f"{config.model.embeddings} and are left out",
            BulkfmWarning,
            stacklevel=3,
        )
    return aligned.X, task.subset(position), dropped


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
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _threads(config.num_threads), _collect_warnings() as caught:
        result = _run(config, adata, model, out)
    result.results["warnings"] = sorted(caught)
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


def _run(
    config: EvaluateConfig,
    adata: ad.AnnData | None,
    given: tuple[Any, Any] | None,
    out: Path,
) -> EvaluationResult:
    from bulkfm.tasks import n_holdout_folds

    timings: dict[str, float] = {}
    exclusions: dict[str, Any] = {}
    if any(getattr(config.arms, arm) for arm in FINETUNE_ARMS):
        _finetune_config(config, "classification", "ia3", 0)  # bad settings fail before work
    with _timed(timings, "data"):
        full = adata if adata is not None else _load_adata(config)
        selected = select_samples(full, config.data, exclusions)
        task = _task_data(selected, config.data)
    with _timed(timings, "model"):
        mdl = _load_model(config, full, out, given)
    with _timed(timings, "embed"):
        if mdl.model is not None:
            emb = _embed(mdl, config.model, task.adata)
        else:
            emb, task, dropped = _read_embeddings(config, task)
            if dropped:
                exclusions["no_embedding"] = dropped
    n_folds = n_holdout_folds(config.protocol.test_size)
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "model": _model_info(mdl),
        "data": {"n_loaded": full.n_obs, "n_selected": len(task.ids), "exclusions": exclusions},
        "splits": {},
        "notes": _notes(config, mdl, task),
        "timings_s": timings,
    }
    result = EvaluationResult(results, out, {})
    clf_task = task
    if config.tasks.classification:
        clf_task = _drop_small_classes(task, n_folds, config.data.drop_small_classes, exclusions)
        keep = np.isin(task.ids, clf_task.ids)
        clf_emb = emb[keep]
        results["data"]["classes"] = (
            pd.Series(clf_task.labels).value_counts().sort_index().to_dict()
        )
        splits = _classification_splits(config, clf_task)
        results["splits"]["classification"] = _split_info(splits)
        arms = _classification_arms(config, mdl, clf_task, clf_emb, splits, timings)
        arms.update(_classification_baselines(config, mdl, clf_task, splits, timings))
        result.classification = arms
        results["classification"] = {
            k: _classification_entry(k, v, config) for k, v in arms.items()
        }
        if config.tasks.robustness and mdl.model is not None:
            with _timed(timings, "robustness"):
                results["robustness"] = _robustness(config, mdl, clf_task, clf_emb, splits)
    if config.tasks.survival:
        _survival_studies(config, mdl, task, emb, exclusions, results, result, timings)
    if config.tasks.similarity:
        results["similarity"] = cohort_similarity(emb, task.labels)
    return result


def _classification_splits(config: EvaluateConfig, task: TaskData) -> list[Any]:
    from bulkfm.data.splits import repeated_holdout

    p = config.protocol
    return repeated_holdout(
        task.labels, task.groups, seeds=range(p.seed, p.seed + p.n_seeds), test_size=p.test_size
    )


def _survival_studies(
    config: EvaluateConfig,
    mdl: _Model,
    task: TaskData,
    emb: np.ndarray,
    exclusions: dict[str, Any],
    results: dict[str, Any],
    result: EvaluationResult,
    timings: dict[str, float],
) -> None:
    sd = _survival_data(config, task, exclusions)
    keep = np.isin(task.ids, sd.task.ids)
    s_emb = emb[keep]
    results["data"]["survival"] = {
        "n": len(sd.time),
        "n_events": int(sd.event.sum()),
        "per_cohort": {
            c: {"n": int((sd.cohorts == c).sum()), "n_events": int(sd.event[sd.cohorts == c].sum())}
            for c in sorted(pd.unique(sd.cohorts))
        },
    }
    splits = _survival_splits(config, sd)
    results["splits"]["survival"] = _split_info(splits)
    rand = None
    if config.arms.random_frozen and mdl.model is not None:
        rand = _embed(
            mdl, config.model, sd.task.adata, _random_encoder(mdl.model, config.protocol.seed)
        )
    arms = _survival_arms(config, mdl, sd, s_emb, splits, timings, rand_emb=rand)
    result.survival = arms
    results["survival"] = {k: _survival_entry(k, v, config) for k, v in arms.items()}
    if config.tasks.per_cohort_survival:
        results["per_cohort_survival"] = _per_cohort_survival(config, mdl, sd, s_emb, timings)
    if config.tasks.transfer:
        results["transfer"] = _transfer(config, mdl, sd, s_emb, splits, arms, timings)


def _model_info(mdl: _Model) -> dict[str, Any]:
    info = dict(mdl.info)
    if mdl.model is not None:
        cfg = mdl.model.config
        info.update(
            n_genes=cfg.n_genes,
            embed_dim=cfg.embed_dim,
            num_layers=cfg.num_layers,
            n_parameters=int(mdl.model.num_parameters()),
        )
    return info


def _notes(config: EvaluateConfig, mdl: _Model, task: TaskData) -> list[str]:
    b = config.baselines
    n_model = mdl.model.config.n_genes if mdl.model is not None else "?"
    genes = {
        "model": f"the {n_model} genes the model reads",
        "all": f"all {task.adata.n_vars} genes",
    }.get(b.genes, f"the {b.genes} most variable genes of each training side")  # type: ignore[arg-type]
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
    from bulkfm.evaluate.report import write_report

    out = result.out_dir
    frames = []
    for key, res in result.classification.items():
        frames.append(res.predictions.assign(task="classification", arm=key))
    for key, res in result.survival.items():
        frames.append(res.predictions.assign(task="survival", arm=key))
    if frames:
        path = out / "predictions.csv.gz"
        with atomic_path(path) as tmp:
            pd.concat(frames, ignore_index=True).to_csv(tmp, index=False, compression="gzip")
        result.paths["predictions"] = path
    report_paths = write_report(result, config)
    result.paths["results"] = write_text(
        json.dumps(_jsonable(result.results), indent=1) + "\n", out / RESULTS_FILE
    )
    result.paths.update(report_paths)


def quick_config(
    model_dir: str | Path, out_dir: str | Path, *, quick: bool = True
) -> EvaluateConfig:
    """Settings of the main job's evaluation stage: small enough for a few CPU minutes."""
    raw: dict[str, Any] = {
        "model": {"path": str(model_dir), "batch_size": 32},
        "output_dir": str(out_dir),
        "data": {"select": {"sample_type": "tumor"}, "drop_small_classes": True},
        "report": {"title": "bulkfm run: downstream evaluation"},
    }
    if quick:
        raw.update(
            # one thread: on a busy 2-core machine it is 3-5x faster than two for these sizes
            num_threads=1,
            protocol={"n_seeds": 2},
            heads={
                "mlp": {"max_epochs": 60, "patience": 8},
                "cox": {"max_epochs": 60, "patience": 8},
                "finetune": {"epochs": 2, "batch_size": 16, "patience": None},
            },
            baselines={"nmf_max_iter": 100},
            tasks={"robustness": [0.3]},
        )
    return EvaluateConfig.from_dict(raw)


def evaluate_pipeline_stage(
    adata: ad.AnnData, model_dir: str | Path, out_dir: str | Path, *, quick: bool = True
) -> dict[str, Any]:
    """The main job's downstream stage: embed -> classify cohorts and predict survival,
    BulkRNABert against the baselines -> report. Returns :meth:`EvaluationResult.summary`."""
    config = quick_config(model_dir, out_dir, quick=quick)
    if "sample_type" not in adata.obs:
        config.data.select = {}
    result = run_evaluation(config, adata=adata)
    return result.summary()
