"""Character-level language modelling on the KJV Bible, in bits per character; also at the size of
Cooijmans et al.'s Penn Treebank model."""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence

from recnorm.experiments.config import RunConfig
from recnorm.experiments.document import fmt, mean_sd
from recnorm.experiments.results import area_under_curve
from recnorm.experiments.study import (
    Claim, Design, Question, Record, Study, auc, by_seed, final, grid, labels, name, paired, run_ids, select,
    smoke_variant, steps_of, task_name, verdicts_section)
from recnorm.experiments.sweep import SweepSpec

#: The rows of the study. A new norm joins as one entry (for example ``{"norm": "rms"}``); the
#: bits-per-character table and the verdicts pick up every row by its label, with no other edit.
LANGUAGE_VARIANTS: List[Dict] = [
    {"norm": None},
    {"norm": "layer"},
    {"norm": "batch", "norm_kwargs.gain_init": 0.1},
    {"norm": "rms"},
    {"norm": "layer", "norm_kwargs.joint": True, "norm_kwargs.carry_cell": True},
]


def sweep(smoke: bool = False) -> SweepSpec:
    """Character-level language modelling on the KJV Bible, in bits per character (Cooijmans et al. 2017:
    PTB 1.38 for LSTM, 1.32 for BN-LSTM; Ba et al. 2016: layer norm speeds up language models).

    ``kjv_chars`` (windows of 100 characters, 63 symbols, contiguous 90/5/5 split; valid and test on their
    first 50,000 characters), an LSTM(128) with a 32-wide embedding, Adam 2e-3, clipping at 1, batch 32,
    1000 steps (3.2M characters, 0.86 of an epoch of the 3.7M training characters), orthogonal init:
    no norm, layer norm, per-step BN (γ0 = 0.1), RMSNorm, and layer norm with the joint gate norm and the
    carried normalized cell of torchaudio's and TF-Addons' LSTMs (:data:`LANGUAGE_VARIANTS`), 3 seeds: 15 runs.

    Command: ``recnorm compare --preset language --workers 2 --out runs/language --results results/language``, then ``recnorm report results/language --out docs/language``.
    Running time: measured 7 min 8 s with ``--workers 2`` beside other jobs (load average 2.2-4) for the
    first 9 runs; the RMSNorm and joint/carried rows, added later to the same directory, 3 min 47 s.
    ``--smoke``: 13 s (measured, 2 workers).
    """
    base = RunConfig(task="kjv_chars", task_options={"seq_len": 100, "eval_chars": 50_000}, cell="lstm",
                     hidden_size=128, embedding_size=32, init="orthogonal", optimizer="adam", lr=2e-3, clip=1.0,
                     batch_size=32, steps=1000, eval_every=100, eval_batch_size=250, diag_every=None,
                     popstat_batches=8)
    spec = SweepSpec(
        name="language",
        description=("Character-level language model on the KJV Bible (bits per character): LSTM(128) without "
                     "norm, with layer norm, per-step batch norm (γ0 = 0.1), RMSNorm and the joint/carried "
                     "layer-norm LSTM."),
        base=base, grids=grid(LANGUAGE_VARIANTS, seed=[0, 1, 2]), report={})
    return smoke_variant(spec, {"eval_chars": 2000, "train_chars": 5000}) if smoke else spec


def paper_sweep(smoke: bool = False) -> SweepSpec:
    """The language preset at the size of Cooijmans et al.'s Penn Treebank model: LSTM(1000), windows of 100
    characters, batch 64, Adam 2e-3, clipping at 1, orthogonal init, 50 epochs of the KJV training split
    (3.72M characters: 582 steps an epoch, 29,100 steps), evaluated on the whole valid and test splits;
    no norm, layer norm and per-step BN (the first three rows of :data:`LANGUAGE_VARIANTS`), 3 seeds: 9 runs.

    Command: ``recnorm compare --preset language_paper --backend ray --out runs/language_paper``.
    Running time: not run here; estimated from measured costs (``python benchmarks/preset_cost.py
    language_paper``, one CPU thread): a training step takes 3.0 s (no norm), 3.1 s (layer norm) and 3.5 s
    (per-step BN), an evaluation of the 206,892 validation characters 31-34 s (162 s for BN, with the
    recomputation); times 29,100 steps and 31 evaluations, 24-30 core-hours a run, 237 core-hours for the
    9 runs. On a GPU (an estimate, not measured): no norm runs cuDNN, well under an hour a run; the
    normalized rows run the reference loop, 150-230 launches a time step, 15,000-23,000 a step at T = 100:
    0.08-0.23 s a step, 1-2 GPU-hours a run.
    """
    base = RunConfig(task="kjv_chars", task_options={"seq_len": 100, "eval_chars": None}, cell="lstm",
                     hidden_size=1000, embedding_size=64, init="orthogonal", optimizer="adam", lr=2e-3, clip=1.0,
                     batch_size=64, steps=50 * 582, eval_every=1000, eval_batch_size=256, diag_every=None,
                     popstat_batches=50)
    spec = SweepSpec(
        name="language_paper",
        description=("Character-level language model on the KJV Bible at the size of Cooijmans et al.'s PTB "
                     "model: LSTM(1000), 50 epochs; no norm, layer norm, per-step BN (γ0 = 0.1)."),
        base=base, grids=grid(LANGUAGE_VARIANTS[:3], seed=[0, 1, 2]), report={})
    return smoke_variant(spec, {"eval_chars": 2000, "train_chars": 5000}) if smoke else spec


DESIGNS = {
    "speed": Design("mean valid bits per character over training", "lower", margin=0.01),
    # The same runs as speed, read at the end of the step budget (0.86 of an epoch): shown, not counted.
    "bpc": Design("final test bits per character", "lower", margin=0.01, role="second look"),
}
ANCHORS = ("Literature anchors (Penn Treebank, not this corpus): Cooijmans et al. 2017 report 1.38 bpc for an "
           "LSTM(1000) and 1.32 for the BN-LSTM; Ba et al. 2016 report that layer norm speeds up the training of "
           "language models.")


def _auc_time(r: Record) -> Optional[float]:
    """Mean valid metric over training seconds (the curve against wall-clock time)."""
    curve = r.get("valid") or {}
    times, values = curve.get("time", []), curve.get(r["metric"], [])
    if len(times) < 2 or not times[-1]:
        return None
    return area_under_curve(times, values, times[-1])


def claims(records: Sequence[Record]) -> List[Claim]:
    out = []
    task, steps = task_name(records), steps_of(records)
    base = select(records, label="none")
    for lab in labels(records):
        if lab == "none" or not base:
            continue
        these = select(records, label=lab)
        d = DESIGNS["bpc"]
        out.append(Claim(
            key=f"bpc:{lab}", claim=f"{name(lab)} ends the step budget at a lower test bits per character than the "
                                    f"plain LSTM",
            source="Cooijmans et al. 2017 (PTB: 1.32 vs 1.38 bpc)", task=task, design=d, steps=steps,
            evidence=f"per seed: test bpc of no norm minus of {lab}",
            test=paired(by_seed(these, final), by_seed(base, final), "lower", d), runs=run_ids(these, base),
            other=("final valid bpc", paired(by_seed(these, lambda r: final(r, "valid")),
                                             by_seed(base, lambda r: final(r, "valid")), "lower", d))))
        d = DESIGNS["speed"]
        out.append(Claim(
            key=f"speed:{lab}", claim=f"{name(lab)} trains faster than the plain LSTM (mean valid bits per character "
                                      f"over training)",
            source="Ba et al. 2016 (layer norm speeds up language models)", task=task, design=d, steps=steps,
            evidence=f"per seed: mean valid bpc over training, no norm minus {lab}",
            test=paired(by_seed(these, auc), by_seed(base, auc), "lower", d), runs=run_ids(these, base),
            other=("mean valid bpc over training seconds",
                   paired(by_seed(these, _auc_time), by_seed(base, _auc_time), "lower", d))))
    return out


def section(doc: Any, records: Sequence[Record], hints: Dict[str, Any]) -> List[Claim]:
    doc.h(2, "Bits per character")
    rows = []
    for lab in labels(records):
        these = select(records, label=lab)
        rows.append([lab, str(len(these)), mean_sd([final(r, "valid") for r in these]),
                     mean_sd([final(r) for r in these]), mean_sd([auc(r) for r in these]),
                     fmt(statistics.fmean(r["timing"]["seconds_per_step"] for r in these) * 1000) + " ms"])
    doc.table(["norm", "runs", "final valid bpc", "final test bpc", "mean valid bpc over training", "time per step"],
              rows)
    doc.p(ANCHORS + " Every row of the study (recnorm.experiments.studies.language.LANGUAGE_VARIANTS) appears here "
          "and in the verdicts by its label.")
    return verdicts_section(doc, claims(records))


QUESTIONS = (
    Question("normalization lowers bits per character (BN-LSTM: Cooijmans et al.)", ("bpc:*",)),
    Question("normalization speeds up language models (layer norm: Ba et al.)", ("speed:*",)),
)

STUDY = Study(name="language", sweep=sweep, designs=DESIGNS, claims=claims, section=section, questions=QUESTIONS)
PAPER = Study(name="language_paper", sweep=paper_sweep, designs=DESIGNS, claims=claims, section=section)
