"""Shared pieces of the built-in tasks: split/batch helpers, losses and metrics by task kind.

Conventions kept by every built-in task (see :mod:`recnorm.experiments.tasks.base` for the contract):

* batches are time-major; when a batch carries ``lengths``, its time dimension equals ``max(lengths)``
  so that a packed-and-unpacked model output has the same ``T`` as the batch;
* sequence-level tasks read each sequence's last valid step (``lengths - 1``, or ``T - 1``);
* metrics are ``{name: (sum, count)}`` with python floats, so evaluation passes pool batches exactly.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Batch, Task

SPLITS = ("train", "valid", "test")
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------
# option and argument checks


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def check_positive_int(name: str, value, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"option {name} must be an int >= {minimum}{' or None' if allow_none else ''}, "
                         f"got {value!r}")


def take(n_available: int, size: Optional[int], name: str) -> int:
    """Number of items a subset option ``size`` keeps out of ``n_available`` (None: all)."""
    if size is None:
        return n_available
    check_positive_int(name, size)
    if size > n_available:
        raise ValueError(f"option {name}={size} exceeds the {n_available} examples available")
    return size


# --------------------------------------------------------------------------------------------------
# index streams


def train_index_stream(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless stream of index batches over ``range(n)``.

    Each epoch is a fresh permutation drawn from a ``torch.Generator`` seeded with ``seed``; epochs are
    concatenated so every batch is full (also when ``batch_size > n``) and every example is seen once per
    epoch. The same ``(n, batch_size, seed)`` always gives the same stream.
    """
    if n < 1:
        raise ValueError("cannot stream an empty training split")
    gen = torch.Generator().manual_seed(int(seed))
    buffer = torch.empty(0, dtype=torch.int64)
    while True:
        while buffer.numel() < batch_size:
            buffer = torch.cat([buffer, torch.randperm(n, generator=gen)])
        idx, buffer = buffer[:batch_size], buffer[batch_size:]
        yield idx


def eval_slices(n: int, batch_size: int) -> Iterator[slice]:
    """One ordered pass over ``range(n)`` in slices of ``batch_size`` (the last may be smaller)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


# --------------------------------------------------------------------------------------------------
# losses and metrics by kind


def _check_outputs(outputs: Tensor, batch: Batch, num_outputs: int) -> None:
    if outputs.dim() != 3 or outputs.shape[0] != batch.x.shape[0] or outputs.shape[1] != batch.x.shape[1]:
        raise ValueError(f"outputs must be (T, B, num_outputs) = ({batch.x.shape[0]}, {batch.x.shape[1]}, "
                         f"{num_outputs}), got {tuple(outputs.shape)}")
    if outputs.shape[2] != num_outputs:
        raise ValueError(f"outputs have {outputs.shape[2]} features per step, the task needs {num_outputs}")


def last_step(outputs: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """``(B, C)`` outputs at each sequence's last valid step."""
    if lengths is None:
        return outputs[-1]
    idx = (lengths.to(device=outputs.device, dtype=torch.long) - 1).clamp_min(0)
    return outputs[idx, torch.arange(outputs.shape[1], device=outputs.device)]


def step_mask(lengths: Optional[Tensor], T: int, B: int, device) -> Optional[Tensor]:
    """``(T, B)`` bool mask of valid steps, or None when every step is valid."""
    if lengths is None:
        return None
    return torch.arange(T, device=device).unsqueeze(1) < lengths.to(device).unsqueeze(0)


class ClassificationTask(Task):
    """One class label per sequence, read at the last valid step; cross-entropy loss, accuracy metric."""

    kind = "classification"
    metric = "accuracy"
    higher_is_better = True

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        _check_outputs(outputs, batch, self.num_outputs)
        logits = last_step(outputs, batch.lengths)
        return F.cross_entropy(logits.float(), batch.y.to(logits.device))

    @torch.no_grad()
    def metrics(self, outputs: Tensor, batch: Batch) -> Dict[str, Tuple[float, float]]:
        _check_outputs(outputs, batch, self.num_outputs)
        logits = last_step(outputs, batch.lengths).float()
        y = batch.y.to(logits.device)
        n = float(y.numel())
        ce = F.cross_entropy(logits, y, reduction="sum").item()
        correct = (logits.argmax(-1) == y).sum().item()
        return {"accuracy": (float(correct), n), "loss": (ce, n)}


class RegressionTask(Task):
    """One real target per sequence: MSE between the first output at the last valid step and ``y``."""

    kind = "regression"
    metric = "mse"
    higher_is_better = False

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        _check_outputs(outputs, batch, self.num_outputs)
        pred = last_step(outputs, batch.lengths)[:, 0]
        return F.mse_loss(pred.float(), batch.y.to(pred.device, torch.float32))

    @torch.no_grad()
    def metrics(self, outputs: Tensor, batch: Batch) -> Dict[str, Tuple[float, float]]:
        _check_outputs(outputs, batch, self.num_outputs)
        pred = last_step(outputs, batch.lengths)[:, 0].float()
        sse = (pred - batch.y.to(pred.device, torch.float32)).pow(2).sum().item()
        n = float(batch.y.numel())
        return {"mse": (sse, n), "loss": (sse, n)}


def per_step_cross_entropy(outputs: Tensor, batch: Batch) -> Tuple[Tensor, Optional[Tensor]]:
    """``(T, B)`` cross-entropy (nats) at every step, and the valid-step mask (None: all valid)."""
    T, B, C = outputs.shape
    y = batch.y.to(outputs.device)
    if y.shape != (T, B):
        raise ValueError(f"per-step targets must be (T, B) = ({T}, {B}), got {tuple(y.shape)}")
    mask = step_mask(batch.lengths, T, B, outputs.device)
    if mask is not None:
        y = y.masked_fill(~mask, 0)  # padding targets may hold anything; they are masked out below
    ce = F.cross_entropy(outputs.float().reshape(T * B, C), y.reshape(T * B), reduction="none").view(T, B)
    return ce, mask


def masked_mean(values: Tensor, mask: Optional[Tensor]) -> Tensor:
    if mask is None:
        return values.mean()
    return values.masked_select(mask).mean()


class ArrayClassificationTask(ClassificationTask):
    """A classification task whose splits are in-memory arrays of equal-length sequences.

    Subclasses implement :meth:`_split_arrays` (the examples of a split, any per-example layout) and
    :meth:`_features` (a batch of examples to time-major ``(T, B, input_size)`` float32 features). The
    split arrays are built once per task instance on first use.
    """

    def _split_arrays(self, split: str) -> Tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _features(self, examples: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _arrays(self, split: str) -> Tuple[Tensor, Tensor]:
        cache = self.__dict__.setdefault("_split_cache", {})
        if split not in cache:
            cache[split] = self._split_arrays(split)
        return cache[split]

    def num_examples(self, split: str) -> int:
        check_split(split)
        return int(self._arrays(split)[1].shape[0])

    def batches(self, split: str, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        check_split(split)
        check_batch_size(batch_size)
        examples, labels = self._arrays(split)
        if split == "train":
            return (Batch(self._features(examples[idx]), labels[idx].clone())
                    for idx in train_index_stream(labels.shape[0], batch_size, seed))
        return (Batch(self._features(examples[s]), labels[s].clone())
                for s in eval_slices(labels.shape[0], batch_size))
