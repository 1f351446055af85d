"""Where and how a run ran: the commit, the machine, the libraries, and the kernel of every layer.

:func:`collect` gives the record a run stores under ``"provenance"`` (the git commit of the recnorm source and
whether its tree was dirty, library versions, the CPU model and vector ISA, the host, the Ray node when run on
Ray). :func:`kernel_dispatch` runs a block with a kernel pin applied to one model and records which
implementation actually ran each of its layers, per phase (``"train"``: autograd records the call; ``"eval"``:
it does not).

Why a pin: ``kernel="auto"`` orders torch's op and recnorm's fused kernel by a rule fitted to measurements
(:mod:`recnorm.kernels.autotune`). Both compute the same function, but their rounding differs, and a training
trajectory is chaotic: a difference of 1e-7 at one step moves a final accuracy by 0.02. A re-run reproduces a
run only on the same kernels, so every run records what ran (``kernels``) and a pin that replays it
(``kernel_pin``, a value for ``RunConfig.kernel``). Runs made before the rule existed replay with ``"legacy"``.
The fused backward's weight-gradient chunking fixes the order in which weight gradients are summed, so a run
also records its chunk floor (``chunk_floor``, a value for ``RunConfig.chunk_floor``); runs that do not record
one replay with the floor they ran with, 2048 (:data:`recnorm.kernels.fused.LEGACY_CHUNK_FLOOR`). The fused
kernels' GEMM settings per CPU maker (MKL's packed ``W_hh``, the transposed weight gradients, the oneDNN rule)
round differently too, and are recorded under ``gemm`` (runs since 2026-12-07; the environment overrides
named there replay another setting).

The machine matters too: torch's own op (oneDNN) and ATen's vectorized kernels pick code paths by the CPU's
vector ISA (``cpu.capability``: AVX2, AVX512...), with different rounding. A run reproduces on a machine with
the same capability; on a larger one, :data:`ISA_ENV` caps the ISA (``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` before torch is imported) to replay runs made on AVX2.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
from typing import Any, Dict, Iterator, Optional, Set, Tuple

import torch

__all__ = ["collect", "versions", "cpu", "git_state", "kernel_dispatch", "parse_kernel_pin", "rule_digest",
           "KERNEL_CHOICES", "ISA_ENV"]

#: Values of ``RunConfig.kernel`` that apply to every layer.
KERNEL_CHOICES = ("auto", "legacy", "reference", "native", "fused")
_LEGACY_ORDER = ("native", "fused", "reference")  # how "auto" chose in eager mode before the fitted rule
_FORCEABLE = ("reference", "native", "fused")
_PIN_ITEM = re.compile(r"^(l\d+(?:_reverse)?)\.(train|eval)=(\w+)$")
#: Environment variables that cap the vector ISA of torch's CPU kernels (read when torch loads).
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def parse_kernel_pin(value: str) -> Dict[str, str]:
    """``RunConfig.kernel`` as ``{"*": choice}`` (one of :data:`KERNEL_CHOICES` for every layer) or
    ``{"l0.train": "fused", ...}`` (a per-layer, per-phase pin; layers or phases it omits run ``"auto"``).
    Raises ValueError naming the expected forms."""
    if value in KERNEL_CHOICES:
        return {"*": value}
    pin: Dict[str, str] = {}
    for item in value.split(","):
        match = _PIN_ITEM.match(item.strip())
        if match is None or match.group(3) not in _FORCEABLE:
            raise ValueError(f"kernel: expected one of {list(KERNEL_CHOICES)} or a pin such as "
                             f"'l0.train=fused,l0.eval=native' (kernels {list(_FORCEABLE)}), got {value!r}")
        pin[f"{match.group(1)}.{match.group(2)}"] = match.group(3)
    return pin


# ---------------------------------------------------------------------------------------------- the machine
def versions() -> Dict[str, Any]:
    """Versions of the software and the machine a run used."""
    try:
        from importlib.metadata import version

        recnorm_version = version("recnorm")
    except Exception:  # not installed (running from a source tree)
        import recnorm

        recnorm_version = getattr(recnorm, "__version__", "unknown")
    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": _version_of("numpy"),
            "recnorm": recnorm_version, "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count()}


def _version_of(module: str) -> Optional[str]:
    mod = sys.modules.get(module)
    return getattr(mod, "__version__", None) if mod is not None else None


@functools.lru_cache(maxsize=1)
def cpu() -> Dict[str, Any]:
    """The CPU model (``/proc/cpuinfo``, else ``platform.processor()``), the vector ISA torch's kernels use,
    and any :data:`ISA_ENV` variable that caps it."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {"model": model or platform.processor() or None, "capability": capability,
            "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ}}


def git_state(path: Optional[str] = None) -> Dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout holding ``path`` (default: the recnorm package), both
    None when it is not in a git checkout (an installed wheel) or git is missing. ``dirty``: tracked files
    differ from the commit."""
    if path is None:
        import recnorm

        path = os.path.dirname(os.path.abspath(recnorm.__file__))
    try:
        commit = _git(path, "rev-parse", "HEAD")
        dirty = bool(_git(path, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _git(path: str, *args: str) -> str:
    done = subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def _ray_node() -> Optional[str]:
    ray = sys.modules.get("ray")  # only a process that Ray started (or that uses Ray) has it imported
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    except Exception:  # an old or partial Ray: the node is unknown, the run is not affected
        return None


def rule_digest() -> str:
    """A short digest of the dispatch rule in force (:data:`recnorm.kernels.autotune.RULE`)."""
    from recnorm.kernels import autotune

    blob = json.dumps(getattr(autotune, "RULE", None), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def collect(kernel: str) -> Dict[str, Any]:
    """The provenance of a run about to start with ``RunConfig.kernel == kernel`` (the kernels that ran
    are added by :func:`kernel_dispatch`)."""
    return {**git_state(), "versions": versions(), "cpu": cpu(), "host": socket.gethostname(),
            "ray_node": _ray_node(), "kernel": kernel, "dispatch_rule": rule_digest()}


# ---------------------------------------------------------------------------------------------- kernels
class DispatchLog:
    """Which implementation ran each layer of one model, per phase: ``{"l0": {"train": {"fused"}}}``."""

    def __init__(self) -> None:
        self.seen: Dict[str, Dict[str, Set[str]]] = {}
        self.chunks: Dict[str, Any] = {}
        self.gemm: Dict[str, Any] = {}

    def add(self, layer: str, phase: str, name: str) -> None:
        self.seen.setdefault(layer, {}).setdefault(phase, set()).add(name)

    def kernels(self) -> Dict[str, Dict[str, list]]:
        """JSON-able: ``{layer: {phase: [names, sorted]}}``."""
        return {layer: {phase: sorted(names) for phase, names in sorted(phases.items())}
                for layer, phases in sorted(self.seen.items())}

    def pin(self) -> Optional[str]:
        """A ``RunConfig.kernel`` value that replays these kernels, or None when a layer ran more than one
        implementation in one phase (its sizes crossed the rule's boundary; re-run with the same pin and
        dispatch rule instead)."""
        items = []
        for layer, phases in sorted(self.seen.items()):
            for phase, names in sorted(phases.items()):
                if len(names) != 1:
                    return None
                items.append(f"{layer}.{phase}={next(iter(names))}")
        return ",".join(items) or None


@contextlib.contextmanager
def kernel_dispatch(model: torch.nn.Module, kernel: str, chunk_floor: Optional[int] = None) -> Iterator[DispatchLog]:
    """Within the block, every recnorm layer of ``model`` runs the implementation ``kernel`` (a
    ``RunConfig.kernel`` value) asks for, with the fused backward's weight-gradient chunks of at least
    ``chunk_floor`` rows (``RunConfig.chunk_floor``; None: the library's), and the returned log records what
    ran (``log.chunks``: the chunk setting in force, :func:`recnorm.kernels.fused.chunk_setting`; ``log.gemm``,
    at the end of the block: the GEMM settings, :func:`recnorm.kernels.fused.gemm_setting`).

    The pin applies to the calls that compute the model's outputs; a call with a per-step observer (the
    diagnostics' capture, which only the reference loop serves) keeps ``"auto"``. It is a
    :func:`recnorm.kernels.route_dispatch` policy for the block; other models' calls choose as they would.
    """
    from recnorm import kernels

    pin = parse_kernel_pin(kernel)
    names = {id(p): n[len("weight_ih_"):] for m in model.modules() for n, p in m.named_parameters(recurse=False)
             if n.startswith("weight_ih_l")}
    log = DispatchLog()

    def policy(call: "kernels.DispatchCall") -> Tuple[str, str]:
        work = call.work
        layer = names.get(id(work.weight_ih))
        if layer is None or work.on_output is not None:
            return call.choose()
        grad = torch.is_grad_enabled() and (call.x.requires_grad or work.weight_hh.requires_grad)
        phase = "train" if grad else "eval"
        wanted = pin.get("*") or pin.get(f"{layer}.{phase}", "auto")
        name, mode = _choose_pinned(call, wanted)
        log.add(layer, phase, name)
        return name, mode

    from recnorm.kernels import fused

    # a run made before the fused LSTM's GEMM rule changed (2026-12-05) replays with the rule it ran with:
    # every run marked "legacy" predates it. Runs with provenance made before it replay with the current
    # rule; the committed ones all use H = 64, where both rules choose the same GEMMs.
    rule = fused.onednn_rule("2026-12-04") if pin.get("*") == "legacy" else contextlib.nullcontext()
    with kernels.route_dispatch(policy), rule, fused.chunk_floor(chunk_floor):
        log.chunks = fused.chunk_setting()
        try:
            yield log
        finally:  # after the calls: the extension that ran them is loaded by then
            log.gemm = fused.gemm_setting()


def _choose_pinned(call: Any, wanted: str) -> Tuple[str, str]:
    """``call.choose`` for the pinned ``wanted``; ``"auto"`` keeps the layer's own request (its ``kernel=``
    or ``$RECNORM_KERNEL``, and a stack's preferred implementation); ``"legacy"`` takes the first of
    torch's op, the fused kernel and the reference loop that serves the call (in eager mode; elsewhere
    ``"auto"``)."""
    if wanted == "auto":
        return call.choose()
    if wanted != "legacy":
        return call.choose(kernel=wanted, first=None)
    from recnorm.kernels import execution_mode

    if execution_mode() != "eager":
        return call.choose(kernel="auto", first=None)
    for name in _LEGACY_ORDER:
        try:
            return call.choose(kernel=name, first=None)
        except ValueError:  # this implementation cannot serve the call: try the next, as "auto" did
            continue
    return call.choose(kernel="auto", first=None)
