"""bulkfm's CPU attention kernel: exactness against float64 and SDPA, dispatch rules,
and the build (cache, atomic placement, every way it can be unavailable)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bulkfm.errors import ConfigError
from bulkfm.models import BulkRNABert, cpu_attention
from tests.conftest import tiny_config

requires_kernel = pytest.mark.skipif(
    not cpu_attention.status().available,
    reason=f"CPU attention kernel unavailable here: {cpu_attention.status().reason}",
)


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A private kernel cache and a forgotten build; the real state comes back after."""
    saved = (cpu_attention._status, cpu_attention._lib)
    monkeypatch.setenv(cpu_attention.ENV_CACHE, str(tmp_path / "kernels"))
    cpu_attention._reset_for_tests()
    yield tmp_path / "kernels"
    cpu_attention._status, cpu_attention._lib = saved


def heads_of(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.reshape(batch, length, heads, 32).transpose(1, 2)


def projections(batch: int, heads: int, length: int, scale: float = 1.0, seed: int = 0):
    """q, k, v as the model makes them: strided head views of [batch, length, heads*32]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 3 * heads * 32, generator=gen) * scale
    return tuple(heads_of(part, heads) for part in x.split(heads * 32, dim=-1))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Materialised softmax attention in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


# --------------------------------------------------------------------------- exactness
@requires_kernel
@pytest.mark.parametrize("length", [64, 65, 97, 128, 300, 1000])
def test_matches_float64_reference_as_closely_as_sdpa(length: int) -> None:
    q, k, v = projections(2, 3, length, scale=2.0)
    want = reference(q, k, v)
    got = cpu_attention.attention(q, k, v)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    assert got.shape == sdpa.shape == (2, 3, length, 32)
    err = (got.double() - want).abs().max().item()
    sdpa_err = (sdpa.double() - want).abs().max().item()
    assert err < 5e-5
    assert err <= 3 * sdpa_err + 1e-6  # as exact as torch's kernel, up to rounding


@requires_kernel
def test_error_does_not_grow_with_length_beyond_sdpas() -> None:
    # Values with a mean offset, as activations have: the output and the softmax sum are
    # sums of `length` terms. Summed in one float32 chain their error grew with length
    # (1.5e-5 at 4,096 genes, 3.2e-5 at 19,062, SDPA 1.5e-6 / 2.8e-6); the kernel sums
    # each key block on its own and the denominators in double, so it stays at SDPA's.
    q, k, v = projections(1, 2, 4096, scale=0.3, seed=3)
    v = v + 3.0
    want = torch.empty(q.shape, dtype=torch.float64)
    for s in range(0, q.shape[2], 1024):  # the float64 reference in query chunks
        want[:, :, s : s + 1024] = reference(q[:, :, s : s + 1024], k, v)
    err = (cpu_attention.attention(q, k, v).double() - want).abs().max().item()
    sdpa_err = (F.scaled_dot_product_attention(q, k, v).double() - want).abs().max().item()
    assert err < 4e-6
    assert err <= 2 * sdpa_err


@requires_kernel
def test_large_logits_stay_finite_and_exact() -> None:
    # Logits of several hundred: a softmax without the running maximum overflows.
    q, k, v = projections(1, 2, 200, scale=8.0, seed=1)
    got = cpu_attention.attention(q, k, v)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), reference(q, k, v), atol=1e-4, rtol=1e-4)


@requires_kernel
def test_equal_scores_average_the_values() -> None:
    q = torch.zeros(1, 1, 150, 32)
    k = torch.randn(1, 1, 150, 32)
    v = torch.randn(1, 1, 150, 32)
    got = cpu_attention.attention(q, k, v)
    torch.testing.assert_close(got[0, 0], v[0, 0].mean(0).expand(150, 32), atol=1e-6, rtol=1e-5)


@requires_kernel
def test_output_layout_merges_heads_without_a_copy() -> None:
    q, k, v = projections(2, 4, 70)
    out = cpu_attention.attention(q, k, v)
    merged = out.transpose(1, 2).reshape(2, 70, 4 * 32)
    assert merged.data_ptr() == out.data_ptr()  # a view: [batch, length, heads, 32] storage


@requires_kernel
def test_non_contiguous_last_dimension_is_copied_not_misread() -> None:
    q, k, v = projections(1, 2, 80)
    k_odd = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) != 1
    assert k_odd.stride(-1) != 1
    torch.testing.assert_close(
        cpu_attention.attention(q, k_odd, v), cpu_attention.attention(q, k, v), atol=0, rtol=0
    )


@requires_kernel
def test_same_bits_whatever_the_threads_or_the_batch() -> None:
    q, k, v = projections(3, 2, 257, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attention.attention(q, k, v)
        torch.set_num_threads(3)
        many = cpu_attention.attention(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    alone = cpu_attention.attention(q[1:2], k[1:2], v[1:2])
    assert torch.equal(alone, many[1:2])


@requires_kernel
def test_wrong_inputs_are_named() -> None:
    q = torch.zeros(1, 2, 80, 32)
    with pytest.raises(ValueError, match=r"\[batch, heads, length, 32\]"):
        cpu_attention.attention(q, q[:, :, :40], q)
    with pytest.raises(ValueError, match=r"k is torch.float64 on cpu.*float32 CPU"):
        cpu_attention.attention(q, q.double(), q)


@requires_kernel
def test_empty_inputs_give_empty_outputs() -> None:
    for shape in [(0, 2, 80, 32), (1, 2, 0, 32)]:
        q = torch.zeros(shape)
        assert cpu_attention.attention(q, q, q).shape == shape


# --------------------------------------------------------------------------- dispatch
@requires_kernel
def test_applies_only_to_float32_cpu_inference_with_head_size_32() -> None:
    q, k, v = projections(1, 2, 100)
    assert cpu_attention.applies(q, k, v)
    assert not cpu_attention.applies(q.double(), k.double(), v.double())
    assert not cpu_attention.applies(q[..., :16], k[..., :16], v[..., :16])
    short = cpu_attention.MIN_LENGTH - 1
    assert not cpu_attention.applies(q[:, :, :short], k[:, :, :short], v[:, :, :short])
    q_grad = q.detach().requires_grad_()
    assert not cpu_attention.applies(q_grad, k, v)
    with torch.no_grad():
        assert cpu_attention.applies(q_grad, k, v)
    with cpu_attention.disabled():
        assert not cpu_attention.applies(q, k, v)
    assert cpu_attention.applies(q, k, v)


def test_switch_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("off", "0", "SDPA", "false"):
        monkeypatch.setenv(cpu_attention.ENV_SWITCH, value)
        assert not cpu_attention.enabled()
    for value in ("auto", "on", "1"):
        monkeypatch.setenv(cpu_attention.ENV_SWITCH, value)
        assert cpu_attention.enabled()
    monkeypatch.setenv(cpu_attention.ENV_SWITCH, "fast")
    with pytest.raises(ConfigError, match=r"BULKFM_CPU_ATTENTION='fast'.*'auto'.*'off'"):
        cpu_attention.enabled()


def small_model(n_genes: int = 300) -> BulkRNABert:
    torch.manual_seed(0)
    # head size 32 (64 / 2) is the one the kernel serves; 300 genes pass its MIN_LENGTH
    config = tiny_config(
        n_genes=n_genes, embed_dim=64, init_gene_embed_dim=200, ffn_embed_dim=128, num_layers=2
    )
    return BulkRNABert(config).eval()


def profiled_names(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {event.name for event in prof.events()}


@requires_kernel
def test_model_inference_runs_the_kernel_and_agrees_with_sdpa() -> None:
    model = small_model()
    assert model.config.key_size == 32
    tokens = torch.randint(0, 64, (3, 300), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        names = profiled_names(lambda: model.embed(tokens))
        fast = model.embed(tokens)
        with cpu_attention.disabled():
            slow_names = profiled_names(lambda: model.embed(tokens))
            slow = model.embed(tokens)
    assert "bulkfm::cpu_attention" in names
    assert "bulkfm::cpu_attention" not in slow_names
    torch.testing.assert_close(fast, slow, atol=2e-6, rtol=1e-5)


@requires_kernel
def test_training_keeps_sdpa_and_its_gradients() -> None:
    model = small_model().train()
    tokens = torch.randint(0, 64, (2, 300), generator=torch.Generator().manual_seed(4))
    names = profiled_names(lambda: model(tokens).logits.sum().backward())
    assert "bulkfm::cpu_attention" not in names
    assert model.transformer_layers[0].mha.w_q.weight.grad is not None


# --------------------------------------------------------------------------- build
def test_build_goes_to_the_cache_under_a_content_hash(fresh_build: Path) -> None:
    info = cpu_attention.status()
    if not info.available:
        pytest.skip(f"CPU attention kernel unavailable here: {info.reason}")
    built = list(fresh_build.glob("cpu_attention-*.so"))
    assert [str(p) for p in built] == [info.library]
    assert not [p for p in fresh_build.iterdir() if p.is_dir()]  # no temporary left
    stamp = built[0].stat().st_mtime_ns
    cpu_attention._reset_for_tests()
    assert cpu_attention.status().library == info.library  # reused, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp


def test_no_compiler_means_sdpa_with_a_reason(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-bulkfm")
    info = cpu_attention.status()
    assert not info.available
    assert "no C compiler found" in info.reason
    q, k, v = projections(1, 2, 100)
    assert not cpu_attention.applies(q, k, v)
    with pytest.raises(RuntimeError, match="not available: no C compiler"):
        cpu_attention.attention(q, k, v)
    model = small_model()  # the model still works, through SDPA
    tokens = torch.randint(0, 64, (1, 300))
    with torch.inference_mode():
        assert torch.isfinite(model.embed(tokens)).all()


def test_failed_compile_is_reported(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "false")  # exists everywhere, always exits 1
    info = cpu_attention.status()
    assert not info.available
    assert "building or loading the kernel failed" in info.reason
    assert not list(fresh_build.glob("*.so"))


def test_cc_may_carry_a_wrapper(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "env gcc")  # a wrapper command, as ccache is used
    if cpu_attention.shutil.which("gcc") is None:
        pytest.skip("no gcc here")
    assert cpu_attention._compiler() == [cpu_attention.shutil.which("env"), "gcc"]
    assert cpu_attention.status().library is not None  # built and loaded through env


def test_other_architectures_use_sdpa(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_attention.platform, "machine", lambda: "arm64")
    info = cpu_attention.status()
    assert not info.available
    assert "x86-64" in info.reason and "arm64" in info.reason


def test_other_systems_use_sdpa(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_attention.sys, "platform", "win32")
    info = cpu_attention.status()
    assert not info.available
    assert "Linux and macOS" in info.reason and "win32" in info.reason


def test_unwritable_cache_builds_privately(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_compile = cpu_attention._compile
    calls: list[Path] = []

    def compile_once_denied(compiler: list[str], source: bytes, target: Path, flags) -> None:
        calls.append(target)
        if len(calls) == 1:
            raise PermissionError(f"cannot write {target.parent}")
        real_compile(compiler, source, target, flags)

    monkeypatch.setattr(cpu_attention, "_compile", compile_once_denied)
    info = cpu_attention.status()
    if cpu_attention._compiler() is None:
        pytest.skip("no C compiler here")
    assert len(calls) == 2
    assert calls[0].parent == fresh_build
    assert calls[1].parent != fresh_build and calls[1].parent.name.startswith("bulkfm-kernel-")
    assert info.library == str(calls[1])


@requires_kernel
def test_embed_adata_with_the_kernel_matches_sdpa_and_ignores_batch_size() -> None:
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from bulkfm.embed import embed_adata
    from bulkfm.tokenize import BinTokenizer, TokenizerConfig

    genes = [f"ENSG{i:011d}" for i in range(300)]
    rng = np.random.default_rng(5)
    X = (10 ** rng.uniform(0, 3.5, size=(5, 300)) - 1).astype(np.float32)
    missing = np.zeros(X.shape, dtype=bool)
    missing[2, 40:90] = True  # missing genes: mask tokens, left out of the mean
    adata = ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=[f"S{i}" for i in range(5)]),
        var=pd.DataFrame(index=genes),
        layers={"missing": sp.csr_matrix(missing)},
    )
    tokenizer = BinTokenizer(TokenizerConfig(genes=genes, normalization_factor=4.0, n_bins=64))
    model = small_model()
    with torch.no_grad():  # weights large enough for attention to be far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    with torch.profiler.profile() as prof:
        fast = embed_adata(model, tokenizer, adata, batch_size=2, progress=False)
    assert "bulkfm::cpu_attention" in {event.name for event in prof.events()}
    whole = embed_adata(model, tokenizer, adata, batch_size=5, progress=False)
    with cpu_attention.disabled():
        slow = embed_adata(model, tokenizer, adata, batch_size=2, progress=False)
    np.testing.assert_allclose(fast, whole, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)
