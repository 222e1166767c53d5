from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bulkfm.cli import build_parser
from bulkfm.cli import main as cli_main
from bulkfm.embed import embed_adata
from bulkfm.errors import ConfigError, InputFileError
from bulkfm.io import write_h5ad

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


def test_cli_embed_counts_every_all_missing_sample(adata, checkpoint, tmp_path, capsys):
    """All 7 samples are reported, not those of the first batch of 2."""
    adata.layers["missing"] = np.ones(adata.shape, dtype=bool)
    source = write_h5ad(adata, tmp_path / "empty.h5ad")
    output = tmp_path / "e.parquet"
    argv = ["embed", "--model", str(checkpoint), "--input", str(source), "--output", str(output)]
    assert cli_main([*argv, "--batch-size", "2"]) == 1
    err = capsys.readouterr().err
    assert "measures too few" in err and "lower --min-gene-coverage" in err
    assert cli_main([*argv, "--batch-size", "2", "--min-gene-coverage", "0"]) == 1
    err = capsys.readouterr().err
    assert "7 of 7 sample(s) have every model gene missing" in err and "Traceback" not in err
    assert not output.exists()


def test_cli_embed_records_coverage_of_data_lacking_model_genes(
    adata, checkpoint, tmp_path, caplog
):
    source = write_h5ad(adata[:, 3:].copy(), tmp_path / "lacking.h5ad")
    output = tmp_path / "e.h5ad"
    argv = ["embed", "--model", str(checkpoint), "--input", str(source), "--output", str(output)]
    with caplog.at_level("INFO"):
        assert cli_main(argv) == 0
    out = ad.read_h5ad(output)
    record = out.uns["bulkfm"]["embeddings"]["X_bulkrnabert"]["gene_coverage"]
    n_genes = adata.n_vars
    assert record["n_absent"] == 3 and record["n_in_data"] == n_genes - 3
    own = adata.layers.get("missing")
    flagged = 0 if own is None else np.asarray(own[:, 3:].sum(axis=1)).ravel()
    measured = (n_genes - 3 - flagged) / n_genes
    assert record["fraction_measured"] == pytest.approx(np.mean(measured))
    assert "gene coverage: the data measures" in caplog.text


def test_cli_embed_max_pooling_is_used_and_recorded(
    model, tokenizer, checkpoint, adata, input_h5ad
):
    out = input_h5ad.parent / "m.h5ad"
    base = ["embed", "--model", str(checkpoint), "--input", str(input_h5ad), "--output", str(out)]
    assert run_cli([*base, "--pooling", "max", "--key", "M"]) == 0
    back = ad.read_h5ad(out)
    expected = embed_adata(model, tokenizer, adata, pooling="max")
    np.testing.assert_allclose(back.obsm["M"], expected, atol=1e-5)
    assert not np.allclose(expected, embed_adata(model, tokenizer, adata))
    assert back.uns["bulkfm"]["embeddings"]["M"]["pooling"] == "max over genes"
    with pytest.raises(ConfigError, match=r"--pooling must be one of \['mean', 'max'\]"):
        run_cli([*base, "--pooling", "sum"])
