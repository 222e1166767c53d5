"""Checks every expression matrix passes before any stage trusts it.

They run on matrices of 10k samples x 19k genes, so they scan in row chunks using
reductions (``min``/``max``) that allocate nothing the size of the matrix; the
slow, detailed location of offenders only runs on the error path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from bulkfm.errors import DuplicateIdError, ExpressionValueError

# Rows per chunk are chosen so one chunk's temporaries stay around this many bytes.
_CHUNK_BYTES = 32 * 2**20
_MAX_EXAMPLES = 5


def _row_chunks(X: np.ndarray) -> Iterable[tuple[int, np.ndarray]]:
    row_bytes = max(1, X.shape[1] * X.itemsize)
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, X.shape[0], step):
        yield start, X[start : start + step]


def _name(names: Sequence[str], i: int) -> str:
    return str(names[i]) if i < len(names) else f"#{i}"


def _first_where(mask: np.ndarray, start: int) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return start + int(rows[0]), int(cols[0])


def check_expression_values(
    X: np.ndarray,
    *,
    obs_names: Sequence[str],
    var_names: Sequence[str],
    what: str = "expression",
) -> None:
    """Reject NaN, infinite and negative values with a message that locates them.

    Expression units bulkfm accepts (counts, TPM, FPKM) are finite and
    non-negative; anything else means missing data or already-transformed values
    (log ratios, z-scores, batch-corrected data) that would silently corrupt the
    log transform and binning downstream.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ExpressionValueError(
            f"{what} must be a 2-D samples x genes matrix, got {X.ndim} dimension(s) "
            f"(shape {X.shape}). Fix: reshape the values into one row per sample."
        )
    if not np.issubdtype(X.dtype, np.number):
        raise ExpressionValueError(
            f"{what} has non-numeric dtype {X.dtype}. Fix: convert the values to "
            "numbers (float32) before validating."
        )
    if X.size == 0:
        return

    bad_chunks: list[tuple[int, np.ndarray]] = []
    negative_chunks: list[tuple[int, np.ndarray]] = []
    for start, chunk in _row_chunks(X):
        lo, hi = chunk.min(), chunk.max()  # NaN propagates through min/max
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad_chunks.append((start, chunk))
        elif lo < 0:
            negative_chunks.append((start, chunk))
    if bad_chunks:
        _raise_non_finite(bad_chunks, obs_names, var_names, what)
    if negative_chunks:
        _raise_negative(negative_chunks, obs_names, var_names, what)


def _raise_non_finite(
    chunks: list[tuple[int, np.ndarray]],
    obs_names: Sequence[str],
    var_names: Sequence[str],
    what: str,
) -> None:
    n_nan = n_inf = 0
    first: tuple[int, int] | None = None
    for start, chunk in chunks:
        nan = np.isnan(chunk)
        inf = np.isinf(chunk)
        n_nan += int(nan.sum())
        n_inf += int(inf.sum())
        if first is None:
            first = _first_where(nan | inf, start)
    assert first is not None
    i, j = first
    value = chunks[0][1][i - chunks[0][0], j]
    kinds = []
    if n_nan:
        kinds.append(f"{n_nan} NaN (missing)")
    if n_inf:
        kinds.append(f"{n_inf} infinite")
    raise ExpressionValueError(
        f"{what} has {' and '.join(kinds)} value(s); first at sample "
        f"'{_name(obs_names, i)}', gene '{_name(var_names, j)}' (value {float(value)}). "
        "Fix: fill or drop missing values before reading (replace NA by 0 only if a "
        "missing gene truly means no expression), and remove infinite values, which "
        "usually come from dividing by zero or log(0)."
    )


def _raise_negative(
    chunks: list[tuple[int, np.ndarray]],
    obs_names: Sequence[str],
    var_names: Sequence[str],
    what: str,
) -> None:
    count = 0
    minimum = np.inf
    first: tuple[int, int] | None = None
    for start, chunk in chunks:
        neg = chunk < 0
        count += int(neg.sum())
        minimum = min(minimum, float(chunk.min()))
        if first is None:
            first = _first_where(neg, start)
    assert first is not None
    i, j = first
    value = float(chunks[0][1][i - chunks[0][0], j])
    raise ExpressionValueError(
        f"{what} has {count} negative value(s) (minimum {minimum:g}); first at sample "
        f"'{_name(obs_names, i)}', gene '{_name(var_names, j)}' (value {value:g}). "
        "Negative values suggest log-ratios, z-scores or batch-corrected data; bulkfm "
        "needs TPM or counts. Fix: give the untransformed TPM or count matrix."
    )


def check_unique(ids: Iterable[str], *, kind: str, where: str) -> None:
    """Reject repeated ids: later joins by id would silently pick one of the copies."""
    counts = Counter(str(i) for i in ids)
    dups = [(name, n) for name, n in counts.items() if n > 1]
    if not dups:
        return
    examples = ", ".join(f"'{name}' x{n}" for name, n in dups[:_MAX_EXAMPLES])
    more = f" and {len(dups) - _MAX_EXAMPLES} more" if len(dups) > _MAX_EXAMPLES else ""
    raise DuplicateIdError(
        f"{len(dups)} {kind} id(s) occur more than once in {where}: {examples}{more}. "
        f"Fix: make the {kind} ids unique (drop or merge the repeated entries, or rename "
        "them) before reading."
    )
