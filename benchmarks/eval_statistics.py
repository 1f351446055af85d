"""Eval statistics of per-step batch norm: what ``.eval()`` gives, why it misleads, and what to do about it.

The question (issue 9): a BN-LSTM evaluated with the running averages that ``.eval()`` uses scores far
below the same model evaluated with exact population statistics, and its validation accuracy jumps
between evaluations. This script measures, on real tasks of the evidence engine (sequential 8x8 digits
with batches of 64 and of 16, permuted 14x14 Fashion-MNIST pixels; 3 seeds each),

1. validation accuracy at several points of training under each candidate for the eval statistics
   (running averages with several momenta, a cumulative average, a bias-corrected running average, an
   exact recomputation, the eval batch's own statistics, and eval rules for features that were
   degenerate -- identical across the batch -- in training);
2. ablations at the middle and the end of training that swap exact statistics for running ones at one site, one step
   range, one moment, or one class of features at a time, separate lag from sampling noise, and
   compare the one-step error of the running statistics with the error after the recurrence compounded it.

Method. Training never reads the running statistics (it normalizes with batch statistics; the running
averages only matter for eval), so one training run per (task, seed) serves every candidate. The run
uses the library's defaults except ``momentum=1.0``: after each step every slot's running statistics
then hold exactly that step's batch mean and unbiased variance, which the script reads and folds into
every candidate average itself. The library's own default (momentum 0.1) is run once beside it to
check that the simulated average is the library's (the "self-check" section of the report).
Exact statistics are pooled from fused-kernel batch statistics of the calibration batches, and the zero
rule is written into the statistics (variance 1e30 where a feature is masked) so that the fused kernel
runs it; at the end of every run both shortcuts are checked against the real thing: the public
``recompute_population_statistics``, and the rule as a subclass of ``RecurrentBatchNorm`` (swapped in for
the modules' class; a subclass runs the reference time loop). Nothing under ``src/recnorm/nn`` or the
kernels is changed. The decision and its specification (docs/eval_statistics.md, first sections) are
text in this script, with every number filled in from the measurements.

Usage::

    PYTHONPATH=src python benchmarks/eval_statistics.py                # about 15 min on 2 idle cores
    PYTHONPATH=src python benchmarks/eval_statistics.py --quick        # a minute: 1 seed, short runs
    PYTHONPATH=src python benchmarks/eval_statistics.py --check-tests  # the pending tests today and under the rule

Finished (task, seed) runs are kept in ``runs/eval_statistics/`` and reused, so an interrupted run
resumes; ``--fresh`` ignores them. The report goes to ``docs/eval_statistics.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

import recnorm
from recnorm.experiments.config import RunConfig
from recnorm.experiments.model import SequenceModel, build_model
from recnorm.experiments.train import make_task

# ---------------------------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2)
TASKS: Dict[str, Dict[str, Any]] = {
    # `recnorm train --task digits --norm batch`: the RunConfig defaults (500 steps, Adam 1e-3, batch 64).
    "digits": {
        "task": "digits",
        "task_options": {},
        "steps": 500,
        "checkpoints": [10, 25, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500],
        "valid_examples": None,  # all 250
    },
    # The same with batches of 16: four times fewer rows behind every slot's statistics.
    "digits_b16": {
        "task": "digits",
        "task_options": {},
        "batch_size": 16,
        "steps": 500,
        "checkpoints": [10, 25, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500],
        "valid_examples": None,
    },
    # Permuted 14x14 Fashion-MNIST pixels (T = 196), the second report.
    "fashion_permuted": {
        "task": "fashion_permuted",
        "task_options": {"downsample": True},
        "steps": 1000,
        "checkpoints": [25, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000],
        "valid_examples": 1024,  # the first 1024 of the 5000 validation images
    },
}
QUICK = {"digits": {"steps": 60, "checkpoints": [25, 60]}, "digits_b16": {"steps": 60, "checkpoints": [25, 60]},
         "fashion_permuted": {"steps": 60, "checkpoints": [25, 60], "valid_examples": 512}}
EVAL_BATCH = 256  # as the trainer's eval_batch_size
CALIBRATION_BATCHES = 20  # as the trainer's popstat_batches
NOISE_BATCHES = 100  # frozen-weight running average (lag removed, noise kept)
SITES = ("ih", "hh", "c")
#: Tolerance factor of the stateless zero rule: var <= (ZERO_RULE_FACTOR * u * |mean|)^2 (training uses 16).
ZERO_RULE_FACTOR = 32.0
#: Rounding tolerance of the training rule (recnorm.nn.stats.degenerate_features): var <= (16 u |mean|)^2.
U32 = torch.finfo(torch.float32).eps

# Running-average specs: (kind, momentum, unbiased). "ema" is the library's update with a fixed factor;
# "cum" the cumulative average (momentum None); "debiased" uses the factor max(momentum, 1/k) at the
# k-th update of a slot (a cumulative average for the first 1/momentum updates, then the EMA).
AVERAGES: Dict[str, Tuple[str, Optional[float], bool]] = {
    "ema0.1": ("ema", 0.1, True),
    "ema0.01": ("ema", 0.01, True),
    "ema0.3": ("ema", 0.3, True),
    "last": ("ema", 1.0, True),
    "cum": ("cum", None, True),
    "deb0.1": ("debiased", 0.1, True),
    "deb0.3": ("debiased", 0.3, True),
    "ema0.1-biased": ("ema", 0.1, False),
}


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """As the trainer does before building the model."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def batch_norms(model: torch.nn.Module) -> Dict[str, recnorm.RecurrentBatchNorm]:
    """``{"ih"|"hh"|"c": module}`` of the (single-layer) recurrent stack."""
    rnn = model.rnn
    return {"ih": rnn.norm_ih_l0, "hh": rnn.norm_hh_l0, "c": rnn.norm_c_l0}


def snapshot(model: torch.nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def restore(model: torch.nn.Module, saved: Dict[str, Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(saved[k])


@contextlib.contextmanager
def kept_state(model: torch.nn.Module) -> Iterator[None]:
    """Buffers, train/eval modes and the torch RNG come back as they were."""
    saved, rng = snapshot(model), torch.get_rng_state()
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        restore(model, saved)
        for m, mode in modes.items():
            m.training = mode
        for bn in batch_norms(model).values():
            bn._last_slot = None
        torch.set_rng_state(rng)


Stats = Dict[str, Tuple[Tensor, Tensor]]  # site -> (mean (T, F), unbiased var (T, F))


def set_statistics(model: torch.nn.Module, stats: Stats, T: int) -> None:
    """Load per-step statistics into slots 0..T-1; every later slot is untracked (eval reuses T-1)."""
    with torch.no_grad():
        for site, bn in batch_norms(model).items():
            mean, var = stats[site]
            bn.reset_running_stats()
            bn.running_mean[:T] = mean
            bn.running_var[:T] = var
            bn.num_batches_tracked[:T] = 1
            bn._last_slot = None


def read_statistics(model: torch.nn.Module, T: int) -> Stats:
    return {site: (bn.running_mean[:T].clone(), bn.running_var[:T].clone()) for site, bn in batch_norms(model).items()}


def degenerate(mean: Tensor, var_biased: Tensor, factor: float = 16.0) -> Tensor:
    """The training rule (recnorm.nn.stats.degenerate_features), with a tolerance factor."""
    return var_biased <= (factor * U32 * mean).square()


def forward(model: SequenceModel, batch: Any) -> Tensor:
    return model(batch.x, batch.lengths)


# ---------------------------------------------------------------------------------------------------
# Candidate rules: a subclass of RecurrentBatchNorm (prototype; runs the reference loop)
# ---------------------------------------------------------------------------------------------------


class ZeroRuleBN(recnorm.RecurrentBatchNorm):
    """Eval: the library's normalization, except that features marked in ``zero_mask[slot]`` output
    exactly what a degenerate feature outputs in training (normalized value 0: the output is the shift).
    ``zero_mask=None`` is the unchanged library rule (used to check that the prototype path reproduces
    the library's numbers)."""

    zero_mask: Optional[Tensor] = None  # (T, F) bool

    def forward(self, x: Tensor, step: int = 0, mask: Optional[Tensor] = None) -> Tensor:
        y = super().forward(x, step, mask)
        if self.training or self.zero_mask is None:
            return y
        row = self.zero_mask[min(int(step), self.zero_mask.shape[0] - 1)]
        shift = self.bias if self.bias is not None else torch.zeros((), dtype=y.dtype)
        return torch.where(row, shift.expand_as(y), y)


@contextlib.contextmanager
def zero_rule(model: torch.nn.Module, masks: Optional[Dict[str, Tensor]]) -> Iterator[None]:
    """Inside the block the batch norms are :class:`ZeroRuleBN` with ``masks`` (site -> (T, F) bool)."""
    bns = batch_norms(model)
    try:
        for site, bn in bns.items():
            bn.__class__ = ZeroRuleBN
            bn.zero_mask = None if masks is None else masks[site]
        yield
    finally:
        for bn in bns.values():
            bn.__class__ = recnorm.RecurrentBatchNorm
            if "zero_mask" in bn.__dict__:
                del bn.zero_mask


# ---------------------------------------------------------------------------------------------------
# Running averages, simulated from the per-step batch statistics
# ---------------------------------------------------------------------------------------------------


class Tracker:
    """Every candidate running average (:data:`AVERAGES`) and the degenerate records of every slot.

    ``observe`` reads the batch statistics the last training step wrote into the slots (the run uses
    momentum 1.0, so each slot holds exactly its last batch mean and unbiased variance).
    """

    def __init__(self, model: torch.nn.Module, T: int, n: int) -> None:
        self.T, self.n, self.k = T, n, 0
        self.unbias = n / (n - 1)
        self.avg: Dict[str, Dict[str, List[Tensor]]] = {}
        self.deg_count: Dict[str, Tensor] = {}
        self.deg_ema: Dict[str, Tensor] = {}
        self.deg_last: Dict[str, Tensor] = {}
        for site, bn in batch_norms(model).items():
            F_ = bn.num_features
            self.avg[site] = {name: [torch.zeros(T, F_), torch.ones(T, F_)] for name in AVERAGES}
            self.deg_count[site] = torch.zeros(T, F_, dtype=torch.int64)
            self.deg_ema[site] = torch.zeros(T, F_)
            self.deg_last[site] = torch.zeros(T, F_, dtype=torch.bool)

    @torch.no_grad()
    def observe(self, model: torch.nn.Module) -> None:
        self.k += 1
        for site, bn in batch_norms(model).items():
            mean = bn.running_mean[: self.T]
            unbiased = bn.running_var[: self.T]
            biased = unbiased / self.unbias
            for name, (kind, momentum, use_unbiased) in AVERAGES.items():
                factor = {"ema": momentum, "cum": 1.0 / self.k, "debiased": max(momentum or 0.0, 1.0 / self.k)}[kind]
                m, v = self.avg[site][name]
                m.lerp_(mean, factor)
                v.lerp_(unbiased if use_unbiased else biased, factor)
            deg = degenerate(mean, biased)
            self.deg_count[site] += deg
            self.deg_ema[site].lerp_(deg.float(), 0.1)
            self.deg_last[site] = deg

    def stats(self, name: str) -> Stats:
        return {site: (self.avg[site][name][0].clone(), self.avg[site][name][1].clone()) for site in SITES}


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model: SequenceModel, task: Any, batches: List[Any], batch_stats: bool = False) -> float:
    """Pooled validation accuracy with the model in eval mode (``batch_stats``: the recurrent stack in
    training mode, i.e. each eval batch normalized by its own statistics; buffers restored)."""
    with kept_state(model):
        model.eval()
        if batch_stats:
            model.rnn.train()
        correct = count = 0.0
        for batch in batches:
            s, c = task.metrics(forward(model, batch), batch)["accuracy"]
            correct += s
            count += c
    return correct / count


def calibrate(model: SequenceModel, batches: List[Any], T: int) -> Stats:
    """Exact population statistics through the public API (``recnorm.recompute_population_statistics``,
    which runs the reference loop), returned; the model's buffers are restored."""
    with kept_state(model):
        recnorm.recompute_population_statistics(model, batches, forward_fn=forward)
        return read_statistics(model, T)


@torch.no_grad()
def batch_statistics(model: SequenceModel, batches: List[Any], T: int) -> List[Stats]:
    """The per-step batch statistics (mean, unbiased var) of each batch in training mode, on the fused
    kernel (the run's momentum is 1.0, so after a forward the slots hold them); buffers restored."""
    out = []
    with kept_state(model):
        model.train()
        for batch in batches:
            forward(model, batch)
            out.append(read_statistics(model, T))
    return out


def pool(per_batch: List[Stats], n: int) -> Stats:
    """Exact population statistics from per-batch statistics of ``n`` rows each: the mean and unbiased
    variance of all rows, pooled in float64 as ``recompute_population_statistics`` does."""
    out = {}
    N = n * len(per_batch)
    for site in SITES:
        means = torch.stack([s[site][0] for s in per_batch]).double()
        biased = torch.stack([s[site][1] for s in per_batch]).double() * (n - 1) / n
        mean = means.mean(0)
        var = ((n * (biased + means * means)).sum(0) - N * mean * mean).clamp(min=0) / (N - 1)
        out[site] = (mean.float(), var.float())
    return out


def zero_masks(kind: str, tracker: Tracker, stats: Stats) -> Dict[str, Tensor]:
    """Features an eval rule normalizes to 0, per site ((T, F) bool)."""
    masks = {}
    for site in SITES:
        mean, var = stats[site]
        if kind == "last":  # degenerate in the slot's last training update (one bit per feature)
            masks[site] = tracker.deg_last[site].clone()
        elif kind == "frac":  # running average (momentum 0.1) of the degenerate indicator >= 1/2
            masks[site] = tracker.deg_ema[site] >= 0.5
        elif kind == "var":  # no extra state: the training rule applied to the slot's statistics
            masks[site] = degenerate(mean, var, factor=ZERO_RULE_FACTOR)
        elif kind == "var-eps":  # no extra state: running variance below 1% of eps
            masks[site] = var <= 1e-2 * 1e-5
        else:
            raise ValueError(kind)
    return masks


def with_zero_rule(stats: Stats, masks: Dict[str, Tensor]) -> Stats:
    """The zero rule written into the statistics: a variance of 1e30 makes the normalized value
    (x - mean) * rsqrt(var + eps) vanish (below 1e-14 for |x - mean| < 10), so the fused kernel runs
    the rule too. :class:`ZeroRuleBN` is the rule itself; the report checks that both agree."""
    return {site: (m.clone(), torch.where(masks[site], torch.full_like(v, 1e30), v)) for site, (m, v) in stats.items()}


def evaluate_stats(model: SequenceModel, task: Any, valid: List[Any], stats: Stats, T: int) -> float:
    with kept_state(model):
        set_statistics(model, stats, T)
        return accuracy(model, task, valid)


def candidates(model: SequenceModel, task: Any, tracker: Tracker, valid: List[Any], exact: Stats, exact4: Stats,
               T: int) -> Dict[str, float]:
    """Validation accuracy under every candidate."""
    res: Dict[str, float] = {}
    for name in AVERAGES:
        res[name] = evaluate_stats(model, task, valid, tracker.stats(name), T)
    res["exact"] = evaluate_stats(model, task, valid, exact, T)
    res["exact4"] = evaluate_stats(model, task, valid, exact4, T)
    res["batch"] = accuracy(model, task, valid, batch_stats=True)

    def zero(base_name: str, kind: str) -> float:
        base = tracker.stats(base_name)
        return evaluate_stats(model, task, valid, with_zero_rule(base, zero_masks(kind, tracker, base)), T)

    res["ema0.1+zero:var"] = zero("ema0.1", "var")
    for kind in ("last", "frac", "var", "var-eps"):
        res[f"deb0.1+zero:{kind}"] = zero("deb0.1", kind)
    res["deb0.3+zero:var"] = zero("deb0.3", "var")
    res["last+zero:var"] = zero("last", "var")
    res["exact+zero:var"] = evaluate_stats(model, task, valid, with_zero_rule(exact, zero_masks("var", tracker, exact)), T)
    return res


# ---------------------------------------------------------------------------------------------------
# Why: ablations at the end of training
# ---------------------------------------------------------------------------------------------------


def mix(exact: Stats, running: Stats, where: Callable[[str], Optional[Tensor]], moment: str = "both") -> Stats:
    """Exact statistics, with the running ones swapped in where ``where(site)`` says ((T, F) bool, or
    None for nowhere); ``moment`` "mean" or "var" swaps only that moment."""
    out = {}
    for site in SITES:
        (me, ve), (mr, vr) = exact[site], running[site]
        w = where(site)
        if w is None:
            out[site] = (me.clone(), ve.clone())
            continue
        m = torch.where(w, mr, me) if moment in ("both", "mean") else me.clone()
        v = torch.where(w, vr, ve) if moment in ("both", "var") else ve.clone()
        out[site] = (m, v)
    return out


@torch.no_grad()
def manual_lstm(model: SequenceModel, x: Tensor, stats: Stats, start: Optional[List[Tuple[Tensor, Tensor]]] = None
                ) -> Tuple[List[Tuple[Tensor, Tensor]], Tensor]:
    """The LSTM's eval-mode time loop written out (single layer, full-length batch): returns the states
    ``[(h_t, c_t)]`` and the head's logits at the last step. With ``start`` (the states of another run),
    every step starts from that run's previous state: one step of error, none carried over."""
    rnn, bns = model.rnn, batch_norms(model)
    T, B, _ = x.shape
    H = rnn.hidden_size

    def norm(site: str, v: Tensor, t: int) -> Tensor:
        bn = bns[site]
        mean, var = stats[site]
        y = (v - mean[t]) * torch.rsqrt(var[t] + bn.eps) * bn.weight
        return y if bn.bias is None else y + bn.bias

    h = c = torch.zeros(B, H)
    states = []
    for t in range(T):
        if start is not None and t > 0:
            h, c = start[t - 1]
        gi = norm("ih", x[t] @ rnn.weight_ih_l0.t(), t) + rnn.bias_ih_l0
        gh = norm("hh", h @ rnn.weight_hh_l0.t(), t) + rnn.bias_hh_l0
        i, f, g, o = (gi + gh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(norm("c", c, t))
        states.append((h, c))
    return states, model.head(h)


@torch.no_grad()
def compounding(model: SequenceModel, valid: List[Any], exact: Stats, running: Stats) -> Dict[str, float]:
    """RMS error of h_t (per unit, over the validation examples) of the running statistics against the
    exact ones: after one step from the exact state ("local") and after the whole recurrence ("free")."""
    x = torch.cat([b.x for b in valid], 1)
    ref, logits = manual_lstm(model, x, exact)
    with kept_state(model):  # the written-out loop is the library's eval: check it once
        set_statistics(model, exact, x.shape[0])
        model.eval()
        lib = forward(model, type(valid[0])(x, torch.cat([b.y for b in valid])))
    check = float((lib[-1] - logits).abs().max())
    free, _ = manual_lstm(model, x, running)
    local, _ = manual_lstm(model, x, running, start=ref)

    def rms(a: Tensor, b: Tensor) -> float:
        return float((a - b).square().mean().sqrt())

    e_local = [rms(local[t][0], ref[t][0]) for t in range(len(ref))]
    e_free = [rms(free[t][0], ref[t][0]) for t in range(len(ref))]
    T = len(ref)
    return {
        "check_max_abs_logit_diff": check,
        "local_mean": float(np.mean(e_local)),
        "local_max": float(np.max(e_local)),
        "local_last": e_local[-1],
        "free_mean": float(np.mean(e_free)),
        "free_last": e_free[-1],
        "h_rms": float(ref[-1][0].square().mean().sqrt()),
        "free_quarters": [float(np.mean(e_free[q * T // 4:(q + 1) * T // 4])) for q in range(4)],
        "local_quarters": [float(np.mean(e_local[q * T // 4:(q + 1) * T // 4])) for q in range(4)],
    }


def feature_classes(per_batch: List[Stats], n: int) -> Dict[str, Tensor]:
    """Per site, (T, F) int: 2 where a feature was degenerate in every calibration batch ("constant"),
    1 in some but not all ("sometimes constant"), 0 in none ("regular")."""
    out = {}
    for site in SITES:
        deg = torch.stack([degenerate(s[site][0], s[site][1] * (n - 1) / n) for s in per_batch]).float().mean(0)
        out[site] = torch.where(deg == 1, 2, torch.where(deg > 0, 1, 0))
    return out


def mismatch(exact: Stats, running: Stats, classes: Dict[str, Tensor], eps: float) -> Dict[str, Dict[str, Any]]:
    """Per site and feature class: how far the running statistics are from the exact ones, in what
    eval feeds the cell: the mean shift |mu_R - mu_E| / sqrt(var_R + eps) (the normalized value the
    running statistics give an input at the exact mean) and the variance ratio (var_E + eps) / (var_R + eps)."""
    out: Dict[str, Dict[str, Any]] = {}
    for site in SITES:
        (me, ve), (mr, vr) = exact[site], running[site]
        shift = (mr - me).abs() / (vr + eps).sqrt()
        ratio = (ve + eps) / (vr + eps)
        for cls, label in ((2, "constant"), (1, "sometimes"), (0, "regular")):
            sel = classes[site] == cls
            k = int(sel.sum())
            entry: Dict[str, Any] = {"count": k, "share": k / sel.numel()}
            if k:
                s, r = shift[sel], ratio[sel]
                entry.update(shift_median=float(s.median()), shift_p99=float(torch.quantile(s, 0.99)),
                             shift_max=float(s.max()),
                             log_ratio_median=float(r.log().abs().median()), ratio_max=float(r.max()),
                             ratio_min=float(r.min()))
            out[f"{site}/{label}"] = entry
    return out


def ablations(model: SequenceModel, task: Any, tracker: Tracker, valid: List[Any], exact: Stats,
              classes: Dict[str, Tensor], T: int, noise: List[Stats], masks: Optional[Dict[str, Tensor]] = None
              ) -> Dict[str, float]:
    """Accuracy with the library's running statistics (``ema0.1``) swapped in for the exact ones piece by
    piece; with ``masks``, every variant also runs the zero rule with those masks."""
    running = tracker.stats("ema0.1")

    def acc(stats: Stats) -> float:
        return evaluate_stats(model, task, valid, stats if masks is None else with_zero_rule(stats, masks), T)

    def sites(chosen: Sequence[str]) -> Callable[[str], Optional[Tensor]]:
        return lambda site: torch.ones_like(classes[site], dtype=torch.bool) if site in chosen else None

    def steps(lo: int, hi: int) -> Callable[[str], Tensor]:
        def where(site: str) -> Tensor:
            w = torch.zeros_like(classes[site], dtype=torch.bool)
            w[lo:hi] = True
            return w
        return where

    def cls(c: int, invert: bool = False) -> Callable[[str], Tensor]:
        return lambda site: (classes[site] != c) if invert else (classes[site] == c)

    everywhere = sites(SITES)
    res: Dict[str, float] = {}
    res["exact"] = acc(exact)
    res["running"] = acc(mix(exact, running, everywhere))
    for s in SITES:
        res[f"running at {s} only"] = acc(mix(exact, running, sites([s])))
        res[f"exact at {s} only"] = acc(mix(exact, running, sites([o for o in SITES if o != s])))
    res["running mean, exact var"] = acc(mix(exact, running, everywhere, "mean"))
    res["exact mean, running var"] = acc(mix(exact, running, everywhere, "var"))
    for q in range(4):
        lo, hi = q * T // 4, (q + 1) * T // 4
        res[f"running at steps {lo}-{hi - 1} only"] = acc(mix(exact, running, steps(lo, hi)))
    for c, label in ((2, "constant"), (1, "sometimes constant"), (0, "regular")):
        res[f"running at {label} features only"] = acc(mix(exact, running, cls(c)))
        res[f"exact at {label} features only"] = acc(mix(exact, running, cls(c, invert=True)))
    res["running, biased variance"] = acc(tracker.stats("ema0.1-biased"))
    # Lag removed, noise kept: each average continued over fresh batches at the frozen final weights.
    for name, momentum in (("ema0.1", 0.1), ("deb0.3", 0.3), ("last", 1.0)):
        frozen = tracker.stats(name)
        for s in noise:
            for site in SITES:
                frozen[site][0].lerp_(s[site][0], momentum)
                frozen[site][1].lerp_(s[site][1], momentum)
        res[f"weights frozen, momentum {momentum:g} (noise, no lag)"] = acc(frozen)
    return res


def make_config(spec: Dict[str, Any], seed: int, momentum: float) -> RunConfig:
    return RunConfig(task=spec["task"], task_options=dict(spec["task_options"]), norm="batch",
                     norm_kwargs={"momentum": momentum}, steps=spec["steps"], seed=seed,
                     batch_size=spec.get("batch_size", 64))


def valid_batches(task: Any, limit: Optional[int]) -> List[Any]:
    out, seen = [], 0
    for batch in task.batches("valid", EVAL_BATCH, seed=0):
        if limit is not None and seen >= limit:
            break
        out.append(batch)
        seen += batch.batch_size
    return out


def train_run(spec: Dict[str, Any], seed: int, log: Callable[[str], None]) -> Dict[str, Any]:
    """Train one model (library defaults, momentum 1.0 to read the batch statistics) and evaluate every
    candidate at the checkpoints; ablations at the middle and the last checkpoint; checks at the last."""
    config = make_config(spec, seed, momentum=1.0)
    config.validate()
    task = make_task(config.task, dict(config.task_options))
    T, n = task.seq_len, config.batch_size
    seed_everything(seed)
    model = build_model(config, task)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    stream = task.batches("train", n, seed=seed)
    calib_stream = task.batches("train", n, seed=seed + 2_000_003)  # the trainer's popstat batches
    calib = [next(calib_stream) for _ in range(CALIBRATION_BATCHES)]
    noise_stream = task.batches("train", n, seed=seed + 3_000_017)
    valid = valid_batches(task, spec["valid_examples"])
    tracker = Tracker(model, T, n)
    marks = spec["checkpoints"]
    ablate_at = {marks[len(marks) // 2], marks[-1]}
    checkpoints: Dict[str, Dict[str, float]] = {}
    abl: Dict[str, Dict[str, Dict[str, float]]] = {}
    result: Dict[str, Any] = {}
    t_train = t_eval = 0.0
    for step in range(1, config.steps + 1):
        t0 = time.perf_counter()
        batch = next(stream)
        loss = task.loss(forward(model, batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        optimizer.step()
        tracker.observe(model)
        t_train += time.perf_counter() - t0
        if step not in marks:
            continue
        t0 = time.perf_counter()
        per_batch = batch_statistics(model, calib, T)
        exact = pool(per_batch, n)
        res = candidates(model, task, tracker, valid, exact, pool(per_batch[:4], n), T)
        checkpoints[str(step)] = res
        if step in ablate_at:
            classes = feature_classes(per_batch, n)
            noise = batch_statistics(model, [next(noise_stream) for _ in range(NOISE_BATCHES)], T)
            deb = tracker.stats("deb0.1")
            abl[str(step)] = {
                "plain": ablations(model, task, tracker, valid, exact, classes, T, noise),
                "zero rule": ablations(model, task, tracker, valid, exact, classes, T, noise,
                                       masks=zero_masks("var", tracker, deb)),
            }
        if step == config.steps:
            result["final"] = final_analysis(model, task, tracker, valid, calib, exact, per_batch, T, n, res)
        t_eval += time.perf_counter() - t0
        log(f"{spec['task']} seed {seed} step {step}: ema0.1 {res['ema0.1']:.3f} exact {res['exact']:.3f} "
            f"({t_train:.0f} s train, {t_eval:.0f} s eval)")
    result.update(checkpoints=checkpoints, ablations=abl, seconds={"train": t_train, "eval": t_eval}, T=T,
                  valid_examples=sum(b.batch_size for b in valid))
    return result


def final_analysis(model: SequenceModel, task: Any, tracker: Tracker, valid: List[Any], calib: List[Any],
                   exact: Stats, per_batch: List[Stats], T: int, n: int, res: Dict[str, float]) -> Dict[str, Any]:
    """At the end of training: how far the running statistics are from exact, per feature class; the
    compounding through the recurrence; and the checks of the shortcuts this script takes."""
    classes = feature_classes(per_batch, n)
    eps = batch_norms(model)["ih"].eps
    running = tracker.stats("ema0.1")
    out: Dict[str, Any] = {
        "mismatch": mismatch(exact, running, classes, eps),
        "compounding": compounding(model, valid, with_zero_rule(exact, zero_masks("var", tracker, exact)), running),
        "constant_by_step": {s: (classes[s] == 2).float().mean(1).tolist() for s in SITES},
        "sometimes_by_step": {s: (classes[s] == 1).float().mean(1).tolist() for s in SITES},
        "degenerate_ever": {s: float((tracker.deg_count[s] > 0).float().mean()) for s in SITES},
        "degenerate_always": {s: float((tracker.deg_count[s] == tracker.k).float().mean()) for s in SITES},
    }
    checks: Dict[str, float] = {}
    # exact statistics pooled from fused batch statistics == the public recompute_population_statistics
    public = calibrate(model, calib, T)
    checks["exact_public_accuracy"] = evaluate_stats(model, task, valid, public, T)
    checks["exact_pooled_accuracy"] = res["exact"]
    checks["exact_max_abs_mean_diff"] = max(float((public[s][0] - exact[s][0]).abs().max()) for s in SITES)
    checks["exact_max_abs_var_diff"] = max(float((public[s][1] - exact[s][1]).abs().max()) for s in SITES)
    # the prototype path (a subclass, reference loop) with the unchanged rule == the library (fused kernel)
    with kept_state(model):
        set_statistics(model, running, T)
        with zero_rule(model, None):
            checks["ema0.1_prototype_accuracy"] = accuracy(model, task, valid)
        masks = zero_masks("var", tracker, tracker.stats("deb0.1"))
        set_statistics(model, tracker.stats("deb0.1"), T)
        with zero_rule(model, masks):
            checks["deb0.1+zero:var_prototype_accuracy"] = accuracy(model, task, valid)
    checks["ema0.1_library_accuracy"] = res["ema0.1"]
    checks["deb0.1+zero:var_emulated_accuracy"] = res["deb0.1+zero:var"]
    out["checks"] = checks
    return out


def self_check(spec: Dict[str, Any], seed: int, steps: int) -> Dict[str, Any]:
    """The library's default (momentum 0.1, fused kernel) trained beside the momentum-1.0 run: same
    trajectory, and its running averages equal the simulated ``ema0.1``."""
    started = time.perf_counter()
    spec = dict(spec, steps=steps)
    out: Dict[str, Any] = {}
    models = {}
    for momentum in (0.1, 1.0):
        config = make_config(spec, seed, momentum)
        task = make_task(config.task, dict(config.task_options))
        seed_everything(seed)
        model = build_model(config, task)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=config.lr)
        stream = task.batches("train", config.batch_size, seed=seed)
        tracker = Tracker(model, task.seq_len, config.batch_size)
        for _ in range(steps):
            batch = next(stream)
            loss = task.loss(forward(model, batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.clip)
            optimizer.step()
            tracker.observe(model)
        models[momentum] = (model, tracker, task)
    lib, _, task = models[0.1]
    cap, tracker, _ = models[1.0]
    T = task.seq_len
    valid = valid_batches(task, spec["valid_examples"])
    calib_stream = task.batches("train", 64, seed=seed + 2_000_003)
    calib = [next(calib_stream) for _ in range(CALIBRATION_BATCHES)]
    out["max_abs_weight_diff"] = max(float((p - q).detach().abs().max()) for p, q in zip(lib.parameters(), cap.parameters()))
    sim = tracker.stats("ema0.1")
    diffs = []
    for site, bn in batch_norms(lib).items():
        diffs.append(float((bn.running_mean[:T] - sim[site][0]).abs().max()))
        diffs.append(float(((bn.running_var[:T] - sim[site][1]).abs() / sim[site][1].abs().clamp_min(1e-30)).max()))
    out["max_abs_mean_diff"], out["max_rel_var_diff"] = max(diffs[0::2]), max(diffs[1::2])
    out["library_eval"] = accuracy(lib, task, valid)  # what .eval() gives a user (fused kernel)
    with kept_state(lib):
        lib.rnn.kernel = "reference"
        out["library_eval_reference"] = accuracy(lib, task, valid)
        lib.rnn.kernel = None
    with kept_state(cap):
        set_statistics(cap, sim, T)
        out["simulated_eval"] = accuracy(cap, task, valid)
        with zero_rule(cap, None):
            out["simulated_eval_prototype"] = accuracy(cap, task, valid)
    out["library_exact"] = accuracy_exact(lib, task, valid, calib)
    out["steps"] = steps
    out["seconds"] = time.perf_counter() - started
    return out


def accuracy_exact(model: SequenceModel, task: Any, valid: List[Any], calib: List[Any]) -> float:
    with kept_state(model):
        recnorm.recompute_population_statistics(model, calib, forward_fn=forward)
        return accuracy(model, task, valid)


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------

LABELS = {
    "ema0.1": "running average, momentum 0.1 (**today's `.eval()`**)",
    "ema0.01": "running average, momentum 0.01",
    "ema0.3": "running average, momentum 0.3",
    "last": "last training batch's statistics (momentum 1)",
    "cum": "cumulative average since reset (momentum None)",
    "ema0.1-biased": "running average, momentum 0.1, biased variance",
    "deb0.1": "bias-corrected average, factor max(0.1, 1/k) (R1)",
    "deb0.3": "bias-corrected average, factor max(0.3, 1/k)",
    "exact": "exact, 20 training batches (`recompute_population_statistics`)",
    "exact4": "exact, 4 training batches",
    "batch": "each eval batch's own statistics (256 rows)",
    "ema0.1+zero:var": "momentum 0.1 + zero rule from the running statistics (R2 without R1)",
    "deb0.1+zero:last": "R1 + zero rule, mask = degenerate in the slot's last update (1 bit/feature)",
    "deb0.1+zero:frac": "R1 + zero rule, mask = running share (momentum 0.1) of degenerate updates >= 1/2",
    "deb0.1+zero:var-eps": "R1 + zero rule, mask = running var <= 0.01 eps",
    "deb0.1+zero:var": "**R1 + R2: bias-corrected average + zero rule from the running statistics (decided)**",
    "deb0.3+zero:var": "R1 + R2 with momentum 0.3",
    "last+zero:var": "last batch's statistics + R2",
    "exact+zero:var": "exact + zero rule from the statistics (the decided rule after `calibrate`)",
}
KEY = ["ema0.1", "deb0.1+zero:var", "exact", "batch"]


def fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def summarize(runs: List[Dict[str, Any]], name: str, skip: int) -> Dict[str, float]:
    """Over seeds: final accuracy (mean, min, max), mean and worst shortfall against exact over the
    checkpoints, and the jumpiness: mean |change| between consecutive evaluations after the first
    ``skip`` checkpoints."""
    finals, short, worst, jumps = [], [], [], []
    for r in runs:
        steps = list(r["checkpoints"])
        acc = [r["checkpoints"][s][name] for s in steps]
        exact = [r["checkpoints"][s]["exact"] for s in steps]
        finals.append(acc[-1])
        gaps = [e - a for a, e in zip(acc, exact)]
        short.append(mean(gaps))
        worst.append(max(gaps))
        tail = acc[skip:]
        jumps.append(mean([abs(b - a) for a, b in zip(tail, tail[1:])]))
    return {"final": mean(finals), "final_min": min(finals), "final_max": max(finals), "short": mean(short),
            "worst": max(worst), "jump": mean(jumps)}


def report(results: Dict[str, Dict[int, Dict[str, Any]]], check: Dict[str, Any], meta: Dict[str, Any]) -> str:
    L: List[str] = []
    w = L.append
    w("# Eval statistics of per-step batch norm: measurements and the decided rule")
    w("")
    w(f"Generated by `PYTHONPATH=src python benchmarks/eval_statistics.py` ({meta['when']}, "
      f"{meta['minutes']:.0f} min of run time (training and evaluation, summed over the runs) on {meta['cpus']} shared CPU cores, torch {torch.__version__}). "
      "Do not edit by hand: change the script and re-run it.")
    w("")
    w(DECISION.format(**decision_numbers(results)))
    w("")
    w("## Set-up")
    w("")
    for key, spec in TASKS.items():
        runs = list(results.get(key, {}).values())
        if not runs:
            continue
        marks = list(runs[0]["checkpoints"])
        w(f"* **{key}** ({spec['task']}, options {json.dumps(spec['task_options'])}): T = {runs[0]['T']}, "
          f"batch {spec.get('batch_size', 64)}, {marks[-1]} training steps, evaluated at steps {', '.join(marks)} on "
          f"{runs[0]['valid_examples']} validation examples; seeds {', '.join(map(str, sorted(results[key])))}.")
    w("* Model and training: the evidence engine's `SequenceModel` (`recnorm.LSTM(1, 64, norm=\"batch\")`, the "
      "default options: gain_init 0.1, max_steps 1000, eps 1e-5; a linear head on the last step), the "
      "`RunConfig` defaults (Adam 1e-3, batch 64 unless said, gradient clipping at 1, the trainer's seeding, data order and "
      "calibration batches). The digits run is `recnorm train --task digits --norm batch`.")
    w("* One training run per (task, seed) serves every candidate: training normalizes with batch statistics and "
      "never reads the running ones. The run uses `momentum=1.0`, so after each step every slot holds that step's "
      "batch mean and unbiased variance; the script folds them into each candidate average itself. Exact "
      f"statistics pool the batch statistics of the trainer's {CALIBRATION_BATCHES} calibration batches (as "
      "`recompute_population_statistics` does); the zero rule is written into the statistics (variance 1e30 "
      "where a feature is masked, so the fused kernel applies it). The self-checks below show that each of these "
      "shortcuts gives the library's own numbers.")
    w("* Evaluation uses the fused kernel (`kernel='auto'`), as a user's `.eval()` does.")
    w("")
    w("## Self-checks")
    w("")
    rows = [
        ["weights after training, momentum 0.1 vs. 1.0 (max abs diff)", f"{check['max_abs_weight_diff']:.1e}"],
        ["library running mean vs. simulated momentum 0.1 (max abs diff)", f"{check['max_abs_mean_diff']:.1e}"],
        ["library running var vs. simulated (max relative diff)", f"{check['max_rel_var_diff']:.1e}"],
        ["valid accuracy, library `.eval()` (fused kernel)", fmt(check["library_eval"])],
        ["valid accuracy, library `.eval()` (reference kernel)", fmt(check["library_eval_reference"])],
        ["valid accuracy, simulated momentum 0.1", fmt(check["simulated_eval"])],
        ["valid accuracy, library after `recompute_population_statistics`", fmt(check["library_exact"])],
    ]
    w(f"Digits, seed 0, {check['steps']} steps: the library's default (momentum 0.1) trained beside the "
      "momentum-1.0 run. The issue reported 0.636 with running averages and 0.864 with recomputed statistics.")
    w("")
    L.extend(table(["check", "value"], rows))
    rows = []
    for key, runs in results.items():
        for seed, r in sorted(runs.items()):
            c = r["final"]["checks"]
            rows.append([key, str(seed), f"{fmt(c['exact_public_accuracy'])} / {fmt(c['exact_pooled_accuracy'])}",
                         f"{max(c['exact_max_abs_mean_diff'], c['exact_max_abs_var_diff']):.0e}",
                         f"{fmt(c['ema0.1_library_accuracy'])} / {fmt(c['ema0.1_prototype_accuracy'])}",
                         f"{fmt(c['deb0.1+zero:var_emulated_accuracy'])} / "
                         f"{fmt(c['deb0.1+zero:var_prototype_accuracy'])}"])
    w("At the end of every run: exact statistics from the public `recompute_population_statistics` vs. pooled "
      "here; the library's eval vs. the prototype subclass with the unchanged rule (reference kernel); the zero "
      "rule as a subclass (reference kernel) vs. written into the statistics (fused kernel).")
    w("")
    L.extend(table(["task", "seed", "exact: public / pooled", "max stat diff", "today: library / prototype",
                    "zero rule: emulated / subclass"], rows))

    for key, runs_by_seed in results.items():
        runs = [runs_by_seed[s] for s in sorted(runs_by_seed)]
        steps = list(runs[0]["checkpoints"])
        names = [n for n in LABELS if n in runs[0]["checkpoints"][steps[-1]]]
        w(f"## {key}: validation accuracy during training")
        w("")
        w(f"Mean over {len(runs)} seeds at each evaluation step.")
        w("")
        rows = [[LABELS[n]] + [fmt(mean([r["checkpoints"][s][n] for r in runs])) for s in steps] for n in names]
        L.extend(table(["eval statistics \\ step"] + steps, rows))
        skip = max(0, min(3, len(steps) - 2))
        w(f"Summary over seeds: final accuracy (mean, min–max); shortfall against exact statistics, mean over all "
          f"evaluations and worst single evaluation; jumpiness = mean |change| between consecutive evaluations "
          f"from step {steps[skip]} on (the exact statistics' own jumpiness is the baseline: the model itself moves).")
        w("")
        rows = []
        for n in names:
            s = summarize(runs, n, skip)
            rows.append([LABELS[n], f"{fmt(s['final'])} ({fmt(s['final_min'])}–{fmt(s['final_max'])})",
                         fmt(s["short"]), fmt(s["worst"]), fmt(s["jump"])])
        L.extend(table(["eval statistics", "final", "mean shortfall", "worst shortfall", "jumpiness"], rows))
        w("Per seed (the jumping the issue reports is in the first rows):")
        w("")
        rows = []
        for seed, r in zip(sorted(runs_by_seed), runs):
            for n in KEY:
                rows.append([str(seed), n] + [fmt(r["checkpoints"][s][n]) for s in steps])
        L.extend(table(["seed", "eval statistics"] + steps, rows))

    w("## Why the running averages are far from exact: ablations")
    w("")
    w("Start from exact statistics and swap in today's running averages (momentum 0.1) at one place at a time, "
      "or the reverse. *Constant* features are those that were degenerate (identical across the batch: the "
      "training rule normalizes them to 0) in every calibration batch; *sometimes constant* in some; *regular* in "
      "none. \"Weights frozen\" continues the same running average over "
      f"{NOISE_BATCHES} more batches at the final weights: the lag behind moving weights is gone, the sampling "
      "noise stays. The *zero rule* columns run every variant with the decided rule. Mean accuracy over seeds.")
    w("")
    for key, runs_by_seed in results.items():
        runs = [runs_by_seed[s] for s in sorted(runs_by_seed)]
        points = list(runs[0]["ablations"])
        names = list(runs[0]["ablations"][points[0]]["plain"])
        header = ["variant"] + [f"step {p} {v}" for p in points for v in ("today", "zero rule")]
        rows = []
        for n in names:
            row = [n]
            for p in points:
                for v in ("plain", "zero rule"):
                    row.append(fmt(mean([r["ablations"][p][v][n] for r in runs])))
            rows.append(row)
        w(f"### {key}")
        w("")
        L.extend(table(header, rows))

    w("### Where the mismatch sits (end of training)")
    w("")
    w("Per site and feature class: share of the (step, feature) pairs, and what the running statistics feed the "
      "cell for an input at the exact mean, |mu_run - mu_exact| / sqrt(var_run + eps) (median, 99th percentile, "
      "max; max over seeds), and |log((var_exact + eps) / (var_run + eps))| (median).")
    w("")
    rows = []
    for key, runs_by_seed in results.items():
        runs = [runs_by_seed[s] for s in sorted(runs_by_seed)]
        for cls in runs[0]["final"]["mismatch"]:
            es = [r["final"]["mismatch"][cls] for r in runs]
            if not any(e["count"] for e in es):
                rows.append([key, cls, fmt(mean([e["share"] for e in es])), "–", "–", "–", "–"])
                continue
            have = [e for e in es if e["count"]]
            rows.append([key, cls, fmt(mean([e["share"] for e in es])), fmt(mean([e["shift_median"] for e in have]), 4),
                         fmt(max(e["shift_p99"] for e in have), 3), fmt(max(e["shift_max"] for e in have), 3),
                         fmt(mean([e["log_ratio_median"] for e in have]), 3)])
    L.extend(table(["task", "site/class", "share", "shift median", "shift p99", "shift max", "|log var ratio| median"],
                   rows))
    w("Steps with constant features (end of training, seed 0): the share of each site's features that were "
      "constant in every calibration batch, at the steps where it is nonzero.")
    w("")
    rows = []
    for key, runs_by_seed in results.items():
        r = runs_by_seed[sorted(runs_by_seed)[0]]
        for site in SITES:
            by = r["final"]["constant_by_step"][site]
            some = r["final"]["sometimes_by_step"][site]
            const = ", ".join(f"{t}: {v:.2f}" for t, v in enumerate(by) if v > 0) or "none"
            n_some = sum(1 for v in some if v > 0)
            rows.append([key, site, const, f"{n_some} steps (max share {max(some):.2f})"])
    L.extend(table(["task", "site", "constant: step: share", "sometimes constant"], rows))

    w("### Compounding through the recurrence (end of training)")
    w("")
    w("RMS error of h_t (per unit) of today's running statistics against the exact ones (with the zero rule, "
      "which removes the rounding noise that exact statistics amplify by 1/sqrt(eps) at constant features), on the validation "
      "examples: *one step* starts every step from the exact run's state (the error the statistics make at that "
      "step alone); *free* runs the recurrence (the error eval really has). Mean over seeds; quarters of the sequence.")
    w("")
    rows = []
    for key, runs_by_seed in results.items():
        runs = [runs_by_seed[s] for s in sorted(runs_by_seed)]
        cs = [r["final"]["compounding"] for r in runs]
        rows.append([key, fmt(mean([c["h_rms"] for c in cs])),
                     " / ".join(fmt(mean([c["local_quarters"][q] for c in cs])) for q in range(4)),
                     " / ".join(fmt(mean([c["free_quarters"][q] for c in cs])) for q in range(4)),
                     fmt(mean([c["free_last"] / max(c["local_last"], 1e-12) for c in cs]), 1),
                     f"{max(c['check_max_abs_logit_diff'] for c in cs):.0e}"])
    L.extend(table(["task", "rms h_T (exact)", "one-step error by quarter", "free error by quarter",
                    "free / one-step at T", "loop check (max logit diff)"], rows))
    return "\n".join(L) + "\n"


DECISION = """## Summary

**The defect.** `.eval()` of a BN-LSTM normalizes with running averages (momentum 0.1) that are far from the
exact population statistics. Mean over 3 seeds, valid accuracy at the end of training, today's `.eval()` vs. exact
statistics: digits {D_today_final} vs. {D_exact_final}, permuted Fashion-MNIST {F_today_final} vs. {F_exact_final},
digits with batches of 16 {B_today_final} vs. {B_exact_final}. Averaged over all evaluations during training the
shortfall is {D_today_short} / {F_today_short} / {B_today_short}, and the running-average curves jump: the mean
change between consecutive evaluations is {D_today_jump} / {F_today_jump} / {B_today_jump}, against
{D_exact_jump} / {F_exact_jump} / {B_exact_jump} for the same models with exact statistics. The issue's numbers
(digits, seed 0: 0.636 vs. 0.864) are reproduced exactly (self-checks below).

**Why** (ablations below: exact statistics with the running ones swapped in piece by piece):

1. **Constant features** (digits). Training normalizes a feature that is identical across the batch to exactly 0.
   Pixel 0 of every digit is blank, so the cell state at step 0 and the recurrent term at step 1 are the same for
   every image; the input term of an always-blank pixel is exactly 0. At those features the running variance is ~0
   and the running mean lags the moving weights, so eval feeds the cell the lag divided by sqrt(eps) (the input
   term, exactly 0, is harmless). They sit at a handful of steps (seed 0: {D_constant_where}; every feature of
   the site there), yet they carry most of the loss at the end of training: running statistics at the constant features only (exact elsewhere)
   give {D_abl_const_only} (exact: {D_abl_exact}); exact statistics at the constant features only give
   {D_abl_exact_const} (all running: {D_abl_running}). Permuted Fashion-MNIST has almost none
   ({F_constant_where}: the zero initial state, exactly 0 and harmless).
2. **Lag behind the weights.** Training uses Adam at a constant learning rate, and the weights keep moving.
   Continuing the same running average over {noise} more batches at frozen final weights (no lag, same sampling
   noise) gives {D_frozen01} / {F_frozen01} (exact {D_abl_exact} / {F_abl_exact}) on digits / Fashion with
   batch 64. Lag, not noise, is the rest of the gap. Lag hurts most where a feature's spread across the batch
   is small compared with its drift: the early steps of digits, and the input term `W_ih x_t` of one-pixel inputs
   (Fashion: running statistics at the input term alone give {F_ih_only}, running statistics everywhere
   {F_abl_running}). Our reading, not measured: the
   normalization there removes the scale of `W_ih`, so Adam moves that scale at its full step size.
3. **Compounding.** An error made at one step is carried and amplified by the later steps (our reading: they
   divide by small batch spreads). Today's statistics give one-step errors of h_T that the recurrence turns into {D_comp}x (digits)
   and {F_comp}x (Fashion) larger errors (compounding table).
4. **Not causes.** The unbiased variance: the biased one is no better ({D_abl_biased} vs. {D_abl_running} on digits).
   The per-step slots as such: at batch 64 a slot's average is precise enough (frozen weights, item 2; 4
   calibration batches = 256 rows match 20). At batch 16, sampling noise appears: frozen weights give
   {B_frozen01} against exact {B_abl_exact}. Momentum only trades lag against noise. 0.01 and the cumulative
   average lag far more and are much worse ({D_m001_final} and {D_cum_final} on digits).
5. **Few updates.** At the first evaluations, today's slots still hold 0.9^k of the initial mean 0 and variance 1.
   Mean accuracy over the first three evaluations is {D_early_today} (digits) and {F_early_today} (Fashion). With a
   plain average for a slot's first updates (R1 below) it is {D_early_deb} / {F_early_deb}; exact gives
   {D_early_exact} / {F_early_exact}.

## Decision

* **R1 and R2 below become the library's rule** (Python reference and kernels). R2 makes eval consistent with
  training where training's rule is exact. R1 removes the initial values' weight from young slots. Neither adds
  state. Together, at momentum 0.1, they cut the mean shortfall during training from
  {D_today_short} / {F_today_short} / {B_today_short} to {D_r12_short} / {F_r12_short} / {B_r12_short}
  (digits / Fashion / digits batch 16). The final accuracy is {D_r12_final} / {F_r12_final} / {B_r12_final}
  (today {D_today_final} / {F_today_final} / {B_today_final}). R2 fixes the constant features and R1 the first
  evaluations; neither touches the lag.
* **Default momentum of `norm="batch"`: 0.3** (today 0.1). With R1 and R2 it gives a mean shortfall of
  {D_r12m3_short} / {F_r12m3_short} / {B_r12m3_short}, the best running rule on digits with batch 16, and the
  final accuracy {D_r12m3_final} / {F_r12m3_final} / {B_r12m3_final}. Momentum 1 (last batch only) lags less and
  wins at batch 64 ({D_lastr2_short} / {F_lastr2_short}), but at batch 16 its noise costs {B_lastr2_short}. With
  the weights frozen (the end of a decayed learning-rate schedule), momentum 0.3 costs
  {D_frozen_cost} / {B_frozen_cost} against 0.1 (digits, batch 64 / 16). `sequence_batch` and `shared_batch` keep
  0.1: their slots pool T·B rows per update, and they were not measured here.
* **`recnorm.calibrate(model, batches)` is the documented path** for evaluating a batch-normalized model. No
  running average closes the gap while the weights move. Exact statistics from 4 training batches of 64 match 20
  ({D_exact4_final} vs. {D_exact_final} on digits). With batches of 16, use more rows: 4 batches gave
  {B_exact4_final} against {B_exact_final} from 20.
* **A one-time warning, and no threshold on `num_batches_tracked`.** Warn once when a layer is evaluated on running
  averages that training changed after the last calibration (specification below). A warning on "under-tracked"
  slots is not worth it. R1 removes the initial values that made young slots wrong. The failures measured here
  come after hundreds of updates, where any count threshold stays silent.
* **Batch renormalization (Ioffe 2017): not now.** At constant features the batch spread is 0, so its correction
  r = sigma_B / sigma_run is 0/0 there and needs R2 anyway. For the lag, it changes training itself (r_max and d_max
  schedules to tune) to follow the lagging averages. `calibrate` removes the lag exactly, for the cost of a few
  forward passes. Not measured.
* Measured and rejected, because they need a new (S, F) buffer for no gain: a per-feature bit "degenerate in the
  slot's last update", and a running share of degenerate updates. Both are within 0.01 of R2 in every summary
  table. Each eval batch's own statistics come close to exact ({D_batch_final} / {F_batch_final} /
  {B_batch_final} at the end), but they make a prediction depend on the other examples in its batch, so they are
  not a default.

## Specification (for the Python reference and the kernels)

Per slot s (a time step) the stored state is unchanged: `running_mean[s]` (F), `running_var[s]` (F, unbiased),
`num_batches_tracked[s]`. Let u = `torch.finfo(buffer dtype).eps`.

**R1: the update.** Training updates slot s with the mean mu and the biased variance sigma^2 of n >= 2 valid rows:

    k = num_batches_tracked[s] + 1                  (stored back, as today)
    w = 1 / k                      if momentum is None (as today)
    w = max(momentum, 1 / k)       otherwise         (today: w = momentum)
    running_mean[s] = lerp(running_mean[s], mu, w)
    running_var[s]  = lerp(running_var[s], sigma^2 * n / (n - 1), w)

torch's `lerp` (and the kernels' `lerp` helper) returns the end value exactly at w = 1. So the first update replaces
the initial (0, 1), the first ceil(1/momentum) updates form a plain average, and later updates are today's running
average. The population pass (`recompute_population_statistics` / `calibrate`) does not change.

**R2: normalizing with stored statistics.** This rule applies wherever a slot's stored statistics normalize: in eval
mode, in training calls with fewer than 2 valid rows, and in the folded `affine` path. With m = `running_mean[s]`
and v = `running_var[s]`, per feature:

    degenerate = v <= (32 * u * m)^2          # training's test on the batch is sigma^2 <= (16 * u * mu)^2
    y = beta                                    where degenerate   (normalized value exactly 0; no gradient to x)
    y = gamma * (x - m) / sqrt(v + eps) + beta  elsewhere

In the kernels this is the batch branch's existing "rstd = 0 for a degenerate column" moved into the population
branch: `rstd = degenerate ? 0 : 1 / sqrt(v + eps)`. In `affine`, the scale is 0 where the feature is degenerate.
A feature that was exactly 0 in every update has m = 0 and v = 0, so it is degenerate; an example is the input term
of an always-blank pixel. The factor is 32 rather than training's 16 because of R1: a feature that was degenerate in
every update stores an average of variances, each at most (16 u |mu_b|)^2. The C++ batch moments give exactly 0 for
identical values. Meanwhile |mu_b| drifts a little between updates. The margin is still 32 units of rounding in
relative spread, far below any real feature.

**Checkpoints.** Nothing is added or renamed, so state dicts of the old and the new version load into each other
with `strict=True`. A checkpoint written before R1 holds, at a constant feature, v = 0.9^k: the initial 1,
decaying. R2 detects it only once 0.9^k <= (32 u m)^2, about 280 updates for |m| = 0.1. Until then that checkpoint
evaluates as today, and `calibrate` fixes it. A feature that was 0 in every update has m = 0 exactly. Before R1 its
v stays above 0, so R2 does not detect it, but x - m = 0 at eval too unless eval feeds an input that training never
did.

**Calibrate.** Add `recnorm.calibrate(model, batches, forward_fn=None) -> int`, today's
`recompute_population_statistics` under the name users look for; keep the old name. The README's quick start and
the `.eval()` paragraph of the layer docs say: after training, and before evaluating a batch-normalized model, call
`recnorm.calibrate(model, some_training_batches)`, with a few hundred rows or more.

**Warning.** Each `RecurrentBatchNorm` keeps a flag, not stored in the state dict, named
`_updated_since_calibration`. An R1 update sets it (the Python `_update`, and the kernels' training calls through
their wrapper). `end_population_pass` (calibrate), `reset_running_stats` and `_load_from_state_dict` clear it. The
first time in a process that a layer normalizes with stored statistics in eval mode while any of its norms has the
flag set, log once at WARNING (module-level flag): "evaluating batch norm with running averages that lag the
weights; call recnorm.calibrate(model, batches) first (docs/eval_statistics.md)". A loaded checkpoint stays quiet,
because its provenance is unknown. The trainer's EMA diagnostic (`valid_ema`) evaluates running averages on purpose
and may silence the warning.

**Tests.** `tests/test_eval_statistics.py` holds four strict xfails that fail today and pass under R1 and R2.
`python benchmarks/eval_statistics.py --check-tests` runs them both ways; for the second, it uses a prototype of
the rule patched into the Python reference (`prototype_rule` in the script, a reference implementation in a few
lines). When the rule lands, remove their `PENDING` marker. The two controls must keep passing.
"""


def decision_numbers(results: Dict[str, Dict[int, Dict[str, Any]]]) -> Dict[str, str]:
    """The numbers the summary quotes, from the results (3 digits; "–" where a task was not run)."""
    out: Dict[str, str] = {"noise": str(NOISE_BATCHES)}
    fields = ["today_final", "exact_final", "today_short", "today_jump", "exact_jump", "abl_const_only", "abl_exact",
              "abl_exact_const", "abl_running", "frozen01", "comp", "abl_biased", "m001_final", "cum_final",
              "early_today", "early_deb", "early_exact", "r12_final", "r12_short", "r12m3_short", "r12m3_final",
              "lastr2_short", "frozen_cost", "exact4_final", "constant_where", "batch_final", "ih_only"]
    for key, prefix in (("digits", "D"), ("fashion_permuted", "F"), ("digits_b16", "B")):
        for f in fields:
            out[f"{prefix}_{f}"] = "–"
        runs_by_seed = results.get(key)
        if not runs_by_seed:
            continue
        runs = [runs_by_seed[s] for s in sorted(runs_by_seed)]
        steps = list(runs[0]["checkpoints"])
        skip = max(0, min(3, len(steps) - 2))
        summ = {n: summarize(runs, n, skip) for n in runs[0]["checkpoints"][steps[-1]]}
        last = list(runs[0]["ablations"])[-1]
        plain = {k: mean([r["ablations"][last]["plain"][k] for r in runs]) for k in runs[0]["ablations"][last]["plain"]}
        zero = {k: mean([r["ablations"][last]["zero rule"][k] for r in runs]) for k in runs[0]["ablations"][last]["plain"]}
        early = {n: mean([mean([r["checkpoints"][s][n] for s in steps[:3]]) for r in runs])
                 for n in ("ema0.1", "deb0.1", "exact")}
        comp = mean([r["final"]["compounding"]["free_last"] / max(r["final"]["compounding"]["local_last"], 1e-12)
                     for r in runs])
        values = {
            "today_final": summ["ema0.1"]["final"], "exact_final": summ["exact"]["final"],
            "today_short": summ["ema0.1"]["short"], "today_jump": summ["ema0.1"]["jump"],
            "exact_jump": summ["exact"]["jump"],
            "abl_const_only": plain["running at constant features only"], "abl_exact": plain["exact"],
            "abl_exact_const": plain["exact at constant features only"], "abl_running": plain["running"],
            "frozen01": plain["weights frozen, momentum 0.1 (noise, no lag)"], "abl_biased": plain["running, biased variance"],
            "m001_final": summ["ema0.01"]["final"], "cum_final": summ["cum"]["final"],
            "early_today": early["ema0.1"], "early_deb": early["deb0.1"], "early_exact": early["exact"],
            "r12_final": summ["deb0.1+zero:var"]["final"], "r12_short": summ["deb0.1+zero:var"]["short"],
            "r12m3_final": summ["deb0.3+zero:var"]["final"], "r12m3_short": summ["deb0.3+zero:var"]["short"],
            "lastr2_short": summ["last+zero:var"]["short"],
            "frozen_cost": zero["weights frozen, momentum 0.1 (noise, no lag)"]
            - zero["weights frozen, momentum 0.3 (noise, no lag)"],
            "exact4_final": summ["exact4"]["final"], "batch_final": summ["batch"]["final"],
            "ih_only": plain["running at ih only"],
        }
        for f, v in values.items():
            out[f"{prefix}_{f}"] = fmt(v)
        out[f"{prefix}_comp"] = f"{comp:.0f}"
        where = runs[0]["final"]["constant_by_step"]
        out[f"{prefix}_constant_where"] = "; ".join(
            f"{site}: steps {', '.join(str(t) for t, v in enumerate(where[site]) if v > 0)}" for site in SITES
            if any(v > 0 for v in where[site])) or "none"
    return out


# ---------------------------------------------------------------------------------------------------
# The decided rule as a prototype (for --check-tests): R1 and R2 on the Python reference path
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def prototype_rule() -> Iterator[None]:
    """R1 and R2 of docs/eval_statistics.md patched into ``RecurrentBatchNorm`` (reference loop only: the
    fused kernels do not call the Python norm code, so ``RECNORM_KERNEL=reference`` is set inside)."""
    cls = recnorm.RecurrentBatchNorm
    statistics0, update0 = cls.statistics, cls._update
    kernel0 = os.environ.get("RECNORM_KERNEL")

    def statistics(self, moments, n, step=0):
        if not self.training or n < 2:  # R2: stored statistics, with training's degenerate rule
            s = self._slot(step, use_population=True)
            mean, var = self.running_mean[s], self.running_var[s]
            tol = ZERO_RULE_FACTOR * torch.finfo(var.dtype).eps
            return mean, var, var <= (tol * mean).square()
        return statistics0(self, moments, n, step)

    @torch.no_grad()
    def update(self, s, mean, var, n):
        if self._accumulator is not None or self.momentum is None:
            return update0(self, s, mean, var, n)
        self.num_batches_tracked[s] += 1  # R1: factor max(momentum, 1/k)
        self._last_slot = None
        factor = max(float(self.momentum), 1.0 / float(self.num_batches_tracked[s]))
        self.running_mean[s].lerp_(mean, factor)
        self.running_var[s].lerp_(var * (n / (n - 1)), factor)

    try:
        cls.statistics, cls._update = statistics, update
        os.environ["RECNORM_KERNEL"] = "reference"
        yield
    finally:
        cls.statistics, cls._update = statistics0, update0
        if kernel0 is None:
            os.environ.pop("RECNORM_KERNEL", None)
        else:
            os.environ["RECNORM_KERNEL"] = kernel0


def check_tests() -> int:
    """tests/test_eval_statistics.py with its xfail markers ignored: today the pending tests must fail, and
    under the prototype of the rule every test must pass."""
    import pytest

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "test_eval_statistics.py")
    print("== today's code (the PENDING tests must fail):", flush=True)
    today = pytest.main(["-q", "-p", "no:cacheprovider", "--runxfail", path])
    print("== with the prototype of R1 and R2 (every test must pass):", flush=True)
    with prototype_rule():
        rule = pytest.main(["-q", "-p", "no:cacheprovider", "--runxfail", path])
    ok = today != 0 and rule == 0
    print(f"== {'OK' if ok else 'NOT OK'}: today exit {int(today)}, with the rule exit {int(rule)}", flush=True)
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------------
# Main: run (or reuse) every (task, seed), then write the report
# ---------------------------------------------------------------------------------------------------


def spec_key(spec: Dict[str, Any]) -> str:
    """What a cached run must match to be reused."""
    return json.dumps({"spec": spec, "calib": CALIBRATION_BATCHES, "noise": NOISE_BATCHES, "eval": EVAL_BATCH,
                       "averages": AVERAGES, "zero": ZERO_RULE_FACTOR, "version": 2}, sort_keys=True)


def cached(path: str, key: str, compute: Callable[[], Dict[str, Any]], fresh: bool) -> Dict[str, Any]:
    if not fresh and os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        if data.get("key") == key:
            return data["result"]
    result = compute()
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"key": key, "result": result}, f)
    os.replace(tmp, path)  # a finished run appears whole or not at all
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/eval_statistics.md", help="the report (Markdown)")
    parser.add_argument("--cache", default="runs/eval_statistics", help="finished runs, reused on the next call")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
    parser.add_argument("--quick", action="store_true", help="short runs and one seed (a smoke test, not evidence)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--check-tests", action="store_true",
                        help="only run tests/test_eval_statistics.py today and under a prototype of the decided rule")
    args = parser.parse_args(argv)
    if args.check_tests:
        return check_tests()
    torch.set_num_threads(args.threads)
    started = time.time()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    cache = args.cache + ("-quick" if args.quick else "")
    os.makedirs(cache, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {msg}", flush=True)

    results: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for key in args.tasks.split(","):
        if key not in TASKS:
            parser.error(f"unknown task {key!r}; expected a subset of {list(TASKS)}")
        spec = dict(TASKS[key], **(QUICK[key] if args.quick else {}))
        results[key] = {}
        for seed in seeds:
            path = os.path.join(cache, f"{key}-s{seed}.json")
            results[key][seed] = cached(path, spec_key(spec), lambda: train_run(spec, seed, log), args.fresh)
            log(f"{key} seed {seed} done")
    digits = dict(TASKS["digits"], **(QUICK["digits"] if args.quick else {}))
    check = cached(os.path.join(cache, "self-check.json"), spec_key(digits),
                   lambda: self_check(digits, 0, digits["steps"]), args.fresh)
    run_seconds = sum(r["seconds"]["train"] + r["seconds"]["eval"] for runs in results.values() for r in runs.values())
    meta = {"when": time.strftime("%Y-%m-%d"), "minutes": (run_seconds + check["seconds"]) / 60, "cpus": os.cpu_count()}
    text = report(results, check, meta)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
