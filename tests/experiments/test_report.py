"""Tests of the report: verdict logic, and building HTML/Markdown from a finished directory alone."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from recnorm.experiments.config import RunConfig
from recnorm.experiments.report import write_report
from recnorm.experiments.results import aggregate, area_under_curve, first_reach, summary
from recnorm.experiments.sweep import SweepSpec, run_sweep


# ---------------------------------------------------------------------------------------------- verdict cells
def test_verdict_cells_carry_a_word_an_icon_and_a_colour():
    from recnorm.experiments.document import Document, badge, inline_html

    assert badge("supported") == "**✔ supported**"
    assert badge("opposite", "p = 0.010") == "**✘ the opposite holds: p = 0.010**"
    html = inline_html(badge("supported")) + inline_html(badge("opposite")) + inline_html(badge("inconclusive"))
    assert "<b style='color:#1a7f37'>✔ supported</b>" in html and "color:#c0392b" in html and "color:#6e6e6e" in html
    assert "style" not in inline_html("**bold but no verdict**")
    doc = Document("unused")
    doc.table(["verdict"], [[badge("equivalent")]])
    assert "color:#1f5fbf" in doc.html("t") and "**= equivalent within the margin**" in doc.markdown("figures")


def test_a_long_table_folds_and_a_short_one_does_not():
    from recnorm.experiments.document import Document

    doc = Document("unused")
    n = Document.FOLD_ROWS
    doc.table(["a"], [[i] for i in range(n)], fold="short: never folded")
    doc.table(["b"], [[i] for i in range(n + 1)], fold=f"{n + 1} rows <open>")
    doc.table(["c"], [[i] for i in range(n + 1)])  # no summary: never folded
    md, page = doc.markdown("figures"), doc.html("t")
    assert "short: never folded" not in md + page and md.count("<details>") == page.count("<details>") == 1
    # Markdown: a blank line after the summary and before </details>, so that the table inside still renders
    assert f"<details><summary>{n + 1} rows &lt;open&gt;</summary>\n\n| b |" in md
    assert f"| {n} |\n\n</details>" in md
    assert re.search(r"<details><summary>\d+ rows &lt;open&gt;</summary>\n<table><tr><th>b</th>", page)
    assert page.index("</details>") < page.index("<th>c</th>")


def test_numbers_and_seeds_are_written_one_way():
    from recnorm.experiments.document import fmt, mean_sd, seed_list, signed

    assert mean_sd([1.076, 1.124]) == "1.100 ± 0.034"  # never "1.1 ± 0.034"
    assert mean_sd([1.0, None]).endswith("(1 failed)")
    assert (fmt(0.5), fmt(12.34), fmt(12345.0), signed(0.02), signed(-0.02)) == ("0.500", "12.3", "1.23e+04",
                                                                                  "+0.020", "-0.020")
    assert seed_list([0, 1, 2, 3, 4]) == "5 seeds (0-4)" and seed_list([0, 2]) == "2 seeds (0, 2)"


def test_curve_helpers():
    assert area_under_curve([0, 10, 20], [0.0, 1.0, 1.0], 20) == pytest.approx(0.75)
    assert area_under_curve([0, 10], [0.0, 1.0], 20) is None  # stopped early (diverged)
    assert first_reach([0, 5, 10], [0.1, 0.5, 0.9], 0.5, True) == 5
    assert first_reach([0, 5, 10], [0.9, 0.5, 0.1], 0.4, False) == 10
    assert first_reach([0, 5], [0.1, 0.2], 0.5, True) is None
    s = summary([1.0, 3.0, None])
    assert (s["mean"], s["n"], s["n_missing"]) == (2.0, 2, 1)
    rows = aggregate([{"g": "a", "v": 1.0}, {"g": "a", "v": 3.0}, {"g": "b", "v": 5.0}],
                     by=lambda r: r["g"], value=lambda r: r["v"])
    assert [(r["group"], r["mean"], r["n"]) for r in rows] == [("a", 2.0, 2), ("b", 5.0, 1)]


# ---------------------------------------------------------------------------------------------- report
@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep"))
    base = RunConfig(task="adding", task_options={"length": 8, "valid_size": 16, "test_size": 16}, hidden_size=8,
                     batch_size=8, steps=6, eval_every=2, eval_batch_size=16, diag_every=3, popstat_batches=1,
                     init="orthogonal", h0_noise=0.1)
    spec = SweepSpec(name="report-test", description="A tiny sweep for the report tests.", base=base,
                     grids=[{"norm": [None, "layer", "shared_batch", "sequence_batch"], "init_gain": [0.5, 2.0],
                             "seed": [0, 1]},
                            {"norm": "batch", "norm_kwargs.gain_init": [0.1], "init_gain": [0.5, 2.0],
                             "seed": [0, 1]}])
    assert run_sweep(spec, out, workers=1).finished
    return out


def test_report_from_sweep_directory_alone(sweep_dir, tmp_path):
    # Copy the finished directory elsewhere: the report must rebuild from those files only.
    copy = str(tmp_path / "copy")
    shutil.copytree(sweep_dir, copy)
    paths = write_report(copy)
    html = open(paths["html"], encoding="utf-8").read()
    md = open(paths["markdown"], encoding="utf-8").read()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(images) >= 5 and all(len(i) > 1000 for i in images)
    assert "<table>" in html
    assert not re.search(r"(src|href)=['\"]?(https?:|figures/)", html)  # self-contained: nothing external
    assert "report-test" in md and "A tiny sweep" in md
    # Markdown verdict table with the claims under test.
    assert "| claim | evidence |" in md
    for claim in ("converges faster than no norm", "less sensitive to the init gain", "naive shared BN",
                  "layer norm (layer) reaches a better final test mse", "sequence-wise BN"):
        assert claim in md
    verdict_cells = [row[-1] for row in paths["verdicts"]]
    words = ("✔ supported", "✘ the opposite holds", "= equivalent", "? inconclusive", "– not enough data",
             "∅ not tested")
    assert verdict_cells and all(any(w in v for w in words) for v in verdict_cells)
    # the fixed settings and the commands behind the page
    assert "Fixed settings: optimizer adam; learning rate 0.001; batch size 8; steps 6; gradient clipping" in md
    assert f"Made by `recnorm report {copy}` from runs made by `recnorm sweep`" in md
    # PNG files beside the Markdown, all referenced.
    for name in re.findall(r"\]\((figures/[^)]+\.png)\)", md):
        assert os.path.getsize(os.path.join(copy, name)) > 1000
    for section in ("Learning curves", "Convergence speed", "Final test metric", "Sensitivity to initialization",
                    "Gradient flow through time", "Per-step statistics of the batch norms",
                    "Population statistics at test time"):
        assert section in md


def test_report_of_a_single_run(sweep_dir, tmp_path):
    runs = os.path.join(sweep_dir, "runs")
    one = sorted(d for d in os.listdir(runs) if "-batch-" in d)[0]
    target = str(tmp_path / "one")
    shutil.copytree(os.path.join(runs, one), target)
    paths = write_report(target)
    md = open(paths["markdown"], encoding="utf-8").read()
    assert "1 finished runs" in md
    assert "no baseline in this sweep" in md  # honest: nothing to compare against


def test_report_of_empty_directory_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        write_report(str(tmp_path))


# ---------------------------------------------------------------------------------------------- as a person reads it
@pytest.fixture(scope="module")
def written(sweep_dir, tmp_path_factory):
    """The report of a copy of the test sweep, written once for the tests that only read it."""
    copy = str(tmp_path_factory.mktemp("written") / "copy")
    shutil.copytree(sweep_dir, copy)
    return copy, write_report(copy)


def test_report_text_has_no_markup_or_python_lists_left(written):
    copy, paths = written
    html = open(paths["html"], encoding="utf-8").read()
    md = open(paths["markdown"], encoding="utf-8").read()
    assert "<i>trained</i>" in html and "color:" in html  # italics rendered, verdicts coloured
    text_only = re.sub(r"<[^>]+>|src='data:[^']+'", "", html)
    assert not re.search(r"\*\w[^*<]*\w\*", text_only)  # no literal *emphasis*
    for doc in (md, text_only):
        assert "['" not in doc and "[0, 1]" not in doc  # no Python lists
    assert "gains 0.5, 2" in md and "runs over 2 seeds (0, 1); 0 of them diverged" in md


def test_every_verdict_names_the_metric_it_rests_on(written):
    copy, paths = written
    for task, claim, evidence, effect, seeds, verdict in paths["verdicts"]:
        if "no baseline" in verdict:
            continue
        assert "mse" in claim or "training loss" in claim, claim
    claims = [row[1] for row in paths["verdicts"]]
    assert "layer norm (layer) converges faster than no norm, by validation mse (mean over training)" in claims
    assert "layer norm (layer) converges faster than no norm, by training loss (mean over training)" in claims


def test_disagreeing_training_loss_and_validation_metric_are_both_shown(sweep_dir, tmp_path):
    """Layer norm made better on validation and worse on training loss, consistently over the seeds: both
    convergence verdicts say what they rest on, and each points at the other."""
    from recnorm.experiments.results import load_records, write_json_atomic

    copy = str(tmp_path / "copy")
    shutil.copytree(sweep_dir, copy)
    for r in load_records(copy):
        label = r["config"]["norm"] or "none"
        if label not in ("layer", "none"):
            continue
        n_valid, n_train, seed = len(r["valid"]["step"]), len(r["train"]["loss"]), r["seed"]
        better = label == "layer"
        r["valid"]["mse"] = [0.1 + 0.01 * seed if better else 1.0] * n_valid
        r["train"]["loss"] = [5.0 + 0.01 * seed if better else 1.0] * n_train
        run_dir = r.pop("dir")
        write_json_atomic(os.path.join(run_dir, "result.json"), r)
    rows = {row[1]: row[-1] for row in write_report(copy)["verdicts"]}
    by_valid = rows["layer norm (layer) converges faster than no norm, by validation mse (mean over training)"]
    by_loss = rows["layer norm (layer) converges faster than no norm, by training loss (mean over training)"]
    assert by_valid.startswith("**✔ supported: p ") and by_valid.endswith(
        " after BH; but the training loss shows the opposite (next row)**")
    assert by_loss.startswith("**✘ the opposite holds: p ")
    assert by_loss.endswith("; but the validation mse supports it (row above)**")


def test_a_damaged_result_is_left_out_with_a_warning_naming_it(sweep_dir, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(sweep_dir, copy)
    run = sorted(os.listdir(os.path.join(copy, "runs")))[0]
    damaged = os.path.join(copy, "runs", run, "result.json")
    open(damaged, "w").write('{"run_id": "x", "status"')
    paths = write_report(copy)
    assert len(paths["skipped"]) == 1 and paths["skipped"][0].startswith(damaged + ": not valid JSON")
    md = open(paths["markdown"], encoding="utf-8").read()
    assert "Warning: 1 damaged result(s) left out of this report" in md and damaged in md


def test_result_files_follow_the_umask(tmp_path):
    from recnorm.experiments.results import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(str(tmp_path / "open.json"), {"a": 1})
        os.umask(0o077)
        write_json_atomic(str(tmp_path / "private.json"), {"a": 1})
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "open.json").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "private.json").st_mode & 0o777 == 0o600


def test_run_files_follow_the_umask(tmp_path):
    from recnorm.experiments.train import train_and_evaluate

    config = RunConfig(task="adding", task_options={"length": 4, "valid_size": 4, "test_size": 4}, hidden_size=4,
                       batch_size=4, steps=1, eval_every=1, eval_batch_size=4, diag_every=None, popstat_batches=1)
    old = os.umask(0o022)
    try:
        events = []
        train_and_evaluate(config, str(tmp_path / "run"), progress=lambda step, total, info: events.append(
            (step, sorted(info))))
    finally:
        os.umask(old)
    for name in ("config.json", "model.pt", "result.json"):
        assert os.stat(tmp_path / "run" / name).st_mode & 0o777 == 0o644, name
    # The training clock of a progress bar starts after the step-0 evaluation, right before step 1.
    assert events[:3] == [(0, ["valid"]), (0, ["training"]), (1, ["loss"])]


def test_figures_are_named_after_their_task(written):
    copy, _ = written
    names = sorted(os.listdir(os.path.join(copy, "figures")))
    assert names and all(name.startswith("t0_adding_") for name in names), names
    assert "t0_adding_bnstats.png" in names
