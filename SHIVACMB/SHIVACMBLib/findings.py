"""The findings table: one record per CMB, read and written as TSV (``findings.tsv``) or JSON.

Columns, in order: cmb_id r a s i j k volume_mm3 voxels max_prob mean_prob fold_agreement
region mars_area side status rater note. r/a/s is the centroid in RAS millimetres, i/j/k the
native voxel holding it. Values not known (a CMB added by hand has no probability; the
anatomical location before it is computed) are written ``n/a``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

from .errors import InputError
from .files import atomic_write_text

COLUMNS = ("cmb_id", "r", "a", "s", "i", "j", "k", "volume_mm3", "voxels", "max_prob", "mean_prob",
           "fold_agreement", "region", "mars_area", "side", "status", "rater", "note")
STATUSES = ("unreviewed", "definite", "possible", "rejected", "added")
NA = "n/a"
_DECIMALS = {"r": 2, "a": 2, "s": 2, "volume_mm3": 2, "max_prob": 4, "mean_prob": 4, "fold_agreement": 3}
_INTEGERS = ("cmb_id", "i", "j", "k", "voxels")
_OPTIONAL_FLOATS = ("max_prob", "mean_prob", "fold_agreement")
EDITED = "edited"  # note item of a CMB whose voxels a reader changed
DELETED = "segment deleted"  # note item of a CMB whose segment a reader deleted
_NOTE_SEPARATOR = "; "

PathLike = Union[str, Path]


@dataclass
class Finding:
    """One CMB."""

    cmb_id: int
    r: float
    a: float
    s: float
    i: int
    j: int
    k: int
    volume_mm3: float
    voxels: int
    max_prob: Optional[float] = None
    mean_prob: Optional[float] = None
    fold_agreement: Optional[float] = None
    region: str = NA
    mars_area: str = NA
    side: str = NA
    status: str = "unreviewed"
    rater: str = NA
    note: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status '{self.status}' is not one of {', '.join(STATUSES)}")

    @property
    def ras(self) -> tuple:
        return (self.r, self.a, self.s)


# --- notes: items separated by "; " ---------------------------------------------------------


def note_items(note: str) -> List[str]:
    return [item.strip() for item in note.split(_NOTE_SEPARATOR.strip()) if item.strip()]


def add_note(note: str, item: str) -> str:
    items = note_items(note)
    return _NOTE_SEPARATOR.join(items if item in items else items + [item])


def remove_note(note: str, item: str) -> str:
    return _NOTE_SEPARATOR.join(i for i in note_items(note) if i != item)


def is_deleted(finding: Finding) -> bool:
    return DELETED in note_items(finding.note)


def is_edited(finding: Finding) -> bool:
    return EDITED in note_items(finding.note)


assert tuple(f.name for f in fields(Finding)) == COLUMNS


def _format(name: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    if name in _DECIMALS:
        return f"{float(value):.{_DECIMALS[name]}f}"
    return " ".join(str(value).split())  # no tabs or newlines inside a cell


def _parse(name: str, text: str) -> Any:
    text = text.strip()
    if name in _INTEGERS:
        return int(text)
    if name in _OPTIONAL_FLOATS:
        return None if text in (NA, "") else float(text)
    if name in _DECIMALS:
        return float(text)
    return text


def to_text_rows(findings: Iterable[Finding]) -> List[Dict[str, str]]:
    """Findings as the cells findings.tsv holds (fixed decimals, ``n/a`` for unknown values)."""
    return [{c: _format(c, value) for c, value in asdict(f).items()} for f in findings]


def to_tsv(findings: Iterable[Finding]) -> str:
    lines = ["\t".join(COLUMNS)] + ["\t".join(row[c] for c in COLUMNS) for row in to_text_rows(findings)]
    return "\n".join(lines) + "\n"


def write_tsv(findings: Iterable[Finding], path: PathLike) -> None:
    atomic_write_text(path, to_tsv(findings))


def read_tsv(path: PathLike) -> List[Finding]:
    """Parse a findings.tsv; columns may come in any order, extra columns are ignored."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read findings table: {err}") from None
    if not lines:
        raise InputError(path, "empty findings table (no header line)")
    header = lines[0].split("\t")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise InputError(path, f"findings table lacks column(s) {', '.join(missing)}")
    where = {c: header.index(c) for c in COLUMNS}
    findings = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) < len(header):
            cells += [""] * (len(header) - len(cells))
        try:
            findings.append(Finding(**{c: _parse(c, cells[where[c]]) for c in COLUMNS}))
        except ValueError as err:
            raise InputError(path, f"line {number}: {err}") from None
    return findings


def to_rows(findings: Iterable[Finding]) -> List[Dict[str, Any]]:
    """Findings as JSON-able dicts; unknown numbers (NaN) become None."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(f).items()}
            for f in findings]


def from_rows(rows: Iterable[Dict[str, Any]]) -> List[Finding]:
    """Findings from dicts; missing optional columns take their defaults, a missing required one is a TypeError,
    a value of the wrong type (a word where a number belongs) a ValueError naming the CMB and the column."""
    findings = []
    for number, row in enumerate(rows, start=1):
        try:
            findings.append(Finding(**{c: _typed(c, row[c]) for c in COLUMNS if c in row}))
        except ValueError as err:
            raise ValueError(f"finding {number}: {err}") from None
    return findings


def _typed(name: str, value: Any) -> Any:
    """A JSON value of column ``name`` as the Finding holds it; ValueError when it is not of that type."""
    if name not in _INTEGERS and name not in _DECIMALS:
        return str(value)
    if value is None and name in _OPTIONAL_FLOATS:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} is {value!r}, not a number")
    if name in _INTEGERS:
        if value != int(value):
            raise ValueError(f"{name} is {value!r}, not a whole number")
        return int(value)
    return float(value)


def to_json(findings: Iterable[Finding]) -> str:
    return json.dumps({"columns": list(COLUMNS), "findings": to_rows(findings)}, indent=2) + "\n"


def write_json(findings: Iterable[Finding], path: PathLike) -> None:
    atomic_write_text(path, to_json(findings))


def read_json(path: PathLike) -> List[Finding]:
    path = Path(path)
    try:
        data: Dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return from_rows(data["findings"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(path, f"cannot read findings JSON: {err}") from None


def read_findings(path: PathLike) -> List[Finding]:
    """Findings from a .tsv or .json file."""
    return read_json(path) if str(path).lower().endswith(".json") else read_tsv(path)
