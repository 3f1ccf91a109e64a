"""What the Slicer module (SHIVACMB.py) needs that does not need Slicer.

The module runs ``shivacmb segment --progress json`` in a background process and turns its
results into MRML nodes. Everything here can be tested without Slicer: the command lines
(segmentation, pip), the Python packages to install into Slicer, the model list shown in the
model selector, the findings table columns, where results are saved, reading the command's
output (progress, final summary, error line) and the background process itself
(:class:`ChildProcess`: a reader thread feeding a queue, cancel by process group on POSIX and
process tree on Windows). Manual corrections are in :mod:`SHIVACMBLib.slicerside.corrections`.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ..findings import Finding
from ..errors import ERROR_PREFIX, Cancelled, InputError, ModelError, RuntimeFailure
from ..files import safe_name
from ..modelstore.models import read_descriptor
from ..progress import parse_progress_line
from ..settings import ScanSettings

CLI_MODULE = "SHIVACMBLib.cli"

# Import name and pip requirement of each package the command needs beyond what Slicer ships
# (Slicer ships numpy, scipy, SimpleITK and pydicom; pip must never replace them, see pip_constraints).
RUNTIME_REQUIREMENTS: Tuple[Tuple[str, str], ...] = (
    ("slicerio", "slicerio>=1.0"),
    ("nrrd", "pynrrd>=1.0"),
    ("rich", "rich>=12"),
    ("platformdirs", "platformdirs>=3"),
    ("highdicom", "highdicom>=0.22"),
    ("pynetdicom", "pynetdicom>=2.0"),
    ("dicomweb_client", "dicomweb-client>=0.59"),
    ("onnx", "onnx>=1.14"),
)
SLICER_PACKAGES = ("numpy", "scipy", "SimpleITK", "pydicom")
# The onnxruntime build of each platform, as the `cpu` and `gpu` extras of pyproject.toml choose it by environment
# markers (a test checks that both agree): onnxruntime-openvino where its wheels exist (x86-64 Linux from Python
# 3.10; Windows from 3.11, with the `openvino` package its wheel loads OpenVINO from, of the release it was built
# against), onnxruntime elsewhere.
ONNXRUNTIME = "onnxruntime>=1.16"
ONNXRUNTIME_GPU = "onnxruntime-gpu>=1.16"
OPENVINO_LINUX = ("onnxruntime-openvino>=1.23",)
OPENVINO_WINDOWS = ("onnxruntime-openvino>=1.24,<1.25", "openvino>=2025.4,<2025.5")
# onnxruntime 1.20 and later have no wheels for Python 3.9 (Slicer 5.8).
ONNXRUNTIME_PY39_LIMIT = "1.20"

# Exit codes of the command (SHIVACMBLib.errors) and what they mean to a user.
FAILURE_HEADLINES: Dict[int, str] = {
    InputError.exit_code: "The scan or the brain mask could not be used.",
    ModelError.exit_code: "The model could not be used.",
    RuntimeFailure.exit_code: "The segmentation failed.",
}


# --- command lines ---------------------------------------------------------------------------


def segment_command(python: str, input_path: str, out_dir: str, settings: ScanSettings, scan_id: str,
                    mask: Optional[str] = None) -> List[str]:
    """Argument list running `shivacmb segment` on one scan with JSON progress lines."""
    args = [python, "-m", CLI_MODULE, "segment", input_path, "--out", out_dir, "--scan-id", scan_id,
            *settings.command_args(), "--progress", "json"]
    return args + (["--mask", mask] if mask else [])


def models_list_command(python: str) -> List[str]:
    """Argument list printing the installed models as JSON."""
    return [python, "-m", CLI_MODULE, "models", "list", "--json"]


def pip_install_command(python: str, constraints: str, requirements: Sequence[str]) -> List[str]:
    """Argument list installing ``requirements`` with pip, as slicer.util.pip_install does, under constraints."""
    return [python, "-m", "pip", "install", "-c", constraints, *requirements]


def scan_id_for(name: str) -> str:
    """A result folder name made from a node name (letters, digits, '.', '_' and '-' only, at most 128: a name
    `files.safe_name` accepts)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:128].rstrip("._-")
    try:
        return safe_name(cleaned, "scan id")
    except InputError:  # nothing left, or a device name (CON, NUL...)
        return "scan"


# --- Python packages -------------------------------------------------------------------------


def onnxruntime_requirements(python_version: Tuple[int, int], platform: str, machine: str,
                             nvidia_gpu: bool) -> List[str]:
    """The onnxruntime build to install (pip requirements): the GPU build on Linux/Windows with an NVIDIA GPU, else
    the fastest CPU build with wheels for this platform (the `cpu` extra's choice)."""
    if nvidia_gpu and (platform.startswith("linux") or platform == "win32"):
        return [ONNXRUNTIME_GPU + (f",<{ONNXRUNTIME_PY39_LIMIT}" if python_version < (3, 10) else "")]
    if platform.startswith("linux") and machine == "x86_64" and python_version >= (3, 10):
        return list(OPENVINO_LINUX)
    if platform == "win32" and machine == "AMD64" and python_version >= (3, 11):
        return list(OPENVINO_WINDOWS)
    return [ONNXRUNTIME + (f",<{ONNXRUNTIME_PY39_LIMIT}" if python_version < (3, 10) else "")]


def missing_requirements(is_installed: Callable[[str], bool], onnxruntime: Sequence[str]) -> List[str]:
    """pip requirements of the packages that cannot be imported.

    The ``onnxruntime`` requirements are installed only when no build is present: every build imports as
    ``onnxruntime``, and two must never share an environment.
    """
    wanted = [requirement for module, requirement in RUNTIME_REQUIREMENTS if not is_installed(module)]
    return wanted + ([] if is_installed("onnxruntime") else list(onnxruntime))


def pip_constraints(versions: Mapping[str, Optional[str]]) -> str:
    """A pip constraints file pinning Slicer's own packages to the versions installed (None: skipped)."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(versions.items()) if version)


# --- models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model selector."""

    label: str  # "name (modalities, licence)"
    value: str  # what --model gets: an installed model's name or a model folder
    tooltip: str
    threshold: float = 0.5  # the model's own threshold, which the panel's threshold takes when it is chosen


def model_label(name: str, modalities: Sequence[str], licence: str) -> str:
    """The selector text "name (modalities, licence)", leaving out what the model does not say."""
    details = ", ".join(part for part in ("/".join(modalities), licence) if part)
    return f"{name} ({details})" if details else name


def model_choice(entry: Mapping[str, Any], value: Optional[str] = None) -> ModelChoice:
    """A selector entry for one model (a `models list --json` row or a model.json with its path)."""
    name = str(entry.get("name", "")) or Path(str(entry.get("path", ""))).name
    modalities = [str(m) for m in entry.get("modalities", []) or []]
    licence = str(entry.get("license", "") or "")
    lines = [f"{name} {entry.get('version', '')}".strip()]
    if entry.get("description"):
        lines.append(str(entry["description"]))
    if licence:
        lines.append(f"Licence: {licence}")
    threshold = float(entry.get("threshold", 0.5))
    lines.append(f"Threshold: {threshold:g}")
    lines.append(f"Folder: {entry.get('path', '')}")
    return ModelChoice(model_label(name, modalities, licence), value if value is not None else name,
                       "\n".join(lines), threshold)


def model_choices(models_json: str) -> Tuple[List[ModelChoice], List[str]]:
    """Selector entries from `shivacmb models list --json`, and one line per unusable model folder.

    A name found in several folders is listed once: the command uses the first one found.
    """
    try:
        data = json.loads(models_json)
        rows = data["models"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"unexpected output of `shivacmb models list --json`: {err}") from None
    return _choices_from_rows(rows)


def installed_model_choices() -> Tuple[List[ModelChoice], List[str]]:
    """The installed models as :func:`model_choices` lists them, read in this process (no command run).

    Reading the descriptors takes milliseconds, so the module lists models without a
    background process; the entries are those of `shivacmb models list --json`.
    """
    from ..modelstore.models import installed_models

    rows: List[Dict[str, Any]] = []
    for entry in installed_models():
        if isinstance(entry, tuple):
            rows.append({"name": entry[0].name, "path": str(entry[0]), "error": entry[1]})
        else:
            rows.append(entry.summary())
    return _choices_from_rows(rows)


def _choices_from_rows(rows: Sequence[Mapping[str, Any]]) -> Tuple[List[ModelChoice], List[str]]:
    choices: List[ModelChoice] = []
    problems: List[str] = []
    seen = set()
    for row in rows:
        if "error" in row:
            where = str(row.get("path", row.get("name", "")))
            problems.append(row["error"] if where in row["error"] else f"{where}: {row['error']}")
        elif row.get("name") not in seen:
            seen.add(row.get("name"))
            choices.append(model_choice(row))
    return choices, problems


def model_folder_choice(folder: Union[str, Path]) -> ModelChoice:
    """A selector entry for a model folder chosen by the user (its value is the folder path).

    The descriptor is validated as the command will (ValueError with the command's message).
    """
    try:
        model = read_descriptor(folder)
    except ModelError as err:
        raise ValueError(str(err)) from None
    return model_choice(model.summary(), value=str(folder))


# --- findings table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of the findings table node."""

    name: str  # as in findings.tsv
    kind: str  # "int", "double" or "string" (the vtkArray type)
    title: str  # column header
    unit: str = ""


# The order shown: id, location, size, probability, then the review columns; the rest after.
TABLE_COLUMNS: Tuple[Column, ...] = (
    Column("cmb_id", "int", "CMB"),
    Column("r", "double", "R (mm)", "mm"),
    Column("a", "double", "A (mm)", "mm"),
    Column("s", "double", "S (mm)", "mm"),
    Column("volume_mm3", "double", "Volume (mm³)", "mm3"),
    Column("max_prob", "double", "Max. probability"),
    Column("status", "string", "Status"),
    Column("note", "string", "Note"),
    Column("rater", "string", "Rater"),
    Column("region", "string", "Region"),
    Column("mars_area", "string", "MARS area"),
    Column("side", "string", "Side"),
    Column("voxels", "int", "Voxels"),
    Column("mean_prob", "double", "Mean probability"),
    Column("fold_agreement", "double", "Fold agreement"),
    Column("i", "int", "I"),
    Column("j", "int", "J"),
    Column("k", "int", "K"),
)

Cell = Union[int, float, str]


def finding_row(finding: Finding) -> List[Cell]:
    """The table cells of one finding, in TABLE_COLUMNS order; unknown numbers are NaN."""
    row: List[Cell] = []
    for column in TABLE_COLUMNS:
        value = getattr(finding, column.name)
        if column.kind == "double":
            row.append(float("nan") if value is None else float(value))
        elif column.kind == "int":
            row.append(int(value))
        else:
            row.append(str(value))
    return row


def column_index(name: str) -> int:
    """Position of a findings column in the table node."""
    for index, column in enumerate(TABLE_COLUMNS):
        if column.name == name:
            return index
    raise KeyError(name)


# --- saving ----------------------------------------------------------------------------------

def default_save_parent(scan_file: Optional[str], last_used: str = "") -> str:
    """Where "Save results" starts: the folder used last, else the scan file's folder, else "" (Qt's choice)."""
    if last_used:
        return last_used
    if scan_file:
        return str(Path(scan_file).resolve().parent)
    return ""


def result_folder(parent: Union[str, Path], node_name: str) -> Path:
    """The folder a scan's results are saved in: ``<parent>/<scan id>``, as the command writes them."""
    return Path(parent) / scan_id_for(node_name)


def existing_results(folder: Union[str, Path], names: Sequence[str]) -> List[str]:
    """Which of ``names`` already exist in ``folder`` (saving replaces them)."""
    return [name for name in names if (Path(folder) / name).exists()]


# --- the command's output --------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """The last line of a successful `segment --progress json` run."""

    output: str
    cmb_count: int
    provider: str
    warnings: List[str] = field(default_factory=list)
    message: str = ""
    precision: str = ""
    hint: str = ""  # a faster precision this CPU could use


def parse_summary_line(line: str) -> Optional[RunSummary]:
    """The summary of a ``{"stage": "done", ...}`` line; None for any other line."""
    data = parse_progress_line(line)
    if data is None or data["stage"] != "done":
        return None
    try:
        return RunSummary(output=str(data["output"]), cmb_count=int(data["cmb_count"]),
                          provider=str(data.get("provider", "")), warnings=[str(w) for w in data.get("warnings", [])],
                          message=data["message"], precision=str(data.get("precision", "")),
                          hint=str(data.get("hint", "")))
    except (KeyError, TypeError, ValueError):
        return None


def result_text(summary: RunSummary) -> str:
    """What the module says after a successful run: count, provider and precision that ran, review reminder,
    warnings, and a faster precision the CPU could use."""
    count = summary.cmb_count
    ran = ", ".join(part for part in (summary.provider, summary.precision) if part)
    lines = [f"{count} microbleed{'' if count == 1 else 's'} found (network run on {ran}).",
             "These are automatic findings: review each one, and look for missed ones, before any use."]
    lines += [f"Warning: {warning}" for warning in summary.warnings]
    if summary.hint:
        lines.append(f"Faster: {summary.hint} (Precision above).")
    return "\n".join(lines)


def error_line(lines: Iterable[str]) -> str:
    """What to tell the user from a failed run's output.

    The text of the last ``shivacmb: error:`` line, else the last non-empty line that is not a
    progress line (a crash that bypassed the command's error handling), else "".
    """
    last_error = ""
    last_other = ""
    for line in lines:
        text = line.strip()
        if text.startswith(ERROR_PREFIX):
            last_error = text[len(ERROR_PREFIX):].strip()
        elif text and parse_progress_line(text) is None:
            last_other = text
    return last_error or last_other


def failure_message(returncode: int, lines: Iterable[str], names: Mapping[str, str]) -> str:
    """Message box text for a failed run; ``names`` maps temporary file paths to what the user knows."""
    if returncode < 0:
        headline = f"The segmentation process was stopped by signal {-returncode}."
    else:
        headline = FAILURE_HEADLINES.get(returncode, f"The segmentation process stopped unexpectedly "
                                                     f"(exit code {returncode}).")
    detail = error_line(lines)
    for path, name in names.items():
        detail = detail.replace(path, name)
    return f"{headline}\n\n{detail}" if detail else headline


class RunMonitor:
    """Follows the output lines of one `shivacmb segment --progress json` run (or, with another ``parse``
    of the final line, of another command's, such as `compare`)."""

    def __init__(self, keep: int = 200, parse: Callable[[str], Any] = parse_summary_line) -> None:
        self.lines: Deque[str] = deque(maxlen=keep)
        self.summary: Optional[Any] = None
        self._parse = parse

    def feed(self, line: str) -> Optional[Dict[str, Any]]:
        """Record one output line; returns it as progress (stage, fraction, message) if it is one."""
        self.lines.append(line)
        progress = parse_progress_line(line)
        if progress is not None and progress["stage"] == "done":
            self.summary = self._parse(line)
        return progress

    def outcome(self, returncode: int, cancel_requested: bool) -> str:
        """How the run ended: "done", "cancelled" or "failed"."""
        if cancel_requested or returncode == Cancelled.exit_code:
            return "cancelled"
        return "done" if returncode == 0 and self.summary is not None else "failed"

    def failure_message(self, returncode: int, names: Mapping[str, str]) -> str:
        """Message box text for a run whose outcome is "failed" (see :func:`failure_message`)."""
        if returncode == 0:
            return "The segmentation process ended without reporting its results."
        return failure_message(returncode, self.lines, names)


# --- background process ----------------------------------------------------------------------

_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # Windows: no console window for the child


def run_command(args: Sequence[str], cwd: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run a short command to completion and capture its output as UTF-8 text."""
    return subprocess.run(list(args), cwd=cwd, env=None if env is None else dict(env), stdin=subprocess.DEVNULL,
                          capture_output=True, encoding="utf-8", errors="replace", timeout=timeout,
                          creationflags=_NO_WINDOW)


def child_environment(base: Mapping[str, str]) -> Dict[str, str]:
    """The child's environment: unbuffered UTF-8 output, so that lines arrive as they are printed."""
    return dict(base, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")


class ChildProcess:
    """A command running in the background, its stdout and stderr merged into one line queue.

    A reader thread puts each output line into a queue, then None when the output ends and the
    process has exited; the owner drains the queue from its own thread (Slicer: a QTimer), so
    nothing but the queue is shared. On POSIX the child leads a new process group, so that
    :meth:`cancel` reaches the launcher and the Python process it starts (SIGTERM, then
    SIGKILL once ``grace_s`` has passed); on Windows the whole process tree is ended.
    """

    def __init__(self, args: Sequence[str], cwd: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                 grace_s: float = 10.0) -> None:
        self.args = list(args)
        self.grace_s = grace_s
        self.cancel_requested = False
        self.finished = False
        self._kill_at: Optional[float] = None
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        posix = os.name == "posix"
        self._process = subprocess.Popen(
            self.args, cwd=cwd, env=None if env is None else dict(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace", bufsize=1,
            start_new_session=posix, creationflags=0 if posix else _NO_WINDOW)
        self._reader = threading.Thread(target=self._read, name="shivacmb-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> Optional[int]:
        return self._process.returncode if self.finished else None

    def _read(self) -> None:
        stream = self._process.stdout
        assert stream is not None
        for line in stream:
            self._queue.put(line.rstrip("\r\n"))
        stream.close()
        self._process.wait()
        self._queue.put(None)

    def read_lines(self, timeout: float = 0.0) -> List[str]:
        """Output lines received since the last call, waiting up to ``timeout`` s for the first one.

        Also sends SIGKILL when a cancelled process outlives its grace period.
        """
        lines: List[str] = []
        try:
            item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            while True:
                if item is None:
                    self.finished = True
                    break
                lines.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        if not self.finished and self._kill_at is not None and time.monotonic() >= self._kill_at:
            self._kill_at = None
            self._signal_group(signal.SIGKILL)
        return lines

    def cancel(self) -> None:
        """Ask the process (and its children) to stop; the command then exits 130 without output."""
        if self.finished or self.cancel_requested:
            return
        self.cancel_requested = True
        if os.name == "posix":
            self._signal_group(signal.SIGTERM)
            self._kill_at = time.monotonic() + self.grace_s
        else:
            # No SIGTERM on Windows: end the launcher and everything it started.
            run_command(["taskkill", "/F", "/T", "/PID", str(self.pid)], timeout=30.0)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            # The whole group has already exited; macOS says so with EPERM when only zombies (exited, not yet
            # reaped) are left in it.
            pass

    def wait(self, on_line: Callable[[str], None], poll_s: float = 0.2) -> int:
        """Block until the process has exited, handing every output line to ``on_line``; the exit code."""
        while not self.finished:
            for line in self.read_lines(timeout=poll_s):
                on_line(line)
        return self._process.returncode
