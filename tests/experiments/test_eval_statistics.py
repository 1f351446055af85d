"""Eval statistics of per-step batch norm (docs/eval_statistics.md), through the public API only.

Training normalizes a feature that is identical across the batch (a *degenerate* feature: a blank pixel's
input term, the cell state before the first informative input) to exactly 0. Eval must do the same where
training always did, instead of dividing the running mean's lag behind the moving weights by sqrt(eps).
And a slot's first update must not be diluted by the initial running statistics (mean 0, variance 1).

Four tests failed before the rule of docs/eval_statistics.md (R1 and R2) was implemented; two are
controls that passed before and must keep passing. The measurements behind the rule are re-run on the engine
by the ``eval_statistics`` study (tests/experiments/test_studies.py runs its smoke sweep end to end).

Data: a slice of the sequential 8x8 digits (T = 64, one pixel per step). Pixel 0 (the top-left corner)
is blank in every image, so at step 0 the input term is exactly 0 and the cell state c_0 (from the gate
biases alone) is the same for every example: the cell site's features at step 0 are degenerate in every
training batch.
"""

from __future__ import annotations

import copy
from typing import Tuple

import pytest
import torch
from torch import Tensor, nn

import recnorm
from recnorm.experiments.tasks import create_task


HIDDEN = 32
BATCH = 64


class Net(nn.Module):
    """BN-LSTM over the pixels, a linear head on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = recnorm.LSTM(1, HIDDEN, norm="batch")
        self.head = nn.Linear(HIDDEN, 10)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        out, _ = self.rnn(x)  # (T, B, H)
        return self.head(out[-1]), out


@pytest.fixture(scope="module")
def digits():
    task = create_task("digits", train_size=640, valid_size=128, test_size=8)
    train = task.batches("train", BATCH, seed=0)
    batches = [next(train) for _ in range(10)]
    valid = next(iter(task.batches("valid", 128)))
    assert bool((valid.x[0] == 0).all()) and all(bool((b.x[0] == 0).all()) for b in batches), "pixel 0 is blank"
    return batches, valid


@pytest.fixture(scope="module")
def trained(digits):
    """A BN-LSTM after 60 Adam steps: the weights have moved, as they do during any training run."""
    batches, _ = digits
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(60):
        batch = batches[step % len(batches)]
        loss = nn.functional.cross_entropy(net(batch.x)[0], batch.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def step0_outputs(net: Net, x: Tensor, train: bool) -> Tensor:
    """h_0 of every example, in training mode (batch statistics) or eval mode, on a copy of ``net``."""
    net = copy.deepcopy(net).train(train)
    with torch.no_grad():
        return net(x)[1][0]


def test_training_normalizes_the_constant_cell_state_to_zero(trained, digits):
    # Control: at step 0 every example has the same c_0, so training gives every example the same h_0.
    _, valid = digits
    h0 = step0_outputs(trained, valid.x, train=True)
    torch.testing.assert_close(h0, h0[:1].expand_as(h0), rtol=0, atol=0)


def test_exact_statistics_reproduce_training_at_constant_features(trained, digits):
    # Control: with exactly recomputed statistics, eval gives h_0 what training gives it (today, too).
    batches, valid = digits
    net = copy.deepcopy(trained)
    recnorm.recompute_population_statistics(net, [b.x for b in batches[:4]])
    torch.testing.assert_close(step0_outputs(net, valid.x, train=False), step0_outputs(trained, valid.x, train=True),
                               rtol=0, atol=1e-4)


def test_running_statistics_reproduce_training_at_constant_features(trained, digits):
    # Today: eval normalizes c_0 by (c_0 - running mean) / sqrt(running var + eps); the running variance is
    # ~0 and the running mean lags the moving gate biases, so h_0 gets several standard deviations of
    # garbage. The rule: a feature whose running statistics are degenerate normalizes to 0, as in training.
    _, valid = digits
    torch.testing.assert_close(step0_outputs(trained, valid.x, train=False), step0_outputs(trained, valid.x, train=True),
                               rtol=0, atol=1e-4)


def test_running_and_exact_statistics_agree_at_constant_features(trained, digits):
    batches, valid = digits
    net = copy.deepcopy(trained)
    recnorm.recompute_population_statistics(net, [b.x for b in batches[:4]])
    torch.testing.assert_close(step0_outputs(trained, valid.x, train=False), step0_outputs(net, valid.x, train=False),
                               rtol=0, atol=1e-4)


def test_an_input_that_was_constant_in_training_does_not_reach_eval(trained, digits):
    # Pixel 0 was 0 in every training image: training normalized its input term to exactly 0 and the model
    # never saw it. Today, eval divides a nonzero pixel 0 by sqrt(running var + eps), a variance that only
    # decays from its initial 1, and changes the prediction. The rule: its running variance is exactly 0
    # (a slot's first update replaces the initial values), so eval gives it 0 as training did.
    _, valid = digits
    net = copy.deepcopy(trained).eval()
    poked = valid.x.clone()
    poked[0] = 1.0
    with torch.no_grad():
        torch.testing.assert_close(net(poked)[0], net(valid.x)[0], rtol=0, atol=1e-5)


def test_first_update_is_not_diluted_by_initial_statistics(digits):
    # One step (T = 1) with all 64 pixels of each image as its input, so nothing compounds through time:
    # one training-mode forward, then eval on the same batch. When a slot's first update takes the batch's
    # statistics whole, eval normalizes with them (the variance unbiased: a factor 64/63) and gives what
    # training gave. Today the slot holds 0.9 * (mean 0, var 1) + 0.1 * the batch's statistics.
    batches, _ = digits
    x = batches[0].x.permute(2, 1, 0)  # (1, B, 64)
    torch.manual_seed(0)
    rnn = recnorm.LSTM(64, HIDDEN, norm="batch")
    with torch.no_grad():
        h_train = rnn.train()(x)[0]
        h_eval = rnn.eval()(x)[0]
    # with the rule: about 0.015 (the 64/63); today: about 1
    assert float((h_eval - h_train).abs().max() / h_train.abs().max()) < 0.1
