"""The page with the answer: ``docs/evidence.md``, generated from the studies' finished runs.

:func:`write_evidence` reads each study's records (``results/<study>/runs.jsonl``; before that file exists,
the study's sweep directory ``docs/<study>/``), derives the study's declared claims
(:mod:`recnorm.experiments.studies`), keeps those its questions ask about, adjusts the p-values of every
counted claim on the page together (Benjamini-Hochberg, q = 0.05) and writes one row per claim, grouped
by study: the claim with its task, its source, its primary metric and budget, the verdict, the effect with
its 95% interval, the seeds that agree, the p-values, the smallest effect it could detect, and the same
comparison on a second metric. A question whose study has no runs says so instead of disappearing.

Command: ``recnorm evidence`` (``--results DIR``, ``--docs DIR``, ``--out FILE``; defaults ``results``,
``docs`` and ``docs/evidence.md``).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from recnorm.experiments.document import VERDICT_WORDS, badge
from recnorm.experiments.results import is_sweep_dir, load_records, model_label
from recnorm.experiments.studies import STUDIES, list_studies
from recnorm.experiments.study import Claim, Question, Study, adjust, stopped_early

__all__ = ["build_evidence", "write_evidence", "study_records", "RUNS_FILE"]

logger = logging.getLogger(__name__)

RUNS_FILE = "runs.jsonl"  # results/<study>/runs.jsonl: one finished run per line
_COUNTED = ("supported", "opposite", "equivalent", "inconclusive")


def study_records(study: Study, results: str = "results", docs: str = "docs") -> Tuple[List[dict], str]:
    """``(records, source)``: the study's finished runs from ``results/<study>/runs.jsonl``, or, when that
    file does not exist, from its sweep directory under ``docs``; no records when neither exists."""
    path = os.path.join(results, study.name, RUNS_FILE)
    if os.path.isfile(path):
        return load_records(path), path
    sweep_dir = os.path.join(docs, study.docs_dir or study.name)
    if is_sweep_dir(sweep_dir):
        return load_records(sweep_dir), sweep_dir
    logger.warning("evidence: no runs for study %s (neither %s nor %s)", study.name, path, sweep_dir)
    return [], path


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


OTHER_SETTINGS = "other settings of the {study} study (no question of the page names them)"


def _answers(studies: Sequence[Study], results: str, docs: str, notes: Optional[Dict[Tuple[str, str], Any]] = None
             ) -> Tuple[List[Tuple[Study, Question, List[Claim], int]], int]:
    """Per question: the claims that answer it (each claim once on the page) and its study's run count;
    ``notes[(study, "stopped")]`` and ``notes[(study, "uncovered")]`` get the fraction of its runs that stopped
    early and the settings behind no claim.
    Claims that no question names are not dropped: they follow under :data:`OTHER_SETTINGS`, so every
    setting a study runs is on the page, including those where the opposite holds."""
    out, total = [], 0
    for study in studies:
        records, _ = study_records(study, results, docs)
        total += len(records)
        claims = study.derive(records)
        if notes is not None:
            notes[(study.name, "stopped")] = stopped_early(records)
            notes[(study.name, "uncovered")] = _uncovered(records, claims)
            notes[(study.name, "commits")] = commits_of(records)
            notes[(study.name, "rates")] = {r["run_id"]: (model_label(r["config"]), r["config"]["lr"]) for r in records}
        shown: set = set()
        for q in study.questions:
            matched = [c for c in claims if c.key not in shown and any(fnmatch.fnmatchcase(c.key, k) for k in q.keys)]
            shown.update(c.key for c in matched)
            out.append((study, q, matched, len(records)))
        rest = [c for c in claims if c.key not in shown]
        if rest:
            out.append((study, Question(OTHER_SETTINGS.format(study=study.name), ("*",)), rest, len(records)))
    return out, total


def commits_of(records: Sequence[dict]) -> Dict[str, int]:
    """How many runs each code version made: ``"<commit[:10]>"`` (``" (dirty tree)"`` appended when the
    tree had uncommitted changes), or ``"before runs recorded their commit (arrived in <commit[:10]>)"`` for a run migrated
    from the time before runs recorded their commit."""
    counts: Dict[str, int] = {}
    for r in records:
        p = r.get("provenance") or {}
        if p.get("commit"):
            key = str(p["commit"])[:10] + (" (dirty tree)" if p.get("dirty") else "")
        elif p.get("committed_in"):
            key = f"before runs recorded their commit (arrived in {str(p['committed_in'])[:10]})"
        else:
            key = "unknown"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _provenance_line(study: Study, results: str, counts: Dict[str, int]) -> List[str]:
    """Which commits made the study's runs (and its tuning runs), so a reader can tell when a study mixes
    code versions."""
    if not counts:
        return []
    def listed(c: Dict[str, int]) -> str:
        return "; ".join((f"`{k}`" if not k.startswith(("before", "unknown")) else k) + f": {n} runs"
                         for k, n in sorted(c.items(), key=lambda kv: -kv[1]))

    out = f"Code (commit: runs made with it): {listed(counts)}"
    tune = os.path.join(results, study.name + "-tune", RUNS_FILE)
    if os.path.isfile(tune):
        out += f"; tuning runs: {listed(commits_of(load_records(tune)))}"
    return [out + " (each run's commit, versions, CPU and kernels are in its line of `runs.jsonl`).", ""]


def _uncovered(records: Sequence[dict], claims: Sequence[Claim]) -> List[Tuple[str, str, int]]:
    """``(model, task, runs)`` for the settings whose runs are behind no claim of the study."""
    used = {r for c in claims for r in c.runs}
    counts: Dict[Tuple[str, str], int] = {}
    for r in records:
        if r["run_id"] not in used:
            key = (model_label(r["config"]), r["config"]["task"])
            counts[key] = counts.get(key, 0) + 1
    return [(m, t, n) for (m, t), n in counts.items()]


def _uncovered_line(study: Study, settings: Sequence[Tuple[str, str, int]]) -> List[str]:
    if not settings:
        return []
    listed = "; ".join(f"{m} on {t} ({n} runs)" for m, t, n in settings)
    return [f"Runs behind no comparison of this study (shown so that no setting is hidden; in "
            f"`results/{study.name}/{RUNS_FILE}`): {listed}.", ""]


def short_id(run_id: str) -> str:
    """A run ID's last part (the hash of its config), enough to find the run in its ``runs.jsonl``."""
    return run_id.rsplit("-", 1)[-1]


def _runs_cell(study: Study, c: Claim) -> str:
    """The claim's run IDs: a link to the study's ``runs.jsonl`` and the short ID of each run behind it."""
    if not c.runs:
        return "–"
    ids = " ".join(f"`{short_id(r)}`" for r in c.runs)
    return f"[{len(c.runs)} runs](../results/{study.name}/{RUNS_FILE}): {ids}"


def _rates_cell(c: Claim, rates: Dict[str, Tuple[str, float]]) -> str:
    """The learning rate of each arm behind the claim (``label lr``; chosen per arm where the study was tuned)."""
    by_arm: Dict[str, set] = {}
    for run_id in c.runs:
        if run_id in rates:
            lab, lr = rates[run_id]
            by_arm.setdefault(lab, set()).add(lr)
    if not by_arm:
        return "–"
    return "; ".join(f"{lab} {', '.join(f'{x:g}' for x in sorted(lrs))}" for lab, lrs in sorted(by_arm.items()))


def _row(study: Study, q: Question, c: Claim, rates: Dict[str, Tuple[str, float]]) -> List[str]:
    link = f"[{study.name}]({study.docs_dir or study.name}/report.md)"
    return [_cell(q.topic), _cell(f"{c.claim} [{c.task}]"), _cell(c.source), link,
            _cell(f"{c.design.metric}; {c.budget()}"), _cell(_rates_cell(c, rates)), _cell(c.verdict()), _cell(c.effect()), c.seeds(),
            _cell(c.p_text()), _cell(c.power()), _cell(c.other_text()), _runs_cell(study, c)]


def _tally(answers: Sequence[Tuple[Study, Question, List[Claim], int]]) -> Dict[str, Dict[str, int]]:
    by_topic: Dict[str, Dict[str, int]] = {}
    for _study, q, claims, _n in answers:
        topic = by_topic.setdefault(q.topic, {})
        if not claims:
            topic["not tested"] = topic.get("not tested", 0) + 1
        for c in claims:
            if c.counted:
                topic[c.result] = topic.get(c.result, 0) + 1
            elif c.primary:  # not re-measured yet: its old verdict, tallied apart
                topic["old " + c.result] = topic.get("old " + c.result, 0) + 1
                topic["not re-measured"] = topic.get("not re-measured", 0) + 1
            else:
                topic["not counted"] = topic.get("not counted", 0) + 1
    return by_topic


_HOW_TO_READ = (
    "**How to read it.** Every claim compares two arms trained with the same seeds, so its evidence is the "
    "per-seed paired difference of its primary metric, declared in its study file before running and signed "
    "so that a positive effect favours the claim. The 95% interval is a t interval whose standard deviation "
    "never falls below a floor (the claim's margin unless it declares another), so identical differences "
    "never give a zero-width interval. p is the two-sided t-test p-value on the same floored spread; the "
    "p-values of the primary claims on this page are adjusted together (Benjamini-Hochberg, q = 0.05) in two "
    "families: the re-measured claims (the ones counted) together, and the claims not yet re-measured together, "
    "over every setting the studies ran (the old page adjusted only the rows it showed). Each row shows its adjusted p beside the exact sign-flip permutation p (which cannot go below 2/2^n with "
    "n seeds). Verdicts: " + ", ".join(f"{badge(v)}" for v in _COUNTED) + ". *Supported* / *the opposite "
    "holds*: the adjusted p is below 0.05 and the effect points that way. *Equivalent*: otherwise, the two "
    "one-sided tests (TOST) place the effect within the claim's margin. *Inconclusive*: neither. *Not enough "
    "data*: fewer paired seeds than the claim's study declared before running (at least 2; the rebuilt init "
    "study's grid claims declare 5, its contrasts and the shared-BN claims 10); such a row shows its interval "
    "and p, is not judged, and is not among the adjusted tests. Power: the "
    "smallest effect the test would detect four times in five at its n and spread. Controls and second looks "
    "at the same runs are shown and not counted. Runs that diverged count as chance level.")


def _summary(by_topic: Dict[str, Dict[str, int]]) -> List[str]:
    keys = _COUNTED + ("not re-measured", "not counted", "not tested") + tuple("old " + k for k in _COUNTED)
    totals = {k: sum(t.get(k, 0) for t in by_topic.values()) for k in keys}
    out = ["Totals over the re-measured claims (learning rate tuned per arm, declared budget): "
           + ", ".join(f"{VERDICT_WORDS[k][1]}: {totals[k]}" for k in _COUNTED)
           + f". Not re-measured yet (at N steps, one untuned learning rate; shown with their old verdicts and not "
           f"counted): {totals['not re-measured']} (old verdicts: "
           + ", ".join(f"{VERDICT_WORDS[k][1]} {totals['old ' + k]}" for k in _COUNTED)
           + f"); controls and second looks, shown and not counted: {totals['not counted']}; questions not tested: "
           f"{totals['not tested']}.", "",
           "| question | counted | " + " | ".join(VERDICT_WORDS[k][1] for k in _COUNTED)
           + " | not re-measured (old verdicts ✔/✘/=/?) | not counted |",
           "|---|---|---|---|---|---|---|---|"]
    for topic, c in by_topic.items():
        if c.get("not tested") and len(c) == 1:
            out.append(f"| {_cell(topic)} | not tested | – | – | – | – | – | – |")
            continue
        counted = sum(c.get(k, 0) for k in _COUNTED)
        untested = f" ({c['not tested']} study not run)" if c.get("not tested") else ""
        old = "/".join(str(c.get("old " + k, 0)) for k in _COUNTED)
        out.append(f"| {_cell(topic)}{untested} | {counted} | " + " | ".join(str(c.get(k, 0)) for k in _COUNTED)
                   + f" | {c.get('not re-measured', 0)} ({old}) | {c.get('not counted', 0)} |")
    return out


def _budget_line(counts: Tuple[int, int]) -> List[str]:
    """How many of the study's runs with early stopping stopped before their maximum budget."""
    k, n = counts
    if n < 0:
        return []
    if not n:
        return ["Budget: a fixed number of steps for every run (no early stopping).", ""]
    warn = "" if k >= 0.9 * n else " (below 90%: the maximum budget is too small for a claim to convergence)"
    return [f"Budget: early stopping on validation; {k} of {n} runs ({100 * k / n:.0f}%) stopped before their "
            f"maximum budget{warn} (runs that diverged are not counted).", ""]


def _tuning_lines(study: Study, results: str) -> List[str]:
    """The learning rate each arm chose and its tuning curve, when the study was tuned; else one line
    saying the study ran at one untuned learning rate."""
    from recnorm.experiments.tune import CHOICES_FILE, read_choices, tuning_table

    path = os.path.join(results, study.name + "-tune", CHOICES_FILE)
    if not os.path.isfile(path) and study.tuning is not None:
        return [f"Learning rate: tuned per arm on the declared grid ({', '.join(f'{x:g}' for x in study.tuning.lrs)}; "
                f"tuning seeds {', '.join(str(s) for s in study.tuning.seeds)}); the tuning has not run yet.", ""]
    if not os.path.isfile(path):
        return ["Learning rate: one untuned rate for every arm (the study's sweep).", ""]
    choices, grid = read_choices(path)
    scored = sorted({c.scored_by for c in choices.values() if c.scored_by})
    what = "; ".join(scored) if scored else "mean final validation metric"
    return ([f"Learning rates chosen per arm on the validation split (grid {', '.join(f'{x:g}' for x in grid.lrs)}; "
             f"tuning seeds {', '.join(str(s) for s in grid.seeds)}; {what} per rate, the "
             f"chosen one in bold; `{path}`):", ""] + tuning_table(choices, grid) + [""])


def _study_tables(answers: Sequence[Tuple[Study, Question, List[Claim], int]], results: str = "results",
                  notes: Optional[Dict[Tuple[str, str], Any]] = None) -> List[str]:
    out: List[str] = []
    header = ("| question | claim [task] | source | study | primary metric; budget | learning rate per arm | verdict "
              "| effect [95% interval] "
              "| seeds that agree | p (BH-adjusted; sign-flip) | power: detects | second metric (not counted) | runs |")
    current = None
    for study, q, claims, n_runs in answers:
        if study is not current:
            current = study
            out += (["", f"## {study.name}", ""] + _tuning_lines(study, results)
                    + _budget_line((notes or {}).get((study.name, "stopped"), (0, 0)) if n_runs else (0, -1))
                    + _provenance_line(study, results, (notes or {}).get((study.name, "commits"), {}))
                    + _uncovered_line(study, (notes or {}).get((study.name, "uncovered"), []))
                    + [header, "|" + "---|" * 13])
        if not claims:
            why = "no runs" if not n_runs else "no matching comparison in these runs"
            out.append(f"| {_cell(q.topic)} | – | – | {study.name} | – | – | {badge('not tested', why)} | – | – | – | – | – | – |")
        rates = (notes or {}).get((study.name, "rates"), {})
        out.extend("| " + " | ".join(_row(study, q, c, rates)) + " |" for c in claims)
    return out


def build_evidence(results: str = "results", docs: str = "docs", studies: Optional[Sequence[Union[str, Study]]] = None
                   ) -> str:
    """The Markdown of the evidence page for the studies named (default: every registered study with
    questions), reading their runs under ``results`` (or ``docs``)."""
    chosen = [STUDIES.resolve(n) for n in (studies if studies is not None else list_studies())]
    chosen = [s for s in chosen if s.questions]
    notes: Dict[Tuple[str, str], Any] = {}
    answers, runs = _answers(chosen, results, docs, notes)
    adjust([c for _s, _q, claims, _n in answers for c in claims])
    out = [
        "# Does normalization do for an RNN what it does for a CNN? The evidence",
        "",
        f"Generated by `recnorm evidence` from the studies' finished runs ({runs} runs of {len(chosen)} studies; "
        f"`{results}/<study>/{RUNS_FILE}`, or the study's sweep directory under `{docs}/` where that file does not "
        "exist yet); do not edit by hand. Each study's report, linked in its rows, shows the curves and tables "
        "behind them, and its docstring (`recnorm studies`) the command that produced it; each row lists the runs "
        f"behind it (the last part of each run ID, in `{results}/<study>/{RUNS_FILE}`). Every study runs on this "
        "page as a whole: settings that no question names follow under \"other settings\", so none is filtered "
        "out by hand. Only claims re-measured under the new design (a learning rate tuned per arm on the "
        "validation split, fresh seeds, a declared budget: to convergence with early stopping, or at N steps for "
        "a speed claim) count in the totals; a claim not yet re-measured stays visible with its old verdict, "
        "marked \"at N steps, one untuned learning rate\", and is not counted.",
        "",
        _HOW_TO_READ,
        "",
    ]
    out += _summary(_tally(answers))
    out += ["", "# Every comparison, by study"] + _study_tables(answers, results, notes) + [""]
    return "\n".join(out)


def write_evidence(results: str = "results", docs: str = "docs", out: Optional[str] = None) -> str:
    """Write the evidence page (default ``docs/evidence.md``) atomically; return its path."""
    out = out or os.path.join(docs, "evidence.md")
    if not os.path.isdir(docs):
        raise FileNotFoundError(f"no docs directory at {docs!r}")
    text = build_evidence(results, docs)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
    logger.info("evidence page written to %s", out)
    return out

