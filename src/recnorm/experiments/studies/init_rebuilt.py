"""The init study, rebuilt around the question: does normalization let a model train well from a bad init,
at a sensible learning rate? (issue 16, item 4)."""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from recnorm.experiments.config import RunConfig
from recnorm.experiments.study import (
    Claim, Design, Question, Record, Study, TuningGrid, chance_level, final, name, paired, run_ids, select,
    steps_of)
from recnorm.experiments.sweep import SweepSpec

#: Torch's default uniform, orthogonal, Glorot (Xavier) uniform and N(0, g^2/fan_in) (on W_hh: N(0, g^2/H)).
SCHEMES = ["default", "orthogonal", "xavier", "normal"]
GAINS = [0.1, 0.3162, 1.0, 3.162, 10.0]  # 5 gains, log grid 0.1 .. 10
FORGET_BIASES = [0.0, 1.0]  # LSTM only
NORMS: List[Dict[str, Any]] = [{"norm": None}, {"norm": "layer"}, {"norm": "batch", "norm_kwargs.gain_init": 0.1}]
#: The default init every norm is tuned at; its rate is then held while the init varies.
DEFAULT_INIT = {"init": "default", "init_gain": 1.0, "forget_bias": 1.0}
#: The bad init of each cell for the 10-seed contrast, declared before any run of the grid (it is not picked
#: from results): N(0, g^2/fan_in) at the largest gain, the scheme whose scale follows the gain exactly, with
#: (LSTM) no forget-gate bias; at g = 10 a tanh RNN's recurrent Jacobian starts far in the saturated regime
#: and an LSTM's gates start saturated.
WORST_INIT = {"lstm": {"init": "normal", "init_gain": 10.0, "forget_bias": 0.0},
              "rnn": {"init": "normal", "init_gain": 10.0}}
#: A run succeeds when it reaches its task's target: row-wise Fashion-MNIST test accuracy >= 0.80; adding at
#: T = 100 test MSE <= 0.01 (predicting the mean: 1/6).
TARGETS = {"fashion_rows": ("higher", 0.80), "adding": ("lower", 0.01)}
TASKS: Dict[str, Dict[str, Any]] = {
    "fashion_rows": {"task": "fashion_rows", "task_options": {"train_size": 8000, "valid_size": 1000,
                                                              "test_size": 2000}},
    "adding": {"task": "adding", "task_options": {"length": 100, "valid_size": 1000, "test_size": 1000}},
}
#: What results/init*/runs.jsonl keeps of each of its ~2000 runs: 50 points of each training curve, and not
#: the per-step batch and population statistics (the report reads final metrics; run directories keep all).
PUBLISHED = {"max_points": 50, "drop": ["diagnostics.batch_stats", "diagnostics.population_stats"]}
GRID_SEEDS = [0, 1, 2, 3, 4]  # seeds of the final runs; tuning uses 100 and 101
CONTRAST_SEEDS = list(range(10))
#: 7 log-spaced rates (1000x) and 2 tuning seeds. Declared first as the middle 5 (3e-4 .. 3e-2); 3 of the 12
#: arms chose an edge there (adding: LSTM none and LSTM per-step BN 3e-2, tanh RNN layer norm 3e-4), so
#: before any final run the grid was widened by half a decade on each side, for every arm alike.
TUNING = TuningGrid((9.487e-5, 3e-4, 9.487e-4, 3e-3, 9.487e-3, 3e-2, 9.487e-2), seeds=(100, 101))


def _grids(cells: Sequence[str], seeds: List[int], contrast_seeds: List[int], gains: List[float],
           schemes: List[str]) -> List[Dict[str, Any]]:
    """The sweep in the order it runs: first the default-versus-bad-init contrasts, task by task (adding
    first: the task where the init matters) and seed by seed within a task, so that a task's contrast claims
    are complete once its block finishes; then the init grid seed by seed (the finished part is always whole
    seeds of the whole grid, and its first two seeds are the pilot)."""
    arms: List[Tuple[str, str, Dict[str, Any]]] = []
    for task in sorted(TASKS.values(), key=lambda t: t["task"] != "adding"):
        for cell in cells:
            for norm in NORMS:
                arms.append((task["task"], cell, {"cell": [cell], "task": [task["task"]],
                                                  "task_options": [task["task_options"]],
                                                  **{k: [v] for k, v in norm.items()}}))
    contrasts: List[Dict[str, Any]] = []
    for task in dict.fromkeys(t for t, _, _ in arms):
        for seed in contrast_seeds:
            for _, cell, arm in (a for a in arms if a[0] == task):
                for init in (DEFAULT_INIT, WORST_INIT[cell]):
                    fixed = {k: [v] for k, v in init.items() if k != "forget_bias" or cell == "lstm"}
                    contrasts.append({**arm, **fixed, "seed": [seed]})
    grid: List[Dict[str, Any]] = []
    for seed in seeds:
        for _, cell, arm in arms:
            fb = {"forget_bias": FORGET_BIASES} if cell == "lstm" else {}
            grid.append({**arm, "init": schemes, "init_gain": gains, **fb, "seed": [seed]})
    return contrasts + grid


def sweep(smoke: bool = False) -> SweepSpec:
    """Does normalization let an LSTM or a tanh RNN train well from a bad init, at a tuned learning rate?

    Cells LSTM and tanh RNN (one layer, 64 units); norms none, layer, per-step BN (γ0 = 0.1); inits torch's
    default uniform, orthogonal, Glorot uniform and N(0, g^2/fan_in) at gains 0.1, 0.32, 1, 3.2, 10, and
    (LSTM) forget-gate bias 0 and 1; tasks adding at T = 100 and row-wise Fashion-MNIST (8000/1000/2000).
    Adam, batch 64, clipping at 1; to convergence: validation every 100 steps, early stopping with patience
    5 evaluations, at most 5000 steps. The learning rate is tuned per (task, cell, norm) at the default init
    (torch's uniform, gain 1, forget bias 1) on 7 log-spaced rates 9.5e-5 .. 9.5e-2 with 2 tuning seeds
    (:mod:`recnorm.experiments.tune`), then held fixed while the init varies. 5 seeds on the grid, 10 for
    each norm's default-versus-bad-init contrast (the bad init is declared in ``WORST_INIT``). Runs: tuning
    2 tasks x (3 LSTM + 3 RNN arms) x 7 rates x 2 seeds = 168; final 2 tasks x 3 norms x (LSTM 4 x 5 x 2 + RNN 4 x 5) x 5 seeds = 1800 on the grid, plus
    2 x 2 cells x 3 norms x 2 inits x 5 seeds (5-9) = 120 for the contrasts (their seeds 0-4 are on the
    grid): 1920 final runs, 2088 in all. The final sweep runs the contrasts first (adding, then
    Fashion-MNIST), then the grid seed by seed; its first two seeds are the pilot.

    Measured cost (the first 120 tuning runs, 2 workers of one thread on 2 cores): an adding run takes 41 s
    on average (1757 steps before it stops), a Fashion-MNIST run 24 s (2543 steps); 116 of 120 stopped early.
    So the contrasts take about 65 minutes, each seed of the grid about 1.6 hours, and the whole study about
    9 hours: several sessions (the sweep resumes; commit finished runs as they finish). No cut below the
    issue's minimum (3 schemes, 5 gains, 5 seeds on the grid, 10 seeds for the contrasts) is planned; the
    page states what has finished.

    Command: ``python -m recnorm.experiments.tune init --workers 2`` (tuning, resumable), then
    ``python -m recnorm.experiments.tune init --final --workers 2`` (the final sweep, resumable), then
    ``recnorm evidence``.
    Running time: about 9.5 hours on 2 CPU cores (measured per run, see above); ``--smoke``: about 1 minute.
    """
    return _spec("init", smoke, GRID_SEEDS, CONTRAST_SEEDS)


def _spec(sweep_name: str, smoke: bool, seeds: List[int], contrast: List[int]) -> SweepSpec:
    base = RunConfig(task="fashion_rows", cell="lstm", hidden_size=64, optimizer="adam", lr=1e-3, clip=1.0,
                     batch_size=64, steps=5000, eval_every=100, patience=5, eval_batch_size=500, diag_every=None,
                     popstat_batches=8)
    if smoke:
        base = base.replace(hidden_size=8, steps=1, eval_every=1, eval_batches=1, popstat_batches=1,
                            eval_batch_size=16, batch_size=16, patience=1)
        spec = SweepSpec(name=sweep_name + "-smoke", base=base, grids=_smoke_grids(),
                         description="[smoke] init study")
        return spec
    return SweepSpec(name=sweep_name, base=base, grids=_grids(["lstm", "rnn"], seeds, contrast, GAINS, SCHEMES),
                     published=PUBLISHED,
                     description=("Init study: LSTM and tanh RNN, none / layer / per-step BN, 4 schemes x 5 gains "
                                  "(x forget bias 0/1), adding T = 100 and row-wise Fashion-MNIST, learning rate "
                                  "tuned per norm at the default init, to convergence."))


def _smoke_grids() -> List[Dict[str, Any]]:
    """The smoke variant: the LSTM on Fashion-MNIST rows and the tanh RNN on adding (tiny splits), none and
    layer norm, 2 schemes x 2 gains, 2 seeds (so the claims have pairs to test): 32 one-step runs."""
    small = {"fashion_rows": {"train_size": 32, "valid_size": 16, "test_size": 16},
             "adding": {"length": 100, "valid_size": 16, "test_size": 16}}
    grids = []
    for (task, options), cell in zip(small.items(), ("lstm", "rnn")):
        fb = {"forget_bias": [1.0]} if cell == "lstm" else {}
        for norm in NORMS[:2]:
            arm = {"cell": [cell], "task": [task], "task_options": [options], **{k: [v] for k, v in norm.items()}}
            grids.append({**arm, "init": ["default", "normal"], "init_gain": [1.0, 10.0], **fb, "seed": [0, 1]})
    return grids


_MARGIN = {"fashion_rows": 0.01, "adding": 0.002}
#: Every claim is judged only once it has the seeds the design declares (5 on the grid, 10 for the contrasts):
#: a verdict read off the first seeds of a sweep still running would be peeking.
DESIGNS = {
    f"{kind}_{task}": Design(metric, better, budget="convergence", margin=_MARGIN[task], tuned=True, patience=5,
                             min_seeds=len(CONTRAST_SEEDS) if kind == "worst" else len(GRID_SEEDS))
    for task in TASKS
    for kind, metric, better in (
        ("spread", "range of the final test metric over the init grid (schemes x gains x forget biases), per seed",
         "lower"),
        ("success", "fraction of the init grid that reaches the task's target, per seed", "higher"),
        ("worst", "final test metric at the default init minus at the declared bad init, per seed (the cost of a bad "
                  "init)", "lower"))
}
for _task in TASKS:  # the success rate is a fraction: its own margin
    DESIGNS[f"success_{_task}"] = Design(DESIGNS[f"success_{_task}"].metric, "higher", budget="convergence",
                                         margin=0.05, tuned=True, patience=5, min_seeds=len(GRID_SEEDS))


def _value(r: Record, chance: Optional[float]) -> Optional[float]:
    v = final(r)
    return chance if v is None else v


def _setting(r: Record) -> Tuple[Any, Any, Any]:
    c = r["config"]
    return c.get("init"), c.get("init_gain"), c.get("forget_bias") if c.get("cell") == "lstm" else None


def _init_setting(cell: str, init: Dict[str, Any]) -> Tuple[Any, Any, Any]:
    """The :func:`_setting` of a declared init (``DEFAULT_INIT`` or ``WORST_INIT[cell]``) for ``cell``."""
    return _setting({"config": {"cell": cell, **init}})


def grid_seeds(runs: Sequence[Record], cell: str) -> List[int]:
    """The seeds of ``runs`` (one task, cell and norm) that hold the whole init grid: every setting any seed
    has, and more than the two inits of the contrast (the contrast's runs alone are not a grid)."""
    every = {_setting(r) for r in runs}
    contrast = {_init_setting(cell, DEFAULT_INIT), _init_setting(cell, WORST_INIT[cell])}
    if every <= contrast:
        return []
    return sorted(seed for seed in {r["seed"] for r in runs} if {_setting(r) for r in runs if r["seed"] == seed} == every)


def _per_seed(records: Sequence[Record], fn, cell: str) -> Dict[int, Optional[float]]:
    """``fn`` of each whole-grid seed's runs (see :func:`grid_seeds`)."""
    out = {seed: fn([r for r in records if r["seed"] == seed]) for seed in grid_seeds(records, cell)}
    return {k: v for k, v in out.items() if v is not None}


def _success(task: str, value: Optional[float]) -> bool:
    better, target = TARGETS[task]
    return value is not None and (value >= target if better == "higher" else value <= target)


def _grid_runs(records: Sequence[Record], task: str, cell: str, lab: str) -> List[Record]:
    """One run per (scheme, gain, forget bias, seed) of the grid (a contrast run at a grid setting counts
    once: run IDs are unique)."""
    return select(records, task=task, cell=cell, label=lab)


def claims(records: Sequence[Record]) -> List[Claim]:
    """Per task, cell and norm against no norm: the spread over the init grid, the success rate and the cost
    of the declared bad init (10 seeds)."""
    out: List[Claim] = []
    for task in [t for t in TASKS if select(records, task=t)]:
        chance = chance_level(select(records, task=task))
        better = TARGETS[task][0]
        for cell in sorted({r["config"]["cell"] for r in select(records, task=task)}):
            base = _grid_runs(records, task, cell, "none")
            cname = "tanh RNN" if cell == "rnn" else cell.upper()
            for lab in sorted({_label(r) for r in select(records, task=task, cell=cell)} - {"none"}):
                runs = _grid_runs(records, task, cell, lab)
                if not set(grid_seeds(runs, cell)) & set(grid_seeds(base, cell)):  # no whole grid yet: the contrast only
                    out.extend(_worst_claim(records, task, cell, lab, chance))
                    continue
                spread = lambda rs: _range([_value(r, chance) for r in rs])  # noqa: E731
                rate = lambda rs: statistics.fmean(_success(task, _value(r, chance)) for r in rs)  # noqa: E731
                where = f"{task}, {cname}"
                d = DESIGNS[f"spread_{task}"]
                out.append(Claim(
                    key=f"spread_{task}:{cell}:{lab}", claim=f"{name(lab)} makes the {cname}'s final test metric "
                    f"depend less on the init (range over the init grid), at a tuned learning rate",
                    source="the CNN intuition (Ioffe & Szegedy 2015); Ba et al. 2016", task=where,
                    evidence=f"per seed: range with no norm minus range with {lab}",
                    test=paired(_per_seed(runs, spread, cell), _per_seed(base, spread, cell), "lower", d), design=d,
                    steps=steps_of(runs), runs=run_ids(runs, base)))
                d = DESIGNS[f"success_{task}"]
                out.append(Claim(
                    key=f"success_{task}:{cell}:{lab}", claim=f"{name(lab)} lets more of the {cname}'s inits reach "
                    f"the target ({'≥' if better == 'higher' else '≤'} {TARGETS[task][1]:g})",
                    source="the question (does normalization rescue a bad init?)", task=where,
                    evidence=f"per seed: success rate with {lab} minus with no norm", design=d,
                    test=paired(_per_seed(runs, rate, cell), _per_seed(base, rate, cell), "higher", d),
                    steps=steps_of(runs), runs=run_ids(runs, base)))
                out.extend(_worst_claim(records, task, cell, lab, chance))
    return out


def _worst_claim(records: Sequence[Record], task: str, cell: str, lab: str, chance: Optional[float]) -> List[Claim]:
    """The 10-seed contrast: the drop from the default init to the declared bad init, with the norm against none."""
    better = TARGETS[task][0]
    sign = 1.0 if better == "higher" else -1.0
    fb = lambda init: {"forget_bias": init["forget_bias"]} if cell == "lstm" and "forget_bias" in init else {}  # noqa: E731
    worst = WORST_INIT[cell]

    def drop(lab_: str) -> Tuple[Dict[int, Optional[float]], List[Record]]:
        good = select(records, task=task, cell=cell, label=lab_, init=DEFAULT_INIT["init"],
                      init_gain=DEFAULT_INIT["init_gain"], **fb(DEFAULT_INIT))
        bad = select(records, task=task, cell=cell, label=lab_, init=worst["init"], init_gain=worst["init_gain"],
                     **fb(worst))
        g, b = {r["seed"]: _value(r, chance) for r in good}, {r["seed"]: _value(r, chance) for r in bad}
        return {s: sign * (g[s] - b[s]) for s in g if s in b and None not in (g[s], b[s])}, good + bad

    with_norm, runs_a = drop(lab)
    without, runs_b = drop("none")
    if not with_norm or not without:
        return []
    d = DESIGNS[f"worst_{task}"]
    cname = "tanh RNN" if cell == "rnn" else cell.upper()
    fb = f", forget bias {worst['forget_bias']:g}" if cell == "lstm" and "forget_bias" in worst else ""
    return [Claim(
        key=f"worst_{task}:{cell}:{lab}", claim=f"{name(lab)} makes the {cname}'s bad init cost less against its "
        f"default init ({worst['init']}, gain {worst['init_gain']:g}{fb} against torch's default)",
        source="the question; Cooijmans et al. 2017; Ba et al. 2016", task=f"{task}, {cname}",
        evidence=f"per seed: (default minus worst) with no norm minus with {lab}",
        test=paired(with_norm, without, "lower", d), design=d, steps=steps_of(runs_a), runs=run_ids(runs_a, runs_b))]


def _label(r: Record) -> str:
    from recnorm.experiments.study import label

    return label(r)


def _range(values: List[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return max(vals) - min(vals) if len(vals) >= 2 else None


def iqr(values: Sequence[float]) -> float:
    """Interquartile range (the 'inclusive' quartiles of :func:`statistics.quantiles`)."""
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def heat_means(records: Sequence[Record], task: str, cell: str) -> Tuple[List[str], List[Tuple[str, float]],
                                                                        List[List[float]]]:
    """The heat map's cells: norm labels, (scheme, gain) columns, and per norm and column the mean final test
    metric over seeds (and forget biases); NaN where no run has finished."""
    chance = chance_level(select(records, task=task))
    cols = [(s, g) for s in SCHEMES for g in GAINS]
    labs = sorted({_label(r) for r in select(records, task=task, cell=cell)})
    means = []
    for lab in labs:
        row = []
        for s, g in cols:
            vals = [_value(r, chance) for r in select(records, task=task, cell=cell, label=lab, init=s, init_gain=g)]
            vals = [v for v in vals if v is not None]
            row.append(statistics.fmean(vals) if vals else math.nan)
        means.append(row)
    return labs, cols, means


def heat_map(records: Sequence[Record], task: str, cell: str) -> Tuple[List[str], List[List[str]]]:
    """Rows norm, columns (scheme, gain): the mean final test metric over seeds (and forget biases)."""
    return _heat_table(*heat_means(records, task, cell))


def _heat_table(labs: List[str], cols: List[Tuple[str, float]], means: List[List[float]]
                ) -> Tuple[List[str], List[List[str]]]:
    rows = [[name(lab)] + ["–" if math.isnan(v) else f"{v:.3f}" for v in row] for lab, row in zip(labs, means)]
    return ["norm"] + [f"{s} {g:g}" for s, g in cols], rows


def section(doc: Any, records: Sequence[Record], hints: Dict[str, Any]) -> List[Claim]:
    """Per task and cell: success rate, spread (range, IQR) across inits and the heat map, per norm."""
    doc.h(2, "Does normalization rescue a bad init?")
    doc.p("With both W_ih x and W_hh h normalized, the forward pass does not depend on the weights' gain (the norm "
          "divides it out), so insensitivity to the gain is nearly true by construction; what the gain still "
          "changes is the effective step size: a weight of scale g normalized away receives gradients scaled by "
          "1/g, so Adam's steps move it by a relative amount about lr/g. The learning rate is tuned per norm at "
          "the default init and then held, so a bad gain shows up as a too-large or too-small effective step.")
    for task in [t for t in TASKS if select(records, task=t)]:
        chance = chance_level(select(records, task=task))
        for cell in sorted({r["config"]["cell"] for r in select(records, task=task)}):
            doc.h(3, f"{task}, {cell}")
            _contrast_table(doc, records, task, cell, chance)
            _gain_table(doc, records, task, cell)
            rows = []
            for lab in sorted({_label(r) for r in select(records, task=task, cell=cell)}):
                runs = select(records, task=task, cell=cell, label=lab)
                seeds = set(grid_seeds(runs, cell))
                vals = [v for v in (_value(r, chance) for r in runs if r["seed"] in seeds) if v is not None]
                if not vals:
                    continue
                ok = sum(_success(task, v) for v in vals)
                rows.append([name(lab), str(len(seeds)), f"{ok} of {len(vals)}", f"{max(vals) - min(vals):.3f}",
                             f"{iqr(vals):.3f}" if len(vals) >= 2 else "–"])
            if not rows:
                doc.p("The init grid has not run for this cell yet (a seed counts once it holds every scheme, gain"
                      " and forget bias).")
                continue
            doc.table(["norm", "seeds with the whole grid", f"reached the target ({TARGETS[task][1]:g})",
                       "range over inits", "IQR over inits"], rows)
            heat = heat_means(records, task, cell)
            heat_figure(doc, task, cell, *heat)
            doc.table(*_heat_table(*heat), fold="The heat map's numbers (open)", fold_over=0)
    return claims(records)


def heat_figure(doc: Any, task: str, cell: str, labs: List[str], cols: List[Tuple[str, float]],
                means: List[List[float]]) -> None:
    """The heat map (:func:`heat_means`) as a picture: norms down, (scheme, gain) across, each cell coloured and
    labelled by its mean final test metric (MSE on a log scale), grey where no run has finished."""
    from recnorm.experiments import plots

    better, target = TARGETS[task]
    log = better == "lower"  # MSE spans decades
    shown = [[math.log10(v) if log and v > 0 else v for v in row] for row in means]
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(13, 0.55 * len(labs) + 1.9))
    cmap = plt.get_cmap("RdYlGn_r" if log else "RdYlGn").with_extremes(bad="#dddddd")
    image = ax.imshow(shown, aspect="auto", cmap=cmap)
    for i, row in enumerate(means):
        for j, v in enumerate(row):
            if not math.isnan(v):
                hit = v <= target if log else v >= target
                ax.text(j, i, f"{v:.0e}" if log else f"{v:.2f}", ha="center", va="center", fontsize=8.5,
                        fontweight="bold" if hit else "normal")
    ax.set_yticks(range(len(labs)))
    ax.set_yticklabels([name(lab) for lab in labs])
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{g:g}" for _, g in cols])
    ax.set_xlabel("init gain g, per scheme")
    for k, scheme in enumerate(SCHEMES):
        ax.text(k * len(GAINS) + (len(GAINS) - 1) / 2, -0.62, scheme, ha="center", va="bottom", fontsize=11)
        if k:
            ax.axvline(k * len(GAINS) - 0.5, color="white", lw=4)
    metric = "MSE" if log else "accuracy"
    fig.colorbar(image, ax=ax, pad=0.01, label=f"log10 mean final test {metric}" if log else f"mean final test {metric}")
    fig.tight_layout()
    doc.figure(fig, f"init_heat_{task}_{cell}",
               f"{task}, {cell}: mean final test {metric} over seeds{' and forget biases' if cell == 'lstm' else ''} "
               f"per norm and init (scheme, gain); bold where the mean reaches the target ({target:g}); grey: no "
               "finished run")


def _first_grad_norm(r: Record) -> Optional[float]:
    """The global gradient norm of ``r``'s first training step (before clipping), or None where not logged."""
    train = r.get("train") or {}
    steps, norms = train.get("step"), train.get("grad_norm")
    if not isinstance(steps, list) or not isinstance(norms, list) or not steps or steps[0] != 1:
        return None
    return norms[0] if isinstance(norms[0], (int, float)) else None


def _gain_table(doc: Any, records: Sequence[Record], task: str, cell: str) -> None:
    """Per norm: the median first-step gradient norm at torch's default init and at N(0, g^2/fan_in) for each
    gain that ran (over seeds and forget biases): what the gain still changes where the norm divides it out
    of the forward pass."""
    settings = [("default init", dict(init="default", init_gain=1.0))]
    settings += [(f"N(0, g²/fan_in), g = {g:g}", dict(init="normal", init_gain=g)) for g in GAINS]
    labs = sorted({_label(r) for r in select(records, task=task, cell=cell)})
    cells: Dict[Tuple[str, str], str] = {}
    for head, where in settings:
        for lab in labs:
            runs = select(records, task=task, cell=cell, label=lab, **where)
            vals = [v for v in (_first_grad_norm(r) for r in runs) if v is not None]
            diverged = sum(r.get("status") == "diverged" for r in runs)
            if vals:
                cells[lab, head] = f"{statistics.median(vals):.3g}" + (f" ({diverged} diverged)" if diverged else "")
            elif runs:
                cells[lab, head] = f"– ({diverged} of {len(runs)} diverged)" if diverged else "–"
    cols = [head for head, _ in settings if any((lab, head) in cells for lab in labs)]
    if len(cols) < 2:
        return
    doc.p("Median gradient norm of the first training step (before clipping at 1), over seeds and forget biases "
          "(a diverged run keeps no curve). Without a norm it grows by orders of magnitude with the gain; with a "
          "norm on both terms the forward pass ignores the gain and the normalized weights' gradients scale as "
          "1/g, while the output layer's and the norms' own parameters' do not, so the total falls by less, or "
          "hardly at all where those dominate. Adam divides each gradient by its own running scale, so its steps "
          "are about lr whatever g: relative to weights of scale g, a step of about lr/g. That effective step "
          "size is what the gain still changes for a normalized model.")
    doc.table(["norm"] + cols, [[name(lab)] + [cells.get((lab, head), "–") for head in cols] for lab in labs])


def _contrast_table(doc: Any, records: Sequence[Record], task: str, cell: str, chance: Optional[float]) -> None:
    """Per norm: the mean final test metric at the default init and at the declared bad init, over the seeds
    that have both."""
    worst, rows = WORST_INIT[cell], []
    for lab in sorted({_label(r) for r in select(records, task=task, cell=cell)}):
        runs = select(records, task=task, cell=cell, label=lab)
        good = {r["seed"]: _value(r, chance) for r in runs if _setting(r) == _init_setting(cell, DEFAULT_INIT)}
        bad = {r["seed"]: _value(r, chance) for r in runs if _setting(r) == _init_setting(cell, worst)}
        seeds = sorted(s for s in good if s in bad and None not in (good[s], bad[s]))
        if seeds:
            g, b = statistics.fmean(good[s] for s in seeds), statistics.fmean(bad[s] for s in seeds)
            ok_g, ok_b = sum(_success(task, good[s]) for s in seeds), sum(_success(task, bad[s]) for s in seeds)
            cost = (g - b) if TARGETS[task][0] == "higher" else (b - g)
            rows.append([name(lab), str(len(seeds)), f"{g:.4f} ({ok_g} reach the target)", f"{b:.4f} ({ok_b})",
                         f"{cost:+.4f}"])
    if rows:
        fb = f", forget bias {worst['forget_bias']:g}" if "forget_bias" in worst and cell == "lstm" else ""
        doc.table(["norm", "seeds", "default init: mean final test metric", f"bad init ({worst['init']}, gain "
                   f"{worst['init_gain']:g}{fb})", "cost of the bad init (positive: worse)"], rows)


QUESTIONS = (
    Question("normalization makes the model less sensitive to its init (rebuilt: tuned rate, to convergence)",
             tuple(f"{kind}_{task}:*" for kind in ("spread", "worst") for task in TASKS)),
    Question("normalization rescues a bad init (success rate against a target)", tuple(f"success_{task}:*" for task in TASKS)),
)

# The final runs keep the sweep's own seeds (0-4 on the grid, 0-9 for the contrasts; tuning used 100, 101).
STUDY = Study(name="init", sweep=sweep, designs=DESIGNS, claims=claims, section=section, questions=QUESTIONS,
              tuning=TUNING, tune_at=dict(DEFAULT_INIT))
