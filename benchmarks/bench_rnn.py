"""Speed and memory of recnorm layers against torch.nn's fused layers of the same size.

For every size, cell and norm it measures

* train: one forward + backward of ``output.sum()`` (what a training step costs, minus the optimizer),
* eval: one forward in eval mode under ``torch.no_grad()`` (population statistics for batch norms),
* peak memory of one training step, as the rise of the process's resident-set high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the step) in a fresh subprocess, so
  that allocator caches of other candidates do not count (after a tiny warm-up step that loads
  libraries and extensions, which every candidate gets). Linux only.

Timings are taken in *interleaved rounds*: each round times every candidate once per mode, each back to
back with its torch.nn layer (and a bfloat16 row with its float32 twin) as a *group* whose members run in
a random order, the groups in a random order too, drawn anew for every round; each timing repeats the step
until it lasts ``--min-time`` (50 ms) at least. A figure is the median over rounds of the ratio to the
torch.nn layer timed in the same group, and it is judged by the distribution-free 95% confidence interval of that median (order statistics of the
rounds, :func:`recnorm.experiments.statistics.median_interval`): a target is *met* where the interval lies
at or below it, *missed* where it lies above it, and *open* (this run cannot tell) where it contains it.
Absolute milliseconds are reported as medians too. Interleaving does not make a loaded machine's timings a
measurement (issue 17: two cores shared with a test suite move ratios by 0.5), so the run records

* the load average before and after it, and the CPU that other processes used during it (cores: the
  machine's busy time from ``/proc/stat`` minus this process's and its children's, over the wall time);
* the spread of torch.nn's own step across rounds (interquartile range over median, per size and mode;
  the worst is kept);
* the resolution of the ratios: each cell's torch.nn layer is timed a second time in every round, as its
  A/A control (the same layer, weights and input, in a group with torch.nn like any candidate). Its median ratio to
  torch.nn is 1 on a machine that can tell two layers apart, and the farthest end of that median's 95%
  interval from 1 is the smallest difference the run resolves (the worst over sizes and modes is kept),

and it times under a steady allocator (``--allocator steady``, :mod:`allocator`): glibc's malloc set so that
no layer pays page faults for buffers it frees and asks for again on every call. Under glibc's defaults
torch.nn's op maps its large buffers afresh on every call and recnorm's kernels keep theirs in a pool, so a
ratio would count the allocator on torch.nn's side (its LSTM training step at (784, 64, 1, 128) took 348 ms
with 115,000 minor page faults and 184 ms without; recnorm's the same either way). Every row records its
minor page faults per call (``faults``), and a run under ``--allocator default`` gives no verdict. A run that
is not quiet -- load average before it or other processes' CPU during it above
``--max-load`` (0.5), or an A/A interval reaching farther than ``--max-noise`` (5%) from 1 -- gives no
verdict on the targets (the page shows the ratios unjudged and says why) and does not rewrite ``--readme``
(exit status 2). Where a size's A/A interval is too wide, ``--rounds`` (9) more rounds of all its candidates
are added, up to ``--retries`` (2) times: the interval narrows as the rounds grow, and the decision reads the
control alone. Peak memory is measured after the timing, so that its processes do not load the machine
meanwhile. Run it with nothing else running: no parallel jobs, no test suite. Even then this VM's speed
changes by itself: with nothing else running, torch.nn.LSTM's eval forward at (28, 128, 28, 128) on two
threads takes 3.4 ms for seconds at a time and 4.6 ms for the next seconds. A ratio is taken within a
round and cancels most of that, so torch.nn's own spread (which the runs before the control were judged
by, against ``--max-spread``, 10%) is kept as information. Runs from 2026-12-05 (the control's spread
across rounds judged, fixed order reversed every other round, one call per timing) and before keep their
judgement when rendered again.

Besides the float32 rows it measures

* bfloat16 autocast (``torch.autocast("cpu", dtype=torch.bfloat16)`` around the step) for the cells of
  ``--bf16-cells``: torch.nn's layer and every norm, timed in the same rounds, as a ratio to torch.nn
  in float32 and to the same layer in float32;
* the compiled training step against the eager one (``benchmarks/bench_compile.py``) at
  ``--compile-sizes``;
* the variants of issue 8 (:data:`VARIANTS`: RMSNorm, the joint/carried LN, haste's one-group LayerNormGRU,
  zoneout, DropConnect, batch norm between stacked layers) at ``--variant-sizes`` (default: the main
  sizes), each timed in the same rounds as torch.nn's layer of its cell and size, with the implementation
  ``kernel="auto"`` ran for it (recorded with ``recnorm.kernels.recording``, so it says ``reference`` where the
  fused kernel does not serve a variant yet);
* a regression check: every ratio against the same row of ``--baseline`` (by default the JSON file
  that ``--json`` is about to overwrite, i.e. the previous committed numbers); rows the baseline lacks
  are counted as new.

Usage::

    python benchmarks/bench_rnn.py                         # full table (without the bf16 rows and the peers
                                                           # it took 15-25 min on an idle 2-core machine)
    python benchmarks/bench_rnn.py --quick                 # 3 rounds, two sizes
    python benchmarks/bench_rnn.py --out docs/benchmarks.md --json docs/benchmarks.json --readme README.md
    python benchmarks/bench_rnn.py --render docs/benchmarks.json --notes docs/benchmarks.notes.md \
        --out docs/benchmarks.md --readme README.md    # the same pages again from the JSON, no measuring

The variants alone, merged into the committed JSON without touching its other rows (``--only-variants``
replaces the JSON's variant rows and keeps the rest; the main rows' regression check is the one stored
in the JSON, or against ``--baseline`` when one is named -- name it for a JSON written before the check
was stored, or the page will say there is none)::

    python benchmarks/bench_rnn.py --only-variants --json docs/benchmarks.json --notes docs/benchmarks.notes.md \
        --out docs/benchmarks.md --readme README.md

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
import random
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch

import recnorm
import allocator
from bench_compile import interval as _interval  # the median's 95% interval, as a JSON-ready list

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


def torch_label(cell: str, layers: int = 1) -> str:
    """The row label of torch.nn's layer for ``cell``: the baseline of that cell's ratios."""
    return f"torch.nn.{_NAMES[cell]}" + (f"(num_layers={layers})" if layers > 1 else "")


BF16 = " [bf16 autocast]"

#: The variants of issue 8: per cell, a row name and the keyword arguments of the recnorm layer. Each is
#: timed in the same rounds as torch.nn's layer of its cell and size (a 2-layer torch.nn layer where the
#: variant stacks 2 layers) and held to the targets of ``"layer"``.
VARIANTS: Dict[str, Dict[str, Dict]] = {
    "lstm": {
        "rms": {"norm": "rms"},
        "layer joint+carry": {"norm": "layer", "norm_kwargs": {"joint": True, "carry_cell": True}},
        "rms joint+carry": {"norm": "rms", "norm_kwargs": {"joint": True, "carry_cell": True}},
        "zoneout 0.1": {"norm": "layer", "zoneout": 0.1},
        "zoneout (0.1, 0.1)": {"norm": "layer", "zoneout": (0.1, 0.1)},
        "weight_dropout 0.25": {"norm": "layer", "weight_dropout": 0.25},
        "2 layers": {"norm": None, "num_layers": 2},
        "between_layers='batch', 2 layers": {"norm": None, "num_layers": 2, "between_layers": "batch"},
    },
    "gru": {
        "rms": {"norm": "rms"},
        "layer, one group (haste's LayerNormGRU)": {"norm": "layer", "norm_kwargs": {"gate_groups": "one"}},
        "zoneout 0.1": {"norm": "layer", "zoneout": 0.1},
        "weight_dropout 0.25": {"norm": "layer", "weight_dropout": 0.25},
    },
    "rnn": {
        "rms": {"norm": "rms"},
        "layer joint": {"norm": "layer", "norm_kwargs": {"joint": True}},
        "zoneout 0.1": {"norm": "layer", "zoneout": 0.1},
        "weight_dropout 0.25": {"norm": "layer", "weight_dropout": 0.25},
    },
}


def variant_label(cell: str, variant: str) -> str:
    return f"recnorm.{_NAMES[cell]} [{variant}]"


def variant_config(cell: str, variant: str) -> str:
    """The layer's keyword arguments as written in Python, e.g. ``norm='layer', zoneout=0.1``."""
    return ", ".join(f"{k}={v!r}" for k, v in VARIANTS[cell][variant].items())


class Candidate(NamedTuple):
    """One timed layer. ``norm`` is ``torch`` for torch.nn, ``haste``/``haste_ln``/``flashrnn`` for peers;
    ``bf16`` marks a step under bfloat16 autocast; ``variant`` names an entry of :data:`VARIANTS`;
    ``layers`` is the depth of a torch.nn baseline; ``section`` is the table it belongs to (``main`` or
    ``variants``)."""

    label: str
    cell: str
    norm: str | None
    bf16: bool = False
    variant: str | None = None
    layers: int = 1
    section: str = "main"

    @property
    def base(self) -> str:
        """The label of the torch.nn layer this candidate's ratios are taken against."""
        if self.variant is not None:
            return torch_label(self.cell, VARIANTS[self.cell][self.variant].get("num_layers", 1))
        return torch_label(self.cell, self.layers)


def _candidates(cells: List[str], norms: List[str | None], bf16_cells=(), peers: bool = True, variants: bool = False) -> List[Candidate]:
    """Every candidate of one size: per cell torch.nn's layer, the norms, the peers (LSTM), the bfloat16
    rows of ``bf16_cells`` and, with ``variants``, the variants of :data:`VARIANTS` and the torch.nn
    baselines they need beyond the one-layer one."""
    out = []
    for cell in cells:
        out.append(Candidate(torch_label(cell), cell, "torch"))
        # the A/A control: a second torch.nn layer with the same weights, timed at another place in each round
        out.append(Candidate(torch_label(cell) + CONTROL, cell, "torch", section="control"))
        for norm in norms:
            out.append(Candidate(f"recnorm.{_NAMES[cell]}(norm={norm!r})", cell, norm))
        if peers and cell == "lstm" and _available("haste_pytorch"):
            out.append(Candidate("haste.LSTM", cell, "haste"))
            out.append(Candidate("haste.LayerNormLSTM", cell, "haste_ln"))
        if peers and cell == "lstm" and _available("flashrnn"):
            out.append(Candidate("FlashRNN LSTM (vanilla_fwbw)", cell, "flashrnn"))
        if cell in bf16_cells:
            out.append(Candidate(torch_label(cell) + BF16, cell, "torch", True))
            for norm in norms:
                out.append(Candidate(f"recnorm.{_NAMES[cell]}(norm={norm!r})" + BF16, cell, norm, True))
        if variants:
            depths = sorted({kw.get("num_layers", 1) for kw in VARIANTS.get(cell, {}).values()} - {1})
            for layers in depths:
                out.append(Candidate(torch_label(cell, layers), cell, "torch", layers=layers, section="variants"))
            for name, kw in VARIANTS.get(cell, {}).items():
                out.append(Candidate(variant_label(cell, name), cell, kw.get("norm"), variant=name, section="variants"))
    return out


#: The label suffix of a cell's A/A control (see :func:`_aa_stats`).
CONTROL = " (A/A control)"


def plan(cells, norms, sizes, bf16_cells=(), variant_sizes=()) -> List[Tuple[Tuple[int, ...], List[Candidate]]]:
    """``(size, candidates)`` for every size of ``sizes`` or ``variant_sizes``: the main rows at ``sizes``,
    the variants at ``variant_sizes``. A torch.nn baseline timed at a size only the variants have belongs
    to the variants' section."""
    out = []
    for size in list(dict.fromkeys([tuple(s) for s in sizes] + [tuple(s) for s in variant_sizes])):
        main, var = size in [tuple(s) for s in sizes], size in [tuple(s) for s in variant_sizes]
        cands = _candidates(cells, norms if main else [], bf16_cells if main else (), peers=main, variants=var)
        if not main:
            cands = [c if c.section == "control" else c._replace(section="variants") for c in cands]
        out.append((size, cands))
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


def build(cell: str, norm, size, kernel=None, variant: str | None = None, layers: int = 1):
    T, B, I, H = size
    if variant is not None:
        kwargs = dict(VARIANTS[cell][variant])
        model = OURS[cell](I, H, kernel=kernel, **kwargs)
    elif norm == "torch":
        model = TORCH[cell](I, H, num_layers=layers)
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


def _time(fn: Callable[[], None], calls: int = 1) -> float:
    """Seconds per call of ``fn``, over ``calls`` calls back to back."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


#: Each timing of a candidate repeats its step until it lasts at least this long (seconds; ``--min-time``):
#: a single eval call at the smallest size takes 3-8 ms, which one scheduler tick moves by several percent.
MIN_TIME = 0.05


def _calls(fn: Callable[[], None], min_time: float) -> int:
    """How many back-to-back calls of ``fn`` (already warmed up) one timing needs to last ``min_time``: one
    call timed, then ``ceil(min_time / its time)``, at least 1."""
    return max(1, math.ceil(min_time / max(_time(fn), 1e-6)))


def recording_kernels():
    """Record the implementation picked for each layer direction run inside (``fused``, ``native``,
    ``reference``, ...): what ``kernel="auto"`` (or a forced kernel) actually ran
    (:func:`recnorm.kernels.recording`)."""
    from recnorm import kernels

    return kernels.recording()


def kernel_label(chosen: List[str]) -> str:
    """``fused``, or ``native+fused`` where a stack's layers ran different ones; ``?`` where no direction
    was recorded."""
    return "+".join(dict.fromkeys(chosen)) or "?"


# (label, size) -> the error of a candidate that cannot run at all (reported, not timed)
FAILED: Dict[Tuple[str, Tuple], str] = {}


def measure_time(cells, norms, sizes, rounds: int, kernel=None, log=print, bf16_cells=(), variant_sizes=(),
                 max_noise: float | None = None, retries: int = 0, min_time: float = 0.0) -> List[Dict]:
    """Time every candidate of every size in interleaved rounds; one row per candidate and mode.

    Each round times every candidate once per mode, back to back with its torch.nn layer (a group,
    :func:`_groups`), groups and members in a random order drawn anew for every round (seeded by the size,
    the round and the group, so a run can be repeated), each timing ``min_time`` long at least (see
    :func:`_calls`). A row's ``"ratio"`` is the median over rounds of its ratio to torch.nn in its group, and
    ``"ratio_ci"`` the distribution-free 95% confidence interval of that median
    (:func:`~recnorm.experiments.statistics.median_interval`).

    Each cell's torch.nn layer is timed twice per round, once more as its A/A control (the same layer and
    weights, in a group with torch.nn like any candidate): the control's per-round ratio to torch.nn is what a ratio
    would read with no difference to find. The 95% interval of the control's median ratio (``"aa_ci"`` on
    the torch.nn rows) is the resolution of this run's figures, and its farthest end from 1 (``"aa_noise"``)
    is what the judgement reads. Where a size's worst ``aa_noise`` exceeds ``max_noise``, ``rounds`` more
    rounds of all its candidates are added (the intervals narrow as the rounds grow), up to ``retries``
    times; the rows record the worst ``aa_noise`` after each batch of rounds (``"extended"``). Adding rounds
    is decided by the control alone, never by a candidate's ratio. torch.nn's own spread across rounds
    (``"spread"``) and the control's (``"aa_spread"``) are recorded too: on this VM torch.nn's time moves
    with the machine's speed, which the ratios, taken within a round, cancel."""
    rows = []
    for size, cands in plan(cells, norms, sizes, bf16_cells, variant_sizes):
        built, ran = {}, {}
        for c in cands:
            torch.manual_seed(0)
            model, x = build(c.cell, c.norm, size, kernel, c.variant, c.layers)
            try:
                with recording_kernels() as train_ran:
                    _train_step(model, x, c.bf16)  # warm-up: first-call allocations, oneDNN primitive caches
                model.eval()
                with recording_kernels() as eval_ran:
                    _eval_step(model, x, c.bf16)
            except RuntimeError as exc:  # torch.nn.LSTM under CPU bfloat16 autocast, on some CPUs
                FAILED[(c.label, size)] = str(exc).splitlines()[0]
                log(f"  {c.label} {size} fails: {FAILED[(c.label, size)]}")
                continue
            model.train()
            _train_step(model, x, c.bf16)  # batch-norm running statistics for eval
            train_fn, eval_fn = _steps(model, x, c.bf16)
            calls = {"train": _calls(train_fn, min_time) if min_time else 1}
            model.eval()
            calls["eval"] = _calls(eval_fn, min_time) if min_time else 1
            built[c.label] = (model, x, c.bf16, calls)
            if isinstance(model, (recnorm.LSTM, recnorm.GRU, recnorm.RNN)):
                ran[c.label] = {"train": kernel_label(train_ran), "eval": kernel_label(eval_ran)}
        looks: List[Dict] = []
        groups = _groups([c for c in cands if c.label in built], built)
        times = Timings()
        _warm_round(built)
        while True:
            _rounds(built, groups, rounds, size, log, times)
            aa = _aa_table(cands, times)
            worst = _worst_noise(aa)
            looks.append(worst)
            if max_noise is None or worst["noise"] is None or worst["noise"] <= max_noise or len(looks) > retries:
                break
            log(f"  size {size}: the A/A control's median ratio to torch.nn is known to +-{100 * worst['noise']:.0f}% "
                f"only ({worst['candidate']}, {worst['mode']}); {rounds} more rounds ({len(looks)} of {retries})")
        for c in cands:
            if c.label not in built or c.base not in built or c.section == "control" or (c.label, "train") not in times.own:
                continue  # the control has no rows of its own; a baseline of nothing was never timed
            for mode in ("train", "eval"):
                ts, bs = times.own[(c.label, mode)], times.own[(c.base, mode)]
                ratios, to_fp32 = times.ratios(c.label, c.base, mode), times.ratios(c.label, _fp32(c), mode)
                row = {
                    "size": list(size),
                    "cell": c.cell,
                    "candidate": c.label,
                    "norm": c.norm,
                    "bf16": c.bf16,
                    "mode": mode,
                    "ms": 1e3 * statistics.median(ts),
                    "ratio": statistics.median(ratios),
                    "ratio_ci": _interval(ratios),
                    "ratio_min_over_min": min(ts) / min(bs),
                    "ratio_to_fp32": statistics.median(to_fp32),
                    "ratio_to_fp32_ci": _interval(to_fp32),
                    "rounds": times.rounds,
                    "calls": built[c.label][3][mode],
                    "faults": statistics.median(times.faults[(c.label, mode)]),
                }
                if c.label in ran:
                    row["kernel"] = ran[c.label][mode]
                if c.norm == "torch" and not c.bf16:
                    row["spread"] = spread(ts)
                    row.update(aa.get((c.label, mode), {}))
                if len(looks) > 1:  # rounds were added: the worst A/A noise after each batch
                    row["extended"] = [a["noise"] for a in looks]
                if c.section != "main":
                    row.update(section=c.section, baseline=c.base)
                if c.variant is not None:
                    row.update(variant=c.variant, config=variant_config(c.cell, c.variant))
                if c.layers > 1:
                    row["layers"] = c.layers
                rows.append(row)
    return rows


class Timings:
    """One size's timings. ``groups[(label, mode)]``: per round, the seconds per call of every member of the
    label's group (:func:`_groups`), timed back to back; ``own[(label, mode)]``: per round, the label's first
    timing in it (for its milliseconds and torch.nn's spread across rounds)."""

    def __init__(self) -> None:
        self.groups: Dict[Tuple[str, str], List[Dict[str, float]]] = {}
        self.own: Dict[Tuple[str, str], List[float]] = {}
        self.faults: Dict[Tuple[str, str], List[float]] = {}  # minor page faults per call of those timings
        self.rounds = 0

    def ratios(self, label: str, base: str, mode: str) -> List[float]:
        """Per round, ``label``'s time over ``base``'s in the same group (1 where they are the same layer)."""
        if label == base:
            return [1.0] * self.rounds
        return [g[label] / g[base] for g in self.groups[(label, mode)]]


def _fp32(c: "Candidate") -> str:
    """The label of the float32 layer a candidate's ``ratio_to_fp32`` is taken against (itself in float32)."""
    return c.label[: -len(BF16)] if c.bf16 else c.label


def _groups(cands: List["Candidate"], built: Dict) -> Dict[str, List[str]]:
    """Per candidate that is not a torch.nn baseline itself: the layers timed back to back with it in every
    round, its baseline first and, for a bfloat16 row, its float32 twin. A ratio is taken within the group,
    so the machine's speed changes over a round (on this VM, levels that last seconds: a round takes up to
    30 s) cancel; a baseline is timed once per group it belongs to."""
    out = {}
    for c in cands:
        if c.label == c.base or c.base not in built or _fp32(c) not in built:
            continue
        out[c.label] = list(dict.fromkeys([c.base, _fp32(c), c.label]))
    return out


def _steps(model, x, bf16: bool) -> Tuple[Callable[[], None], Callable[[], None]]:
    """The timed training step (gradients reset first, as a training loop does) and eval step of a model."""

    def train():
        model.zero_grad(set_to_none=True)
        _train_step(model, x, bf16)

    return train, lambda: _eval_step(model, x, bf16)


def _order(labels: List[str], size, r, mode: str) -> List[str]:
    """The order of round ``r`` of ``mode`` at ``size`` (``r`` may name a group within the round too): a random
    permutation, drawn anew for every round, mode and group from a seed that names them, so that no candidate
    keeps a place or a neighbour (the A/A control's median ratio read 0.89 with a fixed order reversed every
    other round)."""
    out = list(labels)
    random.Random(f"{tuple(size)} {r} {mode}").shuffle(out)
    return out


def _rounds(built: Dict, groups: Dict[str, List[str]], rounds: int, size, log, times: "Timings | None" = None) -> "Timings":
    """``rounds`` more rounds over the groups of one size (:func:`_groups`), appended to ``times`` (new when
    None), which is returned. A round times, per mode, every group in a random order, and the members of a
    group back to back in a random order of their own."""
    times = Timings() if times is None else times
    for r in range(times.rounds, times.rounds + rounds):
        for mode in ("train", "eval"):
            seen = set()
            for label in _order(list(groups), size, r, mode):
                got = {}
                for member in _order(groups[label], size, f"{r}/{label}", mode):
                    before = allocator.minor_faults()
                    got[member] = _time_built(built[member], mode)
                    if member not in seen:
                        seen.add(member)
                        times.own.setdefault((member, mode), []).append(got[member])
                        faults = (allocator.minor_faults() - before) / built[member][3][mode]
                        times.faults.setdefault((member, mode), []).append(faults)
                times.groups.setdefault((label, mode), []).append(got)
        times.rounds += 1
        log(f"  size {size}: round {r + 1} done")
    return times


def _warm_round(built: Dict) -> None:
    """One untimed round over the built candidates of a size, each timing's calls in both modes: the first
    timed round comes after every candidate has run once more at its timed length (in a pilot at
    (28, 128, 28, 128), the first round's A/A ratio read 0.43 and the next 26 0.92-1.07)."""
    for entry in built.values():
        for mode in ("train", "eval"):
            _time_built(entry, mode)


def _time_built(entry: Tuple, mode: str) -> float:
    """Seconds per call of one built candidate's step in ``mode``, over its timing's calls."""
    model, x, bf16, calls = entry
    model.train(mode == "train")
    train, ev = _steps(model, x, bf16)
    return _time(train if mode == "train" else ev, calls[mode])


def aa_interval(ratios: List[float]) -> List[float] | None:
    """The 95% interval of the A/A control's median ratio to torch.nn (:func:`_interval`)."""
    return _interval(ratios)


def _aa_stats(ratios: List[float]) -> Dict:
    """The A/A control against its torch.nn layer over one size's rounds (``ratios``: per round, the control's
    time over torch.nn's in their group): the median of the per-round ratios (``"aa_ratio"``, 1 for a machine without position effects), their spread (``"aa_spread"``,
    interquartile range over median; None with fewer than 3 rounds), the 95% interval of that median
    (``"aa_ci"``) and how far its farther end lies from 1 (``"aa_noise"``: the smallest difference between
    two layers that this run's figures resolve; None with fewer than 6 rounds)."""
    ci = aa_interval(ratios)
    noise = None if ci is None else round(max(abs(ci[0] - 1.0), abs(ci[1] - 1.0)), 4)
    return {"aa_ratio": round(statistics.median(ratios), 4), "aa_spread": spread(ratios), "aa_ci": ci, "aa_noise": noise}


def _aa_table(cands, times: "Timings") -> Dict[Tuple[str, str], Dict]:
    """:func:`_aa_stats` of every A/A control of one size, keyed by its torch.nn layer's (label, mode)."""
    return {(c.base, m): _aa_stats(times.ratios(c.label, c.base, m))
            for c in cands if c.section == "control" for m in ("train", "eval") if (c.label, m) in times.groups}


def _worst_noise(aa: Dict[Tuple[str, str], Dict]) -> Dict:
    """The torch.nn layer and mode of one size (``aa``: :func:`_aa_table`) whose A/A control's median is
    known least well (largest ``"aa_noise"``; ``{"noise": None}`` without controls, or with too few rounds)."""
    if not aa or any(v["aa_noise"] is None for v in aa.values()):
        return {"noise": None}
    (label, mode), v = max(aa.items(), key=lambda kv: kv[1]["aa_noise"])
    return {"noise": v["aa_noise"], "candidate": label, "mode": mode}


# ---------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The processor's model name, as a run's provenance records it (:func:`recnorm.experiments.provenance.cpu`),
    "" when unknown. The hosts of this VM differ between sessions (an AMD EPYC and an Intel Xeon, Ice Lake, so
    far), and so do the ratios: the fused LSTM's eval forward at (784, 64, 1, 128) took 0.97 of torch's op in
    the dispatch data and 1.36 on the Intel host. A run names its host."""
    from recnorm.experiments.provenance import cpu

    return cpu()["model"] or ""


def machine_text(meta: Dict) -> str:
    """The machine a run was made on, its CPU model included where the run recorded it."""
    cpu = meta.get("cpu")
    return f"{meta['machine']}, {cpu}" if cpu else f"{meta['machine']} (CPU model not recorded)"


# Is the machine quiet? (issue 17: a timing under load is not a measurement)
# ---------------------------------------------------------------------------------------------------

MAX_LOAD, MAX_SPREAD, MAX_NOISE = 0.5, 0.10, 0.05


def load_average() -> float:
    """The machine's 1-minute load average."""
    return os.getloadavg()[0]


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds this process and its finished children have used."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def clock() -> float:
    """Wall-clock seconds (monotonic) for :class:`LoadWatch`."""
    return time.monotonic()


def spread(times: List[float]) -> float | None:
    """How much one candidate's time moves across rounds: the interquartile range over the median (None with
    fewer than 3 rounds). A single slow round does not move it; a machine whose speed wanders does."""
    if len(times) < 3:
        return None
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / med


class LoadWatch:
    """The load around a timed run: the load average before and after, and the CPU that *other* processes
    used during it, in cores (the machine's busy CPU time minus this process's and its children's, over the
    wall time). The load average after includes this run's own threads, so the judgement uses the other
    processes' CPU for the time in between."""

    def __init__(self) -> None:
        self.load_before = load_average()
        self._t = clock()
        self._busy, self._own = busy_cpu_seconds(), own_cpu_seconds()
        self.record: Dict = {}

    def stop(self) -> Dict:
        wall = max(clock() - self._t, 1e-9)
        others = (busy_cpu_seconds() - self._busy - (own_cpu_seconds() - self._own)) / wall
        self.record = {"load_before": round(self.load_before, 2), "load_after": round(load_average(), 2),
                       "others_load": round(max(others, 0.0), 2)}  # fmt: skip
        return self.record


def refuse_loaded(tool: str, load: float, max_load: float) -> bool:
    """For a timing tool about to start (gemm_floor.py, rnn_memory_floor.py): whether the load average
    ``load`` is above ``max_load``, in which case it says so on stderr."""
    if load <= max_load:
        return False
    print(f"{tool}: load average {load:.2f} is above --max-load {max_load}: the machine is not quiet, so the ratios "
          "would measure the load. Run it with nothing else running.", file=sys.stderr)  # fmt: skip
    return True


def refuse_others(record: Dict, max_load: float) -> bool:
    """After such a tool's timed run (``record``: :meth:`LoadWatch.stop`): whether other processes used more
    than ``max_load`` cores meanwhile, in which case it says so on stderr."""
    if record["others_load"] <= max_load:
        return False
    print(f"other processes used {record['others_load']} cores during the run: not a quiet measurement.", file=sys.stderr)
    return True


def ratio_table(what: str, record: Dict, rows: List[Tuple], keys: List[str], extra: Sequence[Tuple[str, str, str]] = ()) -> List[str]:
    """Such a tool's printout: ``what`` with the load around the run (``record``), then a Markdown table of
    ``rows`` (``(size, result)``): torch.nn's milliseconds (``result["torch.nn ms"]``), the ratios of ``keys``
    and, per ``extra`` item ``(heading, key, format)``, one more column."""
    lines = [f"{what} (load before {record['load_before']}, others' CPU during the run {record['others_load']} cores)",
             "| (T, B, I, H) | torch.nn (ms) | " + " | ".join(keys + [h for h, _, _ in extra]) + " |",
             "|---|---|" + "---|" * (len(keys) + len(extra))]  # fmt: skip
    for size, r in rows:
        cells = [f"{r[k]:.2f}" for k in keys] + [format(r[k], f) for _, k, f in extra]
        lines.append(f"| {size} | {r['torch.nn ms']:.2f} | " + " | ".join(cells) + " |")
    return lines


def _worst_row(rows: List[Dict], field: str, name: str, extra: Dict[str, str] | None = None) -> Dict | None:
    """The row of ``rows`` with the largest ``field``: ``{name, "candidate", "size", "mode"}`` and, for each
    ``extra`` item ``key: row_field``, that row's field as ``key``; ``{name: None}`` where one row's is
    unknown (too few rounds); None without rows."""
    if not rows:
        return None
    if any(r.get(field) is None for r in rows):
        return {name: None}
    r = max(rows, key=lambda r: r[field])
    return {name: round(r[field], 4), "candidate": r["candidate"], "size": r["size"], "mode": r["mode"],
            **{key: r[f] for key, f in (extra or {}).items()}}


def worst_spread(rows: List[Dict]) -> Dict | None:
    """The torch.nn row whose step moved most across rounds (:func:`_worst_row`, key ``"spread"``)."""
    return _worst_row([r for r in rows if r["norm"] == "torch" and not r.get("bf16")], "spread", "spread")


def worst_noise(rows: List[Dict]) -> Dict | None:
    """The torch.nn row whose A/A control's median ratio is known least well (:func:`_worst_row` of
    ``"aa_noise"``, with its interval and ``"measure": "interval"``); None without controls. Rows from before
    the interval (2026-12-05) carry only the control's spread across rounds, which is used there."""
    rows = [r for r in rows if "aa_spread" in r]
    if rows and all("aa_noise" in r for r in rows):
        return dict(_worst_row(rows, "aa_noise", "noise", {"interval": "aa_ci"}), measure="interval")
    return _worst_row(rows, "aa_spread", "noise")


def not_quiet(meta: Dict, max_load: float = MAX_LOAD, max_spread: float = MAX_SPREAD,
              max_noise: float = MAX_NOISE) -> List[str]:
    """Why the timings of the run ``meta`` describes cannot be judged against the targets (empty: they can).
    A run is quiet when the load average before it and the other processes' CPU during it are at most
    ``max_load``, and its ratios are steady: the A/A control moved by at most ``max_noise`` against torch.nn
    (interquartile range over median of the per-round ratio) in every size and mode. A run from before the
    control was judged by torch.nn's own step instead, which had to move by at most ``max_spread``."""
    quiet = meta.get("quiet")
    if not quiet:
        return ["the load was not recorded (a run from before issue 17)"]
    why = []
    alloc = meta.get("allocator")
    if alloc and alloc["name"] != "steady":
        why.append("glibc's default malloc (`--allocator default`): torch.nn's time includes the page faults of the "
                   "buffers its op maps afresh on every call, which recnorm's pooled kernels do not pay")
    if quiet["load_before"] > max_load:
        why.append(f"load average {quiet['load_before']:.2f} before the run (more than {max_load})")
    if quiet["others_load"] > max_load:
        why.append(f"other processes used {quiet['others_load']:.2f} cores during the run (more than {max_load})")
    if "ratio_noise" in quiet:
        noise = quiet["ratio_noise"]
        interval = bool(noise) and noise.get("measure") == "interval"
        if noise is None:
            why.append("no A/A control was timed: the noise of the ratios is unknown")
        elif noise["noise"] is None:
            why.append(f"fewer than {6 if interval else 3} rounds: the noise of the ratios is unknown")
        elif interval and noise["noise"] > max_noise:
            lo, hi = noise["interval"]
            why.append(
                f"the A/A control's median ratio to torch.nn, which is 1 on a machine that can tell two layers apart, "
                f"has a 95% interval of [{lo:.3f}, {hi:.3f}] ({noise['candidate']}, {tuple(noise['size'])}, "
                f"{noise['mode']}): figures on this page are known to {100 * noise['noise']:.0f}% only, more than "
                f"{100 * max_noise:.0f}%"
            )
        elif not interval and noise["noise"] > max_noise:
            why.append(
                f"the A/A control moved by {100 * noise['noise']:.0f}% against torch.nn across rounds ({noise['candidate']}, "
                f"{tuple(noise['size'])}, {noise['mode']}; more than {100 * max_noise:.0f}%)"
            )
        return why
    worst = quiet.get("torch_spread")
    if worst is not None:
        if worst["spread"] is None:
            why.append("fewer than 3 rounds: the spread of torch.nn's step is unknown")
        elif worst["spread"] > max_spread:
            why.append(
                f"torch.nn's own step moved by {100 * worst['spread']:.0f}% across rounds ({worst['candidate']}, "
                f"{tuple(worst['size'])}, {worst['mode']}; more than {100 * max_spread:.0f}%)"
            )
    return why


def run_reasons(meta: Dict, max_load: float = MAX_LOAD, max_spread: float = MAX_SPREAD,
                max_noise: float = MAX_NOISE) -> List[str]:
    """:func:`not_quiet` of the run of ``meta`` and, where the variants were merged in from another run, of
    that one too."""
    why = not_quiet(meta, max_load, max_spread, max_noise)
    vmeta = meta.get("variants")
    if vmeta and vmeta.get("argv") != meta.get("argv"):
        why += [f"variants' run: {w}" for w in not_quiet(vmeta, max_load, max_spread, max_noise)]
    return why


def worst_faults(rows: List[Dict]) -> Dict | None:
    """The torch.nn row with the most minor page faults per call (float32), None where no row recorded them."""
    return _worst_row([r for r in rows if r["norm"] == "torch" and not r.get("bf16") and "faults" in r], "faults", "faults")


def allocator_text(meta: Dict, rows: List[Dict]) -> str:
    """The page's paragraph on the allocator a run timed under (benchmarks/allocator.py) and the page faults
    torch.nn's layers took per call in it."""
    text = allocator.describe(meta.get("allocator"))
    w = worst_faults(rows)
    if w is not None:
        ours = max((r["faults"] for r in rows if r["norm"] != "torch" and "faults" in r), default=0.0)
        text += (f" Minor page faults per call in this run: torch.nn's at most {w['faults']:,.0f} ({w['candidate']}, "
                 f"{tuple(w['size'])}, {w['mode']}), recnorm's and the peers' at most {ours:,.0f} (the median over "
                 "rounds, `faults` in the JSON).")
    return text


def readme_allocator(meta: Dict) -> str:
    """The README's sentence on the allocator."""
    if allocator.recorded(meta) == "steady":
        return ("glibc's malloc held steady (`--allocator steady`), so that torch.nn's op pays no page faults for "
                "the buffers it maps afresh on every call under glibc's defaults (docs/benchmarks.md, Allocator).")
    return ("glibc's default malloc: torch.nn's time includes page faults that recnorm's pooled kernels do not "
            "pay (docs/benchmarks.md, Allocator).")


def quiet_text(meta: Dict) -> str:
    """One sentence on the load a run was measured at."""
    q = meta.get("quiet")
    if not q:
        return "Load not recorded."
    s = q.get("torch_spread") or {}
    sp = "unknown" if s.get("spread") is None else f"{100 * s['spread']:.1f}%"
    text = (
        f"Load average {q['load_before']:.2f} before and {q['load_after']:.2f} after the run (this run's own threads "
        f"included); other processes used {q['others_load']:.2f} cores during it; torch.nn's step moved by at most {sp} "
        "across rounds (interquartile range over median)"
    )
    if "ratio_noise" not in q:
        return text + "."
    n = q["ratio_noise"] or {}
    noise = "unknown" if n.get("noise") is None else f"{100 * n['noise']:.1f}%"
    if n.get("measure") == "interval" and n.get("noise") is None:
        return (text + ". Its A/A control (the same torch.nn layer timed again in each round) had too few rounds (fewer "
                "than 6) for a 95% interval of its median ratio: the resolution of a figure on this page is unknown.")
    if n.get("measure") == "interval":
        where = "back to back with it, in a random order" if meta.get("paired") else "at a random place in it"
        return (text + f". Its A/A control (the same torch.nn layer timed again in each round, {where}) read a median ratio whose 95% interval lies within {noise} of 1 at every size and mode "
                f"(the worst: {n['candidate']}, {tuple(n['size'])}, {n['mode']}, [{n['interval'][0]:.3f}, "
                f"{n['interval'][1]:.3f}]): the smallest difference a figure on this page resolves.")
    return (text + f", and its A/A control (the same torch.nn layer timed again in each round) by at most {noise} "
            "against it: the noise of a ratio on this page.")


def extended_text(rows: List[Dict]) -> str:
    """The sizes that got more rounds because the interval of the A/A control's median was wider than the
    limit, with the worst noise after each batch of rounds ("" when none did; runs from before 2026-12-06
    re-timed instead: :func:`retimed_text`)."""
    seen: Dict[Tuple, Tuple] = {}
    for r in rows:
        if r.get("extended"):
            seen.setdefault(tuple(r["size"]), (r["extended"], r["rounds"]))
    if not seen:
        return retimed_text(rows)
    parts = []
    for size, (noise, rounds) in seen.items():
        shown = ", ".join("unknown" if s is None else f"{100 * s:.1f}%" for s in noise)
        parts.append(f"{size}: {rounds} rounds (the worst A/A noise after each batch: {shown})")
    return ("A size whose A/A control's median was not known to within the limit got more rounds, all its candidates, "
            "and its figures come from all of them: " + "; ".join(parts) + ".")


def retimed_text(rows: List[Dict]) -> str:
    """The sizes that were timed again because the A/A control (before it, torch.nn's step) was not steady,
    with each attempt's worst spread ("" when none was)."""
    seen: Dict[Tuple, List] = {}
    for r in rows:
        if r.get("retimed"):
            seen.setdefault(tuple(r["size"]), r["retimed"])
    if not seen:
        return ""
    control = any("aa_spread" in r for r in rows)
    what = "the A/A control's worst spread against torch.nn" if control else "torch.nn's worst spread"
    parts = []
    for size, spreads in seen.items():
        shown = ", ".join("unknown" if s is None else f"{100 * s:.0f}%" for s in spreads)
        parts.append(f"{size} {len(spreads)} times ({what} per attempt: {shown})")
    moved = "whose A/A control moved against torch.nn" if control else "whose torch.nn step moved"
    return (f"A size {moved} by more than the limit across its rounds was timed again, all its "
            "candidates, and its rows come from the last attempt: " + "; ".join(parts) + ".")


_MEM_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {bench_dir!r})
import bench_rnn
torch.set_num_threads({threads})
cell, norm, size, kernel, bf16, variant, layers = json.loads(sys.argv[1])
model, x = bench_rnn.build(cell, norm, tuple(size), kernel, variant, layers)
# A short step first loads what every candidate loads once per process (C++ extensions, oneDNN/MKL
# kernels and the primitives they build for a batch and width) without leaving large buffers behind;
# the measured step then allocates its gradients anew. The short step has the measured batch, input and
# hidden sizes and 2 time steps: the choices that depend on them (oneDNN's prepacked linear in the fused
# kernel, from (B, H)) are the measured step's, so neither side counts a one-time primitive build there
# (with a batch of 2 the fused LSTM at (28, 128, 28, 128) counted about 6 MiB of oneDNN set-up).
# kernel="auto" may pick another implementation at the short size than at the measured one, so a recnorm
# layer runs the short step on each implementation that serves it (else the measured step would count
# one implementation's first-use allocations that the other candidates had in their warm-up).
tiny = x[:2].contiguous()
forced = getattr(model, "kernel", None)
for k in ([forced] if forced else ["native", "fused", None]) if hasattr(model, "kernel") else [None]:
    if hasattr(model, "kernel"):
        model.kernel = k
    try:
        bench_rnn._train_step(model, tiny, bf16)
    except ValueError:  # that implementation does not serve this layer
        pass
    model.zero_grad(set_to_none=True)
if hasattr(model, "kernel"):
    model.kernel = forced
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


def measure_memory(cells, norms, sizes, threads: int, kernel=None, bf16_cells=(), variant_sizes=(),
                   samples: int = 1) -> Dict[Tuple[str, Tuple], float]:
    """Peak RSS rise (MiB) of one training step, each candidate in a fresh interpreter: the median of
    ``samples`` such processes (see :func:`memory_env` for what keeps one process's figure steady)."""
    out = {}
    for size, cands in plan(cells, norms, sizes, bf16_cells, variant_sizes):
        for c in cands:
            if c.section == "control":  # the same layer as torch.nn's: nothing to measure twice
                continue
            mibs = [memory_of(c, size, threads, kernel) for _ in range(max(1, samples))]
            if None not in mibs:  # None: a candidate that cannot run (see FAILED)
                out[(c.label, tuple(size))] = statistics.median(mibs)
    return out


#: glibc's mmap threshold for the memory children, fixed (see :func:`memory_env`).
MMAP_THRESHOLD = 65536


def memory_env() -> Dict[str, str]:
    """The environment of a memory child: glibc's mmap threshold fixed at :data:`MMAP_THRESHOLD` bytes.

    By default glibc raises the threshold each time a large mapped block is freed, so later large buffers
    come from the heap and may stay resident after they are freed; which ones do depends on the order of
    allocations, so one process's high-water mark moved by up to 50% (torch.nn.RNN at (200, 32, 64, 512):
    59.5, 64.4, 77.3 and 117 MiB). With the threshold fixed every buffer above it is mapped, and unmapped
    when freed, so the high-water mark follows the peak of live memory: within 1% over 5 processes. A
    threshold already set in the environment is kept."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), **os.environ}


def memory_of(c: Candidate, size, threads: int, kernel=None) -> float | None:
    """Peak RSS rise (MiB) of one training step of candidate ``c`` in a fresh interpreter; None if it fails."""
    code = _MEM_CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), threads=threads)
    arg = json.dumps([c.cell, c.norm, list(size), kernel, c.bf16, c.variant, c.layers])
    res = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=memory_env())
    if res.returncode != 0:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_kib"] / 1024


def attach_memory(rows: List[Dict], memory: Dict) -> None:
    """Put each variant's training row's peak memory, and its ratio to its baseline's, into the row, so that
    the variants' table needs nothing but its rows (a ``--only-variants`` run merges rows into a JSON file
    whose memory figures came from another run)."""
    for r in rows:
        if r.get("section") != "variants" or r["mode"] != "train":
            continue
        size = tuple(r["size"])
        mem, base = memory.get((r["candidate"], size)), memory.get((r["baseline"], size))
        if mem is not None:
            r["memory_mib"] = mem
            if base:
                r["memory_ratio"] = mem / base


TARGETS = {"train": 0.9, "eval": 1.0, "memory": 1.1}
BF16_TARGET = 1.05  # bfloat16 autocast against the same layer in float32 (issue 17)
COMPILE_TARGET = 1.1  # the compiled training step against the eager one (issue 7)
_WORSE = {"met": 0, "open": 1, "missed": 2}


def judge(value: float, ci, target: float) -> str:
    """A figure against its target (at most ``target``): ``"met"`` where the 95% interval of the median ratio
    lies at or below it, ``"missed"`` where the interval lies above it, ``"open"`` where it contains it (this
    run cannot tell). A figure without an interval (memory; runs from before 2026-12-06) is judged by its
    value alone."""
    if ci is None:
        return "met" if value <= target else "missed"
    if ci[1] <= target:
        return "met"
    return "missed" if ci[0] > target else "open"


def _keep_worst(d: Dict, key: str, value: float, ci, status: str) -> None:
    """Keep in ``d`` the worst size of a figure seen so far: the one judged worst (missed, open, met) and among
    those the largest ratio, as ``d[key]``, ``d[key + "_ci"]`` and ``d[key + "_status"]``, so that a figure, its
    interval and its judgement always come from one size."""
    if key not in d or (_WORSE[status], value) >= (_WORSE[d[key + "_status"]], d[key]):
        d[key], d[key + "_ci"], d[key + "_status"] = value, ci, status
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
            if "memory_ratio" in tr:  # a variant's row carries its own figures (see attach_memory)
                mem, mem_ratio = tr["memory_mib"], tr["memory_ratio"]
            else:
                mem, mem_base = memory.get((c, s)), memory.get((tr.get("baseline") or torch_label(tr["cell"]), s))
                mem_ratio = mem / mem_base if mem is not None and mem_base else None
            mem_s = f"{mem_ratio:.2f} ({mem:.0f})" if mem_ratio is not None else "–"
            cells.append(f"{tr['ratio']:.2f} ({tr['ms']:.0f} ms) / {ev['ratio']:.2f} ({ev['ms']:.0f} ms) / {mem_s}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def summary(rows: List[Dict], memory: Dict) -> Dict[str, Dict]:
    """Per recnorm float32 candidate: the worst size's ratio of train, eval and memory, and of bfloat16 autocast
    against float32 of the same layer, with its interval (``"<key>_ci"``) and :func:`judge` against the target
    (``"<key>_status"``). The worst size is the one judged worst (missed, open, met), and among those the one
    with the largest ratio: the figure shown is then the one its judgement comes from."""
    out: Dict[str, Dict] = {}
    for r in rows:
        if r["norm"] in ("torch",) + PEERS:
            continue
        label = r["candidate"][: -len(BF16)] if r.get("bf16") else r["candidate"]
        d = out.setdefault(label, {"cell": r["cell"], "norm": r["norm"]})
        key = f"bf16_{r['mode']}" if r.get("bf16") else r["mode"]
        val, ci = (r["ratio_to_fp32"], r.get("ratio_to_fp32_ci")) if r.get("bf16") else (r["ratio"], r.get("ratio_ci"))
        _keep_worst(d, key, val, ci, judge(val, ci, BF16_TARGET if r.get("bf16") else TARGETS[r["mode"]]))
        if not r.get("bf16") and r["mode"] == "train":
            mem, base = memory.get((label, tuple(r["size"]))), memory.get((torch_label(r["cell"]), tuple(r["size"])))
            if mem is not None and base:
                _keep_worst(d, "memory", mem / base, None, judge(mem / base, None, TARGETS["memory"]))
    return out


def split_rows(rows: List[Dict]) -> Tuple[List[Dict], List[Dict]]:
    """The rows of the main tables and those of the variants' section (variants and their baselines)."""
    main = [r for r in rows if r.get("section", "main") == "main"]
    return main, [r for r in rows if r.get("section", "main") != "main"]


def variant_summary(vrows: List[Dict]) -> Dict[str, Dict]:
    """Per variant: its cell, name, configuration and baseline, the worst ratio over sizes of train, eval
    and memory, the sizes measured, and the kernels that ran (per mode, in size order)."""
    out: Dict[str, Dict] = {}
    for r in sorted(vrows, key=lambda r: SIZES.index(tuple(r["size"])) if tuple(r["size"]) in SIZES else 99):
        if not r.get("variant"):
            continue
        d = out.setdefault(r["candidate"], {"cell": r["cell"], "variant": r["variant"], "config": r.get("config", ""),
                                            "baseline": r.get("baseline", torch_label(r["cell"])), "sizes": [],
                                            "kernels": {"train": [], "eval": []}})  # fmt: skip
        if tuple(r["size"]) not in d["sizes"]:
            d["sizes"].append(tuple(r["size"]))
        ci = r.get("ratio_ci")
        _keep_worst(d, r["mode"], r["ratio"], ci, judge(r["ratio"], ci, TARGETS[r["mode"]]))
        d["kernels"][r["mode"]].append(r.get("kernel", "?"))
        if "memory_ratio" in r:
            _keep_worst(d, "memory", r["memory_ratio"], None, judge(r["memory_ratio"], None, TARGETS["memory"]))
    for d in out.values():  # None: a figure is missing (e.g. --no-memory), so the targets are undecided
        statuses = [d.get(k + "_status") for k in TARGETS]
        d["met"] = (None if None in statuses else False if "missed" in statuses else "open" if "open" in statuses
                    else True)
    return out


def _kernels_text(names: List[str]) -> str:
    """``fused``, or ``native, fused`` where the choice changes with the size."""
    return ", ".join(dict.fromkeys(names)) or "–"


def _kernel_counts(summ: Dict[str, Dict]) -> str:
    """How many variants ran on which kernels (every size), e.g. ``10 on fused; 4 on reference; 1 on fused+native / native``
    (train / eval where they differ)."""
    counts: Dict[str, int] = {}
    for d in summ.values():
        train, ev = _kernels_text(d["kernels"]["train"]), _kernels_text(d["kernels"]["eval"])
        key = train if train == ev else f"{train} / {ev}"
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{n} on {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def variant_lines(vrows: List[Dict], vbaseline_lines: List[str], verdict: bool = True) -> List[str]:
    """The variants' section of the page: worst ratios against the targets (without ``verdict``: not judged,
    the machine was not quiet), then every size."""
    if not vrows:
        return ["Not measured in this run (`--no-variants`, or a JSON from before the variants; `--only-variants` adds them)."]
    summ = variant_summary(vrows)
    lines = [
        "Each variant of issue 8 is a recnorm layer configuration, timed in the same interleaved rounds as torch.nn's "
        "layer of its cell and size and held to the targets of `\"layer\"` (issue 11). `between_layers='batch'` stacks "
        "2 layers, so its baseline is a 2-layer torch.nn layer (the baseline column). Zoneout and `weight_dropout` act in "
        "training only: the eval column is zoneout's eval formula (`h = p h_{t-1} + (1-p) h~`) and plain `W_hh`. "
        "The kernel column is what `kernel=\"auto\"` ran for every layer direction, recorded from "
        "`recnorm.kernels.recording` during each candidate's warm-up steps (train / eval; several where it changed with the "
        "size): `fused` is recnorm's C++ kernels, `native` torch's own op, `reference` the Python time loop. "
        f"Variants per kernel that ran (at every size; train / eval where they differ): {_kernel_counts(summ)}.",
        "",
        f"Worst ratio over the sizes measured ({LEGEND}):" if verdict else
        "Worst ratio over the sizes measured (not judged against the targets: the machine was not quiet, see the top of the page):",
        "",
        "| cell | variant | layer arguments | baseline | kernel (train / eval) | train (≤ 0.9) | eval (≤ 1.0) | memory (≤ 1.1) | targets met | sizes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in summ.values():
        lines.append(
            f"| {_NAMES[d['cell']]} | {d['variant']} | `{d['config']}` | {d['baseline']} | "
            f"{_kernels_text(d['kernels']['train'])} / {_kernels_text(d['kernels']['eval'])} | "
            f"{_fmt(d.get('train'), TARGETS['train'], verdict, d.get('train_status'))} | "
            f"{_fmt(d.get('eval'), TARGETS['eval'], verdict, d.get('eval_status'))} | "
            f"{_fmt(d.get('memory'), TARGETS['memory'], verdict, d.get('memory_status'))} | "
            f"{ {True: 'yes', False: 'no', None: '–', 'open': 'open'}[d['met'] if verdict else None] } | "
            f"{len(d['sizes'])} |"
        )
    labels = list(dict.fromkeys(r["candidate"] for r in vrows if r.get("variant")))
    lines += ["", "Every size (ratio to the baseline, median ms in brackets; memory ratio, MiB in brackets):", ""]
    lines += _table(vrows, {}, labels)
    lines += ["", *vbaseline_lines]
    return lines


def variant_readme_line(vrows: List[Dict]) -> str:
    summ = variant_summary(vrows)
    if not summ:
        return ""
    met = sum(d["met"] is True for d in summ.values())
    sizes = len({s for d in summ.values() for s in d["sizes"]})
    per = {k: sum(d.get(k + "_status") == "met" for d in summ.values()) for k in TARGETS}
    return (
        f"Variants of issue 8 ([docs/benchmarks.md](docs/benchmarks.md#variants-issue-8)), {len(summ)} layer configurations at "
        f"{sizes} size{'s' if sizes > 1 else ''}: all three targets met at every size by {met} of {len(summ)} (train "
        f"{per['train']}, eval {per['eval']}, memory {per['memory']}). Variants per kernel that ran (train / eval where they differ): "
        f"{_kernel_counts(summ)}."
    )


#: What the marks of a judged table mean.
LEGEND = ("bold: the target is missed, the 95% interval of the median ratio lies above it; †: the interval contains "
          "the target, so this run cannot tell; plain: met")


def _fmt(v, target, verdict: bool = True, status: str | None = None) -> str:
    """``v`` to two decimals; with ``verdict``, bold where the target is missed and † where this run cannot tell
    (``status`` from :func:`judge`; without one, ``v`` against ``target``)."""
    if v is None:
        return "–"
    if not verdict:
        return f"{v:.2f}"
    status = status or judge(v, None, target)
    return {"met": f"{v:.2f}", "open": f"{v:.2f}†", "missed": f"**{v:.2f}**"}[status]


def summary_table(summ: Dict[str, Dict], verdict: bool = True) -> List[str]:
    """Worst ratios per layer, each with the 95% interval of its median where the run has one (in brackets); with
    ``verdict``, the targets in the header and each figure judged (:data:`LEGEND`)."""
    t = (lambda target: f" (≤ {target})") if verdict else (lambda target: "")  # noqa: E731
    lines = [
        f"| layer | train{t(TARGETS['train'])} | eval{t(TARGETS['eval'])} | memory{t(TARGETS['memory'])} | "
        f"bf16 autocast / float32, train{t(BF16_TARGET)} | eval{t(BF16_TARGET)} |",
        "|---|---|---|---|---|---|",
    ]
    for label, d in summ.items():
        def f(key, target, d=d):
            ci = d.get(key + "_ci")
            text = _fmt(d.get(key), target, verdict, d.get(key + "_status"))
            return text + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

        lines.append(
            f"| {label} | {f('train', TARGETS['train'])} | {f('eval', TARGETS['eval'])} | {f('memory', TARGETS['memory'])} | "
            f"{f('bf16_train', BF16_TARGET)} | {f('bf16_eval', BF16_TARGET)} |"
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


def regression(rows: List[Dict], baseline: Dict | None, threshold: float = 1.05, threads: int | None = None,
               allocation: str | None = None) -> List[str]:
    """Rows whose ratio to torch.nn rose by more than ``threshold`` against the same row of ``baseline``.
    A baseline timed with another number of threads than this run (``threads``), or under another allocator
    setting (``allocation``, benchmarks/allocator.py; a run without one ran glibc's default), is not compared:
    a ratio to torch.nn moves with either, so the check would report the change of setting."""
    if not baseline:
        return ["No baseline JSON was given or found: no regression check in this run."]
    before = baseline.get("meta", {}).get("threads")
    if threads is not None and before is not None and before != threads:
        return [f"No regression check in this run: the previous run ({baseline.get('meta', {}).get('when', '?')}) "
                f"used {before} threads and this one {threads}, and a ratio to torch.nn moves with the threads."]
    previous = allocator.recorded(baseline.get("meta", {}))
    if allocation is not None and previous != allocation:
        return [f"No regression check in this run: the previous run ({baseline.get('meta', {}).get('when', '?')}) timed "
                f"under the `{previous}` allocator and this one under `{allocation}`, and a ratio to torch.nn moves with "
                "the page faults its op pays (benchmarks/allocator.py)."]
    old = {(r["candidate"], tuple(r["size"]), r["mode"]): r["ratio"] for r in baseline.get("rows", [])}
    compared, new, worse = 0, 0, []
    for r in rows:
        k = (r["candidate"], tuple(r["size"]), r["mode"])
        if r["norm"] == "torch":
            continue
        if k not in old:
            new += 1  # no previous figure: reported as new, not as a regression
            continue
        compared += 1
        rel = r["ratio"] / old[k]
        if rel > threshold:
            worse.append((rel, k, old[k], r["ratio"]))
    when = baseline.get("meta", {}).get("when", "?")
    out = [
        f"Each ratio to torch.nn against the same row of the previous run ({when}, {baseline.get('meta', {}).get('rounds', '?')} rounds): "
        f"{compared} rows compared, {compared - len(worse)} within {100 * (threshold - 1):.0f}%, {len(worse)} above"
        + (f"; {new} rows new (no previous figure)." if new else ".")
    ]
    if worse:
        out += ["", "| candidate | size | mode | before | now | now / before |", "|---|---|---|---|---|---|"]
        for rel, (c, s, m), a, b in sorted(worse, reverse=True):
            out.append(f"| {c} | {s} | {m} | {a:.2f} | {b:.2f} | {rel:.2f} |")
    return out


def compile_lines(crows: List[Dict], verdict: bool = True) -> List[str]:
    if not crows:
        return ["Not measured in this run (`--no-compile`)."]
    lines = [
        "| cell | norm | size (T,B,I,H) | eager ms | compiled ms | compiled / eager (≤ 1.1) | first call (compile) s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in crows:
        lines.append(
            f"| {r['cell']} | {r['norm']} | {tuple(r['size'])} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
            f"{_fmt(r['ratio'], COMPILE_TARGET, verdict, judge(r['ratio'], r.get('ratio_ci'), COMPILE_TARGET))} | {r['compile_s']:.0f} |"
        )
    return lines


def dispatch_lines(sizes, cpu: str | None = None) -> List[str]:
    """What ``kernel="auto"`` runs for ``norm=None`` (and ``"sequence_batch"``) at these sizes, by the rule of
    the run's CPU maker (``cpu``: the model the run recorded; None: a run from before the CPU was recorded,
    made on ``fit_dispatch.LEGACY_MAKER``'s), next to the fused / torch time measured there on CPUs of that
    maker by ``benchmarks/fit_dispatch.py`` (if it measured them)."""
    from recnorm.kernels import autotune

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import fit_dispatch  # noqa: E402 (beside this file)

    maker = fit_dispatch.point_maker({"cpu": cpu})
    rule = autotune.host_rule(maker)
    rules = rule.get("rules", {})
    if not rules:
        return [f"No dispatch rule was measured on {maker} CPUs: torch's op runs wherever it serves the case."]
    measured = {}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_data.json")
    if os.path.exists(path):
        with open(path) as f:
            for p in json.load(f)["points"]:
                if fit_dispatch.point_maker(p) != maker:
                    continue
                for phase, t in p["times"].items():
                    ratio = statistics.median(a / b for a, b in zip(t["fused"], t["native"]))
                    measured[(p["cell"], phase, p["dtype"], tuple(p["size"]))] = ratio
    lines = [
        "Where torch's op and the fused kernel both serve a case (`norm=None`, `\"sequence_batch\"`), `kernel=\"auto\"` "
        f"runs the one that the {maker} rule in `src/recnorm/kernels/autotune.py` (the rule of this run's CPU maker) predicts "
        "to be faster, within the range of sizes it was fitted on (outside it, torch's op). "
        f"`python benchmarks/fit_dispatch.py --fit` fitted it to the {maker} measurements in `benchmarks/dispatch_data.json` "
        f"(`{rule.get('measured', {}).get('command', '?')}`, `norm=None`, each implementation forced). "
        "Per size: fused / torch time as measured there (median of per-round ratios), the rule's score (below 0: fused), and the choice:",
        "",
        "| cell / phase | points fitted | slower picks on them (worst cost); left-one-out | " + " | ".join(str(s) for s in sizes) + " |",
        "|---|---|---|" + "---|" * len(sizes),
    ]
    for key, entry in rules.items():
        cell, phase, dtype = key.split("/")
        if dtype != "float32":
            continue
        cells = []
        for size in sizes:
            pred = autotune.predict(cell, phase == "train", dtype, *size, rule=rule)
            m = measured.get((cell, phase, dtype, tuple(size)))
            cells.append(f"{f'{m:.2f}' if m else '–'} / {pred:+.1f} → {'fused' if pred < 0 else 'torch'}")
        lines.append(
            f"| {cell} / {phase} | {entry.get('points', '?')} | {entry.get('wrong_picks', '?')} ({entry.get('worst_regret', '?')}x); "
            f"{entry.get('loo_wrong_picks', '?')} ({entry.get('loo_worst_regret', '?')}x) | "
            + " | ".join(cells) + " |"
        )
    return lines


def regression_sections(rows: List[Dict], baseline: Dict | None, stored: Dict | None = None, main_baseline: bool = True,
                        threads: int | None = None, allocation: str | None = None) -> Dict[str, List[str]]:
    """The regression check of the main rows and of the variants' rows, each against ``baseline``; where
    there is none (or, with ``main_baseline`` False, for the main rows, which a ``--only-variants`` run did
    not measure), the lines stored in the JSON by the run that measured them. ``threads`` and ``allocation``:
    this run's (see :func:`regression`)."""
    stored = stored or {}
    main, vrows = split_rows(rows)
    out = {}
    for key, part, use in (("main", main, main_baseline), ("variants", vrows, True)):
        if baseline and use:
            out[key] = regression(part, baseline, threads=threads, allocation=allocation)
        else:
            out[key] = stored.get(key) or regression(part, None)
    return out


def to_markdown(rows: List[Dict], memory: Dict, meta: Dict, crows=(), baseline=None, notes: str = "", regressions=None,
                reasons: List[str] | None = None) -> str:
    """The page. ``regressions`` (from :func:`regression_sections`) overrides the check against ``baseline``;
    ``reasons`` (default: :func:`run_reasons` of ``meta``) why the machine was not quiet: where there are any,
    the page gives the ratios without a verdict on the targets."""
    regressions = regressions or regression_sections(rows, baseline)
    reasons = run_reasons(meta) if reasons is None else reasons
    verdict = not reasons
    rows, vrows = split_rows(rows)
    fp32 = [c for c in dict.fromkeys(r["candidate"] for r in rows) if not c.endswith(BF16)]
    bf16 = [c for c in dict.fromkeys(r["candidate"] for r in rows) if c.endswith(BF16)]
    retimed = extended_text(rows)
    new = any("calls" in r for r in rows)  # a run from 2026-12-06 on: random order, repeated calls, intervals
    vmeta = meta.get("variants") or {}
    lines = [
        "# Benchmarks: recnorm layers against torch.nn",
        "",
        f"Produced by `python benchmarks/bench_rnn.py {meta['argv']}` on {meta['when']}"
        + (f" at commit {meta['commit']}" if meta.get("commit") else "")
        + (f"; this page written from its JSON by `python benchmarks/bench_rnn.py {meta['rendered']}`." if meta.get("rendered") else "."),
        f"Machine: {machine_text(meta)}; torch {meta['torch']}; {_threads(meta['threads'])}; float32 unless marked; "
        f"{_rounds_text(meta, rows)}; kernel selection `{meta['kernel']}`.",
        "",
        f"**Load.** {quiet_text(meta)}",
        "",
        f"**Allocator.** {allocator_text(meta, rows)}",
        "",
        *([f"**{'More rounds' if new else 'Re-timed'}.** {retimed}", ""] if retimed else []),
        *([f"**Memory.** {meta['memory_remeasured']}", ""] if meta.get("memory_remeasured") else []),
        "**How to read it.** Absolute milliseconds depend on the machine and on what else runs on it. "
        "What means something is the *ratio* to "
        "torch.nn measured in the same round: "
        + (_how_timed(meta) if new else
           "each round times every candidate once, in alternating order, and a figure is the median over rounds of "
           "(candidate time / torch.nn time of that round). Below 1 is faster than torch.nn. Even so, a row moves by up "
           "to about ±0.1 between runs; ")
        + "the memory column is "
        + (f"the median of {meta['memory_samples']} fresh processes per candidate" if meta.get("memory_samples", 1) > 1
           else "one sample per candidate")
        + (", with glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_`) so that the high-water mark follows live "
           "memory" if meta.get("memory_mmap_threshold") else "") + ". Train = forward + backward of `output.sum()`; eval = forward under `no_grad` in eval mode. "
        "Memory = rise of peak resident memory during one training step in a fresh process, as a ratio to torch.nn "
        "(absolute MiB in brackets).",
        "",
        "## Against the targets",
        "",
        *([f"The worst size of each figure (judged worst, then the largest ratio), with the 95% interval of its median in "
           f"brackets ({LEGEND})." if new else
           "Worst ratio over the sizes measured (bold: over the target)."] if verdict else [
            ("**No verdict on the targets: the machine was not quiet while this ran** (" + "; ".join(reasons) + "). "
             "A timing under load is not a measurement: run `benchmarks/bench_rnn.py` again with nothing else running. "
             if any("load" in r or "cores during" in r for r in reasons) else
             "**No verdict on the targets: the load was within its limits, but this run did not resolve ratios finely enough to judge "
             "them** (" + "; ".join(reasons) + "). Run it again (more rounds: `--retries`), or judge by the intervals in "
             "the JSON where they lie far from a target. ")
            + "The worst ratios over the sizes measured, not judged (in brackets the 95% interval of the median at that "
            "size, where the run has one):"]),  # fmt: skip
        "",
        "The bfloat16 columns are the same layer "
        "under `torch.autocast(\"cpu\", torch.bfloat16)` against itself in float32, in the same rounds.",
        "",
        *summary_table(summary(rows, memory), verdict),
        "",
        "## Every size, float32",
        "",
        *_table(rows, memory, fp32),
        "",
        "## What `kernel=\"auto\"` runs",
        "",
        *dispatch_lines(SIZES, meta.get("cpu")),
        "",
    ]
    if bf16:
        lines += [
            "## bfloat16 autocast",
            "",
            "The same layers under `torch.autocast(\"cpu\", dtype=torch.bfloat16)`, ratio to torch.nn in *float32*. "
            "A normalized recnorm layer computes the recurrence and the statistics in float32 (its fused kernel runs on "
            "the input cast to float32; the output comes back in bfloat16). From commit 862133e, a plain LSTM "
            "(`norm=None`) on a CPU with native bfloat16 runs torch's op in bfloat16, as torch.nn.LSTM does; before "
            "it, it computed in float32 too.",
            "",
            *_table(rows, memory, bf16),
            "",
        ]
    lines += ["## Variants (issue 8)", ""]
    if vmeta and vmeta.get("argv") != meta.get("argv"):
        lines += [
            f"Measured by `python benchmarks/bench_rnn.py {vmeta['argv']}` on {vmeta['when']} ({vmeta['rounds']} interleaved "
            f"rounds, {_threads(vmeta['threads'])}, kernel selection `{vmeta['kernel']}`), merged into this page's JSON; "
            "torch.nn's layer was timed again in those rounds, and each ratio is to that.",
            "",
        ]
    lines += [*variant_lines(vrows, regressions["variants"], verdict), ""]
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
        f"## Compiled training step (issue 7: at most {COMPILE_TARGET}x eager)",
        "",
        "`torch.compile(layer)` (default backend) against the same layer in eager mode, training step, median of "
        f"per-round ratios (`python benchmarks/bench_compile.py --rounds {crows[0]['rounds'] if crows else '?'}`, run beside this script; "
        "eager and compiled alternate within each round).",
        "",
        *compile_lines(list(crows), verdict),
        "",
        "## Regression check (issue 7: no ratio more than 5% above the previous numbers)",
        "",
        *regressions["main"],
        "",
    ]
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)


README_BEGIN, README_END = "<!-- speed table: benchmarks/bench_rnn.py --readme -->", "<!-- end of speed table -->"


def _how_timed(meta: Dict) -> str:
    """How a run from 2026-12-06 on took its ratios and judged them (the page's "How to read it")."""
    ms = f"{1e3 * meta.get('min_time', MIN_TIME):.0f} ms"
    if meta.get("paired"):
        how = ("each round times every candidate once per mode, back to back with its torch.nn layer (a bfloat16 row "
               "with its float32 twin too), in a random order within the pair and of the pairs, drawn anew for every "
               f"round, each timing repeating the step until it lasts {ms} at least, and a figure is the median over "
               "rounds of (candidate time / torch.nn time next to it). ")
    else:
        how = ("each round times every candidate once per mode, in a random order drawn anew for every round, each "
               f"timing repeating the step until it lasts {ms} at least, and a figure is the median over rounds of "
               "(candidate time / torch.nn time of that round). ")
    return how + ("Below 1 is faster than torch.nn. A figure is judged by the distribution-free 95% interval of that "
                  "median (order statistics of the rounds; in the JSON as `ratio_ci`), and the A/A control's interval "
                  "says how finely this run resolves a ratio at all; ")


def _rounds_text(meta: Dict, rows: List[Dict]) -> str:
    """How many rounds the run took: ``7 interleaved rounds``, or per size where rounds were added."""
    counts = sorted({r["rounds"] for r in rows if "rounds" in r})
    if len(counts) <= 1:
        return f"{counts[0] if counts else meta['rounds']} interleaved rounds"
    return f"{counts[0]}-{counts[-1]} interleaved rounds per size (batches of {meta['rounds']})"


def _threads(n) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def readme_block(rows: List[Dict], memory: Dict, meta: Dict) -> str:
    rows, vrows = split_rows(rows)
    summ = summary(rows, memory)
    vline = variant_readme_line(vrows)
    lines = [
        README_BEGIN,
        f"Ratio to torch.nn at the worst size (judged worst, then the largest) of [docs/benchmarks.md](docs/benchmarks.md) (produced by "
        f"`python benchmarks/bench_rnn.py {meta['argv']}` on {machine_text(meta)}; {_rounds_text(meta, rows)}, "
        f"{_threads(meta['threads'])}, {meta['when']}, commit {meta.get('commit', 'not recorded')}). {quiet_text(meta)} "
        f"{readme_allocator(meta)} "
        + (LEGEND[0].upper() + LEGEND[1:] + "." if any("ratio_ci" in r for r in rows) else "Bold: over the target of issue 11."),
        "",
        *summary_table(summ),
        *(["", vline] if vline else []),
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
    notes = _read_notes(args.notes)
    meta = dict(data["meta"], rendered=" ".join(sys.argv[1:]))
    crows = data.get("compile", [])
    if args.compile_json:
        with open(args.compile_json) as f:
            crows = json.load(f)["rows"]
        data["compile"] = crows
        with open(args.render, "w") as f:  # keep the JSON the pages come from complete
            json.dump(data, f, indent=1)
    regressions = regression_sections(data["rows"], baseline, data.get("regression"), threads=meta.get("threads"))
    reasons = run_reasons(meta, args.max_load, args.max_spread, args.max_noise)
    md = to_markdown(data["rows"], memory, meta, crows, notes=notes, regressions=regressions, reasons=reasons)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    else:
        print(md)
    return readme_or_refuse(args.readme, data["rows"], memory, meta, reasons)


def _commit() -> str:
    """The checkout's commit (short), with "+dirty" when its code (src/, benchmarks/) has uncommitted changes;
    "unknown" outside git."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=here).stdout.strip()
        # the code that measures: the package and the benchmarks (the pages it writes may differ meanwhile)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "../src", "."],
                               capture_output=True, text=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def memory_only(args, norms, sizes, bf16_cells, variant_sizes) -> int:
    """Re-measure the peak memory of the candidates the arguments select into the ``--json`` file of an
    earlier run (memory does not depend on the load, and a kernel change can alter it without touching the
    times), note when and at which commit in its meta, and write ``--out`` again from it."""
    if not args.json or not os.path.exists(args.json):
        raise SystemExit(f"--memory-only re-measures into the --json file of an earlier run; expected an existing file, got {args.json!r}")
    with open(args.json) as f:
        data = json.load(f)
    FAILED.update(_keyed(data.get("failed", {})))
    fresh = measure_memory(args.cells, norms, sizes, args.threads, args.kernel, bf16_cells, variant_sizes,
                           args.memory_samples)
    memory = {**_keyed(data.get("memory_mib", {})), **fresh}
    earlier = data["meta"].get("memory_remeasured")
    if set(fresh) >= set(_keyed(data.get("memory_mib", {}))):  # every figure is new: the column's sample count
        data["meta"]["memory_samples"] = args.memory_samples
        data["meta"]["memory_mmap_threshold"] = int(memory_env()["MALLOC_MMAP_THRESHOLD_"])
        earlier = None  # and what earlier re-measures said of the column no longer describes it
    attach_memory(data["rows"], memory)
    data["memory_mib"] = {f"{k[0]} {k[1]}": v for k, v in memory.items()}
    cells = ", ".join(args.cells)
    data["meta"]["memory_remeasured"] = (earlier + " Then the " if earlier else "The ") + (
        f"peak memory of {len(fresh)} candidates ({cells}; {len(sizes)} sizes) was re-measured on "
        f"{time.strftime('%Y-%m-%d')} at commit {_commit()} (`bench_rnn.py {' '.join(args.argv)}`), the median of "
        f"{args.memory_samples} processes each with glibc's mmap threshold at {memory_env()['MALLOC_MMAP_THRESHOLD_']} "
        "bytes; the times are those of the run above.")
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1)
    reasons = run_reasons(data["meta"], args.max_load, args.max_spread, args.max_noise)
    md = to_markdown(data["rows"], memory, data["meta"], data.get("compile", []), notes=_read_notes(args.notes),
                     regressions=regression_sections(data["rows"], None, data.get("regression")), reasons=reasons)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    return 0


def readme_or_refuse(path: str | None, rows: List[Dict], memory: Dict, meta: Dict, reasons: List[str]) -> int:
    """Rewrite README's speed table at ``path`` from a quiet run (0); from a run that was not quiet, say why
    on stderr and leave README as it is (2). Nothing to do without ``path`` (0)."""
    if reasons:
        print("bench_rnn: no verdict on the targets, the machine was not quiet: " + "; ".join(reasons) + ".", file=sys.stderr)
    if not path:
        return 0
    if reasons:
        print(f"bench_rnn: {path} left as it is (README's table comes from a quiet run only).", file=sys.stderr)
        return 2
    write_readme(path, readme_block(rows, memory, meta))
    return 0


def _read_notes(path: str | None) -> str:
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read()
    return ""


def _sizes_arg(values) -> List[Tuple[int, ...]]:
    """``["28,128,28,128", ...]`` (or one comma-separated string of several sizes) as (T, B, I, H) tuples."""
    nums = [int(v) for s in values for v in s.split(",") if v.strip()]
    if not nums or len(nums) % 4:
        raise SystemExit(f"sizes are groups of four numbers T,B,I,H; got {' '.join(values)!r}")
    return [tuple(nums[i : i + 4]) for i in range(0, len(nums), 4)]


def merge_variants(old: Dict, rows: List[Dict], memory: Dict, meta: Dict) -> Dict:
    """``old`` (a JSON file's data) with its variants' section replaced by this run's: the variants' rows
    and their baselines' rows, their memory figures and failures. Everything else of ``old`` (the main
    rows, their memory, the compiled step, the stored regression check of the main rows) is kept."""
    data = dict(old)
    _, vrows = split_rows(rows)
    data["rows"] = [r for r in old.get("rows", []) if r.get("section", "main") == "main"] + vrows
    vlabels = {r["candidate"] for r in vrows if r.get("variant") or r.get("layers", 1) > 1}
    mem = dict(old.get("memory_mib", {}))
    mem.update({f"{k[0]} {k[1]}": v for k, v in memory.items() if k[0] in vlabels})
    data["memory_mib"] = mem
    failed = {k: v for k, v in old.get("failed", {}).items() if k.rsplit(" (", 1)[0] not in vlabels}
    failed.update({f"{k[0]} {k[1]}": v for k, v in FAILED.items() if k[0] in vlabels})
    data["failed"] = failed
    data["meta"] = dict(old.get("meta") or meta, variants=meta)
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9,
                    help="interleaved rounds per size, and per batch of rounds added (--retries; default %(default)s: "
                         "the fewest whose median has a 95%% interval inside the range of the rounds)")  # fmt: skip
    ap.add_argument("--min-time", type=float, default=MIN_TIME,
                    help="each timing repeats the step until it lasts this many seconds (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"], choices=sorted(TORCH))
    ap.add_argument("--norms", nargs="+", default=[str(n) for n in NORMS], help="None and/or names from recnorm.list_norms()")
    ap.add_argument("--sizes", nargs="+", default=None, help="T,B,I,H tuples such as 28,128,28,128")
    ap.add_argument("--kernel", default=None, help="force a recnorm kernel (reference, native, ...); default auto")
    ap.add_argument("--bf16-cells", nargs="*", default=["lstm"], choices=sorted(TORCH), help="cells with bfloat16 autocast rows")
    ap.add_argument("--compile-sizes", nargs="*", default=["28,128,28,128"], help="sizes of the compiled-step table (none: skip)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-json", default=None, help="take the compiled-step table from this output of bench_compile.py --json instead")
    ap.add_argument("--quick", action="store_true", help="3 rounds on the two smallest sizes (the variants' too, unless --variant-sizes)")
    ap.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the variants of issue 8 (VARIANTS in this file) of --cells (default: yes)")  # fmt: skip
    ap.add_argument("--variant-sizes", nargs="+", default=None,
                    help="sizes of the variants' rows, T,B,I,H each (default: the sizes of the main rows)")  # fmt: skip
    ap.add_argument("--only-variants", action="store_true",
                    help="measure the variants only (with torch.nn timed in their rounds) and merge them into the --json file, "
                         "keeping its other rows; --out/--readme are then written from the merged file")  # fmt: skip
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-samples", type=int, default=3,
                    help="fresh processes per candidate for peak memory; the median is reported (default %(default)s)")
    ap.add_argument("--memory-only", action="store_true",
                    help="time nothing: re-measure the peak memory of the selected candidates into the --json file of an "
                         "earlier run (its times are kept; its meta says when and at which commit), then write --out again")
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    ap.add_argument("--json", default=None, help="write the raw rows here")
    ap.add_argument("--baseline", default=None, help="previous JSON for the regression check (default: the --json file before it is overwritten)")
    ap.add_argument("--notes", default=None, help="append this Markdown file (hand-written reading of the numbers)")
    ap.add_argument("--readme", default=None, help="rewrite the speed table between the markers of this README")
    ap.add_argument("--render", default=None, help="measure nothing: write --out/--readme from this JSON of an earlier run")
    ap.add_argument("--max-load", type=float, default=MAX_LOAD,
                    help="quiet machine: at most this load average before the run, and this many cores used by other "
                         "processes during it (default %(default)s)")  # fmt: skip
    ap.add_argument("--max-noise", type=float, default=MAX_NOISE,
                    help="quiet machine: the 95%% interval of the A/A control's median ratio to torch.nn lies within this "
                         "fraction of 1 at every size and mode (for runs from before 2026-12-06, --render: the control's "
                         "interquartile range over median across rounds; default %(default)s). A run that is not quiet "
                         "gives no verdict on the targets and leaves --readme as it is (exit status 2)")  # fmt: skip
    ap.add_argument("--max-spread", type=float, default=MAX_SPREAD,
                    help="for runs from before the A/A control (--render): torch.nn's own step moves by at most this "
                         "fraction across rounds (default %(default)s)")  # fmt: skip
    ap.add_argument("--memory-from", default=None,
                    help="take the memory column from this JSON of an earlier run instead of measuring it (peak memory "
                         "does not depend on the load; the page says where the column comes from)")
    ap.add_argument("--allocator", choices=allocator.CHOICES, default="steady",
                    help="glibc's malloc during the timing: steady (no page faults for buffers freed and asked for again on "
                         "every call) or glibc's default, under which torch.nn's op pays them and recnorm's pooled kernels "
                         "do not; a default run gives no verdict on the targets (benchmarks/allocator.py; default %(default)s)")
    ap.add_argument("--retries", type=int, default=2,
                    help="add --rounds more rounds of a size, all its candidates, when the 95%% interval of its A/A "
                         "control's median ratio reaches farther than --max-noise from 1, at most this many times; the "
                         "page names the sizes that got more rounds and the noise after each batch (default %(default)s)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.retries < 0:
        ap.error(f"--retries: expected an int >= 0, got {args.retries}")
    if args.rounds < 1:
        ap.error(f"--rounds: expected an int >= 1, got {args.rounds}")
    if args.min_time < 0:
        ap.error(f"--min-time: expected seconds >= 0, got {args.min_time}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.render:
        return render(args)
    if args.only_variants and not args.variants:
        raise SystemExit("--only-variants and --no-variants exclude each other")
    torch.set_num_threads(args.threads)
    alloc = allocator.set_or_exit(args.allocator, "bench_rnn.py")  # before anything is built or timed
    norms = [None if n == "None" else n for n in args.norms]
    sizes = _sizes_arg(args.sizes) if args.sizes else list(SIZES)
    rounds = args.rounds
    if args.quick:
        sizes, rounds = sizes[:2], 3
    variant_sizes = (_sizes_arg(args.variant_sizes) if args.variant_sizes else sizes) if args.variants else []
    bf16_cells = args.bf16_cells
    if args.only_variants:  # nothing of the main tables: no norms, bfloat16, peers or compiled step
        sizes, norms, bf16_cells = [], [], []
    if args.memory_only:
        return memory_only(args, norms, sizes, bf16_cells, variant_sizes)
    baseline = None
    base_path = args.baseline or args.json
    if base_path and os.path.exists(base_path):
        with open(base_path) as f:
            baseline = json.load(f)
    previous = None
    if args.only_variants and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            previous = json.load(f)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    watch = LoadWatch()
    if watch.load_before > args.max_load:
        log(f"  load average {watch.load_before:.2f} (more than {args.max_load}): this run will give no verdict on the targets")
    rows = measure_time(args.cells, norms, sizes, rounds, args.kernel, log, bf16_cells, variant_sizes,
                        max_noise=args.max_noise, retries=args.retries, min_time=args.min_time)
    crows = []
    if args.only_variants:
        pass
    elif args.compile_json:
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
    quiet = dict(watch.stop(), torch_spread=worst_spread(rows), ratio_noise=worst_noise(rows))
    # Peak memory is measured after the timing, in fresh processes one at a time (it does not depend on the
    # load, but the processes would load the machine that the timing runs on).
    memory_note = None
    if args.memory_from:
        with open(args.memory_from) as f:
            earlier = json.load(f)
        memory = _keyed(earlier.get("memory_mib", {}))
        em = earlier.get("meta", {})
        memory_note = (f"The memory column comes from an earlier run ({em.get('when', '?')}, {_threads(em.get('threads'))}, "
                       f"`bench_rnn.py {em.get('argv', '?')}`), taken over with `--memory-from`: peak memory does not "
                       "depend on the load.")  # fmt: skip
        if em.get("memory_remeasured"):
            # that run's column was not its own either (taken over, or re-measured by --memory-only): keep naming
            # the run that measured it
            memory_note = em["memory_remeasured"]
    else:
        memory = {} if args.no_memory else measure_memory(args.cells, norms, sizes, args.threads, args.kernel, bf16_cells,
                                                          variant_sizes, args.memory_samples)
    attach_memory(rows, memory)
    meta = {
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": rounds,
        "kernel": args.kernel or os.environ.get("RECNORM_KERNEL") or "auto",
        "commit": _commit(),
        "min_time": args.min_time,
        "paired": True,  # each candidate timed back to back with its baseline (from 2026-12-06)
        "quiet": quiet,
        "retries": args.retries,
        "memory_samples": args.memory_samples,
        "memory_mmap_threshold": int(memory_env()["MALLOC_MMAP_THRESHOLD_"]),
        "allocator": alloc,
    }
    if memory_note:
        meta["memory_remeasured"] = memory_note
        meta["memory_samples"] = em.get("memory_samples", 1)
        meta["memory_mmap_threshold"] = em.get("memory_mmap_threshold")
    if variant_sizes:
        meta["variants"] = dict(meta)
    data = {"meta": meta, "rows": rows, "memory_mib": {f"{k[0]} {k[1]}": v for k, v in memory.items()}, "compile": crows,
            "failed": {f"{k[0]} {k[1]}": v for k, v in FAILED.items()}}  # fmt: skip
    if args.only_variants:
        data = merge_variants(previous or {"meta": meta}, rows, memory, meta)
        FAILED.clear()
        FAILED.update(_keyed(data["failed"]))
        # the main rows were not measured now: their check is the stored one, or against an explicit --baseline
        regressions = regression_sections(data["rows"], baseline, (previous or {}).get("regression"),
                                          main_baseline=bool(args.baseline), threads=args.threads,
                                          allocation=args.allocator)  # fmt: skip
        memory = _keyed(data["memory_mib"])
        crows = data.get("compile", [])
    else:
        regressions = regression_sections(rows, baseline, threads=args.threads, allocation=args.allocator)
    data["regression"] = regressions
    reasons = run_reasons(data["meta"], args.max_load, args.max_spread, args.max_noise)
    md = to_markdown(data["rows"], memory, data["meta"], crows, notes=_read_notes(args.notes), regressions=regressions, reasons=reasons)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return readme_or_refuse(args.readme, data["rows"], memory, data["meta"], reasons)


if __name__ == "__main__":
    sys.exit(main())
