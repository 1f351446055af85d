"""The native fast path (torch's fused RNN op) agrees with the reference loop, norm=None and
sequence-wise BN folded into the input weights included."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import recnorm
from recnorm.kernels import native

DT = torch.float64
LAYERS = {"lstm": recnorm.LSTM, "gru": recnorm.GRU, "rnn": recnorm.RNN}


def _pair(cell, norm, **kw):
    torch.manual_seed(0)
    ref = LAYERS[cell](3, 5, dtype=DT, norm=norm, kernel="reference", **kw)
    fast = LAYERS[cell](3, 5, dtype=DT, norm=norm, kernel="native", **kw)
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.startswith("norm_"):
                p.uniform_(0.5, 1.5)
                getattr(fast, name.split(".")[0]).get_parameter(name.split(".")[1]).copy_(p)
    return ref, fast


@pytest.mark.parametrize(
    "cell,norm,packed,bidir,bias,mode",
    list(itertools.product(LAYERS, [None, "sequence_batch"], [False, True], [False, True], [True, False], ["train", "eval"])),
)
def test_native_matches_reference(cell, norm, packed, bidir, bias, mode):
    ref, fast = _pair(cell, norm, num_layers=2, bidirectional=bidir, bias=bias)
    if mode == "eval":
        for m in (ref, fast):
            m(torch.randn(6, 7, 3, dtype=DT, generator=torch.Generator().manual_seed(9)))
            m.eval()
    x = torch.randn(6, 4, 3, dtype=DT)
    lengths = torch.tensor([6, 2, 5, 1])
    results = []
    for m in (ref, fast):
        xl = x.clone().requires_grad_(True)
        inp = pack_padded_sequence(xl, lengths, enforce_sorted=False) if packed else xl
        out, state = m(inp)
        out = pad_packed_sequence(out)[0] if packed else out
        hn = state[0] if cell == "lstm" else state
        loss = (out * torch.linspace(-1, 2, out.numel(), dtype=DT).view_as(out)).sum() + hn.square().sum()
        grads = torch.autograd.grad(loss, [xl] + list(m.parameters()))
        stats = [b.clone() for n, b in m.named_buffers()]
        results.append((out, hn, grads, stats))
    (o1, h1, g1, s1), (o2, h2, g2, s2) = results
    torch.testing.assert_close(o2, o1, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(h2, h1, rtol=1e-9, atol=1e-10)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    for a, b in zip(s2, s1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_native_serves_only_where_the_math_is_torchs():
    x = torch.randn(4, 3)
    for norm, expect in [(None, True), ("sequence_batch", True), ("layer", False), ("batch", False), ("shared_batch", False)]:
        m = recnorm.LSTM(3, 4, norm=norm)
        assert (native.supports(m.direction_work(0, 0), x, None, "eager") is None) is expect, norm
    m = recnorm.LSTM(3, 4)
    assert "diagnostics" in native.supports(m.direction_work(0, 0, on_output=lambda t, h: None), x, None, "eager")
    with pytest.raises(ValueError, match="kernel='native' cannot run this layer: it serves norm=None and sequence-wise"):
        recnorm.LSTM(3, 4, norm="layer", kernel="native")(torch.randn(2, 2, 3))


@pytest.mark.parametrize("cell,packed", list(itertools.product(LAYERS, [False, True])))
def test_native_operator_opcheck(cell, packed):
    """The registered operator recnorm::native_rnn: schema, fake kernel and recompute backward."""
    torch.manual_seed(0)
    m = LAYERS[cell](3, 5, dtype=DT)
    w = m.direction_work(0, 0)
    bs = torch.tensor([3, 2, 2, 1]) if packed else None
    shape = (8, 3) if packed else (4, 3, 3)  # packed rows (N, F), or a full batch (T, B, F)
    x = torch.randn(*shape, dtype=DT, requires_grad=True)
    hx = [torch.randn(3, 5, dtype=DT, requires_grad=True) for _ in range(m.cell.state_size)]
    weights = [w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh]
    # Its backward recomputes the forward under autograd, which AOTDispatch cannot trace: recnorm never
    # differentiates through it under torch.compile (the fused kernels serve that), so that check is left out.
    torch.library.opcheck(torch.ops.recnorm.native_rnn, (x, bs, hx, weights, m.cell.kind(), True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out = torch.ops.recnorm.native_rnn(x, bs, hx, weights, m.cell.kind(), True)
    ref = native._aten(m.cell.kind(), x, bs, hx, weights, True, True)
    leaves = [x, *hx, *weights]
    g_op = torch.autograd.grad(out[0].sum() + out[1].square().sum(), leaves)
    g_ref = torch.autograd.grad(ref[0].sum() + ref[1][0].square().sum(), leaves)
    for a, b in zip(g_op, g_ref):
        torch.testing.assert_close(a, b)


def test_sequence_batch_fold_stays_finite_near_the_float_range():
    """|x| ~ 1e19 in float32: the covariance of x overflows unless x is scaled first (the reference loop,
    which normalizes W x directly, stays finite)."""
    torch.manual_seed(0)
    ref = recnorm.LSTM(3, 4, norm="sequence_batch", kernel="reference")
    fast = recnorm.LSTM(3, 4, norm="sequence_batch", kernel="native")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 6, 3) * 1e19
    a, b = ref(x)[0], fast(x)[0]
    assert torch.isfinite(b).all()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_env_var_forces_reference(monkeypatch):
    calls = []
    import recnorm.kernels as k

    monkeypatch.setenv("RECNORM_KERNEL", "reference")
    monkeypatch.setattr(k.native, "_op", lambda kind: calls.append(kind))  # torch's op, on every path to it
    recnorm.LSTM(3, 4)(torch.randn(2, 2, 3))
    assert calls == []
    monkeypatch.setenv("RECNORM_KERNEL", "auto")
    with pytest.raises(TypeError):  # the stub returns None: proves the native path was taken
        recnorm.LSTM(3, 4)(torch.randn(2, 2, 3))
    assert calls == ["lstm"]


# --- the LSTM's oneDNN training operator (compiled training steps) -------------------------------------------

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@pytest.fixture
def fresh_dynamo():
    """Each compiled test starts from no compiled code: past dynamo's recompile limit a frame runs eagerly,
    which would hide what the compiled step chooses."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_pair(**kw):
    torch.manual_seed(0)
    eager = recnorm.LSTM(5, 7, **kw)
    compiled = recnorm.LSTM(5, 7, **kw)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _train_step(m, x, h_weight):
    """A step whose loss reads the output and, with a weight, the final states (their gradients reach oneDNN's
    backward; without, they stay None)."""
    out, (h, c) = m(x)
    loss = out.sum() + h_weight * (h.square().sum() + c.sum())
    loss.backward()
    return out, h, c


@needs_onednn
@pytest.mark.parametrize("fullgraph,bias,layers,h_weight", [
    (True, True, 1, 0.0), (True, False, 2, 0.5), (False, True, 2, 0.5), (False, False, 1, 0.0),
])  # fmt: skip
def test_compiled_lstm_training_runs_torchs_op_and_equals_eager_to_the_bit(fresh_dynamo, fullgraph, bias, layers, h_weight):
    """torch.compile of a training step runs what the eager step runs, torch's LSTM op through oneDNN (forward
    and oneDNN's backward on its workspace), so outputs and gradients are equal to the bit. Without fullgraph
    the operator's workspace (a size oneDNN picks when it runs) breaks the graph around it; with it, one graph."""
    eager, c = _compiled_pair(bias=bias, num_layers=layers)
    compiled = torch.compile(c, fullgraph=fullgraph, backend="aot_eager")
    x = torch.randn(6, 3, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    want = _train_step(eager, x, h_weight)
    with recnorm.kernels.recording() as names:
        got = _train_step(compiled, x2, h_weight)
    assert names == ["native"] * layers
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(x2.grad, x.grad)
    for (name, p), q in zip(eager.named_parameters(), c.parameters()):
        assert torch.equal(q.grad, p.grad), name


@needs_onednn
def test_compiled_lstm_training_follows_the_sizes_dynamically(fresh_dynamo):
    """The operator follows symbolic sizes: new lengths and batches, no recompile, eager's numbers; and
    "auto" under dynamic shapes asks the rule without specializing T (a new length that stays on the same
    side of the rule's threshold reuses the graph)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    eager, c = _compiled_pair(kernel="native")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(c, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for T, B in [(6, 3), (9, 4), (2, 5)]:
        for p in (*eager.parameters(), *c.parameters()):
            p.grad = None
        x = torch.randn(T, B, 5, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        want, got = _train_step(eager, x, 0.0), _train_step(compiled, x2, 0.0)
        assert torch.equal(got[0], want[0]) and torch.equal(x2.grad, x.grad)
        assert all(torch.equal(q.grad, p.grad) for p, q in zip(eager.parameters(), c.parameters()))
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1], frames  # no recompile for the new sizes
    counter = CompileCounterWithBackend("aot_eager")
    auto = torch.compile(recnorm.LSTM(5, 7), fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for T in (6, 9, 2):
        auto(torch.randn(T, 3, 5))[0].sum().backward()
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1], frames
    with recnorm.kernels.recording() as names:  # (an observer's list is a side effect dynamo guards on)
        auto(torch.randn(7, 3, 5))[0].sum().backward()
    assert names == ["native"]


@needs_onednn
def test_the_training_operator_refuses_a_second_derivative(fresh_dynamo):
    """oneDNN's backward has no derivative itself: a graph of it raises (torch.compile's own refusal of
    create_graph, or the operator's missing formula) instead of giving wrong numbers."""
    _, c = _compiled_pair()
    x = torch.randn(4, 2, 5, requires_grad=True)
    out, _ = torch.compile(c, fullgraph=True, backend="aot_eager")(x)
    with pytest.raises(RuntimeError, match="create_graph|native_lstm_train_backward"):
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        g.sum().backward()


def test_compiled_training_serves_only_what_torchs_op_runs_through_onednn():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5)
    lstm = recnorm.LSTM(5, 7).direction_work(0, 0)
    assert native.compiled_training(lstm, x, None) is None or not torch.backends.mkldnn.is_available()
    assert "LSTM only" in native.compiled_training(recnorm.GRU(5, 7).direction_work(0, 0), x, None)
    assert "packed" in native.compiled_training(lstm, x.reshape(12, 5), torch.tensor([3, 3, 3, 3]))
    assert "projection" in native.compiled_training(recnorm.LSTM(5, 7, proj_size=3).direction_work(0, 0), x, None)
    assert "float32" in native.compiled_training(lstm, x.double(), None)


@needs_onednn
@pytest.mark.parametrize("kw,packed", [({"proj_size": 3}, False), ({}, True)])
def test_compiled_lstm_training_that_onednn_does_not_serve_runs_the_fused_kernel(fresh_dynamo, kw, packed):
    """A projection or packed sequences: torch's op runs without oneDNN there, so the compiled step keeps the
    fused kernel (or the reference loop), as before."""
    torch.manual_seed(0)
    m = recnorm.LSTM(5, 7, **kw)
    x = torch.randn(6, 3, 5)
    if packed:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([6, 4, 2]))
    compiled = torch.compile(m, backend="aot_eager")
    with recnorm.kernels.recording() as names:
        out = compiled(x)[0]
        (out.data if packed else out).sum().backward()
    assert names and "native" not in names, names


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_the_training_operator_passes_opcheck(bias):
    """recnorm::native_lstm_train: schema, autograd registration and fake kernel (the workspace's size comes
    from the run), and its outputs and gradients equal torch's LSTM op's in eager mode."""
    torch.manual_seed(0)
    w = recnorm.LSTM(3, 5, bias=bias).direction_work(0, 0)
    x = torch.randn(4, 2, 3, requires_grad=True)
    h0, c0 = (torch.randn(2, 5, requires_grad=True) for _ in range(2))
    weights = [w.weight_ih, w.weight_hh] + ([w.bias_ih, w.bias_hh] if bias else [])
    # test_aot_dispatch_dynamic compares every output of two runs, and oneDNN leaves parts of the workspace (its
    # scratch, read only by its backward) unwritten: the compiled steps above check that path instead
    torch.library.opcheck(torch.ops.recnorm.native_lstm_train, (x, h0, c0, weights, bias),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, hy, cy, _ = torch.ops.recnorm.native_lstm_train(x, h0, c0, weights, bias)
    ref_out, ref_h, ref_c = torch._VF.lstm(x, (h0[None], c0[None]), weights, bias, 1, 0.0, True, False, False)
    assert torch.equal(out, ref_out) and torch.equal(hy, ref_h[0]) and torch.equal(cy, ref_c[0])
    leaves = [x, h0, c0, *weights]
    got = torch.autograd.grad(out.sum() + hy.square().sum() + cy.sum(), leaves)
    want = torch.autograd.grad(ref_out.sum() + ref_h.square().sum() + ref_c.sum(), leaves)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_the_compiled_order_is_the_eager_order():
    """autotune.compiled_order asks the rule by comparing T with a threshold: the same answer as eager_order's
    score at every size (up to rounding at the threshold itself), inside and outside the rule's range."""
    import random

    from recnorm.kernels import autotune

    rng = random.Random(0)
    for _ in range(400):
        T, B, I, H = rng.randint(1, 1200), rng.randint(1, 300), rng.randint(1, 400), rng.randint(1, 1000)
        work = recnorm.LSTM(I, H).direction_work(0, 0) if H <= 64 else _FakeWork(I, H)
        x = torch.empty(T, B, I)
        for train in (True, False):
            assert autotune.compiled_order(work, x, train) == autotune.eager_order(work, x, None, train), (T, B, I, H)


class _FakeWork:
    """The fields the rule reads, without allocating a layer of H units."""

    def __init__(self, I, H):
        self.cell = type("Cell", (), {"kind": "lstm"})()
        self.weight_ih, self.weight_hh, self.weight_hr = torch.empty(4 * H, I), torch.empty(4 * H, H), None
