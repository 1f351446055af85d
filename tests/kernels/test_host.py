"""recnorm.kernels.host: the CPU maker that keys the measured speed rules, and the rules it selects."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from recnorm.kernels import autotune, host

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 106
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
"""
AMD = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
CPU implementer\t: 0x41
"""


def test_maker_of_reads_the_vendor_then_the_model():
    assert host.maker_of(INTEL) == "Intel"
    assert host.maker_of(AMD) == "AMD"
    assert host.maker_of(ARM) is None
    # a model string alone (a run's or a benchmark point's recorded CPU)
    assert host.maker_of("AMD EPYC") == "AMD"
    assert host.maker_of("Intel(R) Xeon(R) Processor @ 2.80GHz") == "Intel"
    assert host.maker_of("Apple M2") is None
    # the vendor decides over the model name
    assert host.maker_of(AMD.replace("AMD EPYC 9B14", "Intel-compatible")) == "AMD"


def test_this_hosts_maker_is_the_one_cpuinfo_names():
    try:
        with open("/proc/cpuinfo") as f:
            expected = host.maker_of(f.read())
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    if os.environ.get(host.ENV) is not None:
        pytest.skip(f"${host.ENV} overrides the maker in this process")
    assert host.cpu_maker() == expected


def _in_fresh_process(env_value, code):
    env = dict(os.environ)
    env[host.ENV] = env_value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_the_environment_overrides_the_maker_and_selects_that_rule():
    code = "from recnorm.kernels import autotune, host; print(host.cpu_maker(), autotune.RULE is autotune.host_rule(host.cpu_maker()))"
    for value, maker in (("AMD", "AMD"), ("Intel", "Intel"), ("none", "None")):
        out = _in_fresh_process(value, code)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [maker, "True"]
    bad = _in_fresh_process("ARM", "import recnorm")
    assert bad.returncode != 0
    assert "expected AMD, Intel or none, got 'ARM'" in bad.stderr


def test_each_maker_has_its_own_rule_and_others_have_none():
    assert set(autotune.RULES) == {"AMD", "Intel"}
    assert autotune.RULE is autotune.host_rule(host.cpu_maker())
    for maker, entry in autotune.RULES.items():
        assert autotune.host_rule(maker) is entry
        assert maker in entry["about"]
        # where it was measured, and that the CPU there is this maker's
        cpu = entry["measured"].get("cpu")
        assert cpu is None or host.maker_of(cpu) == maker
    assert autotune.host_rule(None)["rules"] == {}
    assert autotune.host_rule("Apple")["rules"] == {}


def test_a_host_without_a_rule_runs_torchs_op_first(monkeypatch):
    import torch

    import recnorm
    from recnorm import kernels

    monkeypatch.setattr(autotune, "RULE", autotune.host_rule(None))
    layer = recnorm.LSTM(28, 128)
    x = torch.randn(28, 16, 28)
    work = layer.direction_work(0, 0)
    state = (torch.zeros(16, 128), torch.zeros(16, 128))
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert kernels.choose(work, x, None, state, "auto")[0] == "native"
    assert autotune.predict("lstm", True, "float32", 28, 16, 28, 128) is None


def test_the_rules_disagree_where_the_hosts_did():
    # the case that made the rules per maker: the LSTM's eval forward at (784, 64, 1, 128) ran 0.97 of torch's
    # op on the fused kernel on the AMD host and 1.39 on the Intel one (benchmarks/dispatch_data.json)
    score = {}
    for maker in ("AMD", "Intel"):
        coef = autotune.host_rule(maker)["rules"]["lstm/eval/float32"]["coef"]
        score[maker] = coef[0] + sum(c * math.log2(v) for c, v in zip(coef[1:], (784, 64, 1, 128)))
    assert score["AMD"] < 0 < score["Intel"]
