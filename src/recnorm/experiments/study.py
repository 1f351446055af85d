"""What a study is: its sweep, its declared claims, its report section and the questions it answers.

A study file in :mod:`recnorm.experiments.studies` builds one :class:`Study`. Its claims are declared before
anything runs, one :class:`Design` per claim family (the part of a claim's key before the first ``:``): the
primary metric, the direction that favours the claim, the budget kind (``"steps"``: measured at a fixed
number of steps with one untuned learning rate; ``"convergence"``: to convergence) and the equivalence
margin. A claim derived from runs (:class:`Claim`) carries its family's design; only its primary metric
counts, a second metric is shown beside it, and a design with ``role="control"`` or ``role="second
look"`` (the same runs as another claim) is shown but never tallied.

This module also holds the record helpers the study files share (selecting runs, reading final metrics,
pairing seeds), so that no study imports another.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import recnorm.experiments.statistics as st
from recnorm.experiments.document import badge, fmt, pvalue, signed
from recnorm.experiments.results import area_under_curve, model_label
from recnorm.experiments.sweep import SweepSpec, flatten_config

__all__ = ["Study", "Design", "TuningGrid", "TuningScore", "steps_to_target", "MIN_RATES", "MIN_SPAN", "MIN_SEEDS", "Claim", "Question", "Record", "check_wording", "stopped_early", "grid", "smoke_variant", "adjust", "run_ids", "steps_of", "label", "name", "select", "final", "auc", "by_seed",
           "chance_level", "better_of", "compare", "paired", "task_name", "tasks", "labels", "verdict_table", "verdicts_section"]

Record = Dict[str, Any]
Section = Callable[[Any, Sequence[Record], Dict[str, Any]], List["Claim"]]


@dataclasses.dataclass(frozen=True)
class Design:
    """A claim family's design, declared in its study file before running.

    Attributes:
        metric: the primary metric, in words (what the paired differences are differences of).
        better: ``"higher"`` or ``"lower"``: which direction of the metric favours the claim.
        budget: ``"steps"`` (at the study's step budget, one untuned learning rate) or ``"convergence"``.
        margin: the equivalence margin (TOST), in the metric's units.
        floor: the smallest standard deviation the tests use (default: ``margin``).
        role: ``"primary"`` (counted), ``"control"`` or ``"second look"`` (shown, never counted).
        tuned: True when the claim is measured under the re-measured design: a learning rate chosen per arm on
            the validation split (:mod:`recnorm.experiments.tune`), fresh seeds for the final runs, and the
            declared budget. False (every claim measured before that design): the claim stays on the page with
            its old verdict, marked "at N steps, one untuned learning rate", and is not counted in the totals.
        patience: for a ``"convergence"`` budget, the early-stopping patience in evaluations (None: not
            declared yet); for a ``"steps"`` budget, the patience of runs that stop early, whose speed the claim
            reads off their validation curves (steps to a target, within their maximum budget).
        min_seeds: the number of paired seeds the claim declares before its test is judged. With fewer (a
            sweep still running), the claim reads "not enough data", whatever its p, and it is left out of
            the page's Benjamini-Hochberg family: a verdict read off a partial sweep would be peeking.
    """

    metric: str
    better: str
    budget: str = "steps"
    margin: float = 0.01
    floor: Optional[float] = None
    role: str = "primary"
    tuned: bool = False
    patience: Optional[int] = None
    min_seeds: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.min_seeds, int) or self.min_seeds < 2:
            raise ValueError(f"Design.min_seeds: expected an int >= 2, got {self.min_seeds!r}")
        if self.better not in ("higher", "lower"):
            raise ValueError(f"Design.better: expected 'higher' or 'lower', got {self.better!r}")
        if self.budget not in ("steps", "convergence"):
            raise ValueError(f"Design.budget: expected 'steps' or 'convergence', got {self.budget!r}")
        if self.role not in ("primary", "control", "second look"):
            raise ValueError(f"Design.role: expected 'primary', 'control' or 'second look', got {self.role!r}")


@dataclasses.dataclass
class Claim:
    """One claim tested on runs: a paired test over seeds of its family's primary metric.

    Attributes:
        key: ``family:detail``, stable within its study (questions match keys).
        claim, source, task, evidence: the claim in words, where it comes from, where and how it was tested.
        test: the paired test of the primary metric (positive favours the claim).
        design: the family's declared design.
        other: the same comparison on a second metric (``(name, test)``), shown and not counted.
        steps: the step budget of the runs behind it.
        runs: the run IDs behind it.
        p_adjusted: the Benjamini-Hochberg adjusted p-value, set by the page that counts it.
    """

    key: str
    claim: str
    source: str
    task: str
    evidence: str
    test: st.PairedTest
    design: Design
    other: Optional[Tuple[str, st.PairedTest]] = None
    steps: Optional[int] = None
    runs: Tuple[str, ...] = ()
    p_adjusted: Optional[float] = None

    def __post_init__(self) -> None:
        check_wording(self.claim, self.design)

    @property
    def primary(self) -> bool:
        return self.design.role == "primary"

    @property
    def remeasured(self) -> bool:
        """Measured under the re-measured design (learning rate tuned per arm, declared budget)."""
        return self.design.tuned

    @property
    def counted(self) -> bool:
        """Counted in the page's totals: a primary claim, re-measured."""
        return self.primary and self.remeasured

    @property
    def enough(self) -> bool:
        """The test has the seeds its design declares (``Design.min_seeds``)."""
        return self.test.n >= self.design.min_seeds

    @property
    def result(self) -> str:
        """One of :data:`recnorm.experiments.statistics.VERDICTS` (a primary claim is judged on its
        BH-adjusted p, adjusted within its family: re-measured claims together, older ones together);
        "insufficient" below the design's declared number of seeds."""
        if not self.enough:
            return "insufficient"
        p = self.p_adjusted if self.primary else None
        return st.verdict(self.test, p)

    def budget(self) -> str:
        if self.design.budget == "convergence":
            patience = f", patience {self.design.patience}" if self.design.patience else ""
            return f"to convergence (early stopping on validation{patience}, at most {self.steps} steps)"
        if self.design.patience and self.remeasured:  # a speed claim read off runs that stop early
            most = f"at most {self.steps} steps" if self.steps else "a maximum budget"
            return (f"a speed claim, within {most} (the runs stop early on validation, patience "
                    f"{self.design.patience}), learning rate tuned per arm")
        steps = f"at {self.steps} steps" if self.steps else "at N steps"
        return f"{steps}, learning rate tuned per arm" if self.remeasured else f"{steps}, one untuned learning rate"

    def verdict(self) -> str:
        """The verdict with its colour-coded word (Markdown), and why it is not counted when it is not."""
        text = badge(self.result)
        if not self.primary:
            return f"{text} ({self.design.role}, not counted)"
        if not self.remeasured:
            return f"{text} (not re-measured: {self.budget()}; not counted)"
        return text

    def effect(self) -> str:
        return interval_text(self.test)

    def seeds(self) -> str:
        short = "" if self.enough else f" (declared: {self.design.min_seeds})"
        return f"{self.test.wins} of {self.test.n}{short}"

    def p_text(self) -> str:
        t = self.test
        if t.p is None:
            return "–"
        if not self.enough:
            return (f"{pvalue(t.p)} (not judged: {t.n} of the {self.design.min_seeds} seeds declared; sign-flip "
                    f"{pvalue(t.p_sign_flip)})")
        adj = pvalue(self.p_adjusted) if self.p_adjusted is not None else "not counted"
        return f"{pvalue(t.p)} (BH {adj}; sign-flip {pvalue(t.p_sign_flip)})"

    def power(self) -> str:
        t = self.test
        return "–" if t.detectable is None else f"±{fmt(t.detectable)} (margin {self.design.margin:g})"

    def other_text(self) -> str:
        if self.other is None:
            return "–"
        metric, t = self.other
        return f"{metric}: {st.verdict(t)}, {interval_text(t)}, {t.wins} of {t.n} seeds"

    def row(self) -> List[str]:
        """``[task, claim, evidence, effect, seeds, verdict]``: the report's verdict-row layout."""
        evidence = f"{self.evidence}; {self.design.metric}, {self.budget()}"
        if self.other is not None:
            evidence += f". Second metric, {self.other_text()}"
        return [self.task, self.claim, evidence, self.effect(), self.seeds(), self.verdict()]


#: Words that say where training ends up; a claim measured at a fixed step budget may not use them.
CONVERGENCE_WORDS = re.compile(r"\bends? (up )?(better|worse)\b|generali[sz]|\blowers? (the )?(bpc|bits per character)\b"
                               r"|\bconverges? to\b", re.IGNORECASE)


def check_wording(claim: str, design: Design) -> None:
    """Refuse end-state wording ("ends better", "generalizes", "lowers bpc") on a claim whose design
    measures it at a fixed step budget: such a claim is a speed claim and says so, or it is measured to
    convergence (``Design(budget="convergence")``)."""
    match = CONVERGENCE_WORDS.search(claim)
    if design.budget == "steps" and match:
        raise ValueError(f"claim {claim!r} says {match.group(0)!r} but its budget is 'steps'; expected a claim "
                         f"worded for a fixed step budget (for example 'at the end of the step budget') or "
                         f"Design(budget='convergence')")


def stopped_early(records: Sequence[Record]) -> Tuple[int, int]:
    """``(stopped, with_patience)``: how many of the runs with early stopping stopped before their maximum
    budget (a convergence budget needs most of them to: the maximum was large enough). A run that diverged
    ended for another reason and is left out of both counts."""
    runs = [((r.get("extras") or {}).get("early_stopping") or {}) for r in records if r.get("status", "ok") == "ok"]
    runs = [e for e in runs if e]
    return sum(bool(e.get("stopped_early")) for e in runs), len(runs)


def interval_text(test: st.PairedTest) -> str:
    if test.mean is None:
        return "–"
    return f"{signed(test.mean)} [{signed(test.low)}, {signed(test.high)}]"


@dataclasses.dataclass(frozen=True)
class Question:
    """A question of the evidence page, answered by this study's claims whose keys match ``keys``
    (``fnmatch`` patterns, so rows added to a study later appear)."""

    topic: str
    keys: Tuple[str, ...]


@dataclasses.dataclass
class Study:
    """One study: a sweep, its declared claims, its report section and the questions it answers.

    Attributes:
        name: registry key (also the sweep's name and its folder under ``results/``).
        sweep: ``sweep(smoke=False) -> SweepSpec``; its docstring gives the command and the running time.
        designs: the declared design of each claim family.
        claims: ``claims(records) -> [Claim]`` (None: a study without claims, such as a paper-scale one).
        section: ``section(doc, records, hints) -> [Claim]``, the study's own report section (or None).
        questions: the questions of the evidence page this study answers.
        docs_dir: its folder under ``docs/`` (its report; before ``results/`` existed, its runs too).
        tuning: the declared learning-rate grid and tuning seeds (:class:`TuningGrid`; run by
            :mod:`recnorm.experiments.tune`);
            None: the study runs at the learning rate of its sweep (not tuned).
        final_seeds: the fresh seeds of the final runs at the tuned rates (none shared with ``tuning``); empty:
            the seeds the sweep gives each run (checked fresh when the final sweep is built).
        tune_at: fields the sweep varies that tuning holds at one value (the init study tunes each norm at
            the default init); the final runs use that rate for every value of these fields.
        tuning_score: what tuning compares across rates (:class:`TuningScore`); None: the mean final
            validation metric. A study whose claim is a speed claim scores its rates by speed, so that each arm
            runs at the rate the claim is about.
    """

    name: str
    sweep: Callable[..., SweepSpec]
    designs: Dict[str, Design] = dataclasses.field(default_factory=dict)
    claims: Optional[Callable[[Sequence[Record]], List[Claim]]] = None
    section: Optional[Section] = None
    questions: Tuple[Question, ...] = ()
    docs_dir: Optional[str] = None
    tuning: Optional["TuningGrid"] = None
    final_seeds: Tuple[int, ...] = ()
    tune_at: Dict[str, Any] = dataclasses.field(default_factory=dict)
    tuning_score: Optional["TuningScore"] = None

    def __post_init__(self) -> None:
        if self.tuning is not None and set(self.final_seeds) & set(self.tuning.seeds):
            raise ValueError(f"study {self.name!r}: final_seeds must be fresh; expected none of the tuning seeds "
                             f"{list(self.tuning.seeds)}, got {list(self.final_seeds)}")

    @property
    def doc(self) -> str:
        """The sweep's docstring: what it runs, its command and its measured running time."""
        return self.sweep.__doc__ or ""

    def spec(self, smoke: bool = False) -> SweepSpec:
        return self.sweep(smoke=smoke)

    def derive(self, records: Sequence[Record]) -> List[Claim]:
        """Every claim of the study from its records; each claim's family must be declared."""
        if self.claims is None or not records:
            return []
        out = self.claims(list(records))
        for c in out:
            if c.key.split(":")[0] not in self.designs:
                raise ValueError(f"study {self.name!r}: claim {c.key!r} has no declared design; expected one of "
                                 f"{sorted(self.designs)}")
        return out


# ---------------------------------------------------------------------------------------------- tuning grid
MIN_RATES, MIN_SPAN, MIN_SEEDS = 4, 30.0, 2


@dataclasses.dataclass(frozen=True)
class TuningGrid:
    """The declared tuning grid: learning rates (log-spaced, at least :data:`MIN_RATES` of them spanning at
    least :data:`MIN_SPAN` x) and tuning seeds (at least :data:`MIN_SEEDS`)."""

    lrs: Tuple[float, ...]
    seeds: Tuple[int, ...] = (100, 101)

    def __post_init__(self) -> None:
        lrs = tuple(float(x) for x in self.lrs)
        object.__setattr__(self, "lrs", lrs)
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if len(lrs) < MIN_RATES or any(x <= 0 for x in lrs) or list(lrs) != sorted(set(lrs)):
            raise ValueError(f"TuningGrid.lrs: expected >= {MIN_RATES} increasing positive rates, got {lrs}")
        if lrs[-1] / lrs[0] < MIN_SPAN * (1 - 1e-9):
            raise ValueError(f"TuningGrid.lrs: expected a span of >= {MIN_SPAN:g}x, got {lrs[-1] / lrs[0]:.3g}x")
        steps = [math.log(b / a) for a, b in zip(lrs, lrs[1:])]
        if max(steps) - min(steps) > 0.01 * max(steps):  # 1%: room for rounded rates
            raise ValueError(f"TuningGrid.lrs: expected log-spaced rates (a constant ratio), got {lrs}")
        if len(set(self.seeds)) < MIN_SEEDS:
            raise ValueError(f"TuningGrid.seeds: expected >= {MIN_SEEDS} distinct seeds, got {self.seeds}")

    @classmethod
    def log_spaced(cls, low: float, high: float, n: int, seeds: Sequence[int] = (100, 101)) -> "TuningGrid":
        """``n`` rates from ``low`` to ``high``, evenly spaced in log scale (rounded to 4 significant digits)."""
        ratio = (high / low) ** (1.0 / (n - 1)) if n > 1 else 1.0
        inner = [float(f"{low * ratio ** i:.4g}") for i in range(1, n - 1)]
        return cls(tuple([float(low)] + inner + [float(high)]), tuple(seeds))

    def to_dict(self) -> Dict[str, Any]:
        return {"lrs": list(self.lrs), "seeds": list(self.seeds)}


@dataclasses.dataclass(frozen=True)
class TuningScore:
    """What tuning compares across the rates of an arm, when it is not the final validation metric.

    Attributes:
        name: the score in words (shown with the tuning curves).
        value: ``value(record) -> float or None``, read from the validation split only (None: the worst score);
            it is only asked about runs that finished (a diverged or failed run scores the worst).
        better: ``"higher"`` or ``"lower"``.
    """

    name: str
    value: Callable[[Record], Optional[float]]
    better: str = "higher"

    def __post_init__(self) -> None:
        if self.better not in ("higher", "lower"):
            raise ValueError(f"TuningScore.better: expected 'higher' or 'lower', got {self.better!r}")


def steps_to_target(r: Record, target: float, split: str = "valid") -> Optional[float]:
    """The number of training steps a run took to reach ``target`` on its ``split`` curve (the validation
    metric logged every ``eval_every`` steps), interpolated linearly between the two evaluations that bracket
    the first crossing (so the evaluation interval does not round every run to the same steps).

    A run that never reaches the target, because it stopped early, ran out of steps or diverged, is censored
    at its maximum budget (``steps_planned``): it counts as needing at least that many. None only when the
    run logged no curve."""
    curve = r.get(split) or {}
    steps, values = curve.get("step") or [], curve.get(r["metric"]) or []
    higher = bool(r["higher_is_better"])
    if not steps:
        return None
    reached = (lambda v: v >= target) if higher else (lambda v: v <= target)  # noqa: E731
    prev: Optional[Tuple[float, float]] = None
    for s, v in zip(steps, values):
        if v is None or not math.isfinite(v):
            prev = None
            continue
        if reached(v):
            if prev is None or prev[1] == v:
                return float(s)
            s0, v0 = prev
            return round(s0 + (target - v0) / (v - v0) * (s - s0), 6)  # no float noise in tables
        prev = (s, v)
    return float(r.get("steps_planned") or steps[-1])


# ---------------------------------------------------------------------------------------------- record access
def label(r: Record) -> str:
    return model_label(r["config"])


def name(lab: str) -> str:
    """A model label in words, from the norm's registered label: ``"batch γ=0.1"`` -> ``"per-step BN (γ0 =
    0.1)"``; ``"none+between=batch"`` -> ``"no norm, BN between layers"``."""
    from recnorm.nn.norms import NORMS

    lab, _, between = lab.partition("+between=")
    head, _, rest = lab.partition(" ")
    words = "no norm" if head == "none" else (NORMS.get(head).label or head) if head in NORMS else head
    if rest.startswith("γ="):
        words = f"{words} (γ0 = {rest[2:]})"
    elif rest:  # variants of the norm ("layer joint carried c"): say which
        parts = [w for key, w in (("joint", "joint gate norm"), ("carried c", "carried normalized cell")) if key in rest]
        words = f"{words} ({', '.join(parts) or rest})"
    return f"{words}, BN between layers" if between else words


def select(records: Sequence[Record], **where: Any) -> List[Record]:
    """Records whose flattened config matches every ``where`` item (``label`` matches the model label;
    dotted names such as ``task_options__length`` use ``__`` for the dot)."""
    out = []
    for r in records:
        flat = flatten_config(r["config"])
        if all((label(r) if key == "label" else flat.get(key.replace("__", "."))) == want
               for key, want in where.items()):
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


def better_of(records: Sequence[Record]) -> str:
    return "higher" if records and records[0]["higher_is_better"] else "lower"


def paired(a: Dict[int, Optional[float]], b: Dict[int, Optional[float]], better: str, design: Design,
           worst: Optional[float] = None, margin: Optional[float] = None) -> st.PairedTest:
    """The paired test of per-seed ``a`` against ``b`` (positive favours ``a``) with ``design``'s margin
    and floor (``margin`` overrides both, for a second metric in other units)."""
    diffs = st.paired_differences(a, b, better, worst=worst)
    if margin is not None:
        return st.paired_test(diffs, margin=margin)
    return st.paired_test(diffs, margin=design.margin, floor=design.floor)


def compare(records: Sequence[Record], a: Dict[str, Any], b: Dict[str, Any], design: Design,
            value: Callable[[Record], Optional[float]] = final, better: Optional[str] = None,
            margin: Optional[float] = None) -> st.PairedTest:
    """Paired test of the runs selected by ``a`` against those selected by ``b`` on ``value``; failed
    runs count as chance level."""
    ra, rb = select(records, **a), select(records, **b)
    return paired(by_seed(ra, value), by_seed(rb, value), better or better_of(ra or rb), design,
                  worst=chance_level(records), margin=margin)


def run_ids(*groups: Sequence[Record]) -> Tuple[str, ...]:
    return tuple(r["run_id"] for g in groups for r in g)


def steps_of(records: Sequence[Record]) -> Optional[int]:
    steps = {r.get("steps_planned") for r in records}
    return steps.pop() if len(steps) == 1 else None


def task_name(records: Sequence[Record]) -> str:
    return records[0]["task"]["name"] if records else "–"


def tasks(records: Sequence[Record]) -> List[str]:
    out: List[str] = []
    for r in records:
        if r["config"]["task"] not in out:
            out.append(r["config"]["task"])
    return out


def labels(records: Sequence[Record]) -> List[str]:
    order = {"none": 0, "layer": 1, "batch": 2, "sequence_batch": 3, "shared_batch": 4}
    return sorted({label(r) for r in records}, key=lambda s: (order.get(s.split()[0].split("+")[0], 9), s))


def verdict_table(doc: Any, claims: Sequence[Claim]) -> None:
    """The verdicts of a report section, Benjamini-Hochberg adjusted across the section's counted claims."""
    adjust(claims)
    doc.table(["claim", "evidence", "effect [95% interval] (positive favours the claim)", "seeds where it holds",
               "p (BH-adjusted; sign-flip)", "verdict"],
              [[f"{c.claim} [{c.task}]", c.row()[2], c.effect(), c.seeds(), c.p_text(), c.verdict()] for c in claims])


def verdicts_section(doc: Any, claims: List[Claim]) -> List[Claim]:
    """A study section's closing "Verdicts" heading and table; returns ``claims`` (what a section returns)."""
    doc.h(3, "Verdicts")
    verdict_table(doc, claims)
    return claims


def adjust(claims: Sequence[Claim]) -> None:
    """Benjamini-Hochberg across the primary claims of one page (sets each one's ``p_adjusted``), in two
    families: the re-measured claims (the ones counted) together, and the claims not yet re-measured
    together (so their old verdicts stay as they were, shown and not counted). A claim below its declared
    number of seeds is not judged, so it is not among the tests either."""
    for remeasured in (True, False):
        family = [c for c in claims if c.primary and c.remeasured == remeasured and c.test.p_primary is not None
                  and c.enough]
        for c, p in zip(family, st.benjamini_hochberg([c.test.p_primary for c in family])):
            c.p_adjusted = p


# ---------------------------------------------------------------------------------------------- sweeps
def grid(variants: List[Dict], **axes: Any) -> List[Dict]:
    """One grid per model variant, each crossed with the same ``axes`` (lists of values)."""
    return [{**{k: [v] for k, v in variant.items()}, **axes} for variant in variants]


def smoke_variant(spec: SweepSpec, task_options: Dict) -> SweepSpec:
    """The smoke variant of a sweep: one step, tiny splits, one seed, evaluation capped at one batch."""
    base = spec.base.replace(steps=1, eval_every=1, diag_every=1, eval_batches=1, popstat_batches=1,
                             eval_batch_size=32, batch_size=16)
    base = base.replace(task_options={**base.task_options, **task_options})
    grids = []
    for g in spec.grids:
        g = dict(g)
        g["seed"] = [0]
        for key in ("init_gain", "num_layers"):
            if key in g and isinstance(g[key], list) and len(g[key]) > 2:
                g[key] = [g[key][0], g[key][-1]]
        grids.append(g)
    return SweepSpec(name=spec.name + "-smoke", base=base, grids=grids, description="[smoke] " + spec.description,
                     imports=list(spec.imports), report=dict(spec.report))


SEEDS5 = [0, 1, 2, 3, 4]
FASHION_SMOKE = {"train_size": 32, "valid_size": 16, "test_size": 16}
GENERATED_SMOKE = {"valid_size": 16, "test_size": 16}
