"""Fused C++ CPU time loops for LSTM, GRU and RNN directions, as registered torch.library operators.

The whole loop -- forward and a hand-derived backward through time -- runs in a C++ extension
(``csrc/fused_lstm.cpp`` for the LSTM, ``csrc/fused_gru_rnn.cpp`` for the GRU and the RNN; what they
share is in ``csrc/fused_common.h``; the time loop itself, whose phases each kernel implements with the
statistic family and the cell as template arguments, in ``csrc/fused_loop.h``; each statistic family's
statistics in a header of its own, ``csrc/family_*.h``, listed in ``csrc/families.h``), built against torch
on first use (needs a C++ compiler and ninja) and cached (see :mod:`recnorm.kernels._build`). Per step it
does one GEMM for the recurrent term and one fused, vectorized pass (AVX2 where torch has it) for the norm
statistics, the normalization, the gates, the state update and the LSTM's cell norm; the input
projection runs as GEMMs over chunks of steps just before they are used (or, for inputs of at most
:data:`INPROJ_MAX` features, inside the pass). The backward does one fused pass and one GEMM per step,
and the weight gradients as a few large GEMMs over chunks of consecutive steps. Activations are
recomputed in backward from the saved normalized terms.

The kernels are the operators ``torch.ops.recnorm.fused_lstm`` and ``torch.ops.recnorm.fused_gru_rnn``
(and their ``_backward``), each with a schema, a CPU kernel, a fake kernel whose shapes follow symbolic
T and B, and registered autograd, so ``torch.compile``, ``torch.jit.trace`` and ``torch.export`` see
them as what they are. In plain eager execution the layers run the CPU kernels (``_lstm_cpu``,
``_gru_rnn_cpu`` and their backwards) without the dispatcher's Python wrapping of a custom operator, with
the same autograd (:class:`recnorm.kernels.autodiff.OperatorCall`): the same bits, about 0.2 ms less per
training call. They read norm descriptors' fields (statistic family, centring, eps, affine
tensors, population statistics) and never write module state: a training call returns the batch moments
of every step, and the layer updates its running statistics from them (by :func:`running_stats_update`, one
C++ call equal to the update's reference in tensor operations, where it serves).

They compute exactly what :func:`recnorm.kernels.reference.run_direction` computes (the oracle they are
tested against): packed rows, per-step batch statistics over the valid rows, population statistics in
eval mode and for steps with fewer than two valid rows, and zero-variance ("degenerate") features
normalizing to 0 with no gradient. In float32 the sigmoid/tanh/exp and reciprocals use short polynomial
forms within ~3 ulp; float64 uses SLEEF's functions, as torch does.

Served (:func:`supports`): the LSTM, GRU and RNN (tanh, relu) cells without ``proj_size``, where every
normalized site uses the same statistic family (none, row, or per-step batch) with the cell's own feature
groups (or, for the GRU, one group over all 3H: haste's LayerNormGRU), on float32/float64 CPU tensors,
without diagnostics capture or synchronized statistics. The variants: zoneout of every state, a joint gate
norm (LSTM, RNN) and a carried cell norm (LSTM), with row statistics for the last two.

Higher derivatives and ``torch.func`` (:mod:`recnorm.kernels.autodiff`): a backward that autograd
differentiates again (``create_graph=True``: gradient penalties, ``torch.func.grad``) returns the gradients
of the reference loop's recomputation of the operator, as a graph; an ordinary backward runs the C++ one.
The operators have a vmap rule (one call per slice), and under ``torch.func`` transforms the layers call
them through an ``autograd.Function`` that the transforms accept.

Performance knobs (environment, read per call unless noted):

* ``RECNORM_FUSED_POOL_MB`` (read at load, default 1024): large buffers freed by one LSTM call are kept for
  the next, up to this many MiB; first-touch page faults otherwise cost about as much as the passes.
  :func:`empty_cache` releases them.
* ``RECNORM_FUSED_ONEDNN``: ``0``/``1`` or a mask such as ``011`` forcing which GEMMs use oneDNN's linear
  instead of MKL (see :func:`onednn_plan`). A forward that saves nothing for a backward (eval, ``no_grad``)
  reuses the packing of a weight whose values are unchanged, bit for bit (:func:`_pack` with ``reuse``, up to
  :data:`PACK_CACHE_ENTRIES` weights; :func:`empty_cache` drops them).
* ``RECNORM_FUSED_CHUNK_ROWS`` (read per call): the backward's weight-gradient chunk in rows, instead of
  :func:`chunk_floor`'s rule; ``RECNORM_FUSED_INPROJ_ROWS`` (read at import): the input projection's chunk.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from recnorm.kernels import autodiff, host
from recnorm.kernels.contract import BatchMoments, DirectionResult, DirectionWork, fixed_size_check
from recnorm.kernels.functional import fold_sequence_norm

__all__ = ["supports", "run_direction", "available", "load_extension", "empty_cache"]

log = logging.getLogger(__name__)
NAME = "fused"

# Inputs at most this wide are projected inside the step pass instead of by GEMMs before their steps
# (a GEMM with a tiny inner dimension runs far below peak and writes a large (N, G) buffer).
INPROJ_MAX = 8
# Otherwise the projection runs as GEMMs over chunks of consecutive steps of about this many rows, each
# just before its steps, so that the step pass finds them in cache.
INPROJ_ROWS = int(os.environ.get("RECNORM_FUSED_INPROJ_ROWS", "1024"))

# The statistic family codes of the operators' ``stat`` argument: each family's kCode in csrc/family_*.h.
_FAMILY = {"none": 0, "row": 1, "step": 2, "shared": 2}
_CELL_CODES = {"gru": 0, "rnn_tanh": 1, "rnn_relu": 2}


# ---------------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------------


class _Extension:
    """One C++ extension, built on first use; a failure is logged once and remembered."""

    def __init__(self, family: str, name: str, source: str, what: str) -> None:
        self.family, self.name, self.source, self.what = family, name, source, what
        self.module = None
        self.error: Optional[str] = None
        self.onednn: Optional[bool] = None
        self.tag: Optional[str] = None  # the build (:func:`build_flags`) of the loaded module
        self._lock = threading.Lock()

    def load(self):
        if self.module is not None or self.error is not None:
            return self.module
        with self._lock:
            if self.module is None and self.error is None:
                try:
                    tag, _ = build_flags(self.family)
                    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", self.source)
                    self.module = build_extension(f"{self.name}_{tag}", path, self.family)
                    self.tag = tag
                except Exception as exc:  # no compiler, no ninja, a build error, ...
                    text = str(exc).strip().splitlines()
                    self.error = f"{type(exc).__name__}: {text[0] if text else ''}"
                    log.warning(
                        "recnorm: the fused CPU %s kernel could not be built (%s); falling back to the reference loop",
                        self.what,
                        self.error,
                    )
        return self.module

    def reset(self) -> None:
        """Forget the extension and any failure, so the next use tries again (tests)."""
        self.module, self.error, self.onednn, self.tag = None, None, None, None


EXTENSIONS = {e.family: e for e in (_Extension("lstm", "recnorm_fused_lstm", "fused_lstm.cpp", "LSTM"),
                                     _Extension("gru_rnn", "recnorm_fused_gru_rnn", "fused_gru_rnn.cpp", "GRU/RNN"))}


#: CPU makers whose AVX-512 CPUs get an AVX-512 build of each extension (``host.cpu_maker()``; the keys of
#: :data:`EXTENSIONS`). On the Intel Xeon (Ice Lake, 2026-12-07) the AVX-512 build took the LSTM's fused
#: forward pass (gates and norms, GEMMs excluded) from 3.5-3.7 ms to 2.0-2.2 ms (``norm=None``) and from
#: 5.6-5.7 to 3.6-3.7 ms (layer norm) at (T, B, I, H) = (28, 128, 4 or 28, 128), one thread (the kernel's
#: development timers). The AMD EPYC runs 512-bit vectors as two 256-bit halves, but still gains on the LSTM
#: (2026-12-07, AVX-512 BF16 host, load < 0.6): its forward pass took 1.09-1.54 ms instead of 1.73-2.25 at that
#: size, one thread, and the whole fused LSTM, with both builds in one process in alternation (11 rounds,
#: 2 threads, (28, 128, 28, 128)), 0.89-0.99 of the AVX2 build's time over every norm in training and eval
#: (0.94-0.96 at (100, 64, 128, 256)). Its GRU and RNN gained nothing to speak of (0.94-1.04, and 1.14 for
#: the RNN's batch-norm eval), so they keep the AVX2 build there.
AVX512_MAKERS: Dict[str, Tuple[str, ...]] = {"lstm": ("Intel", "AMD"), "gru_rnn": ("Intel",)}

#: CPU makers on which the kernels' GEMMs clear their output with ATen's threads and then accumulate into it
#: (beta = 1), instead of leaving beta = 0 to MKL. The same values either way. On the AMD EPYC MKL's beta = 0
#: path clears the output on one thread first (11-13% of the LSTM's eval forward at (28, 128, 28, 128)); on
#: the Intel Xeon (2026-12-07) it has no such pass, and the fill made the step's (128, 128) x (128, 512)
#: product 84 us instead of 67 (2 threads). Other makers: MKL's own path, unmeasured.
GEMM_PREFILL_MAKERS = ("AMD",)

#: CPU makers on which the kernels' step GEMMs (``h W_hh^T`` forward, ``dG W_hh`` backward) multiply by
#: ``W_hh`` packed once per call with MKL's ``cblas_sgemm_pack``, instead of sgemm packing it again at
#: every step. float32 only, where torch exports MKL's packed API (else every GEMM stays on ``at::mm``).
#: ``RECNORM_FUSED_MKL_PACK=0`` or ``1`` overrides it. Measured on the Intel Xeon (2026-12-07): see
#: docs/benchmarks.notes.md. The AMD EPYC was not measured. The Intel rule of :data:`ONEDNN_HOSTS` was
#: measured with the packing on; with ``RECNORM_FUSED_MKL_PACK=0`` there, ``RECNORM_FUSED_ONEDNN`` masks
#: choose oneDNN's products explicitly (it won at H = 1024, and at H = 512 with B of 32 or 64, against
#: unpacked MKL).
MKL_PACK_MAKERS = ("Intel",)


def mkl_pack_wanted() -> bool:
    """Whether the step GEMMs should use MKL's packed weights on this host (:data:`MKL_PACK_MAKERS`,
    ``RECNORM_FUSED_MKL_PACK``)."""
    return _maker_setting("RECNORM_FUSED_MKL_PACK", MKL_PACK_MAKERS)


def _maker_setting(env: str, makers: Tuple[str, ...]) -> bool:
    """A per-maker switch: ``$env`` set to ``0`` or ``1`` decides, else whether this host's CPU maker is one of
    ``makers``."""
    value = os.environ.get(env, "")
    if value in ("0", "1"):
        return value == "1"
    return host.cpu_maker() in makers


#: CPU makers on which the fused backward accumulates the weight gradients transposed, ``dW^T += x^T dG``
#: into an ``(I, G)`` and an ``(H, G)`` matrix, instead of ``dW += dG^T x`` (the same sums, in another GEMM
#: layout, which MKL rounds differently). ``RECNORM_FUSED_WGRAD_T=0`` or ``1`` overrides it. On the Intel Xeon
#: (2026-12-07, 2 threads, chunks of 1024 rows) the transposed product took 0.34 of the time at
#: ``(G, I) = (512, 28)``, 0.60 at ``(2048, 64)``, 0.90 at ``(512, 128)`` and 0.95-1.01 from
#: ``(768, 256)`` up: see docs/benchmarks.notes.md. The AMD EPYC was not measured.
WGRAD_TRANSPOSED_MAKERS = ("Intel",)


def wgrad_transposed_wanted() -> bool:
    """Whether the fused backward should accumulate the weight gradients transposed on this host
    (:data:`WGRAD_TRANSPOSED_MAKERS`, ``RECNORM_FUSED_WGRAD_T``)."""
    return _maker_setting("RECNORM_FUSED_WGRAD_T", WGRAD_TRANSPOSED_MAKERS)


def avx512_wanted(family: str = "lstm") -> bool:
    """Whether an AVX-512 CPU gets the AVX-512 build of extension ``family`` (:data:`AVX512_MAKERS`;
    ``RECNORM_FUSED_AVX512`` set to 0 or 1 decides for both extensions)."""
    return _maker_setting("RECNORM_FUSED_AVX512", AVX512_MAKERS[family])


def build_flags(family: str = "lstm") -> Tuple[str, List[str]]:
    """``(tag, compiler flags)`` of extension ``family`` (a key of :data:`EXTENSIONS`) on this CPU; the tag
    ends the extension's name.

    AVX-512 vectors where torch's kernels use AVX-512 (``torch.backends.cpu.get_cpu_capability()``, which
    ``ATEN_CPU_CAPABILITY`` caps) on a CPU of :data:`AVX512_MAKERS` for that family; AVX2 vectors on any other
    AVX2 or AVX-512 CPU; else the compiler's defaults. The AVX-512 build computes the same functions with the same
    exp and tanh forms, but 16 lanes at a time (so its sums, and its reciprocal's estimate, round
    differently): a run replays on the build it was made with, which capping the ISA to AVX2 selects, or,
    for a run made on an AMD AVX-512 CPU before its LSTM got the AVX-512 build (2026-12-07, the records whose
    ``provenance.gemm`` names no ``build``), ``RECNORM_FUSED_AVX512=0``."""
    flags = ["-O3", "-fopenmp"]
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        capability = "DEFAULT"
    if capability == "AVX512" and avx512_wanted(family):
        return "avx512", flags + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"]
    if capability in ("AVX2", "AVX512"):
        # AVX2 vectors with torch's own SLEEF exp/tanh (the functions torch.sigmoid/tanh use).
        return "avx2", flags + ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"]
    return "default", flags


def build_extension(name: str, path: str, family: str):
    """The kernel file ``path`` (its headers beside it) built and loaded as the extension ``name``, with this
    CPU's flags for ``family`` (a key of :data:`EXTENSIONS`, :func:`build_flags`), the buffer pool's capacity, the GEMMs' prefill
    (:data:`GEMM_PREFILL_MAKERS`), packing (:data:`MKL_PACK_MAKERS`) and weight-gradient layout
    (:data:`WGRAD_TRANSPOSED_MAKERS`) set. Raises on a build error. What
    recnorm's own extensions are built with, and benchmarks/ab_kernels.py's build of an earlier revision."""
    from recnorm.kernels import _build

    _, flags = build_flags(family)
    module = _build.load(name, [path], flags, ["-fopenmp"])
    if hasattr(module, "set_pool_capacity"):
        module.set_pool_capacity(_pool_bytes())
    if hasattr(module, "set_gemm_prefill"):
        module.set_gemm_prefill(host.cpu_maker() in GEMM_PREFILL_MAKERS)
    if hasattr(module, "set_gemm_packed"):
        module.set_gemm_packed(mkl_pack_wanted())
    if hasattr(module, "set_wgrad_transposed"):
        module.set_wgrad_transposed(wgrad_transposed_wanted())
    return module


def _pool_bytes() -> int:
    return int(float(os.environ.get("RECNORM_FUSED_POOL_MB", "1024")) * 2**20)


def load_extension(family: str = "lstm"):
    """The compiled extension of ``family`` (``"lstm"`` or ``"gru_rnn"``), built on first use; None if it
    cannot be built."""
    return EXTENSIONS[family].load()


def _assume_constant_result(fn):
    # What torch._dynamo.assume_constant_result does, without importing torch._dynamo: that import is half the
    # time of `import recnorm` (tests/nn/test_api.py checks that both mark a function alike).
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def available(family: str = "lstm") -> bool:
    """Whether the extension is (or can be) built on this machine. Under torch.compile this runs once,
    eagerly, when the graph is traced (building the extension then if need be), and is a constant."""
    return load_extension(family) is not None


def empty_cache() -> None:
    """Release the freed buffers the LSTM kernel keeps for reuse (see ``RECNORM_FUSED_POOL_MB``) and the
    weights packed for oneDNN that eval calls reuse."""
    with _PACKED_LOCK:
        _PACKED.clear()
    ext = EXTENSIONS["lstm"].module
    if ext is not None:
        ext.set_pool_capacity(0)
        ext.set_pool_capacity(_pool_bytes())


def _ext(family: str):
    ext = load_extension(family)
    if ext is None:
        raise RuntimeError(f"recnorm's fused {EXTENSIONS[family].what} kernel is not available: {EXTENSIONS[family].error}")
    return ext


# ---------------------------------------------------------------------------------------------------
# Running statistics of recurrent batch norm
# ---------------------------------------------------------------------------------------------------


def _is_plain_cpu(t: Tensor, rows: bool = False) -> bool:
    """A CPU tensor of torch's own, contiguous (``rows``: each row of a 2-D tensor contiguous)."""
    return (
        t.device.type == "cpu"
        and (t.is_contiguous() or (rows and t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] == 1)))
        and t.layout == torch.strided
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
        and type(t) is torch.Tensor
    )


def running_stats_update(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor, m: BatchMoments, momentum: Optional[float]
) -> Optional[Tuple[Tensor, int]]:
    """:meth:`recnorm.nn.norms.RecurrentBatchNorm.record`'s update of the running statistics in one C++ call
    (``csrc/running_stats.h``), equal to the reference in Python bit for bit. Updates the buffers in place and
    returns the ``(K,)`` mask of steps whose moments are finite (or over fewer than 2 rows) and how many are
    not. Returns None, with nothing done, where the reference must run instead: no extension loaded yet (this
    never builds one), a tensor that is not a plain contiguous CPU tensor (the moments: contiguous rows),
    buffers in autograd, dtypes other than one of float32 and float64 throughout, two steps of the call in one
    slot of their own, or under torch.compile or torch.jit.trace."""
    ext = EXTENSIONS["lstm"].module or EXTENSIONS["gru_rnn"].module  # either binds it
    if ext is None or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None  # a trace records tensor operations: the reference's are what a traced module replays
    tensors = (running_mean, running_var, num_batches_tracked, m.steps, m.count)
    if not all(_is_plain_cpu(t) for t in tensors) or not all(_is_plain_cpu(t, rows=True) for t in (m.mean, m.var)):
        return None
    if any(t.requires_grad for t in tensors[:3]):  # written in place: buffers, never in autograd (moments are only read)
        return None
    dt = running_mean.dtype
    if dt not in (torch.float32, torch.float64) or any(t.dtype != dt for t in (running_var, m.mean, m.var)):
        return None
    if any(t.dtype != torch.long for t in (num_batches_tracked, m.steps, m.count)) or running_mean.dim() != 2:
        return None
    finite, bad = ext.running_stats_update(running_mean, running_var, num_batches_tracked, m.steps, m.mean, m.var, m.count,
                                           -1.0 if momentum is None else float(momentum))
    return None if bad < 0 else (finite, bad)


# ---------------------------------------------------------------------------------------------------
# oneDNN's linear instead of MKL's sgemm
# ---------------------------------------------------------------------------------------------------


def _onednn_available(family: str) -> bool:
    e = EXTENSIONS[family]
    if e.onednn is None:
        try:
            e.onednn = bool(
                torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and _ext(family).onednn_available()
            )
        except Exception:
            e.onednn = False
    return e.onednn


#: The rule :func:`onednn_plan` follows: ``"current"``, or ``"2026-12-04"``, the rule before oneDNN's linear
#: served the LSTM's forward step below H = 256 and its eval input projection. GEMMs through oneDNN and
#: MKL round differently, so runs made before the change replay with the old rule (:func:`onednn_rule`).
ONEDNN_RULES = ("current", "2026-12-04")
_ONEDNN_RULE = "current"


@contextlib.contextmanager
def onednn_rule(rule: str) -> Iterator[None]:
    """Within the block, :func:`onednn_plan` follows ``rule`` (one of :data:`ONEDNN_RULES`)."""
    global _ONEDNN_RULE
    if rule not in ONEDNN_RULES:
        raise ValueError(f"onednn_rule: expected one of {ONEDNN_RULES}, got {rule!r}")
    old, _ONEDNN_RULE = _ONEDNN_RULE, rule
    try:
        yield
    finally:
        _ONEDNN_RULE = old


#: Per CPU maker (:mod:`recnorm.kernels.host`) and kernel family, where each GEMM of the current rule goes
#: to oneDNN's linear: ``proj``, the hoisted input projection of a forward that saves nothing, from this H
#: (None: never); ``step``, the forward's ``h W_hh^T``, where any ``(min H, min B, max B)`` holds;
#: ``back``, the backward's ``dG W_hh``, likewise. Measured by ``benchmarks/onednn_rule.py`` (see
#: :func:`onednn_plan`). A maker not listed runs every GEMM on MKL.
ONEDNN_HOSTS: Dict[str, Dict[str, Dict]] = {
    "AMD": {
        "lstm": {"proj": 256, "step": [(192, 1, None), (128, 64, None)], "back": [(512, 1, 64)]},
        "gru_rnn": {"proj": None, "step": [(256, 1, None)], "back": [(512, 1, 64)]},
    },
    "Intel": {  # against MKL with W_hh packed once per call (MKL_PACK_MAKERS): every GEMM on MKL
        "lstm": {"proj": None, "step": [], "back": []},
        "gru_rnn": {"proj": None, "step": [], "back": []},
    },
}
#: The ``"2026-12-04"`` rule (:func:`onednn_rule`), the same for every host and family.
ONEDNN_LEGACY: Dict = {"proj": None, "step": [(256, 1, None)], "back": [(512, 1, 64)]}


def _holds(rule: Sequence[Tuple[int, int, Optional[int]]], batch: int, hidden: int) -> bool:
    return any(hidden >= h and batch >= lo and (hi is None or batch <= hi) for h, lo, hi in rule)


def onednn_plan(batch: int, hidden: int, hoisted: bool, dtype: torch.dtype, family: str, saving: bool = True) -> Tuple[bool, bool, bool]:
    """Which GEMMs go to oneDNN's linear instead of MKL's sgemm: (input projection, forward step,
    backward step). ``hoisted``: whether the input projection runs as GEMMs at all; ``saving``: whether
    the forward keeps what a backward needs (False in eval and under ``no_grad``).

    Which library is faster depends on the CPU, so the rule is kept per CPU maker
    (:data:`ONEDNN_HOSTS`, keyed by :func:`recnorm.kernels.host.cpu_maker`); a host of another maker runs
    every GEMM on MKL. Measured with ``benchmarks/onednn_rule.py`` (a fused ``norm=None`` layer with one
    GEMM moved at a time, T = 50, 2 threads, prepacked weights), as oneDNN / MKL time of the whole call:

    * **AMD** (the 2-core AMD EPYC, AVX-512, 2026-12-05, load < 0.3; measured before the script, with the
      same masks): the forward product took 0.85-0.94 from H = 192 at every batch from 4 to 256, 0.98-0.99
      at H = 128 with a batch of 64 or more (and 1.29 -> 0.98 of torch.nn for the whole eval forward at
      (T, B, I, H) = (784, 64, 1, 128)), but 1.1-2.1x at H <= 96 with small batches; the hoisted
      projection in eval 0.92 of the whole forward at (200, 32, 64, 512), neutral at H <= 256 (in training
      it won in isolation but not inside the loop, so MKL keeps it there); the backward product 10-40%
      faster when H >= 512 with a batch of at most 64.
    * **Intel** (a 2-core Intel Xeon, Ice Lake, AVX-512 without BF16, 2026-12-07, load < 0.4). Against
      MKL's sgemm as at::mm calls it, the LSTM's forward product lost at every H up to 256 and won only at
      H = 1024 (0.74-0.92) and at H = 512 with B of 32 or 64 (0.90-0.96); the GRU's likewise. Against MKL
      with ``W_hh`` packed once per call (:data:`MKL_PACK_MAKERS`, the default there since the evening of
      2026-12-07), oneDNN lost everywhere on the grid H in {128, 256, 512, 1024} x B in {8, 32, 64, 128}:
      the LSTM's forward product 1.06-2.42 in eval and 1.04-1.51 in training, its backward product
      1.06-1.54; the GRU's 1.11-2.38, 1.02-1.63 and 1.03-1.56. The LSTM's input projection in eval, which
      had taken 0.93-1.01 from H = 256 when the step's product ran on at::mm, now took 0.89-1.27 (median
      1.10; below 1.0 at 3 of 12 points) on H in {256, 512, 1024}, so it runs on MKL too. The tanh/relu
      RNN runs the GRU's kernel and follows its rule (not measured on its own).

    Under :func:`onednn_rule` ``("2026-12-04")`` every host follows the earlier rule (step from H >= 256,
    backward from H >= 512 with B <= 64, MKL for the projection), with which the legacy runs were made.
    ``RECNORM_FUSED_ONEDNN=0`` or ``1`` forces either choice (or a mask such as ``011``). float32 only.
    """
    env = os.environ.get("RECNORM_FUSED_ONEDNN", "")
    if env == "0" or dtype != torch.float32 or not _onednn_available(family):
        return (False, False, False)
    if env == "1":
        return (hoisted, True, True)
    if len(env) == 3 and set(env) <= {"0", "1"}:  # a mask, e.g. "011"
        return (hoisted and env[0] == "1", env[1] == "1", env[2] == "1")
    if _ONEDNN_RULE == "current":
        rule = ONEDNN_HOSTS.get(host.cpu_maker() or "", {}).get(family)
    else:
        rule = ONEDNN_LEGACY
    if rule is None:
        return (False, False, False)
    proj = rule["proj"] is not None and hoisted and not saving and hidden >= rule["proj"]
    return (proj, _holds(rule["step"], batch, hidden), _holds(rule["back"], batch, hidden))


def _reorder(w: Tensor, batch: int) -> Tensor:
    """``w`` (out, in) prepacked for oneDNN's linear ``x w^T``."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), batch)


#: How many packed weights a forward that saves nothing keeps for the next (each with a copy of its values).
PACK_CACHE_ENTRIES = 4
_PACKED: "collections.OrderedDict[tuple, Tuple[Tensor, Tensor]]" = collections.OrderedDict()
_PACKED_LOCK = threading.Lock()
_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _pack(w: Tensor, batch: int, reuse: bool = False) -> Tensor:
    """``w`` (out, in) prepacked for oneDNN's linear ``x w^T``.

    ``reuse``: for the calls that keep nothing for a backward (eval, ``no_grad``), which usually run again
    and again on unchanged weights, the packing of an earlier call is used again if its weight had the same
    values, bit for bit (packing ``W_hh`` costs about 0.25 ms a call at (B, H) = (128, 128), some 5% of the
    LSTM's eval forward there). A hit is decided by comparing the weight with a copy of the values it was
    packed from, not by its version counter, which an in-place change through ``.data`` does not move: a
    weight changed in any way is packed anew. Keeps :data:`PACK_CACHE_ENTRIES` weights (the most recently
    used); :func:`empty_cache` drops them."""
    if not reuse or PACK_CACHE_ENTRIES <= 0:
        return _reorder(w, batch)
    w = w.detach()
    key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype, batch)
    bits = _BITS[w.element_size()]
    with _PACKED_LOCK:
        hit = _PACKED.get(key)
    if hit is not None and torch.equal(w.view(bits), hit[0].view(bits)):
        with _PACKED_LOCK:
            if _PACKED.get(key) is hit:
                _PACKED.move_to_end(key)
        return hit[1]
    packed = _reorder(w, batch)
    with _PACKED_LOCK:
        _PACKED[key] = (w.clone(), packed)
        _PACKED.move_to_end(key)
        while len(_PACKED) > PACK_CACHE_ENTRIES:
            _PACKED.popitem(last=False)
    return packed


#: The smallest weight-gradient chunk of the fused backward, in rows (:func:`_chunk_rows`).
CHUNK_FLOOR = 1024
#: The floor before 2026-12-05 (evening). Runs made with it replay with it (``RunConfig.chunk_floor``, which
#: :func:`recnorm.experiments.results.read_config` sets for records that do not name their floor).
LEGACY_CHUNK_FLOOR = 2048
_CHUNK_FLOOR = CHUNK_FLOOR


@contextlib.contextmanager
def chunk_floor(rows: Optional[int]) -> Iterator[None]:
    """Within the block, the fused backward's weight-gradient chunks are at least ``rows`` rows (None:
    :data:`CHUNK_FLOOR`). A replay setting: the chunking fixes the order in which the weight gradients are
    summed, so a run replays to 1e-6 only with the floor it ran with."""
    global _CHUNK_FLOOR
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"chunk_floor: expected None or an int >= 1, got {rows!r}")
    old, _CHUNK_FLOOR = _CHUNK_FLOOR, CHUNK_FLOOR if rows is None else rows
    try:
        yield
    finally:
        _CHUNK_FLOOR = old


def chunk_setting() -> Dict[str, object]:
    """What decides the chunks now, for a run's provenance: ``{"chunk_floor": rows}``, plus
    ``"chunk_rows_env"`` when ``$RECNORM_FUSED_CHUNK_ROWS`` overrides it."""
    setting: Dict[str, object] = {"chunk_floor": _CHUNK_FLOOR}
    env = os.environ.get("RECNORM_FUSED_CHUNK_ROWS")
    if env:
        setting["chunk_rows_env"] = env
    return setting


def gemm_setting() -> Dict[str, object]:
    """What the fused kernels' GEMMs do on this host, for a run's provenance, beside :func:`chunk_setting`:
    each of these choices rounds the same products differently, so a run replays bit for bit only with the
    same. ``{"mkl_pack": ..., "wgrad_transposed": ..., "onednn_rule": ..., "build": ...}``: ``W_hh`` packed by
    MKL (:data:`MKL_PACK_MAKERS`), the weight gradients accumulated transposed
    (:data:`WGRAD_TRANSPOSED_MAKERS`), the rule in force of :func:`onednn_plan`, the vector build of each
    extension (``{"lstm": "avx512", "gru_rnn": "avx2"}``, :func:`build_flags`), plus ``"onednn_env"`` where
    ``$RECNORM_FUSED_ONEDNN`` overrides it. Read from a loaded extension (both are set alike when they load;
    this never builds one), else what a build would set. ``RECNORM_FUSED_MKL_PACK``, ``RECNORM_FUSED_WGRAD_T``
    and ``RECNORM_FUSED_AVX512`` (set before the extension loads) replay another."""
    ext = EXTENSIONS["lstm"].module or EXTENSIONS["gru_rnn"].module
    setting: Dict[str, object] = {
        "mkl_pack": bool(ext.gemm_packed()) if ext is not None else mkl_pack_wanted(),
        "wgrad_transposed": bool(ext.wgrad_transposed()) if ext is not None else wgrad_transposed_wanted(),
        "onednn_rule": _ONEDNN_RULE,
        "build": {family: e.tag or build_flags(family)[0] for family, e in EXTENSIONS.items()},
    }
    env = os.environ.get("RECNORM_FUSED_ONEDNN")
    if env:
        setting["onednn_env"] = env
    return setting


def _chunk_rows(n_rows: int) -> int:
    """Rows per chunk of the backward's weight-gradient GEMMs: a quarter of the rows, and at least the floor
    in force (:data:`CHUNK_FLOOR`, or :func:`chunk_floor`'s); ``$RECNORM_FUSED_CHUNK_ROWS``, if set, is the
    chunk itself.

    The backward keeps the gate gradients of one chunk (two ``(rows, G)`` buffers) for its GEMMs, so the
    chunk is memory as well as GEMM size. The floor was 2048 until the GRU's training step at
    (28, 128, 28, 128) peaked at 1.12 of torch.nn's (21.4 MiB against 19.2; 17.9 at 1024 rows). Measured
    with the machine otherwise stopped, the fused training step at 1024 rows against 2048 took 0.95-0.99 as
    long at that size (the chunk stays in cache), and 1600 rows (a quarter) against 2048 took 1.00-1.02 at
    (100, 64, 128, 256) and (200, 32, 64, 512). The chunking also fixes the order in which the weight
    gradients are summed, so runs made with the old floor replay with it (:data:`LEGACY_CHUNK_FLOOR`)."""
    env = os.environ.get("RECNORM_FUSED_CHUNK_ROWS")
    if env:
        return max(1, int(env))
    return max(_CHUNK_FLOOR, n_rows // 4)


def _none_to_empty(ts: Sequence[Optional[Tensor]], like: Tensor) -> List[Tensor]:
    return [like.new_empty(0) if t is None else t for t in ts]


def _no_grads(ts: Sequence[Optional[Tensor]]):
    """The "no gradient" of a ``Tensor?[]`` argument in the structure autograd expects: a list of None
    for a list of tensors, a single None for a list holding None (custom_op keeps that one whole)."""
    return [None] * len(ts) if all(t is not None for t in ts) else None


def _steps(x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor):
    return batch_sizes.shape[0] if batch_sizes is not None else x.shape[0] // h0.shape[0]


def _batch_of(batch_sizes: Optional[Tensor], h0: Tensor) -> int:
    return h0.shape[0]


# ---------------------------------------------------------------------------------------------------
# The LSTM operator
# ---------------------------------------------------------------------------------------------------


def _lstm_cpu(
    x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor],
    g_ih: Optional[Tensor], g_hh: Optional[Tensor], g_c: Optional[Tensor], beta_c: Optional[Tensor], pop: List[Tensor],
    stat: List[int], center: List[int], eps: List[float], batch_stats: bool, save: bool, step_offset: int,
    joint: bool, carry: bool, zone_h: Optional[Tensor], zone_c: Optional[Tensor],
) -> List[Tensor]:
    """``[out, h_n, c_n, XI, XH, C, stats_g, stats_h, moments]`` of one LSTM direction (see the C++).

    ``joint``: one norm (the input term's gain, centring and eps) over the sum of the two gate terms;
    ``carry``: carry the cell norm's output; ``zone_h``, ``zone_c``: zoneout keep indicators, ``(N, H)``
    0/1 bytes (uint8; or values of x's dtype) in training, or ``(1, H)`` filled with the rate (eval). ``C`` holds the carried cells (``N`` rows),
    then, where the carried cell is not c~ (``carry`` or ``zone_c``), c~ of the last two steps (``2B`` rows;
    backward recomputes c~ from the gates)."""
    B, H, I = h0.shape[0], w_hh.shape[1], x.shape[1]
    hoisted = I > INPROJ_MAX
    plan = onednn_plan(B, H, hoisted, x.dtype, "lstm", saving=bool(save))
    res = _ext("lstm").forward(
        x, batch_sizes, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, beta_c, list(pop), list(stat), list(center), list(eps),
        batch_stats, save, int(step_offset), INPROJ_MAX, INPROJ_ROWS,
        _pack(w_hh, B, reuse=not save) if plan[1] else None, _pack(w_ih, INPROJ_ROWS, reuse=not save) if plan[0] else None,
        joint, carry, zone_h, zone_c,
    )  # fmt: skip
    return list(res)


_fused_lstm = torch.library.custom_op("recnorm::fused_lstm", _lstm_cpu, mutates_args=(), device_types="cpu")


@_fused_lstm.register_fake
def _fused_lstm_fake(x, batch_sizes, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, beta_c, pop, stat, center, eps, batch_stats, save, step_offset,
                     joint, carry, zone_h, zone_c):  # fmt: skip
    N, B, H = x.shape[0], h0.shape[0], w_hh.shape[1]
    G, T = 4 * H, _steps(x, batch_sizes, h0)
    fam = stat[0]
    e = x.new_empty
    saved = [e(0)] * 5
    if save:
        saved = [
            e(N, G),
            e(N, G) if fam != 0 else e(0),
            e(N + 2 * B, H) if carry or zone_c is not None else e(N, H),
            e(4, N) if fam == 1 else (e(2, T, G) if fam == 2 else e(0)),
            e(2, T, H) if fam == 2 else e(0),
        ]
    moments = e(2, T, 2 * G + H) if fam == 2 and batch_stats else e(0)
    return [e(N, H), e(B, H), e(B, H)] + saved + [moments]


def _lstm_backward_cpu(
    d_out: Optional[Tensor], d_hn: Optional[Tensor], d_cn: Optional[Tensor], x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor,
    c0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], g_ih: Optional[Tensor], g_hh: Optional[Tensor],
    g_c: Optional[Tensor], beta_c: Optional[Tensor], out: Tensor, XI: Tensor, XH: Tensor, C: Tensor, stats_g: Tensor,
    stats_h: Tensor, stat: List[int], center: List[int], batch_stats: bool, need_dx: bool,
    joint: bool, carry: bool, zone_h: Optional[Tensor], zone_c: Optional[Tensor],
) -> List[Tensor]:
    """``[dx, dh0, dc0, dW_ih, dW_hh, db, dg_ih, dg_hh, dg_c, dbeta_c]`` (empty where not computed)."""
    B, H = h0.shape[0], w_hh.shape[1]
    plan = onednn_plan(B, H, x.shape[1] > INPROJ_MAX, x.dtype, "lstm")
    res = _ext("lstm").backward(
        d_out, d_hn, d_cn, x, batch_sizes, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, beta_c, out, XI, XH, C, stats_g, stats_h,
        list(stat), list(center), batch_stats, need_dx, _chunk_rows(x.shape[0]), _pack(w_hh.t(), B) if plan[2] else None,
        joint, carry, zone_h, zone_c,
    )  # fmt: skip
    return _none_to_empty(res, x)


_fused_lstm_backward = torch.library.custom_op("recnorm::fused_lstm_backward", _lstm_backward_cpu, mutates_args=(), device_types="cpu")


@_fused_lstm_backward.register_fake
def _fused_lstm_backward_fake(d_out, d_hn, d_cn, x, batch_sizes, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, beta_c, out, XI, XH, C,
                              stats_g, stats_h, stat, center, batch_stats, need_dx, joint, carry, zone_h, zone_c):  # fmt: skip
    H = w_hh.shape[1]
    G = 4 * H
    e = x.new_empty
    norm = stat[0] != 0
    return [
        e(x.shape) if need_dx else e(0), e(h0.shape), e(c0.shape), e(w_ih.shape), e(w_hh.shape), e(G),
        e(G) if norm else e(0), e(G) if norm else e(0), e(H) if norm else e(0), e(H) if norm else e(0),
    ]  # fmt: skip


def _lstm_setup(ctx, inputs, output):
    (x, batch_sizes, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, beta_c, pop, stat, center, eps, batch_stats, save, step_offset, joint, carry,
     zone_h, zone_c) = inputs  # fmt: skip
    out, hn, cn, XI, XH, C, stats_g, stats_h, moments = output
    ctx.batch_sizes, ctx.stat, ctx.center, ctx.batch_stats = batch_sizes, stat, center, batch_stats
    ctx.joint, ctx.carry = joint, carry
    # Only out, h_n and c_n carry gradients; the saved terms and moments are outputs for autograd's sake.
    # Without this, autograd hands backward a zero-filled gradient for each of them (XI and XH alone are
    # two (N, 4H) tensors: +50% peak training memory), which the kernel would ignore anyway.
    ctx.set_materialize_grads(False)
    ctx.pop_grad = _no_grads(pop)
    ctx.optional = [t is not None for t in (bias, g_ih, g_hh, g_c, beta_c)]
    _keep_for_recompute(ctx, x, batch_sizes, h0, pop, stat, eps, step_offset, batch_stats)
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, beta_c, out, XI, XH, C, stats_g, stats_h, zone_h, zone_c)


def _lstm_backward(ctx, grads):
    why = autodiff.recompute_reason(grads)
    if why is not None:
        return _lstm_backward_by_recompute(ctx, grads, why == "graph")
    d_out, d_hn, d_cn = (g.contiguous() if g is not None else None for g in grads[:3])
    x, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, beta_c, out, XI, XH, C, stats_g, stats_h, zone_h, zone_c = ctx.saved_tensors
    if XI.numel() == 0 and out.numel() > 0:
        raise RuntimeError("recnorm: this fused LSTM call saved nothing for backward (it ran without autograd)")
    g = autodiff.run(torch.ops.recnorm.fused_lstm_backward, _lstm_backward_cpu,
        d_out, d_hn, d_cn, x, ctx.batch_sizes, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, beta_c, out, XI, XH, C, stats_g, stats_h,
        ctx.stat, ctx.center, ctx.batch_stats, bool(ctx.needs_input_grad[0]), ctx.joint, ctx.carry, zone_h, zone_c,
    )  # fmt: skip
    dx, dh0, dc0, dw_ih, dw_hh, db, dg_ih, dg_hh, dg_c, dbeta_c = g
    opt = [o and (t.numel() > 0) for o, t in zip(ctx.optional, (db, dg_ih, dg_hh, dg_c, dbeta_c))]
    db, dg_ih, dg_hh, dg_c, dbeta_c = (t if o else None for t, o in zip((db, dg_ih, dg_hh, dg_c, dbeta_c), opt))
    return (dx if dx.numel() or x.numel() == 0 else None, None, dh0, dc0, dw_ih, dw_hh, db, dg_ih, dg_hh, dg_c, dbeta_c,
            ctx.pop_grad, None, None, None, None, None, None, None, None, None, None)  # fmt: skip


def _lstm_backward_by_recompute(ctx, grads, create_graph: bool):
    """The gradients of the reference loop's recomputation (as a graph for a double backward; see
    :mod:`recnorm.kernels.autodiff`)."""
    x, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, beta_c = ctx.saved_tensors[:10]
    zones = ctx.saved_tensors[16:]

    def forward(x, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, beta_c):
        return autodiff.operator_reference("lstm", x, ctx.batch_sizes, h0, c0, w_ih, w_hh, bias, None, (g_ih, g_hh, g_c),
                                           (None, None, beta_c), _recompute_pop(ctx), ctx.stat, ctx.center, ctx.eps, ctx.batch_stats,
                                           ctx.joint, ctx.carry, (0, 0), zones)  # fmt: skip

    needs = [ctx.needs_input_grad[i] for i in (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)]
    dx, dh0, dc0, dw_ih, dw_hh, db, dg_ih, dg_hh, dg_c, dbeta_c = autodiff.recompute_grads(
        forward, (x, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, beta_c), needs, grads[:3], create_graph
    )
    return (dx, None, dh0, dc0, dw_ih, dw_hh, db, dg_ih, dg_hh, dg_c, dbeta_c, ctx.pop_grad) + (None,) * 10


_fused_lstm.register_autograd(_lstm_backward, setup_context=_lstm_setup)
torch.library.register_vmap(_fused_lstm, autodiff.per_slice_vmap(torch.ops.recnorm.fused_lstm.default))
torch.library.register_vmap(_fused_lstm_backward, autodiff.per_slice_vmap(torch.ops.recnorm.fused_lstm_backward.default))
_LSTM_CALL = autodiff.OperatorCall("FusedLSTM", torch.ops.recnorm.fused_lstm, _lstm_cpu, _lstm_setup, _lstm_backward, 11)


# ---------------------------------------------------------------------------------------------------
# The GRU / RNN operator
# ---------------------------------------------------------------------------------------------------


def _gru_rnn_cpu(
    x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], b_hn: Optional[Tensor],
    g_ih: Optional[Tensor], g_hh: Optional[Tensor], pop: List[Tensor], cell: int, stat: List[int], center: List[int],
    eps: List[float], batch_stats: bool, save: bool, step_offset: int, joint: bool, one_group: List[int], zone_h: Optional[Tensor],
) -> List[Tensor]:
    """``[out, h_n, XI, XH, stats, moments]`` of one GRU or RNN direction (see the C++).

    ``joint`` (RNN, row statistics): one norm (the input term's gain, centring and eps) over the sum of the
    two terms; ``one_group``: per site (ih, hh), whether the GRU's layer norm takes one group over all 3H
    features (haste's LayerNormGRU) instead of (2H, H); ``zone_h``: zoneout keep indicators ``(N, H)``
    (uint8 bytes, or values of x's dtype; training) or ``(1, H)`` filled with the rate (eval)."""
    B, H = h0.shape[0], w_hh.shape[1]
    plan = onednn_plan(B, H, False, x.dtype, "gru_rnn")
    res = _ext("gru_rnn").forward(
        x, batch_sizes, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh, list(pop), int(cell), list(stat), list(center), list(eps),
        batch_stats, save, int(step_offset), INPROJ_MAX, INPROJ_ROWS, _pack(w_hh, B, reuse=not save) if plan[1] else None, joint,
        list(one_group), zone_h,
    )  # fmt: skip
    return list(res)


_fused_gru_rnn = torch.library.custom_op("recnorm::fused_gru_rnn", _gru_rnn_cpu, mutates_args=(), device_types="cpu")


def _gru_rnn_terms_unused(cell: int, stat: List[int], joint: bool, zone_h: Optional[Tensor], g_ih: Optional[Tensor],
                          g_hh: Optional[Tensor]) -> bool:
    """Whether a saving call keeps its two gate terms back (``terms_unused`` in the C++, which this mirrors):
    an Elman RNN with no norm, no gains, no zoneout and no joint norm, whose backward reads only its outputs.
    XI and XH then come back empty and only the row statistics are saved."""
    return int(cell) != 0 and stat[0] == 0 and not joint and zone_h is None and g_ih is None and g_hh is None


@_fused_gru_rnn.register_fake
def _fused_gru_rnn_fake(x, batch_sizes, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh, pop, cell, stat, center, eps, batch_stats, save, step_offset,
                        joint, one_group, zone_h):  # fmt: skip
    N, B, H = x.shape[0], h0.shape[0], w_hh.shape[1]
    G, T = w_hh.shape[0], _steps(x, batch_sizes, h0)
    fam = stat[0]
    e = x.new_empty
    saved = [e(0)] * 3
    if save:
        saved = [e(N, G), e(N, G), e(2, T, G) if fam == 2 else e(4, N)]
        if _gru_rnn_terms_unused(cell, stat, joint, zone_h, g_ih, g_hh):
            saved[:2] = [e(0), e(0)]
    moments = e(2, T, 2 * G) if fam == 2 and batch_stats else e(0)
    return [e(N, H), e(B, H)] + saved + [moments]


def _gru_rnn_backward_cpu(
    d_out: Optional[Tensor], d_hn: Optional[Tensor], x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, w_ih: Tensor, w_hh: Tensor,
    bias: Optional[Tensor], b_hn: Optional[Tensor], g_ih: Optional[Tensor], g_hh: Optional[Tensor], out: Tensor, XI: Tensor,
    XH: Tensor, stats: Tensor, cell: int, stat: List[int], center: List[int], batch_stats: bool, need_dx: bool,
    joint: bool, one_group: List[int], zone_h: Optional[Tensor],
) -> List[Tensor]:
    """``[dx, dh0, dW_ih, dW_hh, db, db_hn, dg_ih, dg_hh]`` (empty where not computed)."""
    B, H = h0.shape[0], w_hh.shape[1]
    plan = onednn_plan(B, H, False, x.dtype, "gru_rnn")
    res = _ext("gru_rnn").backward(
        d_out, d_hn, x, batch_sizes, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh, out, XI, XH, stats, int(cell), list(stat),
        list(center), batch_stats, need_dx, _chunk_rows(x.shape[0]), _pack(w_hh.t(), B) if plan[2] else None,
        joint, list(one_group), zone_h,
    )  # fmt: skip
    return _none_to_empty(res, x)


_fused_gru_rnn_backward = torch.library.custom_op("recnorm::fused_gru_rnn_backward", _gru_rnn_backward_cpu, mutates_args=(), device_types="cpu")


@_fused_gru_rnn_backward.register_fake
def _fused_gru_rnn_backward_fake(d_out, d_hn, x, batch_sizes, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh, out, XI, XH, stats, cell, stat,
                                 center, batch_stats, need_dx, joint, one_group, zone_h):  # fmt: skip
    H, G = w_hh.shape[1], w_hh.shape[0]
    e = x.new_empty
    return [e(x.shape) if need_dx else e(0), e(h0.shape), e(w_ih.shape), e(w_hh.shape), e(G), e(H) if cell == 0 else e(0), e(G), e(G)]


def _gru_setup(ctx, inputs, output):
    (x, batch_sizes, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh, pop, cell, stat, center, eps, batch_stats, save, step_offset, joint,
     one_group, zone_h) = inputs  # fmt: skip
    out, hn, XI, XH, stats, moments = output
    ctx.batch_sizes, ctx.cell, ctx.stat, ctx.center, ctx.batch_stats = batch_sizes, cell, stat, center, batch_stats
    ctx.joint, ctx.one_group = joint, one_group
    ctx.pop_grad = _no_grads(pop)
    ctx.optional = [t is not None for t in (bias, b_hn, g_ih, g_hh)]
    ctx.set_materialize_grads(False)  # as for the LSTM: no zero-filled gradients of the saved terms
    _keep_for_recompute(ctx, x, batch_sizes, h0, pop, stat, eps, step_offset, batch_stats)
    ctx.save_for_backward(x, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh, out, XI, XH, stats, zone_h)


def _gru_backward(ctx, grads):
    why = autodiff.recompute_reason(grads)
    if why is not None:
        return _gru_backward_by_recompute(ctx, grads, why == "graph")
    d_out, d_hn = (g.contiguous() if g is not None else None for g in grads[:2])
    x, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh, out, XI, XH, stats, zone_h = ctx.saved_tensors
    if stats.numel() == 0 and out.numel() > 0:  # (XI and XH may be empty by design: _gru_rnn_terms_unused)
        raise RuntimeError("recnorm: this fused GRU/RNN call saved nothing for backward (it ran without autograd)")
    g = autodiff.run(torch.ops.recnorm.fused_gru_rnn_backward, _gru_rnn_backward_cpu,
        d_out, d_hn, x, ctx.batch_sizes, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh, out, XI, XH, stats, ctx.cell, ctx.stat, ctx.center,
        ctx.batch_stats, bool(ctx.needs_input_grad[0]), ctx.joint, ctx.one_group, zone_h,
    )  # fmt: skip
    dx, dh0, dw_ih, dw_hh, db, db_hn, dg_ih, dg_hh = g
    db, db_hn, dg_ih, dg_hh = (t if o else None for t, o in zip((db, db_hn, dg_ih, dg_hh), ctx.optional))
    return (dx if dx.numel() or x.numel() == 0 else None, None, dh0, dw_ih, dw_hh, db, db_hn, dg_ih, dg_hh, ctx.pop_grad,
            None, None, None, None, None, None, None, None, None, None)  # fmt: skip


def _gru_backward_by_recompute(ctx, grads, create_graph: bool):
    """As for the LSTM."""
    x, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh = ctx.saved_tensors[:8]
    zone_h = ctx.saved_tensors[12]

    def forward(x, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh):
        return autodiff.operator_reference(ctx.cell, x, ctx.batch_sizes, h0, None, w_ih, w_hh, bias, b_hn, (g_ih, g_hh), (None, None),
                                           _recompute_pop(ctx), ctx.stat, ctx.center, ctx.eps, ctx.batch_stats, ctx.joint, False,
                                           ctx.one_group, (zone_h,))  # fmt: skip

    needs = [ctx.needs_input_grad[i] for i in (0, 2, 3, 4, 5, 6, 7, 8)]
    dx, dh0, dw_ih, dw_hh, db, db_hn, dg_ih, dg_hh = autodiff.recompute_grads(
        forward, (x, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh), needs, grads[:2], create_graph
    )
    return (dx, None, dh0, dw_ih, dw_hh, db, db_hn, dg_ih, dg_hh, ctx.pop_grad) + (None,) * 10


_fused_gru_rnn.register_autograd(_gru_backward, setup_context=_gru_setup)
torch.library.register_vmap(_fused_gru_rnn, autodiff.per_slice_vmap(torch.ops.recnorm.fused_gru_rnn.default))
torch.library.register_vmap(_fused_gru_rnn_backward, autodiff.per_slice_vmap(torch.ops.recnorm.fused_gru_rnn_backward.default))
_GRU_RNN_CALL = autodiff.OperatorCall("FusedGRURNN", torch.ops.recnorm.fused_gru_rnn, _gru_rnn_cpu, _gru_setup, _gru_backward, 9)


def _keep_for_recompute(ctx, x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, pop, stat, eps, step_offset: int,
                        batch_stats: bool) -> None:
    """What a double backward's recomputation needs besides the saved tensors: eps, and the population
    statistics as this call read them (not under torch.compile or torch.jit.trace, whose graphs never
    differentiate a backward). A call reads them in eval mode and at steps of fewer than 2 valid rows only:
    a training call whose every step has 2 rows or more normalizes with batch statistics throughout, and
    keeps the buffers themselves, uncopied (the recomputation then reads no value of them)."""
    ctx.eps = eps
    ctx.pop = None
    if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
        # A packed batch's last step has its fewest rows; sizes that cannot be read here (fake tensors under
        # opcheck's or AOTAutograd's tracing) count as reading.
        reads = not batch_stats or h0.shape[0] < 2 or (
            batch_sizes is not None and (not autodiff.plain_eager([batch_sizes]) or (batch_sizes.numel() > 0 and int(batch_sizes[-1]) < 2))
        )
        ctx.pop = (autodiff.population_copy(pop, stat) if reads else list(pop), stat, _steps(x, batch_sizes, h0), step_offset)


def _recompute_pop(ctx) -> Optional[List[Tensor]]:
    """The per-step population statistics a recomputation normalizes with (:func:`_keep_for_recompute`)."""
    return None if ctx.pop is None else autodiff.population_snapshot(*ctx.pop)


# ---------------------------------------------------------------------------------------------------
# Which cases this path serves, and the call
# ---------------------------------------------------------------------------------------------------

_SITES = {"lstm": ("ih", "hh", "gates", "cell"), "gru": ("ih", "hh"), "rnn_tanh": ("ih", "hh", "gates"), "rnn_relu": ("ih", "hh", "gates")}


def _kernel_sites(work: DirectionWork) -> Tuple[str, ...]:
    """The sites the kernel's three (LSTM) or two (GRU/RNN) norm slots hold: with a joint gate norm, the
    LSTM kernel reads the ``"gates"`` site in the input term's slot (and in the recurrent term's, which it
    then ignores)."""
    joint = work.norm("gates") is not None
    if work.cell.kind == "lstm":
        return ("gates", "gates", "cell") if joint else ("ih", "hh", "cell")
    return ("gates", "gates") if joint else ("ih", "hh")


def _folded_view(work: DirectionWork) -> DirectionWork:
    """The direction as the kernel sees it: a sequence-wise input norm is folded into the input weights
    before the kernel runs (:func:`recnorm.kernels.functional.fold_sequence_norm`), so it counts as none."""
    ih = work.norm("ih")
    if ih is None or ih.stat != "sequence":
        return work
    if ih.sync and ih.batch_stats:
        return work  # refused below: no synchronized statistics here
    return work.replace(norms={s: d for s, d in work.norms.items() if s != "ih"})


def _family(work: DirectionWork) -> Optional[str]:
    """The one statistic family every site of the cell uses ("none", "row", "batch"), or None."""
    kinds = set()
    for site in _kernel_sites(work):
        d = work.norm(site)
        kinds.add("none" if d is None else ("batch" if d.stat in ("step", "shared") else d.stat))
    return kinds.pop() if len(kinds) == 1 and kinds <= {"none", "row", "batch"} else None


def supports(work: DirectionWork, x: Tensor, batch_sizes: Optional[Tensor], mode: str) -> Optional[str]:
    """Why the fused kernels cannot serve this direction (None: they can)."""
    kind = work.cell.kind
    if kind not in _SITES:
        return "it computes torch.nn's LSTM, GRU and RNN (tanh, relu) cells only"
    if work.weight_hr is not None:
        return "it does not serve proj_size"
    if work.on_output is not None:
        return "it does not report per-step outputs (diagnostics capture)"
    work = _folded_view(work)
    if set(work.present_norms()) - set(_SITES[kind]):
        return "it serves norms at the input term, the recurrent term (or their sum) and the LSTM cell"
    family = _family(work)
    if family is None:
        return "every normalized site must use the same statistic family (none, per row, or per step)"
    if (work.carry_cell_norm or work.norm("gates") is not None) and family != "row":
        return "it serves a joint gate norm and a carried cell norm with row statistics (layer norm, RMSNorm) only"
    if work.carry_cell_norm and work.norm("cell") is None:
        return "a carried cell norm needs a norm at the cell"
    hidden = work.weight_hh.shape[1]
    # the cell's own groups; the GRU's layer norm may also take one group over all 3H (haste's LayerNormGRU)
    groups = {"lstm": [(4 * hidden,)], "gru": [(2 * hidden, hidden), (3 * hidden,)]}.get(kind, [(hidden,)])
    for site, d in work.present_norms().items():
        want = [(hidden,)] if site == "cell" else groups
        if d.stat == "row" and fixed_size_check(lambda: tuple(d.groups) not in want):
            return f"layer-norm groups {tuple(d.groups)} at site {site!r} are not one of the cell's {' or '.join(map(str, want))}"
        if d.sync and d.batch_stats:
            return "it does not synchronize batch statistics across processes"
    if family == "batch" and len({d.batch_stats for d in work.present_norms().values()}) > 1:
        return "its batch-norm sites must all be in training mode or all in eval mode"
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return f"it runs on float32/float64 CPU tensors (got {x.dtype} on {x.device.type})"
    for t in [work.weight_ih, work.weight_hh, work.bias_ih, work.bias_hh] + [u for d in work.present_norms().values() for u in d.tensors()]:
        if t is not None and t.device != x.device:
            return "its weights and statistics must be on the input's device"
        if t is not None and t.is_floating_point() and t.dtype != x.dtype:
            return f"its weights and statistics must have the input's dtype ({x.dtype})"
    if not available("lstm" if kind == "lstm" else "gru_rnn"):
        return "its C++ extension could not be built (see the log)"
    return None


def _sum_present(*ts: Optional[Tensor]) -> Optional[Tensor]:
    total = None
    for t in ts:
        if t is not None:
            total = t if total is None else total + t
    return total


def _site_args(work: DirectionWork, sites: Sequence[str]):
    """Per site: statistic family code, centring, eps, and the population statistics (None without)."""
    stat, center, eps, pop = [], [], [], []
    for site in sites:
        d = work.norm(site)
        stat.append(0 if d is None else _FAMILY[d.stat])
        center.append(1 if d is None or d.center else 0)
        eps.append(1e-5 if d is None else float(d.eps))
        pop += [None, None, None] if d is None or not d.is_batch else [d.running_mean, d.running_var, d.num_batches_tracked]
    # A Tensor[] (not Tensor?[]) argument, which torch.jit.trace can record: empty tensors stand for absent ones.
    empty = work.weight_ih.new_empty(0)
    return stat, center, eps, [empty if t is None else t for t in pop]


def _moments(work: DirectionWork, sites: Sequence[str], moments: Tensor, widths: Sequence[int], counts: Tensor) -> Dict[str, BatchMoments]:
    """The batch moments output ``(2, T, sum(widths))`` split by site (sites without batch statistics,
    or a call in eval mode, have none: the output is then empty and not read). Each site's mean and
    variance are views of it, in as few operations as there are sites."""
    T, offset = moments.shape[1], work.step_offset
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        # a trace records the steps as an operation on its T: arange(T) + offset keeps it symbolic
        steps, last = torch.arange(T, device=moments.device) + offset, None
    else:
        steps, last = torch.arange(offset, offset + T, device=moments.device), offset + T - 1
    out = {}
    for site, part in zip(sites, moments.split(list(widths), dim=2)):
        d = work.norm(site)
        if d is not None and d.is_batch:
            mean, var = part.unbind(0)
            out[site] = BatchMoments(steps, mean, var, counts, last)
    return out


def _counts(batch_sizes: Optional[Tensor], T: Optional[int], B: Optional[int]) -> Tensor:
    """Valid rows per step: a packed batch's sizes, or T steps of B."""
    return batch_sizes if batch_sizes is not None else torch.full((T,), B, dtype=torch.long)


def _needs_grad(*ts: Optional[Tensor]) -> bool:
    """Whether the call must keep what backward needs (the operator's ``save``). A traced module replays
    the ``save`` it was traced with in any grad mode, and torch.jit.trace's own check re-traces under
    ``no_grad``: under tracing, ``save`` follows ``requires_grad`` alone (``model.requires_grad_(False)``
    before tracing gives a trace that keeps nothing)."""
    grad_mode = torch.jit.is_tracing() or torch.is_grad_enabled()
    return grad_mode and any(t is not None and t.requires_grad for t in ts)


def run_direction(work: DirectionWork, x: Tensor, batch_sizes: Optional[Tensor], state: Tuple[Tensor, ...]) -> DirectionResult:
    """One direction on the fused kernel (the caller checked :func:`supports`)."""
    work, folded = fold_sequence_norm(work, x)
    kind = work.cell.kind
    H = work.weight_hh.shape[1]
    full = x.dim() == 3  # (T, B, F): a full batch; else packed rows
    T, B = (x.shape[0], x.shape[1]) if full else (None, None)
    x = (x.reshape(T * B, x.shape[2]) if full else x).contiguous()
    h0 = state[0].contiguous()
    unflat = (lambda out: out.view(T, B, out.shape[-1])) if full else (lambda out: out)
    d = work.present_norms()
    batch_stats = any(n.batch_stats for n in d.values() if n.is_batch)
    gain = lambda site: None if work.norm(site) is None else work.norm(site).weight  # noqa: E731
    shift = lambda site: None if work.norm(site) is None else work.norm(site).bias  # noqa: E731
    if kind == "lstm":
        sites = _kernel_sites(work)
        joint = sites[0] == "gates"
        stat, center, eps, pop = _site_args(work, sites)
        # gate-norm shifts add to the bias
        bias = _sum_present(work.bias_ih, work.bias_hh, *((shift("gates"),) if joint else (shift("ih"), shift("hh"))))
        c0 = state[1].contiguous()
        args = (x, batch_sizes, h0, c0, work.weight_ih.contiguous(), work.weight_hh.contiguous(), bias, gain(sites[0]),
                None if joint else gain("hh"), gain("cell"), shift("cell"))  # fmt: skip
        save = _needs_grad(*args, *[t for n in d.values() for t in (n.weight, n.bias)])
        zones = [_zone_tensor(work.zone(k), x, H) for k in (0, 1)]
        res = _LSTM_CALL(*args, pop, stat, center, eps, batch_stats, save, work.step_offset, joint, bool(work.carry_cell_norm), *zones)
        moments = _moments(work, sites, res[8], (4 * H, 4 * H, H), _counts(batch_sizes, T, B)) if batch_stats else {}
        return DirectionResult(unflat(res[0]), (res[1], res[2]), {**folded, **moments})
    sites = _kernel_sites(work)
    joint = sites[0] == "gates"
    stat, center, eps, pop = _site_args(work, sites)
    if joint:  # the joint norm's shift adds to the bias; its gain is the input slot's, the recurrent slot has none
        b, b_hn = _gate_biases(False, H, work, shift("gates"), None)
        g_ih, g_hh = gain("gates"), None
    else:
        b, b_hn = _gate_biases(kind == "gru", H, work, shift("ih"), shift("hh"))
        g_ih, g_hh = gain("ih"), gain("hh")
    args = (x, batch_sizes, h0, work.weight_ih.contiguous(), work.weight_hh.contiguous(), b, b_hn, g_ih, g_hh)
    save = _needs_grad(*args)
    one_group = [int(kind == "gru" and d is not None and d.stat == "row" and len(d.groups) == 1) for d in map(work.norm, sites)]
    zone_h = _zone_tensor(work.zone(0), x, H)
    res = _GRU_RNN_CALL(*args, pop, _CELL_CODES[kind], stat, center, eps, batch_stats, save, work.step_offset, joint, one_group,
                        zone_h)  # fmt: skip
    G = work.weight_hh.shape[0]
    moments = _moments(work, sites, res[5], (G, G), _counts(batch_sizes, T, B)) if batch_stats else {}
    return DirectionResult(unflat(res[0]), (res[1],), {**folded, **moments})


def _zone_tensor(z, x: Tensor, hidden: int) -> Optional[Tensor]:
    """A state's zoneout as the kernel reads it: keep indicators ``(N, H)`` (training; bool indicators as
    uint8 bytes, without a copy; others in x's dtype), or the rate as a ``(1, H)`` row (eval); None without
    zoneout."""
    if z is None:
        return None
    if isinstance(z, Tensor):
        z = z.reshape(-1, hidden).contiguous()
        return z.view(torch.uint8) if z.dtype == torch.bool else z.to(x.dtype)
    return x.new_full((1, hidden), float(z))


def _gate_biases(gru: bool, hidden: int, work: DirectionWork, shift_ih, shift_hh) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(b, b_hn)`` of the GRU/RNN kernel: ``b`` (G) every bias added outside the GRU's reset product
    (``b_ih + b_hh`` and gate-norm shifts for the RNN and the GRU's r, z blocks, ``b_in`` for its n block),
    ``b_hn`` (H, GRU only) the recurrent n-block bias inside ``r * (.)``."""
    b_i = _sum_present(work.bias_ih, shift_ih)
    b_h = _sum_present(work.bias_hh, shift_hh)
    if not gru:
        b = _sum_present(b_i, b_h)
        return (None if b is None else b.contiguous()), None
    if b_h is None:
        return (None if b_i is None else b_i.contiguous()), None
    rz, hn = b_h.split([2 * hidden, hidden])
    b = torch.cat([rz, torch.zeros_like(hn)]) if b_i is None else b_i + torch.cat([rz, torch.zeros_like(hn)])
    return b.contiguous(), hn.contiguous()
