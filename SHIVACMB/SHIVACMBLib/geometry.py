"""Voxel grids in physical space: index <-> RAS/LPS, the model grid, resampling.

Conventions (ITK's): physical coordinates are LPS millimetres, ``direction`` is the 3x3
matrix whose columns are the unit vectors of the i, j, k axes, and
``lps = origin + direction @ diag(spacing) @ ijk``. Arrays taken from SimpleITK are
indexed ``[k, j, i]``. RAS coordinates are LPS with the first two signs flipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

LPS_RAS = np.diag([-1.0, -1.0, 1.0])  # converts LPS <-> RAS (its own inverse)
RAS_AXES_LPS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))  # along +/- each LPS axis


@dataclass(frozen=True)
class Geometry:
    """A 3D voxel grid: size (i, j, k), spacing (mm), origin (LPS mm), direction (row-major)."""

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @classmethod
    def from_matrix(cls, size: Sequence[int], ijk_to_lps: np.ndarray) -> "Geometry":
        """Build from a 4x4 voxel-to-LPS matrix (columns may carry spacing)."""
        m = np.asarray(ijk_to_lps, dtype=float)
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        return cls(
            size=tuple(int(s) for s in size),
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(o) for o in m[:3, 3]),
            direction=tuple(float(d) for d in (m[:3, :3] / spacing).ravel()),
        )

    # --- matrices -------------------------------------------------------------------
    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def ijk_to_lps(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix * np.asarray(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        m = self.ijk_to_lps()
        m[:2] *= -1.0
        return m

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) indices, shape (..., 3), to LPS millimetres."""
        return _apply(self.ijk_to_lps(), ijk)

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """LPS millimetres, shape (..., 3), to continuous (i, j, k) indices."""
        return _apply(np.linalg.inv(self.ijk_to_lps()), lps)

    def index_to_ras(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) indices, shape (..., 3), to RAS millimetres."""
        return _apply(self.ijk_to_ras(), ijk)

    def ras_to_index(self, ras: np.ndarray) -> np.ndarray:
        """RAS millimetres, shape (..., 3), to continuous (i, j, k) indices."""
        return _apply(np.linalg.inv(self.ijk_to_ras()), ras)

    # --- properties -----------------------------------------------------------------
    @property
    def array_shape(self) -> Tuple[int, int, int]:
        """Shape of the numpy array SimpleITK gives for this grid ([k, j, i])."""
        return tuple(reversed(self.size))

    @property
    def voxel_volume(self) -> float:
        return float(np.prod(self.spacing))

    def coarsened(self, voxel_mm: float) -> "Geometry":
        """The same field of view and axes with voxels of at least ``voxel_mm`` (coarser axes kept)."""
        spacing = np.maximum(np.asarray(self.spacing), voxel_mm)
        size = np.maximum(np.ceil(np.asarray(self.size) * self.spacing / spacing), 1).astype(int)
        first_centre = -0.5 + 0.5 * spacing / np.asarray(self.spacing)  # index of coarse voxel 0 on this grid
        return Geometry(tuple(int(s) for s in size), tuple(float(s) for s in spacing),
                        tuple(float(v) for v in self.index_to_lps(first_centre)), self.direction)

    def contains_ras(self, ras: np.ndarray) -> np.ndarray:
        """Whether each RAS point lies inside the grid's field of view."""
        ijk = self.ras_to_index(ras)
        return np.all((ijk >= -0.5) & (ijk <= np.asarray(self.size) - 0.5), axis=-1)

    def problems(self) -> list:
        """What makes this grid unusable, as short phrases (empty when it is fine)."""
        found = []
        values = np.concatenate([self.spacing, self.origin, self.direction])
        if not np.all(np.isfinite(values)):
            found.append("non-finite geometry (origin, spacing or direction contains NaN/inf)")
            return found
        if min(self.spacing) <= 0:
            found.append(f"non-positive voxel spacing {self.spacing}")
        if abs(np.linalg.det(self.direction_matrix)) < 1e-6:
            found.append("non-invertible direction matrix (axes are parallel or zero)")
        return found

    def obliquity_degrees(self) -> float:
        """Largest angle between a grid axis and its nearest anatomical axis."""
        d = self.direction_matrix
        cosines = np.max(np.abs(d), axis=0) / np.linalg.norm(d, axis=0)
        return float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())

    def orientation(self) -> str:
        """Where the i, j, k axes point, nearest anatomical direction each (e.g. 'RAS', 'LPS')."""
        d = self.direction_matrix
        letters = []
        for axis in range(3):
            row = int(np.argmax(np.abs(d[:, axis])))
            letters.append(_AXIS_LETTERS[row][0 if d[row, axis] > 0 else 1])
        return "".join(letters)

    def to_dict(self) -> dict:
        return {
            "size": list(self.size),
            "spacing_mm": [round(s, 6) for s in self.spacing],
            "origin_lps": [round(o, 6) for o in self.origin],
            "direction_lps": [round(d, 8) for d in self.direction],
            "ijk_to_ras": np.round(self.ijk_to_ras(), 6).tolist(),
            "orientation": self.orientation(),
            "obliquity_deg": round(self.obliquity_degrees(), 3),
        }

    def with_image(self, array_kji: np.ndarray) -> sitk.Image:
        """Wrap a [k, j, i] array as an image on this grid."""
        if tuple(array_kji.shape) != self.array_shape:
            raise ValueError(f"array shape {array_kji.shape} does not match grid {self.array_shape}")
        image = sitk.GetImageFromArray(array_kji)
        self.stamp(image)
        return image

    def stamp(self, image: sitk.Image) -> None:
        """Set this grid's origin, spacing and direction on an image of the same size."""
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)


def model_grid(shape: Sequence[int], spacing_mm: Sequence[float], origin_ras: Sequence[float]) -> Geometry:
    """A grid whose axes run to the Right, Anterior and Superior (the model's layout).

    ``origin_ras`` is the RAS position of voxel (0, 0, 0), the left-posterior-inferior
    corner voxel.
    """
    return Geometry(
        size=tuple(int(s) for s in shape),
        spacing=tuple(float(s) for s in spacing_mm),
        origin=(-float(origin_ras[0]), -float(origin_ras[1]), float(origin_ras[2])),
        direction=RAS_AXES_LPS_DIRECTION,
    )


def resample(
    image: sitk.Image,
    grid: Geometry,
    interpolator: int = sitk.sitkLinear,
    default: float = 0.0,
    pixel_type: int = sitk.sitkFloat32,
    transform: Optional[sitk.Transform] = None,
) -> sitk.Image:
    """Resample ``image`` onto ``grid``; ``transform`` maps grid points to image points (default: identity,
    both live in the same space)."""
    return sitk.Resample(
        image,
        list(grid.size),
        transform or sitk.Transform(),
        interpolator,
        list(grid.origin),
        list(grid.spacing),
        list(grid.direction),
        float(default),
        pixel_type,
    )


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points of shape (..., 3)."""
    return np.asarray(points, dtype=float) @ matrix[:3, :3].T + matrix[:3, 3]
