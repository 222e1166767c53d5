"""The model under evaluation: a checkpoint, one pre-trained here, or precomputed embeddings.

torch loads inside the functions: an evaluation of precomputed embeddings runs without it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bulkfm.embed import embed_adata, read_embeddings
from bulkfm.errors import BulkfmWarning, ConfigError
from bulkfm.evaluate.results import ModelInfo, ModelSize, PretrainingInfo
from bulkfm.tasks import TaskData, align_inputs
from bulkfm.tokenize import GeneCoverage, gene_coverage
from bulkfm.train.config import PretrainConfig

if TYPE_CHECKING:
    import anndata as ad

    from bulkfm.evaluate.config import EvaluateConfig, ModelSection
    from bulkfm.models.bulkrnabert import BulkRNABert
    from bulkfm.tokenize import BinTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "check_coverage",
    "embed",
    "embeddings_for",
    "load_model",
    "model_info",
    "pretrain_here",
    "random_encoder",
]


@dataclass
class LoadedModel:
    """The encoder and tokenizer (both None for precomputed embeddings), and where they
    came from (:func:`model_info` adds the size for results.json's ``model``).
    ``coverage``: how much of the model's gene list the analysed samples measure, set
    once by :func:`check_coverage` before the model first runs."""

    model: BulkRNABert | None
    tokenizer: BinTokenizer | None
    info: ModelInfo
    coverage: GeneCoverage | None = field(default=None, repr=False)


def check_coverage(mdl: LoadedModel, adata: ad.AnnData, section: ModelSection) -> None:
    """Measure (and log) the model's gene coverage of ``adata`` once, for results.json;
    below ``model.min_gene_coverage`` it is an error naming that key. Model genes the
    data lacks are fed as [MASK] and left out of pooling by every arm."""
    if mdl.tokenizer is None:
        return
    mdl.coverage = gene_coverage(
        mdl.tokenizer,
        adata,
        min_coverage=section.min_gene_coverage,
        option="model.min_gene_coverage (--set model.min_gene_coverage=...)",
    )


def load_model(
    config: EvaluateConfig,
    adata: ad.AnnData,
    out: Path,
    given: tuple[BulkRNABert, BinTokenizer] | None,
) -> LoadedModel:
    """The model ``config`` names; ``given`` (model, tokenizer) takes precedence."""
    if given is not None:
        model, tokenizer = given
        return LoadedModel(model, tokenizer, ModelInfo("given"))
    section = config.model
    if section.path is not None:
        from bulkfm.models.bulkrnabert import load_pretrained

        model, tokenizer = load_pretrained(
            section.path,
            genes=section.genes,
            normalization_factor=section.normalization_factor,
            device=section.device,
        )
        return LoadedModel(model, tokenizer, ModelInfo("checkpoint", section.path))
    if config.pretrain is not None:
        return pretrain_here(config, adata, out)
    return LoadedModel(None, None, ModelInfo("embeddings", section.embeddings))


def pretrain_here(config: EvaluateConfig, adata: ad.AnnData, out: Path) -> LoadedModel:
    """Pre-train on every loaded sample (tumours, normals, GTEx): the MLM needs no labels."""
    from bulkfm.models.bulkrnabert import load_pretrained
    from bulkfm.train.pretrain import find_latest_checkpoint, pretrain

    raw = dict(config.pretrain or {})
    raw.setdefault("output_dir", str(out / "pretrain"))
    raw.setdefault("data", {})
    raw["data"] = {**raw["data"], "path": None}
    pre = PretrainConfig.from_dict(raw)
    resume = find_latest_checkpoint(pre.output_dir) is not None
    logger.info(
        "pre-training (%d steps%s) on %d samples -> %s",
        pre.optim.max_steps,
        ", resuming" if resume else "",
        adata.n_obs,
        pre.output_dir,
    )
    t0 = time.perf_counter()
    result = pretrain(pre, adata=adata, resume=resume)
    if result.final_dir is None:
        raise ConfigError(f"pre-training in {pre.output_dir} stopped before its final save")
    model, tokenizer = load_pretrained(result.final_dir, device=config.model.device)
    info = ModelInfo(
        "pretrained here",
        str(result.final_dir),
        pretraining=PretrainingInfo(
            steps=result.step,
            n_train=result.n_train,
            n_eval=result.n_eval,
            eval=result.eval,
            initial_eval=result.initial_eval,
            elapsed_s=time.perf_counter() - t0,
        ),
    )
    return LoadedModel(model, tokenizer, info)


def embed(
    mdl: LoadedModel,
    section: ModelSection,
    adata: ad.AnnData,
    model: BulkRNABert | None = None,
) -> np.ndarray:
    """Frozen embeddings of ``adata`` by ``model`` (default: the loaded one).

    Coverage was checked once on the analysed samples (:func:`check_coverage`); the
    subsets and robustness variants embedded later are not checked again (a variant
    with 50% of the genes removed is meant to be read with them missing).
    """
    encoder = model if model is not None else mdl.model
    if encoder is None or mdl.tokenizer is None:
        raise ConfigError("embedding samples needs a model; set model.path or pretrain:")
    if mdl.coverage is None:
        check_coverage(mdl, adata, section)
    return embed_adata(
        encoder,
        mdl.tokenizer,
        adata,
        layer=section.layer,
        batch_size=section.batch_size,
        progress=None,
        coverage=mdl.coverage,
    )


def random_encoder(model: BulkRNABert, seed: int) -> BulkRNABert:
    """Same architecture, fresh initialisation (seeded without touching the global RNG)."""
    import torch

    from bulkfm.models.bulkrnabert import BulkRNABert

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BulkRNABert(dataclasses.replace(model.config)).to(model.device).eval()


def embeddings_for(config: EvaluateConfig, task: TaskData) -> tuple[np.ndarray, TaskData, int]:
    """Precomputed embeddings matched to the task samples by id (none shared: an error);
    returns them, the task restricted to the matched samples, and how many were dropped."""
    if config.model.embeddings is None:
        raise ConfigError("no model and no model.embeddings; set one of them")
    frame = read_embeddings(config.model.embeddings)
    aligned = align_inputs(frame, pd.Series(task.labels, index=task.ids))
    position = pd.Index(task.ids).get_indexer(aligned.ids)
    dropped = len(task.ids) - len(aligned.ids)
    if dropped:
        warnings.warn(
            f"{dropped} of {len(task.ids)} selected samples have no embedding in "
            f"{config.model.embeddings} and are left out",
            BulkfmWarning,
            stacklevel=3,
        )
    return aligned.X, task.subset(position), dropped


def model_info(mdl: LoadedModel) -> ModelInfo:
    """Where the model came from and its size, for results.json."""
    if mdl.model is None:
        return mdl.info
    cfg = mdl.model.config
    size = ModelSize(
        n_genes=cfg.n_genes,
        embed_dim=cfg.embed_dim,
        num_layers=cfg.num_layers,
        n_parameters=int(mdl.model.num_parameters()),
    )
    return dataclasses.replace(mdl.info, size=size)
