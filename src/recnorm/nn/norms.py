"""Normalization modules and the registry of normalization schemes.

Two modules do all the work:

* :class:`RecurrentBatchNorm` -- batch normalization whose running statistics are indexed by a time step
  slot. With ``max_steps=T`` it is the per-step BN of Cooijmans et al.; with ``max_steps=1`` it is one
  BatchNorm shared across time (the naive horizontal BN) or, applied once to all time steps at once,
  sequence-wise BN (Laurent et al.).
* :class:`GroupedLayerNorm` -- layer normalization over groups of features of each row (Ba et al.).

A *normalization scheme* (``"batch"``, ``"layer"``, ...) says which module sits at which *site* of a
recurrent cell:

* ``"ih"``: the input term ``W_ih x_t`` (shape ``(B, G*H)``),
* ``"hh"``: the recurrent term ``W_hh h_{t-1}`` (shape ``(B, G*H)``),
* ``"cell"``: the LSTM cell ``c_t`` inside the output ``tanh`` (shape ``(B, H)``).

Every norm module takes ``num_features`` first, keyword options after, and is called as
``norm(x, step=t, mask=None)``. Its attribute ``scope`` tells the time loop how it may be applied:
``"row"`` (per example; may run once on all time steps), ``"sequence"`` (statistics over all valid
(t, b) positions; must run once on all time steps) or ``"step"`` (statistics per call; runs inside the
loop with the step index).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from recnorm.nn.stats import batch_moments, count_valid, degenerate_features, sync_active

__all__ = [
    "RecurrentBatchNorm",
    "GroupedLayerNorm",
    "NormSpec",
    "NORMS",
    "register_norm",
    "list_norms",
    "get_norm",
    "create_norm",
    "resolve_norm_kwargs",
    "SITES",
    "convert_sync_batchnorm",
]

log = logging.getLogger(__name__)

SITES = ("ih", "hh", "cell")


class RecurrentBatchNorm(nn.Module):
    r"""Batch normalization with running statistics indexed by time step.

    For a call ``bn(x, step=t)`` with ``x`` of shape ``(N, F)`` in training mode:

    .. math::
        \mu_t = \frac{1}{n}\sum_{b \in V} x_b, \quad
        \sigma^2_t = \frac{1}{n}\sum_{b \in V} (x_b - \mu_t)^2, \quad
        y_b = \gamma \frac{x_b - \mu_t}{\sqrt{\sigma^2_t + \epsilon}} + \beta

    where :math:`V` are the valid rows (all rows, or those where ``mask`` is True) and :math:`n = |V|`.
    The running statistics of slot :math:`s = \min(t, S-1)` (``S = max_steps``) move towards
    :math:`\mu_t` and the unbiased variance with ``momentum`` (``None``: cumulative average).
    :math:`\gamma` and :math:`\beta` are shared by all slots.

    In eval mode, step :math:`t` uses the population statistics of slot :math:`\min(t, s_{last})`, where
    :math:`s_{last}` is the last slot that has ever been updated: every step at or beyond the last
    tracked step reuses the last step's statistics (Cooijmans et al., section 4).

    Special cases, handled instead of returning NaN or inf:

    * fewer than 2 valid rows in training (say the last sequence of a packed batch, or an unbatched
      input): there is no batch variance, so the call normalizes with the slot's population statistics
      (as in eval) and leaves them unchanged;
    * a feature whose values are identical across the valid rows (zero batch variance; see
      :func:`recnorm.nn.stats.degenerate_features`): its normalized value is exactly 0 (so the output
      is :math:`\beta`) and no gradient flows back through it. The exact gradient there is
      :math:`\gamma/\sqrt{\epsilon}\,(g_b - \bar g)`: it has zero mean over the batch, so while the
      inputs are identical across the batch it contributes nothing to any parameter's gradient, yet
      its repeated factor :math:`\gamma/\sqrt{\epsilon}` overflows after a few dozen constant steps
      (Cooijmans et al., section 5.1). Dropping it leaves parameter gradients unchanged and finite;
      only the per-example gradient with respect to such constant inputs or initial states loses that
      zero-mean part.

    Data parallel: by default each process normalizes with its own batch, as ``torch.nn.BatchNorm1d``
    does. With ``sync = True`` (set by :func:`recnorm.convert_sync_batchnorm`), training calls take
    :math:`V` over the valid rows of every process of ``process_group`` (see :mod:`recnorm.nn.stats`),
    so all processes normalize with, and record, the same statistics; the "fewer than 2 rows" rule then
    counts the rows of all processes. Eval makes no collective call.

    Args:
        num_features: F.
        max_steps: S, number of time-step slots of running statistics. 1 shares them across time.
        gain_init: initial :math:`\gamma`.
        shift: learn :math:`\beta` (initialised to 0). Without it, :math:`\beta = 0`.
        momentum: running-average factor, or ``None`` for a cumulative average.
        eps: added to the variance.
        scope: ``"step"`` (called inside the time loop, once per step) or ``"sequence"`` (called once on
            the rows of all time steps; statistics over every valid (t, b) position).
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
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        if scope not in ("step", "sequence"):
            raise ValueError(f"scope must be 'step' or 'sequence', got {scope!r}")
        self.scope = scope
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        if momentum is not None and not (0.0 <= float(momentum) <= 1.0):
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        if not float(eps) > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.num_features = int(num_features)
        self.max_steps = int(max_steps)
        self.gain_init = float(gain_init)
        self.momentum = momentum
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(self.num_features, **fk))
        self.bias = nn.Parameter(torch.empty(self.num_features, **fk)) if shift else None
        self.register_buffer("running_mean", torch.zeros(self.max_steps, self.num_features, **fk))
        self.register_buffer("running_var", torch.ones(self.max_steps, self.num_features, **fk))
        self.register_buffer("num_batches_tracked", torch.zeros(self.max_steps, dtype=torch.long, device=device))
        self._last_slot: Optional[int] = None  # cached s_last for eval; reset whenever buffers change
        self._accumulator: Optional[Dict[str, Tensor]] = None  # set by population-statistics passes
        self._observers: List[Callable[[int, Tensor, Tensor, int], None]] = []
        self.sync = False  # synchronized statistics across processes (recnorm.convert_sync_batchnorm)
        self.process_group: Any = None  # None: the default (world) group
        self.reset_parameters()

    def synced(self) -> bool:
        """Whether this call's statistics would involve other processes (training, sync, group of 2+)."""
        return self.training and sync_active(self.sync, self.process_group)

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        self._last_slot = None

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        with torch.no_grad():
            self.weight.fill_(self.gain_init)
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, max_steps={self.max_steps}, gain_init={self.gain_init}, "
            f"shift={self.bias is not None}, momentum={self.momentum}, eps={self.eps}" + (", sync=True" if self.sync else "")
        )

    # -- slots -------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        self._last_slot = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._last_slot = None
        return super()._load_from_state_dict(*args, **kwargs)

    def last_tracked_slot(self) -> int:
        """Index of the last slot with population statistics (``max_steps - 1`` if none has any)."""
        if self._last_slot is None:
            tracked = torch.nonzero(self.num_batches_tracked > 0)
            self._last_slot = int(tracked.max()) if tracked.numel() else self.max_steps - 1
        return self._last_slot

    def _slot(self, step: int, use_population: bool) -> int:
        if step < 0:
            raise ValueError(f"step must be a non-negative time index, got {step}")
        if use_population:
            return min(step, self.last_tracked_slot())
        return min(step, self.max_steps - 1)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: Tensor, step: int = 0, mask: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input of shape (N, {self.num_features}), got {tuple(x.shape)}")
        sync = {"sync": self.sync and self.training, "process_group": self.process_group}
        n = count_valid(x, mask, **sync)
        mean, var, degenerate = self.statistics(lambda: batch_moments(x, mask, **sync), n, int(step))
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if degenerate is not None:
            # No spread across the batch: normalize to exactly 0 and pass no gradient (see class docs).
            y = torch.where(degenerate, torch.zeros((), dtype=y.dtype, device=y.device), y)
        y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def statistics(
        self, moments: Callable[[], Tuple[Tensor, Tensor]], n: int, step: int = 0
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The mean and variance to normalize with at ``step``, updating the running statistics.

        ``moments()`` returns the batch mean and biased variance of the ``n`` valid rows; it is only
        called when batch statistics are used (training with ``n >= 2``). Returns ``(mean, var,
        degenerate)`` where ``degenerate`` marks zero-variance features (``None`` with population
        statistics). Fast paths that fold the normalization into weights call this too, so that every
        path shares the same rules.
        """
        if not self.training or n < 2:
            s = self._slot(step, use_population=True)
            return self.running_mean[s], self.running_var[s], None
        s = self._slot(step, use_population=False)
        mean, var = moments()
        self._update(s, mean.detach(), var.detach(), n)
        for observe in self._observers:
            observe(step, mean.detach(), var.detach(), n)
        return mean, var, degenerate_features(mean, var)

    def affine(self, moments: Callable[[], Tuple[Tensor, Tensor]], n: int, step: int = 0) -> Tuple[Tensor, Tensor]:
        """``(scale, shift)`` with ``bn(x) == x * scale + shift`` for the rows ``moments`` describes.

        Lets a caller fold sequence-wise BN of ``W x`` into the weights: ``BN(W x) = (scale * W) x +
        shift``. Same statistics, updates and zero-variance rule as :meth:`forward`.
        """
        mean, var, degenerate = self.statistics(moments, n, step)
        scale = self.weight * torch.rsqrt(var + self.eps)
        if degenerate is not None:
            scale = torch.where(degenerate, torch.zeros((), dtype=scale.dtype, device=scale.device), scale)
        shift = -mean * scale
        return scale, (shift if self.bias is None else shift + self.bias)

    @torch.no_grad()
    def _update(self, s: int, mean: Tensor, var: Tensor, n: int) -> None:
        """Record the batch mean and biased variance of ``n`` rows at slot ``s``."""
        if self._accumulator is not None:
            acc = self._accumulator
            mean64, var64 = mean.double(), var.double()
            acc["count"][s] += n
            acc["sum"][s] += n * mean64
            acc["sumsq"][s] += n * (var64 + mean64 * mean64)
            return
        self.num_batches_tracked[s] += 1
        self._last_slot = None
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked[s])
        else:
            factor = float(self.momentum)
        unbiased = var * (n / (n - 1))
        self.running_mean[s].lerp_(mean, factor)
        self.running_var[s].lerp_(unbiased, factor)

    # -- exact population statistics -----------------------------------------------------------------
    def begin_population_pass(self) -> None:
        """Start pooling exact per-slot sums instead of updating running averages."""
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.running_mean.device)  # noqa: E731
        self._accumulator = {
            "count": z(self.max_steps),
            "sum": z(self.max_steps, self.num_features),
            "sumsq": z(self.max_steps, self.num_features),
        }

    @torch.no_grad()
    def end_population_pass(self) -> None:
        """Replace the running statistics by the pooled statistics of the pass.

        Slot ``s`` gets the mean and unbiased variance of every valid row seen at that slot. Slots that
        saw no row are reset (mean 0, variance 1, untracked), so eval reuses the last seen slot.
        """
        acc, self._accumulator = self._accumulator, None
        if acc is None:
            raise RuntimeError("end_population_pass() called without begin_population_pass()")
        self.reset_running_stats()
        count = acc["count"]
        seen = count > 0
        n = count.clamp(min=1).unsqueeze(1)
        mean = acc["sum"] / n
        var = (acc["sumsq"] - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)
        self.running_mean[seen] = mean[seen].to(self.running_mean.dtype)
        self.running_var[seen] = var[seen].to(self.running_var.dtype)
        self.num_batches_tracked[seen] = 1


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every :class:`RecurrentBatchNorm` in ``module`` synchronize its training statistics across
    the processes of ``process_group`` (default: the world), like
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`. Changes ``module`` in place and returns it.

    Every process must then run the same layers in the same order (as DistributedDataParallel does);
    batches may differ in size and length between processes, including sequences that end at
    different steps: per-step statistics at step t pool the rows that are valid at t on every process.
    Synchronized layers run the reference time loop (the fused kernels compute statistics locally).
    """
    for m in module.modules():
        if isinstance(m, RecurrentBatchNorm):
            m.sync = True
            m.process_group = process_group
    return module


class GroupedLayerNorm(nn.Module):
    r"""Layer normalization of each row over groups of features.

    For a row :math:`a` split into groups :math:`a^{(k)}` of sizes ``groups``:

    .. math::
        y^{(k)} = \frac{a^{(k)} - \mu^{(k)}}{\sqrt{\sigma^{2(k)} + \epsilon}}, \qquad
        y = \gamma \odot y + \beta

    with :math:`\mu^{(k)}, \sigma^{2(k)}` the mean and biased variance of the row's group. Statistics
    belong to the example and the step alone: nothing is carried across time or batches, and training
    and eval compute the same thing.

    A group whose values are all equal (zero variance: an all-zero ``h`` or ``c`` at the start of a
    sequence, after zero-initialised biases and blank input rows) normalizes to exactly 0 and passes
    no gradient. There the exact Jacobian is :math:`\gamma/\sqrt{\epsilon}` (about 316 gamma); over
    a run of such steps it overflows to inf (the layer-norm form of Cooijmans et al.'s section 5.1).

    Args:
        num_features: F.
        groups: sizes of the feature groups (summing to F); default one group of F.
        gain_init: initial :math:`\gamma`.
        shift: learn :math:`\beta` (initialised to 0). Without it, :math:`\beta = 0`.
        eps: added to the variance.
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
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.groups: Tuple[int, ...] = tuple(int(g) for g in groups) if groups else (self.num_features,)
        if sum(self.groups) != self.num_features or min(self.groups) < 1:
            raise ValueError(f"groups must be positive sizes summing to {self.num_features}, got {self.groups}")
        if not float(eps) > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.gain_init = float(gain_init)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(self.num_features, **fk))
        self.bias = nn.Parameter(torch.empty(self.num_features, **fk)) if shift else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(self.gain_init)
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, gain_init={self.gain_init}, shift={self.bias is not None}, eps={self.eps}"

    def forward(self, x: Tensor, step: Optional[int] = None, mask: Optional[Tensor] = None) -> Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"expected input with last dimension {self.num_features}, got {tuple(x.shape)}")
        parts = []
        for part in x.split(self.groups, dim=-1) if len(self.groups) > 1 else (x,):
            var, mean = torch.var_mean(part, dim=-1, correction=0, keepdim=True)
            y = (part - mean) * torch.rsqrt(var + self.eps)
            # A constant row (an all-zero state) normalizes to 0 and passes no gradient (class docs).
            parts.append(torch.where(degenerate_features(mean, var), torch.zeros((), dtype=y.dtype, device=y.device), y))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        y = y * self.weight
        return y if self.bias is None else y + self.bias


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
            are the cell's layer-norm groups for gate sites (``None`` for the cell site).
        options: the ``norm_kwargs`` the scheme accepts, with their defaults.
        summary: one line for listings.
    """

    name: str
    build: NormBuilder
    options: Dict[str, Any]
    summary: str


NORMS: Dict[str, NormSpec] = {}


def register_norm(spec: NormSpec) -> NormSpec:
    if spec.name in NORMS:
        raise ValueError(f"normalization {spec.name!r} is already registered")
    NORMS[spec.name] = spec
    return spec


def list_norms() -> List[str]:
    """Names of the registered normalization schemes (``None`` means no normalization)."""
    return sorted(NORMS)


def get_norm(name: Optional[str]) -> Optional[NormSpec]:
    """Resolve a scheme name; ``None`` and ``"none"`` mean no normalization."""
    if name is None or name == "none":
        return None
    if not isinstance(name, str) or name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; expected None or one of {list_norms()}")
    return NORMS[name]


def resolve_norm_kwargs(name: Optional[str], norm_kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The scheme's options with ``norm_kwargs`` applied; unknown keys raise ValueError."""
    spec = get_norm(name)
    norm_kwargs = dict(norm_kwargs or {})
    if spec is None:
        if norm_kwargs:
            raise ValueError(f"norm_kwargs {sorted(norm_kwargs)} given but norm is None; pass a norm from {list_norms()}")
        return {}
    unknown = sorted(set(norm_kwargs) - set(spec.options))
    if unknown:
        raise ValueError(f"unknown norm_kwargs {unknown} for norm {name!r}; expected a subset of {sorted(spec.options)}")
    return {**spec.options, **norm_kwargs}


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


def _build_layer(site, num_features, groups, *, gain_init, eps, **fk):
    if site == "cell":
        return GroupedLayerNorm(num_features, gain_init=gain_init, shift=True, eps=eps, **fk)
    return GroupedLayerNorm(num_features, groups=groups, gain_init=gain_init, shift=False, eps=eps, **fk)


def _build_batch(site, num_features, groups, *, gain_init, max_steps, momentum, eps, **fk):
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
    # One slot: every step's call normalizes with its own batch statistics but reads and writes the same
    # running statistics, exactly what calling one nn.BatchNorm1d at every step does.
    return RecurrentBatchNorm(
        num_features, max_steps=1, gain_init=gain_init, shift=(site == "cell"), momentum=momentum, eps=eps, **fk
    )


register_norm(
    NormSpec(
        "layer",
        _build_layer,
        {"gain_init": 1.0, "eps": 1e-5},
        "layer norm (Ba et al. 2016) of W_ih x_t, W_hh h_{t-1} and c_t inside tanh",
    )
)
register_norm(
    NormSpec(
        "batch",
        _build_batch,
        {"gain_init": 0.1, "max_steps": 1000, "momentum": 0.1, "eps": 1e-5},
        "recurrent batch norm (Cooijmans et al. 2017): per-step statistics on W_ih x_t, W_hh h_{t-1}, c_t",
    )
)
register_norm(
    NormSpec(
        "sequence_batch",
        _build_sequence_batch,
        {"gain_init": 1.0, "momentum": 0.1, "eps": 1e-5},
        "sequence-wise batch norm of W_ih x_t over all valid (t, b) (Laurent et al. 2016; Deep Speech 2)",
    )
)
register_norm(
    NormSpec(
        "shared_batch",
        _build_shared_batch,
        {"gain_init": 1.0, "momentum": 0.1, "eps": 1e-5},
        "ANTI-PATTERN: one BatchNorm reused at every step (statistics and gains shared across time)",
    )
)
