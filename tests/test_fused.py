"""The fused C++ CPU path agrees with the reference loop: outputs, final states, gradients of the input,
initial states and every parameter, and running statistics, in train and eval, packed and not, both
directions; its autograd Function passes gradcheck; the kernel selection and the build fallback work."""

import copy
import itertools
import logging

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import recnorm
from recnorm.kernels import fused_cpu, reference

if not fused_cpu.available():
    pytest.skip(f"the fused C++ extension could not be built here: {fused_cpu._EXT_ERROR}", allow_module_level=True)

DT = torch.float64
NORMS = [None, "layer", "batch", "shared_batch"]


def _pair(norm, input_size=3, hidden=5, dtype=DT, **kw):
    torch.manual_seed(0)
    ref = recnorm.LSTM(input_size, hidden, 2, dtype=dtype, norm=norm, kernel="reference", **kw)
    with torch.no_grad():  # non-trivial norm parameters and running statistics
        for name, p in ref.named_parameters():
            if name.startswith("norm_"):
                p.uniform_(0.3, 1.2)
        for name, b in ref.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.2)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    fast = recnorm.LSTM(input_size, hidden, 2, dtype=dtype, norm=norm, kernel="fused", **kw)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _step(m, x, lengths, packed, hx=None):
    """Outputs, final states, gradients (input, initial states, parameters) and buffers after the call."""
    dt = x.dtype
    xl = x.clone().requires_grad_(True)
    hx = None if hx is None else tuple(s.clone().requires_grad_(True) for s in hx)
    inp = pack_padded_sequence(xl, lengths, enforce_sorted=False) if packed else xl
    out, (h, c) = m(inp, hx)
    out = pad_packed_sequence(out)[0] if packed else out
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dt).view_as(out)).sum() + (h * c).sum() + c.sum()
    leaves = [xl] + (list(hx) if hx is not None else []) + list(m.parameters())
    grads = torch.autograd.grad(loss, leaves)
    return [out, h, c, *grads, *[b.clone() for b in m.buffers()]]


def _assert_all_close(a, b, **tol):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(v, u, **tol)


@pytest.mark.parametrize("norm,bidir,packed,mode", list(itertools.product(NORMS, [False, True], [False, True], ["train", "eval"])))
def test_fused_matches_reference(norm, bidir, packed, mode):
    ref, fast = _pair(norm, bidirectional=bidir)
    if mode == "eval":
        warm = torch.randn(6, 7, 3, dtype=DT, generator=torch.Generator().manual_seed(5))
        for m in (ref, fast):
            m(warm)
            m.eval()
    x = torch.randn(6, 4, 3, dtype=DT)
    hx = tuple(torch.randn(4 if bidir else 2, 4, 5, dtype=DT) for _ in range(2))  # (layers * dirs, B, H)
    lengths = torch.tensor([6, 2, 5, 1])  # steps 2..4 and 5: few valid sequences, step 5 a single one
    _assert_all_close(_step(ref, x, lengths, packed, hx), _step(fast, x, lengths, packed, hx), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("norm,hoisted", list(itertools.product([None, "layer", "batch"], [False, True])))
def test_fused_matches_reference_wide_and_chunked(norm, hoisted, monkeypatch):
    """Hidden size a multiple of the vector width, input projection by GEMM in small chunks or inside the
    pass, and backward weight GEMMs over several chunks."""
    monkeypatch.setattr(fused_cpu, "INPROJ_ROWS", 7)
    monkeypatch.setenv("RECNORM_FUSED_CHUNK_ROWS", "9")
    ref, fast = _pair(norm, input_size=11 if hoisted else 2, hidden=16)
    x = torch.randn(7, 5, ref.input_size, dtype=DT)
    lengths = torch.tensor([7, 3, 7, 1, 4])
    for packed in (False, True):
        _assert_all_close(_step(ref, x, lengths, packed), _step(fast, x, lengths, packed), rtol=1e-9, atol=1e-10)


def _assert_as_accurate_as_reference(ref, fast, x, lengths):
    """float32: the fused result is about as close to the float64 reference as the float32 reference is."""
    ref64 = copy.deepcopy(ref).double()
    truth = _step(ref64, x.double(), lengths, True)
    fused, ref32 = _step(fast, x, lengths, True), _step(ref, x, lengths, True)
    for u, v, w in zip(truth, fused, ref32):
        scale = u.abs().max().item() + 1e-30
        err_fused = (v.double() - u).abs().max().item() / scale
        err_ref = (w.double() - u).abs().max().item() / scale
        assert err_fused <= max(3 * err_ref, 1e-5), (err_fused, err_ref)


@pytest.mark.parametrize("norm,mode", list(itertools.product([None, "layer", "batch"], ["train", "eval"])))
def test_fused_float32_close_to_reference(norm, mode):
    ref, fast = _pair(norm, input_size=6, hidden=16, dtype=torch.float32)
    if mode == "eval":
        warm = torch.randn(5, 8, 6, generator=torch.Generator().manual_seed(5))
        for m in (ref, fast):
            m(warm)
            m.eval()
    x = torch.randn(9, 8, 6)
    _assert_as_accurate_as_reference(ref, fast, x, torch.tensor([9, 4, 9, 1, 6, 2, 9, 3]))


@pytest.mark.skipif(not fused_cpu._onednn_available(), reason="oneDNN linear is not available in this torch build")
@pytest.mark.parametrize("norm,input_size", list(itertools.product([None, "layer", "batch"], [4, 11])))
def test_fused_onednn_gemm_path(norm, input_size, monkeypatch):
    monkeypatch.setenv("RECNORM_FUSED_ONEDNN", "1")
    monkeypatch.setattr(fused_cpu, "INPROJ_ROWS", 13)  # several input-projection chunks
    ref, fast = _pair(norm, input_size=input_size, hidden=8, dtype=torch.float32)
    _assert_as_accurate_as_reference(ref, fast, torch.randn(5, 6, input_size), torch.tensor([5, 2, 4, 1, 5, 3]))
    if norm == "batch":  # eval without autograd: the folded pass
        for m in (ref, fast):
            m.eval()
        x = torch.randn(5, 6, input_size)
        with torch.no_grad():
            torch.testing.assert_close(fast(x)[0], ref(x)[0], rtol=1e-4, atol=1e-5)


def test_fused_two_layers_with_dropout_in_eval():
    ref, fast = _pair("batch", input_size=3, hidden=5, dropout=0.4, bidirectional=True)
    x = torch.randn(6, 4, 3, dtype=DT)
    for m in (ref, fast):
        m(x)  # training pass: dropout is random, but running statistics do not depend on it at layer 0
        m.eval()
    with torch.no_grad():
        for name, b in fast.named_buffers():  # layer 1 saw different dropout masks: align the statistics
            b.copy_(ref.get_buffer(name))
    lengths = torch.tensor([6, 3, 6, 1])
    _assert_all_close(_step(ref, x, lengths, True), _step(fast, x, lengths, True), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("norm,mode", list(itertools.product(["layer", "batch"], ["train", "eval"])))
def test_fused_without_autograd_matches_reference(norm, mode):
    """The no-grad path (nothing saved for backward) gives the same outputs and running statistics."""
    ref, fast = _pair(norm)
    x = torch.randn(5, 4, 3, dtype=DT)
    if mode == "eval":
        for m in (ref, fast):
            m(x)
            m.eval()
    res = []
    for m in (ref, fast):
        with torch.no_grad():
            out, (h, c) = m(pack_padded_sequence(x, torch.tensor([5, 1, 3, 5]), enforce_sorted=False))
        res.append([out.data, h, c, *[b.clone() for b in m.buffers()]])
    _assert_all_close(*res, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kw", [{"momentum": None, "max_steps": 2}, {"momentum": 0.3, "max_steps": 3}])
def test_fused_running_statistics_slots(kw):
    """Cumulative averages, steps beyond the last slot, a step offset (reverse direction, truncated BPTT)."""
    torch.manual_seed(0)
    m = recnorm.LSTM(3, 4, dtype=DT, norm="batch", norm_kwargs=kw)
    p = m._direction_params(0, 0)
    mods = [p.norm_ih, p.norm_hh, p.norm_c]
    x = torch.randn(14, 3, dtype=DT)
    state = (torch.randn(4, 4, dtype=DT), torch.randn(4, 4, dtype=DT))
    batch_sizes = [4, 4, 3, 2, 1]  # the last step has a single row: population statistics, no update
    before = copy.deepcopy(mods)
    results = []
    for run in (reference.run_direction, fused_cpu.run_direction):
        for mod, init in zip(mods, before):
            mod.load_state_dict(init.state_dict())
        for offset in (0, 1):
            out, (h, c) = run(m.cell, x, batch_sizes, state, p, None, offset)
        results.append([out, h, c] + [b.clone() for mod in mods for b in mod.buffers()])
    _assert_all_close(*results, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_fused_constant_leading_steps_stay_finite_and_match(norm):
    """Blank leading input (zero variance everywhere: degenerate features) keeps gradients finite and
    equal to the reference's, compared against the float64 reference."""
    torch.manual_seed(0)
    ref = recnorm.LSTM(8, 6, norm=norm, kernel="reference", dtype=DT)
    recnorm.init.initialize(ref, "orthogonal")  # zero biases: h and c stay exactly 0 on blank input
    fast = recnorm.LSTM(8, 6, norm=norm, kernel="fused").float()
    fast.load_state_dict(ref.state_dict())
    x = torch.cat([torch.zeros(40, 5, 8), torch.rand(6, 5, 8)])
    grads = []
    for m in (ref, fast):
        out, _ = m(x.to(next(m.parameters()).dtype))
        grads.append(torch.autograd.grad(out[-1].sum(), list(m.parameters())))
    for u, v in zip(*grads):
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v.double(), u, rtol=1e-4, atol=1e-5 * u.abs().max().item())


@pytest.mark.parametrize(
    "norm,batch_sizes,training",
    [(None, [3, 3, 2, 1], True), ("layer", [3, 3, 2, 1], True), ("batch", [3, 3, 2, 1], True), ("batch", [3, 2, 1], False)],
)
def test_gradcheck_fused_function(norm, batch_sizes, training):
    torch.manual_seed(0)
    m = recnorm.LSTM(2, 3, dtype=DT, norm=norm, norm_kwargs={"momentum": 0.0} if norm == "batch" else None)
    m.train(training)
    p = m._direction_params(0, 0)
    n = sum(batch_sizes)
    x = torch.randn(n, 2, dtype=DT)
    state = (torch.randn(batch_sizes[0], 3, dtype=DT), torch.randn(batch_sizes[0], 3, dtype=DT))
    cfg, tensors = fused_cpu.prepare(x, batch_sizes, state, p)
    inputs = tuple(None if t is None else (t.detach().clone() + 0.1 * torch.randn_like(t)).requires_grad_(True) for t in tensors)
    fused_cpu.FusedLSTMFunction.apply(cfg, *inputs)  # marks slots as tracked: later calls read the same statistics
    assert torch.autograd.gradcheck(lambda *ts: fused_cpu.FusedLSTMFunction.apply(cfg, *ts), inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_through_layer():
    torch.manual_seed(0)
    m = recnorm.LSTM(2, 3, dtype=DT, norm="batch", norm_kwargs={"momentum": 0.0}, kernel="fused")
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    x = torch.randn(4, 3, 2, dtype=DT, requires_grad=True)

    def f(x, *ps):
        out, (h, c) = torch.func.functional_call(m, dict(zip(names, ps)), (x,))
        return out, c

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_supports():
    x = torch.randn(6, 3)
    for norm in NORMS:
        m = recnorm.LSTM(3, 4, norm=norm)
        assert fused_cpu.supports(m.cell, m._direction_params(0, 0), None, x), norm
    m = recnorm.LSTM(3, 4, norm="layer")
    p = m._direction_params(0, 0)
    assert not fused_cpu.supports(m.cell, p, lambda t, h: None, x)  # diagnostics use the reference loop
    assert not fused_cpu.supports(m.cell, p, None, x.half())
    assert not fused_cpu.supports(recnorm.GRU(3, 4, norm="layer").cell, recnorm.GRU(3, 4, norm="layer")._direction_params(0, 0), None, x)
    assert not fused_cpu.supports(m.cell, recnorm.LSTM(3, 4, proj_size=2, norm="layer")._direction_params(0, 0), None, x)
    assert not fused_cpu.supports(m.cell, recnorm.LSTM(3, 4, norm="sequence_batch")._direction_params(0, 0), None, x)
    bn = recnorm.LSTM(3, 4, norm="batch")
    q = bn._direction_params(0, 0)
    q.norm_hh.begin_population_pass()
    assert not fused_cpu.supports(bn.cell, q, None, x)
    q.norm_hh.end_population_pass()
    q.norm_c._observers.append(lambda *a: None)
    assert not fused_cpu.supports(bn.cell, q, None, x)
    with pytest.raises(ValueError, match="kernel='fused' serves"):
        recnorm.LSTM(3, 4, norm="layer", proj_size=2, kernel="fused")(torch.randn(2, 2, 3))


def test_auto_uses_fused_and_env_var_forces_reference(monkeypatch):
    m = recnorm.LSTM(3, 4, norm="layer")
    calls = []
    monkeypatch.setattr(fused_cpu, "run_direction", lambda *a, **k: calls.append(1))
    monkeypatch.setenv("RECNORM_KERNEL", "reference")
    m(torch.randn(2, 2, 3))
    assert calls == []
    recnorm.LSTM(3, 4, norm="layer", kernel="reference")(torch.randn(2, 2, 3))
    assert calls == []
    monkeypatch.setenv("RECNORM_KERNEL", "auto")
    with pytest.raises(TypeError):  # the stub returns None: proves the fused path was taken
        m(torch.randn(2, 2, 3))
    assert calls == [1]


def test_build_failure_warns_once_and_falls_back(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken(*a, **k):
        raise RuntimeError("no compiler here\nlong build log")

    monkeypatch.setattr(fused_cpu, "_EXT", None)
    monkeypatch.setattr(fused_cpu, "_EXT_ERROR", None)
    monkeypatch.setattr(fused_cpu, "_ONEDNN", None)
    monkeypatch.setattr(cpp_extension, "load", broken)
    m = recnorm.LSTM(3, 4, norm="layer")
    with caplog.at_level(logging.WARNING, logger="recnorm.kernels.fused_cpu"):
        for _ in range(3):
            out, _ = m(torch.randn(4, 2, 3))  # the reference loop serves it
            assert torch.isfinite(out).all()
    warnings = [r for r in caplog.records if r.name == "recnorm.kernels.fused_cpu"]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    assert not fused_cpu.supports(m.cell, m._direction_params(0, 0), None, torch.randn(2, 3))


def test_backward_twice_with_retain_graph():
    """retain_graph=True twice gives the same gradients (saved buffers are not modified by backward)."""
    m = recnorm.LSTM(3, 4, norm="layer", dtype=DT, kernel="fused")
    out, _ = m(torch.randn(5, 2, 3, dtype=DT))
    g1 = torch.autograd.grad(out.sum(), list(m.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(out.sum(), list(m.parameters()))
    _assert_all_close(g1, g2, rtol=0, atol=0)


def test_returned_tensors_are_ordinary_torch_tensors():
    """Outputs and input gradients are plain (resizable) allocations, not views of the kernel's pool."""
    m = recnorm.LSTM(64, 128, norm="layer", kernel="fused")
    x = torch.randn(40, 32, 64, requires_grad=True)  # buffers above the pool's 1 MiB threshold
    out, (h, c) = m(x)
    out.sum().backward()
    for t in (out, h, c, x.grad):
        assert t.untyped_storage().resizable()
    out.detach().resize_(80, 32, 128)  # what torch.nn.LSTM's output allows


@pytest.mark.parametrize("cls", [recnorm.LSTM, recnorm.GRU, recnorm.RNN])
def test_double_backward_refused_clearly_and_served_by_the_reference(cls):
    """create_graph=True through a fused kernel raises (instead of returning gradients that silently
    count as constants in a penalty); the reference loop differentiates twice."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 2, dtype=DT, requires_grad=True)
    fast = cls(2, 3, norm="layer", dtype=DT, kernel="fused")
    out, _ = fast(x)
    with pytest.raises(RuntimeError, match="kernel='reference'"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)
    ref = cls(2, 3, norm="layer", dtype=DT, kernel="reference")
    ref.load_state_dict(fast.state_dict())
    w = ref.weight_hh_l0

    def penalty(weight):
        out, _ = torch.func.functional_call(ref, {"weight_hh_l0": weight}, (x,))
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return g.square().sum()

    assert torch.autograd.gradcheck(penalty, (w.detach().clone().requires_grad_(True),), eps=1e-6, atol=1e-6)
