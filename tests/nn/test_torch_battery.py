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
