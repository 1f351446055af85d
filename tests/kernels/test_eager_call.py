"""The fused operators' eager call (recnorm.kernels.autodiff.OperatorCall): in plain eager execution a layer runs the
operator's CPU kernel itself, through an autograd.Function with the operator's own setup_context and backward, instead
of going through the dispatcher's Python wrapping of a custom operator. It must give exactly what the operator gives
(outputs, final states, every gradient, the running statistics, bit for bit) for every kernel cell x norm, in training
(packed and padded input, zoneout) and eval, and step aside wherever the dispatcher does more than call the kernel: a
dispatch or torch-function mode (fake tensors, export's tracing, ``with torch.device``), the profiler, a tensor
subclass. torch.compile, torch.jit.trace, torch.export and ONNX on every cell x norm are tests/tools/test_tools.py's;
double backward and torch.func are tests/kernels/test_autodiff.py's."""

import copy
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from recnorm.kernels import autodiff
from registry_cases import KERNEL_CELL_IDS, NORM_IDS, make, randomize

LENGTHS = torch.tensor([5, 2, 4, 1])


def _layer(cell, norm, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    m = make(cell, 3, 4, num_layers=2, norm=norm, dtype=dtype, kernel="fused", **kw)
    randomize(m)
    return m


def _graph_names(t):
    """Names of the autograd nodes behind ``t``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        todo += [g for g, _ in f.next_functions]
    return names


def _run(m, x, packed: bool, train: bool):
    """Outputs, final states, gradients of the input and every parameter, and the buffers after one call."""
    m.train(train)
    x = x.clone().requires_grad_(train)
    inp = pack_padded_sequence(x, LENGTHS, enforce_sorted=False) if packed else x
    with torch.set_grad_enabled(train):
        out, state = m(inp)
    out = out.data if packed else out
    state = state if isinstance(state, tuple) else (state,)
    got = [out, *state]
    names = _graph_names(out) if train else set()
    if train:
        torch.manual_seed(5)
        loss = (out * torch.randn_like(out)).sum() + sum((s * s).sum() for s in state)
        loss.backward()
        got += [x.grad] + [p.grad for p in m.parameters()]
    return got + [b.clone() for b in m.buffers()], names


def _eager_names(cell):
    return {"FusedLSTMEagerBackward"} if cell == "lstm" else {"FusedGRURNNEagerBackward"}


@pytest.mark.parametrize("cell,norm", list(itertools.product(KERNEL_CELL_IDS, NORM_IDS)))
def test_same_bits_as_the_operator(cell, norm, monkeypatch):
    """The eager call against the operator (the fast path turned off), from the same weights and buffers."""
    eager = _layer(cell, norm, zoneout=0.25 if norm == "layer" else 0.0)
    dispatched = copy.deepcopy(eager)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    for packed, train in [(False, True), (True, True), (False, False)]:
        torch.manual_seed(3)  # zoneout draws its masks from torch's RNG
        a, names_a = _run(eager, x, packed, train)
        with monkeypatch.context() as mp:
            mp.setattr(autodiff, "plain_eager", lambda args: False)
            torch.manual_seed(3)
            b, names_b = _run(dispatched, x, packed, train)
        assert len(a) == len(b)
        for i, (u, v) in enumerate(zip(a, b)):
            assert (u is None) == (v is None), i
            if u is not None:
                assert torch.equal(u, v), (packed, train, i)
        if train:  # the path each took: the eager Function, and the operator's registered autograd
            assert _eager_names(cell) <= names_a and not any(n.startswith("GeneratedBackwardFor_recnorm") for n in names_a)
            assert not names_b & _eager_names(cell) and any(n.startswith("GeneratedBackwardFor_recnorm_fused") for n in names_b)


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


class _Nothing(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cell", KERNEL_CELL_IDS)
def test_a_dispatch_mode_sees_the_operators(cell):
    """Under a dispatch mode the operator and its backward run through the dispatcher, so the mode sees them (as
    fake tensors and export's tracing must); the same call without the mode gives the same results."""
    m = _layer(cell, "batch")
    ref = copy.deepcopy(m)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    kind = "fused_lstm" if cell == "lstm" else "fused_gru_rnn"
    with _Record() as rec:
        got, _ = _run(m, x, False, True)
    assert f"recnorm.{kind}.default" in rec.ops and f"recnorm.{kind}_backward.default" in rec.ops
    want, names = _run(ref, x, False, True)
    assert _eager_names(cell) <= names
    assert all(torch.equal(u, v) for u, v in zip(got, want) if u is not None)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_profiler_and_function_modes_take_the_operator(cell):
    """The profiler's trace names the operators; a torch-function mode (``with torch.device``, say) gets the
    operator's autograd."""
    m = _layer(cell, "layer", dtype=torch.float32)
    x = torch.randn(5, 4, 3)
    kind = "fused_lstm" if cell == "lstm" else "fused_gru_rnn"
    with torch.profiler.profile() as prof:
        _run(m, x, False, True)
    events = {e.name for e in prof.events()}
    assert f"recnorm::{kind}" in events and f"recnorm::{kind}_backward" in events
    for mode in (_Nothing(), torch.device("cpu")):
        with mode:
            _, names = _run(m, x, False, True)
        assert any(n.startswith("GeneratedBackwardFor_recnorm_fused") for n in names) and not names & _eager_names(cell)


class _Sub(torch.Tensor):
    pass


def test_plain_eager_reads_every_tensor():
    """A tensor subclass anywhere in the arguments (also inside a list argument) sends the call to the operator;
    torch's tensors and parameters, lists of them, and non-tensor arguments do not."""
    t = torch.zeros(2)
    assert autodiff.plain_eager([t, torch.nn.Parameter(t.clone()), [t, t], 3, [1, 2], None, 0.5, True])
    assert not autodiff.plain_eager([t.as_subclass(_Sub)])
    assert not autodiff.plain_eager([t, [t, t.as_subclass(_Sub)]])
    with _Nothing():
        assert not autodiff.plain_eager([t])
    with _Record():
        assert not autodiff.plain_eager([t])
    with torch.autograd.profiler.profile():
        assert not autodiff.plain_eager([t])


def _operator_node(out):
    """The autograd node of the fused operator's call behind ``out`` (its context)."""
    todo, seen = [out.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if type(f).__name__.startswith(("FusedLSTMEager", "FusedGRURNNEager")):
            return f
        todo += [g for g, _ in f.next_functions]
    raise AssertionError("no fused operator in the graph")


@pytest.mark.parametrize("cell", KERNEL_CELL_IDS)
def test_population_statistics_are_copied_only_where_a_step_reads_them(cell):
    """A training call keeps, for a recomputing backward, the population statistics as it read them: a copy where a
    step reads them (a step of one valid row, eval mode), the buffers themselves where every step normalizes with
    batch statistics (no copy to pay for). tests/kernels/test_autodiff.py's gradient-penalty step checks both
    against the reference loop after the running statistics have moved."""
    m = _layer(cell, "batch").train()
    rm = m.norm_ih_l1.running_mean  # the last layer's: the first operator call the graph meets from the output
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    kept = _operator_node(m(x)[0]).pop[0]
    assert kept[0] is rm  # a full batch: every step has 4 rows
    out = m(pack_padded_sequence(x, LENGTHS, enforce_sorted=False))[0]
    kept = _operator_node(out.data).pop[0]
    assert kept[0] is not rm and kept[0].data_ptr() != rm.data_ptr()  # steps 2..4 have fewer than 2 rows
    m.eval()
    kept = _operator_node(m(x)[0]).pop[0]
    assert kept[0] is not rm and kept[0].data_ptr() != rm.data_ptr()  # eval: population statistics throughout
