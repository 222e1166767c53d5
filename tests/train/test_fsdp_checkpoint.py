"""FSDP2 checkpoint files checked without a process group: a damaged shard, a missing or
unreadable index, or shards of another model are named before anything is loaded
(:func:`check_shards`), and consolidation reports a shard that does not load.

The checkpoints here are written by torch.distributed.checkpoint in one process (one
shard file); the layout is that of an ``fsdp: true`` run's ``checkpoints/step_N``
(``fsdp/.metadata`` + ``fsdp/__R_0.distcp``, config.json, tokenizer.json). The
2-process runs are in test_fsdp.py and test_fsdp_resume.py (slow).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from bulkfm.train.pretrain import (
    DamagedCheckpointError,
    _model_shapes,
    check_shards,
    consolidate_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_sharded_checkpoint(folder: Path, model: torch.nn.Module) -> Path:
    """``folder`` as an FSDP2 checkpoint of ``model``: config, tokenizer and DCP shards of
    its weights (plus optimiser-like entries, as a run saves them), no model.safetensors."""
    import torch.distributed.checkpoint as dcp

    from bulkfm.models.bulkrnabert import WEIGHTS_FILE
    from bulkfm.tokenize import BinTokenizer

    n_genes = model.config.n_genes  # type: ignore[union-attr]
    genes = [f"ENSG{i:011d}" for i in range(n_genes)]
    x = np.random.default_rng(0).gamma(2.0, 10.0, size=(20, n_genes))
    model.save_pretrained(folder, tokenizer=BinTokenizer.fit(x, genes))  # type: ignore[operator]
    (folder / WEIGHTS_FILE).unlink()
    optim = {"state": {k: {"exp_avg": torch.zeros_like(v)} for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(
            {"model": model.state_dict(), "optim": optim},
            checkpoint_id=folder / "fsdp",
            no_dist=True,
        )
    return folder


@pytest.fixture
def sharded(tmp_path, tiny_model) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = tiny_model(n_genes=12)
    return write_sharded_checkpoint(tmp_path / "step_0000004", model), model


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


DAMAGE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (damage, the file the error names, what it says)
    "shard missing": (
        lambda c: (c / "fsdp" / "__0_0.distcp").unlink(),
        "fsdp/__0_0.distcp",
        "missing",
    ),
    "shard truncated": (
        lambda c: _truncate(c / "fsdp" / "__0_0.distcp"),
        "fsdp/__0_0.distcp",
        "truncated",
    ),
    "index missing": (lambda c: (c / "fsdp" / ".metadata").unlink(), "fsdp/.metadata", "missing"),
    "index truncated": (
        lambda c: _truncate(c / "fsdp" / ".metadata"),
        "fsdp/.metadata",
        "unreadable",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_shards_are_named_before_loading(sharded, case) -> None:
    checkpoint, model = sharded
    check_shards(checkpoint, _model_shapes(model))  # the intact copy passes
    damage, file, problem = DAMAGE[case]
    damage(checkpoint)
    with pytest.raises(DamagedCheckpointError, match=problem) as info:
        check_shards(checkpoint, _model_shapes(model))
    assert info.value.path == checkpoint and info.value.file == file
    with pytest.raises(DamagedCheckpointError, match=problem):  # consolidation checks too
        consolidate_checkpoint(checkpoint, checkpoint.parent / "out")
    assert not (checkpoint.parent / "out").exists()


def test_shards_of_another_model_do_not_fit(sharded, tiny_model) -> None:
    checkpoint, _ = sharded
    other = tiny_model(n_genes=12, embed_dim=32, ffn_embed_dim=64)
    with pytest.raises(DamagedCheckpointError, match=r"has shape \(65, 16\), the model \(65, 32\)"):
        check_shards(checkpoint, _model_shapes(other))
    deeper = tiny_model(n_genes=12, num_layers=2)
    with pytest.raises(
        DamagedCheckpointError, match=r"do not fit the model: missing \['transformer_layers\.1"
    ):
        check_shards(checkpoint, _model_shapes(deeper))
    # consolidation builds the model from config.json: a config that does not match its shards
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(
        json.dumps({**config, "embed_dim": 32, "ffn_embed_dim": 64})
    )
    with pytest.raises(DamagedCheckpointError, match=r"fsdp/\.metadata"):
        consolidate_checkpoint(checkpoint)


def test_changed_bytes_of_the_right_length_fail_at_load_with_the_folder_named(sharded) -> None:
    """No checksum in DCP: such a shard passes the check and fails when read, reported as
    damage of this checkpoint (one line, not DCP's traceback dump)."""
    checkpoint, model = sharded
    shard = checkpoint / "fsdp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)
    shard.write_bytes(bytes(data))
    check_shards(checkpoint, _model_shapes(model))
    with pytest.raises(DamagedCheckpointError, match=r"could not be loaded \(rank 0: ") as info:
        consolidate_checkpoint(checkpoint)
    assert info.value.path == checkpoint and "\n" not in str(info.value)


def test_consolidation_refuses_to_replace_a_folder_that_is_not_a_model(sharded) -> None:
    from bulkfm.errors import OutputPathError
    from bulkfm.models.bulkrnabert import load_pretrained

    checkpoint, model = sharded
    keep = checkpoint.parent / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("not a model")
    with pytest.raises(OutputPathError, match="not a model folder"):
        consolidate_checkpoint(checkpoint, keep)
    assert (keep / "mine.txt").read_text() == "not a model"
    out = consolidate_checkpoint(checkpoint, checkpoint.parent / "model")
    assert consolidate_checkpoint(checkpoint, out) == out  # a model folder is replaced
    loaded, _ = load_pretrained(out)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    shutil.rmtree(out)
