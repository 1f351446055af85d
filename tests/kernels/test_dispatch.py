"""kernel="auto" in eager mode: the order comes from the fitted rule in recnorm.kernels.autotune, only
implementations that accept the case are chosen, kernel= and $RECNORM_KERNEL override it, and every
choice computes the same thing. No timings here: the rule's speed is measured by
benchmarks/fit_dispatch.py and benchmarks/bench_rnn.py, not by tests."""

from __future__ import annotations

import copy

import pytest
import torch

import recnorm
from recnorm import kernels
from recnorm.kernels import autotune, fused

LAYERS = {"lstm": recnorm.LSTM, "gru": recnorm.GRU, "rnn": recnorm.RNN}
RULE_CELL = {"lstm": "lstm", "gru": "gru", "rnn": "rnn_tanh"}


def _layer(cell, norm, I=5, H=7, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return LAYERS[cell](I, H, norm=norm, dtype=dtype, **kw)


def _choice(layer, T, B, grad: bool):
    x = torch.randn(T, B, layer.input_size)
    state = tuple(torch.zeros(B, layer.hidden_size) for _ in range(layer.cell.state_size))
    work = layer.direction_work(0, 0)
    with torch.set_grad_enabled(grad):
        return kernels.choose(work, x, None, state, "auto")[0]


@pytest.mark.parametrize("maker", sorted(autotune.RULES))
def test_rule_is_well_formed(maker):
    rules = autotune.RULES[maker]["rules"]
    for cell in ("lstm", "gru", "rnn_tanh"):
        for phase in ("train", "eval"):
            entry = rules[f"{cell}/{phase}/float32"]
            coef = entry["coef"]
            assert len(coef) == 5 and all(isinstance(c, float) for c in coef)
            assert entry["points"] >= 28 and all(lo <= hi for lo, hi in entry["range"])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("norm", [None, "sequence_batch"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("T,B,I,H", [(3, 2, 5, 7), (40, 64, 16, 32), (200, 8, 8, 64)])
def test_auto_follows_the_rule(cell, norm, grad, T, B, I, H):
    layer = _layer(cell, norm, I, H)
    pred = autotune.predict(RULE_CELL[cell], grad, "float32", T, B, I, H)
    # outside the sizes the rule was fitted on it predicts nothing, and torch's op goes first
    assert _choice(layer, T, B, grad) == ("fused" if pred is not None and pred < 0 else "native")


@pytest.mark.parametrize("maker", sorted(autotune.RULES))
def test_the_rule_does_not_extrapolate(maker, monkeypatch):
    monkeypatch.setattr(autotune, "RULE", autotune.RULES[maker])
    for key, entry in autotune.RULE["rules"].items():
        cell, phase, dtype = key.split("/")
        lo = [r[0] for r in entry["range"]]
        hi = [r[1] for r in entry["range"]]
        assert autotune.predict(cell, phase == "train", dtype, *lo) is not None
        assert autotune.predict(cell, phase == "train", dtype, *hi) is not None
        assert autotune.predict(cell, phase == "train", dtype, hi[0] * 2, *hi[1:]) is None


@pytest.fixture
def rule(monkeypatch):
    """Replace the fitted rule by a constant one: fused first (c0 < 0) or torch's op first (c0 > 0)."""

    def set_rule(c0: float):
        fake = {"rules": {f"{c}/{p}/float32": {"coef": [c0, 0.0, 0.0, 0.0, 0.0]} for c in RULE_CELL.values() for p in ("train", "eval")}}
        monkeypatch.setattr(autotune, "RULE", fake)

    return set_rule


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_rule_orders_only_where_both_serve(rule, cell):
    rule(-1.0)
    assert _choice(_layer(cell, None), 4, 3, True) == "fused"
    rule(+1.0)
    assert _choice(_layer(cell, None), 4, 3, True) == "native"
    # layer norm: only the fused kernel serves it, whatever the rule says
    assert _choice(_layer(cell, "layer"), 4, 3, True) == "fused"
    # a cell with a projection, or float64 without an entry in the rule: torch's op first
    rule(-1.0)
    if cell == "lstm":
        assert _choice(_layer(cell, None, proj_size=3), 4, 3, True) == "native"
    assert autotune.eager_order(_layer(cell, None, dtype=torch.float64).direction_work(0, 0), torch.zeros(2, 2, 5, dtype=torch.float64), None, True)[0] == "native"


def test_a_refusing_implementation_is_never_chosen(rule, monkeypatch):
    rule(-1.0)
    layer = _layer("lstm", None)
    monkeypatch.setattr(fused, "supports", lambda *a: "refused for the test")
    assert _choice(layer, 4, 3, True) == "native"


def test_under_compile_the_rule_orders_only_the_lstm_training_steps_onednn_serves(rule, monkeypatch):
    rule(+1.0)  # torch's op first in eager mode ...
    monkeypatch.setattr(kernels, "execution_mode", lambda: "compile")
    # ... and in a compiled LSTM training step that oneDNN serves (recnorm::native_lstm_train)
    onednn = torch.backends.mkldnn.is_available()
    assert _choice(_layer("lstm", None), 4, 3, True) == ("native" if onednn else "fused")
    # other cells have no such operator (torch's op has no traceable backward there): the fused one
    assert _choice(_layer("gru", None), 4, 3, True) == "fused"
    assert _choice(_layer("lstm", None, proj_size=3), 4, 3, True) == "reference"  # (no fused projection)
    rule(-1.0)
    assert _choice(_layer("lstm", None), 4, 3, True) == "fused"
    assert _choice(_layer("lstm", None), 4, 3, False) == "native"  # eval: torch's op first, whatever the rule


def test_kernel_argument_and_environment_override(rule, monkeypatch):
    rule(-1.0)
    layer = _layer("gru", None)
    x = torch.randn(4, 3, 5)
    state = (torch.zeros(3, 7),)
    work = layer.direction_work(0, 0)
    assert kernels.choose(work, x, None, state, "native")[0] == "native"
    assert kernels.choose(work, x, None, state, "reference")[0] == "reference"
    monkeypatch.setenv("RECNORM_KERNEL", "native")
    assert kernels.resolve_kernel(None) == "native"
    assert kernels.resolve_kernel("fused") == "fused"
    with pytest.raises(ValueError, match="kernel='native' cannot run this layer"):
        kernels.choose(_layer("gru", "layer").direction_work(0, 0), x, None, state, "native")


def _run(layer, x, kernel, autocast=False):
    layer = copy.deepcopy(layer)
    layer.kernel = kernel
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, _ = layer(xg)
    out.float().square().sum().backward()
    grads = [xg.grad] + [p.grad for p in layer.parameters()]
    return out, grads


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("norm", [None, "sequence_batch"])
def test_every_choice_computes_the_same(rule, cell, norm):
    """The two cases with a choice: auto with either order, and each implementation forced, against the
    reference loop, outputs and gradients (float64, two layers)."""
    layer = _layer(cell, norm, dtype=torch.float64, num_layers=2)
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    ref_out, ref_grads = _run(layer, x, "reference")
    for c0, kernel in ((-1.0, "auto"), (1.0, "auto"), (0.0, "fused"), (0.0, "native")):
        rule(c0)
        out, grads = _run(layer, x, kernel)
        torch.testing.assert_close(out, ref_out)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("norm", [None, "layer", "batch"])
@pytest.mark.parametrize("c0", [-1.0, 1.0], ids=["fused_first", "native_first"])
def test_bf16_autocast_runs_in_float32(rule, cell, norm, c0, monkeypatch):
    """Under CPU bfloat16 autocast, auto runs torch's op or the fused kernel in float32 on the upcast
    input: the result is float32's, rounded to bfloat16 (the layer casts its input to bfloat16 first, so
    the float32 reference runs on that rounded input). The fused kernel's is bit for bit the reference's.
    (On a CPU with native bfloat16 a plain LSTM runs torch's op in bfloat16 instead: the next test; here the
    CPU is taken to lack it.)"""
    monkeypatch.setattr(kernels, "cpu_has_bf16", lambda: False)
    rule(c0)
    layer = _layer(cell, norm)
    x = torch.randn(6, 3, 5)
    out, grads = _run(layer, x, "auto", autocast=True)
    assert out.dtype == torch.bfloat16
    ref_out, _ = _run(layer, x.bfloat16().float(), "reference")
    if c0 < 0 or norm is not None:  # the fused kernel
        torch.testing.assert_close(out.float(), ref_out.bfloat16().float(), atol=0, rtol=0)
    else:  # torch's op in float32: within one bfloat16 rounding of the reference
        torch.testing.assert_close(out.float(), ref_out, atol=1e-5, rtol=2**-8)
    assert all(g is not None and g.dtype == torch.float32 for g in grads[1:])


@pytest.mark.parametrize("c0", [-1.0, 1.0], ids=["fused_first", "native_first"])
@pytest.mark.parametrize("config", [{}, {"num_layers": 2}, {"bidirectional": True}, {"batch_first": True}],
                         ids=["one", "two_layers", "bidirectional", "batch_first"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "eval"])
def test_bf16_autocast_plain_lstm_is_torch_nn_on_a_bf16_cpu(rule, c0, config, grad):
    """On a CPU with native bfloat16, a plain LSTM under CPU bfloat16 autocast runs torch's op in bfloat16,
    whatever the rule's float32 order: outputs, final states and gradients equal torch.nn.LSTM's under the
    same autocast, bit for bit, and the recording says native."""
    if not kernels.cpu_has_bf16():
        pytest.skip("this CPU has no native bfloat16: the float32 upcast runs (the test above)")
    rule(c0)
    ours = _layer("lstm", None, **config)
    ref = torch.nn.LSTM(5, 7, **config)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, 5) if config.get("batch_first") else torch.randn(6, 3, 5)
    results = []
    for m in (ours, ref):
        xg = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16), kernels.recording() as ran:
            out, (h, c) = m(xg)
        if grad:
            out.float().square().sum().backward()
        results.append(([out, h, c] + ([xg.grad] + [p.grad for p in m.parameters()] if grad else []), ran))
    (mine, ran), (theirs, _) = results
    assert set(ran) == {"native"} and mine[0].dtype == torch.bfloat16
    for a, b in zip(mine, theirs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_only_a_plain_full_batch_bf16_lstm_runs_torch_op_in_bf16(monkeypatch):
    """Normalized layers, a projection, other cells, float16, packed input and a CPU without native bfloat16
    run in float32 under autocast (kernels._run_upcast)."""
    monkeypatch.setattr(kernels, "cpu_has_bf16", lambda: True)
    x = torch.randn(6, 3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        work = _layer("lstm", None).direction_work(0, 0)
        xb = x.bfloat16()
        assert kernels.native_runs_bf16(work, xb, None)
        assert not kernels.native_runs_bf16(_layer("lstm", "layer").direction_work(0, 0), xb, None)
        assert not kernels.native_runs_bf16(_layer("lstm", None, proj_size=3).direction_work(0, 0), xb, None)
        assert not kernels.native_runs_bf16(_layer("gru", None).direction_work(0, 0), xb, None)
        assert not kernels.native_runs_bf16(work, x.half(), None)
        assert not kernels.native_runs_bf16(work, xb.reshape(-1, 5), torch.tensor([3] * 6))
        monkeypatch.setattr(kernels, "cpu_has_bf16", lambda: False)
        assert not kernels.native_runs_bf16(work, xb, None)


def _ran(layer, x, grad: bool):
    """The implementation of every layer direction that one forward ran, in order."""
    with kernels.recording() as chosen, torch.set_grad_enabled(grad):
        layer(x)
    return chosen


@pytest.fixture
def width_rule(monkeypatch):
    """A rule by input width only: fused predicted faster for inputs narrower than 8 features (by ``gain``),
    torch's op for wider ones (by 1): a stack of a narrow input and wider hidden layers is split by it."""

    def set_rule(gain: float):
        # log(t_fused / t_native) = c0 + cI log2 I: -gain at I = 4, +1 at I = 16
        cI = (1.0 + gain) / 2.0
        coef = [-gain - 2.0 * cI, 0.0, 0.0, cI, 0.0]
        fake = {"rules": {f"{c}/{p}/float32": {"coef": list(coef)} for c in RULE_CELL.values() for p in ("train", "eval")}}
        monkeypatch.setattr(autotune, "RULE", fake)
        assert autotune.predict("lstm", True, "float32", 6, 3, 4, 16) == pytest.approx(-gain)
        assert autotune.predict("lstm", True, "float32", 6, 3, 16, 16) == pytest.approx(1.0)

    return set_rule


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_trained_stack_runs_on_one_implementation(width_rule, cell, bidirectional):
    # issue 17 item 6: per layer the rule would run layer 0 (I = 4) fused and layers 1, 2 (I = 16 or 32) on
    # torch's op; mixing them peaks higher in memory than either alone, so in training one runs them all
    layer = _layer(cell, None, I=4, H=16, num_layers=3, bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    x = torch.randn(6, 3, 4)
    for gain in (0.5, 5.0):
        width_rule(gain)
        # the stack's prediction: the sum over its layers' input widths (4, then 16 D)
        stack = sum(autotune.predict(RULE_CELL[cell], True, "float32", 6, 3, w, 16) for w in (4, 16 * D, 16 * D))
        if D == 1:  # -0.5 + 2 * 1 > 0; -5 + 2 * 1 < 0
            assert (stack < 0) == (gain == 5.0)
        assert _ran(layer, x, True) == ["fused" if stack < 0 else "native"] * 3 * D
        # eval saves nothing: each layer takes the faster one for its own size
        assert _ran(layer, x, False) == ["fused"] * D + ["native"] * 2 * D
    # a single layer chooses as before
    single = _layer(cell, None, I=4, H=16)
    assert _ran(single, x, True) == ["fused"]


def test_the_stack_preference_is_only_an_order(width_rule, monkeypatch):
    width_rule(5.0)
    layer = _layer("lstm", None, I=4, H=16, num_layers=2)
    x = torch.randn(6, 3, 4)
    # the first layer's implementation is kept where it serves; where the fused kernel refuses, each layer chooses
    monkeypatch.setattr(fused, "supports", lambda *a: "refused for the test")
    assert _ran(layer, x, True) == ["native", "native"]
    monkeypatch.undo()
    width_rule(5.0)
    # a forced kernel, or another execution mode, is left alone
    work = layer.direction_work(0, 0)
    state = (torch.zeros(3, 16), torch.zeros(3, 16))
    with torch.enable_grad():
        x.requires_grad_(True)
        assert kernels.stack_preference(work, x, None, state, "native", [4, 16]) is None
        assert kernels.stack_preference(work, x, None, state, "auto", [4]) is None
        assert kernels.stack_preference(work, x, None, state, "auto", [4, 16]) == "fused"
        monkeypatch.setattr(kernels, "execution_mode", lambda: "compile")
        assert kernels.stack_preference(work, x, None, state, "auto", [4, 16]) is None


def test_recording_sees_every_direction_and_the_autocast_upcast(rule):
    rule(-1.0)  # the fused kernel first
    layer = _layer("lstm", "layer", num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 5)
    with kernels.recording() as ran:
        layer(x)
    assert ran == ["fused"] * 4
    with kernels.recording() as ran, torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert ran == ["fused"] * 4  # the upcast path runs the fused kernel in float32, and says so
    assert not kernels._OBSERVERS  # removed after the block


def test_a_route_decides_through_choose_and_the_innermost_wins():
    layer = _layer("lstm", None)
    x = torch.randn(6, 3, 5)
    seen = []

    def outer(call):
        seen.append("outer")
        return call.choose(kernel="reference")

    def inner(call):
        seen.append("inner")
        return call.choose(kernel="native")

    with kernels.route_dispatch(outer), kernels.recording() as ran:
        layer(x)
        with kernels.route_dispatch(inner):
            layer(x)
        layer(x)
    assert ran == ["reference", "native", "reference"] and seen == ["outer", "inner", "outer"]
    # a policy cannot make an implementation serve a case it refuses: choose's check still raises
    with kernels.route_dispatch(lambda call: call.choose(kernel="native")):
        with pytest.raises(ValueError, match="cannot run this layer"):
            _layer("gru", "layer")(x)
    assert not kernels._ROUTES and not kernels._OBSERVERS  # gone after the blocks, an exception included
