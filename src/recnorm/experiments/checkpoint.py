"""Checkpoints of a run in progress: long runs survive a lost node or a killed sweep.

:func:`~recnorm.experiments.train.train_and_evaluate` takes a ``checkpoint``: every ``checkpoint.every``
steps it hands :meth:`Checkpoint.save` the whole training state (step, weights and buffers, optimizer,
random generators, curves so far), and at its start a state that :meth:`Checkpoint.load` returns is resumed
from: the run then goes on with the same numbers as an uninterrupted run (the training batches come from
a seeded stream, which is replayed up to the step).

Two stores:

* :class:`FileCheckpoint`: one file, written atomically (a local run or worker process);
* the Ray backend's store (:mod:`recnorm.experiments.ray_backend`): the bytes travel to the driver, which
  keeps them in ``OUT/checkpoints/<run_id>.pt``; a task retried on another node after its node was lost,
  or resubmitted by a later invocation, resumes from the latest one.

``$RECNORM_CHECKPOINT_EVERY`` sets the interval in steps (default :data:`DEFAULT_EVERY`; 0 turns
checkpoints off). A run's checkpoint is removed once its result is written.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable, Dict, Optional

import torch

from recnorm.experiments.results import atomic_file

__all__ = ["Checkpoint", "FileCheckpoint", "BytesCheckpoint", "checkpoint_every", "DEFAULT_EVERY", "CHECKPOINT_DIR"]

DEFAULT_EVERY = 1000
CHECKPOINT_DIR = "checkpoints"  # inside a sweep directory: OUT/checkpoints/<run_id>.pt


def checkpoint_every() -> int:
    """The checkpoint interval in steps: ``$RECNORM_CHECKPOINT_EVERY``, else :data:`DEFAULT_EVERY` (0: off)."""
    text = os.environ.get("RECNORM_CHECKPOINT_EVERY")
    if not text:
        return DEFAULT_EVERY
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"RECNORM_CHECKPOINT_EVERY: expected a number of steps (0: off), got {text!r}") from None
    if value < 0:
        raise ValueError(f"RECNORM_CHECKPOINT_EVERY: expected a number of steps >= 0 (0: off), got {value}")
    return value


def to_bytes(state: Dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Dict[str, Any]:
    # our own file (optimizer and generator states, curves): not weights only
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


class Checkpoint:
    """Where a run's training state goes every ``every`` steps, and comes back from."""

    every: int = 0

    def save(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError

    def load(self) -> Optional[Dict[str, Any]]:
        raise NotImplementedError


class FileCheckpoint(Checkpoint):
    """A checkpoint in one file (``path``), replaced atomically at every save."""

    def __init__(self, path: str, every: int) -> None:
        self.path = path
        self.every = int(every)

    def save(self, state: Dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with atomic_file(self.path, "wb") as f:
            f.write(to_bytes(state))

    def load(self) -> Optional[Dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return from_bytes(data)

    def remove(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


class BytesCheckpoint(Checkpoint):
    """A checkpoint kept elsewhere, reached through two functions: ``put(bytes)`` and ``get() -> bytes | None``
    (the Ray backend's store on the driver)."""

    def __init__(self, put: Callable[[bytes], None], get: Callable[[], Optional[bytes]], every: int) -> None:
        self._put, self._get = put, get
        self.every = int(every)
        self.resumed_from: Optional[int] = None  # the step the run resumed from, if it did

    def save(self, state: Dict[str, Any]) -> None:
        self._put(to_bytes(state))

    def load(self) -> Optional[Dict[str, Any]]:
        data = self._get()
        state = None if data is None else from_bytes(data)
        self.resumed_from = None if state is None else int(state["step"])
        return state
