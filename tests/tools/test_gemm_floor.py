"""benchmarks/gemm_floor.py: the machinery at a tiny size (every candidate runs and gives a ratio; the
quiet check refuses a loaded machine). Never a time."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
_spec = importlib.util.spec_from_file_location("gemm_floor", os.path.join(ROOT, "benchmarks", "gemm_floor.py"))
gemm_floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gemm_floor)


def test_measure_gives_every_ratio_at_a_tiny_size():
    r = gemm_floor.measure((3, 2, 3, 4), rounds=1, reps=1)
    assert {"torch.nn ms", "fused None", "fused layer", "GEMMs (MKL)"} <= set(r)
    assert all(math.isfinite(v) and v > 0 for v in r.values())


def test_training_step_gives_every_ratio():
    r = gemm_floor.measure((3, 2, 3, 4), rounds=1, reps=1, mode="train")
    assert {"torch.nn ms", "fused None", "fused layer", "GEMMs (MKL)"} <= set(r)
    assert all(math.isfinite(v) and v > 0 for v in r.values())


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="'infer'"):
        gemm_floor.measure((3, 2, 3, 4), rounds=1, reps=1, mode="infer")


def test_refuses_a_machine_that_is_not_quiet(monkeypatch, capsys):
    monkeypatch.setattr(gemm_floor, "load_average", lambda: 3.0)
    assert gemm_floor.main(["--max-load", "0.5"]) == 2
    assert "not quiet" in capsys.readouterr().err
