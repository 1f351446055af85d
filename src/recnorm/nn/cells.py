r"""Cell types: the gate math of one time step, the cell's weight shapes, and its normalization sites.

A cell type is a small object with its gate layout and a ``step`` function. The time loop computes the
two gate terms (each already normalized by whatever the chosen scheme puts at the ``"ih"`` and ``"hh"``
sites, and with its bias added), then calls ``step``:

.. code-block:: text

    gi = N_ih(W_ih x_t) + b_ih        # (B, G*H)
    gh = N_hh(W_hh h_{t-1}) + b_hh    # (B, G*H)
    h_t, state_t = cell.step(gi, gh, state_{t-1}, N_cell, carry, W_hr)

With a joint gate norm (the ``"gates"`` site), ``gi = N_gates(W_ih x_t + W_hh h_{t-1}) + b_ih + b_hh`` and
``gh`` is None. With no normalization (``N = identity``) these are exactly torch.nn's equations, gate order
included:

* LSTM (gates i, f, g, o)::

      i, f, g, o = split(gi + gh)
      c~_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
      h_t = sigmoid(o) * tanh(N_c(c~_t))          # then h_t = W_hr h_t when proj_size > 0
      c_t = c~_t  (or N_c(c~_t) when the normalized cell is carried)

* GRU (gates r, z, n; ``b_hn`` stays inside the reset product, as in torch)::

      r = sigmoid(gi_r + gh_r);  z = sigmoid(gi_z + gh_z)
      n = tanh(gi_n + r * gh_n)
      h_t = (1 - z) * n + z * h_{t-1}

* RNN: ``h_t = act(gi + gh)`` with ``act`` tanh or relu.

A new cell type is one subclass of :class:`CellType` with its own ``name``, registered in :data:`CELLS` by
``@register_cell`` on the class; every layer (``RecurrentBase(name, ...)``), the engine
(``recnorm train --cell name``) and the test suite then take it up. Its ``kernel_kind`` names the math
recnorm's fast kernels implement for it; a subclass that overrides ``step`` without declaring its own
``kernel_kind`` gets None, so no fast kernel ever runs math other than its own.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from recnorm.kernels.cell_math import gru_step, lstm_step, rnn_step
from recnorm.kernels.contract import CellDesc
from recnorm.registry import Registry

__all__ = ["CellType", "LSTMCellType", "GRUCellType", "RNNCellType", "CELLS", "register_cell", "get_cell", "list_cells"]

State = Tuple[Tensor, ...]


class CellType:
    """Gate layout, weight shapes and one-step math of a recurrent cell.

    Attributes:
        name: registry key.
        site_notes: for sites the cell lacks, why (a norm option that needs the site names it in its error).
        num_gates: G, the number of H-sized blocks in the gate pre-activations.
        state_size: number of state tensors (1 for ``h``; 2 for ``(h, c)``).
        sites: normalization sites the cell offers (a subset of ``("ih", "hh", "gates", "cell")``).
        has_projection: whether the cell accepts ``proj_size`` (LSTM).
        kernel_kind: the math the fast kernels implement for this cell (one of
            :data:`recnorm.kernels.contract.CELL_KINDS`), or None.
    """

    name: str = ""
    num_gates: int = 1
    state_size: int = 1
    sites: Tuple[str, ...] = ("ih", "hh", "gates")
    has_projection: bool = False
    kernel_kind: Optional[str] = None
    #: Why the cell lacks a site, for the error a norm option that needs it raises.
    site_notes: Dict[str, str] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that changes the math without naming it must not be run by a kernel that hard-codes
        # its parent's math.
        if "step" in cls.__dict__ and "kernel_kind" not in cls.__dict__:
            cls.kernel_kind = None

    def kind(self) -> Optional[str]:
        """The kernel math of this instance (None: only the reference loop and the export path run it)."""
        return self.kernel_kind

    @classmethod
    def variants(cls):
        """Constructor options of the instances tests should cover (one empty dict: the default)."""
        return [{}]

    def gate_groups(self, hidden_size: int) -> Tuple[int, ...]:
        """Feature groups that layer norm normalizes separately in a gate term."""
        return (self.num_gates * hidden_size,)

    def weight_shapes(self, input_size: int, hidden_size: int, proj_size: int = 0, bias: bool = True) -> Dict[str, Tuple[int, ...]]:
        """The parameters of one layer direction, in torch.nn's order and names (without the suffix)."""
        gates = self.num_gates * hidden_size
        real_hidden = proj_size or hidden_size
        shapes = {"weight_ih": (gates, input_size), "weight_hh": (gates, real_hidden)}
        if bias:
            shapes["bias_ih"] = (gates,)
            shapes["bias_hh"] = (gates,)
        if proj_size:
            shapes["weight_hr"] = (proj_size, hidden_size)
        return shapes

    def descriptor(self) -> CellDesc:
        return CellDesc(kind=self.kind(), num_gates=self.num_gates, state_size=self.state_size, step=self.step)

    def step(self, gi: Tensor, gh: Optional[Tensor], state: State, norm_c=None, carry: bool = False, weight_hr: Optional[Tensor] = None):
        """One step. Returns the output ``h_t`` and the new state tuple."""
        raise NotImplementedError


class LSTMCellType(CellType):
    name = "lstm"
    num_gates = 4
    state_size = 2
    sites = ("ih", "hh", "gates", "cell")
    has_projection = True
    kernel_kind = "lstm"

    def step(self, gi, gh, state, norm_c=None, carry=False, weight_hr=None):
        return lstm_step(gi, gh, state, norm_c, carry, weight_hr)


class GRUCellType(CellType):
    name = "gru"
    num_gates = 3
    state_size = 1
    # no "gates": the reset gate multiplies the recurrent term alone, so a joint norm of both terms is not defined
    sites = ("ih", "hh")
    kernel_kind = "gru"
    site_notes = {
        "gates": "its reset gate multiplies the recurrent term alone (n = tanh(W_in x + b_in + r * (W_hn h + b_hn))), "
        "so the sum W_ih x + W_hh h that a joint gate norm normalizes is not a term of the GRU",
        "cell": "the GRU has no cell state (its only state is h)",
    }

    def gate_groups(self, hidden_size):
        # Ba et al. (2016), eqs. 26-28: one layer norm over the (r, z) block, another over the n block.
        return (2 * hidden_size, hidden_size)

    def step(self, gi, gh, state, norm_c=None, carry=False, weight_hr=None):
        return gru_step(gi, gh, state)


_ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {"tanh": torch.tanh, "relu": torch.relu}


class RNNCellType(CellType):
    name = "rnn"
    num_gates = 1
    state_size = 1
    kernel_kind = "rnn"  # resolved per nonlinearity by kind()
    site_notes = {"cell": "the RNN has no cell state (its only state is h)"}

    def __init__(self, nonlinearity: str = "tanh") -> None:
        if not isinstance(nonlinearity, str) or nonlinearity not in _ACTIVATIONS:
            # torch.nn.RNN's wording; torch.nn.RNNCell accepts the name and fails at its first call, here both refuse it at once
            choices = " or ".join(repr(a) for a in sorted(_ACTIVATIONS, key=lambda a: a != "tanh"))
            raise ValueError(f"Unknown nonlinearity {nonlinearity!r}. Select from {choices}.")
        self.nonlinearity = nonlinearity
        self._act = _ACTIVATIONS[nonlinearity]

    def kind(self) -> Optional[str]:
        return None if self.kernel_kind is None else f"rnn_{self.nonlinearity}"

    @classmethod
    def variants(cls):
        return [{"nonlinearity": a} for a in sorted(_ACTIVATIONS, key=lambda a: a != "tanh")]

    def step(self, gi, gh, state, norm_c=None, carry=False, weight_hr=None):
        return rnn_step(self._act, gi, gh, state)


CELLS: Registry[type] = Registry("cell")
for _cls in (LSTMCellType, GRUCellType, RNNCellType):
    CELLS.register(_cls)


def register_cell(cls: type, legacy_cls: Optional[type] = None, *, replace: bool = False) -> type:
    """Register a :class:`CellType` subclass under its ``name``; returns the class, so it also decorates::

        @register_cell
        class MinimalGatedCellType(CellType):
            name = "mgu"
            ...

    The older form ``register_cell(name, cls)`` still works: it names a class that does not set its own
    ``name`` (one that inherits its parent's) after ``name``, and refuses a class whose own ``name`` differs.
    """
    if isinstance(cls, str):  # register_cell(name, cls), the form before every entry carried its name
        name, cls = cls, legacy_cls
        if isinstance(cls, type) and cls.__dict__.get("name", name) != name:
            raise ValueError(f"register_cell({name!r}, {cls.__qualname__}): the class is named "
                             f"{cls.__dict__['name']!r}; call register_cell({cls.__qualname__})")
        if isinstance(cls, type) and "name" not in cls.__dict__:
            cls.name = name
    if not (isinstance(cls, type) and issubclass(cls, CellType)):
        raise ValueError(f"a cell is a CellType subclass, got {cls!r}")
    return CELLS.register(cls, replace=replace)


def list_cells() -> List[str]:
    """Names of the registered cells."""
    return CELLS.names()


def get_cell(name: str, **options) -> CellType:
    """Build a cell type by name (``"lstm"``, ``"gru"``, ``"rnn"`` or a registered one) with its constructor
    options (``nonlinearity=`` for ``"rnn"``)."""
    return CELLS.get(name)(**options)
