"""The report's figures: one function per plot, each drawing from records (or a task's grouped runs) into
a :class:`~recnorm.experiments.document.Document`. matplotlib is imported only when a plot is drawn.

The functions that take ``td`` read a task's grouped runs through the few attributes the report's task data
has (``records``, ``labels``, ``metric``, ``task``, ``runs(label, context)``, ``contexts()``,
``context_name(context)``, ``reference``, ``target``, ``chance``, ``structures()``, ``reference_in(s)``).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from recnorm.experiments.document import fmt
from recnorm.experiments.results import summary

__all__ = ["pyplot", "colors", "legend_above", "learning_curves", "sensitivity", "depth", "grad_flow", "batch_stats",
           "batch_sizes"]


def _final_test(r: Dict[str, Any]) -> Optional[float]:
    return ((r.get("final") or {}).get("test") or {}).get(r.get("metric"))


# Type sizes of the figures: they are shown about 1100 pixels wide, scaled down from 90 dpi.
_STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 11,
          "xtick.labelsize": 10, "ytick.labelsize": 10}


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(_STYLE)
    return plt


def legend_above(fig: Any, axes: Sequence[Any], title: Optional[str] = None) -> None:
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


def log_scale(ax: Any) -> None:
    """A log y axis where the panel has a positive value to show (a panel of diverged runs has none, and
    matplotlib refuses to lay out a log axis without one)."""
    if any(math.isfinite(y) and y > 0 for line in ax.get_lines() for y in line.get_ydata() if y is not None):
        ax.set_yscale("log")


def colors(labels: List[str]) -> Dict[str, Any]:
    plt = pyplot()
    cmap = plt.get_cmap("tab10")
    out, i = {}, 0
    for label in labels:
        if label == "none":
            out[label] = "black"
        else:
            out[label] = cmap(i % 10)
            i += 1
    return out


def mean_band(curves: List[Tuple[List[float], List[Optional[float]]]]
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


def smooth(values: List[Optional[float]], window: int) -> List[Optional[float]]:
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


def learning_curves(doc: Any, td: Any, key: str) -> None:
    plt = pyplot()
    contexts = td.contexts()[:6]
    palette = colors(td.labels)
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
            x, m, lo, hi = mean_band(curves)
            ax = axes[0][j]
            ax.plot(x, m, color=palette[label], label=label)
            ax.fill_between(x, lo, hi, color=palette[label], alpha=0.2)
            window = max(1, max(len(r["train"]["loss"]) for r in runs) // 40)
            tcurves = [(r["train"]["step"], smooth(r["train"]["loss"], window)) for r in runs]
            x, m, lo, hi = mean_band(tcurves)
            ax = axes[1][j]
            ax.plot(x, m, color=palette[label], label=label)
            ax.fill_between(x, lo, hi, color=palette[label], alpha=0.2)
        axes[0][j].set_title(td.context_name(ctx) + (f"\ndiverged: {', '.join(diverged)}" if diverged else ""))
        axes[0][j].set_xlabel("step")
        axes[0][j].set_ylabel(f"valid {td.metric}")
        if td.target is not None:
            axes[0][j].axhline(td.target, color="grey", lw=0.8, ls=":")
        axes[1][j].set_xlabel("step")
        axes[1][j].set_ylabel("train loss (smoothed)")
        log_scale(axes[1][j])
    fig.tight_layout()
    legend_above(fig, axes[0])
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
            ax.plot(r["valid"]["time"], r["valid"].get(td.metric, []), color=palette[label], alpha=0.7,
                    label=label if i == 0 else None)
    ax.set_xlabel("training seconds (1 thread)")
    ax.set_ylabel(f"valid {td.metric}")
    ax.set_title(td.context_name(td.reference))
    ax.legend(fontsize=9)
    fig.tight_layout()
    doc.figure(fig, f"{key}_curves_time", f"{td.task['name']}: validation {td.metric} against wall-clock "
                                          f"training time, one line per seed ({td.context_name(td.reference)})")


def _mean_sd_line(ax: Any, runs: List[Dict[str, Any]], field: str, **style: Any) -> None:
    """Final test metric (mean ± std over seeds) of ``runs`` against their config value ``field``; values
    whose runs all diverged are left out."""
    xs, ms, sds = [], [], []
    for value in sorted({r["config"][field] for r in runs}):
        s = summary([_final_test(r) for r in runs if r["config"][field] == value])
        if s["n"]:
            xs.append(value)
            ms.append(s["mean"])
            sds.append(s["std"])
    if xs:
        ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, **style)


def sensitivity(doc: Any, td: Any, key: str) -> None:
    plt = pyplot()
    schemes = sorted({r["config"]["init"] for r in td.records})
    palette = colors(td.labels)
    fig, axes = plt.subplots(1, len(schemes), figsize=(5 * len(schemes), 3.8), squeeze=False)
    for j, scheme in enumerate(schemes):
        ax = axes[0][j]
        for label in td.labels:
            runs = [r for r in td.runs(label) if r["config"]["init"] == scheme]
            _mean_sd_line(ax, runs, "init_gain", color=palette[label], label=label)
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
    legend_above(fig, axes[0])
    doc.figure(fig, f"{key}_init", f"{td.task['name']}: final test {td.metric} against the init gain "
                                   f"(mean ± std over seeds; diverged runs omitted); dotted line = chance")


def depth(doc: Any, td: Any, key: str) -> None:
    plt = pyplot()
    palette = colors(td.labels)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in td.labels:
        _mean_sd_line(ax, td.runs(label), "num_layers", color=palette[label], label=label)
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


def grad_flow(doc: Any, td: Any, key: str) -> List[List[str]]:
    """One row of panels (at init, end of training) per structural setting and shown layer (the first and
    the last); returns table rows (setting, norm, when, first, last, ratio) for the first layer."""
    plt = pyplot()
    palette = colors(td.labels)
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
                ax.plot(xs, ys, color=palette[label], label=label)
                if first_layer and ys:
                    rows.append([td.context_name(ctx), label, which, fmt(ys[0]), fmt(ys[-1]),
                                 fmt(ys[0] / ys[-1] if ys[-1] else None)])
            log_scale(ax)
            ax.set_xlabel("time step t")
            ax.set_ylabel("||dL/dh_t||")
            ax.set_title(f"{td.context_name(ctx)}: {layer}, {'at init' if which == 'init' else 'end of training'}")
    fig.tight_layout()
    legend_above(fig, [ax for row in axes for ax in row])
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


def batch_stats(doc: Any, td: Any, key: str) -> bool:
    plt = pyplot()
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
    legend_above(fig, [ax for row in axes for ax in row])
    doc.figure(fig, f"{key}_bnstats", f"{td.task['name']}: per-step batch statistics (feature average of mean and "
                                      f"variance) at init and end of training, against the population statistics "
                                      f"(running average and exact recomputation); one seed per normalization")
    return True




def batch_sizes(doc: Any, records: Sequence[Dict[str, Any]], sizes: List[int], labels: List[str],
                sources: Sequence[Tuple[str, str]], final: Any, select: Any) -> None:
    """Final test metric against the training batch size per norm, and, for each batch norm, by the
    statistics used at evaluation (``sources``: ``(final split key, title)``)."""
    plt = pyplot()
    metric = records[0]["metric"]
    bn = [lab for lab in labels if any("test_ema" in (r.get("final") or {}) for r in select(records, label=lab))]
    fig, axes = plt.subplots(1, 1 + len(bn), figsize=(4.4 * (1 + len(bn)), 3.6), squeeze=False)
    panels = [(axes[0][0], [(lab, lab, "test") for lab in labels], None)]
    panels += [(axes[0][j], [(lab, title, key) for key, title in sources], f"{lab}: statistics at evaluation")
               for j, lab in enumerate(bn, start=1)]
    for ax, lines, title in panels:
        for lab, line_label, key in lines:
            means = [summary([final(r, key) for r in select(records, label=lab, batch_size=b)])["mean"] for b in sizes]
            ax.plot(sizes, means, marker="o", label=line_label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(b) for b in sizes])
        ax.set_xlabel("training batch size")
        if title:
            ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7 if title is None else 6)
    axes[0][0].set_ylabel(f"final test {metric}")
    fig.tight_layout()
    doc.figure(fig, "analysis_batch_size", f"final test {metric} against the training batch size (mean over "
                                           f"seeds), and for each batch norm by the statistics used at evaluation")
