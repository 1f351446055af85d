"""Time-loop implementations and the one place that chooses between them.

* ``reference``: the readable loop that autograd differentiates; the oracle every fast path is
  tested against.
* ``native``: torch's own fused RNN op, for directions whose recurrence is torch.nn's (no norm, or
  sequence-wise BN folded into the input weights); see :mod:`recnorm.kernels.native`.
* ``fused``: recnorm's C++ CPU loops with a hand-derived backward, for per-step layer and batch norms:
  :mod:`recnorm.kernels.fused_cpu` (LSTM) and :mod:`recnorm.kernels.fused_cpu_gru_rnn` (GRU, RNN).

``"auto"`` picks the fastest path that supports the case. Set ``RECNORM_KERNEL=reference`` (or pass
``kernel="reference"`` to a layer) to force the reference loop when debugging.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Sequence, Tuple

from torch import Tensor

from recnorm.kernels import native
from recnorm.kernels.reference import DirectionParams, project_inputs
from recnorm.kernels.reference import run_direction as reference_run_direction
from recnorm.nn.cells import CellType

__all__ = ["DirectionParams", "project_inputs", "run_direction", "KERNELS", "resolve_kernel", "extensions_built", "build_extensions"]

log = logging.getLogger(__name__)

KERNELS = ("auto", "reference", "native", "fused")


def resolve_kernel(kernel: Optional[str]) -> str:
    """The kernel to use: the argument, else ``$RECNORM_KERNEL``, else ``"auto"``."""
    name = kernel or os.environ.get("RECNORM_KERNEL") or "auto"
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; expected one of {KERNELS}")
    return name


def run_direction(
    cell: CellType,
    x: Tensor,
    batch_sizes: Sequence[int],
    state: Tuple[Tensor, ...],
    p: DirectionParams,
    on_output: Optional[Callable[[int, Tensor], None]] = None,
    kernel: str = "auto",
):
    """Run one layer direction with the chosen implementation (see :mod:`recnorm.kernels.reference`)."""
    if any(callable(getattr(n, "synced", None)) and n.synced() for n in (p.norm_ih, p.norm_hh, p.norm_c)):
        # Statistics synchronized across processes (recnorm.convert_sync_batchnorm): only the reference
        # loop takes them through recnorm.nn.stats; the fast paths compute them locally.
        if kernel in ("native", "fused"):
            raise ValueError(f"kernel={kernel!r} does not synchronize batch statistics across processes; use 'auto' or 'reference'")
        return reference_run_direction(cell, x, batch_sizes, state, p, on_output)
    if kernel in ("auto", "native") and native.supports(cell, p, on_output):
        return native.run_direction(cell, x, batch_sizes, state, p)
    if kernel == "native":
        raise ValueError("kernel='native' serves norm=None and norm='sequence_batch' only (and no diagnostics capture)")
    if kernel in ("auto", "fused"):
        from recnorm.kernels import fused_cpu  # lazy: its C++ extension is built on first use

        if fused_cpu.supports(cell, p, on_output, x):
            return fused_cpu.run_direction(cell, x, batch_sizes, state, p)
        from recnorm.kernels import fused_cpu_gru_rnn

        if fused_cpu_gru_rnn.supports(cell, p, on_output, x):
            return fused_cpu_gru_rnn.run_direction(cell, x, batch_sizes, state, p)
        if kernel == "fused":
            raise ValueError(
                "kernel='fused' serves LSTM with norm None, 'layer', 'batch' or 'shared_batch' (no proj_size), and GRU "
                "and RNN (tanh, relu) with norm 'layer', 'batch' or 'shared_batch', on CPU float32/float64 tensors with "
                "no diagnostics capture, and needs the C++ extensions to build; see the log"
            )
    return reference_run_direction(cell, x, batch_sizes, state, p, on_output)


def _extension_modules():
    from recnorm.kernels import fused_cpu, fused_cpu_gru_rnn  # lazy: importing them builds nothing

    return {"LSTM": fused_cpu, "GRU/RNN": fused_cpu_gru_rnn}


def extensions_built() -> bool:
    """Whether every fused C++ extension is already compiled for this machine and torch (nothing to build)."""
    from recnorm.kernels import _build, _fused_common

    tag, flags = _fused_common.build_flags()
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
    for name, source in (("recnorm_fused_lstm", "fused_lstm.cpp"), ("recnorm_fused_gru_rnn", "fused_gru_rnn.cpp")):
        full = f"{name}_{tag}"
        directory = _build.build_directory(full, [os.path.join(folder, source)], flags + ["|", "-fopenmp"])
        if not os.path.exists(os.path.join(directory, f"{full}.so")):
            return False
    return True


def build_extensions() -> dict:
    """Build (or load from the cache) every fused C++ extension now, instead of on first use.

    Returns ``{kernel: None}`` for each kernel that is ready, or ``{kernel: reason}`` for one that could
    not be built (its layers then run the reference loop). Takes about a minute per extension the first
    time, then well under a second.
    """
    status = {}
    for what, module in _extension_modules().items():
        status[what] = None if module.load_extension() is not None else (module._EXT_ERROR or "unknown error")
    return status
