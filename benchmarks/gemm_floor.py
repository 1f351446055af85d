"""What bounds the fused LSTM: its GEMMs alone, timed against torch.nn.LSTM's whole eval forward or
training step.

An LSTM layer's eval forward is one input projection ``x W_ih^T + b`` over all T*B rows and T recurrent
products ``h W_hh^T`` of (B, H) x (H, 4H); everything else (the gates, a norm's statistics) is a pass over
the (B, 4H) result. A training step (``out.sum().backward()``, the input not requiring a gradient, as in
``bench_rnn.py``) adds T products ``dG W_hh`` of (B, 4H) x (4H, H) for dL/dh_{t-1} and the weight gradients
``dG^T x`` and ``dG^T h`` over all T*B rows. This script times, at each size, in interleaved rounds with the
same threads:

* ``torch.nn``: ``torch.nn.LSTM``'s eval forward or training step (oneDNN's fused LSTM primitive on CPU);
* ``fused``: recnorm's fused kernel, ``norm=None`` and ``norm="layer"``, the same;
* ``GEMMs (MKL)``: only the products above, through ``torch.addmm`` / ``torch.mm`` (MKL's sgemm);
* ``GEMMs (oneDNN)``: the same, the products with a fixed right operand (the projection and the step
  products) through oneDNN's linear with prepacked weights, the choice
  ``recnorm.kernels.fused.onednn_plan`` can make; the weight gradients stay on ``torch.mm``.

It prints each time as a ratio to torch.nn's. Where the GEMMs alone take 0.95 or more of torch.nn's whole
forward, an eval forward built on those GEMMs cannot reach 1.0 however the rest is fused: the bound is the
GEMM, not the kernel around it (and likewise a training step at 0.85 or more against a target of 0.9). Like
every timing here it means something only on a quiet machine; it refuses to start above ``--max-load`` and
reports the load around the run. It times under bench_rnn.py's steady allocator by default
(``--allocator``, benchmarks/allocator.py): under glibc's defaults torch.nn's training step pays page faults
that are no GEMM's::

    python benchmarks/gemm_floor.py                   # the four sizes of bench_rnn.py, 2 threads, eval
    python benchmarks/gemm_floor.py --mode train
    python benchmarks/gemm_floor.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import allocator  # noqa: E402
from bench_rnn import LoadWatch, load_average, ratio_table, refuse_loaded, refuse_others  # noqa: E402

import recnorm  # noqa: E402

SIZES = [(28, 128, 28, 128), (100, 64, 128, 256), (200, 32, 64, 512), (784, 64, 1, 128)]


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _onednn_gemms(x2, w_ih, w_hh, bias, h, T, back=None):
    """The products through oneDNN's linear with prepacked weights, or None where this build lacks it.
    ``back``: for a training step, ``(dG, weight_grads)``, a step's gate gradients and the weight-gradient
    products (on ``torch.mm``, shared with the MKL candidate)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return None
    B = h.shape[0]
    p_ih = torch.ops.mkldnn._reorder_linear_weight(w_ih, x2.shape[0])
    p_hh = torch.ops.mkldnn._reorder_linear_weight(w_hh, B)
    p_hh_t = torch.ops.mkldnn._reorder_linear_weight(w_hh.t().contiguous(), B)  # dG W_hh = dG (W_hh^T)^T

    def run():
        torch.ops.mkldnn._linear_pointwise(x2, p_ih, bias, "none", [], "")
        for _ in range(T):
            torch.ops.mkldnn._linear_pointwise(h, p_hh, None, "none", [], "")
        if back is not None:
            dg, weight_grads = back
            for _ in range(T):
                torch.ops.mkldnn._linear_pointwise(dg, p_hh_t, None, "none", [], "")
            weight_grads()

    try:
        run()
    except Exception:  # the op's schema differs in this torch build
        return None
    return run


MODES = ("eval", "train")


def measure(size, rounds: int, reps: int, mode: str = "eval") -> dict:
    """torch.nn's median milliseconds and each candidate's median ratio to it, at ``size`` (T, B, I, H), for
    the eval forward or the training step (``mode``)."""
    if mode not in MODES:
        raise ValueError(f"gemm_floor.measure: mode must be one of {MODES}, got {mode!r}")
    train = mode == "train"
    T, B, I, H = size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, I, generator=g)
    ref = torch.nn.LSTM(I, H).train(train)
    fused = {n: recnorm.LSTM(I, H, norm=n, kernel="fused").train(train) for n in (None, "layer")}
    w_ih, w_hh = ref.weight_ih_l0.detach(), ref.weight_hh_l0.detach()
    bias = (ref.bias_ih_l0 + ref.bias_hh_l0).detach()
    x2, h = x.reshape(T * B, I), torch.randn(B, H, generator=g)
    out_in, out_h = torch.empty(T * B, 4 * H), torch.empty(B, 4 * H)
    back = None
    if train:  # the backward's operands: a step's gate gradients, all of them, the states they multiply
        dg, dg_all, hs = (torch.randn(B, 4 * H, generator=g), torch.randn(T * B, 4 * H, generator=g),
                          torch.randn(T * B, H, generator=g))  # fmt: skip
        dw_ih, dw_hh, out_dh = torch.empty(4 * H, I), torch.empty(4 * H, H), torch.empty(B, H)

        def weight_grads():
            torch.mm(dg_all.t(), x2, out=dw_ih)
            torch.mm(dg_all.t(), hs, out=dw_hh)

        back = (dg, weight_grads)

    def mkl():
        torch.addmm(bias, x2, w_ih.t(), out=out_in)
        for _ in range(T):
            torch.mm(h, w_hh.t(), out=out_h)
        if back is not None:
            for _ in range(T):
                torch.mm(dg, w_hh, out=out_dh)
            weight_grads()

    def step(model):
        if not train:
            return lambda: model(x)

        def run():
            model(x)[0].sum().backward()
            model.zero_grad(set_to_none=True)

        return run

    cands = {"torch.nn": step(ref), "fused None": step(fused[None]), "fused layer": step(fused["layer"]), "GEMMs (MKL)": mkl}
    dnn = _onednn_gemms(x2, w_ih, w_hh, bias, h, T, back)
    if dnn is not None:
        cands["GEMMs (oneDNN)"] = dnn
    ratios = {k: [] for k in cands if k != "torch.nn"}
    base_ms = []
    with torch.set_grad_enabled(train):
        for _ in range(rounds):
            base = _time(cands["torch.nn"], reps)
            base_ms.append(base * 1e3)
            for k, fn in cands.items():
                if k != "torch.nn":
                    ratios[k].append(_time(fn, reps) / base)
    return {"torch.nn ms": statistics.median(base_ms), **{k: statistics.median(v) for k, v in ratios.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--max-load", type=float, default=0.5)
    ap.add_argument("--mode", choices=MODES, default="eval", help="eval forward (default) or training step")
    ap.add_argument("--allocator", choices=allocator.CHOICES, default="steady",
                    help="glibc's malloc during the timing, as in bench_rnn.py (benchmarks/allocator.py; default %(default)s)")
    args = ap.parse_args(argv)
    if refuse_loaded("gemm_floor", load_average(), args.max_load):
        return 2
    alloc = allocator.set_or_exit(args.allocator, "gemm_floor.py")
    torch.set_num_threads(args.threads)
    watch = LoadWatch()
    rows = [(s, measure(s, args.rounds, args.reps, args.mode)) for s in SIZES]
    load = watch.stop()
    keys = [k for k in rows[0][1] if k != "torch.nn ms"]
    step = "eval forward" if args.mode == "eval" else "training step"
    what = (f"LSTM {step}, {args.threads} thread(s), median of {args.rounds} interleaved rounds, ratio to torch.nn.LSTM; "
            f"allocator {alloc['name']}")
    print("\n".join(ratio_table(what, load, rows, keys)))
    if refuse_others(load, args.max_load):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
