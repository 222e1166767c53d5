"""Modules that must import without torch, each checked in a fresh interpreter.

torch costs seconds and hundreds of MB at import. The CLI's ``--help``, the data layer,
the tokenizer, the embedder registry, the adapters' module level (torch loads only when
an adapter loads weights) and the orchestrators' classical baselines have no need for
it; a module-level ``import torch`` anywhere on their import chains would make every one
of them pay. One parametrised test instead of a copy per module; a failure prints the
stack that imported torch, which names the offending module.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = [
    "bulkfm",
    "bulkfm.schema",
    "bulkfm.config",
    "bulkfm.data",
    "bulkfm.tokenize",
    "bulkfm.models",  # names load on first use
    "bulkfm.models.config",  # so that reading a training config needs no torch
    "bulkfm.train.config",
    "bulkfm.embed",
    "bulkfm.cli",
    "bulkfm.embedders",
    "bulkfm.adapters",
    "bulkfm.adapters.base",
    "bulkfm.adapters.bulkformer",
    "bulkfm.adapters.cellfm",
    "bulkfm.adapters.geneformer",
    "bulkfm.adapters.scbert",
    "bulkfm.adapters.scfoundation",
    "bulkfm.adapters.scgpt",
    "bulkfm.adapters.sclong",
    "bulkfm.tasks",
    "bulkfm.bench",
    "bulkfm.evaluate",
]

# Run after the import: listing the registered models must not load any of them.
AFTERWARDS = {
    "bulkfm.embedders": (
        "import bulkfm.adapters; names = bulkfm.embedders.available_embedders(); "
        "assert 'pca' in names, names"
    ),
}

# A finder that never finds anything: it only records who asked for torch first.
_PROBE = """
import importlib, sys, traceback

class _Probe:
    stack = None

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and _Probe.stack is None:
            _Probe.stack = "".join(traceback.format_stack()[:-1])
        return None

sys.meta_path.insert(0, _Probe())
importlib.import_module({module!r})
{afterwards}
if "torch" in sys.modules:
    sys.exit("torch was imported here:\\n" + (_Probe.stack or "(no stack recorded)"))
"""


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module: str) -> None:
    code = _PROBE.format(module=module, afterwards=AFTERWARDS.get(module, ""))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, f"import {module}:\n{out.stderr[-6000:]}"


def test_the_probe_sees_a_torch_import() -> None:
    """The check above can fail: importing a torch module trips it."""
    code = _PROBE.format(module="bulkfm.models.bulkrnabert", afterwards="")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode != 0
    assert "torch was imported here" in out.stderr and "bulkfm/models" in out.stderr
