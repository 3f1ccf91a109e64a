"""What the module's "Compare with baseline" section runs and shows, without Slicer.

The command line of `shivacmb compare`, its final progress line, the rows of comparison.tsv as
typed table cells (all CMBs, or the new ones only), and the registration as the transform that
puts the follow-up on the baseline in Slicer's RAS world.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..longitudinal import COLUMNS, NEW
from ..progress import parse_progress_line
from ..settings import ScanSettings
from .slicerbridge import CLI_MODULE, Cell, Column

# The order shown: status and ids, then the positions each view jumps to, volumes, distance.
TABLE_COLUMNS: Tuple[Column, ...] = (
    Column("status", "string", "Status"),
    Column("followup_id", "string", "Follow-up CMB"),
    Column("baseline_id", "string", "Baseline CMB"),
    Column("followup_r", "double", "Follow-up R (mm)", "mm"),
    Column("followup_a", "double", "Follow-up A (mm)", "mm"),
    Column("followup_s", "double", "Follow-up S (mm)", "mm"),
    Column("baseline_r", "double", "Baseline R (mm)", "mm"),
    Column("baseline_a", "double", "Baseline A (mm)", "mm"),
    Column("baseline_s", "double", "Baseline S (mm)", "mm"),
    Column("followup_volume_mm3", "double", "Follow-up volume (mm³)", "mm3"),
    Column("baseline_volume_mm3", "double", "Baseline volume (mm³)", "mm3"),
    Column("distance_mm", "double", "Distance (mm)", "mm"),
)
assert sorted(c.name for c in TABLE_COLUMNS) == sorted(COLUMNS)
LPS_RAS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])


def compare_command(python: str, baseline: str, followup: str, out_dir: str, settings: ScanSettings,
                    baseline_findings: Optional[str] = None, followup_findings: Optional[str] = None) -> List[str]:
    """Argument list running `shivacmb compare` with JSON progress lines (detection settings from ``settings``)."""
    args = [python, "-m", CLI_MODULE, "compare", baseline, followup, "--out", out_dir, *settings.command_args(),
            "--progress", "json"]
    for option, value in (("--baseline-findings", baseline_findings), ("--followup-findings", followup_findings)):
        if value:
            args += [option, value]
    return args


@dataclass(frozen=True)
class ComparisonSummary:
    """The last line of a successful `compare --progress json` run."""

    output: str
    counts: Dict[str, int]
    grade: str
    message: str


def parse_summary_line(line: str) -> Optional[ComparisonSummary]:
    """The summary of a ``{"stage": "done", ...}`` line of `compare`; None for any other line."""
    data = parse_progress_line(line)
    if data is None or data["stage"] != "done":
        return None
    try:
        return ComparisonSummary(str(data["output"]), {str(k): int(v) for k, v in data["counts"].items()},
                                 str(data["grade"]), data["message"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def result_text(summary: ComparisonSummary) -> str:
    """What the section says after a comparison: counts, grade, and who decides."""
    counts = ", ".join(f"{n} {status}" for status, n in summary.counts.items() if n) or "no CMB"
    return (f"{counts}. ARIA-H microhemorrhage grade from the new CMBs: {summary.grade}.\n"
            "These are automatic findings: a radiologist confirms every new CMB and decides.")


def table_rows(rows: Sequence[Mapping[str, str]], new_only: bool) -> List[Dict[str, str]]:
    """The comparison.tsv rows shown: the new CMBs only, or all."""
    return [dict(row) for row in rows if not new_only or row["status"] == NEW]


def table_cells(row: Mapping[str, str]) -> List[Cell]:
    """The typed cells of one comparison.tsv row, in TABLE_COLUMNS order; n/a numbers are NaN."""
    return [float("nan") if column.kind == "double" and row[column.name] == "n/a"
            else float(row[column.name]) if column.kind == "double" else row[column.name]
            for column in TABLE_COLUMNS]


def positions(row: Mapping[str, str]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Where each view goes for a row: the baseline's and the follow-up's own RAS position."""
    return tuple(float(row[f"baseline_{c}"]) for c in "ras"), tuple(float(row[f"followup_{c}"]) for c in "ras")


def followup_to_baseline_ras(summary: Mapping[str, Any]) -> np.ndarray:
    """4x4 matrix taking follow-up RAS points to baseline RAS points (comparison.json's registration)."""
    baseline_to_followup = np.asarray(summary["registration"]["baseline_to_followup_lps"], dtype=float)
    matrix = LPS_RAS_4 @ np.linalg.inv(baseline_to_followup) @ LPS_RAS_4
    if not np.all(np.isfinite(matrix)) or math.isclose(abs(np.linalg.det(matrix[:3, :3])), 0.0):
        raise ValueError("comparison.json holds no usable registration matrix")
    return matrix
