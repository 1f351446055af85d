"""The gating claim: the LSTM and GRU remember longer and pass more gradient through time than a tanh RNN;
normalization adds training speed (copy task and adding problem)."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from recnorm.experiments.config import RunConfig
from recnorm.experiments.document import fmt, mean_sd
from recnorm.experiments.results import summary
from recnorm.experiments.study import (
    GENERATED_SMOKE, Claim, Design, Question, Record, Study, auc, better_of, by_seed, final, grid, label, labels,
    name, paired, run_ids, smoke_variant, steps_of, verdicts_section)
from recnorm.experiments.sweep import SweepSpec


def sweep(smoke: bool = False) -> SweepSpec:
    """The gating claim: "the LSTM suffers less from vanishing gradients and has more memory than a vanilla
    RNN; batch norm adds training speed" (Hochreiter & Schmidhuber 1997; Cooijmans et al. 2017).

    Tanh RNN, GRU and LSTM (64 units), each with no norm, layer norm and per-step BN (γ0 = 0.1), on the copy
    task (5 symbols to recall after a delay of 10 or 40 blanks, T = 21 or 51) and the adding problem
    (T = 100 and 200). Adam 2e-3, clipping at 1, batch 64, 400 steps, orthogonal init (LSTM forget bias 1),
    3 seeds: 108 runs.
    The report gives the success rate against the task's chance baseline (a run succeeds when it closes
    half the gap from the memoryless predictor to perfect: copy recall accuracy above 0.56 against chance
    0.125, adding MSE below 0.083 against 0.167) and the gradient flow through time, ||dL/dh_1|| over
    ||dL/dh_T||, at init and after training.

    Command: ``recnorm compare --preset memory --workers 2 --out runs/memory --results results/memory``, then ``recnorm report results/memory --out docs/memory``.
    Running time: measured 14 min 28 s with ``--workers 2`` beside other jobs (load average 2.4-4.4).
    ``--smoke``: 22 s (measured, 2 workers).
    """
    base = RunConfig(task="copy", task_options={"valid_size": 500, "test_size": 500}, cell="lstm", hidden_size=64,
                     init="orthogonal", optimizer="adam", lr=2e-3, clip=1.0, batch_size=64, steps=400,
                     eval_every=50, eval_batch_size=500, diag_every=None, popstat_batches=8)
    variants = [{"cell": cell, **({"forget_bias": 1.0} if cell == "lstm" else {}), **norm}
                for cell in ("rnn", "gru", "lstm")
                for norm in ({"norm": None}, {"norm": "layer"}, {"norm": "batch", "norm_kwargs.gain_init": 0.1})]
    grids = (grid(variants, task=["copy"], **{"task_options.delay": [10, 40], "task_options.copy_len": [5]},
                   seed=[0, 1, 2])
             + grid(variants, task=["adding"], **{"task_options.length": [100, 200]}, seed=[0, 1, 2]))
    spec = SweepSpec(
        name="memory",
        description=("Memory and gradient flow of tanh RNN, GRU and LSTM, each without norm, with layer norm and "
                     "with per-step BN: copy task (delay 10 and 40) and adding problem (T = 100 and 200)."),
        base=base, grids=grids, report={})
    if smoke:  # the shortest delay and sequence only
        spec = smoke_variant(spec, GENERATED_SMOKE)
        spec.grids = [{k: v[:1] if k.startswith("task_options.") else v for k, v in g.items()} for g in spec.grids]
    return spec


def _setting(r: Record) -> str:
    o = r["config"].get("task_options") or {}
    if r["config"]["task"] == "copy":
        return f"copy, delay {o.get('delay', 50)}"
    if r["config"]["task"].startswith("adding"):
        return f"adding, T = {o.get('length', 100)}"
    return r["config"]["task"]


def _chance_and_success(r: Record) -> Tuple[float, float]:
    """The memoryless predictor's score and the success threshold (half way from it to perfect)."""
    task = r["task"]
    if task["name"] == "copy":
        chance = 1.0 / (task.get("options") or {}).get("num_symbols", 8)
        return chance, (1.0 + chance) / 2
    if task["name"].startswith("adding"):
        return 1.0 / 6.0, 1.0 / 12.0
    raise ValueError(f"memory analysis: no chance level for task {task['name']!r}; expected copy or adding")


def succeeded(r: Record) -> bool:
    v = final(r)
    if v is None:
        return False
    _, threshold = _chance_and_success(r)
    return v >= threshold if r["higher_is_better"] else v <= threshold


_GRAD_FLOOR = 1e-40  # a gradient norm that underflowed to 0 in float32 counts as this


def grad_ratio(r: Record, which: str = "init") -> Optional[float]:
    """log10 of ||dL/dh_1|| / ||dL/dh_T|| of the first layer, at init or at the end (0: flat; negative:
    vanishing going back in time; a first-step norm that underflowed to 0 counts as 1e-40)."""
    flow = (r.get("diagnostics") or {}).get("grad_flow") or []
    if not flow:
        return None
    entry = flow[0] if which == "init" else flow[-1]
    norms = (entry.get("norms") or {}).get("rnn.l0")
    if not norms or norms[0] is None or norms[-1] is None or norms[-1] <= 0:
        return None
    return math.log10(max(norms[0], _GRAD_FLOOR) / norms[-1])


DESIGNS = {
    "memory": Design("final test metric (copy: recall accuracy; adding: MSE)", "higher", margin=0.01),
    "gradient": Design("log10 ||dL/dh_1|| / ||dL/dh_T|| of the first layer at init", "higher", margin=0.1),
    "speed": Design("mean valid metric over training (area under the validation curve)", "higher", margin=0.01),
}
SUCCESS_MARGIN, SUCCESS_FLOOR = 0.1, 0.5  # a 0/1 outcome: its largest possible standard deviation is 0.5
CELL_NAMES = {"rnn": "tanh RNN", "gru": "GRU", "lstm": "LSTM"}


def _memory(runs: Sequence[Record], setting: str, cell_runs: Any) -> List[Claim]:
    """Does the gated cell remember more, with each norm (both cells with the same norm)?"""
    out, metric, d = [], runs[0]["metric"], DESIGNS["memory"]
    for lab in labels(runs):
        rnn_lab = cell_runs("rnn", lab)
        for cell in ("gru", "lstm"):
            gated = cell_runs(cell, lab)
            if not gated or not rnn_lab:
                continue
            with_norm = "no norm" if lab == "none" else f"both with {name(lab)}"
            rate = lambda r: float(succeeded(r))  # noqa: E731
            out.append(Claim(
                key=f"memory:{cell}:{lab}:{setting}",
                claim=f"the {cell.upper()} remembers more than a tanh RNN (final test {metric}, {with_norm})",
                source="Hochreiter & Schmidhuber 1997; Cho et al. 2014", task=setting, design=d, steps=steps_of(runs),
                evidence=f"per seed: {cell.upper()} vs tanh RNN", runs=run_ids(gated, rnn_lab),
                test=paired(by_seed(gated, final), by_seed(rnn_lab, final), better_of(runs), d),
                other=("runs that succeed", paired(by_seed(gated, rate), by_seed(rnn_lab, rate), "higher", d,
                                                   margin=SUCCESS_MARGIN))))
    return out


def _gradient(runs: Sequence[Record], setting: str, cell_runs: Any) -> List[Claim]:
    out, d, rnn = [], DESIGNS["gradient"], cell_runs("rnn")
    for cell in ("gru", "lstm"):
        gated = cell_runs(cell)
        if not gated or not rnn:
            continue
        after = lambda r: grad_ratio(r, "final")  # noqa: E731
        out.append(Claim(
            key=f"gradient:{cell}:{setting}",
            claim=f"the {cell.upper()} passes more gradient back through time than a tanh RNN at init "
                  f"(log10 ||dL/dh_1|| / ||dL/dh_T||, no norm)",
            source="Hochreiter & Schmidhuber 1997; Bengio et al. 1994", task=setting, design=d, steps=steps_of(runs),
            evidence=f"per seed: {cell.upper()} vs tanh RNN", runs=run_ids(gated, rnn),
            test=paired(by_seed(gated, grad_ratio), by_seed(rnn, grad_ratio), "higher", d),
            other=("after training", paired(by_seed(gated, after), by_seed(rnn, after), "higher", d))))
    return out


def _speed(runs: Sequence[Record], setting: str, cell_runs: Any) -> List[Claim]:
    out, metric, d, better = [], runs[0]["metric"], DESIGNS["speed"], better_of(runs)
    for cell in ("rnn", "gru", "lstm"):
        base = cell_runs(cell)
        for lab in labels(runs):
            these = cell_runs(cell, lab)
            if lab == "none" or not these or not base:
                continue
            out.append(Claim(
                key=f"speed:{cell}:{lab}:{setting}",
                claim=f"{name(lab)} makes the {CELL_NAMES[cell]} train faster than no norm (mean valid {metric} over "
                      f"training)",
                source="Cooijmans et al. 2017; Ba et al. 2016", task=setting, design=d, steps=steps_of(runs),
                evidence=f"per seed: {lab} vs no norm", runs=run_ids(these, base),
                test=paired(by_seed(these, auc), by_seed(base, auc), better, d),
                other=(f"final test {metric}", paired(by_seed(these, final), by_seed(base, final), better, d))))
    return out


def claims(records: Sequence[Record]) -> List[Claim]:
    out: List[Claim] = []
    settings: List[str] = []
    for r in records:
        if _setting(r) not in settings:
            settings.append(_setting(r))
    for setting in settings:
        runs = [r for r in records if _setting(r) == setting]

        def cell_runs(cell: str, lab: str = "none", runs: Sequence[Record] = runs) -> List[Record]:
            return [r for r in runs if r["config"]["cell"] == cell and label(r) == lab]

        for family in (_memory, _gradient, _speed):
            out += family(runs, setting, cell_runs)
    return out


def section(doc: Any, records: Sequence[Record], hints: Dict[str, Any]) -> List[Claim]:
    doc.h(2, "Memory and gradient flow by cell")
    doc.p("A run *succeeds* when its final test metric closes half the gap between the memoryless predictor and "
          "a perfect one: copy recall accuracy above (1 + 1/8)/2 = 0.5625 (chance 1/8), adding MSE below 1/12 "
          "(chance: predicting the mean, 1/6). Gradient flow: log10 of ||dL/dh_1|| / ||dL/dh_T|| of the first "
          "layer on a fixed training batch, mean over seeds of the logs (0: flat; -3: a thousandfold smaller at the "
          "first step than at the last; a norm that underflowed to 0 counts as 1e-40).")
    settings: List[str] = []
    for r in records:
        if _setting(r) not in settings:
            settings.append(_setting(r))
    rows = []
    for setting in settings:
        runs = [r for r in records if _setting(r) == setting]
        chance, threshold = _chance_and_success(runs[0])
        for cell in ("rnn", "gru", "lstm"):
            for lab in labels(runs):
                these = [r for r in runs if r["config"]["cell"] == cell and label(r) == lab]
                if not these:
                    continue
                init = summary([grad_ratio(r) for r in these])["mean"]
                end = summary([grad_ratio(r, "final") for r in these])["mean"]
                rows.append([setting, {"rnn": "tanh RNN"}.get(cell, cell.upper()), lab,
                             f"{sum(succeeded(r) for r in these)} of {len(these)}", mean_sd([final(r) for r in these]),
                             f"{fmt(chance)} / {fmt(threshold)}", fmt(init), fmt(end)])
    doc.table(["task", "cell", "norm", "succeeded", "final test metric", "chance / success threshold",
               "log10 grad ratio at init", "after training"], rows)
    return verdicts_section(doc, claims(records))


QUESTIONS = (
    Question("gated cells remember longer than a tanh RNN", ("memory:*:adding, T = 200", "memory:*:copy, delay 10")),
    Question("gated cells suffer less from vanishing gradients", ("gradient:*:adding, T = 200",)),
    Question("normalization adds training speed on long-range tasks", ("speed:*:adding, T = 200",)),
)

STUDY = Study(name="memory", sweep=sweep, designs=DESIGNS, claims=claims, section=section, questions=QUESTIONS)
