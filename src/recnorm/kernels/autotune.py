"""Which implementation ``kernel="auto"`` tries first in eager mode, from measurements.

Where torch's own RNN op (``native``) and recnorm's fused kernel (``fused``) both serve a case --
``norm=None`` and ``norm="sequence_batch"`` (folded into the input weights) on CPU -- neither is faster
everywhere: the fused kernel trains faster at most sizes (its backward is one fused pass and a GEMM per
step, where torch's CPU op has no fused backward), while torch's oneDNN inference primitive is faster for
most eval forwards. The choice comes from a rule fitted to measurements, :data:`RULE` at the end of this
file, which ``benchmarks/fit_dispatch.py --fit`` writes there from ``benchmarks/dispatch_data.json``:

    for each ``cell/phase/dtype`` (phase ``train`` when autograd records the call, else ``eval``), a score
    ``c0 + cT log2 T + cB log2 B + cI log2 I + cH log2 H``; the fused kernel goes first where it is below 0.
    The coefficients are a logistic regression of "the fused kernel was faster" over the measured sizes,
    each size weighted by ``|log(t_fused / t_native)|`` (what a wrong pick there costs): a decision rule,
    not a prediction of the ratio's size. ``fit_dispatch.py``'s report and the benchmark page give its
    wrong picks on the measured sizes, in sample and left-one-out.

In a stack of layers trained with autograd, one implementation runs every layer (:func:`stack_first`,
through :func:`recnorm.kernels.stack_preference`): the one predicted faster over the whole stack. Each
layer choosing for itself can mix them (the first layer's narrow input favours the fused kernel, the
next layers' wider one torch's op), and a mixed stack keeps both implementations' saved tensors and
workspaces: a 2-layer LSTM with ``norm=None`` at (T, B, I, H) = (28, 128, 28, 128) peaked at 48 MiB
mixed against 40 on torch's op alone, 39 on the fused kernel alone and 40 for torch.nn.LSTM
(``benchmarks/bench_rnn.py``'s peak-memory measurement, one training step). In eval nothing is saved, and each layer
takes the faster implementation for its own size.

The rule is kept per CPU maker (:mod:`recnorm.kernels.host`): :data:`RULES` maps ``"AMD"`` and ``"Intel"``
to a rule fitted on a CPU of that maker, each with a record of where it was measured, and :data:`RULE` is
this host's. The hosts disagree on which is faster: of the 28 sizes both measured for the LSTM's training
step, at 4 (each with T <= 24) the fused kernel was faster on the Intel Xeon and slower on the AMD EPYC,
e.g. 0.74 against 1.27 of torch's op at (9, 25, 101, 863). A host of another maker has no rule, and
torch's op goes first everywhere.

Cases the rule has no entry for (another dtype, a cell kind without a fit), and sizes outside the range
of T, B, I or H it was fitted on, keep the default order: torch's op first. The rule only orders the candidates: the dispatcher still takes the first one whose
``supports()`` accepts the case, so it can never pick an implementation that refuses it, and
``kernel=...`` or ``$RECNORM_KERNEL`` still force one.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor

from recnorm.kernels import host

__all__ = ["eager_order", "compiled_order", "stack_first", "rule", "predict", "host_rule", "RULE", "RULES"]

DEFAULT_ORDER = ("native", "fused", "reference")
FUSED_FIRST = ("fused", "native", "reference")
# Cells that share another's fit: the relu RNN runs the same kernels as the tanh one.
_SAME_AS = {"rnn_relu": "rnn_tanh"}
_DTYPES = {"torch.float32": "float32", "torch.float64": "float64"}


def rule() -> Dict[str, List[float]]:
    """``{"cell/phase/dtype": [c0, cT, cB, cI, cH]}``: the fitted coefficients of :data:`RULE` (this host's)."""
    return {k: v["coef"] for k, v in RULE["rules"].items()}


def _entry(kind: str, train: bool, dtype: str, rule: Optional[Dict] = None) -> Optional[Dict]:
    """The entry of ``rule`` (default: this host's, :data:`RULE`) for a cell, phase and dtype (None: it has none)."""
    return (RULE if rule is None else rule)["rules"].get(f"{_SAME_AS.get(kind, kind)}/{'train' if train else 'eval'}/{dtype}")


def _dtype_key(work, x: Tensor) -> Optional[str]:
    """The rule's dtype name for a call it may order (a CPU call of a cell it knows, without a projection);
    None for any other."""
    dtype = _DTYPES.get(str(x.dtype))
    if work.cell.kind is None or dtype is None or x.device.type != "cpu" or work.weight_hr is not None:
        return None
    return dtype


def predict(kind: str, train: bool, dtype: str, T: int, B: int, I: int, H: int, rule: Optional[Dict] = None) -> Optional[float]:
    """The rule's score (log-odds that torch's op is the faster; below 0: the fused kernel), or None where it
    has no entry or the size lies outside the range of T, B, I or H that the rule was fitted on (it does
    not extrapolate). ``rule``: another maker's (:func:`host_rule`) instead of this host's."""
    entry = _entry(kind, train, dtype, rule)
    if entry is None or min(T, B, I, H) < 1:
        return None
    rng = entry.get("range")
    if rng is not None and any(not lo <= v <= hi for v, (lo, hi) in zip((T, B, I, H), rng)):
        return None  # outside the measured sizes: no extrapolation
    coef = entry["coef"]
    return coef[0] + sum(c * math.log2(v) for c, v in zip(coef[1:], (T, B, I, H)))


def _sizes(x: Tensor, batch_sizes: Optional[Tensor], hidden: int) -> Optional[Tuple[int, int, int, int]]:
    """(T, B, I, H) of a full batch (T, B, I) or of packed rows (N, I) with their batch sizes; None for
    any other layout."""
    if batch_sizes is None:
        if x.dim() != 3:
            return None
        return int(x.shape[0]), int(x.shape[1]), int(x.shape[2]), hidden
    if x.dim() != 2 or batch_sizes.dim() != 1:
        return None
    T = int(batch_sizes.shape[0])
    return T, (int(batch_sizes[0]) if T else 0), int(x.shape[1]), hidden


def eager_order(work, x: Tensor, batch_sizes: Optional[Tensor], train: bool) -> Sequence[str]:
    """The candidates of an eager call, fastest first by the rule (see the module docstring)."""
    dtype = _dtype_key(work, x)
    sizes = None if dtype is None else _sizes(x, batch_sizes, int(work.weight_hh.shape[1]))
    if sizes is None:
        return DEFAULT_ORDER
    pred = predict(work.cell.kind, train, dtype, *sizes)
    return FUSED_FIRST if pred is not None and pred < 0 else DEFAULT_ORDER


def compiled_order(work, x: Tensor, train: bool) -> Sequence[str]:
    """:func:`eager_order` for a full batch ``x`` (T, B, I) inside ``torch.compile``: the same rule, asked
    without reading T as a number. ``log2 T`` enters the score linearly, so "score below 0" is a comparison
    of T with a threshold computed from B, I and H (the weights' sizes are static under torch.compile; B is
    read, which specializes it). Dynamo then guards on which side of the threshold (and of the rule's range)
    T lies instead of on its value: a new sequence length does not recompile unless it crosses one."""
    dtype = _dtype_key(work, x)
    if dtype is None or x.dim() != 3:
        return DEFAULT_ORDER
    entry = _entry(work.cell.kind, train, dtype)
    B, I, H = int(x.shape[1]), int(work.weight_ih.shape[1]), int(work.weight_hh.shape[1])
    if entry is None or min(B, I, H) < 1:
        return DEFAULT_ORDER
    T = x.shape[0]
    rng = entry.get("range")
    if rng is not None:
        if any(not lo <= v <= hi for v, (lo, hi) in zip((B, I, H), rng[1:])) or T < rng[0][0] or T > rng[0][1]:
            return DEFAULT_ORDER  # outside the measured sizes: no extrapolation
    c0, cT, cB, cI, cH = entry["coef"]
    rest = c0 + cB * math.log2(B) + cI * math.log2(I) + cH * math.log2(H)
    if cT == 0:
        fused = rest < 0
    else:  # rest + cT log2 T < 0
        bound = 2.0 ** (-rest / cT)
        fused = T > bound if cT < 0 else T < bound
    return FUSED_FIRST if fused else DEFAULT_ORDER


def stack_first(work, x: Tensor, batch_sizes: Optional[Tensor], widths: Sequence[int]) -> str:
    """``"fused"`` or ``"native"``: the implementation that the rule predicts faster over a whole stack
    whose layers take inputs of ``widths`` features (the first layer's is ``x``'s), in training. The
    score for the stack is the sum of the layers' scores (their log-odds); a layer
    outside the rule's range (or a case without an entry) gives torch's op, as for one layer."""
    dtype = _dtype_key(work, x)
    sizes = None if dtype is None else _sizes(x, batch_sizes, int(work.weight_hh.shape[1]))
    if sizes is None:
        return DEFAULT_ORDER[0]
    T, B, _, H = sizes
    preds = [predict(work.cell.kind, True, dtype, T, B, width, H) for width in widths]
    if any(p is None for p in preds):
        return DEFAULT_ORDER[0]
    return FUSED_FIRST[0] if sum(preds) < 0 else DEFAULT_ORDER[0]


def host_rule(maker: Optional[str]) -> Dict:
    """The rule fitted on CPUs of ``maker`` (``"AMD"``, ``"Intel"``); for any other, one without entries
    (torch's op first everywhere)."""
    return RULES.get(maker or "", NO_RULE)


NO_RULE: Dict = {"about": "No rule was measured on this host's CPU maker: torch's op goes first.", "rules": {}}

# The rules below are generated: `python benchmarks/fit_dispatch.py --fit` rewrites everything from the
# BEGIN line to the END line (the measurements they were fitted to are in benchmarks/dispatch_data.json).
# BEGIN RULE
RULES: Dict = {'AMD': {'about': 'Fitted by benchmarks/fit_dispatch.py --fit from the AMD points of '
                  "benchmarks/dispatch_data.json: per 'cell/phase/dtype', coefficients (c0, cT, cB, cI, cH) "
                  'of the score c0 + cT log2 T + cB log2 B + cI log2 I + cH log2 H, a logistic regression of '
                  "'the fused kernel was faster' weighted by |log(t_fused / t_native)|; kernel='auto' puts "
                  "the fused kernel before torch's op where the score is below 0, inside 'range' (the "
                  "measured [min, max] of T, B, I, H); outside it, torch's op goes first.",
         'measured': {'machine': 'x86_64, 2 CPUs',
                      'cpu_capability': 'AVX512',
                      'torch': '2.13.0+cpu',
                      'threads': 2,
                      'rounds': 7,
                      'command': 'python benchmarks/fit_dispatch.py --measure --points 24 --rounds 7 --cells '
                                 'lstm'},
         'rules': {'gru/eval/float32': {'coef': [12.4012, -3.2202, -0.8504, 0.0994, 0.5147],
                                        'range': [[3, 784], [2, 185], [1, 500], [5, 946]],
                                        'points': 28,
                                        'wrong_picks': 1,
                                        'worst_regret': 1.026,
                                        'loo_wrong_picks': 3,
                                        'loo_worst_regret': 1.259,
                                        'bench_sizes_wrong': []},
                   'gru/train/float32': {'coef': [7.3185, -3.2983, -0.0245, -0.1391, 0.2722],
                                         'range': [[3, 784], [2, 185], [1, 500], [5, 946]],
                                         'points': 28,
                                         'wrong_picks': 0,
                                         'worst_regret': 1.0,
                                         'loo_wrong_picks': 2,
                                         'loo_worst_regret': 1.108,
                                         'bench_sizes_wrong': []},
                   'lstm/eval/float32': {'coef': [20.1324, -2.0066, -1.8868, -0.4855, 1.4769],
                                         'range': [[2, 867], [1, 192], [1, 315], [4, 976]],
                                         'points': 28,
                                         'wrong_picks': 1,
                                         'worst_regret': 1.017,
                                         'loo_wrong_picks': 5,
                                         'loo_worst_regret': 1.336,
                                         'bench_sizes_wrong': []},
                   'lstm/train/float32': {'coef': [53.4453, -2.679, -4.0867, -1.2228, -0.7913],
                                          'range': [[2, 867], [1, 192], [1, 315], [4, 976]],
                                          'points': 28,
                                          'wrong_picks': 0,
                                          'worst_regret': 1.0,
                                          'loo_wrong_picks': 5,
                                          'loo_worst_regret': 2.474,
                                          'bench_sizes_wrong': []},
                   'rnn_tanh/eval/float32': {'coef': [15.8925, -2.569, -1.1329, 0.0437, -0.067],
                                             'range': [[2, 815], [1, 200], [1, 418], [6, 913]],
                                             'points': 28,
                                             'wrong_picks': 4,
                                             'worst_regret': 1.176,
                                             'loo_wrong_picks': 6,
                                             'loo_worst_regret': 1.795,
                                             'bench_sizes_wrong': []},
                   'rnn_tanh/train/float32': {'coef': [12.6712, -2.9201, -0.206, 0.0998, -0.1967],
                                              'range': [[2, 815], [1, 200], [1, 418], [6, 913]],
                                              'points': 28,
                                              'wrong_picks': 0,
                                              'worst_regret': 1.0,
                                              'loo_wrong_picks': 0,
                                              'loo_worst_regret': 1.0,
                                              'bench_sizes_wrong': []}}},
 'Intel': {'about': 'Fitted by benchmarks/fit_dispatch.py --fit from the Intel points of '
                    "benchmarks/dispatch_data.json: per 'cell/phase/dtype', coefficients (c0, cT, cB, cI, "
                    'cH) of the score c0 + cT log2 T + cB log2 B + cI log2 I + cH log2 H, a logistic '
                    "regression of 'the fused kernel was faster' weighted by |log(t_fused / t_native)|; "
                    "kernel='auto' puts the fused kernel before torch's op where the score is below 0, "
                    "inside 'range' (the measured [min, max] of T, B, I, H); outside it, torch's op goes "
                    'first.',
           'measured': {'machine': 'x86_64, 2 CPUs',
                        'cpu_capability': 'AVX512',
                        'cpu': 'Intel(R) Xeon(R) Processor @ 2.80GHz',
                        'torch': '2.13.0+cpu',
                        'threads': 2,
                        'rounds': 7,
                        'command': 'python benchmarks/fit_dispatch.py --measure --points 48 --rounds 7 (GRU '
                                   "and RNN); the LSTM's points measured again at f74fe3a (after the "
                                   'transposed weight gradients, 431bad0) with --cells lstm'},
           'rules': {'gru/eval/float32': {'coef': [13.2162, -2.7134, -1.0218, -0.0428, -0.1049],
                                          'range': [[2, 784], [1, 203], [1, 500], [4, 946]],
                                          'points': 52,
                                          'wrong_picks': 2,
                                          'worst_regret': 1.203,
                                          'loo_wrong_picks': 3,
                                          'loo_worst_regret': 2.38,
                                          'bench_sizes_wrong': []},
                     'gru/train/float32': {'coef': [-4.1465, -1.9263, 0.5528, -0.4461, 0.7448],
                                           'range': [[2, 784], [1, 203], [1, 500], [4, 946]],
                                           'points': 52,
                                           'wrong_picks': 1,
                                           'worst_regret': 1.122,
                                           'loo_wrong_picks': 2,
                                           'loo_worst_regret': 1.23,
                                           'bench_sizes_wrong': []},
                     'lstm/eval/float32': {'coef': [23.2864, -1.4529, -1.6403, -0.3588, -0.9094],
                                           'range': [[2, 867], [1, 207], [1, 315], [4, 976]],
                                           'points': 52,
                                           'wrong_picks': 8,
                                           'worst_regret': 1.219,
                                           'loo_wrong_picks': 10,
                                           'loo_worst_regret': 1.219,
                                           'bench_sizes_wrong': [[28, 128, 28, 128]]},
                     'lstm/train/float32': {'coef': [23.5819, -0.8071, -2.4735, 0.0527, -1.9414],
                                            'range': [[2, 867], [1, 207], [1, 315], [4, 976]],
                                            'points': 52,
                                            'wrong_picks': 8,
                                            'worst_regret': 1.257,
                                            'loo_wrong_picks': 12,
                                            'loo_worst_regret': 2.777,
                                            'bench_sizes_wrong': []},
                     'rnn_tanh/eval/float32': {'coef': [16.9121, -2.5156, -0.531, -0.0241, -0.514],
                                               'range': [[2, 1003], [1, 215], [1, 418], [4, 993]],
                                               'points': 52,
                                               'wrong_picks': 3,
                                               'worst_regret': 1.157,
                                               'loo_wrong_picks': 7,
                                               'loo_worst_regret': 2.011,
                                               'bench_sizes_wrong': []},
                     'rnn_tanh/train/float32': {'coef': [11.3686, -2.9008, -0.2535, 0.2622, -0.3594],
                                                'range': [[2, 1003], [1, 215], [1, 418], [4, 993]],
                                                'points': 52,
                                                'wrong_picks': 1,
                                                'worst_regret': 1.041,
                                                'loo_wrong_picks': 1,
                                                'loo_worst_regret': 1.041,
                                                'bench_sizes_wrong': []}}}}
# END RULE

#: This host's rule (:func:`host_rule` of :func:`recnorm.kernels.host.cpu_maker`).
RULE: Dict = host_rule(host.cpu_maker())
