"""The page with the answer: ``docs/evidence.md``, generated from the committed run directories.

:func:`write_evidence` reads each preset's sweep directory under ``docs/`` (``sweep.json`` and every run's
``result.json``), derives the preset's claims with :mod:`recnorm.experiments.analyses`, and writes one table
row per claim of the question: the claim with its metric, its source, the preset (linked to its report),
the verdict, the effect with its 95% interval, the seeds that agree, and the same claim on a second
reasonable metric. A claim whose preset has no runs on disk says so instead of disappearing.

Command: ``recnorm evidence`` (``--docs DIR``, ``--out FILE``; defaults ``docs`` and ``docs/evidence.md``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

from recnorm.experiments.analyses import Claim, claims_for
from recnorm.experiments.results import is_sweep_dir, load_records

__all__ = ["Question", "QUESTIONS", "PRESET_DIRS", "build_evidence", "write_evidence"]

logger = logging.getLogger(__name__)

#: Where each preset's sweep directory lives under the docs directory (default: its own name).
PRESET_DIRS: Dict[str, str] = {"default": "report"}


@dataclasses.dataclass
class Question:
    """One claim of the question, answered by the claims of one preset whose keys match ``keys``
    (``fnmatch`` patterns, so rows added to a preset later, such as new norms in ``language``, appear)."""

    topic: str
    preset: str
    keys: Tuple[str, ...]


#: The claims of the question, in the order the page shows them.
QUESTIONS: List[Question] = [
    Question("BN makes the LSTM train faster", "default", ("faster:batch γ=0.1",)),
    Question("BN makes the LSTM train faster", "cooijmans", ("bn_faster:*",)),
    Question("BN makes the LSTM generalize better (Cooijmans et al.'s headline)", "cooijmans", ("bn:*",)),
    Question("layer norm makes the LSTM train faster", "default", ("faster:layer",)),
    Question("sequence-wise BN (input term) makes the LSTM train faster", "default", ("faster:sequence_batch",)),
    Question("normalization makes the LSTM less sensitive to its init", "default", ("init:*",)),
    Question("BN's initial gain matters (γ0 = 0.1, not 1)", "cooijmans", ("gamma:*",)),
    Question("naive BN with statistics shared over time fails", "default", ("shared_hurts",)),
    Question("naive BN with statistics shared over time fails", "horizontal", ("shared_hurts:*",)),
    Question("vertical (sequence-wise) BN helps deep stacks only", "laurent", ("deep_only",)),
    Question("BN on the output of each RNN, between stacked layers, helps", "laurent", ("between:*",)),
    Question("BN needs large batches; layer norm does not", "drawbacks", ("small_batch:*", "bn_vs_ln_small_batch:*")),
    Question("training-mode and eval-mode statistics drift apart at small batches", "drawbacks",
             ("train_eval_gap:*",)),
    Question("running averages are a poor substitute for exact population statistics", "drawbacks",
             ("ema_loses:*:64",)),
    Question("BN acts as a regularizer", "regularization", ("gap:*", "test:*")),
    Question("padding must stay out of the statistics", "padding", ("masked:*",)),
    Question("sorting by length is the workaround for padding", "padding", ("sorted:*",)),
    Question("gated cells remember longer than a tanh RNN", "memory",
             ("memory:*:adding, T = 200", "memory:*:copy, delay 10")),
    Question("gated cells suffer less from vanishing gradients", "memory", ("gradient:*:adding, T = 200",)),
    Question("normalization adds training speed on long-range tasks", "memory", ("speed:*:adding, T = 200",)),
    Question("normalization lowers bits per character (BN-LSTM: Cooijmans et al.)", "language", ("bpc:*",)),
    Question("normalization speeds up language models (layer norm: Ba et al.)", "language", ("speed:*",)),
]


def _preset_dir(docs: str, preset: str) -> str:
    return os.path.join(docs, PRESET_DIRS.get(preset, preset))


def _load(docs: str, presets: Sequence[str]) -> Dict[str, Tuple[List[Claim], int]]:
    out: Dict[str, Tuple[List[Claim], int]] = {}
    for preset in presets:
        path = _preset_dir(docs, preset)
        if not is_sweep_dir(path):
            logger.warning("evidence: no sweep directory for preset %s at %s", preset, path)
            out[preset] = ([], 0)
            continue
        records = load_records(path)
        out[preset] = (claims_for(preset, records), len(records))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def build_evidence(docs: str = "docs", questions: Optional[Sequence[Question]] = None) -> str:
    """The Markdown of the evidence page for the sweep directories under ``docs``."""
    questions = list(QUESTIONS if questions is None else questions)
    presets: List[str] = []
    for q in questions:
        if q.preset not in presets:
            presets.append(q.preset)
    loaded = _load(docs, presets)
    rows: List[List[str]] = []
    counts: Dict[str, int] = {}
    by_topic: Dict[str, Dict[str, int]] = {}
    for q in questions:
        claims, n_runs = loaded[q.preset]
        report = f"{PRESET_DIRS.get(q.preset, q.preset)}/report.md"
        link = f"[{q.preset}]({report})"
        matched = [c for c in claims if any(fnmatch.fnmatchcase(c.key, k) for k in q.keys)]
        if not matched:
            why = "no runs" if not n_runs else "no matching comparison in these runs"
            rows.append([_cell(q.topic), "–", "–", link, f"**not tested: {why}**", "–", "–", "–"])
            counts["not tested"] = counts.get("not tested", 0) + 1
            topic = by_topic.setdefault(q.topic, {})
            topic["not tested"] = topic.get("not tested", 0) + 1
            continue
        for c in matched:
            rows.append([_cell(q.topic), _cell(f"{c.claim} [{c.task}]"), _cell(c.source), link,
                         f"**{_cell(c.verdict())}**", _cell(c.effect()), c.seeds(), _cell(c.other_text())])
            key = "supported" if c.result == "supported" else (
                "opposite" if c.result == "contradicted" else "not supported")
            counts[key] = counts.get(key, 0) + 1
            topic = by_topic.setdefault(q.topic, {})
            topic[key] = topic.get(key, 0) + 1
    runs = sum(n for _, n in loaded.values())
    out = [
        "# Does normalization do for an RNN what it does for a CNN? The evidence",
        "",
        "Generated by `recnorm evidence` from the run directories committed under `docs/<preset>/runs/` "
        "(`docs/report/runs/` for the main job; one `config.json` and `result.json` per run; "
        f"{runs} runs of {len(presets)} presets); do not edit "
        "by hand. Each preset's report, linked in the table, shows the curves and tables behind its rows, and "
        "its docstring (`recnorm presets`) the command that produced it.",
        "",
        "**How to read it.** Every claim compares two models trained with the same seeds, so the evidence is "
        "the per-seed paired difference of the named metric, signed so that a positive effect favours the "
        "claim. *Supported*: the 95% t interval of the mean difference lies above zero. *Not supported: "
        "difference within seed spread*: the interval contains zero. *Not supported: the opposite holds*: "
        "the interval lies below zero. Runs that diverged count as chance level. The last column tests the "
        "same claim on a second reasonable metric; where the two disagree, both verdicts stand.",
        "",
        "Totals: " + ", ".join(f"{k}: {v}" for k, v in (("supported", counts.get("supported", 0)),
                                                       ("not supported", counts.get("not supported", 0)),
                                                       ("the opposite holds", counts.get("opposite", 0)),
                                                       ("not tested", counts.get("not tested", 0)))) + ".",
        "",
        "| question | comparisons | supported | not supported | the opposite holds |",
        "|---|---|---|---|---|",
    ]
    for topic, c in by_topic.items():
        total = sum(c.values())
        if c.get("not tested"):
            out.append(f"| {_cell(topic)} | not tested | – | – | – |")
        else:
            out.append(f"| {_cell(topic)} | {total} | {c.get('supported', 0)} | {c.get('not supported', 0)} | "
                       f"{c.get('opposite', 0)} |")
    out += [
        "",
        "## Every comparison",
        "",
        "| question | claim [task] | source | preset | verdict | effect [95% interval] | seeds that agree "
        "| second metric |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out.extend("| " + " | ".join(r) + " |" for r in rows)
    out.append("")
    return "\n".join(out)


def write_evidence(docs: str = "docs", out: Optional[str] = None) -> str:
    """Write the evidence page (default ``docs/evidence.md``) atomically; return its path."""
    out = out or os.path.join(docs, "evidence.md")
    if not os.path.isdir(docs):
        raise FileNotFoundError(f"no docs directory at {docs!r}")
    text = build_evidence(docs)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
    logger.info("evidence page written to %s", out)
    return out
