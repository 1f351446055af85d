"""Eval statistics of per-step batch norm: how far ``.eval()`` with running averages is from exact
population statistics, with the library's rule (docs/eval_statistics.md: R1, R2, momentum 0.3).

This study replaced ``benchmarks/eval_statistics.py`` (its own training loop, cache and report writer,
removed after commit f830a0c; ``git show f830a0c:benchmarks/eval_statistics.py`` shows it). It re-measures
that page's central comparison on the engine: every batch-norm run of ``train_and_evaluate`` is evaluated
both ways at the end (``final["valid_ema"]`` against ``final["valid"]``), and with the eval batch's own
statistics; the paired difference per seed is the claim's evidence.
"""

from __future__ import annotations

from typing import List, Sequence

from recnorm.experiments.config import RunConfig
from recnorm.experiments.study import (
    Claim, Design, Question, Record, Study, by_seed, final, grid, paired, run_ids, smoke_variant,
    steps_of)
from recnorm.experiments.sweep import SweepSpec

SETTINGS = [
    # `recnorm train --task digits --norm batch`: the RunConfig defaults (500 steps, Adam 1e-3, batch 64).
    {"task": ["digits"], "batch_size": [64], "steps": [500], "eval_every": [50]},
    # The same with batches of 16: four times fewer rows behind every slot's statistics.
    {"task": ["digits"], "batch_size": [16], "steps": [500], "eval_every": [50]},
    # Permuted 14x14 Fashion-MNIST pixels (T = 196), the second report.
    {"task": ["fashion_permuted"], "task_options": [{"downsample": True}], "steps": [1000], "eval_every": [100],
     "eval_batches": [4]},
]


def sweep(smoke: bool = False) -> SweepSpec:
    """Running averages against exact population statistics at evaluation: a BN-LSTM(64) (``norm="batch"``
    with the library's defaults) on sequential 8x8 digits (T = 64) at batch 64 and at batch 16, 500 steps,
    and on permuted 14x14 Fashion-MNIST pixels (T = 196; the evaluations during training read the first 1024 validation images, the final one all 5000) at batch 64,
    1000 steps; Adam 1e-3, clipping at 1, exact statistics from 20 training batches; 3 seeds: 9 runs.

    Command: ``recnorm compare --preset eval_statistics --workers 2 --out runs/eval_statistics``.
    Running time: not yet run on the engine (the measurements of docs/eval_statistics.md come from the
    removed benchmark script, at commit f830a0c); the benchmark's training runs of the same settings took
    17 minutes on 2 CPU cores. ``--smoke``: seconds.
    """
    base = RunConfig(task="digits", cell="lstm", hidden_size=64, norm="batch", optimizer="adam", lr=1e-3, clip=1.0,
                     batch_size=64, steps=500, eval_every=50, eval_batch_size=256, diag_every=None,
                     popstat_batches=20)
    spec = SweepSpec(
        name="eval_statistics",
        description=("BN-LSTM evaluated with running averages (what .eval() gives) against exact population "
                     "statistics: sequential digits at batch 64 and 16, permuted 14x14 Fashion-MNIST pixels."),
        base=base, grids=[{**g, "seed": [0, 1, 2]} for g in SETTINGS], report={})
    if smoke:
        spec = smoke_variant(spec, {})
        tiny = {"train_size": 32, "valid_size": 16, "test_size": 16}
        spec.grids = [{**g, "steps": [1], "batch_size": [max(4, g.get("batch_size", [64])[0] // 4)],
                       "task_options": [{**(g.get("task_options") or [{}])[0], **tiny}]} for g in spec.grids]
    return spec


DESIGNS = {"ema_loses": Design("final valid accuracy with exact population statistics minus with running averages",
                               "higher", margin=0.01)}


def _setting(r: Record) -> str:
    return f"{r['config']['task']}, batch {r['config']['batch_size']}"


def claims(records: Sequence[Record]) -> List[Claim]:
    out, d = [], DESIGNS["ema_loses"]
    for setting in sorted({_setting(r) for r in records}):
        runs = [r for r in records if _setting(r) == setting]
        ema = by_seed(runs, lambda r: final(r, "valid_ema"))
        out.append(Claim(
            key=f"ema_loses:{setting}",
            claim="evaluating a BN-LSTM with running averages (.eval(), the library's rule) loses valid accuracy "
                  "against exactly recomputed population statistics",
            source="docs/eval_statistics.md (issue 9); Cooijmans et al. 2017", task=setting, design=d,
            steps=steps_of(runs), evidence="per seed, one run evaluated both ways: exact minus running averages",
            test=paired(by_seed(runs, lambda r: final(r, "valid")), ema, "higher", d), runs=run_ids(runs),
            other=("test accuracy with the eval batch's own statistics, against exact",
                   paired(by_seed(runs, final), by_seed(runs, lambda r: final(r, "test_batch_stats")), "higher", d))))
    return out


QUESTIONS = (Question("running averages are a poor substitute for exact population statistics", ("ema_loses:*",)),)

STUDY = Study(name="eval_statistics", sweep=sweep, designs=DESIGNS, claims=claims, questions=QUESTIONS)
