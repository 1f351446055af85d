"""Laurent et al. (2016) / Deep Speech 2: sequence-wise (vertical) batch norm in shallow and deep stacks,
and the literal vertical placement, BN between stacked layers; also at the paper's model size."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from recnorm.experiments.config import RunConfig
from recnorm.experiments.study import (
    FASHION_SMOKE, Claim, Design, Question, Record, Study, by_seed, chance_level, compare, final, grid, paired, run_ids,
    select, smoke_variant, steps_of, task_name)
from recnorm.experiments.sweep import SweepSpec

#: The literal vertical placement, "BN on the output of each RNN" between stacked layers (LSTM -> BN -> LSTM),
#: as a model variant: the layers' ``between_layers=`` option (``recnorm.SequenceBatchNorm``).
BETWEEN_LAYERS_VARIANT: Dict = {"norm": None, "between_layers": "batch"}
#: Switch: put BETWEEN_LAYERS_VARIANT (at 3 and 5 layers) into the sweep beside Laurent's BN of W_ih x_t,
#: so the two vertical placements run side by side.
LAURENT_BETWEEN_LAYERS = True


def sweep(smoke: bool = False) -> SweepSpec:
    """Laurent et al. (2016) / Deep Speech 2: sequence-wise batch norm on the input term in shallow vs deep
    stacks.

    Row-wise Fashion-MNIST (8000 training images), GRU(64) stacks of 1, 3 and 5 layers, with and without
    ``sequence_batch`` norm (and layer norm for reference), Adam 2e-3, clipping at 1, 250 steps, 5 seeds:
    45 runs; and, at 3 and 5 layers, the literal vertical placement, BN of each layer's output between the
    layers (``between_layers="batch"``): 10 runs more. The prediction: BN hurts or is neutral with one layer
    and helps deep stacks.

    Command: ``recnorm compare --preset laurent --workers 2 --out runs/laurent --results results/laurent``, then ``recnorm report results/laurent --out docs/laurent``.
    Running time: about 6 minutes on 2 CPU cores (measured 5 min 57 s with ``--workers 2``, layer-norm
    GRUs on the fused kernel; re-run in 5 min 39 s), plus 4 min 6 s for the 10 between-layer runs, added later
    to the same directory (the sweep ran only those); ``--smoke``: about 20 s.
    """
    base = RunConfig(task="fashion_rows", task_options={"train_size": 8000, "valid_size": 1000, "test_size": 2000},
                     cell="gru", hidden_size=64, init="orthogonal", optimizer="adam", lr=2e-3, clip=1.0,
                     batch_size=64, steps=250, eval_every=25, eval_batch_size=500, diag_every=125,
                     popstat_batches=10)
    variants = [{"norm": None}, {"norm": "sequence_batch"}, {"norm": "layer"}]
    grids = grid(variants, num_layers=[1, 3, 5], seed=[0, 1, 2, 3, 4])
    if LAURENT_BETWEEN_LAYERS:  # the literal "BN on the output of each RNN", beside Laurent's BN of W_ih x_t
        grids += grid([BETWEEN_LAYERS_VARIANT], num_layers=[3, 5], seed=[0, 1, 2, 3, 4])
    spec = SweepSpec(
        name="laurent",
        description=("Sequence-wise batch norm of the input-to-hidden term (Laurent et al. 2016; Amodei et al. "
                     "2016) in GRU stacks of 1, 3 and 5 layers on row-wise Fashion-MNIST."),
        base=base, grids=grids,
        report={"reference": {"num_layers": 1}})
    return smoke_variant(spec, {"train_size": 32, "valid_size": 16, "test_size": 16}) if smoke else spec


def paper_sweep(smoke: bool = False) -> SweepSpec:
    """The laurent preset at the paper's model size: bidirectional LSTM stacks of 1, 3 and 5 layers of 250
    units (Laurent et al.'s WSJ model; Deep Speech 2 compares 1, 3, 5 and 7 layers), batch 24, on the full
    row-wise Fashion-MNIST (55,000 training images; the papers' speech corpora are not packaged), 20 epochs
    (45,840 steps), with and without sequence-wise BN of the input term, and layer norm for reference;
    Adam 1e-3 and clipping at 1 (the paper's SGD at lr 1e-4 is tuned to WSJ), 3 seeds: 27 runs.

    Command: ``recnorm compare --preset laurent_paper --backend ray --out runs/laurent_paper``.
    Running time: not run here; estimated from measured costs (``python benchmarks/preset_cost.py
    laurent_paper``, one CPU thread): a training step takes 0.05 s (1 layer) to 0.44 s (5 layers) without
    norm, 0.07-0.91 s with sequence-wise BN and 0.05-0.56 s with layer norm; times 45,840 steps and 24
    evaluations, 0.7-12 core-hours a run, 118 core-hours for the 27 runs. On a GPU (an estimate, not
    measured): no norm and sequence-wise BN run cuDNN, minutes a run; layer norm runs the reference loop,
    about 150 launches a time step, direction and layer, 42,000 a step at 5 layers: 0.2-0.4 s a step,
    3-5 GPU-hours a run.
    """
    base = RunConfig(task="fashion_rows", task_options={}, cell="lstm", bidirectional=True, hidden_size=250,
                     init="xavier", optimizer="adam", lr=1e-3, clip=1.0, batch_size=24, steps=20 * 2292,
                     eval_every=2000, eval_batch_size=1000, diag_every=10000, popstat_batches=40)
    variants = [{"norm": None}, {"norm": "sequence_batch"}, {"norm": "layer"}]
    spec = SweepSpec(
        name="laurent_paper",
        description=("Sequence-wise batch norm of the input term (Laurent et al. 2016; Amodei et al. 2016) at the "
                     "paper's model size: bidirectional LSTM(250) stacks of 1, 3 and 5 layers, full row-wise "
                     "Fashion-MNIST, 20 epochs."),
        base=base, grids=grid(variants, num_layers=[1, 3, 5], seed=[0, 1, 2]),
        report={"reference": {"num_layers": 1}})
    return smoke_variant(spec, FASHION_SMOKE) if smoke else spec


DESIGNS = {
    "deep_only": Design("(sequence-wise BN minus no norm) at the deepest stack minus the same at the shallowest, "
                        "final test accuracy", "higher", margin=0.01),
    "between": Design("final test accuracy", "higher", margin=0.01),
}
SEQ, NONE, BETWEEN = "sequence_batch", "none", "none+between=batch"


def _gain(records: Sequence[Record], depth: int) -> Dict[int, Optional[float]]:
    """Per seed: sequence-wise BN minus no norm at ``depth`` layers (a failed run counts as chance)."""
    chance = chance_level(records)
    seq = by_seed(select(records, label=SEQ, num_layers=depth), final)
    none = by_seed(select(records, label=NONE, num_layers=depth), final)
    out: Dict[int, Optional[float]] = {}
    for s in seq:
        if s in none:
            a, b = (chance if seq[s] is None else seq[s]), (chance if none[s] is None else none[s])
            out[s] = None if a is None or b is None else a - b
    return out


def claims(records: Sequence[Record]) -> List[Claim]:
    depths = sorted({r["config"]["num_layers"] for r in records})
    if len(depths) < 2:
        return []
    shallow, deep = depths[0], depths[-1]
    task, steps, d = task_name(records), steps_of(records), DESIGNS["deep_only"]
    out = [Claim(
        key="deep_only", claim=f"sequence-wise BN of the input term helps a deep stack more than a shallow one (final "
                               f"test accuracy, {deep} layers against {shallow})",
        source="Laurent et al. 2016; Amodei et al. 2016 (Deep Speech 2, Table 1)", task=task,
        evidence=f"per seed: (sequence-wise BN minus no norm) at {deep} layers minus the same at {shallow}",
        test=paired(_gain(records, deep), _gain(records, shallow), "higher", d), design=d, steps=steps,
        other=(f"the benefit at {deep} layers alone", compare(records, {"label": SEQ, "num_layers": deep},
                                                               {"label": NONE, "num_layers": deep}, d)),
        runs=run_ids(*(select(records, label=lab, num_layers=n) for lab in (SEQ, NONE) for n in (shallow, deep))))]
    d = DESIGNS["between"]
    for depth in depths:
        if not select(records, label=BETWEEN, num_layers=depth):
            continue
        arm = {"label": BETWEEN, "num_layers": depth}
        out.append(Claim(
            key=f"between:{depth}", claim=f"BN of each layer's output between the layers (RNN -> BN -> RNN) "
                                          f"is better than no norm at the end of the step budget ({depth} layers, final test accuracy)",
            source="the question's vertical placement; Laurent et al. 2016 (Sec. 3)", task=task,
            evidence="per seed: between-layer BN minus no norm", design=d, steps=steps,
            test=compare(records, arm, {"label": NONE, "num_layers": depth}, d),
            other=("against Laurent's BN of W_ih x_t (sequence_batch)",
                   compare(records, arm, {"label": SEQ, "num_layers": depth}, d)),
            runs=run_ids(select(records, **arm), select(records, label=NONE, num_layers=depth))))
    return out


QUESTIONS = (
    Question("vertical (sequence-wise) BN helps deep stacks only", ("deep_only",)),
    Question("BN on the output of each RNN, between stacked layers, helps", ("between:*",)),
)

STUDY = Study(name="laurent", sweep=sweep, designs=DESIGNS, claims=claims, questions=QUESTIONS)
PAPER = Study(name="laurent_paper", sweep=paper_sweep, designs=DESIGNS, claims=claims)
