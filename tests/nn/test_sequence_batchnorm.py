"""recnorm.SequenceBatchNorm (masked batch norm over valid positions) and between_layers="batch"."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import recnorm

DT = torch.float64
LENGTHS = torch.tensor([6, 2, 4])


def _padded(F=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, F, generator=g, dtype=DT) * 2 + 1
    x[2:, 1] = 1e3  # padding far off: it must not reach the statistics
    x[4:, 2] = -1e3
    return x


def _valid_rows(x, lengths):
    return torch.cat([x[: int(n), b] for b, n in enumerate(lengths)])


def test_training_statistics_are_those_of_the_valid_positions():
    x = _padded()
    bn = recnorm.SequenceBatchNorm(5, dtype=DT)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    y = bn(x, lengths=LENGTHS)
    v = _valid_rows(x, LENGTHS)  # 12 rows
    mean, var = v.mean(0), v.var(0, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * bn.weight + bn.bias
    mask = torch.arange(6)[:, None] < LENGTHS[None]
    torch.testing.assert_close(y[mask], expected[mask], rtol=1e-12, atol=1e-12)
    # the first update replaces the initial (0, 1) (rule R1); the variance is unbiased
    torch.testing.assert_close(bn.running_mean[0], mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var[0], v.var(0, unbiased=True), rtol=1e-12, atol=1e-12)
    # the same as torch.nn.BatchNorm1d on the valid rows alone
    ref = torch.nn.BatchNorm1d(5, dtype=DT)
    with torch.no_grad():
        ref.weight.copy_(bn.weight)
        ref.bias.copy_(bn.bias)
    torch.testing.assert_close(_valid_rows(y, LENGTHS), ref(v), rtol=1e-12, atol=1e-12)


def test_batch_first_packed_and_eval_forms():
    x = _padded()
    bn = recnorm.SequenceBatchNorm(5, dtype=DT)
    y = bn(x, lengths=LENGTHS)
    bn_bf = recnorm.SequenceBatchNorm(5, batch_first=True, dtype=DT)
    y_bf = bn_bf(x.transpose(0, 1), lengths=LENGTHS)
    assert y_bf.shape == (3, 6, 5)
    torch.testing.assert_close(y_bf.transpose(0, 1), y, rtol=1e-12, atol=1e-10)
    bn_p = recnorm.SequenceBatchNorm(5, dtype=DT)
    p = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    yp = bn_p(p)
    assert isinstance(yp, PackedSequence) and torch.equal(yp.batch_sizes, p.batch_sizes)
    assert torch.equal(yp.sorted_indices, p.sorted_indices)
    mask = torch.arange(6)[:, None] < LENGTHS[None]
    torch.testing.assert_close(pad_packed_sequence(yp)[0][mask], y[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn_p.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    # eval: the running statistics
    bn.eval()
    ye = bn(x, lengths=LENGTHS)
    torch.testing.assert_close(ye, (x - bn.running_mean[0]) / torch.sqrt(bn.running_var[0] + 1e-5), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="lengths"):
        bn(x, lengths=torch.tensor([7, 1, 1]))
    with pytest.raises(ValueError, match="features"):
        bn(torch.randn(6, 3, 4, dtype=DT), lengths=LENGTHS)


def test_affine_false_low_precision_and_calibrate():
    bn = recnorm.SequenceBatchNorm(5, affine=False, momentum=0.5)
    assert dict(bn.named_parameters()) == {}
    x = _padded().float()
    y16 = bn(x.bfloat16(), lengths=LENGTHS)
    assert y16.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    ref = recnorm.SequenceBatchNorm(5, affine=False)(x, lengths=LENGTHS)
    mask = torch.arange(6)[:, None] < LENGTHS[None]
    torch.testing.assert_close(y16.float()[mask], ref[mask], rtol=2e-2, atol=2e-2)
    # recnorm.calibrate stores the exact statistics of every valid position it saw
    model = torch.nn.Sequential(recnorm.SequenceBatchNorm(5, dtype=DT))
    batches = [pack_padded_sequence(_padded(seed=s), LENGTHS, enforce_sorted=False) for s in range(3)]
    recnorm.calibrate(model, batches, lambda m, b: m(b))  # a PackedSequence is a tuple: pass it whole
    rows = torch.cat([_valid_rows(_padded(seed=s), LENGTHS) for s in range(3)])
    torch.testing.assert_close(model[0].running_mean[0], rows.mean(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model[0].running_var[0], rows.var(0), rtol=1e-10, atol=1e-10)
    assert recnorm.SequenceBatchNorm(5, sync=True).sync


@pytest.mark.parametrize("bidir", [False, True])
def test_between_layers_is_sequence_batch_norm_between_the_layers(bidir):
    torch.manual_seed(0)
    m = recnorm.LSTM(3, 4, num_layers=2, bidirectional=bidir, norm="layer", between_layers="batch", dtype=DT)
    D = 2 if bidir else 1
    assert isinstance(m.norm_between_l0, recnorm.SequenceBatchNorm) and m.norm_between_l0.num_features == 4 * D
    assert not hasattr(m, "norm_between_l1")
    first = recnorm.LSTM(3, 4, bidirectional=bidir, norm="layer", dtype=DT)
    second = recnorm.LSTM(4 * D, 4, bidirectional=bidir, norm="layer", dtype=DT)
    bn = recnorm.SequenceBatchNorm(4 * D, dtype=DT)
    sd = m.state_dict()
    for part, layer in ((first, "l0"), (second, "l1")):
        part.load_state_dict({k.replace(layer, "l0"): v for k, v in sd.items() if layer in k and "between" not in k})
    x = torch.randn(6, 3, 3, dtype=DT)
    p = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    out = m(p)[0]
    expected = second(bn(first(p)[0]))[0]
    torch.testing.assert_close(out.data, expected.data, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.norm_between_l0.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="num_layers >= 2"):
        recnorm.LSTM(3, 4, between_layers="batch")
    with pytest.raises(ValueError, match="between_layers"):
        recnorm.GRU(3, 4, num_layers=2, between_layers="layer")


def test_packed_rows_match_batchnorm1d_gradcheck_and_keep_only_x_for_backward():
    """Rows that are all valid (a PackedSequence, a full batch) run as one autograd node: the values and
    gradients of BatchNorm1d, gradcheck in float64, a constant feature normalizing to its shift with no
    gradient, and nothing of size (N, F) kept for backward but x itself."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(12, 5, generator=g, dtype=DT) * 2 + 1).requires_grad_(True)
    bn = recnorm.SequenceBatchNorm(5, dtype=DT)
    ref = torch.nn.BatchNorm1d(5, dtype=DT)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(generator=g)
        ref.weight.copy_(bn.weight)
        ref.bias.copy_(bn.bias)
    c = torch.randn(12, 5, generator=g, dtype=DT)
    got = [bn(x)]
    got += torch.autograd.grad((got[0] * c).sum(), [x, bn.weight, bn.bias])
    want = [ref(x)]
    want += torch.autograd.grad((want[0] * c).sum(), [x, ref.weight, ref.bias])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    w, b = bn.weight.detach().clone().requires_grad_(True), bn.bias.detach().clone().requires_grad_(True)

    def f(x, w, b):
        m = recnorm.SequenceBatchNorm(5, dtype=DT)
        m.weight, m.bias = torch.nn.Parameter(w), torch.nn.Parameter(b)
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    const = x.detach().clone()
    const[:, 2] = 0.7
    const.requires_grad_(True)
    y = bn(const)
    torch.testing.assert_close(y[:, 2], bn.bias[2].expand(12).detach(), rtol=0, atol=0)
    (dx,) = torch.autograd.grad((y * c).sum(), [const])
    assert torch.equal(dx[:, 2], torch.zeros(12, dtype=DT))
    big = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (big.append(t.numel() >= 12 * 5), t)[1], lambda t: t):
        bn(x)
    assert sum(big) == 1, big  # x alone
