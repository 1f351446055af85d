"""Batch norm's known costs: small batches, and the statistics used at test time (Ba et al. 2016)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import recnorm.experiments.plots as plots
from recnorm.experiments.config import RunConfig
from recnorm.experiments.study import (
    FASHION_SMOKE, SEEDS5, Claim, Design, Question, Record, Study, by_seed, final, grid, labels, name, paired, run_ids,
    select, smoke_variant, steps_of, task_name, verdicts_section)
from recnorm.experiments.document import mean_sd
from recnorm.experiments.sweep import SweepSpec


def sweep(smoke: bool = False) -> SweepSpec:
    """Batch norm's known costs: small batches, and the statistics used at test time (Ba et al. 2016).

    Row-wise Fashion-MNIST (8000 training images), LSTM(64), Adam 2e-3, clipping at 1, 400 steps at batch
    sizes 4, 16 and 64 (the same steps and learning rate at every size), for no norm, layer norm, per-step
    batch norm (γ0 = 0.1) and sequence-wise batch norm, 5 seeds: 60 runs. The exact population statistics
    come from 256 training sequences at every batch size (64, 16 or 4 batches). Every batch-norm run is
    evaluated four ways: running averages (EMA), exactly recomputed statistics, batch statistics of
    500-sequence batches, and batch statistics of training-sized batches. Predictions: per-step BN loses
    against no norm as the batch shrinks while layer norm does not; the gap between training-mode (batch)
    and eval-mode (population) statistics grows as the batch shrinks.

    Command: ``recnorm compare --preset drawbacks --workers 2 --out runs/drawbacks --results results/drawbacks``, then ``recnorm report results/drawbacks --out docs/drawbacks``.
    Running time: 5 min 7 s with ``--workers 2`` on a nearly idle machine (a re-run into another directory,
    load average 2-4, every result identical on the same kernels); 10 min 4 s for the committed run while other jobs shared
    the 2 cores (load average 4-6). ``--smoke``: 14 s (measured, 2 workers).
    """
    base = RunConfig(task="fashion_rows", task_options={"train_size": 8000, "valid_size": 1000, "test_size": 2000},
                     cell="lstm", hidden_size=64, init="orthogonal", optimizer="adam", lr=2e-3, clip=1.0,
                     batch_size=64, steps=400, eval_every=100, eval_batch_size=500, diag_every=None,
                     popstat_batches=4)
    variants = [{"norm": None}, {"norm": "layer"}, {"norm": "batch", "norm_kwargs.gain_init": 0.1},
                {"norm": "sequence_batch"}]
    grids = []
    for batch_size in (4, 16, 64):
        grids += grid(variants, batch_size=[batch_size], popstat_batches=[256 // batch_size], seed=SEEDS5)
    spec = SweepSpec(
        name="drawbacks",
        description=("Batch norm's costs (Ba et al. 2016): no norm, layer norm, per-step BN (γ0 = 0.1) and "
                     "sequence-wise BN trained at batch sizes 4, 16 and 64 on row-wise Fashion-MNIST, LSTM(64), "
                     "evaluated with running averages, exactly recomputed statistics and batch statistics."),
        base=base, grids=grids,
        report={"reference": {"batch_size": 64}})
    if smoke:
        spec = smoke_variant(spec, FASHION_SMOKE)
        spec.grids = [{**g, "batch_size": [max(4, g["batch_size"][0] // 4)], "popstat_batches": [1]}
                      for g in spec.grids]
    return spec


STATS = (("test_ema", "running averages (EMA)"), ("test", "exact recomputation"),
         ("test_batch_stats", "batch statistics, 500 per batch"),
         ("test_batch_stats_train_size", "batch statistics, training batch size"))
SHRINK = "change of final test accuracy (exact statistics) from the largest to the smallest batch"
DESIGNS = {
    "small_batch": Design(f"{SHRINK}, against no norm's", "higher", margin=0.01),
    "bn_vs_ln_small_batch": Design(f"{SHRINK}, against layer norm's", "higher", margin=0.01),
    "train_eval_gap": Design("test accuracy with exact population statistics minus with the batch statistics of "
                             "training-sized batches, smallest batch minus largest", "higher", margin=0.01),
    "ema_loses": Design("test accuracy with exact population statistics minus with running averages", "higher",
                        margin=0.01),
}
Value = Callable[[Record], Optional[float]]


def _loss(r: Record) -> Optional[float]:
    return final(r, "test", "loss")


def _delta(records: Sequence[Record], lab: str, value: Value, small: int, large: int,
           base: Optional[str] = "none") -> Dict[int, Optional[float]]:
    """Per seed: (lab - base) at the small batch minus the same at the large batch (no base: lab alone)."""
    out: Dict[int, Optional[float]] = {}
    for sign, size in ((1, small), (-1, large)):
        runs = by_seed(select(records, label=lab, batch_size=size), value)
        ref = by_seed(select(records, label=base, batch_size=size), value) if base else {}
        for seed, v in runs.items():
            w = ref.get(seed, 0.0) if base else 0.0
            prev = out.get(seed, 0.0)
            out[seed] = None if v is None or w is None or prev is None else prev + sign * (v - w)
    return out


def _zero(d: Dict[int, Optional[float]]) -> Dict[int, float]:
    return {s: 0.0 for s in d}


def _gap(split: str) -> Value:
    def value(r: Record) -> Optional[float]:
        a, b = final(r, "test"), final(r, split)
        return None if a is None or b is None else a - b
    return value


def _small_batch(records: Sequence[Record], lab: str, small: int, large: int, task: str) -> List[Claim]:
    d, steps = DESIGNS["small_batch"], steps_of(records)
    acc, loss = _delta(records, lab, final, small, large), _delta(records, lab, _loss, small, large)
    out = [Claim(
        key=f"small_batch:{lab}", claim=f"{name(lab)} loses ground against no norm as the batch shrinks from {large} "
                                        f"to {small} (final test accuracy, exact statistics)",
        source="Ba et al. 2016 (BN needs large batches; LN does not)", task=task, design=d, steps=steps,
        evidence=f"per seed: ({lab} - none) at batch {small} minus ({lab} - none) at batch {large}",
        test=paired(_zero(acc), acc, "higher", d), other=("test cross-entropy", paired(loss, _zero(loss), "higher", d)),
        runs=run_ids(select(records, label=lab), select(records, label="none")))]
    if lab.startswith(("batch", "sequence_batch")) and select(records, label="layer"):
        d = DESIGNS["bn_vs_ln_small_batch"]
        bn, ln = _delta(records, lab, final, small, large, None), _delta(records, "layer", final, small, large, None)
        bn_l, ln_l = _delta(records, lab, _loss, small, large, None), _delta(records, "layer", _loss, small, large, None)
        out.append(Claim(
            key=f"bn_vs_ln_small_batch:{lab}",
            claim=f"{name(lab)} degrades more than layer norm as the batch shrinks from {large} to {small} (final "
                  f"test accuracy, exact statistics)",
            source="Ba et al. 2016", task=task, design=d, steps=steps,
            evidence=f"per seed: ({lab} at {small} - at {large}) minus (layer at {small} - at {large})",
            test=paired(ln, bn, "higher", d), other=("test cross-entropy", paired(bn_l, ln_l, "higher", d)),
            runs=run_ids(select(records, label=lab), select(records, label="layer"))))
    return out


def _statistics_claims(records: Sequence[Record], lab: str, sizes: List[int], task: str) -> List[Claim]:
    small, large, steps = sizes[0], sizes[-1], steps_of(records)
    at = lambda size, value: by_seed(select(records, label=lab, batch_size=size), value)  # noqa: E731
    d = DESIGNS["train_eval_gap"]
    train_size = _gap("test_batch_stats_train_size")
    out = [Claim(
        key=f"train_eval_gap:{lab}",
        claim=f"{name(lab)}: the gap between training-mode (batch) and eval-mode (population) statistics grows as "
              f"the batch shrinks (test accuracy with exact population statistics minus with the batch "
              f"statistics of training-sized batches)",
        source="Ba et al. 2016; Ioffe 2017 (batch renormalization)", task=task, design=d, steps=steps,
        evidence=f"per seed: that gap at batch {small} minus at batch {large}",
        test=paired(at(small, train_size), at(large, train_size), "higher", d),
        other=("gap between exact statistics and running averages (EMA)",
               paired(at(small, _gap("test_ema")), at(large, _gap("test_ema")), "higher", d)),
        runs=run_ids(select(records, label=lab, batch_size=small), select(records, label=lab, batch_size=large)))]
    d = DESIGNS["ema_loses"]
    for size in sizes:
        runs = select(records, label=lab, batch_size=size)
        out.append(Claim(
            key=f"ema_loses:{lab}:{size}",
            claim=f"{name(lab)} at batch {size}: evaluating with running averages (EMA) loses test accuracy against "
                  f"exactly recomputed population statistics",
            source="Cooijmans et al. 2017 (an extra pass over the training set); recnorm findings",
            task=f"{task_name(records)}, batch {size}", evidence="per seed: exact minus EMA test accuracy",
            design=d, steps=steps, runs=run_ids(runs),
            test=paired(by_seed(runs, final), by_seed(runs, lambda r: final(r, "test_ema")), "higher", d)))
    return out


def claims(records: Sequence[Record]) -> List[Claim]:
    sizes = sorted({r["config"]["batch_size"] for r in records})
    if len(sizes) < 2:
        return []
    task = f"{task_name(records)}, batch {sizes[0]} vs {sizes[-1]}"
    out: List[Claim] = []
    for lab in labels(records):
        if lab != "none":
            out += _small_batch(records, lab, sizes[0], sizes[-1], task)
    for lab in labels(records):
        if lab.startswith(("batch", "sequence_batch")):
            out += _statistics_claims(records, lab, sizes, task)
    return out


def section(doc: Any, records: Sequence[Record], hints: Dict[str, Any]) -> List[Claim]:
    sizes = sorted({r["config"]["batch_size"] for r in records})
    labs = labels(records)
    metric = records[0]["metric"]
    doc.h(2, "Batch size and the statistics used at test time")
    doc.p(f"Final test {metric} (mean ± sd over seeds) by training batch size; batch-norm models evaluated with "
          f"exactly recomputed population statistics. Every run trains the same number of steps at the same "
          f"learning rate, so a smaller batch also sees fewer examples: the claims compare each norm with no "
          f"norm at the same batch size.")
    doc.table(["norm"] + [f"batch {b}" for b in sizes],
              [[lab] + [mean_sd([final(r) for r in select(records, label=lab, batch_size=b)]) for b in sizes]
               for lab in labs])
    rows = []
    for lab in labs:
        for b in sizes:
            runs = select(records, label=lab, batch_size=b)
            if runs and any("test_ema" in (r.get("final") or {}) for r in runs):
                rows.append([lab, str(b)] + [mean_sd([final(r, key) for r in runs]) for key, _ in STATS])
    if rows:
        doc.p(f"Test {metric} of the batch-norm models by the statistics used at evaluation: the running averages "
              f"a plain `.eval()` uses, the exact population statistics of a pass over training batches "
              f"(`recnorm.recompute_population_statistics`), and batch statistics (training mode) of 500-sequence "
              f"batches and of batches of the training batch size.")
        doc.table(["norm", "batch size"] + [title for _, title in STATS], rows)
    plots.batch_sizes(doc, records, sizes, labs, STATS, final, select)
    return verdicts_section(doc, claims(records))


QUESTIONS = (
    Question("BN needs large batches; layer norm does not", ("small_batch:*", "bn_vs_ln_small_batch:*")),
    Question("training-mode and eval-mode statistics drift apart at small batches", ("train_eval_gap:*",)),
    Question("running averages are a poor substitute for exact population statistics", ("ema_loses:*:64",)),
)

STUDY = Study(name="drawbacks", sweep=sweep, designs=DESIGNS, claims=claims, section=section, questions=QUESTIONS)
