"""ONNX export of models holding recnorm layers.

``torch.onnx.export(model, args, dynamo=True)`` exports recnorm layers as an ONNX ``Scan`` loop (the
``scan`` kernel; see ``docs/deployment.md``). It needs ``onnx`` and ``onnxscript``, and running the
exported file needs ``onnxruntime``: none of them is a dependency of recnorm; the ``onnx`` extra installs
all three (``pip install 'recnorm[onnx]'``). :func:`export_onnx` is that call with a check first, so that
a missing package is named together with the extra instead of surfacing from torch's internals.
"""

from __future__ import annotations

import importlib
from typing import Any, List

__all__ = ["export_onnx", "missing_onnx_packages", "ONNX_INSTALL_HINT"]

ONNX_INSTALL_HINT = "pip install 'recnorm[onnx]'"
_NEEDED = ("onnx", "onnxscript")


def missing_onnx_packages() -> List[str]:
    """The packages that ``torch.onnx.export(..., dynamo=True)`` needs and this environment cannot import,
    each as ``"name (the import error)"``."""
    missing = []
    for name in _NEEDED:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
    return missing


def export_onnx(model: Any, args: Any, f: Any = None, **kwargs: Any) -> Any:
    """``torch.onnx.export(model, args, f, dynamo=True, **kwargs)``, after checking that the packages it needs
    are installed; raises ImportError naming them and the ``onnx`` extra otherwise.

    Example::

        recnorm.export_onnx(model.eval(), (x,), "model.onnx",
                            dynamic_shapes=({0: torch.export.Dim("T"), 1: torch.export.Dim("B")},))
    """
    missing = missing_onnx_packages()
    if missing:
        raise ImportError(
            f"ONNX export of recnorm layers needs onnx and onnxscript (and onnxruntime to run the file); missing: "
            f"{', '.join(missing)}. Install them with {ONNX_INSTALL_HINT}"
        )
    import torch

    kwargs.setdefault("dynamo", True)
    return torch.onnx.export(model, args, f, **kwargs)
