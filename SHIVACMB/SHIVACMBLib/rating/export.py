"""Rating sessions read as a whole: progress per rater (`shivacmb review status`) and the per-scan and per-finding
tables of `shivacmb review export`, written as TSV."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

from ..errors import RuntimeFailure
from ..files import atomic_write_text
from ..findings import NA
from ..mars import AREAS, UNKNOWN
from .review import DONE, IN_PROGRESS, NOT_RATABLE, SUBMITTED, Session, all_ratings, clean_text

PathLike = Union[str, Path]


def status_rows(session: Session) -> List[Dict[str, Any]]:
    """Progress per rater."""
    rows = []
    for ratings in all_ratings(session):
        states = [r.state for r in ratings.scans.values()]
        current = next((s for s in session.scan_ids if ratings.scans[s].state not in DONE), None)
        counts = [r.counts() for r in ratings.scans.values()]
        rows.append({"rater": ratings.rater, "scans": len(states), "submitted": states.count(SUBMITTED),
                     "not_ratable": states.count(NOT_RATABLE), "in_progress": states.count(IN_PROGRESS),
                     "next_scan": current, "definite": sum(c["definite"] for c in counts),
                     "possible": sum(c["possible"] for c in counts),
                     "hours": round(sum(ratings.seconds(s) for s in ratings.scans) / 3600, 3),
                     "changes": ratings.n, "problems": ratings.problems})
    return rows


SCAN_COLUMNS = ("session", "rater", "mode", "scan_id", "state", "reason", "definite", "possible", "total",
                *(f"{c}_{a}" for c in ("definite", "possible") for a in AREAS + (UNKNOWN,)),
                "rating_s", "first_change", "finished", "note")
FINDING_COLUMNS = ("session", "rater", "mode", "scan_id", "cmb_id", "origin", "status", "r", "a", "s",
                   "mars_area", "side", "note", "changed")


def _area(area: str) -> str:
    return area if area in AREAS else UNKNOWN


def export_rows(session: Session, name: str = "") -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """One row per scan per rater and one row per finding a rater rated, for every rater of a session.

    Findings: the AI findings a rater reviewed (assisted mode) and the CMBs they marked; blind
    ratings list only the rater's own marks. MARS areas not given by the rater are the AI's.
    """
    name = name or session.folder.name
    ai = {s: {f.cmb_id: f for f in session.ai_findings(s) or []} for s in session.scan_ids}
    scan_rows, finding_rows = [], []
    for ratings in all_ratings(session):
        for scan_id in session.scan_ids:
            rating = ratings.scans[scan_id]
            base = {"session": name, "rater": ratings.rater, "mode": session.mode, "scan_id": scan_id}
            row = {**base, "state": rating.state, "reason": rating.reason, **rating.counts()}
            row.update({f"{c}_{a}": 0 for c in ("definite", "possible") for a in AREAS + (UNKNOWN,)})
            for mark in sorted(rating.marks.values(), key=lambda m: m.cmb_id):
                found = ai[scan_id].get(mark.cmb_id) if mark.origin == "ai" else None
                area = mark.mars_area if mark.mars_area != NA or found is None else found.mars_area
                certainty = {"added": "definite"}.get(mark.status, mark.status)
                if certainty in ("definite", "possible"):
                    row[f"{certainty}_{_area(area)}"] += 1
                ras = found.ras if found is not None else mark.ras
                finding_rows.append({**base, "cmb_id": mark.cmb_id, "origin": mark.origin, "status": mark.status,
                                     "r": ras[0], "a": ras[1], "s": ras[2], "mars_area": area,
                                     "side": mark.side if mark.side != NA or found is None else found.side,
                                     "note": mark.note, "changed": mark.changed})
            row.update({"rating_s": round(ratings.seconds(scan_id), 3), "first_change": rating.first,
                        "finished": rating.finished, "note": rating.note})
            scan_rows.append(row)
    return scan_rows, finding_rows


def tsv_text(rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as TSV (empty cells for missing values, no tabs or newlines inside a cell)."""
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join(clean_text("" if row.get(c) is None else row[c]) for c in columns))
    return "\n".join(lines) + "\n"


def export(sessions: Sequence[PathLike], out: PathLike) -> Tuple[Path, Path, int, int, List[str]]:
    """Write ``ratings_scans.tsv`` and ``ratings_findings.tsv`` of sessions into ``out``; paths, row counts and
    what is wrong with a rater's files (a missing log, a rebuilt state)."""
    out = Path(out)
    scan_rows, finding_rows, problems = [], [], []
    for folder in sessions:
        session = Session.load(folder)
        scans, found = export_rows(session)
        scan_rows += scans
        finding_rows += found
        problems += [f"{session.folder}: rater {r.rater}: {p}" for r in all_ratings(session) for p in r.problems]
    scans_path, findings_path = out / "ratings_scans.tsv", out / "ratings_findings.tsv"
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(scans_path, tsv_text(scan_rows, SCAN_COLUMNS))
        atomic_write_text(findings_path, tsv_text(finding_rows, FINDING_COLUMNS))
    except OSError as err:
        raise RuntimeFailure(f"cannot write into {out}: {err.strerror or err}") from None
    return scans_path, findings_path, len(scan_rows), len(finding_rows), problems
