"""Normalized layers: gradients, statistics by hand, padding invariance, eval, population statistics."""

import itertools

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import recnorm
from registry_cases import CELL_IDS, first, make, make_cell, state

DT = torch.float64
NORMS = recnorm.list_norms()
LENGTHS = torch.tensor([6, 3, 5, 4])


def _packed(x, lengths=LENGTHS):
    return pack_padded_sequence(x, lengths, enforce_sorted=False)


# ---------------------------------------------------------------------------------------------------
# gradcheck, generated from the registries
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell,norm", list(itertools.product(CELL_IDS, NORMS)))
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_layer(cell, norm, packed):
    torch.manual_seed(0)
    kwargs = {"gain_init": 0.7} if "batch" in norm else None
    model = make(cell, 3, 2, num_layers=2, bidirectional=True, dtype=DT, norm=norm, norm_kwargs=kwargs)
    with torch.no_grad():  # non-zero shifts so that every parameter matters
        for name, p in model.named_parameters():
            if name.startswith("norm_"):
                p.add_(0.1 * torch.randn_like(p))
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    x = torch.randn(6, 4, 3, dtype=DT, requires_grad=True)
    h0 = torch.randn(4, 4, 2, dtype=DT, requires_grad=True)
    buffers = [b.clone() for b in model.buffers()]

    def f(x, h0, *ps):
        # Steps with < 2 valid sequences read the running statistics, which each call updates: restore
        # them, so that gradcheck sees the same function at every call.
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        inp = _packed(x) if packed else x
        out, state_out = functional_call(model, dict(zip(names, ps)), (inp, state(cell, h0)))
        out = pad_packed_sequence(out)[0] if packed else out
        return out, first(state_out)

    assert torch.autograd.gradcheck(f, (x, h0, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("cell,norm", list(itertools.product(CELL_IDS, NORMS)))
def test_gradcheck_cell(cell, norm):
    torch.manual_seed(1)
    model = make_cell(cell, 3, 2, dtype=DT, norm=norm)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    x = torch.randn(5, 3, dtype=DT, requires_grad=True)
    h = torch.randn(5, 2, dtype=DT, requires_grad=True)

    def f(x, h, *ps):
        out = functional_call(model, dict(zip(names, ps)), (x, state(cell, h, h * 0.5)), {"step": 2})
        return out

    assert torch.autograd.gradcheck(f, (x, h, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# statistics against hand computation
# ---------------------------------------------------------------------------------------------------


def _valid_rows(x, lengths, t):
    return x[t][lengths > t]


def test_per_step_statistics_over_valid_sequences_only():
    torch.manual_seed(0)
    m = recnorm.LSTM(3, 4, dtype=DT, norm="batch", norm_kwargs={"momentum": 1.0})
    x = torch.randn(6, 4, 3, dtype=DT)
    x[:, 1][3:] = 1e3  # garbage in the padding of sequence 1 (length 3)
    m(_packed(x))
    bn = m.norm_ih_l0
    for t in range(5):
        proj = _valid_rows(x, LENGTHS, t) @ m.weight_ih_l0.T
        torch.testing.assert_close(bn.running_mean[t], proj.mean(0))
        torch.testing.assert_close(bn.running_var[t], proj.var(0, unbiased=True))
    # step 5 has a single valid sequence: no batch variance, so its slot is left untracked
    assert bn.num_batches_tracked[:5].tolist() == [1] * 5 and bn.num_batches_tracked[5:].sum() == 0
    # hidden-to-hidden statistics at step 0: W_hh h_0 with h_0 = 0 is constant, mean 0
    torch.testing.assert_close(m.norm_hh_l0.running_mean[0], torch.zeros(16, dtype=DT))


def test_recurrent_statistics_use_the_actual_hidden_states():
    torch.manual_seed(1)
    m = recnorm.LSTM(3, 4, dtype=DT, norm="batch", norm_kwargs={"momentum": 1.0})
    x = torch.randn(6, 4, 3, dtype=DT)
    with recnorm.diagnostics.capture(m) as cap:
        m(_packed(x))
    hs = cap.hidden_states()["lstm.l0"]  # h_t for valid (sorted) rows
    for t in range(1, 5):
        proj = hs[t - 1][: hs[t].shape[0]] @ m.weight_hh_l0.T
        torch.testing.assert_close(m.norm_hh_l0.running_mean[t], proj.mean(0))
        torch.testing.assert_close(m.norm_hh_l0.running_var[t], proj.var(0))
    stats = cap.batch_stats()["norm_ih_l0"]  # qualified module names
    assert stats["mean"].shape == (5, 16) and stats["step"].tolist() == list(range(5))  # step 5: 1 sequence


def test_momentum_running_average():
    """The k-th update of a slot has weight max(momentum, 1/k): a plain average of the first 1/momentum
    updates (the initial mean 0 and variance 1 carry no weight), then the usual running average."""
    torch.manual_seed(2)
    m = recnorm.RNN(3, 4, dtype=DT, norm="batch", norm_kwargs={"momentum": 0.25})
    xs = [torch.randn(2, 5, 3, dtype=DT) for _ in range(7)]
    for x in xs:
        m(x)
    expect_mean, expect_var = torch.zeros(4, dtype=DT), torch.ones(4, dtype=DT)
    for k, x in enumerate(xs, start=1):
        p = x[0] @ m.weight_ih_l0.T
        w = max(0.25, 1 / k)
        expect_mean = (1 - w) * expect_mean + w * p.mean(0)
        expect_var = (1 - w) * expect_var + w * p.var(0)  # unbiased
    torch.testing.assert_close(m.norm_ih_l0.running_mean[0], expect_mean)
    torch.testing.assert_close(m.norm_ih_l0.running_var[0], expect_var)
    assert m.norm_ih_l0.num_batches_tracked[0].item() == 7


def test_sequence_batch_statistics_over_all_valid_positions():
    torch.manual_seed(0)
    m = recnorm.GRU(3, 4, dtype=DT, norm="sequence_batch", norm_kwargs={"momentum": 1.0})
    x = torch.randn(6, 4, 3, dtype=DT)
    m(_packed(x))
    valid = torch.arange(6).unsqueeze(1) < LENGTHS.unsqueeze(0)  # (T, B)
    proj = x[valid] @ m.weight_ih_l0.T
    torch.testing.assert_close(m.norm_ih_l0.running_mean[0], proj.mean(0))
    torch.testing.assert_close(m.norm_ih_l0.running_var[0], proj.var(0))
    assert m.norm_ih_l0.num_batches_tracked.item() == 1  # one call per forward, not one per step
    assert getattr(m, "norm_hh_l0") is None


def test_shared_batch_updates_one_running_statistic_every_step():
    torch.manual_seed(0)
    m = recnorm.RNN(3, 4, dtype=DT, norm="shared_batch", norm_kwargs={"momentum": 0.5})
    x = torch.randn(3, 5, 3, dtype=DT)
    m(x)
    proj = x @ m.weight_ih_l0.T  # (T, B, H)
    expect = torch.zeros(4, dtype=DT)
    for t in range(3):
        w = max(0.5, 1 / (t + 1))  # the slot's (t+1)-th update
        expect = (1 - w) * expect + w * proj[t].mean(0)
    bn = m.norm_ih_l0
    assert bn.running_mean.shape == (1, 4)
    torch.testing.assert_close(bn.running_mean[0], expect)
    assert bn.num_batches_tracked.item() == 3
    torch.testing.assert_close(bn.weight, torch.ones(4, dtype=DT))  # shared gain starts at 1


def test_batch_norm_training_output_by_hand():
    bn = recnorm.RecurrentBatchNorm(3, max_steps=4, gain_init=0.1, dtype=DT)
    with torch.no_grad():
        bn.bias.fill_(0.2)
    x = torch.randn(7, 3, dtype=DT)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    y = bn(x, step=2, mask=mask)
    v = x[mask]
    expect = 0.1 * (x - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + 1e-5) + 0.2
    torch.testing.assert_close(y[mask], expect[mask])
    torch.testing.assert_close(bn.running_mean[2], v.mean(0))  # a slot's first update takes the batch's statistics


def test_layer_norm_by_hand_with_gru_groups():
    torch.manual_seed(0)
    m = recnorm.GRU(3, 2, dtype=DT, norm="layer")
    ln = m.norm_ih_l0
    assert ln.groups == (4, 2)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    a = torch.randn(5, 6, dtype=DT)

    def norm(v):
        return (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-5)

    expect = torch.cat([norm(a[:, :4]), norm(a[:, 4:])], -1) * ln.weight
    torch.testing.assert_close(ln(a), expect)


# ---------------------------------------------------------------------------------------------------
# padding invariance
# ---------------------------------------------------------------------------------------------------


def _run_padded(model, x, lengths, total):
    out, state = model(_packed(x, lengths))
    out = pad_packed_sequence(out, total_length=total)[0]
    hn = state[0] if isinstance(state, tuple) else state
    return out, hn


@pytest.mark.parametrize("cell,norm", list(itertools.product(CELL_IDS, [None] + NORMS)))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_padding_changes_nothing(cell, norm, mode):
    torch.manual_seed(0)
    model = make(cell, 3, 4, num_layers=2, bidirectional=True, dtype=DT, norm=norm)
    if mode == "eval":  # give the batch norms some population statistics first
        model(torch.randn(6, 5, 3, dtype=DT))
        model.eval()
    x = torch.randn(6, 4, 3, dtype=DT)
    mask = (torch.arange(6).unsqueeze(1) < LENGTHS).unsqueeze(-1)
    garbage = torch.where(mask, x, 1e4 * torch.randn_like(x))
    longer = torch.cat([garbage, torch.randn(3, 4, 3, dtype=DT)])  # three extra steps of padding
    results = []
    for inp in (x, garbage, longer):
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        inp = inp.clone().requires_grad_(True)
        out, hn = _run_padded(model, inp, LENGTHS, 6)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=DT).view_as(out)).sum() + hn.square().sum()
        grads = torch.autograd.grad(loss, [inp] + list(model.parameters()))
        stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        results.append((out, hn, grads[0][:6] * mask, grads[1:], stats))
        model.load_state_dict(sd)
    for other in results[1:]:
        torch.testing.assert_close(other[0], results[0][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(other[1], results[0][1], rtol=0, atol=1e-12)
        torch.testing.assert_close(other[2], results[0][2], rtol=0, atol=1e-12)
        for a, b in zip(other[3], results[0][3]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for k in results[0][4]:
            torch.testing.assert_close(other[4][k], results[0][4][k], rtol=0, atol=1e-12)


def test_reverse_direction_counts_steps_from_each_sequence_end():
    torch.manual_seed(0)
    m = recnorm.LSTM(3, 2, bidirectional=True, dtype=DT, norm="batch", norm_kwargs={"momentum": 1.0})
    x = torch.randn(6, 4, 3, dtype=DT)
    m(_packed(x))
    last = x[LENGTHS - 1, torch.arange(4)]  # each sequence's own last element is the reverse step 0
    proj = last @ m.weight_ih_l0_reverse.T
    torch.testing.assert_close(m.norm_ih_l0_reverse.running_mean[0], proj.mean(0))
    first = x[0] @ m.weight_ih_l0_reverse.T  # reverse step len-1 differs per sequence; step 0 of fwd
    torch.testing.assert_close(m.norm_ih_l0.running_mean[0], (x[0] @ m.weight_ih_l0.T).mean(0))
    assert not torch.allclose(first.mean(0), proj.mean(0))


# ---------------------------------------------------------------------------------------------------
# degenerate batches: no NaN, no inf
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_single_valid_sequence_steps_do_not_produce_nan(norm):
    torch.manual_seed(0)
    m = recnorm.LSTM(3, 4, norm=norm)
    x = torch.randn(8, 2, 3, requires_grad=True)
    out, (h, c) = m(_packed(x, torch.tensor([8, 2])))
    (pad_packed_sequence(out)[0].sum() + h.sum()).backward()
    assert torch.isfinite(out.data).all() and torch.isfinite(x.grad).all()
    if norm == "batch":
        # steps 2..7 have one valid sequence: normalized with population statistics, not updated
        assert m.norm_ih_l0.num_batches_tracked[:2].tolist() == [1, 1]
        assert m.norm_ih_l0.num_batches_tracked[2:].sum() == 0


@pytest.mark.parametrize("norm", NORMS)
def test_unbatched_input_trains_without_nan(norm):
    m = recnorm.GRU(3, 4, norm=norm)
    out, h = m(torch.randn(5, 3))
    out.sum().backward()
    assert out.shape == (5, 4) and torch.isfinite(m.weight_hh_l0.grad).all()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("init", ["default", "orthogonal"])  # orthogonal zeroes the biases: h, c stay 0
def test_constant_leading_steps_keep_gradients_finite(norm, init):
    """Blank leading rows of real Fashion-MNIST images: constant across the batch (zero variance)."""
    from recnorm.experiments.tasks import create_task

    task = create_task("fashion_rows", train_size=64, valid_size=16, test_size=16)
    batch = next(task.batches("train", 32, seed=0))
    x = torch.cat([torch.zeros(60, 32, 28), batch.x])  # 60 blank rows, then the images
    torch.manual_seed(0)
    m = recnorm.LSTM(28, 32, norm=norm)
    recnorm.init.initialize(m, init)
    x.requires_grad_(True)
    out, (h, c) = m(x)
    loss = torch.nn.functional.cross_entropy(out[-1, :, :10], batch.y)
    loss.backward()
    grads = [p.grad for p in m.parameters()] + [x.grad]
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert x.grad[:60].abs().max() < 1e6  # bounded, not just finite


# ---------------------------------------------------------------------------------------------------
# eval: population statistics per step, beyond the trained length
# ---------------------------------------------------------------------------------------------------


def test_eval_reuses_last_tracked_step_beyond_trained_length():
    torch.manual_seed(0)
    m = recnorm.LSTM(3, 4, dtype=DT, norm="batch", norm_kwargs={"max_steps": 50})
    for _ in range(3):
        m(torch.randn(5, 8, 3, dtype=DT))
    m.eval()
    x = torch.randn(9, 2, 3, dtype=DT)
    out = m(x)[0]
    # the same model with slot 4 copied into slots 5..8 by hand gives the same outputs
    m2 = recnorm.LSTM(3, 4, dtype=DT, norm="batch", norm_kwargs={"max_steps": 50})
    m2.load_state_dict(m.state_dict())
    for bn in [m2.norm_ih_l0, m2.norm_hh_l0, m2.norm_c_l0]:
        bn.running_mean[5:9] = bn.running_mean[4]
        bn.running_var[5:9] = bn.running_var[4]
        bn.num_batches_tracked[5:9] = 1
    m2.eval()
    torch.testing.assert_close(m2(x)[0], out)
    # and the per-step statistics matter: using slot 0 everywhere gives something else
    bn = m.norm_hh_l0
    assert not torch.allclose(bn(torch.ones(1, 16, dtype=DT), step=0), bn(torch.ones(1, 16, dtype=DT), step=4))
    torch.testing.assert_close(bn(torch.ones(1, 16, dtype=DT), step=4), bn(torch.ones(1, 16, dtype=DT), step=400))


def test_training_beyond_max_steps_shares_the_last_slot():
    m = recnorm.RNN(3, 4, norm="batch", norm_kwargs={"max_steps": 3, "momentum": None})
    m(torch.randn(7, 5, 3))
    assert m.norm_ih_l0.num_batches_tracked.tolist() == [1, 1, 5]


def test_eval_differs_from_training_and_is_batch_independent():
    torch.manual_seed(0)
    m = recnorm.LSTM(3, 4, norm="batch")
    for _ in range(5):
        m(torch.randn(5, 16, 3))
    m.eval()
    x = torch.randn(5, 6, 3)
    full = m(x)[0]
    single = torch.cat([m(x[:, i : i + 1])[0] for i in range(6)], 1)
    torch.testing.assert_close(single, full)


# ---------------------------------------------------------------------------------------------------
# exact population statistics
# ---------------------------------------------------------------------------------------------------


def test_recompute_population_statistics_is_exact():
    torch.manual_seed(0)
    m = recnorm.LSTM(3, 4, dtype=DT, norm="batch", dropout=0.0)
    m(torch.randn(5, 8, 3, dtype=DT))  # some running averages to be replaced
    xs = [torch.randn(5, 6, 3, dtype=DT), torch.randn(4, 10, 3, dtype=DT)]
    n = recnorm.recompute_population_statistics(m, xs)
    assert n == 2 and m.training
    proj = [x @ m.weight_ih_l0.T for x in xs]
    bn = m.norm_ih_l0
    for t in range(5):
        rows = torch.cat([p[t] for p in proj if p.shape[0] > t])
        torch.testing.assert_close(bn.running_mean[t], rows.mean(0))
        torch.testing.assert_close(bn.running_var[t], rows.var(0))
    assert bn.num_batches_tracked[:5].tolist() == [1] * 5 and bn.num_batches_tracked[5:].sum() == 0


def test_recompute_with_one_batch_equals_batch_statistics_in_eval():
    torch.manual_seed(0)
    m = recnorm.GRU(3, 4, dtype=DT, norm="batch", norm_kwargs={"momentum": 1.0})
    x = torch.randn(4, 50, 3, dtype=DT)
    m(x)
    ema = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    recnorm.recompute_population_statistics(m, [x])
    for k, v in ema.items():
        torch.testing.assert_close(m.state_dict()[k], v)


def test_recompute_needs_batches():
    m = recnorm.LSTM(3, 4, norm="batch")
    with pytest.raises(ValueError, match="at least one batch"):
        recnorm.recompute_population_statistics(m, [])


def _batch_norms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, recnorm.RecurrentBatchNorm)}


@pytest.mark.parametrize("kernel", ["reference", "auto"])
def test_non_finite_batch_statistics_never_enter_the_running_averages(kernel, caplog):
    """A NaN at time step 2 of one row: statistics of steps 2.. are left out (a warning names step 2), and a
    clean batch afterwards leaves exactly the running averages of a model that never saw the NaN there."""
    torch.manual_seed(0)
    a = recnorm.LSTM(3, 4, norm="batch", kernel=kernel)
    b = recnorm.LSTM(3, 4, norm="batch", kernel=kernel)
    b.load_state_dict(a.state_dict())
    bad, clean = torch.randn(6, 5, 3), torch.randn(6, 5, 3)
    bad[2, 1, 0] = float("nan")
    with caplog.at_level("WARNING", logger="recnorm"):
        assert torch.isnan(a(bad)[0][2:]).all()  # as torch.nn.BatchNorm1d: the whole batch's step is NaN
    messages = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    # the input term at step 2, where the NaN is; the recurrent term and the cell from there on
    assert any("at time step 2 of its training call" in m for m in messages), messages
    assert any("at time steps 2, 3, 4, 5 of its training call" in m for m in messages), messages
    a(clean)
    b(clean)
    # x_2 is NaN: W_ih x_t at step 2 only; W_hh h_{t-1} from step 3 (h_2 is NaN); c_t from step 2
    left_out = {"norm_ih_l0": [2], "norm_hh_l0": [3, 4, 5], "norm_c_l0": [2, 3, 4, 5]}
    assert sorted(_batch_norms(a)) == sorted(left_out)
    for (name, bn_a), bn_b in zip(_batch_norms(a).items(), _batch_norms(b).values()):
        steps = left_out[name]
        assert bn_a.num_batches_tracked[:6].tolist() == [1 if t in steps else 2 for t in range(6)], name
        for buf in ("running_mean", "running_var"):
            assert torch.isfinite(getattr(bn_a, buf)).all(), name
            torch.testing.assert_close(getattr(bn_a, buf)[steps], getattr(bn_b, buf)[steps])
    a.eval()
    assert torch.isfinite(a(clean)[0]).all()  # clean data evaluated later is clean


def test_non_finite_batches_are_left_out_of_calibration(caplog):
    torch.manual_seed(0)
    m = recnorm.GRU(3, 4, norm="batch", dtype=DT)
    xs = [torch.randn(5, 6, 3, dtype=DT), torch.randn(5, 6, 3, dtype=DT)]
    bad = xs[0].clone()
    bad[:, 0, 0] = float("inf")  # every step of one row
    recnorm.calibrate(m, [xs[1]])
    expected = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    with caplog.at_level("WARNING", logger="recnorm"):
        recnorm.calibrate(m, [bad, xs[1]])
    assert any("time steps 0, 1, 2, 3, 4 of its population-pass call" in r.getMessage() for r in caplog.records)
    for k, v in expected.items():
        torch.testing.assert_close(m.state_dict()[k], v)


def test_training_past_max_steps_warns_once_and_says_how_to_raise_it(caplog):
    import recnorm.nn.norms as norms

    norms._WARNED_MAX_STEPS.discard(4)
    m = recnorm.LSTM(3, 4, norm="batch", norm_kwargs={"max_steps": 4}, num_layers=2)
    with caplog.at_level("WARNING", logger="recnorm"):
        m(torch.randn(4, 5, 3))  # within max_steps: quiet
        assert not caplog.records
        m(torch.randn(7, 5, 3))
        m(torch.randn(9, 5, 3))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "7 steps" in lines[0] and "max_steps=4" in lines[0] and "norm_kwargs={'max_steps': 7}" in lines[0]


def test_calibrate_takes_x_y_batches_of_a_data_loader():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    m = recnorm.LSTM(3, 4, norm="batch", batch_first=True, dtype=DT)
    x, y = torch.randn(12, 5, 3, dtype=DT), torch.randn(12, 4, dtype=DT)
    assert recnorm.calibrate(m, DataLoader(TensorDataset(x, y), batch_size=4)) == 3
    proj = x @ m.weight_ih_l0.T  # (B, T, 4H): every row of the pass, pooled per step
    torch.testing.assert_close(m.norm_ih_l0.running_mean[:5], proj.mean(0))
    torch.testing.assert_close(m.norm_ih_l0.running_var[:5], proj.var(0))


def test_calibrate_says_what_batches_it_needs():
    m = recnorm.LSTM(3, 4, norm="batch")
    with pytest.raises(TypeError, match=r"\(x, y\) from a DataLoader; got a dict.*forward_fn="):
        recnorm.calibrate(m, [{"x": torch.randn(5, 2, 3)}])
    with pytest.raises(TypeError, match=r"got a list of \(list, Tensor\)"):
        recnorm.calibrate(m, [[[1.0], torch.randn(2)]])


def test_running_averages_marks_a_deliberate_evaluation(caplog):
    import recnorm.nn.rnn as rnn

    rnn._WARNED_UNCALIBRATED = False
    m = recnorm.LSTM(3, 4, norm="batch")
    m(torch.randn(5, 2, 3))
    m.eval()
    with caplog.at_level("WARNING", logger="recnorm"):
        with recnorm.diagnostics.running_averages(m):
            m(torch.randn(5, 2, 3))
        assert not caplog.records
        m(torch.randn(5, 2, 3))  # outside the block the warning is armed again
    assert any("lag the weights" in r.getMessage() for r in caplog.records)


def test_the_layers_attribute_reads_match_getattr():
    """rnn._module_attr (the per-call checks' attribute read, without nn.Module.__getattr__'s raised
    AttributeError for an absent name) gives what getattr gives, object for object: a parameter, a buffer, a
    submodule, an instance attribute, a class attribute, a property, a name that a subclass's property
    shadows in the instance dict, and absent names with their default."""
    import recnorm.nn.rnn as rnn

    class Shadow(torch.nn.Module):
        @property
        def carry(self):
            return "from the property"

    m = recnorm.LSTM(3, 4, norm="batch", proj_size=2)
    shadow = Shadow()
    shadow.__dict__["carry"] = "from the instance dict"  # a data descriptor wins over the instance dict
    missing = object()
    cases = [(m, n) for n in ("weight_ih_l0", "weight_hr_l0", "norm_ih_l0", "training", "bias", "_num_directions",
                              "num_batches_tracked", "_updated_since_calibration", "carry", "no_such_name")]
    cases += [(m.norm_ih_l0, n) for n in ("num_batches_tracked", "running_mean", "_updated_since_calibration", "carry",
                                          "training", "eps")]
    cases += [(shadow, "carry"), (torch.nn.LayerNorm(3), "num_batches_tracked")]
    for module, name in cases:
        for default in (None, False, missing):
            assert rnn._module_attr(module, name, default) is getattr(module, name, default), (type(module).__name__, name)
    assert rnn._module_attr(m, "no_such_name", missing) is missing
    assert rnn._module_attr(m.norm_ih_l0, "num_batches_tracked") is m.norm_ih_l0._buffers["num_batches_tracked"]


# ---------------------------------------------------------------------------------------------------
# state_dict round trip
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_state_dict_round_trip(norm, tmp_path):
    torch.manual_seed(0)
    a = recnorm.LSTM(3, 4, 2, bidirectional=True, proj_size=2, norm=norm)
    for _ in range(2):
        a(torch.randn(5, 6, 3))
    a.eval()
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b = recnorm.LSTM(3, 4, 2, bidirectional=True, proj_size=2, norm=norm)
    b.load_state_dict(torch.load(tmp_path / "m.pt"))
    b.eval()
    x = torch.randn(7, 2, 3)
    torch.testing.assert_close(b(x)[0], a(x)[0])


def test_torch_state_dict_loads_into_normalized_layer_non_strict():
    ref = torch.nn.LSTM(3, 4)
    m = recnorm.LSTM(3, 4, norm="layer")
    res = m.load_state_dict(ref.state_dict(), strict=False)
    assert res.unexpected_keys == [] and all(k.startswith("norm_") for k in res.missing_keys)
    torch.testing.assert_close(m.weight_hh_l0, ref.weight_hh_l0)


# ---------------------------------------------------------------------------------------------------
# initial values of the norms
# ---------------------------------------------------------------------------------------------------


def test_batch_norm_gains_start_at_point_one_and_are_configurable():
    m = recnorm.LSTM(3, 4, norm="batch")
    for name in ("norm_ih_l0", "norm_hh_l0", "norm_c_l0"):
        torch.testing.assert_close(getattr(m, name).weight, torch.full_like(getattr(m, name).weight, 0.1))
    assert m.norm_ih_l0.bias is None and m.norm_hh_l0.bias is None  # the cell bias b covers the shift
    torch.testing.assert_close(m.norm_c_l0.bias, torch.zeros(4))
    m = recnorm.LSTM(3, 4, norm="batch", norm_kwargs={"gain_init": 0.5})
    assert float(m.norm_hh_l0.weight[0].detach()) == 0.5
    assert recnorm.norm_options("batch")["max_steps"] == 1000


def _manual_bn_lstm(x, m, eps=1e-5):
    """BN-LSTM written out from Cooijmans et al.'s equations, with plain batch statistics."""

    def bn(v, g, b=None):
        y = (v - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + eps) * g
        return y if b is None else y + b

    h = c = torch.zeros(x.shape[1], m.hidden_size, dtype=x.dtype)
    outs = []
    for t in range(x.shape[0]):
        gates = bn(x[t] @ m.weight_ih_l0.T, m.norm_ih_l0.weight) + m.bias_ih_l0
        gates = gates + bn(h @ m.weight_hh_l0.T, m.norm_hh_l0.weight) + m.bias_hh_l0
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(bn(c, m.norm_c_l0.weight, m.norm_c_l0.bias))
        outs.append(h)
    return torch.stack(outs)


@pytest.mark.parametrize("blank", [0, 3])
def test_bn_lstm_matches_the_paper_equations_including_constant_steps(blank):
    """Against a hand-written BN-LSTM: outputs and parameter gradients agree, with blank leading steps
    too (where dropping the zero-mean gradient of constant features changes no parameter gradient)."""
    torch.manual_seed(0)
    m = recnorm.LSTM(3, 4, dtype=DT, norm="batch")
    with torch.no_grad():
        m.norm_c_l0.bias.uniform_(-0.5, 0.5)
    x = torch.cat([torch.zeros(blank, 6, 3, dtype=DT), torch.randn(5, 6, 3, dtype=DT)])
    w = torch.randn(blank + 5, 6, 4, dtype=DT)
    out = m(x)[0]
    ref = _manual_bn_lstm(x, m)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    g1 = torch.autograd.grad((out * w).sum(), list(m.parameters()))
    g2 = torch.autograd.grad((ref * w).sum(), list(m.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
