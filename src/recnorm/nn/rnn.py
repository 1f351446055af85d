"""Drop-in normalized replacements for ``torch.nn.LSTM``, ``GRU``, ``RNN`` and their cells.

The shared base class :class:`RecurrentBase` owns everything that does not depend on the cell or the
normalization: argument validation, ``batch_first``, unbatched and packed input, initial states, layers
times directions, and dropout between layers. The gate math lives in :mod:`recnorm.nn.cells`, the
normalizations in :mod:`recnorm.nn.norms`, and the time loop in :mod:`recnorm.kernels`.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from recnorm import kernels
from recnorm.kernels.contract import BatchMoments, DirectionWork, fixed_size_check
from recnorm.kernels.packing import check_batch_sizes, reverse_packed
from recnorm.nn.cells import CELLS, CellType
from recnorm.nn.norms import OPTION_SITES, SequenceBatchNorm, create_norm, get_norm, resolve_norm_kwargs

__all__ = ["RecurrentBase", "LSTM", "GRU", "RNN", "CellBase", "LSTMCell", "GRUCell", "RNNCell"]

log = logging.getLogger(__name__)

_SITE_ATTR = {"ih": "norm_ih", "hh": "norm_hh", "gates": "norm_gates", "cell": "norm_c"}

_NORM_DOC = r"""
    Normalization (``norm``):

    * ``None``: torch.nn's equations exactly; a torch.nn ``state_dict`` loads as is.
    * ``"layer"`` (Ba et al. 2016): ``gi = LN(W_ih x_t) + b_ih``, ``gh = LN(W_hh h_{t-1}) + b_hh``,
      statistics per example and step over the gate features (GRU: separately over the (r, z) block
      and the n block, Ba et al. eqs. 26-28); LSTM: ``h_t = o * tanh(LN_c(c_t))`` with ``c_t`` carried
      unnormalized. Gains start at 1 (``gain_init``); the gate terms have no LN shift (the biases
      cover it), the cell LN has one. Train and eval compute the same thing.
    * ``"rms"`` (RMSNorm, Zhang and Sennrich 2019): ``"layer"`` with ``RMS(v; g) = v / sqrt(mean(v^2) +
      eps) * g`` in place of each LN: gains only (no cell shift), parameters named as ``"layer"``'s.
    * Two independent options of ``"layer"`` and ``"rms"`` (``N`` is LN or RMS), here for the LSTM:

      - ``joint=True`` (torchaudio's ``_CustomLSTM``): ``gates = N_g(W_ih x_t + W_hh h_{t-1}) + b_ih + b_hh``,
        one norm over all ``G*H`` gate features (parameter ``norm_gates_l0.weight``) instead of
        ``N_ih(W_ih x_t) + b_ih + N_hh(W_hh h_{t-1}) + b_hh``;
      - ``carry_cell=True`` (torchaudio, TF-Addons' ``LayerNormLSTMCell``, torch's ``custom_lstms.py``):
        ``c_t = N_c(f * c_{t-1} + i * g)`` is carried to the next step and ``h_t = o * tanh(c_t)``,
        instead of carrying ``c~_t = f * c_{t-1} + i * g`` and ``h_t = o * tanh(N_c(c~_t))``.

      So the four LSTM combinations are (separate, inside tanh) = Ba et al. and haste's LayerNormLSTM;
      (joint, carried) = torchaudio's; (separate, carried) and (joint, inside tanh) mix the two. The RNN
      accepts ``joint`` (``h_t = act(N_g(W_ih x_t + W_hh h_{t-1}) + b_ih + b_hh)``); the GRU has no joint
      norm (its reset gate multiplies the recurrent term alone, so ``W_ih x + W_hh h`` is no term of it),
      and neither has a cell to carry: those options raise ValueError. ``gate_groups="one"`` normalizes
      the GRU's gate terms over all ``3H`` features at once (haste's LayerNormGRU) instead of the (r, z)
      and n blocks apart.
    * ``"batch"`` (recurrent BN, Cooijmans et al. 2017): ``gi = BN_t(W_ih x_t; g_x) + b_ih``,
      ``gh = BN_t(W_hh h_{t-1}; g_h) + b_hh``; LSTM: ``h_t = o * tanh(BN_t(c_t; g_c, b_c))``, ``c_t``
      carried unnormalized. Statistics per time step over the sequences valid at that step; gains
      shared across time, starting at 0.1 (``gain_init``). In eval, step t uses the population
      statistics of step ``min(t, last tracked step)``; at most ``max_steps`` (default 1000) steps are
      tracked, later steps share the last slot. Running averages use momentum 0.3 (with weight 1/k
      for a slot's first updates). Before evaluating, call ``recnorm.calibrate(model, batches)`` with
      a few hundred training rows: it stores exact per-step statistics, which running averages of
      moving weights are not (``docs/eval_statistics.md``). The reverse direction counts steps from
      each sequence's own end.
    * ``"sequence_batch"`` (Laurent et al. 2016; Deep Speech 2): ``gi = BN(W_ih x_t) + b_ih`` with
      statistics over all valid (t, b) positions of the batch; the recurrent term is not normalized.
    * ``"shared_batch"`` (the naive horizontal BN, an anti-pattern shipped to be measured): one BN per
      site called at every step; each call normalizes with its step's batch statistics, but gains
      (start 1), shifts and running statistics are a single set shared across time, so eval uses one
      population statistic for every step.

    Batch statistics only ever see valid positions of packed batches. A training step with fewer than
    2 valid sequences normalizes with population statistics instead of batch statistics; a feature
    that is constant across the batch normalizes to 0 and passes no gradient, which keeps long runs
    of constant input (blank image rows, zero padding) free of inf and NaN, and eval treats a feature
    whose population variance is zero the same way (see :class:`recnorm.nn.norms.RecurrentBatchNorm`).

    Regularization and stacking (keyword-only):

    * ``zoneout`` (Krueger et al. 2017): a rate ``p`` zones ``h`` only (as haste does); a pair
      ``(p_h, p_c)`` zones both LSTM states. In training each unit of each state keeps its previous
      value with probability ``p``, drawn afresh per unit, step and sequence: ``s_t = d_t * s_{t-1} +
      (1 - d_t) * s~_t`` with ``d_t ~ Bernoulli(p)``; in eval ``s_t = p * s_{t-1} + (1 - p) * s~_t``. The
      zoned ``h_t`` is the output and the next step's input.
    * ``weight_dropout`` (DropConnect on ``W_hh``, AWD-LSTM's weight drop, haste's ``dropout``): in
      training every forward call draws a fresh mask and uses ``W_hh * m / (1 - p)``; eval uses ``W_hh``.
    * ``between_layers="batch"``: a :class:`recnorm.SequenceBatchNorm` of each layer's output (all its
      directions) before the next layer (parameters ``norm_between_l{k}.*``); needs ``num_layers >= 2``.
"""


def _check_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} should be a number in [0, 1], got {value!r}")
    return float(value)


def _check_zoneout(zoneout: Any, cell: CellType, name: str) -> Tuple[float, ...]:
    """The zoneout rates per state tensor: a number zones h only; a pair (h_rate, c_rate) zones both of an
    LSTM's states."""
    if isinstance(zoneout, (tuple, list)):
        if cell.state_size != 2 or len(zoneout) != 2:
            what = "an (h_rate, c_rate) pair for a cell with a cell state" if cell.state_size == 2 else "one rate for h"
            raise ValueError(
                f"{name}: zoneout should be a number (zoning h) or {what}; the {cell.name or type(cell).__name__} cell has "
                f"{cell.state_size} state tensor(s), got {zoneout!r}"
            )
        return tuple(_check_rate("zoneout", z) for z in zoneout)
    return (_check_rate("zoneout", zoneout),)


def _check_size(name: str, value: Any) -> int:
    """A size of a layer, as torch.nn.RNNBase checks it: TypeError for a non-integer (a bool too), ValueError
    for one below 1; torch's wording first, then what arrived."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {value}")
    return int(value)


def _check_cell_size(owner: str, name: str, value: Any) -> int:
    """A size of a cell: torch.nn's cells accept 0 (an empty state) and fail on a negative size when they
    create the weights, with a RuntimeError; a non-integer is a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} should be of type int, got: {type(value).__name__} ({value!r})")
    if value < 0:
        raise RuntimeError(f"{owner}: {name} should be >= 0, got {value}: a weight cannot have a negative dimension")
    return int(value)


def _check_flag(name: str, value: Any) -> bool:
    """``bias`` and ``batch_first`` of the layers: bool only, as torch.nn.RNNBase checks them."""
    if not isinstance(value, bool):
        why = f" ({value!r} is a non-empty string, which Python reads as True)" if isinstance(value, (str, bytes)) else f" ({value!r})"
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}{why}")
    return value


#: Strings that say "false": as a flag, Python would read each of them as True.
_FALSE_WORDS = frozenset({"false", "f", "no", "n", "off", "0", "none", "null"})


def _check_truth_flag(name: str, value: Any) -> bool:
    """A flag torch.nn reads by its truth value (``bidirectional``; a cell's ``bias``): the same here, so
    ``1`` or even ``"relu"`` (which torch's own module tests pass to ``RNNCell`` as ``bias`` by position) are
    True, except for a string that says false (``"False"``, ``"0"``, ``"no"``, ...), which Python would read
    as True: it is refused."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str) and value.strip().lower() in _FALSE_WORDS:
        raise TypeError(
            f"{name} should be of type bool, got: str ({value!r} would be read as True, since every non-empty string is; "
            f"pass {name}=False)"
        )
    return bool(value)


def _check_dropout(dropout: Any) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout <= 1:
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an element being zeroed, "
            f"got {dropout!r}"
        )
    return float(dropout)


def _zero_anchor(tensors: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
    """0, computed from every tensor that needs a gradient (None if none does): added to an empty result, it
    gives the result a ``grad_fn``, so ``backward`` runs (with zero gradients) on a batch of 0 sequences, as
    it does on torch.nn's layers."""
    parts = [t.reshape(-1)[:0].sum() for t in tensors if isinstance(t, Tensor) and t.requires_grad]
    return sum(parts[1:], parts[0]) if parts and torch.is_grad_enabled() else None


def _anchored(t: Tensor, anchor: Optional[Tensor]) -> Tensor:
    return t if anchor is None else t + anchor.to(t.dtype)


class _NormSetup:
    """What the layers and the cells share: resolving the scheme, and building its module at every site
    the cell offers, under torch.nn-style names (``norm_ih_l0``, ``norm_c_l1_reverse``, ...)."""

    def _setup_norm(self, norm: Optional[str], norm_kwargs: Optional[Dict[str, Any]]) -> None:
        self.norm = None if norm in (None, "none") else norm
        get_norm(self.norm)  # validates the name
        self.norm_kwargs = resolve_norm_kwargs(self.norm, norm_kwargs)

    def _build_norms(self, suffix: str, fk: Dict[str, Any]) -> Dict[str, str]:
        """Create the scheme's module at each site; returns ``{site: attribute name}`` of those that exist."""
        cell: CellType = self.cell
        for option, site in OPTION_SITES.items():
            if self.norm_kwargs.get(option) and site not in cell.sites:
                why = cell.site_notes.get(site, f"it has no {site!r} site")
                raise ValueError(
                    f"norm_kwargs {option}=True (norm {self.norm!r}) is not defined for the {cell.name or type(cell).__name__} "
                    f"cell: {why}"
                )
        gate_size = cell.num_gates * self.hidden_size
        names = {}
        for site in SITES_IN_ORDER:
            if site not in cell.sites:
                continue
            nf = self.hidden_size if site == "cell" else gate_size
            groups = None if site == "cell" else cell.gate_groups(self.hidden_size)
            # A site of no features (a cell of hidden_size=0, which torch.nn allows) has nothing to normalize, and
            # statistics over no features are undefined: it is left alone (its tensors are empty).
            module = create_norm(self.norm, site, nf, groups, self.norm_kwargs, **fk) if nf else None
            name = _SITE_ATTR[site] + suffix
            setattr(self, name, module)  # None where the scheme leaves the site alone, as torch.nn does for absent biases
            if module is not None:
                if not hasattr(module, "descriptor"):
                    raise TypeError(f"norm {self.norm!r} built a {type(module).__name__} for site {site!r}, which has no descriptor()")
                names[site] = name
        if "gates" in names and ("ih" in names or "hh" in names):
            raise ValueError(f"norm {self.norm!r} puts a joint 'gates' norm and a separate 'ih'/'hh' norm on one cell")
        return names

    def _norms(self, names: Dict[str, str]) -> Dict[str, nn.Module]:
        return {site: getattr(self, name) for site, name in names.items()}


SITES_IN_ORDER = ("ih", "hh", "gates", "cell")
#: What ``between_layers=`` accepts: None, or "batch" (a :class:`~recnorm.nn.norms.SequenceBatchNorm` of each
#: layer's output before the next layer).
BETWEEN_LAYERS = (None, "batch")


class RecurrentBase(_NormSetup, nn.Module):
    """One multi-layer recurrent layer for every registered cell; :class:`LSTM`, :class:`GRU` and
    :class:`RNN` are this class with their cell.

    It owns everything that does not depend on the cell or the normalization: argument validation,
    ``batch_first``, unbatched and packed input, initial states, layers times directions, and dropout
    between layers. The cell (``cell``: a :class:`~recnorm.nn.cells.CellType` or a name from
    :data:`~recnorm.nn.cells.CELLS`) gives the weight shapes and the step math; the norm registry gives
    the module at each site; :mod:`recnorm.kernels` runs each direction from their descriptors.

    It is not a subclass of ``torch.nn.RNNBase`` (so ``isinstance(m, nn.LSTM)`` is False). ``nn.RNNBase``
    computes torch's fixed equations: its forward hands ``_flat_weights`` to the ``_VF.lstm``/``gru``/``rnn_*``
    operators and branches on a ``mode`` string, and code that tests ``isinstance(m, nn.LSTM)`` (torch.ao's
    FX quantization and numeric suite, for example) would take a normalized layer for torch's and use its
    weights without its norm. The layer keeps torch's surface instead: arguments, checks and their
    exceptions, parameter names, ``_flat_weights_names``/``_flat_weights``, ``all_weights`` and
    ``flatten_parameters``.
    """

    # Defaults for modules pickled before these options existed (torch.save(model) of an older recnorm).
    zoneout: Any = 0.0
    _zoneout_rates: Tuple[float, ...] = (0.0,)
    weight_dropout: float = 0.0
    between_layers: Optional[str] = None

    def __init__(
        self,
        cell: Union[str, CellType],
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
        zoneout: Union[float, Tuple[float, float]] = 0.0,
        weight_dropout: float = 0.0,
        between_layers: Optional[str] = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.cell = CELLS.get(cell)() if isinstance(cell, str) else cell
        # torch.nn.RNNBase's checks, in its order, with its exception types and wording
        self.dropout = _check_dropout(dropout)
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=3,
            )
        self.bias = _check_flag("bias", bias)
        self.batch_first = _check_flag("batch_first", batch_first)
        self.bidirectional = _check_truth_flag("bidirectional", bidirectional)
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.num_layers = _check_size("num_layers", num_layers)
        if isinstance(proj_size, bool) or not isinstance(proj_size, numbers.Integral):
            raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__} ({proj_size!r})")
        if proj_size < 0:
            raise ValueError(f"proj_size should be a positive integer or zero to disable projections, got {proj_size}")
        if proj_size and not self.cell.has_projection:
            raise ValueError(f"proj_size argument is only supported for LSTM, not RNN or GRU (the {self.cell.name or type(self.cell).__name__} cell has no projection)")
        if proj_size >= self.hidden_size:
            raise ValueError(f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} and hidden_size={hidden_size}")
        self.proj_size = int(proj_size)
        self.zoneout = zoneout
        self._zoneout_rates = _check_zoneout(zoneout, self.cell, type(self).__name__)
        self.weight_dropout = _check_rate("weight_dropout", weight_dropout)
        self._setup_norm(norm, norm_kwargs)
        self.kernel = kernels.resolve_kernel(kernel) if kernel is not None else None
        self._step_observer = None  # set by recnorm.diagnostics.capture

        num_directions = 2 if bidirectional else 1
        real_hidden = self.proj_size or self.hidden_size
        self._flat_weights_names: List[str] = []
        self._norm_sites: List[Dict[str, str]] = []  # per (layer, direction): site -> attribute name
        for layer in range(self.num_layers):
            for direction in range(num_directions):
                layer_input = self.input_size if layer == 0 else real_hidden * num_directions
                sfx = _suffix(layer, direction)
                for name, shape in self.cell.weight_shapes(layer_input, self.hidden_size, self.proj_size, self.bias).items():
                    setattr(self, name + sfx, nn.Parameter(torch.empty(shape, **fk)))
                    self._flat_weights_names.append(name + sfx)
                self._norm_sites.append(self._build_norms(sfx, fk))
        if between_layers not in BETWEEN_LAYERS:
            raise ValueError(f"{type(self).__name__}: between_layers should be one of {BETWEEN_LAYERS}, got {between_layers!r}")
        self.between_layers = between_layers
        if between_layers is not None:
            if self.num_layers < 2:
                raise ValueError(
                    f"{type(self).__name__}: between_layers={between_layers!r} normalizes the output of each layer before the "
                    f"next one, so it needs num_layers >= 2, got num_layers={self.num_layers}"
                )
            for layer in range(self.num_layers - 1):  # masked batch norm of each layer's output (all its directions)
                setattr(self, f"norm_between_l{layer}", SequenceBatchNorm(real_hidden * num_directions, **fk))
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
    def _flat_weights(self) -> List[Optional[Tensor]]:
        """torch.nn.RNNBase's list of the layer's weights, in the order of ``_flat_weights_names``, for torch
        utilities and tests that read it. Read afresh at every access, so it always holds what the layer
        computes with: after ``.to()``/``.double()``, ``load_state_dict``, ``weight_norm`` or a
        parametrization (whose computed weight ``getattr`` returns)."""
        params = self._parameters  # a parameter where it is one; else what getattr finds (a parametrization, weight_norm)
        return [params[name] if name in params else getattr(self, name, None) for name in self._flat_weights_names]

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
        if any(self._zoneout_rates):
            s += f", zoneout={self.zoneout!r}"
        if self.weight_dropout:
            s += f", weight_dropout={self.weight_dropout}"
        if self.between_layers is not None:
            s += f", between_layers={self.between_layers!r}"
        return s

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script cannot compile recnorm.{type(self).__name__}: its forward dispatches among Python "
            "time loops and registered C++ operators that TorchScript's compiler cannot read. Use "
            "torch.jit.trace (the traced model follows the input's length and batch size), torch.export.export "
            "or torch.onnx.export(..., dynamo=True) with dynamic shapes, or torch.compile instead."
        )

    # -- helpers ------------------------------------------------------------------------------------
    @property
    def _num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def direction_work(self, layer: int, direction: int, on_output=None, x: Optional[Tensor] = None) -> DirectionWork:
        """The data one direction of one layer computes with (see :mod:`recnorm.kernels.contract`).

        In training, ``weight_dropout`` draws a fresh DropConnect mask on ``W_hh`` at every call, and
        ``zoneout`` draws fresh keep indicators for the rows of ``x`` (the direction's input, ``(T, B, F)`` or
        packed ``(N, F)``), which it then needs; in eval, zoneout is its rates.
        """
        sfx = _suffix(layer, direction)
        get = lambda n: getattr(self, n + sfx, None)  # noqa: E731
        norms = self._norms(self._norm_sites[layer * self._num_directions + direction])
        weight_hh = get("weight_hh")
        if self.weight_dropout and self.training:
            weight_hh = F.dropout(weight_hh, self.weight_dropout, True)  # DropConnect (AWD-LSTM's weight drop)
        return DirectionWork(
            cell=self.cell.descriptor(),
            weight_ih=get("weight_ih"),
            weight_hh=weight_hh,
            bias_ih=get("bias_ih"),
            bias_hh=get("bias_hh"),
            weight_hr=get("weight_hr") if self.proj_size else None,  # registered with proj_size only, as torch.nn does
            norms={site: m.descriptor() for site, m in norms.items()},
            carry_cell_norm=_carries(norms),
            on_output=on_output,
            zoneout=self._zoneout_data(x),
        )

    def _zoneout_data(self, x: Optional[Tensor]) -> Tuple[Any, ...]:
        """Per state tensor: None, the rate (eval), or 0/1 keep indicators drawn with torch's RNG (training)."""
        rates = self._zoneout_rates
        if not any(rates):
            return ()
        if not self.training:
            return tuple(r or None for r in rates)
        if x is None:
            raise ValueError(f"{self._name()}: zoneout in training draws its masks for the rows of the input; pass x=")
        widths = (self.proj_size or self.hidden_size, self.hidden_size)
        # bool indicators: a byte per unit (kept for backward by the fused kernels), drawn with torch's RNG
        return tuple(
            torch.empty(tuple(x.shape[:-1]) + (w,), dtype=torch.bool, device=x.device).bernoulli_(r) if r else None
            for r, w in zip(rates, widths)
        )

    def _record(self, layer: int, direction: int, moments: Dict[str, BatchMoments]) -> None:
        if moments:
            norms = self._norms(self._norm_sites[layer * self._num_directions + direction])
            for site, m in moments.items():
                norms[site].record(m)

    def _state_shapes(self, batch: int) -> List[Tuple[int, int, int]]:
        n = self.num_layers * self._num_directions
        shapes = [(n, batch, self.proj_size or self.hidden_size)]
        if self.cell.state_size == 2:
            shapes.append((n, batch, self.hidden_size))
        return shapes

    def _name(self) -> str:
        return type(self).__name__

    def _check_input(self, x: Tensor, packed: bool) -> None:
        """torch.nn.RNNBase.check_input: the dtype (ValueError), a packed batch's data 2-D and the feature size
        (RuntimeError), in torch's order and wording; and the device (RuntimeError, as torch's kernels say)."""
        name = self._name()
        w = getattr(self, self._flat_weights_names[0])
        if not x.is_floating_point() or (x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type)):
            raise ValueError(
                f"{name}: RNN input dtype ({x.dtype}) does not match weight dtype ({w.dtype}). Convert input: "
                f"input.to({w.dtype}), or convert model: model.to({x.dtype})"
            )
        if packed and x.dim() != 2:
            raise RuntimeError(
                f"{name}: input must have 2 dimensions, got {x.dim()} (the data of a PackedSequence is (N, input_size), "
                f"got shape {tuple(x.shape)})"
            )
        if fixed_size_check(lambda: x.shape[-1] != self.input_size):
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}")
        if x.device != w.device:
            raise RuntimeError(
                f"{name}: Input and parameter tensors are not at the same device, found input tensor at {x.device} and "
                f"parameter tensor at {w.device}"
            )

    def _prepare_state(self, hx, batch: int, is_batched: bool, like: Tensor, sorted_indices: Optional[Tensor], packed: bool = False):
        """The initial states ``(D*num_layers, B, H)`` each, in the input's dtype and in sorted order. The checks
        are torch.nn's (RuntimeError, its wording): the states' number of dimensions (not for packed input,
        where torch checks the shape only), then each shape, then dtype and device."""
        name = self._name()
        shapes = self._state_shapes(batch)
        n = self.cell.state_size
        if hx is None:
            return tuple(torch.zeros(s, dtype=like.dtype, device=like.device) for s in shapes)
        if n > 1:
            if not isinstance(hx, (tuple, list)):
                raise TypeError(f"{name}: expected hx to be a tuple (h_0, c_0), got {type(hx).__name__}")
            if len(hx) != n:
                raise RuntimeError(f"{name}: {self.cell.name or 'the cell'} expects {n} hidden states, got a {type(hx).__name__} of {len(hx)}")
            states = tuple(hx)
        else:
            states = (hx,)
        labels = ("h_0", "c_0") if n == 2 else tuple(f"hx[{i}]" for i in range(n)) if n > 1 else ("h_0",)
        for label, s in zip(labels, states):
            if not isinstance(s, Tensor):
                raise TypeError(f"{name}: expected {label} to be a Tensor, got {type(s).__name__}")
        if not packed:
            want = 3 if is_batched else 2
            dims = [s.dim() for s in states]
            if any(d != want for d in dims):
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                if n == 2:
                    msg = f"For {kind} input, hx and cx should also be {want}-D but got ({dims[0]}-D, {dims[1]}-D) tensors"
                else:
                    msg = f"For {kind} input, hx should also be {want}-D but got {dims[0]}-D tensor" if n == 1 else (
                        f"For {kind} input, every hidden state should also be {want}-D but got {dims}")
                raise RuntimeError(f"{name}: {msg}")
            if not is_batched:
                states = tuple(s.unsqueeze(1) for s in states)
        out = []
        for i, (label, s, shape) in enumerate(zip(labels, states, shapes)):
            if tuple(s.shape) != shape:
                what = "hidden_size" if i > 0 or not self.proj_size else "proj_size"
                raise RuntimeError(
                    f"{name}: Expected hidden{f'[{i}]' if n > 1 else ''} size {shape}, got {list(s.shape)} ({label} is "
                    f"(num_layers * num_directions, batch, {what})" + ("; an unbatched input's is 2-D, without batch" if not is_batched else "") + ")"
                )
            if s.device != like.device:
                raise RuntimeError(
                    f"{name}: Input and hidden tensors are not at the same device, found input tensor at {like.device} and "
                    f"hidden tensor at {s.device} ({label})"
                )
            if s.dtype != like.dtype and not torch.is_autocast_enabled(like.device.type):
                raise RuntimeError(
                    f"{name}: Input and hidden tensors are not the same dtype, found input tensor with {like.dtype} and "
                    f"hidden tensor with {s.dtype} ({label})"
                )
            if sorted_indices is not None:
                s = s.index_select(1, sorted_indices)
            out.append(s.to(like.dtype))
        return tuple(out)

    def _check_packed(self, x: Tensor, batch_sizes: Tensor, sorted_indices, unsorted_indices) -> int:
        """Validate a (possibly hand-built) PackedSequence once, whatever kernel runs it; returns B. (torch.nn
        trusts its batch sizes and indices; a malformed one is a ValueError here.)"""
        name = f"{self._name()}: PackedSequence"
        if torch.compiler.is_compiling():
            return int(sorted_indices.shape[0]) if sorted_indices is not None else int(batch_sizes[0])
        sizes = check_batch_sizes(batch_sizes, x.shape[0], name)
        batch = sizes[0]
        for what, idx in (("sorted_indices", sorted_indices), ("unsorted_indices", unsorted_indices)):
            if idx is None:
                continue
            if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.dtype != torch.int64 or idx.numel() != batch:
                got = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
                raise ValueError(f"{name}: expected {what} to be a 1-D int64 tensor of {batch} indices, got a {got}")
            if not torch.equal(torch.sort(idx.cpu()).values, torch.arange(batch)):
                raise ValueError(f"{name}: {what} must be a permutation of 0..{batch - 1}, got {idx.tolist()}")
        if (sorted_indices is None) != (unsorted_indices is None):
            raise ValueError(f"{name}: give both sorted_indices and unsorted_indices, or neither")
        return batch

    def _check_population_statistics(self, warn: bool = False) -> None:
        """Each step's count of tracked batches must stay an integer tensor: a helper that casts every buffer
        (not ``module.to(dtype)``, which casts floating-point tensors only) makes it a float, which the fused
        kernels cannot read. Named here, before any kernel, rather than as a kernel's shape error.

        With ``warn`` (a call in eval mode), the same walk over the modules also gives, once per process, the
        warning that batch norm evaluates with running averages that training moved since the last
        calibration. The attributes are read with :func:`_module_attr`: through ``getattr``, each absent one
        raised an AttributeError inside ``nn.Module.__getattr__``, 8 per eval call of a layer-norm LSTM (with the
        walk done once, 13-28 us of a one-step eval call of 300-400 us)."""
        look = warn and not _WARNED_UNCALIBRATED
        lagging = False
        for mod_name, module in self.named_modules():
            if look and not lagging and _module_attr(module, "_updated_since_calibration", False) and not module.training:
                lagging = True
            count = _module_attr(module, "num_batches_tracked")
            if isinstance(count, Tensor) and (count.is_floating_point() or count.is_complex() or count.dtype == torch.bool):
                where = f"{mod_name}.num_batches_tracked" if mod_name else "num_batches_tracked"
                raise RuntimeError(
                    f"{self._name()}: {where} has dtype {count.dtype}, but it counts the batches each step's statistics "
                    "have seen and must be an integer tensor (torch.long, as torch.nn.BatchNorm's is). Something cast "
                    "every buffer: cast floating-point tensors only (module.to(dtype) does), or restore it with "
                    f"module.{where} = module.{where}.long()"
                )
        if lagging:
            _warn_uncalibrated()

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, input: Union[Tensor, PackedSequence], hx=None):
        """Run the layer. Inputs and outputs are those of the corresponding torch.nn layer."""
        if type(input) is Tensor and (self._plain() or self._lean_in_eval()):
            lean = self._lean_forward(input, hx)
            if lean is not None:
                return lean
        if isinstance(input, PackedSequence):
            x, batch_sizes, sorted_indices, unsorted_indices = input
            if torch.jit.is_tracing():
                raise RuntimeError(_PACKED_TRACE_ERROR.format(self._name()))
            self._check_input(x, packed=True)
            batch = self._check_packed(x, batch_sizes, sorted_indices, unsorted_indices)
            is_batched = True
        elif isinstance(input, Tensor):
            if input.dim() not in (2, 3):
                tensor = " tensor" if isinstance(self, RNN) else ""  # torch.nn.RNN's wording has it, LSTM's and GRU's not
                raise ValueError(
                    f"{self._name()}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead (unbatched (L, input_size), "
                    f"or batched (L, N, input_size), (N, L, input_size) with batch_first; got shape {tuple(input.shape)})"
                )
            self._check_input(input, packed=False)
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(1)
            elif self.batch_first:
                input = input.transpose(0, 1)
            seq_len, batch, _ = input.shape
            if not torch.jit.is_tracing():  # a trace follows the input's sizes: no branch on them
                if seq_len == 0:
                    raise RuntimeError(
                        f"{self._name()}: Expected sequence length to be larger than 0 in RNN, got an input of "
                        f"{seq_len} steps and {batch} sequences"
                    )
                if batch == 0:
                    return self._empty_result(input, hx, is_batched)
            x = input  # (T, B, F): a full batch
            batch_sizes = sorted_indices = unsorted_indices = None
        elif torch.jit.is_tracing() and isinstance(input, tuple) and len(input) == 4:  # what trace makes of a PackedSequence
            raise RuntimeError(_PACKED_TRACE_ERROR.format(self._name()))
        else:
            raise TypeError(f"{self._name()}: expected a Tensor or PackedSequence input, got {type(input).__name__}")

        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            self._check_population_statistics(warn=not self.training)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        state = self._prepare_state(hx, batch, is_batched, x, sorted_indices, packed=batch_sizes is not None)
        x = x.to(dtype)
        state = tuple(s.to(dtype) for s in state)
        output, finals = self._run_layers(x, batch_sizes, state)

        if isinstance(input, PackedSequence):
            out: Union[Tensor, PackedSequence] = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                finals = tuple(f.index_select(1, unsorted_indices) for f in finals)
        else:
            out = output
            if not is_batched:
                out = out.squeeze(1)
                finals = tuple(f.squeeze(1) for f in finals)
            elif self.batch_first:
                out = out.transpose(0, 1)
        return out, (finals if self.cell.state_size == 2 else finals[0])

    def _plain(self) -> bool:
        """A layer whose every call in eager mode may end in torch's op with nothing around it: no norm or
        other submodule, one direction, no zoneout, per-step observer, or dropout (between layers or on the
        weights) in training."""
        return (self.norm is None and not self._modules and not self.bidirectional and self._step_observer is None
                and not any(self._zoneout_rates)
                and not (self.training and (self.weight_dropout or (self.dropout and self.num_layers > 1))))

    def _lean_in_eval(self) -> bool:
        """A normalized layer whose eval call without autograd may take the lean path: one direction, no
        zoneout, observer or batch norm between layers, in eval mode with gradients off. Its norms decide
        where it runs: a sequence-wise BN of the input term alone folds into ``W_ih`` and leaves torch's op
        or the fused kernel to the rule (:meth:`_native_serves`); any other norm runs on the fused kernel
        where it serves the layer (:func:`recnorm.kernels.fused.supports`)."""
        return (self.norm is not None and not self.training and not torch.is_grad_enabled() and not self.bidirectional
                and self._step_observer is None and not any(self._zoneout_rates) and self.between_layers is None)

    def _native_serves(self) -> bool:
        """Whether torch's op can serve this layer's every direction as far as its norms go: none, or a
        sequence-wise BN of the input term alone (folded into ``W_ih``; whether it folds in this call, on
        population statistics, is for :func:`recnorm.kernels.native.folded_stack` to say). A cheap look at
        the layer's structure."""
        return self.norm is None or all(set(sites) == {"ih"} and getattr(getattr(self, sites["ih"]), "stat", None) == "sequence"
                                        for sites in self._norm_sites)

    def _lean_forward(self, input: Tensor, hx):
        """The forward of a :meth:`_plain` layer, or of a :meth:`_lean_in_eval` one, on a batched tensor where
        :func:`recnorm.kernels.plain_stack_runs` says that every layer runs one implementation, with what the
        full path computes and checks around it and nothing else:

        * torch's op: that op, layer after layer (for a normalized layer, on the input weights with the
          sequence-wise norm folded in, as :func:`recnorm.kernels.native.run_direction` folds it), so that
          the call costs about what torch.nn's does;
        * the fused kernel (any norm it serves, in eval): :meth:`_lean_fused`, without the full path's second
          look at the input and the states, its dispatch and its per-layer bookkeeping (0.6-0.9 ms of Python
          around a 5 ms eval call at (28, 128, 28, 128) once the kernel has emptied the caches, against
          torch.nn's 0.2 ms).

        None where that is not so, or where the input needs one of the full path's answers (another mode or
        dtype, an error, an empty batch, a norm that does not fold, the fused kernel under autocast): the full
        path then runs. Its results are the full path's, bit for bit (tests/nn/test_lean.py)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None  # before any look at the sizes: a trace or a graph must not record one
        if input.dim() != 3:
            return None
        kernel = kernels.resolve_kernel(self.kernel)
        low = None  # under CPU autocast: the 16-bit dtype each layer's input and output are rounded to
        if torch.is_autocast_enabled(input.device.type):
            low = torch.get_autocast_dtype(input.device.type)
            if input.device.type != "cpu" or low not in (torch.bfloat16, torch.float16) or kernel != "auto":
                return None  # the full path's kernels._run_upcast serves "auto" on CPU only
        x = input.transpose(0, 1) if self.batch_first else input
        weights = self._flat_weights
        w = weights[0]
        same_dtype = x.dtype == w.dtype if low is None else w.dtype == torch.float32
        if not (same_dtype and x.is_floating_point() and x.device == w.device and x.shape[0] > 0 and x.shape[1] > 0
                and x.shape[2] == self.input_size):
            return None
        state = self._prepare_state(hx, x.shape[1], True, x, None)
        grad = kernels.native.grad_needed(x, weights, state)
        if low is not None and grad:
            return None  # the 16-bit casts under autograd: the full path
        L, out_width = self.num_layers, self.proj_size or self.hidden_size
        kind = self.cell.kind()
        native_serves = self._native_serves()
        runs = kernels.plain_stack_runs(kind, x if low is None else x.float(), [self.input_size] + [out_width] * (L - 1),
                                        self.hidden_size, bool(self.proj_size), grad, kernel, native_serves)
        if runs is None or (runs == "fused" and low is not None):
            return None  # under autocast, the fused kernel's float32 upcast is the full path's (kernels._run_upcast)
        if self.norm is not None:
            self._check_population_statistics(warn=True)  # the full path's checks, in its order (the input's came first)
        ran = self._lean_fused(x, state) if runs == "fused" else self._lean_native(kind, x, state, weights, low)
        if ran is None:
            return None
        out, ends = ran
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, (ends if self.cell.state_size == 2 else ends[0])

    def _lean_native(self, kind: str, x: Tensor, state: Tuple[Tensor, ...], weights: List[Tensor],
                     low: Optional[torch.dtype]) -> Optional[Tuple[Tensor, Tuple[Tensor, ...]]]:
        """The layers of a lean call on torch's op (``weights``: the layer's ``_flat_weights``; ``low``: the
        16-bit dtype under CPU autocast, or None): ``(out, final states)``, or None where a norm does not fold
        (:func:`recnorm.kernels.native.folded_stack`)."""
        L, has_bias = self.num_layers, self.bias
        if self.norm is not None:  # eval without autograd: fold each layer's sequence-wise norm into W_ih
            with torch.autocast(x.device.type, enabled=False):  # as kernels._run_upcast folds it: in float32
                folded = kernels.native.folded_stack([self.direction_work(layer, 0) for layer in range(L)], x)
            if folded is None:
                return None
            weights, has_bias = folded
        if low is None:
            return kernels.native.run_plain_stack(kind, x, state, weights, L, has_bias)
        if self.norm is None and kernels.native_bf16(kind, low, bool(self.proj_size), packed=False):
            # torch's op in bfloat16 with autocast on, as the full path runs each layer (kernels._run_upcast)
            return kernels.native.run_plain_stack(kind, x.to(low), tuple(s.to(low) for s in state), weights, L, has_bias)
        return self._lean_upcast(kind, x, state, weights, has_bias, low)

    def _lean_fused(self, x: Tensor, state: Tuple[Tensor, ...]) -> Optional[Tuple[Tensor, Tuple[Tensor, ...]]]:
        """The layers of a lean call on the fused kernel, each as the full path runs it
        (:func:`recnorm.kernels.fused.run_direction` on the layer's :meth:`direction_work`), without the full
        path's dispatch: ``(out, final states)``. None, before anything runs, where the fused kernel declines
        a layer (:func:`recnorm.kernels.fused.supports`), or where a layer's norm would take batch statistics
        (what the full path records into the running averages): the full path then runs, and falls through
        as :func:`recnorm.kernels.choose` does."""
        works = [self.direction_work(layer, 0) for layer in range(self.num_layers)]
        for work in works:
            if any(d.batch_stats for d in work.present_norms().values()):
                return None
            if kernels.fused.supports(work, x, None, "eager") is not None:
                return None
        finals: List[List[Tensor]] = [[] for _ in state]
        h = x
        for layer, work in enumerate(works):
            res = kernels.fused.run_direction(work, h, None, tuple(s[layer] for s in state))
            h = res.output
            for i, f in enumerate(res.state):
                finals[i].append(f)
        return h, _stacked(finals)

    def _lean_upcast(self, kind: str, x: Tensor, state, weights: List[Tensor], has_bias: bool, low: torch.dtype):
        """The layers under CPU autocast as the full path runs them (:func:`recnorm.kernels._run_upcast`): each
        layer's input and initial state rounded to ``low`` and run in float32 by torch's op with autocast off,
        its output and final states rounded to ``low``."""
        L = self.num_layers
        per = len(weights) // L
        h, state = x.to(low), tuple(s.to(low) for s in state)
        finals = []
        with torch.autocast(x.device.type, enabled=False):
            for layer in range(L):
                out, ends = kernels.native.run_plain_stack(kind, h.float(), [s[layer : layer + 1].float() for s in state],
                                                           weights[layer * per : (layer + 1) * per], 1, has_bias)
                h = out.to(low)
                finals.append([e.to(low) for e in ends])
        ends = tuple(finals[0]) if L == 1 else tuple(torch.cat([f[i] for f in finals]) for i in range(len(state)))
        return h, ends

    def _empty_result(self, input: Tensor, hx, is_batched: bool):
        """torch.nn's answer for a batch of 0 sequences: empty outputs and states of the right shapes, which
        autograd connects to the input, the initial states and the parameters (gradients of zeros)."""
        state = self._prepare_state(hx, 0, is_batched, input, None)
        anchor = _zero_anchor([input, *state, *self.parameters()])
        out = _anchored(input.new_zeros(input.shape[0], 0, (self.proj_size or self.hidden_size) * self._num_directions), anchor)
        state = tuple(_anchored(s, anchor) for s in state)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, (state if self.cell.state_size == 2 else state[0])

    def _run_layers(self, x: Tensor, batch_sizes: Optional[Tensor], state: Tuple[Tensor, ...]):
        D = self._num_directions
        kernel = kernels.resolve_kernel(self.kernel)
        finals: List[List[Tensor]] = [[] for _ in state]
        layer_input = x
        first = None
        for layer in range(self.num_layers):
            outs = []
            for direction in range(D):
                idx = layer * D + direction
                inp = layer_input if direction == 0 else reverse_packed(layer_input, batch_sizes)
                observer = self._step_observer(self, layer, direction, batch_sizes) if self._step_observer else None
                work = self.direction_work(layer, direction, observer, inp)
                if idx == 0 and self.num_layers > 1:  # a trained stack runs on one implementation (kernels.stack_preference)
                    widths = [x.shape[-1]] + [D * (self.proj_size or self.hidden_size)] * (self.num_layers - 1)
                    first = kernels.stack_preference(work, inp, batch_sizes, tuple(s[0] for s in state), kernel, widths)
                res = kernels.run_direction(work, inp, batch_sizes, tuple(s[idx] for s in state), kernel, first)
                self._record(layer, direction, res.moments)
                outs.append(res.output if direction == 0 else reverse_packed(res.output, batch_sizes))
                for i, f in enumerate(res.state):
                    finals[i].append(f)
            layer_input = outs[0] if D == 1 else torch.cat(outs, -1)
            if self.between_layers is not None and layer < self.num_layers - 1:
                bn = getattr(self, f"norm_between_l{layer}")
                layer_input = bn.normalize_rows(layer_input.reshape(-1, layer_input.shape[-1])).view_as(layer_input)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        return layer_input, _stacked(finals)


def _stacked(finals: List[List[Tensor]]) -> Tuple[Tensor, ...]:
    """Each state's finals of every layer and direction ``(B, H')``, stacked ``(D*num_layers, B, H')``; for one
    layer and direction a view, not stack's copy (torch.nn returns its op's states as they are)."""
    return tuple(f[0].unsqueeze(0) if len(f) == 1 else torch.stack(f, 0) for f in finals)


_WARNED_UNCALIBRATED = False


def _warn_uncalibrated() -> None:
    """Once per process: evaluating on running averages that training moved since the last calibration
    (found by :meth:`RecurrentBase._check_population_statistics`)."""
    global _WARNED_UNCALIBRATED
    if _WARNED_UNCALIBRATED:
        return
    _WARNED_UNCALIBRATED = True
    log.warning(
        "recnorm: evaluating batch norm with running averages that lag the weights; call "
        "recnorm.calibrate(model, batches) after training for exact statistics (see docs/eval_statistics.md)"
    )


def _carries(norms: Dict[str, nn.Module]) -> bool:
    """Whether the cell norm (if any) carries its output to the next step (its ``carry``, False without one)."""
    cell = norms.get("cell")
    return cell is not None and bool(_module_attr(cell, "carry", False))


def _module_attr(module: nn.Module, name: str, default: Any = None) -> Any:
    """``getattr(module, name, default)``, in the same order of lookup (the class's attributes, the instance's,
    then its parameters, buffers and submodules), without the AttributeError that ``nn.Module.__getattr__``
    raises for an absent name (about 1.5 us each)."""
    if hasattr(type(module), name):
        return getattr(module, name, default)
    d = module.__dict__
    if name in d:
        return d[name]
    for store in ("_parameters", "_buffers", "_modules"):
        found = d.get(store)
        if found is not None and name in found:
            return found[name]
    return default


_PACKED_TRACE_ERROR = (
    "{}: torch.jit.trace of a PackedSequence input would bake its batch sizes into the trace. Trace with a "
    "padded tensor instead, or use torch.compile (which follows packed batches of any length)."
)


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction == 1 else "")


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
        zoneout: Union[float, Tuple[float, float]] = 0.0,
        weight_dropout: float = 0.0,
        between_layers: Optional[str] = None,
    ) -> None:
        super().__init__(
            "lstm", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            device, dtype, norm=norm, norm_kwargs=norm_kwargs, kernel=kernel, zoneout=zoneout,
            weight_dropout=weight_dropout, between_layers=between_layers,
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
        zoneout: float = 0.0,
        weight_dropout: float = 0.0,
        between_layers: Optional[str] = None,
        **unsupported: Any,
    ) -> None:
        _reject_unsupported("GRU", unsupported)
        super().__init__(
            "gru", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0,
            device, dtype, norm=norm, norm_kwargs=norm_kwargs, kernel=kernel, zoneout=zoneout,
            weight_dropout=weight_dropout, between_layers=between_layers,
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
        zoneout: float = 0.0,
        weight_dropout: float = 0.0,
        between_layers: Optional[str] = None,
        **unsupported: Any,
    ) -> None:
        _reject_unsupported("RNN", unsupported)
        self.nonlinearity = nonlinearity
        super().__init__(
            CELLS.get("rnn")(nonlinearity), input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0,
            device, dtype, norm=norm, norm_kwargs=norm_kwargs, kernel=kernel, zoneout=zoneout,
            weight_dropout=weight_dropout, between_layers=between_layers,
        )  # fmt: skip

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity!r}"


def _reject_unsupported(name: str, unsupported: Dict[str, Any]) -> None:
    if "proj_size" in unsupported:  # torch.nn's GRU and RNN refuse the keyword whatever its value, 0 included
        raise ValueError(f"proj_size argument is only supported for LSTM, not RNN or GRU (got proj_size={unsupported['proj_size']!r} for {name})")
    if unsupported:
        raise TypeError(f"{name}.__init__() got unexpected keyword argument(s) {sorted(unsupported)}")


# ---------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------


class CellBase(_NormSetup, nn.Module):
    """Shared machinery of the single-step cells; parameter names follow ``torch.nn.LSTMCell``. The cell
    type gives the weight shapes and the math, and the norm setup is the layers' own.

    ``zoneout`` and ``weight_dropout`` are the layers' options applied to the one step of each call: the
    zoneout keep indicators and the DropConnect mask are drawn afresh at every call in training (see
    :meth:`draw_weight_hh_mask` for one mask over a whole sequence).
    """

    # Defaults for cells pickled before these options existed (torch.save(model) of an older recnorm).
    zoneout: Any = 0.0
    _zoneout_rates: Tuple[float, ...] = (0.0,)
    weight_dropout: float = 0.0

    def __init__(
        self,
        cell: Union[str, CellType],
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        norm: Optional[str] = None,
        norm_kwargs: Optional[Dict[str, Any]] = None,
        zoneout: Union[float, Tuple[float, float]] = 0.0,
        weight_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.cell = CELLS.get(cell)() if isinstance(cell, str) else cell
        name = type(self).__name__
        self.input_size = _check_cell_size(name, "input_size", input_size)  # torch.nn's cells allow 0 (and so hidden_size=0)
        self.hidden_size = _check_cell_size(name, "hidden_size", hidden_size)
        self.zoneout = zoneout
        self._zoneout_rates = _check_zoneout(zoneout, self.cell, name)
        self.weight_dropout = _check_rate("weight_dropout", weight_dropout)
        self.bias = _check_truth_flag("bias", bias)
        self._setup_norm(norm, norm_kwargs)
        shapes = self.cell.weight_shapes(self.input_size, self.hidden_size, 0, True)
        for name, shape in shapes.items():
            if name.startswith("bias") and not self.bias:
                self.register_parameter(name, None)
            else:
                setattr(self, name, nn.Parameter(torch.empty(shape, **fk)))
        self._norm_names = self._build_norms("", fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
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
        if any(self._zoneout_rates):
            s += f", zoneout={self.zoneout!r}"
        if self.weight_dropout:
            s += f", weight_dropout={self.weight_dropout}"
        return s

    def draw_weight_hh_mask(self) -> Optional[Tensor]:
        """One DropConnect mask for ``weight_hh``, to pass as ``weight_hh_mask=`` to every step of a sequence.

        In training with ``weight_dropout=p > 0``: a tensor of ``weight_hh``'s shape whose entries are 0 with
        probability ``p`` and ``1 / (1 - p)`` otherwise (all 0 for ``p = 1``), drawn with torch's RNG, as
        ``F.dropout`` scales. Otherwise (eval, or ``p = 0``): None, which makes the cell use ``weight_hh``
        unchanged, so the same loop is right in both modes::

            mask = cell.draw_weight_hh_mask()
            for t in range(T):
                h, c = cell(x[t], (h, c), weight_hh_mask=mask)
        """
        if not (self.training and self.weight_dropout):
            return None
        with torch.no_grad():
            return F.dropout(torch.ones_like(self.weight_hh), self.weight_dropout, True)

    def _weight_hh(self, mask: Optional[Tensor]) -> Tensor:
        """``weight_hh`` as this call uses it: times the given mask, or with a fresh DropConnect mask in training."""
        if mask is not None:
            if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(self.weight_hh.shape):
                got = f"shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(
                    f"{type(self).__name__}: weight_hh_mask should be a Tensor of weight_hh's shape "
                    f"{tuple(self.weight_hh.shape)} (see draw_weight_hh_mask()), got {got}"
                )
            return self.weight_hh * mask.to(self.weight_hh.dtype)
        if self.weight_dropout and self.training:
            return F.dropout(self.weight_hh, self.weight_dropout, True)  # DropConnect, as the layers do
        return self.weight_hh

    def _zoneout_data(self, x: Tensor) -> Tuple[Any, ...]:
        """Per state tensor: None, the rate (eval), or 0/1 keep indicators ``(B, H)`` for this step's rows of
        ``x`` (training), drawn with torch's RNG as the layers draw them."""
        rates = self._zoneout_rates
        if not any(rates):
            return ()
        if not self.training:
            return tuple(r or None for r in rates)
        return tuple(
            torch.empty(x.shape[0], self.hidden_size, dtype=torch.bool, device=x.device).bernoulli_(r) if r else None for r in rates
        )

    def _needs_step(self) -> bool:
        return any(getattr(m, "stat", None) == "step" for m in self._norms(self._norm_names).values())

    def forward(self, input: Tensor, hx=None, step: Optional[int] = None, *, weight_hh_mask: Optional[Tensor] = None):
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: expected input to be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(
                f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead (unbatched (input_size,) or batched "
                f"(batch, input_size); got shape {tuple(input.shape)})"
            )
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        batch = x.shape[0]
        states = self._prepare_state(hx, batch, is_batched, x)
        if step is None:
            if self._needs_step():
                raise ValueError(f"{name}: norm {self.norm!r} keeps statistics per time step; pass step=t (an int >= 0)")
            step = 0
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"{name}: step must be an int >= 0, got {step!r}")
        weight_hh = self._weight_hh(weight_hh_mask)
        if batch == 0:  # torch.nn's answer: empty states, which autograd connects to what needs a gradient
            anchor = _zero_anchor([x, *states, *self.parameters()])
            new = tuple(_anchored(s, anchor) for s in states)
            return new if self.cell.state_size == 2 else new[0]
        norms = self._norms(self._norm_names)
        work = DirectionWork(
            cell=self.cell.descriptor(), weight_ih=self.weight_ih, weight_hh=weight_hh,
            bias_ih=self.bias_ih, bias_hh=self.bias_hh, norms={site: m.descriptor() for site, m in norms.items()},
            carry_cell_norm=_carries(norms), step_offset=int(step),
            zoneout=self._zoneout_data(x),
        )  # fmt: skip
        # One step: the readable reference math, which every tool can trace for any batch size.
        res = kernels.reference.run_direction(work, x, None, states)
        for site, m in res.moments.items():
            norms[site].record(m)
        new = res.state
        if not is_batched:
            new = tuple(s.squeeze(0) for s in new)
        return new if self.cell.state_size == 2 else new[0]

    def _prepare_state(self, hx, batch: int, is_batched: bool, x: Tensor) -> Tuple[Tensor, ...]:
        """The states ``(B, H)`` each. The checks are torch.nn's cells', in their order, types and wording:
        each state 1-D or 2-D (ValueError), then (RuntimeError) the input's size, each state's batch and size,
        and (where torch's matrix products would fail) dtypes. A state must have as many dimensions as the
        input: torch broadcasts neither."""
        name = type(self).__name__
        n = self.cell.state_size
        if hx is None:
            states: Tuple[Tensor, ...] = tuple(torch.zeros(batch, self.hidden_size, dtype=x.dtype, device=x.device) for _ in range(n))
        else:
            if n > 1:
                if not isinstance(hx, (tuple, list)):
                    raise TypeError(f"{name}: expected hx to be a tuple (h, c) of Tensors, got {type(hx).__name__}")
                if len(hx) != n:
                    raise RuntimeError(f"{name}: {self.cell.name or 'the cell'}_cell expects {n} hidden states, got a {type(hx).__name__} of {len(hx)}")
            states = tuple(hx) if n > 1 else (hx,)
            for i, s in enumerate(states):
                if not isinstance(s, Tensor):
                    raise TypeError(f"{name}: expected hx{f'[{i}]' if n > 1 else ''} to be a Tensor, got {type(s).__name__}")
                if s.dim() not in (1, 2):
                    which = f"hx[{i}]" if n > 1 else "hidden"
                    raise ValueError(f"{name}: Expected {which} to be 1D or 2D, got {s.dim()}D instead (shape {tuple(s.shape)})")
            for i, s in enumerate(states):
                if s.dim() != (2 if is_batched else 1):
                    kind = "batched 2-D" if is_batched else "unbatched 1-D"
                    raise RuntimeError(
                        f"{name}: for {kind} input, hx should also be {2 if is_batched else 1}-D, got a {s.dim()}-D tensor of shape "
                        f"{tuple(s.shape)} (hidden{i}; torch.nn's cells broadcast neither)"
                    )
            if not is_batched:
                states = tuple(s.unsqueeze(0) for s in states)
        if fixed_size_check(lambda: x.shape[1] != self.input_size):
            raise RuntimeError(f"{name}: input has inconsistent input_size: got {x.shape[1]} expected {self.input_size}")
        for i, s in enumerate(states):
            if s.shape[0] != batch:
                raise RuntimeError(f"{name}: Input batch size {batch} doesn't match hidden{i} batch size {s.shape[0]}")
            if s.shape[1] != self.hidden_size:
                raise RuntimeError(f"{name}: hidden{i} has inconsistent hidden_size: got {s.shape[1]}, expected {self.hidden_size}")
        if not torch.is_autocast_enabled(x.device.type):
            w = self.weight_ih
            if x.dtype != w.dtype:
                raise RuntimeError(f"{name}: input dtype ({x.dtype}) does not match weight dtype ({w.dtype}); convert one to the other")
            for i, s in enumerate(states):
                if s.dtype != w.dtype:
                    raise RuntimeError(f"{name}: hidden{i} dtype ({s.dtype}) does not match weight dtype ({w.dtype}); convert one to the other")
        return states


_CELL_REGULARIZATION_DOC = r"""
    Zoneout and DropConnect on a cell (keyword-only; the layers' options, applied to the one step of each
    call):

    * ``zoneout``: as the layers' (a rate zones ``h``; a pair ``(p_h, p_c)`` zones the LSTM's ``h`` and
      ``c``). In training, every call draws fresh keep indicators ``d ~ Bernoulli(p)`` per unit and row and
      returns ``s = d * s_prev + (1 - d) * s~``; in eval, ``s = p * s_prev + (1 - p) * s~``. A loop of
      calls over a sequence is therefore zoneout drawn per step, as in the layers.
    * ``weight_dropout``: DropConnect on ``W_hh``. In training, a call without ``weight_hh_mask`` draws a
      fresh mask, so a loop of calls uses a different mask at every step, whereas the layers (and AWD-LSTM)
      draw one mask per forward call, shared by all its steps. For one mask over a sequence, draw it with
      ``mask = cell.draw_weight_hh_mask()`` and pass ``cell(x_t, hx, weight_hh_mask=mask)`` at every step:
      the cell then uses ``W_hh * mask``. The method returns None in eval (and for ``weight_dropout=0``),
      where the cell uses ``W_hh`` as is; a mask that is given is always applied. Eval draws nothing.
"""


class LSTMCell(CellBase):
    __doc__ = (
        r"""An LSTM cell with optional normalization; a drop-in replacement for ``torch.nn.LSTMCell``.

    ``forward(input, hx=None, step=None, *, weight_hh_mask=None)`` returns ``(h_1, c_1)``. Norms whose
    statistics are per time step (``"batch"``) need the step index: ``cell(x_t, (h, c), step=t)``.
"""
        + _CELL_REGULARIZATION_DOC
        + _NORM_DOC
    )

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *, norm=None, norm_kwargs=None,
        zoneout=0.0, weight_dropout=0.0,
    ):  # fmt: skip
        super().__init__(
            "lstm", input_size, hidden_size, bias, device, dtype, norm=norm, norm_kwargs=norm_kwargs, zoneout=zoneout,
            weight_dropout=weight_dropout,
        )  # fmt: skip


class GRUCell(CellBase):
    __doc__ = (
        r"""A GRU cell with optional normalization; a drop-in replacement for ``torch.nn.GRUCell``.

    ``forward(input, hx=None, step=None, *, weight_hh_mask=None)`` returns ``h_1``.
"""
        + _CELL_REGULARIZATION_DOC
        + _NORM_DOC
    )

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *, norm=None, norm_kwargs=None,
        zoneout=0.0, weight_dropout=0.0,
    ):  # fmt: skip
        super().__init__(
            "gru", input_size, hidden_size, bias, device, dtype, norm=norm, norm_kwargs=norm_kwargs, zoneout=zoneout,
            weight_dropout=weight_dropout,
        )  # fmt: skip


class RNNCell(CellBase):
    __doc__ = (
        r"""An Elman RNN cell with optional normalization; a drop-in replacement for ``torch.nn.RNNCell``.

    ``forward(input, hx=None, step=None, *, weight_hh_mask=None)`` returns ``h_1``.
"""
        + _CELL_REGULARIZATION_DOC
        + _NORM_DOC
    )

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh", device=None, dtype=None, *,
        norm=None, norm_kwargs=None, zoneout=0.0, weight_dropout=0.0,
    ):  # fmt: skip
        self.nonlinearity = nonlinearity
        super().__init__(
            CELLS.get("rnn")(nonlinearity), input_size, hidden_size, bias, device, dtype, norm=norm, norm_kwargs=norm_kwargs,
            zoneout=zoneout, weight_dropout=weight_dropout,
        )  # fmt: skip
