"""The studies: their claims point the right way, every claim has a declared design, the registry holds one
entry per study file, and the evidence page and the report are built from run directories on disk."""

from __future__ import annotations

import os
import random

import pytest

import recnorm.experiments.statistics as st
from recnorm.experiments.config import RunConfig
from recnorm.experiments.evidence import build_evidence, write_evidence
from recnorm.experiments.report import write_report
from recnorm.experiments.results import write_json_atomic
from recnorm.experiments.studies import STUDIES, drawbacks, get_study, language, list_studies, memory, padding
from recnorm.experiments.studies import regularization
from recnorm.experiments.study import Question, Study, name
from recnorm.experiments.sweep import run_sweep

SEEDS = range(5)


def record(seed: int, test: float, *, metric: str = "accuracy", higher: bool = True, loss: float = 1.0,
           extra_final=None, norms=None, task_name: str = "fashion_rows", **config) -> dict:
    """A finished run's record with only the fields the analyses read."""
    cfg = RunConfig(seed=seed, task=task_name, **config).to_dict()
    final = {"test": {metric: test, "loss": loss}, "valid": {metric: test, "loss": loss}, **(extra_final or {})}
    flow = [{"step": 0, "norms": {"rnn.l0": norms}}, {"step": 10, "norms": {"rnn.l0": norms}}] if norms else []
    return {"run_id": f"{task_name}-{seed}-{random.random()}", "seed": seed, "config": cfg, "metric": metric,
            "higher_is_better": higher, "status": "ok", "steps_planned": 10, "train": {"step": [0, 10], "loss": [2.0, loss]},
            "task": {"name": task_name, "options": cfg["task_options"]}, "final": final,
            "valid": {"step": [0, 10], "time": [0.0, 1.0], metric: [0.1 if higher else 5.0, test]},
            "timing": {"seconds_per_step": 0.01, "total_seconds": 1.0}, "diagnostics": {"grad_flow": flow}}


def noise(seed: int) -> float:
    return 0.004 * ((seed * 7) % 5 - 2)


def by_key(claims):
    return {c.key: c for c in claims}


@pytest.mark.parametrize("bn_small, expected", [(0.60, "supported"), (0.95, "opposite")])
def test_drawbacks_small_batch_claim_points_the_right_way(bn_small, expected):
    records = []
    for s in SEEDS:
        for size, bn in ((4, bn_small), (64, 0.82)):
            records.append(record(s, 0.80 + noise(s), batch_size=size))
            records.append(record(s, 0.81 + noise(s + 1), batch_size=size, norm="layer"))
            records.append(record(s, bn + noise(s + 2), batch_size=size, norm="batch",
                                  norm_kwargs={"gain_init": 0.1},
                                  extra_final={"test_ema": {"accuracy": bn - 0.1},
                                               "test_batch_stats_train_size": {"accuracy": bn - (0.3 if size == 4
                                                                                               else 0.01)}}))
    claims = by_key(drawbacks.claims(records))
    assert claims["small_batch:batch γ=0.1"].result == expected
    assert claims["bn_vs_ln_small_batch:batch γ=0.1"].result == expected
    assert claims["small_batch:layer"].result == "equivalent"  # layer norm: within 0.01 at both sizes
    assert claims["train_eval_gap:batch γ=0.1"].result == "supported"
    assert claims["ema_loses:batch γ=0.1:64"].result == "supported"
    assert "final test accuracy" in claims["small_batch:batch γ=0.1"].claim  # the claim names its metric


def test_regularization_gap_is_train_minus_test():
    records = []
    for s in SEEDS:
        for norm, test in ((None, 0.70), ("batch", 0.75)):
            records.append(record(s, test + noise(s), norm=norm, extra_final={"train": {"accuracy": 1.0, "loss": 0.01}},
                                  loss=1.5 if norm is None else 1.0, task_options={"train_size": 500}))
        records.append(record(s, 0.69 + noise(s + 3), dropout=0.3, num_layers=2,
                              extra_final={"train": {"accuracy": 0.7, "loss": 0.9}}, task_options={"train_size": 500}))
    claims = by_key(regularization.claims(records))
    assert claims["gap:batch:500"].result == "supported"
    assert st.verdict(claims["gap:batch:500"].other[1]) == "supported"  # gap in cross-entropy too
    # The dropout arm is the reference regularizer: a control, shown and never counted for "BN regularizes".
    control = claims["dropout_gap:none, dropout 0.3:500"]
    assert control.result == "supported" and not control.counted and "control, not counted" in control.verdict()
    assert claims["dropout_test:none, dropout 0.3:500"].result != "supported"
    assert claims["gap:batch:500"].primary and not claims["gap:batch:500"].counted  # primary, not re-measured


def test_padding_claims_follow_the_metric_direction():
    records = []
    for s in SEEDS:
        for feed, sort, bpc in (("packed", 0, 2.0), ("padded", 0, 2.3), ("padded", 8, 2.05)):
            records.append(record(s, bpc + noise(s), metric="bpc", higher=False, task_name="kjv_verses",
                                  task_options={}, norm="sequence_batch", feed=feed, sort_by_length=sort))
    claims = by_key(padding.claims(records))
    assert claims["masked:kjv_verses:sequence_batch"].result == "supported"
    assert claims["sorted:kjv_verses:sequence_batch"].result == "supported"
    assert st.verdict(claims["sorted:kjv_verses:sequence_batch"].other[1]) == "opposite"  # still worse than packed


def test_memory_success_and_gradient_ratio():
    records = []
    for s in SEEDS:
        records.append(record(s, 0.9, task_name="copy", cell="lstm", task_options={"delay": 10},
                              norms=[1e-2, 1.0, 1.0]))
        records.append(record(s, 0.2 + noise(s), task_name="copy", cell="rnn", task_options={"delay": 10},
                              norms=[0.0, 1e-3, 1.0]))
    assert memory.succeeded(records[0]) and not memory.succeeded(records[1])
    assert memory.grad_ratio(records[0]) == pytest.approx(-2.0)
    assert memory.grad_ratio(records[1]) < -30  # underflowed to 0: counted at the floor, not dropped
    claims = by_key(memory.claims(records))
    assert claims["memory:lstm:none:copy, delay 10"].result == "supported"
    assert claims["gradient:lstm:copy, delay 10"].result == "supported"


def _write_sweep(path: str, name: str, records) -> None:
    os.makedirs(os.path.join(path, "runs"))
    for r in records:
        write_json_atomic(os.path.join(path, "runs", r["run_id"], "result.json"), r)
    write_json_atomic(os.path.join(path, "sweep.json"), {"name": name, "spec": {"name": name},
                                                         "runs": [r["run_id"] for r in records]})


def _bpc_records():
    records = []
    for s in SEEDS:
        records.append(record(s, 2.0 + noise(s), metric="bpc", higher=False, task_name="kjv_chars", task_options={}))
        records.append(record(s, 1.8 + noise(s + 1), metric="bpc", higher=False, task_name="kjv_chars",
                              task_options={}, norm="layer"))
    return records


def test_evidence_page_from_run_directories(tmp_path, monkeypatch):
    docs, results = tmp_path / "docs", tmp_path / "results"
    _write_sweep(str(docs / "language"), "language", _bpc_records())
    lm = Study(name="language", sweep=language.sweep, designs=language.DESIGNS, claims=language.claims,
               questions=(Question("layer norm speeds up language models", ("speed:*",)),
                          Question("layer norm lowers bpc", ("bpc:*",))))
    pad = Study(name="padding", sweep=padding.sweep, designs=padding.DESIGNS, claims=padding.claims,
                questions=(Question("padding", ("masked:*",)),))
    page = build_evidence(str(results), str(docs), [lm, pad])
    summary, rows = page.split("# Every comparison, by study")
    # the summary: one line per question, counting its claims by verdict; a second look is not counted, and a
    # claim not re-measured (one untuned learning rate) keeps its old verdict apart and out of the totals
    assert "| layer norm speeds up language models | 0 | 0 | 0 | 0 | 0 | 1 (1/0/0/0) | 0 |" in summary
    assert "| layer norm lowers bpc | 0 | 0 | 0 | 0 | 0 | 0 (0/0/0/0) | 1 |" in summary
    assert "| padding | not tested | – | – | – | – | – | – |" in summary
    assert ("supported: 0, the opposite holds: 0, equivalent within the margin: 0, inconclusive: 0. Not "
            "re-measured yet") in summary and "not counted): 1 (old verdicts: supported 1," in summary
    speed = [line for line in rows.splitlines() if line.startswith("| layer norm speeds up")]
    assert len(speed) == 1 and "**✔ supported** (not re-measured" in speed[0]
    assert "[language](language/report.md)" in speed[0]
    assert "mean valid bits per character over training; at 10 steps, one untuned learning rate" in speed[0]
    assert "5 of 5" in speed[0] and "(BH " in speed[0]
    # every row lists its runs: a link to the study's runs.jsonl and each run's short ID
    speed_claim = next(c for c in language.claims(_bpc_records()) if c.key == "speed:layer")
    assert f"[{len(speed_claim.runs)} runs](../results/language/runs.jsonl)" in speed[0]
    assert speed[0].count("`") == 2 * len(speed_claim.runs) == 20
    bpc = [line for line in rows.splitlines() if line.startswith("| layer norm lowers bpc")]
    assert "second look, not counted" in bpc[0]
    assert "**∅ not tested: no runs**" in page
    assert write_evidence(str(results), str(docs)) == str(docs / "evidence.md")
    assert (docs / "evidence.md").read_text().startswith("# Does normalization")
    with pytest.raises(FileNotFoundError):
        write_evidence(str(results), str(tmp_path / "missing"))
    # results/<study>/runs.jsonl, once it exists, is read instead of the sweep directory
    (results / "language").mkdir(parents=True)
    (results / "language" / "runs.jsonl").write_text("")
    seen = []
    monkeypatch.setattr("recnorm.experiments.evidence.load_records", lambda path: seen.append(path) or [])
    build_evidence(str(results), str(docs), [lm])
    assert seen == [str(results / "language" / "runs.jsonl")]


def test_page_wide_bh_can_take_a_verdict_away():
    from recnorm.experiments.study import adjust

    records = _bpc_records()
    claims = language.claims(records)
    speed = next(c for c in claims if c.key == "speed:layer")
    assert speed.test.p < 0.05
    adjust([speed])
    assert speed.p_adjusted == pytest.approx(speed.test.p)  # one test: BH changes nothing
    speed.p_adjusted = 0.2  # as if many other tests shared the page
    assert speed.result == "inconclusive"


def test_study_report_writes_its_section_and_fixed_settings(tmp_path):
    out = str(tmp_path / "sweep")
    assert run_sweep(get_study("regularization").spec(smoke=True), out).finished
    result = write_report(out)
    text = open(result["markdown"]).read()
    assert "## Train-test gap" in text and "| training images | model | train accuracy" in text
    assert any("narrows the train-test gap in accuracy" in row[1] for row in result["verdicts"])
    assert "from runs made by `recnorm compare --preset regularization` (its smoke variant)" in text
    with pytest.raises(ValueError, match="unknown study 'nope'"):
        get_study("nope")


def test_every_study_builds_its_sweeps_and_declares_its_claims():
    assert list_studies()[:2] == ["default", "cooijmans"] and "eval_statistics" in list_studies()
    for study_name in list_studies():
        study = STUDIES.get(study_name)
        full, smoke = study.spec(), study.spec(smoke=True)
        assert full.name == study_name and smoke.name == study_name + "-smoke"
        assert all(c.steps == 1 for c in smoke.expand()) and len(full.expand()) >= len(smoke.expand())
        assert "Command:" in study.doc and "Running time:" in study.doc, study_name
        for design in study.designs.values():
            assert design.margin > 0 and design.budget in ("steps", "convergence")
        for q in study.questions:  # every question names a declared claim family
            assert all(k.split(":")[0] in study.designs for k in q.keys), (study_name, q)


def test_a_claim_without_a_declared_design_is_refused():
    study = Study(name="bad", sweep=language.sweep, designs={"bpc": language.DESIGNS["bpc"]}, claims=language.claims)
    with pytest.raises(ValueError, match="claim 'speed:layer' has no declared design"):
        study.derive(_bpc_records())


def test_eval_statistics_study_on_the_engine(tmp_path):
    """The study that replaced benchmarks/eval_statistics.py, end to end on real data slices (its smoke
    sweep: sequential digits and permuted Fashion-MNIST pixels, one step each): every run evaluated both
    ways, one claim per setting."""
    from recnorm.experiments.results import load_records
    from recnorm.experiments.studies import eval_statistics

    out = str(tmp_path / "sweep")
    assert run_sweep(eval_statistics.sweep(smoke=True), out).finished
    records = load_records(out)
    assert len(records) == 3 and all(r["config"]["norm"] == "batch" for r in records)
    for r in records:
        assert {"valid", "valid_ema", "test_batch_stats"} <= set(r["final"])
    claims = eval_statistics.claims(records)
    assert sorted(c.task for c in claims) == ["digits, batch 16", "digits, batch 4", "fashion_permuted, batch 16"]
    assert all(c.test.n == 1 and c.result == "insufficient" for c in claims)  # one seed: no verdict
    result = write_report(out)
    assert any("running averages" in row[1] for row in result["verdicts"])


def test_norm_variants_get_labels_and_names_of_their_own():
    from recnorm.experiments.results import model_label

    plain = RunConfig(norm="layer").to_dict()
    variant = RunConfig(norm="layer", norm_kwargs={"joint": True, "carry_cell": True}).to_dict()
    assert model_label(plain) == "layer" and model_label(variant) == "layer joint carried c"
    assert name("layer joint carried c") == "layer norm (joint gate norm, carried normalized cell)"
    assert name("rms") == "RMSNorm" and name("batch γ=0.1") == "per-step BN (γ0 = 0.1)"
    assert name("none+between=batch") == "no norm, BN between layers"


def test_page_counts_only_remeasured_claims_and_shows_every_setting(tmp_path, monkeypatch):
    import dataclasses

    docs, results = tmp_path / "docs", tmp_path / "results"
    _write_sweep(str(docs / "language"), "language", _bpc_records())
    tuned = {k: dataclasses.replace(d, tuned=True) for k, d in language.DESIGNS.items()}
    monkeypatch.setattr(language, "DESIGNS", tuned)
    # no question names the speed claims: they still appear, under "other settings", and count once re-measured
    lm = Study(name="language", sweep=language.sweep, designs=tuned, claims=language.claims,
               questions=(Question("layer norm lowers bpc", ("bpc:*",)),))
    page = build_evidence(str(results), str(docs), [lm])
    summary, rows = page.split("# Every comparison, by study")
    assert "| other settings of the language study (no question of the page names them) | 1 | 1 | 0 | 0 | 0 | 0 (0/0/0/0) | 0 |" in summary
    assert "supported: 1, the opposite holds: 0, equivalent within the margin: 0, inconclusive: 0. Not" in summary
    other = [line for line in rows.splitlines() if line.startswith("| other settings of the language study")]
    assert len(other) == 1 and "at 10 steps, learning rate tuned per arm" in other[0]
    assert "**✔ supported** |" in other[0] and "not re-measured" not in other[0]


def test_bh_families_keep_old_verdicts_apart_from_remeasured_ones():
    import dataclasses

    from recnorm.experiments.study import adjust

    old = next(c for c in language.claims(_bpc_records()) if c.key == "speed:layer")
    new = dataclasses.replace(old, design=dataclasses.replace(old.design, tuned=True))
    adjust([old, new])  # one test in each family: BH changes neither
    assert old.p_adjusted == pytest.approx(old.test.p_primary) and new.p_adjusted == pytest.approx(new.test.p_primary)
    assert new.counted and not old.counted and old.primary
    assert "not re-measured: at 10 steps, one untuned learning rate; not counted" in old.verdict()


def test_runs_behind_no_claim_are_named_on_the_page():
    from recnorm.experiments.evidence import _uncovered, _uncovered_line

    records = _bpc_records()
    extra = record(0, 1.9, metric="bpc", higher=False, task_name="kjv_chars", task_options={}, dropout=0.5,
                   num_layers=2)
    claims = language.claims(records)
    assert _uncovered(records, claims) == []
    settings = _uncovered(records + [extra], claims)
    assert len(settings) == 1 and settings[0][1:] == ("kjv_chars", 1)
    study = Study(name="language", sweep=language.sweep)
    line = _uncovered_line(study, settings)[0]
    assert line.startswith("Runs behind no comparison of this study") and "on kjv_chars (1 runs)" in line
