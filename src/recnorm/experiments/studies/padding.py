"""Masked against padded batch statistics on variable-length data, and sorting by length as the usual
workaround."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from recnorm.experiments.config import RunConfig
from recnorm.experiments.document import fmt, mean_sd
from recnorm.experiments.study import (
    GENERATED_SMOKE, Claim, Design, Question, Record, Study, auc, better_of, by_seed, final, grid, label, labels,
    name, paired, run_ids, select, smoke_variant, steps_of, tasks, verdicts_section)
from recnorm.experiments.sweep import SweepSpec


def sweep(smoke: bool = False) -> SweepSpec:
    """Masked against padded statistics on variable-length data (Cooijmans et al. 2017, §5.4;
    deepspeech.pytorch #312), and sorting by length as the usual workaround (Amodei et al. 2016).

    Two real variable-length tasks: the adding problem with lengths uniform in [50, 100]
    (``adding_variable``), and verse-by-verse character language modelling on the KJV Bible (``kjv_verses``,
    verses of up to 150 characters). LSTM(64), Adam 2e-3, clipping at 1, batch 64 (adding) or 32 (verses),
    400 (adding) or 300 (verses) steps. Each batch is fed three ways: packed (recnorm's statistics over valid
    steps only), padded (the zero-padded tensor as is, so padding enters every batch statistic: the common
    mistake) and padded but with batches formed from pools of 8 batches sorted by length (length bucketing;
    Deep Speech 2's SortaGrad sorts its first epoch by length). Norms: per-step BN (γ0 = 0.1) and
    sequence-wise BN in all three feeds; layer norm packed and padded (a control: per-example statistics
    never see padding, so the two differ only by floating-point rounding); no norm packed. 3 seeds: 54 runs.

    Command: ``recnorm compare --preset padding --workers 2 --out runs/padding --results results/padding``, then ``recnorm report results/padding --out docs/padding``.
    Running time: measured 25 min 16 s with ``--workers 2`` while other jobs shared the 2 cores (load
    average 5.3-5.8, of which 2 were this sweep). Training and evaluation measure 0.31 core-hours
    (``python benchmarks/preset_cost.py padding``), 10-20 minutes on 2 idle cores. The no-norm and sequence-wise-BN runs on packed batches take 4 times as
    long a step as the padded ones (torch's native packed LSTM against recnorm's fused kernel).
    ``--smoke``: 24 s (measured, 2 workers).
    """
    base = RunConfig(task="adding_variable", task_options={}, cell="lstm", hidden_size=64, init="orthogonal",
                     optimizer="adam", lr=2e-3, clip=1.0, batch_size=64, steps=400, eval_every=50,
                     eval_batch_size=500, diag_every=None, popstat_batches=8)
    variants = [{"norm": None}, {"norm": "layer"}, {"norm": "layer", "feed": "padded"}]
    for norm in ({"norm": "batch", "norm_kwargs.gain_init": 0.1}, {"norm": "sequence_batch"}):
        variants += [norm, {**norm, "feed": "padded"}, {**norm, "feed": "padded", "sort_by_length": 8}]
    tasks = [{"task": ["adding_variable"], "task_options": [{"length": 100, "valid_size": 1000, "test_size": 1000}]},
             {"task": ["kjv_verses"], "task_options": [{"max_len": 150, "eval_verses": 500}], "batch_size": [32],
              "steps": [300], "embedding_size": [32], "eval_batch_size": [250]}]
    grids = [{**g, **t} for t in tasks for g in grid(variants, seed=[0, 1, 2])]
    spec = SweepSpec(
        name="padding",
        description=("Masked (packed) against padded batch statistics, and sorting by length, on two real "
                     "variable-length tasks: the adding problem with lengths 50-100 and verse-by-verse "
                     "character language modelling of the KJV Bible; LSTM(64)."),
        base=base, grids=grids,
        report={"reference": {"feed": "packed", "sort_by_length": 0}})
    if smoke:
        spec = smoke_variant(spec, {})
        spec.grids = [{**g, "task_options": [{**g["task_options"][0], **(
            GENERATED_SMOKE if g["task"][0] == "adding_variable" else {"eval_verses": 16, "train_verses": 64})}],
            "steps": [1], "batch_size": [16]} for g in spec.grids]
    return spec


def _feed(r: Record) -> str:
    c = r["config"]
    if c.get("feed", "packed") == "packed":
        return "packed"
    return "padded, sorted by length" if c.get("sort_by_length") else "padded"


_FEEDS = ("packed", "padded", "padded, sorted by length")


DESIGNS = {
    "masked": Design("final test metric (adding: MSE; verses: bits per character)", "higher", margin=0.01),
    "sorted": Design("final test metric (adding: MSE; verses: bits per character)", "higher", margin=0.01),
}


def _claims_of(runs: Sequence[Record], task: str, lab: str) -> List[Claim]:
    arms = {f: [r for r in runs if label(r) == lab and _feed(r) == f] for f in _FEEDS}
    better, metric, steps = better_of(runs), runs[0]["metric"], steps_of(runs)
    packed, padded, sorted_runs = arms["packed"], arms["padded"], arms["padded, sorted by length"]
    out = []
    if packed and padded:
        d = DESIGNS["masked"]
        out.append(Claim(
            key=f"masked:{task}:{lab}", claim=f"{name(lab)}: padding in the statistics hurts; packed (masked) "
                                              f"batches are better than padded ones at the end of the step budget (final test {metric})",
            source="Cooijmans et al. 2017 §5.4; deepspeech.pytorch #312", task=task, design=d, steps=steps,
            evidence=f"per seed: {metric} packed vs padded", runs=run_ids(packed, padded),
            test=paired(by_seed(packed, final), by_seed(padded, final), better, d),
            other=(f"mean valid {metric} over training", paired(by_seed(packed, auc), by_seed(padded, auc), better, d))))
    if padded and sorted_runs:
        d = DESIGNS["sorted"]
        out.append(Claim(
            key=f"sorted:{task}:{lab}", claim=f"{name(lab)}: sorting by length reduces the padding penalty; padded "
                                              f"batches of similar lengths are better than random padded batches at the "
                                              f"end of the step budget (final test {metric})",
            source="Amodei et al. 2016 (SortaGrad); length bucketing", task=task, design=d, steps=steps,
            evidence=f"per seed: {metric} padded+sorted vs padded", runs=run_ids(sorted_runs, padded),
            test=paired(by_seed(sorted_runs, final), by_seed(padded, final), better, d),
            other=(f"against packed (final test {metric})",
                   paired(by_seed(sorted_runs, final), by_seed(packed, final), better, d))))
    return out


def claims(records: Sequence[Record]) -> List[Claim]:
    out: List[Claim] = []
    for task in tasks(records):
        runs = select(records, task=task)
        for lab in labels(runs):
            if lab.startswith(("batch", "sequence_batch")):
                out += _claims_of(runs, task, lab)
    return out


def section(doc: Any, records: Sequence[Record], hints: Dict[str, Any]) -> List[Claim]:
    doc.h(2, "Masked against padded statistics")
    doc.p("*packed*: the batch goes to the layer as a PackedSequence, so every statistic is taken over valid "
          "steps only. *padded*: the zero-padded tensor goes in as it is, so padded steps enter the batch "
          "statistics (and the population statistics recomputed from such batches); the loss still reads valid "
          "steps only. *padded, sorted by length*: padded, but each batch is formed from sequences of similar "
          "length (pools of batches sorted by length), so little padding is left to enter the statistics.")
    for task in tasks(records):
        runs = select(records, task=task)
        metric = runs[0]["metric"]
        rows = []
        for lab in labels(runs):
            cells = []
            for f in _FEEDS:
                these = [r for r in runs if label(r) == lab and _feed(r) == f]
                cells.append(mean_sd([final(r) for r in these]) if these else "–")
            rows.append([lab] + cells)
        doc.h(3, f"{task}: final test {metric}")
        doc.table(["norm"] + list(_FEEDS), rows)
        control = []
        for lab in labels(runs):
            if not lab.startswith("layer"):
                continue
            packed = by_seed([r for r in runs if label(r) == lab and _feed(r) == "packed"], final)
            padded = by_seed([r for r in runs if label(r) == lab and _feed(r) == "padded"], final)
            diffs = [abs(packed[s] - padded[s]) for s in packed if s in padded
                     and packed[s] is not None and padded[s] is not None]
            if diffs:
                control.append(f"{lab}: largest |packed - padded| over {len(diffs)} seeds = {fmt(max(diffs))}")
        if control:
            doc.p("Control: per-example statistics never see padding, so packed and padded layer norm differ only by "
                  "floating-point rounding (the fused kernel on a packed and on a padded batch), which 300-400 "
                  "training steps amplify: " + "; ".join(control) + ".")
    return verdicts_section(doc, claims(records))


QUESTIONS = (
    Question("padding must stay out of the statistics", ("masked:*",)),
    Question("sorting by length is the workaround for padding", ("sorted:*",)),
)

STUDY = Study(name="padding", sweep=sweep, designs=DESIGNS, claims=claims, section=section, questions=QUESTIONS)
