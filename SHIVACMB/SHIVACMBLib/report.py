"""``report.html``: a self-contained QC page for one scan (no network, no scripts).

For every CMB, three thumbnails centred on its centroid (axial, coronal, sagittal, in
radiological convention: the patient's right on the image's left), 40 mm across at
0.5 mm per pixel, resampled from the scan's own grid, with the CMB's native voxels outlined.
"""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .findings import Finding
from .geometry import LPS_RAS, Geometry, resample
from .location import count_locations
from .mars import AREAS, SIDES, UNKNOWN
from .runrecord import NOT_LOCATED, RunRecord

THUMB_MM = 40.0
THUMB_PIXEL_MM = 0.5
MAX_THUMBNAILS = 200
# In-plane axes (screen right, screen down) in RAS for each view, radiological convention.
VIEWS = {
    "axial": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "coronal": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, -1.0, 0.0), (0.0, 0.0, -1.0)),
}
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f0f0f0}.num{text-align:right}.warn{background:#fff4e0;border:1px solid #e0a030;padding:.5em 1em}
.note{background:#eef4ff;border:1px solid #8aa8e0;padding:.5em 1em}
.cmb{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
.cmb img{width:160px;height:160px;image-rendering:pixelated;margin-right:2px;background:#000}
.cmb .cap{font-size:.85em}
"""


def write_report(path: Path, scan_image: sitk.Image, labels: np.ndarray, findings: Sequence[Finding],
                 run: RunRecord) -> None:
    """Write the QC page for one scan; ``labels`` is the native label map ``[k, j, i]``."""
    grid = Geometry.of(scan_image)
    label_image = grid.with_image(labels)
    window = _display_window(scan_image)
    cards = []
    with tempfile.TemporaryDirectory() as scratch:
        for f in list(findings)[:MAX_THUMBNAILS]:
            images = _strip(f"CMB {f.cmb_id}", scan_image, label_image, f.cmb_id, f.ras, window, Path(scratch))
            cards.append(f'<div class="cmb" id="cmb-{f.cmb_id}">{images}<div class="cap">CMB {f.cmb_id}: '
                         f'R {f.r:.1f} A {f.a:.1f} S {f.s:.1f} mm, {f.volume_mm3:.1f} mm&sup3;</div></div>')
    Path(path).write_text(_page(run, findings, cards), encoding="utf-8")


def write_comparison_report(path: Path, baseline: sitk.Image, followup: sitk.Image, followup_labels: np.ndarray,
                            rows: Sequence[Any], transform: sitk.Transform, summary: Dict[str, Any]) -> None:
    """The QC page of a follow-up comparison (``longitudinal.compare``): summary, every CMB's status, and each
    new CMB side by side at baseline and follow-up, both sampled on the same baseline-space planes
    (``transform`` maps baseline to follow-up points), the new CMB outlined on the follow-up.

    ``rows`` are ``longitudinal.Match`` records.
    """
    labels = Geometry.of(followup).with_image(followup_labels)
    windows = _display_window(baseline), _display_window(followup)
    new = [m for m in rows if m.status == "new"]
    cards = []
    with tempfile.TemporaryDirectory() as scratch:
        for m in new[:MAX_THUMBNAILS]:
            strips = []
            for when, image, label_image, window, moved in (("baseline", baseline, None, windows[0], None),
                                                             ("follow-up", followup, labels, windows[1], transform)):
                strips.append(_strip(f"new CMB {m.followup.cmb_id} at {when}", image, label_image,
                                     m.followup.cmb_id, m.baseline_ras, window, Path(scratch), moved) + f" {when}")
            r, a, s_ = m.followup_ras
            cards.append(f'<div class="cmb" id="new-{m.followup.cmb_id}">{"<br>".join(strips)}<div class="cap">'
                         f'new CMB {m.followup.cmb_id}: follow-up R {r:.1f} A {a:.1f} S {s_:.1f} mm, '
                         f'{m.followup.volume_mm3:.1f} mm&sup3;</div></div>')
    Path(path).write_text(_comparison_page(summary, rows, cards, len(new)), encoding="utf-8")


def _comparison_page(summary: Dict[str, Any], rows: Sequence[Any], cards: List[str], n_new: int) -> str:
    registration, counts, grade = summary["registration"], summary["counts"], summary["aria_h"]
    table = _rows([
        ["Baseline", f"{summary['baseline']['path']} ({summary['baseline']['cmb_count']} CMBs)"],
        ["Follow-up", f"{summary['followup']['path']} ({summary['followup']['cmb_count']} CMBs)"],
        ["Registration", f"{registration['kind']}, brain-mask Dice {registration['mask_dice']:.3f} "
                         f"(minimum {registration['min_mask_dice']}), mutual information "
                         f"{registration['mutual_information']:.3f}, {registration['seconds']:.1f} s"],
        ["Matching tolerance", f"{summary['matching']['tolerance_mm']:g} mm"],
        ["CMBs", ", ".join(f"{n} {status}" for status, n in counts.items())],
        ["ARIA-H microhemorrhage", f"{grade['grade']} ({grade['new_microhemorrhages']} new)"],
    ])
    header = "".join(f"<th>{h}</th>" for h in ("status", "baseline CMB", "follow-up CMB", "baseline R A S",
                                                 "follow-up R A S", "volume mm&sup3; (baseline, follow-up)",
                                                 "distance mm"))

    def cell(value: Any, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    body = "".join(
        f"<tr><td>{html.escape(m.status)}</td><td>{cell(m.baseline and m.baseline.cmb_id)}</td>"
        f"<td>{cell(m.followup and m.followup.cmb_id)}</td>"
        f"<td class=num>{' '.join(cell(v) for v in m.baseline_ras)}</td>"
        f"<td class=num>{' '.join(cell(v) for v in m.followup_ras)}</td>"
        f"<td class=num>{cell(m.baseline and m.baseline.volume_mm3)}, {cell(m.followup and m.followup.volume_mm3)}</td>"
        f"<td class=num>{cell(m.distance_mm)}</td></tr>" for m in rows)
    more = "" if n_new <= MAX_THUMBNAILS else f"<p>Thumbnails of the first {MAX_THUMBNAILS} new CMBs only.</p>"
    title = "SHIVA-CMB follow-up comparison"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style>"
            f"</head><body><h1>{title}</h1><div class='note'>The grade counts new CMBs as the lecanemab and "
            f"donanemab labels grade ARIA-H microhemorrhages (mild 1-4, moderate 5-9, severe 10 or more). It assists "
            f"the reading: a radiologist confirms every new CMB and decides.</div><table>{table}</table>"
            f"<h2>CMBs</h2><table><tr>{header}</tr>{body}</table>"
            f"<h2>New CMBs at baseline and follow-up</h2><p>Top row baseline, bottom row follow-up, on the same "
            f"planes of the baseline (follow-up registered to it); axial, coronal, sagittal; patient's right on the "
            f"image's left; {THUMB_MM:g} mm across; the new CMB outlined on the follow-up.</p>{more}"
            f"{''.join(cards) or '<p>No new CMB.</p>'}"
            f"<p><small>shivacmb {html.escape(str(summary['software']['version']))}</small></p></body></html>\n")


def _strip(alt: str, image: sitk.Image, labels: Optional[sitk.Image], label: int, centre_ras: Sequence[float],
           window: Tuple[float, float], scratch: Path, transform: Optional[sitk.Transform] = None) -> str:
    """Axial, coronal and sagittal thumbnails (``_thumbnail``) as inline <img> tags."""
    return "".join(f'<img alt="{html.escape(alt)} {view}" title="{view}" src="data:image/png;base64,'
                   f'{_thumbnail(image, labels, label, centre_ras, axes, window, scratch, transform)}">'
                   for view, axes in VIEWS.items())


def _display_window(image: sitk.Image) -> Tuple[float, float]:
    """One grey-level window for every thumbnail: 0.5th to 99.5th percentile of the scan's signal."""
    values = sitk.GetArrayViewFromImage(image).ravel()[::7]
    values = values[np.isfinite(values)]
    signal = values[values > np.percentile(values, 50) * 0.2] if values.size else values
    if signal.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(signal, (0.5, 99.5))
    return float(min(lo, 0.0)), float(max(hi, lo + 1e-6))


def _thumbnail(image: sitk.Image, labels: Optional[sitk.Image], label: int, centre_ras: Sequence[float],
               axes: Sequence[Sequence[float]], window: Tuple[float, float], scratch: Path,
               transform: Optional[sitk.Transform] = None) -> str:
    """Base64 PNG of one plane through ``centre_ras``, voxels of ``label`` outlined in red.

    With ``transform`` (plane points -> image points), the plane lies in another scan's space.
    """
    n = int(round(THUMB_MM / THUMB_PIXEL_MM))
    right, down = (LPS_RAS @ np.asarray(a) for a in axes)  # RAS -> LPS directions
    normal = np.cross(right, down)
    centre = LPS_RAS @ np.asarray(centre_ras, dtype=float)
    origin = centre - (n / 2 - 0.5) * THUMB_PIXEL_MM * (right + down)
    plane = Geometry((n, n, 1), (THUMB_PIXEL_MM,) * 3, tuple(origin),
                     tuple(np.column_stack([right, down, normal]).ravel()))
    grey = sitk.GetArrayFromImage(resample(image, plane, sitk.sitkLinear, transform=transform))[0]
    mask = np.zeros_like(grey, dtype=bool) if labels is None else sitk.GetArrayFromImage(
        resample(labels, plane, sitk.sitkNearestNeighbor, pixel_type=sitk.sitkUInt16, transform=transform))[0] == label
    lo, hi = window
    scaled = np.clip((np.nan_to_num(grey) - lo) / (hi - lo), 0, 1) * 255
    rgb = np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=2)
    outline = mask & ~ndimage.binary_erosion(mask)
    rgb[outline] = (255, 40, 40)
    target = scratch / "thumb.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(target))
    return base64.b64encode(target.read_bytes()).decode("ascii")


def _rows(pairs: List[List[str]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)


def _page(run: RunRecord, findings: Sequence[Finding], cards: List[str]) -> str:
    model, inp, inference = run.model, run.input, run.inference
    geometry = inp["geometry"]
    summary = _rows([
        ["Scan", str(inp["path"])],
        ["sha256", str(inp["sha256"])],
        ["Grid", f"{'x'.join(map(str, geometry['size']))} voxels of "
                 f"{' x '.join(f'{s:g}' for s in geometry['spacing_mm'])} mm, "
                 f"{geometry['orientation']}, oblique {geometry['obliquity_deg']:g} deg"],
        ["Brain mask", f"{run.mask['source']} ({run.mask['volume_ml']:.0f} mL)"],
        ["Model", f"{model['name']} {model['version']} ({model['license']})"],
        ["Ran on", f"{inference['provider']}, onnxruntime {inference['onnxruntime']}"],
        ["Threshold", str(run.settings["threshold"])],
        ["CMBs found", str(len(findings))],
        ["Time", f"{run.timings_s['total']:.1f} s"],
    ])
    warnings = run.warnings
    warn_html = ("<div class='warn'><b>Warnings</b><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
                 + "</ul></div>") if warnings else ""
    description = model["description"]
    note = f"<div class='note'>{html.escape(description)}</div>" if description else ""
    header = "".join(f"<th>{h}</th>" for h in ("CMB", "R", "A", "S", "volume mm&sup3;", "voxels", "max prob",
                                                 "fold agreement", "region", "MARS area", "side", "status"))
    body = "".join(
        f"<tr><td><a href='#cmb-{f.cmb_id}'>{f.cmb_id}</a></td><td class=num>{f.r:.1f}</td>"
        f"<td class=num>{f.a:.1f}</td><td class=num>{f.s:.1f}</td><td class=num>{f.volume_mm3:.1f}</td>"
        f"<td class=num>{f.voxels}</td><td class=num>{_opt(f.max_prob)}</td>"
        f"<td class=num>{_opt(f.fold_agreement)}</td><td>{html.escape(f.region.replace('_', ' '))}</td>"
        f"<td>{html.escape(f.mars_area)}</td><td>{html.escape(f.side)}</td><td>{html.escape(f.status)}</td></tr>"
        for f in findings)
    more = "" if len(findings) <= MAX_THUMBNAILS else f"<p>Thumbnails of the first {MAX_THUMBNAILS} CMBs only.</p>"
    title = html.escape(f"SHIVA-CMB report: {run.scan_id}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style>"
            f"</head><body><h1>{title}</h1>{note}{warn_html}<table>{summary}</table>"
            f"{_location_section(run.location, findings)}"
            f"<h2>Findings</h2><table><tr>{header}</tr>{body}</table>"
            f"<h2>Thumbnails</h2><p>Axial, coronal, sagittal; patient's right on the image's left; "
            f"{THUMB_MM:g} mm across.</p>{more}{''.join(cards) or '<p>No CMB detected.</p>'}"
            f"<p><small>shivacmb {html.escape(str(run.software['version']))}</small></p>"
            f"</body></html>\n")


def _location_section(location: Dict[str, Any], findings: Sequence[Finding]) -> str:
    """CMB counts by MARS area and side (definite/possible apart when rated) and the Boston distribution."""
    if location["source"] == NOT_LOCATED or not findings:
        return ""
    counts = count_locations(findings)
    tables = [("All CMBs (not rejected)", counts["by_area_side"])]
    tables += [(f"{status.capitalize()} CMBs", table) for status, table in counts.get("by_rating", {}).items()]
    header = "<tr><th></th>" + "".join(f"<th>{side}</th>" for side in SIDES) + "<th>total</th></tr>"
    parts = []
    for caption, table in tables:
        rows = "".join(f"<tr><th>{area}</th>" + "".join(f"<td class=num>{table[area][side]}</td>" for side in SIDES)
                       + f"<td class=num>{sum(table[area].values())}</td></tr>" for area in AREAS)
        rows += f"<tr><th>{UNKNOWN}</th><td colspan=3></td><td class=num>{table[UNKNOWN]['count']}</td></tr>"
        parts.append(f"<p><b>{caption}</b></p><table>{header}{rows}</table>")
    source = location.get("source", "")
    if source == "parcellation":
        detail = f"parcellation {location.get('parcellation', '')}"
    elif location.get("failed"):
        detail = f"MNI atlas, registration failed ({'; '.join(location['failed'])}): locations unknown"
    else:
        detail = f"MNI atlas registered to the scan (brain overlap Dice {location.get('dice', 0):.2f})"
    boston = str(counts["boston"]).replace("_", " ")
    return (f"<h2>Location (MARS)</h2><p>Source: {html.escape(detail)}. Distribution for the Boston criteria: "
            f"<b>{html.escape(boston)}</b>.</p>{''.join(parts)}")


def _opt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"
