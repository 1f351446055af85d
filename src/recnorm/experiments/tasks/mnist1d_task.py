"""MNIST-1D (Greydanus, 2020): a small procedurally generated 1-D sequence classification benchmark."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import random
import threading
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._common import ArrayClassificationTask, check_split, take
from .base import DataMissingError, register_task

__all__ = ["MNIST1DTask", "load_mnist1d_arrays", "MNIST1D_MODULE", "INSTALL_COMMAND"]

logger = logging.getLogger(__name__)

#: Module providing ``make_dataset``/``get_dataset_args`` (a constant so that tests can point it elsewhere).
MNIST1D_MODULE = "mnist1d.data"
INSTALL_COMMAND = "python -m pip install mnist1d"
NUM_CLASSES, LENGTH = 10, 40
SPLIT_SIZES = {"train": 3500, "valid": 500, "test": 1000}

_CACHE: Dict[str, Dict[str, np.ndarray]] = {}
_LOCK = threading.Lock()


def _missing(module: str) -> DataMissingError:
    return DataMissingError(f"the mnist1d task needs the mnist1d package ({module} is not importable). "
                            f"Install it with: {INSTALL_COMMAND}")


def check_mnist1d() -> None:
    """Raise :class:`DataMissingError` (with the install command) when mnist1d is missing."""
    try:
        found = importlib.util.find_spec(MNIST1D_MODULE.split(".")[0]) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise _missing(MNIST1D_MODULE)


def load_mnist1d_arrays() -> Dict[str, np.ndarray]:
    """The default MNIST-1D dataset (``x`` (4000, 40), ``y``, ``x_test`` (1000, 40), ``y_test``), generated
    locally once per process with ``make_dataset(get_dataset_args())``.

    ``get_dataset`` is deliberately not used: it downloads and writes a pickle into the working directory.
    ``make_dataset`` reseeds Python's and NumPy's global generators; their states are restored afterwards.
    """
    module_name = MNIST1D_MODULE
    with _LOCK:
        if module_name not in _CACHE:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise _missing(module_name) from exc
            start = time.perf_counter()
            py_state, np_state = random.getstate(), np.random.get_state()
            try:
                data = module.make_dataset(module.get_dataset_args())
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
            arrays = {key: np.asarray(data[key]) for key in ("x", "y", "x_test", "y_test")}
            expected = {"x": (4000, LENGTH), "y": (4000,), "x_test": (1000, LENGTH), "y_test": (1000,)}
            shapes = {key: arrays[key].shape for key in expected}
            if shapes != expected:
                raise ValueError(f"mnist1d make_dataset returned unexpected shapes {shapes}")
            _CACHE[module_name] = arrays
            logger.info("generated MNIST-1D in %.2f s", time.perf_counter() - start)
    return _CACHE[module_name]


@register_task
class MNIST1DTask(ArrayClassificationTask):
    """MNIST-1D, one value per step: T = 40 steps, 1 feature, 10 classes.

    Source: the ``mnist1d`` package, generated locally and deterministically with its default arguments
    (``make_dataset(get_dataset_args())``, seed 42; no download). Splits: its 4000 training examples,
    in their given (already shuffled) order, give 3500 train / 500 valid; its 1000 test examples are the
    test split. ``train_size``, ``valid_size``, ``test_size`` take the first examples of each split (None:
    all). Features are standardized with the mean and std of the full 3500-example train split.
    Labels read at the last step. Metric ``"accuracy"``; the trivial predictor scores ~0.10 (balanced
    classes), uniform logits give loss ln 10 ~ 2.303.
    """

    name = "mnist1d"

    def __init__(self, train_size: Optional[int] = None, valid_size: Optional[int] = None,
                 test_size: Optional[int] = None):
        self._sizes = {split: take(SPLIT_SIZES[split], size, f"{split}_size")
                       for split, size in (("train", train_size), ("valid", valid_size), ("test", test_size))}
        self.options = {"train_size": train_size, "valid_size": valid_size, "test_size": test_size}
        self.input_size = 1
        self.num_outputs = NUM_CLASSES
        self.seq_len = LENGTH
        check_mnist1d()

    def num_examples(self, split: str) -> int:
        check_split(split)
        return self._sizes[split]  # known without generating the data

    def split_indices(self, split: str) -> Tensor:
        """Indices into mnist1d's ``x``/``y`` (train, valid) or ``x_test``/``y_test`` (test)."""
        check_split(split)
        start = SPLIT_SIZES["train"] if split == "valid" else 0
        return torch.arange(start, start + self._sizes[split])

    def _split_arrays(self, split: str) -> Tuple[Tensor, Tensor]:
        arrays = load_mnist1d_arrays()
        train_x = arrays["x"][:SPLIT_SIZES["train"]]
        mean, std = float(train_x.mean()), float(train_x.std())
        xs, ys = (arrays["x_test"], arrays["y_test"]) if split == "test" else (arrays["x"], arrays["y"])
        idx = self.split_indices(split).numpy()
        x = torch.from_numpy(((xs[idx] - mean) / std).astype(np.float32))
        y = torch.from_numpy(ys[idx].astype(np.int64))
        return x, y

    def _features(self, x: Tensor) -> Tensor:
        return x.t().unsqueeze(-1).contiguous()
