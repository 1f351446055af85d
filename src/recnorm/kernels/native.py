"""Fast path through torch's own fused RNN kernels (oneDNN/MKL on CPU, cuDNN on CUDA).

It serves every case whose recurrence is torch.nn's exactly:

* ``norm=None``: the same ATen op ``torch.nn.LSTM`` calls, on one direction of one layer.
* ``norm="sequence_batch"``: sequence-wise BN of ``W_ih x`` is an affine map per gate feature with
  batch-wide statistics, so it folds into the input weights,

  .. code-block:: text

      BN(W x) + b = (s * W) x + (b - s * mu),   s = gamma / sqrt(var + eps)
      mu = W mean(x),   var_j = w_j^T Cov(x) w_j     (over all valid rows of x)

  and the folded weights go to the fused kernel. Autograd differentiates through the fold, so the
  gradients are those of the reference loop; the moments come from the input's mean and covariance
  (``O(N I^2)``) instead of a second ``(N, G*H)`` projection.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from recnorm.kernels.reference import DirectionParams
from recnorm.nn.cells import CellType, GRUCellType, LSTMCellType, RNNCellType
from recnorm.nn.norms import RecurrentBatchNorm

__all__ = ["supports", "run_direction"]


def _op(cell: CellType):
    if isinstance(cell, LSTMCellType):
        return torch._VF.lstm
    if isinstance(cell, GRUCellType):
        return torch._VF.gru
    if isinstance(cell, RNNCellType):
        return torch._VF.rnn_tanh if cell.nonlinearity == "tanh" else torch._VF.rnn_relu
    return None


def supports(cell: CellType, p: DirectionParams, on_output=None) -> bool:
    """Whether this direction's math is torch.nn's, up to a foldable sequence-wise input BN."""
    if on_output is not None or _op(cell) is None or p.norm_hh is not None or p.norm_c is not None:
        return False
    bn = p.norm_ih
    return bn is None or (isinstance(bn, RecurrentBatchNorm) and bn.scope == "sequence")


def _folded_input_weights(x: Tensor, p: DirectionParams) -> Tuple[Tensor, Optional[Tensor]]:
    bn = p.norm_ih
    if bn is None:
        return p.weight_ih, p.bias_ih
    w = p.weight_ih  # (G*H, F)
    n = x.shape[0]

    def moments():
        xm = x.mean(0)  # (F,)
        xc = x - xm
        cov = xc.t().matmul(xc) / n  # (F, F), biased like the normalization's variance
        return w.matmul(xm), (w.matmul(cov) * w).sum(1).clamp(min=0)  # (G*H,) each

    scale, shift = bn.affine(moments, n, 0)
    w = w * scale.unsqueeze(1)
    return w, (shift if p.bias_ih is None else p.bias_ih + shift)


def run_direction(
    cell: CellType, x: Tensor, batch_sizes: Sequence[int], state: Tuple[Tensor, ...], p: DirectionParams
) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """Same contract as :func:`recnorm.kernels.reference.run_direction` (one layer, one direction)."""
    w_ih, b_ih = _folded_input_weights(x, p)
    b_hh = p.bias_hh
    has_bias = b_ih is not None
    if has_bias and b_hh is None:  # bias=False layer whose folded BN brings a shift
        b_hh = torch.zeros_like(b_ih)
    weights = [w_ih, p.weight_hh] + ([b_ih, b_hh] if has_bias else [])
    if p.weight_hr is not None:
        weights.append(p.weight_hr)
    hx = tuple(s.unsqueeze(0) for s in state)  # (1, B, ·): one layer, one direction
    hx_arg = hx if len(hx) == 2 else hx[0]
    op = _op(cell)
    # "train" tells oneDNN/cuDNN to keep what backward needs; dropout is 0 either way
    train = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
    uniform = all(b == batch_sizes[0] for b in batch_sizes)
    if uniform:
        T, B = len(batch_sizes), batch_sizes[0]
        res = op(x.view(T, B, -1), hx_arg, weights, has_bias, 1, 0.0, train, False, False)
        out = res[0].reshape(T * B, -1)
    else:
        bs = torch.tensor(list(batch_sizes), dtype=torch.long)
        res = op(x, bs, hx_arg, weights, has_bias, 1, 0.0, train, False)
        out = res[0]
    finals = tuple(r.squeeze(0) for r in res[1:])
    return out, finals
