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

Besides the float32 rows it measures

* bfloat16 autocast (``torch.autocast("cpu", dtype=torch.bfloat16)`` around the step) for the cells of
  ``--bf16-cells``: torch.nn's layer and every norm, timed in the same rounds, as a ratio to torch.nn
  in float32 and to the same layer in float32;
* the compiled training step against the eager one (``benchmarks/bench_compile.py``) at
  ``--compile-sizes``;
* a regression check: every ratio against the same row of ``--baseline`` (by default the JSON file
  that ``--json`` is about to overwrite, i.e. the previous committed numbers).

Usage::

    python benchmarks/bench_rnn.py                         # full table (without the bf16 rows and the peers
                                                           # it took 15-25 min on an idle 2-core machine)
    python benchmarks/bench_rnn.py --quick                 # 3 rounds, two sizes
    python benchmarks/bench_rnn.py --out docs/benchmarks.md --json docs/benchmarks.json --readme README.md
    python benchmarks/bench_rnn.py --render docs/benchmarks.json --notes docs/benchmarks.notes.md \
        --out docs/benchmarks.md --readme README.md    # the same pages again from the JSON, no measuring

Peers: if ``haste_pytorch`` is importable, haste.LSTM and haste.LayerNormLSTM join the LSTM rows (on
CPU haste runs its pure-Python fallback); if ``flashrnn`` is importable, FlashRNN's LSTM on its CPU
``vanilla_fwbw`` backend (float32, a ``torch.nn.Linear`` for the input term) joins them too. Both come
from PyPI and need no GPU to install::

    pip install --target /tmp/peers haste-pytorch-cpu flashrnn einops
    PYTHONPATH=/tmp/peers python benchmarks/bench_rnn.py ...
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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


BF16 = " [bf16 autocast]"


def _candidates(cells: List[str], norms: List[str | None], bf16_cells=()) -> List[Tuple[str, str, str | None, bool]]:
    """(label, cell, norm, bf16): norm ``torch`` for torch.nn, ``haste``/``haste_ln``/``flashrnn`` for
    peers; bf16 True for a step under bfloat16 autocast."""
    out = []
    for cell in cells:
        out.append((torch_label(cell), cell, "torch", False))
        for norm in norms:
            out.append((f"recnorm.{_NAMES[cell]}(norm={norm!r})", cell, norm, False))
        if cell == "lstm" and _available("haste_pytorch"):
            out.append(("haste.LSTM", cell, "haste", False))
            out.append(("haste.LayerNormLSTM", cell, "haste_ln", False))
        if cell == "lstm" and _available("flashrnn"):
            out.append(("FlashRNN LSTM (vanilla_fwbw)", cell, "flashrnn", False))
        if cell in bf16_cells:
            out.append((torch_label(cell) + BF16, cell, "torch", True))
            for norm in norms:
                out.append((f"recnorm.{_NAMES[cell]}(norm={norm!r})" + BF16, cell, norm, True))
    return out


def _available(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


class FlashLSTM(torch.nn.Module):
    """FlashRNN's LSTM on its CPU backend ``vanilla_fwbw`` (float32), with the input term as a Linear:
    (T, B, I) in, ``(output (T, B, H), None)`` out, like the other candidates."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        H = hidden_size
        self.inp = torch.nn.Linear(input_size, 4 * H)
        self.R = torch.nn.Parameter(torch.randn(4, 1, H, H) / H**0.5)
        self.b = torch.nn.Parameter(torch.zeros(4, 1, H))

    def forward(self, x):
        from flashrnn import flashrnn

        T, B, _ = x.shape
        wx = self.inp(x.transpose(0, 1)).view(B, T, 4, 1, -1)
        h, _ = flashrnn(wx, self.R, self.b, function="lstm", backend="vanilla_fwbw", dtype="float32")
        return h[0, :, :, 0].transpose(0, 1), None


def build(cell: str, norm, size, kernel=None):
    T, B, I, H = size
    if norm == "torch":
        model = TORCH[cell](I, H)
    elif norm in ("haste", "haste_ln"):
        import haste_pytorch as haste

        model = (haste.LSTM if norm == "haste" else haste.LayerNormLSTM)(I, H)
    elif norm == "flashrnn":
        model = FlashLSTM(I, H)
    else:
        model = OURS[cell](I, H, norm=norm, kernel=kernel)
    x = torch.randn(T, B, I)
    return model, x


def _train_step(model, x, bf16: bool = False) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)[0]
    out.float().sum().backward()


def _eval_step(model, x, bf16: bool = False) -> None:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(x)


def _time(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# (label, size) -> the error of a candidate that cannot run at all (reported, not timed)
FAILED: Dict[Tuple[str, Tuple], str] = {}


def measure_time(cells, norms, sizes, rounds: int, kernel=None, log=print, bf16_cells=()) -> List[Dict]:
    rows = []
    for size in sizes:
        cands = _candidates(cells, norms, bf16_cells)
        built = {}
        for label, cell, norm, bf16 in cands:
            torch.manual_seed(0)
            model, x = build(cell, norm, size, kernel)
            try:
                _train_step(model, x, bf16)  # warm-up: first-call allocations, oneDNN primitive caches
                _eval_step(model, x, bf16)
            except RuntimeError as exc:  # torch.nn.LSTM under CPU bfloat16 autocast, on some CPUs
                FAILED[(label, size)] = str(exc).splitlines()[0]
                log(f"  {label} {size} fails: {FAILED[(label, size)]}")
                continue
            model.train()
            _train_step(model, x, bf16)  # batch-norm running statistics for eval
            built[label] = (model, x, bf16)
        times: Dict[Tuple[str, str], List[float]] = {}
        for r in range(rounds):
            for mode in ("train", "eval"):
                # every other round in reverse order, so that no candidate always follows the same one
                items = list(built.items()) if r % 2 == 0 else list(built.items())[::-1]
                for label, (model, x, bf16) in items:
                    model.train(mode == "train")
                    model.zero_grad(set_to_none=True)
                    fn = (lambda: _train_step(model, x, bf16)) if mode == "train" else (lambda: _eval_step(model, x, bf16))
                    times.setdefault((label, mode), []).append(_time(fn))
            log(f"  size {size}: round {r + 1}/{rounds} done")
        for label, cell, norm, bf16 in cands:
            if label not in built:
                continue
            base = torch_label(cell)
            fp32 = label[: -len(BF16)] if bf16 else label
            for mode in ("train", "eval"):
                ts, bs, fs = times[(label, mode)], times[(base, mode)], times[(fp32, mode)]
                rows.append(
                    {
                        "size": list(size),
                        "cell": cell,
                        "candidate": label,
                        "norm": norm,
                        "bf16": bf16,
                        "mode": mode,
                        "ms": 1e3 * statistics.median(ts),
                        "ratio": statistics.median(t / b for t, b in zip(ts, bs)),
                        "ratio_min_over_min": min(ts) / min(bs),
                        "ratio_to_fp32": statistics.median(t / f for t, f in zip(ts, fs)),
                        "rounds": rounds,
                    }
                )
    return rows


_MEM_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {bench_dir!r})
import bench_rnn
torch.set_num_threads({threads})
cell, norm, size, kernel, bf16 = json.loads(sys.argv[1])
model, x = bench_rnn.build(cell, norm, tuple(size), kernel)
# A tiny step first loads what every candidate loads once per process (C++ extensions, oneDNN/MKL
# kernels) without leaving large buffers behind; the measured step then allocates its gradients anew.
bench_rnn._train_step(model, x[:2, :2].contiguous(), bf16)
model.zero_grad(set_to_none=True)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # kB
with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark VmHWM to the current RSS
    f.write("5")
before = status("VmRSS")
bench_rnn._train_step(model, x, bf16)
print(json.dumps({{"peak_kib": status("VmHWM") - before}}))
"""


def measure_memory(cells, norms, sizes, threads: int, kernel=None, bf16_cells=()) -> Dict[Tuple[str, Tuple, str], float]:
    """Peak RSS rise (MiB) of one training step, each candidate in a fresh interpreter."""
    code = _MEM_CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), threads=threads)
    out = {}
    for size in sizes:
        for label, cell, norm, bf16 in _candidates(cells, norms, bf16_cells):
            arg = json.dumps([cell, norm, list(size), kernel, bf16])
            res = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True)
            if res.returncode != 0:  # a candidate that cannot run (see FAILED): no memory figure
                continue
            out[(label, tuple(size))] = json.loads(res.stdout.strip().splitlines()[-1])["peak_kib"] / 1024
    return out


TARGETS = {"train": 0.9, "eval": 1.0, "memory": 1.1}
PEERS = ("haste", "haste_ln", "flashrnn")


def _sizes_of(rows: List[Dict]) -> List[Tuple[int, ...]]:
    return sorted({tuple(r["size"]) for r in rows}, key=lambda s: SIZES.index(s) if s in SIZES else 99)


def _table(rows: List[Dict], memory: Dict, cands: List[str]) -> List[str]:
    sizes = _sizes_of(rows)
    header = "| candidate | " + " | ".join(f"(T,B,I,H)={s}<br>train / eval / memory" for s in sizes) + " |"
    lines = [header, "|---|" + "---|" * len(sizes)]
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
    return lines


def summary(rows: List[Dict], memory: Dict) -> Dict[str, Dict]:
    """Per recnorm float32 candidate: the worst (largest) ratio over sizes of train, eval and memory,
    and of bfloat16 autocast against float32 of the same layer."""
    out: Dict[str, Dict] = {}
    for r in rows:
        if r["norm"] in ("torch",) + PEERS:
            continue
        label = r["candidate"][: -len(BF16)] if r.get("bf16") else r["candidate"]
        d = out.setdefault(label, {"cell": r["cell"], "norm": r["norm"]})
        key = f"bf16_{r['mode']}" if r.get("bf16") else r["mode"]
        val = r["ratio_to_fp32"] if r.get("bf16") else r["ratio"]
        d[key] = max(d.get(key, 0.0), val)
        if not r.get("bf16") and r["mode"] == "train":
            mem, base = memory.get((label, tuple(r["size"]))), memory.get((torch_label(r["cell"]), tuple(r["size"])))
            if mem is not None and base:
                d["memory"] = max(d.get("memory", 0.0), mem / base)
    return out


def _fmt(v, target) -> str:
    if v is None:
        return "–"
    return f"**{v:.2f}**" if v > target else f"{v:.2f}"


def summary_table(summ: Dict[str, Dict]) -> List[str]:
    lines = [
        "| layer | train (≤ 0.9) | eval (≤ 1.0) | memory (≤ 1.1) | bf16 autocast / float32, train (≤ 1.0) | eval (≤ 1.0) |",
        "|---|---|---|---|---|---|",
    ]
    for label, d in summ.items():
        lines.append(
            f"| {label} | {_fmt(d.get('train'), TARGETS['train'])} | {_fmt(d.get('eval'), TARGETS['eval'])} | "
            f"{_fmt(d.get('memory'), TARGETS['memory'])} | {_fmt(d.get('bf16_train'), 1.0)} | {_fmt(d.get('bf16_eval'), 1.0)} |"
        )
    return lines


def peer_lines(rows: List[Dict]) -> List[str]:
    """How many times faster recnorm's LSTM is than each peer, per size and mode: the peer's ratio to
    torch.nn over recnorm's (both measured in the same rounds)."""
    idx = {(r["candidate"], tuple(r["size"]), r["mode"]): r for r in rows}
    pairs = [("haste.LSTM", "recnorm.LSTM(norm=None)"), ("haste.LayerNormLSTM", "recnorm.LSTM(norm='layer')"),
             ("FlashRNN LSTM (vanilla_fwbw)", "recnorm.LSTM(norm=None)")]  # fmt: skip
    sizes = _sizes_of(rows)
    lines = []
    for peer, ours in pairs:
        if not any(k[0] == peer for k in idx):
            continue
        parts = []
        for s in sizes:
            p_tr, o_tr, p_ev, o_ev = (idx.get((n, s, m)) for n, m in ((peer, "train"), (ours, "train"), (peer, "eval"), (ours, "eval")))
            if p_tr and o_tr and p_ev and o_ev:
                parts.append(f"{s}: {p_tr['ratio'] / o_tr['ratio']:.1f}x / {p_ev['ratio'] / o_ev['ratio']:.1f}x")
        lines.append(f"- {peer} against {ours} (train / eval): " + "; ".join(parts))
    return lines


def regression(rows: List[Dict], baseline: Dict | None, threshold: float = 1.05) -> List[str]:
    """Rows whose ratio to torch.nn rose by more than ``threshold`` against the same row of ``baseline``."""
    if not baseline:
        return ["No baseline JSON was given or found: no regression check in this run."]
    old = {(r["candidate"], tuple(r["size"]), r["mode"]): r["ratio"] for r in baseline.get("rows", [])}
    compared, worse = 0, []
    for r in rows:
        k = (r["candidate"], tuple(r["size"]), r["mode"])
        if k not in old or r["norm"] == "torch":
            continue
        compared += 1
        rel = r["ratio"] / old[k]
        if rel > threshold:
            worse.append((rel, k, old[k], r["ratio"]))
    when = baseline.get("meta", {}).get("when", "?")
    out = [
        f"Each ratio to torch.nn against the same row of the previous run ({when}, {baseline.get('meta', {}).get('rounds', '?')} rounds): "
        f"{compared} rows compared, {compared - len(worse)} within {100 * (threshold - 1):.0f}%, {len(worse)} above."
    ]
    if worse:
        out += ["", "| candidate | size | mode | before | now | now / before |", "|---|---|---|---|---|---|"]
        for rel, (c, s, m), a, b in sorted(worse, reverse=True):
            out.append(f"| {c} | {s} | {m} | {a:.2f} | {b:.2f} | {rel:.2f} |")
    return out


def compile_lines(crows: List[Dict]) -> List[str]:
    if not crows:
        return ["Not measured in this run (`--no-compile`)."]
    lines = [
        "| cell | norm | size (T,B,I,H) | eager ms | compiled ms | compiled / eager (≤ 1.1) | first call (compile) s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in crows:
        lines.append(
            f"| {r['cell']} | {r['norm']} | {tuple(r['size'])} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
            f"{_fmt(r['ratio'], 1.1)} | {r['compile_s']:.0f} |"
        )
    return lines


def dispatch_lines(sizes) -> List[str]:
    """What ``kernel="auto"`` runs for ``norm=None`` (and ``"sequence_batch"``) at these sizes, by the rule,
    next to the fused / torch time measured there by ``benchmarks/fit_dispatch.py`` (if it measured them)."""
    from recnorm.kernels import autotune

    rules = autotune.RULE.get("rules", {})
    if not rules:
        return ["The dispatch rule is empty: torch's op runs wherever it serves the case."]
    measured = {}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_data.json")
    if os.path.exists(path):
        with open(path) as f:
            for p in json.load(f)["points"]:
                for phase, t in p["times"].items():
                    ratio = statistics.median(a / b for a, b in zip(t["fused"], t["native"]))
                    measured[(p["cell"], phase, p["dtype"], tuple(p["size"]))] = ratio
    lines = [
        "Where torch's op and the fused kernel both serve a case (`norm=None`, `\"sequence_batch\"`), `kernel=\"auto\"` "
        "runs the one that the rule in `src/recnorm/kernels/autotune.py` predicts to be faster, within the range of sizes it was "
        "fitted on (outside it, torch's op). "
        "`python benchmarks/fit_dispatch.py --fit` fitted it to the measurements in `benchmarks/dispatch_data.json` "
        f"(`{autotune.RULE.get('measured', {}).get('command', '?')}`, `norm=None`, each implementation forced). "
        "Per size: fused / torch time as measured there (median of per-round ratios), then as the rule predicts it, and the choice:",
        "",
        "| cell / phase | points fitted | slower picks on them (worst cost) | " + " | ".join(str(s) for s in sizes) + " |",
        "|---|---|---|" + "---|" * len(sizes),
    ]
    for key, entry in rules.items():
        cell, phase, dtype = key.split("/")
        if dtype != "float32":
            continue
        cells = []
        for size in sizes:
            pred = autotune.predict(cell, phase == "train", dtype, *size)
            m = measured.get((cell, phase, dtype, tuple(size)))
            cells.append(f"{m:.2f} / {math.exp(pred):.2f} → {'fused' if pred < 0 else 'torch'}" if m else f"– / {math.exp(pred):.2f} → {'fused' if pred < 0 else 'torch'}")
        lines.append(
            f"| {cell} / {phase} | {entry.get('points', '?')} | {entry.get('wrong_picks', '?')} ({entry.get('worst_regret', '?')}x) | "
            + " | ".join(cells) + " |"
        )
    return lines


def to_markdown(rows: List[Dict], memory: Dict, meta: Dict, crows=(), baseline=None, notes: str = "") -> str:
    fp32 = [c for c in dict.fromkeys(r["candidate"] for r in rows) if not c.endswith(BF16)]
    bf16 = [c for c in dict.fromkeys(r["candidate"] for r in rows) if c.endswith(BF16)]
    lines = [
        "# Benchmarks: recnorm layers against torch.nn",
        "",
        f"Produced by `python benchmarks/bench_rnn.py {meta['argv']}` on {meta['when']}"
        + (f"; this page written from its JSON by `python benchmarks/bench_rnn.py {meta['rendered']}`." if meta.get("rendered") else "."),
        f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['threads']} threads; float32 unless marked; "
        f"{meta['rounds']} interleaved rounds; kernel selection `{meta['kernel']}`.",
        "",
        "**How to read it.** The machine is shared (2 cores; other jobs compile C++ and run tests while this runs), "
        "so absolute milliseconds mean little and move between runs. What means something is the *ratio* to "
        "torch.nn measured in the same round: each round times every candidate once, in alternating order, and a "
        "figure is the median over rounds of (candidate time / torch.nn time of that round). Below 1 is faster "
        "than torch.nn. Even so, a row moves by up to about ±0.1 between runs; the memory column is one sample "
        "per candidate. Train = forward + backward of `output.sum()`; eval = forward under `no_grad` in eval mode. "
        "Memory = rise of peak resident memory during one training step in a fresh process, as a ratio to torch.nn "
        "(absolute MiB in brackets).",
        "",
        "## Against the targets of issue 11",
        "",
        "Worst ratio over the sizes measured (bold: over the target). The bfloat16 columns are the same layer "
        "under `torch.autocast(\"cpu\", torch.bfloat16)` against itself in float32, in the same rounds.",
        "",
        *summary_table(summary(rows, memory)),
        "",
        "## Every size, float32",
        "",
        *_table(rows, memory, fp32),
        "",
        "## What `kernel=\"auto\"` runs",
        "",
        *dispatch_lines(SIZES),
        "",
    ]
    if bf16:
        lines += [
            "## bfloat16 autocast",
            "",
            "The same layers under `torch.autocast(\"cpu\", dtype=torch.bfloat16)`, ratio to torch.nn in *float32*. "
            "recnorm computes the recurrence and the statistics in float32 (its fused kernel runs on the input cast "
            "to float32; the output comes back in bfloat16).",
            "",
            *_table(rows, memory, bf16),
            "",
        ]
    if FAILED:
        lines += ["Candidates that could not run (an error, not a time):", ""]
        lines += [f"- {label} at {size}: `{msg}`" for (label, size), msg in FAILED.items()]
        lines += [""]
    peers = peer_lines(rows)
    lines += ["## Peers", ""]
    if peers:
        lines += ["How many times faster recnorm is than the peer, per size (the peer's ratio to torch.nn over recnorm's, same rounds):", "", *peers, ""]
    else:
        lines += ["haste and FlashRNN were not importable in this run: not measured.", ""]
    lines += [
        "haste (`haste-pytorch-cpu` on PyPI) runs its pure-Python fallback on CPU; FlashRNN (`flashrnn` on PyPI) runs its "
        "`vanilla_fwbw` PyTorch backend (no fused CPU kernel exists for either). Install both for this table with "
        "`pip install --target /tmp/peers haste-pytorch-cpu flashrnn einops` and run the script with "
        "`PYTHONPATH=/tmp/peers`.",
        "",
        "## Compiled training step (issue 7: at most 1.1x eager)",
        "",
        "`torch.compile(layer)` (default backend) against the same layer in eager mode, training step, median of "
        f"per-round ratios (`python benchmarks/bench_compile.py --rounds {crows[0]['rounds'] if crows else '?'}`, run beside this script; "
        "eager and compiled alternate within each round).",
        "",
        *compile_lines(list(crows)),
        "",
        "## Regression check (issue 7: no ratio more than 5% above the previous numbers)",
        "",
        *regression(rows, baseline),
        "",
    ]
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)


README_BEGIN, README_END = "<!-- speed table: benchmarks/bench_rnn.py --readme -->", "<!-- end of speed table -->"


def readme_block(rows: List[Dict], memory: Dict, meta: Dict) -> str:
    summ = summary(rows, memory)
    lines = [
        README_BEGIN,
        f"Worst ratio to torch.nn over the sizes of [docs/benchmarks.md](docs/benchmarks.md) (produced by "
        f"`python benchmarks/bench_rnn.py {meta['argv']}`; {meta['rounds']} interleaved rounds, {meta['threads']} threads, "
        "on a shared 2-core machine; the page says how far its rows move between runs). Bold: over the target of issue 11.",
        "",
        *summary_table(summ),
        README_END,
    ]
    return "\n".join(lines)


def write_readme(path: str, block: str) -> None:
    with open(path) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{path}: no speed-table markers ({README_BEGIN!r} ... {README_END!r})")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    with open(path, "w") as f:
        f.write(head + block + tail)


def _keyed(d: Dict) -> Dict[Tuple[str, Tuple], object]:
    """``{"label (T, B, I, H)": v}`` of a JSON file back to ``{(label, (T, B, I, H)): v}``."""
    import ast

    out = {}
    for k, v in d.items():
        label, size = k.rsplit(" (", 1)
        out[(label, tuple(ast.literal_eval("(" + size)))] = v
    return out


def render(args) -> int:
    """Write the Markdown (and README table) again from a JSON file of an earlier run, without measuring."""
    with open(args.render) as f:
        data = json.load(f)
    baseline = None
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)
    FAILED.update(_keyed(data.get("failed", {})))
    memory = _keyed(data.get("memory_mib", {}))
    notes = ""
    if args.notes and os.path.exists(args.notes):
        with open(args.notes) as f:
            notes = f.read()
    meta = dict(data["meta"], rendered=" ".join(sys.argv[1:]))
    crows = data.get("compile", [])
    if args.compile_json:
        with open(args.compile_json) as f:
            crows = json.load(f)["rows"]
        data["compile"] = crows
        with open(args.render, "w") as f:  # keep the JSON the pages come from complete
            json.dump(data, f, indent=1)
    md = to_markdown(data["rows"], memory, meta, crows, baseline, notes)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    else:
        print(md)
    if args.readme:
        write_readme(args.readme, readme_block(data["rows"], memory, meta))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"], choices=sorted(TORCH))
    ap.add_argument("--norms", nargs="+", default=[str(n) for n in NORMS], help="None and/or names from recnorm.list_norms()")
    ap.add_argument("--sizes", nargs="+", default=None, help="T,B,I,H tuples such as 28,128,28,128")
    ap.add_argument("--kernel", default=None, help="force a recnorm kernel (reference, native, ...); default auto")
    ap.add_argument("--bf16-cells", nargs="*", default=["lstm"], choices=sorted(TORCH), help="cells with bfloat16 autocast rows")
    ap.add_argument("--compile-sizes", nargs="*", default=["28,128,28,128"], help="sizes of the compiled-step table (none: skip)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-json", default=None, help="take the compiled-step table from this output of bench_compile.py --json instead")
    ap.add_argument("--quick", action="store_true", help="3 rounds on the two smallest sizes")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    ap.add_argument("--json", default=None, help="write the raw rows here")
    ap.add_argument("--baseline", default=None, help="previous JSON for the regression check (default: the --json file before it is overwritten)")
    ap.add_argument("--notes", default=None, help="append this Markdown file (hand-written reading of the numbers)")
    ap.add_argument("--readme", default=None, help="rewrite the speed table between the markers of this README")
    ap.add_argument("--render", default=None, help="measure nothing: write --out/--readme from this JSON of an earlier run")
    args = ap.parse_args(argv)
    if args.render:
        return render(args)
    torch.set_num_threads(args.threads)
    norms = [None if n == "None" else n for n in args.norms]
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes] if args.sizes else SIZES
    rounds = args.rounds
    if args.quick:
        sizes, rounds = sizes[:2], 3
    baseline = None
    base_path = args.baseline or args.json
    if base_path and os.path.exists(base_path):
        with open(base_path) as f:
            baseline = json.load(f)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    memory_job = None
    if not args.no_memory:
        # Peak memory is measured in fresh processes, one at a time, while the timing runs: it does not
        # depend on the load (the timing's ratios are taken in the same rounds, so the load is shared).
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1)
        memory_job = pool.submit(measure_memory, args.cells, norms, sizes, args.threads, args.kernel, args.bf16_cells)
    rows = measure_time(args.cells, norms, sizes, rounds, args.kernel, log, args.bf16_cells)
    memory = memory_job.result() if memory_job is not None else {}
    crows = []
    if args.compile_json:
        while not os.path.exists(args.compile_json):  # bench_compile.py may still be running beside this
            log(f"  waiting for {args.compile_json}")
            time.sleep(30)
        with open(args.compile_json) as f:
            crows = json.load(f)["rows"]
    elif not args.no_compile:
        import bench_compile

        for s in args.compile_sizes:
            size = tuple(int(v) for v in s.split(","))
            for cell in [c for c in args.cells if c in bench_compile.LAYERS]:
                for norm in norms:
                    crows.append(bench_compile.measure(cell, norm, size, rounds))
                    log(f"  compiled {cell} {norm} {size}: {crows[-1]['ratio']:.2f}")
    meta = {
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": rounds,
        "kernel": args.kernel or os.environ.get("RECNORM_KERNEL") or "auto",
    }
    notes = ""
    if args.notes and os.path.exists(args.notes):
        with open(args.notes) as f:
            notes = f.read()
    md = to_markdown(rows, memory, meta, crows, baseline, notes)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "memory_mib": {f"{k[0]} {k[1]}": v for k, v in memory.items()}, "compile": crows,
                       "failed": {f"{k[0]} {k[1]}": v for k, v in FAILED.items()}}, f, indent=1)  # fmt: skip
    if args.readme:
        write_readme(args.readme, readme_block(rows, memory, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
