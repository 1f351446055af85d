"""The fused C++ CPU path agrees with the reference loop: outputs, final states, gradients of the
input and every parameter, and running statistics, in train and eval, packed and not, both directions."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import recnorm
from recnorm.kernels import fused_cpu

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="the fused C++ extension could not be built here")

DT = torch.float64


def _pair(norm, **kw):
    torch.manual_seed(0)
    ref = recnorm.LSTM(3, 5, 2, dtype=DT, norm=norm, kernel="reference", **kw)
    fast = recnorm.LSTM(3, 5, 2, dtype=DT, norm=norm, kernel="fused", **kw)
    with torch.no_grad():  # non-trivial norm parameters
        for name, p in ref.named_parameters():
            if name.startswith("norm_"):
                p.uniform_(0.3, 1.2)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _step(m, x, lengths, packed):
    xl = x.clone().requires_grad_(True)
    inp = pack_padded_sequence(xl, lengths, enforce_sorted=False) if packed else xl
    out, (h, c) = m(inp)
    out = pad_packed_sequence(out)[0] if packed else out
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=DT).view_as(out)).sum() + (h * c).sum()
    grads = torch.autograd.grad(loss, [xl] + list(m.parameters()))
    return [out, h, c, *grads, *[b.clone() for b in m.buffers()]]


@pytest.mark.parametrize(
    "norm,bidir,packed,mode",
    list(itertools.product([None, "layer", "batch", "shared_batch"], [False, True], [False, True], ["train", "eval"])),
)
def test_fused_matches_reference(norm, bidir, packed, mode):
    ref, fast = _pair(norm, bidirectional=bidir)
    if mode == "eval":
        warm = torch.randn(6, 7, 3, dtype=DT, generator=torch.Generator().manual_seed(5))
        for m in (ref, fast):
            m(warm)
            m.eval()
    x = torch.randn(6, 4, 3, dtype=DT)
    lengths = torch.tensor([6, 2, 5, 1])  # steps 2..4 and 5: few valid sequences, step 5 a single one
    a, b = _step(ref, x, lengths, packed), _step(fast, x, lengths, packed)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_fused_constant_leading_steps_match_and_stay_finite(norm):
    torch.manual_seed(0)
    ref = recnorm.LSTM(8, 6, norm=norm, kernel="reference")
    recnorm.init.initialize(ref, "orthogonal")  # zero biases: h and c stay exactly 0 on blank input
    fast = recnorm.LSTM(8, 6, norm=norm, kernel="fused")
    fast.load_state_dict(ref.state_dict())
    x = torch.cat([torch.zeros(40, 5, 8), torch.rand(6, 5, 8)])
    grads = []
    for m in (ref, fast):
        out, _ = m(x)
        grads.append(torch.autograd.grad(out[-1].sum(), list(m.parameters())))
    for u, v in zip(*grads):
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-5)


def test_gradcheck_fused():
    torch.manual_seed(0)
    m = recnorm.LSTM(2, 3, dtype=DT, norm="batch", norm_kwargs={"momentum": 0.0}, kernel="fused")
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    x = torch.randn(4, 3, 2, dtype=DT, requires_grad=True)

    def f(x, *ps):
        out, (h, c) = torch.func.functional_call(m, dict(zip(names, ps)), (x,))
        return out, c

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_auto_uses_fused_and_env_var_forces_reference(monkeypatch):
    m = recnorm.LSTM(3, 4, norm="layer")
    p = m._direction_params(0, 0)
    assert fused_cpu.supports(m.cell, p, None, torch.randn(2, 3))
    assert not fused_cpu.supports(m.cell, p, lambda t, h: None, torch.randn(2, 3))  # diagnostics
    calls = []
    monkeypatch.setattr(fused_cpu, "run_direction", lambda *a, **k: calls.append(1))
    monkeypatch.setenv("RECNORM_KERNEL", "reference")
    m(torch.randn(2, 2, 3))
    assert calls == []
    monkeypatch.setenv("RECNORM_KERNEL", "auto")
    with pytest.raises(TypeError):  # the stub returns None: proves the fused path was taken
        m(torch.randn(2, 2, 3))
    assert calls == [1]
