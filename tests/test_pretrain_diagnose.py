"""scripts/pretrain_diagnose.py: its decoding, readout and masked-prediction helpers
against naive references, and one end-to-end run on a tiny simulated study."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def diag() -> ModuleType:
    return _load("pretrain_diagnose")


# --------------------------------------------------------------------------- decoding
def test_decoding_r2_equals_closed_form_ridge(diag: ModuleType) -> None:
    rng = np.random.default_rng(0)
    X_train, X_test = rng.normal(size=(60, 5)), rng.normal(size=(40, 5))
    W = rng.normal(size=(5, 3))
    Y_train = X_train @ W + rng.normal(size=(60, 3))
    Y_test = X_test @ W + rng.normal(size=(40, 3))
    groups = np.repeat(["a", "b", "c", "d"], 10)
    alpha = 3.0
    r2, within = diag.decoding_r2(
        X_train, Y_train, X_test, Y_test, groups_test=groups, alphas=[alpha]
    )
    # naive: standardise on training rows, centre, solve the ridge normal equations
    mu, sd = X_train.mean(0), X_train.std(0)
    A, B = (X_train - mu) / sd, (X_test - mu) / sd
    beta = np.linalg.solve(A.T @ A + alpha * np.eye(5), A.T @ (Y_train - Y_train.mean(0)))
    pred = B @ beta + Y_train.mean(0)
    for j in range(3):
        sse = sum((Y_test[i, j] - pred[i, j]) ** 2 for i in range(40))
        sst = sum((Y_test[i, j] - Y_test[:, j].mean()) ** 2 for i in range(40))
        sst_w = 0.0
        for g in np.unique(groups):
            part = Y_test[groups == g, j]
            sst_w += sum((v - part.mean()) ** 2 for v in part)
        assert r2[j] == pytest.approx(1 - sse / sst, abs=1e-9)
        assert within[j] == pytest.approx(1 - sse / sst_w, abs=1e-9)


def test_decoding_r2_known_answers(diag: ModuleType) -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 8))
    noise = rng.normal(size=(400, 20))
    # a target that is one of the features: R^2 ~ 1; independent noise: R^2 ~ 0
    r2, _ = diag.decoding_r2(X[:300], X[:300, [2]], X[300:], X[300:, [2]])
    assert r2[0] > 0.99
    r2, within = diag.decoding_r2(X[:300], noise[:300], X[300:], noise[300:])
    assert abs(r2.mean()) < 0.05 and np.isnan(within).all()


def test_within_cohort_r2_is_zero_for_a_cohort_only_decoder(diag: ModuleType) -> None:
    rng = np.random.default_rng(2)
    cohort = np.repeat(np.arange(4), 100)
    onehot = (cohort[:, None] == np.arange(4)).astype(float)
    y = (3.0 * cohort + rng.normal(size=400))[:, None]  # cohort means + within-cohort noise
    train, test = np.arange(400) % 2 == 0, np.arange(400) % 2 == 1
    r2, within = diag.decoding_r2(
        onehot[train], y[train], onehot[test], y[test], groups_test=cohort[test]
    )
    assert r2[0] > 0.9  # cohort identity explains the across-cohort spread ...
    assert abs(within[0]) < 0.1  # ... and nothing within a cohort


def test_prognostic_z_finds_the_gene_that_drives_hazard_within_strata(diag: ModuleType) -> None:
    rng = np.random.default_rng(3)
    n = 300
    strata = np.repeat(["A", "B", "C"], 100)
    X = rng.normal(size=(n, 3))
    X[:, 2] = 5.0  # constant: no evidence
    base = np.where(strata == "A", 0.2, np.where(strata == "B", 1.0, 5.0))  # strata differ
    time_ = rng.exponential(1.0 / (base * np.exp(0.8 * X[:, 0])))
    event = rng.random(n) < 0.8
    z = diag.prognostic_z(X, time_, event, strata)
    assert z[0] > 4 and abs(z[1]) < 3 and z[2] == 0.0


def test_compare_top_against_a_naive_split(diag: ModuleType) -> None:
    from scipy.stats import mannwhitneyu, spearmanr

    rng = np.random.default_rng(4)
    values, z = rng.normal(size=30), rng.normal(size=30)
    got = diag.compare_top(values, np.abs(z), 5)
    top = sorted(range(30), key=lambda i: -abs(z[i]))[:5]
    rest = [i for i in range(30) if i not in top]
    assert got["top"] == pytest.approx(np.mean(values[top]))
    assert got["rest"] == pytest.approx(np.mean(values[rest]))
    assert got["mwu_p"] == pytest.approx(mannwhitneyu(values[top], values[rest]).pvalue)
    assert got["spearman"] == pytest.approx(spearmanr(values, np.abs(z))[0])


def test_partial_spearman_matches_the_pairwise_formula_and_removes_a_confounder(
    diag: ModuleType,
) -> None:
    from scipy.stats import spearmanr, t

    rng = np.random.default_rng(7)
    v = rng.normal(size=200)
    x = v + 0.5 * rng.normal(size=200)
    y = v + 0.3 * x + rng.normal(size=200)
    rho, p = diag.partial_spearman(x, y, v)
    # naive: the first-order partial correlation from the three pairwise Spearman rhos
    r_xy, r_xv, r_yv = spearmanr(x, y)[0], spearmanr(x, v)[0], spearmanr(y, v)[0]
    expect = (r_xy - r_xv * r_yv) / math.sqrt((1 - r_xv**2) * (1 - r_yv**2))
    assert rho == pytest.approx(expect, abs=1e-10)
    stat = expect * math.sqrt((200 - 3) / (1 - expect**2))
    assert p == pytest.approx(2 * t.sf(abs(stat), 200 - 3), rel=1e-8)
    # two variables that share only the covariate: strongly correlated, not partially
    a, b = v + 0.2 * rng.normal(size=200), v + 0.2 * rng.normal(size=200)
    assert spearmanr(a, b)[0] > 0.8
    assert abs(diag.partial_spearman(a, b, v)[0]) < 0.2
    # NaNs are left out, as compare_top does
    a[:5] = np.nan
    assert diag.partial_spearman(a, b, v)[0] == pytest.approx(
        diag.partial_spearman(a[5:], b[5:], v[5:])[0]
    )


def test_partial_spearman_agrees_with_pingouin_if_installed(diag: ModuleType) -> None:
    pg = pytest.importorskip("pingouin")
    rng = np.random.default_rng(8)
    frame = pd.DataFrame(rng.normal(size=(80, 3)), columns=["x", "y", "v"])
    frame["y"] += frame["x"] + frame["v"]
    ref = pg.partial_corr(frame, x="x", y="y", covar="v", method="spearman")
    rho, p = diag.partial_spearman(*(frame[c].to_numpy() for c in ("x", "y", "v")))
    assert rho == pytest.approx(float(ref["r"].iloc[0]), abs=1e-10)
    assert p == pytest.approx(float(ref["p-val"].iloc[0]), rel=1e-6)


def test_compare_top_adds_the_partial_correlation_with_a_covariate(diag: ModuleType) -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(9)
    values, z, var = rng.normal(size=40), np.abs(rng.normal(size=40)), rng.random(40)
    got = diag.compare_top(values, z, 5, covariate=var)
    assert got["partial_spearman"] == pytest.approx(diag.partial_spearman(values, z, var)[0])
    assert got["spearman_var"] == pytest.approx(spearmanr(values, var)[0])
    assert "partial_spearman" not in diag.compare_top(values, z, 5)


def test_within_group_variance_equals_a_naive_loop(diag: ModuleType) -> None:
    rng = np.random.default_rng(10)
    Y = rng.normal(size=(30, 4)) + np.repeat([0.0, 5.0, -3.0], 10)[:, None]
    groups = np.repeat(["a", "b", "c"], 10)
    got = diag.within_group_variance(Y, groups)
    for j in range(4):
        total = 0.0
        for g in ("a", "b", "c"):
            part = Y[groups == g, j]
            total += sum((v - part.mean()) ** 2 for v in part)
        assert got[j] == pytest.approx(total / 30)


def test_own_gene_r2_equals_one_least_squares_line_per_gene(diag: ModuleType) -> None:
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(11)
    x = rng.normal(size=(90, 3))
    y = 2.0 * x + rng.normal(size=(90, 3))
    y[:, 1] = rng.normal(size=90)  # unrelated to its own readout
    x[:, 2] = 1.0  # constant readout: predicts the training mean
    groups = np.repeat(["a", "b", "c"], 10)
    r2, within = diag.own_gene_r2(x[:60], y[:60], x[60:], y[60:], groups_test=groups)
    for j in range(3):
        fit = LinearRegression().fit(x[:60, [j]], y[:60, j])
        pred = fit.predict(x[60:, [j]])
        assert r2[j] == pytest.approx(r2_score(y[60:, j], pred), abs=1e-9)
        sst_w = sum(((y[60:, j][groups == g] - y[60:, j][groups == g].mean()) ** 2).sum()
                    for g in "abc")  # fmt: skip
        assert within[j] == pytest.approx(1 - ((y[60:, j] - pred) ** 2).sum() / sst_w, abs=1e-9)
    assert r2[0] > 0.6 and r2[1] < 0.1


# --------------------------------------------------------------------------- readouts
def _tokens(model: Any, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cfg = model.config
    return rng.integers(0, cfg.n_expressions_bins, size=(n, cfg.n_genes)).astype(np.int64)


def test_token_readouts_equal_per_sample_outputs_and_hand_expectation(
    diag: ModuleType, tiny_model: Callable[..., Any]
) -> None:
    import torch

    torch.manual_seed(0)
    model = tiny_model(num_layers=2, n_expressions_bins=8).eval()
    tokens = _tokens(model, 5)
    states, recon = diag.token_readouts(model, tokens, batch_size=2)
    assert states.shape == (5, model.config.n_genes, model.config.embed_dim)
    with torch.no_grad():
        for i in range(5):
            out = model(torch.from_numpy(tokens[i : i + 1]))
            np.testing.assert_allclose(states[i], out.last_hidden_state[0].numpy(), atol=1e-5)
            for g in range(model.config.n_genes):
                logits = out.logits[0, g].double().tolist()
                top = max(logits)
                weights = [math.exp(v - top) for v in logits]
                expect = sum(b * w for b, w in enumerate(weights)) / sum(weights)
                assert recon[i, g] == pytest.approx(expect, abs=1e-5)
    # the mean over genes of the states is the study's pooled embedding
    pooled = model.embed(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(states.mean(axis=1), pooled, atol=1e-5)


def test_gene_groups_partition_the_genes_into_k_seeded_groups(diag: ModuleType) -> None:
    assert [diag.n_context_groups(p) for p in (0.15, 0.2, 0.3, 0.5)] == [7, 5, 4, 2]
    groups = diag.gene_groups(23, 7, seed=3)
    assert groups.shape == (23,)
    sizes = np.bincount(groups, minlength=7)
    assert sizes.sum() == 23 and set(np.unique(groups)) == set(range(7))  # disjoint, cover
    assert sizes.max() - sizes.min() <= 1
    np.testing.assert_array_equal(groups, diag.gene_groups(23, 7, seed=3))
    assert not np.array_equal(groups, diag.gene_groups(23, 7, seed=4))
    for bad in (0, 24):
        with pytest.raises(diag.ConfigError, match="groups"):
            diag.gene_groups(23, bad, seed=0)
    with pytest.raises(diag.ConfigError, match="mask_prob"):
        diag.n_context_groups(0.0)


@pytest.mark.filterwarnings("ignore:the tokens hold")  # the missing genes' [MASK]s
def test_context_reconstruction_is_a_pass_with_exactly_its_group_masked(
    diag: ModuleType, tiny_model: Callable[..., Any]
) -> None:
    import torch

    torch.manual_seed(2)
    model = tiny_model(num_layers=2, n_expressions_bins=8).eval()
    n_genes, mask_id = model.config.n_genes, model.config.mask_token_id
    tokens = _tokens(model, 5, seed=3)
    tokens[1, [0, 4]] = mask_id  # missing genes stay [MASK] in every pass
    before = tokens.copy()
    groups = diag.gene_groups(n_genes, 3, seed=1)
    got = diag.context_reconstruction(model, tokens, groups, batch_size=2)
    np.testing.assert_array_equal(tokens, before)
    _, unmasked = diag.token_readouts(model, tokens)
    assert np.abs(got - unmasked).max() > 1e-3  # the own value is hidden: not a copy
    with torch.no_grad():
        for i in range(5):
            for g in range(n_genes):
                hidden = [
                    mask_id if groups[h] == groups[g] else int(tokens[i, h]) for h in range(n_genes)
                ]
                logits = model(torch.tensor([hidden])).logits[0, g].double().tolist()
                top = max(logits)
                weights = [math.exp(v - top) for v in logits]
                expect = sum(b * w for b, w in enumerate(weights)) / sum(weights)
                assert got[i, g] == pytest.approx(expect, abs=1e-5)


def test_mlm_per_gene_matches_a_naive_loop(diag: ModuleType, tiny_model: Callable[..., Any]):
    import torch

    from bulkfm.train.data import gene_bin_statistics

    torch.manual_seed(1)
    model = tiny_model(n_expressions_bins=8).eval()
    n_bins, n_genes = 8, model.config.n_genes
    tokens = _tokens(model, 12, seed=5)
    tokens[0, :3] = model.config.mask_token_id  # missing genes are never targets
    mode, log_prob = gene_bin_statistics(tokens, np.arange(12), n_bins)
    cohort = np.array([0, 1] * 6)
    rows = np.arange(12)
    per_row = diag.cohort_bin_statistics(tokens, rows, cohort, rows, n_bins, (mode, log_prob))
    seeds = [7, 8, 9]
    trivial = {"trivial": (mode, log_prob), "cohort": per_row}
    got = diag.mlm_per_gene(
        model, tokens, trivial=trivial, seeds=seeds, mask_prob=0.3, batch_size=5
    )
    sums = {k: np.zeros(n_genes) for k in ("n", "cm", "am", "ct", "at", "cc", "ac")}
    for seed in seeds:
        draw = diag.mask_draw(
            tokens,
            mask_token_id=model.config.mask_token_id,
            n_bins=n_bins,
            mask_prob=0.3,
            seed=seed,
        )
        for i in range(12):
            with torch.no_grad():
                logits = model(draw.input_ids[i : i + 1]).logits[0].double()
            c_mode, c_lp = gene_bin_statistics(tokens, rows[cohort == cohort[i]], n_bins)
            for g in range(n_genes):
                if not draw.selected[i, g]:
                    continue
                true = int(tokens[i, g])
                lse = math.log(sum(math.exp(v) for v in logits[g].tolist()))
                sums["n"][g] += 1
                sums["cm"][g] += lse - float(logits[g, true])
                sums["am"][g] += int(int(logits[g].argmax()) == true)
                sums["ct"][g] += -float(log_prob[g, true])
                sums["at"][g] += int(mode[g] == true)
                sums["cc"][g] += -float(c_lp[g, true])
                sums["ac"][g] += int(c_mode[g] == true)
    assert sums["n"][:3].sum() > 0 and (got["n_targets"].to_numpy() == sums["n"]).all()
    pairs = {
        "ce_model": "cm",
        "acc_model": "am",
        "ce_trivial": "ct",
        "acc_trivial": "at",
        "ce_cohort": "cc",
        "acc_cohort": "ac",
    }
    for col, key in pairs.items():
        with np.errstate(invalid="ignore"):
            expect = sums[key] / sums["n"]
        np.testing.assert_allclose(got[col].to_numpy(), expect, atol=1e-5, equal_nan=True)


def test_feature_pca_learns_from_training_rows_only(diag: ModuleType) -> None:
    import anndata as ad

    from bulkfm.embedders.classical import CappedPCA

    rng = np.random.default_rng(6)
    feats = rng.normal(size=(30, 12))
    ids = [f"s{i}" for i in range(30)]
    adata = ad.AnnData(np.zeros((30, 1)), obs=pd.DataFrame(index=ids))
    emb = diag.FeaturePCA(feats, ids, n_components=3, label="x").fit(adata[:20])
    expect = CappedPCA(3, standardize=True).fit(feats[:20]).transform(feats[20:])
    np.testing.assert_allclose(emb.transform(adata[20:]), expect, atol=1e-10)
    whole = diag.FeaturePCA(feats, ids, n_components=None, label="y").fit(adata[:20])
    np.testing.assert_array_equal(whole.transform(adata[::-1]), feats[::-1])


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_diagnose_runs_end_to_end_on_a_tiny_study(diag: ModuleType, tmp_path: Path) -> None:
    from bulkfm.data.simulate import simulate_bulk

    study = sys.modules["pretrain_study"]  # the diagnosis imports the study's own module
    path = tmp_path / "sim.h5ad"
    simulate_bulk(n_samples=240, n_genes=200, seed=0).write_h5ad(path)
    folder = tmp_path / "study"
    argv = [
        "--out", str(folder), "--adata", str(path), "--steps", "0,2,4", "--splits", "3",
        "--set", "data.top_k_variable_genes=16", "--set", "optim.micro_batch_size=4",
        "--set", "eval_every=2", "--no-plot",
    ]  # fmt: skip
    assert study.main(argv) == 0
    out = tmp_path / "diag"
    common = ["--study", str(folder), "--adata", str(path), "--top-k", "4"]
    assert diag.main([*common, "--out", str(out), "--mask-repeats", "2"]) == 0
    records = pd.read_csv(out / "diagnose.csv")
    assert set(records["section"]) == {"decode", "survival", "mlm", "genes"}
    assert set(records["step"].dropna().astype(int)) == {0, 4}
    assert set(records["pretrain_seed"]) == {0} and set(records["split"]) == {0, 1, 2}
    surv = records[records["section"] == "survival"]
    context = {"context-only reconstruction, PCA", "context-only reconstruction, all genes"}
    assert {"pooled", "token states, PCA", "reconstruction, PCA", "pca", "raw"} | context <= set(
        surv["readout"]
    )
    assert surv["value"].between(0, 1).all()
    decode = records[records["section"] == "decode"]
    own = {"reconstruction, own gene", "context-only reconstruction, own gene"}
    assert {"pca", "cohort identity (one-hot)", "pooled", "input bins, own gene"} | own <= set(
        decode["readout"]
    )
    mlm = records[records["section"] == "mlm"]
    assert mlm[mlm["metric"] == "ce_gain_partial_spearman"]["value"].between(-1, 1).all()
    meta = json.loads((out / "diagnose.json").read_text())
    checks = meta["checks"]
    # the pooled survival scores are the study's own (same probe, same splits)
    assert checks["max_abs_diff_pooled_vs_study_survival"] == pytest.approx(0.0, abs=1e-9)
    assert checks["seed0.splits_match_benchmark"] is True
    assert checks["seed0.step4.pooled_equals_mean_of_states"] < 1e-5
    genes = pd.read_csv(out / "genes.csv")
    assert len(genes[genes["step"] == 4]) == 3 * 16
    assert "within-cohort R²" in (out / "diagnose.md").read_text()
    assert checks["seed0.context_groups"] == 7 and checks["seed0.pretrain_rows_match_run"]
    # a rerun reuses the seed's cache and reproduces the tables
    assert diag.main([*common, "--out", str(out), "--mask-repeats", "2"]) == 0
    assert json.loads((out / "diagnose.json").read_text())["seeds_from_cache"] == [0]
    pd.testing.assert_frame_equal(pd.read_csv(out / "diagnose.csv"), records)
    # a study still running (no study.json): --run names the run, finished seeds only
    running = tmp_path / "running"
    running.mkdir()
    (running / "runs").symlink_to(folder / "runs")
    bare = ["--study", str(running), "--adata", str(path), "--top-k", "4", "--mask-repeats", "2"]
    assert diag.main([*bare, "--out", str(out), "--run", "reference_max4"]) == 0
    assert json.loads((out / "diagnose.json").read_text())["seeds"] == [0]
    assert diag.main([*bare, "--out", str(tmp_path / "d5")]) == 2  # no study.json, no --run
    # bad input: an unknown run, a rung beyond the run, a folder that is no study
    assert diag.main([*common, "--out", str(tmp_path / "d2"), "--run", "nope_max4"]) == 2
    assert diag.main([*common, "--out", str(tmp_path / "d3"), "--rungs", "0,8"]) == 2
    assert diag.main([*common, "--out", str(tmp_path / "d3"), "--rungs", "0,3"]) == 2  # unsaved
    assert diag.main([*common, "--out", str(folder / "inside")]) == 2
    bad = ["--study", str(tmp_path), "--adata", str(path), "--out", str(tmp_path / "d4")]
    assert diag.main(bad) == 2
