"""A toy cell and a toy norm, defined outside recnorm as a user's plugin would be, to check that registering a
piece is all it takes for the layers, the engine and the test suite to take it up.

* ``register()`` / ``unregister()`` add and remove both (tests call them around what they check);
* ``pytest -p registry_toys`` registers them for a whole test session (``pytest_configure``), so the
  registry-driven tests enrol them (tests/nn/test_api.py runs that in a subprocess).
"""

from __future__ import annotations

import torch

from recnorm.nn import CELLS, NORMS, CellType, GroupedLayerNorm, NormSpec, register_cell, register_norm

CELL = "toy_mgu"
NORM = "toy_hh_rms"


class ToyMGUCellType(CellType):
    """The minimal gated unit (Zhou et al. 2016) with its reset applied after the recurrent product, as torch's
    GRU applies its reset gate (gates f, n)::

        f = sigmoid(gi_f + gh_f);  n = tanh(gi_n + f * gh_n);  h_t = (1 - f) * h_{t-1} + f * n
    """

    name = CELL
    num_gates = 2
    state_size = 1
    sites = ("ih", "hh")
    site_notes = {"gates": "its forget gate multiplies the recurrent term of n alone",
                  "cell": "it has no cell state"}

    def step(self, gi, gh, state, norm_c=None, carry=False, weight_hr=None):
        (h,) = state
        i_f, i_n = gi.chunk(2, 1)
        h_f, h_n = gh.chunk(2, 1)
        f = torch.sigmoid(i_f + h_f)
        n = torch.tanh(i_n + f * h_n)
        h = h + f * (n - h)
        return h, (h,)


def _build_hh_rms(site, num_features, groups, *, gain_init, eps, **fk):
    if site != "hh":
        return None
    return GroupedLayerNorm(num_features, groups=groups, gain_init=gain_init, shift=False, eps=eps, center=False, **fk)


TOY_NORM = NormSpec(NORM, _build_hh_rms, {"gain_init": 1.0, "eps": 1e-5}, "RMSNorm of W_hh h_{t-1} only",
                    label="toy hh RMS")


def register() -> None:
    register_cell(ToyMGUCellType)
    register_norm(TOY_NORM)


def unregister() -> None:
    for registry, name in ((CELLS, CELL), (NORMS, NORM)):
        if name in registry:
            registry.unregister(name)


def pytest_configure(config) -> None:
    register()


__all__ = ["ToyMGUCellType", "TOY_NORM", "register", "unregister"]
