"""Rendering phantom objects into a scan grid: partial-volume coverage of spheres and tubes, CMBs with a
dipole blooming halo along B0, mimics (tubes and clusters of spheres); each writes its truth label
where it darkens the signal enough (``synthetic`` and ``headphantom`` share it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np

from ..geometry import LPS_RAS, Geometry

if TYPE_CHECKING:
    from .synthetic import PhantomObject

B0_AXIS = np.array([0.0, 0.0, 1.0])  # scanner superior axis (RAS)


def _voxel_width(grid: Geometry, unit: np.ndarray) -> np.ndarray:
    """Extent of a voxel along unit vectors (N, 3) in RAS: the box projected on each direction."""
    axes_ras = (LPS_RAS @ grid.direction_matrix) * np.asarray(grid.spacing)
    return np.abs(unit @ axes_ras).sum(axis=1)


def _local_box(grid: Geometry, centre_ras: np.ndarray, radius: float) -> Optional[Tuple[slice, slice, slice]]:
    corners = np.array([[dx, dy, dz] for dx in (-1, 1) for dy in (-1, 1) for dz in (-1, 1)]) * radius
    idx = grid.ras_to_index(np.asarray(centre_ras) + corners)
    lo = np.maximum(np.floor(idx.min(axis=0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 2, np.asarray(grid.size))
    if np.any(hi <= lo):
        return None
    return slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0])


def _box_points(grid: Geometry, box: Tuple[slice, slice, slice]) -> np.ndarray:
    kk, jj, ii = np.mgrid[box]
    return grid.index_to_ras(np.stack([ii, jj, kk], axis=-1).reshape(-1, 3).astype(float)).reshape(*kk.shape, 3)


def _segment_distance(p: np.ndarray, path: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Distance from points (N, 3) to a polyline, and the unit vector from the line to the point."""
    best = np.full(len(p), np.inf)
    offset = np.zeros_like(p)
    for a, b in zip(path[:-1], path[1:]):
        ab = b - a
        t = np.clip(((p - a) @ ab) / max(ab @ ab, 1e-9), 0, 1)
        diff = p - (a + t[:, None] * ab)
        dist = np.linalg.norm(diff, axis=1)
        closer = dist < best
        best[closer] = dist[closer]
        offset[closer] = diff[closer]
    unit = offset / np.maximum(best, 1e-6)[:, None]
    return best, unit


def _coverage(distance: np.ndarray, radius: float, width: np.ndarray) -> np.ndarray:
    """Fraction of a voxel inside a surface at ``radius`` (linear ramp over the voxel's width)."""
    return np.clip((radius - distance) / width + 0.5, 0.0, 1.0)


def _sphere_coverage(grid: Geometry, p: np.ndarray, centre: Sequence[float], radius: float
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel coverage of a sphere at RAS points (N, 3), with their distances and unit directions from its centre."""
    diff = p - np.asarray(centre)
    dist = np.linalg.norm(diff, axis=1)
    unit = diff / np.maximum(dist, 1e-6)[:, None]
    return _coverage(dist, radius, _voxel_width(grid, unit)), dist, unit


def render_cmb(grid: Geometry, signal: np.ndarray, labels: np.ndarray, cmb: PhantomObject, bloom: float) -> None:
    """Darken a CMB into ``signal`` (multiplier) and mark its visible voxels in ``labels``."""
    r = cmb.diameter_mm / 2
    centre = np.asarray(cmb.centre)
    box = _local_box(grid, centre, 3.2 * r + 3.0)
    if box is None:
        return
    core, dist, unit = _sphere_coverage(grid, _box_points(grid, box).reshape(-1, 3), centre, r)
    cos2 = (unit @ B0_AXIS) ** 2
    dipole = (r / np.maximum(dist, r)) ** 3 * np.abs(3 * cos2 - 1) / 2
    halo = np.exp(-bloom * dipole)
    multiplier = core * cmb.darkness + (1 - core) * halo
    shape = signal[box].shape
    signal[box] *= multiplier.reshape(shape)
    visible = (multiplier < 0.5).reshape(shape)
    labels[box][visible] = cmb.label
    nearest = np.rint(grid.ras_to_index(centre)).astype(int)
    if np.all(nearest >= 0) and np.all(nearest < np.asarray(grid.size)):
        labels[nearest[2], nearest[1], nearest[0]] = cmb.label  # every CMB keeps at least one voxel


def render_mimic(grid: Geometry, signal: np.ndarray, labels: np.ndarray, mimic: PhantomObject) -> None:
    if mimic.parts:
        parts = np.asarray(mimic.parts)
        centre = parts[:, :3].mean(axis=0)
        reach = float(np.max(np.linalg.norm(parts[:, :3] - centre, axis=1) + parts[:, 3])) + 2.0
    else:
        path = np.asarray(mimic.path)
        centre = (path.min(axis=0) + path.max(axis=0)) / 2
        reach = float(np.max(np.linalg.norm(path - centre, axis=1))) + mimic.diameter_mm + 2.0
    box = _local_box(grid, centre, reach)
    if box is None:
        return
    p = _box_points(grid, box).reshape(-1, 3)
    if mimic.parts:
        cover = np.zeros(len(p))
        for x, y, z, radius in mimic.parts:
            cover = np.maximum(cover, _sphere_coverage(grid, p, (x, y, z), radius)[0])
    else:
        dist, unit = _segment_distance(p, path)
        cover = _coverage(dist, mimic.diameter_mm / 2, _voxel_width(grid, unit))
    multiplier = 1 - cover * (1 - mimic.darkness)
    shape = signal[box].shape
    signal[box] *= multiplier.reshape(shape)
    labels[box][(cover >= 0.4).reshape(shape)] = mimic.label
