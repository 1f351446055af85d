"""Normalization modules and the registry of normalization schemes.

Two modules hold every normalization's parameters and state, and describe themselves to the kernels as
plain data (:meth:`descriptor`, a :class:`~recnorm.kernels.contract.NormDesc`):

* :class:`RecurrentBatchNorm` -- batch normalization whose running statistics are indexed by a time step
  slot. With ``max_steps=T`` it is the per-step BN of Cooijmans et al.; with ``max_steps=1`` it is one
  BatchNorm shared across time (the naive horizontal BN) or, with ``scope="sequence"``, sequence-wise BN
  over every valid (t, b) position (Laurent et al.).
* :class:`GroupedLayerNorm` -- layer normalization (or, with ``center=False``, RMSNorm) over groups of
  features of each row (Ba et al.; Zhang and Sennrich).

A *normalization scheme* (``"batch"``, ``"layer"``, ...) says which module sits at which *site* of a
recurrent cell:

* ``"ih"``: the input term ``W_ih x_t`` (shape ``(B, G*H)``),
* ``"hh"``: the recurrent term ``W_hh h_{t-1}`` (shape ``(B, G*H)``),
* ``"gates"``: the joint term ``W_ih x_t + W_hh h_{t-1}``, instead of ``"ih"`` and ``"hh"``,
* ``"cell"``: the LSTM cell ``c_t`` inside the output ``tanh`` (shape ``(B, H)``).

Kernels never touch these modules. A call that normalized with batch statistics returns them
(:class:`~recnorm.kernels.contract.BatchMoments`), and the layer hands them to :meth:`RecurrentBatchNorm.record`,
which updates the running averages (or pools them during :func:`recnorm.recompute_population_statistics`,
or reports them to :func:`recnorm.diagnostics.capture`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from recnorm.kernels import fused
from recnorm.kernels import functional as kfn
from recnorm.kernels.contract import BatchMoments, NormDesc
from recnorm.kernels.stats import batch_moments, count_valid, degenerate_features, stats_dtype, sync_active
from recnorm.registry import Registry

__all__ = [
    "RecurrentBatchNorm",
    "SequenceBatchNorm",
    "GroupedLayerNorm",
    "NormSpec",
    "NORMS",
    "register_norm",
    "norm_label",
    "list_norms",
    "get_norm",
    "create_norm",
    "resolve_norm_kwargs",
    "SITES",
    "convert_sync_batchnorm",
    "OPTION_CHECKS",
    "OPTION_SITES",
    "GATE_GROUPS",
]

log = logging.getLogger(__name__)

SITES = ("ih", "hh", "gates", "cell")

_WARNED_MAX_STEPS: set = set()  # max_steps values whose overrun was reported (RecurrentBatchNorm._check_steps)


def _traced(t: Tensor) -> bool:
    """Whether ``t`` is seen by torch.func (vmap, grad) or torch.compile, where reading its value in Python
    is refused or breaks the graph."""
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t)


class RecurrentBatchNorm(nn.Module):
    r"""Batch normalization with running statistics indexed by time step.

    For a call at step ``t`` on rows ``x`` of shape ``(N, F)`` in training mode:

    .. math::
        \mu_t = \frac{1}{n}\sum_{b \in V} x_b, \quad
        \sigma^2_t = \frac{1}{n}\sum_{b \in V} (x_b - \mu_t)^2, \quad
        y_b = \gamma \frac{x_b - \mu_t}{\sqrt{\sigma^2_t + \epsilon}} + \beta

    where :math:`V` are the valid rows and :math:`n = |V|` (with ``center=False``, :math:`\mu_t = 0` and
    :math:`\sigma^2_t` is the mean square). Afterwards the running statistics of slot
    :math:`s = \min(t, S-1)` (``S = max_steps``) move towards :math:`\mu_t` and the unbiased variance
    with weight :math:`w = \max(\text{momentum}, 1/k)` for the slot's :math:`k`-th update (``momentum=None``:
    :math:`w = 1/k`, a cumulative average); so the first update replaces the initial (0, 1) and the first
    1/momentum updates are a plain average. Calls of one sequence update the slots in step order.
    :math:`\gamma` and :math:`\beta` are shared by all slots.

    In eval mode, step :math:`t` uses the population statistics of slot :math:`\min(t, s_{last})`, where
    :math:`s_{last}` is the last slot that has ever been updated: every step at or beyond the last
    tracked step reuses the last step's statistics (Cooijmans et al., section 4). :math:`s_{last}` is read
    from ``num_batches_tracked`` at every call, so buffers written in place are always seen. A feature
    whose stored variance is zero up to rounding (32 units relative to its stored mean; see
    :func:`recnorm.kernels.stats.population_degenerate`) normalizes to 0, as training does with such a
    feature: without it, the mean's lag behind the weights, divided by :math:`\sqrt{\epsilon}`, feeds
    the cell values training never produced (``docs/eval_statistics.md``). Running averages lag weights
    that keep moving: evaluate after :func:`recnorm.calibrate`, which stores exact statistics; evaluating
    on averages that training changed since the last calibration logs a one-time warning.

    Sequences longer than ``max_steps``: steps ``S-1`` and beyond share the last slot (in training and in
    eval); the first training call that runs past it logs a warning naming the length and the
    ``norm_kwargs={'max_steps': ...}`` that would give every step its own slot.

    Non-finite batch statistics (a NaN or inf anywhere in a step's valid rows): that step's output is
    non-finite, as with ``torch.nn.BatchNorm1d``, but its statistics never enter the running averages (nor
    a population pass of :func:`recnorm.calibrate`), so clean data evaluated later is unaffected; a warning
    names the time steps left out.

    Special cases, handled instead of returning NaN or inf:

    * fewer than 2 valid rows in training (say the last sequence of a packed batch, or an unbatched
      input): there is no batch variance, so the step normalizes with the slot's population statistics
      as they were when the call started, and records nothing;
    * a feature whose values are identical across the valid rows (zero batch variance; see
      :func:`recnorm.kernels.stats.degenerate_features`): its normalized value is exactly 0 (so the output
      is :math:`\beta`) and no gradient flows back through it. The exact gradient there is
      :math:`\gamma/\sqrt{\epsilon}\,(g_b - \bar g)`: it has zero mean over the batch, so while the
      inputs are identical across the batch it contributes nothing to any parameter's gradient, yet
      its repeated factor :math:`\gamma/\sqrt{\epsilon}` overflows after a few dozen constant steps
      (Cooijmans et al., section 5.1). Dropping it leaves parameter gradients unchanged and finite;
      only the per-example gradient with respect to such constant inputs or initial states loses that
      zero-mean part.

    Low precision: statistics of bfloat16 and float16 inputs are taken in float32.

    Data parallel: by default each process normalizes with its own batch, as ``torch.nn.BatchNorm1d``
    does. With ``sync = True`` (set by :func:`recnorm.convert_sync_batchnorm`), training calls take
    :math:`V` over the valid rows of every process of ``process_group``, so all processes normalize
    with, and record, the same statistics; the "fewer than 2 rows" rule then counts the rows of all
    processes. Eval makes no collective call.

    Checkpoints store the running statistics of the tracked slots only (slots ``0 .. s_last``), so a
    ``state_dict`` does not grow with ``max_steps``; loading pads the rest as untracked, and checkpoints
    holding all ``max_steps`` slots load as before.

    Args:
        num_features: F.
        max_steps: S, number of time-step slots of running statistics. 1 shares them across time.
        gain_init: initial :math:`\gamma`.
        shift: learn :math:`\beta` (initialised to 0). Without it, :math:`\beta = 0`.
        momentum: running-average factor (the least weight of an update), or ``None`` for a cumulative
            average.
        eps: added to the variance.
        scope: ``"step"`` (statistics per step inside the time loop) or ``"sequence"`` (one call on the
            rows of all time steps; statistics over every valid (t, b) position).
        center: subtract the mean (batch norm) or only divide by the root mean square.
    """

    def __init__(
        self,
        num_features: int,
        *,
        max_steps: int = 1,
        gain_init: float = 1.0,
        shift: bool = True,
        momentum: Optional[float] = 0.1,
        eps: float = 1e-5,
        scope: str = "step",
        center: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        if scope not in ("step", "sequence"):
            raise ValueError(f"scope must be 'step' or 'sequence', got {scope!r}")
        self.scope = scope
        self.max_steps = _check_option("max_steps", max_steps)
        self.momentum = _check_option("momentum", momentum)
        self.eps = _check_option("eps", eps)
        self.gain_init = _check_option("gain_init", gain_init)
        self.num_features = int(num_features)
        self.center = bool(center)
        self.weight = nn.Parameter(torch.empty(self.num_features, **fk))
        self.bias = nn.Parameter(torch.empty(self.num_features, **fk)) if shift else None
        self.register_buffer("running_mean", torch.zeros(self.max_steps, self.num_features, **fk))
        self.register_buffer("running_var", torch.ones(self.max_steps, self.num_features, **fk))
        self.register_buffer("num_batches_tracked", torch.zeros(self.max_steps, dtype=torch.long, device=device))
        self._population: Optional[Dict[str, Tensor]] = None  # set by begin_population_pass
        # Whether training moved the running averages since the last calibration (not saved): evaluating
        # on them then logs a one-time warning that points to recnorm.calibrate.
        self._updated_since_calibration = False
        self._observers: List[Callable[[int, Tensor, Tensor, int], None]] = []
        self.sync = False  # synchronized statistics across processes (recnorm.convert_sync_batchnorm)
        self.process_group: Any = None  # None: the default (world) group
        self.reset_parameters()

    @property
    def stat(self) -> str:
        """The statistic kind of the kernel contract: ``"step"``, ``"shared"`` or ``"sequence"``."""
        if self.scope == "sequence":
            return "sequence"
        return "step" if self.max_steps > 1 else "shared"

    def synced(self) -> bool:
        """Whether this call's statistics would involve other processes (training, sync, group of 2+)."""
        return self.training and sync_active(self.sync, self.process_group)

    def descriptor(self) -> NormDesc:
        return NormDesc(
            stat=self.stat,
            num_features=self.num_features,
            center=self.center,
            weight=self.weight,
            bias=self.bias,
            eps=self.eps,
            running_mean=self.running_mean,
            running_var=self.running_var,
            num_batches_tracked=self.num_batches_tracked,
            momentum=self.momentum,
            batch_stats=self.training,
            sync=self.sync and self.training,
            process_group=self.process_group,
        )

    def reset_running_stats(self) -> None:
        self._updated_since_calibration = False
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        with torch.no_grad():
            self.weight.fill_(self.gain_init)
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, max_steps={self.max_steps}, gain_init={self.gain_init}, "
            f"shift={self.bias is not None}, momentum={self.momentum}, eps={self.eps}"
            + ("" if self.center else ", center=False")
            + (", scope='sequence'" if self.scope == "sequence" else "")
            + (", sync=True" if self.sync else "")
        )

    def last_tracked_slot(self) -> int:
        """Index of the last slot with population statistics (``max_steps - 1`` if none has any)."""
        tracked = torch.nonzero(self.num_batches_tracked > 0)
        return int(tracked.max()) if tracked.numel() else self.max_steps - 1

    # -- standalone use ----------------------------------------------------------------------------
    def forward(self, x: Tensor, step: int = 0, mask: Optional[Tensor] = None) -> Tensor:
        """Normalize the rows ``x`` ``(N, F)`` of one step (``mask``: the valid rows), updating the running
        statistics in training mode. The recurrent layers do not call this: their kernels read
        :meth:`descriptor` and hand the batch statistics to :meth:`record`."""
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input of shape (N, {self.num_features}), got {tuple(x.shape)}")
        d = self.descriptor()
        sync = {"sync": d.sync, "process_group": self.process_group}
        n = count_valid(x, mask, **sync) if d.batch_stats else 0
        if n < 2:
            mean, var, degenerate = kfn.population_moments(d, torch.tensor([int(step)], device=x.device))
            dt = stats_dtype(x.dtype)
            return kfn.normalize_with(d, x, mean[0].to(dt), var[0].to(dt), degenerate[0])
        if mask is None and not d.sync:  # every row valid (packed data, a full batch): one autograd node
            y, mean, var = kfn.batch_norm_rows(d, x)
        else:
            mean, var = batch_moments(x, mask, center=self.center, **sync)
            y = kfn.normalize_with(d, x, mean, var, degenerate_features(mean, var))
        self.record(BatchMoments(
            steps=torch.tensor([int(step)], device=x.device), mean=mean.detach().unsqueeze(0), var=var.detach().unsqueeze(0),
            count=torch.tensor([n], device=x.device),
        ))  # fmt: skip
        return y

    # -- running statistics ------------------------------------------------------------------------
    def record(self, m: BatchMoments) -> None:
        """Fold a call's batch moments into the running statistics (steps in order, as if each step had
        updated them in turn); or pool them during a population pass; and report them to observers."""
        if self._observers:
            with torch.no_grad():
                for observe in self._observers:
                    for k in range(m.steps.shape[0]):
                        if int(m.count[k]) >= 2:
                            observe(int(m.steps[k]), m.mean[k], m.var[k], int(m.count[k]))
        self._check_steps(m)
        if self._population is None:  # the same update in one C++ call where it serves (it declines traced tensors)
            done = fused.running_stats_update(self.running_mean, self.running_var, self.num_batches_tracked, m, self.momentum)
            if done is not None:
                if done[1]:
                    self._warn_non_finite(m, done[0])
                self._updated_since_calibration = True
                return
        with torch.no_grad():
            finite = self._finite_steps(m)
            if self._population is not None:
                self._pool(m, finite)
                return
            self._update_reference(m, finite)

    @torch.no_grad()
    def _update_reference(self, m: BatchMoments, finite: Tensor) -> None:
        """The running-statistics update of :meth:`record` in tensor operations: the readable reference of
        ``fused.running_stats_update`` (csrc/running_stats.h), and what runs where that does not serve."""
        S = self.max_steps
        dev = self.running_mean.device
        slots = m.steps.to(dev).clamp(max=S - 1)
        valid = (m.count.to(dev) >= 2) & finite.to(dev)  # (K,)
        n = m.count.to(dev).clamp(min=2).to(self.running_var.dtype)
        mean = m.mean.to(self.running_mean.dtype)
        unbiased = m.var.to(self.running_var.dtype) * (n / (n - 1)).unsqueeze(1)
        mean, unbiased = mean.masked_fill(~valid.unsqueeze(1), 0.0), unbiased.masked_fill(~valid.unsqueeze(1), 1.0)
        vf = valid.to(mean.dtype)
        tail = slots == S - 1  # steps sharing the last slot: possibly several per call, applied in order
        # k: the number of the update of its slot that each step makes. The k-th update has weight 1/k
        # (cumulative average), or max(momentum, 1/k): the first update replaces the initial (0, 1) and the
        # first 1/momentum updates are a plain average (rule R1 of docs/eval_statistics.md).
        before = self.num_batches_tracked.index_select(0, slots).to(mean.dtype)
        k = (before + torch.where(tail, torch.cumsum(vf * tail, 0), vf)).clamp(min=1)
        f = vf / k if self.momentum is None else vf * torch.clamp(1.0 / k, min=float(self.momentum))
        # Slot S-1: new = prod(1 - f) * old + sum_k f_k prod_{j > k} (1 - f_j) value_k over its steps.
        g = torch.where(tail, 1 - f, torch.ones_like(f))
        suffix = torch.flip(torch.cumprod(torch.flip(g, [0]), 0), [0])  # prod_{j >= k}
        after = torch.cat([suffix[1:], suffix.new_ones(1)])  # prod_{j > k}
        w_tail = (f * after * tail).unsqueeze(1)
        keep_tail = suffix[0]
        for buf, value in ((self.running_mean, mean), (self.running_var, unbiased)):
            old = buf.index_select(0, slots)
            own = old + f.unsqueeze(1) * (value - old)  # lerp: a slot of its own
            shared = keep_tail * old + (w_tail * value).sum(0, keepdim=True)
            buf.index_copy_(0, slots, torch.where(tail.unsqueeze(1), shared, own))
        self.num_batches_tracked.index_add_(0, slots, valid.to(self.num_batches_tracked.dtype))
        self._updated_since_calibration = True

    def _check_steps(self, m: BatchMoments) -> None:
        """Warn (once per process and ``max_steps`` value) when a training sequence runs past the last slot of
        per-step statistics."""
        if self.stat != "step" or self.max_steps in _WARNED_MAX_STEPS:
            return
        if m.last_step is not None:
            last = m.last_step
        elif m.steps.numel() == 0 or _traced(m.steps):
            return
        else:
            last = int(m.steps.max())
        if last >= self.max_steps:
            _WARNED_MAX_STEPS.add(self.max_steps)
            log.warning(
                "recnorm: a sequence of %d steps is longer than max_steps=%d of per-step batch norm (%d features): "
                "steps %d to %d share the last slot's running statistics. To give every step its own, raise it, "
                "e.g. norm_kwargs={'max_steps': %d} (a checkpoint stores the tracked slots only, so a larger value "
                "costs nothing on disk)",
                last + 1, self.max_steps, self.num_features, self.max_steps - 1, last, last + 1,
            )

    def _finite_steps(self, m: BatchMoments) -> Tensor:
        """``(K,)`` whether each step's batch moments are finite; warns (naming the steps) when some are not.
        Non-finite statistics (a NaN or inf in the batch) never enter the running averages or a population
        pass: one such batch would otherwise poison its slots for every later evaluation."""
        finite = torch.isfinite(m.mean).all(1) & torch.isfinite(m.var).all(1) | (m.count < 2).to(m.mean.device)
        if _traced(finite):  # no data-dependent branch under torch.func or compile: the mask applies, unannounced
            return finite
        if not bool(finite.all()):
            self._warn_non_finite(m, finite)
        return finite

    def _warn_non_finite(self, m: BatchMoments, finite: Tensor) -> None:
        """Warns, naming the steps, that the steps where ``finite`` is False were left out."""
        bad = m.steps[~finite.to(m.steps.device)].tolist()
        shown = ", ".join(str(t) for t in bad[:8]) + (f", ... ({len(bad)} steps)" if len(bad) > 8 else "")
        log.warning(
            "recnorm: batch norm (%d features) got non-finite batch statistics (NaN or inf in the batch) at time"
            " "
            "%s %s of its %s call; they were left out of the running statistics",
            self.num_features, "steps" if len(bad) > 1 else "step", shown, "population-pass" if self._population is not None else "training",
        )

    def _pool(self, m: BatchMoments, finite: Optional[Tensor] = None) -> None:
        acc = self._population
        slots = m.steps.to(acc["count"].device).clamp(max=self.max_steps - 1)
        keep = (m.count >= 2) if finite is None else (m.count >= 2) & finite.to(m.count.device)
        n = m.count.to(acc["count"].device).to(torch.float64) * keep.to(acc["count"].device)
        keep = keep.to(acc["count"].device).unsqueeze(1)
        mean64 = m.mean.double().to(acc["count"].device).masked_fill(~keep, 0.0)
        var64 = m.var.double().to(acc["count"].device).masked_fill(~keep, 0.0)
        acc["count"].index_add_(0, slots, n)
        acc["sum"].index_add_(0, slots, n.unsqueeze(1) * mean64)
        acc["sumsq"].index_add_(0, slots, n.unsqueeze(1) * (var64 + mean64 * mean64))

    # -- exact population statistics -----------------------------------------------------------------
    def begin_population_pass(self) -> None:
        """Start pooling exact per-slot sums instead of updating running averages."""
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.running_mean.device)  # noqa: E731
        self._population = {
            "count": z(self.max_steps),
            "sum": z(self.max_steps, self.num_features),
            "sumsq": z(self.max_steps, self.num_features),
        }

    @torch.no_grad()
    def end_population_pass(self) -> None:
        """Replace the running statistics by the pooled statistics of the pass.

        Slot ``s`` gets the mean and unbiased variance (mean square when not centred) of every valid row
        seen at that slot. Slots that saw no row are reset (mean 0, variance 1, untracked), so eval reuses
        the last seen slot.
        """
        acc, self._population = self._population, None
        if acc is None:
            raise RuntimeError("end_population_pass() called without begin_population_pass()")
        self.reset_running_stats()
        count = acc["count"]
        seen = count > 0
        n = count.clamp(min=1).unsqueeze(1)
        mean = acc["sum"] / n
        if self.center:
            var = (acc["sumsq"] - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)
        else:
            var = acc["sumsq"] / (n - 1).clamp(min=1)
            mean = torch.zeros_like(mean)
        self.running_mean[seen] = mean[seen].to(self.running_mean.dtype)
        self.running_var[seen] = var[seen].to(self.running_var.dtype)
        self.num_batches_tracked[seen] = 1
        self._updated_since_calibration = False

    def abort_population_pass(self) -> None:
        self._population = None

    # -- checkpoints: the tracked slots only -------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        tracked = torch.nonzero(self.num_batches_tracked > 0)
        keep = int(tracked.max()) + 1 if tracked.numel() else 0
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            key = prefix + name
            if key in destination:  # a copy: torch.save of a slice would store the whole buffer
                destination[key] = destination[key][:keep].clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self._updated_since_calibration = False  # a checkpoint's provenance is unknown: no warning
        fills = {"running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}
        for name, fill in fills.items():
            key = prefix + name
            value = state_dict.get(key)
            if not isinstance(value, Tensor):
                continue
            own = getattr(self, name)
            if value.dim() != own.dim() or value.shape[1:] != own.shape[1:] or value.shape[0] > own.shape[0]:
                continue  # torch reports the mismatch
            if value.shape[0] < own.shape[0]:  # a checkpoint of the tracked slots only: the rest untracked
                pad = torch.full((own.shape[0] - value.shape[0],) + tuple(own.shape[1:]), fill, dtype=value.dtype, device=value.device)
                state_dict[key] = torch.cat([value, pad], 0)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every :class:`RecurrentBatchNorm` in ``module`` synchronize its training statistics across
    the processes of ``process_group`` (default: the world), like
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`. Changes ``module`` in place and returns it.

    Every process must then run the same layers in the same order (as DistributedDataParallel does);
    batches may differ in size and length between processes, including sequences that end at
    different steps: per-step statistics at step t pool the rows that are valid at t on every process.
    Synchronized layers run the reference loop (the fused kernels compute statistics locally).
    """
    for m in module.modules():
        if isinstance(m, RecurrentBatchNorm):
            m.sync = True
            m.process_group = process_group
    return module


class SequenceBatchNorm(RecurrentBatchNorm):
    r"""Batch normalization of sequences over their valid positions: padding-aware ``BatchNorm1d``.

    For every feature, over the valid positions :math:`V` (every (t, b) with :math:`t <` length of
    sequence b) of a training batch:

    .. math::
        \mu = \frac{1}{|V|}\sum_{(t,b) \in V} x_{t,b}, \quad
        \sigma^2 = \frac{1}{|V|}\sum_{(t,b) \in V} (x_{t,b} - \mu)^2, \quad
        y_{t,b} = \gamma \frac{x_{t,b} - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    In eval mode :math:`\mu, \sigma^2` are the running statistics. Running averages follow
    :class:`RecurrentBatchNorm` (unbiased variance; the k-th update has weight ``max(momentum, 1/k)``, so the
    first replaces the initial (0, 1): rule R1 of ``docs/eval_statistics.md``); they are stored as
    ``running_mean``, ``running_var`` of shape ``(1, F)`` and ``num_batches_tracked`` ``(1,)``.
    :func:`recnorm.calibrate` replaces them by the exact statistics of a pass over given batches, and
    :func:`recnorm.convert_sync_batchnorm` makes training statistics span every process. Statistics of
    16-bit inputs are taken in float32; the output has the input's dtype. A training batch with fewer than
    2 valid positions normalizes with the running statistics; a feature constant over the valid positions
    normalizes to 0 (see :class:`RecurrentBatchNorm`).

    Padding never enters the statistics. Every position, padding included, is normalized with them (as
    Keras 3's masked ``BatchNormalization`` does); what sits at padded positions of the output is whatever
    the padding normalizes to, and does not matter downstream of ``pack_padded_sequence``.

    It is the "BN between stacked layers" placement (LSTM -> BN -> LSTM): ``recnorm.LSTM(...,
    between_layers="batch")`` puts one after every layer but the last.

    Args:
        num_features: F, the size of the last dimension.
        eps, momentum, affine: as in ``torch.nn.BatchNorm1d`` (gain 1 and shift 0 when ``affine``;
            ``momentum=None`` is a cumulative average).
        batch_first: whether padded input is ``(B, T, F)`` rather than ``(T, B, F)``.
        sync: take training statistics over the valid positions of every process of ``process_group``
            (default: the world), as :func:`recnorm.convert_sync_batchnorm` sets.

    Inputs: a ``PackedSequence`` (data ``(N, F)``); or a padded tensor ``(T, B, F)`` (``(B, T, F)`` if
    ``batch_first``) with ``lengths`` ``(B,)`` (all positions valid when omitted); or rows ``(N, F)``, all
    valid. Output: the same form (a ``PackedSequence`` with the same batch sizes and indices, or a tensor
    of the input's shape).

    Example::

        >>> bn = recnorm.SequenceBatchNorm(20)
        >>> x = torch.randn(7, 3, 20)
        >>> y = bn(x, lengths=torch.tensor([7, 2, 5]))    # statistics over the 14 valid positions
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        *,
        batch_first: bool = False,
        sync: bool = False,
        process_group: Any = None,
        device=None,
        dtype=None,
    ) -> None:
        self.affine = bool(affine)
        super().__init__(
            num_features, max_steps=1, gain_init=1.0, shift=self.affine, momentum=momentum, eps=eps, scope="sequence",
            device=device, dtype=dtype,
        )  # fmt: skip
        if not self.affine:
            self.register_parameter("weight", None)
        self.batch_first = bool(batch_first)
        self.sync = bool(sync)
        self.process_group = process_group

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
            + (", batch_first=True" if self.batch_first else "")
            + (", sync=True" if self.sync else "")
        )

    def forward(self, input, lengths: Optional[Tensor] = None):  # type: ignore[override]
        from torch.nn.utils.rnn import PackedSequence

        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("SequenceBatchNorm: a PackedSequence carries its own lengths; expected lengths=None")
            return input._replace(data=self.normalize_rows(input.data))
        if not isinstance(input, Tensor):
            raise TypeError(f"SequenceBatchNorm: expected a Tensor or PackedSequence, got {type(input).__name__}")
        if input.dim() == 2 and lengths is None:
            return self.normalize_rows(input)
        if input.dim() != 3:
            raise ValueError(
                f"SequenceBatchNorm: expected a PackedSequence, a padded 3-D tensor {'(B, T, F)' if self.batch_first else '(T, B, F)'} "
                f"or 2-D rows (N, F), got a {input.dim()}-D tensor of shape {tuple(input.shape)}"
            )
        if input.shape[-1] != self.num_features:
            raise ValueError(f"SequenceBatchNorm: expected {self.num_features} features in the last dimension, got {tuple(input.shape)}")
        if lengths is None:
            return self.normalize_rows(input.reshape(-1, self.num_features)).view_as(input)
        T, B = (input.shape[1], input.shape[0]) if self.batch_first else (input.shape[0], input.shape[1])
        lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.numel() != B or lengths.is_floating_point():
            raise ValueError(f"SequenceBatchNorm: expected lengths to be {B} integers (one per sequence), got {lengths.tolist()}")
        if int(lengths.min()) < 0 or int(lengths.max()) > T:
            raise ValueError(f"SequenceBatchNorm: lengths must be in [0, {T}] (the padded length), got {lengths.tolist()}")
        steps = torch.arange(T, device=input.device)
        valid = steps.unsqueeze(1) < lengths.to(input.device).unsqueeze(0)  # (T, B)
        if self.batch_first:
            valid = valid.t()
        y = super().forward(input.reshape(-1, self.num_features), 0, valid.reshape(-1))
        return y.view_as(input)

    def normalize_rows(self, x: Tensor) -> Tensor:
        """Normalize rows ``x`` ``(N, F)`` that are all valid (packed data, or a full batch's rows)."""
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"SequenceBatchNorm: expected rows of shape (N, {self.num_features}), got {tuple(x.shape)}")
        return super().forward(x, 0, None)


class GroupedLayerNorm(nn.Module):
    r"""Layer normalization (or RMSNorm) of each row over groups of features.

    For a row :math:`a` split into groups :math:`a^{(k)}` of sizes ``groups``:

    .. math::
        y^{(k)} = \frac{a^{(k)} - \mu^{(k)}}{\sqrt{\sigma^{2(k)} + \epsilon}}, \qquad
        y = \gamma \odot y + \beta

    with :math:`\mu^{(k)}, \sigma^{2(k)}` the mean and biased variance of the row's group (Ba et al. 2016).
    With ``center=False`` it is RMSNorm (Zhang and Sennrich 2019): :math:`\mu^{(k)} = 0` and
    :math:`\sigma^{2(k)}` is the group's mean square. Statistics belong to the example and the step alone:
    nothing is carried across time or batches, and training and eval compute the same thing.

    A group whose values are all equal (zero variance: an all-zero ``h`` or ``c`` at the start of a
    sequence, after zero-initialised biases and blank input rows; for RMSNorm, an all-zero group)
    normalizes to exactly 0 and passes no gradient. There the exact Jacobian is
    :math:`\gamma/\sqrt{\epsilon}` (about 316 gamma); over a run of such steps it overflows to inf (the
    layer-norm form of Cooijmans et al.'s section 5.1).

    Args:
        num_features: F.
        groups: sizes of the feature groups (summing to F); default one group of F.
        gain_init: initial :math:`\gamma`.
        shift: learn :math:`\beta` (initialised to 0). Without it, :math:`\beta = 0`.
        eps: added to the variance.
        center: subtract the mean (layer norm) or not (RMSNorm).
    """

    scope = "row"

    def __init__(
        self,
        num_features: int,
        *,
        groups: Optional[Sequence[int]] = None,
        gain_init: float = 1.0,
        shift: bool = True,
        eps: float = 1e-5,
        center: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.groups: Tuple[int, ...] = tuple(int(g) for g in groups) if groups else (self.num_features,)
        if sum(self.groups) != self.num_features or min(self.groups) < 1:
            raise ValueError(f"groups must be positive sizes summing to {self.num_features}, got {self.groups}")
        self.eps = _check_option("eps", eps)
        self.gain_init = _check_option("gain_init", gain_init)
        self.center = bool(center)
        self.weight = nn.Parameter(torch.empty(self.num_features, **fk))
        self.bias = nn.Parameter(torch.empty(self.num_features, **fk)) if shift else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(self.gain_init)
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, groups={self.groups}, gain_init={self.gain_init}, shift={self.bias is not None}, eps={self.eps}"
            + ("" if self.center else ", center=False")
        )

    def descriptor(self) -> NormDesc:
        return NormDesc(
            stat="row", num_features=self.num_features, center=self.center, groups=self.groups,
            weight=self.weight, bias=self.bias, eps=self.eps,
        )  # fmt: skip

    def forward(self, x: Tensor, step: Optional[int] = None, mask: Optional[Tensor] = None) -> Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"expected input with last dimension {self.num_features}, got {tuple(x.shape)}")
        return kfn.row_norm(self.descriptor(), x)


# ---------------------------------------------------------------------------------------------------
# Options: one validation for every scheme
# ---------------------------------------------------------------------------------------------------


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite_number(value: Any) -> float:
    if not _real(value) or not math.isfinite(float(value)):
        raise TypeError("a finite number")
    return float(value)


def _positive_number(value: Any) -> float:
    if not _real(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise TypeError("a positive finite number")
    return float(value)


def _momentum(value: Any) -> Optional[float]:
    if value is None:
        return None
    if not _real(value) or not 0.0 <= float(value) <= 1.0:
        raise TypeError("a number in [0, 1], or None for a cumulative average")
    return float(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise TypeError("an integer >= 1")
    return int(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("True or False")
    return value


GATE_GROUPS = ("cell", "one")


def _gate_groups(value: Any) -> str:
    if value not in GATE_GROUPS:
        raise TypeError("'cell' (the cell's own layer-norm groups: the GRU's (r, z) and n blocks separately) or 'one' "
                        "(one group over all gate features)")
    return value


# What each option name accepts: a function that returns the normalized value or raises TypeError with
# a description of what is expected. Schemes may add their own (NormSpec.checks).
OPTION_CHECKS: Dict[str, Callable[[Any], Any]] = {
    "gain_init": _finite_number,
    "eps": _positive_number,
    "momentum": _momentum,
    "max_steps": _positive_int,
    "joint": _flag,
    "carry_cell": _flag,
    "gate_groups": _gate_groups,
}

#: Options that need a site of the cell: ``joint=True`` normalizes the ``"gates"`` site, ``carry_cell=True``
#: carries the ``"cell"`` site's output. A cell without the site refuses them (its ``site_notes`` say why).
OPTION_SITES: Dict[str, str] = {"joint": "gates", "carry_cell": "cell"}


def _check_option(name: str, value: Any, checks: Optional[Mapping[str, Callable[[Any], Any]]] = None, where: str = "") -> Any:
    check = (checks or {}).get(name) or OPTION_CHECKS.get(name)
    if check is None:
        return value
    try:
        return check(value)
    except TypeError as exc:
        raise ValueError(f"{name}{where}: expected {exc}, got {value!r} ({type(value).__name__})") from None


# ---------------------------------------------------------------------------------------------------
# Registry of normalization schemes
# ---------------------------------------------------------------------------------------------------

NormBuilder = Callable[..., Optional[nn.Module]]


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """A normalization scheme: which module sits at which site of a cell.

    Attributes:
        name: registry key.
        build: ``build(site, num_features, groups, **options, device=, dtype=)`` returns the module for
            ``site`` (one of :data:`SITES`) or ``None`` if the scheme leaves that site alone. ``groups``
            are the cell's layer-norm groups for gate sites (``None`` for the cell site). Every module it
            returns has a ``descriptor()`` (see :mod:`recnorm.kernels.contract`).
        options: the ``norm_kwargs`` the scheme accepts, with their defaults.
        summary: one line for listings.
        batch_statistics: whether the scheme normalizes with batch statistics (running averages, a
            train/eval difference, batch-size effects).
        checks: validators for options :data:`OPTION_CHECKS` does not know.
        label: a short display name for reports (the engine's tables and figures); empty: ``name``.
    """

    name: str
    build: NormBuilder
    options: Dict[str, Any]
    summary: str
    batch_statistics: bool = False
    checks: Mapping[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)


NORMS: Registry[NormSpec] = Registry("norm")


def register_norm(spec: NormSpec, *, replace: bool = False) -> NormSpec:
    """Register a normalization scheme; it is then usable as ``norm=spec.name`` by every layer, by the engine
    (``recnorm train --norm``, reports labelled with ``spec.label``) and by the registry-driven tests."""
    if not isinstance(spec, NormSpec):
        raise ValueError(f"a norm is a NormSpec, got {spec!r}")
    return NORMS.register(spec, replace=replace)


def list_norms() -> List[str]:
    """Names of the registered normalization schemes (``None`` means no normalization)."""
    return NORMS.names()


def get_norm(name: Optional[str]) -> Optional[NormSpec]:
    """Resolve a scheme name; ``None`` and ``"none"`` mean no normalization."""
    if name is None or name == "none":
        return None
    if not isinstance(name, str) or name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; expected None or one of {list_norms()}")
    return NORMS.get(name)


def norm_label(name: Optional[str]) -> str:
    """The display name of a scheme for reports (:attr:`NormSpec.label`); ``"no norm"`` for None."""
    spec = get_norm(name)
    return "no norm" if spec is None else spec.label


def resolve_norm_kwargs(name: Optional[str], norm_kwargs: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The scheme's options with ``norm_kwargs`` applied and validated. An unknown name, or a value of the
    wrong type or range, raises ValueError naming the option, what was expected and what arrived."""
    spec = get_norm(name)
    if norm_kwargs is None:
        norm_kwargs = {}
    if not isinstance(norm_kwargs, Mapping):
        raise ValueError(
            f"norm_kwargs must be a dict of options such as {{'eps': 1e-5}}, got {norm_kwargs!r} ({type(norm_kwargs).__name__})"
        )
    if spec is None:
        if norm_kwargs:
            raise ValueError(f"norm_kwargs {sorted(norm_kwargs)} given but norm is None; pass a norm from {list_norms()}")
        return {}
    unknown = sorted(set(norm_kwargs) - set(spec.options))
    if unknown:
        raise ValueError(f"unknown norm_kwargs {unknown} for norm {name!r}; expected a subset of {sorted(spec.options)}")
    where = f" (norm_kwargs of norm {name!r})"
    return {k: _check_option(k, v, spec.checks, where) for k, v in {**spec.options, **dict(norm_kwargs)}.items()}


def create_norm(
    name: Optional[str],
    site: str,
    num_features: int,
    groups: Optional[Sequence[int]] = None,
    norm_kwargs: Optional[Dict[str, Any]] = None,
    **factory_kwargs: Any,
) -> Optional[nn.Module]:
    """Build the module that scheme ``name`` puts at ``site`` (or ``None``)."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
    spec = get_norm(name)
    if spec is None:
        return None
    options = resolve_norm_kwargs(name, norm_kwargs)
    return spec.build(site, num_features, groups, **options, **factory_kwargs)


def _row_norm(site, num_features, groups, *, center, cell_shift, gain_init, eps, joint, carry_cell, gate_groups, **fk):
    """The module of a row-statistic scheme (layer norm, RMSNorm) at ``site``.

    Gate terms get gains only (the cell's biases are their shift): at ``"ih"`` and ``"hh"`` separately
    (Ba et al.), or at ``"gates"`` once over their sum (``joint``). The cell gets gain and, for layer norm,
    shift; ``carry_cell`` marks it as carried to the next step (``carry = True``, read by the layer into
    :attr:`~recnorm.kernels.contract.DirectionWork.carry_cell_norm`).
    """
    if site == "cell":
        module = GroupedLayerNorm(num_features, gain_init=gain_init, shift=cell_shift, eps=eps, center=center, **fk)
        module.carry = carry_cell
        return module
    if (site == "gates") != joint:
        return None
    groups = None if gate_groups == "one" else groups
    return GroupedLayerNorm(num_features, groups=groups, gain_init=gain_init, shift=False, eps=eps, center=center, **fk)


def _build_layer(site, num_features, groups, **options):
    return _row_norm(site, num_features, groups, center=True, cell_shift=True, **options)


def _build_rms(site, num_features, groups, **options):
    return _row_norm(site, num_features, groups, center=False, cell_shift=False, **options)


def _build_batch(site, num_features, groups, *, gain_init, max_steps, momentum, eps, **fk):
    if site == "gates":
        return None
    # Gate terms carry no BN shift: the cell's bias b covers it (beta_x = beta_h = 0 in Cooijmans et al.).
    return RecurrentBatchNorm(
        num_features, max_steps=max_steps, gain_init=gain_init, shift=(site == "cell"), momentum=momentum, eps=eps, **fk
    )


def _build_sequence_batch(site, num_features, groups, *, gain_init, momentum, eps, **fk):
    if site != "ih":
        return None
    # statistics over all valid (t, b): applied once to the hoisted input projection
    return RecurrentBatchNorm(
        num_features, max_steps=1, gain_init=gain_init, shift=False, momentum=momentum, eps=eps, scope="sequence", **fk
    )


def _build_shared_batch(site, num_features, groups, *, gain_init, momentum, eps, **fk):
    if site == "gates":
        return None
    # One slot: every step's call normalizes with its own batch statistics but reads and writes the same
    # running statistics, exactly what calling one nn.BatchNorm1d at every step does.
    return RecurrentBatchNorm(
        num_features, max_steps=1, gain_init=gain_init, shift=(site == "cell"), momentum=momentum, eps=eps, **fk
    )


_ROW_OPTIONS = {"gain_init": 1.0, "eps": 1e-5, "joint": False, "carry_cell": False, "gate_groups": "cell"}

register_norm(
    NormSpec(
        "layer",
        _build_layer,
        dict(_ROW_OPTIONS),
        "layer norm (Ba et al. 2016) of W_ih x_t, W_hh h_{t-1} and c_t inside tanh (joint=, carry_cell=: torchaudio's form)",
        label="layer norm",
    )
)
register_norm(
    NormSpec(
        "rms",
        _build_rms,
        dict(_ROW_OPTIONS),
        "RMSNorm (Zhang and Sennrich 2019), gains only, at the sites of 'layer' (joint=, carry_cell= as there)",
        label="RMSNorm",
    )
)
register_norm(
    NormSpec(
        "batch",
        _build_batch,
        {"gain_init": 0.1, "max_steps": 1000, "momentum": 0.3, "eps": 1e-5},
        "recurrent batch norm (Cooijmans et al. 2017): per-step statistics on W_ih x_t, W_hh h_{t-1}, c_t",
        batch_statistics=True,
        label="per-step BN",
    )
)
register_norm(
    NormSpec(
        "sequence_batch",
        _build_sequence_batch,
        {"gain_init": 1.0, "momentum": 0.1, "eps": 1e-5},
        "sequence-wise batch norm of W_ih x_t over all valid (t, b) (Laurent et al. 2016; Deep Speech 2)",
        batch_statistics=True,
        label="sequence-wise BN",
    )
)
register_norm(
    NormSpec(
        "shared_batch",
        _build_shared_batch,
        {"gain_init": 1.0, "momentum": 0.1, "eps": 1e-5},
        "ANTI-PATTERN: one BatchNorm reused at every step (statistics and gains shared across time)",
        batch_statistics=True,
        label="shared BN",
    )
)
