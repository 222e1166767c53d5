"""scBERT (Yang et al. 2022) as a frozen ``bulkfm bench`` embedder.

Published recipe (TencentAILabHealthcare/scBERT: ``preprocess.py``, ``pretrain.py``,
``predict.py``), and what this adapter does with bulk samples:

- Genes: the 16,906 PanglaoDB gene symbols, in the order of the release's reference
  h5ad (``panglao_10000.h5ad``); genes the data lacks are zero-filled, as
  ``preprocess.py`` does. The symbols are mapped to the data's Ensembl ids through
  the data layer (approved, previous and alias symbols), with a coverage report.
- Values: raw counts -> ``normalize_total(target_sum=1e4)`` over the vocabulary genes
  -> ``log1p(x, base=2)``; then per gene ``min(value, 5)`` truncated to an integer, giving
  tokens 0-5 (``bin_num`` 5, ``CLASS`` = bin_num + 2 = 7 token ids, 6 being the
  pre-training mask token), and one token 0 appended at the end (position 16,907,
  whose Gene2Vec row is zero). The arithmetic is scanpy's on the float32 matrix
  ``preprocess.py`` builds, step for step: the total is a sequential float32 sum, the
  values are divided by ``total / 1e4`` (not multiplied by ``1e4 / total``), then
  ``log1p`` and division by ``ln 2``. Because the token truncates, values that land
  exactly on ``2^k - 1`` after normalisation would otherwise come out one token lower.
  Counts are taken from ``layers["counts"]`` when the
  data has that layer; otherwise the TPM in X are normalised the same way (TPM are
  length-corrected, so the values differ from counts; the coverage report's
  ``expression`` entry records which was used). ``layer`` overrides this.
- Network: ``PerformerLM(num_tokens=7, dim=200, depth=6, heads=10, dim_head=64,
  max_seq_len=16,907, g2v_position_emb=True, local_attn_heads=0)`` with FAVOR+
  attention (266 random features per head, loaded from the checkpoint, never
  redrawn); see :mod:`bulkfm.adapters.scbert_net` for the one deliberate deviation
  (the key-feature max is taken per sample instead of per batch, which equals the
  published batch-size-1 computation). The final LayerNorm output is the encoding.
- Pooling: scBERT publishes none for embeddings (its classifier convolves all 16,907
  positions). ``pooling="present"`` (default) averages over the vocabulary genes the
  sample has (benchmark: mean over valid gene tokens), so zero-filled genes the data
  never measured do not dilute the mean; ``"genes"`` averages over all 16,906 gene
  positions (the zero-filled published input treated as data); ``"all"`` also
  includes the appended end position, i.e. ``encodings.mean(1)`` over the whole
  output. The end position is excluded by default: it is a constant token with a
  zero position vector, not a gene.
- Coverage: fewer than ``min_coverage`` (default 0.5) of the 16,906 genes found is an
  error, because the missing genes are fed as zero expression and also shift the
  per-sample normalisation.

Checkpoint folder: ``panglao_pretrain.pth`` as released (a torch pickle holding
``model_state_dict``; read only with ``trust_pickle=True``, through
``torch.load(weights_only=True)``) or a safetensors copy of that state dict
(``panglao_pretrain.safetensors``, or any single ``*.safetensors``), plus the gene
list: ``gene_list.txt`` (one symbol per line, reference order) or the reference
``panglao_10000.h5ad`` (its ``var_names`` are read). ``gene_list=PATH`` points
elsewhere. The sizes are read from the weight shapes (the release has no config
file). Not verifiable offline: the released file's exact tensor dtypes (the Gene2Vec
table is likely float64; it is cast to float32) and whether the release holds the
full training checkpoint or only ``model_state_dict`` (both are accepted).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bulkfm.adapters.base import (
    FoundationEmbedder,
    batch_slices,
    file_digest,
    gene_input,
    load_state_dict_strict,
    masked_mean,
    read_state_dict,
)
from bulkfm.embedders.registry import register_embedder
from bulkfm.errors import CheckpointError, ConfigError, ExpressionValueError

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

__all__ = ["POOLINGS", "ScbertEmbedder", "read_gene_list", "scbert_tokens"]

POOLINGS = ("present", "genes", "all")
CHECKPOINT_FILES = ("panglao_pretrain.safetensors", "model.safetensors", "panglao_pretrain.pth")
GENE_LIST_FILES = ("gene_list.txt", "genes.txt", "panglao_genes.txt")
REFERENCE_H5AD_FILES = ("panglao_10000.h5ad", "panglao_human.h5ad")
TARGET_SUM = 1e4
# Expression rows processed together: bounds the dense [rows, 16,906] copy.
_CHUNK_ROWS = 512


# --------------------------------------------------------------------------- preprocessing


def scbert_tokens(values: np.ndarray, *, n_bins: int = 5) -> np.ndarray:
    """scBERT's input tokens for each row of raw expression on the model's genes.

    Per row, as ``sc.pp.normalize_total(target_sum=1e4)`` then ``sc.pp.log1p(base=2)``
    compute it on the float32 CSR matrix of the published ``preprocess.py``: the total
    as a sequential float32 sum, ``x / (total / 1e4)``, ``log1p`` divided by ``ln 2``;
    then ``predict.py``'s cap at ``n_bins`` and ``.long()`` truncation, and the end
    token 0 appended. Returns int64 [rows, genes + 1].
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ExpressionValueError(
            f"scBERT: expected a 2-D samples x genes array, got {values.ndim}-D"
        )
    if (values < 0).any():
        raise ExpressionValueError(
            "scBERT: negative expression values; scBERT expects raw counts or TPM "
            "(not log-transformed or centred data): pass un-logged values"
        )
    # scanpy's CSR kernel adds a row's entries one by one in float32; cumsum does the
    # same (zeros add nothing), where a pairwise .sum() could differ in the last bit.
    if values.shape[1]:
        totals = np.cumsum(values, axis=1, dtype=np.float32)[:, -1:]
    else:
        totals = np.zeros((len(values), 1), dtype=np.float32)
    empty = np.flatnonzero(totals[:, 0] <= 0)
    if empty.size:
        raise ExpressionValueError(
            f"scBERT: {empty.size} sample(s) (row(s) {empty[:5].tolist()}) have no expression "
            "on any of the model's genes; drop them or check the gene ids"
        )
    normalised = values / (totals / np.float32(TARGET_SUM))
    logged = np.log1p(normalised)
    np.divide(logged, np.log(2.0), out=logged)  # float64 divisor, float32 result, as scanpy
    tokens = np.minimum(logged, n_bins).astype(np.int64)
    return np.concatenate([tokens, np.zeros((len(tokens), 1), dtype=np.int64)], axis=1)


# --------------------------------------------------------------------------- gene list


def _read_text_list(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def _read_h5ad_genes(path: Path) -> list[str]:
    import anndata as ad

    try:
        adata = ad.read_h5ad(path, backed="r")
    except Exception as exc:  # any read failure means an unusable file
        raise CheckpointError(f"scBERT: could not read the gene list from {path}: {exc}") from exc
    try:
        return [str(g) for g in adata.var_names]
    finally:
        adata.file.close()


def read_gene_list(path: str | os.PathLike) -> list[str]:
    """The model's gene symbols in model order, from a text file or an h5ad's var_names.

    ``path`` is a file (``.txt``: one symbol per line; ``.h5ad``: the release's reference
    data) or a folder searched for the names in ``GENE_LIST_FILES`` then
    ``REFERENCE_H5AD_FILES``.
    """
    path = Path(path)
    if path.is_dir():
        for name in (*GENE_LIST_FILES, *REFERENCE_H5AD_FILES):
            if (path / name).is_file():
                return read_gene_list(path / name)
        raise CheckpointError(
            f"scBERT: no gene list in {path} (looked for {', '.join(GENE_LIST_FILES)} or the "
            f"reference data {', '.join(REFERENCE_H5AD_FILES)}). scBERT's 16,906 genes are the "
            "var_names of the release's panglao_10000.h5ad: put that file in the folder, or "
            "write its var_names one per line to gene_list.txt, or pass gene_list=PATH"
        )
    if not path.is_file():
        raise CheckpointError(f"scBERT: gene list {path} not found; pass an existing file")
    genes = _read_h5ad_genes(path) if path.suffix == ".h5ad" else _read_text_list(path)
    if not genes:
        raise CheckpointError(f"scBERT: gene list {path} is empty; it must hold 16,906 symbols")
    return genes


# --------------------------------------------------------------------------- the embedder


def _model_state(raw: Any, path: Path) -> dict[str, Any]:
    """The network's tensors: the release nests them under ``model_state_dict``."""
    if isinstance(raw, dict) and "model_state_dict" in raw:
        raw = raw["model_state_dict"]
    if not isinstance(raw, dict) or not all(hasattr(v, "shape") for v in raw.values()):
        raise CheckpointError(
            f"scBERT: {path.name} is neither a state dict nor a checkpoint dict with "
            "'model_state_dict'; pass the released panglao_pretrain.pth"
        )
    return dict(raw)


@register_embedder("scbert")
class ScbertEmbedder(FoundationEmbedder):
    """scBERT's frozen encoder on bulk samples (see the module docstring for the recipe)."""

    model_name: ClassVar[str] = "scBERT"
    extra: ClassVar[str] = "scbert"
    # 2: scanpy's normalisation arithmetic (tokens at exactly 2^k - 1 no longer one lower).
    version: ClassVar[int] = 2

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        pooling: str = "present",
        layer: str | None = "auto",
        gene_list: str | os.PathLike | None = None,
        min_coverage: float = 0.5,
        batch_size: int = 2,
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
        if pooling not in POOLINGS:
            raise ConfigError(f"scBERT: pooling={pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        folder = self.path if self.path.is_dir() else self.path.parent
        self.gene_list_path = Path(gene_list).expanduser() if gene_list is not None else folder
        self._genes: list[str] | None = None
        self._genes_digest: str | None = None

    def _gene_list_digest(self) -> str | None:
        if self._genes_digest is None:
            path = self.gene_list_path
            if path.is_dir():
                names = (*GENE_LIST_FILES, *REFERENCE_H5AD_FILES)
                path = next((path / n for n in names if (path / n).is_file()), path)
            self._genes_digest = file_digest(path) if path.is_file() else ""
        return self._genes_digest or None

    def settings(self) -> dict[str, Any]:
        return {
            "pooling": self.pooling,
            "gene_list": self._gene_list_digest(),
        }

    @property
    def genes(self) -> list[str]:
        """The model's gene symbols in model order (read on first use)."""
        if self._genes is None:
            self._genes = read_gene_list(self.gene_list_path)
        return self._genes

    def _checkpoint_file(self) -> Path:
        if self.path.is_file():
            return self.path
        for name in CHECKPOINT_FILES:
            if (self.path / name).is_file():
                return self.path / name
        tensors = sorted(self.path.glob("*.safetensors"))
        if len(tensors) == 1:
            return tensors[0]
        present = sorted(p.name for p in self.path.iterdir())[:10]
        raise CheckpointError(
            f"scBERT: no checkpoint in {self.path} (looked for {', '.join(CHECKPOINT_FILES)} "
            f"or a single *.safetensors; the folder has {present}); "
            "put the released panglao_pretrain.pth there or pass the file itself"
        )

    def load(self) -> Any:
        from bulkfm.adapters.scbert_net import ScbertNet, ScbertShape

        path = self._checkpoint_file()
        state = _model_state(
            read_state_dict(path, trust_pickle=self.trust_pickle, model="scBERT"), path
        )
        shape = ScbertShape.from_state_dict(state)
        n_genes = len(self.genes)
        if n_genes != shape.n_positions - 1:
            raise CheckpointError(
                f"scBERT: the gene list has {n_genes} genes but the checkpoint has "
                f"{shape.n_positions} positions (genes + 1 end position); use the gene list "
                "released with these weights"
            )
        net = ScbertNet(shape)
        # The pre-training head (bin logits) or a fine-tuning classifier is not used.
        load_state_dict_strict(net, state, model="scBERT", ignore=("to_out.",))
        logger.info("scBERT: loaded %s (%s)", path.name, shape)
        return net

    def embed(self, adata: ad.AnnData) -> np.ndarray:
        import torch

        net = self.network
        layer = self.source_layer(adata)
        n_bins = net.shape.num_tokens - 2
        outputs: list[np.ndarray] = []
        for chunk in range(0, adata.n_obs, _CHUNK_ROWS):
            rows = slice(chunk, min(chunk + _CHUNK_ROWS, adata.n_obs))
            gi = gene_input(
                adata,
                self.genes,
                id_type="symbol",
                layer=layer,
                model=self.model_name,
                min_fraction=self.min_coverage,
                rows=rows,
            )
            if chunk == 0:
                self.coverage_ = {
                    **gi.report,
                    "expression": f"layers[{layer!r}]" if layer else "X (TPM)",
                    "pooling": self.pooling,
                }
            tokens = scbert_tokens(gi.values, n_bins=n_bins)
            mask = np.ones(tokens.shape, dtype=bool)
            if self.pooling == "present":
                mask[:, :-1] = gi.present
            if self.pooling != "all":
                mask[:, -1] = False
            for sl in batch_slices(len(tokens), self.batch_size, desc="scBERT"):
                batch = torch.from_numpy(tokens[sl]).to(self.device)
                hidden = net(batch)
                pooled = masked_mean(hidden, torch.from_numpy(mask[sl]).to(self.device))
                outputs.append(pooled.float().cpu().numpy())
        return np.concatenate(outputs, axis=0)
