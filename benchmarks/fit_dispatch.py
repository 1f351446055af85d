"""Measure torch's own RNN op against recnorm's fused kernel, and fit the rule that ``kernel="auto"`` uses.

Where both implementations serve a case -- ``norm=None`` and ``norm="sequence_batch"`` (folded into the
input weights), on CPU -- ``"auto"`` runs the one that this rule predicts to be faster
(:mod:`recnorm.kernels.autotune`). The rule is fitted here to measurements:

1. ``--measure``: for every cell and phase (a training step: forward + backward of ``output.sum()``;
   eval: a forward under ``no_grad``) and a fixed, seeded set of sizes (T, B, I, H) -- the four sizes of
   ``benchmarks/bench_rnn.py`` plus points drawn log-uniformly over T 2-1024, B 1-256, I 1-512,
   H 4-1024 under a cost cap -- time a ``norm=None`` layer on each implementation (``kernel="native"``,
   ``kernel="fused"``, same weights), in interleaved rounds, and store every round's times in
   ``benchmarks/dispatch_data.json``. Points already there are skipped, so an interrupted run resumes.
2. ``--fit``: per CPU maker, cell, phase and dtype, fit the score
   ``c0 + cT log2 T + cB log2 B + cI log2 I + cH log2 H`` whose sign decides (below 0: the fused kernel
   first), and write the coefficients to ``RULES`` in ``src/recnorm/kernels/autotune.py``. The fit is a
   logistic regression of "the fused kernel was faster" on those features, each point weighted by
   ``|log(t_fused / t_native)|``, i.e. by what a wrong pick there costs: the rule is a decision, and a
   least-squares fit of the log-ratio spends its five coefficients on points far from the boundary (on the
   first quiet data set it picked torch's op at two benchmark sizes where the fused kernel trained 12-13%
   faster). The fit's report says how often the rule picks the slower implementation on the measured
   points, in sample and left-one-out, and what that costs (the worst ratio of its pick to the faster
   one), and names any benchmark size where it picks the slower one. The rules go into
   ``src/recnorm/kernels/autotune.py`` itself (the ``RULES`` literal between its ``# BEGIN RULE`` and
   ``# END RULE`` lines), so they ship with the code and need no data file.

Which implementation is faster depends on the CPU, so each point records the CPU it was measured on and
its maker (:mod:`recnorm.kernels.host`), and each maker gets its own rule from its own points; a host
running ``--measure`` measures the points its maker lacks. Points from before the CPU was recorded count
as :data:`LEGACY_MAKER`'s. A host of a maker without a rule runs torch's op first.

Usage::

    python benchmarks/fit_dispatch.py --measure --points 24 --rounds 7   # 3-10 min for the three cells on 2 cores
    python benchmarks/fit_dispatch.py --fit                              # about a minute; rewrites autotune.RULES

The measurement runs the implementations forced (``kernel=``), so it does not depend on the rule it fits.
It refuses to start on a machine that is not quiet (load average above ``--max-load``, 0.5), and drops a
point during which other processes used more than ``--max-load`` cores (``bench_rnn.LoadWatch``); each
stored point keeps its load record. Points already in ``--data`` are skipped: to refit from scratch,
move the old file away first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import pprint
import random
import statistics
import sys
import time
from typing import Dict, List, Tuple

import torch

import allocator  # benchmarks/allocator.py, beside this file
from recnorm.kernels import host

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "dispatch_data.json")
RULE = os.path.join(HERE, os.pardir, "src", "recnorm", "kernels", "autotune.py")
BENCH_SIZES = [(28, 128, 28, 128), (100, 64, 128, 256), (200, 32, 64, 512), (784, 64, 1, 128)]
CELLS = ["lstm", "gru", "rnn_tanh"]
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# A point's estimated training cost, in multiply-adds (forward + backward ~ 3x the forward's GEMMs).
MAX_COST = 6e9


def cost(cell: str, T: int, B: int, I: int, H: int) -> float:
    return 3 * T * B * (I + H) * GATES[cell] * H


def sizes(cell: str, n: int, seed: int = 0) -> List[Tuple[int, int, int, int]]:
    """The bench sizes, then ``n`` log-uniform points under the cost cap (fixed by ``seed`` and ``cell``)."""
    rng = random.Random(f"{seed}-{cell}")
    out = list(BENCH_SIZES)
    while len(out) < len(BENCH_SIZES) + n:
        T = int(round(2 ** rng.uniform(1, 10)))
        B = int(round(2 ** rng.uniform(0, 8)))
        I = int(round(2 ** rng.uniform(0, 9)))
        H = int(round(2 ** rng.uniform(2, 10)))
        if cost(cell, T, B, I, H) <= MAX_COST:
            out.append((T, B, I, H))
    return out


def _layer(cell: str, I: int, H: int, kernel: str, dtype):
    import recnorm

    if cell == "lstm":
        return recnorm.LSTM(I, H, kernel=kernel, dtype=dtype)
    if cell == "gru":
        return recnorm.GRU(I, H, kernel=kernel, dtype=dtype)
    return recnorm.RNN(I, H, nonlinearity=cell.split("_")[1], kernel=kernel, dtype=dtype)


def _step(model, x, train: bool) -> None:
    if train:
        model.zero_grad(set_to_none=True)
        model(x)[0].sum().backward()
    else:
        with torch.no_grad():
            model(x)


def measure_point(cell: str, size, dtype, rounds: int) -> Dict[str, Dict[str, List[float]]]:
    """Per phase and implementation, the time of one call in each of ``rounds`` interleaved rounds (each
    round's figure is the mean of enough calls for about 20 ms)."""
    T, B, I, H = size
    torch.manual_seed(0)
    models = {"native": _layer(cell, I, H, "native", dtype)}
    models["fused"] = _layer(cell, I, H, "fused", dtype)
    models["fused"].load_state_dict(models["native"].state_dict())
    x = torch.randn(T, B, I, dtype=dtype)
    out: Dict[str, Dict[str, List[float]]] = {}
    for phase in ("train", "eval"):
        train = phase == "train"
        reps = {}
        for name, m in models.items():
            m.train(train)
            for _ in range(2):
                _step(m, x, train)
            t0 = time.perf_counter()
            _step(m, x, train)
            reps[name] = max(1, min(50, int(0.02 / max(time.perf_counter() - t0, 1e-6))))
        n = max(reps.values())
        times: Dict[str, List[float]] = {k: [] for k in models}
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for name in order:
                t0 = time.perf_counter()
                for _ in range(n):
                    _step(models[name], x, train)
                times[name].append((time.perf_counter() - t0) / n)
        out[phase] = times
    return out


#: The maker of the points measured before points recorded their CPU (2026-12-06): every one of them was
#: measured on the AMD EPYC host of the sessions before, whose meta has no "cpu" field.
LEGACY_MAKER = "AMD"


def point_maker(p: Dict) -> str:
    """The CPU maker a point was measured on: its ``maker``, else the one its ``cpu`` names, else
    :data:`LEGACY_MAKER` (points from before the CPU was recorded)."""
    if p.get("maker"):
        return p["maker"]
    if p.get("cpu"):
        return host.maker_of(p["cpu"]) or p["cpu"]
    return LEGACY_MAKER


def _load(path: str) -> Dict:
    """The data file; a meta of the old form (one host's, with no maker) is filed under :data:`LEGACY_MAKER`."""
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        if "machine" in data.get("meta", {}):
            data["meta"] = {LEGACY_MAKER: data["meta"]}
        return data
    return {"meta": {}, "points": []}


def _save(data: Dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=0)
    os.replace(tmp, path)


def measure(args) -> None:
    sys.path.insert(0, HERE)
    import bench_rnn  # the quiet-machine check (issue 17)

    load = bench_rnn.load_average()
    if load > args.max_load:
        raise SystemExit(
            f"fit_dispatch: load average {load:.2f} (more than --max-load {args.max_load}): the machine is not quiet, and a "
            "rule fitted to timings under load picks by the load. Run it with nothing else running."
        )
    torch.set_num_threads(args.threads)
    data = _load(args.data)
    maker = host.cpu_maker()
    if maker is None:
        raise SystemExit("fit_dispatch: this host's CPU maker is neither AMD nor Intel (recnorm.kernels.host), and the rules "
                         "are kept per maker; set $RECNORM_CPU_MAKER to file these measurements under one")  # fmt: skip
    # the points a maker has were timed under one allocator setting (points from before the setting: glibc's
    # default); a resumed run must not mix another in, since torch's op pays page faults under the default only
    had = data["meta"].get(maker, {})
    before = allocator.recorded(had) if had else None
    if before is not None and before != args.allocator and any(point_maker(p) == maker for p in data["points"]):
        raise SystemExit(f"fit_dispatch: the {maker} points in {args.data} were timed under the `{before}` allocator and "
                         f"this run would time under `{args.allocator}` (benchmarks/allocator.py); measure into a fresh "
                         f"--data file, or give --allocator {before}")  # fmt: skip
    alloc = allocator.set_or_exit(args.allocator, "fit_dispatch")
    data["meta"].setdefault(maker, {}).update({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": bench_rnn.cpu_model(),
        "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
        "command": "python benchmarks/fit_dispatch.py " + " ".join(sys.argv[1:]),
        "allocator": alloc,
    })  # fmt: skip
    # a host measures the points its maker lacks: the other maker's points are not its measurements
    done = {(p["cell"], p["dtype"], tuple(p["size"])) for p in data["points"] if point_maker(p) == maker}
    # round-robin over the cells (the bench sizes of every cell first), so that an interrupted run has
    # points of every cell
    per_cell = {(c, d): sizes(c, args.points if d == "float32" else args.points // 3) for d in args.dtypes for c in args.cells}
    todo = [(c, d, pts[i]) for i in range(max(map(len, per_cell.values()))) for (c, d), pts in per_cell.items() if i < len(pts)]
    todo = [t for t in todo if (t[0], t[1], tuple(t[2])) not in done]
    for i, (cell, dt, size) in enumerate(todo):
        t0 = time.time()
        watch = bench_rnn.LoadWatch()
        times = measure_point(cell, size, getattr(torch, dt), args.rounds)
        quiet = watch.stop()
        if quiet["others_load"] > args.max_load:  # not stored: a later run measures it again
            print(f"[{i + 1}/{len(todo)}] {cell} {dt} {size}: other processes used {quiet['others_load']:.2f} cores meanwhile "
                  "(more than --max-load): not stored", file=sys.stderr, flush=True)  # fmt: skip
            continue
        data["points"].append({"cell": cell, "dtype": dt, "size": list(size), "times": times, "load": quiet,
                               "cpu": data["meta"][maker]["cpu"], "maker": maker})
        _save(data, args.data)
        ratios = {ph: statistics.median(f / n for f, n in zip(t["fused"], t["native"])) for ph, t in times.items()}
        print(f"[{i + 1}/{len(todo)}] {cell} {dt} {size}: fused/native train {ratios['train']:.2f} eval {ratios['eval']:.2f} "
              f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip


FEATURES = ("T", "B", "I", "H")


def _row(size) -> List[float]:
    return [1.0] + [math.log2(v) for v in size]


def _decision_fit(X: List[List[float]], ratios: List[float], l2: float = 1e-3) -> List[float]:
    """Coefficients ``c`` of the score ``X @ c`` (below 0: fused first): logistic regression of "fused was
    faster" on ``-X @ c``, each point weighted by ``|log ratio|`` (the cost of picking wrongly there), with a
    small L2 penalty on the slopes so that separable data still has a finite answer."""
    A = torch.tensor(X, dtype=torch.float64)
    label = torch.tensor([1.0 if r < 1.0 else 0.0 for r in ratios], dtype=torch.float64)
    w = torch.tensor([abs(math.log(r)) + 1e-3 for r in ratios], dtype=torch.float64)
    w = w / w.sum()
    c = torch.zeros(A.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([c], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        nll = torch.nn.functional.binary_cross_entropy_with_logits(-(A @ c), label, reduction="none")
        loss = (w * nll).sum() + l2 * (c[1:] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return c.detach().tolist()


def _regret(coef: List[float], size, ratio: float) -> float:
    """Time of the rule's pick at ``size`` relative to the faster implementation (1.0: it picked right)."""
    pred = sum(c * v for c, v in zip(coef, _row(size)))
    return (ratio if pred < 0 else 1.0) / min(ratio, 1.0)


def fit_points(points: List[Dict]) -> Tuple[Dict, List[str]]:
    """``(rules, report lines)``: one rule entry per cell, phase and dtype of ``points`` (one maker's)."""
    groups: Dict[Tuple[str, str, str], List[Tuple[List[int], float]]] = {}
    for p in points:
        for phase, t in p["times"].items():
            ratio = statistics.median(f / n for f, n in zip(t["fused"], t["native"]))
            groups.setdefault((p["cell"], phase, p["dtype"]), []).append((p["size"], ratio))
    rules, report = {}, []
    for (cell, phase, dt), pts in sorted(groups.items()):
        coef = _decision_fit([_row(s) for s, _ in pts], [r for _, r in pts])
        picks = [_regret(coef, s, r) for s, r in pts]
        loo = [_regret(_decision_fit([_row(s) for s, _ in pts[:i] + pts[i + 1 :]], [r for _, r in pts[:i] + pts[i + 1 :]]), *pts[i])
               for i in range(len(pts))]  # fmt: skip
        wrong = sum(1 for p in picks if p > 1.0)
        loo_wrong = sum(1 for p in loo if p > 1.0)
        bench_wrong = [list(s) for (s, _), p in zip(pts, picks) if tuple(s) in BENCH_SIZES and p > 1.0]
        key = f"{cell}/{phase}/{dt}"
        sz = [s for s, _ in pts]
        rules[key] = {"coef": [round(c, 4) for c in coef], "range": [[min(v[i] for v in sz), max(v[i] for v in sz)] for i in range(4)],
                      "points": len(pts), "wrong_picks": wrong, "worst_regret": round(max(picks), 3),
                      "loo_wrong_picks": loo_wrong, "loo_worst_regret": round(max(loo), 3),
                      "bench_sizes_wrong": bench_wrong}  # fmt: skip
        report.append(
            f"{key}: score = {coef[0]:+.3f} " + " ".join(f"{c:+.3f}*log2({f})" for c, f in zip(coef[1:], FEATURES))
            + f"; {len(pts)} points, {wrong} picked the slower one (worst: {max(picks):.2f}x the faster); "
            f"left-one-out {loo_wrong} (worst {max(loo):.2f}x); benchmark sizes picked wrongly: {bench_wrong or 'none'}"
        )
    return rules, report


def fit(args) -> Dict:
    """Fit one rule per CPU maker (:func:`point_maker`) and write them all to ``RULES`` in ``args.rule``."""
    data = _load(args.data)
    by_maker: Dict[str, List[Dict]] = {}
    for p in data["points"]:
        by_maker.setdefault(point_maker(p), []).append(p)
    rules, report = {}, []
    for maker, points in sorted(by_maker.items()):
        entries, lines = fit_points(points)
        rules[maker] = {
            "about": f"Fitted by benchmarks/fit_dispatch.py --fit from the {maker} points of benchmarks/dispatch_data.json: per "
            "'cell/phase/dtype', coefficients (c0, cT, cB, cI, cH) of the score c0 + cT log2 T + cB log2 B + cI log2 I + "
            "cH log2 H, a logistic regression of 'the fused kernel was faster' weighted by |log(t_fused / t_native)|; "
            "kernel='auto' puts the fused kernel before torch's op where the score is below 0, inside 'range' "
            "(the measured [min, max] of T, B, I, H); outside it, torch's op goes first.",
            "measured": data.get("meta", {}).get(maker, {}),
            "rules": entries,
        }
        report += [f"# {maker}: {len(points)} points"] + lines
    write_rule(rules, args.rule)
    print("\n".join(report))
    return rules


def write_rule(rule: Dict, path: str) -> None:
    """Replace the lines between ``# BEGIN RULE`` and ``# END RULE`` of ``path`` with ``RULES = <rule>``
    (``{maker: rule}``)."""
    with open(path) as f:
        lines = f.read().split("\n")
    begin, end = lines.index("# BEGIN RULE"), lines.index("# END RULE")
    body = "RULES: Dict = " + pprint.pformat(rule, width=110, sort_dicts=False)
    new = lines[: begin + 1] + body.split("\n") + lines[end:]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(new))
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--fit", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--points", type=int, default=24, help="random sizes per cell (float32), besides the bench sizes")
    ap.add_argument("--cells", nargs="+", default=CELLS)
    ap.add_argument("--dtypes", nargs="+", default=["float32"])
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--rule", default=RULE)
    ap.add_argument("--max-load", type=float, default=0.5,
                    help="--measure refuses to start above this load average, and drops a point during which other "
                         "processes used more than this many cores (default %(default)s)")  # fmt: skip
    ap.add_argument("--allocator", choices=allocator.CHOICES, default="steady",
                    help="glibc's malloc while --measure times, as in bench_rnn.py (benchmarks/allocator.py; default "
                         "%(default)s); the points of one maker are all timed under one setting")  # fmt: skip
    args = ap.parse_args(argv)
    if not (args.measure or args.fit):
        ap.error("give --measure and/or --fit")
    if args.measure:
        measure(args)
    if args.fit:
        fit(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
