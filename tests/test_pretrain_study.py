"""scripts/pretrain_study.py: its variant grammar, its paired deltas (against a naive
loop) and one end-to-end run on tiny simulated data (so the study cannot rot)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_study.py"


@pytest.fixture(scope="module")
def study() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pretrain_study", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_variant_grammar_splits_pretraining_and_pooling_keys(study: ModuleType) -> None:
    v = study.parse_variant(["mix", "masking.mask_prob=0.3", "embed.layers=0,2"])
    assert v.pretrain == ("masking.mask_prob=0.3",) and v.embed == {"layers": (0, 2)}
    assert v.trains
    assert not study.parse_variant(["pool", "embed.layer=1"]).trains
    for bad in (["x"], ["k=v"], ["reference", "a=1"], ["p", "embed.colour=red"], ["p", "nokey"]):
        with pytest.raises(SystemExit):
            study.parse_variant(bad)


def test_deltas_are_paired_by_seed_and_split(study: ModuleType) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for variant in ("reference", "v"):
        for seed in (0, 1, 2):
            for split in (0, 1, 2):
                rows.append(
                    {
                        "variant": variant,
                        "pretrain_seed": seed,
                        "split": split,
                        "step": 10,
                        "metric": "m",
                        "value": float(rng.normal()),
                    }
                )
    scores = pd.DataFrame(rows)
    got = study.deltas(scores, [study.Variant("v", ("a=1",))], 10).iloc[0]
    # naive: per seed, mean over splits of (variant - reference) of the same split
    per_seed = []
    for seed in (0, 1, 2):
        diffs = []
        for split in (0, 1, 2):
            pick = (scores["pretrain_seed"] == seed) & (scores["split"] == split)
            v = scores[pick & (scores["variant"] == "v")]["value"].item()
            r = scores[pick & (scores["variant"] == "reference")]["value"].item()
            diffs.append(v - r)
        per_seed.append(sum(diffs) / 3)
    assert got["mean"] == pytest.approx(np.mean(per_seed))
    assert got["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert got["n_seeds"] == 3 and got["n_pairs"] == 9


def test_study_runs_end_to_end_on_tiny_data(study: ModuleType, tmp_path: Path) -> None:
    from bulkfm.data.simulate import simulate_bulk

    path = tmp_path / "sim.h5ad"
    simulate_bulk(n_samples=240, n_genes=200, seed=0).write_h5ad(path)
    out = tmp_path / "study"
    argv = [
        "--out", str(out), "--adata", str(path), "--steps", "0,2,4", "--splits", "3",
        "--set", "data.top_k_variable_genes=16", "--set", "optim.micro_batch_size=4",
        "--set", "eval_every=2", "--variant-steps", "4",
        "--variant", "pool", "embed.layers=0,2",
        "--variant", "value", "loss.value_weight=1",
    ]  # fmt: skip
    assert study.main(argv) == 0
    summary = pd.read_csv(out / "summary.csv")
    arms = set(summary["variant"])
    assert {"reference", "pool", "value", "pca", "raw", "random"} <= arms
    ladder = summary[summary["variant"] == "reference"]
    assert sorted(set(ladder["step"])) == [0, 2, 4]
    tokens = ladder.groupby("step")["tokens"].first()
    assert tokens[2] == 2 * 4 * 16 and tokens[0] == 0
    assert set(summary["metric"]) == set(study.METRICS.values())
    assert summary["mean"].between(0, 1).all()
    delta = pd.read_csv(out / "deltas.csv")
    assert set(delta["variant"]) == {"pool", "value"}
    assert (out / "study.png").stat().st_size > 0
    assert "pool" in (out / "study.md").read_text()
    assert json.loads((out / "study.json").read_text())["variant_steps"] == 4
    # a rerun reuses the finished runs and cached embeddings
    assert study.main(argv) == 0
