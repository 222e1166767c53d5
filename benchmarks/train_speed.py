"""Training-step speed and peak memory of BulkRNABert: MLM pre-training, IA3
fine-tuning, and whether the data loader keeps the device busy.

Each configuration runs in a fresh process (its own peak RSS):

- ``mlm``: one optimiser step of masked-LM pre-training (15% of genes selected, BERT
  80/10/10 corruption, cross-entropy over the bins at the targets, AdamW over all
  6M parameters) at each gene count, with and without gradient checkpointing;
- ``ia3``: one step of IA3 fine-tuning as ``bulkfm.train.finetune`` runs it (encoder
  -> mean over genes -> classification head; only the IA3 vectors and the head
  train) at full length (19,062 genes), batch 1;
- ``loader``: a short MLM training loop fed by the pre-training data pipeline
  (``MaskedTokenDataset`` masking on the fly, ``StepBatchSampler``, ``DataLoader``),
  timing the wait for each batch against the compute of each step.

Reported per step: seconds, tokens (batch x genes) per second, model FLOPs (MLM: 3x the
forward; IA3: frozen weights get no weight gradients, so 3x the attention and 2x the
dense part), achieved FLOP/s and their ratio to the dense matmul FLOP/s measured in the
same process, and peak RSS. Gradient checkpointing recomputes the forward in the
backward; its FLOP/s still count model FLOPs only (the usual MFU convention), so its
ratio shows what the recomputation costs.

- ``scale`` (``--processes 1 2``): the real ``bulkfm pretrain`` under ``torchrun`` with 1,
  then 2, ... processes (gloo on CPU, NCCL on GPUs), streaming a simulated ``.h5ad``
  (``data.streaming: true``) with the same micro batch per process; reported: tokens/s
  per process from ``log.csv`` (first step left out as warm-up) and the scaling
  efficiency, per-process rate with N processes over the rate of one.

With ``--device cuda`` the report ends with the projected wall time of the paper's token
budget (12e9 tokens, ``PAPER_TOKENS``) on ``--gpus`` GPUs from the measured per-GPU
MLM rate at the largest gene count. ``--loader-source stream`` feeds the loader from an
uncompressed ``.h5ad`` on disk (``StreamingTokens``: read, tokenise and mask per sample);
``--loader-source gzip`` from one compressed as ``bulkfm data build`` writes it (gzip, in
chunks of whole rows, ``bulkfm.io.row_chunks``, for a file of ``--loader-file-samples`` rows).

Every report also ends with an **estimate, not a measurement**, usable without a GPU: the
model FLOPs of the token budget over (dense bf16 peak of a named GPU x an assumed MFU band)
on 1 and more GPUs, with an assumed multi-GPU scaling efficiency
(``--estimate-gpu``, ``--mfu``, ``--assumed-efficiency``). ``--config`` takes the model
shape, the gene count and the token budget (steps x samples per step x genes) from a
pre-training YAML; ``--estimate-only`` skips every measurement.

CPU:
    python benchmarks/train_speed.py                       # 1,024 .. 19,062 genes
    python benchmarks/train_speed.py --genes 1024 --ia3-genes 0 --loader-genes 0 \
        --processes 1 2 --threads 1                        # scaling 1 -> 2 processes
    python benchmarks/train_speed.py --genes 4096 --checkpointing on
    python benchmarks/train_speed.py --config configs/pretrain_paper_gpu.yaml \
        --estimate-only                                    # time-to-train estimate only
    python benchmarks/train_speed.py --config configs/pretrain_paper_gpu.yaml \
        --checkpointing off --ia3-genes 0 --loader-source gzip --loader-batch-size 1
GPU (bf16 autocast, flash attention via SDPA, MFU against the bf16 peak):
    python benchmarks/train_speed.py --device cuda --batch-size 8 [--compile]
    python benchmarks/train_speed.py --device cuda --config configs/pretrain_paper_gpu.yaml \
        --batch-size 20 --checkpointing off --ia3-genes 0 --loader-source gzip
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

SCRIPT = Path(__file__).resolve()
DEFAULT_GENES = (1024, 4096, 8192, 19062)
SMOKE_GENES = (48, 96)
WARM_GENES = 256
#: The paper's pre-training budget: "12B tokens in all" (/work/shared/docs/bulkrnabert.md).
PAPER_TOKENS = 12e9
DEFAULT_GPUS = (1, 8, 64)
#: GPUs the estimate names; their dense bf16 peaks come from
#: ``_common.GPU_BF16_PEAK_TFLOPS``: NVIDIA data sheets, A100 SXM "BF16 Tensor Core 312
#: TFLOPS"; H100 SXM and H200 "BF16 Tensor Core 1,979 TFLOPS" with 2:4 sparsity, i.e.
#: 989.4 dense (sparsity is never used here).
ESTIMATE_GPUS = ("A100", "H100", "H200")
#: Assumed model-FLOP utilisation band of the estimate (not measured for this model).
DEFAULT_MFU = (0.25, 0.45)
#: Assumed per-GPU rate with several GPUs over the rate of one (not measured on GPUs; the
#: 1 -> 2 process efficiency measured on CPU with gloo does not carry over to NCCL).
ASSUMED_EFFICIENCY = 0.9
#: Samples of the paper's pre-training set, TCGA 11,274 + GTEx/ENCODE 20,406
#: (/work/shared/docs/bulkrnabert.md, "Pre-training (paper)"): the row count whose
#: chunking ``--loader-source gzip`` reproduces.
PAPER_SAMPLES = 11_274 + 20_406


# --------------------------------------------------------------------------- child side
def model_config(
    n_genes: int, checkpointing: bool, smoke: bool, model: dict[str, Any] | None = None
) -> Any:
    """The benchmarked architecture: ``model`` (fields of a config's ``model:`` section)
    or the official one, at ``n_genes`` genes; ``smoke`` shrinks it for tests."""
    from bulkfm.models.config import BulkRNABertConfig

    kw: dict[str, Any] = {**(model or {}), "n_genes": n_genes}
    kw["gradient_checkpointing"] = checkpointing
    if smoke:
        kw.update(embed_dim=32, num_attention_heads=4, ffn_embed_dim=64, num_layers=2)
        kw.update(init_gene_embed_dim=24)
    return BulkRNABertConfig(**kw)


def masked_batch(tokens: Any, step: int, n_bins: int) -> tuple[Any, Any]:
    from bulkfm.train.masking import mask_tokens, sample_generator

    masked = mask_tokens(
        tokens,
        mask_token_id=n_bins,
        n_bins=n_bins,
        generator=sample_generator(0, 0, step, 0),
    )
    return masked.input_ids, masked.labels


class MLMStep:
    """fwd + masked-LM loss + bwd + AdamW step, as ``bulkfm.train.pretrain`` does it."""

    def __init__(self, model: Any, device: str, compile_model: bool) -> None:
        import torch

        self.model = model
        self.device = device
        self.forward = torch.compile(model) if compile_model else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def __call__(self, input_ids: Any, labels: Any, gene_index: Any = None) -> float:
        import torch

        from bulkfm.train.masking import masked_lm_loss

        with torch.autocast(
            device_type="cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"
        ):
            logits = self.forward(input_ids, gene_index=gene_index).logits
        loss = masked_lm_loss(logits, labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def _random_tokens(batch: int, n_genes: int, seed: int, device: str = "cpu") -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (batch, n_genes), generator=gen).to(device)


def child_mlm(payload: dict[str, Any]) -> dict[str, Any]:
    torch = common.setup_torch(payload["threads"], payload["device"])
    from bulkfm.models.bulkrnabert import BulkRNABert

    device, n_genes, batch = payload["device"], payload["genes"], payload["batch_size"]
    torch.manual_seed(payload["seed"])
    config = model_config(n_genes, payload["checkpointing"], payload["smoke"], payload.get("model"))
    model = BulkRNABert(config).to(device).train()
    step = MLMStep(model, device, payload.get("compile", False))
    bins = config.n_expressions_bins
    base_rss = common.current_rss_mb()
    # Warm-up on a short gene prefix (threads, kernels, AdamW state) unless compiling,
    # where the real shape must be traced once.
    warm = n_genes if payload.get("compile") else min(n_genes, WARM_GENES)
    ids, labels = masked_batch(_random_tokens(batch, warm, 1), 0, bins)
    subset = None if warm == n_genes else torch.arange(warm, device=device)
    step(ids.to(device), labels.to(device), subset)
    common.synchronize(device)
    common.reset_device_peak(device)
    batches = [
        tuple(t.to(device) for t in masked_batch(_random_tokens(batch, n_genes, 2 + i), i, bins))
        for i in range(payload["max_reps"])
    ]
    losses: list[float] = []

    def timed() -> common.Timing:
        return common.timed_reps(
            lambda: losses.append(step(*batches[len(losses)])),
            budget_s=payload["budget_s"],
            min_reps=payload["min_reps"],
            max_reps=payload["max_reps"],
            device=device,
        )

    timing, gemm, gemm_n = common.measure_around(timed, device, payload["smoke"])
    # The attention operators, read with the profiler on the warm-up batch after the
    # timing, so that its buffers stay out of the measured peak.
    kernels = common.attention_kernels(lambda: step(ids.to(device), labels.to(device), subset))
    fwd = common.model_flops(config, n_genes, batch, lm_head=True)
    step_flops = 3 * fwd.total
    return {
        **common.device_info(device),
        "times_s": timing.wall,
        "cpu_s": timing.cpu,
        "losses": losses,
        "base_rss_mb": base_rss,
        **common.memory_fields(timing),
        "device_peak_mb": common.device_peak_memory_mb(device),
        "step_flops": step_flops,
        "flops": fwd.as_dict(),
        "attention_kernels": kernels,
        **common.rates(step_flops, timing, gemm, gemm_n, torch.get_num_threads(), device),
    }


def child_ia3(payload: dict[str, Any]) -> dict[str, Any]:
    torch = common.setup_torch(payload["threads"], payload["device"])
    import torch.nn.functional as F

    from bulkfm.models.bulkrnabert import BulkRNABert
    from bulkfm.models.heads import classification_head
    from bulkfm.models.ia3 import apply_ia3, get_adapter_params, set_trainable_params
    from bulkfm.train.finetune import FinetuneNetwork

    device, n_genes, batch = payload["device"], payload["genes"], payload["batch_size"]
    torch.manual_seed(payload["seed"])
    config = model_config(n_genes, payload["checkpointing"], payload["smoke"], payload.get("model"))
    network = FinetuneNetwork(BulkRNABert(config), classification_head(config.embed_dim, 4))
    apply_ia3(network)
    head = {n: p for n, p in network.named_parameters() if n.startswith("head.")}
    set_trainable_params(network, {**get_adapter_params(network), **head})
    network.to(device).train()
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    labels = torch.arange(batch, device=device) % 4
    gpu = device == "cuda"

    def one_step(tokens: Any, gene_index: Any = None) -> float:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=gpu):
            if gene_index is None:
                logits = network(tokens)
            else:  # warm-up on a gene subset: FinetuneNetwork needs the full length
                out = network.encoder(tokens, gene_index=gene_index, output_hidden_states=True)
                logits = network.head(out.hidden_states[network.depth].mean(dim=1))
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    base_rss = common.current_rss_mb()
    warm = min(n_genes, WARM_GENES)
    one_step(_random_tokens(batch, warm, 1, device), torch.arange(warm, device=device))
    common.synchronize(device)
    common.reset_device_peak(device)
    tokens = _random_tokens(batch, n_genes, 2, device)

    def timed() -> common.Timing:
        return common.timed_reps(
            lambda: one_step(tokens),
            budget_s=payload["budget_s"],
            min_reps=payload["min_reps"],
            max_reps=payload["max_reps"],
            device=device,
        )

    timing, gemm, gemm_n = common.measure_around(timed, device, payload["smoke"])
    fwd = common.model_flops(config, n_genes, batch, lm_head=True)
    # No weight gradients in the frozen encoder: backward = input gradients only
    # (1x dense, 2x attention: dQ, dK, dV and dP are four products against two).
    step_flops = 3 * fwd.attention + 2 * fwd.dense
    return {
        **common.device_info(device),
        "times_s": timing.wall,
        "cpu_s": timing.cpu,
        "base_rss_mb": base_rss,
        **common.memory_fields(timing),
        "device_peak_mb": common.device_peak_memory_mb(device),
        "step_flops": step_flops,
        "flops": fwd.as_dict(),
        "trainable_params": sum(p.numel() for p in trainable),
        **common.rates(step_flops, timing, gemm, gemm_n, torch.get_num_threads(), device),
    }


def child_loader(payload: dict[str, Any]) -> dict[str, Any]:
    torch = common.setup_torch(payload["threads"], payload["device"])
    import numpy as np
    from torch.utils.data import DataLoader

    from bulkfm.models.bulkrnabert import BulkRNABert
    from bulkfm.tokenize import BinTokenizer, TokenizerConfig
    from bulkfm.train.data import MaskedTokenDataset, StepBatchSampler, collate

    device, n_genes, batch = payload["device"], payload["genes"], payload["batch_size"]
    steps, source = payload["steps"], payload.get("source", "memory")
    chunks = None
    if source == "gzip":  # the chunks data build gives a file of that many samples
        chunks = gzip_chunks(payload.get("file_samples", PAPER_SAMPLES), n_genes)
    n_samples = max(64, (steps + 1) * batch, chunks[0] if chunks else 0)
    rng = np.random.default_rng(0)
    tpm = rng.lognormal(1.0, 2.0, (n_samples, n_genes)).astype(np.float32)
    tpm[rng.random(tpm.shape) < 0.3] = 0.0
    genes = [f"G{i}" for i in range(n_genes)]
    tokenizer = BinTokenizer(TokenizerConfig(genes=genes, normalization_factor=5.547))
    folder = tempfile.TemporaryDirectory()
    if source in ("stream", "gzip"):  # read and tokenised per sample from disk
        from bulkfm.train.stream import DiskMatrix, StreamingTokens

        path = Path(folder.name) / "loader.h5ad"
        write_loader_h5ad(path, tpm, chunks)
        tokens: Any = StreamingTokens(DiskMatrix(path, "X"), None, np.arange(n_genes), tokenizer)
    else:
        tokens = tokenizer.encode(tpm).astype(np.int16)  # as prepare_pretrain_data stores them
    del tpm
    dataset = MaskedTokenDataset(tokens, np.arange(n_samples), n_bins=64, mask_token_id=64, seed=0)
    sampler = StepBatchSampler(n_samples, seed=0, micro_batch_size=batch)
    workers = payload["workers"]
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device == "cuda",
        persistent_workers=workers > 0,
    )
    torch.manual_seed(payload["seed"])

    def step(ids: Any, labels: Any) -> None:  # --loader-model off: the data time alone
        return None

    if payload.get("loader_model", True):
        config = model_config(n_genes, False, payload["smoke"], payload.get("model"))
        model = BulkRNABert(config).to(device).train()
        step = MLMStep(model, device, payload.get("compile", False))  # type: ignore[assignment]
    batches = iter(loader)
    data_s: list[float] = []
    compute_s: list[float] = []
    for i in range(steps + 1):  # step 0 warms up (workers start, kernels load)
        start = time.perf_counter()
        item = next(batches)
        ids = item["input_ids"].to(device, non_blocking=True)
        labels = item["labels"].to(device, non_blocking=True)
        fetched = time.perf_counter()
        step(ids, labels)
        common.synchronize(device)
        done = time.perf_counter()
        if i:
            data_s.append(fetched - start)
            compute_s.append(done - fetched)
    folder.cleanup()
    return {
        **common.device_info(device),
        "chunks": list(chunks) if chunks else None,
        "model_step": payload.get("loader_model", True),
        "data_s": data_s,
        "compute_s": compute_s,
        "data_fraction": sum(data_s) / (sum(data_s) + sum(compute_s)),
        "data_s_per_sample": sum(data_s) / (len(data_s) * batch),
    }


def gzip_chunks(n_samples: int, n_genes: int) -> tuple[int, int]:
    """The chunk shape of a gzip-compressed float32 ``n_samples x n_genes`` X as ``bulkfm
    data build`` writes it (``bulkfm.io.write_h5ad``: whole rows, ``row_chunks``)."""
    from bulkfm.io import row_chunks

    return row_chunks(n_samples, n_genes)


def write_loader_h5ad(path: Path, tpm: Any, chunks: tuple[int, int] | None) -> None:
    """An ``.h5ad`` with X = ``tpm``: uncompressed (anndata's default), or gzip in ``chunks``."""
    import anndata as ad
    import h5py

    ad.AnnData(tpm).write_h5ad(path)
    if chunks is not None:
        with h5py.File(path, "a") as f:
            del f["X"]
            ad.io.write_elem(f, "X", tpm, dataset_kwargs={"compression": "gzip", "chunks": chunks})


def child(payload: dict[str, Any]) -> dict[str, Any]:
    kinds = {"mlm": child_mlm, "ia3": child_ia3, "loader": child_loader}
    return kinds[payload["kind"]](payload)


# --------------------------------------------------------------------------- parent side
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--genes", type=int, nargs="+", default=None, help="MLM gene counts (0: no MLM rows)"
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--checkpointing", choices=("off", "on", "both"), default="both", help="MLM runs"
    )
    p.add_argument("--ia3-genes", type=int, default=None, help="0 skips IA3 (default 19062)")
    p.add_argument("--ia3-checkpointing", choices=("off", "on", "both"), default="off")
    p.add_argument("--loader-genes", type=int, default=None, help="0 skips (default 4096)")
    p.add_argument("--loader-steps", type=int, default=4)
    p.add_argument("--loader-batch-size", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="loader workers (cpu 0, gpu 4)")
    p.add_argument(
        "--loader-source",
        choices=("memory", "stream", "gzip"),
        default="memory",
        help="loader tokens: in memory, streamed from an uncompressed .h5ad, or from a gzip one "
        "as `bulkfm data build` writes it",
    )
    p.add_argument(
        "--loader-model",
        choices=("on", "off"),
        default="on",
        help="off: no training step in the loader loop, to time the loader alone over many "
        "steps where a full-length step is too slow (CPU)",
    )
    p.add_argument(
        "--loader-file-samples",
        type=int,
        default=PAPER_SAMPLES,
        help="gzip: rows of the file whose chunking is reproduced (default: the paper's "
        f"{PAPER_SAMPLES:,} pre-training samples)",
    )
    p.add_argument("--processes", type=int, nargs="+", default=None, help="scaling mode: e.g. 1 2")
    p.add_argument("--scaling-genes", type=int, default=1024, help="genes of the scaling runs")
    p.add_argument("--scaling-steps", type=int, default=6, help="optimiser steps per run")
    p.add_argument("--gpus", type=int, nargs="+", default=list(DEFAULT_GPUS), help="projection")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="pre-training YAML: model shape, gene count (data.top_k_variable_genes, else the "
        "official 19,062) and token budget (steps x samples per step x genes) of the report",
    )
    p.add_argument(
        "--estimate-only", action="store_true", help="print the GPU estimate, measure nothing"
    )
    p.add_argument(
        "--estimate-gpu",
        nargs="+",
        default=list(ESTIMATE_GPUS),
        help="GPUs named in the estimate (their bf16 peaks from _common)",
    )
    p.add_argument(
        "--mfu",
        type=float,
        nargs=2,
        default=list(DEFAULT_MFU),
        metavar=("LOW", "HIGH"),
        help="assumed model-FLOP utilisation band of the estimate",
    )
    p.add_argument(
        "--assumed-efficiency",
        type=float,
        default=ASSUMED_EFFICIENCY,
        help="assumed per-GPU rate with several GPUs over one GPU's, for the estimate",
    )
    common.add_run_arguments(
        p, budget_s=30.0, max_reps=3, timeout_s=3600.0, compile_help="torch.compile the model"
    )
    args = p.parse_args(argv)
    if not 0 < args.mfu[0] <= args.mfu[1] <= 1:
        p.error(f"--mfu {args.mfu[0]} {args.mfu[1]}: need 0 < LOW <= HIGH <= 1")
    if not 0 < args.assumed_efficiency <= 1:
        p.error(f"--assumed-efficiency {args.assumed_efficiency}: must lie in (0, 1]")
    unknown = [g for g in args.estimate_gpu if common.gpu_peak_tflops(g, None) is None]
    if unknown:
        known = ", ".join(k for k, _ in common.GPU_BF16_PEAK_TFLOPS)
        p.error(f"--estimate-gpu {' '.join(unknown)}: no bf16 peak known; choose from {known}")
    args.plan = plan_from(args.config) if args.config else None
    config_genes = args.plan["genes"] if args.plan else None
    if args.estimate_only:
        args.genes = [config_genes or DEFAULT_GENES[-1]] if args.genes is None else args.genes
        args.ia3_genes = args.loader_genes = 0
        args.processes = None
    if args.genes is None:
        args.genes = [config_genes] if config_genes else list(DEFAULT_GENES)
        if args.smoke:
            args.genes = list(SMOKE_GENES)
    if args.ia3_genes is None:
        args.ia3_genes = SMOKE_GENES[-1] if args.smoke else (config_genes or 19062)
    if args.loader_genes is None:
        args.loader_genes = SMOKE_GENES[-1] if args.smoke else (config_genes or 4096)
    if args.smoke:
        args.budget_s, args.max_reps, args.loader_steps = 0.0, 1, 2
        args.scaling_steps = min(args.scaling_steps, 3)
    return args


def _flags(choice: str) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[choice]


def plan_from(path: Path) -> dict[str, Any]:
    """What a pre-training YAML fixes for this report: the architecture (its ``model:``
    section), the gene count (``data.top_k_variable_genes``, else the official vocabulary
    the paper-scale recipe trains on) and the token budget, max_steps x the tokens of one
    optimiser step (accumulation sized for one process, as ``bulkfm pretrain`` sizes it)."""
    from bulkfm.models.config import BulkRNABertConfig
    from bulkfm.train.config import PretrainConfig

    config = PretrainConfig.from_yaml(path)
    genes = config.data.top_k_variable_genes or BulkRNABertConfig().n_genes
    model = config.model.to_dict()
    for run_key in ("n_genes", "gradient_checkpointing", "format"):
        model.pop(run_key)
    samples = config.grad_accum_steps(genes) * config.optim.micro_batch_size
    return {
        "config": str(path),
        "model": model,
        "genes": genes,
        "steps": config.optim.max_steps,
        "samples_per_step": samples,
        "micro_batch_size": config.optim.micro_batch_size,
        "total_tokens": float(config.optim.max_steps * samples * genes),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.estimate_only:
        report: dict[str, Any] = {"args": _args_record(args), "plan": args.plan}
        report["estimate"] = estimate_for(args, _estimate_genes(args), loader=None)
        print_estimate(report["estimate"])
        common.write_json(args.json, report)
        return report
    device = common.device_of(args.device, inline=args.inline)
    workers = args.workers if args.workers is not None else (4 if device == "cuda" else 0)
    print(common.machine_line(args.threads))
    if args.malloc_mmap_threshold:
        print(f"children run with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}")
    print(
        f"train_speed: device {device}, batch {args.batch_size}, genes {args.genes}, torch "
        f"threads {args.threads}" + (" (bf16 autocast)" if device == "cuda" else "")
    )
    base = {
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": device,
        "seed": args.seed,
        "smoke": args.smoke,
        "budget_s": args.budget_s,
        "min_reps": args.min_reps,
        "max_reps": args.max_reps,
        "compile": args.compile,
        "model": args.plan["model"] if args.plan else None,
    }
    plan = [
        {"kind": "mlm", "genes": g, "checkpointing": c}
        for g in args.genes
        if g
        for c in _flags(args.checkpointing)
    ]
    if args.ia3_genes:
        plan += [
            {"kind": "ia3", "genes": args.ia3_genes, "checkpointing": c}
            for c in _flags(args.ia3_checkpointing)
        ]
    rows = []
    for item in plan:
        res = common.run_config(
            child,
            SCRIPT,
            {**base, **item},
            inline=args.inline,
            timeout=args.timeout_s,
            env=common.malloc_env(args.malloc_mmap_threshold),
        )
        rows.append(summarise(res, args))
        print(f"  done: {_label(item)}: {_short(rows[-1])}", flush=True)
    loader = None
    if args.loader_genes:
        loader = common.run_config(
            child,
            SCRIPT,
            {
                **base,
                "kind": "loader",
                "genes": args.loader_genes,
                "batch_size": args.loader_batch_size,
                "steps": args.loader_steps,
                "workers": workers,
                "checkpointing": False,
                "source": args.loader_source,
                "file_samples": args.loader_file_samples,
                "loader_model": args.loader_model == "on",
            },
            inline=args.inline,
            timeout=args.timeout_s,
            env=common.malloc_env(args.malloc_mmap_threshold),
        )
    report = {"device": device, "args": _args_record(args), "plan": args.plan, "rows": rows}
    report["loader"] = loader
    report["scaling"] = scaling(rows)
    report["processes"] = process_scaling(args, device) if args.processes else []
    total = args.plan["total_tokens"] if args.plan else PAPER_TOKENS
    report["projection"] = (
        projection_for(report, args.gpus, total_tokens=total) if device == "cuda" else None
    )
    report["estimate"] = estimate_for(args, _estimate_genes(args), loader=loader)
    print_report(report, device)
    common.write_json(args.json, report)
    return report


def _estimate_genes(args: argparse.Namespace) -> int:
    """The config's gene count, else the largest MLM gene count, else the loader's."""
    if args.plan:
        return int(args.plan["genes"])
    return max(args.genes) or args.loader_genes or DEFAULT_GENES[-1]


def _args_record(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "plan"} | {
        "json": str(args.json),
        "config": str(args.config) if args.config else None,
    }


def _label(item: dict[str, Any]) -> str:
    return f"{item['kind']} @ {item['genes']} genes, checkpointing {item['checkpointing']}"


def summarise(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if "error" in res:
        return res
    t = common.median(res["times_s"])
    return {
        **res,
        "ckpt": "on" if res["checkpointing"] else "off",
        "s_per_step": t,
        "tokens_per_s": res["batch_size"] * res["genes"] / t,
        "gflop_per_step": res["step_flops"] / 1e9,
        **common.cost_fields(res, args.peak_tflops),
    }


def _short(row: dict[str, Any]) -> str:
    if "error" in row:
        return row["error"]
    return (
        f"{row['s_per_step']:.4g} s/step, {row['tokens_per_s']:.4g} tokens/s, "
        f"{row['ratio_to_gemm']:.2f} of matmul, peak {row['peak_mb']:.0f} MB"
    )


def scaling(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exponent of step time vs genes (smallest >= 4,096 to largest), per checkpointing."""
    out = []
    for ckpt in ("off", "on"):
        runs = sorted(
            (r for r in rows if r.get("kind") == "mlm" and r.get("ckpt") == ckpt),
            key=lambda r: r["genes"],
        )
        if len(runs) < 2:
            continue
        big = [r for r in runs if r["genes"] >= 4096]
        lo, hi = (big[0] if len(big) >= 2 else runs[0]), runs[-1]
        out.append(
            {
                "ckpt": ckpt,
                "from_genes": lo["genes"],
                "to_genes": hi["genes"],
                "measured": common.scaling_exponent(
                    lo["genes"], lo["s_per_step"], hi["genes"], hi["s_per_step"]
                ),
                "measured_cpu": common.scaling_exponent(
                    lo["genes"],
                    common.median(lo["cpu_s"]),
                    hi["genes"],
                    common.median(hi["cpu_s"]),
                ),
                "flops": common.scaling_exponent(
                    lo["genes"], lo["step_flops"], hi["genes"], hi["step_flops"]
                ),
            }
        )
    return out


# --------------------------------------------------------------------------- processes
def _scaling_config(args: argparse.Namespace, data: Path, out: Path, threads: int) -> str:
    """The pre-training config of one scaling run (no held-out split: steps only)."""
    from bulkfm.train.config import PretrainConfig

    model: dict[str, Any] = {}
    if args.smoke:
        model = dict(embed_dim=32, num_attention_heads=4, ffn_embed_dim=64, num_layers=2)
        model.update(init_gene_embed_dim=24)
    config = PretrainConfig.from_dict(
        {
            "model": model,
            "data": {"path": str(data), "streaming": True, "holdout_fraction": 0.0},
            "optim": {
                "max_steps": args.scaling_steps,
                "warmup_steps": 1,
                "micro_batch_size": args.batch_size,
            },
            "output_dir": str(out),
            "checkpoint_every": args.scaling_steps,
            "eval_every": args.scaling_steps,
            "progress_every_s": 3600.0,
            "num_threads": threads,
            "seed": args.seed,
        }
    )
    return config.to_yaml()


def tokens_per_second(log: list[dict[str, Any]]) -> float:
    """Tokens per second of the whole launch over the logged steps after the first."""
    steps = [r for r in log if r.get("loss") is not None]
    if len(steps) < 2:
        raise ValueError("need at least 2 logged training steps to time them")
    first, last = steps[0], steps[-1]
    return float((last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"]))


def process_scaling(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    """``bulkfm pretrain`` under ``torchrun --nproc_per_node P`` for each P in ``--processes``.

    Each process keeps ``--batch-size`` samples per micro-step and ``--threads`` torch
    threads (weak scaling: the global batch grows with P), so with perfect scaling every
    process keeps the one-process rate; efficiency = per-process rate / one-process rate.
    """
    from embed_memory import write_h5ad

    from bulkfm.train.pretrain import read_log

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = folder / "scaling.h5ad"
        n_samples = max(64, 2 * max(args.processes) * args.batch_size * args.scaling_steps)
        write_h5ad(data, n_samples, args.scaling_genes, seed=args.seed)
        for procs in sorted(set(args.processes)):
            out = folder / f"p{procs}"
            yaml = folder / f"p{procs}.yaml"
            yaml.write_text(_scaling_config(args, data, out, args.threads))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd += ["--nproc_per_node", str(procs), "-m", "bulkfm.cli", "pretrain"]
            cmd += ["--config", str(yaml)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            if device != "cuda":
                env["CUDA_VISIBLE_DEVICES"] = ""
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s
            )
            row: dict[str, Any] = {"processes": procs, "genes": args.scaling_genes}
            if proc.returncode != 0:
                row["error"] = proc.stderr[-2000:]
            else:
                rate = tokens_per_second(read_log(out / "log.csv"))
                row.update(tokens_per_s=rate, tokens_per_s_per_process=rate / procs)
            rows.append(row)
            print(f"  done: pretrain x {procs} process(es): {_short_scale(row)}", flush=True)
    base = next((r for r in rows if r["processes"] == 1 and "error" not in r), None)
    for row in rows:
        if base is not None and "error" not in row:
            row["efficiency"] = row["tokens_per_s_per_process"] / base["tokens_per_s_per_process"]
    return rows


def _short_scale(row: dict[str, Any]) -> str:
    if "error" in row:
        return "failed: " + row["error"].strip().splitlines()[-1]
    return f"{row['tokens_per_s_per_process']:.4g} tokens/s per process"


def projection(
    tokens_per_s_per_gpu: float,
    gpus: list[int] | tuple[int, ...],
    *,
    total_tokens: float = PAPER_TOKENS,
    efficiency: float = 1.0,
) -> list[dict[str, float]]:
    """Wall time of ``total_tokens`` on each GPU count from a one-GPU rate.

    ``efficiency`` is the per-GPU rate with many GPUs over the one-GPU rate (1: perfect
    scaling, which is an assumption unless it was measured); one GPU runs at the rate.
    """
    if tokens_per_s_per_gpu <= 0:
        raise ValueError(f"the measured rate must be > 0 tokens/s, got {tokens_per_s_per_gpu}")
    if not 0 < efficiency <= 1.5:
        raise ValueError(f"scaling efficiency must be in (0, 1.5], got {efficiency}")
    out = []
    for n in gpus:
        rate = tokens_per_s_per_gpu * n * (1.0 if n == 1 else efficiency)
        seconds = total_tokens / rate
        out.append({"gpus": n, "tokens_per_s": rate, "seconds": seconds, "days": seconds / 86400})
    return out


def projection_for(
    report: dict[str, Any], gpus: list[int], *, total_tokens: float = PAPER_TOKENS
) -> dict[str, Any] | None:
    """The projection from the MLM row at the most genes (checkpointing off if run), with
    the efficiency measured by ``--processes`` when it ran with 2+ processes."""
    mlm = [r for r in report["rows"] if r.get("kind") == "mlm" and "error" not in r]
    if not mlm:
        return None
    top = max(r["genes"] for r in mlm)
    rows = sorted((r for r in mlm if r["genes"] == top), key=lambda r: r["ckpt"] != "off")
    row = rows[0]
    scaled = [r for r in report.get("processes", []) if "efficiency" in r and r["processes"] > 1]
    efficiency = scaled[-1]["efficiency"] if scaled else 1.0
    return {
        "genes": top,
        "checkpointing": row["ckpt"],
        "batch_size": row["batch_size"],
        "tokens_per_s_per_gpu": row["tokens_per_s"],
        "efficiency": efficiency,
        "efficiency_measured_with": scaled[-1]["processes"] if scaled else None,
        "total_tokens": total_tokens,
        "rows": projection(
            row["tokens_per_s"], gpus, total_tokens=total_tokens, efficiency=efficiency
        ),
    }


def print_projection(proj: dict[str, Any]) -> None:
    source = (
        f"measured with {proj['efficiency_measured_with']} processes"
        if proj["efficiency_measured_with"]
        else "assumed: perfect scaling, not measured"
    )
    print(
        f"\nprojected time for {proj['total_tokens']:.3g} tokens at {proj['genes']} "
        f"genes (batch {proj['batch_size']} per GPU, checkpointing {proj['checkpointing']}), "
        f"from {proj['tokens_per_s_per_gpu']:,.0f} tokens/s measured on one GPU; scaling "
        f"efficiency {proj['efficiency']:.2f} ({source}):"
    )
    for r in proj["rows"]:
        print(f"  {r['gpus']:>4} GPU(s): {r['days']:.2f} days ({r['seconds'] / 3600:,.1f} h)")


# --------------------------------------------------------------------------- estimate
def training_flops_per_token(model: Any, n_genes: int, batch: int = 1) -> float:
    """Model FLOPs of one MLM training token (gene position) at ``n_genes`` genes in
    micro-batches of ``batch``: 3x the forward (the backward costs twice the forward).
    Element-wise work and the attention the flash backward recomputes are left out, as
    the MFU convention does."""
    return 3 * common.model_flops(model, n_genes, batch, lm_head=True).total / (batch * n_genes)


def time_to_train_s(
    flops_per_token: float,
    total_tokens: float,
    *,
    peak_tflops: float,
    mfu: float,
    gpus: int,
    efficiency: float,
) -> float:
    """Seconds for ``total_tokens`` at ``mfu`` of ``gpus`` x ``peak_tflops``; beyond one GPU
    each runs at ``efficiency`` of the one-GPU rate."""
    if not (flops_per_token > 0 and total_tokens > 0 and peak_tflops > 0 and gpus >= 1):
        raise ValueError("FLOPs per token, tokens, peak and GPU count must all be positive")
    if not (0 < mfu <= 1 and 0 < efficiency <= 1):
        raise ValueError(f"MFU ({mfu}) and efficiency ({efficiency}) must lie in (0, 1]")
    rate = peak_tflops * 1e12 * mfu * gpus * (1.0 if gpus == 1 else efficiency)
    return total_tokens * flops_per_token / rate


def estimate_for(
    args: argparse.Namespace, n_genes: int, *, loader: dict[str, Any] | None
) -> dict[str, Any]:
    """The labelled GPU estimate: time to train the token budget for each named GPU, each
    end of the MFU band and each GPU count; with a measured loader, the workers per GPU
    that keep pace with the estimated step."""
    model = model_config(n_genes, False, args.smoke, args.plan["model"] if args.plan else None)
    fwd = common.model_flops(model, n_genes, 1, lm_head=True)
    batch = args.plan["micro_batch_size"] if args.plan else args.batch_size
    per_token = training_flops_per_token(model, n_genes, batch)
    total = args.plan["total_tokens"] if args.plan else PAPER_TOKENS
    load_s = None
    if loader and "error" not in loader and loader.get("genes") == n_genes:
        load_s = loader["data_s_per_sample"]
    rows = []
    for name in args.estimate_gpu:
        peak = common.gpu_peak_tflops(name, None)
        for mfu in sorted(set(args.mfu)):
            sample_s = per_token * n_genes / (peak * 1e12 * mfu)
            row: dict[str, Any] = {
                "gpu": name,
                "peak_tflops": peak,
                "mfu": mfu,
                "ms_per_sample": 1000 * sample_s,
                "samples_per_s": 1 / sample_s,
            }
            for n in args.gpus:
                seconds = time_to_train_s(
                    per_token,
                    total,
                    peak_tflops=peak,
                    mfu=mfu,
                    gpus=n,
                    efficiency=args.assumed_efficiency,
                )
                row[f"hours_{n}"] = seconds / 3600
            if load_s is not None:
                row["loader_share_sync"] = load_s / (load_s + sample_s)
                row["loader_workers"] = math.ceil(load_s / sample_s)
            rows.append(row)
    return {
        "label": "estimate, not measured",
        "genes": n_genes,
        "model": {k: getattr(model, k) for k in ("embed_dim", "num_layers", "key_size")},
        "micro_batch_size": batch,
        "flops_per_token": per_token,
        "attention_share": fwd.attention / fwd.total,
        "total_tokens": total,
        "total_flops": per_token * total,
        "plan": args.plan,
        "mfu_band": list(args.mfu),
        "assumed_efficiency": args.assumed_efficiency,
        "gpus": list(args.gpus),
        "loader_s_per_sample": load_s,
        "rows": rows,
    }


def print_estimate(est: dict[str, Any]) -> None:
    plan = est["plan"]
    budget = (
        f"{plan['steps']:,} steps x {plan['samples_per_step']} samples x {est['genes']:,} "
        f"genes of {plan['config']}"
        if plan
        else "the paper's budget, PAPER_TOKENS"
    )
    m = est["model"]
    lo, hi = est["mfu_band"]
    print(
        f"\nESTIMATE, NOT MEASURED: time to train {est['total_tokens'] / 1e9:.4g}e9 tokens "
        f"({budget}) "
        f"with {m['num_layers']} blocks of {m['embed_dim']}-d at {est['genes']:,} genes.\n"
        f"  model FLOPs per token {est['flops_per_token']:.4g} (3x the forward; attention "
        f"{100 * est['attention_share']:.1f}% of it), {est['total_flops']:.4g} FLOPs in all.\n"
        f"  Assumed, not measured: MFU {lo}-{hi} of the dense bf16 peak (attention with "
        f"head size {m['key_size']} dominates, which keeps flash attention below its best: "
        "expect the low end); per-GPU "
        f"efficiency {est['assumed_efficiency']} beyond one GPU (the 1 -> 2 process "
        "efficiency measured on CPU with gloo does not apply to GPUs)."
    )
    columns = [
        ("gpu", "GPU"),
        ("peak_tflops", "bf16 peak TFLOP/s"),
        ("mfu", "MFU"),
        ("ms_per_sample", "ms/sample"),
    ]
    columns += [(f"hours_{n}", f"hours on {n} GPU{'s' if n > 1 else ''}") for n in est["gpus"]]
    if est["loader_s_per_sample"] is not None:
        columns += [
            ("loader_share_sync", "loader share, 0 workers"),
            ("loader_workers", "workers/GPU to keep up"),
        ]
    print(common.format_table(est["rows"], columns))
    if est["loader_s_per_sample"] is not None:
        print(
            f"  loader (measured here): {1000 * est['loader_s_per_sample']:.1f} ms per sample to "
            "read, tokenise and mask in one process; the last column is that over the "
            "estimated GPU time per sample, rounded up."
        )


def print_report(report: dict[str, Any], device: str) -> None:
    columns = [
        ("kind", "kind"),
        ("genes", "genes"),
        ("ckpt", "checkpointing"),
        ("reps", "steps"),
        ("s_per_step", "s/step"),
        ("tokens_per_s", "tokens/s"),
        ("gflop_per_step", "GFLOP/step"),
    ]
    columns += common.cost_columns(device)
    rows = report["rows"]
    if rows:
        print()
        print(common.format_table([r for r in rows if "error" not in r], columns))
    for r in rows:
        if "error" in r:
            print(f"FAILED {r.get('kind')} @ {r.get('genes')} genes: {r['error']}")
    kernels = {k for r in rows for k in r.get("attention_kernels", [])}
    if rows:
        print(f"attention operators (MLM step): {', '.join(sorted(kernels)) or '-'}")
    for sc in report["scaling"]:
        print(
            f"scaling (checkpointing {sc['ckpt']}) {sc['from_genes']} -> {sc['to_genes']} "
            f"genes: step time grows as genes^{sc['measured']:.3f} (CPU time: "
            f"genes^{sc['measured_cpu']:.3f}); FLOPs predict genes^{sc['flops']:.3f}"
        )
    _print_loader(report["loader"])
    for row in report.get("processes", []):
        if "error" in row:
            print(f"FAILED pretrain x {row['processes']} process(es): {_short_scale(row)}")
            continue
        eff = f", scaling efficiency {row['efficiency']:.2f}" if "efficiency" in row else ""
        print(
            f"pretrain x {row['processes']} process(es) ({row['genes']} genes, streamed): "
            f"{row['tokens_per_s']:,.0f} tokens/s, {row['tokens_per_s_per_process']:,.0f} per "
            f"process{eff}"
        )
    if report.get("projection"):
        print_projection(report["projection"])
    if report.get("estimate"):
        print_estimate(report["estimate"])


def _print_loader(loader: dict[str, Any] | None) -> None:
    if loader is None:
        return
    if "error" in loader:
        print(f"FAILED loader: {loader['error']}")
        return
    if not loader.get("model_step", True):
        chunks = f" in chunks of {loader['chunks']}" if loader.get("chunks") else ""
        print(
            f"\ndata loader alone ({loader['genes']} genes, batch {loader['batch_size']}, "
            f"{loader['workers']} workers, {len(loader['data_s'])} steps, {loader['source']} "
            f"tokens{chunks}, no model step): {1000 * loader['data_s_per_sample']:.2f} ms per "
            "sample to read, tokenise and mask"
        )
        return
    data, compute = sum(loader["data_s"]), sum(loader["compute_s"])
    source = {
        "stream": "streamed from an uncompressed .h5ad",
        "gzip": f"streamed from a gzip .h5ad in chunks of {loader.get('chunks')}",
    }.get(loader.get("source", "memory"), "in memory")
    print(
        f"\ndata loader ({loader['genes']} genes, batch {loader['batch_size']}, "
        f"{loader['workers']} workers, {len(loader['data_s'])} steps, tokens {source}): "
        f"waiting for data {data:.3f} s vs compute {compute:.3f} s -> "
        f"{100 * loader['data_fraction']:.2f}% of the loop in data loading "
        f"({1000 * loader['data_s_per_sample']:.2f} ms per sample)"
    )


if __name__ == "__main__":
    if common.is_child():
        raise SystemExit(common.child_main(child))
    main()
