from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from bulkfm.data import validate
from bulkfm.data.validate import check_expression_values, check_unique
from bulkfm.errors import DuplicateIdError, ExpressionValueError


def _names(n: int, prefix: str) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _check(X: np.ndarray) -> None:
    check_expression_values(X, obs_names=_names(X.shape[0], "s"), var_names=_names(X.shape[1], "g"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint16])
def test_clean_matrix_passes(dtype) -> None:
    X = np.random.default_rng(0).integers(0, 1000, size=(7, 11)).astype(dtype)
    _check(X)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_empty_matrix_passes(shape) -> None:
    _check(np.zeros(shape, dtype=np.float32))


def test_nan_reports_count_and_first_location() -> None:
    X = np.ones((4, 5), dtype=np.float32)
    X[1, 3] = np.nan
    X[2, 0] = np.nan
    with pytest.raises(ExpressionValueError, match=r"2 NaN \(missing\).*sample 's1', gene 'g3'"):
        _check(X)


def test_nan_message_says_how_to_fix() -> None:
    X = np.ones((2, 2), dtype=np.float32)
    X[0, 0] = np.nan
    with pytest.raises(ExpressionValueError, match="fill or drop missing values before reading"):
        _check(X)


def test_inf_is_reported_separately_from_nan() -> None:
    X = np.ones((3, 3), dtype=np.float32)
    X[2, 1] = np.inf
    X[0, 2] = -np.inf
    with pytest.raises(ExpressionValueError, match=r"2 infinite.*sample 's0', gene 'g2'") as err:
        _check(X)
    assert "NaN" not in str(err.value)


def test_negative_reports_count_min_and_example() -> None:
    X = np.ones((3, 4), dtype=np.float32)
    X[1, 2] = -0.5
    X[2, 0] = -3.0
    pattern = (
        r"2 negative value\(s\) \(minimum -3\); first at sample 's1', gene 'g2' "
        r"\(value -0\.5\).*log-ratios.*bulkfm needs TPM or counts"
    )
    with pytest.raises(ExpressionValueError, match=pattern):
        _check(X)


def test_what_names_the_matrix() -> None:
    X = -np.ones((1, 1), dtype=np.float32)
    with pytest.raises(ExpressionValueError, match=r"^values of my\.tsv has 1 negative"):
        check_expression_values(X, obs_names=["a"], var_names=["b"], what="values of my.tsv")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_chunked_scan_counts_like_a_naive_scan(monkeypatch, bad) -> None:
    """Offenders spread over many row chunks: counts and first hit match numpy on the whole."""
    monkeypatch.setattr(validate, "_CHUNK_BYTES", 64)  # 2 rows of 8 float32 per chunk
    rng = np.random.default_rng(1)
    X = rng.random((41, 8)).astype(np.float32)
    mask = rng.random(X.shape) < 0.07
    mask[:10] = False  # first offender lies beyond the first chunks
    mask[23, 5] = True
    X[mask] = bad
    rows, cols = np.nonzero(mask)
    expected = f"{mask.sum()} "
    first = f"sample 's{rows[0]}', gene 'g{cols[0]}'"
    with pytest.raises(ExpressionValueError) as err:
        _check(X)
    assert expected in str(err.value)
    assert first in str(err.value)


def test_nan_wins_over_negative_in_the_same_matrix() -> None:
    X = np.ones((2, 2), dtype=np.float32)
    X[0, 0] = -1
    X[1, 1] = np.nan
    with pytest.raises(ExpressionValueError, match="NaN"):
        _check(X)


def test_scan_allocates_nothing_matrix_sized() -> None:
    """A naive np.isfinite(X) alone would allocate X.size bytes (here 4 MB)."""
    X = np.random.default_rng(0).random((2000, 2000)).astype(np.float32)
    tracemalloc.start()
    try:
        _check(X)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < X.size / 8


def test_non_2d_input_is_rejected() -> None:
    with pytest.raises(ExpressionValueError, match="2-D samples x genes matrix, got 1"):
        check_expression_values(np.ones(3), obs_names=[], var_names=[])


def test_non_numeric_dtype_is_rejected() -> None:
    X = np.array([["1", "x"]], dtype=object)
    with pytest.raises(ExpressionValueError, match="non-numeric dtype object"):
        check_expression_values(X, obs_names=["a"], var_names=["b", "c"])


def test_unique_ids_pass() -> None:
    check_unique(["a", "b", "c"], kind="sample", where="x.tsv")


def test_duplicates_are_counted_with_examples() -> None:
    ids = ["a", "b", "a", "c", "b", "a"]
    with pytest.raises(
        DuplicateIdError,
        match=r"2 sample id\(s\) occur more than once in x\.tsv: 'a' x3, 'b' x2\. Fix: make",
    ):
        check_unique(ids, kind="sample", where="x.tsv")


def test_many_duplicates_are_summarised() -> None:
    ids = [f"g{i}" for i in range(8)] * 2
    with pytest.raises(DuplicateIdError, match=r"8 gene id\(s\).*'g4' x2 and 3 more") as err:
        check_unique(ids, kind="gene", where="the file")
    assert "'g5'" not in str(err.value)
