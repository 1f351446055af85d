"""The fused C++ CPU operators agree with the reference loop for every registered cell x norm they serve:
outputs, final states, gradients of the input, initial states and every parameter, and running statistics,
in train and eval, packed and not, both directions; the operators pass torch.library's opcheck and
gradcheck; dispatch, refusals and the build fallback behave; they differentiate twice."""

import copy
import itertools
import logging

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import recnorm
from recnorm import kernels
from recnorm.kernels import fused, host, reference
# CELL_IDS here: the registered cells whose math the fused kernels know (a plugin's cell runs the reference only)
from registry_cases import KERNEL_CELL_IDS as CELL_IDS
from registry_cases import DT, NORM_IDS, assert_all_close, case_id, is_built_in, make, randomize, run_and_grad

# The fused kernels must be here: a machine without a compiler fails these tests (it does not skip them).

LENGTHS = torch.tensor([6, 2, 5, 1])  # steps 2..4 and 5: few valid sequences, step 5 a single one


def _served(cell, norm) -> bool:
    m = make(cell, 3, 5, norm=norm, dtype=DT)
    return fused.supports(m.direction_work(0, 0), torch.randn(4, 3, dtype=DT), None, "eager") is None


SERVED = [(c, n) for c, n in itertools.product(CELL_IDS, NORM_IDS) if _served(c, n)]


def test_the_fused_kernels_serve_every_built_in_cell_and_norm():
    built_in = {(c, n) for c, n in itertools.product(CELL_IDS, NORM_IDS) if is_built_in(c, n)}
    assert built_in <= set(SERVED), sorted(built_in - set(SERVED))


def _pair(cell, norm, input_size=3, hidden=5, dtype=DT, **kw):
    torch.manual_seed(0)
    ref = make(cell, input_size, hidden, 2, dtype=dtype, norm=norm, kernel="reference", **kw)
    randomize(ref)
    fast = make(cell, input_size, hidden, 2, dtype=dtype, norm=norm, kernel="fused", **kw)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _hx(m, batch, dtype=DT):
    D = 2 if m.bidirectional else 1
    shapes = m._state_shapes(batch)
    states = tuple(torch.randn(s, dtype=dtype, generator=torch.Generator().manual_seed(3)) for s in shapes)
    return states if len(states) == 2 else states[0]


@pytest.mark.parametrize("cell,norm,bidir,packed,mode", [
    pytest.param(c, n, b, p, md, id=case_id(c, n, b, p, md))
    for (c, n), b, p, md in itertools.product(SERVED, [False, True], [False, True], ["train", "eval"])
])  # fmt: skip
def test_fused_matches_reference(cell, norm, bidir, packed, mode):
    ref, fast = _pair(cell, norm, bidirectional=bidir)
    if mode == "eval":
        for m in (ref, fast):
            m(torch.randn(6, 7, 3, dtype=DT, generator=torch.Generator().manual_seed(5)))
            m.eval()
    x = torch.randn(6, 4, 3, dtype=DT)
    res = [run_and_grad(m, x, _hx(m, 4), LENGTHS if packed else None) for m in (ref, fast)]
    assert_all_close(*res, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cell,norm,hoisted", [
    pytest.param(c, n, h, id=case_id(c, n, h)) for c, n, h in itertools.product(CELL_IDS, [None, "layer", "batch"], [False, True])
])  # fmt: skip
def test_fused_matches_reference_wide_and_chunked(cell, norm, hoisted, monkeypatch):
    """Hidden size a multiple of the vector width, input projection by GEMM in small chunks or inside the
    pass, and backward weight GEMMs over several chunks."""
    monkeypatch.setattr(fused, "INPROJ_ROWS", 7)
    monkeypatch.setenv("RECNORM_FUSED_CHUNK_ROWS", "9")
    ref, fast = _pair(cell, norm, input_size=11 if hoisted else 2, hidden=16)
    x = torch.randn(7, 5, ref.input_size, dtype=DT)
    lengths = torch.tensor([7, 3, 7, 1, 4])
    for lens in (None, lengths):
        assert_all_close(run_and_grad(ref, x, lengths=lens), run_and_grad(fast, x, lengths=lens), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cell", CELL_IDS)
def test_fused_matches_reference_with_weights_transposed_in_bands(cell):
    """Weights large enough that the kernels' transposing copy of W_ih and W_hh (fused_common.h, transposed)
    runs in bands of 16 rows on two threads, with partial tiles at both edges (neither side a multiple of
    16): I = 261 and H = 263 give W_ih (G, 261) and W_hh (G, 263), each of more bands than one thread takes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref, fast = _pair(cell, "layer", input_size=261, hidden=263)
        for w in (ref.weight_ih_l0, ref.weight_hh_l0):
            bands, grain = -(-w.shape[0] // 16), max(1, 32768 // (16 * w.shape[1]))  # kTransposeTile, kTransposeGrain
            assert w.shape[0] % 16 and w.shape[1] % 16 and bands > grain
        x = torch.randn(3, 3, 261, dtype=DT)
        assert_all_close(run_and_grad(ref, x), run_and_grad(fast, x), rtol=1e-9, atol=1e-10)
        for m in (ref, fast):
            m.eval()
        with torch.no_grad():
            assert_all_close(ref(x), fast(x), rtol=1e-9, atol=1e-10)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("cell,norm,hoisted", [
    pytest.param(c, n, h, id=case_id(c, n, h)) for c, n, h in itertools.product(CELL_IDS, [None, "layer", "batch"], [False, True])
])  # fmt: skip
def test_one_step_calls_read_the_weights_untransposed_and_match(cell, norm, hoisted):
    """A call of one step multiplies by the transposed views of W_hh (and of W_ih where the input is
    projected by GEMM), not by contiguous copies (fused_common.h, plain_operand): its outputs and gradients
    match the reference. Decoding step by step, the states carried from call to call, matches the
    reference decoding so, and, where the statistics do not depend on the step (recurrent batch norm reads
    slot 0 at every call of one step), gives the outputs of one call over the whole sequence."""
    ref, fast = _pair(cell, norm, input_size=33 if hoisted else 3, hidden=19)
    x = torch.randn(1, 4, ref.input_size, dtype=DT)
    assert_all_close(run_and_grad(ref, x, _hx(ref, 4)), run_and_grad(fast, x, _hx(fast, 4)), rtol=1e-9, atol=1e-10)
    seq = torch.randn(5, 4, ref.input_size, dtype=DT)
    for m in (ref, fast):
        m(seq)  # running statistics for eval
        m.eval()
    with torch.no_grad():
        decoded = []
        for m in (ref, fast):
            state, outs = None, []
            for t in range(seq.shape[0]):
                out, state = m(seq[t : t + 1], state)
                outs.append(out)
            decoded.append(torch.cat(outs))
        assert_all_close(decoded[1], decoded[0], rtol=1e-9, atol=1e-10)
        if norm != "batch":
            assert_all_close(decoded[1], fast(seq)[0], rtol=1e-12, atol=1e-13)


def test_chunk_rule_follows_the_floor_in_force_and_the_environment(monkeypatch):
    monkeypatch.delenv("RECNORM_FUSED_CHUNK_ROWS", raising=False)
    assert fused._chunk_rows(3584) == max(fused.CHUNK_FLOOR, 896) == 1024
    assert fused._chunk_rows(100_000) == 25_000
    with fused.chunk_floor(fused.LEGACY_CHUNK_FLOOR):
        assert fused._chunk_rows(3584) == 2048 and fused.chunk_setting() == {"chunk_floor": 2048}
        with fused.chunk_floor(None):
            assert fused._chunk_rows(3584) == fused.CHUNK_FLOOR
        assert fused._chunk_rows(3584) == 2048
    assert fused._chunk_rows(3584) == fused.CHUNK_FLOOR
    monkeypatch.setenv("RECNORM_FUSED_CHUNK_ROWS", "9")
    with fused.chunk_floor(2048):
        assert fused._chunk_rows(3584) == 9 and fused.chunk_setting() == {"chunk_floor": 2048, "chunk_rows_env": "9"}
    for bad in (0, -3, 1.5, True, "1024"):
        with pytest.raises(ValueError, match="chunk_floor: expected None or an int >= 1"):
            with fused.chunk_floor(bad):
                pass
    assert fused._CHUNK_FLOOR == fused.CHUNK_FLOOR


def _assert_as_accurate_as_reference(ref, fast, x, lengths):
    """float32: the fused result is about as close to the float64 reference as the float32 reference is
    (within 5e-4 of the largest value: steps with 2 valid rows make batch norm ill-conditioned, and the
    kernels' float32 sigmoid and tanh round differently from torch's)."""
    ref64 = copy.deepcopy(ref).double()
    truth = run_and_grad(ref64, x.double(), lengths=lengths)
    got, ref32 = run_and_grad(fast, x, lengths=lengths), run_and_grad(ref, x, lengths=lengths)
    for u, v, w in zip(truth, got, ref32):
        scale = u.abs().max().item() + 1e-30
        err_fused = (v.double() - u).abs().max().item() / scale
        err_ref = (w.double() - u).abs().max().item() / scale
        assert err_fused <= max(3 * err_ref, 5e-4), (err_fused, err_ref)


def test_onednn_plan_follows_the_hosts_maker(monkeypatch):
    """Each maker's rule as measured (benchmarks/onednn_rule.py): on the Intel host oneDNN's products lost to
    MKL's with W_hh packed, so every GEMM runs on MKL there; a maker without a rule runs MKL."""
    monkeypatch.delenv("RECNORM_FUSED_ONEDNN", raising=False)
    monkeypatch.setattr(fused, "_onednn_available", lambda family: True)
    plan = fused.onednn_plan
    monkeypatch.setattr(host, "cpu_maker", lambda: "Intel")
    assert plan(128, 128, True, torch.float32, "lstm", saving=False) == (False, False, False)  # AMD: step on oneDNN
    assert plan(64, 256, True, torch.float32, "lstm", saving=False) == (False, False, False)
    assert plan(32, 512, True, torch.float32, "lstm", saving=False) == (False, False, False)  # AMD: all three
    assert plan(8, 512, True, torch.float32, "lstm", saving=True) == (False, False, False)
    assert plan(128, 512, False, torch.float32, "lstm") == (False, False, False)
    assert plan(128, 1024, False, torch.float32, "lstm") == (False, False, False)
    assert plan(64, 256, False, torch.float32, "gru_rnn") == (False, False, False)  # AMD: step on oneDNN
    assert plan(64, 512, False, torch.float32, "gru_rnn") == (False, False, False)  # AMD: backward too
    assert plan(32, 1024, True, torch.float32, "gru_rnn", saving=False) == (False, False, False)
    monkeypatch.setattr(host, "cpu_maker", lambda: "AMD")
    assert plan(128, 128, True, torch.float32, "lstm", saving=False) == (False, True, False)
    assert plan(32, 512, True, torch.float32, "lstm", saving=True) == (False, True, True)
    for maker in (None, "Apple"):
        monkeypatch.setattr(host, "cpu_maker", lambda m=maker: m)
        for family in ("lstm", "gru_rnn"):
            assert plan(32, 1024, True, torch.float32, family, saving=False) == (False, False, False)
    # the environment still forces either choice on any host
    monkeypatch.setenv("RECNORM_FUSED_ONEDNN", "1")
    assert plan(8, 64, True, torch.float32, "lstm") == (True, True, True)
    assert set(fused.ONEDNN_HOSTS) == {"AMD", "Intel"}


@pytest.mark.parametrize("cell,norm,mode", [
    pytest.param(c, n, m, id=case_id(c, n, m)) for c, n, m in itertools.product(CELL_IDS, [None, "layer", "batch"], ["train", "eval"])
])  # fmt: skip
def test_fused_float32_close_to_reference(cell, norm, mode):
    ref, fast = _pair(cell, norm, input_size=6, hidden=16, dtype=torch.float32)
    if mode == "eval":
        warm = torch.randn(5, 8, 6, generator=torch.Generator().manual_seed(5))
        for m in (ref, fast):
            m(warm)
            m.eval()
    _assert_as_accurate_as_reference(ref, fast, torch.randn(9, 8, 6), torch.tensor([9, 4, 9, 1, 6, 2, 9, 3]))


@pytest.mark.skipif(not fused._onednn_available("lstm"), reason="oneDNN linear is not available in this torch build")
@pytest.mark.parametrize("cell,norm,input_size", [
    pytest.param(c, n, i, id=case_id(c, n, i)) for c, n, i in itertools.product(CELL_IDS, [None, "layer", "batch"], [4, 11])
])  # fmt: skip
def test_fused_onednn_gemm_path(cell, norm, input_size, monkeypatch):
    monkeypatch.setenv("RECNORM_FUSED_ONEDNN", "1")
    monkeypatch.setattr(fused, "INPROJ_ROWS", 13)  # several input-projection chunks
    ref, fast = _pair(cell, norm, input_size=input_size, hidden=8, dtype=torch.float32)
    _assert_as_accurate_as_reference(ref, fast, torch.randn(5, 6, input_size), torch.tensor([5, 2, 4, 1, 5, 3]))
    if norm == "batch":  # eval without autograd: the folded pass
        for m in (ref, fast):
            m.eval()
        x = torch.randn(5, 6, input_size)
        with torch.no_grad():
            torch.testing.assert_close(fast(x)[0], ref(x)[0], rtol=1e-4, atol=1e-5)


def test_onednn_rule_restores_the_earlier_lstm_plan(monkeypatch):
    """Runs made before the LSTM's GEMM rule changed replay with the rule they ran with."""
    monkeypatch.delenv("RECNORM_FUSED_ONEDNN", raising=False)
    monkeypatch.setattr(fused, "_onednn_available", lambda family: True)
    for maker in ("AMD", "Intel", None):  # the legacy rule is the same on every host
        monkeypatch.setattr(host, "cpu_maker", lambda m=maker: m)
        with fused.onednn_rule("2026-12-04"):
            assert fused.onednn_plan(64, 128, False, torch.float32, "lstm") == (False, False, False)
            assert fused.onednn_plan(32, 512, True, torch.float32, "lstm", saving=False) == (False, True, True)
            assert fused.onednn_plan(32, 512, True, torch.float32, "gru_rnn", saving=False) == (False, True, True)
    monkeypatch.setattr(host, "cpu_maker", lambda: "AMD")
    assert fused.onednn_plan(64, 128, False, torch.float32, "lstm")[1] is True  # restored on exit
    with pytest.raises(ValueError, match="expected one of"):
        with fused.onednn_rule("newest"):
            pass


def test_onednn_plan_knows_whether_the_forward_saves(monkeypatch):
    """The LSTM's hoisted input projection goes to oneDNN only in a forward that saves nothing (eval):
    the plan must be told which forward it serves."""
    monkeypatch.delenv("RECNORM_FUSED_ONEDNN", raising=False)
    monkeypatch.setattr(fused, "_onednn_available", lambda family: True)
    maker = host.cpu_maker()
    monkeypatch.setattr(host, "cpu_maker", lambda: "AMD")
    assert fused.onednn_plan(32, 512, True, torch.float32, "lstm", saving=False) == (True, True, True)
    assert fused.onednn_plan(32, 512, True, torch.float32, "lstm", saving=True) == (False, True, True)
    assert fused.onednn_plan(32, 64, True, torch.float32, "lstm", saving=False) == (False, False, False)
    assert fused.onednn_plan(8, 128, False, torch.float32, "lstm")[1] is False
    assert fused.onednn_plan(64, 128, False, torch.float32, "lstm")[1] is True
    assert fused.onednn_plan(64, 128, False, torch.float32, "gru_rnn")[1] is False  # its own, older rule
    assert fused.onednn_plan(32, 512, True, torch.float64, "lstm", saving=False) == (False, False, False)
    seen = []
    monkeypatch.setattr(host, "cpu_maker", lambda: maker)  # the layer below builds and runs as on this host
    real = fused.onednn_plan
    monkeypatch.setattr(fused, "onednn_plan", lambda *a, **k: seen.append(k.get("saving", True)) or real(*a, **k))
    layer = recnorm.LSTM(4, 8, kernel="fused")
    x = torch.randn(3, 2, 4)
    layer(x)[0].sum().backward()
    with torch.no_grad():
        layer.eval()(x)
    assert seen[0] is True and seen[-1] is False


@pytest.mark.parametrize("cell,norm,mode", [
    pytest.param(c, n, m, id=case_id(c, n, m)) for (c, n), m in itertools.product(SERVED, ["train", "eval"])
])  # fmt: skip
def test_fused_without_autograd_matches_reference_and_saves_nothing(cell, norm, mode, monkeypatch):
    ref, fast = _pair(cell, norm)
    x = torch.randn(5, 4, 3, dtype=DT)
    if mode == "eval":
        for m in (ref, fast):
            m(x)
            m.eval()
    saved = []
    real = torch.ops.recnorm.fused_lstm if cell == "lstm" else torch.ops.recnorm.fused_gru_rnn
    res = []
    for m in (ref, fast):
        with torch.no_grad():
            out, state = m(pack_padded_sequence(x, torch.tensor([5, 1, 3, 5]), enforce_sorted=False))
        states = state if isinstance(state, tuple) else (state,)
        res.append([out.data, *states, *[b.clone() for b in m.buffers()]])
    assert_all_close(*res, rtol=1e-9, atol=1e-10)
    # the no-grad call asks the operator to save nothing
    at = [a.name for a in real.default._schema.arguments].index("save")
    call = fused._LSTM_CALL if cell == "lstm" else fused._GRU_RNN_CALL  # how the layers call the operator
    spy = lambda *a: (saved.append(a[at]), call(*a))[1]  # noqa: E731
    monkeypatch.setattr(fused, "_LSTM_CALL" if cell == "lstm" else "_GRU_RNN_CALL", spy)
    with torch.no_grad():
        fast(x)
    if kernels.choose(fast.direction_work(0, 0), x.reshape(-1, 3), None, (torch.zeros(4, 5, dtype=DT),) * 2)[0] == "fused":
        assert saved and not any(saved)


def test_fused_two_layers_with_dropout_in_eval():
    ref, fast = _pair("lstm", "batch", input_size=3, hidden=5, dropout=0.4, bidirectional=True)
    x = torch.randn(6, 4, 3, dtype=DT)
    for m in (ref, fast):
        m(x)  # training pass: dropout is random, but running statistics do not depend on it at layer 0
        m.eval()
    with torch.no_grad():
        for name, b in fast.named_buffers():  # layer 1 saw different dropout masks: align the statistics
            b.copy_(ref.get_buffer(name))
    lengths = torch.tensor([6, 3, 6, 1])
    assert_all_close(run_and_grad(ref, x, lengths=lengths), run_and_grad(fast, x, lengths=lengths), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cell,kw", [
    pytest.param(c, kw, id=case_id(c, i)) for c, (i, kw) in itertools.product(
        CELL_IDS, enumerate([{"momentum": None, "max_steps": 2}, {"momentum": 0.3, "max_steps": 3}, {"momentum": None, "max_steps": 4}]))
])  # fmt: skip
def test_fused_running_statistics_slots_and_step_offset(cell, kw):
    """Cumulative averages, steps beyond the last slot, a step offset (a cell run step by step, truncated
    BPTT): same outputs and running statistics as the reference, in training and then in eval."""
    torch.manual_seed(0)
    m = make(cell, 3, 4, dtype=DT, norm="batch", norm_kwargs=kw)
    randomize(m)
    with torch.no_grad():
        for name, b in m.named_buffers():
            if name.endswith("num_batches_tracked"):
                b.zero_()
    bs = torch.tensor([3, 3, 2, 2, 1])  # the last step has one valid row: population statistics, no update
    x = torch.randn(int(bs.sum()), 3, dtype=DT)
    state = tuple(torch.randn(3, 4, dtype=DT) for _ in range(m.cell.state_size))
    snapshot = copy.deepcopy(m.state_dict())
    results = []
    for run in (lambda w, *a: reference.run_direction(w, a[0], a[1].tolist(), a[2]), fused.run_direction):
        m.load_state_dict(snapshot)
        m.train()
        for offset in (0, 2):  # the second call reads and averages what the first one wrote
            work = m.direction_work(0, 0).replace(step_offset=offset)
            res = run(work, x, bs, state)
            m._record(0, 0, res.moments)
        m.eval()
        res_eval = run(m.direction_work(0, 0).replace(step_offset=2), x, bs, state)
        results.append([res.output, *res.state, res_eval.output, *res_eval.state] + [b.clone() for b in m.buffers()])
    assert_all_close(*results, rtol=1e-9, atol=1e-10)


def test_running_statistics_count_every_tracked_step():
    m = recnorm.GRU(3, 4, dtype=DT, norm="batch", norm_kwargs={"max_steps": 4, "momentum": None})
    bs = torch.tensor([3, 3, 2, 2, 2, 1])
    x = torch.randn(int(bs.sum()), 3, dtype=DT)
    for offset in (0, 2):
        res = fused.run_direction(m.direction_work(0, 0).replace(step_offset=offset), x, bs, (torch.zeros(3, 4, dtype=DT),))
        m._record(0, 0, res.moments)
    # offset 0: steps 0..4 tracked (slot 3 takes steps 3, 4); offset 2: steps 2..6 (slot 3 takes 3..6); the
    # single-row last step is never counted
    assert m.norm_ih_l0.num_batches_tracked.tolist() == [1, 1, 2, 6]


@pytest.mark.parametrize("cell,norm", [pytest.param(c, n, id=case_id(c, n)) for c, n in itertools.product(CELL_IDS, ["layer", "batch"])])
def test_fused_constant_leading_steps_stay_finite_and_match(cell, norm):
    """Blank leading input (zero variance everywhere: degenerate features) keeps gradients finite and
    equal to the reference's, compared against the float64 reference."""
    torch.manual_seed(0)
    ref = make(cell, 8, 6, norm=norm, kernel="reference", dtype=DT)
    recnorm.init.initialize(ref, "orthogonal")  # zero biases: the states stay exactly 0 on blank input
    fast = make(cell, 8, 6, norm=norm, kernel="fused")
    fast.load_state_dict(ref.state_dict())
    x = torch.cat([torch.zeros(40, 5, 8), torch.rand(6, 5, 8)])
    grads = []
    for m in (ref, fast):
        out, _ = m(x.to(next(m.parameters()).dtype))
        grads.append(torch.autograd.grad(out[-1].sum(), list(m.parameters())))
    for u, v in zip(*grads):
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v.double(), u, rtol=1e-4, atol=1e-5 * u.abs().max().item())


@pytest.mark.parametrize("cell", CELL_IDS)
def test_bias_false_and_unbatched_input_match_reference(cell):
    for norm in ("layer", "batch"):
        ref, fast = _pair(cell, norm, bias=False)
        x = torch.randn(4, 3, 3, dtype=DT)
        assert_all_close(run_and_grad(ref, x, _hx(ref, 3)), run_and_grad(fast, x, _hx(fast, 3)), rtol=1e-9, atol=1e-10)
        # unbatched (L, F): one row per step, so batch norms use population statistics in training
        ref, fast = _pair(cell, norm)
        x = torch.randn(5, 3, dtype=DT)
        res = []
        for m in (ref, fast):
            xl = x.clone().requires_grad_(True)
            out, state = m(xl)
            h = state[0] if isinstance(state, tuple) else state
            res.append([out, h, *torch.autograd.grad(out.sum() + h.sum(), [xl] + list(m.parameters()))])
        assert_all_close(*res, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# The operators themselves
# ---------------------------------------------------------------------------------------------------


def _op_args(cell, norm, training, batch_sizes):
    torch.manual_seed(0)
    m = make(cell, 2, 3, dtype=DT, norm=norm)
    randomize(m)
    m.train(training)
    work = m.direction_work(0, 0)
    B = int(batch_sizes[0]) if batch_sizes is not None else 3
    shape = (int(sum(batch_sizes)), 2) if batch_sizes is not None else (4, B, 2)  # packed rows, or a full (T, B, F) batch
    x = torch.randn(*shape, dtype=DT, requires_grad=True)
    state = tuple(torch.randn(B, 3, dtype=DT, requires_grad=True) for _ in range(m.cell.state_size))
    return work, x, state


@pytest.mark.parametrize("cell,norm,training,packed", [
    pytest.param(c, n, t, p, id=case_id(c, n, t, p))
    for c, n, t, p in itertools.product(CELL_IDS, [None, "layer", "batch"], [True, False], [True, False])
])  # fmt: skip
def test_opcheck(cell, norm, training, packed, monkeypatch):
    """torch.library.opcheck: schema, fake kernel (shapes follow T and B), autograd registration and
    AOTDispatch agree with the real kernel."""
    bs = torch.tensor([3, 3, 2, 1]) if packed else None
    work, x, state = _op_args(cell, norm, training, bs)
    calls = []
    op = torch.ops.recnorm.fused_lstm if cell == "lstm" else torch.ops.recnorm.fused_gru_rnn
    call = fused._LSTM_CALL if cell == "lstm" else fused._GRU_RNN_CALL  # how the layers call the operator
    monkeypatch.setattr(fused, "_LSTM_CALL" if cell == "lstm" else "_GRU_RNN_CALL", lambda *a: calls.append(a) or call(*a))
    fused.run_direction(work, x, bs, state)
    monkeypatch.undo()
    (args,) = calls
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("cell,norm", [("rnn_tanh", None), ("rnn_relu", None), ("rnn_tanh", "layer"), ("gru", None)])
def test_a_plain_rnn_saves_only_what_its_backward_reads(cell, norm, monkeypatch):
    """An Elman RNN with no norm (no gains, no zoneout) differentiates through its outputs alone, so its
    training call keeps back the two gate terms (T * B * H values each); with a norm or as a GRU it saves
    them. Its gradients are checked against the reference in the gradcheck tests."""
    bs = torch.tensor([3, 3, 2, 1])
    work, x, state = _op_args(cell, norm, True, bs)
    calls = []
    call = fused._GRU_RNN_CALL  # how the layers call the operator
    monkeypatch.setattr(fused, "_GRU_RNN_CALL", lambda *a: calls.append(call(*a)) or calls[-1])
    fused.run_direction(work, x, bs, state)
    (res,) = calls
    XI, XH, stats = res[2], res[3], res[4]
    lean = cell != "gru" and norm is None
    assert (XI.numel(), XH.numel()) == ((0, 0) if lean else (9 * work.weight_hh.shape[0],) * 2)
    assert stats.numel() > 0  # what tells backward that this call saved for it


@pytest.mark.parametrize("cell,norm,training", [
    pytest.param(c, n, t, id=case_id(c, n, t)) for c, n, t in itertools.product(CELL_IDS, [None, "layer", "batch"], [True, False])
])  # fmt: skip
def test_gradcheck_fused_operator(cell, norm, training):
    """gradcheck in float64 of the operator's registered backward, through every differentiable input."""
    bs = torch.tensor([3, 3, 2, 1])
    work, x, state = _op_args(cell, norm, training, bs)
    names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    norms = work.present_norms()
    params = [getattr(work, n).detach().clone().requires_grad_(True) for n in names]
    gains = {s: (d.weight.detach().clone().requires_grad_(True), None if d.bias is None else d.bias.detach().clone().requires_grad_(True))
             for s, d in norms.items()}  # fmt: skip
    leaves = [x, *state, *params] + [t for g in gains.values() for t in g if t is not None]

    def f(x, *rest):
        st, ps = rest[: len(state)], rest[len(state) : len(state) + 4]
        it = iter(rest[len(state) + 4 :])
        nd = {}
        for s, d in norms.items():
            w = next(it)
            b = next(it) if d.bias is not None else None
            nd[s] = type(d)(**{**d.__dict__, "weight": w, "bias": b})
        w = work.replace(weight_ih=ps[0], weight_hh=ps[1], bias_ih=ps[2], bias_hh=ps[3], norms=nd)
        res = fused.run_direction(w, x, bs, tuple(st))
        return (res.output,) + tuple(res.state)

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-4)


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


# ---------------------------------------------------------------------------------------------------
# What the fused path serves, and what happens when it cannot
# ---------------------------------------------------------------------------------------------------


def _why(m, x=None, mode="eager"):
    x = torch.randn(6, m.input_size) if x is None else x
    return fused.supports(m.direction_work(0, 0), x, None, mode)


def test_supports_refusals():
    m = recnorm.GRU(3, 4, norm="layer")
    assert _why(m) is None
    assert "diagnostics" in fused.supports(m.direction_work(0, 0, on_output=lambda t, h: None), torch.randn(2, 3), None, "eager")
    assert "dtype" in _why(m, torch.randn(6, 3).double())  # dtype mismatch with the parameters
    assert "float32/float64" in _why(m, torch.randn(6, 3).half())
    assert "proj_size" in _why(recnorm.LSTM(3, 4, proj_size=2, norm="layer"))
    # layer norm over groups other than the GRU's (2H, H) or one group over 3H (haste's LayerNormGRU)
    work = m.direction_work(0, 0)
    one = recnorm.GroupedLayerNorm(12).descriptor()
    assert fused.supports(work.replace(norms={**work.norms, "hh": one}), torch.randn(2, 3), None, "eager") is None
    odd = recnorm.GroupedLayerNorm(12, groups=(4, 8)).descriptor()
    assert "groups" in fused.supports(work.replace(norms={**work.norms, "hh": odd}), torch.randn(2, 3), None, "eager")
    # mixed statistic families
    b = recnorm.GRU(3, 4, norm="batch").direction_work(0, 0)
    assert "same statistic family" in fused.supports(work.replace(norms={"ih": work.norms["ih"], "hh": b.norms["hh"]}), torch.randn(2, 3), None, "eager")
    assert "same statistic family" in fused.supports(work.replace(norms={"ih": work.norms["ih"]}), torch.randn(2, 3), None, "eager")
    # differing train flags of the batch-norm sites
    r = recnorm.RNN(3, 4, norm="batch")
    r.norm_hh_l0.eval()
    assert "training mode" in _why(r)
    # synchronized statistics
    s = recnorm.convert_sync_batchnorm(recnorm.LSTM(3, 4, norm="batch"))
    assert "synchronize" in _why(s)
    # a subclassed cell may change the math: it has no kernel kind unless it names one
    sub = type("MyGRU", (recnorm.nn.cells.GRUCellType,), {"step": recnorm.nn.cells.GRUCellType.step})
    assert sub().kind() is None
    assert "LSTM, GRU and RNN" in fused.supports(m.direction_work(0, 0).replace(cell=sub().descriptor()), torch.randn(2, 3), None, "eager")
    assert type("Same", (recnorm.nn.cells.GRUCellType,), {})().kind() == "gru"  # no new math: still served
    with pytest.raises(ValueError, match="kernel='fused' cannot run this layer: it does not serve proj_size"):
        recnorm.LSTM(3, 4, norm="layer", proj_size=2, kernel="fused")(torch.randn(2, 2, 3))


@pytest.mark.parametrize("cell,norm", [pytest.param(c, n, id=case_id(c, n)) for c, n in itertools.product(CELL_IDS, ["layer", "batch", "shared_batch"])])
def test_auto_uses_fused_and_env_var_forces_reference(cell, norm, monkeypatch):
    m = make(cell, 3, 4, norm=norm)
    calls = []
    monkeypatch.setattr(fused, "run_direction", lambda *a, **k: calls.append(1))
    monkeypatch.setenv("RECNORM_KERNEL", "reference")
    m(torch.randn(2, 2, 3))
    assert calls == []
    monkeypatch.setenv("RECNORM_KERNEL", "auto")
    with pytest.raises(AttributeError):  # the stub returns None: proves the fused path was taken
        m(torch.randn(2, 2, 3))
    assert calls == [1]


def test_build_failure_warns_once_and_falls_back(monkeypatch, caplog):
    from recnorm.kernels import _build

    def broken(*a, **k):
        raise RuntimeError("no compiler here\nlong build log")

    ext = fused.EXTENSIONS["lstm"]
    monkeypatch.setattr(ext, "module", None)
    monkeypatch.setattr(ext, "error", None)
    monkeypatch.setattr(ext, "onednn", None)
    # The build (or the import of a published build) fails: _build.load is the one door to the extension.
    monkeypatch.setattr(_build, "load", broken)
    m = recnorm.LSTM(3, 4, norm="layer")
    with caplog.at_level(logging.WARNING, logger="recnorm.kernels.fused"):
        for _ in range(3):
            out, _ = m(torch.randn(4, 2, 3))  # the reference loop serves it
            assert torch.isfinite(out).all()
    warnings = [r for r in caplog.records if r.name == "recnorm.kernels.fused"]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    assert "could not be built" in _why(m)


def test_backward_twice_with_retain_graph():
    """retain_graph=True twice gives the same gradients (saved buffers are not modified by backward)."""
    m = recnorm.LSTM(3, 4, norm="layer", dtype=DT, kernel="fused")
    out, _ = m(torch.randn(5, 2, 3, dtype=DT))
    g1 = torch.autograd.grad(out.sum(), list(m.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(out.sum(), list(m.parameters()))
    assert_all_close(g1, g2, rtol=0, atol=0)


def test_returned_tensors_are_ordinary_torch_tensors():
    """Outputs and input gradients are plain (resizable) allocations, not views of the kernel's pool."""
    m = recnorm.LSTM(64, 128, norm="layer", kernel="fused")
    x = torch.randn(40, 32, 64, requires_grad=True)  # buffers above the pool's 1 MiB threshold
    out, (h, c) = m(x)
    out.sum().backward()
    for t in (out, h, c, x.grad):
        assert t.untyped_storage().resizable()
    out.detach().resize_(80, 32, 128)  # what torch.nn.LSTM's output allows


@pytest.mark.parametrize("cell", CELL_IDS)
def test_double_backward_through_the_fused_kernel(cell):
    """create_graph=True through a fused kernel gives a gradient that is differentiable again (it is the
    reference loop's recomputation; see tests/kernels/test_autodiff.py): a gradient penalty gradchecks."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 2, dtype=DT, requires_grad=True)
    fast = make(cell, 2, 3, norm="layer", dtype=DT, kernel="fused")

    def penalty(weight):
        out, _ = torch.func.functional_call(fast, {"weight_hh_l0": weight}, (x,))
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return g.square().sum()

    w = fast.weight_hh_l0
    assert torch.autograd.gradcheck(penalty, (w.detach().clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_backward_gets_no_zero_filled_gradients_of_the_saved_terms(norm):
    """The operator returns its saved terms XI and XH ((N, 4H) each) as outputs; autograd must not hand
    backward a zero-filled gradient for each (it did: +50% peak training memory). Counted as the bytes ATen
    allocates during backward, which without the fix exceed XI and XH together (the kernel's own scratch
    comes from its pool and is not counted)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    T, B, I, H = 20, 64, 8, 64
    m = recnorm.LSTM(I, H, norm=norm, kernel="fused")
    out = m(torch.randn(T, B, I))[0]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out.sum().backward()
    allocated = sum(e.self_cpu_memory_usage for e in prof.key_averages() if e.self_cpu_memory_usage > 0)
    saved_terms = 2 * T * B * 4 * H * 4  # XI and XH, float32
    assert allocated < saved_terms, (allocated, saved_terms)
    assert m.weight_hh_l0.grad is not None and torch.isfinite(m.weight_hh_l0.grad).all()


@pytest.mark.skipif(not fused._onednn_available("lstm"), reason="oneDNN linear is not available in this torch build")
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_eval_calls_reuse_a_packed_weight_only_while_its_values_are_unchanged(cell, monkeypatch):
    """The oneDNN packing of W_hh is kept between forward calls that save nothing for a backward, and used
    again only for a weight whose values are bit for bit those it was packed from: an in-place change
    through ``.data``, which moves no version counter, must not leave a stale packing in use."""
    monkeypatch.setenv("RECNORM_FUSED_ONEDNN", "1")
    fused.empty_cache()
    torch.manual_seed(0)
    layer = getattr(recnorm, cell)(4, 8, kernel="fused").eval()
    x = torch.randn(5, 3, 4)

    def uncached():
        monkeypatch.setattr(fused, "PACK_CACHE_ENTRIES", 0)
        try:
            with torch.no_grad():
                return layer(x)[0]
        finally:
            monkeypatch.undo()
            monkeypatch.setenv("RECNORM_FUSED_ONEDNN", "1")

    with torch.no_grad():
        first = layer(x)[0]
        assert len(fused._PACKED) == 1
        again = layer(x)[0]  # from the kept packing
    assert torch.equal(first, again) and torch.equal(again, uncached())
    layer.weight_hh_l0.data.mul_(-0.5)  # no version counter moves
    with torch.no_grad():
        changed = layer(x)[0]
    assert not torch.equal(changed, first) and torch.equal(changed, uncached())
    with torch.no_grad():
        layer.weight_hh_l0.copy_(layer.weight_hh_l0.flip(0))
        assert torch.equal(layer(x)[0], uncached())
    # a forward that keeps what a backward needs packs its weight afresh and keeps nothing
    fused.empty_cache()
    assert not fused._PACKED
    layer.train()
    layer(x)[0].sum().backward()
    assert not fused._PACKED


def test_the_kept_packings_are_bounded(monkeypatch):
    monkeypatch.setattr(fused, "_reorder", lambda w, batch: w.detach().clone())  # packing itself is not under test
    fused.empty_cache()
    weights = [torch.randn(8, 2) for _ in range(fused.PACK_CACHE_ENTRIES + 2)]
    for w in weights:
        assert torch.equal(fused._pack(w, 3, reuse=True), w)
    assert len(fused._PACKED) == fused.PACK_CACHE_ENTRIES
    kept = {key[0] for key in fused._PACKED}
    assert kept == {w.data_ptr() for w in weights[2:]}  # the least recently used went first
    fused._pack(weights[2], 3, reuse=True)  # a hit makes it the most recently used
    extra = torch.randn(8, 2)
    fused._pack(extra, 3, reuse=True)
    assert {key[0] for key in fused._PACKED} == {w.data_ptr() for w in [weights[2], *weights[4:], extra]}
    fused.empty_cache()
    assert not fused._PACKED
