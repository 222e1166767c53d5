"""Pre-training study: downstream scores of frozen BulkRNABert against pre-training compute.

    python scripts/pretrain_study.py --out /tmp/pretrain_study \\
        [--shared ../shared/data] [--steps 0,300,1000,3000] [--seeds 0] [--splits 3] \\
        [--set key=value ...] \\
        [--variant NAME key=value [key=value ...]] [--variant-steps 1000] [--variant-seeds 0,1]

What it does:

1. builds the shared data in memory (TCGA + RNAseqDB + GTEx, as
   ``scripts/run_shared_evaluation.py``) and pre-trains the reference recipe (the quick
   shared-data recipe: 256 genes, 2 blocks of 64-d; ``--set`` changes it) once per seed
   up to the largest rung of ``--steps``, with a checkpoint at every rung (every
   checkpoint is a loadable model folder; rung 0 is the run's own random initialisation);
2. scores every rung's frozen embedding (mean over genes of the last block) with the
   benchmark's probes on the TCGA tumours over ``--splits`` patient-grouped hold-outs:
   cancer-type macro-F1, pan-cancer survival C-index within cohorts, and pan-cancer
   mutation AUROC within cohorts (averaged over the feasible genes), beside PCA and raw
   log-TPM reading the *same genes* and random vectors;
3. each ``--variant NAME key=value ...`` is one ablation: keys of the pre-training config
   (``masking.mask_prob=0.3``, ``loss.value_weight=1``, ``optim.lr=5e-3`` ...) retrain
   at ``--variant-steps`` for each of ``--variant-seeds``; ``embed.*`` keys
   (``embed.layers=0,1,2``, ``embed.layer=1``, ``embed.exclude_missing=false``,
   ``embed.pooling=max``) only change how the reference's checkpoints are pooled, so
   they need no training. The reference is trained with the same schedule (same
   ``max_steps``), and each variant is reported as a paired delta (same pre-training
   seed, same probe split) with mean +- std over pre-training seeds.

Outputs in ``--out`` (keep it outside the repository: results derive from shared data):
``scores.csv`` (one row per model, rung, seed, split and metric), ``summary.csv``
(mean +- std over seeds x splits), ``deltas.csv``, ``study.md`` (tables),
``study.png`` (score against tokens and CPU-seconds, baselines as lines) and
``study.json`` (command, settings, timings). Re-running with the same ``--out`` reuses
finished pre-training runs and cached embeddings.

Compute: ``tokens`` = optimiser steps x samples per step x genes; ``cpu_s`` = the
process CPU time of the pre-training call (``time.process_time``), apportioned to each
rung by its share of the run's wall time in ``log.csv``; ``wall_s`` is that wall time.
Rungs are checkpoints of one run whose cosine schedule spans the largest rung, so an
early rung has not had its learning rate decayed (a run stopped there on its own
schedule might do a little better).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.embedders.base import Embedder

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pretrain_shared_data.yaml"
logger = logging.getLogger("pretrain_study")

#: The quick shared-data recipe (configs/pretrain_shared_data.yaml, "QUICK VARIANT"):
#: the reference every rung and ablation starts from; --set changes it.
QUICK_RECIPE: tuple[str, ...] = (
    "data.top_k_variable_genes=256",
    "model.embed_dim=64",
    "model.init_gene_embed_dim=32",
    "model.ffn_embed_dim=128",
    "model.num_layers=2",
    "optim.lr=2e-2",
    "optim.warmup_steps=30",
    "optim.target_tokens_per_step=null",
    "num_workers=0",
    "num_threads=1",
    "progress_every_s=60",
)
REFERENCE = "reference"
#: The ladder's arm name when its schedule (max_steps) differs from the variants' budget.
LADDER = "ladder"
#: (task family, metric) -> column name in the tables.
METRICS: dict[tuple[str, str], str] = {
    ("cancer_type", "macro_f1"): "cancer_type_macro_f1",
    ("survival", "c_index_within_cohort"): "survival_c_index_within_cohort",
    ("mutation", "auroc_within_cohort"): "mutation_auroc_within_cohort",
}
TASKS = ("cancer_type", "survival", "mutation")
EMBED_KEYS = {"layer", "layers", "exclude_missing", "pooling"}


# --------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One arm of the study: pre-training overrides and pooling settings."""

    name: str
    pretrain: tuple[str, ...] = ()
    embed: dict[str, Any] = field(default_factory=dict)

    @property
    def trains(self) -> bool:
        """Whether this arm needs its own pre-training (else it re-pools the reference)."""
        return bool(self.pretrain) or self.name == REFERENCE


def parse_variant(items: Sequence[str]) -> Variant:
    """``["NAME", "k=v", ...]`` -> Variant; ``embed.*`` keys are pooling settings."""
    if not items or "=" in items[0]:
        raise SystemExit(
            "error: --variant takes a name then key=value pairs, e.g. --variant mask30 "
            "masking.mask_prob=0.3"
        )
    name, pairs = items[0], items[1:]
    if name == REFERENCE or not name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(
            f"error: variant name {name!r} must be letters, digits, '_' or '-' and not "
            f"{REFERENCE!r}"
        )
    if not pairs:
        raise SystemExit(f"error: --variant {name} changes nothing; add key=value pairs")
    pretrain: list[str] = []
    embed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --variant {name}: {pair!r} is not key=value")
        if key.startswith("embed."):
            sub = key.removeprefix("embed.")
            if sub not in EMBED_KEYS:
                raise SystemExit(
                    f"error: --variant {name}: unknown pooling key {key!r}; known: "
                    f"{sorted('embed.' + k for k in EMBED_KEYS)}"
                )
            embed[sub] = _embed_value(sub, value)
        else:
            pretrain.append(pair)
    return Variant(name, tuple(pretrain), embed)


def _embed_value(key: str, value: str) -> Any:
    if key == "layers":
        return tuple(int(v) for v in value.split(","))
    if key == "layer":
        return int(value)
    if key == "pooling":
        if value not in ("mean", "max"):
            raise SystemExit(f"error: embed.pooling must be mean or max, got {value!r}")
        return value
    if value.lower() not in ("true", "false"):
        raise SystemExit(f"error: embed.{key} must be true or false, got {value!r}")
    return value.lower() == "true"


def int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise SystemExit(f"error: expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 0:
        raise SystemExit(f"error: expected non-negative integers, got {text!r}")
    return values


# --------------------------------------------------------------------------- pre-training
@dataclass
class Rung:
    """One scored model: a checkpoint of one pre-training run."""

    variant: str
    seed: int
    step: int
    model_dir: Path
    tokens: int
    wall_s: float
    cpu_s: float
    genes: list[str]
    embed: dict[str, Any]


def pretrain_rungs(
    adata: ad.AnnData,
    *,
    config_path: Path,
    overrides: Sequence[str],
    steps: Sequence[int],
    seed: int,
    run_dir: Path,
    variant: str,
) -> list[Rung]:
    """Pre-train up to ``max(steps)`` (or reuse a finished run) and return its rungs."""
    import torch
    from accelerate.utils import set_seed

    from bulkfm.tokenize import BinTokenizer
    from bulkfm.train.config import PretrainConfig
    from bulkfm.train.pretrain import (
        CHECKPOINT_DIR,
        build_model,
        pretrain,
        read_log,
    )

    trained = [s for s in steps if s > 0]
    max_steps = max(trained)
    every = math.gcd(*trained)
    config = PretrainConfig.from_yaml(
        config_path,
        [
            *overrides,
            f"seed={seed}",
            f"optim.max_steps={max_steps}",
            f"checkpoint_every={every}",
            f"keep_checkpoints={max_steps // every + 1}",
            f"eval_every={every}",
            f"output_dir={run_dir}",
        ],
    )
    cpu_file = run_dir / "study_cpu_s.json"
    if (run_dir / "summary.json").exists() and cpu_file.exists():
        logger.info("%s seed %d: reusing the finished run in %s", variant, seed, run_dir)
    else:
        if run_dir.exists() and not (run_dir / "summary.json").exists():
            import shutil

            shutil.rmtree(run_dir)  # an unfinished run of an earlier study: start again
        cpu0 = time.process_time()
        pretrain(config, adata=adata, handle_signals=False)
        cpu_file.write_text(json.dumps({"cpu_s": time.process_time() - cpu0}) + "\n")
    summary = json.loads((run_dir / "summary.json").read_text())
    cpu_total = float(json.loads(cpu_file.read_text())["cpu_s"])
    log = read_log(run_dir / "log.csv")
    wall = {int(r["step"] or 0): float(r["elapsed_s"] or 0.0) for r in log}
    wall_total = wall.get(max_steps) or 1.0
    tokenizer = BinTokenizer.load(run_dir)
    tokens_per_step = int(summary["global_batch_size"]) * int(summary["n_genes"])

    rungs = []
    for step in steps:
        if step == 0:
            model_dir = run_dir / "step_0_init"
            if not (model_dir / "config.json").exists():
                set_seed(config.seed)  # as the run did before building its model
                with torch.no_grad():
                    build_model(config, tokenizer.n_genes).save_pretrained(
                        model_dir, tokenizer=tokenizer
                    )
        else:
            model_dir = run_dir / CHECKPOINT_DIR / f"step_{step:07d}"
            if not (model_dir / "config.json").exists():
                raise SystemExit(
                    f"error: {model_dir} is not a model folder; delete {run_dir} and rerun"
                )
        wall_s = wall.get(step, 0.0) if step > 0 else 0.0  # step 0: untrained, no compute
        rungs.append(
            Rung(
                variant=variant,
                seed=seed,
                step=step,
                model_dir=model_dir,
                tokens=step * tokens_per_step,
                wall_s=wall_s,
                cpu_s=cpu_total * wall_s / wall_total,
                genes=list(tokenizer.genes),
                embed={},
            )
        )
    return rungs


# --------------------------------------------------------------------------- scoring
def _label(rung: Rung) -> str:
    return f"{rung.variant}.s{rung.seed}.step{rung.step}"


def score_rungs(
    adata: ad.AnnData,
    rungs: Sequence[Rung],
    *,
    n_splits: int,
    cache_dir: Path,
    pca_components: int,
    baselines_done: set[str],
) -> pd.DataFrame:
    """Probe every rung (one gene set) and, once per gene set, the baselines."""
    from bulkfm.bench.config import BenchConfig
    from bulkfm.bench.runner import run_benchmark
    from bulkfm.embedders.bulkrnabert import BulkRNABertEmbedder
    from bulkfm.embedders.registry import get_embedder
    from bulkfm.fingerprint import stable_hash

    genes = rungs[0].genes
    gene_key = stable_hash(list(genes))[:12]
    models: list[Embedder] = [
        BulkRNABertEmbedder(r.model_dir, label=_label(r), **r.embed) for r in rungs
    ]
    if gene_key not in baselines_done:
        n = len(genes)
        models += [
            get_embedder("pca", n_components=min(pca_components, n), n_top_genes=n, label="pca"),
            get_embedder("raw", n_top_genes=n, label="raw"),
            get_embedder("random", dim=pca_components, label="random"),
        ]
    config = BenchConfig(n_splits=n_splits, cache_dir=str(cache_dir))
    subset = adata[:, genes].copy()
    result = run_benchmark(subset, models, list(TASKS), config, progress=False)
    baselines_done.add(gene_key)
    rows = []
    by_label = {_label(r): r for r in rungs}
    for (model, family, metric, _seed, split), part in result.scores.groupby(
        ["model", "family", "metric", "seed", "split"]
    ):
        column = METRICS.get((family, metric))
        if column is None or part["reference"].any():
            continue
        rung = by_label.get(model)
        rows.append(
            {
                "model": model,
                "variant": rung.variant if rung else model,
                "pretrain_seed": rung.seed if rung else None,
                "step": rung.step if rung else None,
                "tokens": rung.tokens if rung else None,
                "wall_s": rung.wall_s if rung else None,
                "cpu_s": rung.cpu_s if rung else None,
                "genes": gene_key,
                "metric": column,
                "split": int(split),
                # mutation: the mean over the feasible pan-cancer genes of this split
                "value": float(part["value"].mean()),
                "n_tasks": int(part["task"].nunique()),
            }
        )
    return pd.DataFrame(rows)


def summarise(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean +- std (ddof 1) over pre-training seeds x probe splits per arm and rung."""
    keys = ["variant", "step", "metric"]
    frame = scores.assign(step=scores["step"].fillna(-1))
    out = (
        frame.groupby(keys)
        .agg(
            mean=("value", "mean"),
            std=("value", "std"),
            n=("value", "size"),
            n_seeds=("pretrain_seed", "nunique"),
            tokens=("tokens", "mean"),
            wall_s=("wall_s", "mean"),
            cpu_s=("cpu_s", "mean"),
        )
        .reset_index()
    )
    out["step"] = out["step"].astype(int)
    return out


def deltas(scores: pd.DataFrame, variants: Sequence[Variant], step: int) -> pd.DataFrame:
    """Each variant minus the reference at the same rung, pre-training seed and split.

    ``mean``/``std``: over pre-training seeds of the per-seed mean delta (the seed spread
    the issue asks for); ``pairs_std``: over every (seed, split) pair.
    """
    at = scores[scores["step"] == step]
    ref = at[at["variant"] == REFERENCE].set_index(["pretrain_seed", "split", "metric"])["value"]
    rows = []
    for variant in variants:
        mine = at[at["variant"] == variant.name]
        if mine.empty:
            continue
        paired = mine.set_index(["pretrain_seed", "split", "metric"])["value"] - ref
        paired = paired.dropna().rename("delta").reset_index()
        for metric, part in paired.groupby("metric"):
            per_seed = part.groupby("pretrain_seed")["delta"].mean()
            rows.append(
                {
                    "variant": variant.name,
                    "changes": " ".join(variant.pretrain)
                    + " ".join(f"embed.{k}={v}" for k, v in variant.embed.items()),
                    "step": step,
                    "metric": metric,
                    "mean": float(per_seed.mean()),
                    "std": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan"),
                    "n_seeds": int(per_seed.size),
                    "pairs_std": float(part["delta"].std(ddof=1)),
                    "n_pairs": int(part.shape[0]),
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- report
def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}" if np.isfinite(std) else f"{mean:.3f}"


def markdown(summary: pd.DataFrame, delta: pd.DataFrame) -> str:
    cols = list(METRICS.values())
    lines = [
        "| arm | step | tokens | CPU-s | " + " | ".join(cols) + " |",
        "|---|---|---|---|" + "---|" * len(cols),
    ]
    for (variant, step), part in summary.groupby(["variant", "step"], sort=False):
        by = part.set_index("metric")
        first = part.iloc[0]
        cells = [_pm(by.loc[c, "mean"], by.loc[c, "std"]) if c in by.index else "–" for c in cols]
        tokens = "–" if step < 0 else f"{first['tokens']:,.0f}"
        cpu = "–" if step < 0 else f"{first['cpu_s']:.0f}"
        lines.append(
            f"| {variant} | {'–' if step < 0 else step} | {tokens} | {cpu} | "
            + " | ".join(cells)
            + " |"
        )
    text = "\n".join(lines) + "\n"
    if not delta.empty:
        text += "\n| variant | changes | step | metric | delta (mean ± std over seeds) | seeds |\n"
        text += "|---|---|---|---|---|---|\n"
        for _, r in delta.iterrows():
            text += (
                f"| {r['variant']} | `{r['changes']}` | {r['step']} | {r['metric']} | "
                f"{_pm(r['mean'], r['std'])} | {r['n_seeds']} |\n"
            )
    return text


def plot(summary: pd.DataFrame, path: Path) -> Path:
    """Score against tokens (top) and CPU-seconds (bottom); baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(METRICS.values())
    fig, axes = plt.subplots(2, len(cols), figsize=(4.2 * len(cols), 6.4), squeeze=False)
    ladder = summary[summary["step"] >= 0]
    base = summary[summary["step"] < 0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, x_key in enumerate(("tokens", "cpu_s")):
        for j, metric in enumerate(cols):
            ax = axes[row][j]
            for k, (variant, part) in enumerate(
                ladder[ladder["metric"] == metric].groupby("variant")
            ):
                part = part.sort_values("step")
                ax.errorbar(
                    part[x_key],
                    part["mean"],
                    yerr=part["std"].fillna(0.0),
                    marker="o",
                    capsize=3,
                    color=colours[k % len(colours)],
                    label=f"BulkRNABert {variant}",
                )
            for k, (_, r) in enumerate(base[base["metric"] == metric].iterrows()):
                colour = ("k", "0.45", "0.7")[k % 3]
                ax.axhline(r["mean"], color=colour, ls="--", lw=1, label=str(r["variant"]))
                ax.axhspan(r["mean"] - r["std"], r["mean"] + r["std"], color=colour, alpha=0.08)
            positive = ladder[x_key][ladder[x_key] > 0]
            ax.set_xscale("symlog", linthresh=float(positive.min()) if len(positive) else 1.0)
            ax.set_xlabel(
                "pre-training tokens" if x_key == "tokens" else "pre-training CPU-seconds"
            )
            ax.set_title(metric.replace("_", " "), fontsize=9)
            if j == 0:
                ax.set_ylabel("score (mean ± std)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main
def load_data(args: argparse.Namespace) -> tuple[ad.AnnData, ad.AnnData]:
    """(all samples for pre-training, TCGA tumours for the probes)."""
    from bulkfm import schema as keys

    if args.adata is not None:
        import anndata

        adata = anndata.read_h5ad(args.adata)
    else:
        from bulkfm.data.build import build_dataset, shared_data_config

        if not (args.shared / "README.md").is_file():
            raise SystemExit(f"error: shared data not found at {args.shared}; pass --shared DIR")
        adata = build_dataset(shared_data_config(args.shared), progress=False)
    obs = adata.obs
    if keys.STUDY in obs:
        tumour = (obs[keys.STUDY].astype(str) == "TCGA") & (
            obs[keys.SAMPLE_TYPE].astype(str) == "tumor"
        )
    else:  # simulated data (the smoke test): every tumour
        tumour = obs[keys.SAMPLE_TYPE].astype(str) == "tumor"
    return adata, adata[tumour.to_numpy()].copy()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (outside the repo)")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--adata", type=Path, help="a built .h5ad instead of --shared")
    parser.add_argument("--config", type=Path, default=CONFIG, help="pre-training YAML")
    parser.add_argument(
        "--no-quick",
        action="store_true",
        help="start from --config as it is, not the quick 256-gene recipe",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--steps", type=int_list, default=[0, 300, 1000, 3000])
    parser.add_argument("--seeds", type=int_list, default=[0], help="pre-training seeds")
    parser.add_argument("--splits", type=int, default=3, help="probe hold-outs (>= 3)")
    parser.add_argument(
        "--variant",
        dest="variants",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME K=V",
        help="an ablation: a name then key=value pairs (embed.* = pooling); repeatable",
    )
    parser.add_argument("--variant-steps", type=int, default=None, help="default: max --steps")
    parser.add_argument("--variant-seeds", type=int_list, default=None, help="default: --seeds")
    parser.add_argument("--pca-components", type=int, default=64)
    parser.add_argument("--no-ladder", action="store_true", help="only the variants")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.splits < 3:
        parser.error("--splits must be at least 3 (a std over fewer is not worth printing)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("bulkfm.tasks", "bulkfm.tokenize", "bulkfm.embed", "bulkfm.bench"):
        logging.getLogger(name).setLevel(logging.WARNING)

    variants = [parse_variant(v) for v in args.variants]
    base = [*(() if args.no_quick else QUICK_RECIPE), *args.overrides]
    v_step = args.variant_steps or max(args.steps)
    v_seeds = args.variant_seeds or args.seeds
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    adata, tumours = load_data(args)
    logger.info(
        "data: %d samples for pre-training, %d TCGA tumours probed", adata.n_obs, tumours.n_obs
    )

    # Which runs: the ladder (reference, all rungs) and, per trained variant, one run at
    # v_step per seed; the reference at v_step is its own run unless the ladder is it.
    runs: list[tuple[Variant, list[int], int]] = []
    reference = Variant(REFERENCE)
    same = max(args.steps) == v_step and not args.no_ladder
    if not args.no_ladder:
        ladder = reference if same else Variant(LADDER)
        runs += [(ladder, list(args.steps), s) for s in args.seeds]
    if variants:
        runs += [(reference, [0, v_step], s) for s in v_seeds if not (same and s in args.seeds)]
        runs += [(v, [v_step], s) for v in variants if v.trains for s in v_seeds]

    timings: dict[str, float] = {"data": time.perf_counter() - t0}
    frames = []
    baselines: set[str] = set()
    ref_rungs: dict[tuple[int, int], Rung] = {}

    def score(rungs: list[Rung]) -> pd.DataFrame:
        return score_rungs(
            tumours,
            rungs,
            n_splits=args.splits,
            cache_dir=out / "cache",
            pca_components=args.pca_components,
            baselines_done=baselines,
        )

    for variant, steps, seed in runs:
        tag = f"{variant.name}_max{max(s for s in steps if s > 0)}"
        t1 = time.perf_counter()
        rungs = pretrain_rungs(
            adata,
            config_path=args.config,
            overrides=[*base, *variant.pretrain],
            steps=steps,
            seed=seed,
            run_dir=out / "runs" / tag / f"seed{seed}",
            variant=variant.name,
        )
        timings[f"{tag}/seed{seed}/pretrain"] = time.perf_counter() - t1
        if variant.name == REFERENCE:
            for r in rungs:
                ref_rungs.setdefault((r.seed, r.step), r)
        t1 = time.perf_counter()
        frames.append(score(rungs))
        timings[f"{tag}/seed{seed}/probe"] = time.perf_counter() - t1
    # Pooling-only variants re-pool the reference's checkpoints at v_step.
    for variant in (v for v in variants if not v.trains):
        rungs = [
            dataclasses.replace(ref_rungs[(s, v_step)], variant=variant.name, embed=variant.embed)
            for s in v_seeds
        ]
        t1 = time.perf_counter()
        frames.append(score(rungs))
        timings[f"{variant.name}/probe"] = time.perf_counter() - t1

    scores = pd.concat(frames, ignore_index=True)
    # Ladder and variant runs of the reference at the same step are different schedules:
    # tag the variant-budget reference runs apart when they differ from the ladder.
    summary = summarise(scores)
    delta = deltas(scores, variants, v_step)
    scores.to_csv(out / "scores.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    delta.to_csv(out / "deltas.csv", index=False)
    text = markdown(summary, delta)
    (out / "study.md").write_text(text)
    if not args.no_plot:
        plot(summary, out / "study.png")
    timings["total"] = time.perf_counter() - t0
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    (out / "study.json").write_text(
        json.dumps(
            {
                "command": command,
                "recipe": base,
                "steps": args.steps,
                "seeds": args.seeds,
                "splits": args.splits,
                "variants": [dataclasses.asdict(v) for v in variants],
                "variant_steps": v_step,
                "variant_seeds": v_seeds,
                "timings_s": {k: round(v, 1) for k, v in timings.items()},
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    print(text)
    print(f"total {timings['total']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
