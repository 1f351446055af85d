"""The engine resolves cells and norms through the registries: a cell and a norm registered outside recnorm
train through ``recnorm --import MODULE train --cell NAME --norm NAME`` on a slice of real data."""

import json
import os

import pytest
import torch

import registry_toys
from recnorm.cli import main
from recnorm.experiments.config import ConfigError, RunConfig, cell_options, is_batch_norm
from recnorm.nn import list_cells


@pytest.fixture
def toys():
    registry_toys.register()
    yield
    registry_toys.unregister()


def test_a_registered_cell_and_norm_train_through_the_cli(tmp_path, monkeypatch, capsys):
    # What a user's plugin module does: import its pieces and register them.
    (tmp_path / "my_recnorm_plugin.py").write_text("import registry_toys\nregistry_toys.register()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = str(tmp_path / "run")
    args = ["--import", "my_recnorm_plugin", "train", "--task", "digits",
            "--task-options", '{"train_size": 48, "valid_size": 16, "test_size": 16}',
            "--cell", "toy_mgu", "--norm", "toy_hh_rms", "--norm-kwargs", '{"gain_init": 0.5}',
            "--hidden-size", "8", "--batch-size", "16", "--steps", "3", "--eval-every", "3",
            "--eval-batch-size", "16", "--diag-every", "0", "--init", "orthogonal", "--out", out]
    try:
        assert main(args) == 0, capsys.readouterr().err
    finally:
        registry_toys.unregister()
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    assert result["config"]["cell"] == "toy_mgu" and result["config"]["norm"] == "toy_hh_rms"
    assert result["status"] == "ok" and result["steps_done"] == 3
    accuracy = result["final"]["test"]["accuracy"]
    assert 0.0 <= accuracy <= 1.0  # 16 real test digits were classified
    weights = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    # the toy cell's two gate blocks, and its norm at the recurrent site only (gain as configured, then trained)
    assert weights["rnn.weight_hh_l0"].shape == (2 * 8, 8)
    assert "rnn.norm_hh_l0.weight" in weights and not any(k.startswith("rnn.norm_ih") for k in weights)


def test_an_unknown_module_or_cell_fails_with_the_valid_names(tmp_path, capsys):
    assert main(["--import", "no_such_recnorm_plugin", "tasks"]) == 2
    assert "--import no_such_recnorm_plugin" in capsys.readouterr().err
    assert main(["train", "--cell", "toy_mgu", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert f"cell: expected one of {list_cells()}, got 'toy_mgu'" in capsys.readouterr().err


def test_the_config_reads_the_cell_and_norm_registries(toys):
    RunConfig(cell="toy_mgu", norm="toy_hh_rms", norm_kwargs={"eps": 1e-3}).validate()
    assert cell_options(RunConfig(cell="toy_mgu")) == {}
    assert cell_options(RunConfig(cell="rnn", nonlinearity="relu")) == {"nonlinearity": "relu"}
    assert [is_batch_norm(n) for n in (None, "layer", "batch", "sequence_batch", "toy_hh_rms")] == [
        False, False, True, True, False]
    with pytest.raises(ConfigError, match="nonlinearity: expected 'tanh' for cell 'toy_mgu'"):
        RunConfig(cell="toy_mgu", nonlinearity="relu").validate()
    with pytest.raises(ConfigError, match="forget_bias: expected None for cell 'toy_mgu'"):
        RunConfig(cell="toy_mgu", forget_bias=1.0).validate()
    with pytest.raises(ConfigError, match=r"norm_kwargs: unknown option\(s\) \['momentum'\] for norm 'toy_hh_rms'"):
        RunConfig(norm="toy_hh_rms", norm_kwargs={"momentum": 0.1}).validate()
