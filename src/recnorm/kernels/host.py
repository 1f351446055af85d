"""The CPU maker this process runs on: the key of the kernels' measured rules.

Two of the kernels' choices are speed rules fitted to timings: which implementation ``kernel="auto"``
tries first (:mod:`recnorm.kernels.autotune`) and which GEMMs the fused kernels run through oneDNN
instead of MKL (:func:`recnorm.kernels.fused.onednn_plan`). Which side is faster depends on the CPU:
on the 2-core AMD EPYC the rules were first fitted on, the fused LSTM's eval forward at
(T, B, I, H) = (784, 64, 1, 128) took 0.97 of torch's op; on a 2-core Intel Xeon (Ice Lake), with the
GEMM rule and the build made for the AMD host, it took 1.39 (``benchmarks/fit_dispatch.py``), and with its
own (oneDNN for fewer GEMMs, AVX-512 vectors) 0.93. The Intel CPU also builds the kernels with AVX-512
(:func:`recnorm.kernels.fused.build_flags`). So each rule is kept per maker, measured on a CPU of that maker, and a
host of a maker without measurements keeps the defaults (torch's op first; MKL for every GEMM).

The maker is read once, from ``/proc/cpuinfo``'s ``vendor_id`` (else its ``model name``, else
``platform.processor()``). ``$RECNORM_CPU_MAKER`` (``AMD``, ``Intel`` or ``none``), read at import,
overrides it: to use one maker's rules on another's CPU, or none.
"""

from __future__ import annotations

import os
import platform
from typing import Optional

__all__ = ["MAKERS", "cpu_maker", "maker_of"]

#: The makers the rules know, by the names ``/proc/cpuinfo`` and model strings use for them.
MAKERS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD", "Intel": "Intel", "AMD": "AMD"}
ENV = "RECNORM_CPU_MAKER"


def maker_of(cpuinfo: str) -> Optional[str]:
    """The maker (``"AMD"``, ``"Intel"``) named by ``/proc/cpuinfo``'s text or by a CPU model string; None if
    it names neither."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    vendor = fields.get("vendor_id")
    if vendor in MAKERS:
        return MAKERS[vendor]
    text = fields.get("model name", cpuinfo)
    return next((MAKERS[m] for m in ("AMD", "Intel") if m in text), None)


def _detect() -> Optional[str]:
    env = os.environ.get(ENV)
    if env is not None:
        if env.lower() == "none":
            return None
        if env not in ("AMD", "Intel"):
            raise ValueError(f"${ENV}: expected AMD, Intel or none, got {env!r}")
        return env
    try:
        with open("/proc/cpuinfo") as f:
            found = maker_of(f.read())
    except OSError:
        found = None
    return found or maker_of(platform.processor() or "")


_MAKER = _detect()


def cpu_maker() -> Optional[str]:
    """This host's CPU maker, ``"AMD"`` or ``"Intel"``, or None for any other (or ``$RECNORM_CPU_MAKER=none``)."""
    return _MAKER
