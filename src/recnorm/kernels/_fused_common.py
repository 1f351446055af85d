"""What the wrappers of the fused CPU kernels share: :mod:`recnorm.kernels.fused_cpu` (LSTM) and
:mod:`recnorm.kernels.fused_cpu_gru_rnn` (GRU, RNN).

Building and loading an extension (one logged warning if it cannot be built), the probe and the plan for
oneDNN's linear with its weight prepacking, the chunk sizes of the input projection and of the backward's
weight-gradient GEMMs, the checks of ``supports`` that do not depend on the cell, and the batch-norm
arguments of ``prepare``.

The functions that keep state keep it in the wrapper module they are given (``_EXT``, ``_EXT_ERROR`` and
``_LOCK``; ``_ONEDNN``), so each extension has its own, and resetting those names resets it.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from recnorm.kernels.reference import DirectionParams
from recnorm.nn.norms import RecurrentBatchNorm

# Inputs at most this wide are projected inside the step pass instead of by GEMMs before their steps
# (a GEMM with a tiny inner dimension runs far below peak and writes a large (N, G) buffer).
INPROJ_MAX = 8
# Otherwise the projection runs as GEMMs over chunks of consecutive steps of about this many rows, each
# just before its steps, so that the step pass finds them in cache.
INPROJ_ROWS = int(os.environ.get("RECNORM_FUSED_INPROJ_ROWS", "1024"))


DOUBLE_BACKWARD_ERROR = (
    "recnorm's fused CPU kernels differentiate once (like cuDNN's RNNs), and this backward was asked to build "
    "a graph (create_graph=True, double backward). Run the layer on the reference loop for that: pass "
    "kernel='reference' to it or set RECNORM_KERNEL=reference."
)


def differentiable_once(backward: Callable) -> Callable:
    """``once_differentiable`` that refuses ``create_graph=True`` outright.

    Plain ``once_differentiable`` returns gradients without a graph when the incoming gradients need
    none, so a gradient penalty built on them would silently count as a constant. Autograd enables grad
    mode during backward exactly when it is asked to build a graph, so that is checked first.
    """
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        return inner(ctx, *grads)

    return wrapper


# ---------------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------------


def build_flags() -> Tuple[str, List[str]]:
    """``(tag, compiler flags)`` of the extensions on this CPU; the tag ends the extension's name."""
    flags = ["-O3", "-fopenmp"]
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        capability = "DEFAULT"
    if capability in ("AVX2", "AVX512"):
        # AVX2 vectors with torch's own SLEEF exp/tanh (the functions torch.sigmoid/tanh use).
        return "avx2", flags + ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"]
    return "default", flags


def load_extension(wrapper: ModuleType, name: str, source: str, what: str, setup: Optional[Callable] = None):
    """The extension ``{name}_{tag}`` built from ``csrc/{source}`` for ``wrapper``, on its first use.

    Kept in ``wrapper._EXT``; a failure (no compiler, no ninja, a build error, ...) is kept in
    ``wrapper._EXT_ERROR``, logged once as a warning on ``wrapper.log`` naming the ``what`` kernel, and
    gives ``None`` from then on. ``setup(ext)`` runs once the extension is loaded, before anyone sees it.
    """
    if wrapper._EXT is not None or wrapper._EXT_ERROR is not None:
        return wrapper._EXT
    with wrapper._LOCK:
        if wrapper._EXT is None and wrapper._EXT_ERROR is None:
            try:
                from recnorm.kernels import _build

                tag, flags = build_flags()
                path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", source)
                ext = _build.load(f"{name}_{tag}", [path], flags, ["-fopenmp"])
                if setup is not None:
                    setup(ext)
                wrapper._EXT = ext
            except Exception as exc:  # no compiler, no ninja, build error, ...
                text = str(exc).strip().splitlines()
                wrapper._EXT_ERROR = f"{type(exc).__name__}: {text[0] if text else ''}"
                wrapper.log.warning(
                    "recnorm: the fused CPU %s kernel could not be built (%s); falling back to the reference loop",
                    what,
                    wrapper._EXT_ERROR,
                )
    return wrapper._EXT


# ---------------------------------------------------------------------------------------------------
# oneDNN's linear instead of MKL's sgemm
# ---------------------------------------------------------------------------------------------------


def onednn_available(wrapper: ModuleType) -> bool:
    """Whether ``wrapper``'s extension can call oneDNN's linear with a prepacked weight (kept in ``wrapper._ONEDNN``)."""
    if wrapper._ONEDNN is None:
        try:
            wrapper._ONEDNN = bool(
                torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and wrapper.load_extension().onednn_available()
            )
        except Exception:
            wrapper._ONEDNN = False
    return wrapper._ONEDNN


def onednn_plan(
    batch: int, hidden: int, hoisted: bool, dtype: torch.dtype, available: Callable[[], bool]
) -> Tuple[bool, bool, bool]:
    """Which GEMMs go to oneDNN's linear instead of MKL's sgemm: (input projection, forward step,
    backward step). ``hoisted``: whether the input projection runs as GEMMs at all.

    Measured on a 2-core AMD EPYC (AVX2), 2 threads, with prepacked weights: oneDNN is 10-40% faster for
    the forward product ``h W_hh^T`` once H >= 256, and for the backward product ``dG W_hh`` when H >= 512
    with a batch of at most 64. For the chunked input projection it won in isolation but not inside the
    loop, so MKL keeps it by default.
    ``RECNORM_FUSED_ONEDNN=0`` or ``1`` forces either choice (or a mask such as ``011``). float32 only;
    never where ``available()`` says the extension cannot call oneDNN.
    """
    env = os.environ.get("RECNORM_FUSED_ONEDNN", "")
    if env == "0" or dtype != torch.float32 or not available():
        return (False, False, False)
    if env == "1":
        return (hoisted, True, True)
    if len(env) == 3 and set(env) <= {"0", "1"}:  # a mask, e.g. "011"
        return (hoisted and env[0] == "1", env[1] == "1", env[2] == "1")
    return (False, hidden >= 256, hidden >= 512 and batch <= 64)


def pack(w: Tensor, batch: int) -> Tensor:
    """``w`` (out, in) prepacked for oneDNN's linear ``x w^T``."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), batch)


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------


def chunk_rows(n_rows: int) -> int:
    """Rows per chunk of the backward's weight-gradient GEMMs (``$RECNORM_FUSED_CHUNK_ROWS`` if set)."""
    env = os.environ.get("RECNORM_FUSED_CHUNK_ROWS")
    if env:
        return max(1, int(env))
    return max(2048, n_rows // 4)


def contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def sum_present(*ts: Optional[Tensor]) -> Optional[Tensor]:
    """The sum of the tensors that are not ``None`` (``None`` if none is)."""
    total = None
    for t in ts:
        if t is not None:
            total = t if total is None else total + t
    return total


def batch_site(module) -> bool:
    """Whether a norm site is a per-step :class:`~recnorm.nn.norms.RecurrentBatchNorm` the kernels serve:
    exactly that type, no population-statistics pass in progress, no observers."""
    return (
        type(module) is RecurrentBatchNorm
        and getattr(module, "scope", None) == "step"
        and module._accumulator is None
        and not module._observers
    )


def tensors_ok(x: Tensor, p: DirectionParams, norms: Sequence) -> bool:
    """Whether ``x`` is a 2-D float32/float64 CPU tensor and every weight, bias and running statistic of
    ``p`` and its ``norms`` (``None`` entries allowed) has its device and dtype."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 2:
        return False
    tensors = [p.weight_ih, p.weight_hh, p.bias_ih, p.bias_hh]
    for norm in norms:
        if norm is not None:
            tensors += [norm.weight, norm.bias]
            if isinstance(norm, RecurrentBatchNorm):
                tensors += [norm.running_mean, norm.running_var]
    for t in tensors:
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            return False
    return True


def bn_arguments(norms: Sequence, batch: bool) -> Tuple[bool, List[Optional[Tensor]], List[float]]:
    """``(training, bn_buffers, momentum)`` for the kernels: in batch mode, per norm its running mean,
    running variance and ``num_batches_tracked`` and its momentum (-1 for a cumulative average);
    otherwise eval, ``None`` and 0.1 placeholders."""
    bn_buffers: List[Optional[Tensor]] = [None] * (3 * len(norms))
    momentum = [0.1] * len(norms)
    if not batch:
        return False, bn_buffers, momentum
    for i, n in enumerate(norms):
        bn_buffers[3 * i : 3 * i + 3] = [n.running_mean, n.running_var, n.num_batches_tracked]
        momentum[i] = -1.0 if n.momentum is None else float(n.momentum)
    return bool(norms[0].training), bn_buffers, momentum
