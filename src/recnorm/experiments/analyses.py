"""Claims and report sections beyond the generic report: one analysis per preset that needs one.

A preset names its analyses in its report settings (``SweepSpec.report["analyses"]``, e.g. ``["memory"]``);
:func:`recnorm.experiments.report.build_report` then calls :func:`run_analysis` for each name after the
per-task sections. An analysis reads only the finished runs' records (``result.json``), like the rest of
the report, and returns its verdict rows.

Every analysis is built from :class:`Claim` objects: a claim that names its metric, the literature source
it comes from, a paired comparison over seeds (``compare_paired`` of the report) with its 95% interval,
and, where a second reasonable metric exists, the same comparison on that metric. The evidence page
(:mod:`recnorm.experiments.evidence`) collects the same claims, by key, from the committed run
directories; :data:`CLAIMS` maps each preset to the function that derives its claims, including the
presets whose sections the generic report already writes (``default``, ``cooijmans``, ``laurent``,
``horizontal``).

Registering an analysis: add a function ``section(doc, records, hints) -> List[Claim]`` to
:data:`ANALYSES` (it writes its tables with ``doc.h``, ``doc.p``, ``doc.table`` and ``doc.figure``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from recnorm.experiments.results import area_under_curve, model_label, summary
from recnorm.experiments.sweep import flatten_config

__all__ = ["Claim", "paired", "run_analysis", "claims_for", "ANALYSES", "CLAIMS", "list_analyses"]

Record = Dict[str, Any]


# ---------------------------------------------------------------------------------------------- claims
@dataclasses.dataclass
class Claim:
    """One claim tested by a paired comparison over seeds.

    Attributes:
        key: stable identifier within its preset (the evidence page refers to claims by key).
        claim: the claim in words, naming its metric.
        source: where the claim comes from (paper, issue).
        task: the task (and setting) it was tested on.
        evidence: what was compared.
        cmp: ``compare_paired`` output; ``mean_diff`` is signed so that positive favours the claim.
        other: the same claim on a second reasonable metric (``(metric name, cmp)``), or None.
        outcome: overrides ``cmp["outcome"]`` for claims combined from several comparisons.
        effect_text: overrides the effect column (for combined claims).
    """

    key: str
    claim: str
    source: str
    task: str
    evidence: str
    cmp: Dict[str, Any]
    other: Optional[Tuple[str, Dict[str, Any]]] = None
    outcome: Optional[str] = None
    effect_text: Optional[str] = None

    @property
    def result(self) -> str:
        return self.outcome or self.cmp["outcome"]

    def verdict(self) -> str:
        return verdict_text(self.result, self.cmp)

    def effect(self) -> str:
        return self.effect_text or effect_text(self.cmp)

    def seeds(self) -> str:
        return f"{self.cmp['wins']} of {self.cmp['n']}"

    def other_text(self) -> str:
        if self.other is None:
            return "–"
        metric, cmp = self.other
        return f"{metric}: {verdict_text(cmp['outcome'], cmp)}, {effect_text(cmp)}, {cmp['wins']} of {cmp['n']} seeds"

    def row(self) -> List[str]:
        """``[task, claim, evidence, effect, seeds, verdict]``, the report's verdict-row layout."""
        evidence = self.evidence
        if self.other is not None:
            evidence += f". Second metric, {self.other_text()}"
        return [self.task, self.claim, evidence, self.effect(), self.seeds(), f"**{self.verdict()}**"]


_VERDICTS = {
    "supported": "supported",
    "contradicted": "not supported: the opposite holds beyond the seed spread",
    "within spread": "not supported: difference within seed spread",
    "insufficient": "not enough data",
    "not run": "not tested: no runs",
}


def verdict_text(outcome: str, cmp: Optional[Dict[str, Any]] = None) -> str:
    text = _VERDICTS.get(outcome, outcome)
    if outcome == "within spread" and cmp and cmp["n"] and cmp["wins"] == cmp["n"]:
        text += f" (all {cmp['n']} seeds agree; too few for this effect size)"
    return text


def interval(cmp: Dict[str, Any]) -> Optional[Tuple[float, float]]:
    """95% t interval of the mean paired difference, or None with fewer than 2 pairs."""
    if cmp.get("mean_diff") is None or cmp.get("se") is None:
        return None
    half = cmp["t_crit"] * cmp["se"]
    return cmp["mean_diff"] - half, cmp["mean_diff"] + half


def effect_text(cmp: Dict[str, Any]) -> str:
    if cmp.get("mean_diff") is None:
        return "–"
    lo, hi = interval(cmp)
    return f"{_num(cmp['mean_diff'])} [{_num(lo)}, {_num(hi)}]"


def _num(v: Optional[float]) -> str:
    if v is None:
        return "–"
    if abs(v) < 1e-12:  # a difference of equal values, up to rounding
        return "0"
    if abs(v) >= 1000 or abs(v) < 1e-3:
        return f"{v:+.2e}"
    return f"{v:+.3f}" if abs(v) < 10 else f"{v:+.1f}"


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "–"
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def _mean_sd(values: Sequence[Optional[float]]) -> str:
    s = summary(values)
    if not s["n"]:
        return "–"
    text = f"{_fmt(s['mean'])} ± {_fmt(s['std'])}"
    return text + (f" ({s['n_missing']} failed)" if s["n_missing"] else "")


def paired(a: Dict[int, Optional[float]], b: Dict[int, Optional[float]], better: str,
           worst: Optional[float] = None) -> Dict[str, Any]:
    """``compare_paired`` of the report: per-seed ``a - b`` signed so that positive favours ``a``."""
    from recnorm.experiments.report import compare_paired

    return compare_paired(a, b, better, worst=worst)


def _no_data() -> Dict[str, Any]:
    return {"n": 0, "wins": 0, "losses": 0, "mean_diff": None, "sd_diff": None, "se": None, "t_crit": None,
            "outcome": "not run"}


# ---------------------------------------------------------------------------------------------- record access
def label(r: Record) -> str:
    return model_label(r["config"])


_WORDS = {"none": "no norm", "layer": "layer norm", "batch": "per-step BN", "sequence_batch": "sequence-wise BN",
          "shared_batch": "naive shared BN", "rms": "RMSNorm"}


def name(lab: str) -> str:
    """A model label in words: ``"batch γ=0.1"`` -> ``"per-step BN (γ0 = 0.1)"``."""
    head, _, rest = lab.partition(" ")
    words = _WORDS.get(head.split("+")[0], head)
    if rest.startswith("γ="):
        return f"{words} (γ0 = {rest[2:]})"
    if rest:  # variants of the norm ("layer joint carried c"): say which
        parts = [w for key, w in (("joint", "joint gate norm"), ("carried c", "carried normalized cell")) if key in rest]
        return f"{words} ({', '.join(parts) or rest})"
    return f"{words} ({lab})" if words != lab and head not in _WORDS else words


def select(records: Sequence[Record], **where: Any) -> List[Record]:
    """Records whose flattened config matches every ``where`` item (``label`` matches the model label;
    dotted names such as ``task_options__length`` use ``__`` for the dot)."""
    out = []
    for r in records:
        flat = flatten_config(r["config"])
        ok = True
        for key, want in where.items():
            have = label(r) if key == "label" else flat.get(key.replace("__", "."))
            if have != want:
                ok = False
                break
        if ok:
            out.append(r)
    return out


def final(r: Record, split: str = "test", metric: Optional[str] = None) -> Optional[float]:
    """A final metric of a finished run (``split`` a key of ``result["final"]``); None when missing."""
    values = ((r.get("final") or {}).get(split) or {})
    return values.get(metric or r["metric"])


def auc(r: Record) -> Optional[float]:
    """Mean validation metric over training (the normalized area under the validation curve)."""
    curve = r.get("valid") or {}
    return area_under_curve(curve.get("step", []), curve.get(r["metric"], []), r.get("steps_planned", 0))


def by_seed(records: Sequence[Record], value: Callable[[Record], Optional[float]]) -> Dict[int, Optional[float]]:
    return {r["seed"]: value(r) for r in records}


def chance_level(records: Sequence[Record]) -> Optional[float]:
    """Median validation metric at step 0 (what an untrained model scores)."""
    initial = [r["valid"][r["metric"]][0] for r in records
               if (r.get("valid") or {}).get(r["metric"]) and r["valid"][r["metric"]][0] is not None]
    return statistics.median(initial) if initial else None


def _better(records: Sequence[Record]) -> str:
    return "higher" if records and records[0]["higher_is_better"] else "lower"


def compare(records: Sequence[Record], a: Dict[str, Any], b: Dict[str, Any],
            value: Callable[[Record], Optional[float]] = final, better: Optional[str] = None) -> Dict[str, Any]:
    """Paired comparison of the runs selected by ``a`` against those selected by ``b`` on ``value``;
    failed runs count as chance level."""
    ra, rb = select(records, **a), select(records, **b)
    if not ra or not rb:
        return _no_data()
    return paired(by_seed(ra, value), by_seed(rb, value), better or _better(ra), worst=chance_level(records))


def _loss(r: Record) -> Optional[float]:
    return final(r, "test", "loss")


def _task_name(records: Sequence[Record]) -> str:
    return records[0]["task"]["name"] if records else "–"


def _tasks(records: Sequence[Record]) -> List[str]:
    out: List[str] = []
    for r in records:
        if r["config"]["task"] not in out:
            out.append(r["config"]["task"])
    return out


def _labels(records: Sequence[Record]) -> List[str]:
    order = {"none": 0, "layer": 1, "batch": 2, "sequence_batch": 3, "shared_batch": 4}
    return sorted({label(r) for r in records}, key=lambda s: (order.get(s.split()[0].split("+")[0], 9), s))


def verdict_table(doc: Any, claims: Sequence[Claim]) -> None:
    doc.table(["claim", "evidence", "effect [95% interval] (positive favours the claim)", "seeds where it holds",
               "verdict"], [c.row()[1:] for c in claims])


# ---------------------------------------------------------------------------------------------- drawbacks
_BN_LABELS = ("batch γ=0.1", "sequence_batch")
_STATS = (("test_ema", "running averages (EMA)"), ("test", "exact recomputation"),
          ("test_batch_stats", "batch statistics, 500 per batch"),
          ("test_batch_stats_train_size", "batch statistics, training batch size"))


def drawbacks_claims(records: Sequence[Record]) -> List[Claim]:
    sizes = sorted({r["config"]["batch_size"] for r in records})
    if len(sizes) < 2:
        return []
    small, large = sizes[0], sizes[-1]
    task = f"{_task_name(records)}, batch {small} vs {large}"
    claims = []

    def delta(lab: str, value: Callable[[Record], Optional[float]], base: Optional[str] = "none"
              ) -> Dict[int, Optional[float]]:
        # Per seed: (lab - base) at the small batch minus the same at the large batch.
        out: Dict[int, Optional[float]] = {}
        for size_sign, size in ((1, small), (-1, large)):
            runs = by_seed(select(records, label=lab, batch_size=size), value)
            ref = by_seed(select(records, label=base, batch_size=size), value) if base else {}
            for seed, v in runs.items():
                w = ref.get(seed, 0.0) if base else 0.0
                if seed not in out:
                    out[seed] = 0.0
                if v is None or w is None or out[seed] is None:
                    out[seed] = None
                else:
                    out[seed] += size_sign * (v - w)
        return out

    def zero(d: Dict[int, Optional[float]]) -> Dict[int, float]:
        return {s: 0.0 for s in d}

    labels = _labels(records)
    for lab in labels:
        if lab == "none":
            continue
        d, d_loss = delta(lab, final), delta(lab, _loss)
        # Positive favours "lab degrades at small batches": its advantage over no norm falls.
        cmp = paired(zero(d), d, "higher")
        other = paired(d_loss, zero(d_loss), "higher")
        claims.append(Claim(
            key=f"small_batch:{lab}", claim=f"{name(lab)} loses ground against no norm as the batch shrinks "
                                            f"from {large} to {small} (final test accuracy, exact statistics)",
            source="Ba et al. 2016 (BN needs large batches; LN does not)", task=task,
            evidence=f"per seed: ({lab} - none) at batch {small} minus ({lab} - none) at batch {large}",
            cmp=cmp, other=("test cross-entropy", other)))
    if "layer" in labels:
        for lab in labels:
            if not lab.startswith(("batch", "sequence_batch")):
                continue
            d_bn, d_ln = delta(lab, final, None), delta("layer", final, None)
            d_bn_l, d_ln_l = delta(lab, _loss, None), delta("layer", _loss, None)
            claims.append(Claim(
                key=f"bn_vs_ln_small_batch:{lab}",
                claim=f"{name(lab)} degrades more than layer norm as the batch shrinks from {large} to {small} (final "
                      f"test accuracy, exact statistics)",
                source="Ba et al. 2016", task=task,
                evidence=f"per seed: ({lab} at {small} - at {large}) minus (layer at {small} - at {large})",
                cmp=paired(d_ln, d_bn, "higher"), other=("test cross-entropy", paired(d_bn_l, d_ln_l, "higher"))))
    for lab in labels:
        if lab not in _BN_LABELS and not lab.startswith(("batch", "sequence_batch")):
            continue

        def gap(split: str) -> Callable[[Record], Optional[float]]:
            def value(r: Record) -> Optional[float]:
                a, b = final(r, "test"), final(r, split)
                return None if a is None or b is None else a - b
            return value

        g_small = by_seed(select(records, label=lab, batch_size=small), gap("test_batch_stats_train_size"))
        g_large = by_seed(select(records, label=lab, batch_size=large), gap("test_batch_stats_train_size"))
        e_small = by_seed(select(records, label=lab, batch_size=small), gap("test_ema"))
        e_large = by_seed(select(records, label=lab, batch_size=large), gap("test_ema"))
        claims.append(Claim(
            key=f"train_eval_gap:{lab}",
            claim=f"{name(lab)}: the gap between training-mode (batch) and eval-mode (population) statistics grows as "
                  f"the batch shrinks (test accuracy with exact population statistics minus with the batch "
                  f"statistics of training-sized batches)",
            source="Ba et al. 2016; Ioffe 2017 (batch renormalization)", task=task,
            evidence=f"per seed: that gap at batch {small} minus at batch {large}",
            cmp=paired(g_small, g_large, "higher"),
            other=("gap between exact statistics and running averages (EMA)", paired(e_small, e_large, "higher"))))
        for size in sizes:
            runs = select(records, label=lab, batch_size=size)
            claims.append(Claim(
                key=f"ema_loses:{lab}:{size}",
                claim=f"{name(lab)} at batch {size}: evaluating with running averages (EMA) loses test accuracy against "
                      f"exactly recomputed population statistics",
                source="Cooijmans et al. 2017 (an extra pass over the training set); recnorm findings",
                task=f"{_task_name(records)}, batch {size}", evidence="per seed: exact minus EMA test accuracy",
                cmp=paired(by_seed(runs, final), by_seed(runs, lambda r: final(r, "test_ema")), "higher")))
    return claims


def drawbacks_section(doc: Any, records: Sequence[Record], hints: Dict[str, Any]) -> List[Claim]:
    sizes = sorted({r["config"]["batch_size"] for r in records})
    labels = _labels(records)
    metric = records[0]["metric"]
    doc.h(2, "Batch size and the statistics used at test time")
    doc.p(f"Final test {metric} (mean ± sd over seeds) by training batch size; batch-norm models evaluated with "
          f"exactly recomputed population statistics. Every run trains the same number of steps at the same "
          f"learning rate, so a smaller batch also sees fewer examples: the claims compare each norm with no "
          f"norm at the same batch size.")
    doc.table(["norm"] + [f"batch {b}" for b in sizes],
              [[lab] + [_mean_sd([final(r) for r in select(records, label=lab, batch_size=b)]) for b in sizes]
               for lab in labels])
    rows = []
    for lab in labels:
        for b in sizes:
            runs = select(records, label=lab, batch_size=b)
            if runs and any("test_ema" in (r.get("final") or {}) for r in runs):
                rows.append([lab, str(b)] + [_mean_sd([final(r, key) for r in runs]) for key, _ in _STATS])
    if rows:
        doc.p(f"Test {metric} of the batch-norm models by the statistics used at evaluation: the running averages "
              f"a plain `.eval()` uses, the exact population statistics of a pass over training batches "
              f"(`recnorm.recompute_population_statistics`), and batch statistics (training mode) of 500-sequence "
              f"batches and of batches of the training batch size.")
        doc.table(["norm", "batch size"] + [title for _, title in _STATS], rows)
    _plot_batch_sizes(doc, records, sizes, labels)
    claims = drawbacks_claims(records)
    doc.h(3, "Verdicts")
    verdict_table(doc, claims)
    return claims


def _plot_batch_sizes(doc: Any, records: Sequence[Record], sizes: List[int], labels: List[str]) -> None:
    from recnorm.experiments.report import _plt

    plt = _plt()
    metric = records[0]["metric"]
    bn = [lab for lab in labels if any("test_ema" in (r.get("final") or {}) for r in select(records, label=lab))]
    fig, axes = plt.subplots(1, 1 + len(bn), figsize=(4.4 * (1 + len(bn)), 3.6), squeeze=False)
    ax = axes[0][0]
    for lab in labels:
        means = [summary([final(r) for r in select(records, label=lab, batch_size=b)])["mean"] for b in sizes]
        ax.plot(sizes, means, marker="o", label=lab)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes])
    ax.set_xlabel("training batch size")
    ax.set_ylabel(f"final test {metric}")
    ax.legend(fontsize=7)
    for j, lab in enumerate(bn, start=1):
        ax = axes[0][j]
        for key, title in _STATS:
            means = [summary([final(r, key) for r in select(records, label=lab, batch_size=b)])["mean"] for b in sizes]
            ax.plot(sizes, means, marker="o", label=title)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(b) for b in sizes])
        ax.set_title(f"{lab}: statistics at evaluation", fontsize=9)
        ax.set_xlabel("training batch size")
        ax.legend(fontsize=6)
    fig.tight_layout()
    doc.figure(fig, "analysis_batch_size", f"final test {metric} against the training batch size (mean over "
                                           f"seeds), and for each batch norm by the statistics used at evaluation")


# ---------------------------------------------------------------------------------------------- regularization
def _arm(r: Record) -> str:
    lab = label(r)
    dropout = r["config"].get("dropout") or 0.0
    return f"{lab}, dropout {dropout:g}" if dropout else lab


def _arm_name(arm: str) -> str:
    lab, _, dropout = arm.partition(", ")
    return name(lab) + (f" with {dropout}" if dropout else "")


def _gap_acc(r: Record) -> Optional[float]:
    a, b = final(r, "train"), final(r, "test")
    return None if a is None or b is None else a - b


def _gap_loss(r: Record) -> Optional[float]:
    a, b = final(r, "test", "loss"), final(r, "train", "loss")
    return None if a is None or b is None else a - b


def regularization_claims(records: Sequence[Record]) -> List[Claim]:
    claims = []
    sizes = sorted({(r["config"]["task_options"] or {}).get("train_size") for r in records}, key=lambda v: v or 0)
    arms = []
    for r in records:
        if _arm(r) not in arms:
            arms.append(_arm(r))
    for size in sizes:
        runs = [r for r in records if (r["config"]["task_options"] or {}).get("train_size") == size]
        base = [r for r in runs if _arm(r) == "none"]
        if not base:
            continue
        task = f"{_task_name(runs)}, {size} training images"
        for arm in arms:
            if arm == "none":
                continue
            these = [r for r in runs if _arm(r) == arm]
            if not these:
                continue
            source = ("reference regularizer (Zaremba et al. 2014)" if "dropout" in arm else
                      "Ioffe & Szegedy 2015 (BN regularizes); Laurent et al. 2016 (BN-RNNs overfit more)")
            claims.append(Claim(
                key=f"gap:{arm}:{size}", claim=f"{_arm_name(arm)} narrows the train-test gap in accuracy against no norm "
                                               f"(final train minus test accuracy, eval mode)",
                source=source, task=task, evidence="per seed: gap of no norm minus gap of " + arm,
                cmp=paired(by_seed(these, _gap_acc), by_seed(base, _gap_acc), "lower"),
                other=("gap in cross-entropy (test minus train)",
                       paired(by_seed(these, _gap_loss), by_seed(base, _gap_loss), "lower"))))
            claims.append(Claim(
                key=f"test:{arm}:{size}", claim=f"{_arm_name(arm)} reaches a better final test accuracy than no norm",
                source=source, task=task, evidence=f"per seed: test accuracy of {arm} minus of no norm",
                cmp=paired(by_seed(these, final), by_seed(base, final), "higher"),
                other=("test cross-entropy", paired(by_seed(these, _loss), by_seed(base, _loss), "lower"))))
    return claims


def regularization_section(doc: Any, records: Sequence[Record], hints: Dict[str, Any]) -> List[Claim]:
    doc.h(2, "Train-test gap")
    rows = []
    for size in sorted({(r["config"]["task_options"] or {}).get("train_size") for r in records}, key=lambda v: v or 0):
        runs = [r for r in records if (r["config"]["task_options"] or {}).get("train_size") == size]
        arms = []
        for r in runs:
            if _arm(r) not in arms:
                arms.append(_arm(r))
        for arm in arms:
            these = [r for r in runs if _arm(r) == arm]
            rows.append([str(size), arm, _mean_sd([final(r, "train") for r in these]),
                         _mean_sd([final(r) for r in these]), _mean_sd([_gap_acc(r) for r in these]),
                         _mean_sd([final(r, "train", "loss") for r in these]),
                         _mean_sd([final(r, "test", "loss") for r in these]), _mean_sd([_gap_loss(r) for r in these])])
    doc.p("The final model on the whole training set and on the test set, both in eval mode (batch norms with "
          "exactly recomputed population statistics, dropout off), mean ± sd over seeds. A regularizer shrinks "
          "the gap; inter-layer dropout is the reference.")
    doc.table(["training images", "model", "train accuracy", "test accuracy", "gap (accuracy)",
               "train cross-entropy", "test cross-entropy", "gap (cross-entropy)"], rows)
    claims = regularization_claims(records)
    doc.h(3, "Verdicts")
    verdict_table(doc, claims)
    return claims


# ---------------------------------------------------------------------------------------------- padding
def _feed(r: Record) -> str:
    c = r["config"]
    if c.get("feed", "packed") == "packed":
        return "packed"
    return "padded, sorted by length" if c.get("sort_by_length") else "padded"


_FEEDS = ("packed", "padded", "padded, sorted by length")


def padding_claims(records: Sequence[Record]) -> List[Claim]:
    claims = []
    for task in _tasks(records):
        runs = select(records, task=task)
        for lab in _labels(runs):
            if not lab.startswith(("batch", "sequence_batch")):
                continue
            arms = {f: [r for r in runs if label(r) == lab and _feed(r) == f] for f in _FEEDS}
            better = _better(runs)
            metric = runs[0]["metric"]
            if arms["packed"] and arms["padded"]:
                claims.append(Claim(
                    key=f"masked:{task}:{lab}", claim=f"{name(lab)}: padding in the statistics hurts; packed (masked) "
                                                      f"batches end better than padded ones (final test {metric})",
                    source="Cooijmans et al. 2017 §5.4; deepspeech.pytorch #312", task=task,
                    evidence=f"per seed: {metric} packed vs padded",
                    cmp=paired(by_seed(arms["packed"], final), by_seed(arms["padded"], final), better),
                    other=(f"mean valid {metric} over training",
                           paired(by_seed(arms["packed"], auc), by_seed(arms["padded"], auc), better))))
            if arms["padded"] and arms["padded, sorted by length"]:
                sorted_runs = arms["padded, sorted by length"]
                claims.append(Claim(
                    key=f"sorted:{task}:{lab}", claim=f"{name(lab)}: sorting by length reduces the padding penalty; padded "
                                                      f"batches of similar lengths end better than random padded "
                                                      f"batches (final test {metric})",
                    source="Amodei et al. 2016 (SortaGrad); length bucketing", task=task,
                    evidence=f"per seed: {metric} padded+sorted vs padded",
                    cmp=paired(by_seed(sorted_runs, final), by_seed(arms["padded"], final), better),
                    other=(f"against packed (final test {metric})",
                           paired(by_seed(sorted_runs, final), by_seed(arms["packed"], final), better))))
    return claims


def padding_section(doc: Any, records: Sequence[Record], hints: Dict[str, Any]) -> List[Claim]:
    doc.h(2, "Masked against padded statistics")
    doc.p("*packed*: the batch goes to the layer as a PackedSequence, so every statistic is taken over valid "
          "steps only. *padded*: the zero-padded tensor goes in as it is, so padded steps enter the batch "
          "statistics (and the population statistics recomputed from such batches); the loss still reads valid "
          "steps only. *padded, sorted by length*: padded, but each batch is formed from sequences of similar "
          "length (pools of batches sorted by length), so little padding is left to enter the statistics.")
    for task in _tasks(records):
        runs = select(records, task=task)
        metric = runs[0]["metric"]
        rows = []
        for lab in _labels(runs):
            cells = []
            for f in _FEEDS:
                these = [r for r in runs if label(r) == lab and _feed(r) == f]
                cells.append(_mean_sd([final(r) for r in these]) if these else "–")
            rows.append([lab] + cells)
        doc.h(3, f"{task}: final test {metric}")
        doc.table(["norm"] + list(_FEEDS), rows)
        control = []
        for lab in _labels(runs):
            if not lab.startswith("layer"):
                continue
            packed = by_seed([r for r in runs if label(r) == lab and _feed(r) == "packed"], final)
            padded = by_seed([r for r in runs if label(r) == lab and _feed(r) == "padded"], final)
            diffs = [abs(packed[s] - padded[s]) for s in packed if s in padded
                     and packed[s] is not None and padded[s] is not None]
            if diffs:
                control.append(f"{lab}: largest |packed - padded| over {len(diffs)} seeds = {_fmt(max(diffs))}")
        if control:
            doc.p("Control: per-example statistics never see padding, so packed and padded layer norm differ only by "
                  "floating-point rounding (the fused kernel on a packed and on a padded batch), which 300-400 "
                  "training steps amplify: " + "; ".join(control) + ".")
    claims = padding_claims(records)
    doc.h(3, "Verdicts")
    verdict_table(doc, claims)
    return claims


# ---------------------------------------------------------------------------------------------- memory
def _setting(r: Record) -> str:
    o = r["config"].get("task_options") or {}
    if r["config"]["task"] == "copy":
        return f"copy, delay {o.get('delay', 50)}"
    if r["config"]["task"].startswith("adding"):
        return f"adding, T = {o.get('length', 100)}"
    return r["config"]["task"]


def _chance_and_success(r: Record) -> Tuple[float, float]:
    """The memoryless predictor's score and the success threshold (half way from it to perfect)."""
    task = r["task"]
    if task["name"] == "copy":
        chance = 1.0 / (task.get("options") or {}).get("num_symbols", 8)
        return chance, (1.0 + chance) / 2
    if task["name"].startswith("adding"):
        return 1.0 / 6.0, 1.0 / 12.0
    raise ValueError(f"memory analysis: no chance level for task {task['name']!r}; expected copy or adding")


def succeeded(r: Record) -> bool:
    v = final(r)
    if v is None:
        return False
    _, threshold = _chance_and_success(r)
    return v >= threshold if r["higher_is_better"] else v <= threshold


_GRAD_FLOOR = 1e-40  # a gradient norm that underflowed to 0 in float32 counts as this


def grad_ratio(r: Record, which: str = "init") -> Optional[float]:
    """log10 of ||dL/dh_1|| / ||dL/dh_T|| of the first layer, at init or at the end (0: flat; negative:
    vanishing going back in time; a first-step norm that underflowed to 0 counts as 1e-40)."""
    flow = (r.get("diagnostics") or {}).get("grad_flow") or []
    if not flow:
        return None
    entry = flow[0] if which == "init" else flow[-1]
    norms = (entry.get("norms") or {}).get("rnn.l0")
    if not norms or norms[0] is None or norms[-1] is None or norms[-1] <= 0:
        return None
    return math.log10(max(norms[0], _GRAD_FLOOR) / norms[-1])


def memory_claims(records: Sequence[Record]) -> List[Claim]:
    claims = []
    settings: List[str] = []
    for r in records:
        if _setting(r) not in settings:
            settings.append(_setting(r))
    for setting in settings:
        runs = [r for r in records if _setting(r) == setting]
        metric = runs[0]["metric"]
        better = _better(runs)

        def cell_runs(cell: str, lab: str = "none") -> List[Record]:
            return [r for r in runs if r["config"]["cell"] == cell and label(r) == lab]

        rnn = cell_runs("rnn")
        for lab in _labels(runs):  # the gating claim with each norm: does the gated cell remember more?
            rnn_lab = cell_runs("rnn", lab)
            for cell in ("gru", "lstm"):
                gated = cell_runs(cell, lab)
                if not gated or not rnn_lab:
                    continue
                with_norm = "no norm" if lab == "none" else f"both with {name(lab)}"
                claims.append(Claim(
                    key=f"memory:{cell}:{lab}:{setting}",
                    claim=f"the {cell.upper()} remembers more than a tanh RNN (final test {metric}, {with_norm})",
                    source="Hochreiter & Schmidhuber 1997; Cho et al. 2014", task=setting,
                    evidence=f"per seed: {cell.upper()} vs tanh RNN",
                    cmp=paired(by_seed(gated, final), by_seed(rnn_lab, final), better),
                    other=("runs that succeed", paired(by_seed(gated, lambda r: float(succeeded(r))),
                                                       by_seed(rnn_lab, lambda r: float(succeeded(r))), "higher"))))
        for cell in ("gru", "lstm"):
            gated = cell_runs(cell)
            if not gated or not rnn:
                continue
            cname = cell.upper()
            claims.append(Claim(
                key=f"gradient:{cell}:{setting}",
                claim=f"the {cname} passes more gradient back through time than a tanh RNN at init "
                      f"(log10 ||dL/dh_1|| / ||dL/dh_T||, no norm)",
                source="Hochreiter & Schmidhuber 1997; Bengio et al. 1994", task=setting,
                evidence=f"per seed: {cname} vs tanh RNN",
                cmp=paired(by_seed(gated, grad_ratio), by_seed(rnn, grad_ratio), "higher"),
                other=("after training", paired(by_seed(gated, lambda r: grad_ratio(r, "final")),
                                                by_seed(rnn, lambda r: grad_ratio(r, "final")), "higher"))))
        for cell in ("rnn", "gru", "lstm"):
            base = cell_runs(cell)
            for lab in _labels(runs):
                if lab == "none":
                    continue
                these = cell_runs(cell, lab)
                if not these or not base:
                    continue
                claims.append(Claim(
                    key=f"speed:{cell}:{lab}:{setting}",
                    claim=f"{name(lab)} makes the {cell.upper() if cell != 'rnn' else 'tanh RNN'} train faster than no "
                          f"norm (mean valid {metric} over training)",
                    source="Cooijmans et al. 2017; Ba et al. 2016", task=setting,
                    evidence=f"per seed: {lab} vs no norm",
                    cmp=paired(by_seed(these, auc), by_seed(base, auc), better, worst=None),
                    other=(f"final test {metric}", paired(by_seed(these, final), by_seed(base, final), better))))
    return claims


def memory_section(doc: Any, records: Sequence[Record], hints: Dict[str, Any]) -> List[Claim]:
    doc.h(2, "Memory and gradient flow by cell")
    doc.p("A run *succeeds* when its final test metric closes half the gap between the memoryless predictor and "
          "a perfect one: copy recall accuracy above (1 + 1/8)/2 = 0.5625 (chance 1/8), adding MSE below 1/12 "
          "(chance: predicting the mean, 1/6). Gradient flow: log10 of ||dL/dh_1|| / ||dL/dh_T|| of the first "
          "layer on a fixed training batch, mean over seeds of the logs (0: flat; -3: a thousandfold smaller at the "
          "first step than at the last; a norm that underflowed to 0 counts as 1e-40).")
    settings: List[str] = []
    for r in records:
        if _setting(r) not in settings:
            settings.append(_setting(r))
    rows = []
    for setting in settings:
        runs = [r for r in records if _setting(r) == setting]
        chance, threshold = _chance_and_success(runs[0])
        for cell in ("rnn", "gru", "lstm"):
            for lab in _labels(runs):
                these = [r for r in runs if r["config"]["cell"] == cell and label(r) == lab]
                if not these:
                    continue
                init = summary([grad_ratio(r) for r in these])["mean"]
                end = summary([grad_ratio(r, "final") for r in these])["mean"]
                rows.append([setting, {"rnn": "tanh RNN"}.get(cell, cell.upper()), lab,
                             f"{sum(succeeded(r) for r in these)} of {len(these)}", _mean_sd([final(r) for r in these]),
                             f"{_fmt(chance)} / {_fmt(threshold)}", _fmt(init), _fmt(end)])
    doc.table(["task", "cell", "norm", "succeeded", "final test metric", "chance / success threshold",
               "log10 grad ratio at init", "after training"], rows)
    claims = memory_claims(records)
    doc.h(3, "Verdicts")
    verdict_table(doc, claims)
    return claims


# ---------------------------------------------------------------------------------------------- language
_ANCHORS = ("Literature anchors (Penn Treebank, not this corpus): Cooijmans et al. 2017 report 1.38 bpc for an "
            "LSTM(1000) and 1.32 for the BN-LSTM; Ba et al. 2016 report that layer norm speeds up the training of "
            "language models.")


def language_claims(records: Sequence[Record]) -> List[Claim]:
    claims = []
    task = _task_name(records)
    base = select(records, label="none")
    for lab in _labels(records):
        if lab == "none" or not base:
            continue
        these = select(records, label=lab)
        claims.append(Claim(
            key=f"bpc:{lab}", claim=f"{name(lab)} reaches a lower final test bits per character than the plain LSTM",
            source="Cooijmans et al. 2017 (PTB: 1.32 vs 1.38 bpc)", task=task,
            evidence=f"per seed: test bpc of no norm minus of {lab}",
            cmp=paired(by_seed(these, final), by_seed(base, final), "lower"),
            other=("final valid bpc", paired(by_seed(these, lambda r: final(r, "valid")),
                                             by_seed(base, lambda r: final(r, "valid")), "lower"))))
        claims.append(Claim(
            key=f"speed:{lab}", claim=f"{name(lab)} trains faster than the plain LSTM (mean valid bits per character over "
                                      f"training)",
            source="Ba et al. 2016 (layer norm speeds up language models)", task=task,
            evidence=f"per seed: mean valid bpc over training, no norm minus {lab}",
            cmp=paired(by_seed(these, auc), by_seed(base, auc), "lower"),
            other=("mean valid bpc over training seconds", paired(by_seed(these, _auc_time), by_seed(base, _auc_time),
                                                                  "lower"))))
    return claims


def _auc_time(r: Record) -> Optional[float]:
    """Mean valid metric over training seconds (the curve against wall-clock time)."""
    curve = r.get("valid") or {}
    times, values = curve.get("time", []), curve.get(r["metric"], [])
    if len(times) < 2 or not times[-1]:
        return None
    return area_under_curve(times, values, times[-1])


def language_section(doc: Any, records: Sequence[Record], hints: Dict[str, Any]) -> List[Claim]:
    doc.h(2, "Bits per character")
    rows = []
    for lab in _labels(records):
        these = select(records, label=lab)
        rows.append([lab, str(len(these)), _mean_sd([final(r, "valid") for r in these]), _mean_sd([final(r) for r in these]),
                     _mean_sd([auc(r) for r in these]),
                     _fmt(statistics.fmean(r["timing"]["seconds_per_step"] for r in these) * 1000) + " ms"])
    doc.table(["norm", "runs", "final valid bpc", "final test bpc", "mean valid bpc over training", "time per step"],
              rows)
    doc.p(_ANCHORS + " Every row of the preset (recnorm.experiments.presets.LANGUAGE_VARIANTS) appears here and in "
          "the verdicts by its label.")
    claims = language_claims(records)
    doc.h(3, "Verdicts")
    verdict_table(doc, claims)
    return claims


# ---------------------------------------------------------------------------------------------- generic presets
def default_claims(records: Sequence[Record]) -> List[Claim]:
    """The main job's claims: convergence speed and init sensitivity at gain 1, naive shared BN."""
    claims = []
    task = _task_name(records)
    gains = sorted({r["config"]["init_gain"] for r in records})
    ref = 1.0 if 1.0 in gains else gains[len(gains) // 2]
    for lab in ("batch γ=0.1", "layer", "sequence_batch", "shared_batch"):
        if not select(records, label=lab):
            continue
        claims.append(Claim(
            key=f"faster:{lab}", claim=f"{name(lab)} makes the LSTM converge faster than no norm (mean valid accuracy over "
                                       f"training)",
            source="Cooijmans et al. 2017; Ba et al. 2016; the CNN intuition (Ioffe & Szegedy 2015)",
            task=f"{task}, gain {ref:g}", evidence=f"per seed: {lab} minus no norm",
            cmp=compare(records, {"label": lab, "init_gain": ref}, {"label": "none", "init_gain": ref}, auc),
            other=("final test accuracy", compare(records, {"label": lab, "init_gain": ref},
                                                  {"label": "none", "init_gain": ref}))))

        def spread(lab_: str) -> Dict[int, Optional[float]]:
            out: Dict[int, Optional[float]] = {}
            chance = chance_level(records)
            for seed in sorted({r["seed"] for r in records}):
                vals = [final(r) for r in select(records, label=lab_, seed=seed)]
                vals = [chance if v is None else v for v in vals]
                out[seed] = (max(vals) - min(vals)) if len(vals) >= 2 and None not in vals else None
            return out

        if len(gains) >= 2:
            claims.append(Claim(
                key=f"init:{lab}", claim=f"{name(lab)} makes the LSTM less sensitive to the init gain (range of final test "
                                         f"accuracy over gains {', '.join(f'{g:g}' for g in gains)})",
                source="the CNN intuition (Ioffe & Szegedy 2015); Ba et al. 2016 (invariance to weight scale)",
                task=task, evidence=f"per seed: range of no norm minus range of {lab}",
                cmp=paired(spread(lab), spread("none"), "lower")))
    if select(records, label="shared_batch"):
        claims.append(Claim(
            key="shared_hurts", claim="naive BN with statistics shared over time ends worse than per-step BN (final "
                                      "test accuracy)",
            source="Laurent et al. 2016; Cooijmans et al. 2017", task=f"{task}, gain {ref:g}",
            evidence="per seed: per-step BN (γ0 = 0.1) minus shared BN",
            cmp=compare(records, {"label": "batch γ=0.1", "init_gain": ref}, {"label": "shared_batch", "init_gain": ref}),
            other=("mean valid accuracy over training", compare(records, {"label": "batch γ=0.1", "init_gain": ref},
                                                                {"label": "shared_batch", "init_gain": ref}, auc))))
    return claims


def cooijmans_claims(records: Sequence[Record]) -> List[Claim]:
    claims = []
    for task in _tasks(records):
        runs = select(records, task=task)
        claims.append(Claim(
            key=f"bn_faster:{task}", claim="BN-LSTM (γ0 = 0.1) converges faster than the LSTM (mean valid accuracy "
                                           "over training)",
            source="Cooijmans et al. 2017 (faster convergence, Fig. 2)", task=task,
            evidence="per seed: BN-LSTM minus LSTM",
            cmp=compare(runs, {"label": "batch γ=0.1"}, {"label": "none"}, auc),
            other=("final test accuracy", compare(runs, {"label": "batch γ=0.1"}, {"label": "none"}))))
        claims.append(Claim(
            key=f"bn:{task}", claim="BN-LSTM (γ0 = 0.1) ends with a better test accuracy than the LSTM",
            source="Cooijmans et al. 2017 (seq. MNIST 99.0 vs 98.9, permuted 95.4 vs 90.2)", task=task,
            evidence="per seed: BN-LSTM minus LSTM",
            cmp=compare(runs, {"label": "batch γ=0.1"}, {"label": "none"}),
            other=("mean valid accuracy over training", compare(runs, {"label": "batch γ=0.1"}, {"label": "none"}, auc))))
        claims.append(Claim(
            key=f"gamma:{task}", claim="γ0 = 0.1 beats γ0 = 1 for the BN-LSTM (final test accuracy)",
            source="Cooijmans et al. 2017, App. B", task=task, evidence="per seed: γ0 = 0.1 minus γ0 = 1",
            cmp=compare(runs, {"label": "batch γ=0.1"}, {"label": "batch γ=1"}),
            other=("mean valid accuracy over training", compare(runs, {"label": "batch γ=0.1"}, {"label": "batch γ=1"},
                                                                auc))))
    return claims


def laurent_claims(records: Sequence[Record]) -> List[Claim]:
    depths = sorted({r["config"]["num_layers"] for r in records})
    if len(depths) < 2:
        return []
    shallow, deep = depths[0], depths[-1]
    task = _task_name(records)
    s = compare(records, {"label": "sequence_batch", "num_layers": shallow}, {"label": "none", "num_layers": shallow})
    d = compare(records, {"label": "sequence_batch", "num_layers": deep}, {"label": "none", "num_layers": deep})
    if d["outcome"] == "supported" and s["outcome"] != "supported":
        outcome = "supported"
    elif "not run" in (s["outcome"], d["outcome"]) or "insufficient" in (s["outcome"], d["outcome"]):
        outcome = "insufficient"
    elif s["outcome"] == "supported":
        outcome = "not supported: it helps the shallow stack too"
    else:
        outcome = "not supported: no benefit beyond the seed spread in the deepest stack"
    return [Claim(
        key="deep_only", claim=f"sequence-wise BN of the input term helps deep stacks only (final test accuracy, "
                               f"{deep} layers against {shallow})",
        source="Laurent et al. 2016; Amodei et al. 2016 (Deep Speech 2, Table 1)", task=task,
        evidence=f"per seed: sequence-wise BN minus no norm, at {deep} and at {shallow} layer(s)", cmp=d,
        outcome=outcome, effect_text=f"{deep} layers: {effect_text(d)}; {shallow}: {effect_text(s)}",
        other=(f"at {shallow} layer(s)", s))] + _between_layers_claims(records, depths, task)


def _between_layers_claims(records: Sequence[Record], depths: Sequence[int], task: str) -> List[Claim]:
    """The two vertical placements side by side, at each depth that has the literal one (BN of each
    layer's output, between the layers): against no norm, and against Laurent's BN of ``W_ih x_t``."""
    between = "none+between=batch"
    claims = []
    for depth in depths:
        if not select(records, label=between, num_layers=depth):
            continue
        vs_none = compare(records, {"label": between, "num_layers": depth}, {"label": "none", "num_layers": depth})
        vs_laurent = compare(records, {"label": between, "num_layers": depth},
                             {"label": "sequence_batch", "num_layers": depth})
        claims.append(Claim(
            key=f"between:{depth}", claim=f"BN of each layer's output between the layers (RNN -> BN -> RNN) "
                                          f"ends better than no norm ({depth} layers, final test accuracy)",
            source="the question's vertical placement; Laurent et al. 2016 (Sec. 3)", task=task,
            evidence="per seed: between-layer BN minus no norm", cmp=vs_none,
            other=("against Laurent's BN of W_ih x_t (sequence_batch)", vs_laurent)))
    return claims


def horizontal_claims(records: Sequence[Record]) -> List[Claim]:
    claims = []
    task = _task_name(records)
    for cell in sorted({r["config"]["cell"] for r in records}):
        cname = "tanh RNN" if cell == "rnn" else cell.upper()
        claims.append(Claim(
            key=f"shared_hurts:{cell}", claim=f"naive BN with statistics shared over time ends worse than no norm in "
                                              f"{'an' if cname == 'LSTM' else 'a'} {cname} (final test accuracy)",
            source="Laurent et al. 2016; Cooijmans et al. 2017", task=f"{task}, {cname}",
            evidence="per seed: no norm minus shared BN",
            cmp=compare(records, {"label": "none", "cell": cell}, {"label": "shared_batch", "cell": cell}),
            other=("mean valid accuracy over training", compare(records, {"label": "none", "cell": cell},
                                                                {"label": "shared_batch", "cell": cell}, auc))))
    return claims


# ---------------------------------------------------------------------------------------------- registries
#: Report sections by name (``SweepSpec.report["analyses"]``).
ANALYSES: Dict[str, Callable[[Any, Sequence[Record], Dict[str, Any]], List[Claim]]] = {
    "batch_size": drawbacks_section,
    "regularization": regularization_section,
    "padding": padding_section,
    "memory": memory_section,
    "language": language_section,
}

#: The claims of each preset, by preset name (the evidence page reads them).
CLAIMS: Dict[str, Callable[[Sequence[Record]], List[Claim]]] = {
    "default": default_claims,
    "cooijmans": cooijmans_claims,
    "laurent": laurent_claims,
    "horizontal": horizontal_claims,
    "drawbacks": drawbacks_claims,
    "regularization": regularization_claims,
    "padding": padding_claims,
    "memory": memory_claims,
    "language": language_claims,
}


def list_analyses() -> List[str]:
    return sorted(ANALYSES)


def run_analysis(name: str, doc: Any, records: Sequence[Record], hints: Dict[str, Any]) -> List[List[str]]:
    """Write analysis ``name``'s section into ``doc``; return its verdict rows
    (``[task, claim, evidence, effect, seeds, verdict]``). Unknown names raise ValueError."""
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r} in the sweep's report settings; expected one of "
                         f"{list_analyses()}")
    return [c.row() for c in ANALYSES[name](doc, list(records), hints)]


def claims_for(preset: str, records: Sequence[Record]) -> List[Claim]:
    """Every claim of ``preset`` derived from its records (empty for a preset without claims)."""
    fn = CLAIMS.get(preset)
    return fn(list(records)) if fn is not None and records else []
