"""Diagnostics: gradient flow through time, batch and population statistics, exact population passes.

* :func:`capture` records, inside a ``with`` block, every recurrent layer's hidden states and every
  batch norm's per-step batch statistics; after ``loss.backward()`` it reports ``||dL/dh_t||`` for
  every step t (the total gradient, through the output and through the recurrence).
* :func:`population_stats` reads the per-step running statistics of every batch norm.
* :func:`calibrate` (also :func:`recompute_population_statistics`) replaces running averages by exact
  statistics from a pass over given batches (the procedure Cooijmans et al. used for their results).
* :func:`running_averages` marks an evaluation on the running averages as deliberate (no warning).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from recnorm.nn.norms import RecurrentBatchNorm
from recnorm.nn.rnn import RecurrentBase

__all__ = ["capture", "Capture", "population_stats", "recompute_population_statistics", "calibrate",
           "running_averages"]

log = logging.getLogger(__name__)


def _layer_name(name: str, module: nn.Module) -> str:
    return name or type(module).__name__.lower()


class Capture:
    """What :func:`capture` recorded during the last forward pass inside its block."""

    def __init__(self) -> None:
        self._hidden: Dict[str, List[Tensor]] = {}
        self._batch_stats: Dict[str, List[Tuple[int, Tensor, Tensor]]] = {}

    # called by the layers ------------------------------------------------------------------------
    def _observer(self, prefix: str):
        def make(layer: RecurrentBase, index: int, direction: int, batch_sizes) -> Callable[[int, Tensor], None]:
            key = f"{prefix}.l{index}" + ("_reverse" if direction == 1 else "")
            steps: List[Tensor] = []
            self._hidden[key] = steps

            def on_output(t: int, h: Tensor) -> None:
                if h.requires_grad:
                    h.retain_grad()
                steps.append(h)

            return on_output

        return make

    def _stats_observer(self, key: str):
        self._batch_stats[key] = []

        def observe(step: int, mean: Tensor, var: Tensor, n: int) -> None:
            self._batch_stats[key].append((step, mean, var))

        return observe

    def _reset_stats(self, keys: Iterable[str]) -> None:
        for key in keys:
            if key in self._batch_stats:
                self._batch_stats[key].clear()

    # results ---------------------------------------------------------------------------------------
    def hidden_states(self) -> Dict[str, List[Tensor]]:
        """Per layer/direction, the list of ``h_t`` tensors (valid rows only) of the last forward."""
        return dict(self._hidden)

    def hidden_grad_norms(self) -> Dict[str, Tensor]:
        """Per layer/direction: ``(T,)`` mean over valid sequences of ``||dL/dh_t||_2``.

        Call after ``backward()``. Steps whose state received no gradient report 0. For a reverse
        direction, index t counts from each sequence's end (the order in which that direction runs).
        """
        out = {}
        for key, steps in self._hidden.items():
            norms = []
            for h in steps:
                g = h.grad
                norms.append(0.0 if g is None else float(g.detach().norm(dim=1).mean()))
            out[key] = torch.tensor(norms, dtype=torch.float64)
        return out

    def batch_stats(self) -> Dict[str, Dict[str, Tensor]]:
        """Per batch-norm module: ``{"step": (K,), "mean": (K, F), "var": (K, F)}`` for the K training
        calls of the last forward (one per step for per-step and shared BN, one for sequence-wise BN)."""
        out = {}
        for key, rows in self._batch_stats.items():
            if not rows:
                continue
            out[key] = {
                "step": torch.tensor([r[0] for r in rows]),
                "mean": torch.stack([r[1] for r in rows]),
                "var": torch.stack([r[2] for r in rows]),
            }
        return out


@contextlib.contextmanager
def capture(model: nn.Module) -> Iterator[Capture]:
    """Record hidden states and batch statistics of every recnorm layer inside ``model``.

    Example::

        with recnorm.diagnostics.capture(model) as cap:
            loss = criterion(model(x)[0], y)
            loss.backward()
        grads = cap.hidden_grad_norms()   # {"rnn.l0": tensor of shape (T,), ...}

    Each new forward inside the block replaces the previous record.
    """
    cap = Capture()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, RecurrentBase)]
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, RecurrentBatchNorm)]
    hooks = []
    try:
        keys = {}
        for name, bn in norms:
            keys[bn] = _layer_name(name, bn)
            obs = cap._stats_observer(keys[bn])
            bn._observers.append(obs)
            hooks.append((bn, obs))
        for name, layer in layers:
            layer._step_observer = cap._observer(_layer_name(name, layer))
            # a new forward of a layer starts a new record of its norms' batch statistics
            own = [keys[m] for m in layer.modules() if m in keys]
            hooks.append(layer.register_forward_pre_hook(lambda *_, own=own: cap._reset_stats(own)))
        yield cap
    finally:
        for name, layer in layers:
            layer._step_observer = None
        for h in hooks:
            if isinstance(h, tuple):
                h[0]._observers.remove(h[1])
            else:
                h.remove()


def population_stats(model: nn.Module) -> Dict[str, Dict[str, Tensor]]:
    """Running statistics of every batch norm in ``model``:
    ``{name: {"mean": (S, F), "var": (S, F), "tracked": (S,)}}``, slot s = time step s."""
    return {
        _layer_name(n, m): {
            "mean": m.running_mean.detach().clone(),
            "var": m.running_var.detach().clone(),
            "tracked": m.num_batches_tracked.detach().clone(),
        }
        for n, m in model.named_modules()
        if isinstance(m, RecurrentBatchNorm)
    }


def _default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(x)`` for a batch ``x``, or for the first element of a tuple or list ``(x, y, ...)``, as a
    ``DataLoader`` yields them (labels and anything after ``x`` are not inputs of the model)."""
    packed = nn.utils.rnn.PackedSequence  # a tuple itself: it is x, not (x, y)
    x = batch[0] if isinstance(batch, (tuple, list)) and not isinstance(batch, packed) and batch else batch
    if not isinstance(x, (Tensor, packed)):
        raise TypeError(
            "calibrate: expected batches that are an input tensor x (or PackedSequence), or a tuple or list whose "
            f"first element is x, such as (x, y) from a DataLoader; got {_describe(batch)}. For anything else, "
            "pass forward_fn=lambda model, batch: model(...)"
        )
    return model(x)


def _describe(batch: Any) -> str:
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(type(b).__name__ for b in batch[:4]) + (", ..." if len(batch) > 4 else "")
        return f"a {type(batch).__name__} of ({inner})"
    return f"a {type(batch).__name__}"


@torch.no_grad()
def recompute_population_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> int:
    """Replace every batch norm's running statistics by exact population statistics.

    Runs ``forward_fn(model, batch)`` (default ``model(x)``, where ``x`` is the batch itself or the
    first element of a tuple or list such as a ``DataLoader``'s ``(x, y)``) on each batch with batch norms normalizing by batch statistics, as in training, and everything else
    in eval mode (no dropout). Each time-step slot then holds the mean and unbiased variance of all
    valid rows it saw, pooled over the whole pass; slots that saw nothing are reset, so eval reuses
    the last slot seen. The model's train/eval modes are restored afterwards.

    Returns:
        The number of batches used.
    """
    forward_fn = forward_fn or _default_forward
    bns = [m for m in model.modules() if isinstance(m, RecurrentBatchNorm)]
    modes = {m: m.training for m in model.modules()}
    n = 0
    try:
        model.eval()
        for bn in bns:
            bn.train()
            bn.begin_population_pass()
        for batch in batches:
            forward_fn(model, batch)
            n += 1
        if n == 0:
            raise ValueError("recompute_population_statistics needs at least one batch, got none")
        for bn in bns:
            bn.end_population_pass()
    finally:
        for bn in bns:
            bn.abort_population_pass()
        for m, mode in modes.items():
            m.training = mode
    log.debug("recomputed population statistics of %d batch norms from %d batches", len(bns), n)
    return n


def calibrate(model: nn.Module, batches: Iterable[Any], forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None) -> int:
    """Store exact population statistics in every batch norm of ``model``: call it after training and
    before evaluating a batch-normalized model.

    Running averages lag weights that keep moving, and a recurrent network compounds the error over the
    steps (``docs/eval_statistics.md``: 0.59 against 0.87 validation accuracy on sequential digits).
    ``calibrate`` runs ``forward_fn(model, batch)`` on each of ``batches`` with batch statistics and no
    dropout, and stores, per time step, the
    mean and unbiased variance of every valid row it saw. A few hundred rows (for example 4 training
    batches of 64) are enough. The model's train/eval modes are restored. Returns the number of batches.

    Batches: by default each batch is the model's input ``x``, or a tuple or list whose first element is
    ``x`` (the ``(x, y)`` of a ``DataLoader(TensorDataset(x, y))``; the rest is ignored), and the model is
    called as ``model(x)``. Anything else (several inputs, a dict, lengths) needs ``forward_fn``, which
    receives the model and the batch as the loader yields it, for example
    ``forward_fn=lambda model, batch: model(batch["x"], batch["h0"])``; other batches raise TypeError
    saying so.

    Example::

        recnorm.calibrate(model, itertools.islice(train_loader, 8))   # (x, y) batches
        model.eval()
    """
    return recompute_population_statistics(model, batches, forward_fn)


@contextlib.contextmanager
def running_averages(model: nn.Module) -> Iterator[None]:
    """Evaluate on the batch norms' running averages on purpose: inside the block, evaluating a model
    whose running averages training moved since the last :func:`calibrate` logs no warning (for example
    to measure what plain ``.eval()`` gives against calibrated statistics). The warning stays armed for
    evaluations after the block."""
    bns = [m for m in model.modules() if isinstance(m, RecurrentBatchNorm)]
    flags = [bn._updated_since_calibration for bn in bns]
    for bn in bns:
        bn._updated_since_calibration = False
    try:
        yield
    finally:
        for bn, flag in zip(bns, flags):
            bn._updated_since_calibration = bn._updated_since_calibration or flag
