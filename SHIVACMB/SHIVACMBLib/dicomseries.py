"""The DICOM series a scan was read from, or converted from: its instances in frame order, and how its frames lie
on the scan's grid.

DICOM results (cmb.seg.dcm, cmb.sr.dcm) are made against the series' own instances, so the scan's label map must be
carried onto the series' frames exactly. That is possible when both grids are the same lattice of voxel centres: the
scan's axes may be the series' axes in another order or reversed (dcm2niix stores the rows bottom-up, for one),
nothing else. :func:`read_series` reads the headers (pydicom, no pixel data), checks this and refuses, in one line
naming the folder, a series that does not match the scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

from .errors import InputError
from .geometry import Geometry

PathLike = Union[str, Path]
TOLERANCE_VOXELS = 0.05  # how far a voxel centre of the series may lie from one of the scan, in voxels
_SAME_FOR_ALL = ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "Rows", "Columns")


@dataclass(frozen=True)
class SourceSeries:
    """A single-frame DICOM image series that lies on a scan's grid."""

    folder: Path  # what errors name: the series folder
    datasets: Tuple[Any, ...]  # pydicom headers (no pixel data), in frame order: along the slice normal
    grid: Geometry  # i along a row (columns), j down the rows, k the frames
    axes: Tuple[int, int, int]  # the scan's axis (0 i, 1 j, 2 k) that each series axis runs along
    flips: Tuple[bool, bool, bool]  # each series axis runs against that scan axis

    def frames(self, labels: np.ndarray) -> np.ndarray:
        """The scan's label map (``[k, j, i]`` on the scan's grid) as the series' frames ``[frame, row, column]``."""
        ijk = labels.transpose(2, 1, 0).transpose(self.axes)
        ijk = ijk[tuple(slice(None, None, -1) if flip else slice(None) for flip in self.flips)]
        return ijk.transpose(2, 1, 0)

    @property
    def first(self) -> Any:
        return self.datasets[0]

    def summary(self) -> Dict[str, Any]:
        """What run.json records of the series."""
        return {"folder": str(self.folder.resolve()), "study_instance_uid": str(self.first.StudyInstanceUID),
                "series_instance_uid": str(self.first.SeriesInstanceUID),
                "frame_of_reference_uid": str(self.first.FrameOfReferenceUID), "instances": len(self.datasets)}


def series_files(folder: Path) -> List[Path]:
    """The files of a series folder (hidden ones left out), or the refusal naming it."""
    if not folder.is_dir():
        raise InputError(folder, "not a folder: give the folder of the DICOM series the scan was converted from")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def read_series(files: Sequence[Path], folder: Path, grid: Geometry) -> SourceSeries:
    """The DICOM images among ``files`` as one series in frame order, checked to lie on ``grid``."""
    datasets = _image_headers(files, folder)
    first = datasets[0]
    for name in _SAME_FOR_ALL:
        values = {str(getattr(ds, name, "")) for ds in datasets}
        if len(values) > 1:
            raise InputError(folder, f"DICOM images of more than one series or geometry ({len(values)} values of "
                                     f"{name}); give a folder with one series")
    if not str(getattr(first, "FrameOfReferenceUID", "")):
        raise InputError(folder, "DICOM series has no Frame of Reference UID: no DICOM result can be placed on it "
                                 "(give --no-dicom)")
    if int(getattr(first, "NumberOfFrames", 1) or 1) > 1:
        raise InputError(folder, "enhanced multi-frame DICOM image: DICOM results are made against a series of "
                                 "single-frame images")
    ordered, series_grid = _stack(datasets, folder)
    axes, flips = _lattice_map(series_grid, grid, folder)
    return SourceSeries(folder, tuple(ordered), series_grid, axes, flips)


def _image_headers(files: Sequence[Path], folder: Path) -> List[Any]:
    """Headers of the files that are DICOM images (other files, a DICOMDIR or a sidecar, are passed over)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for path in files:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "PixelSpacing" in ds:
            datasets.append(ds)
    if len(datasets) < 2:
        raise InputError(folder, f"holds {len(datasets) or 'no'} DICOM image{'s' if len(datasets) != 1 else ''} with "
                                 "a position: give the folder of the DICOM series the scan comes from")
    return datasets


def _stack(datasets: List[Any], folder: Path) -> Tuple[List[Any], Geometry]:
    """The images in order along the slice normal, and the grid they make; refused unless they are evenly spaced
    slices stacked along their normal with one orientation."""
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise InputError(folder, "DICOM images of the series have different orientations")
    row, column = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, column)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    gaps = np.diff(positions @ normal)
    gap = float(np.median(gaps))
    spacing = [float(v) for v in datasets[0].PixelSpacing]  # between rows, between columns
    if gap <= 1e-3 or np.abs(gaps - gap).max() > TOLERANCE_VOXELS * gap:
        raise InputError(folder, "DICOM series is not a stack of evenly spaced slices (one image per position)")
    size = (int(datasets[0].Columns), int(datasets[0].Rows), len(datasets))
    grid = Geometry(size, (spacing[1], spacing[0], gap), tuple(float(v) for v in positions[0]),
                    tuple(float(v) for v in np.column_stack([row, column, normal]).ravel()))
    drift = np.abs(grid.lps_to_index(positions)[:, :2]).max()
    if drift > TOLERANCE_VOXELS:
        raise InputError(folder, "DICOM slices are not stacked along their normal (tilted gantry?); DICOM results "
                                 "need an orthogonal grid")
    return [datasets[n] for n in order], grid


def _lattice_map(series: Geometry, scan: Geometry,
                 folder: Path) -> Tuple[Tuple[int, int, int], Tuple[bool, bool, bool]]:
    """For each series axis, the scan axis it runs along and whether it runs against it; refused unless both grids
    are one lattice of voxel centres over the same extent."""
    to_scan = np.linalg.inv(scan.ijk_to_lps()) @ series.ijk_to_lps()
    linear, corner = to_scan[:3, :3], to_scan[:3, 3]
    rounded = np.round(linear)
    axes = tuple(int(np.argmax(np.abs(rounded[:, a]))) for a in range(3))
    flips = tuple(bool(rounded[axes[a], a] < 0) for a in range(3))
    expected = np.zeros(3)
    for a in range(3):
        expected[axes[a]] = scan.size[axes[a]] - 1 if flips[a] else 0
    matches = (np.abs(linear - rounded).max() <= TOLERANCE_VOXELS / max(series.size)
               and sorted(axes) == [0, 1, 2] and np.count_nonzero(rounded) == 3
               and all(abs(rounded[axes[a], a]) == 1 for a in range(3))
               and all(series.size[a] == scan.size[axes[a]] for a in range(3))
               and np.abs(corner - expected).max() <= TOLERANCE_VOXELS)
    if not matches:
        raise InputError(folder, f"DICOM series does not lie on the scan's grid (series {_describe(series)}, scan "
                                 f"{_describe(scan)}): give the series the scan was converted from")
    return axes, flips


def _describe(grid: Geometry) -> str:
    spacing = "x".join(f"{s:.3g}" for s in grid.spacing)
    origin = ", ".join(f"{v:.1f}" for v in grid.origin)
    return f"{'x'.join(map(str, grid.size))} voxels of {spacing} mm from LPS ({origin})"
