"""Normalizations as functions of a :class:`~recnorm.kernels.contract.NormDesc`: the readable math that the
reference loop and the export path apply, and that the fused kernels are tested against.

For ``x`` of shape ``(..., F)``:

* row statistic (layer norm, RMSNorm): for each row and each feature group ``k``,
  ``mu = mean(x_k)`` (0 when not centred), ``v = mean((x_k - mu)^2)``,
  ``y_k = (x_k - mu) / sqrt(v + eps)``;
* batch statistic at one step: ``mu``, ``v`` per feature over the ``n`` valid rows (or the population
  statistics of the step's slot when normalizing with population statistics, or when ``n < 2``);

then ``y * weight + bias``. A *degenerate* feature or group (zero spread up to rounding:
:func:`recnorm.kernels.stats.degenerate_features`) normalizes to exactly 0 and passes no gradient.
Statistics of 16-bit inputs are taken, and the normalization done, in float32; the result has the
input's dtype.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from recnorm.kernels.contract import BatchMoments, DirectionWork, NormDesc
from recnorm.kernels.stats import batch_moments, count_valid, degenerate_features, population_degenerate, stats_dtype

__all__ = ["slot_index", "population_moments", "row_norm", "batch_norm", "affine", "normalize_with", "batch_norm_rows", "fold_sequence_norm"]


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without a no-op ``to`` node (an alias, which the ONNX exporter mishandles inside
    a scan)."""
    return t if t.dtype == dtype else t.to(dtype)


def slot_index(num_batches_tracked: Tensor, steps: Tensor) -> Tensor:
    """The population slot each step reads: ``min(step, s_last)``, where ``s_last`` is the last slot
    updated at least once (``S - 1`` if none was). Pure tensor ops: no host synchronization."""
    S = num_batches_tracked.shape[0]
    positions = torch.arange(S, device=num_batches_tracked.device)
    last = torch.where(num_batches_tracked > 0, positions, -1).max()
    last = torch.where(last < 0, S - 1, last)
    return torch.minimum(steps.to(positions.device), last)


def population_moments(d: NormDesc, steps: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(mean, var, degenerate)`` ``(K, F)`` of the population statistics the given steps read, in the
    statistics dtype (mean 0 when not centred); ``degenerate`` marks the features that normalize to 0."""
    index = slot_index(d.num_batches_tracked, steps)
    mean, var = d.running_mean.index_select(0, index), d.running_var.index_select(0, index)
    degenerate = population_degenerate(mean, var)
    dt = stats_dtype(d.running_var.dtype)
    mean, var = _to(mean, dt), _to(var, dt)
    return (mean if d.center else torch.zeros_like(mean)), var, degenerate


def affine(d: NormDesc, y: Tensor) -> Tensor:
    if d.weight is not None:
        y = y * d.weight
    if d.bias is not None:
        y = y + d.bias
    return y


def normalize_with(d: NormDesc, x: Tensor, mean: Tensor, var: Tensor, degenerate: Optional[Tensor]) -> Tensor:
    """``affine((x - mean) / sqrt(var + eps))`` in the statistics' dtype, degenerate features set to 0,
    returned in ``x``'s dtype."""
    y = (_to(x, mean.dtype) - mean) * torch.rsqrt(var + d.eps) if d.center else _to(x, var.dtype) * torch.rsqrt(var + d.eps)
    if degenerate is not None:
        y = torch.where(degenerate, torch.zeros((), dtype=y.dtype, device=y.device), y)
    return _to(affine(d, y), x.dtype)


def row_norm(d: NormDesc, x: Tensor, exact_degenerate: bool = True) -> Tensor:
    """Layer norm (``center``) or RMSNorm of each row of ``x`` ``(..., F)`` over each feature group.

    ``exact_degenerate=False`` (the export path) normalizes with ``F.layer_norm`` (RMSNorm: a vector norm) and skips the zero-spread
    rule: a row that is constant up to rounding then normalizes to values of the order of that rounding
    instead of exactly 0, a difference that matters for gradients, not for inference. (torch 2.13's ONNX
    exporter fails on the explicit statistics inside a scan that follows another scan.)
    """
    xs = _to(x, stats_dtype(x.dtype))
    parts = []
    for part in xs.split(list(d.groups), dim=-1) if len(d.groups) > 1 else (xs,):
        if not exact_degenerate:
            if d.center:
                parts.append(torch.nn.functional.layer_norm(part, (part.shape[-1],), eps=d.eps))
            else:
                # The mean square as a vector norm accumulated in float64: torch 2.13's strict export (and so
                # ONNX) fails on mean(), sum() or F.rms_norm in a scan that follows another scan, and the
                # float64 sum keeps the rounding of RMSNorm of near-zero states (where the recurrence
                # amplifies it, up to 1/sqrt(eps)) at the level of the eager kernels'.
                norm = torch.linalg.vector_norm(part, dim=-1, keepdim=True, dtype=torch.float64)
                ms = (norm.square() / part.shape[-1]).to(part.dtype)
                parts.append(part * torch.rsqrt(ms + d.eps))
            continue
        if d.center:  # two passes in plain ops (they export to ONNX inside a scan; var_mean does not)
            mean = part.mean(-1, keepdim=True)
            var = (part - mean).square().mean(-1, keepdim=True)
            y = (part - mean) * torch.rsqrt(var + d.eps)
        else:
            var = part.square().mean(-1, keepdim=True)
            mean = torch.zeros_like(var)
            y = part * torch.rsqrt(var + d.eps)
        # A constant row (an all-zero state) normalizes to 0 and passes no gradient.
        parts.append(y.masked_fill(degenerate_features(mean, var), 0.0))
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return _to(affine(d, y), x.dtype)


def batch_norm(d: NormDesc, x: Tensor, step: int) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor, int]]]:
    """Batch-normalize the rows ``x`` ``(n, F)`` of one call at absolute step ``step``.

    Returns ``(y, moments)``: ``moments = (mean, var, n)`` of the batch when batch statistics were used
    (detached; for the running averages), else None.
    """
    sync = {"sync": d.sync and d.batch_stats, "process_group": d.process_group}
    n = count_valid(x, None, **sync) if d.batch_stats else 0
    if not d.batch_stats or n < 2:
        mean, var, degenerate = population_moments(d, torch.tensor([step], device=x.device))
        dt = stats_dtype(x.dtype)
        return normalize_with(d, x, _to(mean[0], dt), _to(var[0], dt), degenerate[0]), None
    mean, var = batch_moments(x, center=d.center, **sync)
    y = normalize_with(d, x, mean, var, degenerate_features(mean, var))
    return y, (mean.detach(), var.detach(), n)


class _BatchNormRows(torch.autograd.Function):
    """Batch statistics of every row of ``x`` ``(N, F)``, normalization and affine in one autograd node.

    The same values and gradients as :func:`normalize_with` on :func:`batch_moments` (the gradient flows
    through the mean and the variance), but autograd keeps only ``x``, the (F,) statistics and the gain for
    backward, where the composed ops keep two more ``(N, F)`` tensors (the centred and the normalized
    values). Backward, with ``xhat = (x - mu) * r`` recomputed and ``g = dy * weight``:
    ``dx = r * (g - mean(g) - xhat * mean(g * xhat))`` (not centred: without ``mean(g)``),
    ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)``; a degenerate feature has ``r = 0``, so it outputs
    ``bias`` and passes no gradient to ``x``.
    """

    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, center: bool):
        xs = _to(x, stats_dtype(x.dtype))
        mean, var = batch_moments(xs, center=center)
        rstd = torch.rsqrt(var + eps).masked_fill(degenerate_features(mean, var), 0.0)
        y = (xs - mean) * rstd if center else xs * rstd
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        return _to(y, x.dtype), mean, var, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps, center = inputs
        _, mean, _, rstd = output
        ctx.center, ctx.has_bias = center, bias is not None
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, output[2], rstd)

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dt = rstd.dtype
        dy = _to(dy, dt)
        xhat = ((_to(x, dt) - mean) if ctx.center else _to(x, dt)) * rstd
        g = dy if weight is None else dy * weight
        proj = (g * xhat).mean(0)
        inner = g - xhat * proj
        if ctx.center:
            inner = inner - g.mean(0)
        dx = _to(inner * rstd, x.dtype) if ctx.needs_input_grad[0] else None
        dweight = (dy * xhat).sum(0) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


def batch_norm_rows(d: NormDesc, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)``: every row of ``x`` ``(N, F)`` (N >= 2) normalized with the batch's statistics
    (not synchronized), and those statistics (detached, for the running averages) -- what
    :func:`normalize_with` on :func:`batch_moments` gives, with less memory kept for backward."""
    y, mean, var, _ = _BatchNormRows.apply(x, d.weight, d.bias, float(d.eps), bool(d.center))
    return y, mean, var


# ---------------------------------------------------------------------------------------------------
# Sequence-wise batch norm folded into the input weights (torch's op, the fused kernels, the export path)
# ---------------------------------------------------------------------------------------------------


def _input_moments(x: Tensor, w: Tensor, center: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance of every feature of ``x W^T`` over the rows of ``x``, from the moments of
    ``x``: ``(mean, var / scale^2, scale)``. ``x`` is divided by a power of two near its largest magnitude
    first, so its covariance cannot overflow; the caller folds ``scale`` back in without forming
    ``var`` itself, which may not fit the dtype."""
    dt = stats_dtype(x.dtype)
    xs, ws = x.to(dt), w.to(dt)
    amax = xs.detach().abs().amax().clamp(min=1.0)
    scale = torch.exp2(torch.floor(torch.log2(amax)))  # exact: a power of two, 1 for ordinary inputs
    xs = xs / scale
    n = xs.shape[0]
    xm = xs.mean(0) if center else torch.zeros_like(xs[0])
    xc = xs - xm
    cov = xc.t().matmul(xc) / n  # (F, F), biased like the normalization's variance
    mean = ws.matmul(xm) * scale
    var_scaled = (ws.matmul(cov) * ws).sum(1).clamp(min=0)
    return mean, var_scaled, scale


def fold_sequence_norm(work: DirectionWork, x: Tensor) -> Tuple[DirectionWork, Dict[str, BatchMoments]]:
    """The same direction with its sequence-wise input norm folded into ``weight_ih`` and ``bias_ih``
    (same statistics, population fallback and zero-variance rule as the reference loop), and the batch
    moments it used, for the running averages. Used by torch's op (:mod:`.native`), the fused kernels
    and the export path.

    Sequence-wise BN of ``W_ih x`` is an affine map per gate feature with batch-wide statistics:

    .. code-block:: text

        BN(W x) + b = (s * W) x + (b - s * mu),   s = gamma / sqrt(var + eps)
        mu = W mean(x),   var_j = w_j^T Cov(x) w_j     (over all valid rows of x)

    Autograd differentiates through the fold (to any order), so the gradients are those of the reference
    loop; the moments come from the input's mean and covariance (``O(N I^2)``) instead of a second
    ``(N, G*H)`` projection. ``x`` is scaled by a power of two before the covariance, so inputs near the
    float range (|x| ~ 1e19 in float32) do not overflow where the reference loop stays finite.
    """
    d = work.norm("ih")
    if d is None or d.stat != "sequence":
        return work, {}
    x = x.reshape(-1, x.shape[-1])  # every valid row, whatever the layout
    n = x.shape[0]
    moments: Dict[str, BatchMoments] = {}
    if d.batch_stats and n >= 2:
        mean, var_s, scale = _input_moments(x, work.weight_ih, d.center)
        degenerate = degenerate_features(mean / scale, var_s)
        rstd = torch.rsqrt(var_s + d.eps / (scale * scale)) / scale  # = 1 / sqrt(var + eps)
        rstd = torch.where(degenerate, torch.zeros((), dtype=rstd.dtype, device=rstd.device), rstd)
        var = var_s * scale * scale
        moments["ih"] = BatchMoments(
            steps=torch.zeros(1, dtype=torch.long, device=x.device),
            mean=mean.detach().unsqueeze(0),
            var=var.detach().unsqueeze(0),
            count=torch.full((1,), n, dtype=torch.long, device=x.device),
        )
    else:
        dt = stats_dtype(x.dtype)
        rm, rv = d.running_mean[0], d.running_var[0]  # one slot
        mean = rm.to(dt) if d.center else torch.zeros_like(rm, dtype=dt)
        rstd = torch.rsqrt(rv.to(dt) + d.eps).masked_fill(population_degenerate(rm, rv), 0.0)
    scale = rstd if d.weight is None else rstd * d.weight
    shift = -mean * scale if d.center else torch.zeros_like(scale)
    if d.bias is not None:
        shift = shift + d.bias
    w = (work.weight_ih.to(scale.dtype) * scale.unsqueeze(1)).to(work.weight_ih.dtype)
    b = shift if work.bias_ih is None else work.bias_ih + shift
    bias_hh = work.bias_hh
    if bias_hh is None:  # a bias=False layer whose fold brings a shift: torch's op takes both or neither
        bias_hh = torch.zeros_like(b)
    return work.replace(weight_ih=w, bias_ih=b.to(work.weight_ih.dtype), bias_hh=bias_hh, norms={}), moments
