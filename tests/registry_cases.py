"""Test cases enrolled from the registries: every registered cell (with its variants) and every registered
norm. Registering a cell or a norm adds it to the gradcheck and padding tests (tests/nn/test_norms.py), the
drop-in tests (tests/nn/test_dropin.py), the fused-vs-reference tests for what the fused kernels serve
(tests/kernels/test_fused.py) and the every-tool tests (tests/tools/test_tools.py), which build their
parameters from here. A plugin registered before collection (``pytest -p my_plugin``, or imported by a
conftest) is enrolled the same way: tests/nn/test_api.py checks that with the toy pieces of
tests/registry_toys.py.

A plugin's cell without a kernel kind is tested on the reference loop: the tests that force the fused kernels
take ``KERNEL_CELL_IDS``, and those that need recnorm's own pieces ask ``is_built_in``.

Everything here is cheap at collection: the case lists are names read from the registries; modules are built
only inside the tests.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import recnorm
from recnorm.nn import CELLS, RecurrentBase
from recnorm.nn.norms import NORMS
from recnorm.nn.rnn import CellBase

DT = torch.float64


def cell_variants() -> Dict[str, Tuple[str, Dict[str, Any]]]:
    """``{case id: (cell name, constructor options)}`` for every registered cell and its variants."""
    out = {}
    for name, cls in CELLS.items():
        for opts in cls.variants():
            key = name if not opts else name + "_" + "_".join(str(v) for v in opts.values())
            out[key] = (name, opts)
    return out


def cell_ids() -> List[str]:
    """The cell case ids, read from the registry now."""
    return list(cell_variants())


def norm_ids() -> List[Optional[str]]:
    """``None`` (no norm) and every registered norm, read from the registry now."""
    return [None] + NORMS.names()


def kernel_cell_ids() -> List[str]:
    """The cell case ids whose math recnorm's fast kernels know (``CellType.kind()`` not None); a registered
    cell without a kernel kind runs the reference loop (and the export path) only."""
    return [c for c in cell_ids() if cell_type(c).kind() is not None]


def is_built_in(cell_id: Optional[str] = None, norm: Optional[str] = None) -> bool:
    """Whether the case's cell and norm are recnorm's own (not a plugin's, such as tests/registry_toys.py)."""
    cell_ok = cell_id is None or CELLS.get(cell_variants()[cell_id][0]).__module__.startswith("recnorm.")
    norm_ok = norm is None or NORMS.get(norm).build.__module__.startswith("recnorm.")
    return cell_ok and norm_ok


def batch_norms() -> List[str]:
    return [n for n, spec in NORMS.items() if spec.batch_statistics]


def cell_type(cell_id: str):
    """The case's :class:`~recnorm.nn.cells.CellType` instance."""
    name, opts = cell_variants()[cell_id]
    return CELLS.get(name)(**opts)


def make(cell_id: str, *args, **kwargs) -> RecurrentBase:
    """A multi-layer recurrent layer of the case's cell (``recnorm.LSTM`` etc. for the built-in ones)."""
    return RecurrentBase(cell_type(cell_id), *args, **kwargs)


def make_cell(cell_id: str, *args, **kwargs) -> CellBase:
    """A single-step cell of the case's cell type (``recnorm.LSTMCell`` etc. for the built-in ones)."""
    return CellBase(cell_type(cell_id), *args, **kwargs)


def state(cell_id: str, h: torch.Tensor, rest: Optional[torch.Tensor] = None):
    """``h`` as an initial state of the case's cell: ``h`` for a cell with one state tensor, else the tuple
    ``(h, rest, ...)`` (``rest`` defaults to zeros)."""
    size = CELLS.get(cell_variants()[cell_id][0]).state_size
    if size == 1:
        return h
    return (h,) + tuple(torch.zeros_like(h) if rest is None else rest for _ in range(size - 1))


def first(state_out):
    """``h`` of a state a layer or cell returned (the state itself, or the first of a tuple)."""
    return state_out[0] if isinstance(state_out, tuple) else state_out


def cases(*axes) -> List[Tuple]:
    """The cross product of the cell ids, the norm ids and further axes."""
    return list(itertools.product(cell_ids(), norm_ids(), *axes))


# What the registries hold when the test modules are collected (after plugins and conftests have registered).
CELL_IDS = cell_ids()
NORM_IDS: List[Optional[str]] = norm_ids()
KERNEL_CELL_IDS = kernel_cell_ids()


def case_id(*values) -> str:
    return "-".join("none" if v is None else str(v) for v in values)


def randomize(m: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial norm gains, shifts, biases and running statistics (defaults would hide routing errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("norm_"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.9 + 0.3)
            elif name.startswith("bias_"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) * 1.5 + 0.5)
            elif name.endswith("num_batches_tracked"):
                b.fill_(1)


def run_and_grad(m, x, hx=None, lengths=None) -> list:
    """Outputs, final states, gradients (input, initial states, parameters) and buffers after one call."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    xl = x.clone().requires_grad_(True)
    hl = None
    if hx is not None:
        hl = tuple(s.clone().requires_grad_(True) for s in hx) if isinstance(hx, tuple) else hx.clone().requires_grad_(True)
    inp = pack_padded_sequence(xl, lengths, enforce_sorted=False) if lengths is not None else xl
    out, state = m(inp, hl)
    out = pad_packed_sequence(out)[0] if lengths is not None else out
    states = state if isinstance(state, tuple) else (state,)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * w).sum() + sum((s * s).sum() for s in states)
    leaves = [xl] + ([] if hl is None else (list(hl) if isinstance(hl, tuple) else [hl])) + list(m.parameters())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    return [out, *states, *grads, *[b.clone() for b in m.buffers()]]


def assert_all_close(a, b, **tol) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(v, u, **tol)
