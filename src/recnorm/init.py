"""Named weight-initialisation schemes for any recnorm (or torch.nn) recurrent layer or cell.

Usage::

    recnorm.init.initialize(lstm, "orthogonal", gain=2.0, forget_bias=1.0)

A scheme initialises every gate block (H rows) of every input-to-hidden and hidden-to-hidden weight
separately, then multiplies it by ``gain``; projection weights (``weight_hr``) get the same scheme.
Biases are set to 0, except with ``scheme="default"`` where they get torch's uniform initialisation. Normalization parameters are left alone (their gains are a ``norm_kwargs`` option).

Schemes (``list_inits()``):

* ``"default"``: torch.nn's U(-1/sqrt(H), 1/sqrt(H)) for weights and biases; weights times ``gain``.
* ``"orthogonal"``: each gate block a (semi-)orthogonal matrix times ``gain`` (Saxe et al. 2014).
* ``"identity"``: recurrent gate blocks ``gain * I`` (Le et al. 2015); input blocks Xavier-uniform
  (gain 1).
* ``"xavier"``: each gate block Xavier/Glorot uniform with ``gain``.
* ``"normal"``: each gate block N(0, gain^2 / fan_in) ("scaled normal").

``forget_bias`` (LSTM only): the forget-gate block of ``bias_ih`` is set to this value and that of
``bias_hh`` to 0, so their sum is ``forget_bias`` (Gers et al. 2000; Jozefowicz et al. 2015).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["initialize", "list_inits", "INITS"]


def _block_init(fn: Callable[[Tensor, float], None]) -> Callable[[Tensor, int, float, bool], None]:
    def apply(weight: Tensor, hidden: int, gain: float, recurrent: bool) -> None:
        for block in weight.split(hidden, 0):
            fn(block, gain)

    return apply


def _default(weight: Tensor, hidden: int, gain: float, recurrent: bool) -> None:
    stdv = 1.0 / math.sqrt(hidden)
    weight.uniform_(-stdv * gain, stdv * gain)


def _identity(weight: Tensor, hidden: int, gain: float, recurrent: bool) -> None:
    for block in weight.split(hidden, 0):
        if recurrent:
            nn.init.eye_(block)
            block.mul_(gain)
        else:
            nn.init.xavier_uniform_(block)


def _normal(block: Tensor, gain: float) -> None:
    block.normal_(0.0, gain / math.sqrt(block.shape[1]))


INITS: Dict[str, Callable[[Tensor, int, float, bool], None]] = {
    "default": _default,
    "orthogonal": _block_init(lambda b, g: nn.init.orthogonal_(b, gain=g)),
    "identity": _identity,
    "xavier": _block_init(lambda b, g: nn.init.xavier_uniform_(b, gain=g)),
    "normal": _block_init(_normal),
}


def list_inits() -> List[str]:
    """Names of the initialisation schemes."""
    return sorted(INITS)


def _weights(module: nn.Module):
    """(parameter, role) for each weight matrix / bias of the recurrent layers inside ``module``."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if ".norm_" in f".{name}" or leaf.startswith("norm_"):
            continue
        if leaf.startswith("weight_ih"):
            yield name, p, "ih"
        elif leaf.startswith("weight_hh"):
            yield name, p, "hh"
        elif leaf.startswith("weight_hr"):
            yield name, p, "hr"
        elif leaf.startswith("bias_ih"):
            yield name, p, "bias_ih"
        elif leaf.startswith("bias_hh"):
            yield name, p, "bias_hh"


def _hidden_size(module: nn.Module, name: str) -> int:
    owner = module
    for part in name.split(".")[:-1]:
        owner = getattr(owner, part)
    return int(owner.hidden_size)


@torch.no_grad()
def initialize(module: nn.Module, scheme: str = "default", gain: float = 1.0, forget_bias: Optional[float] = None) -> nn.Module:
    """Initialise the recurrent weights of every recurrent layer or cell inside ``module`` in place.

    Args:
        module: a recnorm or torch.nn LSTM/GRU/RNN (or cell), or any module containing them.
        scheme: one of :func:`list_inits`.
        gain: multiplies the weight matrices (must be positive).
        forget_bias: LSTM forget-gate bias, or ``None`` to leave the scheme's bias.

    Returns:
        ``module``.
    """
    if scheme not in INITS:
        raise ValueError(f"unknown init scheme {scheme!r}; expected one of {list_inits()}")
    if not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain > 0):
        raise ValueError(f"gain must be a positive finite number, got {gain!r}")
    fn = INITS[scheme]
    found = False
    for name, p, role in _weights(module):
        found = True
        hidden = _hidden_size(module, name)
        if role in ("ih", "hh"):
            fn(p, hidden, float(gain), role == "hh")
        elif role == "hr":
            fn(p, p.shape[0], float(gain), False)
        elif scheme == "default":
            _default(p, hidden, 1.0, False)
        else:
            p.zero_()
    if not found:
        raise ValueError(f"no recurrent weights (weight_ih*/weight_hh*) found in {type(module).__name__}")
    if forget_bias is not None:
        _set_forget_bias(module, float(forget_bias))
    return module


def _set_forget_bias(module: nn.Module, value: float) -> None:
    done = False
    for name, p, role in _weights(module):
        if role not in ("bias_ih", "bias_hh"):
            continue
        hidden = _hidden_size(module, name)
        if p.shape[0] != 4 * hidden:
            raise ValueError(f"forget_bias applies to LSTM layers only; {name} has {p.shape[0]} rows, not 4 * {hidden}")
        p[hidden : 2 * hidden] = value if role == "bias_ih" else 0.0
        done = True
    if not done:
        raise ValueError("forget_bias needs biases; the layer was built with bias=False")
