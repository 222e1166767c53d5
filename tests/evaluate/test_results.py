from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from bulkfm.evaluate.results import (
    ClassificationArm,
    DataSummary,
    EvaluationResult,
    Exclusions,
    ModelInfo,
    ModelSize,
    PretrainingInfo,
    RobustnessFraction,
    RobustnessStudy,
    SelectionStep,
    SplitInfo,
    SurvivalArm,
    SurvivalExclusion,
    VariantScores,
)


def stat(mean: float, std: float = 0.01) -> dict:
    return {"mean": mean, "std": std, "n": 2, "n_nan": 0, "values": [mean, mean]}


def result(**sections) -> EvaluationResult:
    return EvaluationResult(
        out_dir=Path("out"),
        config={"output_dir": "out"},
        model=ModelInfo("given"),
        data=DataSummary(n_loaded=10, n_selected=8, exclusions=Exclusions()),
        notes=["a note"],
        timings_s={"data": 0.5},
        **sections,
    )


def test_sections_that_did_not_run_are_left_out():
    res = result().results
    assert list(res) == ["config", "model", "data", "splits", "notes", "timings_s", "warnings"]
    assert list(res["data"]) == ["n_loaded", "n_selected", "exclusions"]
    assert res["model"] == {"source": "given"} and res["data"]["exclusions"] == {}


def test_model_info_is_one_flat_object_in_a_fixed_key_order():
    info = ModelInfo(
        "pretrained here",
        "out/pretrain/final",
        pretraining=PretrainingInfo(
            steps=6, n_train=90, n_eval=10, eval={"eval_acc": 0.4}, initial_eval={}, elapsed_s=2.0
        ),
        size=ModelSize(n_genes=32, embed_dim=16, num_layers=1, n_parameters=4752),
    )
    assert list(info.to_dict()) == [
        "source",
        "path",
        "steps",
        "n_train",
        "n_eval",
        "eval",
        "initial_eval",
        "elapsed_s",
        "n_genes",
        "embed_dim",
        "num_layers",
        "n_parameters",
    ]
    assert info.to_dict()["eval"] == {"eval_acc": 0.4}
    assert ModelInfo("checkpoint", "ckpt").to_dict() == {"source": "checkpoint", "path": "ckpt"}


def test_exclusions_hold_only_the_steps_that_dropped_samples_in_run_order():
    excl = Exclusions(
        survival=SurvivalExclusion(n_excluded=2, reason="no time", ids=["a", "b"]),
        unlabelled=1,
        select=SelectionStep(rules={"sample_type": "tumor"}, n_before=10, n_after=8),
    )
    assert excl.to_dict() == {
        "select": {"rules": {"sample_type": "tumor"}, "n_before": 10, "n_after": 8},
        "unlabelled": 1,
        "survival": {"n_excluded": 2, "reason": "no time", "ids": ["a", "b"], "by_reason": {}},
    }
    assert list(excl.to_dict()) == ["select", "unlabelled", "survival"]


def test_json_has_nan_as_null_and_plain_numbers():
    arm = ClassificationArm(
        label="BulkRNABert + MLP",
        kind="bulkrnabert",
        summary={"macro_f1": stat(np.float64(0.8), math.nan)},
        labels=["A", "B"],
        confusion=[[3, 1], [0, 4]],
        per_split=[{"split": "s0", "macro_f1": np.float32(0.5)}],
    )
    res = result(
        classification_arms={"mlp": arm}, splits={"classification": [SplitInfo("s0", 0, 6, 2)]}
    )
    text = res.to_json()
    assert "NaN" not in text
    back = json.loads(text)
    assert back["classification"]["mlp"]["summary"]["macro_f1"]["std"] is None
    assert back["classification"]["mlp"]["per_split"][0]["macro_f1"] == 0.5
    assert back["splits"]["classification"] == [
        {"name": "s0", "seed": 0, "n_train": 6, "n_test": 2}
    ]


def test_robustness_variants_sit_beside_the_clean_score():
    study = RobustnessStudy(
        head="mlp",
        fractions={
            "0.3": RobustnessFraction(
                clean_macro_f1=stat(0.9),
                variants={"imputed": VariantScores(macro_f1=stat(0.8), ratio=stat(0.89))},
            )
        },
        per_split=[],
    )
    entry = result(robustness=study).results["robustness"]["fractions"]["0.3"]
    assert entry == {
        "clean_macro_f1": stat(0.9),
        "imputed": {"macro_f1": stat(0.8), "ratio": stat(0.89)},
    }


def test_summary_keeps_mean_and_std_per_arm():
    surv = SurvivalArm(
        label="BulkRNABert + Cox MLP",
        kind="bulkrnabert",
        summary={"c_index": stat(0.7, 0.02)},
        per_cohort={},
        per_split=[],
    )
    out = result(survival_arms={"mlp": surv}, paths={"results": Path("out/results.json")})
    summary = out.summary()
    assert summary["survival"] == {
        "mlp": {"label": "BulkRNABert + Cox MLP", "c_index": {"mean": 0.7, "std": 0.02}}
    }
    assert summary["classification"] == {}
    assert summary["paths"] == {"results": str(Path("out/results.json"))}
