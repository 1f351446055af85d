"""recnorm: normalization that works in recurrent networks, and the evidence of when it helps.

Public API:

* layers ``LSTM``, ``GRU``, ``RNN`` and cells ``LSTMCell``, ``GRUCell``, ``RNNCell``: drop-in
  replacements for torch.nn's, with ``norm=`` one of :func:`list_norms`;
* ``list_norms``, ``get_norm``, ``norm_options``, ``register_norm``: the normalization registry;
* ``recnorm.init``: named initialisation schemes;
* ``convert_sync_batchnorm``: batch statistics synchronized across data-parallel processes;
* ``calibrate`` (exact population statistics before evaluating batch norms; also
  ``recompute_population_statistics``) and ``recnorm.diagnostics``: statistics and gradient flow;
* ``recnorm.convert``: weights from torch.nn and haste layers (imported on first use);
* ``export_onnx``: ``torch.onnx.export(dynamo=True)`` that names the ``onnx`` extra when a package is missing.
"""

from typing import Any, Dict, List

from recnorm import diagnostics, init
from recnorm.diagnostics import calibrate, recompute_population_statistics
from recnorm.nn import (
    GRU,
    LSTM,
    RNN,
    GroupedLayerNorm,
    GRUCell,
    LSTMCell,
    NormSpec,
    RecurrentBatchNorm,
    RNNCell,
    SequenceBatchNorm,
    convert_sync_batchnorm,
    get_norm,
    list_cells,
    list_norms,
    register_norm,
)

__version__ = "0.1.0"

# Submodules and names imported on first attribute access (``recnorm.convert.from_haste(...)`` works without
# ``from recnorm import convert``), so that ``import recnorm`` stays light.
_LAZY = {"convert": ("recnorm.convert", None), "export_onnx": ("recnorm.export", "export_onnx")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = importlib.import_module(module)
        value = value if attr is None else getattr(value, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'recnorm' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))


def norm_options(name: str) -> Dict[str, Any]:
    """The ``norm_kwargs`` that normalization ``name`` accepts, with their defaults."""
    spec = get_norm(name)
    return {} if spec is None else dict(spec.options)


__all__ = [
    "LSTM",
    "GRU",
    "RNN",
    "LSTMCell",
    "GRUCell",
    "RNNCell",
    "RecurrentBatchNorm",
    "SequenceBatchNorm",
    "GroupedLayerNorm",
    "convert_sync_batchnorm",
    "NormSpec",
    "list_norms",
    "get_norm",
    "norm_options",
    "register_norm",
    "list_cells",
    "calibrate",
    "recompute_population_statistics",
    "diagnostics",
    "init",
    "convert",
    "export_onnx",
    "__version__",
]
