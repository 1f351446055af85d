"""Batch statistics: the one place where recnorm computes means and variances over a batch.

Every batch-normalizing module (per-step, shared-over-time and sequence-wise) takes its statistics from
:func:`batch_moments`, so synchronizing statistics across data-parallel processes (SyncBN) is a change
to this file alone.

Rows that are padding never reach these functions when recnorm layers run on packed batches: the time
loop hands each norm only the rows of sequences that are still valid at that step. An explicit
``mask`` is accepted for callers that normalize padded tensors themselves.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["batch_moments", "degenerate_features", "count_valid"]


def count_valid(x: Tensor, mask: Optional[Tensor]) -> int:
    """Number of rows of ``x`` (``(N, F)``) that the statistics are taken over."""
    if mask is None:
        return int(x.shape[0])
    return int(mask.sum())


def batch_moments(x: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per-feature mean and biased variance of ``x`` over its rows.

    Args:
        x: ``(N, F)`` values.
        mask: optional ``(N,)`` bool tensor; only rows where it is True are counted.

    Returns:
        ``(mean, var)``, each ``(F,)``; ``var`` is the biased (divide-by-n) variance that
        normalization uses. Both are differentiable with respect to ``x``. The caller guarantees at
        least one counted row.

    The variance is computed from centred values (two passes), not as E[x^2] - E[x]^2, so it never
    comes out negative and stays accurate for features with a large mean.
    """
    if mask is None:
        var, mean = torch.var_mean(x, dim=0, correction=0)
        return mean, var
    w = mask.to(x.dtype).unsqueeze(1)  # (N, 1)
    n = w.sum()
    mean = (x * w).sum(0) / n
    var = (((x - mean) * w) ** 2).sum(0) / n
    return mean, var


def degenerate_features(mean: Tensor, var: Tensor) -> Tensor:
    """Features whose batch variance is zero up to rounding: every counted row holds the same value.

    This is the zero-variance case of Cooijmans et al. (2017, section 5.1): blank leading rows of an
    image, zero padding, or a hidden state that is still identical across the batch. Normalizing by
    such a variance multiplies the gradient by ``gain / sqrt(eps)`` (about 316 * gain) at every step,
    which overflows after a few dozen steps. The threshold is a few units of rounding relative to the
    feature's magnitude (and exactly zero variance for a feature that is zero everywhere), so a
    feature with any real spread across the batch is never caught.
    """
    tol = 16.0 * torch.finfo(var.dtype).eps
    return var <= (tol * mean.detach()).square()
