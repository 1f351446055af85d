"""The reference time loop: readable, differentiable by autograd, and the oracle for every fast path.

Data layout. A layer direction runs on *packed rows*: ``x`` is ``(N, F)`` with the rows of time step 0
first, then those of step 1, and so on; step ``t`` holds ``batch_sizes[t]`` rows, the sequences (sorted
by decreasing length) that are still valid at ``t``. An ordinary ``(T, B, F)`` batch is the special
case ``batch_sizes = None`` (every step holds all B rows) and costs only a ``view``. Because a step sees
only its valid rows, padding cannot reach outputs, states, gradients or batch statistics: there is
nothing to mask.

Per step, with the descriptors of :class:`~recnorm.kernels.contract.DirectionWork`::

    gi = N_ih(W_ih x_t) + b_ih            gh = N_hh(W_hh h_{t-1}) + b_hh
    (joint:  gi = N_gates(W_ih x_t + W_hh h_{t-1}) + b_ih + b_hh,  gh = None)
    h_t, state_t = cell.step(gi, gh, state_{t-1}, N_cell, carry, W_hr)
    (zoneout:  state_t = d_t * state_{t-1} + (1 - d_t) * state_t per state tensor; h_t = the zoned state_t[0])

Low precision: for bfloat16 and float16 inputs the GEMMs run in the input's dtype, but the gate terms,
the normalizations and the state (the LSTM cell above all) are kept in float32, as fused RNN kernels do;
outputs and final states come back in the input's dtype. Without this the cell's rounding error compounds
over the steps.

Input-side norms whose statistics are not per step (row, sequence-wise) run once on the projection of
all steps. Batch statistics are taken per call over the call's valid rows; every site that used them
returns them in :attr:`~recnorm.kernels.contract.DirectionResult.moments`. A step that has fewer than
2 valid rows normalizes with the population statistics as they were when the call started.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from recnorm.kernels import functional as fn
from recnorm.kernels.contract import BatchMoments, DirectionResult, DirectionWork, NormDesc, batch_sizes_list
from recnorm.kernels.stats import batch_moments, degenerate_features, stats_dtype, sync_max

__all__ = ["run_direction", "supports", "project_inputs"]

State = Tuple[Tensor, ...]
NAME = "reference"


def supports(work: DirectionWork, x: Tensor, batch_sizes: Optional[Tensor], mode: str) -> Optional[str]:
    """Why this implementation cannot serve the case (None: it can)."""
    if mode in ("trace", "export"):
        return "its Python time loop unrolls over the traced length, so the result would only be right for that length"
    return None


class _Moments:
    """Collects the batch moments of one call, per site."""

    def __init__(self) -> None:
        self.rows: Dict[str, List[Tuple[int, Tensor, Tensor, int]]] = {}

    def add(self, site: str, step: int, moments: Optional[Tuple[Tensor, Tensor, int]]) -> None:
        if moments is not None:
            self.rows.setdefault(site, []).append((step,) + moments)

    def result(self, device) -> Dict[str, BatchMoments]:
        out = {}
        for site, rows in self.rows.items():
            out[site] = BatchMoments(
                steps=torch.tensor([r[0] for r in rows], dtype=torch.long, device=device),
                mean=torch.stack([r[1] for r in rows]),
                var=torch.stack([r[2] for r in rows]),
                count=torch.tensor([r[3] for r in rows], dtype=torch.long, device=device),
            )
        return out


def _apply(d: Optional[NormDesc], site: str, x: Tensor, step: int, moments: _Moments) -> Tensor:
    if d is None:
        return x
    if d.stat == "row":
        return fn.row_norm(d, x)
    y, m = fn.batch_norm(d, x, step)
    moments.add(site, step, m)
    return y


def _add(x: Tensor, b: Optional[Tensor]) -> Tensor:
    return x if b is None else x + b


def _sequence_norm(d: NormDesc, gx: Tensor, moments: _Moments) -> Tensor:
    """Sequence-wise BN of every valid row at once (one call, step 0)."""
    return _apply(d, "ih", gx, 0, moments)


def project_inputs(x: Tensor, work: DirectionWork, moments: _Moments) -> Tuple[Tensor, bool]:
    """``W_ih x`` for every row of ``x`` ``(N, F)``, with the input norm and ``b_ih`` when its statistics
    are not per step. Returns ``(gx, per_step)``: when ``per_step`` the loop still normalizes each step
    and adds ``b_ih``."""
    d = work.norm("ih")
    if d is None:
        if work.norm("gates") is not None:
            return F.linear(x, work.weight_ih), True
        return F.linear(x, work.weight_ih, work.bias_ih), False  # (N, G*H)
    gx = F.linear(x, work.weight_ih)
    if d.per_step:
        return gx, True
    gx = fn.row_norm(d, gx) if d.stat == "row" else _sequence_norm(d, gx, moments)
    return _add(gx, work.bias_ih), False


def _synchronized_steps(batch_sizes: List[int], work: DirectionWork, device) -> List[int]:
    """Steps padded with empty ones up to the longest batch of all processes, when a per-step norm
    synchronizes its statistics: every process must then make the same collective calls at every step,
    whatever the length of its own batch. An empty step contributes no rows to any statistic."""
    synced = [d for d in work.present_norms().values() if d.per_step and d.sync and d.batch_stats]
    if not synced or not synced[0].sync:
        return batch_sizes
    from recnorm.kernels.stats import sync_active

    if not sync_active(True, synced[0].process_group):
        return batch_sizes
    steps = sync_max(len(batch_sizes), synced[0].process_group, device)
    return list(batch_sizes) + [0] * (steps - len(batch_sizes))


def _cell_norm(work: DirectionWork, step: int, moments: _Moments):
    d = work.norm("cell")
    if d is None:
        return None
    return lambda c: _apply(d, "cell", c, step, moments)


def _zone_steps(work: DirectionWork, k: int, sizes: List[int], rows: int, dtype) -> Optional[list]:
    """State ``k``'s zoneout per step: None, or a list with each step's keep indicators ``(B_t, W)`` (training)
    or the rate (eval)."""
    z = work.zone(k)
    if z is None:
        return None
    if not isinstance(z, Tensor):
        return [float(z)] * len(sizes)
    return list(z.reshape(rows, z.shape[-1]).to(dtype).split(sizes))


def _zone(d, old: Tensor, new: Tensor) -> Tensor:
    """``d * old + (1 - d) * new``: keep the previous value where (or with the weight with which) ``d`` says
    (exactly the previous value where a keep indicator is 1)."""
    return d * old + (1 - d) * new


def run_direction(work: DirectionWork, x: Tensor, batch_sizes: Optional[Sequence[int]], state: State) -> DirectionResult:
    """Run one direction of one layer over packed rows.

    Args:
        work: weights, cell and norm descriptors.
        x: ``(N, F)`` packed rows (see the module docstring), or ``(T, B, F)`` for a full batch.
        batch_sizes: rows per step, non-increasing, summing to N; None for a full batch.
        state: initial state tuple, each ``(B, ·)`` with ``B = batch_sizes[0]``.

    Returns:
        a :class:`~recnorm.kernels.contract.DirectionResult`: ``output`` ``(N, P or H)`` packed like
        ``x`` (``(T, B, P or H)`` for a full batch); final states ``(B, ·)``, holding for every sequence its state after its own last valid
        step; and the batch moments of every site that used batch statistics.
    """
    full = x.dim() == 3
    if full:
        T, B = x.shape[0], x.shape[1]
        x = x.reshape(T * B, x.shape[2])
    sizes = batch_sizes_list(batch_sizes, x.shape[0], state[0].shape[0])
    sizes = _synchronized_steps(sizes, work, x.device)
    moments = _Moments()
    gx, per_step = project_inputs(x, work, moments)
    low, acc = x.dtype, stats_dtype(x.dtype)  # GEMMs in the input's dtype; the recurrence in float32 for 16-bit
    gx = gx.to(acc)
    state = tuple(s.to(acc) for s in state)
    d_ih, d_hh, d_gates = work.norm("ih"), work.norm("hh"), work.norm("gates")
    zones = [_zone_steps(work, k, sizes, x.shape[0], acc) for k in range(len(state))]
    finished: List[State] = []  # states of sequences that ended, in the order they ended
    outputs: List[Tensor] = []
    for t, gi in enumerate(gx.split(sizes), start=work.step_offset):  # gi: (B_t, G*H); never gx[t]
        nb = gi.shape[0]
        if nb < state[0].shape[0]:
            finished.append(tuple(s[nb:] for s in state))
            state = tuple(s[:nb] for s in state)
        hh = F.linear(state[0].to(low), work.weight_hh).to(acc)  # (B_t, G*H)
        if d_gates is not None:  # one norm over the sum of both terms
            g = _apply(d_gates, "gates", gi + hh, t, moments)
            gi, gh = _add(_add(g, work.bias_ih), work.bias_hh), None
        else:
            if per_step:
                gi = _add(_apply(d_ih, "ih", gi, t, moments), work.bias_ih)
            gh = _add(hh if d_hh is None else _apply(d_hh, "hh", hh, t, moments), work.bias_hh)
        prev = state
        h, state = work.cell.step(gi, gh, state, _cell_norm(work, t, moments), work.carry_cell_norm, work.weight_hr)
        if any(z is not None for z in zones):
            i = t - work.step_offset
            state = tuple(s if z is None else _zone(z[i], p, s) for z, p, s in zip(zones, prev, state))
            h = state[0] if zones[0] is not None else h
        if work.on_output is not None:
            work.on_output(t, h)
        outputs.append(h.to(low))
    finished.append(state)
    final = tuple(torch.cat([f[i] for f in reversed(finished)], 0).to(low) for i in range(len(state)))
    out = torch.cat(outputs, 0)
    return DirectionResult(out.view(T, B, out.shape[-1]) if full else out, final, moments.result(x.device))


# kept for the fast paths' tests: the moments of a whole batch, as the sequence statistic takes them
def sequence_moments(gx: Tensor, center: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    mean, var = batch_moments(gx, center=center)
    return mean, var, degenerate_features(mean, var)
