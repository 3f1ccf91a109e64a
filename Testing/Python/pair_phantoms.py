"""Baseline/follow-up pairs of analytic scenes (tests of `shivacmb compare` and bench/compare_bench.py).

The subject is a small head (ellipsoidal brain in a skull shell) with bright, asymmetric deep
structures, enough anatomy for a rigid registration, and dark spheres as CMBs. At follow-up the
subject has moved by a random rigid transform (rotation up to 15 degrees, translation up to
20 mm), some CMBs are gone and new ones have appeared; the follow-up is acquired on another grid
(spacing, orientation, LPS or RAS axes) and with another contrast (SWI-like vs T2*-GRE-like).

A moved subject is rendered by rendering the still scene on the follow-up grid moved back by the
inverse motion, and stamping the image with the follow-up grid: voxel (i, j, k) then shows the
subject point that the motion brings to that voxel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import SimpleITK as sitk

import phantoms
from SHIVACMBLib import longitudinal
from SHIVACMBLib.evaluate import centroid_pairs
from SHIVACMBLib.findings import Finding
from SHIVACMBLib.geometry import Geometry, resample
from SHIVACMBLib.preprocess import compute_brain_mask
from SHIVACMBLib.scan import Scan

BRAIN_RADII = (30.0, 36.0, 26.0)
SKULL = [(1.12, 0.08)]  # dark skull shell around the brain
FOV_MM = 96.0  # cube side of both fields of view (covers the rotated head)
# deep structures: centre (RAS mm), radius, intensity in the baseline (SWI-like) / follow-up (T2*-like)
STRUCTURES = [((-9.0, 6.0, 2.0), 7.0, 1.45, 1.7), ((11.0, -8.0, -4.0), 6.0, 1.3, 0.55),
              ((3.0, 18.0, 9.0), 5.0, 1.6, 1.25), ((-14.0, -16.0, -9.0), 5.5, 0.55, 1.5),
              ((16.0, 12.0, 11.0), 4.5, 1.35, 1.6)]
CMB_RADIUS = (1.6, 2.6)
CMB_INTENSITY = 0.15  # relative to the tissue around
NOISE = 0.03
MIN_SEPARATION_MM = 10.0  # between CMBs, and from CMBs to structures' surfaces
SPACINGS = [(1.0, 1.0, 1.0), (0.5, 0.5, 2.0), (0.9, 0.9, 2.5), (1.2, 1.2, 1.2), (0.8, 0.8, 1.6), (1.0, 1.0, 3.0)]
RANDOM_SET_SEED = 1000  # the CMB counts of random pair n are drawn with seed RANDOM_SET_SEED + n
DIRECTIONS = {"LPS": np.eye(3), "RAS": np.diag([-1.0, -1.0, 1.0]),
              "PIL": np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)}


@dataclass
class Pair:
    """A baseline and a follow-up image, the motion between them, and the truth of every CMB."""

    baseline: sitk.Image
    followup: sitk.Image
    motion: np.ndarray  # 4x4 RAS: subject point at baseline -> same point at follow-up
    baseline_cmbs: Dict[int, Tuple[np.ndarray, float]]  # truth id -> (baseline RAS, radius)
    followup_cmbs: Dict[int, Tuple[np.ndarray, float]]  # truth id -> (follow-up RAS, radius)

    @property
    def expected(self) -> Dict[str, set]:
        """Truth ids by status."""
        both = set(self.baseline_cmbs) & set(self.followup_cmbs)
        return {"persistent": both, "new": set(self.followup_cmbs) - both,
                "not seen at follow-up": set(self.baseline_cmbs) - both}


def rigid(rng: np.random.Generator, max_degrees: float = 15.0, max_shift_mm: float = 20.0) -> np.ndarray:
    """A random rigid motion (4x4, RAS), rotation about a random axis, random shift direction."""
    motion = np.eye(4)
    motion[:3, :3] = phantoms.rotation(rng.normal(size=3), rng.uniform(-max_degrees, max_degrees))
    shift = rng.normal(size=3)
    motion[:3, 3] = shift / np.linalg.norm(shift) * rng.uniform(0.0, max_shift_mm)
    return motion


def _cmb_sites(rng: np.random.Generator, n: int, taken: List[np.ndarray]) -> List[np.ndarray]:
    sites: List[np.ndarray] = []
    radii = np.asarray(BRAIN_RADII) - 6.0
    blocked = [(np.asarray(c), r) for c, r, _, _ in STRUCTURES]
    while len(sites) < n:
        p = rng.uniform(-1, 1, 3) * radii
        if np.sum((p / radii) ** 2) > 1.0:
            continue
        if any(np.linalg.norm(p - q) < MIN_SEPARATION_MM for q in taken + sites):
            continue
        if any(np.linalg.norm(p - c) < r + 4.0 for c, r in blocked):
            continue
        sites.append(p)
    return sites


@lru_cache(maxsize=2)
def _anatomy(column: int) -> sitk.Image:
    """The still subject without CMBs (tissue = 1, no noise) on a 1 mm grid, in one contrast."""
    structures = [phantoms.Sphere(tuple(c), r, values[column]) for c, r, *values in STRUCTURES]
    scene = phantoms.Scene(spheres=structures, brain_radii=BRAIN_RADII, shells=list(SKULL), tissue=1.0,
                           background=0.025, noise=0.0)
    return phantoms.render(scene, phantoms.grid_around((0.0, 0.0, 0.0), (FOV_MM,) * 3, (1.0, 1.0, 1.0)))


def _image(column: int, on: Geometry, motion: np.ndarray, cmbs: Sequence[Tuple[np.ndarray, float]],
           tissue: float, seed: int) -> sitk.Image:
    """The subject moved by ``motion`` seen on grid ``on``, with dark spheres at the (moved) CMB positions."""
    values = sitk.GetArrayFromImage(resample(_anatomy(column), moved_back(on, motion)))
    offsets = (np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) / 3 - 0.5
    for centre, radius in cmbs:
        ijk = on.ras_to_index(centre)
        reach = (radius + 1.0) / np.asarray(on.spacing) + 1
        lo = np.maximum(np.floor(ijk - reach), 0).astype(int)
        hi = np.minimum(np.ceil(ijk + reach), np.asarray(on.size) - 1).astype(int)
        ii, jj, kk = np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij")
        voxels = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
        inside = np.linalg.norm(on.index_to_ras(voxels[:, None, :] + offsets) - centre, axis=2) <= radius
        fraction = inside.mean(axis=1)
        k, j, i = voxels[:, 2], voxels[:, 1], voxels[:, 0]
        values[k, j, i] *= 1.0 - fraction * (1.0 - CMB_INTENSITY)
    rng = np.random.default_rng(seed)
    values = np.abs(values + rng.normal(0.0, NOISE, values.shape).astype(np.float32)) * tissue
    return on.with_image(values.astype(np.float32))


def grid(centre_ras: Sequence[float], spacing: Sequence[float], orientation: str, oblique_deg: float = 0.0
         ) -> Geometry:
    """A cubic field of view around ``centre_ras``; ``orientation`` names the axes (LPS, RAS, PIL)."""
    direction = phantoms.rotation((1.0, 0.4, 0.2), oblique_deg) @ DIRECTIONS[orientation]
    return phantoms.grid_around(centre_ras, (FOV_MM,) * 3, spacing, direction)


def moved_back(geometry: Geometry, motion: np.ndarray) -> Geometry:
    """The grid that, moved by ``motion`` (RAS), lands on ``geometry``."""
    ijk_to_ras = np.linalg.inv(motion) @ geometry.ijk_to_ras()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras
    return Geometry.from_matrix(geometry.size, lps)


def make_pair(seed: int, n_baseline: int = 6, n_removed: int = 2, n_new: int = 3,
              followup_spacing: Optional[Sequence[float]] = None, followup_orientation: Optional[str] = None,
              motion: Optional[np.ndarray] = None, baseline_orientation: str = "RAS",
              oblique_deg: Optional[float] = None, cmb_radius: Tuple[float, float] = CMB_RADIUS) -> Pair:
    """A pair with random motion, follow-up grid and contrast, unless given."""
    rng = np.random.default_rng(seed)
    drawn = rigid(rng), SPACINGS[rng.integers(len(SPACINGS))], list(DIRECTIONS)[rng.integers(len(DIRECTIONS))], \
        float(rng.uniform(0, 12))  # always drawn, so that what is given changes nothing else
    motion = drawn[0] if motion is None else np.asarray(motion, dtype=float)
    spacing = drawn[1] if followup_spacing is None else followup_spacing
    orientation = followup_orientation or drawn[2]
    oblique = drawn[3] if oblique_deg is None else oblique_deg
    sites = _cmb_sites(rng, n_baseline + n_new, [])
    radii = rng.uniform(*cmb_radius, len(sites))
    baseline_ids = list(range(1, n_baseline + 1))
    gone = set(rng.choice(baseline_ids, size=n_removed, replace=False).tolist()) if n_removed else set()
    followup_ids = [i for i in baseline_ids if i not in gone] + list(range(n_baseline + 1, n_baseline + n_new + 1))
    subject = {i + 1: (sites[i], float(radii[i])) for i in range(len(sites))}

    to_followup = lambda p: motion[:3, :3] @ p + motion[:3, 3]  # noqa: E731
    base_grid = grid((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), baseline_orientation)
    baseline = _image(0, base_grid, np.eye(4), [subject[i] for i in baseline_ids], 600.0, seed)
    follow_grid = grid(motion[:3, 3], spacing, orientation, oblique)
    followup = _image(1, follow_grid, motion, [(to_followup(subject[i][0]), subject[i][1]) for i in followup_ids],
                      420.0, seed + 1)
    return Pair(baseline, followup, motion, {i: subject[i] for i in baseline_ids},
                {i: (to_followup(subject[i][0]), subject[i][1]) for i in followup_ids})


def random_pair(seed: int, **overrides: Any) -> Pair:
    """Pair ``seed`` of the random set (the test suite's and bench/compare_bench.py's): 2-7 CMBs at baseline,
    0-3 of them gone and 0-5 new at follow-up, drawn with the seed; ``overrides`` go to ``make_pair``."""
    rng = np.random.default_rng(RANDOM_SET_SEED + seed)
    n_baseline = int(rng.integers(2, 8))
    n_removed = int(rng.integers(0, min(3, n_baseline) + 1))
    return make_pair(seed, n_baseline=n_baseline, n_removed=n_removed, n_new=int(rng.integers(0, 6)), **overrides)


def truth_findings(cmbs: Dict[int, Tuple[np.ndarray, float]], image: sitk.Image
                   ) -> Tuple[List[Finding], Dict[int, int]]:
    """Findings as a perfect detector reports them (numbered 1..n) and the truth id of each cmb_id."""
    geometry = Geometry.of(image)
    findings, truth_of = [], {}
    for cmb_id, (truth_id, (ras, radius)) in enumerate(sorted(cmbs.items()), start=1):
        i, j, k = (int(v) for v in np.round(geometry.ras_to_index(ras)))
        volume = 4.0 / 3.0 * np.pi * radius ** 3
        findings.append(Finding(cmb_id, *(float(v) for v in ras), i, j, k, round(volume, 2),
                                max(1, int(round(volume / geometry.voxel_volume)))))
        truth_of[cmb_id] = truth_id
    return findings, truth_of


def write_pair(pair: Pair, folder: Path, suffixes: Tuple[str, str] = (".nii.gz", ".nii.gz")) -> Tuple[Path, Path]:
    """Both images on disk (formats from the suffixes)."""
    return (phantoms.write(pair.baseline, folder / f"baseline{suffixes[0]}"),
            phantoms.write(pair.followup, folder / f"followup{suffixes[1]}"))


def truth_ids(cmbs: Dict[int, Tuple[np.ndarray, float]], findings: Sequence[Finding], limit_mm: float = 3.0
              ) -> Dict[int, int]:
    """The truth id of each finding (by cmb_id) within ``limit_mm`` of a true CMB, one to one; false ones left out."""
    ids = list(cmbs)
    truth = np.array([p for p, _ in cmbs.values()], dtype=float).reshape(-1, 3)
    found = np.array([f.ras for f in findings], dtype=float).reshape(-1, 3)
    return {findings[i].cmb_id: ids[j] for i, j in centroid_pairs(found, truth, limit_mm)}


def given_statuses(rows: Sequence[longitudinal.Match], baseline_truth: Dict[int, int],
                   followup_truth: Dict[int, int]) -> Dict[str, Set[int]]:
    """Truth ids by the status the comparison gave them; a row pairing two different CMBs is an error."""
    found: Dict[str, Set[int]] = {status: set() for status in longitudinal.STATUSES}
    for m in rows:
        b = m.baseline and baseline_truth[m.baseline.cmb_id]
        f = m.followup and followup_truth[m.followup.cmb_id]
        assert b is None or f is None or b == f, f"baseline CMB {b} paired with follow-up CMB {f}"
        found[m.status].add(b or f)
    return found


@dataclass
class TruthComparison:
    """A pair compared with its true CMBs as the findings (a perfect detector)."""

    registration: longitudinal.Registration
    rows: List[longitudinal.Match]
    found: Dict[str, Set[int]]  # truth ids by the status given
    expected: Dict[str, Set[int]]  # truth ids by their true status (none outside the other scan)


def scans(pair: Pair) -> Tuple[Scan, Scan]:
    """The baseline and follow-up as scans held in memory."""
    return (Scan(path=Path("baseline"), image=pair.baseline, format="memory", sha256=""),
            Scan(path=Path("followup"), image=pair.followup, format="memory", sha256=""))


def compare_truth(pair: Pair) -> TruthComparison:
    """Register the pair (brain masks computed) and match its true CMBs, as `shivacmb compare` does."""
    baseline, followup = scans(pair)
    registration = longitudinal.register(baseline, followup, compute_brain_mask(baseline),
                                         compute_brain_mask(followup))
    base_findings, base_truth = truth_findings(pair.baseline_cmbs, pair.baseline)
    follow_findings, follow_truth = truth_findings(pair.followup_cmbs, pair.followup)
    rows = longitudinal.match_findings(base_findings, follow_findings, registration, baseline.geometry,
                                       followup.geometry, longitudinal.tolerance_for(baseline.geometry,
                                                                                     followup.geometry))
    return TruthComparison(registration, rows, given_statuses(rows, base_truth, follow_truth),
                           dict(pair.expected, **{longitudinal.OUTSIDE: set()}))
