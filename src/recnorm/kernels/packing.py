"""Packed-row helpers that every implementation shares: validating batch sizes and reversing sequences.

``reverse_packed(x, batch_sizes)`` reverses every sequence within its own length on packed rows (the
reverse direction of a bidirectional layer). It is the registered operator ``recnorm::reverse_packed``
(CPU and CUDA; a permutation, so its own backward), so ``torch.compile`` does not specialize a compiled
graph on the batch sizes of a ``PackedSequence``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["reverse_packed", "reverse_index", "check_batch_sizes"]


def check_batch_sizes(batch_sizes: Tensor, rows: int, what: str = "PackedSequence") -> List[int]:
    """The batch sizes as a list, after checking that they describe ``rows`` packed rows: a 1-D int64
    CPU tensor of positive, non-increasing counts summing to ``rows``."""
    if not isinstance(batch_sizes, Tensor) or batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64:
        got = f"{batch_sizes.dtype} tensor of shape {tuple(batch_sizes.shape)}" if isinstance(batch_sizes, Tensor) else type(batch_sizes).__name__
        raise ValueError(f"{what}: expected batch_sizes to be a 1-D int64 tensor, got a {got}")
    if batch_sizes.device.type != "cpu":
        raise ValueError(f"{what}: expected batch_sizes on the CPU (as torch.nn.utils.rnn.pack_padded_sequence makes them), got {batch_sizes.device}")
    sizes = batch_sizes.tolist()
    if not sizes:
        raise ValueError(f"{what}: expected at least one time step, got empty batch_sizes")
    if min(sizes) < 1 or any(b > a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"{what}: expected positive, non-increasing batch_sizes (sequences sorted by length), got {sizes}")
    if sum(sizes) != rows:
        raise ValueError(f"{what}: batch_sizes sum to {sum(sizes)} rows but the data has {rows}")
    return sizes


def reverse_index(sizes: Sequence[int]) -> Tensor:
    """For each packed row, the packed row that holds the same sequence's step counted from its end."""
    bs = torch.tensor(list(sizes), dtype=torch.long)
    T, B = len(sizes), int(sizes[0])
    offsets = torch.cumsum(bs, 0) - bs  # (T,) first row of each step
    b = torch.arange(B).unsqueeze(0)  # (1, B)
    t = torch.arange(T).unsqueeze(1)  # (T, 1)
    valid = b < bs.unsqueeze(1)  # (T, B)
    lengths = valid.sum(0)  # (B,)
    src = offsets[(lengths.unsqueeze(0) - 1 - t).clamp(min=0)] + b  # (T, B)
    return src[valid]


@torch.library.custom_op("recnorm::reverse_packed", mutates_args=())
def _reverse_packed(x: Tensor, batch_sizes: Tensor) -> Tensor:
    return x.index_select(0, reverse_index(batch_sizes.tolist()).to(x.device))


@_reverse_packed.register_fake
def _reverse_packed_fake(x, batch_sizes):
    return torch.empty_like(x)


def _reverse_setup(ctx, inputs, output):
    ctx.batch_sizes = inputs[1]


def _reverse_backward(ctx, grad):
    return torch.ops.recnorm.reverse_packed(grad, ctx.batch_sizes), None  # a reversal is its own inverse


_reverse_packed.register_autograd(_reverse_backward, setup_context=_reverse_setup)


def reverse_packed(x: Tensor, batch_sizes: Optional[Tensor]) -> Tensor:
    """Reverse each sequence of packed rows ``x`` within its own length (an involution). ``batch_sizes``
    None: ``x`` is a full batch ``(T, B, F)``, reversed along time."""
    if batch_sizes is None:
        return x.flip(0)
    return torch.ops.recnorm.reverse_packed(x, batch_sizes)
