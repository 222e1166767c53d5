"""scGPT adapter against the authors' own code: a tiny ``scgpt.model.TransformerModel``
saved in the release layout, embedded by ``scgpt.tasks.cell_emb.get_batch_cell_embeddings``
and by the adapter. Skipped where the ``scgpt`` package is absent
(``pip install --no-deps scgpt``).

Only the package's ``__init__`` is kept from running: it imports scvi-tools, scib and
(0.2.4) torchtext, none of which the model or ``cell_emb`` code needs. Where the
tokenizer or plotting utilities do not import, stand-ins take their place; the
embedding function uses neither (a plain dict serves as its vocabulary).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("scgpt") is None:
    pytest.skip("scgpt not installed: pip install --no-deps scgpt", allow_module_level=True)

from bulkfm.adapters.scgpt import ScGPTEmbedder  # noqa: E402
from tests.adapters.scgpt_files import (  # noqa: E402
    D_HID,
    GENES,
    HEADS,
    LAYERS,
    PAD_VALUE,
    RELEASE_ARGS,
    D,
)

# The authors' code warns about flash-attn, CUDA autocast and pinned memory on a CPU.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# the vocabulary of the release writer's genes, without its deliberately absent symbol
VOCAB = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **{g: i + 3 for i, g in enumerate(GENES)}}


@pytest.fixture(scope="module")
def official() -> Iterator[tuple[Any, Any]]:
    """``(TransformerModel, get_batch_cell_embeddings)`` from the installed package."""
    spec = importlib.util.find_spec("scgpt")
    assert spec is not None and spec.submodule_search_locations
    saved = {k: v for k, v in sys.modules.items() if k == "scgpt" or k.startswith("scgpt.")}
    for k in saved:
        del sys.modules[k]
    root = spec.submodule_search_locations[0]
    package = types.ModuleType("scgpt")
    package.__path__ = [root]
    package.logger = logging.getLogger("scGPT")  # type: ignore[attr-defined]
    sys.modules["scgpt"] = package
    # scgpt.model's __init__ also pulls in the generation model, which needs scgpt.utils.
    model_package = types.ModuleType("scgpt.model")
    model_package.__path__ = [f"{root}/model"]
    sys.modules["scgpt.model"] = model_package
    stand_ins = {"tokenizer": {"GeneVocab": dict}, "utils": {"load_pretrained": None}}
    for name, stand_in in stand_ins.items():
        try:
            importlib.import_module(f"scgpt.{name}")
        except ImportError:  # torchtext (0.2.4) / plotting deps: unused by the embedding
            module = types.ModuleType(f"scgpt.{name}")
            module.__dict__.update(stand_in)
            sys.modules[f"scgpt.{name}"] = module
    try:
        model = importlib.import_module("scgpt.model.model")
        model_package.TransformerModel = model.TransformerModel  # type: ignore[attr-defined]
        cell_emb = importlib.import_module("scgpt.tasks.cell_emb")
        yield model.TransformerModel, cell_emb.get_batch_cell_embeddings
    finally:
        for k in [k for k in sys.modules if k == "scgpt" or k.startswith("scgpt.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _release(folder: Path, transformer_model: Any, seed: int = 0) -> Any:
    """A tiny official model, randomised and saved as the release folder holds it."""
    torch.manual_seed(seed)
    model = transformer_model(
        ntoken=len(VOCAB),
        d_model=D,
        nhead=HEADS,
        d_hid=D_HID,
        nlayers=LAYERS,
        nlayers_cls=3,
        vocab=VOCAB,
        dropout=0.2,
        pad_token="<pad>",
        pad_value=PAD_VALUE,
        do_mvc=True,
        input_emb_style="continuous",
        n_input_bins=51,
        cell_emb_style="cls",
        use_fast_transformer=False,
    )
    with torch.no_grad():  # LayerNorms start at 1/0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "best_model.pt")
    (folder / "args.json").write_text(json.dumps(RELEASE_ARGS))
    (folder / "vocab.json").write_text(json.dumps(VOCAB))
    return model


def _data(n: int = 5, seed: int = 0) -> ad.AnnData:
    """Distinct values per sample (binning has no ties, so no randomness) and some zeros."""
    rng = np.random.default_rng(seed)
    X = np.stack([rng.permutation(np.arange(1, len(GENES) + 1)) * 7.0 for _ in range(n)])
    X[X < 20] = 0
    X[1, 3:] = 0  # a short sample: the batch pads
    a = ad.AnnData(X.astype(np.float32), var=pd.DataFrame(index=list(GENES.values())))
    a.obs_names = [f"s{i}" for i in range(n)]
    return a


def test_adapter_equals_the_official_cell_embedding(tmp_path, official):
    transformer_model, get_batch_cell_embeddings = official
    folder = tmp_path / "scGPT_toy"
    model = _release(folder, transformer_model)
    adata = _data()
    theirs = adata.copy()
    theirs.var["id_in_vocab"] = [VOCAB[s] for s in GENES]
    expected = get_batch_cell_embeddings(
        theirs,
        cell_embedding_mode="cls",
        model=model,
        vocab=VOCAB,
        max_length=1200,
        batch_size=2,
        model_configs={"pad_token": "<pad>", "pad_value": PAD_VALUE, "embsize": D},
        gene_ids=np.array([VOCAB[s] for s in GENES]),
    )
    got = ScGPTEmbedder(folder, trust_pickle=True, batch_size=3).transform(adata)
    assert got.shape == expected.shape == (adata.n_obs, D)
    np.testing.assert_allclose(got, expected, atol=1.5e-6, rtol=0)
    assert np.abs(expected[0] - expected[2]).max() > 1e-2  # samples differ: the test can fail
