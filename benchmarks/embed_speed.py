"""Embedding extraction speed and peak memory of BulkRNABert, against naive attention.

Each (arm, gene count) runs in a fresh process (peak RSS of that configuration only):

- ``model``: the project's model as users get it (``BulkRNABert.embed``). On CPU its
  attention runs bulkfm's own kernel (:mod:`bulkfm.models.cpu_attention`) where it
  applies, on GPU ``F.scaled_dot_product_attention`` (flash attention);
- ``sdpa`` (CPU only; ``--no-sdpa`` skips it): the same model with
  ``BULKFM_CPU_ATTENTION=off``, i.e. torch's CPU flash kernel, as the reference for
  what the project's kernel adds;
- ``naive``: the same model and weights computed the way the official Haiku code does,
  materialising ``softmax(QK^T / sqrt(d))`` for every head ([batch, heads, genes,
  genes]) before multiplying by V. Skipped above ``--naive-max-genes`` (8,192) unless
  ``--naive-all``: at 19,062 genes one such tensor is 11.6 GB in fp32.

Printed per configuration: seconds per sample (median of the timed repetitions),
samples/s, genes/s, model FLOPs per sample, achieved FLOP/s and its ratio to the dense
matmul FLOP/s measured in the same process just before and after the timing (by wall
clock and by process CPU time, which other jobs on a shared machine do not inflate),
and the peak RSS of the timed repetitions (the whole child's peak, with the warm-up and
the instruments, beside it).
Then the naive/model and sdpa/model speed and memory ratios, and the scaling exponent
of the time per sample between the smallest gene count >= 4,096 and the largest, next
to the one the FLOP count predicts.

CPU (default when there is no GPU):
    python benchmarks/embed_speed.py                      # 1,024 / 4,096 / 8,192 / 19,062
    python benchmarks/embed_speed.py --genes 4096 --naive-all
GPU (bf16 autocast, flash attention via SDPA, MFU against the bf16 peak):
    python benchmarks/embed_speed.py --device cuda --batch-size 8 [--compile]
        [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

SCRIPT = Path(__file__).resolve()
DEFAULT_GENES = (1024, 4096, 8192, 19062)
SMOKE_GENES = (48, 96)


# --------------------------------------------------------------------------- child side
def build_model(n_genes: int, seed: int, smoke: bool, device: str) -> Any:
    """Official-size model over ``n_genes`` genes (tiny in smoke mode), seeded so every
    child, whatever its arm, holds exactly the same weights."""
    import torch

    from bulkfm.models.bulkrnabert import BulkRNABert, BulkRNABertConfig

    torch.manual_seed(seed)
    kw: dict[str, Any] = {"n_genes": n_genes}
    if smoke:  # head size 32, as in the real model, so bulkfm's CPU kernel applies
        kw.update(embed_dim=64, num_attention_heads=2, ffn_embed_dim=64, num_layers=2)
        kw.update(init_gene_embed_dim=24)
    return BulkRNABert(BulkRNABertConfig(**kw)).to(device).eval()


def weights_checksum(model: Any) -> float:
    return float(sum(p.detach().double().sum().item() for p in model.parameters()))


def naive_embed(model: Any, tokens: Any, gene_index: Any) -> Any:
    """Mean last-block output computed with explicit, fully materialised attention.

    Written from the architecture (pre-LN blocks, 8 heads, exact GELU), reading the
    model's tensors but none of its forward code, so agreement is also a check.
    """
    import torch
    import torch.nn.functional as F

    cfg = model.config
    heads, key = cfg.num_attention_heads, cfg.key_size
    x = model.expression_embedding_layer.weight[tokens]
    genes = model.gene_embedding_layer.weight[gene_index]
    x = x + F.linear(genes, model.fc_gene_embedding.weight, model.fc_gene_embedding.bias)
    batch, length, dim = x.shape

    def heads_of(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, length, heads, key).transpose(1, 2)

    for block in model.transformer_layers:
        ln1, ln2 = block.layer_norm_self_attention, block.layer_norm_mlp
        h = F.layer_norm(x, (dim,), ln1.weight, ln1.bias, cfg.layer_norm_eps)
        q = heads_of(F.linear(h, block.mha.w_q.weight, block.mha.w_q.bias))
        k = heads_of(F.linear(h, block.mha.w_k.weight, block.mha.w_k.bias))
        v = heads_of(F.linear(h, block.mha.w_v.weight, block.mha.w_v.bias))
        logits = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(key)  # [B, H, G, G]
        weights = torch.softmax(logits, dim=-1)
        del logits
        context = torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, heads * key)
        del weights
        x = x + F.linear(context, block.mha.output.weight, block.mha.output.bias)
        h = F.layer_norm(x, (dim,), ln2.weight, ln2.bias, cfg.layer_norm_eps)
        hidden = F.gelu(F.linear(h, block.fc1.weight, block.fc1.bias), approximate="none")
        x = x + F.linear(hidden, block.fc2.weight, block.fc2.bias)
    return x.mean(dim=1)


def child(payload: dict[str, Any]) -> dict[str, Any]:
    torch = common.setup_torch(payload["threads"], payload["device"])
    device = payload["device"]
    n_genes, batch = payload["genes"], payload["batch_size"]
    model = build_model(n_genes, payload["seed"], payload["smoke"], device)
    gen = torch.Generator().manual_seed(payload["seed"] + 1)
    bins = model.config.n_expressions_bins
    tokens = torch.randint(0, bins, (batch, n_genes), generator=gen).to(device)
    gene_index = torch.arange(n_genes, device=device)
    gpu = device == "cuda"

    if payload["arm"] == "naive":

        def run(t: Any, g: Any) -> Any:
            return naive_embed(model, t, g)

    elif payload["arm"] == "sdpa":
        from bulkfm.models import cpu_attention

        def run(t: Any, g: Any) -> Any:
            with cpu_attention.disabled():
                return model.embed(t, gene_index=g)

    else:
        forward = model.embed
        if payload.get("compile"):
            forward = torch.compile(model.embed, dynamic=False)

        def run(t: Any, g: Any) -> Any:
            return forward(t, gene_index=g)

    def call(t: Any = tokens, g: Any = gene_index) -> Any:
        with (
            torch.inference_mode(),
            torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=gpu),
        ):
            return run(t, g)

    base_rss = common.current_rss_mb()
    # Warm-up on a short prefix: thread pool, kernels (and the compiled graph on GPU,
    # which needs the real shape) without paying a full-length run on a slow CPU.
    warm = n_genes if gpu else min(n_genes, 256)
    call(tokens[:, :warm], gene_index[:warm])
    common.synchronize(device)
    common.reset_device_peak(device)
    result: dict[str, Any] = {}

    def timed() -> Any:
        return common.timed_reps(
            lambda: result.__setitem__("emb", call()),
            budget_s=payload["budget_s"],
            min_reps=payload["min_reps"],
            max_reps=payload["max_reps"],
            device=device,
        )

    timing, gemm, gemm_n = common.measure_around(timed, device, payload["smoke"])
    # Which attention operator ran, read with the profiler after the timing (so that its
    # buffers stay out of the measured peak), on the warm-up's short prefix.
    kernels = common.attention_kernels(lambda: call(tokens[:, :warm], gene_index[:warm]))
    flops = common.model_flops(model.config, n_genes, batch, lm_head=False)
    threads = torch.get_num_threads()
    return {
        **common.device_info(device),
        "times_s": timing.wall,
        "cpu_s": timing.cpu,
        "gemm_times_s": gemm.wall,
        "base_rss_mb": base_rss,
        **common.memory_fields(timing),
        "device_peak_mb": common.device_peak_memory_mb(device),
        "flops": flops.as_dict(),
        **common.rates(flops.total, timing, gemm, gemm_n, threads, device),
        "attention_kernels": kernels,
        "checksum": weights_checksum(model),
        "embedding": result["emb"][0].float().cpu().tolist(),
    }


# --------------------------------------------------------------------------- parent side
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--genes", type=int, nargs="+", default=None, help="gene counts to run")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--naive-max-genes", type=int, default=8192)
    p.add_argument("--naive-all", action="store_true", help="run the naive arm at every size")
    p.add_argument("--no-naive", action="store_true", help="skip the naive arm")
    p.add_argument("--no-sdpa", action="store_true", help="skip the torch-SDPA arm (CPU)")
    common.add_run_arguments(
        p, budget_s=40.0, max_reps=5, timeout_s=1800.0, compile_help="torch.compile the model arm"
    )
    args = p.parse_args(argv)
    if args.genes is None:
        args.genes = list(SMOKE_GENES if args.smoke else DEFAULT_GENES)
    if args.smoke:
        args.budget_s, args.max_reps = 0.0, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = common.device_of(args.device, inline=args.inline)
    print(common.machine_line(args.threads))
    if args.malloc_mmap_threshold:
        print(f"children run with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}")
    print(
        f"embed_speed: device {device}, batch {args.batch_size}, genes {args.genes}, "
        f"torch threads {args.threads}" + (" (bf16 autocast)" if device == "cuda" else "")
    )
    rows: list[dict[str, Any]] = []
    for n_genes in args.genes:
        arms = ["model"]
        if device == "cpu" and not args.no_sdpa:
            arms.append("sdpa")
        if not args.no_naive and (args.naive_all or n_genes <= args.naive_max_genes):
            arms.append("naive")
        for arm in arms:
            payload = {
                "arm": arm,
                "genes": n_genes,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "device": device,
                "seed": args.seed,
                "smoke": args.smoke,
                "budget_s": args.budget_s,
                "min_reps": args.min_reps,
                "max_reps": args.max_reps,
                "compile": args.compile and arm == "model",
            }
            res = common.run_config(
                child,
                SCRIPT,
                payload,
                inline=args.inline,
                timeout=args.timeout_s,
                env=common.malloc_env(args.malloc_mmap_threshold),
            )
            rows.append(summarise(res, args))
            print(f"  done: {arm} @ {n_genes} genes: {_short(rows[-1])}", flush=True)
    report = {"device": device, "args": vars(args) | {"json": str(args.json)}, "rows": rows}
    report["comparisons"] = compare_arms(rows)
    report["scaling"] = scaling(rows)
    print_report(report, device)
    common.write_json(args.json, report)
    return report


def summarise(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if "error" in res:
        return res
    t = common.median(res["times_s"])
    batch = res["batch_size"]
    flops = res["flops"]["total"]
    return {
        **res,
        "s_per_sample": t / batch,
        "samples_per_s": batch / t,
        "genes_per_s": batch * res["genes"] / t,
        "gflop_per_sample": flops / batch / 1e9,
        **common.cost_fields(res, args.peak_tflops),
    }


def _short(row: dict[str, Any]) -> str:
    if "error" in row:
        return row["error"]
    return (
        f"{row['s_per_sample']:.4g} s/sample, {row['gflops_achieved']:.4g} GFLOP/s "
        f"({row['ratio_to_gemm']:.2f} of matmul; by CPU time {row['cpu_ratio_to_gemm']:.2f}), "
        f"peak {row['peak_mb']:.0f} MB"
    )


def compare_arms(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Time and memory of each other arm over the model arm at every gene count both
    ran, and how far their embeddings differ (same weights, so only rounding)."""
    out = []
    by_key = {(r["arm"], r["genes"]): r for r in rows if "error" not in r}
    for (arm, genes), slow in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        fast = by_key.get(("model", genes))
        if arm == "model" or fast is None:
            continue
        diff = max(abs(a - b) for a, b in zip(fast["embedding"], slow["embedding"], strict=True))
        out.append(
            {
                "genes": genes,
                "versus": arm,
                "speedup": slow["s_per_sample"] / fast["s_per_sample"],
                "cpu_speedup": common.median(slow["cpu_s"]) / common.median(fast["cpu_s"]),
                "memory_ratio": slow["peak_mb"] / fast["peak_mb"],
                "memory_ratio_above_base": (slow["peak_mb"] - slow["base_rss_mb"])
                / max(fast["peak_mb"] - fast["base_rss_mb"], 1e-9),
                "device_memory_ratio": (
                    slow["device_peak_mb"] / fast["device_peak_mb"]
                    if fast.get("device_peak_mb")
                    else None
                ),
                "max_abs_diff": diff,
                "same_weights": fast["checksum"] == slow["checksum"],
            }
        )
    return out


def scaling(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Exponent k of time ~ genes^k between the smallest gene count >= 4,096 (or the
    smallest run) and the largest, measured and as the FLOP count predicts."""
    fast = sorted(
        (r for r in rows if r.get("arm") == "model" and "error" not in r), key=lambda r: r["genes"]
    )
    if len(fast) < 2:
        return None
    big = [r for r in fast if r["genes"] >= 4096]
    lo = big[0] if len(big) >= 2 else fast[0]
    hi = fast[-1]
    return {
        "from_genes": lo["genes"],
        "to_genes": hi["genes"],
        "measured": common.scaling_exponent(
            lo["genes"], lo["s_per_sample"], hi["genes"], hi["s_per_sample"]
        ),
        "measured_cpu": common.scaling_exponent(
            lo["genes"], common.median(lo["cpu_s"]), hi["genes"], common.median(hi["cpu_s"])
        ),
        "flops": common.scaling_exponent(
            lo["genes"], lo["gflop_per_sample"], hi["genes"], hi["gflop_per_sample"]
        ),
        "attention_share_at_max": hi["flops"]["attention"] / hi["flops"]["total"],
    }


def print_report(report: dict[str, Any], device: str) -> None:
    rows = report["rows"]
    columns = [
        ("arm", "arm"),
        ("genes", "genes"),
        ("reps", "reps"),
        ("s_per_sample", "s/sample"),
        ("samples_per_s", "samples/s"),
        ("genes_per_s", "genes/s"),
        ("gflop_per_sample", "GFLOP/sample"),
    ]
    columns += common.cost_columns(device)
    print()
    print(common.format_table([r for r in rows if "error" not in r], columns))
    for arm in ("model", "sdpa", "naive"):
        if not any(r.get("arm") == arm for r in rows):
            continue
        kernels = {k for r in rows if r.get("arm") == arm for k in r.get("attention_kernels", [])}
        print(f"attention operators ({arm}): {', '.join(sorted(kernels)) or 'plain matmuls'}")
    for r in rows:
        if "error" in r:
            print(f"FAILED {r.get('arm')} @ {r.get('genes')} genes: {r['error']}")
    if report["comparisons"]:
        print("\nthe model arm against the others (same weights):")
        print(
            common.format_table(
                report["comparisons"],
                [
                    ("genes", "genes"),
                    ("versus", "versus"),
                    ("speedup", "model speed-up"),
                    ("cpu_speedup", "speed-up (CPU time)"),
                    ("memory_ratio", "peak RSS ratio"),
                    ("memory_ratio_above_base", "ratio above load"),
                    ("device_memory_ratio", "GPU memory ratio"),
                    ("max_abs_diff", "max |emb diff|"),
                    ("same_weights", "same weights"),
                ],
            )
        )
    sc = report["scaling"]
    if sc:
        print(
            f"\nscaling {sc['from_genes']} -> {sc['to_genes']} genes: time per sample grows "
            f"as genes^{sc['measured']:.3f} (CPU time: genes^{sc['measured_cpu']:.3f}); the "
            f"FLOP count predicts genes^{sc['flops']:.3f} "
            f"(attention = {100 * sc['attention_share_at_max']:.1f}% of FLOPs at "
            f"{sc['to_genes']})"
        )


if __name__ == "__main__":
    if common.is_child():
        raise SystemExit(common.child_main(child))
    main()
