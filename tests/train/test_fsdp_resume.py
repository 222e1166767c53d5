"""A 2-process FSDP2 run's checkpoints, damaged: resumption falls back to the newest
intact one on every process (a shard that fails only when read included), refuses with
the command to start afresh when none is left, and names the fix for a changed config or
a one-process launch. ``bulkfm pretrain consolidate`` on the run's shards equals the
Python API. All slow: each torchrun launch takes about half a minute here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bulkfm.cli import main
from bulkfm.errors import CheckpointError
from bulkfm.models.bulkrnabert import load_pretrained
from bulkfm.train.pretrain import consolidate_checkpoint, pretrain
from tests.train.test_fsdp import _config, _torchrun

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, simulated_adata, pretrain_config) -> Path:
    """An fsdp: true run on 2 processes, checkpoints at steps 2, 4 and 5."""
    root = tmp_path_factory.mktemp("fsdp")
    simulated_adata(n=40, g=20).write_h5ad(root / "data.h5ad")
    config = _config(pretrain_config, root, "two", micro=2, fsdp=True)
    proc = _torchrun(config, root / "two.yaml")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "two"


def _copy_killed_after(run: Path, dest: Path, step: int) -> Path:
    """What a run killed after checkpoint ``step`` leaves: no later checkpoint, no final."""
    shutil.copytree(run, dest)
    for ckpt in (dest / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(dest / "final")
    (dest / "summary.json").unlink()
    return dest


def _resume(fsdp_run: Path, pretrain_config, out: Path, name: str):  # type: ignore[no-untyped-def]
    config = _config(pretrain_config, fsdp_run.parent, name, micro=2, fsdp=True)
    config.output_dir = str(out)
    return _torchrun(config, fsdp_run.parent / f"{name}.yaml", "--resume")


def test_cli_consolidation_equals_the_python_api(fsdp_run, tmp_path, capsys) -> None:
    step5 = fsdp_run / "checkpoints" / "step_0000005"
    assert main(["pretrain", "consolidate", str(step5), "-o", str(tmp_path / "cli")]) == 0
    api, _ = load_pretrained(consolidate_checkpoint(step5, tmp_path / "api"))
    cli, tokenizer = load_pretrained(tmp_path / "cli")
    final = load_file(str(fsdp_run / "final" / "model.safetensors"))
    for name, value in api.state_dict().items():
        assert torch.equal(cli.state_dict()[name], value), name
        assert torch.equal(final[name], value), name  # the run's own gathered weights
    assert tokenizer.genes == load_pretrained(fsdp_run / "final")[1].genes


def test_a_shard_that_fails_to_load_falls_back_on_every_process(
    fsdp_run, tmp_path, pretrain_config
) -> None:
    """step 4's rank-1 shard has its full length but changed bytes: the cheap check passes,
    loading fails on both processes, and both resume from step 2 and end as the run did."""
    killed = _copy_killed_after(fsdp_run, tmp_path / "killed", step=4)
    shard = killed / "checkpoints" / "step_0000004" / "fsdp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)
    shard.write_bytes(bytes(data))
    proc = _resume(fsdp_run, pretrain_config, killed, "killed")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step_0000004 is damaged and skipped" in proc.stderr
    assert "could not be loaded" in proc.stderr
    assert "resumed from" in proc.stderr and "step_0000002" in proc.stderr
    a = load_file(str(fsdp_run / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-5), name


def test_no_intact_checkpoint_is_refused_with_the_way_out(
    fsdp_run, tmp_path, pretrain_config
) -> None:
    out = _copy_killed_after(fsdp_run, tmp_path / "broken", step=5)
    ckpts = out / "checkpoints"
    data = (ckpts / "step_0000002" / "fsdp" / "__0_0.distcp").read_bytes()
    (ckpts / "step_0000002" / "fsdp" / "__0_0.distcp").write_bytes(data[:100])
    (ckpts / "step_0000004" / "fsdp" / ".metadata").unlink()
    (ckpts / "step_0000005" / "fsdp" / "__1_0.distcp").unlink()
    proc = _resume(fsdp_run, pretrain_config, out, "broken")
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "no intact checkpoint to resume from" in proc.stderr
    for file in ("step_0000002/fsdp/__0_0.distcp", "step_0000004/fsdp/.metadata"):
        assert file in proc.stderr, file
    assert "step_0000005/fsdp/__1_0.distcp" in proc.stderr
    assert "without --resume" in proc.stderr
    # bulkfm's one-line error, not DCP's exception (torchrun adds its own ChildFailedError)
    assert "CheckpointException" not in proc.stderr
    assert "torch/distributed/checkpoint/" not in proc.stderr


def test_a_changed_config_or_one_process_names_the_fix(fsdp_run, tmp_path, pretrain_config):
    out = _copy_killed_after(fsdp_run, tmp_path / "other", step=5)
    config = _config(pretrain_config, fsdp_run.parent, "other", micro=2, fsdp=True)
    config.output_dir = str(out)
    # one process: nothing to shard, so the shards cannot be read into it
    with pytest.raises(CheckpointError, match=r"holds FSDP2 shards .*bulkfm pretrain consolidate"):
        pretrain(config, resume=True)
    config.model.num_layers = 2
    with pytest.raises(CheckpointError, match=r"differs from the checkpoint's .*num_layers"):
        pretrain(config, resume=True)
