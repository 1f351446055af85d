"""A plain layer's lean path (RecurrentBase._lean_forward): where kernels.plain_stack_runs says that every
layer runs torch's op, the layer calls that op with nothing around it; where it says the fused kernel, the
layer runs that kernel on each layer's DirectionWork without the full path's dispatch. It must be taken
exactly where the full path would choose one implementation for every layer, and give the full path's
results bit for bit; everywhere else (layers that differ, another implementation, mode, dtype or input, a
hook that must see every call, a layer the fused kernel declines) it must step aside."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import pack_padded_sequence

import recnorm
from recnorm import kernels
from recnorm.kernels import autotune
from recnorm.nn.rnn import RecurrentBase

LAYERS = {"lstm": recnorm.LSTM, "gru": recnorm.GRU, "rnn": recnorm.RNN, "rnn_relu": recnorm.RNN}
RULE_CELL = ("lstm", "gru", "rnn_tanh")


@pytest.fixture
def lean_calls(monkeypatch):
    """The calls the lean path served (True) or left to the full path (False)."""
    seen = []
    original = RecurrentBase._lean_forward

    def spy(self, input, hx):
        out = original(self, input, hx)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(RecurrentBase, "_lean_forward", spy)
    return seen


@pytest.fixture
def rule(monkeypatch):
    """A constant dispatch rule: the fused kernel first (c0 < 0) or torch's op first (c0 > 0)."""

    def set_rule(c0: float):
        fake = {"rules": {f"{c}/{p}/float32": {"coef": [c0, 0.0, 0.0, 0.0, 0.0]} for c in RULE_CELL for p in ("train", "eval")}}
        monkeypatch.setattr(autotune, "RULE", fake)

    return set_rule


def _layer(cell, **kw):
    torch.manual_seed(0)
    extra = {"nonlinearity": "relu"} if cell == "rnn_relu" else {}
    return LAYERS[cell](5, 7, **extra, **kw)


def _run(layer, x, hx, train: bool):
    """Outputs, final states and (training) the gradients of x, hx and every parameter."""
    layer.train(train)
    leaves = [x, *([hx] if isinstance(hx, torch.Tensor) else list(hx or ()))]
    for t in leaves:
        t.grad = None
    layer.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(train):
        out, fin = layer(x, hx)
        fin = fin if isinstance(fin, tuple) else (fin,)
        results = [out, *fin]
        if train:
            (out.square().sum() + sum(f.sum() for f in fin)).backward()
            results += [t.grad for t in leaves] + [p.grad for p in layer.parameters()]
    return [r.detach().clone() if r is not None else None for r in results]


def _full_path(layer, x, hx, train):
    """The same call through the full path (a dispatch observer makes the lean path step aside) and the
    implementations it chose."""
    with kernels.recording() as ran:
        return _run(layer, x, hx, train), list(ran)


def _same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert (u is None) == (v is None)
        if u is not None:
            assert u.shape == v.shape and torch.equal(u, v)


CONFIGS = {"one": {}, "two_layers": {"num_layers": 2}, "batch_first": {"batch_first": True}, "no_bias": {"bias": False},
           "proj": {"proj_size": 3}}
CASES = [pytest.param(cell, config, id=f"{cell}-{name}") for cell in ("lstm", "gru", "rnn", "rnn_relu")
         for name, config in CONFIGS.items() if cell == "lstm" or "proj_size" not in config]  # a projection is LSTM's only


@pytest.mark.parametrize("cell,config", CASES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["zeros", "hx"])
@pytest.mark.parametrize("first", ["native", "fused"])
def test_lean_path_is_the_full_path_bit_for_bit(cell, config, train, with_hx, first, rule, lean_calls):
    rule(+1.0 if first == "native" else -1.0)  # the rule's first: the lean path applies wherever it can
    layer = _layer(cell, **config)
    T, B = 4, 3
    x = torch.randn(B, T, 5) if layer.batch_first else torch.randn(T, B, 5)
    hx = None
    if with_hx:
        shapes = layer._state_shapes(B)
        hx = tuple(torch.randn(s) for s in shapes)
        hx = hx if cell == "lstm" else hx[0]
    if train:
        x.requires_grad_(True)
        if hx is not None:
            for t in (hx if isinstance(hx, tuple) else (hx,)):
                t.requires_grad_(True)
    full, ran = _full_path(layer, x, hx, train)
    lean = _run(layer, x, hx, train)
    assert set(ran) == {"native" if layer.proj_size else first}  # the rule has no entry with a projection
    grad_stack = train and layer.num_layers > 1  # a trained stack is weighed as a whole: the full path decides
    assert lean_calls[-1] is not grad_stack
    _same(lean, full)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_lean_path_is_taken_where_the_full_path_chooses_one_implementation(cell, train, rule, lean_calls):
    x = torch.randn(6, 4, 5)
    for c0, expected in ((-1.0, "fused"), (+1.0, "native")):
        rule(c0)
        layer = _layer(cell)
        full, ran = _full_path(layer, x, None, train)
        assert ran == [expected]
        lean = _run(layer, x, None, train)
        assert lean_calls[-1] is True
        _same(lean, full)
    # the fitted rule itself, at sizes where it picks either: the two paths agree on the choice
    for T, B, I, H in [(3, 2, 5, 7), (40, 64, 16, 32), (200, 8, 8, 64), (28, 128, 28, 128)]:
        torch.manual_seed(0)
        layer = LAYERS[cell](I, H).train(train)
        xs = torch.randn(T, B, I)
        with torch.set_grad_enabled(train), kernels.recording() as ran:
            layer(xs)
        work = layer.direction_work(0, 0, None, xs)
        grad = train
        assert [kernels.plain_stack_runs(work.cell.kind, xs, [I], H, False, grad, "auto")] == ran


def test_lean_path_steps_aside_where_the_layers_differ(monkeypatch, lean_calls):
    """A rule that puts the first layer (5 input features) on torch's op and the second (7, its hidden size)
    on the fused kernel: the full path runs each on its own, the lean path does not run either."""
    fake = {"rules": {f"lstm/{p}/float32": {"coef": [2.5, 0.0, 0.0, -1.0, 0.0]} for p in ("train", "eval")}}
    monkeypatch.setattr(autotune, "RULE", fake)
    layer = _layer("lstm", num_layers=2).eval()
    x = torch.randn(4, 3, 5)
    assert kernels.plain_stack_runs("lstm", x, [5, 7], 7, False, False, "auto") is None
    with kernels.recording() as ran:
        full = _eval_run(layer, x, None)
    assert ran == ["native", "fused"]
    lean_calls.clear()
    _same(_eval_run(layer, x, None), full)
    assert lean_calls == [False]


def test_the_fused_lean_path_steps_aside_where_the_fused_kernel_declines(rule, lean_calls, monkeypatch):
    """Where plain_stack_runs names the fused kernel (forced or preferred) but the kernel cannot serve a layer
    (a projection), the full path answers: the forced kernel's error, or the preference's fallback."""
    rule(-1.0)
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="does not serve proj_size"):
        _layer("lstm", proj_size=3, kernel="fused")(x)
    assert lean_calls[-1] is False
    monkeypatch.setenv("RECNORM_KERNEL", "fused")
    layer = _layer("lstm", proj_size=3)
    with kernels.recording() as ran:
        layer(x)
    assert ran == ["native"] and lean_calls[-1] is False


def test_the_lean_path_reads_the_weights_a_parametrization_computes(rule, lean_calls):
    rule(+1.0)

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    layer = _layer("lstm")
    x = torch.randn(4, 3, 5)
    plain = _run(layer, x, None, False)
    parametrize.register_parametrization(layer, "weight_hh_l0", Double())
    full, _ = _full_path(layer, x, None, False)
    lean = _run(layer, x, None, False)
    assert lean_calls[-1] is True
    _same(lean, full)
    assert not torch.equal(lean[0], plain[0])


def test_the_lean_path_steps_aside(rule, lean_calls, monkeypatch):
    rule(+1.0)
    x = torch.randn(4, 3, 5)

    def served(layer, *args, train=False):
        lean_calls.clear()
        layer.train(train)
        with torch.set_grad_enabled(train):
            layer(*args)
        return bool(lean_calls) and lean_calls[-1]

    assert served(_layer("lstm"), x)
    # structure: a norm in training, zoneout, a second direction, dropout in training, weight dropout in training
    assert not served(_layer("lstm", norm="layer"), x, train=True)
    assert served(_layer("lstm", norm="layer"), x)  # eval without autograd: on the fused kernel
    for kw in ({"zoneout": 0.1}, {"bidirectional": True}):
        assert not served(_layer("lstm", **kw), x)
    assert not served(_layer("lstm", num_layers=2, dropout=0.5), x, train=True)
    assert served(_layer("lstm", num_layers=2, dropout=0.5), x, train=False)
    assert not served(_layer("lstm", weight_dropout=0.5), x, train=True)
    assert served(_layer("lstm", weight_dropout=0.5), x, train=False)
    # inputs: unbatched, packed, empty batch, another dtype, autocast
    assert not served(_layer("lstm"), x[:, 0])
    assert not served(_layer("lstm"), pack_padded_sequence(x, [4, 3, 2]))
    assert not served(_layer("lstm"), torch.randn(4, 0, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not served(_layer("lstm"), x, train=True)  # autograd through the 16-bit casts: the full path
        assert served(_layer("lstm"), x)  # eval: the full path's float32 upcast (test_lean_path_under_autocast...)
        assert not served(_layer("lstm", kernel="native"), x)  # forced: the full path runs the op in 16 bits
    # a forced implementation, an environment preference, a per-step observer
    assert not served(_layer("lstm", kernel="reference"), x)
    assert served(_layer("lstm", kernel="native"), x)
    monkeypatch.setenv("RECNORM_KERNEL", "fused")
    assert served(_layer("lstm"), x)  # on the fused kernel
    monkeypatch.setenv("RECNORM_KERNEL", "reference")
    assert not served(_layer("lstm"), x)
    monkeypatch.setenv("RECNORM_KERNEL", "native")
    assert served(_layer("lstm"), x)
    monkeypatch.delenv("RECNORM_KERNEL")
    with recnorm.diagnostics.capture(layer := _layer("lstm")):
        assert not served(layer, x)
    # tracing: the trace must record the registered operator, not the eager call
    lean_calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(_layer("lstm").eval(), (x,), check_trace=False)
    assert lean_calls and not any(lean_calls)
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


def test_bad_input_gets_the_full_paths_error(rule):
    rule(+1.0)
    layer = _layer("lstm")
    with pytest.raises(ValueError, match="input dtype"):
        layer(torch.randn(4, 3, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="input_size"):
        layer(torch.randn(4, 3, 6))
    with pytest.raises(RuntimeError, match="Expected hidden"):
        layer(torch.randn(4, 3, 5), (torch.zeros(1, 2, 7), torch.zeros(1, 2, 7)))


# -- a sequence-wise BN of the input term, folded in eval (issue 17: the wrapper above torch's op) --------


def _calibrated(cell, norm="sequence_batch", **kw):
    """A layer with ``norm`` whose running statistics (batch norms) and affine parameters are not the defaults
    (a few training batches, then random gains and shifts), so that a fold or a kernel that ignored any of
    them would show."""
    layer = _layer(cell, norm=norm, **kw)
    with torch.no_grad():
        for _ in range(3):
            layer.train()(torch.randn(4, 3, 5) * 2 + 1)
        for name, p in layer.named_parameters():
            if name.startswith("norm"):
                p.copy_(torch.randn_like(p))
    return layer.eval()


def _eval_run(layer, x, hx):
    with torch.no_grad():
        out, fin = layer(x, hx)
    return [out, *(fin if isinstance(fin, tuple) else (fin,))]


def _lean_is_full(layer, cell, with_hx, expected, lean_calls, T=4, B=3):
    """An eval call through the full path (a dispatch observer makes the lean path step aside), which must run
    ``expected``, then the same call, which the lean path must serve with the same bits: ``(lean, x, hx)``."""
    x = torch.randn(B, T, 5) if layer.batch_first else torch.randn(T, B, 5)
    hx = None
    if with_hx:
        hx = tuple(torch.randn(s) for s in layer._state_shapes(B))
        hx = hx if cell == "lstm" else hx[0]
    with kernels.recording() as ran:
        full = _eval_run(layer, x, hx)
    assert set(ran) == {expected} and lean_calls[-1] is False
    lean = _eval_run(layer, x, hx)
    assert lean_calls[-1] is True
    _same(lean, full)
    return lean, x, hx


@pytest.mark.parametrize("cell,config", CASES)
@pytest.mark.parametrize("with_hx", [False, True], ids=["zeros", "hx"])
def test_folded_lean_path_is_the_full_path_bit_for_bit(cell, config, with_hx, rule, lean_calls):
    rule(+1.0)
    layer = _calibrated(cell, **config)
    lean, x, hx = _lean_is_full(layer, cell, with_hx, "native", lean_calls)
    # and the same as the reference loop, which normalizes W_ih x with the running statistics step by step
    with torch.no_grad():
        layer.kernel = "reference"
        ref = _eval_run(layer, x, hx)
    for a, b in zip(lean, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_folded_lean_path_follows_every_change_of_what_it_folds(rule, lean_calls):
    """Nothing is cached: a change of the running statistics, the norm's affine parameters or the weights,
    however it is made (in place, through .data), shows in the next call."""
    rule(+1.0)
    layer = _calibrated("lstm")
    x = torch.randn(4, 3, 5)
    before = _eval_run(layer, x, None)[0]
    norm = layer.norm_ih_l0 if hasattr(layer, "norm_ih_l0") else next(m for m in layer.modules() if hasattr(m, "running_var"))
    for change in (lambda: norm.running_var.data.mul_(4.0), lambda: norm.weight.data.add_(0.5),
                   lambda: layer.weight_ih_l0.data.mul_(-1.0), lambda: norm.running_mean.add_(1.0)):
        change()
        after = _eval_run(layer, x, None)[0]
        assert lean_calls[-1] is True and not torch.equal(after, before)
        with kernels.recording():
            _same([after], [_eval_run(layer, x, None)[0]])
        before = after


def _served(lean_calls, call) -> bool:
    """Whether the lean path served ``call()`` (it may not even have been asked)."""
    n = len(lean_calls)
    call()
    return len(lean_calls) > n and lean_calls[-1]


def test_folded_lean_path_steps_aside_where_the_fold_needs_autograd_or_does_not_apply(rule, lean_calls):
    rule(+1.0)
    x = torch.randn(4, 3, 5)
    layer = _calibrated("lstm")
    assert _served(lean_calls, lambda: _eval_run(layer, x, None))
    with torch.enable_grad():  # autograd through the fold: the full path
        assert not _served(lean_calls, lambda: layer(x))
    layer.train()
    with torch.no_grad():  # training: batch statistics
        assert not _served(lean_calls, lambda: layer(x))
    for kw in ({"norm": "sequence_batch", "bidirectional": True}, {"norm": "sequence_batch", "num_layers": 2, "between_layers": "batch"},
               {"norm": "sequence_batch", "zoneout": 0.1}):
        other = _layer("lstm", **kw).eval()
        assert not _served(lean_calls, lambda: _eval_run(other, x, None)), kw
    rule(-1.0)  # the fused kernel first: the lean path runs it, which folds the norm itself, as the full path does
    layer.eval()
    with kernels.recording() as ran:
        full = _eval_run(layer, x, None)
    assert ran == ["fused"]
    lean_calls.clear()
    _same(_eval_run(layer, x, None), full)
    assert lean_calls == [True]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the fused kernel's float32 upcast: the full path
        assert not _served(lean_calls, lambda: _eval_run(layer, x, None))


def test_folded_lean_path_keeps_the_full_paths_checks(rule, lean_calls):
    rule(+1.0)
    layer = _calibrated("lstm")
    x = torch.randn(4, 3, 5)
    norm = next(m for m in layer.modules() if hasattr(m, "num_batches_tracked"))
    norm.num_batches_tracked = norm.num_batches_tracked.float()
    with torch.no_grad(), pytest.raises(RuntimeError, match="must be an integer tensor"):
        layer(x)
    norm.num_batches_tracked = norm.num_batches_tracked.long()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. Expected 5, got 6"):
        layer(torch.randn(4, 3, 6))  # the input's error, from the full path


@pytest.mark.parametrize("cell,config", CASES)
@pytest.mark.parametrize("norm", [None, "sequence_batch"])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lean_path_under_autocast_is_the_full_path_bit_for_bit(cell, config, norm, low, rule, lean_calls):
    """Under CPU autocast without autograd, the lean path rounds each layer's input and state to the 16-bit
    dtype and runs it in float32, as the full path's upcast does: the same outputs and states, in that dtype."""
    rule(+1.0)
    layer = (_calibrated(cell, **config) if norm else _layer(cell, **config)).eval()
    T, B = 4, 3
    x = torch.randn(B, T, 5) if layer.batch_first else torch.randn(T, B, 5)
    hx = tuple(torch.randn(s) for s in layer._state_shapes(B))
    hx = hx if cell == "lstm" else hx[0]
    with torch.autocast("cpu", dtype=low):
        with kernels.recording() as ran:
            full = _eval_run(layer, x, hx)
        assert set(ran) == {"native"} and lean_calls[-1] is False
        lean = _eval_run(layer, x, hx)
    assert lean_calls[-1] is True
    assert all(t.dtype == low for t in lean)
    _same(lean, full)


# -- any norm the fused kernel serves, in eval without autograd (issue 17: the Python around the kernel) ----


NORMED = [pytest.param(cell, norm, config, id=f"{cell}-{norm}-{name}") for cell in ("lstm", "gru", "rnn", "rnn_relu")
          for norm in ("layer", "batch", "shared_batch", "rms")
          for name, config in {"one": {}, "two_layers": {"num_layers": 2}, "batch_first": {"batch_first": True}}.items()]


NORMED += [pytest.param(cell, norm, config, id=f"{cell}-{name}") for cell, norm, name, config in (
    ("lstm", "layer", "joint+carry", {"norm_kwargs": {"joint": True, "carry_cell": True}}),
    ("lstm", "rms", "joint+carry", {"norm_kwargs": {"joint": True, "carry_cell": True}}),
    ("lstm", "layer", "weight_dropout", {"weight_dropout": 0.25}),
    ("gru", "layer", "one group", {"norm_kwargs": {"gate_groups": "one"}}),
    ("rnn", "layer", "joint", {"norm_kwargs": {"joint": True}}),
)]


@pytest.mark.parametrize("cell,norm,config", NORMED)
@pytest.mark.parametrize("with_hx", [False, True], ids=["zeros", "hx"])
@pytest.mark.parametrize("c0", [+1.0, -1.0], ids=["rule_native", "rule_fused"])
def test_normalized_eval_lean_path_is_the_full_path_bit_for_bit(cell, norm, config, with_hx, c0, rule, lean_calls):
    """Norms that torch's op does not serve run on the fused kernel whatever the rule says; the lean path
    runs it as the full path does."""
    rule(c0)
    _lean_is_full(_calibrated(cell, norm, **config), cell, with_hx, "fused", lean_calls)


def test_normalized_lean_path_steps_aside_where_it_must(rule, lean_calls):
    """Training or autograd (batch statistics, the graph), another implementation forced, the fused kernel
    declining (a projection), a second direction: the full path."""
    rule(-1.0)
    x = torch.randn(4, 3, 5)
    layer = _calibrated("lstm", "batch")
    assert _served(lean_calls, lambda: _eval_run(layer, x, None))
    with torch.enable_grad():
        assert not _served(lean_calls, lambda: layer(x))
    with torch.no_grad():
        layer.train()
        assert not _served(lean_calls, lambda: layer(x))  # batch statistics, recorded into the running averages
        layer.eval()
    layer.kernel = "reference"
    assert not _served(lean_calls, lambda: _eval_run(layer, x, None))
    layer.kernel = "native"  # torch's op cannot serve batch norm: the full path's error
    with pytest.raises(ValueError, match="cannot run this layer"):
        _eval_run(layer, x, None)
    assert lean_calls[-1] is False
    proj = _layer("lstm", norm="layer", proj_size=3).eval()
    with kernels.recording() as ran:
        _eval_run(proj, x, None)
    assert ran == ["reference"] and lean_calls[-1] is False
    assert not _served(lean_calls, lambda: _eval_run(_layer("lstm", norm="layer", bidirectional=True).eval(), x, None))
