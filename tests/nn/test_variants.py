"""Issue 8 variants: RMSNorm, the joint gate norm and the carried normalized cell, zoneout, DropConnect.

Each reference below is written from the papers' equations (Ba et al. 2016; Zhang and Sennrich 2019;
Krueger et al. 2017; Merity et al. 2018), independently of recnorm's kernels, and compared with every
kernel that serves the case."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import recnorm
from recnorm import kernels
from registry_cases import randomize

DT = torch.float64
FUSED = ["reference", "fused"] if kernels.extensions_built() else ["reference"]


def _ln(v, eps, center=True):
    """Layer norm (center) or RMSNorm of each row, without affine."""
    if center:
        v = v - v.mean(-1, keepdim=True)
    return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)


def _lstm_reference(m, x, h, c, center, joint, carry, eps):
    """Ba et al.'s LSTM with the options: separate or joint gate norm, c normalized inside tanh or carried."""
    W, U = m.weight_ih_l0, m.weight_hh_l0
    b = m.bias_ih_l0 + m.bias_hh_l0
    outs = []
    for t in range(x.shape[0]):
        if joint:
            gates = _ln(x[t] @ W.t() + h @ U.t(), eps, center) * m.norm_gates_l0.weight + b
        else:
            gates = _ln(x[t] @ W.t(), eps, center) * m.norm_ih_l0.weight + _ln(h @ U.t(), eps, center) * m.norm_hh_l0.weight + b
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        shift = m.norm_c_l0.bias if center else 0.0
        cn = _ln(c, eps, center) * m.norm_c_l0.weight + shift
        h = torch.sigmoid(o) * torch.tanh(cn)
        if carry:
            c = cn
        outs.append(h)
    return torch.stack(outs), h, c


# ---------------------------------------------------------------------------------------------------
# RMSNorm, joint gate norm, carried cell
# ---------------------------------------------------------------------------------------------------


def test_rms_parameters_are_named_like_layer_norms_gains():
    layer = dict(recnorm.LSTM(3, 4, norm="layer").named_parameters())
    rms = dict(recnorm.LSTM(3, 4, norm="rms").named_parameters())
    assert set(rms) == set(layer) - {"norm_c_l0.bias"}  # gains only
    assert all(rms[k].shape == layer[k].shape for k in rms)
    joint = dict(recnorm.LSTM(3, 4, norm="rms", norm_kwargs={"joint": True}).named_parameters())
    assert "norm_gates_l0.weight" in joint and "norm_ih_l0.weight" not in joint and "norm_hh_l0.weight" not in joint
    assert recnorm.LSTM(3, 4, norm="rms", norm_kwargs={"eps": 1e-3}).norm_ih_l0.eps == 1e-3


@pytest.mark.parametrize("kernel", FUSED + ["scan"])
@pytest.mark.parametrize("norm,joint,carry", list(itertools.product(["layer", "rms"], [False, True], [False, True])))
def test_lstm_variants_match_the_equations(norm, joint, carry, kernel):
    torch.manual_seed(0)
    eps = 1e-3
    m = recnorm.LSTM(3, 5, norm=norm, norm_kwargs={"joint": joint, "carry_cell": carry, "eps": eps}, kernel=kernel, dtype=DT)
    randomize(m, seed=0)
    m.eval()
    x, h0, c0 = torch.randn(6, 2, 3, dtype=DT), torch.randn(1, 2, 5, dtype=DT), torch.randn(1, 2, 5, dtype=DT)
    out, (h, c) = m(x, (h0, c0))
    ref_out, ref_h, ref_c = _lstm_reference(m, x, h0[0], c0[0], norm == "layer", joint, carry, eps)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h[0], ref_h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c[0], ref_c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm,joint,carry", [("layer", True, True), ("rms", True, False), ("rms", False, True)])
def test_lstm_variants_gradcheck(norm, joint, carry):
    m = recnorm.LSTM(2, 3, norm=norm, norm_kwargs={"joint": joint, "carry_cell": carry}, dtype=DT)
    randomize(m, seed=0)
    x = torch.randn(4, 2, 2, dtype=DT, requires_grad=True)
    params = list(m.parameters())
    for kernel in FUSED:
        m.kernel = kernel
        assert torch.autograd.gradcheck(lambda x, *p: m(x)[0], (x, *params), eps=1e-6, atol=1e-6)


def test_rnn_joint_norm_matches_the_equation():
    m = recnorm.RNN(3, 4, norm="layer", norm_kwargs={"joint": True}, dtype=DT)
    randomize(m, seed=0)
    x, h = torch.randn(5, 2, 3, dtype=DT), torch.randn(1, 2, 4, dtype=DT)
    out, _ = m(x, h)
    hh = h[0]
    for t in range(5):
        pre = _ln(x[t] @ m.weight_ih_l0.t() + hh @ m.weight_hh_l0.t(), 1e-5) * m.norm_gates_l0.weight
        hh = torch.tanh(pre + m.bias_ih_l0 + m.bias_hh_l0)
        torch.testing.assert_close(out[t], hh, rtol=1e-10, atol=1e-10)


def test_undefined_analogues_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="joint=True.*gru.*reset gate"):
        recnorm.GRU(3, 4, norm="layer", norm_kwargs={"joint": True})
    with pytest.raises(ValueError, match="carry_cell=True.*no cell state"):
        recnorm.GRU(3, 4, norm="rms", norm_kwargs={"carry_cell": True})
    with pytest.raises(ValueError, match="carry_cell=True.*no cell state"):
        recnorm.RNN(3, 4, norm="layer", norm_kwargs={"carry_cell": True})
    with pytest.raises(ValueError, match="zoneout"):
        recnorm.GRU(3, 4, zoneout=(0.1, 0.2))
    with pytest.raises(ValueError, match="zoneout"):
        recnorm.LSTM(3, 4, zoneout=1.5)
    with pytest.raises(ValueError, match="weight_dropout"):
        recnorm.LSTM(3, 4, weight_dropout=-0.1)
    with pytest.raises(TypeError):
        recnorm.LSTM(3, 4, 1, True, False, 0.0, False, 0, None, None, None, None, None, 0.3)  # zoneout is keyword-only


def test_export_of_joint_carried_zoned_lstm_matches_eager():
    m = recnorm.LSTM(3, 4, norm="rms", norm_kwargs={"joint": True, "carry_cell": True}, zoneout=(0.2, 0.4)).eval()
    randomize(m, seed=0)
    x = torch.randn(5, 2, 3)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x)[0], m(x)[0])


# ---------------------------------------------------------------------------------------------------
# Zoneout
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", FUSED)
def test_zoneout_keep_rate_in_training(kernel):
    torch.manual_seed(0)
    m = recnorm.LSTM(8, 64, norm="layer", zoneout=(0.3, 0.6), kernel=kernel, dtype=DT)
    x = torch.randn(20, 32, 8, dtype=DT)
    out, _ = m(x)
    # A unit that zoned out repeats its previous value (up to the rounding of the fused kernel's
    # s~ + d (s - s~)); a computed one does not (probability 0). c is read one step at a time.
    same = lambda a, b: ((a - b).abs() <= 1e-12).double().mean().item()  # noqa: E731
    kept_h = same(out[1:], out[:-1])
    assert abs(kept_h - 0.3) < 0.02, kept_h  # 19*32*64 draws: sd 0.0023
    c_prev, h_prev, kept_c = torch.zeros(1, 32, 64, dtype=DT), torch.zeros(1, 32, 64, dtype=DT), []
    torch.manual_seed(1)
    for t in range(6):
        _, (h_prev2, c_new) = m(x[t:t + 1], (h_prev, c_prev))
        kept_c.append(same(c_new, c_prev))
        h_prev, c_prev = h_prev2, c_new
    kept_c = sum(kept_c[1:]) / 5
    assert abs(kept_c - 0.6) < 0.04, kept_c


@pytest.mark.parametrize("kernel", FUSED + ["scan"])
@pytest.mark.parametrize("zoneout", [0.25, (0.25, 0.5)])
def test_zoneout_in_eval_is_the_expectation(zoneout, kernel):
    torch.manual_seed(0)
    m = recnorm.LSTM(3, 4, zoneout=zoneout, kernel=kernel, dtype=DT).eval()
    cell = torch.nn.LSTMCell(3, 4, dtype=DT)
    with torch.no_grad():
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, n).copy_(getattr(m, n + "_l0"))
    ph, pc = (zoneout, 0.0) if isinstance(zoneout, float) else zoneout
    x, h, c = torch.randn(6, 2, 3, dtype=DT), torch.randn(2, 4, dtype=DT), torch.randn(2, 4, dtype=DT)
    out, (hn, cn) = m(x, (h[None], c[None]))
    for t in range(6):
        h_new, c_new = cell(x[t], (h, c))
        h, c = ph * h + (1 - ph) * h_new, pc * c + (1 - pc) * c_new
        torch.testing.assert_close(out[t], h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cn[0], c, rtol=1e-10, atol=1e-10)


def test_gru_zoneout_in_eval_is_the_expectation():
    m = recnorm.GRU(3, 4, zoneout=0.4, dtype=DT).eval()
    cell = torch.nn.GRUCell(3, 4, dtype=DT)
    with torch.no_grad():
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, n).copy_(getattr(m, n + "_l0"))
    x, h = torch.randn(5, 2, 3, dtype=DT), torch.randn(2, 4, dtype=DT)
    out, _ = m(x, h[None])
    for t in range(5):
        h = 0.4 * h + 0.6 * cell(x[t], h)
        torch.testing.assert_close(out[t], h, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_zoneout_kernels_agree_and_gradcheck(training):
    m = recnorm.LSTM(2, 3, norm="layer", norm_kwargs={"carry_cell": True}, zoneout=(0.3, 0.5), dtype=DT).train(training)
    randomize(m, seed=0)
    x = torch.randn(5, 2, 2, dtype=DT, requires_grad=True)
    lengths = torch.tensor([5, 3])
    params = list(m.parameters())

    def f(x, *p):
        torch.manual_seed(7)  # the same keep indicators at every call
        return pad_packed_sequence(m(pack_padded_sequence(x, lengths))[0])[0]

    results = []
    for kernel in FUSED:
        m.kernel = kernel
        assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)
        y = f(x, *params)
        results.append([y] + list(torch.autograd.grad(y.square().sum(), [x] + params)))
    for a, b in zip(results[0], results[-1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# DropConnect on W_hh
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", FUSED)
def test_weight_dropout(kernel):
    torch.manual_seed(0)
    m = recnorm.LSTM(3, 32, norm="layer", weight_dropout=0.5, kernel=kernel, dtype=DT)
    plain = recnorm.LSTM(3, 32, norm="layer", kernel=kernel, dtype=DT)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(6, 4, 3, dtype=DT)
    before = m.weight_hh_l0.detach().clone()
    # eval: no dropout
    torch.testing.assert_close(m.eval()(x)[0], plain.eval()(x)[0], rtol=0, atol=0)
    m.train()
    y1, y2 = m(x)[0], m(x)[0]
    assert not torch.equal(y1, y2)  # a fresh mask per forward
    torch.testing.assert_close(m.weight_hh_l0, before, rtol=0, atol=0)  # the parameter itself is untouched
    m(x)[0].square().sum().backward()
    zero = (m.weight_hh_l0.grad == 0).double().mean().item()
    assert abs(zero - 0.5) < 0.05, zero  # dropped weights get no gradient
    # p = 1 drops every recurrent weight: the layer then sees W_hh = 0
    m1 = recnorm.LSTM(3, 32, weight_dropout=1.0, kernel=kernel, dtype=DT)
    zero_hh = recnorm.LSTM(3, 32, kernel=kernel, dtype=DT)
    zero_hh.load_state_dict(m1.state_dict())
    with torch.no_grad():
        zero_hh.weight_hh_l0.zero_()
    torch.testing.assert_close(m1(x)[0], zero_hh(x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif("fused" not in FUSED, reason="the fused extensions are not built")
@pytest.mark.parametrize("norm,input_size,hidden", [("layer", 2, 5), ("rms", 11, 16)])
def test_fused_variants_match_reference_bidirectional_chunked(norm, input_size, hidden, monkeypatch):
    """Joint norm, carried cell, zoneout of h and c and DropConnect together, two bidirectional layers, packed
    input; the input projection inside the pass (narrow) or by chunked GEMMs (wide), backward GEMMs in chunks."""
    from recnorm.kernels import fused

    monkeypatch.setattr(fused, "INPROJ_ROWS", 7)
    monkeypatch.setenv("RECNORM_FUSED_CHUNK_ROWS", "9")
    kw = dict(num_layers=2, bidirectional=True, norm=norm, norm_kwargs={"joint": True, "carry_cell": True},
              zoneout=(0.3, 0.2), weight_dropout=0.2, dtype=DT)  # fmt: skip
    x = torch.randn(7, 5, input_size, dtype=DT)
    lengths = torch.tensor([7, 3, 7, 1, 4])
    results = []
    for kernel in ("reference", "fused"):
        torch.manual_seed(3)
        m = recnorm.LSTM(input_size, hidden, kernel=kernel, **kw)
        randomize(m, seed=0)
        xl = x.clone().requires_grad_(True)
        torch.manual_seed(4)  # the same masks for both kernels
        out, (h, c) = m(pack_padded_sequence(xl, lengths, enforce_sorted=False))
        loss = out.data.square().sum() + h.sum() + c.square().sum()
        results.append([out.data, h, c] + list(torch.autograd.grad(loss, [xl] + list(m.parameters()))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# The GRU/RNN variants on the fused kernel: zoneout, the RNN's joint norm, haste's one-group GRU norm
# ---------------------------------------------------------------------------------------------------

_GRU_RNN_VARIANTS = (
    [(c, n, "zoneout") for c in ("gru", "rnn", "rnn_relu") for n in (None, "layer", "rms", "batch")]
    + [(c, n, "joint") for c in ("rnn", "rnn_relu") for n in ("layer", "rms")]
    + [("gru", n, "one_group") for n in ("layer", "rms")]
)


def _gru_rnn(cell, norm, variant, input_size, hidden, **kw):
    opts = dict(norm=norm, dtype=DT, **kw)
    if variant == "zoneout":
        opts.update(zoneout=0.3, weight_dropout=0.2)
    elif variant == "joint":
        opts["norm_kwargs"] = {"joint": True}
    else:
        opts["norm_kwargs"] = {"gate_groups": "one"}
    if cell == "gru":
        return recnorm.GRU(input_size, hidden, **opts)
    return recnorm.RNN(input_size, hidden, nonlinearity="relu" if cell == "rnn_relu" else "tanh", **opts)


@pytest.mark.skipif("fused" not in FUSED, reason="the fused extensions are not built")
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cell,norm,variant", _GRU_RNN_VARIANTS)
def test_fused_gru_rnn_variants_match_reference(cell, norm, variant, training, monkeypatch):
    """Two bidirectional layers on packed input, the input projection inside the pass (narrow input) or
    by chunked GEMMs (wide), backward GEMMs in chunks: outputs, final states and every gradient."""
    from recnorm.kernels import fused

    monkeypatch.setattr(fused, "INPROJ_ROWS", 7)
    monkeypatch.setenv("RECNORM_FUSED_CHUNK_ROWS", "9")
    input_size = 11 if (norm is None) == training else 2
    x = torch.randn(7, 5, input_size, dtype=DT)
    lengths = torch.tensor([7, 3, 7, 1, 4])
    results = []
    for kernel in ("reference", "fused"):
        torch.manual_seed(3)
        m = _gru_rnn(cell, norm, variant, input_size, 6, num_layers=2, bidirectional=True, kernel=kernel).train(training)
        randomize(m, seed=0)
        xl = x.clone().requires_grad_(True)
        torch.manual_seed(4)  # the same masks for both kernels
        out, h = m(pack_padded_sequence(xl, lengths, enforce_sorted=False))
        loss = out.data.square().sum() + h.sum()
        results.append([out.data, h] + list(torch.autograd.grad(loss, [xl] + list(m.parameters()))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.skipif("fused" not in FUSED, reason="the fused extensions are not built")
@pytest.mark.parametrize("cell,norm,variant", [("gru", "layer", "zoneout"), ("rnn", "batch", "zoneout"), ("rnn_relu", "rms", "joint"),
                                               ("gru", "rms", "one_group")])  # fmt: skip
def test_fused_gru_rnn_variants_gradcheck(cell, norm, variant):
    m = _gru_rnn(cell, norm, variant, 2, 3, kernel="fused")
    randomize(m, seed=1)
    x = torch.randn(5, 2, 2, dtype=DT, requires_grad=True)
    lengths = torch.tensor([5, 3])
    params = list(m.parameters())

    def f(x, *p):
        torch.manual_seed(7)  # the same keep indicators and DropConnect mask at every call
        return pad_packed_sequence(m(pack_padded_sequence(x, lengths))[0])[0]

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


@pytest.mark.skipif("fused" not in FUSED, reason="the fused extensions are not built")
@pytest.mark.parametrize("cell,norm,variant", [("gru", "layer", "zoneout"), ("rnn", None, "zoneout"), ("rnn", "rms", "joint"),
                                               ("gru", "layer", "one_group")])  # fmt: skip
def test_jit_trace_of_gru_rnn_variants_follows_the_input_shape(cell, norm, variant):
    """Traced on one length and batch, the layer stays right for others (it records the fused operator)."""
    m = _gru_rnn(cell, norm, variant, 3, 4).float().eval()
    randomize(m, seed=2)
    traced = torch.jit.trace(m, (torch.randn(5, 3, 3),), check_trace=False)
    x = torch.randn(8, 2, 3)
    for a, b in zip(traced(x), m(x)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif("fused" not in FUSED, reason="the fused extensions are not built")
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("make_layer", [
    lambda: recnorm.LSTM(2, 3, norm="rms", norm_kwargs={"joint": True, "carry_cell": True}, zoneout=(0.3, 0.2), dtype=DT),
    lambda: recnorm.GRU(2, 3, norm="layer", norm_kwargs={"gate_groups": "one"}, zoneout=0.3, dtype=DT),
    lambda: recnorm.RNN(2, 3, norm="layer", norm_kwargs={"joint": True}, zoneout=0.3, dtype=DT),
], ids=["lstm", "gru", "rnn"])  # fmt: skip
def test_opcheck_of_the_variants(make_layer, training, monkeypatch):
    """torch.library.opcheck (schema, fake kernel, autograd registration, AOTDispatch) with the variant
    arguments set: keep indicators (training) or rates (eval), joint norm, one-group GRU norm."""
    from recnorm.kernels import fused

    torch.manual_seed(0)
    m = make_layer().train(training)
    randomize(m, seed=0)
    bs = torch.tensor([3, 3, 2, 1])
    x = torch.randn(int(bs.sum()), 2, dtype=DT, requires_grad=True)
    state = tuple(torch.randn(3, 3, dtype=DT, requires_grad=True) for _ in range(m.cell.state_size))
    name = "fused_lstm" if isinstance(m, recnorm.LSTM) else "fused_gru_rnn"
    op, calls = getattr(torch.ops.recnorm, name), []
    call = "_LSTM_CALL" if name == "fused_lstm" else "_GRU_RNN_CALL"  # how the layers call the operator
    real = getattr(fused, call)
    monkeypatch.setattr(fused, call, lambda *a: calls.append(a) or real(*a))
    fused.run_direction(m.direction_work(0, 0, x=x), x, bs, state)
    monkeypatch.undo()
    (args,) = calls
    assert args[-1] is not None  # the zoneout of h reached the operator
    torch.library.opcheck(op, args)
