"""Scans made from the shipped MNI atlas, with CMBs planted at known atlas regions.

A phantom is the atlas T1 template with a T2*-like contrast (inverted: CSF bright, white matter
dark), moved by a known affine (rotation, anisotropic scaling, shift) and, where asked, a smooth
non-linear warp (anatomy that no affine registration can match), sampled on any grid
(orientation, obliquity, voxel size), with a smooth bias field, noise, and dark spheres whose
MNI centres lie where the atlas region is the same all around them. Truth per CMB: the atlas
region, MARS area and side (sign of MNI x) at its centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SHIVACMBLib.findings import Finding
from SHIVACMBLib.geometry import LPS_RAS, Geometry
from SHIVACMBLib.location import SUBREGIONS, load_atlas
from SHIVACMBLib.scan import Scan

from phantoms import grid_around, rotation


@dataclass
class AtlasPhantom:
    image: sitk.Image
    labels: np.ndarray  # [k, j, i], CMB k = label k
    findings: List[Finding]
    truth: List[Tuple[str, str, str, float]]  # region, area, side, MNI x (RAS mm) per CMB

    def scan(self) -> Scan:
        return Scan(path=__import__("pathlib").Path("atlas-phantom.nii.gz"), image=self.image, format="nifti",
                    sha256="")


AXES = {"axial": np.eye(3), "sagittal": np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float),
        "coronal": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)}


def random_grid(rng: np.random.Generator) -> Tuple[str, Tuple[float, float, float], np.ndarray]:
    """A clinical acquisition grid: axial, sagittal or coronal slices tilted by up to 20 degrees, LPS or
    RAS-stored axes, 0.8-1.2 mm in plane, 1-3 mm slices; its name, spacing and LPS direction."""
    name = str(rng.choice(list(AXES)))
    direction = AXES[name] @ rotation(rng.normal(size=3), rng.uniform(0, 20))
    if rng.random() < 0.5:
        direction = np.diag([-1.0, -1.0, 1.0]) @ direction  # RAS-stored axes
    in_plane = float(rng.uniform(0.8, 1.2))
    return name, (in_plane, in_plane, float(rng.choice([1.0, 1.5, 2.0, 3.0]))), direction


def subject_transform(rng: np.random.Generator) -> sitk.AffineTransform:
    """Scan LPS -> MNI LPS: a head rotated by up to 12 degrees, scaled 0.9-1.1 per axis, shifted up to 10 mm."""
    matrix = rotation(rng.normal(size=3), rng.uniform(-12, 12)) @ np.diag(rng.uniform(0.9, 1.1, 3))
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(np.linalg.inv(matrix).ravel()))
    transform.SetTranslation(tuple(rng.uniform(-10, 10, 3)))
    return transform


def subject_warp(rng: np.random.Generator, warp_mm: float) -> sitk.BSplineTransform:
    """MNI LPS -> MNI LPS: a smooth random deformation (cubic B-spline, control points about 40 mm apart
    over the atlas, each moved by up to ``warp_mm`` along each axis)."""
    template = load_atlas()[0]
    warp = sitk.BSplineTransformInitializer(template, [4, 4, 4], order=3)
    warp.SetParameters(tuple(rng.uniform(-warp_mm, warp_mm, warp.GetNumberOfParameters())))
    return warp


def _inverse_point(transform: sitk.Transform, linear: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The point that ``transform`` maps to ``target``, by fixed-point steps through its linear part."""
    inverse = np.linalg.inv(linear)
    point = inverse @ target
    for _ in range(50):
        error = target - np.asarray(transform.TransformPoint(tuple(float(v) for v in point)))
        if np.linalg.norm(error) < 1e-4:
            break
        point = point + inverse @ error
    return point


def pick_sites(rng: np.random.Generator, n: int, radius: float, margin: float = 2.0,
               names: Optional[Sequence[str]] = None) -> List[Tuple[np.ndarray, int]]:
    """MNI LPS points whose atlas label is one region within radius + margin, spread over regions."""
    labels = load_atlas()[1]
    grid = Geometry.of(labels)
    array = sitk.GetArrayViewFromImage(labels)
    codes = [c for c, (name, _a) in enumerate(SUBREGIONS, start=1) if names is None or name in names]
    axis = np.arange(-(radius + margin), radius + margin + 0.5)
    ball = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    ball = ball[np.linalg.norm(ball, axis=1) <= radius + margin].astype(int)
    sites: List[Tuple[np.ndarray, int]] = []
    while len(sites) < n:
        code = codes[len(sites) % len(codes)]
        k, j, i = np.nonzero(array == code)
        if i.size == 0:
            codes.remove(code)
            continue
        for _ in range(200):
            pick = rng.integers(i.size)
            around = np.array([k[pick], j[pick], i[pick]]) + ball
            if np.all((around >= 0) & (around < array.shape)) and np.all(array[tuple(around.T)] == code):
                point = grid.index_to_lps(np.array([i[pick], j[pick], k[pick]], dtype=float))
                if all(np.linalg.norm(point - p) > 2 * radius + 6 for p, _c in sites):
                    sites.append((point, code))
                    break
        else:
            codes.remove(code)
    return sites


def make_atlas_phantom(seed: int, spacing: Sequence[float], direction_lps: Optional[np.ndarray] = None,
                       n_cmb: int = 8, radius: float = 2.0, names: Optional[Sequence[str]] = None,
                       sites: Optional[List[Tuple[np.ndarray, int]]] = None, warp_mm: float = 0.0) -> AtlasPhantom:
    """One phantom on a grid of ``spacing`` and ``direction_lps`` (default: RAS-stored axes flipped to LPS);
    ``warp_mm`` > 0 adds a random non-linear warp (:func:`subject_warp`) after the affine."""
    rng = np.random.default_rng(seed)
    template = load_atlas()[0]
    affine = subject_transform(rng)
    sites = sites if sites is not None else pick_sites(rng, n_cmb, radius, names=names)
    to_mni: sitk.Transform = affine
    if warp_mm > 0:
        to_mni = sitk.CompositeTransform([subject_warp(rng, warp_mm), affine])  # the affine first, then the warp
    linear = np.asarray(affine.GetMatrix()).reshape(3, 3)

    def to_scan(mni: Sequence[float]) -> np.ndarray:
        return _inverse_point(to_mni, linear, np.asarray(mni, dtype=float))

    grid = grid_around(LPS_RAS @ to_scan((0.0, -18.0, 8.0)), (170, 200, 160), spacing, direction_lps)
    image = sitk.Resample(template, list(grid.size), to_mni, sitk.sitkLinear, list(grid.origin), list(grid.spacing),
                          list(grid.direction), 0.0, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    k, j, i = np.ogrid[:array.shape[0], :array.shape[1], :array.shape[2]]
    lps_x, _y, lps_z = (grid.origin[a] + sum(grid.direction_matrix[a, b] * grid.spacing[b] * idx
                                             for b, idx in enumerate((i, j, k))) for a in range(3))
    bias = 1.0 + 0.15 * np.sin(lps_x / 60.0 + rng.uniform(0, 6)) * np.cos(lps_z / 70.0)
    signal = np.where(array > 5, (300.0 - array) * bias, 8.0).astype(np.float32)
    labels = np.zeros(array.shape, np.uint8)
    findings, truth = [], []
    for number, (mni, code) in enumerate(sites, start=1):
        centre = to_scan(mni)
        box = _box(grid, centre, radius + 2.0)
        kk, jj, ii = np.meshgrid(*[np.arange(lo, hi) for lo, hi in box], indexing="ij")
        distance = np.linalg.norm(grid.index_to_lps(np.stack([ii, jj, kk], -1).astype(float)) - centre, axis=-1)
        inside = distance <= radius
        inside[np.unravel_index(np.argmin(distance), distance.shape)] = True
        crop = tuple(slice(lo, hi) for lo, hi in box)
        signal[crop] *= np.clip((distance - radius) * 0.8 + 0.2, 0.2, 1.0)
        labels[crop][inside] = number
        ras = LPS_RAS @ centre
        ijk = np.rint(grid.lps_to_index(centre)).astype(int)
        findings.append(Finding(cmb_id=number, r=ras[0], a=ras[1], s=ras[2], i=int(ijk[0]), j=int(ijk[1]),
                                k=int(ijk[2]), volume_mm3=float(inside.sum() * grid.voxel_volume),
                                voxels=int(inside.sum())))
        name, area = SUBREGIONS[code - 1]
        mni_x = float(-mni[0])
        truth.append((name, area, "right" if mni_x > 0 else "left", mni_x))
    signal = np.abs(signal + rng.normal(0.0, 6.0, signal.shape).astype(np.float32))
    return AtlasPhantom(grid.with_image(signal), labels, findings, truth)


def _box(grid: Geometry, centre: np.ndarray, half_mm: float) -> List[Tuple[int, int]]:
    """Index ranges (k, j, i order) of the voxels within ``half_mm`` of an LPS point, clipped to the grid."""
    corners = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)]) * half_mm + centre
    ijk = grid.lps_to_index(corners)
    low = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, np.asarray(grid.size) - 1)
    high = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 1, 1, np.asarray(grid.size))
    return [(int(low[a]), int(high[a])) for a in (2, 1, 0)]
