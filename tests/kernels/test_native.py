"""The native fast path (torch's fused RNN op) agrees with the reference loop, norm=None and
sequence-wise BN folded into the input weights included."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import recnorm
from recnorm.kernels import native

DT = torch.float64
LAYERS = {"lstm": recnorm.LSTM, "gru": recnorm.GRU, "rnn": recnorm.RNN}


def _pair(cell, norm, **kw):
    torch.manual_seed(0)
    ref = LAYERS[cell](3, 5, dtype=DT, norm=norm, kernel="reference", **kw)
    fast = LAYERS[cell](3, 5, dtype=DT, norm=norm, kernel="native", **kw)
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.startswith("norm_"):
                p.uniform_(0.5, 1.5)
                getattr(fast, name.split(".")[0]).get_parameter(name.split(".")[1]).copy_(p)
    return ref, fast


@pytest.mark.parametrize(
    "cell,norm,packed,bidir,bias,mode",
    list(itertools.product(LAYERS, [None, "sequence_batch"], [False, True], [False, True], [True, False], ["train", "eval"])),
)
def test_native_matches_reference(cell, norm, packed, bidir, bias, mode):
    ref, fast = _pair(cell, norm, num_layers=2, bidirectional=bidir, bias=bias)
    if mode == "eval":
        for m in (ref, fast):
            m(torch.randn(6, 7, 3, dtype=DT, generator=torch.Generator().manual_seed(9)))
            m.eval()
    x = torch.randn(6, 4, 3, dtype=DT)
    lengths = torch.tensor([6, 2, 5, 1])
    results = []
    for m in (ref, fast):
        xl = x.clone().requires_grad_(True)
        inp = pack_padded_sequence(xl, lengths, enforce_sorted=False) if packed else xl
        out, state = m(inp)
        out = pad_packed_sequence(out)[0] if packed else out
        hn = state[0] if cell == "lstm" else state
        loss = (out * torch.linspace(-1, 2, out.numel(), dtype=DT).view_as(out)).sum() + hn.square().sum()
        grads = torch.autograd.grad(loss, [xl] + list(m.parameters()))
        stats = [b.clone() for n, b in m.named_buffers()]
        results.append((out, hn, grads, stats))
    (o1, h1, g1, s1), (o2, h2, g2, s2) = results
    torch.testing.assert_close(o2, o1, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(h2, h1, rtol=1e-9, atol=1e-10)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    for a, b in zip(s2, s1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_native_serves_only_where_the_math_is_torchs():
    x = torch.randn(4, 3)
    for norm, expect in [(None, True), ("sequence_batch", True), ("layer", False), ("batch", False), ("shared_batch", False)]:
        m = recnorm.LSTM(3, 4, norm=norm)
        assert (native.supports(m.direction_work(0, 0), x, None, "eager") is None) is expect, norm
    m = recnorm.LSTM(3, 4)
    assert "diagnostics" in native.supports(m.direction_work(0, 0, on_output=lambda t, h: None), x, None, "eager")
    with pytest.raises(ValueError, match="kernel='native' cannot run this layer: it serves norm=None and sequence-wise"):
        recnorm.LSTM(3, 4, norm="layer", kernel="native")(torch.randn(2, 2, 3))


@pytest.mark.parametrize("cell,packed", list(itertools.product(LAYERS, [False, True])))
def test_native_operator_opcheck(cell, packed):
    """The registered operator recnorm::native_rnn: schema, fake kernel and recompute backward."""
    torch.manual_seed(0)
    m = LAYERS[cell](3, 5, dtype=DT)
    w = m.direction_work(0, 0)
    bs = torch.tensor([3, 2, 2, 1]) if packed else None
    shape = (8, 3) if packed else (4, 3, 3)  # packed rows (N, F), or a full batch (T, B, F)
    x = torch.randn(*shape, dtype=DT, requires_grad=True)
    hx = [torch.randn(3, 5, dtype=DT, requires_grad=True) for _ in range(m.cell.state_size)]
    weights = [w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh]
    # Its backward recomputes the forward under autograd, which AOTDispatch cannot trace: recnorm never
    # differentiates through it under torch.compile (the fused kernels serve that), so that check is left out.
    torch.library.opcheck(torch.ops.recnorm.native_rnn, (x, bs, hx, weights, m.cell.kind(), True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out = torch.ops.recnorm.native_rnn(x, bs, hx, weights, m.cell.kind(), True)
    ref = native._aten(m.cell.kind(), x, bs, hx, weights, True, True)
    leaves = [x, *hx, *weights]
    g_op = torch.autograd.grad(out[0].sum() + out[1].square().sum(), leaves)
    g_ref = torch.autograd.grad(ref[0].sum() + ref[1][0].square().sum(), leaves)
    for a, b in zip(g_op, g_ref):
        torch.testing.assert_close(a, b)


def test_sequence_batch_fold_stays_finite_near_the_float_range():
    """|x| ~ 1e19 in float32: the covariance of x overflows unless x is scaled first (the reference loop,
    which normalizes W x directly, stays finite)."""
    torch.manual_seed(0)
    ref = recnorm.LSTM(3, 4, norm="sequence_batch", kernel="reference")
    fast = recnorm.LSTM(3, 4, norm="sequence_batch", kernel="native")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 6, 3) * 1e19
    a, b = ref(x)[0], fast(x)[0]
    assert torch.isfinite(b).all()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_env_var_forces_reference(monkeypatch):
    calls = []
    import recnorm.kernels as k

    monkeypatch.setenv("RECNORM_KERNEL", "reference")
    monkeypatch.setattr(k.native, "_op", lambda kind: calls.append(kind))  # torch's op, on every path to it
    recnorm.LSTM(3, 4)(torch.randn(2, 2, 3))
    assert calls == []
    monkeypatch.setenv("RECNORM_KERNEL", "auto")
    with pytest.raises(TypeError):  # the stub returns None: proves the native path was taken
        recnorm.LSTM(3, 4)(torch.randn(2, 2, 3))
    assert calls == ["lstm"]
