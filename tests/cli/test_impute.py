from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from bulkfm.cli import main as cli_main
from bulkfm.impute import impute_missing

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cli_impute_round_trip(model, tokenizer, checkpoint, adata, input_h5ad, capsys) -> None:
    output = input_h5ad.parent / "out.h5ad"
    rc = cli_main(
        ["impute", "--model", str(checkpoint), "--input", str(input_h5ad), "--output", str(output)]
    )
    assert rc == 0
    assert "imputed 8 values in 4 samples" in capsys.readouterr().out
    out = ad.read_h5ad(output)
    direct = impute_missing(model, tokenizer, adata)
    np.testing.assert_allclose(out.X, direct.X, rtol=1e-5)
    assert out.layers["imputed"].nnz == 8
    assert out.uns["bulkfm"]["imputation"]["n_values"] == 8


def test_cli_missing_input_file(tmp_path, checkpoint, capsys) -> None:
    args = ["impute", "--model", str(checkpoint), "--input", str(tmp_path / "x.h5ad")]
    rc = cli_main([*args, "--output", str(tmp_path / "y.h5ad")])
    assert rc == 1
    assert "InputFileError" in capsys.readouterr().err
