"""Errors that end a run, each with the exit code of the `shivacmb` command."""

from __future__ import annotations

from pathlib import Path
from typing import Union


ERROR_PREFIX = "shivacmb: error:"  # how the command starts its one-line error message


class ShivaError(Exception):
    """Base class: a failure the user can act on, reported as one line."""

    exit_code = 4


class InputError(ShivaError):
    """Bad input (unreadable scan or mask, wrong dimensionality, bad geometry, usage)."""

    exit_code = 2

    def __init__(self, path: Union[str, Path, None], problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class ModelError(ShivaError):
    """A model folder or descriptor that cannot be used (missing, corrupt, unsupported)."""

    exit_code = 3


class RuntimeFailure(ShivaError):
    """The computation itself failed (inference backend, disk, memory)."""

    exit_code = 4


class Cancelled(ShivaError):
    """The run was interrupted (Ctrl-C, SIGTERM, Cancel in Slicer)."""

    exit_code = 130


def one_line(err: BaseException, limit: int = 240) -> str:
    """An exception's message on one line (what a one-line error can quote)."""
    text = " ".join(str(err).split())
    return text[:limit] or type(err).__name__
