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


def test_an_embedding_file_named_like_a_registered_model_is_read_not_rebuilt(tmp_path) -> None:
    """``--embeddings scgpt=f.parquet`` scores the file; it used to build scGPT and drop it."""
    path = tmp_path / "scgpt.parquet"
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    pd.DataFrame(values, index=["s1", "s2"], columns=["a", "b", "c"]).to_parquet(path)
    (model,) = build_models([], embeddings={"scgpt": path})
    assert isinstance(model, PrecomputedEmbedder)
    assert model.label == "scgpt"
    (named,) = build_models(["scgpt"], embeddings={"scgpt": path})
    assert isinstance(named, PrecomputedEmbedder)
    with pytest.raises(ConfigError, match="both an embedding file"):
        build_models([], embeddings={"scgpt": path}, model_dirs={"scgpt": tmp_path})
