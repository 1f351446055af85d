"""The package's own edges: lazily imported submodules, and ONNX export naming the extra it needs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import recnorm

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_convert_is_an_attribute_imported_on_first_use():
    out = _python("import sys, recnorm; print('recnorm.convert' in sys.modules); "
                  "print(callable(recnorm.convert.from_haste)); print('convert' in dir(recnorm))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"]


def test_an_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        recnorm.nonexistent  # noqa: B018


def test_onnx_export_without_onnxscript_names_the_extra():
    # onnxscript made unimportable in a fresh interpreter, as in an environment without the extra
    out = _python("import sys; sys.modules['onnxscript'] = None\n"
                  "import torch, recnorm\n"
                  "m = recnorm.LSTM(3, 4, norm='layer').eval()\n"
                  "try:\n"
                  "    recnorm.export_onnx(m, (torch.randn(5, 2, 3),), 'x.onnx')\n"
                  "except ImportError as exc:\n"
                  "    print(exc)\n")
    assert out.returncode == 0, out.stderr
    assert "missing: onnxscript" in out.stdout and "pip install 'recnorm[onnx]'" in out.stdout


def test_export_onnx_exports_when_the_extra_is_installed(tmp_path):
    from recnorm.export import missing_onnx_packages

    if missing_onnx_packages():
        pytest.skip("the onnx extra is not installed: pip install -e '.[onnx]'")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = recnorm.GRU(3, 4, norm="layer").eval()
    x = torch.randn(5, 2, 3)
    path = str(tmp_path / "m.onnx")
    recnorm.export_onnx(m, (x,), path, dynamic_shapes=({0: torch.export.Dim("T"), 1: torch.export.Dim("B")},))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x2 = torch.randn(7, 3, 3)
    got = session.run(None, {session.get_inputs()[0].name: x2.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), m(x2)[0].detach(), rtol=1e-4, atol=1e-5)
