"""scLong's network sizes (``DualEncoderSCFM`` arguments) as a validated, torch-free config.

A module of its own because both the adapter (``sclong``, torch-free at import) and the
network (``sclong_net``, which imports torch) need it; keeping it in either made the two
import each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bulkfm.config import check_bool, check_int, check_number
from bulkfm.errors import CheckpointError, ConfigError

__all__ = ["MODEL", "SCLongConfig"]

MODEL = "scLong"

# DualEncoderSCFM arguments that do not change inference (training-only or host details).
_IGNORED = {
    "device",
    "gene2vec_file",
    "feature_redraw_interval",
    "auto_check_redraw",
    "emb_dropout",
    "ff_dropout",
    "attn_dropout",
    "ff_chunks",
    "kernel_fn",
    "local_window_size",
}
# Arguments whose non-default values select code paths not re-implemented here.
_UNSUPPORTED = {
    "local_attn_heads": 0,
    "causal": False,
    "reversible": False,
    "generalized_attention": False,
    "use_scalenorm": False,
    "use_rezero": False,
    "cross_attend": False,
    "no_projection": False,
}


@dataclass(frozen=True)
class SCLongConfig:
    """``DualEncoderSCFM`` sizes; defaults are the class defaults of the released code."""

    max_seq_len: int
    top_seq_len: int = 2048
    base_dim: int = 200
    mini_enc_depth: int = 1
    mini_enc_heads: int = 8
    mini_enc_dim_head: int = 64
    large_dim: int = 1280
    large_enc_depth: int = 50
    large_enc_heads: int = 10
    large_enc_dim_head: int = 128
    dec_depth: int = 1
    dec_heads: int = 8
    dec_dim_head: int = 64
    mask_token_thres: float = -1.0
    ff_mult: int = 4
    ff_glu: bool = False
    nb_features: int | None = None
    qkv_bias: bool = False
    g2v_position_emb: bool = True
    go_num_layers: int = 1
    go_use_gene2vec: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, name = getattr(self, f.name), f"{MODEL}: {f.name}"
            try:
                if f.type == "bool":
                    check_bool(name, value)
                elif f.type == "float":
                    check_number(name, value)
                elif value is not None or f.type != "int | None":
                    check_int(name, value, 1)
            except ConfigError as exc:
                raise CheckpointError(str(exc)) from exc
        if self.top_seq_len >= self.max_seq_len:
            raise CheckpointError(
                f"{MODEL}: top_seq_len {self.top_seq_len} must be below max_seq_len "
                f"{self.max_seq_len}; the hyper-parameter file is inconsistent"
            )

    @classmethod
    def from_release(cls, params: dict[str, Any]) -> SCLongConfig:
        """Sizes from the released hyper-parameter dict (graph entries dropped).

        Unknown keys, and non-default values for code paths not re-implemented,
        are errors: silently ignoring them would run a different network.
        """
        own = {f.name for f in dataclasses.fields(cls)}
        graph = {"G_go", "G_go_weight"}
        unknown = sorted(set(params) - own - _IGNORED - set(_UNSUPPORTED) - graph)
        if unknown:
            raise CheckpointError(
                f"{MODEL}: the hyper-parameters have keys this adapter does not know: {unknown}; "
                "is this the released DualEncoderSCFM hyper-parameter file?"
            )
        odd = {
            k: params[k]
            for k, default in _UNSUPPORTED.items()
            if k in params and params[k] != default and params[k] != (default,)
        }
        if odd:
            raise CheckpointError(
                f"{MODEL}: the hyper-parameters select options this adapter does not implement "
                f"{odd}; the released 1B model uses none of them"
            )
        if "max_seq_len" not in params:
            raise CheckpointError(f"{MODEL}: the hyper-parameters lack max_seq_len")
        return cls(**{k: v for k, v in params.items() if k in own})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
