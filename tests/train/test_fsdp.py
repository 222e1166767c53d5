"""FSDP2 pre-training on 2 CPU (gloo) processes: the model of the one-process run,
sharded checkpoints that resume after a kill, and consolidation into a model folder.

accelerate keeps DDP on CPU even when asked for FSDP (checked below), so ``fsdp: true``
shards with PyTorch's ``fully_shard`` itself; the weights here really are DTensor shards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bulkfm.errors import ConfigError
from bulkfm.models.bulkrnabert import load_pretrained
from bulkfm.train.config import PretrainConfig
from bulkfm.train.pretrain import consolidate_checkpoint, pretrain, read_log


def _config(pretrain_config, tmp_path: Path, name: str, micro: int, fsdp: bool) -> PretrainConfig:
    # 16 genes, 128 tokens a step: 1 process x 4 samples x 2 micro-steps, or
    # 2 processes x 2 samples x 2 micro-steps; the same 8-sample global batch.
    config = pretrain_config(tmp_path / name, micro_batch_size=micro, max_steps=5)
    config.data.path = str(tmp_path / "data.h5ad")
    config.checkpoint_every = 2
    config.keep_checkpoints = 5
    config.fsdp = fsdp
    return config


def _torchrun(
    config: PretrainConfig, path: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    path.write_text(config.to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "bulkfm.cli", "pretrain", "--config", str(path), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_fsdp_flag_is_validated():
    with pytest.raises(ConfigError, match="fsdp"):
        PretrainConfig.from_dict({"fsdp": "yes please"})


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_fsdp_two_processes_match_one_and_resume_after_a_kill(
    tmp_path, simulated_adata, pretrain_config
):
    simulated_adata(n=40, g=20).write_h5ad(tmp_path / "data.h5ad")
    single = pretrain(_config(pretrain_config, tmp_path, "one", micro=4, fsdp=False))

    config = _config(pretrain_config, tmp_path, "two", micro=2, fsdp=True)
    proc = _torchrun(config, tmp_path / "two.yaml")
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = tmp_path / "two"

    # sharded checkpoints: one DCP file per process, no plain weights
    step4 = two / "checkpoints" / "step_0000004"
    assert sorted(p.name for p in (step4 / "fsdp").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert not (step4 / "model.safetensors").exists()

    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(two / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert a["lm_head.bias"].abs().max() > 1e-3  # trained: biases start at 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
    log_a, log_b = read_log(single.log_path), read_log(two / "log.csv")
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    for ra, rb in zip(log_a, log_b, strict=True):
        for key in ("loss", "grad_norm", "eval_loss", "eval_acc"):
            if ra[key] is not None:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4), (ra["step"], key)

    # consolidation: a model folder one process loads, equal to the run's final weights
    folder = consolidate_checkpoint(two / "checkpoints" / "step_0000005")
    model, tokenizer = load_pretrained(folder)
    for name, value in model.state_dict().items():
        assert torch.equal(value, b[name]), name
    assert tokenizer.genes == load_pretrained(two / "final")[1].genes

    # a kill after step 2's checkpoint: later checkpoints, the final model and a
    # half-written checkpoint folder are what such a run leaves (or lacks)
    killed = tmp_path / "killed"
    shutil.copytree(two, killed)
    for name in ("step_0000004", "step_0000005"):
        shutil.rmtree(killed / "checkpoints" / name)
    shutil.rmtree(killed / "final")
    (killed / "summary.json").unlink()
    (killed / "checkpoints" / ".tmp-step_0000004" / "fsdp").mkdir(parents=True)
    config = _config(pretrain_config, tmp_path, "killed", micro=2, fsdp=True)
    proc = _torchrun(config, tmp_path / "killed.yaml", "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    c = load_file(str(killed / "final" / "model.safetensors"))
    for name in b:
        assert torch.allclose(b[name], c[name], atol=1e-6, rtol=1e-5), name
    resumed = read_log(killed / "log.csv")
    assert [r["step"] for r in resumed] == [r["step"] for r in log_b]
    for ra, rb in zip(log_b, resumed, strict=True):
        if ra["loss"] is not None:
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]


@pytest.mark.slow
def test_accelerate_fsdp_on_cpu_is_refused_not_run_as_ddp(
    tmp_path, simulated_adata, pretrain_config
):
    """accelerate would silently run DDP; the run stops and names the fix."""
    simulated_adata(n=40, g=20).write_h5ad(tmp_path / "data.h5ad")
    config = _config(pretrain_config, tmp_path, "acc", micro=2, fsdp=False)
    proc = _torchrun(config, tmp_path / "acc.yaml", env={"ACCELERATE_USE_FSDP": "true"})
    assert proc.returncode != 0
    assert "accelerate keeps DDP without GPUs" in proc.stderr
    assert "--set fsdp=true" in proc.stderr
