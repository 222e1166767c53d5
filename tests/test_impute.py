from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error, mean_squared_error

from bulkfm.errors import CheckpointError, ConfigError, ExpressionValueError, GeneMappingError
from bulkfm.impute import (
    choose_hidden_genes,
    eligible_genes,
    impute_missing,
    recovery_lines,
    recovery_scores,
)
from bulkfm.models import BulkRNABert
from bulkfm.tokenize import BinTokenizer, TokenizerConfig
from tests.conftest import tiny_config

N_GENES = 32
GENES = [f"ENSG{i:011d}" for i in range(N_GENES)]
TINY = dict(
    n_genes=N_GENES,
    embed_dim=32,
    init_gene_embed_dim=16,
    num_attention_heads=4,
    ffn_embed_dim=64,
    num_layers=2,
)


def simulate_log_tpm(n: int, rng: np.random.Generator, loadings, offsets) -> np.ndarray:
    """Two latent programmes drive all genes: strong gene-gene structure to learn."""
    latent = rng.normal(size=(n, loadings.shape[0]))
    log_tpm = offsets + latent @ loadings + rng.normal(0, 0.05, size=(n, N_GENES))
    return np.clip(log_tpm, 0.0, None)


def train_mlm(
    model: BulkRNABert, tokens: np.ndarray, steps: int, mask_token: int, seed: int
) -> None:
    """Minimal masked-LM loop (the real pre-training lives in bulkfm.train)."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (32,), generator=gen)]
        masked = torch.rand(batch.shape, generator=gen) < 0.3
        inputs = batch.masked_fill(masked, mask_token)
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits[masked], batch[masked])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def trained(one_torch_thread: None) -> dict:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    loadings = rng.normal(0, 0.35, size=(2, N_GENES))
    offsets = rng.uniform(0.8, 2.2, size=N_GENES)
    train_log = simulate_log_tpm(512, rng, loadings, offsets)
    test_log = simulate_log_tpm(40, rng, loadings, offsets)
    train_tpm = 10**train_log - 1
    tokenizer = BinTokenizer.fit(train_tpm, GENES)
    model = BulkRNABert(tiny_config(**TINY))
    train_mlm(model, tokenizer.encode(train_tpm), 500, tokenizer.mask_token_id, seed=0)
    return {
        "model": model,
        "tokenizer": tokenizer,
        "train_log": train_log,
        "test_log": test_log,
    }


def with_hidden_genes(log_tpm: np.ndarray, n_hidden: int, seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    missing = np.zeros(log_tpm.shape, dtype=bool)
    for row in missing:
        row[rng.choice(N_GENES, size=n_hidden, replace=False)] = True
    x = (10**log_tpm - 1).astype(np.float32)
    x[missing] = 0.0  # the data layer's fill value: must not be trusted
    obs = pd.DataFrame(index=[f"S{i}" for i in range(len(x))])
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=GENES))
    adata.layers["missing"] = sp.csr_matrix(missing)
    return adata


@pytest.mark.slow
def test_imputation_beats_training_mean(trained: dict) -> None:
    adata = with_hidden_genes(trained["test_log"], n_hidden=4, seed=1)
    missing = adata.layers["missing"].toarray()
    result = impute_missing(trained["model"], trained["tokenizer"], adata, batch_size=16)
    truth = trained["test_log"][missing]
    imputed = np.log10(1 + result.X[missing].astype(np.float64))
    mean_fill = np.broadcast_to(trained["train_log"].mean(0), missing.shape)[missing]
    mse_model = np.mean((imputed - truth) ** 2)
    mse_mean = np.mean((mean_fill - truth) ** 2)
    print(f"imputation MSE {mse_model:.4f} vs training-mean fill {mse_mean:.4f}")
    # ~0.06 of the mean-fill error when trained as here (seeds 0-3); 0.3 leaves margin
    assert mse_model < 0.3 * mse_mean, (mse_model, mse_mean)


def test_only_missing_entries_change_and_are_reported(trained: dict) -> None:
    adata = with_hidden_genes(trained["test_log"][:6], n_hidden=3, seed=2)
    missing = adata.layers["missing"].toarray()
    missing[0] = False  # sample S0 complete
    adata.layers["missing"] = sp.csr_matrix(missing)
    result = impute_missing(trained["model"], trained["tokenizer"], adata, batch_size=4)
    np.testing.assert_array_equal(result.X[~missing], adata.X[~missing])
    assert (result.X[missing] > 0).all()
    np.testing.assert_array_equal(result.layers["imputed"].toarray(), missing)
    report = result.uns["bulkfm"]["imputation"]
    assert report["n_values"] == missing.sum() == 15
    assert report["samples"] == ["S1", "S2", "S3", "S4", "S5"]
    assert report["n_genes_per_sample"] == [3, 3, 3, 3, 3]
    hit = np.flatnonzero(missing.any(axis=0))
    assert report["genes"] == [GENES[j] for j in hit]
    assert report["n_samples_per_gene"] == missing.sum(axis=0)[hit].tolist()
    assert report["absent_genes_added"] == []
    assert report["gene_coverage"]["n_absent"] == 0
    assert "imputation" not in adata.uns.get("bulkfm", {})  # input untouched


def test_imputed_value_is_decode_expected_of_masked_prediction(trained: dict) -> None:
    model, tok = trained["model"], trained["tokenizer"]
    adata = with_hidden_genes(trained["test_log"][:2], n_hidden=2, seed=3)
    result = impute_missing(model, tok, adata)
    tokens = tok.encode_adata(adata)
    with torch.no_grad():
        probs = model(torch.from_numpy(tokens)).logits.softmax(-1).numpy()
    missing = adata.layers["missing"].toarray()
    np.testing.assert_allclose(result.X[missing], tok.decode_expected(probs[missing]), rtol=1e-5)


def test_reordered_genes_are_aligned(trained: dict) -> None:
    adata = with_hidden_genes(trained["test_log"][:3], n_hidden=2, seed=4)
    expected = impute_missing(trained["model"], trained["tokenizer"], adata)
    order = np.random.default_rng(5).permutation(N_GENES)
    shuffled = adata[:, order].copy()
    result = impute_missing(trained["model"], trained["tokenizer"], shuffled)
    np.testing.assert_allclose(result.X, expected.X[:, order], rtol=1e-5)


def test_no_missing_layer_imputes_nothing(trained: dict) -> None:
    adata = ad.AnnData(
        X=(10 ** trained["test_log"][:2] - 1).astype(np.float32), var=pd.DataFrame(index=GENES)
    )
    result = impute_missing(trained["model"], trained["tokenizer"], adata)
    np.testing.assert_array_equal(result.X, adata.X)
    assert result.layers["imputed"].nnz == 0
    assert result.uns["bulkfm"]["imputation"]["n_samples"] == 0


# --------------------------------------------------------------------------- bad input
def test_bad_batch_size(trained: dict) -> None:
    adata = with_hidden_genes(trained["test_log"][:1], n_hidden=1, seed=7)
    with pytest.raises(ConfigError, match=r"batch_size must be a positive integer"):
        impute_missing(trained["model"], trained["tokenizer"], adata, batch_size=0)


def test_tokenizer_not_matching_model(trained: dict) -> None:
    tok = BinTokenizer(TokenizerConfig(GENES[:30], 3.0))
    adata = with_hidden_genes(trained["test_log"][:1], n_hidden=1, seed=8)
    with pytest.raises(CheckpointError, match=r"tokenizer has 30 genes but the model has"):
        impute_missing(trained["model"], tok, adata)


def test_non_boolean_missing_layer_is_refused(trained: dict) -> None:
    """A float layer (all 2.5) must not count as "all missing" and overwrite X."""
    adata = with_hidden_genes(trained["test_log"][:3], n_hidden=1, seed=9)
    adata.layers["missing"] = np.full(adata.shape, 2.5, dtype=np.float32)
    match = r"layers\['missing'\] holds 96 value\(s\) other than 0/1.*2\.5"
    with pytest.raises(ExpressionValueError, match=match):
        impute_missing(trained["model"], trained["tokenizer"], adata)


def test_zero_one_integer_missing_layer_is_accepted(trained: dict) -> None:
    adata = with_hidden_genes(trained["test_log"][:3], n_hidden=2, seed=10)
    expected = impute_missing(trained["model"], trained["tokenizer"], adata)
    adata.layers["missing"] = adata.layers["missing"].toarray().astype(np.int8)
    result = impute_missing(trained["model"], trained["tokenizer"], adata)
    np.testing.assert_array_equal(result.X, expected.X)
    assert result.layers["imputed"].nnz == 6


def test_samples_with_every_gene_missing_are_refused_like_embed(trained: dict) -> None:
    adata = with_hidden_genes(trained["test_log"][:10], n_hidden=2, seed=11)
    missing = adata.layers["missing"].toarray()
    missing[[2, 7]] = True
    adata.layers["missing"] = sp.csr_matrix(missing)
    with pytest.raises(
        ExpressionValueError, match=r"2 of 10 sample\(s\) have every model gene missing.*'S2', 'S7'"
    ):
        impute_missing(trained["model"], trained["tokenizer"], adata, batch_size=4)


def test_nan_not_marked_missing_is_refused(trained: dict) -> None:
    """NaN in X with no missing layer used to pass through with "nothing to impute"."""
    x = (10 ** trained["test_log"][:4] - 1).astype(np.float32)
    x[2, 5] = np.nan
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=list("abcd")), var=pd.DataFrame(index=GENES))
    with pytest.raises(ExpressionValueError, match=rf"NaN.*sample 'c', gene '{GENES[5]}'"):
        impute_missing(trained["model"], trained["tokenizer"], adata)


def test_nan_marked_missing_is_imputed(trained: dict) -> None:
    adata = with_hidden_genes(trained["test_log"][:3], n_hidden=2, seed=12)
    adata.X[adata.layers["missing"].toarray()] = np.nan
    result = impute_missing(trained["model"], trained["tokenizer"], adata)
    assert np.isfinite(result.X).all()
    assert result.layers["imputed"].nnz == 6


# --------------------------------------------------------------------------- absent genes
ABSENT = [3, 11, 20, 27, 30]  # ~15% of the model's 32 genes: the data has no column for them


def lacking_and_flagged(trained: dict, n: int = 6) -> tuple[ad.AnnData, ad.AnnData]:
    """The same samples two ways: model genes ABSENT dropped from the data, or kept as
    columns holding junk that layers['missing'] flags in every sample."""
    flagged = with_hidden_genes(trained["test_log"][:n], n_hidden=2, seed=21)
    missing = flagged.layers["missing"].toarray()
    missing[:, ABSENT] = True
    flagged.X[:, ABSENT] = 123.0  # never read: flagged
    flagged.layers["missing"] = sp.csr_matrix(missing)
    flagged.var["symbol"] = [f"G{i}" for i in range(N_GENES)]
    flagged.var["highly_variable"] = np.arange(N_GENES) % 2 == 0
    flagged.var["n_cells"] = np.arange(N_GENES, dtype=np.int64)
    flagged.layers["counts"] = np.arange(n * N_GENES, dtype=np.int32).reshape(n, N_GENES)
    flagged.layers["log"] = np.log1p(flagged.X)
    keep = [j for j in range(N_GENES) if j not in ABSENT]
    lacking = flagged[:, keep].copy()
    return lacking, flagged


def test_absent_model_genes_are_appended_and_imputed_like_flagged_ones(
    trained: dict, tmp_path
) -> None:
    model, tok = trained["model"], trained["tokenizer"]
    lacking, flagged = lacking_and_flagged(trained)
    result = impute_missing(model, tok, lacking, batch_size=4)
    reference = impute_missing(model, tok, flagged, batch_size=4)  # the independent route

    absent = [GENES[j] for j in ABSENT]
    assert list(result.var_names) == list(lacking.var_names) + absent
    order = reference.var_names.get_indexer(result.var_names)
    np.testing.assert_allclose(result.X, reference.X[:, order], rtol=1e-5)
    np.testing.assert_array_equal(
        result.layers["imputed"].toarray(), reference.layers["imputed"].toarray()[:, order]
    )
    np.testing.assert_array_equal(
        result.layers["missing"].toarray(), reference.layers["missing"].toarray()[:, order]
    )
    assert result.var["absent_from_input"].tolist() == [False] * 27 + [True] * 5
    # every other layer and var column is padded with "unknown", in a dtype h5ad writes
    assert np.isnan(result.layers["log"][:, -5:]).all()
    assert (result.layers["counts"][:, -5:] == 0).all()
    assert result.layers["counts"].dtype == np.int32
    assert result.var["symbol"].iloc[-5:].isna().all()
    assert result.var["highly_variable"].iloc[-5:].isna().all()
    assert result.var["highly_variable"].iloc[:2].tolist() == [True, False]
    report = result.uns["bulkfm"]["imputation"]
    assert report["absent_genes_added"] == absent
    assert report["gene_coverage"]["n_absent"] == 5
    assert report["gene_coverage"]["examples_absent"] == absent
    assert report["n_samples"] == 6
    assert report["n_values"] == reference.uns["bulkfm"]["imputation"]["n_values"]
    assert "absent_from_input" not in lacking.var  # input untouched

    from bulkfm.io import write_h5ad

    back = ad.read_h5ad(write_h5ad(result, tmp_path / "out.h5ad"))
    np.testing.assert_allclose(back.X, result.X)
    assert back.var["absent_from_input"].tolist() == result.var["absent_from_input"].tolist()
    assert list(back.uns["bulkfm"]["imputation"]["absent_genes_added"]) == absent


def test_absent_genes_not_added_keeps_the_input_columns(trained: dict) -> None:
    """The bug this replaces: an absent gene's column -1 wrote into the last data column."""
    model, tok = trained["model"], trained["tokenizer"]
    lacking, flagged = lacking_and_flagged(trained)
    result = impute_missing(model, tok, lacking, add_absent_genes=False)
    reference = impute_missing(model, tok, flagged)
    assert list(result.var_names) == list(lacking.var_names)
    cols = reference.var_names.get_indexer(lacking.var_names)
    np.testing.assert_allclose(result.X, reference.X[:, cols], rtol=1e-5)
    untouched = ~lacking.layers["missing"].toarray()
    np.testing.assert_array_equal(result.X[untouched], lacking.X[untouched])


def test_too_little_coverage_names_the_option(trained: dict) -> None:
    lacking, _ = lacking_and_flagged(trained)
    with pytest.raises(GeneMappingError, match=r"below the minimum 90%.*--min-gene-coverage"):
        impute_missing(trained["model"], trained["tokenizer"], lacking, min_gene_coverage=0.9)


# --------------------------------------------------------------------------- recovery
def test_recovery_scores_match_scipy_sklearn_and_a_naive_loop() -> None:
    rng = np.random.default_rng(3)
    truth = 10 ** rng.uniform(0, 3, size=(9, 4)) - 1
    pred = truth * np.exp(rng.normal(0, 0.4, size=truth.shape))
    genes = ["a", "b", "c", "d"]
    scores = recovery_scores(truth, pred, genes)
    t, p = np.log10(1 + truth), np.log10(1 + pred)
    for g in range(4):
        assert scores.pearson_r[g] == pytest.approx(pearsonr(p[:, g], t[:, g])[0], abs=1e-12)
        assert scores.mae[g] == pytest.approx(mean_absolute_error(t[:, g], p[:, g]))
        assert scores.rmse[g] == pytest.approx(np.sqrt(mean_squared_error(t[:, g], p[:, g])))
        loo = [np.mean([t[j, g] for j in range(9) if j != i]) for i in range(9)]
        assert scores.baseline_mae[g] == pytest.approx(mean_absolute_error(t[:, g], loo))
        assert scores.baseline_rmse[g] == pytest.approx(np.sqrt(mean_squared_error(t[:, g], loo)))
        assert scores.sd[g] == pytest.approx(np.std(t[:, g]))
        assert scores.baseline_rmse[g] == pytest.approx(scores.sd[g] * 9 / 8)
    overall = scores.overall
    assert overall["mae"] == pytest.approx(mean_absolute_error(t.ravel(), p.ravel()))
    assert overall["rmse"] == pytest.approx(np.sqrt(mean_squared_error(t.ravel(), p.ravel())))
    assert overall["mean_pearson_r"] == pytest.approx(np.mean(scores.pearson_r))
    assert overall["n_genes_model_better"] == int(np.sum(scores.rmse < scores.baseline_rmse))
    record = scores.to_dict()
    assert record["per_gene"]["gene"] == genes and isinstance(record["per_gene"]["mae"], list)


def test_recovery_r_is_undefined_for_a_constant_gene_or_two_samples() -> None:
    truth = np.array([[1.0, 5.0], [1.0, 7.0], [1.0, 9.0]])
    scores = recovery_scores(truth, truth + np.array([[0, 1], [0, 0], [0, 2]]), ["flat", "x"])
    assert np.isnan(scores.pearson_r[0]) and np.isfinite(scores.pearson_r[1])
    assert scores.overall["n_genes_with_r"] == 1
    two = recovery_scores(truth[:2], truth[:2], ["flat", "x"])
    assert np.isnan(two.pearson_r).all()
    with pytest.raises(ConfigError, match="at least 2 samples"):
        recovery_scores(truth[:1], truth[:1], ["flat", "x"])


def partly_measured(trained: dict) -> ad.AnnData:
    """Model genes 3 and 11 absent; genes 5 and 8 flagged missing in one sample each."""
    adata = with_hidden_genes(trained["test_log"][:12], n_hidden=0, seed=0)
    missing = np.zeros(adata.shape, dtype=bool)
    missing[2, 5] = missing[7, 8] = True
    adata.layers["missing"] = sp.csr_matrix(missing)
    adata.var["symbol"] = [f"G{i}" for i in range(N_GENES)]
    return adata[:, [j for j in range(N_GENES) if j not in (3, 11)]].copy()


def test_hidden_genes_are_measured_model_genes_only(trained: dict) -> None:
    tok = trained["tokenizer"]
    adata = partly_measured(trained)
    never = {GENES[j] for j in (3, 5, 8, 11)}
    eligible = eligible_genes(tok, adata)
    assert len(eligible) == 28 and not never & set(eligible)
    for seed in range(5):
        chosen = choose_hidden_genes(tok, adata, fraction=0.9, seed=seed)
        assert len(chosen) == round(0.9 * 28) and not never & set(chosen)
    assert choose_hidden_genes(tok, adata, fraction=0.01) != []  # at least one gene
    assert choose_hidden_genes(tok, adata, genes=["G7", GENES[1]]) == [GENES[1], GENES[7]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fraction": 0.0}, r"--hide-fraction\) must lie in \(0, 1\), got 0\.0"),
        ({"fraction": 1.0}, r"--hide-fraction\) must lie in \(0, 1\)"),
        ({"fraction": 1.5}, r"--hide-fraction\) must lie in \(0, 1\)"),
        ({"fraction": 0.1, "genes": ["G1"]}, r"not both"),
        ({"genes": ["ENSGnope", "G1"]}, r"--hide-genes: 1 of 2 are not genes of the data"),
        ({"genes": [GENES[5]]}, r"--hide-genes: 1 are flagged in layers\['missing'\]"),
        ({"genes": []}, r"--hide-genes is empty"),
    ],
)
def test_bad_hide_arguments_name_the_flag(trained: dict, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        choose_hidden_genes(trained["tokenizer"], partly_measured(trained), **kwargs)


def test_a_gene_outside_the_model_cannot_be_hidden(trained: dict) -> None:
    adata = partly_measured(trained)
    extra = ad.AnnData(
        X=np.ones((adata.n_obs, 1), np.float32),
        obs=adata.obs,
        var=pd.DataFrame({"symbol": ["NOTMODEL"]}, index=["ENSG99999999999"]),
    )
    both = ad.concat([adata, extra], axis=1, merge="same")
    with pytest.raises(ConfigError, match=r"1 are not genes of the model.*ENSG99999999999"):
        choose_hidden_genes(trained["tokenizer"], both, genes=["NOTMODEL"])


def test_hide_fraction_imputes_and_scores_the_hidden_genes(trained: dict, tmp_path) -> None:
    model, tok = trained["model"], trained["tokenizer"]
    adata = partly_measured(trained)
    result = impute_missing(model, tok, adata, hide_fraction=0.25, seed=4, batch_size=5)
    record = result.uns["bulkfm"]["imputation"]["recovery"]
    hidden = record["per_gene"]["gene"]
    assert hidden == choose_hidden_genes(tok, adata, fraction=0.25, seed=4)
    assert record["selection"]["n_eligible"] == 28 and record["n_genes"] == 7
    # independent route: flag the genes by hand, impute, score
    by_hand = adata.copy()
    flags = by_hand.layers["missing"].toarray()
    cols = adata.var_names.get_indexer(hidden)
    flags[:, cols] = True
    by_hand.layers["missing"] = sp.csr_matrix(flags)
    reference = impute_missing(model, tok, by_hand, batch_size=5)
    rcols = reference.var_names.get_indexer(hidden)
    np.testing.assert_allclose(result.X[:, cols], reference.X[:, rcols], rtol=1e-5)
    assert result.layers["imputed"][:, cols].toarray().all()
    assert not result.layers["missing"][:, cols].toarray().any()  # measured, so not missing
    expected = recovery_scores(adata.X[:, cols], reference.X[:, rcols], hidden)
    np.testing.assert_allclose(record["per_gene"]["rmse"], expected.rmse, rtol=1e-5)
    np.testing.assert_allclose(record["per_gene"]["pearson_r"], expected.pearson_r, rtol=1e-4)
    assert record["overall"]["baseline_rmse"] == pytest.approx(
        expected.overall["baseline_rmse"], rel=1e-6
    )
    # the model learnt the gene-gene structure: it beats the per-gene mean
    assert record["overall"]["rmse"] < record["overall"]["baseline_rmse"]

    from bulkfm.io import write_h5ad

    back = ad.read_h5ad(write_h5ad(result, tmp_path / "rec.h5ad"))
    stored = back.uns["bulkfm"]["imputation"]["recovery"]
    assert list(stored["per_gene"]["gene"]) == hidden
    assert stored["selection"]["seed"] == 4
    assert recovery_lines(stored)[0].startswith("recovery of 7 hidden genes in 12 samples")
