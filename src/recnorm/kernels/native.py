"""Fast path through torch's own fused RNN kernels (oneDNN/MKL on CPU, cuDNN on CUDA).

It serves every direction whose recurrence is torch.nn's exactly:

* no normalization: the same ATen op ``torch.nn.LSTM`` calls, on one direction of one layer;
* sequence-wise BN of ``W_ih x`` (and nothing else): an affine map per gate feature with batch-wide
  statistics, which :func:`recnorm.kernels.functional.fold_sequence_norm` folds into the input weights
  (autograd differentiates through the fold, so the gradients are those of the reference loop).

Two entry points: :func:`run_direction` calls the ATen op directly (eager mode: autograd uses ATen's own
backward), and the registered operator ``torch.ops.recnorm.native_rnn`` wraps the same call with a fake
kernel whose shapes follow symbolic T and B, for ``torch.compile`` and ``torch.jit.trace``. The
operator's registered backward recomputes the forward under autograd, as ATen exposes no backward of its
fused CPU RNN op; under ``torch.compile`` recnorm runs it without autograd only (inference). A compiled
training step of an LSTM that torch's op runs through oneDNN calls ``torch.ops.recnorm.native_lstm_train``
instead (:func:`compiled_training`): oneDNN's LSTM layer, whose workspace goes to oneDNN's own backward,
as in eager mode; the fused kernels serve the other compiled training steps.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from recnorm.kernels.contract import DirectionResult, DirectionWork
from recnorm.kernels.functional import fold_sequence_norm

__all__ = ["supports", "run_direction", "run_plain_stack", "folded_stack", "grad_needed", "compiled_training"]

NAME = "native"
#: The dtypes torch's RNN ops take.
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_OPS = {"lstm": "lstm", "gru": "gru", "rnn_tanh": "rnn_tanh", "rnn_relu": "rnn_relu"}


def supports(work: DirectionWork, x: Tensor, batch_sizes: Optional[Tensor], mode: str) -> Optional[str]:
    if work.cell.kind not in _OPS:
        return "it computes torch.nn's LSTM, GRU and RNN cells only"
    if work.on_output is not None:
        return "it does not report per-step outputs (diagnostics capture)"
    if work.has_zoneout:
        return "it does not zone out states (zoneout)"
    norms = work.present_norms()
    if set(norms) - {"ih"} or ("ih" in norms and norms["ih"].stat != "sequence"):
        return "it serves norm=None and sequence-wise batch norm of the input term only"
    if "ih" in norms and norms["ih"].sync and norms["ih"].batch_stats:
        return "it does not synchronize batch statistics across processes"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype}"
    if _vmapped():
        return "torch's fused RNN op has no vmap rule (torch.func.vmap)"
    return None


def _vmapped() -> bool:
    """Whether this runs under ``torch.func.vmap`` (torch's RNN ops, like ``torch.nn.LSTM``, fail there)."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == torch._C._functorch.TransformType.Vmap for i in retrieve_all_functorch_interpreters())


# ---------------------------------------------------------------------------------------------------
# The ATen call
# ---------------------------------------------------------------------------------------------------


def _aten(kind: str, x: Tensor, batch_sizes: Optional[Tensor], hx: List[Tensor], weights: List[Tensor], has_bias: bool, train: bool):
    """torch's fused RNN op on one layer and direction; returns ``(out, [h_n, (c_n)])`` with ``out``
    ``(T, B, H')`` for a full batch ``x`` ``(T, B, F)``, or ``(N, H')`` for packed rows."""
    op = _op(kind)
    states = [s.unsqueeze(0) for s in hx]  # (1, B, ·): one layer, one direction
    hx_arg = tuple(states) if kind == "lstm" else states[0]
    if batch_sizes is None:  # x: (T, B, F)
        res = op(x, hx_arg, weights, has_bias, 1, 0.0, train, False, False)
        out = res[0]
    else:
        res = op(x, batch_sizes, hx_arg, weights, has_bias, 1, 0.0, train, False)
        out = res[0]
    return out, [r.squeeze(0) for r in res[1:]]


def _weights(work: DirectionWork) -> Tuple[List[Tensor], bool]:
    has_bias = work.bias_ih is not None
    weights = [work.weight_ih, work.weight_hh] + ([work.bias_ih, work.bias_hh] if has_bias else [])
    if work.weight_hr is not None:
        weights.append(work.weight_hr)
    return weights, has_bias


def run_direction(
    work: DirectionWork, x: Tensor, batch_sizes: Optional[Tensor], state: Tuple[Tensor, ...], as_op: bool = False
) -> DirectionResult:
    """One direction through torch's op: directly (``as_op=False``) or through the registered operator."""
    work, moments = fold_sequence_norm(work, x)
    weights, has_bias = _weights(work)
    if as_op and torch.compiler.is_compiling() and grad_needed(x, weights, state) and \
            compiled_training(work, x, batch_sizes) is None:
        res = torch.ops.recnorm.native_lstm_train(x, state[0], state[1], weights, has_bias)
        out, finals = res[0], (res[1], res[2])
    elif as_op:
        res = torch.ops.recnorm.native_rnn(x, batch_sizes, list(state), weights, work.cell.kind, has_bias)
        out, finals = res[0], tuple(res[1 : 1 + len(state)])
    else:
        out, finals = _aten(work.cell.kind, x, batch_sizes, list(state), weights, has_bias, grad_needed(x, weights, state))
        finals = tuple(finals)
    return DirectionResult(out, finals, moments)


def run_plain_stack(kind: str, x: Tensor, state: Sequence[Tensor], weights: List[Tensor], layers: int,
                    has_bias: bool) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """A unidirectional stack of ``layers`` layers without norms through torch's op in eager mode, layer after
    layer exactly as :func:`run_direction` runs each (the same calls on the same tensors), with the states in
    torch.nn's layout, ``(layers, B, H')`` each, and ``weights`` torch.nn's ``_flat_weights``: ``(out, final
    states (layers, B, H') each)``. What a plain layer's lean path (``RecurrentBase._lean_forward``) runs."""
    op, per = _op(kind), len(weights) // layers
    ends = []
    for layer in range(layers):
        hx = list(state) if layers == 1 else [s[layer : layer + 1] for s in state]  # (1, B, ·), as _aten makes them
        w = weights[layer * per : (layer + 1) * per]
        res = op(x, tuple(hx) if kind == "lstm" else hx[0], w, has_bias, 1, 0.0, grad_needed(x, w, hx), False, False)
        x = res[0]
        ends.append(res[1:])
    return x, ends[0] if layers == 1 else tuple(torch.cat([e[i] for e in ends]) for i in range(len(state)))


def folded_stack(works: Sequence[DirectionWork], x: Tensor) -> Optional[Tuple[List[Tensor], bool]]:
    """The flat weights (torch.nn's ``_flat_weights`` order) and ``has_bias`` of a unidirectional stack whose
    layers' only norm is a sequence-wise BN of the input term on population statistics (eval), folded into
    the input weights by :func:`fold_sequence_norm` exactly as :func:`run_direction` folds each layer: what
    :func:`run_plain_stack` then runs. None where a layer has any other norm, would take batch statistics
    (which depend on the layer's input, not ``x``), or where the layers' biases differ."""
    weights: List[Tensor] = []
    flags = set()
    for work in works:
        norms = work.present_norms()
        d = norms.get("ih")
        if set(norms) != {"ih"} or d.stat != "sequence" or d.batch_stats:
            return None
        folded, _ = fold_sequence_norm(work, x)
        w, has_bias = _weights(folded)
        weights += w
        flags.add(has_bias)
    if len(flags) != 1:
        return None
    return weights, flags.pop()


def grad_needed(x: Tensor, weights: Sequence[Tensor], state: Sequence[Tensor]) -> bool:
    """Whether autograd needs this call's graph; torch's op's ``train`` (keep what backward needs: oneDNN,
    cuDNN; dropout is 0 either way)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights) or any(s.requires_grad for s in state))


@functools.lru_cache(maxsize=None)
def _op(kind: str):
    """torch's RNN op of ``kind`` (looked up once: ``torch._VF``'s attribute lookup is slow)."""
    return getattr(torch._VF, _OPS[kind])


# ---------------------------------------------------------------------------------------------------
# The registered operator
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("recnorm::native_rnn", mutates_args=())
def _native_rnn(
    x: Tensor, batch_sizes: Optional[Tensor], hx: List[Tensor], weights: List[Tensor], kind: str, has_bias: bool
) -> List[Tensor]:
    """``[out, h_n (B, H'), (c_n (B, H))]`` of torch's fused RNN op on one direction."""
    with torch.no_grad():
        out, finals = _aten(kind, x, batch_sizes, hx, weights, has_bias, False)
    return [out.contiguous()] + [f.contiguous() for f in finals]


@_native_rnn.register_fake
def _native_rnn_fake(x, batch_sizes, hx, weights, kind, has_bias):
    # W_hh is (G*H, H'): its width is the output's (the projection's size with proj_size)
    return [x.new_empty(tuple(x.shape[:-1]) + (weights[1].shape[1],))] + [s.new_empty(s.shape) for s in hx]


def _native_setup(ctx, inputs, output):
    x, batch_sizes, hx, weights, kind, has_bias = inputs
    ctx.kind, ctx.has_bias, ctx.n_hx, ctx.batch_sizes = kind, has_bias, len(hx), batch_sizes
    ctx.save_for_backward(x, *hx, *weights)


def _native_backward(ctx, grads):
    """Gradients by recomputing the forward under autograd (ATen exposes no backward of its fused CPU RNN
    op). recnorm differentiates through this operator only outside torch.compile (in a traced module
    being trained); compiled training runs the fused kernels. When autograd builds a graph of this
    backward (``create_graph=True``), the recomputation starts from views of the saved inputs instead of
    detached copies and keeps its graph, so the gradients are differentiable again."""
    saved = ctx.saved_tensors
    graph = torch.is_grad_enabled() and not torch.compiler.is_compiling()
    leaves = [t.view_as(t) if graph and t.requires_grad else t.detach().requires_grad_(True) for t in saved]
    n_hx = ctx.n_hx
    with torch.enable_grad():
        out, finals = _aten(ctx.kind, leaves[0], ctx.batch_sizes, leaves[1 : 1 + n_hx], leaves[1 + n_hx :], ctx.has_bias, True)
        got = torch.autograd.grad([out] + list(finals), leaves, list(grads), allow_unused=True, create_graph=graph)
    got = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, got)]
    return got[0], None, list(got[1 : 1 + n_hx]), list(got[1 + n_hx :]), None, None


_native_rnn.register_autograd(_native_backward, setup_context=_native_setup)


# ---------------------------------------------------------------------------------------------------
# The registered training operator of the LSTM (torch.compile with autograd)
# ---------------------------------------------------------------------------------------------------

_MKLDNN_LSTM = 2  # oneDNN's RNN mode number of the LSTM (ATen's mkldnn_rnn_layer)
_MKLDNN_BUILT = torch.backends.mkldnn.is_available()  # asked once: torch.compile does not trace the question


def compiled_training(work: DirectionWork, x: Tensor, batch_sizes: Optional[Tensor]) -> Optional[str]:
    """None where ``recnorm::native_lstm_train`` serves this direction in a compiled training step, else why
    not. It is the call torch's LSTM op makes on CPU through oneDNN (``aten::mkldnn_rnn_layer``), with
    oneDNN's own backward (``aten::mkldnn_rnn_layer_backward``) on the workspace the forward returns, so a
    compiled step computes what the eager one does, bit for bit. oneDNN serves it where torch's op uses
    oneDNN: an LSTM without a projection, a full batch (T, B, F) in float32 on the CPU. (Switched off with
    ``torch.backends.mkldnn.flags(enabled=False)``, eager mode runs torch's op without oneDNN, and the two
    steps then differ by rounding.)"""
    if work.cell.kind != "lstm":
        return "torch's oneDNN RNN layer computes the LSTM only"
    if batch_sizes is not None or x.dim() != 3:
        return "packed sequences run torch's op without oneDNN"
    if work.weight_hr is not None:
        return "oneDNN's RNN layer has no projection (proj_size)"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return f"it serves float32 on the CPU (got {x.dtype} on {x.device.type})"
    if not _MKLDNN_BUILT:
        return "this torch has no oneDNN"
    return None


def _lstm_args(weights: List[Tensor], has_bias: bool) -> List[Tensor]:
    w_ih, w_hh = weights[0], weights[1]
    if has_bias:
        return [w_ih, w_hh, weights[2], weights[3]]
    zero = w_ih.new_zeros(w_ih.shape[0])  # as torch's op passes a layer without biases
    return [w_ih, w_hh, zero, zero]


@torch.library.custom_op("recnorm::native_lstm_train", mutates_args=())
def _native_lstm_train(x: Tensor, h0: Tensor, c0: Tensor, weights: List[Tensor], has_bias: bool) -> List[Tensor]:
    """``[out (T, B, H), h_n (B, H), c_n (B, H), workspace]`` of oneDNN's LSTM layer in training mode."""
    w_ih, w_hh, b_ih, b_hh = _lstm_args(weights, has_bias)
    with torch.enable_grad():  # the op returns its workspace only where autograd is on
        out, hy, cy, ws = torch.ops.aten.mkldnn_rnn_layer(x, w_ih, w_hh, b_ih, b_hh, h0, c0, False, [], _MKLDNN_LSTM,
                                                          w_hh.shape[1], 1, has_bias, False, False, True)
    return [out, hy, cy, ws]


@_native_lstm_train.register_fake
def _native_lstm_train_fake(x, h0, c0, weights, has_bias):
    # the workspace's size is oneDNN's to choose: a size known only when the op runs
    size = torch.library.get_ctx().new_dynamic_size()
    return [x.new_empty((x.shape[0], x.shape[1], weights[1].shape[1])), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            x.new_empty((size,), dtype=torch.uint8)]


@torch.library.custom_op("recnorm::native_lstm_train_backward", mutates_args=())
def _native_lstm_train_backward(x: Tensor, h0: Tensor, c0: Tensor, weights: List[Tensor], has_bias: bool, out: Tensor,
                                hy: Tensor, cy: Tensor, d_out: Optional[Tensor], d_hy: Optional[Tensor],
                                d_cy: Optional[Tensor], workspace: Tensor) -> List[Tensor]:
    """``[dx, dW_ih, dW_hh, db_ih, db_hh, dh0, dc0]``: oneDNN's backward of :func:`_native_lstm_train`."""
    w_ih, w_hh, b_ih, b_hh = _lstm_args(weights, has_bias)
    res = torch.ops.aten.mkldnn_rnn_layer_backward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, out, hy, cy, d_out, d_hy, d_cy,
                                                   False, _MKLDNN_LSTM, w_hh.shape[1], 1, has_bias, True, False, [],
                                                   False, workspace)
    return [t.contiguous() for t in res]


@_native_lstm_train_backward.register_fake
def _native_lstm_train_backward_fake(x, h0, c0, weights, has_bias, out, hy, cy, d_out, d_hy, d_cy, workspace):
    w_ih = weights[0]
    return [x.new_empty(x.shape), w_ih.new_empty(w_ih.shape), weights[1].new_empty(weights[1].shape),
            w_ih.new_empty(w_ih.shape[:1]), w_ih.new_empty(w_ih.shape[:1]), h0.new_empty(h0.shape),
            c0.new_empty(c0.shape)]


def _lstm_train_setup(ctx, inputs, output):
    x, h0, c0, weights, has_bias = inputs
    ctx.has_bias, ctx.n_w = has_bias, len(weights)
    ctx.save_for_backward(x, h0, c0, *weights, *output)
    ctx.mark_non_differentiable(output[3])  # the workspace
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: oneDNN takes None (no zeros to fill)


def _lstm_train_grad(ctx, grads):
    """oneDNN's backward on the saved workspace. It is not differentiable again: a graph of this backward
    (``create_graph=True``, which torch.compile does not support either) raises instead of being wrong."""
    saved = ctx.saved_tensors
    x, h0, c0 = saved[:3]
    weights = list(saved[3 : 3 + ctx.n_w])
    out, hy, cy, ws = saved[3 + ctx.n_w :]
    d_out, d_hy, d_cy = grads[:3]
    dx, dw_ih, dw_hh, db_ih, db_hh, dh0, dc0 = _native_lstm_train_backward(x, h0, c0, weights, ctx.has_bias, out, hy,
                                                                          cy, d_out, d_hy, d_cy, ws)
    d_weights = [dw_ih, dw_hh] + ([db_ih, db_hh] if ctx.has_bias else [])
    return dx, dh0, dc0, d_weights, None


_native_lstm_train.register_autograd(_lstm_train_grad, setup_context=_lstm_train_setup)
