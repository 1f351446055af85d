"""Building recnorm's C++ extensions on first use, safely.

:func:`torch.utils.cpp_extension.load` serializes builds with a ``lock`` file that it creates and deletes
itself. A process killed while it holds that file (Ctrl-C during the first build, a killed worker, an
out-of-memory kill) leaves it behind, and every later ``load`` of the same extension then waits for it
forever. recnorm therefore:

* builds each extension in its own directory named after a hash of its source (and the headers beside
  it), its compiler flags and the torch version, under ``$RECNORM_EXTENSIONS_DIR`` (default: ``recnorm`` inside torch's extensions
  directory, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), so a changed source never
  waits on, or reuses, an older build;
* holds an OS file lock (``fcntl.flock``) around the build. The OS drops that lock when its holder dies,
  so a crashed builder cannot block anyone, and any torch ``lock`` file found while holding it is
  stale and is removed;
* waits at most ``$RECNORM_BUILD_TIMEOUT`` seconds (default 900) for another process's build, then
  gives up with :class:`TimeoutError`; the callers log it and fall back to the reference loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from typing import Iterator, List, Sequence

import torch

__all__ = ["build_directory", "load"]

log = logging.getLogger(__name__)


def _root() -> str:
    explicit = os.environ.get("RECNORM_EXTENSIONS_DIR")
    if explicit:
        return explicit
    torch_dir = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return os.path.join(torch_dir, "recnorm")


def _inputs(sources: Sequence[str]) -> List[str]:
    """The sources and every header (``*.h``) in their directories: what a build reads."""
    headers = set()
    for path in sources:
        folder = os.path.dirname(os.path.abspath(path))
        headers.update(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".h"))
    return list(sources) + sorted(headers)


def build_directory(name: str, sources: Sequence[str], flags: Sequence[str]) -> str:
    """The directory an extension is built in: one per (source and header text, flags, torch version)."""
    digest = hashlib.sha256()
    for path in _inputs(sources):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update("\0".join(flags).encode())
    digest.update(torch.__version__.encode())
    return os.path.join(_root(), f"{name}_{digest.hexdigest()[:12]}")


@contextlib.contextmanager
def _exclusive(path: str, timeout: float) -> Iterator[None]:
    """An OS-level exclusive lock on ``path``, released by the OS if this process dies."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: rely on torch's own lock file
        yield
        return
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"another process has been building in {os.path.dirname(path)} for over {timeout:.0f} s") from None
                if not waited:
                    log.info("waiting for another process to finish building %s", os.path.dirname(path))
                    waited = True
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load(name: str, sources: Sequence[str], extra_cflags: List[str], extra_ldflags: List[str]):
    """Build (or reuse) and import an extension; raises on any failure (callers fall back)."""
    from torch.utils import cpp_extension

    directory = build_directory(name, sources, list(extra_cflags) + ["|"] + list(extra_ldflags))
    os.makedirs(directory, exist_ok=True)
    timeout = float(os.environ.get("RECNORM_BUILD_TIMEOUT", "900"))
    with _exclusive(os.path.join(directory, "recnorm.lock"), timeout):
        stale = os.path.join(directory, "lock")  # torch's FileBaton: nobody else builds here while we hold the lock
        if os.path.exists(stale):
            log.warning("removing a stale build lock left by a killed process: %s", stale)
            os.remove(stale)
        if not os.path.exists(os.path.join(directory, f"{name}.so")):
            log.info("building the C++ extension %s in %s (first use; about a minute)", name, directory)
        return cpp_extension.load(
            name=name,
            sources=list(sources),
            extra_cflags=list(extra_cflags),
            extra_ldflags=list(extra_ldflags),
            build_directory=directory,
            verbose=False,
        )
