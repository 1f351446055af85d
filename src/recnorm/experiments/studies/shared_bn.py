"""Naive shared-over-time BN, its effects taken apart.

Shared BN normalizes each step with that step's batch statistics, exactly as per-step BN does; with the same
γ0 and seed the two train identically (the same batches, the same trajectory), and they differ only at
evaluation, where shared BN has one population statistic for every step. So "shared BN fails" splits into:

- the **training effect**: the training loss of the two on the same steps; expected *equivalent* (the runs
  of 2026-12-05 have bit-identical training curves, pair by pair);
- the **evaluation effect**: the same shared-BN model evaluated with one population statistic for all steps
  (``final["test"]``) against one per step (``final["test_per_step_statistics"]``: its weights evaluated in a
  per-step BN model);
- the **selection effect**, found in those runs: early stopping validates shared BN with its shared
  statistic, so it picks a different checkpoint; per-step BN against shared BN, both evaluated with exact
  per-step statistics, each at its own checkpoint. (This was first declared as the training effect; the
  identical training curves showed it is not.)
"""

from __future__ import annotations

import statistics
from typing import List, Optional, Sequence, Tuple

from recnorm.experiments.config import RunConfig
from recnorm.experiments.study import (
    Claim, Design, Question, Record, Study, TuningGrid, by_seed, final, paired, run_ids, select, steps_of,
    task_name)
from recnorm.experiments.sweep import SweepSpec

GAINS = [0.1, 1.0]
SEEDS = list(range(10))
#: 50 points of each training curve in results/shared_bn*/runs.jsonl, without the per-step statistics.
PUBLISHED = {"max_points": 50, "drop": ["diagnostics.batch_stats", "diagnostics.population_stats"]}
TUNING = TuningGrid((9.487e-5, 3e-4, 9.487e-4, 3e-3, 9.487e-3, 3e-2, 9.487e-2), seeds=(100, 101))  # as the init study's


def sweep(smoke: bool = False) -> SweepSpec:
    """Shared BN's training and evaluation effects: a one-layer LSTM(64) on row-wise Fashion-MNIST
    (8000/1000/2000), per-step BN and naive shared BN at γ0 = 0.1 and 1, 10 seeds: 40 final runs. The
    learning rate is tuned for per-step BN at each γ0 (7 log-spaced rates 9.5e-5 .. 9.5e-2, 2 tuning seeds:
    28 runs) and shared BN uses the same rate, so the two train alike; Adam, batch 64, clipping at 1; to
    convergence: validation every 100 steps, patience 5, at most 5000 steps.

    Estimated cost: 68 runs x about 25 s (the init study's Fashion-MNIST LSTM runs) / 2 workers = 15 minutes.

    Command: ``python -m recnorm.experiments.tune shared_bn --workers 2`` then
    ``python -m recnorm.experiments.tune shared_bn --final --workers 2``, then ``recnorm evidence``.
    Running time: about 15 minutes on 2 CPU cores (estimated); ``--smoke``: seconds.
    """
    base = RunConfig(task="fashion_rows", task_options={"train_size": 8000, "valid_size": 1000, "test_size": 2000},
                     cell="lstm", hidden_size=64, optimizer="adam", lr=1e-3, clip=1.0, batch_size=64, steps=5000,
                     eval_every=100, patience=5, eval_batch_size=500, diag_every=None, popstat_batches=8)
    seeds = SEEDS
    if smoke:
        base = base.replace(task_options={"train_size": 32, "valid_size": 16, "test_size": 16}, hidden_size=8,
                            steps=1, eval_every=1, eval_batches=1, eval_batch_size=16, batch_size=16,
                            popstat_batches=1, patience=1)
        seeds = [0, 1]
    return SweepSpec(name="shared_bn" + ("-smoke" if smoke else ""), base=base, published=PUBLISHED,
                     grids=[{"norm": ["batch", "shared_batch"], "norm_kwargs.gain_init": GAINS, "seed": seeds}],
                     description=("[smoke] " if smoke else "") + "Shared BN against per-step BN at the same γ0: "
                                 "training effect and evaluation effect.")


DESIGNS = {
    "shared_train": Design("mean training loss over the steps both runs logged (same seed, hence the same batches): "
                           "shared BN's minus per-step BN's", "lower", budget="convergence", margin=0.01, tuned=True,
                           patience=5, min_seeds=len(SEEDS)),
    "shared_select": Design("final test accuracy, both evaluated with exact per-step population statistics, at the "
                            "checkpoint each run's own validation picked", "higher", budget="convergence", margin=0.01,
                            tuned=True, patience=5, min_seeds=len(SEEDS)),
    "shared_eval": Design("final test accuracy of the shared-BN model: one statistic per step minus one for all "
                          "steps", "higher", budget="convergence", margin=0.01, tuned=True, patience=5,
                          min_seeds=len(SEEDS)),
}


def _per_step(r: Record):
    return final(r, "test_per_step_statistics")


def _common_losses(a: Record, b: Record) -> Tuple[Optional[float], Optional[float]]:
    """The mean training loss of ``a`` and of ``b`` over the steps both logged (published curves are thinned,
    so the common steps are a subset); (None, None) when they share none."""
    ta, tb = a.get("train") or {}, b.get("train") or {}
    la = {s: v for s, v in zip(ta.get("step") or [], ta.get("loss") or []) if v is not None}
    lb = {s: v for s, v in zip(tb.get("step") or [], tb.get("loss") or []) if v is not None}
    common = sorted(set(la) & set(lb))
    if not common:
        return None, None
    return statistics.fmean(la[s] for s in common), statistics.fmean(lb[s] for s in common)


def claims(records: Sequence[Record]) -> List[Claim]:
    """Per γ0: the training effect (training loss on the same steps; with the same seed the two see the same
    batches and, sharing nothing in training, follow the same trajectory), the selection effect (early
    stopping on shared BN's own validation, which uses the shared statistic, picks its checkpoint), and the
    evaluation effect (the same shared model with one statistic per step against one for all steps)."""
    out: List[Claim] = []
    task, steps = task_name(records), steps_of(records)
    for gain in sorted({r["config"]["norm_kwargs"].get("gain_init") for r in records} - {None}):
        per_step = select(records, norm="batch", norm_kwargs__gain_init=gain)
        shared = select(records, norm="shared_batch", norm_kwargs__gain_init=gain)
        if not per_step or not shared:
            continue
        pairs = {r["seed"]: (r, q) for r in per_step for q in shared if q["seed"] == r["seed"]}
        losses = {seed: _common_losses(a, b) for seed, (a, b) in pairs.items()}
        d = DESIGNS["shared_train"]
        out.append(Claim(
            key=f"shared_train:{gain:g}", claim=f"sharing BN statistics over time hurts training (γ0 = {gain:g}; training "
            "loss on the same steps)",
            source="Laurent et al. 2016; Cooijmans et al. 2017", task=f"{task}, γ0 {gain:g}",
            evidence="per seed: shared BN's mean training loss minus per-step BN's, over the steps both logged",
            test=paired({k: v[0] for k, v in losses.items()}, {k: v[1] for k, v in losses.items()}, "lower", d),
            design=d, steps=steps, runs=run_ids(per_step, shared)))
        d = DESIGNS["shared_select"]
        out.append(Claim(
            key=f"shared_select:{gain:g}", claim=f"early stopping on shared BN's own validation picks a worse checkpoint "
            f"(γ0 = {gain:g}; both evaluated with exact per-step statistics)",
            source="this study (the shared statistic also drives the choice of checkpoint)", task=f"{task}, γ0 {gain:g}",
            evidence="per seed: per-step BN minus shared BN, both with per-step population statistics, each at the "
                     "checkpoint its own validation picked",
            test=paired(by_seed(per_step, final), by_seed(shared, _per_step), "higher", d), design=d, steps=steps,
            runs=run_ids(per_step, shared)))
        d = DESIGNS["shared_eval"]
        out.append(Claim(
            key=f"shared_eval:{gain:g}", claim=f"one population statistic for all steps hurts the shared-BN model at "
            f"evaluation (γ0 = {gain:g}; against one statistic per step)",
            source="Cooijmans et al. 2017 (Sec. 3: statistics differ per step)", task=f"{task}, γ0 {gain:g}",
            evidence="per seed, same model: per-step population statistics minus one shared statistic",
            test=paired(by_seed(shared, _per_step), by_seed(shared, final), "higher", d), design=d, steps=steps,
            runs=run_ids(shared)))
    return out


QUESTIONS = (
    Question("naive shared BN fails: the training effect (rebuilt)", ("shared_train:*",)),
    Question("naive shared BN fails: the evaluation effect (rebuilt)", ("shared_eval:*", "shared_select:*")),
)

STUDY = Study(name="shared_bn", sweep=sweep, designs=DESIGNS, claims=claims, questions=QUESTIONS, tuning=TUNING,
              tune_at={"norm": "batch"})
