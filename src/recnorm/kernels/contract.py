"""The data contract between recnorm's layers and its kernels.

A layer (:mod:`recnorm.nn`) describes the work of one direction of one layer as plain data, a
:class:`DirectionWork`: the weights, a :class:`CellDesc` naming the cell's math, and for each
normalization *site* a :class:`NormDesc`. Kernels read these fields and nothing else: they import
nothing from :mod:`recnorm.nn`, never see a module, and never touch module state. Whatever a kernel
learns that a module must remember (the batch statistics that running averages are made of) comes
back in its result, a :class:`DirectionResult`, and the layer decides what to do with it.

Sites (where a normalization can sit in a cell):

* ``"ih"``: the input term ``W_ih x_t``, ``(B, G*H)``;
* ``"hh"``: the recurrent term ``W_hh h_{t-1}``, ``(B, G*H)``;
* ``"gates"``: the joint term ``W_ih x_t + W_hh h_{t-1}`` (one norm over both, instead of ``ih`` and
  ``hh``; not defined for the GRU, whose reset gate multiplies the recurrent term alone);
* ``"cell"``: the LSTM cell ``c_t``, ``(B, H)``; normalized inside the output tanh only, or also
  carried to the next step (``DirectionWork.carry_cell_norm``).

A norm descriptor's statistic is one of :data:`STATS`:

* ``"none"``: the site is not normalized (no descriptor is needed; ``None`` means the same);
* ``"row"``: per example and step, over each group of features (layer norm, RMSNorm);
* ``"step"``: per time step, over the rows valid at that step (recurrent batch norm); the running
  statistics have one slot per step, steps past the last slot share it;
* ``"shared"``: per step over the valid rows, like ``"step"``, but one slot for every step (one
  BatchNorm reused at every step, the naive horizontal BN);
* ``"sequence"``: over every valid (t, b) position of the batch at once (sequence-wise BN).

``center`` says whether the statistic subtracts a mean (layer and batch norm) or only rescales by
the root mean square (RMSNorm): ``y = (x - mean) / sqrt(var + eps)`` or ``y = x / sqrt(mean(x^2) + eps)``,
then ``y * weight + bias``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "STATS",
    "BATCH_STATS",
    "SITES",
    "CELL_KINDS",
    "NormDesc",
    "CellDesc",
    "DirectionWork",
    "BatchMoments",
    "DirectionResult",
]

STATS = ("none", "row", "step", "shared", "sequence")
BATCH_STATS = ("step", "shared", "sequence")
SITES = ("ih", "hh", "gates", "cell")
# The cell math the fast kernels implement. A cell whose math is anything else has kind None and runs on
# the reference loop (or the export path), which call its ``step``.
CELL_KINDS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


@dataclasses.dataclass(frozen=True, eq=False)
class NormDesc:
    """One normalization site, as data.

    Attributes:
        stat: one of :data:`STATS`.
        num_features: F, the width of the normalized term.
        center: subtract the mean (True) or only divide by the root mean square (False).
        groups: sizes of the feature groups a ``"row"`` statistic normalizes separately (sum F).
        weight, bias: the affine gain and shift, ``(F,)`` each, or None (gain 1, shift 0).
        eps: added to the variance (or mean square).
        running_mean, running_var: ``(S, F)`` population statistics of a batch statistic, one slot per
            tracked step (``S = 1`` for ``"shared"`` and ``"sequence"``). Read, never written, by kernels.
        num_batches_tracked: ``(S,)`` how often each slot was updated; eval uses slot
            ``min(t, last slot with a count > 0)``.
        momentum: the running-average factor (None: cumulative average); used by whoever updates the
            running statistics from a :class:`DirectionResult`, not by kernels.
        batch_stats: normalize with the batch's statistics (training) instead of the population ones.
            Steps with fewer than 2 valid rows use the population statistics even then.
        sync: take batch statistics over the rows of every process of ``process_group``.
    """

    stat: str
    num_features: int
    center: bool = True
    groups: Tuple[int, ...] = ()
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    eps: float = 1e-5
    running_mean: Optional[Tensor] = None
    running_var: Optional[Tensor] = None
    num_batches_tracked: Optional[Tensor] = None
    momentum: Optional[float] = 0.1
    batch_stats: bool = False
    sync: bool = False
    process_group: Any = None

    def __post_init__(self) -> None:
        if self.stat not in STATS:
            raise ValueError(f"NormDesc.stat must be one of {STATS}, got {self.stat!r}")
        if not self.groups:
            object.__setattr__(self, "groups", (int(self.num_features),))
        if sum(self.groups) != self.num_features:
            raise ValueError(f"NormDesc.groups must sum to num_features={self.num_features}, got {self.groups}")
        if self.stat in BATCH_STATS and (self.running_mean is None or self.running_var is None or self.num_batches_tracked is None):
            raise ValueError(f"a {self.stat!r} statistic needs running_mean, running_var and num_batches_tracked")

    @property
    def is_batch(self) -> bool:
        """Whether the statistic is taken over a batch (and keeps population statistics)."""
        return self.stat in BATCH_STATS

    @property
    def per_step(self) -> bool:
        """Whether the statistic is taken per step inside the time loop (``"step"``, ``"shared"``)."""
        return self.stat in ("step", "shared")

    def tensors(self) -> Tuple[Optional[Tensor], ...]:
        return (self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked)


@dataclasses.dataclass(frozen=True, eq=False)
class CellDesc:
    """The gate math of a cell.

    Attributes:
        kind: one of :data:`CELL_KINDS` when the math is exactly that cell's (the fast kernels then
            serve it), else None.
        num_gates: G, the number of H-sized blocks of the gate pre-activations.
        state_size: 1 for ``h``, 2 for ``(h, c)``.
        step: the reference math of one step,
            ``step(gi, gh, state, norm_c, carry, weight_hr) -> (h_t, new_state)``: ``gi`` and ``gh``
            are the two (normalized, biased) gate terms (with a joint gate norm, ``gi`` holds their
            normalized sum and ``gh`` is None), ``norm_c`` a function normalizing the cell or None,
            ``carry`` whether the normalized cell is carried to the next step.
    """

    kind: Optional[str]
    num_gates: int
    state_size: int
    step: Callable[..., Tuple[Tensor, Tuple[Tensor, ...]]]


@dataclasses.dataclass(frozen=True, eq=False)
class DirectionWork:
    """Everything one direction of one layer computes with, as data.

    ``weight_ih`` is ``(G*H, F)``, ``weight_hh`` ``(G*H, P or H)``, biases ``(G*H,)``, ``weight_hr``
    ``(P, H)`` (LSTM with ``proj_size`` only). ``norms`` maps sites to descriptors (absent or None:
    not normalized). ``step_offset`` is the index of the first step, for per-step statistics of a cell
    run one step at a time. ``on_output(t, h_t)``, if given, is called after every step (diagnostics;
    only the reference loop calls it).

    ``zoneout`` (Krueger et al. 2017) holds one entry per state tensor (``h``, then the LSTM's ``c``);
    missing entries and None leave that state alone. After each step, the new state ``s~_t`` that the cell
    computed is mixed with the previous one:

    * a float ``p`` (eval): ``s_t = p * s_{t-1} + (1 - p) * s~_t``;
    * a tensor ``d`` (training) of 0/1 keep indicators, one row per row of ``x`` (``(N, W)`` packed rows
      or ``(T, B, W)`` for a full batch, ``W`` the state's width): ``s_t = d_t * s_{t-1} + (1 - d_t) * s~_t``.
      Any dtype; the layers draw bool indicators (a byte each: the fused kernels keep them for backward).

    The zoned ``h_t`` is the step's output and the next step's input; the cell norm, gates and output of
    step t are computed from ``s~_t``, as in the paper.
    """

    cell: CellDesc
    weight_ih: Tensor
    weight_hh: Tensor
    bias_ih: Optional[Tensor] = None
    bias_hh: Optional[Tensor] = None
    weight_hr: Optional[Tensor] = None
    norms: Dict[str, Optional[NormDesc]] = dataclasses.field(default_factory=dict)
    carry_cell_norm: bool = False
    step_offset: int = 0
    on_output: Optional[Callable[[int, Tensor], None]] = None
    zoneout: Tuple[Optional[Union[float, Tensor]], ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.norms) - set(SITES)
        if unknown:
            raise ValueError(f"unknown norm sites {sorted(unknown)}; expected a subset of {SITES}")
        if len(self.zoneout) > self.cell.state_size:
            raise ValueError(f"zoneout has {len(self.zoneout)} entries but the cell has {self.cell.state_size} state tensor(s)")
        for z in self.zoneout:
            if z is not None and not isinstance(z, Tensor) and not 0.0 <= float(z) <= 1.0:
                raise ValueError(f"a zoneout rate must be in [0, 1], got {z!r}")
        if self.norm("gates") is not None and (self.norm("ih") is not None or self.norm("hh") is not None):
            raise ValueError("a joint 'gates' norm replaces the 'ih' and 'hh' norms; give one or the other")

    def norm(self, site: str) -> Optional[NormDesc]:
        """The site's descriptor, or None where it is not normalized."""
        d = self.norms.get(site)
        return None if d is None or d.stat == "none" else d

    def present_norms(self) -> Dict[str, NormDesc]:
        out = {}
        for site in SITES:
            d = self.norm(site)
            if d is not None:
                out[site] = d
        return out

    def batch_norms(self) -> Dict[str, NormDesc]:
        """The sites whose descriptor takes batch statistics."""
        return {s: d for s, d in self.present_norms().items() if d.is_batch}

    def training_batch_norms(self) -> Dict[str, NormDesc]:
        """The sites that normalize with batch statistics in this call (and so return them)."""
        return {s: d for s, d in self.batch_norms().items() if d.batch_stats}

    def zone(self, k: int) -> Optional[Union[float, Tensor]]:
        """The zoneout of state ``k`` (a rate, a tensor of keep indicators), or None where there is none."""
        z = self.zoneout[k] if k < len(self.zoneout) else None
        if z is None or (not isinstance(z, Tensor) and float(z) == 0.0):
            return None
        return z

    @property
    def has_zoneout(self) -> bool:
        return any(self.zone(k) is not None for k in range(len(self.zoneout)))

    def replace(self, **changes: Any) -> "DirectionWork":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, eq=False)
class BatchMoments:
    """The batch statistics one site used in one call, for its running averages.

    ``steps`` ``(K,)`` holds the absolute step index of each row (``step_offset + t``; a single 0 for a
    ``"sequence"`` statistic), ``mean`` and ``var`` ``(K, F)`` the batch mean and biased variance (mean
    square when not centred), ``count`` ``(K,)`` the number of rows they are over. Rows with
    ``count < 2`` were normalized with population statistics and carry no information. ``last_step``, where
    the producer knows it without reading a tensor, is ``steps``' largest value (None: read ``steps``).
    """

    steps: Tensor
    mean: Tensor
    var: Tensor
    count: Tensor
    last_step: Optional[int] = None


@dataclasses.dataclass(frozen=True, eq=False)
class DirectionResult:
    """What running one direction gives back: packed output rows, final states, and batch moments."""

    output: Tensor
    state: Tuple[Tensor, ...]
    moments: Dict[str, BatchMoments] = dataclasses.field(default_factory=dict)


def fixed_size_check(check: Callable[[], Any]) -> bool:
    """``check()`` on sizes that the weights fix (the same for every input). Under torch.jit.trace sizes are
    traced values and comparing one warns that the trace might not generalize; here it does, so the warning
    is silenced there (only there: torch.compile cannot capture ``catch_warnings``)."""
    if not torch.jit.is_tracing():
        return bool(check())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return bool(check())


def batch_sizes_list(batch_sizes: Optional[Sequence[int]], rows: int, batch: int) -> list:
    """Rows per step as a list: the given ones, or ``[batch] * (rows // batch)`` for a full batch."""
    if batch_sizes is not None:
        return [int(b) for b in batch_sizes]
    return [batch] * (rows // batch) if batch else []
