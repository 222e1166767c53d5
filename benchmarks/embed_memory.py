"""Peak memory of ``bulkfm embed`` as the number of samples grows: it must stay flat.

``bulkfm embed`` opens its input backed (X stays on disk) and reads one batch of rows at
a time, so its peak resident memory should not depend on how many samples the file
holds; only the [samples, embed_dim] result grows (4 bytes x embed_dim a sample). This
writes simulated TPM .h5ad files of each ``--samples`` size to a temporary folder
(written in row blocks, so the benchmark itself never holds X), saves a small random
BulkRNABert checkpoint over the same genes, then runs the real command
(``bulkfm.cli.main(["embed", ...])``) on each file in a fresh process and reports that
process's peak RSS (VmHWM, see ``_common.py``) and the ratio of the largest to the
smallest. The issue's target: 100k samples within 1.5x the peak of 10k.

Quick (minutes on 2 CPU cores; the default):
    python benchmarks/embed_memory.py                         # 2,000 and 20,000 x 1,024 genes
The issue's sizes (7.6 GB of X for 100k samples; hours of CPU for the forward passes):
    python benchmarks/embed_memory.py --samples 10000 100000 --genes 19062
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as common

SCRIPT = Path(__file__).resolve()
TARGET_RATIO = 1.5


def write_h5ad(path: Path, n_samples: int, n_genes: int, seed: int, block: int = 2048) -> None:
    """A dense float32 TPM .h5ad written block by block (anndata's "array" encoding)."""
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd

    obs = pd.DataFrame(index=[f"S{i}" for i in range(n_samples)])
    var = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(n_genes)])
    ad.AnnData(obs=obs, var=var).write_h5ad(path)
    rng = np.random.default_rng(seed)
    profile = rng.normal(1.0, 0.7, n_genes)
    with h5py.File(path, "a") as f:
        X = f.create_dataset(
            "X", shape=(n_samples, n_genes), dtype="float32", chunks=(min(64, n_samples), n_genes)
        )
        X.attrs["encoding-type"] = "array"
        X.attrs["encoding-version"] = "0.2.0"
        for start in range(0, n_samples, block):
            stop = min(start + block, n_samples)
            log10 = profile + rng.normal(0.0, 0.5, (stop - start, n_genes))
            tpm = np.clip(10**log10 - 1.0, 0.0, None)
            X[start:stop] = (tpm / tpm.sum(axis=1, keepdims=True) * 1e6).astype(np.float32)


def child(payload: dict[str, Any]) -> dict[str, Any]:
    """``make_model``: save the checkpoint; ``embed``: run the command, report peak RSS."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", str(payload["threads"]))
    if payload["task"] == "make_model":
        import torch

        from bulkfm.models import BulkRNABert
        from bulkfm.models.config import BulkRNABertConfig
        from bulkfm.tokenize import BinTokenizer, TokenizerConfig

        genes = [f"ENSG{i:011d}" for i in range(payload["genes"])]
        torch.manual_seed(0)
        config = BulkRNABertConfig(
            n_genes=len(genes),
            n_expressions_bins=64,
            embed_dim=payload["embed_dim"],
            init_gene_embed_dim=payload["embed_dim"],
            num_attention_heads=2,
            key_size=payload["embed_dim"] // 2,
            ffn_embed_dim=2 * payload["embed_dim"],
            num_layers=payload["layers"],
        )
        tokenizer = BinTokenizer(TokenizerConfig(genes=genes, normalization_factor=6.0))
        BulkRNABert(config).save_pretrained(payload["model"], tokenizer=tokenizer)
        return {}
    import torch

    from bulkfm.cli import main as cli_main

    torch.set_num_threads(payload["threads"])
    start = time.perf_counter()
    argv = ["embed", "--model", payload["model"], "--input", payload["input"]]
    argv += ["--output", payload["output"], "--batch-size", str(payload["batch_size"])]
    code = cli_main(argv)
    if code != 0:
        raise SystemExit(f"bulkfm embed failed with exit code {code}")
    return {"wall_s": time.perf_counter() - start, "peak_rss_mb": common.peak_rss_mb()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--genes", type=int, default=1024)
    p.add_argument("--embed-dim", type=int, default=16, help="of the random model")
    p.add_argument("--layers", type=int, default=1, help="of the random model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    p.add_argument("--dir", type=Path, default=None, help="where the files go (default: temp)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sizes = sorted(set(args.samples))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        base = {"threads": args.threads, "genes": args.genes}
        model = str(folder / "model")
        made = common.run_child(
            SCRIPT,
            {
                **base,
                "task": "make_model",
                "model": model,
                "embed_dim": args.embed_dim,
                "layers": args.layers,
            },
        )
        if "error" in made:
            raise SystemExit(made["error"])
        rows = []
        for n in sizes:
            path = folder / f"sim_{n}.h5ad"
            write_h5ad(path, n, args.genes, seed=n)
            result = common.run_child(
                SCRIPT,
                {
                    **base,
                    "task": "embed",
                    "model": model,
                    "input": str(path),
                    "output": str(folder / f"emb_{n}.npy"),
                    "batch_size": args.batch_size,
                },
            )
            result.update(samples=n, file_mb=path.stat().st_size / 2**20)
            rows.append(result)
            path.unlink()
    ok = [r for r in rows if "error" not in r]
    ratio = ok[-1]["peak_rss_mb"] / ok[0]["peak_rss_mb"] if len(ok) >= 2 else None
    report = {"genes": args.genes, "rows": rows, "peak_ratio": ratio, "target": TARGET_RATIO}
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"bulkfm embed, backed input, {report['genes']} genes (one fresh process per file)")
    print(f"{'samples':>9} {'X on disk MB':>13} {'peak RSS MB':>12} {'wall s':>8}")
    for r in report["rows"]:
        if "error" in r:
            print(f"{r['samples']:>9} failed: {r['error']}")
            continue
        print(
            f"{r['samples']:>9} {r['file_mb']:>13.1f} {r['peak_rss_mb']:>12.1f} {r['wall_s']:>8.1f}"
        )
    if report["peak_ratio"] is not None:
        rows = [r for r in report["rows"] if "error" not in r]
        print(
            f"peak RSS ratio {rows[-1]['samples']} / {rows[0]['samples']} samples: "
            f"{report['peak_ratio']:.2f} (target <= {report['target']})"
        )


if __name__ == "__main__":
    if common.is_child(sys.argv[1:]):
        raise SystemExit(common.child_main(child))
    main()
