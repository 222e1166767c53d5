from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bulkfm.cli import build_parser
from bulkfm.embed import embed_adata
from bulkfm.errors import InputFileError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(argv: list[str]) -> int:
    """The handler's own return or exception (main() would turn errors into exit code 1)."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


def test_cli_embeds_to_parquet_and_h5ad(model, tokenizer, checkpoint, adata, input_h5ad, capsys):
    out = input_h5ad.parent
    base = ["embed", "--model", str(checkpoint), "--input", str(input_h5ad)]
    assert run_cli([*base, "--output", str(out / "e.parquet"), "--batch-size", "2"]) == 0
    expected = embed_adata(model, tokenizer, adata)
    np.testing.assert_allclose(pd.read_parquet(out / "e.parquet").to_numpy(), expected, atol=1e-5)
    assert "embedded 7 samples" in capsys.readouterr().out
    assert run_cli([*base, "--output", str(out / "o.h5ad"), "--layer", "1", "--key", "E"]) == 0
    back = ad.read_h5ad(out / "o.h5ad")
    np.testing.assert_allclose(
        back.obsm["E"], embed_adata(model, tokenizer, adata, layer=1), atol=1e-5
    )
    assert back.uns["bulkfm"]["embeddings"]["E"]["layer"] == 1


def test_cli_rejects_missing_input(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        run_cli(["embed", "--model", "m", "--input", str(tmp_path / "x.h5ad"), "--output", "o.npy"])
