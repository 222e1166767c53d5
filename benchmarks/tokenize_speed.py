"""Tokenisation and on-the-fly masking speed: is data preparation ever the bottleneck?

Measures, on a synthetic TPM matrix shaped like the target workload (default 10,000
samples x 19,062 genes, float32, ~30% zeros, a tail above the normalisation factor so
the clamp is exercised):

- ``BinTokenizer.encode`` of the whole matrix (seconds, samples/s, values/s);
- ``BinTokenizer.encode_adata`` of an AnnData whose genes come in another order and
  carry a sparse ``layers["missing"]`` (the path ``bulkfm embed`` takes);
- the official recipe written naively (``np.digitize`` per sample, zeros -> 0, clamp)
  on the first samples, to check the tokens agree exactly and show the speed-up;
- ``MaskedTokenDataset`` items per second (the BERT masking the pre-training loader
  does per sample), to compare with the samples/s a training step consumes
  (``train_speed.py``).

    python benchmarks/tokenize_speed.py                      # 10,000 x 19,062
    python benchmarks/tokenize_speed.py --samples 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

NORMALIZATION_FACTOR = 5.547176906585117  # official TCGA checkpoint


def synthetic_tpm(n_samples: int, n_genes: int, seed: int = 0) -> Any:
    """float32 TPM with ~30% exact zeros and log-normal positives (built in row blocks
    so the float64 draws never exceed a few hundred MB)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.empty((n_samples, n_genes), dtype=np.float32)
    step = max(1, 2_000_000 // n_genes)
    for start in range(0, n_samples, step):
        block = out[start : start + step]
        block[:] = rng.lognormal(mean=1.0, sigma=2.2, size=block.shape)
        block[rng.random(block.shape, dtype=np.float32) < 0.3] = 0.0
    return out


def reference_tokens(tpm: Any, factor: float, n_bins: int) -> Any:
    """The official recipe, one sample at a time with np.digitize (slow but obvious)."""
    import numpy as np

    edges = np.linspace(0.0, 1.0, n_bins)
    out = np.empty(tpm.shape, dtype=np.int64)
    for i, row in enumerate(tpm):
        v = np.log10(1.0 + row.astype(np.float64)) / factor
        tokens = np.digitize(v, edges)
        tokens[v == 0] = 0
        out[i] = np.minimum(tokens, n_bins - 1)
    return out


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from bulkfm.tokenize import BinTokenizer, TokenizerConfig
    from bulkfm.train.data import MaskedTokenDataset

    n, g = args.samples, args.genes
    genes = [f"ENSG{i:011d}" for i in range(g)]
    tokenizer = BinTokenizer(TokenizerConfig(genes=genes, normalization_factor=args.factor))
    rss0 = common.current_rss_mb()
    tpm, gen_s = _timed(lambda: synthetic_tpm(n, g, args.seed))
    result: dict[str, Any] = {"samples": n, "genes": g, "generate_s": gen_s}

    tokens, encode_s = _timed(lambda: tokenizer.encode(tpm))
    result.update(encode_s=encode_s, encode_samples_per_s=n / encode_s)
    result["encode_values_per_s"] = n * g / encode_s
    result["input_mb"] = tpm.nbytes / 2**20
    result["output_mb"] = tokens.nbytes / 2**20

    n_ref = min(args.reference_samples, n)
    ref, ref_s = _timed(lambda: reference_tokens(tpm[:n_ref], args.factor, tokenizer.n_bins))
    result["reference_samples"] = n_ref
    result["reference_samples_per_s"] = n_ref / ref_s
    result["reference_equal"] = bool(np.array_equal(ref, tokens[:n_ref]))
    result["speedup_vs_reference"] = (n / encode_s) / (n_ref / ref_s)
    result["clamped_fraction"] = float((tokens == tokenizer.n_bins - 1).mean())
    result["zero_fraction"] = float((tokens == 0).mean())

    # encode_adata: permuted gene order + 1% of entries recorded missing (CSR bool).
    n_ad = min(args.adata_samples, n)
    rng = np.random.default_rng(args.seed + 1)
    order = rng.permutation(g)
    missing = sp.random(n_ad, g, density=0.01, format="csr", random_state=args.seed)
    missing.data[:] = 1
    adata = ad.AnnData(tpm[:n_ad, order])
    adata.var_names = [genes[j] for j in order]
    adata.layers["missing"] = missing.astype(bool)
    aligned, adata_s = _timed(lambda: tokenizer.encode_adata(adata))
    result.update(adata_samples=n_ad, adata_samples_per_s=n_ad / adata_s)
    rows, cols = missing.nonzero()
    expect = tokens[:n_ad].copy()
    expect[rows, order[cols]] = tokenizer.mask_token_id  # adata column j is gene order[j]
    result["adata_equal"] = bool(np.array_equal(aligned, expect))
    result["adata_masked_fraction"] = float((aligned == tokenizer.mask_token_id).mean())

    # On-the-fly masking of the pre-training loader, per sample.
    n_mask = min(args.mask_samples, n)
    dataset = MaskedTokenDataset(
        tokens[:n_mask].astype(np.int16), np.arange(n_mask), n_bins=64, mask_token_id=64, seed=0
    )
    _, mask_s = _timed(lambda: [dataset[(0, i)] for i in range(n_mask)])
    result.update(mask_samples=n_mask, mask_samples_per_s=n_mask / mask_s)
    result["peak_rss_mb"] = common.peak_rss_mb()
    result["rss_before_mb"] = rss0
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--genes", type=int, default=19_062)
    p.add_argument("--factor", type=float, default=NORMALIZATION_FACTOR)
    p.add_argument("--reference-samples", type=int, default=200)
    p.add_argument("--adata-samples", type=int, default=2000)
    p.add_argument("--mask-samples", type=int, default=200)
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (for tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.samples, args.genes = 40, 300
        args.reference_samples = args.adata_samples = args.mask_samples = 20
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.setup_torch(args.threads)  # the masking uses torch
    print(common.machine_line(args.threads))
    print(f"tokenize_speed: {args.samples} samples x {args.genes} genes (synthetic TPM)")
    r = run(args)
    print(
        f"  BinTokenizer.encode: {r['encode_s']:.2f} s for {r['samples']} samples "
        f"({r['encode_samples_per_s']:.0f} samples/s, {r['encode_values_per_s'] / 1e6:.0f} M "
        f"values/s; {r['input_mb']:.0f} MB float32 in, {r['output_mb']:.0f} MB int64 out)"
    )
    print(
        f"  naive np.digitize reference: {r['reference_samples_per_s']:.0f} samples/s on "
        f"{r['reference_samples']} samples -> vectorised is {r['speedup_vs_reference']:.1f}x "
        f"faster; tokens identical: {r['reference_equal']}"
    )
    print(
        f"  encode_adata (permuted genes, CSR missing layer): {r['adata_samples_per_s']:.0f} "
        f"samples/s on {r['adata_samples']} samples; equal to encode + mask: {r['adata_equal']}"
    )
    print(
        f"  MLM masking (MaskedTokenDataset item): {r['mask_samples_per_s']:.0f} samples/s "
        "per loader worker"
    )
    print(
        f"  token mix: {100 * r['zero_fraction']:.1f}% zeros, "
        f"{100 * r['clamped_fraction']:.2f}% in the top bin; peak RSS "
        f"{r['peak_rss_mb']:.0f} MB (data generation {r['generate_s']:.1f} s, not counted)"
    )
    common.write_json(args.json, r)
    return r


if __name__ == "__main__":
    main()
