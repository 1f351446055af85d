"""Naive shared-over-time BN as two claims.

Shared BN normalizes each step with that step's batch statistics, exactly as per-step BN does; with the same
γ0 the two train identically, and they differ only at evaluation, where shared BN has one population
statistic for every step. So "shared BN fails" splits into:

- the **training effect**: shared against per-step BN at the same γ0, both evaluated with exact per-step
  population statistics (the shared model's weights evaluated in a per-step BN model,
  ``final["test_per_step_statistics"]``); expected *equivalent*;
- the **evaluation effect**: the same shared-BN model evaluated with one population statistic for all steps
  (``final["test"]``) against one per step.
"""

from __future__ import annotations

from typing import List, Sequence

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
    "shared_train": Design("final test accuracy, both evaluated with exact per-step population statistics", "higher",
                           budget="convergence", margin=0.01, tuned=True, patience=5),
    "shared_eval": Design("final test accuracy of the shared-BN model: one statistic per step minus one for all "
                          "steps", "higher", budget="convergence", margin=0.01, tuned=True, patience=5),
}


def _per_step(r: Record):
    return final(r, "test_per_step_statistics")


def claims(records: Sequence[Record]) -> List[Claim]:
    out: List[Claim] = []
    task, steps = task_name(records), steps_of(records)
    for gain in sorted({r["config"]["norm_kwargs"].get("gain_init") for r in records} - {None}):
        per_step = select(records, norm="batch", norm_kwargs__gain_init=gain)
        shared = select(records, norm="shared_batch", norm_kwargs__gain_init=gain)
        if not per_step or not shared:
            continue
        d = DESIGNS["shared_train"]
        out.append(Claim(
            key=f"shared_train:{gain:g}", claim=f"sharing BN statistics over time during training hurts (γ0 = {gain:g}; "
            "both models evaluated with exact per-step statistics)",
            source="Laurent et al. 2016; Cooijmans et al. 2017", task=f"{task}, γ0 {gain:g}",
            evidence="per seed: per-step BN minus shared BN, both with per-step population statistics",
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
    Question("naive shared BN fails: the evaluation effect (rebuilt)", ("shared_eval:*",)),
)

STUDY = Study(name="shared_bn", sweep=sweep, designs=DESIGNS, claims=claims, questions=QUESTIONS, tuning=TUNING,
              tune_at={"norm": "batch"})
