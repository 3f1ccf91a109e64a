"""File helpers: checksums, atomic writes and staged output folders.

Results are never left half-written: a file is written under a temporary name and renamed
into place; a scan's output folder is filled under a hidden temporary name and renamed
into place as a whole.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from .errors import InputError

PathLike = Union[str, Path]
# Every identifier that becomes a file or folder name (scan ids, rater folders, model names, prefixes):
# ASCII letters, digits, '.', '_', '+', '-', starting with a letter or digit, at most 128 characters, so
# that it is one plain name inside its folder on every platform (never '', '.', '..', a path or a device).
NAME_RULE = "1-128 letters, digits, '.', '_', '+' or '-', starting with a letter or digit"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"{p}{n}" for p in ("COM", "LPT") for n in range(1, 10))}


def safe_name(value: str, what: str, source: Optional[PathLike] = None) -> str:
    """``value`` when it may name a file or folder inside its output folder; else InputError naming it."""
    if _SAFE_NAME.fullmatch(value) and value.split(".")[0].upper() not in _DEVICE_NAMES:
        return value
    shown = repr(value) if len(value) <= 60 else repr(value[:57]) + f"... ({len(value)} characters)"
    raise InputError(source, f"{what} {shown} cannot name a file or folder: use {NAME_RULE}")


def checksum(files: Sequence[PathLike]) -> str:
    """sha256 of the files' bytes, in order (a DICOM series hashes all its files)."""
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _host() -> str:
    return "".join(c for c in socket.gethostname() if c.isalnum()) or "host"


def _temporary_sibling(path: Path, tag: str) -> Path:
    """Hidden unique name beside ``path``: ``.<name>.<tag>-<host>-<pid>-<random>``."""
    return path.with_name(f".{path.name}.{tag}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def clean_stale_siblings(final: Path) -> None:
    """Tidy leftovers of processes (on this host) that died while writing ``final``.

    A staging folder is removed; a previous result that was being swapped out is put back
    if ``final`` is missing, else removed.
    """
    if os.name == "nt":  # no safe liveness probe without extra packages
        return
    prefix = f"{_host()}-"
    for tag in ("partial", "old"):
        for leftover in final.parent.glob(f".{glob.escape(final.name)}.{tag}-*"):
            rest = leftover.name.rsplit(f".{tag}-", 1)[-1]
            if not rest.startswith(prefix):
                continue
            pid = rest[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if tag == "old" and not final.exists():
                os.replace(leftover, final)
            else:
                shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is renamed to ``path``."""
    path = Path(path)
    tmp = _temporary_sibling(path, "tmp")
    # keep the real extension(s) last so writers that dispatch on it (SimpleITK) still work
    tmp = tmp.with_name(tmp.name + "".join(path.suffixes[-2:]) if path.suffixes else tmp.name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_replaceable(final: Path, replaceable: Callable[[Path], bool], what: str) -> None:
    """Refuse when ``final`` exists and is not a folder ``replaceable`` says this program made (``what``)."""
    if (final.exists() or final.is_symlink()) and (final.is_symlink() or not final.is_dir() or not replaceable(final)):
        raise InputError(final, f"exists and is not {what}; nothing was changed: give a new output folder")


@contextlib.contextmanager
def staged_directory(final: PathLike, replaceable: Callable[[Path], bool] = lambda folder: False,
                     what: str = "an earlier result") -> Iterator[Path]:
    """Yield an empty hidden folder beside ``final``; on success it replaces ``final`` whole.

    ``final`` may already exist only as a folder ``replaceable`` accepts (one this program made):
    anything else is refused (InputError), before and after the block, and never moved or removed.
    On failure the staging folder is removed, and so is the parent if this call created it
    and it is still empty, so an interrupted run leaves nothing behind.
    """
    final = Path(final)
    check_replaceable(final, replaceable, what)
    parent = final.parent
    created = [p for p in [parent, *parent.parents] if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(final)
    stage = _temporary_sibling(final, "partial")
    stage.mkdir()  # plain mkdir honours the umask, unlike mkdtemp's 0700
    old = None
    try:
        yield stage
        check_replaceable(final, replaceable, what)
        if final.exists():
            old = _temporary_sibling(final, "old")
            os.replace(final, old)
        os.replace(stage, final)
    except BaseException:
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)  # the previous result stays
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
