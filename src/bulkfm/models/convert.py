"""Official JAX/Haiku BulkRNABert parameters -> this project's PyTorch state dict.

The release ships ``params.joblib``: a pickled ``{module_path: {param_name: array}}``.
Every rename lives in :func:`haiku_key_map`, one table, so a reader can check the
correspondence in one place. Haiku ``Linear.w`` is ``[in, out]`` (PyTorch stores
``[out, in]``) and LayerNorm calls its parameters ``scale``/``offset``.

Unpickling runs code chosen by whoever wrote the file, so reading ``params.joblib``
requires an explicit ``trust_pickle=True``.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bulkfm.errors import CheckpointError
from bulkfm.models.bulkrnabert import BulkRNABert, BulkRNABertConfig

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "bulk_bert"
# Haiku sub-module path inside ``{root}/self_attention_block_{i}/~/`` -> PyTorch module.
_BLOCK_MODULES: dict[str, str] = {
    "self_attention/query": "mha.w_q",
    "self_attention/key": "mha.w_k",
    "self_attention/value": "mha.w_v",
    "self_attention/mha_output": "mha.output",
    "fc1": "fc1",
    "fc2": "fc2",
    "self_attention_layer_norm": "layer_norm_self_attention",
    "final_layer_norm": "layer_norm_mlp",
}
# Haiku sub-module path inside ``{root}/~/`` -> PyTorch module.
_TOP_MODULES: dict[str, str] = {
    "expression_embedding": "expression_embedding_layer",
    "gene_embedding": "gene_embedding_layer",
    "linear": "fc_gene_embedding",
    "simple_lm_head/~/lm_final_fc": "lm_head",
}
_LINEAR_PARAMS: dict[str, str] = {"w": "weight", "b": "bias"}
_LAYER_NORM_PARAMS: dict[str, str] = {"scale": "weight", "offset": "bias"}
_EMBED_PARAMS: dict[str, str] = {"embeddings": "weight"}


def haiku_key_map(num_layers: int, root: str = DEFAULT_ROOT) -> dict[tuple[str, str], str]:
    """``(haiku module path, haiku param) -> PyTorch state-dict key``, the whole model."""
    mapping: dict[tuple[str, str], str] = {}

    def add(haiku_module: str, torch_module: str) -> None:
        leaf = haiku_module.rsplit("/", 1)[-1]
        if "embedding" in leaf:
            params = _EMBED_PARAMS
        elif "layer_norm" in leaf:
            params = _LAYER_NORM_PARAMS
        else:
            params = _LINEAR_PARAMS
        for haiku_param, torch_param in params.items():
            mapping[(haiku_module, haiku_param)] = f"{torch_module}.{torch_param}"

    for haiku_module, torch_module in _TOP_MODULES.items():
        add(f"{root}/~/{haiku_module}", torch_module)
    for i in range(num_layers):
        for haiku_module, torch_module in _BLOCK_MODULES.items():
            add(
                f"{root}/self_attention_block_{i}/~/{haiku_module}",
                f"transformer_layers.{i}.{torch_module}",
            )
    return mapping


def needs_transpose(haiku_param: str) -> bool:
    """Only Linear kernels change layout between Haiku ([in, out]) and PyTorch ([out, in])."""
    return haiku_param == "w"


# --------------------------------------------------------------------------- reading
def load_haiku_params(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, dict]:
    """Read an official ``params.joblib`` (a pickle) after an explicit opt-in."""
    path = Path(path)
    if not trust_pickle:
        raise CheckpointError(
            f"{path} is a pickle (joblib) file, and loading a pickle can execute arbitrary "
            "code written into it. Only if you trust where it came from (e.g. the official "
            "InstaDeep release, checksum verified), pass trust_pickle=True; otherwise use a "
            "model.safetensors checkpoint, which holds only tensors"
        )
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: give the path of params.joblib")
    try:
        try:
            import joblib
        except ImportError:
            with path.open("rb") as handle:
                params = pickle.load(handle)  # explicit trust_pickle opt-in above
        else:
            params = joblib.load(path)
    except ModuleNotFoundError as exc:
        raise CheckpointError(
            f"{path} refers to the module {exc.name!r}, which is not installed; the official "
            "params may hold JAX arrays: install jax (CPU) to read them, then convert once"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"cannot unpickle {path}: {exc}; the file is damaged") from exc
    return _check_tree(params, str(path))


def _check_tree(params: Any, source: str) -> dict[str, dict]:
    if not isinstance(params, Mapping) or not all(isinstance(v, Mapping) for v in params.values()):
        raise CheckpointError(
            f"{source} is not a Haiku parameter tree ({{module_path: {{param: array}}}}); "
            "give the params.joblib of the official JAX release"
        )
    return {str(k): dict(v) for k, v in params.items()}


def _root_of(params: Mapping[str, Any]) -> str:
    roots = {key.split("/", 1)[0] for key in params}
    if len(roots) != 1:
        raise CheckpointError(
            f"Haiku parameters have several root modules {sorted(roots)[:5]}; expected one "
            f"('{DEFAULT_ROOT}') holding the whole model"
        )
    return roots.pop()


def infer_config(
    params: Mapping[str, Mapping[str, Any]],
    *,
    num_attention_heads: int = 8,
    n_special_tokens: int = 1,
) -> BulkRNABertConfig:
    """Architecture from tensor shapes; the head count is not in the shapes, so it is given."""
    root = _root_of(params)
    try:
        expression = np.shape(params[f"{root}/~/expression_embedding"]["embeddings"])
        gene = np.shape(params[f"{root}/~/gene_embedding"]["embeddings"])
        fc1 = np.shape(params[f"{root}/self_attention_block_0/~/fc1"]["w"])
        query = np.shape(params[f"{root}/self_attention_block_0/~/self_attention/query"]["w"])
    except KeyError as exc:
        raise CheckpointError(
            f"Haiku parameters lack {exc}; is this a BulkRNABert params file?"
        ) from exc
    pattern = re.compile(rf"^{re.escape(root)}/self_attention_block_(\d+)/")
    blocks = {int(m.group(1)) for key in params if (m := pattern.match(key))}
    inner = query[1]
    if inner % num_attention_heads:
        raise CheckpointError(
            f"query projection width {inner} is not divisible by num_attention_heads="
            f"{num_attention_heads}; give the head count of this checkpoint"
        )
    return BulkRNABertConfig(
        n_genes=gene[0],
        n_expressions_bins=expression[0],
        embed_dim=expression[1],
        init_gene_embed_dim=gene[1],
        use_gene_embedding=True,
        project_gene_embedding=True,
        num_attention_heads=num_attention_heads,
        key_size=inner // num_attention_heads,
        ffn_embed_dim=fc1[1],
        num_layers=len(blocks),
        n_special_tokens=n_special_tokens,
    )


def haiku_to_state_dict(
    params: Mapping[str, Mapping[str, Any]], num_layers: int
) -> dict[str, torch.Tensor]:
    """Rename and re-layout every parameter; extra or absent Haiku parameters are errors."""
    params = _check_tree(params, "the parameter tree")
    key_map = haiku_key_map(num_layers, _root_of(params))
    present = {(module, name) for module, group in params.items() for name in group}
    absent = sorted(set(key_map) - present)
    unknown = sorted(present - set(key_map))
    if absent or unknown:
        raise CheckpointError(
            f"Haiku parameters do not match a {num_layers}-block BulkRNABert: absent "
            f"{[f'{m}:{p}' for m, p in absent[:8]]} ({len(absent)} in all), unknown "
            f"{[f'{m}:{p}' for m, p in unknown[:8]]} ({len(unknown)} in all)"
        )
    state_dict = {}
    for (module, name), torch_key in key_map.items():
        array = np.asarray(params[module][name], dtype=np.float32)
        if needs_transpose(name):
            array = array.T
        state_dict[torch_key] = torch.from_numpy(np.ascontiguousarray(array))
    return state_dict


def model_from_haiku(
    params: Mapping[str, Mapping[str, Any]],
    *,
    config: BulkRNABertConfig | None = None,
    num_attention_heads: int = 8,
) -> BulkRNABert:
    """A :class:`BulkRNABert` (eval mode) holding the Haiku weights, [MASK] row padded."""
    params = _check_tree(params, "the parameter tree")
    if config is None:
        config = infer_config(params, num_attention_heads=num_attention_heads)
    state_dict = haiku_to_state_dict(params, config.num_layers)
    model = BulkRNABert(config)
    model.load_checked_state_dict(state_dict, strict=True, source="Haiku parameters")
    return model.eval()


def convert_haiku_to_safetensors(
    params_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    trust_pickle: bool = False,
    num_attention_heads: int = 8,
    genes: Sequence[str] | str | os.PathLike | None = None,
    normalization_factor: float | None = None,
) -> Path:
    """Convert ``params.joblib`` once into a pickle-free checkpoint directory.

    With ``genes`` and ``normalization_factor`` the directory also gets tokenizer.json
    and loads with ``bulkfm.models.load_pretrained(out_dir)`` alone.
    """
    params = load_haiku_params(params_path, trust_pickle=trust_pickle)
    model = model_from_haiku(params, num_attention_heads=num_attention_heads)
    tokenizer = None
    if (genes is None) != (normalization_factor is None):
        raise CheckpointError(
            "give both genes and normalization_factor (to write tokenizer.json) or neither"
        )
    if genes is not None and normalization_factor is not None:
        from bulkfm.tokenize import BinTokenizer, TokenizerConfig, as_gene_list

        tokenizer = BinTokenizer(
            TokenizerConfig(
                genes=as_gene_list(genes),
                normalization_factor=normalization_factor,
                n_bins=model.config.n_expressions_bins,
            )
        )
    out = model.save_pretrained(out_dir, tokenizer=tokenizer)
    logger.info("converted %s -> %s (%d parameters)", params_path, out, model.num_parameters())
    return out
