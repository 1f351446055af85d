"""The step equations of torch.nn's LSTM, GRU and RNN cells, on plain tensors.

One copy, used by both layers above and below: :mod:`recnorm.nn.cells`' built-in cell types step with these
functions, and :mod:`recnorm.kernels.autodiff` recomputes the fused operators' outputs with them (kernels
cannot import ``recnorm.nn``). ``gi`` and ``gh`` are the (normalized) input and recurrent gate terms,
``(B, G*H)`` each, biases included; ``gh`` is None where a joint gate norm already added it into ``gi``.

* LSTM (gate order i, f, g, o): ``c_t = σ(f) c_{t-1} + σ(i) tanh(g)``, ``h_t = σ(o) tanh(N_c(c_t))``,
  projected by ``weight_hr`` when given; the carried cell is ``N_c(c_t)`` with ``carry`` set.
* GRU (gate order r, z, n): ``n = tanh(i_n + r * h_n)``, ``h_t = (1 - z) n + z h_{t-1}``.
* RNN: ``h_t = act(gi + gh)``.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["lstm_step", "gru_step", "rnn_step"]

State = Tuple[Tensor, ...]


def _sum(gi: Tensor, gh: Optional[Tensor]) -> Tensor:
    return gi if gh is None else gi + gh


def lstm_step(gi: Tensor, gh: Optional[Tensor], state: State, norm_c=None, carry: bool = False,
              weight_hr: Optional[Tensor] = None) -> Tuple[Tensor, State]:
    h, c = state
    i, f, g, o = _sum(gi, gh).chunk(4, 1)  # each (B, H)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    cn = c if norm_c is None else norm_c(c)
    h = torch.sigmoid(o) * torch.tanh(cn)
    if weight_hr is not None:
        h = h.matmul(weight_hr.t())  # (B, P)
    return h, (h, cn if carry else c)


def gru_step(gi: Tensor, gh: Tensor, state: State, norm_c=None, carry: bool = False,
             weight_hr: Optional[Tensor] = None) -> Tuple[Tensor, State]:
    (h,) = state
    i_r, i_z, i_n = gi.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    h = n + z * (h - n)  # = (1 - z) * n + z * h
    return h, (h,)


def rnn_step(act: Callable[[Tensor], Tensor], gi: Tensor, gh: Optional[Tensor], state: State) -> Tuple[Tensor, State]:
    h = act(_sum(gi, gh))
    return h, (h,)
