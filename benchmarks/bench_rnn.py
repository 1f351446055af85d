"""Speed and memory of recnorm layers against torch.nn's fused layers of the same size.

For every size, cell and norm it measures

* train: one forward + backward of ``output.sum()`` (what a training step costs, minus the optimizer),
* eval: one forward in eval mode under ``torch.no_grad()`` (population statistics for batch norms),
* peak memory of one training step, as the rise of the process's resident-set high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the step) in a fresh subprocess, so
  that allocator caches of other candidates do not count (after a tiny warm-up step that loads
  libraries and extensions, which every candidate gets). Linux only.

The machine this runs on is shared and noisy, so timings are taken in *interleaved rounds*: each round
times every candidate once (after a warm-up), and the reported figure is the median over rounds of the
ratio to the torch.nn layer timed in the same round. Absolute milliseconds are reported as medians too.

Usage::

    python benchmarks/bench_rnn.py                         # full table (about 15-25 min on 2 cores)
    python benchmarks/bench_rnn.py --quick                 # 3 rounds, two sizes
    python benchmarks/bench_rnn.py --out docs/benchmarks.md --json docs/benchmarks.json

Optional peers: if ``haste_pytorch`` is importable, haste.LSTM and haste.LayerNormLSTM join the LSTM
rows (on CPU haste runs its pure-Python fallback; install it with nvcc hidden from PATH:
``PATH=$(echo $PATH | tr : '\\n' | grep -v cuda | paste -sd:) pip install --no-build-isolation
haste-pytorch-cpu``). FlashRNN's CPU backends need a Triton/CUDA-free setup and are not wired in.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

import recnorm

SIZES: List[Tuple[int, int, int, int]] = [(28, 128, 28, 128), (100, 64, 128, 256), (200, 32, 64, 512), (784, 64, 1, 128)]
NORMS = [None, "layer", "batch", "sequence_batch", "shared_batch"]
TORCH = {
    "lstm": torch.nn.LSTM,
    "gru": torch.nn.GRU,
    "rnn": torch.nn.RNN,
    "rnn_relu": functools.partial(torch.nn.RNN, nonlinearity="relu"),
}
OURS = {
    "lstm": recnorm.LSTM,
    "gru": recnorm.GRU,
    "rnn": recnorm.RNN,
    "rnn_relu": functools.partial(recnorm.RNN, nonlinearity="relu"),
}
_NAMES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN", "rnn_relu": "RNN[relu]"}


def torch_label(cell: str) -> str:
    """The row label of torch.nn's layer for ``cell``: the baseline of that cell's ratios."""
    return f"torch.nn.{_NAMES[cell]}"


def _candidates(cells: List[str], norms: List[str | None]) -> List[Tuple[str, str, str | None]]:
    """(label, cell, norm): label ``torch`` for torch.nn, ``haste``/``haste_ln`` for peers."""
    out = []
    for cell in cells:
        out.append((torch_label(cell), cell, "torch"))
        for norm in norms:
            out.append((f"recnorm.{_NAMES[cell]}(norm={norm!r})", cell, norm))
        if cell == "lstm" and _haste_available():
            out.append(("haste.LSTM", cell, "haste"))
            out.append(("haste.LayerNormLSTM", cell, "haste_ln"))
    return out


def _haste_available() -> bool:
    try:
        import haste_pytorch  # noqa: F401
    except Exception:
        return False
    return True


def build(cell: str, norm, size, kernel=None):
    T, B, I, H = size
    if norm == "torch":
        model = TORCH[cell](I, H)
    elif norm in ("haste", "haste_ln"):
        import haste_pytorch as haste

        model = (haste.LSTM if norm == "haste" else haste.LayerNormLSTM)(I, H)
    else:
        model = OURS[cell](I, H, norm=norm, kernel=kernel)
    x = torch.randn(T, B, I)
    return model, x


def _train_step(model, x) -> None:
    out = model(x)[0]
    out.sum().backward()


def _eval_step(model, x) -> None:
    with torch.no_grad():
        model(x)


def _time(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_time(cells, norms, sizes, rounds: int, kernel=None, log=print) -> List[Dict]:
    rows = []
    for size in sizes:
        cands = _candidates(cells, norms)
        built = {}
        for label, cell, norm in cands:
            torch.manual_seed(0)
            model, x = build(cell, norm, size, kernel)
            _train_step(model, x)  # warm-up: first-call allocations, oneDNN primitive caches
            model.train()
            for _ in range(2):  # populate batch-norm running statistics for eval
                _train_step(model, x)
            built[label] = (model, x, cell)
        times: Dict[Tuple[str, str], List[float]] = {}
        for r in range(rounds):
            for mode in ("train", "eval"):
                for label, (model, x, cell) in built.items():
                    model.train(mode == "train")
                    model.zero_grad(set_to_none=True)
                    fn = (lambda: _train_step(model, x)) if mode == "train" else (lambda: _eval_step(model, x))
                    times.setdefault((label, mode), []).append(_time(fn))
            log(f"  size {size}: round {r + 1}/{rounds} done")
        for label, cell, norm in cands:
            base = torch_label(cell)
            for mode in ("train", "eval"):
                ts, bs = times[(label, mode)], times[(base, mode)]
                rows.append(
                    {
                        "size": list(size),
                        "cell": cell,
                        "candidate": label,
                        "norm": norm,
                        "mode": mode,
                        "ms": 1e3 * statistics.median(ts),
                        "ratio": statistics.median(t / b for t, b in zip(ts, bs)),
                        "ratio_min_over_min": min(ts) / min(bs),
                        "rounds": rounds,
                    }
                )
    return rows


_MEM_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {bench_dir!r})
import bench_rnn
torch.set_num_threads({threads})
cell, norm, size, kernel = json.loads(sys.argv[1])
model, x = bench_rnn.build(cell, norm, tuple(size), kernel)
# A tiny step first loads what every candidate loads once per process (C++ extensions, oneDNN/MKL
# kernels) without leaving large buffers behind; the measured step then allocates its gradients anew.
bench_rnn._train_step(model, x[:2, :2].contiguous())
model.zero_grad(set_to_none=True)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # kB
with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark VmHWM to the current RSS
    f.write("5")
before = status("VmRSS")
bench_rnn._train_step(model, x)
print(json.dumps({{"peak_kib": status("VmHWM") - before}}))
"""


def measure_memory(cells, norms, sizes, threads: int, kernel=None) -> Dict[Tuple[str, Tuple, str], float]:
    """Peak RSS rise (MiB) of one training step, each candidate in a fresh interpreter."""
    code = _MEM_CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), threads=threads)
    out = {}
    for size in sizes:
        for label, cell, norm in _candidates(cells, norms):
            arg = json.dumps([cell, norm, list(size), kernel])
            res = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, check=True)
            out[(label, tuple(size))] = json.loads(res.stdout.strip().splitlines()[-1])["peak_kib"] / 1024
    return out


def to_markdown(rows: List[Dict], memory: Dict, meta: Dict) -> str:
    lines = [
        "# Benchmarks: recnorm layers against torch.nn",
        "",
        f"Produced by `python benchmarks/bench_rnn.py {meta['argv']}` on {meta['when']}.",
        f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['threads']} threads; float32; "
        f"{meta['rounds']} interleaved rounds; kernel selection `{meta['kernel']}`.",
        "",
        "Ratios are medians over rounds of (candidate time / torch.nn time in the same round); "
        "below 1 is faster than torch.nn. Train = forward + backward of `output.sum()`; eval = forward "
        "under `no_grad` in eval mode. Memory = rise of peak resident memory during one training step "
        "in a fresh process, as a ratio to torch.nn (absolute MiB in brackets).",
        "",
    ]
    sizes = sorted({tuple(r["size"]) for r in rows}, key=lambda s: SIZES.index(s) if s in SIZES else 99)
    cands = list(dict.fromkeys(r["candidate"] for r in rows))
    header = "| candidate | " + " | ".join(f"(T,B,I,H)={s}<br>train / eval / memory" for s in sizes) + " |"
    lines += [header, "|---|" + "---|" * len(sizes)]
    idx = {(r["candidate"], tuple(r["size"]), r["mode"]): r for r in rows}
    for c in cands:
        cells = []
        for s in sizes:
            tr, ev = idx.get((c, s, "train")), idx.get((c, s, "eval"))
            if tr is None:
                cells.append("–")
                continue
            base = torch_label(tr["cell"])
            mem = memory.get((c, s))
            mem_base = memory.get((base, s))
            mem_s = f"{mem / mem_base:.2f} ({mem:.0f})" if mem is not None and mem_base else "–"
            cells.append(f"{tr['ratio']:.2f} ({tr['ms']:.0f} ms) / {ev['ratio']:.2f} ({ev['ms']:.0f} ms) / {mem_s}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"], choices=sorted(TORCH))
    ap.add_argument("--norms", nargs="+", default=[str(n) for n in NORMS], help="None and/or names from recnorm.list_norms()")
    ap.add_argument("--sizes", nargs="+", default=None, help="T,B,I,H tuples such as 28,128,28,128")
    ap.add_argument("--kernel", default=None, help="force a recnorm kernel (reference, native, ...); default auto")
    ap.add_argument("--quick", action="store_true", help="3 rounds on the two smallest sizes")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    ap.add_argument("--json", default=None, help="write the raw rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    norms = [None if n == "None" else n for n in args.norms]
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes] if args.sizes else SIZES
    rounds = args.rounds
    if args.quick:
        sizes, rounds = sizes[:2], 3
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = measure_time(args.cells, norms, sizes, rounds, args.kernel, log)
    memory = {} if args.no_memory else measure_memory(args.cells, norms, sizes, args.threads, args.kernel)
    meta = {
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": rounds,
        "kernel": args.kernel or os.environ.get("RECNORM_KERNEL") or "auto",
    }
    md = to_markdown(rows, memory, meta)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "memory_mib": {f"{k[0]} {k[1]}": v for k, v in memory.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
