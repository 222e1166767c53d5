"""Why the frozen BulkRNABert embedding carries no survival signal: three diagnoses.

    python scripts/pretrain_diagnose.py --study /tmp/pretrain_study --out /tmp/diagnose \\
        [--shared ../shared/data | --adata shared.h5ad] [--rungs 0,3000] [--seeds 0,1] \\
        [--top-k 20] [--mask-repeats 8] [--run TAG --splits 3 --pca-components 64]

It reads a folder written by ``scripts/pretrain_study.py`` (its runs, checkpoints and
settings; nothing there is written) and, for each chosen rung (default: the ladder's
largest and the random-init rung 0) and pre-training seed, on the TCGA tumours and the
*same* patient-grouped hold-outs of the pan-cancer survival task that the study probes:

1. **What the pooled vector keeps.** Ridge regression (alpha per gene by the efficient
   leave-one-out of ``RidgeCV`` on the training rows) decodes each model gene's
   log10(1 + TPM) from the mean-pooled last block, from token states (below), from the
   context-only reconstruction (below), and from PCA of the same genes with as many
   components as the embedding is wide; R^2 on the test rows, averaged over all genes and
   over the K most prognostic genes. Prognostic: the largest |z| of a univariate Cox fit
   per gene on the training rows, stratified by cohort (lifelines
   ``CoxPHFitter(strata=...)``), so it is a within-cohort effect like the C-index the
   study reports. "own gene" rows decode each gene from its own reconstructed value only
   (a per-gene linear fit on the training rows).
2. **Survival from richer readouts of the same frozen model**, through the benchmark's
   own survival probe and splits (``bench.run_benchmark``): the mean-pooled last block
   (the study's embedding), the per-gene last-block states flattened and reduced by PCA
   to the embedding width, the MLM head's reconstruction (expected bin per gene, nothing
   masked) reduced the same way and unreduced, the **context-only reconstruction** (the
   genes dealt into K = ceil(1 / mask_prob) seeded disjoint groups; one forward pass per
   group with that group set to [MASK], so each gene's expected bin comes from the other
   genes only) reduced and unreduced, and the input bins reduced the same way; beside PCA
   and raw log-TPM of the same genes. Every PCA is fitted on the training rows of each
   split (the benchmark refits learning models per split).
3. **Does the MLM learn prognostic genes.** Per-gene masked prediction on each split's
   test tumours (``--mask-repeats`` seeded draws of the training module's masking, 15%
   of genes, 80/10/10), the model's cross-entropy and accuracy against the trivial
   per-gene predictor of the training module (``train.data.gene_bin_statistics``: the
   training bins' frequencies, fitted on the run's own pre-training rows); the top-K
   prognostic genes against the rest (means, Mann-Whitney U), the Spearman correlation
   of per-gene gain with |z|, and the same partial on each gene's within-cohort variance
   of log10(1 + TPM) on the split's training rows (both ranks residualised on its rank).

The pre-training runs saw the probed tumours (as in the study, whose probes read
embeddings of samples the model pre-trained on), so section 3 measures how well the
objective fits each gene, for the model and the trivial predictor alike.

A study still running has no ``study.json`` yet: then pass ``--run`` (and ``--splits`` /
``--pca-components`` if the study did not use the defaults); only finished seeds (with
``summary.json`` and ``study_cpu_s.json``) can be diagnosed. Each seed's results are
cached in ``OUT/seeds/seedN`` with the settings that made them, so a rerun with more seeds
computes only the new ones (``--fresh`` recomputes all).

Outputs in ``--out`` (outside the repository): ``diagnose.csv`` (tidy: section, seed,
split, rung, readout, metric, value), ``genes.csv`` (per gene, seed, split and rung: |z|,
R^2 from each source, MLM scores), ``diagnose.md`` (tables, mean +- std over seeds x
splits) and ``diagnose.json`` (command, settings, timings, checks).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_study as study  # a sibling script: its loaders and rungs

from bulkfm.embedders.base import Embedder
from bulkfm.errors import BulkfmError, ConfigError, InputFileError

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.data.splits import Split
    from bulkfm.models.bulkrnabert import BulkRNABert
    from bulkfm.tasks.data import TaskData

logger = logging.getLogger("pretrain_diagnose")

#: Ridge penalties searched per gene (features standardised on the training rows).
ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 4, 13))
SURVIVAL = ("survival", "c_index_within_cohort")


# --------------------------------------------------------------------------- 1. decoding
def decoding_r2(
    X_train: np.ndarray,
    Y_train: np.ndarray,
    X_test: np.ndarray,
    Y_test: np.ndarray,
    *,
    groups_test: np.ndarray | None = None,
    alphas: Sequence[float] = ALPHAS,
) -> tuple[np.ndarray, np.ndarray]:
    """Test-row R^2 of each column of ``Y`` decoded from ``X`` by ridge regression:
    (R^2, within-group R^2).

    ``X`` is standardised on the training rows; the intercept is fitted; each target's
    penalty is chosen from ``alphas`` by leave-one-out on the training rows (RidgeCV's
    efficient form). R^2 = 1 - SSE / SST around the test rows' mean (sklearn
    ``r2_score``), so a decoder that only knows the training mean scores about 0. The
    within-group R^2 divides the same SSE by the spread around each test group's own
    mean (``groups_test``: the cohorts), so a decoder that knows only the cohort scores
    about 0 or below: it is what the features add beyond cohort identity (NaN without
    groups).
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score

    from bulkfm.scaling import Standardizer

    scaler = Standardizer(np.float64).fit(X_train)
    model = RidgeCV(alphas=list(alphas), alpha_per_target=len(alphas) > 1)
    model.fit(scaler.transform(X_train), Y_train)
    pred = np.asarray(model.predict(scaler.transform(X_test))).reshape(Y_test.shape)
    r2 = np.asarray(r2_score(Y_test, pred, multioutput="raw_values"), dtype=np.float64)
    within = np.full(r2.shape, np.nan)
    if groups_test is not None:
        sse = ((Y_test - pred) ** 2).sum(axis=0)
        sst = (within_group_deviation(Y_test, groups_test) ** 2).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            within = np.where(sst > 0, 1.0 - sse / sst, np.nan)
    return r2, within


def prognostic_z(
    X: np.ndarray, time_: np.ndarray, event: np.ndarray, strata: np.ndarray
) -> np.ndarray:
    """Per column of ``X``: the z of a univariate Cox fit stratified by ``strata``.

    lifelines ``CoxPHFitter`` with a baseline hazard per stratum (a within-cohort effect);
    each column is standardised first. A column that is constant, or a fit that does not
    converge, gets z = 0 (no evidence).
    """
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    z = np.zeros(X.shape[1])
    frame = pd.DataFrame({"T": time_, "E": event.astype(int), "s": strata.astype(str)})
    for g in range(X.shape[1]):
        col = X[:, g]
        sd = col.std()
        if not sd > 1e-12:
            continue
        frame["x"] = (col - col.mean()) / sd
        try:
            fit = CoxPHFitter().fit(frame, "T", "E", strata=["s"])
        except (ConvergenceError, np.linalg.LinAlgError):
            continue
        value = float(fit.summary.loc["x", "z"])
        z[g] = value if math.isfinite(value) else 0.0
    return z


def own_gene_r2(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    groups_test: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Test-row (R^2, within-group R^2) of each column of ``y`` decoded from the same
    column of ``x`` alone: an ordinary least-squares line per column fitted on the
    training rows (``x``: a per-gene readout such as a reconstruction). R^2 as in
    :func:`decoding_r2`; a column constant on the training rows predicts its mean."""
    xm, ym = x_train.mean(axis=0), y_train.mean(axis=0)
    dx = x_train - xm
    var = (dx**2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(var > 1e-12, (dx * (y_train - ym)).sum(axis=0) / var, 0.0)
    pred = ym + slope * (x_test - xm)
    sse = ((y_test - pred) ** 2).sum(axis=0)
    sst = ((y_test - y_test.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(sst > 0, 1.0 - sse / sst, np.nan)
    within = np.full(r2.shape, np.nan)
    if groups_test is not None:
        sst_w = (within_group_deviation(y_test, groups_test) ** 2).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            within = np.where(sst_w > 0, 1.0 - sse / sst_w, np.nan)
    return r2, within


def within_group_deviation(Y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``Y`` minus the mean of its rows' group, per column."""
    means = pd.DataFrame(Y).groupby(np.asarray(groups)).transform("mean").to_numpy()
    return np.asarray(Y) - means


def within_group_variance(Y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per column: the pooled within-group variance, mean over rows of the squared
    deviation from the row's group mean (the spread a within-cohort score can use)."""
    return np.asarray((within_group_deviation(Y, groups) ** 2).mean(axis=0))


def partial_spearman(x: np.ndarray, y: np.ndarray, covariate: np.ndarray) -> tuple[float, float]:
    """Spearman correlation of ``x`` and ``y`` partial on ``covariate``: the Pearson
    correlation of the ranks of ``x`` and ``y`` after each is residualised (least squares
    with an intercept) on the rank of ``covariate``; two-sided p from Student's t with
    n - 3 degrees of freedom (as pingouin's ``partial_corr(method="spearman")``). NaN
    rows are left out."""
    from scipy.stats import rankdata, t

    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(covariate)
    n = int(ok.sum())
    if n < 4:
        return np.nan, np.nan
    ranks = [rankdata(v[ok]) for v in (x, y, covariate)]
    design = np.column_stack([np.ones(n), ranks[2]])
    resid = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in ranks[:2]]
    denom = math.sqrt(float(resid[0] @ resid[0]) * float(resid[1] @ resid[1]))
    if not denom > 0:
        return np.nan, np.nan
    rho = float(np.clip(resid[0] @ resid[1] / denom, -1.0, 1.0))
    dof = n - 3
    stat = rho * math.sqrt(dof / max(1.0 - rho**2, 1e-300))
    return rho, float(2 * t.sf(abs(stat), dof))


def compare_top(
    values: np.ndarray, z_abs: np.ndarray, k: int, *, covariate: np.ndarray | None = None
) -> dict[str, float]:
    """The top-``k`` genes by |z| against the rest: means, Mann-Whitney p (two-sided) and
    the Spearman correlation of ``values`` with |z| over all genes (NaNs left out). With a
    per-gene ``covariate`` also the Spearman correlation partial on it
    (:func:`partial_spearman`) and that of ``values`` with the covariate."""
    from scipy.stats import mannwhitneyu, spearmanr

    ok = np.isfinite(values)
    order = np.argsort(-z_abs, kind="stable")
    top = np.zeros(len(values), dtype=bool)
    top[order[:k]] = True
    a, b = values[top & ok], values[~top & ok]
    p = float(mannwhitneyu(a, b, alternative="two-sided").pvalue) if a.size and b.size else np.nan
    rho, rho_p = spearmanr(values[ok], z_abs[ok])
    out = {
        "top": float(a.mean()) if a.size else np.nan,
        "rest": float(b.mean()) if b.size else np.nan,
        "all": float(values[ok].mean()),
        "mwu_p": p,
        "spearman": float(rho),
        "spearman_p": float(rho_p),
    }
    if covariate is not None:
        out["partial_spearman"], out["partial_spearman_p"] = partial_spearman(
            values, z_abs, covariate
        )
        both = ok & np.isfinite(covariate)
        out["spearman_var"] = float(spearmanr(values[both], covariate[both])[0])
    return out


# --------------------------------------------------------------------------- 2. readouts
def token_readouts(
    model: BulkRNABert, tokens: np.ndarray, *, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene last-block states [N, G, D] and the MLM head's expected bin [N, G].

    Nothing is masked: the model reads every gene as the embedding does, and the
    reconstruction is ``sum_b softmax(logits)_b * b`` (``train.losses.expected_bin``).
    """
    from bulkfm.train.losses import expected_bin

    n, g = tokens.shape
    states = np.empty((n, g, model.config.embed_dim), dtype=np.float32)
    recon = np.empty((n, g), dtype=np.float32)
    for start, stop, batch in _eval_batches(model, tokens, batch_size):
        out = model(batch.to(model.device))
        states[start:stop] = out.last_hidden_state.float().cpu().numpy()
        recon[start:stop] = expected_bin(out.logits).cpu().numpy()
    return states, recon


def _eval_batches(
    model: BulkRNABert, tokens: np.ndarray, batch_size: int
) -> Iterator[tuple[int, int, Any]]:
    """(start, stop, int64 token tensor) per batch of rows, with ``model`` in eval and
    inference mode while they are used; its training flag is restored afterwards."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(tokens), batch_size):
                batch = torch.from_numpy(tokens[start : start + batch_size].astype(np.int64))
                yield start, start + batch.shape[0], batch
    finally:
        model.train(was_training)


def n_context_groups(mask_prob: float) -> int:
    """K = ceil(1 / mask_prob): masking one of K equal gene groups hides about as many
    genes per forward pass as training does (7 at 15%)."""
    if not 0 < mask_prob < 1:
        raise ConfigError(f"mask_prob must be in (0, 1), got {mask_prob} (masking.mask_prob)")
    return max(2, math.ceil(1.0 / mask_prob - 1e-9))


def gene_groups(n_genes: int, n_groups: int, *, seed: int) -> np.ndarray:
    """Group id (0..n_groups - 1) of each gene: a seeded permutation of the genes dealt
    round-robin, so the groups are disjoint, cover every gene and differ in size by at
    most one."""
    if not 1 <= n_groups <= n_genes:
        raise ConfigError(f"cannot deal {n_genes} genes into {n_groups} non-empty groups")
    order = np.random.default_rng(seed).permutation(n_genes)
    groups = np.empty(n_genes, dtype=np.int64)
    groups[order] = np.arange(n_genes) % n_groups
    return groups


def context_reconstruction(
    model: BulkRNABert, tokens: np.ndarray, groups: np.ndarray, *, batch_size: int = 32
) -> np.ndarray:
    """The MLM head's expected bin [N, G] of every gene read from the *other* genes only.

    For each group ``k`` of ``groups`` (one id per gene) one forward pass sees ``tokens``
    with that group's genes replaced by the model's [MASK] token (``mask_token_id``, the
    token training masks with; genes already [MASK], i.e. missing, stay so), and the
    expected bin ``sum_b softmax(logits)_b * b`` is kept at the masked positions. Every
    gene is thus predicted with its own value hidden, at one pass per group per sample.
    """
    import torch

    from bulkfm.train.losses import expected_bin

    n, g = tokens.shape
    groups = np.asarray(groups)
    if groups.shape != (g,):
        raise ConfigError(f"gene groups have shape {groups.shape}, tokens have {g} genes")
    members = [torch.from_numpy(np.flatnonzero(groups == k)) for k in np.unique(groups)]
    recon = np.full((n, g), np.nan, dtype=np.float32)
    mask_id = model.config.mask_token_id
    for start, stop, batch in _eval_batches(model, tokens, batch_size):
        for idx in members:
            hidden = batch.clone()
            hidden[:, idx] = mask_id
            logits = model(hidden.to(model.device)).logits[:, idx]
            recon[start:stop, idx.numpy()] = expected_bin(logits).cpu().numpy()
    return recon


class FeaturePCA(Embedder):
    """Precomputed per-sample features (rows named by sample id), reduced by the
    benchmark's PCA (standardised, fitted on each split's training rows) or kept whole
    (``n_components=None``). A learning model, so the benchmark refits it per split."""

    name: ClassVar[str] = "feature_pca"
    learns: ClassVar[bool] = True
    cacheable: ClassVar[bool] = False

    def __init__(
        self,
        features: np.ndarray,
        ids: Sequence[str] | np.ndarray,
        *,
        n_components: int | None,
        label: str,
    ) -> None:
        super().__init__(label=label)
        self.features = np.asarray(features, dtype=np.float64).reshape(len(ids), -1)
        self.position = pd.Index([str(i) for i in ids])
        if not self.position.is_unique:
            raise ConfigError(f"{label}: sample ids repeat; give one feature row per sample")
        self.n_components = n_components
        self._pca: Any = None

    def config(self) -> dict[str, Any]:
        return {"n_components": self.n_components, "shape": list(self.features.shape)}

    def _rows(self, adata: ad.AnnData) -> np.ndarray:
        rows = self.position.get_indexer(adata.obs_names.astype(str))
        if (rows < 0).any():
            raise ConfigError(f"{self.label}: {int((rows < 0).sum())} samples have no features")
        return np.asarray(self.features[rows])

    def fit(self, adata_train: ad.AnnData) -> FeaturePCA:
        from bulkfm.embedders.classical import CappedPCA

        if self.n_components is not None:
            self._pca = CappedPCA(self.n_components, standardize=True).fit(self._rows(adata_train))
        self._fitted = True
        return self

    def transform(self, adata: ad.AnnData) -> np.ndarray:
        self._check_fitted()
        values = self._rows(adata)
        return values if self._pca is None else np.asarray(self._pca.transform(values))


# --------------------------------------------------------------------------- 3. MLM
def mask_draw(
    tokens: np.ndarray, *, mask_token_id: int, n_bins: int, mask_prob: float, seed: int
) -> Any:
    """One seeded draw of the training module's masking over all rows of ``tokens``."""
    import torch

    from bulkfm.train.config import MaskingConfig
    from bulkfm.train.masking import mask_tokens

    return mask_tokens(
        torch.from_numpy(tokens.astype(np.int64)),
        mask_token_id=mask_token_id,
        n_bins=n_bins,
        generator=torch.Generator().manual_seed(seed),
        config=MaskingConfig(mask_prob=mask_prob),
    )


def mlm_per_gene(
    model: BulkRNABert,
    tokens: np.ndarray,
    *,
    trivial: Mapping[str, tuple[np.ndarray, np.ndarray]],
    seeds: Sequence[int],
    mask_prob: float = 0.15,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Per-gene masked prediction on ``tokens`` [N, G]: one row per gene with the number
    of targets and the mean cross-entropy (nats) and accuracy of the model and of each
    ``trivial`` predictor, over one mask draw per seed in ``seeds``.

    ``trivial[name] = (mode, log_prob)`` as ``train.data.gene_bin_statistics`` returns
    them: the predicted bin [G] and log-probabilities [G, n_bins] of each gene, or one
    such set per row ([N, G] and [N, G, n_bins], e.g. per cohort). Columns:
    ``ce_model``, ``acc_model``, ``ce_<name>``, ``acc_<name>``.
    """
    import torch
    import torch.nn.functional as F

    cfg = model.config
    n_rows, g = tokens.shape
    names = ["model", *trivial]
    sums = {f"{m}_{k}": np.zeros(g) for m in names for k in ("ce", "acc")}
    count = np.zeros(g)
    tables = {}
    for name, (mode, log_prob) in trivial.items():
        mode_t = torch.from_numpy(np.asarray(mode, dtype=np.int64))
        lp_t = torch.from_numpy(np.asarray(log_prob, dtype=np.float32))
        if mode_t.ndim == 1:
            mode_t, lp_t = mode_t.expand(n_rows, g), lp_t.expand(n_rows, *lp_t.shape)
        if tuple(mode_t.shape) != (n_rows, g) or tuple(lp_t.shape[:2]) != (n_rows, g):
            raise ConfigError(f"trivial predictor {name!r} does not match tokens {tokens.shape}")
        tables[name] = (mode_t, lp_t)
    was_training = model.training
    model.eval()
    try:
        for seed in seeds:
            draw = mask_draw(
                tokens,
                mask_token_id=cfg.mask_token_id,
                n_bins=cfg.n_expressions_bins,
                mask_prob=mask_prob,
                seed=seed,
            )
            for start in range(0, n_rows, batch_size):
                rows = slice(start, start + batch_size)
                sel = draw.selected[rows]
                true = torch.where(sel, draw.labels[rows], torch.zeros_like(draw.labels[rows]))
                w = sel.double()
                with torch.inference_mode():
                    logits = model(draw.input_ids[rows].to(model.device)).logits.float().cpu()
                per_pos = {
                    "model": (
                        F.cross_entropy(logits.transpose(1, 2), true, reduction="none"),
                        logits.argmax(-1) == true,
                    )
                }
                for name, (mode_t, lp_t) in tables.items():
                    lp = lp_t[rows].gather(-1, true.unsqueeze(-1)).squeeze(-1)
                    per_pos[name] = (-lp, mode_t[rows] == true)
                count += w.sum(0).numpy()
                for name, (ce, hit) in per_pos.items():
                    sums[f"{name}_ce"] += (ce.double() * w).sum(0).numpy()
                    sums[f"{name}_acc"] += (hit.double() * w).sum(0).numpy()
    finally:
        model.train(was_training)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {f"{k.split('_')[-1]}_{k.rsplit('_', 1)[0]}": v / count for k, v in sums.items()}
    return pd.DataFrame({"n_targets": count.astype(int), **out})


def cohort_bin_statistics(
    tokens: np.ndarray,
    train_rows: np.ndarray,
    cohorts: np.ndarray,
    rows: np.ndarray,
    n_bins: int,
    fallback: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The training module's trivial predictor fitted per cohort on ``train_rows`` and
    laid out for ``rows`` ([len(rows), G] modes, [len(rows), G, n_bins] log-probs): it
    knows a tumour's cohort and nothing else. A cohort without training rows gets
    ``fallback``."""
    from bulkfm.train.data import gene_bin_statistics

    g = tokens.shape[1]
    mode = np.empty((len(rows), g), dtype=np.int64)
    log_prob = np.empty((len(rows), g, n_bins), dtype=np.float32)
    for cohort in np.unique(cohorts[rows]):
        fit_rows = train_rows[cohorts[train_rows] == cohort]
        stats = gene_bin_statistics(tokens, fit_rows, n_bins) if fit_rows.size else fallback
        here = cohorts[rows] == cohort
        mode[here], log_prob[here] = stats[0], stats[1]
    return mode, log_prob


# --------------------------------------------------------------------------- study folder
@dataclass
class StudyRuns:
    """What a study folder says about its runs."""

    recipe: list[str]
    seeds: list[int]
    tag: str
    max_step: int
    splits: int
    pca_components: int


def read_study(
    folder: Path,
    run: str | None,
    *,
    splits: int | None = None,
    pca_components: int | None = None,
) -> StudyRuns:
    """The study's settings (study.json) and the run tag of its ladder (or ``run``).

    A study still running has no study.json: then ``run`` names the run, ``splits`` and
    ``pca_components`` default to the study's defaults (3, 64) and the seeds are the
    run's finished ones. ``splits`` / ``pca_components`` override the study's values.
    """
    meta_path = folder / "study.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        steps = [int(s) for s in meta["steps"]]
        v_steps = int(meta.get("variant_steps") or max(steps))
        arm = study.REFERENCE if v_steps == max(steps) else study.LADDER
        tag = run or f"{arm}_max{max(steps)}"
        seeds = [int(s) for s in meta["seeds"]]
    elif run is not None and (folder / "runs").is_dir():
        meta, tag, seeds = {}, run, []
    else:
        raise InputFileError(
            f"{meta_path} not found: --study must be a folder written by "
            "scripts/pretrain_study.py (while it runs, name a run with --run)"
        )
    if not (folder / "runs" / tag).is_dir():
        known = sorted(p.name for p in (folder / "runs").glob("*") if p.is_dir())
        raise InputFileError(f"{folder}/runs/{tag} not found; pass --run, one of {known}")
    try:
        max_step = int(tag.rsplit("_max", 1)[1])
    except (IndexError, ValueError):
        raise ConfigError(f"--run {tag!r} is not a study run tag (NAME_maxSTEPS)") from None
    if not meta:
        seeds = sorted(
            int(d.name[4:])
            for d in (folder / "runs" / tag).glob("seed*")
            if d.name[4:].isdigit() and finished(d)
        )
        if not seeds:
            raise InputFileError(f"{folder}/runs/{tag} has no finished seed yet; wait for one")
    return StudyRuns(
        recipe=list(meta.get("recipe", [])),
        seeds=seeds,
        tag=tag,
        max_step=max_step,
        splits=int(splits or meta.get("splits", 3)),
        pca_components=int(pca_components or meta.get("pca_components", 64)),
    )


def finished(run_dir: Path) -> bool:
    """Whether a study run is finished (the study writes these two files last)."""
    return (run_dir / "summary.json").is_file() and (run_dir / "study_cpu_s.json").is_file()


def seed_rungs(
    adata: ad.AnnData, runs: StudyRuns, folder: Path, seed: int, rungs: Sequence[int]
) -> list[study.Rung]:
    """The study's own rung discovery (``pretrain_study.pretrain_rungs``) on a finished
    run; an unfinished one is an error here, never retrained or removed."""
    run_dir = folder / "runs" / runs.tag / f"seed{seed}"
    if not finished(run_dir):
        raise InputFileError(
            f"{run_dir} is not a finished study run (no summary.json / study_cpu_s.json); "
            "wait for the study or leave that seed out of --seeds"
        )
    bad = [r for r in rungs if r > runs.max_step]
    if bad:
        raise ConfigError(f"--rungs {bad} exceed the run's {runs.max_step} steps")
    # The study folder is only read: every rung's model must be there already (the
    # study's rung discovery would otherwise build the random-init one in place).
    for r in rungs:
        where = run_dir / ("step_0_init" if r == 0 else f"checkpoints/step_{r:07d}")
        if not (where / "config.json").is_file():
            raise InputFileError(
                f"{where} holds no model: rung {r} was not saved by this run; "
                "choose --rungs among its checkpoints"
            )
    found = study.pretrain_rungs(
        adata,
        config_path=study.CONFIG,
        overrides=runs.recipe,
        steps=sorted({*rungs, runs.max_step}),
        seed=seed,
        run_dir=run_dir,
        variant=runs.tag,
    )
    return [r for r in found if r.step in set(rungs)]


def survival_task(sub: ad.AnnData, n_splits: int) -> tuple[TaskData, list[Split], np.ndarray]:
    """The pan-cancer survival task, its splits and the rows of ``sub`` it indexes, made
    as ``bench.run_benchmark`` makes them (same config, same seeds)."""
    from bulkfm.bench.config import BenchConfig
    from bulkfm.bench.selection import bench_obs, parse_tasks, sample_mask
    from bulkfm.data.splits import holdout_splits
    from bulkfm.tasks.data import prepare_task

    config = BenchConfig(n_splits=n_splits)
    task = parse_tasks(sub, ["survival"], config).tasks[0]
    td = prepare_task(bench_obs(sub, config), task, config)
    splits = holdout_splits(
        td.strata, td.groups, seeds=config.split_seeds(), test_size=config.test_size
    )
    rows = np.flatnonzero(sample_mask(sub.obs, config))[td.index]
    return td, splits, rows


# --------------------------------------------------------------------------- one seed
def diagnose_seed(
    adata: ad.AnnData,
    tumours: ad.AnnData,
    rungs: Sequence[study.Rung],
    *,
    n_splits: int,
    top_k: int,
    mask_repeats: int,
    mask_prob: float,
    pca_components: int,
    timings: dict[str, float],
) -> tuple[list[dict[str, Any]], list[pd.DataFrame], dict[str, Any]]:
    """All three diagnoses for the rungs of one pre-training seed (one gene set)."""
    from bulkfm.bench.config import BenchConfig
    from bulkfm.bench.runner import run_benchmark
    from bulkfm.embedders.bulkrnabert import BulkRNABertEmbedder
    from bulkfm.embedders.classical import CappedPCA, log_tpm
    from bulkfm.embedders.registry import get_embedder
    from bulkfm.models.bulkrnabert import load_pretrained
    from bulkfm.train.config import PretrainConfig
    from bulkfm.train.data import gene_bin_statistics, holdout_split, sample_groups

    seed = rungs[0].seed
    genes = rungs[0].genes
    t0 = time.perf_counter()
    sub = tumours[:, genes].copy()
    td, splits, rows = survival_task(sub, n_splits)
    ids = np.asarray(sub.obs_names.astype(str))
    cohort = np.full(sub.n_obs, "", dtype=object)  # per row of sub (survival rows only)
    cohort[rows] = td.cohort_labels
    y_all = log_tpm(sub.X)  # [tumours, genes], log10(1 + TPM) as the baselines read it
    run_dir = rungs[0].model_dir.parent
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    run_cfg = PretrainConfig.from_yaml(run_dir / "config.yaml")
    _, tokenizer = load_pretrained(rungs[0].model_dir)
    tokens = tokenizer.encode_adata(sub)
    # The training module's trivial predictor, fitted on the run's own pre-training rows.
    every = adata[:, genes]
    train_idx, _ = holdout_split(
        adata.n_obs,
        run_cfg.data.holdout_fraction,
        seed=run_cfg.seed,
        groups=sample_groups(adata, run_cfg.data.group_key),
    )
    mode, log_prob = gene_bin_statistics(tokenizer.encode_adata(every), train_idx, tokenizer.n_bins)
    z_abs, w_var = [], []
    for split in splits:
        train = rows[split.train]
        z = prognostic_z(
            y_all[train], td.y[split.train, 0], td.y[split.train, 1], td.cohort_labels[split.train]
        )
        z_abs.append(np.abs(z))
        w_var.append(within_group_variance(y_all[train], cohort[train]))
    # Context-only reconstruction: as many genes hidden per pass as training masks.
    n_groups = n_context_groups(run_cfg.masking.mask_prob)
    groups = gene_groups(len(genes), n_groups, seed=seed)
    timings[f"seed{seed}/setup+cox"] = time.perf_counter() - t0

    records: list[dict[str, Any]] = []
    gene_frames: list[pd.DataFrame] = []
    summary_path = run_dir / "summary.json"
    n_train_run = json.loads(summary_path.read_text()).get("n_train")
    checks: dict[str, Any] = {
        f"seed{seed}.context_groups": n_groups,
        # the same data as the run: its pre-training rows are the ones refitted here
        f"seed{seed}.pretrain_rows_match_run": n_train_run in (None, len(train_idx)),
    }

    def record(section: str, split_no: int, step: int | None, readout: str, **values: float):
        for metric, value in values.items():
            records.append(
                {
                    "section": section,
                    "pretrain_seed": seed,
                    "split": split_no,
                    "step": step,
                    "readout": readout,
                    "metric": metric,
                    "value": float(value),
                }
            )

    def record_r2(
        split_no: int, step: int | None, readout: str, r2: np.ndarray, r2w: np.ndarray
    ) -> None:
        for prefix, values in (("r2", r2), ("r2_within", r2w)):
            stats = compare_top(values, z_abs[split_no], top_k)
            record(
                "decode",
                split_no,
                step,
                readout,
                **{f"{prefix}_{k}": stats[k] for k in ("all", "top", "rest")},
            )

    # PCA of the same genes (fitted per split on the training rows) for decoding.
    pca_feats = []
    for split in splits:
        pca = get_embedder("pca", n_components=pca_components, n_top_genes=len(genes))
        pca.fit(sub[rows[split.train]])
        pca_feats.append(pca.transform(sub[rows]))

    models: list[Embedder] = [
        get_embedder("pca", n_components=pca_components, n_top_genes=len(genes), label="pca"),
        get_embedder("raw", n_top_genes=len(genes), label="raw"),
        FeaturePCA(tokens, ids, n_components=pca_components, label="input bins, PCA"),
    ]
    for split_no, split in enumerate(splits):
        r2, r2w = decoding_r2(
            pca_feats[split_no][split.train],
            y_all[rows[split.train]],
            pca_feats[split_no][split.test],
            y_all[rows[split.test]],
            groups_test=cohort[rows[split.test]],
        )
        record_r2(split_no, None, "pca", r2, r2w)
        train, test = rows[split.train], rows[split.test]
        b2, b2w = own_gene_r2(
            tokens[train], y_all[train], tokens[test], y_all[test], groups_test=cohort[test]
        )
        record_r2(split_no, None, "input bins, own gene", b2, b2w)
        rho_var = compare_top(w_var[split_no], z_abs[split_no], top_k)["spearman"]
        record("genes", split_no, None, "abs z vs within-cohort variance", spearman=rho_var)
        # cohort identity alone (one-hot): what any vector that only knows the cohort keeps
        onehot = (cohort[:, None] == np.unique(td.cohort_labels)[None, :]).astype(np.float64)
        c2, c2w = decoding_r2(
            onehot[train], y_all[train], onehot[test], y_all[test], groups_test=cohort[test]
        )
        record_r2(split_no, None, "cohort identity (one-hot)", c2, c2w)
        gene_frames.append(
            pd.DataFrame(
                {
                    "pretrain_seed": seed,
                    "split": split_no,
                    "step": -1,
                    "gene": genes,
                    "z_abs": z_abs[split_no],
                    "within_cohort_var": w_var[split_no],
                    "r2_pca": r2,
                    "r2_within_pca": r2w,
                    "r2_input bins, own gene": b2,
                    "r2_within_input bins, own gene": b2w,
                }
            )
        )

    for rung in rungs:
        t1 = time.perf_counter()
        step = rung.step
        model, _ = load_pretrained(rung.model_dir)
        states, recon = token_readouts(model, tokens)
        context = context_reconstruction(model, tokens, groups)
        pooled_embedder = BulkRNABertEmbedder(rung.model_dir, label=f"pooled.step{step}")
        pooled = pooled_embedder.transform(sub)
        checks[f"seed{seed}.step{step}.pooled_equals_mean_of_states"] = float(
            np.abs(pooled - states.mean(axis=1)).max()
        )
        flat = states.reshape(len(ids), -1)
        models += [
            pooled_embedder,
            FeaturePCA(
                flat, ids, n_components=pca_components, label=f"token states, PCA.step{step}"
            ),
            FeaturePCA(
                recon, ids, n_components=pca_components, label=f"reconstruction, PCA.step{step}"
            ),
            FeaturePCA(
                recon, ids, n_components=None, label=f"reconstruction, all genes.step{step}"
            ),
            FeaturePCA(
                context,
                ids,
                n_components=pca_components,
                label=f"context-only reconstruction, PCA.step{step}",
            ),
            FeaturePCA(
                context,
                ids,
                n_components=None,
                label=f"context-only reconstruction, all genes.step{step}",
            ),
        ]
        for split_no, split in enumerate(splits):
            train, test = rows[split.train], rows[split.test]
            per_gene: dict[str, np.ndarray] = {}
            ridge_sources = (
                ("pooled", pooled),
                ("token states, PCA", flat),
                ("context-only reconstruction, PCA", context),
            )
            for readout, X in ridge_sources:
                if readout.endswith(", PCA"):  # reduced as the survival probe reads it
                    reducer = CappedPCA(pca_components, standardize=True).fit(X[train])
                    X_train, X_test = reducer.transform(X[train]), reducer.transform(X[test])
                else:
                    X_train, X_test = X[train], X[test]
                r2, r2w = decoding_r2(
                    X_train, y_all[train], X_test, y_all[test], groups_test=cohort[test]
                )
                per_gene[f"r2_{readout}"] = r2
                per_gene[f"r2_within_{readout}"] = r2w
                record_r2(split_no, step, readout, r2, r2w)
            own_sources = (
                ("reconstruction, own gene", recon),
                ("context-only reconstruction, own gene", context),
            )
            for readout, X in own_sources:
                r2, r2w = own_gene_r2(
                    X[train], y_all[train], X[test], y_all[test], groups_test=cohort[test]
                )
                per_gene[f"r2_{readout}"] = r2
                per_gene[f"r2_within_{readout}"] = r2w
                record_r2(split_no, step, readout, r2, r2w)
            by_cohort = cohort_bin_statistics(
                tokens, train, cohort, test, tokenizer.n_bins, fallback=(mode, log_prob)
            )
            mlm = mlm_per_gene(
                model,
                tokens[test],
                trivial={"trivial": (mode, log_prob), "cohort": by_cohort},
                seeds=[10_000 * seed + 100 * split_no + r for r in range(mask_repeats)],
                mask_prob=mask_prob,
            )
            gains = {
                "ce_gain": mlm["ce_trivial"] - mlm["ce_model"],
                "acc_gain": mlm["acc_model"] - mlm["acc_trivial"],
                "ce_gain_cohort": mlm["ce_cohort"] - mlm["ce_model"],
                "acc_gain_cohort": mlm["acc_model"] - mlm["acc_cohort"],
            }
            for name, values in gains.items():
                stats = compare_top(
                    values.to_numpy(), z_abs[split_no], top_k, covariate=w_var[split_no]
                )
                record(
                    "mlm",
                    split_no,
                    step,
                    "masked genes",
                    **{f"{name}_{k}": v for k, v in stats.items()},
                )
            n = mlm["n_targets"].to_numpy()
            totals = {
                f"{kind}_{who}": float(np.nansum(mlm[f"{kind}_{who}"] * n) / n.sum())
                for kind in ("ce", "acc")
                for who in ("model", "trivial", "cohort")
            }
            record("mlm", split_no, step, "masked genes", **totals)
            gene_frames.append(
                pd.DataFrame(
                    {
                        "pretrain_seed": seed,
                        "split": split_no,
                        "step": step,
                        "gene": genes,
                        "z_abs": z_abs[split_no],
                        **per_gene,
                        **mlm.to_dict("list"),
                    }
                )
            )
        timings[f"seed{seed}/step{step}/readouts"] = time.perf_counter() - t1

    # 2. survival: every readout through the benchmark's own probe and splits.
    t1 = time.perf_counter()
    result = run_benchmark(
        sub, models, ["survival"], BenchConfig(n_splits=n_splits), progress=False
    )
    timings[f"seed{seed}/survival_probes"] = time.perf_counter() - t1
    scores = result.scores
    surv = scores[(scores["family"] == SURVIVAL[0]) & (scores["metric"] == SURVIVAL[1])]
    for _, row in surv.iterrows():
        label, _, step_text = str(row["model"]).partition(".step")
        at = int(step_text) if step_text else None
        record("survival", int(row["split"]), at, label, c_index_within_cohort=row["value"])
    n_test = surv.groupby("split")["n_test"].first().to_numpy()
    checks[f"seed{seed}.splits_match_benchmark"] = bool(
        np.array_equal(n_test, [s.test.size for s in splits])
    )
    return records, gene_frames, checks


def study_agreement(folder: Path, runs: StudyRuns, records: pd.DataFrame) -> float | None:
    """Largest |difference| between this run's pooled survival C-index and the study's own
    score of the same rung, seed and split (0 when the probes and splits agree; None when
    the study has no such rows)."""
    path = folder / "scores.csv"
    if not path.is_file():
        return None
    theirs = pd.read_csv(path)
    variant = runs.tag.rsplit("_max", 1)[0]
    theirs = theirs[
        (theirs["metric"] == "survival_c_index_within_cohort") & (theirs["variant"] == variant)
    ]
    mine = records[(records["section"] == "survival") & (records["readout"] == "pooled")]
    keys = ["pretrain_seed", "step", "split"]
    both = mine.astype({"step": float}).merge(
        theirs.astype({"step": float}), on=keys, suffixes=("", "_study")
    )
    return float((both["value"] - both["value_study"]).abs().max()) if len(both) else None


# --------------------------------------------------------------------------- report
def summarise(records: pd.DataFrame) -> pd.DataFrame:
    """Mean +- std (ddof 1) over pre-training seeds x splits of every (section, step,
    readout, metric)."""
    frame = records.assign(step=records["step"].fillna(-1).astype(int))
    return (
        frame.groupby(["section", "step", "readout", "metric"], sort=False)["value"]
        .agg(mean="mean", std="std", n="size")
        .reset_index()
    )


def _cell(summary: pd.DataFrame, section: str, step: int, readout: str, metric: str) -> str:
    pick = summary[
        (summary["section"] == section)
        & (summary["step"] == step)
        & (summary["readout"] == readout)
        & (summary["metric"] == metric)
    ]
    if pick.empty:
        return "–"
    r = pick.iloc[0]
    if metric.endswith("_p"):
        return f"{r['mean']:.2g}"
    return study._pm(float(r["mean"]), float(r["std"]))


def _rung_name(step: int) -> str:
    return "–" if step < 0 else ("random init (0)" if step == 0 else f"{step:,}")


def markdown(summary: pd.DataFrame, top_k: int, meta: dict[str, Any]) -> str:
    n = int(summary["n"].max()) if not summary.empty else 0
    lines = [
        f"Mean ± std over pre-training seeds × probe splits ({n} values a cell). "
        f"Top-{top_k}: the genes with the largest |z| of a within-cohort univariate Cox fit "
        "on each split's training rows.",
        "",
        "### 1. What the pooled vector keeps: R² of each gene's log10(1 + TPM), ridge-decoded",
        "",
        "Within-cohort R²: the same errors over the spread around each test cohort's mean "
        "(what the features decode beyond cohort identity). *own gene*: each gene from its "
        "own value in that readout alone (a least-squares line per gene); the context-only "
        "reconstruction predicts each gene with that gene masked.",
        "",
        "| source | rung | R² all genes | R² top-K prognostic | R² other genes | "
        "within-cohort R² all | within top-K | within other |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dec = summary[summary["section"] == "decode"]
    for (step, readout), _ in dec.groupby(["step", "readout"], sort=False):
        cells = [
            _cell(summary, "decode", step, readout, f"{p}_{m}")
            for p in ("r2", "r2_within")
            for m in ("all", "top", "rest")
        ]
        lines.append(f"| {readout} | {_rung_name(step)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### 2. Within-cohort survival C-index from readouts of the same frozen model",
        "",
        "| readout | rung | C-index within cohort |",
        "|---|---|---|",
    ]
    sur = summary[summary["section"] == "survival"]
    for (step, readout), _ in sur.groupby(["step", "readout"], sort=False):
        cell = _cell(summary, "survival", step, readout, "c_index_within_cohort")
        lines.append(f"| {readout} | {_rung_name(step)} | {cell} |")
    lines += [
        "",
        "### 3. Masked-gene prediction (test tumours), model vs the trivial per-gene predictor",
        "",
        "Trivial: each gene's bin frequencies over the run's pre-training rows (the "
        "training module's baseline); cohort: the same per cohort, fitted on the split's "
        "training tumours (knows the cohort, nothing else).",
        "",
        "| rung | CE model | CE trivial | CE cohort | acc model | acc trivial | acc cohort |",
        "|---|---|---|---|---|---|---|",
    ]
    mlm = summary[summary["section"] == "mlm"]
    steps = list(dict.fromkeys(mlm["step"]))
    for step in steps:
        cells = [
            _cell(summary, "mlm", step, "masked genes", f"{k}_{w}")
            for k in ("ce", "acc")
            for w in ("model", "trivial", "cohort")
        ]
        lines.append(f"| {_rung_name(step)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per-gene gain over the trivial predictor (CE: trivial − model, nats; accuracy: model "
        "− trivial; `_cohort`: over the cohort predictor); Mann–Whitney p is the mean over "
        "seeds × splits of each split's p (likewise the Spearman p). Partial: the Spearman "
        "correlation with each gene's within-cohort variance of log10(1 + TPM) (training "
        "rows) partialled out of both ranks; Spearman(gain, var): gain against that variance.",
        "",
        "| rung | gain | all genes | top-K prognostic | other genes | Mann–Whitney p | "
        "Spearman(gain, abs z) | Spearman p | partial Spearman | partial p | "
        "Spearman(gain, var) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step in steps:
        for gain in ("ce_gain", "acc_gain", "ce_gain_cohort", "acc_gain_cohort"):
            cells = [
                _cell(summary, "mlm", step, "masked genes", f"{gain}_{m}")
                for m in (
                    "all",
                    "top",
                    "rest",
                    "mwu_p",
                    "spearman",
                    "spearman_p",
                    "partial_spearman",
                    "partial_spearman_p",
                    "spearman_var",
                )
            ]
            lines.append(f"| {_rung_name(step)} | {gain} | " + " | ".join(cells) + " |")
    rho_var = _cell(summary, "genes", -1, "abs z vs within-cohort variance", "spearman")
    lines += ["", f"Spearman(abs z, within-cohort variance) over genes: {rho_var}."]
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    from bulkfm.io import atomic_path

    with atomic_path(path, flag="--out") as tmp:
        frame.to_csv(tmp, index=False)


#: Bump when what a seed's diagnosis computes changes: older caches are then recomputed.
CACHE_VERSION = 2


def _seed_key(args: argparse.Namespace, runs: StudyRuns, seed: int, rungs: Sequence[int]) -> dict:
    """What one seed's results depend on (a cache entry is reused only on equality)."""
    run_dir = args.study.resolve() / "runs" / runs.tag / f"seed{seed}"
    summary = run_dir / "summary.json"
    return {
        "version": CACHE_VERSION,
        "run_dir": str(run_dir),
        "run_finished_at": summary.stat().st_mtime if summary.is_file() else None,
        "data": str((args.adata or args.shared).resolve()),
        "rungs": sorted(int(r) for r in rungs),
        "splits": runs.splits,
        "pca_components": runs.pca_components,
        "top_k": args.top_k,
        "mask_repeats": args.mask_repeats,
        "mask_prob": args.mask_prob,
    }


def _load_seed(folder: Path, key: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict] | None:
    """A seed's cached (records, genes, checks + timings), or None if absent or stale."""
    key_path = folder / "key.json"
    if not key_path.is_file() or json.loads(key_path.read_text()) != key:
        return None
    extra = json.loads((folder / "checks.json").read_text())
    return pd.read_csv(folder / "records.csv"), pd.read_csv(folder / "genes.csv"), extra


def _save_seed(
    folder: Path, key: dict, records: pd.DataFrame, genes: pd.DataFrame, extra: dict
) -> None:
    """Cache one seed's results; key.json goes last, so a killed write is never reused."""
    from bulkfm.io import write_text

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").unlink(missing_ok=True)
    _write_csv(records, folder / "records.csv")
    _write_csv(genes, folder / "genes.csv")
    write_text(json.dumps(extra, indent=1, default=str) + "\n", folder / "checks.json")
    write_text(json.dumps(key, indent=1) + "\n", folder / "key.json")


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", type=Path, required=True, help="a pretrain_study.py --out")
    parser.add_argument("--out", type=Path, required=True, help="output folder (outside the repo)")
    parser.add_argument("--shared", type=Path, default=study.REPO.parent / "shared" / "data")
    parser.add_argument("--adata", type=Path, help="a built .h5ad instead of --shared")
    parser.add_argument("--run", help="run tag under STUDY/runs (default: the ladder's)")
    parser.add_argument("--splits", type=int, help="probe hold-outs (default: the study's)")
    parser.add_argument(
        "--pca-components", type=int, help="PCA width (default: the study's, else 64)"
    )
    parser.add_argument("--rungs", type=study.int_list, help="default: 0 and the run's last")
    parser.add_argument("--seeds", type=study.int_list, help="default: the study's seeds")
    parser.add_argument("--top-k", type=int, default=20, help="prognostic genes compared")
    parser.add_argument("--mask-repeats", type=int, default=8, help="mask draws per split")
    parser.add_argument("--mask-prob", type=float, default=0.15)
    parser.add_argument("--num-threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument(
        "--fresh", action="store_true", help="recompute every seed (ignore OUT/seeds caches)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("bulkfm.tasks", "bulkfm.tokenize", "bulkfm.embed", "bulkfm.bench"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return _run(args)
    except BulkfmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch
    from threadpoolctl import threadpool_limits

    from bulkfm.io import check_output_dir, write_text

    if args.top_k < 1 or args.mask_repeats < 1:
        raise ConfigError("--top-k and --mask-repeats must be at least 1")
    if not 0 < args.mask_prob < 1:
        raise ConfigError(f"--mask-prob must be in (0, 1), got {args.mask_prob}")
    for flag, value in (("--splits", args.splits), ("--pca-components", args.pca_components)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    out = check_output_dir(args.out, flag="--out")
    study_dir = args.study.resolve()
    if out.resolve() == study_dir or study_dir in out.resolve().parents:
        raise ConfigError("--out must lie outside --study (the study folder is only read)")
    runs = read_study(args.study, args.run, splits=args.splits, pca_components=args.pca_components)
    seeds = args.seeds or runs.seeds
    rungs = args.rungs or [0, runs.max_step]
    torch.set_num_threads(args.num_threads)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    frames: list[pd.DataFrame] = []
    genes: list[pd.DataFrame] = []
    checks: dict[str, Any] = {}
    cached: list[int] = []
    data: tuple[ad.AnnData, ad.AnnData] | None = None
    with threadpool_limits(limits=args.num_threads):
        for seed in seeds:
            key = _seed_key(args, runs, seed, rungs)
            folder = out / "seeds" / f"seed{seed}"
            hit = None if args.fresh else _load_seed(folder, key)
            if hit is None:
                if data is None:
                    t1 = time.perf_counter()
                    data = study.load_data(args)
                    timings["data"] = time.perf_counter() - t1
                found = seed_rungs(data[0], runs, args.study, seed, rungs)
                seed_timings: dict[str, float] = {}
                rec, gen, chk = diagnose_seed(
                    data[0],
                    data[1],
                    found,
                    n_splits=runs.splits,
                    top_k=args.top_k,
                    mask_repeats=args.mask_repeats,
                    mask_prob=args.mask_prob,
                    pca_components=runs.pca_components,
                    timings=seed_timings,
                )
                hit = (
                    pd.DataFrame(rec),
                    pd.concat(gen, ignore_index=True),
                    {"checks": chk, "timings_s": seed_timings},
                )
                _save_seed(folder, key, *hit)
            else:
                cached.append(seed)
            frames.append(hit[0])
            genes.append(hit[1])
            checks.update(hit[2]["checks"])
            timings.update(hit[2]["timings_s"])
    frame = pd.concat(frames, ignore_index=True)
    checks["max_abs_diff_pooled_vs_study_survival"] = study_agreement(args.study, runs, frame)
    summary = summarise(frame)
    timings["total"] = time.perf_counter() - t0
    meta = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "study": str(args.study),
        "run": runs.tag,
        "seeds": seeds,
        "rungs": rungs,
        "splits": runs.splits,
        "top_k": args.top_k,
        "mask_repeats": args.mask_repeats,
        "mask_prob": args.mask_prob,
        "pca_components": runs.pca_components,
        "seeds_from_cache": cached,
        "checks": checks,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    _write_csv(frame, out / "diagnose.csv")
    _write_csv(pd.concat(genes, ignore_index=True), out / "genes.csv")
    text = markdown(summary, args.top_k, meta)
    write_text(text, out / "diagnose.md")
    write_text(json.dumps(meta, indent=1, default=str) + "\n", out / "diagnose.json")
    print(text)
    print(f"total {timings['total']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
