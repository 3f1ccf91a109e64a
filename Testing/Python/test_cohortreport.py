"""The cohort QC page of `shivacmb batch` (cohortreport.write_cohort_report): content, plots, and a headless
Chromium rendering of it and of a linked per-scan page."""

from __future__ import annotations

import base64
import io
import random
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import unquote

import numpy as np
import pytest
import SimpleITK as sitk

from SHIVACMBLib.cohort.cohortreport import write_cohort_report
from SHIVACMBLib.findings import COLUMNS, Finding
from SHIVACMBLib.location import AREAS, SIDES
from SHIVACMBLib.report import write_report
from SHIVACMBLib.runrecord import NOT_LOCATED, RunRecord

SUMMARY_COLUMNS = (["scan_id", "status", "cmb_count"] + [f"{a}_{s}" for a in AREAS for s in SIDES]
                   + ["location_unknown", "boston", "total_volume_mm3", "seconds_total", "seconds_inference",
                      "provider", "model", "model_version", "image", "output", "report", "error"])
VOID = {"img", "br", "meta", "hr", "input", "link"}


class Page(HTMLParser):
    """Tags, links and images of a page; raises on a closing tag that does not match the open one."""

    def __init__(self, text: str):
        super().__init__()
        self.stack: List[str] = []
        self.links: List[str] = []
        self.images: List[str] = []
        self.rows: List[List[Tuple[Dict[str, Optional[str]], str]]] = []
        self._cell: Optional[Dict[str, Optional[str]]] = None
        self._text = ""
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed tags {self.stack}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "tr":
            self.rows.append([])
        if tag == "td":
            self._cell, self._text = attrs, ""
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"</{tag}> does not close an open <{tag}>"
        if tag == "td":
            self.rows[-1].append((self._cell, self._text))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._text += data

    def table(self) -> List[List[str]]:
        """Text of the cells of the scan table, row by row."""
        return [[text for _attrs, text in row] for row in self.rows if len(row) == 11]


def summary_row(scan_id: str, found: Sequence[Dict[str, str]], report: str = "", status: str = "done",
                error: str = "") -> Dict[str, str]:
    """A cohort_summary.tsv row, counts taken from ``found`` (that scan's cohort_findings rows)."""
    row = dict.fromkeys(SUMMARY_COLUMNS, "")
    row.update(scan_id=scan_id, status=status, error=error, report=report, output=str(Path(report).parent))
    if status == "done":
        for area in AREAS:
            for side in SIDES:
                row[f"{area}_{side}"] = str(sum(1 for f in found if (f["mars_area"], f["side"]) == (area, side)))
        areas = {f["mars_area"] for f in found}
        row.update(cmb_count=str(len(found)), location_unknown=str(sum(1 for f in found if f["mars_area"] == "n/a")),
                   boston="none" if not found else "mixed" if {"lobar", "deep"} <= areas else "strictly_lobar",
                   total_volume_mm3=f"{sum(float(f['volume_mm3']) for f in found):.2f}", seconds_total="41.5",
                   seconds_inference="30.2", provider="CPUExecutionProvider", model="shivacmb-demo-swi",
                   model_version="2.1", image=f"in/{scan_id}.nii.gz")
    return row


def findings_rows(scan_id: str, n: int, rng: random.Random) -> List[Dict[str, str]]:
    """``n`` cohort_findings.tsv rows of one scan, in random MARS areas and sides."""
    rows = []
    for cmb_id in range(1, n + 1):
        area = rng.choice([*AREAS, "lobar", "lobar", "n/a"])
        values = dict.fromkeys(COLUMNS, "n/a")
        values.update(cmb_id=str(cmb_id), volume_mm3=f"{rng.uniform(2, 40):.2f}", voxels="9", mars_area=area,
                      side="n/a" if area == "n/a" else rng.choice(SIDES), status="unreviewed", note="")
        rows.append({"scan_id": scan_id, **values})
    return rows


def scan_page(path: Path, scan_id: str, n_cmb: int) -> None:
    """A real per-scan QC page (report.write_report) of a small synthetic scan with ``n_cmb`` dark blobs."""
    size = 64
    k, j, i = np.mgrid[:size, :size, :size]
    grey = 400 + 300 * np.exp(-((i - 32) ** 2 + (j - 32) ** 2 + (k - 32) ** 2) / 400.0)
    labels = np.zeros(grey.shape, np.uint16)
    image = sitk.GetImageFromArray(grey.astype(np.float32))
    found = []
    for cmb_id in range(1, n_cmb + 1):
        ci, cj, ck = 24 + 8 * cmb_id % 16, 36 - 5 * cmb_id % 12, 28 + 3 * cmb_id % 8
        blob = (i - ci) ** 2 + (j - cj) ** 2 + (k - ck) ** 2 <= 4
        grey[blob], labels[blob] = 40, cmb_id
        x, y, z = image.TransformIndexToPhysicalPoint((ci, cj, ck))
        found.append(Finding(cmb_id, -x, -y, z, ci, cj, ck, float(blob.sum()), int(blob.sum()), 0.9, 0.8, 1.0))
    image = sitk.GetImageFromArray(grey.astype(np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    run = RunRecord(
        scan_id=scan_id, software={"version": "test"},
        input={"path": f"in/{scan_id}.nii.gz", "sha256": "0" * 64, "geometry": {
            "size": [size] * 3, "spacing_mm": [1.0] * 3, "orientation": "LPS", "obliquity_deg": 0.0}},
        mask={"source": "synthetic", "volume_ml": 120.0},
        model={"name": "shivacmb-demo-swi", "version": "2.1", "license": "Apache-2.0", "description": ""},
        settings={"threshold": 0.5}, inference={"provider": "CPUExecutionProvider", "onnxruntime": "1.20"},
        model_box={}, results={}, fp_filter=None, location={"source": NOT_LOCATED}, warnings=[], started="",
        timings_s={"total": 41.5})
    write_report(path, image, labels, found, run)


def cohort(out: Path, n_scans: int, pages: int = 3, seed: int = 0) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """Summary and findings rows of ``n_scans`` (the last one failed, one with 200 CMBs when there are 10 or
    more), the first ``pages`` with a real QC page in the two layouts batch writes."""
    rng = random.Random(seed)
    summary, findings = [], []
    for n in range(n_scans - 1):
        scan_id = f"sub-{n + 1:03d}"
        count = 200 if n == 7 else rng.choice([0, 0, 0, 1, 1, 2, 3, 5, 8, 14])
        found = findings_rows(scan_id, count, rng)
        report = ""
        if n < pages:
            report = (f"{scan_id}_swi/report.html" if n % 2 else
                      f"{scan_id}/ses-1/anat/{scan_id}_ses-1_desc-cmb_report.html")
            scan_page(out / report, scan_id, min(count, 3))
        summary.append(summary_row(scan_id, found, report))
        findings += found
    summary.append(summary_row(f"sub-{n_scans:03d}", [], status="failed",
                               error="InputError: in/bad.nii.gz is not a 3D image"))
    return summary, findings


def written(tmp_path: Path, summary, findings, **kwargs) -> Tuple[Path, str, Page]:
    path = tmp_path / "report.html"
    write_cohort_report(path, summary, findings, **kwargs)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    return path, text, Page(text)


def decoded(src: str) -> np.ndarray:
    """Pixels of a ``data:image/png;base64`` image."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(data), format="png")


def test_links_open_the_existing_scan_pages_and_failed_scans_show_their_error(tmp_path):
    summary, findings = cohort(tmp_path, 12)
    path, text, page = written(tmp_path, summary, findings)
    assert len(page.links) == 3
    for href in page.links:
        assert "://" not in href and (path.parent / unquote(href)).is_file(), href
    rows = page.table()
    assert rows[0][0] == "sub-008" and rows[0][2] == "200" and rows[0][9] == "CPU"  # by count, descending
    counts = [int(r[2]) for r in rows if r[2]]
    assert counts == sorted(counts, reverse=True)
    assert rows[-1][:2] == ["sub-012", "failed"] and rows[-1][-1] == "InputError: in/bad.nii.gz is not a 3D image"
    assert "<tr class=failed>" in text and "12: 11 done, 1 failed" in text
    total = sum(int(r["cmb_count"]) for r in summary if r["cmb_count"])
    assert f"{total} in all" in text and "maximum 200" in text
    assert "shivacmb-demo-swi 2.1 (11 scans)" in text and "CPUExecutionProvider (11 scans)" in text
    for row in rows[:-1]:
        assert row[2] == str(sum(int(v or 0) for v in row[3:6]) + int(
            next(s for s in summary if s["scan_id"] == row[0])["location_unknown"]))
    assert "://" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)  # nothing from the network


def test_every_value_is_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    summary = [summary_row(evil, [], report=f"a'b/{evil}.html"),
               summary_row("s&2", [], status="failed", error="bad <b>value</b> & 'quote'")]
    summary[0]["boston"] = "strictly_lobar<i>"
    summary[0]["provider"] = "<img src=x onerror=alert(2)>"
    _path, text, page = written(tmp_path, summary, [], title="<Cohort & co>")
    assert evil not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>value" not in text and "bad &lt;b&gt;value&lt;/b&gt; &amp; &#x27;quote&#x27;" in text
    assert "<img src=x" not in text and "strictly lobar&lt;i&gt;" in text
    assert "<title>&lt;Cohort &amp; co&gt;</title>" in text
    assert unquote(page.links[0]) == f"a'b/{evil}.html"
    assert sum(1 for row in page.table() for cell in row if cell == evil) == 1


def test_plots_are_png_data_uris_with_content(tmp_path):
    pytest.importorskip("matplotlib")
    summary, findings = cohort(tmp_path, 10, pages=0)
    _path, _text, page = written(tmp_path, summary, findings)
    assert len(page.images) == 3  # count histogram, MARS areas, volumes
    for src in page.images:
        pixels = decoded(src)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 0


def test_cohort_without_cmb_gets_plots_that_are_not_blank(tmp_path):
    pytest.importorskip("matplotlib")
    summary = [summary_row(f"s{n}", []) for n in range(5)]
    _path, text, page = written(tmp_path, summary, [])
    assert len(page.images) == 2 and all(decoded(src).std() > 0 for src in page.images)
    assert "0 in all; 0 scans with at least one" in text and "median 0, maximum 0" in text
    assert [r[2] for r in page.table()] == ["0"] * 5 and [r[7] for r in page.table()] == ["none"] * 5


def test_zero_scans_and_all_failed(tmp_path):
    _path, text, page = written(tmp_path, [], [])
    assert "No scan in this cohort." in text and not page.images and not page.table()
    failed = [summary_row("a", [], status="failed", error="boom")]
    _path, text, page = written(tmp_path, failed, [])
    assert "1: 0 done, 1 failed" in text and "No scan was processed" in text and not page.images
    assert page.table()[0][-1] == "boom"


def test_page_without_matplotlib_has_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    summary, findings = cohort(tmp_path, 4, pages=0)
    _path, text, page = written(tmp_path, summary, findings)
    assert not page.images and "pip install matplotlib" in text and len(page.table()) == 4


def test_large_cohort_has_a_table_and_no_per_scan_image(tmp_path):
    rng = random.Random(1)
    summary, findings = [], []
    for n in range(5000):
        found = findings_rows(f"s{n:04d}", rng.choice([0, 0, 1, 2]), rng)
        summary.append(summary_row(f"s{n:04d}", found, report=f"s{n:04d}/report.html"))
        findings += found
    path, _text, page = written(tmp_path, summary, findings)
    assert len(page.table()) == 5000 and len(page.links) == 5000
    assert len(page.images) <= 3 and path.stat().st_size < 3_000_000


# --- headless Chromium --------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Appended to a copy of a page: after load, counts the images that did not decode, then sorts the scan table
# (if any) by CMB count with a header click, as a reader would.
PROBE = """<script>window.addEventListener("load", function () {
  var images = document.images, broken = 0;
  for (var n = 0; n < images.length; n++) { if (!images[n].complete || images[n].naturalWidth === 0) broken++; }
  var head = document.querySelector("table.scans th:nth-child(3)");
  if (head) { head.click(); }
  var p = document.createElement("p");
  p.id = "probe";
  p.textContent = "IMAGES " + images.length + " BROKEN " + broken;
  document.body.appendChild(p);
});</script>"""


def chromium(page: Path, profile: Path, *args: str) -> str:
    """Run headless Chromium on ``page``, offline flags, return its stdout."""
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def probed(page: Path, scratch: Path) -> Tuple[int, int, str]:
    """(images, broken images, DOM after load) of ``page``, checked on a probed copy in ``scratch``."""
    scratch.mkdir()
    copy = scratch / page.name
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = chromium(copy, scratch / "profile", "--dump-dom")
    found = re.search(r"IMAGES (\d+) BROKEN (\d+)", dom)
    assert found, dom[-2000:]
    return int(found[1]), int(found[2]), dom


def screenshot(page: Path, scratch: Path) -> np.ndarray:
    shot = scratch / "shot.png"
    chromium(page, scratch / "profile", f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(shot)))


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")
def test_pages_render_in_headless_chromium(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    summary, findings = cohort(out, 40, pages=40)
    path, _text, page = written(out, summary, findings)
    images, broken, dom = probed(path, tmp_path / "cohort")
    assert images == 3 and broken == 0
    counts = [cell.get("data-v") for row in Page(dom).rows for n, (cell, _t) in enumerate(row) if n == 2]
    numbers = [float(v) for v in counts if v]
    assert numbers == sorted(numbers) and counts[-1] == "" and len(counts) == 40  # ascending after a click
    assert screenshot(path, tmp_path / "cohort").std() > 0

    scan = out / unquote(next(href for href in page.links if "swi" in href))
    images, broken, _dom = probed(scan, tmp_path / "scan")
    assert images >= 3 and broken == 0
    assert screenshot(scan, tmp_path / "scan").std() > 0
