"""The report: from a run or sweep directory on disk to an HTML page and a Markdown summary with plots.

:func:`write_report` reads only the files the engine wrote (``result.json`` of every run and the sweep's
``sweep.json``), so a report can be rebuilt at any time, also from a copied directory. It writes::

    DIR/report.html        self-contained: every plot embedded as a base64 PNG
    DIR/report.md          the same tables and verdicts; plots as PNG files beside it
    DIR/figures/*.png

This module only assembles: the statistics are :mod:`recnorm.experiments.statistics`, the figures
:mod:`recnorm.experiments.plots`, the page :mod:`recnorm.experiments.document`, and a study's own section
and claims its file in :mod:`recnorm.experiments.studies` (found by the sweep's name).

What the report shows, per task: the fixed settings and the commands behind it; learning curves per
normalization with seed bands; steps and seconds to reach a target metric and the area under the validation
curve (convergence speed); the final test metric, its spread and the number of diverged runs; sensitivity to
the weight initialization; gradient flow through time; gradient norms and clipping; per-step batch and
population statistics of the batch norms; and a **verdict table** for the comparisons it can make. Each
verdict rests on a paired test over seeds (:func:`recnorm.experiments.statistics.paired_test`), with the
p-values of one table adjusted together (Benjamini-Hochberg), and reads *supported*, *the opposite holds*,
*equivalent* (within 0.01 of the metric, by TOST) or *inconclusive*.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import recnorm.experiments.plots as plots
import recnorm.experiments.statistics as st
from recnorm.experiments.document import Document, badge, fmt, mean_sd, seed_list, signed
from recnorm.experiments.results import (
    SWEEP_FILE, area_under_curve, first_reach, is_sweep_dir, load_records_checked, model_label, read_json, summary)
from recnorm.experiments.studies import STUDIES
from recnorm.experiments.study import name, verdict_table
from recnorm.experiments.sweep import flatten_config, varied_fields

__all__ = ["write_report", "build_report", "TaskData"]

logger = logging.getLogger(__name__)

TRAIN_FRACTION = 0.5  # a run "trains" if it closes this fraction of the gap from chance to the best group
TARGET_FRACTION = 0.75  # default target: this fraction of the way from chance to the best group's final
MARGIN = 0.01  # the equivalence margin (and spread floor) of the generic comparisons, in the metric's units


# ---------------------------------------------------------------------------------------------- data model
# ---------------------------------------------------------------------------------------------- data model
class TaskData:
    """The runs of one task (name + options) and everything derived from them."""

    def __init__(self, records: List[Dict[str, Any]], varied: List[str], hints: Dict[str, Any]):
        self.records = records
        first = records[0]
        self.metric: str = first["metric"]
        self.higher: bool = bool(first["higher_is_better"])
        self.task = first["task"]
        self.varied = varied
        # Context = everything that varies except the normalization and the seed.
        self.context_fields = [f for f in varied if f not in ("seed", "norm") and not f.startswith("norm_kwargs.")
                               and f != "task" and not f.startswith("task_options.")]
        self.labels = _ordered_labels(records)
        initial = [r["valid"][self.metric][0] for r in records
                   if r.get("valid", {}).get(self.metric) and r["valid"][self.metric][0] is not None]
        self.chance: Optional[float] = statistics.median(initial) if initial else None
        first_losses = [r["train"]["loss"][0] for r in records if r["train"].get("loss") and r["train"]["loss"][0] is not None]
        # The training loss a diverged run is counted at: the median loss of the first training step.
        self.initial_loss: Optional[float] = statistics.median(first_losses) if first_losses else None
        self._wanted = dict(hints.get("reference") or {})
        self.reference = self._pick_reference(self._wanted)
        finals = self._group_means(lambda r: _final_valid(r))
        best = None
        for v in finals.values():
            if v is not None and (best is None or self._better(v, best)):
                best = v
        self.best = best
        target = hints.get("target")
        if target is None and best is not None and self.chance is not None:
            target = self.chance + TARGET_FRACTION * (best - self.chance)
        self.target: Optional[float] = target

    # -- helpers
    def _better(self, x: float, y: float) -> bool:
        return x > y if self.higher else x < y

    def context(self, r: Dict[str, Any]) -> Tuple:
        flat = _flat(r["config"])
        return tuple(flat.get(f) for f in self.context_fields)

    def context_name(self, ctx: Tuple) -> str:
        if not self.context_fields:
            return "all runs"
        return ", ".join(f"{_short(f)}={_fmt_value(v)}" for f, v in zip(self.context_fields, ctx))

    def _pick_reference(self, wanted: Dict[str, Any], contexts: Optional[List[Tuple]] = None) -> Tuple:
        if contexts is None:
            contexts = self.contexts()

        def score(ctx: Tuple) -> Tuple:
            s = []
            for f, v in zip(self.context_fields, ctx):
                if f in wanted:
                    s.append(0 if v == wanted[f] else 1)
                elif f == "init_gain" and isinstance(v, (int, float)):
                    s.append(abs(math.log(v)) if v > 0 else 99)
                else:
                    s.append(contexts.index(ctx))
            return tuple(s)

        return min(contexts, key=score) if contexts else ()

    # Structural settings: the context without the initialization fields.
    _INIT_FIELDS = ("init", "init_gain", "forget_bias")

    def _structural_fields(self) -> List[str]:
        return [f for f in self.context_fields if f not in self._INIT_FIELDS]

    def structure(self, r: Dict[str, Any]) -> Tuple:
        flat = _flat(r["config"])
        return tuple(flat.get(f) for f in self._structural_fields())

    def structure_name(self, struct: Tuple) -> str:
        return ", ".join(f"{_short(f)}={_fmt_value(v)}" for f, v in zip(self._structural_fields(), struct))

    def structures(self) -> List[Tuple]:
        """Structural settings in first-seen order, the reference's first."""
        out = [self.structure_of_context(self.reference)]
        for r in self.records:
            s = self.structure(r)
            if s not in out:
                out.append(s)
        return out

    def structure_of_context(self, ctx: Tuple) -> Tuple:
        values = dict(zip(self.context_fields, ctx))
        return tuple(values.get(f) for f in self._structural_fields())

    def reference_in(self, struct: Tuple) -> Tuple:
        """The reference context (init) within a structural setting."""
        if self.structure_of_context(self.reference) == struct:
            return self.reference
        candidates = [c for c in self.contexts() if self.structure_of_context(c) == struct]
        return self._pick_reference(self._wanted, candidates)

    def runs(self, label: Optional[str] = None, context: Optional[Tuple] = None) -> List[Dict[str, Any]]:
        return [r for r in self.records if (label is None or model_label(r["config"]) == label)
                and (context is None or self.context(r) == context)]

    def contexts(self) -> List[Tuple]:
        out = []
        for r in self.records:
            c = self.context(r)
            if c not in out:
                out.append(c)
        return out

    def _group_means(self, value: Callable[[Dict[str, Any]], Optional[float]]) -> Dict[Tuple, Optional[float]]:
        groups: Dict[Tuple, List[Optional[float]]] = {}
        for r in self.records:
            groups.setdefault((model_label(r["config"]), self.context(r)), []).append(value(r))
        return {k: summary(v)["mean"] for k, v in groups.items()}

    def trains(self, r: Dict[str, Any]) -> bool:
        """Whether a run trained: not diverged, and its final valid metric closes ``TRAIN_FRACTION`` of the
        gap between chance (median step-0 metric) and the best group's mean."""
        v = _final_valid(r)
        if r["status"] != "ok" or v is None:
            return False
        if self.chance is None or self.best is None or self.best == self.chance:
            return True
        return (v - self.chance) / (self.best - self.chance) >= TRAIN_FRACTION

    def auc(self, r: Dict[str, Any]) -> Optional[float]:
        curve = r.get("valid", {})
        return area_under_curve(curve.get("step", []), curve.get(self.metric, []), r.get("steps_planned", 0))

    def mean_train_loss(self, r: Dict[str, Any]) -> Optional[float]:
        """The training loss averaged over every step of the run (None when it did not finish its steps)."""
        losses = r["train"].get("loss") or []
        if r["status"] != "ok" or len(losses) < r.get("steps_planned", 0) or any(v is None for v in losses):
            return None
        return statistics.fmean(losses) if losses else None

    def reach(self, r: Dict[str, Any], axis: str) -> Optional[float]:
        if self.target is None:
            return None
        curve = r.get("valid", {})
        return first_reach(curve.get(axis, []), curve.get(self.metric, []), self.target, self.higher)


def _flat(config: Dict[str, Any]) -> Dict[str, Any]:
    return flatten_config(config)


def _final_valid(r: Dict[str, Any]) -> Optional[float]:
    return ((r.get("final") or {}).get("valid") or {}).get(r.get("metric"))


def _final_test(r: Dict[str, Any]) -> Optional[float]:
    return ((r.get("final") or {}).get("test") or {}).get(r.get("metric"))


def _ordered_labels(records: List[Dict[str, Any]]) -> List[str]:
    order = {"none": 0, "layer": 1, "batch": 2, "sequence_batch": 3, "shared_batch": 4}
    labels = sorted({model_label(r["config"]) for r in records},
                    key=lambda s: (order.get(s.split()[0], 9), s))
    return labels


def _pretty(label: str) -> str:
    """A model label in words with the label itself: ``"batch γ=0.1"`` -> ``"per-step BN (γ0 = 0.1) (batch
    γ=0.1)"``; the words come from the norm's registered label."""
    return "no norm" if label == "none" else f"{name(label)} ({label})"


def _short(field: str) -> str:
    return {"init_gain": "gain", "num_layers": "layers", "hidden_size": "H"}.get(field, field)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# ---------------------------------------------------------------------------------------------- verdicts
@dataclasses.dataclass
class _Verdict:
    """One row of a task's verdict table, before the p-values of the table are adjusted together."""

    claim: str
    evidence: str
    test: Optional[st.PairedTest] = None
    fixed: Optional[str] = None  # a verdict written as is (nothing to test)
    partner: Optional[Tuple[int, str, str]] = None  # the same claim by another quantity: (offset, its name, where)
    p_adjusted: Optional[float] = None

    def result(self) -> str:
        return st.verdict(self.test, self.p_adjusted) if self.test is not None else "insufficient"


def _per_seed(runs: List[Dict[str, Any]],
              value: Callable[[Dict[str, Any]], Optional[float]]) -> Dict[int, Optional[float]]:
    return {r["seed"]: value(r) for r in runs}


def _test(a: Dict[int, Optional[float]], b: Dict[int, Optional[float]], better: str,
          worst: Optional[float] = None) -> st.PairedTest:
    return st.paired_test(st.paired_differences(a, b, better, worst=worst), margin=MARGIN)


def _compare(td: TaskData, a: List[Dict[str, Any]], b: List[Dict[str, Any]],
             value: Callable[[Dict[str, Any]], Optional[float]], better: Optional[str] = None,
             worst: Optional[float] = None) -> st.PairedTest:
    better = better or ("higher" if td.higher else "lower")
    return _test(_per_seed(a, value), _per_seed(b, value), better, worst=td.chance if worst is None else worst)


def _speed_verdicts(td: TaskData) -> List[_Verdict]:
    """Convergence speed at each structural setting's reference init, judged by two quantities that can
    disagree: the validation metric averaged over training, and the training loss averaged over every step."""
    out = []
    valid_name = f"validation {td.metric}" if td.metric != "loss" else "validation loss"
    for struct in td.structures():
        sref = td.reference_in(struct)
        where = td.context_name(sref)
        for label in td.labels:
            if label == "none":
                continue
            a, b = td.runs(label, sref), td.runs("none", sref)
            out.append(_Verdict(
                f"{_pretty(label)} converges faster than no norm, by {valid_name} (mean over training)",
                f"{valid_name} averaged over training (area under the curve), {where}", _compare(td, a, b, td.auc),
                partner=(1, "the training loss", "next row")))
            out.append(_Verdict(
                f"{_pretty(label)} converges faster than no norm, by training loss (mean over training)",
                f"training loss averaged over all steps (lower is faster), {where}",
                _compare(td, a, b, td.mean_train_loss, "lower", worst=td.initial_loss),
                partner=(-1, f"the {valid_name}", "row above")))
    return out


def _spread(td: TaskData, label: str, struct: Tuple) -> Dict[int, Optional[float]]:
    """Per seed: range (best - worst) of the final test metric over gains within each init scheme, averaged
    over schemes; a diverged run counts as chance level."""
    by_seed: Dict[int, List[float]] = {}
    groups: Dict[str, Dict[int, List[float]]] = {}
    for r in td.runs(label):
        v = _final_test(r)
        v = td.chance if v is None else v
        if td.structure(r) == struct and v is not None:
            groups.setdefault(r["config"]["init"], {}).setdefault(r["seed"], []).append(v)
    for g in groups.values():
        for seed, vals in g.items():
            if len(vals) >= 2:
                by_seed.setdefault(seed, []).append(max(vals) - min(vals))
    return {seed: statistics.fmean(v) for seed, v in by_seed.items()}


def _init_verdicts(td: TaskData) -> List[_Verdict]:
    gains = sorted({r["config"]["init_gain"] for r in td.records})
    if len(gains) < 2:
        return []
    out = []
    for struct in td.structures():
        base_runs = [r for r in td.runs("none") if td.structure(r) == struct]
        for label in td.labels:
            if label == "none":
                continue
            runs = [r for r in td.runs(label) if td.structure(r) == struct]
            frac = sum(td.trains(r) for r in runs) / max(1, len(runs))
            frac_base = sum(td.trains(r) for r in base_runs) / max(1, len(base_runs))
            setting = f"{td.structure_name(struct)}; " if td.structure_name(struct) else ""
            out.append(_Verdict(
                f"{_pretty(label)} is less sensitive to the init gain than no norm, by the range of final test "
                f"{td.metric} over gains {', '.join(_fmt_value(g) for g in gains)}",
                f"{setting}best minus worst final test {td.metric} over the gains (smaller = less sensitive); "
                f"runs that train: {frac:.0%} vs {frac_base:.0%}",
                _test(_spread(td, label, struct), _spread(td, "none", struct), "lower")))
    return out


def _final_verdicts(td: TaskData) -> List[_Verdict]:
    """Naive shared BN against no norm and per-step BN; every other norm against no norm (final metric)."""
    out = []
    shared = [lab for lab in td.labels if lab.startswith("shared_batch")]
    others = [lab for lab in td.labels if lab != "none" and not lab.startswith("shared_batch")]
    for struct in td.structures():
        sref = td.reference_in(struct)
        where = f"final test {td.metric}, {td.context_name(sref)}"
        for lab in shared:
            for other in ["none"] + [o for o in others if o.startswith("batch")]:
                out.append(_Verdict(
                    f"naive shared BN hurts: {_pretty(lab)} ends with a worse final test {td.metric} than "
                    f"{_pretty(other)}", where, _compare(td, td.runs(other, sref), td.runs(lab, sref), _final_test)))
        for lab in others:
            out.append(_Verdict(f"{_pretty(lab)} reaches a better final test {td.metric} than no norm", where,
                                _compare(td, td.runs(lab, sref), td.runs("none", sref), _final_test)))
    return out


def _depth_gain(td: TaskData, label: str, depth: int) -> Dict[int, Optional[float]]:
    """Per seed: label minus no norm in final test metric at ``depth`` layers, over the reference's other
    settings (a diverged run counts as chance level)."""
    ref = dict(zip(td.context_fields, td.reference))
    contexts = [c for c in td.contexts() if dict(zip(td.context_fields, c))["num_layers"] == depth and all(
        dict(zip(td.context_fields, c)).get(f) == ref.get(f) for f in td.context_fields if f != "num_layers")]
    sign = 1.0 if td.higher else -1.0
    out: Dict[int, List[Optional[float]]] = {}
    for ctx in contexts:
        a, b = _per_seed(td.runs(label, ctx), _final_test), _per_seed(td.runs("none", ctx), _final_test)
        for s in a:
            if s in b:
                va, vb = (td.chance if a[s] is None else a[s]), (td.chance if b[s] is None else b[s])
                out.setdefault(s, []).append(None if va is None or vb is None else sign * (va - vb))
    return {s: (None if None in v else statistics.fmean(v)) for s, v in out.items()}


def _depth_verdicts(td: TaskData) -> List[_Verdict]:
    depths = sorted({r["config"]["num_layers"] for r in td.records})
    seq = [lab for lab in td.labels if lab.startswith("sequence_batch")]
    claim = f"sequence-wise BN helps deep stacks more than shallow ones, by final test {td.metric}"
    if not seq:
        return []
    if len(depths) < 2 or "num_layers" not in td.context_fields:
        return [_Verdict(f"{claim} ({_pretty(seq[0])})", "needs several depths (run the laurent study)",
                         fixed=badge("not tested", "one depth in this sweep"))]
    deep, shallow = depths[-1], depths[0]
    return [_Verdict(f"{claim} ({_pretty(lab)})",
                     f"per seed: ({lab} minus no norm) at {deep} layers minus the same at {shallow}",
                     _test(_depth_gain(td, lab, deep), _depth_gain(td, lab, shallow), "higher")) for lab in seq]


def _verdicts(td: TaskData) -> List[List[str]]:
    """The task's verdict rows ``[claim, evidence, effect, seeds, verdict]``; the p-values of the table are
    adjusted together (Benjamini-Hochberg)."""
    if "none" not in td.labels:
        return [["all claims", "needs a run without normalization", "–", "–", badge("not tested", "no baseline in "
                                                                                    "this sweep")]]
    items = _speed_verdicts(td) + _init_verdicts(td) + _final_verdicts(td) + _depth_verdicts(td)
    tested = [v for v in items if v.test is not None and v.test.p_primary is not None]
    for v, p in zip(tested, st.benjamini_hochberg([v.test.p_primary for v in tested])):
        v.p_adjusted = p
    return [_render(items, i) for i in range(len(items))]


def _render(items: List[_Verdict], i: int) -> List[str]:
    v = items[i]
    if v.test is None:
        return [v.claim, v.evidence, "–", "–", v.fixed or badge("insufficient")]
    t = v.test
    effect = "–" if t.mean is None else f"{signed(t.mean)} [{signed(t.low)}, {signed(t.high)}]"
    note = f"p {fmt_p(v.p_adjusted)} after BH" if v.p_adjusted is not None else ""
    if v.partner is not None:
        other = items[i + v.partner[0]]
        mine, theirs = v.result(), other.result()
        if "insufficient" not in (mine, theirs) and (mine == "supported") != (theirs == "supported"):
            words = {"supported": "supports it", "opposite": "shows the opposite",
                     "equivalent": "finds no difference beyond the margin"}.get(theirs, "does not confirm it")
            note += f"; but {v.partner[1]} {words} ({v.partner[2]})"
    return [v.claim, v.evidence, effect, f"{t.wins} of {t.n}", badge(v.result(), note.lstrip("; "))]


def fmt_p(p: Optional[float]) -> str:
    return "–" if p is None else ("< 0.001" if p < 0.001 else f"= {p:.3f}")


# ---------------------------------------------------------------------------------------------- sections
def _speed_table(doc: Document, td: TaskData) -> None:
    rows = []
    for label in td.labels:
        runs = td.runs(label, td.reference)
        if not runs:
            continue
        steps = [td.reach(r, "step") for r in runs]
        secs = [td.reach(r, "time") for r in runs]
        reached = sum(s is not None for s in steps)
        rows.append([label, len(runs), mean_sd([td.auc(r) for r in runs]),
                     mean_sd([td.mean_train_loss(r) for r in runs]), f"{reached} of {len(runs)}",
                     mean_sd(steps) if reached else "never", mean_sd(secs) if reached else "never",
                     fmt(statistics.fmean(r["timing"]["seconds_per_step"] for r in runs) * 1000) + " ms"])
    doc.table(["norm", "runs", f"mean valid {td.metric} over training", "mean training loss over training",
               f"reached {fmt(td.target)}", "steps to target", "seconds to target", "time per step"], rows)
    doc.p("Steps and seconds to target are means over the seeds that reached it (evaluation every "
          f"{td.records[0]['config']['eval_every']} steps); seconds are training time on one thread, measured "
          "while the sweep ran its runs side by side with whatever else the machine ran: they are not a speed "
          "measurement (`benchmarks/bench_rnn.py` is, on a quiet machine).")


def _final_table(doc: Document, td: TaskData) -> None:
    rows = []
    for ctx in td.contexts():
        for label in td.labels:
            runs = td.runs(label, ctx)
            if runs:
                rows.append([td.context_name(ctx), label, mean_sd([_final_test(r) for r in runs]), len(runs),
                             sum(r["status"] != "ok" for r in runs), f"{sum(td.trains(r) for r in runs)} of {len(runs)}"])
    doc.table(["setting", "norm", f"test {td.metric} (mean ± sd)", "runs", "diverged", "trained"], rows,
              fold=f"Every setting's final test {td.metric}: {len(rows)} rows (open)")
    doc.p(f"A run *trained* when it did not diverge and its final valid {td.metric} closes at least "
          f"{TRAIN_FRACTION:.0%} of the gap between chance and the best setting's mean. Batch-norm models are "
          "evaluated with population statistics recomputed exactly from training batches.")
    bn_rows = []
    for label in td.labels:
        runs = [r for r in td.runs(label, td.reference) if "test_ema" in (r.get("final") or {})]
        if runs:
            get = lambda r, k: ((r["final"].get(k) or {}).get(td.metric))  # noqa: E731
            bn_rows.append([label] + [mean_sd([get(r, k) for r in runs]) for k in ("test", "test_ema", "test_batch_stats")])
    if bn_rows:
        doc.h(3, "Population statistics at test time")
        doc.table(["norm", "recomputed (exact)", "running average (EMA)", "batch statistics"], bn_rows)


def _init_section(doc: Document, td: TaskData, key: str) -> None:
    gains = {r["config"]["init_gain"] for r in td.records}
    schemes = {r["config"]["init"] for r in td.records}
    if len(gains) < 2 and len(schemes) < 2:
        return
    doc.h(3, "Sensitivity to initialization")
    plots.sensitivity(doc, td, key)
    rows = []
    for label in td.labels:
        for scheme in sorted(schemes):
            runs = [r for r in td.runs(label) if r["config"]["init"] == scheme]
            by_gain = []
            for g in sorted(gains):
                at_gain = [r for r in runs if r["config"]["init_gain"] == g]
                if at_gain:
                    by_gain.append(f"{g:g}: {mean_sd([_final_test(r) for r in at_gain])} "
                                   f"({sum(td.trains(r) for r in at_gain)}/{len(at_gain)} train)")
            if runs:
                rows.append([label, scheme, "; ".join(by_gain), f"{sum(td.trains(r) for r in runs)} of {len(runs)}"])
    doc.table(["norm", "init", f"final test {td.metric} by gain", "runs that train"], rows)


def _gradient_section(doc: Document, td: TaskData, key: str) -> None:
    doc.h(3, "Gradient flow through time")
    flow_rows = plots.grad_flow(doc, td, key)
    if flow_rows:
        doc.table(["setting", "norm", "when", "||dL/dh_1||", "||dL/dh_T||", "ratio first/last"], flow_rows)
    doc.h(3, "Gradient norms and clipping")
    clips = {r["config"].get("clip") for r in td.records}
    rows = []
    for label in td.labels:
        runs = td.runs(label)
        norms = [g for r in runs for g in r["train"].get("grad_norm", []) if g is not None]
        clipped = [c for r in runs for c in r["train"].get("clipped", [])]
        rows.append([label, fmt(statistics.median(norms)) if norms else "–", fmt(max(norms)) if norms else "–",
                     f"{sum(clipped) / len(clipped):.1%}" if clipped else "–"])
    clip = ", ".join("none" if c is None else f"{c:g}" for c in sorted(clips, key=lambda c: (c is None, c or 0)))
    doc.table(["norm", "median grad norm", "max grad norm", f"steps clipped (global norm above {clip})"], rows)


def _task_section(doc: Document, td: TaskData, key: str, study: str = "") -> List[List[str]]:
    t = td.task
    opts = {k: v for k, v in (t.get("options") or {}).items() if v is not None}
    doc.h(2, f"Task {t['name']}" + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else ""))
    diverged = sum(r["status"] != "ok" for r in td.records)
    doc.p(f"{t.get('kind')} task, T = {t.get('seq_len')}, metric **{td.metric}** "
          f"({'higher' if td.higher else 'lower'} is better). {len(td.records)} runs over "
          f"{seed_list(sorted({r['seed'] for r in td.records}))}; {diverged} of them diverged. Varied: "
          f"{', '.join(td.varied) or 'nothing'}. Chance level (median step-0 valid {td.metric}): {fmt(td.chance)}; "
          f"target for the speed table: {fmt(td.target)}. Reference setting for the speed comparisons: "
          f"{td.context_name(td.reference)}.")
    doc.h(3, "Verdicts")
    if study and "none" not in td.labels:  # the generic claims need a no-norm baseline; the study has its own
        verdicts = []
        doc.p(f"The generic comparisons against no normalization do not apply (this sweep has no run without "
              f"one); the claims declared in the {study} study's file are in its section above.")
    elif study and STUDIES.get(study).tuning is not None:  # declared claims only: no undeclared second opinion
        verdicts = []
        doc.p(f"The generic comparisons (area under the validation curve and the like) are not made here: the "
              f"{study} study declares its claims, their metrics and budgets in its file, and those claims are in its "
              f"section above.")
    else:
        verdicts = _verdicts(td)
        doc.table(["claim", "evidence", "effect [95% interval] (positive favours the claim)", "seeds where it holds",
                   "verdict"], verdicts)
    doc.h(3, "Learning curves")
    plots.learning_curves(doc, td, key)
    doc.h(3, "Convergence speed")
    _speed_table(doc, td)
    doc.h(3, "Final test metric")
    _final_table(doc, td)
    _init_section(doc, td, key)
    if len({r["config"]["num_layers"] for r in td.records}) > 1:
        doc.h(3, "Depth")
        plots.depth(doc, td, key)
    _gradient_section(doc, td, key)
    if any(r.get("diagnostics", {}).get("batch_stats") for r in td.records):
        doc.h(3, "Per-step statistics of the batch norms")
        plots.batch_stats(doc, td, key)
    return verdicts


# ---------------------------------------------------------------------------------------------- the page
_SETTINGS = (("optimizer", "optimizer"), ("lr", "learning rate"), ("batch_size", "batch size"), ("steps", "steps"),
             ("clip", "gradient clipping (global norm)"), ("hidden_size", "hidden units"), ("num_layers", "layers"),
             ("cell", "cell"), ("init", "init"), ("eval_every", "validation every (steps)"),
             ("popstat_batches", "batches for exact BN statistics"))


def fixed_settings(records: Sequence[Dict[str, Any]]) -> str:
    """The settings shared by every run (and, for the others, that they vary)."""
    parts = []
    for key, words in _SETTINGS:
        values = {json_key(r["config"].get(key)) for r in records}
        value = next(iter(values)) if len(values) == 1 else "varied (see the tables)"
        parts.append(f"{words} {value}")
    return "; ".join(parts)


def json_key(v: Any) -> str:
    return "none" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


_HOW_TO_READ = (
    "**How to read the verdicts.** Each claim compares two models trained with the same seeds (and the same "
    "init), so the evidence is the per-seed paired difference, signed so that positive favours the claim; the "
    "effect is its mean with a 95% t interval whose spread never falls below " + f"{MARGIN:g}" + " (so a few "
    "identical differences never give a zero-width interval). The p-values of one table are adjusted together "
    "(Benjamini-Hochberg, q = 0.05). **✔ supported** / **✘ the opposite holds**: the adjusted p is below 0.05 "
    "and the effect points that way; **= equivalent within the margin**: the two one-sided tests place the "
    "effect within ±" + f"{MARGIN:g}" + "; **? inconclusive**: neither. \"Seeds where it holds\" counts the "
    "seeds whose paired difference favours the claim. Diverged runs count as chance level. Convergence speed "
    "is judged twice, by the validation metric and by the training loss, each averaged over training; where "
    "they disagree, both rows say so.")


def _header(doc: Document, path: str, records: List[Dict[str, Any]], manifest: Dict[str, Any],
            skipped: List[str]) -> None:
    spec = manifest.get("spec", {})
    study = (spec.get("name") or "").removesuffix("-smoke")
    doc.h(1, f"recnorm report: {spec.get('name') or os.path.basename(os.path.abspath(path))}")
    if spec.get("description"):
        doc.p(spec["description"])
    if study in STUDIES and STUDIES.get(study).tuning is not None:  # tuned per arm, then the final sweep
        made_by = (f"`python -m recnorm.experiments.tune {study}` (tuning) and "
                   f"`python -m recnorm.experiments.tune {study} --final`")
    else:
        made_by = f"`recnorm compare --preset {study}`" if study in STUDIES else (
            "`recnorm sweep`" if manifest else "`recnorm train`")
    doc.p(f"Made by `recnorm report {path}` from runs made by {made_by}" +
          (" (its smoke variant)" if (spec.get("name") or "").endswith("-smoke") else "") + ". Fixed settings: " +
          fixed_settings(records) + ".")
    if skipped:
        doc.p(f"**Warning: {len(skipped)} damaged result(s) left out of this report** (re-run the sweep to redo "
              f"them): " + "; ".join(skipped))
    v = records[0].get("versions", {})
    total = sum(r["timing"]["total_seconds"] for r in records)
    doc.p(f"{len(records)} finished runs" + (f" of {len(manifest['runs'])} in the sweep" if manifest else "") +
          f"; {total / 60:.1f} run-minutes in total. Software: python {v.get('python')}, torch {v.get('torch')}, "
          f"recnorm {v.get('recnorm')}, on {v.get('platform')}.")
    doc.p(_HOW_TO_READ)


def _study_section(doc: Document, study_name: str, records: List[Dict[str, Any]],
                   hints: Dict[str, Any]) -> List[List[str]]:
    """The study's own section (or, for a study without one, its declared claims) as verdict rows."""
    if study_name not in STUDIES:
        return []
    study = STUDIES.get(study_name)
    if study.section is not None:
        claims = study.section(doc, records, hints)
    else:
        claims = study.derive(records)
        if claims:
            doc.h(2, f"The claims of the {study.name} study")
            doc.p("Each claim's primary metric, direction, budget and margin are declared in its study file "
                  f"(recnorm.experiments.studies.{study.name}); the second metric is shown and not counted.")
            verdict_table(doc, claims)
    return [c.row() for c in claims]


def build_report(path: str, figdir: Optional[str] = None) -> Tuple[Document, List[List[str]]]:
    """Read ``path`` (a run or sweep directory) and lay out the report, writing its figures to ``figdir``
    (default ``path/figures``); returns the document and all verdict rows ``[task, claim, evidence, effect,
    seeds, verdict]``. Raises FileNotFoundError when no finished run is found."""
    records, skipped = load_records_checked(path)
    if not records:
        raise FileNotFoundError(f"no finished runs (result.json) under {path!r}" + (
            f"; skipped {len(skipped)} damaged result(s): " + "; ".join(skipped) if skipped else ""))
    manifest = read_json(os.path.join(path, SWEEP_FILE)) if is_sweep_dir(path) else {}
    hints = manifest.get("spec", {}).get("report", {}) or {}
    study = (manifest.get("spec", {}).get("name") or "").removesuffix("-smoke")
    if study in STUDIES:  # the study file's declared hints (its target) under what the manifest recorded
        hints = {**(STUDIES.get(study).spec().report or {}), **hints}
    doc = Document(figdir or os.path.join(path, "figures"))
    doc.skipped = skipped
    _header(doc, path, records, manifest, skipped)
    by_task: Dict[str, List[Dict[str, Any]]] = {}
    for r in records:
        k = r["config"]["task"] + "|" + str(sorted((r["config"].get("task_options") or {}).items()))
        by_task.setdefault(k, []).append(r)
    head = len(doc.blocks)
    study_rows = _study_section(doc, study, records, hints)  # the study's answer first, under the header
    if len(doc.blocks) > head:
        doc.p("The detail per task follows: learning curves, every setting's final metric, initialization and "
              "gradients.")
    all_verdicts = []
    known = study if study in STUDIES else ""
    for i, runs in enumerate(by_task.values()):
        td = TaskData(runs, varied_fields([r["config"] for r in runs]), hints)
        for row in _task_section(doc, td, f"t{i}_{runs[0]['config']['task']}", known):
            all_verdicts.append([td.task["name"]] + row)
    return doc, all_verdicts + study_rows


def write_report(path: str, out_dir: Optional[str] = None) -> Dict[str, Any]:
    """Write ``report.html``, ``report.md`` and ``figures/*.png`` for the run or sweep directory ``path``
    (into ``out_dir``, default ``path``).

    Returns ``{"html": path, "markdown": path, "verdicts": rows, "skipped": messages}``; each verdict row is
    ``[task, claim, evidence, effect, seeds, verdict]``, each message names a damaged result left out. A
    ``path`` that is not a directory raises FileNotFoundError and creates nothing.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such directory: {path!r}")
    out_dir = out_dir or path
    doc, verdicts = build_report(path, figdir=os.path.join(out_dir, "figures"))
    os.makedirs(out_dir, exist_ok=True)
    title = next((b[2] for b in doc.blocks if b[0] == "h"), "recnorm report")
    html_path = os.path.join(out_dir, "report.html")
    md_path = os.path.join(out_dir, "report.md")
    for p, text in ((html_path, doc.html(title)), (md_path, doc.markdown("figures"))):
        tmp = p + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    logger.info("report written to %s and %s (%d figures)", html_path, md_path, len(doc.figures))
    return {"html": html_path, "markdown": md_path, "verdicts": verdicts, "skipped": list(doc.skipped)}
