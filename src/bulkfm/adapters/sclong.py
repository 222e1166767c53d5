"""scLong (Bai et al., ~1B parameters, 27,874 genes) as a frozen benchmark embedder.

What was verified in the public code (github.com/BaiDing1234/scLong: ``embed.py``,
``performer_pytorch_cont/ding_models.py`` and ``performer_pytorch.py``,
``pretrain_dual_4096_all_1b_mix.py``):

- Vocabulary: ``selected_genes_27k.txt``, one Ensembl id per line, 27,874 genes; the
  model input has one more position, a trailing pad whose value is always 0
  (``max_seq_len`` = 27,875).
- Input: one continuous value per gene (no binning), embedded by an MLP
  (1 -> 50 -> 200). ``embed.py`` expects "log1p normalized" expression on Ensembl
  ids and fills the model's genes that the data lacks with 0.
- Gene vectors: a learned table initialised from Gene2vec (``pos_emb``) plus a GO
  vector: a second table smoothed by one ``SGConv`` layer over a Gene Ontology
  similarity graph. The graph (``G_go`` edge index, ``G_go_weight``) is NOT in the
  state dict; it is stored in the hyper-parameter pickle
  ``gocont_4096_48m_pretrain_1b_mix.pkl`` next to the model sizes.
- Dual encoder: the 4,096 highest values per cell go through the large Performer
  (1280-d, 42 layers, 32 heads x 64 in the pre-training script), the rest through
  the mini Performer (200-d, 2 layers, 8 x 64); both are put back in place, gene
  vectors are added again, and a full-length decoder Performer (200-d, 2 layers)
  plus a norm gives one 200-d vector per gene (``merged_decodings``, what
  ``embed.py`` saves). No pooling is published; users pool.
- Checkpoint: ``gocont_4096_48m_pretrain_1b_mix_2024-02-05_16-23-37.pth``, a dict
  whose ``model_state_dict`` loads strictly into ``DualEncoderSCFM``. About 1.0e9
  parameters with the script's sizes (42 x 23.6M in the large encoder).

Files expected in ``model_dir`` (the authors' SharePoint folder linked from the
README): ``selected_genes_27k.txt``, ``gocont_4096_48m_pretrain_1b_mix.pkl`` and the
``.pth`` above (or the same state dict converted to a single ``.safetensors``).
Both release files are pickles: they are read only with ``trust_pickle=True``, the
``.pth`` through ``torch.load(weights_only=True)`` and the ``.pkl`` through an
unpickler that accepts nothing but plain values and tensors. A pickle-free folder
works too: ``sclong_config.json`` (the same hyper-parameters without the graph) and
``go_graph.safetensors`` (tensors ``G_go``, ``G_go_weight``). ``selected_gene2vec_27k.npy``
is not needed: its values are in the state dict.

Choices (published behaviour kept as an option):

- ``normalize``: counts (``layers["counts"]`` when present, else TPM in X) scaled to
  ``target_sum`` = 1e4 over the model's genes, then log1p (the README's "log1p
  normalized"; ``preprocess.py`` normalises to 1e4 after mapping onto the gene list).
  ``scale_max=10`` applies the per-sample rescale to a maximum of 10 that the paper's
  Methods reportedly describe for pre-training data; not in the released code and
  not verified here, so off by default.
- ``missing="zero"`` (published; also how pre-training data filled absent genes) or
  ``"mask"`` (the model's mask token, value -10, for genes the data lacks).
- ``pooling="present"`` (default): mean of the per-gene outputs over the genes the
  sample has; ``"all"``: over all 27,874 vocabulary positions (what averaging the
  released per-gene output gives). The pad position is never pooled.
- Top-4,096 selection: stable descending sort, ties to the lower vocabulary
  position (``torch.topk`` leaves ties unspecified, and bulk profiles have ties).
- ``key_max="sample"`` (default): the Performer's key stabiliser per sample, which
  equals the release run one sample at a time; ``"batch"`` is the release's maximum
  over the whole batch (outputs then depend slightly on batch neighbours).

Not verified: the exact hyper-parameters inside the released ``.pkl`` (taken from
the file at load time; the pre-training script's values are quoted above), whether
the released ``.pth`` reads under ``weights_only=True`` (if not, convert its
``model_state_dict`` once to safetensors in a trusted session), and the pre-training
normalisation. Options the released code supports but the 1B model does not use
(local attention, reversible or rescaled layers, cross attention, generalised
attention) raise :class:`~bulkfm.errors.CheckpointError` rather than run unchecked.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bulkfm import schema as keys
from bulkfm.adapters.base import (
    FoundationEmbedder,
    batch_slices,
    gene_input,
    load_state_dict_strict,
    masked_mean,
    read_state_dict,
    require,
)
from bulkfm.adapters.sclong_config import MODEL, SCLongConfig
from bulkfm.config import check_choice, check_number
from bulkfm.embedders.registry import register_embedder
from bulkfm.errors import CheckpointError, ExpressionValueError

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

__all__ = [
    "GENE_FILE",
    "SCLongConfig",
    "SCLongEmbedder",
    "read_release_pickle",
    "sclong_preprocess",
]

GENE_FILE = "selected_genes_27k.txt"
HYPER_FILE = "gocont_4096_48m_pretrain_1b_mix.pkl"
WEIGHTS_FILE = "gocont_4096_48m_pretrain_1b_mix_2024-02-05_16-23-37.pth"
JSON_CONFIG = "sclong_config.json"
GRAPH_FILE = "go_graph.safetensors"
N_GENES_RELEASED = 27874
MASK_VALUE = -10.0  # the pre-training mask value (any value <= mask_token_thres)
POOLINGS = ("present", "all")
MISSING = ("zero", "mask")
KEY_MAX = ("sample", "batch")


# --------------------------------------------------------------------------- release files


class _ReleaseUnpickler(pickle.Unpickler):
    """Unpickles plain containers and CPU tensors, nothing that can run code."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        allowed: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
            ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
            ("torch", "Size"): torch.Size,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return allowed[(module, name)]


def _storage_from_bytes(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_release_pickle(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, Any]:
    """The released hyper-parameter dict (sizes plus the GO graph tensors).

    Even with ``trust_pickle=True`` only plain values and tensors are accepted.
    """
    path = Path(path)
    if not trust_pickle:
        raise CheckpointError(
            f"{MODEL}: {path.name} is a Python pickle, and loading a pickle can run code chosen "
            "by its author. If it is the authors' release, pass trust_pickle=True (CLI: "
            "--model-arg sclong:trust_pickle=true); or convert it once to sclong_config.json "
            "+ go_graph.safetensors (see the module docstring)"
        )
    try:
        with path.open("rb") as fh:
            params = _ReleaseUnpickler(fh).load()
    except Exception as exc:  # any failure means a file we cannot vouch for
        raise CheckpointError(
            f"{MODEL}: could not read {path} as the released hyper-parameter file: {exc}"
        ) from exc
    if not isinstance(params, dict):
        raise CheckpointError(f"{MODEL}: {path.name} holds {type(params).__name__}, not a dict")
    return params


def _one(folder: Path, preferred: str, pattern: str, what: str) -> Path | None:
    """``preferred`` when present, else the one file matching ``pattern`` (several: error)."""
    if (folder / preferred).is_file():
        return folder / preferred
    hits = sorted(p for p in folder.glob(pattern) if p.is_file() and p.name != GRAPH_FILE)
    if len(hits) > 1:
        raise CheckpointError(
            f"{MODEL}: several {what} files in {folder} ({[p.name for p in hits]}); keep one, "
            f"or name it {preferred}"
        )
    return hits[0] if hits else None


@dataclass
class _ReleaseFiles:
    genes: Path
    weights: Path
    hyper: Path | None
    json_config: Path | None
    graph: Path | None


def _release_files(folder: Path) -> _ReleaseFiles:
    if not folder.is_dir():
        raise CheckpointError(
            f"{MODEL}: {folder} is not a folder; scLong needs a folder holding {GENE_FILE}, "
            f"{HYPER_FILE} and the checkpoint"
        )
    genes = _one(folder, GENE_FILE, "*genes*.txt", "gene list")
    weights = _one(folder, "model.safetensors", "*.safetensors", "safetensors")
    if weights is None:
        weights = _one(folder, WEIGHTS_FILE, "*.pth", "checkpoint")
    json_config = folder / JSON_CONFIG if (folder / JSON_CONFIG).is_file() else None
    graph = folder / GRAPH_FILE if (folder / GRAPH_FILE).is_file() else None
    hyper = None if json_config else _one(folder, HYPER_FILE, "*.pkl", "hyper-parameter")
    missing = [
        name
        for name, hit in (
            (GENE_FILE, genes),
            (f"{WEIGHTS_FILE} (or a .safetensors state dict)", weights),
            (f"{HYPER_FILE} (or {JSON_CONFIG} + {GRAPH_FILE})", hyper or (json_config and graph)),
        )
        if not hit
    ]
    if missing:
        raise CheckpointError(
            f"{MODEL}: {folder} lacks {'; '.join(missing)}. Download them from the scLong "
            "release (README of github.com/BaiDing1234/scLong) into one folder"
        )
    assert genes is not None and weights is not None
    return _ReleaseFiles(genes, weights, hyper, json_config, graph)


def _read_genes(path: Path) -> list[str]:
    genes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not genes:
        raise CheckpointError(f"{MODEL}: the gene list {path} is empty")
    if len(set(genes)) != len(genes):
        raise CheckpointError(f"{MODEL}: the gene list {path} has duplicate ids")
    return genes


def _check_graph(graph: dict[str, Any], n: int) -> None:
    import torch

    edges, weight = graph.get("G_go"), graph.get("G_go_weight")
    if not isinstance(edges, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise CheckpointError(
            f"{MODEL}: the GO graph (G_go, G_go_weight tensors) is missing from the "
            "hyper-parameter file"
        )
    if edges.ndim != 2 or edges.shape[0] != 2 or weight.shape != (edges.shape[1],):
        raise CheckpointError(
            f"{MODEL}: GO graph shapes {tuple(edges.shape)} / {tuple(weight.shape)}: expected "
            "[2, E] edge index and [E] weights"
        )
    if edges.numel() and (int(edges.min()) < 0 or int(edges.max()) >= n):
        raise CheckpointError(f"{MODEL}: GO graph node ids fall outside the {n} model positions")
    if not torch.isfinite(weight).all() or (weight < 0).any():
        # a negative degree has no square root: NaN would flow into every embedding
        raise CheckpointError(
            f"{MODEL}: the GO graph weights must be finite and non-negative; the "
            "hyper-parameter file is damaged or not the released one"
        )


# --------------------------------------------------------------------------- preprocessing


def sclong_preprocess(
    values: np.ndarray,
    present: np.ndarray,
    *,
    target_sum: float = 1e4,
    scale_max: float | None = None,
    missing: str = "zero",
) -> np.ndarray:
    """Model input ``[samples, vocabulary + 1]``: log1p of values scaled to ``target_sum``.

    Library size is summed over the model's genes the sample has. ``scale_max``
    rescales each sample so its maximum equals it (values above are clipped).
    Absent genes are 0 or the mask value; the last column is the pad position (0).
    """
    x = np.where(present, values, 0.0).astype(np.float64)
    if (x < 0).any():
        raise ExpressionValueError(
            f"{MODEL}: negative expression values; give counts or TPM, not logged or centred values"
        )
    total = x.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        bad = int(np.flatnonzero(total[:, 0] <= 0)[0])
        raise ExpressionValueError(
            f"{MODEL}: sample {bad} has no expression on the model's genes; drop it or check "
            "the gene ids"
        )
    x = np.log1p(x / total * target_sum)
    if scale_max is not None:
        top = x.max(axis=1, keepdims=True)
        x = np.where(top > scale_max, np.minimum(x, scale_max), x * (scale_max / top))
    if missing == "mask":
        x = np.where(present, x, MASK_VALUE)
    pad = np.zeros((x.shape[0], 1))
    return np.concatenate([x, pad], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- the embedder


@register_embedder("sclong")
class SCLongEmbedder(FoundationEmbedder):
    """Frozen scLong: mean of its per-gene outputs (200-d) over the sample's genes."""

    model_name: ClassVar[str] = MODEL
    extra: ClassVar[str] = "sclong"

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        pooling: str = "present",
        missing: str = "zero",
        key_max: str = "sample",
        layer: str | None = "auto",
        target_sum: float = 1e4,
        scale_max: float | None = None,
        min_coverage: float = 0.05,
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
        self.pooling = check_choice("pooling", pooling, POOLINGS)
        self.missing = check_choice("missing", missing, MISSING)
        self.key_max = check_choice("key_max", key_max, KEY_MAX)
        self.target_sum = check_number("target_sum", target_sum, low=0.0, low_open=True)
        self.scale_max = (
            None
            if scale_max is None
            else check_number("scale_max", scale_max, low=0.0, low_open=True)
        )
        self.genes_: list[str] | None = None
        self.config_: SCLongConfig | None = None

    def settings(self) -> dict[str, Any]:
        return {
            "pooling": self.pooling,
            "missing": self.missing,
            "key_max": self.key_max,
            "target_sum": self.target_sum,
            "scale_max": self.scale_max,
        }

    # ------------------------------------------------------------------ loading

    def _read_config(self, files: _ReleaseFiles) -> tuple[SCLongConfig, dict[str, Any]]:
        if files.json_config is not None:
            try:
                params = json.loads(files.json_config.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{MODEL}: {files.json_config} is not JSON: {exc}") from exc
            graph = read_state_dict(files.graph, model=MODEL)  # type: ignore[arg-type]
        else:
            assert files.hyper is not None
            params = read_release_pickle(files.hyper, trust_pickle=self.trust_pickle)
            graph = params
        if not isinstance(params, dict):
            raise CheckpointError(f"{MODEL}: the hyper-parameters must be a dict")
        cfg = SCLongConfig.from_release(params)
        _check_graph(graph, cfg.max_seq_len)
        return cfg, {"G_go": graph["G_go"], "G_go_weight": graph["G_go_weight"]}

    def _read_weights(self, path: Path) -> dict[str, Any]:
        import torch

        raw = read_state_dict(path, trust_pickle=self.trust_pickle, model=MODEL)
        state = raw.get("model_state_dict", raw) if isinstance(raw, dict) else None
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            keys = sorted(raw)[:10] if isinstance(raw, dict) else type(raw).__name__
            raise CheckpointError(
                f"{MODEL}: {path.name} holds no state dict (top level: {keys}); expected the "
                "released checkpoint with 'model_state_dict', or a flat state dict"
            )
        return state

    def load(self) -> Any:
        require("torch", extra=self.extra, model=MODEL)
        import torch

        from bulkfm.adapters.sclong_net import build_network

        files = _release_files(self.path)
        genes = _read_genes(files.genes)
        cfg, graph = self._read_config(files)
        if cfg.max_seq_len != len(genes) + 1:
            raise CheckpointError(
                f"{MODEL}: the gene list has {len(genes)} genes but the model expects "
                f"{cfg.max_seq_len - 1} (max_seq_len - 1 pad); use the gene list of this release"
            )
        state = self._read_weights(files.weights)
        pos = state.get("pos_emb.emb.weight")
        pos_dtype = pos.dtype if isinstance(pos, torch.Tensor) else torch.float32
        net = build_network(cfg, graph, key_max=self.key_max, pos_dtype=pos_dtype)
        load_state_dict_strict(net, state, model=MODEL)
        self.genes_, self.config_ = genes, cfg
        if len(genes) != N_GENES_RELEASED:
            logger.info(
                "%s: gene list of %d genes (release: %d)", MODEL, len(genes), N_GENES_RELEASED
            )
        return net

    # ------------------------------------------------------------------ embedding

    def per_gene(self, adata: ad.AnnData, rows: slice | None = None) -> tuple[Any, Any]:
        """Per-gene outputs ``[n, vocabulary + 1, base_dim]`` and the pooling mask."""
        import torch

        net = self.network
        assert self.genes_ is not None
        layer = self.source_layer(adata)
        gi = gene_input(
            adata,
            self.genes_,
            id_type="ensembl",
            layer=layer,
            model=MODEL,
            min_fraction=self.min_coverage,
            rows=rows,
        )
        x = sclong_preprocess(
            gi.values,
            gi.present,
            target_sum=self.target_sum,
            scale_max=self.scale_max,
            missing=self.missing,
        )
        keep = gi.present if self.pooling == "present" else np.ones_like(gi.present)
        keep = np.concatenate([keep, np.zeros((keep.shape[0], 1), dtype=bool)], axis=1)
        self.coverage_ = {
            **gi.report,
            "input": "counts"
            if layer == keys.COUNTS
            else (f"layers[{layer!r}]" if layer else "TPM"),
            "normalisation": f"log1p(x / total * {self.target_sum:g})"
            + (f", max scaled to {self.scale_max:g}" if self.scale_max else ""),
        }
        hidden = net(torch.as_tensor(x, device=self.device))
        return hidden, torch.as_tensor(keep, device=self.device)

    def embed(self, adata: ad.AnnData) -> np.ndarray:
        out = []
        for rows in batch_slices(adata.n_obs, self.batch_size, desc=MODEL):
            hidden, keep = self.per_gene(adata, rows)
            out.append(masked_mean(hidden.float(), keep).cpu().numpy())
        return np.concatenate(out, axis=0)
