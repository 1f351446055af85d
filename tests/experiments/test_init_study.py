"""The rebuilt init study: its declared design (cells, schemes, gains, forget biases, tasks, seeds, tuning),
its claims on hand-built records, and its smoke variant run end to end."""

from __future__ import annotations

import math
import random

import pytest

from recnorm.experiments.config import RunConfig
from recnorm.experiments.report import write_report
from recnorm.experiments.studies import get_study, init_rebuilt as ir
from recnorm.experiments.sweep import run_sweep
from recnorm.experiments.tune import MIN_RATES, MIN_SEEDS, MIN_SPAN, tuning_spec


def test_the_declared_design_meets_the_issue_minimums():
    study = get_study("init")
    configs = study.spec().expand()
    assert {c.cell for c in configs} == {"lstm", "rnn"} and {c.task for c in configs} == {"adding", "fashion_rows"}
    assert {c.init for c in configs} == {"default", "orthogonal", "xavier", "normal"}
    gains = sorted({c.init_gain for c in configs})
    assert len(gains) >= 5 and gains[0] == 0.1 and gains[-1] == 10.0
    logs = [math.log10(g) for g in gains]
    assert all(b - a == pytest.approx(0.5, abs=1e-3) for a, b in zip(logs, logs[1:]))  # a log grid
    assert {c.forget_bias for c in configs if c.cell == "lstm"} == {0.0, 1.0}
    assert {c.forget_bias for c in configs if c.cell == "rnn"} == {None}
    assert {c.task_options.get("length") for c in configs if c.task == "adding"} == {100}
    assert all(c.patience and c.steps >= 1000 for c in configs)  # to convergence, with a maximum budget
    # 5 seeds on the grid, 10 for the default-versus-worst contrast of every (task, cell, norm)
    grid_seeds = {c.seed for c in configs if (c.init, c.init_gain) == ("xavier", 0.1)}
    assert grid_seeds == set(range(5))
    for cell, worst in ir.WORST_INIT.items():
        for init in (ir.DEFAULT_INIT, worst):
            seeds = {c.seed for c in configs if c.cell == cell and c.init == init["init"]
                     and c.init_gain == init["init_gain"] and c.norm == "layer" and c.task == "adding"
                     and (cell == "rnn" or c.forget_bias == init["forget_bias"])}
            assert seeds == set(range(10)), (cell, init)
    # the rate is tuned per (task, cell, norm) at the default init only, on a grid meeting the minimums
    tune = tuning_spec(study.spec(), study.tuning, study.tune_at).expand()
    assert {(c.init, c.init_gain) for c in tune} == {("default", 1.0)}
    assert len({(c.task, c.cell, c.norm) for c in tune}) == 12 and len(tune) == 12 * 7 * 2
    assert len(study.tuning.lrs) >= MIN_RATES and study.tuning.lrs[-1] / study.tuning.lrs[0] >= MIN_SPAN
    assert len(study.tuning.seeds) >= MIN_SEEDS and not {c.seed for c in configs} & set(study.tuning.seeds)
    assert all(d.budget == "convergence" and d.tuned for d in ir.DESIGNS.values())
    assert "Measured cost" in study.doc and "Running time" in study.doc


def _rec(seed, value, task="fashion_rows", **config):
    cfg = RunConfig(task=task, seed=seed, **config)
    higher = task == "fashion_rows"
    metric = "accuracy" if higher else "mse"
    return {"run_id": f"{cfg.run_id}-{random.random()}", "seed": seed, "config": cfg.to_dict(), "metric": metric,
            "higher_is_better": higher, "status": "ok", "steps_planned": 100,
            "final": {"test": {metric: value}}, "valid": {"step": [0], metric: [0.1 if higher else 0.17]}}


def test_claims_point_the_right_way_on_hand_built_records():
    records = []
    for seed in range(10):
        jitter = 0.002 * ((seed * 7) % 5 - 2)
        for norm in (None, "layer"):
            for init in ("default", "normal"):
                for gain in (1.0, 10.0):
                    bad = init == "normal" and gain == 10.0
                    # no norm: the bad init costs 0.3; layer norm: it costs 0.01
                    value = 0.85 + jitter - (0.3 if norm is None else 0.01) * bad
                    records.append(_rec(seed, value, cell="rnn", norm=norm, init=init, init_gain=gain))
    claims = {c.key: c for c in ir.claims(records)}
    spread = claims["spread_fashion_rows:rnn:layer"]
    assert spread.test.mean == pytest.approx(0.29) and spread.test.n == 10 and spread.result == "supported"
    success = claims["success_fashion_rows:rnn:layer"]  # 3 of 4 inits reach 0.80 without a norm, 4 of 4 with
    assert success.test.mean == pytest.approx(0.25)
    worst = claims["worst_fashion_rows:rnn:layer"]
    assert worst.test.mean == pytest.approx(0.29) and worst.test.n == 10 and worst.counted
    assert "tuned learning rate" in spread.claim and "to convergence" in spread.budget()


def test_iqr_and_heat_map():
    assert ir.iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0)
    records = [_rec(s, 0.5 + 0.1 * s, cell="rnn", init="xavier", init_gain=0.1) for s in range(2)]
    headers, rows = ir.heat_map(records, "fashion_rows", "rnn")
    assert headers[0] == "norm" and len(headers) == 1 + 4 * 5
    assert rows[0][headers.index("xavier 0.1")] == "0.550" and rows[0][headers.index("default 1")] == "–"


def test_smoke_variant_runs_and_reports(tmp_path):
    spec = get_study("init").spec(smoke=True)
    out = str(tmp_path / "sweep")
    assert run_sweep(spec, out).finished and len(spec.expand()) == 32
    result = write_report(out)
    text = open(result["markdown"]).read()
    assert "## Does normalization rescue a bad init?" in text and "| norm | seeds with the whole grid | reached the target" in text and "cost of the bad init" in text
    # the study's answer comes first, the detail per task after it
    assert text.index("## Does normalization rescue a bad init?") < text.index("## Task ") < text.index("### Final test metric")
    assert "its section above" in text and "end of this report" not in text
    # the heat map is a picture, its numbers a folded table beside it
    assert "](figures/init_heat_fashion_rows_" in text and "<details><summary>The heat map's numbers (open)</summary>" in text


def test_the_contrast_runs_alone_are_not_a_grid():
    """With only the default and the bad init finished, no spread or success claim is made from two inits."""
    records = [_rec(seed, 0.85 - 0.3 * bad, cell="rnn", norm=norm, init=init, init_gain=gain)
               for seed in range(10) for norm in (None, "layer")
               for bad, (init, gain) in enumerate([("default", 1.0), ("normal", 10.0)])]
    keys = {c.key for c in ir.claims(records)}
    assert keys == {"worst_fashion_rows:rnn:layer"}
    assert ir.grid_seeds(records, "rnn") == []


def test_the_gain_table_shows_first_step_gradient_norms():
    """Median first-step gradient norm per norm and setting, hand-built; a diverged run (no curve) is counted."""
    def rec(norm, init, gain, seed, grad, status="ok"):
        r = _rec(seed, 0.9, cell="lstm", norm=norm, init=init, init_gain=gain, forget_bias=1.0)
        r["status"] = status
        r["train"] = {"step": [1, 100], "grad_norm": [grad, 0.5]} if grad is not None else {}
        return r

    records = [rec(None, "default", 1.0, s, g) for s, g in ((0, 1.0), (1, 3.0), (2, 2.0))]
    records += [rec(None, "normal", 10.0, 0, 1e6), rec(None, "normal", 10.0, 1, None, "diverged")]
    records += [rec("layer", "default", 1.0, 0, 4.0), rec("layer", "normal", 10.0, 0, 0.5)]
    tables = []

    class Doc:
        def p(self, text):
            pass

        def table(self, headers, rows):
            tables.append((headers, rows))

    ir._gain_table(Doc(), records, "fashion_rows", "lstm")
    (headers, rows), = tables
    assert headers == ["norm", "default init", "N(0, g²/fan_in), g = 10"]
    assert rows == [["layer norm", "4", "0.5"], ["no norm", "2", "1e+06 (1 diverged)"]]


def test_a_partial_grid_is_not_judged():
    """Two whole seeds of a huge, consistent effect: the floored t test alone would call it (p = 0.015), but
    the grid's claims declare 5 seeds and the contrast 10, so they read "not enough data", stay out of the
    Benjamini-Hochberg family and say how many seeds they have; the same effect on 5 seeds is judged."""
    from recnorm.experiments.study import adjust

    def grid(seeds):
        return [_rec(seed, 0.85 + 0.001 * seed - (0.3 if norm is None else 0.0) * (init == "normal" and gain == 10.0),
                     cell="rnn", norm=norm, init=init, init_gain=gain)
                for seed in seeds for norm in (None, "layer") for init in ("default", "normal")
                for gain in (1.0, 10.0)]

    claims = {c.key: c for c in ir.claims(grid(range(2)))}
    spread = claims["spread_fashion_rows:rnn:layer"]
    assert spread.test.n == 2 and spread.test.p < 0.05  # the t test alone would call it
    adjust(list(claims.values()))
    for c in claims.values():
        assert c.result == "insufficient" and c.p_adjusted is None, c.key
    assert spread.seeds() == "2 of 2 (declared: 5)" and "not judged: 2 of the 5 seeds declared" in spread.p_text()
    assert "not enough data" in spread.verdict()
    claims = {c.key: c for c in ir.claims(grid(range(5)))}
    adjust(list(claims.values()))
    assert claims["spread_fashion_rows:rnn:layer"].result == "supported"
    assert claims["worst_fashion_rows:rnn:layer"].result == "insufficient"  # the contrast declares 10
    assert all(d.min_seeds == (10 if k.startswith("worst") else 5) for k, d in ir.DESIGNS.items())
