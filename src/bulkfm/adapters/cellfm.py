"""CellFM (Zeng et al., Nat. Commun. 2025) as a frozen ``bulkfm bench`` embedder.

What was verified in the authors' public code (github.com/biomed-AI/CellFM,
MindSpore; and github.com/biomed-AI/CellFM-torch, their PyTorch port):

* Architecture ("ERetNet"): a gene-id embedding ``gene_emb`` (row 0 = padding, rows
  rounded up to a multiple of 8) plus a value embedding of the continuous
  expression (a 1 -> 256 -> 256 soft lookup into a 256 x d table), a learned
  ``cls_token`` in front, then L post-norm layers of multi-head *linear* retention
  (ReLU feature maps on Q and K, no softmax, no decay, V scaled by 1/sqrt(#genes),
  a parameter-free RMS norm per head, output gated by SiLU(U)) and a gated bilinear
  feed-forward o(u(x) * v(x)), with DeepNorm residual scaling (2L)^(1/4).
  MindSpore defaults apply (LayerNorm epsilon 1e-7, LeakyReLU slope 0.2).
  Released sizes: 80M = width 1536, 2 layers, 48 heads, 27,855 genes
  (``expand_gene_info.csv``; about 81.0M encoder parameters); the 800M model of the
  paper = width 1536, 40 layers, 48 heads (``config.py``), with ``gene_info.csv``
  (24,078 genes in ``data_process.py``; ~793M parameters). Head count cannot be read
  from the weights: ``num_heads`` (default 48) must match.
* Input (``data_process.py`` and the cell-annotation tutorial): counts are first
  capped to a depth of 1e5 and rounded, ``round(x / max(1, total / 1e5))`` (total
  over all of the sample's genes); genes are restricted to the vocabulary; the
  total T is recomputed over vocabulary genes and values become
  ``log1p(x / T * 1e4)``; only expressed (non-zero) genes are tokens; when more
  than 2,048 are expressed the published loader keeps 2,048 drawn at random
  without replacement with probability proportional to ``log1p(count)``.
* Pooling: the CLS token's output of the last layer (``emb[:, 0]``), as the authors'
  ``Backbone``/fine-tuning heads use it. Padding is zeroed and masked out of the
  retention keys in every layer (as the ``Backbone`` does), which also makes the
  output independent of the batch.

Two official forward passes (``implementation``):

* ``"mindspore"`` (default): the authors' MindSpore ``Backbone.encode`` as their
  tutorials embed with it: CLS + genes. Default because the released weights were
  trained by that code, under MindSpore's LayerNorm epsilon and LeakyReLU slope.
* ``"pytorch_port"``: ``FinetuneModel.encode`` of CellFM-torch, the authors' PyTorch
  port: CLS, then the two learned ``ST_emb`` tokens, then genes, with PyTorch's
  defaults (LayerNorm epsilon 1e-5, LeakyReLU slope 0.01) and V scaled by
  1/sqrt(#genes - 3 + 1e-6). In pre-training the ST tokens carried the sample's
  depth features through ``ST_enc``; the port's eval path feeds ``ST_emb`` alone.
  It needs ``ST_emb`` in the checkpoint. The CLS output is the embedding in both.

Bulk-specific choices (published behaviour kept as options):

* ``gene_selection="top"`` (default): the ``max_genes`` (2,048) most expressed
  genes, deterministic. ``"random"`` is the published random draw (seeded per sample
  id by ``seed``), which discards a random part of a bulk profile, where typically
  15k+ vocabulary genes are expressed. ``max_genes=None`` keeps every expressed gene
  (retention is linear in length, but 8-10x the tokens of the published recipe).
* ``depth_cap=1e5`` (published) quantises to integer counts at <= 1e5 depth, which
  for single cells was a no-op and for bulk zeroes genes below ~5 per million;
  ``depth_cap=None`` skips it.
* Input: ``layers["counts"]`` when present (the model was trained on counts), else
  X (TPM): the per-sample normalisation to 1e4 makes TPM an acceptable stand-in
  (length-normalised instead of raw). The coverage record names the source.

Checkpoint formats: the released MindSpore ``.ckpt`` (a protocol-buffer file, read
here without MindSpore and without unpickling; optimiser moments, decoders and
``append_dict`` strings it may carry are skipped; a ``crc_check`` trailer is
verified; BFloat16 tensors are read exactly) and ``.safetensors`` with the same
tensor names. A PyTorch pickle (``.pt``/``.pth``/``.bin``, e.g. written from the
CellFM-torch port, whose LayerNorm tensors are ``post_norm*.weight/bias``) is read only with
``trust_pickle=True``. The gene file (``expand_gene_info.csv`` for the 80M release;
its first column holds HGNC symbols, id = row + 1) must lie next to the weights.
Not verified: the exact tensor list of the released file (decoder and optimiser
tensors are tolerated by name) and the 800M release's file names.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp

from bulkfm import schema as keys
from bulkfm.adapters.base import (
    FoundationEmbedder,
    batch_slices,
    find_file,
    gene_input,
    load_state_dict_strict,
    read_state_dict,
)
from bulkfm.config import check_int, check_number
from bulkfm.embedders.registry import register_embedder
from bulkfm.errors import CheckpointError, ConfigError, ExpressionValueError

if TYPE_CHECKING:
    import anndata as ad
    import torch

logger = logging.getLogger(__name__)

__all__ = ["CellFMEmbedder", "cellfm_normalise", "select_genes"]

MODEL = "CellFM"
WEIGHT_FILES = ("CellFM_80M_weight.ckpt", "CellFM_800M_weight.ckpt", "model.safetensors")
WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
GENE_FILES = ("expand_gene_info.csv", "gene_info.csv")
TARGET_SUM = 1e4
# The two official forward passes (cellfm_net.VARIANTS holds what differs between them).
IMPLEMENTATIONS = ("mindspore", "pytorch_port")
# Tensors a released checkpoint may carry that the encoder never uses: the
# pre-training decoders, embeddings of the unused zero/ST modes, optimiser state.
UNUSED_PREFIXES = (
    "value_dec.",
    "cellwise_dec.",
    "zero_emb",
    "ST_emb",
    "ST_enc.",
    "moment1.",
    "moment2.",
    "adam_m.",
    "adam_v.",
    "global_step",
    "learning_rate",
    "beta1_power",
    "beta2_power",
    "current_iterator_step",
    "last_overflow_iterator_step",
    "loss_scale",
    "scale_sense",
)
_OPTIMISER = ("moment1.", "moment2.", "adam_m.", "adam_v.")
_TORCH_LAYER_NORM = re.compile(r"(post_norm\d+)\.(weight|bias)$")


# --------------------------------------------------------------------------- preprocessing


def cellfm_normalise(
    values: np.ndarray, present: np.ndarray, totals: np.ndarray, *, depth_cap: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """CellFM's published value transform on vocabulary-ordered expression.

    Returns ``(counts, normalised)``: the (depth-capped, rounded) counts that decide
    which genes are expressed, and ``log1p(counts / T * 1e4)`` with T the sample's
    total over present vocabulary genes. ``totals`` is each sample's total over *all*
    its genes (the published cap uses it before restricting to the vocabulary).
    """
    x = np.where(present, values, 0.0).astype(np.float64)
    if depth_cap is not None:
        x = np.round(x / np.maximum(1.0, totals / depth_cap)[:, None])
    vocab_total = x.sum(axis=1)
    empty = np.flatnonzero(vocab_total <= 0)
    if empty.size:
        raise ExpressionValueError(
            f"{MODEL}: {empty.size} samples (rows {empty[:5].tolist()}) have no expression on "
            "the model's genes after the published depth cap; remove them, or pass "
            "depth_cap=None (--model-arg cellfm:depth_cap=null) if the values are tiny"
        )
    normalised = np.log1p(x / vocab_total[:, None] * TARGET_SUM)
    return x.astype(np.float32), normalised.astype(np.float32)


def select_genes(
    counts: np.ndarray,
    raw: np.ndarray,
    *,
    max_genes: int | None,
    mode: Literal["top", "random"],
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Vocabulary positions fed to the model for one sample, in vocabulary order.

    Only expressed genes (``counts > 0``) are candidates. Beyond ``max_genes``:
    "top" keeps the most expressed (ties by the unrounded value ``raw``, then
    vocabulary order); "random" is the published draw without replacement with
    probability proportional to ``log1p(count)``.
    """
    expressed = np.flatnonzero(counts > 0)
    if max_genes is None or expressed.size <= max_genes:
        return expressed
    if mode == "top":
        order = np.lexsort((expressed, -raw[expressed]))
        return np.sort(expressed[order[:max_genes]])
    if rng is None:
        raise ConfigError(f"{MODEL}: gene_selection='random' needs a random generator")
    weights = np.log1p(counts[expressed].astype(np.float64))
    chosen = rng.choice(expressed.size, size=max_genes, replace=False, p=weights / weights.sum())
    return np.sort(expressed[chosen])


def _sample_rng(seed: int, sample_id: str) -> np.random.Generator:
    """A generator per sample id, so a draw does not depend on batch or row order."""
    return np.random.default_rng([seed, zlib.crc32(sample_id.encode())])


def _row_totals(source: Any, rows: slice) -> np.ndarray:
    block = source[rows]
    totals = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
    if not np.isfinite(totals).all():
        raise ExpressionValueError(f"{MODEL}: the expression contains NaN or inf; fix the input")
    return totals


def _check_non_negative(values: np.ndarray) -> None:
    if (values < 0).any():
        raise ExpressionValueError(
            f"{MODEL}: negative expression values; CellFM needs raw counts or TPM (not "
            "log-transformed or centred data): pass the unlogged matrix"
        )


# --------------------------------------------------------------------------- files


def load_gene_file(path: Path) -> list[str]:
    """Gene symbols of a CellFM gene file, in model order (model id = position + 1)."""
    import pandas as pd

    try:
        genes = pd.read_csv(path, index_col=0, header=0).index.astype(str).tolist()
    except Exception as exc:  # any parse failure means a bad file
        raise CheckpointError(f"{MODEL}: cannot read the gene file {path}: {exc}") from exc
    if not genes:
        raise CheckpointError(f"{MODEL}: the gene file {path} lists no genes")
    dupes = sorted(g for g, n in Counter(genes).items() if n > 1)
    if dupes:
        raise CheckpointError(
            f"{MODEL}: the gene file {path} repeats genes {dupes[:5]}; use the released file"
        )
    return genes


def _weights_path(folder: Path, name: str | None) -> Path:
    if folder.is_file():
        return folder
    if name is not None:
        return find_file(folder, [name], what="weights file", model=MODEL)
    for candidate in WEIGHT_FILES:
        if (folder / candidate).is_file():
            return folder / candidate
    hits = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(hits) == 1:
        return hits[0]
    raise CheckpointError(
        f"{MODEL}: {'several' if hits else 'no'} weight files in {folder} "
        f"({[p.name for p in hits][:10]}); expected {WEIGHT_FILES[0]} (the 80M release) or one "
        "*.ckpt / *.safetensors file; choose one with --model-arg cellfm:weights=FILE"
    )


def _is_pickle_container(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def read_cellfm_state(path: Path, *, trust_pickle: bool) -> dict[str, Any]:
    """Tensors of a CellFM weights file under the MindSpore release's names."""
    from bulkfm.adapters.cellfm_net import read_mindspore_checkpoint

    if path.suffix == ".ckpt" and not _is_pickle_container(path):
        return read_mindspore_checkpoint(path, keep=lambda k: not k.startswith(_OPTIMISER))
    state = read_state_dict(path, trust_pickle=trust_pickle, model=MODEL)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    # The PyTorch port renames MindSpore's LayerNorm gamma/beta to weight/bias.
    return {_TORCH_LAYER_NORM.sub(_ms_norm_name, k): v for k, v in state.items()}


def _ms_norm_name(match: re.Match[str]) -> str:
    return f"{match.group(1)}.{'gamma' if match.group(2) == 'weight' else 'beta'}"


def _n_layers(state: dict[str, Any]) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.(\d+)\.", k))}
    if not ids:
        raise CheckpointError(
            f"{MODEL}: the checkpoint has no encoder.N.* tensors (keys start "
            f"{sorted(state)[:10]}); pass the released CellFM pre-trained weights"
        )
    return max(ids) + 1


# --------------------------------------------------------------------------- embedder


@register_embedder("cellfm")
class CellFMEmbedder(FoundationEmbedder):
    """CellFM's CLS embedding of a bulk profile (see the module docstring)."""

    model_name = MODEL
    extra = "cellfm"

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        max_genes: int | None = 2048,
        gene_selection: Literal["top", "random"] = "top",
        implementation: Literal["mindspore", "pytorch_port"] = "mindspore",
        depth_cap: float | None = 1e5,
        layer: str | None = "auto",
        num_heads: int = 48,
        seed: int = 0,
        weights: str | None = None,
        gene_file: str | None = None,
        min_coverage: float = 0.05,
        batch_size: int = 8,
        device: str = "cpu",
        trust_pickle: bool = False,
        label: str | None = None,
    ) -> None:
        super().__init__(
            model_dir,
            layer=layer,
            min_coverage=min_coverage,
            batch_size=batch_size,
            device=device,
            trust_pickle=trust_pickle,
            label=label,
        )
        self.max_genes = None if max_genes is None else check_int("max_genes", max_genes, 1)
        if gene_selection not in ("top", "random"):
            raise ConfigError(
                f"{MODEL}: gene_selection={gene_selection!r}; choose 'top' (deterministic, "
                "default) or 'random' (the published random draw)"
            )
        self.gene_selection = gene_selection
        if implementation not in IMPLEMENTATIONS:
            raise ConfigError(
                f"{MODEL}: implementation={implementation!r}; choose 'mindspore' (the "
                "authors' MindSpore forward pass the weights were trained with, default) or "
                "'pytorch_port' (CellFM-torch's encode, with the two ST_emb tokens)"
            )
        self.implementation = implementation
        if depth_cap is not None:
            hint = "published: 1e5; null skips the cap"
            depth_cap = check_number(
                f"{MODEL}: depth_cap", depth_cap, low=0.0, low_open=True, hint=hint
            )
        self.depth_cap = depth_cap
        self.num_heads = check_int("num_heads", num_heads, 1)
        self.seed = check_int("seed", seed, 0)
        self.weights = weights
        self.gene_file = gene_file
        self._genes: list[str] | None = None

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_genes": self.max_genes,
            "gene_selection": self.gene_selection,
            "implementation": self.implementation,
            "depth_cap": self.depth_cap,
            "num_heads": self.num_heads,
            "weights": self.weights,
            "gene_file": self.gene_file,
        }
        if self.gene_selection == "random":
            out["seed"] = self.seed
        return out

    # ------------------------------------------------------------------ files

    @property
    def genes(self) -> list[str]:
        """The model's gene symbols in model order (from the gene file beside the weights)."""
        if self._genes is None:
            folder = self.path.parent if self.path.is_file() else self.path
            names = [self.gene_file] if self.gene_file else list(GENE_FILES)
            self._genes = load_gene_file(find_file(folder, names, what="gene file", model=MODEL))
        return self._genes

    def load(self) -> torch.nn.Module:
        from bulkfm.adapters.cellfm_net import CellFMConfig, CellFMNet

        path = _weights_path(self.path, self.weights)
        state = read_cellfm_state(path, trust_pickle=self.trust_pickle)
        if "cls_token" not in state or "gene_emb" not in state:
            raise CheckpointError(
                f"{MODEL}: {path.name} lacks cls_token/gene_emb (keys start {sorted(state)[:10]}); "
                "pass the released CellFM pre-trained weights"
            )
        config = CellFMConfig(
            n_genes=len(self.genes),
            dims=int(state["cls_token"].shape[-1]),
            n_layers=_n_layers(state),
            n_heads=self.num_heads,
            variant=self.implementation,
        )
        if config.st_tokens and "ST_emb" not in state:
            raise CheckpointError(
                f"{MODEL}: implementation='pytorch_port' feeds the two ST_emb tokens, but "
                f"{path.name} has no ST_emb tensor; use implementation='mindspore' (default)"
            )
        rows = int(state["gene_emb"].shape[0])
        if rows != config.embedding_rows:
            raise CheckpointError(
                f"{MODEL}: the gene file lists {config.n_genes} genes (gene_emb would need "
                f"{config.embedding_rows} rows) but {path.name} has {rows}; use the gene file "
                "released with these weights (80M: expand_gene_info.csv, 27,855 genes)"
            )
        net = CellFMNet(config)
        ignore = tuple(p for p in UNUSED_PREFIXES if not (config.st_tokens and p == "ST_emb"))
        load_state_dict_strict(net, state, model=MODEL, ignore=ignore)
        logger.info(
            "%s: %s, width %d, %d layers, %d heads, %d genes",
            MODEL,
            path.name,
            config.dims,
            config.n_layers,
            config.n_heads,
            config.n_genes,
        )
        return net

    # ------------------------------------------------------------------ embedding

    def tokens(
        self, adata: ad.AnnData, rows: slice, layer: str | None
    ) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, Any]]:
        """Per sample of ``rows``: 1-based gene ids and normalised values fed to the model."""
        gi = gene_input(
            adata,
            self.genes,
            id_type="symbol",
            layer=layer,
            model=MODEL,
            min_fraction=self.min_coverage,
            rows=rows,
        )
        _check_non_negative(gi.values)
        source = adata.layers[layer] if layer else adata.X
        if sp.issparse(source):
            source = sp.csr_matrix(source)
        totals = _row_totals(source, rows)
        counts, normalised = cellfm_normalise(
            gi.values, gi.present, totals, depth_cap=self.depth_cap
        )
        names = adata.obs_names[rows]
        ids, vals = [], []
        for i in range(counts.shape[0]):
            rng = _sample_rng(self.seed, str(names[i])) if self.gene_selection == "random" else None
            keep = select_genes(
                counts[i], gi.values[i], max_genes=self.max_genes, mode=self.gene_selection, rng=rng
            )
            ids.append(keep + 1)
            vals.append(normalised[i, keep])
        return ids, vals, gi.report

    def embed(self, adata: ad.AnnData) -> np.ndarray:
        import torch

        layer = self.source_layer(adata)
        net = self.network
        chunk = max(self.batch_size, 256)
        out, lengths, report = [], [], None
        for start in range(0, adata.n_obs, chunk):
            rows = slice(start, min(start + chunk, adata.n_obs))
            ids, vals, rep = self.tokens(adata, rows, layer)
            report = report or rep
            lengths += [len(i) for i in ids]
            for part in batch_slices(len(ids), self.batch_size, desc=MODEL):
                out.append(self._forward(net, ids[part], vals[part], torch))
        self.coverage_ = {
            **(report or {}),
            "input": "counts" if layer == keys.COUNTS else (f"layers[{layer!r}]" if layer else "X"),
            "max_genes": self.max_genes,
            "gene_selection": self.gene_selection,
            "implementation": self.implementation,
            "tokens_per_sample_mean": float(np.mean(lengths)),
            "n_samples_truncated": int(sum(n == self.max_genes for n in lengths)),
        }
        return np.concatenate(out, axis=0)

    def _forward(self, net: Any, ids: list[np.ndarray], vals: list[np.ndarray], torch: Any):
        if self.implementation == "pytorch_port" and min(len(i) for i in ids) <= 3:
            raise ExpressionValueError(
                f"{MODEL}: a sample has 3 or fewer expressed genes, and the PyTorch port scales "
                "by 1/sqrt(#genes - 3), which is undefined there; drop such samples or use "
                "implementation='mindspore'"
            )
        width = max(len(i) for i in ids)
        genes = np.zeros((len(ids), width), dtype=np.int64)
        values = np.zeros((len(ids), width), dtype=np.float32)
        valid = np.zeros((len(ids), width), dtype=bool)
        for r, (g, v) in enumerate(zip(ids, vals, strict=True)):
            genes[r, : len(g)] = g
            values[r, : len(v)] = v
            valid[r, : len(g)] = True
        dev = self.device
        hidden = net(
            torch.from_numpy(genes).to(dev),
            torch.from_numpy(values).to(dev),
            torch.from_numpy(valid).to(dev),
        )
        return hidden[:, 0].float().cpu().numpy()
