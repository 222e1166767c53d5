"""Pre-training configuration: one validated dataclass, loadable from YAML.

The config is plain data (no torch import) so the CLI can parse and check it
before anything heavy is loaded. Sections mirror the YAML layout::

    model: {...}      # BulkRNABertConfig itself, less what the run decides (n_genes, ...)
    data: {...}       # which .h5ad, which layer, gene subset, held-out fraction
    optim: {...}      # AdamW, warm-up + cosine schedule, batch and accumulation
    masking: {...}    # BERT recipe (15% selected; 80/10/10)
    loss: {...}       # MLM cross-entropy, optionally + an expected-value term
    gene_init: {...}  # starting gene embedding: random (default), co-expression, Gene2Vec
    seed, output_dir, mixed_precision, ...   # run-level settings

Reading, ``--set`` overrides and unknown-key errors come from :mod:`bulkfm.config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from bulkfm import schema as keys
from bulkfm.config import (
    ConfigMixin,
    check_bool,
    check_choice,
    check_int,
    check_nonempty_str,
    check_number,
    exclude,
)
from bulkfm.config import build as build_config
from bulkfm.data.archs4 import Archs4Selection
from bulkfm.errors import ConfigError
from bulkfm.models.config import BulkRNABertConfig

__all__ = [
    "DataSection",
    "GeneInitSection",
    "LossSection",
    "MaskingConfig",
    "OptimSection",
    "PretrainConfig",
]

MixedPrecision = Literal["no", "bf16"]
MIXED_PRECISION_CHOICES: tuple[str, ...] = ("no", "bf16")
DataFormat = Literal["auto", "h5ad", "archs4", "parquet"]
DATA_FORMATS: tuple[str, ...] = ("auto", "h5ad", "archs4", "parquet")
GeneInitMethod = Literal["random", "coexpression", "gene2vec"]
GENE_INIT_METHODS: tuple[str, ...] = ("random", "coexpression", "gene2vec")

#: The ``model:`` section is the model's own config; these of its keys the run decides.
_SET_BY_THE_RUN = exclude(
    n_genes="the data decide it (all genes, or data.top_k_variable_genes)",
    n_special_tokens="pre-training uses exactly one special token, [MASK]",
    gradient_checkpointing="it is a run setting: use the top-level gradient_checkpointing",
)


@dataclass
class DataSection:
    """Where the expression matrix comes from and which part of it is used.

    ``top_k_variable_genes`` keeps the genes with the largest variance of log10(1 + TPM)
    over the training samples. Only genes measured (not in ``missing_layer``) in at
    least ``min_measured_fraction`` of the training samples are ranked: on a union of
    sources, a gene measured by one pipeline only looks highly variable because its
    few values come from one source (on the shared data, immunoglobulin genes that
    the other cohorts lack), so ranking it would spend model capacity on a gene most
    samples feed as [MASK]. The genes this rule drops are logged and written to
    ``genes_excluded.tsv`` in the output folder. With ``top_k_variable_genes: null``
    every gene is kept and absent values are fed as [MASK].

    ``streaming: true`` leaves the matrix on disk (:mod:`bulkfm.train.stream`): the same
    genes, tokenizer and batches, fitted in chunked passes, with memory flat in the
    number of samples. The default reads the whole ``.h5ad`` into memory.

    ``format`` says what ``path`` is (``auto``: a folder, a glob or a ``.parquet`` file is
    ``parquet``, an HDF5 file with ARCHS4's datasets ``archs4``, anything else ``h5ad``):
    ``h5ad`` as ``bulkfm data build`` writes it; ``archs4``, an ARCHS4 gene-count file
    (counts converted to TPM at read time as ``bulkfm data build`` converts them), with
    ``archs4`` choosing samples (``series``, ``samples``, ``source``,
    ``max_singlecell_probability``, ``genes``: the keys of a build config's ``archs4:``;
    null = every sample); ``parquet``, TPM shards (samples x genes, ids in the index or a
    ``sample_id`` column). ``layer`` applies to ``h5ad`` only.
    """

    path: str | None = None
    layer: str | None = None
    top_k_variable_genes: int | None = None
    min_measured_fraction: float = 0.95
    holdout_fraction: float = 0.05
    group_key: str | None = keys.PATIENT
    missing_layer: str | None = keys.MISSING
    streaming: bool = False
    format: DataFormat = "auto"
    archs4: Archs4Selection | None = None

    def __post_init__(self) -> None:
        check_bool("data.streaming", self.streaming)
        check_choice(
            "data.format",
            self.format,
            DATA_FORMATS,
            hint="auto detects: a folder/glob/.parquet = parquet shards, an ARCHS4 .h5 = "
            "archs4, else h5ad",
        )
        if isinstance(self.archs4, dict):
            self.archs4 = build_config(Archs4Selection, self.archs4, section="data.archs4")
        if self.archs4 is not None and self.format in ("h5ad", "parquet"):
            raise ConfigError(
                f"data.archs4 selects samples of an ARCHS4 file but data.format is "
                f"{self.format!r}; set data.format=archs4 (or auto), or data.archs4=null"
            )
        if self.layer is not None and self.format in ("archs4", "parquet"):
            raise ConfigError(
                f"data.layer {self.layer!r} names an AnnData layer, but data.format is "
                f"{self.format!r}, which has one matrix; set data.layer=null"
            )
        if self.path is not None:
            check_nonempty_str(
                "data.path",
                self.path,
                hint="give a .h5ad (X = TPM), an ARCHS4 .h5 file or a folder of parquet shards",
            )
        if self.top_k_variable_genes is not None:
            check_int("data.top_k_variable_genes", self.top_k_variable_genes, 1)
        check_number(
            "data.min_measured_fraction",
            self.min_measured_fraction,
            low=0.0,
            high=1.0,
            hint="the share of training samples a gene must be measured in to be ranked "
            "by variance (0.95 by default; 1 = measured everywhere)",
        )
        check_number(
            "data.holdout_fraction",
            self.holdout_fraction,
            low=0.0,
            high=1.0,
            high_open=True,
            hint="the paper holds out 0.05 (use 0 to skip held-out metrics)",
        )


@dataclass
class OptimSection:
    """AdamW with linear warm-up then cosine decay; accumulation sized by tokens."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.0
    micro_batch_size: int = 8
    target_tokens_per_step: int | None = None
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        check_number("optim.lr", self.lr, low=0.0, low_open=True, hint="try 1e-4")
        check_number("optim.weight_decay", self.weight_decay, low=0.0, hint="0.01 is usual")
        if len(self.betas) != 2 or not all(
            isinstance(b, int | float) and 0.0 <= b < 1.0 for b in self.betas
        ):
            raise ConfigError(
                f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}; "
                "e.g. [0.9, 0.999]"
            )
        check_number("optim.eps", self.eps, low=0.0, low_open=True, hint="e.g. 1e-8")
        check_int("optim.warmup_steps", self.warmup_steps, 0)
        check_int("optim.max_steps", self.max_steps, 1)
        check_int("optim.micro_batch_size", self.micro_batch_size, 1)
        check_number(
            "optim.min_lr_ratio",
            self.min_lr_ratio,
            low=0.0,
            high=1.0,
            hint="the fraction of lr left at the end of the cosine",
        )
        if self.target_tokens_per_step is not None:
            check_int("optim.target_tokens_per_step", self.target_tokens_per_step, 1)
        if self.max_grad_norm is not None:
            check_number(
                "optim.max_grad_norm",
                self.max_grad_norm,
                low=0.0,
                low_open=True,
                hint="or null for no clipping",
            )


@dataclass
class MaskingConfig:
    """BERT masking recipe: select ``mask_prob`` of the eligible genes of each sample;
    of those, ``mask_fraction`` become [MASK], ``random_fraction`` a random bin and
    the rest keep their token."""

    mask_prob: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    def __post_init__(self) -> None:
        check_number(
            "masking.mask_prob",
            self.mask_prob,
            low=0.0,
            high=1.0,
            low_open=True,
            hint="BERT uses 0.15",
        )
        for name in ("mask_fraction", "random_fraction"):
            check_number(f"masking.{name}", getattr(self, name), low=0.0, high=1.0)
        if self.mask_fraction + self.random_fraction > 1.0 + 1e-9:
            raise ConfigError(
                f"masking.mask_fraction + masking.random_fraction = "
                f"{self.mask_fraction + self.random_fraction} exceeds 1; BERT uses 0.8 + 0.1"
            )


@dataclass
class LossSection:
    """What pre-training minimises: the masked-LM cross-entropy over the bins (the paper)
    plus ``value_weight`` x the squared error of the expected bin at the same targets
    (:func:`bulkfm.train.losses.masked_value_loss`, on the [0, 1] normalised scale).

    ``value_weight: 0`` (default) is the paper's recipe. A positive weight adds an
    order-aware term (bin 11 for a true 10 is a near miss, not a full miss) without new
    parameters, so checkpoints keep the official format.
    """

    value_weight: float = 0.0

    def __post_init__(self) -> None:
        check_number(
            "loss.value_weight",
            self.value_weight,
            low=0.0,
            hint="0 = the paper's cross-entropy only; e.g. 1.0 adds the expected-value loss",
        )


@dataclass
class GeneInitSection:
    """Where the gene embedding (the model's only notion of gene identity) starts.

    Applied once, when a run starts fresh (a resumed run keeps its checkpoint's weights),
    by :func:`bulkfm.models.gene_init.init_gene_embeddings`; what was done is recorded in
    ``summary.json`` and every checkpoint's ``trainer_state.json`` (``gene_init``).

    - ``random`` (default): the model's own N(0, 0.02) draw, untouched.
    - ``coexpression``: genes that move together start close together; computed on the
      training samples only (at most
      :data:`bulkfm.models.gene_init.COEXPRESSION_MAX_ROWS` of them, a seeded sample when
      there are more; streamed runs read them in blocks).
    - ``gene2vec``: the paper's choice; ``gene2vec_path`` is the published release file
      (``gene2vec_dim_200_iter_9.txt``, symbol keyed) or any word2vec file, a local path
      or an http(s) URL downloaded once into the bulkfm cache and, with
      ``gene2vec_md5``, checked. ``model.init_gene_embed_dim`` must equal the file's
      dimension (200 for the release).

    ``rescale_std``: null keeps the vectors' own scale (co-expression rows have norms up
    to 1, Gene2Vec's its own); a number multiplies the whole matrix by one factor so its
    standard deviation over all entries is that number (0.02 = the random init's, which
    separates the effect of the structure from that of the scale).
    """

    method: GeneInitMethod = "random"
    gene2vec_path: str | None = None
    gene2vec_md5: str | None = None
    rescale_std: float | None = None

    def __post_init__(self) -> None:
        check_choice(
            "gene_init.method",
            self.method,
            GENE_INIT_METHODS,
            hint="random (default), coexpression or gene2vec",
        )
        if self.gene2vec_path is not None:
            check_nonempty_str(
                "gene_init.gene2vec_path",
                self.gene2vec_path,
                hint="a Gene2Vec file (local path or http(s) URL), or null",
            )
        if self.method == "gene2vec" and self.gene2vec_path is None:
            raise ConfigError(
                "gene_init.method is 'gene2vec' but gene_init.gene2vec_path is not set; set "
                "it to the Gene2Vec release file, a local path or its URL "
                "(bulkfm.models.gene_init.GENE2VEC_URL), e.g. --set "
                "gene_init.gene2vec_path=PATH_OR_URL"
            )
        if self.method != "gene2vec" and self.gene2vec_path is not None:
            raise ConfigError(
                f"gene_init.gene2vec_path is set but gene_init.method is {self.method!r}, "
                "which does not read it; set gene_init.method=gene2vec, or "
                "gene_init.gene2vec_path=null"
            )
        if self.gene2vec_md5 is not None:
            md5 = self.gene2vec_md5
            if self.gene2vec_path is None:
                raise ConfigError(
                    "gene_init.gene2vec_md5 is set without gene_init.gene2vec_path; set "
                    "both (method gene2vec) or gene_init.gene2vec_md5=null"
                )
            if not (
                isinstance(md5, str)
                and len(md5) == 32
                and all(c in "0123456789abcdefABCDEF" for c in md5)
            ):
                raise ConfigError(
                    f"gene_init.gene2vec_md5 must be 32 hex digits (an md5), got {md5!r}"
                )
        if self.rescale_std is not None:
            check_number(
                "gene_init.rescale_std",
                self.rescale_std,
                low=0.0,
                low_open=True,
                hint="null keeps the vectors' scale; 0.02 is the random init's",
            )


def _default_model() -> BulkRNABertConfig:
    return BulkRNABertConfig()


@dataclass
class PretrainConfig(ConfigMixin):
    """Everything one MLM pre-training run needs; validated on construction."""

    model: BulkRNABertConfig = field(default_factory=_default_model, metadata=_SET_BY_THE_RUN)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossSection = field(default_factory=LossSection)
    gene_init: GeneInitSection = field(default_factory=GeneInitSection)
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    # Shard weights, gradients and optimiser state over the processes of a launch with
    # PyTorch FSDP2 (``fully_shard``), which runs on CPU gloo and on GPUs alike; bulkfm
    # applies it itself because accelerate keeps DDP on CPU even when asked for FSDP.
    fsdp: bool = False
    seed: int = 0
    output_dir: str = "runs/pretrain"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 500
    eval_batch_size: int | None = None
    log_every: int = 1
    progress_every_s: float = 30.0
    tensorboard: bool = False
    num_workers: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION_CHOICES)
        check_bool("fsdp", self.fsdp)
        check_int("seed", self.seed, 0)
        check_nonempty_str(
            "output_dir", self.output_dir, hint="give a folder for checkpoints and logs"
        )
        for name in ("checkpoint_every", "keep_checkpoints", "eval_every", "log_every"):
            check_int(name, getattr(self, name), 1)
        if self.eval_batch_size is not None:
            check_int("eval_batch_size", self.eval_batch_size, 1)
        check_number(
            "progress_every_s",
            self.progress_every_s,
            low=0.0,
            hint="seconds between progress lines (0: one line per optimiser step)",
        )
        check_int("num_workers", self.num_workers, 0)
        if self.num_threads is not None:
            check_int("num_threads", self.num_threads, 1)

    # ------------------------------------------------------------------ derived
    def grad_accum_steps(self, n_genes: int, world_size: int = 1) -> int:
        """Micro-steps per optimiser step so one step sees ~``target_tokens_per_step``.

        Tokens of one micro-step across all processes = micro batch x genes x processes,
        so the global batch (and the optimisation) does not change with the process count
        whenever the micro batch is scaled down accordingly.
        """
        target = self.optim.target_tokens_per_step
        if target is None:
            return 1
        per_micro_step = self.optim.micro_batch_size * n_genes * world_size
        return max(1, math.ceil(target / per_micro_step))
