"""The task interface: what every sequence task in the evidence engine provides.

A task owns its data (real data from installed packages, or a generator), its splits, its loss and its
metrics. The trainer knows nothing task-specific: it asks a task for batches, runs the model to get one
output vector per time step, and hands those outputs back to the task for the loss and the metrics.

A new task is one file in ``recnorm/experiments/tasks/`` that subclasses :class:`Task` and decorates the
class with :func:`register_task` (the registry's loader imports every module of that package before the first
lookup); it then appears in the CLI, sweeps and reports with no other edits. A task defined
outside the package registers the same way once its module is imported (``recnorm --import MODULE train``,
or a sweep spec's ``imports``).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Tuple, Type

from torch import Tensor

from recnorm.registry import Registry

__all__ = ["Batch", "Task", "register_task", "get_task", "create_task", "list_tasks", "TASKS", "DataMissingError"]


class DataMissingError(RuntimeError):
    """A data package that a task needs is not installed; the message gives the exact install command."""


@dataclasses.dataclass
class Batch:
    """One batch, time-major like ``torch.nn.LSTM`` with ``batch_first=False``.

    Attributes:
        x: ``(T, B, input_size)`` float32 features, or ``(T, B)`` int64 token ids when the task has a
            ``vocab_size``. Positions at or beyond a sequence's length hold padding (any value).
        y: targets. ``(B,)`` int64 class ids (classification), ``(B,)`` float32 (regression), or
            ``(T, B)`` int64 per-step targets (per-step tasks: language modelling, copy).
        lengths: ``(B,)`` int64 valid lengths for variable-length batches, ``None`` when every sequence
            has length T. When given, the trainer packs the batch into a ``PackedSequence``.
    """

    x: Tensor
    y: Tensor
    lengths: Optional[Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.x.shape[1])

    @property
    def seq_len(self) -> int:
        return int(self.x.shape[0])


class Task(abc.ABC):
    """Base class of a sequence task.

    Class attributes every task sets:
        name: registry key (lowercase snake case).
        kind: ``"classification"`` (one label per sequence), ``"regression"`` (one value per sequence),
            or ``"per_step"`` (a class label at every step: language modelling, copy).
        metric: name of the headline metric (e.g. ``"accuracy"``, ``"mse"``, ``"bpc"``).
        higher_is_better: whether larger values of ``metric`` are better.

    Instance attributes set by ``__init__``:
        input_size: features per step (for token tasks: the vocabulary size).
        vocab_size: ``None`` for float features, else the number of token ids (the model embeds them).
        num_outputs: size of the model's output vector per step (classes, 1, or vocabulary size).
        seq_len: (maximum) sequence length T.

    Options are keyword arguments of ``__init__`` with defaults; an unknown option raises ValueError
    naming the valid ones (``create_task`` does this).
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]

    input_size: int
    vocab_size: Optional[int] = None
    num_outputs: int
    seq_len: int

    @abc.abstractmethod
    def batches(self, split: str, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        """Yield batches of ``split`` (``"train"``, ``"valid"`` or ``"test"``).

        ``"train"`` is an endless stream, reshuffled each epoch by a generator seeded with ``seed``;
        ``"valid"`` and ``"test"`` make one deterministic pass over the split (the last batch may be
        smaller). The same arguments always give the same batches.
        """

    @abc.abstractmethod
    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Scalar training loss from the model's per-step outputs ``(T, B, num_outputs)``.

        Sequence-level tasks read each sequence's last valid step (``lengths - 1``).
        """

    @abc.abstractmethod
    def metrics(self, outputs: Tensor, batch: Batch) -> Dict[str, Tuple[float, float]]:
        """Metrics of one batch as ``{name: (sum, count)}`` so that an evaluation pass can pool batches
        exactly. Must include ``self.metric`` and ``"loss"``."""

    def sizes(self) -> str:
        """The sizes of the splits in words, for listings such as ``recnorm tasks``; reads no data.

        Tasks with a fixed data set report ``"train/valid/test examples"`` through ``num_examples`` (which
        must then not load the data); generated tasks an endless training stream and their evaluation sizes.
        """
        count = getattr(self, "num_examples", None)
        if count is not None:
            return "/".join(str(count(s)) for s in ("train", "valid", "test")) + " examples"
        opts = getattr(self, "options", {}) or {}
        return (f"generated: an endless training stream; valid {opts.get('valid_size', '?')}, "
                f"test {opts.get('test_size', '?')} sequences")

    def describe(self) -> Dict[str, Any]:
        """A JSON-able description (name, options, sizes) saved beside every run."""
        return {
            "name": self.name,
            "kind": self.kind,
            "metric": self.metric,
            "input_size": self.input_size,
            "vocab_size": self.vocab_size,
            "num_outputs": self.num_outputs,
            "seq_len": self.seq_len,
            "options": dict(getattr(self, "options", {})),
        }


def _load_builtin_tasks() -> None:
    # Every module of the tasks package is a task file: importing it registers its tasks (@register_task).
    # The package is found by this file's place, not imported by name, so base imports nothing above it.
    import importlib
    import os
    import pkgutil

    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules([os.path.dirname(os.path.abspath(__file__))]):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{package}.{info.name}")


#: The task registry (:class:`recnorm.registry.Registry`); the built-in tasks load on the first lookup.
TASKS: Registry[Type[Task]] = Registry("task", load=_load_builtin_tasks)


def register_task(cls: Type[Task]) -> Type[Task]:
    """Class decorator adding a task to :data:`TASKS` under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"a task is a Task subclass, got {cls!r}")
    return TASKS.register(cls)


def list_tasks() -> List[str]:
    """Sorted names of the registered tasks."""
    return TASKS.names()


def get_task(name: str) -> Type[Task]:
    """Resolve a task name to its class; unknown names raise ValueError listing the valid ones."""
    return TASKS.get(name)


def create_task(name: str, **options: Any) -> Task:
    """Build a task by name. Unknown options raise ValueError naming the valid ones."""
    import inspect

    cls = get_task(name)
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for task {name!r}; expected a subset of {valid}")
    return cls(**options)
