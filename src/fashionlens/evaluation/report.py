"""Reports of an evaluation: the summary as JSON, a hit-rate plot, and a browsable HTML page.

All three take the dict made by :meth:`fashionlens.evaluation.MetricAccumulator.summary`.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from urllib.parse import quote

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fashionlens.data.images import ImageError, open_image
from fashionlens.evaluation.metrics import OVERALL


def write_json(summary: dict, path: Path) -> None:
    """Write ``summary`` to ``path`` as indented JSON (creating the parent folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def plot_hit_rate(
    summary: dict, path: Path, title: str = "Top-k hit rate", max_categories: int = 12
) -> None:
    """Save a PNG of hit rate against k: one line per category and a thick "overall" line.

    Only the ``max_categories`` categories with the most queries get a line, so the legend stays
    readable for catalogs with many article types. Drawn without pyplot (no display needed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ks = list(summary["ks"])
    cats = [(n, c) for n, c in summary["per_category"].items() if c["n_queries"]]
    cats.sort(key=lambda nc: (-nc[1]["n_queries"], nc[0]))
    shown, hidden = cats[:max_categories], len(cats) - min(len(cats), max_categories)

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, cat in shown:
        ys = [cat["hit_rate"][str(k)] for k in ks]
        ax.plot(ks, ys, marker="o", linewidth=1.2, alpha=0.8, label=f"{name} ({cat['n_queries']})")
    overall = summary[OVERALL]
    if overall["n_queries"] and ks:
        ys = [overall["hit_rate"][str(k)] for k in ks]
        ax.plot(ks, ys, marker="o", color="black", linewidth=3.5,
                label=f"overall ({overall['n_queries']})", zorder=5)
    if not ks or not overall["n_queries"]:
        ax.text(0.5, 0.5, "no queries with a relevant item", ha="center", va="center",
                transform=ax.transAxes)
    if ks:
        ax.set_xticks(ks)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k (number of results looked at)")
    ax.set_ylabel("hit rate (share of queries with a match in the top k)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        legend_title = f"{hidden} smaller categories not shown" if hidden else None
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5),
                  title=legend_title, title_fontsize="x-small")
    fig.savefig(path, format="png", bbox_inches="tight")


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table.sum{border-collapse:collapse;margin-bottom:1em}
table.sum td,table.sum th{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.sum td:first-child,table.sum th:first-child{text-align:left}
tr.overall{font-weight:bold}
.q{display:flex;flex-wrap:wrap;align-items:flex-start;gap:6px;padding:8px 0;border-top:1px solid #ddd}
.card{width:{T}px;font-size:11px;text-align:center;word-wrap:break-word}
.card .im{width:{T}px;height:{T}px;display:flex;align-items:center;justify-content:center;
 border:3px solid #bbb;box-sizing:content-box;background:#f6f6f6;position:relative}
.card img{max-width:{T}px;max-height:{T}px}
.query .im{border-color:#36c}
.hit .im{border-color:#2a2}
.miss .im{border-color:#c99}
.mark{position:absolute;top:1px;right:3px;font-weight:bold;font-size:15px}
.hit .mark{color:#2a2}
.miss .mark{color:#b55}
.ph{color:#999;font-size:10px;padding:4px}
.note{color:#666}
"""


class HtmlReport:
    """One self-contained HTML page of ranked results, written query by query.

    Thumbnails go to ``<stem>_thumbs/`` next to the page as small JPEGs and are referenced by
    relative paths, so the page opens offline and stays small. Only the first ``max_queries``
    queries are rendered (their rows are the only thing held in memory); the rest are counted.
    An image that cannot be read becomes a placeholder box. Call :meth:`close` with the summary
    to write the page.
    """

    def __init__(self, path: Path, title: str, thumb_size: int = 96, max_queries: int = 200):
        self.path = Path(path)
        self.title = title
        self.thumb_size = int(thumb_size)
        self.max_queries = int(max_queries)
        self.thumb_dir = self.path.parent / f"{self.path.stem}_thumbs"
        self.thumb_dir.mkdir(parents=True, exist_ok=True)
        for old in self.thumb_dir.glob("t[0-9]*.jpg"):  # leftovers of an earlier run
            old.unlink()
        self._rows: list[str] = []
        self._n_queries = 0
        self._thumbs: dict[str, str | None] = {}  # source path -> thumbnail file name or None
        self._closed = False

    def _thumb(self, source: Path | None) -> str:
        """HTML for the thumbnail of ``source``: an <img>, or a placeholder box."""
        if source is None:
            return '<div class="ph">no image</div>'
        key = os.path.abspath(source)
        if key not in self._thumbs:
            name = f"t{len(self._thumbs):06d}.jpg"
            try:
                img = open_image(Path(source), draft_size=self.thumb_size)
                img.thumbnail((self.thumb_size, self.thumb_size))
                img.convert("RGB").save(self.thumb_dir / name, "JPEG", quality=80)
                self._thumbs[key] = name
            except ImageError:
                self._thumbs[key] = None
        name = self._thumbs[key]
        if name is None:
            tip = html.escape(f"cannot open {source}")
            return f'<div class="ph" title="{tip}">image unavailable</div>'
        src = html.escape(f"{quote(self.thumb_dir.name)}/{name}")
        return f'<img src="{src}" alt="" loading="lazy">'

    def add(self, query_path: Path | None, query_label: str, results: list[dict]) -> None:
        """Add one query: its image and label, then its ranked results.

        Each result is a dict with ``id``, ``path`` (image file or None), ``score`` (float),
        ``hit`` (bool) and ``label`` (short text, e.g. the articleType).
        """
        if self._closed:
            raise RuntimeError("HtmlReport is closed")
        self._n_queries += 1
        if self._n_queries > self.max_queries:
            return
        esc = html.escape
        qname = Path(query_path).name if query_path is not None else ""
        cells = [
            f'<div class="card query"><div class="im">{self._thumb(query_path)}</div>'
            f"<b>query</b><br>{esc(str(query_label))}<br>{esc(qname)}</div>"
        ]
        for rank, r in enumerate(results, start=1):
            hit = bool(r.get("hit"))
            mark = "&#10003;" if hit else "&#10007;"
            score = r.get("score")
            score_text = f"{float(score):.3f}" if score is not None else ""
            cells.append(
                f'<div class="card {"hit" if hit else "miss"}" title="id {esc(str(r.get("id")))}">'
                f'<div class="im">{self._thumb(r.get("path"))}<span class="mark">{mark}</span>'
                f"</div>#{rank} {score_text}<br>{esc(str(r.get('label', '')))}</div>"
            )
        self._rows.append(f'<div class="q">{"".join(cells)}</div>')

    def _summary_table(self, summary: dict) -> str:
        ks = summary["ks"]
        head = "".join(f"<th>hit@{k}</th>" for k in ks)
        rows = [f"<tr><th>group</th><th>queries</th><th>no relevant</th>{head}</tr>"]

        def row(name: str, group: dict, n: object, skipped: object, cls: str = "") -> str:
            rates = [group["hit_rate"][str(k)] for k in ks]
            vals = "".join(f"<td>{'' if v is None else f'{v:.3f}'}</td>" for v in rates)
            return (f'<tr class="{cls}"><td>{html.escape(name)}</td><td>{n}</td>'
                    f"<td>{skipped}</td>{vals}</tr>")

        ov = summary[OVERALL]
        rows.append(row("overall", ov, ov["n_queries"], ov["n_without_relevant"], "overall"))
        if "macro" in summary:
            mac = summary["macro"]
            rows.append(row(f"macro mean ({mac['n_categories']} categories)", mac, "", ""))
        for name, cat in summary["per_category"].items():
            rows.append(row(name, cat, cat["n_queries"], cat["n_without_relevant"]))
        return f'<table class="sum">{"".join(rows)}</table>'

    def close(self, summary: dict) -> None:
        """Write the page: the summary table, then one row per shown query."""
        if self._closed:
            raise RuntimeError("HtmlReport is already closed")
        self._closed = True
        shown = min(self._n_queries, self.max_queries)
        note = f"Showing {shown} of {self._n_queries} queries."
        if self._n_queries > shown:
            note += f" {self._n_queries - shown} more queries not shown (max_queries={self.max_queries})."
        css = _CSS.replace("{T}", str(self.thumb_size))
        title = html.escape(self.title)
        page = (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{title}</title><style>{css}</style></head><body>\n"
            f"<h1>{title}</h1>\n{self._summary_table(summary)}\n"
            f'<p class="note">{html.escape(note)} Green border and &#10003;: relevant result; '
            f"grey/red border and &#10007;: not relevant.</p>\n"
            + "\n".join(self._rows)
            + "\n</body></html>\n"
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(self.path)
        self._rows = []
