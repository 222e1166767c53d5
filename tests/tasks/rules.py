"""The task rules a test passes when no orchestrator config is involved."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rules:
    """Satisfies :class:`bulkfm.tasks.spec.TaskRules` with small thresholds."""

    cohort_key: str = "cohort"
    patient_key: str = "patient"
    time_key: str = "survival_time"
    event_key: str = "survival_event"
    endpoint: str | None = None
    min_positives: int = 2
    min_negatives: int = 2
    min_events: int = 2
    min_class_patients: int = 2
    test_size: float = 0.5  # 2 patients per class for a split
