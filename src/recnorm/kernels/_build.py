"""Building recnorm's C++ extensions on first use, safely.

:func:`torch.utils.cpp_extension.load` serializes builds with a ``lock`` file that it creates and deletes
itself. A process killed while it holds that file (Ctrl-C during the first build, a killed worker, an
out-of-memory kill) leaves it behind, and every later ``load`` of the same extension then waits for it
forever. recnorm therefore:

* builds each extension in its own directory named after a hash of its source (and the headers beside
  it), its compiler flags, and the build command itself: the text of the ninja file torch writes for it
  (compiler, include and library paths exactly as written, flags), and the compiler the command's name
  resolves to on ``PATH``, under ``$RECNORM_EXTENSIONS_DIR`` (default: ``recnorm`` inside torch's
  extensions directory, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). So a changed source
  never waits on, or reuses, an older build, and two environments whose commands differ in any character
  (say a torch reached through another path) build side by side instead of rebuilding each other's;
  environments with the same command share one build;
* publishes a build once and never replaces it: the library is compiled in a fresh staging directory
  (``build-<pid>-<random>``, with copies of the sources) and then renamed to ``<name>.so`` in the build
  directory, atomically; a published library is imported as it is, without running the build tool again.
  So no process ever loads a library that another is writing, and a library a process has loaded is
  never overwritten;
* logs a warning when it starts compiling (about a minute), so that a user sees why the first use waits;
* holds an OS file lock (``fcntl.flock``) around the build. The OS drops that lock when its holder dies,
  so a crashed builder cannot block anyone, and the staging directories a killed builder left behind are
  removed by the next builder;
* waits at most ``$RECNORM_BUILD_TIMEOUT`` seconds (default 900) for another process's build, then
  gives up with :class:`TimeoutError`; the callers log it and fall back to the reference loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import logging
import os
import shutil
import sysconfig
import tempfile
import time
from typing import Any, Iterator, List, Sequence, Tuple

import torch

__all__ = ["build_directory", "build_command", "library_path", "load"]

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


def _split(flags: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``cflags + ["|"] + ldflags`` -> ``(cflags, ldflags)``."""
    flags = list(flags)
    if "|" not in flags:
        return flags, []
    i = flags.index("|")
    return flags[:i], flags[i + 1:]


def build_command(name: str, extra_cflags: Sequence[str], extra_ldflags: Sequence[str]) -> str:
    """The build command of an extension as torch would run it: the ninja file that
    :func:`torch.utils.cpp_extension.load` writes (with a placeholder for the source and build paths), and
    the file its compiler name resolves to on ``PATH``."""
    from torch.utils import cpp_extension

    text = ""
    writer = getattr(cpp_extension, "_write_ninja_file_to_build_library", None)
    if writer is not None:
        with tempfile.TemporaryDirectory(prefix="recnorm-cmd-") as tmp:
            path = os.path.join(tmp, "build.ninja")
            options = {"path": path, "name": name, "sources": [os.path.join(tmp, "source.cpp")],
                       "extra_cflags": list(extra_cflags), "extra_cuda_cflags": [], "extra_sycl_cflags": [],
                       "extra_ldflags": list(extra_ldflags), "extra_include_paths": [], "with_cuda": False,
                       "with_sycl": False, "is_standalone": False}
            try:
                prepare = getattr(cpp_extension, "_prepare_ldflags", None)
                if prepare is not None:  # torch's own -L/-l flags, added to the ldflags before it writes the file
                    wanted = {"extra_ldflags": list(extra_ldflags), "with_cuda": False, "with_sycl": False,
                              "verbose": False, "is_standalone": False}
                    params = inspect.signature(prepare).parameters
                    options["extra_ldflags"] = prepare(**{k: v for k, v in wanted.items() if k in params})
                accepted = inspect.signature(writer).parameters
                writer(**{k: v for k, v in options.items() if k in accepted})
                with open(path) as f:
                    text = f.read().replace(tmp, "<build>")
            except Exception as exc:  # a torch whose private writer changed: the command's ingredients below
                log.debug("could not render the build command with torch's ninja writer: %s", exc)
                text = ""
    if not text:
        text = "\0".join(cpp_extension.include_paths() + cpp_extension.library_paths()
                         + [sysconfig.get_path("include", scheme="posix_prefix") or ""])
    cxx = os.environ.get("CXX", "c++")
    found = shutil.which(cxx)
    return text + "\0compiler=" + (os.path.realpath(found) if found else cxx)


def build_directory(name: str, sources: Sequence[str], flags: Sequence[str]) -> str:
    """The directory an extension is built in: one per (source and header text, flags ``cflags + ["|"] +
    ldflags``, torch installation, Python headers, compiler, build command)."""
    digest = hashlib.sha256()
    for path in _inputs(sources):
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update("\0".join(flags).encode())
    digest.update("\0".join(_toolchain()).encode())
    digest.update(build_command(name, *_split(flags)).encode())
    return os.path.join(_root(), f"{name}_{digest.hexdigest()[:12]}")


def library_path(name: str, directory: str) -> str:
    """Where the published library of extension ``name`` lies in its build directory."""
    return os.path.join(directory, f"{name}.so")


def _copy_sources(sources: Sequence[str], directory: str) -> List[str]:
    """Copies of ``sources`` and their headers in ``directory/src``."""
    folder = os.path.join(directory, "src")
    os.makedirs(folder, exist_ok=True)
    copies = []
    for path in _inputs(sources):
        target = os.path.join(folder, os.path.basename(path))
        shutil.copyfile(path, target)
        copies.append(target)
    return copies[: len(sources)]


def _import_library(name: str, path: str) -> Any:
    """Import the published extension module ``name`` from ``path`` (no build tool runs)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - not a loadable file name
        raise ImportError(f"cannot import the extension {name} from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    """Import an extension, building and publishing it first if its build directory has no library yet;
    raises on any failure (callers fall back)."""
    from torch.utils import cpp_extension

    directory = build_directory(name, sources, list(extra_cflags) + ["|"] + list(extra_ldflags))
    published = library_path(name, directory)
    if os.path.exists(published):
        return _import_library(name, published)
    os.makedirs(directory, exist_ok=True)
    timeout = float(os.environ.get("RECNORM_BUILD_TIMEOUT", "900"))
    with _exclusive(os.path.join(directory, "recnorm.lock"), timeout):
        if os.path.exists(published):  # built by the process we waited for
            return _import_library(name, published)
        for entry in os.listdir(directory):  # nobody else builds here while we hold the lock
            if entry.startswith("build-"):
                log.warning("removing the unfinished build of a killed process: %s", os.path.join(directory, entry))
                shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
        log.warning(
            "recnorm: compiling the C++ extension %s (first use with this build command; about a minute), cached in %s",
            name,
            directory,
        )
        staging = tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=directory)
        try:
            copies = _copy_sources(sources, staging)
            module = cpp_extension.load(
                name=name,
                sources=copies,
                extra_cflags=list(extra_cflags),
                extra_ldflags=list(extra_ldflags),
                build_directory=staging,
                verbose=False,
            )
            built = library_path(name, staging)
            if os.path.exists(built):
                os.replace(built, published)  # atomic: the inode this process loaded is the one published
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return module
