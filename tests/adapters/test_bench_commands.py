"""The ``bulkfm bench`` command docs/adapters.md gives for each published model, run end to end.

The commands are read from the fenced blocks tagged ``<!-- bench-command: NAME -->`` in
docs/adapters.md, so the docs and this test cannot drift apart. For each one a tiny
random model is written at exactly the paths the command names, in the release's
layout (file names, key names, side files; the writers in ``tests/adapters/*_files.py``),
next to simulated data saved as ``tcga.h5ad``; the command then runs from that folder
through ``bulkfm.cli.main`` with only flags for the small data added. Geneformer's
commands name a Hugging Face repo: its files are put in an offline Hub cache in the
repo's layout (``Geneformer-V*/`` weights, dictionaries under ``geneformer/``).
"""

from __future__ import annotations

import json
import pickle
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import bulkfm

pytest.importorskip("torch")

DOCS = Path(bulkfm.__file__).resolve().parents[2] / "docs" / "adapters.md"
CASES = (
    "geneformer_v1",
    "geneformer_v2",
    "bulkformer",
    "scgpt",
    "scfoundation",
    "cellfm",
    "scbert",
    "sclong",
)
# Flags for 60 simulated samples; everything else is the documented command verbatim.
SMALL_DATA = ["--tasks", "cancer_type", "--splits", "2", "--no-plots", "--min-class-patients", "8"]
# Sizes of the tiny models that their release does not record (read from the weights
# otherwise): CellFM's head count is an option, 48 for the released widths.
TINY_MODEL_ARGS = {"cellfm": ["--model-arg", "cellfm:num_heads=4"]}
ABSENT_SYMBOL, ABSENT_ID = "ALB", "ENSG00000163631"  # in every vocabulary, never simulated
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def documented_commands(text: str) -> dict[str, list[str]]:
    """``{tag: argv}`` of every ``<!-- bench-command: tag -->`` + fenced bash block."""
    found = re.findall(r"<!-- bench-command: (\w+) -->\n```bash\n(.*?)```", text, re.DOTALL)
    out: dict[str, list[str]] = {}
    for tag, body in found:
        assert tag not in out, f"docs/adapters.md tags two commands {tag!r}"
        argv = shlex.split(body.replace("\\\n", " "))
        assert argv[:2] == ["bulkfm", "bench"], f"{tag}: not a bulkfm bench command: {body}"
        out[tag] = argv[1:]
    return out


def test_docs_tag_one_command_per_adapter() -> None:
    commands = documented_commands(DOCS.read_text())
    assert sorted(commands) == sorted(CASES)
    for tag, argv in commands.items():
        name = tag.split("_")[0]
        assert argv[argv.index("--models") + 1] == name
        dirs = [argv[i + 1] for i, a in enumerate(argv) if a == "--model-dir"]
        assert [d.split("=")[0] for d in dirs] == [name], f"{tag}: --model-dir {dirs}"


@pytest.fixture(scope="module")
def sim() -> Any:
    """60 samples over 200 real protein-coding genes, two cohorts (counts and TPM)."""
    from bulkfm.data.simulate import simulate_bulk

    adata = simulate_bulk(n_samples=60, n_genes=200, n_cohorts=2, seed=3)
    assert ABSENT_ID not in set(adata.var_names) and ABSENT_SYMBOL not in set(adata.var["symbol"])
    return adata


# --------------------------------------------------------------------------- release writers
# Each writes the release at the path its command names (relative to the working folder)
# and returns (n_found, n_vocabulary): the coverage run.json must record.


def _ids(sim: Any, n: int) -> list[str]:
    return [str(g) for g in sim.var_names[:n]]


def _symbols(sim: Any, n: int) -> list[str]:
    return [str(s) for s in sim.var["symbol"].iloc[:n]]


def _hub_snapshot(root: Path, repo_id: str) -> Path:
    """An offline Hugging Face cache entry: snapshots/<commit>/ and refs/main."""
    repo = root / "hf" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


def _geneformer(sim: Any, root: Path, *, v2: bool) -> tuple[int, int]:
    from tests.adapters.geneformer_files import write_geneformer_release

    genes = [*_ids(sim, 120), ABSENT_ID]
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
    if v2:
        tokens |= {"<cls>": len(tokens), "<eos>": len(tokens) + 1}
    rng = np.random.default_rng(0)
    medians = {g: float(m) for g, m in zip(genes, rng.uniform(0.5, 5.0, len(genes)), strict=True)}
    snapshot = _hub_snapshot(root, "ctheodoris/Geneformer")
    model = "Geneformer-V2-104M" if v2 else "Geneformer-V1-10M"
    write_geneformer_release(snapshot / model, tokens, medians, max_positions=64, dict_format="pkl")
    # The Hub repo keeps the dictionaries in its geneformer/ package folder.
    folder, tag = ("geneformer", "gc104M") if v2 else ("geneformer/gene_dictionaries_30m", "gc30M")
    (snapshot / folder).mkdir(parents=True)
    for stem in ("token_dictionary", "gene_median_dictionary"):
        (snapshot / model / f"{stem}.pkl").rename(snapshot / folder / f"{stem}_{tag}.pkl")
    mapping = {g: g for g in genes}
    (snapshot / folder / f"ensembl_mapping_dict_{tag}.pkl").write_bytes(pickle.dumps(mapping))
    return len(genes) - 1, len(genes)


def _bulkformer(sim: Any, root: Path) -> tuple[int, int]:
    pytest.importorskip("performer_pytorch")
    pytest.importorskip("torch_geometric")
    from tests.adapters.bulkformer_files import write_family_release

    genes = [*_ids(sim, 60), ABSENT_ID]
    write_family_release(root / "BulkFormer", genes, layout="repo")
    return len(genes) - 1, len(genes)


def _scgpt(sim: Any, root: Path) -> tuple[int, int]:
    from tests.adapters.scgpt_files import write_release

    symbols = [*_symbols(sim, 80), ABSENT_SYMBOL]
    vocab = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **{s: i + 3 for i, s in enumerate(symbols)}}
    write_release(root / "scGPT_human", vocab=vocab)
    return len(symbols) - 1, len(symbols)


def _scfoundation(sim: Any, root: Path) -> tuple[int, int]:
    from tests.adapters.scfoundation_files import G, write_gene_index, write_release

    repo = root / "scFoundation"
    write_release(repo / "model" / "models")
    (repo / "model" / "models" / "OS_scRNA_gene_index.19264.tsv").unlink()
    write_gene_index(repo, [*_symbols(sim, G - 1), ABSENT_SYMBOL])  # the tiny model's G genes
    return G - 1, G


def _cellfm(sim: Any, root: Path) -> tuple[int, int]:
    from tests.adapters.cellfm_files import SYMBOLS, random_weights, write_gene_file, write_ms_ckpt

    folder = root / "CellFM_80M"
    folder.mkdir()
    write_ms_ckpt(folder / "CellFM_80M_weight.ckpt", random_weights())
    symbols = [*_symbols(sim, len(SYMBOLS) - 1), ABSENT_SYMBOL]  # the tiny model's rows
    write_gene_file(folder / "expand_gene_info.csv", symbols)
    return len(symbols) - 1, len(symbols)


def _scbert(sim: Any, root: Path) -> tuple[int, int]:
    import anndata as ad

    from tests.adapters.scbert_files import SYMBOLS, write_release

    folder = write_release(root / "scBERT", genes=None)
    symbols = [*_symbols(sim, len(SYMBOLS) - 1), ABSENT_SYMBOL]  # the tiny model's positions
    reference = ad.AnnData(np.zeros((1, len(symbols)), dtype=np.float32))
    reference.var_names = symbols
    reference.write_h5ad(folder / "panglao_10000.h5ad")
    return len(symbols) - 1, len(symbols)


def _sclong(sim: Any, root: Path) -> tuple[int, int]:
    from tests.adapters.sclong_files import GENES, write_release

    genes = [*_ids(sim, len(GENES) - 1), ABSENT_ID]  # the tiny model's genes
    write_release(root / "scLong", genes=genes)
    return len(genes) - 1, len(genes)


WRITERS: dict[str, Callable[[Any, Path], tuple[int, int]]] = {
    "geneformer_v1": lambda sim, root: _geneformer(sim, root, v2=False),
    "geneformer_v2": lambda sim, root: _geneformer(sim, root, v2=True),
    "bulkformer": _bulkformer,
    "scgpt": _scgpt,
    "scfoundation": _scfoundation,
    "cellfm": _cellfm,
    "scbert": _scbert,
    "sclong": _sclong,
}


@pytest.mark.parametrize("case", CASES)
def test_documented_bench_command_runs(
    case: str, sim: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bulkfm.cli import main
    from bulkfm.io import write_h5ad

    argv = documented_commands(DOCS.read_text())[case]
    name = argv[argv.index("--models") + 1]
    n_found, n_vocabulary = WRITERS[case](sim, tmp_path)
    data = argv[argv.index("--data") + 1]
    out = Path(argv[argv.index("--out") + 1])
    write_h5ad(sim, tmp_path / data)
    monkeypatch.chdir(tmp_path)
    if case.startswith("geneformer"):
        import huggingface_hub

        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    assert main([*argv, *SMALL_DATA, *TINY_MODEL_ARGS.get(name, [])]) == 0

    leaderboard = pd.read_csv(out / "leaderboard.csv")
    assert name in set(leaderboard["model"])
    assert np.isfinite(leaderboard.loc[leaderboard["model"] == name, "mean"]).all()
    record = json.loads((out / "run.json").read_text())
    (model,) = [m for m in record["models"] if m["name"] == name]
    coverage = model["coverage"]
    assert (coverage["n_found"], coverage["n_vocabulary"]) == (n_found, n_vocabulary)
