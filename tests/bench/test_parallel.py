"""``bench.workers``: the (model, task, split) units on spawned worker processes.

The reference is the single-process run of the same benchmark: the scores, summaries and
per-class tables must be *equal* (not close), frozen models embedded once in the parent,
learning models refitted in the workers, and the workers' warnings and log lines said once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bulkfm.bench.config import BenchConfig
from bulkfm.bench.runner import run_benchmark
from bulkfm.embedders import get_embedder
from bulkfm.embedders.classical import RawEmbedder
from bulkfm.errors import BulkfmWarning, ConfigError
from tests.bench.fakes import Fixed, signal_embedding

TASKS = "cancer_type,mutation:TP53,survival"  # multiclass, pan-cancer binary, survival


class ChattyRaw(RawEmbedder):
    """A learning model that warns and logs on every fit (run in the workers)."""

    def fit(self, adata_train: ad.AnnData) -> ChattyRaw:
        warnings.warn("42 genes ignored", BulkfmWarning, stacklevel=2)
        logging.getLogger("bulkfm.tests.chatty").warning("fitted on the training rows")
        return super().fit(adata_train)


def _models(sim: ad.AnnData) -> list:
    return [
        get_embedder("pca", n_components=8, n_top_genes=60),
        get_embedder("nmf", n_components=5, n_top_genes=60, max_iter=40),
        get_embedder("random", dim=16),
        Fixed(sim, signal_embedding(sim), label="signal"),
    ]


def test_two_workers_give_the_single_process_tables(sim, small_config) -> None:
    one_models, two_models = _models(sim), _models(sim)
    one = run_benchmark(sim, one_models, TASKS, small_config, progress=False)
    config = dataclasses.replace(small_config, workers=2)
    two = run_benchmark(sim, two_models, TASKS, config, progress=False)
    assert len(one.scores) > 0 and one.scores["reference"].any()  # cohort probe rows too
    assert set(one.scores["model"]) >= {"pca", "nmf", "random", "signal"}
    for a, b in [(one.scores, two.scores), (one.summary, two.summary)]:
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    pd.testing.assert_frame_equal(one.per_class, two.per_class, check_exact=True)
    assert one.models == two.models
    # Frozen: embedded once, here, for every worker; learning: fitted only in the workers.
    assert two_models[3].calls == 1
    assert two_models[0].genes_ is None and one_models[0].genes_ is not None
    assert two.config.workers == 2 and "workers_wall" in two.timings


def test_workers_warnings_and_log_lines_are_said_once(sim, small_config, caplog) -> None:
    config = dataclasses.replace(small_config, workers=2)
    model = ChattyRaw(n_top_genes=20, label="raw")
    with caplog.at_level(logging.INFO, logger="bulkfm"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run_benchmark(sim, [model], "cancer_type,mutation:TP53", config, progress=False)
    said = [str(x.message) for x in w if "42 genes ignored" in str(x.message)]
    assert said == ["42 genes ignored (said once; raised 4 times in this run)"]
    lines = [r for r in caplog.records if r.getMessage() == "fitted on the training rows"]
    assert len(lines) == 1 and lines[0].name == "bulkfm.tests.chatty"
    assert lines[0].levelno == logging.WARNING
    # the per-(model, task) summary lines are said by the parent, in the serial order
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("raw / ")]
    assert [s.split(":")[0] for s in summaries] == ["raw / cancer_type", "raw / mutation"]


def test_a_model_that_cannot_be_pickled_is_named_with_the_way_out(sim, small_config) -> None:
    class Local(RawEmbedder):  # a class local to a function cannot be pickled
        pass

    config = dataclasses.replace(small_config, workers=2)
    with pytest.raises(ConfigError, match=r"model 'local'.*--workers 1"):
        run_benchmark(sim, [Local(label="local")], "cancer_type", config, progress=False)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_workers_must_be_a_positive_integer(bad) -> None:
    with pytest.raises(ConfigError, match=r"workers must be a positive integer.*--workers"):
        BenchConfig(workers=bad)


def test_cli_workers_flag_reaches_the_run(sim, tmp_path) -> None:
    from bulkfm.cli import main
    from bulkfm.io import write_h5ad
    from tests.bench.test_cli import SMALL

    h5ad = write_h5ad(sim, tmp_path / "sim.h5ad")
    out = tmp_path / "out"
    args = ["bench", "--data", str(h5ad), "--out", str(out), "--models", "random"]
    args += ["--tasks", "cancer_type", "--no-plots", "--no-cache", "--workers", "2", *SMALL]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["workers"] == 2
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 2 * 3 and np.isfinite(scores["value"]).all()  # 2 splits x 3 metrics
