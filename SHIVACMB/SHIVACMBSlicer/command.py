"""A command run in the background (SHIVACMBLib's ChildProcess), followed from the Qt event loop.

:meth:`CommandLogic.startCommand` is the one way the module starts `shivacmb`: check the
packages, export the scan(s) into a new temporary folder, start the child with Slicer's Python
in the module folder, and remove the folder again on any failure; :class:`SHIVACMBCommand`
removes it when the command ends.
"""

import logging
import os
import shutil
import tempfile
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional

import qt

import slicer
from slicer import vtkMRMLNode

from SHIVACMBLib.slicerside import slicerbridge


class SHIVACMBCommand:
    """A command running in the background, followed from the Qt event loop.

    ``status`` is "running", then "done", "cancelled" or "failed" (``errorMessage`` says why).
    The output queue is drained in the main thread (single-shot QTimers, or :meth:`wait`), so
    ``onFinished(command)`` may use MRML and widgets. ``tempDir``, if given, is removed at the
    end whatever the outcome.
    """

    POLL_INTERVAL_MS = 200

    def __init__(self, process: slicerbridge.ChildProcess, tempDir: Optional[str] = None,
                 onFinished: Optional[Callable[[Any], None]] = None) -> None:
        self.process = process
        self.tempDir = tempDir
        self.onFinished = onFinished
        self.lines: Deque[str] = deque(maxlen=200)
        self.status = "running"
        self.errorMessage = ""

    @property
    def cancelRequested(self) -> bool:
        return self.process.cancel_requested

    def startPolling(self) -> None:
        """Follow the command from the Qt event loop (the GUI stays responsive)."""
        qt.QTimer.singleShot(self.POLL_INTERVAL_MS, self._poll)

    def wait(self) -> None:
        """Follow the command until it ends, blocking the caller."""
        self.process.wait(self._onLine)
        self._finish()

    def cancel(self) -> None:
        self.process.cancel()

    def _poll(self) -> None:
        # A single shot re-armed each time: no timer object outlives the command, and a failing
        # callback cannot leave the command unfinished.
        try:
            for line in self.process.read_lines():
                self._onLine(line)
        finally:
            if self.process.finished:
                self._finish()
            else:
                qt.QTimer.singleShot(self.POLL_INTERVAL_MS, self._poll)

    def _onLine(self, line: str) -> None:
        self.lines.append(line)
        logging.info(line)

    def _finished(self, returncode: int) -> None:
        """Set ``status`` and ``errorMessage`` once the process has exited (subclasses load results here)."""
        if self.process.cancel_requested:
            self.status = "cancelled"
        elif returncode == 0:
            self.status = "done"
        else:
            self.status = "failed"
            self.errorMessage = slicerbridge.error_line(self.lines) or f"exit code {returncode}"

    def _finish(self) -> None:
        try:
            self._finished(self.process.returncode)
        finally:
            if self.tempDir:
                shutil.rmtree(self.tempDir, ignore_errors=True)
        logging.info(f"SHIVA-CMB: {self.status}: {' '.join(self.process.args)}")
        if self.onFinished is not None:
            self.onFinished(self)


class Exports:
    """Files written into a command's temporary folder, and what the user calls each one (error messages
    name the user's nodes, not temporary files)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.fileNames: Dict[str, str] = {}

    def volume(self, volumeNode: vtkMRMLNode, fileName: str, what: str) -> str:
        """Write a volume as NRRD with its exact grid, without touching its storage node."""
        path = os.path.join(self.folder, fileName)
        if not slicer.util.exportNode(volumeNode, path, {"useCompression": 0}):
            raise RuntimeError(f"'{volumeNode.GetName()}' could not be written to {path}.")
        self.fileNames[path] = f"{what} '{volumeNode.GetName()}'"
        return path

    def file(self, fileName: str, what: str) -> str:
        """A path for a file the caller writes."""
        path = os.path.join(self.folder, fileName)
        self.fileNames[path] = what
        return path


class CommandLogic:
    """Starts commands in the background (a mixin of SHIVACMBLogic)."""

    CANCEL_GRACE_S = 10.0

    @staticmethod
    def pythonExecutable() -> str:
        python = shutil.which("PythonSlicer")
        if not python:
            raise RuntimeError("PythonSlicer (Slicer's Python interpreter) was not found.")
        return python

    @staticmethod
    def temporaryFolder(kind: str) -> str:
        """A new folder under Slicer's temporary folder; its owner removes it."""
        # The command prints paths normalised; normalising here lets failure_message recognise them.
        return os.path.normpath(tempfile.mkdtemp(prefix=f"SHIVACMB-{kind}-", dir=slicer.app.temporaryPath))

    def startCommand(self, kind: str, prepare: Callable[[str, Exports], List[str]],
                     wrap: Callable[[str, slicerbridge.ChildProcess, Dict[str, str]], Any]) -> Any:
        """Run `shivacmb` in the background: ``prepare(python, exports)`` writes its inputs and returns its
        arguments; ``wrap(tempDir, process, fileNames)`` makes the command object that follows it."""
        missing = self.missingPackages()
        if missing:
            raise RuntimeError("Install the Python packages SHIVA-CMB needs first: " + ", ".join(missing))
        python, exports = self.pythonExecutable(), Exports(self.temporaryFolder(kind))
        try:
            args = prepare(python, exports)
            process = slicerbridge.ChildProcess(args, cwd=self.moduleDirectory(),
                                                env=slicerbridge.child_environment(slicer.util.startupEnvironment()),
                                                grace_s=self.CANCEL_GRACE_S)
        except Exception:
            shutil.rmtree(exports.folder, ignore_errors=True)
            raise
        logging.info(f"SHIVA-CMB started: {' '.join(args)}")
        return wrap(exports.folder, process, exports.fileNames)

