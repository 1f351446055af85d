"""glibc's malloc as a timed process meets it: held steady, or left to its defaults.

By default glibc serves a block of more than its mmap threshold (128 KiB at first, raised as large blocks are
freed, up to 32 MiB) with a fresh mapping, and gives freed memory at the top of its heap back to the system
past a trim threshold. A layer that asks for large buffers on every call and frees them after it then pays a
minor page fault for every page it touches, call after call. torch.nn's op does: on the AMD EPYC host,
in a process that had imported recnorm, its LSTM training step at (784, 64, 1, 128) took 115,000 minor faults
and 348 ms, and 184 ms with no faults. recnorm's fused kernels keep their large buffers in a pool
(``fused_lstm.cpp``'s BufferPool) and take none. So a timing under the defaults puts the allocator's cost on
torch.nn's side of every ratio, and its size depends on what the process allocated before (the dynamic
threshold moves with every large free).

``steady`` (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)``) serves every block from the heap
and keeps freed memory there, so no layer pays faults again for memory it frees and asks for on every call:
the ratios then compare the layers' work. It is set once, for the rest of the process (mallopt turns the
dynamic threshold off for good), so set it before anything is timed and never in a process that goes on
to do other work (a test runs it in a child process). Peak-memory children keep their own setting
(``bench_rnn.memory_env``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from typing import Dict

#: The settings a benchmark accepts (``--allocator``).
CHOICES = ("steady", "default")

#: mallopt's parameter numbers (glibc's malloc.h) and the steady values.
_PARAMS = {"M_TRIM_THRESHOLD": -1, "M_MMAP_MAX": -4}
STEADY = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}


def _mallopt():
    """glibc's ``mallopt``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        fn = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def set_allocator(name: str) -> Dict:
    """Put this process's malloc in the state ``name`` (:data:`CHOICES`) and return what a run records of
    it: ``{"name": ..., "mallopt": {...}}`` (the values set; none for ``default``). ``steady`` raises
    RuntimeError where the C library has no mallopt or refuses a value, naming it, so that a run never
    reports a steady allocator it does not have."""
    if name not in CHOICES:
        raise ValueError(f"allocator: expected one of {', '.join(CHOICES)}, got {name!r}")
    if name == "default":
        return {"name": "default", "mallopt": {}}
    fn = _mallopt()
    if fn is None:
        raise RuntimeError("allocator 'steady' needs glibc's mallopt, which this C library lacks; "
                           "run with --allocator default (and read the ratios knowing that page faults count)")
    for key, value in STEADY.items():
        if fn(_PARAMS[key], value) != 1:
            raise RuntimeError(f"allocator 'steady': mallopt({key}, {value}) was refused; run with --allocator default")
    return {"name": "steady", "mallopt": dict(STEADY)}


def set_or_exit(name: str, tool: str) -> Dict:
    """:func:`set_allocator` for a command-line tool: its RuntimeError becomes the tool's exit message."""
    try:
        return set_allocator(name)
    except RuntimeError as exc:
        raise SystemExit(f"{tool}: {exc}") from None


def recorded(meta: Dict) -> str:
    """The setting a run's ``meta`` records (``meta["allocator"]["name"]``); a run from before the setting
    existed ran glibc's default."""
    return (meta.get("allocator") or {}).get("name", "default")


def minor_faults() -> int:
    """Minor page faults of this process so far (``getrusage``'s ``ru_minflt``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def describe(record: Dict | None) -> str:
    """One sentence on the allocator a run recorded (``meta["allocator"]``; None: a run from before the
    setting existed, which ran glibc's defaults)."""
    if not record:
        return ("Not recorded: the run predates `--allocator` and ran glibc's default malloc, under which "
                "torch.nn's op pays a page fault for each page of the large buffers it maps afresh on every "
                "call while recnorm's kernels keep theirs in a pool (benchmarks/allocator.py).")
    if record["name"] == "steady":
        return ("glibc's malloc held steady (`--allocator steady`: "
                + ", ".join(f"`{k}` {v}" for k, v in record["mallopt"].items())
                + "): every block comes from the heap and freed memory stays there, so no layer pays page faults "
                "for the buffers it frees and asks for again on every call, and a ratio compares the layers' work.")
    return ("glibc's default malloc (`--allocator default`): a layer that maps large buffers afresh on every call "
            "pays a page fault for each page it touches, and torch.nn's op does while recnorm's kernels keep "
            "theirs in a pool, so the ratios count that allocator cost on torch.nn's side.")
