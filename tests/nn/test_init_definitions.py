"""The init schemes the init study compares, checked against their definitions on large blocks: torch's
default U(-1/sqrt(H), 1/sqrt(H)) times the gain, Glorot (Xavier) uniform U(-a, a) with
a = g sqrt(6 / (fan_in + fan_out)) per gate block, and N(0, g^2 / fan_in) (on W_hh: N(0, g^2 / H))."""

from __future__ import annotations

import math

import pytest
import torch

import recnorm

H, I, GAIN = 256, 96, 2.5


def _layer():
    torch.manual_seed(0)
    return recnorm.LSTM(I, H)


@pytest.mark.parametrize("name", ["weight_ih_l0", "weight_hh_l0"])
def test_glorot_uniform_per_gate_block(name):
    m = _layer()
    recnorm.init.initialize(m, "xavier", gain=GAIN)
    w = getattr(m, name).detach()
    fan_in = w.shape[1]
    bound = GAIN * math.sqrt(6.0 / (fan_in + H))  # each gate block is (H, fan_in)
    for block in w.split(H, 0):
        assert block.abs().max() <= bound and block.abs().max() > 0.98 * bound
        assert block.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.03)  # uniform: a / sqrt(3)
        assert abs(block.mean().item()) < 0.02 * bound


@pytest.mark.parametrize("name, fan_in", [("weight_ih_l0", I), ("weight_hh_l0", H)])
def test_scaled_normal_is_n0_g2_over_fan_in(name, fan_in):
    m = _layer()
    recnorm.init.initialize(m, "normal", gain=GAIN)
    w = getattr(m, name).detach()
    for block in w.split(H, 0):
        assert block.std().item() == pytest.approx(GAIN / math.sqrt(fan_in), rel=0.03)
        kurtosis = ((block - block.mean()) ** 4).mean() / block.var() ** 2
        assert kurtosis.item() == pytest.approx(3.0, abs=0.15)  # normal, not uniform (1.8)


def test_torch_default_uniform_times_gain():
    m = _layer()
    recnorm.init.initialize(m, "default", gain=GAIN)
    w = m.weight_hh_l0.detach()
    bound = GAIN / math.sqrt(H)
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.02)
    assert m.bias_hh_l0.detach().abs().max() <= 1 / math.sqrt(H)  # biases: torch's uniform, not scaled
