"""What the module's "Rating session" section shows and which keys it listens to, without Slicer.

Findings are drawn as sphere segments: an AI finding with the volume it was measured with
(at least ``MIN_RADIUS_MM``), a CMB the rater marked with ``MARK_RADIUS_MM``; the colour says
the status. Shortcut keys avoid those the slice views use (b f v r g t [ ] { } and arrows).
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

from ..findings import Finding
from ..rating.review import IN_PROGRESS, NOT_RATABLE, SUBMITTED, UNRATED, RatingSession

MARK_RADIUS_MM = 2.5
MIN_RADIUS_MM = 1.5
AI_PREFIX = "AI"  # segments of AI findings shown after a blind scan is submitted
SHORTCUTS = {"definite": "D", "possible": "P", "rejected": "X", "add": "A", "next": "N", "previous": "Shift+N"}
STATUS_COLOURS: Dict[str, Tuple[float, float, float]] = {
    "unreviewed": (1.0, 0.85, 0.0), "definite": (0.9, 0.1, 0.1), "possible": (1.0, 0.5, 0.0),
    "rejected": (0.5, 0.5, 0.5), "added": (0.2, 0.5, 1.0), AI_PREFIX: (0.1, 0.8, 0.8)}
MARKERS = {UNRATED: " ", IN_PROGRESS: "…", SUBMITTED: "✓", NOT_RATABLE: "✗"}


def progress_text(session: RatingSession, index: int) -> str:
    """"scan 37 of 120 (36 done)"."""
    total = len(session.scan_ids)
    return f"scan {min(index + 1, total)} of {total} ({session.done()} done)"


def scan_lines(session: RatingSession) -> List[str]:
    """One line per scan of the scan list: done marker and scan id."""
    return [f"{MARKERS[session.ratings.scans[s].state]} {s}" for s in session.scan_ids]


def finding_line(name: str, finding: Finding) -> str:
    """One line of the findings list: the segment's name and the rater's status, or "AI finding" for one
    shown after a blind scan is submitted (its id may equal a blind mark's)."""
    status = "AI finding" if name.startswith(AI_PREFIX) else finding.status
    where = "" if finding.mars_area == "n/a" else f", {finding.mars_area}"
    side = "" if finding.side == "n/a" else f" {finding.side}"
    note = f" - {finding.note}" if finding.note else ""
    return f"{name}: {status}{where}{side}{note}"


def sphere_radius(finding: Finding) -> float:
    """Radius of the sphere drawn for a finding (mm)."""
    if finding.voxels <= 0:  # a mark of the rater: a point
        return MARK_RADIUS_MM
    return max(MIN_RADIUS_MM, (3.0 * finding.volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0))


def shown_findings(session: RatingSession, scan_id: str) -> List[Tuple[str, Finding]]:
    """(segment name, finding) of every finding to draw: what the rater rates, and after a blind scan is
    submitted the AI findings beside the blind marks ("AI <id>")."""
    shown = [(f"CMB {f.cmb_id}", f) for f in session.findings(scan_id)]
    if session.mode == "blind" and session.rating(scan_id).state in (SUBMITTED, NOT_RATABLE):
        shown += [(f"{AI_PREFIX} {f.cmb_id}", f) for f in session.ai_findings(scan_id)]
    return shown


def colour(name: str, finding: Finding) -> Tuple[float, float, float]:
    return STATUS_COLOURS[AI_PREFIX if name.startswith(AI_PREFIX) else finding.status]
