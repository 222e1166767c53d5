"""Masked-LM pre-training of BulkRNABert, one code path from one CPU to many GPUs.

Distribution goes through HuggingFace accelerate: the same script runs as a plain
process, under ``torchrun`` or under ``accelerate launch`` (DDP by default). With
``fsdp: true`` the model is sharded with PyTorch FSDP2 (``fully_shard``) by this module,
on CPU gloo and GPUs alike: accelerate itself keeps DDP when there is no GPU, even when
its config asks for FSDP (that combination is an error here, not a silent DDP run).

Reproducibility is by construction rather than by luck:

- the data order is a seeded stream of per-epoch permutations, cut into global
  batches of ``micro_batch * world_size * accumulation`` samples;
- each sample's mask is seeded from ``(seed, epoch, sample index)``;
- the loss of a global batch is the sum of the target cross-entropies divided by
  the number of targets *in the whole global batch*, so the gradient does not
  depend on how the batch is split over processes or micro-steps.

So 1 process x micro batch 4 and 2 processes x micro batch 2 train the same
model, and a run resumed from a checkpoint ends where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bulkfm.errors import BulkfmError, CheckpointError, ConfigError
from bulkfm.io import check_output_dir, write_text
from bulkfm.train.config import PretrainConfig
from bulkfm.train.data import (
    EVAL_STREAM,
    TRAIN_STREAM,
    MaskedTokenDataset,
    PretrainData,
    StepBatchSampler,
    collate,
    eval_batches,
    prepare_pretrain_data,
)
from bulkfm.train.losses import masked_value_loss
from bulkfm.train.masking import IGNORE_INDEX, masked_lm_loss
from bulkfm.train.stream import prepare_streaming_data, read_into_memory

if TYPE_CHECKING:
    import anndata as ad
    from accelerate import Accelerator

    from bulkfm.models.bulkrnabert import BulkRNABert

logger = logging.getLogger(__name__)

STATE_FORMAT = "bulkfm.pretrain_state/1"
CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
LOG_FILE = "log.csv"
LOG_COLUMNS = (
    "step",
    "epoch",
    "samples",
    "tokens",
    "loss",
    "lr",
    "grad_norm",
    "eval_loss",
    "eval_acc",
    "trivial_acc",
    "trivial_loss",
    "eval_acc_1bin",
    "trivial_acc_1bin",
    "elapsed_s",
)
_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
#: Signals that stop a run at the next optimiser-step boundary with a checkpoint.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
# Config entries that may change between a run and its resumption without changing
# what is being trained.
_RESUMABLE_CHANGES = {
    "output_dir",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_every",
    "eval_batch_size",
    "log_every",
    "progress_every_s",
    "tensorboard",
    "num_workers",
    "optim.max_steps",
    "data.path",
    "data.streaming",  # streamed and in-memory runs draw the same batches
}


@dataclass
class PretrainResult:
    """What a run produced; ``to_dict`` is what ``summary.json`` holds."""

    output_dir: Path
    final_dir: Path | None
    step: int
    samples_seen: int
    tokens_seen: int
    train_loss: float | None
    eval: dict[str, float] = field(default_factory=dict)
    initial_eval: dict[str, float] = field(default_factory=dict)
    n_genes: int = 0
    n_train: int = 0
    n_eval: int = 0
    grad_accum_steps: int = 1
    world_size: int = 1
    global_batch_size: int = 0
    mixed_precision: str = "no"
    resumed_from: int | None = None
    stopped_early: bool = False
    interrupted_by: str | None = None
    elapsed_s: float = 0.0
    log_path: Path | None = None
    gene_selection: dict[str, Any] = field(default_factory=dict)
    gene_init: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("output_dir", "final_dir", "log_path"):
            out[key] = None if out[key] is None else str(out[key])
        return out


class TrainingInterrupted(BulkfmError):
    """SIGINT (Ctrl-C) or SIGTERM stopped pre-training at an optimiser-step boundary.

    Raised after the checkpoint of that step is written, so nothing trained is lost:
    ``pretrain(config, resume=True)`` (``bulkfm pretrain ... --resume``) continues where
    the run stopped and ends where an uninterrupted one would. ``exit_code`` is the
    shell's convention for death by that signal (128 + number: 130 for SIGINT, 143 for
    SIGTERM), so a scheduler sees the run was stopped rather than that it failed.
    """

    def __init__(
        self, signal_name: str, exit_code: int, step: int, checkpoint: Path | None
    ) -> None:
        self.signal_name = signal_name
        self.exit_code = exit_code
        self.step = step
        self.checkpoint = checkpoint
        if checkpoint is None:
            saved = "no checkpoint was written yet (stopped before the first step)"
        else:
            saved = f"checkpoint of step {step} in {checkpoint}"
        super().__init__(
            f"pre-training stopped by {signal_name} after step {step}; {saved}; continue "
            "with --resume (pretrain(config, resume=True))"
        )


class _StopOnSignal:
    """Turns SIGINT/SIGTERM into a request to stop at the next step boundary.

    A training step is never cut in half: the loop polls :attr:`requested` between
    optimiser steps, writes a checkpoint and raises :class:`TrainingInterrupted`. A
    second signal of the same kind gives up on the clean stop and acts as the previous
    handler would (Ctrl-C twice raises ``KeyboardInterrupt`` at once). Handlers are
    installed only in the main thread (Python allows no other) and the previous ones
    are restored on exit, so the Python API leaves the process as it found it.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if self.enabled:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if self.requested == sig:
            previous = self._previous.pop(sig, None)
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            logger.warning("%s again: stopping now, without a checkpoint", sig.name)
            signal.raise_signal(sig)
            return
        self.requested = sig
        logger.warning(
            "%s received: finishing this optimiser step, then writing a checkpoint and "
            "stopping (send it again to stop at once, without saving)",
            sig.name,
        )


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``, ``250`` -> ``"4m10s"``, ``9.4`` -> ``"9s"``."""
    if not math.isfinite(seconds):
        return "?"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class ProgressReporter:
    """One plain progress line now and then, readable on any console or log file.

    tqdm draws a bar only on a terminal; a job whose output goes to a file or a
    scheduler's log would otherwise say nothing for hours. A line is due on the first
    step of this session, the last step, and whenever ``every_s`` seconds have passed
    since the previous line. Speed and ETA use this session's wall time per step,
    evaluations and checkpoints included, so the ETA is what the user will wait.
    """

    def __init__(
        self,
        *,
        max_steps: int,
        start_step: int,
        tokens_per_step: int,
        every_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_steps = max_steps
        self.start_step = start_step
        self.tokens_per_step = tokens_per_step
        self.every_s = every_s
        self.clock = clock
        self.started = clock()
        self._last: float | None = None

    def line(self, step: int, loss: float) -> str | None:
        """The progress line for ``step`` if one is due, else None."""
        now = self.clock()
        due = self._last is None or step >= self.max_steps or now - self._last >= self.every_s
        if not due:
            return None
        self._last = now
        elapsed = now - self.started
        done = step - self.start_step
        per_step = elapsed / done if done > 0 else math.nan
        speed = self.tokens_per_step / per_step if per_step > 0 else math.nan
        eta = per_step * (self.max_steps - step)
        return (
            f"step {step}/{self.max_steps} ({step / self.max_steps:.0%}) | loss {loss:.4f} | "
            f"{speed:,.0f} tokens/s | elapsed {format_duration(elapsed)} | "
            f"ETA {format_duration(eta)}"
        )


# ---------------------------------------------------------------------- schedule
def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier before optimiser step ``step`` (0-based): linear warm-up to 1, then a
    half cosine down to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm parameters (1-D) are not decayed, as in BERT."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    opt = config.optim
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": opt.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=opt.lr,
        betas=opt.betas,
        eps=opt.eps,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: PretrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    opt = config.optim

    def factor(step: int) -> float:
        return warmup_cosine(
            step,
            warmup_steps=opt.warmup_steps,
            max_steps=opt.max_steps,
            min_ratio=opt.min_lr_ratio,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_mixed_precision(requested: str) -> str:
    """bf16 autocast only where the hardware runs it natively; otherwise fp32.

    CPUs without native bf16 (no AVX512-BF16/AMX) emulate it, which is several times
    slower than fp32, so there the request is turned down with a warning.
    """
    if requested != "bf16":
        return "no"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16"
        logger.warning("mixed_precision=bf16 asked for but this GPU lacks bf16; using fp32")
        return "no"
    if torch.backends.mps.is_available():
        logger.warning("bf16 autocast is not used on MPS; training in fp32")
        return "no"
    if _cpu_has_native_bf16():
        return "bf16"
    logger.warning("mixed_precision=bf16 asked for but this CPU has no native bf16; using fp32")
    return "no"


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _distributed_without_gpu() -> bool:
    """True under torchrun/accelerate launch on a machine without CUDA: accelerate then
    needs ``cpu=True`` to pick the gloo backend instead of ignoring the launcher."""
    launched = os.environ.get("LOCAL_RANK") is not None or int(os.environ.get("WORLD_SIZE", 1)) > 1
    return launched and not torch.cuda.is_available()


def _make_accelerator(precision: str, accum: int, world: int, *, cpu: bool) -> Accelerator:
    """An Accelerator; in a single process a second run may change the precision.

    accelerate keeps one global state per process and refuses a new precision; a
    notebook user running two configs one after the other should not have to restart,
    so the (non-distributed) state is reset and built again.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    try:
        return Accelerator(mixed_precision=precision, gradient_accumulation_steps=accum, cpu=cpu)
    except ValueError as exc:
        if world > 1 or "already been initialized" not in str(exc):
            raise
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=accum, cpu=cpu)


# ---------------------------------------------------------------------- model
def build_model(config: PretrainConfig, n_genes: int) -> BulkRNABert:
    from bulkfm.models.bulkrnabert import BulkRNABert

    model_config = dataclasses.replace(
        config.model, n_genes=n_genes, gradient_checkpointing=config.gradient_checkpointing
    )
    return BulkRNABert(model_config)


def init_gene_embedding(
    model: BulkRNABert, config: PretrainConfig, data: PretrainData, adata: ad.AnnData | None
) -> dict[str, Any]:
    """Set a fresh model's gene embedding as ``config.gene_init`` says; returns the report.

    ``random`` without ``rescale_std`` leaves the model's own draw untouched, so a config
    without ``gene_init`` trains exactly the weights it always did. ``coexpression`` reads
    training samples only (:func:`bulkfm.models.gene_init.coexpression_rows`: all of
    them up to ``COEXPRESSION_MAX_ROWS``, else a seeded sample), over the model's genes in
    tokenizer order, with the missing mask; a streamed run reads them from disk in blocks.
    """
    from bulkfm.models import gene_init

    section = config.gene_init
    if section.method == "random":
        report: dict[str, Any] = {
            "method": "random",
            "n_genes": data.n_genes,
            "dim": model.config.init_gene_embed_dim,
            "std": 0.02,
            "source": "the model's own initialisation (from seed)",
        }
        if section.rescale_std is not None:
            report.update(gene_init.rescale_gene_embeddings(model, section.rescale_std))
        return report
    if section.method == "gene2vec":
        return gene_init.init_gene_embeddings(
            model,
            "gene2vec",
            genes=data.genes,
            gene2vec_path=section.gene2vec_path,
            gene2vec_md5=section.gene2vec_md5,
            seed=config.seed,
            rescale_std=section.rescale_std,
        )
    rows = gene_init.coexpression_rows(data.train_idx, seed=config.seed)
    values, missing = _training_tpm(data, adata, config, rows)
    report = gene_init.init_gene_embeddings(
        model,
        "coexpression",
        X_tpm=values,
        missing=missing,
        seed=config.seed,
        rescale_std=section.rescale_std,
    )
    report["samples"] = (
        f"all {data.n_train} training samples"
        if len(rows) == data.n_train
        else f"{len(rows)} of {data.n_train} training samples (seeded sample)"
    )
    return report


def _training_tpm(
    data: PretrainData, adata: ad.AnnData | None, config: PretrainConfig, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """TPM and missing mask of ``rows`` x the model's genes, read a block at a time from
    the file (streamed) or the AnnData (in memory)."""
    import scipy.sparse as sp

    from bulkfm.train.data import expression_matrix, missing_mask
    from bulkfm.train.stream import StreamingTokens

    tokens = data.tokens
    if isinstance(tokens, StreamingTokens):
        values, mask, cols = tokens.values, tokens.missing, tokens.columns
    else:
        if adata is None:
            raise ConfigError(
                "gene_init.method=coexpression reads the training TPM: pass the AnnData "
                "pre-trained on (adata=), or set gene_init.method=random"
            )
        values = expression_matrix(adata, config.data.layer)
        mask = missing_mask(adata, config.data.missing_layer)
        if data.gene_selection is not None:
            cols = data.gene_selection.columns
        else:
            cols = adata.var_names.get_indexer(data.genes)

    def read(matrix: Any) -> np.ndarray:
        blocks = []
        for start in range(0, len(rows), 512):
            chunk = rows[start : start + 512]
            if isinstance(matrix, np.ndarray):  # only the model's genes are copied
                blocks.append(matrix[np.ix_(chunk, cols)])
                continue
            block = matrix[chunk]
            block = block.toarray() if sp.issparse(block) else np.asarray(block)
            blocks.append(block[:, cols])
        return np.concatenate(blocks)

    try:
        return read(values), None if mask is None else read(mask).astype(bool)
    finally:
        if isinstance(tokens, StreamingTokens):
            tokens.close()  # reopened by whichever process (or worker) reads next


# ---------------------------------------------------------------------- logging
class RunLog:
    """CSV log (always) and TensorBoard (when asked for and installed); main process only."""

    def __init__(self, output_dir: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.path = output_dir / LOG_FILE
        self.enabled = enabled
        self._writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning(
                    "tensorboard=true but the tensorboard package is not installed "
                    "(pip install 'bulkfm[tensorboard]'); logging to CSV only"
                )
            else:
                self._writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def start(self, keep_until_step: int | None) -> None:
        """New log, or on resume the old one cut back to the checkpoint's step (a killed
        run may have logged steps the resumed run will redo)."""
        if not self.enabled:
            return
        rows: list[dict[str, str]] = []
        if keep_until_step is not None and self.path.exists():
            with self.path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= keep_until_step]
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in LOG_COLUMNS} for r in rows)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=LOG_COLUMNS).writerow(
                {k: _fmt(row.get(k)) for k in LOG_COLUMNS}
            )
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and value is not None:
                    self._writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def read_log(path: str | Path) -> list[dict[str, float | None]]:
    """The CSV log as a list of rows with floats (empty cells -> None)."""
    with Path(path).open(newline="") as handle:
        return [
            {k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]


# ---------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, path), oldest first. Half-written ones live under a
    ``.tmp-`` name until renamed, so they are never listed."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _genes_digest(genes: list[str]) -> str:
    return hashlib.sha256("\n".join(genes).encode()).hexdigest()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def _is_fsdp(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


FSDP_DIR = "fsdp"  # torch.distributed.checkpoint shards of an FSDP2 run, in a checkpoint
CONSOLIDATED_DIR = "consolidated"


def _is_fsdp2(model: torch.nn.Module) -> bool:
    """Sharded by :func:`shard_model` (PyTorch FSDP2), not by accelerate."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _fsdp_requested_from_accelerate() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def _check_fsdp_launch(config: PretrainConfig, accelerator: Accelerator) -> None:
    """Refuse the launches where the FSDP asked for is not the one that would run."""
    if _fsdp_requested_from_accelerate() and not _is_fsdp(accelerator):
        raise ConfigError(
            "accelerate was asked for FSDP (accelerate launch --use_fsdp, or an accelerate "
            f"config with distributed_type: FSDP) but it runs {accelerator.distributed_type.value} "
            "here: accelerate keeps DDP without GPUs. Launch without accelerate's FSDP and set "
            "fsdp: true (--set fsdp=true): bulkfm then shards the model with PyTorch FSDP2"
        )
    if config.fsdp and _is_fsdp(accelerator):
        raise ConfigError(
            "FSDP was asked for twice: by accelerate's config (distributed_type: FSDP) and by "
            "fsdp: true. Keep one: drop --use_fsdp from accelerate launch, or set fsdp: false"
        )


def shard_model(model: torch.nn.Module, device: torch.device, precision: str) -> None:
    """Shard ``model`` in place over the default process group with FSDP2.

    Each transformer block is its own unit (its weights are gathered only while it runs),
    the embeddings and the LM head are the root unit. Gradients are reduce-scattered
    and averaged over processes like DDP's all-reduce, so the loss scaling of
    :func:`_optimizer_step` gives the same update as one process. With ``bf16`` the
    weights are cast for compute and gradients reduced in float32.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16"
        else MixedPrecisionPolicy()
    )
    for block in model.transformer_layers:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _plain_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimiser inside accelerate's wrapper (what torch.distributed reads)."""
    return getattr(optimizer, "optimizer", optimizer)


def _full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights on the main process (FSDP2: gathered, others get an empty dict)."""
    if _is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights: dict[str, torch.Tensor] = get_model_state_dict(model, options=options)  # type: ignore[assignment]
        return weights
    return accelerator.get_state_dict(model)


def _save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process writes its shards of weights and optimiser state (torch DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _plain_optimizer(optimizer))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))


def check_shards(checkpoint: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Check a checkpoint's FSDP2 shards (``fsdp/``) without loading them: the
    ``.metadata`` index reads, every shard file it names is there and long enough for
    the bytes it indexes, and (given ``shapes``: parameter name -> full shape) the
    weights it holds are those of the model. Raises :class:`DamagedCheckpointError`
    naming the file. Works in any process, with or without a process group.

    torch.distributed.checkpoint keeps no checksums, so changed bytes inside a shard of
    the right length are found only when loading (:func:`_load_sharded` reports them).
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    shards = checkpoint / FSDP_DIR
    index = f"{FSDP_DIR}/.metadata"
    if not (shards / ".metadata").is_file():
        raise DamagedCheckpointError(checkpoint, index, "the file is missing")
    try:
        metadata = FileSystemReader(str(shards)).read_metadata()
        stored = metadata.storage_data
        entries = metadata.state_dict_metadata
        needed: dict[str, int] = {}
        for info in stored.values():
            end = int(info.offset) + int(info.length)
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    except Exception as exc:  # pickle, EOF, attribute errors: all mean an unreadable index
        raise DamagedCheckpointError(
            checkpoint, index, f"unreadable ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    for name, end in sorted(needed.items()):
        file = shards / name
        if not file.is_file():
            raise DamagedCheckpointError(
                checkpoint, f"{FSDP_DIR}/{name}", "the file is missing (one process's shards)"
            )
        size = file.stat().st_size
        if size < end:
            raise DamagedCheckpointError(
                checkpoint,
                f"{FSDP_DIR}/{name}",
                f"truncated: {size} bytes, but the index places data up to byte {end}",
            )
    if shapes is None:
        return
    saved = {
        key.removeprefix("model."): tuple(meta.size)
        for key, meta in entries.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    misfit = _shape_misfit({k: tuple(v) for k, v in shapes.items()}, saved)
    if misfit:
        raise DamagedCheckpointError(checkpoint, index, f"the shards {misfit}")


def _shape_misfit(
    expected: Mapping[str, tuple[int, ...]], saved: Mapping[str, tuple[int, ...]]
) -> str | None:
    """How stored tensors fail to fit the model (names first, then shapes), or None."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        return f"do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
    for key, shape in expected.items():
        if tuple(saved[key]) != tuple(shape):
            return f"do not fit the model: tensor {key!r} has shape {saved[key]}, the model {shape}"
    return None


def _dcp_failure(exc: BaseException) -> str:
    """One line per process from torch.distributed.checkpoint's error (its
    ``CheckpointException`` holds each process's exception and traceback)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        found = [(f"rank {rank}: ", failure[0]) for rank, failure in sorted(failures.items())]
    else:
        found = [("", exc)]
    lines = []
    for where, error in found:
        text = str(error).strip()
        first = text.splitlines()[0].split(". ")[0] if text else ""
        lines.append(f"{where}{type(error).__name__}: {first[:200]}")
    return "; ".join(lines)


def _model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shapes of the weights; an FSDP2 DTensor's shape is the full one."""
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read DCP shards into an FSDP2 model and its optimiser; DCP reshards, so the
    process count may differ from the run that wrote them.

    A failure (e.g. a shard whose bytes changed, or optimiser entries that do not fit)
    is raised as :class:`DamagedCheckpointError` on every process alike (DCP gathers
    the processes' errors), so resumption falls back to an older checkpoint together;
    that one overwrites every weight and optimiser entry, whatever was read here.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    plain = _plain_optimizer(optimizer)
    model_sd, optim_sd = get_state_dict(model, plain)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))  # in place
    except (Exception, CheckpointException) as exc:  # the latter is a BaseException
        raise DamagedCheckpointError(
            folder.parent, FSDP_DIR, f"the shards could not be loaded ({_dcp_failure(exc)})"
        ) from exc
    set_state_dict(model, plain, model_state_dict=model_sd, optim_state_dict=optim_sd)


def consolidate_checkpoint(checkpoint: str | Path, output_dir: str | Path | None = None) -> Path:
    """A plain model folder (config.json, model.safetensors, tokenizer.json) from the
    FSDP2 shards of ``checkpoint``, in one process without a process group.

    Only the weights are read (not the optimiser state). ``output_dir`` defaults to
    ``<checkpoint>/consolidated``; it is written beside and renamed into place, and an
    existing one is replaced only if it is empty or a model folder. The result loads
    with :func:`bulkfm.models.bulkrnabert.load_pretrained` and ``bulkfm embed --model``.
    A checkpoint that is already a model folder (a DDP run's) is returned as it is.
    The command line: ``bulkfm pretrain consolidate CHECKPOINT [-o OUT]``. Damaged
    shards raise :class:`DamagedCheckpointError` naming the file (:func:`check_shards`).
    """
    import torch.distributed.checkpoint as dcp

    from bulkfm.models.bulkrnabert import WEIGHTS_FILE, BulkRNABert, read_config
    from bulkfm.tokenize import BinTokenizer

    path = Path(checkpoint)
    shards = path / FSDP_DIR
    if not shards.is_dir():
        if (path / WEIGHTS_FILE).is_file():
            return path
        latest = find_latest_checkpoint(path)
        hint = (
            f"this is a run's output folder; its newest checkpoint is {latest}"
            if latest is not None
            else f"give a folder under {CHECKPOINT_DIR}/ of a pre-training run"
        )
        raise CheckpointError(
            f"{path} holds neither FSDP shards ({FSDP_DIR}/) nor {WEIGHTS_FILE}: not a "
            f"pre-training checkpoint; {hint}"
        )
    out = Path(output_dir) if output_dir is not None else path / CONSOLIDATED_DIR
    _check_replaceable(out)
    model = BulkRNABert(read_config(path))
    check_shards(path, _model_shapes(model))
    state = {"model": model.state_dict()}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(shards), no_dist=True)
    except (Exception, CheckpointException) as exc:  # the latter is a BaseException
        raise DamagedCheckpointError(
            path, FSDP_DIR, f"the shards could not be loaded ({_dcp_failure(exc)})"
        ) from exc
    model.load_state_dict(state["model"])
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, tokenizer=BinTokenizer.load(path))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info("consolidated %s into %s", path, out)
    return out


def _check_replaceable(out: Path) -> None:
    """``out`` may receive a consolidated model: absent, an empty folder, or a model folder
    (config.json + model.safetensors, e.g. an earlier consolidation), which is replaced.
    Anything else is refused rather than deleted."""
    from bulkfm.errors import OutputPathError
    from bulkfm.models.bulkrnabert import CONFIG_FILE, WEIGHTS_FILE

    check_output_dir(out, flag="-o / output_dir=")
    model_folder = (out / CONFIG_FILE).is_file() and (out / WEIGHTS_FILE).is_file()
    if out.is_dir() and any(out.iterdir()) and not model_folder:
        raise OutputPathError(
            f"output folder {out} (set by -o / output_dir=) exists and is not a "
            "model folder; it would be replaced, so give -o a new or empty folder"
        )


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    np_state = np.random.get_state()  # noqa: NPY002 (global state is what we restore)
    assert isinstance(np_state, tuple)  # the legacy form, which set_state takes back
    py_state = random.getstate()
    plain = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np_state, py_state = _parse_rng_plain(plain)
    np.random.set_state(np_state)  # noqa: NPY002
    random.setstate(py_state)


def _parse_rng_plain(plain: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """numpy's and Python's generator states from their JSON form (raises TypeError,
    ValueError, KeyError or IndexError on anything else)."""
    name, keys, pos, has_gauss, gauss = plain["numpy"]
    np_state = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)
    version, internal, gauss_next = plain["python"]
    return np_state, (version, tuple(internal), gauss_next)


def save_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    output_dir: Path,
    *,
    keep: int,
    tokenizer: Any = None,
) -> Path:
    """Write ``checkpoints/step_N`` atomically: everything goes to a temporary folder that
    is renamed only once complete, so a kill leaves either the old set or the new one.

    Weights are saved unwrapped (safetensors) and the optimiser state as plain tensors,
    so a DDP checkpoint resumes on any number of processes. FSDP2 (``fsdp: true``)
    shards go to ``fsdp/`` through torch.distributed.checkpoint, one file per process,
    and resume on any number of processes; :func:`consolidate_checkpoint` turns them
    into a model folder. accelerate's own FSDP (GPUs) uses its ``save_state``. A
    non-FSDP checkpoint is also a model folder (config.json + model.safetensors +
    tokenizer.json), loadable like ``final/``.
    """
    from safetensors.torch import save_file

    step = int(state["step"])
    root = output_dir / CHECKPOINT_DIR
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    if _is_fsdp(accelerator):
        accelerator.save_state(str(tmp / "accelerate"))
    elif _is_fsdp2(model):
        _save_sharded(model, optimizer, tmp / FSDP_DIR)
        if accelerator.is_main_process:  # config.json: what consolidate_checkpoint builds
            from bulkfm.models.bulkrnabert import CONFIG_FILE

            model_config = accelerator.unwrap_model(model).config.to_dict()
            (tmp / CONFIG_FILE).write_text(json.dumps(model_config, indent=1) + "\n")
    else:
        weights = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            save_file(
                {k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors")
            )
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            # config.json beside the weights (and tokenizer.json below) make every
            # checkpoint a model folder: BulkRNABert.from_pretrained, `bulkfm embed
            # --model checkpoints/step_N`, ... load it like final/.
            from bulkfm.models.bulkrnabert import CONFIG_FILE

            model_config = accelerator.unwrap_model(model).config.to_dict()
            (tmp / CONFIG_FILE).write_text(json.dumps(model_config, indent=1) + "\n")
    rng_tensors, rng_plain = _rng_state()
    rank = accelerator.process_index
    save_file(rng_tensors, str(tmp / f"rng_rank{rank}.safetensors"))
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(rng_plain))
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s written", final)
    accelerator.wait_for_everyone()
    return final


class DamagedCheckpointError(CheckpointError):
    """One checkpoint folder cannot be used: a file is missing, unreadable or disagrees
    with the others. Resumption then falls back to the checkpoint before it."""

    def __init__(self, path: Path, file: str, problem: str) -> None:
        self.path = path
        self.file = file
        self.problem = problem
        super().__init__(f"{path / file}: {problem}")


@dataclass
class _LoadedCheckpoint:
    """Everything a checkpoint holds, read and checked before any of it is applied."""

    path: Path
    state: dict[str, Any]
    weights: dict[str, torch.Tensor] | None  # None: FSDP shards (accelerate loads them)
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any]
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None  # None: process count changed


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_text())
    except FileNotFoundError:
        raise DamagedCheckpointError(path, name, "the file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpointError(path, name, f"not readable JSON ({exc})") from exc


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``, checked against the folder's ``step_N`` name."""
    name = "trainer_state.json"
    state = _read_json(path, name)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise DamagedCheckpointError(
            path,
            name,
            f"not a bulkfm pre-training state (format {found!r}, expected {STATE_FORMAT!r})",
        )
    for key in ("step", "samples_seen"):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DamagedCheckpointError(
                path, name, f"{key!r} is {value!r}, not a non-negative integer"
            )
    if not isinstance(state.get("config"), dict) or not isinstance(state.get("genes_sha256"), str):
        raise DamagedCheckpointError(path, name, "the saved config or gene digest is missing")
    match = _CHECKPOINT_RE.match(path.name)
    if match and int(match.group(1)) != state["step"]:
        raise DamagedCheckpointError(
            path,
            name,
            f"says step {state['step']} but the folder is {path.name} (step "
            f"{int(match.group(1))}); the state does not belong to this checkpoint",
        )
    return state


def _read_weights(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "model.safetensors"
    if not (path / name).is_file():
        raise DamagedCheckpointError(path, name, "the file is missing")
    try:
        weights = load_file(str(path / name))
    except Exception as exc:  # safetensors raises its own (Rust) error types
        raise DamagedCheckpointError(path, name, f"unreadable ({exc})") from exc
    expected = model.state_dict()
    misfit = _shape_misfit(
        {k: tuple(v.shape) for k, v in expected.items()},
        {k: tuple(v.shape) for k, v in weights.items()},
    )
    if misfit:
        raise DamagedCheckpointError(path, name, misfit)
    for key, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DamagedCheckpointError(path, name, f"tensor {key!r} holds NaN or inf values")
    return weights


def _torch_load_weights_only(path: Path, name: str) -> Any:
    """``torch.load(weights_only=True)``; a file holding other objects is refused outright
    (never loaded with ``weights_only=False``), a damaged one reported as damaged."""
    import pickle

    file = path / name
    if not file.is_file():
        raise DamagedCheckpointError(path, name, "the file is missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights only load failed" not in text.lower() or "Unsupported operand" in text:
            # not a pickle of foreign objects: bytes that are no pickle at all
            raise DamagedCheckpointError(path, name, "unreadable (not a torch file)") from exc
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{file} contains objects{what} that a weights-only load refuses: bulkfm saves "
            "only tensors there, so this file was not written by bulkfm and may run code "
            "when unpickled. bulkfm never unpickles untrusted code; delete this output "
            "directory's checkpoints folder (or choose a new output_dir) and start the run "
            "afresh without --resume"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, ... here
        first = str(exc).splitlines()[0].split(". ")[0] if str(exc) else ""
        raise DamagedCheckpointError(
            path, name, f"unreadable ({type(exc).__name__}: {first[:200]})"
        ) from exc


def _read_optimizer(path: Path, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    name = "optimizer.pt"
    saved = _torch_load_weights_only(path, name)
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    per_param = saved.get("state") if isinstance(saved, dict) else None
    current = optimizer.param_groups
    if (
        not isinstance(groups, list)
        or not isinstance(per_param, dict)
        or len(groups) != len(current)
        or any(
            not isinstance(g, dict) or len(g.get("params", ())) != len(c["params"])
            for g, c in zip(groups, current, strict=False)
        )
    ):
        raise DamagedCheckpointError(
            path, name, "its parameter groups do not match the model's optimiser"
        )
    for group, cur in zip(groups, current, strict=True):
        for index, param in zip(group["params"], cur["params"], strict=True):
            entry = per_param.get(index)
            if entry is None:
                continue
            for key, value in entry.items():
                if key == "step":
                    if int(value) != step:
                        raise DamagedCheckpointError(
                            path,
                            name,
                            f"the optimiser has taken {int(value)} steps but the trainer "
                            f"state says {step}; the files come from different steps",
                        )
                elif isinstance(value, torch.Tensor) and value.shape != param.shape:
                    raise DamagedCheckpointError(
                        path,
                        name,
                        f"state {key!r} has shape {tuple(value.shape)}, its "
                        f"parameter {tuple(param.shape)}",
                    )
    return saved


def _read_scheduler(path: Path, n_groups: int, step: int) -> dict[str, Any]:
    name = "scheduler.json"
    saved = _read_json(path, name)
    last = saved.get("last_epoch") if isinstance(saved, dict) else None
    if (
        not isinstance(last, int)
        or not isinstance(saved.get("base_lrs"), list)
        or len(saved["base_lrs"]) != n_groups
    ):
        raise DamagedCheckpointError(path, name, "not a learning-rate scheduler state")
    if last != step:
        raise DamagedCheckpointError(
            path,
            name,
            f"the schedule is at step {last} but the trainer state says {step}; the files "
            "come from different steps",
        )
    return saved


def _read_rng(path: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    name = f"rng_rank{rank}.safetensors"
    if not (path / name).is_file():
        raise DamagedCheckpointError(path, name, "the file is missing")
    try:
        tensors = load_file(str(path / name))
        torch.Generator().set_state(tensors["torch"])
    except Exception as exc:  # safetensors' own errors, KeyError, RuntimeError
        raise DamagedCheckpointError(path, name, f"unreadable ({exc!r})") from exc
    name = f"rng_rank{rank}.json"
    plain = _read_json(path, name)
    try:
        np_state, py_state = _parse_rng_plain(plain)
        np.random.RandomState().set_state(np_state)  # a throwaway generator: a check only
        random.Random().setstate(py_state)
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise DamagedCheckpointError(path, name, f"not a random-number state ({exc})") from exc
    return tensors, plain


def read_checkpoint(
    path: Path,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    state: dict[str, Any] | None = None,
) -> _LoadedCheckpoint:
    """Read and check every file of a checkpoint without changing any state.

    Raises :class:`DamagedCheckpointError` naming the first file that is missing,
    unreadable or inconsistent with the others (its step, the model's shapes).
    """
    if state is None:
        state = read_trainer_state(path)
    step = int(state["step"])
    weights = optim = None
    if (path / "accelerate").is_dir():
        if not _is_fsdp(accelerator):
            raise CheckpointError(
                f"{path} holds FSDP shards; resume it under the same FSDP accelerate config"
            )
    elif (path / FSDP_DIR).is_dir():
        if not _is_fsdp2(model):
            raise CheckpointError(
                f"{path} holds FSDP2 shards (fsdp: true); resume it with --set fsdp=true "
                "under a launch of 2 or more processes (any number), or make a model folder "
                f"of it with `bulkfm pretrain consolidate {path}`"
            )
        check_shards(path, _model_shapes(model))
    elif _is_fsdp2(model):
        raise CheckpointError(
            f"{path} was written without FSDP; resume it with fsdp: false (--set fsdp=false)"
        )
    else:
        weights = _read_weights(path, accelerator.unwrap_model(model))
        optim = _read_optimizer(path, optimizer, step)
    scheduler = _read_scheduler(path, len(optimizer.param_groups), step)
    rng = None
    if state.get("world_size") == accelerator.num_processes:
        # every rank's file, so all processes agree on whether this checkpoint is intact
        for rank in range(accelerator.num_processes):
            read = _read_rng(path, rank)
            if rank == accelerator.process_index:
                rng = read
    return _LoadedCheckpoint(path, state, weights, optim, scheduler, rng)


def _apply_checkpoint(
    loaded: _LoadedCheckpoint,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    if loaded.weights is None and _is_fsdp2(model):
        _load_sharded(model, optimizer, loaded.path / FSDP_DIR)
    elif loaded.weights is None:
        accelerator.load_state(str(loaded.path / "accelerate"))
    else:
        accelerator.unwrap_model(model).load_state_dict(loaded.weights)
        assert loaded.optimizer is not None
        optimizer.load_state_dict(loaded.optimizer)
    scheduler.load_state_dict(loaded.scheduler)
    if loaded.rng is not None:
        _set_rng_state(*loaded.rng)
    else:
        logger.warning("process count changed since the checkpoint: RNG states not restored")


def load_checkpoint(
    path: Path,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the trainer state.

    Every file is read and checked first (:func:`read_checkpoint`), so a damaged
    checkpoint raises :class:`DamagedCheckpointError` with nothing loaded.
    """
    loaded = read_checkpoint(path, accelerator, model, optimizer)
    _apply_checkpoint(loaded, accelerator, model, optimizer, scheduler)
    return loaded.state


def _checkpoint_folders(output_dir: Path) -> list[Path]:
    """Every ``step_N`` folder, oldest first, complete or not (resumption checks each)."""
    root = output_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), child)
        for child in root.iterdir()
        if (match := _CHECKPOINT_RE.match(child.name)) and child.is_dir()
    ]
    return [path for _, path in sorted(found)]


def _normalised_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config as this version writes it, so defaults resolved since (e.g.
    ``model.key_size``: null then, 16 now) do not read as changes; a config this version
    cannot parse is compared as saved."""
    try:
        return PretrainConfig.from_dict(saved).to_dict()
    except (ValueError, TypeError):  # ConfigError is a ValueError
        return saved


def _set_value(value: Any) -> str:
    """A config value as ``--set key=VALUE`` takes it."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _check_resumable(saved: dict[str, Any], config: PretrainConfig, genes: list[str]) -> None:
    old = _flatten(_normalised_config(saved.get("config", {})))
    new = _flatten(config.to_dict())
    changed = sorted(
        k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _RESUMABLE_CHANGES
    )
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        restore = " ".join(f"--set {k}={_set_value(old.get(k))}" for k in changed[:6])
        raise CheckpointError(
            f"the config differs from the checkpoint's in what is trained ({details}); "
            f"restore those values ({restore}) or start a new run in another output_dir "
            "(--set output_dir=NEW_DIR, without --resume)"
        )
    if saved.get("genes_sha256") != _genes_digest(genes):
        raise CheckpointError(
            "the gene list chosen from the data differs from the checkpoint's (was the data "
            "file changed?); resume with the same data or start a new output_dir"
        )


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: MaskedTokenDataset,
    batches: list[list[tuple[int, int]]],
    data: PretrainData,
    accelerator: Accelerator,
) -> dict[str, float]:
    """Held-out MLM loss and reconstruction accuracy on fixed masks, next to the trivial
    predictor (each gene's most frequent training bin) on the very same targets.

    ``*_acc_1bin`` also counts a prediction one bin off as right: a bin is only
    log10(1 + TPM) * 0.016 wide, narrower than the sampling noise of a low-count gene,
    so on small data the exact accuracy has a low ceiling for any predictor.
    """
    device = accelerator.device
    mode = torch.as_tensor(data.gene_mode, device=device)
    log_prob = torch.as_tensor(data.gene_log_prob, device=device)
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for keys in batches:
        batch = collate([dataset[k] for k in keys])
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        logits = model(input_ids).logits.float()
        selected = labels != IGNORE_INDEX
        target = labels[selected]
        gene = torch.arange(labels.shape[1], device=device).expand_as(labels)[selected]
        chosen = logits[selected]
        predicted = chosen.argmax(-1)
        sums[0] += F.cross_entropy(chosen, target, reduction="sum").double()
        sums[1] += (predicted == target).sum()
        sums[2] += (mode[gene] == target).sum()
        sums[3] += -log_prob[gene, target].double().sum()
        sums[4] += target.numel()
        sums[5] += ((predicted - target).abs() <= 1).sum()
        sums[6] += ((mode[gene] - target).abs() <= 1).sum()
    model.train(was_training)
    sums = accelerator.reduce(sums, reduction="sum")
    count = float(sums[4])
    if count == 0:
        return {}
    return {
        "eval_loss": float(sums[0]) / count,
        "eval_acc": float(sums[1]) / count,
        "trivial_acc": float(sums[2]) / count,
        "trivial_loss": float(sums[3]) / count,
        "eval_acc_1bin": float(sums[5]) / count,
        "trivial_acc_1bin": float(sums[6]) / count,
        "eval_targets": count,
    }


# ---------------------------------------------------------------------- training
@dataclass
class _Progress:
    step: int = 0
    samples_seen: int = 0


def _train_loader(
    data: PretrainData,
    config: PretrainConfig,
    accelerator: Accelerator,
    start_sample: int,
) -> Iterator[dict[str, torch.Tensor]]:
    dataset = MaskedTokenDataset(
        data.tokens,
        data.train_idx,
        n_bins=data.tokenizer.n_bins,
        mask_token_id=data.tokenizer.mask_token_id,
        seed=config.seed,
        stream=TRAIN_STREAM,
        masking=config.masking,
    )
    sampler = StepBatchSampler(
        data.n_train,
        seed=config.seed,
        micro_batch_size=config.optim.micro_batch_size,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        start_sample=start_sample,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=config.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        worker_init_fn=_ignore_stop_signals if config.num_workers else None,
    )
    return iter(loader)


def _ignore_stop_signals(worker_id: int) -> None:
    """Data-loader workers leave SIGINT/SIGTERM to the main process.

    Ctrl-C in a terminal and a scheduler's SIGTERM reach the whole process group; a
    worker that died of it would make the main process fail with "DataLoader worker
    exited unexpectedly" instead of stopping cleanly. The main process shuts the
    workers down when it is done.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: list[dict[str, torch.Tensor]],
    accelerator: Accelerator,
    max_grad_norm: float | None,
    value_weight: float = 0.0,
) -> tuple[float, float | None]:
    """One optimiser step over this process's micro-batches; returns (global loss, grad norm).

    Each micro-batch loss is ``sum CE * world * accum / N_global``: accelerate divides by
    ``accum`` and DDP averages over ``world``, so the applied gradient is exactly
    ``sum over the global batch / N_global``, the token mean of the whole step.
    """
    device = accelerator.device
    local_targets = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
    counts = torch.tensor([local_targets], dtype=torch.float64, device=device)
    n_global = float(accelerator.reduce(counts, reduction="sum")[0])
    scale = accelerator.num_processes * len(micro_batches) / max(n_global, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    grad_norm = None
    for mb in micro_batches:
        with accelerator.accumulate(model):
            logits = model(mb["input_ids"].to(device, non_blocking=True)).logits
            labels = mb["labels"].to(device, non_blocking=True)
            ce = masked_lm_loss(logits, labels, "sum")
            if value_weight:  # loss.value_weight: 0 = the paper's cross-entropy only
                ce = ce + value_weight * masked_value_loss(logits, labels, "sum")
            accelerator.backward(ce * scale)
            loss_sum += ce.detach().double()
            if accelerator.sync_gradients:
                if max_grad_norm is not None:
                    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor, reduce it
                        norm = norm.full_tensor()
                    grad_norm = float(norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
    total = float(accelerator.reduce(loss_sum.reshape(1), reduction="sum")[0])
    return total / max(n_global, 1.0), grad_norm


class _Run:
    """State of one pre-training run between set-up and the final save."""

    def __init__(
        self,
        config: PretrainConfig,
        data: PretrainData,
        cpu: bool,
        *,
        adata: ad.AnnData | None = None,
        fresh: bool = True,
    ) -> None:
        from accelerate.utils import set_seed

        self.started = time.perf_counter()
        self.config = config
        self.data = data
        self.output_dir = Path(config.output_dir)
        self.world = _process_count(cpu)
        self.accum = config.grad_accum_steps(data.n_genes, self.world)
        self.global_batch = config.optim.micro_batch_size * self.world * self.accum
        self.precision = resolve_mixed_precision(config.mixed_precision)
        self.accelerator = _make_accelerator(self.precision, self.accum, self.world, cpu=cpu)
        self.main = self.accelerator.is_main_process

        set_seed(config.seed)
        model = build_model(config, data.n_genes)
        # Once, on a fresh start; a resumed run's checkpoint holds the weights (and its
        # trainer_state.json this record). Main process first: a Gene2Vec URL downloads once.
        self.gene_init: dict[str, Any] = {}
        if fresh:
            with self.accelerator.main_process_first():
                self.gene_init = init_gene_embedding(model, config, data, adata)
        _check_fsdp_launch(config, self.accelerator)
        # Every process built the same weights from the seed; FSDP2 keeps its shard of them.
        self.sharded = config.fsdp and self.world > 1
        if config.fsdp and not self.sharded:
            logger.info("fsdp: true in one process: nothing to shard, training unsharded")
        if self.sharded:
            model.to(self.accelerator.device)
            shard_model(model, self.accelerator.device, self.precision)
        optimizer = build_optimizer(model, config)
        # Stepped by hand: accelerate's scheduler wrapper steps once per process, which
        # would make the schedule depend on the process count.
        self.scheduler = build_scheduler(optimizer, config)
        if self.sharded:  # accelerate would wrap it in DDP on CPU: only the optimiser
            self.model, self.optimizer = model, self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.progress = _Progress()
        self.resumed_from: int | None = None
        self.initial_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.loss: float | None = None
        self.eval_dataset = MaskedTokenDataset(
            data.tokens,
            data.eval_idx,
            n_bins=data.tokenizer.n_bins,
            mask_token_id=data.tokenizer.mask_token_id,
            seed=config.seed,
            stream=EVAL_STREAM,
            masking=config.masking,
        )
        self.eval_plan = eval_batches(
            data.n_eval,
            config.eval_batch_size or config.optim.micro_batch_size,
            self.world,
            self.accelerator.process_index,
        )
        self.log = RunLog(self.output_dir, enabled=self.main, tensorboard=config.tensorboard)

    # ------------------------------------------------------------------ pieces
    def resume(self) -> None:
        """Continue from the newest intact checkpoint in ``output_dir``.

        A checkpoint with a missing, unreadable or inconsistent file is skipped with a
        warning that names the file, and the one before it is tried; every file is
        checked before any state is loaded. FSDP2 shards are checked by their index and
        file lengths (:func:`check_shards`); one that still fails to load is skipped the
        same way, on every process, and the older checkpoint overwrites what it read. A
        config that changed what is trained (:func:`_check_resumable`) is an error before
        any weights are read.
        """
        root = self.output_dir / CHECKPOINT_DIR
        candidates = _checkpoint_folders(self.output_dir)
        if not candidates:
            logger.warning("no checkpoint in %s: starting from scratch", self.output_dir)
            return
        skipped: list[str] = []
        for path in reversed(candidates):
            try:
                state = read_trainer_state(path)
                # before any weights are read: a changed model config would otherwise
                # surface as a tensor shape mismatch
                _check_resumable(state, self.config, self.data.genes)
                loaded = read_checkpoint(
                    path, self.accelerator, self.model, self.optimizer, state=state
                )
                # FSDP2 shards are read here, and may only now turn out damaged
                _apply_checkpoint(
                    loaded, self.accelerator, self.model, self.optimizer, self.scheduler
                )
            except DamagedCheckpointError as exc:
                skipped.append(str(exc))
                logger.warning(
                    "checkpoint %s is damaged and skipped: %s (%s); trying an older one",
                    path.name,
                    exc.file,
                    exc.problem,
                )
                continue
            self._resumed(loaded.state, path)
            if skipped:
                logger.warning(
                    "resumed from %s, the newest intact checkpoint (%d skipped)",
                    path,
                    len(skipped),
                )
            return
        raise CheckpointError(
            f"no intact checkpoint to resume from in {root}: {'; '.join(skipped)}. Start "
            f"afresh: delete {root} and run `bulkfm pretrain` again without --resume, or "
            "choose a new output_dir (--set output_dir=NEW_DIR)"
        )

    def _resumed(self, saved: dict[str, Any], checkpoint: Path) -> None:
        self.progress = _Progress(int(saved["step"]), int(saved["samples_seen"]))
        self.resumed_from = self.progress.step
        self.gene_init = dict(saved.get("gene_init", {}))  # what the fresh start did
        self.accelerator.step = 0  # checkpoints are taken at optimiser-step boundaries
        if saved.get("global_batch_size") != self.global_batch:
            logger.warning(
                "global batch changed from %s to %d samples since the checkpoint",
                saved.get("global_batch_size"),
                self.global_batch,
            )
        logger.info("resumed from %s (step %d)", checkpoint, self.progress.step)

    def evaluate(self) -> dict[str, float]:
        if not self.data.n_eval:
            return {}
        return evaluate(self.model, self.eval_dataset, self.eval_plan, self.data, self.accelerator)

    def trainer_state(self) -> dict[str, Any]:
        data, progress = self.data, self.progress
        epoch, position = divmod(progress.samples_seen, data.n_train)
        return {
            "format": STATE_FORMAT,
            "step": progress.step,
            "samples_seen": progress.samples_seen,
            "epoch": epoch,
            "position_in_epoch": position,
            "tokens_seen": progress.samples_seen * data.n_genes,
            "world_size": self.world,
            "micro_batch_size": self.config.optim.micro_batch_size,
            "grad_accum_steps": self.accum,
            "global_batch_size": self.global_batch,
            "n_genes": data.n_genes,
            "genes_sha256": _genes_digest(data.genes),
            "config": self.config.to_dict(),
            "gene_init": self.gene_init,
        }

    def log_row(self, **values: Any) -> None:
        seen = self.progress.samples_seen
        self.log.write(
            {
                "step": self.progress.step,
                "epoch": round(seen / self.data.n_train, 4),
                "samples": seen,
                "tokens": seen * self.data.n_genes,
                "elapsed_s": round(time.perf_counter() - self.started, 3),
                **values,
            }
        )

    def checkpoint(self) -> None:
        save_checkpoint(
            self.accelerator,
            self.model,
            self.optimizer,
            self.scheduler,
            self.trainer_state(),
            self.output_dir,
            keep=self.config.keep_checkpoints,
            tokenizer=self.data.tokenizer,
        )

    # ------------------------------------------------------------------ phases
    def start(self) -> None:
        if self.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.config.to_yaml(), self.output_dir / "config.yaml")
            self.data.tokenizer.save(self.output_dir)
            if self.data.gene_selection is not None:
                self.data.gene_selection.write_excluded(self.output_dir)
        self.log.start(keep_until_step=self.resumed_from)
        logger.info(
            "pre-training: %d genes, %d process(es) x micro batch %d x %d accumulation = %d "
            "samples (%d tokens) per step, precision %s",
            self.data.n_genes,
            self.world,
            self.config.optim.micro_batch_size,
            self.accum,
            self.global_batch,
            self.global_batch * self.data.n_genes,
            self.precision,
        )
        if self.resumed_from is None:
            self.initial_eval = self.last_eval = self.evaluate()
            self.log_row(lr=self.scheduler.get_last_lr()[0], **self.initial_eval)

    def stop_requested(self, stop: _StopOnSignal) -> signal.Signals | None:
        """The signal that asked this run to stop, agreed by every process.

        Ranks may receive a signal a step apart; the flag is reduced over processes so
        all of them stop after the same step and write one checkpoint together.
        """
        local = stop.requested
        if self.world == 1:
            return local
        flag = torch.tensor([0 if local is None else int(local)], device=self.accelerator.device)
        agreed = int(self.accelerator.reduce(flag, reduction="sum")[0])
        if agreed == 0:
            return None
        return local or signal.SIGTERM

    def interrupted(self, sig: signal.Signals, saved_now: bool) -> TrainingInterrupted:
        """Write the checkpoint of the current step (unless just written) and describe it."""
        step = self.progress.step
        checkpoint = None
        if step > 0:
            if not saved_now:
                self.checkpoint()
            checkpoint = self.output_dir / CHECKPOINT_DIR / f"step_{step:07d}"
        elif (latest := find_latest_checkpoint(self.output_dir)) is not None:
            checkpoint = latest
        exc = TrainingInterrupted(sig.name, 128 + int(sig), step, checkpoint)
        logger.warning("%s", exc)
        return exc

    def train(self, stop_after: int | None, stop: _StopOnSignal | None = None) -> bool:
        """Optimiser steps up to ``max_steps``; True when stopped early by ``stop_after``.

        Raises :class:`TrainingInterrupted` (after a checkpoint) when ``stop`` saw SIGINT
        or SIGTERM.
        """
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        stop = stop or _StopOnSignal(enabled=False)
        config, progress = self.config, self.progress
        max_steps = config.optim.max_steps
        if progress.step < max_steps and (sig := self.stop_requested(stop)) is not None:
            raise self.interrupted(sig, saved_now=True)
        batches = _train_loader(self.data, config, self.accelerator, progress.samples_seen)
        bar = tqdm(
            total=max_steps,
            initial=progress.step,
            desc="pretrain",
            unit="step",
            disable=None if self.main else True,
        )
        reporter = ProgressReporter(
            max_steps=max_steps,
            start_step=progress.step,
            tokens_per_step=self.global_batch * self.data.n_genes,
            every_s=config.progress_every_s,
        )
        # On a terminal the bar and the log lines share stderr: route log lines
        # through tqdm.write so they print above the bar instead of through it.
        redirect = logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext()
        self.model.train()
        with contextlib.closing(bar), redirect:
            while progress.step < max_steps:
                micro_batches = [next(batches) for _ in range(self.accum)]
                lr = self.scheduler.get_last_lr()[0]
                self.loss, grad_norm = _optimizer_step(
                    self.model,
                    self.optimizer,
                    self.scheduler,
                    micro_batches,
                    self.accelerator,
                    config.optim.max_grad_norm,
                    config.loss.value_weight,
                )
                progress.step += 1
                progress.samples_seen += self.global_batch
                if not math.isfinite(self.loss):
                    raise ConfigError(
                        f"the training loss became {self.loss} at step {progress.step}; lower "
                        "optim.lr, keep optim.max_grad_norm set, or use mixed_precision: 'no'"
                    )
                last = progress.step == max_steps
                metrics = self.evaluate() if last or progress.step % config.eval_every == 0 else {}
                if metrics:
                    self.last_eval = metrics
                if metrics or progress.step % config.log_every == 0:
                    self.log_row(loss=self.loss, lr=lr, grad_norm=grad_norm, **metrics)
                self.report(reporter, metrics)
                bar.update(1)
                postfix = {"loss": f"{self.loss:.4f}"}
                if "eval_acc" in metrics:
                    postfix["acc"] = f"{metrics['eval_acc']:.3f}"
                bar.set_postfix(postfix)
                saved = last or progress.step % config.checkpoint_every == 0
                if saved:
                    self.checkpoint()
                if not last and (sig := self.stop_requested(stop)) is not None:
                    raise self.interrupted(sig, saved_now=saved)
                if stop_after is not None and progress.step >= stop_after and not last:
                    return True
        return False

    def report(self, reporter: ProgressReporter, metrics: dict[str, float]) -> None:
        """The periodic progress line, and every held-out evaluation (main process)."""
        if not self.main:
            return
        assert self.loss is not None
        line = reporter.line(self.progress.step, self.loss)
        if line is not None:
            logger.info("%s", line)
        if "eval_acc" in metrics:
            logger.info(
                "step %d held-out masked genes: loss %.4f (trivial %.4f), accuracy %.3f "
                "(trivial %.3f), within one bin %.3f (trivial %.3f)",
                self.progress.step,
                metrics["eval_loss"],
                metrics["trivial_loss"],
                metrics["eval_acc"],
                metrics["trivial_acc"],
                metrics["eval_acc_1bin"],
                metrics["trivial_acc_1bin"],
            )

    def result(self, final_dir: Path | None, stopped: bool) -> PretrainResult:
        data, progress = self.data, self.progress
        return PretrainResult(
            output_dir=self.output_dir,
            final_dir=final_dir,
            step=progress.step,
            samples_seen=progress.samples_seen,
            tokens_seen=progress.samples_seen * data.n_genes,
            train_loss=self.loss,
            eval=self.last_eval,
            initial_eval=self.initial_eval,
            n_genes=data.n_genes,
            n_train=data.n_train,
            n_eval=data.n_eval,
            grad_accum_steps=self.accum,
            world_size=self.world,
            global_batch_size=self.global_batch,
            mixed_precision=self.precision,
            resumed_from=self.resumed_from,
            stopped_early=stopped,
            elapsed_s=round(time.perf_counter() - self.started, 3),
            log_path=self.log.path,
            gene_selection=dict(data.info.get("gene_selection", {})),
            gene_init=dict(self.gene_init),
        )


def _process_count(cpu: bool) -> int:
    from accelerate import PartialState

    return PartialState(cpu=cpu).num_processes


def pretrain(
    config: PretrainConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    adata: ad.AnnData | None = None,
    handle_signals: bool = True,
) -> PretrainResult:
    """Run (or resume) MLM pre-training as configured; returns a summary.

    ``resume``: continue from the newest complete checkpoint in ``output_dir`` (a fresh
    start when there is none). ``stop_after``: stop right after that optimiser step, as
    if the process were killed there (no final save); used to test resumption.
    ``adata``: use this AnnData instead of reading ``config.data.path``.
    ``handle_signals``: while training, SIGINT (Ctrl-C, a notebook's interrupt) and
    SIGTERM finish the current optimiser step, write a checkpoint and raise
    :class:`TrainingInterrupted`; the previous handlers are restored on return.

    Progress (step, loss, tokens/s, ETA) is logged at INFO on the ``bulkfm.train.pretrain``
    logger every ``config.progress_every_s`` seconds, on any console.
    """
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    output_dir = check_output_dir(config.output_dir, flag="--set output_dir= / output_dir=")
    if not resume and list_checkpoints(output_dir):
        raise ConfigError(
            f"{output_dir} already holds checkpoints; pass --resume (resume=True) to continue "
            "that run, or choose another output_dir"
        )
    if config.data.streaming:  # the matrix stays on disk; same genes, tokens and batches
        data = prepare_streaming_data(
            config.data,
            seed=config.seed,
            n_bins=config.model.n_expressions_bins,
            path=_streamed_path(adata),
        )
    else:
        if adata is None:  # an .h5ad, or ARCHS4 / parquet shards read through their source
            adata = read_into_memory(config.data)
        data = prepare_pretrain_data(
            adata, config.data, seed=config.seed, n_bins=config.model.n_expressions_bins
        )

    fresh = not (resume and _checkpoint_folders(output_dir))  # else the checkpoint's weights
    run = _Run(config, data, cpu=_distributed_without_gpu(), adata=adata, fresh=fresh)
    if resume:
        run.resume()
    with _StopOnSignal(enabled=handle_signals) as stop:
        run.start()
        try:
            stopped = run.train(stop_after, stop)
        finally:
            run.log.close()
        final_dir = None
        if not stopped:
            if not run.last_eval:  # resumed from the last step: nothing evaluated yet
                run.last_eval = run.evaluate()
            final_dir = _save_final(run.accelerator, run.model, config, data, output_dir)
    result = run.result(final_dir, stopped)
    if run.main and not stopped:
        write_text(json.dumps(result.to_dict(), indent=1) + "\n", output_dir / "summary.json")
    run.accelerator.wait_for_everyone()
    return result


def _streamed_path(adata: ad.AnnData | None) -> Path | None:
    """The file a streamed run reads: ``data.path`` (None), or that of a backed ``adata``."""
    if adata is None:
        return None
    if not adata.isbacked or adata.filename is None:
        raise ConfigError(
            "data.streaming reads samples from a file, but an in-memory AnnData was passed; "
            "pass a backed one (anndata.read_h5ad(path, backed='r')) or none (data.path is "
            "read), or set data.streaming=false"
        )
    return Path(adata.filename)


def _save_final(
    accelerator: Accelerator,
    model: torch.nn.Module,
    config: PretrainConfig,
    data: PretrainData,
    output_dir: Path,
) -> Path:
    """``model.save_pretrained(out/final, tokenizer=...)`` from a full (gathered) copy,
    written beside and renamed into place."""
    weights = _full_state_dict(accelerator, model)
    final = output_dir / FINAL_DIR
    if accelerator.is_main_process:
        fresh = build_model(config, data.n_genes)
        fresh.load_state_dict({k: v.detach().cpu() for k, v in weights.items()})
        tmp = output_dir / f".{FINAL_DIR}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        fresh.save_pretrained(tmp, tokenizer=data.tokenizer)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        logger.info("final model written to %s", final)
    accelerator.wait_for_everyone()
    return final
