"""``cmb.seg.nrrd``: one Slicer segment per CMB, on the scan's own grid.

All CMBs share one layer (they never overlap): label value k is segment "CMB k", ID
``CMB_k``, with the CMB terminology and colour from Resources/Terminology and the tags
``SHIVACMB.cmb_id`` and ``SHIVACMB.status``. Written with slicerio (pynrrd underneath).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from .files import atomic_path
from .findings import Finding
from .geometry import Geometry
from .resources import cmb_terminology

PathLike = Union[str, Path]
ID_TAG = "SHIVACMB.cmb_id"
STATUS_TAG = "SHIVACMB.status"


def segment_name(cmb_id: int) -> str:
    return f"CMB {cmb_id}"


def segment_id(cmb_id: int) -> str:
    return f"CMB_{cmb_id}"


def write_seg_nrrd(path: PathLike, labels: np.ndarray, grid: Geometry, findings: Sequence[Finding],
                   compression_level: int = 1, styles: Optional[Dict[int, Tuple[str, Sequence[float]]]] = None
                   ) -> None:
    """Write the native label map (``[k, j, i]``, label = cmb_id) as a Slicer segmentation.

    ``styles`` gives some CMBs (by cmb_id) another name and colour (r, g, b in 0-1), e.g. new CMBs.
    """
    import slicerio

    terminology, colour = cmb_terminology()
    boxes = ndimage.find_objects(labels)
    segments = []
    for f in findings:
        box = boxes[f.cmb_id - 1] if f.cmb_id <= len(boxes) else None
        extent = [0, -1, 0, -1, 0, -1] if box is None else \
            [v for s in reversed(box) for v in (s.start, s.stop - 1)]  # i, j, k ranges
        name, color = (styles or {}).get(f.cmb_id, (segment_name(f.cmb_id), colour))
        segments.append({
            "id": segment_id(f.cmb_id),
            "name": name,
            "color": list(color),
            "labelValue": int(f.cmb_id),
            "layer": 0,
            "extent": extent,
            "terminology": terminology,
            "tags": {ID_TAG: str(f.cmb_id), STATUS_TAG: f.status},
        })
    segmentation = {
        "voxels": labels.transpose(2, 1, 0),  # [i, j, k] view, written in Fortran order = file order
        "ijkToLPS": grid.ijk_to_lps(),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": segments,
    }
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation, compression_level=compression_level)


def read_seg_nrrd(path: PathLike) -> Tuple[np.ndarray, Geometry, List[Dict[str, object]]]:
    """Label map ``[k, j, i]`` (label value per voxel, layer 0), its grid, and the segment records."""
    import slicerio

    segmentation = slicerio.read_segmentation(str(path))
    voxels = np.asarray(segmentation["voxels"])
    if voxels.ndim == 4:
        voxels = voxels[0]
    grid = Geometry.from_matrix(voxels.shape, segmentation["ijkToLPS"])
    return np.ascontiguousarray(voxels.transpose(2, 1, 0)), grid, list(segmentation["segments"])
