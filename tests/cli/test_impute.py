from __future__ import annotations

import json

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
        (np.ones((7, 32), dtype=bool), "the data measures too few of the model's 32 genes"),
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


def _argv(checkpoint, source, *extra: str) -> list[str]:
    return ["impute", "--model", str(checkpoint), "--input", str(source), *extra]


def test_cli_imputes_model_genes_the_input_lacks(
    model, tokenizer, checkpoint, adata, tmp_path, capsys
) -> None:
    lacking = adata[:, [j for j in range(32) if j not in (4, 9, 17, 30)]].copy()
    source = write_h5ad(lacking, tmp_path / "lacking.h5ad")
    output = tmp_path / "out.h5ad"
    assert cli_main([*_argv(checkpoint, source), "--output", str(output)]) == 0
    captured = capsys.readouterr()
    assert "(4 model genes absent from the input added)" in captured.out
    assert "gene coverage: the data measures" in captured.err
    out = ad.read_h5ad(output)
    assert sorted(out.var_names) == sorted(tokenizer.genes)
    assert out.var["absent_from_input"].sum() == 4
    direct = impute_missing(model, tokenizer, lacking)
    np.testing.assert_allclose(out.X, direct.X, rtol=1e-5)
    coverage = out.uns["bulkfm"]["imputation"]["gene_coverage"]
    assert coverage["n_absent"] == 4 and coverage["n_in_data"] == 28

    argv = [*_argv(checkpoint, source), "--output", str(tmp_path / "x.h5ad")]
    assert cli_main([*argv, "--min-gene-coverage", "0.95"]) == 1
    assert "--min-gene-coverage" in capsys.readouterr().err


def test_cli_hide_fraction_prints_and_writes_the_recovery(
    model, tokenizer, checkpoint, adata, input_h5ad, tmp_path, capsys
) -> None:
    report, output = tmp_path / "recovery.json", tmp_path / "out.h5ad"
    argv = [*_argv(checkpoint, input_h5ad), "--hide-fraction", "0.2", "--seed", "3"]
    assert cli_main([*argv, "--report", str(report), "--output", str(output)]) == 0
    out_text = capsys.readouterr().out
    assert "recovery of 5 hidden genes in 7 samples, on log10(1+TPM):" in out_text
    assert "baseline" in out_text and f"-> {output}" in out_text

    def no_nan(token: str) -> float:
        raise AssertionError(f"non-standard JSON constant {token}")

    written = json.loads(report.read_text(), parse_constant=no_nan)
    direct = impute_missing(model, tokenizer, adata, hide_fraction=0.2, seed=3)
    expected = direct.uns["bulkfm"]["imputation"]["recovery"]
    assert written["per_gene"]["gene"] == expected["per_gene"]["gene"]
    np.testing.assert_allclose(written["per_gene"]["rmse"], expected["per_gene"]["rmse"], rtol=1e-5)
    assert written["selection"] == {**expected["selection"]}
    assert written["model"] == str(checkpoint)
    stored = ad.read_h5ad(output).uns["bulkfm"]["imputation"]["recovery"]
    assert list(stored["per_gene"]["gene"]) == expected["per_gene"]["gene"]


def test_cli_hide_genes_from_a_list_or_a_file(checkpoint, adata, input_h5ad, tmp_path, capsys):
    flagged = adata.layers["missing"].toarray().any(axis=0)
    pick = [g for g, f in zip(adata.var_names, flagged, strict=True) if not f][:3]
    assert cli_main([*_argv(checkpoint, input_h5ad), "--hide-genes", ",".join(pick)]) == 0
    assert "recovery of 3 hidden genes in 7 samples" in capsys.readouterr().out
    listed = tmp_path / "genes.txt"
    listed.write_text("# hidden\n" + "\n".join(pick[:2]) + "\n")
    report = tmp_path / "r.json"
    argv = [*_argv(checkpoint, input_h5ad), "--hide-genes", str(listed), "--report", str(report)]
    assert cli_main(argv) == 0
    assert json.loads(report.read_text())["per_gene"]["gene"] == pick[:2]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--hide-fraction", "1.5"], "--hide-fraction) must lie in (0, 1), got 1.5"),
        (["--hide-fraction", "0"], "--hide-fraction) must lie in (0, 1)"),
        (["--hide-genes", "ENSG00000000001,NOPE"], "--hide-genes: 1 of 2 are not genes"),
        ([], "--output is required"),
        (["--report", "r.json"], "--report holds recovery scores"),
    ],
)
def test_cli_bad_hide_values_name_the_flag(checkpoint, input_h5ad, capsys, extra, fragment):
    assert cli_main([*_argv(checkpoint, input_h5ad), *extra]) == 1
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_cli_hide_flags_are_exclusive(checkpoint, input_h5ad, capsys) -> None:
    argv = [*_argv(checkpoint, input_h5ad), "--hide-fraction", "0.1", "--hide-genes", "A"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert "--hide-genes: not allowed with argument --hide-fraction" in capsys.readouterr().err


def test_cli_flagged_gene_cannot_be_hidden(checkpoint, adata, input_h5ad, capsys) -> None:
    flagged = adata.var_names[adata.layers["missing"].toarray().any(axis=0)][0]
    assert cli_main([*_argv(checkpoint, input_h5ad), "--hide-genes", flagged]) == 1
    assert "flagged in layers['missing'] in some sample" in capsys.readouterr().err
