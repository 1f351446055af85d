"""Building recnorm's C++ extensions on first use, safely.

:func:`torch.utils.cpp_extension.load` serializes builds with a ``lock`` file that it creates and deletes
itself. A process killed while it holds that file (Ctrl-C during the first build, a killed worker, an
out-of-memory kill) leaves it behind, and every later ``load`` of the same extension then waits for it
forever. recnorm therefore:

* builds each extension in its own directory named after a hash of its source (and the headers beside
  it), its compiler flags and compiler, and the torch installation it links against (version, location
  and the Python headers), under ``$RECNORM_EXTENSIONS_DIR`` (default: ``recnorm`` inside torch's
  extensions directory, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), so a changed source
  never waits on, or reuses, an older build, and two environments never rebuild each other's;
* compiles a copy of the sources kept in that directory, so that checkouts in different places with the
  same sources share one build (the paths are part of the build commands, and a changed command rebuilds);
* logs a warning when it starts compiling (about a minute), so that a user sees why the first use waits;
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
import shutil
import sysconfig
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


def _toolchain() -> List[str]:
    """What a build depends on besides its sources and flags: the torch installation it compiles and links
    against (version and location), the Python headers and the compiler."""
    return [
        torch.__version__,
        os.path.realpath(os.path.dirname(torch.__file__)),
        os.path.realpath(sysconfig.get_paths()["include"]),
        os.environ.get("CXX", "c++"),
    ]


def build_directory(name: str, sources: Sequence[str], flags: Sequence[str]) -> str:
    """The directory an extension is built in: one per (source and header text, flags, torch installation,
    Python headers, compiler)."""
    digest = hashlib.sha256()
    for path in _inputs(sources):
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update("\0".join(flags).encode())
    digest.update("\0".join(_toolchain()).encode())
    return os.path.join(_root(), f"{name}_{digest.hexdigest()[:12]}")


def _copy_sources(sources: Sequence[str], directory: str) -> List[str]:
    """Copies of ``sources`` and their headers in ``directory/src`` (written once: the directory's name
    already fixes their contents, and untouched files keep ninja from rebuilding)."""
    folder = os.path.join(directory, "src")
    os.makedirs(folder, exist_ok=True)
    copies = []
    for path in _inputs(sources):
        target = os.path.join(folder, os.path.basename(path))
        if not os.path.exists(target):
            tmp = f"{target}.{os.getpid()}.tmp"
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        copies.append(target)
    return copies[: len(sources)]


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
                    log.warning("recnorm: waiting for another process to finish building %s", os.path.dirname(path))
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
        copies = _copy_sources(sources, directory)
        if not os.path.exists(os.path.join(directory, f"{name}.so")):
            log.warning(
                "recnorm: compiling the C++ extension %s (first use with this torch installation; about a minute), "
                "cached in %s",
                name,
                directory,
            )
        return cpp_extension.load(
            name=name,
            sources=copies,
            extra_cflags=list(extra_cflags),
            extra_ldflags=list(extra_ldflags),
            build_directory=directory,
            verbose=False,
        )
