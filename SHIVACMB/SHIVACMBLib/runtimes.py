"""Which onnxruntime build this environment holds, and which reduced precisions its CPU computes fast.

onnxruntime comes as builds that all import as ``onnxruntime``: ``onnxruntime`` (its own CPU kernels),
``onnxruntime-openvino`` (Intel's OpenVINO kernels: the default install on x86-64 Linux and Windows) and
``onnxruntime-gpu``. Two of them in one environment overwrite each other's files, so the install never
puts two there (environment markers of the ``cpu`` extra; the Slicer module installs one only when none is
importable), and a run that finds two says so. Standard library only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional

BUILDS = ("onnxruntime-openvino", "onnxruntime-gpu", "onnxruntime")
OPENVINO = "OpenVINOExecutionProvider"  # the provider onnxruntime-openvino adds
CPUINFO = Path("/proc/cpuinfo")
# The units that make a reduced precision fast, by /proc/cpuinfo flag, best first.
UNITS = {"int8": (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI")),
         "bf16": (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"))}


def installed_builds() -> List[str]:
    """The onnxruntime builds installed here, as "name version"."""
    from importlib import metadata

    found = []
    for name in BUILDS:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def builds_warning(builds: List[str]) -> Optional[str]:
    """What to do when several onnxruntime builds share this environment (None when there is one)."""
    if len(builds) < 2:
        return None
    return (f"{' and '.join(builds)} are installed in one environment, where they overwrite each other's files: "
            "pip uninstall -y onnxruntime onnxruntime-openvino onnxruntime-gpu, then install shivacmb's `cpu` "
            "(or `gpu`) extra again")


@lru_cache(maxsize=None)
def cpu_flags(cpuinfo: Path = CPUINFO) -> Optional[FrozenSet[str]]:
    """The CPU's instruction-set flags (Linux); None where the OS does not say. Read once per process."""
    try:
        info = cpuinfo.read_text(encoding="utf-8")
    except OSError:
        return None
    return frozenset(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")),
                          []))


def fast_unit(precision: str, cpuinfo: Path = CPUINFO) -> Optional[str]:
    """The unit that computes ``precision`` (int8, bf16) fast on this CPU ("AVX-512 VNNI", "AMX"...), None if
    it has none or the OS does not say."""
    flags = cpu_flags(cpuinfo) or frozenset()
    return next((name for flag, name in UNITS.get(precision, ()) if flag in flags), None)


def cpu_has_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU computes in bfloat16 (AMX or AVX-512 BF16); True where the OS does not say (OpenVINO then
    falls back to fp32 by itself where bf16 is missing)."""
    return cpu_flags(cpuinfo) is None or fast_unit("bf16", cpuinfo) is not None


def fast_precisions(cpuinfo: Path = CPUINFO) -> Dict[str, str]:
    """Reduced precisions this CPU has units for, with the unit's name."""
    return {precision: unit for precision in UNITS if (unit := fast_unit(precision, cpuinfo))}


@lru_cache(maxsize=1)
def cpu_signature() -> str:
    """The CPU as a reduced precision's verification depends on it: model name and the units it could use."""
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in CPUINFO.read_text(encoding="utf-8").splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = sorted(flag for units in UNITS.values() for flag, _ in units if flag in (cpu_flags() or ()))
    return " ".join([name, *flags])


def runtime_key() -> str:
    """A short key of the onnxruntime build(s) and CPU here: a verification holds only where both are the same."""
    return hashlib.sha256(f"{installed_builds()} {cpu_signature()}".encode()).hexdigest()[:12]


def openvino_libraries() -> Optional[Path]:
    """The folder of OpenVINO's libraries in the ``openvino`` package (None where it is not installed)."""
    spec = importlib.util.find_spec("openvino")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "libs"
    return folder if folder.is_dir() else None


@lru_cache(maxsize=1)
def load_openvino_libraries() -> None:
    """Windows: onnxruntime-openvino's wheel finds OpenVINO's DLLs only in a folder on the DLL search path (what
    ``onnxruntime.tools.add_openvino_win_libs`` does); Linux wheels carry them. Once per process."""
    folder = openvino_libraries() if sys.platform == "win32" else None
    if folder is not None:
        os.add_dll_directory(str(folder))  # type: ignore[attr-defined]  # Windows only
        os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
