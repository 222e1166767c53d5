"""The benchmark scripts run end to end at a tiny size (so they cannot rot), their
helpers measure what they claim, and the model's inference fast path computes what
the autograd path computes.

No timing is asserted: the machine is shared. What is asserted is what must hold at
any speed: the FLOP formula equals torch's own count, the naive-attention baseline
gives the model's embeddings from the same weights, gradient checkpointing does not
change the loss, the vectorised tokenizer equals the official recipe, and a child's
peak memory is its own.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from bulkfm.models import cpu_attention
from tests.conftest import tiny_config

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    """A benchmark module by file name (benchmarks/ is not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name == "_common":  # imported by that name by the scripts themselves
        return importlib.import_module("_common")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_torch_threads(monkeypatch: pytest.MonkeyPatch):
    """Inline benchmark runs set torch threads and OMP env: give them back after."""
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(key, os.environ.get(key, ""))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# Every size differs from the others, so a FLOP formula that swapped two of them fails.
SMOKE = dict(
    n_genes=40,
    embed_dim=32,
    num_attention_heads=4,
    ffn_embed_dim=64,
    num_layers=2,
    init_gene_embed_dim=24,
)


# --------------------------------------------------------------------------- helpers
@pytest.mark.parametrize(
    "overrides",
    [{}, {"key_size": 16}, {"use_gene_embedding": False}, {"n_genes": 64, "num_layers": 3}],
)
def test_model_flops_equal_torch_flop_counter(overrides: dict) -> None:
    from bulkfm.models.bulkrnabert import BulkRNABert

    common = load("_common")
    config = tiny_config(**{**SMOKE, **overrides})
    model = BulkRNABert(config)
    tokens = torch.randint(0, 64, (3, config.n_genes))
    assert (
        common.counted_flops(model, tokens) == common.model_flops(config, config.n_genes, 3).total
    )
    subset = torch.arange(5, 25)
    assert common.counted_flops(model, tokens[:, :20], subset) == (
        common.model_flops(config, 20, 3).total
    )


def test_flop_split_scales_as_stated() -> None:
    common = load("_common")
    config = tiny_config(**SMOKE)
    small, large = common.model_flops(config, 100), common.model_flops(config, 400)
    assert large.attention == 16 * small.attention  # quadratic in genes
    # Linear in genes, except the LM head and gene projection also linear: all x4.
    assert large.dense == 4 * small.dense
    assert common.scaling_exponent(100, 3.0, 400, 48.0) == pytest.approx(2.0)
    assert math.isnan(common.scaling_exponent(100, 0.0, 400, 1.0))


CHILD = """
import sys
sys.path.insert(0, {bench!r})
import numpy as np
import _common as common

def handler(payload):
    block = np.ones(payload["mb"] * 2**20 // 8)  # touched pages: resident
    if payload.get("fail"):
        raise RuntimeError("deliberate failure")
    return {{"checksum": float(block[:10].sum())}}

raise SystemExit(common.child_main(handler))
"""


def test_run_child_reports_that_childs_own_peak(tmp_path: Path) -> None:
    common = load("_common")
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(bench=str(BENCH)))
    big = common.run_child(script, {"mb": 300})
    small = common.run_child(script, {"mb": 10})
    assert big["checksum"] == 10.0 and big["mb"] == 300  # payload echoed with the result
    assert big["peak_rss_mb"] - small["peak_rss_mb"] > 250
    assert small["peak_rss_mb"] < 250  # the big run did not leak into the next child
    # wait4's ru_maxrss sees the same peak, floored at this (torch-laden) parent's RSS.
    for run in (big, small):
        low = max(run["peak_rss_mb"], run["parent_rss_mb"])
        high = max(run["peak_rss_mb"], run["parent_peak_rss_mb"])
        assert 0.95 * low <= run["ru_maxrss_mb"] <= 1.05 * high + 5
    failed = common.run_child(script, {"mb": 1, "fail": True})
    assert "deliberate failure" in failed["error"]


def test_reset_peak_rss_starts_a_new_high_water_mark() -> None:
    common = load("_common")
    block = np.ones(300 * 2**20 // 8)  # touched: resident, then unmapped when freed
    del block
    high = common.peak_rss_mb()
    if not common.reset_peak_rss():
        pytest.skip("this system cannot reset the peak (no /proc/self/clear_refs)")
    assert common.peak_rss_mb() < high - 200
    timing = common.Timing([1.0], [1.0], peak_rss_mb=123.0)
    fields = common.memory_fields(timing)
    assert fields["peak_rss_mb"] == 123.0 and fields["peak_scope"] == "timed phase"
    assert fields["process_peak_rss_mb"] >= common.current_rss_mb() - 1
    fields = common.memory_fields(common.Timing([1.0], [1.0]))
    assert fields["peak_scope"] == "process"
    assert fields["peak_rss_mb"] == fields["process_peak_rss_mb"]


def test_rates_compare_medians_and_cpu_time() -> None:
    common = load("_common")
    run = common.Timing(wall=[2.0, 1.0, 3.0], cpu=[2.0, 2.0, 2.0])
    gemm = common.Timing(wall=[0.5, 1.0, 1.5], cpu=[1.0, 1.0, 1.0])
    r = common.rates(10.0, run, gemm, gemm_n=1, threads=2)
    assert r["flops_per_s"] == 5.0 and r["gemm_flops_per_s"] == 2.0
    assert r["gemm_best_flops_per_s"] == 4.0
    assert r["ratio_to_gemm"] == 2.5
    assert r["cpu_ratio_to_gemm"] == pytest.approx((10 * 2 / 2.0) / (2 * 2 / 1.0))


# --------------------------------------------------------------------------- model fast path
def test_inference_path_matches_autograd_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """No-grad forward (in-place residuals, chunked FFN) == the autograd forward, and
    the hidden states handed out are not overwritten by later blocks."""
    import bulkfm.models.bulkrnabert as mod

    monkeypatch.setattr(mod, "FFN_CHUNK_ROWS", 7)  # many chunks, a ragged last one
    torch.manual_seed(0)
    model = mod.BulkRNABert(tiny_config(**SMOKE)).eval()
    tokens = torch.randint(0, 65, (3, 40))
    reference = model(tokens, output_hidden_states=True)
    with torch.no_grad():
        fast = model(tokens, output_hidden_states=True)
        inputs = model.embed_inputs(tokens, None)
    torch.testing.assert_close(fast.logits, reference.logits, atol=1e-6, rtol=1e-6)
    for i in range(3):
        torch.testing.assert_close(fast.hidden_states[i], reference.hidden_states[i])
    torch.testing.assert_close(fast.hidden_states[0], inputs)
    keep = (tokens != model.config.mask_token_id).float()
    manual = (reference.last_hidden_state * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    torch.testing.assert_close(model.embed(tokens), manual, atol=1e-6, rtol=1e-5)


def test_inference_path_keeps_residual_precision_under_autocast() -> None:
    """Under autocast the branch outputs are bf16 while the residual stream is fp32: the
    in-place fast path must not round the residual to bf16."""
    import bulkfm.models.bulkrnabert as mod

    torch.manual_seed(0)
    model = mod.BulkRNABert(tiny_config(**SMOKE)).eval()
    tokens = torch.randint(0, 65, (2, 40))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        reference = model(tokens).last_hidden_state
        with torch.no_grad():
            fast = model(tokens).last_hidden_state
    assert fast.dtype == reference.dtype
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- scripts
@pytest.mark.slow
def test_embed_speed_smoke_in_fresh_processes() -> None:
    embed_speed = load("embed_speed")
    args = "--smoke --device cpu --threads 1 --genes 32 64 --naive-max-genes 32"
    report = embed_speed.main(args.split())
    rows = report["rows"]
    assert [(r["arm"], r["genes"]) for r in rows] == [
        ("model", 32),
        ("sdpa", 32),
        ("naive", 32),
        ("model", 64),
        ("sdpa", 64),
    ]
    assert all("error" not in r for r in rows), rows
    for r in rows:
        assert r["peak_mb"] >= r["base_rss_mb"] > 0
        assert r["samples_per_s"] > 0 and r["ratio_to_gemm"] > 0
    by_arm = {(r["arm"], r["genes"]): r["attention_kernels"] for r in rows}
    assert by_arm[("sdpa", 64)] == ["aten::_scaled_dot_product_flash_attention_for_cpu"]
    assert by_arm[("naive", 32)] == []
    if cpu_attention.status().available:  # 64 genes: long enough for the kernel
        assert by_arm[("model", 64)] == ["bulkfm::cpu_attention"]
    compared = [(c["genes"], c["versus"]) for c in report["comparisons"]]
    assert compared == [(32, "naive"), (32, "sdpa"), (64, "sdpa")]
    for comparison in report["comparisons"]:
        assert comparison["same_weights"]
        assert comparison["max_abs_diff"] < 1e-5  # every arm computes the same model
    assert math.isfinite(report["scaling"]["measured"])
    assert 1.0 < report["scaling"]["flops"] < 2.0


@pytest.mark.slow
def test_embed_memory_smoke() -> None:
    """Two files of 20 and 60 samples x 32 genes, each embedded by the real command in a
    child with a model over 12 of the 32 genes (full-width rows aligned to the model)."""
    embed_memory = load("embed_memory")
    args = "--samples 60 20 --genes 32 --model-genes 12 --threads 1 --batch-size 8"
    report = embed_memory.main(args.split())
    rows = report["rows"]
    assert [r["samples"] for r in rows] == [20, 60]
    assert all("error" not in r for r in rows), rows
    assert all(r["peak_rss_mb"] > 0 and r["wall_s"] > 0 for r in rows)
    assert report["peak_ratio"] == pytest.approx(rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"])
    assert (report["genes"], report["model_genes"]) == (32, 12)
    assert [r["n_model_genes"] for r in rows] == [12, 12]
    assert [r["output_shape"] for r in rows] == [[20, 16], [60, 16]]


def test_embed_memory_model_genes_are_a_scattered_subset() -> None:
    """--model-genes: distinct file genes in a new order, so reading must align columns."""
    from bulkfm.tokenize import BinTokenizer, TokenizerConfig

    embed_memory = load("embed_memory")
    file_genes = embed_memory.gene_ids(50)
    chosen = embed_memory.model_gene_ids(50, 10)
    assert len(set(chosen)) == 10 and set(chosen) <= set(file_genes)
    assert embed_memory.model_gene_ids(50, None) == file_genes
    tokenizer = BinTokenizer(TokenizerConfig(genes=chosen, normalization_factor=6.0))
    cols = tokenizer.align_columns(file_genes)
    assert cols is not None and (cols >= 0).all()
    assert [file_genes[c] for c in cols] == chosen
    assert (np.diff(cols) < 0).any()  # not the file's order
    with pytest.raises(ValueError, match="--model-genes"):
        embed_memory.model_gene_ids(50, 51)


def test_embed_memory_writes_the_file_in_blocks(tmp_path: Path) -> None:
    """Block by block (ragged last block) == one block: the writer never needs all of X."""
    import anndata as ad

    embed_memory = load("embed_memory")
    embed_memory.write_h5ad(tmp_path / "blocks.h5ad", 23, 9, seed=3, block=5)
    embed_memory.write_h5ad(tmp_path / "whole.h5ad", 23, 9, seed=3, block=23)
    blocks, whole = ad.read_h5ad(tmp_path / "blocks.h5ad"), ad.read_h5ad(tmp_path / "whole.h5ad")
    assert blocks.shape == (23, 9) and list(blocks.var_names) == embed_memory.gene_ids(9)
    assert blocks.X.dtype == np.float32
    np.testing.assert_allclose(blocks.X.sum(axis=1), 1e6, rtol=1e-4)  # TPM: rows sum to 1e6
    assert np.isfinite(blocks.X).all() and (blocks.X >= 0).all()
    assert not np.allclose(blocks.X[0], blocks.X[1])  # samples differ
    np.testing.assert_array_equal(blocks.X, whole.X)  # one random stream, drawn in blocks


@pytest.mark.slow
def test_train_speed_smoke(keep_torch_threads) -> None:
    train_speed = load("train_speed")
    args = "--smoke --inline --device cpu --threads 1 --genes 48 --ia3-genes 48 --loader-genes 48"
    report = train_speed.main(args.split())
    rows = {(r["kind"], r["ckpt"]): r for r in report["rows"]}
    assert set(rows) == {("mlm", "off"), ("mlm", "on"), ("ia3", "off")}
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    # Same seed, same batch: checkpointing recomputes, it must not change the loss.
    off, on = rows[("mlm", "off")]["losses"][0], rows[("mlm", "on")]["losses"][0]
    assert math.isfinite(off) and off == pytest.approx(on, rel=1e-6)
    # IA3: 3 vectors per block (k, v: 32 each; ffn: 64) x 2 blocks + the head.
    from bulkfm.models.heads import classification_head

    head = sum(p.numel() for p in classification_head(32, 4).parameters())
    assert rows[("ia3", "off")]["trainable_params"] == 2 * (32 + 32 + 64) + head
    loader = report["loader"]
    assert "error" not in loader and 0.0 <= loader["data_fraction"] <= 1.0
    assert len(loader["data_s"]) == 2


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
def test_attention_speed_smoke(keep_torch_threads) -> None:
    attention_speed = load("attention_speed")
    report = attention_speed.main(["--smoke", "--threads", "1", "--flex"])
    impls = {(r["impl"], r["genes"]) for r in report["rows"]}
    expected = {"sdpa", "flex"} | ({"bulkfm"} if cpu_attention.status().available else set())
    assert impls == {(name, genes) for name in expected for genes in (64, 100)}
    for row in report["rows"]:
        assert row["gflops"] > 0 and row["ratio_to_gemm"] > 0
        assert row["max_diff_vs_sdpa"] < 1e-5  # every implementation computes attention
    assert set(report["skipped"]) == ({"sdpa", "flex", "bulkfm"} - expected)


def test_attention_accuracy_smoke(keep_torch_threads) -> None:
    report = load("attention_accuracy").main(["--smoke"])
    (row,) = report["rows"]
    assert row["genes"] == 128
    assert 0 < row["sdpa"] < 1e-5  # the float64 reference agrees with torch's kernel
    if report["kernel_available"]:
        assert 0 <= row["kernel"] < 1e-5
    else:
        assert row["kernel"] is None


def test_tokenize_speed_smoke(keep_torch_threads) -> None:
    tokenize_speed = load("tokenize_speed")
    result = tokenize_speed.main(["--smoke", "--threads", "1"])
    assert result["reference_equal"]  # vectorised == official np.digitize recipe
    assert result["adata_equal"]  # gene re-ordering + missing layer handled
    assert result["encode_samples_per_s"] > 0 and result["mask_samples_per_s"] > 0
    assert 0.2 < result["zero_fraction"] < 0.4


def test_tokenize_reference_is_the_official_recipe() -> None:
    """The benchmark's reference must itself be right, or 'identical' means nothing."""
    tokenize_speed = load("tokenize_speed")
    factor = 2.0
    tpm = np.array([[0.0, 1e-9, 9.0, 99.0, 1e6]])  # 0, tiny, v=0.5, v=1 (top), above
    got = tokenize_speed.reference_tokens(tpm, factor, 64)
    assert got.tolist() == [[0, 1, 32, 63, 63]]


def test_bench_parallel_smoke() -> None:
    args = ["--samples", "120", "--genes", "200", "--splits", "2", "--min-patients", "8"]
    row = load("bench_parallel").main([*args, "--models", "random"])
    assert row["scores_identical"] is True and row["workers"] == 2
    assert row["speedup"] == pytest.approx(row["wall_s_1"] / row["wall_s_n"])
    assert row["tasks"] and row["samples"] == 120


def test_split_ci_coverage_smoke() -> None:
    rows = load("split_ci_coverage").main(
        ["--replicates", "30", "--splits", "5", "--samples", "60", "--test-size", "0.2"]
    )
    (row,) = rows
    assert row["replicates"] == 30 and row["splits"] == 5 and row["test_size"] == 0.2
    assert set(row["coverage"]) == {"naive", "nadeau_bengio", "calibrated"}
    # wider intervals cover at least as often: naive <= N&B <= calibrated, all in [0, 1]
    c = row["coverage"]
    assert 0 <= c["naive"] <= c["nadeau_bengio"] <= c["calibrated"] <= 1
    assert row["rho_assumed"]["calibrated"] == pytest.approx(1 - 0.8**2)
    assert abs(row["bias"]) < 0.1


def test_adapter_deviations_compare_against_sklearn() -> None:
    from sklearn.metrics.pairwise import cosine_similarity

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    rel, cos = load("adapter_deviations").compare(a, b)
    assert cos == pytest.approx(np.diag(cosine_similarity(a, b)).mean(), abs=1e-12)
    pairs = zip(a, b, strict=True)
    naive = np.mean([np.sqrt(((y - x) ** 2).sum() / (x**2).sum()) for x, y in pairs])
    assert rel == pytest.approx(naive, abs=1e-12)


def test_adapter_deviations_smoke(keep_torch_threads) -> None:
    report = load("adapter_deviations").main(["--samples", "10"])
    rows = {(r["model"], r["option"]): r for r in report["rows"]}
    assert "tiny random" in report["note"]
    # Options that change what is computed must move the embedding on any random model.
    for key in [("geneformer", "emb_mode"), ("scfoundation", "recipe"), ("sclong", "pooling")]:
        assert rows[key]["mean_relative_l2"] > 1e-3, key
    for row in report["rows"]:
        if row["mean_cosine"] is not None:
            assert row["mean_relative_l2"] >= 0 and -1 <= row["mean_cosine"] <= 1 + 1e-9
        else:
            assert row["note"], row  # every row without numbers says why


def test_train_speed_projection_arithmetic(capsys) -> None:
    """The --device cuda projection, checked by hand: time = tokens / (rate x GPUs x eff)."""
    train_speed = load("train_speed")
    rows = train_speed.projection(1000.0, [1, 8], total_tokens=86_400_000.0, efficiency=0.5)
    assert rows[0]["seconds"] == pytest.approx(86_400.0) and rows[0]["days"] == pytest.approx(1)
    assert rows[1]["tokens_per_s"] == pytest.approx(4000.0)  # 8 x 1000 x 0.5
    assert rows[1]["seconds"] == pytest.approx(21_600.0)
    with pytest.raises(ValueError, match="rate"):
        train_speed.projection(0.0, [1])
    report = {
        "rows": [
            {"kind": "mlm", "genes": 1024, "ckpt": "off", "batch_size": 8, "tokens_per_s": 9e4},
            {"kind": "mlm", "genes": 19062, "ckpt": "on", "batch_size": 8, "tokens_per_s": 1e4},
            {"kind": "mlm", "genes": 19062, "ckpt": "off", "batch_size": 8, "tokens_per_s": 2e4},
        ],
        "processes": [
            {"processes": 1, "efficiency": 1.0},
            {"processes": 2, "efficiency": 0.9},
        ],
    }
    proj = train_speed.projection_for(report, [1, 64])
    assert proj["genes"] == 19062 and proj["checkpointing"] == "off"
    assert proj["efficiency"] == 0.9 and proj["efficiency_measured_with"] == 2
    assert proj["rows"][1]["seconds"] == pytest.approx(12e9 / (2e4 * 64 * 0.9))
    train_speed.print_projection(proj)
    out = capsys.readouterr().out
    assert "measured with 2 processes" in out and f"{12e9 / 2e4 / 86400:.2f} days" in out
    # The budget is the paper's, as the shared notes state it.
    notes = Path("/work/shared/docs/bulkrnabert.md")
    if notes.exists():
        assert "12B tokens" in notes.read_text() and train_speed.PAPER_TOKENS == 12e9


def test_train_speed_rate_from_the_training_log() -> None:
    train_speed = load("train_speed")
    log = [
        {"step": 0, "loss": None, "tokens": 0, "elapsed_s": 0.5},  # initial evaluation row
        {"step": 1, "loss": 4.0, "tokens": 100, "elapsed_s": 3.0},  # warm-up step: left out
        {"step": 2, "loss": 3.9, "tokens": 200, "elapsed_s": 4.0},
        {"step": 3, "loss": 3.8, "tokens": 300, "elapsed_s": 5.0},
    ]
    assert train_speed.tokens_per_second(log) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 logged"):
        train_speed.tokens_per_second(log[:2])


@pytest.mark.slow
def test_train_speed_processes_and_streamed_loader_smoke(keep_torch_threads) -> None:
    """1 and 2 gloo processes of the real `bulkfm pretrain`; the loader reading from disk."""
    train_speed = load("train_speed")
    args = "--smoke --inline --device cpu --threads 1 --genes 48 --ia3-genes 0"
    args += " --loader-genes 48 --loader-source stream --processes 1 2 --scaling-genes 48"
    report = train_speed.main(args.split())
    rows = {r["processes"]: r for r in report["processes"]}
    assert set(rows) == {1, 2} and all("error" not in r for r in rows.values()), rows
    assert rows[1]["efficiency"] == 1.0 and rows[2]["efficiency"] > 0
    assert rows[2]["tokens_per_s_per_process"] == pytest.approx(rows[2]["tokens_per_s"] / 2)
    loader = report["loader"]
    assert "error" not in loader and loader["source"] == "stream"
    assert 0.0 <= loader["data_fraction"] <= 1.0 and loader["data_s_per_sample"] > 0
    assert report["projection"] is None  # CPU: no projection


@pytest.mark.slow
def test_pretrain_memory_smoke() -> None:
    """Streamed and in-memory pre-training on 20 and 60 samples x 32 genes, each in a
    child, a model over the 24 most variable genes."""
    pretrain_memory = load("pretrain_memory")
    args = "--samples 60 20 --genes 32 --model-genes 24 --steps 2 --threads 1 --in-memory"
    report = pretrain_memory.main(args.split())
    rows = report["rows"]
    assert [(r["samples"], r["streaming"]) for r in rows] == [
        (20, True),
        (20, False),
        (60, True),
        (60, False),
    ]
    assert all("error" not in r for r in rows), rows
    assert all(r["peak_rss_mb"] > 0 and r["steps"] == 2 and r["n_genes"] == 24 for r in rows)
    assert report["peak_ratio"] == pytest.approx(rows[2]["peak_rss_mb"] / rows[0]["peak_rss_mb"])
    assert (report["genes"], report["model_genes"]) == (32, 24)
