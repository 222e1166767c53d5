"""The models of one benchmark run, from names, weights folders and embedding files.

``bulkfm bench`` and ``scripts/run_shared_benchmark.py`` both name their models the
same way (registered names, ``[NAME=]PATH`` weights, ``[NAME=]FILE`` precomputed
embeddings, per-model settings), so the turning of those into :class:`Embedder`
instances lives here, once. Import-light: the embedders load their weights lazily.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bulkfm.errors import ConfigError

if TYPE_CHECKING:
    from bulkfm.embedders.base import Embedder

__all__ = ["DEFAULT_MODELS", "build_models", "parse_embeddings", "parse_model_dirs"]

#: The models a benchmark runs when none are named: the classical baselines.
DEFAULT_MODELS: tuple[str, ...] = ("pca", "nmf", "raw")


def _named_paths(items: Iterable[str], *, default: str, flag: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, eq, path = str(item).partition("=")
        if not eq or "/" in name or "\\" in name:  # a bare path that contains "="
            name, path = default, str(item)
        name = name.strip()
        if name in out:
            raise ConfigError(f"two {flag} paths for the model {name!r}; give one per model")
        out[name] = Path(path.strip()).expanduser()
    return out


def parse_embeddings(items: Iterable[str]) -> dict[str, Path]:
    """``["scgpt=a.parquet", "b.npy"]`` -> ``{"scgpt": a.parquet, "precomputed": b.npy}``."""
    return _named_paths(items, default="precomputed", flag="--embeddings")


def parse_model_dirs(items: Iterable[str]) -> dict[str, Path]:
    """``["geneformer=gf/", "ckpt/"]`` -> ``{"geneformer": gf/, "bulkrnabert": ckpt/}``."""
    return _named_paths(items, default="bulkrnabert", flag="--model-dir")


def build_models(
    names: Sequence[str],
    *,
    model_args: Mapping[str, Mapping[str, Any]] | None = None,
    embeddings: Mapping[str, Path] | None = None,
    embeddings_key: str | None = None,
    model_dirs: Mapping[str, Path] | None = None,
    gene_list: str | None = None,
    normalization_factor: float | None = None,
) -> list[Embedder]:
    """Embedder instances for model names, weights folders and embedding files.

    A model given weights (``model_dirs``) or an embedding file joins the list even
    when ``names`` omits it: one flag adds a model. An embedding file is always read as
    precomputed embeddings labelled with its name, also when the name is a registered
    model's (``scgpt=scgpt.parquet`` scores the file, it does not run scGPT); a name
    given both a file and weights is an error. ``gene_list`` / ``normalization_factor``
    go to BulkRNABert (official-format checkpoints).
    """
    from bulkfm.embedders import get_embedder
    from bulkfm.embedders.precomputed import PrecomputedEmbedder

    model_args = dict(model_args or {})
    embeddings = dict(embeddings or {})
    model_dirs = dict(model_dirs or {})
    both = sorted(set(embeddings) & set(model_dirs))
    if both:
        raise ConfigError(
            f"{both[0]!r} is given both an embedding file (--embeddings {both[0]}=...) and "
            f"weights (--model-dir {both[0]}=...); keep one, or give the file another "
            f"name (--embeddings {both[0]}_file=...) to score both"
        )
    models: list[Embedder] = []
    for name in dict.fromkeys([*names, *embeddings, *model_dirs]):
        kw = dict(model_args.get(name, {}))
        if name in embeddings:
            label = None if name == "precomputed" else name
            models.append(
                PrecomputedEmbedder(embeddings[name], key=embeddings_key, label=label, **kw)
            )
            continue
        if name in model_dirs:
            kw.setdefault("model_dir", model_dirs[name])
        if name == "bulkrnabert":
            kw.setdefault("genes", gene_list)
            kw.setdefault("normalization_factor", normalization_factor)
        models.append(get_embedder(name, **kw))
    return models
