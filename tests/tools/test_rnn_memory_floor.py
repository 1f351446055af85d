"""benchmarks/rnn_memory_floor.py: the machinery at a tiny size (every candidate runs and gives a ratio, the
sums add up, the kept terms' size is 2 x N x H floats; the quiet check refuses a loaded machine). Never a time."""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))

import rnn_memory_floor  # noqa: E402


def test_measure_gives_every_ratio_at_a_tiny_size():
    r = rnn_memory_floor.measure((3, 4, 3, 8), rounds=1, min_time=0.0)
    expected = {"torch.nn ms", "fused layer", "fused batch", "products", "fused layer + products", "fused batch + products"}
    assert expected <= set(r)
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in expected)
    assert r["fused batch + products"] == r["fused batch"] + r["products"]
    assert r["kept terms MiB"] == 2 * (3 * 4) * 8 * 4 / 2**20


def test_refuses_a_machine_that_is_not_quiet(monkeypatch, capsys):
    monkeypatch.setattr(rnn_memory_floor, "load_average", lambda: 3.0)
    assert rnn_memory_floor.main(["--max-load", "0.5"]) == 2
    assert "not quiet" in capsys.readouterr().err
