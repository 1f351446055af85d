"""Tests of the command line: parsing, listings, train/sweep/report end to end, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from recnorm.cli import build_parser, main, parse_grid_axis, parse_value
from recnorm.experiments.presets import get_preset
from recnorm.experiments.results import load_records

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
TINY = ["--task", "adding", "--task-options", '{"length": 6, "valid_size": 8, "test_size": 8}', "--hidden-size", "4",
        "--batch-size", "4", "--eval-every", "1", "--eval-batch-size", "8", "--popstat-batches", "1"]


def test_parse_values():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("none") is None and parse_value("null") is None
    assert parse_value("layer") == "layer" and parse_value('{"a": 1}') == {"a": 1}
    assert parse_grid_axis("norm=none,layer,batch") == ("norm", [None, "layer", "batch"])
    assert parse_grid_axis("init_gain=0.5,1,2") == ("init_gain", [0.5, 1, 2])
    assert parse_grid_axis('norm_kwargs=[{"gain_init": 0.1}, {}]') == ("norm_kwargs", [{"gain_init": 0.1}, {}])


def test_parser_defaults_and_subcommands():
    parser = build_parser()
    args = parser.parse_args(["compare"])
    assert (args.command, args.preset, args.smoke, args.workers, args.out) == ("compare", "default", False, None,
                                                                              None)
    args = parser.parse_args(["compare", "--preset", "laurent", "--smoke", "--workers", "3"])
    assert (args.preset, args.smoke, args.workers) == ("laurent", True, 3)
    args = parser.parse_args(["train", "--norm", "batch", "--init-gain", "2", "--set", "norm_kwargs.gain_init=0.1"])
    assert args.field_norm == "batch" and args.field_init_gain == 2 and args.sets == [("norm_kwargs.gain_init", 0.1)]
    args = parser.parse_args(["sweep", "--preset", "default", "--grid", "seed=0,1"])
    assert args.grid == [("seed", [0, 1])]
    args = parser.parse_args(["report", "some/dir"])
    assert args.run_dir == "some/dir"
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "--spec", "a.json", "--preset", "default"])


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "compare" in capsys.readouterr().out


def test_tasks_listing(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("adding", "copy", "digits", "fashion_rows", "fashion_pixels", "mnist1d", "kjv_chars"):
        assert name in out
    assert "1297/250/250" in out  # digits split sizes


def test_norms_inits_presets_listings(capsys):
    assert main(["norms"]) == 0 and "sequence_batch" in capsys.readouterr().out
    assert main(["inits"]) == 0 and "orthogonal" in capsys.readouterr().out
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("default", "cooijmans", "laurent", "horizontal"))


def test_train_then_report(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--norm", "layer", "--steps", "2", "--out", out, "--report"]) == 0
    text = capsys.readouterr().out
    assert "report:" in text
    # A readable summary, not a JSON dump: what ran, the final numbers, the files.
    assert "done in" in text and "2 of 2 steps, lstm with layer on adding" in text
    assert "  test:  mse " in text and "{" not in text.split("done in", 1)[1]
    assert f"files: {out}/ config.json, result.json, model.pt" in text
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["norm"] == "layer" and config["task_options"]["length"] == 6
    assert os.path.exists(os.path.join(out, "report.html"))
    # --config reuses a run's config.json; flags override it.
    again = str(tmp_path / "again")
    assert main(["train", "--config", os.path.join(out, "config.json"), "--set", "seed=5", "--out", again]) == 0
    assert json.load(open(os.path.join(again, "result.json")))["config"]["seed"] == 5


def test_train_config_error_exits_2(tmp_path, capsys):
    assert main(["train", *TINY, "--cell", "lstmm", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "cell: expected one of ['gru', 'lstm', 'rnn'], got 'lstmm'" in err
    assert not (tmp_path / "x").exists()


def test_sweep_from_flags_is_resumable(tmp_path, capsys):
    out = str(tmp_path / "sweep")
    argv = ["sweep", *sum((["--set", f"{k}={v}"] for k, v in [("task", "adding"), ("task_options.length", 6),
                                                              ("task_options.valid_size", 8),
                                                              ("task_options.test_size", 8), ("hidden_size", 4),
                                                              ("batch_size", 4), ("steps", 2), ("eval_every", 1),
                                                              ("popstat_batches", 1)]), []),
            "--grid", "norm=none,layer", "--grid", "seed=0,1", "--out", out, "--workers", "1", "--report"]
    assert main(argv) == 0
    assert len(load_records(out)) == 4
    assert "4 run(s) finished now, 0 before" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 run(s) finished now, 4 before" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "report.md"))
    assert main(["report", out]) == 0
    assert "verdicts:" in capsys.readouterr().out
    assert main(["sweep", "--dry-run", "--grid", "norm=none,bogus", "--out", out]) == 2


def test_python_dash_m_entry_point():
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "recnorm", "--help"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "compare" in proc.stdout and "report" in proc.stdout


def test_compare_smoke_runs_sweep_and_report(tmp_path, capsys):
    out = str(tmp_path / "compare")
    assert main(["compare", "--smoke", "--workers", "1", "--out", out]) == 0
    text = capsys.readouterr().out
    n = len(get_preset("default", smoke=True).expand())
    assert f"sweep default-smoke: {n} runs" in text and "verdicts:" in text
    assert len(load_records(out)) == n
    assert os.path.exists(os.path.join(out, "report.html")) and os.path.exists(os.path.join(out, "report.md"))


# ---------------------------------------------------------------------------------------------- as a person reads it
def test_trained_weights_are_saved_and_reload_to_the_same_numbers(tmp_path, capsys):
    import torch

    from recnorm.experiments.train import evaluate, load_model, make_task

    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--norm", "batch", "--steps", "3", "--out", out]) == 0
    result = json.load(open(os.path.join(out, "result.json")))
    state = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert any(k.startswith("rnn.weight_ih_l0") for k in state)
    model = load_model(out)
    task = make_task(result["config"]["task"], result["config"]["task_options"])
    again = evaluate(model, task, "test", result["config"]["eval_batch_size"])
    assert again["mse"] == pytest.approx(result["final"]["test"]["mse"], rel=1e-6)  # recomputed BN statistics kept


def test_task_options_flag_wants_json_and_says_so(capsys):
    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions
                 if "--task-options" in a.option_strings)
    assert "JSON object" in train.help
    example = train.help.split("e.g. ", 1)[1].split(" (", 1)[0]  # the help's own example, as typed in a shell
    args = parser.parse_args(["train", "--task-options", example.strip("'")])
    assert args.field_task_options == {"train_size": 5000}
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--task-options", "{'train_size': 5000}"])  # a Python dict, not JSON
    err = capsys.readouterr().err
    assert "argument --task-options: expected a JSON object" in err and '\'{"train_size": 1000}\'' in err


def test_presets_listing_gives_whole_sentences_in_plain_text(capsys):
    import inspect

    from recnorm.cli import _preset_doc
    from recnorm.experiments.presets import PRESETS

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out
    flat = " ".join(out.split())
    for name, fn in PRESETS.items():
        doc = " ".join(inspect.getdoc(fn).replace("``", "").split())
        running = doc.split("Running time:", 1)[1].strip()
        assert _preset_doc(fn.__doc__)["Running time"] == running  # the whole sentence, to its end
        assert f"Running time: {running}" in flat
    assert "exclude the one-time compile" in flat


def test_compare_help_has_a_description(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "Train every run of a study" in out


def test_tasks_listing_loads_no_data(monkeypatch, capsys):
    """`recnorm tasks` gives every size without reading or generating a data set (it took 12 s when it did)."""
    from recnorm.experiments.tasks import digits, fashion_mnist, kjv, mnist1d_task

    def refuse(*args, **kwargs):
        raise AssertionError("recnorm tasks loaded a data set")

    for module, name in ((fashion_mnist, "load_fashion_mnist"), (digits, "load_digits_arrays"),
                         (mnist1d_task, "load_mnist1d_arrays"), (kjv, "load_kjv")):
        monkeypatch.setattr(module, name, refuse)
    assert main(["tasks"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "55000/5000/10000 examples" in rows["fashion_rows"] and "1297/250/250 examples" in rows["digits"]
    assert "3500/500/1000 examples" in rows["mnist1d"]
    assert "generated" not in rows["kjv_chars"] and "3,724,065/200,000/200,000 characters" in rows["kjv_chars"]
    assert "generated" in rows["adding"]


def test_sweep_without_a_name_is_named_after_its_folder(tmp_path, capsys):
    out = str(tmp_path / "my-grid")
    assert main(["sweep", "--set", "task=adding", "--set", "task_options.length=4", "--set", "steps=1",
                 "--set", "hidden_size=4", "--set", "task_options.valid_size=4", "--set", "task_options.test_size=4",
                 "--set", "popstat_batches=1", "--grid", "seed=0,1", "--workers", "1", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "sweep my-grid: 2 runs" in text and "sweep sweep" not in text
    assert main(["sweep", "--dry-run", "--grid", "seed=0,1"]) == 0
    assert "-> runs/grid" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- clear failures
def test_a_missing_extra_is_named_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if the experiments extra were not installed
    assert main(["train", *TINY, "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recnorm train: error: this command needs 'tqdm'") and "'experiments' extra" in err
    assert "pip install 'recnorm[experiments]'" in err and "\n" not in err
    assert not (tmp_path / "x").exists()  # refused before any work
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(tmp_path)]) == 2
    assert "needs 'matplotlib'" in capsys.readouterr().err


def test_an_unwritable_output_directory_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["train", *TINY, "--steps", "1", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("recnorm train: error: Not a directory: ")
    assert main(["compare", "--smoke", "--workers", "1", "--out", str(blocker / "cmp")]) == 2
    assert "Not a directory" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_directory_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["train", *TINY, "--steps", "1", "--out", str(locked / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Permission denied" in err and "writable directory" in err
    finally:
        locked.chmod(0o700)


def test_report_on_a_mistyped_path_creates_nothing(tmp_path, capsys):
    typo = tmp_path / "runs" / "compre"
    assert main(["report", str(typo)]) == 2
    assert f"recnorm report: error: no such directory: '{typo}'" in capsys.readouterr().err
    assert not typo.exists() and not typo.parent.exists()


def test_report_names_a_damaged_result(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--steps", "1", "--out", out]) == 0
    capsys.readouterr()
    path = os.path.join(out, "result.json")
    text = open(path).read()
    open(path, "w").write(text[:200])  # truncated
    assert main(["report", out]) == 2
    err = capsys.readouterr().err
    assert "no finished runs" in err and f"{path}: not valid JSON" in err and "Traceback" not in err
    open(path, "w").write("{}")
    assert main(["report", out]) == 2
    assert f"{path}: not a valid result: missing 'run_id'" in capsys.readouterr().err


def test_the_first_compile_is_announced(monkeypatch, tmp_path, capsys):
    from recnorm import kernels

    monkeypatch.setattr(kernels, "extensions_built", lambda: False)
    monkeypatch.setattr(kernels, "build_extensions", lambda: {"LSTM": None, "GRU/RNN": None})
    assert main(["train", *TINY, "--norm", "layer", "--steps", "1", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert out.index("compiling recnorm's C++ kernels") < out.index("run adding-")
    assert "the time estimates below do not include it" in out
    monkeypatch.setattr(kernels, "build_extensions", lambda: {"LSTM": "RuntimeError: no compiler", "GRU/RNN": None})
    assert main(["train", *TINY, "--norm", "layer", "--steps", "1", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "could not build the fused LSTM kernel (RuntimeError: no compiler)" in out and "reference loop" in out
    # Runs that need no fused kernel build nothing.
    monkeypatch.setattr(kernels, "build_extensions", lambda: pytest.fail("built for a run without norm"))
    assert main(["train", *TINY, "--steps", "1", "--out", str(tmp_path / "c")]) == 0


# ---------------------------------------------------------------------------------------------- the rough edges (issue 19)
SWEEP_ARGS = ["--set", "task=adding", "--set", 'task_options={"length": 6, "valid_size": 8, "test_size": 8}',
              "--set", "hidden_size=4", "--set", "batch_size=4", "--set", "steps=1", "--set", "popstat_batches=1"]


@pytest.mark.parametrize("kernel", ["fused", "native"])
@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_the_kernel_environment_variable_works_with_train(kernel, norm, monkeypatch, tmp_path, capsys):
    """RECNORM_KERNEL is a preference: the diagnostics capture (and, under native, the normalized layers) run
    as auto chooses instead of failing the run."""
    monkeypatch.setenv("RECNORM_KERNEL", kernel)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--norm", norm, "--steps", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "result.json").exists() and (out / "model.pt").exists()


def test_the_kernel_environment_variable_works_with_sweep(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RECNORM_KERNEL", "fused")
    out = str(tmp_path / "sweep")
    assert main(["sweep", *SWEEP_ARGS, "--grid", "norm=batch,layer", "--out", out, "--workers", "1"]) == 0
    assert "2 run(s) finished now, 0 before, 0 failed" in capsys.readouterr().out


def test_the_engine_never_triggers_the_librarys_warnings(monkeypatch, tmp_path, capsys, caplog):
    import recnorm.nn.rnn as rnn

    monkeypatch.setattr(rnn, "_WARNED_UNCALIBRATED", False)
    with caplog.at_level("WARNING", logger="recnorm"):
        assert main(["train", *TINY, "--norm", "batch", "--steps", "3", "--out", str(tmp_path / "run")]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    assert "running averages (what .eval() uses)" in capsys.readouterr().out  # still measured


def test_every_subcommand_help_states_its_defaults(capsys):
    import argparse

    from recnorm.experiments.config import RunConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in sub.choices.items():
        formatter = sp._get_formatter()
        for action in sp._actions:
            if action.option_strings and action.nargs != 0 and not isinstance(action, argparse._HelpAction):
                assert "default" in formatter._get_help_string(action), (name, action.option_strings)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    config = RunConfig()
    assert f"learning rate (default: {config.lr})" in text and f"(default: {config.hidden_size})" in text


def test_a_finished_sweep_reruns_without_bars_or_compiles(monkeypatch, tmp_path, capsys):
    from recnorm import kernels

    out = str(tmp_path / "sweep")
    argv = ["sweep", *SWEEP_ARGS, "--grid", "norm=none,layer", "--out", out, "--workers", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    monkeypatch.setattr(kernels, "extensions_built", lambda: pytest.fail("checked the kernels with nothing to run"))
    monkeypatch.setattr(kernels, "build_extensions", lambda: pytest.fail("compiled with nothing to run"))
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "all 2 runs already finished" in captured.out and "0 run(s) finished now, 2 before" in captured.out
    assert "run/s" not in captured.err and "0/0" not in captured.err  # no empty progress bar


def test_a_broken_pipe_is_quiet():
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "recnorm", "sweep", "--preset", "default", "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the first line: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and err == "", err


def test_report_on_a_folder_that_is_neither_a_run_nor_a_sweep(tmp_path, capsys):
    out = tmp_path / "runs" / "mine"
    assert main(["sweep", *SWEEP_ARGS, "--grid", "norm=none", "--out", str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is neither a run directory (result.json) nor a sweep directory" in err
    assert f"such as {out}: pass one of them" in err
    assert not (tmp_path / "runs" / "report.html").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "holds no run or sweep below either" in capsys.readouterr().err
