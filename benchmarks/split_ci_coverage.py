"""Coverage and bias of the benchmark's interval for a mean over overlapping random splits.

    python benchmarks/split_ci_coverage.py [--replicates 400] [--splits 10] [--samples 150]
        [--test-size 0.1 0.2 0.333 0.5] [--scorer centroid|probe] [--features 20]

A model with no signal: every replicate draws fresh random features and 0/1 labels
(``--prevalence`` positives), makes ``--splits`` stratified hold-outs with
:func:`bulkfm.data.splits.holdout_splits`, fits a scorer on each training part and
scores the test part with :func:`bulkfm.metrics.auroc`. The true AUROC is 0.5. For the
mean over the splits, the script prints how often three 95% intervals contain 0.5:

- ``naive``: t-interval from the split scores as if they were independent;
- ``nadeau_bengio``: the corrected resampled t-interval with rho = test fraction;
- ``calibrated``: the same with rho = 1 - (1 - test fraction)^2 (the benchmark default);

and the measured correlation of two splits' scores (from the variance of the replicate
means), the bias of the mean AUROC (its Monte-Carlo standard error beside it) and the
share of replicates whose mean lies below 0.5. ``--scorer centroid`` is the difference
of the training class means of the standardised features (fast); ``--scorer probe``
the benchmark's tuned logistic probe (:func:`bulkfm.tasks.probes.run_probe`, slower).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np


def _centroid_scores(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> Any:
    mu, sd = X[train].mean(0), X[train].std(0)
    Z = (X - mu) / np.where(sd > 0, sd, 1.0)
    w = Z[train][y[train] == 1].mean(0) - Z[train][y[train] == 0].mean(0)
    return Z[test] @ w


def _probe_scores(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> Any:
    from bulkfm.tasks.probes import run_probe

    groups = np.arange(y.size).astype(str)
    return run_probe("binary", X[train], X[test], y[train], groups[train]).prediction


def simulate(
    *,
    replicates: int,
    splits: int,
    samples: int,
    features: int,
    prevalence: float,
    test_size: float,
    scorer: str,
    seed: int = 0,
) -> np.ndarray:
    """(replicates, splits) AUROCs of a signal-free scorer on fresh data per replicate."""
    from bulkfm import metrics
    from bulkfm.data.splits import holdout_splits

    score = _centroid_scores if scorer == "centroid" else _probe_scores
    rng = np.random.default_rng(seed)
    n_pos = max(5, round(prevalence * samples))
    out = np.empty((replicates, splits))
    for r in range(replicates):
        X = rng.normal(size=(samples, features))
        y = np.zeros(samples, dtype=np.int64)
        y[rng.choice(samples, n_pos, replace=False)] = 1
        groups = np.arange(samples).astype(str)
        for j, split in enumerate(
            holdout_splits(
                y, groups, seeds=range(r * splits, (r + 1) * splits), test_size=test_size
            )
        ):
            out[r, j] = metrics.auroc(y[split.test], score(X, y, split.train, split.test))
    return out


def summarise(scores: np.ndarray, test_size: float, level: float = 0.95) -> dict[str, Any]:
    """Coverage of chance by each interval, correlation, bias and below-chance share."""
    from bulkfm import metrics

    reps, j = scores.shape
    rhos = {
        "naive": 0.0,
        "nadeau_bengio": metrics.split_correlation(test_size, "nadeau_bengio"),
        "calibrated": metrics.split_correlation(test_size, "calibrated"),
    }
    coverage = {}
    for name, rho in rhos.items():
        hits = [
            lo <= 0.5 <= hi
            for lo, hi in (
                metrics.corrected_t_interval(s, correlation=rho, level=level) for s in scores
            )
        ]
        coverage[name] = float(np.mean(hits))
    means = scores.mean(axis=1)
    sigma2 = float(scores.var())  # variance of one split's score, over replicates and splits
    rho_measured = (float(means.var(ddof=1)) * j / sigma2 - 1) / (j - 1)
    return {
        "replicates": reps,
        "splits": j,
        "test_size": test_size,
        "coverage": coverage,
        "coverage_mc_se": math.sqrt(level * (1 - level) / reps),
        "rho_measured": rho_measured,
        "rho_assumed": {k: v for k, v in rhos.items() if k != "naive"},
        "bias": float(means.mean() - 0.5),
        "bias_mc_se": float(means.std(ddof=1) / math.sqrt(reps)),
        "below_chance": float(np.mean(means < 0.5)),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicates", type=int, default=400)
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--samples", type=int, default=150)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--prevalence", type=float, default=0.3)
    parser.add_argument("--test-size", type=float, nargs="+", default=[0.1, 0.2, 1 / 3, 0.5])
    parser.add_argument("--scorer", choices=["centroid", "probe"], default="centroid")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(
        f"signal-free {args.scorer} scorer: {args.replicates} replicates x {args.splits} "
        f"splits of {args.samples} samples ({args.features} features, prevalence "
        f"{args.prevalence}); 95% intervals for the mean AUROC over the splits"
    )
    print(
        "test_size | covers 0.5: naive  N&B    calibrated (MC SE) | rho measured / N&B / "
        "calibrated | bias of mean AUROC (MC SE) | means < 0.5"
    )
    rows = []
    for test_size in args.test_size:
        scores = simulate(
            replicates=args.replicates,
            splits=args.splits,
            samples=args.samples,
            features=args.features,
            prevalence=args.prevalence,
            test_size=test_size,
            scorer=args.scorer,
            seed=args.seed,
        )
        row = summarise(scores, test_size)
        c, rho = row["coverage"], row["rho_assumed"]
        print(
            f"{test_size:9.3f} | {c['naive']:18.3f} {c['nadeau_bengio']:6.3f} "
            f"{c['calibrated']:6.3f} ({row['coverage_mc_se']:.3f}) | "
            f"{row['rho_measured']:.2f} / {rho['nadeau_bengio']:.2f} / {rho['calibrated']:.2f} | "
            f"{row['bias']:+.4f} ({row['bias_mc_se']:.4f}) | {row['below_chance']:.2f}"
        )
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
