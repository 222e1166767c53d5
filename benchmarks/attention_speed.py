"""Attention alone on CPU: bulkfm's kernel against torch's, at BulkRNABert's shape.

For [batch, 8 heads, genes, 32] float32 q, k and v laid out as the model makes them
(head views of one [batch, genes, 256] projection), times in this one process:

- ``bulkfm``: ``bulkfm.models.cpu_attention.attention`` (skipped, with the reason,
  where the kernel is unavailable);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (the CPU flash kernel);
- ``flex`` (with ``--flex``): ``torch.compile(flex_attention)``, compiled once per
  shape before timing.

Each is timed after a warm-up (median of ``--reps`` calls) and reported as GFLOP/s
(4 x batch x heads x genes^2 x 32 FLOPs: the two products) and as a fraction of an
fp32 2048^3 matmul measured in the same process before and after. The largest
difference to SDPA's output is printed too.

    python benchmarks/attention_speed.py                         # 256 ... 8,192 genes
    python benchmarks/attention_speed.py --genes 19062 --reps 3 --flex
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

DEFAULT_GENES = (256, 1024, 2048, 8192)
SMOKE_GENES = (64, 100)
HEADS, HEAD_SIZE = 8, 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--genes", type=int, nargs="+", default=None, help="sequence lengths")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    p.add_argument("--reps", type=int, default=9, help="timed calls per configuration")
    p.add_argument("--flex", action="store_true", help="also time compiled flex_attention")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    args = p.parse_args(argv)
    for name in ("batch_size", "threads", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.genes is None:
        args.genes = list(SMOKE_GENES if args.smoke else DEFAULT_GENES)
    if min(args.genes) < 1:
        p.error("--genes must be positive")
    if args.smoke:
        args.reps = 1
    return args


def implementations(flex: bool) -> dict[str, Any]:
    """Name -> attention function (or the reason it cannot run here)."""
    import torch
    import torch.nn.functional as F

    from bulkfm.models import cpu_attention

    info = cpu_attention.status()
    impls: dict[str, Any] = {
        "bulkfm": cpu_attention.attention if info.available else f"unavailable: {info.reason}",
        "sdpa": F.scaled_dot_product_attention,
    }
    if flex:
        from torch.nn.attention.flex_attention import flex_attention

        impls["flex"] = torch.compile(flex_attention)
    return impls


def median_seconds(fn: Any, reps: int) -> float:
    fn()  # warm-up (and, for flex, the compilation)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return common.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch = common.setup_torch(args.threads)
    print(common.machine_line(args.threads))
    impls = implementations(args.flex)
    gen = torch.Generator().manual_seed(0)
    n, _ = common.gemm_settings("cpu", args.smoke)
    rows: list[dict[str, Any]] = []
    for genes in args.genes:
        x = torch.randn(args.batch_size, genes, 3 * HEADS * HEAD_SIZE, generator=gen)
        q, k, v = (
            part.reshape(args.batch_size, genes, HEADS, HEAD_SIZE).transpose(1, 2)
            for part in x.split(HEADS * HEAD_SIZE, dim=-1)
        )
        flops = 4 * args.batch_size * HEADS * genes**2 * HEAD_SIZE
        with torch.inference_mode():
            reference = impls["sdpa"](q, k, v)
            before = common.matmul_timing(n, 5)
            timed = {}
            for name, fn in impls.items():
                if isinstance(fn, str):
                    continue
                seconds = median_seconds(lambda f=fn, a=(q, k, v): f(*a), args.reps)
                diff = (fn(q, k, v) - reference).abs().max().item()
                timed[name] = (seconds, diff)
            after = common.matmul_timing(n, 5)
        gemm = common.join(before, after)
        gemm_rate = 2 * n**3 / common.median(gemm.wall)
        for name, (seconds, diff) in timed.items():
            rows.append(
                {
                    "impl": name,
                    "genes": genes,
                    "ms": 1e3 * seconds,
                    "gflops": flops / seconds / 1e9,
                    "gemm_gflops": gemm_rate / 1e9,
                    "ratio_to_gemm": flops / seconds / gemm_rate,
                    "max_diff_vs_sdpa": diff,
                }
            )
        base = next((r for r in rows if r["genes"] == genes and r["impl"] == "sdpa"), None)
        for r in rows:
            if r["genes"] == genes and base is not None:
                r["speedup_vs_sdpa"] = base["ms"] / r["ms"]
        print(f"  done: {genes} genes", flush=True)
    skipped = {name: why for name, why in impls.items() if isinstance(why, str)}
    report = {"args": vars(args), "rows": rows, "skipped": skipped}
    print()
    print(
        common.format_table(
            rows,
            [
                ("impl", "impl"),
                ("genes", "genes"),
                ("ms", "ms/call"),
                ("gflops", "GFLOP/s"),
                ("gemm_gflops", "matmul GFLOP/s"),
                ("ratio_to_gemm", "ratio"),
                ("speedup_vs_sdpa", "speed-up vs sdpa"),
                ("max_diff_vs_sdpa", "max |diff| vs sdpa"),
            ],
        )
    )
    for name, why in skipped.items():
        print(f"{name}: {why}")
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
