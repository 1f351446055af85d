"""A learning rate per arm: tune on a declared grid, choose by the validation split, rerun with fresh seeds.

An *arm* is one setting of a study minus its seed and its learning rate (cell x norm x every other field).
Tuning runs each arm of a study's sweep at every rate of a declared :class:`TuningGrid` (at least 4
log-spaced values spanning at least 30x) with at least 2 tuning seeds; :func:`choose` picks, per arm, the
rate with the best mean final *validation* metric over the tuning seeds (a diverged or failed run counts as
the worst possible score; ties go to the smaller rate) and keeps the whole tuning curve; a study whose claim
is about speed declares another score read from the validation curve (``Study.tuning_score``, a
:class:`recnorm.experiments.study.TuningScore`, for example the steps to a validation target), so that each arm
is tuned for what its claim says; :func:`final_spec`
then builds the study's final sweep: every arm at its chosen rate, with fresh seeds that share none with
the tuning seeds. The test split is never looked at while tuning.

Design note: why a plain grid on the existing sweep engine, not Optuna or Ray Tune (ASHA).

- **Resumable for free.** Every tuning run is an ordinary run of :func:`recnorm.experiments.sweep.run_sweep`:
  keyed by its config hash, skipped when finished, published to ``results/<study>-tune/runs.jsonl`` with
  the same provenance as every other run. A session killed half-way resumes by running the same command;
  an Optuna study would need its own storage (an SQLite file beside the sweep) and trial numbering that is
  not the run's identity.
- **Reproducible from the config alone.** A fixed grid is the same set of runs whatever order they finish
  in. Optuna's TPE and ASHA's promotions depend on the order in which trials complete, which differs with
  the number of workers and the machine's load, so two sessions would tune differently.
- **The same search budget for every arm.** Each arm gets exactly the same rates and seeds, so a difference
  between arms is not a difference in how hard each was searched; and a tuning curve on a fixed grid is
  what the report shows (chosen rate plus the whole curve, and a warning when the best rate sits at an edge
  of the grid).
- **2 cores.** ASHA pays off when many trials run in parallel and most are stopped early; with 2 workers
  and 4-6 rates per arm there is little to stop, and the early-stopping rule of the final runs (patience on
  validation, :mod:`recnorm.experiments.train`) already ends hopeless runs. The grid still runs on the Ray
  backend unchanged (``--backend ray``), because it is a sweep.
- **No new dependency.**

Commands (for a study whose file declares ``tuning``, its :class:`TuningGrid`, and ``final_seeds``):
``python -m recnorm.experiments.tune NAME --workers 2`` runs the tuning sweep into ``runs/NAME-tune``
(published to ``results/NAME-tune/runs.jsonl``) and writes each arm's chosen rate and tuning curve to
``results/NAME-tune/choices.json``; ``python -m recnorm.experiments.tune NAME --final --workers 2`` then runs
the final sweep into ``runs/NAME`` (published to ``results/NAME/runs.jsonl``). Both resume where a killed
invocation stopped; ``--smoke`` runs the study's smoke variant (one step per run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from recnorm.experiments.config import EXECUTION_FIELDS, RunConfig
from recnorm.experiments.results import model_label, read_json, write_json_atomic
from recnorm.experiments.study import MIN_RATES, MIN_SEEDS, MIN_SPAN, TuningGrid, TuningScore
from recnorm.experiments.sweep import SweepSpec, flatten_config

__all__ = ["TuningGrid", "TuningScore", "ArmChoice", "arm_key", "tuning_spec", "choose", "final_spec", "write_choices",
           "read_choices", "tuning_table", "tune_study", "run_final", "CHOICES_FILE", "MIN_RATES", "MIN_SPAN", "MIN_SEEDS"]

logger = logging.getLogger(__name__)

CHOICES_FILE = "choices.json"


@dataclasses.dataclass
class ArmChoice:
    """One arm's tuning outcome: its chosen rate, its score there and the whole tuning curve.

    Attributes:
        arm: the arm's key (:func:`arm_key`).
        label: the arm in words (model label plus the fields that vary between arms).
        lr: the chosen learning rate.
        score: the mean validation metric at ``lr`` over the tuning seeds.
        curve: ``{lr: [validation metric per tuning seed (None: diverged or failed)]}``.
        at_edge: the chosen rate is the smallest or largest of the grid (the grid may be too narrow).
        metric, higher_is_better: what was compared.
        run_ids: the tuning runs behind the choice.
        scored_by: the :class:`TuningScore` the rates were compared on, in words (None: the mean final
            validation metric, and ``curve`` holds that metric).
    """

    arm: str
    label: str
    lr: float
    score: Optional[float]
    curve: Dict[float, List[Optional[float]]]
    at_edge: bool
    metric: str
    higher_is_better: bool
    run_ids: List[str]
    scored_by: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["curve"] = {repr(k): v for k, v in self.curve.items()}
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ArmChoice":
        data = dict(data)
        data["curve"] = {float(k): v for k, v in data["curve"].items()}
        return cls(**data)


def arm_key(config: RunConfig, ignore: Sequence[str] = ()) -> str:
    """The arm of a run: a hash of its config without the seed, the learning rate, the execution fields and
    the fields in ``ignore`` (those a study tunes at one fixed value and then varies at the chosen rate)."""
    data = {k: v for k, v in config.to_dict().items() if k not in ("seed", "lr", *EXECUTION_FIELDS, *ignore)}
    return hashlib.sha1(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:10]


def tuning_spec(spec: SweepSpec, grid: TuningGrid, at: Optional[Dict[str, Any]] = None) -> SweepSpec:
    """The tuning sweep of ``spec``: every arm at every rate of ``grid`` with the grid's tuning seeds.

    ``at`` tunes at one value of fields the sweep varies (the init study tunes each norm at the default
    init, then holds that rate while the init varies): a field of ``at`` that a grid varies is fixed there."""
    at = at or {}
    grids = [{**g, **{k: [v] for k, v in at.items() if k in g}, "lr": list(grid.lrs), "seed": list(grid.seeds)}
             for g in (spec.grids or [{}])]
    return SweepSpec(name=spec.name + "-tune", base=spec.base, grids=grids,
                     description=f"[tuning: lr {list(grid.lrs)}, seeds {list(grid.seeds)}] " + spec.description,
                     imports=list(spec.imports), report=dict(spec.report), published=dict(spec.published))


def _score(record: Dict[str, Any], score: Optional[TuningScore] = None) -> Optional[float]:
    """The final validation metric of a finished run, or ``score``'s value of it (None: diverged, failed or
    missing)."""
    if record.get("status") != "ok":
        return None
    if score is not None:
        value = score.value(record)
    else:
        value = ((record.get("final") or {}).get("valid") or {}).get(record["metric"])
    return None if value is None or not math.isfinite(value) else float(value)


def _arm_label(config: Dict[str, Any], varying: Sequence[str]) -> str:
    flat = flatten_config(config)
    extra = [f"{k}={flat[k]}" for k in varying if k in flat and k not in ("norm", "norm_kwargs.gain_init")]
    return ", ".join([model_label(config)] + extra)


def choose(records: Sequence[Dict[str, Any]], grid: TuningGrid, ignore: Sequence[str] = (),
           score: Optional[TuningScore] = None) -> Dict[str, ArmChoice]:
    """Per arm, the rate of ``grid`` with the best mean validation metric over the tuning seeds (or the best
    mean ``score``, in its own direction, when a study declares one).

    A run that diverged or failed, or a (rate, seed) pair with no run, scores the worst possible value, so
    a rate that diverges for one seed is never chosen over one that trains for both. Ties go to the smaller
    rate. Raises ValueError when a record's rate or seed is not on the grid (a tuning sweep of another grid).
    """
    arms: Dict[str, List[Dict[str, Any]]] = {}
    for r in records:
        config = RunConfig.from_dict(r["config"])
        if config.lr not in grid.lrs or config.seed not in grid.seeds:
            raise ValueError(f"choose: run {r['run_id']} has lr {config.lr} and seed {config.seed}; expected a rate "
                             f"in {list(grid.lrs)} and a seed in {list(grid.seeds)}")
        arms.setdefault(arm_key(config, ignore), []).append(r)
    flats = [flatten_config(r["config"]) for r in records]
    varying = sorted(k for k in (flats[0] if flats else {}) if k not in ("lr", "seed", *EXECUTION_FIELDS)
                     and len({repr(f.get(k)) for f in flats}) > 1)
    out: Dict[str, ArmChoice] = {}
    for key, runs in arms.items():
        higher = bool(runs[0]["higher_is_better"]) if score is None else score.better == "higher"
        worst = -math.inf if higher else math.inf
        curve: Dict[float, List[Optional[float]]] = {}
        for lr in grid.lrs:
            by_seed = {r["seed"]: _score(r, score) for r in runs if r["config"]["lr"] == lr}
            curve[lr] = [by_seed.get(s) for s in grid.seeds]
        means = {lr: statistics.fmean(worst if v is None else v for v in vals) for lr, vals in curve.items()}
        sign = 1.0 if higher else -1.0
        best = max(grid.lrs, key=lambda lr: (sign * means[lr], -lr))
        best_mean = means[best] if math.isfinite(means[best]) else None
        out[key] = ArmChoice(arm=key, label=_arm_label(runs[0]["config"], varying), lr=best, score=best_mean,
                             curve=curve, at_edge=best in (grid.lrs[0], grid.lrs[-1]), metric=runs[0]["metric"],
                             higher_is_better=higher, run_ids=sorted(r["run_id"] for r in runs),
                             scored_by=None if score is None else score.name)
        if out[key].at_edge:
            logger.warning("tuning: arm %s chose lr %g at the edge of the grid %s", out[key].label, best, grid.lrs)
    return out


def final_spec(spec: SweepSpec, choices: Dict[str, ArmChoice], seeds: Optional[Sequence[int]] = None,
               grid: Optional[TuningGrid] = None, ignore: Sequence[str] = ()) -> SweepSpec:
    """The final sweep: every run of ``spec`` at its arm's chosen rate, with ``seeds`` for every arm (None:
    the seeds ``spec`` gives each of its runs, which must then be fresh).

    Raises ValueError when a seed of the final runs was a tuning seed or an arm of ``spec`` has no choice."""
    configs = spec.expand()
    used = set(seeds) if seeds is not None else {c.seed for c in configs}
    if grid is not None and used & set(grid.seeds):
        raise ValueError(f"final_spec: expected fresh seeds, got {sorted(used & set(grid.seeds))} that tuning used")
    grids, seen = [], set()
    for config in configs:
        key = arm_key(config, ignore)
        if key not in choices:
            raise ValueError(f"final_spec: arm {model_label(config.to_dict())} ({key}) has no tuned rate; "
                             f"expected one of {sorted(choices)}")
        if seeds is not None and arm_key(config) in seen:  # one grid per arm, crossed with ``seeds``
            continue
        seen.add(arm_key(config))
        fields = {k: [v] for k, v in config.to_dict().items() if k not in ("seed", "lr", "threads")}
        grids.append({**fields, "lr": [choices[key].lr], "seed": list(seeds) if seeds is not None else [config.seed]})
    return SweepSpec(name=spec.name, base=spec.base, grids=grids,
                     description="[learning rate tuned per arm] " + spec.description, imports=list(spec.imports),
                     report=dict(spec.report), published=dict(spec.published)).compacted()


_CELLS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def arm_words(label: str) -> str:
    """An arm's label (:class:`ArmChoice`) in words: the norm by its name (``"none+between=batch"`` -> "no
    norm, BN between layers"), the cell and task as words, and only the fields that tell arms apart
    (``between_layers`` is already in the norm's name; split sizes and an unset forget bias are dropped)."""
    from recnorm.experiments.study import name

    head, *extra = label.split(", ")
    words = [name(head)]
    for item in extra:
        key, _, value = item.partition("=")
        if key == "between_layers" or key.startswith("task_options.") and key.endswith("_size") or value == "None":
            continue
        if key == "cell":
            words.append(_CELLS.get(value, value))
        elif key == "task":
            words.append(value)
        elif key == "task_options.length":
            words.append(f"T = {value}")
        elif key == "forget_bias":
            words.append(f"forget bias {float(value):g}")
        else:
            words.append(item)
    return " · ".join(words)


def tuning_table(choices: Dict[str, ArmChoice], grid: TuningGrid) -> List[str]:
    """Markdown lines: per arm, the chosen rate and its tuning curve (mean validation metric per rate; ✗ for
    a rate where a tuning seed diverged or failed; an edge choice is flagged)."""
    out = ["| arm | chosen lr | " + " | ".join(f"lr {lr:g}" for lr in grid.lrs) + " |",
           "|---|---|" + "---|" * len(grid.lrs)]
    for c in sorted(choices.values(), key=lambda c: c.label):
        cells = []
        for lr in grid.lrs:
            vals = c.curve.get(lr, [])
            mean = statistics.fmean(v for v in vals if v is not None) if any(v is not None for v in vals) else None
            value = "–" if mean is None else f"{mean:.3f}" if c.scored_by is None else f"{mean:.4g}"
            text = "✗" if mean is None else value + (" ✗" if None in vals else "")
            cells.append(f"**{text}**" if lr == c.lr else text)
        edge = " (edge of the grid)" if c.at_edge else ""
        out.append(f"| {arm_words(c.label)} | {c.lr:g}{edge} | " + " | ".join(cells) + " |")
    return out


def write_choices(path: str, choices: Dict[str, ArmChoice], grid: TuningGrid) -> None:
    """Write the chosen rates and tuning curves (``results/<study>-tune/choices.json``)."""
    write_json_atomic(path, {"grid": grid.to_dict(), "arms": [c.to_dict() for c in choices.values()]})


def read_choices(path: str) -> Tuple[Dict[str, ArmChoice], TuningGrid]:
    data = read_json(path)
    grid = TuningGrid(tuple(data["grid"]["lrs"]), tuple(data["grid"]["seeds"]))
    return {a["arm"]: ArmChoice.from_dict(a) for a in data["arms"]}, grid


def tune_study(study: Any, runs: str = "runs", results: str = "results", workers: int = 1, smoke: bool = False,
               backend: Any = None) -> Dict[str, ArmChoice]:
    """Run ``study``'s tuning sweep (resumable) and write its choices; return them."""
    import os

    from recnorm.experiments.sweep import run_sweep

    if study.tuning is None:
        raise ValueError(f"study {study.name!r} declares no tuning grid; expected Study(tuning=TuningGrid(...))")
    spec = tuning_spec(study.spec(smoke=smoke), study.tuning, study.tune_at)
    out, published = os.path.join(runs, spec.name), os.path.join(results, spec.name)
    outcome = run_sweep(spec, out, workers=workers, backend=backend, results_dir=published)
    if not outcome.finished:
        raise RuntimeError(f"tuning sweep {spec.name}: {len(outcome.failed)} run(s) failed; run the command again")
    from recnorm.experiments.results import load_records

    choices = choose(load_records(os.path.join(published, "runs.jsonl")), study.tuning, tuple(study.tune_at),
                     getattr(study, "tuning_score", None))
    write_choices(os.path.join(published, CHOICES_FILE), choices, study.tuning)
    return choices


def run_final(study: Any, runs: str = "runs", results: str = "results", workers: int = 1, smoke: bool = False,
              backend: Any = None) -> Any:
    """Run ``study``'s final sweep at the rates its tuning chose, with its fresh ``final_seeds``."""
    import os

    from recnorm.experiments.sweep import run_sweep

    name = study.spec(smoke=smoke).name
    choices, grid = read_choices(os.path.join(results, name + "-tune", CHOICES_FILE))
    spec = final_spec(study.spec(smoke=smoke), choices, study.final_seeds or None, grid, tuple(study.tune_at))
    return run_sweep(spec, os.path.join(runs, name), workers=workers, backend=backend,
                     results_dir=os.path.join(results, name))


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    from recnorm.experiments.studies import get_study

    p = argparse.ArgumentParser(prog="python -m recnorm.experiments.tune", description=__doc__.splitlines()[0])
    p.add_argument("study")
    p.add_argument("--final", action="store_true", help="run the final sweep at the chosen rates")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--runs", default="runs")
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    study = get_study(args.study)
    if args.final:
        return 0 if run_final(study, args.runs, args.results, args.workers, args.smoke).finished else 1
    for c in tune_study(study, args.runs, args.results, args.workers, args.smoke).values():
        what = c.scored_by or f"valid {c.metric}"
        score = "none (every run failed)" if c.score is None else f"{c.score:.4g}"
        logger.info("%s: lr %g (%s %s)%s", c.label, c.lr, what, score, " AT THE GRID'S EDGE" if c.at_edge else "")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
