"""The reference time loop: readable, differentiable by autograd, and the oracle for every fast path.

Data layout. A layer direction runs on *packed rows*: ``x`` is ``(N, F)`` with the rows of time step 0
first, then those of step 1, and so on; step ``t`` holds ``batch_sizes[t]`` rows, the sequences (sorted
by decreasing length) that are still valid at ``t``. An ordinary ``(T, B, F)`` batch is the special
case ``batch_sizes = [B] * T`` and costs only a ``view``. Because a step sees only its valid rows,
padding cannot reach outputs, states, gradients or batch statistics: there is nothing to mask.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recnorm.nn.cells import CellType
from recnorm.nn.stats import sync_max

__all__ = ["DirectionParams", "project_inputs", "run_direction"]

State = Tuple[Tensor, ...]


@dataclasses.dataclass
class DirectionParams:
    """Everything one direction of one layer computes with."""

    weight_ih: Tensor  # (G*H, F)
    weight_hh: Tensor  # (G*H, P or H)
    bias_ih: Optional[Tensor]  # (G*H,)
    bias_hh: Optional[Tensor]  # (G*H,)
    weight_hr: Optional[Tensor] = None  # (P, H), LSTM with proj_size only
    norm_ih: Optional[nn.Module] = None
    norm_hh: Optional[nn.Module] = None
    norm_c: Optional[nn.Module] = None


def project_inputs(x: Tensor, p: DirectionParams) -> Tuple[Tensor, bool]:
    """Input projection of all time steps at once: ``W_ih x`` for every row of ``x`` ``(N, F)``.

    Row-wise and sequence-wise input norms (layer norm, sequence-wise BN) and the bias are applied here
    too. Returns ``(gx, per_step)``; when ``per_step`` is True the input norm keeps statistics per step,
    so the loop still has to normalize each step's rows and add ``b_ih``.
    """
    norm = p.norm_ih
    if norm is None:
        return F.linear(x, p.weight_ih, p.bias_ih), False  # (N, G*H)
    gx = F.linear(x, p.weight_ih)
    if norm.scope == "step":
        return gx, True
    gx = norm(gx, 0)
    return (gx if p.bias_ih is None else gx + p.bias_ih), False


def _add(x: Tensor, b: Optional[Tensor]) -> Tensor:
    return x if b is None else x + b


def _synchronized_steps(batch_sizes: Sequence[int], p: DirectionParams, device) -> Sequence[int]:
    """Steps padded with empty ones up to the longest batch of all processes, when a per-step norm
    synchronizes its statistics: every process must then make the same collective calls at every step,
    whatever the length of its own batch. An empty step contributes no rows to any statistic."""
    synced = [n for n in (p.norm_ih, p.norm_hh, p.norm_c) if getattr(n, "scope", None) == "step" and n.synced()]
    if not synced:
        return batch_sizes
    steps = sync_max(len(batch_sizes), synced[0].process_group, device)
    return list(batch_sizes) + [0] * (steps - len(batch_sizes))


def run_direction(
    cell: CellType,
    x: Tensor,
    batch_sizes: Sequence[int],
    state: State,
    p: DirectionParams,
    on_output: Optional[Callable[[int, Tensor], None]] = None,
    step_offset: int = 0,
) -> Tuple[Tensor, State]:
    """Run one direction of one layer over packed rows.

    Args:
        cell: the cell type.
        x: ``(N, F)`` packed rows (see the module docstring).
        batch_sizes: rows per step, non-increasing, summing to N.
        state: initial state tuple, each ``(B, ·)`` with ``B = batch_sizes[0]``.
        p: weights and norms.
        on_output: called as ``on_output(t, h_t)`` after each step (diagnostics).
        step_offset: index of the first step, for norms with per-step statistics (a cell run one step
            at a time, or truncated back-propagation through time).

    Returns:
        ``(out, final_state)``: ``out`` is ``(N, P or H)`` packed like ``x``; each final state tensor is
        ``(B, ·)``, holding for every sequence its state after its own last valid step.
    """
    batch_sizes = _synchronized_steps(batch_sizes, p, x.device)
    gx, per_step = project_inputs(x, p)
    finished: List[State] = []  # states of sequences that ended, in the order they ended
    outputs: List[Tensor] = []
    for t, gi in enumerate(gx.split(list(batch_sizes)), start=step_offset):  # gi: (B_t, G*H); never gx[t]
        nb = gi.shape[0]
        if nb < state[0].shape[0]:
            finished.append(tuple(s[nb:] for s in state))
            state = tuple(s[:nb] for s in state)
        if per_step:
            gi = _add(p.norm_ih(gi, t), p.bias_ih)
        if p.norm_hh is None:
            gh = F.linear(state[0], p.weight_hh, p.bias_hh)  # (B_t, G*H)
        else:
            gh = _add(p.norm_hh(F.linear(state[0], p.weight_hh), t), p.bias_hh)
        h, state = cell.step(gi, gh, state, t, p.norm_c, p.weight_hr)
        if on_output is not None:
            on_output(t, h)
        outputs.append(h)
    finished.append(state)
    final = tuple(torch.cat([f[i] for f in reversed(finished)], 0) for i in range(len(state)))
    return torch.cat(outputs, 0), final
