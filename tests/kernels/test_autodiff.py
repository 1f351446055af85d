"""Every cell x norm differentiates twice and works under torch.func, on the fused kernels as on the reference loop:
gradgradcheck in float64 (kernel="fused" and "auto"); a gradient-penalty training step identical to the reference
loop's (packed input, so that single-row steps read population statistics that the step then updates); the graph
backward agrees with the C++ backward; vmap(grad) per-sample (per mini-batch) gradients equal a loop of ordinary
backward calls; gradcheck's batched-gradient check; vmap over stacked weights; and no import circle in kernels/."""

import ast
import copy
import itertools
import pathlib

import pytest
import torch
from torch.func import functional_call, grad, vmap
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from recnorm import kernels
from recnorm.kernels import autodiff, fused
from registry_cases import CELL_IDS, DT, NORM_IDS, batch_norms, case_id, make, randomize

# recnorm.nn's running-statistics update under vmap uses index_copy_, for which torch warns of a slow fallback
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

CASES = list(itertools.product(CELL_IDS, NORM_IDS))
LENGTHS = torch.tensor([5, 2, 4, 1])  # steps 2..3 and 4: few valid rows, step 4 a single one


def _layer(cell, norm, kernel, hidden=3, **kw):
    torch.manual_seed(0)
    m = make(cell, 2, hidden, norm=norm, dtype=DT, kernel=kernel, **kw)
    randomize(m)
    return m


def _as_function(m, lengths=None):
    """``f(x, *params)``: the layer's output and final state(s), with the given parameters."""
    names = [n for n, _ in m.named_parameters()]

    def f(x, *params):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
        out, state = functional_call(m, dict(zip(names, params)), (inp,))
        out = pad_packed_sequence(out)[0] if lengths is not None else out
        return (out,) + (state if isinstance(state, tuple) else (state,))

    return f


def _leaves(m, x):
    return (x.clone().requires_grad_(True),) + tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())


def _uses(m, x, name):
    """Whether the layer's first direction runs on implementation ``name`` for this input (with autograd)."""
    state = tuple(torch.zeros(x.shape[1], s[-1], dtype=DT, requires_grad=True) for s in m._state_shapes(x.shape[1]))
    return kernels.choose(m.direction_work(0, 0), x, None, state, m.kernel)[0] == name


# ---------------------------------------------------------------------------------------------------
# Double backward
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell,norm,kernel", [
    pytest.param(c, n, k, id=case_id(c, n, k)) for (c, n), k in itertools.product(CASES, ["fused", "auto"])
])  # fmt: skip
def test_gradgradcheck_every_cell_and_norm(cell, norm, kernel):
    m = _layer(cell, norm, kernel)
    # 4 rows: batch norm of 3 rows of this seed has a feature whose spread is small enough for finite
    # differences to fail on the reference loop too
    x = torch.randn(4, 4, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    if kernel == "fused" or norm not in (None, "sequence_batch"):
        assert _uses(m, x, "fused")  # auto picks torch's op or the fused kernel for the other two
    assert torch.autograd.gradgradcheck(_as_function(m), _leaves(m, x), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("cell,norm,mode", [
    pytest.param(c, n, md, id=case_id(c, n, md)) for (c, n), md in itertools.product(CASES, ["train", "eval"])
])  # fmt: skip
def test_graph_backward_equals_the_kernels_backward(cell, norm, mode):
    """With create_graph=True the gradients come from the reference loop's recomputation; they equal the C++
    backward's (packed input: single-row steps on population statistics)."""
    m = _layer(cell, norm, "fused")
    m.train(mode == "train")
    f = _as_function(m, LENGTHS)
    x = torch.randn(5, 4, 2, dtype=DT)
    start = copy.deepcopy(m.state_dict())
    got = []
    for create_graph in (False, True):
        m.load_state_dict(start)  # the same running statistics for both calls
        leaves = _leaves(m, x)
        outs = f(*leaves)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=DT).view_as(o)).sum() for o in outs)
        got.append(torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True))
    for u, v in zip(*got):
        if u is None:
            assert v is None or not v.any()
            continue
        torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-11)
        assert v.requires_grad or not u.requires_grad


def test_the_fast_backward_runs_unless_a_graph_is_built(monkeypatch):
    m = _layer("lstm", "layer", "fused")
    x = torch.randn(5, 3, 2, dtype=DT, requires_grad=True)
    calls = []
    real = autodiff.operator_reference
    monkeypatch.setattr(autodiff, "operator_reference", lambda *a: calls.append(1) or real(*a))
    torch.autograd.grad(m(x)[0].sum(), x)
    assert calls == []
    (g,) = torch.autograd.grad(m(x)[0].square().sum(), x, create_graph=True)
    assert calls == [1] and g.requires_grad


@pytest.mark.parametrize("cell,norm,packed", [
    pytest.param(c, n, p, id=case_id(c, n, "packed" if p else "full")) for (c, n), p in itertools.product(CASES, [True, False])
])  # fmt: skip
def test_gradient_penalty_training_step_matches_reference(cell, norm, packed):
    """One SGD step on loss + |d loss / d x|^2 (a gradient penalty): the fused kernel (and auto) and the reference
    loop give the same parameters and running statistics afterwards. Packed input has steps of one row, which read
    population statistics that the step then updates (the forward keeps a copy of them); a full batch reads none
    (the forward keeps the buffers uncopied)."""
    x = torch.randn(5, 4, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    results = []
    for kernel in ("reference", "fused", "auto"):
        m = _layer(cell, norm, kernel, hidden=4)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        xl = x.clone().requires_grad_(True)
        if packed:
            out, _ = m(pack_padded_sequence(xl, LENGTHS, enforce_sorted=False))
            out = pad_packed_sequence(out)[0]
        else:
            out, _ = m(xl)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=DT).view_as(out)).sum()
        (gx,) = torch.autograd.grad(loss, xl, create_graph=True)
        (loss + gx.square().sum()).backward()
        opt.step()
        results.append([p.detach().clone() for p in m.parameters()] + [b.clone() for b in m.buffers()])
    for other in results[1:]:
        for u, v in zip(results[0], other):
            torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell", CELL_IDS)
def test_triple_backward_matches_reference(cell):
    """The recomputation's gradients are ordinary autograd graphs: a third derivative works too."""
    x = torch.randn(4, 2, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    res = []
    for kernel in ("reference", "fused"):
        m = _layer(cell, "layer", kernel)
        xl = x.clone().requires_grad_(True)
        (g1,) = torch.autograd.grad(m(xl)[0].pow(3).sum(), xl, create_graph=True)
        (g2,) = torch.autograd.grad(g1.square().sum(), xl, create_graph=True)
        res.append(torch.autograd.grad(g2.sum(), xl)[0])
    torch.testing.assert_close(res[1], res[0], rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------------
# vmap and torch.func
# ---------------------------------------------------------------------------------------------------


def _per_batch_loss(m, lengths=None):
    """``loss(params, buffers, x)`` of one mini-batch (the buffers are updated in place in training)."""

    def loss(params, buffers, x):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
        out, state = functional_call(m, {**params, **buffers}, (inp,))
        out = pad_packed_sequence(out)[0] if lengths is not None else out
        states = state if isinstance(state, tuple) else (state,)
        return (out * torch.linspace(-1, 1, out.numel(), dtype=DT).view_as(out)).sum() + sum(s.square().sum() for s in states)

    return loss


@pytest.mark.parametrize("cell,norm,kernel,mode", [
    pytest.param(c, n, k, md, id=case_id(c, n, k, md))
    for (c, n), k, md in itertools.product(CASES, ["fused", "auto"], ["train", "eval"])
])  # fmt: skip
def test_vmap_grad_equals_a_loop_of_backward_calls(cell, norm, kernel, mode):
    """torch.func.vmap(torch.func.grad(loss)) over a leading dimension of V independent mini-batches equals one
    ordinary backward per mini-batch. Batch statistics are per mini-batch (they couple the samples of one
    mini-batch, not of different ones); each mini-batch updates its own copy of the running statistics, and those
    equal the loop's too."""
    m = _layer(cell, norm, kernel)
    m.train(mode == "train")
    V = 3
    x = torch.randn(V, 4, 2, 2, dtype=DT, generator=torch.Generator().manual_seed(4))
    params = {n: p.detach() for n, p in m.named_parameters()}
    buffers = {n: b.unsqueeze(0).repeat_interleave(V, 0) for n, b in m.named_buffers()}
    loss = _per_batch_loss(m)
    got = vmap(grad(loss), in_dims=(None, 0, 0))(params, buffers, x)
    for v in range(V):
        ps = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        mine = {n: b.clone() for n, b in m.named_buffers()}
        want = torch.autograd.grad(loss(ps, mine, x[v]), list(ps.values()))
        for name, w in zip(ps, want):
            torch.testing.assert_close(got[name][v], w, rtol=1e-9, atol=1e-11)
        for name, b in mine.items():  # the running statistics each mini-batch updated
            torch.testing.assert_close(buffers[name][v], b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell,norm", [pytest.param(c, n, id=case_id(c, n)) for c, n in CASES])
def test_per_example_gradients_of_unbatched_sequences(cell, norm):
    """The usual per-sample idiom: vmap over examples, each an unbatched (T, F) sequence (one row per step, so
    batch-statistic norms normalize with population statistics), against one backward per example."""
    m = _layer(cell, norm, "fused")
    m.eval() if norm in batch_norms() else m.train()
    x = torch.randn(3, 4, 2, dtype=DT, generator=torch.Generator().manual_seed(6))
    params = {n: p.detach() for n, p in m.named_parameters()}

    def loss(params, x):
        out, _ = functional_call(m, params, (x,))
        return out.square().sum()

    got = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for v in range(x.shape[0]):
        ps = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        for name, w in zip(ps, torch.autograd.grad(loss(ps, x[v]), list(ps.values()))):
            torch.testing.assert_close(got[name][v], w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell,norm", [pytest.param(c, n, id=case_id(c, n)) for c, n in CASES])
def test_gradcheck_with_batched_gradients(cell, norm):
    """gradcheck's batched check: vmap over the backward (the C++ backward operator's vmap rule)."""
    m = _layer(cell, norm, "fused")
    x = torch.randn(4, 3, 2, dtype=DT, generator=torch.Generator().manual_seed(7))
    assert torch.autograd.gradcheck(_as_function(m), _leaves(m, x), eps=1e-6, atol=1e-6, rtol=1e-4, check_batched_grad=True)


@pytest.mark.parametrize("cell,norm", [pytest.param(c, n, id=case_id(c, n)) for c, n in CASES])
def test_vmap_over_stacked_weights(cell, norm):
    """An ensemble: vmap over stacked parameters, buffers and inputs, forward and backward, against a loop."""
    m = _layer(cell, norm, "fused")
    models = []
    for k in range(3):
        mk = copy.deepcopy(m)
        randomize(mk, seed=k + 2)
        models.append(mk)
    stacked = {n: torch.stack([dict(mk.named_parameters())[n].detach() for mk in models]) for n, _ in m.named_parameters()}
    x = torch.randn(3, 5, 4, 2, dtype=DT, generator=torch.Generator().manual_seed(8))
    buffers = {n: torch.stack([dict(mk.named_buffers())[n] for mk in models]) for n, _ in m.named_buffers()}
    loss = _per_batch_loss(m)
    got = vmap(grad(loss), in_dims=(0, 0, 0))(stacked, buffers, x)
    for k, mk in enumerate(models):
        ps = {n: p.detach().clone().requires_grad_(True) for n, p in mk.named_parameters()}
        bs = {n: b.clone() for n, b in copy.deepcopy(mk).named_buffers()}
        for name, w in zip(ps, torch.autograd.grad(loss(ps, bs, x[k]), list(ps.values()))):
            torch.testing.assert_close(got[name][k], w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell,norm", [pytest.param(c, n, id=case_id(c, n)) for c, n in CASES])
def test_vmap_of_the_operators_on_packed_rows(cell, norm):
    """The operators' own vmap rule under torch.func (forward and C++ backward, no torch.func.grad): packed rows
    batched over a leading dimension, with batch sizes shared, against a loop."""
    m = _layer(cell, norm, "fused")
    work = m.direction_work(0, 0)
    bs = torch.tensor([4, 3, 2, 2, 1])
    x = torch.randn(3, int(bs.sum()), 2, dtype=DT, requires_grad=True)
    h0 = torch.randn(3, 4, 3, dtype=DT)
    states = lambda h: (h,) if m.cell.state_size == 1 else (h, h.flip(-1))  # noqa: E731
    out = vmap(lambda x, h: fused.run_direction(work, x, bs, states(h)).output)(x, h0)
    gx, gw = torch.autograd.grad(out.square().sum(), [x, m.weight_ih_l0])
    for v in range(3):
        xv = x[v].detach().requires_grad_(True)
        want = fused.run_direction(work, xv, bs, states(h0[v])).output
        torch.testing.assert_close(out[v], want, rtol=1e-12, atol=1e-13)
        gxv, gwv = torch.autograd.grad(want.square().sum(), [xv, m.weight_ih_l0])
        torch.testing.assert_close(gx[v], gxv, rtol=1e-9, atol=1e-11)
        gw = gw - gwv
    torch.testing.assert_close(gw, torch.zeros_like(gw), rtol=0, atol=1e-10)  # the sum over the slices


# ---------------------------------------------------------------------------------------------------
# No import circle in recnorm.kernels
# ---------------------------------------------------------------------------------------------------


def _kernel_imports():
    root = pathlib.Path(kernels.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "recnorm.kernels":
                    deps.update(a.name for a in node.names)
                elif node.module.startswith("recnorm.kernels."):
                    deps.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[2] for a in node.names if a.name.startswith("recnorm.kernels."))
        graph[name] = deps - {name}
    return graph


def test_no_import_circle_in_kernels():
    graph = _kernel_imports()
    modules = [m for m in graph if m != "__init__"]
    for start in modules:
        seen, stack = set(), [start]
        while stack:
            for dep in graph.get(stack.pop(), ()):
                assert dep != start, f"import circle through recnorm.kernels.{start} (and {dep}'s imports)"
                if dep not in seen and dep in graph and dep != "__init__":
                    seen.add(dep)
                    stack.append(dep)
    assert "native" not in graph["fused"] and "fused" not in graph["native"]
