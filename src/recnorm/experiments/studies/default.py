"""The main study: does normalization help an LSTM converge faster and rely less on a good init?"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from recnorm.experiments.config import RunConfig
from recnorm.experiments.study import (
    Claim, Design, Question, Record, Study, auc, chance_level, compare, final, grid, name, paired, run_ids, select,
    smoke_variant, steps_of, task_name)
from recnorm.experiments.sweep import SweepSpec

NORMS_ALL: List[Dict] = [
    {"norm": None},
    {"norm": "layer"},
    {"norm": "batch", "norm_kwargs.gain_init": 0.1},
    {"norm": "sequence_batch"},
    {"norm": "shared_batch"},
]


def sweep(smoke: bool = False) -> SweepSpec:
    """The main comparison: does normalization help an LSTM converge faster and make it less sensitive to
    the weight initialization?

    Row-wise Fashion-MNIST (T = 28 rows of 28 pixels; 8000 training images, 1000 valid, 2000 test), a
    one-layer LSTM with 64 units, Adam 2e-3, batch 64, gradient clipping at 1, 200 steps (1.6 epochs of
    the subset), validation every 25 steps. Normalizations: none, layer, per-step batch (Cooijmans,
    γ0 = 0.1), sequence-wise batch on the input term (Laurent) and naive shared batch; initialization
    orthogonal (zero biases) with gains 0.25, 1 and 4; 5 seeds (with 3 seeds a paired t-test needs a very
    large effect): 75 runs.

    Command: ``recnorm compare`` (or ``recnorm compare --preset default --workers 2 --out runs/compare``); its
    published runs come from ``recnorm compare --workers 2 --out runs/compare --results results/default`` and
    its page from ``recnorm report results/default --out docs/report`` (re-run in 2 min 56 s, every metric
    identical to the earlier run's on the same kernels, which the runs pin as ``kernel="legacy"``).
    Running time: about 4 minutes on 2 CPU cores (measured 3 min 35 s with ``--workers 2``, the per-step
    norms on the fused kernel; evaluation with exactly recomputed statistics takes a good part of each
    batch-norm run); ``--smoke``: about 20 s.
    """
    spec = SweepSpec(
        name="default",
        description=("Row-wise Fashion-MNIST, 1-layer LSTM(64): no norm vs layer norm vs per-step batch norm "
                     "(γ0 = 0.1) vs sequence-wise batch norm vs naive shared batch norm, orthogonal init with "
                     "gains 0.25/1/4, 5 seeds. Tests claims (i) faster convergence and (ii) less sensitivity "
                     "to the init; also (iii) naive shared BN."),
        base=RunConfig(task="fashion_rows",
                       task_options={"train_size": 8000, "valid_size": 1000, "test_size": 2000},
                       cell="lstm", hidden_size=64, init="orthogonal", optimizer="adam", lr=2e-3,
                       clip=1.0, batch_size=64, steps=200, eval_every=25, eval_batch_size=500, diag_every=100,
                       popstat_batches=8),
        grids=grid(NORMS_ALL, init_gain=[0.25, 1.0, 4.0], seed=[0, 1, 2, 3, 4]),
        report={"reference": {"init_gain": 1.0}},
    )
    return smoke_variant(spec, {"train_size": 64, "valid_size": 32, "test_size": 32}) if smoke else spec


DESIGNS = {
    "faster": Design("mean valid accuracy over training (area under the validation curve)", "higher", margin=0.01),
    "init": Design("range of final test accuracy over the init gains, per seed", "lower", margin=0.01),
    "shared_hurts": Design("final test accuracy", "higher", margin=0.01),
}
CNN_INTUITION = "Cooijmans et al. 2017; Ba et al. 2016; the CNN intuition (Ioffe & Szegedy 2015)"


def _spread(records: Sequence[Record], lab: str) -> Dict[int, Optional[float]]:
    """Per seed: the range of the final test accuracy over the gains (a failed run counts as chance)."""
    out: Dict[int, Optional[float]] = {}
    chance = chance_level(records)
    for seed in sorted({r["seed"] for r in records}):
        vals = [final(r) for r in select(records, label=lab, seed=seed)]
        vals = [chance if v is None else v for v in vals]
        out[seed] = (max(vals) - min(vals)) if len(vals) >= 2 and None not in vals else None
    return out


def claims(records: Sequence[Record]) -> List[Claim]:
    """Convergence speed and init sensitivity at gain 1, and naive shared BN."""
    out = []
    task, steps = task_name(records), steps_of(records)
    gains = sorted({r["config"]["init_gain"] for r in records})
    ref = 1.0 if 1.0 in gains else gains[len(gains) // 2]
    arm = lambda lab: {"label": lab, "init_gain": ref}  # noqa: E731
    for lab in ("batch γ=0.1", "layer", "sequence_batch", "shared_batch"):
        if not select(records, label=lab):
            continue
        d = DESIGNS["faster"]
        out.append(Claim(
            key=f"faster:{lab}", claim=f"{name(lab)} makes the LSTM converge faster than no norm (mean valid accuracy "
                                       f"over training)",
            source=CNN_INTUITION, task=f"{task}, gain {ref:g}", evidence=f"per seed: {lab} minus no norm",
            test=compare(records, arm(lab), arm("none"), d, auc), design=d, steps=steps,
            other=("final test accuracy", compare(records, arm(lab), arm("none"), d)),
            runs=run_ids(select(records, **arm(lab)), select(records, **arm("none")))))
        if len(gains) >= 2:
            d = DESIGNS["init"]
            out.append(Claim(
                key=f"init:{lab}", claim=f"{name(lab)} makes the LSTM less sensitive to the init gain (range of final "
                                         f"test accuracy over gains {', '.join(f'{g:g}' for g in gains)})",
                source="the CNN intuition (Ioffe & Szegedy 2015); Ba et al. 2016 (invariance to weight scale)",
                task=task, evidence=f"per seed: range of no norm minus range of {lab}",
                test=paired(_spread(records, lab), _spread(records, "none"), "lower", d), design=d, steps=steps,
                runs=run_ids(select(records, label=lab), select(records, label="none"))))
    if select(records, label="shared_batch"):
        d = DESIGNS["shared_hurts"]
        out.append(Claim(
            key="shared_hurts", claim="naive BN with statistics shared over time is worse than per-step BN at the end of "
                                      "the step budget (final test accuracy)",
            source="Laurent et al. 2016; Cooijmans et al. 2017", task=f"{task}, gain {ref:g}",
            evidence="per seed: per-step BN (γ0 = 0.1) minus shared BN",
            test=compare(records, arm("batch γ=0.1"), arm("shared_batch"), d), design=d, steps=steps,
            other=("mean valid accuracy over training",
                   compare(records, arm("batch γ=0.1"), arm("shared_batch"), d, auc)),
            runs=run_ids(select(records, **arm("batch γ=0.1")), select(records, **arm("shared_batch")))))
    return out


QUESTIONS = (
    Question("BN makes the LSTM train faster", ("faster:batch γ=0.1",)),
    Question("layer norm makes the LSTM train faster", ("faster:layer",)),
    Question("sequence-wise BN (input term) makes the LSTM train faster", ("faster:sequence_batch",)),
    Question("normalization makes the LSTM less sensitive to its init", ("init:*",)),
    Question("naive BN with statistics shared over time fails", ("shared_hurts",)),
)

STUDY = Study(name="default", sweep=sweep, designs=DESIGNS, claims=claims, questions=QUESTIONS, docs_dir="report")
