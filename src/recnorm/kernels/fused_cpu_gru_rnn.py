"""Fused CPU time loop for GRU and RNN (tanh / relu) directions with layer or recurrent batch norm.

The counterpart of :mod:`recnorm.kernels.fused_cpu` (the LSTM kernel) for the one-state cells: the
whole loop -- forward and a hand-derived backward through time -- runs in a C++ extension
(``csrc/fused_gru_rnn.cpp``), built on first use through :func:`recnorm.kernels._build.load` and cached.
Per step the forward does one GEMM for the recurrent term and one fused, vectorized pass for the two
gate norms, the gates and the state update; the input projection runs as GEMMs over chunks of
consecutive steps just before them (or inside the pass for inputs at most :data:`INPROJ_MAX` wide). The
backward does one fused pass and one GEMM per step, and the weight gradients as a few large GEMMs over
chunks of consecutive steps.

It computes exactly what :func:`recnorm.kernels.reference.run_direction` computes (the oracle it is
tested against): packed rows; the GRU's layer norm over the ``(r, z)`` block and the ``n`` block
separately (:class:`~recnorm.nn.norms.GroupedLayerNorm` groups ``(2H, H)``), with ``b_hn`` inside the
reset product; per-step batch statistics over the valid rows, running statistics updated as
:meth:`recnorm.nn.norms.RecurrentBatchNorm._update` does, population statistics in eval mode and for
steps with fewer than two valid rows; zero-variance ("degenerate") features normalize to 0 with no
gradient.

Served: :class:`~recnorm.nn.cells.GRUCellType` and :class:`~recnorm.nn.cells.RNNCellType` (tanh, relu)
directions whose two gate sites are both :class:`~recnorm.nn.norms.GroupedLayerNorm` with the cell's
gate groups, or both per-step :class:`~recnorm.nn.norms.RecurrentBatchNorm` (schemes ``"layer"``,
``"batch"``, ``"shared_batch"``), float32/float64 CPU tensors, no diagnostics (observers,
``on_output``) and no population-statistics pass in progress. ``norm=None`` is left to
:mod:`recnorm.kernels.native`. Anything else returns False from :func:`supports` and runs on the
reference loop. If the extension cannot be built, one warning is logged and :func:`supports` returns
False. As with the LSTM kernel, the backward is not itself differentiable (no double backward).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from recnorm.kernels import _fused_common as common
from recnorm.kernels._fused_common import INPROJ_MAX, INPROJ_ROWS, chunk_rows, contig, pack, sum_present
from recnorm.kernels.reference import DirectionParams
from recnorm.nn.cells import CellType, GRUCellType, RNNCellType
from recnorm.nn.norms import GroupedLayerNorm

__all__ = ["supports", "run_direction", "load_extension", "available", "FusedGRURNNFunction"]

log = logging.getLogger(__name__)

_MODES = {"layer": 1, "batch": 2}
_CELLS = {"gru": 0, "rnn_tanh": 1, "rnn_relu": 2}
# The extension and why it could not be built, and whether it can call oneDNN: kept here by
# recnorm.kernels._fused_common (setting them to None makes the next call try again).
_EXT = None
_EXT_ERROR: Optional[str] = None
_ONEDNN: Optional[bool] = None
_LOCK = threading.Lock()


def load_extension():
    """The compiled extension, building it on first use; ``None`` if it cannot be built."""
    return common.load_extension(sys.modules[__name__], "recnorm_fused_gru_rnn", "fused_gru_rnn.cpp", "GRU/RNN")


def available() -> bool:
    """Whether the extension is (or can be) built on this machine."""
    return load_extension() is not None


# ---------------------------------------------------------------------------------------------------
# Which cases this path serves
# ---------------------------------------------------------------------------------------------------


def _cell_code(cell: CellType) -> Optional[int]:
    # Exact types: a subclass may change the step math this kernel hard-codes.
    if type(cell) is GRUCellType:
        return _CELLS["gru"]
    if type(cell) is RNNCellType and cell.nonlinearity in ("tanh", "relu"):
        return _CELLS[f"rnn_{cell.nonlinearity}"]
    return None


def _site_kind(module, groups: Tuple[int, ...]) -> Optional[str]:
    if type(module) is GroupedLayerNorm and tuple(module.groups) == tuple(groups):
        return "layer"
    if common.batch_site(module):
        return "batch"
    return None


def _mode(cell: CellType, p: DirectionParams) -> Optional[str]:
    if p.norm_c is not None or p.weight_hr is not None:
        return None
    hidden = p.weight_hh.shape[1]
    groups = cell.gate_groups(hidden)
    kinds = {_site_kind(p.norm_ih, groups), _site_kind(p.norm_hh, groups)}
    if len(kinds) != 1 or None in kinds:
        return None
    return kinds.pop()


def _tensors_ok(x: Tensor, p: DirectionParams, gates: int) -> bool:
    if not common.tensors_ok(x, p, (p.norm_ih, p.norm_hh)):
        return False
    hidden = p.weight_hh.shape[1]
    return tuple(p.weight_hh.shape) == (gates * hidden, hidden) and tuple(p.weight_ih.shape) == (gates * hidden, x.shape[1])


def supports(cell: CellType, params: DirectionParams, on_output=None, x: Optional[Tensor] = None) -> bool:
    """Whether :func:`run_direction` serves this direction (and the extension is available)."""
    if on_output is not None or _cell_code(cell) is None:
        return False
    mode = _mode(cell, params)
    if mode is None:
        return False
    if mode == "batch" and params.norm_ih.training != params.norm_hh.training:
        return False
    if x is not None and not _tensors_ok(x, params, cell.num_gates):
        return False
    return available()


# ---------------------------------------------------------------------------------------------------
# The autograd Function
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Config:
    batch_sizes: List[int]
    cell: int
    mode: int
    eps: List[float]
    training: bool
    step_offset: int
    bn_buffers: List[Optional[Tensor]]
    momentum: List[float]
    chunk_rows: int
    inproj_max: int
    inproj_rows: int
    onednn: Tuple[bool, bool]  # oneDNN (instead of MKL) for the forward / backward per-step GEMM


def _onednn_available() -> bool:
    return common.onednn_available(sys.modules[__name__])


def _onednn_plan(batch: int, hidden: int, dtype: torch.dtype) -> Tuple[bool, bool]:
    """Whether the per-step GEMMs go to oneDNN's linear (forward, backward) instead of MKL's sgemm.

    The LSTM kernel's plan and measurements (:func:`recnorm.kernels._fused_common.onednn_plan`) without
    the input projection, which stays with MKL here: oneDNN for the forward product once H >= 256, for the
    backward product when H >= 512 with a batch of at most 64; ``RECNORM_FUSED_ONEDNN=0`` or ``1`` forces
    either choice, a mask such as ``011`` each (its first digit, the input projection, does not apply).
    """
    return common.onednn_plan(batch, hidden, False, dtype, _onednn_available)[1:]


class FusedGRURNNFunction(torch.autograd.Function):
    """``(cfg, x, h0, w_ih, w_hh, b, b_hn, g_ih, g_hh) -> (out, h_n)`` on packed rows.

    ``b`` (G*H) is every bias added outside the GRU's reset product: ``b_ih + b_hh`` (plus any gate-norm
    shift) for the RNN and the GRU's r, z blocks, ``b_in`` for the GRU's n block; ``b_hn`` (H, GRU only)
    is the recurrent n-block bias inside ``r * (.)``. ``g_*`` are the two gate-norm gains.
    """

    @staticmethod
    def forward(ctx, cfg: _Config, x, h0, w_ih, w_hh, b, b_hn, g_ih, g_hh):
        out, hn, xi, xh, stats = load_extension().forward(
            x, h0, w_ih, w_hh, b, b_hn, g_ih, g_hh, cfg.batch_sizes, cfg.cell, cfg.mode, cfg.eps, cfg.training, True,
            cfg.step_offset, cfg.bn_buffers, cfg.momentum, cfg.inproj_max, cfg.inproj_rows,
            pack(w_hh, cfg.batch_sizes[0]) if cfg.onednn[0] else None,
        )  # fmt: skip
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, w_ih, w_hh, b, b_hn, g_ih, g_hh, out, xi, xh, stats)
        return out, hn

    @staticmethod
    @common.differentiable_once
    def backward(ctx, d_out, d_hn):
        cfg = ctx.cfg
        x, h0, w_ih, w_hh, b, b_hn, g_ih, g_hh, out, xi, xh, stats = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = load_extension().backward(
            contig(d_out), contig(d_hn), x, h0, w_ih, w_hh, b, b_hn, g_ih, g_hh, out, xi, xh, stats, cfg.batch_sizes,
            cfg.cell, cfg.mode, cfg.training, bool(need[1]), cfg.chunk_rows,
            pack(w_hh.t(), cfg.batch_sizes[0]) if cfg.onednn[1] else None,
        )  # fmt: skip
        return (None,) + tuple(g if n else None for g, n in zip(grads, need[1:], strict=True))


def _biases(gru: bool, hidden: int, p: DirectionParams) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(b, b_hn)`` of :class:`FusedGRURNNFunction` (differentiable functions of the parameters)."""
    b_i = sum_present(p.bias_ih, p.norm_ih.bias)  # gate-norm shifts (none in the registered schemes) add here
    b_h = sum_present(p.bias_hh, p.norm_hh.bias)
    if not gru:
        b = sum_present(b_i, b_h)
        return (None if b is None else b.contiguous()), None
    if b_h is None:
        return (None if b_i is None else b_i.contiguous()), None
    rz, hn = b_h.split([2 * hidden, hidden])
    b = torch.cat([rz, torch.zeros_like(hn)]) if b_i is None else b_i + torch.cat([rz, torch.zeros_like(hn)])
    return b.contiguous(), hn.contiguous()


def prepare(cell: CellType, x: Tensor, batch_sizes: Sequence[int], state, p: DirectionParams, step_offset: int = 0):
    """``(cfg, tensors)`` for :class:`FusedGRURNNFunction` from a direction's arguments (no checks)."""
    mode = _mode(cell, p)
    (h0,) = state
    code = _cell_code(cell)
    hidden = p.weight_hh.shape[1]
    b, b_hn = _biases(code == _CELLS["gru"], hidden, p)
    norms = (p.norm_ih, p.norm_hh)
    eps = [float(n.eps) for n in norms]
    training, bn_buffers, momentum = common.bn_arguments(norms, mode == "batch")
    batch_sizes = [int(v) for v in batch_sizes]
    cfg = _Config(
        batch_sizes, code, _MODES[mode], eps, training, int(step_offset), bn_buffers, momentum, chunk_rows(sum(batch_sizes)),
        INPROJ_MAX, INPROJ_ROWS, _onednn_plan(batch_sizes[0], hidden, x.dtype),
    )  # fmt: skip
    tensors = (
        x.contiguous(), h0.contiguous(), p.weight_ih.contiguous(), p.weight_hh.contiguous(), b, b_hn,
        p.norm_ih.weight.contiguous(), p.norm_hh.weight.contiguous(),
    )  # fmt: skip
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
    cfg, tensors = prepare(cell, x, batch_sizes, state, p, step_offset)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, hn = FusedGRURNNFunction.apply(cfg, *tensors)
    else:
        out, hn = load_extension().forward(
            *tensors, cfg.batch_sizes, cfg.cell, cfg.mode, cfg.eps, cfg.training, False, cfg.step_offset, cfg.bn_buffers,
            cfg.momentum, cfg.inproj_max, cfg.inproj_rows, pack(p.weight_hh, cfg.batch_sizes[0]) if cfg.onednn[0] else None,
        )  # fmt: skip
    if cfg.mode == _MODES["batch"] and cfg.training:
        for n in (p.norm_ih, p.norm_hh):
            n._last_slot = None  # running statistics changed
    return out, (hn,)
