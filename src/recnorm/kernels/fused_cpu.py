"""Fused CPU time loop for LSTM directions with layer or recurrent batch normalization.

The whole loop -- forward and a hand-derived backward through time -- runs in a C++ extension
(``csrc/fused_lstm.cpp``), built against torch with :func:`torch.utils.cpp_extension.load` on first use
(needs a C++ compiler and ninja) and cached (see :mod:`recnorm.kernels._build` for where, and how a
build killed half-way is recovered from). Per step it does one GEMM for the recurrent term and one
fused, vectorized pass (AVX2 where torch has it) for the norm statistics, the normalization, the gates,
the cell update and the cell norm; the input projection runs as GEMMs over chunks of steps just before
they are used (or, for inputs of at most :data:`INPROJ_MAX` features, inside the pass). The backward
does one fused pass and one GEMM per step, and the weight gradients as a few large GEMMs over chunks of
consecutive steps. Activations are recomputed in backward from the saved normalized terms, so training
keeps about as much memory as ``torch.nn.LSTM``.

It computes exactly what :func:`recnorm.kernels.reference.run_direction` computes (the oracle it is
tested against): packed rows, per-step batch statistics over the valid rows, running statistics updated
as :meth:`recnorm.nn.norms.RecurrentBatchNorm._update` does, population statistics in eval mode and for
steps with fewer than two valid rows, and zero-variance ("degenerate") features normalizing to 0 with no
gradient. In float32 the sigmoid/tanh/exp and reciprocals use short polynomial forms within ~3 ulp;
float64 uses SLEEF's functions, as torch does.

Served: LSTM directions without ``proj_size`` whose three sites are all unnormalized, all
:class:`~recnorm.nn.norms.GroupedLayerNorm` (one group) or all per-step
:class:`~recnorm.nn.norms.RecurrentBatchNorm` (schemes ``"layer"``, ``"batch"``, ``"shared_batch"`` and
``None``), float32/float64 CPU tensors, no diagnostics (observers, ``on_output``) and no
population-statistics pass in progress. Anything else returns False from :func:`supports` and runs on
the reference loop. If the extension cannot be built, one warning is logged and :func:`supports` returns
False. Double backward is not supported (``once_differentiable``).

Performance knobs (environment, read per call unless noted):

* ``RECNORM_FUSED_POOL_MB`` (read at load, default 1024): large buffers freed by one call are kept for
  the next, up to this many MiB, instead of being returned to the OS; first-touch page faults otherwise
  cost about as much as the passes. :func:`empty_cache` releases them.
* ``RECNORM_FUSED_ONEDNN``: ``0``/``1`` or a mask such as ``011`` forcing which GEMMs use oneDNN's
  linear instead of MKL (see :func:`_onednn_plan`).
* ``RECNORM_FUSED_CHUNK_ROWS``, ``RECNORM_FUSED_INPROJ_ROWS`` (read at import): GEMM chunk sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from recnorm.kernels.reference import DirectionParams
from recnorm.nn.cells import CellType, LSTMCellType
from recnorm.nn.norms import GroupedLayerNorm, RecurrentBatchNorm

__all__ = ["supports", "run_direction", "load_extension", "available", "empty_cache"]

log = logging.getLogger(__name__)

_MODES = {"none": 0, "layer": 1, "batch": 2}
_EXT = None
_EXT_ERROR: Optional[str] = None
_LOCK = threading.Lock()


def _build_flags() -> Tuple[str, List[str]]:
    flags = ["-O3", "-fopenmp"]
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        capability = "DEFAULT"
    if capability in ("AVX2", "AVX512"):
        # AVX2 vectors with torch's own SLEEF exp/tanh (the functions torch.sigmoid/tanh use).
        return "avx2", flags + ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"]
    return "default", flags


def load_extension():
    """The compiled extension, building it on first use; ``None`` if it cannot be built."""
    global _EXT, _EXT_ERROR
    if _EXT is not None or _EXT_ERROR is not None:
        return _EXT
    with _LOCK:
        if _EXT is None and _EXT_ERROR is None:
            try:
                from recnorm.kernels import _build

                tag, flags = _build_flags()
                source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "fused_lstm.cpp")
                ext = _build.load(f"recnorm_fused_lstm_{tag}", [source], flags, ["-fopenmp"])
                ext.set_pool_capacity(int(float(os.environ.get("RECNORM_FUSED_POOL_MB", "1024")) * 2**20))
                _EXT = ext
            except Exception as exc:  # no compiler, no ninja, build error, ...
                text = str(exc).strip().splitlines()
                _EXT_ERROR = f"{type(exc).__name__}: {text[0] if text else ''}"
                log.warning(
                    "recnorm: the fused CPU LSTM kernel could not be built (%s); falling back to the reference loop",
                    _EXT_ERROR,
                )
    return _EXT


def empty_cache() -> None:
    """Release the freed buffers the kernel keeps for reuse (see ``RECNORM_FUSED_POOL_MB``)."""
    if _EXT is not None:
        cap = int(float(os.environ.get("RECNORM_FUSED_POOL_MB", "1024")) * 2**20)
        _EXT.set_pool_capacity(0)
        _EXT.set_pool_capacity(cap)


def available() -> bool:
    """Whether the extension is (or can be) built on this machine."""
    return load_extension() is not None


# ---------------------------------------------------------------------------------------------------
# Which cases this path serves
# ---------------------------------------------------------------------------------------------------


def _site_kind(module) -> Optional[str]:
    if module is None:
        return "none"
    if type(module) is GroupedLayerNorm and len(module.groups) == 1:
        return "layer"
    if (
        type(module) is RecurrentBatchNorm
        and getattr(module, "scope", None) == "step"
        and module._accumulator is None
        and not module._observers
    ):
        return "batch"
    return None


def _mode(p: DirectionParams) -> Optional[str]:
    kinds = {_site_kind(p.norm_ih), _site_kind(p.norm_hh), _site_kind(p.norm_c)}
    if len(kinds) != 1 or None in kinds:
        return None
    return kinds.pop()


def _tensors_ok(x: Tensor, p: DirectionParams) -> bool:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 2:
        return False
    tensors = [p.weight_ih, p.weight_hh, p.bias_ih, p.bias_hh]
    for norm in (p.norm_ih, p.norm_hh, p.norm_c):
        if norm is not None:
            tensors += [norm.weight, norm.bias]
            if isinstance(norm, RecurrentBatchNorm):
                tensors += [norm.running_mean, norm.running_var]
    for t in tensors:
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            return False
    return True


def supports(cell: CellType, params: DirectionParams, on_output=None, x: Optional[Tensor] = None) -> bool:
    """Whether :func:`run_direction` serves this direction (and the extension is available)."""
    if on_output is not None or not isinstance(cell, LSTMCellType) or params.weight_hr is not None:
        return False
    mode = _mode(params)
    if mode is None:
        return False
    if mode == "batch":
        norms = (params.norm_ih, params.norm_hh, params.norm_c)
        if len({n.training for n in norms}) != 1:
            return False
    if x is not None and not _tensors_ok(x, params):
        return False
    return available()


# ---------------------------------------------------------------------------------------------------
# The autograd Function
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Config:
    batch_sizes: List[int]
    mode: int
    eps: List[float]
    training: bool
    step_offset: int
    bn_buffers: List[Optional[Tensor]]
    momentum: List[float]
    chunk_rows: int
    inproj_max: int
    inproj_rows: int
    onednn: Tuple[bool, bool, bool]  # oneDNN instead of MKL: input projection, forward / backward step GEMM


# Inputs at most this wide are projected inside the step pass instead of by one GEMM before the loop
# (a GEMM with a tiny inner dimension runs far below peak and writes a large (N, 4H) buffer).
INPROJ_MAX = 8
# Otherwise the projection runs as GEMMs over chunks of consecutive steps of about this many rows, each
# just before its steps, so that the step pass finds them in cache.
INPROJ_ROWS = int(os.environ.get("RECNORM_FUSED_INPROJ_ROWS", "1024"))


def _chunk_rows(n_rows: int) -> int:
    env = os.environ.get("RECNORM_FUSED_CHUNK_ROWS")
    if env:
        return max(1, int(env))
    return max(2048, n_rows // 4)


def _onednn_plan(batch: int, hidden: int, input_size: int, dtype: torch.dtype) -> Tuple[bool, bool, bool]:
    """Which GEMMs go to oneDNN's linear instead of MKL's sgemm: (input projection, forward step,
    backward step).

    Measured on a 2-core AMD EPYC (AVX2), 2 threads, with prepacked weights: oneDNN is 10-40% faster for
    the forward product ``h W_hh^T`` once H >= 256, and for the backward product ``dG W_hh`` when H >= 512
    with a batch of at most 64. For the chunked input projection it won in isolation but not inside the
    loop, so MKL keeps it by default.
    ``RECNORM_FUSED_ONEDNN=0`` or ``1`` forces either choice (or a mask such as ``011``).
    """
    hoisted = input_size > INPROJ_MAX
    env = os.environ.get("RECNORM_FUSED_ONEDNN", "")
    if env == "0" or dtype != torch.float32 or not _onednn_available():
        return (False, False, False)
    if env == "1":
        return (hoisted, True, True)
    if len(env) == 3 and set(env) <= {"0", "1"}:  # a mask, e.g. "011"
        return (hoisted and env[0] == "1", env[1] == "1", env[2] == "1")
    return (False, hidden >= 256, hidden >= 512 and batch <= 64)


_ONEDNN: Optional[bool] = None


def _onednn_available() -> bool:
    global _ONEDNN
    if _ONEDNN is None:
        try:
            _ONEDNN = bool(
                torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and load_extension().onednn_available()
            )
        except Exception:
            _ONEDNN = False
    return _ONEDNN


def _pack(w: Tensor, batch: int) -> Tensor:
    """``w`` (out, in) prepacked for oneDNN's linear ``x w^T``."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), batch)


def _packed(cfg: _Config, w_ih: Tensor, w_hh: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The forward's prepacked weights: (W_hh for the step GEMM, W_ih for the input projection)."""
    return (
        _pack(w_hh, cfg.batch_sizes[0]) if cfg.onednn[1] else None,
        _pack(w_ih, cfg.inproj_rows) if cfg.onednn[0] else None,
    )


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


class FusedLSTMFunction(torch.autograd.Function):
    """``(cfg, x, h0, c0, w_ih, w_hh, b, g_ih, g_hh, g_c, beta_c) -> (out, h_n, c_n)`` on packed rows.

    ``b`` is the sum of every additive bias of the gate pre-activations (``b_ih + b_hh`` plus any gate
    norm shift); ``g_*`` are the norm gains and ``beta_c`` the cell-norm shift (``None`` where absent).
    """

    @staticmethod
    def forward(ctx, cfg: _Config, x, h0, c0, w_ih, w_hh, b, g_ih, g_hh, g_c, beta_c):
        ext = load_extension()
        out, hn, cn, xi, xh, cells, stats_g, stats_h = ext.forward(
            x, h0, c0, w_ih, w_hh, b, g_ih, g_hh, g_c, beta_c, cfg.batch_sizes, cfg.mode, cfg.eps, cfg.training, True,
            cfg.step_offset, cfg.bn_buffers, cfg.momentum, cfg.inproj_max, cfg.inproj_rows,
            *_packed(cfg, w_ih, w_hh),
        )  # fmt: skip
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b, g_ih, g_hh, g_c, beta_c, out, xi, xh, cells, stats_g, stats_h)
        return out, hn, cn

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hn, d_cn):
        cfg = ctx.cfg
        x, h0, c0, w_ih, w_hh, b, g_ih, g_hh, g_c, beta_c, out, xi, xh, cells, stats_g, stats_h = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dh0, dc0, dw_ih, dw_hh, db, dg_ih, dg_hh, dg_c, dbeta_c = load_extension().backward(
            _contig(d_out), _contig(d_hn), _contig(d_cn), x, h0, c0, w_ih, w_hh, b, g_ih, g_hh, g_c, beta_c, out, xi, xh,
            cells, stats_g, stats_h, cfg.batch_sizes, cfg.mode, cfg.training, bool(need[1]), cfg.chunk_rows,
            _pack(w_hh.t(), cfg.batch_sizes[0]) if cfg.onednn[2] else None,
        )  # fmt: skip
        grads = (dx, dh0, dc0, dw_ih, dw_hh, db, dg_ih, dg_hh, dg_c, dbeta_c)
        return (None,) + tuple(g if n else None for g, n in zip(grads, need[1:]))


def _sum(*ts: Optional[Tensor]) -> Optional[Tensor]:
    total = None
    for t in ts:
        if t is not None:
            total = t if total is None else total + t
    return total


def prepare(x: Tensor, batch_sizes: Sequence[int], state, p: DirectionParams, step_offset: int = 0):
    """``(cfg, tensors)`` for :class:`FusedLSTMFunction` from a direction's arguments (no checks)."""
    mode = _mode(p)
    h0, c0 = state
    norms = (p.norm_ih, p.norm_hh, p.norm_c)
    if mode == "none":
        b = _sum(p.bias_ih, p.bias_hh)
        gains = (None, None, None, None)
        eps = [1e-5, 1e-5, 1e-5]
    else:
        b = _sum(p.bias_ih, p.bias_hh, p.norm_ih.bias, p.norm_hh.bias)  # gate-norm shifts add to the bias
        gains = (p.norm_ih.weight, p.norm_hh.weight, p.norm_c.weight, p.norm_c.bias)
        eps = [float(n.eps) for n in norms]
    bn_buffers: List[Optional[Tensor]] = [None] * 9
    momentum = [0.1, 0.1, 0.1]
    training = False
    if mode == "batch":
        training = bool(p.norm_ih.training)
        for i, n in enumerate(norms):
            bn_buffers[3 * i : 3 * i + 3] = [n.running_mean, n.running_var, n.num_batches_tracked]
            momentum[i] = -1.0 if n.momentum is None else float(n.momentum)
    batch_sizes = [int(v) for v in batch_sizes]
    cfg = _Config(
        batch_sizes, _MODES[mode], eps, training, int(step_offset), bn_buffers, momentum, _chunk_rows(sum(batch_sizes)), INPROJ_MAX,
        INPROJ_ROWS, _onednn_plan(batch_sizes[0], p.weight_hh.shape[1], x.shape[1], x.dtype),
    )  # fmt: skip
    tensors = (x.contiguous(), h0.contiguous(), c0.contiguous(), p.weight_ih.contiguous(), p.weight_hh.contiguous(), b) + gains
    return cfg, tensors


def run_direction(
    cell: CellType,
    x: Tensor,
    batch_sizes: Sequence[int],
    state: Tuple[Tensor, ...],
    p: DirectionParams,
    on_output: Optional[Callable[[int, Tensor], None]] = None,
    step_offset: int = 0,
) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """Same arguments and results as :func:`recnorm.kernels.reference.run_direction`."""
    if on_output is not None:
        raise ValueError("the fused kernel does not call on_output; use the reference kernel for diagnostics")
    cfg, tensors = prepare(x, batch_sizes, state, p, step_offset)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, hn, cn = FusedLSTMFunction.apply(cfg, *tensors)
    else:
        out, hn, cn = load_extension().forward(
            *tensors, cfg.batch_sizes, cfg.mode, cfg.eps, cfg.training, False, cfg.step_offset, cfg.bn_buffers, cfg.momentum,
            cfg.inproj_max, cfg.inproj_rows, *_packed(cfg, p.weight_ih, p.weight_hh),
        )  # fmt: skip
    if cfg.mode == _MODES["batch"] and cfg.training:
        for n in (p.norm_ih, p.norm_hh, p.norm_c):
            n._last_slot = None  # running statistics changed
    return out, (hn, cn)
