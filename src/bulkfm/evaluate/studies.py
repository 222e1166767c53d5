"""The optional studies beyond the two main tables: survival within each cohort, transfer
to one cohort, robustness to missing genes, and the cohort similarity of embeddings."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.cluster.hierarchy import dendrogram, linkage

from bulkfm import schema as keys
from bulkfm.data.splits import Split
from bulkfm.errors import BulkfmError, BulkfmWarning, ConfigError, SplitError
from bulkfm.evaluate.arms import (
    baseline_config,
    baseline_matrix,
    per_split,
    survival_arms,
    survival_entry,
    timed,
)
from bulkfm.evaluate.model import LoadedModel, embed
from bulkfm.evaluate.results import (
    CohortSimilarity,
    CohortSurvival,
    PerCohortSurvival,
    RobustnessFraction,
    RobustnessStudy,
    TransferScores,
    VariantScores,
)
from bulkfm.evaluate.selection import (
    cohort_names,
    event_counts,
    split_seed,
    survival_splits,
)
from bulkfm.impute import impute_missing
from bulkfm.metrics import classification_metrics, concordance_index, mean_std
from bulkfm.tasks import TaskData
from bulkfm.tasks.baselines import run_survival_baseline
from bulkfm.tasks.classification import MLPClassifier, make_svm
from bulkfm.tasks.survival import SurvivalResult, run_survival

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.evaluate.config import EvaluateConfig

__all__ = [
    "ROBUSTNESS_VARIANTS",
    "cohort_similarity",
    "per_cohort_survival",
    "robustness",
    "transfer",
]

ROBUSTNESS_VARIANTS = ("imputed", "masked", "zero")


# --------------------------------------------------------------------------- per cohort
def per_cohort_survival(
    config: EvaluateConfig,
    mdl: LoadedModel,
    sd: TaskData,
    emb: np.ndarray,
    timings: dict[str, float],
) -> PerCohortSurvival:
    """One model per cohort (frozen arms and baselines; fine-tuning is left out to bound
    the cost). Cohorts without enough events or patients for the splits are skipped."""
    out = PerCohortSurvival()
    few: dict[str, int] = {}
    for cohort in cohort_names(config.tasks.per_cohort_survival, sd.cohort_labels):
        keep = sd.cohort_labels == cohort
        sub = sd.subset(keep)
        n_events = int(sub.event.sum())
        if n_events < config.protocol.min_events:
            reason = f"{n_events} event(s) among {int(keep.sum())} samples"
            warnings.warn(
                f"per-cohort survival: skipped {cohort} ({reason}); the C-index needs events",
                BulkfmWarning,
                stacklevel=2,
            )
            out.skipped[cohort] = reason
            continue
        try:
            splits = survival_splits(config, sub, stratify="event")
        except SplitError as exc:
            warnings.warn(
                f"per-cohort survival: skipped {cohort}: {exc}", BulkfmWarning, stacklevel=2
            )
            out.skipped[cohort] = str(exc)
            continue
        counts = event_counts(sub, splits, config.protocol.warn_below_events, cohort, warn=False)
        if counts.few:
            few[cohort] = min(counts.per_split)
        arms = survival_arms(
            config,
            mdl,
            sub,
            emb[keep],
            splits,
            timings,
            prefix=f"per_cohort/{cohort}",
            finetune_arms=False,
        )
        out.cohorts[cohort] = CohortSurvival(
            n=int(keep.sum()),
            n_events=n_events,
            arms={k: survival_entry(k, v, config) for k, v in arms.items()},
            min_test_events=min(counts.per_split),
        )
    if few:  # one warning for all cohorts, not one per cohort
        warnings.warn(
            f"per-cohort survival models: {len(few)} of {len(out.cohorts)} cohorts have fewer "
            f"than {config.protocol.warn_below_events} events in a test split (fewest: "
            + ", ".join(f"{c} {n}" for c, n in few.items())
            + "); their C-indexes rest on a handful of events",
            BulkfmWarning,
            stacklevel=2,
        )
    return out


# --------------------------------------------------------------------------- transfer
def transfer(
    config: EvaluateConfig,
    mdl: LoadedModel,
    sd: TaskData,
    emb: np.ndarray,
    splits: Sequence[Split],
    pan: dict[str, SurvivalResult],
    timings: dict[str, float],
) -> dict[str, dict[str, TransferScores]]:
    """Per cohort, on the pan-cancer test samples of that cohort: the pan-cancer model, the
    same recipe trained without the cohort, and one trained on the cohort alone."""
    arms = [a for a in ("mlp", "baseline_pca_cox") if a in pan]
    out: dict[str, dict[str, TransferScores]] = {}
    for cohort in cohort_names(config.tasks.transfer, sd.cohort_labels):
        in_c = sd.cohort_labels == cohort
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
        entry: dict[str, TransferScores] = {}
        for arm in arms:
            pred = pan[arm].predictions
            ids_c = set(sd.ids[in_c])
            pan_scores = []
            for s in splits:
                p = pred[(pred["split"] == s.name) & pred["sample_id"].isin(ids_c)]
                try:
                    pan_scores.append(concordance_index(p["time"], p["event"], p["risk"]))
                except BulkfmError:
                    pan_scores.append(math.nan)
            scores: dict[str, Any] = {}
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
            entry[arm] = TransferScores(pan_cancer=mean_std(pan_scores), **scores)
        out[cohort] = entry
    return out


def _transfer_arm(
    config: EvaluateConfig,
    mdl: LoadedModel,
    sd: TaskData,
    emb: np.ndarray,
    splits: Sequence[Split],
    arm: str,
    timings: dict[str, float],
    key: str,
) -> SurvivalResult:
    def run(split: Split) -> SurvivalResult:
        if not len(split.train) or not len(split.test):
            raise SplitError("empty training or test side")
        if arm == "mlp":
            return run_survival(
                emb,
                sd.time,
                sd.event,
                groups=sd.groups,
                ids=sd.ids,
                splits=[split],
                model=config.heads.cox,
            )
        return run_survival_baseline(
            "pca_cox",
            baseline_matrix(config, mdl, sd.rows()),
            sd.time,
            sd.event,
            groups=sd.groups,
            ids=sd.ids,
            splits=[split],
            config=baseline_config(config),
        )

    with timed(timings, key):
        return per_split(run, splits)


# --------------------------------------------------------------------------- robustness
def robustness(
    config: EvaluateConfig,
    mdl: LoadedModel,
    task: TaskData,
    emb: np.ndarray,
    splits: Sequence[Split],
) -> RobustnessStudy:
    """Appendix D: remove a fraction of the model's genes from the test samples and compare
    test macro-F1 to the clean one, with the genes imputed by the model's MLM ("imputed"),
    left out of the embedding mean as [MASK] ("masked"), or set to 0 TPM ("zero"). The
    head is trained once per split on clean training embeddings."""
    rows: list[dict[str, Any]] = []
    labels, adata = task.labels, task.rows()
    for split in splits:
        clf = _robustness_head(config, emb, task, split)
        clean = _macro_f1(labels[split.test], clf.predict(emb[split.test]))
        test = adata[split.test].copy()
        for fraction in config.tasks.robustness:
            scores = _robustness_variants(config, mdl, test, fraction, split_seed(split))
            for variant, variant_emb in scores.items():
                f1 = _macro_f1(labels[split.test], clf.predict(variant_emb))
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
    fractions: dict[str, RobustnessFraction] = {}
    for fraction, group in frame.groupby("fraction"):
        fractions[f"{fraction:g}"] = RobustnessFraction(
            clean_macro_f1=mean_std(group.drop_duplicates("split")["clean_macro_f1"]),
            variants={
                str(variant): VariantScores(
                    macro_f1=mean_std(sub["macro_f1"]), ratio=mean_std(sub["ratio"])
                )
                for variant, sub in group.groupby("variant")
            },
        )
    return RobustnessStudy(head=config.tasks.robustness_head, fractions=fractions, per_split=rows)


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(classification_metrics(y_true, y_pred)["macro_f1"])


def _robustness_head(config: EvaluateConfig, emb: np.ndarray, task: TaskData, split: Split) -> Any:
    tr = split.train
    if config.tasks.robustness_head == "svm":
        C = config.heads.svm_C
        return make_svm(C if isinstance(C, float) else C[0], seed=split_seed(split)).fit(
            emb[tr], task.labels[tr]
        )
    return MLPClassifier(**{"seed": split_seed(split), **config.heads.mlp}).fit(
        emb[tr], task.labels[tr], groups=task.groups[tr]
    )


def _robustness_variants(
    config: EvaluateConfig, mdl: LoadedModel, test: ad.AnnData, fraction: float, seed: int
) -> dict[str, np.ndarray]:
    tok = mdl.tokenizer
    assert tok is not None and mdl.model is not None
    cols = tok.align_columns(list(map(str, test.var_names)))
    # only measured genes can be removed: model genes the data lacks are missing already
    model_cols = np.arange(test.n_vars) if cols is None else cols[cols >= 0]
    rng = np.random.default_rng([seed, round(fraction * 1_000_000)])
    n_remove = max(1, round(fraction * model_cols.size))
    removed = np.sort(rng.choice(model_cols, size=n_remove, replace=False))
    base = test.layers.get(keys.MISSING)
    base = (
        sp.csr_matrix(test.shape, dtype=bool) if base is None else sp.csr_matrix(base, dtype=bool)
    )
    removal = sp.lil_matrix(test.shape, dtype=bool)
    removal[:, removed] = True
    masked = test.copy()
    masked.layers[keys.MISSING] = (base + removal.tocsr()).astype(bool)
    # The data's own columns only (add_absent_genes=False): model genes the data lacks stay
    # [MASK], as in the clean embeddings, so the variants differ from the clean run in the
    # removed genes alone. Coverage was checked on the clean data; removing genes is the
    # point here, so it is not checked again.
    imputed = impute_missing(
        mdl.model,
        tok,
        masked,
        batch_size=config.model.batch_size,
        coverage=mdl.coverage,
        add_absent_genes=False,
    )
    imputed.layers[keys.MISSING] = base  # the removed genes now hold predicted TPM
    zero = test.copy()
    X = np.asarray(zero.X.toarray() if sp.issparse(zero.X) else zero.X, dtype=np.float32).copy()
    X[:, removed] = 0.0
    zero.X = X
    zero.layers[keys.MISSING] = base
    return {
        "imputed": embed(mdl, config.model, imputed),
        "masked": embed(mdl, config.model, masked),
        "zero": embed(mdl, config.model, zero),
    }


# --------------------------------------------------------------------------- similarity
def cohort_similarity(
    embeddings: np.ndarray, labels: Sequence[Any] | np.ndarray, *, center: bool = True
) -> CohortSimilarity:
    """Cosine similarity of per-label mean embeddings and their average-linkage clustering
    (scipy, cosine distance); ``order`` is the dendrogram's leaf order.

    ``center`` subtracts the mean over all samples first: every BulkRNABert embedding
    shares a large common component, so uncentred means all have cosine ~1 with each
    other and the clustering would follow noise in the last digits.
    """
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
    return CohortSimilarity(
        labels=names,
        centered=center,
        cosine=sim.tolist(),
        linkage=link.tolist(),
        order=list(order),
    )
