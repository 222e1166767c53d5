"""BulkRNABert in PyTorch: config, encoder, MLM head and checkpoint I/O.

Same architecture and parameter names as the authors' PyTorch port, so their
``model.safetensors`` + ``config.json`` load without renaming and give the same outputs:

    tokens [B, G] -> expression_embedding_layer (bins + [MASK]) ------------------+
    gene ids [G]  -> gene_embedding_layer (Gene2Vec-sized) -> fc_gene_embedding --(+)
                  -> num_layers x pre-LN block: x + MHA(LN(x)); x + FFN(LN(x))
                  -> lm_head (no final LayerNorm) -> logits over the expression bins

Gene identity is the position, so there is no positional encoding; attention has no
mask (every gene of a sample is real). The only addition to the official model is the
[MASK] row(s) of the expression embedding, which the release lacks: official 64-row
weights are padded on load (see ``_pad_special_rows``).

IA3 hook points (kept as separate modules so adapters can wrap them without
touching this file): ``mha.w_k`` and ``mha.w_v`` outputs are the keys and values, and
``activation`` output in each block is the FFN hidden activation before ``fc2``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bulkfm.errors import BulkfmWarning, CheckpointError, ConfigError, GeneMappingError
from bulkfm.io import atomic_path, write_text
from bulkfm.models import cpu_attention
from bulkfm.models.config import (  # noqa: F401  (re-exported: the model's config)
    CONFIG_FORMAT,
    OFFICIAL_CONFIG_FIELDS,
    BulkRNABertConfig,
)

if TYPE_CHECKING:
    from bulkfm.tokenize import BinTokenizer

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# Most rows (batch x gene positions) the feed-forward takes at once without autograd:
# its two [rows, 512] fp32 temporaries then stay under 2 x 32 MB instead of 2 x 0.3 GB
# for a batch of 8 full-length samples. Chunks are this tall so GEMMs keep their full
# speed and so few parallel regions are added (each costs a thread wake-up, which on an
# oversubscribed CPU is a scheduler time slice).
FFN_CHUNK_ROWS = 16384


# --------------------------------------------------------------------------- outputs
@dataclass
class BulkRNABertOutput:
    """``hidden_states[0]`` is the embedding sum; ``hidden_states[i]`` the output of block i."""

    logits: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: dict[int, torch.Tensor] | None = None
    attentions: list[torch.Tensor] | None = None


# --------------------------------------------------------------------------- modules
class BulkRNABertAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/output projections.

    Runs through ``scaled_dot_product_attention`` (flash/memory-efficient kernels, no
    G x G matrix held) unless attention maps are requested for interpretation. CPU
    inference with head size 32 uses :mod:`bulkfm.models.cpu_attention` instead (faster;
    its error against float64 is SDPA's at every length, measured 2.9e-6 vs 2.8e-6 at
    19,062 genes, and is tested at 4,096; ``BULKFM_CPU_ATTENTION=off`` turns it off).
    """

    def __init__(self, embed_dim: int, num_heads: int, key_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_size = key_size
        inner = num_heads * key_size
        self.w_q = nn.Linear(embed_dim, inner)
        # Typed as any module: models.ia3 swaps keys/values (and the activation) for
        # scaled wrappers in place.
        self.w_k: nn.Module = nn.Linear(embed_dim, inner)
        self.w_v: nn.Module = nn.Linear(embed_dim, inner)
        self.output = nn.Linear(inner, embed_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.num_heads, self.key_size).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self._heads(self.w_q(x))
        k = self._heads(self.w_k(x))
        v = self._heads(self.w_v(x))
        weights = None
        if output_attentions:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.key_size)
            weights = scores.softmax(dim=-1)
            context = weights @ v
        elif cpu_attention.applies(q, k, v):
            # CPU inference with head size 32: bulkfm's own exact kernel (faster than
            # torch's flash kernel for this head size, same bounded memory).
            context = cpu_attention.attention(q, k, v)
        else:
            # q/k/v stay strided views of the projections: the CPU flash kernel reads
            # them in place and writes its output in [batch, length, heads, key] order,
            # so neither side needs a transpose copy.
            context = F.scaled_dot_product_attention(q, k, v)
        del q, k, v  # let inference free them before the output projection allocates
        batch, _, length, _ = context.shape
        context = context.transpose(1, 2).reshape(batch, length, self.num_heads * self.key_size)
        return self.output(context), weights


class BulkRNABertLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + MHA(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, config: BulkRNABertConfig) -> None:
        super().__init__()
        assert config.key_size is not None  # resolved by the config
        dim = config.embed_dim
        self.layer_norm_self_attention = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mha = BulkRNABertAttention(dim, config.num_attention_heads, config.key_size)
        self.layer_norm_mlp = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(dim, config.ffn_embed_dim)
        self.activation: nn.Module = nn.GELU(approximate="none")
        self.fc2 = nn.Linear(config.ffn_embed_dim, dim)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(self.layer_norm_mlp(x))))

    def forward(
        self, x: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.mha(self.layer_norm_self_attention(x), output_attentions)
        if (
            torch.is_grad_enabled()
            or not attended.is_contiguous()
            or attended.dtype != x.dtype  # autocast: the residual stays in x's precision
        ):
            x = x + attended
            return x + self.mlp(x), weights
        # Without autograd the branch outputs are fresh and unreferenced: sum into them
        # instead of allocating, and run the position-wise FFN over row chunks so its
        # [rows, ffn_embed_dim] temporaries stay small whatever batch x genes is. Same
        # arithmetic, so the same outputs (the input x is never modified: callers may
        # hold it as a hidden state).
        x = attended.add_(x)
        rows = x.view(-1, x.shape[-1])
        n_chunks = -(-rows.shape[0] // FFN_CHUNK_ROWS)
        step = -(-rows.shape[0] // max(n_chunks, 1))  # even chunks, no ragged tail
        for start in range(0, rows.shape[0], max(step, 1)):
            part = rows[start : start + step]
            part.add_(self.mlp(part))
        return x, weights


POOLINGS = ("mean", "max")
"""How :meth:`BulkRNABert.embed` pools one layer's genes into a sample vector."""


def _pool(x: torch.Tensor, keep: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """[B, G, D] -> [B, D] over the genes where ``keep`` [B, G] is True (all if None)."""
    if pooling == "max":
        if keep is not None:
            x = x.masked_fill(~keep.unsqueeze(-1), -torch.inf)
        pooled = x.max(dim=1).values
        return torch.where(torch.isfinite(pooled), pooled, torch.zeros_like(pooled))
    if keep is None:
        return x.mean(dim=1)
    weights = keep.to(x.dtype)
    # [B, 1, G] @ [B, G, D]: the masked sum without a [B, G, D] product tensor.
    total = torch.bmm(weights.unsqueeze(1), x).squeeze(1)
    return total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)


# --------------------------------------------------------------------------- model
class BulkRNABert(nn.Module):
    """Encoder + MLM head over a fixed gene vocabulary (see module docstring)."""

    def __init__(self, config: BulkRNABertConfig) -> None:
        super().__init__()
        self.config = config
        self.expression_embedding_layer = nn.Embedding(config.vocab_size, config.embed_dim)
        # Always created (as in the official port) so state dicts have the same keys
        # whatever use_gene_embedding / project_gene_embedding say.
        self.gene_embedding_layer = nn.Embedding(config.n_genes, config.init_gene_embed_dim)
        self.fc_gene_embedding = nn.Linear(config.init_gene_embed_dim, config.embed_dim)
        self.transformer_layers = nn.ModuleList(
            BulkRNABertLayer(config) for _ in range(config.num_layers)
        )
        self.lm_head = nn.Linear(config.embed_dim, config.n_expressions_bins)
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_pad_special_rows_hook)

    def reset_parameters(self) -> None:
        """BERT-style init: N(0, 0.02) weights and embeddings, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        gene_index: torch.Tensor | None = None,
        output_hidden_states: bool | Sequence[int] = False,
        output_attentions: bool = False,
    ) -> BulkRNABertOutput:
        """tokens: [B, G] bin ids (``mask_token_id`` for [MASK]).

        ``gene_index`` [G] names the vocabulary genes of the G positions (default: all
        ``n_genes`` in order), so a full-vocabulary model can run on a gene subset.
        """
        keep = self._layers_to_keep(output_hidden_states)
        x, hidden_states, attentions = self._encode(
            tokens, gene_index, keep, output_attentions, self.config.num_layers
        )
        return BulkRNABertOutput(
            logits=self.lm_head(x),
            last_hidden_state=x,
            hidden_states=hidden_states if keep else None,
            attentions=attentions if output_attentions else None,
        )

    def hidden_state(
        self, tokens: torch.Tensor, *, gene_index: torch.Tensor | None = None, layer: int = -1
    ) -> torch.Tensor:
        """One layer's output [B, G, D], running only the blocks up to it (no LM head).

        ``layer`` indexes [embeddings, block 1, ..., block L]. Gradients flow, so
        fine-tuning heads can pool it.
        """
        depth = self._normalise_layer(layer)
        x, _, _ = self._encode(tokens, gene_index, set(), False, depth)
        return x

    @torch.no_grad()
    def embed(
        self,
        tokens: torch.Tensor,
        *,
        gene_index: torch.Tensor | None = None,
        layer: int = -1,
        exclude_mask: bool = True,
        layers: Sequence[int] | None = None,
        pooling: str = "mean",
    ) -> torch.Tensor:
        """Sample embeddings [B, D] (or [B, D x len(layers)]): genes pooled per layer.

        ``layer`` indexes [embeddings, block 1, ..., block L] (so -1 = last block, as in
        the paper). ``layers`` (overrides ``layer``) concatenates several layers' pooled
        outputs in the order given: the last block alone keeps what the MLM head needs,
        earlier blocks keep more of the input, so the concatenation tests whether a probe
        gains from both. ``pooling`` is "mean" (the paper) or "max" (per dimension, the
        strongest gene; it keeps a rare high-expression signal that a mean dilutes).
        [MASK] positions are left out by default because they carry no measurement.
        """
        if pooling not in POOLINGS:
            raise ConfigError(
                f"pooling must be one of {list(POOLINGS)}, got {pooling!r} (--model-arg "
                "NAME:pooling=mean / pooling= in Python)"
            )
        depths = [self._normalise_layer(i) for i in (layers if layers is not None else [layer])]
        if not depths:
            raise ConfigError("layers is empty; name at least one layer, e.g. layers=[-1]")
        out = self._encode(tokens, gene_index, set(depths), False, max(depths))[1]
        keep = (tokens != self.config.mask_token_id) if exclude_mask else None
        return torch.cat([_pool(out[d], keep, pooling) for d in depths], dim=-1)

    def embed_inputs(self, tokens: torch.Tensor, gene_index: torch.Tensor | None) -> torch.Tensor:
        """Expression embedding + (projected) gene embedding: the input of block 1."""
        x = self.expression_embedding_layer(tokens)
        if self.config.use_gene_embedding:
            if gene_index is None:
                gene_index = torch.arange(self.config.n_genes, device=tokens.device)
            genes = self.gene_embedding_layer(gene_index)
            if self.config.project_gene_embedding:
                genes = self.fc_gene_embedding(genes)
            # The embedding lookup is a fresh tensor: add in place when no graph is built
            # (and the sum keeps x's dtype, as under autocast with fp32 embeddings).
            in_place = not torch.is_grad_enabled() and (
                torch.promote_types(x.dtype, genes.dtype) == x.dtype
            )
            x = x.add_(genes) if in_place else x + genes
        return x

    def _encode(
        self,
        tokens: torch.Tensor,
        gene_index: torch.Tensor | None,
        keep: set[int],
        output_attentions: bool,
        depth: int,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], list[torch.Tensor]]:
        self._check_inputs(tokens, gene_index)
        x = self.embed_inputs(tokens, gene_index)
        hidden_states: dict[int, torch.Tensor] = {0: x} if 0 in keep else {}
        attentions: list[torch.Tensor] = []
        use_checkpoint = (
            self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        )
        for i, layer in enumerate(self.transformer_layers[:depth], start=1):
            if use_checkpoint:
                x, weights = checkpoint(layer, x, output_attentions, use_reentrant=False)
            else:
                x, weights = layer(x, output_attentions)
            if i in keep:
                hidden_states[i] = x
            if weights is not None:
                attentions.append(weights)
        return x, hidden_states, attentions

    def _layers_to_keep(self, requested: bool | Sequence[int]) -> set[int]:
        if isinstance(requested, bool):
            return set(range(self.config.num_layers + 1)) if requested else set()
        return {self._normalise_layer(i) for i in requested}

    def _normalise_layer(self, layer: int) -> int:
        n = self.config.num_layers
        if not -(n + 1) <= layer <= n:
            raise ConfigError(
                f"layer {layer} does not exist in a model of {n} block(s): pass --layer "
                f"(layer= in Python) from 0 (embeddings) to {n} (last block), or a negative "
                f"index down to {-(n + 1)} (-1 = last block)"
            )
        return layer % (n + 1)

    def _check_inputs(self, tokens: torch.Tensor, gene_index: torch.Tensor | None) -> None:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ConfigError(
                f"tokens must be an integer tensor [batch, genes], got {tokens.dtype} with "
                f"shape {tuple(tokens.shape)}; make them with BinTokenizer.encode"
            )
        n_positions = tokens.shape[1]
        if gene_index is None:
            if self.config.use_gene_embedding and n_positions != self.config.n_genes:
                raise GeneMappingError(
                    f"tokens have {n_positions} gene positions but the model has "
                    f"{self.config.n_genes} genes; pass gene_index (vocabulary index of each "
                    "position) to run on a gene subset"
                )
        else:
            if gene_index.ndim != 1 or gene_index.shape[0] != n_positions:
                raise GeneMappingError(
                    f"gene_index must be 1-D with one entry per token position "
                    f"({n_positions}), got shape {tuple(gene_index.shape)}"
                )
            if not torch.compiler.is_compiling() and gene_index.numel():
                lo, hi = int(gene_index.min()), int(gene_index.max())
                if lo < 0 or hi >= self.config.n_genes:
                    raise GeneMappingError(
                        f"gene_index values must lie in 0..{self.config.n_genes - 1}, got "
                        f"{lo}..{hi}; index genes by their position in the tokenizer gene list"
                    )
        if not torch.compiler.is_compiling() and tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bins, mask = self.config.n_expressions_bins, self.config.mask_token_id
                raise CheckpointError(
                    f"token ids must lie in 0..{self.config.vocab_size - 1}, got {lo}..{hi}: "
                    f"0..{bins - 1} are the {bins} expression bins and {mask} is [MASK] "
                    f"(missing or masked genes). Ids outside that range come from a tokenizer "
                    "of another bin count or another vocabulary; make the tokens with the "
                    "model's own tokenizer: bulkfm.tokenize.BinTokenizer.load(<checkpoint "
                    "dir>).encode(tpm), or the tokenizer load_pretrained returns"
                )
            if not self.training:
                self._warn_if_official_ids(tokens)

    def _warn_if_official_ids(self, tokens: torch.Tensor) -> None:
        """Warn when [MASK] ids look like the official tokenizer's unclamped top bin.

        The official recipe gives ``n_bins`` (64) to values at or above the normalization
        factor, and the official model reads it as bin 63; here 64 is [MASK], so such
        tokens change the output (by several logits) without any error. A tensor cannot
        say where its 64s came from, so this is a heuristic for inference batches: a few
        [MASK]s (under 5% of tokens; MLM masks ~12%) that all sit at genes measured
        in the top eighth of the bins in the other samples of the batch, as saturated
        genes are. Masks for missing genes (whole columns, or genes at ordinary levels)
        do not trigger it.
        """
        mask_id = self.config.mask_token_id
        is_mask = tokens == mask_id
        n_mask = int(is_mask.sum())
        if n_mask == 0 or tokens.shape[0] < 2 or n_mask > 0.05 * tokens.numel():
            return
        high = self.config.n_expressions_bins - max(1, self.config.n_expressions_bins // 8)
        elsewhere = tokens.masked_fill(is_mask, -1).max(dim=0).values[is_mask.any(dim=0)]
        measured = elsewhere[elsewhere >= 0]
        if measured.numel() and bool((measured >= high).all()):
            warnings.warn(
                f"the tokens hold {n_mask} [MASK] id(s) ({mask_id}), all at genes that "
                f"reach bin {high} or more in other samples: they look like the official "
                f"tokenizer's unclamped top bin {mask_id} (values at or above the "
                f"normalization factor), which the official model reads as bin {mask_id - 1} "
                f"but this model reads as [MASK], changing its output. Make the tokens with "
                f"bulkfm.tokenize.BinTokenizer (it clamps them to {mask_id - 1}) or clamp "
                f"them: tokens.clamp(max={mask_id - 1}). If they are masks, ignore this.",
                BulkfmWarning,
                stacklevel=5,
            )

    # ------------------------------------------------------------------ state dicts
    def load_checked_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True, source: str = ""
    ) -> None:
        """``load_state_dict`` with errors that say which tensor or key is wrong."""
        where = f" in {source}" if source else ""
        state_dict = dict(state_dict)
        _pad_special_rows(self, state_dict, prefix="")
        expected = self.state_dict()
        missing, unexpected = check_state_shapes(
            {k: tuple(v.shape) for k, v in expected.items()},
            {k: tuple(v.shape) for k, v in state_dict.items()},
            strict=strict,
            where=where,
        )
        check_finite(state_dict, where=where)
        if missing or unexpected:
            logger.warning(
                "loaded non-strictly%s: %d missing keys %s, %d unexpected keys %s",
                where,
                len(missing),
                missing[:5],
                len(unexpected),
                unexpected[:5],
            )
        self.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(
        self, directory: str | os.PathLike, tokenizer: BinTokenizer | None = None
    ) -> Path:
        """config.json + model.safetensors (+ tokenizer.json), each written atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        if tokenizer is not None:
            check_tokenizer_matches(self.config, tokenizer)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        write_text(json.dumps(self.config.to_dict(), indent=1) + "\n", directory / CONFIG_FILE)
        if tokenizer is not None:
            tokenizer.save(directory)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        strict: bool = True,
        device: str | torch.device = "cpu",
        **overrides: Any,
    ) -> BulkRNABert:
        """Load a bulkfm or official-format directory; returned in eval mode.

        ``overrides`` replace config fields that do not change tensor shapes (e.g.
        ``gradient_checkpointing=True``).
        """
        from safetensors.torch import load_file

        device = resolve_device(device)
        directory = Path(directory)
        config = read_config(directory)
        if overrides:
            unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(config)})
            if unknown:
                raise ConfigError(
                    f"unknown config overrides {unknown}; use BulkRNABertConfig field names"
                )
            config = dataclasses.replace(config, **overrides)
        weights = directory / WEIGHTS_FILE
        if not weights.exists():
            raise CheckpointError(
                f"{directory} has no {WEIGHTS_FILE}; a checkpoint directory holds config.json "
                "and model.safetensors (convert a JAX params.joblib with "
                "bulkfm.models.convert.convert_haiku_to_safetensors)"
            )
        # Shapes from the file's header against the config's, before anything is
        # allocated: a config.json that does not belong to the weights (embed_dim=10**7)
        # is named here instead of failing to allocate the model it describes.
        check_state_shapes(
            expected_shapes(config),
            read_weight_shapes(weights),
            strict=strict,
            where=f" in {weights}",
            special_rows=config,
        )
        try:
            state_dict = load_file(str(weights), device=str(device))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {weights}: {exc}; the file is damaged") from exc
        model = cls(config).to(device)
        model.load_checked_state_dict(state_dict, strict=strict, source=str(weights))
        return model.eval()


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that exists on this machine, or a ConfigError that
    names the devices there are."""
    available = ["cpu"]
    if torch.cuda.is_available():
        available += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        available.append("mps")
    fix = (
        f"this machine has {', '.join(available)}; pass one of them with --device "
        "(device= in Python, model.device in an evaluate config)"
    )
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"--device {device} is not a torch device ({exc}); {fix}") from exc
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device} asks for a CUDA GPU but there is none: {fix}")
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(
                f"--device {device} asks for GPU {resolved.index} but there are {count}: {fix}"
            )
        return resolved
    if resolved.type == "mps" and torch.backends.mps.is_available():
        return resolved
    raise ConfigError(f"--device {device} is not available: {fix}")


def expected_shapes(config: BulkRNABertConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a model of ``config``, without allocating it (meta device)."""
    with torch.device("meta"):
        model = BulkRNABert(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors file's header, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"cannot read {path}: {exc}; the file is damaged (re-download or re-save it)"
        ) from exc


def check_state_shapes(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    *,
    strict: bool,
    where: str = "",
    special_rows: BulkRNABertConfig | None = None,
) -> tuple[list[str], list[str]]:
    """Compare a checkpoint's tensor names and shapes with a model's; returns (missing,
    unexpected) keys, raising CheckpointError on a shape mismatch (or, when ``strict``, on
    any missing or unexpected key). ``special_rows``: the model's config, when an
    official (bins-only) expression embedding is still to be padded."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint{where} does not match the model: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all), unexpected keys "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} "
            f"({len(unexpected)} in all); check that config.json belongs to these weights "
            "(num_layers, names), or load with strict=False to skip them"
        )
    for key, target in expected.items():  # model order: the first layer named first
        shape = found.get(key)
        if shape is None or tuple(shape) == tuple(target):
            continue
        if (
            special_rows is not None
            and key == "expression_embedding_layer.weight"
            and tuple(shape) == (special_rows.n_expressions_bins, target[1])
        ):
            continue  # official format: the [MASK] row is added on load
        raise CheckpointError(
            f"checkpoint{where} tensor {key!r} has shape {tuple(shape)} but the "
            f"config expects {tuple(target)}; config.json does not match "
            "these weights (compare n_genes, embed_dim, ffn_embed_dim, key_size, ...)"
        )
    return missing, unexpected


def check_finite(state_dict: Mapping[str, torch.Tensor], *, where: str = "") -> None:
    """Refuse weights holding NaN or inf, naming the tensors."""
    bad = [
        key
        for key, tensor in state_dict.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint{where} holds NaN or inf values in {len(bad)} tensor(s): {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}; the weights are damaged (or come from a run "
            "that diverged): re-download or re-convert them, or pass another checkpoint "
            "directory with --model"
        )


# --------------------------------------------------------------------------- loading helpers
def _pad_special_rows(module: BulkRNABert, state_dict: dict[str, Any], prefix: str) -> None:
    """Give an official (bins-only) expression embedding the rows of the special tokens.

    The release has no [MASK] row; starting it at the mean bin embedding puts [MASK] in
    the middle of what the model has seen, so an untuned model treats it as "average
    expression" rather than an arbitrary point.
    """
    key = prefix + "expression_embedding_layer.weight"
    weight = state_dict.get(key)
    config = module.config
    if weight is None or weight.ndim != 2 or weight.shape[0] != config.n_expressions_bins:
        return  # already has the special rows, or a shape error reported by the caller
    extra = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    state_dict[key] = torch.cat([weight, extra.expand(config.n_special_tokens, -1)], dim=0)
    logger.info(
        "expression embedding has %d rows (bins only, official format): added %d special "
        "row(s) initialised to the mean bin embedding",
        weight.shape[0],
        config.n_special_tokens,
    )


def _pad_special_rows_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    assert isinstance(module, BulkRNABert)
    _pad_special_rows(module, state_dict, prefix)


def read_config(directory: str | os.PathLike) -> BulkRNABertConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist; a checkpoint directory needs config.json (official field "
            "names) beside model.safetensors"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore the file") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object of config fields")
    try:
        return BulkRNABertConfig.from_dict(data)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a valid BulkRNABert config: {exc}") from exc


def check_tokenizer_matches(config: BulkRNABertConfig, tokenizer: BinTokenizer) -> None:
    """A tokenizer fits a model when it has the model's gene count and bin count."""
    if tokenizer.n_bins != config.n_expressions_bins:
        raise CheckpointError(
            f"tokenizer has {tokenizer.n_bins} bins but the model has "
            f"{config.n_expressions_bins} expression bins; use the tokenizer saved with the model"
        )
    if tokenizer.n_genes != config.n_genes:
        raise CheckpointError(
            f"tokenizer has {tokenizer.n_genes} genes but the model has n_genes="
            f"{config.n_genes}; give the gene list the checkpoint was trained with (model order)"
        )


def load_pretrained(
    directory: str | os.PathLike,
    *,
    genes: Sequence[str] | str | os.PathLike | None = None,
    normalization_factor: float | None = None,
    strict: bool = True,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> tuple[BulkRNABert, BinTokenizer]:
    """Model and tokenizer of a checkpoint directory or a Hugging Face Hub repo.

    ``directory`` is a local folder (it wins when it exists) or a repo id
    ``owner/name[@revision][:subfolder]`` fetched into the standard Hugging Face cache
    (``revision`` pins a branch, tag or commit; ``HF_HUB_OFFLINE=1`` uses the cache only),
    see :mod:`bulkfm.models.hub`. A bulkfm checkpoint carries tokenizer.json. An
    official-format one does not: then ``genes`` (a list or a file with one id a line,
    model order) and ``normalization_factor`` (5.547176906585117 for the official TCGA
    model) are required, except from an official repo (``InstaDeepAI/BulkRNABert``), whose
    genes and factor are known. Given alongside a tokenizer.json they must agree with it.
    """
    from bulkfm.models.hub import resolve_bulkrnabert
    from bulkfm.tokenize import (
        TOKENIZER_FILE,
        BinTokenizer,
        TokenizerConfig,
        as_gene_list,
        gene_overlap_report,
    )

    source = resolve_bulkrnabert(directory, revision=revision)
    directory = source.path
    if genes is None and source.genes is not None:
        genes = source.genes
    if normalization_factor is None:
        normalization_factor = source.normalization_factor
    model = BulkRNABert.from_pretrained(directory, strict=strict, device=device)
    gene_list = as_gene_list(genes) if genes is not None else None
    if (directory / TOKENIZER_FILE).exists():
        tokenizer = BinTokenizer.load(directory)
        if gene_list is not None and gene_list != tokenizer.genes:
            raise CheckpointError(
                "genes given differ from the checkpoint's tokenizer.json: "
                f"{gene_overlap_report(tokenizer.genes, gene_list)}; leave genes out to use "
                "the saved list"
            )
        if normalization_factor is not None and not math.isclose(
            normalization_factor, tokenizer.normalization_factor, rel_tol=1e-12
        ):
            raise CheckpointError(
                f"normalization_factor={normalization_factor} differs from the checkpoint's "
                f"{tokenizer.normalization_factor}; leave it out to use the saved value"
            )
    else:
        if gene_list is None or normalization_factor is None:
            raise CheckpointError(
                f"{directory} has no {TOKENIZER_FILE} (official-format checkpoint): pass "
                "genes=<gene list file or ids in model order> and normalization_factor=<max "
                "log10(1+TPM) of its training data>, e.g. the official TCGA model needs "
                "genes='bulkrnabert_gene_ids.txt', normalization_factor=5.547176906585117"
            )
        if len(gene_list) != model.config.n_genes:
            raise CheckpointError(
                f"gene list has {len(gene_list)} genes ({len(set(gene_list))} distinct) but the "
                f"checkpoint has n_genes={model.config.n_genes}; give the list the checkpoint "
                "was trained with"
            )
        tokenizer = BinTokenizer(
            TokenizerConfig(
                genes=gene_list,
                normalization_factor=normalization_factor,
                n_bins=model.config.n_expressions_bins,
            )
        )
    check_tokenizer_matches(model.config, tokenizer)
    return model, tokenizer
