"""What bounds the fused LSTM's eval forward: its GEMMs alone, timed against torch.nn.LSTM's whole forward.

An LSTM layer's eval forward is one input projection ``x W_ih^T + b`` over all T*B rows and T recurrent
products ``h W_hh^T`` of (B, H) x (H, 4H); everything else (the gates, a norm's statistics) is a pass over
the (B, 4H) result. This script times, at each size, in interleaved rounds with the same threads:

* ``torch.nn``: ``torch.nn.LSTM``'s eval forward (oneDNN's fused LSTM primitive on CPU);
* ``fused``: recnorm's fused kernel, ``norm=None`` and ``norm="layer"``, eval forward;
* ``GEMMs (MKL)``: only the products above, through ``torch.addmm`` / ``torch.mm`` (MKL's sgemm);
* ``GEMMs (oneDNN)``: the same products through oneDNN's linear with prepacked weights, the choice
  ``recnorm.kernels.fused.onednn_plan`` can make.

It prints each time as a ratio to torch.nn's. Where the GEMMs alone take 0.95 or more of torch.nn's whole
forward, an eval forward built on those GEMMs cannot reach 1.0 however the rest is fused: the bound is the
GEMM, not the kernel around it. Like every timing here it means something only on a quiet machine; it
refuses to start above ``--max-load`` and reports the load around the run::

    python benchmarks/gemm_floor.py                   # the four sizes of bench_rnn.py, 2 threads
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


def _onednn_gemms(x2, w_ih, w_hh, bias, h, T):
    """The products through oneDNN's linear with prepacked weights, or None where this build lacks it."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return None
    B = h.shape[0]
    p_ih = torch.ops.mkldnn._reorder_linear_weight(w_ih, x2.shape[0])
    p_hh = torch.ops.mkldnn._reorder_linear_weight(w_hh, B)

    def run():
        torch.ops.mkldnn._linear_pointwise(x2, p_ih, bias, "none", [], "")
        for _ in range(T):
            torch.ops.mkldnn._linear_pointwise(h, p_hh, None, "none", [], "")

    try:
        run()
    except Exception:  # the op's schema differs in this torch build
        return None
    return run


def measure(size, rounds: int, reps: int) -> dict:
    T, B, I, H = size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, I, generator=g)
    ref = torch.nn.LSTM(I, H).eval()
    fused = {n: recnorm.LSTM(I, H, norm=n, kernel="fused").eval() for n in (None, "layer")}
    w_ih, w_hh = ref.weight_ih_l0.detach(), ref.weight_hh_l0.detach()
    bias = (ref.bias_ih_l0 + ref.bias_hh_l0).detach()
    x2, h = x.reshape(T * B, I), torch.randn(B, H, generator=g)
    out_in, out_h = torch.empty(T * B, 4 * H), torch.empty(B, 4 * H)

    def mkl():
        torch.addmm(bias, x2, w_ih.t(), out=out_in)
        for _ in range(T):
            torch.mm(h, w_hh.t(), out=out_h)

    cands = {"torch.nn": lambda: ref(x), "fused None": lambda: fused[None](x), "fused layer": lambda: fused["layer"](x),
             "GEMMs (MKL)": mkl}  # fmt: skip
    dnn = _onednn_gemms(x2, w_ih, w_hh, bias, h, T)
    if dnn is not None:
        cands["GEMMs (oneDNN)"] = dnn
    ratios = {k: [] for k in cands if k != "torch.nn"}
    base_ms = []
    with torch.no_grad():
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
    args = ap.parse_args(argv)
    if refuse_loaded("gemm_floor", load_average(), args.max_load):
        return 2
    torch.set_num_threads(args.threads)
    watch = LoadWatch()
    rows = [(s, measure(s, args.rounds, args.reps)) for s in SIZES]
    load = watch.stop()
    keys = [k for k in rows[0][1] if k != "torch.nn ms"]
    what = f"LSTM eval forward, {args.threads} thread(s), median of {args.rounds} interleaved rounds, ratio to torch.nn.LSTM"
    print("\n".join(ratio_table(what, load, rows, keys)))
    if refuse_others(load, args.max_load):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
