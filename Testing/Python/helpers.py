"""Plain helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = REPO / "Testing" / "models" / "dark-blob-detector"
SMALL_BOX = (80, 96, 80)  # model box of the small test models (mm)
SMALL_FOV = (100, 120, 90)  # field of view of the small phantoms (mm)


def cpu_provider() -> str:
    """The provider a run on the CPU uses here: the first of `--device cpu`'s plan (OpenVINO where installed)."""
    import onnxruntime

    from SHIVACMBLib.inference import provider_plan

    return provider_plan("cpu", onnxruntime.get_available_providers())[0][0]


def match(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Distance from each true centre to the nearest found centre (inf when nothing was found)."""
    found = np.asarray(found, dtype=float).reshape(-1, 3)
    if len(found) == 0:
        return np.full(len(truth), np.inf)
    return np.linalg.norm(found[:, None, :] - np.asarray(truth)[None, :, :], axis=2).min(axis=0)


def run_cli(args: Sequence[str], cwd: Path = REPO, env: Optional[Dict[str, str]] = None,
            **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m SHIVACMBLib.cli ARGS` in a subprocess (exit code and streams as a user sees them); ``env``
    adds variables to the environment."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "SHIVACMBLib.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, encoding="utf-8", timeout=300, **kwargs)


def files_under(folder: Path) -> List[str]:
    """Every file and folder below ``folder``, hidden ones included (for 'no partial output' checks)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
