"""A compiled training step against the eager one, for every cell and norm (issue 7: at most 1.1x eager).

For each cell and norm, one layer runs eagerly and a copy with the same weights runs as
``torch.compile(layer)`` (default backend, default options); a training step is a forward and a backward
of ``output.sum()``. After warm-up (the compile, then a few steps, so that the measured steps hit the
compiled graphs), both are timed in interleaved rounds (eager, compiled, then compiled, eager), and
the figure is the median over rounds of compiled / eager, with the distribution-free 95% interval of
that median (``ratio_ci``; :func:`recnorm.experiments.statistics.median_interval`). Graph breaks and recompiles during the timed
steps would show up as a high ratio; the number of graphs dynamo made is reported too.

Usage::

    python benchmarks/bench_compile.py                       # 28,128,28,128; every cell and norm
    python benchmarks/bench_compile.py --sizes 100,64,128,256 --rounds 9 --json out.json
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

import recnorm  # noqa: E402
from recnorm.experiments.statistics import median_interval  # noqa: E402


def interval(values: List[float]) -> List[float] | None:
    """The distribution-free 95% interval of the median of ``values`` as a JSON-ready list, rounded (None with
    fewer than 6 values); bench_rnn.py's intervals too."""
    ci = median_interval(values)
    return None if ci is None else [round(ci[0], 4), round(ci[1], 4)]

NORMS = [None, "layer", "batch", "sequence_batch", "shared_batch"]
LAYERS = {"lstm": recnorm.LSTM, "gru": recnorm.GRU, "rnn": recnorm.RNN}


def _step(model, x) -> None:
    model.zero_grad(set_to_none=True)
    model(x)[0].sum().backward()


def measure(cell: str, norm, size, rounds: int, warmup: int = 3) -> Dict:
    T, B, I, H = size
    torch.manual_seed(0)
    eager = LAYERS[cell](I, H, norm=norm)
    twin = LAYERS[cell](I, H, norm=norm)
    twin.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(twin)
    x = torch.randn(T, B, I)
    t0 = time.perf_counter()
    _step(compiled, x)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        _step(compiled, x)
        _step(eager, x)
    counters = torch._dynamo.utils.counters
    frames_before = sum(counters["stats"].values()) if "stats" in counters else 0
    times: Dict[str, List[float]] = {"eager": [], "compiled": []}
    for r in range(rounds):
        order = [("eager", eager), ("compiled", compiled)]
        for name, m in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            _step(m, x)
            times[name].append(time.perf_counter() - t0)
    frames_after = sum(counters["stats"].values()) if "stats" in counters else 0
    return {
        "cell": cell,
        "norm": norm,
        "size": list(size),
        "compile_s": compile_s,
        "eager_ms": 1e3 * statistics.median(times["eager"]),
        "compiled_ms": 1e3 * statistics.median(times["compiled"]),
        "ratio": statistics.median(c / e for c, e in zip(times["compiled"], times["eager"])),
        "ratio_ci": interval([c / e for c, e in zip(times["compiled"], times["eager"])]),
        "dynamo_events_while_timed": frames_after - frames_before,
        "rounds": rounds,
    }


def to_markdown(rows: List[Dict], meta: Dict) -> str:
    lines = [
        f"Compiled (`torch.compile`, default backend) / eager training step, median of {meta['rounds']} interleaved rounds, "
        f"{meta['threads']} threads, float32, torch {meta['torch']}.",
        "",
        "| cell | norm | size (T,B,I,H) | eager ms | compiled ms | compiled / eager | first call (compile) s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['norm']} | {tuple(r['size'])} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
            f"{r['ratio']:.2f} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cells", nargs="+", default=list(LAYERS))
    ap.add_argument("--norms", nargs="+", default=[str(n) for n in NORMS])
    ap.add_argument("--sizes", nargs="+", default=["28,128,28,128"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    norms = [None if n == "None" else n for n in args.norms]
    rows = []
    for s in args.sizes:
        size = tuple(int(v) for v in s.split(","))
        for cell in args.cells:
            for norm in norms:
                row = measure(cell, norm, size, args.rounds)
                rows.append(row)
                print(f"{cell} {norm} {size}: compiled/eager {row['ratio']:.2f} (compile {row['compile_s']:.0f} s)", file=sys.stderr, flush=True)
    meta = {"rounds": args.rounds, "threads": args.threads, "torch": torch.__version__, "argv": " ".join(sys.argv[1:] if argv is None else argv)}
    md = to_markdown(rows, meta)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
