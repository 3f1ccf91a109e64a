"""Rating sessions: raters review every CMB of a list of scans, blind or assisted by the AI.

A session is a folder::

    session.json             the scans (id, path, AI findings file), the mode, an id; written once
    ai/<scan_id>.tsv         the AI findings of each scan, copied at creation (never changed)
    raters/<rater>/log.jsonl every change the rater made, one JSON object per line, numbered 1, 2, ...
    raters/<rater>/state.json the rater's ratings after the last change (compact JSON)
    raters/<rater>/lock      held (OS file lock) while the rater's session is open

Each rater writes only their own folder, so raters never write the same file, and one rater's
session can be open in one place at a time (the lock; the OS drops it when the process dies).

Every change is validated, appended to the log as one line (one ``write`` call, then ``fsync``)
and then applied to the state, which is written under a temporary name and renamed. A process
killed at any moment loses at most the change in flight: on opening, a torn last log line is
cut off, and log lines the state has not seen yet (killed between the two writes) are applied
again; the log is the record, the state a checkpoint of it.

Modes. ``assisted``: the rater sees the AI findings and gives each a status (definite, possible,
rejected) and may add CMBs the AI missed; a scan can be submitted only once every AI finding is
reviewed, and reopened later. ``blind``: the rater marks CMBs as points without the AI; the AI
findings of a scan cannot be read through this API before the scan is submitted, and once
submitted the blind marks cannot change (they are what agreement statistics use).

Per finding: status, MARS area (lobar, deep, infratentorial) and side (left, right, midline),
note, time of the last change. Per scan: unrated / in progress / submitted / not ratable (with a
reason: motion, artefact, wrong sequence), definite and possible counts (a mark added without a
certainty counts as definite), rating time (the time from a scan's first change to its last in
each continuous visit, ending at submission; opening a scan starts a new visit, so the time
Slicer was closed does not count). Opening a session resumes at the first unfinished scan.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import re
import secrets
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ..errors import InputError, RuntimeFailure, one_line
from ..files import atomic_write_text, safe_name
from ..findings import NA, Finding, read_findings, write_tsv
from ..mars import AREAS, SIDES

PathLike = Union[str, Path]
Clock = Callable[[], _dt.datetime]

SESSION_FORMAT = "shivacmb-rating-session/1"
STATE_FORMAT = "shivacmb-rating-state/1"
SESSION_NAME = "session.json"
AI_DIR = "ai"
RATERS_DIR = "raters"
LOG_NAME = "log.jsonl"
STATE_NAME = "state.json"
LOCK_NAME = "lock"

MODES = ("assisted", "blind")
REASONS = ("motion", "artefact", "wrong sequence")
AI_STATUSES = ("unreviewed", "definite", "possible", "rejected")  # what a rater may say of an AI finding
MARK_STATUSES = ("added", "definite", "possible", "rejected")  # ... and of a CMB they marked
UNRATED, IN_PROGRESS, SUBMITTED, NOT_RATABLE = "unrated", "in progress", "submitted", "not ratable"
DONE = (SUBMITTED, NOT_RATABLE)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _stamp(when: _dt.datetime) -> str:
    return when.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _seconds(start: str, end: str) -> float:
    return (_dt.datetime.fromisoformat(end) - _dt.datetime.fromisoformat(start)).total_seconds()


def clean_text(text: str) -> str:
    """Text on one line, runs of white space made single spaces."""
    return " ".join(str(text).split())


def rater_folder_name(rater: str) -> str:
    """The folder of a rater inside ``raters/``: letters, digits, ``.``, ``_``, ``-`` kept, the rest ``_``;
    InputError when that is no safe folder name (empty, dots only, over 128 characters)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", clean_text(rater)).strip("._-")
    return safe_name(name, f"rater {clean_text(rater)[:60]!r}: the folder name")


# --- the session description ------------------------------------------------------------------


@dataclass(frozen=True)
class ScanEntry:
    """One scan of a session."""

    scan_id: str
    path: str  # the scan file or DICOM folder, absolute
    ai: Optional[str] = None  # its AI findings, relative to the session folder


@dataclass(frozen=True)
class Session:
    """What session.json says: the scans, the mode, the session's id."""

    folder: Path
    mode: str
    scans: Tuple[ScanEntry, ...]
    session_id: str
    created: str

    @classmethod
    def load(cls, folder: PathLike) -> "Session":
        folder = Path(folder)
        path = folder / SESSION_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != SESSION_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {SESSION_FORMAT!r}")
            scans = tuple(ScanEntry(s["scan_id"], s["path"], s.get("ai")) for s in data["scans"])
            if data["mode"] not in MODES:
                raise ValueError(f"mode {data['mode']!r} is not one of {', '.join(MODES)}")
            return cls(folder, data["mode"], scans, data["id"], data["created"])
        except FileNotFoundError:
            raise InputError(folder, f"not a rating session (no {SESSION_NAME}); make one with "
                                     "`shivacmb review new`") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(path, f"not a rating session file: {err}") from None

    @property
    def scan_ids(self) -> List[str]:
        return [s.scan_id for s in self.scans]

    def entry(self, scan_id: str) -> ScanEntry:
        for scan in self.scans:
            if scan.scan_id == scan_id:
                return scan
        raise InputError(self.folder, f"no scan '{scan_id}' in this session")

    def ai_findings(self, scan_id: str) -> Optional[List[Finding]]:
        """The AI findings of a scan (None: the session has no AI result for it). No blinding here."""
        entry = self.entry(scan_id)
        return None if entry.ai is None else read_findings(self.folder / entry.ai)

    def rater_folders(self) -> List[Path]:
        """Every rater's folder: with a log, or with only a state file (a lost log is flagged, never hidden)."""
        raters = self.folder / RATERS_DIR
        if not raters.is_dir():
            return []
        return sorted(p for p in raters.iterdir() if (p / LOG_NAME).is_file() or (p / STATE_NAME).is_file())


def create_session(folder: PathLike, scans: Sequence[Tuple[str, PathLike]], mode: str,
                   ai: Optional[Dict[str, PathLike]] = None, clock: Clock = _now) -> Session:
    """Make a new session folder from (scan id, path) pairs and, per scan id, AI findings files."""
    folder = Path(folder)
    if mode not in MODES:
        raise InputError(None, f"mode '{mode}' is not one of {', '.join(MODES)}")
    if (folder / SESSION_NAME).exists():
        raise InputError(folder, "already holds a rating session")
    ids = [scan_id for scan_id, _ in scans]
    if not ids:
        raise InputError(folder, "no scans to rate")
    for scan_id, path in scans:
        safe_name(scan_id, "scan id", path)
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InputError(folder, f"scan id(s) given twice: {', '.join(duplicates)}")
    ai = dict(ai or {})
    unknown = sorted(set(ai) - set(ids))
    if unknown:
        raise InputError(folder, f"AI results for scans not in the list: {', '.join(unknown)}")
    copies = {scan_id: read_findings(path) for scan_id, path in ai.items()}  # every file readable first
    created = not folder.exists()
    try:
        (folder / AI_DIR).mkdir(parents=True, exist_ok=True)
        entries = []
        for scan_id, path in scans:
            relative = None
            if scan_id in copies:
                relative = f"{AI_DIR}/{scan_id}.tsv"
                write_tsv(copies[scan_id], folder / relative)
            entries.append({"scan_id": scan_id, "path": str(Path(path).resolve()), "ai": relative})
        record = {"format": SESSION_FORMAT, "id": secrets.token_hex(8), "created": _stamp(clock()), "mode": mode,
                  "scans": entries}
        atomic_write_text(folder / SESSION_NAME, json.dumps(record, indent=1) + "\n")
    except OSError as err:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeFailure(f"cannot write the session {folder}: {err.strerror or err}") from None
    return Session.load(folder)


def scans_from(source: PathLike) -> List[Tuple[str, Path]]:
    """(scan id, path) of a scan list (TSV/CSV with a ``path`` column, optional ``scan_id``) or a folder.

    A folder (for example BIDS-like: ``sub-01/anat/sub-01_swi.nii.gz``) gives every image file below
    it, and every folder of ``.dcm`` files, in path order; the scan id is the file name without
    extensions. Relative paths in a list are relative to the list's folder.
    """
    from ..scan import find_scans, scan_id_from_path

    source = Path(source)
    if source.is_dir():
        return [(safe_name(scan_id_from_path(p), "scan id (the file name)", p), p) for p in find_scans(source)]
    try:
        with open(source, newline="", encoding="utf-8") as stream:
            text = stream.read()
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if "\t" in text.split("\n")[0] else ","))
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(source, f"cannot read scan list: {err}") from None
    if not rows or "path" not in rows[0]:
        raise InputError(source, "a scan list needs a header line with a 'path' column (and optionally 'scan_id')")
    result = []
    for number, row in enumerate(rows, start=2):
        if not (row.get("path") or "").strip():
            raise InputError(source, f"line {number}: no path")
        path = Path(row["path"].strip())
        path = path if path.is_absolute() else source.parent / path
        if not path.exists():
            raise InputError(source, f"line {number}: {path}: no such scan file or folder")
        scan_id = (row.get("scan_id") or "").strip() or scan_id_from_path(path)
        result.append((safe_name(scan_id, f"line {number}: scan id", source), path))
    return result


def ai_results(folder: PathLike, scan_ids: Sequence[str]) -> Dict[str, Path]:
    """Scan id -> AI findings: ``<folder>/<scan_id>/findings.tsv`` (``shivacmb segment``) or ``<folder>/<scan_id>.tsv``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "no such folder of AI results")
    found = {}
    for scan_id in scan_ids:
        for path in (folder / scan_id / "findings.tsv", folder / f"{scan_id}.tsv"):
            if path.is_file():
                found[scan_id] = path
                break
    if not found:
        raise InputError(folder, "no AI results for any scan (<scan_id>/findings.tsv or <scan_id>.tsv)")
    return found


# --- one rater's ratings ----------------------------------------------------------------------


@dataclass
class Mark:
    """The rater's word on one finding: an AI finding (origin "ai") or a CMB they marked ("rater")."""

    cmb_id: int
    origin: str
    status: str
    mars_area: str = NA
    side: str = NA
    note: str = ""
    ras: Optional[Tuple[float, float, float]] = None  # marks of the rater; AI findings have theirs
    changed: str = ""


@dataclass
class ScanRating:
    """One rater's rating of one scan."""

    state: str = UNRATED
    reason: str = ""  # why not ratable
    note: str = ""
    seconds: float = 0.0  # rating time of finished visits
    first: str = ""  # time of the first change
    finished: str = ""  # time of submission
    marks: Dict[int, Mark] = field(default_factory=dict)

    def counts(self) -> Dict[str, int]:
        """Definite (added marks included) and possible CMBs."""
        statuses = [m.status for m in self.marks.values()]
        definite = sum(s in ("definite", "added") for s in statuses)
        possible = statuses.count("possible")
        return {"definite": definite, "possible": possible, "total": definite + possible}


@dataclass
class Ratings:
    """Everything one rater did in a session, as of log line ``n``."""

    rater: str
    session_id: str
    scans: Dict[str, ScanRating]
    n: int = 0
    visit: Optional[Dict[str, str]] = None  # {"scan", "start", "last"}: the scan being rated
    problems: List[str] = field(default_factory=list)  # what is wrong with the rater's files (not saved)

    def seconds(self, scan_id: str) -> float:
        """Rating time of a scan, the visit going on included."""
        total = self.scans[scan_id].seconds
        if self.visit and self.visit["scan"] == scan_id:
            total += _seconds(self.visit["start"], self.visit["last"])
        return total

    def to_json(self) -> str:
        data = {"format": STATE_FORMAT, "rater": self.rater, "session": self.session_id, "n": self.n,
                "visit": self.visit, "scans": {k: asdict(v) for k, v in self.scans.items()}}
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Ratings":
        data = json.loads(text)
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {STATE_FORMAT!r}")
        scans = {}
        for scan_id, rating in data["scans"].items():
            marks = {int(k): Mark(**{**m, "ras": tuple(m["ras"]) if m["ras"] else None})
                     for k, m in rating.pop("marks").items()}
            scans[scan_id] = ScanRating(**rating, marks=marks)
        return cls(data["rater"], data["session"], scans, data["n"], data["visit"])

    def apply(self, event: Dict[str, Any]) -> None:
        """Apply one (valid) log event."""
        kind, t, scan_id = event["event"], event["t"], event["scan"]
        rating = self.scans[scan_id]
        if kind == "open" or (self.visit and self.visit["scan"] != scan_id):
            self._end_visit()
        if self.visit is None:
            self.visit = {"scan": scan_id, "start": t, "last": t}
        self.visit["last"] = t
        if rating.state == UNRATED:
            rating.state = IN_PROGRESS
        if kind != "open":
            rating.first = rating.first or t
        if kind == "set":
            mark = rating.marks.get(event["cmb_id"]) or Mark(event["cmb_id"], "ai", "unreviewed")
            for key in ("status", "mars_area", "side", "note"):
                if key in event:
                    setattr(mark, key, event[key])
            mark.changed = t
            rating.marks[mark.cmb_id] = mark
        elif kind == "add":
            rating.marks[event["cmb_id"]] = Mark(event["cmb_id"], "rater", event["status"], event["mars_area"],
                                                 event["side"], event["note"], tuple(event["ras"]), t)
        elif kind in ("submit", "not_ratable"):
            rating.state = SUBMITTED if kind == "submit" else NOT_RATABLE
            rating.reason = event.get("reason", "")
            rating.note = event.get("note", rating.note)
            rating.finished = t
            self._end_visit()
        elif kind == "reopen":
            rating.state, rating.reason, rating.finished = IN_PROGRESS, "", ""
        self.n = event["n"]

    def _end_visit(self) -> None:
        if self.visit is not None:
            self.scans[self.visit["scan"]].seconds += _seconds(self.visit["start"], self.visit["last"])
            self.visit = None


def _read_log(path: Path, repair: bool) -> List[Dict[str, Any]]:
    """The events of a log; a torn last line (a write cut short) is dropped, and cut off when ``repair``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise InputError(path, f"cannot read the rating log: {err.strerror or err}") from None
    lines = data.split(b"\n")
    good_end = len(data) - len(lines[-1])  # bytes up to the last newline
    events = []
    for number, line in enumerate(lines[:-1], start=1):
        try:
            event = json.loads(line)
        except ValueError:  # a torn write has no newline yet, so this is damage, not a crash
            raise InputError(path, f"line {number} is not a rating event") from None
        if event.get("n") != number:
            raise InputError(path, f"line {number} is numbered {event.get('n')}: lines were lost or repeated")
        events.append(event)
    if repair and good_end < len(data):
        with open(path, "r+b") as stream:
            stream.truncate(good_end)
    return events


def read_ratings(session: Session, folder: Path, repair: bool = False) -> Ratings:
    """A rater's ratings: the state file brought up to date with the log (rebuilt from it when missing).

    The state is read before the log: a session writing meanwhile appends to the log first, so the
    log read is never behind the state read.
    """
    state_path, log_path = folder / STATE_NAME, folder / LOG_NAME
    ratings, damage = None, None
    try:
        ratings = Ratings.from_json(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        damage = f"not a rating state file: {one_line(err)}"
    if not log_path.is_file() and ratings is not None:
        ratings.problems.append(f"{log_path} is missing: the ratings are those of {STATE_NAME} ({ratings.n} "
                                "changes), without their record; restore the log from a backup")
        return ratings
    events = _read_log(log_path, repair)
    if damage is not None:
        if not events:
            raise InputError(state_path, damage)
        ratings = None  # rebuilt from the log, which is the record
    if ratings is not None:
        if ratings.session_id != session.session_id:
            raise InputError(state_path, "belongs to another session")
        if ratings.n > len(events):
            raise InputError(state_path, f"is ahead of {LOG_NAME} ({ratings.n} changes, the log has {len(events)})")
    if ratings is None:
        rater = events[0]["rater"] if events else folder.name
        ratings = Ratings(rater, session.session_id, {s: ScanRating() for s in session.scan_ids})
        if damage is not None:
            ratings.problems.append(f"{state_path}: {damage}; rebuilt from {LOG_NAME}")
    for event in events[ratings.n:]:
        try:
            ratings.apply(event)
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(folder / LOG_NAME, f"line {event['n']} is not a valid change: {err}") from None
    return ratings


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an OS lock on ``path`` (released by the OS if the process dies); InputError when held elsewhere."""
    stream = open(path, "a+b")
    try:
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(stream.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(path.parent, "this rater's session is open elsewhere (another Slicer or process); "
                                          "close it there first") from None
        yield
    finally:
        stream.close()


class RatingSession:
    """One rater working on a session: the only writer of ``raters/<rater>/``.

    Use as a context manager, or call :meth:`close`. Every method that changes something saves
    the change before it returns.
    """

    def __init__(self, folder: PathLike, rater: str, clock: Clock = _now) -> None:
        self.session = Session.load(folder)
        self.rater = clean_text(rater)
        self.folder = self.session.folder / RATERS_DIR / rater_folder_name(self.rater)
        self._clock = clock
        self._ai: Dict[str, List[Finding]] = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        try:
            self._stack.enter_context(_locked(self.folder / LOCK_NAME))
            self.ratings = read_ratings(self.session, self.folder, repair=True)
            if self.ratings.n and not (self.folder / LOG_NAME).is_file():
                raise InputError(self.folder / LOG_NAME, "is missing, so new changes could not be recorded in "
                                                         "order; restore it from a backup")
            if self.ratings.n and self.ratings.rater != self.rater:
                raise InputError(self.folder, f"holds the ratings of '{self.ratings.rater}', not '{self.rater}'")
            self.ratings.rater = self.rater
            self._write_state()
            self._log = self._stack.enter_context(open(self.folder / LOG_NAME, "ab", buffering=0))
        except BaseException:
            self._stack.close()
            raise

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "RatingSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.session.mode

    @property
    def scan_ids(self) -> List[str]:
        return self.session.scan_ids

    def rating(self, scan_id: str) -> ScanRating:
        self.session.entry(scan_id)
        return self.ratings.scans[scan_id]

    def current_index(self) -> int:
        """Index of the first unfinished scan (the number of scans when all are done)."""
        return next((i for i, s in enumerate(self.scan_ids) if self.ratings.scans[s].state not in DONE),
                    len(self.scan_ids))

    def done(self) -> int:
        return sum(r.state in DONE for r in self.ratings.scans.values())

    def ai_findings(self, scan_id: str) -> List[Finding]:
        """The AI findings of a scan; in blind mode only once the scan is submitted."""
        if self.mode == "blind" and self.rating(scan_id).state not in DONE:
            raise InputError(self.session.folder, f"blind session: the AI findings of '{scan_id}' are shown only "
                                                  "after the scan is submitted")
        if scan_id not in self._ai:
            self._ai[scan_id] = self.session.ai_findings(scan_id) or []
        return self._ai[scan_id]

    def findings(self, scan_id: str) -> List[Finding]:
        """What the rater rates: the AI findings with the rater's status (assisted only) and their own marks.

        The rater's marks are points: ``i j k`` are -1 and the volume 0.
        """
        rating = self.rating(scan_id)
        shown: List[Finding] = []
        if self.mode == "assisted":
            for ai in self.ai_findings(scan_id):
                mark = rating.marks.get(ai.cmb_id)
                # only the rater's word counts: a status or note in the AI file (a reviewed results file) is not theirs
                shown.append(replace(ai, status="unreviewed", rater=NA, note="") if mark is None
                             else _reviewed(ai, mark, self.rater))
        for mark in sorted(rating.marks.values(), key=lambda m: m.cmb_id):
            if mark.origin == "rater":
                shown.append(_reviewed(Finding(mark.cmb_id, *mark.ras, -1, -1, -1, 0.0, 0), mark, self.rater))
        return shown

    # --- changing --------------------------------------------------------------------------

    def open_scan(self, scan_id: str) -> None:
        """Start (or resume) rating an unfinished scan: its rating time runs from here."""
        self._changeable(scan_id)
        self._save({"event": "open", "scan": scan_id})

    def set_status(self, scan_id: str, cmb_id: int, status: Optional[str] = None, mars_area: Optional[str] = None,
                   side: Optional[str] = None, note: Optional[str] = None) -> None:
        """Change what the rater says of one finding (only what is given)."""
        rating = self._changeable(scan_id)
        mark = rating.marks.get(cmb_id)
        if mark is not None and mark.origin == "rater":
            allowed = MARK_STATUSES
        elif self.mode == "assisted" and any(f.cmb_id == cmb_id for f in self.ai_findings(scan_id)):
            allowed = AI_STATUSES
        else:
            raise InputError(self.session.folder, f"scan '{scan_id}' has no CMB {cmb_id} to rate")
        event: Dict[str, Any] = {"event": "set", "scan": scan_id, "cmb_id": int(cmb_id)}
        if status is not None:
            event["status"] = _choice(status, allowed, "status")
        event.update(self._location(mars_area, side))
        if note is not None:
            event["note"] = clean_text(note)
        self._save(event)

    def add(self, scan_id: str, ras: Sequence[float], status: str = "added", mars_area: str = NA, side: str = NA,
            note: str = "") -> int:
        """Mark a CMB at a RAS point (mm, the scan's own coordinates); its id."""
        rating = self._changeable(scan_id)
        ras = tuple(float(v) for v in ras)
        if len(ras) != 3 or not all(v == v and abs(v) < 1e6 for v in ras):
            raise InputError(self.session.folder, f"not a RAS point: {ras}")
        used = set(rating.marks)
        if self.mode == "assisted":  # one numbering with the AI findings; in blind mode they are unknown
            used |= {f.cmb_id for f in self.ai_findings(scan_id)}
        cmb_id = max(used, default=0) + 1
        location = {"mars_area": NA, "side": NA, **self._location(mars_area, side)}
        self._save({"event": "add", "scan": scan_id, "cmb_id": cmb_id, "ras": [round(v, 3) for v in ras],
                    "status": _choice(status, MARK_STATUSES, "status"), **location, "note": clean_text(note)})
        return cmb_id

    def submit(self, scan_id: str, note: Optional[str] = None) -> None:
        """The scan is rated. In assisted mode every AI finding must have been reviewed."""
        self._changeable(scan_id)
        if self.mode == "assisted":
            pending = [str(f.cmb_id) for f in self.findings(scan_id) if f.status == "unreviewed"]
            if pending:
                raise InputError(self.session.folder, f"scan '{scan_id}': CMB {', '.join(pending)} not reviewed yet")
        self._save({"event": "submit", "scan": scan_id, **({} if note is None else {"note": clean_text(note)})})

    def not_ratable(self, scan_id: str, reason: str, note: str = "") -> None:
        """The scan cannot be rated (motion, artefact, wrong sequence)."""
        self._changeable(scan_id)
        self._save({"event": "not_ratable", "scan": scan_id, "reason": _choice(reason, REASONS, "reason"),
                    "note": clean_text(note)})

    def reopen(self, scan_id: str) -> None:
        """Rate a finished scan again (assisted mode only: blind marks stay as submitted)."""
        if self.mode == "blind":
            raise InputError(self.session.folder, f"blind session: '{scan_id}' keeps its marks as submitted")
        if self.rating(scan_id).state not in DONE:
            raise InputError(self.session.folder, f"scan '{scan_id}' is not finished")
        self._save({"event": "reopen", "scan": scan_id})

    def _changeable(self, scan_id: str) -> ScanRating:
        rating = self.rating(scan_id)
        if rating.state in DONE:
            how = "keeps its blind marks as submitted" if self.mode == "blind" else "is finished; reopen it first"
            raise InputError(self.session.folder, f"scan '{scan_id}' {how}")
        return rating

    def _location(self, mars_area: Optional[str], side: Optional[str]) -> Dict[str, str]:
        given = {}
        if mars_area is not None:
            given["mars_area"] = _choice(mars_area, AREAS + (NA,), "MARS area")
        if side is not None:
            given["side"] = _choice(side, SIDES + (NA,), "side")
        return given

    def _save(self, event: Dict[str, Any]) -> None:
        """Log the change (one line, flushed to disk), apply it, write the state.

        A write that fails part-way (a full disk) is cut off again, so that the next change does not
        land behind half a line and make the log unreadable.
        """
        event = {"n": self.ratings.n + 1, "t": _stamp(self._clock()), "rater": self.rater, **event}
        line = (json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
        size = os.fstat(self._log.fileno()).st_size
        try:
            written = self._log.write(line)
            if written != len(line):
                raise OSError(f"only {written} of {len(line)} bytes written")
            os.fsync(self._log.fileno())
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(self._log.fileno(), size)
            raise RuntimeFailure(f"cannot save the change in {self.folder / LOG_NAME}: {err}") from None
        self.ratings.apply(event)
        self._write_state()

    def _write_state(self) -> None:
        try:
            atomic_write_text(self.folder / STATE_NAME, self.ratings.to_json())
        except OSError as err:  # the log has the change: the next opening rebuilds the state
            raise RuntimeFailure(f"cannot write {self.folder / STATE_NAME}: {err.strerror or err}") from None


def _choice(value: str, allowed: Sequence[str], what: str) -> str:
    value = clean_text(value)
    if value not in allowed:
        raise InputError(None, f"{what} '{value}' is not one of {', '.join(allowed)}")
    return value


def _reviewed(finding: Finding, mark: Mark, rater: str) -> Finding:
    """A finding as the rater left it."""
    area = finding.mars_area if mark.mars_area == NA else mark.mars_area
    side = finding.side if mark.side == NA else mark.side
    return replace(finding, status=mark.status, mars_area=area, side=side, note=mark.note, rater=rater)


# --- all raters (status and export: rating/export.py) ---------------------------------------------------------------


def all_ratings(session: Session) -> List[Ratings]:
    """Every rater's ratings (read-only: a log being written by an open session is read up to its last whole line)."""
    return [read_ratings(session, folder) for folder in session.rater_folders()]
