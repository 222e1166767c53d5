"""CellFM's checkpoint reader against MindSpore itself: files written by
``mindspore.save_checkpoint`` (CRC trailer, ``append_dict`` strings, BFloat16) must
read as ``mindspore.load_checkpoint`` reads them. Skipped where MindSpore is absent
(``pip install mindspore``; CPU wheels exist for Linux/macOS, Python 3.9-3.11)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ms = pytest.importorskip(
    "mindspore", reason="MindSpore not installed: the official-format checkpoint tests need it"
)

from bulkfm.adapters.cellfm import CellFMEmbedder  # noqa: E402
from bulkfm.adapters.cellfm_net import read_mindspore_entries  # noqa: E402
from bulkfm.errors import CheckpointError  # noqa: E402
from tests.adapters.cellfm_files import (  # noqa: E402
    HEADS,
    SYMBOLS,
    make_adata,
    random_weights,
    write_gene_file,
)


def _save(path, tensors: dict[str, np.ndarray], **kwargs) -> None:
    """Parameters written by MindSpore's own save_checkpoint."""
    params = [{"name": k, "data": ms.Tensor(v)} for k, v in tensors.items()]
    ms.save_checkpoint(params, str(path), **kwargs)


def test_reader_agrees_with_mindspore_load_checkpoint(tmp_path):
    weights = random_weights()
    bf16 = np.array([[1.5, -2.25], [3.0e-3, 7.0]], dtype=np.float32)
    params = [{"name": k, "data": ms.Tensor(v)} for k, v in weights.items()]
    params.append({"name": "half", "data": ms.Tensor(bf16, ms.bfloat16)})
    path = tmp_path / "CellFM_80M_weight.ckpt"
    ms.save_checkpoint(
        params, str(path), crc_check=True, append_dict={"note": "epoch 3", "epoch_num": 3}
    )
    assert path.read_bytes()[-17:-10] == b"crc_num"  # MindSpore wrote the trailer
    official = ms.load_checkpoint(str(path), crc_check=True)
    tensors, strings = read_mindspore_entries(path)
    assert (
        strings == {k: v for k, v in official.items() if isinstance(v, str)} == {"note": "epoch 3"}
    )
    assert set(tensors) == {k for k, v in official.items() if not isinstance(v, str)}
    for name, value in official.items():
        if isinstance(value, str):
            continue
        if name == "half":
            assert tensors[name].dtype == torch.bfloat16
            expected = value.float().asnumpy()
            np.testing.assert_array_equal(tensors[name].float().numpy(), expected)
        else:
            np.testing.assert_array_equal(tensors[name].numpy(), value.asnumpy())


def test_damaged_crc_fails_here_as_in_mindspore(tmp_path):
    path = tmp_path / "w.ckpt"
    _save(path, {"w": np.arange(64, dtype=np.float32)}, crc_check=True)
    raw = bytearray(path.read_bytes())
    raw[40] ^= 0x10  # inside the tensor content
    path.chmod(0o600)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="crc"):
        ms.load_checkpoint(str(path), crc_check=True)
    with pytest.raises(CheckpointError, match="CRC-32"):
        read_mindspore_entries(path)


def test_embedding_from_a_mindspore_written_release(tmp_path):
    """The adapter on a release saved by MindSpore (CRC, strings) equals safetensors."""
    from safetensors.numpy import save_file

    from bulkfm.data.genes import map_to_ensembl

    weights = random_weights()
    ms_dir, st_dir = tmp_path / "ms", tmp_path / "st"
    ms_dir.mkdir()
    st_dir.mkdir()
    _save(ms_dir / "CellFM_80M_weight.ckpt", weights, crc_check=True, append_dict={"x": "y"})
    save_file(
        {k: np.ascontiguousarray(v) for k, v in weights.items()}, st_dir / "model.safetensors"
    )
    for folder in (ms_dir, st_dir):
        write_gene_file(folder / "expand_gene_info.csv")
    ids, _, _ = map_to_ensembl(SYMBOLS, id_type="symbol")
    adata = make_adata(dict(zip(SYMBOLS, ids, strict=True)))
    got = CellFMEmbedder(ms_dir, num_heads=HEADS).transform(adata)
    ref = CellFMEmbedder(st_dir, num_heads=HEADS).transform(adata)
    np.testing.assert_array_equal(got, ref)
