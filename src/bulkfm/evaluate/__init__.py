"""The paper's downstream evaluation: protocol, baselines, report (``bulkfm evaluate``).

Import-light: the heavy modules (torch, sklearn, matplotlib) load inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bulkfm.evaluate.config import EvaluateConfig

if TYPE_CHECKING:
    from bulkfm.evaluate.protocol import EvaluationResult

__all__ = ["EvaluateConfig", "evaluate_pipeline_stage", "run_evaluation"]


def run_evaluation(config: EvaluateConfig, **kwargs: Any) -> EvaluationResult:
    """See :func:`bulkfm.evaluate.protocol.run_evaluation`."""
    from bulkfm.evaluate.protocol import run_evaluation as run

    return run(config, **kwargs)


def evaluate_pipeline_stage(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See :func:`bulkfm.evaluate.protocol.evaluate_pipeline_stage`."""
    from bulkfm.evaluate.protocol import evaluate_pipeline_stage as stage

    return stage(*args, **kwargs)
