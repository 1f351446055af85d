"""Public API: registries, error messages, init schemes, diagnostics."""

import math
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import recnorm
import registry_cases
import registry_toys
from recnorm.registry import Registry


# ---------------------------------------------------------------------------------------------------
# errors say what was expected and what arrived, before any computation
# ---------------------------------------------------------------------------------------------------


def test_unknown_norm_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown norm 'bn'.*" + re.escape(str(recnorm.list_norms()))):
        recnorm.LSTM(3, 4, norm="bn")


def test_unknown_norm_kwargs_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown norm_kwargs \['gamma'\].*\['eps', 'gain_init', 'max_steps', 'momentum'\]"):
        recnorm.GRU(3, 4, norm="batch", norm_kwargs={"gamma": 0.1})
    with pytest.raises(ValueError, match="norm is None"):
        recnorm.GRU(3, 4, norm_kwargs={"eps": 1e-3})
    with pytest.raises(ValueError, match="max_steps"):
        recnorm.LSTM(3, 4, norm="batch", norm_kwargs={"max_steps": 0})


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: recnorm.GRU(3, 4, proj_size=2), "proj_size argument is only supported for LSTM, not RNN or GRU"),
        (lambda: recnorm.RNN(3, 4, proj_size=2), "proj_size argument is only supported for LSTM, not RNN or GRU"),
        (lambda: recnorm.LSTM(3, 4, proj_size=4), "proj_size has to be smaller than hidden_size"),
        (lambda: recnorm.LSTM(3, 0), "hidden_size must be greater than zero, got 0"),
        (lambda: recnorm.LSTM(3, 4, num_layers=0), "num_layers must be greater than zero"),
        (lambda: recnorm.LSTM(3, 4, dropout=1.5), r"dropout should be a number in range \[0, 1\]"),
        (lambda: recnorm.RNN(3, 4, nonlinearity="sigmoid"), r"Unknown nonlinearity 'sigmoid'\. Select from 'tanh' or 'relu'"),
        (lambda: recnorm.LSTM(3, 4, kernel="cuda"), "unknown kernel 'cuda'"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs():
    """torch.nn's exception types and wording (tests/nn/test_torch_battery.py compares every case with torch.nn
    itself), with the shapes that arrived after it."""
    m = recnorm.LSTM(3, 4, num_layers=2)
    with pytest.raises(ValueError, match=r"LSTM: Expected input to be 2D or 3D, got 4D instead .*got shape \(2, 3, 4, 5\)"):
        m(torch.randn(2, 3, 4, 5))
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. Expected 3, got 5"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 3, 4\), got \[1, 3, 4\]"):
        m(torch.randn(2, 3, 3), (torch.zeros(1, 3, 4), torch.zeros(2, 3, 4)))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(2, 3, 4\), got \[2, 2, 4\]"):
        m(torch.randn(2, 3, 3), (torch.zeros(2, 3, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(RuntimeError, match=r"For batched 3-D input, hx and cx should also be 3-D but got \(2-D, 2-D\) tensors"):
        m(torch.randn(2, 3, 3), (torch.zeros(2, 4), torch.zeros(2, 4)))
    with pytest.raises(TypeError, match=r"expected hx to be a tuple \(h_0, c_0\)"):
        m(torch.randn(2, 3, 3), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"RNN input dtype \(torch.int64\) does not match weight dtype \(torch.float32\)"):
        m(torch.ones(2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"RNN input dtype \(torch.float64\) does not match weight dtype"):
        m(torch.randn(2, 3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN, got an input of 0 steps"):
        m(torch.randn(0, 3, 3))
    g = recnorm.GRU(3, 4)
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 2, 4\), got \[1, 2, 5\]"):
        g(torch.randn(5, 2, 3), torch.zeros(1, 2, 5))


def test_cell_errors():
    cell = recnorm.LSTMCell(3, 4, norm="batch")
    with pytest.raises(ValueError, match="keeps statistics per time step; pass step=t"):
        cell(torch.randn(2, 3))
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        cell(torch.randn(2, 3), step=-1)
    with pytest.raises(RuntimeError, match="input has inconsistent input_size: got 5 expected 3"):
        cell(torch.randn(2, 5), step=0)
    with pytest.raises(RuntimeError, match="Input batch size 2 doesn't match hidden0 batch size 3"):
        cell(torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(3, 4)), step=0)
    # layer norm keeps no per-step statistics: no step needed
    out = recnorm.GRUCell(3, 4, norm="layer")(torch.randn(2, 3))
    assert out.shape == (2, 4)


# ---------------------------------------------------------------------------------------------------
# registries
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm,kwargs,match", [
    ("batch", {"eps": "1e-5"}, r"eps \(norm_kwargs of norm 'batch'\): expected a positive finite number, got '1e-5' \(str\)"),
    ("batch", {"eps": float("inf")}, r"eps .*: expected a positive finite number, got inf"),
    ("layer", {"eps": 0.0}, r"eps .*: expected a positive finite number, got 0.0"),
    ("batch", {"momentum": "0.1"}, r"momentum .*: expected a number in \[0, 1\], or None .*, got '0.1' \(str\)"),
    ("shared_batch", {"momentum": 1.5}, r"momentum .*: expected a number in \[0, 1\]"),
    ("batch", {"gain_init": float("nan")}, r"gain_init .*: expected a finite number, got nan"),
    ("batch", {"max_steps": 2.7}, r"max_steps .*: expected an integer >= 1, got 2.7 \(float\)"),
    ("batch", {"max_steps": True}, r"max_steps .*: expected an integer >= 1, got True \(bool\)"),
    ("batch", {"max_steps": 0}, r"max_steps .*: expected an integer >= 1, got 0"),
    ("batch", "eps=1", r"norm_kwargs must be a dict of options such as \{'eps': 1e-5\}, got 'eps=1' \(str\)"),
    ("batch", {"epsilon": 1e-3}, r"unknown norm_kwargs \['epsilon'\] for norm 'batch'; expected a subset of"),
])
def test_bad_norm_kwargs_name_the_option_what_was_expected_and_what_arrived(norm, kwargs, match):
    for cls in (recnorm.LSTM, recnorm.GRUCell):
        with pytest.raises(ValueError, match=match):
            cls(3, 4, norm=norm, norm_kwargs=kwargs)


def test_good_norm_kwargs_are_normalized():
    m = recnorm.LSTM(3, 4, norm="batch", norm_kwargs={"eps": 1e-3, "momentum": None, "max_steps": 7, "gain_init": 1})
    assert m.norm_kwargs == {"gain_init": 1.0, "max_steps": 7, "momentum": None, "eps": 1e-3}
    assert m.norm_ih_l0.running_mean.shape == (7, 16) and m.norm_ih_l0.momentum is None


def test_registry_listing_and_options():
    assert {"batch", "layer", "rms", "sequence_batch", "shared_batch"} <= set(recnorm.list_norms())
    assert recnorm.list_norms() == sorted(recnorm.list_norms())
    assert recnorm.norm_options("batch") == {"gain_init": 0.1, "max_steps": 1000, "momentum": 0.3, "eps": 1e-5}
    assert recnorm.norm_options("layer")["gain_init"] == 1.0
    assert recnorm.norm_options(None) == {}
    assert {"gru", "lstm", "rnn"} <= set(recnorm.list_cells()) and recnorm.list_cells() == sorted(recnorm.list_cells())
    with pytest.raises(ValueError, match="unknown cell"):
        recnorm.nn.get_cell("indrnn")


def test_a_registered_norm_is_usable_by_every_layer():
    def build(site, num_features, groups, *, gain_init, **fk):
        if site != "hh":
            return None
        return recnorm.GroupedLayerNorm(num_features, gain_init=gain_init, shift=False, **fk)

    spec = recnorm.NormSpec("test_hh_only_layer", build, {"gain_init": 2.0}, "LN on the recurrent term only")
    recnorm.register_norm(spec)
    try:
        m = recnorm.GRU(3, 4, norm="test_hh_only_layer")
        assert m.norm_ih_l0 is None and float(m.norm_hh_l0.weight[0].detach()) == 2.0
        assert m(torch.randn(5, 2, 3))[0].shape == (5, 2, 4)
    finally:
        recnorm.nn.NORMS.unregister("test_hh_only_layer")


def test_registry_takes_the_name_from_the_entry():
    reg = Registry("study")
    first = types.SimpleNamespace(name="first")
    assert reg.register(first) is first and reg.register(first) is first  # the same object again: a no-op
    assert reg.get("first") is first and reg["first"] is first and reg.resolve("first") is first
    assert reg.resolve(first) is first and "first" in reg and len(reg) == 1

    @reg.register
    class Second:
        name = "second"

    assert reg.names() == ["first", "second"] and list(reg) == ["first", "second"]
    with pytest.raises(ValueError, match=r"study 'first' is already registered \(a SimpleNamespace\)"):
        reg.register(types.SimpleNamespace(name="first"))
    replacement = reg.register(types.SimpleNamespace(name="first"), replace=True)
    assert reg.get("first") is replacement
    with pytest.raises(ValueError, match=r"unknown study 'third'; expected one of \['first', 'second'\]"):
        reg.get("third")
    for bad in (types.SimpleNamespace(name="Bad Name"), types.SimpleNamespace(title="x"), "first"):
        with pytest.raises(ValueError, match="a study needs a `name` in lowercase snake case"):
            reg.register(bad)
    assert reg.unregister("second") is Second and reg.names() == ["first"]


def test_registry_loads_its_built_in_entries_once_before_the_first_lookup():
    calls = []
    reg = Registry("thing", load=lambda: calls.append(reg.register(types.SimpleNamespace(name="built_in"))))
    reg.register(types.SimpleNamespace(name="plugin"))
    assert calls == []
    assert reg.names() == ["built_in", "plugin"] and "built_in" in reg and len(calls) == 1


def test_every_registry_has_the_one_shape():
    from recnorm import kernels
    from recnorm.experiments.tasks.base import TASKS, get_task, list_tasks

    for reg in (recnorm.nn.CELLS, recnorm.nn.NORMS, TASKS, kernels.IMPLEMENTATIONS):
        assert isinstance(reg, Registry) and len(reg) >= 3
        assert all(entry.name == name for name, entry in reg.items())
        with pytest.raises(ValueError, match=rf"unknown {reg.kind} 'nope'; expected one of \[.*'{reg.names()[0]}'"):
            reg.get("nope")
    # the public helpers are calls on the registries
    assert recnorm.list_norms() == recnorm.nn.NORMS.names() and recnorm.list_cells() == recnorm.nn.CELLS.names()
    assert list_tasks() == TASKS.names() and get_task("digits") is TASKS.get("digits")
    assert recnorm.get_norm("layer") is recnorm.nn.NORMS.get("layer")
    assert recnorm.nn.get_cell("rnn", nonlinearity="relu").kind() == "rnn_relu"
    assert kernels.KERNELS == ("auto", *kernels.IMPLEMENTATIONS.names())
    assert kernels.IMPLEMENTATIONS.get("reference").module is kernels.reference
    with pytest.raises(ValueError, match=r"unknown kernel 'cuda'; expected one of \['auto', 'fused', 'native'"):
        kernels.resolve_kernel("cuda")


def test_norm_labels_come_from_the_norm_specs():
    assert [recnorm.nn.norm_label(n) for n in [None, "layer", "batch", "shared_batch"]] == [
        "no norm", "layer norm", "per-step BN", "shared BN"]
    assert recnorm.NormSpec("unlabelled", lambda *a, **k: None, {}, "").label == "unlabelled"


def test_register_cell_takes_a_class_and_keeps_its_older_form():
    class Unnamed(recnorm.nn.cells.LSTMCellType):  # inherits the name "lstm"
        pass

    class Named(recnorm.nn.CellType):
        name = "named"

    with pytest.raises(ValueError, match=r"cell 'lstm' is already registered \(by LSTMCellType\)"):
        recnorm.nn.register_cell(Unnamed)
    try:
        assert recnorm.nn.register_cell("old_form", Unnamed) is Unnamed and Unnamed.name == "old_form"
        assert isinstance(recnorm.nn.get_cell("old_form"), Unnamed)
        with pytest.raises(ValueError, match=r"the class is named 'named'; call register_cell\(.*Named\)"):
            recnorm.nn.register_cell("other", Named)
        with pytest.raises(ValueError, match="a cell is a CellType subclass"):
            recnorm.nn.register_cell(types.SimpleNamespace(name="x"))
    finally:
        recnorm.nn.CELLS.unregister("old_form")


@pytest.fixture
def toys():
    registry_toys.register()
    yield
    registry_toys.unregister()


def test_registered_pieces_enter_the_registry_cases(toys):
    assert "toy_mgu" in registry_cases.cell_ids() and "toy_hh_rms" in registry_cases.norm_ids()
    assert ("toy_mgu", "toy_hh_rms") in registry_cases.cases() and ("lstm", "toy_hh_rms") in registry_cases.cases()
    assert registry_cases.make("toy_mgu", 3, 4).cell.kind() is None  # no fast kernel runs math it does not know


@pytest.mark.parametrize("norm", [None, "toy_hh_rms"])
def test_a_registered_cell_and_norm_compute_their_equations(toys, norm):
    torch.manual_seed(0)
    m = registry_cases.make("toy_mgu", 3, 4, norm=norm, dtype=torch.float64)
    registry_cases.randomize(m)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h = torch.zeros(2, 4, dtype=torch.float64)
    expect = []
    for t in range(5):  # by hand: the toy cell's equations, with RMSNorm of W_hh h (gain only) when normed
        gh = h @ m.weight_hh_l0.T
        if norm is not None:
            assert m.norm_ih_l0 is None
            gh = gh / gh.square().mean(1, keepdim=True).add(1e-5).sqrt() * m.norm_hh_l0.weight
        gi, gh = x[t] @ m.weight_ih_l0.T + m.bias_ih_l0, gh + m.bias_hh_l0
        f = torch.sigmoid(gi[:, :4] + gh[:, :4])
        n = torch.tanh(gi[:, 4:] + f * gh[:, 4:])
        h = (1 - f) * h + f * n
        expect.append(h)
    out, hn = m(x)
    torch.testing.assert_close(out, torch.stack(expect), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hn[0], h, rtol=1e-12, atol=1e-12)


def test_registered_pieces_are_enrolled_by_the_test_suite():
    """A cell and a norm registered by a plugin (``pytest -p registry_toys``) are collected into every
    registry-driven test, and the gradcheck, padding and per-norm tests pass on them."""
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.dirname(os.path.dirname(os.path.abspath(recnorm.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, tests, os.environ.get("PYTHONPATH", "")]))
    files = [os.path.join(tests, *f) for f in (("nn", "test_norms.py"), ("nn", "test_dropin.py"), ("tools", "test_tools.py"))]
    base = [sys.executable, "-m", "pytest", "-p", "registry_toys", "-p", "no:cacheprovider", "-q"]
    collected = subprocess.run(base + ["--collect-only", *files], capture_output=True, text=True, env=env, cwd=tests, timeout=600)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    ids = collected.stdout.splitlines()
    for test in ("test_norms.py::test_gradcheck_layer[False-toy_mgu-toy_hh_rms]",
                 "test_norms.py::test_gradcheck_layer[True-lstm-toy_hh_rms]",
                 "test_norms.py::test_gradcheck_cell[toy_mgu-batch]",
                 "test_norms.py::test_padding_changes_nothing[eval-toy_mgu-shared_batch]",
                 "test_norms.py::test_state_dict_round_trip[toy_hh_rms]",
                 "test_tools.py::test_export_with_dynamic_length_and_batch_matches_eager[toy_mgu-toy_hh_rms]"):
        assert any(line.endswith(test) for line in ids), (test, [i for i in ids if "toy" in i][:20])
    run = subprocess.run(base + [files[0], "-k", "toy and (gradcheck or padding)"], capture_output=True, text=True,
                         env=env, cwd=tests, timeout=900)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


def test_import_recnorm_leaves_torch_dynamo_unimported():
    """torch._dynamo is half the time of `import recnorm` (and of collecting the tests); the fused kernels'
    `available` carries the mark of torch._dynamo.assume_constant_result without importing it."""
    src = os.path.dirname(os.path.dirname(os.path.abspath(recnorm.__file__)))
    code = "import sys, recnorm, recnorm.experiments.train, recnorm.cli; print('torch._dynamo' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300).stdout.strip() == "False"
    import torch._dynamo

    from recnorm.kernels import fused

    marks = vars(torch._dynamo.assume_constant_result(lambda: 0))
    assert marks and all(getattr(fused.available, k, None) == v for k, v in marks.items())


# ---------------------------------------------------------------------------------------------------
# init schemes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", recnorm.init.list_inits())
@pytest.mark.parametrize("layer", [recnorm.LSTM, recnorm.GRU, recnorm.RNN, torch.nn.LSTM])
def test_init_schemes_apply_to_every_layer(scheme, layer):
    m = layer(6, 8, num_layers=2, bidirectional=True)
    recnorm.init.initialize(m, scheme, gain=1.5)
    w = m.weight_hh_l1_reverse
    blocks = w.split(8, 0)
    if scheme == "orthogonal":
        for b in blocks:
            torch.testing.assert_close(b @ b.T, 1.5**2 * torch.eye(8), atol=1e-5, rtol=1e-5)
    elif scheme == "identity":
        for b in blocks:
            torch.testing.assert_close(b, 1.5 * torch.eye(8))
    elif scheme == "xavier":
        bound = 1.5 * math.sqrt(6 / (8 + 8))
        assert w.abs().max() <= bound
    elif scheme == "normal":
        torch.manual_seed(0)
        big = layer(6, 400)
        recnorm.init.initialize(big, "normal", gain=1.5)
        assert abs(big.weight_hh_l0.std().item() - 1.5 / math.sqrt(400)) < 0.01 / math.sqrt(400) * 10
    elif scheme == "default":
        assert w.abs().max() <= 1.5 / math.sqrt(8)
    if scheme != "default":
        assert m.bias_ih_l0.abs().sum() == 0


def test_init_leaves_norm_parameters_and_sets_forget_bias():
    m = recnorm.LSTM(3, 4, norm="batch")
    recnorm.init.initialize(m, "orthogonal", forget_bias=1.0)
    torch.testing.assert_close(m.bias_ih_l0.detach(), torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 8))
    torch.testing.assert_close(m.bias_hh_l0.detach(), torch.zeros(16))
    torch.testing.assert_close(m.norm_hh_l0.weight.detach(), torch.full((16,), 0.1))
    with pytest.raises(ValueError, match="forget_bias applies to LSTM layers only"):
        recnorm.init.initialize(recnorm.GRU(3, 4), "orthogonal", forget_bias=1.0)
    with pytest.raises(ValueError, match="unknown init scheme 'he'"):
        recnorm.init.initialize(m, "he")
    with pytest.raises(ValueError, match="gain must be a positive finite number"):
        recnorm.init.initialize(m, "orthogonal", gain=-1)
    with pytest.raises(ValueError, match="no recurrent weights"):
        recnorm.init.initialize(torch.nn.Linear(3, 4))


def test_normalized_forward_is_invariant_to_recurrent_weight_scale():
    """Layer and batch norm on W_hh h separately: scaling W_hh changes nothing in the forward pass."""
    for norm in ("layer", "batch"):
        torch.manual_seed(0)
        # eps breaks the invariance where the variance is tiny (early steps): make it negligible
        m = recnorm.LSTM(3, 4, norm=norm, norm_kwargs={"eps": 1e-12}, dtype=torch.float64)
        x = torch.randn(6, 5, 3, dtype=torch.float64)
        a = m(x)[0]
        with torch.no_grad():
            m.weight_hh_l0.mul_(7.0)
        torch.testing.assert_close(m(x)[0], a)


# ---------------------------------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------------------------------


def test_capture_reports_total_gradient_through_time():
    torch.manual_seed(0)
    m = recnorm.RNN(2, 3, dtype=torch.float64)
    x = torch.randn(4, 2, 2, dtype=torch.float64)
    with recnorm.diagnostics.capture(m) as cap:
        out, _ = m(x)
        out[-1].sum().backward()
    g = cap.hidden_grad_norms()["rnn.l0"]
    assert g.shape == (4,)
    # by hand: dL/dh_t = W_hh^T diag(1 - h_{t+1}^2) dL/dh_{t+1}, starting from ones at the last step
    hs = cap.hidden_states()["rnn.l0"]
    d = torch.ones(2, 3, dtype=torch.float64)
    expect = [d.norm(dim=1).mean()]
    for t in range(3, 0, -1):
        d = (d * (1 - hs[t].detach() ** 2)) @ m.weight_hh_l0.detach()
        expect.append(d.norm(dim=1).mean())
    torch.testing.assert_close(g, torch.stack(expect[::-1]))
    assert m._step_observer is None  # the context cleans up


def test_population_stats_and_capture_batch_stats():
    m = torch.nn.Sequential()
    m.add_module("rnn", recnorm.LSTM(3, 4, norm="batch", norm_kwargs={"max_steps": 10}))
    with recnorm.diagnostics.capture(m) as cap:
        m.rnn(torch.randn(7, 5, 3))
    stats = cap.batch_stats()
    assert set(stats) == {"rnn.norm_ih_l0", "rnn.norm_hh_l0", "rnn.norm_c_l0"}
    assert stats["rnn.norm_c_l0"]["mean"].shape == (7, 4)
    pop = recnorm.diagnostics.population_stats(m)
    assert pop["rnn.norm_hh_l0"]["mean"].shape == (10, 16)
    assert pop["rnn.norm_hh_l0"]["tracked"].tolist() == [1] * 7 + [0] * 3
    assert m.rnn.norm_c_l0._observers == []


def test_packed_output_is_a_packed_sequence_with_torch_metadata():
    m = recnorm.LSTM(3, 4, bidirectional=True)
    x = torch.randn(5, 3, 3)
    packed = pack_padded_sequence(x, torch.tensor([2, 5, 3]), enforce_sorted=False)
    out, (h, c) = m(packed)
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    assert torch.equal(out.unsorted_indices, packed.unsorted_indices)
    assert h.shape == (2, 3, 4) and out.data.shape == (10, 8)
