"""Every shipped pre-training config validates, and the paper-scale one is the paper's
recipe: the official architecture (as the official-checkpoint loader defines it), all
genes of the official vocabulary, the BERT masking and the paper's token budget."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from bulkfm.models.config import OFFICIAL_CONFIG_FIELDS, BulkRNABertConfig
from bulkfm.models.gene_init import GENE2VEC_URL
from bulkfm.train.config import LossSection, MaskingConfig, PretrainConfig

REPO = Path(__file__).resolve().parents[2]
PACKAGED = REPO / "src" / "bulkfm" / "configs"
PAPER = REPO / "configs" / "pretrain_paper_gpu.yaml"
NOTES = REPO.parent / "shared" / "docs" / "bulkrnabert.md"
VOCABULARY = REPO.parent / "shared" / "data" / "genes" / "bulkrnabert_gene_ids.txt"
SHIPPED = sorted([*(REPO / "configs").glob("pretrain_*.yaml"), *PACKAGED.glob("pretrain_*.yaml")])


def test_the_paper_config_is_among_the_shipped_ones() -> None:
    assert PAPER in SHIPPED and len(SHIPPED) >= 3


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_pretrain_config_validates(path: Path) -> None:
    config = PretrainConfig.from_yaml(path)
    assert config.data.path and config.optim.max_steps >= 1
    assert config.optim.warmup_steps < config.optim.max_steps
    # The resolved config a run saves (config.yaml) reads back as the same config.
    assert PretrainConfig.from_dict(yaml.safe_load(config.to_yaml())) == config


def test_paper_config_has_the_official_architecture() -> None:
    """Every official config.json field, as the loader of official checkpoints reads it
    (BulkRNABertConfig's defaults are the TCGA checkpoint), except n_genes, which the run
    takes from the data: all genes are kept, the official vocabulary."""
    model = PretrainConfig.from_yaml(PAPER).model
    official = BulkRNABertConfig()
    for field in OFFICIAL_CONFIG_FIELDS:
        if field != "n_genes":
            assert getattr(model, field) == getattr(official, field), field
    assert model.layer_norm_eps == official.layer_norm_eps
    assert PretrainConfig.from_yaml(PAPER).data.top_k_variable_genes is None
    if VOCABULARY.exists():
        genes = [line for line in VOCABULARY.read_text().splitlines() if line.strip()]
        assert len(genes) == official.n_genes


def test_paper_config_builds_the_published_parameter_count() -> None:
    """The model of the YAML at the vocabulary's size has the TCGA checkpoint's parameter
    count (as the shared notes state it) plus our one [MASK] row of the expression table."""
    torch = pytest.importorskip("torch")
    from bulkfm.models.bulkrnabert import BulkRNABert

    if not NOTES.exists():
        pytest.skip(f"{NOTES} (the paper's facts) is absent")
    found = re.search(r"TCGA checkpoint: ([\d,]+) parameters", NOTES.read_text())
    assert found, "the notes no longer state the checkpoint's parameter count"
    published = int(found.group(1).replace(",", ""))
    model = PretrainConfig.from_yaml(PAPER).model
    torch.manual_seed(0)
    net = BulkRNABert(dataclasses.replace(model, n_genes=BulkRNABertConfig().n_genes))
    assert sum(p.numel() for p in net.parameters()) == published + model.embed_dim


def test_paper_config_keeps_the_papers_recipe_and_budget() -> None:
    config = PretrainConfig.from_yaml(PAPER)
    assert config.masking == MaskingConfig()  # BERT: 15%, 80/10/10, as in the paper
    assert config.loss == LossSection()  # cross-entropy over the bins only
    assert config.data.holdout_fraction == 0.05
    assert config.mixed_precision == "bf16" and config.data.streaming
    # The paper starts the gene embedding from the published Gene2Vec release.
    assert config.gene_init.method == "gene2vec"
    assert config.gene_init.gene2vec_path == GENE2VEC_URL
    assert config.model.init_gene_embed_dim == 200
    genes = BulkRNABertConfig().n_genes
    target = config.optim.target_tokens_per_step
    assert target is not None
    # The same global batch on 1, 2, 4 and 8 GPUs, at least the paper's ~3e6 tokens.
    batches = {
        config.grad_accum_steps(genes, world) * config.optim.micro_batch_size * world
        for world in (1, 2, 4, 8)
    }
    assert len(batches) == 1
    (samples,) = batches
    assert target <= samples * genes < target + config.optim.micro_batch_size * genes
    # 12B tokens in all (the shared notes), within one optimiser step.
    budget = 12e9
    if NOTES.exists():
        assert "12B tokens" in NOTES.read_text()
    tokens = config.optim.max_steps * samples * genes
    assert budget <= tokens < budget + samples * genes
    # A multi-hour run: checkpoints often enough to lose little, not so often they cost.
    assert 20 <= config.optim.max_steps / config.checkpoint_every <= 100
