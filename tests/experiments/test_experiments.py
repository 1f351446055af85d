"""Tests of the run config, the model wrapper and the trainer (train_and_evaluate)."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterator, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from recnorm.experiments.config import ConfigError, RunConfig
from recnorm.experiments.model import build_model
from recnorm.experiments.presets import PRESETS, get_preset, list_presets
from recnorm.experiments.results import load_records
from recnorm.experiments.sweep import run_sweep
from recnorm.experiments.tasks.base import TASKS, Batch, Task, register_task
from recnorm.experiments.train import load_result, train_and_evaluate


class TinyTask(Task):
    """Sum of the inputs, read at the last valid step; optionally variable-length, token ids, or poisoned
    with NaN inputs at one training batch (to force a divergence at a known step)."""

    name = "_test_tiny"
    kind = "regression"
    metric = "mse"
    higher_is_better = False

    def __init__(self, length: int = 6, variable: bool = False, tokens: bool = False,
                 nan_at_batch: Optional[int] = None):
        self.options = {"length": length, "variable": variable, "tokens": tokens, "nan_at_batch": nan_at_batch}
        self.length, self.variable, self.tokens, self.nan_at_batch = length, variable, tokens, nan_at_batch
        self.vocab_size = 5 if tokens else None
        self.input_size = 5 if tokens else 2
        self.num_outputs = 1
        self.seq_len = length

    def _make(self, n: int, gen: torch.Generator) -> Batch:
        T = self.length
        if self.tokens:
            x = torch.randint(0, 5, (T, n), generator=gen)
            values = x.float() / 4
        else:
            x = torch.rand(T, n, 2, generator=gen)
            values = x[..., 0]
        lengths = None
        if self.variable:
            lengths = torch.randint(T // 2, T + 1, (n,), generator=gen)
            lengths[0] = T
            mask = torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)
            values = values * mask
            x = x * mask if self.tokens else x * mask.unsqueeze(-1)
        y = values.sum(0) / T
        return Batch(x, y, lengths)

    def batches(self, split: str, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        if split == "train":
            return self._train(batch_size, seed)
        gen = torch.Generator().manual_seed(123 if split == "valid" else 456)
        return iter([self._make(batch_size, gen) for _ in range(2)])

    def _train(self, batch_size: int, seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed)
        i = 0
        while True:
            i += 1
            batch = self._make(batch_size, gen)
            if self.nan_at_batch is not None and i == self.nan_at_batch:
                batch.x = batch.x * float("nan")
            yield batch

    def _pred(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        if batch.lengths is None:
            return outputs[-1, :, 0]
        return outputs[batch.lengths - 1, torch.arange(outputs.shape[1]), 0]

    def loss(self, outputs, batch):
        return F.mse_loss(self._pred(outputs, batch), batch.y)

    def metrics(self, outputs, batch) -> Dict[str, Tuple[float, float]]:
        sse = float((self._pred(outputs, batch) - batch.y).pow(2).sum())
        return {"mse": (sse, float(batch.y.numel())), "loss": (sse, float(batch.y.numel()))}


if TinyTask.name not in TASKS:
    register_task(TinyTask)


def tiny(**changes) -> RunConfig:
    base = dict(task="_test_tiny", hidden_size=8, batch_size=8, steps=6, eval_every=3, eval_batch_size=8,
                diag_every=3, popstat_batches=2, lr=1e-2)
    base.update(changes)
    return RunConfig(**base)


# ---------------------------------------------------------------------------------------------- config
def test_config_roundtrip_and_stable_run_id():
    cfg = tiny(norm="batch", norm_kwargs={"gain_init": 0.1}, init="orthogonal", init_gain=2)
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.run_id == cfg.run_id
    assert isinstance(cfg.init_gain, float)  # int given for a float field is canonicalized
    assert cfg.replace(threads=4).run_id == cfg.run_id  # execution detail, not identity
    assert cfg.replace(seed=1).run_id != cfg.run_id
    assert cfg.replace(**{"norm_kwargs.gain_init": 1.0}).run_id != cfg.run_id
    assert RunConfig(norm="none") == RunConfig(norm=None)
    assert len(cfg.config_hash) == 10 and cfg.run_id.endswith(cfg.config_hash)


@pytest.mark.parametrize("changes, message", [
    ({"cell": "lstmm"}, "cell: expected one of ['gru', 'lstm', 'rnn'], got 'lstmm'"),
    ({"hidden_size": "64"}, "hidden_size: expected int, got str '64'"),
    ({"hidden_size": 0}, "hidden_size: expected a value > 0, got 0"),
    ({"norm": "batchnorm"}, "norm: expected one of"),
    ({"init": "kaiming"}, "init: expected one of"),
    ({"task": "nope"}, "unknown task 'nope'"),
    ({"task_options": {"bogus": 1}}, "task_options: unknown option(s) ['bogus']"),
    ({"norm": "layer", "norm_kwargs": {"momentum": 0.1}}, "norm_kwargs: unknown option(s) ['momentum']"),
    ({"norm_kwargs": {"gain_init": 0.1}}, "norm_kwargs: expected {} when norm is None"),
    ({"cell": "gru", "forget_bias": 1.0}, "forget_bias: expected None for cell 'gru'"),
    ({"epochs": 2.0}, "steps/epochs: expected exactly one"),
    ({"clip": -1.0}, "clip: expected None or a finite float > 0, got -1.0"),
    ({"dropout": 1.0}, "dropout: expected a float in [0, 1)"),
    ({"optimizer": "lbfgs"}, "optimizer: expected one of"),
])
def test_config_validation_messages(changes, message):
    with pytest.raises(ConfigError) as info:
        tiny(**changes).validate()
    assert message in str(info.value)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['hiden_size'\]"):
        RunConfig.from_dict({"hiden_size": 3})


# ---------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_model_shapes_variable_length_and_tokens(cell):
    from recnorm.experiments.train import make_task

    task = make_task("_test_tiny", {"variable": True, "tokens": True})
    torch.manual_seed(0)
    model = build_model(tiny(cell=cell, num_layers=2, init="orthogonal", init_gain=0.5), task)
    batch = next(task.batches("train", 4, seed=0))
    out = model(batch.x, batch.lengths)
    assert out.shape == (6, 4, 1)
    assert model.embed is not None
    # Packing: the output at a sequence's last valid step must not depend on the padding.
    x2 = batch.x.clone()
    for b, n in enumerate(batch.lengths.tolist()):
        x2[n:, b] = 3
    out2 = model(x2, batch.lengths)
    idx = batch.lengths - 1
    torch.testing.assert_close(out[idx, torch.arange(4)], out2[idx, torch.arange(4)], rtol=0, atol=0)


def test_init_gain_scales_recurrent_weights():
    from recnorm.experiments.train import make_task

    task = make_task("_test_tiny", {})
    norms = []
    for gain in (0.5, 2.0):
        torch.manual_seed(0)
        model = build_model(tiny(init="orthogonal", init_gain=gain), task)
        norms.append(model.rnn.weight_hh_l0.norm().item())
    assert norms[1] == pytest.approx(4 * norms[0], rel=1e-5)


# ---------------------------------------------------------------------------------------------- trainer
def test_train_writes_complete_result(tmp_path):
    cfg = tiny(norm="batch", norm_kwargs={"gain_init": 0.1}, h0_noise=0.1)
    result = train_and_evaluate(cfg, str(tmp_path))
    assert result.status == "ok" and result.steps_done == 6
    files = sorted(os.listdir(tmp_path))
    assert files == ["config.json", "model.pt", "result.json"]  # no temporary files left behind
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["run_id"] == cfg.run_id and data["config"] == cfg.to_dict()
    assert set(data["versions"]) >= {"python", "torch", "recnorm", "platform"}
    assert data["train"]["step"] == [1, 2, 3, 4, 5, 6]
    assert len(data["train"]["grad_norm"]) == 6 and len(data["train"]["clipped"]) == 6
    assert data["valid"]["step"] == [0, 3, 6]
    for key in ("valid", "test", "valid_ema", "test_ema", "test_batch_stats"):
        assert data["final"][key]["mse"] is not None
    diag = data["diagnostics"]
    assert [e["step"] for e in diag["grad_flow"]] == [0, 3, 6]
    assert len(diag["grad_flow"][0]["norms"]["rnn.l0"]) == 6
    assert set(diag["batch_stats"]) == {"init", "final"}
    assert diag["population_stats"]["ema"] and diag["population_stats"]["recomputed"]
    assert load_result(str(tmp_path)).run_id == cfg.run_id


def test_same_seed_gives_identical_curves(tmp_path):
    cfg = tiny(norm="batch", dropout=0.0, h0_noise=0.1, num_layers=2)
    a = train_and_evaluate(cfg, str(tmp_path / "a"))
    b = train_and_evaluate(cfg, str(tmp_path / "b"))
    c = train_and_evaluate(cfg.replace(seed=1), str(tmp_path / "c"))
    assert a.train["loss"] == b.train["loss"] and a.train["grad_norm"] == b.train["grad_norm"]
    wall = ("time",)  # wall-clock seconds are the only thing allowed to differ
    assert {k: v for k, v in a.valid.items() if k not in wall} == {k: v for k, v in b.valid.items() if k not in wall}
    assert a.final == b.final and a.diagnostics == b.diagnostics
    assert a.train["loss"] != c.train["loss"]


def test_diagnostics_do_not_change_the_trajectory(tmp_path):
    # Diagnostics run forward/backward in training mode; they must restore the RNG (h0 noise) and the
    # running statistics, or a run's curves would depend on diag_every.
    cfg = tiny(norm="batch", h0_noise=0.1)
    a = train_and_evaluate(cfg.replace(diag_every=1), str(tmp_path / "a"))
    b = train_and_evaluate(cfg.replace(diag_every=None), str(tmp_path / "b"))
    assert a.train["loss"] == b.train["loss"]
    assert a.final == b.final
    assert len(a.diagnostics["grad_flow"]) == 7 and len(b.diagnostics["grad_flow"]) == 2
    # Evaluations recompute population statistics for BN models and must restore the running averages.
    c = train_and_evaluate(cfg.replace(eval_every=1), str(tmp_path / "c"))
    assert c.train["loss"] == b.train["loss"] and c.final["test_ema"] == b.final["test_ema"]
    assert c.valid["step"] == [0, 1, 2, 3, 4, 5, 6]
    # After 6 steps the running averages still differ from the exact statistics (they were not replaced).
    pop = c.diagnostics["population_stats"]
    assert pop["ema"] != pop["recomputed"] and c.final["test_ema"] != c.final["test"]


def test_divergence_is_recorded_not_raised(tmp_path):
    result = train_and_evaluate(tiny(task_options={"nan_at_batch": 4}), str(tmp_path))
    assert result.status == "diverged"
    assert result.diverged_step == 4 and "nan" in result.diverged_reason
    assert result.steps_done == 3 and result.train["step"] == [1, 2, 3]
    assert result.final == {}
    data = json.loads((tmp_path / "result.json").read_text())  # strict JSON, no NaN
    assert data["status"] == "diverged" and data["diverged_step"] == 4


def test_huge_learning_rate_diverges(tmp_path):
    result = train_and_evaluate(tiny(optimizer="sgd", lr=1e30, clip=None, steps=10), str(tmp_path))
    assert result.status == "diverged"
    assert 1 <= result.diverged_step <= 10


def test_clipping_events_are_counted(tmp_path):
    result = train_and_evaluate(tiny(clip=1e-6), str(tmp_path))
    assert all(result.train["clipped"])
    result = train_and_evaluate(tiny(clip=None), str(tmp_path / "b"))
    assert not any(result.train["clipped"])


def test_epochs_resolve_to_steps(tmp_path):
    cfg = tiny(task="digits", task_options={"train_size": 40, "valid_size": 8, "test_size": 8},
               steps=None, epochs=0.5, eval_every=100, diag_every=None)
    result = train_and_evaluate(cfg, str(tmp_path))
    assert result.steps_planned == math.ceil(0.5 * 40 / 8)


def test_invalid_config_fails_before_writing(tmp_path):
    with pytest.raises(ConfigError):
        train_and_evaluate(tiny(cell="cnn"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", list_presets())
def test_preset_smoke_runs(name, tmp_path):
    spec = get_preset(name, smoke=True)
    full = get_preset(name)
    assert full.__class__ is spec.__class__ and len(full.expand()) >= len(spec.expand())
    assert "Command:" in PRESETS[name].__doc__ and "Running time:" in PRESETS[name].__doc__
    outcome = run_sweep(spec, str(tmp_path), workers=1)
    assert outcome.finished, outcome.failed
    records = load_records(str(tmp_path))
    assert len(records) == len(spec.expand())
    assert all(r["steps_planned"] == 1 for r in records)
