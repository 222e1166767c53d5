from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from bulkfm.cli import main as cli_main
from bulkfm.impute import impute_missing
from bulkfm.io import write_h5ad

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


@pytest.mark.parametrize(
    ("layer", "fragment"),
    [
        (np.full((7, 32), 2.5, dtype=np.float32), "layers['missing'] holds 224 value(s)"),
        (np.ones((7, 32), dtype=bool), "7 of 7 sample(s) have every model gene missing"),
    ],
)
def test_cli_impute_refuses_bad_missing_layer(
    adata, checkpoint, tmp_path, capsys, layer, fragment
) -> None:
    """Exit 1 with the named error, no traceback, no output (was: exit 0, X overwritten)."""
    adata.layers["missing"] = layer
    source = write_h5ad(adata, tmp_path / "bad.h5ad")
    output = tmp_path / "out.h5ad"
    argv = ["impute", "--model", str(checkpoint), "--input", str(source), "--output", str(output)]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not output.exists()


def test_cli_impute_refuses_nan_not_marked_missing(adata, checkpoint, tmp_path, capsys) -> None:
    del adata.layers["missing"]
    adata.X[3, 4] = np.nan
    source = write_h5ad(adata, tmp_path / "nan.h5ad")
    output = tmp_path / "out.h5ad"
    argv = ["impute", "--model", str(checkpoint), "--input", str(source), "--output", str(output)]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "NaN/inf expression values not marked missing (first at sample 'S3'" in err
    assert not output.exists()
