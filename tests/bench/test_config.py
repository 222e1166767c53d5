from __future__ import annotations

import pytest

from bulkfm.bench.config import BenchConfig, BenchFile
from bulkfm.config import load
from bulkfm.errors import ConfigError


def test_config_round_trip_and_seeds() -> None:
    config = BenchConfig(seeds=(3, 5, 8), c_grid=[0.1, 1])
    assert config.n_splits == 3 and config.split_seeds() == (3, 5, 8)
    assert BenchConfig.from_dict(config.to_dict()) == config
    assert config.probe_config().c_grid == (0.1, 1.0)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("n_splits", 0, "n_splits must be a positive integer"),
        ("test_size", 1.5, r"test_size must lie in \(0, 1\)"),
        ("ci_method", "bca", "ci_method must be one of"),
        ("min_events", True, "min_events must be a positive integer"),
        ("cox_alpha_grid", (0.0,), "cox_alpha_grid must be a non-empty list of positive"),
        ("inner_folds", 1, "inner_folds must be an integer >= 2"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BenchConfig(**{field: value})


@pytest.mark.parametrize("method", ["splits", "test"])
def test_removed_ci_methods_say_why_and_what_to_use(method: str) -> None:
    with pytest.raises(ConfigError, match=rf"ci_method '{method}' was removed: .*'calibrated'"):
        BenchConfig(ci_method=method)


def test_config_unknown_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['splits'\].*'n_splits'"):
        BenchConfig.from_dict({"splits": 3})


def test_config_from_yaml_values() -> None:
    """YAML lists become the tuple fields; ``1e-2`` (read by YAML as a string) a number."""
    config = BenchConfig.from_dict(
        {"c_grid": ["1e-2", 1], "seeds": [4, 2], "ci_method": "nadeau_bengio"}
    )
    assert config.c_grid == (0.01, 1.0) and config.seeds == (4, 2) and config.n_splits == 2
    with pytest.raises(ConfigError, match="ci_method must be one of"):
        BenchConfig.from_dict({"ci_method": "bca"})


def test_bench_file_layout_and_overrides(tmp_path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("models: [raw, pca]\ntasks: cancer_type\nbench: {n_splits: 4}\n")
    spec = load(BenchFile, path, ["bench.seed=7", "model_args.pca.n_components=8"])
    assert spec.models == ["raw", "pca"] and spec.tasks == "cancer_type"
    assert (spec.bench.n_splits, spec.bench.seed) == (4, 7)
    assert spec.model_args == {"pca": {"n_components": 8}}
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['bench\.n_split'\]"):
        load(BenchFile, path, ["bench.n_split=3"])
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['model'\]"):
        BenchFile.from_dict({"model": ["raw"]})


def test_bench_file_name_lists_read_a_list_or_a_comma_string() -> None:
    spec = BenchFile.from_dict({"models": "raw, pca", "genes": ["TP53", " KRAS "], "cohorts": ""})
    assert spec.model_names(("nmf",)) == ["raw", "pca"]
    assert spec.gene_names() == ["TP53", "KRAS"] and spec.cohort_names() is None
    assert BenchFile().model_names(("pca", "nmf")) == ["pca", "nmf"]
