"""Instructions per call of a layer's step, counted by valgrind's callgrind: a cost that load cannot move.

Timings on a shared machine are not measurements (issue 17); the number of instructions a forward
executes is the same whatever else runs. It is a proxy, not a time (a cache miss or a vector width costs
no extra instructions), so a change that cuts instructions is confirmed by ``bench_rnn.py`` on a quiet
machine. One thread (``torch.set_num_threads(1)``): with more, OpenMP's spin-waiting adds instructions
that depend on the load.

The layer is built and warmed up outside the count (``--instr-atstart=no``); then ``--calls`` calls of the
step are counted between two callgrind client requests (a tiny C shim compiled on first use with ``cc``
against ``valgrind/callgrind.h``), and the figure is instructions per call. ``--top N`` lists the N
functions with the most inclusive instructions in the counted calls (``callgrind_annotate --inclusive=yes``).

Usage::

    python benchmarks/count_instructions.py --cell lstm --norm None --size 28,128,28,128 --mode eval
    python benchmarks/count_instructions.py --cell lstm --norm torch ...        # torch.nn's layer
    python benchmarks/count_instructions.py --norm sequence_batch --mode eval --top 30
    python benchmarks/count_instructions.py --norm layer --mode train --bf16     # under bfloat16 autocast
    python benchmarks/count_instructions.py --table lstm --size 28,128,28,128   # torch.nn and every norm

Needs valgrind (with its headers, ``valgrind/callgrind.h``) and a C compiler; about a minute per count.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
NORMS = ["torch", "None", "layer", "batch", "sequence_batch", "shared_batch"]

_SHIM = r"""
#include <valgrind/callgrind.h>
void rn_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void rn_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void rn_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
"""


def shim_path(folder: str) -> str:
    """The client-request shim, compiled into ``folder``."""
    src, lib = os.path.join(folder, "shim.c"), os.path.join(folder, "shim.so")
    with open(src, "w") as f:
        f.write(_SHIM)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", lib, src], check=True)
    return lib


def child(cell: str, norm: str, size, mode: str, calls: int, shim: str, kernel: Optional[str], bf16: bool = False) -> None:
    """Run under valgrind: build, warm up, then count ``calls`` steps."""
    import torch

    sys.path.insert(0, HERE)
    import bench_rnn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = bench_rnn.build(cell, None if norm == "None" else norm, tuple(size), kernel)
    bench_rnn._train_step(model, x)  # batch norms' running statistics; first-call allocations
    model.train(mode == "train")
    step = (lambda: bench_rnn._train_step(model, x, bf16)) if mode == "train" else (lambda: bench_rnn._eval_step(model, x, bf16))
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        step()
    lib = ctypes.CDLL(shim)
    lib.rn_start()
    model.zero_grad(set_to_none=True)
    step()  # once more under instrumentation, uncounted
    for _ in range(calls):
        model.zero_grad(set_to_none=True)
        lib.rn_toggle()
        step()
        lib.rn_toggle()
    lib.rn_stop()


def count(cell: str, norm: str, size, mode: str, calls: int = 3, top: int = 0, kernel: Optional[str] = None,
          bf16: bool = False) -> Dict:
    """``{"instructions": per call, "top": [(inclusive instructions per call, function), ...]}``."""
    with tempfile.TemporaryDirectory() as tmp:
        shim = shim_path(tmp)
        out = os.path.join(tmp, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no", f"--callgrind-out-file={out}",
               sys.executable, os.path.abspath(__file__), "--child", json.dumps([cell, norm, list(size), mode, calls, shim, kernel, bf16])]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"valgrind failed ({res.returncode}):\n{res.stderr[-3000:]}")
        with open(out) as f:
            text = f.read()
        if os.environ.get("RECNORM_KEEP_CALLGRIND"):
            with open(os.environ["RECNORM_KEEP_CALLGRIND"], "w") as f:
                f.write(text)
        # "summary" stays 0 when collection is toggled; "totals" is what was collected
        total = sum(int(v) for v in re.findall(r"^totals:\s*(\d+)", text, re.M))
        result = {"instructions": total / calls, "top": []}
        if top:
            ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", f"--threshold=100", out], capture_output=True, text=True).stdout
            for line in ann.splitlines():
                m = re.match(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(.*)$", line)
                if m and ":" in m.group(2) and len(result["top"]) < top:
                    result["top"].append((int(m.group(1).replace(",", "")) / calls, m.group(2)[:160]))
        return result


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell", default="lstm")
    ap.add_argument("--norm", default="None", help="None, a norm name, or torch (torch.nn's layer)")
    ap.add_argument("--size", default="28,128,28,128", help="T,B,I,H")
    ap.add_argument("--mode", default="eval", choices=["eval", "train"])
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--kernel", default=None, help="force a recnorm kernel (default auto)")
    ap.add_argument("--bf16", action="store_true", help="the step under torch.autocast('cpu', torch.bfloat16)")
    ap.add_argument("--top", type=int, default=0, help="list the functions with the most inclusive instructions")
    ap.add_argument("--table", default=None, metavar="CELL", help="count torch.nn's layer and every norm of CELL")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*json.loads(args.child))
        return 0
    size = tuple(int(v) for v in args.size.split(","))
    if args.table:
        base = None
        print(f"| {args.table} {size} {args.mode} | instructions per call | / torch.nn |")
        print("|---|---|---|")
        for norm in NORMS:
            n = count(args.table, norm, size, args.mode, args.calls, kernel=args.kernel)["instructions"]
            base = base or n
            print(f"| {norm} | {n / 1e6:.1f} M | {n / base:.3f} |", flush=True)
        return 0
    res = count(args.cell, args.norm, size, args.mode, args.calls, args.top, args.kernel, args.bf16)
    print(f"{args.cell} norm={args.norm} {size} {args.mode}{' bf16' if args.bf16 else ''}: "
          f"{res['instructions'] / 1e6:.2f} M instructions per call")
    for n, fn in res["top"]:
        print(f"  {n / 1e6:10.2f} M  {fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
