"""The fused C++ CPU path for GRU and RNN agrees with the reference loop: outputs, final states,
gradients of the input, the initial state and every parameter, and running statistics, in train and
eval, packed and not, both directions; plus gradcheck, float32, blank inputs, no-grad and dispatch."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import recnorm
from recnorm import kernels
from recnorm.kernels import fused_cpu_gru_rnn as fused
from recnorm.kernels import reference
from recnorm.nn.norms import GroupedLayerNorm

pytestmark = pytest.mark.skipif(not fused.available(), reason="the fused C++ extension could not be built here")

DT = torch.float64
CELLS = {
    "gru": lambda *a, **kw: recnorm.GRU(*a, **kw),
    "rnn_tanh": lambda *a, **kw: recnorm.RNN(*a, nonlinearity="tanh", **kw),
    "rnn_relu": lambda *a, **kw: recnorm.RNN(*a, nonlinearity="relu", **kw),
}
NORMS = ["layer", "batch", "shared_batch"]


def _randomize(m):
    """Non-trivial norm gains and biases (the defaults would hide gain and bias-routing errors)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("norm_"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.9 + 0.3)
            elif name.startswith("bias_"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _pair(cell, norm, dtype=DT, **kw):
    torch.manual_seed(0)
    ref = CELLS[cell](3, 5, 2, dtype=dtype, norm=norm, kernel="reference", **kw)
    _randomize(ref)
    fast = CELLS[cell](3, 5, 2, dtype=dtype, norm=norm, kernel="fused", **kw)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _step(m, x, h0, lengths, packed):
    xl = x.clone().requires_grad_(True)
    hl = h0.clone().requires_grad_(True)
    inp = pack_padded_sequence(xl, lengths, enforce_sorted=False) if packed else xl
    out, h = m(inp, hl)
    out = pad_packed_sequence(out)[0] if packed else out
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * w).sum() + (h * h).sum()
    grads = torch.autograd.grad(loss, [xl, hl] + list(m.parameters()))
    return [out, h, *grads, *[b.clone() for b in m.buffers()]]


def _warm_then_eval(models, dtype):
    warm = torch.randn(6, 7, 3, dtype=dtype, generator=torch.Generator().manual_seed(5))
    for m in models:
        m(warm)
        m.eval()


@pytest.mark.parametrize(
    "cell,norm,bidir,packed,mode",
    list(itertools.product(sorted(CELLS), NORMS, [False, True], [False, True], ["train", "eval"])),
)
def test_fused_matches_reference(cell, norm, bidir, packed, mode):
    ref, fast = _pair(cell, norm, bidirectional=bidir)
    if mode == "eval":
        _warm_then_eval((ref, fast), DT)
    x = torch.randn(6, 4, 3, dtype=DT)
    h0 = torch.randn(4 if bidir else 2, 4, 5, dtype=DT)
    lengths = torch.tensor([6, 2, 5, 1])  # steps 2..4 and 5: few valid sequences, step 5 a single one
    a, b = _step(ref, x, h0, lengths, packed), _step(fast, x, h0, lengths, packed)
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cell,norm", list(itertools.product(sorted(CELLS), NORMS)))
def test_fused_unbatched_input_matches_reference(cell, norm):
    """Unbatched (L, F) input: one row per step, so batch norms use population statistics in training."""
    ref, fast = _pair(cell, norm)
    x = torch.randn(5, 3, dtype=DT)
    res = []
    for m in (ref, fast):
        xl = x.clone().requires_grad_(True)
        out, h = m(xl)
        res.append([out, h, *torch.autograd.grad(out.sum() + h.sum(), [xl] + list(m.parameters()))])
    for u, v in zip(*res, strict=True):
        torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_fused_step_offset_cumulative_momentum_and_slot_reuse(cell):
    """A step offset, momentum=None and fewer slots than steps: same outputs and running statistics,
    in training and then in eval."""
    torch.manual_seed(0)
    m = CELLS[cell](3, 4, dtype=DT, norm="batch", norm_kwargs={"max_steps": 4, "momentum": None})
    _randomize(m)
    p = m._direction_params(0, 0)
    bs = [3, 3, 2, 2, 1]  # steps 2..6 with the offset; the last has one valid row (no update)
    x = torch.randn(sum(bs), 3, dtype=DT)
    h0 = (torch.randn(3, 4, dtype=DT),)
    snapshot = {k: v.clone() for k, v in m.state_dict().items()}
    outs = []
    for run in (reference.run_direction, fused.run_direction):
        m.load_state_dict(snapshot)
        m.train()
        for _ in range(2):  # the second run reads and averages what the first one wrote
            out, (h,) = run(m.cell, x, bs, h0, p, None, 2)
        m.eval()  # population statistics; steps 4..6 reuse the last tracked slot, 3
        out_eval, (h_eval,) = run(m.cell, x, bs, h0, p, None, 2)
        outs.append([out, h, out_eval, h_eval] + [b.clone() for b in m.buffers()])
    for u, v in zip(*outs, strict=True):
        torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-10)
    # slot 2 (step 2) and slot 3 (steps 3, 4, 5) per run, twice; step 6 has a single row
    assert m.norm_ih_l0.num_batches_tracked.tolist() == [0, 0, 2, 6]


@pytest.mark.parametrize("cell,norm,onednn", list(itertools.product(sorted(CELLS), NORMS, ["0", "1"])))
def test_fused_float32_close_to_reference(cell, norm, onednn, monkeypatch):
    """float32 (its own exp/tanh), with the per-step GEMMs on MKL ("0") or forced onto oneDNN ("1")."""
    monkeypatch.setenv("RECNORM_FUSED_ONEDNN", onednn)
    torch.manual_seed(0)
    ref = CELLS[cell](6, 20, norm=norm, kernel="reference")
    _randomize(ref)
    fast = CELLS[cell](6, 20, norm=norm, kernel="fused")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(12, 9, 6)
    res = []
    for m in (ref, fast):
        out, h = m(x)
        res.append([out, h, *torch.autograd.grad(out.pow(2).sum() + h.sum(), list(m.parameters()))])
    for u, v in zip(*res, strict=True):
        torch.testing.assert_close(v, u, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("cell,norm", list(itertools.product(sorted(CELLS), ["layer", "batch"])))
def test_fused_constant_leading_steps_match_and_stay_finite(cell, norm):
    torch.manual_seed(0)
    ref = CELLS[cell](8, 6, norm=norm, kernel="reference")
    recnorm.init.initialize(ref, "orthogonal")  # zero biases: h stays exactly 0 on blank input
    fast = CELLS[cell](8, 6, norm=norm, kernel="fused")
    fast.load_state_dict(ref.state_dict())
    x = torch.cat([torch.zeros(40, 5, 8), torch.rand(6, 5, 8)])
    res = []
    for m in (ref, fast):
        out, _ = m(x)
        res.append([out, *torch.autograd.grad(out[-1].sum(), list(m.parameters()))])
    for u, v in zip(*res, strict=True):
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell,norm", list(itertools.product(sorted(CELLS), ["layer", "batch"])))
def test_gradcheck_fused_function(cell, norm):
    """gradcheck of the autograd Function itself, every input including the fused biases and gains."""
    torch.manual_seed(0)
    m = CELLS[cell](2, 3, dtype=DT, norm=norm, norm_kwargs={"momentum": 0.0} if norm == "batch" else None)
    _randomize(m)
    p = m._direction_params(0, 0)
    bs = [3, 3, 2, 1]
    x = torch.randn(sum(bs), 2, dtype=DT)
    cfg, tensors = fused.prepare(m.cell, x, bs, (torch.randn(3, 3, dtype=DT),), p)
    inputs = tuple(None if t is None else t.detach().clone().requires_grad_(True) for t in tensors)

    def f(*ts):
        return fused.FusedGRURNNFunction.apply(cfg, *ts)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_fused_layer():
    torch.manual_seed(0)
    m = recnorm.GRU(2, 3, dtype=DT, norm="batch", norm_kwargs={"momentum": 0.0}, kernel="fused", bidirectional=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    x = torch.randn(4, 3, 2, dtype=DT, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("cell,norm", list(itertools.product(sorted(CELLS), NORMS)))
def test_no_grad_path_matches_and_saves_nothing(cell, norm, monkeypatch):
    ref, fast = _pair(cell, norm)
    x = torch.randn(5, 3, 3, dtype=DT)
    applied = []
    monkeypatch.setattr(fused.FusedGRURNNFunction, "apply", lambda *a: applied.append(1))
    with torch.no_grad():
        a, b = ref(x), fast(x)
    assert applied == []  # the no-grad path never builds the autograd Function
    torch.testing.assert_close(b[0], a[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(b[1], a[1], rtol=1e-9, atol=1e-10)
    for u, v in zip(list(ref.buffers()), list(fast.buffers()), strict=True):
        torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_bias_false_matches_reference(cell):
    ref, fast = _pair(cell, "layer", bias=False)
    x = torch.randn(4, 3, 3, dtype=DT)
    h0 = torch.randn(2, 3, 5, dtype=DT)
    lengths = torch.tensor([4, 4, 4])
    for u, v in zip(_step(ref, x, h0, lengths, False), _step(fast, x, h0, lengths, False), strict=True):
        torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-10)


def test_supports_refusals():
    m = recnorm.GRU(3, 4, norm="layer")
    p = m._direction_params(0, 0)
    x = torch.randn(2, 3)
    assert fused.supports(m.cell, p, None, x)
    assert not fused.supports(m.cell, p, lambda t, h: None, x)  # diagnostics
    assert not fused.supports(m.cell, p, None, x.double())  # dtype mismatch with the parameters
    assert not fused.supports(m.cell, p, None, x.half())
    assert not fused.supports(recnorm.LSTM(3, 4, norm="layer").cell, p, None, x)  # not a GRU/RNN cell
    # layer norm over a single group is not the GRU's (2H, H) grouping
    p_one = m._direction_params(0, 0)
    p_one.norm_hh = GroupedLayerNorm(12)
    assert not fused.supports(m.cell, p_one, None, x)
    # mixed kinds / a missing site
    b = recnorm.GRU(3, 4, norm="batch")._direction_params(0, 0)
    mixed = m._direction_params(0, 0)
    mixed.norm_hh = b.norm_hh
    assert not fused.supports(m.cell, mixed, None, x)
    mixed.norm_hh = None
    assert not fused.supports(m.cell, mixed, None, x)
    # norm=None and sequence_batch stay with the native path
    assert not fused.supports(m.cell, recnorm.GRU(3, 4)._direction_params(0, 0), None, x)
    assert not fused.supports(m.cell, recnorm.GRU(3, 4, norm="sequence_batch")._direction_params(0, 0), None, x)
    # a population-statistics pass in progress, an observer, differing train flags
    r = recnorm.RNN(3, 4, norm="batch")
    rp = r._direction_params(0, 0)
    assert fused.supports(r.cell, rp, None, x)
    rp.norm_ih.begin_population_pass()
    assert not fused.supports(r.cell, rp, None, x)
    rp.norm_ih.end_population_pass()
    rp.norm_hh._observers.append(lambda *a: None)
    assert not fused.supports(r.cell, rp, None, x)
    rp.norm_hh._observers.clear()
    rp.norm_hh.eval()
    assert not fused.supports(r.cell, rp, None, x)
    rp.norm_hh.train()
    assert fused.supports(r.cell, rp, None, x)
    # a subclassed cell may change the math
    sub = type("MyGRU", (type(m.cell),), {})()
    assert not fused.supports(sub, p, None, x)


def test_auto_uses_fused_and_env_var_forces_reference(monkeypatch):
    for m in (recnorm.GRU(3, 4, norm="layer"), recnorm.RNN(3, 4, norm="batch", nonlinearity="relu"), recnorm.RNN(3, 4, norm="shared_batch")):
        calls = []
        monkeypatch.setattr(fused, "run_direction", lambda *a, calls=calls, **k: calls.append(1))
        monkeypatch.setenv("RECNORM_KERNEL", "reference")
        m(torch.randn(2, 2, 3))
        assert calls == []
        monkeypatch.setenv("RECNORM_KERNEL", "auto")
        with pytest.raises(TypeError):  # the stub returns None: proves the fused path was taken
            m(torch.randn(2, 2, 3))
        assert calls == [1]
        monkeypatch.undo()


def test_kernel_fused_refuses_what_it_cannot_serve():
    m = recnorm.GRU(3, 4, norm="layer", kernel="fused")
    with pytest.raises(ValueError, match="kernel='fused'"):
        kernels.run_direction(m.cell, torch.randn(4, 3), [2, 2], (torch.zeros(2, 4),), m._direction_params(0, 0), lambda t, h: None, "fused")
