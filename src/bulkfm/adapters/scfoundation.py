"""scFoundation (xTrimoGene MAE-Autobin, Hao et al. 2024) as a frozen bulk embedder.

Facts taken from the public code (biomap-research/scFoundation, ``model/``):

* Vocabulary: the 19,264 gene symbols of ``OS_scRNA_gene_index.19264.tsv`` (columns
  ``gene_name``, ``index``), then two depth tokens, T at position 19,264 and S at
  19,265 (sequence length 19,266). Symbols are mapped to Ensembl ids through the data
  layer; genes the data lacks are zero, as the published ``main_gene_selection`` fills
  them. Because the encoder only sees positive values (next point), a zero-filled
  gene and a gene left out are the same input: there is no separate "mask" mode to
  offer, and ``coverage_`` records how many of the 19,264 genes the data has.
* Encoder input (``load.gatherData``): the positive entries of each sample, in
  position order; value embedding by auto-discretisation (a soft mixture of learned
  bin vectors) plus a learned embedding of the gene position; a post-norm
  transformer encoder with a final LayerNorm. The Performer decoder is not used for
  cell embeddings, so its keys are dropped on load.
* Pooling (``get_embedding.py --output_type cell --pool_type all``): the concatenation
  of the S token output, the T token output, the max and the mean over gene tokens
  (4 x hidden: 3,072 for the 768-wide release). ``pooling="max"`` is the published
  alternative (max over all tokens, 1 x hidden). The published script embeds one
  sample at a time; here batches are padded, padding is masked in attention and left
  out of max and mean, and T/S are read at each sample's own positions, so a
  sample's embedding does not depend on its batch.
* Bulk preprocessing as published (``--input_type bulk --pre_normalized F``),
  ``recipe="published"``: restrict to the 19,264 genes, ``scanpy.pp.normalize_total``
  with its default target (the median total over *all samples embedded together*),
  ``log1p``, then T = S = log10 of the sum of the *log-normalised* values.
* ``recipe="per_sample"`` (default): ``log1p(x / total * target_sum)`` with
  ``target_sum=1e4``, T = S = log10(total), ``total`` being the sample's sum over the
  model's genes. That is the normalisation scFoundation was pre-trained with
  (the single-cell path of ``get_embedding.py``) with T = S as for bulk. It is the
  default because the published bulk recipe makes a sample's embedding depend on the
  other samples in the file (through the median) and sets the depth tokens from
  log-normalised values, which carry no sequencing depth.

Expression source: ``layers["counts"]`` when the data has it (``layer="auto"``), so
that T and S reflect the real library size; otherwise X (TPM), where the total over
the model's genes is close to constant (TPM sums to 1e6 over all genes) and T/S carry
no depth information. The coverage report states which was used.

Checkpoint (``load.load_model_frommmf``): ``models.ckpt`` is a torch pickle holding a
dict keyed by model version (``"cell"`` for cell embeddings, ``"rde"`` for read-depth
enhancement, ``"gene"``), each a dict with ``config`` (``model``, ``model_config``,
``dataset_config["rnaseq"]``) and ``state_dict`` (keys prefixed ``model.``). Reading it
needs ``trust_pickle=True`` and goes through ``torch.load(weights_only=True)``; a
safetensors state dict with a ``config.json`` beside it is read without opt-in.
Not verified (no released file here): that the real ``models.ckpt`` holds nothing
``weights_only`` refuses, and the exact config values of the release (expected:
encoder 768 wide, 12 layers, 12 heads; 100 bins; pad id 103, mask id 102).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd

from bulkfm.adapters.base import (
    FoundationEmbedder,
    batch_slices,
    file_digest,
    find_file,
    gene_input,
    load_state_dict_strict,
    read_state_dict,
    require,
)
from bulkfm.embedders.registry import register_embedder
from bulkfm.errors import CheckpointError, ConfigError, ExpressionValueError

if TYPE_CHECKING:
    import anndata as ad
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "GENE_INDEX_FILE",
    "ScFoundationEmbedder",
    "bulk_values",
    "pool_hidden",
    "read_gene_index",
    "read_released",
]

MODEL = "scFoundation"
GENE_INDEX_FILE = "OS_scRNA_gene_index.19264.tsv"
# Safe formats first: a folder holding both reads the safetensors file without trust_pickle.
CHECKPOINT_FILES = ("model.safetensors", "models.safetensors", "models.ckpt")
# Parts of the released MAE that a cell embedding never uses (decoder side).
DECODER_PREFIXES = ("decoder.", "decoder_embed.", "norm.", "to_final.")
RECIPES = ("per_sample", "published")
POOLS = ("all", "max")
ROWS_PER_CHUNK = 512

Recipe = Literal["per_sample", "published"]


# --------------------------------------------------------------------------- files


def read_gene_index(path: str | os.PathLike) -> list[str]:
    """Gene symbols of ``OS_scRNA_gene_index.19264.tsv`` in model position order."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{MODEL}: gene index {path} not found; put {GENE_INDEX_FILE} (from the root of "
            "github.com/biomap-research/scFoundation) next to the weights, or pass gene_index="
        )
    table = pd.read_csv(path, sep="\t", dtype={"gene_name": str})
    if not {"gene_name", "index"} <= set(table.columns):
        raise CheckpointError(
            f"{MODEL}: {path} has columns {list(table.columns)}; the released gene index has "
            "'gene_name' and 'index'"
        )
    index = pd.to_numeric(table["index"], errors="coerce")
    if index.isna().any() or sorted(index.astype(int)) != list(range(len(table))):
        raise CheckpointError(
            f"{MODEL}: the 'index' column of {path} is not a permutation of 0..{len(table) - 1}"
        )
    names = table.sort_values("index")["gene_name"].astype(str).str.strip()
    if names.duplicated().any():
        raise CheckpointError(
            f"{MODEL}: {path} lists a gene twice, e.g. {names[names.duplicated()].iloc[0]!r}"
        )
    return names.tolist()


def _flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The released nested config (``model_config[model]`` + ``dataset_config['rnaseq']``),
    flattened the way ``load.convertconfig`` does; a flat config is returned as is."""
    if "model_config" not in config:
        return dict(config)
    model = config.get("model")
    try:
        flat = dict(config["model_config"][model])
        flat.update(config.get("dataset_config", {}).get("rnaseq", {}))
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{MODEL}: config['model_config'] has no entry for model {model!r}; the checkpoint "
            "config is not the released one"
        ) from exc
    flat["model"] = model
    return flat


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``model.`` prefix the released (Lightning) state dict carries."""
    if state and all(k.startswith("model.") for k in state):
        return {k[len("model.") :]: v for k, v in state.items()}
    return dict(state)


def _entry_of(blob: Mapping[str, Any], key: str, path: Path) -> Mapping[str, Any]:
    if "state_dict" in blob or "model_state_dict" in blob:
        return blob  # a single model saved on its own (``load.load_model``)
    if key not in blob:
        versions = sorted(k for k, v in blob.items() if isinstance(v, Mapping))
        raise CheckpointError(
            f"{MODEL}: {path.name} has no model version {key!r} (it has {versions}); pick one "
            f"with key=... ('cell' for cell embeddings)"
        )
    return blob[key]


def _config_beside(file: Path) -> Path:
    """The config.json a ``.safetensors`` checkpoint needs (the pickle carries its own)."""
    cfg_file = file.parent / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{MODEL}: {file.name} needs its config.json beside it (the 'config' dict of "
            "the released checkpoint entry, saved as JSON)"
        )
    return cfg_file


def _read_json_config(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{MODEL}: cannot read {path} ({exc}); use the released config (the 'config' "
            "dict of the checkpoint entry, saved as JSON)"
        ) from exc


def read_released(
    path: str | os.PathLike, *, key: str = "cell", trust_pickle: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(flat config, state dict without the ``model.`` prefix) of a released checkpoint.

    ``path`` is ``models.ckpt`` (pickle: needs ``trust_pickle``) or a ``.safetensors``
    state dict with ``config.json`` in the same folder, or the folder holding either.
    """
    file = find_file(path, CHECKPOINT_FILES, what="checkpoint", model=MODEL)
    blob = read_state_dict(file, trust_pickle=trust_pickle, model=MODEL)
    if file.suffix == ".safetensors":
        config = _read_json_config(_config_beside(file))
        state = blob
    else:
        if not isinstance(blob, Mapping):
            raise CheckpointError(f"{MODEL}: {file} does not hold a dict of model versions")
        entry = _entry_of(blob, key, file)
        if not isinstance(entry, Mapping) or "config" not in entry:
            raise CheckpointError(
                f"{MODEL}: entry {key!r} of {file.name} has no 'config'; not a released "
                "scFoundation checkpoint"
            )
        config = entry["config"]
        state = entry.get("state_dict", entry.get("model_state_dict"))
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{MODEL}: entry {key!r} of {file.name} has no state dict")
    config = _flat_config(config)
    if config.get("model", "mae_autobin") != "mae_autobin":
        raise CheckpointError(
            f"{MODEL}: config model {config.get('model')!r} is not 'mae_autobin', the "
            "architecture of the released scFoundation checkpoints"
        )
    return config, _strip_prefix(state)


# --------------------------------------------------------------------------- preprocessing


def _check_values(values: np.ndarray, names: np.ndarray | None) -> None:
    if (values < 0).any():
        raise ExpressionValueError(
            f"{MODEL}: the expression values contain negative numbers; scFoundation takes "
            "counts or TPM (not log-transformed or centred values)"
        )
    empty = values.sum(axis=1) <= 0
    if empty.any():
        which = names[empty][:3].tolist() if names is not None else np.flatnonzero(empty)[:3]
        raise ExpressionValueError(
            f"{MODEL}: {int(empty.sum())} samples express none of the model's genes (e.g. "
            f"{which}); drop them or check the gene ids"
        )


def bulk_values(
    values: np.ndarray,
    *,
    recipe: Recipe = "per_sample",
    target_sum: float = 1e4,
    median_total: float | None = None,
    sample_names: np.ndarray | None = None,
) -> np.ndarray:
    """Model input [samples, genes + 2]: normalised expression, then T and S.

    ``values`` are counts or TPM in vocabulary order. ``per_sample``: log1p of the
    values scaled to ``target_sum`` per sample, T = S = log10(sample total).
    ``published``: scaled to ``median_total`` (the median sample total over all
    samples embedded together; computed from ``values`` when None), log1p, and
    T = S = log10 of the sum of the log-normalised values.
    """
    x = np.asarray(values, dtype=np.float64)
    _check_values(x, sample_names)
    total = x.sum(axis=1, keepdims=True)
    if recipe == "per_sample":
        normed = np.log1p(x / total * target_sum)
        depth = np.log10(total)
    elif recipe == "published":
        if median_total is None:
            median_total = float(np.median(total[total > 0]))
        normed = np.log1p(x / total * median_total)
        depth = np.log10(normed.sum(axis=1, keepdims=True))
    else:
        raise ConfigError(f"{MODEL}: recipe={recipe!r}; choose one of {RECIPES}")
    if (depth <= 0).any():
        bad = np.flatnonzero(depth[:, 0] <= 0)[:3]
        which = sample_names[bad].tolist() if sample_names is not None else bad.tolist()
        raise ExpressionValueError(
            f"{MODEL}: the depth token (log10 of the total) is not positive for samples {which}, "
            "so the encoder would drop it; the total over the model's genes must exceed 1 "
            "(use counts or TPM, not fractions)"
        )
    return np.hstack([normed, depth, depth]).astype(np.float32)


# --------------------------------------------------------------------------- pooling


def pool_hidden(hidden: torch.Tensor, padding: torch.Tensor, pool: str = "all") -> torch.Tensor:
    """Cell embedding from encoder output over gathered tokens [batch, length, hidden].

    Each row's last two valid tokens are T then S (their positions come last).
    ``all``: [S, T, max over genes, mean over genes]; ``max``: max over all valid tokens.
    """
    import torch

    from bulkfm.adapters.base import masked_mean

    valid = ~padding
    n = valid.sum(dim=1)
    if pool == "max":
        return hidden.masked_fill(padding.unsqueeze(-1), float("-inf")).amax(dim=1)
    if pool != "all":
        raise ConfigError(f"{MODEL}: pool={pool!r}; choose one of {POOLS}")
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    s_token = hidden[rows, n - 1]
    t_token = hidden[rows, n - 2]
    genes = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < (n - 2)[:, None]
    gene_max = hidden.masked_fill(~genes.unsqueeze(-1), float("-inf")).amax(dim=1)
    return torch.cat([s_token, t_token, gene_max, masked_mean(hidden, genes)], dim=1)


# --------------------------------------------------------------------------- the embedder


@register_embedder("scfoundation")
class ScFoundationEmbedder(FoundationEmbedder):
    """scFoundation cell embeddings of bulk samples (see the module docstring).

    Expects in ``model_dir``: ``models.ckpt`` (or ``model.safetensors`` + ``config.json``)
    and ``OS_scRNA_gene_index.19264.tsv``. Full attention over ~15-18k expressed genes
    per bulk sample is heavy: use ``device="cuda"`` for real data.
    """

    model_name: ClassVar[str] = MODEL
    extra: ClassVar[str] = "scfoundation"

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        key: str = "cell",
        recipe: Recipe = "per_sample",
        target_sum: float = 1e4,
        pooling: Literal["all", "max"] = "all",
        layer: str | None = "auto",
        gene_index: str | os.PathLike | None = None,
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
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{MODEL}: key must name a model version such as 'cell', got {key!r}")
        if recipe not in RECIPES:
            raise ConfigError(f"{MODEL}: recipe={recipe!r}; choose one of {RECIPES}")
        if pooling not in POOLS:
            raise ConfigError(f"{MODEL}: pooling={pooling!r}; choose one of {POOLS}")
        self.target_sum = _positive_float("target_sum", target_sum)
        self.key, self.recipe, self.pooling = key, recipe, pooling
        base = self.path if self.path.is_dir() else self.path.parent
        self.gene_index = Path(gene_index) if gene_index is not None else base / GENE_INDEX_FILE
        self.vocabulary: list[str] | None = None

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key,
            "recipe": self.recipe,
            "pooling": self.pooling,
        }
        if self.recipe == "per_sample":
            out["target_sum"] = self.target_sum
        if not self.gene_index.is_relative_to(self.path):
            out["gene_index"] = file_digest(self.gene_index)
        if self.path.is_file() and self.path.suffix == ".safetensors":
            out["config"] = file_digest(_config_beside(self.path))  # not in the file's digest
        return out

    def load(self) -> Any:
        torch = require("torch", extra=self.extra, model=MODEL)
        from bulkfm.adapters.scfoundation_net import NetConfig, ScFoundationEncoder

        config, state = read_released(self.path, key=self.key, trust_pickle=self.trust_pickle)
        cfg = NetConfig.from_released(config)
        vocabulary = read_gene_index(self.gene_index)
        if len(vocabulary) != cfg.seq_len - 2:
            raise CheckpointError(
                f"{MODEL}: the gene index has {len(vocabulary)} genes but the model expects "
                f"{cfg.seq_len - 2} (seq_len {cfg.seq_len} minus the T and S tokens); use the "
                "gene index released with these weights"
            )
        net = ScFoundationEncoder(cfg)
        state = {k: torch.as_tensor(v) for k, v in state.items()}
        load_state_dict_strict(net, state, model=MODEL, ignore=DECODER_PREFIXES)
        self.vocabulary = vocabulary
        return net

    def _inputs(self, adata: ad.AnnData, rows: slice, layer: str | None) -> Any:
        return gene_input(
            adata,
            self.vocabulary or [],
            id_type="symbol",
            layer=layer,
            model=MODEL,
            min_fraction=self.min_coverage,
            rows=rows,
        )

    def _median_total(self, adata: ad.AnnData, layer: str | None) -> float:
        totals = [
            self._inputs(adata, rows, layer).values.sum(axis=1, dtype=np.float64)
            for rows in _chunks(adata.n_obs)
        ]
        total = np.concatenate(totals)
        if not (total > 0).any():
            raise ExpressionValueError(f"{MODEL}: no sample expresses any of the model's genes")
        return float(np.median(total[total > 0]))

    def embed(self, adata: ad.AnnData) -> np.ndarray:
        import torch

        from bulkfm.adapters.scfoundation_net import gather_nonzero

        net = self.network
        cfg = net.cfg
        layer = self.source_layer(adata)
        median = self._median_total(adata, layer) if self.recipe == "published" else None
        names = np.asarray(adata.obs_names.astype(str))
        out: list[np.ndarray] = []
        report: dict[str, Any] | None = None
        for chunk in _chunks(adata.n_obs):
            gi = self._inputs(adata, chunk, layer)
            report = report or gi.report
            x = bulk_values(
                gi.values,
                recipe=self.recipe,
                target_sum=self.target_sum,
                median_total=median,
                sample_names=names[chunk],
            )
            for batch in batch_slices(len(x), self.batch_size, desc=MODEL):
                xb = torch.from_numpy(x[batch]).to(self.device)
                values, positions, padding = gather_nonzero(
                    xb, pad_value=float(cfg.pad_token_id), pad_position=cfg.seq_len
                )
                hidden = net(values, positions, padding)
                out.append(pool_hidden(hidden, padding, self.pooling).float().cpu().numpy())
        self.coverage_ = {
            **(report or {}),
            "recipe": self.recipe,
            "depth_tokens": _depth_note(self.recipe, layer),
        }
        return np.concatenate(out, axis=0)


def _chunks(n: int) -> list[slice]:
    return [slice(s, min(s + ROWS_PER_CHUNK, n)) for s in range(0, n, ROWS_PER_CHUNK)]


def _depth_note(recipe: str, layer: str | None) -> str:
    source = f"layers[{layer!r}]" if layer else "X (TPM: T/S carry no sequencing depth)"
    if recipe == "published":
        return f"log10 of the sum of log1p(median-normalised {source}) over the model's genes"
    return f"log10 of the total of {source} over the model's genes"


def _positive_float(name: str, value: Any) -> float:
    try:
        out = float(value)  # YAML reads "1e4" as a string
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{MODEL}: {name} must be a positive number, got {value!r}") from exc
    if not np.isfinite(out) or out <= 0:
        raise ConfigError(f"{MODEL}: {name} must be a positive number, got {value!r}")
    return out
