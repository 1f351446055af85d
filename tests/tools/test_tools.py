"""Every PyTorch tool a user may apply to a recnorm layer either gives the right answer or refuses clearly,
for every registered cell x norm: torch.jit.trace, torch.compile (fullgraph, training and eval; dynamic
packed batches without recompiling), torch.export with dynamic T and B, torch.onnx.export(dynamo=True)
run in onnxruntime, and torch.jit.script (a clear refusal)."""

import os
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from registry_cases import CELL_IDS, NORM_IDS, case_id, cell_variants, is_built_in, make

I, H = 4, 6
PRIMARY_CELLS = []  # one variant per registered cell: the expensive tools run on these
for cid, (name, _) in cell_variants().items():
    if name not in [cell_variants()[c][0] for c in PRIMARY_CELLS]:
        PRIMARY_CELLS.append(cid)

ALL = [pytest.param(c, n, id=case_id(c, n)) for c in CELL_IDS for n in NORM_IDS]
PRIMARY = [pytest.param(c, n, id=case_id(c, n)) for c in PRIMARY_CELLS for n in NORM_IDS]


def _trained(cell, norm, **kw):
    """A 2-layer model after two training steps (running statistics tracked), in eval mode."""
    torch.manual_seed(0)
    m = make(cell, I, H, 2, norm=norm, **kw)
    opt = torch.optim.SGD(m.parameters(), 0.1)
    for _ in range(2):
        out, _ = m(torch.randn(5, 3, I))
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
    return m.eval()


def _out(res):
    return res[0]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------------
# torch.jit.trace
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell,norm", ALL)
def test_trace_follows_other_lengths_and_batch_sizes(cell, norm):
    m = _trained(cell, norm)
    torch.manual_seed(1)
    try:
        traced = torch.jit.trace(m, (torch.randn(5, 3, I),), check_trace=False)
    except RuntimeError as exc:  # a plugin's cell or norm that no registered operator computes: refused clearly
        assert not is_built_in(cell, norm) and "torch.jit.trace cannot record this layer" in str(exc), exc
        return
    for shape in [(9, 7, I), (2, 2, I), (5, 3, I)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(_out(traced(x)), _out(m(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["batch", "layer", None])
def test_trace_in_training_mode_updates_running_statistics_like_eager(norm):
    torch.manual_seed(0)
    m = make("lstm", I, H, 2, norm=norm)
    twin = make("lstm", I, H, 2, norm=norm)
    traced = torch.jit.trace(m, (torch.randn(5, 3, I),), check_trace=False)
    twin.load_state_dict(m.state_dict())  # the trace ran one training call on m
    x = torch.randn(8, 6, I)
    torch.testing.assert_close(_out(traced(x)), _out(twin(x)), rtol=1e-5, atol=1e-6)
    for a, b in zip(m.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_trace_refuses_packed_input_and_unserved_cases_clearly():
    m = _trained("lstm", "batch")
    packed = pack_padded_sequence(torch.randn(5, 3, I), torch.tensor([3, 5, 2]), enforce_sorted=False)
    with pytest.raises(RuntimeError, match="PackedSequence input would bake its batch sizes"):
        torch.jit.trace(m, (packed,), check_trace=False)
    proj = make("lstm", I, H, 1, norm="layer", proj_size=3).eval()  # the fused kernels do not serve proj_size
    with pytest.raises(RuntimeError, match="cannot record this layer so that it stays right for other input shapes"):
        torch.jit.trace(proj, (torch.randn(5, 3, I),), check_trace=False)


# ---------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------


def _compare_compiled(cell, norm, backend, train):
    m = _trained(cell, norm)
    twin = make(cell, I, H, 2, norm=norm)
    twin.load_state_dict(m.state_dict())
    m.train(train)
    twin.train(train)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    torch.manual_seed(2)
    x = torch.randn(7, 5, I)
    results = []
    for model in (compiled, twin):
        xl = x.clone().requires_grad_(True)
        out, _ = model(xl)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), xl.grad] + [p.grad for p in (m if model is compiled else twin).parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(m.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell,norm", PRIMARY)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_eager(cell, norm, train):
    """fullgraph=True (no graph break), outputs, gradients and running statistics equal eager's. The
    aot_eager backend checks capture and AOTAutograd without inductor's slow C++ code generation."""
    _compare_compiled(cell, norm, "aot_eager", train)


@pytest.mark.parametrize("cell,norm", [("lstm", "batch"), ("gru", None)])
def test_compile_fullgraph_with_inductor(cell, norm):
    _compare_compiled(cell, norm, "inductor", True)


@pytest.mark.parametrize("cell,norm,bidir", [("lstm", "batch", False), ("gru", None, True), ("rnn_tanh", "layer", True)])
def test_compile_dynamic_packed_batches_do_not_recompile(cell, norm, bidir):
    """30 training steps of packed batches with 30 different lengths: at most 2 compilations."""
    torch.manual_seed(0)
    m = make(cell, I, H, 2, norm=norm, bidirectional=bidir)
    opt = torch.optim.SGD(m.parameters(), 0.01)
    compilations = []

    def backend(gm, example_inputs):
        compilations.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(m, dynamic=True, backend=backend)
    for step in range(30):
        T = 3 + step
        lengths = torch.randint(1, T + 1, (6,))
        lengths[0] = T
        out, _ = compiled(pack_padded_sequence(torch.randn(T, 6, I), lengths, enforce_sorted=False))
        out.data.square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert len(compilations) <= 2, f"{len(compilations)} compilations for 30 lengths"


# ---------------------------------------------------------------------------------------------------
# torch.export and ONNX
# ---------------------------------------------------------------------------------------------------


def _dims():
    return ({0: torch.export.Dim("T", min=2, max=4096), 1: torch.export.Dim("B", min=2, max=4096)},)


@pytest.mark.parametrize("cell,norm", ALL)
def test_export_with_dynamic_length_and_batch_matches_eager(cell, norm):
    m = _trained(cell, norm)
    ep = torch.export.export(m, (torch.randn(5, 3, I),), dynamic_shapes=_dims())
    for shape in [(9, 7, I), (2, 2, I)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(_out(ep.module()(x)), _out(m(x)), rtol=1e-4, atol=1e-5)
    # the exported program holds standard operators only: it runs without recnorm's extensions
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "recnorm" in t], targets


def test_export_in_training_mode_with_batch_statistics_refuses_clearly():
    m = _trained("lstm", "batch").train()
    with pytest.raises(Exception, match=r"call \.eval\(\) on the model first"):
        torch.export.export(m, (torch.randn(5, 3, I),), dynamic_shapes=_dims())


@pytest.mark.parametrize("cell,norm", [("lstm", "layer"), ("gru", "batch"), ("rnn_relu", "sequence_batch")])
def test_export_bidirectional_matches_eager(cell, norm):
    m = _trained(cell, norm, bidirectional=True)
    ep = torch.export.export(m, (torch.randn(5, 3, I),), dynamic_shapes=_dims())
    x = torch.randn(8, 6, I)
    torch.testing.assert_close(_out(ep.module()(x)), _out(m(x)), rtol=1e-4, atol=1e-5)


STANDARD_DOMAINS = {"", "ai.onnx"}


def _require_onnx():
    """onnx, onnxruntime and onnxscript come with the ``test`` (and ``onnx``) extra. Without them the ONNX tests
    skip and say what to install, except under ``./run test`` (RECNORM_REQUIRE_ONNX=1), where they must run."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        message = f"ONNX export needs {', '.join(missing)}: pip install -e '.[onnx]'"
        if os.environ.get("RECNORM_REQUIRE_ONNX") == "1":
            pytest.fail(message + " (RECNORM_REQUIRE_ONNX=1: ./run test installs them, so they must be there)")
        pytest.skip(message)


@pytest.mark.parametrize("cell,norm,bidir", [pytest.param(c, n, False, id=case_id(c, n)) for c in PRIMARY_CELLS for n in NORM_IDS]
                         + [pytest.param("lstm", "layer", True, id="lstm-layer-bidirectional")])
def test_onnx_export_runs_in_onnxruntime_on_other_shapes(cell, norm, bidir, tmp_path):
    _require_onnx()
    import onnx
    import onnxruntime as ort

    m = _trained(cell, norm, bidirectional=bidir)
    path = os.path.join(tmp_path, "model.onnx")
    program = torch.onnx.export(m, (torch.randn(5, 3, I),), dynamic_shapes=_dims(), dynamo=True, verbose=False)
    program.save(path)
    model = onnx.load(path)
    onnx.checker.check_model(model)

    def nodes(graph):
        for n in graph.node:
            yield n
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from nodes(a.g)

    domains = {n.domain for n in nodes(model.graph)}
    functions = {f.name for f in model.functions}
    ops = {n.op_type for n in nodes(model.graph)} - functions
    assert domains <= STANDARD_DOMAINS | {f.domain for f in model.functions}, domains
    assert ops & {"Scan", "Loop", "LSTM", "GRU", "RNN"}, ops
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shape in [(9, 7, I), (2, 2, I)]:
        x = torch.randn(*shape)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), _out(m(x)).detach(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# torch.jit.script
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELL_IDS)
def test_script_refuses_with_one_clear_error(cell):
    m = make(cell, I, H, norm="layer")
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile recnorm.*torch.jit.trace.*torch.export"):
        torch.jit.script(m)
    wrapper = torch.nn.Sequential(m)  # also inside a user's model
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile recnorm"):
        torch.jit.script(wrapper)


# ---------------------------------------------------------------------------------------------------
# The variants (issue 8): joint gate norm, carried cell, one-group GRU norm, zoneout, DropConnect
# ---------------------------------------------------------------------------------------------------

VARIANTS = {
    "lstm-layer-joint-carry-zoneout": ("lstm", dict(norm="layer", norm_kwargs={"joint": True, "carry_cell": True}, zoneout=(0.2, 0.1))),
    "lstm-rms-dropconnect": ("lstm", dict(norm="rms", weight_dropout=0.3)),
    "gru-layer-one-group-zoneout": ("gru", dict(norm="layer", norm_kwargs={"gate_groups": "one"}, zoneout=0.2)),
    "gru-batch-zoneout-dropconnect": ("gru", dict(norm="batch", zoneout=0.2, weight_dropout=0.3)),
    "rnn-rms-joint-zoneout": ("rnn_tanh", dict(norm="rms", norm_kwargs={"joint": True}, zoneout=0.2)),
}
VARIANT_IDS = list(VARIANTS)


def _variant(vid):
    cell, kw = VARIANTS[vid]
    return _trained(cell, kw.get("norm"), **{k: v for k, v in kw.items() if k != "norm"})


@pytest.mark.parametrize("vid", VARIANT_IDS)
def test_trace_of_variants_follows_other_shapes(vid):
    m = _variant(vid)
    traced = torch.jit.trace(m, (torch.randn(5, 3, I),), check_trace=False)
    for shape in [(9, 7, I), (2, 2, I)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(_out(traced(x)), _out(m(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vid", VARIANT_IDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_of_variants_matches_eager(vid, train):
    """In training the zoneout keep indicators and DropConnect masks come from torch's RNG: seeded alike,
    the compiled and the eager model draw the same ones."""
    m = _variant(vid)
    cell, kw = VARIANTS[vid]
    twin = make(cell, I, H, 2, **kw)
    twin.load_state_dict(m.state_dict())
    m.train(train)
    twin.train(train)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(7, 5, I)
    results = []
    for model, params in ((compiled, m), (twin, twin)):
        xl = x.clone().requires_grad_(True)
        torch.manual_seed(5)
        out, _ = model(xl)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), xl.grad] + [p.grad for p in params.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vid", VARIANT_IDS)
def test_export_and_onnx_of_variants_match_eager(vid, tmp_path):
    _require_onnx()
    import onnxruntime as ort

    m = _variant(vid)
    ep = torch.export.export(m, (torch.randn(5, 3, I),), dynamic_shapes=_dims())
    path = os.path.join(tmp_path, "model.onnx")
    torch.onnx.export(m, (torch.randn(5, 3, I),), dynamic_shapes=_dims(), dynamo=True, verbose=False).save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shape in [(9, 7, I), (2, 2, I)]:
        x = torch.randn(*shape)
        want = _out(m(x)).detach()
        torch.testing.assert_close(_out(ep.module()(x)), want, rtol=1e-4, atol=1e-5)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell,kw", [("gru", dict(norm="layer", bidirectional=True)), ("lstm", dict(norm="batch", zoneout=0.2)),
                                     ("rnn_tanh", dict(norm="rms", norm_kwargs={"joint": True}))])  # fmt: skip
def test_trace_raises_no_tracer_warning(cell, kw):
    """The layer's shape checks read sizes that torch.jit.trace records as traced values; they are fixed by
    the weights, so the trace of a served layer has nothing to warn about."""
    m = make(cell, I, H, 2, **kw).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(m, (torch.randn(5, 3, I),))
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)], [str(w.message) for w in caught]


def test_default_trace_passes_its_check_and_the_trace_trains_like_eager():
    """torch.jit.trace's sanity check re-traces under no_grad: the trace must not depend on the grad mode.
    Traced with parameters that require grad, the module keeps what backward needs in any mode and its
    gradients are eager's; traced after requires_grad_(False), it keeps nothing."""
    m = _trained("lstm", "layer").train()
    traced = torch.jit.trace(m, (torch.randn(5, 3, I),))  # check_trace=True, the default
    x = torch.randn(8, 4, I)
    grads = []
    for model in (traced, m):
        m.zero_grad(set_to_none=True)
        out = model(x)[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    lean = torch.jit.trace(m.eval().requires_grad_(False), (torch.randn(5, 3, I),))
    with torch.no_grad():
        torch.testing.assert_close(lean(x)[0], m(x)[0])
