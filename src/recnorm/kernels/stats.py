"""Batch statistics: the one place where recnorm computes means and variances over a batch.

Low precision: for bfloat16 and float16 inputs the moments are accumulated, and returned, in float32
(:func:`stats_dtype`), so rounding of the input does not turn into spurious spread or degenerate features.

Every batch-normalizing module (per-step, shared-over-time and sequence-wise) takes its statistics from
:func:`batch_moments` and its row count from :func:`count_valid`. With ``sync=True`` both are taken over
the rows of every process of a ``torch.distributed`` group (synchronized BN, as
:class:`torch.nn.SyncBatchNorm` does): the count, the per-feature sums and then the centred sums of
squares are all-reduced, the last two with :func:`torch.distributed.nn.functional.all_reduce`, whose
backward all-reduces the gradient, so every process gets the gradient of the global statistics.
Synchronized calls are collective: every process of the group must make them in the same order.

Rows that are padding never reach these functions when recnorm layers run on packed batches: the time
loop hands each norm only the rows of sequences that are still valid at that step. An explicit
``mask`` is accepted for callers that normalize padded tensors themselves.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["batch_moments", "degenerate_features", "population_degenerate", "count_valid", "sync_active", "sync_max", "stats_dtype"]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics of ``dtype`` values are accumulated in: float32 for 16-bit floats, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sync_active(sync: bool, process_group: Any = None) -> bool:
    """Whether synchronized statistics really involve other processes (an initialized group of 2+)."""
    if not sync or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return torch.distributed.get_world_size(process_group) > 1


def sync_max(value: int, process_group: Any = None, device: Any = None) -> int:
    """The largest ``value`` over the processes of the group (a collective call). ``device``: where the
    backend communicates (CUDA tensors for NCCL)."""
    t = torch.tensor([int(value)], dtype=torch.long, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=process_group)
    return int(t.item())


def count_valid(x: Tensor, mask: Optional[Tensor], *, sync: bool = False, process_group: Any = None) -> int:
    """Number of rows of ``x`` (``(N, F)``) that the statistics are taken over (over all processes of
    the group when ``sync``)."""
    n = int(x.shape[0]) if mask is None else int(mask.sum())
    if sync_active(sync, process_group):
        t = torch.tensor([n], dtype=torch.long, device=x.device)  # on the data's device: NCCL needs CUDA tensors
        torch.distributed.all_reduce(t, group=process_group)
        n = int(t.item())
    return n


def batch_moments(
    x: Tensor, mask: Optional[Tensor] = None, *, center: bool = True, sync: bool = False, process_group: Any = None
) -> Tuple[Tensor, Tensor]:
    """Per-feature mean and biased variance of ``x`` over its rows.

    Args:
        x: ``(N, F)`` values.
        mask: optional ``(N,)`` bool tensor; only rows where it is True are counted.
        center: False for the uncentred second moment: ``mean`` is then 0 and ``var`` the mean square
            (RMSNorm's statistic).
        sync: take the moments over the rows of every process of ``process_group`` (default: the
            world) instead of this process's rows alone. A process may hold no rows.

    Returns:
        ``(mean, var)``, each ``(F,)`` in :func:`stats_dtype` of ``x``; ``var`` is the biased
        (divide-by-n) variance that normalization uses. Both are differentiable with respect to
        ``x``. The caller guarantees at least one counted row (over all processes when ``sync``).

    The variance is computed from centred values (two passes), not as E[x^2] - E[x]^2, so it never
    comes out negative and stays accurate for features with a large mean.
    """
    x = x.to(stats_dtype(x.dtype))
    if not center:
        x2 = x.square()
        w = None if mask is None else mask.to(x.dtype).unsqueeze(1)
        if sync_active(sync, process_group):
            from torch.distributed.nn.functional import all_reduce

            kw = {} if process_group is None else {"group": process_group}
            n_local = x.new_full((1,), float(x.shape[0])) if w is None else w.sum().reshape(1)
            total = all_reduce(torch.cat([(x2 if w is None else x2 * w).sum(0), n_local]), **kw)
            ms = total[:-1] / total[-1].detach()
        else:
            ms = x2.mean(0) if w is None else (x2 * w).sum(0) / w.sum()
        return torch.zeros_like(ms), ms
    if sync_active(sync, process_group):
        return _synced_moments(x, mask, process_group)
    if mask is None:
        var, mean = torch.var_mean(x, dim=0, correction=0)
        return mean, var
    w = mask.to(x.dtype).unsqueeze(1)  # (N, 1)
    n = w.sum()
    mean = (x * w).sum(0) / n
    var = (((x - mean) * w) ** 2).sum(0) / n
    return mean, var


def _synced_moments(x: Tensor, mask: Optional[Tensor], process_group: Any) -> Tuple[Tensor, Tensor]:
    from torch.distributed.nn.functional import all_reduce  # differentiable: backward all-reduces the gradient

    kw = {} if process_group is None else {"group": process_group}
    w = None if mask is None else mask.to(x.dtype).unsqueeze(1)
    n_local = x.new_full((1,), float(x.shape[0])) if w is None else w.sum().reshape(1)
    total = all_reduce(torch.cat([(x if w is None else x * w).sum(0), n_local]), **kw)
    n = total[-1].detach()
    mean = total[:-1] / n
    centred = (x - mean) if w is None else (x - mean) * w
    var = all_reduce(centred.square().sum(0), **kw) / n
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
    return var <= (tol * mean).square()


def population_degenerate(running_mean: Tensor, running_var: Tensor) -> Tensor:
    """Features whose stored (population) variance is zero up to rounding relative to the stored mean.

    Normalizing with population statistics follows training's rule there: the normalized value is 0. The
    threshold is 32 units of rounding of the buffers' dtype (training's 16 on the batch): the stored
    variance averages updates that were each within training's threshold while the mean drifted
    (docs/eval_statistics.md, rule R2). A feature that was 0 in every update (the input term of an
    always-blank pixel) has mean 0 and variance 0 and is caught too.
    """
    tol = 32.0 * torch.finfo(running_var.dtype).eps
    return running_var <= (tol * running_mean).square()
