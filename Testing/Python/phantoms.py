"""Analytic test scenes (a bright "brain" with dark spheres at known RAS positions) and the
grids and file formats to render them on.

A scene is defined in physical space; :func:`render` samples it on any grid (origin,
spacing, direction), with partial-volume averaging at sphere edges, so the same spheres
can be planted in scans of any orientation, resolution or obliquity.
"""

from __future__ import annotations

import locale
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SHIVACMBLib.geometry import LPS_RAS, Geometry

Vector = Tuple[float, float, float]


@dataclass
class Sphere:
    centre: Vector  # RAS mm
    radius: float  # mm
    intensity: float = 0.15  # relative to tissue


@dataclass
class Scene:
    spheres: List[Sphere] = field(default_factory=list)
    brain_centre: Vector = (0.0, 0.0, 0.0)
    brain_radii: Vector = (32.0, 38.0, 28.0)
    tissue: float = 600.0
    background: float = 15.0
    noise: float = 0.03  # standard deviation, relative to tissue
    # shells around the brain, outermost first: (scale of brain_radii, intensity relative to tissue)
    shells: List[Tuple[float, float]] = field(default_factory=list)

    @property
    def centres(self) -> np.ndarray:
        return np.array([s.centre for s in self.spheres], dtype=float).reshape(-1, 3)


def default_scene() -> Scene:
    """Six spheres of 1.8-3.5 mm radius spread through the brain."""
    return Scene(spheres=[
        Sphere((12.0, 15.0, 10.0), 2.5),
        Sphere((-15.0, -10.0, 6.0), 3.0),
        Sphere((5.0, -20.0, -8.0), 2.0),
        Sphere((-8.0, 22.0, -4.0), 3.5),
        Sphere((18.0, -5.0, -12.0), 2.2),
        Sphere((-20.0, 8.0, 14.0), 1.8),
    ])


def head_scene() -> Scene:
    """An adult-sized head (scalp, skull, CSF, brain) with eight CMBs of 1.5-4 mm radius."""
    return Scene(
        spheres=[
            Sphere((30.0, 25.0, 30.0), 2.5), Sphere((-35.0, -20.0, 15.0), 3.0), Sphere((12.0, -45.0, 5.0), 2.0),
            Sphere((-20.0, 40.0, -5.0), 4.0), Sphere((45.0, -10.0, -10.0), 2.2), Sphere((-50.0, 10.0, 25.0), 1.8),
            Sphere((8.0, 5.0, -30.0), 3.0), Sphere((-10.0, -55.0, -20.0), 2.5),
        ],
        brain_radii=(68.0, 85.0, 58.0),
        shells=[(1.25, 0.75), (1.15, 0.08), (1.05, 1.25)],
    )


def rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def grid_around(centre_ras: Sequence[float], fov_mm: Sequence[float], spacing: Sequence[float],
                direction_lps: Optional[np.ndarray] = None) -> Geometry:
    """A grid covering ``fov_mm`` along its own axes, centred on ``centre_ras``."""
    d = np.eye(3) if direction_lps is None else np.asarray(direction_lps, dtype=float)
    spacing = np.asarray(spacing, dtype=float)
    size = np.ceil(np.asarray(fov_mm) / spacing).astype(int)
    centre_lps = LPS_RAS @ np.asarray(centre_ras, dtype=float)
    origin = centre_lps - d @ (spacing * (size - 1) / 2.0)
    return Geometry(tuple(int(s) for s in size), tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                    tuple(float(v) for v in d.ravel()))


def render(scene: Scene, grid: Geometry, seed: int = 0, supersample: int = 4, dtype=np.float32) -> sitk.Image:
    """Sample the scene on ``grid``; spheres get partial-volume edges. Works in slabs of slices."""
    rng = np.random.default_rng(seed)
    out = np.empty(grid.array_shape, dtype=dtype)
    slab = max(1, 2_000_000 // (grid.size[0] * grid.size[1]))
    for k0 in range(0, grid.size[2], slab):
        k1 = min(k0 + slab, grid.size[2])
        out[k0:k1] = _render_slab(scene, grid, k0, k1, rng, supersample)
    return grid.with_image(out)


def _render_slab(scene: Scene, grid: Geometry, k0: int, k1: int, rng: np.random.Generator,
                 supersample: int) -> np.ndarray:
    kk, jj, ii = np.mgrid[k0:k1, 0:grid.size[1], 0:grid.size[0]]
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(float)
    ras = grid.index_to_ras(ijk)
    radius = np.sqrt((((ras - np.asarray(scene.brain_centre)) / np.asarray(scene.brain_radii)) ** 2).sum(axis=1))
    values = np.full(len(ras), scene.background / scene.tissue)
    for scale, intensity in scene.shells:
        values[radius <= scale] = intensity
    values[radius <= 1.0] = 1.0
    half_diagonal = 0.5 * float(np.linalg.norm(grid.spacing))
    offsets = (np.stack(np.meshgrid(*[np.arange(supersample)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) \
        / supersample - 0.5  # sub-voxel sample points, in index units
    for sphere in scene.spheres:
        distance = np.linalg.norm(ras - np.asarray(sphere.centre), axis=1)
        near = np.flatnonzero(distance <= sphere.radius + half_diagonal)
        if near.size == 0:
            continue
        sub = grid.index_to_ras(ijk[near][:, None, :] + offsets[None, :, :])
        fraction = (np.linalg.norm(sub - np.asarray(sphere.centre), axis=2) <= sphere.radius).mean(axis=1)
        values[near] = values[near] * (1 - fraction) + sphere.intensity * fraction
    values = np.abs(values + rng.normal(0.0, scene.noise, values.shape)) * scene.tissue
    return values.reshape(k1 - k0, grid.size[1], grid.size[0])


def write(image: sitk.Image, path: Path) -> Path:
    """Write with SimpleITK (format from the extension), compressed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def write_ras_nrrd(image: sitk.Image, path: Path) -> Path:
    """Write a NRRD whose header uses the RAS space (as some tools do), via pynrrd."""
    import nrrd

    grid = Geometry.of(image)
    matrix = grid.ijk_to_ras()
    header = {"space": "right-anterior-superior", "space directions": matrix[:3, :3].T,
              "space origin": matrix[:3, 3], "kinds": ["domain"] * 3, "encoding": "gzip"}
    nrrd.write(str(path), sitk.GetArrayFromImage(image).transpose(2, 1, 0), header, index_order="F")
    return path


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1") -> Path:
    """Write a DICOM series (int16 MR slices) keeping the image's geometry, with the identifiers, frame of
    reference, equipment and MR attributes a scanner writes (what a DICOM result is made against).

    GDCM's writer resets the process locale to "C"; it is restored afterwards.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ctype = locale.setlocale(locale.LC_CTYPE)
    try:
        _write_slices(image, folder, series_uid)
    finally:
        locale.setlocale(locale.LC_CTYPE, ctype)
    return folder


def _write_slices(image: sitk.Image, folder: Path, series_uid: str) -> None:
    data = sitk.Cast(sitk.RescaleIntensity(image, 0, 4000), sitk.sitkInt16)
    grid = Geometry.of(image)
    d = grid.direction_matrix
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    common = {
        "0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0020|000d": series_uid + ".0",
        "0020|000e": series_uid, "0020|0052": series_uid + ".9", "0020|1040": "",
        "0010|0010": "PHANTOM^TEST", "0010|0020": "PHANTOM", "0010|0030": "19500101", "0010|0040": "O",
        "0008|0020": "20260101", "0008|0030": "120000", "0008|0050": "ACC0001", "0008|0090": "",
        "0020|0010": "1", "0020|0011": "3", "0008|103e": "SWI phantom", "0018|5100": "HFS",
        "0008|0070": "SHIVA-CMB test phantoms", "0008|0008": "ORIGINAL\\PRIMARY\\M\\NONE",
        "0018|0020": "GR", "0018|0021": "SP", "0018|0022": "", "0018|0023": "3D", "0018|0080": "30",
        "0018|0081": "20", "0018|0091": "1",
        "0020|0037": "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1])),
        "0028|0030": f"{grid.spacing[1]:.6f}\\{grid.spacing[0]:.6f}",
        "0018|0050": f"{grid.spacing[2]:.6f}", "0018|0088": f"{grid.spacing[2]:.6f}",
    }
    for k in range(grid.size[2]):
        piece = data[:, :, k]
        for tag, value in common.items():
            piece.SetMetaData(tag, value)
        position = grid.index_to_lps(np.array([0.0, 0.0, k]))
        piece.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
        piece.SetMetaData("0020|0013", str(k + 1))
        piece.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        writer.SetFileName(str(folder / f"slice{k:04d}.dcm"))
        writer.Execute(piece)
