"""How the fused operators are differentiated twice and batched by ``torch.func``.

The fused operators (:mod:`recnorm.kernels.fused`) have a hand-derived C++ backward, which computes
gradients but records no graph. Three pieces make the operators behave like any differentiable torch
operation:

**Double backward.** When autograd builds a graph of the backward itself (``create_graph=True``, which
turns grad mode on inside backward; ``torch.func.grad`` always does), the operator's backward does not call
the C++ backward. It recomputes the operator's outputs from its saved inputs with the reference loop
(:func:`operator_reference`, the oracle the kernels are tested against), and returns the gradients of
that recomputation with ``create_graph=True`` (:func:`recompute_grads`): functions of the inputs and of
the incoming gradients that autograd differentiates again, to any order. The recomputation starts from
views of the saved inputs, so each gradient is the operator's own (an input that another input depends on
is not counted twice) and the graph still reaches the inputs. Without a graph (ordinary training), the C++
backward runs as before. Population statistics that a step normalizes with are copied when the forward
runs (:func:`population_copy`; :func:`population_snapshot` gives each step's): the layer updates its
running statistics in place after the call, and the recomputation must see the values the forward saw. The recomputation also serves gradients
batched by torch's older vmap (``torch.autograd.grad(..., is_grads_batched=True)``,
``torch.autograd.functional.jacobian(..., vectorize=True)``, gradcheck's batched check), which a custom
operator cannot give a rule (:func:`recompute_reason`).

**vmap.** :func:`per_slice_vmap` is the operators' vmap rule (``torch.library.register_vmap``): it runs the
operator once per slice of the vmapped dimension and stacks the results. It is exact, whatever is batched
(input, states, weights, gradients); a batch-statistic norm takes its statistics within each slice, as
the operator would on that slice alone. It costs one kernel call per slice.

**torch.func.** torch's ``register_autograd`` wraps the backward in an ``autograd.Function`` without a
``setup_context``, which ``torch.func`` transforms refuse (pytorch/pytorch#168393). While a transform is
active, the layers therefore call the operator through :func:`functorch_function`, an
``autograd.Function`` with ``setup_context`` and a generated vmap rule whose forward is the operator and
whose backward is the operator's registered one. Outside transforms (eager, ``torch.jit.trace``,
``torch.compile``, ``torch.export``) the operator is called directly. Forward-mode transforms
(``torch.func.jvp``, ``jacfwd``) are not served: the operators have no forward derivative.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from recnorm.kernels import reference
from recnorm.kernels.cell_math import gru_step, lstm_step, rnn_step
from recnorm.kernels.contract import CellDesc, DirectionWork, NormDesc

__all__ = [
    "builds_graph",
    "recompute_reason",
    "operator_reference",
    "population_copy",
    "population_snapshot",
    "recompute_grads",
    "per_slice_vmap",
    "functorch_function",
    "plain_eager",
    "run",
    "OperatorCall",
]


def builds_graph() -> bool:
    """Whether the backward running now must record a graph (``create_graph=True``; autograd turns grad mode
    on inside backward exactly then). Tracing a backward for ``torch.compile`` does not."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def recompute_reason(grads: Sequence[Optional[Tensor]]) -> Optional[str]:
    """Why a fused operator's backward must differentiate the reference loop's recomputation instead of
    calling the C++ backward (None: it need not).

    * ``"graph"``: autograd builds a graph of this backward (double backward, ``torch.func.grad``);
    * ``"batched"``: the incoming gradients are batched by torch's older vmap
      (``torch.autograd.grad(..., is_grads_batched=True)``, ``torch.autograd.functional.jacobian(...,
      vectorize=True)``, gradcheck's batched check), which a custom operator cannot extend with a rule.
    """
    if builds_graph():
        return "graph"
    if any(g is not None and torch._C._functorch.is_legacy_batchedtensor(g) for g in grads):
        return "batched"
    return None


# ---------------------------------------------------------------------------------------------------
# The operators' math, recomputed by the reference loop from the operators' own arguments
# ---------------------------------------------------------------------------------------------------


def _rnn_step(act: Callable[[Tensor], Tensor]):
    def step(gi, gh, state, norm_c=None, carry=False, weight_hr=None):
        return rnn_step(act, gi, gh, state)

    return step


# The cell math the operators implement (torch.nn's LSTM, GRU and RNN cells), by the operators' codes: the
# same functions (kernels/cell_math.py) that recnorm.nn's built-in cells step with.
_CELLS = {
    "lstm": CellDesc("lstm", 4, 2, lstm_step),
    0: CellDesc("gru", 3, 1, gru_step),
    1: CellDesc("rnn_tanh", 1, 1, _rnn_step(torch.tanh)),
    2: CellDesc("rnn_relu", 1, 1, _rnn_step(torch.relu)),
}


def population_copy(pop: Sequence[Tensor], stat: Sequence[int]) -> List[Tensor]:
    """The population statistics of the batch-statistic sites, copied when the forward runs (the layer
    updates its buffers in place after the call): what :func:`population_snapshot` reads, which only a
    backward that recomputes needs to build (a clone per buffer here, instead of a dozen small operations
    per site in every training call)."""
    return [t.clone() if stat[k // 3] == 2 else t for k, t in enumerate(pop)]


def population_snapshot(pop: Sequence[Tensor], stat: Sequence[int], steps: int, step_offset: int) -> List[Tensor]:
    """The population statistics of every batch-statistic slot as the ``steps`` steps of this call read
    them (from the buffers as the call read them: :func:`population_copy`): per site ``(running_mean,
    running_var, num_batches_tracked)`` with one row per step (``(steps, F)``, slot ``t`` for step ``t``) and
    every slot tracked. With these and a step offset of 0 the reference loop normalizes exactly as the call
    did, whatever happens to the buffers afterwards."""
    out = list(pop)
    for k, code in enumerate(stat):
        if code != 2 or steps == 0:
            continue
        rm, rv, nbt = pop[3 * k : 3 * k + 3]
        # the slot each step reads: functional.slot_index's rule, min(step, last tracked slot), in tensor
        # operations without a device argument (which opcheck's schema check cannot inspect)
        positions = torch.ones_like(nbt).cumsum(0) - 1
        last = torch.where(nbt > 0, positions, -1).max()
        last = torch.where(last < 0, nbt.shape[0] - 1, last)
        index = torch.minimum(torch.arange(steps) + int(step_offset), last)
        out[3 * k : 3 * k + 3] = [rm.index_select(0, index), rv.index_select(0, index), nbt.new_ones(steps)]
    return out


def _norm(code: int, width: int, groups: Tuple[int, ...], center: int, eps: float, gain, shift, pop, batch_stats: bool):
    """A site's descriptor from the operator's per-site arguments (None where the site is not normalized)."""
    if code == 0:
        return None
    common = dict(num_features=width, center=bool(center), groups=groups, weight=gain, bias=shift, eps=float(eps))
    if code == 1:
        return NormDesc("row", **common)
    rm, rv, nbt = pop
    return NormDesc("step", **common, running_mean=rm, running_var=rv, num_batches_tracked=nbt, batch_stats=bool(batch_stats))


def _zone(z: Optional[Tensor], rows: int, dtype: torch.dtype):
    """The operator's zoneout argument as the reference loop reads it: per-row keep indicators (training), or
    the ``(1, H)`` rate row expanded to every row (eval; ``d * old + (1 - d) * new`` is the same mix)."""
    if z is None:
        return None
    z = z.to(dtype)
    return z if z.shape[0] == rows else z.expand(rows, z.shape[1])


def operator_reference(kind, x, batch_sizes, h0, c0, w_ih, w_hh, bias, b_hn, gains, shifts, pop, stat, center, eps,
                       batch_stats, joint, carry, one_group, zones) -> Tuple[Tensor, ...]:  # fmt: skip
    """``(out, h_n[, c_n])`` of a fused operator, computed by the reference loop from the operator's
    arguments (``kind``: ``"lstm"`` or the GRU/RNN operator's cell code; ``pop`` as
    :func:`population_snapshot` gives it, so the loop runs with step offset 0).

    The operators take every additive term already summed (``bias``: both biases and the gate norms'
    shifts; for the GRU, ``b_hn``: the recurrent n-block bias inside ``r * (.)``), so here ``bias`` is the
    input term's bias and ``b_hn`` the n block of the recurrent one."""
    if pop is None:
        raise RuntimeError(
            "recnorm: this fused operator ran under torch.compile or torch.jit.trace, whose graphs differentiate it "
            "once; differentiate its gradient (create_graph=True) in eager mode"
        )
    cell = _CELLS[kind]
    H = w_hh.shape[1]
    G = w_hh.shape[0]
    n_slots = 3 if kind == "lstm" else 2
    widths = (G, G, H)[:n_slots]
    groups = []
    for k in range(n_slots):
        if k == 2:
            groups.append((H,))
        elif kind == 0 and not one_group[k]:  # the GRU's (r, z) and n blocks
            groups.append((2 * H, H))
        else:
            groups.append((G,))
    descs = [_norm(stat[k], widths[k], groups[k], center[k], eps[k], gains[k], shifts[k], pop[3 * k : 3 * k + 3], batch_stats)
             for k in range(n_slots)]  # fmt: skip
    norms = {"gates": descs[0]} if joint else {"ih": descs[0], "hh": descs[1]}
    if n_slots == 3:
        norms["cell"] = descs[2]
    bias_hh = None
    if b_hn is not None:
        bias_hh = torch.cat([b_hn.new_zeros(2 * H), b_hn])
    work = DirectionWork(cell=cell, weight_ih=w_ih, weight_hh=w_hh, bias_ih=bias, bias_hh=bias_hh, norms=norms,
                         carry_cell_norm=bool(carry), zoneout=tuple(_zone(z, x.shape[0], x.dtype) for z in zones))  # fmt: skip
    state = (h0,) if c0 is None else (h0, c0)
    res = reference.run_direction(work, x, None if batch_sizes is None else batch_sizes.tolist(), state)
    return (res.output,) + tuple(res.state)


def recompute_grads(forward: Callable[..., Tuple[Tensor, ...]], inputs: Sequence[Optional[Tensor]], needs: Sequence[bool],
                    grads: Sequence[Optional[Tensor]], create_graph: bool) -> List[Optional[Tensor]]:  # fmt: skip
    """The gradients of ``forward(*inputs)``'s outputs with incoming gradients ``grads`` (None: no gradient)
    with respect to the inputs that ``needs`` marks; with ``create_graph``, as a graph that autograd
    differentiates again. None for the others and for unused inputs."""
    with torch.enable_grad():
        if create_graph:  # views, so that each gradient is this operator's own even if one input depends on another
            wrt = [t is not None and n and t.requires_grad for t, n in zip(inputs, needs)]
            args = [t.view_as(t) if w else t for t, w in zip(inputs, wrt)]
        else:  # no graph to keep: fresh leaves
            wrt = [t is not None and n for t, n in zip(inputs, needs)]
            args = [t.detach().requires_grad_(True) if w else t for t, w in zip(inputs, wrt)]
        outputs = forward(*args)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        targets = [a for a, w in zip(args, wrt) if w]
        if not pairs or not targets:
            return [None] * len(inputs)
        got = iter(torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs], create_graph=create_graph, allow_unused=True))
    return [next(got) if w else None for w in wrt]


# ---------------------------------------------------------------------------------------------------
# vmap and torch.func
# ---------------------------------------------------------------------------------------------------


def _slice(arg, dim, i: int):
    if dim is None:
        return arg
    if isinstance(arg, (list, tuple)):
        return [_slice(a, d, i) for a, d in zip(arg, dim)]
    return arg.select(dim, i).contiguous()


def per_slice_vmap(op) -> Callable:
    """A vmap rule for ``op`` (an operator returning a list of tensors): ``op`` on each slice of the vmapped
    dimension, outputs stacked along a new leading dimension."""

    def rule(info, in_dims, *args):
        results = [op(*(_slice(a, d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)]
        return [torch.stack(parts) for parts in zip(*results)], 0

    return rule


def _function_backward(backward: Callable, pop_index: int) -> Callable:
    """An ``autograd.Function``'s backward from an operator's registered ``backward``: the gradient of the
    ``Tensor[]`` argument at ``pop_index``, which a Function does not differentiate, is None."""

    def bwd(ctx, *grads):
        res = list(backward(ctx, grads))
        res[pop_index] = None
        return tuple(res)

    return bwd


def functorch_function(name: str, op, setup_context: Callable, backward: Callable, pop_index: int) -> type:
    """An ``autograd.Function`` that calls ``op`` and differentiates it with the operator's own
    ``setup_context`` and ``backward``, in the form ``torch.func`` accepts (``setup_context`` staticmethod,
    a generated vmap rule). ``pop_index``: the position of the operator's ``Tensor[]`` argument, which an
    ``autograd.Function`` does not differentiate (its gradient is None)."""

    def forward(*args):
        return tuple(op(*args))

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, list(output))

    return type(name, (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup),
        "backward": staticmethod(_function_backward(backward, pop_index)),
    })  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# How the layers call an operator
# ---------------------------------------------------------------------------------------------------

_PLAIN = (Tensor, torch.nn.Parameter)


def plain_eager(args: Sequence) -> bool:
    """Whether a call with these arguments may run an operator's CPU kernel (the Python function registered
    as its implementation) directly: plain eager execution, in which the dispatcher would do nothing but
    call that kernel. Not while compiling, tracing, under a ``torch.func`` transform, a torch function or
    dispatch mode (``FakeTensorMode``, export's tracing, ``with torch.device(...)``, ``FlopCounterMode``),
    the autograd profiler (whose trace then names the operators), or with a tensor that is not torch's own
    (a subclass, at the top level or in a list argument)."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._autograd._profiler_enabled()
    ):
        return False
    for a in args:
        if isinstance(a, (list, tuple)):
            if any(isinstance(t, Tensor) and type(t) not in _PLAIN for t in a):
                return False
        elif isinstance(a, Tensor) and type(a) not in _PLAIN:
            return False
    return True


def run(op, cpu: Callable, *args):
    """``op(*args)``, or its CPU kernel ``cpu(*args)`` itself where :func:`plain_eager` allows (the same
    kernel and the same bits, without the dispatcher's Python wrapping of a custom operator)."""
    return cpu(*args) if plain_eager(args) else op(*args)


def _eager_function(name: str, cpu: Callable, setup_context: Callable, backward: Callable, pop_index: int) -> type:
    """An ``autograd.Function`` whose forward runs the CPU kernel ``cpu`` and then the operator's
    ``setup_context``, differentiated by the operator's ``backward`` (as :func:`functorch_function`, but in the
    older form with the context as ``forward``'s first argument: ``Function.apply`` binds the arguments of a
    ``forward`` with a separate ``setup_context`` to its signature in every call, about 25 µs here)."""

    def forward(ctx, *args):
        out = cpu(*args)
        setup_context(ctx, args, out)
        return tuple(out)

    bwd = _function_backward(backward, pop_index)
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(bwd)})


class OperatorCall:
    """How the layers call one fused operator ``op`` (``torch.ops.recnorm.*``, an ``OpOverloadPacket``) whose
    CPU kernel is the Python function ``cpu`` and whose autograd is ``setup_context`` and ``backward``
    (registered on the operator with ``register_autograd``; ``pop_index``: see :func:`functorch_function`).

    * While a ``torch.func`` transform is active (and not compiling or tracing): through an
      ``autograd.Function`` that calls the operator, in the form the transforms accept.
    * Plain eager execution (:func:`plain_eager`): the CPU kernel itself, through an ``autograd.Function``
      with the operator's own ``setup_context`` and ``backward`` where autograd records the call, as the
      operator's registered autograd would. torch.library's Python wrapping of a custom operator with
      autograd (argument defaults filled from the schema, list arguments flattened, a redispatch) costs
      about 170 µs per training call and 35 µs per eval call on a 2-core CPU: a few percent of a small
      layer's step, for nothing an eager call needs. The backward likewise calls the backward operator's
      CPU kernel directly (:func:`run`).
    * Otherwise (``torch.compile``, ``torch.export``, ``torch.jit.trace``, fake tensors, modes, subclasses,
      the profiler): the operator, through the dispatcher.
    """

    def __init__(self, name: str, op, cpu: Callable, setup_context: Callable, backward: Callable, pop_index: int):
        self.op, self.cpu = op, cpu
        self.functorch = functorch_function(name + "Function", op.default, setup_context, backward, pop_index)
        self.eager = _eager_function(name + "Eager", cpu, setup_context, backward, pop_index)

    def __call__(self, *args) -> List[Tensor]:
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing() and torch._C._are_functorch_transforms_active():
            return list(self.functorch.apply(*args))
        if plain_eager(args):
            if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
                return list(self.eager.apply(*args))
            return self.cpu(*args)
        return self.op(*args)
