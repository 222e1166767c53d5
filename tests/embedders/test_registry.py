from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from bulkfm.embedders import (
    Embedder,
    available_embedders,
    get_embedder,
    register_embedder,
    registry,
)
from bulkfm.embedders.classical import NMFEmbedder, PCAEmbedder, RawEmbedder
from bulkfm.errors import ConfigError


def test_registry_finds_a_new_model(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_embedder("ones")
    class Ones(Embedder):
        def __init__(self, dim: int = 3, label: str | None = None) -> None:
            super().__init__(label=label)
            self.dim = dim

        def transform(self, adata: ad.AnnData) -> np.ndarray:
            return np.ones((adata.n_obs, self.dim))

    assert "ones" in available_embedders()
    model = get_embedder("ones", dim=5)
    assert isinstance(model, Ones) and model.name == "ones" and model.label == "ones"
    with pytest.raises(ConfigError, match="already taken"):
        register_embedder("ones")(type("Other", (Ones,), {}))


def test_unknown_model_lists_known_ones() -> None:
    known = r"unknown model 'scfoo'; pass known models to --models: .*nmf, pca"
    with pytest.raises(ConfigError, match=known):
        get_embedder("scfoo")


def test_bad_model_settings_are_reported() -> None:
    with pytest.raises(ConfigError, match="bad settings for model 'pca'"):
        get_embedder("pca", n_componentz=3)


def test_fingerprint_follows_config() -> None:
    assert PCAEmbedder().fingerprint() == PCAEmbedder().fingerprint()
    assert PCAEmbedder(n_components=8).fingerprint() != PCAEmbedder().fingerprint()
    assert RawEmbedder().fingerprint() != NMFEmbedder().fingerprint()
