"""Tuning a learning rate per arm: the declared grid is checked, the choice is made on the validation split
(hand-built records), and a tiny real tuning + final sweep runs end to end on digits."""

from __future__ import annotations

import json
import math
import os

import pytest

from recnorm.experiments.config import RunConfig
from recnorm.experiments.study import Study, TuningScore, steps_to_target
from recnorm.experiments.sweep import SweepSpec
from recnorm.experiments.tune import (
    CHOICES_FILE, TuningGrid, arm_key, choose, final_spec, read_choices, run_final, tune_study, tuning_spec)

GRID = TuningGrid((1e-4, 1e-3, 1e-2, 1e-1), seeds=(100, 101))


@pytest.mark.parametrize("lrs, seeds, match", [
    ((1e-3, 1e-2, 1e-1), (0, 1), ">= 4"),  # too few rates
    ((1e-3, 2e-3, 4e-3, 8e-3), (0, 1), "span"),  # 8x, not 30x
    ((1e-4, 1e-3, 1e-2, 1e-0), (0, 1), "log-spaced"),  # the last ratio is 100, not 10
    ((1e-4, 1e-3, 1e-2, 1e-1), (0, 0), "seeds"),  # one tuning seed
    ((1e-3, 1e-4, 1e-2, 1e-1), (0, 1), "increasing"),
])
def test_grid_refuses_what_the_design_forbids(lrs, seeds, match):
    with pytest.raises(ValueError, match=match):
        TuningGrid(lrs, seeds)


def test_log_spaced_grid_keeps_its_ends_and_a_constant_ratio():
    g = TuningGrid.log_spaced(3e-4, 3e-2, 5)
    assert g.lrs[0] == 3e-4 and g.lrs[-1] == 3e-2 and len(g.lrs) == 5
    ratios = [b / a for a, b in zip(g.lrs, g.lrs[1:])]
    assert all(r == pytest.approx(100 ** 0.25, rel=1e-3) for r in ratios)


def _record(lr, seed, valid, norm=None, status="ok", test=0.0):
    cfg = RunConfig(task="digits", lr=lr, seed=seed, norm=norm)
    return {"run_id": cfg.run_id, "config": cfg.to_dict(), "seed": seed, "metric": "accuracy",
            "higher_is_better": True, "status": status,
            "final": {"valid": {"accuracy": valid}, "test": {"accuracy": test}} if status == "ok" else {}}


def test_choice_is_the_best_mean_validation_metric_and_a_divergence_is_the_worst():
    records = []
    valid = {1e-4: (0.50, 0.52), 1e-3: (0.70, 0.74), 1e-2: (0.90, None), 1e-1: (0.10, 0.12)}
    for lr, (a, b) in valid.items():
        records.append(_record(lr, 100, a, test=1.0 - a))  # test is opposite to valid: must never be used
        records.append(_record(lr, 101, b, status="ok" if b is not None else "diverged"))
        # layer norm: 1e-2 best on both seeds
        records.append(_record(lr, 100, {1e-2: 0.95}.get(lr, 0.5), norm="layer"))
        records.append(_record(lr, 101, {1e-2: 0.93}.get(lr, 0.5), norm="layer"))
    choices = choose(records, GRID)
    none = choices[arm_key(RunConfig(task="digits"))]
    layer = choices[arm_key(RunConfig(task="digits", norm="layer"))]
    assert none.lr == 1e-3 and none.score == pytest.approx(0.72) and not none.at_edge  # 1e-2 diverged once
    assert none.curve[1e-2] == [0.90, None] and none.curve[1e-4] == [0.50, 0.52]
    assert layer.lr == 1e-2 and layer.score == pytest.approx(0.94)
    assert "layer" in layer.label and len(layer.run_ids) == 8
    # ties go to the smaller rate
    tie = [_record(lr, s, 0.5) for lr in GRID.lrs for s in GRID.seeds]
    only = choose(tie, GRID)[arm_key(RunConfig(task="digits"))]
    assert only.lr == 1e-4 and only.at_edge
    with pytest.raises(ValueError, match="expected a rate in"):
        choose([_record(3e-3, 100, 0.5)], GRID)


def test_final_spec_uses_the_chosen_rate_and_fresh_seeds():
    spec = SweepSpec(name="s", base=RunConfig(task="digits", steps=2), grids=[{"norm": [None, "layer"], "seed": [0, 1]}])
    tune = tuning_spec(spec, GRID)
    configs = tune.expand()
    assert len(configs) == 2 * 4 * 2 and {c.seed for c in configs} == {100, 101}
    assert {c.lr for c in configs} == set(GRID.lrs)
    records = [_record(c.lr, c.seed, 0.9 if (c.lr == 1e-2) == (c.norm is None) else 0.5, norm=c.norm)
               for c in configs]
    for r, c in zip(records, configs):
        r["config"] = c.to_dict()
    choices = choose(records, GRID)
    final = final_spec(spec, choices, seeds=[0, 1, 2], grid=GRID).expand()
    assert len(final) == 6 and {c.seed for c in final} == {0, 1, 2}
    assert {c.norm: c.lr for c in final} == {None: 1e-2, "layer": 1e-4}
    with pytest.raises(ValueError, match="fresh seeds"):
        final_spec(spec, choices, seeds=[100, 1], grid=GRID)
    with pytest.raises(ValueError, match="has no tuned rate"):
        final_spec(spec, {}, seeds=[0])


def test_tuning_end_to_end_on_digits(tmp_path):
    def sweep(smoke: bool = False) -> SweepSpec:
        """Tiny digits sweep. Command: none. Running time: seconds."""
        base = RunConfig(task="digits", task_options={"train_size": 64, "valid_size": 32, "test_size": 32},
                         hidden_size=8, steps=3, batch_size=16, eval_every=3, eval_batch_size=32, diag_every=None,
                         popstat_batches=1)
        return SweepSpec(name="tiny", base=base, grids=[{"norm": [None, "layer"], "seed": [0, 1]}])

    grid = TuningGrid((1e-3, 1e-2, 1e-1, 1.0), seeds=(100, 101))
    study = Study(name="tiny", sweep=sweep, tuning=grid, final_seeds=(0, 1))
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    choices = tune_study(study, runs, results)
    assert len(choices) == 2 and all(c.lr in grid.lrs for c in choices.values())
    for c in choices.values():  # the chosen rate has the best mean validation accuracy of its curve
        means = {lr: sum(-math.inf if v is None else v for v in vals) / 2 for lr, vals in c.curve.items()}
        assert means[c.lr] == max(means.values()) and len(c.curve) == 4
    assert read_choices(os.path.join(results, "tiny-tune", CHOICES_FILE))[0].keys() == choices.keys()
    lines = open(os.path.join(results, "tiny-tune", "runs.jsonl")).read().splitlines()
    assert len(lines) == 16
    assert run_final(study, runs, results).finished
    final = [json.loads(line) for line in open(os.path.join(results, "tiny", "runs.jsonl"))]
    assert len(final) == 4 and {r["seed"] for r in final} == {0, 1}
    for r in final:
        assert r["config"]["lr"] == choices[arm_key(RunConfig.from_dict(r["config"]))].lr
    # the evidence page shows each arm's chosen rate and tuning curve in the study's section
    from recnorm.experiments.evidence import build_evidence
    from recnorm.experiments.study import Question

    os.makedirs(tmp_path / "docs")
    asked = Study(name="tiny", sweep=sweep, tuning=grid, final_seeds=(0, 1), questions=(Question("q", ("x",)),))
    page = build_evidence(results, str(tmp_path / "docs"), [asked])
    assert "Learning rates chosen per arm on the validation split (grid 0.001, 0.01, 0.1, 1" in page
    assert "| arm | chosen lr | lr 0.001 | lr 0.01 | lr 0.1 | lr 1 |" in page
    with pytest.raises(ValueError, match="final_seeds must be fresh"):
        Study(name="bad", sweep=sweep, tuning=grid, final_seeds=(100,))


def test_tuning_table_shows_the_chosen_rate_and_the_curve():
    from recnorm.experiments.tune import tuning_table

    records = [_record(lr, s, {1e-3: 0.8}.get(lr, 0.4) + 0.02 * (s - 100)) for lr in GRID.lrs for s in GRID.seeds]
    records[-1] = _record(1e-1, 101, None, status="diverged")
    lines = tuning_table(choose(records, GRID), GRID)
    assert lines[0] == "| arm | chosen lr | lr 0.0001 | lr 0.001 | lr 0.01 | lr 0.1 |"
    assert lines[2] == "| no norm | 0.001 | 0.410 | **0.810** | 0.410 | 0.400 ✗ |"


def test_arm_labels_read_as_words():
    """The tuning table names an arm in words, once: not "none+between=batch, between_layers=batch"."""
    from recnorm.experiments.tune import arm_words

    assert arm_words("none+between=batch, between_layers=batch") == "no norm, BN between layers"
    assert arm_words("sequence_batch, between_layers=None") == "sequence-wise BN"
    assert arm_words("batch γ=0.1, cell=lstm, forget_bias=1.0, task=adding, task_options.length=100, "
                     "task_options.test_size=1000") == "per-step BN (γ0 = 0.1) · LSTM · forget bias 1 · adding · T = 100"
    assert arm_words("layer, cell=rnn, forget_bias=None, task=fashion_rows") == "layer norm · RNN · fashion_rows"
    assert arm_words("none, hidden_size=64") == "no norm · hidden_size=64"  # other fields stay as they are


def test_tuning_at_a_fixed_init_then_holding_the_rate_while_the_init_varies():
    base = RunConfig(task="digits", steps=2, cell="lstm")
    spec = SweepSpec(name="s", base=base, grids=[
        {"norm": [None, "layer"], "init": ["orthogonal", "xavier"], "init_gain": [0.1, 1.0, 10.0],
         "forget_bias": [0.0, 1.0], "seed": [0]},
        {"cell": ["rnn"], "norm": [None], "init": ["orthogonal", "xavier"], "init_gain": [0.1, 10.0], "seed": [0]}])
    at = {"init": "xavier", "init_gain": 1.0, "forget_bias": 1.0}
    tune = tuning_spec(spec, GRID, at).expand()
    # per norm and cell: one arm at the default init (the rnn grid has no forget bias to fix)
    assert {(c.cell, c.norm, c.init, c.init_gain, c.forget_bias) for c in tune} == {
        ("lstm", None, "xavier", 1.0, 1.0), ("lstm", "layer", "xavier", 1.0, 1.0), ("rnn", None, "xavier", 1.0, None)}
    assert len(tune) == 3 * 4 * 2
    records = []
    for c in tune:
        best = {("lstm", None): 1e-3, ("lstm", "layer"): 1e-1, ("rnn", None): 1e-2}[(c.cell, c.norm)]
        r = _record(c.lr, c.seed, 0.9 if c.lr == best else 0.3)
        r["config"] = c.to_dict()
        records.append(r)
    ignore = tuple(at)
    choices = choose(records, GRID, ignore)
    assert len(choices) == 3
    final = final_spec(spec, choices, seeds=[0, 1], grid=GRID, ignore=ignore).expand()
    assert len(final) == 2 * len(spec.expand())  # every setting of the study, at two fresh seeds
    for c in final:
        assert c.lr == {("lstm", None): 1e-3, ("lstm", "layer"): 1e-1, ("rnn", None): 1e-2}[(c.cell, c.norm)]


def test_each_evidence_row_names_the_learning_rate_of_each_arm():
    from types import SimpleNamespace

    from recnorm.experiments.evidence import _rates_cell

    rates = {"a1": ("none", 0.003), "a2": ("none", 0.003), "b1": ("layer", 0.0009487), "c1": ("batch γ=0.1", 0.03)}
    assert _rates_cell(SimpleNamespace(runs=("a1", "b1", "a2")), rates) == "layer 0.0009487; none 0.003"
    assert _rates_cell(SimpleNamespace(runs=("zz",)), rates) == "–"


def test_the_evidence_page_says_which_commits_made_each_study():
    from recnorm.experiments.evidence import commits_of

    records = [{"provenance": {"commit": "a" * 40, "dirty": False}}, {"provenance": {"commit": "a" * 40, "dirty": True}},
               {"provenance": {"commit": "b" * 40}}, {"provenance": {"commit": None, "committed_in": "c" * 40}}, {}]
    assert commits_of(records) == {"a" * 10: 1, "a" * 10 + " (dirty tree)": 1, "b" * 10: 1,
                                   "before runs recorded their commit (arrived in " + "c" * 10 + ")": 1, "unknown": 1}

def _curve_record(seed, curve, *, final=0.85, status="ok", planned=5000, lr=1e-3, steps=None, **config):
    """A finished run with a validation accuracy curve ``curve`` ({step: accuracy})."""
    cfg = RunConfig(task="fashion_rows", seed=seed, lr=lr, **config)
    steps = steps if steps is not None else list(curve)
    return {"run_id": f"{cfg.run_id}-{seed}-{lr}", "seed": seed, "config": cfg.to_dict(), "metric": "accuracy",
            "higher_is_better": True, "status": status, "steps_planned": planned, "task": {"name": "fashion_rows"},
            "valid": {"step": steps, "accuracy": [curve[s] for s in steps]},
            "final": {"test": {"accuracy": final}, "valid": {"accuracy": final}} if status == "ok" else {}}


def test_steps_to_target_interpolates_between_evaluations_and_censors_at_the_budget():
    # crosses 0.85 between step 300 (0.80) and 400 (0.90): 300 + (0.05 / 0.10) * 100 = 350
    assert steps_to_target(_curve_record(0, {0: 0.1, 100: 0.5, 200: 0.7, 300: 0.80, 400: 0.90, 500: 0.86}), 0.85) == 350.0
    # exactly on an evaluation
    assert steps_to_target(_curve_record(0, {0: 0.1, 100: 0.85, 200: 0.9}), 0.85) == 100.0
    # the first crossing counts, not a later one
    assert steps_to_target(_curve_record(0, {0: 0.1, 100: 0.86, 200: 0.7, 300: 0.9}), 0.85) == pytest.approx(
        0 + (0.75 / 0.76) * 100)
    # never reached (stopped early at 2000 steps): censored at the maximum budget, not at the stop
    assert steps_to_target(_curve_record(0, {0: 0.1, 1000: 0.84, 2000: 0.83}), 0.85) == 5000.0
    # diverged (a None after the last finite evaluation) before reaching it: censored too
    assert steps_to_target(_curve_record(0, {0: 0.1, 100: 0.5, 200: None}, status="diverged"), 0.85) == 5000.0
    # a metric where lower is better (MSE): crossing 0.01 between 0.02 at 100 and 0.0 at 200 -> 150
    r = _curve_record(0, {0: 0.17, 100: 0.02, 200: 0.0})
    r["higher_is_better"], r["metric"], r["valid"]["mse"] = False, "mse", r["valid"].pop("accuracy")
    assert steps_to_target(r, 0.01) == 150.0
    # no curve at all: no value
    assert steps_to_target({"metric": "accuracy", "higher_is_better": True, "valid": {}}, 0.85) is None


def test_the_speed_score_chooses_the_fastest_rate_not_the_best_end_point():
    grid = TuningGrid((1e-4, 1e-3, 1e-2, 1e-1), seeds=(100, 101))
    records = []
    for seed in grid.seeds:
        # 1e-3: slow (crosses 0.85 at 900) but ends best (0.90); 1e-2: fast (crosses at 250) and ends at 0.87;
        # 1e-1: fastest for seed 100 (150) but diverges for seed 101; 1e-4: never reaches it
        records.append(_curve_record(seed, {0: 0.1, 800: 0.80, 1000: 0.90}, final=0.90, lr=1e-3))
        records.append(_curve_record(seed, {0: 0.1, 200: 0.80, 300: 0.90}, final=0.87, lr=1e-2))
        records.append(_curve_record(seed, {0: 0.1, 100: 0.80, 200: 0.90}, final=0.86, lr=1e-1,
                            status="ok" if seed == 100 else "diverged"))
        records.append(_curve_record(seed, {0: 0.1, 1000: 0.5}, final=0.5, lr=1e-4))
    key = arm_key(RunConfig(task="fashion_rows"))
    by_end = choose(records, grid)[key]
    assert by_end.lr == 1e-3 and by_end.scored_by is None  # the default: the best final validation accuracy
    speed = TuningScore("mean steps to 0.85 validation accuracy (censored at the maximum budget)",
                        lambda r: steps_to_target(r, 0.85), "lower")
    fast = choose(records, grid, score=speed)[key]
    assert fast.lr == 1e-2 and fast.score == pytest.approx(250.0) and not fast.higher_is_better
    assert fast.curve[1e-4] == [5000.0, 5000.0] and fast.curve[1e-1] == [150.0, None]  # the diverged run: worst
    assert fast.scored_by.startswith("mean steps to 0.85 validation accuracy")
    from recnorm.experiments.tune import ArmChoice, tuning_table

    assert ArmChoice.from_dict(json.loads(json.dumps(fast.to_dict()))).scored_by == fast.scored_by
    row = tuning_table({key: fast}, grid)[2]
    assert row == "| no norm | 0.01 | 5000 | 900 | **250** | 150 ✗ |"
    with pytest.raises(ValueError, match="better"):
        TuningScore("x", lambda r: 0.0, "up")
