"""The fused kernels built from another revision's C++ against the working tree's, in one process.

A change to the fused kernels' C++ is judged by its effect on one layer's time, and on this VM a ratio
means something only when both sides are timed in the same process, back to back, many times over (the
machine's speed moves by up to a third for seconds at a time). This script builds the kernel file of one
family (``fused_lstm.cpp`` or ``fused_gru_rnn.cpp``, with the headers beside it) twice: from ``--base``
(a git revision, read with ``git show``) and from the working tree. In each round, in random order, the
same layer runs on each build (``kernel="fused"``), then ``torch.nn``'s layer. The figure is the median
per-round ratio new / base with the distribution-free 95% interval of that median
(:func:`recnorm.experiments.statistics.median_interval`), and each build's median ratio to torch.nn.

Before timing it checks that both builds give the same outputs (and, in training, gradients) to the bit,
or says how far apart they are: a change meant to be only faster must not change a result.

    python benchmarks/ab_kernels.py --base HEAD                      # LSTM, layer norm, eval, 28,128,28,128
    python benchmarks/ab_kernels.py --base HEAD~3 --cell GRU --norm none --mode train --size 100,64,128,256

Like every timing here it means something only on a quiet machine: it refuses to start above
``--max-load``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_compile import interval  # noqa: E402
from bench_rnn import load_average  # noqa: E402

import recnorm  # noqa: E402
from recnorm.kernels import fused  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = "src/recnorm/kernels/csrc"
FAMILIES = {"LSTM": ("lstm", "fused_lstm.cpp"), "GRU": ("gru_rnn", "fused_gru_rnn.cpp"), "RNN": ("gru_rnn", "fused_gru_rnn.cpp")}


def sources_at(rev: str, dest: str) -> str:
    """The kernel sources (every file of ``csrc``) at git revision ``rev``, written under ``dest``; returns
    the directory. A revision git does not know is a ValueError naming it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
        names = subprocess.run(["git", "ls-tree", "--name-only", sha, CSRC + "/"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()  # fmt: skip
    except subprocess.CalledProcessError as exc:
        raise ValueError(f"ab_kernels: git does not know the revision {rev!r}: {exc.stderr.strip()}") from exc
    out = os.path.join(dest, sha[:12])
    os.makedirs(out, exist_ok=True)
    for path in names:
        text = subprocess.run(["git", "show", f"{sha}:{path}"], cwd=ROOT, check=True, capture_output=True).stdout
        with open(os.path.join(out, os.path.basename(path)), "wb") as f:
            f.write(text)
    return out


def load_base(cell: str, rev: str, dest: str):
    """The extension of ``cell``'s kernel file built from ``rev`` (cached like recnorm's own builds)."""
    family, source = FAMILIES[cell]
    directory = sources_at(rev, dest)
    return fused.build_extension(f"recnorm_ab_{family}_{os.path.basename(directory)}", os.path.join(directory, source),
                                 family)


def _step(model, x: torch.Tensor, train: bool) -> List[torch.Tensor]:
    if train:
        model.zero_grad(set_to_none=True)
        out = model(x)[0]
        out.sum().backward()
        return [out.detach()] + [p.grad for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        return [model(x)[0]]


def measure(cell: str, norm: Optional[str], size, train: bool, base_module, rounds: int, reps: int, seed: int = 0) -> Dict:
    """Time the layer on the base build and on the working tree's, with torch.nn's in every round."""
    family = FAMILIES[cell][0]
    ext = fused.EXTENSIONS[family]
    new_module = fused.load_extension(family)
    T, B, I, H = size
    torch.manual_seed(seed)
    layer = getattr(recnorm, cell)(I, H, norm=norm, kernel="fused")
    ref = getattr(torch.nn, cell)(I, H)
    layer.train(train)
    ref.train(train)
    if norm is not None and not train:  # population statistics from a few batches, as after training
        with torch.no_grad():
            layer.train()
            for _ in range(3):
                layer(torch.randn(T, B, I))
            layer.eval()
    x = torch.randn(T, B, I)
    builds = {"base": base_module, "new": new_module}

    def run(name: str) -> Callable[[], List[torch.Tensor]]:
        module = builds[name]

        def call():
            ext.module = module
            return _step(layer, x, train)

        return call

    try:
        results = {name: run(name)() for name in builds}
        diff = max((a - b).abs().max().item() for a, b in zip(results["base"], results["new"]))
        calls = {"base": run("base"), "new": run("new"), "torch.nn": lambda: _step(ref, x, train)}
        for call in calls.values():
            for _ in range(3):
                call()
        times: Dict[str, List[float]] = {name: [] for name in calls}
        rng = random.Random(seed)
        for _ in range(rounds):
            order = list(calls)
            rng.shuffle(order)
            for name in order:
                per = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    calls[name]()
                    per.append(time.perf_counter() - t0)
                times[name].append(statistics.median(per))
    finally:
        ext.module = new_module
    ratio = [n / b for n, b in zip(times["new"], times["base"])]
    return {
        "max_abs_diff": diff,
        "new/base": statistics.median(ratio),
        "new/base ci": interval(ratio),
        "base/torch.nn": statistics.median([b / t for b, t in zip(times["base"], times["torch.nn"])]),
        "new/torch.nn": statistics.median([n / t for n, t in zip(times["new"], times["torch.nn"])]),
        "torch.nn ms": 1e3 * statistics.median(times["torch.nn"]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD", help="git revision whose kernel C++ is the baseline (default HEAD)")
    ap.add_argument("--cell", choices=sorted(FAMILIES), default="LSTM")
    ap.add_argument("--norm", default="layer", help="a norm name, or none")
    ap.add_argument("--mode", choices=["eval", "train"], default="eval")
    ap.add_argument("--size", default="28,128,28,128", help="T,B,I,H")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--max-load", type=float, default=0.5)
    args = ap.parse_args(argv)
    try:
        size = tuple(int(v) for v in args.size.split(","))
        if len(size) != 4 or min(size) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--size: expected four positive integers T,B,I,H, got {args.size!r}")
    load_before = load_average()
    if load_before > args.max_load:
        print(f"ab_kernels: load average {load_before:.2f} is above --max-load {args.max_load}: the machine is not quiet, "
              "so the ratios would measure the load. Run it with nothing else running.", file=sys.stderr)  # fmt: skip
        return 2
    torch.set_num_threads(args.threads)
    norm = None if args.norm == "none" else args.norm
    with tempfile.TemporaryDirectory() as dest:
        try:
            base = load_base(args.cell, args.base, dest)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        r = measure(args.cell, norm, size, args.mode == "train", base, args.rounds, args.reps)
    ci = r["new/base ci"]
    print(f"{args.cell} {args.norm} {args.mode} {size}, {args.threads} thread(s), {args.rounds} rounds (load average "
          f"{load_before:.2f} before, {load_average():.2f} after): new / base {r['new/base']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
          + f"; base / torch.nn {r['base/torch.nn']:.3f}, new / torch.nn {r['new/torch.nn']:.3f}; torch.nn {r['torch.nn ms']:.2f} ms")  # fmt: skip
    if r["max_abs_diff"] == 0:
        print("outputs" + (" and gradients" if args.mode == "train" else "") + " equal to the bit")
    else:
        print(f"outputs differ by up to {r['max_abs_diff']:.3g}: the change alters results, not only speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
