""""Batch norm acts as a regularizer": the train-test gap on small training sets, trained to overfit, with
inter-layer dropout as the reference regularizer (a control, never tallied under the claim)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from recnorm.experiments.config import RunConfig
from recnorm.experiments.document import mean_sd
from recnorm.experiments.study import (
    FASHION_SMOKE, SEEDS5, Claim, Design, Question, Record, Study, by_seed, final, grid, label, name, paired, run_ids,
    smoke_variant, steps_of, task_name, verdicts_section)
from recnorm.experiments.sweep import SweepSpec


def sweep(smoke: bool = False) -> SweepSpec:
    """"Batch norm acts as a regularizer": the train-test gap on small training sets, trained to overfit.

    Row-wise Fashion-MNIST with 500 and 2000 training images (1000 valid, 2000 test), a 2-layer LSTM(64),
    Adam 2e-3, clipping at 1, batch 50, 800 steps (80 and 20 epochs), for no norm, layer norm, per-step BN
    (γ0 = 0.1), sequence-wise BN, and, as the reference regularizer, no norm with dropout 0.3 or 0.5 between
    the two layers; 5 seeds: 60 runs. The final model is evaluated on the whole training set too (eval mode,
    exact population statistics), so the report gives the train-test gap in accuracy and in cross-entropy
    per norm.

    Command: ``recnorm compare --preset regularization --workers 2 --out runs/regularization --results results/regularization``, then ``recnorm report results/regularization --out docs/regularization``.
    Running time: the first 50 runs took 29 min 49 s with ``--workers 2`` while other jobs shared the 2
    cores (load average 5.5-7.5, of which 2 were this sweep); the 10 dropout-0.5 runs, added later, 1 min
    47 s on an otherwise idle machine. Training and evaluation measure 0.23 core-hours
    (``python benchmarks/preset_cost.py regularization``), 7-15 minutes on 2 idle cores.
    ``--smoke``: 16 s (measured, 2 workers).
    """
    base = RunConfig(task="fashion_rows", task_options={"train_size": 500, "valid_size": 1000, "test_size": 2000},
                     cell="lstm", num_layers=2, hidden_size=64, init="orthogonal", optimizer="adam", lr=2e-3,
                     clip=1.0, batch_size=50, steps=800, eval_every=100, eval_batch_size=500, diag_every=None,
                     popstat_batches=10, train_eval_examples=2000)
    variants = [{"norm": None}, {"norm": "layer"}, {"norm": "batch", "norm_kwargs.gain_init": 0.1},
                {"norm": "sequence_batch"}, {"norm": None, "dropout": 0.3}, {"norm": None, "dropout": 0.5}]
    spec = SweepSpec(
        name="regularization",
        description=("Does batch norm regularize an LSTM? Train-test gap on 500 and 2000 row-wise Fashion-MNIST "
                     "images, 2-layer LSTM(64) trained to overfit: no norm, layer norm, per-step BN, "
                     "sequence-wise BN, and inter-layer dropout 0.3 and 0.5 as the reference regularizer."),
        base=base, grids=grid(variants, **{"task_options.train_size": [500, 2000]}, seed=SEEDS5),
        report={"reference": {"dropout": 0.0}})
    if smoke:
        spec = smoke_variant(spec, FASHION_SMOKE)
        spec.base = spec.base.replace(train_eval_examples=32)
        spec.grids = [{**g, "task_options.train_size": [32]} for g in spec.grids]
    return spec


def _arm(r: Record) -> str:
    lab = label(r)
    dropout = r["config"].get("dropout") or 0.0
    return f"{lab}, dropout {dropout:g}" if dropout else lab


def _arm_name(arm: str) -> str:
    lab, _, dropout = arm.partition(", ")
    return name(lab) + (f" with {dropout}" if dropout else "")


def _gap_acc(r: Record) -> Optional[float]:
    a, b = final(r, "train"), final(r, "test")
    return None if a is None or b is None else a - b


def _gap_loss(r: Record) -> Optional[float]:
    a, b = final(r, "test", "loss"), final(r, "train", "loss")
    return None if a is None or b is None else a - b


def _loss(r: Record) -> Optional[float]:
    return final(r, "test", "loss")


GAP = "train-test gap in accuracy (final train minus test accuracy, eval mode)"
DESIGNS = {
    "gap": Design(GAP, "lower", margin=0.01),
    "test": Design("final test accuracy", "higher", margin=0.01),
    # The reference regularizer: it checks that the setup can show regularization, and is no evidence that
    # batch norm regularizes.
    "dropout_gap": Design(GAP, "lower", margin=0.01, role="control"),
    "dropout_test": Design("final test accuracy", "higher", margin=0.01, role="control"),
}


def _size(r: Record) -> Any:
    return (r["config"]["task_options"] or {}).get("train_size")


def _arm_claims(runs: Sequence[Record], base: Sequence[Record], arm: str, size: Any) -> List[Claim]:
    these = [r for r in runs if _arm(r) == arm]
    control = "dropout" in arm
    source = ("reference regularizer (Zaremba et al. 2014)" if control else
              "Ioffe & Szegedy 2015 (BN regularizes); Laurent et al. 2016 (BN-RNNs overfit more)")
    task, steps, ids = f"{task_name(runs)}, {size} training images", steps_of(runs), run_ids(these, base)
    d_gap, d_test = DESIGNS["dropout_gap" if control else "gap"], DESIGNS["dropout_test" if control else "test"]
    prefix = "dropout_" if control else ""
    return [
        Claim(key=f"{prefix}gap:{arm}:{size}", claim=f"{_arm_name(arm)} narrows the train-test gap in accuracy against "
                                                     f"no norm (final train minus test accuracy, eval mode)",
              source=source, task=task, evidence="per seed: gap of no norm minus gap of " + arm, design=d_gap,
              steps=steps, runs=ids, test=paired(by_seed(these, _gap_acc), by_seed(base, _gap_acc), "lower", d_gap),
              other=("gap in cross-entropy (test minus train)",
                     paired(by_seed(these, _gap_loss), by_seed(base, _gap_loss), "lower", d_gap))),
        Claim(key=f"{prefix}test:{arm}:{size}", claim=f"{_arm_name(arm)} reaches a better final test accuracy than no "
                                                      f"norm",
              source=source, task=task, evidence=f"per seed: test accuracy of {arm} minus of no norm", design=d_test,
              steps=steps, runs=ids, test=paired(by_seed(these, final), by_seed(base, final), "higher", d_test),
              other=("test cross-entropy", paired(by_seed(these, _loss), by_seed(base, _loss), "lower", d_test)))]


def claims(records: Sequence[Record]) -> List[Claim]:
    out: List[Claim] = []
    arms: List[str] = []
    for r in records:
        if _arm(r) not in arms:
            arms.append(_arm(r))
    for size in sorted({_size(r) for r in records}, key=lambda v: v or 0):
        runs = [r for r in records if _size(r) == size]
        base = [r for r in runs if _arm(r) == "none"]
        for arm in arms:
            if base and arm != "none" and any(_arm(r) == arm for r in runs):
                out += _arm_claims(runs, base, arm, size)
    return out


def section(doc: Any, records: Sequence[Record], hints: Dict[str, Any]) -> List[Claim]:
    doc.h(2, "Train-test gap")
    rows = []
    for size in sorted({(r["config"]["task_options"] or {}).get("train_size") for r in records}, key=lambda v: v or 0):
        runs = [r for r in records if (r["config"]["task_options"] or {}).get("train_size") == size]
        arms = []
        for r in runs:
            if _arm(r) not in arms:
                arms.append(_arm(r))
        for arm in arms:
            these = [r for r in runs if _arm(r) == arm]
            rows.append([str(size), arm, mean_sd([final(r, "train") for r in these]),
                         mean_sd([final(r) for r in these]), mean_sd([_gap_acc(r) for r in these]),
                         mean_sd([final(r, "train", "loss") for r in these]),
                         mean_sd([final(r, "test", "loss") for r in these]), mean_sd([_gap_loss(r) for r in these])])
    doc.p("The final model on the whole training set and on the test set, both in eval mode (batch norms with "
          "exactly recomputed population statistics, dropout off), mean ± sd over seeds. A regularizer shrinks "
          "the gap; inter-layer dropout is the reference.")
    doc.table(["training images", "model", "train accuracy", "test accuracy", "gap (accuracy)",
               "train cross-entropy", "test cross-entropy", "gap (cross-entropy)"], rows)
    return verdicts_section(doc, claims(records))


QUESTIONS = (Question("BN acts as a regularizer", ("gap:*", "test:*", "dropout_gap:*", "dropout_test:*")),)

STUDY = Study(name="regularization", sweep=sweep, designs=DESIGNS, claims=claims, section=section,
              questions=QUESTIONS)
