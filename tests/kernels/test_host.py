"""recnorm.kernels.host: the CPU maker that keys the measured speed rules, and the rules it selects."""

from __future__ import annotations

import copy
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


def test_each_makers_rule_follows_its_own_measurements_at_the_bench_sizes():
    """The committed rules against the committed data (benchmarks/dispatch_data.json): at each benchmark size,
    each maker's rule picks what that maker's measurements found faster, except where its fit reports the
    size as picked wrongly."""
    import importlib.util
    import json
    import statistics

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("fit_dispatch", os.path.join(root, "benchmarks", "fit_dispatch.py"))
    fit_dispatch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_dispatch)
    with open(os.path.join(root, "benchmarks", "dispatch_data.json")) as f:
        points = json.load(f)["points"]
    bench = [(28, 128, 28, 128), (100, 64, 128, 256), (200, 32, 64, 512), (784, 64, 1, 128)]
    faster = {}
    for p in points:
        maker = fit_dispatch.point_maker(p)
        if tuple(p["size"]) in bench and p["dtype"] == "float32":
            for phase, t in p["times"].items():
                ratio = statistics.median(a / b for a, b in zip(t["fused"], t["native"]))
                faster[(maker, p["cell"], phase, tuple(p["size"]))] = ratio < 1.0
    for maker, rule in autotune.RULES.items():
        for key, entry in rule["rules"].items():
            cell, phase, dtype = key.split("/")
            for size in bench:
                score = autotune.predict(cell, phase == "train", dtype, *size, rule=rule)
                wrong = list(size) in entry["bench_sizes_wrong"]
                assert (score < 0) == (faster[(maker, cell, phase, size)] != wrong), (maker, key, size)


def test_the_avx512_build_follows_the_capability_the_maker_and_the_family(monkeypatch):
    """The LSTM's extension is built for AVX-512 on Intel and AMD AVX-512 CPUs, the GRU/RNN's on Intel ones
    only; a capability capped to AVX2 (``ATEN_CPU_CAPABILITY``, how runs made on AVX2 replay) gets the AVX2
    build, and ``RECNORM_FUSED_AVX512`` decides for both families."""
    import torch

    from recnorm.kernels import fused

    monkeypatch.delenv("RECNORM_FUSED_AVX512", raising=False)
    for capability, maker, family, tag in (
            ("AVX512", "Intel", "lstm", "avx512"), ("AVX512", "Intel", "gru_rnn", "avx512"),
            ("AVX512", "AMD", "lstm", "avx512"), ("AVX512", "AMD", "gru_rnn", "avx2"),
            ("AVX512", None, "lstm", "avx2"), ("AVX512", None, "gru_rnn", "avx2"),
            ("AVX2", "Intel", "lstm", "avx2"), ("AVX2", "AMD", "lstm", "avx2"),
            ("DEFAULT", "Intel", "lstm", "default")):  # fmt: skip
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(host, "cpu_maker", lambda m=maker: m)
        got, flags = fused.build_flags(family)
        assert got == tag, (capability, maker, family)
        assert ("-DCPU_CAPABILITY_AVX512" in flags) == (tag == "avx512")
        assert ("-DCPU_CAPABILITY_AVX2" in flags) == (tag == "avx2")
        for value, forced in (("0", "avx2"), ("1", "avx512")):
            monkeypatch.setenv("RECNORM_FUSED_AVX512", value)
            assert fused.build_flags(family)[0] == (forced if capability == "AVX512" else tag)
        monkeypatch.delenv("RECNORM_FUSED_AVX512")
    assert fused.build_flags()[0] == fused.build_flags("lstm")[0]


@pytest.mark.parametrize("family", ["lstm", "gru_rnn"])
def test_the_gemm_prefill_follows_the_maker_and_changes_no_bit(family):
    """Whether the kernels' GEMMs clear their output first (beta = 1 into zeros) or leave beta = 0 to MKL is
    a speed choice per CPU maker (fused.GEMM_PREFILL_MAKERS); both give the same values, bit for bit, in
    the forward and the backward."""
    import torch

    import recnorm
    from recnorm.kernels import fused

    ext = fused.load_extension(family)
    if ext is None:
        pytest.skip("the fused extension cannot be built here")
    assert ext.gemm_prefill() == (host.cpu_maker() in fused.GEMM_PREFILL_MAKERS)
    cls = recnorm.LSTM if family == "lstm" else recnorm.GRU
    torch.manual_seed(0)
    layer = cls(28, 32, norm="layer", kernel="fused")
    x = torch.randn(9, 5, 28)

    def run():
        layer.zero_grad()
        out, _ = layer(x)
        out.sum().backward()
        with torch.no_grad():
            ev = layer.eval()(x)[0]
        layer.train()
        return [out.detach(), ev] + [p.grad.clone() for p in layer.parameters()]

    for a, b in zip(*_on_and_off(ext.gemm_prefill, ext.set_gemm_prefill, run)):
        assert torch.equal(a, b)


def _on_and_off(get, set_, run):
    """run()'s results with an extension's switch on, then off; the switch is restored after."""
    before = get()
    try:
        results = []
        for on in (True, False):
            set_(on)
            assert get() == on
            results.append(run())
    finally:
        set_(before)
    return results


@pytest.mark.parametrize("env, wanted", [("RECNORM_FUSED_MKL_PACK", "mkl_pack_wanted"),
                                          ("RECNORM_FUSED_WGRAD_T", "wgrad_transposed_wanted")])
def test_the_intel_gemm_settings_follow_the_maker_and_the_environment(monkeypatch, env, wanted):
    from recnorm.kernels import fused

    monkeypatch.delenv(env, raising=False)
    for maker, expected in (("Intel", True), ("AMD", False), (None, False)):
        monkeypatch.setattr(host, "cpu_maker", lambda m=maker: m)
        assert getattr(fused, wanted)() is expected, maker
        for value in ("0", "1"):
            monkeypatch.setenv(env, value)
            assert getattr(fused, wanted)() is (value == "1")
        monkeypatch.delenv(env)


def _gemm_cases(family):
    import recnorm

    if family == "lstm":  # zoneout of h: the backward adds its product into what the pass left (beta = 1)
        return [(recnorm.LSTM, {}), (recnorm.LSTM, {"norm": "layer", "zoneout": 0.3})]
    return [(recnorm.GRU, {"norm": "layer"}), (recnorm.RNN, {}), (recnorm.RNN, {"norm": "batch", "zoneout": 0.3})]


@pytest.mark.parametrize("family", ["lstm", "gru_rnn"])
@pytest.mark.parametrize("hidden", [40, 300])
def test_the_mkl_packed_step_gemms_follow_the_maker_and_agree_with_at_mm(family, hidden):
    """Where the maker's rule says so (fused.MKL_PACK_MAKERS) and torch exports MKL's packed API, the step
    GEMMs multiply by W_hh packed once per call. Packed or not, the forward and the backward agree to float32
    rounding: on a packed batch (later steps have fewer rows than the packing was made for), with zoneout (the
    backward's product added into its output), in training and in eval. H = 300 makes the backward's inner
    dimension (4H, 3H) long enough for MKL to block it: there the two may round differently."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence

    from recnorm.kernels import fused

    ext = fused.load_extension(family)
    if ext is None:
        pytest.skip("the fused extension cannot be built here")
    assert ext.gemm_packed() == (fused.mkl_pack_wanted() and ext.mkl_pack_available())
    if host.cpu_maker() == "Intel" and torch.backends.mkl.is_available():
        assert ext.mkl_pack_available()  # torch's MKL exports the packed API: the weak symbols must find it
    if not ext.mkl_pack_available():
        pytest.skip("this torch build exports no MKL packed GEMM")
    lengths = torch.tensor([7, 3, 6, 1, 7])
    for cls, kw in _gemm_cases(family):
        torch.manual_seed(0)
        layer = cls(11, hidden, kernel="fused", **kw)
        x = torch.randn(7, 5, 11)
        start = copy.deepcopy(layer.state_dict())  # batch norm's running statistics move in training

        def run():
            layer.load_state_dict(start)
            torch.manual_seed(1)  # the same zoneout masks
            layer.train()
            layer.zero_grad()
            xg = x.clone().requires_grad_(True)
            out, _ = layer(pack_padded_sequence(xg, lengths, enforce_sorted=False))
            (out.data * torch.linspace(-1, 1, out.data.numel()).view_as(out.data)).sum().backward()
            with torch.no_grad():
                ev = layer.eval()(x)[0]
            return [out.data.detach(), ev, xg.grad] + [p.grad.clone() for p in layer.parameters()]

        for a, b in zip(*_on_and_off(ext.gemm_packed, ext.set_gemm_packed, run)):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * b.abs().max().item())


@pytest.mark.parametrize("family", ["lstm", "gru_rnn"])
def test_the_transposed_weight_gradients_follow_the_maker_and_agree_with_the_plain_ones(family, monkeypatch):
    """Where the maker's rule says so (fused.WGRAD_TRANSPOSED_MAKERS), the backward sums its weight gradients
    as dW^T += x^T dG. Either way every gradient agrees to float32 rounding, and comes back in the weight's
    own layout: over several chunks (8 rows each), on a packed batch (h_{t-1} gathered for the chunk), with
    dx, zoneout and a narrow and a wide hidden size."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence

    from recnorm.kernels import fused

    ext = fused.load_extension(family)
    if ext is None:
        pytest.skip("the fused extension cannot be built here")
    assert ext.wgrad_transposed() == fused.wgrad_transposed_wanted()
    monkeypatch.setenv("RECNORM_FUSED_CHUNK_ROWS", "8")
    lengths = torch.tensor([7, 3, 6, 1, 7])
    for hidden in (40, 300):
        for cls, kw in _gemm_cases(family):
            torch.manual_seed(0)
            layer = cls(11, hidden, kernel="fused", **kw)
            x = torch.randn(7, 5, 11)
            start = copy.deepcopy(layer.state_dict())

            def run():
                layer.load_state_dict(start)
                torch.manual_seed(1)
                layer.zero_grad()
                xg = x.clone().requires_grad_(True)
                out, _ = layer(pack_padded_sequence(xg, lengths, enforce_sorted=False))
                (out.data * torch.linspace(-1, 1, out.data.numel()).view_as(out.data)).sum().backward()
                return [xg.grad] + [p.grad.clone() for p in layer.parameters()]

            on, off = _on_and_off(ext.wgrad_transposed, ext.set_wgrad_transposed, run)
            for (name, param), a, b in zip(layer.named_parameters(), on[1:], off[1:]):
                assert a.is_contiguous() and a.shape == param.shape, name
                torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * b.abs().max().item())
            torch.testing.assert_close(on[0], off[0], rtol=0, atol=0)  # dx = dG W_ih is not touched
