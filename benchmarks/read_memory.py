"""Peak memory and time of ``read_expression`` on a simulated large matrix.

The readers promise to read a 19,000-gene x 10,000-sample matrix with a peak RSS
growth of at most ~3x its float32 size. This script writes such a matrix (TSV,
CSV, gzipped TSV and/or parquet, in one or both orientations) to a temporary
folder, reads each file in a fresh subprocess (so one read's memory cannot hide
another's) and prints the growth of the peak RSS over the baseline after imports
(the child's own high-water mark, VmHWM; ru_maxrss where /proc is missing).

    python benchmarks/read_memory.py                       # full size (~2.5 GB of files)
    python benchmarks/read_memory.py --samples 1000        # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ORIENTATIONS = ("samples_x_genes", "genes_x_samples")
FORMATS = ("tsv", "csv", "tsv.gz", "parquet")

CHILD = r"""
import json, resource, sys, time
from bulkfm.data.readers import read_expression

def peak_kb():
    # VmHWM is this process's own high-water mark; ru_maxrss is not: Linux carries
    # the parent's peak over fork+exec, which would hide a small child's growth.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

base = peak_kb()
start = time.perf_counter()
adata = read_expression(sys.argv[1])
seconds = time.perf_counter() - start
peak = peak_kb()
print(json.dumps({"base_kb": base, "peak_kb": peak, "seconds": seconds,
                  "shape": list(adata.shape), "x_bytes": int(adata.X.nbytes),
                  "orientation": adata.uns["bulkfm"]["source"]["orientation"]}))
"""


def _labels(n_genes: int, n_samples: int) -> tuple[list[str], list[str]]:
    genes = [f"ENSG{i:011d}" for i in range(n_genes)]
    samples = [f"TCGA-{i // 1000:02d}-{i % 1000:04d}-01A" for i in range(n_samples)]
    return genes, samples


def _values(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Count-like values: many zeros, a long tail, two decimals (like RSEM output)."""
    x = rng.gamma(0.4, 300.0, size=shape).astype(np.float32)
    x[x < 0.5] = 0
    return np.round(x, 2)


def _chunks(n_rows: int, n_cols: int) -> list[tuple[int, int]]:
    step = max(1, (64 * 2**20) // (4 * n_cols))
    return [(s, min(n_rows, s + step)) for s in range(0, n_rows, step)]


def _table(label_name: str, labels: list[str], names: list[str], values: np.ndarray) -> pa.Table:
    columns = [pa.array(labels)] + [pa.array(values[:, j]) for j in range(values.shape[1])]
    return pa.Table.from_arrays(columns, names=[label_name, *names])


def write_matrix(
    folder: Path, fmt: str, orientation: str, n_genes: int, n_samples: int, seed: int = 0
) -> Path:
    """Write one simulated file chunk by chunk (the writer itself stays small)."""
    rng = np.random.default_rng(seed)
    genes, samples = _labels(n_genes, n_samples)
    if orientation == "samples_x_genes":
        label_name, row_labels, col_labels = "sample_barcode", samples, genes
    else:
        label_name, row_labels, col_labels = "gene_id", genes, samples
    path = folder / f"{orientation}.{fmt}"
    n_rows, n_cols = len(row_labels), len(col_labels)
    if fmt == "parquet":
        schema = pa.schema([(label_name, pa.string())] + [(c, pa.float32()) for c in col_labels])
        with pq.ParquetWriter(path, schema) as writer:
            for s, e in _chunks(n_rows, n_cols):
                values = _values(rng, (e - s, n_cols))
                writer.write_table(_table(label_name, row_labels[s:e], col_labels, values))
        return path
    delimiter = "," if fmt == "csv" else "\t"
    compression = "gzip" if fmt.endswith(".gz") else None
    with pa.output_stream(str(path), compression=compression) as sink:
        for k, (s, e) in enumerate(_chunks(n_rows, n_cols)):
            values = _values(rng, (e - s, n_cols))
            pacsv.write_csv(
                _table(label_name, row_labels[s:e], col_labels, values),
                sink,
                pacsv.WriteOptions(
                    include_header=k == 0, delimiter=delimiter, quoting_style="none"
                ),
            )
    return path


def measure(path: Path) -> dict:
    """Read ``path`` in a fresh interpreter and return its peak-RSS report."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"reading {path} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, default=19000)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument(
        "--format", default="tsv,parquet", help=f"comma-separated subset of {','.join(FORMATS)}"
    )
    parser.add_argument(
        "--orientation", default="both", choices=["both", "samples_x_genes", "genes_x_samples"]
    )
    parser.add_argument("--tmpdir", default=None, help="where to write the simulated files")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {unknown}; choose from {FORMATS}")
    orientations = ORIENTATIONS if args.orientation == "both" else (args.orientation,)

    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        for fmt in formats:
            for orientation in orientations:
                start = time.perf_counter()
                path = write_matrix(Path(tmp), fmt, orientation, args.genes, args.samples)
                size = path.stat().st_size
                took = time.perf_counter() - start
                print(f"wrote {path.name}: {size / 1e6:.0f} MB in {took:.0f} s", flush=True)
                report = measure(path)
                path.unlink()
                growth = (report["peak_kb"] - report["base_kb"]) * 1024
                rows.append(
                    (fmt, orientation, report, growth, growth / max(1, report["x_bytes"]), size)
                )

    header = (
        f"{'format':8} {'file orientation':17} {'samples x genes':>16} {'file MB':>8} "
        f"{'float32 MB':>10} {'peak RSS growth MB':>18} {'ratio':>6} {'read s':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for fmt, orientation, report, growth, ratio, size in rows:
        shape = "x".join(str(n) for n in report["shape"])
        print(
            f"{fmt:8} {orientation:17} {shape:>16} {size / 1e6:8.0f} "
            f"{report['x_bytes'] / 1e6:10.0f} {growth / 1e6:18.0f} {ratio:6.2f} "
            f"{report['seconds']:7.1f}"
        )
    worst = max(r[4] for r in rows)
    print(f"\nworst ratio {worst:.2f} (target <= 3.0)")
    return 0 if worst <= 3.0 else 1


if __name__ == "__main__":
    sys.exit(main())
