from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from bulkfm.errors import ExpressionValueError
from bulkfm.train.data import missing_mask


def test_missing_mask_refuses_non_boolean_values() -> None:
    """Pre-training reads the layer through the tokenizer's one check (2.5 is not True)."""
    adata = ad.AnnData(X=np.ones((2, 3), np.float32))
    adata.layers["absent"] = np.full((2, 3), 2.5, dtype=np.float32)
    with pytest.raises(ExpressionValueError, match=r"layers\['absent'\] holds 6 value"):
        missing_mask(adata, "absent")
    adata.layers["absent"] = np.eye(2, 3, dtype=np.int8)
    assert missing_mask(adata, "absent").dtype == bool
