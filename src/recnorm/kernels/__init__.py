"""Time-loop implementations behind one data contract, and the one place that chooses between them.

A layer describes one direction of one layer as a :class:`~recnorm.kernels.contract.DirectionWork`
(plain data: weights, a cell descriptor and norm descriptors) and calls :func:`run_direction`. This
package imports nothing from :mod:`recnorm.nn`.

Implementations, each with ``supports(work, x, batch_sizes, mode)`` giving the reason it cannot serve a
case (None when it can):

* ``reference`` (:mod:`.reference`): the readable loop that autograd differentiates; the oracle every
  other path is tested against. Serves everything in eager mode and under ``torch.compile``.
* ``native`` (:mod:`.native`): torch's own fused RNN op, for directions whose recurrence is torch.nn's
  (no norm, or sequence-wise BN folded into the input weights). Called directly in eager mode, and as
  the registered operator ``recnorm::native_rnn`` under ``torch.compile`` and ``torch.jit.trace``.
* ``fused`` (:mod:`.fused`): recnorm's C++ CPU loops with a hand-derived backward, the registered
  operators ``recnorm::fused_lstm`` and ``recnorm::fused_gru_rnn``.
* ``scan`` (:mod:`.scan`): the loop as ``torch._higher_order_ops.scan``, for ``torch.export`` and ONNX.

``"auto"`` picks by what the caller is doing (:func:`execution_mode`):

* exporting (``torch.export``, ``torch.onnx.export``): ``scan``;
* tracing (``torch.jit.trace``): the registered operators (``fused``, ``native``), whose shapes follow
  the traced input's; a case neither serves raises an error instead of tracing a loop that would be
  right only for the example's length;
* eager: ``native`` and ``fused`` in the order that a rule fitted to measurements predicts to be fastest
  for the case (cell, training or eval, sizes, dtype; :mod:`.autotune`), then ``reference``. Only cases
  both serve (``norm=None``, ``"sequence_batch"``) have a choice; torch's op goes first where the rule
  has no entry. Under CPU autocast to bfloat16/float16, a case that torch's op or the fused kernel serves
  in float32 runs there (in the same order) on the input cast to float32, and the result is cast back
  (:func:`_run_upcast`); except a plain LSTM in bfloat16 on a CPU with native bfloat16, which runs torch's
  op in bfloat16 as torch.nn does (:func:`native_runs_bf16`);
* compiling: ``native``, ``fused``, ``reference`` without autograd; with autograd, an LSTM that torch's op
  runs through oneDNN (:func:`.native.compiled_training`) takes the eager order (:func:`.autotune.compiled_order`:
  the same rule, with T compared to a threshold rather than read, so that it is not specialized; torch's op
  runs as the registered ``recnorm::native_lstm_train``, with oneDNN's backward), and every other case
  ``fused``, then ``reference``.

``kernel=`` on a layer forces one implementation; one that cannot serve the case raises ValueError with the
reason. ``$RECNORM_KERNEL`` (for layers built without ``kernel=``) is a preference: the named implementation
runs wherever it can serve the case, and a case it cannot serve (say a layer inside
:func:`recnorm.diagnostics.capture`, which needs per-step outputs, under ``fused``) runs as ``"auto"``
chooses, with a note logged once per reason.

A new implementation is a module with ``supports`` and ``run_direction``, registered in
:data:`IMPLEMENTATIONS` (one line below); ``kernel=`` reaches it at once, and ``"auto"`` once
:func:`_candidates` or :mod:`.autotune` lists it.

A plain layer (no norm, zoneout, observer, dropout in training or second direction; see
``RecurrentBase._lean_forward``) asks :func:`plain_stack_runs` instead: the same answer as :func:`choose`
for such a stack, from its sizes alone, so that a call that ends in torch's op costs about what
``torch.nn``'s own does (building each layer's :class:`DirectionWork` and choosing took about 5% of an
eval forward at (28, 128, 28, 128), most of it in a cache the op had just emptied), and one that ends in
the fused kernel calls it without the rest of the full path. So does an eval call without autograd of a
one-direction layer with any norm the fused kernel serves. An eval call without
autograd of a layer whose only norm is a sequence-wise BN of the input term takes the same path, on the
input weights with the norm folded in (:func:`.native.folded_stack`, computed at every call: nothing is
cached, so no change of the weights or statistics can be missed). Under CPU autocast without autograd both
take it too, rounding each layer's input, state and output to the 16-bit dtype around a float32 call, as
:func:`_run_upcast` does on the full path.

Two hooks let tools see and steer the choice without patching :func:`choose`: :func:`observe_dispatch`
calls a function with every direction's implementation (the autocast upcast included; :func:`recording`
collects the names), and :func:`route_dispatch` lets a policy pick instead of :func:`choose` (the
experiments' kernel pins). Both hold for the ``with`` block, in this thread's calls and any other's: they
are meant for tests, benchmarks and a training loop, not for two models dispatched differently at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from recnorm.kernels import autotune, fused, native, reference, scan
from recnorm.kernels.compile_cache import tag_compile_cache
from recnorm.kernels.contract import BatchMoments, CellDesc, DirectionResult, DirectionWork, NormDesc
from recnorm.registry import Registry

__all__ = [
    "DirectionWork",
    "CellDesc",
    "NormDesc",
    "BatchMoments",
    "DirectionResult",
    "run_direction",
    "choose",
    "DispatchCall",
    "observe_dispatch",
    "route_dispatch",
    "recording",
    "stack_preference",
    "native_bf16",
    "native_runs_bf16",
    "plain_stack_runs",
    "execution_mode",
    "KERNELS",
    "KernelPreference",
    "IMPLEMENTATIONS",
    "Implementation",
    "resolve_kernel",
    "extensions_built",
    "build_extensions",
]

log = logging.getLogger(__name__)

# torch.compile's disk caches do not see what a custom operator does: key them to this version of ours
tag_compile_cache()


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A registered time-loop implementation: a module with ``supports(work, x, batch_sizes, mode)`` (None
    when it can serve the case, else the reason) and ``run_direction(work, x, batch_sizes, state)``."""

    name: str
    module: ModuleType

    def supports(self, work: DirectionWork, x: Tensor, batch_sizes: Optional[Tensor], mode: str) -> Optional[str]:
        return self.module.supports(work, x, batch_sizes, mode)

    def run_direction(self, *args: Any, **kwargs: Any) -> DirectionResult:
        return self.module.run_direction(*args, **kwargs)


#: The implementations by name. ``kernel=NAME`` forces a registered one; ``"auto"`` tries those that
#: :func:`_candidates` (and :mod:`.autotune`) list for the case.
IMPLEMENTATIONS: Registry[Implementation] = Registry("kernel")
for _name, _module in (("reference", reference), ("native", native), ("fused", fused), ("scan", scan)):
    IMPLEMENTATIONS.register(Implementation(_name, _module))
_IMPLS = IMPLEMENTATIONS  # the dispatch code's short name
#: The values ``kernel=`` accepts (the registered implementations when this module was imported).
KERNELS = ("auto", *IMPLEMENTATIONS.names())


class KernelPreference(str):
    """A kernel name that came from ``$RECNORM_KERNEL``: :func:`choose` runs it where it can serve the case
    and falls back to ``"auto"`` elsewhere, instead of raising."""


def resolve_kernel(kernel: Optional[str]) -> str:
    """The kernel to use: the argument, else ``$RECNORM_KERNEL`` (a :class:`KernelPreference`), else ``"auto"``."""
    if kernel:
        name = kernel
    else:
        env = os.environ.get("RECNORM_KERNEL")
        name = KernelPreference(env) if env and env != "auto" else "auto"
    if name != "auto" and name not in IMPLEMENTATIONS:
        where = "" if kernel else " ($RECNORM_KERNEL)"
        raise ValueError(f"unknown kernel {str(name)!r}{where}; expected one of {['auto', *IMPLEMENTATIONS.names()]}")
    return name


_FALLBACK_NOTED: set = set()


def _note_fallback(kernel: str, why: str) -> None:
    key = (str(kernel), why)
    if key not in _FALLBACK_NOTED:
        _FALLBACK_NOTED.add(key)
        log.info("RECNORM_KERNEL=%s cannot run a layer here (%s); it runs as kernel='auto' chooses", kernel, why)


def execution_mode() -> str:
    """``"export"``, ``"trace"``, ``"compile"`` or ``"eager"``: what is running this code."""
    if torch.compiler.is_exporting():
        return "export"
    if torch.jit.is_tracing():
        return "trace"
    if torch.compiler.is_compiling():
        return "compile"
    return "eager"


def _needs_grad(work: DirectionWork, x: Tensor, state: Sequence[Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [x, *state, work.weight_ih, work.weight_hh, work.bias_ih, work.bias_hh, work.weight_hr]
    tensors += [t for d in work.present_norms().values() for t in (d.weight, d.bias)]
    return any(t is not None and t.requires_grad for t in tensors)


def _candidates(mode: str, grad: bool) -> List[str]:
    if mode == "export":
        return ["scan"]
    if mode == "trace":
        return ["fused", "native"]
    if grad and mode == "compile":
        # Under compile, the native operator's recompute backward cannot be traced: training runs fused
        # (the LSTM's oneDNN training operator aside: choose)
        return ["fused", "reference"]
    return ["native", "fused", "reference"]


def stack_preference(
    work: DirectionWork, x: Tensor, batch_sizes: Optional[Tensor], state: Sequence[Tensor], kernel: str, widths: Sequence[int]
) -> Optional[str]:
    """The implementation that every layer of a stack tries first, or None where each layer chooses for itself.

    ``work``, ``x``, ``batch_sizes`` and ``state`` are the first layer's first direction; ``widths`` the
    input features of every layer. Under ``"auto"`` in eager mode with autograd, where both torch's op and
    the fused kernel serve the first layer, a stack that mixes them peaks higher in memory than either
    alone (see :mod:`.autotune`), so the one predicted faster over the whole stack runs every layer that it
    serves (:func:`.autotune.stack_first`); a layer it does not serve still falls back to the next."""
    if kernel != "auto" or len(widths) < 2 or execution_mode() != "eager" or not _needs_grad(work, x, state):
        return None
    if any(_IMPLS[name].supports(work, x, batch_sizes, "eager") is not None for name in ("native", "fused")):
        return None
    return autotune.stack_first(work, x, batch_sizes, widths)


def plain_stack_runs(kind: Optional[str], x: Tensor, widths: Sequence[int], hidden: int, proj: bool, grad: bool,
                     kernel: str, native_serves: bool = True) -> Optional[str]:
    """The implementation that :func:`choose` would pick for every layer of a *plain* unidirectional stack,
    ``"native"`` or ``"fused"``, asked from its sizes alone: cells of ``kind``, no norm (or, in eval without
    autograd, a sequence-wise BN of the input term, which folds into ``W_ih`` and leaves the same choice),
    zoneout or per-step observer, layers that take ``widths`` input features and have ``hidden`` units
    (``proj``: a projection), a full batch ``x`` ``(T, B, F)``, and autograd needed (``grad``) as
    :func:`choose` would find it. ``native_serves=False``: a stack in eval without autograd whose norms
    torch's op does not serve (layer norm, per-step batch norm, ...), which :func:`choose` gives to the
    fused kernel wherever that serves it, whatever the sizes.

    ``"fused"`` means that torch's op is not what runs and that the fused kernel is the first to ask: the
    caller must still ask :func:`.fused.supports` of each layer (the weights' dtypes and devices, the
    extension) and take the full path where it declines, as :func:`choose` would fall through. None where the
    layers would not all run one implementation, or where the answer needs :func:`choose` itself (a stack
    trained with several layers, where :func:`stack_preference` weighs them together; a dispatch hook, which
    must see every call; another implementation forced or preferred): the caller then takes the full path,
    so the two never disagree."""
    if _ROUTES or _OBSERVERS or kind not in native._OPS or (grad and len(widths) > 1):
        return None
    if x.dtype not in native.DTYPES or execution_mode() != "eager" or native._vmapped():
        return None
    if kernel != "auto":
        # native serves every plain layer; a preference for another runs "auto" only where that one cannot
        return str(kernel) if kernel == "fused" or (kernel == "native" and native_serves) else None
    if not native_serves:
        return "fused"
    if proj:
        return "native"  # no rule entry with a projection: torch's op first (autotune.eager_order)
    dtype = autotune._DTYPES.get(str(x.dtype))
    if dtype is None or x.device.type != "cpu":
        return "native"
    T, B = int(x.shape[0]), int(x.shape[1])
    fused_first = set()
    for width in widths:
        pred = autotune.predict(kind, grad, dtype, T, B, int(width), hidden)
        fused_first.add(pred is not None and pred < 0)
    if len(fused_first) > 1:
        return None  # the layers differ: the full path runs each on its own choice
    return "fused" if fused_first.pop() else "native"


def choose(
    work: DirectionWork,
    x: Tensor,
    batch_sizes: Optional[Tensor],
    state: Sequence[Tensor],
    kernel: str = "auto",
    first: Optional[str] = None,
) -> Tuple[str, str]:
    """``(implementation, mode)`` that runs this direction; raises when none can serve it correctly.
    ``first`` (from :func:`stack_preference`) goes first in eager mode under ``"auto"``."""
    mode = execution_mode()
    if kernel != "auto":
        why = _IMPLS[kernel].supports(work, x, batch_sizes, mode)
        if why is None:
            return str(kernel), mode
        if not isinstance(kernel, KernelPreference):
            raise ValueError(f"kernel={kernel!r} cannot run this layer: {why}")
        _note_fallback(kernel, why)
    reasons = []
    grad = _needs_grad(work, x, state)
    if mode == "eager":
        order = autotune.eager_order(work, x, batch_sizes, grad)
    elif mode == "compile" and grad and native.compiled_training(work, x, batch_sizes) is None:
        order = autotune.compiled_order(work, x, grad)  # the eager step's choice, without specializing T
    else:
        order = _candidates(mode, grad)
    if first is not None and mode == "eager":
        order = [first] + [name for name in order if name != first]
    for name in order:
        why = _IMPLS[name].supports(work, x, batch_sizes, mode)
        if why is None:
            return name, mode
        reasons.append(f"{name}: {why}")
    if mode == "trace":
        raise RuntimeError(
            "recnorm: torch.jit.trace cannot record this layer so that it stays right for other input shapes ("
            + "; ".join(reasons)
            + "). Use torch.export.export (or torch.onnx.export) with dynamic shapes, or torch.compile, instead."
        )
    if mode == "export":
        raise RuntimeError("recnorm: this layer cannot be exported: " + "; ".join(reasons))
    raise RuntimeError("recnorm: no implementation serves this layer: " + "; ".join(reasons))  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class DispatchCall:
    """One layer direction asking which implementation runs it: the arguments of :func:`choose`."""

    work: DirectionWork
    x: Tensor
    batch_sizes: Optional[Tensor]
    state: Sequence[Tensor]
    kernel: str = "auto"
    first: Optional[str] = None

    def choose(self, kernel: Optional[str] = None, first: Optional[str] = "same") -> Tuple[str, str]:
        """:func:`choose` for this call, with ``kernel`` (and ``first``) replaced where given."""
        return choose(self.work, self.x, self.batch_sizes, self.state, self.kernel if kernel is None else kernel,
                      self.first if first == "same" else first)


#: What :func:`observe_dispatch` and :func:`route_dispatch` installed, innermost last. Plain module lists (not
#: context variables) so that ``torch.compile`` sees two empty lists and nothing else when no hook is active.
_OBSERVERS: List[Callable[[DispatchCall, str], None]] = []
_ROUTES: List[Callable[[DispatchCall], Tuple[str, str]]] = []


@contextlib.contextmanager
def observe_dispatch(observer: Callable[[DispatchCall, str], None]) -> Iterator[None]:
    """Within the block, ``observer(call, name)`` runs after the implementation ``name`` is picked for each
    layer direction (including a 16-bit input under CPU autocast that runs in float32, :func:`_run_upcast`)."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


@contextlib.contextmanager
def route_dispatch(policy: Callable[[DispatchCall], Tuple[str, str]]) -> Iterator[None]:
    """Within the block, ``policy(call)`` returns the ``(implementation, mode)`` for each layer direction
    instead of :func:`choose`; it decides by calling ``call.choose(kernel=...)``, which keeps every check of
    :func:`choose` (an implementation that cannot serve the call still raises). The innermost policy wins.
    Not applied to the autocast upcast, which picks among the implementations that serve float32 itself."""
    _ROUTES.append(policy)
    try:
        yield
    finally:
        _ROUTES.remove(policy)


@contextlib.contextmanager
def recording() -> Iterator[List[str]]:
    """The implementation of every layer direction run within the block, in order (``"fused"``,
    ``"native"``, ...): what ``kernel="auto"`` or a forced kernel actually ran."""
    names: List[str] = []
    with observe_dispatch(lambda call, name: names.append(name)):
        yield names


def _dispatch(work: DirectionWork, x: Tensor, batch_sizes: Optional[Tensor], state: Sequence[Tensor], kernel: str,
              first: Optional[str]) -> Tuple[str, str]:
    """:func:`choose`, or the innermost :func:`route_dispatch` policy, then the observers."""
    call = DispatchCall(work, x, batch_sizes, state, kernel, first)
    name, mode = _ROUTES[-1](call) if _ROUTES else call.choose()
    _notify(call, name)
    return name, mode


def _notify(call: DispatchCall, name: str) -> None:
    for observer in list(_OBSERVERS):
        observer(call, name)


def run_direction(
    work: DirectionWork,
    x: Tensor,
    batch_sizes: Optional[Tensor],
    state: Tuple[Tensor, ...],
    kernel: str = "auto",
    first: Optional[str] = None,
) -> DirectionResult:
    """Run one layer direction with the chosen implementation (``first``: see :func:`choose`).

    ``x`` is ``(N, F)`` packed rows with ``batch_sizes`` a 1-D int64 CPU tensor of rows per step (see
    :mod:`recnorm.kernels.reference`), or a full batch ``(T, B, F)`` with ``batch_sizes`` None; the output
    has the same layout.
    """
    if kernel == "auto" and x.dtype in _HALF and torch.is_autocast_enabled(x.device.type):
        res = _run_upcast(work, x, batch_sizes, state)
        if res is not None:
            return res
    if _ROUTES or _OBSERVERS:
        name, mode = _dispatch(work, x, batch_sizes, state, kernel, first)
    else:
        name, mode = choose(work, x, batch_sizes, state, kernel, first)
    if name == "native":
        return native.run_direction(work, x, batch_sizes, state, as_op=mode != "eager")
    if name == "reference":
        return reference.run_direction(work, x, None if batch_sizes is None else batch_sizes.tolist(), state)
    return _IMPLS[name].run_direction(work, x, batch_sizes, state)


_HALF = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX-512 BF16 or AMX) for oneDNN (False where this torch
    lacks the private checks it reads)."""
    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return torch.backends.mkldnn.is_available() and any(bool(c()) for c in checks if c is not None)


def native_bf16(kind: str, dtype: torch.dtype, proj: bool, packed: bool) -> bool:
    """Whether a layer direction of cell ``kind`` with a ``dtype`` input under CPU autocast runs torch's op in
    that dtype, with autocast on, as torch.nn runs it, where torch's op serves its float32 case with no norm:
    a bfloat16 LSTM without a projection (``proj``) on a full batch (not ``packed``), on a CPU with native
    bfloat16 (:func:`cpu_has_bf16`), where oneDNN's LSTM in bfloat16 takes 0.55-0.74 of its float32 time
    (docs/benchmarks.md, 2026-12-06). Its outputs and gradients are then torch.nn's under the same autocast,
    bit for bit (tests/kernels/test_dispatch.py). Everything else under autocast runs in float32
    (:func:`_run_upcast`). The lean path (``RecurrentBase._lean_forward``) asks this directly, having
    checked the rest; the full path through :func:`native_runs_bf16`."""
    return dtype == torch.bfloat16 and kind == "lstm" and not proj and not packed and cpu_has_bf16()


def native_runs_bf16(work: DirectionWork, x: Tensor, batch_sizes: Optional[Tensor]) -> bool:
    """:func:`native_bf16` for one direction of the full path: no norm, float32 weights, and torch's op
    serving the float32 case."""
    return (native_bf16(work.cell.kind, x.dtype, work.weight_hr is not None, batch_sizes is not None)
            and not work.present_norms() and work.weight_ih.dtype == torch.float32
            # the float32 case is what torch's op must serve (supports() reads the dtype, not the shape)
            and native.supports(work, x.new_empty((0,), dtype=torch.float32), None, "eager") is None)


def _run_upcast(
    work: DirectionWork, x: Tensor, batch_sizes: Optional[Tensor], state: Tuple[Tensor, ...]
) -> Optional[DirectionResult]:
    """A 16-bit input under CPU autocast, run in float32 on torch's op or the fused kernel, whichever the
    rule orders first among those that serve the float32 case; None where neither does (weights that are
    not float32 themselves, a norm only the reference loop serves), or in a mode other than eager.

    The fused kernels compute in float32 or float64 only, and torch's CPU RNN op in 16 bits is many times
    slower than in float32 on CPUs without native bfloat16 arithmetic (10-15x for an LSTM eval forward on
    an AVX2 CPU, benchmarks/bench_rnn.py), where torch.nn.LSTM itself fails under bfloat16 autocast. Autocast
    keeps the weights in float32 and the layer hands this function a 16-bit input; casting the input and
    the initial state to float32 runs the whole direction in float32 -- statistics included -- at
    float32's speed. Autocast is off inside, so that torch's op is not cast back to 16 bits. The outputs
    and final states come back in the input's dtype; the batch moments stay float32. Gradients flow
    through the casts.

    On a CPU that does have native bfloat16 arithmetic, torch.nn.LSTM under bfloat16 autocast runs at
    0.55-0.74 of its float32 time (AVX-512 BF16, docs/benchmarks.md, 2026-12-06), and a layer served here
    would keep float32's time (1.25-1.86x torch.nn's under the same autocast for ``norm=None``). There a
    plain LSTM (:func:`native_runs_bf16`) runs torch's op in bfloat16 with autocast on instead: torch.nn's
    results, bit for bit, at its speed and at bfloat16's precision. Normalized layers keep float32.
    """
    if execution_mode() != "eager" or x.device.type != "cpu":
        return None
    if native_runs_bf16(work, x, batch_sizes):
        if _OBSERVERS:
            _notify(DispatchCall(work, x, batch_sizes, state), "native")
        return native.run_direction(work, x, batch_sizes, state)  # autocast on: torch.nn's own call
    x32 = x.float()
    state32 = tuple(s.float() for s in state)
    grad = _needs_grad(work, x, state)
    for name in autotune.eager_order(work, x32, batch_sizes, grad):
        if name == "reference" or _IMPLS[name].supports(work, x32, batch_sizes, "eager") is not None:
            continue
        if _OBSERVERS:
            _notify(DispatchCall(work, x32, batch_sizes, state32), name)
        with torch.autocast("cpu", enabled=False):
            res = _IMPLS[name].run_direction(work, x32, batch_sizes, state32)
        return DirectionResult(res.output.to(x.dtype), tuple(s.to(x.dtype) for s in res.state), res.moments)
    return None


# ---------------------------------------------------------------------------------------------------
# The C++ extensions
# ---------------------------------------------------------------------------------------------------


def extensions_built() -> bool:
    """Whether every fused C++ extension is already compiled for this machine and torch (nothing to build)."""
    from recnorm.kernels import _build

    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
    for ext in fused.EXTENSIONS.values():
        tag, flags = fused.build_flags(ext.family)
        full = f"{ext.name}_{tag}"
        directory = _build.build_directory(full, [os.path.join(folder, ext.source)], flags + ["|", "-fopenmp"])
        if not os.path.exists(os.path.join(directory, f"{full}.so")):
            return False
    return True


def build_extensions() -> Dict[str, Optional[str]]:
    """Build (or load from the cache) every fused C++ extension now, instead of on first use.

    Returns ``{kernel: None}`` for each kernel that is ready, or ``{kernel: reason}`` for one that could
    not be built (its layers then run the reference loop). Takes about a minute per extension the first
    time, then well under a second.
    """
    status: Dict[str, Optional[str]] = {}
    for ext in fused.EXTENSIONS.values():
        status[ext.what] = None if ext.load() is not None else (ext.error or "unknown error")
    return status
