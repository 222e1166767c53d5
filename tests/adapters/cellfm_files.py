"""A tiny CellFM release's contents, for the adapter's tests and the MindSpore cross-check.

Not a test module: a helper both import, so no test module imports another.
"""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd

SYMBOLS = [
    "TP53", "GAPDH", "ACTB", "EGFR", "MYC", "KRAS", "PTEN", "CDH1", "ESR1", "ERBB2", "VIM",
    "ALB", "CD4", "PIK3CA", "BRCA1", "BRAF", "APC", "SMAD4", "CDKN2A", "NRAS", "KIT", "MET",
]  # fmt: skip
DIMS, HEADS, LAYERS = 16, 4, 3
ROWS = len(SYMBOLS) + 1 + (-len(SYMBOLS) - 1) % 8  # padding row + round up to 8


def random_weights(seed: int = 1, n_layers: int = LAYERS) -> dict[str, np.ndarray]:
    """Encoder tensors under the release's names, plus what a release carries beside."""
    rng = np.random.default_rng(seed)

    def dense(o, i):
        return (rng.standard_normal((o, i)) / math.sqrt(i)).astype(np.float32)

    w = {
        "gene_emb": (0.5 * rng.standard_normal((ROWS, DIMS))).astype(np.float32),
        "cls_token": (0.5 * rng.standard_normal((1, 1, DIMS))).astype(np.float32),
        "value_enc.value_enc.w1.weight": dense(256, 1) * 3,
        "value_enc.value_enc.w3.weight": dense(256, 256),
        "value_enc.value_enc.table.weight": dense(DIMS, 256) * 4,
        "value_enc.value_enc.a": np.array([[0.3]], dtype=np.float32),
        "value_enc.mask_emb": rng.standard_normal((1, 1, DIMS)).astype(np.float32),
    }
    for i in range(n_layers):
        p = f"encoder.{i}."
        for m in ("q", "k", "v", "u", "o"):
            w[f"{p}attn.{m}_proj.weight"] = dense(DIMS, DIMS)
        for m in ("u", "v", "o"):
            w[f"{p}ffn.{m}_proj.weight"] = dense(DIMS, DIMS)
        for k in (1, 2):
            w[f"{p}post_norm{k}.gamma"] = (1 + 0.1 * rng.standard_normal(DIMS)).astype(np.float32)
            w[f"{p}post_norm{k}.beta"] = (0.1 * rng.standard_normal(DIMS)).astype(np.float32)
    extras = {
        "zero_emb": np.zeros((1, 1, DIMS), np.float32),
        "value_dec.w1.weight": dense(DIMS, DIMS),
        "value_dec.w2.weight": dense(1, DIMS),
        "cellwise_dec.map.weight": dense(DIMS, DIMS),
        "moment1.gene_emb": np.ones((ROWS, DIMS), np.float32),
        "moment2.cls_token": np.ones((1, 1, DIMS), np.float32),
        "global_step": np.array([7], dtype=np.int32),
        "learning_rate": np.array([1e-4], dtype=np.float32),
    }
    return {**w, **extras}


def write_gene_file(path, symbols=SYMBOLS) -> None:
    pd.DataFrame({"HGNC_gene": symbols, "h5_sample_frequency": 1}).to_csv(path, index=False)


def make_adata(ensembl, n=5, seed=0, *, drop=("KIT",), extra=2) -> ad.AnnData:
    """Counts-like data: vocabulary genes (minus ``drop``) and ``extra`` other genes;
    sample 1 expresses only three genes so the batch needs padding."""
    rng = np.random.default_rng(seed)
    genes = [ensembl[s] for s in SYMBOLS if s not in drop]
    genes += ["ENSG00000000003", "ENSG00000000005"][:extra]
    X = rng.gamma(0.7, 2000.0, size=(n, len(genes))).round().astype(np.float32)
    X[rng.random(X.shape) < 0.2] = 0.0
    X[1, 3:] = 0.0
    return ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=genes),
    )


# --------------------------------------------------------------------------- .ckpt writer


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_MS_TYPE = {np.dtype("float32"): "Float32", np.dtype("int32"): "Int32"}


def write_ms_ckpt(path, tensors: dict[str, np.ndarray], split: tuple[str, ...] = ()) -> None:
    """MindSpore checkpoint.proto, proto2 encoding (dims unpacked); names in ``split``
    are stored in two Value entries sharing the tag, as MindSpore slices large tensors."""
    blob = bytearray()
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        chunks = [raw[: len(raw) // 2], raw[len(raw) // 2 :]] if name in split else [raw]
        for chunk in chunks:
            dims = b"".join(_varint(1 << 3 | 0) + _varint(d) for d in arr.shape)
            proto = dims + _field(2, _MS_TYPE[arr.dtype].encode()) + _field(3, chunk)
            blob += _field(1, _field(1, name.encode()) + _field(2, proto))
    path.write_bytes(bytes(blob))
