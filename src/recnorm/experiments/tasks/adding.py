"""The adding problem (Hochreiter & Schmidhuber, 1997): a generated long-range regression task."""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

import torch
from torch import Tensor

from ._common import RegressionTask, check_batch_size, check_positive_int, check_split, eval_slices
from .base import Batch, register_task

__all__ = ["AddingTask", "AddingVariableTask", "make_adding"]

# Fixed seeds of the evaluation sets, independent of the training seed.
VALID_SEED = 0x5EED_0A11
TEST_SEED = 0x5EED_7E57


def make_adding(n: int, length: int, variable_length: bool, generator: torch.Generator
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw ``n`` adding-problem sequences.

    Returns ``x`` ``(length, n, 2)`` float32 (channel 0: values in [0, 1), channel 1: markers; zero past a
    sequence's length), ``y`` ``(n,)`` float32 (the sum of the two marked values), ``lengths`` ``(n,)``
    int64, and ``markers`` ``(n, 2)`` int64 (the marked positions).

    The first marker is uniform over the first half ``[0, L//2)`` of the valid part, the second over the
    second half ``[L//2, L)``, so the two are distinct and at least one lies in the first half.
    """
    if variable_length:
        lengths = torch.randint(length // 2, length + 1, (n,), generator=generator)
    else:
        lengths = torch.full((n,), length, dtype=torch.int64)
    values = torch.rand(n, length, generator=generator)
    half = lengths // 2
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    first = (u[:, 0] * half).long().clamp(max=half - 1)
    second = (half + (u[:, 1] * (lengths - half)).long()).clamp(max=lengths - 1)
    markers = torch.stack([first, second], dim=1)
    valid = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    values = values * valid
    marks = torch.zeros(n, length)
    marks.scatter_(1, markers, 1.0)
    y = values.gather(1, markers).sum(1)
    x = torch.stack([values, marks], dim=2).transpose(0, 1).contiguous()
    return x, y, lengths, markers


@register_task
class AddingTask(RegressionTask):
    """Adding problem (Hochreiter & Schmidhuber, 1997), generated on the fly.

    Source: generated. Each step has two features: a value drawn uniformly from [0, 1) and a marker in
    {0, 1}; exactly two steps are marked (one in the first half of the sequence, one in the second), and
    the target is the sum of the two marked values, read at the last (valid) step. Regression, metric
    ``"mse"`` (lower is better); the model's first output at the last valid step is the prediction.

    Sizes and splits: ``"train"`` is an endless stream of fresh sequences drawn from a generator seeded
    with ``seed``; ``"valid"`` (``valid_size``, default 1000) and ``"test"`` (``test_size``, default 1000)
    are fixed sets drawn from fixed seeds independent of the training seed.

    Options: ``length`` (T, default 100); ``variable_length`` (default False): when True each sequence's
    length is uniform over ``[length // 2, length]``, the markers lie inside the valid part, inputs are
    zero-padded to the batch's longest sequence and ``lengths`` is set.

    Trivial predictor: always answering 1 (the mean of the target) scores MSE = Var(U1 + U2) = 2/12 ~
    0.167; a model is only learning the task once it beats that clearly (solved: MSE < ~0.01).
    """

    name = "adding"

    def __init__(self, length: int = 100, variable_length: bool = False, valid_size: int = 1000,
                 test_size: int = 1000):
        if not isinstance(variable_length, bool):
            raise ValueError(f"option variable_length must be a bool, got {variable_length!r}")
        check_positive_int("length", length, minimum=4 if variable_length else 2)
        check_positive_int("valid_size", valid_size)
        check_positive_int("test_size", test_size)
        self.options = {"length": length, "variable_length": variable_length, "valid_size": valid_size,
                        "test_size": test_size}
        self.length = length
        self.variable_length = variable_length
        self.input_size = 2
        self.num_outputs = 1
        self.seq_len = length
        self._eval_sets: Dict[str, Tuple[Tensor, Tensor, Tensor]] = {}

    def _batch(self, x: Tensor, y: Tensor, lengths: Tensor) -> Batch:
        if not self.variable_length:
            return Batch(x, y, None)
        T = int(lengths.max())
        return Batch(x[:T].contiguous(), y, lengths)

    def eval_set(self, split: str) -> Tuple[Tensor, Tensor, Tensor]:
        """The whole fixed ``"valid"`` or ``"test"`` set as ``(x (length, N, 2), y (N,), lengths (N,))``."""
        if split not in self._eval_sets:
            seed, n = (VALID_SEED, self.options["valid_size"]) if split == "valid" else \
                (TEST_SEED, self.options["test_size"])
            x, y, lengths, _ = make_adding(n, self.length, self.variable_length,
                                           torch.Generator().manual_seed(seed))
            self._eval_sets[split] = (x, y, lengths)
        return self._eval_sets[split]

    def batches(self, split: str, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        check_split(split)
        check_batch_size(batch_size)
        if split == "train":
            return self._train_stream(batch_size, seed)
        x, y, lengths = self.eval_set(split)
        return (self._batch(x[:, s], y[s], lengths[s]) for s in eval_slices(y.shape[0], batch_size))

    def _train_stream(self, batch_size: int, seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(int(seed))
        while True:
            x, y, lengths, _ = make_adding(batch_size, self.length, self.variable_length, gen)
            yield self._batch(x, y, lengths)


@register_task
class AddingVariableTask(AddingTask):
    """The adding problem with variable-length sequences: :class:`AddingTask` with
    ``variable_length=True`` by default (lengths uniform over ``[length // 2, length]``, zero padding,
    ``lengths`` set). Trivial predictor: MSE ~ 0.167, as for ``"adding"``."""

    name = "adding_variable"

    def __init__(self, length: int = 100, variable_length: bool = True, valid_size: int = 1000,
                 test_size: int = 1000):
        super().__init__(length=length, variable_length=variable_length, valid_size=valid_size,
                         test_size=test_size)
