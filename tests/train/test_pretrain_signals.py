"""Pre-training feedback and stopping: progress lines, SIGINT/SIGTERM, checkpoints as models."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bulkfm.train.pretrain import (
    ProgressReporter,
    TrainingInterrupted,
    _StopOnSignal,
    find_latest_checkpoint,
    format_duration,
    list_checkpoints,
    pretrain,
)

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- progress line
class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (9.4, "9s"), (59.6, "1m00s"), (250, "4m10s"), (3725, "1h02m"), (float("nan"), "?")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_progress_lines_are_throttled_and_carry_speed_and_eta():
    clock = _Clock()
    reporter = ProgressReporter(
        max_steps=110, start_step=10, tokens_per_step=1000, every_s=30.0, clock=clock
    )
    clock.now += 2.0
    first = reporter.line(11, 3.5)  # the first step of a session always reports
    assert first == ("step 11/110 (10%) | loss 3.5000 | 500 tokens/s | elapsed 2s | ETA 3m18s")
    clock.now += 10.0
    assert reporter.line(12, 3.4) is None  # 10 s < 30 s since the last line
    clock.now += 28.0  # 40 s for 20 steps since the session began: 2 s a step
    line = reporter.line(30, 3.0)
    assert line is not None
    assert "step 30/110 (27%)" in line and "500 tokens/s" in line and "ETA 2m40s" in line
    clock.now += 1.0
    assert reporter.line(110, 2.0) is not None  # the last step always reports


# ---------------------------------------------------------------------- signals
def test_stop_on_signal_restores_the_previous_handlers():
    def mine(signum, frame):  # pragma: no cover - never called
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        with _StopOnSignal() as stop:
            assert signal.getsignal(signal.SIGTERM) == stop._handle
            signal.raise_signal(signal.SIGTERM)
            assert stop.requested == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with _StopOnSignal() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == before


def test_sigterm_in_process_checkpoints_and_resumes_to_the_uninterrupted_weights(
    tmp_path, monkeypatch, simulated_adata, pretrain_config, caplog
):
    """A signal during step 3 (checkpoints every 2) -> checkpoint of step 3, the
    exception says so, the handlers are restored, and resuming ends where a run
    without the interruption ends."""
    import bulkfm.train.pretrain as module

    adata = simulated_adata(n=40, g=24)
    reference = pretrain(pretrain_config(tmp_path / "whole"), adata=adata)

    real_step = module._optimizer_step
    calls = {"n": 0}

    def step_then_signal(*args, **kwargs):
        calls["n"] += 1
        out = real_step(*args, **kwargs)
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(module, "_optimizer_step", step_then_signal)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = tmp_path / "stopped"
    config = pretrain_config(out)
    config.progress_every_s = 0.0  # a line every step (progress_every_s may change on resume)
    with (
        caplog.at_level(logging.INFO, logger="bulkfm.train.pretrain"),
        pytest.raises(TrainingInterrupted) as info,
    ):
        pretrain(config, adata=adata)
    assert {s: signal.getsignal(s) for s in before} == before
    exc = info.value
    assert (exc.signal_name, exc.exit_code, exc.step) == ("SIGTERM", 143, 3)
    assert exc.checkpoint == out / "checkpoints" / "step_0000003"
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    assert "--resume" in str(exc) and "step 3/6" in caplog.text  # the progress line

    monkeypatch.setattr(module, "_optimizer_step", real_step)
    resumed = pretrain(config, adata=adata, resume=True)
    assert resumed.resumed_from == 3 and resumed.step == 6
    a = load_file(str(reference.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_checkpoints_load_as_model_folders(tmp_path, simulated_adata, pretrain_config):
    from bulkfm.models.bulkrnabert import BulkRNABert, load_pretrained

    out = tmp_path / "run"
    result = pretrain(pretrain_config(out), adata=simulated_adata(n=30, g=24))
    checkpoint = find_latest_checkpoint(out)
    assert checkpoint is not None
    model, tokenizer = load_pretrained(checkpoint)
    final = BulkRNABert.from_pretrained(result.final_dir)
    assert tokenizer.genes == json.loads((out / "tokenizer.json").read_text())["genes"]
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name])
    table = (out / "genes_excluded.tsv").read_text().splitlines()
    assert table[0].split("\t")[:2] == ["gene", "symbol"] and len(table) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gene_selection"]["n_genes_selected"] == 16


# ---------------------------------------------------------------------- the CLI
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bulkfm.cli", *args]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as handle:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=handle,
            env=env,
            start_new_session=True,
        )


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Poll the log until ``text`` shows up (generous: the machine may be busy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {text!r}:\n{log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no {text!r} in {timeout:.0f} s:\n{log.read_text()}")


@pytest.fixture
def cli_config(tmp_path, simulated_adata, pretrain_config) -> tuple[Path, Path]:
    """A run far too long to end by itself; progress on every step, no periodic save."""
    data = tmp_path / "d.h5ad"
    simulated_adata(n=40, g=24).write_h5ad(data)
    config = pretrain_config(tmp_path / "unused", max_steps=100_000)
    config.data.path = str(data)
    config.checkpoint_every = 50_000
    config.eval_every = 50_000
    config.progress_every_s = 0.0
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    return path, tmp_path


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_cli_stops_cleanly_on_a_signal_and_the_printed_command_resumes(cli_config, sig, code):
    """The signal goes to the whole process group, data-loader worker included, as
    Ctrl-C in a terminal and a scheduler's SIGTERM deliver it (a worker killed by
    SIGTERM used to fail the run with rc 1 instead of a clean stop)."""
    path, tmp = cli_config
    out = tmp / f"run_{sig.name}"
    log = tmp / f"{sig.name}.log"
    args = ["pretrain", "--config", str(path), "--set", f"output_dir={out}"]
    args += ["--set", "num_workers=1"]
    proc = _start(_cli(*args), log)
    _wait_for(log, "step 2/100000", proc)
    os.killpg(proc.pid, sig)  # its own session: the test's process group is spared
    assert proc.wait(timeout=300) == code
    text = log.read_text()
    assert "Traceback" not in text
    assert f"stopped by {sig.name}" in text
    command = text.split("resume with:\n", 1)[1].strip().splitlines()[0]
    words = shlex.split(command)
    assert words[:2] == ["bulkfm", "pretrain"] and words[-1] == "--resume"
    assert f"output_dir={out}" in words
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1
    step = checkpoints[0][0]
    assert step >= 2 and f"after step {step};" in text
    if sig is signal.SIGINT:
        return  # one resumption is enough; SIGTERM's below

    # The printed command, run as printed (with a nearer end so the test finishes).
    log2 = tmp / "resume.log"
    resumed = _start(_cli(*words[1:], "--set", f"optim.max_steps={step + 2}"), log2)
    assert resumed.wait(timeout=600) == 0, log2.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == step and summary["step"] == step + 2
    assert (out / "final" / "model.safetensors").is_file()
