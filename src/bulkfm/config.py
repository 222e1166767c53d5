"""One config system for every command: typed dataclasses, strict keys, ``--set`` overrides.

Pre-training, evaluation, the benchmark, ``data build`` and fine-tuning all read YAML
into a dataclass. Doing it once means every command rejects a misspelt key the same way
(naming the section, the valid keys and the closest one), reads ``1e-4`` as a number,
refuses ``flase`` as a boolean and takes ``--set a.b=v`` overrides.

Two layers, each with one home:

- :func:`build` turns the plain values of a YAML mapping into the field types of a
  (nested, possibly frozen) dataclass, read from its type hints;
- the ``check_*`` functions below are the value rules (positive integer, probability,
  non-empty string, choice) that each config's ``__post_init__`` applies, so a config
  built directly in Python is checked exactly like one read from a file. Cross-field
  rules stay in that ``__post_init__``.

The module is import-light (PyYAML only, imported when a file or override is read).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import numbers
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

from bulkfm.errors import ConfigError

__all__ = [
    "ConfigMixin",
    "apply_overrides",
    "build",
    "check_bool",
    "check_choice",
    "check_int",
    "check_nonempty_str",
    "check_number",
    "check_probability",
    "exclude",
    "load",
    "read_yaml",
    "to_dict",
]

T = TypeVar("T")

#: Field-metadata key: keys of a nested section that the YAML may not set, with why.
EXCLUDE = "bulkfm.config.exclude"
#: Strings that read as booleans (YAML 1.1 already turns the unquoted ones into bools).
_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})


# --------------------------------------------------------------------------- value checks
def _hint(hint: str) -> str:
    return f"; {hint}" if hint else ""


def check_int(name: str, value: Any, low: int | None = None, *, hint: str = "") -> int:
    """An integer (numpy ints too) >= ``low``; bools are refused: ``True`` is not a count."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or (low is not None and value < low):
        if low is None:
            what = "an integer"
        elif low == 1:
            what = "a positive integer"
        else:
            what = f"an integer >= {low}"
        raise ConfigError(f"{name} must be {what}, got {value!r}{_hint(hint)}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """A finite real number within the given bounds (open or closed at either end)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    number = float(value) if ok else math.nan
    ok = ok and math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        if low is not None and high is not None:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            what = f"lie in {left}{low:g}, {high:g}{right}"
        elif low == 0:
            what = "be a positive number" if low_open else "be a non-negative number"
        elif low is not None:
            what = f"be a number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            what = f"be a number {'<' if high_open else '<='} {high:g}"
        else:
            what = "be a finite number"
        raise ConfigError(f"{name} must {what}, got {value!r}{_hint(hint)}")
    return number


def check_probability(name: str, value: Any, *, hint: str = "") -> float:
    """A number strictly between 0 and 1 (a fraction of samples, a coverage level...)."""
    return check_number(name, value, low=0.0, high=1.0, low_open=True, high_open=True, hint=hint)


def check_bool(name: str, value: Any, *, optional: bool = False, hint: str = "") -> bool | None:
    """A real ``bool`` (or ``None`` when ``optional``); text was converted by :func:`build`."""
    if isinstance(value, bool) or (optional and value is None):
        return value
    what = "true, false or null" if optional else "true or false"
    raise ConfigError(f"{name} must be {what}, got {value!r}{_hint(hint)}")


def check_nonempty_str(name: str, value: Any, *, hint: str = "") -> str:
    """A string with something other than white space in it."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}{_hint(hint)}")
    if not value.strip():
        raise ConfigError(f"{name} is empty{_hint(hint)}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any], *, hint: str = "") -> Any:
    """One of ``choices``; a misspelling gets the closest valid value suggested."""
    options = list(choices)
    if value in options and not isinstance(value, bool):
        return value
    raise ConfigError(
        f"{name} must be one of {options}, got {value!r}"
        f"{_suggest(value, options)}{_yaml_bool_note(value, options)}{_hint(hint)}"
    )


def _suggest(value: Any, options: Sequence[Any]) -> str:
    words = [str(o) for o in options]
    close = difflib.get_close_matches(str(value), words, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _yaml_bool_note(value: Any, options: Sequence[Any]) -> str:
    if isinstance(value, bool) and any(isinstance(o, str) for o in options):
        return " (YAML reads unquoted yes/no/on/off as a boolean: quote the word, e.g. 'no')"
    return ""


# --------------------------------------------------------------------------- building
def exclude(**reasons: str) -> dict[str, Any]:
    """Field metadata for a nested section: keys its YAML may not set, each with the reason.

    ``model: BulkRNABertConfig = field(default_factory=..., metadata=exclude(n_genes="set
    from the data"))`` reuses a class without letting a file set what the run decides.
    Excluded keys are also left out of :func:`to_dict`.
    """
    return {EXCLUDE: dict(reasons)}


def build(
    cls: type[T],
    raw: Mapping[str, Any] | None,
    *,
    section: str = "",
    excluded: Mapping[str, str] | None = None,
) -> T:
    """An instance of the dataclass ``cls`` from a plain mapping (e.g. parsed YAML).

    Values are converted to the field types (nested dataclasses, ``Optional``,
    ``Literal``, ``tuple``, ``list``, ``dict``, ``Path``, strict bool/int/float); an
    unknown key raises :class:`ConfigError` naming it, its section, the valid keys and
    the closest one. ``section`` is the dotted path used in messages.
    """
    prefix = f"{section}." if section else ""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        where = section or "the config"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {raw!r}")
    excluded = dict(excluded or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    names = [n for n in fields if n not in excluded]
    for key in raw:
        if key in excluded:
            raise ConfigError(f"{prefix}{key} cannot be set in the config: {excluded[key]}")
    unknown = [str(k) for k in raw if k not in fields]
    if unknown:
        raise ConfigError(_unknown_message(unknown, names, section))
    missing = [
        n
        for n, f in fields.items()
        if n not in raw
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing config key(s) {[prefix + n for n in missing]}; set them")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        sub = fields[key].metadata.get(EXCLUDE)
        kwargs[key] = _coerce(value, hints[key], prefix + key, sub)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if section and section not in str(exc):
            raise ConfigError(f"{section}: {exc}") from exc
        raise


def _unknown_message(unknown: list[str], names: list[str], section: str) -> str:
    prefix = f"{section}." if section else ""
    where = f" in section '{section}'" if section else ""
    close = difflib.get_close_matches(unknown[0], names, n=1, cutoff=0.6)
    suggestion = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return (
        f"unknown config key(s) {[prefix + k for k in unknown]}{where}; "
        f"valid keys here: {[prefix + n for n in names]}{suggestion}"
    )


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint in (str, Path):
        return "a string"
    if origin is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin in (list, tuple):
        return "a list"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, name: str, excluded: Mapping[str, str] | None = None) -> Any:
    """Check/convert one YAML value to its field type (YAML reads ``1e-4`` as a string)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return None
        if len(inner) == 1:
            return _coerce(value, inner[0], name, excluded)
        for option in inner:  # a value already of one of the types keeps it (5 in str | int)
            if isinstance(option, type) and type(value) is option:
                return _coerce(value, option, name, excluded)
        for option in inner:
            try:
                return _coerce(value, option, name, excluded)
            except ConfigError:
                continue
        wanted = " or ".join(_describe(a) for a in inner)
        raise ConfigError(f"{name} must be {wanted}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, section=name, excluded=excluded)  # type: ignore[arg-type]
    if value is None:
        if origin in (list, dict):
            return origin()
        raise ConfigError(f"{name} must be {_describe(hint)}, got null")
    if origin is Literal:
        return check_choice(name, value, args)
    if hint is bool:
        return _to_bool(value, name)
    if hint is int:
        return _to_int(value, name)
    if hint is float:
        return _to_float(value, name)
    if hint is str:
        if isinstance(value, str | Path) or (
            isinstance(value, int) and not isinstance(value, bool)
        ):
            return str(value)
        raise ConfigError(
            f"{name} must be a string, got {value!r}{_yaml_bool_note(value, ['str'])}"
        )
    if hint is Path:
        if isinstance(value, str | Path) and str(value).strip():
            return Path(value)
        raise ConfigError(f"{name} must be a path, got {value!r}")
    if origin is tuple:
        return _to_tuple(value, args, name)
    if origin is list:
        item = args[0] if args else Any
        if isinstance(value, str) and item is str:
            return [value]  # ``transfer: ACC`` reads as a one-item list
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping (key: value lines), got {value!r}")
        item = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, item, f"{name}.{k}") for k, v in value.items()}
    return value


def _to_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str | int) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false (yes/no, 1/0), got {value!r}")


def _to_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float | str):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number == int(number):
            return int(number)
    raise ConfigError(f"{name} must be an integer, got {value!r}")


def _to_float(value: Any, name: str) -> float:
    number = math.nan
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return number


def _to_tuple(value: Any, args: tuple[Any, ...], name: str) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{name} must be a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    if args and len(value) != len(args):
        raise ConfigError(f"{name} must be a list of {len(args)} values, got {value!r}")
    kinds = args or (Any,) * len(value)
    pairs = enumerate(zip(value, kinds, strict=True))
    return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in pairs)


# --------------------------------------------------------------------------- files, --set
def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (empty file: ``{}``), with clear errors."""
    import yaml

    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}; check the path given to --config")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from exc
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping (key: value lines), got {type(raw).__name__}"
        )
    return raw or {}


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> ``(["optim", "lr"], "3e-4")``; the value is read as YAML."""
    import yaml

    key, sep, text = item.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise ConfigError(
            f"override {item!r} is not of the form key=value; e.g. --set optim.lr=3e-4"
        )
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item}: the value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(
    raw: Mapping[str, Any], overrides: Iterable[str], cls: type | None = None
) -> dict[str, Any]:
    """A copy of ``raw`` with ``a.b=value`` overrides applied.

    With ``cls`` (the config dataclass) each path is checked first, so a misspelt
    ``--set`` names the valid keys of its section instead of failing later.
    """
    import copy

    out = copy.deepcopy(dict(raw))
    for item in overrides:
        parts, value = parse_override(item)
        if cls is not None:
            _check_path(cls, parts, item)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {part!r} holds a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _check_path(cls: type, parts: list[str], item: str) -> None:
    node: Any = cls
    excluded: Mapping[str, str] = {}
    for depth, part in enumerate(parts):
        section = ".".join(parts[:depth])
        fields = {f.name: f for f in dataclasses.fields(node) if f.init}
        names = [n for n in fields if n not in excluded]
        if part in excluded:
            raise ConfigError(f"--set {item}: {section}.{part} cannot be set: {excluded[part]}")
        if part not in fields:
            raise ConfigError(f"--set {item}: " + _unknown_message([part], names, section))
        if depth == len(parts) - 1:
            return
        hint = _without_none(typing.get_type_hints(node)[part])
        if dataclasses.is_dataclass(hint):
            excluded = fields[part].metadata.get(EXCLUDE, {})
            node = hint
            continue
        if hint is Any or typing.get_origin(hint) is dict:
            return  # free-form mapping: its own consumer checks the keys
        raise ConfigError(f"--set {item}: {'.'.join(parts[: depth + 1])} is a value, not a section")


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return hint


def load(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    defaults: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> T:
    """``cls`` from a YAML file (or defaults alone) with ``--set`` overrides applied.

    Precedence, lowest first: the dataclass defaults, ``defaults`` (defaults that depend
    on the run, e.g. a cache inside the output folder), the file, ``base`` (e.g. values
    a command's flags set), ``overrides``. Mappings merge key by key.
    """
    raw = read_yaml(path) if path is not None else {}
    merged = _merge(_merge(defaults or {}, raw), base or {})
    return build(cls, apply_overrides(merged, overrides, cls))


def _merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- writing
def to_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML/JSON values (tuples -> lists, paths -> strings)."""
    return _plain_dataclass(obj, {})


def _plain_dataclass(obj: Any, skip: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = _plain_dataclass(value, f.metadata.get(EXCLUDE, {}))
        else:
            out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain_dataclass(value, {})
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class ConfigMixin:
    """``from_dict`` / ``from_yaml`` / ``to_dict`` / ``to_yaml`` for a config dataclass."""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> Self:
        """Build from a plain mapping (e.g. parsed YAML); unknown keys are an error."""
        return build(cls, raw)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Iterable[str] | None = None) -> Self:
        """Read a YAML file; ``overrides`` are ``section.key=value`` strings (YAML values)."""
        return load(cls, path, overrides or ())

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)
