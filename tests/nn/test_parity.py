"""norm=None layers and cells match torch.nn exactly: outputs, final states and gradients."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import recnorm



@pytest.fixture(autouse=True)
def float64_default():
    """Parity to ~1e-12 rather than float32 rounding; restored for the other test files."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


I, H, P = 4, 5, 3
LENGTHS = [5, 2, 4]  # unsorted on purpose: exercises sorted/unsorted indices of PackedSequence

PAIRS = {
    "lstm": (recnorm.LSTM, torch.nn.LSTM, {}),
    "gru": (recnorm.GRU, torch.nn.GRU, {}),
    "rnn_tanh": (recnorm.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (recnorm.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}


def _cases():
    for cell, layers, bidir, batch_first, kind, give_hx in itertools.product(
        PAIRS, (1, 2), (False, True), (False, True), ("batched", "unbatched", "packed"), (False, True)
    ):
        for proj in (0, P) if cell == "lstm" else (0,):
            yield pytest.param(cell, layers, bidir, batch_first, proj, kind, give_hx, id=f"{cell}-L{layers}-bi{int(bidir)}-bf{int(batch_first)}-p{proj}-{kind}-hx{int(give_hx)}")


def _make(cell, layers, bidir, batch_first, proj, dropout=0.0, kernel=None):
    ours_cls, torch_cls, extra = PAIRS[cell]
    kwargs = dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first, dropout=dropout, **extra)
    if proj:
        kwargs["proj_size"] = proj
    ref = torch_cls(I, H, **kwargs)
    ours = ours_cls(I, H, **kwargs, kernel=kernel)
    missing = ours.load_state_dict(ref.state_dict())  # strict: identical names and shapes
    assert not missing.missing_keys and not missing.unexpected_keys
    return ours, ref


def _inputs(cell, layers, bidir, batch_first, proj, kind, give_hx, gen):
    D = 2 if bidir else 1
    B = len(LENGTHS)
    T = max(LENGTHS)
    if kind == "unbatched":
        x = torch.randn(T, I, generator=gen)
    elif batch_first:
        x = torch.randn(B, T, I, generator=gen)
    else:
        x = torch.randn(T, B, I, generator=gen)
    hx = None
    if give_hx:
        hshape = (D * layers, B, proj or H) if kind != "unbatched" else (D * layers, proj or H)
        cshape = (D * layers, B, H) if kind != "unbatched" else (D * layers, H)
        h0 = torch.randn(hshape, generator=gen)
        hx = (h0, torch.randn(cshape, generator=gen)) if cell == "lstm" else h0
    return x, hx


def _leaves(x, hx):
    x = x.clone().requires_grad_(True)
    if hx is None:
        return x, None
    if isinstance(hx, tuple):
        return x, tuple(h.clone().requires_grad_(True) for h in hx)
    return x, hx.clone().requires_grad_(True)


def _run(model, x, hx, kind, batch_first):
    inp = x
    if kind == "packed":
        inp = pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=batch_first, enforce_sorted=False)
    out, state = model(inp, hx)
    if kind == "packed":
        out, _ = pad_packed_sequence(out, batch_first=batch_first)
    states = state if isinstance(state, tuple) else (state,)
    return out, states


@pytest.mark.parametrize("kernel", ["reference", "auto"])
@pytest.mark.parametrize("cell,layers,bidir,batch_first,proj,kind,give_hx", list(_cases()))
def test_layer_matches_torch(cell, layers, bidir, batch_first, proj, kind, give_hx, kernel):
    gen = torch.Generator().manual_seed(1234)
    ours, ref = _make(cell, layers, bidir, batch_first, proj, kernel=kernel)
    x, hx = _inputs(cell, layers, bidir, batch_first, proj, kind, give_hx, gen)
    results = []
    for model in (ref, ours):
        xl, hl = _leaves(x, hx)
        out, states = _run(model, xl, hl, kind, batch_first)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        loss = (out * w).sum() + sum((s * (i + 2)).sum() for i, s in enumerate(states))
        leaves = [xl] + (list(hl) if isinstance(hl, tuple) else [hl] if hl is not None else []) + list(model.parameters())
        grads = torch.autograd.grad(loss, leaves)
        results.append((out, states, grads))
    (o1, s1, g1), (o2, s2, g2) = results
    assert o1.shape == o2.shape
    torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-12)
    assert len(s1) == len(s2)
    for a, b in zip(s1, s2):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell", list(PAIRS))
def test_dropout_between_layers_matches_in_eval(cell):
    ours, ref = _make(cell, 3, True, False, 0, dropout=0.4)
    ours.eval(), ref.eval()
    x = torch.randn(6, 2, I)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-10, atol=1e-12)
    # in training, dropout is applied between layers: outputs differ from eval, and differ run to run
    ours.train()
    a, b = ours(x)[0], ours(x)[0]
    assert not torch.allclose(a, b)


def test_state_dict_names_and_order_follow_torch():
    for cell, (ours_cls, torch_cls, extra) in PAIRS.items():
        kwargs = dict(num_layers=2, bidirectional=True, **extra)
        if cell == "lstm":
            kwargs["proj_size"] = 2
        assert list(ours_cls(I, H, **kwargs).state_dict()) == list(torch_cls(I, H, **kwargs).state_dict())


def test_default_init_has_torch_distribution():
    torch.manual_seed(0)
    m = recnorm.LSTM(I, 100)
    bound = 1 / 100**0.5
    w = m.weight_hh_l0
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert abs(w.mean().item()) < 0.01


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_matches_torch(cell, batched, bias):
    ours_cls = {"lstm": recnorm.LSTMCell, "gru": recnorm.GRUCell, "rnn_tanh": recnorm.RNNCell, "rnn_relu": recnorm.RNNCell}[cell]
    torch_cls = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn_tanh": torch.nn.RNNCell, "rnn_relu": torch.nn.RNNCell}[cell]
    extra = {"nonlinearity": cell.split("_")[1]} if cell.startswith("rnn") else {}
    ref = torch_cls(I, H, bias=bias, **extra)
    ours = ours_cls(I, H, bias=bias, **extra)
    ours.load_state_dict(ref.state_dict())
    shape = (3, I) if batched else (I,)
    x = torch.randn(shape, requires_grad=True)
    hs = (3, H) if batched else (H,)
    hx = (torch.randn(hs), torch.randn(hs)) if cell == "lstm" else torch.randn(hs)
    for give in (None, hx):
        a, b = ref(x, give), ours(x, give)
        a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
        for u, v in zip(a, b):
            torch.testing.assert_close(v, u, rtol=1e-10, atol=1e-12)
        ga = torch.autograd.grad(sum(u.sum() for u in a), [x, *ref.parameters()])
        gb = torch.autograd.grad(sum(v.sum() for v in b), [x, *ours.parameters()])
        for u, v in zip(ga, gb):
            torch.testing.assert_close(v, u, rtol=1e-10, atol=1e-12)


def test_cell_unrolled_equals_layer():
    """A cell stepped by hand with step=t gives the layer's result, for a per-step norm too."""
    torch.manual_seed(3)
    layer = recnorm.LSTM(I, H, norm="batch")
    cell = recnorm.LSTMCell(I, H, norm="batch")
    sd = {k.replace("_l0", ""): v for k, v in layer.state_dict().items()}
    cell.load_state_dict(sd)
    x = torch.randn(6, 4, I)
    out, (hn, cn) = layer(x)
    h = c = torch.zeros(4, H)
    outs = []
    for t in range(6):
        h, c = cell(x[t], (h, c), step=t)
        outs.append(h)
    torch.testing.assert_close(torch.stack(outs), out)
    torch.testing.assert_close(cell.norm_hh.running_mean, layer.norm_hh_l0.running_mean)
