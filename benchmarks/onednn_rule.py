"""Which of the fused kernels' GEMMs run faster through oneDNN's linear than through MKL's sgemm, on this host.

The fused kernels run their products through MKL's ``sgemm`` or through oneDNN's linear with prepacked
weights; :func:`recnorm.kernels.fused.onednn_plan` picks per GEMM, by batch and hidden size, from a rule
measured on one host. Which library is faster depends on the CPU (its vector units and caches, and the
code path each library takes on it), so the rule is kept per CPU maker
(:data:`recnorm.kernels.fused.ONEDNN_HOSTS`). This script measures what that rule is fitted to: at each
(B, H) of a grid, a fused ``norm=None`` layer's time with one GEMM moved to oneDNN, against the same layer
with every GEMM on MKL (``$RECNORM_FUSED_ONEDNN`` masks, read on every call), in interleaved rounds:

* ``step``: the recurrent product ``h W_hh^T`` of the forward (mask ``010`` against ``000``), in eval
  (a forward under ``no_grad``) and in training (forward + backward of ``output.sum()``);
* ``back``: the backward's ``dG W_hh`` (mask ``001`` against ``000``), in training;
* ``proj``: the hoisted input projection ``x W_ih^T`` of an eval forward (mask ``010`` against ``110``;
  the LSTM only).

Each figure is the median per-round ratio oneDNN / MKL (below 1: oneDNN is faster). Like every timing here
it means something only on a quiet machine: it refuses to start above ``--max-load`` and names the load
around the run::

    python benchmarks/onednn_rule.py                 # LSTM, the default grid, 2 threads
    python benchmarks/onednn_rule.py --cell gru --json /tmp/gru.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_rnn import LoadWatch, cpu_model, load_average  # noqa: E402

import recnorm  # noqa: E402

HIDDEN = [64, 128, 192, 256, 512, 1024]
BATCH = [8, 32, 64, 128]
# (mask with the GEMM on oneDNN, mask with it on MKL, phase)
CHOICES = {"step_eval": ("010", "000", "eval"), "step_train": ("010", "000", "train"),
           "back": ("001", "000", "train"), "proj": ("110", "010", "eval")}  # fmt: skip


def _layer(cell: str, I: int, H: int):
    torch.manual_seed(0)
    return {"lstm": recnorm.LSTM, "gru": recnorm.GRU, "rnn": recnorm.RNN}[cell](I, H, kernel="fused")


def _call(layer, x, phase: str) -> None:
    if phase == "train":
        layer.zero_grad(set_to_none=True)
        layer(x)[0].sum().backward()
    else:
        with torch.no_grad():
            layer(x)


def _run(layer, x, phase: str, mask: str, n: int) -> float:
    os.environ["RECNORM_FUSED_ONEDNN"] = mask
    t0 = time.perf_counter()
    for _ in range(n):
        _call(layer, x, phase)
    return (time.perf_counter() - t0) / n


def measure(cell: str, choice: str, B: int, H: int, T: int, I: int, rounds: int) -> float:
    """Median per-round ratio of the layer's time with ``choice``'s GEMM on oneDNN to it on MKL."""
    on, off, phase = CHOICES[choice]
    layer = _layer(cell, I, H)
    layer.train(phase == "train")
    x = torch.randn(T, B, I)
    for mask in (on, off):
        _run(layer, x, phase, mask, 2)
    n = max(1, min(50, int(0.03 / max(_run(layer, x, phase, off, 1), 1e-6))))
    ratios = []
    for r in range(rounds):
        order = (on, off) if r % 2 == 0 else (off, on)
        t = {m: _run(layer, x, phase, m, n) for m in order}
        ratios.append(t[on] / t[off])
    return statistics.median(ratios)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell", choices=["lstm", "gru", "rnn"], default="lstm")
    ap.add_argument("--choices", nargs="+", default=None, help=f"any of {list(CHOICES)} (default: all the cell has)")
    ap.add_argument("--hidden", type=int, nargs="+", default=HIDDEN)
    ap.add_argument("--batch", type=int, nargs="+", default=BATCH)
    ap.add_argument("--steps", type=int, default=50, help="T of each layer call (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--max-load", type=float, default=0.5)
    args = ap.parse_args(argv)
    load = load_average()
    if load > args.max_load:
        raise SystemExit(f"onednn_rule: load average {load:.2f} (more than --max-load {args.max_load}): run it with nothing "
                         "else running")  # fmt: skip
    torch.set_num_threads(args.threads)
    choices = args.choices or [c for c in CHOICES if args.cell == "lstm" or c != "proj"]
    watch = LoadWatch()
    out: Dict[str, Dict[str, float]] = {}
    for choice in choices:
        I = 64 if choice == "proj" else 32  # the projection runs as GEMMs only for inputs wider than INPROJ_MAX
        for H in args.hidden:
            for B in args.batch:
                r = measure(args.cell, choice, B, H, args.steps, I, args.rounds)
                out.setdefault(choice, {})[f"{B},{H}"] = round(r, 3)
                print(f"{args.cell} {choice} B={B} H={H}: oneDNN / MKL {r:.3f}", file=sys.stderr, flush=True)
    quiet = watch.stop()
    os.environ.pop("RECNORM_FUSED_ONEDNN", None)
    print(f"# {args.cell}: oneDNN / MKL, median of {args.rounds} rounds, T={args.steps}, {args.threads} threads, "
          f"{cpu_model()}; load {quiet}")  # fmt: skip
    for choice, figs in out.items():
        print(f"\n{choice} (rows: B; columns: H)")
        print("B \\ H " + " ".join(f"{H:>6}" for H in args.hidden))
        for B in args.batch:
            print(f"{B:>5} " + " ".join(f"{figs[f'{B},{H}']:>6.3f}" for H in args.hidden))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cell": args.cell, "cpu": cpu_model(), "torch": torch.__version__, "threads": args.threads,
                       "rounds": args.rounds, "steps": args.steps, "load": quiet, "ratios": out}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
