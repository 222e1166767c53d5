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


def test_robustness_removes_only_genes_the_data_measure(
    monkeypatch, tiny_data, tiny_model_for, one_torch_thread
):
    """With 6 of the model's 40 genes absent from the data, a 50% removal takes 17 of the
    34 measured model genes (never an absent one, never a non-model gene), in every
    variant."""
    import bulkfm.evaluate.studies as studies
    from bulkfm import schema as keys
    from bulkfm.evaluate.config import EvaluateConfig
    from bulkfm.evaluate.model import LoadedModel, check_coverage
    from bulkfm.evaluate.results import ModelInfo

    adata = tiny_data(n_samples=40)
    model, tokenizer = tiny_model_for(adata)
    absent = set(tokenizer.genes[:6])
    test = adata[:, [g for g in adata.var_names if g not in absent]].copy()
    cfg = EvaluateConfig.from_dict({"model": {"path": "given", "batch_size": 16}})
    mdl = LoadedModel(model, tokenizer, ModelInfo("given"))
    check_coverage(mdl, test, cfg.model)
    seen = {}

    def capture(mdl, section, data, model=None):
        seen[len(seen)] = data
        return np.zeros((data.n_obs, 2))

    monkeypatch.setattr(studies, "embed", capture)
    out = studies._robustness_variants(cfg, mdl, test, 0.5, seed=3)
    assert set(out) == {"imputed", "masked", "zero"}
    imputed, masked, zero = seen[0], seen[1], seen[2]
    measured_model = [g for g in tokenizer.genes if g not in absent]
    flagged = np.asarray(masked.layers[keys.MISSING].sum(axis=0)).ravel() == test.n_obs
    removed = set(test.var_names[flagged])
    assert len(removed) == round(0.5 * len(measured_model)) == 17
    assert removed <= set(measured_model)
    zeroed = set(test.var_names[(np.asarray(zero.X) == 0).all(axis=0)])
    assert removed <= zeroed
    assert list(imputed.var_names) == list(test.var_names)  # absent genes not appended
    assert not np.asarray(imputed.layers[keys.MISSING].sum()).item()  # filled, not flagged
