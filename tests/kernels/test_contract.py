"""The layering: recnorm.kernels reads a data contract and imports nothing from recnorm.nn (or the
experiments); the layers hand kernels descriptors only."""

import ast
import pathlib

import torch

import recnorm
from recnorm.kernels.contract import NormDesc

SRC = pathlib.Path(recnorm.__file__).parent


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):  # every import, at any depth (lazy ones inside functions too)
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module or ""


def test_kernels_import_nothing_from_the_layers_or_above():
    files = sorted((SRC / "kernels").rglob("*.py"))
    assert files
    bad = {
        str(f.relative_to(SRC)): name
        for f in files
        for name in _imports(f)
        if name.startswith(("recnorm.nn", "recnorm.experiments", "recnorm.cli", "recnorm.diagnostics"))
    }
    assert not bad, f"kernel modules import from the layers or above: {bad}"


def test_the_import_reader_sees_relative_and_lazy_imports(tmp_path):
    """The check above can fail: a relative import inside a function is found."""
    pkg = SRC / "kernels"
    fake = pkg / "_contract_probe_test.py"
    fake.write_text("def f():\n    from ..nn import cells\n    import recnorm.nn.norms\n")
    try:
        assert set(_imports(fake)) == {"recnorm.nn", "recnorm.nn.norms"}
    finally:
        fake.unlink()


def test_layers_describe_every_site_as_plain_data():
    m = recnorm.LSTM(3, 4, norm="batch")
    work = m.direction_work(0, 0)
    assert set(work.norms) == {"ih", "hh", "cell"}
    for site, d in work.norms.items():
        assert isinstance(d, NormDesc) and d.stat == "step" and d.center
        assert d.running_mean is m.get_submodule(f"{ {'ih': 'norm_ih', 'hh': 'norm_hh', 'cell': 'norm_c'}[site]}_l0").running_mean
    assert work.cell.kind == "lstm"
    g = recnorm.GRU(3, 4, norm="layer").direction_work(0, 0)
    assert g.norms["ih"].stat == "row" and g.norms["ih"].groups == (8, 4)
    s = recnorm.RNN(3, 4, norm="sequence_batch").direction_work(0, 0)
    assert set(s.norms) == {"ih"} and s.norms["ih"].stat == "sequence"
    assert recnorm.LSTM(3, 4, norm="shared_batch").direction_work(0, 0).norms["hh"].stat == "shared"


def test_kernels_never_write_module_state_running_statistics_come_back_as_data():
    """A training call of a kernel leaves the buffers alone and returns the batch moments; the layer folds
    them in (the layer's own call updates its buffers)."""
    from recnorm import kernels

    m = recnorm.LSTM(3, 4, norm="batch")
    before = {n: b.clone() for n, b in m.named_buffers()}
    work = m.direction_work(0, 0)
    x = torch.randn(5, 2, 3)
    for impl in ("reference", "fused"):
        res = kernels.run_direction(work, x, None, (torch.zeros(2, 4), torch.zeros(2, 4)), impl)
        assert set(res.moments) == {"ih", "hh", "cell"} and res.moments["hh"].mean.shape == (5, 16)
        for n, b in m.named_buffers():
            assert torch.equal(b, before[n]), (impl, n)
    m(x)
    assert int(m.norm_ih_l0.num_batches_tracked[:5].sum()) == 5
