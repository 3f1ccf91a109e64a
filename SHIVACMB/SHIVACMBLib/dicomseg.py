"""``cmb.seg.dcm``: a DICOM Segmentation (highdicom) with one segment per CMB, on the frames of the source series.

BINARY segmentation (not the label-map class of DICOM 2024, which validators and viewers of before it do not know).
Segment n is the n-th CMB that has voxels (label ``CMB <id>``, tracking ID the same, a new tracking UID), coded with
the CMB terminology of the module (category Morphologically Altered Structure, type Hemorrhage, anatomic region
Brain) and described as a cerebral microbleed. A CMB the model found is AUTOMATIC with the model as algorithm
(name, version, family Artificial Intelligence); one a reader added is MANUAL; one a reader painted is
SEMIAUTOMATIC. Frames without a CMB are left out; every frame references its source instance, and the series the
frame of reference.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .dicomcodes import cmb_category_and_type, standard
from .dicomseries import SourceSeries
from .findings import Finding, is_edited


DESCRIPTION = "cerebral microbleed"  # Segment Description of every segment (the terminology's Slicer label)


def algorithm_type(finding: Finding) -> str:
    """How the CMB's voxels were made: by the model, a reader, or the model then a reader."""
    if finding.status == "added":
        return "MANUAL"
    return "SEMIAUTOMATIC" if is_edited(finding) else "AUTOMATIC"


def make_segmentation(series: SourceSeries, labels: np.ndarray, findings: Sequence[Finding], identity: Dict[str, Any],
                      model: Dict[str, Any]) -> Tuple[Optional[Any], Dict[int, int]]:
    """The Segmentation of the CMBs in ``labels`` (``[k, j, i]`` on the scan's grid, label = cmb_id) and the segment
    number of each cmb_id; (None, {}) when no CMB has a voxel. ``identity``: series and equipment attributes
    (:func:`SHIVACMBLib.dicomout.identity`); ``model``: its name and version (run.json's model section)."""
    import highdicom as hd

    present = set(np.unique(labels).tolist()) - {0}
    segmented = [f for f in findings if f.cmb_id in present]
    if not segmented:
        return None, {}
    numbers = {f.cmb_id: n for n, f in enumerate(segmented, start=1)}
    relabel = np.zeros(max(present) + 1, np.uint16 if len(segmented) > 255 else np.uint8)
    for cmb_id, number in numbers.items():
        relabel[cmb_id] = number
    category, kind = cmb_category_and_type()
    algorithm = hd.AlgorithmIdentificationSequence(name=str(model["name"]), version=str(model["version"]),
                                                   family=standard("artificial_intelligence"))
    descriptions = []
    for f in segmented:
        how = algorithm_type(f)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=numbers[f.cmb_id], segment_label=f"CMB {f.cmb_id}", segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=how,
            algorithm_identification=None if how == "MANUAL" else algorithm, tracking_uid=hd.UID(),
            tracking_id=f"CMB {f.cmb_id}", anatomic_regions=[standard("brain")]))
    segmentation = hd.seg.Segmentation(
        source_images=list(series.datasets), pixel_array=relabel[series.frames(labels)], segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=identity["seg_series_number"],
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=identity["manufacturer"],
        manufacturer_model_name=identity["model_name"], software_versions=identity["software_versions"],
        device_serial_number=identity["device_serial_number"], content_label="CMB",
        content_description=identity["content_description"], content_creator_name=identity["reader"],
        series_description=identity["seg_series_description"])
    for item in segmentation.SegmentSequence:
        item.SegmentDescription = DESCRIPTION
    if identity["statement"]:
        segmentation.ImageComments = identity["statement"]
    return segmentation, numbers


def segment_numbers(segmentation: Any) -> Dict[int, int]:
    """cmb_id -> segment number of a Segmentation made by :func:`make_segmentation` (segment label "CMB <id>")."""
    numbers = {}
    for item in segmentation.SegmentSequence:
        label = str(item.SegmentLabel)
        if label.startswith("CMB ") and label[4:].isdigit():
            numbers[int(label[4:])] = int(item.SegmentNumber)
    return numbers
