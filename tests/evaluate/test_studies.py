from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import dendrogram, linkage
from sklearn.metrics.pairwise import cosine_similarity

from bulkfm.evaluate.studies import cohort_similarity


def test_similarity_matches_centred_cosine_and_scipy_dendrogram():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c", "d"], 10)
    emb = rng.normal(size=(40, 6)) + 50.0  # large shared component
    emb[labels == "b"] += 2.0
    res = cohort_similarity(emb, labels)
    centred = emb - emb.mean(axis=0)
    means = np.vstack([centred[labels == c].mean(axis=0) for c in "abcd"])
    np.testing.assert_allclose(res.cosine, cosine_similarity(means), atol=1e-12)
    ref = dendrogram(linkage(means, "average", metric="cosine"), no_plot=True, labels=list("abcd"))
    assert res.order == ref["ivl"]
    raw = cohort_similarity(emb, labels, center=False)
    assert np.min(raw.cosine) > 0.99  # why centring is the default
