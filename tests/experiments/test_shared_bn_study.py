"""Shared BN as two claims: with the same γ0, shared and per-step BN train identically, so the training
effect measured with exact per-step statistics is exactly zero; the evaluation effect compares one shared
population statistic against one per step on the same model."""

from __future__ import annotations

import pytest

from recnorm.experiments.results import load_records
from recnorm.experiments.studies import get_study, shared_bn
from recnorm.experiments.sweep import run_sweep
from recnorm.experiments.tune import arm_key, tuning_spec


def test_smoke_runs_give_a_zero_training_effect_and_an_evaluation_effect(tmp_path):
    study = get_study("shared_bn")
    out = str(tmp_path / "sweep")
    assert run_sweep(study.spec(smoke=True), out).finished
    records = load_records(out)
    shared = [r for r in records if r["config"]["norm"] == "shared_batch"]
    assert shared and all("test_per_step_statistics" in r["final"] for r in shared)
    assert all("test_per_step_statistics" not in r["final"] for r in records if r["config"]["norm"] == "batch")
    claims = {c.key: c for c in study.derive(records)}
    assert set(claims) == {f"{k}:{g}" for k in ("shared_train", "shared_select", "shared_eval") for g in ("0.1", "1")}
    for gain in ("0.1", "1"):
        train = claims[f"shared_train:{gain}"].test
        assert train.n == 2 and train.mean == pytest.approx(0.0, abs=1e-9) and train.sd == pytest.approx(0.0, abs=1e-9)
        assert claims[f"shared_eval:{gain}"].test.n == 2
        assert claims[f"shared_train:{gain}"].counted  # a re-measured design, to convergence


def test_identical_training_separates_the_training_effect_from_the_checkpoint_choice():
    """Same training curves, different checkpoints: the training effect is 0 and the selection effect is not."""
    def rec(norm, seed, acc, per_step=None):
        final = {"test": {"accuracy": acc}, **({"test_per_step_statistics": {"accuracy": per_step}} if per_step else {})}
        return {"run_id": f"{norm}-{seed}", "seed": seed, "task": {"name": "fashion_rows"}, "metric": "accuracy", "higher_is_better": True, "status": "ok",
                "config": {"norm": norm, "norm_kwargs": {"gain_init": 0.1}, "task": "fashion_rows"}, "final": final,
                "train": {"step": [1, 41, 81] if norm == "batch" else [1, 35, 81], "loss": [2.3, 1.0 + seed, 0.5]},
                "steps_planned": 100, "valid": {"step": [0], "accuracy": [0.1]}}
    records = [r for s in range(10) for r in (rec("batch", s, 0.87), rec("shared_batch", s, 0.80, 0.86 - 0.001 * s))]
    claims = {c.key: c for c in shared_bn.claims(records)}
    train, select_, eval_ = (claims[f"{k}:0.1"].test for k in ("shared_train", "shared_select", "shared_eval"))
    assert train.mean == pytest.approx(0.0) and claims["shared_train:0.1"].result == "equivalent"
    assert select_.mean == pytest.approx(0.0145) and eval_.mean == pytest.approx(0.0555)
    assert shared_bn.claims(records[:12])[0].result == "insufficient"  # 6 of the 10 declared seeds


def test_the_rate_is_tuned_on_per_step_bn_and_shared_bn_uses_it():
    study = get_study("shared_bn")
    tune = tuning_spec(study.spec(), study.tuning, study.tune_at).expand()
    assert {c.norm for c in tune} == {"batch"} and len(tune) == 2 * 7 * 2
    final = study.spec().expand()
    assert len(final) == 40 and {c.seed for c in final} == set(range(10))
    ignore = tuple(study.tune_at)
    for gain in shared_bn.GAINS:
        keys = {arm_key(c, ignore) for c in final if c.norm_kwargs["gain_init"] == gain}
        assert len(keys) == 1  # per-step and shared BN at one γ0 share one tuned rate


def test_the_next_sessions_commands_run_on_the_smoke_variant(tmp_path):
    import json
    import os

    from recnorm.experiments.tune import main

    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    assert main(["shared_bn", "--smoke", "--runs", runs, "--results", results]) == 0
    choices = json.load(open(os.path.join(results, "shared_bn-smoke-tune", "choices.json")))
    assert len(choices["arms"]) == 2 and all(len(a["curve"]) == 7 for a in choices["arms"])
    assert main(["shared_bn", "--smoke", "--final", "--runs", runs, "--results", results]) == 0
    final = [json.loads(line) for line in open(os.path.join(results, "shared_bn-smoke", "runs.jsonl"))]
    assert len(final) == 8
    chosen = {a["label"].split(",")[0]: a["lr"] for a in choices["arms"]}
    assert {r["config"]["lr"] for r in final} <= set(chosen.values())
