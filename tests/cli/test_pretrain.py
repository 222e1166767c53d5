"""``bulkfm pretrain consolidate``: the CLI's model folder is the Python API's, and every
wrong CHECKPOINT or -o is a one-line error that says what to give instead.

``bulkfm pretrain --config`` itself is exercised in tests/train/ and the bad-input cases.
"""

from __future__ import annotations

import pytest
import torch

from bulkfm.cli import main
from bulkfm.models.bulkrnabert import load_pretrained
from bulkfm.train.pretrain import consolidate_checkpoint
from tests.train.test_fsdp_checkpoint import write_sharded_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def sharded(tmp_path, tiny_model):
    torch.manual_seed(1)
    model = tiny_model(n_genes=12)
    run = tmp_path / "run"
    checkpoint = write_sharded_checkpoint(run / "checkpoints" / "step_0000006", model)
    (checkpoint / "trainer_state.json").write_text("{}")  # what marks a complete checkpoint
    return checkpoint, model


def test_consolidate_writes_what_the_python_api_writes(sharded, tmp_path, capsys) -> None:
    checkpoint, model = sharded
    assert main(["pretrain", "consolidate", str(checkpoint), "-o", str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    api = consolidate_checkpoint(checkpoint, tmp_path / "api")
    by_cli, cli_tokenizer = load_pretrained(tmp_path / "cli")
    by_api, api_tokenizer = load_pretrained(api)
    for name, value in model.state_dict().items():  # the weights that were sharded
        assert torch.equal(by_cli.state_dict()[name], value), name
        assert torch.equal(by_api.state_dict()[name], value), name
    assert cli_tokenizer.genes == api_tokenizer.genes
    # without -o: beside the shards, as the Python default
    assert main(["pretrain", "consolidate", str(checkpoint)]) == 0
    assert capsys.readouterr().out.strip() == str(checkpoint / "consolidated")
    assert (checkpoint / "consolidated" / "model.safetensors").is_file()


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_plain_checkpoint_is_already_consolidated(sharded, tmp_path, capsys) -> None:
    _, model = sharded
    model.save_pretrained(tmp_path / "plain")
    err = _error(["pretrain", "consolidate", str(tmp_path / "plain")], capsys)
    assert "already a plain checkpoint" in err and "nothing to consolidate" in err


def test_what_is_not_a_checkpoint_is_named(sharded, tmp_path, capsys) -> None:
    checkpoint, _ = sharded
    run = checkpoint.parents[1]
    err = _error(["pretrain", "consolidate", str(run)], capsys)
    assert "not a pre-training checkpoint" in err and f"newest checkpoint is {checkpoint}" in err
    (tmp_path / "empty").mkdir()
    err = _error(["pretrain", "consolidate", str(tmp_path / "empty")], capsys)
    assert "give a folder under checkpoints/" in err
    assert "does not exist" in _error(["pretrain", "consolidate", str(tmp_path / "no")], capsys)
    (tmp_path / "f.txt").write_text("x")
    assert "is a file" in _error(["pretrain", "consolidate", str(tmp_path / "f.txt")], capsys)


def test_output_that_cannot_take_a_model_is_refused(sharded, tmp_path, capsys) -> None:
    checkpoint, _ = sharded
    (tmp_path / "f.txt").write_text("x")
    err = _error(
        ["pretrain", "consolidate", str(checkpoint), "-o", str(tmp_path / "f.txt")], capsys
    )
    assert "OutputPathError" in err and "-o" in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    err = _error(["pretrain", "consolidate", str(checkpoint), "-o", str(tmp_path / "mine")], capsys)
    assert "not a model folder" in err and "give -o a new or empty folder" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_damaged_shards_name_the_file_and_what_to_do(sharded, capsys) -> None:
    checkpoint, _ = sharded
    (checkpoint / "fsdp" / "__0_0.distcp").unlink()
    err = _error(["pretrain", "consolidate", str(checkpoint)], capsys)
    assert str(checkpoint / "fsdp" / "__0_0.distcp") in err and "missing" in err
    assert "consolidate another one of the run" in err
    assert not (checkpoint / "consolidated").exists()


def test_pretrain_still_needs_a_config(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["pretrain"])
    assert info.value.code == 2
    assert "required: --config" in capsys.readouterr().err
