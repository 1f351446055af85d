"""torch.nn's documented behaviour, checked side by side against recnorm's layers and cells.

Written from torch.nn's documentation and from running torch.nn itself (not copied from torch's test suite):
every case runs on ``torch.nn.X`` first, and recnorm's answer is compared with torch's own, so the expected
exception type and wording come from the torch installed, not from this file. Covered: argument and input
validation (the same exception type as torch.nn, a message that contains torch's), bool-only flags, forward
and gradients (gradcheck, gradgradcheck), packed input, dropout, save and load, a batch of 0 sequences,
``hidden_size=0`` cells, ``_flat_weights``, and what torch's own utilities that look for ``nn.LSTM`` do with a
recnorm model.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from torch import Tensor

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence, pad_packed_sequence

import recnorm
from registry_cases import NORM_IDS

LAYERS = ("LSTM", "GRU", "RNN")
CELLS = ("LSTMCell", "GRUCell", "RNNCell")


def _cls(lib, kind: str):
    return getattr(nn if lib == "torch" else recnorm, kind)


# ---------------------------------------------------------------------------------------------------
# torch.nn's error cases
# ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One way of calling torch.nn wrongly: constructor arguments, then (if ``call``) a forward call.

    ``wording``: recnorm's message must contain torch's (True), or torch's message is an accident of its
    implementation (a C++ matmul's dtype error, Python's own error for a bad argument), so only the type must
    match (False). ``expect``: torch.nn raises, but by accident, with no check of its own behind it (its LSTM
    skips RNNBase's checks for packed input and then fails in a matrix product or on an index): recnorm
    raises the type that torch's check of the same thing raises for the GRU and RNN."""

    id: str
    kind: str
    args: Tuple = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)
    call: Optional[Callable[[nn.Module], Any]] = None
    wording: bool = True
    expect: Optional[type] = None


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _packed(features: int = 3) -> PackedSequence:
    return pack_sequence([_x(4, features), _x(2, features)])  # batch 2


def _unchecked(lstm: bool, expect: type) -> Dict[str, Any]:
    return {"wording": False, "expect": expect} if lstm else {}


def _layer_cases(kind: str):
    lstm = kind == "LSTM"
    state = (lambda *s: (torch.zeros(*s), torch.zeros(*s))) if lstm else (lambda *s: torch.zeros(*s))
    cases = [
        # constructor: sizes
        Case("hidden_size=0", kind, (10, 0, 1)),
        Case("num_layers=0", kind, (10, 10, 0)),
        Case("num_layers=-1", kind, (10, 10, -1)),
        Case("input_size=0", kind, (0, 5)),
        Case("input_size=-1", kind, (-1, 5)),
        Case("hidden_size=-2", kind, (3, -2)),
        Case("input_size=3.0", kind, (3.0, 5)),
        Case("input_size='10'", kind, ("10", 5)),
        Case("hidden_size=5.0", kind, (3, 5.0)),
        Case("hidden_size='5'", kind, (3, "5")),
        Case("num_layers=1.5", kind, (3, 5, 1.5), wording=False),
        Case("num_layers='2'", kind, (3, 5, "2"), wording=False),
        # constructor: flags
        Case("bias=0", kind, (3, 5), {"bias": 0}),
        Case("bias=1", kind, (3, 5), {"bias": 1}),
        Case("bias='True'", kind, (3, 5), {"bias": "True"}),
        Case("bias='False'", kind, (3, 5), {"bias": "False"}),
        Case("batch_first=0", kind, (3, 5), {"batch_first": 0}),
        Case("batch_first=1", kind, (3, 5), {"batch_first": 1}),
        Case("batch_first='False'", kind, (3, 5), {"batch_first": "False"}),
        # constructor: dropout
        Case("dropout=-0.1", kind, (3, 5, 2), {"dropout": -0.1}),
        Case("dropout=1.1", kind, (3, 5, 2), {"dropout": 1.1}),
        Case("dropout='0.5'", kind, (3, 5, 2), {"dropout": "0.5"}),
        Case("dropout=True", kind, (3, 5, 2), {"dropout": True}),
        Case("unknown keyword", kind, (3, 5), {"foo": 1}, wording=False),
        # forward: input
        Case("input 4-D", kind, (3, 4), call=lambda m: m(_x(2, 2, 2, 3))),
        Case("input 1-D", kind, (3, 4), call=lambda m: m(_x(3))),
        Case("input float64", kind, (3, 4), call=lambda m: m(_x(2, 4, 3, dtype=torch.float64))),
        Case("input int64", kind, (3, 4), call=lambda m: m(torch.ones(2, 4, 3, dtype=torch.long))),
        Case("input_size mismatch", kind, (3, 4), call=lambda m: m(_x(2, 4, 5))),
        Case("input_size mismatch, unbatched", kind, (3, 4), call=lambda m: m(_x(2, 5))),
        Case("input_size mismatch, batch_first", kind, (3, 4), {"batch_first": True}, call=lambda m: m(_x(4, 2, 5))),
        Case("zero-length sequence", kind, (3, 4), call=lambda m: m(_x(0, 2, 3))),
        Case("zero-length sequence, unbatched", kind, (3, 4), call=lambda m: m(_x(0, 3))),
        Case("zero-length sequence, batch_first", kind, (3, 4), {"batch_first": True}, call=lambda m: m(_x(2, 0, 3))),
        # forward: initial state
        Case("batched input, 2-D hx", kind, (3, 4), call=lambda m: m(_x(5, 2, 3), state(2, 4))),
        Case("unbatched input, 3-D hx", kind, (3, 4), call=lambda m: m(_x(5, 3), state(1, 1, 4))),
        Case("hx for 1 layer of 2", kind, (3, 4, 2), call=lambda m: m(_x(5, 2, 3), state(1, 2, 4))),
        Case("hx for 1 direction of 2", kind, (3, 4), {"bidirectional": True}, call=lambda m: m(_x(5, 2, 3), state(1, 2, 4))),
        Case("hx batch mismatch", kind, (3, 4), call=lambda m: m(_x(5, 2, 3), state(1, 3, 4))),
        Case("hx hidden mismatch", kind, (3, 4), call=lambda m: m(_x(5, 2, 3), state(1, 2, 5))),
        Case("hx batch mismatch, batch_first", kind, (3, 4), {"batch_first": True}, call=lambda m: m(_x(2, 5, 3), state(1, 5, 4))),
        Case("unbatched hx layers mismatch", kind, (3, 4), call=lambda m: m(_x(5, 3), state(2, 4))),
        # forward: packed input (torch.nn.LSTM checks none of these itself: see Case.expect)
        Case("packed, hx batch mismatch", kind, (3, 4), call=lambda m: m(_packed(), state(1, 3, 4)), **_unchecked(lstm, RuntimeError)),
        Case("packed, 2-D hx", kind, (3, 4), call=lambda m: m(_packed(), state(2, 4)), **_unchecked(lstm, RuntimeError)),
        Case("packed, 3-D data", kind, (3, 4), call=lambda m: m(PackedSequence(_x(6, 1, 3), _packed().batch_sizes)), **_unchecked(lstm, RuntimeError)),
        Case("packed, input_size mismatch", kind, (5, 4), call=lambda m: m(_packed(3)), **_unchecked(lstm, RuntimeError)),
        Case(
            "packed, float64 data", kind, (3, 4), call=lambda m: m(PackedSequence(_x(6, 3, dtype=torch.float64), _packed().batch_sizes)),
            **_unchecked(lstm, ValueError),
        ),
    ]
    if lstm:
        cases += [
            Case("c_0 batch mismatch", kind, (3, 4), call=lambda m: m(_x(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 3, 4)))),
            Case("c_0 hidden mismatch", kind, (3, 4), call=lambda m: m(_x(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 5)))),
            Case("c_0 2-D with batched input", kind, (3, 4), call=lambda m: m(_x(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 4)))),
            Case("proj_size=-1", kind, (3, 4), {"proj_size": -1}),
            Case("proj_size=hidden_size", kind, (3, 4), {"proj_size": 4}),
            Case("proj_size>hidden_size", kind, (3, 4), {"proj_size": 6}),
            Case("proj_size=1.5", kind, (3, 4), {"proj_size": 1.5}, wording=False),
            Case("proj_size='1'", kind, (3, 4), {"proj_size": "1"}, wording=False),
            Case("proj: h_0 of hidden_size", kind, (3, 4), {"proj_size": 2}, call=lambda m: m(_x(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))),
            Case("proj: c_0 of proj_size", kind, (3, 4), {"proj_size": 2}, call=lambda m: m(_x(5, 2, 3), (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)))),
            Case("three states", kind, (3, 4), call=lambda m: m(_x(5, 2, 3), (torch.zeros(1, 2, 4),) * 3), wording=False),
            Case("h_0 float64", kind, (3, 4), call=lambda m: m(_x(5, 2, 3), (torch.zeros(1, 2, 4, dtype=torch.float64),) * 2), wording=False),
        ]
    else:
        cases += [
            Case("proj_size=2", kind, (3, 5), {"proj_size": 2}),
            Case("proj_size=0", kind, (3, 5), {"proj_size": 0}),
            Case("h_0 float64", kind, (3, 4), call=lambda m: m(_x(5, 2, 3), torch.zeros(1, 2, 4, dtype=torch.float64)), wording=False),
        ]
    if kind == "RNN":
        cases += [
            Case("nonlinearity='sigmoid'", kind, (3, 5), {"nonlinearity": "sigmoid"}),
            Case("positional nonlinearity='sigmoid'", kind, (3, 5, 1, "sigmoid")),
        ]
    return cases


def _cell_cases(kind: str):
    lstm = kind == "LSTMCell"
    two = lambda h, c=None: (h, h if c is None else c)  # noqa: E731
    state = (lambda *s: two(torch.zeros(*s))) if lstm else (lambda *s: torch.zeros(*s))
    cases = [
        Case("input_size mismatch", kind, (10, 20), call=lambda m: m(_x(3, 11), state(3, 20))),
        Case("hidden_size mismatch", kind, (10, 20), call=lambda m: m(_x(3, 10), state(3, 21))),
        Case("batch mismatch", kind, (10, 20), call=lambda m: m(_x(3, 10), state(5, 20))),
        Case("no broadcasting of hx", kind, (10, 20), call=lambda m: m(_x(3, 10), state(1, 20))),
        Case("no broadcasting of input", kind, (10, 20), call=lambda m: m(_x(1, 10), state(3, 20))),
        Case("hx 4-D", kind, (10, 20), call=lambda m: m(_x(3, 10), state(3, 1, 1, 20))),
        Case("input 3-D", kind, (10, 20), call=lambda m: m(_x(3, 3, 10))),
        Case("input 0-D", kind, (1, 20), call=lambda m: m(torch.tensor(1.0))),
        Case("unbatched input, batched hx", kind, (10, 20), call=lambda m: m(_x(10), state(3, 20)), wording=False),
        Case("batched input, unbatched hx", kind, (10, 20), call=lambda m: m(_x(3, 10), state(20)), wording=False),
        Case("input float64", kind, (10, 20), call=lambda m: m(_x(3, 10, dtype=torch.float64)), wording=False),
        Case("input int64", kind, (10, 20), call=lambda m: m(torch.ones(3, 10, dtype=torch.long)), wording=False),
        Case("hx float64", kind, (10, 20), call=lambda m: m(_x(3, 10), state(3, 20, dtype=torch.float64)), wording=False),
        Case("hidden_size=-1", kind, (10, -1), wording=False),
        Case("input_size=-1", kind, (-1, 10), wording=False),
        Case("hidden_size=2.0", kind, (10, 2.0), wording=False),
        Case("hidden_size='2'", kind, (10, "2"), wording=False),
    ]
    if lstm:
        cases += [
            Case("c hidden_size mismatch", kind, (10, 20), call=lambda m: m(_x(3, 10), (torch.zeros(3, 20), torch.zeros(3, 21)))),
            Case("c batch mismatch", kind, (10, 20), call=lambda m: m(_x(3, 10), (torch.zeros(3, 20), torch.zeros(5, 20)))),
            Case("c 3-D", kind, (10, 20), call=lambda m: m(_x(3, 10), (torch.zeros(3, 20), torch.zeros(1, 3, 20)))),
            Case("one state", kind, (10, 20), call=lambda m: m(_x(3, 10), (torch.zeros(3, 20),)), wording=False),
            Case("hx a Tensor", kind, (10, 20), call=lambda m: m(_x(3, 10), torch.zeros(3, 20)), wording=False),
        ]
    return cases


ERROR_CASES = [c for k in LAYERS for c in _layer_cases(k)] + [c for k in CELLS for c in _cell_cases(k)]


def _outcome(lib: str, case: Case, **extra) -> Optional[BaseException]:
    """The exception that building the module and calling it raises (None: it did not raise)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            m = _cls(lib, case.kind)(*case.args, **case.kwargs, **extra)
            if case.call is not None:
                case.call(m)
        except Exception as e:  # noqa: BLE001 - any exception is the outcome under test
            return e
    return None


def test_every_case_is_an_error_of_torch_nn():
    """The table is torch's: every case raises on torch.nn (a new torch that accepts one drops it here)."""
    for case in ERROR_CASES:
        assert _outcome("torch", case) is not None, f"torch.nn.{case.kind}: {case.id} no longer raises"


@pytest.mark.parametrize("norm", NORM_IDS, ids=lambda n: f"norm={n}")
@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: f"{c.kind}-{c.id}")
def test_error_case_raises_torch_type_and_wording(case, norm):
    theirs = _outcome("torch", case)
    ours = _outcome("recnorm", case, **({"norm": norm} if norm is not None else {}))
    assert ours is not None, f"recnorm.{case.kind}: {case.id} raised nothing; torch.nn raises {type(theirs).__name__}: {theirs}"
    want = case.expect or type(theirs)
    assert type(ours) is want, f"recnorm raised {type(ours).__name__}: {ours}; expected {want.__name__} (torch.nn: {type(theirs).__name__}: {theirs})"
    if case.wording:
        assert str(theirs) in str(ours), f"recnorm's message {str(ours)!r} lacks torch.nn's {str(theirs)!r}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
@pytest.mark.parametrize("kind", LAYERS + CELLS)
def test_device_mismatch_raises_torch_type(kind):
    for where in ("input", "hx"):
        outcomes = []
        for lib in ("torch", "recnorm"):
            m = _cls(lib, kind)(3, 4)
            x = torch.randn(2, 5, 3) if kind in LAYERS else torch.randn(2, 3)
            shape = (1, 5, 4) if kind in LAYERS else (2, 4)
            h = torch.zeros(shape)
            if where == "input":
                x = x.cuda()
            else:
                m, x = m.cuda(), x.cuda()
            hx = (h, h) if kind.startswith("LSTM") else h
            with pytest.raises(RuntimeError) as err:
                m(x, hx)
            outcomes.append(err.type)
        assert outcomes[0] is outcomes[1]


def test_dropout_with_one_layer_warns_as_torch_does():
    for kind in LAYERS:
        with pytest.warns(UserWarning) as theirs:
            nn.__dict__[kind](3, 4, dropout=0.5)
        with pytest.warns(UserWarning) as ours:
            getattr(recnorm, kind)(3, 4, dropout=0.5)
        assert str(theirs[0].message) in str(ours[0].message)


# ---------------------------------------------------------------------------------------------------
# flags: bool where torch.nn wants bool; torch's truth value elsewhere, but never a string that says false
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LAYERS)
def test_bidirectional_reads_as_torch_reads_it_but_refuses_a_false_string(kind):
    for value in (True, 1, False, 0):  # torch.nn accepts any value and reads its truth
        ours, theirs = getattr(recnorm, kind)(3, 4, bidirectional=value), getattr(nn, kind)(3, 4, bidirectional=value)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert ours.bidirectional is bool(value)
    for value in ("False", "false", "0", "no", b"False"):
        with pytest.raises(TypeError, match=r"bidirectional should be of type bool, got: str \(.* would be read as True"):
            getattr(recnorm, kind)(3, 4, bidirectional=value)


@pytest.mark.parametrize("kind", CELLS)
def test_cell_bias_reads_as_torch_reads_it_but_refuses_a_false_string(kind):
    for value in (True, 1, "True", False, 0, None):  # torch.nn's cells read the truth of bias
        ours, theirs = getattr(recnorm, kind)(3, 4, value), getattr(nn, kind)(3, 4, value)
        assert list(ours.state_dict()) == list(theirs.state_dict()), value
    with pytest.raises(TypeError, match=r"bias should be of type bool, got: str \('False' would be read as True"):
        getattr(recnorm, kind)(3, 4, bias="False")
    assert nn.__dict__[kind](3, 4, bias="False").bias_ih is not None  # what refusing it prevents


# ---------------------------------------------------------------------------------------------------
# forward and gradients
# ---------------------------------------------------------------------------------------------------


def _pair(kind: str, *args, **kwargs):
    """torch.nn's module and recnorm's (norm=None) with torch's weights."""
    theirs = getattr(nn, kind)(*args, **kwargs).double()
    ours = getattr(recnorm, kind)(*args, **kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _tensors(result) -> list:
    """Every tensor in a module's result (PackedSequence data included), in order."""
    if isinstance(result, PackedSequence):
        return [result.data]
    if isinstance(result, Tensor):
        return [result]
    return [t for r in result for t in _tensors(r)]


def _compare(ours, theirs, inputs: Callable[[], Tuple]):
    """Same results and gradients (of the inputs and the parameters) for the same inputs."""
    got = []
    for m in (theirs, ours):
        args = inputs()
        leaves = [t for t in _tensors(args) if t.requires_grad]
        res = _tensors(m(*args))
        loss = sum((r * torch.linspace(-1, 1, r.numel(), dtype=r.dtype).view_as(r)).sum() for r in res)
        grads = torch.autograd.grad(loss, leaves + list(m.parameters()))
        got.append(res + list(grads))
    assert len(got[0]) == len(got[1])
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("bias,batch_first,bidirectional", [(True, False, False), (False, True, True), (True, True, False)])
def test_layer_forward_and_gradients_are_torch_nn(kind, bias, batch_first, bidirectional):
    ours, theirs = _pair(kind, 3, 4, 2, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)  # (T, B, F)
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    h = torch.randn(2 * D, 2, 4, generator=g, dtype=torch.float64)
    hx = (lambda: (h.clone().requires_grad_(), h.clone().requires_grad_())) if kind == "LSTM" else (lambda: h.clone().requires_grad_())
    _compare(ours, theirs, lambda: (x.clone().requires_grad_(),))
    _compare(ours, theirs, lambda: (x.clone().requires_grad_(), hx()))
    _compare(ours, theirs, lambda: ((x[0] if batch_first else x[:, 0]).clone().requires_grad_(),))  # unbatched (T, F)
    lengths = torch.tensor([5, 3])
    _compare(ours, theirs, lambda: (pack_padded_sequence(x.clone().requires_grad_(), lengths, batch_first=batch_first, enforce_sorted=False),))


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("bias", [True, False])
def test_cell_forward_and_gradients_are_torch_nn(kind, bias):
    ours, theirs = _pair(kind, 3, 4, bias)
    x = torch.randn(2, 3, dtype=torch.float64)
    h = torch.randn(2, 4, dtype=torch.float64)
    hx = (lambda: (h.clone().requires_grad_(), h.clone().requires_grad_())) if kind == "LSTMCell" else (lambda: h.clone().requires_grad_())
    _compare(ours, theirs, lambda: (x.clone().requires_grad_(),))
    _compare(ours, theirs, lambda: (x.clone().requires_grad_(), hx()))
    _compare(ours, theirs, lambda: (x[0].clone().requires_grad_(),))  # unbatched


def _build(kind: str, *args, norm=None, **kwargs):
    return getattr(recnorm, kind)(*args, **kwargs, **({"norm": norm} if norm is not None else {}))


def _gradcheck_inputs(kind: str, gen: torch.Generator):
    if kind in CELLS:
        x = torch.randn(3, 2, dtype=torch.float64, generator=gen, requires_grad=True)
        h = torch.randn(3, 2, dtype=torch.float64, generator=gen, requires_grad=True)
        hx = (h, h.detach().clone().requires_grad_()) if kind == "LSTMCell" else h
        return x, hx, {"step": 0}
    x = torch.randn(3, 2, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    h = torch.randn(4, 2, 2, dtype=torch.float64, generator=gen, requires_grad=True)  # 2 layers x 2 directions
    hx = (h, h.detach().clone().requires_grad_()) if kind == "LSTM" else h
    return x, hx, {}


def _as_function(m, kind: str):
    lstm = kind.startswith("LSTM")

    def f(x, *states):
        hx = tuple(states) if lstm else states[0]
        return tuple(_tensors(m(x, hx, **({"step": 0} if kind in CELLS else {}))))

    return f


@pytest.mark.parametrize("norm", NORM_IDS, ids=lambda n: f"norm={n}")
@pytest.mark.parametrize("kind", LAYERS + CELLS)
def test_gradcheck_and_gradgradcheck(kind, norm):
    """Gradients and second derivatives in float64. Double backward runs on the reference loop where the
    fused kernels differentiate once (the fused layers' double backward is issue 18 item 4)."""
    layer = kind in LAYERS
    kw = {"num_layers": 2, "bidirectional": True} if layer else {}
    kernel = {"kernel": "reference"} if layer and norm is not None else {}
    torch.manual_seed(0)
    m = _build(kind, 2, 2, norm=norm, dtype=torch.float64, **kw)
    x, hx, _ = _gradcheck_inputs(kind, torch.Generator().manual_seed(1))
    states = hx if isinstance(hx, tuple) else (hx,)
    assert torch.autograd.gradcheck(_as_function(m, kind), (x, *states))
    m2 = _build(kind, 2, 2, norm=norm, dtype=torch.float64, **kw, **kernel)
    m2.load_state_dict(m.state_dict())
    assert torch.autograd.gradgradcheck(_as_function(m2, kind), (x, *states))


# ---------------------------------------------------------------------------------------------------
# packed input, dropout, save and load
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORM_IDS, ids=lambda n: f"norm={n}")
@pytest.mark.parametrize("kind", LAYERS)
def test_packed_batch_equals_each_sequence_alone_in_eval(kind, norm):
    """In eval every norm is per sequence, so a packed batch gives each sequence what it gives alone (torch.nn's
    packed semantics: padding is never seen)."""
    torch.manual_seed(0)
    m = _build(kind, 3, 4, 2, bidirectional=True, norm=norm)
    m(torch.randn(6, 5, 3))  # one training call, so batch norms have population statistics
    m.eval()
    seqs = [torch.randn(n, 3) for n in (6, 2, 4)]
    out, state = m(pack_sequence(seqs, enforce_sorted=False))
    padded, lengths = pad_packed_sequence(out)
    finals = state if isinstance(state, tuple) else (state,)
    for b, s in enumerate(seqs):
        alone, alone_state = m(s)
        torch.testing.assert_close(padded[: lengths[b], b], alone, rtol=1e-5, atol=1e-6)
        for f, a in zip(finals, alone_state if isinstance(alone_state, tuple) else (alone_state,)):
            torch.testing.assert_close(f[:, b], a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", LAYERS)
def test_dropout_between_layers_is_torch_nn(kind):
    """Eval ignores dropout (torch.nn's outputs); training with p=1 zeroes every layer's input but the first's, so
    it is deterministic and equals torch.nn's; with 0 < p < 1, two training calls differ."""
    ours, theirs = _pair(kind, 3, 4, 3, dropout=1.0)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for train in (False, True):
        ours.train(train), theirs.train(train)
        for a, b in zip(_tensors(theirs(x)), _tensors(ours(x))):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for norm in NORM_IDS:
        m = _build(kind, 3, 4, 3, dropout=0.5, norm=norm)
        assert not torch.equal(m(x.float())[0], m(x.float())[0])
        m.eval()
        assert torch.equal(m(x.float())[0], m(x.float())[0])


@pytest.mark.parametrize("norm", NORM_IDS, ids=lambda n: f"norm={n}")
@pytest.mark.parametrize("kind", LAYERS + CELLS)
def test_save_and_load(kind, norm):
    """torch.save of the whole module and of its state_dict both give back the same outputs."""
    torch.manual_seed(0)
    m = _build(kind, 3, 4, norm=norm)
    x = torch.randn(5, 2, 3) if kind in LAYERS else torch.randn(2, 3)
    call = (lambda mod: mod(x)) if kind in LAYERS else (lambda mod: mod(x, step=0))
    call(m)  # training: batch norms update their statistics
    m.eval()
    want = _tensors(call(m))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    fresh = _build(kind, 3, 4, norm=norm)
    fresh.load_state_dict(m.state_dict())
    fresh.eval()
    for other in (whole, fresh):
        for a, b in zip(want, _tensors(call(other))):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("norm", NORM_IDS, ids=lambda n: f"norm={n}")
@pytest.mark.parametrize("kind", LAYERS)
def test_to_dtype_round_trip(kind, norm):
    """module.to(dtype) casts floating-point tensors only (num_batches_tracked stays an integer): the layer runs
    in float64 and back in float32, as torch.nn's do."""
    torch.manual_seed(0)
    m = _build(kind, 3, 4, norm=norm)
    x = torch.randn(5, 2, 3)
    m(x)
    m.eval()
    want = m(x)[0]
    m.to(torch.float64)
    assert all(w.dtype == torch.float64 for w in m._flat_weights)
    torch.testing.assert_close(m(x.double())[0].float(), want, rtol=1e-5, atol=1e-6)
    m.to(torch.float32)
    torch.testing.assert_close(m(x)[0], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel", ["reference", "fused", "auto"])
@pytest.mark.parametrize("kind", LAYERS)
def test_a_float_batch_count_is_named_as_the_cause(kind, kernel):
    """A helper that casts every buffer (torch's own test_to does) makes num_batches_tracked a float: every kernel
    names that, instead of a kernel's shape error ("need population statistics of shape (S, G)")."""
    m = _build(kind, 3, 4, norm="batch", kernel=kernel)
    m(torch.randn(5, 2, 3))
    m.norm_hh_l0.num_batches_tracked = m.norm_hh_l0.num_batches_tracked.float()
    for train in (True, False):
        m.train(train)
        with pytest.raises(RuntimeError, match=r"norm_hh_l0.num_batches_tracked has dtype torch.float32, but it counts .* must be an integer"):
            m(torch.randn(5, 2, 3))


# ---------------------------------------------------------------------------------------------------
# a batch of 0 sequences; cells of hidden_size=0
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORM_IDS, ids=lambda n: f"norm={n}")
@pytest.mark.parametrize("kind", LAYERS + CELLS)
def test_a_batch_of_zero_sequences_has_gradients(kind, norm):
    """torch.nn's shapes, a grad_fn on every result, and zero gradients from backward, as torch.nn's."""
    layer = kind in LAYERS
    kw = {"num_layers": 2, "bidirectional": True, "batch_first": True} if layer else {}
    theirs = getattr(nn, kind)(3, 4, **kw)
    ours = _build(kind, 3, 4, norm=norm, **kw)
    x_shape = (0, 5, 3) if layer else (0, 3)
    for give_hx in (False, True):
        results = []
        for m in (theirs, ours):
            x = torch.randn(x_shape, requires_grad=True)
            hx = None
            if give_hx:
                shape = (4, 0, 4) if layer else (0, 4)
                hx = (torch.zeros(shape, requires_grad=True), torch.zeros(shape, requires_grad=True)) if kind.startswith("LSTM") else (
                    torch.zeros(shape, requires_grad=True))
            res = _tensors(m(x, hx) if m is theirs or layer else m(x, hx, step=0))
            assert all(r.grad_fn is not None for r in res), f"{type(m).__module__}.{kind}: a result without grad_fn"
            sum(r.sum() for r in res).backward()
            assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()
            assert all(p.grad is not None and not p.grad.any() for name, p in m.named_parameters() if not name.startswith("norm"))
            m.zero_grad()
            results.append([r.shape for r in res])
        assert results[0] == results[1]


@pytest.mark.parametrize("norm", NORM_IDS, ids=lambda n: f"norm={n}")
@pytest.mark.parametrize("kind", CELLS)
def test_a_cell_of_hidden_size_zero_is_torch_nn(kind, norm):
    theirs = getattr(nn, kind)(3, 0)
    ours = _build(kind, 3, 0, norm=norm)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]  # no norm parameters: nothing to normalize
    for x in (torch.randn(2, 3, requires_grad=True), torch.randn(3, requires_grad=True)):
        a, b = _tensors(theirs(x)), _tensors(ours(x, step=0))
        assert [t.shape for t in a] == [t.shape for t in b]
        sum(t.sum() for t in b).backward()
        assert not x.grad.any()
    assert "3, 0" in repr(ours)


# ---------------------------------------------------------------------------------------------------
# _flat_weights, and torch's utilities
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LAYERS)
def test_flat_weights_follow_the_parameters(kind):
    kw = {"proj_size": 2} if kind == "LSTM" else {}
    ours = recnorm.__dict__[kind](3, 4, 2, bidirectional=True, norm="layer", **kw)
    theirs = getattr(nn, kind)(3, 4, 2, bidirectional=True, **kw)
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert [w.shape for w in ours._flat_weights] == [w.shape for w in theirs._flat_weights]
    assert all(w is getattr(ours, n) for n, w in zip(ours._flat_weights_names, ours._flat_weights))
    ours.double()
    assert all(w.dtype == torch.float64 and w is getattr(ours, n) for n, w in zip(ours._flat_weights_names, ours._flat_weights))
    sd = {k: torch.randn_like(v) if k in ours._flat_weights_names else v for k, v in ours.state_dict().items()}
    ours.load_state_dict(sd)
    for n, w in zip(ours._flat_weights_names, ours._flat_weights):
        torch.testing.assert_close(w, sd[n], rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(ours, "weight_hh_l0")
    i = ours._flat_weights_names.index("weight_hh_l0")
    assert ours._flat_weights[i] is ours.weight_hh_l0 and "weight_hh_l0_g" in dict(ours.named_parameters())


@pytest.mark.parametrize("norm", NORM_IDS, ids=lambda n: f"norm={n}")
@pytest.mark.parametrize("kind", LAYERS)
def test_weight_norm_and_parametrizations_reparametrize_and_keep_the_norm(kind, norm):
    """torch.nn.utils' weight_norm and parametrize act on recnorm's weights as on torch.nn's: the layer computes
    with the reparametrized weight, keeps its norm, and at the start gives the same outputs."""
    from torch.nn.utils import parametrizations, parametrize

    torch.manual_seed(0)
    m = _build(kind, 3, 4, norm=norm).eval()
    x = torch.randn(5, 2, 3)
    want = m(x)[0]
    norms_before = [n for n, _ in m.named_modules() if n.startswith("norm")]
    parametrizations.weight_norm(m, "weight_hh_l0")
    torch.testing.assert_close(m(x)[0], want, rtol=1e-5, atol=1e-6)
    assert [n for n, _ in m.named_modules() if n.startswith("norm") and "." not in n] == norms_before
    m.train()
    m(x)[0].sum().backward()
    assert m.parametrizations.weight_hh_l0.original0.grad is not None

    class Zero(nn.Module):
        def forward(self, w):
            return torch.zeros_like(w)

    m2 = _build(kind, 3, 4, norm=norm).eval()
    parametrize.register_parametrization(m2, "weight_hh_l0", Zero())
    ref = _build(kind, 3, 4, norm=norm).eval()
    sd = {k.replace("parametrizations.weight_hh_l0.original", "weight_hh_l0"): v for k, v in m2.state_dict().items()}
    ref.load_state_dict(sd)
    with torch.no_grad():
        ref.weight_hh_l0.zero_()
    torch.testing.assert_close(m2(x)[0], ref(x)[0], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao.quantization announces its move to torchao
@pytest.mark.parametrize("norm", NORM_IDS, ids=lambda n: f"norm={n}")
def test_quantize_dynamic_leaves_recnorm_layers_correct_or_refuses(norm):
    """torch.ao.quantization.quantize_dynamic swaps modules by exact type (nn.LSTM, nn.GRU, nn.Linear, ...).
    recnorm's layers are not nn.LSTM, so it leaves them in float, norm and outputs unchanged, and quantizes
    what it knows around them; mapped to torch's quantized LSTM by hand, torch refuses (its from_float takes
    nn.LSTM and nn.GRU only). Never a quantized LSTM without the norm."""
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("rnn", recnorm.LSTM(3, 4, norm=norm))
    model.add_module("gru", recnorm.GRU(4, 4, norm=norm))
    model.add_module("head", nn.Linear(4, 2))
    model.eval()
    x = torch.randn(5, 2, 3)

    def run(m):
        h = m.gru(m.rnn(x)[0])[0]
        return m.head(h), h

    want_head, want_h = run(model)
    for spec in ({nn.LSTM, nn.GRU, nn.Linear}, {recnorm.LSTM, recnorm.GRU, nn.Linear}, None):
        q = quantize_dynamic(model, spec)
        assert type(q.rnn) is recnorm.LSTM and type(q.gru) is recnorm.GRU
        assert q.rnn.norm == norm and dict(q.rnn.named_modules()).keys() == dict(model.rnn.named_modules()).keys()
        assert isinstance(q.head, nnqd.Linear)  # what it knows, it quantizes
        head, h = run(q)
        torch.testing.assert_close(h, want_h, rtol=0, atol=0)
        torch.testing.assert_close(head, want_head, rtol=0.05, atol=0.05)
    with pytest.raises(AssertionError, match="only works for nn.LSTM and nn.GRU"):
        quantize_dynamic(model, {recnorm.LSTM: default_dynamic_qconfig}, mapping={recnorm.LSTM: nnqd.LSTM})
    assert not isinstance(model.rnn, nn.LSTM) and not isinstance(model.rnn, nn.RNNBase)
