"""The export path: the time loop as ``torch._higher_order_ops.scan`` over standard torch operations.

``torch.export`` and ``torch.onnx.export(dynamo=True)`` cannot follow a Python loop over a symbolic
number of steps (they would unroll it for the example's length) and cannot look inside recnorm's C++
kernels. This path writes the loop as a ``scan``, which both capture with T and B symbolic; the ONNX
exporter turns it into an ONNX ``Scan`` with standard operators inside, so any ONNX runtime runs it,
and an exported program needs neither recnorm's extensions nor recnorm itself to run.

Equations are the reference loop's (:mod:`recnorm.kernels.reference`). It serves full batches (no
``PackedSequence``) with every batch-statistic site on population statistics (eval mode): the input
term's per-step normalization is then an affine map per step and runs before the scan, sequence-wise
BN folds into the input weights, and the recurrent term's and the cell's per-step statistics enter the
scan as inputs. Row statistics use ``F.layer_norm`` here, without the reference's exact zero for rows
that are constant up to rounding (see :func:`recnorm.kernels.functional.row_norm`): inference only.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from recnorm.kernels import functional as fn
from recnorm.kernels.contract import DirectionResult, DirectionWork, NormDesc
from recnorm.kernels.functional import fold_sequence_norm
from recnorm.kernels.stats import stats_dtype

__all__ = ["supports", "run_direction"]

NAME = "scan"


def supports(work: DirectionWork, x: Tensor, batch_sizes: Optional[Tensor], mode: str) -> Optional[str]:
    if batch_sizes is not None:
        return "it serves full (padded) batches, not PackedSequence input"
    if work.on_output is not None:
        return "it does not report per-step outputs (diagnostics capture)"
    if work.training_batch_norms():
        return "it normalizes with population statistics only: call .eval() on the model first"
    return None


def _population(d: NormDesc, T, offset: int, device, dtype) -> Tuple[Tensor, Tensor]:
    """``(mean, rstd)`` ``(T, F)`` of a per-step population statistic for steps ``offset .. offset+T-1``
    (rstd 0 at degenerate features, as in the reference)."""
    steps = torch.arange(T, device=device) + offset
    mean, var, degenerate = fn.population_moments(d, steps)
    dt = stats_dtype(dtype)
    rstd = torch.rsqrt(fn._to(var, dt) + d.eps).masked_fill(degenerate, 0.0)
    return fn._to(mean, dt), rstd


def _per_step(d: NormDesc, v: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """Normalize ``v`` (..., F) with one step's population ``mean`` and ``rstd``."""
    y = (fn._to(v, mean.dtype) - mean) * rstd
    return fn._to(fn.affine(d, y), v.dtype)


def _apply(d: Optional[NormDesc], v: Tensor, stats) -> Tensor:
    if d is None:
        return v
    if d.stat == "row":
        return fn.row_norm(d, v, exact_degenerate=False)
    return _per_step(d, v, *stats)


def _detached(d: NormDesc) -> NormDesc:
    import dataclasses

    return dataclasses.replace(d, weight=None if d.weight is None else d.weight.detach(), bias=None if d.bias is None else d.bias.detach())


def _add(x: Tensor, b: Optional[Tensor]) -> Tensor:
    return x if b is None else x + b


def run_direction(work: DirectionWork, x: Tensor, batch_sizes: Optional[Tensor], state: Tuple[Tensor, ...]) -> DirectionResult:
    from torch._higher_order_ops.scan import scan

    work, _ = fold_sequence_norm(work, x)
    xs = x  # (T, B, F)
    T = xs.shape[0]
    d_ih, d_hh, d_g, d_c = work.norm("ih"), work.norm("hh"), work.norm("gates"), work.norm("cell")
    dev, dt = x.device, x.dtype

    gx = F.linear(xs, work.weight_ih)  # (T, B, G*H)
    if d_ih is not None:
        if d_ih.stat == "row":
            gx = fn.row_norm(d_ih, gx, exact_degenerate=False)
        else:  # per-step population statistics: an affine map per step
            mean, rstd = _population(d_ih, T, work.step_offset, dev, dt)
            gx = _per_step(d_ih, gx, mean.unsqueeze(1), rstd.unsqueeze(1))
    if d_g is None:
        gx = _add(gx, work.bias_ih)

    per_step = {}
    for site, d in (("hh", d_hh), ("gates", d_g), ("cell", d_c)):
        if d is not None and d.per_step:
            per_step[site] = _population(d, T, work.step_offset, dev, dt)
    sites = sorted(per_step)
    scan_inputs = [gx] + [t for s in sites for t in per_step[s]]
    # zoneout: a rate (eval) is a constant of the body; keep indicators (training) are scanned inputs
    zones = [work.zone(k) for k in range(len(state))]
    zone_inputs = [k for k, z in enumerate(zones) if isinstance(z, Tensor)]
    first_zone = len(scan_inputs)
    scan_inputs += [zones[k].to(stats_dtype(dt)) for k in zone_inputs]
    cell, carry = work.cell, work.carry_cell_norm
    w_hh, b_ih, b_hh, w_hr = work.weight_hh, work.bias_ih, work.bias_hh, work.weight_hr

    def body(carried, inputs):
        gi = inputs[0]
        stats = {s: (inputs[1 + 2 * i], inputs[2 + 2 * i]) for i, s in enumerate(sites)}
        h = carried[0]
        if d_g is not None:
            g = _apply(d_g, gi + F.linear(h, w_hh), stats.get("gates"))
            gi, gh = _add(_add(g, b_ih), b_hh), None
        elif d_hh is None:
            gh = F.linear(h, w_hh, b_hh)
        else:
            gh = _add(_apply(d_hh, F.linear(h, w_hh), stats.get("hh")), b_hh)
        norm_c = None if d_c is None else (lambda c: _apply(d_c, c, stats.get("cell")))
        out, new = cell.step(gi, gh, tuple(carried), norm_c, carry, w_hr)
        if any(z is not None for z in zones):
            keep = [inputs[first_zone + zone_inputs.index(k)] if k in zone_inputs else z for k, z in enumerate(zones)]
            new = tuple(n if d is None else d * c + (1 - d) * n for d, c, n in zip(keep, carried, new))
            out = new[0] if zones[0] is not None else out
        return list(new), out.clone()

    init = list(state)
    if torch.onnx.is_in_onnx_export():
        # The ONNX exporter runs the scan under autograd when its inputs require grad, and torch's scan
        # then saves symbolic sizes it cannot stack (torch 2.13). An ONNX model is for inference: detach.
        init = [t.detach() for t in init]
        scan_inputs = [t.detach() for t in scan_inputs]
        w_hh, b_ih, b_hh, w_hr = (None if t is None else t.detach() for t in (w_hh, b_ih, b_hh, w_hr))
        d_hh, d_g, d_c = (None if d is None else _detached(d) for d in (d_hh, d_g, d_c))
    final, out = scan(body, init, scan_inputs)
    return DirectionResult(out, tuple(final), {})
