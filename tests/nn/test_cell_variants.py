"""Zoneout and DropConnect on the single-step cells (``recnorm.LSTMCell/GRUCell/RNNCell``).

The references are torch.nn's own cells with the same weights: ``s~`` comes from torch, and the zoneout
mixing (Krueger et al. 2017) and the DropConnect of ``W_hh`` (Merity et al. 2018) are written here by hand."""

from __future__ import annotations

import pytest
import torch

import recnorm
from registry_cases import randomize

DT = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}
CELLS = {  # name: (recnorm cell, torch.nn cell, extra args)
    "lstm": (recnorm.LSTMCell, torch.nn.LSTMCell, {}),
    "gru": (recnorm.GRUCell, torch.nn.GRUCell, {}),
    "rnn_relu": (recnorm.RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"}),
}


def _pair(name, input_size=3, hidden=4, **options):
    """A recnorm cell with ``options`` and a torch.nn cell with the same weights."""
    ours, theirs, extra = CELLS[name]
    cell = ours(input_size, hidden, dtype=DT, **extra, **options)
    ref = theirs(input_size, hidden, dtype=DT, **extra)
    ref.load_state_dict(cell.state_dict())
    return cell, ref


def _state(name, batch, hidden=4):
    h = torch.randn(batch, hidden, dtype=DT)
    return (h, torch.randn(batch, hidden, dtype=DT)) if name == "lstm" else h


def _states(name, s):
    """The state tuple of a cell's return value or hx."""
    return tuple(s) if name == "lstm" else (s,)


# ---------------------------------------------------------------------------------------------------
# Options: validation, repr, state_dict
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,layer,kwargs",
    [
        (recnorm.GRUCell, recnorm.GRU, {"zoneout": (0.1, 0.2)}),
        (recnorm.RNNCell, recnorm.RNN, {"zoneout": (0.1, 0.2)}),
        (recnorm.LSTMCell, recnorm.LSTM, {"zoneout": (0.1, 0.2, 0.3)}),
        (recnorm.LSTMCell, recnorm.LSTM, {"zoneout": 1.5}),
        (recnorm.LSTMCell, recnorm.LSTM, {"zoneout": (0.1, -0.2)}),
        (recnorm.GRUCell, recnorm.GRU, {"zoneout": "0.1"}),
        (recnorm.RNNCell, recnorm.RNN, {"weight_dropout": -0.1}),
        (recnorm.LSTMCell, recnorm.LSTM, {"weight_dropout": True}),
    ],
)
def test_bad_rates_are_refused_as_the_layers_refuse_them(cls, layer, kwargs):
    with pytest.raises(ValueError) as layer_error:
        layer(3, 4, **kwargs)
    with pytest.raises(ValueError) as cell_error:
        cls(3, 4, **kwargs)
    assert str(cell_error.value) == str(layer_error.value).replace(layer.__name__ + ":", cls.__name__ + ":")
    assert "zoneout" in str(cell_error.value) or "weight_dropout" in str(cell_error.value)


def test_options_are_keyword_only_shown_and_leave_the_state_dict_alone():
    with pytest.raises(TypeError):
        recnorm.LSTMCell(3, 4, True, None, None, None, None, 0.3)
    cell = recnorm.LSTMCell(3, 4, zoneout=(0.1, 0.2), weight_dropout=0.25)
    assert repr(cell) == "LSTMCell(3, 4, zoneout=(0.1, 0.2), weight_dropout=0.25)"
    assert repr(recnorm.RNNCell(3, 4, zoneout=0.1)) == "RNNCell(3, 4, zoneout=0.1)"
    assert repr(recnorm.GRUCell(3, 4)) == "GRUCell(3, 4)"
    assert set(cell.state_dict()) == set(torch.nn.LSTMCell(3, 4).state_dict())


@pytest.mark.parametrize("name", list(CELLS))
def test_zero_rates_keep_torch_parity_in_training(name):
    torch.manual_seed(0)
    cell, ref = _pair(name, zoneout=0.0, weight_dropout=0.0)
    x, hx = torch.randn(5, 3, dtype=DT), _state(name, 5)
    for a, b in zip(_states(name, cell.train()(x, hx)), _states(name, ref(x, hx))):
        torch.testing.assert_close(a, b, **TIGHT)


# ---------------------------------------------------------------------------------------------------
# Zoneout
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,zoneout", [("lstm", 0.25), ("lstm", (0.25, 0.6)), ("gru", 0.4), ("rnn_relu", 0.3)])
def test_zoneout_in_eval_is_the_expectation(name, zoneout):
    torch.manual_seed(0)
    cell, ref = _pair(name, zoneout=zoneout, weight_dropout=0.5)  # eval: no DropConnect either
    cell.eval()
    rates = (zoneout, 0.0) if isinstance(zoneout, float) else zoneout
    x, hx = torch.randn(4, 2, 3, dtype=DT), _state(name, 2)
    ours = theirs = hx
    for t in range(4):
        new = _states(name, ref(x[t], theirs))
        theirs = tuple(p * s + (1 - p) * n for p, s, n in zip(rates, _states(name, theirs), new))
        theirs = theirs if name == "lstm" else theirs[0]
        ours = cell(x[t], ours)
        for a, b in zip(_states(name, ours), _states(name, theirs)):
            torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("name", list(CELLS))
def test_zoneout_in_training_keeps_units_with_the_rate_drawn_at_every_call(name):
    torch.manual_seed(0)
    cell, ref = _pair(name, input_size=5, hidden=32, zoneout=0.3)
    x, hx = torch.randn(2048, 5, dtype=DT), _state(name, 2048, 32)  # 65536 units: sd of the rate 0.0018
    h_prev, h_new = _states(name, hx)[0], _states(name, ref(x, hx))[0]
    assert not (h_prev == h_new).any()  # so that "kept" below can only mean zoned out
    first, second = _states(name, cell(x, hx))[0], _states(name, cell(x, hx))[0]
    kept = first == h_prev  # a kept unit is exactly its previous value
    assert abs(kept.double().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(first[~kept], h_new[~kept], **TIGHT)  # the others are torch's new state
    assert not torch.equal(kept, second == h_prev)  # fresh indicators at every call (each call is a step)
    if name == "lstm":  # a float zones h only: c is torch's new c
        torch.testing.assert_close(cell(x, hx)[1], ref(x, hx)[1], **TIGHT)


def test_pair_zoneout_zones_the_lstm_cell_state():
    torch.manual_seed(1)
    cell, ref = _pair("lstm", input_size=5, hidden=32, zoneout=(0.0, 0.5))
    x, (h, c) = torch.randn(2048, 5, dtype=DT), _state("lstm", 2048, 32)
    h_ref, c_ref = ref(x, (h, c))
    h_out, c_out = cell(x, (h, c))
    kept = c_out == c
    assert abs(kept.double().mean().item() - 0.5) < 0.02
    torch.testing.assert_close(c_out[~kept], c_ref[~kept], **TIGHT)
    torch.testing.assert_close(h_out, h_ref, **TIGHT)  # h is computed from the unzoned c~, and not zoned


@pytest.mark.parametrize("zoneout", [0.3, (0.3, 0.5)])
def test_a_cell_loop_in_eval_equals_the_layer(zoneout):
    torch.manual_seed(0)
    layer = recnorm.LSTM(3, 6, norm="layer", zoneout=zoneout, weight_dropout=0.4, dtype=DT).eval()
    randomize(layer, seed=0)
    cell = recnorm.LSTMCell(3, 6, norm="layer", zoneout=zoneout, weight_dropout=0.4, dtype=DT).eval()
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in layer.state_dict().items()})
    x, h, c = torch.randn(7, 2, 3, dtype=DT), torch.randn(2, 6, dtype=DT), torch.randn(2, 6, dtype=DT)
    out, (hn, cn) = layer(x, (h[None], c[None]))
    for t in range(7):
        h, c = cell(x[t], (h, c))
        torch.testing.assert_close(h, out[t], **TIGHT)
    torch.testing.assert_close(c, cn[0], **TIGHT)


def test_gru_cell_loop_in_eval_equals_the_layer():
    layer = recnorm.GRU(3, 5, zoneout=0.45, dtype=DT).eval()
    cell = recnorm.GRUCell(3, 5, zoneout=0.45, dtype=DT).eval()
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in layer.state_dict().items()})
    x, h = torch.randn(6, 2, 3, dtype=DT), torch.randn(2, 5, dtype=DT)
    out, _ = layer(x, h[None])
    for t in range(6):
        h = cell(x[t], h)
        torch.testing.assert_close(h, out[t], **TIGHT)


# ---------------------------------------------------------------------------------------------------
# DropConnect on W_hh
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CELLS))
def test_weight_dropout_one_is_a_zero_w_hh_and_eval_is_none(name):
    torch.manual_seed(0)
    cell, ref = _pair(name, weight_dropout=1.0)
    x, hx = torch.randn(3, 3, dtype=DT), _state(name, 3)
    for a, b in zip(_states(name, cell.eval()(x, hx)), _states(name, ref(x, hx))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # eval: W_hh as is
    with torch.no_grad():
        ref.weight_hh.zero_()
    for a, b in zip(_states(name, cell.train()(x, hx)), _states(name, ref(x, hx))):
        torch.testing.assert_close(a, b, **TIGHT)  # training with p = 1: W_hh = 0


def test_weight_dropout_draws_a_fresh_mask_at_every_call_unless_one_is_given():
    torch.manual_seed(0)
    cell, ref = _pair("lstm", hidden=16, weight_dropout=0.5)
    x, hx = torch.randn(4, 3, dtype=DT), _state("lstm", 4, 16)
    assert not torch.equal(cell(x, hx)[0], cell(x, hx)[0])
    mask = cell.draw_weight_hh_mask()
    assert mask.shape == cell.weight_hh.shape and not mask.requires_grad
    assert set(mask.unique().tolist()) == {0.0, 2.0}  # 0 or 1 / (1 - p)
    assert abs((mask == 0).double().mean().item() - 0.5) < 0.05
    torch.testing.assert_close(cell(x, hx, weight_hh_mask=mask)[0], cell(x, hx, weight_hh_mask=mask)[0], rtol=0, atol=0)
    assert cell.eval().draw_weight_hh_mask() is None
    assert recnorm.LSTMCell(3, 4).draw_weight_hh_mask() is None  # p = 0
    with pytest.raises(ValueError, match=r"weight_hh_mask should be a Tensor of weight_hh's shape \(64, 16\).*got shape \(16, 64\)"):
        cell(x, hx, weight_hh_mask=mask.t())


def test_one_mask_across_a_sequence():
    """A loop with the drawn mask is torch's cell with W_hh * mask at every step, and the weights the mask
    dropped get no gradient from the whole sequence (with a mask per step, almost all would get some)."""
    torch.manual_seed(0)
    cell, ref = _pair("lstm", hidden=16, weight_dropout=0.5)
    x = torch.randn(6, 4, 3, dtype=DT)
    h = c = torch.zeros(4, 16, dtype=DT)
    mask = cell.draw_weight_hh_mask()
    with torch.no_grad():
        ref.weight_hh.mul_(mask)
    hr, cr, loss = h, c, 0
    for t in range(6):
        h, c = cell(x[t], (h, c), weight_hh_mask=mask)
        hr, cr = ref(x[t], (hr, cr))
        torch.testing.assert_close(h, hr, **TIGHT)
        loss = loss + h.square().sum()
    loss.backward()
    assert torch.equal(cell.weight_hh.grad == 0, mask == 0)
    cell.zero_grad()
    h = c = torch.zeros(4, 16, dtype=DT)
    for t in range(6):  # per-call masks: a weight is dropped at all 6 steps with probability 1/64
        h, c = cell(x[t], (h, c))
    h.square().sum().backward()
    assert (cell.weight_hh.grad == 0).double().mean().item() < 0.1


# ---------------------------------------------------------------------------------------------------
# Unbatched input, gradients
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_unbatched_input_draws_and_computes_as_a_batch_of_one(name):
    cell, _ = _pair(name, zoneout=(0.5, 0.5) if name == "lstm" else 0.5, weight_dropout=0.5)
    x, hx = torch.randn(3, dtype=DT), _state(name, 1)
    unbatched = tuple(s[0] for s in _states(name, hx))
    for mode in (True, False):
        cell.train(mode)
        torch.manual_seed(3)
        one = _states(name, cell(x, unbatched if name == "lstm" else unbatched[0]))
        torch.manual_seed(3)
        batch = _states(name, cell(x[None], hx))
        for a, b in zip(one, batch):
            assert a.shape == (4,)
            torch.testing.assert_close(a, b[0], rtol=0, atol=0)


@pytest.mark.parametrize("name,norm", [("lstm", "layer"), ("gru", None)])
def test_gradcheck_in_training(name, norm):
    ours, _, _ = CELLS[name]
    cell = ours(2, 3, dtype=DT, norm=norm, zoneout=(0.3, 0.5) if name == "lstm" else 0.3, weight_dropout=0.4)
    randomize(cell, seed=0)
    params = list(cell.parameters())
    x = torch.randn(2, 2, dtype=DT, requires_grad=True)
    hx = tuple(s.requires_grad_() for s in _states(name, _state(name, 2, 3)))

    def step(x, *args):  # fresh draws inside, made the same at every call by the seed
        torch.manual_seed(7)
        return cell(x, args[:2] if name == "lstm" else args[0])

    assert torch.autograd.gradcheck(step, (x, *hx, *params), eps=1e-6, atol=1e-6)
    torch.manual_seed(1)
    mask = cell.draw_weight_hh_mask()

    def sequence(x, *args):  # three steps with one DropConnect mask
        torch.manual_seed(7)
        s = args[:2] if name == "lstm" else args[0]
        for _ in range(3):
            s = cell(x, s, weight_hh_mask=mask)
        return s

    assert torch.autograd.gradcheck(sequence, (x, *hx, *params), eps=1e-6, atol=1e-6)
