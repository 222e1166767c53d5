"""One code path for 1..N processes: 2 CPU (gloo) processes train the same model as 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bulkfm.train.config import PretrainConfig
from bulkfm.train.pretrain import pretrain, read_log


def _config_for(pretrain_config, tmp_path, name: str, micro: int) -> PretrainConfig:
    # 16 genes; 128 tokens per step -> 2 micro-steps of 4 samples (1 process)
    # or 2 micro-steps of 2 samples on each of 2 processes: same 8-sample global batch.
    config = pretrain_config(tmp_path / name, micro_batch_size=micro, max_steps=5)
    config.data.path = str(tmp_path / "data.h5ad")
    config.checkpoint_every = 5
    return config


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_two_processes_train_the_same_model_as_one(tmp_path, simulated_adata, pretrain_config):
    simulated_adata(n=40, g=20).write_h5ad(tmp_path / "data.h5ad")

    single = pretrain(_config_for(pretrain_config, tmp_path, "one", micro=4))
    assert single.grad_accum_steps == 2 and single.global_batch_size == 8

    path = tmp_path / "two.yaml"
    path.write_text(_config_for(pretrain_config, tmp_path, "two", micro=2).to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "bulkfm.cli", "pretrain", "--config", str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["grad_accum_steps"] == 2 and summary["global_batch_size"] == 8
    assert summary["samples_seen"] == single.samples_seen

    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
    log_a, log_b = read_log(single.log_path), read_log(tmp_path / "two" / "log.csv")
    # not vacuous: biases start at zero (BERT init) and moved ~1000x the tolerance
    assert a["lm_head.bias"].abs().max() > 1e-3
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    for ra, rb in zip(log_a, log_b, strict=True):
        for key in ("loss", "eval_loss", "eval_acc", "trivial_acc"):
            if ra[key] is not None:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4), (ra["step"], key)
