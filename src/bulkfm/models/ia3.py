"""IA3 adapters for BulkRNABert (Liu et al. 2022, "(IA)^3"), as the paper fine-tunes it.

Every block gets three learned vectors, initialised to 1 so an adapted model starts as
exactly the pre-trained one:

- ``l_k`` and ``l_v`` (``num_heads * key_size`` each) scale the keys and values, i.e. the
  outputs of ``mha.w_k`` and ``mha.w_v`` (bias included);
- ``l_ff`` (``ffn_embed_dim``) scales the FFN hidden activation, i.e. the input of ``fc2``.

Everything else in the encoder is frozen, so 4 blocks x (256 + 256 + 512) = 4,096
parameters train on the ~6M-parameter official model (< 0.07%), plus the task head.

Why not HF ``peft``: its ``IA3Config(target_modules=["w_k", "w_v", "fc2"],
feedforward_modules=["fc2"])`` does work on this plain ``nn.Module`` (identity at init,
merge and adapter state dicts all checked), but it installs ``transformers`` and about a
dozen further packages, adds seconds of import time, renames every wrapped base tensor
(``w_k.weight`` -> ``w_k.base_layer.weight``, under ``base_model.model.``) so base
checkpoints no longer load by name, and wraps the model in a ``PeftModel``. The method
is a few element-wise products, so it is written here in the torchtune style instead:
adapter modules, :func:`get_adapter_params` and :func:`set_trainable_params`.

The adapter modules *share* the base ``weight``/``bias`` Parameters and keep their
names, so an adapted model's state dict is the base state dict plus ``*.ia3_l`` keys:
a pre-trained checkpoint still loads by name, and :func:`merge_ia3` gives back a plain
:class:`~bulkfm.models.bulkrnabert.BulkRNABert` that ``save_pretrained`` can write.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from bulkfm.errors import CheckpointError, ConfigError
from bulkfm.io import atomic_path
from bulkfm.models.bulkrnabert import BulkRNABert, BulkRNABertLayer

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_KEY",
    "IA3Linear",
    "IA3Scale",
    "apply_ia3",
    "count_parameters",
    "get_adapter_params",
    "has_ia3",
    "ia3_state_dict",
    "load_ia3",
    "merge_ia3",
    "save_ia3",
    "set_trainable_params",
]

ADAPTER_KEY = "ia3_l"  # name of every IA3 vector in the state dict


class IA3Linear(nn.Module):
    """A Linear whose output is scaled feature-wise by a learned vector ``ia3_l``.

    Holds the wrapped layer's own ``weight`` and ``bias`` Parameters (not copies) under
    the same names, so state-dict keys and parameter identity are unchanged.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.ia3_l = nn.Parameter(
            torch.ones(base.out_features, dtype=base.weight.dtype, device=base.weight.device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * self.ia3_l

    def merged(self) -> nn.Linear:
        """Plain Linear computing the same function: rows of W and b scaled by ``ia3_l``."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight * self.ia3_l[:, None])
            if self.bias is not None:
                linear.bias.copy_(self.bias * self.ia3_l)
        linear.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class IA3Scale(nn.Module):
    """Wraps a parameter-free activation and scales its output by ``ia3_l``."""

    def __init__(self, activation: nn.Module, size: int, *, like: torch.Tensor) -> None:
        super().__init__()
        self.activation = activation
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=like.dtype, device=like.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x) * self.ia3_l


# --------------------------------------------------------------------------- apply / params
def _blocks(model: nn.Module) -> list[BulkRNABertLayer]:
    blocks = [m for m in model.modules() if isinstance(m, BulkRNABertLayer)]
    if not blocks:
        raise ConfigError(
            f"{type(model).__name__} contains no BulkRNABert transformer block; IA3 applies "
            "to a BulkRNABert (or a module holding one)"
        )
    return blocks


def has_ia3(model: nn.Module) -> bool:
    """Whether IA3 adapters are present (all blocks are adapted together by apply_ia3)."""
    return any(isinstance(m, IA3Linear | IA3Scale) for m in model.modules())


def apply_ia3(model: nn.Module, *, freeze: bool = True) -> nn.Module:
    """Add IA3 vectors (all ones) to every BulkRNABert block, in place; returns ``model``.

    With ``freeze`` (the IA3 recipe) only the adapter vectors stay trainable; unfreeze a
    task head afterwards with :func:`set_trainable_params`.
    """
    blocks = _blocks(model)
    if has_ia3(model):
        raise ConfigError(
            "the model already has IA3 adapters; apply_ia3 once (merge_ia3 removes them)"
        )
    for block in blocks:
        # Plain Linears here: has_ia3 above rules out blocks that were adapted already.
        block.mha.w_k = IA3Linear(cast(nn.Linear, block.mha.w_k))
        block.mha.w_v = IA3Linear(cast(nn.Linear, block.mha.w_v))
        block.activation = IA3Scale(block.activation, block.fc2.in_features, like=block.fc2.weight)
    if freeze:
        set_trainable_params(model, get_adapter_params(model))
    counts = count_parameters(model)
    logger.info(
        "IA3 added to %d blocks: %d adapter parameters of %d (%.4f%%)",
        len(blocks),
        counts["adapter"],
        counts["total"],
        100 * counts["adapter"] / max(counts["total"], 1),
    )
    return model


def get_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> Parameter of every IA3 vector (names as in ``model.named_parameters``)."""
    return {
        name: p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == ADAPTER_KEY
    }


def set_trainable_params(model: nn.Module, trainable: Mapping[str, nn.Parameter]) -> None:
    """Make exactly the parameters named in ``trainable`` require gradients."""
    names = dict(model.named_parameters())
    unknown = sorted(set(trainable) - set(names))
    if unknown:
        raise ConfigError(
            f"set_trainable_params: {unknown[:5]} are not parameters of the model; pass names "
            "from model.named_parameters() (e.g. get_adapter_params(model))"
        )
    for name, p in names.items():
        p.requires_grad_(name in trainable)


def count_parameters(model: nn.Module) -> dict[str, int | float]:
    """Trainable, total and adapter parameter counts, and the trainable fraction."""
    params = list(model.parameters())  # shared tensors are yielded once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    adapter = sum(p.numel() for p in get_adapter_params(model).values())
    return {
        "trainable": trainable,
        "total": total,
        "fraction": trainable / total if total else 0.0,
        "adapter": adapter,
    }


# --------------------------------------------------------------------------- state dicts
def _encoder_prefixes(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, BulkRNABert)]


def _outside_encoders(name: str, prefixes: list[str]) -> bool:
    return not any(prefix == "" or name.startswith(prefix + ".") for prefix in prefixes)


def ia3_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What IA3 training changed: the adapter vectors plus every tensor outside the
    BulkRNABert encoder(s) (the task head). The frozen encoder is left out, so a
    fine-tuned task is kilobytes on top of the shared pre-trained checkpoint."""
    if not has_ia3(model):
        raise ConfigError("the model has no IA3 adapters; call apply_ia3(model) first")
    prefixes = _encoder_prefixes(model)
    return {
        name: t.detach()
        for name, t in model.state_dict().items()
        if name.rsplit(".", 1)[-1] == ADAPTER_KEY or _outside_encoders(name, prefixes)
    }


def save_ia3(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write :func:`ia3_state_dict` to a safetensors file (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu().contiguous() for k, v in ia3_state_dict(model).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "bulkfm.ia3/1"})
    return path


def load_ia3(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapter (+ head) weights saved by :func:`save_ia3` into ``model``, in place.

    The encoder must be the one the adapters were trained on (only IA3 vectors and head
    are stored). Adapters are added first when the model has none.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"IA3 weights file {path} does not exist; write it with save_ia3")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path}: {exc}; the file is damaged") from exc
    if not has_ia3(model):
        apply_ia3(model)
    expected = ia3_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model: missing {missing[:5]} ({len(missing)} in all), "
            f"unexpected {unexpected[:5]} ({len(unexpected)} in all); build the same "
            "architecture (number of blocks, head sizes) the adapters were saved from"
        )
    for key, target in expected.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the model "
                f"expects {tuple(target.shape)}; the encoder config or head sizes differ"
            )
    model.load_state_dict(tensors, strict=False)
    return model


# --------------------------------------------------------------------------- merging
def merge_ia3(model: nn.Module) -> nn.Module:
    """Fold every IA3 vector into the weights and remove the adapters, in place.

    ``(W x + b) * l`` = ``(diag(l) W) x + l * b`` for keys/values, and
    ``W2 (l * a) + b2`` = ``(W2 diag(l)) a + b2`` for the FFN, so the merged model
    computes the same function at no extra cost and is a plain BulkRNABert again.
    """
    if not has_ia3(model):
        raise ConfigError("the model has no IA3 adapters to merge; call apply_ia3 first")
    for block in _blocks(model):
        for name in ("w_k", "w_v"):
            module = getattr(block.mha, name)
            if isinstance(module, IA3Linear):
                setattr(block.mha, name, module.merged())
        if isinstance(block.activation, IA3Scale):
            with torch.no_grad():
                block.fc2.weight.mul_(block.activation.ia3_l[None, :])
            block.activation = block.activation.activation
    return model
