"""Drop-in normalized replacements for ``torch.nn.LSTM``, ``GRU``, ``RNN`` and their cells.

The shared base class :class:`RecurrentBase` owns everything that does not depend on the cell or the
normalization: argument validation, ``batch_first``, unbatched and packed input, initial states, layers
times directions, and dropout between layers. The gate math lives in :mod:`recnorm.nn.cells`, the
normalizations in :mod:`recnorm.nn.norms`, and the time loop in :mod:`recnorm.kernels`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from recnorm import kernels
from recnorm.kernels import DirectionParams
from recnorm.nn.cells import CellType, GRUCellType, LSTMCellType, RNNCellType
from recnorm.nn.norms import create_norm, get_norm, resolve_norm_kwargs

__all__ = ["RecurrentBase", "LSTM", "GRU", "RNN", "CellBase", "LSTMCell", "GRUCell", "RNNCell"]

_SITE_ATTR = {"ih": "norm_ih", "hh": "norm_hh", "cell": "norm_c"}

_NORM_DOC = r"""
    Normalization (``norm``):

    * ``None``: torch.nn's equations exactly; a torch.nn ``state_dict`` loads as is.
    * ``"layer"`` (Ba et al. 2016): ``gi = LN(W_ih x_t) + b_ih``, ``gh = LN(W_hh h_{t-1}) + b_hh``,
      statistics per example and step over the gate features (GRU: separately over the (r, z) block
      and the n block, Ba et al. eqs. 26-28); LSTM: ``h_t = o * tanh(LN_c(c_t))`` with ``c_t`` carried
      unnormalized. Gains start at 1 (``gain_init``); the gate terms have no LN shift (the biases
      cover it), the cell LN has one. Train and eval compute the same thing.
    * ``"batch"`` (recurrent BN, Cooijmans et al. 2017): ``gi = BN_t(W_ih x_t; g_x) + b_ih``,
      ``gh = BN_t(W_hh h_{t-1}; g_h) + b_hh``; LSTM: ``h_t = o * tanh(BN_t(c_t; g_c, b_c))``, ``c_t``
      carried unnormalized. Statistics per time step over the sequences valid at that step; gains
      shared across time, starting at 0.1 (``gain_init``). In eval, step t uses the population
      statistics of step ``min(t, last tracked step)``; at most ``max_steps`` (default 1000) steps are
      tracked, later steps share the last slot. The reverse direction counts steps from each
      sequence's own end.
    * ``"sequence_batch"`` (Laurent et al. 2016; Deep Speech 2): ``gi = BN(W_ih x_t) + b_ih`` with
      statistics over all valid (t, b) positions of the batch; the recurrent term is not normalized.
    * ``"shared_batch"`` (the naive horizontal BN, an anti-pattern shipped to be measured): one BN per
      site called at every step; each call normalizes with its step's batch statistics, but gains
      (start 1), shifts and running statistics are a single set shared across time, so eval uses one
      population statistic for every step.

    Batch statistics only ever see valid positions of packed batches. A training step with fewer than
    2 valid sequences normalizes with population statistics instead of batch statistics; a feature
    that is constant across the batch normalizes to 0 and passes no gradient, which keeps long runs
    of constant input (blank image rows, zero padding) free of inf and NaN (see
    :class:`recnorm.nn.norms.RecurrentBatchNorm`).
"""


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} should be an integer >= {minimum}, got {value!r}")
    return int(value)


class RecurrentBase(nn.Module):
    """Shared machinery of :class:`LSTM`, :class:`GRU` and :class:`RNN`; not used directly."""

    def __init__(
        self,
        cell: CellType,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        norm: Optional[str] = None,
        norm_kwargs: Optional[Dict[str, Any]] = None,
        kernel: Optional[str] = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.input_size = _check_positive_int("input_size", input_size)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.num_layers = _check_positive_int("num_layers", num_layers)
        self.proj_size = _check_positive_int("proj_size", proj_size, minimum=0)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout should be a number in range [0, 1] representing the probability of an element being zeroed, got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}"
            )
        if self.proj_size >= self.hidden_size:
            raise ValueError(f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} and hidden_size={hidden_size}")
        self.cell = cell
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.norm = None if norm in (None, "none") else norm
        get_norm(self.norm)  # validates the name
        self.norm_kwargs = resolve_norm_kwargs(self.norm, norm_kwargs)
        self.kernel = kernels.resolve_kernel(kernel) if kernel is not None else None
        self._step_observer = None  # set by recnorm.diagnostics.capture

        num_directions = 2 if bidirectional else 1
        real_hidden = self.proj_size or self.hidden_size
        gate_size = cell.num_gates * self.hidden_size
        self._flat_weights_names: List[str] = []
        self._norm_names: List[Tuple[str, ...]] = []
        for layer in range(self.num_layers):
            for direction in range(num_directions):
                layer_input = self.input_size if layer == 0 else real_hidden * num_directions
                sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                params = {
                    "weight_ih": torch.empty(gate_size, layer_input, **fk),
                    "weight_hh": torch.empty(gate_size, real_hidden, **fk),
                }
                if self.bias:
                    params["bias_ih"] = torch.empty(gate_size, **fk)
                    params["bias_hh"] = torch.empty(gate_size, **fk)
                if self.proj_size > 0:
                    params["weight_hr"] = torch.empty(self.proj_size, self.hidden_size, **fk)
                for name, value in params.items():
                    setattr(self, name + sfx, nn.Parameter(value))
                    self._flat_weights_names.append(name + sfx)
                names = []
                for site in cell.sites:
                    nf = self.hidden_size if site == "cell" else gate_size
                    groups = None if site == "cell" else cell.gate_groups(self.hidden_size)
                    module = create_norm(self.norm, site, nf, groups, self.norm_kwargs, **fk)
                    name = _SITE_ATTR[site] + sfx
                    setattr(self, name, module)
                    names.append(name if module is not None else None)
                self._norm_names.append(tuple(names))
        self.reset_parameters()

    # -- torch.nn compatibility -------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H)); norms reset."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for name in self._flat_weights_names:
                getattr(self, name).uniform_(-stdv, stdv)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def flatten_parameters(self) -> None:
        """No-op, for code written for cuDNN-backed torch.nn layers."""

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        per = len(self._flat_weights_names) // (self.num_layers * (2 if self.bidirectional else 1))
        names = self._flat_weights_names
        return [[getattr(self, n) for n in names[i : i + per]] for i in range(0, len(names), per)]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.norm is not None:
            s += f", norm={self.norm!r}"
        return s

    # -- helpers ------------------------------------------------------------------------------------
    @property
    def _num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _direction_params(self, layer: int, direction: int) -> DirectionParams:
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        get = lambda n: getattr(self, n + sfx, None)  # noqa: E731
        return DirectionParams(
            weight_ih=get("weight_ih"),
            weight_hh=get("weight_hh"),
            bias_ih=get("bias_ih"),
            bias_hh=get("bias_hh"),
            weight_hr=get("weight_hr"),
            norm_ih=get("norm_ih"),
            norm_hh=get("norm_hh"),
            norm_c=get("norm_c"),
        )

    def _state_shapes(self, batch: int) -> List[Tuple[int, int, int]]:
        n = self.num_layers * self._num_directions
        shapes = [(n, batch, self.proj_size or self.hidden_size)]
        if self.cell.state_size == 2:
            shapes.append((n, batch, self.hidden_size))
        return shapes

    def _name(self) -> str:
        return type(self).__name__

    def _check_input(self, x: Tensor, what: str) -> None:
        if not x.is_floating_point():
            raise TypeError(f"{self._name()}: expected a floating point {what}, got dtype {x.dtype}")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{self._name()}: input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}")
        ref = self._flat_weights_names[0]
        w = getattr(self, ref)
        if x.dtype != w.dtype or x.device != w.device:
            raise ValueError(
                f"{self._name()}: input has dtype {x.dtype} on {x.device} but the parameters have dtype {w.dtype} on {w.device}"
            )

    def _prepare_state(self, hx, batch: int, is_batched: bool, like: Tensor, sorted_indices: Optional[Tensor]):
        shapes = self._state_shapes(batch)
        if hx is None:
            return tuple(torch.zeros(s, dtype=like.dtype, device=like.device) for s in shapes)
        if self.cell.state_size == 2:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"{self._name()}: expected hx to be a tuple (h_0, c_0), got {type(hx).__name__}")
            states = tuple(hx)
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"{self._name()}: expected hx to be a Tensor, got {type(hx).__name__}")
            states = (hx,)
        names = ("h_0", "c_0")
        out = []
        for name, s, shape in zip(names, states, shapes):
            if not isinstance(s, Tensor):
                raise TypeError(f"{self._name()}: expected {name} to be a Tensor, got {type(s).__name__}")
            want_dim = 3 if is_batched else 2
            if s.dim() != want_dim:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise ValueError(f"{self._name()}: for {kind} input, {name} should be {want_dim}-D, got a {s.dim()}-D tensor of shape {tuple(s.shape)}")
            if not is_batched:
                s = s.unsqueeze(1)
            if tuple(s.shape) != shape:
                expected = shape if is_batched else (shape[0], shape[2])
                got = tuple(s.shape) if is_batched else (s.shape[0], s.shape[2])
                raise ValueError(f"{self._name()}: expected {name} of shape {expected}, got {got}")
            if s.dtype != like.dtype or s.device != like.device:
                raise ValueError(f"{self._name()}: {name} has dtype {s.dtype} on {s.device}, expected {like.dtype} on {like.device} like the input")
            if sorted_indices is not None:
                s = s.index_select(1, sorted_indices)
            out.append(s)
        return tuple(out)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, input: Union[Tensor, PackedSequence], hx=None):
        """Run the layer. Inputs and outputs are those of the corresponding torch.nn layer."""
        if isinstance(input, PackedSequence):
            x, batch_sizes_t, sorted_indices, unsorted_indices = input
            if x.dim() != 2:
                raise ValueError(f"{self._name()}: expected PackedSequence data to be 2-D (N, input_size), got shape {tuple(x.shape)}")
            self._check_input(x, "PackedSequence")
            batch_sizes = batch_sizes_t.tolist()
            batch, seq_len, is_batched = batch_sizes[0], len(batch_sizes), True
        elif isinstance(input, Tensor):
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"{self._name()}: expected input to be 2-D (L, input_size) unbatched or 3-D batched, got {input.dim()}-D of shape {tuple(input.shape)}"
                )
            self._check_input(input, "input")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(1)
            elif self.batch_first:
                input = input.transpose(0, 1)
            seq_len, batch, _ = input.shape
            if seq_len == 0 or batch == 0:
                raise ValueError(f"{self._name()}: expected a non-empty input, got sequence length {seq_len} and batch size {batch}")
            x = input.reshape(seq_len * batch, self.input_size)  # packed rows of a full batch
            batch_sizes = [batch] * seq_len
            sorted_indices = unsorted_indices = None
        else:
            raise TypeError(f"{self._name()}: expected a Tensor or PackedSequence input, got {type(input).__name__}")

        state = self._prepare_state(hx, batch, is_batched, x, sorted_indices)
        output, finals = self._run_layers(x, batch_sizes, state)

        if isinstance(input, PackedSequence):
            out: Union[Tensor, PackedSequence] = PackedSequence(output, batch_sizes_t, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                finals = tuple(f.index_select(1, unsorted_indices) for f in finals)
        else:
            out = output.view(seq_len, batch, -1)
            if not is_batched:
                out = out.squeeze(1)
                finals = tuple(f.squeeze(1) for f in finals)
            elif self.batch_first:
                out = out.transpose(0, 1)
        return out, (finals if self.cell.state_size == 2 else finals[0])

    def _run_layers(self, x: Tensor, batch_sizes: List[int], state: Tuple[Tensor, ...]):
        D = self._num_directions
        reverse = _Reverser(batch_sizes, x.device) if D == 2 else None
        kernel = kernels.resolve_kernel(self.kernel)
        finals: List[List[Tensor]] = [[] for _ in state]
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for direction in range(D):
                idx = layer * D + direction
                inp = layer_input if direction == 0 else reverse(layer_input)
                observer = self._step_observer(self, layer, direction, batch_sizes) if self._step_observer else None
                out, fin = kernels.run_direction(
                    self.cell, inp, batch_sizes, tuple(s[idx] for s in state), self._direction_params(layer, direction), observer, kernel
                )
                outs.append(out if direction == 0 else reverse(out))
                for i, f in enumerate(fin):
                    finals[i].append(f)
            layer_input = outs[0] if D == 1 else torch.cat(outs, 1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        return layer_input, tuple(torch.stack(f, 0) for f in finals)


class _Reverser:
    """Reverses each sequence within its own length, on packed rows (an involution)."""

    def __init__(self, batch_sizes: Sequence[int], device) -> None:
        self.uniform = all(b == batch_sizes[0] for b in batch_sizes)
        self.T, self.B = len(batch_sizes), batch_sizes[0]
        if not self.uniform:
            bs = torch.tensor(batch_sizes, dtype=torch.long)
            offsets = torch.cumsum(bs, 0) - bs  # (T,) first row of each step
            b = torch.arange(self.B).unsqueeze(0)  # (1, B)
            t = torch.arange(self.T).unsqueeze(1)  # (T, 1)
            valid = b < bs.unsqueeze(1)  # (T, B)
            lengths = valid.sum(0)  # (B,)
            src = offsets[(lengths.unsqueeze(0) - 1 - t).clamp(min=0)] + b  # (T, B)
            self.index = src[valid].to(device)

    def __call__(self, x: Tensor) -> Tensor:
        if self.uniform:
            return x.view(self.T, self.B, -1).flip(0).reshape(self.T * self.B, -1)
        return x.index_select(0, self.index)


class LSTM(RecurrentBase):
    __doc__ = (
        r"""Multi-layer LSTM with optional normalization; a drop-in replacement for ``torch.nn.LSTM``.

    Arguments, inputs, outputs, shapes, gate order (i, f, g, o), parameter names and initialisation
    are those of ``torch.nn.LSTM``. With ``norm=None`` it loads a torch.nn.LSTM ``state_dict`` and
    computes the same outputs, final states and gradients.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
        device, dtype: as in ``torch.nn.LSTM``.
        norm: ``None`` or a name from :func:`recnorm.list_norms`.
        norm_kwargs: options of the normalization (see :func:`recnorm.norm_options`).
        kernel: time-loop implementation (``"auto"`` or ``"reference"``); default ``$RECNORM_KERNEL``.

    Inputs: ``input, (h_0, c_0)`` with input ``(L, N, H_in)`` (``(N, L, H_in)`` if batch_first),
    ``(L, H_in)`` unbatched, or a ``PackedSequence``; ``h_0`` ``(D*num_layers, N, H_out)`` and ``c_0``
    ``(D*num_layers, N, H_cell)``, zeros if omitted.

    Outputs: ``output, (h_n, c_n)`` with output ``(L, N, D*H_out)``.
"""
        + _NORM_DOC
        + r"""
    Example::

        >>> rnn = recnorm.LSTM(10, 20, 2, norm="batch")
        >>> output, (hn, cn) = rnn(torch.randn(5, 3, 10))
        >>> output.shape
        torch.Size([5, 3, 20])
    """
    )

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        norm: Optional[str] = None,
        norm_kwargs: Optional[Dict[str, Any]] = None,
        kernel: Optional[str] = None,
    ) -> None:
        super().__init__(
            LSTMCellType(), input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            device, dtype, norm=norm, norm_kwargs=norm_kwargs, kernel=kernel,
        )  # fmt: skip


class GRU(RecurrentBase):
    __doc__ = (
        r"""Multi-layer GRU with optional normalization; a drop-in replacement for ``torch.nn.GRU``.

    Gate order (r, z, n), parameter names, shapes and initialisation follow ``torch.nn.GRU``; with
    ``norm=None`` the outputs and gradients equal torch.nn's. ``b_hn`` stays inside the reset product:
    ``n = tanh(gi_n + r * (N_hh(W_hn h) + b_hn))``. GRU has no ``"cell"`` site.

    Args: as :class:`LSTM`, without ``proj_size`` (passing it raises ValueError).
"""
        + _NORM_DOC
    )

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        norm: Optional[str] = None,
        norm_kwargs: Optional[Dict[str, Any]] = None,
        kernel: Optional[str] = None,
        **unsupported: Any,
    ) -> None:
        _reject_unsupported("GRU", unsupported)
        super().__init__(
            GRUCellType(), input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0,
            device, dtype, norm=norm, norm_kwargs=norm_kwargs, kernel=kernel,
        )  # fmt: skip


class RNN(RecurrentBase):
    __doc__ = (
        r"""Multi-layer Elman RNN with optional normalization; a drop-in replacement for ``torch.nn.RNN``.

    ``h_t = act(N_ih(W_ih x_t) + b_ih + N_hh(W_hh h_{t-1}) + b_hh)`` with ``act`` = ``nonlinearity``
    (``"tanh"`` or ``"relu"``). Layer and batch norms normalize the two terms separately (the form
    Ba et al. and Cooijmans et al. use for LSTM), so that each has its own gain. No ``"cell"`` site.

    Args: ``input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None`` as in ``torch.nn.RNN``.
"""
        + _NORM_DOC
    )

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        norm: Optional[str] = None,
        norm_kwargs: Optional[Dict[str, Any]] = None,
        kernel: Optional[str] = None,
        **unsupported: Any,
    ) -> None:
        _reject_unsupported("RNN", unsupported)
        self.nonlinearity = nonlinearity
        super().__init__(
            RNNCellType(nonlinearity), input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0,
            device, dtype, norm=norm, norm_kwargs=norm_kwargs, kernel=kernel,
        )  # fmt: skip

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity!r}"


def _reject_unsupported(name: str, unsupported: Dict[str, Any]) -> None:
    if "proj_size" in unsupported:
        if unsupported.pop("proj_size"):
            raise ValueError(f"proj_size argument is only supported for LSTM, not {name}")
    if unsupported:
        raise TypeError(f"{name}.__init__() got unexpected keyword argument(s) {sorted(unsupported)}")


# ---------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------


class CellBase(nn.Module):
    """Shared machinery of the single-step cells; parameter names follow ``torch.nn.LSTMCell``."""

    def __init__(
        self,
        cell: CellType,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        norm: Optional[str] = None,
        norm_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.cell = cell
        self.input_size = _check_positive_int("input_size", input_size)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.bias = bool(bias)
        self.norm = None if norm in (None, "none") else norm
        get_norm(self.norm)
        self.norm_kwargs = resolve_norm_kwargs(self.norm, norm_kwargs)
        gate_size = cell.num_gates * self.hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gate_size, self.input_size, **fk))
        self.weight_hh = nn.Parameter(torch.empty(gate_size, self.hidden_size, **fk))
        if self.bias:
            self.bias_ih = nn.Parameter(torch.empty(gate_size, **fk))
            self.bias_hh = nn.Parameter(torch.empty(gate_size, **fk))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        for site in cell.sites:
            nf = self.hidden_size if site == "cell" else gate_size
            groups = None if site == "cell" else cell.gate_groups(self.hidden_size)
            setattr(self, _SITE_ATTR[site], create_norm(self.norm, site, nf, groups, self.norm_kwargs, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for p in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
                if p is not None:
                    p.uniform_(-stdv, stdv)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if self.norm is not None:
            s += f", norm={self.norm!r}"
        return s

    def _needs_step(self) -> bool:
        return any(getattr(m, "scope", None) == "step" and getattr(m, "max_steps", 1) > 1 for m in self.children())

    def forward(self, input: Tensor, hx=None, step: Optional[int] = None):
        name = type(self).__name__
        if not isinstance(input, Tensor) or input.dim() not in (1, 2):
            got = f"{input.dim()}-D" if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"{name}: expected input to be 1-D (input_size,) or 2-D (batch, input_size), got {got}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{name}: input has inconsistent input_size: got {input.shape[-1]}, expected {self.input_size}")
        if step is None:
            if self._needs_step():
                raise ValueError(f"{name}: norm {self.norm!r} keeps statistics per time step; pass step=t (an int >= 0)")
            step = 0
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"{name}: step must be an int >= 0, got {step!r}")
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        batch = x.shape[0]
        states = self._prepare_state(hx, batch, is_batched, x)
        p = DirectionParams(
            self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, None,
            getattr(self, "norm_ih", None), getattr(self, "norm_hh", None), getattr(self, "norm_c", None),
        )  # fmt: skip
        _, new = kernels.reference.run_direction(self.cell, x, [batch], states, p, step_offset=int(step))
        if not is_batched:
            new = tuple(s.squeeze(0) for s in new)
        return new if self.cell.state_size == 2 else new[0]

    def _prepare_state(self, hx, batch: int, is_batched: bool, like: Tensor) -> Tuple[Tensor, ...]:
        name = type(self).__name__
        n = self.cell.state_size
        if hx is None:
            return tuple(torch.zeros(batch, self.hidden_size, dtype=like.dtype, device=like.device) for _ in range(n))
        states = tuple(hx) if n == 2 else (hx,)
        if len(states) != n or not all(isinstance(s, Tensor) for s in states):
            raise TypeError(f"{name}: expected hx to be {'a tuple (h, c) of Tensors' if n == 2 else 'a Tensor'}")
        out = []
        for s in states:
            want = (batch, self.hidden_size) if is_batched else (self.hidden_size,)
            if tuple(s.shape) != want:
                raise ValueError(f"{name}: expected hidden state of shape {want}, got {tuple(s.shape)}")
            out.append(s if is_batched else s.unsqueeze(0))
        return tuple(out)


class LSTMCell(CellBase):
    __doc__ = (
        r"""An LSTM cell with optional normalization; a drop-in replacement for ``torch.nn.LSTMCell``.

    ``forward(input, hx=None, step=None)`` returns ``(h_1, c_1)``. Norms whose statistics are per time
    step (``"batch"``) need the step index: ``cell(x_t, (h, c), step=t)``.
"""
        + _NORM_DOC
    )

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *, norm=None, norm_kwargs=None):
        super().__init__(LSTMCellType(), input_size, hidden_size, bias, device, dtype, norm=norm, norm_kwargs=norm_kwargs)


class GRUCell(CellBase):
    __doc__ = (
        r"""A GRU cell with optional normalization; a drop-in replacement for ``torch.nn.GRUCell``.

    ``forward(input, hx=None, step=None)`` returns ``h_1``.
"""
        + _NORM_DOC
    )

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *, norm=None, norm_kwargs=None):
        super().__init__(GRUCellType(), input_size, hidden_size, bias, device, dtype, norm=norm, norm_kwargs=norm_kwargs)


class RNNCell(CellBase):
    __doc__ = (
        r"""An Elman RNN cell with optional normalization; a drop-in replacement for ``torch.nn.RNNCell``.

    ``forward(input, hx=None, step=None)`` returns ``h_1``.
"""
        + _NORM_DOC
    )

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh", device=None, dtype=None, *, norm=None, norm_kwargs=None
    ):
        self.nonlinearity = nonlinearity
        super().__init__(RNNCellType(nonlinearity), input_size, hidden_size, bias, device, dtype, norm=norm, norm_kwargs=norm_kwargs)
