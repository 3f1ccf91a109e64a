"""Parity of two networks on the same input: do they compute the same probabilities?

The input is a phantom scan (or a scan the user gives) taken through the same read / brain mask /
model box / normalisation code as ``shivacmb segment``. Two probability maps agree when their
largest difference is below the tolerance and their thresholded maps are identical except for
voxels where either probability lies within the tolerance of the threshold.

A reduced precision (fp16 on NVIDIA GPUs, bf16 on CPUs through OpenVINO) rounds every layer: its
probabilities move most on the rims of CMBs, where they cross the threshold (bf16, default model:
up to 0.1 there, under 5e-4 in 99.999 % of voxels). It is judged on what a user gets, the
detections: the 26-connected components above threshold must pair one to one with those of fp32,
centroids within a voxel; its probability differences are reported beside.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

from .models import ModelDescriptor, cache_dir

PHANTOM_SEED = 424242  # the demo phantom: never used for training
HELDOUT_SEED = 900000  # the held-out phantoms (bench/accuracy_bench.py): never used for training or model choice
FP32_TOLERANCE = 1e-3
REDUCED_TOLERANCE = 1e-2  # band reported for fp16 / bf16 against fp32
MAX_SHIFT_VOXELS = 1.0  # largest centroid shift of a detection kept by a reduced precision


@dataclass(frozen=True)
class Detections:
    """Components above threshold in two maps, paired by overlap."""

    reference: int
    candidate: int
    paired: int  # reference components overlapping exactly one candidate component, and it only them
    max_shift_voxels: float  # largest centroid distance of a pair

    @property
    def same(self) -> bool:
        return (self.reference == self.candidate == self.paired
                and self.max_shift_voxels <= MAX_SHIFT_VOXELS)

    def text(self) -> str:
        return (f"detections {self.candidate} vs {self.reference}, {self.paired} paired one to one, "
                f"centroids within {self.max_shift_voxels:.2f} voxel")


def compare_detections(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> Detections:
    """Pair the 26-connected components above ``threshold`` of two maps by their overlap."""
    from ..postprocess import CONNECT_26

    ref, n_ref = ndimage.label(reference > threshold, structure=CONNECT_26)
    cand, n_cand = ndimage.label(candidate > threshold, structure=CONNECT_26)
    both = (ref > 0) & (cand > 0)
    pairs = np.unique(np.stack([ref[both], cand[both]]), axis=1) if both.any() else np.zeros((2, 0), int)
    ref_partners = np.bincount(pairs[0], minlength=n_ref + 1)
    cand_partners = np.bincount(pairs[1], minlength=n_cand + 1)
    one_to_one = [(r, c) for r, c in pairs.T if ref_partners[r] == 1 and cand_partners[c] == 1]
    shift = 0.0
    if one_to_one:
        index = [r for r, _ in one_to_one]
        ref_at = np.array(ndimage.center_of_mass(reference > threshold, ref, index))
        cand_at = np.array(ndimage.center_of_mass(candidate > threshold, cand, [c for _, c in one_to_one]))
        shift = float(np.linalg.norm(ref_at - cand_at, axis=1).max())
    return Detections(reference=n_ref, candidate=n_cand, paired=len(one_to_one), max_shift_voxels=shift)


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
    detections: Optional[Detections] = None  # compared for reduced precisions, and then what decides

    @property
    def passed(self) -> bool:
        if self.detections is not None:
            return self.detections.same
        return self.max_abs_diff < self.tolerance and self.differing_outside_band == 0

    def as_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def text(self) -> str:
        return (f"max abs diff {self.max_abs_diff:.2e} (tolerance {self.tolerance:g}), thresholded maps differ in "
                f"{self.differing} of {self.voxels} voxels ({self.differing_outside_band} outside the "
                f"+-{self.tolerance:g} band around {self.threshold:g}; {self.above_threshold} voxels above it)"
                + (f"; {self.detections.text()}" if self.detections else ""))


def compare(reference: np.ndarray, candidate: np.ndarray, threshold: float, tolerance: float,
            detections: bool = False) -> Parity:
    """Compare two probability maps of the same shape (with ``detections``: judged on the detections)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {reference.shape} and {candidate.shape}")
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    diff = np.abs(ref - cand)
    differ = (ref > threshold) != (cand > threshold)
    near = (np.abs(ref - threshold) <= tolerance) | (np.abs(cand - threshold) <= tolerance)
    return Parity(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()), tolerance=tolerance,
                  threshold=threshold, voxels=int(ref.size), above_threshold=int((ref > threshold).sum()),
                  differing=int(differ.sum()), differing_outside_band=int((differ & ~near).sum()),
                  detections=compare_detections(ref, cand, threshold) if detections else None)


@lru_cache(maxsize=1)
def _phantom() -> Tuple[Any, Any]:
    from ..preprocess import compute_brain_mask
    from ..scan import Scan
    from ..devtools.synthetic import make_phantom

    phantom = make_phantom(PHANTOM_SEED, "swi", (1.0, 1.0, 1.0), n_cmb=8)
    scan = Scan(path=Path(f"phantom-{PHANTOM_SEED}.nii.gz"), image=phantom.image, format="NIfTI", sha256="")
    return scan, compute_brain_mask(scan)


def parity_input(model: ModelDescriptor, scan_path: Optional[Path] = None) -> np.ndarray:
    """The normalised model box [z, y, x] of the phantom (or of ``scan_path``) for ``model``."""
    from ..preprocess import compute_brain_mask, prepare_input

    if scan_path is None:
        scan, mask = _phantom()
    else:
        from ..scan import read_scan

        scan = read_scan(scan_path)
        mask = compute_brain_mask(scan)
    return prepare_input(scan, mask, model).volume


def phantom_scans(first_seed: int, n: int, n_cmb: Optional[int] = None) -> List[Path]:
    """``n`` procedural phantom scans of seeds ``first_seed``... (`shivacmb phantom`; ``n_cmb`` CMBs each, or as
    many as the seed draws), made once into the cache."""
    from ..devtools.synthetic import generate

    folder = cache_dir() / "phantoms" / f"procedural-{first_seed}{'' if n_cmb is None else f'-{n_cmb}cmb'}"
    return [folder / f"{info['scan_id']}.nii.gz" for info in generate(folder, n, first_seed, n_cmb=n_cmb)]


def describe_input(scan_path: Optional[Path]) -> str:
    return str(scan_path) if scan_path else f"phantom SWI scan (shivacmb phantom seed {PHANTOM_SEED}, 1 mm)"
