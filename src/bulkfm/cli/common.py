"""Options several sub-commands share; importing this stays cheap (no torch).

Every command that runs from a config (pretrain, evaluate, bench, data build) takes
``--config FILE`` and ``--set KEY=VALUE`` here and loads its dataclass through
:func:`load_config`, so precedence and error messages are the same everywhere.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from bulkfm.config import load
from bulkfm.errors import ConfigError
from bulkfm.tokenize import DEFAULT_MIN_GENE_COVERAGE

T = TypeVar("T")

PRECEDENCE = "precedence, lowest first: built-in defaults, --config, command flags, --set"


def add_config_arguments(
    parser: argparse.ArgumentParser, what: str, example: str, *, required: bool = True
) -> None:
    """``--config`` (a YAML file) and repeatable ``--set KEY=VALUE`` into ``overrides``."""
    parser.add_argument("--config", required=required, type=Path, metavar="FILE", help=what)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one config entry (the value is read as YAML; repeatable), "
        f"e.g. {example}; {PRECEDENCE}",
    )


def given_flags(
    args: argparse.Namespace,
    keys: Mapping[str, str],
    convert: Mapping[str, Callable[[Any], Any]] | None = None,
) -> dict[str, tuple[str, Any]]:
    """The flags the user gave, as :func:`load_config` takes them.

    ``keys`` maps an argparse dest to its dotted config key; ``convert`` turns a dest's
    raw value first (e.g. a comma-separated string into a list). Unset flags (``None``
    after conversion) are left out, so the file's value stands; paths become strings.
    """
    out: dict[str, tuple[str, Any]] = {}
    for dest, key in keys.items():
        value = getattr(args, dest)
        if convert and dest in convert and value is not None:
            value = convert[dest](value)
        if value is not None:
            out[key] = (flag_name(dest), str(value) if isinstance(value, Path) else value)
    return out


def flag_name(dest: str) -> str:
    """``"test_size"`` -> ``"--test-size"``: the flag argparse stores under ``dest``."""
    return "--" + dest.replace("_", "-")


def load_config(
    cls: type[T],
    args: argparse.Namespace,
    *,
    flags: Mapping[str, tuple[str, Any]] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """The config dataclass ``cls`` from ``--config``, the command's flags and ``--set``.

    ``flags`` maps a dotted config key to ``(flag, value)`` for the flags the user gave;
    they override the file and ``--set`` overrides them. A value error in a key that a
    flag set names the flag, since that is what the user typed.
    """
    given = dict(flags or {})
    base: dict[str, Any] = {}
    for key, (_, value) in given.items():
        node = base
        *sections, leaf = key.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return load(
            cls,
            getattr(args, "config", None),
            getattr(args, "overrides", None) or (),
            defaults=defaults,
            base=base,
        )
    except ConfigError as exc:
        named = [flag for key, (flag, _) in given.items() if _mentions(str(exc), key)]
        if named:
            raise ConfigError(f"{exc} (set by {', '.join(named)})") from exc
        raise


def _mentions(message: str, key: str) -> bool:
    """Whether an error message is about ``key``: it starts with the key (dotted, or its
    last part after a ``section:`` prefix), as the config checks write them."""
    leaf = key.rsplit(".", 1)[-1]
    names = "|".join(re.escape(n) for n in (key, leaf))
    return re.match(rf"(?:[\w.]+: )?(?:{names})(?![\w.])", message) is not None


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and the extras an official-format checkpoint needs, plus --device."""
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint directory, or a Hugging Face repo id owner/name[:subfolder] (e.g. "
        "InstaDeepAI/BulkRNABert: its genes and normalisation factor are known), fetched "
        "into the Hugging Face cache; a local folder of that name wins",
    )
    parser.add_argument(
        "--revision",
        default=None,
        help="branch, tag or commit of a --model repo id to pin (default: main)",
    )
    parser.add_argument(
        "--genes", type=Path, default=None, help="gene list file (official-format checkpoints)"
    )
    parser.add_argument(
        "--normalization-factor",
        type=float,
        default=None,
        help="max log10(1+TPM) of the training data (official-format checkpoints)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--min-gene-coverage",
        type=float,
        default=DEFAULT_MIN_GENE_COVERAGE,
        metavar="FRACTION",
        help="smallest mean fraction of the checkpoint's genes the data must measure, overall "
        "and in each cohort and study (default %(default)s); the model's genes the data "
        "lacks are fed as [MASK] and left out of pooling",
    )


def load_checkpoint_and_input(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, tokenizer, AnnData) for a handler given add_checkpoint_arguments + --input."""
    from bulkfm.data.readers import read_h5ad
    from bulkfm.models.bulkrnabert import load_pretrained

    adata = read_h5ad(args.input, flag="--input")  # checked before the model loads
    model, tokenizer = load_pretrained(
        args.model,
        genes=args.genes,
        normalization_factor=args.normalization_factor,
        device=args.device,
        revision=args.revision,
    )
    return model, tokenizer, adata
