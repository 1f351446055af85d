"""The rebuilt speed study (claim 2: per-step BN and layer norm converge in fewer steps) and vertical study
(claim 4: BN between stacked layers): their declared designs, the censored steps-to-target metric and the speed
tuning score (tested in test_tune.py), their claims on hand-built records, and both smoke variants run end to end
through tuning and the final sweep."""

from __future__ import annotations

import json
import os

import pytest

from recnorm.experiments.config import RunConfig
from recnorm.experiments.studies import get_study, speed, vertical
from recnorm.experiments.study import Design, check_wording
from recnorm.experiments.tune import MIN_RATES, MIN_SEEDS, MIN_SPAN, arm_key, tuning_spec
from test_tune import _curve_record

_rec = _curve_record  # a finished run with a validation accuracy curve (test_tune.py)


# ---------------------------------------------------------------------------------------------- the designs
@pytest.mark.parametrize("study_name", ["speed", "vertical"])
def test_the_declared_design(study_name):
    study = get_study(study_name)
    configs = study.spec().expand()
    assert len(configs) == 30 and {c.seed for c in configs} == set(range(10))
    assert all(c.task == "fashion_rows" and c.task_options == {"train_size": 8000, "valid_size": 1000, "test_size": 2000}
               and c.hidden_size == 64 and c.batch_size == 64 and c.clip == 1.0 and c.optimizer == "adam"
               and c.patience == 5 and c.steps == 5000 and c.eval_every == 100 for c in configs)
    # the init study's tuning init (its tuning runs of the one-layer arms are the speed study's, run ID for run ID)
    assert all((c.init, c.init_gain, c.forget_bias) == ("default", 1.0, 1.0) for c in configs)
    tune = tuning_spec(study.spec(), study.tuning, study.tune_at).expand()
    assert len(tune) == 3 * 7 * 2 and {c.seed for c in tune} == {100, 101}
    assert len(study.tuning.lrs) >= MIN_RATES and study.tuning.lrs[-1] / study.tuning.lrs[0] >= MIN_SPAN
    assert len(study.tuning.seeds) >= MIN_SEEDS and not {c.seed for c in configs} & set(study.tuning.seeds)
    assert study.tuning.lrs == (9.487e-5, 3e-4, 9.487e-4, 3e-3, 9.487e-3, 3e-2, 9.487e-2)
    assert all(d.tuned for d in study.designs.values())
    assert "Measured cost" in study.doc and f"python -m recnorm.experiments.tune {study_name} --workers 2" in study.doc
    assert f"python -m recnorm.experiments.tune {study_name} --final --workers 2" in study.doc
    for q in study.questions:
        assert all(k.split(":")[0] in study.designs for k in q.keys)


def test_speed_arms_and_score():
    study = get_study("speed")
    configs = study.spec().expand()
    assert {(c.cell, c.num_layers, c.norm, c.norm_kwargs.get("gain_init")) for c in configs} == {
        ("lstm", 1, None, None), ("lstm", 1, "layer", None), ("lstm", 1, "batch", 0.1)}
    assert study.tuning_score is speed.SPEED_SCORE and study.tuning_score.better == "lower"
    run = _rec(0, {0: 0.1, 300: 0.80, 400: 0.90})
    assert speed.SPEED_SCORE.value(run) == speed.to_target(run) == pytest.approx(350.0)
    assert speed.DESIGNS["speed"].budget == "steps" and speed.DESIGNS["speed"].role == "primary"
    assert speed.DESIGNS["speed_end"].budget == "convergence" and speed.DESIGNS["speed_end"].role == "second look"


def test_vertical_arms():
    study = get_study("vertical")
    configs = study.spec().expand()
    assert {(c.cell, c.num_layers, c.norm, c.between_layers) for c in configs} == {
        ("lstm", 2, None, None), ("lstm", 2, None, "batch"), ("lstm", 2, "sequence_batch", None)}
    assert study.tuning_score is None  # tuned on the final validation accuracy
    assert vertical.DESIGNS["vertical_end"].budget == "convergence" and vertical.DESIGNS["vertical_end"].margin == 0.01
    assert vertical.DESIGNS["vertical_speed"].budget == "steps"


def test_speed_wording_is_checked():
    speed_design = speed.DESIGNS["speed"]
    for c in ("a", "b"):
        check_wording(f"layer norm makes the LSTM reach 0.85 validation accuracy in fewer steps ({c})", speed_design)
    with pytest.raises(ValueError, match="budget is 'steps'"):
        check_wording("layer norm makes the LSTM generalize better", speed_design)
    with pytest.raises(ValueError, match="budget is 'steps'"):
        check_wording("BN between layers ends better", vertical.DESIGNS["vertical_speed"])
    check_wording("BN between layers generalizes better", vertical.DESIGNS["vertical_end"])  # to convergence: allowed
    check_wording("x", Design("m", "higher"))


# ---------------------------------------------------------------------------------------------- the claims
def _curve(cross: float, never: bool = False):
    """A validation curve that crosses 0.85 (and 0.80) at ``cross`` steps: 0.80 at ``cross - 50`` and 0.90 at
    ``cross + 50``, so the interpolated crossing of 0.85 is exactly ``cross`` (and 0.80's is ``cross - 50``)."""
    if never:
        return {0: 0.1, 1000: 0.80, 2000: 0.82}
    return {0: 0.1, cross - 50: 0.80, cross + 50: 0.90}


def test_speed_claims_by_hand():
    records = []
    none_steps = [600, 700, 650, 800, 900, 620, 580, 700, 760, None]  # seed 9 never reaches 0.85: 5000
    layer_steps = [400, 450, 500, 450, 700, 420, 400, 500, 560, 800]
    batch_steps = [620, 690, 640, 820, 880, 640, 590, 690, 770, None]  # about the same as no norm, seed 9 censored
    for seed in range(10):
        records.append(_rec(seed, _curve(none_steps[seed] or 0, none_steps[seed] is None), final=0.86))
        records.append(_rec(seed, _curve(layer_steps[seed]), final=0.86 + 0.001 * seed, norm="layer"))
        records.append(_rec(seed, _curve(batch_steps[seed] or 0, batch_steps[seed] is None), final=0.87,
                            norm="batch", norm_kwargs={"gain_init": 0.1}))
    claims = {c.key: c for c in speed.claims(records)}
    assert set(claims) == {"speed:layer", "speed:batch γ=0.1", "speed_end:layer", "speed_end:batch γ=0.1"}
    none = [5000.0 if s is None else float(s) for s in none_steps]
    diffs = [n - float(l) for n, l in zip(none, layer_steps)]  # positive: layer norm needs fewer steps
    layer = claims["speed:layer"]
    assert layer.test.n == 10 and layer.test.mean == pytest.approx(sum(diffs) / 10)
    # the censored pair counts as 5000 - 800 = 4200 steps: it dominates the spread, so the t test is conservative
    # (inconclusive although layer norm is faster on all 10 seeds); the sign-flip p beside it is 2 / 2**10
    assert layer.test.mean == pytest.approx((sum(diffs[:9]) + 4200.0) / 10) and layer.test.wins == 10
    assert layer.result == "inconclusive" and layer.test.p_sign_flip == pytest.approx(2 / 1024) and layer.counted
    uncensored = [dict(r) for r in records]
    for r in uncensored:  # no norm's seed 9 reaches 0.85 at 1000 steps instead: supported
        if r["seed"] == 9 and r["config"]["norm"] is None:
            r["valid"] = {"step": [0, 950, 1050], "accuracy": [0.1, 0.80, 0.90]}
    assert next(c for c in speed.claims(uncensored) if c.key == "speed:layer").result == "supported"
    # per-step BN: within 20 steps of no norm for every seed, the censored seed equal: equivalent within 100
    bn = claims["speed:batch γ=0.1"]
    assert bn.test.mean == pytest.approx(sum(n - (5000.0 if b is None else b) for n, b in zip(none, batch_steps)) / 10)
    assert bn.result == "equivalent"
    # the second metric: steps to 0.80, 50 steps earlier on each crossing curve; a censored curve reaches 0.80 at 1000
    other_name, other = layer.other
    assert other_name == "steps to 0.8 validation accuracy" and other.n == 10
    assert other.mean == pytest.approx((sum(diffs[:9]) + (1000.0 - 750.0)) / 10)
    # the end point: a second look, never counted
    end = claims["speed_end:batch γ=0.1"]
    assert end.test.mean == pytest.approx(0.01) and not end.counted and "second look" in end.verdict()
    assert "fewer steps" in layer.claim and "fastest learning rate" in layer.claim
    assert layer.budget() == ("a speed claim, within at most 5000 steps (the runs stop early on validation, patience "
                              "5), learning rate tuned per arm")
    assert "to convergence" in end.budget() and "patience 5" in end.budget()


def test_vertical_claims_by_hand():
    records = []
    for seed in range(10):
        jitter = 0.002 * ((seed * 7) % 5 - 2)
        records.append(_rec(seed, _curve(900 + 10 * seed), final=0.86 + jitter, num_layers=2))
        # BN between layers: 300 steps sooner, the same end point (+0.002)
        records.append(_rec(seed, _curve(600 + 10 * seed), final=0.862 + jitter, num_layers=2, between_layers="batch"))
        # sequence-wise BN: 100 steps sooner, 0.03 worse at the end
        records.append(_rec(seed, _curve(800 + 10 * seed), final=0.83 + jitter, num_layers=2, norm="sequence_batch"))
    claims = {c.key: c for c in vertical.claims(records)}
    between_speed = claims["vertical_speed:none+between=batch"]
    assert between_speed.test.mean == pytest.approx(300.0) and between_speed.result == "supported"
    between_end = claims["vertical_end:none+between=batch"]
    assert between_end.test.mean == pytest.approx(0.002) and between_end.result == "equivalent"
    assert between_end.other[1].mean == pytest.approx(0.032)  # against sequence-wise BN
    seq_end = claims["vertical_end:sequence_batch"]
    assert seq_end.test.mean == pytest.approx(-0.03) and seq_end.result == "opposite"
    assert claims["vertical_speed:sequence_batch"].test.mean == pytest.approx(100.0)
    assert all(c.counted for c in claims.values())
    assert "in fewer steps" in between_speed.claim and "rate tuned for its final validation accuracy" in between_speed.claim


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("study_name, arms", [("speed", 3), ("vertical", 3)])
def test_smoke_tuning_then_final_then_claims(tmp_path, study_name, arms):
    from recnorm.experiments.results import load_records
    from recnorm.experiments.tune import main

    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    assert main([study_name, "--smoke", "--runs", runs, "--results", results]) == 0
    choices = json.load(open(os.path.join(results, f"{study_name}-smoke-tune", "choices.json")))
    assert len(choices["arms"]) == arms and all(len(a["curve"]) == 7 for a in choices["arms"])
    if study_name == "speed":  # scored by speed: one step, 0.85 never reached, every rate censored at 1 step
        assert all(a["scored_by"].startswith("mean steps to 0.85") and a["score"] == 1.0 for a in choices["arms"])
    else:
        assert all(a["scored_by"] is None for a in choices["arms"])
    assert main([study_name, "--smoke", "--final", "--runs", runs, "--results", results]) == 0
    records = load_records(os.path.join(results, f"{study_name}-smoke", "runs.jsonl"))
    assert len(records) == arms * 2 and {r["seed"] for r in records} == {0, 1}
    chosen = {a["arm"]: a["lr"] for a in choices["arms"]}
    for r in records:
        assert r["config"]["lr"] == chosen[arm_key(RunConfig.from_dict(r["config"]))]
    claims = get_study(study_name).derive(records)
    assert len(claims) == 4 and all(c.test.n == 2 for c in claims)
    # the evidence page names the score the rates were tuned on
    from recnorm.experiments.evidence import _tuning_lines
    from recnorm.experiments.study import Study

    smoke_study = Study(name=f"{study_name}-smoke", sweep=get_study(study_name).sweep)
    text = "\n".join(_tuning_lines(smoke_study, results))
    assert ("mean steps to 0.85 validation accuracy" in text) == (study_name == "speed")


def test_a_tuned_study_report_makes_no_undeclared_verdicts(tmp_path):
    """The report of a tuned study (here the speed study's smoke runs) shows its declared claims, not the
    generic comparisons (area under the validation curve and the like) that would second-guess them."""
    from recnorm.experiments.report import build_report
    from recnorm.experiments.results import load_records
    from recnorm.experiments.tune import main

    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    assert main(["speed", "--smoke", "--runs", runs, "--results", results]) == 0
    assert main(["speed", "--smoke", "--final", "--runs", runs, "--results", results]) == 0
    doc, verdicts = build_report(os.path.join(runs, "speed-smoke"), figdir=str(tmp_path / "fig"))
    text = doc.markdown("fig")
    assert "generic comparisons (area under the validation curve and the like) are not made here" in text
    assert f"reached {speed.TARGET:.3f}" in text  # the study's declared target, not a generic one
    claims = {c.claim for c in get_study("speed").derive(load_records(os.path.join(results, "speed-smoke", "runs.jsonl")))}
    assert verdicts and all(row[1] in claims for row in verdicts)  # the declared claims, and nothing else
