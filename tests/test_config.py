"""The one config loader (bulkfm.config): typed building, strict keys, YAML files, --set."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pytest

from bulkfm.config import (
    ConfigMixin,
    apply_overrides,
    build,
    check_bool,
    check_choice,
    check_int,
    check_nonempty_str,
    check_number,
    check_probability,
    exclude,
    load,
    read_yaml,
    to_dict,
)
from bulkfm.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    rate: float = 0.1
    name: str = "a"


@dataclass(frozen=True)
class Outer(ConfigMixin):
    steps: int = 10
    flag: bool = False
    limit: int | None = 5
    mode: Literal["fast", "slow"] = "fast"
    pair: tuple[float, float] = (0.9, 0.99)
    sizes: tuple[int, ...] = (1, 2)
    names: list[str] = field(default_factory=list)
    out: Path = Path("runs")
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, Any] = field(default_factory=dict)
    either: str | int = "model"


@dataclass
class WithExcluded:
    inner: Inner = field(default_factory=Inner, metadata=exclude(name="the run sets it"))


@dataclass
class Required:
    needed: int


# --------------------------------------------------------------------------- building
def test_builds_nested_typed_frozen_dataclass() -> None:
    raw = {
        "steps": "1e3",  # YAML reads an exponent without a dot as a string
        "flag": "yes",
        "limit": None,
        "mode": "slow",
        "pair": [0.8, "0.9"],
        "sizes": [4, 5, 6],
        "names": "ACC",  # one bare name is a list of one
        "out": "x/y",
        "inner": {"rate": 2},
        "extra": {"anything": [1, 2]},
        "either": 7,
    }
    cfg = Outer.from_dict(raw)
    assert cfg == Outer(
        steps=1000,
        flag=True,
        limit=None,
        mode="slow",
        pair=(0.8, 0.9),
        sizes=(4, 5, 6),
        names=["ACC"],
        out=Path("x/y"),
        inner=Inner(rate=2.0),
        extra={"anything": [1, 2]},
        either=7,
    )
    assert isinstance(cfg.inner.rate, float) and isinstance(cfg.either, int)
    assert Outer.from_dict(None) == Outer() == Outer.from_dict({"inner": None})


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = Outer(sizes=(3,), names=["a", "b"], out=Path("o"), inner=Inner(name="z"))
    assert cfg.to_dict()["sizes"] == [3] and cfg.to_dict()["out"] == "o"
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert Outer.from_yaml(path) == cfg


def test_unknown_key_names_key_section_valid_keys_and_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        Outer.from_dict({"inner": {"rat": 1.0}})
    message = str(info.value)
    assert "unknown config key(s) ['inner.rat'] in section 'inner'" in message
    assert "valid keys here: ['inner.rate', 'inner.name']" in message
    assert message.endswith("did you mean 'inner.rate'?")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['stepz'\]; valid keys"):
        Outer.from_dict({"stepz": 1})


def test_excluded_and_required_keys() -> None:
    with pytest.raises(ConfigError, match=r"inner\.name cannot be set in the config: the run sets"):
        build(WithExcluded, {"inner": {"name": "b"}})
    assert build(WithExcluded, {"inner": {"rate": 0.5}}).inner.rate == 0.5
    assert "name" not in to_dict(WithExcluded())["inner"]
    with pytest.raises(ConfigError, match=r"missing config key\(s\) \['needed'\]"):
        build(Required, {})


@pytest.mark.parametrize("text", ["true", "True", "yes", "1", 1])
def test_strict_bools_accept_yaml_spellings_of_true(text: object) -> None:
    assert Outer.from_dict({"flag": text}).flag is True


@pytest.mark.parametrize("text", ["false", "NO", "0", 0])
def test_strict_bools_accept_yaml_spellings_of_false(text: object) -> None:
    assert Outer.from_dict({"flag": text}).flag is False


@pytest.mark.parametrize("value", ["flase", "on", 2, 0.5, None])
def test_strict_bools_refuse_anything_else(value: object) -> None:
    with pytest.raises(ConfigError, match="flag must be true or false"):
        Outer.from_dict({"flag": value})


@pytest.mark.parametrize(("value", "expected"), [(3, 3), (3.0, 3), ("4", 4), ("2e2", 200)])
def test_ints_accept_whole_numbers(value: object, expected: int) -> None:
    assert Outer.from_dict({"steps": value}).steps == expected


@pytest.mark.parametrize("value", [True, False, 2.5, "2.5", "many", None, [1]])
def test_ints_refuse_bools_fractions_and_text(value: object) -> None:
    with pytest.raises(ConfigError, match="steps must be an integer"):
        Outer.from_dict({"steps": value})


def test_optional_null_literal_and_tuple_errors() -> None:
    assert Outer.from_dict({"limit": None}).limit is None
    with pytest.raises(ConfigError, match=r"mode must be one of \['fast', 'slow'\], got 'fats'"):
        Outer.from_dict({"mode": "fats"})
    with pytest.raises(ConfigError, match="did you mean 'fast'"):
        Outer.from_dict({"mode": "fats"})
    with pytest.raises(ConfigError, match=r"pair must be a list of 2 values"):
        Outer.from_dict({"pair": [0.1]})
    with pytest.raises(ConfigError, match=r"pair\[1\] must be a finite number, got 'x'"):
        Outer.from_dict({"pair": [0.1, "x"]})
    with pytest.raises(ConfigError, match=r"inner\.rate must be a finite number"):
        Outer.from_dict({"inner": {"rate": float("nan")}})
    with pytest.raises(ConfigError, match=r"inner\.name must be a string, got null"):
        Outer.from_dict({"inner": {"name": None}})
    with pytest.raises(ConfigError, match="inner must be a mapping"):
        Outer.from_dict({"inner": 3})


def test_unquoted_yaml_no_for_a_string_gets_a_hint() -> None:
    with pytest.raises(ConfigError, match=r"got False \(YAML reads unquoted yes/no"):
        Outer.from_dict({"inner": {"name": False}})


# --------------------------------------------------------------------------- files
def test_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; check the path given to --config"):
        read_yaml(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        read_yaml(tmp_path)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping .* got list"):
        read_yaml(listing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: 3\ninner: {rate: 1\nflag: true\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+, column \d+"):
        read_yaml(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert read_yaml(empty) == {} and load(Outer, empty) == Outer()


# --------------------------------------------------------------------------- --set
def test_overrides_parse_yaml_values_and_create_sections(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\ninner: {name: b}\n")
    cfg = load(
        Outer,
        path,
        ["inner.rate=1e-3", "limit=null", "names=[x, y]", "extra.deep.key=on", "flag=no"],
    )
    assert cfg.inner == Inner(rate=1e-3, name="b") and cfg.limit is None
    assert cfg.names == ["x", "y"] and cfg.extra == {"deep": {"key": True}}
    assert cfg.steps == 3 and cfg.flag is False


def test_override_precedence_defaults_file_base_set(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\ninner: {name: file}\n")
    cfg = load(
        Outer,
        path,
        ["inner.rate=0.7"],
        defaults={"steps": 1, "limit": 9, "inner": {"name": "default"}},
        base={"steps": 4, "inner": {"rate": 0.5}},
    )
    assert (cfg.steps, cfg.limit, cfg.inner) == (4, 9, Inner(rate=0.7, name="file"))


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("steps", "not of the form key=value"),
        ("=3", "not of the form key=value"),
        ("inner..rate=1", "not of the form key=value"),
        ("inner.rat=1", r"--set inner.rat=1: unknown config key\(s\) \['inner.rat'\]"),
        ("inner.rat=1", "did you mean 'inner.rate'"),
        ("stepz=1", r"valid keys here: \['steps'"),
        ("steps.sub=1", "steps is a value, not a section"),
        ("names=[a", "the value is not valid YAML"),
    ],
)
def test_bad_overrides_are_rejected(item: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load(Outer, None, [item])


def test_overrides_without_a_class_still_refuse_descending_into_values() -> None:
    with pytest.raises(ConfigError, match="'steps' holds a value, not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])
    assert apply_overrides({"a": None}, ["a.b=2"]) == {"a": {"b": 2}}


def test_excluded_key_cannot_be_overridden() -> None:
    with pytest.raises(ConfigError, match=r"inner\.name cannot be set: the run sets it"):
        load(WithExcluded, None, ["inner.name=x"])


# --------------------------------------------------------------------------- value checks
def test_value_checks() -> None:
    assert check_int("n", np.int64(3), 1) == 3
    with pytest.raises(ConfigError, match="n must be a positive integer, got 0"):
        check_int("n", 0, 1)
    with pytest.raises(ConfigError, match="k must be an integer >= 2, got True"):
        check_int("k", True, 2)
    with pytest.raises(ConfigError, match=r"x must be an integer, got 1\.5; why"):
        check_int("x", 1.5, hint="why")
    assert check_probability("p", 0.5) == 0.5
    for bad in (0, 1, float("nan"), "0.5", True):
        with pytest.raises(ConfigError, match=r"p must lie in \(0, 1\)"):
            check_probability("p", bad)
    with pytest.raises(ConfigError, match="lr must be a positive number"):
        check_number("lr", 0.0, low=0.0, low_open=True)
    with pytest.raises(ConfigError, match="wd must be a non-negative number"):
        check_number("wd", -1, low=0.0)
    with pytest.raises(ConfigError, match=r"q must lie in \[0.5, 1\)"):
        check_number("q", 1.0, low=0.5, high=1.0, high_open=True)
    assert check_number("q", 1.0, low=0.5, high=1.0) == 1.0
    assert check_nonempty_str("s", "x") == "x"
    with pytest.raises(ConfigError, match="s is empty; give a folder"):
        check_nonempty_str("s", "  ", hint="give a folder")
    with pytest.raises(ConfigError, match="s must be a non-empty string, got 3"):
        check_nonempty_str("s", 3)
    assert check_choice("c", "b", ("a", "b")) == "b"
    with pytest.raises(ConfigError, match=r"c must be one of \['a', 'b'\], got True"):
        check_choice("c", True, ("a", "b"))
    assert check_bool("f", False) is False and check_bool("f", None, optional=True) is None
    with pytest.raises(ConfigError, match="f must be true, false or null, got 'no'"):
        check_bool("f", "no", optional=True)


# --------------------------------------------------------------------------- commands
@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "--config", "c.yaml"],
        ["evaluate", "--config", "c.yaml"],
        ["bench", "--config", "c.yaml"],
        ["data", "build", "--config", "c.yaml", "-o", "x.h5ad"],
    ],
)
def test_every_config_command_takes_config_and_set(argv: list[str]) -> None:
    from bulkfm.cli import build_parser

    args = build_parser().parse_args([*argv, "--set", "a.b=1", "--set", "c=2"])
    assert args.config == Path("c.yaml") and args.overrides == ["a.b=1", "c=2"]


def test_data_build_from_yaml_with_flag_and_set(tmp_path: Path, capsys) -> None:
    from bulkfm.cli import main

    genes = ["ENSG00000000003", "ENSG00000000005", "ENSG00000000419"]
    frame = pd.DataFrame(
        np.full((3, 3), 1e6 / 3), columns=genes, index=[f"TCGA-AB-100{i}-01A" for i in range(3)]
    )
    frame.index.name = "sample_id"
    frame.to_csv(tmp_path / "expr.tsv", sep="\t")
    cfg = tmp_path / "build.yaml"
    cfg.write_text(f"inputs: ['{tmp_path / 'expr*.tsv'}']\nfill: zero\nendpoint: DSS\n")
    out = tmp_path / "out.h5ad"
    argv = ["data", "build", "--config", str(cfg), "-o", str(out), "--cohort", "ABC"]
    assert main([*argv, "--endpoint", "PFI", "--set", "fill=missing"]) == 0
    import anndata as ad

    built = ad.read_h5ad(out)
    assert built.n_obs == 3 and set(built.obs["cohort"]) == {"ABC"}
    record = built.uns["bulkfm"]["build"]
    assert record["endpoint"] == "PFI" and record["fill"] == "missing"
    assert main([*argv, "--endpoint", "XYZ"]) == 1
    assert "(set by --endpoint)" in capsys.readouterr().err
