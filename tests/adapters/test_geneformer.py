"""Geneformer adapter: tokenisation by hand, pooling vs transformers directly, files, errors.

Every model here is a tiny randomly initialised HF ``BertForMaskedLM`` saved by
``save_pretrained`` into tmp_path (config.json + model.safetensors, the released
layout), with small synthetic dictionaries; the real V1 dictionaries are used for
the vocabulary/coverage test.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from bulkfm.adapters.geneformer import (  # noqa: E402
    GeneformerEmbedder,
    rank_value_encoding,
    read_dictionary,
)
from bulkfm.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    ExpressionValueError,
    GeneMappingError,
)
from tests.adapters.geneformer_files import write_geneformer_release  # noqa: E402

# Six vocabulary genes A..F (tokens 2..7); F is absent from the data, X is not in the vocabulary.
A, B, C, D, E, F = (f"ENSG0000000000{i}" for i in range(1, 7))
X = "ENSG00000000099"
TOKENS_V1 = {"<pad>": 0, "<mask>": 1, A: 2, B: 3, C: 4, D: 5, E: 6, F: 7}
TOKENS_V2 = {**TOKENS_V1, "<cls>": 8, "<eos>": 9}
MEDIANS = {A: 1.0, B: 2.0, C: 4.0, D: 0.5, E: 1.0, F: 10.0}
DATA_GENES = [A, B, C, D, E, X]
COUNTS = np.array(
    [
        [10, 10, 40, 0, 5, 35],  # total 100
        [0, 8, 4, 3, 1, 0],  # total 16
        [2, 2, 2, 2, 2, 1000],  # total 1010
    ],
    dtype=np.float32,
)
# By hand: (count / total * 10,000) / median, zeros dropped, descending, ties by token id.
# s1: A 1000, B 500, C 1000, E 500               -> A C B E -> 2 4 3 6
# s2: B 2500, C 625, D 3750, E 625               -> D B C E -> 5 3 4 6
# s3: A 19.8, B 9.9, C 4.95, D 39.6, E 19.8      -> D A E B C -> 5 2 6 3 4
EXPECTED_V1 = [[2, 4, 3, 6], [5, 3, 4, 6], [5, 2, 6, 3, 4]]


def make_adata(counts: np.ndarray = COUNTS, genes: list[str] = DATA_GENES) -> ad.AnnData:
    adata = ad.AnnData(
        X=np.asarray(counts, dtype=np.float32),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(len(counts))]),
        var=pd.DataFrame(index=genes),
    )
    return adata


def write_model(
    folder: Path,
    tokens: dict[str, int] = TOKENS_V1,
    medians: dict[str, float] = MEDIANS,
    **options: Any,
) -> Path:
    """The tiny release with this module's dictionaries unless given others."""
    return write_geneformer_release(folder, tokens, medians, **options)


@pytest.fixture
def v1_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path / "v1")


@pytest.fixture
def v2_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path / "v2", TOKENS_V2, max_positions=8)


def naive_embeddings(folder: Path, tokens: list[np.ndarray], *, hidden_index: int, mode: str):
    """One sample at a time through transformers' own loader, no padding, pooled in a loop."""
    model = transformers.BertForMaskedLM.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for ids in tokens:
            states = model(
                input_ids=torch.as_tensor(ids)[None, :], output_hidden_states=True
            ).hidden_states[hidden_index][0]
            if mode == "cls":
                out.append(states[0].numpy())
                continue
            positions = range(1, len(ids) - 1) if mode == "v2" else range(len(ids))
            total = torch.zeros(states.shape[1])
            for p in positions:
                total += states[p]
            out.append((total / len(positions)).numpy())
    return np.stack(out)


# --------------------------------------------------------------------------- tokenisation


def test_tokens_match_hand_computation(v1_dir: Path) -> None:
    tokens, report = GeneformerEmbedder(v1_dir).tokenize(make_adata())
    assert [t.tolist() for t in tokens] == EXPECTED_V1
    assert report["version"] == "V1"
    assert report["n_vocabulary"] == 6 and report["n_found"] == 5
    assert report["source"].startswith("X (TPM")
    json.dumps(report)  # the coverage record goes into run metadata as JSON


def test_truncation_keeps_top_ranks(v1_dir: Path) -> None:
    tokens, report = GeneformerEmbedder(v1_dir, model_input_size=4).tokenize(make_adata())
    assert [t.tolist() for t in tokens] == [e[:4] for e in EXPECTED_V1]
    assert report["n_samples_truncated"] == 1


def test_v2_frames_with_cls_and_eos_within_input_size(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "v2", TOKENS_V2, max_positions=5)
    tokens, report = GeneformerEmbedder(folder).tokenize(make_adata())
    assert report["version"] == "V2"
    assert [t.tolist() for t in tokens] == [[8, *e[:3], 9] for e in EXPECTED_V1]


def test_tokens_do_not_depend_on_column_order(v1_dir: Path) -> None:
    perm = [4, 2, 5, 0, 3, 1]
    adata = make_adata(COUNTS[:, perm], [DATA_GENES[i] for i in perm])
    tokens, _ = GeneformerEmbedder(v1_dir).tokenize(adata)
    assert [t.tolist() for t in tokens] == EXPECTED_V1


def test_counts_layer_preferred_over_tpm(v1_dir: Path) -> None:
    adata = make_adata(COUNTS[:, ::-1].copy())  # X ranks differ from the counts
    adata.layers["counts"] = COUNTS.copy()
    tokens, report = GeneformerEmbedder(v1_dir).tokenize(adata)
    assert [t.tolist() for t in tokens] == EXPECTED_V1
    assert report["source"].startswith("layers['counts']")
    tokens_x, report_x = GeneformerEmbedder(v1_dir, layer="X").tokenize(adata)
    assert [t.tolist() for t in tokens_x] != EXPECTED_V1
    assert "TPM" in report_x["source"]


def test_rank_value_encoding_is_invariant_to_sample_scaling() -> None:
    rng = np.random.default_rng(0)
    values = rng.poisson(3.0, size=(4, 30)).astype(float)
    medians = rng.uniform(0.5, 5, size=30)
    tokens = np.arange(2, 32)
    scaled = values * np.array([[1.0], [7.5], [0.01], [1e4]])
    a = rank_value_encoding(values, medians, tokens, input_size=20)
    b = rank_value_encoding(scaled, medians, tokens, input_size=20)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    # Against a naive per-sample sort: value/median descending, then token ascending.
    for row, got in zip(values, a, strict=True):
        pairs = sorted((-v / m, t) for v, m, t in zip(row, medians, tokens, strict=True) if v > 0)
        assert got.tolist() == [t for _, t in pairs][:20]


# --------------------------------------------------------------------------- embedding


@pytest.mark.parametrize(
    ("version", "emb_mode", "emb_layer", "mode", "hidden_index"),
    [
        ("V1", "cell", -1, "v1", 1),  # 2 layers: second-to-last = hidden_states[1]
        ("V1", "cell", 0, "v1", 2),
        ("V2", "cell", -1, "v2", 1),
        ("V2", "cls", -1, "cls", 1),
        ("V2", "auto", -1, "cls", 1),  # the official extractor's default for V2: <cls>
        ("V1", "auto", -1, "v1", 1),  # V1 has no <cls>: the mean, as its users run it
    ],
)
def test_pooling_matches_naive_loop(
    tmp_path: Path, version: str, emb_mode: str, emb_layer: int, mode: str, hidden_index: int
) -> None:
    tokens_dict = TOKENS_V2 if version == "V2" else TOKENS_V1
    folder = write_model(tmp_path / version, tokens_dict)
    emb = GeneformerEmbedder(folder, emb_mode=emb_mode, emb_layer=emb_layer, batch_size=3)
    adata = make_adata()
    got = emb.transform(adata)
    tokens, _ = emb.tokenize(adata)
    expected = naive_embeddings(folder, tokens, hidden_index=hidden_index, mode=mode)
    assert got.shape == (3, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert emb.coverage_ is not None and emb.coverage_["version"] == version
    assert emb.coverage_["emb_mode"] == ("cls" if mode == "cls" else "cell")


@pytest.mark.parametrize("dir_name", ["v1_dir", "v2_dir"])
def test_batch_size_invariance_and_determinism(dir_name: str, request) -> None:
    folder = request.getfixturevalue(dir_name)
    adata = make_adata()  # 4, 4 and 5 genes: batches of 3 pad the shorter samples
    one = GeneformerEmbedder(folder, batch_size=1).transform(adata)
    three = GeneformerEmbedder(folder, batch_size=3).transform(adata)
    np.testing.assert_allclose(one, three, atol=1e-5)
    np.testing.assert_array_equal(three, GeneformerEmbedder(folder, batch_size=3).transform(adata))
    assert not np.allclose(three[0], three[1])  # samples differ, so the test can fail


def test_v2_default_differs_from_the_mean(v2_dir: Path) -> None:
    """The default changed from the mean to <cls>: the two must not coincide by accident."""
    cls = GeneformerEmbedder(v2_dir).transform(make_adata())
    mean = GeneformerEmbedder(v2_dir, emb_mode="cell").transform(make_adata())
    assert not np.allclose(cls, mean, atol=1e-3)
    assert (
        GeneformerEmbedder(v2_dir).fingerprint()
        != GeneformerEmbedder(v2_dir, emb_mode="cell").fingerprint()
    )


# --------------------------------------------------------------------------- gene-id collapsing

# Released format: old (or duplicate) Ensembl id -> the id in the token dictionary. X is a
# retired id merged into A; E is left out of the dictionary, so the tokenizer drops it.
MAPPING = {A: A, B: B, C: C, D: D, F: F, X: A}
# By hand: A and X summed, E dropped, totals still over every gene of the sample.
# s1: A (10+35)/100*1e4/1 = 4500, B 500, C 1000          -> A C B   -> 2 4 3
# s2: B 2500, C 625, D 3750                             -> D B C   -> 5 3 4
# s3: A 1002/1010*1e4 = 9920.8, B 9.9, C 4.95, D 39.6   -> A D B C -> 2 5 3 4
EXPECTED_COLLAPSED = [[2, 4, 3], [5, 3, 4], [2, 5, 3, 4]]


def test_gene_ids_collapse_through_the_released_mapping(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "map", mapping=MAPPING)
    with pytest.raises(CheckpointError, match="trust_pickle"):
        GeneformerEmbedder(folder).tokenize(make_adata())
    emb = GeneformerEmbedder(folder, trust_pickle=True)
    tokens, report = emb.tokenize(make_adata())
    assert [t.tolist() for t in tokens] == EXPECTED_COLLAPSED
    assert report["gene_ids_collapsed"] is True
    collapse = report["gene_id_collapsing"]
    assert collapse["mapping_dictionary"] == "ensembl_mapping_dict_gc104M.pkl"
    assert collapse["n_data_genes_not_mapped"] == 1  # E
    assert collapse["n_vocabulary_genes_summed_from_several"] == 1  # A <- A, X
    assert report["n_found"] == 4 and report["n_data_genes_used"] == 5
    json.dumps(report)
    # Turned off, the one-column-per-id path is back (and the cache key says so).
    off = GeneformerEmbedder(folder, trust_pickle=True, collapse_gene_ids=False)
    assert [t.tolist() for t in off.tokenize(make_adata())[0]] == EXPECTED_V1
    assert off.fingerprint() != emb.fingerprint()


def test_collapsing_matches_summed_columns_on_random_data(tmp_path: Path) -> None:
    """Against a naive reference: sum the mapped columns by hand, then the plain path."""
    rng = np.random.default_rng(3)
    counts = rng.poisson(4.0, size=(5, 6)).astype(np.float32)
    folder = write_model(tmp_path / "map", mapping=MAPPING)
    got, _ = GeneformerEmbedder(folder, trust_pickle=True).tokenize(make_adata(counts))
    merged = counts[:, :5].copy()
    merged[:, 0] += counts[:, 5]  # X -> A
    merged[:, 4] = 0.0  # E unmapped: dropped
    totals = counts.sum(axis=1)
    medians = np.array([MEDIANS[g] for g in (A, B, C, D, E)])
    expected = rank_value_encoding(merged, medians, np.arange(2, 7), input_size=8, totals=totals)
    assert [t.tolist() for t in got] == [t.tolist() for t in expected]


def test_versioned_ids_are_looked_up_without_their_version(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "map", mapping=MAPPING, dict_format="pkl")
    genes = [f"{g}.7" for g in DATA_GENES]
    tokens, _ = GeneformerEmbedder(folder, trust_pickle=True).tokenize(make_adata(genes=genes))
    assert [t.tolist() for t in tokens] == EXPECTED_COLLAPSED


def test_mapping_dictionary_that_is_not_id_to_id_fails(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "map", mapping=MAPPING)
    (folder / "ensembl_mapping_dict_gc104M.pkl").write_bytes(pickle.dumps({A: 1.5}))
    with pytest.raises(CheckpointError, match="collapse_gene_ids=False"):
        GeneformerEmbedder(folder, trust_pickle=True).tokenize(make_adata())


def test_mapping_dictionary_from_another_release_fails_on_coverage(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "map", mapping={X: "ENSG00000000777"})
    with pytest.raises(GeneMappingError, match="collapse_gene_ids=False"):
        GeneformerEmbedder(folder, trust_pickle=True).tokenize(make_adata())


def test_pickle_weights_need_opt_in_and_match_safetensors(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "bin")
    reference = GeneformerEmbedder(folder).transform(make_adata())
    state = transformers.BertForMaskedLM.from_pretrained(folder).state_dict()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="trust_pickle"):
        GeneformerEmbedder(folder).transform(make_adata())
    got = GeneformerEmbedder(folder, trust_pickle=True).transform(make_adata())
    np.testing.assert_allclose(got, reference, atol=1e-6)


def test_renamed_checkpoint_key_is_listed(v1_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = v1_dir / "model.safetensors"
    state = load_file(str(path))
    old = "bert.encoder.layer.1.output.dense.weight"
    state["bert.encoder.layer.1.output.dense_w"] = state.pop(old)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys.*layer\.1\.output\.dense\.weight"):
        GeneformerEmbedder(v1_dir).transform(make_adata())
    with pytest.raises(CheckpointError, match=r"unexpected keys.*dense_w"):
        GeneformerEmbedder(v1_dir).transform(make_adata())


def test_fingerprint_follows_options_and_dictionaries(v1_dir: Path, tmp_path: Path) -> None:
    base = GeneformerEmbedder(v1_dir).fingerprint()
    assert GeneformerEmbedder(v1_dir).fingerprint() == base
    assert GeneformerEmbedder(v1_dir, emb_layer=0).fingerprint() != base
    other = tmp_path / "medians.json"
    other.write_text(json.dumps({**MEDIANS, A: 3.0}))
    assert GeneformerEmbedder(v1_dir, gene_median_dictionary=other).fingerprint() != base


def test_model_version_option_does_not_shadow_the_cache_version(
    v1_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``version="V1"`` is the Geneformer release; the embedder's cache-key ``version``
    (bumped when outputs change) must still reach the fingerprint."""
    emb = GeneformerEmbedder(v1_dir, version="V1")
    assert emb.model_version == "V1" and emb.settings()["version"] == "V1"
    before = emb.fingerprint()
    monkeypatch.setattr(GeneformerEmbedder, "version", GeneformerEmbedder.version + 1)
    assert emb.fingerprint() != before


def test_registered_under_geneformer(v1_dir: Path) -> None:
    from bulkfm.embedders import get_embedder

    emb = get_embedder("geneformer", model_dir=v1_dir, emb_layer=0)
    assert isinstance(emb, GeneformerEmbedder) and emb.name == "geneformer"


# --------------------------------------------------------------------------- dictionaries


def test_pickled_dictionaries_need_opt_in(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "pkl", dict_format="pkl")
    with pytest.raises(CheckpointError, match=r"pickle.*trust_pickle=True"):
        GeneformerEmbedder(folder).tokenize(make_adata())
    tokens, _ = GeneformerEmbedder(folder, trust_pickle=True).tokenize(make_adata())
    assert [t.tolist() for t in tokens] == EXPECTED_V1


def test_numpy_scalars_in_pickles_become_python_numbers(tmp_path: Path) -> None:
    path = tmp_path / "gene_median_dictionary.pkl"
    path.write_bytes(pickle.dumps({np.str_(A): np.float64(1.5), B: np.float32(2.0)}))
    data = read_dictionary(path, trust_pickle=True)
    assert data == {A: 1.5, B: 2.0}
    assert all(type(v) is float for v in data.values())


class _Exploit:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_even_with_opt_in(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, A: _Exploit(marker)}))
    with pytest.raises(CheckpointError, match=r"refused global .*system"):
        read_dictionary(path, trust_pickle=True)
    assert not marker.exists()


def test_json_dictionary_wins_over_pickle(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "both", dict_format="pkl")
    write_model(tmp_path / "both", dict_format="json")
    tokens, _ = GeneformerEmbedder(folder).tokenize(make_adata())  # no trust_pickle needed
    assert [t.tolist() for t in tokens] == EXPECTED_V1


def test_missing_dictionary_lists_what_was_looked_for(v1_dir: Path) -> None:
    (v1_dir / "gene_median_dictionary.json").unlink()
    with pytest.raises(CheckpointError, match=r"gene_median_dictionary\*\.json.*\.pkl"):
        GeneformerEmbedder(v1_dir)


def test_two_candidate_dictionaries_are_ambiguous(tmp_path: Path) -> None:
    v1_dir = write_model(tmp_path / "two", vocab_size=10)
    (v1_dir / "token_dictionary_gc104M.json").write_text(json.dumps(TOKENS_V2))
    with pytest.raises(CheckpointError, match="several token dictionary files"):
        GeneformerEmbedder(v1_dir)
    emb = GeneformerEmbedder(v1_dir, token_dictionary=v1_dir / "token_dictionary_gc104M.json")
    assert emb.resolved_version == "V2"


def test_dictionary_from_another_release_is_refused(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "small", vocab_size=6)  # tokens go up to 7
    with pytest.raises(CheckpointError, match="belongs to another release"):
        GeneformerEmbedder(folder).tokenize(make_adata())


def test_median_dictionary_in_token_slot_is_refused(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "swap")
    with pytest.raises(CheckpointError, match="token numbers"):
        GeneformerEmbedder(
            folder, token_dictionary=folder / "gene_median_dictionary.json"
        ).tokenize(make_adata())


# --------------------------------------------------------------------------- bad input


def test_low_coverage_fails(v1_dir: Path) -> None:
    adata = make_adata(COUNTS[:, [0, 5]], [A, X])  # 1 of 6 vocabulary genes
    with pytest.raises(GeneMappingError, match="only 1 of the model's 6 genes"):
        GeneformerEmbedder(v1_dir, min_coverage=0.5).transform(adata)


def test_negative_values_fail(v1_dir: Path) -> None:
    counts = COUNTS.copy()
    counts[1, 2] = -1.0
    with pytest.raises(ExpressionValueError, match="negatives"):
        GeneformerEmbedder(v1_dir).transform(make_adata(counts))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_value_outside_vocabulary_fails(v1_dir: Path, bad: float) -> None:
    counts = COUNTS.copy()
    counts[1, 5] = bad  # gene X: not in the vocabulary, but in the sample total
    with pytest.raises(ExpressionValueError, match=r"NaN or inf.*outside the model's genes"):
        GeneformerEmbedder(v1_dir).tokenize(make_adata(counts))


def test_rank_value_encoding_rejects_non_finite_totals() -> None:
    values = np.ones((2, 3))
    with pytest.raises(ExpressionValueError, match="NaN or inf in the sample totals"):
        rank_value_encoding(
            values, np.ones(3), np.arange(3), input_size=4, totals=np.array([3.0, np.nan])
        )


def test_sample_without_expressed_genes_fails(v1_dir: Path) -> None:
    counts = COUNTS.copy()
    counts[2, :5] = 0.0  # only the non-vocabulary gene X left
    with pytest.raises(ExpressionValueError, match=r"express none.*s2"):
        GeneformerEmbedder(v1_dir).transform(make_adata(counts))


def test_missing_path_fails(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        GeneformerEmbedder(tmp_path / "nowhere")


def test_no_path_fails() -> None:
    with pytest.raises(ConfigError, match="--model-dir geneformer=PATH"):
        GeneformerEmbedder()


def test_missing_weights_fail(v1_dir: Path) -> None:
    (v1_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights.*model\.safetensors"):
        GeneformerEmbedder(v1_dir).transform(make_adata())


def test_v2_forced_on_v1_dictionary_fails(v1_dir: Path) -> None:
    with pytest.raises(ConfigError, match="no <cls>/<eos>"):
        GeneformerEmbedder(v1_dir, version="V2").tokenize(make_adata())


def test_cls_mode_on_v1_fails(v1_dir: Path) -> None:
    with pytest.raises(ConfigError, match="needs a V2 model"):
        GeneformerEmbedder(v1_dir, emb_mode="cls").tokenize(make_adata())


def test_bad_option_fails(v1_dir: Path) -> None:
    with pytest.raises(ConfigError, match="emb_layer must be an integer <= 0"):
        GeneformerEmbedder(v1_dir, emb_layer=2)


def test_input_size_above_positions_fails(v1_dir: Path) -> None:
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings=8"):
        GeneformerEmbedder(v1_dir, model_input_size=9).tokenize(make_adata())


# --------------------------------------------------------------------------- real vocabulary


@pytest.mark.realdata
def test_real_v1_dictionaries_coverage_on_tcga(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gf"
    tokens = read_dictionary(
        shared_data / "genes/geneformer_v1/token_dictionary.pkl", trust_pickle=True
    )
    medians = read_dictionary(
        shared_data / "genes/geneformer_v1/gene_median_dictionary.pkl", trust_pickle=True
    )
    assert len(tokens) == 25426 and tokens["<pad>"] == 0 and tokens["<mask>"] == 1
    write_model(folder, tokens, medians, max_positions=2048)
    for stem in ("token_dictionary", "gene_median_dictionary"):  # the released pickles
        (folder / f"{stem}.json").unlink()
        (folder / f"{stem}.pkl").write_bytes(
            (shared_data / f"genes/geneformer_v1/{stem}.pkl").read_bytes()
        )
    path = shared_data / "tcga/tcga_tumor_counts_7cohorts.tsv.gz"
    with gzip.open(path, "rt") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        rows = [fh.readline().rstrip("\n").split("\t") for _ in range(2)]
    genes = header[2:]
    counts = np.array([r[2:] for r in rows], dtype=np.float32)
    emb = GeneformerEmbedder(folder, trust_pickle=True, model_input_size=64, batch_size=2)
    out = emb.transform(make_adata(counts, genes))
    assert out.shape == (2, 16) and np.isfinite(out).all()
    vocab_genes = {g for g in tokens if not g.startswith("<") and g in medians}
    expected = len(vocab_genes & {g.split(".")[0] for g in genes})
    report = emb.coverage_
    assert report["n_vocabulary"] == len(vocab_genes) == 25424
    assert report["n_found"] == expected
    assert 0.5 < report["fraction_found"] < 1.0
