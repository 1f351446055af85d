"""Sequential Fashion-MNIST (Xiao et al., 2017) from Debian's ``dataset-fashion-mnist`` package:
row by row, pixel by pixel, and pixel by pixel in a fixed random order."""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import threading
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import ArrayClassificationTask, check_positive_int, check_split, take
from .base import DataMissingError, register_task

__all__ = ["FASHION_MNIST_DIR", "INSTALL_COMMAND", "FASHION_MNIST_FILES", "read_idx", "load_fashion_mnist",
           "FashionRowsTask", "FashionPixelsTask", "FashionPermutedTask"]

logger = logging.getLogger(__name__)

#: Where Debian's ``dataset-fashion-mnist`` installs the files (tasks take a ``data_dir`` option too).
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_COMMAND = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IDX_MAGIC_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions
IDX_MAGIC_LABELS = 0x00000801  # unsigned bytes, 1 dimension
NUM_TRAIN, NUM_TEST, NUM_CLASSES, SIDE = 60000, 10000, 10, 28
#: Seed of the fixed shuffle of the official training set that defines the train/valid split.
SPLIT_SEED = 0

_CACHE: Dict[str, Dict[str, Tensor]] = {}
_LOCK = threading.Lock()


def read_idx(path: str, expected_magic: int) -> Tensor:
    """Read a gzipped IDX file of unsigned bytes into a uint8 tensor, validating its header."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise ValueError(f"{path}: IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    ndim = magic & 0xFF
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:offset])
    if len(data) - offset != math.prod(dims):
        raise ValueError(f"{path}: IDX header announces dims {dims} ({math.prod(dims)} bytes) but the file "
                         f"holds {len(data) - offset} bytes of data")
    array = np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)
    return torch.from_numpy(array.copy())


def _resolve_dir(data_dir: Optional[str]) -> str:
    return os.path.abspath(os.fspath(data_dir if data_dir is not None else FASHION_MNIST_DIR))


def check_fashion_mnist(data_dir: Optional[str] = None) -> str:
    """Return the data directory, or raise :class:`DataMissingError` naming the install command."""
    directory = _resolve_dir(data_dir)
    missing = [name for name in FASHION_MNIST_FILES.values() if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise DataMissingError(f"Fashion-MNIST files missing from {directory}: {', '.join(missing)}. "
                               f"Install them with: {INSTALL_COMMAND}")
    return directory


def load_fashion_mnist(data_dir: Optional[str] = None) -> Dict[str, Tensor]:
    """The four Fashion-MNIST arrays as uint8 tensors (images ``(N, 28, 28)``, labels ``(N,)``), read once
    per process and directory."""
    directory = check_fashion_mnist(data_dir)
    with _LOCK:
        if directory not in _CACHE:
            start = time.perf_counter()
            arrays = {}
            for key, filename in FASHION_MNIST_FILES.items():
                magic = IDX_MAGIC_IMAGES if key.endswith("images") else IDX_MAGIC_LABELS
                arrays[key] = read_idx(os.path.join(directory, filename), magic)
            for part, n in (("train", NUM_TRAIN), ("test", NUM_TEST)):
                images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
                if tuple(images.shape) != (n, SIDE, SIDE) or tuple(labels.shape) != (n,):
                    raise ValueError(f"Fashion-MNIST {part} arrays have unexpected shapes {tuple(images.shape)}, "
                                     f"{tuple(labels.shape)} in {directory}")
                if int(labels.max()) >= NUM_CLASSES:
                    raise ValueError(f"Fashion-MNIST {part} labels out of range in {directory}")
                arrays[f"{part}_labels"] = labels.long()
            _CACHE[directory] = arrays
            logger.info("loaded Fashion-MNIST from %s in %.2f s", directory, time.perf_counter() - start)
    return _CACHE[directory]


class _FashionMNISTTask(ArrayClassificationTask):
    """Common part of the sequential Fashion-MNIST tasks.

    Splits: ``"train"`` is the first ``60000 - valid_size`` images of the official training set after a
    fixed shuffle (``torch.randperm`` seeded with ``SPLIT_SEED``), ``"valid"`` the last ``valid_size``
    (default 5000, held out), ``"test"`` the official 10000 t10k images. ``train_size``/``test_size`` take
    the first examples of those splits (deterministic; None: all). Train and valid never overlap; a train
    subset is a prefix of the default train split and a smaller ``valid_size`` gives a subset of the
    default validation set. :meth:`split_indices` gives the official indices of a split.
    """

    def _init_common(self, train_size: Optional[int], valid_size: int, test_size: Optional[int],
                     data_dir: Optional[str], **extra) -> None:
        check_positive_int("valid_size", valid_size)
        if valid_size >= NUM_TRAIN:
            raise ValueError(f"option valid_size={valid_size} leaves no training images (of {NUM_TRAIN})")
        self._n_train = take(NUM_TRAIN - valid_size, train_size, "train_size")
        self._n_test = take(NUM_TEST, test_size, "test_size")
        self.options = {**extra, "train_size": train_size, "valid_size": valid_size, "test_size": test_size,
                        "data_dir": data_dir}
        self.data_dir = data_dir
        self.num_outputs = NUM_CLASSES
        check_fashion_mnist(data_dir)  # fail at construction when the package is missing

    def num_examples(self, split: str) -> int:
        check_split(split)  # known without reading the images
        return {"train": self._n_train, "valid": self.options["valid_size"], "test": self._n_test}[split]

    def split_indices(self, split: str) -> Tensor:
        """Indices of the split's images in the official training set (train, valid) or t10k (test)."""
        check_split(split)
        if split == "test":
            return torch.arange(self._n_test)
        perm = torch.randperm(NUM_TRAIN, generator=torch.Generator().manual_seed(SPLIT_SEED))
        if split == "valid":
            return perm[NUM_TRAIN - self.options["valid_size"]:]
        return perm[:self._n_train]

    def _split_arrays(self, split: str) -> Tuple[Tensor, Tensor]:
        data = load_fashion_mnist(self.data_dir)
        part = "test" if split == "test" else "train"
        idx = self.split_indices(split)
        # Examples are (N, 28, 28) uint8 images; features are made per batch.
        return data[f"{part}_images"][idx], data[f"{part}_labels"][idx]

    @staticmethod
    def _pixels(images: Tensor, downsample: bool) -> Tensor:
        """``(B, P)`` float32 pixels in [0, 1], row-major; 14x14 average-pooled when ``downsample``."""
        x = images.to(torch.float32).div_(255.0)
        if downsample:
            x = F.avg_pool2d(x.unsqueeze(1), kernel_size=2).squeeze(1)
        return x.flatten(1)


@register_task
class FashionRowsTask(_FashionMNISTTask):
    """Sequential Fashion-MNIST, row by row: T = 28 steps of 28 pixels in [0, 1].

    Source: Debian ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist, gzipped IDX), 60000
    training and 10000 test images of 10 balanced clothing classes. Splits: 55000 train / 5000 valid
    (fixed seeded hold-out from the official training set) / 10000 test (official t10k); options
    ``train_size``, ``valid_size``, ``test_size`` resize them (see :class:`_FashionMNISTTask`). Labels are
    read at the last step. Metric ``"accuracy"``; the trivial predictor (one class) scores 0.10, and
    uniform logits give loss ln 10 ~ 2.303.
    """

    name = "fashion_rows"

    def __init__(self, train_size: Optional[int] = None, valid_size: int = 5000, test_size: Optional[int] = None,
                 data_dir: Optional[str] = None):
        self._init_common(train_size, valid_size, test_size, data_dir)
        self.input_size = SIDE
        self.seq_len = SIDE

    def _features(self, images: Tensor) -> Tensor:
        return images.to(torch.float32).div_(255.0).transpose(0, 1).contiguous()


@register_task
class FashionPixelsTask(_FashionMNISTTask):
    """Sequential Fashion-MNIST, pixel by pixel in row-major order: T = 784 steps of one pixel in [0, 1]
    (``downsample=True``: 14x14 average-pooled images, T = 196).

    Source, sizes and splits as ``"fashion_rows"``: 55000 / 5000 / 10000 by default. Metric
    ``"accuracy"``; the trivial predictor scores 0.10, uniform logits give loss ln 10 ~ 2.303.
    """

    name = "fashion_pixels"

    def __init__(self, downsample: bool = False, train_size: Optional[int] = None, valid_size: int = 5000,
                 test_size: Optional[int] = None, data_dir: Optional[str] = None):
        if not isinstance(downsample, bool):
            raise ValueError(f"option downsample must be a bool, got {downsample!r}")
        self._init_common(train_size, valid_size, test_size, data_dir, downsample=downsample)
        self.downsample = downsample
        self.input_size = 1
        self.seq_len = (SIDE // 2) ** 2 if downsample else SIDE * SIDE

    def _features(self, images: Tensor) -> Tensor:
        return self._pixels(images, self.downsample).t().unsqueeze(-1).contiguous()


@register_task
class FashionPermutedTask(_FashionMNISTTask):
    """Permuted sequential Fashion-MNIST: pixel by pixel in a fixed random order, T = 784 (196 with
    ``downsample=True``), one pixel in [0, 1] per step.

    The order is a true permutation, ``torch.randperm(T)`` from a generator seeded with
    ``permutation_seed`` (default 0): step t shows pixel ``permutation[t]`` of the row-major image, every
    pixel exactly once, the same order for every image and split. Source, sizes and splits as
    ``"fashion_rows"``. Metric ``"accuracy"``; the trivial predictor scores 0.10.
    """

    name = "fashion_permuted"

    def __init__(self, downsample: bool = False, permutation_seed: int = 0, train_size: Optional[int] = None,
                 valid_size: int = 5000, test_size: Optional[int] = None, data_dir: Optional[str] = None):
        if not isinstance(downsample, bool):
            raise ValueError(f"option downsample must be a bool, got {downsample!r}")
        check_positive_int("permutation_seed", permutation_seed, minimum=0)
        self._init_common(train_size, valid_size, test_size, data_dir, downsample=downsample,
                          permutation_seed=permutation_seed)
        self.downsample = downsample
        self.input_size = 1
        self.seq_len = (SIDE // 2) ** 2 if downsample else SIDE * SIDE
        self.permutation = torch.randperm(self.seq_len, generator=torch.Generator().manual_seed(permutation_seed))

    def _features(self, images: Tensor) -> Tensor:
        pixels = self._pixels(images, self.downsample)[:, self.permutation]
        return pixels.t().unsqueeze(-1).contiguous()
