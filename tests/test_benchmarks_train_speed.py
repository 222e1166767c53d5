"""benchmarks/train_speed.py's GPU estimate (usable without a GPU), its ``--config``
plan and its gzip loader source, checked against independent references: FLOPs from
torch's own counter, the time from the formula written out by hand, the chunking from a
file written the way ``bulkfm data build`` writes it."""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import torch

from bulkfm.io import write_h5ad
from tests.conftest import tiny_config
from tests.test_benchmarks_smoke import SMOKE, keep_torch_threads, load  # noqa: F401

PAPER_YAML = Path(__file__).resolve().parents[1] / "configs" / "pretrain_paper_gpu.yaml"


def test_training_flops_per_token_is_three_forwards_by_torchs_count() -> None:
    from bulkfm.models.bulkrnabert import BulkRNABert

    train_speed, common = load("train_speed"), load("_common")
    config = tiny_config(**SMOKE)
    for batch in (1, 3):
        tokens = torch.randint(0, 64, (batch, config.n_genes))
        forward = common.counted_flops(BulkRNABert(config), tokens)  # torch's FlopCounterMode
        got = train_speed.training_flops_per_token(config, config.n_genes, batch)
        assert got == pytest.approx(3 * forward / tokens.numel())


def test_time_to_train_by_hand() -> None:
    train_speed = load("train_speed")
    # 2e8 FLOPs/token x 1e10 tokens = 2e18 FLOPs; 1,000 TFLOP/s x MFU 0.5 = 5e14 FLOP/s.
    one = train_speed.time_to_train_s(
        2e8, 1e10, peak_tflops=1000.0, mfu=0.5, gpus=1, efficiency=0.5
    )
    assert one == pytest.approx(4000.0)  # efficiency does not apply to one GPU
    eight = train_speed.time_to_train_s(
        2e8, 1e10, peak_tflops=1000.0, mfu=0.5, gpus=8, efficiency=0.5
    )
    assert eight == pytest.approx(4000.0 / (8 * 0.5))
    for bad in ({"mfu": 0.0}, {"mfu": 1.5}, {"efficiency": 0.0}, {"gpus": 0}):
        kw = {"peak_tflops": 1000.0, "mfu": 0.5, "gpus": 1, "efficiency": 1.0, **bad}
        with pytest.raises(ValueError):
            train_speed.time_to_train_s(2e8, 1e10, **kw)


def test_estimate_only_follows_the_config(tmp_path: Path, capsys) -> None:
    """Model shape, genes and token budget from a YAML; every row by the hand formula."""
    from bulkfm.models.bulkrnabert import BulkRNABert
    from bulkfm.models.config import BulkRNABertConfig

    train_speed, common = load("train_speed"), load("_common")
    yaml = tmp_path / "small.yaml"
    yaml.write_text(
        "model: {embed_dim: 32, init_gene_embed_dim: 24, num_attention_heads: 4,"
        " ffn_embed_dim: 64, num_layers: 3}\n"
        "data: {path: x.h5ad, top_k_variable_genes: 40}\n"
        "optim: {max_steps: 7, warmup_steps: 1, micro_batch_size: 3,"
        " target_tokens_per_step: 500}\n"
    )
    args = ["--config", str(yaml), "--estimate-only", "--gpus", "1", "8"]
    args += ["--estimate-gpu", "A100", "H100", "--mfu", "0.2", "0.4", "--assumed-efficiency", "0.8"]
    report = train_speed.main(args)
    est = report["estimate"]
    samples = math.ceil(500 / (3 * 40)) * 3  # accumulation x micro batch
    assert report["plan"]["samples_per_step"] == samples and est["genes"] == 40
    assert est["total_tokens"] == 7 * samples * 40
    model = BulkRNABertConfig(
        n_genes=40,
        embed_dim=32,
        init_gene_embed_dim=24,
        num_attention_heads=4,
        ffn_embed_dim=64,
        num_layers=3,
    )
    tokens = torch.zeros(3, 40).long()  # one micro-batch of the config
    per_token = 3 * common.counted_flops(BulkRNABert(model), tokens) / tokens.numel()
    assert est["flops_per_token"] == pytest.approx(per_token)
    peaks = {"A100": 312.0, "H100": 989.4}  # NVIDIA data sheets, dense bf16
    assert [(r["gpu"], r["mfu"]) for r in est["rows"]] == [
        ("A100", 0.2),
        ("A100", 0.4),
        ("H100", 0.2),
        ("H100", 0.4),
    ]
    for row in est["rows"]:
        rate = peaks[row["gpu"]] * 1e12 * row["mfu"]
        assert row["hours_1"] == pytest.approx(est["total_tokens"] * per_token / rate / 3600)
        assert row["hours_8"] == pytest.approx(row["hours_1"] / (8 * 0.8))
        assert row["ms_per_sample"] == pytest.approx(1000 * per_token * 40 / rate)
    out = capsys.readouterr().out
    assert "ESTIMATE, NOT MEASURED" in out and "Assumed, not measured: MFU 0.2-0.4" in out
    assert "rows" not in report  # --estimate-only measures nothing


def test_paper_config_plan_is_the_papers_budget() -> None:
    train_speed = load("train_speed")
    plan = train_speed.plan_from(PAPER_YAML)
    assert plan["genes"] == 19062 and plan["model"]["num_layers"] == 4
    assert 12e9 <= plan["total_tokens"] < 12e9 + plan["samples_per_step"] * plan["genes"]
    assert plan["total_tokens"] / 12e9 == pytest.approx(1.0, abs=1e-3)


def test_estimate_arguments_are_checked() -> None:
    train_speed = load("train_speed")
    for bad in (
        ["--mfu", "0.5", "0.2"],
        ["--estimate-gpu", "TPUv4"],
        ["--assumed-efficiency", "2"],
    ):
        with pytest.raises(SystemExit):
            train_speed.parse_args(["--estimate-only", *bad])


def test_gzip_chunks_are_those_of_a_built_file(tmp_path: Path) -> None:
    """The loader's gzip source reproduces the layout `bulkfm data build` writes."""
    train_speed = load("train_speed")
    for rows, genes in ((300, 50), (1500, 2000)):
        path = write_h5ad(ad.AnnData(np.ones((rows, genes), np.float32)), tmp_path / "b.h5ad")
        with h5py.File(path) as f:
            assert f["X"].compression == "gzip"
            assert tuple(f["X"].chunks) == train_speed.gzip_chunks(rows, genes)
    tpm = np.random.default_rng(0).random((40, 30)).astype(np.float32)
    train_speed.write_loader_h5ad(tmp_path / "l.h5ad", tpm, (8, 10))
    with h5py.File(tmp_path / "l.h5ad") as f:
        assert tuple(f["X"].chunks) == (8, 10) and f["X"].compression == "gzip"
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "l.h5ad").X, tpm)


def test_train_speed_smoke_with_gzip_loader_and_estimate(keep_torch_threads) -> None:  # noqa: F811
    train_speed = load("train_speed")
    args = "--smoke --inline --device cpu --threads 1 --genes 48 --checkpointing off"
    args += " --ia3-genes 0 --loader-genes 48 --loader-source gzip --loader-file-samples 300"
    args += " --gpus 1 8"
    report = train_speed.main(args.split())
    loader = report["loader"]
    assert "error" not in loader and loader["chunks"] == list(train_speed.gzip_chunks(300, 48))
    est = report["estimate"]
    assert est["loader_s_per_sample"] == loader["data_s_per_sample"] > 0
    for row in est["rows"]:
        sample_s = row["ms_per_sample"] / 1000
        assert row["loader_workers"] == math.ceil(loader["data_s_per_sample"] / sample_s)
    assert report["projection"] is None  # CPU: no measured projection


def test_loader_alone_times_only_the_data(keep_torch_threads, capsys) -> None:  # noqa: F811
    """--genes 0 --loader-model off: no MLM rows, the loader timed without a model step."""
    train_speed = load("train_speed")
    args = "--smoke --inline --device cpu --threads 1 --genes 0 --ia3-genes 0 --loader-genes 32"
    args += " --loader-source stream --loader-model off"
    report = train_speed.main(args.split())
    assert report["rows"] == []
    loader = report["loader"]
    assert loader["model_step"] is False and len(loader["data_s"]) == 2  # --smoke: 2 steps
    assert loader["data_fraction"] > 0.99  # the loop does nothing else
    assert report["estimate"]["genes"] == 32  # the estimate follows the loader's genes
    assert "data loader alone" in capsys.readouterr().out
