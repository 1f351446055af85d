r"""Load the weights of other libraries' recurrent layers into recnorm layers that compute the same function,
and back.

* :func:`from_haste` / :func:`to_haste`: lmnt-com/haste's PyTorch layers ``LSTM``, ``LayerNormLSTM``, ``GRU``
  and ``LayerNormGRU``. haste stores ``kernel`` ``(input, G*H)`` and ``recurrent_kernel`` ``(H, G*H)`` (the
  transposes of torch's weights) with gate layout i, g, f, o (LSTM) or z, r, g (GRU), where torch and recnorm
  use i, f, g, o and r, z, n. Its equations, with ``LN(v; γ, β)`` layer norm over all of ``v``'s features
  (eps 1e-5) and ``K``, ``R`` the kernels::

      LSTM:           i, g, f, o = split(x_t K + h_{t-1} R + b)
      LayerNormLSTM:  i, g, f, o = split(LN(x_t K; γ_0) + LN(h_{t-1} R; γ_1) + b)
                      c_t = σ(f) c_{t-1} + σ(i) tanh(g);  h_t = σ(o) tanh(c_t)  (LayerNormLSTM: tanh(LN(c_t; γ_h, β_h)))
      GRU:            z, r, g = split(x_t K + b_x) and split(h_{t-1} R + b_r) (v_x, v_h)
      LayerNormGRU:   the same with LN(x_t K; γ_0) + b_x and LN(h_{t-1} R; γ_1) + b_r
                      z = σ(v_x,z + v_h,z);  r = σ(v_x,r + v_h,r);  g = tanh(v_x,g + r v_h,g)
                      h_t = z h_{t-1} + (1 - z) g

  so ``LSTM`` is ``recnorm.LSTM(norm=None)`` (``bias_ih = b``, ``bias_hh = 0``), ``LayerNormLSTM`` is
  ``norm="layer"``, ``GRU`` is ``recnorm.GRU`` (the reset gate multiplies ``h R + b_r``, as in torch and
  cuDNN), and ``LayerNormGRU`` is ``norm="layer"`` with ``norm_kwargs={"gate_groups": "one"}`` (one layer
  norm over all 3H gate features; recnorm's default normalizes the (r, z) and n blocks separately, Ba et
  al. eqs. 26-28). haste's ``zoneout`` (of h) is recnorm's ``zoneout``, its ``dropout`` (DropConnect on
  ``R``) is ``weight_dropout`` (which rescales the kept weights by 1 / (1 - p), as ``torch.nn.functional.dropout``
  does; the two only differ in training). The converted layers are checked against these equations in eval
  mode and without zoneout (``tests/nn/test_convert.py``); haste's documentation gives LayerNormGRU's ``gamma`` as
  ``(2, 4H)``, which cannot be, and the converter expects ``(2, 3H)``.

* :func:`from_torchaudio` / :func:`to_torchaudio`: ``torchaudio.models.rnnt._CustomLSTM``, the LSTM of the
  Emformer RNN-T predictor. Keys ``x2g.weight`` ``(4H, I)`` (and ``x2g.bias`` without layer norm),
  ``p2g.weight`` ``(4H, H)``, and with ``layer_norm=True`` ``g_norm.{weight,bias}`` ``(4H,)`` and
  ``c_norm.{weight,bias}`` ``(H,)``; gate layout i, f, g, o. Its equations::

      gates = LN_g(W_x x_t + W_p h_{t-1})            (without layer norm: W_x x_t + b_x + W_p h_{t-1})
      i, f, g, o = split(gates);  c_t = LN_c(σ(f) c_{t-1} + σ(i) tanh(g));  h_t = σ(o) tanh(c_t)

  with the normalized ``c_t`` carried to the next step: ``recnorm.LSTM(norm="layer", norm_kwargs={"joint":
  True, "carry_cell": True, "eps": layer_norm_epsilon})``, ``bias_ih = g_norm.bias``, ``bias_hh = 0``. Its
  ``forward(input, state)`` takes ``(T, B, D)`` and ``state = [h, c]`` of shape ``(B, H)`` each; recnorm's
  takes ``(h_0, c_0)`` of shape ``(1, B, H)``.

The converted layers compute the peers' functions exactly, with one rule of recnorm's on top: a row whose
values are all equal (an all-zero state) normalizes to exactly 0 and passes no gradient, where a layer norm
that does not special-case it gives ``(v - mean) / sqrt(eps)``, the same 0 for an exactly constant row.

Conversions that would change the function raise ValueError naming the difference (haste's IndRNN, a
recnorm layer with several layers, both directions, ``proj_size``, a carried or joint norm for haste, ...).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from recnorm.nn.rnn import GRU, LSTM, RecurrentBase

__all__ = ["from_haste", "to_haste", "from_torchaudio", "to_torchaudio"]

# haste's gate blocks in recnorm's (torch's) order: LSTM i,g,f,o -> i,f,g,o; GRU z,r,g -> r,z,n.
_HASTE_ORDER = {4: (0, 2, 1, 3), 3: (1, 0, 2)}
# and back: recnorm's i,f,g,o -> haste's i,g,f,o (its own inverse); r,z,n -> z,r,g (its own inverse)
_HASTE_EPS = 1e-5


def _blocks(t: Tensor, order: Tuple[int, ...], dim: int = -1) -> Tensor:
    """``t`` with its gate blocks along ``dim`` permuted to ``order``."""
    parts = t.chunk(len(order), dim)
    return torch.cat([parts[k] for k in order], dim)


def _tensor(state_dict: Mapping[str, Tensor], key: str, where: str) -> Tensor:
    if key not in state_dict:
        raise ValueError(f"{where}: expected key {key!r} in the state_dict, got keys {sorted(state_dict)}")
    value = state_dict[key]
    if not isinstance(value, Tensor):
        raise ValueError(f"{where}: expected {key!r} to be a Tensor, got {type(value).__name__}")
    return value.detach()


def _load(layer: RecurrentBase, values: Dict[str, Tensor]) -> RecurrentBase:
    """Copy ``values`` into the layer's parameters (every parameter must be given)."""
    own = dict(layer.named_parameters())
    missing = sorted(set(own) - set(values))
    if missing:  # pragma: no cover - the converters give every parameter
        raise RuntimeError(f"conversion gives no value for {missing}")
    with torch.no_grad():
        for name, value in values.items():
            if own[name].shape != value.shape:
                raise ValueError(f"{name}: expected shape {tuple(own[name].shape)}, got {tuple(value.shape)}")
            own[name].copy_(value)
    return layer


# ---------------------------------------------------------------------------------------------------
# haste
# ---------------------------------------------------------------------------------------------------


def _haste_kind(state_dict: Mapping[str, Tensor]) -> str:
    keys = set(state_dict)
    if "recurrent_scale" in keys:
        raise ValueError(
            "from_haste: this is haste's IndRNN (key 'recurrent_scale'); recnorm converts haste's LSTM, LayerNormLSTM, "
            "GRU and LayerNormGRU"
        )
    for key in ("kernel", "recurrent_kernel", "bias"):
        _tensor(state_dict, key, "from_haste")
    hidden, gates = state_dict["recurrent_kernel"].shape
    if gates == 4 * hidden:
        kind = "LayerNormLSTM" if "gamma_h" in keys else "LSTM"
    elif gates == 3 * hidden:
        kind = "LayerNormGRU" if "gamma" in keys else "GRU"
    else:
        raise ValueError(
            f"from_haste: recurrent_kernel of shape {(hidden, gates)} is neither an LSTM's (H, 4H) nor a GRU's (H, 3H)"
        )
    expected = {
        "LSTM": {"kernel", "recurrent_kernel", "bias"},
        "LayerNormLSTM": {"kernel", "recurrent_kernel", "bias", "gamma", "gamma_h", "beta_h"},
        "GRU": {"kernel", "recurrent_kernel", "bias", "recurrent_bias"},
        "LayerNormGRU": {"kernel", "recurrent_kernel", "bias", "recurrent_bias", "gamma"},
    }[kind]
    if keys != expected:
        raise ValueError(f"from_haste: a haste {kind} has keys {sorted(expected)}, got {sorted(keys)}")
    return kind


def from_haste(
    state_dict: Mapping[str, Tensor],
    *,
    batch_first: bool = False,
    zoneout: float = 0.0,
    dropout: float = 0.0,
    kernel: Optional[str] = None,
) -> RecurrentBase:
    """A recnorm layer computing what a haste layer with these weights computes.

    Args:
        state_dict: the ``state_dict()`` of a ``haste_pytorch`` ``LSTM``, ``LayerNormLSTM``, ``GRU`` or
            ``LayerNormGRU`` (which one is read from its keys and shapes).
        batch_first, zoneout, dropout: the haste layer's constructor arguments (``dropout`` becomes
            ``weight_dropout``).
        kernel: recnorm's ``kernel=`` for the new layer.

    Returns:
        ``recnorm.LSTM`` or ``recnorm.GRU`` with one layer, in training mode like a new module; its
        parameters have the state_dict's dtype and device.
    """
    kind = _haste_kind(state_dict)
    get = lambda key: _tensor(state_dict, key, "from_haste")  # noqa: E731
    w_x, w_h, b = get("kernel"), get("recurrent_kernel"), get("bias")
    hidden, gates = w_h.shape
    G = gates // hidden
    order = _HASTE_ORDER[G]
    norm = "layer" if kind.startswith("LayerNorm") else None
    opts = dict(batch_first=batch_first, zoneout=zoneout, weight_dropout=dropout, kernel=kernel, dtype=w_x.dtype, device=w_x.device)
    if kind.endswith("LSTM"):
        layer: RecurrentBase = LSTM(w_x.shape[0], hidden, norm=norm, **opts)
    else:
        layer = GRU(w_x.shape[0], hidden, norm=norm, norm_kwargs={"gate_groups": "one"} if norm else None, **opts)
    values = {
        "weight_ih_l0": _blocks(w_x, order).t(),
        "weight_hh_l0": _blocks(w_h, order).t(),
        "bias_ih_l0": _blocks(b, order),
        "bias_hh_l0": _blocks(get("recurrent_bias"), order) if G == 3 else torch.zeros_like(b),
    }
    if norm is not None:
        gamma = get("gamma")
        if tuple(gamma.shape) != (2, gates):
            raise ValueError(f"from_haste: gamma should have shape (2, {gates}), got {tuple(gamma.shape)}")
        values["norm_ih_l0.weight"] = _blocks(gamma[0], order)
        values["norm_hh_l0.weight"] = _blocks(gamma[1], order)
        if G == 4:
            values["norm_c_l0.weight"] = get("gamma_h")
            values["norm_c_l0.bias"] = get("beta_h")
    return _load(layer, values)


def _single_layer(layer: RecurrentBase, where: str) -> None:
    if not isinstance(layer, RecurrentBase):
        raise TypeError(f"{where}: expected a recnorm LSTM, GRU or RNN layer, got {type(layer).__name__}")
    problems = []
    if layer.num_layers != 1:
        problems.append(f"num_layers={layer.num_layers} (the peer's layer is one layer)")
    if layer.bidirectional:
        problems.append("bidirectional=True")
    if layer.proj_size:
        problems.append(f"proj_size={layer.proj_size}")
    if layer.between_layers is not None:
        problems.append(f"between_layers={layer.between_layers!r}")
    if problems:
        raise ValueError(f"{where}: the peer's layer cannot compute this layer's function: " + ", ".join(problems))


def _biases(layer: RecurrentBase) -> Tuple[Tensor, Tensor]:
    G = layer.cell.num_gates * layer.hidden_size
    w = layer.weight_ih_l0
    zero = torch.zeros(G, dtype=w.dtype, device=w.device)
    b_ih = zero if layer.bias_ih_l0 is None else layer.bias_ih_l0.detach()
    b_hh = zero if layer.bias_hh_l0 is None else layer.bias_hh_l0.detach()
    return b_ih, b_hh


def to_haste(layer: RecurrentBase) -> Dict[str, Tensor]:
    """The ``state_dict`` of the haste layer that computes what ``layer`` computes: ``haste_pytorch.LSTM``
    (``norm=None``), ``LayerNormLSTM`` (``norm="layer"``), ``GRU`` or ``LayerNormGRU`` (``norm="layer"`` with
    ``gate_groups="one"``). Give the haste layer recnorm's ``zoneout`` (of h only) and ``weight_dropout`` as
    its ``zoneout`` and ``dropout``. Raises ValueError where haste's layers compute something else."""
    _single_layer(layer, "to_haste")
    name = layer.cell.name
    if name not in ("lstm", "gru"):
        raise ValueError(f"to_haste: haste's converted layers are LSTMs and GRUs, got a {name} layer")
    problems = []
    if layer.norm not in (None, "layer"):
        problems.append(f"norm={layer.norm!r} (haste normalizes with layer norm only)")
    kw = layer.norm_kwargs
    if layer.norm == "layer":
        if kw["joint"] or kw["carry_cell"]:
            problems.append("a joint gate norm or a carried cell norm (haste normalizes the two terms apart, and c inside tanh only)")
        if kw["eps"] != _HASTE_EPS:
            problems.append(f"eps={kw['eps']} (haste's layer norms use {_HASTE_EPS})")
        if name == "gru" and kw["gate_groups"] != "one":
            problems.append("gate_groups='cell' (haste's LayerNormGRU normalizes all 3H gate features as one group: use gate_groups='one')")
    if len(layer._zoneout_rates) > 1 and layer._zoneout_rates[1]:
        problems.append("zoneout of the cell state (haste zones h only)")
    if problems:
        raise ValueError("to_haste: haste's layers cannot compute this layer's function: " + "; ".join(problems))
    G = layer.cell.num_gates
    order = _HASTE_ORDER[G]
    inverse = tuple(order.index(k) for k in range(G))
    b_ih, b_hh = _biases(layer)
    out = {
        "kernel": _blocks(layer.weight_ih_l0.detach().t(), inverse).contiguous(),
        "recurrent_kernel": _blocks(layer.weight_hh_l0.detach().t(), inverse).contiguous(),
    }
    if G == 4:
        out["bias"] = _blocks(b_ih + b_hh, inverse)
    else:
        out["bias"] = _blocks(b_ih, inverse)
        out["recurrent_bias"] = _blocks(b_hh, inverse)
    if layer.norm == "layer":
        out["gamma"] = torch.stack([_blocks(layer.norm_ih_l0.weight.detach(), inverse), _blocks(layer.norm_hh_l0.weight.detach(), inverse)])
        if G == 4:
            out["gamma_h"] = layer.norm_c_l0.weight.detach().clone()
            out["beta_h"] = layer.norm_c_l0.bias.detach().clone()
    return out


# ---------------------------------------------------------------------------------------------------
# torchaudio
# ---------------------------------------------------------------------------------------------------

_TA_LN = ("g_norm.weight", "g_norm.bias", "c_norm.weight", "c_norm.bias")


def from_torchaudio(
    state_dict: Mapping[str, Tensor], *, layer_norm_epsilon: float = 1e-5, prefix: str = "", kernel: Optional[str] = None
) -> LSTM:
    """A ``recnorm.LSTM`` computing what torchaudio's ``_CustomLSTM`` with these weights computes.

    Args:
        state_dict: the module's ``state_dict()`` (with or without ``layer_norm``, read from the keys), or a
            larger one holding it under ``prefix`` (say ``"predictor.lstm_layers.0."`` of an RNN-T model).
        layer_norm_epsilon: the module's ``layer_norm_epsilon`` (the state_dict does not hold it; torchaudio's
            Emformer RNN-T bases pass 1e-3).
        kernel: recnorm's ``kernel=`` for the new layer.
    """
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    where = "from_torchaudio"
    w_x, w_p = _tensor(sd, "x2g.weight", where), _tensor(sd, "p2g.weight", where)
    gates, hidden = w_p.shape
    if gates != 4 * hidden:
        raise ValueError(f"{where}: p2g.weight should have shape (4H, H), got {tuple(w_p.shape)}")
    layer_norm = "g_norm.weight" in sd
    expected = {"x2g.weight", "p2g.weight"} | (set(_TA_LN) if layer_norm else {"x2g.bias"})
    if set(sd) != expected:
        raise ValueError(f"{where}: a _CustomLSTM(layer_norm={layer_norm}) has keys {sorted(expected)}, got {sorted(sd)}")
    opts = dict(kernel=kernel, dtype=w_x.dtype, device=w_x.device)
    if layer_norm:
        layer = LSTM(w_x.shape[1], hidden, norm="layer", norm_kwargs={"joint": True, "carry_cell": True, "eps": float(layer_norm_epsilon)}, **opts)
        values = {
            "bias_ih_l0": _tensor(sd, "g_norm.bias", where),
            "norm_gates_l0.weight": _tensor(sd, "g_norm.weight", where),
            "norm_c_l0.weight": _tensor(sd, "c_norm.weight", where),
            "norm_c_l0.bias": _tensor(sd, "c_norm.bias", where),
        }
    else:
        layer = LSTM(w_x.shape[1], hidden, **opts)
        values = {"bias_ih_l0": _tensor(sd, "x2g.bias", where)}
    values.update({"weight_ih_l0": w_x, "weight_hh_l0": w_p, "bias_hh_l0": torch.zeros_like(values["bias_ih_l0"])})
    return _load(layer, values)


def to_torchaudio(layer: LSTM) -> Dict[str, Tensor]:
    """The ``state_dict`` of torchaudio's ``_CustomLSTM`` computing what ``layer`` computes: ``layer_norm=False``
    for ``norm=None``, ``layer_norm=True`` (with ``layer_norm_epsilon`` = the layer's ``eps``) for
    ``norm="layer"`` with ``joint=True`` and ``carry_cell=True``. Raises ValueError otherwise."""
    _single_layer(layer, "to_torchaudio")
    if layer.cell.name != "lstm":
        raise ValueError(f"to_torchaudio: _CustomLSTM is an LSTM, got a {layer.cell.name} layer")
    kw = layer.norm_kwargs
    if layer.norm is not None and not (layer.norm == "layer" and kw["joint"] and kw["carry_cell"]):
        raise ValueError(
            f"to_torchaudio: _CustomLSTM normalizes with one layer norm of W_x x + W_p h and a carried layer norm of c, "
            f"or not at all; this layer has norm={layer.norm!r} with {kw}"
        )
    if any(layer._zoneout_rates) or layer.weight_dropout:
        raise ValueError("to_torchaudio: _CustomLSTM has no zoneout and no weight dropout")
    b_ih, b_hh = _biases(layer)
    out = {"x2g.weight": layer.weight_ih_l0.detach().clone(), "p2g.weight": layer.weight_hh_l0.detach().clone()}
    if layer.norm is None:
        out["x2g.bias"] = b_ih + b_hh
        return out
    out.update({
        "g_norm.weight": layer.norm_gates_l0.weight.detach().clone(),
        "g_norm.bias": b_ih + b_hh,
        "c_norm.weight": layer.norm_c_l0.weight.detach().clone(),
        "c_norm.bias": layer.norm_c_l0.bias.detach().clone(),
    })  # fmt: skip
    return out
