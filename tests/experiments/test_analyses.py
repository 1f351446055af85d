"""The presets' analyses and the evidence page: claims point the right way, and the page is built from
run directories on disk."""

from __future__ import annotations

import os
import random

import pytest

from recnorm.experiments import analyses
from recnorm.experiments.config import RunConfig
from recnorm.experiments.evidence import Question, build_evidence, write_evidence
from recnorm.experiments.presets import get_preset
from recnorm.experiments.report import write_report
from recnorm.experiments.results import write_json_atomic
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


@pytest.mark.parametrize("bn_small, expected", [(0.60, "supported"), (0.95, "contradicted")])
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
    claims = by_key(analyses.drawbacks_claims(records))
    assert claims["small_batch:batch γ=0.1"].result == expected
    assert claims["bn_vs_ln_small_batch:batch γ=0.1"].result == expected
    assert claims["small_batch:layer"].result == "within spread"
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
    claims = by_key(analyses.regularization_claims(records))
    assert claims["gap:batch:500"].result == "supported"
    assert claims["gap:batch:500"].other[1]["outcome"] == "supported"  # gap in cross-entropy too
    assert claims["gap:none, dropout 0.3:500"].result == "supported"
    assert claims["test:none, dropout 0.3:500"].result != "supported"


def test_padding_claims_follow_the_metric_direction():
    records = []
    for s in SEEDS:
        for feed, sort, bpc in (("packed", 0, 2.0), ("padded", 0, 2.3), ("padded", 8, 2.05)):
            records.append(record(s, bpc + noise(s), metric="bpc", higher=False, task_name="kjv_verses",
                                  task_options={}, norm="sequence_batch", feed=feed, sort_by_length=sort))
    claims = by_key(analyses.padding_claims(records))
    assert claims["masked:kjv_verses:sequence_batch"].result == "supported"
    assert claims["sorted:kjv_verses:sequence_batch"].result == "supported"
    assert claims["sorted:kjv_verses:sequence_batch"].other[1]["outcome"] == "contradicted"  # still worse than packed


def test_memory_success_and_gradient_ratio():
    records = []
    for s in SEEDS:
        records.append(record(s, 0.9, task_name="copy", cell="lstm", task_options={"delay": 10},
                              norms=[1e-2, 1.0, 1.0]))
        records.append(record(s, 0.2 + noise(s), task_name="copy", cell="rnn", task_options={"delay": 10},
                              norms=[0.0, 1e-3, 1.0]))
    assert analyses.succeeded(records[0]) and not analyses.succeeded(records[1])
    assert analyses.grad_ratio(records[0]) == pytest.approx(-2.0)
    assert analyses.grad_ratio(records[1]) < -30  # underflowed to 0: counted at the floor, not dropped
    claims = by_key(analyses.memory_claims(records))
    assert claims["memory:lstm:none:copy, delay 10"].result == "supported"
    assert claims["gradient:lstm:copy, delay 10"].result == "supported"


def _write_sweep(path: str, name: str, records) -> None:
    os.makedirs(os.path.join(path, "runs"))
    for r in records:
        write_json_atomic(os.path.join(path, "runs", r["run_id"], "result.json"), r)
    write_json_atomic(os.path.join(path, "sweep.json"), {"name": name, "spec": {"name": name},
                                                         "runs": [r["run_id"] for r in records]})


def test_evidence_page_from_run_directories(tmp_path):
    records = []
    for s in SEEDS:
        records.append(record(s, 2.0 + noise(s), metric="bpc", higher=False, task_name="kjv_chars", task_options={}))
        records.append(record(s, 1.8 + noise(s + 1), metric="bpc", higher=False, task_name="kjv_chars",
                              task_options={}, norm="layer"))
    _write_sweep(str(tmp_path / "language"), "language", records)
    questions = [Question("layer norm lowers bpc", "language", ("bpc:*",)),
                 Question("padding", "padding", ("masked:*",))]
    page = build_evidence(str(tmp_path), questions)
    summary, rows = page.split("## Every comparison")
    # the summary: one line per question, counting its comparisons by verdict
    assert "| layer norm lowers bpc | 1 | 1 | 0 | 0 |" in summary
    assert "| padding | not tested | – | – | – |" in summary
    rows = [line for line in rows.splitlines() if line.startswith("| layer norm lowers bpc")]
    assert len(rows) == 1 and "**supported**" in rows[0] and "[language](language/report.md)" in rows[0]
    assert "bits per character" in rows[0] and "5 of 5" in rows[0]
    assert "| padding | – | – | [padding](padding/report.md) | **not tested: no runs** |" in page
    assert write_evidence(str(tmp_path)) == str(tmp_path / "evidence.md")
    assert (tmp_path / "evidence.md").read_text().startswith("# Does normalization")
    with pytest.raises(FileNotFoundError):
        write_evidence(str(tmp_path / "missing"))


def test_report_hook_writes_the_analysis_section(tmp_path):
    spec = get_preset("regularization", smoke=True)
    out = str(tmp_path / "sweep")
    assert run_sweep(spec, out).finished
    result = write_report(out)
    text = open(result["markdown"]).read()
    assert "## Train-test gap" in text and "| training images | model | train accuracy" in text
    assert any("narrows the train-test gap in accuracy" in row[1] for row in result["verdicts"])
    with pytest.raises(ValueError, match="unknown analysis 'nope'"):
        analyses.run_analysis("nope", None, [], {})


def test_norm_variants_get_labels_and_names_of_their_own():
    from recnorm.experiments.results import model_label

    plain = RunConfig(norm="layer").to_dict()
    variant = RunConfig(norm="layer", norm_kwargs={"joint": True, "carry_cell": True}).to_dict()
    assert model_label(plain) == "layer" and model_label(variant) == "layer joint carried c"
    assert analyses.name("layer joint carried c") == "layer norm (joint gate norm, carried normalized cell)"
    assert analyses.name("rms") == "RMSNorm" and analyses.name("batch γ=0.1") == "per-step BN (γ0 = 0.1)"
