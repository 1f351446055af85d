"""benchmarks/ab_kernels.py: the machinery at a tiny size (a revision's kernel sources, the bit-for-bit
check, the ratios, the refusals). Never a time."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
_spec = importlib.util.spec_from_file_location("ab_kernels", os.path.join(ROOT, "benchmarks", "ab_kernels.py"))
ab_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab_kernels)

from recnorm.kernels import fused  # noqa: E402


def _git_checkout() -> bool:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0


@pytest.mark.skipif(not _git_checkout(), reason="needs a git checkout")
def test_sources_at_a_revision_are_the_committed_kernel_files(tmp_path):
    out = ab_kernels.sources_at("HEAD", str(tmp_path))
    names = set(os.listdir(out))
    assert {"fused_lstm.cpp", "fused_gru_rnn.cpp", "fused_common.h", "fused_loop.h"} <= names
    committed = subprocess.run(["git", "show", "HEAD:src/recnorm/kernels/csrc/fused_loop.h"], cwd=ROOT, check=True,
                               capture_output=True).stdout  # fmt: skip
    with open(os.path.join(out, "fused_loop.h"), "rb") as f:
        assert f.read() == committed


@pytest.mark.skipif(not _git_checkout(), reason="needs a git checkout")
def test_an_unknown_revision_is_named(tmp_path):
    with pytest.raises(ValueError, match="no-such-revision"):
        ab_kernels.sources_at("no-such-revision", str(tmp_path))


@pytest.mark.parametrize("cell,train", [("LSTM", False), ("GRU", True)])
def test_the_same_build_on_both_sides_is_equal_to_the_bit(cell, train):
    base = fused.load_extension(ab_kernels.FAMILIES[cell][0])
    if base is None:
        pytest.skip("the fused kernels could not be built here")
    r = ab_kernels.measure(cell, "layer", (3, 4, 5, 6), train, base, rounds=6, reps=1)
    assert r["max_abs_diff"] == 0
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("new/base", "base/torch.nn", "new/torch.nn", "torch.nn ms"))
    lo, hi = r["new/base ci"]
    assert lo <= r["new/base"] <= hi


def test_refuses_a_machine_that_is_not_quiet(monkeypatch, capsys):
    monkeypatch.setattr(ab_kernels, "load_average", lambda: 3.0)
    assert ab_kernels.main(["--max-load", "0.5"]) == 2
    assert "not quiet" in capsys.readouterr().err


def test_a_bad_size_is_an_error_naming_it(capsys):
    with pytest.raises(SystemExit):
        ab_kernels.main(["--size", "3,4,5"])
    assert "T,B,I,H" in capsys.readouterr().err
