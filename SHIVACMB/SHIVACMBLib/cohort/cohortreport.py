"""``<OUT>/report.html`` of ``shivacmb batch``: one self-contained QC page for a whole cohort.

A header with the cohort's numbers, distribution plots (matplotlib, embedded as PNG data URIs;
left out with a note when matplotlib is missing) and one table row per scan, linked to that
scan's own QC page (``report.py``). No network, no per-scan images; a small inline script
sorts the table on a header click, and the page reads the same without it.
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

import numpy as np

from .. import __version__
from ..files import atomic_write_text
from ..mars import AREAS, SIDES, UNKNOWN
from ..report import _STYLE, _rows

# Most bars of the count histogram: above it, counts share bins (zero keeps its own) and a long tail one last bar.
MAX_COUNT_BINS = 40
FIGURE_INCHES = (5.5, 3.6)
_SIDE_COLOURS = {"left": "#4e79a7", "right": "#e15759", "midline": "#59a14f"}
_COHORT_STYLE = """
body{max-width:1400px}
.plots img{max-width:100%;margin:0 1em 1em 0;vertical-align:top;border:1px solid #ddd}
table.scans th{position:sticky;top:0;cursor:pointer}table.scans td{white-space:nowrap}
table.scans td.error{white-space:normal;min-width:12em}
table.scans th.asc::after{content:"\\00a0\\25B2"}table.scans th.desc::after{content:"\\00a0\\25BC"}
tr.failed td{background:#fde8e8}tr.failed td.status{color:#a00000;font-weight:bold}
"""
# Sorts the scan table on a header click: numbers by data-v, text by natural order, empty cells last.
_SORT_SCRIPT = """
document.querySelectorAll("table.scans th").forEach(function (th, col) {
  th.title = "click to sort";
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var dir = th.classList.contains("desc") ? 1 : -1;
    table.querySelectorAll("th").forEach(function (h) { h.classList.remove("asc", "desc"); });
    th.classList.add(dir > 0 ? "asc" : "desc");
    var key = function (row) {
      var cell = row.cells[col];
      return cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent.trim();
    };
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === "" || y === "") { return (x === "") - (y === ""); }
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y, undefined, {numeric: true}) : nx - ny;
      return dir * c;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def write_cohort_report(path: Path, summary: Sequence[Dict[str, str]], findings: Sequence[Dict[str, str]],
                        title: str = "SHIVA-CMB cohort report") -> None:
    """Write the cohort QC page; ``summary`` and ``findings`` are the rows of ``cohort_summary.tsv`` and
    ``cohort_findings.tsv`` as read back (strings), ``report`` and ``output`` relative to ``path``'s folder."""
    done = [row for row in summary if row.get("status") == "done"]
    if done:
        plots = _plots(done, findings)
    else:
        plots = "<p>No scan was processed: no plot.</p>" if summary else ""
    body = (f"<h1>{html.escape(title)}</h1>{_header(summary, done)}"
            + (f"<h2>Distribution</h2>{plots}<h2>Scans</h2>{_table(summary)}" if summary
               else "<p>No scan in this cohort.</p>"))
    atomic_write_text(path, f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                            f"<style>{_STYLE}{_COHORT_STYLE}</style></head><body>{body}"
                            f"<p><small>shivacmb {html.escape(__version__)}</small></p>"
                            f"<script>{_SORT_SCRIPT}</script></body></html>\n")


def _number(text: Optional[str]) -> Optional[float]:
    """The value of a TSV cell, or None when it is empty or not a number (``n/a``)."""
    try:
        value = float(text or "")
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _count(row: Dict[str, str], column: str) -> int:
    return int(_number(row.get(column)) or 0)


def _area_total(row: Dict[str, str], area: str) -> int:
    return sum(_count(row, f"{area}_{side}") for side in SIDES)


def _seen(rows: Sequence[Dict[str, str]], *columns: str) -> str:
    """Distinct non-empty values of ``columns`` joined, each with its number of scans."""
    seen = Counter(" ".join(row.get(c, "") for c in columns).strip() for row in rows)
    seen.pop("", None)
    return ", ".join(f"{value} ({n} scans)" for value, n in seen.most_common()) or "none"


def _header(summary: Sequence[Dict[str, str]], done: Sequence[Dict[str, str]]) -> str:
    counts = [_count(row, "cmb_count") for row in done]
    failed = len(summary) - len(done)
    scans = f"{len(summary)}: {len(done)} done, {failed} failed"
    pairs = [["Scans", scans + (" (highlighted, at the end of the table)" if failed else "")]]
    if counts:
        pairs += [["CMBs", f"{sum(counts)} in all; {sum(1 for n in counts if n)} scans with at least one"],
                  ["CMBs per scan", f"median {statistics.median(counts):g}, maximum {max(counts)}"]]
    pairs += [["Models", _seen(summary, "model", "model_version")], ["Ran on", _seen(summary, "provider")],
              ["Generated", datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")]]
    return f"<table>{_rows(pairs)}</table>"


def _table(summary: Sequence[Dict[str, str]]) -> str:
    """One row per scan, by CMB count descending (failed scans, without a count, last)."""
    heads = ("scan", "status", "CMBs", *AREAS, "volume mm&sup3;", "Boston", "time s", "provider", "error")

    def key(row: Dict[str, str]) -> Tuple[bool, float, str]:
        count = _number(row.get("cmb_count"))
        return count is None, -(count or 0), row.get("scan_id", "")

    order = sorted(summary, key=key)
    cells = "".join(f"<th class=desc>{h}</th>" if h == "CMBs" else f"<th>{h}</th>" for h in heads)
    return (f"<table class='scans'><thead><tr>{cells}</tr></thead>"
            f"<tbody>{''.join(_table_row(row) for row in order)}</tbody></table>")


def _table_row(row: Dict[str, str]) -> str:
    scan_id = html.escape(row.get("scan_id", ""))
    report = row.get("report", "")
    link = f"<a href='{html.escape(quote(report, safe='/'))}'>{scan_id}</a>" if report else scan_id
    failed = row.get("status") != "done"
    provider = row.get("provider", "").replace("ExecutionProvider", "")  # CPU, CUDA, TensorRT, ...

    def num(value: Optional[float], digits: int = 0) -> str:
        text = "" if value is None else f"{value:.{digits}f}"
        return f"<td class=num data-v='{text}'>{text}</td>"

    areas = "".join(num(None if failed else _area_total(row, area)) for area in AREAS)
    return (f"<tr{' class=failed' if failed else ''}><td>{link}</td>"
            f"<td class=status>{html.escape(row.get('status', ''))}</td>{num(_number(row.get('cmb_count')))}"
            f"{areas}{num(_number(row.get('total_volume_mm3')), 1)}"
            f"<td>{html.escape(row.get('boston', '').replace('_', ' '))}</td>"
            f"{num(_number(row.get('seconds_total')), 1)}<td>{html.escape(provider)}</td>"
            f"<td class=error>{html.escape(row.get('error', ''))}</td></tr>")


def _plots(done: Sequence[Dict[str, str]], findings: Sequence[Dict[str, str]]) -> str:
    """The distribution figures as inline PNGs, or a note when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return "<p class='note'>Plots need matplotlib: <code>pip install matplotlib</code>.</p>"
    volumes = [v for row in findings if row.get("status") != "rejected"
               for v in [_number(row.get("volume_mm3"))] if v is not None]
    figures = [_count_histogram(plt, MaxNLocator, [_count(row, "cmb_count") for row in done]),
               _area_bars(plt, MaxNLocator, done)]
    if volumes:
        figures.append(_volume_histogram(plt, MaxNLocator, volumes))
    images = []
    for figure, alt in figures:
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        images.append(f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>")
    return f"<div class='plots'>{''.join(images)}</div>"


def _count_histogram(plt: Any, locator: Any, counts: List[int]) -> Tuple[Any, str]:
    """Scans per CMB count: zero a bar of its own, then one bar per count (bins of several above
    ``MAX_COUNT_BINS``); counts beyond the 95th percentile of a long tail share one last bar."""
    top = max(counts)
    shown = top if top <= MAX_COUNT_BINS else max(MAX_COUNT_BINS // 4, math.ceil(np.percentile(counts, 95)))
    width = max(1, math.ceil(shown / MAX_COUNT_BINS))
    edges = np.concatenate(([-0.5], np.arange(0.5, shown + width, width)))
    scans, _ = np.histogram(counts, bins=edges)
    figure, axes = plt.subplots(figsize=FIGURE_INCHES, dpi=100)
    axes.bar(edges[:-1], scans, width=np.diff(edges), align="edge", color="#4e79a7", edgecolor="white")
    end = max(edges[-1], 10.5)
    ticks = [t for t in locator(integer=True).tick_values(0, end - 0.5) if 0 <= t <= end - 0.5]
    labels = [f"{t:g}" for t in ticks]
    tail = sum(1 for n in counts if n > edges[-1])
    if tail:
        at = end + width
        axes.bar([at], [tail], width=width, color="#f28e2b", edgecolor="white")
        axes.annotate(f"max {top}", (at, tail), ha="center", va="bottom", xytext=(0, 2), textcoords="offset points")
        ticks, labels, end = ticks + [at], labels + [f">{edges[-1] - 0.5:g}"], at + width
    axes.set_xlim(-0.5, end)
    axes.set_xticks(ticks)
    axes.set_xticklabels(labels)
    axes.yaxis.set_major_locator(locator(integer=True))
    axes.set_ylim(0, max(scans.max(), tail) * 1.15)
    axes.set_xlabel("CMBs in the scan" + (f" (bins of {width} above 0)" if width > 1 else ""))
    axes.set_ylabel("scans")
    axes.set_title(f"CMB count per scan ({len(counts)} scans)")
    return figure, "histogram of the CMB count per scan"


def _area_bars(plt: Any, locator: Any, done: Sequence[Dict[str, str]]) -> Tuple[Any, str]:
    """CMBs per MARS area, stacked by side; location unknown as one grey bar."""
    figure, axes = plt.subplots(figsize=FIGURE_INCHES, dpi=100)
    names = [*AREAS, UNKNOWN]
    bottom = [0] * len(names)
    for side in SIDES:
        heights = [sum(_count(row, f"{area}_{side}") for row in done) for area in AREAS] + [0]
        axes.bar(names, heights, bottom=bottom, label=side, color=_SIDE_COLOURS[side])
        bottom = [b + h for b, h in zip(bottom, heights)]
    unknown = sum(_count(row, "location_unknown") for row in done)
    axes.bar([UNKNOWN], [unknown], color="#999999")
    bottom[-1] = unknown
    for x, total in enumerate(bottom):
        axes.annotate(str(total), (x, total), ha="center", va="bottom", xytext=(0, 2), textcoords="offset points")
    axes.set_ylim(0, max(1, max(bottom)) * 1.4)  # headroom: the legend sits in one row above the bars
    axes.yaxis.set_major_locator(locator(integer=True))
    if any(bottom):
        axes.legend(title="side", loc="upper center", ncol=len(SIDES), fontsize=8)
    else:
        axes.text(0.5, 0.6, "no CMB in this cohort", transform=axes.transAxes, ha="center", fontsize=12)
    axes.set_ylabel("CMBs")
    axes.set_title("CMBs per MARS area")
    return figure, "bars of CMBs per MARS area and side"


def _volume_histogram(plt: Any, locator: Any, volumes: List[float]) -> Tuple[Any, str]:
    figure, axes = plt.subplots(figsize=FIGURE_INCHES, dpi=100)
    axes.hist(volumes, bins=min(30, max(5, len(volumes) // 5)), color="#76b7b2", edgecolor="white")
    axes.yaxis.set_major_locator(locator(integer=True))
    axes.set_xlabel("CMB volume (mm\N{SUPERSCRIPT THREE})")
    axes.set_ylabel("CMBs")
    axes.set_title(f"CMB volume ({len(volumes)} CMBs)")
    return figure, "histogram of CMB volumes"
