"""Named sweeps: functions returning a :class:`~recnorm.experiments.sweep.SweepSpec`.

Each preset takes ``smoke=False``; ``smoke=True`` gives the same grid shape with a one-step budget and tiny
data, for tests and for checking an installation. Running times in the docstrings were measured on the
development machine (2 shared CPU cores, ``--workers 2``, one torch thread per worker). They exclude the
one-time compile of recnorm's C++ kernels (about a minute per kernel, once per torch installation), which
``recnorm compare`` and ``recnorm sweep`` do first and announce.

``list_presets()`` names them; ``get_preset(name, smoke)`` builds one (unknown names raise ValueError).
"""

from __future__ import annotations

from typing import Callable, Dict, List

from recnorm.experiments.config import RunConfig
from recnorm.experiments.sweep import SweepSpec

__all__ = ["default", "cooijmans", "laurent", "horizontal", "drawbacks", "regularization", "padding", "memory",
           "language", "cooijmans_paper", "laurent_paper", "language_paper", "get_preset", "list_presets", "PRESETS",
           "LANGUAGE_VARIANTS", "BETWEEN_LAYERS_VARIANT"]

_NORMS_ALL: List[Dict] = [
    {"norm": None},
    {"norm": "layer"},
    {"norm": "batch", "norm_kwargs.gain_init": 0.1},
    {"norm": "sequence_batch"},
    {"norm": "shared_batch"},
]


#: The literal vertical placement, "BN on the output of each RNN" between stacked layers (LSTM -> BN -> LSTM),
#: as a model variant: the layers' ``between_layers=`` option (``recnorm.SequenceBatchNorm``).
BETWEEN_LAYERS_VARIANT: Dict = {"norm": None, "between_layers": "batch"}
#: Switch: put BETWEEN_LAYERS_VARIANT (at 3 and 5 layers) into the laurent preset beside Laurent's BN of
#: W_ih x_t, so the two vertical placements run side by side.
LAURENT_BETWEEN_LAYERS = True


def _grid(variants: List[Dict], **axes) -> List[Dict]:
    """One grid per model variant, each crossed with the same ``axes`` (lists of values)."""
    return [{**{k: [v] for k, v in variant.items()}, **axes} for variant in variants]


def _smoke(spec: SweepSpec, task_options: Dict) -> SweepSpec:
    """The smoke variant of a spec: one step, tiny splits, one seed, evaluation capped at one batch."""
    base = spec.base.replace(steps=1, eval_every=1, diag_every=1, eval_batches=1, popstat_batches=1,
                             eval_batch_size=32, batch_size=16)
    base = base.replace(task_options={**base.task_options, **task_options})
    grids = []
    for grid in spec.grids:
        g = dict(grid)
        g["seed"] = [0]
        for key in ("init_gain", "num_layers"):
            if key in g and isinstance(g[key], list) and len(g[key]) > 2:
                g[key] = [g[key][0], g[key][-1]]
        grids.append(g)
    return SweepSpec(name=spec.name + "-smoke", base=base, grids=grids, description="[smoke] " + spec.description,
                     imports=list(spec.imports), report=dict(spec.report))


def default(smoke: bool = False) -> SweepSpec:
    """The main comparison: does normalization help an LSTM converge faster and make it less sensitive to
    the weight initialization?

    Row-wise Fashion-MNIST (T = 28 rows of 28 pixels; 8000 training images, 1000 valid, 2000 test), a
    one-layer LSTM with 64 units, Adam 2e-3, batch 64, gradient clipping at 1, 200 steps (1.6 epochs of
    the subset), validation every 25 steps. Normalizations: none, layer, per-step batch (Cooijmans,
    γ0 = 0.1), sequence-wise batch on the input term (Laurent) and naive shared batch; initialization
    orthogonal (zero biases) with gains 0.25, 1 and 4; 5 seeds (with 3 seeds a paired t-test needs a very
    large effect): 75 runs.

    Command: ``recnorm compare`` (or ``recnorm compare --preset default --workers 2 --out runs/compare``); its
    report and run directories under ``docs/report`` come from ``recnorm compare --workers 2 --out docs/report``
    (re-run in 2 min 56 s, every metric identical to the earlier run's).
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
        grids=_grid(_NORMS_ALL, init_gain=[0.25, 1.0, 4.0], seed=[0, 1, 2, 3, 4]),
        report={"reference": {"init_gain": 1.0}},
    )
    return _smoke(spec, {"train_size": 64, "valid_size": 32, "test_size": 32}) if smoke else spec


def cooijmans(smoke: bool = False) -> SweepSpec:
    """Cooijmans et al. (2017) at small scale: BN-LSTM with γ0 = 0.1 vs γ0 = 1 vs no norm on sequential and
    permuted pixel-by-pixel Fashion-MNIST (14x14 downsampled, T = 196).

    LSTM(64), RMSProp lr 1e-3 as in the paper's MNIST script, clipping at 1, batch 64, orthogonal init,
    forget bias 1, noise 0.1 on h0, 5000 training images, 500 steps, 3 seeds: 18 runs. Checks that BN
    helps more on the permuted task and that γ0 = 1 is worse than 0.1 (App. B).

    Command: ``recnorm compare --preset cooijmans --workers 2 --out docs/cooijmans`` (its committed report and
    run directories).
    Running time: about 10 minutes on 2 CPU cores (measured 9 min 38 s with ``--workers 2``; re-run in
    10 min 20 s beside other jobs, load average 3.2-3.7, with identical metrics); ``--smoke``: about 35 s.
    """
    base = RunConfig(task="fashion_pixels",
                     task_options={"downsample": True, "train_size": 5000, "valid_size": 500, "test_size": 1000},
                     cell="lstm", hidden_size=64, init="orthogonal", forget_bias=1.0, h0_noise=0.1,
                     optimizer="rmsprop", lr=1e-3, clip=1.0, batch_size=64, steps=500, eval_every=50,
                     eval_batch_size=500, diag_every=250, popstat_batches=8)
    variants = [{"norm": None}, {"norm": "batch", "norm_kwargs.gain_init": 0.1},
                {"norm": "batch", "norm_kwargs.gain_init": 1.0}]
    grids = _grid(variants, task=["fashion_pixels", "fashion_permuted"], seed=[0, 1, 2])
    spec = SweepSpec(
        name="cooijmans",
        description=("Recurrent batch normalization (Cooijmans et al. 2017) at small scale: LSTM vs BN-LSTM "
                     "(γ0 = 0.1 and 1) on pixel-by-pixel and permuted-pixel 14x14 Fashion-MNIST (T = 196)."),
        base=base, grids=grids, report={})
    return _smoke(spec, {"train_size": 32, "valid_size": 16, "test_size": 16}) if smoke else spec


def laurent(smoke: bool = False) -> SweepSpec:
    """Laurent et al. (2016) / Deep Speech 2: sequence-wise batch norm on the input term in shallow vs deep
    stacks.

    Row-wise Fashion-MNIST (8000 training images), GRU(64) stacks of 1, 3 and 5 layers, with and without
    ``sequence_batch`` norm (and layer norm for reference), Adam 2e-3, clipping at 1, 250 steps, 5 seeds:
    45 runs; and, at 3 and 5 layers, the literal vertical placement, BN of each layer's output between the
    layers (``between_layers="batch"``): 10 runs more. The prediction: BN hurts or is neutral with one layer
    and helps deep stacks.

    Command: ``recnorm compare --preset laurent --workers 2 --out docs/laurent`` (its committed report and run
    directories).
    Running time: about 6 minutes on 2 CPU cores (measured 5 min 57 s with ``--workers 2``, layer-norm
    GRUs on the fused kernel; re-run in 5 min 39 s), plus 4 min 6 s for the 10 between-layer runs, added later
    to the same directory (the sweep ran only those); ``--smoke``: about 20 s.
    """
    base = RunConfig(task="fashion_rows", task_options={"train_size": 8000, "valid_size": 1000, "test_size": 2000},
                     cell="gru", hidden_size=64, init="orthogonal", optimizer="adam", lr=2e-3, clip=1.0,
                     batch_size=64, steps=250, eval_every=25, eval_batch_size=500, diag_every=125,
                     popstat_batches=10)
    variants = [{"norm": None}, {"norm": "sequence_batch"}, {"norm": "layer"}]
    grids = _grid(variants, num_layers=[1, 3, 5], seed=[0, 1, 2, 3, 4])
    if LAURENT_BETWEEN_LAYERS:  # the literal "BN on the output of each RNN", beside Laurent's BN of W_ih x_t
        grids += _grid([BETWEEN_LAYERS_VARIANT], num_layers=[3, 5], seed=[0, 1, 2, 3, 4])
    spec = SweepSpec(
        name="laurent",
        description=("Sequence-wise batch norm of the input-to-hidden term (Laurent et al. 2016; Amodei et al. "
                     "2016) in GRU stacks of 1, 3 and 5 layers on row-wise Fashion-MNIST."),
        base=base, grids=grids,
        report={"reference": {"num_layers": 1}})
    return _smoke(spec, {"train_size": 32, "valid_size": 16, "test_size": 16}) if smoke else spec


def horizontal(smoke: bool = False) -> SweepSpec:
    """The naive horizontal BN failure (Laurent et al. 2016; Cooijmans et al. 2017, Fig. 1): gradient flow
    through time in a tanh RNN and an LSTM.

    Sequential 8x8 digits (T = 64): no norm, naive shared BN (statistics shared over time), per-step BN with
    γ0 = 1 and 0.1, and sequence-wise (vertical) BN, for a tanh RNN(64) and an LSTM(64); h0 noise 0.1,
    Adam 1e-3, clipping at 1, 300 steps with gradient-flow diagnostics every 50 steps, 5 seeds: 50 runs.
    The report's gradient-flow plot shows ||dL/dh_t|| vs t per variant; the clipping table counts how often
    the gradient norm exceeded 1.

    Command: ``recnorm compare --preset horizontal --workers 2 --out docs/horizontal`` (its committed report
    and run directories).
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
        base=base, grids=_grid(variants, cell=["rnn", "lstm"], seed=[0, 1, 2, 3, 4]),
        report={"reference": {"cell": "rnn"}})
    return _smoke(spec, {"train_size": 32, "valid_size": 16, "test_size": 16}) if smoke else spec


_SEEDS5 = [0, 1, 2, 3, 4]
_FASHION_SMOKE = {"train_size": 32, "valid_size": 16, "test_size": 16}
_GENERATED_SMOKE = {"valid_size": 16, "test_size": 16}


def drawbacks(smoke: bool = False) -> SweepSpec:
    """Batch norm's known costs: small batches, and the statistics used at test time (Ba et al. 2016).

    Row-wise Fashion-MNIST (8000 training images), LSTM(64), Adam 2e-3, clipping at 1, 400 steps at batch
    sizes 4, 16 and 64 (the same steps and learning rate at every size), for no norm, layer norm, per-step
    batch norm (γ0 = 0.1) and sequence-wise batch norm, 5 seeds: 60 runs. The exact population statistics
    come from 256 training sequences at every batch size (64, 16 or 4 batches). Every batch-norm run is
    evaluated four ways: running averages (EMA), exactly recomputed statistics, batch statistics of
    500-sequence batches, and batch statistics of training-sized batches. Predictions: per-step BN loses
    against no norm as the batch shrinks while layer norm does not; the gap between training-mode (batch)
    and eval-mode (population) statistics grows as the batch shrinks.

    Command: ``recnorm compare --preset drawbacks --workers 2 --out docs/drawbacks``.
    Running time: 5 min 7 s with ``--workers 2`` on a nearly idle machine (a re-run into another directory,
    load average 2-4, every result identical); 10 min 4 s for the committed run while other jobs shared
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
        grids += _grid(variants, batch_size=[batch_size], popstat_batches=[256 // batch_size], seed=_SEEDS5)
    spec = SweepSpec(
        name="drawbacks",
        description=("Batch norm's costs (Ba et al. 2016): no norm, layer norm, per-step BN (γ0 = 0.1) and "
                     "sequence-wise BN trained at batch sizes 4, 16 and 64 on row-wise Fashion-MNIST, LSTM(64), "
                     "evaluated with running averages, exactly recomputed statistics and batch statistics."),
        base=base, grids=grids,
        report={"reference": {"batch_size": 64}, "analyses": ["batch_size"]})
    if smoke:
        spec = _smoke(spec, _FASHION_SMOKE)
        spec.grids = [{**g, "batch_size": [max(4, g["batch_size"][0] // 4)], "popstat_batches": [1]}
                      for g in spec.grids]
    return spec


def regularization(smoke: bool = False) -> SweepSpec:
    """"Batch norm acts as a regularizer": the train-test gap on small training sets, trained to overfit.

    Row-wise Fashion-MNIST with 500 and 2000 training images (1000 valid, 2000 test), a 2-layer LSTM(64),
    Adam 2e-3, clipping at 1, batch 50, 800 steps (80 and 20 epochs), for no norm, layer norm, per-step BN
    (γ0 = 0.1), sequence-wise BN, and, as the reference regularizer, no norm with dropout 0.3 or 0.5 between
    the two layers; 5 seeds: 60 runs. The final model is evaluated on the whole training set too (eval mode,
    exact population statistics), so the report gives the train-test gap in accuracy and in cross-entropy
    per norm.

    Command: ``recnorm compare --preset regularization --workers 2 --out docs/regularization``.
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
        base=base, grids=_grid(variants, **{"task_options.train_size": [500, 2000]}, seed=_SEEDS5),
        report={"reference": {"dropout": 0.0}, "analyses": ["regularization"]})
    if smoke:
        spec = _smoke(spec, _FASHION_SMOKE)
        spec.base = spec.base.replace(train_eval_examples=32)
        spec.grids = [{**g, "task_options.train_size": [32]} for g in spec.grids]
    return spec


def padding(smoke: bool = False) -> SweepSpec:
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

    Command: ``recnorm compare --preset padding --workers 2 --out docs/padding``.
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
    grids = [{**g, **t} for t in tasks for g in _grid(variants, seed=[0, 1, 2])]
    spec = SweepSpec(
        name="padding",
        description=("Masked (packed) against padded batch statistics, and sorting by length, on two real "
                     "variable-length tasks: the adding problem with lengths 50-100 and verse-by-verse "
                     "character language modelling of the KJV Bible; LSTM(64)."),
        base=base, grids=grids,
        report={"reference": {"feed": "packed", "sort_by_length": 0}, "analyses": ["padding"]})
    if smoke:
        spec = _smoke(spec, {})
        spec.grids = [{**g, "task_options": [{**g["task_options"][0], **(
            _GENERATED_SMOKE if g["task"][0] == "adding_variable" else {"eval_verses": 16, "train_verses": 64})}],
            "steps": [1], "batch_size": [16]} for g in spec.grids]
    return spec


def memory(smoke: bool = False) -> SweepSpec:
    """The gating claim: "the LSTM suffers less from vanishing gradients and has more memory than a vanilla
    RNN; batch norm adds training speed" (Hochreiter & Schmidhuber 1997; Cooijmans et al. 2017).

    Tanh RNN, GRU and LSTM (64 units), each with no norm, layer norm and per-step BN (γ0 = 0.1), on the copy
    task (5 symbols to recall after a delay of 10 or 40 blanks, T = 21 or 51) and the adding problem
    (T = 100 and 200). Adam 2e-3, clipping at 1, batch 64, 400 steps, orthogonal init (LSTM forget bias 1),
    3 seeds: 108 runs.
    The report gives the success rate against the task's chance baseline (a run succeeds when it closes
    half the gap from the memoryless predictor to perfect: copy recall accuracy above 0.56 against chance
    0.125, adding MSE below 0.083 against 0.167) and the gradient flow through time, ||dL/dh_1|| over
    ||dL/dh_T||, at init and after training.

    Command: ``recnorm compare --preset memory --workers 2 --out docs/memory``.
    Running time: measured 14 min 28 s with ``--workers 2`` beside other jobs (load average 2.4-4.4).
    ``--smoke``: 22 s (measured, 2 workers).
    """
    base = RunConfig(task="copy", task_options={"valid_size": 500, "test_size": 500}, cell="lstm", hidden_size=64,
                     init="orthogonal", optimizer="adam", lr=2e-3, clip=1.0, batch_size=64, steps=400,
                     eval_every=50, eval_batch_size=500, diag_every=None, popstat_batches=8)
    variants = [{"cell": cell, **({"forget_bias": 1.0} if cell == "lstm" else {}), **norm}
                for cell in ("rnn", "gru", "lstm")
                for norm in ({"norm": None}, {"norm": "layer"}, {"norm": "batch", "norm_kwargs.gain_init": 0.1})]
    grids = (_grid(variants, task=["copy"], **{"task_options.delay": [10, 40], "task_options.copy_len": [5]},
                   seed=[0, 1, 2])
             + _grid(variants, task=["adding"], **{"task_options.length": [100, 200]}, seed=[0, 1, 2]))
    spec = SweepSpec(
        name="memory",
        description=("Memory and gradient flow of tanh RNN, GRU and LSTM, each without norm, with layer norm and "
                     "with per-step BN: copy task (delay 10 and 40) and adding problem (T = 100 and 200)."),
        base=base, grids=grids, report={"analyses": ["memory"]})
    if smoke:  # the shortest delay and sequence only
        spec = _smoke(spec, _GENERATED_SMOKE)
        spec.grids = [{k: v[:1] if k.startswith("task_options.") else v for k, v in g.items()} for g in spec.grids]
    return spec


#: The rows of the language preset. RMSNorm and the other layer-norm variants join as one entry each (for
#: example ``{"norm": "rms"}``) once their norms are registered; the report's bits-per-character table and
#: verdicts pick up every row by its label, with no other edit.
LANGUAGE_VARIANTS: List[Dict] = [
    {"norm": None},
    {"norm": "layer"},
    {"norm": "batch", "norm_kwargs.gain_init": 0.1},
    {"norm": "rms"},
    {"norm": "layer", "norm_kwargs.joint": True, "norm_kwargs.carry_cell": True},
]


def language(smoke: bool = False) -> SweepSpec:
    """Character-level language modelling on the KJV Bible, in bits per character (Cooijmans et al. 2017:
    PTB 1.38 for LSTM, 1.32 for BN-LSTM; Ba et al. 2016: layer norm speeds up language models).

    ``kjv_chars`` (windows of 100 characters, 63 symbols, contiguous 90/5/5 split; valid and test on their
    first 50,000 characters), an LSTM(128) with a 32-wide embedding, Adam 2e-3, clipping at 1, batch 32,
    1000 steps (3.2M characters, 0.86 of an epoch of the 3.7M training characters), orthogonal init:
    no norm, layer norm, per-step BN (γ0 = 0.1), RMSNorm, and layer norm with the joint gate norm and the
    carried normalized cell of torchaudio's and TF-Addons' LSTMs (:data:`LANGUAGE_VARIANTS`), 3 seeds: 15 runs.

    Command: ``recnorm compare --preset language --workers 2 --out docs/language``.
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
        base=base, grids=_grid(LANGUAGE_VARIANTS, seed=[0, 1, 2]), report={"analyses": ["language"]})
    return _smoke(spec, {"eval_chars": 2000, "train_chars": 5000}) if smoke else spec


# ---------------------------------------------------------------------------------------------- paper scale
# Meant for a cluster (``--backend ray``) or a GPU; not run in CI or here beyond their smoke variants. Each
# docstring estimates the compute from a measured cost per training step on this machine's CPU (one
# thread) times the steps; GPU figures are estimates, not measurements.


def cooijmans_paper(smoke: bool = False) -> SweepSpec:
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
        base=base, grids=_grid(variants, task=["fashion_pixels", "fashion_permuted"], seed=[0, 1, 2]), report={})
    return _smoke(spec, _FASHION_SMOKE) if smoke else spec


def laurent_paper(smoke: bool = False) -> SweepSpec:
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
        base=base, grids=_grid(variants, num_layers=[1, 3, 5], seed=[0, 1, 2]),
        report={"reference": {"num_layers": 1}})
    return _smoke(spec, _FASHION_SMOKE) if smoke else spec


def language_paper(smoke: bool = False) -> SweepSpec:
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
        base=base, grids=_grid(LANGUAGE_VARIANTS[:3], seed=[0, 1, 2]), report={"analyses": ["language"]})
    return _smoke(spec, {"eval_chars": 2000, "train_chars": 5000}) if smoke else spec


PRESETS: Dict[str, Callable[..., SweepSpec]] = {
    "default": default,
    "cooijmans": cooijmans,
    "laurent": laurent,
    "horizontal": horizontal,
    "drawbacks": drawbacks,
    "regularization": regularization,
    "padding": padding,
    "memory": memory,
    "language": language,
    "cooijmans_paper": cooijmans_paper,
    "laurent_paper": laurent_paper,
    "language_paper": language_paper,
}


def list_presets() -> List[str]:
    """Names of the presets."""
    return sorted(PRESETS)


def get_preset(name: str, smoke: bool = False) -> SweepSpec:
    """Build preset ``name`` (its smoke variant with ``smoke=True``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {list_presets()}")
    return PRESETS[name](smoke=smoke)
