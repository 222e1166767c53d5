"""Peak memory of ``bulkfm embed`` as the number of samples grows: it must stay flat.

``bulkfm embed`` opens its input backed (X stays on disk) and reads one batch of rows at
a time, so its peak resident memory should not depend on how many samples the file
holds; only the [samples, embed_dim] result grows (4 bytes x embed_dim a sample). This
writes simulated TPM .h5ad files of each ``--samples`` size x ``--genes`` columns to a
temporary folder (written in row blocks, so the benchmark itself never holds X), saves a
small random BulkRNABert checkpoint, then runs the real command
(``bulkfm.cli.main(["embed", ...])``) on each file in a fresh process and reports that
process's peak RSS (VmHWM, see ``_common.py``) and the ratio of the largest to the
smallest. The issue's target: 100k samples within 1.5x the peak of 10k.

``--model-genes N`` gives the model N of the file's genes (a seeded random choice, in a
shuffled order) instead of all of them: the command still reads full-width rows from
disk and aligns their columns to the model's genes, which is the data path whose memory
is in question, while the forward passes cost N genes, not the file's width. The report
records both widths (``genes``: the file; ``model_genes``: the model).

Quick (minutes on 2 CPU cores; the default):
    python benchmarks/embed_memory.py                         # 2,000 and 20,000 x 1,024 genes
The issue's sizes (7.6 GB of X for 100k samples; ~40 min here for the 100k with 1,024
model genes, days with all 19,062):
    python benchmarks/embed_memory.py --samples 10000 100000 --genes 19062 --model-genes 1024
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
WRITE_BLOCK_ELEMENTS = 1 << 22
"""Values simulated at a time when writing a file (float64 temporaries of ~32 MB each)."""


def gene_ids(n_genes: int) -> list[str]:
    """The simulated files' gene ids, column order."""
    return [f"ENSG{i:011d}" for i in range(n_genes)]


def model_gene_ids(n_genes: int, model_genes: int | None, seed: int = 0) -> list[str]:
    """The model's genes: all the file's (None), or ``model_genes`` of them chosen at
    random and shuffled, so reading aligns scattered columns in a new order."""
    import numpy as np

    genes = gene_ids(n_genes)
    if model_genes is None:
        return genes
    if not 1 <= model_genes <= n_genes:
        raise ValueError(f"--model-genes must be in 1..{n_genes} (--genes), got {model_genes}")
    chosen = np.random.default_rng(seed).choice(n_genes, model_genes, replace=False)
    return [genes[i] for i in chosen]


def write_h5ad(
    path: Path, n_samples: int, n_genes: int, seed: int, block: int | None = None
) -> None:
    """A dense float32 TPM .h5ad written block by block (anndata's "array" encoding).

    ``block`` rows at a time (default: about :data:`WRITE_BLOCK_ELEMENTS` values), so
    the writer's memory depends on the width, never on ``n_samples``."""
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd

    obs = pd.DataFrame(index=[f"S{i}" for i in range(n_samples)])
    var = pd.DataFrame(index=gene_ids(n_genes))
    ad.AnnData(obs=obs, var=var).write_h5ad(path)
    if block is None:
        block = max(1, WRITE_BLOCK_ELEMENTS // n_genes)
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

        genes = model_gene_ids(payload["genes"], payload["model_genes"])
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
    result = {"wall_s": time.perf_counter() - start, "peak_rss_mb": common.peak_rss_mb()}
    # Read after the peak is taken: what was embedded, by a model over how many genes.
    import numpy as np

    from bulkfm.models import load_pretrained

    model, _ = load_pretrained(payload["model"])
    out = np.load(payload["output"], mmap_mode="r")
    result.update(n_model_genes=model.config.n_genes, output_shape=list(out.shape))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--genes", type=int, default=1024, help="genes (columns) in the files")
    p.add_argument(
        "--model-genes",
        type=int,
        default=None,
        help="genes of the model, a random subset of the file's (default: all of them)",
    )
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
    model_gene_ids(args.genes, args.model_genes)  # a bad --model-genes fails before any work
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        base = {"threads": args.threads, "genes": args.genes, "model_genes": args.model_genes}
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
    report = {
        "genes": args.genes,
        "model_genes": args.model_genes or args.genes,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "rows": rows,
        "peak_ratio": common.peak_ratio(rows),
        "target": TARGET_RATIO,
    }
    print_report(report)
    if args.json:
        from bulkfm.io import write_text

        write_text(json.dumps(report, indent=1) + "\n", args.json)
    return report


def print_report(report: dict[str, Any]) -> None:
    print(
        f"bulkfm embed, backed input: files of {report['genes']} genes, a model over "
        f"{report['model_genes']} of them (one fresh process per file)"
    )
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
