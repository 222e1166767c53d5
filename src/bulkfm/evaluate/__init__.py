"""The paper's downstream evaluation (``bulkfm evaluate``): an orchestrator over
:mod:`bulkfm.tasks`.

Modules, in the order a run uses them: ``config`` (the YAML), ``selection`` (samples,
labels, splits), ``model`` (checkpoint, pre-training here, embeddings), ``arms`` (every
arm and baseline of the two tables), ``studies`` (per-cohort survival, transfer,
robustness, cohort similarity), ``results`` (typed results, results.json), ``report`` and
``plots``; ``run`` ties them together.

Import-light: the runner (torch, sklearn, matplotlib) loads on the first call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bulkfm.evaluate.config import EvaluateConfig

if TYPE_CHECKING:
    from bulkfm.evaluate.results import EvaluationResult

__all__ = ["EvaluateConfig", "evaluate_pipeline_stage", "run_evaluation"]


def run_evaluation(config: EvaluateConfig, **kwargs: Any) -> EvaluationResult:
    """See :func:`bulkfm.evaluate.run.run_evaluation`."""
    from bulkfm.evaluate.run import run_evaluation as run

    return run(config, **kwargs)


def evaluate_pipeline_stage(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See :func:`bulkfm.evaluate.run.evaluate_pipeline_stage`."""
    from bulkfm.evaluate.run import evaluate_pipeline_stage as stage

    return stage(*args, **kwargs)
