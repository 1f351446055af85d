"""Checkpoints of a run in progress: a run killed mid-way resumes from its last checkpoint and ends with the
same numbers as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from recnorm.experiments.checkpoint import FileCheckpoint, checkpoint_every
from recnorm.experiments.config import RunConfig
from recnorm.experiments.train import train_and_evaluate

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


def small_config(norm="batch", steps=12) -> RunConfig:
    return RunConfig(task="adding", task_options={"length": 8, "valid_size": 16, "test_size": 16}, norm=norm,
                     hidden_size=8, batch_size=8, steps=steps, eval_every=3, eval_batch_size=16, diag_every=4,
                     popstat_batches=1, dropout=0.0, h0_noise=0.1)


def _numbers(result):
    r = result if isinstance(result, dict) else result.to_dict()
    return {"train": {k: v for k, v in r["train"].items() if k not in ("step_time", "time")},
            "valid": {k: v for k, v in r["valid"].items() if k != "time"},
            "final": r["final"], "grad_flow": r["diagnostics"]["grad_flow"], "steps_done": r["steps_done"]}


class _Stop(Exception):
    pass


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_a_run_interrupted_after_a_checkpoint_resumes_to_the_same_numbers(tmp_path, norm):
    config = small_config(norm)
    whole = train_and_evaluate(config, str(tmp_path / "whole"))
    ckpt = FileCheckpoint(str(tmp_path / "ckpt.pt"), every=4)

    def stop_at_7(step, total, info):
        if "loss" in info and step == 7:
            raise _Stop  # killed between checkpoints: steps 5-7 are redone

    with pytest.raises(_Stop):
        train_and_evaluate(config, str(tmp_path / "cut"), progress=stop_at_7, checkpoint=ckpt)
    assert ckpt.load()["step"] == 4
    resumed = train_and_evaluate(config, str(tmp_path / "cut"), checkpoint=ckpt)
    assert _numbers(resumed) == _numbers(whole)


def test_a_killed_run_resumes_from_its_checkpoint(tmp_path):
    """A real kill (SIGKILL of the training process) after the checkpoint of step 40 exists."""
    config = small_config("layer", steps=400)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config.to_dict()))
    ckpt_path = tmp_path / "ckpt.pt"
    code = ("import json, sys\n"
            "from recnorm.experiments.config import RunConfig\n"
            "from recnorm.experiments.checkpoint import FileCheckpoint\n"
            "from recnorm.experiments.train import train_and_evaluate\n"
            f"config = RunConfig.from_dict(json.load(open({str(config_path)!r})))\n"
            f"train_and_evaluate(config, {str(tmp_path / 'run')!r}, checkpoint=FileCheckpoint({str(ckpt_path)!r}, 40))\n")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ckpt_path.exists() and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before its first checkpoint: " + proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "run" / "result.json").exists()
    ckpt = FileCheckpoint(str(ckpt_path), 40)
    cut_at = ckpt.load()["step"]
    assert 40 <= cut_at < 400
    resumed = train_and_evaluate(config, str(tmp_path / "run"), checkpoint=ckpt)
    whole = train_and_evaluate(config, str(tmp_path / "whole"))
    assert _numbers(resumed) == _numbers(whole)


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("RECNORM_CHECKPOINT_EVERY", raising=False)
    assert checkpoint_every() == 1000
    monkeypatch.setenv("RECNORM_CHECKPOINT_EVERY", "0")
    assert checkpoint_every() == 0
    monkeypatch.setenv("RECNORM_CHECKPOINT_EVERY", "ten")
    with pytest.raises(ValueError, match="RECNORM_CHECKPOINT_EVERY: expected a number of steps"):
        checkpoint_every()
