"""Cooijmans et al. (2017), recurrent batch normalization, at small scale and at the paper's scale."""

from __future__ import annotations

from typing import List, Sequence

from recnorm.experiments.config import RunConfig
from recnorm.experiments.study import (
    FASHION_SMOKE, Claim, Design, Question, Record, Study, auc, compare, grid, run_ids, select, smoke_variant, steps_of,
    tasks)
from recnorm.experiments.sweep import SweepSpec


def sweep(smoke: bool = False) -> SweepSpec:
    """Cooijmans et al. (2017) at small scale: BN-LSTM with γ0 = 0.1 vs γ0 = 1 vs no norm on sequential and
    permuted pixel-by-pixel Fashion-MNIST (14x14 downsampled, T = 196).

    LSTM(64), RMSProp lr 1e-3 as in the paper's MNIST script, clipping at 1, batch 64, orthogonal init,
    forget bias 1, noise 0.1 on h0, 5000 training images, 500 steps, 3 seeds: 18 runs. Checks that BN
    helps more on the permuted task and that γ0 = 1 is worse than 0.1 (App. B).

    Command: ``recnorm compare --preset cooijmans --workers 2 --out runs/cooijmans --results results/cooijmans``, then ``recnorm report results/cooijmans --out docs/cooijmans``.
    Running time: about 10 minutes on 2 CPU cores (measured 9 min 38 s with ``--workers 2``; re-run in
    10 min 20 s beside other jobs, load average 3.2-3.7, with identical metrics, on the same kernels); ``--smoke``: about 35 s.
    """
    base = RunConfig(task="fashion_pixels",
                     task_options={"downsample": True, "train_size": 5000, "valid_size": 500, "test_size": 1000},
                     cell="lstm", hidden_size=64, init="orthogonal", forget_bias=1.0, h0_noise=0.1,
                     optimizer="rmsprop", lr=1e-3, clip=1.0, batch_size=64, steps=500, eval_every=50,
                     eval_batch_size=500, diag_every=250, popstat_batches=8)
    variants = [{"norm": None}, {"norm": "batch", "norm_kwargs.gain_init": 0.1},
                {"norm": "batch", "norm_kwargs.gain_init": 1.0}]
    grids = grid(variants, task=["fashion_pixels", "fashion_permuted"], seed=[0, 1, 2])
    spec = SweepSpec(
        name="cooijmans",
        description=("Recurrent batch normalization (Cooijmans et al. 2017) at small scale: LSTM vs BN-LSTM "
                     "(γ0 = 0.1 and 1) on pixel-by-pixel and permuted-pixel 14x14 Fashion-MNIST (T = 196)."),
        base=base, grids=grids, report={})
    return smoke_variant(spec, {"train_size": 32, "valid_size": 16, "test_size": 16}) if smoke else spec


def paper_sweep(smoke: bool = False) -> SweepSpec:
    """The cooijmans preset at the paper's scale: full 28x28 pixel-by-pixel and permuted Fashion-MNIST
    (T = 784), LSTM(100), RMSProp lr 1e-3, clipping at 1, batch 100, 200 epochs of the 55,000 training images
    (110,000 steps, the step budget of the paper's MNIST scripts), orthogonal init, forget bias 1, h0 noise
    0.1; no norm against BN-LSTM with γ0 = 0.1 and 1; 3 seeds: 18 runs.

    Command: ``recnorm compare --preset cooijmans_paper --backend ray --out runs/cooijmans_paper``.
    Running time: not run here; estimated from measured costs (``python benchmarks/preset_cost.py
    cooijmans_paper``, one thread of this machine's CPU): a training step takes 0.87-1.0 s for the LSTM and
    0.70-0.78 s for the BN-LSTM (fused kernel), an evaluation 14 s and 86-95 s (with the exact recomputation
    of the population statistics from 50 batches); times 110,000 steps and 57 evaluations, 23-31 core-hours
    a run, 470 core-hours for the 18 runs (a day on 20 cores). On a GPU (an estimate: no GPU was available
    to measure): the LSTM rows run cuDNN, about an hour a run; the BN-LSTM rows run recnorm's reference
    loop on CUDA, about 230 kernel launches a time step for forward and backward (counted with
    torch.profiler), 180,000 a training step at T = 784: at 5-10 µs a launch 0.9-1.8 s a step, 30-55
    GPU-hours a run, no faster than one CPU core until the per-step norms get a fused CUDA kernel.
    """
    base = RunConfig(task="fashion_pixels", task_options={"downsample": False}, cell="lstm", hidden_size=100,
                     init="orthogonal", forget_bias=1.0, h0_noise=0.1, optimizer="rmsprop", lr=1e-3, clip=1.0,
                     batch_size=100, steps=200 * 550, eval_every=2000, eval_batch_size=1000, diag_every=20000,
                     popstat_batches=50)
    variants = [{"norm": None}, {"norm": "batch", "norm_kwargs.gain_init": 0.1},
                {"norm": "batch", "norm_kwargs.gain_init": 1.0}]
    spec = SweepSpec(
        name="cooijmans_paper",
        description=("Recurrent batch normalization (Cooijmans et al. 2017) at the paper's scale: LSTM(100) vs "
                     "BN-LSTM (γ0 = 0.1 and 1) on 28x28 pixel-by-pixel and permuted Fashion-MNIST (T = 784), "
                     "200 epochs."),
        base=base, grids=grid(variants, task=["fashion_pixels", "fashion_permuted"], seed=[0, 1, 2]), report={})
    return smoke_variant(spec, FASHION_SMOKE) if smoke else spec


DESIGNS = {
    "bn_faster": Design("mean valid accuracy over training (area under the validation curve)", "higher", margin=0.01),
    # The same runs as bn_faster, read at the end of the step budget: shown, not counted.
    "bn": Design("final test accuracy", "higher", margin=0.01, role="second look"),
    "gamma": Design("final test accuracy", "higher", margin=0.01),
}
BN, LSTM = {"label": "batch γ=0.1"}, {"label": "none"}


def claims(records: Sequence[Record]) -> List[Claim]:
    out = []
    for task in tasks(records):
        runs = select(records, task=task)
        steps = steps_of(runs)
        ids = run_ids(select(runs, **BN), select(runs, **LSTM))
        d = DESIGNS["bn_faster"]
        out.append(Claim(
            key=f"bn_faster:{task}", claim="BN-LSTM (γ0 = 0.1) converges faster than the LSTM (mean valid accuracy "
                                           "over training)",
            source="Cooijmans et al. 2017 (faster convergence, Fig. 2)", task=task, evidence="per seed: BN-LSTM minus LSTM",
            test=compare(runs, BN, LSTM, d, auc), design=d, steps=steps, runs=ids,
            other=("final test accuracy", compare(runs, BN, LSTM, d))))
        d = DESIGNS["bn"]
        out.append(Claim(
            key=f"bn:{task}", claim="BN-LSTM (γ0 = 0.1) ends the step budget with a better test accuracy than the LSTM",
            source="Cooijmans et al. 2017 (seq. MNIST 99.0 vs 98.9, permuted 95.4 vs 90.2)", task=task,
            evidence="per seed: BN-LSTM minus LSTM", test=compare(runs, BN, LSTM, d), design=d, steps=steps, runs=ids,
            other=("mean valid accuracy over training", compare(runs, BN, LSTM, d, auc))))
        d = DESIGNS["gamma"]
        gamma1 = {"label": "batch γ=1"}
        out.append(Claim(
            key=f"gamma:{task}", claim="γ0 = 0.1 beats γ0 = 1 for the BN-LSTM (final test accuracy)",
            source="Cooijmans et al. 2017, App. B", task=task, evidence="per seed: γ0 = 0.1 minus γ0 = 1",
            test=compare(runs, BN, gamma1, d), design=d, steps=steps,
            runs=run_ids(select(runs, **BN), select(runs, **gamma1)),
            other=("mean valid accuracy over training", compare(runs, BN, gamma1, d, auc))))
    return out


QUESTIONS = (
    Question("BN makes the LSTM train faster", ("bn_faster:*",)),
    Question("BN makes the LSTM generalize better (Cooijmans et al.'s headline)", ("bn:*",)),
    Question("BN's initial gain matters (γ0 = 0.1, not 1)", ("gamma:*",)),
)

STUDY = Study(name="cooijmans", sweep=sweep, designs=DESIGNS, claims=claims, questions=QUESTIONS)
PAPER = Study(name="cooijmans_paper", sweep=paper_sweep, designs=DESIGNS, claims=claims)
