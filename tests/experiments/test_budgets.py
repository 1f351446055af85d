"""Honest budgets: early stopping on validation (declared patience, a maximum budget, recorded per run), the
fraction of a study's runs that stopped early, and a claim measured at N steps may not say where training
ends up."""

from __future__ import annotations

import json

import pytest
import torch

import recnorm.experiments.train as train_module
from recnorm.experiments.config import ConfigError, RunConfig
from recnorm.experiments.study import Claim, Design, check_wording, stopped_early
from recnorm.experiments.train import load_model, train_and_evaluate
import recnorm.experiments.statistics as st

TINY = dict(task="digits", task_options={"train_size": 64, "valid_size": 32, "test_size": 32}, hidden_size=8,
            batch_size=16, eval_every=1, eval_batch_size=32, diag_every=None, popstat_batches=1, lr=1e-2)


def _scripted_valid(monkeypatch, values):
    """Make the validation evaluations during training return ``values`` in turn (later ones: 0)."""
    real, script = train_module.evaluate, list(values)

    def in_loop(model, task, split, batch_size, max_batches=None):
        out = real(model, task, split, batch_size, max_batches)
        if split == "valid" and script:
            out["accuracy"] = script.pop(0)
        return out

    monkeypatch.setattr(train_module, "evaluate", in_loop)


@pytest.mark.parametrize("norm", [None, "batch"])
def test_stops_after_patience_evaluations_without_progress_and_keeps_the_best_weights(tmp_path, monkeypatch, norm):
    # evaluations at steps 0..: best at step 2, then 2 evaluations (3, 4) without progress -> stop at 4
    _scripted_valid(monkeypatch, [0.1, 0.5, 0.6, 0.55, 0.6, 0.9, 0.95])
    seen = {}

    def on_step(step, model, info):
        seen[step] = {k: v.clone() for k, v in model.state_dict().items()}

    config = RunConfig(**TINY, steps=20, patience=2, norm=norm, seed=3)
    result = train_and_evaluate(config, str(tmp_path), on_step=on_step)
    assert result.status == "ok" and result.steps_done == 4 and result.valid["step"] == [0, 1, 2, 3, 4]
    assert result.extras["early_stopping"] == {"patience": 2, "max_steps": 20, "stopped_early": True,
                                               "stopped_step": 4, "best_step": 2, "best_valid": 0.6}
    saved = load_model(str(tmp_path)).state_dict()
    for k, v in seen[2].items():  # the final evaluation and model.pt use the weights of step 2, not step 4
        if v.dtype.is_floating_point and "running" not in k:
            torch.testing.assert_close(saved[k], v, rtol=0, atol=0)
    assert any(not torch.equal(seen[4][k], seen[2][k]) for k in seen[2] if seen[2][k].dtype.is_floating_point)


def test_a_run_that_keeps_improving_runs_its_whole_budget(tmp_path, monkeypatch):
    _scripted_valid(monkeypatch, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    result = train_and_evaluate(RunConfig(**TINY, steps=5, patience=1), str(tmp_path))
    assert result.steps_done == 5
    assert result.extras["early_stopping"]["stopped_early"] is False
    assert result.extras["early_stopping"]["best_step"] == 5


def test_without_patience_nothing_changes(tmp_path):
    result = train_and_evaluate(RunConfig(**TINY, steps=3), str(tmp_path))
    assert result.steps_done == 3 and "early_stopping" not in result.extras
    # the new field stays out of the run id while unset: committed runs keep their ids
    line = open("results/default/runs.jsonl").readline()
    record = json.loads(line)
    assert RunConfig.from_dict(record["config"]).run_id == record["run_id"]
    assert RunConfig(**TINY, patience=3).run_id != RunConfig(**TINY).run_id
    with pytest.raises(ConfigError, match="patience"):
        RunConfig(**TINY, patience=0).validate()


def test_stopped_early_fraction():
    records = [{"extras": {"early_stopping": {"stopped_early": s}}} for s in (True, True, False)] + [{"extras": {}}]
    assert stopped_early(records) == (2, 3)
    diverged = {"status": "diverged", "extras": {"early_stopping": {"stopped_early": False}}}
    assert stopped_early(records + [diverged]) == (2, 3)  # it ended for another reason than the budget


@pytest.mark.parametrize("text", ["BN ends better than no norm", "layer norm generalizes better",
                                  "BN lowers bpc", "the padded batches end worse"])
def test_end_state_wording_is_refused_on_a_steps_claim(text):
    steps, convergence = Design("final test accuracy", "higher"), Design("final test accuracy", "higher",
                                                                          budget="convergence", patience=5)
    with pytest.raises(ValueError, match="budget is 'steps'"):
        check_wording(text, steps)
    check_wording(text, convergence)  # fine when measured to convergence
    test = st.paired_test([0.1, 0.2], margin=0.01)
    with pytest.raises(ValueError, match="budget is 'steps'"):
        Claim(key="k", claim=text, source="s", task="t", evidence="e", test=test, design=steps)
    check_wording("BN is better at the end of the step budget", steps)


def test_evidence_page_states_the_fraction_stopped_early():
    from recnorm.experiments.evidence import _budget_line

    assert _budget_line((0, 0))[0] == "Budget: a fixed number of steps for every run (no early stopping)."
    assert "19 of 20 runs (95%) stopped before their maximum budget" in _budget_line((19, 20))[0]
    assert "below 90%" in _budget_line((17, 20))[0]


def test_early_stopping_survives_a_checkpoint_resume(tmp_path):
    from recnorm.experiments.checkpoint import FileCheckpoint

    config = RunConfig(task="adding", task_options={"length": 8, "valid_size": 16, "test_size": 16}, hidden_size=8,
                       batch_size=8, steps=40, eval_every=2, eval_batch_size=16, diag_every=None, popstat_batches=1,
                       lr=0.01, patience=2, seed=1)  # the validation MSE stops improving after step 8
    whole = train_and_evaluate(config, str(tmp_path / "whole"))

    class Stop(Exception):
        pass

    def stop_at_10(step, total, info):  # after the checkpoint at step 8, which holds the best evaluation
        if "loss" in info and step == 10:
            raise Stop

    ckpt = FileCheckpoint(str(tmp_path / "ckpt.pt"), every=4)
    with pytest.raises(Stop):
        train_and_evaluate(config, str(tmp_path / "cut"), progress=stop_at_10, checkpoint=ckpt)
    resumed = train_and_evaluate(config, str(tmp_path / "cut"), checkpoint=ckpt)
    assert whole.extras["early_stopping"]["stopped_step"] == 12 and whole.extras["early_stopping"]["best_step"] == 8
    assert resumed.extras["early_stopping"] == whole.extras["early_stopping"]
    assert resumed.final["test"] == whole.final["test"] and resumed.steps_done == whole.steps_done
