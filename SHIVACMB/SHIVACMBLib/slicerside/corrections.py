"""Manual corrections of a run's findings: what the Slicer module needs, without Slicer.

The reader edits the run's segmentation in Slicer's Segment Editor (paint, erase, delete a
segment, add a segment for a missed CMB) and the review columns of the findings table
(status, rater, note). The module exports every segment as its own label value on the
scan's grid and hands the label map and the segment list to :func:`correct`, which gives
the corrected findings. The rules:

- A CMB of the run whose segment still has exactly the voxels it had when the run was
  loaded keeps the run's measurements; its status, rater and note are the reader's.
- A CMB of the run whose voxels changed (painted, erased) is measured again from the label
  map: voxels, volume, centroid (RAS and the voxel holding it). Its probabilities and fold
  agreement stay those of the run (the run's probability map is not kept). Its status stays
  what the reader set; the note gains "edited" (and loses it when the voxels are put back).
- A CMB of the run whose segment was deleted or emptied keeps its row with status
  "rejected" and the note "segment deleted"; its status cannot be changed while it has no
  segment. If its segment comes back (undo), the run's status returns.
- A segment that is not a CMB of the run (no ``SHIVACMB.cmb_id`` tag, an unknown one, or a
  duplicate) is a CMB added by the reader: it gets the next free id (larger than any id
  used so far), status "added", no probability. Empty segments are ignored until painted.

Measurements follow :func:`SHIVACMBLib.postprocess.measure` where they can: volume = voxels
times the voxel volume; ``i j k`` = the voxel holding the centroid. Without a probability
map the centroid of a remeasured CMB is the plain mean of its voxel centres. Where segments
overlap, the label map holds the last segment in the segmentation's order.

The state the module keeps with the findings table (:class:`RunState`, the current findings)
is JSON without tabs or raw newlines, so it survives as a MRML node attribute. Saving writes
``cmb.seg.nrrd``, ``findings.tsv`` and a provenance record ``corrections.json`` (who, when,
software, source run, list of changes) into one folder, and for a scan loaded from DICOM
``cmb.seg.dcm`` and ``cmb.sr.dcm`` (SHIVACMBLib.dicomout) of the corrected findings, each file
atomically and all only once everything is written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import hashlib
import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .. import __version__
from ..files import atomic_path, checksum
from ..findings import (DELETED, EDITED, NA, STATUSES, Finding, add_note, from_rows, is_deleted, is_edited, read_tsv,
                        remove_note, to_rows, to_tsv)
from ..geometry import Geometry
from ..location import count_locations
from .slicerbridge import TABLE_COLUMNS, finding_row

PathLike = Union[str, Path]

SEGMENTATION_NAME = "cmb.seg.nrrd"  # as SHIVACMBLib.pipeline names a run's files
FINDINGS_NAME = "findings.tsv"
PROVENANCE_NAME = "corrections.json"
SAVED_FILES = (SEGMENTATION_NAME, FINDINGS_NAME, PROVENANCE_NAME)
PROVENANCE_FORMAT = "shivacmb-corrections/1"
REVIEW_COLUMNS = ("status", "rater", "note")
RUN_STATUSES = tuple(s for s in STATUSES if s != "added")  # what a CMB found by the run may be
ADDED_STATUSES = tuple(s for s in STATUSES if s != "unreviewed")  # what a CMB added by the reader may be


# --- segments and label maps ------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentRecord:
    """One segment of the segmentation, as exported by the module."""

    segment_id: str  # the segment's ID in the segmentation node
    label: int  # its value in the exported label map
    cmb_id: Optional[int] = None  # its SHIVACMB.cmb_id tag; None when it has none
    name: str = ""


def tag_cmb_id(text: Optional[str]) -> Optional[int]:
    """The CMB id of a ``SHIVACMB.cmb_id`` tag value; None when absent or not a positive integer."""
    try:
        value = int(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def segment_for_cmb(segments: Iterable[SegmentRecord], cmb_id: int) -> Optional[str]:
    """ID of the first segment tagged with ``cmb_id``, or None."""
    return next((s.segment_id for s in segments if s.cmb_id == cmb_id), None)


def _voxels_by_label(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label values present, their voxel counts, and the flat indices of their voxels grouped by label."""
    flat = np.flatnonzero(labels)
    values = labels.ravel()[flat]
    order = np.argsort(values, kind="stable")  # flat indices stay ascending within a label
    present, counts = np.unique(values, return_counts=True)
    return present, counts, flat[order]


def _fingerprint(shape: Sequence[int], flat: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(shape, "<i8").tobytes() + flat.astype("<i8").tobytes()).hexdigest()


def voxel_fingerprints(labels: np.ndarray) -> Dict[int, str]:
    """For each label value present: a digest of the grid shape and the label's voxel positions."""
    present, counts, grouped = _voxels_by_label(labels)
    return {int(label): _fingerprint(labels.shape, chunk)
            for label, chunk in zip(present.tolist(), np.split(grouped, np.cumsum(counts)[:-1]))}


@dataclass(frozen=True)
class Measurement:
    """Size and position of one label."""

    voxels: int
    volume_mm3: float
    ras: Tuple[float, float, float]
    ijk: Tuple[int, int, int]


def _measurements(grid: Geometry, means_ijk: np.ndarray, counts: Sequence[int]) -> List[Measurement]:
    """Measurements of labels from their voxel counts and mean voxel indices (one row per label)."""
    ras = grid.index_to_ras(means_ijk)
    ijk = np.clip(np.rint(means_ijk), 0, np.asarray(grid.size) - 1).astype(int)
    return [Measurement(int(n), float(n * grid.voxel_volume), tuple(float(v) for v in ras[row]),
                        tuple(int(v) for v in ijk[row])) for row, n in enumerate(counts)]


def measure_labels(labels: np.ndarray, grid: Geometry) -> Dict[int, Measurement]:
    """Voxel count, volume and centroid (mean of voxel centres; RAS mm and the voxel holding it) per label."""
    if labels.shape != grid.array_shape:
        raise ValueError(f"label map shape {labels.shape} does not match the grid {grid.array_shape}")
    present, counts, grouped = _voxels_by_label(labels)
    if len(present) == 0:
        return {}
    kji = np.stack(np.unravel_index(grouped, labels.shape), axis=1).astype(float)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    means_ijk = np.add.reduceat(kji, starts, axis=0)[:, ::-1] / counts[:, None]
    return dict(zip((int(label) for label in present.tolist()), _measurements(grid, means_ijk, counts.tolist())))


@dataclass(frozen=True)
class LabelVoxels:
    """What the corrections need of one segment's voxels: its measurement and its voxel fingerprint."""

    measurement: Measurement
    fingerprint: str


def label_voxels(labels: np.ndarray, grid: Geometry) -> Dict[int, LabelVoxels]:
    """LabelVoxels of every label of a label map on ``grid`` (one label value per segment)."""
    prints = voxel_fingerprints(labels)
    return {label: LabelVoxels(m, prints[label]) for label, m in measure_labels(labels, grid).items()}


def box_voxels(mask: np.ndarray, corner_kji: Sequence[int], grid: Geometry) -> Optional[LabelVoxels]:
    """LabelVoxels of one segment given by its bounding box: ``mask`` ([k, j, i]) placed at voxel ``corner_kji``
    of ``grid`` (voxels outside the grid are left out); None when it has no voxel. Equal to what
    :func:`label_voxels` gives for the same voxels in a whole label map."""
    kji = np.stack(np.nonzero(mask), axis=1) + np.asarray(corner_kji, int)
    kji = kji[np.all((kji >= 0) & (kji < np.asarray(grid.array_shape)), axis=1)]
    if len(kji) == 0:
        return None
    flat = np.ravel_multi_index(tuple(kji.T), grid.array_shape)  # ascending: nonzero walks in C order
    measurement = _measurements(grid, kji.mean(axis=0)[None, ::-1], [len(kji)])[0]
    return LabelVoxels(measurement, _fingerprint(grid.array_shape, flat))


def fingerprints_by_cmb(fingerprints: Mapping[int, str], segments: Sequence[SegmentRecord]) -> Dict[int, str]:
    """Voxel fingerprint (``fingerprints`` by label) of each tagged, non-empty segment, by CMB id (the first
    segment of an id wins)."""
    result: Dict[int, str] = {}
    for segment in segments:
        if segment.cmb_id is not None and segment.label in fingerprints and segment.cmb_id not in result:
            result[segment.cmb_id] = fingerprints[segment.label]
    return result


def cmb_label_map(labels: np.ndarray, label_to_cmb: Mapping[int, int]) -> np.ndarray:
    """The label map with CMB ids as values (uint8, or uint16 beyond 255); unmapped labels become 0."""
    top = max(label_to_cmb.values(), default=0)
    table = np.zeros(max(int(labels.max(initial=0)), max(label_to_cmb, default=0)) + 1,
                     np.uint8 if top <= 255 else np.uint16)
    for label, cmb_id in label_to_cmb.items():
        table[label] = cmb_id
    return table[labels]


# --- the run and the findings as JSON ---------------------------------------------------------


def findings_to_json(findings: Iterable[Finding]) -> str:
    """Compact JSON (no tabs, no raw newlines) of findings; unknown numbers are null."""
    return json.dumps(to_rows(findings), separators=(",", ":"), ensure_ascii=False)


def findings_from_json(text: str) -> List[Finding]:
    """Findings from :func:`findings_to_json` (ValueError when it is not such a list)."""
    try:
        return from_rows(json.loads(text))
    except (TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"not a findings list: {err}") from None


@dataclass(frozen=True)
class RunState:
    """What the module keeps of a run: its findings as found, their voxels, and its record."""

    findings: Tuple[Finding, ...]  # as the run found them
    findings_sha256: str  # of the run's findings.tsv
    fingerprints: Dict[int, str]  # CMB id -> voxel fingerprint when the run was loaded
    record_text: str = ""  # the run's run.json, as written
    record_path: str = ""  # where it was written

    @classmethod
    def from_files(cls, findings_path: PathLike, run_json_path: Optional[PathLike],
                   fingerprints: Mapping[int, str]) -> "RunState":
        """The state of a run from its findings.tsv and run.json (None: no record)."""
        record_text = "" if run_json_path is None else Path(run_json_path).read_text(encoding="utf-8")
        return cls(findings=tuple(read_tsv(findings_path)), findings_sha256=checksum([findings_path]),
                   fingerprints=dict(fingerprints), record_text=record_text,
                   record_path="" if run_json_path is None else str(run_json_path))

    @property
    def record(self) -> Dict[str, Any]:
        return json.loads(self.record_text) if self.record_text else {}

    @property
    def ids(self) -> set:
        return {f.cmb_id for f in self.findings}

    def to_json(self) -> str:
        return json.dumps({"findings": json.loads(findings_to_json(self.findings)),
                           "findings_sha256": self.findings_sha256,
                           "fingerprints": {str(k): v for k, v in self.fingerprints.items()},
                           "record_text": self.record_text, "record_path": self.record_path},
                          separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "RunState":
        """The state from :meth:`to_json` (ValueError when it is not one)."""
        try:
            data = json.loads(text)
            return cls(findings=tuple(findings_from_json(json.dumps(data["findings"]))),
                       findings_sha256=str(data["findings_sha256"]),
                       fingerprints={int(k): str(v) for k, v in data["fingerprints"].items()},
                       record_text=str(data.get("record_text", "")), record_path=str(data.get("record_path", "")))
        except (TypeError, KeyError, AttributeError, ValueError) as err:
            raise ValueError(f"not a SHIVA-CMB run state: {err}") from None


# --- correcting the findings ------------------------------------------------------------------


@dataclass
class Correction:
    """The findings after the reader's edits, and how the segments map to them."""

    findings: List[Finding]
    label_to_cmb: Dict[int, int]  # label value in the exported map -> CMB id (segments with voxels)
    segment_cmb_ids: Dict[str, int]  # segment ID -> CMB id (segments with voxels)
    new_tags: Dict[str, int]  # segments whose SHIVACMB.cmb_id tag must be set (or replaced)


def _with_measurement(finding: Finding, m: Measurement) -> Finding:
    """The finding with a new size and position, rounded as findings.tsv writes them (0.01 mm, 0.01 mm³)."""
    r, a, s = (round(v, 2) for v in m.ras)
    return replace(finding, r=r, a=a, s=s, i=m.ijk[0], j=m.ijk[1], k=m.ijk[2], volume_mm3=round(m.volume_mm3, 2),
                   voxels=m.voxels)


def correct(run: RunState, current: Sequence[Finding], segments: Sequence[SegmentRecord], labels: np.ndarray,
            grid: Geometry) -> Correction:
    """The findings as the segmentation and the review now say (rules in the module docstring).

    ``current`` are the findings as last shown (their status, rater and note are the reader's);
    ``segments`` lists the segmentation's segments in order, ``labels`` the exported label map
    (``[k, j, i]`` on ``grid``, one label value per segment).
    """
    return correct_voxels(run, current, segments, label_voxels(labels, grid))


def correct_voxels(run: RunState, current: Sequence[Finding], segments: Sequence[SegmentRecord],
                   voxels: Mapping[int, LabelVoxels]) -> Correction:
    """:func:`correct` from each segment's LabelVoxels by label (segments without voxels left out), so that a
    segment added or deleted needs only its own voxels measured."""
    run_findings = run.findings
    run_ids = {f.cmb_id for f in run_findings}
    shown = {f.cmb_id: f for f in current}
    known = run_ids | set(shown)

    claimed: Dict[int, SegmentRecord] = {}
    unclaimed: List[SegmentRecord] = []
    for segment in segments:
        if segment.label not in voxels:
            continue  # empty: not a CMB (yet)
        if segment.cmb_id in known and segment.cmb_id not in claimed:
            claimed[segment.cmb_id] = segment
        else:
            unclaimed.append(segment)
    next_id = max(known | set(claimed), default=0) + 1
    new_tags = {}
    for segment in unclaimed:
        claimed[next_id] = segment
        new_tags[segment.segment_id] = next_id
        next_id += 1

    findings = []
    for found in run_findings:
        mine = shown.get(found.cmb_id, found)
        segment = claimed.get(found.cmb_id)
        if segment is None:
            findings.append(replace(found, status="rejected", rater=mine.rater,
                                    note=add_note(remove_note(mine.note, EDITED), DELETED)))
            continue
        status = found.status if is_deleted(mine) else mine.status
        note = remove_note(mine.note, DELETED)
        if voxels[segment.label].fingerprint == run.fingerprints.get(found.cmb_id):
            findings.append(replace(found, status=status, rater=mine.rater, note=remove_note(note, EDITED)))
        else:
            findings.append(replace(_with_measurement(found, voxels[segment.label].measurement), status=status,
                                    rater=mine.rater, note=add_note(note, EDITED)))
    for cmb_id in sorted(set(claimed) - run_ids):
        m = voxels[claimed[cmb_id].label].measurement
        mine = shown.get(cmb_id)
        base = _with_measurement(Finding(cmb_id, 0.0, 0.0, 0.0, 0, 0, 0, 0.0, 0, status="added"), m)
        if mine is not None:
            base = replace(base, status=mine.status if mine.status in ADDED_STATUSES else "added", rater=mine.rater,
                           note=mine.note, region=mine.region, mars_area=mine.mars_area, side=mine.side)
        findings.append(base)
    findings.sort(key=lambda f: f.cmb_id)
    return Correction(findings=findings,
                      label_to_cmb={segment.label: cmb_id for cmb_id, segment in claimed.items()},
                      segment_cmb_ids={segment.segment_id: cmb_id for cmb_id, segment in claimed.items()},
                      new_tags=new_tags)


# --- review edits made in the table -----------------------------------------------------------


def parse_status(text: str, allowed: Sequence[str] = STATUSES) -> Optional[str]:
    """The status a cell means: a status or the start of one, any case ("d" is definite); None if none."""
    word = str(text).strip().lower()
    if not word:
        return None
    matches = [status for status in allowed if status.startswith(word)]
    return matches[0] if len(matches) == 1 else None


def _same_cell(expected: Any, value: Any) -> bool:
    if isinstance(expected, float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            return False
        if math.isnan(expected) or math.isnan(number):
            return math.isnan(expected) and math.isnan(number)
        return abs(number - expected) <= 1e-6 * max(1.0, abs(expected))
    if isinstance(expected, int):
        try:
            return int(value) == expected
        except (TypeError, ValueError):
            return False
    return str(value) == str(expected)


@dataclass
class ReviewEdit:
    """The findings after the table's review cells were read back."""

    findings: List[Finding]
    restore: bool  # the table must be refilled: it holds edits that are not allowed
    problems: List[str]


def apply_review_edits(findings: Sequence[Finding], rows: Sequence[Mapping[str, Any]],
                       run_ids: Iterable[int]) -> ReviewEdit:
    """Take the status, rater and note of each table row; anything else edited is refused.

    ``rows`` are the table's rows in order (column name -> cell value, numbers as numbers),
    ``findings`` what the table was filled with. A status may be written as any unambiguous
    start of one, in any case. A CMB found by the run may be unreviewed, definite, possible or
    rejected; one added by the reader added, definite, possible or rejected; one whose segment
    was deleted stays rejected.
    """
    if len(rows) != len(findings):
        return ReviewEdit(list(findings), True, ["Rows cannot be added or removed in the table: add or delete "
                                                 "segments in the Segment Editor, then update the table."])
    run_ids = set(run_ids)
    result: List[Finding] = []
    problems: List[str] = []
    restore = False
    for finding, row in zip(findings, rows):
        expected = dict(zip((c.name for c in TABLE_COLUMNS), finding_row(finding)))
        changed = [name for name, value in expected.items()
                   if name not in REVIEW_COLUMNS and not _same_cell(value, row.get(name))]
        if changed:
            restore = True
            problems.append(f"CMB {finding.cmb_id}: only the status, rater and note can be changed in the table "
                            f"(the other columns are measured).")
        allowed = RUN_STATUSES if finding.cmb_id in run_ids else ADDED_STATUSES
        status = parse_status(str(row.get("status", "")), allowed)
        if status is None:
            restore = True
            status = finding.status
            problems.append(f"CMB {finding.cmb_id}: '{row.get('status', '')}' is not a status; use one of "
                            f"{', '.join(allowed)}.")
        elif is_deleted(finding) and status != "rejected":
            restore = True
            status = finding.status
            problems.append(f"CMB {finding.cmb_id} has no segment any more, so it stays rejected (undo the "
                            f"deletion in the Segment Editor to restore it).")
        if status != str(row.get("status", "")):
            restore = True  # show the full word
        rater = " ".join(str(row.get("rater", "")).split()) or NA
        note = " ".join(str(row.get("note", "")).split())
        if rater != str(row.get("rater", "")) or note != str(row.get("note", "")):
            restore = True
        result.append(replace(finding, status=status, rater=rater, note=note))
    return ReviewEdit(result, restore, problems)


# --- saving -----------------------------------------------------------------------------------


def who_default() -> str:
    """The login name, or "unknown" where the system cannot say."""
    try:
        return getpass.getuser() or "unknown"
    except Exception:  # getpass raises OSError/KeyError/ImportError depending on the platform
        return "unknown"


def list_changes(run_findings: Sequence[Finding], findings: Sequence[Finding]) -> List[Dict[str, Any]]:
    """What differs from the run: added, rejected, edited CMBs and status changes, by id."""
    found = {f.cmb_id: f for f in run_findings}
    changes: List[Dict[str, Any]] = []
    for f in findings:
        before = found.get(f.cmb_id)
        if before is None:
            changes.append({"change": "added", "cmb_id": f.cmb_id, "status": f.status,
                            "volume_mm3": {"before": None, "after": round(f.volume_mm3, 3)},
                            "voxels": {"before": None, "after": f.voxels},
                            "ras": [round(v, 2) for v in f.ras]})
            continue
        deleted = is_deleted(f)
        if f.status == "rejected" and before.status != "rejected":
            changes.append({"change": "rejected", "cmb_id": f.cmb_id,
                            "reason": "segment deleted" if deleted else "rejected by the reader",
                            "status": {"before": before.status, "after": f.status},
                            "volume_mm3": {"before": round(before.volume_mm3, 3),
                                           "after": 0.0 if deleted else round(f.volume_mm3, 3)}})
        if not deleted and is_edited(f):
            changes.append({"change": "edited", "cmb_id": f.cmb_id,
                            "volume_mm3": {"before": round(before.volume_mm3, 3), "after": round(f.volume_mm3, 3)},
                            "voxels": {"before": before.voxels, "after": f.voxels},
                            "ras": {"before": [round(v, 2) for v in before.ras], "after": [round(v, 2) for v in f.ras]}})
        if f.status != before.status and f.status != "rejected":
            changes.append({"change": "status", "cmb_id": f.cmb_id,
                            "status": {"before": before.status, "after": f.status}})
    return changes


def stamp_rater(run_findings: Sequence[Finding], findings: Sequence[Finding], who: str) -> List[Finding]:
    """Name ``who`` as the rater of every CMB the reader changed that names no rater yet."""
    found = {f.cmb_id: f for f in run_findings}
    stamped = []
    for f in findings:
        before = found.get(f.cmb_id)
        changed = before is None or f.status != before.status or is_edited(f) or is_deleted(f)
        stamped.append(replace(f, rater=who) if changed and f.rater in ("", NA) else f)
    return stamped


def summarize(run_findings: Sequence[Finding], findings: Sequence[Finding]) -> Dict[str, int]:
    """Counts of the corrections: CMBs found by the run, added, rejected, edited, status changes, and CMBs now."""
    changes = list_changes(run_findings, findings)
    counts = {"found_by_run": len(run_findings)}
    for kind, key in (("added", "added"), ("rejected", "rejected"), ("edited", "edited"), ("status", "status_changed")):
        counts[key] = sum(1 for c in changes if c["change"] == kind)
    counts["cmb_count"] = sum(1 for f in findings if f.status != "rejected")
    return counts


def summary_text(counts: Mapping[str, int]) -> str:
    """One line saying what the table holds now."""
    count = counts["cmb_count"]
    parts = [f"{counts['found_by_run']} found by the run"]
    parts += [f"{counts[key]} {word}" for key, word in (("edited", "edited"), ("added", "added"),
                                                        ("rejected", "rejected")) if counts[key]]
    return f"{count} microbleed{'' if count == 1 else 's'} ({', '.join(parts)})."


def provenance(run: RunState, findings: Sequence[Finding], who: str, when: Optional[_dt.datetime] = None,
               scan: Optional[Mapping[str, Any]] = None, host: str = "") -> Dict[str, Any]:
    """The corrections.json record: who, when, software, source run, summary, MARS location counts (by
    area x side, definite and possible apart, Boston distribution) and changes."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    record = run.record
    return {
        "format": PROVENANCE_FORMAT,
        "who": who,
        "when": when.astimezone(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": {"name": "shivacmb", "version": __version__, **({"host": host} if host else {})},
        "scan": dict(scan or {}),
        "source_run": {
            "run_json": run.record_path or None,
            "run_json_sha256": hashlib.sha256(run.record_text.encode("utf-8")).hexdigest() if run.record_text else None,
            "findings_sha256": run.findings_sha256,
            "model": {k: (record.get("model") or {}).get(k) for k in ("name", "version", "path")},
            "started": record.get("started"),
            "record": record,
        },
        "summary": summarize(run.findings, findings),
        "location": count_locations(findings),
        "changes": list_changes(run.findings, findings),
        "files": list(SAVED_FILES),
    }


@dataclass
class Saved:
    """What :func:`save` wrote."""

    folder: Path
    findings: List[Finding]  # as written to findings.tsv (raters stamped)
    record: Dict[str, Any]  # as written to corrections.json
    dicom_problem: str = ""  # why no DICOM results were written for a scan from DICOM

    @property
    def files(self) -> List[str]:
        return list(self.record["files"])


def save(folder: PathLike, labels: np.ndarray, grid: Geometry, run: RunState, correction: Correction, who: str,
         scan: Optional[Mapping[str, Any]] = None, host: str = "", when: Optional[_dt.datetime] = None,
         dicom_files: Optional[Sequence[PathLike]] = None) -> Saved:
    """Write cmb.seg.nrrd, findings.tsv and corrections.json of a correction into ``folder``, and, for a scan from
    DICOM (``dicom_files``: its series' files), cmb.seg.dcm and cmb.sr.dcm with the corrected findings.

    ``labels`` is the exported label map the correction was made from. The reader ``who`` is
    named as the rater of each CMB they changed that names none. Every file is written under
    a temporary name first and renamed into place only when all are complete, so a
    failure leaves the folder as it was (a folder this call created is removed again). Other
    files in the folder are left alone. A series the DICOM results cannot be made against
    (not on the scan's grid: the volume was cropped or resampled) leaves them out, and
    ``Saved.dicom_problem`` says why.
    """
    from ..segfile import write_seg_nrrd

    findings = stamp_rater(run.findings, correction.findings, who)
    cmb_labels = cmb_label_map(labels, correction.label_to_cmb)
    dicom, problem = _dicom_results(dicom_files, grid, cmb_labels, findings, run, who)
    record = provenance(run, findings, who, when, scan, host)
    record["files"] += dicom.names if dicom is not None else []
    folder = Path(folder)
    created = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            seg, tsv, prov = (stack.enter_context(atomic_path(folder / name)) for name in SAVED_FILES)
            write_seg_nrrd(seg, cmb_labels, grid, [f for f in findings if not is_deleted(f)])
            if dicom is not None:
                dicom.write(folder, stack)
            tsv.write_text(to_tsv(findings), encoding="utf-8")
            prov.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except BaseException:
        for path in created:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return Saved(folder, findings, record, problem)


def _dicom_results(dicom_files: Optional[Sequence[PathLike]], grid: Geometry, labels: np.ndarray,
                   findings: Sequence[Finding], run: RunState, who: str) -> Tuple[Any, str]:
    """The DICOM results of the corrected findings against the scan's series (None without one), or why not."""
    from ..dicomout import scan_results
    from ..dicomseries import read_series
    from ..errors import InputError

    if not dicom_files:
        return None, ""
    files = [Path(f) for f in dicom_files]
    try:
        series = read_series(files, files[0].parent, grid)
        return scan_results(series, labels, findings, run.record.get("model") or {}, reader=who), ""
    except InputError as err:
        return None, str(err)


def load_saved(folder: PathLike) -> Tuple[List[Finding], Dict[str, Any]]:
    """The findings and provenance record of a saved folder."""
    folder = Path(folder)
    record = json.loads((folder / PROVENANCE_NAME).read_text(encoding="utf-8"))
    return read_tsv(folder / FINDINGS_NAME), record


assert set(REVIEW_COLUMNS) <= {f.name for f in fields(Finding)}
