"""The running-statistics update of recurrent batch norm in C++ (``fused.running_stats_update``,
csrc/running_stats.h) equals its reference in tensor operations (``RecurrentBatchNorm._update_reference``)
bit for bit: slots of their own and the shared last slot, momentum or a cumulative average, steps with fewer
than two rows, non-finite moments, float32 and float64, over a sequence of calls; it declines what it does not
serve, and record() picks it where it serves."""

import itertools
import logging

import pytest
import torch

import recnorm
from recnorm.kernels import fused
from recnorm.kernels.contract import BatchMoments
from recnorm.nn.norms import RecurrentBatchNorm


@pytest.fixture(scope="module", autouse=True)
def extension():
    # The C++ path serves only once an extension is loaded (record never builds one): load it here.
    assert fused.load_extension("lstm") is not None


def _bits(t):
    return t.view({8: torch.int64, 4: torch.int32}[t.element_size()]) if t.is_floating_point() else t


def _assert_same(a, b):
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(_bits(x), _bits(y)), (name, (x - y).abs().max() if x.is_floating_point() else (x != y).sum())


def _moments(K, F, dtype, start=0, counts=None, seed=0, descending=False, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    steps = torch.arange(start, start + K)
    if descending:
        steps = steps.flip(0)
    mean = (torch.randn(K, F, generator=g, dtype=torch.float64) * scale).to(dtype)
    var = (torch.rand(K, F, generator=g, dtype=torch.float64) * scale + 0.01).to(dtype)
    count = torch.tensor(counts) if counts is not None else torch.randint(2, 40, (K,), generator=g)
    return BatchMoments(steps=steps, mean=mean, var=var, count=count)


def _pair(F, max_steps, momentum, dtype):
    a = RecurrentBatchNorm(F, max_steps=max_steps, momentum=momentum, dtype=dtype)
    b = RecurrentBatchNorm(F, max_steps=max_steps, momentum=momentum, dtype=dtype)
    return a, b


def _both(a, b, m):
    """a: the C++ update; b: the reference."""
    done = fused.running_stats_update(a.running_mean, a.running_var, a.num_batches_tracked, m, a.momentum)
    assert done is not None
    b._update_reference(m, b._finite_steps(m))
    _assert_same(a, b)
    return done


@pytest.mark.parametrize("dtype,momentum,max_steps,K,start", [
    pytest.param(dt, mom, S, K, start, id=f"{str(dt)[6:]}-m{mom}-S{S}-K{K}-from{start}")
    for dt, mom, (S, K, start) in itertools.product(
        [torch.float32, torch.float64], [None, 0.1, 0.5],
        [(1, 28, 0), (1, 1, 0), (5, 9, 0), (5, 9, 3), (6, 2, 4), (40, 28, 0), (40, 28, 20), (3, 1, 7)])
])  # fmt: skip
def test_the_update_equals_the_reference_bit_for_bit(dtype, momentum, max_steps, K, start):
    F = 37
    a, b = _pair(F, max_steps, momentum, dtype)
    for call in range(4):  # a sequence of calls: slots already tracked weigh the next update
        _both(a, b, _moments(K, F, dtype, start=start + call % 2, seed=call))


@pytest.mark.parametrize("max_steps", [1, 4, 20])
def test_steps_without_information_and_non_finite_moments_are_left_out_alike(max_steps, caplog):
    F, K = 11, 8
    a, b = _pair(F, max_steps, 0.1, torch.float32)
    _both(a, b, _moments(K, F, torch.float32, seed=1))
    m = _moments(K, F, torch.float32, counts=[5, 1, 7, 0, 9, 3, 2, 8], seed=2)
    m.mean[2, 4] = float("nan")
    m.var[5, 0] = float("inf")
    finite, bad = _both(a, b, m)
    assert bad == 2 and finite.tolist() == [True, True, False, True, True, False, True, True]
    # through record(): the same warning as the reference's, naming the steps
    c = RecurrentBatchNorm(F, max_steps=max_steps, momentum=0.1)
    with caplog.at_level(logging.WARNING, logger="recnorm"):
        c.record(m)
    assert "non-finite batch statistics" in caplog.text and "steps 2, 5" in caplog.text


def test_moments_that_are_views_of_wider_rows_as_the_kernels_return_them():
    F, K = 13, 10
    for S in (1, 4, 30):
        a, b = _pair(F, S, 0.1, torch.float32)
        for call in range(3):
            wide = _moments(K, 3 * F, torch.float32, seed=call)
            m = BatchMoments(steps=wide.steps, mean=wide.mean[:, F:2 * F], var=wide.var[:, 2 * F:], count=wide.count)
            assert not m.mean.is_contiguous()
            _both(a, b, m)


def test_steps_in_reverse_order_as_a_backward_direction_records_them():
    F = 9
    for S in (3, 30):
        a, b = _pair(F, S, 0.2, torch.float64)
        for call in range(3):
            _both(a, b, _moments(12, F, torch.float64, seed=call, descending=True))


def test_it_declines_what_it_does_not_serve_and_changes_nothing():
    F = 5
    a = RecurrentBatchNorm(F, max_steps=10)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    twice = BatchMoments(steps=torch.tensor([2, 2]), mean=torch.zeros(2, F), var=torch.ones(2, F), count=torch.tensor([4, 4]))
    assert fused.running_stats_update(a.running_mean, a.running_var, a.num_batches_tracked, twice, None) is None
    half = _moments(3, F, torch.float32)
    half = BatchMoments(steps=half.steps, mean=half.mean.half(), var=half.var.half(), count=half.count)
    assert fused.running_stats_update(a.running_mean, a.running_var, a.num_batches_tracked, half, None) is None
    strided = _moments(3, 2 * F, torch.float32)
    strided = BatchMoments(steps=strided.steps, mean=strided.mean[:, ::2], var=strided.var[:, ::2], count=strided.count)
    assert fused.running_stats_update(a.running_mean, a.running_var, a.num_batches_tracked, strided, None) is None
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k]), k
    # record() then runs the reference, whose result it is
    b = RecurrentBatchNorm(F, max_steps=10)
    a.record(twice)
    b._update_reference(twice, b._finite_steps(twice))
    _assert_same(a, b)


def test_the_update_bumps_the_buffers_versions():
    a = RecurrentBatchNorm(4, max_steps=3)
    versions = [a.running_mean._version, a.running_var._version, a.num_batches_tracked._version]
    fused.running_stats_update(a.running_mean, a.running_var, a.num_batches_tracked, _moments(5, 4, torch.float32), 0.1)
    assert [a.running_mean._version, a.running_var._version, a.num_batches_tracked._version] == [v + 1 for v in versions]


@pytest.mark.parametrize("cell,norm", [("LSTM", "batch"), ("GRU", "shared_batch"), ("RNN", "batch")])
def test_a_training_layer_records_through_it_with_the_reference_s_result(cell, norm, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(30, 6, 4)
    fast = getattr(recnorm, cell)(4, 7, norm=norm).train()
    slow = getattr(recnorm, cell)(4, 7, norm=norm).train()
    slow.load_state_dict(fast.state_dict())
    served = []
    real = fused.running_stats_update

    def spy(*args):
        done = real(*args)
        served.append(done is not None)
        return done

    monkeypatch.setattr(fused, "running_stats_update", spy)
    for _ in range(3):
        fast(x)
    assert served and all(served), "record() did not use the C++ update"
    monkeypatch.setattr(fused, "running_stats_update", lambda *a: None)  # the reference only
    for _ in range(3):
        slow(x)
    for (k, v), (k2, w) in zip(fast.state_dict().items(), slow.state_dict().items()):
        assert k == k2 and torch.equal(_bits(v), _bits(w)), k


def test_a_traced_training_layer_still_updates_its_running_statistics():
    # torch.jit.trace records tensor operations only: under it the reference runs, so the traced module's graph
    # holds the update, and running it moves the statistics as the eager layer does.
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4)
    eager = recnorm.LSTM(4, 6, norm="batch").train()
    traced_src = recnorm.LSTM(4, 6, norm="batch").train()
    traced_src.load_state_dict(eager.state_dict())
    traced = torch.jit.trace(traced_src, (x,), check_trace=False)
    traced_src.load_state_dict(eager.state_dict())  # tracing ran one call: start both from the same statistics
    for _ in range(3):
        eager(x)
        traced(x)
    moved = 0
    for (k, v), (k2, w) in zip(eager.named_buffers(), traced.named_buffers()):
        assert k == k2
        assert torch.allclose(v.double(), w.double(), atol=1e-6), k
        moved += "num_batches" in k and int(v.sum()) > 0
    assert moved


@pytest.mark.parametrize("cls", [recnorm.LSTM, recnorm.GRU, recnorm.RNN])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_moments_name_their_steps_and_last_step(cls, packed):
    """The fused kernels' moments: steps ``offset .. offset + T - 1``, ``last_step`` their largest (which
    record() reads instead of the tensor), each site's mean and variance the columns of the kernel's output."""
    torch.manual_seed(0)
    layer = cls(3, 4, norm="batch")
    T, B, offset = 5, 3, 7
    x = torch.randn(T, B, 3)
    batch_sizes = torch.tensor([3, 3, 2, 2, 1]) if packed else None
    if packed:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 4, 2], enforce_sorted=True).data
    work = layer.direction_work(0, 0, x=x).replace(step_offset=offset)
    state = tuple(torch.zeros(B, 4) for _ in range(layer.cell.state_size))
    res = fused.run_direction(work, x, batch_sizes, state)
    assert set(res.moments) == ({"ih", "hh", "cell"} if cls is recnorm.LSTM else {"ih", "hh"})
    for site, m in res.moments.items():
        assert torch.equal(m.steps, torch.arange(offset, offset + T))
        assert m.last_step == int(m.steps.max()) == offset + T - 1
        width = 4 if site == "cell" else work.weight_hh.shape[0]
        assert m.mean.shape == m.var.shape == (T, width)
        assert torch.equal(m.count, batch_sizes if packed else torch.full((T,), B))
    # the moments are the batch statistics of each term: the input term's, by hand, per step
    rows = x.view(T, B, 3) if not packed else None
    if rows is not None:
        proj = rows @ work.weight_ih.T
        torch.testing.assert_close(res.moments["ih"].mean, proj.mean(1))
        torch.testing.assert_close(res.moments["ih"].var, proj.var(1, unbiased=False))
