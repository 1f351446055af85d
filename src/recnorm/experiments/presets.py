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

__all__ = ["default", "cooijmans", "laurent", "horizontal", "get_preset", "list_presets", "PRESETS"]

_NORMS_ALL: List[Dict] = [
    {"norm": None},
    {"norm": "layer"},
    {"norm": "batch", "norm_kwargs.gain_init": 0.1},
    {"norm": "sequence_batch"},
    {"norm": "shared_batch"},
]


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

    Command: ``recnorm compare`` (or ``recnorm compare --preset default --workers 2 --out runs/compare``).
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

    Command: ``recnorm compare --preset cooijmans --out runs/cooijmans``.
    Running time: about 10 minutes on 2 CPU cores (measured 9 min 38 s with ``--workers 2``; its report
    is committed under ``docs/cooijmans``); ``--smoke``: about 35 s.
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
    45 runs. The prediction: BN hurts or is neutral with one layer and helps deep stacks.

    Command: ``recnorm compare --preset laurent --out runs/laurent``.
    Running time: about 6 minutes on 2 CPU cores (measured 5 min 57 s with ``--workers 2``, layer-norm
    GRUs on the fused kernel; its report is committed under ``docs/laurent``); ``--smoke``: about 20 s.
    """
    base = RunConfig(task="fashion_rows", task_options={"train_size": 8000, "valid_size": 1000, "test_size": 2000},
                     cell="gru", hidden_size=64, init="orthogonal", optimizer="adam", lr=2e-3, clip=1.0,
                     batch_size=64, steps=250, eval_every=25, eval_batch_size=500, diag_every=125,
                     popstat_batches=10)
    variants = [{"norm": None}, {"norm": "sequence_batch"}, {"norm": "layer"}]
    spec = SweepSpec(
        name="laurent",
        description=("Sequence-wise batch norm of the input-to-hidden term (Laurent et al. 2016; Amodei et al. "
                     "2016) in GRU stacks of 1, 3 and 5 layers on row-wise Fashion-MNIST."),
        base=base, grids=_grid(variants, num_layers=[1, 3, 5], seed=[0, 1, 2, 3, 4]),
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

    Command: ``recnorm compare --preset horizontal --out runs/horizontal``.
    Running time: about 5 minutes on 2 CPU cores (measured 4 min 21 s with ``--workers 2``; its report is
    committed under ``docs/horizontal``); ``--smoke``: about 25 s.
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


PRESETS: Dict[str, Callable[..., SweepSpec]] = {
    "default": default,
    "cooijmans": cooijmans,
    "laurent": laurent,
    "horizontal": horizontal,
}


def list_presets() -> List[str]:
    """Names of the presets."""
    return sorted(PRESETS)


def get_preset(name: str, smoke: bool = False) -> SweepSpec:
    """Build preset ``name`` (its smoke variant with ``smoke=True``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {list_presets()}")
    return PRESETS[name](smoke=smoke)
