"""Gene coverage of each foundation model's vocabulary on the shared TCGA genes.

    python scripts/adapter_coverage.py [--shared ../shared/data] \
        [--gene-list NAME=FILE[:ensembl|symbol] ...]

Vocabularies available without any download: Geneformer V1 (the shared dictionaries),
scFoundation (the shared 19,264-gene index), scGPT (``default_gene_vocab.json`` in the
``scgpt`` PyPI package, installed with ``--no-deps``), BulkRNABert (the shared gene list).
Add any other model's released gene file with ``--gene-list``. Coverage goes through
the same code the adapters use (:func:`bulkfm.adapters.base.gene_input`): symbols are
mapped to Ensembl ids by the data layer (approved, previous and alias symbols), and a
data gene feeds at most one vocabulary entry.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def tcga_genes(shared: Path) -> list[str]:
    path = shared / "tcga" / "tcga_tumor_counts_7cohorts.tsv.gz"
    with gzip.open(path, "rt") as fh:
        header = fh.readline().rstrip("\n").split("\t")
    return [h for h in header if h.startswith("ENSG")]


def builtin_vocabularies(shared: Path) -> dict[str, tuple[list[str], str]]:
    from bulkfm.adapters.geneformer import GeneformerVocabulary, read_dictionary
    from bulkfm.adapters.scfoundation import read_gene_index
    from bulkfm.adapters.scgpt import _is_special, read_vocab

    out: dict[str, tuple[list[str], str]] = {}
    gf = shared / "genes" / "geneformer_v1"
    # The shared dictionaries are the project's own test data: trusted, and read by a
    # restricted unpickler that admits only plain values anyway.
    vocab = GeneformerVocabulary.from_dicts(
        read_dictionary(gf / "token_dictionary.pkl", trust_pickle=True),
        read_dictionary(gf / "gene_median_dictionary.pkl", trust_pickle=True),
    )
    out["geneformer (V1)"] = (list(vocab.genes), "ensembl")
    index = shared / "genes" / "scfoundation_gene_index_19264.tsv"
    out["scfoundation"] = (read_gene_index(index), "symbol")
    spec = importlib.util.find_spec("scgpt")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "tokenizer" / "default_gene_vocab.json"
        if path.is_file():
            genes = [t for t in read_vocab(path) if not _is_special(t)]
            out["scgpt (default_gene_vocab)"] = (genes, "symbol")
    brb = shared / "genes" / "bulkrnabert_gene_ids.txt"
    out["bulkrnabert"] = (brb.read_text().split(), "ensembl")
    return out


def extra_vocabularies(items: list[str]) -> dict[str, tuple[list[str], str]]:
    from bulkfm.data.genes import detect_id_type
    from bulkfm.errors import ConfigError, InputFileError

    out: dict[str, tuple[list[str], str]] = {}
    for item in items:
        name, eq, rest = item.partition("=")
        path, _, kind = rest.partition(":")
        if not (eq and name and path):
            raise ConfigError(f"--gene-list {item!r} must look like NAME=FILE[:ensembl|symbol]")
        if kind not in ("", "ensembl", "symbol"):
            raise ConfigError(f"--gene-list {item!r}: the id type must be ensembl or symbol")
        if not Path(path).is_file():
            raise InputFileError(f"--gene-list {item!r}: {path} not found")
        lines = [
            line.split("\t")[0].split(",")[0].strip()
            for line in Path(path).read_text().splitlines()
        ]
        genes = [g for g in lines if g]
        kind = kind or ("ensembl" if detect_id_type(genes) == "ensembl" else "symbol")
        out[name] = (genes, kind)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--gene-list", action="append", default=[], metavar="NAME=FILE[:TYPE]")
    args = parser.parse_args()

    from bulkfm.adapters.base import gene_input

    genes = tcga_genes(args.shared)
    data = ad.AnnData(np.zeros((1, len(genes)), dtype=np.float32), var=pd.DataFrame(index=genes))
    vocabularies = {**builtin_vocabularies(args.shared), **extra_vocabularies(args.gene_list)}
    print(f"shared TCGA genes: {len(genes):,} Ensembl ids\n")
    print("| model | vocabulary | id type | found in TCGA | coverage |")
    print("|---|---|---|---|---|")
    for name, (vocab, kind) in vocabularies.items():
        report = gene_input(data, vocab, id_type=kind, model=name, min_fraction=0.0).report
        print(
            f"| {name} | {report['n_vocabulary']:,} | {kind} | {report['n_found']:,} | "
            f"{report['fraction_found']:.1%} |"
        )


if __name__ == "__main__":
    main()
