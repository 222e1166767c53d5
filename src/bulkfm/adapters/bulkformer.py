"""BulkFormer (Kang et al., "BulkFormer: a large-scale foundation model for bulk
transcriptomes", Cell Systems 2026; github.com/KangBoming/BulkFormer, MIT) as a frozen
benchmark model.

Two generations of released weights are supported; which one a file is comes from
its keys (:func:`bulkfm.adapters.bulkformer_net.detect_generation`), never from its name:

- **The current release** (December 2025 onwards), five sizes: BulkFormer-37M, -50M,
  -93M, -127M and -147M (``bulkformer_147M.pt`` etc., Google Drive links in the
  repository's ``model/README.md``), with ``G_tcga.pt`` / ``G_tcga_weight.pt``,
  ``bulkformer_gene_info.csv`` and ``interested_gene_list.pt`` from Zenodo record
  10.5281/zenodo.15744294. A one-hot gene embedding; the extractor appends three
  per-sample summary features (missing rate, mean observed value, non-zero fraction)
  to every gene state, so an embedding is dim + 3 wide (e.g. 643).
- **The superseded** ``Bulkformer_ckpt_epoch_29.pt`` (Zenodo 10.5281/zenodo.15559368)
  with ``G_gtex.pt`` / ``G_gtex_weight.pt`` and ``high_var_gene_list.pt``: 1,280-d
  ESM2 gene features stored in the checkpoint; an embedding is dim (640) wide.

Input, as published for both: the model's 20,010 genes (``ensg_id`` column of
``bulkformer_gene_info.csv``, in file order), value = log1p(TPM); a gene the sample
lacks gets -10, which the model masks. Here X (TPM) is used; genes absent from the
data *and* genes flagged in ``layers["missing"]`` get -10. TPM is not renormalised
over the model's genes, as in the authors' code.

Pooling. Published: the genes of the release's list (``interested_gene_list.pt``,
``high_var_gene_list.pt``), *including* masked ones, reduced by mean (the current
notebook), max (the epoch-29 CLI default), median or "all" (max + mean + median,
summed). Default here: ``gene_set="present"``, ``pooling="mean"``: only genes the
sample has, so an embedding reflects measured genes, not how many -10 placeholders
it got. ``gene_set="listed"`` (alias ``"high_var"``) is the published recipe;
``gene_set="all"`` pools all 20,010 genes.

Other differences from the authors' extractor, each equal to it where stated:
the missing rate is computed per sample (the authors pass one rate for the whole
input file; equal when every sample lacks the same genes); the network runs in
float32 (the notebook runs under CUDA fp16 autocast); the summary features can be
left out (``summary_features=False``).

Files, in the folder passed as ``model_dir`` (or its ``model/`` and ``data/``
subfolders, the repository's layout), or the checkpoint file itself. A folder must
hold one checkpoint; with several sizes side by side, pass the file.
``.safetensors`` files with the same stem (one tensor each for the graph files) are
accepted instead of the pickles; a converted checkpoint may keep only one of each
Performer's two names for a tensor (``net.*`` / ``proj_updater.instance.*``), since
safetensors refuses shared tensors. ``esm2_feature_concat.pt`` is not read: the
current model does not use it, and epoch 29 keeps a trained copy in its checkpoint.

Not verifiable here (no released files offline): the Drive file names of the sizes
other than 147M (``bulkformer_<size>.pt`` is assumed; any name works when the file is
passed), that the checkpoints carry no other prefix than ``module.``, and whether
``interested_gene_list.pt`` holds indices (as the notebook uses it) or Ensembl ids (as
its comment says); both, and a 0/1 mask, are accepted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bulkfm.adapters.base import (
    FoundationEmbedder,
    batch_slices,
    file_digest,
    gene_input,
    read_state_dict,
)
from bulkfm.embedders.registry import register_embedder
from bulkfm.errors import CheckpointError, ConfigError, ExpressionValueError

if TYPE_CHECKING:
    import anndata as ad
    import torch

logger = logging.getLogger(__name__)

__all__ = ["BULKFORMER_FILES", "BulkFormerEmbedder"]

MODEL = "BulkFormer"
MASK_VALUE = -10.0
POOLINGS = ("mean", "max", "median", "all")
GENE_SETS = ("present", "listed", "all")
# Names accepted for gene_set that mean another (kept so older configs still run).
GENE_SET_ALIASES = {"high_var": "listed"}
FAMILY, EPOCH29 = "family", "epoch29"  # as in bulkformer_net, which imports torch
RELEASES = {
    FAMILY: (
        "the current BulkFormer release: bulkformer_37M/50M/93M/127M/147M.pt from the Google "
        "Drive links in model/README.md of github.com/KangBoming/BulkFormer, and G_tcga.pt, "
        "G_tcga_weight.pt, bulkformer_gene_info.csv, interested_gene_list.pt from Zenodo "
        "10.5281/zenodo.15744294"
    ),
    EPOCH29: (
        "the superseded BulkFormer release: Zenodo 10.5281/zenodo.15559368 "
        "(Bulkformer_ckpt_epoch_29.pt, G_gtex.pt, G_gtex_weight.pt, high_var_gene_list.pt) "
        "and bulkformer_gene_info.csv from the repository's data/ folder"
    ),
}
# Generation -> role -> accepted file names, first found wins.
BULKFORMER_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    FAMILY: {
        "graph": ("G_tcga.safetensors", "G_tcga.pt"),
        "graph_weight": ("G_tcga_weight.safetensors", "G_tcga_weight.pt"),
        "gene_info": ("bulkformer_gene_info.csv",),
        "gene_list": ("interested_gene_list.safetensors", "interested_gene_list.pt"),
    },
    EPOCH29: {
        "graph": ("G_gtex.safetensors", "G_gtex.pt"),
        "graph_weight": ("G_gtex_weight.safetensors", "G_gtex_weight.pt"),
        "gene_info": ("bulkformer_gene_info.csv",),
        "gene_list": ("high_var_gene_list.safetensors", "high_var_gene_list.pt"),
    },
}
# Checkpoint names a folder is searched for: the family's bulkformer_<size>.pt and epoch 29.
_CHECKPOINT_NAME = re.compile(
    r"^(bulkformer_\d+(?:\.\d+)?[mb]|bulkformer_ckpt_epoch_29)\.(safetensors|pt)$", re.I
)
_CHECKPOINT_HELP = (
    "bulkformer_<size>.pt (current release: 37M, 50M, 93M, 127M, 147M) or "
    "Bulkformer_ckpt_epoch_29.pt (superseded), or the same stem as .safetensors"
)


_ALIAS = (".net.", ".proj_updater.instance.")


def _with_performer_aliases(state: dict[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """Fill one name of each Performer tensor pair from the other.

    A Performer's state dict lists every tensor twice (``net.*`` and
    ``proj_updater.instance.*``, the same storage). safetensors refuses shared tensors,
    so a converted checkpoint usually keeps one name only; either is accepted.
    """
    state = dict(state)
    for key in own:
        if key in state:
            continue
        for a, b in (_ALIAS, _ALIAS[::-1]):
            partner = key.replace(a, b, 1) if a in key else None
            if partner is not None and partner in state:
                state[key] = state[partner]
                break
    return state


def _unwrap(state: Any, path: Path) -> dict[str, Any]:
    """The bare state dict: out of a checkpoint dict, without DataParallel's ``module.``."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{MODEL}: {path} holds a {type(state).__name__}, not a state dict; pass the "
            f"released checkpoint ({_CHECKPOINT_HELP})"
        )
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


@register_embedder("bulkformer")
class BulkFormerEmbedder(FoundationEmbedder):
    """Frozen BulkFormer (current five-size release or epoch 29): pooled gene states.

    ``pooling``: mean (default), max, median, or all (max + mean + median summed, as
    published). ``gene_set``: present (default; genes the sample has), listed (the
    release's gene list, masked genes included, as published; alias high_var) or all.
    ``summary_features``: append the current release's three per-sample features, as
    its extractor does (default; ignored for epoch 29, which has none).
    ``layer``: the values to read, TPM in X by default (BulkFormer was trained on TPM;
    "auto" would take counts). ``min_coverage``: smallest fraction of the model's genes
    the data must have.
    """

    model_name: ClassVar[str] = MODEL
    extra: ClassVar[str] = "bulkformer"

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        pooling: str = "mean",
        gene_set: str = "present",
        summary_features: bool = True,
        layer: str | None = "X",
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
        if pooling not in POOLINGS:
            raise ConfigError(f"{MODEL}: pooling={pooling!r}; choose one of {list(POOLINGS)}")
        gene_set = GENE_SET_ALIASES.get(gene_set, gene_set)
        if gene_set not in GENE_SETS:
            raise ConfigError(
                f"{MODEL}: gene_set={gene_set!r}; choose one of {list(GENE_SETS)} "
                "(listed = the release's gene list, as published)"
            )
        self.pooling = pooling
        self.gene_set = gene_set
        self.summary_features = self._bool_setting("summary_features", summary_features)
        self._genes: list[str] | None = None
        self._gene_list: np.ndarray | None = None
        self._checkpoint: Path | None = None
        self._generation: str | None = None

    # ------------------------------------------------------------------ files

    @property
    def root(self) -> Path:
        """Folder holding the release's files (the checkpoint file's folder if given one)."""
        return self.path.parent if self.path.is_file() else self.path

    def checkpoint(self) -> Path:
        """The weights file: ``model_dir`` itself, or the one checkpoint in it or its model/."""
        if self._checkpoint is None:
            if self.path.is_file():
                self._checkpoint = self.path
            else:
                self._checkpoint = self._find_checkpoint()
        return self._checkpoint

    def _find_checkpoint(self) -> Path:
        folders = [self.path, self.path / "model"]
        for folder in folders:
            if not folder.is_dir():
                continue
            found = sorted(p for p in folder.iterdir() if _CHECKPOINT_NAME.match(p.name))
            stems = sorted({p.stem for p in found})
            if len(stems) > 1:
                raise CheckpointError(
                    f"{MODEL}: {folder} holds several checkpoints ({[p.name for p in found]}); "
                    f"pass the one to use as the model path, e.g. --model-dir "
                    f"bulkformer={found[-1]}"
                )
            if stems:
                # safetensors first: it needs no trust_pickle.
                return min(found, key=lambda p: p.suffix != ".safetensors")
        raise CheckpointError(
            f"{MODEL}: no checkpoint found: looked for {_CHECKPOINT_HELP} in "
            f"{', '.join(str(f) for f in folders)}. Get {RELEASES[FAMILY]}; or pass the "
            "checkpoint file itself"
        )

    def _state(self) -> dict[str, Any]:
        """The checkpoint's state dict (read lazily: memory-mapped where torch can)."""
        import torch

        path = self.checkpoint()
        state: Any = None
        if path.suffix != ".safetensors" and self.trust_pickle:
            try:  # zip-format .pt files map without reading every tensor
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # old pickle format or a bad file: the full reader says which
                state = None
        if state is None:
            state = read_state_dict(path, trust_pickle=self.trust_pickle, model=MODEL)
        return _unwrap(state, path)

    def generation(self) -> str:
        """``"family"`` (current five-size release) or ``"epoch29"``, from the keys."""
        if self._generation is None:
            from bulkfm.adapters.bulkformer_net import detect_generation

            path = self.checkpoint()
            if path.suffix == ".safetensors":  # the keys alone, without reading tensors
                from safetensors import safe_open

                try:
                    with safe_open(str(path), framework="pt") as f:
                        keys: dict[str, Any] = dict.fromkeys(f.keys())
                except Exception as exc:  # any parse failure means a bad file
                    raise CheckpointError(
                        f"{MODEL}: {path} is not a readable safetensors file: {exc}"
                    ) from exc
                state = _unwrap(keys, path)
            else:
                state = self._state()
            self._generation = detect_generation(state)
        return self._generation

    def asset(self, role: str) -> Path:
        """Path of one release file: in the folder, its model/ or data/, or a sibling data/."""
        if role == "checkpoint":
            return self.checkpoint()
        generation = self.generation()
        names = BULKFORMER_FILES[generation][role]
        # The repository layout: weights in model/, graph and gene files in data/.
        folders = [self.root, self.root / "model", self.root / "data", self.root.parent / "data"]
        for folder in folders:
            for name in names:
                if (folder / name).is_file():
                    return folder / name
        raise CheckpointError(
            f"{MODEL}: {role} file not found: looked for {' or '.join(names)} in "
            f"{', '.join(str(f) for f in folders)}. The checkpoint "
            f"{self.checkpoint().name} is of {RELEASES[generation]}; put that release's "
            "files in the model folder (files of the other release do not fit it)"
        )

    def _roles(self) -> list[str]:
        roles = ["checkpoint", "graph", "graph_weight", "gene_info"]
        return [*roles, "gene_list"] if self.gene_set == "listed" else roles

    def config(self) -> dict[str, Any]:
        # Hash the files actually used: the release spreads them over model/ and data/.
        if self._digest is None:
            h = hashlib.blake2b(digest_size=16)
            for role in self._roles():
                path = self.asset(role)
                h.update(f"{role}\0{path.name}\0{file_digest(path)}\0".encode())
            self._digest = h.hexdigest()
        return super().config()  # adds layer, min_coverage and settings()

    def settings(self) -> dict[str, Any]:
        return {
            "pooling": self.pooling,
            "gene_set": self.gene_set,
            "summary_features": self.summary_features,
        }

    def _load_file(self, role: str) -> Any:
        path = self.asset(role)
        obj = read_state_dict(path, trust_pickle=self.trust_pickle, model=MODEL)
        if isinstance(obj, dict) and len(obj) == 1:
            obj = next(iter(obj.values()))
        return obj

    def _tensor(self, role: str) -> torch.Tensor:
        """The single tensor a graph or gene-list file holds."""
        import torch

        obj = self._load_file(role)
        path = self.asset(role)
        if isinstance(obj, list | tuple):
            try:
                obj = torch.as_tensor(obj)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"{MODEL}: {path} holds no numeric list: {exc}") from exc
        if not isinstance(obj, torch.Tensor):
            raise CheckpointError(
                f"{MODEL}: {path} should hold one tensor, found {type(obj).__name__}; use the "
                f"file from {RELEASES[self.generation()]}"
            )
        return obj

    def genes(self) -> list[str]:
        """The model's gene vocabulary (Ensembl ids) in model order."""
        if self._genes is None:
            import pandas as pd

            path = self.asset("gene_info")
            table = pd.read_csv(path)
            if "ensg_id" not in table.columns:
                raise CheckpointError(
                    f"{MODEL}: {path} has no 'ensg_id' column (columns: {list(table.columns)}); "
                    f"use bulkformer_gene_info.csv from {RELEASES[self.generation()]}"
                )
            genes = table["ensg_id"].astype(str).tolist()
            if len(set(genes)) != len(genes):
                raise CheckpointError(
                    f"{MODEL}: {path} lists a gene id twice; use the release file"
                )
            self._genes = genes
        return self._genes

    def _graph(self, n_genes: int) -> tuple[torch.Tensor, torch.Tensor]:
        edges, weights = self._tensor("graph"), self._tensor("graph_weight")
        if edges.ndim != 2 or edges.shape[0] != 2 or edges.is_floating_point():
            raise CheckpointError(
                f"{MODEL}: {self.asset('graph').name} must be an integer edge list [2, E], got "
                f"{edges.dtype} {tuple(edges.shape)}"
            )
        if weights.shape != (edges.shape[1],):
            raise CheckpointError(
                f"{MODEL}: {self.asset('graph_weight').name} has shape {tuple(weights.shape)}, "
                f"expected one weight per edge ({edges.shape[1]},)"
            )
        if edges.numel() and (int(edges.min()) < 0 or int(edges.max()) >= n_genes):
            raise CheckpointError(
                f"{MODEL}: the gene graph refers to genes outside 0..{n_genes - 1}; the graph "
                "and the checkpoint come from different releases"
            )
        return edges.long(), weights.float()

    def gene_list_mask(self) -> np.ndarray:
        """Boolean mask over the model's genes of the release's pooling gene list.

        The file may hold gene indices, a 0/1 or boolean mask over the model's genes, or
        Ensembl ids (the current notebook indexes with it but calls it a list of ids).
        """
        if self._gene_list is None:
            genes = self.genes()
            n = len(genes)
            name = self.asset("gene_list").name
            obj = self._load_file("gene_list")
            if isinstance(obj, list | tuple | np.ndarray) and any(isinstance(v, str) for v in obj):
                position = {g: i for i, g in enumerate(genes)}
                unknown = [str(v) for v in obj if str(v).split(".")[0] not in position]
                if unknown:
                    raise CheckpointError(
                        f"{MODEL}: {name} lists {len(unknown)} gene ids the model does not have "
                        f"(e.g. {unknown[:5]}); use the list of the same release"
                    )
                obj = [position[str(v).split(".")[0]] for v in obj]
            values = _as_array(obj, name).ravel()
            # A 0/1 vector over all genes is a mask too, not the indices {0, 1}.
            if (
                values.dtype != bool
                and values.size == n
                and set(np.unique(values).tolist()) <= {0, 1}
            ):
                values = values.astype(bool)
            if values.dtype == bool:
                if values.size != n:
                    raise CheckpointError(f"{MODEL}: {name} masks {values.size} genes, not {n}")
                mask = values
            else:
                idx = values.astype(np.int64)
                if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
                    raise CheckpointError(f"{MODEL}: {name} indices must lie in 0..{n - 1}")
                mask = np.zeros(n, dtype=bool)
                mask[idx] = True
            self._gene_list = mask
        return self._gene_list

    # ------------------------------------------------------------------ model

    def load(self) -> Any:
        from bulkfm.adapters.base import load_state_dict_strict
        from bulkfm.adapters.bulkformer_net import BulkFormerConfig, BulkFormerNet

        state = self._state()
        config = BulkFormerConfig.from_state_dict(state)
        self._generation = config.generation
        n_genes = len(self.genes())
        if n_genes != config.gene_length:
            raise CheckpointError(
                f"{MODEL}: the checkpoint is for {config.gene_length} genes but "
                f"{self.asset('gene_info').name} lists {n_genes}; use files of one release"
            )
        edges, weights = self._graph(n_genes)
        net = BulkFormerNet(config, edges, weights)
        load_state_dict_strict(net, _with_performer_aliases(state, net.state_dict()), model=MODEL)
        logger.info("%s: loaded %s (%s)", MODEL, self.checkpoint(), config.release)
        return net

    # ------------------------------------------------------------------ data

    def model_input(
        self, adata: ad.AnnData, rows: slice | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The published input for ``rows``: log1p(TPM) in model gene order, -10 where absent.

        Returns (values [n, genes] float32, present [n, genes] bool, coverage report).
        """
        gi = gene_input(
            adata,
            self.genes(),
            layer=self.source_layer(adata),
            model=MODEL,
            min_fraction=self.min_coverage,
            rows=rows,
        )
        if (gi.values < 0).any():
            raise ExpressionValueError(
                f"{MODEL}: the expression matrix has negative values; BulkFormer expects TPM "
                "(>= 0) in X, not log-transformed or scaled values"
            )
        values = np.where(gi.present, np.log1p(gi.values), np.float32(MASK_VALUE))
        report = {
            **gi.report,
            "input": f"log1p of {gi.report['source']}",
            "missing_value": MASK_VALUE,
        }
        return values.astype(np.float32), gi.present, report

    def _pool_mask(self, present: np.ndarray) -> np.ndarray:
        if self.gene_set == "present":
            return present
        if self.gene_set == "all":
            return np.ones_like(present)
        return np.broadcast_to(self.gene_list_mask(), present.shape)

    def pool(self, hidden: torch.Tensor, mask: np.ndarray) -> np.ndarray:
        """Reduce per-gene states [n, genes, dim] over ``mask`` [n, genes] as configured."""
        import torch

        from bulkfm.adapters.base import masked_mean

        keep = torch.as_tensor(np.ascontiguousarray(mask), device=hidden.device)
        parts = []
        if self.pooling in ("mean", "all"):
            parts.append(masked_mean(hidden, keep).float().cpu().numpy())
        if self.pooling in ("max", "all"):
            filled = hidden.masked_fill(~keep.unsqueeze(-1), float("-inf"))
            parts.append(filled.amax(dim=1).float().cpu().numpy())
        if self.pooling in ("median", "all"):
            states = hidden.float().cpu().numpy()
            parts.append(
                np.stack([np.median(s[m], axis=0) for s, m in zip(states, mask, strict=True)])
            )
        return np.asarray(np.sum(parts, axis=0, dtype=np.float32))

    def embed(self, adata: ad.AnnData) -> np.ndarray:
        import torch

        from bulkfm.adapters.bulkformer_net import summary_features

        net = self.network
        with_summary = self.summary_features and net.config.generation == FAMILY
        # "all" sums three reductions of the same per-gene constant: 3x the feature.
        summary_scale = 3.0 if self.pooling == "all" else 1.0
        out = []
        for rows in batch_slices(adata.n_obs, self.batch_size, desc=MODEL):
            values, present, report = self.model_input(adata, rows)
            self.coverage_ = {**report, "release": net.config.release}
            mask = self._pool_mask(present)
            empty = np.flatnonzero(~mask.any(axis=1))
            if empty.size:
                names = list(adata.obs_names[rows][empty][:5])
                raise ExpressionValueError(
                    f"{MODEL}: samples {names} have none of the genes to pool over "
                    f"(gene_set={self.gene_set!r}); drop them or choose gene_set='all'"
                )
            x = torch.as_tensor(values, device=self.device)
            pooled = self.pool(net(x), mask)
            if with_summary:
                extra = summary_features(x).float().cpu().numpy() * np.float32(summary_scale)
                pooled = np.concatenate([pooled, extra], axis=1)
            out.append(pooled)
        return np.concatenate(out, axis=0)


def _as_array(obj: Any, name: str) -> np.ndarray:
    """A gene list file's content as a numeric array."""
    if hasattr(obj, "cpu"):
        return np.asarray(obj.cpu().numpy())
    try:
        return np.asarray(obj, dtype=np.int64 if not _is_bool_list(obj) else bool)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{MODEL}: {name} holds no list of genes: {exc}") from exc


def _is_bool_list(obj: Any) -> bool:
    return isinstance(obj, list | tuple) and bool(obj) and all(isinstance(v, bool) for v in obj)
