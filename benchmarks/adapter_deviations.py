"""How far each adapter option that departs from (or restores) a published recipe moves
the embedding, on tiny random models written in each release's layout.

For every option docs/adapters.md lists as a deviation, the same simulated samples are
embedded with the default and with the alternative, and the script prints the mean over
samples of the relative L2 difference ||alt - default|| / ||default|| and of the cosine
similarity of the two embeddings. The models are TINY AND RANDOMLY INITIALISED (the
writers of ``tests/adapters/*_files.py``; no released weights can be downloaded here), so
the numbers show that an option changes the embedding and roughly how much on such a
model, not its size on the released weights. docs/adapters.md quotes these numbers
beside the ones the issue's reporter measured with released weights.

    python benchmarks/adapter_deviations.py                # 40 samples, prints the table
    python benchmarks/adapter_deviations.py --samples 10 --json deviations.json

Run from a checkout (it imports the test suite's release writers).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY_NOTE = (
    "tiny random models in the release layouts (not released weights): these numbers show "
    "the direction and rough size of each option's effect on such a model only"
)
ABSENT_SYMBOL, ABSENT_ID = "ALB", "ENSG00000163631"  # a vocabulary gene never simulated


@dataclass
class Row:
    """One option: default vs alternative on the same samples."""

    model: str
    option: str
    default: str
    alternative: str
    n_samples: int
    mean_relative_l2: float | None
    mean_cosine: float | None
    note: str = ""


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean over samples of ||b - a|| / ||a|| and of cos(a, b), in float64."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a64.shape != b64.shape:
        raise ValueError(f"embeddings of different shapes {a64.shape} and {b64.shape}")
    na, nb = np.linalg.norm(a64, axis=1), np.linalg.norm(b64, axis=1)
    rel = np.linalg.norm(b64 - a64, axis=1) / na
    cos = np.einsum("ij,ij->i", a64, b64) / (na * nb)
    return float(rel.mean()), float(cos.mean())


# --------------------------------------------------------------------------- releases
# Each writer puts a tiny release in ``folder`` with a vocabulary taken from the
# simulated genes (plus one gene the data lacks) and returns the embedder's model_dir
# and the options every embedding of it needs.


def _ids(adata: Any, n: int) -> list[str]:
    return [str(g) for g in adata.var_names[:n]]


def _symbols(adata: Any, n: int) -> list[str]:
    return [str(s) for s in adata.var["symbol"].iloc[:n]]


def geneformer_v2(adata: Any, folder: Path) -> tuple[Path, dict[str, Any]]:
    from tests.adapters.geneformer_files import write_geneformer_release

    genes = [*_ids(adata, 1000), ABSENT_ID]
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
    tokens |= {"<cls>": len(tokens), "<eos>": len(tokens) + 1}
    medians = dict(
        zip(genes, np.random.default_rng(0).uniform(0.5, 5.0, len(genes)).tolist(), strict=True)
    )
    write_geneformer_release(folder, tokens, medians, max_positions=256)
    mapping = {g: g for g in genes}
    (folder / "ensembl_mapping_dict_gc104M.pkl").write_bytes(pickle.dumps(mapping))
    return folder, {"trust_pickle": True}


def bulkformer(adata: Any, folder: Path) -> tuple[Path, dict[str, Any]]:
    from tests.adapters.bulkformer_files import write_family_release

    path = write_family_release(folder, [*_ids(adata, 200), ABSENT_ID], layout="repo")
    return path, {"trust_pickle": True}


def scgpt(adata: Any, folder: Path) -> tuple[Path, dict[str, Any]]:
    from tests.adapters.scgpt_files import write_release

    symbols = [*_symbols(adata, 1600), ABSENT_SYMBOL]  # > 1,200 expressed per sample
    vocab = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **{s: i + 3 for i, s in enumerate(symbols)}}
    write_release(folder, vocab=vocab)
    return folder, {"trust_pickle": True}


def scfoundation(adata: Any, folder: Path) -> tuple[Path, dict[str, Any]]:
    from tests.adapters.scfoundation_files import G, write_gene_index, write_release

    write_release(folder)
    write_gene_index(folder, [*_symbols(adata, G - 1), ABSENT_SYMBOL])
    return folder, {"trust_pickle": True}


def cellfm(adata: Any, folder: Path) -> tuple[Path, dict[str, Any]]:
    from tests.adapters.cellfm_files import (
        DIMS,
        HEADS,
        SYMBOLS,
        random_weights,
        write_gene_file,
        write_ms_ckpt,
    )

    folder.mkdir(parents=True)
    weights = random_weights()
    # CellFM-torch's checkpoints carry the two ST_emb tokens the port's encode adds.
    st = 0.5 * np.random.default_rng(2).standard_normal((1, 2, DIMS))
    weights["ST_emb"] = st.astype(np.float32)
    write_ms_ckpt(folder / "CellFM_80M_weight.ckpt", weights)
    write_gene_file(
        folder / "expand_gene_info.csv", [*_symbols(adata, len(SYMBOLS) - 1), ABSENT_SYMBOL]
    )
    return folder, {"num_heads": HEADS}


def scbert(adata: Any, folder: Path) -> tuple[Path, dict[str, Any]]:
    from tests.adapters.scbert_files import SYMBOLS, write_release

    write_release(folder, genes=[*_symbols(adata, len(SYMBOLS) - 1), ABSENT_SYMBOL])
    return folder, {"trust_pickle": True}


def sclong(adata: Any, folder: Path) -> tuple[Path, dict[str, Any]]:
    from tests.adapters.sclong_files import GENES, write_release

    write_release(folder, genes=[*_ids(adata, len(GENES) - 1), ABSENT_ID])
    return folder, {"trust_pickle": True}


Writer = Callable[[Any, Path], tuple[Path, dict[str, Any]]]
# (registered name, writer, option, default value, alternative value, why it is listed)
DEVIATIONS: tuple[tuple[str, Writer, str, Any, Any, str], ...] = (
    ("geneformer", geneformer_v2, "emb_mode", "auto", "cell",
     "V2 model: auto = <cls> (official EmbExtractor default) vs mean over genes"),
    ("cellfm", cellfm, "implementation", "mindspore", "pytorch_port",
     "MindSpore tutorial forward vs CellFM-torch encode (+2 ST_emb tokens, eps, slope)"),
    ("bulkformer", bulkformer, "gene_set", "present", "listed",
     "genes the sample has vs the authors' interested_gene_list.pt (current release)"),
    ("scfoundation", scfoundation, "recipe", "per_sample", "published",
     "per-sample normalisation vs the published file-wide recipe"),
    ("scgpt", scgpt, "max_length", None, 1200,
     "every expressed gene vs the published random 1,200 (gene_selection=random)"),
    ("scbert", scbert, "pooling", "present", "genes",
     "mean over the genes the sample has vs over every gene position"),
    ("sclong", sclong, "pooling", "present", "all",
     "mean over the genes the sample has vs over every gene position"),
    ("sclong", sclong, "key_max", "sample", "batch",
     "Performer key maximum per sample vs over the batch (published)"),
)  # fmt: skip
NOT_MEASURED: tuple[tuple[str, str, str, str, str], ...] = (
    ("scbert", "normalisation", "scanpy", "x / total * 1e4",
     "not an option any more (the old arithmetic is gone); tokens change only for values "
     "landing exactly on 2^k - 1, checked in tests/adapters/test_scbert.py"),
    ("cellfm", "gene_selection", "top", "random",
     "no effect unless a sample expresses more than max_genes (2,048) model genes; the "
     "tiny vocabulary has 22"),
    ("geneformer", "ranking ties", "stable", "np.argsort",
     "not an option: the published order is arbitrary"),
)  # fmt: skip


def run_one(adata: Any, root: Path, spec: tuple[str, Writer, str, Any, Any, str]) -> Row:
    from bulkfm.embedders import get_embedder

    name, writer, option, default, alternative, why = spec
    folder = root / f"{name}_{option}"
    try:
        model_dir, base = writer(adata, folder)
    except ImportError as exc:  # an optional dependency of this model is absent
        return Row(name, option, str(default), str(alternative), adata.n_obs, None, None,
                   f"skipped: {exc}")  # fmt: skip
    extra = {"gene_selection": "random"} if (name, option) == ("scgpt", "max_length") else {}
    a = get_embedder(name, model_dir=model_dir, **base, **{option: default}).transform(adata)
    b = get_embedder(name, model_dir=model_dir, **base, **{option: alternative}, **extra)
    rel, cos = compare(a, b.transform(adata))
    shown = "None (all)" if default is None else str(default)
    return Row(name, option, shown, str(alternative), adata.n_obs, rel, cos, why)


def _number(x: float) -> str:
    """Three decimals, or two significant digits where three decimals would read 0.000."""
    return f"{x:.3f}" if abs(x) >= 5e-4 or x == 0 else f"{x:.1e}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40, help="simulated samples (40)")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed (0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.samples < 10:
        parser.error(f"--samples {args.samples}: the simulation needs at least 10; raise --samples")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))

    import torch

    from bulkfm.data.simulate import simulate_bulk

    torch.set_num_threads(args.threads)
    adata = simulate_bulk(n_samples=args.samples, n_genes=2000, n_cohorts=2, seed=args.seed)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bulkfm_deviations_") as tmp:
        for spec in DEVIATIONS:
            rows.append(run_one(adata, Path(tmp), spec))
    for name, option, default, alternative, why in NOT_MEASURED:
        rows.append(Row(name, option, default, alternative, adata.n_obs, None, None, why))

    print(f"# {TINY_NOTE}")
    print(f"# {args.samples} simulated samples x 2,000 genes, seed {args.seed}")
    print(f"{'model':<13}{'option':<16}{'default -> alternative':<28}{'rel. L2':>9}{'cosine':>9}")
    for r in rows:
        change = f"{r.default} -> {r.alternative}"
        if r.mean_relative_l2 is None or r.mean_cosine is None:
            print(f"{r.model:<13}{r.option:<16}{change:<28}{'-':>9}{'-':>9}")
        else:
            print(
                f"{r.model:<13}{r.option:<16}{change:<28}"
                f"{_number(r.mean_relative_l2):>9}{_number(r.mean_cosine):>9}"
            )
    print("\nrows:")
    for r in rows:
        print(f"  {r.model} {r.option}: {r.note}")
    report = {"note": TINY_NOTE, "samples": args.samples, "seed": args.seed,
              "rows": [asdict(r) for r in rows]}  # fmt: skip
    if args.json is not None:
        import _common as common

        common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
