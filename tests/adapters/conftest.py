from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _adapters_run_on_one_thread(one_torch_thread: None) -> None:
    """Every adapter test runs a tiny model, where thread start-up on a shared 2-core
    machine costs more than the maths: the whole directory opts in here."""
