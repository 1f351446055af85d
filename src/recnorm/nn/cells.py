r"""Cell types: the gate math of one time step, independent of any normalization.

A cell type is a small object with its gate layout and a ``step`` function. The time loop computes the
two gate terms (each already normalized by whatever the chosen scheme puts at the ``"ih"`` and ``"hh"``
sites, and with its bias added), then calls ``step``:

.. code-block:: text

    gi = N_ih(W_ih x_t) + b_ih        # (B, G*H)
    gh = N_hh(W_hh h_{t-1}) + b_hh    # (B, G*H)
    h_t, state_t = cell.step(gi, gh, state_{t-1}, ...)

With no normalization (``N = identity``) these are exactly torch.nn's equations, gate order included:

* LSTM (gates i, f, g, o)::

      i, f, g, o = split(gi + gh)
      c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
      h_t = sigmoid(o) * tanh(N_c(c_t))            # then h_t = W_hr h_t when proj_size > 0

  ``c_t`` is carried to the next step unnormalized; ``N_c`` (the ``"cell"`` site) acts only inside
  the output tanh.

* GRU (gates r, z, n; ``b_hn`` stays inside the reset product, as in torch)::

      r = sigmoid(gi_r + gh_r);  z = sigmoid(gi_z + gh_z)
      n = tanh(gi_n + r * gh_n)
      h_t = (1 - z) * n + z * h_{t-1}

* RNN: ``h_t = act(gi + gh)`` with ``act`` tanh or relu.

A new cell type is one subclass of :class:`CellType` registered with :func:`register_cell`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["CellType", "LSTMCellType", "GRUCellType", "RNNCellType", "register_cell", "get_cell", "list_cells", "CELLS"]

State = Tuple[Tensor, ...]


class CellType:
    """Gate layout and one-step math of a recurrent cell.

    Attributes:
        name: registry key.
        num_gates: G, the number of H-sized blocks in the gate pre-activations.
        state_size: number of state tensors (1 for ``h``; 2 for ``(h, c)``).
        sites: normalization sites the cell offers (a subset of ``("ih", "hh", "cell")``).
    """

    name: str = ""
    num_gates: int = 1
    state_size: int = 1
    sites: Tuple[str, ...] = ("ih", "hh")

    def gate_groups(self, hidden_size: int) -> Tuple[int, ...]:
        """Feature groups that layer norm normalizes separately in a gate term."""
        return (self.num_gates * hidden_size,)

    def step(
        self, gi: Tensor, gh: Tensor, state: State, t: int, cell_norm=None, weight_hr: Optional[Tensor] = None
    ) -> Tuple[Tensor, State]:
        """One step. Returns the output ``h_t`` and the new state tuple."""
        raise NotImplementedError


class LSTMCellType(CellType):
    name = "lstm"
    num_gates = 4
    state_size = 2
    sites = ("ih", "hh", "cell")

    def step(self, gi, gh, state, t, cell_norm=None, weight_hr=None):
        h, c = state
        i, f, g, o = (gi + gh).chunk(4, 1)  # each (B, H)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        cn = c if cell_norm is None else cell_norm(c, t)
        h = torch.sigmoid(o) * torch.tanh(cn)
        if weight_hr is not None:
            h = h.matmul(weight_hr.t())  # (B, P)
        return h, (h, c)


class GRUCellType(CellType):
    name = "gru"
    num_gates = 3
    state_size = 1

    def gate_groups(self, hidden_size):
        # Ba et al. (2016), eqs. 26-28: one layer norm over the (r, z) block, another over the n block.
        return (2 * hidden_size, hidden_size)

    def step(self, gi, gh, state, t, cell_norm=None, weight_hr=None):
        (h,) = state
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = n + z * (h - n)  # = (1 - z) * n + z * h
        return h, (h,)


class RNNCellType(CellType):
    num_gates = 1
    state_size = 1

    def __init__(self, nonlinearity: str = "tanh") -> None:
        if nonlinearity not in _ACTIVATIONS:
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}; expected one of {sorted(_ACTIVATIONS)}")
        self.nonlinearity = nonlinearity
        self.name = f"rnn_{nonlinearity}"
        self._act = _ACTIVATIONS[nonlinearity]

    def step(self, gi, gh, state, t, cell_norm=None, weight_hr=None):
        h = self._act(gi + gh)
        return h, (h,)


_ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {"tanh": torch.tanh, "relu": torch.relu}

CELLS: Dict[str, Callable[..., CellType]] = {}


def register_cell(name: str, factory: Callable[..., CellType]) -> None:
    if name in CELLS:
        raise ValueError(f"cell {name!r} is already registered")
    CELLS[name] = factory


def list_cells() -> List[str]:
    return sorted(CELLS)


def get_cell(name: str, **options) -> CellType:
    """Build a cell type by name (``"lstm"``, ``"gru"``, ``"rnn"``)."""
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; expected one of {list_cells()}")
    return CELLS[name](**options)


register_cell("lstm", LSTMCellType)
register_cell("gru", GRUCellType)
register_cell("rnn", RNNCellType)
