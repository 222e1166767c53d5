from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from bulkfm.embedders import get_embedder
from bulkfm.errors import CheckpointError, ConfigError
from tests.conftest import tiny_config


def _tiny_checkpoint(adata: ad.AnnData, directory: Path) -> Path:
    import torch

    from bulkfm.models.bulkrnabert import BulkRNABert
    from bulkfm.tokenize import BinTokenizer

    torch.manual_seed(0)
    genes = list(map(str, adata.var_names[:32]))
    config = tiny_config(n_genes=32, embed_dim=16, n_expressions_bins=16)
    tokenizer = BinTokenizer.fit(np.asarray(adata[:, genes].X), genes, n_bins=16)
    return BulkRNABert(config).save_pretrained(directory, tokenizer)


def test_bulkrnabert_embedder_equals_embed_adata(sim, tmp_path) -> None:
    from bulkfm.embed import embed_adata
    from bulkfm.models.bulkrnabert import load_pretrained

    ckpt = _tiny_checkpoint(sim, tmp_path / "ckpt")
    small = sim[:12].copy()
    model = get_embedder("bulkrnabert", model_dir=ckpt, batch_size=5)
    out = model.transform(small)
    net, tok = load_pretrained(ckpt)
    np.testing.assert_allclose(out, embed_adata(net, tok, small, batch_size=5), rtol=1e-6)
    assert out.shape == (12, 16) and not model.learns
    before = model.fingerprint()
    (ckpt / "extra.txt").write_text("changed checkpoint")
    assert get_embedder("bulkrnabert", model_dir=ckpt).fingerprint() != before


def test_bulkrnabert_needs_a_checkpoint(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--model-dir"):
        get_embedder("bulkrnabert")
    with pytest.raises(CheckpointError, match="not found"):
        get_embedder("bulkrnabert", model_dir=tmp_path / "nope")


def test_bulkrnabert_exclude_missing_must_be_a_real_bool(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"exclude_missing must be true or false.*--model-arg"):
        get_embedder("bulkrnabert", model_dir=tmp_path, exclude_missing="flase")


def test_bulkrnabert_embedder_layers_concatenate_like_the_model(sim, tmp_path) -> None:
    import torch

    from bulkfm.models.bulkrnabert import load_pretrained

    ckpt = _tiny_checkpoint(sim, tmp_path / "ckpt")
    small = sim[:6].copy()
    got = get_embedder("bulkrnabert", model_dir=ckpt, layers="0,-1").transform(small)
    net, tok = load_pretrained(ckpt)
    tokens = torch.from_numpy(tok.encode_adata(small))
    want = net.embed(tokens, layers=[0, -1]).numpy()
    assert got.shape == (6, 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    plain = get_embedder("bulkrnabert", model_dir=ckpt)
    assert get_embedder("bulkrnabert", model_dir=ckpt, layers=[0, -1]).config() != plain.config()
    with pytest.raises(ConfigError, match="layers must name"):
        get_embedder("bulkrnabert", model_dir=ckpt, layers="a,b")


def test_bulkrnabert_embedder_max_pooling_is_the_models(sim, tmp_path) -> None:
    """--model-arg NAME:pooling=max reaches BulkRNABert.embed, alone and with layers."""
    import torch

    from bulkfm.models.bulkrnabert import load_pretrained

    ckpt = _tiny_checkpoint(sim, tmp_path / "ckpt")
    small = sim[:6].copy()
    net, tok = load_pretrained(ckpt)
    tokens = torch.from_numpy(tok.encode_adata(small))
    got = get_embedder("bulkrnabert", model_dir=ckpt, pooling="max").transform(small)
    np.testing.assert_allclose(got, net.embed(tokens, pooling="max").numpy(), rtol=1e-5, atol=1e-6)
    mean = get_embedder("bulkrnabert", model_dir=ckpt).transform(small)
    assert not np.allclose(got, mean)  # the option is not ignored
    both = get_embedder("bulkrnabert", model_dir=ckpt, layers="0,-1", pooling="max")
    want = net.embed(tokens, layers=[0, -1], pooling="max").numpy()
    np.testing.assert_allclose(both.transform(small), want, rtol=1e-5, atol=1e-6)


def test_bulkrnabert_embedder_pooling_is_recorded_and_checked(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")  # the fingerprint hashes the folder's files
    plain = get_embedder("bulkrnabert", model_dir=tmp_path)
    assert "pooling" not in plain.config()  # default: fingerprints of earlier runs unchanged
    maxed = get_embedder("bulkrnabert", model_dir=tmp_path, pooling="max")
    assert maxed.config()["pooling"] == "max" and maxed.fingerprint() != plain.fingerprint()
    with pytest.raises(ConfigError, match=r"pooling must be one of \['mean', 'max'\].*model-arg"):
        get_embedder("bulkrnabert", model_dir=tmp_path, pooling="median")
