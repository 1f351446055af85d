"""The naive horizontal BN failure: statistics shared over time, in a tanh RNN and an LSTM."""

from __future__ import annotations

from typing import List, Sequence

from recnorm.experiments.config import RunConfig
from recnorm.experiments.study import (
    Claim, Design, Question, Record, Study, auc, compare, grid, run_ids, select, smoke_variant, steps_of, task_name)
from recnorm.experiments.sweep import SweepSpec


def sweep(smoke: bool = False) -> SweepSpec:
    """The naive horizontal BN failure (Laurent et al. 2016; Cooijmans et al. 2017, Fig. 1): gradient flow
    through time in a tanh RNN and an LSTM.

    Sequential 8x8 digits (T = 64): no norm, naive shared BN (statistics shared over time), per-step BN with
    γ0 = 1 and 0.1, and sequence-wise (vertical) BN, for a tanh RNN(64) and an LSTM(64); h0 noise 0.1,
    Adam 1e-3, clipping at 1, 300 steps with gradient-flow diagnostics every 50 steps, 5 seeds: 50 runs.
    The report's gradient-flow plot shows ||dL/dh_t|| vs t per variant; the clipping table counts how often
    the gradient norm exceeded 1.

    Command: ``recnorm compare --preset horizontal --workers 2 --out runs/horizontal --results results/horizontal``, then ``recnorm report results/horizontal --out docs/horizontal``.
    Running time: about 5 minutes on 2 CPU cores (measured 4 min 21 s with ``--workers 2``; re-run in
    3 min 44 s); ``--smoke``: about 25 s.
    """
    base = RunConfig(task="digits", cell="rnn", hidden_size=64, init="orthogonal", h0_noise=0.1,
                     optimizer="adam", lr=1e-3, clip=1.0, batch_size=64, steps=300, eval_every=50,
                     eval_batch_size=250, diag_every=50, popstat_batches=10)
    variants = [{"norm": None}, {"norm": "shared_batch"}, {"norm": "batch", "norm_kwargs.gain_init": 1.0},
                {"norm": "batch", "norm_kwargs.gain_init": 0.1}, {"norm": "sequence_batch"}]
    spec = SweepSpec(
        name="horizontal",
        description=("Naive horizontal batch norm (statistics shared over time) against per-step BN (γ0 = 1 and "
                     "0.1), vertical sequence-wise BN and no norm, in a tanh RNN and an LSTM on sequential "
                     "digits (T = 64): gradient flow through time and training."),
        base=base, grids=grid(variants, cell=["rnn", "lstm"], seed=[0, 1, 2, 3, 4]),
        report={"reference": {"cell": "rnn"}})
    return smoke_variant(spec, {"train_size": 32, "valid_size": 16, "test_size": 16}) if smoke else spec


DESIGNS = {"shared_hurts": Design("final test accuracy", "higher", margin=0.01)}


def claims(records: Sequence[Record]) -> List[Claim]:
    out = []
    task, steps, d = task_name(records), steps_of(records), DESIGNS["shared_hurts"]
    for cell in sorted({r["config"]["cell"] for r in records}):
        cname = "tanh RNN" if cell == "rnn" else cell.upper()
        none, shared = {"label": "none", "cell": cell}, {"label": "shared_batch", "cell": cell}
        out.append(Claim(
            key=f"shared_hurts:{cell}", claim=f"naive BN with statistics shared over time is worse than no norm at the end of the step budget in "
                                              f"{'an' if cname == 'LSTM' else 'a'} {cname} (final test accuracy)",
            source="Laurent et al. 2016; Cooijmans et al. 2017", task=f"{task}, {cname}",
            evidence="per seed: no norm minus shared BN", test=compare(records, none, shared, d), design=d, steps=steps,
            other=("mean valid accuracy over training", compare(records, none, shared, d, auc)),
            runs=run_ids(select(records, **none), select(records, **shared))))
    return out


QUESTIONS = (Question("naive BN with statistics shared over time fails", ("shared_hurts:*",)),)

STUDY = Study(name="horizontal", sweep=sweep, designs=DESIGNS, claims=claims, questions=QUESTIONS)
