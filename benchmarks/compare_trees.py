"""Two versions of recnorm timed side by side in the same run: is one slower than the other?

Each version runs in its own worker process (``PYTHONPATH=<tree>/src``, its own
``RECNORM_EXTENSIONS_DIR``), which builds every case once and warms it up. The driver then asks the
workers in turn, one timed call at a time, so that only one of them computes at any moment, for every
case and mode, in *interleaved rounds* (A B, then B A in the next round). The figure per case is the
median over rounds of ``time(B) / time(A)`` of the same round; each worker also times torch.nn's layer
of the same cell and size, so each version's ratio to torch.nn (the figure of ``docs/benchmarks.md``)
is reported too, from the same run.

The cases are those of ``benchmarks/bench_rnn.py``: every cell and norm at its sizes, a training step
(forward + backward of ``output.sum()``) and an eval forward (``no_grad``, eval mode, after two training
steps that fill the running statistics), float32.

Usage (the old tree from ``git archive <commit> | tar -x -C /tmp/old``; a second
``RECNORM_EXTENSIONS_DIR`` keeps the two versions' C++ builds apart)::

    python benchmarks/compare_trees.py --a /tmp/old --b . --a-ext /tmp/old_ext --rounds 7 \
        --json /tmp/compare.json

Only the public API of the layers (``recnorm.LSTM/GRU/RNN(..., norm=...)``) is used, so any two
versions that have it can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

SIZES = [(28, 128, 28, 128), (100, 64, 128, 256), (200, 32, 64, 512), (784, 64, 1, 128)]
CELLS = ["lstm", "gru", "rnn"]
NORMS = ["torch", None, "layer", "batch", "sequence_batch", "shared_batch"]

_WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
import recnorm
TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
OURS = {"lstm": recnorm.LSTM, "gru": recnorm.GRU, "rnn": recnorm.RNN}
built = {}

def step(model, x, train):
    model.train(train)
    if train:
        model.zero_grad(set_to_none=True)
        model(x)[0].sum().backward()
    else:
        with torch.no_grad():
            model(x)

for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "build":
        T, B, I, H = cmd["size"]
        built.clear()
        for cell, norm in cmd["cases"]:
            torch.manual_seed(0)
            model = TORCH[cell](I, H) if norm == "torch" else OURS[cell](I, H, norm=norm)
            x = torch.randn(T, B, I)
            for _ in range(3):  # warm-up, and running statistics for eval
                step(model, x, True)
            step(model, x, False)
            built[(cell, str(norm))] = (model, x)
        out = {"ok": True, "file": recnorm.__file__}
    elif cmd["op"] == "time":
        model, x = built[(cmd["cell"], str(cmd["norm"]))]
        times = []
        for _ in range(cmd["reps"]):
            t0 = time.perf_counter()
            step(model, x, cmd["mode"] == "train")
            times.append(time.perf_counter() - t0)
        out = {"t": sum(times) / len(times)}
    else:
        break
    print(json.dumps(out), flush=True)
"""


class Worker:
    def __init__(self, tree: str, ext_dir: str | None, threads: int) -> None:
        env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(tree), "src"))
        if ext_dir:
            env["RECNORM_EXTENSIONS_DIR"] = ext_dir
        env.pop("RECNORM_KERNEL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("worker died")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        except Exception:
            pass
        self.proc.wait(timeout=60)


def run(args) -> Dict:
    a, b = Worker(args.a, args.a_ext, args.threads), Worker(args.b, args.b_ext, args.threads)
    rows = []
    try:
        for size in args.sizes:
            cases = [(c, n) for c in args.cells for n in args.norms]
            fa, fb = a.ask(op="build", size=size, cases=cases), b.ask(op="build", size=size, cases=cases)
            print(f"size {size}: A={fa['file']} B={fb['file']}", file=sys.stderr, flush=True)
            # reps per timed request: enough calls for about 20 ms (timer and process switch noise)
            reps = {}
            for c, n in cases:
                for mode in ("train", "eval"):
                    t = a.ask(op="time", cell=c, norm=n, mode=mode, reps=1)["t"]
                    reps[(c, str(n), mode)] = max(1, min(20, int(0.02 / max(t, 1e-6))))
            times: Dict[Tuple, Dict[str, List[float]]] = {}
            for r in range(args.rounds):
                order = (("A", a), ("B", b)) if r % 2 == 0 else (("B", b), ("A", a))
                for c, n in cases:
                    for mode in ("train", "eval"):
                        k = (c, str(n), mode)
                        for name, w in order:
                            times.setdefault(k, {"A": [], "B": []})[name].append(w.ask(op="time", cell=c, norm=n, mode=mode, reps=reps[k])["t"])
                print(f"  round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            for (c, n, mode), t in times.items():
                base = times[(c, "torch", mode)]
                rows.append({
                    "size": list(size), "cell": c, "norm": n, "mode": mode, "reps": reps[(c, n, mode)],
                    "ms_a": 1e3 * statistics.median(t["A"]), "ms_b": 1e3 * statistics.median(t["B"]),
                    "b_over_a": statistics.median(y / x for x, y in zip(t["A"], t["B"])),
                    "a_over_torch": statistics.median(x / y for x, y in zip(t["A"], base["A"])),
                    "b_over_torch": statistics.median(x / y for x, y in zip(t["B"], base["B"])),
                    "rounds_b_over_a": [y / x for x, y in zip(t["A"], t["B"])],
                })  # fmt: skip
    finally:
        a.close()
        b.close()
    return {"a": args.a, "b": args.b, "threads": args.threads, "rounds": args.rounds, "rows": rows}


def to_markdown(res: Dict, threshold: float) -> str:
    lines = [
        f"B = `{res['b']}` against A = `{res['a']}`; {res['rounds']} interleaved rounds, {res['threads']} threads, float32.",
        "",
        "| size (T,B,I,H) | cell | norm | mode | A ms | B ms | B/A (median) | A/torch.nn | B/torch.nn |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if r["norm"] == "torch":
            continue
        flag = " **slower**" if r["b_over_a"] > threshold else ""
        lines.append(
            f"| {tuple(r['size'])} | {r['cell']} | {r['norm']} | {r['mode']} | {r['ms_a']:.1f} | {r['ms_b']:.1f} | "
            f"{r['b_over_a']:.3f}{flag} | {r['a_over_torch']:.2f} | {r['b_over_torch']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="the baseline tree (has src/recnorm)")
    ap.add_argument("--b", required=True, help="the tree to check")
    ap.add_argument("--a-ext", default=None, help="RECNORM_EXTENSIONS_DIR of A")
    ap.add_argument("--b-ext", default=None, help="RECNORM_EXTENSIONS_DIR of B")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cells", nargs="+", default=CELLS)
    ap.add_argument("--norms", nargs="+", default=[str(n) for n in NORMS])
    ap.add_argument("--sizes", nargs="+", default=None, help="T,B,I,H tuples")
    ap.add_argument("--threshold", type=float, default=1.05, help="flag B/A above this")
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    args = ap.parse_args(argv)
    args.norms = [None if n == "None" else n for n in args.norms]
    if "torch" not in args.norms:
        args.norms = ["torch"] + args.norms
    args.sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes] if args.sizes else SIZES
    t0 = time.time()
    res = run(args)
    res["seconds"] = time.time() - t0
    md = to_markdown(res, args.threshold)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
