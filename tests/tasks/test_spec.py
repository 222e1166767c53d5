from __future__ import annotations

import pandas as pd
import pytest

from bulkfm.errors import ConfigError
from bulkfm.tasks.spec import TaskSpec, expand_token, task_tokens
from tests.tasks.rules import Rules


def test_task_spec_validation() -> None:
    with pytest.raises(ConfigError, match="needs a gene"):
        TaskSpec("mutation")
    with pytest.raises(ConfigError, match="unknown task family"):
        TaskSpec("expression")
    with pytest.raises(ConfigError, match="takes no cohort"):
        TaskSpec("cancer_type", cohort="A")


def test_names_kinds_and_metrics() -> None:
    spec = TaskSpec("mutation", gene="TP53", cohort="BRCA")
    assert (spec.name, spec.kind, spec.metric) == ("mutation:TP53@BRCA", "binary", "auroc")
    assert TaskSpec("cancer_type").to_dict()["metric"] == "macro_f1"
    assert TaskSpec("survival").metric == "c_index_within_cohort"
    assert TaskSpec("survival", cohort="X").metric == "c_index"


def test_wildcards_expand_over_genes_and_cohorts() -> None:
    obs = pd.DataFrame({"cohort": ["A", "B", "A"], "mut_TP53": [0, 1, 1], "mut_KRAS": 0})
    specs, wildcard = expand_token("mutation@*", obs, Rules())
    assert wildcard
    assert [s.name for s in specs] == [
        "mutation:TP53@A",
        "mutation:TP53@B",
        "mutation:KRAS@A",
        "mutation:KRAS@B",
    ]
    specs, wildcard = expand_token("mutation:kras", obs, Rules())
    assert not wildcard and [s.name for s in specs] == ["mutation:KRAS"]
    # no survival columns: auto leaves survival out
    assert "survival" not in [s.family for s in expand_token("auto", obs, Rules())[0]]


def test_task_tokens() -> None:
    assert task_tokens(None) == ["auto"]
    assert task_tokens(" cancer_type, survival ") == ["cancer_type", "survival"]
    with pytest.raises(ConfigError, match="no task given"):
        task_tokens(", ")
