from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from bulkfm.adapters.base import (
    FoundationEmbedder,
    batch_slices,
    file_digest,
    find_file,
    gene_input,
    load_state_dict_strict,
    masked_mean,
    read_state_dict,
    require,
)
from bulkfm.errors import CheckpointError, ConfigError, GeneMappingError, InputFileError

TP53, KRAS, EGFR, MYC = (
    "ENSG00000141510",
    "ENSG00000133703",
    "ENSG00000146648",
    "ENSG00000136997",
)


def _adata(missing: bool = False) -> ad.AnnData:
    X = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    a = ad.AnnData(X, var=pd.DataFrame(index=[TP53, KRAS, EGFR, MYC]))
    a.obs_names = ["s0", "s1", "s2"]
    if missing:
        m = np.zeros((3, 4), dtype=bool)
        m[1, 2] = True  # EGFR absent from sample s1's source
        a.layers["missing"] = sp.csr_matrix(m)
    return a


def test_gene_input_ensembl_order_presence_and_report() -> None:
    a = _adata(missing=True)
    vocab = [MYC, "ENSG00000000003.15", f"{TP53}.5", EGFR]
    g = gene_input(a, vocab, model="toy")
    # by hand: column of each vocabulary gene, zero where absent or flagged missing
    expected = np.array([[4, 0, 1, 3], [8, 0, 5, 0], [12, 0, 9, 11]], dtype=np.float32)
    np.testing.assert_array_equal(g.values, expected)
    assert g.present.tolist() == [
        [True, False, True, True],
        [True, False, True, False],
        [True, False, True, True],
    ]
    assert g.report["n_found"] == 3 and g.report["n_vocabulary"] == 4
    assert g.report["fraction_found"] == pytest.approx(0.75)
    assert g.report["examples_missing"] == ["ENSG00000000003.15"]


def test_gene_input_symbols_one_gene_feeds_one_token() -> None:
    a = _adata()
    g = gene_input(a, ["KRAS", "p53", "TP53", "NOTAGENE"], id_type="symbol", rows=slice(1, 3))
    # TP53 (approved symbol) wins over the alias p53 for the same data column
    np.testing.assert_array_equal(g.values, [[6, 0, 5, 0], [10, 0, 9, 0]])
    assert g.report["n_vocabulary_sharing_a_gene"] == 1
    assert g.report["id_mapping"]["approved_symbol"] == 2


def test_gene_input_layer_and_errors() -> None:
    a = _adata()
    a.layers["counts"] = a.X * 10
    g = gene_input(a, [KRAS], layer="counts")
    np.testing.assert_array_equal(g.values[:, 0], [20, 60, 100])
    assert g.report["source"] == "layers['counts']"
    with pytest.raises(ConfigError, match=r"layers\['raw'\] not in the data"):
        gene_input(a, [KRAS], layer="raw")
    with pytest.raises(GeneMappingError, match="only 1 of the model's 40 genes"):
        gene_input(a, [KRAS] + [f"ENSG{i:011d}" for i in range(39)], min_fraction=0.5)
    with pytest.raises(GeneMappingError, match="vocabulary is empty"):
        gene_input(a, [])
    a.X[0, 1] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        gene_input(a, [KRAS])


def test_masked_mean_matches_loop_and_ignores_padding() -> None:
    h = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = masked_mean(h, mask)
    for i in range(2):
        torch.testing.assert_close(out[i], h[i][mask[i]].mean(0))
    assert torch.equal(out[2], torch.zeros(4))
    h2 = h.clone()
    h2[0, 2:] = 1e6  # padding values must not leak
    torch.testing.assert_close(masked_mean(h2, mask)[0], out[0])


def test_batch_slices_cover_rows_once() -> None:
    rows = [list(range(10))[s] for s in batch_slices(10, 4)]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_read_state_dict_safetensors_and_pickle_opt_in(tmp_path) -> None:
    from safetensors.torch import save_file

    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(state, tmp_path / "m.safetensors")
    assert torch.equal(read_state_dict(tmp_path / "m.safetensors")["w"], state["w"])
    torch.save({"model_state_dict": state}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"pickle-based.*trust_pickle=True"):
        read_state_dict(tmp_path / "m.pt", model="Toy")
    loaded = read_state_dict(tmp_path / "m.pt", trust_pickle=True)
    assert torch.equal(loaded["model_state_dict"]["w"], state["w"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_state_dict(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "absent.pt", trust_pickle=True)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_trusted_pickle_still_refuses_code(tmp_path) -> None:
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(tmp_path / "evil.pt", trust_pickle=True)


def test_load_state_dict_strict_lists_problems() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    good = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    load_state_dict_strict(net, {**good, "decoder.w": torch.ones(1)}, model="Toy", ignore=["dec"])
    assert float(net[0].weight.detach().abs().sum()) == 0.0
    bad = dict(good)
    bad.pop("1.bias")
    bad["extra.weight"] = torch.ones(1)
    bad["0.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(net, bad, model="Toy")
    msg = str(err.value)
    assert "missing keys ['1.bias']" in msg and "unexpected keys ['extra.weight']" in msg
    assert "0.weight: checkpoint (5, 5) vs model (2, 3)" in msg


def test_find_file_and_digest(tmp_path) -> None:
    (tmp_path / "b.bin").write_bytes(b"1")
    assert find_file(tmp_path, ["a.safetensors", "b.bin"], what="weights", model="Toy").name == (
        "b.bin"
    )
    with pytest.raises(CheckpointError, match=r"no weights in .*looked for a.safetensors"):
        find_file(tmp_path, ["a.safetensors"], what="weights", model="Toy")
    d1 = file_digest(tmp_path)
    (tmp_path / "b.bin").write_bytes(b"2")
    assert file_digest(tmp_path) != d1
    (tmp_path / "c.json").write_text("{}")
    assert file_digest(tmp_path / "b.bin") != file_digest(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="empty"):
        file_digest(tmp_path / "empty")


def test_require_names_the_extra() -> None:
    assert require("json", extra="x", model="Toy").dumps([1]) == "[1]"
    with pytest.raises(ConfigError, match=r"pip install 'bulkfm\[toyextra\]'"):
        require("no_such_module_bulkfm", extra="toyextra", model="Toy")


class _Sum(FoundationEmbedder):
    model_name = "Toy"

    def load(self):
        return torch.nn.Identity()

    def embed(self, adata):
        g = gene_input(adata, [TP53, KRAS], model=self.model_name)
        self.coverage_ = g.report
        return self.network(torch.from_numpy(g.values)).numpy()


def test_foundation_embedder_contract(tmp_path) -> None:
    with pytest.raises(ConfigError, match="needs the released weights on disk"):
        _Sum()
    with pytest.raises(CheckpointError, match="does not exist"):
        _Sum(tmp_path / "nowhere")
    (tmp_path / "w.bin").write_bytes(b"0")
    emb = _Sum(tmp_path, label="toy")
    out = emb.transform(_adata())
    np.testing.assert_array_equal(out, [[1, 2], [5, 6], [9, 10]])
    info = emb.describe()
    assert info["coverage"]["n_found"] == 2 and info["model_dir"] == str(tmp_path)
    assert emb.fingerprint() == _Sum(tmp_path).fingerprint()
    with pytest.raises(ConfigError, match="no samples"):
        emb.transform(_adata()[:0])


def test_shared_options_layer_and_min_coverage(tmp_path) -> None:
    (tmp_path / "w.bin").write_bytes(b"0")
    a = _adata()
    assert _Sum(tmp_path).source_layer(a) is None  # auto, no counts layer: X
    a.layers["counts"] = a.X * 2
    assert _Sum(tmp_path).source_layer(a) == "counts"
    assert _Sum(tmp_path, layer="X").source_layer(a) is None
    assert _Sum(tmp_path, layer=None).source_layer(a) is None
    assert _Sum(tmp_path, layer="counts").source_layer(a) == "counts"
    assert _Sum(tmp_path, layer="X").fingerprint() != _Sum(tmp_path).fingerprint()
    assert _Sum(tmp_path, min_coverage=0.5).fingerprint() != _Sum(tmp_path).fingerprint()
    with pytest.raises(ConfigError, match="layer=''; use 'auto'"):
        _Sum(tmp_path, layer="")
    with pytest.raises(ConfigError, match=r"min_coverage must lie in \[0, 1\]"):
        _Sum(tmp_path, min_coverage=1.5)
    with pytest.raises(ConfigError, match=r"min_coverage must lie in \[0, 1\], got True"):
        _Sum(tmp_path, min_coverage=True)


@pytest.mark.parametrize("value", ["flase", "true", "yes", 1, None])
def test_trust_pickle_must_be_a_real_bool(tmp_path, value) -> None:
    """bool("flase") is True: text must never turn pickle trust on."""
    (tmp_path / "w.bin").write_bytes(b"0")
    with pytest.raises(ConfigError, match=r"trust_pickle must be true or false.*--model-arg"):
        _Sum(tmp_path, trust_pickle=value)
    assert _Sum(tmp_path, trust_pickle=True).trust_pickle is True
    assert _Sum(tmp_path).trust_pickle is False
