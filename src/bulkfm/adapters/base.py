"""What every published-model adapter shares: genes onto the model's vocabulary,
checkpoint files read safely, pooling that ignores padding, lazy optional imports.

An adapter is a frozen :class:`~bulkfm.embedders.Embedder`: it needs the released
weights, a local path or a Hugging Face repo ``owner/name[@revision][:subfolder]``
(fetched into the standard cache; a local path of that name wins), maps the AnnData's genes onto
the model's own vocabulary through the data layer and reports how many of the
model's genes the data has (``coverage_``), then embeds in batches. Pooling never
averages over padding, so a sample's embedding does not depend on its batch.
"""

from __future__ import annotations

import abc
import functools
import importlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bulkfm import schema as keys
from bulkfm.config import check_int, check_number
from bulkfm.embedders.base import CheckpointEmbedder
from bulkfm.errors import CheckpointError, ConfigError, GeneMappingError
from bulkfm.fingerprint import path_digest as file_digest

if TYPE_CHECKING:
    import anndata as ad
    import torch


logger = logging.getLogger(__name__)

__all__ = [
    "FoundationEmbedder",
    "GeneInput",
    "batch_slices",
    "file_digest",
    "find_file",
    "gene_input",
    "load_state_dict_strict",
    "masked_mean",
    "read_state_dict",
    "require",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
N_EXAMPLES = 10
# Order in which symbol-mapping evidence wins when two vocabulary symbols land on one gene.
_METHOD_RANK = {"ensembl": 0, "approved_symbol": 1, "previous_symbol": 2, "alias_symbol": 3}


# --------------------------------------------------------------------------- dependencies


def require(module: str, *, extra: str, model: str) -> Any:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"the {model} adapter needs the Python package {module!r}, which is not installed "
            f"({exc}); install it with: pip install 'bulkfm[{extra}]'"
        ) from exc


# --------------------------------------------------------------------------- checkpoint files


def find_file(path: str | os.PathLike, candidates: Sequence[str], *, what: str, model: str) -> Path:
    """``path`` itself when it is a file, else the first of ``candidates`` inside it."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{model}: {path} does not exist; pass the folder of the weights")
    for name in candidates:
        hit = path / name
        if hit.is_file():
            return hit
    present = sorted(p.name for p in path.iterdir())[:N_EXAMPLES]
    raise CheckpointError(
        f"{model}: no {what} in {path} (looked for {', '.join(candidates)}; the folder has "
        f"{present}); pass the folder of the released checkpoint or the file itself"
    )


def read_state_dict(
    path: str | os.PathLike, *, trust_pickle: bool = False, model: str = "model"
) -> dict[str, Any]:
    """Tensors of a checkpoint file: safetensors always; pickle-based files only on opt-in.

    PyTorch ``.pt``/``.bin``/``.ckpt`` files are pickles, and unpickling can run code of
    the file author's choosing. With ``trust_pickle=True`` they are still read through
    ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
    containers. The result may be nested (a checkpoint dict holding a state dict): the
    adapter picks what it needs.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{model}: checkpoint file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # any parse failure means a bad file
            raise CheckpointError(
                f"{model}: {path} is not a readable safetensors file: {exc}"
            ) from exc
    if not trust_pickle:
        raise CheckpointError(
            f"{model}: {path.name} is a pickle-based PyTorch file, and loading a pickle can run "
            "code chosen by its author. If you trust its source (e.g. the authors' release, "
            f"checksum verified), pass trust_pickle=True (CLI: --model-arg "
            f"{model.lower()}:trust_pickle=true); or convert it to .safetensors once and use that"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # report the file, not the unpickler internals
        raise CheckpointError(
            f"{model}: could not read {path} with torch.load(weights_only=True): {exc}"
        ) from exc


def load_state_dict_strict(
    module: torch.nn.Module, state: Mapping[str, Any], *, model: str, ignore: Sequence[str] = ()
) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped key is an error.

    ``ignore`` lists key prefixes the release carries but an embedding never uses
    (e.g. a pre-training decoder); they are dropped without complaint.
    """
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys {missing[:N_EXAMPLES]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys {unexpected[:N_EXAMPLES]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches {shapes[:N_EXAMPLES]}")
        raise CheckpointError(
            f"{model}: the checkpoint does not match the architecture: {'; '.join(parts)}. "
            "Check that the file is the released checkpoint of this model and that its config "
            "(layers, width, vocabulary) is the one next to it"
        )
    module.load_state_dict(dict(state), strict=True)


# --------------------------------------------------------------------------- genes


@dataclass
class GeneInput:
    """Expression laid out in a model's vocabulary order.

    ``values`` (samples x vocabulary, float32) holds 0 where ``present`` is False;
    ``present`` is False for vocabulary genes the data lacks and for genes flagged in
    ``layers["missing"]`` for that sample. ``report`` is the coverage record.
    """

    values: np.ndarray
    present: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)


def _dense_rows(M: Any) -> np.ndarray:
    return np.asarray(M.toarray() if sp.issparse(M) else M, dtype=np.float32)


def _vocabulary_positions(
    adata: ad.AnnData, vocabulary: Sequence[str], id_type: Literal["ensembl", "symbol"]
) -> tuple[np.ndarray, dict[str, Any]]:
    """Column of ``adata`` for each vocabulary gene (-1 when absent) and mapping counts.

    Adapters ask once per batch for the same genes: the mapping is computed once per
    (data genes, vocabulary) pair and reused.
    """
    if id_type not in ("ensembl", "symbol"):
        raise ConfigError(f"id_type={id_type!r}: choose 'ensembl' or 'symbol'")
    return _positions(
        tuple(adata.var_names.astype(str)), tuple(str(v) for v in vocabulary), id_type
    )


@functools.lru_cache(maxsize=4)
def _positions(
    var_names: tuple[str, ...], vocab: tuple[str, ...], id_type: str
) -> tuple[np.ndarray, dict[str, Any]]:
    from bulkfm.data.genes import map_to_ensembl, strip_version

    if id_type == "ensembl":
        ensembl = strip_version(vocab)
        methods = np.full(len(vocab), "ensembl", dtype=object)
        mapping: dict[str, Any] = {}
    else:
        ensembl, methods, mapping = map_to_ensembl(vocab, id_type="symbol")
    data_ids = pd.Index(strip_version(var_names))
    pos = np.full(len(vocab), -1, dtype=np.int64)
    found = np.array([e is not None for e in ensembl])
    if found.any():
        pos[found] = data_ids.get_indexer(np.asarray(ensembl[found], dtype=object))
    # Two vocabulary entries mapping to one data gene: the strongest evidence keeps it,
    # the others count as absent (one measured value must not feed two model genes).
    order = sorted(
        np.flatnonzero(pos >= 0), key=lambda i: (_METHOD_RANK.get(str(methods[i]), 9), i)
    )
    taken: set[int] = set()
    n_shared = 0
    for i in order:
        if pos[i] in taken:
            pos[i] = -1
            n_shared += 1
        else:
            taken.add(int(pos[i]))
    counts = {str(k): int(v) for k, v in pd.Series(methods).value_counts().items()}
    record: dict[str, Any] = {"id_mapping": counts, "n_vocabulary_sharing_a_gene": n_shared}
    if mapping:
        record["symbol_mapping_examples"] = mapping.get("examples", {})
    pos.setflags(write=False)  # shared by every later call with the same genes
    return pos, record


def gene_input(
    adata: ad.AnnData,
    vocabulary: Sequence[str],
    *,
    id_type: Literal["ensembl", "symbol"] = "ensembl",
    layer: str | None = None,
    model: str = "model",
    min_fraction: float = 0.05,
    rows: slice | None = None,
) -> GeneInput:
    """The data's values for each vocabulary gene, with presence and a coverage report.

    ``vocabulary`` is the model's own gene list in model order (Ensembl ids, or symbols
    mapped to Ensembl through the data layer's gene table, including previous and alias
    symbols). ``layer`` picks ``adata.layers[layer]`` (e.g. ``"counts"``) instead of X.
    Coverage below ``min_fraction`` is an error: the model would see mostly nothing.
    """
    if len(vocabulary) == 0:
        raise GeneMappingError(f"{model}: the model's gene vocabulary is empty")
    if layer is not None and layer not in adata.layers:
        raise ConfigError(
            f"{model}: layers[{layer!r}] not in the data (layers: {sorted(adata.layers)}); "
            "build the data keeping that layer, or use X"
        )
    pos, mapping = _vocabulary_positions(adata, vocabulary, id_type)
    hit = pos >= 0
    n_found = int(hit.sum())
    report: dict[str, Any] = {
        "model": model,
        "id_type": id_type,
        "source": f"layers[{layer!r}]" if layer else "X",
        "n_vocabulary": len(vocabulary),
        "n_found": n_found,
        "fraction_found": n_found / len(vocabulary),
        "n_data_genes": int(adata.n_vars),
        "n_data_genes_used": n_found,
        "examples_missing": [str(v) for v in np.asarray(vocabulary)[~hit][:N_EXAMPLES]],
        **mapping,
    }
    if report["fraction_found"] < min_fraction:
        raise GeneMappingError(
            f"{model}: the data has only {n_found} of the model's {len(vocabulary)} genes "
            f"({report['fraction_found']:.1%}, e.g. missing {report['examples_missing'][:3]}). "
            f"Harmonise gene ids to Ensembl first (bulkfm data build), and check the species "
            "and that the vocabulary file is the model's own"
        )
    rows = rows if rows is not None else slice(None)
    source = adata.layers[layer] if layer else adata.X
    n = len(range(*rows.indices(adata.n_obs)))
    values = np.zeros((n, len(vocabulary)), dtype=np.float32)
    present = np.zeros((n, len(vocabulary)), dtype=bool)
    cols = pos[hit]
    values[:, hit] = _dense_rows(source[rows][:, cols])
    present[:, hit] = True
    if keys.MISSING in adata.layers:
        flagged = _dense_rows(adata.layers[keys.MISSING][rows][:, cols]).astype(bool)
        present[:, hit] &= ~flagged
    values[~present] = 0.0
    if not np.isfinite(values).all():
        raise ConfigError(f"{model}: the expression values contain NaN or inf; fix the input")
    return GeneInput(values=values, present=present, report=report)


# --------------------------------------------------------------------------- pooling, batching


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where ``mask`` is True ([batch, length, dim] -> [batch, dim]).

    A row with no valid position yields zeros rather than NaN.
    """
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    total = (hidden * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp_min(1.0)
    return total / count


def batch_slices(n: int, batch_size: int, *, desc: str | None = None) -> Iterator[slice]:
    """Consecutive row slices, with a progress bar when there is more than one batch."""
    from tqdm.auto import tqdm

    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc, disable=None if len(starts) > 1 else True, leave=False):
        yield slice(start, min(start + batch_size, n))


# --------------------------------------------------------------------------- the embedder


class FoundationEmbedder(CheckpointEmbedder):
    """A released foundation model as a frozen benchmark embedder.

    Subclasses set ``model_name`` and ``extra`` and implement :meth:`load` (build the
    network from ``self.path`` and return it) and :meth:`embed` (one vector per sample,
    setting ``self.coverage_``). :meth:`settings` returns every option that changes
    the output; it joins the checkpoint digest in the cache key. Options every adapter
    shares: ``layer`` (the input values, see :meth:`source_layer`) and ``min_coverage``
    (the smallest fraction of the model's genes the data must have).
    """

    learns = False
    model_name: ClassVar[str] = "model"
    extra: ClassVar[str] = ""

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        layer: str | None = "auto",
        min_coverage: float = 0.05,
        batch_size: int = 8,
        device: str = "cpu",
        trust_pickle: bool = False,
        label: str | None = None,
    ) -> None:
        super().__init__(label=label)
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ConfigError(
                f"{self.model_name}: layer={layer!r}; use 'auto' (layers['counts'] when the "
                "data has it, else X), 'X', or the name of a layer"
            )
        check_number(f"{self.model_name}: min_coverage", min_coverage, low=0.0, high=1.0)
        self.layer = layer
        self.min_coverage = float(min_coverage)
        if model_dir is None:
            raise ConfigError(
                f"the {self.model_name} adapter needs the released weights on disk or on the "
                f"Hugging Face Hub: --model-dir {self.name}=PATH or {self.name}=OWNER/NAME"
                "[:SUBFOLDER] (or model_dir= in Python)"
            )
        self.trust_pickle = self._bool_setting("trust_pickle", trust_pickle)
        #: companion files fetched with Hub weights, by the option that names them
        self.hub_files: dict[str, Path] = {}
        self.path = self._locate(model_dir)
        if not self.path.exists():
            raise CheckpointError(
                f"{self.model_name}: {self.path} does not exist; pass the folder (or file) of "
                "the released weights, or a Hugging Face repo id OWNER/NAME[:SUBFOLDER]"
            )
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.device = str(device)
        self._digest: str | None = None
        self._network: Any = None

    @classmethod
    def hub_companions(cls, repo_id: str, subfolder: str | None) -> dict[str, str]:
        """Files a Hub release keeps outside the weights' folder, by the option naming them.

        Repo paths; fetched with the weights and offered as defaults (``hub_files``).
        """
        return {}

    def _locate(self, model_dir: str | os.PathLike) -> Path:
        """A local path as is; a Hub repo id resolved to its cached snapshot folder.

        From the Hub, the files directly in the weights' folder are fetched, except
        pickle-based ones unless ``trust_pickle`` (they could not be loaded anyway), plus
        :meth:`hub_companions`.
        """
        from bulkfm.models.hub import local_or_spec, resolve_snapshot

        target = local_or_spec(model_dir)
        if isinstance(target, Path):
            return target
        companions = self.hub_companions(target.repo_id, target.subfolder)

        def wanted(name: str) -> bool:
            return self.trust_pickle or Path(name).suffix.lower() not in PICKLE_SUFFIXES

        self.hub = resolve_snapshot(target, select=wanted, extra=list(companions.values()))
        self.hub_files = {
            option: self.hub.root / rel
            for option, rel in companions.items()
            if (self.hub.root / rel).is_file()
        }
        return self.hub.path

    def settings(self) -> dict[str, Any]:
        """Options that change the embedding (beyond the weights)."""
        return {}

    def config(self) -> dict[str, Any]:
        if self._digest is None:
            self._digest = file_digest(self.path)
        return {
            "checkpoint": self._digest,
            "layer": self.layer,
            "min_coverage": self.min_coverage,
            **self.settings(),
        }

    def source_layer(self, adata: ad.AnnData) -> str | None:
        """Which values feed the model: ``None`` for X, else a layer name.

        ``layer="auto"`` takes ``layers["counts"]`` when the data has it, since most of
        these models were pre-trained on counts, and TPM in X otherwise.
        """
        if self.layer == "auto":
            return keys.COUNTS if keys.COUNTS in adata.layers else None
        return None if self.layer in (None, "X") else self.layer

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model_dir": str(self.path)}

    @property
    def network(self) -> Any:
        """The loaded model, built on first use and kept in eval mode on ``device``."""
        if self._network is None:
            net = self.load()
            if hasattr(net, "eval"):
                net = net.to(self.device).eval()
            self._network = net
        return self._network

    @abc.abstractmethod
    def load(self) -> Any:
        """Build the network from ``self.path`` (strict key check)."""

    @abc.abstractmethod
    def embed(self, adata: ad.AnnData) -> np.ndarray:
        """One vector per sample; sets ``self.coverage_``."""

    def transform(self, adata: ad.AnnData) -> np.ndarray:
        import torch

        if adata.n_obs == 0:
            raise ConfigError(f"{self.model_name}: the data has no samples")
        with torch.inference_mode():
            out = np.asarray(self.embed(adata), dtype=np.float32)
        if out.shape[0] != adata.n_obs:
            raise RuntimeError(f"{self.model_name}: {out.shape[0]} rows for {adata.n_obs} samples")
        if self.coverage_ is not None:
            logger.info(
                "%s: the data has %d of the model's %d genes (%.1f%%)",
                self.model_name,
                self.coverage_["n_found"],
                self.coverage_["n_vocabulary"],
                100 * self.coverage_["fraction_found"],
            )
        return out
