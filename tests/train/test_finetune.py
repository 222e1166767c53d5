from __future__ import annotations

import dataclasses
import itertools
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from bulkfm.errors import (
    CheckpointError,
    ClinicalMatchError,
    ConfigError,
    GeneMappingError,
    SplitError,
)
from bulkfm.metrics import concordance_index
from bulkfm.models import BulkRNABert
from bulkfm.models.ia3 import get_adapter_params
from bulkfm.tokenize import BinTokenizer
from bulkfm.train.finetune import (
    FinetuneConfig,
    FinetunedModel,
    FinetuneNetwork,
    _validation_split,
    finetune,
)
from tests.conftest import tiny_config

TINY = dict(num_layers=2)  # two blocks: adapters and hidden states per layer differ
CLASSES = np.array(["a", "b", "c"])
# fast settings: small head, no dropout, high learning rate, no early stopping
FAST = dict(epochs=8, lr=1e-2, dropout=0.0, hidden=(32,), patience=None, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_adata(n: int = 48, seed: int = 0, missing: bool = False) -> ad.AnnData:
    """Three classes: each lifts its own block of 8 genes and the overall level."""
    rng = np.random.default_rng(seed)
    y = CLASSES[np.arange(n) % 3]
    X = rng.lognormal(1.0, 0.5, size=(n, 32))
    for k, c in enumerate(CLASSES):
        X[y == c, 8 * k : 8 * (k + 1)] *= 30
        X[y == c] *= 4.0**k
    obs = pd.DataFrame(
        {"patient": [f"P{i // 2}" for i in range(n)], "label": y},  # two samples a patient
        index=[f"S{seed}_{i}" for i in range(n)],
    )
    adata = ad.AnnData(
        X.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(32)])
    )
    if missing:
        mask = rng.random((n, 32)) < 0.2
        adata.layers["missing"] = sp.csr_matrix(mask)
    return adata


def add_survival(adata: ad.AnnData, seed: int = 0) -> np.ndarray:
    """Exponential times whose log-hazard grows with the class (and level), 25% censored."""
    rng = np.random.default_rng(seed)
    k = np.searchsorted(CLASSES, adata.obs["label"].to_numpy()).astype(float)
    eta = 1.2 * k + rng.normal(0, 0.3, adata.n_obs)
    time = rng.exponential(1.0 / np.exp(eta)) * 1000 + 1
    event = (rng.random(adata.n_obs) > 0.25).astype(int)
    adata.obs["survival_time"] = time
    adata.obs["survival_event"] = event
    return eta


def make_model(seed: int = 0) -> BulkRNABert:
    """Stand-in for a pre-trained encoder: larger-than-init weights so the embedding
    carries the input (a fresh N(0, 0.02) model averages nearly everything away)."""
    torch.manual_seed(seed)
    model = BulkRNABert(tiny_config(**TINY))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "embedding" in name else 0.2))
            if "layer_norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model.eval()


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def base_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state(encoder).items() if not k.endswith("ia3_l")}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return make_adata()


@pytest.fixture(scope="module")
def tokenizer(adata) -> BinTokenizer:
    return BinTokenizer.fit_adata(adata)


@pytest.fixture(scope="module")
def ia3_run(adata, tokenizer):
    model = make_model()
    before = state(model)
    ft = finetune(model, tokenizer, adata, "label", FinetuneConfig(mode="ia3", **FAST))
    return model, before, ft


# --------------------------------------------------------------------------- modes
def test_ia3_learns_classes_and_keeps_base_weights(ia3_run, adata) -> None:
    model, before, ft = ia3_run
    assert (ft.predict(adata) == adata.obs["label"].to_numpy()).mean() >= 0.95
    assert same_state(base_state(ft.network.encoder), before)  # bit-identical encoder
    assert same_state(state(model), before)  # the caller's model is untouched
    adapters = get_adapter_params(ft.network)
    assert len(adapters) == 3 * TINY["num_layers"]
    # gradients reached the adapters through the pooling
    assert all(not torch.equal(p, torch.ones_like(p)) for p in adapters.values())
    assert ft.history[0]["train_loss"] > 5 * ft.history[-1]["train_loss"]


def test_ia3_parameter_report(ia3_run) -> None:
    _, _, ft = ia3_run
    counts = ft.param_counts
    head = 16 * 32 + 32 + 32 * 3 + 3 + 2 * 32  # Linear, LayerNorm, output
    assert counts["adapter"] == TINY["num_layers"] * (16 + 16 + 32)
    assert counts["head"] == head
    assert counts["trainable"] == counts["adapter"] + head
    assert counts["total"] == make_model().num_parameters() + counts["adapter"] + head
    assert counts["fraction"] == pytest.approx(counts["trainable"] / counts["total"])


def test_predict_proba_is_a_distribution_in_class_order(ia3_run, adata) -> None:
    _, _, ft = ia3_run
    proba = ft.predict_proba(adata)
    assert proba.shape == (adata.n_obs, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert list(ft.classes_) == ["a", "b", "c"]
    np.testing.assert_array_equal(ft.predict(adata), ft.classes_[proba.argmax(axis=1)])


def test_full_mode_changes_base_weights_not_the_callers(adata, tokenizer) -> None:
    model = make_model()
    before = state(model)
    ft = finetune(
        model, tokenizer, adata, "label", FinetuneConfig(mode="full", **{**FAST, "epochs": 3})
    )
    after = state(ft.network.encoder)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(".mha.w_k." in k for k in changed) and any(".fc1." in k for k in changed)
    assert not any(k.startswith("lm_head.") for k in changed)  # not used by the task
    assert same_state(state(model), before)
    assert ft.param_counts["adapter"] == 0
    lm = sum(p.numel() for p in model.lm_head.parameters())
    assert ft.param_counts["trainable"] == ft.param_counts["total"] - lm


def test_frozen_mode_trains_only_the_head(adata, tokenizer) -> None:
    model = make_model()
    ft = finetune(
        model, tokenizer, adata, "label", FinetuneConfig(mode="frozen", **{**FAST, "epochs": 3})
    )
    assert same_state(state(ft.network.encoder), state(model))
    assert ft.param_counts["trainable"] == ft.param_counts["head"]
    trainable = {n for n, p in ft.network.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    # its embeddings are the encoder's own, with the paper's masked mean pooling
    expected = model.embed(torch.from_numpy(tokenizer.encode_adata(adata)))
    np.testing.assert_allclose(ft.embed(adata), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_head_sees_standardised_embeddings(adata, tokenizer) -> None:
    model = make_model()
    cfg = FinetuneConfig(mode="frozen", **{**FAST, "epochs": 1, "patience": None})
    ft = finetune(model, tokenizer, adata, "label", cfg)
    pooled = model.embed(torch.from_numpy(tokenizer.encode_adata(adata))).double()
    net = ft.network
    torch.testing.assert_close(net.pool_mean.double(), pooled.mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(net.pool_scale.double(), pooled.std(0), rtol=1e-4, atol=1e-6)
    z = net.standardize(pooled.float())
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1]), rtol=0, atol=1e-4)
    torch.testing.assert_close(z.std(0), torch.ones(z.shape[1]), rtol=0, atol=1e-4)


def test_random_init_differs_from_pretrained_init(adata, tokenizer) -> None:
    model = make_model()
    cfg = FinetuneConfig(mode="frozen", random_init=True, **{**FAST, "epochs": 1})
    first = finetune(model, tokenizer, adata, "label", cfg)
    again = finetune(model, tokenizer, adata, "label", cfg)
    other_seed = finetune(model, tokenizer, adata, "label", dataclasses.replace(cfg, seed=1))
    enc = state(first.network.encoder)
    assert enc.keys() == state(model).keys()
    assert all(not torch.equal(enc[k], v) for k, v in state(model).items() if "weight" in k)
    assert same_state(enc, state(again.network.encoder))  # seeded
    assert not same_state(enc, state(other_seed.network.encoder))
    # BERT-style init (std 0.02), not the pre-trained scale
    assert enc["transformer_layers.0.fc1.weight"].std() == pytest.approx(0.02, rel=0.2)


def test_finetune_does_not_touch_global_rng(adata, tokenizer) -> None:
    model = make_model()  # seeds the global RNG itself
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    finetune(model, tokenizer, adata, "label", FinetuneConfig(mode="frozen", **FAST))
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- pooling
def test_pooling_matches_embed_and_excludes_masked_genes(tokenizer) -> None:
    adata = make_adata(n=6, missing=True)
    tokens = torch.from_numpy(tokenizer.encode_adata(adata))
    assert (tokens == tokenizer.mask_token_id).any()
    model = make_model()
    for layer in (-1, 1, 0):
        net = FinetuneNetwork(model, torch.nn.Identity(), layer)
        pooled = net.pool(tokens)
        torch.testing.assert_close(pooled, model.embed(tokens, layer=layer))
        assert not torch.allclose(pooled, model.embed(tokens, layer=layer, exclude_mask=False))


def test_gradients_flow_through_pooling() -> None:
    model = make_model()
    net = FinetuneNetwork(model, torch.nn.Linear(16, 1))
    tokens = torch.randint(0, 65, (3, 32), generator=torch.Generator().manual_seed(0))
    net(tokens).sum().backward()
    assert model.transformer_layers[0].mha.w_k.weight.grad.abs().sum() > 0
    assert model.transformer_layers[-1].fc2.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- survival
def test_survival_loss_decreases_and_ranks_risk(tokenizer) -> None:
    adata = make_adata(n=48, seed=2)
    add_survival(adata, seed=2)
    # one full batch: every epoch's loss is over the same risk sets, so they compare
    cfg = FinetuneConfig(
        task="survival", mode="ia3", **{**FAST, "epochs": 10, "batch_size": 48, "lr": 0.03}
    )
    model = make_model()
    ft = finetune(model, tokenizer, adata, None, cfg)
    losses = [h["train_loss"] for h in ft.history]
    assert losses[-1] < losses[0] - 0.2
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 8
    risk = ft.predict_risk(adata)
    assert risk.shape == (adata.n_obs,)
    obs = adata.obs
    assert concordance_index(obs["survival_time"], obs["survival_event"], risk) > 0.65
    assert same_state(base_state(ft.network.encoder), state(model))


def test_survival_targets_as_tuple_and_dataframe_agree(tokenizer) -> None:
    adata = make_adata(n=24, seed=3)
    add_survival(adata, seed=3)
    cfg = FinetuneConfig(task="survival", mode="frozen", **{**FAST, "epochs": 2})
    obs = adata.obs
    a = finetune(make_model(), tokenizer, adata, None, cfg)
    b = finetune(make_model(), tokenizer, adata, (obs["survival_time"], obs["survival_event"]), cfg)
    c = finetune(
        make_model(),
        tokenizer,
        adata,
        obs[["survival_time", "survival_event"]].set_axis(["time", "event"], axis=1),
        cfg,
    )
    np.testing.assert_array_equal(a.predict_risk(adata), b.predict_risk(adata))
    np.testing.assert_array_equal(a.predict_risk(adata), c.predict_risk(adata))


# --------------------------------------------------------------------------- early stopping
def test_early_stopping_keeps_the_best_validation_epoch(adata, tokenizer) -> None:
    val = make_adata(n=24, seed=5)
    cfg = FinetuneConfig(mode="frozen", **{**FAST, "epochs": 12, "patience": 2, "lr": 0.05})
    ft = finetune(make_model(), tokenizer, adata, "label", cfg, adata_val=val)
    val_losses = [h["val_loss"] for h in ft.history]
    assert ft.best_epoch == int(np.argmin(val_losses)) + 1
    assert len(ft.history) <= ft.best_epoch + 2  # stopped within `patience` epochs
    # the returned weights are that epoch's: recompute its cross-entropy independently
    proba = ft.predict_proba(val)
    codes = np.searchsorted(ft.classes_, val.obs["label"].to_numpy())
    ce = -np.log(proba[np.arange(val.n_obs), codes]).mean()
    assert ce == pytest.approx(min(val_losses), rel=1e-4)


def test_internal_validation_split_is_patient_grouped_and_stratified(adata) -> None:
    from bulkfm.train.finetune import _targets

    targets, _ = _targets("classification", adata, "label", None)
    cfg = FinetuneConfig(val_fraction=0.25)
    train, val = _validation_split(adata, targets, cfg)
    patients = adata.obs["patient"].to_numpy()
    assert not set(patients[train]) & set(patients[val])
    assert set(adata.obs["label"].to_numpy()[val]) == {"a", "b", "c"}
    assert 0.15 < val.size / adata.n_obs < 0.35


def test_too_few_patients_for_a_validation_set_is_an_error(tokenizer) -> None:
    small = make_adata(n=12)  # 6 patients, 2 a class: no 10-fold stratified hold-out
    cfg = FinetuneConfig(mode="frozen", **{**FAST, "patience": 2})
    with pytest.raises(SplitError, match="cannot hold out a validation set"):
        finetune(make_model(), tokenizer, small, "label", cfg)


def test_default_run_uses_internal_validation(adata, tokenizer) -> None:
    cfg = FinetuneConfig(mode="frozen", **{**FAST, "patience": 3, "epochs": 2})
    ft = finetune(make_model(), tokenizer, adata, "label", cfg)
    assert all("val_loss" in h for h in ft.history)


# --------------------------------------------------------------------------- save / load
def test_save_load_round_trip_ia3(ia3_run, adata, tmp_path) -> None:
    _, _, ft = ia3_run
    ft.save(tmp_path)
    meta = json.loads((tmp_path / "finetune.json").read_text())
    assert meta["classes"] == ["a", "b", "c"]
    loaded = FinetunedModel.load(tmp_path)
    np.testing.assert_array_equal(loaded.predict_proba(adata), ft.predict_proba(adata))
    np.testing.assert_array_equal(loaded.embed(adata), ft.embed(adata))
    assert loaded.param_counts == ft.param_counts
    assert loaded.history == ft.history
    assert loaded.config == ft.config


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_save_load_round_trip_survival(mode, tokenizer, tmp_path) -> None:
    adata = make_adata(n=24, seed=4)
    add_survival(adata, seed=4)
    cfg = FinetuneConfig(task="survival", mode=mode, **{**FAST, "epochs": 2})
    ft = finetune(make_model(), tokenizer, adata, None, cfg)
    loaded = FinetunedModel.load(ft.save(tmp_path / mode))
    np.testing.assert_array_equal(loaded.predict_risk(adata), ft.predict_risk(adata))
    assert loaded.classes_ is None


def test_load_missing_directory_is_an_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        FinetunedModel.load(tmp_path / "nothing")


def test_load_foreign_json_is_an_error(tmp_path) -> None:
    (tmp_path / "finetune.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="not a bulkfm fine-tuned model"):
        FinetunedModel.load(tmp_path)


def test_load_mismatched_weights_is_an_error(ia3_run, tmp_path) -> None:
    _, _, ft = ia3_run
    ft.save(tmp_path)
    meta = json.loads((tmp_path / "finetune.json").read_text())
    meta["config"]["mode"] = "full"  # the weights hold IA3 vectors a full model lacks
    (tmp_path / "finetune.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match"):
        FinetunedModel.load(tmp_path)


# --------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("task", "regression", "task must be one of"),
        ("mode", "lora", "mode must be one of"),
        ("random_init", "yes", "random_init must be true or false"),
        ("lr", 0.0, "lr must be a positive number"),
        ("lr", float("nan"), "lr must be a positive number"),
        ("weight_decay", -1.0, "weight_decay must be a non-negative number"),
        ("epochs", 0, "epochs must be a positive integer"),
        ("batch_size", 2.5, "batch_size must be a positive integer"),
        ("patience", 0, "patience must be a positive integer"),
        ("val_fraction", 1.0, r"val_fraction must lie in \(0, 1\)"),
        ("dropout", 1.0, r"dropout must lie in \[0, 1\)"),
        ("hidden", (32, 0), "hidden must be a sequence of positive layer sizes"),
        ("hidden", 64, "hidden must be a sequence of positive layer sizes"),
        ("seed", -1, "seed must be an integer >= 0"),
        ("layer", 1.5, "layer must be an integer"),
        ("ties", "exact", r"ties must be one of \['efron', 'breslow'\]"),
        ("max_grad_norm", 0, "max_grad_norm must be a positive number"),
        ("device", "gpu9", "is not a torch device"),
        ("progress", "no", "progress must be true, false or null"),
    ],
)
def test_config_rejects_bad_values(field, value, match) -> None:
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(**{field: value})


def test_config_defaults_follow_task_and_mode() -> None:
    assert FinetuneConfig(task="classification").head_hidden == (256, 128)
    assert FinetuneConfig(task="survival").head_hidden == (512, 256)
    assert FinetuneConfig(mode="ia3").learning_rate > FinetuneConfig(mode="full").learning_rate
    assert FinetuneConfig(lr=0.5).learning_rate == 0.5
    cfg = FinetuneConfig(hidden=[8, 4])
    assert FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['epochz'\]"):
        FinetuneConfig.from_dict({"epochz": 3})


# --------------------------------------------------------------------------- input errors
def run(adata, tokenizer, y, **kw):
    cfg = kw.pop("config", FinetuneConfig(mode="frozen", **{**FAST, "epochs": 1}))
    return finetune(make_model(), tokenizer, adata, y, cfg, **kw)


def test_label_length_mismatch_is_an_error(adata, tokenizer) -> None:
    with pytest.raises(ConfigError, match="one label per sample"):
        run(adata, tokenizer, np.array(["a", "b"]))


def test_unknown_label_column_is_an_error(adata, tokenizer) -> None:
    with pytest.raises(ConfigError, match="no column 'cancer'"):
        run(adata, tokenizer, "cancer")


def test_missing_labels_are_an_error(adata, tokenizer) -> None:
    y = adata.obs["label"].to_numpy().astype(object)
    y[3] = None
    with pytest.raises(ClinicalMatchError, match="1 labels are missing"):
        run(adata, tokenizer, y)


def test_single_class_is_an_error(adata, tokenizer) -> None:
    with pytest.raises(ClinicalMatchError, match="only one class"):
        run(adata, tokenizer, np.full(adata.n_obs, "a"))


def test_validation_labels_unseen_in_training_are_an_error(adata, tokenizer) -> None:
    val = make_adata(n=6, seed=9)
    with pytest.raises(ClinicalMatchError, match="do not occur in the training labels"):
        run(adata, tokenizer, "label", adata_val=val, y_val=np.full(6, "z"))


def test_validation_data_without_targets_is_an_error(adata, tokenizer) -> None:
    y = adata.obs["label"].to_numpy()
    with pytest.raises(ConfigError, match="adata_val needs its targets"):
        run(adata, tokenizer, y, adata_val=make_adata(n=6, seed=9))


def test_survival_without_events_is_an_error(adata, tokenizer) -> None:
    cfg = FinetuneConfig(task="survival", mode="frozen", **{**FAST, "epochs": 1})
    time = np.linspace(10, 100, adata.n_obs)
    with pytest.raises(ClinicalMatchError, match="no observed events"):
        run(adata, tokenizer, (time, np.zeros(adata.n_obs)), config=cfg)


def test_survival_bad_times_are_an_error(adata, tokenizer) -> None:
    cfg = FinetuneConfig(task="survival", mode="frozen", **{**FAST, "epochs": 1})
    time = np.linspace(10, 100, adata.n_obs)
    time[0] = -5
    with pytest.raises(ClinicalMatchError, match="<= 0"):
        run(adata, tokenizer, (time, np.ones(adata.n_obs)), config=cfg)


def test_survival_target_of_wrong_type_is_an_error(adata, tokenizer) -> None:
    cfg = FinetuneConfig(task="survival", mode="frozen", **{**FAST, "epochs": 1})
    with pytest.raises(ConfigError, match=r"must be \(time, event\) arrays"):
        run(adata, tokenizer, np.ones(adata.n_obs), config=cfg)


def test_layer_out_of_range_is_an_error(adata, tokenizer) -> None:
    cfg = FinetuneConfig(mode="frozen", layer=5, **{**FAST, "epochs": 1})
    with pytest.raises(ConfigError, match="layer 5 does not exist"):
        run(adata, tokenizer, "label", config=cfg)


def test_tokenizer_of_another_model_is_an_error(adata) -> None:
    other = BinTokenizer.fit(adata.X[:, :16], list(adata.var_names[:16]))
    with pytest.raises(CheckpointError, match="tokenizer has 16 genes"):
        run(adata, other, "label")


def test_non_bulkrnabert_model_is_an_error(adata, tokenizer) -> None:
    with pytest.raises(ConfigError, match="model must be a BulkRNABert"):
        finetune(torch.nn.Linear(2, 2), tokenizer, adata, "label", FinetuneConfig())


def test_wrong_task_prediction_is_an_error(ia3_run, adata) -> None:
    _, _, ft = ia3_run
    with pytest.raises(ConfigError, match="predict_risk needs a survival model"):
        ft.predict_risk(adata)


def test_data_lacking_model_genes_fine_tunes_as_if_they_were_flagged(adata, tokenizer) -> None:
    """Absent genes are [MASK]: the same run as with those genes present but flagged."""
    lacking = adata[:, 4:].copy()
    flagged = adata.copy()
    mask = np.zeros(adata.shape, bool)
    mask[:, :4] = True
    flagged.layers["missing"] = sp.csr_matrix(mask)
    kw = dict(FAST, epochs=2, mode="frozen")
    a = finetune(make_model(), tokenizer, lacking, "label", FinetuneConfig(**kw))
    b = finetune(make_model(), tokenizer, flagged, "label", FinetuneConfig(**kw))
    np.testing.assert_allclose(a.predict_proba(lacking), b.predict_proba(flagged), atol=1e-5)
    assert a.coverage_ is not None and a.coverage_["n_absent"] == 4
    assert a.coverage_["fraction_measured"] == pytest.approx(28 / 32)


def test_coverage_below_the_minimum_names_the_key(adata, tokenizer, tmp_path) -> None:
    lacking = adata[:, 20:].copy()  # 12 of 32 genes
    with pytest.raises(GeneMappingError, match=r"37\.5% on average.*lower min_gene_coverage"):
        finetune(make_model(), tokenizer, lacking, "label", FinetuneConfig(**FAST))
    kw = dict(FAST, epochs=1, mode="frozen", min_gene_coverage=0.3)
    tuned = finetune(make_model(), tokenizer, lacking, "label", FinetuneConfig(**kw))
    loaded = FinetunedModel.load(tuned.save(tmp_path / "ft"))
    assert loaded.coverage_ == tuned.coverage_ and loaded.coverage_["n_absent"] == 20
    with pytest.raises(GeneMappingError, match=r"min_gene_coverage"):
        loaded.predict(adata[:, 28:].copy())  # 4 of 32: below the saved minimum
