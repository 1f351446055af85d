"""benchmarks/fit_dispatch.py --fit: the decision rule it writes for ``kernel="auto"``. Synthetic timings
with a known boundary; these check the fitting, never a time."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("fit_dispatch", os.path.join(ROOT, "benchmarks", "fit_dispatch.py"))
fit_dispatch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fit_dispatch)

GRID = [(T, B, I, H) for T in (4, 32, 256) for B in (2, 16, 128) for I in (8, 64) for H in (16, 256)]


def _truth(size) -> float:
    """fused / native: the fused kernel wins (0.7x) when T * B >= 512, loses (1.5x) below."""
    T, B, _, _ = size
    return 0.7 if T * B >= 512 else 1.5


def _score(coef, size) -> float:
    return sum(c * v for c, v in zip(coef, fit_dispatch._row(size)))


def test_decision_fit_recovers_a_separable_boundary():
    coef = fit_dispatch._decision_fit([fit_dispatch._row(s) for s in GRID], [_truth(s) for s in GRID])
    wrong = [s for s in GRID if (_score(coef, s) < 0) != (_truth(s) < 1.0)]
    assert wrong == []
    assert all(fit_dispatch._regret(coef, s, _truth(s)) == 1.0 for s in GRID)


def test_decision_fit_sacrifices_the_cheap_mistake():
    """Two identical sizes cannot both be right; the rule follows the one where a wrong pick costs more."""
    sizes = [(8, 8, 8, 8), (8, 8, 8, 8), (512, 128, 8, 8), (2, 2, 8, 8)]
    ratios = [1.02, 0.5, 0.6, 1.8]  # at (8, 8, 8, 8): torch's op wins by 2%, the fused kernel by 2x
    coef = fit_dispatch._decision_fit([fit_dispatch._row(s) for s in sizes], ratios)
    assert _score(coef, (8, 8, 8, 8)) < 0
    assert fit_dispatch._regret(coef, sizes[0], 1.02) == pytest.approx(1.02)
    assert fit_dispatch._regret(coef, sizes[1], 0.5) == 1.0


def test_regret_is_relative_to_the_faster_implementation():
    coef_native = [1.0, 0, 0, 0, 0]  # score > 0 everywhere: torch's op
    coef_fused = [-1.0, 0, 0, 0, 0]
    assert fit_dispatch._regret(coef_native, (4, 4, 4, 4), 0.8) == pytest.approx(1 / 0.8)
    assert fit_dispatch._regret(coef_fused, (4, 4, 4, 4), 0.8) == 1.0
    assert fit_dispatch._regret(coef_fused, (4, 4, 4, 4), 1.25) == pytest.approx(1.25)


def _points(truth, **extra):
    return [{"cell": "lstm", "dtype": "float32", "size": list(s),
             "times": {ph: {"native": [1.0] * 3, "fused": [truth(s)] * 3} for ph in ("train", "eval")}, **extra}
            for s in GRID]  # fmt: skip


def test_fit_writes_the_rule_and_its_report(tmp_path):
    data = tmp_path / "data.json"
    # an old-form file: one host's meta, points without their CPU (they count as LEGACY_MAKER's)
    data.write_text(json.dumps({"meta": {"machine": "x86_64, 2 CPUs", "command": "synthetic"}, "points": _points(_truth)}))
    rule_file = tmp_path / "autotune.py"
    rule_file.write_text("before = 1\n# BEGIN RULE\nRULES = {}\n# END RULE\nafter = 2\n")
    rules = fit_dispatch.fit(argparse.Namespace(data=str(data), rule=str(rule_file)))
    assert list(rules) == [fit_dispatch.LEGACY_MAKER] == ["AMD"]
    assert rules["AMD"]["measured"] == {"machine": "x86_64, 2 CPUs", "command": "synthetic"}
    entry = rules["AMD"]["rules"]["lstm/train/float32"]
    assert entry["points"] == len(GRID) and entry["wrong_picks"] == 0 and entry["bench_sizes_wrong"] == []
    assert entry["range"] == [[4, 256], [2, 128], [8, 64], [16, 256]]
    assert entry["loo_wrong_picks"] <= 2 and entry["loo_worst_regret"] >= 1.0
    ns = {}
    exec(rule_file.read_text().replace("RULES: Dict", "RULES"), ns)  # the file stays valid Python
    assert ns["before"] == 1 and ns["after"] == 2
    assert ns["RULES"]["AMD"]["rules"]["lstm/eval/float32"]["coef"] == entry["coef"]  # same timings, same rule


def test_each_maker_gets_a_rule_from_its_own_points(tmp_path):
    # the AMD host's fused kernel wins at long sequences, the Intel host's at short ones: one fit over both
    # would serve neither
    intel = _points(lambda s: 1.5 if s[0] * s[1] >= 512 else 0.7, cpu="Intel(R) Xeon(R) Processor @ 2.80GHz")
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"meta": {"AMD": {"cpu": "AMD EPYC"}, "Intel": {"cpu": "Intel(R) Xeon(R)"}},
                                "points": _points(_truth, cpu="AMD EPYC") + intel}))  # fmt: skip
    rule_file = tmp_path / "autotune.py"
    rule_file.write_text("# BEGIN RULE\nRULES = {}\n# END RULE\n")
    rules = fit_dispatch.fit(argparse.Namespace(data=str(data), rule=str(rule_file)))
    assert sorted(rules) == ["AMD", "Intel"]
    assert rules["Intel"]["measured"] == {"cpu": "Intel(R) Xeon(R)"}
    for maker, truth in (("AMD", _truth), ("Intel", lambda s: 1.5 if s[0] * s[1] >= 512 else 0.7)):
        entry = rules[maker]["rules"]["lstm/eval/float32"]
        assert entry["points"] == len(GRID) and entry["wrong_picks"] == 0
        for s in GRID:  # each rule picks its own host's faster implementation
            assert (_score(entry["coef"], s) < 0) == (truth(s) < 1.0)


def test_point_maker():
    assert fit_dispatch.point_maker({"maker": "Intel", "cpu": "AMD EPYC"}) == "Intel"  # the recorded maker decides
    assert fit_dispatch.point_maker({"cpu": "AMD EPYC 9B14"}) == "AMD"
    assert fit_dispatch.point_maker({"cpu": "Intel(R) Xeon(R) Processor @ 2.80GHz"}) == "Intel"
    assert fit_dispatch.point_maker({}) == fit_dispatch.LEGACY_MAKER
    assert fit_dispatch.point_maker({"cpu": "Apple M2"}) == "Apple M2"  # its own group, never another maker's
