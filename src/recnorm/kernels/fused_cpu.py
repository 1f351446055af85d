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
False. Double backward (``create_graph=True``) raises a RuntimeError that points to the reference loop.

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
import sys
import threading
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from recnorm.kernels import _fused_common as common
from recnorm.kernels._fused_common import INPROJ_MAX, INPROJ_ROWS, chunk_rows, contig, pack, sum_present
from recnorm.kernels._fused_common import build_flags as _build_flags  # noqa: F401 (its old name here)
from recnorm.kernels.reference import DirectionParams
from recnorm.nn.cells import CellType, LSTMCellType
from recnorm.nn.norms import GroupedLayerNorm

__all__ = ["supports", "run_direction", "load_extension", "available", "empty_cache"]

log = logging.getLogger(__name__)

_MODES = {"none": 0, "layer": 1, "batch": 2}
# The extension and why it could not be built, and whether it can call oneDNN: kept here by
# recnorm.kernels._fused_common (setting them to None makes the next call try again).
_EXT = None
_EXT_ERROR: Optional[str] = None
_ONEDNN: Optional[bool] = None
_LOCK = threading.Lock()


def _pool_bytes() -> int:
    return int(float(os.environ.get("RECNORM_FUSED_POOL_MB", "1024")) * 2**20)


def load_extension():
    """The compiled extension, building it on first use; ``None`` if it cannot be built."""
    return common.load_extension(
        sys.modules[__name__], "recnorm_fused_lstm", "fused_lstm.cpp", "LSTM", lambda ext: ext.set_pool_capacity(_pool_bytes())
    )


def empty_cache() -> None:
    """Release the freed buffers the kernel keeps for reuse (see ``RECNORM_FUSED_POOL_MB``)."""
    if _EXT is not None:
        _EXT.set_pool_capacity(0)
        _EXT.set_pool_capacity(_pool_bytes())


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
    if common.batch_site(module):
        return "batch"
    return None


def _mode(p: DirectionParams) -> Optional[str]:
    kinds = {_site_kind(p.norm_ih), _site_kind(p.norm_hh), _site_kind(p.norm_c)}
    if len(kinds) != 1 or None in kinds:
        return None
    return kinds.pop()


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
    if x is not None and not common.tensors_ok(x, params, (params.norm_ih, params.norm_hh, params.norm_c)):
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


def _onednn_available() -> bool:
    return common.onednn_available(sys.modules[__name__])


def _onednn_plan(batch: int, hidden: int, input_size: int, dtype: torch.dtype) -> Tuple[bool, bool, bool]:
    """Which GEMMs go to oneDNN's linear instead of MKL's sgemm: (input projection, forward step,
    backward step); see :func:`recnorm.kernels._fused_common.onednn_plan`."""
    return common.onednn_plan(batch, hidden, input_size > INPROJ_MAX, dtype, _onednn_available)


def _packed(cfg: _Config, w_ih: Tensor, w_hh: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The forward's prepacked weights: (W_hh for the step GEMM, W_ih for the input projection)."""
    return (
        pack(w_hh, cfg.batch_sizes[0]) if cfg.onednn[1] else None,
        pack(w_ih, cfg.inproj_rows) if cfg.onednn[0] else None,
    )


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
    @common.differentiable_once
    def backward(ctx, d_out, d_hn, d_cn):
        cfg = ctx.cfg
        x, h0, c0, w_ih, w_hh, b, g_ih, g_hh, g_c, beta_c, out, xi, xh, cells, stats_g, stats_h = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dh0, dc0, dw_ih, dw_hh, db, dg_ih, dg_hh, dg_c, dbeta_c = load_extension().backward(
            contig(d_out), contig(d_hn), contig(d_cn), x, h0, c0, w_ih, w_hh, b, g_ih, g_hh, g_c, beta_c, out, xi, xh,
            cells, stats_g, stats_h, cfg.batch_sizes, cfg.mode, cfg.training, bool(need[1]), cfg.chunk_rows,
            pack(w_hh.t(), cfg.batch_sizes[0]) if cfg.onednn[2] else None,
        )  # fmt: skip
        grads = (dx, dh0, dc0, dw_ih, dw_hh, db, dg_ih, dg_hh, dg_c, dbeta_c)
        return (None,) + tuple(g if n else None for g, n in zip(grads, need[1:]))


def prepare(x: Tensor, batch_sizes: Sequence[int], state, p: DirectionParams, step_offset: int = 0):
    """``(cfg, tensors)`` for :class:`FusedLSTMFunction` from a direction's arguments (no checks)."""
    mode = _mode(p)
    h0, c0 = state
    norms = (p.norm_ih, p.norm_hh, p.norm_c)
    if mode == "none":
        b = sum_present(p.bias_ih, p.bias_hh)
        gains = (None, None, None, None)
        eps = [1e-5, 1e-5, 1e-5]
    else:
        b = sum_present(p.bias_ih, p.bias_hh, p.norm_ih.bias, p.norm_hh.bias)  # gate-norm shifts add to the bias
        gains = (p.norm_ih.weight, p.norm_hh.weight, p.norm_c.weight, p.norm_c.bias)
        eps = [float(n.eps) for n in norms]
    training, bn_buffers, momentum = common.bn_arguments(norms, mode == "batch")
    batch_sizes = [int(v) for v in batch_sizes]
    cfg = _Config(
        batch_sizes, _MODES[mode], eps, training, int(step_offset), bn_buffers, momentum, chunk_rows(sum(batch_sizes)),
        INPROJ_MAX, INPROJ_ROWS, _onednn_plan(batch_sizes[0], p.weight_hh.shape[1], x.shape[1], x.dtype),
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
