"""The document writer: blocks (headings, paragraphs, tables, figures) rendered as Markdown and as
self-contained HTML, the number formats every page uses, and the verdicts' colour-coded words.

Numbers: :func:`fmt` gives three decimals below 10, one decimal below 1000 and scientific notation
otherwise, so values of one magnitude line up; :func:`mean_sd` writes a mean and its standard deviation with
the same number of decimals (``1.100 ± 0.024``, never ``1.1 ± 0.024``); :func:`signed` adds the sign.

Verdicts: :func:`badge` writes a verdict as an icon and a bold word (``**✔ supported**``); the HTML
renderer colours it by its icon (green, red, blue, grey), so a verdict reads the same in colour and without.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from typing import Any, List, Optional, Sequence, Tuple

from recnorm.experiments.results import summary

__all__ = ["Document", "fmt", "pvalue", "signed", "mean_sd", "badge", "seed_list", "VERDICT_WORDS"]

#: Each verdict's icon, word and HTML colour.
VERDICT_WORDS = {
    "supported": ("✔", "supported", "#1a7f37"),
    "opposite": ("✘", "the opposite holds", "#c0392b"),
    "equivalent": ("=", "equivalent within the margin", "#1f5fbf"),
    "inconclusive": ("?", "inconclusive", "#6e6e6e"),
    "insufficient": ("–", "not enough data", "#6e6e6e"),
    "not tested": ("∅", "not tested", "#6e6e6e"),
}
_COLOUR_BY_ICON = {icon: colour for icon, _, colour in VERDICT_WORDS.values()}


def badge(verdict: str, note: str = "") -> str:
    """A verdict (a key of :data:`VERDICT_WORDS`) as ``**icon word**`` with an optional note inside."""
    icon, word, _ = VERDICT_WORDS[verdict]
    return f"**{icon} {word}{': ' + note if note else ''}**"


def fmt(v: Optional[float], decimals: Optional[int] = None) -> str:
    """A number: 3 decimals below 10, 1 below 1000, else scientific; ``decimals`` forces a count."""
    if v is None:
        return "–"
    if decimals is not None:
        return f"{v:.{decimals}f}"
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def pvalue(p: Optional[float]) -> str:
    """A p-value: three decimals, ``<0.001`` below that."""
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def signed(v: Optional[float]) -> str:
    if v is None:
        return "–"
    if abs(v) < 1e-12:  # a difference of equal values, up to rounding
        return "0"
    text = fmt(v)
    return text if text.startswith("-") else "+" + text


def _decimals(v: float) -> Optional[int]:
    if v == 0 or abs(v) >= 1000 or abs(v) < 1e-3:
        return None
    return 3 if abs(v) < 10 else 1


def mean_sd(values: Sequence[Optional[float]], failed: str = "failed") -> str:
    """``mean ± sd`` over the values (None: a failed run, counted and named), both with the decimals of
    the mean."""
    s = summary(values)
    if not s["n"]:
        return "–"
    d = _decimals(s["mean"])
    sd = s["std"] or 0.0
    text = f"{fmt(s['mean'], d)} ± {fmt(sd, d) if d is not None else fmt(sd)}"
    return text + (f" ({s['n_missing']} {failed})" if s["n_missing"] else "")


def seed_list(seeds: Sequence[int]) -> str:
    """Seeds named as such: ``"5 seeds (0-4)"``, ``"3 seeds (0, 2, 7)"``."""
    seeds = sorted(seeds)
    if not seeds:
        return "no seeds"
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{len(seeds)} seeds ({seeds[0]}-{seeds[-1]})"
    return f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(str(s) for s in seeds)})"


class Document:
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

    def table(self, headers: List[str], rows: List[List[Any]], fold: Optional[str] = None,
              fold_over: Optional[int] = None) -> None:
        """A table; with ``fold`` (a summary line) and more than ``fold_over`` rows (default
        :attr:`FOLD_ROWS`; 0 folds it whatever its length, say a wide table beside its figure), a folded one
        (``<details>``, in HTML and in Markdown alike) that the reader opens by its summary."""
        limit = self.FOLD_ROWS if fold_over is None else fold_over
        folded = fold if fold is not None and len(rows) > limit else None
        self.blocks.append(("table", headers, [[str(c) for c in row] for row in rows], folded))

    #: the most rows a table that may fold shows unfolded
    FOLD_ROWS = 24

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
                headers, rows, fold = b[1], b[2], b[3]
                if fold:  # GitHub renders Markdown inside <details> when blank lines surround it
                    out.append(f"<details><summary>{html.escape(fold, quote=False)}</summary>\n")
                out.append("| " + " | ".join(_esc(h) for h in headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                out.extend("| " + " | ".join(_esc(c) for c in row) + " |" for row in rows)
                if fold:
                    out.append("\n</details>")
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
                 "figcaption{font-size:0.85em;color:#444}summary{cursor:pointer;color:#225;margin:0.5em 0}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{inline_html(b[1])}</p>")
            elif b[0] == "table":
                if b[3]:
                    parts.append(f"<details><summary>{e(b[3])}</summary>")
                parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>")
                for row in b[2]:
                    parts.append("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in row) + "</tr>")
                parts.append("</table>")
                if b[3]:
                    parts.append("</details>")
            elif b[0] == "img":
                parts.append(f"<figure><img alt='{e(b[3])}' src='data:image/png;base64,{b[2]}'>"
                             f"<figcaption>{e(b[3])}</figcaption></figure>")
        parts.append("</body></html>")
        return "\n".join(parts)


def _esc(s: str) -> str:
    return s.replace("|", "\\|")


def _coloured(match: "re.Match[str]") -> str:
    body = match.group(1)
    colour = _COLOUR_BY_ICON.get(body[:1])
    style = f" style='color:{colour}'" if colour and body[1:2] == " " else ""
    return f"<b{style}>{body}</b>"


def inline_html(text: str) -> str:
    """Escape, then render **bold** (a verdict badge in its colour), *italic* and `code` (the only inline
    Markdown the pages use)."""
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", _coloured, s)
    s = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<i>\1</i>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    return s
