"""The one standardiser: per-column z-scores fitted on training rows only.

It lives below every stage because three of them need the same rule: the classical
PCA baseline (:mod:`bulkfm.embedders.classical`) scales genes before PCA, and the task
heads and probes (:mod:`bulkfm.tasks`) scale embeddings whose layers differ in scale by
orders of magnitude. Fitting on the training rows only keeps test rows from shaping the
features; a constant column keeps scale 1, so it stays centred at zero instead of
dividing by zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bulkfm.errors import ConfigError

__all__ = ["Standardizer"]

#: Columns whose standard deviation is below this are treated as constant.
_CONSTANT = 1e-12


class Standardizer:
    """Per-column mean 0 / variance 1 (population std, ddof=0), statistics in float64.

    ``dtype`` is the output type: float32 for inputs of torch heads, float64 where the
    next step is a solver (probes, PCA) that should see the exact values.
    """

    def __init__(self, dtype: Any = np.float32) -> None:
        self.dtype = np.dtype(dtype)

    def fit(self, X: np.ndarray) -> Standardizer:
        arr = np.asarray(X)
        self.mean_ = arr.mean(axis=0, dtype=np.float64)
        std = arr.std(axis=0, dtype=np.float64)
        self.scale_ = np.where(std > _CONSTANT, std, 1.0)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        if not hasattr(self, "mean_"):
            raise ConfigError("this Standardizer is not fitted yet; call fit(X) on training rows")
        arr = np.asarray(X)
        if arr.ndim != 2 or arr.shape[1] != self.mean_.size:
            raise ConfigError(
                f"inputs have {arr.shape[-1]} dims but the model was fitted on "
                f"{self.mean_.size}; use features from the same model and layer"
            )
        return ((arr - self.mean_) / self.scale_).astype(self.dtype, copy=False)

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).transform(X)
