from __future__ import annotations

import pytest

from bulkfm.bench.config import BenchConfig


@pytest.fixture
def small_config() -> BenchConfig:
    """Thresholds low enough for the tiny simulation (``sim``, root conftest), 2 splits."""
    return BenchConfig(
        n_splits=2,
        min_positives=8,
        min_negatives=8,
        min_events=8,
        min_class_patients=8,
    )
