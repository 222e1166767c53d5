"""Error of the CPU attention kernel and of torch SDPA against a float64 reference.

For q, k, v laid out as BulkRNABert makes them (head views of one [1, genes, 3 x 2 x 32]
projection, seeded), values shifted to mean 3 as expression embeddings are, prints the
largest absolute difference of ``bulkfm.models.cpu_attention.attention`` and of
``torch.nn.functional.scaled_dot_product_attention`` to softmax attention computed in
float64 (in query chunks, so 19,062 genes fit in memory). These are the numbers that
docs/performance.md quotes.

    python benchmarks/attention_accuracy.py                    # 4,096 and 19,062 genes
    python benchmarks/attention_accuracy.py --genes 1024 --smoke
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

HEADS, HEAD_SIZE = 2, 32


def _projections(length: int, scale: float, offset: float, seed: int = 0):  # -> q, k, v
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, length, 3 * HEADS * HEAD_SIZE, generator=gen) * scale
    q, k, v = (
        part.view(1, length, HEADS, HEAD_SIZE).transpose(1, 2)
        for part in x.split(HEADS * HEAD_SIZE, dim=-1)
    )
    return q, k, v + offset


def _reference(q, k, v, chunk: int = 1024):  # -> float64 attention
    import torch

    q, k, v = (t.double() for t in (q, k, v))
    out = torch.empty_like(q)
    for s in range(0, q.shape[2], chunk):
        scores = q[:, :, s : s + chunk] @ k.transpose(-2, -1) / math.sqrt(HEAD_SIZE)
        out[:, :, s : s + chunk] = torch.softmax(scores, dim=-1) @ v
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, nargs="+", default=[4096, 19062])
    parser.add_argument("--scale", type=float, default=1.0, help="std of the projections")
    parser.add_argument("--offset", type=float, default=3.0, help="added to v (its mean)")
    parser.add_argument("--smoke", action="store_true", help="one small length (tests)")
    args = parser.parse_args(argv)

    import torch.nn.functional as F

    from bulkfm.models import cpu_attention

    kernel_status = cpu_attention.status()
    genes = [128] if args.smoke else args.genes
    rows: list[dict[str, Any]] = []
    print(f"{'genes':>6}  {'kernel':>9}  {'sdpa':>9}")
    for length in genes:
        q, k, v = _projections(length, args.scale, args.offset)
        want = _reference(q, k, v)
        sdpa = (F.scaled_dot_product_attention(q, k, v).double() - want).abs().max().item()
        err = None
        if kernel_status.available:
            err = (cpu_attention.attention(q, k, v).double() - want).abs().max().item()
        rows.append({"genes": length, "kernel": err, "sdpa": sdpa})
        kernel = f"{err:9.2e}" if err is not None else f"{'n/a':>9}"
        print(f"{length:>6}  {kernel}  {sdpa:9.2e}")
    if not kernel_status.available:
        print(f"kernel unavailable: {kernel_status.reason}")
    return {"rows": rows, "kernel_available": kernel_status.available}


if __name__ == "__main__":
    main()
