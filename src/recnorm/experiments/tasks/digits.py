"""Sequential 8x8 digits: scikit-learn's bundled ``load_digits`` read pixel by pixel."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._common import ArrayClassificationTask, check_split, take
from .base import DataMissingError, register_task

__all__ = ["DigitsTask", "load_digits_arrays", "SKLEARN_DATASETS_MODULE", "INSTALL_COMMAND"]

logger = logging.getLogger(__name__)

#: Module providing ``load_digits`` (a module-level constant so that tests can point it elsewhere).
SKLEARN_DATASETS_MODULE = "sklearn.datasets"
INSTALL_COMMAND = "python -m pip install scikit-learn"
NUM_EXAMPLES, NUM_CLASSES = 1797, 10
SPLIT_SIZES = {"train": 1297, "valid": 250, "test": 250}
#: Seed of the fixed shuffle that defines the train/valid/test split.
SPLIT_SEED = 0

_CACHE: Dict[str, Tuple[Tensor, Tensor]] = {}
_LOCK = threading.Lock()


def _missing(module: str) -> DataMissingError:
    return DataMissingError(f"the digits task needs scikit-learn ({module} is not importable). "
                            f"Install it with: {INSTALL_COMMAND}")


def check_digits() -> None:
    """Raise :class:`DataMissingError` (with the install command) when scikit-learn is missing."""
    try:
        found = importlib.util.find_spec(SKLEARN_DATASETS_MODULE.split(".")[0]) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise _missing(SKLEARN_DATASETS_MODULE)


def load_digits_arrays() -> Tuple[Tensor, Tensor]:
    """``(1797, 64)`` float32 pixels scaled to [0, 1] (row-major) and ``(1797,)`` int64 labels, loaded once
    per process."""
    module_name = SKLEARN_DATASETS_MODULE
    with _LOCK:
        if module_name not in _CACHE:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise _missing(module_name) from exc
            bunch = module.load_digits()
            data = np.asarray(bunch.data, dtype=np.float32) / 16.0
            target = np.asarray(bunch.target, dtype=np.int64)
            if data.shape != (NUM_EXAMPLES, 64) or target.shape != (NUM_EXAMPLES,):
                raise ValueError(f"load_digits returned unexpected shapes {data.shape}, {target.shape}")
            _CACHE[module_name] = (torch.from_numpy(data), torch.from_numpy(target))
            logger.info("loaded scikit-learn digits (%d examples)", NUM_EXAMPLES)
    return _CACHE[module_name]


@register_task
class DigitsTask(ArrayClassificationTask):
    """Sequential 8x8 handwritten digits, pixel by pixel: T = 64 steps of one pixel in [0, 1].

    Source: scikit-learn's bundled ``sklearn.datasets.load_digits`` (1797 images, values 0-16, scaled
    by 1/16; 10 nearly balanced classes). There is no official split: a fixed shuffle (``torch.randperm``
    seeded with ``SPLIT_SEED``) gives 1297 train / 250 valid / 250 test. ``train_size``, ``valid_size``,
    ``test_size`` take the first examples of each split (None: all). Labels read at the last step.
    Metric ``"accuracy"``; the trivial predictor (majority class) scores ~0.10, uniform logits give
    loss ln 10 ~ 2.303.
    """

    name = "digits"

    def __init__(self, train_size: Optional[int] = None, valid_size: Optional[int] = None,
                 test_size: Optional[int] = None):
        self._sizes = {split: take(SPLIT_SIZES[split], size, f"{split}_size")
                       for split, size in (("train", train_size), ("valid", valid_size), ("test", test_size))}
        self.options = {"train_size": train_size, "valid_size": valid_size, "test_size": test_size}
        self.input_size = 1
        self.num_outputs = NUM_CLASSES
        self.seq_len = 64
        check_digits()

    def num_examples(self, split: str) -> int:
        check_split(split)
        return self._sizes[split]  # known without loading the data

    def split_indices(self, split: str) -> Tensor:
        """Indices of the split's examples in ``load_digits()``."""
        check_split(split)
        perm = torch.randperm(NUM_EXAMPLES, generator=torch.Generator().manual_seed(SPLIT_SEED))
        start = {"train": 0, "valid": SPLIT_SIZES["train"],
                 "test": SPLIT_SIZES["train"] + SPLIT_SIZES["valid"]}[split]
        return perm[start:start + self._sizes[split]]

    def _split_arrays(self, split: str) -> Tuple[Tensor, Tensor]:
        data, target = load_digits_arrays()
        idx = self.split_indices(split)
        return data[idx], target[idx]

    def _features(self, pixels: Tensor) -> Tensor:
        return pixels.t().unsqueeze(-1).contiguous()
