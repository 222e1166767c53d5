"""Find benchmark models by name without importing them until they are used.

Built-in models and the published-model adapters are listed here as ``"module:Class"``
strings, so importing the registry (or ``bulkfm.embedders``) imports no model code and no
package imports another in a circle: a model module imports :mod:`bulkfm.embedders.base`,
never the other way round. Third-party models register with the decorator and are then
found by name:

    @register_embedder("mymodel")
    class MyModel(Embedder):
        def transform(self, adata): ...

    bulkfm bench --import mypackage.models --models mymodel,pca
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from bulkfm.embedders.base import Embedder
from bulkfm.errors import ConfigError

__all__ = ["BUILTIN_EMBEDDERS", "available_embedders", "get_embedder", "register_embedder"]

#: name -> "module:Class" of every model that ships with bulkfm (imported on first use).
BUILTIN_EMBEDDERS: dict[str, str] = {
    "bulkrnabert": "bulkfm.embedders.bulkrnabert:BulkRNABertEmbedder",
    "pca": "bulkfm.embedders.classical:PCAEmbedder",
    "nmf": "bulkfm.embedders.classical:NMFEmbedder",
    "raw": "bulkfm.embedders.classical:RawEmbedder",
    "random": "bulkfm.embedders.control:RandomEmbedder",
    "precomputed": "bulkfm.embedders.precomputed:PrecomputedEmbedder",
    "bulkformer": "bulkfm.adapters.bulkformer:BulkFormerEmbedder",
    "cellfm": "bulkfm.adapters.cellfm:CellFMEmbedder",
    "geneformer": "bulkfm.adapters.geneformer:GeneformerEmbedder",
    "scbert": "bulkfm.adapters.scbert:ScbertEmbedder",
    "scfoundation": "bulkfm.adapters.scfoundation:ScFoundationEmbedder",
    "scgpt": "bulkfm.adapters.scgpt:ScGPTEmbedder",
    "sclong": "bulkfm.adapters.sclong:SCLongEmbedder",
}

_REGISTRY: dict[str, type[Embedder]] = {}

E = TypeVar("E", bound="type[Embedder]")


def _load_builtin(name: str) -> type[Embedder] | None:
    target = BUILTIN_EMBEDDERS.get(name)
    if target is None:
        return None
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Embedder)):
        raise ConfigError(f"{target} is not an Embedder subclass")
    _REGISTRY.setdefault(name, cls)
    return _REGISTRY[name]


def register_embedder(name: str) -> Callable[[E], E]:
    """Class decorator: make an :class:`Embedder` subclass available under ``name``."""
    if not isinstance(name, str) or not name or "," in name or name != name.strip():
        raise ConfigError(f"embedder name must be a non-empty string without commas, got {name!r}")

    def decorate(cls: E) -> E:
        if not (isinstance(cls, type) and issubclass(cls, Embedder)):
            raise ConfigError(f"{cls!r} is not an Embedder subclass; only those can be registered")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ConfigError(
                f"embedder name {name!r} is already taken by {existing.__module__}."
                f"{existing.__qualname__}; choose another name"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_embedders() -> list[str]:
    """Built-in and registered names, sorted."""
    return sorted(set(_REGISTRY) | set(BUILTIN_EMBEDDERS))


def get_embedder(name: str, **kwargs: Any) -> Embedder:
    """An instance of the embedder registered as ``name``; unknown names list the known."""
    cls = _REGISTRY.get(name) or _load_builtin(name)
    if cls is None:
        raise ConfigError(
            f"unknown model {name!r}; pass known models to --models: "
            f"{', '.join(available_embedders())} (a model of your own must be registered with "
            "@register_embedder; load its module with --import)"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad settings for model {name!r}: {exc}") from exc
