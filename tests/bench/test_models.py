from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bulkfm.bench.models import build_models, parse_embeddings, parse_model_dirs
from bulkfm.embedders.precomputed import PrecomputedEmbedder
from bulkfm.errors import ConfigError


def test_parse_named_paths() -> None:
    assert set(parse_embeddings(["a=x.parquet", "y.npy"])) == {"a", "precomputed"}
    with pytest.raises(ConfigError, match="two --embeddings paths"):
        parse_embeddings(["x.npy", "y.npy"])
    dirs = parse_model_dirs(["geneformer=gf/", "runs/lr=0.1/ckpt"])
    assert dirs == {"geneformer": Path("gf/"), "bulkrnabert": Path("runs/lr=0.1/ckpt")}
    with pytest.raises(ConfigError, match="two --model-dir paths for the model 'bulkrnabert'"):
        parse_model_dirs(["a/", "b/"])


def test_build_models_adds_named_files_and_passes_settings(tmp_path) -> None:
    path = tmp_path / "e.parquet"
    pd.DataFrame(np.zeros((2, 3)), index=["s1", "s2"]).rename(columns=str).to_parquet(path)
    models = build_models(
        ["pca"], model_args={"pca": {"n_components": 7}}, embeddings={"mine": path}
    )
    assert [m.label for m in models] == ["pca", "mine"]
    assert models[0].n_components == 7
    assert isinstance(models[1], PrecomputedEmbedder)
    with pytest.raises(ConfigError):
        build_models(["no_such_model"])
