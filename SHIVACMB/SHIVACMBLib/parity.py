"""Parity of two networks on the same input: do they compute the same probabilities?

The input is a phantom scan (or a scan the user gives) taken through the same read / brain mask /
model box / normalisation code as ``shivacmb segment``. Two probability maps agree when their
largest difference is below the tolerance and their thresholded maps are identical except for
voxels where either probability lies within the tolerance of the threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .models import ModelDescriptor

PHANTOM_SEED = 424242  # the demo phantom: never used for training
FP32_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Parity:
    """How far a candidate's probabilities are from a reference's."""

    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    threshold: float
    voxels: int
    above_threshold: int  # reference voxels above threshold
    differing: int  # voxels thresholded differently
    differing_outside_band: int  # ... of which neither probability is within tolerance of the threshold

    @property
    def passed(self) -> bool:
        return self.max_abs_diff < self.tolerance and self.differing_outside_band == 0

    def as_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def text(self) -> str:
        return (f"max abs diff {self.max_abs_diff:.2e} (tolerance {self.tolerance:g}), thresholded maps differ in "
                f"{self.differing} of {self.voxels} voxels ({self.differing_outside_band} outside the "
                f"+-{self.tolerance:g} band around {self.threshold:g}; {self.above_threshold} voxels above it)")


def compare(reference: np.ndarray, candidate: np.ndarray, threshold: float, tolerance: float) -> Parity:
    """Compare two probability maps of the same shape."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {reference.shape} and {candidate.shape}")
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    diff = np.abs(ref - cand)
    differ = (ref > threshold) != (cand > threshold)
    near = (np.abs(ref - threshold) <= tolerance) | (np.abs(cand - threshold) <= tolerance)
    return Parity(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()), tolerance=tolerance,
                  threshold=threshold, voxels=int(ref.size), above_threshold=int((ref > threshold).sum()),
                  differing=int(differ.sum()), differing_outside_band=int((differ & ~near).sum()))


@lru_cache(maxsize=1)
def _phantom() -> Tuple[Any, Any]:
    from .preprocess import compute_brain_mask
    from .scan import Scan
    from .synthetic import make_phantom

    phantom = make_phantom(PHANTOM_SEED, "swi", (1.0, 1.0, 1.0), n_cmb=8)
    scan = Scan(path=Path(f"phantom-{PHANTOM_SEED}.nii.gz"), image=phantom.image, format="NIfTI", sha256="")
    return scan, compute_brain_mask(scan)


def parity_input(model: ModelDescriptor, scan_path: Optional[Path] = None) -> np.ndarray:
    """The normalised model box [z, y, x] of the phantom (or of ``scan_path``) for ``model``."""
    from .preprocess import compute_brain_mask, prepare_input

    if scan_path is None:
        scan, mask = _phantom()
    else:
        from .scan import read_scan

        scan = read_scan(scan_path)
        mask = compute_brain_mask(scan)
    return prepare_input(scan, mask, model).volume


def describe_input(scan_path: Optional[Path]) -> str:
    return str(scan_path) if scan_path else f"phantom SWI scan (shivacmb phantom seed {PHANTOM_SEED}, 1 mm)"
