from __future__ import annotations

import numpy as np
import pandas as pd

from bulkfm.embedders import get_embedder


def test_random_control_is_per_patient_and_order_free(sim) -> None:
    model = get_embedder("random", dim=6, seed=1)
    emb = model.transform(sim)
    assert emb.shape == (sim.n_obs, 6)
    patients = sim.obs["patient"].to_numpy()
    dup = pd.Series(patients).duplicated(keep=False).to_numpy()
    assert dup.any()
    first = {}
    for p, row in zip(patients, emb, strict=True):
        np.testing.assert_array_equal(first.setdefault(p, row), row)
    perm = np.random.default_rng(0).permutation(sim.n_obs)
    np.testing.assert_array_equal(model.transform(sim[perm]), emb[perm])
    other = get_embedder("random", dim=6, seed=2).transform(sim)
    assert not np.allclose(other, emb)
    assert abs(float(np.corrcoef(emb[~dup, 0], emb[~dup, 1])[0, 1])) < 0.3
