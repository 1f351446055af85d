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

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
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
    assert "final:" in text and "report:" in text
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
    assert "cell: expected one of ['lstm', 'gru', 'rnn'], got 'lstmm'" in err
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
