"""Peak memory of streamed pre-training (``data.streaming: true``) as samples grow.

With ``data.streaming: true`` pre-training leaves the ``.h5ad`` on disk: the gene
subset, the tokenizer and the trivial predictor are fitted in chunked passes and each
training sample is read and tokenised when its batch is drawn, so peak resident memory
should not depend on the number of samples (only obs/var and a few int64 index arrays
grow, ~100 bytes a sample). This writes simulated TPM ``.h5ad`` files of each
``--samples`` size (in row blocks, so the benchmark itself never holds X), then runs
``bulkfm.train.pretrain.pretrain`` for ``--steps`` optimiser steps of a small random
model on each file in a fresh process and reports that process's peak RSS (VmHWM) and
the ratio of the largest to the smallest. The issue's target: 100k samples within 1.5x
the peak of 10k. ``--in-memory`` adds the default (in-memory) path on the same files
for contrast.

``--model-genes N`` (``data.top_k_variable_genes``; alias ``--top-k``) trains a model
over the N most variable of the file's ``--genes`` columns: the fitting passes and every
sample drawn still read full-width rows from disk and keep the chosen columns, which is
the data path whose memory is in question, while a step costs N genes. The report
records both widths (``genes``: the file; ``model_genes``: the model).

Quick (a few minutes on 2 CPU cores; the default):
    python benchmarks/pretrain_memory.py                          # 2,000 and 20,000 x 1,024
The issue's sizes (7.6 GB of X for 100k samples; the fitting passes read it three times):
    python benchmarks/pretrain_memory.py --samples 10000 100000 --genes 19062 --model-genes 256
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common
from embed_memory import write_h5ad

SCRIPT = Path(__file__).resolve()
TARGET_RATIO = 1.5


def child(payload: dict[str, Any]) -> dict[str, Any]:
    """Pre-train ``steps`` steps on ``input`` and report this process's peak RSS."""
    common.setup_torch(payload["threads"])
    from bulkfm.train.config import PretrainConfig
    from bulkfm.train.pretrain import pretrain

    dim = payload["embed_dim"]
    config = PretrainConfig.from_dict(
        {
            "model": {
                "embed_dim": dim,
                "init_gene_embed_dim": dim,
                "num_attention_heads": 2,
                "key_size": dim // 2,
                "ffn_embed_dim": 2 * dim,
                "num_layers": payload["layers"],
            },
            "data": {
                "path": payload["input"],
                "streaming": payload["streaming"],
                "top_k_variable_genes": payload["top_k"],
                "holdout_fraction": payload["holdout"],
            },
            "optim": {
                "max_steps": payload["steps"],
                "warmup_steps": 1,
                "micro_batch_size": payload["batch_size"],
            },
            "output_dir": payload["output"],
            "checkpoint_every": payload["steps"],
            "eval_every": payload["steps"],
            "eval_batch_size": 16,
            "progress_every_s": 3600.0,
        }
    )
    start = time.perf_counter()
    result = pretrain(config, handle_signals=False)
    return {
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": common.peak_rss_mb(),
        "n_genes": result.n_genes,
        "n_train": result.n_train,
        "n_eval": result.n_eval,
        "steps": result.step,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--genes", type=int, default=1024, help="genes in the simulated files")
    p.add_argument(
        "--model-genes",
        "--top-k",
        dest="top_k",
        type=int,
        default=None,
        help="genes of the model: data.top_k_variable_genes (default: all the file's)",
    )
    p.add_argument("--steps", type=int, default=5, help="optimiser steps per run")
    p.add_argument("--batch-size", type=int, default=4, help="optim.micro_batch_size")
    p.add_argument("--holdout", type=float, default=0.01, help="data.holdout_fraction")
    p.add_argument("--embed-dim", type=int, default=16, help="of the random model")
    p.add_argument("--layers", type=int, default=1, help="of the random model")
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    p.add_argument("--in-memory", action="store_true", help="also run the in-memory path")
    p.add_argument("--dir", type=Path, default=None, help="where the files go (default: temp)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sizes = sorted(set(args.samples))
    modes = [True, False] if args.in_memory else [True]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        for n in sizes:
            path = folder / f"sim_{n}.h5ad"
            write_h5ad(path, n, args.genes, seed=n)
            for streaming in modes:
                result = common.run_child(
                    SCRIPT,
                    {
                        "threads": args.threads,
                        "input": str(path),
                        "output": str(folder / f"run_{n}_{int(streaming)}"),
                        "streaming": streaming,
                        "top_k": args.top_k,
                        "holdout": args.holdout,
                        "steps": args.steps,
                        "batch_size": args.batch_size,
                        "embed_dim": args.embed_dim,
                        "layers": args.layers,
                    },
                )
                result.update(samples=n, streaming=streaming, file_mb=path.stat().st_size / 2**20)
                rows.append(result)
            path.unlink()
    report = {
        "genes": args.genes,
        "model_genes": args.top_k or args.genes,
        "top_k": args.top_k,
        "steps": args.steps,
        "rows": rows,
        "peak_ratio": common.peak_ratio(rows, streaming=True),
        "in_memory_peak_ratio": common.peak_ratio(rows, streaming=False),
        "target": TARGET_RATIO,
    }
    print_report(report)
    if args.json:
        from bulkfm.io import write_text

        write_text(json.dumps(report, indent=1) + "\n", args.json)
    return report


def print_report(report: dict[str, Any]) -> None:
    genes = report["genes"]
    chosen = f", a model over the {report['top_k']} most variable" if report["top_k"] else ""
    print(
        f"bulkfm pretrain, {report['steps']} steps, files of {genes} genes{chosen} "
        "(one fresh process per run)"
    )
    print(f"{'samples':>9} {'path':>10} {'X on disk MB':>13} {'peak RSS MB':>12} {'wall s':>8}")
    for r in report["rows"]:
        mode = "streamed" if r["streaming"] else "in memory"
        if "error" in r:
            print(f"{r['samples']:>9} {mode:>10} failed: {r['error']}")
            continue
        print(
            f"{r['samples']:>9} {mode:>10} {r['file_mb']:>13.1f} {r['peak_rss_mb']:>12.1f} "
            f"{r['wall_s']:>8.1f}"
        )
    sizes = sorted({r["samples"] for r in report["rows"]})
    for key, mode in (("peak_ratio", "streamed"), ("in_memory_peak_ratio", "in memory")):
        if report[key] is not None:
            target = f" (target <= {report['target']})" if key == "peak_ratio" else ""
            print(
                f"peak RSS ratio {sizes[-1]} / {sizes[0]} samples, {mode}: "
                f"{report[key]:.2f}{target}"
            )


if __name__ == "__main__":
    if common.is_child(sys.argv[1:]):
        raise SystemExit(common.child_main(child))
    main()
