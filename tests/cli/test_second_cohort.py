"""A cohort the model never saw, end to end through the CLI, with no hand work.

The second cohort is quantified differently from the first: an RSEM-style table with
``Hugo_Symbol`` + ``Entrez_Gene_Id`` instead of versioned Ensembl ids, float expected
counts, ~15% of the model's genes absent, one row whose symbol and Entrez id name
different genes, and two samples re-quantified from the first cohort (kept with
``--duplicate-samples suffix``). It is built together with the first cohort into one
.h5ad that serves every model: embed, impute, bench (PCA and the checkpoint in one run)
and evaluate with the packaged template config.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bulkfm import schema as keys
from bulkfm.cli import main as cli_main
from bulkfm.data.clinical import mutation_status
from bulkfm.data.genes import GeneTable
from bulkfm.data.simulate import SimulationConfig, simulate_bulk, write_simulated_files
from bulkfm.tokenize import GENES_FILE, read_gene_list

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

N_REQUANTIFIED = 2
ABSENT_FRACTION = 0.15


def _entrez_of(ensembl_ids: list[str]) -> dict[str, str]:
    """Ensembl id -> its Entrez id, where the gene table gives exactly one."""
    lookup = GeneTable.default()._lookups["entrez"]
    out: dict[str, str] = {}
    for entrez, genes in lookup.items():
        if len(genes) == 1:
            out.setdefault(genes[0], entrez)
    return {g: out[g] for g in ensembl_ids if g in out}


def _run(argv: list[str]) -> None:
    assert cli_main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Simulated files; the last cohort is held back as the 'new' one."""
    root = tmp_path_factory.mktemp("second_cohort")
    sim = simulate_bulk(SimulationConfig(n_samples=150, n_genes=400, n_cohorts=3, seed=11))
    files = write_simulated_files(sim, root / "raw")
    lengths = root / "raw" / "gene_lengths.csv"
    pd.DataFrame({"ensg_id": sim.var_names, "length": sim.var["length"]}).to_csv(
        lengths, index=False
    )
    counts = pd.read_csv(files["counts"], sep="\t")
    cohorts = sim.obs[keys.COHORT].astype(str)
    new = sorted(cohorts.unique())[-1]
    old_ids = [s for s in sim.obs_names if cohorts[s] != new]
    new_ids = [s for s in sim.obs_names if cohorts[s] == new]
    first = root / "first_counts.tsv.gz"
    counts[["gene_id", "gene_name", *old_ids]].to_csv(first, sep="\t", index=False)
    return {
        "root": root,
        "sim": sim,
        "files": files,
        "lengths": lengths,
        "counts": counts,
        "first": first,
        "new_cohort": new,
        "old_ids": old_ids,
        "new_ids": new_ids,
    }


def _write_second_cohort(world: dict, model_genes: list[str]) -> tuple[Path, dict[str, str]]:
    """RSEM-style table of the new cohort (+ 2 re-quantified first-cohort samples)."""
    counts: pd.DataFrame = world["counts"]
    ids = counts["gene_id"].str.replace(r"\.\d+$", "", regex=True)
    entrez = _entrez_of(list(ids))
    rng = np.random.default_rng(0)
    model_in_table = [g for g in model_genes if g in entrez]
    absent = set(
        rng.choice(model_in_table, size=round(ABSENT_FRACTION * len(model_genes)), replace=False)
    )
    obs = world["sim"].obs
    tumours = [s for s in world["old_ids"] if obs.loc[s, keys.SAMPLE_TYPE] == "tumor"]
    requantified = tumours[:N_REQUANTIFIED]  # tumours: they have mutation calls
    samples = [*world["new_ids"], *requantified]
    values = counts[samples].to_numpy(dtype=float) * rng.uniform(0.9, 1.1, (len(counts), 1))
    table = pd.DataFrame(values, columns=samples).round(2)
    table.insert(0, "Entrez_Gene_Id", [entrez.get(g, "") for g in ids])
    table.insert(0, "Hugo_Symbol", counts["gene_name"].to_numpy())
    keep = ~ids.isin(absent)
    # one row whose Entrez id is another (present) gene's: the two must not be summed
    candidates = [
        g for g in ids[keep] if g not in model_genes and g in entrez
    ]  # not model genes, so coverage is unaffected
    named, other = candidates[0], candidates[1]
    row = int(np.flatnonzero(ids == named)[0])
    table.loc[row, "Entrez_Gene_Id"] = entrez[other]
    path = Path(world["root"]) / "second_cohort_rsem.tsv"
    table = table[keep.to_numpy()]
    table.to_csv(path, sep="\t", index=False)
    written = set(ids[keep])
    return path, {
        "named": named,
        "other": other,
        "symbol": str(counts["gene_name"].iloc[row]),
        "absent": [g for g in model_genes if g not in written],
        "values": {g: table[samples].to_numpy()[list(ids[keep]).index(g)] for g in (named, other)},
        "samples": samples,
    }


def test_a_new_cohort_runs_through_every_command(
    world: dict, caplog: pytest.LogCaptureFixture
) -> None:
    root: Path = world["root"]
    files = world["files"]
    clinical = [
        "--survival",
        files["survival"],
        "--mutations",
        files["mutations"],
        "--gene-lengths",
        world["lengths"],
    ]

    # 1. the first cohorts: build, pre-train a tiny model on them
    first = root / "first.h5ad"
    _run(["data", "build", world["first"], *clinical, "-o", first])
    model_dir = root / "pretrain"
    _run(
        [
            "pretrain",
            "--config",
            Path(__file__).parents[2] / "src/bulkfm/configs/pretrain_tiny.yaml",
            "--set",
            f"data.path={first}",
            "--set",
            f"output_dir={model_dir}",
            "--set",
            "optim.max_steps=20",
            "--set",
            "data.top_k_variable_genes=128",
            "--set",
            "eval_every=20",
            "--set",
            "checkpoint_every=20",
        ]
    )
    final = model_dir / "final"
    model_genes = read_gene_list(final / GENES_FILE)
    assert len(model_genes) == 128

    # 2. the new cohort, quantified differently, built together with the first
    second, planted = _write_second_cohort(world, model_genes)
    both = root / "both.h5ad"
    with caplog.at_level("INFO"):
        _run(
            [
                "data",
                "build",
                world["first"],
                second,
                *clinical,
                "--duplicate-samples",
                "suffix",
                "-o",
                both,
            ]
        )
    adata = ad.read_h5ad(both)
    conflicts = adata.uns[keys.UNS]["sources"][second.name.split(".")[0]]["gene_mapping"][
        "id_conflicts"
    ]
    assert conflicts["n_rows"] == 1 and conflicts["rule"] == "prefer_symbol"
    assert planted["symbol"] in str(list(conflicts["examples"]))
    assert "conflicting id columns" in caplog.text
    # the conflicting row kept its symbol's gene; the other gene was not summed into it:
    # TPM ratios equal count ratios over gene lengths, sample by sample
    lengths = pd.read_csv(world["lengths"], index_col=0)["length"]
    sample = planted["samples"][0]
    values = adata[sample, [planted["named"], planted["other"]]].X
    tpm = np.asarray(values.todense() if hasattr(values, "todense") else values).ravel()
    counts_ratio = (planted["values"][planted["named"]][0] / lengths[planted["named"]]) / (
        planted["values"][planted["other"]][0] / lengths[planted["other"]]
    )
    assert tpm[0] / tpm[1] == pytest.approx(counts_ratio, rel=1e-3)
    # mutation calls and survival survive --duplicate-samples suffix
    requantified = [s for s in adata.obs_names if s not in set(world["sim"].obs_names)]
    assert len(requantified) == N_REQUANTIFIED
    genes = keys.mutation_columns(adata.obs.columns)
    assert genes
    position = {s: i for i, s in enumerate(adata.obs_names)}
    truth = world["sim"].obs
    for name in requantified:
        original = str(adata.obs.loc[name, keys.SAMPLE_ID])
        assert original in truth.index and name.startswith(original)
        for gene in genes:
            calls = mutation_status(adata.obs, gene)
            expected = float(truth.loc[original, keys.mutation_column(gene)])
            assert calls[position[name]] == expected  # the simulated truth, not NA
            assert calls[position[original]] == expected
        assert (
            adata.obs.loc[name, keys.SURVIVAL_TIME] == adata.obs.loc[original, keys.SURVIVAL_TIME]
        )

    # 3. embed: the checkpoint's genes are aligned by the command itself
    emb_path = root / "emb.h5ad"
    _run(["embed", "--model", final, "--input", both, "--output", emb_path])
    emb = ad.read_h5ad(emb_path)
    cov = emb.uns[keys.UNS]["embeddings"]["X_bulkrnabert"]["gene_coverage"]
    assert cov["n_absent"] == 0  # the first cohort measures every model gene
    new_cov = cov["by_group"][keys.COHORT][world["new_cohort"]]["fraction_measured"]
    expected = 1 - len(planted["absent"]) / len(model_genes)
    assert new_cov == pytest.approx(expected, abs=1e-6)

    # 4. impute the genes the new cohort lacks
    imputed_path = root / "imputed.h5ad"
    _run(["impute", "--model", final, "--input", both, "--output", imputed_path])
    imputed = ad.read_h5ad(imputed_path)
    new_rows = imputed.obs[keys.COHORT].astype(str).to_numpy() == world["new_cohort"]
    cols = [imputed.var_names.get_loc(g) for g in planted["absent"]]
    assert np.asarray(imputed.layers[keys.IMPUTED][new_rows][:, cols].todense()).all()

    # 5. bench: a classical model and the checkpoint, one .h5ad, one run
    bench_out = root / "bench"
    _run(
        [
            "bench",
            "--data",
            both,
            "--models",
            "pca,bulkrnabert",
            "--model-dir",
            final,
            "--tasks",
            "cancer_type",
            "--splits",
            "2",
            "--min-class-patients",
            "5",
            "--no-plots",
            "--out",
            bench_out,
        ]
    )
    run = json.loads((bench_out / "run.json").read_text())
    described = {m["name"]: m for m in run["models"]}
    assert described["bulkrnabert"]["coverage"]["n_model_genes"] == 128

    # 6. evaluate the user's .h5ad with the packaged template, no pre-training
    template = root / "my_eval.yaml"
    _run(["evaluate", "--write-template", template])
    eval_out = root / "evaluate"
    fast = [
        "protocol.n_seeds=2",
        "arms.ia3=false",
        "arms.svm=false",
        "baselines.nmf_svm=false",
        "heads.mlp={max_epochs: 20, patience: 4}",
        "heads.cox={max_epochs: 20, patience: 4}",
    ]
    argv = ["evaluate", "--config", template, "--data", both, "--model", final, "--out", eval_out]
    for item in fast:
        argv += ["--set", item]
    _run(argv)
    results = json.loads((eval_out / "results.json").read_text())
    coverage = results["gene_coverage"]
    assert coverage["by_group"][keys.COHORT][world["new_cohort"]][
        "fraction_measured"
    ] == pytest.approx(expected, abs=1e-6)
    assert (eval_out / "report.md").exists()
