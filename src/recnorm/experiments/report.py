"""The report: from a run or sweep directory on disk to an HTML page and a Markdown summary with plots.

:func:`write_report` reads only the files the engine wrote (``result.json`` of every run and the sweep's
``sweep.json``), so a report can be rebuilt at any time, also from a copied directory. It writes::

    DIR/report.html        self-contained: every plot embedded as a base64 PNG
    DIR/report.md          the same tables and verdicts; plots as PNG files beside it
    DIR/figures/*.png

What the report shows, per task: learning curves per normalization with seed bands; steps and seconds to
reach a target metric and the area under the validation curve (convergence speed); the final test metric,
its spread and the number of diverged runs; sensitivity to the weight initialization (final metric and the
fraction of runs that train, per init scheme and gain); gradient flow through time (``||dL/dh_t||`` vs t at
init and at the end); gradient norms and clipping; per-step batch and population statistics of the batch
norms; and a **verdict table** for the claims under test.

How verdicts are decided (stated in the report too): every claim compares two models run with the same
seeds, so the evidence is the per-seed paired difference of a quantity. A claim is *supported* when the
mean paired difference favours it and exceeds the 95% two-sided t critical value times its standard error
(so it is larger than the seed-to-seed spread of the difference), *contradicted* when the same holds in the
opposite direction, and otherwise *not supported: difference within seed spread*. The table gives the
effect size and the number of seeds in which the comparison holds. Every claim names the quantity it rests
on; convergence speed is judged twice, by the validation metric and by the training loss (each averaged over
training), and where the two disagree both verdicts say so.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from recnorm.experiments.results import (
    SWEEP_FILE, area_under_curve, first_reach, is_sweep_dir, load_records_checked, model_label, read_json, summary)

__all__ = ["write_report", "build_report", "compare_paired", "Verdict"]

logger = logging.getLogger(__name__)

# 95% two-sided critical values of Student's t by degrees of freedom.
_T_CRIT = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
           10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}
TRAIN_FRACTION = 0.5  # a run "trains" if it closes this fraction of the gap from chance to the best group
TARGET_FRACTION = 0.75  # default target: this fraction of the way from chance to the best group's final


def _t_crit(df: int) -> float:
    for k in sorted(_T_CRIT):
        if df <= k:
            return _T_CRIT[k]
    return 1.96


# ---------------------------------------------------------------------------------------------- verdicts
class Verdict(dict):
    """One row of the verdict table: claim, evidence, effect, seeds, verdict (a dict with those keys)."""


def compare_paired(a: Dict[Any, Optional[float]], b: Dict[Any, Optional[float]], better: str,
                   worst: Optional[float] = None) -> Dict[str, Any]:
    """Per-key paired comparison of ``a`` against ``b`` (keys: seeds).

    Args:
        a, b: ``{seed: value}``; None marks a failed run, counted as ``worst`` (or dropped when None).
        better: ``"higher"`` or ``"lower"``: which direction of ``a - b`` favours ``a``.
        worst: value substituted for failed runs.

    Returns:
        ``{"n", "wins", "mean_diff", "sd_diff", "se", "t_crit", "outcome"}`` where ``mean_diff`` is signed so
        that positive favours ``a``, and ``outcome`` is ``"supported"``, ``"contradicted"``, ``"within
        spread"`` or ``"insufficient"`` (fewer than 2 pairs).
    """
    sign = 1.0 if better == "higher" else -1.0
    diffs = []
    for key in a:
        if key not in b:
            continue
        va, vb = a[key], b[key]
        va = worst if va is None else va
        vb = worst if vb is None else vb
        if va is None or vb is None:
            continue
        diffs.append(sign * (va - vb))
    n = len(diffs)
    out: Dict[str, Any] = {"n": n, "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs),
                           "mean_diff": None, "sd_diff": None, "se": None, "t_crit": None}
    if n < 2:
        out["outcome"] = "insufficient"
        return out
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    t = _t_crit(n - 1)
    out.update(mean_diff=mean, sd_diff=sd, se=se, t_crit=t)
    if mean > 0 and (mean > t * se or (se == 0 and out["wins"] == n)):
        out["outcome"] = "supported"
    elif mean < 0 and (-mean > t * se or (se == 0 and out["losses"] == n)):
        out["outcome"] = "contradicted"
    else:
        out["outcome"] = "within spread"
    return out


def _verdict_text(cmp: Dict[str, Any]) -> str:
    if cmp["outcome"] == "within spread" and cmp["wins"] == cmp["n"]:
        return (f"not supported: difference within seed spread (suggestive: all {cmp['n']} seeds agree, too few to "
                f"exclude chance at this effect size)")
    return {
        "supported": "supported",
        "contradicted": "not supported: the opposite holds beyond the seed spread",
        "within spread": "not supported: difference within seed spread",
        "insufficient": f"not enough data ({cmp['n']} paired seed(s); need >= 2)",
    }[cmp["outcome"]]


# ---------------------------------------------------------------------------------------------- data model
class _TaskData:
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
    from recnorm.experiments.sweep import flatten_config

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
    """A model label in words: ``"batch γ=0.1"`` -> ``"per-step batch norm (batch γ=0.1)"``."""
    words = {"none": "no norm", "layer": "layer norm", "batch": "per-step batch norm",
             "sequence_batch": "sequence-wise batch norm", "shared_batch": "naive shared batch norm"}
    head = label.split()[0]
    return f"{words.get(head, head)} ({label})" if head != "none" else "no norm"


def _short(field: str) -> str:
    return {"init_gain": "gain", "num_layers": "layers", "hidden_size": "H"}.get(field, field)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _fmt(v: Optional[float], digits: int = 3) -> str:
    if v is None:
        return "–"
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}"


def _mean_sd(values: Sequence[Optional[float]], digits: int = 3) -> str:
    s = summary(values)
    if s["n"] == 0:
        return "–"
    text = f"{_fmt(s['mean'], digits)} ± {_fmt(s['std'], digits)}"
    return text + (f" ({s['n_missing']} failed)" if s["n_missing"] else "")


# ---------------------------------------------------------------------------------------------- document
class _Doc:
    """Blocks rendered both as HTML and as Markdown."""

    def __init__(self, figdir: str):
        self.blocks: List[Tuple] = []
        self.figdir = figdir
        self.figures: List[str] = []
        self.skipped: List[str] = []  # damaged results left out, one message each

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: List[str], rows: List[List[Any]]) -> None:
        self.blocks.append(("table", headers, [[str(c) for c in row] for row in rows]))

    def figure(self, fig: Any, name: str, caption: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        data = buf.getvalue()
        os.makedirs(self.figdir, exist_ok=True)
        filename = f"{name}.png"
        with open(os.path.join(self.figdir, filename), "wb") as f:
            f.write(data)
        self.figures.append(filename)
        self.blocks.append(("img", filename, base64.b64encode(data).decode("ascii"), caption))

    def markdown(self, figrel: str) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                headers, rows = b[1], b[2]
                esc = lambda s: s.replace("|", "\\|")  # noqa: E731
                out.append("| " + " | ".join(esc(h) for h in headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                out.extend("| " + " | ".join(esc(c) for c in row) + " |" for row in rows)
            elif b[0] == "img":
                out.append(f"![{b[3]}]({figrel}/{b[1]})\n\n*{b[3]}*")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        e = html.escape
        parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em;line-height:1.4}"
                 "table{border-collapse:collapse;margin:0.5em 0 1em}td,th{border:1px solid #bbb;padding:3px 8px;"
                 "font-size:0.9em;text-align:left}th{background:#eee}img{max-width:100%}"
                 "figcaption{font-size:0.85em;color:#444}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{_md_inline_to_html(b[1])}</p>")
            elif b[0] == "table":
                parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>")
                for row in b[2]:
                    parts.append("<tr>" + "".join(f"<td>{_md_inline_to_html(c)}</td>" for c in row) + "</tr>")
                parts.append("</table>")
            elif b[0] == "img":
                parts.append(f"<figure><img alt='{e(b[3])}' src='data:image/png;base64,{b[2]}'>"
                             f"<figcaption>{e(b[3])}</figcaption></figure>")
        parts.append("</body></html>")
        return "\n".join(parts)


def _md_inline_to_html(text: str) -> str:
    """Escape, then render **bold**, *italic* and `code` (the only inline Markdown the report uses)."""
    import re

    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<i>\1</i>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    return s


# ---------------------------------------------------------------------------------------------- plots
# Type sizes of the figures: they are shown about 1100 pixels wide, scaled down from 90 dpi.
_STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 11,
          "xtick.labelsize": 10, "ytick.labelsize": 10}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(_STYLE)
    return plt


def _legend_above(fig: Any, axes: Sequence[Any], title: Optional[str] = None) -> None:
    """One legend for the whole figure, above its panels: every line label found in ``axes``, once (the
    panels share their colours and line styles, so one key serves them all). A lone panel keeps its legend
    inside."""
    if len(axes) == 1:
        axes[0].legend(fontsize=10, title=title)
        return
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(labels), 5),
                   frameon=False, title=title)


def _colors(labels: List[str]) -> Dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    out, i = {}, 0
    for label in labels:
        if label == "none":
            out[label] = "black"
        else:
            out[label] = cmap(i % 10)
            i += 1
    return out


def _mean_band(curves: List[Tuple[List[float], List[Optional[float]]]]
               ) -> Tuple[List[float], List[float], List[float], List[float]]:
    """Mean, min and max over curves at each x (x values taken from the longest curve)."""
    xs = max((c[0] for c in curves), key=len, default=[])
    mean, lo, hi, xo = [], [], [], []
    for i, x in enumerate(xs):
        vals = [c[1][i] for c in curves if i < len(c[1]) and c[1][i] is not None and math.isfinite(c[1][i])]
        if vals:
            xo.append(x)
            mean.append(statistics.fmean(vals))
            lo.append(min(vals))
            hi.append(max(vals))
    return xo, mean, lo, hi


def _smooth(values: List[Optional[float]], window: int) -> List[Optional[float]]:
    out, acc, buf = [], 0.0, []
    for v in values:
        if v is None:
            out.append(None)
            continue
        buf.append(v)
        acc += v
        if len(buf) > window:
            acc -= buf.pop(0)
        out.append(acc / len(buf))
    return out


def _plot_learning_curves(doc: _Doc, td: _TaskData, key: str) -> None:
    plt = _plt()
    contexts = td.contexts()[:6]
    colors = _colors(td.labels)
    fig, axes = plt.subplots(2, len(contexts), figsize=(4.2 * len(contexts) + 1, 6.5), squeeze=False)
    for j, ctx in enumerate(contexts):
        diverged = []
        for label in td.labels:
            runs = td.runs(label, ctx)
            if not runs:
                continue
            failed = sum(r["status"] != "ok" for r in runs)
            if failed:
                diverged.append(f"{label} {failed} of {len(runs)}")
            curves = [(r["valid"]["step"], r["valid"].get(td.metric, [])) for r in runs]
            x, m, lo, hi = _mean_band(curves)
            ax = axes[0][j]
            ax.plot(x, m, color=colors[label], label=label)
            ax.fill_between(x, lo, hi, color=colors[label], alpha=0.2)
            window = max(1, max(len(r["train"]["loss"]) for r in runs) // 40)
            tcurves = [(r["train"]["step"], _smooth(r["train"]["loss"], window)) for r in runs]
            x, m, lo, hi = _mean_band(tcurves)
            ax = axes[1][j]
            ax.plot(x, m, color=colors[label], label=label)
            ax.fill_between(x, lo, hi, color=colors[label], alpha=0.2)
        axes[0][j].set_title(td.context_name(ctx) + (f"\ndiverged: {', '.join(diverged)}" if diverged else ""))
        axes[0][j].set_xlabel("step")
        axes[0][j].set_ylabel(f"valid {td.metric}")
        if td.target is not None:
            axes[0][j].axhline(td.target, color="grey", lw=0.8, ls=":")
        axes[1][j].set_xlabel("step")
        axes[1][j].set_ylabel("train loss (smoothed)")
        axes[1][j].set_yscale("log")
    fig.tight_layout()
    _legend_above(fig, axes[0])
    n_seeds = len({r["seed"] for r in td.records})
    doc.figure(fig, f"{key}_curves", f"{td.task['name']}: validation {td.metric} (top) and smoothed training loss "
                                     f"(bottom) per normalization, one column per setting: mean over {n_seeds} "
                                     f"seed(s), band = min..max; dotted line = target")

    # Against training seconds, reference context only.
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in td.labels:
        runs = td.runs(label, td.reference)
        if not runs:
            continue
        for i, r in enumerate(runs):
            ax.plot(r["valid"]["time"], r["valid"].get(td.metric, []), color=colors[label], alpha=0.7,
                    label=label if i == 0 else None)
    ax.set_xlabel("training seconds (1 thread)")
    ax.set_ylabel(f"valid {td.metric}")
    ax.set_title(td.context_name(td.reference))
    ax.legend(fontsize=9)
    fig.tight_layout()
    doc.figure(fig, f"{key}_curves_time", f"{td.task['name']}: validation {td.metric} against wall-clock "
                                          f"training time, one line per seed ({td.context_name(td.reference)})")


def _plot_sensitivity(doc: _Doc, td: _TaskData, key: str) -> None:
    plt = _plt()
    schemes = sorted({r["config"]["init"] for r in td.records})
    colors = _colors(td.labels)
    fig, axes = plt.subplots(1, len(schemes), figsize=(5 * len(schemes), 3.8), squeeze=False)
    for j, scheme in enumerate(schemes):
        ax = axes[0][j]
        for label in td.labels:
            gains = sorted({r["config"]["init_gain"] for r in td.runs(label) if r["config"]["init"] == scheme})
            xs, ms, sds = [], [], []
            for g in gains:
                vals = [_final_test(r) for r in td.runs(label)
                        if r["config"]["init"] == scheme and r["config"]["init_gain"] == g]
                s = summary(vals)
                if s["n"]:
                    xs.append(g)
                    ms.append(s["mean"])
                    sds.append(s["std"])
            if xs:
                ax.errorbar(xs, ms, yerr=sds, color=colors[label], marker="o", capsize=3, label=label)
        all_gains = sorted({r["config"]["init_gain"] for r in td.records if r["config"]["init"] == scheme})
        ax.set_xscale("log")
        ax.set_xticks(all_gains)
        ax.set_xticklabels([f"{g:g}" for g in all_gains])
        ax.minorticks_off()
        ax.set_xlabel(f"init gain ({scheme})")
        ax.set_ylabel(f"final test {td.metric}")
        if td.chance is not None:
            ax.axhline(td.chance, color="grey", lw=0.8, ls=":")
    fig.tight_layout()
    _legend_above(fig, axes[0])
    doc.figure(fig, f"{key}_init", f"{td.task['name']}: final test {td.metric} against the init gain "
                                   f"(mean ± std over seeds; diverged runs omitted); dotted line = chance")


def _plot_depth(doc: _Doc, td: _TaskData, key: str) -> None:
    plt = _plt()
    colors = _colors(td.labels)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in td.labels:
        depths = sorted({r["config"]["num_layers"] for r in td.runs(label)})
        xs, ms, sds = [], [], []
        for d in depths:
            s = summary([_final_test(r) for r in td.runs(label) if r["config"]["num_layers"] == d])
            if s["n"]:
                xs.append(d)
                ms.append(s["mean"])
                sds.append(s["std"])
        if xs:
            ax.errorbar(xs, ms, yerr=sds, color=colors[label], marker="o", capsize=3, label=label)
    ax.set_xlabel("recurrent layers")
    ax.set_ylabel(f"final test {td.metric}")
    ax.legend(fontsize=9)
    fig.tight_layout()
    doc.figure(fig, f"{key}_depth", f"{td.task['name']}: final test {td.metric} against depth (mean ± std)")


def _grad_flow_curves(runs: List[Dict[str, Any]], which: str, layer: str) -> Optional[List[float]]:
    """Geometric mean over runs of ||dL/dh_t|| for ``layer`` at init (``which="init"``) or the last diag."""
    series = []
    for r in runs:
        flow = r.get("diagnostics", {}).get("grad_flow") or []
        if not flow:
            continue
        entry = flow[0] if which == "init" else flow[-1]
        if which != "init" and entry["step"] == 0:
            continue
        norms = entry.get("norms", {}).get(layer)
        if norms:
            series.append(norms)
    if not series:
        return None
    length = min(len(s) for s in series)
    out = []
    for t in range(length):
        vals = [s[t] for s in series if s[t] is not None and s[t] > 0]
        out.append(math.exp(statistics.fmean(math.log(v) for v in vals)) if vals else None)
    return out


def _layers_of(runs: List[Dict[str, Any]]) -> List[str]:
    for r in runs:
        flow = r.get("diagnostics", {}).get("grad_flow") or []
        if flow:
            keys = [k for k in flow[0].get("norms", {}) if not k.endswith("_reverse")]
            return sorted(keys)
    return []


def _plot_grad_flow(doc: _Doc, td: _TaskData, key: str) -> List[List[str]]:
    """One row of panels (at init, end of training) per structural setting and shown layer (the first and
    the last); returns table rows (setting, norm, when, first, last, ratio) for the first layer."""
    plt = _plt()
    colors = _colors(td.labels)
    panels = []  # (setting context, layer)
    for struct in td.structures()[:4]:
        ctx = td.reference_in(struct)
        layers = _layers_of(td.runs(None, ctx))
        if layers:
            panels.extend((ctx, layer) for layer in ([layers[0]] + ([layers[-1]] if len(layers) > 1 else [])))
    if not panels:
        return []
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.4 * len(panels)), squeeze=False)
    rows = []
    for i, (ctx, layer) in enumerate(panels):
        first_layer = layer == _layers_of(td.runs(None, ctx))[0]
        for j, which in enumerate(("init", "final")):
            ax = axes[i][j]
            for label in td.labels:
                curve = _grad_flow_curves(td.runs(label, ctx), which, layer)
                if not curve:
                    continue
                xs = [t + 1 for t, v in enumerate(curve) if v is not None]
                ys = [v for v in curve if v is not None]
                ax.plot(xs, ys, color=colors[label], label=label)
                if first_layer and ys:
                    rows.append([td.context_name(ctx), label, which, _fmt(ys[0]), _fmt(ys[-1]),
                                 _fmt(ys[0] / ys[-1] if ys[-1] else None)])
            ax.set_yscale("log")
            ax.set_xlabel("time step t")
            ax.set_ylabel("||dL/dh_t||")
            ax.set_title(f"{td.context_name(ctx)}: {layer}, {'at init' if which == 'init' else 'end of training'}")
    fig.tight_layout()
    _legend_above(fig, [ax for row in axes for ax in row])
    doc.figure(fig, f"{key}_gradflow", f"{td.task['name']}: gradient norm ||dL/dh_t|| against t (geometric mean "
                                       f"over seeds); the loss is read at the last step, so small values at early "
                                       f"t mean vanishing gradients, large ones exploding gradients")
    return rows


def _norm_site(module: str) -> str:
    """A normalization module's name with what it normalizes: ``rnn.norm_hh_l0`` -> ``norm_hh_l0 (W_hh h)``."""
    name = module.split(".", 1)[1] if module.startswith("rnn.") else module
    for site, what in (("norm_ih", "W_ih x"), ("norm_hh", "W_hh h"), ("norm_c", "c")):
        if name.startswith(site):
            return f"{name} ({what})"
    return name


def _plot_batch_stats(doc: _Doc, td: _TaskData, key: str) -> bool:
    plt = _plt()
    cases = []
    for label in td.labels:
        runs = [r for r in td.runs(label, td.reference) if r.get("diagnostics", {}).get("batch_stats")]
        if runs:
            cases.append((label, runs[0]))
    if not cases:
        return False
    modules = []
    for _, r in cases:
        for m in r["diagnostics"]["batch_stats"].get("final", {}):
            if m not in modules:
                modules.append(m)
    modules = modules[:3]
    # One row per (normalization, statistic), one column per normalized quantity; the four sources have
    # fixed colours and line styles, so one legend above the grid serves every panel.
    sources = (("batch statistics, end of training", "final", "tab:blue", "-"),
               ("batch statistics, at init", "init", "tab:orange", ":"),
               ("population: running average (EMA)", "ema", "tab:green", "--"),
               ("population: recomputed exactly", "recomputed", "tab:red", "-."))
    fig, axes = plt.subplots(2 * len(cases), len(modules), figsize=(4.3 * len(modules) + 0.6, 3.0 * 2 * len(cases)),
                             squeeze=False)
    for i, (label, r) in enumerate(cases):
        diag = r["diagnostics"]
        where = {"final": diag["batch_stats"].get("final", {}), "init": diag["batch_stats"].get("init", {}),
                 "ema": diag.get("population_stats", {}).get("ema", {}),
                 "recomputed": diag.get("population_stats", {}).get("recomputed", {})}
        for j, module in enumerate(modules):
            for k, stat in enumerate(("mean", "var")):
                ax = axes[2 * i + k][j]
                positive = True
                for name, source, color, style in sources:
                    values = (where[source].get(module) or {}).get(stat)
                    if values:
                        xs = list(range(1, len(values) + 1))
                        if len(values) == 1:  # statistics shared over time: one value for every step
                            xs = [1, td.task.get("seq_len") or 1]
                            values = values * 2
                        ax.plot(xs, values, color=color, ls=style, label=name)
                        positive = positive and all(v is not None and v > 0 for v in values)
                if not ax.lines:  # this model has no such norm (e.g. sequence-wise BN only normalizes W_x x)
                    ax.axis("off")
                    continue
                if stat == "var" and positive:
                    ax.set_yscale("log")
                ax.set_title(f"{label}: {_norm_site(module)}")
                ax.set_ylabel(f"{stat} (average over units)" if stat == "mean" else "variance (average over units)")
                ax.set_xlabel("time step t")
    fig.tight_layout()
    _legend_above(fig, [ax for row in axes for ax in row])
    doc.figure(fig, f"{key}_bnstats", f"{td.task['name']}: per-step batch statistics (feature average of mean and "
                                      f"variance) at init and end of training, against the population statistics "
                                      f"(running average and exact recomputation); one seed per normalization")
    return True


# ---------------------------------------------------------------------------------------------- sections
def _per_seed(runs: List[Dict[str, Any]],
              value: Callable[[Dict[str, Any]], Optional[float]]) -> Dict[int, Optional[float]]:
    return {r["seed"]: value(r) for r in runs}


def _mean_over_contexts(td: _TaskData, label: str, value: Callable[[Dict[str, Any]], Optional[float]],
                        contexts: List[Tuple]) -> Dict[int, Optional[float]]:
    """Per seed: mean of ``value`` over ``contexts`` (None if any is None)."""
    by_seed: Dict[int, List[Optional[float]]] = {}
    for ctx in contexts:
        for r in td.runs(label, ctx):
            by_seed.setdefault(r["seed"], []).append(value(r))
    return {s: (None if any(v is None for v in vals) else statistics.fmean(vals)) for s, vals in by_seed.items()}


def _disagree(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two judgements of one claim point different ways: one supports it and the other does not."""
    decided = ("supported", "contradicted", "within spread")
    return a["outcome"] in decided and b["outcome"] in decided and (a["outcome"] == "supported") != (
        b["outcome"] == "supported")


def _disagreement(this: Dict[str, Any], other: Dict[str, Any], other_name: str, where: str) -> str:
    """The note that ends a verdict (closing its bold) when ``other``, the same claim judged by another
    quantity, points the other way."""
    if other["outcome"] == "supported":
        return f"; but {other_name} supports it ({where})**"
    if other["outcome"] == "contradicted":
        return f"; but {other_name} shows the opposite ({where})**"
    return f"; {other_name} does not confirm it ({where})**"


def _verdict_row(claim: str, evidence: str, cmp: Dict[str, Any]) -> List[str]:
    if cmp["mean_diff"] is None:
        effect = "–"
    else:
        effect = f"{_fmt(cmp['mean_diff'])} ± {_fmt(cmp['sd_diff'])} (mean ± sd of paired differences)"
    seeds = f"{cmp['wins']} of {cmp['n']}"
    return [claim, evidence, effect, seeds, f"**{_verdict_text(cmp)}**"]


def _verdicts(td: _TaskData) -> List[List[str]]:
    rows: List[List[str]] = []
    higher = "higher" if td.higher else "lower"
    worst = td.chance  # a diverged run counts as chance level
    base = "none"
    if base not in td.labels:
        return [["all claims", "needs a run without normalization", "–", "–", "**no baseline in this sweep**"]]
    ref = td.reference
    # Claims 1-4 are judged separately in every structural setting (cell, depth, ...: the context fields
    # other than the initialization), each at its reference initialization.
    structures = td.structures()

    def where(ctx: Tuple) -> str:
        return td.context_name(ctx)

    # 1. convergence speed at the reference init, judged by two quantities that can disagree: the validation
    # metric averaged over training (area under its curve) and the training loss averaged over every step.
    valid_name = f"validation {td.metric}" if td.metric != "loss" else "validation loss"
    for struct in structures:
        sref = td.reference_in(struct)
        for label in td.labels:
            if label == base:
                continue
            by_valid = compare_paired(_per_seed(td.runs(label, sref), td.auc),
                                      _per_seed(td.runs(base, sref), td.auc), higher, worst=worst)
            by_loss = compare_paired(_per_seed(td.runs(label, sref), td.mean_train_loss),
                                     _per_seed(td.runs(base, sref), td.mean_train_loss), "lower",
                                     worst=td.initial_loss)
            first = _verdict_row(
                f"{_pretty(label)} converges faster than no norm, by {valid_name} (mean over training)",
                f"{valid_name} averaged over training (area under the curve), {where(sref)}", by_valid)
            second = _verdict_row(
                f"{_pretty(label)} converges faster than no norm, by training loss (mean over training)",
                f"training loss averaged over all steps (lower is faster), {where(sref)}", by_loss)
            if _disagree(by_valid, by_loss):
                first[-1] = first[-1][:-2] + _disagreement(by_valid, by_loss, "the training loss", "next row")
                second[-1] = second[-1][:-2] + _disagreement(by_loss, by_valid, f"the {valid_name}", "row above")
            rows.extend([first, second])

    # 2. sensitivity to the init gain.
    gains = sorted({r["config"]["init_gain"] for r in td.records})
    if len(gains) >= 2:
        def spread(label: str, struct: Tuple) -> Dict[int, Optional[float]]:
            # Per seed: range (best - worst) of the final test metric over gains within each init scheme,
            # averaged over schemes; a diverged run counts as chance level.
            by_seed: Dict[int, List[float]] = {}
            groups: Dict[str, Dict[int, List[float]]] = {}
            for r in td.runs(label):
                if td.structure(r) != struct:
                    continue
                v = _final_test(r)
                v = worst if v is None else v
                if v is not None:
                    groups.setdefault(r["config"]["init"], {}).setdefault(r["seed"], []).append(v)
            for g in groups.values():
                for seed, vals in g.items():
                    if len(vals) >= 2:
                        by_seed.setdefault(seed, []).append(max(vals) - min(vals))
            return {seed: statistics.fmean(v) for seed, v in by_seed.items()}

        for struct in structures:
            base_runs = [r for r in td.runs(base) if td.structure(r) == struct]
            for label in td.labels:
                if label == base:
                    continue
                runs = [r for r in td.runs(label) if td.structure(r) == struct]
                cmp = compare_paired(spread(label, struct), spread(base, struct), "lower")
                frac = sum(td.trains(r) for r in runs) / max(1, len(runs))
                frac_base = sum(td.trains(r) for r in base_runs) / max(1, len(base_runs))
                setting = f"{td.structure_name(struct)}; " if td.structure_name(struct) else ""
                gain_list = ", ".join(_fmt_value(g) for g in gains)
                rows.append(_verdict_row(
                    f"{_pretty(label)} is less sensitive to the init gain than no norm, by the range of final "
                    f"test {td.metric} over gains {gain_list}",
                    f"{setting}best minus worst final test {td.metric} over the gains (smaller = less sensitive); "
                    f"runs that train: {frac:.0%} vs {frac_base:.0%}", cmp))

    # 3. naive shared BN.
    shared = [lab for lab in td.labels if lab.startswith("shared_batch")]
    per_step = [lab for lab in td.labels if lab.startswith("batch")]
    for struct in structures:
        sref = td.reference_in(struct)
        for lab in shared:
            for other_label in [base] + per_step:
                cmp = compare_paired(_per_seed(td.runs(other_label, sref), _final_test),
                                     _per_seed(td.runs(lab, sref), _final_test), higher, worst=worst)
                rows.append(_verdict_row(
                    f"naive shared BN hurts: {_pretty(lab)} ends with a worse final test {td.metric} than "
                    f"{_pretty(other_label)}",
                    f"final test {td.metric}, {where(sref)}", cmp))

    # 4. layer norm and the others: final metric.
    for struct in structures:
        sref = td.reference_in(struct)
        for label in td.labels:
            if label == base or label.startswith("shared_batch"):
                continue
            cmp = compare_paired(_per_seed(td.runs(label, sref), _final_test),
                                 _per_seed(td.runs(base, sref), _final_test), higher, worst=worst)
            rows.append(_verdict_row(f"{_pretty(label)} reaches a better final test {td.metric} than no norm",
                                     f"final test {td.metric}, {where(sref)}", cmp))

    # 5. sequence-wise BN and depth.
    depths = sorted({r["config"]["num_layers"] for r in td.records})
    seq = [lab for lab in td.labels if lab.startswith("sequence_batch")]
    if len(depths) >= 2 and seq:
        others = [f for f in td.context_fields if f != "num_layers"]
        for lab in seq:
            effects = {}
            for d in depths:
                ctxs = [c for c in td.contexts() if dict(zip(td.context_fields, c))["num_layers"] == d
                        and all(dict(zip(td.context_fields, c)).get(f) == dict(zip(td.context_fields, ref)).get(f)
                                for f in others)]
                effects[d] = compare_paired(_mean_over_contexts(td, lab, _final_test, ctxs),
                                            _mean_over_contexts(td, base, _final_test, ctxs), higher,
                                            worst=worst)
            shallow, deep = effects[depths[0]], effects[depths[-1]]
            if deep["outcome"] == "supported" and shallow["outcome"] != "supported":
                outcome = "supported"
            elif deep["outcome"] == "insufficient" or shallow["outcome"] == "insufficient":
                outcome = "insufficient"
            elif shallow["outcome"] == "supported" and deep["outcome"] == "supported":
                outcome = "helps both"
            else:
                outcome = "no deep benefit"
            text = {"supported": "supported", "insufficient": "not enough data",
                    "helps both": "not supported: it helps shallow stacks too",
                    "no deep benefit": "not supported: no benefit beyond the seed spread in the deepest stack"}[outcome]
            effect = "; ".join(f"{d} layer(s): {_fmt(e['mean_diff'])} ± {_fmt(e['sd_diff'])} ({e['outcome']})"
                               for d, e in effects.items())
            seeds = "; ".join(f"{d}: {e['wins']} of {e['n']}" for d, e in effects.items())
            rows.append([f"sequence-wise BN helps deep stacks, not shallow, by final test {td.metric} "
                         f"({_pretty(lab)})",
                         f"final test {td.metric} vs no norm at each depth", effect, seeds, f"**{text}**"])
    elif seq:
        rows.append([f"sequence-wise BN helps deep stacks, not shallow, by final test {td.metric} "
                     f"({_pretty(seq[0])})",
                     "needs several depths (run the laurent preset)", "–", "–", "**not tested in this sweep**"])
    return rows


def _task_section(doc: _Doc, td: _TaskData, key: str) -> List[List[str]]:
    t = td.task
    opts = {k: v for k, v in (t.get("options") or {}).items() if v is not None}
    doc.h(2, f"Task {t['name']}" + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else ""))
    seeds = sorted({r["seed"] for r in td.records})
    diverged = sum(r["status"] != "ok" for r in td.records)
    doc.p(f"{t.get('kind')} task, T = {t.get('seq_len')}, metric **{td.metric}** "
          f"({'higher' if td.higher else 'lower'} is better). {len(td.records)} runs, seeds "
          f"{', '.join(str(s) for s in seeds)}, "
          f"{diverged} diverged. Varied: {', '.join(td.varied) or 'nothing'}. Chance level (median step-0 valid "
          f"{td.metric}): {_fmt(td.chance)}; target for the speed table: {_fmt(td.target)}. "
          f"Reference setting for the speed comparisons: {td.context_name(td.reference)}.")

    doc.h(3, "Verdicts")
    verdicts = _verdicts(td)
    doc.table(["claim", "evidence", "effect (positive favours the claim)", "seeds where it holds", "verdict"],
              verdicts)

    doc.h(3, "Learning curves")
    _plot_learning_curves(doc, td, key)

    doc.h(3, "Convergence speed")
    rows = []
    for label in td.labels:
        runs = td.runs(label, td.reference)
        if not runs:
            continue
        steps = [td.reach(r, "step") for r in runs]
        secs = [td.reach(r, "time") for r in runs]
        reached = sum(s is not None for s in steps)
        rows.append([label, len(runs), _mean_sd([td.auc(r) for r in runs]),
                     _mean_sd([td.mean_train_loss(r) for r in runs]), f"{reached} of {len(runs)}",
                     _mean_sd(steps, 3) if reached else "never", _mean_sd(secs, 3) if reached else "never",
                     _fmt(statistics.fmean(r["timing"]["seconds_per_step"] for r in runs) * 1000) + " ms"])
    doc.table(["norm", "runs", f"mean valid {td.metric} over training", "mean training loss over training",
               f"reached {_fmt(td.target)}", "steps to target", "seconds to target", "time per step"], rows)
    doc.p("Steps and seconds to target are means over the seeds that reached it (evaluation every "
          f"{td.records[0]['config']['eval_every']} steps); seconds are training time on one thread.")

    doc.h(3, "Final test metric")
    rows = []
    for ctx in td.contexts():
        for label in td.labels:
            runs = td.runs(label, ctx)
            if not runs:
                continue
            trained = sum(td.trains(r) for r in runs)
            rows.append([td.context_name(ctx), label, _mean_sd([_final_test(r) for r in runs]), len(runs),
                         sum(r["status"] != "ok" for r in runs), f"{trained} of {len(runs)}"])
    doc.table(["setting", "norm", f"test {td.metric} (mean ± sd)", "runs", "diverged", "trained"], rows)
    doc.p(f"A run *trained* when it did not diverge and its final valid {td.metric} closes at least "
          f"{TRAIN_FRACTION:.0%} of the gap between chance and the best setting's mean. Batch-norm models are "
          "evaluated with population statistics recomputed exactly from training batches.")

    bn_rows = []
    for label in td.labels:
        runs = [r for r in td.runs(label, td.reference) if "test_ema" in (r.get("final") or {})]
        if runs:
            get = lambda r, k: ((r["final"].get(k) or {}).get(td.metric))  # noqa: E731
            bn_rows.append([label, _mean_sd([get(r, "test") for r in runs]),
                            _mean_sd([get(r, "test_ema") for r in runs]),
                            _mean_sd([get(r, "test_batch_stats") for r in runs])])
    if bn_rows:
        doc.h(3, "Population statistics at test time")
        doc.table(["norm", "recomputed (exact)", "running average (EMA)", "batch statistics"], bn_rows)

    gains = {r["config"]["init_gain"] for r in td.records}
    schemes = {r["config"]["init"] for r in td.records}
    if len(gains) > 1 or len(schemes) > 1:
        doc.h(3, "Sensitivity to initialization")
        _plot_sensitivity(doc, td, key)
        rows = []
        for label in td.labels:
            for scheme in sorted(schemes):
                runs = [r for r in td.runs(label) if r["config"]["init"] == scheme]
                if not runs:
                    continue
                by_gain = []
                for g in sorted(gains):
                    at_gain = [r for r in runs if r["config"]["init_gain"] == g]
                    if at_gain:
                        trained = sum(td.trains(r) for r in at_gain)
                        by_gain.append(f"{g:g}: {_mean_sd([_final_test(r) for r in at_gain])} "
                                       f"({trained}/{len(at_gain)} train)")
                rows.append([label, scheme, "; ".join(by_gain),
                             f"{sum(td.trains(r) for r in runs)} of {len(runs)}"])
        doc.table(["norm", "init", f"final test {td.metric} by gain", "runs that train"], rows)

    if len({r["config"]["num_layers"] for r in td.records}) > 1:
        doc.h(3, "Depth")
        _plot_depth(doc, td, key)

    doc.h(3, "Gradient flow through time")
    flow_rows = _plot_grad_flow(doc, td, key)
    if flow_rows:
        doc.table(["setting", "norm", "when", "||dL/dh_1||", "||dL/dh_T||", "ratio first/last"], flow_rows)

    doc.h(3, "Gradient norms and clipping")
    rows = []
    for label in td.labels:
        runs = td.runs(label)
        norms = [g for r in runs for g in r["train"].get("grad_norm", []) if g is not None]
        clipped = [c for r in runs for c in r["train"].get("clipped", [])]
        rows.append([label, _fmt(statistics.median(norms)) if norms else "–", _fmt(max(norms)) if norms else "–",
                     f"{sum(clipped) / len(clipped):.1%}" if clipped else "–"])
    doc.table(["norm", "median grad norm", "max grad norm", "steps clipped"], rows)

    if any(r.get("diagnostics", {}).get("batch_stats") for r in td.records):
        doc.h(3, "Per-step statistics of the batch norms")
        _plot_batch_stats(doc, td, key)
    return verdicts


def build_report(path: str, figdir: Optional[str] = None) -> Tuple[_Doc, List[List[str]]]:
    """Read ``path`` (a run or sweep directory) and lay out the report, writing its figures to ``figdir``
    (default ``path/figures``); returns the document and all verdict rows (task first). Raises
    FileNotFoundError when no finished run is found."""
    records, skipped = load_records_checked(path)
    if not records:
        raise FileNotFoundError(f"no finished runs (result.json) under {path!r}" + (
            f"; skipped {len(skipped)} damaged result(s): " + "; ".join(skipped) if skipped else ""))
    manifest = read_json(os.path.join(path, SWEEP_FILE)) if is_sweep_dir(path) else {}
    spec = manifest.get("spec", {})
    hints = spec.get("report", {}) or {}
    from recnorm.experiments.sweep import varied_fields

    doc = _Doc(figdir or os.path.join(path, "figures"))
    doc.skipped = skipped
    title = spec.get("name") or os.path.basename(os.path.abspath(path))
    doc.h(1, f"recnorm report: {title}")
    if spec.get("description"):
        doc.p(spec["description"])
    if skipped:
        doc.p(f"**Warning: {len(skipped)} damaged result(s) left out of this report** (re-run the sweep to redo "
              f"them): " + "; ".join(skipped))
    v = records[0].get("versions", {})
    total = sum(r["timing"]["total_seconds"] for r in records)
    doc.p(f"{len(records)} finished runs" + (f" of {len(manifest['runs'])} in the sweep" if manifest else "") +
          f"; {total / 60:.1f} run-minutes in total. Software: python {v.get('python')}, torch {v.get('torch')}, "
          f"recnorm {v.get('recnorm')}, on {v.get('platform')}.")
    doc.p("**How to read the verdicts.** Each claim compares two models trained with the same seeds (and the "
          "same init), so the evidence is the per-seed paired difference. *Supported* means the mean difference "
          "favours the claim by more than the 95% t critical value times its standard error (it exceeds the "
          "seed-to-seed spread); *not supported: difference within seed spread* means the seeds disagree or the "
          "gap is small against their spread; *the opposite holds* means the reverse is supported. "
          "\"Seeds where it holds\" counts the seeds whose paired difference favours the claim. "
          "Diverged runs count as chance level. Each claim names the quantity it rests on; convergence speed is "
          "judged twice, by the validation metric and by the training loss, each averaged over training, and "
          "where one supports the claim and the other does not, both rows say so.")

    by_task: Dict[str, List[Dict[str, Any]]] = {}
    for r in records:
        k = r["config"]["task"] + "|" + str(sorted((r["config"].get("task_options") or {}).items()))
        by_task.setdefault(k, []).append(r)
    all_verdicts = []
    for i, runs in enumerate(by_task.values()):
        td = _TaskData(runs, varied_fields([r["config"] for r in runs]), hints)
        key = f"t{i}_{runs[0]['config']['task']}"
        for row in _task_section(doc, td, key):
            all_verdicts.append([td.task["name"]] + row)
    for name in hints.get("analyses") or []:  # sections a preset asks for (recnorm.experiments.analyses)
        from recnorm.experiments.analyses import run_analysis

        all_verdicts.extend(run_analysis(name, doc, records, hints))
    return doc, all_verdicts


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
