"""Progress reporting for the command line and for front ends (the Slicer module).

A reporter is called as ``report(stage, fraction, message)`` with the overall fraction done
(0-1). ``--progress json`` prints one JSON object per line on stdout:
``{"stage": "inference", "fraction": 0.42, "message": "fold 2 of 3 on CPUExecutionProvider"}``;
:func:`parse_progress_line` reads such lines back.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any, Callable, Dict, Optional, Tuple

Reporter = Callable[[str, float, str], None]

# Share of the whole run each stage of one scan takes (for a single overall fraction).
STAGES: Tuple[Tuple[str, float], ...] = (
    ("read", 0.05), ("mask", 0.05), ("preprocess", 0.05), ("inference", 0.6), ("postprocess", 0.05),
    ("location", 0.08), ("dicom", 0.02), ("write", 0.1),
)
PROGRESS_MODES = ("bar", "json", "none")


def stage_reporter(report: Optional[Reporter], stage: str) -> Callable[[float, str], None]:
    """A callable taking the fraction of ``stage`` done and reporting the overall fraction."""
    start = 0.0
    share = 0.0
    for name, weight in STAGES:
        if name == stage:
            share = weight
            break
        start += weight

    def within(fraction: float, message: str = "") -> None:
        if report is not None:
            report(stage, min(1.0, start + share * max(0.0, min(1.0, fraction))), message)

    return within


def json_reporter(stream: Optional[IO[str]] = None) -> Reporter:
    """Print one JSON object per line (flushed at once, so a parent process sees it live)."""

    def report(stage: str, fraction: float, message: str) -> None:
        out = stream or sys.stdout
        out.write(json.dumps({"stage": stage, "fraction": round(fraction, 4), "message": message}) + "\n")
        out.flush()

    return report


def parse_progress_line(line: str) -> Optional[Dict[str, Any]]:
    """A ``--progress json`` line as a dict (stage, fraction 0-1, message, and any other fields of
    the line, such as the final line's output and cmb_count); None for other lines."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or "stage" not in data or "fraction" not in data:
        return None
    try:
        fraction = min(1.0, max(0.0, float(data["fraction"])))
    except (TypeError, ValueError):
        return None
    return dict(data, stage=str(data["stage"]), fraction=fraction, message=str(data.get("message", "")))


class BarReporter:
    """A rich progress bar on stderr (context manager)."""

    def __init__(self, description: str):
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.fields[message]}"), transient=False)
        self._description = description
        self._task = None

    def __enter__(self) -> "BarReporter":
        self._progress.__enter__()
        self._task = self._progress.add_task(self._description, total=1.0, message="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        self._progress.update(self._task, completed=fraction, message=f"{stage}: {message}" if message else stage)


class BatchBar:
    """A rich progress bar of a cohort on stderr: scans done, failed and remaining, and the time left."""

    def __init__(self, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("[bold]scans"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[counts]}"), TimeRemainingColumn(), transient=False)
        self._total = total
        self._task = None

    def __enter__(self) -> "BatchBar":
        self._progress.__enter__()
        self._task = self._progress.add_task("scans", total=self._total, counts="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def __call__(self, outcome: Dict[str, Any]) -> None:
        counts = (f"done {outcome['done']}, already done {outcome['skipped']}, failed {outcome['failed']}, "
                  f"remaining {outcome['remaining']}")
        self._progress.update(self._task, completed=outcome["total"] - outcome["remaining"], counts=counts)
