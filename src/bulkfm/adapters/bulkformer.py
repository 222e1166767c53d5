"""BulkFormer (Kang et al., "BulkFormer: a large-scale foundation model for human bulk
transcriptomes"; github.com/KangBoming/BulkFormer, MIT) as a frozen benchmark model.

Input, as published: the model's 20,010 genes (Ensembl ids, ``ensg_id`` column of
``bulkformer_gene_info.csv``, in file order), value = log1p(TPM); a gene the sample
lacks gets -10, which the model masks (zero value embedding). Here X (TPM) is used;
genes absent from the data *and* genes flagged in ``layers["missing"]`` get -10 (the
published alignment only knows absent columns). TPM is not renormalised over the
model's genes, as in the authors' code.

Network: ESM2 protein features per gene (``gene_emb``, stored in the checkpoint) through
an MLP, plus the sin/cos value embedding, plus an MLP of the whole profile; then graph
(GCN over the GTEx gene graph) + Performer blocks and a final LayerNorm, whose per-gene
output the authors pool. The release ships no config file, so the sizes are read from
the checkpoint's tensor shapes (released: dim 640, 3 blocks of 4 Performer layers with
8 heads, 1,280-d gene features; about 148.6M parameters). See
:mod:`bulkfm.adapters.bulkformer_net`.

Pooling. Published (``extract_features``, transcriptome level): the genes listed in
``high_var_gene_list.pt``, *including* masked ones, reduced by max (their CLI's
default), mean, median or "all" (max + mean + median, summed). Default here:
``gene_set="present"``, ``pooling="mean"``: only genes the sample has, so an
embedding reflects measured genes, not how many -10 placeholders it got. The
published recipe is ``gene_set="high_var"`` (needs that file) with any ``pooling``;
``gene_set="all"`` pools all 20,010 genes.

Files, in the folder passed as ``model_dir`` (or its ``model/`` and ``data/``
subfolders, the repository's layout): ``Bulkformer_ckpt_epoch_29.pt`` (state dict,
``module.`` prefixes allowed), ``G_gtex.pt`` (edge list [2, E]), ``G_gtex_weight.pt``
(edge weights [E]), ``bulkformer_gene_info.csv``, and for ``gene_set="high_var"``
``high_var_gene_list.pt``. ``.safetensors`` files with the same stem (one tensor each
for the graph files) are accepted instead of the pickles; a converted checkpoint may
keep only one of each Performer's two names for a tensor (``net.*`` /
``proj_updater.instance.*``), since safetensors refuses shared tensors.
``esm2_feature_concat.pt`` is not read: the model's copy of those features is a trained
parameter in the checkpoint.

Not verifiable here (no released files offline): that the Zenodo checkpoint's keys
carry no other prefix than ``module.``, that the graph files hold plain tensors, and
the exact contents of ``high_var_gene_list.pt`` (read as indices or a boolean mask).
The later "five-scale" BulkFormer family (``BulkFormer_147M.pt`` etc., a different
layout with a one-hot gene embedding) is not supported.
"""

from __future__ import annotations

import hashlib
import logging
import os
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
GENE_SETS = ("present", "high_var", "all")
RELEASE = (
    "the BulkFormer release: Zenodo 10.5281/zenodo.15559368 (checkpoint, graph, "
    "high_var_gene_list.pt) and bulkformer_gene_info.csv from the GitHub repository "
    "KangBoming/BulkFormer data/ folder (also in Zenodo 10.5281/zenodo.15744294)"
)
# Role -> accepted file names, first found wins.
BULKFORMER_FILES: dict[str, tuple[str, ...]] = {
    "checkpoint": ("Bulkformer_ckpt_epoch_29.safetensors", "Bulkformer_ckpt_epoch_29.pt"),
    "graph": ("G_gtex.safetensors", "G_gtex.pt"),
    "graph_weight": ("G_gtex_weight.safetensors", "G_gtex_weight.pt"),
    "gene_info": ("bulkformer_gene_info.csv",),
    "high_var": ("high_var_gene_list.safetensors", "high_var_gene_list.pt"),
}


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


@register_embedder("bulkformer")
class BulkFormerEmbedder(FoundationEmbedder):
    """Frozen BulkFormer: log1p(TPM) with -10 for absent genes, pooled gene embeddings.

    ``pooling``: mean (default), max, median, or all (max + mean + median summed, as
    published). ``gene_set``: present (default; genes the sample has), high_var (the
    release's gene list, masked genes included, as published) or all.
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
        if gene_set not in GENE_SETS:
            raise ConfigError(f"{MODEL}: gene_set={gene_set!r}; choose one of {list(GENE_SETS)}")
        self.pooling = pooling
        self.gene_set = gene_set
        self._genes: list[str] | None = None
        self._high_var: np.ndarray | None = None

    # ------------------------------------------------------------------ files

    @property
    def root(self) -> Path:
        """Folder holding the release's files (the checkpoint file's folder if given one)."""
        return self.path.parent if self.path.is_file() else self.path

    def asset(self, role: str) -> Path:
        """Path of one release file: in the folder, its model/ or data/, or a sibling data/."""
        names = BULKFORMER_FILES[role]
        if role == "checkpoint" and self.path.is_file():
            return self.path
        # The repository layout: weights in model/, graph and gene files in data/.
        folders = [self.root, self.root / "model", self.root / "data", self.root.parent / "data"]
        for folder in folders:
            for name in names:
                if (folder / name).is_file():
                    return folder / name
        raise CheckpointError(
            f"{MODEL}: {role} file not found: looked for {' or '.join(names)} in "
            f"{', '.join(str(f) for f in folders)}. It is part of {RELEASE}; put it in the "
            "model folder"
        )

    def _roles(self) -> list[str]:
        roles = ["checkpoint", "graph", "graph_weight", "gene_info"]
        return [*roles, "high_var"] if self.gene_set == "high_var" else roles

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
        return {"pooling": self.pooling, "gene_set": self.gene_set}

    def _tensor(self, role: str) -> torch.Tensor:
        """The single tensor a graph or gene-list file holds."""
        import torch

        path = self.asset(role)
        obj = read_state_dict(path, trust_pickle=self.trust_pickle, model=MODEL)
        if isinstance(obj, dict) and len(obj) == 1:
            obj = next(iter(obj.values()))
        if isinstance(obj, list | tuple):
            try:
                obj = torch.as_tensor(obj)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"{MODEL}: {path} holds no numeric list: {exc}") from exc
        if not isinstance(obj, torch.Tensor):
            raise CheckpointError(
                f"{MODEL}: {path} should hold one tensor, found {type(obj).__name__}; use the "
                f"file from {RELEASE}"
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
                    f"use bulkformer_gene_info.csv from {RELEASE}"
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

    def high_var_mask(self) -> np.ndarray:
        """Boolean mask over the model's genes of the release's pooling gene list."""
        if self._high_var is None:
            n = len(self.genes())
            raw = self._tensor("high_var").cpu().numpy().ravel()
            # A 0/1 vector over all genes is a mask too, not the indices {0, 1}.
            if raw.dtype != bool and raw.size == n and set(np.unique(raw).tolist()) <= {0, 1}:
                raw = raw.astype(bool)
            if raw.dtype == bool:
                if raw.size != n:
                    raise CheckpointError(
                        f"{MODEL}: high_var mask has {raw.size} entries for {n} genes"
                    )
                mask = raw
            else:
                idx = raw.astype(np.int64)
                if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
                    raise CheckpointError(
                        f"{MODEL}: high_var_gene_list indices must lie in 0..{n - 1}"
                    )
                mask = np.zeros(n, dtype=bool)
                mask[idx] = True
            self._high_var = mask
        return self._high_var

    # ------------------------------------------------------------------ model

    def load(self) -> Any:
        from bulkfm.adapters.base import load_state_dict_strict
        from bulkfm.adapters.bulkformer_net import BulkFormerConfig, BulkFormerNet

        state = read_state_dict(
            self.asset("checkpoint"), trust_pickle=self.trust_pickle, model=MODEL
        )
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{MODEL}: {self.asset('checkpoint')} holds a {type(state).__name__}, not a "
                "state dict; pass the released Bulkformer_ckpt_epoch_29.pt"
            )
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module.") :]: v for k, v in state.items()}
        config = BulkFormerConfig.from_state_dict(state)
        n_genes = len(self.genes())
        if n_genes != config.gene_length:
            raise CheckpointError(
                f"{MODEL}: the checkpoint is for {config.gene_length} genes but "
                f"{self.asset('gene_info').name} lists {n_genes}; use files of one release"
            )
        edges, weights = self._graph(n_genes)
        net = BulkFormerNet(config, edges, weights)
        load_state_dict_strict(net, _with_performer_aliases(state, net.state_dict()), model=MODEL)
        logger.info("%s: loaded %s (%s)", MODEL, self.asset("checkpoint"), config)
        return net

    # ------------------------------------------------------------------ data

    def model_input(
        self, adata: ad.AnnData, rows: slice | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The published input for ``rows``: log1p(TPM) in model gene order, -10 where absent.

        Returns (values [n, 20010] float32, present [n, 20010] bool, coverage report).
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
        return np.broadcast_to(self.high_var_mask(), present.shape)

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

        net = self.network
        out = []
        for rows in batch_slices(adata.n_obs, self.batch_size, desc=MODEL):
            values, present, report = self.model_input(adata, rows)
            self.coverage_ = report
            mask = self._pool_mask(present)
            empty = np.flatnonzero(~mask.any(axis=1))
            if empty.size:
                names = list(adata.obs_names[rows][empty][:5])
                raise ExpressionValueError(
                    f"{MODEL}: samples {names} have none of the genes to pool over "
                    f"(gene_set={self.gene_set!r}); drop them or choose gene_set='all'"
                )
            hidden = net(torch.as_tensor(values, device=self.device))
            out.append(self.pool(hidden, mask))
        return np.concatenate(out, axis=0)
