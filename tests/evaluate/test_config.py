from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bulkfm.errors import ConfigError
from bulkfm.evaluate.config import DataSection, EvaluateConfig, HeadsSection, TasksSection

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"model": {"path": "runs/pretrain/final"}}


def test_defaults_follow_the_paper_protocol():
    cfg = EvaluateConfig.from_dict(MINIMAL)
    assert cfg.protocol.n_seeds == 5 and cfg.protocol.test_size == 0.2
    assert cfg.arms.mlp and cfg.arms.svm and cfg.arms.ia3
    assert not (cfg.arms.full or cfg.arms.random_init)
    assert (cfg.baselines.pca_components, cfg.baselines.nmf_components) == (256, 128)


def test_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "protocol": {"n_seeds": 3}}))
    cfg = EvaluateConfig.from_yaml(
        path,
        [
            "protocol.test_size=0.25",
            "arms.full=true",
            "heads.mlp.lr=1e-4",
            "tasks.robustness=[0.1]",
        ],
    )
    assert cfg.protocol.n_seeds == 3 and cfg.protocol.test_size == 0.25
    assert cfg.arms.full and cfg.tasks.robustness == [0.1]
    assert cfg.heads.mlp["lr"] == 1e-4  # YAML's "1e-4" string becomes a float in MLPClassifier
    again = EvaluateConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("name", ["evaluate_simulated.yaml", "evaluate_shared_data.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = EvaluateConfig.from_yaml(REPO / "configs" / name)
    assert cfg.protocol.n_seeds == 5


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({**MINIMAL, "protocols": {}}, r"unknown config key\(s\) \['protocols'\]"),
        (
            {**MINIMAL, "protocol": {"seeds": 3}},
            r"unknown config key\(s\) \['protocol\.seeds'\] in section 'protocol'.*"
            r"did you mean 'protocol\.seed'",
        ),
        ({**MINIMAL, "protocol": {"test_size": 1.5}}, r"protocol\.test_size must lie in \(0, 1\)"),
        ({**MINIMAL, "protocol": {"n_seeds": 0}}, r"protocol\.n_seeds must be a positive integer"),
        ({**MINIMAL, "protocol": {"survival_strata": "age"}}, "survival_strata must be one of"),
        ({**MINIMAL, "tasks": {"robustness": [0.2, 1.0]}}, r"fractions must lie in \(0, 1\)"),
        ({**MINIMAL, "tasks": {"robustness": 0.2}}, r"tasks\.robustness must be a list"),
        ({**MINIMAL, "arms": {"ia3": "flase"}}, "arms.ia3 must be true or false"),
        ({**MINIMAL, "baselines": {"genes": "some"}}, "baselines.genes must be 'model', 'all'"),
        ({**MINIMAL, "heads": {"finetune": {"mode": "full"}}}, r"heads\.finetune\.mode is set"),
        ({**MINIMAL, "heads": {"mlp": {"seed": 3}}}, r"heads\.mlp\.seed is set per split"),
        ({**MINIMAL, "heads": {"mlp": {"epochs": 3}}}, r"heads\.mlp: .*'epochs'"),
        ({**MINIMAL, "heads": {"cox": {"lr": -1}}}, r"heads\.cox: lr must be a positive"),
        ({**MINIMAL, "heads": {"finetune": {"epoch": 3}}}, r"heads\.finetune: .*'epoch'"),
        ({**MINIMAL, "heads": {"finetune": {"epochs": 0}}}, r"heads\.finetune: epochs must be"),
        ({}, "no model: set model.path"),
        (
            {**MINIMAL, "pretrain": {"optim": {"max_steps": 5}}},
            r"both model\.path and a pretrain.*--set pretrain=null.*--model DIR",
        ),
        ({**MINIMAL, "model": {"min_gene_coverage": 1.5}}, r"model\.min_gene_coverage must lie"),
        ({**MINIMAL, "protocol": {"warn_below_events": -1}}, r"protocol\.warn_below_events"),
        ({"pretrain": {"optim": {"learning_rate": 1}}}, r"optim\.learning_rate"),
        (
            {"model": {"embeddings": "e.parquet"}, "baselines": {"genes": "all"}},
            r"arms\.ia3 need the model itself",
        ),
        (
            {"model": {"embeddings": "e.parquet"}, "arms": {"ia3": False}},
            "baselines.genes=model needs a model",
        ),
        ({**MINIMAL, "output_dir": " "}, "output_dir is empty"),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(raw, match):
    with pytest.raises(ConfigError, match=match):
        EvaluateConfig.from_dict(raw)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        EvaluateConfig.from_yaml(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        EvaluateConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        EvaluateConfig.from_yaml(REPO / "configs" / "evaluate_simulated.yaml", ["arms.ia3"])


@pytest.mark.parametrize("key", ["robustness", "transfer", "per_cohort_survival"])
def test_null_means_none_for_list_keys(tmp_path, key):
    """``--set tasks.robustness=null`` and ``[]`` mean the same: no such study."""
    path = tmp_path / "eval.yaml"
    path.write_text(
        yaml.safe_dump({**MINIMAL, "tasks": {key: [0.3] if key == "robustness" else ["A"]}})
    )
    for value in ("null", "[]"):
        cfg = EvaluateConfig.from_yaml(path, [f"tasks.{key}={value}"])
        assert getattr(cfg.tasks, key) == []
    assert getattr(TasksSection(**{key: None}), key) == []  # built in Python, too


def test_null_means_empty_for_mapping_keys():
    assert DataSection(select=None).select == {}
    assert HeadsSection(mlp=None, cox=None, finetune=None).mlp == {}


def test_report_title_defaults_to_one_derived_from_the_data():
    assert EvaluateConfig.from_dict(MINIMAL).report.title is None


def test_template_loads_and_marks_what_to_change():
    from importlib import resources

    text = resources.files("bulkfm.configs").joinpath("evaluate_template.yaml").read_text()
    cfg = EvaluateConfig.from_dict(yaml.safe_load(text))
    assert cfg.pretrain is None and cfg.model.path and cfg.data.path
    changed = [line.split(":")[0].strip() for line in text.splitlines() if "# CHANGE" in line]
    assert {"output_dir", "path", "label_key", "time_key", "event_key", "select"} <= set(changed)
    assert changed.count("path") == 2  # data.path and model.path
