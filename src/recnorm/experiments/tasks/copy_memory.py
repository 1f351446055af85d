"""The copy-memory task (Hochreiter & Schmidhuber, 1997; Arjovsky et al., 2016): recall symbols
after a long delay."""

from __future__ import annotations

import math
from typing import Dict, Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (_check_outputs, check_batch_size, check_positive_int, check_split, eval_slices,
                      per_step_cross_entropy)
from .base import Batch, Task, register_task

__all__ = ["CopyTask", "make_copy"]

VALID_SEED = 0xC0B1_0A11
TEST_SEED = 0xC0B1_7E57


def make_copy(n: int, num_symbols: int, copy_len: int, delay: int, generator: torch.Generator
              ) -> Tuple[Tensor, Tensor]:
    """Draw ``n`` copy-task sequences as time-major token ids.

    Token ids: ``0 .. num_symbols - 1`` are the symbols, ``num_symbols`` is the blank and
    ``num_symbols + 1`` the delimiter. Returns ``tokens`` ``(T, n)`` and ``targets`` ``(T, n)``, both int64,
    with ``T = copy_len + delay + 1 + copy_len``.
    """
    blank, delim = num_symbols, num_symbols + 1
    T = 2 * copy_len + delay + 1
    symbols = torch.randint(0, num_symbols, (copy_len, n), generator=generator)
    tokens = torch.full((T, n), blank, dtype=torch.int64)
    tokens[:copy_len] = symbols
    tokens[copy_len + delay] = delim
    targets = torch.full((T, n), blank, dtype=torch.int64)
    targets[T - copy_len:] = symbols
    return tokens, targets


@register_task
class CopyTask(Task):
    """Copy-memory task, generated on the fly.

    Source: generated. Input: ``copy_len`` (10) random symbols from an alphabet of ``num_symbols`` (8),
    then ``delay`` (default 50) blanks, a delimiter, and ``copy_len`` blanks: ``T = 2 * copy_len + delay
    + 1`` (71 by default). Target at every step: the blank, except the last ``copy_len`` steps, which must
    reproduce the first ``copy_len`` symbols in order.

    Encoding: inputs are float one-hot features (``input_size = num_symbols + 2``: symbols, blank,
    delimiter), so no embedding is needed; ``vocab_size`` is None. Outputs are logits over
    ``num_symbols + 1`` classes (symbols, then the blank at index ``num_symbols``); targets ``y`` are
    ``(T, B)`` int64 class ids.

    Loss: cross-entropy averaged over all ``T`` steps, as usual in the literature. Metric ``"accuracy"``:
    exact matches on the ``copy_len`` recall steps only (higher is better); ``"loss"`` is also reported.

    Sizes and splits: ``"train"`` is an endless stream drawn from a generator seeded with ``seed``;
    ``"valid"``/``"test"`` are fixed sets of ``valid_size``/``test_size`` (1000 each) from fixed seeds.

    Trivial predictor (memoryless): blank everywhere, uniform over the symbols on the recall steps, gives
    loss ``copy_len * ln(num_symbols) / T`` = 10 ln 8 / 71 ~ 0.293 nats by default, and recall accuracy
    ``1 / num_symbols`` = 0.125.
    """

    name = "copy"
    kind = "per_step"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, delay: int = 50, num_symbols: int = 8, copy_len: int = 10, valid_size: int = 1000,
                 test_size: int = 1000):
        check_positive_int("delay", delay, minimum=0)
        check_positive_int("num_symbols", num_symbols, minimum=2)
        check_positive_int("copy_len", copy_len)
        check_positive_int("valid_size", valid_size)
        check_positive_int("test_size", test_size)
        self.options = {"delay": delay, "num_symbols": num_symbols, "copy_len": copy_len,
                        "valid_size": valid_size, "test_size": test_size}
        self.delay, self.num_symbols, self.copy_len = delay, num_symbols, copy_len
        self.input_size = num_symbols + 2
        self.num_outputs = num_symbols + 1
        self.seq_len = 2 * copy_len + delay + 1
        self._eval_sets: Dict[str, Tuple[Tensor, Tensor]] = {}

    @property
    def baseline_loss(self) -> float:
        """Cross-entropy (nats per step) of the memoryless predictor."""
        return self.copy_len * math.log(self.num_symbols) / self.seq_len

    def _batch(self, tokens: Tensor, targets: Tensor) -> Batch:
        x = F.one_hot(tokens, self.input_size).to(torch.float32)
        return Batch(x, targets, None)

    def eval_set(self, split: str) -> Tuple[Tensor, Tensor]:
        """The whole fixed ``"valid"`` or ``"test"`` set as ``(tokens (T, N), targets (T, N))``."""
        if split not in self._eval_sets:
            seed, n = (VALID_SEED, self.options["valid_size"]) if split == "valid" else \
                (TEST_SEED, self.options["test_size"])
            self._eval_sets[split] = make_copy(n, self.num_symbols, self.copy_len, self.delay,
                                               torch.Generator().manual_seed(seed))
        return self._eval_sets[split]

    def batches(self, split: str, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        check_split(split)
        check_batch_size(batch_size)
        if split == "train":
            return self._train_stream(batch_size, seed)
        tokens, targets = self.eval_set(split)
        return (self._batch(tokens[:, s], targets[:, s]) for s in eval_slices(tokens.shape[1], batch_size))

    def _train_stream(self, batch_size: int, seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(int(seed))
        while True:
            yield self._batch(*make_copy(batch_size, self.num_symbols, self.copy_len, self.delay, gen))

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        _check_outputs(outputs, batch, self.num_outputs)
        ce, _ = per_step_cross_entropy(outputs, batch)
        return ce.mean()

    @torch.no_grad()
    def metrics(self, outputs: Tensor, batch: Batch) -> Dict[str, Tuple[float, float]]:
        _check_outputs(outputs, batch, self.num_outputs)
        ce, _ = per_step_cross_entropy(outputs, batch)
        recall = slice(outputs.shape[0] - self.copy_len, outputs.shape[0])
        pred = outputs[recall].argmax(-1)
        correct = (pred == batch.y[recall].to(pred.device)).sum().item()
        return {"accuracy": (float(correct), float(pred.numel())), "loss": (ce.sum().item(), float(ce.numel()))}
