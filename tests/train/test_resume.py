"""Resumption from damaged checkpoints: fall back to the newest intact one, or refuse.

Every file of a checkpoint is checked before any state is loaded, so skipping a damaged
checkpoint and resuming from the one before it ends where an uninterrupted run does.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bulkfm.errors import CheckpointError
from bulkfm.train.pretrain import (
    DamagedCheckpointError,
    build_model,
    build_optimizer,
    build_scheduler,
    list_checkpoints,
    load_checkpoint,
    pretrain,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEP2 = Path("checkpoints/step_0000002")
STEP4 = Path("checkpoints/step_0000004")


class _Evil:
    """Unpickling this runs ``print``: what a planted pickle would do."""

    def __reduce__(self) -> tuple:
        return (print, ("PLANTED PICKLE RAN",))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, simulated_adata, pretrain_config):
    """(adata, config factory, interrupted run with step 2 and 4 checkpoints, the final
    weights of the same run uninterrupted)."""
    import os

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = tmp_path_factory.mktemp("resume")
    adata = simulated_adata(n=40, g=20)
    straight = pretrain_config(root / "straight")
    pretrain(straight, adata=adata)
    reference = load_file(str(root / "straight" / "final" / "model.safetensors"))
    broken = pretrain_config(root / "broken")
    pretrain(broken, adata=adata, stop_after=5)
    assert [s for s, _ in list_checkpoints(root / "broken")] == [2, 4]
    return adata, pretrain_config, root / "broken", reference


def _copy(runs, tmp_path: Path) -> tuple:
    adata, make_config, broken, reference = runs
    out = tmp_path / "run"
    shutil.copytree(broken, out)
    return adata, make_config(out), out, reference


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _optimizer_at_step(path: Path, step: float) -> None:
    state = torch.load(path, weights_only=True)
    for entry in state["state"].values():
        entry["step"] = torch.tensor(step)
    torch.save(state, path)


DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "truncated weights": (
        "model.safetensors",
        lambda d: (d / STEP4 / "model.safetensors").write_bytes(
            (d / STEP4 / "model.safetensors").read_bytes()[:100]
        ),
    ),
    "truncated optimizer": (
        "optimizer.pt",
        lambda d: (d / STEP4 / "optimizer.pt").write_bytes(
            (d / STEP4 / "optimizer.pt").read_bytes()[:100]
        ),
    ),
    "garbage optimizer": (
        "optimizer.pt",
        lambda d: (d / STEP4 / "optimizer.pt").write_bytes(b"not a torch file" * 4),
    ),
    "bad rng json": ("rng_rank0.json", lambda d: (d / STEP4 / "rng_rank0.json").write_text("{")),
    "wrong rng json": (
        "rng_rank0.json",
        lambda d: (d / STEP4 / "rng_rank0.json").write_text('{"numpy": 1}'),
    ),
    "bad scheduler": ("scheduler.json", lambda d: (d / STEP4 / "scheduler.json").write_text("{")),
    "missing weights": ("model.safetensors", lambda d: (d / STEP4 / "model.safetensors").unlink()),
    "missing optimizer": ("optimizer.pt", lambda d: (d / STEP4 / "optimizer.pt").unlink()),
    "missing rng": (
        "rng_rank0.safetensors",
        lambda d: (d / STEP4 / "rng_rank0.safetensors").unlink(),
    ),
    "missing trainer state": (
        "trainer_state.json",
        lambda d: (d / STEP4 / "trainer_state.json").unlink(),
    ),
    "trainer state of another step": (
        "trainer_state.json",
        lambda d: _edit_json(d / STEP4 / "trainer_state.json", step=3),
    ),
    "scheduler of another step": (
        "scheduler.json",
        lambda d: _edit_json(d / STEP4 / "scheduler.json", last_epoch=3),
    ),
    "optimizer of another step": (
        "optimizer.pt",
        lambda d: _optimizer_at_step(d / STEP4 / "optimizer.pt", 3.0),
    ),
    "NaN weights": (
        "model.safetensors",
        lambda d: save_file(
            {
                k: v.fill_(float("nan")) if k == "lm_head.bias" else v
                for k, v in load_file(str(d / STEP4 / "model.safetensors")).items()
            },
            str(d / STEP4 / "model.safetensors"),
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_skipped_for_the_one_before(case, runs, tmp_path, caplog):
    adata, config, out, reference = _copy(runs, tmp_path)
    file, damage = DAMAGE[case]
    damage(out)
    with caplog.at_level(logging.WARNING, logger="bulkfm.train.pretrain"):
        result = pretrain(config, adata=adata, resume=True)
    assert result.resumed_from == 2 and result.step == 6
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "step_0000004" in warned and file in warned and "damaged" in warned
    # Nothing of the damaged checkpoint was applied: the run ends where an
    # uninterrupted one does.
    final = load_file(str(out / "final" / "model.safetensors"))
    for name, tensor in reference.items():
        assert torch.allclose(final[name], tensor, atol=1e-6), name


def test_no_intact_checkpoint_refuses_with_the_command_to_start_afresh(runs, tmp_path):
    adata, config, out, _ = _copy(runs, tmp_path)
    for step in (STEP2, STEP4):
        (out / step / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        pretrain(config, adata=adata, resume=True)
    message = str(info.value)
    assert "step_0000002/model.safetensors" in message and "step_0000004" in message
    assert "without --resume" in message and "--set output_dir=" in message


def test_a_planted_pickle_is_refused_without_suggesting_an_unsafe_load(runs, tmp_path, capsys):
    adata, config, out, _ = _copy(runs, tmp_path)
    torch.save({"state": {}, "param_groups": [], "x": _Evil()}, out / STEP4 / "optimizer.pt")
    with pytest.raises(CheckpointError, match="weights-only load refuses") as info:
        pretrain(config, adata=adata, resume=True)
    message = str(info.value)
    assert "optimizer.pt" in message and "never unpickles" in message
    assert "weights_only" not in message and "weights_only" not in repr(info.value.__cause__)
    assert "PLANTED PICKLE RAN" not in capsys.readouterr().out
    assert not (out / "final").exists()


def test_a_changed_model_config_is_named_before_weights_are_read(runs, tmp_path):
    adata, config, _, _ = _copy(runs, tmp_path)
    raw = config.to_dict()
    raw["model"]["embed_dim"] = 32
    raw["model"]["key_size"] = 16
    changed = type(config).from_dict(raw)
    with pytest.raises(CheckpointError, match=r"model\.embed_dim: 16 -> 32") as info:
        pretrain(changed, adata=adata, resume=True)
    assert "--set model.embed_dim=16" in str(info.value)


def test_load_checkpoint_checks_every_file_before_loading_any(runs, tmp_path):
    from accelerate import Accelerator

    _, config, out, _ = _copy(runs, tmp_path)
    (out / STEP4 / "scheduler.json").write_text("[]")
    model = build_model(config, n_genes=16)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DamagedCheckpointError, match=r"scheduler\.json") as info:
        load_checkpoint(out / STEP4, Accelerator(cpu=True), model, optimizer, scheduler)
    assert info.value.file == "scheduler.json"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not optimizer.state
